"""End to end in headless Chromium: IdP login -> spawn form -> JupyterLab, with no foreign request.

Every request any page of the browser context makes is recorded; one to a host other than the
hub's or the IdP's is aborted and fails the test (a sovereign deployment phones nobody: no CDN,
no news, no update checks).
"""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import sync_playwright

from tests.support.browser import CHROMIUM, CHROMIUM_ARGS, HostGuard
from tests.support.hub import HubProcess
from tests.support.idp import LocalIdP
from tests.support.stack import hub_with_idp, login_config

pytestmark = [pytest.mark.browser, pytest.mark.idp, pytest.mark.hub]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[HubProcess, LocalIdP]]:
    config = login_config('c.LocalGPUSpawner.default_url = "/lab"')
    with hub_with_idp(tmp_path_factory.mktemp("browser-login"), config) as s:
        yield s


def test_idp_login_spawn_jupyterlab_without_foreign_requests(
    stack: tuple[HubProcess, LocalIdP],
) -> None:
    hub, idp = stack
    guard = HostGuard(hub.url, idp.issuer)
    own, seen, foreign = guard.own, guard.seen, guard.foreign

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context()
            context.route("**/*", guard)
            # every request of every page and worker, routed or not, is checked again at the end
            context.on("request", lambda req: seen.append(req.url))
            page = context.new_page()
            page.on("websocket", lambda ws: seen.append(ws.url))
            page.set_default_timeout(60_000)

            page.goto(f"{hub.url}/hub/login")
            # auto_login: straight to the university's sign-in form
            page.wait_for_selector("#username")
            assert urlsplit(page.url).netloc == urlsplit(idp.issuer).netloc
            page.fill("#username", "alice")
            page.fill("#password", "pass-alice")
            page.click("#login")

            # back at the hub, on the spawn form built from the catalog
            page.wait_for_url(f"{hub.url}/hub/**")
            page.wait_for_load_state()
            assert page.locator("#sp-size").count() == 1, (page.url, page.content()[:1500])
            assert page.url.startswith(f"{hub.url}/hub/spawn")
            page.select_option("#sp-size", "lab/h100:1g.10gb")
            page.click("form#spawn_form input[type=submit], form#spawn_form button[type=submit]")

            page.wait_for_url("**/user/alice@uni-a.example/lab**", timeout=90_000)
            page.wait_for_selector("#jp-main-dock-panel", timeout=90_000)
            page.wait_for_selector(".jp-LauncherCard, .jp-NotebookPanel", timeout=60_000)
            page.wait_for_timeout(3000)  # let late requests (news, update checks) happen
        finally:
            browser.close()

    assert foreign == [], f"requests to hosts outside the deployment: {foreign}"
    offsite = [u for u in seen if urlsplit(u).netloc not in own and not u.startswith("data:")]
    assert offsite == [], offsite
    assert any(u.startswith("ws://") for u in seen), "no websocket seen: is JupyterLab up?"
    assert any("/user/alice@uni-a.example/lab" in u for u in seen)
    assert any(u.startswith(idp.issuer) for u in seen)
    model = hub.api("GET", "/users/alice@uni-a.example").json()
    assert model["servers"][""]["ready"]
    assert model["groups"] == ["course-ml101"]
