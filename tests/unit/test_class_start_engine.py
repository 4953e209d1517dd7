"""The class-start engine's books (hub/class_start_api.py) on a real portal database
(SQLite and PostgreSQL), with the hub's REST API faked: a warm server's record and hold
go to the course pool, the claim closes the warm record and opens the student's at the
same instant, and every GPU-second is in exactly one record. The same against the real
hub, IdP and spawner: tests/hub/test_class_start.py."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sovereign_portal.hub import class_start as CS
from sovereign_portal.hub import ledger as L
from sovereign_portal.hub.budget_store import BudgetCharge, BudgetStore
from sovereign_portal.hub.class_start_api import ClassEngine
from sovereign_portal.hub.class_start_store import CLAIMED, ClassStartStore
from sovereign_portal.hub.course_store import CourseStore
from sovereign_portal.hub.courses import WEEKDAYS, SiteOffer
from sovereign_portal.hub.ledger_store import LedgerStore
from sovereign_portal.hub.store import PortalStore
from sqlalchemy import select
from traitlets.config import Configurable

pytestmark = pytest.mark.unit

S1 = "s1@uni-a.example"
RATES = L.Rates(gpu_equivalents=1 / 7, eur_per_hour=0.5, power_w=100.0, carbon_g_per_kwh=50.0)
OFFER = SiteOffer(sizes=frozenset({"h100:1g.10gb"}))


class Portal(Configurable):
    budgets: Any = None


def _setup(store: PortalStore) -> tuple[ClassEngine, Any, CS.Window]:
    today = datetime.now(UTC).date()
    now = datetime.now(UTC)
    courses = CourseStore(store)
    course = courses.create(
        {
            "id": "ml101",
            "title": "ML",
            "instructors": ["ines@uni-a.example"],
            "sizes": ["h100:1g.10gb"],
            "budget": {"unit": "gpu_hours", "pool": 40, "per_student": 4},
            "start": str(today - timedelta(days=1)),
            "end": str(today + timedelta(days=30)),
            "schedule": [
                {
                    "weekday": WEEKDAYS[now.weekday()],
                    "time": (now + timedelta(minutes=5)).strftime("%H:%M"),
                    "minutes": 60,
                }
            ],
            "prewarm": {"minutes": 10, "unclaimed_minutes": 15},
        },
        OFFER,
        "op@uni-a.example",
    )
    portal = Portal()
    portal.budgets = BudgetStore(store)
    eng = ClassEngine(portal, courses)
    w = CS.Window("ml101", course.schedule[0], now, now + timedelta(minutes=60))
    return eng, course, w


def _hub_warm_start(store: PortalStore, t0: float) -> L.Record:
    """What the hub does when the service asks for the warm server: the budget gate holds
    (as the student, ref server:<user>/), the ledger opens the record."""
    BudgetStore(store).admit(
        S1, ["course-ml101"], RATES, 120, "a 1g.10gb slice", f"server:{S1}/",
        now=datetime.fromtimestamp(t0, UTC),
    )  # fmt: skip
    rec = L.Record(
        id=L.new_id(),
        user=S1,
        owner_type="course",
        owner="ml101",
        size="h100:1g.10gb",
        walltime_minutes=120,
        source=f"server:{S1}/",
        opened_at=t0,
        started_at=t0,
        nodes="local",
        rates=RATES,
    )
    return LedgerStore(store).open(rec)


def test_warm_then_claimed_books_balance(portal_store: PortalStore) -> None:
    eng, course, w = _setup(portal_store)
    cls = ClassStartStore(portal_store)
    assert cls.begin_window(w, [S1], "schedule") == [S1]
    assert cls.begin_window(w, [S1], "schedule") == []  # once
    t0 = time.time()
    rec = _hub_warm_start(portal_store, t0)
    assert eng.mark_warm(course, w, S1) == rec.id
    ledger = LedgerStore(portal_store)
    warm = ledger.get(rec.id)
    assert warm is not None and warm.role == CS.WARM_ROLE and "warm" in warm.note
    with portal_store.begin() as s:
        (hold,) = s.scalars(select(BudgetCharge)).all()
        assert hold.user == "warm:ml101"  # the pool's warm share, not the student's
    bal = BudgetStore(portal_store).balance("course:ml101", "ml101", user=S1)
    assert bal.user_held == 0 and bal.held > 0  # the student's allowance is untouched

    at = datetime.fromtimestamp(t0 + 600, UTC)
    asyncio.run(eng.hand_over(course, w, S1, {"groups": ["course-ml101"]}, at))
    warm = ledger.get(rec.id)
    assert warm is not None and warm.end_reason == "claimed" and warm.ended_at == round(t0 + 600, 3)
    (row,) = cls.warm_rows(w.course, w.start)
    assert row["state"] == CLAIMED and row["record_id"] != rec.id
    mine = ledger.get(row["record_id"])
    assert mine is not None and not mine.closed
    assert mine.role == "student" and mine.note == "" and mine.user == S1
    assert mine.started_at == mine.opened_at == warm.ended_at  # no gap, no overlap
    assert ledger.open_for(f"server:{S1}/") == mine  # the hub closes this one at the stop
    # the student stops 300 s later
    done = ledger.close(mine.id, reason="stopped", ended_at=t0 + 900)
    assert warm.amounts is not None and done.amounts is not None
    total = warm.amounts.gpu_seconds + done.amounts.gpu_seconds
    assert total == pytest.approx(900 / 7, abs=0.01)  # every GPU-second in exactly one record
    assert warm.amounts.gpu_seconds == pytest.approx(600 / 7, abs=0.01)
    bal = BudgetStore(portal_store).balance("course:ml101", "ml101", user=S1)
    assert bal.user_settled == pytest.approx(300 / 7 / 3600, abs=1e-5)  # only their part
    assert bal.settled == pytest.approx(900 / 7 / 3600, abs=1e-5)  # the pool: all of it
    assert bal.held == 0
    n, broken = ledger.verify()
    assert n == 2 and broken is None


def test_a_claim_the_allowance_cannot_hold_stops_the_server(portal_store: PortalStore) -> None:
    eng, course, w = _setup(portal_store)
    BudgetStore(portal_store).set_allowance("ml101", "ml101", S1, 0.0, "ines@uni-a.example")
    cls = ClassStartStore(portal_store)
    cls.begin_window(w, [S1], "schedule")
    t0 = time.time()
    # the warm server runs on the pool; the student's own allowance is 0
    rec = L.Record(
        id=L.new_id(), user=S1, owner_type="course", owner="ml101", walltime_minutes=120,
        source=f"server:{S1}/", opened_at=t0, started_at=t0, rates=RATES,
    )  # fmt: skip
    LedgerStore(portal_store).open(rec)
    calls: list[tuple[str, str]] = []

    async def hub(method: str, path: str, body: Any = None) -> Any:
        calls.append((method, path))
        return {}

    eng.hub = hub  # type: ignore[method-assign]
    at = datetime.fromtimestamp(t0 + 60, UTC)
    asyncio.run(eng.hand_over(course, w, S1, {"groups": ["course-ml101"]}, at))
    assert calls == [("DELETE", "/users/s1%40uni-a.example/server")]
    (row,) = cls.warm_rows(w.course, w.start)
    assert row["state"] == "failed" and "left for you" in (row["reason"] or ""), row
    still = LedgerStore(portal_store).get(rec.id)
    assert still is not None and not still.closed  # the hub's stop closes it, on the pool


def test_the_warm_servers_job_names_the_reservation_and_a_preview_does_not() -> None:
    """SlurmGPUSpawner.reservation_for (set by configure() from the class starts): the
    job script of a start carries ``#SBATCH --reservation=<name>``; the preview never."""
    from types import SimpleNamespace

    from sovereign_portal.spawners.slurm.spawner import PREVIEW_TAG, SlurmGPUSpawner

    from tests.support.slurm_cluster import SITE_FILE, TEST_USERS, ensure_users

    ensure_users(TEST_USERS[:1])
    asked: list[Any] = []

    def reservation_for(sp: Any) -> str | None:
        asked.append(sp)
        return "class-ml101-202702020915"

    sp = SlurmGPUSpawner(
        site_file=str(SITE_FILE),
        user=SimpleNamespace(name=TEST_USERS[0], groups=[]),
        api_token="x" * 32,
        reservation_for=reservation_for,
    )
    r = sp.validate_request({"partition": "gpu-fr", "accelerator": "h100", "slice": "1g.10gb"})
    script = sp.render_job(r, PREVIEW_TAG, hub_env={})[2]
    assert "#SBATCH --reservation=class-ml101-202702020915" in script.splitlines()
    assert asked == [sp]
    assert "--reservation" not in sp.render_job(r, PREVIEW_TAG)[2]
    sp.reservation_for = lambda _sp: None
    assert "--reservation" not in sp.render_job(r, PREVIEW_TAG, hub_env={})[2]
