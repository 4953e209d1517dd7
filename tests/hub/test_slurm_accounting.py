"""The accounting cluster itself: slurmdbd on MariaDB records jobs, and enforces GPU budgets.

These are the Slurm facts the ledger's reconciliation (sacct) and the Slurm-enforced budgets
rely on, checked against the real daemons (../shared/LAB.md, "Slurm accounting").
"""

from __future__ import annotations

import time

import pytest

from tests.support.slurm_cluster import SlurmCluster

pytestmark = pytest.mark.slurm


def _sbatch(cluster: SlurmCluster, user: str, *args: str) -> str:
    r = cluster.run(
        ["sbatch", "--parsable", "--chdir=/tmp", "--output=/dev/null", *args],
        user=user,
        input="#!/bin/bash\nsleep 1\n",
    )
    return r.stdout.strip().split(";")[0]


def _sacct(cluster: SlurmCluster, job: str) -> dict[str, str]:
    r = cluster.run(
        ["sacct", "-X", "-n", "-P", "-j", job, "-o", "JobID,State,ElapsedRaw,AllocTRES,Account"],
        check=False,
    )
    for line in r.stdout.splitlines():
        fields = line.split("|")
        if fields[0] == job:
            return dict(zip(("id", "state", "elapsed", "tres", "account"), fields, strict=True))
    return {}


def _wait(what: str, check, timeout: float = 30):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_sacct_records_gpu_jobs(slurm_accounting_cluster: SlurmCluster) -> None:
    c = slurm_accounting_cluster
    job = _sbatch(c, "spalice", "-p", "gpu-fr", "--gres=gpu:h100:2", "-t", "2")
    row = _wait(
        "a completed job in sacct",
        lambda: (r := _sacct(c, job)) and r["state"] == "COMPLETED" and r,
    )
    assert row["account"] == "portal"
    assert "gres/gpu=2" in row["tres"].split(","), row
    assert int(row["elapsed"]) >= 1


def test_grp_tres_mins_holds_a_job_slurm_itself_refuses(
    slurm_accounting_cluster: SlurmCluster,
) -> None:
    c = slurm_accounting_cluster
    c.sacctmgr("add", "account", "budgettest", "Description=t", "Organization=sp")
    c.sacctmgr("add", "user", "spbob", "Account=budgettest")
    try:
        c.sacctmgr("modify", "account", "budgettest", "set", "GrpTRESMins=gres/gpu=1")
        # 1 GPU for 5 minutes does not fit 1 GPU-minute: with `safe`, it is held, not started.
        job = _sbatch(
            c, "spbob", "-A", "budgettest", "-p", "gpu-fr", "--gres=gpu:h100:1", "-t", "5"
        )
        reason = _wait(
            "the budget reason",
            lambda: (
                c.run(["squeue", "-h", "-j", job, "-o", "%T %r"]).stdout.strip()
                if "AssocGrp" in c.run(["squeue", "-h", "-j", job, "-o", "%r"]).stdout
                else ""
            ),
        )
        assert reason == "PENDING AssocGrpGRESMinutes"
        c.run(["scancel", job])
        # Within the budget (1 GPU for 1 minute) the same account runs.
        ok = _sbatch(c, "spbob", "-A", "budgettest", "-p", "gpu-fr", "--gres=gpu:h100:1", "-t", "1")
        assert c.wait_job_state(ok, ["RUNNING", "COMPLETING", "COMPLETED"]) in (
            "RUNNING",
            "COMPLETING",
            "COMPLETED",
        )
    finally:
        c.run(["scancel", "-A", "budgettest"], check=False)
        _wait(
            "budgettest jobs to end",
            lambda: not c.run(["squeue", "-h", "-A", "budgettest", "-o", "%i"]).stdout.strip(),
        )
        c.sacctmgr("delete", "user", "spbob", "Account=budgettest")
        c.sacctmgr("delete", "account", "budgettest")
