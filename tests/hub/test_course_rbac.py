"""Courses in the real portal, as a table: student, TA, instructor and operator × the portal's
course routes and the JupyterHub API routes a course touches, for their own course and for
another one. Every cell is a real request: the real local IdP (full OIDC logins), the real
hub and proxy configured by ``hub.portal.configure()``, and the real portal service.

The people (tests/support/idp_users.py ``COURSE_USERS``): ml101 (instructor ines, TA tara,
students s1, s2, s5 by IdP entitlement and s4 added by a roster file before their first
login) and cv202 (instructor igor by the course record only, students s3, s5); olga is the
operator. Tests that change state use people or courses of their own (s2, ph300, old1), so
the table holds in any order. Then: a removal takes effect at once, the spawn form and a
REST spawn follow the course, and the end of a course makes its data read-only, stops its
students' servers, and deletes the data after the retention period on the schedule.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from sovereign_portal.spawners.request import request_from_size_id

from tests.support.courses import TODAY, CourseStack, course, course_hub, u
from tests.support.hub import HubProcess
from tests.support.idp import LocalIdP

pytestmark = [pytest.mark.hub, pytest.mark.idp, pytest.mark.timeout(600)]


class Stack(CourseStack):
    token_note = "rbac"

    def __init__(self, hub: HubProcess, idp: LocalIdP, data_root: Path) -> None:
        super().__init__(hub, idp)
        self.data_root = data_root


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("courses")
    data_root = work / "course-data"
    data_root.mkdir()
    courses = {
        "creators": [u("igor")],
        "max_pool": {"gpu_hours": 50.0},
        "data_root": str(data_root),
        "lifecycle_interval_seconds": 1,
    }
    with course_hub(work, courses) as (hub, idp):
        st = Stack(hub, idp, data_root)
        (data_root / "ml101").mkdir()
        # the operator creates both courses before anyone else logs in
        st.create_courses(
            course("ml101", tas=[u("tara")], data_path=str(data_root / "ml101")),
            course("cv202", instructors=[u("igor")]),
        )
        st.login("ines")
        r = st.roster_file("ines", "ml101", f"identifier\n{u('s4')}\n".encode())
        assert r.status_code == 200, r.text
        assert r.json()["at_first_login"] == [u("s4")]  # s4 has never logged in
        st.login_all("s1", "s2", "s3", "s4", "s5", "tara", "igor")
        yield st


def test_logins_land_in_their_courses(stack: Stack) -> None:
    assert "course-ml101" in stack.groups("s1")
    assert stack.groups("s4") == ["course-ml101"]  # added by identifier, at first login
    assert {"course-ml101", "course-cv202"} <= set(stack.groups("s5"))
    assert "tas-ml101" in stack.groups("tara")
    assert "instructors-cv202" in stack.groups("igor")  # from the course record only
    roles = stack.hub.api("GET", f"/users/{u('tara')}").json()["roles"]
    assert "ta-ml101" in roles and "admin" not in roles
    roles = stack.hub.api("GET", f"/users/{u('igor')}").json()["roles"]
    assert "instructor-cv202" in roles and "portal-instructor" in roles and "admin" not in roles


# -- the table --------------------------------------------------------------------------------
OK, NO = "ok", "denied"
WHO = {"student": "s1", "ta": "tara", "instructor": "ines", "operator": "olga"}

#: (route, role, own course?) -> expected. Own course: ml101 (s1, tara, ines are in it);
#: the other course: cv202. The operator may do everything everywhere.
PORTAL_TABLE: list[tuple[str, str, str, bool, str]] = []
for _role in WHO:
    for _own in (True, False):
        op = _role == "operator"
        staff = _role in ("ta", "instructor", "operator")
        manage = _role in ("instructor", "operator")
        PORTAL_TABLE += [
            ("read", "GET", _role, _own, OK if (_own or op) else NO),
            ("read roster", "GET /roster", _role, _own, OK if (staff and _own) or op else NO),
            ("edit", "PATCH", _role, _own, OK if (manage and _own) or op else NO),
            ("add to roster", "POST /roster", _role, _own, OK if (manage and _own) or op else NO),
            ("end", "POST /end-check", _role, _own, OK if (manage and _own) or op else NO),
        ]


def _portal_call(stack: Stack, who: str, route: str, cid: str) -> requests.Response:
    if route == "GET":
        return stack.portal(who, "GET", f"/{cid}")
    if route == "GET /roster":
        return stack.portal(who, "GET", f"/{cid}/roster")
    if route == "PATCH":
        return stack.portal(who, "PATCH", f"/{cid}", json={"title": f"Course {cid}"})
    if route == "POST /roster":
        return stack.portal(who, "POST", f"/{cid}/roster", json={"add": [u("late")]})
    if route == "POST /end-check":
        # a bad body after the permission check: allowed callers get 400, others 403
        return stack.portal(who, "POST", f"/{cid}/end", json=[1])
    raise AssertionError(route)


@pytest.mark.parametrize(
    ("what", "route", "role", "own", "expected"),
    PORTAL_TABLE,
    ids=[f"{w}-{r}-{'own' if o else 'other'}" for w, _, r, o, _ in PORTAL_TABLE],
)
def test_portal_routes(
    stack: Stack, what: str, route: str, role: str, own: bool, expected: str
) -> None:
    cid = "ml101" if own else "cv202"
    r = _portal_call(stack, WHO[role], route, cid)
    if expected == NO:
        assert r.status_code == 403, (r.status_code, r.text)
        body = r.json()
        assert body["reason"] == "course_rule" and f"course {cid}" in body["error"], body
        assert body["field"] == "course"
    elif route == "POST /end-check":
        assert r.status_code == 400, (r.status_code, r.text)  # got past the permission
    else:
        assert r.status_code == 200, (r.status_code, r.text)
        if route == "GET" and role == "student":
            body = r.json()
            assert "instructors" not in body and body["role"] == "student"
            assert body["allowance"]["allowance"] == 4  # what is left for this student


def test_creating_courses(stack: Stack) -> None:
    for login in ("s1", "tara", "ines"):  # not creators
        r = stack.portal(login, "POST", "", json=course("x1"))
        assert r.status_code == 403 and r.json()["field"] == "course", r.text
    # igor is a creator, within the operator's limits (pool at most 50 GPU-hours)
    r = stack.portal("igor", "POST", "", json=course("db9", instructors=[u("igor")]))
    assert r.status_code == 201, r.text
    r = stack.portal(
        "igor",
        "POST",
        "",
        json=course("db10", instructors=[u("igor")], budget={"unit": "gpu_hours", "pool": 80}),
    )
    assert r.status_code == 403 and r.json()["field"] == "budget.pool", r.text
    assert stack.portal("olga", "GET", "/db10").status_code == 404  # nothing was made


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"end": str(TODAY - timedelta(days=5))}, "end"),
        ({"budget": {"unit": "gpu_hours", "pool": 10, "per_student": 11}}, "budget.per_student"),
        ({"sizes": ["h100x8"]}, "sizes[0]"),
        ({"image": "cuda"}, "image"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_bad_edits_name_the_field_and_change_nothing(
    stack: Stack, body: dict[str, Any], field: str
) -> None:
    before = stack.portal("ines", "GET", "/ml101").json()
    r = stack.portal("ines", "PATCH", "/ml101", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["field"] == field
    assert stack.portal("ines", "GET", "/ml101").json() == before


def test_a_repeated_key_is_refused(stack: Stack) -> None:
    r = stack.portal(
        "ines",
        "PATCH",
        "/ml101",
        data=b'{"title": "a", "title": "b"}',
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 400 and "twice" in r.json()["error"], r.text


@pytest.mark.parametrize(
    ("data", "row"),
    [
        (b"\xef\xbb\xbfidentifier\nz1@uni-a.example\n", "row 1"),
        (b"identifier\nz1@uni-a.example\nz1@uni-a.example\n", "row 3"),
        (b"identifier\nz1@uni-a.example\nnot an id\n", "row 3"),
        (
            b"identifier\n" + b"".join(f"z{i}@uni-a.example\n".encode() for i in range(100_000)),
            "row 5002",
        ),
    ],
    ids=["bom", "duplicate", "malformed", "1e5-lines"],
)
def test_bad_roster_files_name_the_row_and_change_nothing(
    stack: Stack, data: bytes, row: str
) -> None:
    before = stack.portal("ines", "GET", "/ml101/roster").json()
    r = stack.roster_file("ines", "ml101", data)
    assert r.status_code == 400, (r.status_code, r.text[:300])
    body = r.json()
    assert body["field"] == "roster" and body["error"].startswith(f"roster: {row}:"), body
    assert stack.portal("ines", "GET", "/ml101/roster").json() == before


# -- JupyterHub's own API: what course staff reach ------------------------------------------------
HUB_TABLE = [
    # (role, target student, path kind, expected)
    ("student", "s5", "read", NO),
    ("student", "s3", "read", NO),
    ("ta", "s5", "read", OK),
    ("ta", "s3", "read", NO),
    ("instructor", "s5", "read", OK),
    ("instructor", "s3", "read", NO),
    ("operator", "s3", "read", OK),
    ("ta", "s5", "access", NO),  # opening a server is a recorded share, not a scope
    ("instructor", "s5", "access", NO),
    ("ta", "s3", "stop", NO),
    ("instructor", "s3", "stop", NO),
]


@pytest.mark.parametrize(("role", "target", "kind", "expected"), HUB_TABLE)
def test_hub_api_routes(stack: Stack, role: str, target: str, kind: str, expected: str) -> None:
    who = WHO[role]
    if kind == "read":
        r = stack.hubapi(who, "GET", f"/users/{u(target)}")
    elif kind == "stop":
        r = stack.hubapi(who, "DELETE", f"/users/{u(target)}/server")
    else:  # a server URL needs access:servers; the hub answers the check itself
        r = stack.hubapi(who, "GET", "/user")  # whoami: the token's scopes
        scopes = set(r.json()["scopes"])
        assert not any(s.startswith("access:servers!group=") for s in scopes), scopes
        assert any(s == "servers!group=course-ml101" for s in scopes), scopes
        return
    if expected == OK:
        assert r.status_code == 200, (r.status_code, r.text)
    else:
        assert r.status_code in (403, 404), (r.status_code, r.text)


def test_staff_list_only_their_course(stack: Stack) -> None:
    r = stack.hubapi("tara", "GET", "/users")
    assert r.status_code == 200, r.text
    names = {x["name"] for x in r.json()}
    assert {u("s1"), u("s4"), u("s5")} <= names
    assert u("s3") not in names and u("igor") not in names
    r = stack.hubapi("s1", "GET", "/users")  # a student lists nobody else
    assert r.status_code == 403 or {x["name"] for x in r.json()} <= {u("s1")}, r.text


def test_a_ta_starts_and_stops_a_students_server(stack: Stack) -> None:
    opts = request_from_size_id("h100:1g.10gb", partition="lab")
    r = stack.hubapi("tara", "POST", f"/users/{u('s1')}/server", json=opts)
    assert r.status_code in (201, 202), r.text
    stack.hub.wait_ready(u("s1"))
    r = stack.hubapi("tara", "DELETE", f"/users/{u('s1')}/server")
    assert r.status_code in (202, 204), r.text
    stack.hub.wait_for(
        lambda: not stack.hub.api("GET", f"/users/{u('s1')}").json()["servers"],
        60,
        "s1's server to stop",
    )
    r = stack.hubapi("tara", "POST", f"/users/{u('s3')}/server", json=opts)
    assert r.status_code in (403, 404), r.text  # another course's student


def test_a_removal_takes_effect_at_once(stack: Stack) -> None:
    assert stack.hubapi("tara", "GET", f"/users/{u('s2')}").status_code == 200
    r = stack.portal("ines", "DELETE", f"/ml101/roster/{u('s2')}")
    assert r.status_code == 204, r.text
    assert "course-ml101" not in stack.groups("s2")  # without a new login
    assert stack.hubapi("tara", "GET", f"/users/{u('s2')}").status_code in (403, 404)
    assert stack.portal("s2", "GET", "/ml101").status_code == 403
    stack.login("s2")  # the IdP still says ml101; the portal's removal wins
    assert "course-ml101" not in stack.groups("s2")


# -- a student's view ------------------------------------------------------------------------------
def test_the_spawn_form_shows_the_course(stack: Stack) -> None:
    page = stack.sessions["s1"].get(f"{stack.hub.url}/hub/spawn", timeout=60)
    assert page.status_code == 200, page.text[:300]
    assert 'value="lab/h100:1g.10gb"' in page.text and 'value="lab/h100:3g.40gb"' in page.text
    assert 'value="lab/h100x1"' not in page.text
    assert re.search(r"ml101 has [0-9.]+ GPU-hours left for you", page.text), page.text[:2000]
    assert 'name="course"' not in page.text  # one course: nothing to pick
    two = stack.sessions["s5"].get(f"{stack.hub.url}/hub/spawn", timeout=60)
    assert 'name="course"' in two.text and 'value="cv202"' in two.text
    assert two.text.index('name="course"') < two.text.index('name="size"')  # the course first


def test_a_rest_spawn_outside_the_course_is_403_naming_the_rule(stack: Stack) -> None:
    opts = request_from_size_id("h100x1", partition="lab")
    r = stack.hub.api("POST", f"/users/{u('s4')}/server", json=opts)
    assert r.status_code == 403, r.text
    assert "course ml101 allows the sizes h100:1g.10gb, h100:3g.40gb" in r.text
    servers = stack.hub.api("GET", f"/users/{u('s4')}").json()["servers"]
    assert not any(sv.get("ready") for sv in servers.values()), servers
    # a student of two courses must say which
    r = stack.hub.api("POST", f"/users/{u('s5')}/server", json=opts)
    assert r.status_code == 400 and "choose the course first" in r.text, r.text
    r = stack.hub.api("POST", f"/users/{u('s5')}/server", json={**opts, "course": "nope"})
    assert r.status_code == 403 and "not one of yours" in r.text, r.text


# -- the end of a course ---------------------------------------------------------------------------
def test_ending_a_course_makes_data_read_only_and_stops_its_servers(stack: Stack) -> None:
    data = stack.data_root / "ph300"
    (data / "lab1").mkdir(parents=True)
    (data / "lab1" / "notes.txt").write_text("x")
    r = stack.portal(
        "olga",
        "POST",
        "",
        json=course("ph300", instructors=[u("igor")], data_path=str(data), budget=None),
    )
    assert r.status_code == 201, r.text
    r = stack.portal("igor", "POST", "/ph300/roster", json={"add": [u("s3")]})
    assert r.status_code == 200, r.text
    stack.login("s3")  # the course's group is made at the first login into it
    assert "course-ph300" in stack.groups("s3")
    opts = {**request_from_size_id("h100:1g.10gb", partition="lab"), "course": "ph300"}
    r = stack.hub.api("POST", f"/users/{u('s3')}/server", json=opts)
    assert r.status_code in (201, 202), r.text
    stack.hub.wait_ready(u("s3"))
    r = stack.portal("igor", "POST", "/ph300/end", json={})
    assert r.status_code == 200, r.text
    assert r.json()["stopped"] == [f"{u('s3')}/"]
    for p in (data, data / "lab1", data / "lab1" / "notes.txt"):
        assert not stat.S_IMODE(os.lstat(p).st_mode) & 0o222, p
    stack.hub.wait_for(
        lambda: not stack.hub.api("GET", f"/users/{u('s3')}").json()["servers"],
        60,
        "s3's course server to stop",
    )
    r = stack.portal("igor", "PATCH", "/ph300", json={"title": "late"})
    assert r.status_code == 409 and "ended" in r.json()["error"], r.text  # nothing changes
    assert [e["action"] for e in events(stack, "ph300")][-1] == "course.ended"


def events(stack: Stack, cid: str) -> list[dict[str, Any]]:
    from sovereign_portal.hub.course_store import CourseStore
    from sovereign_portal.hub.store import PortalStore

    store = PortalStore(f"sqlite:///{stack.hub.dir / 'portal.sqlite'}")
    try:
        return CourseStore(store).audit_events(cid)
    finally:
        store.dispose()


def test_the_schedule_ends_courses_and_deletes_data_after_retention(stack: Stack) -> None:
    data = stack.data_root / "old1"
    data.mkdir()
    (data / "a.txt").write_text("x")
    r = stack.portal(
        "olga",
        "POST",
        "",
        json=course(
            "old1",
            start=str(TODAY - timedelta(days=60)),
            end=str(TODAY),
            retention_days=0,
            data_path=str(data),
            budget=None,
        ),
    )
    assert r.status_code == 201, r.text
    stack.hub.wait_for(lambda: not data.exists(), 30, "the scheduled deletion of old1's data")
    assert [e["action"] for e in events(stack, "old1")][-2:] == ["course.ended", "course.purged"]
    text = stack.hub.log_text()
    assert "Course old1 ended by schedule" in text
    assert f"Course old1: retention over, data {data} deleted" in text
