"""The GPU-aware culler on the real Slurm cluster: a real hub, the Slurm spawner (servers
are Slurm jobs on the emulated GPU nodes), the real portal service and the culler as hub
services, the ledger on, and every sampler (the server's, and each Dask worker's inside
its own Slurm job) reading a scripted device source that the test writes.

Time is scaled: 12 s of idleness is the limit, the warning comes 6 s before, samplers
report every 0.5 s and the culler checks every second.

- an idle server gets the idle notice in its JupyterLab API, then is stopped after the
  grace, and its closed ledger record says ``reclaimed``;
- a server whose GPU is busy (a training loop: scripted 90 %) while its kernels are idle
  is never stopped;
- a Dask compute session whose workers' GPUs are idle is warned, then reclaimed: its
  Slurm job is cancelled, its grant's record closes ``reclaimed``, the server that
  started it keeps running, and the session says why it stopped.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from sovereign_portal.hub import ledger as L
from sovereign_portal.hub.ledger_store import LedgerStore
from sovereign_portal.hub.store import PortalStore

from tests.support.hub import HubProcess
from tests.support.paths import VENV_BIN, free_port
from tests.support.slurm_cluster import SITE_FILE, SlurmCluster

pytestmark = [pytest.mark.slurm, pytest.mark.slurm_second, pytest.mark.timeout(420)]

IDLE_S, WARN_S = 12, 6

CONFIG = """
c.JupyterHub.authenticator_class = "dummy"
c.Authenticator.allow_all = True
c.JupyterHub.spawner_class = "slurm-gpu"
c.SlurmGPUSpawner.site_file = {site!r}
c.SlurmGPUSpawner.server_ip = "127.0.0.1"
c.SlurmGPUSpawner.scheduler_poll_interval = 1
c.SlurmGPUSpawner.orphan_grace_seconds = 0
c.SlurmGPUSpawner.tag_key_file = {key!r}
c.SlurmGPUSpawner.job_environment = {{"PATH": {job_path!r}}}
c.Spawner.environment = {{
    "EGRESS_LOG": {job_egress!r},
    "SOVEREIGN_PORTAL_DEVICE_SCRIPT": "{scripts}/{{user}}.json",
    "SOVEREIGN_PORTAL_SESSION_DEVICE_SCRIPT": "{scripts}/{{user}}-session.json",
}}
c.Spawner.args = ["--PortalExtension.sample_interval=0.2",
    "--PortalExtension.report_interval=0.5", "--PortalExtension.poll_interval=0.5",
    "--PortalExtension.memory_per_worker=1GiB"]
c.Spawner.start_timeout = 240
c.PortalDatabase.url = "sqlite:///{db}"
from sovereign_portal.hub.ledger_hub import install
install(c)
from sovereign_portal.hub.service import configure_hub
svc = configure_hub(c, {site!r}, port={service_port}, default_role="researcher",
    extra_env={{"SLURM_CONF": {slurm_conf!r}}})
svc["command"].append("--PortalService.session_poll_interval=1")
from sovereign_portal.hub import metrics
metrics.install(c)
from sovereign_portal.hub.culler import configure_culler
configure_culler(c, ["--GPUCuller.interval=1", "--GPUCuller.idle_minutes={idle}",
    "--GPUCuller.warn_minutes={warn}", "--GPUCuller.stale_seconds=10"])
"""


@pytest.fixture(scope="module")
def stack(
    slurm_cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[HubProcess, Path]]:
    d = tmp_path_factory.mktemp("culler-slurm")
    shared = Path(tempfile.mkdtemp(prefix="sp-culler-", dir="/tmp"))
    shared.chmod(0o777)
    scripts = shared / "scripts"
    scripts.mkdir()
    scripts.chmod(0o755)
    job_egress = shared / "job-egress.log"
    job_egress.touch(0o666)
    job_egress.chmod(0o666)
    config = CONFIG.format(
        site=str(SITE_FILE),
        key=str(d / "tag.key"),
        job_path=f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin",
        job_egress=str(job_egress),
        scripts=str(scripts),
        db=d / "portal.sqlite",
        service_port=free_port(),
        slurm_conf=str(slurm_cluster.conf),
        idle=IDLE_S / 60,
        warn=WARN_S / 60,
    )
    h = HubProcess(d, config, env={"SLURM_CONF": str(slurm_cluster.conf)}, poll_interval=1)
    h.start()
    try:
        yield h, scripts
    finally:
        h.close()
        h.assert_no_egress()
        egress = job_egress.read_text()
        subprocess.run(["rm", "-rf", str(shared)], check=False)
        assert egress == "", egress


def write_script(scripts: Path, name: str, util: float) -> None:
    body = {
        "start": time.time(),
        "devices": [{"index": 0, "uuid": "MIG-script", "idle_w": 30, "busy_w": 300}],
        "phases": [{"seconds": None, "utilization_pct": util}],
    }
    tmp = scripts / f".{name}.tmp"
    tmp.write_text(json.dumps(body))
    tmp.chmod(0o644)
    tmp.replace(scripts / f"{name}.json")


def records(hub: HubProcess, user: str) -> list[L.Record]:
    store = PortalStore(f"sqlite:///{hub.dir / 'portal.sqlite'}")
    try:
        ledger = LedgerStore(store)
        return [r for r in [*ledger.chained(), *ledger.list_open()] if r.user == user]
    finally:
        store.dispose()


def running(hub: HubProcess, user: str) -> bool:
    model = hub.api("GET", f"/users/{user}").json()
    return bool(model.get("servers", {}).get("", {}).get("ready"))


def user_api(hub: HubProcess, user: str) -> Any:
    """``method, path[, body] -> response`` on the user's server's sovereign-portal API."""
    tok = hub.api(
        "POST", f"/users/{user}/tokens", json={"scopes": [f"access:servers!user={user}"]}
    ).json()["token"]

    def call(method: str, path: str, body: Any = None) -> requests.Response:
        return requests.request(
            method,
            f"{hub.url}/user/{user}/sovereign-portal/api/{path}",
            headers={"Authorization": f"token {tok}"},
            json=body,
            timeout=60,
        )

    return call


def idle_notices(call: Any) -> list[dict[str, Any]]:
    r = call("GET", "notices")
    assert r.status_code == 200, r.text
    return [n for n in r.json()["notices"] if n["kind"] == "idle"]


def fresh(hub: HubProcess, user: str) -> None:
    hub.ensure_user(user)
    if hub.api("GET", f"/users/{user}").json().get("servers"):
        hub.stop_server(user)


def test_idle_server_warned_then_reclaimed_busy_gpu_kept(
    stack: tuple[HubProcess, Path], slurm_cluster: SlurmCluster
) -> None:
    hub, scripts = stack
    write_script(scripts, "syalice", 0)  # idle
    write_script(scripts, "sybob", 90)  # a training loop, while the kernels are idle
    for u in ("syalice", "sybob"):
        fresh(hub, u)
    started = time.time()
    # bob first: alice's idle count starts with her server, and the test follows it
    hub.spawn("sybob", {"partition": "gpu-fr", "slice": "1g.10gb"}, timeout=180)
    hub.spawn("syalice", {"partition": "gpu-fr", "slice": "1g.10gb"}, timeout=180)
    alice, bob = user_api(hub, "syalice"), user_api(hub, "sybob")
    act = alice("GET", "activity").json()
    assert act["source"] == "scripted" and act["devices"][0]["uuid"] == "MIG-script"

    notice = hub.wait_for(lambda: (idle_notices(alice) or [None])[0], IDLE_S + 30, "the notice")
    assert notice["level"] == "warning" and "run a cell" in notice["message"]
    assert time.time() - started >= IDLE_S - WARN_S
    hub.wait_for(lambda: not running(hub, "syalice"), IDLE_S + 40, "syalice's server stopped")
    assert time.time() - started >= IDLE_S

    def closed() -> L.Record | None:
        return next((r for r in records(hub, "syalice") if r.closed), None)

    rec = hub.wait_for(closed, 60, "syalice's record closed")
    assert rec.end_reason == "reclaimed" and rec.source.startswith("server:syalice/")
    assert rec.job_ids and rec.amounts is not None
    # the GPU-hours given back are in the hub's metrics, read from the ledger
    m = requests.get(
        f"{hub.url}/hub/metrics", headers={"Authorization": f"token {hub.token}"}, timeout=30
    )
    assert m.status_code == 200, m.text[:300]
    line = next(x for x in m.text.splitlines() if x.startswith("sovereign_portal_reclaimed_gpu"))
    assert rec.started_at is not None and rec.ended_at is not None
    left_h = (rec.started_at + rec.walltime_minutes * 60 - rec.ended_at) / 3600
    want = rec.rates.gpu_equivalents * left_h  # the rest of the walltime × 1/7
    assert 'partition="gpu-fr"' in line, line
    assert float(line.split()[-1]) == pytest.approx(want, abs=1e-3) and want > 0, (line, want)
    # bob's GPU is busy all along: never warned, never stopped
    assert running(hub, "sybob") and idle_notices(bob) == []
    assert not [r for r in records(hub, "sybob") if r.closed]
    hub.stop_server("sybob")


@pytest.mark.parametrize(
    "req",
    [
        {"kind": "dask", "partition": "gpu-fr", "slice": "1g.10gb"},
        # a torch rank samples its own device too (rank_worker), on a whole GPU
        {"kind": "torch", "partition": "gpu-fr", "accelerator": "h100", "gpus": 1},
    ],
    ids=["dask", "torch"],
)
def test_idle_compute_session_reclaimed_its_server_kept(
    stack: tuple[HubProcess, Path], slurm_cluster: SlurmCluster, req: dict[str, Any]
) -> None:
    hub, scripts = stack
    write_script(scripts, "sycarol", 90)  # the server's own GPU is busy: it stays
    write_script(scripts, "sycarol-session", 0)  # the session's workers' GPUs are idle
    fresh(hub, "sycarol")
    hub.spawn("sycarol", {"partition": "gpu-fr", "slice": "1g.10gb"}, timeout=180)
    closed_before = {r.id for r in records(hub, "sycarol") if r.closed}  # earlier tests'
    carol = user_api(hub, "sycarol")
    r = carol("POST", "sessions", {"request": req})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]

    def state() -> dict[str, Any]:
        got = carol("GET", f"sessions/{sid}")
        assert got.status_code == 200, got.text
        return dict(got.json())

    hub.wait_for(lambda: state()["state"] == "ready", 120, "the session ready")
    jobs = state()["jobs"]
    assert len(jobs) == 1

    def session_notice() -> dict[str, Any] | None:
        return next((n for n in idle_notices(carol) if "compute session" in n["message"]), None)

    n = hub.wait_for(session_notice, IDLE_S + 30, "the session's idle notice")
    assert "your server and your files stay" in n["message"]

    def grant_closed() -> L.Record | None:
        return next(
            (
                r
                for r in records(hub, "sycarol")
                if r.closed and r.source.startswith("grant:") and r.job_ids == tuple(jobs)
            ),
            None,
        )

    rec = hub.wait_for(grant_closed, IDLE_S + 60, "the session's record closed")
    assert rec.end_reason == "reclaimed"
    assert rec.amounts is not None

    # the session's job is gone from the queue, the session says why, the server stays
    def job_gone() -> bool:
        live = ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING")
        return not [j for j in slurm_cluster.jobs() if j["id"] in jobs and j["state"] in live]

    hub.wait_for(job_gone, 30, "the session's job cancelled")
    s = hub.wait_for(lambda: state() if state()["state"] == "stopped" else None, 30, "stopped")
    assert "reclaimed" in s["message"], s
    assert running(hub, "sycarol")
    assert not [
        r
        for r in records(hub, "sycarol")
        if r.closed and r.source.startswith("server:") and r.id not in closed_before
    ]
    hub.stop_server("sycarol")
