"""Request → N Dask workers connected, through the portal, against raw dask-jobqueue.

Both run against the same Slurm cluster (the local test cluster by default) with the
same GRES. Prints medians and the ratio portal / raw.

    python -m benchmarks.bench_dask_session --slurm-dir /tmp/sp-slurm --runs 3 --workers 4
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.support.sessions import JupyterServer, PortalServiceThread
from tests.support.slurm_cluster import SITE_FILE, SlurmCluster

TOKEN = "bench-token"  # noqa: S105
# Runs are interleaved (portal, raw, portal, ...) so load changes hit both alike, with a
# pause before each: Slurm places a job submitted right after another ended ~1-2 s later
# (LAB.md), and slurmctld starts jobs on a 1 s tick, so the pause has a random part.
SETTLE = 2.0


def settle() -> None:
    time.sleep(SETTLE + random.uniform(0, 1))


def portal_once(srv: JupyterServer, workers: int, phases: list[dict[str, float]]) -> float:
    c = srv.client()
    seen: dict[str, float] = {}

    def mark(info: dict[str, Any]) -> None:
        key = f"{info['state']} {info['workers_up']}/{info['workers_total']}"
        seen.setdefault(key, time.perf_counter() - t0)

    t0 = time.perf_counter()
    info = c.create({"kind": "dask", "partition": "gpu-fr", "gpus": 1, "count": workers})
    seen["created"] = time.perf_counter() - t0
    c.wait(info["id"], 120, on_update=mark)
    dt = time.perf_counter() - t0
    seen["ready (client)"] = dt
    phases.append(seen)
    c.stop(info["id"])
    return dt


async def raw_once(workers: int, tmp: str) -> float:
    from dask_jobqueue import SLURMCluster
    from distributed import Client

    t0 = time.perf_counter()
    async with SLURMCluster(
        queue="gpu-fr",
        cores=1,
        processes=1,
        memory="1GiB",
        walltime="00:10:00",
        job_extra_directives=["--gres=gpu:h100:1"],
        job_directives_skip=["--mem"],
        interface="lo",
        log_directory=tmp,
        asynchronous=True,
        scheduler_options={"dashboard_address": "127.0.0.1:0"},
    ) as cluster:
        cluster.scale(jobs=workers)
        async with Client(cluster, asynchronous=True) as client:
            await client.wait_for_workers(workers)
            return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--slurm-dir", default=os.environ.get("SOVEREIGN_SLURM_DIR", ""))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workers", type=int, default=4)
    a = ap.parse_args()
    own = not a.slurm_dir
    cluster = SlurmCluster(Path(a.slurm_dir or tempfile.mkdtemp(prefix="sp-bench-")))
    if own:
        cluster.up()
    os.environ["SLURM_CONF"] = str(cluster.conf)
    svc = PortalServiceThread(str(SITE_FILE), {TOKEN: {"name": "bench", "groups": ["researcher"]}})
    svc.start()
    work = Path(tempfile.mkdtemp(prefix="sp-bench-srv-"))
    srv = JupyterServer(work, svc.url, TOKEN, memory_per_worker="1GiB").start()
    portal: list[float] = []
    raw: list[float] = []
    phases: list[dict[str, float]] = []
    try:
        for _ in range(a.runs):
            settle()
            portal.append(portal_once(srv, a.workers, phases))
            settle()
            raw.append(asyncio.run(raw_once(a.workers, str(work))))
    finally:
        srv.stop()
        svc.stop()
        if own:
            cluster.down()
    p, r = statistics.median(portal), statistics.median(raw)
    print(
        f"portal request -> {a.workers} workers: median {p:.2f} s {[round(x, 2) for x in portal]}"
    )
    print(f"raw dask-jobqueue scale+wait:      median {r:.2f} s {[round(x, 2) for x in raw]}")
    print(f"ratio portal/raw: {p / r:.2f}")
    print("portal phases (s from the request, first time each state was seen, median):")
    for key in dict.fromkeys(k for ph in phases for k in ph):
        vals = [ph[key] for ph in phases if key in ph]
        print(f"  {key:<16} {statistics.median(vals):5.2f}  ({len(vals)} of {len(phases)} runs)")


if __name__ == "__main__":
    main()
