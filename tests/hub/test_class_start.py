"""Class starts on the real portal: the real local IdP (full OIDC logins), the real hub and
proxy configured by ``hub.portal.configure()``, the real portal service and its class-start
engine (a pass every second), the local GPU spawner and the ledger and budgets in the
portal database.

- a pre-warmed server is handed to the student who logs in: the same server (its start
  time unchanged: no new spawn), reached within seconds of the login; its warm ledger
  record, on the course pool, closes at the claim and the student's own record begins
  at that instant (every GPU-second in exactly one record); the warm hold is the pool's,
  the claim's hold the student's;
- an unclaimed server is stopped at the unclaimed-stop time and its time is charged to
  the course pool as warm (its budget charge is the pool's warm share, not the student's);
- bad input (fraction above 1, negative minutes, unknown fields, a student pressing
  "pre-warm now") is a 4xx naming the field, and nothing changes.

The schedule is computed from now (the class starts a minute or three ahead).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests

from tests.support.hub import HubProcess
from tests.support.idp import LocalIdP, oidc_login
from tests.support.idp_users import COURSE_USERS, write_users
from tests.support.portal import configure_text, wait_portal_service
from tests.support.stack import hub_with_idp

pytestmark = [pytest.mark.hub, pytest.mark.idp, pytest.mark.timeout(600)]

ORG = "uni-a.example"
SVC = "/services/sovereign-portal/api/courses"
TODAY = datetime.now(UTC).date()
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def u(login: str) -> str:
    return f"{login}@{ORG}"


def slot_at(t: datetime, minutes: int = 60) -> dict[str, Any]:
    return {"weekday": WEEKDAYS[t.weekday()], "time": t.strftime("%H:%M"), "minutes": minutes}


def next_minute(lead_s: float) -> datetime:
    """The first whole minute at least ``lead_s`` seconds from now (UTC)."""
    t = datetime.now(UTC) + timedelta(seconds=lead_s)
    return (t + timedelta(minutes=1)).replace(second=0, microsecond=0)


def course(cid: str, **over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": cid,
        "title": f"Course {cid}",
        "instructors": [u("ines")],
        "tas": [u("tara")],
        "sizes": ["h100:1g.10gb"],
        "budget": {"unit": "gpu_hours", "pool": 40, "per_student": 4},
        "start": str(TODAY - timedelta(days=1)),
        "end": str(TODAY + timedelta(days=30)),
    }
    return {**base, **over}


def wait_for(what: str, check: Callable[[], Any], timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


class Stack:
    def __init__(self, hub: HubProcess, idp: LocalIdP) -> None:
        self.hub, self.idp = hub, idp
        self.tokens: dict[str, str] = {}

    def login(self, login: str) -> requests.Session:
        password = None if login == "olga" else f"pass-{login}"
        result = oidc_login(self.hub.url, self.idp, login, password)
        assert result.left_deployment is None and result.response.status_code == 200, (
            login,
            result.response.status_code,
            result.response.text[:300],
        )
        if login not in self.tokens:
            r = self.hub.api(
                "POST", f"/users/{u(login)}/tokens", json={"scopes": ["inherit"], "note": "cls"}
            )
            assert r.status_code == 201, r.text
            self.tokens[login] = r.json()["token"]
        return result.session

    def portal(self, who: str, method: str, path: str, **kw: Any) -> requests.Response:
        return requests.request(
            method,
            f"{self.hub.url}{SVC}{path}",
            headers={"Authorization": f"token {self.tokens[who]}"},
            timeout=120,
            **kw,
        )

    def server(self, login: str) -> dict[str, Any] | None:
        r = self.hub.api("GET", f"/users/{u(login)}")
        assert r.status_code == 200, r.text
        got: dict[str, Any] | None = (r.json().get("servers") or {}).get("")
        return got

    def students(self, cid: str) -> dict[str, dict[str, Any]]:
        r = self.portal("ines", "GET", f"/{cid}/class")
        assert r.status_code == 200, r.text
        return {s["user"]: s for s in r.json()["students"]}

    def db(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.hub.dir / "portal.sqlite")
        conn.row_factory = sqlite3.Row
        return conn

    def records(self, login: str) -> list[sqlite3.Row]:
        with self.db() as conn:
            return list(
                conn.execute(
                    "SELECT * FROM ledger_records WHERE source = ? ORDER BY opened_at",
                    (f"server:{u(login)}/",),
                )
            )

    def charges(self, login: str) -> list[sqlite3.Row]:
        with self.db() as conn:
            return list(
                conn.execute(
                    "SELECT * FROM budget_charges WHERE ref = ? ORDER BY created_at",
                    (f"server:{u(login)}/",),
                )
            )


def config() -> Any:
    courses = {"class_start_interval_seconds": 1, "max_prewarm_minutes": 30}

    def text(hub: HubProcess, idp: LocalIdP) -> str:
        base = configure_text(hub, idp)
        marker = '    inventory_source="declared",\n)'
        assert marker in base
        return base.replace(
            marker, f'    inventory_source="declared",\n    courses={courses!r},\n)'
        )

    return text


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("classes")
    users = write_users(work / "users.json", COURSE_USERS)
    with hub_with_idp(work, config(), idp_kw={"users_file": users}) as (hub, idp):
        wait_portal_service(hub)
        st = Stack(hub, idp)
        st.login("olga")
        for cid in ("ml101", "cv202"):
            r = st.portal("olga", "POST", "", json=course(cid))
            assert r.status_code == 201, r.text
        for login in ("ines", "tara", "s1", "s2", "s3", "s5"):
            st.login(login)
        yield st
        hub.close()
        hub.assert_no_egress()


def test_bad_class_start_input_names_the_field_and_changes_nothing(stack: Stack) -> None:
    r = stack.portal("olga", "POST", "", json=course("bad1"))  # a course of its own
    assert r.status_code == 201, r.text
    before = stack.portal("ines", "GET", "/bad1").json()
    for body, field in (
        ({"prewarm": {"minutes": 10, "fraction": 1.5}}, "prewarm.fraction"),
        ({"prewarm": {"minutes": -1}}, "prewarm.minutes"),
        ({"prewarm": {"minutes": 31}}, "prewarm.minutes"),  # above the operator's bound
        ({"prewarm": {"minutes": 5, "unclaimed_minutes": -2}}, "prewarm.unclaimed_minutes"),
        ({"prewarm": {"minutes": 5, "size": "h100:3g.40gb"}}, "prewarm.size"),
        ({"prewarm": {"minutes": 5, "when": "soon"}}, "prewarm.when"),
    ):
        r = stack.portal("ines", "PATCH", "/bad1", json=body)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["field"] == field, r.text
    assert stack.portal("ines", "GET", "/bad1").json() == before
    for body, field in (
        ({"fraction": 2}, "fraction"),
        ({"fraction": 0}, "fraction"),
        ({"fraction": "all"}, "fraction"),
        ({"n": 1}, "n"),
    ):
        r = stack.portal("ines", "POST", "/bad1/prewarm", json=body)
        assert r.status_code == 400, r.text
        assert r.json()["field"] == field, r.text
    r = stack.portal("ines", "POST", "/bad1/prewarm", json={})  # no prewarm settings yet
    assert r.status_code == 409 and r.json()["field"] == "prewarm", r.text
    for who in ("s1", "s3"):  # a student of another course, a student of none of it
        r = stack.portal(who, "POST", "/bad1/prewarm", json={})
        assert r.status_code == 403, r.text
        r = stack.portal(who, "GET", "/bad1/class")
        assert r.status_code == 403, r.text
    r = stack.portal("s1", "POST", "/ml101/prewarm", json={})  # a student of the course
    assert r.status_code == 403, r.text
    view = stack.portal("tara", "GET", "/bad1/class").json()  # a TA sees the class
    assert view["course"] == "bad1" and view["window"] is None and view["students"] == []
    assert view["prewarm"] == {"state": "idle", "reservation": None, "requested": 0, "started": 0}
    with stack.db() as conn:
        assert conn.execute(
            "SELECT COUNT(*) FROM class_windows WHERE course_id = 'bad1'"
        ).fetchone()[0] == 0  # fmt: skip


def test_a_prewarmed_server_is_handed_to_the_student_who_logs_in(stack: Stack) -> None:
    start = next_minute(90)
    r = stack.portal(
        "ines",
        "PATCH",
        "/ml101",
        json={
            "schedule": [slot_at(start)],
            "prewarm": {"minutes": 10, "fraction": 1, "unclaimed_minutes": 30},
        },
    )
    assert r.status_code == 200, r.text
    # the engine's next pass pre-warms s1, s2 and s5 (the roster; staff are not warmed)
    wait_for(
        "the warm servers of ml101",
        lambda: all(
            stack.students("ml101").get(u(s), {}).get("state") == "warm" for s in ("s1", "s2")
        ),
    )
    view = stack.portal("ines", "GET", "/ml101/class").json()
    assert view["course"] == "ml101" and view["slot"] == slot_at(start)
    assert view["window"]["start"].startswith(start.strftime("%Y-%m-%dT%H:%M"))
    assert view["prewarm"]["state"] in ("warm", "warming") and view["prewarm"]["requested"] >= 2
    assert u("ines") not in {s["user"] for s in view["students"]}
    warm = stack.server("s1")
    assert warm is not None and warm["ready"]
    assert warm["user_options"]["course"] == "ml101"
    (rec,) = stack.records("s1")
    assert rec["role"] == "warm" and rec["owner_type"] == "course" and rec["owner"] == "ml101"
    assert rec["ended_at"] is None and "warm" in rec["note"]
    (hold,) = stack.charges("s1")
    assert hold["user"] == "warm:ml101" and hold["state"] == "held"  # the pool's, not s1's

    # s1 logs in and opens their server: it is already running, the same one
    t0 = time.monotonic()
    session = stack.login("s1")
    r = session.get(f"{stack.hub.url}/hub/user-redirect/api/status", timeout=60)
    took = time.monotonic() - t0
    assert r.status_code == 200 and "started" in r.json(), (r.status_code, r.text[:200])
    assert took < 10, took
    now = stack.server("s1")
    assert now is not None and now["started"] == warm["started"]  # no new spawn

    wait_for("s1's claim", lambda: stack.students("ml101")[u("s1")]["state"] == "claimed")
    warm_rec, mine = stack.records("s1")
    assert warm_rec["id"] == rec["id"] and warm_rec["end_reason"] == "claimed"
    assert warm_rec["role"] == "warm" and warm_rec["hash"]
    assert mine["role"] == "student" and mine["ended_at"] is None and mine["note"] == ""
    assert mine["owner"] == "ml101" and mine["username"] == u("s1")
    # every GPU-second in exactly one record: the student's begins where the warm one ends
    assert mine["started_at"] == warm_rec["ended_at"] == mine["opened_at"]
    assert warm_rec["gpu_seconds"] > 0
    warm_hold, own_hold = stack.charges("s1")
    assert warm_hold["user"] == "warm:ml101" and own_hold["user"] == u("s1")
    assert own_hold["state"] == "held"
    # s2 did not come: still warm, still on the pool
    assert stack.students("ml101")[u("s2")]["state"] == "warm"
    # the student's stop closes their own record, not the warm one
    r = stack.hub.api("DELETE", f"/users/{u('s1')}/server")
    assert r.status_code in (202, 204), r.text
    wait_for("s1's record to close", lambda: stack.records("s1")[1]["ended_at"] is not None)
    assert stack.records("s1")[1]["end_reason"] == "stopped"
    for login in ("s2", "s5"):
        stack.hub.api("DELETE", f"/users/{u(login)}/server")


def test_an_unclaimed_server_is_stopped_and_charged_to_the_pool(stack: Stack) -> None:
    wait_for("s3 without a server", lambda: stack.server("s3") is None)
    start = next_minute(25)
    r = stack.portal(
        "ines",
        "PATCH",
        "/cv202",
        json={
            "schedule": [slot_at(start)],
            "prewarm": {"minutes": 5, "fraction": 1, "unclaimed_minutes": 0},
        },
    )
    assert r.status_code == 200, r.text
    wait_for("s3's warm server", lambda: stack.students("cv202")[u("s3")]["state"] == "warm")
    wait_for(
        "the unclaimed stop",
        lambda: stack.students("cv202")[u("s3")]["state"] == "stopped",
        timeout=150,
    )
    assert datetime.now(UTC) >= start
    wait_for("s3's server to go", lambda: stack.server("s3") is None)
    s3 = stack.students("cv202")[u("s3")]
    assert "unclaimed" in (s3["reason"] or ""), s3
    wait_for("the warm record to close", lambda: stack.records("s3")[-1]["ended_at"] is not None)
    rec = stack.records("s3")[-1]
    assert rec["role"] == "warm" and rec["owner"] == "cv202" and rec["end_reason"] == "stopped"
    assert rec["gpu_seconds"] > 0
    (charge,) = stack.charges("s3")
    assert charge["user"] == "warm:cv202"  # on the pool's warm share, never s3's allowance
    view = stack.portal("ines", "GET", "/cv202/class").json()
    assert view["prewarm"]["state"] == "over"
    # s3's allowance is untouched: their student view shows nothing used
    got = stack.portal("s3", "GET", "/cv202").json()["allowance"]
    assert got is not None and got["allowance"] == 4 and got["left"] == 4, got
