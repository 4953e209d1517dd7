"""Admission-style ledger latency with 1 M rows, on SQLite and on a real PostgreSQL server.

One operation is what admitting and ending a session costs the ledger: open a record,
close it (chained under the head-row lock) and read the owner's balance (the sum an
admission checks). It is timed on an empty ledger (the baseline, same run, same
machine), then again once the ledger holds ``--rows`` closed rows of ``--owners``
owners, written in bulk (``executemany`` on SQLite, ``COPY`` on PostgreSQL). The goal of
issue 10 is p99 ≤ 20 ms at 1 M rows.

    .venv/bin/python benchmarks/bench_ledger.py [--rows 1000000] [--ops 300]
        [--engines sqlite,postgresql]

PostgreSQL is a throwaway server (tests/support/postgres.py; needs root for the
``postgres`` account, as in the tests).
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

from sovereign_portal.hub import ledger as L
from sovereign_portal.hub.ledger_store import LedgerStore, records, to_row
from sovereign_portal.hub.store import PortalStore
from sovereign_portal.spawners.request import parse_request, resolve
from sovereign_portal.spawners.site import load_site

from tests.support.slurm_cluster import SITE_FILE

SITE = load_site(SITE_FILE)
RESOLVED = resolve(SITE, parse_request({"kind": "notebook", "slice": "1g.10gb"}))
T0 = 1_780_000_000.0


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
        row.update(
            id=f"{i:032x}",
            seq=start_seq + i,
            username=f"u{u}",
            owner_type="course" if u % 3 == 0 else "user",
            owner=f"course{u % 50}" if u % 3 == 0 else f"u{u}",
            source=f"server:u{u}/",
            opened_at=T0 + i,
            started_at=T0 + i,
            ended_at=T0 + i + 1800,
            prev_hash="0" * 64,
            hash=f"{i:064x}",
        )
        yield row


def fill(store: PortalStore, n: int, owners: int) -> float:
    t = time.perf_counter()
    cols = [c.name for c in records.columns]
    if store.engine.dialect.name == "postgresql":
        raw = store.engine.raw_connection()
        try:
            cur = raw.cursor()
            with cur.copy(f"COPY ledger_records ({', '.join(cols)}) FROM STDIN") as copy:  # type: ignore[attr-defined]
                for row in bulk_rows(n, owners, 1):
                    copy.write_row([row[c] for c in cols])
            cur.execute("ANALYZE ledger_records")
            raw.commit()
        finally:
            raw.close()
    else:
        batch: list[dict[str, Any]] = []
        with store.engine.begin() as conn:
            for row in bulk_rows(n, owners, 1):
                batch.append(row)
                if len(batch) == 20_000:
                    conn.execute(records.insert(), batch)
                    batch = []
            if batch:
                conn.execute(records.insert(), batch)
    with store.engine.begin() as conn:
        from sqlalchemy import text

        conn.execute(text("UPDATE ledger_chain SET seq = :n WHERE id = 1"), {"n": n})
    return time.perf_counter() - t


PHASES: dict[str, list[float]] = {}


def measure(ledger: LedgerStore, ops: int, owners: int) -> list[float]:
    """Latency (ms) of each op; each phase's own times go to :data:`PHASES`."""
    rnd = random.Random(1)
    out = []
    PHASES.clear()
    for _ in range(ops):
        u = rnd.randrange(owners)
        t = time.perf_counter()
        rec = L.open_record(RESOLVED, user=f"u{u}", now=time.time(), source=f"server:u{u}/")
        ledger.open(rec)
        t1 = time.perf_counter()
        ledger.close(rec.id, reason="stopped")
        t2 = time.perf_counter()
        ledger.balance("user", f"u{u}")
        t3 = time.perf_counter()
        out.append((t3 - t) * 1000)
        for name, d in (("open", t1 - t), ("close", t2 - t1), ("balance", t3 - t2)):
            PHASES.setdefault(name, []).append(d * 1000)
    return out


def phases() -> str:
    return ", ".join(
        f"{k} p50 {statistics.median(v):.2f} p99 {pct(v, 99):.2f}" for k, v in PHASES.items()
    )


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


@contextlib.contextmanager
def engine_url(name: str, tmp: Path) -> Iterator[str]:
    if name == "sqlite":
        yield f"sqlite:///{tmp / 'bench.sqlite'}"
        return
    from tests.support.postgres import running_postgres

    with running_postgres() as server:
        yield server.new_database()


def bench(name: str, rows: int, ops: int, owners: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as d, engine_url(name, Path(d)) as url:
        store = PortalStore(url)
        try:
            store.upgrade()
            ledger = LedgerStore(store)
            measure(ledger, 20, owners)  # warm-up: connections, statement caches
            empty = measure(ledger, ops, owners)
            with store.engine.begin() as conn:
                conn.execute(records.delete())
                from sqlalchemy import text

                conn.execute(text("UPDATE ledger_chain SET seq = 0 WHERE id = 1"))
            took = fill(store, rows, owners)
            full = measure(ledger, ops, owners)
            split = phases()
        finally:
            store.dispose()
    res = {
        "fill_s": took,
        "empty_p50": statistics.median(empty),
        "empty_p99": pct(empty, 99),
        "full_p50": statistics.median(full),
        "full_p99": pct(full, 99),
    }
    print(
        f"{name:<10} fill {rows:,} rows in {took:5.1f} s | empty p50 {res['empty_p50']:6.2f} ms "
        f"p99 {res['empty_p99']:6.2f} ms | {rows:,} rows p50 {res['full_p50']:6.2f} ms "
        f"p99 {res['full_p99']:6.2f} ms | ratio p50 {res['full_p50'] / res['empty_p50']:.2f} "
        f"p99 {res['full_p99'] / res['empty_p99']:.2f} | goal p99 <= 20 ms: "
        + ("met" if res["full_p99"] <= 20 else "NOT met"),
        flush=True,
    )
    print(f"{'':<10} at {rows:,} rows, by phase (ms): {split}", flush=True)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--ops", type=int, default=300, help="operations timed per phase")
    ap.add_argument("--owners", type=int, default=5000, help="distinct users in the rows")
    ap.add_argument("--engines", default="sqlite,postgresql")
    args = ap.parse_args()
    print(f"ledger admission-style op (open + close + balance), {args.ops} ops per phase")
    for name in args.engines.split(","):
        bench(name, args.rows, args.ops, args.owners)
    return 0


if __name__ == "__main__":
    sys.exit(main())
