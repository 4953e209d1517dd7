"""The ledger reconciled with real Slurm accounting (slurmdbd on MariaDB): real jobs, real sacct."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from sovereign_portal.hub.ledger import Rates, Record, close
from sovereign_portal.hub.ledger_store import LedgerStore
from sovereign_portal.hub.reconcile import compare
from sovereign_portal.hub.store import PortalStore
from sovereign_portal.spawners.slurm.sacct import sacct_jobs

from tests.support.slurm_cluster import SlurmCluster

pytestmark = pytest.mark.slurm

RATES = Rates(gpu_equivalents=1.0, eur_per_hour=2.0, power_w=900.0, carbon_g_per_kwh=50.0)


def _record(rid: str, job: str, start: float, end: float, **kw: object) -> Record:
    r = Record(
        id=rid, user="spcarol", job_ids=(job,), opened_at=start, started_at=start, rates=RATES, **kw
    )  # type: ignore[arg-type]
    return close(r, ended_at=end, reason="stopped")


def _sacct(c: SlurmCluster, jobs: list[str], also: list[str]) -> dict:
    """sacct of ``jobs`` (once slurmdbd has them all) and of ``also`` (ids it may not know)."""
    deadline = time.monotonic() + 30
    while True:
        got = asyncio.run(sacct_jobs([*jobs, *also], env=c.env()))
        if all(j in got and got[j].state == "COMPLETED" for j in jobs):
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"sacct never reported {jobs}: {got}")
        time.sleep(0.5)


def test_ledger_and_sacct_agree_and_differences_are_reported(
    slurm_accounting_cluster: SlurmCluster,
) -> None:
    c = slurm_accounting_cluster
    whole, s1, e1 = c.run_job(3, gres="gpu:h100:2")
    mig, s2, e2 = c.run_job(2, gres="gpu:h100_1g.10gb:1")
    slurm = _sacct(c, [whole, mig], also=["999999"])
    assert "999999" not in slurm
    assert slurm[whole].gpus == 2 and slurm[mig].gpus == 1

    honest = [
        _record("a", whole, s1, e1, gpus=2),
        _record("b", mig, s2, e2, gpus=0, slice="1g.10gb", count=1),
    ]
    assert compare(honest, slurm) == []

    wrong = [
        _record("long", whole, s1, s1 + 600, gpus=2),  # billed 10 minutes for a 3 s job
        _record("more", whole, s1, e1, gpus=4),  # billed 4 GPUs for 2
        _record("ghost", "999999", s1, e1, gpus=1),  # a job Slurm never ran
    ]
    found = {(d.record_id, d.what) for d in compare(wrong, slurm)}
    assert found == {("long", "elapsed"), ("more", "devices"), ("ghost", "missing")}


def test_ledger_reconcile_cli_against_sacct(
    slurm_accounting_cluster: SlurmCluster, tmp_path: Path
) -> None:
    """`sovereign-portal ledger reconcile` reads the portal database and asks sacct once."""
    c = slurm_accounting_cluster
    job, start, end = c.run_job(2)
    _sacct(c, [job], also=[])
    url = f"sqlite:///{tmp_path / 'portal.sqlite'}"
    store = PortalStore(url)
    store.upgrade()
    ledger = LedgerStore(store)
    opened = Record(
        id="ok",
        user="spcarol",
        gpus=1,
        job_ids=(job,),
        opened_at=start,
        started_at=start,
        rates=RATES,
    )
    ledger.open(opened)
    ledger.close("ok", ended_at=end, reason="stopped")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "sovereign_portal.hub.cli",
                "ledger",
                "reconcile",
                "--db",
                url,
                *args,
            ],
            capture_output=True,
            text=True,
            env=c.env(),
            timeout=60,
        )

    r = cli()
    assert r.returncode == 0, r.stderr
    assert "1 Slurm record(s) checked, agree with Slurm" in r.stdout

    ledger.open(replace(opened, id="overbilled", opened_at=start, started_at=start))
    ledger.close("overbilled", ended_at=start + 900, reason="stopped")
    r = cli("--json")
    assert r.returncode == 1, r.stderr
    out = json.loads(r.stdout)
    assert out["checked"] == 2
    assert [(d["record"], d["what"]) for d in out["differences"]] == [("overbilled", "elapsed")]

    bad = cli("--tolerance-seconds", "٣٠")
    assert bad.returncode == 2 and "--tolerance-seconds" in bad.stderr
