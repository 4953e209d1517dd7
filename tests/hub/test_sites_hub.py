"""A real hub over two real Slurm sites: paris (FR, its CLI) and julich (DE, slurmrestd).

JupyterHub + configurable-http-proxy (tests/support/hub.py) with SlurmGPUSpawner and the
two-site file; the sites are two clusters of their own (``slurm_sites``). Servers are real
``jupyterhub-singleuser`` processes in Slurm jobs run as the Unix test users; a request
names no partition, so placement chooses. The tests run in file order and share servers:

1. an EU-wide user goes to DE when FR is full (its job is julich's, submitted by REST);
2. an FR-only project queues on FR when FR is full, with the why on its progress, never
   in DE, and starts on FR when room appears;
3. stopping julich's slurmrestd removes julich from the form; the server there is kept,
   and reconciled when slurmrestd returns;
4. after a hub kill -9, the servers on both sites are re-adopted.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.support.hub import HubProcess
from tests.support.paths import VENV_BIN
from tests.support.slurm_cluster import (  # noqa: F401 - the fixture
    SlurmCluster,
    slurm_sites,
    write_site_file,
)

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(600)]

CONFIG = """
c.JupyterHub.authenticator_class = "dummy"
c.JupyterHub.spawner_class = "slurm-gpu"
c.JupyterHub.log_level = "DEBUG"
c.SlurmGPUSpawner.site_file = {site!r}
c.SlurmGPUSpawner.server_ip = "127.0.0.1"
c.SlurmGPUSpawner.scheduler_poll_interval = 1.0
c.SlurmGPUSpawner.orphan_grace_seconds = 0
c.SlurmGPUSpawner.residency = {{"proj-fr": ["FR"], "proj-eu": ["FR", "DE", "IT", "NL"]}}
c.SlurmGPUSpawner.tag_key_file = {key!r}
c.Spawner.environment = {{"EGRESS_LOG": {job_egress!r}}}
c.SlurmGPUSpawner.job_environment = {{"PATH": {job_path!r}}}
c.Spawner.start_timeout = 120
c.Spawner.poll_interval = 1
"""


@pytest.fixture(scope="module")
def fed(
    slurm_sites: dict[str, SlurmCluster],  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, Any]]:
    d = tmp_path_factory.mktemp("sites-hub")
    paris, julich = slurm_sites["paris"], slurm_sites["julich"]
    token = julich.write_token(d / "julich.jwt", user="root")
    site = write_site_file(d / "two-sites.toml", paris, julich, token)
    shared = Path(tempfile.mkdtemp(prefix="sp-sites-shared-", dir="/tmp"))
    shared.chmod(0o777)
    job_egress = shared / "job-egress.log"
    job_egress.touch(0o666)
    job_egress.chmod(0o666)
    config = CONFIG.format(
        site=str(site),
        key=str(d / "tag.key"),
        job_egress=str(job_egress),
        job_path=f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin",
    )
    hub = HubProcess(d, config, env={"SLURM_CONF": str(paris.conf)}, poll_interval=1)
    hub.start()
    for group, users in (("proj-eu", ["spalice"]), ("proj-fr", ["spcarol", "spdave"])):
        for u in users:
            hub.ensure_user(u)
        hub.api("POST", f"/groups/{group}")
        r = hub.api("POST", f"/groups/{group}/users", json={"users": users})
        assert r.status_code == 200, r.text
    try:
        yield {"hub": hub, "paris": paris, "julich": julich}
    finally:
        hub.close()
        for c in (paris, julich):
            c.cancel_all_jobs()
        hub.assert_no_egress()
        log = job_egress.read_text()
        shutil.rmtree(shared)
        assert log == "", log


def portal_jobs(c: SlurmCluster, user: str, states: tuple[str, ...] = ("RUNNING",)) -> list[str]:
    return [
        j["id"]
        for j in c.jobs()
        if j["name"] == "sovereign-portal" and j["user"] == user and j["state"] in states
    ]


def job_of(hub: HubProcess, user: str) -> str:
    r = hub.server_get(user, "sovereign-portal/api/placement")
    assert r.status_code == 200, r.text
    return str(r.json()["env"]["SLURM_JOB_ID"])


def fill(c: SlurmCluster) -> str:
    """A job of spbob holding all 8 GPUs of the site's only node."""
    out = c.run(
        [
            "sbatch",
            "--parsable",
            "-p",
            "gpu",
            "--gres=gpu:h100:8",
            "-t",
            "30",
            "-J",
            "filler",
            "-o",
            "/dev/null",
            "-D",
            "/tmp",
            "--wrap",
            "sleep 1200",
        ],
        user="spbob",
    ).stdout.strip()
    c.wait_job_state(out, ["RUNNING"])
    return out


def test_an_eu_user_goes_to_de_when_fr_is_full(fed: dict[str, Any]) -> None:
    hub, paris, julich = fed["hub"], fed["paris"], fed["julich"]
    fed["filler"] = fill(paris)
    r = hub.api("POST", "/users/spalice/server", json={"gpus": 1})
    assert r.status_code in (201, 202), f"{r.status_code} {r.text}\n{hub.tail(80)}"
    hub.wait_ready("spalice", timeout=120)
    on_de = portal_jobs(julich, "spalice")
    assert len(on_de) == 1 and portal_jobs(paris, "spalice", ("PENDING", "RUNNING")) == []
    assert job_of(hub, "spalice") == on_de[0]
    assert "Placed spalice: gpu-de at site julich (DE): allowed by project proj-eu's" in (
        hub.log_text()
    )


def test_an_fr_only_project_queues_on_fr_never_in_de(fed: dict[str, Any]) -> None:
    hub, paris, julich = fed["hub"], fed["paris"], fed["julich"]
    r = hub.api("POST", "/users/spcarol/server", json={"gpus": 1})
    assert r.status_code in (201, 202), r.text
    hub.wait_for(lambda: portal_jobs(paris, "spcarol", ("PENDING",)), 30, "spcarol queued on FR")
    assert portal_jobs(julich, "spcarol", ("PENDING", "RUNNING", "COMPLETED", "CANCELLED")) == []
    text = hub.log_text()
    assert (
        "Placed spcarol: gpu-fr at site paris (FR): allowed by project proj-fr's FR-only rule"
        in text
    )
    assert "it never moves to a site your rules forbid" in text
    paris.run(["scancel", fed["filler"]])  # room appears on FR: the queued server starts there
    hub.wait_ready("spcarol", timeout=120)
    assert job_of(hub, "spcarol") in portal_jobs(paris, "spcarol")


def _form(hub: HubProcess, user: str) -> str:
    s = requests.Session()
    s.get(f"{hub.url}/hub/login")
    s.post(
        f"{hub.url}/hub/login",
        data={"username": user, "password": "x", "_xsrf": s.cookies.get("_xsrf")},
    )
    return s.get(f"{hub.url}/hub/spawn").text


def test_stopping_de_slurmrestd_removes_de_and_keeps_its_server(fed: dict[str, Any]) -> None:
    hub, julich = fed["hub"], fed["julich"]
    hub.ensure_user("spbob")
    hub.api("POST", "/groups/proj-eu/users", json={"users": ["spbob"]})
    page = _form(hub, "spbob")
    assert "julich (DE): open" in page and "gpu-de" in page
    assert "name='placement' value='auto' checked" in page
    job = job_of(hub, "spalice")
    julich.stop_rest()
    try:
        # The form shows the site states of the last poll: julich's next one fails.
        page = hub.wait_for(
            lambda: next((p for p in [_form(hub, "spbob")] if "cannot be reached now" in p), None),
            10,
            "julich marked unreachable on the form",
        )
        assert "julich (DE): cannot be reached now; not offered" in page
        assert "gpu-de" not in page and "gpu-fr" in page
        for _ in range(5):  # five poll intervals without an answer from julich
            time.sleep(1.0)
            model = hub.api("GET", "/users/spalice").json()
            assert model["servers"][""]["ready"], model
        assert julich.run(["squeue", "-h", "-j", job, "-o", "%T"]).stdout.strip() == "RUNNING"
    finally:
        julich.start_rest()
    page = _form(hub, "spbob")
    assert "julich (DE): open" in page
    assert hub.api("GET", "/users/spalice").json()["servers"][""]["ready"]
    assert job_of(hub, "spalice") == job


def test_kill9_readopts_servers_on_both_sites(fed: dict[str, Any]) -> None:
    hub, paris, julich = fed["hub"], fed["paris"], fed["julich"]
    before = {"spalice": job_of(hub, "spalice"), "spcarol": job_of(hub, "spcarol")}
    hub.kill()
    hub.start()
    for user, job in before.items():
        hub.wait_ready(user, timeout=60)
        assert job_of(hub, user) == job
    assert portal_jobs(julich, "spalice") == [before["spalice"]]
    assert portal_jobs(paris, "spcarol") == [before["spcarol"]]
