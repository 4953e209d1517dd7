"""Admission latency with 1 M ledger rows, on SQLite and on a real PostgreSQL server.

One operation is what admitting and ending a session costs: the budget admission itself
(``BudgetStore.admit``: lock the budget row, settle its closed holds from the ledger, read
its running totals and open holds, write the hold; the call the spawn path and the portal
service make), open a ledger record, close it (chained under the head-row lock) and read
the owner's ledger totals (``LedgerStore.balance``). It is timed on an empty portal
database (the baseline, same run, same machine), then again once the ledger holds
``--rows`` closed rows of ``--owners`` owners, each with its settled budget charge (so a
course budget has thousands of charges, as after a semester), written in bulk
(``executemany`` on SQLite, ``COPY`` on PostgreSQL), with the budgets' running totals
rebuilt from them as migration 0008 does. The goal of issue 10 is an admission p99 ≤ 20 ms
at 1 M rows; the first line says whether it is met and gives the ratio to the empty
baseline; the second gives the whole operation, the third each phase.

    .venv/bin/python benchmarks/bench_ledger.py [--rows 1000000] [--ops 300]
        [--engines sqlite,postgresql] [--durable]

PostgreSQL is a throwaway server (tests/support/postgres.py; needs root for the
``postgres`` account, as in the tests) with the test fixture's settings: ``fsync=off``,
``synchronous_commit=off``, ``full_page_writes=off`` (so a commit waits on no disk there).
``--durable`` runs it with PostgreSQL's own defaults instead, as production keeps them:
every commit then waits for its WAL flush. SQLite runs as the portal runs it: WAL, and
SQLite's default ``synchronous=FULL`` (every commit syncs the WAL).
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datetime import UTC, datetime, timedelta

from sovereign_portal.hub import ledger as L
from sovereign_portal.hub.budget_store import (
    BudgetCharge,
    BudgetPeriod,
    BudgetRow,
    BudgetStore,
    BudgetTotal,
    rebuild_totals,
)
from sovereign_portal.hub.budgets import describe
from sovereign_portal.hub.ledger_store import LedgerStore, records, to_row
from sovereign_portal.hub.store import PortalStore
from sovereign_portal.spawners.request import parse_request, resolve
from sovereign_portal.spawners.site import load_site

from tests.support.slurm_cluster import SITE_FILE

SITE = load_site(SITE_FILE)
RESOLVED = resolve(SITE, parse_request({"kind": "notebook", "slice": "1g.10gb"}))
RATES = L.Rates.from_resolved(RESOLVED)
WHAT = describe(RESOLVED.size.to_json(RESOLVED.node_type))
T0 = 1_780_000_000.0
PERIOD = "bench"
COURSES = 50
#: budget ids: a user's is its number + 1, a course's COURSE_ID0 + its number
COURSE_ID0 = 10_000_000


def owner_of(u: int) -> tuple[str, str, int]:
    """(owner kind, owner id, budget id) that user ``u`` charges: every third user is in
    one of the 50 courses (thousands of charges per course budget), the others charge
    their own budget."""
    if u % 3 == 0:
        return "course", f"course{u % COURSES}", COURSE_ID0 + u % COURSES
    return "user", f"u{u}", u + 1


def groups_of(u: int) -> list[str]:
    return [f"course-course{u % COURSES}"] if u % 3 == 0 else []


def setup_budgets(store: PortalStore, owners: int) -> None:
    """One period covering now, a budget for every owner (large: nothing is refused)."""
    now = datetime.now(UTC)
    stamp = now
    rows = []
    for u in range(owners):
        kind, ident, bid = owner_of(u)
        if kind == "user":
            rows.append((bid, kind, ident))
    rows += [(COURSE_ID0 + n, "course", f"course{n}") for n in range(COURSES)]
    with store.begin() as s:
        s.add(
            BudgetPeriod(
                name=PERIOD, start_at=now - timedelta(days=1), end_at=now + timedelta(days=300)
            )
        )
        s.flush()
        s.execute(
            BudgetRow.__table__.insert(),
            [
                {"id": bid, "owner_kind": kind, "owner_id": ident, "period": PERIOD,
                 "unit": "gpu_hours", "amount": 9_000_000.0, "per_student": None,
                 "updated_at": stamp, "updated_by": "bench"}
                for bid, kind, ident in rows
            ],
        )  # fmt: skip


def row_template() -> dict[str, Any]:
    rec = L.open_record(RESOLVED, user="u0", now=T0, source="server:u0/", site="bench")
    rec = L.attach(rec, job_ids=["1"], nodes="mig-a", started_at=T0)
    return to_row(L.close(rec, ended_at=T0 + 1800, reason="stopped"))


def bulk_rows(n: int, owners: int, start_seq: int) -> Iterator[dict[str, Any]]:
    """Closed rows spread over ``owners`` users and 50 courses; numbered from start_seq."""
    base = row_template()
    rnd = random.Random(10)
    for i in range(n):
        u = rnd.randrange(owners)
        row = dict(base)
        kind, ident, _ = owner_of(u)
        row.update(
            id=f"{i:032x}",
            seq=start_seq + i,
            username=f"u{u}",
            owner_type=kind,
            owner=ident,
            source=f"server:u{u}/",
            opened_at=T0 + i,
            started_at=T0 + i,
            ended_at=T0 + i + 1800,
            prev_hash="0" * 64,
            hash=f"{i:064x}",
        )
        yield row


CHARGE_COLS = ["id", "budget_id", "user", "ref", "state", "held", "settled", "created_at",
               "expires_at", "closed_at"]  # fmt: skip


def bulk_charges(n: int, owners: int) -> Iterator[dict[str, Any]]:
    """The settled budget charge of each bulk ledger row (same owners, same order)."""
    rnd = random.Random(10)
    when = datetime.fromtimestamp(T0, UTC)
    for i in range(n):
        u = rnd.randrange(owners)
        yield {
            "id": f"{i:032x}",
            "budget_id": owner_of(u)[2],
            "user": f"u{u}",
            "ref": f"server:u{u}/",
            "state": "settled",
            "held": 1.0,
            "settled": 0.0714,
            "created_at": when,
            "expires_at": when + timedelta(hours=2),
            "closed_at": when + timedelta(hours=1),
        }


def fill(store: PortalStore, n: int, owners: int) -> float:
    t = time.perf_counter()
    cols = [c.name for c in records.columns]
    charges = BudgetCharge.__table__
    if store.engine.dialect.name == "postgresql":
        raw = store.engine.raw_connection()
        try:
            cur = raw.cursor()
            with cur.copy(f"COPY ledger_records ({', '.join(cols)}) FROM STDIN") as copy:  # type: ignore[attr-defined]
                for row in bulk_rows(n, owners, 1):
                    copy.write_row([row[c] for c in cols])
            quoted = ", ".join(f'"{c}"' for c in CHARGE_COLS)
            with cur.copy(f"COPY budget_charges ({quoted}) FROM STDIN") as copy:  # type: ignore[attr-defined]
                for row in bulk_charges(n, owners):
                    copy.write_row([row[c] for c in CHARGE_COLS])
            raw.commit()
            with store.begin() as s:  # the running totals, as migration 0008 backfills them
                rebuild_totals(s)
            # what autovacuum does after a bulk load (a semester's rows were vacuumed many
            # times over): statistics, and the visibility map that index-only scans need
            driver: Any = raw.driver_connection
            driver.autocommit = True  # VACUUM runs outside a transaction
            try:
                with driver.cursor() as vac:
                    vac.execute("VACUUM (ANALYZE) ledger_records")
                    vac.execute("VACUUM (ANALYZE) budget_charges")
                    vac.execute("VACUUM (ANALYZE) budget_totals")
            finally:
                driver.autocommit = False  # back to the pool as SQLAlchemy expects it
        finally:
            raw.close()
    else:
        with store.engine.begin() as conn:
            for table, rows in ((records, bulk_rows(n, owners, 1)),
                                (charges, bulk_charges(n, owners))):  # fmt: skip
                batch: list[dict[str, Any]] = []
                for row in rows:
                    batch.append(row)
                    if len(batch) == 20_000:
                        conn.execute(table.insert(), batch)
                        batch = []
                if batch:
                    conn.execute(table.insert(), batch)
            rebuild_totals(conn)  # the running totals, as migration 0008 backfills them
            conn.exec_driver_sql("ANALYZE")
    with store.engine.begin() as conn:
        from sqlalchemy import text

        conn.execute(text("UPDATE ledger_chain SET seq = :n WHERE id = 1"), {"n": n})
    return time.perf_counter() - t


PHASES: dict[str, list[float]] = {}


def measure(budgets: BudgetStore, ledger: LedgerStore, ops: int, owners: int) -> list[float]:
    """Latency (ms) of each op; each phase's own times go to :data:`PHASES`."""
    rnd = random.Random(1)
    out = []
    PHASES.clear()
    for _ in range(ops):
        u = rnd.randrange(owners)
        kind, ident, _ = owner_of(u)
        ref = f"server:u{u}/"
        t = time.perf_counter()
        d = budgets.admit(f"u{u}", groups_of(u), RATES, RESOLVED.walltime_minutes, WHAT, ref)
        assert d.budget == f"{kind}:{ident}@{PERIOD}", d
        t1 = time.perf_counter()
        rec = L.open_record(
            RESOLVED, user=f"u{u}", now=time.time(), source=ref, owner_type=kind, owner=ident
        )
        ledger.open(rec)
        t2 = time.perf_counter()
        ledger.close(rec.id, reason="stopped")
        t3 = time.perf_counter()
        ledger.balance(kind, ident)
        t4 = time.perf_counter()
        out.append((t4 - t) * 1000)
        for name, dt in (("admit", t1 - t), ("open", t2 - t1), ("close", t3 - t2),
                         ("balance", t4 - t3)):  # fmt: skip
            PHASES.setdefault(name, []).append(dt * 1000)
        # a course budget has thousands of charges, a user's a few hundred
        PHASES.setdefault(f"admit[{kind}]", []).append((t1 - t) * 1000)
    return out


def phases() -> str:
    return ", ".join(
        f"{k} p50 {statistics.median(v):.2f} p99 {pct(v, 99):.2f}" for k, v in PHASES.items()
    )


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


@contextlib.contextmanager
def engine_url(name: str, tmp: Path, durable: bool = False) -> Iterator[str]:
    if name == "sqlite":
        yield f"sqlite:///{tmp / 'bench.sqlite'}"
        return
    from tests.support.postgres import running_postgres

    with running_postgres(durable) as server:
        yield server.new_database()


def bench(name: str, rows: int, ops: int, owners: int, durable: bool = False) -> dict[str, float]:
    from sqlalchemy import text

    with tempfile.TemporaryDirectory() as d, engine_url(name, Path(d), durable) as url:
        store = PortalStore(url)
        try:
            store.upgrade()
            ledger = LedgerStore(store)
            budgets = BudgetStore(store)
            setup_budgets(store, owners)
            measure(budgets, ledger, 20, owners)  # warm-up: connections, statement caches
            empty = measure(budgets, ledger, ops, owners)
            empty_admit = PHASES["admit"]
            with store.engine.begin() as conn:
                conn.execute(records.delete())
                conn.execute(BudgetTotal.__table__.delete())
                conn.execute(BudgetCharge.__table__.delete())
                conn.execute(text("UPDATE ledger_chain SET seq = 0 WHERE id = 1"))
            took = fill(store, rows, owners)
            if name == "postgresql":
                # the bulk fill's checkpoint would otherwise land in the timed admissions:
                # a ledger grows over months, not in the minute before they are measured
                with store.engine.connect() as conn:
                    conn.execute(text("CHECKPOINT"))
            full = measure(budgets, ledger, ops, owners)
            full_admit = PHASES["admit"]
            split = phases()
        finally:
            store.dispose()
    res = {
        "fill_s": took,
        "empty_p50": statistics.median(empty),
        "empty_p99": pct(empty, 99),
        "full_p50": statistics.median(full),
        "full_p99": pct(full, 99),
        "admit_empty_p50": statistics.median(empty_admit),
        "admit_empty_p99": pct(empty_admit, 99),
        "admit_p50": statistics.median(full_admit),
        "admit_p99": pct(full_admit, 99),
    }
    print(
        f"{name:<10} fill {rows:,} rows in {took:5.1f} s | admission: empty p50 "
        f"{res['admit_empty_p50']:6.2f} ms p99 {res['admit_empty_p99']:6.2f} ms | {rows:,} rows "
        f"p50 {res['admit_p50']:6.2f} ms p99 {res['admit_p99']:6.2f} ms | ratio p50 "
        f"{res['admit_p50'] / res['admit_empty_p50']:.2f} p99 "
        f"{res['admit_p99'] / res['admit_empty_p99']:.2f} | goal p99 <= 20 ms: "
        + ("met" if res["admit_p99"] <= 20 else "NOT met"),
        flush=True,
    )
    print(
        f"{'':<10} whole op (admit + open + close + owner totals): empty p50 "
        f"{res['empty_p50']:.2f} ms p99 {res['empty_p99']:.2f} ms | {rows:,} rows p50 "
        f"{res['full_p50']:.2f} ms p99 {res['full_p99']:.2f} ms | ratio p50 "
        f"{res['full_p50'] / res['empty_p50']:.2f} p99 {res['full_p99'] / res['empty_p99']:.2f}",
        flush=True,
    )
    print(f"{'':<10} at {rows:,} rows, by phase (ms): {split}", flush=True)
    if name == "postgresql":
        settings = (
            "PostgreSQL's defaults: fsync, synchronous_commit and full_page_writes on"
            if durable
            else "the test fixture's server: fsync, synchronous_commit and full_page_writes off"
        )
        print(f"{'':<10} ({settings})", flush=True)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--ops", type=int, default=300, help="operations timed per phase")
    ap.add_argument("--owners", type=int, default=5000, help="distinct users in the rows")
    ap.add_argument("--engines", default="sqlite,postgresql")
    ap.add_argument(
        "--durable",
        action="store_true",
        help="run PostgreSQL with its own defaults (fsync, synchronous_commit on), as in "
        "production, instead of the test fixture's no-disk-wait settings",
    )
    args = ap.parse_args()
    print(
        f"admission op (budget admit + ledger open + close + owner totals), {args.ops} ops "
        "per phase"
    )
    for name in args.engines.split(","):
        bench(name, args.rows, args.ops, args.owners, args.durable)
    return 0


if __name__ == "__main__":
    sys.exit(main())
