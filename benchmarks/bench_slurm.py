"""Slurm spawner benchmarks, against the real local Slurm cluster and a real hub.

    .venv/bin/python -m benchmarks.bench_slurm [--runs 3] [--servers 10]

Prints three results:

1. spawn: POST -> ready through the hub vs a bare ``sbatch`` of the same
   ``python -m jupyterhub.singleuser`` reaching HTTP (any response), same run, median of
   ``--runs``; the ratio is the portal's overhead.
2. scheduler calls per poll interval with 1, 10 and 50 tracked jobs, counted by the
   spawner's own :data:`CALLS` counter over 5 intervals. The 10 and 50 cases track light
   ``sleep`` jobs (the cluster has 33 GPUs, so 50 notebook servers cannot all run), through
   the same :class:`JobPoller` the hub uses; must be 1 per interval.
3. resident memory (RSS) of the hub and the proxy with ``--servers`` real servers running
   (limited by the cluster's GPUs; the anchor is ~500 MB at 150 users).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import requests
from sovereign_portal.spawners.slurm import scheduler

from tests.support.hub import HubProcess
from tests.support.paths import free_port
from tests.support.slurm_cluster import SITE_FILE, SlurmCluster

USER = "spalice"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def bare_sbatch(cluster: SlurmCluster, hub: HubProcess, python: str) -> float:
    """sbatch the singleuser command directly (token from a 0600 file) -> first HTTP answer."""
    port = free_port()
    token = hub.api("POST", f"/users/{USER}/tokens", json={"expires_in": 600}).json()["token"]
    tok = Path(f"/home/{USER}/.bench-token")
    tok.write_text(token)
    import pwd

    pw = pwd.getpwnam(USER)
    import os

    os.chown(tok, pw.pw_uid, pw.pw_gid)
    tok.chmod(0o600)
    prefix = f"/user/{USER}/bare/"
    script = f"""#!/bin/bash
export JUPYTERHUB_API_TOKEN=$(cat {tok}); rm -f {tok}
export JUPYTERHUB_API_URL=http://127.0.0.1:{hub.hub_port}/hub/api
export JUPYTERHUB_SERVICE_PREFIX={prefix} JUPYTERHUB_USER={USER}
export JUPYTERHUB_CLIENT_ID=jupyterhub-user-{USER}
export JUPYTERHUB_OAUTH_CALLBACK_URL={prefix}oauth_callback
export JUPYTERHUB_SERVICE_URL=http://127.0.0.1:{port}{prefix}
exec {python} -m jupyterhub.singleuser --ip=127.0.0.1 --port={port}
"""
    t0 = time.monotonic()
    job = cluster.run(
        [
            "sbatch",
            "--parsable",
            "-p",
            "gpu-fr",
            "--gres=gpu:h100:1",
            "-o",
            f"/home/{USER}/.bench-bare.log",
            f"--chdir=/home/{USER}",
        ],
        user=USER,
        input=script,
    ).stdout.strip()
    try:
        while time.monotonic() - t0 < 60:
            try:
                requests.get(f"http://127.0.0.1:{port}{prefix}api", timeout=1)
                return time.monotonic() - t0
            except requests.ConnectionError:
                time.sleep(0.02)
        raise TimeoutError("bare job never answered")
    finally:
        cluster.run(["scancel", job], check=False)


def portal_spawn(hub: HubProcess) -> float:
    t0 = time.monotonic()
    hub.spawn(USER, {"partition": "gpu-fr", "gpus": 1}, timeout=60)
    took = time.monotonic() - t0
    hub.stop_server(USER)
    return took


async def calls_per_interval(cluster: SlurmCluster, jobs: list[str], intervals: int) -> float:
    poller = scheduler.JobPoller(interval=0.5, jitter=0.1, env=cluster.env({"PATH": "/usr/bin"}))
    for j in jobs:
        poller.track(j)
    before = scheduler.CALLS["squeue"]
    await asyncio.sleep(0.5 * intervals + 0.2)
    done = scheduler.CALLS["squeue"] - before
    for j in list(poller.tracked):
        poller.untrack(j)
    return done / poller.polls if poller.polls else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--servers", type=int, default=10)
    a = ap.parse_args()
    import os

    given = os.environ.get("SOVEREIGN_SLURM_DIR")
    cluster = SlurmCluster(Path(given or tempfile.mkdtemp(prefix="sp-bench-")))
    if not given:
        cluster.up()
    d = Path(tempfile.mkdtemp(prefix="sp-bench-hub-"))
    hub = HubProcess(
        d,
        f"""
c.JupyterHub.authenticator_class = "dummy"
c.JupyterHub.spawner_class = "slurm-gpu"
c.SlurmGPUSpawner.site_file = {str(SITE_FILE)!r}
c.SlurmGPUSpawner.server_ip = "127.0.0.1"
c.SlurmGPUSpawner.scheduler_poll_interval = 5.0
c.JupyterHub.allow_named_servers = True
c.JupyterHub.named_server_limit_per_user = 100
""",
        env={"SLURM_CONF": str(cluster.conf)},
        poll_interval=5,
    )
    hub.start()
    try:
        hub.ensure_user(USER)
        python = str(Path(__import__("sys").executable))
        portal = [portal_spawn(hub) for _ in range(a.runs)]
        bare = [bare_sbatch(cluster, hub, python) for _ in range(a.runs)]
        mp, mb = statistics.median(portal), statistics.median(bare)
        print(f"spawn POST->ready  median {mp:.2f}s  runs {[round(x, 2) for x in portal]}")
        print(f"bare sbatch->HTTP  median {mb:.2f}s  runs {[round(x, 2) for x in bare]}")
        print(f"ratio portal/bare  {mp / mb:.2f}")

        for n in (1, 10, 50):
            jobs = [
                cluster.run(
                    ["sbatch", "--parsable", "-p", "gpu-fr", "-o", "/dev/null", "--wrap=sleep 120"],
                    user=USER,
                ).stdout.strip()
                for _ in range(n)
            ]
            per = asyncio.run(calls_per_interval(cluster, jobs, intervals=5))
            cluster.run(["scancel", *jobs], check=False)
            print(f"squeue calls per poll interval with {n:>2} jobs: {per:.2f}")

        users = [f"{USER}"]
        names = [f"s{i}" for i in range(a.servers)]
        for name in names:
            r = hub.api(
                "POST", f"/users/{USER}/servers/{name}", json={"partition": "gpu-fr", "gpus": 1}
            )
            assert r.status_code in (201, 202), r.text
        hub.wait_for(
            lambda: all(
                hub.api("GET", f"/users/{USER}").json()["servers"].get(n, {}).get("ready")
                for n in names
            ),
            300,
            "servers ready",
        )
        assert hub.hub is not None and hub.proxy is not None
        h, p = rss_mb(hub.hub.pid), rss_mb(hub.proxy.pid)
        print(f"RSS with {a.servers} servers: hub {h:.0f} MB + proxy {p:.0f} MB = {h + p:.0f} MB")
        del users
    finally:
        hub.close()
        if not given:
            cluster.down()


if __name__ == "__main__":
    main()
