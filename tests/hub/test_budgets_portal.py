"""Budgets in the real portal: hub + proxy + local IdP + portal service, over HTTP.

The hub is configured by ``hub.portal.configure()`` (tests/support/portal.py). The operator
sets budgets with the real CLI on the portal database in the hub's state directory; users
ask through the real proxy with their own hub tokens; the spawn form and a REST spawn go
through JupyterHub's own spawn path, where configure()'s pre_spawn_hook checks the budget.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.support.hub import HubProcess
from tests.support.idp import LocalIdP, oidc_login
from tests.support.portal import leases, portal_stack

pytestmark = [pytest.mark.hub, pytest.mark.idp, pytest.mark.timeout(300)]

ACCESS = "access:services!service=sovereign-portal"
ALICE, BOB, IVAN = "alice@uni-a.example", "bob@uni-a.example", "ivan@uni-a.example"
PERIOD = "this-term"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[HubProcess, LocalIdP]]:
    with portal_stack(tmp_path_factory.mktemp("budgets")) as (hub, idp):
        for user in ("alice", "bob", "ivan"):  # users and their groups exist after login
            assert oidc_login(hub.url, idp, user).left_deployment is None
        yield hub, idp
        hub.close()
        hub.assert_no_egress()


def cli(hub: HubProcess, *args: str) -> subprocess.CompletedProcess[str]:
    db = f"sqlite:///{hub.dir / 'portal.sqlite'}"
    return subprocess.run(
        [sys.executable, "-m", "sovereign_portal.hub.cli", "budgets", *args, "--db", db],
        capture_output=True,
        text=True,
        timeout=60,
    )


def set_pool(hub: HubProcess, gpu_hours: float, *extra: str) -> None:
    """The course pool for this test alone: earlier tests' settled charges (grants charge
    the seconds their devices were leased) are cleared first, so amounts start exact."""
    with sqlite3.connect(hub.dir / "portal.sqlite") as db:
        db.execute("DELETE FROM budget_charges WHERE state != 'held'")
        db.execute("DELETE FROM budget_totals")  # the running totals of the settled charges
    today = datetime.now(UTC).date()
    r = cli(
        hub,
        "set",
        "course:ml101",
        "--period",
        PERIOD,
        "--start",
        str(today - timedelta(days=1)),
        "--end",
        str(today + timedelta(days=30)),
        "--gpu-hours",
        str(gpu_hours),
        *extra,
    )
    assert r.returncode == 0, r.stderr


def token(hub: HubProcess, user: str) -> str:
    r = hub.api("POST", f"/users/{user}/tokens", json={"scopes": [ACCESS], "note": "budgets"})
    assert r.status_code in (200, 201), r.text
    return str(r.json()["token"])


def service(
    hub: HubProcess, tok: str, method: str, path: str, body: Any = None
) -> requests.Response:
    return requests.request(
        method,
        f"{hub.url}/services/sovereign-portal/api/{path}",
        headers={"Authorization": f"token {tok}"},
        json=body,
        timeout=60,
    )


def budget_refusals(hub: HubProcess) -> float:
    """sovereign_portal_admission_refusals_total for budget refusals on lab (FR), scraped
    from the hub's /hub/metrics with the hub's admin token (it holds read:metrics)."""
    r = requests.get(
        f"{hub.url}/hub/metrics", headers={"Authorization": f"token {hub.token}"}, timeout=30
    )
    assert r.status_code == 200, r.text[:300]
    want = 'sovereign_portal_admission_refusals_total{country="FR",partition="lab",reason="budget"}'
    for line in r.text.splitlines():
        if line.startswith(want + " "):
            return float(line.split()[-1])
    return 0.0


def progress_text(hub: HubProcess, user: str) -> str:
    """The spawn's progress events, to the end (the failure message is the last)."""
    r = hub.api("GET", f"/users/{user}/server/progress", stream=True)
    out = []
    for line in r.iter_lines(decode_unicode=True):
        if line and line.startswith("data:"):
            event = json.loads(line[5:])
            out.append(str(event.get("message", "")))
            if event.get("failed") or event.get("ready"):
                break
    return "\n".join(out)


def left(hub: HubProcess, tok: str) -> float:
    r = service(hub, tok, "GET", "budgets")
    assert r.status_code == 200, r.text
    [b] = r.json()["budgets"]
    assert b["budget"] == f"course:ml101@{PERIOD}"
    return float(b["left"])


def test_twenty_parallel_grants_against_a_budget_for_five_admit_exactly_five(
    stack: tuple[HubProcess, LocalIdP],
) -> None:
    hub, _ = stack
    set_pool(hub, 5.0)  # five 1-GPU hours
    tok = token(hub, ALICE)
    assert left(hub, tok) == 5.0
    barrier = threading.Barrier(20)
    out: list[requests.Response] = []

    def ask() -> None:
        barrier.wait()
        out.append(
            service(hub, tok, "POST", "grants", {"kind": "dask", "gpus": 1, "walltime_minutes": 60})
        )

    threads = [threading.Thread(target=ask) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    granted = [r for r in out if r.status_code == 201]
    refused = [r for r in out if r.status_code == 403]
    assert len(granted) == 5, [(r.status_code, r.text[:200]) for r in out]
    assert len(refused) == 15
    for r in refused:
        body = r.json()
        assert body["reason"] == "budget"
        assert body["error"].startswith(
            "ml101 has 0 GPU-hours left for you; 1 H100 GPU (80 GB) for 60 min needs at most 1"
        ), body
    assert left(hub, tok) == 0.0
    assert len([d for d, owner in leases(hub).items() if ALICE in owner]) == 5
    # the grants end without a session: their holds come back, less the seconds their
    # leased devices were held (each grant's ledger record settles its hold)
    for r in granted:
        assert service(hub, tok, "DELETE", f"grants/{r.json()['id']}").status_code == 204
    assert 4.99 < left(hub, tok) <= 5.0
    shown = cli(hub, "show", "course:ml101", "--period", PERIOD, "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["holds"] == []


def test_shortened_grant_is_told_why(stack: tuple[HubProcess, LocalIdP]) -> None:
    hub, _ = stack
    set_pool(hub, 0.5)
    tok = token(hub, ALICE)
    r = service(hub, tok, "POST", "grants", {"kind": "dask", "gpus": 1, "walltime_minutes": 60})
    assert r.status_code == 403
    assert r.json()["error"] == (
        "ml101 has 0.5 GPU-hours left for you; 1 H100 GPU (80 GB) for 60 min needs at most 1: "
        "ask for at most 30 min, or a smaller size"
    )
    r = service(hub, tok, "POST", "grants", {"kind": "dask", "gpus": 1, "walltime_minutes": 30})
    assert r.status_code == 201, r.text
    assert r.json()["walltime_minutes"] == 30
    assert service(hub, tok, "DELETE", f"grants/{r.json()['id']}").status_code == 204


ALLOWANCE = f"budgets/course/ml101/{PERIOD}/allowances/{ALICE}"
BAD_ALLOWANCES: list[tuple[str, str, str, Any, int, str]] = [
    ("negative", IVAN, ALLOWANCE, {"amount": -1}, 400, "amount"),
    ("nan text", IVAN, ALLOWANCE, {"amount": "nan"}, 400, "amount"),
    ("huge", IVAN, ALLOWANCE, {"amount": 1e308}, 400, "amount"),
    ("above the pool", IVAN, ALLOWANCE, {"amount": 5.5}, 400, "amount"),
    ("extra key", IVAN, ALLOWANCE, {"amount": 1, "unit": "eur"}, 400, "amount"),
    ("not an instructor", BOB, ALLOWANCE, {"amount": 1}, 403, "course"),
    (
        "a course ivan does not teach",
        IVAN,
        f"budgets/course/cv202/{PERIOD}/allowances/{BOB}",
        {"amount": 1},
        403,
        "course",
    ),
    (
        "not a student of the course",
        IVAN,
        f"budgets/course/ml101/{PERIOD}/allowances/{BOB}",
        {"amount": 1},
        404,
        "user",
    ),
    (
        "unknown user",
        IVAN,
        f"budgets/course/ml101/{PERIOD}/allowances/zed@uni-a.example",
        {"amount": 1},
        404,
        "user",
    ),
    (
        "unknown period",
        IVAN,
        f"budgets/course/ml101/2031/allowances/{ALICE}",
        {"amount": 1},
        400,
        "period",
    ),
]


def test_instructor_sets_allowances_and_bad_input_changes_nothing(
    stack: tuple[HubProcess, LocalIdP],
) -> None:
    hub, _ = stack
    set_pool(hub, 5.0)
    ivan, alice = token(hub, IVAN), token(hub, ALICE)
    r = service(hub, ivan, "PUT", ALLOWANCE, {"amount": 2})
    assert r.status_code == 200, r.text
    assert 1.999 < left(hub, alice) <= 2.0  # less what earlier tests' grants held, if any
    before = service(hub, ivan, "GET", f"budgets/course/ml101/{PERIOD}").json()
    assert before["allowances"] == {ALICE: 2.0}
    # a student may not read the course pool
    assert service(hub, alice, "GET", f"budgets/course/ml101/{PERIOD}").status_code == 403
    tokens = {IVAN: ivan, BOB: token(hub, BOB)}
    for label, who, path, body, status, field in BAD_ALLOWANCES:
        r = service(hub, tokens[who], "PUT", path, body)
        assert r.status_code == status, (label, r.status_code, r.text)
        assert r.json().get("field") == field, (label, r.text)
        after = service(hub, ivan, "GET", f"budgets/course/ml101/{PERIOD}").json()
        assert after["allowances"] == before["allowances"], label
        assert after["amount"] == before["amount"], label
    # a NaN literal in the JSON itself is refused by the strict parser
    raw = requests.put(
        f"{hub.url}/services/sovereign-portal/api/{ALLOWANCE}",
        data='{"amount": NaN}',
        headers={"Authorization": f"token {ivan}", "Content-Type": "application/json"},
        timeout=30,
    )
    assert raw.status_code == 400, raw.text
    assert service(hub, ivan, "GET", f"budgets/course/ml101/{PERIOD}").json()["allowances"] == {
        ALICE: 2.0
    }


def test_spawn_form_and_rest_spawn_refused_over_budget_nothing_starts(
    stack: tuple[HubProcess, LocalIdP],
) -> None:
    hub, idp = stack
    set_pool(hub, 5.0)
    ivan = token(hub, IVAN)
    r = service(hub, ivan, "PUT", ALLOWANCE, {"amount": 0.1})
    assert r.status_code == 200, r.text
    want = (
        "ml101 has 0.1 GPU-hours left for you; 1 H100 GPU (80 GB) for 60 min needs at most 1: "
        "ask for at most 6 min, or a smaller size"
    )
    refused_before = budget_refusals(hub)
    login = oidc_login(hub.url, idp, "alice")
    s = login.session
    form = s.get(f"{hub.url}/hub/spawn", timeout=60)
    assert form.status_code == 200
    assert "ml101 has 0.1 GPU-hours left for you" in form.text  # the balance on the form
    r = s.post(
        f"{hub.url}/hub/spawn",
        data={
            "size": "lab/h100x1",
            "walltime_minutes": "60",
            "_xsrf": s.cookies.get("_xsrf", path="/hub/"),
        },
        timeout=120,
    )
    page = r.text.replace("&#39;", "'")
    if want not in page:  # a slow hub shows the pending page: the failure is in the progress
        page = progress_text(hub, ALICE)
    assert want in page, page[:2000]
    # REST spawn, the same check
    rest = hub.api(
        "POST",
        f"/users/{ALICE}/server",
        json={"partition": "lab", "accelerator": "h100", "gpus": 1, "walltime_minutes": 60},
    )
    if rest.status_code != 403:
        Path("/tmp/budget_hub_tail.log").write_text(hub.tail(120))
    assert rest.status_code == 403, (rest.status_code, rest.text)
    assert want in rest.json()["message"]
    # both refused spawns (the form's and the REST one) count on /hub/metrics, by place
    assert budget_refusals(hub) == refused_before + 2, [
        line
        for line in requests.get(
            f"{hub.url}/hub/metrics", headers={"Authorization": f"token {hub.token}"}, timeout=30
        ).text.splitlines()
        if line.startswith("sovereign_portal_")
    ]
    model = hub.api("GET", f"/users/{ALICE}").json()
    assert not model["servers"] or not any(sv.get("ready") for sv in model["servers"].values())
    assert not [d for d, owner in leases(hub).items() if ALICE in owner]
    shown = json.loads(cli(hub, "show", "course:ml101", "--period", PERIOD, "--json").stdout)
    assert shown["holds"] == []
    # within the allowance it starts: a 1g.10gb slice for 30 min needs 0.08 of the 0.1
    ok = hub.api(
        "POST",
        f"/users/{ALICE}/server",
        json={"partition": "lab", "accelerator": "h100", "slice": "1g.10gb",
              "walltime_minutes": 30},
    )  # fmt: skip
    assert ok.status_code in (201, 202), ok.text
    hub.wait_ready(ALICE, timeout=120)
    shown = json.loads(cli(hub, "show", "course:ml101", "--period", PERIOD, "--json").stdout)
    held = shown["holds"]
    assert [h["ref"] for h in held] == [f"server:{ALICE}/"]
    assert hub.api("DELETE", f"/users/{ALICE}/server").status_code in (202, 204)
    # the ledger closes the server's record; the hold settles at what it really used
    alice = token(hub, ALICE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        shown = json.loads(cli(hub, "show", "course:ml101", "--period", PERIOD, "--json").stdout)
        if not shown["holds"]:
            break
        time.sleep(1)
    assert shown["holds"] == [], shown
    used = 0.1 - left(hub, alice)
    # seconds of 1/7 GPU: more than nothing, far less than the 30 min held
    assert 0 < used < 30 / 60 / 7 / 4, used
    assert 0 < shown["settled"] == pytest.approx(used, abs=1e-6)
