"""The portal's Prometheus figures on the real hub's own ``/hub/metrics`` (``configure()``),
behind ``read:metrics``: scraped without a token, with a token that lacks the scope, and
with one that has it. The figures come from ledger rows written through the real ledger
store and from a compute-session request that the real portal service refuses (a student
asking for torch), counted in the portal database. The egress guard's log stays empty."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
import requests

from tests.support.hub import HubProcess
from tests.support.idp import LocalIdP, oidc_login
from tests.support.ledger_rows import closed_record
from tests.support.portal import portal_stack

pytestmark = [pytest.mark.hub, pytest.mark.idp]

ALICE, OLGA = "alice@uni-a.example", "olga@uni-a.example"
SERVICE = "access:services!service=sovereign-portal"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[HubProcess, LocalIdP]]:
    with portal_stack(tmp_path_factory.mktemp("metrics")) as (hub, idp):
        for login in ("alice", "olga"):  # the users exist, with their roles
            r = oidc_login(hub.url, idp, login)
            assert r.left_deployment is None and r.response.status_code == 200
        yield hub, idp
        hub.assert_no_egress()


def token(hub: HubProcess, user: str, scopes: list[str]) -> str:
    r = hub.api("POST", f"/users/{user}/tokens", json={"scopes": scopes})
    assert r.status_code == 201, r.text
    return str(r.json()["token"])


def scrape(hub: HubProcess, tok: str | None) -> requests.Response:
    headers = {"Authorization": f"token {tok}"} if tok else {}
    return requests.get(f"{hub.url}/hub/metrics", headers=headers, timeout=30)


def value(text: str, name: str, **labels: str) -> float | None:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    m = re.search(rf"^{re.escape(name)}\{{{re.escape(want)}\}} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def test_metrics_need_read_metrics(stack: tuple[HubProcess, LocalIdP]) -> None:
    hub, _ = stack
    r = scrape(hub, None)
    assert r.status_code == 403 and "sovereign_portal" not in r.text
    alice = token(hub, ALICE, [f"read:users!user={ALICE}"])
    r = scrape(hub, alice)
    assert r.status_code == 403 and "read:metrics" in r.text
    assert "sovereign_portal" not in r.text
    # olga (operator: the admin role) may hand read:metrics to a scraper's token
    ok = scrape(hub, token(hub, OLGA, ["read:metrics"]))
    assert ok.status_code == 200, ok.text[:300]
    assert "# TYPE sovereign_portal_gpu_hours gauge" in ok.text
    assert "sovereign_portal_up 1.0" in ok.text
    assert "jupyterhub_" in ok.text  # the hub's own metrics, same endpoint


def test_ledger_figures_open_records_and_refusals_by_partition_and_country(
    stack: tuple[HubProcess, LocalIdP],
) -> None:
    hub, _ = stack
    db = f"sqlite:///{hub.dir / 'portal.sqlite'}"
    scraper = token(hub, OLGA, ["read:metrics"])
    before = scrape(hub, scraper).text
    base = value(before, "sovereign_portal_gpu_hours", partition="lab", country="FR") or 0.0
    closed_record(db, ALICE, 2)
    closed_record(db, ALICE, 0.5)
    closed_record(db, ALICE, 4, partition="gpu-de", country="DE", site="HPC centre DE")
    # a refusal: a student may not start torch sessions (admission 403, reason "role")
    svc = f"{hub.url}/services/sovereign-portal/api/grants"
    req = {"kind": "torch", "partition": "lab", "accelerator": "h100", "gpus": 1, "count": 1,
           "walltime_minutes": 10}  # fmt: skip
    alice = token(hub, ALICE, [SERVICE])
    ref = "sovereign_portal_admission_refusals_total"
    was = value(before, ref, partition="lab", country="FR", reason="role") or 0.0
    for _ in range(2):
        r = requests.post(svc, json=req, headers={"Authorization": f"token {alice}"}, timeout=30)
        assert r.status_code == 403, r.text
        assert r.json()["reason"] == "role"
    # a malformed request (400) is not a refusal
    bad = requests.post(
        svc, json={"kind": "torch", "gpus": "x"}, headers={"Authorization": f"token {alice}"},
        timeout=30,
    )  # fmt: skip
    assert bad.status_code == 400, bad.text

    text = scrape(hub, scraper).text
    got = value(text, "sovereign_portal_gpu_hours", partition="lab", country="FR")
    assert got == pytest.approx(base + 2.5)
    assert value(text, "sovereign_portal_gpu_hours", partition="gpu-de", country="DE") == 4.0
    assert value(text, "sovereign_portal_cost_eur", partition="gpu-de", country="DE") == 8.0
    assert value(text, "sovereign_portal_energy_wh", partition="gpu-de", country="DE") == 4000.0
    assert value(text, ref, partition="lab", country="FR", reason="role") == was + 2
    assert "# TYPE sovereign_portal_admission_refusals_total counter" in text
    assert 'reason="invalid_request"' not in text


def test_open_records_count_a_running_server(stack: tuple[HubProcess, LocalIdP]) -> None:
    hub, _ = stack
    scraper = token(hub, OLGA, ["read:metrics"])
    name = ALICE
    hub.spawn(name, {"slice": "1g.10gb"})
    try:
        text = scrape(hub, scraper).text
        assert value(text, "sovereign_portal_open_records", partition="lab", country="FR") == 1.0
    finally:
        hub.stop_server(name)
    text = scrape(hub, scraper).text
    assert value(text, "sovereign_portal_open_records", partition="lab", country="FR") is None
