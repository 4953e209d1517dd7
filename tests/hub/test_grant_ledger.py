"""Compute sessions are charged: the real portal service opens a ledger record (source
``grant:<id>``) when it writes a grant, adds the session's Slurm jobs, marks the start when a
job runs, and closes it when the grant is released (``stopped``) or its jobs end behind the
portal's back (``scancel``); the grant's budget hold settles from the closed record. Real
Slurm cluster (tests/support/slurm_cluster.py), real SQLite portal database."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests
from sovereign_portal.hub.budget_store import DB_URL_ENV
from sovereign_portal.hub.ledger_store import LedgerStore
from sovereign_portal.hub.store import PortalStore

from tests.support.paths import VENV_BIN
from tests.support.sessions import PortalServiceThread
from tests.support.slurm_cluster import SITE_FILE, SlurmCluster

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(300)]

USER = "spcarol"
TOKENS = {"tok-carol": {"name": USER, "groups": ["course-ml101"]}}
AUTH = {"Authorization": "token tok-carol"}
REQ = {"kind": "dask", "partition": "gpu-fr", "accelerator": "h100", "gpus": 1, "count": 1,
       "walltime_minutes": 10}  # fmt: skip


def budgets(db: str, *args: str) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(
        [str(VENV_BIN / "sovereign-portal"), "budgets", *args, "--db", db],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    return r


@pytest.fixture(scope="module")
def service(
    slurm_cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[PortalServiceThread, str]]:
    d: Path = tmp_path_factory.mktemp("grant-ledger")
    db = f"sqlite:///{d / 'portal.sqlite'}"
    today = datetime.now(UTC).date()
    span = ["--start", str(today - timedelta(days=1)), "--end", str(today + timedelta(days=9))]
    budgets(db, "set", "course:ml101", "--period", "now", *span, "--gpu-hours", "10")
    mp = pytest.MonkeyPatch()
    mp.setenv(DB_URL_ENV, db)
    svc = PortalServiceThread(str(SITE_FILE), TOKENS, session_poll_interval=1.0).start()
    try:
        yield svc, db
    finally:
        svc.stop()
        mp.undo()
        slurm_cluster.run(["scancel", "-u", USER], check=False)


def record(db: str, grant_id: str) -> object:
    store = PortalStore(db)
    try:
        recs = [r for r in LedgerStore(store).list_open() if r.source == f"grant:{grant_id}"]
        if recs:
            return recs[0]
        closed = [r for r in LedgerStore(store).chained() if r.source == f"grant:{grant_id}"]
        return closed[-1] if closed else None
    finally:
        store.dispose()


def wait_for(what: str, check, timeout: float = 40):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = check()
        if v:
            return v
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def grant(svc: PortalServiceThread) -> dict:  # type: ignore[type-arg]
    g = requests.post(svc.url + "api/grants", json=REQ, headers=AUTH, timeout=30)
    assert g.status_code == 201, g.text
    return g.json()  # type: ignore[no-any-return]


def test_released_grant_closes_stopped_and_settles(
    service: tuple[PortalServiceThread, str],
) -> None:
    svc, db = service
    g = grant(svc)
    rec = record(db, g["id"])
    assert rec is not None and not rec.closed  # type: ignore[attr-defined]
    assert (rec.owner_type, rec.owner, rec.user) == ("course", "ml101", USER)  # type: ignore[attr-defined]
    r = requests.delete(svc.url + f"api/grants/{g['id']}", headers=AUTH, timeout=30)
    assert r.status_code == 204
    rec = record(db, g["id"])
    assert rec.closed and rec.end_reason == "stopped", rec  # type: ignore[attr-defined]
    # its session never ran a job: no time is charged
    assert rec.amounts is not None and rec.amounts.gpu_seconds == 0, rec  # type: ignore[attr-defined]
    shown = json.loads(budgets(db, "show", "course:ml101", "--period", "now", "--json").stdout)
    assert [h for h in shown["holds"] if h["ref"] == f"grant:{g['id']}"] == []


def test_scancel_behind_the_portals_back_closes_the_record(
    service: tuple[PortalServiceThread, str], slurm_cluster: SlurmCluster
) -> None:
    svc, db = service
    c = slurm_cluster
    g = grant(svc)
    sub = c.run(
        ["sbatch", "--parsable", "--chdir=/tmp", "--output=/dev/null", *g["scheduler_args"]],
        user=USER,
        input="#!/bin/bash\nsleep 300\n",
    )
    job = sub.stdout.strip().split(";")[0]
    try:
        r = requests.put(
            svc.url + f"api/grants/{g['id']}/jobs", params={"jobs": job}, headers=AUTH, timeout=30
        )
        assert r.status_code == 200, r.text
        assert c.wait_job_state(job, ["RUNNING"]) == "RUNNING"
        rec = wait_for(
            "the start", lambda: (x := record(db, g["id"])) and x.started_at is not None and x
        )
        assert rec.job_ids == (job,) and not rec.closed
        time.sleep(1.5)  # it uses a little
        c.run(["scancel", job])
        rec = wait_for("the record to close", lambda: (x := record(db, g["id"])) and x.closed and x)
        assert rec.end_reason == "scancel", rec
        assert rec.amounts is not None and rec.amounts.gpu_seconds > 0, rec
        shown = json.loads(budgets(db, "show", "course:ml101", "--period", "now", "--json").stdout)
        assert [h for h in shown["holds"] if h["ref"] == f"grant:{g['id']}"] == []
        assert shown["settled"] > 0
    finally:
        c.run(["scancel", job], check=False)
        requests.delete(svc.url + f"api/grants/{g['id']}", headers=AUTH, timeout=30)


def test_a_restarted_service_still_closes_the_record_of_a_running_session(
    service: tuple[PortalServiceThread, str], slurm_cluster: SlurmCluster
) -> None:
    """The service is stopped while a session's job runs, and another starts on the same
    database; the session's server never registers again. The new service polls the open
    record's job and closes the record when the job is cancelled."""
    _, db = service  # the database (and its budget); this test runs its own two services
    c = slurm_cluster
    first = PortalServiceThread(str(SITE_FILE), TOKENS, session_poll_interval=1.0).start()
    second = None
    job = ""
    try:
        g = grant(first)
        job = (
            c.run(
                [
                    "sbatch",
                    "--parsable",
                    "--chdir=/tmp",
                    "--output=/dev/null",
                    *g["scheduler_args"],
                ],
                user=USER,
                input="#!/bin/bash\nsleep 300\n",
            )
            .stdout.strip()
            .split(";")[0]
        )
        r = requests.put(
            first.url + f"api/grants/{g['id']}/jobs", params={"jobs": job}, headers=AUTH,
            timeout=30,
        )  # fmt: skip
        assert r.status_code == 200, r.text
        assert c.wait_job_state(job, ["RUNNING"]) == "RUNNING"
        wait_for("the start", lambda: (x := record(db, g["id"])) and x.started_at is not None)
        first.stop()
        first = None
        second = PortalServiceThread(str(SITE_FILE), TOKENS, session_poll_interval=1.0).start()
        time.sleep(2)  # the new service runs, with the record open
        rec = record(db, g["id"])
        assert rec is not None and not rec.closed  # type: ignore[attr-defined]
        c.run(["scancel", job])
        rec = wait_for("the record to close", lambda: (x := record(db, g["id"])) and x.closed and x)
        assert rec.end_reason == "scancel", rec
    finally:
        if job:
            c.run(["scancel", job], check=False)
        for svc in (first, second):
            if svc is not None:
                svc.stop()


def test_a_session_over_its_budget_is_stopped_after_the_grace(
    slurm_cluster: SlurmCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At 100 % of its budget, after the grace, the portal service stops a running compute
    session (the same watch as for notebook servers): its Slurm job is cancelled and its
    record closes with reason "budget". Its own service and database, with a short grace
    (no other service may see the job end first)."""
    from traitlets.config import Config

    c = slurm_cluster
    db = f"sqlite:///{tmp_path / 'portal.sqlite'}"
    today = datetime.now(UTC).date()
    span = ["--start", str(today - timedelta(days=1)), "--end", str(today + timedelta(days=9))]
    budgets(db, "set", "course:ml101", "--period", "now", *span, "--gpu-hours", "10")
    monkeypatch.setenv(DB_URL_ENV, db)
    cfg = Config()
    cfg.BudgetPolicy.grace_seconds = 3
    cfg.BudgetPolicy.check_interval_seconds = 1
    svc = PortalServiceThread(str(SITE_FILE), TOKENS, session_poll_interval=1.0, config=cfg)
    svc.start()
    job = ""
    try:
        g = grant(svc)
        job = (
            c.run(
                ["sbatch", "--parsable", "--chdir=/tmp", "--output=/dev/null",
                 *g["scheduler_args"]],
                user=USER,
                input="#!/bin/bash\nsleep 300\n",
            )
            .stdout.strip()
            .split(";")[0]
        )  # fmt: skip
        r = requests.put(
            svc.url + f"api/grants/{g['id']}/jobs", params={"jobs": job}, headers=AUTH,
            timeout=30,
        )  # fmt: skip
        assert r.status_code == 200, r.text
        assert c.wait_job_state(job, ["RUNNING"]) == "RUNNING"
        wait_for("the start", lambda: (x := record(db, g["id"])) and x.started_at is not None)
        time.sleep(3)  # well inside the budget: nothing stops
        assert c.wait_job_state(job, ["RUNNING"]) == "RUNNING"
        assert not record(db, g["id"]).closed  # type: ignore[attr-defined]
        # the operator takes the pool down to nothing: it is spent now
        budgets(db, "set", "course:ml101", "--period", "now", "--gpu-hours", "0")
        t0 = time.monotonic()
        rec = wait_for(
            "the record to close", lambda: (x := record(db, g["id"])) and x.closed and x, 90
        )
        assert time.monotonic() - t0 >= 2.5  # not before the grace
        assert rec.end_reason == "budget", rec
        assert rec.amounts is not None and rec.amounts.gpu_seconds > 0, rec
        # the job was really cancelled by the service, not left running
        state = c.run(["squeue", "-h", "-j", job, "-o", "%T"], check=False).stdout.strip()
        assert state in ("", "CANCELLED", "COMPLETING"), state
        shown = json.loads(budgets(db, "show", "course:ml101", "--period", "now", "--json").stdout)
        assert [h for h in shown["holds"] if h["ref"] == f"grant:{g['id']}"] == []
        assert "budget is spent" in shown["banner"]
        # jobs registered afterwards for the stopped session are refused
        r = requests.put(
            svc.url + f"api/grants/{g['id']}/jobs", params={"jobs": job}, headers=AUTH,
            timeout=30,
        )  # fmt: skip
        assert r.status_code == 403 and r.json()["reason"] == "budget", r.text
    finally:
        if job:
            c.run(["scancel", job], check=False)
        svc.stop()
