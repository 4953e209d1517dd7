"""Ledger records of Slurm servers: the real hub, the real Slurm cluster, every way a job ends.

A stop, a kill -9 of the server inside its job, a ``scancel`` behind the hub's back, a
node set DOWN, a walltime, and a kill -9 of the hub while a job is cancelled: each ends in a
closed record with the right reason, the job id and node, and GPU-seconds from the time the
job ran (a MIG slice counts its compute share). Each test starts its own server and leaves
it stopped; records are read from the portal database the hub writes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sovereign_portal.hub import ledger as L
from sovereign_portal.hub.ledger_store import LedgerStore
from sovereign_portal.hub.store import PortalStore

from tests.support.hub import HubProcess
from tests.support.paths import VENV_BIN
from tests.support.slurm_cluster import SITE_FILE, SlurmCluster

pytestmark = [pytest.mark.slurm, pytest.mark.slurm_second]

SCHED_POLL = 1.0
CONFIG = """
c.JupyterHub.authenticator_class = "dummy"
c.Authenticator.allow_all = True
c.JupyterHub.spawner_class = "slurm-gpu"
c.SlurmGPUSpawner.site_file = {site!r}
c.SlurmGPUSpawner.server_ip = "127.0.0.1"
c.SlurmGPUSpawner.scheduler_poll_interval = {sched}
c.SlurmGPUSpawner.orphan_grace_seconds = 0
c.SlurmGPUSpawner.tag_key_file = {key!r}
c.SlurmGPUSpawner.job_environment = {{"PATH": {job_path!r}}}
c.Spawner.environment = {{"EGRESS_LOG": {job_egress!r}}}
c.Spawner.start_timeout = 240
c.PortalDatabase.url = "sqlite:///{db}"
from sovereign_portal.hub.ledger_hub import install
install(c)
"""


@pytest.fixture(scope="module")
def hub(
    slurm_cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[HubProcess]:
    d = tmp_path_factory.mktemp("ledger-slurm-hub")
    shared = Path(tempfile.mkdtemp(prefix="sp-ledger-", dir="/tmp"))
    shared.chmod(0o777)
    job_egress = shared / "job-egress.log"
    job_egress.touch(0o666)
    job_egress.chmod(0o666)
    config = CONFIG.format(
        site=str(SITE_FILE),
        sched=SCHED_POLL,
        key=str(d / "tag.key"),
        job_path=f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin",
        job_egress=str(job_egress),
        db=d / "portal.sqlite",
    )
    h = HubProcess(d, config, env={"SLURM_CONF": str(slurm_cluster.conf)}, poll_interval=1)
    h.start()
    try:
        yield h
    finally:
        h.close()
        h.assert_no_egress()
        egress = job_egress.read_text()
        subprocess.run(["rm", "-rf", str(shared)], check=False)
        assert egress == "", egress


@pytest.fixture(scope="module")
def ledger(hub: HubProcess) -> Iterator[LedgerStore]:
    store = PortalStore(f"sqlite:///{hub.dir / 'portal.sqlite'}")
    try:
        yield LedgerStore(store)
    finally:
        store.dispose()


def fresh(hub: HubProcess, user: str) -> None:
    """The user has no server (another test may have left one)."""
    hub.ensure_user(user)
    if hub.api("GET", f"/users/{user}").json().get("servers"):
        hub.stop_server(user)


def gone(hub: HubProcess, user: str) -> bool:
    return not hub.api("GET", f"/users/{user}").json().get("servers")


def job_of(cluster: SlurmCluster, user: str) -> dict[str, str]:
    jobs = [
        j
        for j in cluster.jobs()
        if j["user"] == user and j["name"] == "sovereign-portal" and j["state"] == "RUNNING"
    ]
    assert len(jobs) == 1, jobs
    return jobs[0]


def open_record(ledger: LedgerStore, user: str) -> L.Record:
    (rec,) = [r for r in ledger.list_open() if r.user == user]
    return rec


def closed(hub: HubProcess, ledger: LedgerStore, rec_id: str, timeout: float = 90) -> L.Record:
    def done() -> L.Record | None:
        r = ledger.get(rec_id)
        return r if r is not None and r.closed else None

    rec = hub.wait_for(done, timeout, f"record {rec_id} closed")
    assert isinstance(rec, L.Record)
    return rec


def spawn(hub: HubProcess, ledger: LedgerStore, cluster: SlurmCluster, user: str, **opts: object):
    fresh(hub, user)
    hub.spawn(user, {"partition": "gpu-fr", **opts}, timeout=180)
    job = job_of(cluster, user)
    rec = open_record(ledger, user)
    assert rec.job_ids == (job["id"],) and rec.nodes == job["nodes"]
    assert rec.started_at is not None and rec.country == "FR"
    return job, rec


def check_amounts(rec: L.Record, fraction: float) -> None:
    a = rec.amounts
    assert a is not None and rec.ended_at is not None and rec.started_at is not None
    seconds = rec.ended_at - rec.started_at
    assert seconds > 0
    assert a.gpu_seconds == pytest.approx(fraction * seconds, abs=0.01)
    assert a.eur == pytest.approx(rec.rates.eur_per_hour * seconds / 3600, abs=1e-5)
    assert a.energy_basis == "estimated"


def test_stop_is_stopped(hub: HubProcess, ledger: LedgerStore, slurm_cluster: SlurmCluster) -> None:
    job, rec = spawn(hub, ledger, slurm_cluster, "syalice", gpus=2)
    time.sleep(1)
    hub.stop_server("syalice")
    done = closed(hub, ledger, rec.id)
    assert done.end_reason == "stopped" and done.job_ids == (job["id"],)
    assert done.amounts is not None and done.amounts.gpu_seconds_basis == "measured"
    check_amounts(done, 2)


def test_kill9_of_the_server_is_died(
    hub: HubProcess, ledger: LedgerStore, slurm_cluster: SlurmCluster
) -> None:
    job, rec = spawn(hub, ledger, slurm_cluster, "sybob", slice="3g.40gb")
    # The job's own processes (this cluster's, not another test's with the same user).
    out = slurm_cluster.run(["scontrol", "listpids", job["id"], job["nodes"]]).stdout
    pids = [int(f[0]) for f in (ln.split() for ln in out.splitlines()) if f and f[0].isdigit()]
    server = [p for p in pids if b"singleuser" in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert server, out
    for pid in server:
        os.kill(pid, signal.SIGKILL)
    hub.wait_for(lambda: gone(hub, "sybob"), 90, "sybob's dead server noticed")
    done = closed(hub, ledger, rec.id)
    assert done.end_reason == "died" and done.slice == "3g.40gb"
    check_amounts(done, 3 / 7)


def test_scancel_behind_the_hubs_back_is_scancel(
    hub: HubProcess, ledger: LedgerStore, slurm_cluster: SlurmCluster
) -> None:
    job, rec = spawn(hub, ledger, slurm_cluster, "sycarol", slice="1g.10gb")
    slurm_cluster.run(["scancel", job["id"]])
    done = closed(hub, ledger, rec.id)
    assert done.end_reason == "scancel"
    check_amounts(done, 1 / 7)


def test_node_down_is_node_failure(
    hub: HubProcess, ledger: LedgerStore, slurm_cluster: SlurmCluster
) -> None:
    job, rec = spawn(hub, ledger, slurm_cluster, "sydave", slice="1g.10gb")
    assert job["nodes"] == "mig-a"
    slurm_cluster.run(["scontrol", "update", "NodeName=mig-a", "State=DOWN", "Reason=ledger"])
    try:
        done = closed(hub, ledger, rec.id)
    finally:
        slurm_cluster.run(["scontrol", "update", "NodeName=mig-a", "State=RESUME"], check=False)
    assert done.end_reason == "node_failure" and done.nodes == "mig-a"
    check_amounts(done, 1 / 7)


def test_hub_kill9_then_scancel_then_restart_closes_at_start_up(
    hub: HubProcess, ledger: LedgerStore, slurm_cluster: SlurmCluster
) -> None:
    job, rec = spawn(hub, ledger, slurm_cluster, "sycarol", gpus=1)
    hub.kill()
    try:
        slurm_cluster.run(["scancel", job["id"]])
        slurm_cluster.wait_job_state(job["id"], ["CANCELLED"], timeout=30)
        time.sleep(1)
        assert ledger.get(rec.id).closed is False  # type: ignore[union-attr]
    finally:
        hub.start(timeout=180)
    done = closed(hub, ledger, rec.id)
    assert done.end_reason == "scancel"
    assert done.amounts is not None and done.amounts.gpu_seconds_basis == "estimated"
    assert gone(hub, "sycarol")


def test_hub_kill9_keeps_a_running_jobs_record_open(
    hub: HubProcess, ledger: LedgerStore, slurm_cluster: SlurmCluster
) -> None:
    _job, rec = spawn(hub, ledger, slurm_cluster, "syalice", gpus=1)
    hub.kill()
    hub.start(timeout=180)
    hub.wait_ready("syalice", timeout=120)
    time.sleep(2 * SCHED_POLL)
    assert [r.id for r in ledger.list_open() if r.user == "syalice"] == [rec.id]
    hub.stop_server("syalice")
    assert closed(hub, ledger, rec.id).end_reason == "stopped"


def test_walltime_is_walltime(
    hub: HubProcess, ledger: LedgerStore, slurm_cluster: SlurmCluster
) -> None:
    """A two-minute walltime. The job asks Slurm to send the server SIGTERM a minute before
    its limit (``--signal=B:TERM@60``, which Slurm may send up to a minute earlier still):
    the server shuts down, so its job ends COMPLETED or FAILED, not TIMEOUT. The ledger
    counts it as the walltime all the same."""
    job, rec = spawn(hub, ledger, slurm_cluster, "sybob", gpus=1, walltime_minutes=2)
    done = closed(hub, ledger, rec.id, timeout=120 + 30 + 60)
    assert done.end_reason == "walltime"
    check_amounts(done, 1)
    final = slurm_cluster.run(["squeue", "-h", "-t", "all", "-j", job["id"], "-o", "%T"])
    assert final.stdout.strip() in ("COMPLETED", "FAILED", "TIMEOUT"), final.stdout
    ran = (done.ended_at or 0) - (done.started_at or 0)
    assert 0 < ran <= 120 + 30 + 30, ran


def test_the_chain_holds_and_nothing_is_left_open(hub: HubProcess, ledger: LedgerStore) -> None:
    n, broken = ledger.verify()
    assert broken is None and n == len(list(ledger.chained()))
    # No record stays open for a job that is gone: each open one has a running server.
    for rec in ledger.list_open():
        assert not gone(hub, rec.user), rec
