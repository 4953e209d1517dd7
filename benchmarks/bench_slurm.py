"""Slurm spawner benchmarks, against a real local Slurm cluster and a real hub.

    .venv/bin/python -m benchmarks.bench_slurm [--runs 5] [--servers 50] [--only spawn|scale]

It starts its own emulated cluster, bigger than the test cluster: seven 8 x H100 nodes
(56 GPUs) in partition ``gpu-fr``, so that 50 one-GPU notebook servers run at once, and 50
bench users (real Unix accounts ``spbench01``...). With ``SOVEREIGN_SLURM_DIR`` it uses the
cluster already up there instead (the test cluster has 33 GPUs: fewer servers fit).

Prints:

1. ``spawn``: POST -> ready through the hub vs a bare ``sbatch`` of the same
   ``python -m jupyterhub.singleuser`` reaching HTTP (any response), same run, median of
   ``--runs``; the ratio is the portal's overhead (batchspawner's is 1.44, REFERENCE.md §4).
2. ``scale``: with 1, 10 and ``--servers`` real servers running (one per user), the
   hub's scheduler calls per poll interval, counted by slurmctld itself (``sdiag``:
   REQUEST_JOB_INFO RPCs over 5 intervals; must be 1), then the resident memory (RSS) and
   CPU of the hub and the proxy with all of them running. The anchor is ~500 MB and ~25% of
   a core for hub + proxy at 150 users.
"""

from __future__ import annotations

import argparse
import os
import pwd
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import requests
from sovereign_portal.spawners.local import SOVEREIGN_LAB_ARGS

from tests.support.hub import HubProcess
from tests.support.paths import free_port
from tests.support.sdiag import job_info_rpcs
from tests.support.slurm_cluster import SITE_FILE, TEST_USERS, Node, SlurmCluster

USER = "spalice"
SCHED_INTERVAL = 2.0  # the hub's scheduler_poll_interval in this benchmark
# Pause before each spawn: Slurm places a job submitted right after another ended ~2 s
# later (LAB.md), which would penalise whichever case comes second. slurmctld also starts
# submitted jobs on a 1 s tick of its background thread: a fixed pause would give each case
# a fixed phase against that tick (a systematic 0-1 s bias), so the pause is random.
SETTLE = 2.0


def settle() -> None:
    time.sleep(SETTLE + random.uniform(0, 1))


BENCH_NODES = tuple(Node(f"h100-{c}", (("h100", 8),), features=("h100", "fr")) for c in "abcdefg")


def bench_users(n: int) -> list[str]:
    return [f"spbench{i:02d}" for i in range(1, n + 1)]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bare_sbatch(cluster: SlurmCluster, hub: HubProcess, python: str) -> float:
    """sbatch the singleuser command directly (token from a 0600 file) -> first HTTP answer.

    The same command and server options as a portal server (SOVEREIGN_LAB_ARGS)."""
    port = free_port()
    token = hub.api("POST", f"/users/{USER}/tokens", json={"expires_in": 600}).json()["token"]
    tok = Path(f"/home/{USER}/.bench-token")
    tok.write_text(token)
    pw = pwd.getpwnam(USER)
    os.chown(tok, pw.pw_uid, pw.pw_gid)
    tok.chmod(0o600)
    prefix = f"/user/{USER}/bare/"
    # --export=NONE and the environment a portal job gets (not the bench's own), including
    # the egress guard on PYTHONPATH (an audit hook: it slows a server's imports).
    guard = hub.env()
    script = f"""#!/bin/bash
export HOME=/home/{USER} USER={USER} LOGNAME={USER} SHELL=/bin/bash
export PATH={Path(python).parent}:/usr/local/bin:/usr/bin:/bin SLURM_CONF={cluster.conf}
export PYTHONPATH={guard["PYTHONPATH"]} EGRESS_LOG={guard["EGRESS_LOG"]}
export JUPYTERHUB_API_TOKEN=$(cat {tok}); rm -f {tok}
export JUPYTERHUB_API_URL=http://127.0.0.1:{hub.hub_port}/hub/api
export JUPYTERHUB_SERVICE_PREFIX={prefix} JUPYTERHUB_USER={USER}
export JUPYTERHUB_CLIENT_ID=jupyterhub-user-{USER}
export JUPYTERHUB_OAUTH_CALLBACK_URL={prefix}oauth_callback
export JUPYTERHUB_SERVICE_URL=http://127.0.0.1:{port}{prefix}
exec {python} -m jupyterhub.singleuser {" ".join(SOVEREIGN_LAB_ARGS)} --ip=127.0.0.1 --port={port}
"""
    t0 = time.monotonic()
    job = cluster.run(
        [
            "sbatch",
            "--parsable",
            "-p",
            "gpu-fr",
            "--gres=gpu:h100:1",
            "--export=NONE",
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
        cluster.wait_job_state(job, ["CANCELLED", "COMPLETED", "FAILED"], timeout=30)


def ready(hub: HubProcess, user: str) -> bool:
    s = hub.api("GET", f"/users/{user}").json().get("servers", {}).get("")
    return bool(s and s.get("ready"))


#: Hub log lines of one spawn, in order, and the phase each one ends.
PHASES = (
    ("Submitting", "hub: POST to start()"),
    ("Submitted as Slurm job", "sbatch"),
    ("Starting on node", "queued, until the poll sees it running"),
    ("Server listening on", "port reported"),
    ("accepting connections", "server import until it listens"),
    (f"User {USER} took", "hub HTTP check"),
    (f"Adding user {USER} to proxy", "proxy route"),
)
_STAMP = re.compile(r"^\[\w (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+)")


def spawn_phases(hub: HubProcess, since: int) -> dict[str, float]:
    """Seconds spent in each phase of the last spawn, from the hub log's timestamps."""
    lines = hub.log_text().splitlines()[since:]
    stamps: list[float] = []
    for needle, _ in PHASES:
        line = next((x for x in lines if needle in x), "")
        m = _STAMP.match(line)
        if not m:
            return {}
        stamps.append(datetime.fromisoformat(m.group(1)).timestamp())
    return {PHASES[i][1]: stamps[i] - stamps[i - 1] for i in range(1, len(PHASES))}


def portal_spawn(hub: HubProcess, phases: list[dict[str, float]]) -> float:
    """POST -> ready, polled as finely as the bare job's HTTP check."""
    since = len(hub.log_text().splitlines())
    t0 = time.monotonic()
    r = hub.api("POST", f"/users/{USER}/server", json={"partition": "gpu-fr", "gpus": 1})
    assert r.status_code in (201, 202), r.text
    hub.wait_for(lambda: ready(hub, USER), 60, "portal server ready", interval=0.02)
    took = time.monotonic() - t0
    phases.append(spawn_phases(hub, since))
    hub.stop_server(USER)
    return took


def spawn_case(cluster: SlurmCluster, hub: HubProcess, runs: int) -> None:
    hub.ensure_user(USER)
    portal: list[float] = []
    bare: list[float] = []
    phases: list[dict[str, float]] = []
    for _ in range(runs):  # interleaved, so load changes hit both alike
        settle()
        portal.append(portal_spawn(hub, phases))
        settle()
        bare.append(bare_sbatch(cluster, hub, sys.executable))
    mp, mb = statistics.median(portal), statistics.median(bare)
    print(f"spawn POST->ready  median {mp:.2f}s  runs {[round(x, 2) for x in portal]}")
    print(f"bare sbatch->HTTP  median {mb:.2f}s  runs {[round(x, 2) for x in bare]}")
    print(f"ratio portal/bare  {mp / mb:.2f}  (batchspawner: 1.44)", flush=True)
    if all(phases):
        print("where a portal spawn's time goes (median s, from the hub log):")
        for _, name in PHASES[1:]:
            values = [p[name] for p in phases]
            print(f"  {name:<40} {statistics.median(values):.2f}  {[round(v, 2) for v in values]}")


def start_servers(hub: HubProcess, users: list[str], timeout: float) -> float:
    t0 = time.monotonic()
    for u in users:
        hub.ensure_user(u)
        r = hub.api("POST", f"/users/{u}/server", json={"partition": "gpu-fr", "gpus": 1})
        assert r.status_code in (201, 202), r.text
    hub.wait_for(lambda: all(ready(hub, u) for u in users), timeout, "servers ready", 1.0)
    return time.monotonic() - t0


def scale_case(cluster: SlurmCluster, hub: HubProcess, servers: int) -> None:
    users = bench_users(servers)
    running: list[str] = []
    for n in sorted({1, min(10, servers), servers}):
        started = n - len(running)
        took = start_servers(hub, users[len(running) : n], timeout=600)
        running = users[:n]
        time.sleep(SCHED_INTERVAL * 1.5)  # spawns done: back to the slow interval
        intervals = 5
        before = job_info_rpcs(cluster)
        time.sleep(SCHED_INTERVAL * intervals)
        calls = job_info_rpcs(cluster) - before
        print(
            f"{n:>2} servers running ({started} started in {took:.0f}s): "
            f"{calls} squeue RPCs in {intervals} intervals "
            f"= {calls / intervals:.2f} per interval",
            flush=True,
        )
    assert hub.hub is not None and hub.proxy is not None
    window = 20.0
    c0 = cpu_seconds(hub.hub.pid) + cpu_seconds(hub.proxy.pid)
    time.sleep(window)
    cpu = (cpu_seconds(hub.hub.pid) + cpu_seconds(hub.proxy.pid) - c0) / window
    h, p = rss_mb(hub.hub.pid), rss_mb(hub.proxy.pid)
    print(
        f"RSS with {len(running)} servers running: hub {h:.0f} MB + proxy {p:.0f} MB "
        f"= {h + p:.0f} MB; CPU {100 * cpu:.1f}% of one core (anchor: ~500 MB, ~25% "
        "at 150 users)",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--servers", type=int, default=50)
    ap.add_argument("--only", choices=["spawn", "scale"])
    a = ap.parse_args()
    given = os.environ.get("SOVEREIGN_SLURM_DIR")
    if given:
        cluster = SlurmCluster(Path(given))
    else:
        base = Path(tempfile.mkdtemp(prefix="sp-bench-"))
        nodes = [n.name for n in BENCH_NODES]
        cluster = SlurmCluster(
            base,
            nodes=BENCH_NODES,
            partitions={"gpu-fr": (tuple(nodes), 480)},
            users=(*TEST_USERS, *bench_users(a.servers)),
        )
        t0 = time.monotonic()
        cluster.up()
        print(f"cluster: {len(BENCH_NODES)} nodes x 8 H100 up in {time.monotonic() - t0:.1f}s")
    d = Path(tempfile.mkdtemp(prefix="sp-bench-hub-"))
    hub = HubProcess(
        d,
        f"""
c.JupyterHub.authenticator_class = "dummy"
c.JupyterHub.spawner_class = "slurm-gpu"
c.SlurmGPUSpawner.site_file = {str(SITE_FILE)!r}
c.SlurmGPUSpawner.server_ip = "127.0.0.1"
c.SlurmGPUSpawner.scheduler_poll_interval = {SCHED_INTERVAL}
c.Spawner.start_timeout = 600
c.Spawner.http_timeout = 120
""",
        env={"SLURM_CONF": str(cluster.conf)},
        poll_interval=round(SCHED_INTERVAL),
    )
    hub.start()
    try:
        if a.only in (None, "spawn"):
            spawn_case(cluster, hub, a.runs)
        if a.only in (None, "scale"):
            scale_case(cluster, hub, a.servers)
    finally:
        try:
            hub.close()
        finally:
            if not given:
                cluster.down()
                shutil.rmtree(cluster.base, ignore_errors=True)
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
