"""Spawn request → server ready with the ledger on and off: what recording costs a spawn.

Two hubs with the same LocalGPUSpawner configuration, in the same run, on the same machine;
one also installs the ledger's spawner hooks (``hub.ledger_hub.install``: a record opens
before the server starts, gets its devices and start, and closes with its amounts and hash
when it stops). Spawns are interleaved, so drift hits both alike. The goal is a ratio
≤ 1.02. After the runs, every spawn of the ledger hub must have one closed, chained record.

    .venv/bin/python benchmarks/bench_ledger_spawn.py [--runs 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_local_spawn import PORTAL, measure
from tests.support.hub import HubProcess

LEDGER = (
    PORTAL
    + """
c.PortalDatabase.url = "sqlite:///{db}"
from sovereign_portal.hub.ledger_hub import install
install(c)
"""
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    from sovereign_portal.hub.ledger_store import LedgerStore
    from sovereign_portal.hub.store import PortalStore

    results: dict[str, list[float]] = {"off": [], "on": []}
    with tempfile.TemporaryDirectory() as d:
        db = Path(d) / "portal.sqlite"
        hubs = {
            "off": HubProcess(Path(d) / "off", PORTAL.format(home=Path(d) / "offh")),
            "on": HubProcess(Path(d) / "on", LEDGER.format(home=Path(d) / "onh", db=db)),
        }
        try:
            for h in hubs.values():
                h.start()
            for i in range(args.runs):
                order = ("off", "on") if i % 2 == 0 else ("on", "off")
                for k in order:
                    results[k].append(measure(hubs[k], f"u{i}", {"gpus": 1}))
            ledger = LedgerStore(PortalStore(f"sqlite:///{db}"))
            deadline = time.monotonic() + 30
            while len(list(ledger.chained())) < args.runs and time.monotonic() < deadline:
                time.sleep(0.2)
            closed = list(ledger.chained())
            n, broken = ledger.verify()
        finally:
            for h in hubs.values():
                h.close()
        for h in hubs.values():
            h.assert_no_egress()
    off, on = (statistics.median(results[k]) for k in ("off", "on"))
    for k, v in results.items():
        print(
            f"ledger {k:>3}: median {statistics.median(v):.2f} s  [{min(v):.2f}–{max(v):.2f}]"
            f"  n={len(v)}"
        )
    print(
        f"closed records {len(closed)} of {args.runs} spawns, chain "
        f"{'OK' if broken is None else 'BROKEN'} ({n} rows)"
    )
    print(f"ratio ledger on / off (spawn → ready): {on / off:.3f}  (goal ≤ 1.02)")
    return 0 if len(closed) == args.runs and broken is None else 1


if __name__ == "__main__":
    sys.exit(main())
