"""Scheduler calls per poll interval for the whole portal, counted by slurmctld (``sdiag``).

    .venv/bin/python -m benchmarks.bench_scheduler_calls [--servers 50] [--intervals 5]

A real hub (SlurmGPUSpawner, the portal service as a hub-managed service, the proxy)
starts 1, 10 and ``--servers`` notebook servers as Slurm jobs, one per bench user, and
then a Slurm Dask session in EACH server (through the server's REST API, behind the
proxy: one worker job on a MIG slice). For each count it prints the job-info RPCs
(``REQUEST_JOB_INFO*``, what ``squeue`` sends) per poll interval, counted by slurmctld
itself over ``--intervals`` intervals, first before the new servers' sessions start (the
servers, and the sessions of the smaller counts) and then with every server's session
running, and the ratio to the 1-server case. The goal is one query per interval for the
whole portal whatever the count: the hub's spawner poller (servers) and the portal service
(every session of every user, and the queue state) share one whole-queue squeue per
interval through the queue snapshot (``SlurmGPUSpawner.queue_snapshot_file``), and no
notebook server calls squeue.

It starts its own emulated cluster: seven 8 x H100 nodes (servers, one GPU each) and
eight MIG nodes of 7 x 1g.10gb (sessions) in ``gpu-fr``. On a small machine not every
count may fit in memory: a server that does not come up, or a session that does not get
ready, stops the ladder there, and the bench says how many did.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import tempfile
import time
from pathlib import Path

import requests

from benchmarks.bench_slurm import BENCH_NODES, bench_users, cpu_seconds, rss_mb, start_servers
from tests.support.hub import HubProcess
from tests.support.paths import free_port
from tests.support.sdiag import job_info_rpcs
from tests.support.slurm_cluster import SITE_FILE, TEST_USERS, Node, SlurmCluster

INTERVAL = 2.0  # both pollers' interval in this benchmark, seconds
MIG_NODES = tuple(
    Node(f"mig-{c}", (("h100_1g.10gb", 7),), features=("h100", "mig", "fr")) for c in "abcdefgh"
)
SESSION = {"kind": "dask", "partition": "gpu-fr", "slice": "1g.10gb", "count": 1}


def per_interval(cluster: SlurmCluster, intervals: int) -> float:
    time.sleep(INTERVAL * 1.5)  # spawns and session starts done: the slow interval again
    before = job_info_rpcs(cluster)
    time.sleep(INTERVAL * intervals)
    return (job_info_rpcs(cluster) - before) / intervals


class Sessions:
    """Dask sessions in users' servers, through the proxy with each user's own token."""

    def __init__(self, hub: HubProcess) -> None:
        self.hub = hub
        self.tokens: dict[str, str] = {}
        self.ids: dict[str, str] = {}

    def _url(self, user: str, path: str) -> str:
        return f"http://127.0.0.1:{self.hub.port}/user/{user}/sovereign-portal/api/{path}"

    def _headers(self, user: str) -> dict[str, str]:
        if user not in self.tokens:
            r = self.hub.api("POST", f"/users/{user}/tokens", json={"expires_in": 3600})
            assert r.status_code in (200, 201), r.text
            self.tokens[user] = r.json()["token"]
        return {"Authorization": f"token {self.tokens[user]}"}

    def create(self, user: str, tries: int = 4) -> bool:
        """Start a session (retrying while the hub is too busy to answer); False if it
        never started."""
        for i in range(tries):
            try:
                r = requests.post(
                    self._url(user, "sessions"),
                    json={"request": SESSION},
                    headers=self._headers(user),
                    timeout=120,
                )
            except requests.RequestException as e:
                print(f"  {user}: session request failed ({e}); retrying", flush=True)
            else:
                if r.status_code == 201:
                    self.ids[user] = r.json()["id"]
                    return True
                print(f"  {user}: HTTP {r.status_code} {r.text[:200]}", flush=True)
                if r.status_code < 500:
                    return False
            time.sleep(5 * (i + 1))
        return False

    def state(self, user: str) -> str:
        r = requests.get(
            self._url(user, f"sessions/{self.ids[user]}"), headers=self._headers(user), timeout=30
        )
        return str(r.json()["state"]) if r.status_code == 200 else f"HTTP {r.status_code}"

    def wait_ready(self, users: list[str], timeout: float) -> list[str]:
        """Wait until every session is ready; return the users whose session is not."""
        deadline = time.monotonic() + timeout
        left = list(users)
        while left and time.monotonic() < deadline:
            left = [u for u in left if self.state(u) != "ready"]
            if any(self.state(u) in ("failed", "stopped", "expired") for u in left):
                break
            time.sleep(1.0)
        return left

    def stop_all(self) -> None:
        for user, sid in self.ids.items():
            with contextlib.suppress(requests.RequestException):
                requests.delete(
                    self._url(user, f"sessions/{sid}"), headers=self._headers(user), timeout=30
                )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--servers", type=int, default=50)
    ap.add_argument("--intervals", type=int, default=5)
    a = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="sp-bench-calls-"))
    nodes = (*BENCH_NODES, *MIG_NODES)
    cluster = SlurmCluster(
        base,
        nodes=nodes,
        partitions={"gpu-fr": (tuple(n.name for n in nodes), 480)},
        users=(*TEST_USERS, *bench_users(a.servers)),
    )
    t0 = time.monotonic()
    cluster.up()
    print(
        f"cluster: {len(BENCH_NODES)} x 8 H100 + {len(MIG_NODES)} x 7 MIG slices up in "
        f"{time.monotonic() - t0:.1f}s",
        flush=True,
    )
    d = Path(tempfile.mkdtemp(prefix="sp-bench-calls-hub-"))
    service_port = free_port()
    hub = HubProcess(
        d,
        f"""
from sovereign_portal.hub.service import configure_hub
c.JupyterHub.authenticator_class = "dummy"
c.JupyterHub.spawner_class = "slurm-gpu"
c.SlurmGPUSpawner.site_file = {str(SITE_FILE)!r}
c.SlurmGPUSpawner.server_ip = "127.0.0.1"
c.SlurmGPUSpawner.scheduler_poll_interval = {INTERVAL}
c.Spawner.start_timeout = 600
c.Spawner.http_timeout = 120
svc = configure_hub(
    c,
    {str(SITE_FILE)!r},
    port={service_port},
    default_role="researcher",
    extra_env={{"SLURM_CONF": {str(cluster.conf)!r}}},
)
svc["command"].append("--PortalService.session_poll_interval={INTERVAL}")
""",
        env={"SLURM_CONF": str(cluster.conf)},
        poll_interval=round(INTERVAL),
    )
    try:
        hub.start()
    except BaseException:
        cluster.down()
        raise
    users = bench_users(a.servers)
    sessions = Sessions(hub)
    results: list[tuple[int, int, float, float]] = []
    try:
        running: list[str] = []
        for n in sorted({1, min(10, a.servers), a.servers}):
            new = users[len(running) : n]
            try:
                took = start_servers(hub, new, timeout=900)
            except Exception as e:  # a bench reports how far it got
                print(f"{n} servers did not all come up ({e}); stopping at {len(running)}")
                break
            running = users[:n]
            alone = per_interval(cluster, a.intervals)
            t1 = time.monotonic()
            refused = [u for u in new if not sessions.create(u)]
            stuck = sessions.wait_ready([u for u in new if u not in refused], timeout=900)
            ready = len(sessions.ids) - len(stuck)
            if refused or stuck:
                print(
                    f"{len(refused)} of {n} sessions could not be started and {len(stuck)} "
                    f"did not get ready: measuring with {ready} sessions in {n} servers",
                    flush=True,
                )
            if ready <= (results[-1][1] if results else 0):
                break
            with_sessions = per_interval(cluster, a.intervals)
            results.append((n, ready, alone, with_sessions))
            print(
                f"{n:>2} servers (started in {took:.0f}s), {ready} with a running Slurm Dask "
                f"session (ready in {time.monotonic() - t1:.0f}s): squeue RPCs per "
                f"{INTERVAL:g}s interval: before their sessions {alone:.2f}, with them "
                f"{with_sessions:.2f}",
                flush=True,
            )
        if results:
            s1 = results[0][3]
            print(f"\nscheduler job-info RPCs per interval (sdiag), {a.intervals} intervals each:")
            print(f"{'servers':>8} {'sessions':>9} {'before':>7} {'+sessions':>10} {'ratio':>6}")
            for n, ready, alone, with_s in results:
                ratio = with_s / s1 if s1 else 0
                print(f"{n:>8} {ready:>9} {alone:>7.2f} {with_s:>10.2f} {ratio:>6.2f}")
            print(
                "goal: at most one query per interval for the whole portal (the hub's "
                "spawner poller and the portal service share it), independent of the count"
            )
        assert hub.hub is not None and hub.proxy is not None
        c0 = cpu_seconds(hub.hub.pid)
        time.sleep(10)
        print(
            f"hub RSS {rss_mb(hub.hub.pid):.0f} MB, "
            f"CPU {10 * (cpu_seconds(hub.hub.pid) - c0):.1f}% "
            f"of a core with {len(running)} servers and {len(sessions.ids)} sessions",
            flush=True,
        )
    finally:
        sessions.stop_all()
        try:
            hub.close()
        finally:
            cluster.down()
            shutil.rmtree(cluster.base, ignore_errors=True)
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
