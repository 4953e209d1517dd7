"""The GPUSessions widget in JupyterLab, in headless Chromium, in the real portal.

IdP login -> spawn form -> JupyterLab -> a notebook -> run ``GPUSessions()`` -> click Start ->
the widget shows the Dask session ready (2 of 2 workers) -> click Stop. The hub is configured by
``hub.portal.configure()``. Every request of the browser context is recorded; one to a host other
than the deployment's (the proxy and the IdP on 127.0.0.1) is aborted and fails the test.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from tests.support.browser import HostGuard, guarded_chromium, idp_login, server_xsrf, spawn_lab
from tests.support.hub import HubProcess
from tests.support.idp import LocalIdP
from tests.support.portal import leases, portal_stack

pytestmark = [pytest.mark.browser, pytest.mark.hub, pytest.mark.idp, pytest.mark.timeout(180)]

USER = "carol@uni-a.example"
CELL = (
    "from sovereign_portal.extension import GPUSessions\n"
    'w = GPUSessions(kind="dask", size_id="h100x2", walltime_minutes=30)\n'
    "w"
)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[HubProcess, LocalIdP]]:
    with portal_stack(tmp_path_factory.mktemp("portal-browser")) as (hub, idp):
        yield hub, idp
        hub.close()
        hub.assert_no_egress()


def notebook(source: str) -> str:
    return json.dumps(
        {
            "cells": [
                {
                    "cell_type": "code",
                    "execution_count": None,
                    "id": "gpu-sessions",
                    "metadata": {},
                    "outputs": [],
                    "source": source,
                }
            ],
            "metadata": {
                "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}
            },
            "nbformat": 4,
            "nbformat_minor": 5,
        }
    )


def test_widget_starts_a_dask_session_in_jupyterlab(
    stack: tuple[HubProcess, LocalIdP],
) -> None:
    hub, idp = stack
    guard = HostGuard(hub.url, idp.issuer)
    own, seen, foreign = guard.own, guard.seen, guard.foreign

    shot = Path(os.environ.get("TMP", tempfile.gettempdir())) / "gpu-sessions-widget.png"
    with guarded_chromium(guard, 1280, 900) as page:
        # The university's sign-in form, then the spawn form built from the catalog.
        idp_login(page, hub.url, idp.issuer, "carol")
        spawn_lab(page, USER, "lab/h100x1")

        # A notebook through the contents API (with the server's XSRF cookie).
        r = page.request.put(
            f"{hub.url}/user/{USER}/api/contents/x.ipynb",
            data=json.dumps(
                {"type": "notebook", "format": "json", "content": json.loads(notebook(CELL))}
            ),
            headers={"X-XSRFToken": server_xsrf(page.context), "Content-Type": "application/json"},
        )
        assert r.status in (200, 201), r.text()
        page.goto(f"{hub.url}/user/{USER}/lab/tree/x.ipynb")
        page.wait_for_selector("#jp-main-dock-panel")
        page.wait_for_selector(".jp-NotebookPanel .jp-Cell .cm-content")
        page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']")

        # Run the cell: the widget renders with its controls. On a loaded 2-core machine
        # the first Shift+Enter can land before the editor has focus; run it again only
        # while the cell has not run at all ("[ ]:"), never while it runs ("[*]:").
        start = page.locator(".jp-OutputArea button.widget-button", has_text="Start").first
        prompt = page.locator(".jp-NotebookPanel .jp-Cell .jp-InputArea-prompt").first
        for attempt in range(3):
            if prompt.inner_text().strip() in ("", "[ ]:"):
                page.click(".jp-NotebookPanel .jp-Cell .cm-content")
                page.keyboard.press("Shift+Enter")
            try:
                start.wait_for(timeout=40_000)
                break
            except PlaywrightTimeout:
                if attempt == 2:
                    page.screenshot(path=str(shot.with_suffix(".failed.png")), full_page=True)
                    raise
        out = page.locator(".jp-OutputArea-output").first
        assert "Dask cluster" in out.inner_text()
        assert "2 × 2 H100 GPUs" not in out.inner_text()  # count 1: one job of two GPUs
        assert "→ 2 workers" in out.inner_text(), out.inner_text()

        # Start a session through the widget: it reports progress, then ready.
        start.click()
        page.wait_for_selector(".jp-OutputArea >> text=2 of 2 workers up", timeout=90_000)
        assert "ready" in out.inner_text()
        page.screenshot(path=str(shot), full_page=True)
        owners = set(leases(hub).values())
        assert USER in owners and any(o.startswith(f"session:{USER}:") for o in owners)

        # Stop: the widget releases every worker and the devices go back to the pool.
        page.locator(".jp-OutputArea button.widget-button", has_text="Stop").first.click()
        page.wait_for_selector(".jp-OutputArea >> text=stopped", timeout=60_000)
        hub.wait_for(
            lambda: not any(o.startswith("session:") for o in leases(hub).values()),
            30,
            "session devices released",
        )

    assert foreign == [], f"requests to hosts outside the deployment: {foreign}"
    offsite = [u for u in seen if urlsplit(u).netloc not in own and not u.startswith("data:")]
    assert offsite == [], offsite
    assert any(u.startswith("ws://") and "/api/kernels/" in u for u in seen)
    assert shot.stat().st_size > 10_000
