"""Budgets pushed into Slurm: ``sovereign-portal budgets sync`` on the real accounting cluster
(slurmdbd + MariaDB, ``AccountingStorageEnforce=associations,limits,qos,safe``) and a real hub
with the Slurm spawner and the budget gate.

- sync makes one account per course budget (``sp-course-ml101``) with ``GrpTRESMins``, the
  NoDecay QOS and the course members' associations (from the hub's own groups);
- ``sync --check`` is clean after a sync, and reports drift (exit 1) once an operator
  changes the limit with sacctmgr behind the portal's back; a second sync is idempotent;
- a spawn the portal admits but whose walltime × GPUs does not fit what Slurm has left is
  held by Slurm itself (``AssocGrpGRESMinutes``, on the job's ``--account``), and the
  spawn progress API shows that reason.

Everything added to Slurm is deleted in ``finally``: the cluster's associations end as found.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import requests

from tests.support.hub import HubProcess
from tests.support.paths import VENV_BIN
from tests.support.slurm_cluster import SITE_FILE, SlurmCluster

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(400)]

USER = "spbob"
COURSE = "ml101"
ACCOUNT = "sp-course-ml101"
QOS = "sp-budget"

CONFIG = """
c.JupyterHub.authenticator_class = "dummy"
c.Authenticator.allow_all = True
c.JupyterHub.spawner_class = "slurm-gpu"
c.SlurmGPUSpawner.site_file = {site!r}
c.SlurmGPUSpawner.server_ip = "127.0.0.1"
c.SlurmGPUSpawner.scheduler_poll_interval = 1.0
c.SlurmGPUSpawner.tag_key_file = {key!r}
c.SlurmGPUSpawner.slurm_accounting = True
c.SlurmGPUSpawner.default_account = "portal"
c.Spawner.start_timeout = 120
c.PortalDatabase.url = {db!r}
from sovereign_portal.hub.budget_store import SpawnBudgetGate
gate = SpawnBudgetGate()
c.Spawner.pre_spawn_hook = gate.pre_spawn_hook
c.Spawner.post_stop_hook = gate.post_stop_hook
c.SlurmGPUSpawner.budget_charge = gate.charge_to
"""


def cli(hub: HubProcess, cluster: SlurmCluster, *args: str) -> subprocess.CompletedProcess[str]:
    db = f"sqlite:///{hub.dir / 'portal.sqlite'}"
    return subprocess.run(
        [str(VENV_BIN / "sovereign-portal"), "budgets", *args, "--db", db],
        capture_output=True,
        text=True,
        timeout=120,
        env=cluster.env(),
    )


def sync(hub: HubProcess, cluster: SlurmCluster, *args: str) -> subprocess.CompletedProcess[str]:
    hub_db = f"sqlite:///{hub.dir / 'jupyterhub.sqlite'}"
    return cli(hub, cluster, "sync", "--hub-db", hub_db, "--slurm-conf", str(cluster.conf), *args)


def _cleanup(cluster: SlurmCluster) -> None:
    cluster.run(["scancel", "-A", ACCOUNT], check=False)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if not cluster.run(["squeue", "-h", "-A", ACCOUNT, "-o", "%i"], check=False).stdout.strip():
            break
        time.sleep(0.3)
    # "Nothing deleted" (exit 1) when a test never got that far is fine
    for a in cluster.associations():
        if a.get("account") == ACCOUNT and a.get("user"):
            cluster.run(["sacctmgr", "-i", "delete", "user", a["user"], f"Account={ACCOUNT}"])
    if any(a.get("account") == ACCOUNT for a in cluster.associations()):
        cluster.run(["sacctmgr", "-i", "delete", "account", ACCOUNT])
    if QOS in cluster.run(["sacctmgr", "-nP", "show", "qos", "format=Name"]).stdout.split():
        cluster.run(["sacctmgr", "-i", "delete", "qos", QOS])


@pytest.fixture(autouse=True)
def slurm_left_as_found(slurm_accounting_cluster: SlurmCluster) -> Iterator[None]:
    """Each test deletes what it added to Slurm; the associations end as they began."""
    c = slurm_accounting_cluster
    before = sorted(map(str, c.associations()))
    try:
        yield
    finally:
        _cleanup(c)
        assert sorted(map(str, c.associations())) == before


@pytest.fixture(scope="module")
def hub(
    slurm_accounting_cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[HubProcess]:
    c = slurm_accounting_cluster
    d = tmp_path_factory.mktemp("budget-sync")
    config = CONFIG.format(
        site=str(SITE_FILE), key=str(d / "tag.key"), db=f"sqlite:///{d / 'portal.sqlite'}"
    )
    h = HubProcess(d, config, env={"SLURM_CONF": str(c.conf)}, poll_interval=1)
    h.start()
    try:
        yield h
    finally:
        h.close()
        h.assert_no_egress()


def progress_text(hub: HubProcess, user: str, want: str, timeout: float = 60) -> str:
    """The spawn progress API's event stream, until a message contains ``want``."""
    seen: list[str] = []
    with requests.get(
        f"{hub.url}/hub/api/users/{user}/server/progress",
        headers={"Authorization": f"token {hub.token}"},
        stream=True,
        timeout=timeout,
    ) as r:
        r.raise_for_status()
        t0 = time.monotonic()
        for line in r.iter_lines(decode_unicode=True):
            if line and line.startswith("data:"):
                msg = json.loads(line[5:]).get("message", "")
                seen.append(msg)
                if want in msg:
                    return msg
            if time.monotonic() - t0 > timeout:
                break
    raise AssertionError(f"no progress message with {want!r}: {seen}")


def test_sync_check_drift_and_slurm_holds_the_spawn(
    hub: HubProcess, slurm_accounting_cluster: SlurmCluster
) -> None:
    c = slurm_accounting_cluster
    # the course and its member, in the hub's own groups (as login makes them)
    assert hub.api("POST", f"/users/{USER}").status_code in (201, 409)
    r = hub.api("POST", f"/groups/course-{COURSE}", json={"users": [USER]})
    assert r.status_code in (201, 409), r.text
    today = datetime.now(UTC).date()
    span = ["--start", str(today - timedelta(days=1)), "--end", str(today + timedelta(days=9))]
    r = cli(hub, c, "set", f"course:{COURSE}", "--period", "now", *span, "--gpu-hours", "1")
    assert r.returncode == 0, r.stderr

    # before the first sync: drift (nothing is in Slurm), and --check changed nothing
    r = sync(hub, c, "--check", "--json")
    assert r.returncode == 1, r.stdout + r.stderr
    kinds = {d["what"] for d in json.loads(r.stdout)["drift"]}
    assert {"missing_qos", "missing_account"} <= kinds, r.stdout
    assert not [a for a in c.associations() if a["account"] == ACCOUNT]

    r = sync(hub, c)
    assert r.returncode == 0, r.stdout + r.stderr
    mine = {a["user"]: a for a in c.associations() if a["account"] == ACCOUNT}
    assert mine[""]["grptresmins"] == "gres/gpu=60", mine
    assert USER in mine
    qos = c.run(["sacctmgr", "-nP", "show", "qos", QOS, "format=Name,Flags"]).stdout
    assert qos.strip() == f"{QOS}|NoDecay", qos

    r = sync(hub, c, "--check")
    assert r.returncode == 0 and "in sync: 1 account(s)" in r.stdout, r.stdout + r.stderr
    r = sync(hub, c)  # idempotent
    assert r.returncode == 0 and "in sync" in r.stdout, r.stdout + r.stderr

    # an operator changes the limit behind the portal's back: --check reports it
    c.sacctmgr("modify", "account", ACCOUNT, "set", "GrpTRESMins=gres/gpu=1")
    r = sync(hub, c, "--check", "--json")
    assert r.returncode == 1, r.stdout + r.stderr
    drift = json.loads(r.stdout)["drift"]
    assert [(d["what"], d["account"]) for d in drift] == [("limit", ACCOUNT)], drift
    assert "is 1, the portal has 60" in drift[0]["detail"]

    # the portal admits 1 GPU for 5 minutes (1 GPU-hour left), Slurm has 1 GPU-minute left:
    # Slurm itself holds the job, on the course's account, and the portal shows why
    r = hub.api(
        "POST",
        f"/users/{USER}/server",
        json={"partition": "gpu-fr", "accelerator": "h100", "gpus": 1, "walltime_minutes": 5},
    )
    assert r.status_code in (201, 202), r.text
    try:
        msg = progress_text(hub, USER, "AssocGrpGRESMinutes")
        assert msg.startswith("Queued in gpu-fr: AssocGrpGRESMinutes"), msg
        assert "too few GPU-minutes left" in msg, msg
        jobs = c.run(["squeue", "-h", "-u", USER, "-o", "%a|%T|%r"]).stdout.split()
        assert jobs == [f"{ACCOUNT}|PENDING|AssocGrpGRESMinutes"], jobs
    finally:
        hub.api("DELETE", f"/users/{USER}/server")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if not c.run(["squeue", "-h", "-u", USER, "-o", "%i"]).stdout.strip():
                break
            time.sleep(0.5)
    assert not c.run(["squeue", "-h", "-u", USER, "-o", "%i"]).stdout.strip()

    # the job-script preview names the account the spawn above was submitted with: the
    # course budget's (the same rule: the budget a spawn charges, then job_account) ...
    def preview(*groups: str) -> str:
        r = subprocess.run(
            [str(VENV_BIN / "sovereign-portal"), "job-script", "--config", str(hub.config_path),
             "--user", USER, "--partition", "gpu-fr", "--size", "h100x1",
             *[a for g in groups for a in ("--group", g)]],
            env=hub.env(), cwd=hub.dir, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        found = re.findall(r"^#SBATCH --account=(\S+)$", r.stdout, re.M)
        assert len(found) == 1, r.stdout
        return str(found[0])

    assert preview(f"course-{COURSE}") == ACCOUNT
    # ... and without the course group no course budget applies: the default account
    assert preview() == "portal"

    # sync puts the portal's limit back
    r = sync(hub, c)
    assert r.returncode == 0 and "fixed:" in r.stdout, r.stdout + r.stderr
    assert sync(hub, c, "--check").returncode == 0


def test_sync_bad_input_names_the_option(
    hub: HubProcess, slurm_accounting_cluster: SlurmCluster
) -> None:
    c = slurm_accounting_cluster
    before = sorted(map(str, c.associations()))
    r = sync(hub, c, "--unix-user", "x")
    assert r.returncode == 2 and "--unix-user" in r.stderr, r.stderr
    r = cli(hub, c, "sync", "--state-dir", str(hub.dir / "nowhere"))
    assert r.returncode == 2 and "--hub-db" in r.stderr, r.stderr
    assert sorted(map(str, c.associations())) == before


def test_a_session_grant_carries_its_budgets_account_and_slurm_holds_it(
    slurm_accounting_cluster: SlurmCluster,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The real portal service grants a compute session to a course student: the grant's
    sbatch arguments carry the course's account, and a job submitted with them (as the
    launchers do) is held by Slurm itself when it does not fit what the account has left."""
    import asyncio

    from sovereign_portal.hub.budget_store import DB_URL_ENV
    from sovereign_portal.spawners.slurm import accounting

    from tests.support.sessions import PortalServiceThread

    c = slurm_accounting_cluster
    d = tmp_path_factory.mktemp("grant-account")
    db = f"sqlite:///{d / 'portal.sqlite'}"
    today = datetime.now(UTC).date()
    span = ["--start", str(today - timedelta(days=1)), "--end", str(today + timedelta(days=9))]
    r = subprocess.run(
        [str(VENV_BIN / "sovereign-portal"), "budgets", "set", f"course:{COURSE}",
         "--period", "now", *span, "--gpu-hours", "1", "--db", db],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    monkeypatch.setenv(DB_URL_ENV, db)
    tokens = {
        "tok-carol": {"name": "spcarol", "groups": [f"course-{COURSE}"]},
        "tok-alice": {"name": "spalice", "groups": ["researcher"]},  # no course budget
    }
    svc = PortalServiceThread(
        str(SITE_FILE), tokens, slurm_accounting=True, default_account=""
    ).start()
    try:
        # Slurm has 1 GPU-minute left on the course account (the portal thinks 60)
        want = accounting.Wanted(ACCOUNT, 1, frozenset({"spcarol"}))
        env = c.env()
        asyncio.run(
            accounting.apply(accounting.diff([want], asyncio.run(accounting.read_state(env))), env)
        )
        req = {"kind": "dask", "partition": "gpu-fr", "accelerator": "h100", "gpus": 1,
               "count": 1, "walltime_minutes": 5}  # fmt: skip
        g = requests.post(
            svc.url + "api/grants", json=req, headers={"Authorization": "token tok-carol"},
            timeout=30,
        )  # fmt: skip
        assert g.status_code == 201, g.text
        grant = g.json()
        assert grant["budget"] == f"course:{COURSE}@now"
        assert grant["account"] == ACCOUNT
        assert [a for a in grant["scheduler_args"] if a.startswith("--account=")] == [
            f"--account={ACCOUNT}"
        ]
        # no budget to charge and no default account: refused, nothing held
        r2 = requests.post(
            svc.url + "api/grants", json=req, headers={"Authorization": "token tok-alice"},
            timeout=30,
        )  # fmt: skip
        assert r2.status_code == 403 and r2.json()["reason"] == "no_slurm_account", r2.text
        assert "default_account" in r2.json()["error"]
        sub = c.run(
            ["sbatch", "--parsable", "--chdir=/tmp", "--output=/dev/null",
             *grant["scheduler_args"]],
            user="spcarol", input="#!/bin/bash\nsleep 1\n",
        )  # fmt: skip
        job = sub.stdout.strip().split(";")[0]
        deadline = time.monotonic() + 30
        state = ""
        while time.monotonic() < deadline:
            state = c.run(["squeue", "-h", "-j", job, "-o", "%a %T %r"]).stdout.strip()
            if "AssocGrp" in state:
                break
            time.sleep(0.3)
        assert state == f"{ACCOUNT} PENDING AssocGrpGRESMinutes", state
        requests.delete(
            svc.url + f"api/grants/{grant['id']}", headers={"Authorization": "token tok-carol"},
            timeout=30,
        )  # fmt: skip
    finally:
        svc.stop()
