"""Per-site reconciliation of closed ledger records (hub/reconcile.py, spawners/slurm/sacct.py),
inner layer: each site's records are checked against that site's own accounting, with one
call per site; a site that declares no accounting is reported as such; a site that does
not answer is an error for that site only. The real sites are in
tests/hub/test_sites_reconcile.py."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from sovereign_portal.hub.ledger import Rates, Record, close
from sovereign_portal.hub.reconcile import print_site_reports, reconcile_sites
from sovereign_portal.spawners.site import load_site
from sovereign_portal.spawners.slurm.client import SchedulerUnavailable
from sovereign_portal.spawners.slurm.sacct import SacctJob, parse_slurmdb_jobs, slurmdb_query

from tests.support.slurm_cluster import TWO_SITE_FILE

pytestmark = pytest.mark.unit

RATES = Rates(gpu_equivalents=1.0, eur_per_hour=2.0, power_w=900.0, carbon_g_per_kwh=50.0)


def two_sites(tmp_path: Path, paris: bool, julich: bool) -> Any:
    text = TWO_SITE_FILE.read_text()
    text = text.replace(
        'scheduler = { transport = "cli"',
        f'accounting = {str(paris).lower()}\nscheduler = {{ transport = "cli"',
    )
    text = text.replace(
        'scheduler = { transport = "rest"',
        f'accounting = {str(julich).lower()}\nscheduler = {{ transport = "rest"',
    )
    f = tmp_path / "sites.toml"
    f.write_text(text)
    return load_site(f)


def rec(rid: str, site: str, job: str, seconds: float, gpus: int = 1) -> Record:
    r = Record(
        id=rid,
        user="spcarol",
        job_ids=(job,),
        site=site,
        gpus=gpus,
        opened_at=1000.0,
        started_at=1000.0,
        rates=RATES,
    )
    return close(r, ended_at=1000.0 + seconds, reason="stopped")


class Accounting:
    """A site's accounting: what it knows, and the calls it got."""

    def __init__(self, jobs: dict[str, SacctJob], down: bool = False) -> None:
        self.jobs, self.down, self.calls = jobs, down, []  # type: list[list[str]]

    async def accounting(self, job_ids: list[str], *, since: float | None = None) -> Any:
        self.calls.append(sorted(job_ids))
        if self.down:
            raise SchedulerUnavailable("slurmdbd at paris does not answer")
        return {j: s for j, s in self.jobs.items() if j in job_ids}


def sj(job: str, elapsed: int, gpus: int = 1) -> SacctJob:
    return SacctJob(job, "COMPLETED", elapsed, gpus, "acct", "", "")


def test_each_site_is_checked_with_its_own_accounting_once(tmp_path: Path) -> None:
    site = two_sites(tmp_path, paris=True, julich=True)
    # the same job id 7 at both sites: each record is checked at its own site only
    paris = Accounting({"7": sj("7", 600), "8": sj("8", 60)})
    julich = Accounting({"7": sj("7", 300, gpus=2)})
    records = [
        rec("a", "paris", "7", 600),
        rec("b", "paris", "8", 900),  # paris says 60 s: elapsed differs
        rec("c", "julich", "7", 300, gpus=2),
    ]
    reports = asyncio.run(reconcile_sites(records, site, {"paris": paris, "julich": julich}))
    assert [(r.site, r.country, r.status, r.records) for r in reports] == [
        ("paris", "FR", "ok", 2),
        ("julich", "DE", "ok", 1),
    ]
    assert [(d.record_id, d.what) for d in reports[0].differences] == [("b", "elapsed")]
    assert reports[1].differences == ()
    assert paris.calls == [["7", "8"]] and julich.calls == [["7"]]  # one call per site


def test_a_site_without_accounting_is_reported_not_skipped(tmp_path: Path) -> None:
    site = two_sites(tmp_path, paris=True, julich=False)
    paris, julich = Accounting({"7": sj("7", 600)}), Accounting({})
    records = [rec("a", "paris", "7", 600), rec("c", "julich", "7", 300)]
    reports = asyncio.run(reconcile_sites(records, site, {"paris": paris, "julich": julich}))
    de = reports[1]
    assert (de.site, de.status, de.records) == ("julich", "none", 1)
    assert "no accounting at this site" in de.detail and julich.calls == []

    class Out:
        text = ""

        def write(self, s: str) -> None:
            self.text += s

    out = Out()
    print_site_reports(reports, False, out)
    assert "site paris (FR): 1 record(s) checked with its accounting, agree" in out.text
    assert "site julich (DE): no accounting at this site" in out.text


def test_a_site_that_does_not_answer_is_an_error_for_it_alone(tmp_path: Path) -> None:
    site = two_sites(tmp_path, paris=True, julich=True)
    paris, julich = Accounting({}, down=True), Accounting({"9": sj("9", 100)})
    records = [
        rec("a", "paris", "7", 600),
        rec("c", "julich", "9", 500),
        rec("x", "elsewhere", "3", 1),
    ]
    reports = asyncio.run(reconcile_sites(records, site, {"paris": paris, "julich": julich}))
    assert [(r.site, r.status) for r in reports] == [
        ("paris", "error"),
        ("julich", "ok"),
        ("", "error"),
    ]
    assert "does not answer" in reports[0].detail
    assert [d.what for d in reports[1].differences] == ["elapsed"]
    assert "no declared site" in reports[2].detail


def test_slurmdb_jobs_map_to_the_same_records_as_sacct() -> None:
    body = {
        "jobs": [
            {
                "job_id": 12,
                "account": "proj",
                "state": {"current": "COMPLETED", "reason": "None"},
                "time": {"elapsed": 42, "start": 1700000000, "end": 1700000042},
                "tres": {
                    "allocated": [
                        {"type": "cpu", "name": "", "count": 4},
                        {"type": "gres", "name": "gpu", "count": 2},
                        {"type": "gres", "name": "gpu:h100", "count": 2},
                    ]
                },
            },
            {"job_id": 13, "state": {"current": "CANCELLED by 0"}, "time": {"elapsed": 5}},
            {"job_id": 99, "time": {"elapsed": 1}},  # not asked for
            {"job_id": 20, "array": {"task_id": 3}, "time": {"elapsed": 7}},
            "junk",
        ]
    }
    got = parse_slurmdb_jobs(body, ["12", "13", "20_3"])
    assert set(got) == {"12", "13", "20_3"}
    assert (got["12"].elapsed_s, got["12"].gpus, got["12"].state) == (42, 2, "COMPLETED")
    assert got["13"].state == "CANCELLED" and got["13"].gpus == 0
    assert got["20_3"].elapsed_s == 7
    q = slurmdb_query(1700000000.0)
    assert "skip_steps=true" in q and "start_time=2023-11-14T22%3A12%3A20" in q
