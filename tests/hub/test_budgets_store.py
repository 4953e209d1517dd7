"""Budgets in the portal database (hub/budget_store.py), on SQLite and on a real PostgreSQL.

Concurrent admissions cannot overspend: 20 admissions at once (threads sharing an engine,
and separate processes each with their own) against a budget that fits exactly 5 admit
exactly 5. Bad input names its field and writes nothing.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sovereign_portal.hub.budget_store import BudgetStore, apply_config
from sovereign_portal.hub.budgets import BudgetError, BudgetRefused
from sovereign_portal.hub.ledger import Amounts, Rates
from sovereign_portal.hub.store import PortalStore
from sqlalchemy import text

from tests.support.postgres import PostgresServer

pytestmark = [pytest.mark.hub, pytest.mark.timeout(300)]

GPU = Rates(gpu_equivalents=1.0, eur_per_hour=2.5, power_w=700.0, carbon_g_per_kwh=50.0)
SAM = "sam@uni-a.example"
NOW = datetime(2026, 10, 1, 12, tzinfo=UTC)
TABLES = ("budget_periods", "budgets", "budget_allowances", "budget_charges", "audit_events")


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'portal.sqlite'}"
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.new_database()


@pytest.fixture
def bs(db_url: str) -> Iterator[BudgetStore]:
    store = PortalStore(db_url)
    store.upgrade()
    assert store.current_revision() == store.head_revision()
    assert {"budgets", "budget_charges", "budget_allowances", "budget_periods"} <= (
        store.table_names()
    )
    try:
        yield BudgetStore(store)
    finally:
        store.dispose()


def snapshot(bs: BudgetStore) -> dict[str, list[Any]]:
    with bs.store.engine.connect() as c:
        return {
            t: sorted(map(tuple, c.execute(text(f"SELECT * FROM {t}")).all()), key=repr)  # noqa: S608
            for t in TABLES
        }


def course(bs: BudgetStore, amount: float = 5.0, per_student: float | None = None) -> None:
    bs.set_budget(
        "course:ml101",
        "2026-autumn",
        "gpu_hours",
        amount,
        per_student,
        start="2026-09-01",
        end="2027-02-01",
    )


def admit(bs: BudgetStore, user: str, ref: str, minutes: int = 60, **kw: Any) -> Any:
    return bs.admit(user, ["course-ml101"], GPU, minutes, "1 H100 GPU", ref, now=NOW, **kw)


def test_set_list_show_and_audit(bs: BudgetStore) -> None:
    course(bs, 10.0, 4.0)
    bs.set_budget("project:health", "2026-autumn", "eur", 250)
    assert [b.key for b in bs.budgets()] == [
        "course:ml101@2026-autumn",
        "project:health@2026-autumn",
    ]
    b = bs.get("course:ml101", "2026-autumn")
    assert (b.unit, b.amount, b.per_student) == ("gpu_hours", 10.0, 4.0)
    course(bs, 12.0, 4.0)  # a change, not a second budget
    assert len(bs.budgets("course:ml101")) == 1
    assert bs.get("course:ml101", "2026-autumn").amount == 12.0
    with bs.store.engine.connect() as c:
        actions = [r[0] for r in c.execute(text("SELECT action FROM audit_events ORDER BY id"))]
    assert actions == ["budget.set", "budget.set", "budget.set"]


BAD: list[tuple[str, dict[str, Any], str, str]] = [
    ("negative", {"amount": -1}, "amount", "negative"),
    ("nan", {"amount": float("nan")}, "amount", "finite"),
    ("nan text", {"amount": "NaN"}, "amount", "digits 0-9"),
    ("huge", {"amount": 1e300}, "amount", "over the largest"),
    ("unknown owner kind", {"owner": "team:ml101"}, "owner", "kind must be one of"),
    ("bad owner id", {"owner": "course:ML 101"}, "owner", "not a valid course id"),
    ("unknown period", {"period": "2031-spring"}, "period", "unknown period '2031-spring'"),
    ("unit", {"unit": "hours"}, "unit", "must be one of"),
    ("per-student above pool", {"per_student": 99}, "per_student", "above the course pool"),
    ("half a period", {"start": "2026-01-01"}, "end", "give both"),
    ("bad period end", {"period": "new", "start": "2026-01-01", "end": "x"}, "end", "ISO"),
    ("below an allowance", {"amount": 2.0}, "amount", "below an allowance"),
]


@pytest.mark.parametrize(("label", "change", "field", "match"), BAD, ids=[b[0] for b in BAD])
def test_bad_budget_input_names_the_field_and_changes_nothing(
    bs: BudgetStore, label: str, change: dict[str, Any], field: str, match: str
) -> None:
    course(bs, 10.0)
    bs.set_allowance("ml101", "2026-autumn", SAM, 3.0, "ines@uni-a.example")
    admit(bs, SAM, "grant:a")  # a charge exists too
    before = snapshot(bs)
    args = {"owner": "course:ml101", "period": "2026-autumn", "unit": "gpu_hours", "amount": 10}
    args.update(change)
    with pytest.raises(BudgetError, match=match) as e:
        bs.set_budget(
            args.pop("owner"), args.pop("period"), args.pop("unit"), args.pop("amount"), **args
        )
    assert e.value.field == field
    assert snapshot(bs) == before


ALLOWANCE_BAD: list[tuple[str, tuple[Any, ...], str, str, int]] = [
    ("above the pool", ("ml101", "2026-autumn", SAM, 10.5), "amount", "above the pool", 400),
    ("negative", ("ml101", "2026-autumn", SAM, -2), "amount", "negative", 400),
    ("nan", ("ml101", "2026-autumn", SAM, "nan"), "amount", "digits 0-9", 400),
    ("unknown course", ("cv200", "2026-autumn", SAM, 1), "course", "no budget", 404),
    ("unknown period", ("ml101", "2030", SAM, 1), "period", "unknown period", 400),
    ("bad user", ("ml101", "2026-autumn", "Sam Smith", 1), "user", "not a user name", 400),
]


@pytest.mark.parametrize(
    ("label", "args", "field", "match", "status"), ALLOWANCE_BAD, ids=[b[0] for b in ALLOWANCE_BAD]
)
def test_bad_allowance_names_the_field_and_changes_nothing(
    bs: BudgetStore, label: str, args: tuple[Any, ...], field: str, match: str, status: int
) -> None:
    course(bs, 10.0)
    bs.set_allowance("ml101", "2026-autumn", SAM, 3.0, "ines@uni-a.example")
    before = snapshot(bs)
    with pytest.raises(BudgetError, match=match) as e:
        bs.set_allowance(*args, actor="ines@uni-a.example")
    assert (e.value.field, e.value.status) == (field, status)
    assert snapshot(bs) == before


def test_bad_config_entry_changes_nothing(bs: BudgetStore) -> None:
    before = snapshot(bs)
    with pytest.raises(BudgetError, match="amount: must not be negative"):
        apply_config(
            bs,
            {"2026-autumn": {"start": "2026-09-01", "end": "2027-02-01"}},
            [
                {"owner": "course:ml101", "period": "2026-autumn", "unit": "eur", "amount": 5},
                {"owner": "course:cv200", "period": "2026-autumn", "unit": "eur", "amount": -5},
            ],
        )
    assert snapshot(bs) == before
    with pytest.raises(BudgetError, match="unknown key") as e:
        apply_config(bs, {}, [{"owner": "course:ml101", "colour": "red"}])
    assert e.value.field == "budgets"
    got = apply_config(
        bs,
        {"2026-autumn": {"start": "2026-09-01", "end": "2027-02-01"}},
        [{"owner": "course:ml101", "period": "2026-autumn", "unit": "eur", "amount": 5}],
    )
    assert [b.key for b in got] == ["course:ml101@2026-autumn"]


def test_hold_settle_release_and_allowance(bs: BudgetStore) -> None:
    course(bs, 5.0, per_student=2.0)
    d = admit(bs, SAM, "grant:1")
    assert (d.budget, d.hold, d.walltime_minutes) == ("course:ml101@2026-autumn", 1.0, 60)
    admit(bs, SAM, "grant:2")
    # sam's allowance of 2 is all held now: a third hour does not fit
    with pytest.raises(BudgetRefused, match="ml101 has 0 GPU-hours left for you"):
        admit(bs, SAM, "grant:3")
    [bal] = bs.balances(SAM, ["course-ml101"], NOW)
    assert (bal.held, bal.settled, bal.left) == (2.0, 0.0, 0.0)
    # the job of grant:1 ran 15 minutes: its ledger amounts settle the hold
    assert bs.settle("grant:1", Amounts(gpu_seconds=900, eur=0.625, energy_wh=175)) == 1
    assert bs.settle("grant:1", Amounts(gpu_seconds=900)) == 0  # settled once
    assert bs.release("grant:2") == 1
    [bal] = bs.balances(SAM, ["course-ml101"], NOW)
    assert (bal.held, bal.settled, bal.left) == (0.0, 0.25, 1.75)
    # an instructor raises sam's allowance within the pool
    bs.set_allowance("ml101", "2026-autumn", SAM, 4.0, "ines@uni-a.example")
    assert bs.balances(SAM, ["course-ml101"], NOW)[0].left == 3.75
    # the shortening option: 5 h asked, 3 h 45 min fit
    d = admit(bs, SAM, "grant:4", minutes=300, shorten=True)
    assert d.shortened and d.walltime_minutes == 225 and d.hold == 3.75
    # a hold never settled past its walltime and slack counts in full
    late = NOW + timedelta(days=1)
    [bal] = bs.balances(SAM, ["course-ml101"], late)
    assert (bal.held, bal.settled) == (0.0, 4.0)


def test_no_budget_no_hold(bs: BudgetStore) -> None:
    d = bs.admit(SAM, ["course-other"], GPU, 60, "1 H100 GPU", "grant:x", now=NOW)
    assert d.budget is None
    assert bs.holds() == []


def _admit_in_thread(bs: BudgetStore, barrier: threading.Barrier, i: int) -> bool:
    barrier.wait()
    try:
        admit(bs, f"u{i}@uni-a.example", f"grant:{i}")
    except BudgetRefused:
        return False
    return True


def test_twenty_parallel_admissions_threads_admit_exactly_five(bs: BudgetStore) -> None:
    course(bs, 5.0)  # 5 GPU-hours: five 1-GPU hours
    barrier = threading.Barrier(20)
    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda i: _admit_in_thread(bs, barrier, i), range(20)))
    assert sum(results) == 5
    held = [h for h in bs.holds() if h["state"] == "held"]
    assert len(held) == 5 and sum(h["held"] for h in held) == 5.0
    assert bs.balances("u0@uni-a.example", ["course-ml101"], NOW)[0].left == 0.0


def _admit_in_process(url: str, i: int) -> bool:
    store = PortalStore(url)
    try:
        bs = BudgetStore(store)
        # the processes admit together: each waits for the same moment
        while datetime.now(UTC) < _START:
            time.sleep(0.005)
        try:
            admit(bs, f"p{i}@uni-a.example", f"grant:p{i}")
        except BudgetRefused:
            return False
        return True
    finally:
        store.dispose()


_START = datetime.now(UTC)


def _init_start(at: datetime) -> None:
    global _START
    _START = at


def test_twenty_parallel_admissions_processes_admit_exactly_five(
    bs: BudgetStore, db_url: str
) -> None:
    course(bs, 5.0)
    at = datetime.now(UTC) + timedelta(seconds=4)
    with ProcessPoolExecutor(10, initializer=_init_start, initargs=(at,)) as pool:
        results = list(pool.map(_admit_in_process, [db_url] * 20, range(20)))
    assert sum(results) == 5
    assert sum(h["held"] for h in bs.holds() if h["state"] == "held") == 5.0


def _running(bs: BudgetStore, user: str, ref: str, start: float | None) -> None:
    """An open ledger record for ``ref`` (a server or a session), started at ``start``
    (None: still queued), charging the course."""
    from sovereign_portal.hub import ledger as L
    from sovereign_portal.hub.ledger_store import LedgerStore
    from sovereign_portal.spawners.request import parse_request, resolve
    from sovereign_portal.spawners.site import load_site

    from tests.support.slurm_cluster import SITE_FILE

    r = resolve(
        load_site(SITE_FILE),
        parse_request(
            {"kind": "notebook", "partition": "gpu-fr", "accelerator": "h100", "gpus": 1}
        ),
    )
    rec = L.open_record(
        r, user=user, now=NOW.timestamp(), source=ref, owner_type="course", owner="ml101"
    )
    if start is not None:
        rec = L.attach(rec, job_ids=["1"], nodes="n1", started_at=start)
    LedgerStore(bs.store).open(rec)


def test_the_budget_watch_counts_every_running_job_servers_and_sessions(bs: BudgetStore) -> None:
    """One rule for servers and sessions: the watch sums what every running job of the
    budget has used so far (from its open record), stops only after the grace, and only
    while the budget stays spent."""
    from sovereign_portal.hub.budget_store import BudgetWatch

    course(bs, 3.0)
    admit(bs, SAM, "server:sam/")  # a notebook server, running since NOW
    admit(bs, "ann@uni-a.example", "grant:g1")  # a compute session, running since NOW
    admit(bs, "ann@uni-a.example", "grant:g2")  # a session still queued: nothing used
    t0 = NOW.timestamp()
    _running(bs, SAM, "server:sam/", t0)
    _running(bs, "ann@uni-a.example", "grant:g1", t0)
    _running(bs, "ann@uni-a.example", "grant:g2", None)
    refs = ["server:sam/", "grant:g1", "grant:g2", "grant:none"]
    half = t0 + 1800
    bals = bs.running_balances(refs, half)
    assert set(bals) == {"server:sam/", "grant:g1", "grant:g2"}  # no hold, no balance
    # 0.5 + 0.5 GPU-hours used by the two running jobs; the queued one counts nothing
    assert bals["grant:g1"].settled == pytest.approx(1.0)
    assert bals["grant:g1"].held == 0.0
    assert bals["server:sam/"].user == SAM and bals["grant:g1"].user == "ann@uni-a.example"
    watch = BudgetWatch(grace_seconds=60)
    assert watch.due(bs, refs, half) == []
    # the operator lowers the pool to what is used: spent, but the grace runs first
    course(bs, 1.0)
    assert watch.due(bs, refs, half) == []
    assert watch.due(bs, refs, half + 59) == []
    due = dict(watch.due(bs, refs, half + 60))
    assert set(due) == {"server:sam/", "grant:g1", "grant:g2"}
    assert due["grant:g1"].budget.key == "course:ml101@2026-autumn"
    # raised again before the grace is over: nothing stops, and the grace starts anew
    watch2 = BudgetWatch(grace_seconds=60)
    assert watch2.due(bs, refs, half) == []
    course(bs, 3.0)
    assert watch2.due(bs, refs, half + 61) == []
    course(bs, 1.0)
    assert watch2.due(bs, refs, half + 62) == []
    # the holds themselves are untouched: the watch only reads
    assert [h["state"] for h in bs.holds()] == ["held", "held", "held"]


def test_balance_sums_many_charges_in_sql_as_the_rule_says(bs: BudgetStore) -> None:
    """The balance folds settled charges, holds and expired holds per user and for the
    pool, however many there are (one aggregate)."""
    course(bs, 5.0, per_student=3.0)
    for i in range(40):
        admit(bs, SAM if i % 2 else "ann@uni-a.example", f"grant:s{i}", minutes=1)
        bs.settle(f"grant:s{i}", used=0.01)
    admit(bs, SAM, "grant:h1", minutes=30)  # held 0.5
    bs.admit(SAM, ["course-ml101"], GPU, 30, "1 H100 GPU", "grant:old",
             now=NOW - timedelta(days=2))  # fmt: skip
    admit(bs, "ann@uni-a.example", "grant:r1", minutes=30)
    bs.release("grant:r1")  # released: counts nothing
    [bal] = bs.balances(SAM, ["course-ml101"], NOW)
    # settled: 40 × 0.01 + the expired hold of 0.5 (past its walltime and slack)
    assert bal.settled == pytest.approx(0.9)
    assert bal.held == pytest.approx(0.5)
    assert bal.user_settled == pytest.approx(0.2 + 0.5)
    assert bal.user_held == pytest.approx(0.5)
    assert bal.allowance == 3.0
    assert bal.left == pytest.approx(3.0 - 1.2)
    # the pool's balance now (months after NOW): every hold is past its walltime and
    # slack by now, so it counts in full, as settled usage
    pool = bs.balance("course:ml101", "2026-autumn")
    assert (pool.settled, pool.held) == (pytest.approx(1.4), 0.0)


# -- running totals (Alembic 0008): a cache of the settled charges, O(1) for admission --------
def _totals(bs: BudgetStore) -> dict[str, tuple[float, int]]:
    """budget_totals as {user or '': (settled, charges)} (one budget in these tests)."""
    with bs.store.engine.connect() as c:
        rows = c.execute(text('SELECT "user", settled, charges FROM budget_totals')).all()
    return {r[0]: (round(r[1], 9), r[2]) for r in rows}


def _verify(db_url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sovereign_portal.hub.cli", "ledger", "verify", "--db", db_url,
         *extra],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_running_totals_follow_every_settle_and_verify_reports_drift(
    bs: BudgetStore, db_url: str
) -> None:
    """Every way a hold settles (settle(), a closed ledger record found at the next
    admission) adds to the totals once; holds and releases add nothing; admission's
    balance is the totals plus the open holds; ``ledger verify`` checks the totals against
    the charges, names the budget that drifted, and ``--rebuild-totals`` repairs it."""
    from sovereign_portal.hub.budget_store import totals_drift
    from sovereign_portal.hub.ledger_store import LedgerStore

    course(bs, 5.0, per_student=3.0)
    ann = "ann@uni-a.example"
    for i in range(6):
        admit(bs, SAM if i % 2 else ann, f"grant:t{i}", minutes=1)
        assert bs.settle(f"grant:t{i}", used=0.1) == 1
        assert bs.settle(f"grant:t{i}", used=0.1) == 0  # once only
    admit(bs, SAM, "grant:held", minutes=30)  # a hold: not in the totals
    admit(bs, ann, "grant:gone", minutes=30)
    assert bs.release("grant:gone") == 1  # released: nothing
    assert _totals(bs) == {"": (0.6, 6), SAM: (0.3, 3), ann: (0.3, 3)}
    # a server's hold is settled from its closed ledger record at the next admission
    admit(bs, SAM, "server:sam/", minutes=60)
    _running(bs, SAM, "server:sam/", NOW.timestamp())
    led = LedgerStore(bs.store)
    rec = led.open_for("server:sam/")
    assert rec is not None
    led.close(rec.id, reason="stopped", ended_at=NOW.timestamp() + 720)  # 0.2 GPU-hours
    admit(bs, ann, "grant:next", minutes=1)
    assert _totals(bs) == {"": (0.8, 7), SAM: (0.5, 4), ann: (0.3, 3)}
    [bal] = bs.balances(SAM, ["course-ml101"], NOW)
    assert (bal.settled, bal.user_settled) == (pytest.approx(0.8), pytest.approx(0.5))
    assert (bal.held, bal.user_held) == (pytest.approx(0.5 + 1 / 60), pytest.approx(0.5))
    with bs.store.begin() as s:
        assert totals_drift(s) == []
    ok = _verify(db_url)
    assert ok.returncode == 0 and "budget totals equal" in ok.stdout, ok.stderr
    # a changed total, and a settled charge the totals never saw, are both drift
    with bs.store.engine.begin() as c:
        c.execute(text("UPDATE budget_totals SET settled = settled + 1 WHERE \"user\" = ''"))
        c.execute(text("UPDATE budget_charges SET state = 'settled', settled = 0.25 "
                       "WHERE ref = 'grant:held'"))  # fmt: skip
    with bs.store.begin() as s:
        drift = {d["user"]: d for d in totals_drift(s)}
    assert set(drift) == {"", SAM}
    assert drift[""]["total"] == pytest.approx(1.8) and drift[""]["sum"] == pytest.approx(1.05)
    assert (drift[SAM]["charges_total"], drift[SAM]["charges_sum"]) == (4, 5)
    bad = _verify(db_url)
    assert bad.returncode == 1, bad.stdout
    assert "DRIFT in course:ml101@2026-autumn" in bad.stderr and f"user {SAM}" in bad.stderr
    fixed = _verify(db_url, "--rebuild-totals")
    assert fixed.returncode == 0 and "rebuilt" in fixed.stdout, fixed.stderr
    assert _totals(bs) == {"": (1.05, 8), SAM: (0.75, 5), ann: (0.3, 3)}
    assert _verify(db_url).returncode == 0


def test_parallel_settles_and_admissions_keep_the_totals_exact(bs: BudgetStore) -> None:
    """Settles of the same holds from two threads at once, and admissions meanwhile: each
    hold is counted once, the totals equal the charges, nothing overspends."""
    from sovereign_portal.hub.budget_store import totals_drift

    course(bs, 20.0)
    for i in range(10):
        admit(bs, f"s{i}@uni-a.example", f"grant:p{i}")  # 10 GPU-hours held
    barrier = threading.Barrier(30)

    def work(i: int) -> Any:
        barrier.wait()
        if i < 20:  # two settles of each hold
            return bs.settle(f"grant:p{i % 10}", used=0.5)
        try:
            return admit(bs, f"n{i}@uni-a.example", f"grant:n{i}")
        except BudgetRefused:
            return None

    with ThreadPoolExecutor(30) as pool:
        results = list(pool.map(work, range(30)))
    assert sum(results[:20]) == 10  # each hold settled exactly once
    with bs.store.begin() as s:
        assert totals_drift(s) == []
    assert _totals(bs)[""] == (5.0, 10)
    [bal] = bs.balances("n0@uni-a.example", ["course-ml101"], NOW)
    admitted = sum(r is not None for r in results[20:])
    assert bal.settled + bal.held == pytest.approx(5.0 + admitted) and bal.left >= 0.0


def test_upgrade_from_0007_backfills_the_totals(db_url: str) -> None:
    """Migration 0008 on a database with a semester's charges: the totals equal their sums
    and admission sees the same balance as before."""
    store = PortalStore(db_url)
    try:
        store.upgrade("0007")
        assert "budget_totals" not in store.table_names()
        tz = None if db_url.startswith("sqlite") else UTC  # SQLite stores naive UTC
        t, start, end = (datetime(2026, m, 1, tzinfo=tz) for m in (10, 9, 2))
        end = end.replace(year=2027)
        with store.engine.begin() as c:
            c.execute(
                text("INSERT INTO budget_periods (name, start_at, end_at) "
                     "VALUES ('2026-autumn', :s, :e)"),
                {"s": start, "e": end},
            )  # fmt: skip
            c.execute(
                text("INSERT INTO budgets (id, owner_kind, owner_id, period, unit, amount, "
                     "per_student, updated_at, updated_by) VALUES (7, 'course', 'ml101', "
                     "'2026-autumn', 'gpu_hours', 50.0, 10.0, :t, 'op')"),
                {"t": t},
            )  # fmt: skip
            rows = [
                {"id": f"c{i}", "user": (SAM, "ann@uni-a.example")[i % 2], "ref": f"grant:{i}",
                 "state": ("settled", "settled", "released", "held")[i % 4], "held": 1.0,
                 "settled": 0.25 if i % 4 < 2 else None, "t": t}
                for i in range(40)
            ]  # fmt: skip
            c.execute(
                text('INSERT INTO budget_charges (id, budget_id, "user", ref, state, held, '
                     "settled, created_at, expires_at, closed_at) VALUES (:id, 7, :user, "
                     ":ref, :state, :held, :settled, :t, :t, :t)"),
                rows,
            )  # fmt: skip
        store.upgrade()
        assert store.current_revision() == store.head_revision()
        bs = BudgetStore(store)
        assert _totals(bs) == {"": (5.0, 20), SAM: (2.5, 10), "ann@uni-a.example": (2.5, 10)}
        bal = bs.balance("course:ml101", "2026-autumn", SAM)
        # settled 20 × 0.25, and ann's 10 holds (past their expiry: usage in full)
        assert (bal.settled, bal.held) == (pytest.approx(15.0), 0.0)
        assert bal.user_settled == pytest.approx(2.5)
    finally:
        store.dispose()


def test_gdpr_erase_and_retention_keep_the_totals_equal_to_the_charges(bs: BudgetStore) -> None:
    """The totals name users: an erase and a retention pass rename their charges, and the
    totals follow (the pseudonym's row holds what the person's did), with no drift."""
    from sovereign_portal.hub import gdpr
    from sovereign_portal.hub.budget_store import totals_drift

    key = b"k" * 64
    ann = "ann@uni-a.example"
    course(bs, 5.0, per_student=3.0)
    for i in range(4):
        admit(bs, SAM if i < 3 else ann, f"grant:e{i}", minutes=1)
        bs.settle(f"grant:e{i}", used=0.1)
    gdpr.erase_portal(bs.store, SAM, key, actor="op")
    p = gdpr.pseudonym(key, SAM)
    assert _totals(bs) == {"": (0.4, 4), p: (0.3, 3), ann: (0.1, 1)}
    with bs.store.begin() as s:
        assert totals_drift(s) == []
    # a retention pass long after: every closed charge is pseudonymised, totals follow
    counts = gdpr.retention(bs.store, key, 1, now=time.time() + 30 * 86400)
    assert counts["budget_charges"] == 1  # ann's; sam's were already erased
    assert _totals(bs) == {"": (0.4, 4), p: (0.3, 3), gdpr.pseudonym(key, ann): (0.1, 1)}
    with bs.store.begin() as s:
        assert totals_drift(s) == []


def test_admission_settles_a_closed_record_and_counts_what_it_used(bs: BudgetStore) -> None:
    """A hold whose ledger record has closed settles at admission (in the admission's own
    transaction) and counts what the job used, not the hold: the next refusal says so."""
    from sovereign_portal.hub.ledger_store import LedgerStore

    course(bs, 2.0)
    admit(bs, SAM, "grant:a")  # holds 1.0
    _running(bs, SAM, "grant:a", start=NOW.timestamp())
    rec = LedgerStore(bs.store).open_for("grant:a")
    assert rec is not None
    LedgerStore(bs.store).close(rec.id, reason="stopped", ended_at=NOW.timestamp() + 900)
    admit(bs, SAM, "grant:b")  # fits only because grant:a settled at 0.25 (2 - 0.25 >= 1)
    with pytest.raises(BudgetRefused, match=r"ml101 has 0\.75 GPU-hours left for you"):
        admit(bs, SAM, "grant:c")
    states = {h["ref"]: (h["state"], h["settled"]) for h in bs.holds()}
    assert states["grant:a"] == ("settled", pytest.approx(0.25))
    assert states["grant:b"] == ("held", None)
    assert _totals(bs)[""] == (pytest.approx(0.25), 1)


def test_a_pooled_postgresql_connection_the_server_closed_is_replaced_before_use(
    postgres_server: PostgresServer,
) -> None:
    """No pre-ping round trip per checkout: a connection used a moment ago is handed out
    as it is, unless its socket stirs; one whose session the server ended (here:
    pg_terminate_backend) is found so, pinged, dropped and replaced, and the admission
    succeeds on a fresh one."""
    db_url = postgres_server.new_database()
    store = PortalStore(db_url)
    try:
        store.upgrade()
        bs = BudgetStore(store)
        course(bs, 5.0)
        assert store.liveness is not None
        admit(bs, SAM, "grant:1")
        pid = _backend_pid(store)
        before = store.liveness.pings
        admit(bs, SAM, "grant:2")
        assert store.liveness.pings == before  # warm and quiet: no ping
        assert _backend_pid(store) == pid
        _outside(store, "SELECT pg_terminate_backend(%s)", pid)  # not from the pool
        deadline = time.monotonic() + 10
        while _outside(store, "SELECT 1 FROM pg_stat_activity WHERE pid = %s", pid):
            assert time.monotonic() < deadline, "the backend did not end"
            time.sleep(0.05)
        for i in range(3):  # every admission works
            admit(bs, SAM, f"grant:r{i}")
        assert store.liveness.pings >= before + 1
        assert _backend_pid(store) != pid
        assert len([h for h in bs.holds() if h["state"] == "held"]) == 5
    finally:
        store.dispose()


def _backend_pid(store: PortalStore) -> int:
    with store.engine.connect() as c:
        return int(c.execute(text("SELECT pg_backend_pid()")).scalar_one())


def _outside(store: PortalStore, sql: str, *args: Any) -> bool:
    """Run ``sql`` on a connection of its own (not the store's pool); whether it gave a row."""
    import psycopg

    url = store.engine.url
    dsn = f"host={url.host} port={url.port} user={url.username} dbname=postgres"
    with psycopg.connect(dsn) as c:
        return c.execute(sql, args).fetchone() is not None  # type: ignore[arg-type]
