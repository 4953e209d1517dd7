"""``sovereign-portal budgets`` through the installed console script, on a real SQLite file.

Bad input exits 2 with the option named and changes nothing; good input is what `list` and
`show` report, as a table and as JSON. Budgets from traitlets config (``BudgetPolicy``)
land in the same database.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from sovereign_portal.hub.budget_store import BudgetPolicy
from sovereign_portal.hub.budgets import BudgetError
from traitlets.config import Config

pytestmark = [pytest.mark.hub, pytest.mark.timeout(300)]

CLI = Path(sys.executable).parent / "sovereign-portal"


def run(db: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CLI), "budgets", *args, "--db", db], capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def db(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'portal.sqlite'}"
    r = run(
        url,
        "set",
        "course:ml101",
        "--period",
        "2026-autumn",
        "--start",
        "2026-09-01",
        "--end",
        "2027-02-01",
        "--gpu-hours",
        "10",
        "--per-student",
        "2",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == "set course:ml101@2026-autumn: 10 GPU-hours, 2 GPU-hours per student\n"
    return url


BAD = [
    (["--gpu-hours", "-5"], "--gpu-hours: amount: must not be negative"),
    (["--gpu-hours", "nan"], "--gpu-hours: amount: must be a number written with the digits 0-9"),
    (["--eur", "inf"], "--eur: amount: must be a number written with the digits 0-9"),
    (["--eur", "\u0662"], "--eur: amount: must be a number written with the digits 0-9"),
    (["--kwh", "1e99"], "--kwh: amount: must be a number written with the digits 0-9"),
    (["--kwh", "20000000"], "--kwh: amount: 2e+07 is over the largest allowed"),
    (["--gpu-hours", "many"], "--gpu-hours: amount: must be a number"),
    (["--gpu-hours", "1", "--eur", "1"], "give exactly one of --gpu-hours, --eur or --kwh"),
    ([], "give exactly one of --gpu-hours, --eur or --kwh"),
    (["--gpu-hours", "20", "--per-student", "25"], "--per-student: per_student: 25 is above"),
    (["--gpu-hours", "1", "--start", "2026-01-01"], "--end: end: give both start and end"),
]


@pytest.mark.parametrize(("extra", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_amounts_exit_2_naming_the_option(db: str, extra: list[str], message: str) -> None:
    before = run(db, "list", "--json").stdout
    r = run(db, "set", "course:ml101", "--period", "2026-autumn", *extra)
    assert r.returncode == 2, r
    assert message in r.stderr, r.stderr
    assert run(db, "list", "--json").stdout == before


@pytest.mark.parametrize(
    ("owner", "period", "message"),
    [
        ("team:ml101", "2026-autumn", "OWNER: owner: kind must be one of user, course, project"),
        ("course:ML 101", "2026-autumn", "OWNER: owner: 'ML 101' is not a valid course id"),
        ("ml101", "2026-autumn", "OWNER: owner: write KIND:ID"),
        ("course:ml101", "2031-spring", "--period: period: unknown period '2031-spring'"),
    ],
)
def test_unknown_owners_and_periods(db: str, owner: str, period: str, message: str) -> None:
    before = run(db, "list", "--json").stdout
    r = run(db, "set", owner, "--period", period, "--gpu-hours", "3")
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert run(db, "list", "--json").stdout == before
    shown = run(db, "show", "course:nope", "--period", "2026-autumn")
    assert shown.returncode == 2 and "OWNER: owner: course:nope has no budget" in shown.stderr


def test_list_and_show(db: str) -> None:
    assert (
        run(db, "set", "project:health", "--period", "2026-autumn", "--eur", "250").returncode == 0
    )
    table = run(db, "list").stdout.splitlines()
    assert table[0].split() == [
        "OWNER",
        "PERIOD",
        "UNIT",
        "AMOUNT",
        "SETTLED",
        "HELD",
        "LEFT",
        "WARN",
    ]
    assert table[1].split() == ["course:ml101", "2026-autumn", "GPU-hours", "10.00", "0.00",
                                "0.00", "10.00"]  # fmt: skip
    assert table[2].split()[:4] == ["project:health", "2026-autumn", "€", "250.00"]
    data = json.loads(run(db, "list", "--json", "--period", "2026-autumn").stdout)
    assert [b["budget"] for b in data["budgets"]] == [
        "course:ml101@2026-autumn",
        "project:health@2026-autumn",
    ]
    shown = json.loads(run(db, "show", "course:ml101", "--period", "2026-autumn", "--json").stdout)
    assert (shown["amount"], shown["per_student"], shown["left"]) == (10.0, 2.0, 10.0)
    assert shown["allowances"] == {} and shown["holds"] == []


def test_budgets_from_traitlets_config(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'portal.sqlite'}"
    c = Config()
    c.PortalDatabase.url = url
    c.BudgetPolicy.periods = {"2026-autumn": {"start": "2026-09-01", "end": "2027-02-01"}}
    c.BudgetPolicy.budgets = [
        {"owner": "course:ml101", "period": "2026-autumn", "unit": "gpu_hours", "amount": 40}
    ]
    BudgetPolicy(config=c).open().store.dispose()
    shown = json.loads(run(url, "show", "course:ml101", "--period", "2026-autumn", "--json").stdout)
    assert shown["amount"] == 40.0
    c.BudgetPolicy.budgets = [
        {"owner": "course:ml101", "period": "2026-autumn", "unit": "gpu_hours", "amount": -1}
    ]
    with pytest.raises(BudgetError, match="amount: must not be negative"):
        BudgetPolicy(config=c).open()
    again = json.loads(run(url, "show", "course:ml101", "--period", "2026-autumn", "--json").stdout)
    assert again["amount"] == 40.0
    with pytest.raises(ValueError, match="warn_at"):
        BudgetPolicy(warn_at=[0.8, 1.5])
