"""Class starts on the real portal: the real local IdP (full OIDC logins), the real hub and
proxy configured by ``hub.portal.configure()``, the real portal service and its class-start
engine (a pass every second), the local GPU spawner and the ledger and budgets in the
portal database.

- a pre-warmed server is handed to the student who logs in: the same server (its start
  time unchanged: no new spawn); its warm ledger
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

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.support.courses import CourseStack, course_hub, u
from tests.support.courses import course as base_course

pytestmark = [pytest.mark.hub, pytest.mark.idp, pytest.mark.timeout(600)]

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def course(cid: str, **over: Any) -> dict[str, Any]:
    """A course of ines's with tara as TA, one size (``h100:1g.10gb``) and no class
    schedule unless ``over`` gives one (each test sets its own, from now)."""
    body = base_course(cid, **{"tas": [u("tara")], "sizes": ["h100:1g.10gb"], **over})
    if "schedule" not in over:
        del body["schedule"]
    return body


def slot_at(t: datetime, minutes: int = 60) -> dict[str, Any]:
    return {"weekday": WEEKDAYS[t.weekday()], "time": t.strftime("%H:%M"), "minutes": minutes}


def next_minute(lead_s: float) -> datetime:
    """The first whole minute at least ``lead_s`` seconds from now (UTC)."""
    t = datetime.now(UTC) + timedelta(seconds=lead_s)
    return (t + timedelta(minutes=1)).replace(second=0, microsecond=0)


def wait_for(what: str, check: Callable[[], Any], timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


class Stack(CourseStack):
    """The course rig, with this file's reads: the class view, the ledger and the holds."""

    timeout = 120
    token_note = "cls"

    def students(self, cid: str) -> dict[str, dict[str, Any]]:
        r = self.portal("ines", "GET", f"/{cid}/class")
        assert r.status_code == 200, r.text
        return {s["user"]: s for s in r.json()["students"]}

    def windows(self, cid: str) -> int:
        with self.db() as conn:
            got = conn.execute(
                "SELECT COUNT(*) FROM class_windows WHERE course_id = ?", (cid,)
            ).fetchone()
            return int(got[0])


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("classes")
    courses = {"class_start_interval_seconds": 1, "max_prewarm_minutes": 30}
    with course_hub(work, courses) as (hub, idp):
        st = Stack(hub, idp)
        st.create_courses(course("ml101"), course("cv202"), course("bad1"))
        st.login_all("ines", "tara", "s1", "s2", "s3", "s5")
        yield st


def unchanged(stack: Stack, before: dict[str, Any]) -> None:
    """Course bad1 is as it was, and it has no class window."""
    assert stack.portal("ines", "GET", "/bad1").json() == before
    assert stack.windows("bad1") == 0


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prewarm": {"minutes": 10, "fraction": 1.5}}, "prewarm.fraction"),
        ({"prewarm": {"minutes": -1}}, "prewarm.minutes"),
        ({"prewarm": {"minutes": 31}}, "prewarm.minutes"),  # above the operator's bound
        ({"prewarm": {"minutes": 5, "unclaimed_minutes": -2}}, "prewarm.unclaimed_minutes"),
        ({"prewarm": {"minutes": 5, "size": "h100:3g.40gb"}}, "prewarm.size"),  # not the course's
        ({"prewarm": {"minutes": 5, "when": "soon"}}, "prewarm.when"),
    ],
)
def test_bad_prewarm_settings_name_the_field_and_change_nothing(
    stack: Stack, body: dict[str, Any], field: str
) -> None:
    before = stack.portal("ines", "GET", "/bad1").json()
    r = stack.portal("ines", "PATCH", "/bad1", json=body)
    assert r.status_code == 400 and r.json()["field"] == field, (body, r.text)
    unchanged(stack, before)


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"fraction": 2}, 400, "fraction"),
        ({"fraction": 0}, 400, "fraction"),
        ({"fraction": "all"}, 400, "fraction"),
        ({"n": 1}, 400, "n"),
        ({}, 409, "prewarm"),  # the course has no prewarm settings yet
    ],
)
def test_a_bad_prewarm_now_names_the_field_and_changes_nothing(
    stack: Stack, body: dict[str, Any], status: int, field: str
) -> None:
    before = stack.portal("ines", "GET", "/bad1").json()
    r = stack.portal("ines", "POST", "/bad1/prewarm", json=body)
    assert r.status_code == status and r.json()["field"] == field, r.text
    unchanged(stack, before)


@pytest.mark.parametrize(
    ("who", "method", "path"),
    [
        ("s1", "POST", "/bad1/prewarm"),  # a student of another course
        ("s1", "GET", "/bad1/class"),
        ("s3", "POST", "/bad1/prewarm"),  # a student of none of it
        ("s3", "GET", "/bad1/class"),
        ("s1", "POST", "/ml101/prewarm"),  # a student of the course
        ("s1", "GET", "/ml101/class"),
    ],
)
def test_students_may_not_see_or_start_a_class(
    stack: Stack, who: str, method: str, path: str
) -> None:
    before = stack.portal("ines", "GET", "/bad1").json()
    kw = {"json": {}} if method == "POST" else {}
    r = stack.portal(who, method, path, **kw)
    assert r.status_code == 403, r.text
    unchanged(stack, before)


def test_a_ta_sees_a_class_nobody_warmed(stack: Stack) -> None:
    view = stack.portal("tara", "GET", "/bad1/class").json()
    assert view["course"] == "bad1" and view["window"] is None and view["students"] == []
    assert view["prewarm"] == {"state": "idle", "reservation": None, "requested": 0, "started": 0}
    assert stack.windows("bad1") == 0


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
    session = stack.login("s1")
    r = session.get(f"{stack.hub.url}/hub/user-redirect/api/status", timeout=60)
    assert r.status_code == 200 and "started" in r.json(), (r.status_code, r.text[:200])
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
    # the engine's one hub call per pass: every student's server and its own client's
    # OAuth tokens (s1's browser made one; nobody opened s2's)
    names = [u("s1"), u("s2"), u("s3"), "nobody@uni-a.example"]
    r = stack.hub.api("POST", "/sovereign-portal/class-servers", json={"users": names})
    assert r.status_code == 200, r.text
    got = r.json()["users"]
    assert set(got) == {u("s1"), u("s2"), u("s3")}  # the hub knows no "nobody"
    assert got[u("s1")]["server"]["started"] == warm["started"]
    assert got[u("s2")]["server"]["ready"] and got[u("s2")]["server_tokens"] == []
    assert got[u("s3")]["server"] is None and "course-ml101" in got[u("s1")]["groups"]
    (tok,) = got[u("s1")]["server_tokens"]
    assert tok["oauth_client"] == f"Server at {got[u('s1')]['server']['url']}"
    for body, field in (
        ({"users": "s1"}, "users"),
        ({"users": [""]}, "users[0]"),
        ({}, "users"),
        ({"users": ["a", "x" * 256]}, "users[1]"),
    ):
        r = stack.hub.api("POST", "/sovereign-portal/class-servers", json=body)
        assert r.status_code == 400 and r.json()["field"] == field, (body, r.text)
    # a student's token holds none of the route's scopes: a 403 naming the scope
    mine_only = {"users": [u("s1"), u("s2")]}
    r = stack.hub.api("POST", "/sovereign-portal/class-servers", stack.tokens["s1"], json=mine_only)
    assert r.status_code == 403 and r.json()["field"] == "scope", r.text
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
