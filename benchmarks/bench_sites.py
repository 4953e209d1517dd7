"""Two Slurm sites: slurmrestd against the CLI, and scheduler calls per poll interval.

    .venv/bin/python -m benchmarks.bench_sites [--spawns 10] [--servers 50] [--intervals 5]

It starts two clusters of its own (tests/support/slurm_cluster.py): ``paris`` (munge,
reached by its CLI) and ``julich`` (JWT, behind a real slurmrestd), four 8 x H100 nodes
each, and measures, in one run:

1. **spawn through slurmrestd against the CLI on the same cluster** (julich): a job of one
   GPU submitted as a test user, from the submit call until the scheduler client reports it
   RUNNING (polling its own query every 20 ms), alternating REST and CLI ``--spawns`` times
   each; the median of each, and the ratio REST / CLI (goal <= 1.05). This is the
   scheduler's share of a notebook spawn: the part the transport changes.
2. **scheduler calls per poll interval with 2 sites and ``--servers`` servers**: that many
   running one-GPU jobs (half on each site) tracked by the per-site pollers of two
   processes' worth of pollers (the hub's spawners and the portal service) sharing each
   site's queue snapshot, as ``spawners/slurm/sites.py`` sets them up; the job-info RPCs
   (``REQUEST_JOB_INFO*``) per interval counted by each slurmctld's own ``sdiag`` (goal 1
   per site). The servers here are sleep jobs, not notebook servers: the poll does not see
   the difference.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from sovereign_portal.spawners.site import load_site
from sovereign_portal.spawners.slurm.client import SlurmCLI, slurm_env
from sovereign_portal.spawners.slurm.rest import SlurmREST
from sovereign_portal.spawners.slurm.scheduler import JobPoller
from sovereign_portal.spawners.slurm.sites import site_clients
from sovereign_portal.spawners.slurm.snapshot import QueueSnapshot

from tests.support.sdiag import job_info_rpcs
from tests.support.slurm_cluster import TEST_USERS, Node, SlurmCluster, write_site_file

INTERVAL = 2.0
SCRIPT = (
    "#!/bin/bash\n#SBATCH --job-name=bench-sites\n#SBATCH --partition=gpu\n"
    "#SBATCH --gres=gpu:h100:1\n#SBATCH --time=30\n#SBATCH --output=/dev/null\nsleep 1200\n"
)


def _cluster(base: Path, name: str, prefix: str, jwt: bool) -> SlurmCluster:
    nodes = tuple(Node(f"{prefix}-h100-{c}", (("h100", 8),)) for c in "abcd")
    return SlurmCluster(
        base,
        nodes=nodes,
        partitions={"gpu": (tuple(n.name for n in nodes), 480)},
        cluster_name=name,
        jwt=jwt,
    )


async def _until_running(client: object, job_id: str) -> None:
    q = client.query  # type: ignore[attr-defined]
    while True:
        info = (await q([job_id])).get(job_id)
        if info is not None and info.state == "RUNNING":
            return
        if info is not None and info.ended:
            raise RuntimeError(f"job {job_id} ended: {info}")
        await asyncio.sleep(0.02)


async def _until_ended(client: SlurmCLI, job_id: str) -> None:
    for _ in range(400):
        info = (await client.query([job_id])).get(job_id)
        if info is None or info.ended:
            return
        await asyncio.sleep(0.05)


async def spawn_ratio(julich: SlurmCluster, token: Path, n: int) -> tuple[float, float]:
    rest = SlurmREST(julich.rest_url, token)
    env = slurm_env()
    env["SLURM_CONF"] = str(julich.conf)
    cli = SlurmCLI(env=env, submit_prefix=["runuser", "-u", "{unix_user}", "--"])
    times: dict[str, list[float]] = {"rest": [], "cli": []}
    for i in range(2 * n + 2):
        name, client = ("rest", rest) if i % 2 == 0 else ("cli", cli)
        t0 = time.perf_counter()
        job_id = await client.submit(SCRIPT, user=TEST_USERS[0], cwd="/tmp")
        await _until_running(client, job_id)
        dt = time.perf_counter() - t0
        await client.cancel([job_id], user=TEST_USERS[0])
        if i >= 2:  # the first of each warms up (JWT plugin, runuser, page cache)
            times[name].append(dt)
        await _until_ended(cli, job_id)
        await asyncio.sleep(1.2)  # past batch_sched_delay effects of the ended job
    return statistics.median(times["rest"]), statistics.median(times["cli"])


async def calls_per_interval(
    site_file: Path, clusters: dict[str, SlurmCluster], servers: int, intervals: int, d: Path
) -> dict[str, float]:
    site = load_site(site_file)
    clients = site_clients(site, ["runuser", "-u", "{unix_user}", "--"])
    jobs: dict[str, list[str]] = {"paris": [], "julich": []}
    for i in range(servers):
        name = "paris" if i % 2 == 0 else "julich"
        user = TEST_USERS[i % len(TEST_USERS)]
        jobs[name].append(await clients[name].submit(SCRIPT, user=user, cwd="/tmp"))
    # Two processes' pollers per site (the hub's and the portal service's), one snapshot.
    pollers = []
    for name, client in clients.items():
        for _proc in ("hub", "service"):
            p = JobPoller(
                INTERVAL,
                0.1,
                0.5,
                client=client,
                whole_queue=True,
                snapshot=QueueSnapshot(d / f"queue.json.{name}"),
            )
            for j in jobs[name]:
                p.track(j)
            pollers.append(p)
    for name, ids in jobs.items():
        for j in ids:
            clusters[name].wait_job_state(j, ["RUNNING"], timeout=60)
    await asyncio.sleep(INTERVAL * 1.5)
    before = {n: job_info_rpcs(c) for n, c in clusters.items()}
    await asyncio.sleep(INTERVAL * intervals)
    out = {n: (job_info_rpcs(c) - before[n]) / intervals for n, c in clusters.items()}
    for p in pollers:
        for j in list(p.tracked):
            p.untrack(j)
    for name, ids in jobs.items():
        await clients[name].cancel(ids)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spawns", type=int, default=10)
    ap.add_argument("--servers", type=int, default=50)
    ap.add_argument("--intervals", type=int, default=5)
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="sp-bench-sites-", dir="/tmp"))
    root.chmod(0o755)
    paris = _cluster(root / "paris", "paris", "fr", jwt=False)
    julich = _cluster(root / "julich", "julich", "de", jwt=True)
    started: list[SlurmCluster] = []
    try:
        for c in (paris, julich):
            c.up()
            started.append(c)
        julich.start_rest()
        token = julich.write_token(root / "julich.jwt", user="root")
        site_file = write_site_file(root / "two-sites.toml", paris, julich, token)
        rest_s, cli_s = asyncio.run(spawn_ratio(julich, token, a.spawns))
        print(f"spawn (submit -> RUNNING) on julich, median of {a.spawns} each:")
        print(f"  slurmrestd {rest_s:.3f} s   CLI {cli_s:.3f} s   ratio {rest_s / cli_s:.3f}")
        per = asyncio.run(
            calls_per_interval(
                site_file, {"paris": paris, "julich": julich}, a.servers, a.intervals, root
            )
        )
        print(
            f"scheduler job-info RPCs per {INTERVAL:.0f} s interval (sdiag), {a.servers} "
            f"servers on 2 sites, 2 pollers per site, {a.intervals} intervals:"
        )
        for name, n in per.items():
            print(f"  {name}: {n:.2f}")
    finally:
        for c in reversed(started):
            c.down()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
