"""Budgets into Slurm, the pure part: account names, what the portal wants, the drift and the
sacctmgr argv that fixes it, and each job's --account. The real sacctmgr and slurmdbd are in
tests/hub/test_budget_sync.py."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sovereign_portal.hub.budget_sync import wanted
from sovereign_portal.hub.budgets import Period, make_budget
from sovereign_portal.spawners.slurm.accounting import (
    QOS,
    AccountingError,
    SlurmState,
    Wanted,
    account_name,
    diff,
    gpu_minutes,
    job_account,
    parse_state,
)

pytestmark = pytest.mark.unit

NOW = datetime(2026, 10, 1, tzinfo=UTC)
AUTUMN = Period.make("2026-autumn", "2026-09-01", "2027-02-01")
SPRING = Period.make("2026-spring", "2026-02-01", "2026-08-01")


def test_account_names_are_derived_and_validated() -> None:
    assert account_name("course", "ml101") == "sp-course-ml101"
    assert account_name("project", "x-1") == "sp-project-x-1"
    for kind, ident in [("user", "alice"), ("course", "ML101"), ("course", "a;b"), ("course", "")]:
        with pytest.raises(AccountingError) as e:
            account_name(kind, ident)
        assert e.value.field == "owner"


def test_gpu_minutes_round_down() -> None:
    assert gpu_minutes(1) == 60
    assert gpu_minutes(0.05) == 3
    assert gpu_minutes(0.0166) == 0
    with pytest.raises(AccountingError):
        gpu_minutes(float("nan"))


def test_wanted_current_gpu_hour_budgets_with_members() -> None:
    budgets = [
        make_budget("course:ml101", AUTUMN, "gpu_hours", 2.5),
        make_budget("course:ml101", SPRING, "gpu_hours", 99),  # not now
        make_budget("project:p1", AUTUMN, "eur", 100),  # € is skipped, with a message
        make_budget("user:alice@uni-a.example", AUTUMN, "gpu_hours", 1),  # no account
    ]
    members = {"course-ml101": {"bob", "Not A User"}}
    allowances = {"course:ml101@2026-autumn": {"carol": 1.0}}
    want, notes = wanted(budgets, members, allowances, "sp{username}", now=NOW)
    assert want == [
        Wanted("sp-course-ml101", 150, frozenset({"spbob", "spcarol"}), "course:ml101@2026-autumn")
    ]
    assert any("project:p1@2026-autumn: skipped" in n and "eur" in n for n in notes), notes
    assert any("'Not A User' left out" in n for n in notes), notes


ASSOC = """portal|||normal
portal|spbob||normal
sp-course-ml101||gres/gpu=150|sp-budget
sp-course-ml101|spbob||sp-budget
"""


def test_parse_and_diff() -> None:
    st = parse_state(ASSOC, f"normal|\n{QOS}|NoDecay\n")
    assert st.limits == {"sp-course-ml101": 150} and st.users["sp-course-ml101"] == {"spbob"}
    w = Wanted("sp-course-ml101", 150, frozenset({"spbob"}))
    assert diff([w], st) == []
    w2 = Wanted("sp-course-ml101", 60, frozenset({"spbob", "spcarol"}))
    d = diff([w2], st)
    assert [x.what for x in d] == ["limit", "missing_user"]
    assert d[0].fix == ("modify", "account", "sp-course-ml101", "set", "GrpTRESMins=gres/gpu=60")
    assert d[1].fix == ("add", "user", "spcarol", "Account=sp-course-ml101")
    fresh = diff([w], SlurmState())
    assert [x.what for x in fresh] == ["missing_qos", "missing_account", "missing_user"]
    assert "GrpTRESMins=gres/gpu=150" in fresh[1].fix and f"QOS={QOS}" in fresh[1].fix
    assert diff([], SlurmState()) == []  # no budgets: nothing, not even the QOS


def test_job_account() -> None:
    assert job_account(("course", "ml101"), "portal", None, True) == "sp-course-ml101"
    assert job_account(("user", "alice"), "portal", None, True) == "portal"
    assert job_account(None, "portal", "part-acct", True) == "part-acct"
    assert job_account(None, "", None, False) is None
    with pytest.raises(AccountingError) as e:
        job_account(None, "", None, True)
    assert e.value.field == "default_account"
    with pytest.raises(AccountingError):
        job_account(None, "bad account", None, False)
