"""Class starts (hub/class_start.py, the pre-warm fields of hub/courses.py) as tables and
properties: the class window at any instant, when the pre-warm is due, whom it picks, what
counts as a claim, the course fields' bounds, and the reservation's argv."""

from __future__ import annotations

import math
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sovereign_portal.hub import class_start as CS
from sovereign_portal.hub.courses import (
    ClassSlot,
    Course,
    CourseError,
    Prewarm,
    SiteOffer,
    apply_changes,
    parse_course,
)

pytestmark = pytest.mark.unit

OFFER = SiteOffer(
    sizes=frozenset({"h100:1g.10gb", "h100:3g.40gb", "h100x1"}),
    max_prewarm_minutes=60,
    max_unclaimed_minutes=30,
    max_prewarm_fraction=1.0,
)
# Tuesday 2027-02-02
TUE = datetime(2027, 2, 2, 9, 15, tzinfo=UTC)


def raw(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": "ml101",
        "title": "ML",
        "instructors": ["ines@uni-a.example"],
        "sizes": ["h100:1g.10gb", "h100:3g.40gb"],
        "start": "2027-01-01",
        "end": "2027-06-30",
        "schedule": [{"weekday": "tue", "time": "09:15", "minutes": 90}],
        "prewarm": {"minutes": 10, "fraction": 0.5, "unclaimed_minutes": 15},
    }
    return {**base, **over}


def course(**over: Any) -> Course:
    return parse_course(raw(**over), OFFER)


# -- the course fields ------------------------------------------------------------------------
def test_prewarm_fields_parse_and_default_size_is_the_first_allowed() -> None:
    c = course()
    assert c.prewarm == Prewarm(10, 0.5, 15, None)
    assert c.prewarm_size() == "h100:1g.10gb"
    assert c.to_json()["prewarm"] == {
        "minutes": 10,
        "fraction": 0.5,
        "unclaimed_minutes": 15,
        "size": None,
    }
    assert course(prewarm={"minutes": 5, "size": "h100:3g.40gb"}).prewarm_size() == "h100:3g.40gb"
    assert course(prewarm=None).prewarm is None
    assert parse_course({k: v for k, v in raw().items() if k != "prewarm"}, OFFER).prewarm is None


@pytest.mark.parametrize(
    ("prewarm", "field"),
    [
        ({"minutes": -1}, "prewarm.minutes"),
        ({"minutes": 0}, "prewarm.minutes"),
        ({"minutes": 61}, "prewarm.minutes"),  # above CoursePolicy.max_prewarm_minutes
        ({"minutes": True}, "prewarm.minutes"),
        ({"minutes": "10"}, "prewarm.minutes"),
        ({}, "prewarm.minutes"),
        ({"minutes": 10, "fraction": 1.5}, "prewarm.fraction"),
        ({"minutes": 10, "fraction": 0}, "prewarm.fraction"),
        ({"minutes": 10, "fraction": -0.1}, "prewarm.fraction"),
        ({"minutes": 10, "fraction": float("nan")}, "prewarm.fraction"),
        ({"minutes": 10, "fraction": "half"}, "prewarm.fraction"),
        ({"minutes": 10, "unclaimed_minutes": -5}, "prewarm.unclaimed_minutes"),
        ({"minutes": 10, "unclaimed_minutes": 31}, "prewarm.unclaimed_minutes"),
        ({"minutes": 10, "size": "h100x1"}, "prewarm.size"),  # not one of the course's
        ({"minutes": 10, "size": "NOPE!"}, "prewarm.size"),
        ({"minutes": 10, "colour": "red"}, "prewarm.colour"),
        ([10], "prewarm"),
    ],
)
def test_bad_prewarm_names_the_field(prewarm: Any, field: str) -> None:
    with pytest.raises(CourseError) as e:
        course(prewarm=prewarm)
    assert e.value.field == field, str(e.value)


def test_prewarm_without_course_sizes_must_name_one() -> None:
    with pytest.raises(CourseError) as e:
        course(sizes=[], prewarm={"minutes": 5})
    assert e.value.field == "prewarm.size"
    assert course(sizes=[], prewarm={"minutes": 5, "size": "h100x1"}).prewarm_size() == "h100x1"


def test_operator_bound_on_the_fraction() -> None:
    narrow = SiteOffer(sizes=OFFER.sizes, max_prewarm_fraction=0.5)
    with pytest.raises(CourseError) as e:
        parse_course(raw(prewarm={"minutes": 5, "fraction": 0.6}), narrow)
    assert e.value.field == "prewarm.fraction" and "0.5" in str(e.value)


def test_an_edit_of_prewarm_is_validated_as_a_whole() -> None:
    c = course()
    new = apply_changes(c, {"prewarm": {"minutes": 20}}, OFFER)
    assert new.prewarm == Prewarm(20, 1.0, 15, None)
    named = course(prewarm={"minutes": 5, "size": "h100:3g.40gb"})
    with pytest.raises(CourseError) as e:  # the pre-warm size is no longer the course's
        apply_changes(named, {"sizes": ["h100:1g.10gb"]}, OFFER)
    assert e.value.field == "prewarm.size"


# -- windows ----------------------------------------------------------------------------------
def test_window_before_during_after() -> None:
    c = course()
    w = CS.window(c, TUE - timedelta(hours=1))
    assert w is not None and w.start == TUE and w.end == TUE + timedelta(minutes=90)
    assert CS.window(c, TUE + timedelta(minutes=30)) == w  # under way
    nxt = CS.window(c, TUE + timedelta(minutes=90))  # over: the next Tuesday's
    assert nxt is not None and nxt.start == TUE + timedelta(days=7)
    assert w.key == "ml101@20270202T0915Z" and w.reservation == "class-ml101-202702020915"


def test_no_window_outside_the_course_dates() -> None:
    c = course(end="2027-02-02")
    assert CS.window(c, TUE - timedelta(hours=1)) is None
    c = course(start="2027-02-03")
    w = CS.window(c, TUE - timedelta(hours=1))
    assert w is not None and w.start == TUE + timedelta(days=7)


def test_due_from_the_lead_until_the_unclaimed_stop() -> None:
    c = course()
    w = CS.window(c, TUE)
    assert w is not None and c.prewarm is not None
    p = c.prewarm
    assert not CS.due(w, p, TUE - timedelta(minutes=10, seconds=1))
    assert CS.due(w, p, TUE - timedelta(minutes=10))
    assert CS.due(w, p, TUE + timedelta(minutes=14, seconds=59))
    assert not CS.due(w, p, TUE + timedelta(minutes=15))
    assert CS.stop_at(w, Prewarm(10, 1.0, 500)) == w.end  # never after the class


@settings(max_examples=200, deadline=None)
@given(
    minutes_off=st.integers(min_value=-8 * 24 * 60, max_value=8 * 24 * 60),
    weekday=st.sampled_from(["mon", "tue", "wed", "thu", "fri", "sat", "sun"]),
    hh=st.integers(0, 23),
    mm=st.integers(0, 59),
    length=st.integers(1, 480),
)
def test_window_property(minutes_off: int, weekday: str, hh: int, mm: int, length: int) -> None:
    """At any instant the window is on the slot's weekday and time, not over yet, and no
    other class of the slot ends after now and starts before it."""
    c = course(
        start="2026-01-01",
        end="2028-01-01",
        schedule=[{"weekday": weekday, "time": f"{hh:02d}:{mm:02d}", "minutes": length}],
    )
    now = TUE + timedelta(minutes=minutes_off)
    w = CS.window(c, now)
    assert w is not None
    assert w.end > now
    assert w.start.strftime("%a").lower()[:3] == weekday
    assert (w.start.hour, w.start.minute) == (hh, mm)
    assert w.end - w.start == timedelta(minutes=length)
    earlier = w.start - timedelta(days=7)
    assert earlier + timedelta(minutes=length) <= now  # the one before is over


def test_window_needs_an_aware_now() -> None:
    with pytest.raises(ValueError, match="now"):
        CS.window(course(), datetime(2027, 2, 2, 9, 0))


# -- whom -------------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(
    roster=st.sets(st.from_regex(r"[a-z]{1,6}@uni-a\.example", fullmatch=True), max_size=40),
    fraction=st.floats(min_value=0.001, max_value=1.0),
    key=st.text(min_size=1, max_size=20),
)
def test_pick_property(roster: set[str], fraction: float, key: str) -> None:
    got = CS.pick(roster, fraction, key)
    assert set(got) <= roster and len(got) == len(set(got))
    if roster:
        want = min(len(roster), max(1, math.ceil(round(fraction * len(roster), 9))))
        assert len(got) == want
    else:
        assert got == []
    assert CS.pick(sorted(roster, reverse=True), fraction, key) == got  # order-free
    assert CS.pick(roster, 1.0, key) == sorted(roster)


def test_pick_rotates_with_the_window_and_refuses_bad_fractions() -> None:
    roster = [f"s{i}@uni-a.example" for i in range(20)]
    picks = {tuple(CS.pick(roster, 0.25, f"ml101@2027020{d}T0915Z")) for d in range(1, 8)}
    assert len(picks) > 1
    for bad in (0, -1, 1.01, float("inf")):
        with pytest.raises(CourseError):
            CS.pick(roster, bad, "k")


# -- the claim --------------------------------------------------------------------------------
SINCE = datetime(2027, 2, 2, 9, 5, tzinfo=UTC)


def tok(client: str, created: str) -> dict[str, Any]:
    return {"oauth_client": client, "created": created, "note": "x"}


S1_URL = "/user/s1@uni-a.example/"


@pytest.mark.parametrize(
    ("tokens", "want"),
    [
        ([], None),
        # the server's own API token: client JupyterHub (not the student's browser)
        ([tok("JupyterHub", "2027-02-02T09:06:00Z")], None),
        # an OAuth token of the server from before the pre-warm (an older session)
        ([tok("Server at /user/s1@uni-a.example/", "2027-02-02T08:00:00Z")], None),
        (
            [
                tok("Server at /user/s1@uni-a.example/", "2027-02-02T09:07:00Z"),
                tok("Server at /user/s1@uni-a.example/", "2027-02-02T09:06:30.5Z"),
                tok("JupyterHub", "2027-02-02T09:06:00Z"),
            ],
            datetime(2027, 2, 2, 9, 6, 30, 500000, tzinfo=UTC),
        ),
        ([tok("Server at /user/s1@uni-a.example/", "2027-02-02T09:05:00+00:00")], SINCE),
        # a named server of the same student (or another user's server) is no claim
        ([tok("Server at /user/s1@uni-a.example/lab2/", "2027-02-02T09:07:00Z")], None),
        ([tok("Server at /user/s10@uni-a.example/", "2027-02-02T09:07:00Z")], None),
        ([{"oauth_client": None, "created": "2027-02-02T09:07:00Z"}], None),
        ([{"oauth_client": "Server at /user/x/", "created": None}], None),
    ],
)
def test_claim_time(tokens: list[dict[str, Any]], want: datetime | None) -> None:
    assert CS.claim_time(tokens, SINCE, S1_URL) == want
    # the server's url as a subdomain hub writes it (host and path): only the path counts
    assert CS.claim_time(tokens, SINCE, "https://s1.hub.example" + S1_URL) == want


def test_warm_walltime_runs_to_the_class_end_plus_the_grace_capped() -> None:
    c = course()  # tue 09:15 for 90 minutes
    w = CS.window(c, TUE)
    assert w is not None
    at = TUE - timedelta(minutes=10)  # the pre-warm: 10 + 90 minutes to the end
    assert CS.warm_walltime(w, at, 15, 480) == 115
    assert CS.warm_walltime(w, at, 0, 480) == 100
    assert CS.warm_walltime(w, at + timedelta(seconds=30), 0, 480) == 100  # rounded up
    assert CS.warm_walltime(w, at, 15, 60) == 60  # the size's longest walltime
    assert CS.warm_walltime(w, w.end + timedelta(minutes=5), 0, 480) == 1
    with pytest.raises(ValueError, match="aware"):
        CS.warm_walltime(w, at.replace(tzinfo=None), 0, 480)
    with pytest.raises(ValueError, match="grace"):
        CS.warm_walltime(w, at, -1, 480)


@pytest.mark.parametrize(
    ("row", "server", "want"),
    [
        (None, None, "absent"),
        (None, {"ready": True}, "claimed"),  # their own server, not warmed
        (None, {"ready": False}, "starting"),
        ("starting", None, "queued"),
        ("starting", {"ready": False}, "starting"),
        ("starting", {"ready": True}, "warm"),
        ("warm", {"ready": True}, "warm"),
        ("claimed", {"ready": True}, "claimed"),
        ("claimed", None, "stopped"),
        ("unclaimed", None, "stopped"),
        ("failed", None, "stopped"),
    ],
)
def test_student_state(row: str | None, server: dict[str, Any] | None, want: str) -> None:
    assert CS.student_state(row, server) == want
    assert want in CS.STUDENT_STATES


def test_prewarm_state() -> None:
    c = course()
    w = CS.window(c, TUE)
    p = c.prewarm
    assert CS.prewarm_state(None, None, 0, 0, TUE) == CS.IDLE
    assert CS.prewarm_state(w, p, 0, 0, TUE - timedelta(minutes=30)) == CS.IDLE
    assert CS.prewarm_state(w, p, 4, 1, TUE - timedelta(minutes=5)) == CS.WARMING
    assert CS.prewarm_state(w, p, 4, 4, TUE - timedelta(minutes=5)) == CS.WARM
    assert CS.prewarm_state(w, p, 4, 4, TUE + timedelta(minutes=15)) == CS.OVER


# -- reservations ------------------------------------------------------------------------------
def test_reservation_argv() -> None:
    argv = CS.reservation_create_argv(
        "class-ml101-202702020915",
        ["s2", "s1", "s1"],
        datetime(2027, 2, 2, 9, 5, tzinfo=UTC),
        100,
        partition="lab",
        node_count=2,
    )
    assert argv == [
        "scontrol",
        "create",
        "reservation",
        "ReservationName=class-ml101-202702020915",
        "StartTime=2027-02-02T09:05:00",
        "Duration=100",
        "Users=s1,s2",
        "NodeCnt=2",
        "Flags=IGNORE_JOBS",
        "PartitionName=lab",
    ]
    named = CS.reservation_create_argv(
        "class-ml101-202702020915",
        ["s1"],
        datetime(2027, 2, 2, 9, 5, tzinfo=UTC),
        100,
        nodes=["mig-a", "mig-b"],
    )
    assert named[-2:] == ["Nodes=mig-a,mig-b", "Flags=IGNORE_JOBS"]
    with pytest.raises(CourseError):
        CS.reservation_create_argv(
            "class-ml101-202702020915", ["s1"], datetime.now(UTC), 60, nodes=["a b"]
        )
    assert CS.reservation_delete_argv("class-ml101-202702020915") == [
        "scontrol",
        "delete",
        "ReservationName=class-ml101-202702020915",
    ]


@pytest.mark.parametrize(
    ("kw", "bad"),
    [
        ({"name": "x; rm -rf /"}, "name"),
        ({"users": []}, "users"),
        ({"users": ["ok", "bad user"]}, "users"),
        ({"users": ["s1,s2"]}, "users"),
        ({"minutes": 0}, "minutes"),
        ({"partition": "lab x"}, "partition"),
    ],
)
def test_reservation_argv_refuses_bad_words(kw: dict[str, Any], bad: str) -> None:
    args: dict[str, Any] = {
        "name": "class-ml101-202702020915",
        "users": ["s1"],
        "start": datetime(2027, 2, 2, 9, 5, tzinfo=UTC),
        "minutes": 60,
    }
    args.update(kw)
    part = args.pop("partition", "")
    with pytest.raises(CourseError) as e:
        CS.reservation_create_argv(
            args["name"], args["users"], args["start"], args["minutes"], partition=part
        )
    assert e.value.field == "reservation", bad


def test_slot_json_is_the_class_api_shape() -> None:
    assert ClassSlot("tue", "09:15", 90).to_json() == {
        "weekday": "tue",
        "time": "09:15",
        "minutes": 90,
    }
    assert date(2027, 2, 2).weekday() == 1
