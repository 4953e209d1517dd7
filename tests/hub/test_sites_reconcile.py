"""Ledger reconciliation per site on real clusters: `sovereign-portal ledger reconcile --site`.

The two sites of tests/support/sites/two-sites.toml: ``paris`` is the accounting cluster
(slurmdbd on MariaDB, reached by its CLI: sacct with its own slurm.conf) and declares
``accounting = true``; ``julich`` (slurmrestd with JWT, no slurmdbd) declares none. A real
job runs at each site; closed ledger records name them. The CLI, with no SLURM_CONF of its
own, checks paris's records with paris's sacct (one call), reports julich's as "no
accounting at this site" (never silently), and one wrong record at paris as a difference
(exit 1). The same job id at julich is never looked up in paris's accounting.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sovereign_portal.hub.ledger import Rates, Record
from sovereign_portal.hub.ledger_store import LedgerStore
from sovereign_portal.hub.store import PortalStore

from tests.support.slurm_cluster import (  # noqa: F401 - the fixture
    SlurmCluster,
    slurm_sites,
    write_site_file,
)

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(300)]

RATES = Rates(gpu_equivalents=1.0, eur_per_hour=2.0, power_w=900.0, carbon_g_per_kwh=50.0)


def _site_file(path: Path, paris: SlurmCluster, julich: SlurmCluster, token: Path) -> Path:
    """The two sites of tests/support/sites/two-sites.toml on these clusters, paris
    declaring ``accounting = true``."""
    text = write_site_file(path, paris, julich, token).read_text()
    cli = 'scheduler = { transport = "cli"'
    assert text.count(cli) == 1 and "accounting" not in text, text
    path.write_text(text.replace(cli, f"accounting = true\n{cli}"))
    return path


def _closed(ledger: LedgerStore, rid: str, site: str, job: str, start: float, end: float) -> None:
    ledger.open(
        Record(
            id=rid,
            user="spcarol",
            gpus=1,
            site=site,
            job_ids=(job,),
            opened_at=start,
            started_at=start,
            rates=RATES,
        )
    )
    ledger.close(rid, ended_at=end, reason="stopped")


def test_each_site_is_reconciled_with_its_own_accounting(
    slurm_accounting_cluster: SlurmCluster,
    slurm_sites: dict[str, SlurmCluster],  # noqa: F811
    tmp_path: Path,
) -> None:
    acct, julich = slurm_accounting_cluster, slurm_sites["julich"]
    token = julich.write_token(tmp_path / "julich.jwt", user="root")
    site = _site_file(tmp_path / "sites.toml", acct, julich, token)
    fr_job, fr_start, fr_end = acct.run_job(2, partition="gpu-fr")
    de_job, de_start, de_end = julich.run_job(2, partition="gpu")
    # slurmdbd has the job within a few seconds of its end
    deadline = time.monotonic() + 30
    while "COMPLETED" not in acct.run(["sacct", "-X", "-n", "-j", fr_job, "-o", "State"]).stdout:
        assert time.monotonic() < deadline, "sacct never reported the paris job"
        time.sleep(0.5)

    url = f"sqlite:///{tmp_path / 'portal.sqlite'}"
    store = PortalStore(url)
    store.upgrade()
    try:
        ledger = LedgerStore(store)
        _closed(ledger, "fr-ok", "paris", fr_job, fr_start, fr_end)
        _closed(ledger, "fr-long", "paris", fr_job, fr_start, fr_start + 900)  # 15 min billed
        _closed(ledger, "de", "julich", de_job, de_start, de_end)
    finally:
        store.dispose()

    env = {k: v for k, v in os.environ.items() if k != "SLURM_CONF"}  # each site's own conf

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "sovereign_portal.hub.cli", "ledger", "reconcile"]
        argv += ["--db", url, "--site", str(site), *args]
        return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)

    r = cli()
    assert r.returncode == 1, r.stdout + r.stderr
    assert "site paris (FR): 2 record(s) checked with its accounting, 1 difference(s)" in r.stdout
    assert "elapsed  paris (FR) record fr-long" in r.stdout
    assert "site julich (DE): no accounting at this site" in r.stdout
    assert "1 record(s) not reconciled" in r.stdout

    r = cli("--json")
    reports = {s["site"]: s for s in json.loads(r.stdout)["sites"]}
    assert reports["paris"]["status"] == "ok" and reports["paris"]["records"] == 2
    assert [d["record"] for d in reports["paris"]["differences"]] == ["fr-long"]
    assert reports["julich"]["status"] == "none" and reports["julich"]["differences"] == []
