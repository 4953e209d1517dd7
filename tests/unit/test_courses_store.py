"""Courses in the portal database (hub/course_store.py), on SQLite and PostgreSQL: create,
edit, the pool kept as a budget, the roster, memberships at login, the end of a course."""

from __future__ import annotations

import os
import stat
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sovereign_portal.hub.budget_store import BudgetStore
from sovereign_portal.hub.course_store import (
    ENDED,
    CoursePolicy,
    CourseStore,
    delete_data,
    make_read_only,
    site_offer,
)
from sovereign_portal.hub.courses import CourseError, Limits
from sovereign_portal.hub.store import AuditEvent, PortalStore
from sovereign_portal.spawners.site import load_site
from sqlalchemy import func, select

pytestmark = pytest.mark.unit

OFFER = site_offer(load_site(None), ["ml101", "base"], "/srv/courses")


def raw(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": "ml101",
        "title": "Machine learning 101",
        "instructors": ["ines@uni-a.example"],
        "tas": ["tom@uni-a.example"],
        "image": "ml101",
        "sizes": ["h100:1g.10gb", "h100:3g.40gb"],
        "budget": {"unit": "gpu_hours", "pool": 100, "per_student": 5},
        "start": "2026-09-01",
        "end": "2027-02-01",
    }
    return {**base, **over}


def _counts(store: PortalStore) -> tuple[int, ...]:
    from sovereign_portal.hub.budget_store import BudgetRow
    from sovereign_portal.hub.course_store import CourseRosterRow, CourseRow, CourseStaff

    with store.begin() as s:
        return tuple(
            s.scalar(select(func.count()).select_from(t)) or 0
            for t in (CourseRow, CourseStaff, CourseRosterRow, BudgetRow, AuditEvent)
        )


def test_the_offer_is_the_sites_one_node_sizes() -> None:
    assert OFFER.sizes == {"h100:1g.10gb", "h100:3g.40gb", "h100x1", "h100x2", "h100x4"}


def test_a_course_is_stored_with_its_pool_as_a_budget(portal_store: PortalStore) -> None:
    cs = CourseStore(portal_store)
    c = cs.create(raw(), OFFER, "op@uni-a.example")
    assert cs.get("ml101") == c
    b = BudgetStore(portal_store).get("course:ml101", "ml101")  # the period is the course's
    assert b.amount == 100 and b.per_student == 5
    assert b.period.start.date().isoformat() == "2026-09-01"
    m = cs.memberships("tom@uni-a.example")
    assert m.assisting == {"ml101"} and not m.teaching
    assert cs.memberships("ines@uni-a.example").teaching == {"ml101"}
    with pytest.raises(CourseError) as info:
        cs.create(raw(), OFFER, "op@uni-a.example")
    assert info.value.status == 409


def test_an_existing_period_is_used_as_it_is(portal_store: PortalStore) -> None:
    bs = BudgetStore(portal_store)
    bs.set_period("2026-autumn", "2026-09-01", "2027-03-01")
    CourseStore(portal_store).create(
        raw(budget={"period": "2026-autumn", "unit": "eur", "pool": 50}), OFFER, "op"
    )
    b = bs.get("course:ml101", "2026-autumn")
    assert b.unit == "eur" and b.period.end.date().isoformat() == "2027-03-01"


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"end": "2026-01-01"}, "end"),
        ({"budget": {"unit": "gpu_hours", "pool": 10, "per_student": 20}}, "budget.per_student"),
        ({"sizes": ["h100x8"]}, "sizes[0]"),
        ({"image": "other"}, "image"),
        ({"extra": 1}, "extra"),
    ],
)
def test_bad_input_changes_nothing(
    portal_store: PortalStore, over: dict[str, Any], field: str
) -> None:
    cs = CourseStore(portal_store)
    before = _counts(portal_store)
    with pytest.raises(CourseError) as info:
        cs.create(raw(**over), OFFER, "op")
    assert info.value.field == field
    assert _counts(portal_store) == before


def test_an_allowance_above_a_new_pool_is_refused_and_nothing_changes(
    portal_store: PortalStore,
) -> None:
    cs = CourseStore(portal_store)
    cs.create(raw(), OFFER, "op")
    BudgetStore(portal_store).set_allowance("ml101", "ml101", "sam@uni-a.example", 40, "ines")
    with pytest.raises(CourseError, match="below an allowance") as info:
        cs.update("ml101", {"budget": {"unit": "gpu_hours", "pool": 30}}, OFFER, "ines")
    assert info.value.field == "budget.pool"
    assert cs.get("ml101").budget.pool == 100  # type: ignore[union-attr]
    assert BudgetStore(portal_store).get("course:ml101", "ml101").amount == 100


def test_edits_are_audited(portal_store: PortalStore) -> None:
    cs = CourseStore(portal_store)
    cs.create(raw(), OFFER, "op")
    c = cs.update("ml101", {"tas": [], "title": "ML 101"}, OFFER, "ines@uni-a.example")
    assert c.tas == () and c.title == "ML 101"
    assert cs.memberships("tom@uni-a.example").assisting == frozenset()
    actions = [e["action"] for e in cs.audit_events("ml101")]
    assert actions[0] == "course.create" and actions[-1] == "course.update"


def test_creator_limits_count_active_courses(portal_store: PortalStore) -> None:
    cs = CourseStore(portal_store)
    lim = Limits(max_courses=1)
    cs.create(raw(), OFFER, "ines@uni-a.example", limits=lim)
    with pytest.raises(CourseError) as info:
        cs.create(raw(id="ml102"), OFFER, "ines@uni-a.example", limits=lim)
    assert info.value.status == 403
    cs.mark("ml101", ENDED, "system")
    cs.create(raw(id="ml102", budget=None), OFFER, "ines@uni-a.example", limits=lim)


def test_roster_changes_are_all_or_nothing(portal_store: PortalStore) -> None:
    cs = CourseStore(portal_store)
    cs.create(raw(), OFFER, "op")
    cs.change_roster("ml101", add=["sam@uni-a.example", "sue@uni-b.example"], actor="ines")
    assert cs.roster("ml101") == {
        "added": ["sam@uni-a.example", "sue@uni-b.example"],
        "removed": [],
    }
    before = _counts(portal_store)
    with pytest.raises(CourseError) as info:
        cs.change_roster("ml101", add=["zed@uni-a.example", "Not An Id"], actor="ines")
    assert info.value.field == "add[1]"
    assert _counts(portal_store) == before
    cs.change_roster("ml101", remove=["sam@uni-a.example", "idp@uni-a.example"], actor="ines")
    m = cs.memberships("sam@uni-a.example")
    assert m.removed == {"ml101"} and not m.added
    assert cs.memberships("idp@uni-a.example").removed == {"ml101"}
    assert cs.memberships("sue@uni-b.example").added == {"ml101"}


def test_memberships_leave_out_ended_courses(portal_store: PortalStore) -> None:
    cs = CourseStore(portal_store)
    cs.create(raw(), OFFER, "op")
    cs.change_roster("ml101", add=["sam@uni-a.example"], actor="ines")
    cs.mark("ml101", ENDED, "system")
    assert cs.memberships("sam@uni-a.example").added == frozenset()
    assert cs.memberships("ines@uni-a.example").teaching == frozenset()
    with pytest.raises(CourseError) as info:
        cs.change_roster("ml101", add=["x@uni-a.example"], actor="ines")
    assert info.value.status == 409


def test_due_courses(portal_store: PortalStore) -> None:
    cs = CourseStore(portal_store)
    cs.create(raw(retention_days=30), OFFER, "op")
    cs.create(raw(id="cs50", end="2027-06-01", budget=None), OFFER, "op")
    t = datetime(2027, 2, 2, tzinfo=UTC)
    assert [(c.id, what) for c, what in cs.due(t)] == [("ml101", "end")]
    cs.mark("ml101", ENDED, "system")
    assert cs.due(t) == []
    assert [(c.id, w) for c, w in cs.due(datetime(2027, 3, 5, tzinfo=UTC))] == [("ml101", "purge")]


def test_server_access_is_recorded_for_the_student(portal_store: PortalStore) -> None:
    cs = CourseStore(portal_store)
    cs.create(raw(), OFFER, "op")
    cs.record_access("ml101", "sam@uni-a.example", "tom@uni-a.example", "help with lab 2")
    log = cs.access_log("sam@uni-a.example")
    assert len(log) == 1 and log[0]["by"] == "tom@uni-a.example"
    assert log[0]["course"] == "ml101" and log[0]["reason"] == "help with lab 2"
    assert cs.access_log("sue@uni-b.example") == []


def test_data_goes_read_only_then_is_deleted(tmp_path: Path) -> None:
    root = tmp_path / "ml101"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.txt").write_text("x")
    assert make_read_only(root) == 3
    for p in (root, root / "sub", root / "sub" / "a.txt"):
        assert not stat.S_IMODE(os.lstat(p).st_mode) & 0o222
    if os.geteuid() != 0:  # root writes anyway
        with pytest.raises(PermissionError):
            (root / "sub" / "b.txt").write_text("y")
    assert delete_data(root) is True and not root.exists()
    assert delete_data(root) is False


def test_policy_creators() -> None:
    p = CoursePolicy(creators=["ines@uni-a.example", "group:faculty"])
    assert p.may_create("ines@uni-a.example", [], False)
    assert p.may_create("x@uni-a.example", ["faculty"], False)
    assert not p.may_create("x@uni-a.example", ["students"], False)
    assert p.may_create("op", [], True)
    assert not CoursePolicy().may_create("ines@uni-a.example", [], False)
