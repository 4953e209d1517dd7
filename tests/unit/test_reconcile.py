"""Ledger ↔ sacct reconciliation, as tables: what counts as a difference, and what does not."""

from __future__ import annotations

import pytest
from sovereign_portal.hub.ledger import Rates, Record, close
from sovereign_portal.hub.reconcile import compare
from sovereign_portal.spawners.slurm.sacct import SacctJob, parse_sacct, sacct_argv

pytestmark = pytest.mark.unit

RATES = Rates(gpu_equivalents=1.0, eur_per_hour=2.0, power_w=900.0, carbon_g_per_kwh=50.0)


def rec(seconds: float, *, gpus: int = 1, slice_: str = "", count: int = 1, jobs=("7",)) -> Record:
    r = Record(
        id="r1",
        user="alice",
        gpus=gpus,
        slice=slice_,
        count=count,
        job_ids=tuple(jobs),
        opened_at=1000.0,
        started_at=1000.0,
        rates=RATES,
    )
    return close(r, ended_at=1000.0 + seconds, reason="stopped")


def job(jid: str, elapsed: int, gpus: int) -> SacctJob:
    return SacctJob(jid, "COMPLETED", elapsed, gpus, "portal", "", "")


@pytest.mark.parametrize(
    ("record", "slurm", "whats"),
    [
        (rec(600), {"7": job("7", 600, 1)}, []),
        (rec(600), {"7": job("7", 620, 1)}, []),  # within 30 s + 5 %
        (rec(600), {"7": job("7", 700, 1)}, ["elapsed"]),
        (rec(600), {"7": job("7", 600, 2)}, ["devices"]),
        (rec(600), {}, ["missing"]),
        (rec(60, gpus=0, slice_="1g.10gb", count=1), {"7": job("7", 60, 1)}, []),
        (rec(60, gpus=0, slice_="1g.10gb", count=3), {"7": job("7", 60, 1)}, ["devices"]),
        # A session of two worker jobs: the longest job is the record's time; devices add up.
        (rec(300, gpus=2, jobs=("7", "8")), {"7": job("7", 300, 1), "8": job("8", 290, 1)}, []),
        (rec(300, gpus=2, jobs=("7", "8")), {"7": job("7", 300, 1)}, ["missing"]),
        (rec(5000), {"7": job("7", 100, 1)}, ["elapsed"]),
    ],
)
def test_compare(record: Record, slurm: dict[str, SacctJob], whats: list[str]) -> None:
    assert [d.what for d in compare([record], slurm)] == whats


def test_open_records_and_local_records_are_not_reconciled() -> None:
    open_rec = Record(id="o", user="u", job_ids=("9",), opened_at=1.0, rates=RATES)
    local = rec(60, jobs=())
    assert compare([open_rec, local], {}) == []


def test_parse_sacct_reads_gpus_and_keeps_the_last_allocation() -> None:
    text = (
        "12|COMPLETED|61|billing=1,cpu=1,gres/gpu:h100=2,gres/gpu=2,node=1|portal|a|b\n"
        "13|CANCELLED by 1001|5|cpu=1,node=1|portal|a|b\n"
        "14|REQUEUED|3|gres/gpu=1|p|a|b\n"
        "14|COMPLETED|9|gres/gpu=1|p|a|b\n"
        "garbage line\n"
    )
    jobs = parse_sacct(text)
    assert jobs["12"].gpus == 2 and jobs["12"].elapsed_s == 61
    assert jobs["13"].gpus == 0 and jobs["13"].state == "CANCELLED"
    assert jobs["14"].elapsed_s == 9
    assert set(jobs) == {"12", "13", "14"}


@pytest.mark.parametrize("bad", [["1;rm -rf /"], ["12", "-a"], [], ["١٢"]])
def test_sacct_argv_takes_job_ids_only(bad: list[str]) -> None:
    with pytest.raises(ValueError, match="job_ids"):
        sacct_argv(bad)
