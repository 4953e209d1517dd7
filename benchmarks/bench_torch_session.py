"""Time to the first all-reduce: a portal torch session against a raw ``srun`` of the
same work (2 nodes × 2 ranks, gloo). Prints medians and the ratio portal / raw.

    python -m benchmarks.bench_torch_session --slurm-dir /tmp/sp-slurm --runs 3
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cloudpickle
from sovereign_portal.extension.client import TorchSession, handle_for

from tests.support.sessions import JupyterServer, PortalServiceThread
from tests.support.slurm_cluster import SITE_FILE, SlurmCluster

TOKEN = "bench-token"  # noqa: S105
cloudpickle.register_pickle_by_value(sys.modules[__name__])
# Runs are interleaved (portal, raw, portal, ...) so load changes hit both alike, with a
# pause before each: Slurm places a job submitted right after another ended ~1-2 s later
# (LAB.md), and slurmctld starts jobs on a 1 s tick, so the pause has a random part.
SETTLE = 2.0


def settle() -> None:
    time.sleep(SETTLE + random.uniform(0, 1))


RAW = """
import os, datetime, torch, torch.distributed as dist
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}",
    rank=int(os.environ["SLURM_PROCID"]), world_size=int(os.environ["SLURM_NTASKS"]),
    timeout=datetime.timedelta(seconds=60))
t = torch.tensor([1.0]); dist.all_reduce(t); assert t.item() == 4.0
dist.destroy_process_group()
"""


def allreduce() -> float:
    import torch
    import torch.distributed as dist

    t = torch.tensor([1.0])
    dist.all_reduce(t)
    return float(t.item())


def portal_once(srv: JupyterServer, phases: list[dict[str, float]]) -> float:
    c = srv.client()
    seen: dict[str, float] = {}

    def mark(info: dict[str, Any]) -> None:
        key = f"{info['state']} {info['workers_up']}/{info['workers_total']}"
        seen.setdefault(key, time.perf_counter() - t0)

    t0 = time.perf_counter()
    info = c.create({"kind": "torch", "partition": "gpu-fr", "gpus": 2, "count": 2})
    seen["created"] = time.perf_counter() - t0
    h = handle_for(c, c.wait(info["id"], 120, on_update=mark))
    seen["attached"] = time.perf_counter() - t0
    assert isinstance(h, TorchSession)
    assert h.run(allreduce) == [4.0] * 4
    dt = time.perf_counter() - t0
    seen["all-reduce done"] = dt
    phases.append(seen)
    h.close()
    return dt


def raw_once(tmp: Path, port: int) -> float:
    script = tmp / "raw.py"
    script.write_text(RAW.format(port=port))
    t0 = time.perf_counter()
    subprocess.run(
        [
            "srun",
            "-p",
            "gpu-fr",
            "-N2",
            "--ntasks-per-node=2",
            "--gres=gpu:h100:2",
            sys.executable,
            str(script),
        ],
        check=True,
        timeout=120,
        capture_output=True,
    )
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--slurm-dir", default=os.environ.get("SOVEREIGN_SLURM_DIR", ""))
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    own = not a.slurm_dir
    cluster = SlurmCluster(Path(a.slurm_dir or tempfile.mkdtemp(prefix="sp-bench-")))
    if own:
        cluster.up()
    os.environ["SLURM_CONF"] = str(cluster.conf)
    svc = PortalServiceThread(str(SITE_FILE), {TOKEN: {"name": "bench", "groups": ["researcher"]}})
    svc.start()
    work = Path(tempfile.mkdtemp(prefix="sp-bench-srv-"))
    srv = JupyterServer(work, svc.url, TOKEN).start()
    portal: list[float] = []
    raw: list[float] = []
    phases: list[dict[str, float]] = []
    try:
        for i in range(a.runs):
            settle()
            portal.append(portal_once(srv, phases))
            settle()
            raw.append(raw_once(work, 29500 + i))
    finally:
        srv.stop()
        svc.stop()
        if own:
            cluster.down()
    p, r = statistics.median(portal), statistics.median(raw)
    print(f"portal request -> first all-reduce: median {p:.2f} s {[round(x, 2) for x in portal]}")
    print(f"raw srun of the same all-reduce:    median {r:.2f} s {[round(x, 2) for x in raw]}")
    print(f"ratio portal/raw: {p / r:.2f}")
    print("portal phases (s from the request, first time each state was seen, median):")
    for key in dict.fromkeys(k for ph in phases for k in ph):
        vals = [ph[key] for ph in phases if key in ph]
        print(f"  {key:<16} {statistics.median(vals):5.2f}  ({len(vals)} of {len(phases)} runs)")


if __name__ == "__main__":
    main()
