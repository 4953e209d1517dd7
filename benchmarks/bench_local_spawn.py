"""Spawn request → server ready: LocalGPUSpawner against JupyterHub's SimpleLocalProcessSpawner.

Both run in the same run, on the same machine, behind the same kind of hub and proxy.
The baseline is JupyterHub's own SimpleLocalProcessSpawner (no devices, no validation);
the ratio shows what the portal's validation, allocation and re-adoption state cost.

    .venv/bin/python benchmarks/bench_local_spawn.py [--runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.hub import HubProcess

COMMON = """
c.JupyterHub.authenticator_class = "dummy"
c.Authenticator.allow_all = True
c.Spawner.default_url = "/lab"
"""
PORTAL = (
    COMMON
    + """
c.JupyterHub.spawner_class = "local-gpu"
c.LocalGPUSpawner.inventory_source = "declared"
c.LocalGPUSpawner.home_dir_template = "{home}/{{username}}"
"""
)
BASELINE = (
    COMMON
    + """
c.JupyterHub.spawner_class = "simple"
c.SimpleLocalProcessSpawner.home_dir_template = "{home}/{{username}}"
c.Spawner.args = ["--allow-root"]
"""
)


def measure(hub: HubProcess, user: str, options: dict[str, object]) -> float:
    hub.ensure_user(user)
    t0 = time.perf_counter()
    r = hub.api("POST", f"/users/{user}/server", json=options)
    if r.status_code not in (201, 202):
        raise RuntimeError(f"{r.status_code} {r.text}")
    hub.wait_ready(user, timeout=120)
    # "Ready" means the server answers through the proxy.
    hub.wait_for(lambda: hub.server_get(user, "api/status").status_code == 200, 60, "HTTP 200")
    dt = time.perf_counter() - t0
    hub.stop_server(user)
    return dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    results: dict[str, list[float]] = {"baseline": [], "portal": []}
    with tempfile.TemporaryDirectory() as d:
        hubs = {
            "baseline": HubProcess(Path(d) / "b", BASELINE.format(home=Path(d) / "bh")),
            "portal": HubProcess(Path(d) / "p", PORTAL.format(home=Path(d) / "ph")),
        }
        try:
            for h in hubs.values():
                h.start()
            for i in range(args.runs):  # interleave, so drift hits both alike
                results["baseline"].append(measure(hubs["baseline"], f"u{i}", {}))
                results["portal"].append(measure(hubs["portal"], f"u{i}", {"gpus": 2}))
        finally:
            for h in hubs.values():
                h.close()
        for h in hubs.values():
            h.assert_no_egress()
    b, p = (statistics.median(results[k]) for k in ("baseline", "portal"))
    for k, v in results.items():
        med = statistics.median(v)
        print(f"{k:>9}: median {med:.2f} s  [{min(v):.2f}–{max(v):.2f}]  n={len(v)}")
    print(f"ratio LocalGPUSpawner / SimpleLocalProcessSpawner (spawn → ready): {p / b:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
