"""The course routes of the portal service (hub/course_api.py) in-process, over HTTP on
127.0.0.1, with a fake hub API (users and groups in dicts): the fast inner layer. The same
routes against the real hub, IdP and proxy are tests/hub/test_course_rbac.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from sovereign_portal.hub import course_api
from sovereign_portal.hub.budget_store import DB_URL_ENV

from tests.support.sessions import PortalServiceThread

pytestmark = pytest.mark.unit

ORG = "uni-a.example"


def u(login: str) -> str:
    return f"{login}@{ORG}"


class FakeHub:
    """The hub REST API calls the course routes make, on dicts."""

    def __init__(self) -> None:
        self.groups: dict[str, set[str]] = {}
        self.users: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, str]] = []
        self.shares: list[tuple[str, str]] = []

    async def __call__(self, portal: Any, method: str, path: str, body: Any = None) -> Any:
        from urllib.parse import unquote

        self.calls.append((method, path))
        parts = [unquote(p) for p in path.strip("/").split("/")]
        if parts[0] == "groups":
            g = self.groups.get(parts[1])
            if g is None:
                return None
            if len(parts) == 2:
                return {"name": parts[1], "users": sorted(g)}
            if method == "POST":
                g.update(body["users"])
            elif method == "DELETE":
                g.difference_update(body["users"])
            return {}
        if parts[0] == "shares":
            self.shares.append((parts[1], body["user"]))
            return {}
        if parts[0] == "users":
            user = self.users.get(parts[1])
            if user is None:
                return None
            if method == "DELETE":
                user["servers"].pop(parts[3] if len(parts) > 3 else "", None)
                return {}
            return user
        raise AssertionError(path)


@pytest.fixture(params=[False], ids=["servers-closed"])
def svc(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[PortalServiceThread, FakeHub]]:
    monkeypatch.setenv(DB_URL_ENV, f"sqlite:///{tmp_path / 'portal.sqlite'}")
    access = "true" if request.param else "false"
    monkeypatch.setenv(
        "SOVEREIGN_PORTAL_COURSES",
        f'{{"creators": ["{u("igor")}"], "data_root": "{tmp_path}", "server_access": {access}}}',
    )
    hub = FakeHub()
    monkeypatch.setattr(course_api, "hub_api", hub)
    people = {
        "olga": {"groups": [], "admin": True},
        "ines": {"groups": ["instructors-ml101"]},
        "igor": {"groups": []},
        "tara": {"groups": ["tas-ml101"]},
        "s1": {"groups": ["course-ml101"]},
        "s3": {"groups": ["course-cv202"]},
    }
    users = {f"t-{k}": {"name": u(k), "roles": [], **v} for k, v in people.items()}
    for k, v in people.items():
        hub.users[u(k)] = {"name": u(k), "groups": v["groups"], "servers": {}}
    hub.groups = {"course-ml101": {u("s1")}, "course-cv202": {u("s3")}}
    t = PortalServiceThread(None, users).start()
    try:
        yield t, hub
    finally:
        t.stop()


def call(t: PortalServiceThread, who: str, method: str, path: str, **kw: Any) -> Any:
    headers = {"Authorization": f"token t-{who}", **kw.pop("headers", {})}
    return requests.request(method, f"{t.url}api/courses{path}", headers=headers, timeout=30, **kw)


COURSE = {
    "id": "ml101",
    "title": "ML",
    "instructors": [u("ines")],
    "tas": [u("tara")],
    "sizes": ["h100:1g.10gb"],
    "start": "2026-01-01",
    "end": "2036-01-01",
}


def test_routes(svc: tuple[PortalServiceThread, FakeHub], tmp_path: Path) -> None:
    t, hub = svc
    r = call(t, "ines", "POST", "", json=COURSE)
    assert r.status_code == 403 and r.json()["field"] == "course"  # not a creator
    r = call(t, "olga", "POST", "", json=COURSE)
    assert r.status_code == 201, r.text
    r = call(
        t, "olga", "POST", "", json={**COURSE, "id": "cv202", "instructors": [u("igor")], "tas": []}
    )
    assert r.status_code == 201, r.text
    # who sees what
    assert call(t, "s1", "GET", "/ml101").json()["role"] == "student"
    assert call(t, "s1", "GET", "/cv202").status_code == 403
    assert call(t, "s1", "GET", "/nope").status_code == 403  # as if it were another course
    assert call(t, "olga", "GET", "/nope").status_code == 404
    assert call(t, "tara", "GET", "/ml101/roster").status_code == 200
    assert call(t, "tara", "POST", "/ml101/roster", json={"add": [u("x")]}).status_code == 403
    assert call(t, "ines", "PATCH", "/cv202", json={"title": "x"}).status_code == 403
    listed = {c["id"]: c["role"] for c in call(t, "tara", "GET", "").json()["courses"]}
    assert listed == {"ml101": "ta"}
    # roster: a known user joins the group at once, an unknown one at first login
    r = call(
        t,
        "ines",
        "POST",
        "/ml101/roster",
        data=f"identifier\n{u('s3')}\n{u('new')}\n".encode(),
        headers={"Content-Type": "text/csv"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["added_now"] == [u("s3")] and r.json()["at_first_login"] == [u("new")]
    assert u("s3") in hub.groups["course-ml101"]
    hub.users[u("s1")]["servers"] = {"": {"user_options": {"course": "ml101"}}}
    r = call(t, "ines", "DELETE", f"/ml101/roster/{u('s1')}")
    assert r.status_code == 204, r.text
    assert u("s1") not in hub.groups["course-ml101"]
    assert hub.users[u("s1")]["servers"] == {}  # the removed student's course server stopped
    assert call(t, "s1", "GET", "/ml101").status_code == 403  # though its token still says so
    assert call(t, "ines", "GET", "/ml101/roster").json()["removed"] == [u("s1")]
    # 10^5 lines: read to the end, refused at the row limit, nothing changes
    big = b"identifier\n" + b"".join(f"z{i}@uni-a.example\n".encode() for i in range(100_000))
    r = call(t, "ines", "POST", "/ml101/roster", data=big, headers={"Content-Type": "text/csv"})
    assert r.status_code == 400 and r.json()["error"].startswith("roster: row 5002:"), r.text
    r = call(
        t, "ines", "POST", "/ml101/roster", data=b"x" * (9 << 20),
        headers={"Content-Type": "text/csv"},
    )  # fmt: skip
    assert r.status_code == 413, r.text
    assert call(t, "ines", "GET", "/ml101/roster").json()["added"] == [u("new"), u("s3")]
    # server access is off on this site (CoursePolicy.server_access)
    r = call(t, "tara", "POST", f"/ml101/servers/{u('s3')}/access", json={"reason": "help"})
    assert r.status_code == 403 and r.json()["field"] == "ta_server_access"
    assert call(t, "s3", "GET", "/access").json() == {"access": []}
    # the end: data read-only, the course's servers stop, later edits are refused
    data = tmp_path / "ml101"
    data.mkdir()
    assert call(t, "ines", "PATCH", "/ml101", json={"data_path": str(data)}).status_code == 200
    hub.users[u("s3")]["servers"] = {"": {"user_options": {"course": "ml101"}}}
    assert call(t, "ines", "POST", "/ml101/end", json={"x": 1}).status_code == 400
    r = call(t, "ines", "POST", "/ml101/end", json={})
    assert r.status_code == 200, r.text
    assert r.json()["stopped"] == [f"{u('s3')}/"] and not hub.users[u("s3")]["servers"]
    assert not data.stat().st_mode & 0o222
    assert call(t, "ines", "PATCH", "/ml101", json={"title": "y"}).status_code == 409


@pytest.mark.parametrize("svc", [True], ids=["servers-open"], indirect=True)
def test_opening_a_students_server_is_recorded_and_shown_to_them(
    svc: tuple[PortalServiceThread, FakeHub],
) -> None:
    t, hub = svc
    body = {**COURSE, "ta_server_access": False}
    assert call(t, "olga", "POST", "", json=body).status_code == 201
    path = f"/ml101/servers/{u('s1')}/access"
    r = call(t, "tara", "POST", path, json={"reason": "lab 2"})
    assert r.status_code == 403 and r.json()["field"] == "ta_server_access"  # the course: off
    assert call(t, "ines", "PATCH", "/ml101", json={"ta_server_access": True}).status_code == 200
    assert call(t, "tara", "POST", path, json={}).status_code == 400  # a reason is required
    r = call(t, "tara", "POST", f"/ml101/servers/{u('s3')}/access", json={"reason": "x"})
    assert r.status_code == 403  # not a student of ml101
    assert call(t, "s1", "POST", path, json={"reason": "x"}).status_code == 403  # a student
    assert hub.shares == []
    r = call(t, "tara", "POST", path, json={"reason": "lab 2"})
    assert r.status_code == 200, r.text
    assert hub.shares == [(u("s1"), u("tara"))]
    (seen,) = call(t, "s1", "GET", "/access").json()["access"]
    assert seen["by"] == u("tara") and seen["course"] == "ml101" and seen["reason"] == "lab 2"
    assert call(t, "s3", "GET", "/access").json() == {"access": []}
