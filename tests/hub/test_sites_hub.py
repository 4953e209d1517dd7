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
4. after a hub kill -9, the servers on both sites are re-adopted, and the orphan sweep
   after the restart cancels, at each site through that site's client, a job this hub
   signed and no longer knows (one query per site);
5. the ledger: every record carries its site, country and operator; the hub polls each
   site once per interval for all its servers (each slurmctld's own sdiag); a server
   stopped on DE and a job cancelled by FR's operator close "stopped" and "scancel";
6. a GDPR erase reaches every site (DE's job cancelled through its slurmrestd), and its
   receipt lists what each site held and removed.
"""

from __future__ import annotations

import json
import shutil
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
from sovereign_portal.spawners.slurm.jobscript import make_tag

from tests.support.hub import HubProcess
from tests.support.paths import VENV_BIN
from tests.support.sdiag import job_info_rpcs
from tests.support.slurm_cluster import (  # noqa: F401 - the fixture
    SlurmCluster,
    slurm_sites,
    write_site_file,
)

pytestmark = [pytest.mark.slurm, pytest.mark.slurm_sites, pytest.mark.timeout(600)]

CONFIG = """
c.JupyterHub.authenticator_class = "dummy"
c.JupyterHub.spawner_class = "slurm-gpu"
c.JupyterHub.log_level = "DEBUG"
c.SlurmGPUSpawner.site_file = {site!r}
c.SlurmGPUSpawner.server_ip = "127.0.0.1"
c.SlurmGPUSpawner.scheduler_poll_interval = 1.0
c.SlurmGPUSpawner.orphan_grace_seconds = {grace}
c.SlurmGPUSpawner.residency = {{"proj-fr": ["FR"], "proj-eu": ["FR", "DE", "IT", "NL"]}}
c.SlurmGPUSpawner.tag_key_file = {key!r}
c.Spawner.environment = {{"EGRESS_LOG": {job_egress!r}}}
c.SlurmGPUSpawner.job_environment = {{"PATH": {job_path!r}}}
c.Spawner.start_timeout = 120
c.Spawner.poll_interval = 1
c.PortalDatabase.url = "sqlite:///{db}"
from sovereign_portal.hub.ledger_hub import install
install(c)
from sovereign_portal.spawners.slurm import sweep_on_hub_start
sweep_on_hub_start()
"""
GRACE = 2  # orphan_grace_seconds


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
        grace=GRACE,
        db=d / "portal.sqlite",
    )
    hub = HubProcess(d, config, env={"SLURM_CONF": str(paris.conf)}, poll_interval=1)
    hub.start()
    for group, users in (("proj-eu", ["sxalice"]), ("proj-fr", ["sxcarol", "sxdave"])):
        for u in users:
            hub.ensure_user(u)
        hub.api("POST", f"/groups/{group}")
        r = hub.api("POST", f"/groups/{group}/users", json={"users": users})
        assert r.status_code == 200, r.text
    try:
        yield {
            "hub": hub,
            "paris": paris,
            "julich": julich,
            "db": f"sqlite:///{d / 'portal.sqlite'}",
        }
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


def records_of(fed: dict[str, Any], user: str) -> list[L.Record]:
    """Every ledger record of ``user`` (closed, then open), from the hub's portal database."""
    store = PortalStore(fed["db"])
    try:
        ledger = LedgerStore(store)
        return [r for r in [*ledger.chained(), *ledger.list_open()] if r.user == user]
    finally:
        store.dispose()


def open_record(fed: dict[str, Any], user: str, job: str) -> L.Record:
    """``user``'s open server record, once it carries ``job`` (the poll attaches it)."""

    def found() -> L.Record | None:
        recs = [r for r in records_of(fed, user) if not r.closed and r.job_ids == (job,)]
        return recs[0] if recs else None

    return fed["hub"].wait_for(found, 20, f"{user}'s open record with job {job}")


def job_of(hub: HubProcess, user: str) -> str:
    r = hub.server_get(user, "sovereign-portal/api/placement")
    assert r.status_code == 200, r.text
    return str(r.json()["env"]["SLURM_JOB_ID"])


def fill(c: SlurmCluster) -> str:
    """A job of sxbob holding all 8 GPUs of the site's only node."""
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
        user="sxbob",
    ).stdout.strip()
    c.wait_job_state(out, ["RUNNING"])
    return out


def test_an_eu_user_goes_to_de_when_fr_is_full(fed: dict[str, Any]) -> None:
    hub, paris, julich = fed["hub"], fed["paris"], fed["julich"]
    fed["filler"] = fill(paris)
    r = hub.api("POST", "/users/sxalice/server", json={"gpus": 1})
    assert r.status_code in (201, 202), f"{r.status_code} {r.text}\n{hub.tail(80)}"
    hub.wait_ready("sxalice", timeout=120)
    on_de = portal_jobs(julich, "sxalice")
    assert len(on_de) == 1 and portal_jobs(paris, "sxalice", ("PENDING", "RUNNING")) == []
    assert job_of(hub, "sxalice") == on_de[0]
    assert "Placed sxalice: gpu-de at site julich (DE): allowed by project proj-eu's" in (
        hub.log_text()
    )
    rec = open_record(fed, "sxalice", on_de[0])
    assert (rec.site, rec.country, rec.operator) == ("julich", "DE", "Test Centre DE")
    assert rec.partition == "gpu-de" and rec.started_at is not None


def test_an_fr_only_project_queues_on_fr_never_in_de(fed: dict[str, Any]) -> None:
    hub, paris, julich = fed["hub"], fed["paris"], fed["julich"]
    r = hub.api("POST", "/users/sxcarol/server", json={"gpus": 1})
    assert r.status_code in (201, 202), r.text
    hub.wait_for(lambda: portal_jobs(paris, "sxcarol", ("PENDING",)), 30, "sxcarol queued on FR")
    assert portal_jobs(julich, "sxcarol", ("PENDING", "RUNNING", "COMPLETED", "CANCELLED")) == []
    text = hub.log_text()
    assert (
        "Placed sxcarol: gpu-fr at site paris (FR): allowed by project proj-fr's FR-only rule"
        in text
    )
    assert "it never moves to a site your rules forbid" in text
    paris.run(["scancel", fed["filler"]])  # room appears on FR: the queued server starts there
    hub.wait_ready("sxcarol", timeout=120)
    assert job_of(hub, "sxcarol") in portal_jobs(paris, "sxcarol")
    rec = open_record(fed, "sxcarol", job_of(hub, "sxcarol"))
    assert (rec.site, rec.country, rec.operator) == ("paris", "FR", "Test Centre FR")
    assert rec.partition == "gpu-fr"
    assert not any(r.site == "julich" for r in records_of(fed, "sxcarol"))


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
    hub.ensure_user("sxbob")
    hub.api("POST", "/groups/proj-eu/users", json={"users": ["sxbob"]})
    page = _form(hub, "sxbob")
    assert "julich (DE): open" in page and "gpu-de" in page
    assert "name='placement' value='auto' checked" in page
    job = job_of(hub, "sxalice")
    julich.stop_rest()
    try:
        # The form shows the site states of the last poll: julich's next one fails.
        page = hub.wait_for(
            lambda: next((p for p in [_form(hub, "sxbob")] if "cannot be reached now" in p), None),
            10,
            "julich marked unreachable on the form",
        )
        assert "julich (DE): cannot be reached now; not offered" in page
        assert "gpu-de" not in page and "gpu-fr" in page
        for _ in range(5):  # five poll intervals without an answer from julich
            time.sleep(1.0)
            model = hub.api("GET", "/users/sxalice").json()
            assert model["servers"][""]["ready"], model
            assert [r.closed for r in records_of(fed, "sxalice")] == [False]  # not ended
        assert julich.run(["squeue", "-h", "-j", job, "-o", "%T"]).stdout.strip() == "RUNNING"
    finally:
        julich.start_rest()
    page = _form(hub, "sxbob")
    assert "julich (DE): open" in page
    assert hub.api("GET", "/users/sxalice").json()["servers"][""]["ready"]
    assert job_of(hub, "sxalice") == job


def orphan(c: SlurmCluster, tag: str) -> str:
    """A server job of sxdave as this hub submits one (its name, its signed tag), which no
    server of the hub tracks: as after a hub whose database lost the server."""
    argv = ["sbatch", "--parsable", "-p", "gpu", "--gres=gpu:h100:1", "-t", "30", "-D", "/tmp"]
    argv += ["-o", "/dev/null", "-J", "sovereign-portal", f"--comment=sovereign-portal:{tag}"]
    job = c.run([*argv, "--wrap", "sleep 600"], user="sxdave").stdout.strip()
    c.wait_job_state(job, ["RUNNING"])
    return job


def sweep_lines(hub: HubProcess) -> dict[str, str]:
    """The orphan sweep's summary line of each site, from the hub's latest log."""
    log = hub.dir / f"hub-{hub.starts}.log"

    def lines() -> dict[str, str] | None:
        got = {}
        for line in log.read_text(errors="replace").splitlines():
            for site in ("paris", "julich"):
                if f"Orphan sweep at site {site}:" in line:
                    got[site] = line
        return got if len(got) == 2 else None

    return dict(hub.wait_for(lines, GRACE + 30, "the orphan sweep of both sites"))


def test_kill9_readopts_servers_on_both_sites_and_sweeps_each_site(fed: dict[str, Any]) -> None:
    hub, paris, julich = fed["hub"], fed["paris"], fed["julich"]
    before = {"sxalice": job_of(hub, "sxalice"), "sxcarol": job_of(hub, "sxcarol")}
    key = (hub.dir / "tag.key").read_text().strip().encode()
    lost = {"paris": orphan(paris, make_tag(key, "feedc0ffee01"))}
    lost["julich"] = orphan(julich, make_tag(key, "feedc0ffee02"))
    try:
        hub.kill()
        hub.start()
        for user, job in before.items():
            hub.wait_ready(user, timeout=60)
            assert job_of(hub, user) == job
        lines = sweep_lines(hub)
        for site, job in lost.items():
            assert f"cancelled ['{job}']" in lines[site], lines
        paris.wait_job_state(lost["paris"], ["CANCELLED", "COMPLETING"], timeout=15)
        julich.wait_job_state(lost["julich"], ["CANCELLED", "COMPLETING"], timeout=15)
        log = (hub.dir / f"hub-{hub.starts}.log").read_text(errors="replace")
        assert f"Untracked portal job {lost['julich']} at site julich of sxdave" in log
        # the re-adopted servers' jobs are left alone at both sites
        assert portal_jobs(julich, "sxalice") == [before["sxalice"]]
        assert portal_jobs(paris, "sxcarol") == [before["sxcarol"]]
    finally:
        paris.run(["scancel", lost["paris"]], check=False)
        julich.run(["scancel", lost["julich"]], check=False)


def test_one_poll_per_site_per_interval_and_records_close_per_site(fed: dict[str, Any]) -> None:
    hub, paris, julich = fed["hub"], fed["paris"], fed["julich"]
    # two servers at each site: sxalice and sxbob in DE, sxcarol and sxdave in FR
    hub.ensure_user("sxdave")
    for user, body in (("sxbob", {"gpus": 1, "partition": "gpu-de"}), ("sxdave", {"gpus": 1})):
        r = hub.api("POST", f"/users/{user}/server", json=body)
        assert r.status_code in (201, 202), r.text
    for user in ("sxbob", "sxdave"):
        hub.wait_ready(user, timeout=120)
    assert len(portal_jobs(julich, "sxalice") + portal_jobs(julich, "sxbob")) == 2
    assert len(portal_jobs(paris, "sxcarol") + portal_jobs(paris, "sxdave")) == 2
    for user, site in (("sxbob", "julich"), ("sxdave", "paris")):
        rec = open_record(fed, user, job_of(hub, user))
        assert rec.site == site and rec.country == ("DE" if site == "julich" else "FR")
    # each slurmctld's own count of job-info RPCs over a window of 10 poll intervals
    window = 10.0
    clusters = {"paris": paris, "julich": julich}
    counts = {name: job_info_rpcs(c) for name, c in clusters.items()}
    time.sleep(window)
    polls = {name: job_info_rpcs(c) - counts[name] for name, c in clusters.items()}
    for n in polls.values():  # one per interval (with jitter), not one per server
        assert 1 <= n <= window * 1.25 + 2, polls
    # DE: the user stops the server; FR: the site's operator cancels the job
    alice = open_record(fed, "sxalice", job_of(hub, "sxalice"))
    carol_job = job_of(hub, "sxcarol")
    carol = open_record(fed, "sxcarol", carol_job)
    r = hub.api("DELETE", "/users/sxalice/server")
    assert r.status_code in (202, 204), r.text
    paris.run(["scancel", carol_job])

    def closed(rec_id: str, user: str) -> L.Record | None:
        got = [r for r in records_of(fed, user) if r.id == rec_id and r.closed]
        return got[0] if got else None

    a = hub.wait_for(lambda: closed(alice.id, "sxalice"), 60, "sxalice's record closed")
    c = hub.wait_for(lambda: closed(carol.id, "sxcarol"), 60, "sxcarol's record closed")
    assert (a.end_reason, a.site, a.country) == ("stopped", "julich", "DE")
    assert (c.end_reason, c.site, c.country) == ("scancel", "paris", "FR")


def test_gdpr_erase_reaches_every_site_and_its_receipt_lists_each(fed: dict[str, Any]) -> None:
    """6. ``gdpr erase`` of a user with a server in DE: the job is cancelled at julich
    through its slurmrestd, and the receipt has one entry per site: julich with the job,
    the records and the job log, paris with nothing of theirs."""
    hub, paris, julich = fed["hub"], fed["paris"], fed["julich"]
    user = "sxbob"
    hub.ensure_user(user)
    if not portal_jobs(julich, user):
        r = hub.api("POST", f"/users/{user}/server", json={"gpus": 1, "partition": "gpu-de"})
        assert r.status_code in (201, 202), r.text
        hub.wait_ready(user, timeout=120)
    job = job_of(hub, user)
    assert portal_jobs(julich, user) == [job] and portal_jobs(paris, user) == []
    open_record(fed, user, job)
    mine = records_of(fed, user)
    at = {s: sum(1 for r in mine if r.site == s) for s in ("paris", "julich")}
    assert at["julich"] >= 1, mine
    env = {k: v for k, v in hub.env().items() if k != "JUPYTERHUB_API_TOKEN"}
    env["JUPYTERHUB_API_TOKEN"] = hub.token  # an operator's token, never on the command line
    out = subprocess.run(
        [str(VENV_BIN / "sovereign-portal"), "gdpr", "erase", user, "--json",
         "--config", str(hub.config_path)],
        capture_output=True, text=True, timeout=240, env=env, cwd=hub.dir,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    receipt = json.loads(out.stdout)
    per_site = {s["site"]: s for s in {s["step"]: s for s in receipt["steps"]}["per site"]["sites"]}
    assert set(per_site) == {"paris", "julich"}, per_site
    de, fr = per_site["julich"], per_site["paris"]
    assert (de["country"], de["transport"], fr["country"], fr["transport"]) == (
        "DE", "rest", "FR", "cli",
    )  # fmt: skip
    assert de["ledger_records_pseudonymised"] == at["julich"]
    assert fr["ledger_records_pseudonymised"] == at["paris"]
    assert f"~/.sovereign-portal/logs/slurm-julich-{job}.log" in de["job_logs_deleted"], de
    assert not any("-julich-" in f for f in fr["job_logs_deleted"]), fr
    assert de["errors"] == [] and fr["errors"] == []
    # the job is gone at julich, and no record of theirs is open or named after them
    hub.wait_for(lambda: portal_jobs(julich, user, ("PENDING", "RUNNING")) == [], 60, "DE job")
    assert records_of(fed, user) == []
    assert user not in [u["name"] for u in hub.api("GET", "/users").json()]
    assert not (Path(f"/home/{user}") / ".sovereign-portal").exists()
