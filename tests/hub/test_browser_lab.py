"""The portal inside JupyterLab (the prebuilt front-end extension), in headless Chromium.

IdP login -> spawn a MIG slice -> JupyterLab: the status bar names the granted device
("H100 · MIG 1g.10gb · FR"), the € and GPU-hours so far and the time left, with a tooltip
that says what is estimated. A real Dask session is started through the server's REST API;
the side panel lists it with its state and cost, and its Stop button stops it (its devices
go back to the pool). The culler's idle warning appears as a JupyterLab notification.
Screenshots of each step are written under $TMP. Every request of the browser context is
recorded; one to a host other than the deployment's is aborted and fails the test, and the
hub's and servers' egress log stays empty.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
from playwright.sync_api import Page

from tests.support.browser import HostGuard, guarded_chromium, idp_login, server_xsrf, spawn_lab
from tests.support.hub import HubProcess
from tests.support.idp import LocalIdP
from tests.support.portal import configure_text, leases, wait_portal_service
from tests.support.stack import hub_with_idp

pytestmark = [pytest.mark.browser, pytest.mark.hub, pytest.mark.idp, pytest.mark.timeout(240)]

USER = "carol@uni-a.example"
SHOTS = Path(os.environ.get("TMP", tempfile.gettempdir()))


#: The operator's configure() call, plus two test settings: the harness's admin service may
#: act as the culler on the portal service (set idle notices through its REST route, as the
#: culler does), and servers report their activity every 2 s instead of 30 s.
EXTRA_CONFIG = """
for _svc in c.JupyterHub.services:
    if _svc.get("name") == "sovereign-portal":
        _svc["command"] = [
            *_svc["command"],
            "--PortalService.culler_services=sovereign-portal-culler",
            "--PortalService.culler_services=test-admin",
        ]
c.LocalGPUSpawner.args = ["--PortalExtension.report_interval=2"]
c.Spawner.environment = {{**c.Spawner.environment, "SOVEREIGN_PORTAL_DEVICE_SCRIPT": {script!r}}}
"""
#: The scripted device source the server's sampler reads (this box has no NVML): one device,
#: 37 % busy, drawing 60 W idle and 400 W busy, so its energy counter grows as it runs.
DEVICE_SCRIPT = {
    "time_scale": 1,
    "devices": [{"index": 0, "uuid": "MIG-scripted-0", "idle_w": 60, "busy_w": 400}],
    "phases": [{"seconds": None, "utilization_pct": 37, "memory_used_mib": 1024}],
}


def config_text(hub: HubProcess, idp: LocalIdP) -> str:
    script = hub.dir / "device-script.json"
    script.write_text(json.dumps({**DEVICE_SCRIPT, "start": time.time()}))
    script.chmod(0o644)
    return configure_text(hub, idp) + EXTRA_CONFIG.format(script=str(script))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[HubProcess, LocalIdP]]:
    workdir = tmp_path_factory.mktemp("portal-lab")
    with hub_with_idp(workdir, config_text, check_egress=False) as (hub, idp):
        wait_portal_service(hub)
        yield hub, idp
        hub.close()
        hub.assert_no_egress()


def server_api(page: Page, hub: HubProcess, method: str, path: str, body: Any = None) -> Any:
    """``method /user/<me>/sovereign-portal/api/<path>`` as the browser (cookie + XSRF)."""
    xsrf = server_xsrf(page.context)
    r = page.request.fetch(
        f"{hub.url}/user/{USER}/sovereign-portal/api/{path}",
        method=method,
        data=None if body is None else json.dumps(body),
        headers={"X-XSRFToken": xsrf, "Content-Type": "application/json"},
    )
    assert r.ok, f"{method} {path}: {r.status} {r.text()[:300]}"
    return r.json()


def test_status_bar_panel_and_idle_notice_in_jupyterlab(
    stack: tuple[HubProcess, LocalIdP],
) -> None:
    hub, idp = stack
    guard = HostGuard(hub.url, idp.issuer)
    own, seen, foreign = guard.own, guard.seen, guard.foreign
    shots: list[Path] = []
    with guarded_chromium(guard, 1400, 900) as page:

        def shot(name: str) -> None:
            path = SHOTS / f"lab-{name}.png"
            page.screenshot(path=str(path))
            shots.append(path)

        # Sign in at the university's IdP, spawn a MIG slice of the lab box.
        idp_login(page, hub.url, idp.issuer, "carol")
        spawn_lab(page, USER, "lab/h100:1g.10gb")

        # The status bar: device, € and GPU-hours, energy, utilisation, time left.
        item = page.locator(".sp-status")
        page.wait_for_function(
            "() => document.querySelector('.sp-status')?.textContent.includes('MIG')"
        )
        text = item.inner_text()
        assert text.startswith("H100 · MIG 1g.10gb · FR | "), text
        assert re.search(r"€\d+\.\d\d · \d+\.\d\d GPU-h", text), text
        assert re.search(r"\d+ h \d\d min left|\d+ min left", text), text
        tip = item.get_attribute("title") or ""
        assert "Cost and GPU-hours so far: estimated (rate × elapsed time)" in tip, tip
        assert "on partition lab" in tip and "Walltime ends: 20" in tip, tip
        # utilisation and energy from the sampler's (scripted) device source
        page.wait_for_function(
            "() => document.querySelector('.sp-status')?.textContent.includes('GPU 37 %')"
        )
        text = item.inner_text()
        assert re.search(r" \| \d+\.\d\d? Wh \| GPU 37 % \| ", text), text
        tip = item.get_attribute("title") or ""
        assert "Energy so far: not measured: a scripted test source" in tip, tip
        activity = server_api(page, hub, "GET", "activity")
        assert activity["source"] == "scripted" and activity["devices"], activity
        assert activity["devices"][0]["utilization_pct"] == 37
        assert activity["devices"][0]["energy_wh"] is not None, activity
        status = server_api(page, hub, "GET", "status")
        assert status["device"]["label"] == "H100 · MIG 1g.10gb · FR"
        assert status["eur_per_hour"] > 0 and status["estimated"] is True
        shot("status-bar")

        # A real compute session (Dask on one H100 of the lab box) ...
        session = server_api(
            page,
            hub,
            "POST",
            "sessions",
            {"request": {"kind": "dask", "gpus": 1, "walltime_minutes": 30}},
        )
        sid = session["id"]
        # ... shows in the side panel with its state, its cost so far and Stop.
        page.click(".jp-SideBar [data-id='sovereign-portal-panel']")
        row = page.locator(f".sp-session[data-session-id='{sid}']")
        row.wait_for(timeout=30_000)
        page.wait_for_selector(
            f".sp-session[data-session-id='{sid}'][data-state='ready']", timeout=90_000
        )
        assert "dask · h100x1 · lab" in row.inner_text()
        assert re.search(r"€\d+\.\d\d so far \(estimated\)", row.inner_text())
        panel = page.locator("#sovereign-portal-panel")
        assert "H100 · MIG 1g.10gb · FR" in panel.inner_text()
        link = panel.locator("a.sp-usage-link")
        assert link.evaluate("a => a.href") == f"{hub.url}/hub/usage"
        assert any(o.startswith(f"session:{USER}:") for o in leases(hub).values())
        shot("panel-session")

        row.locator("button.sp-stop").click()
        page.wait_for_selector(
            f".sp-session[data-session-id='{sid}'][data-state='stopped']", timeout=60_000
        )
        assert server_api(page, hub, "GET", f"sessions/{sid}")["state"] == "stopped"
        hub.wait_for(
            lambda: not any(o.startswith("session:") for o in leases(hub).values()),
            30,
            "session devices released",
        )
        assert row.locator("button.sp-stop").count() == 0
        shot("panel-stopped")

        raise_idle_notice(hub, page)
        toast = page.locator(".Toastify__toast", has_text="Idle GPU")
        toast.wait_for(timeout=60_000)
        assert "Idle GPU:" in toast.inner_text()
        shot("idle-notice")
        # Shown once per id: later refreshes do not repeat it.
        page.wait_for_timeout(11_000)
        assert page.locator(".Toastify__toast", has_text="Idle GPU").count() == 1

    assert foreign == [], f"requests to hosts outside the deployment: {foreign}"
    offsite = [u for u in seen if urlsplit(u).netloc not in own and not u.startswith("data:")]
    assert offsite == [], offsite
    assert any("/sovereign-portal/api/status" in u for u in seen)
    assert any("/sovereign-portal/api/notices" in u for u in seen)
    assert any("/sovereign-portal/api/activity" in u for u in seen)
    assert all(p.stat().st_size > 10_000 for p in shots) and len(shots) == 4


def raise_idle_notice(hub: HubProcess, page: Page) -> None:
    """Warn this server as the culler does: ``PUT api/activity/notice`` on the portal
    service, once the server's sampler has reported (a target exists)."""
    body = {
        "source": f"server:{USER}/",
        "notice": {
            "id": "idle-test-1",
            "kind": "idle",
            "level": "warning",
            "message": "your GPU has been idle for 25 minutes; it is given back at 12:00 "
            "unless you use it",
            "deadline": None,
        },
    }
    last = ""
    for _ in range(60):
        r = requests.put(
            f"{hub.url}/services/sovereign-portal/api/activity/notice",
            json=body,
            headers={"Authorization": f"token {hub.token}"},
            timeout=30,
        )
        if r.status_code == 200:
            return
        last = f"{r.status_code} {r.text[:300]}"
        page.wait_for_timeout(1000)
    raise AssertionError(f"the culler's notice route refused: {last}")
