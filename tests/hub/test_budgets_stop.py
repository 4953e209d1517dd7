"""A running server over 100 % of its budget is stopped after the grace, with reason "budget".

Real hub + proxy + IdP + portal service, configured by ``configure()`` plus the operator's
``c.BudgetPolicy.grace_seconds`` and ``check_interval_seconds``. The operator lowers the
course pool below what the running server has used; the hub's budget watch stops it and its
ledger record ends with reason ``budget``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sovereign_portal.hub.ledger_store import LedgerStore
from sovereign_portal.hub.store import PortalStore

from tests.support.hub import HubProcess
from tests.support.idp import LocalIdP, oidc_login
from tests.support.portal import configure_text
from tests.support.stack import hub_with_idp

pytestmark = [pytest.mark.hub, pytest.mark.idp, pytest.mark.timeout(300)]

ALICE = "alice@uni-a.example"
WATCH = "\nc.BudgetPolicy.grace_seconds = 3\nc.BudgetPolicy.check_interval_seconds = 1\n"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[HubProcess, LocalIdP]]:
    with hub_with_idp(
        tmp_path_factory.mktemp("budget-stop"),
        lambda hub, idp: configure_text(hub, idp) + WATCH,
        check_egress=False,
    ) as (hub, idp):
        assert oidc_login(hub.url, idp, "alice").left_deployment is None
        yield hub, idp
        hub.close()
        hub.assert_no_egress()


def budgets(hub: HubProcess, *args: str) -> subprocess.CompletedProcess[str]:
    db = f"sqlite:///{hub.dir / 'portal.sqlite'}"
    r = subprocess.run(
        [sys.executable, "-m", "sovereign_portal.hub.cli", "budgets", *args, "--db", db],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    return r


def test_server_over_budget_is_stopped_after_the_grace(stack: tuple[HubProcess, LocalIdP]) -> None:
    hub, _ = stack
    today = datetime.now(UTC).date()
    span = ["--start", str(today - timedelta(days=1)), "--end", str(today + timedelta(days=9))]
    budgets(hub, "set", "course:ml101", "--period", "now", *span, "--gpu-hours", "5")
    r = hub.api(
        "POST",
        f"/users/{ALICE}/server",
        json={"partition": "lab", "accelerator": "h100", "gpus": 1, "walltime_minutes": 60},
    )
    assert r.status_code in (201, 202), r.text
    hub.wait_ready(ALICE, timeout=120)
    time.sleep(2)  # it uses a little of the budget
    # the operator takes the budget down to what is settled (nothing): it is spent now
    budgets(hub, "set", "course:ml101", "--period", "now", "--gpu-hours", "0")
    t0 = time.monotonic()
    while time.monotonic() - t0 < 90:
        model = hub.api("GET", f"/users/{ALICE}").json()
        if not model["servers"]:
            break
        time.sleep(0.5)
    assert not model["servers"], model
    assert time.monotonic() - t0 >= 2.5  # not before the grace
    store = PortalStore(f"sqlite:///{hub.dir / 'portal.sqlite'}")
    try:
        ledger = LedgerStore(store)
        deadline = time.monotonic() + 30
        rec = None
        while time.monotonic() < deadline:
            recs = [x for x in ledger.chained() if x.source == f"server:{ALICE}/"]
            if recs:
                rec = recs[-1]
                break
            time.sleep(0.5)
        assert rec is not None and rec.end_reason == "budget", rec
        assert (rec.owner_type, rec.owner) == ("course", "ml101")
    finally:
        store.dispose()
    shown = json.loads(budgets(hub, "show", "course:ml101", "--period", "now", "--json").stdout)
    assert shown["holds"] == [] and shown["settled"] > 0
    assert "budget is spent" in shown["banner"]
    assert "Budget course:ml101@now is spent" in hub.log_text()
