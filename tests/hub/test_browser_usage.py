"""The three usage pages in headless Chromium, on the hub ``configure()`` sets up: alice's
"My usage", ivan's course page (instructor of ml101) and olga's operator page, each after a
real IdP login, each screenshotted (under the test's tmp dir; with SP_REFRESH_DOC_SHOTS=1
also copied to docs/_static/screenshots/ for the docs, so a plain run leaves the committed
pictures alone), with every request checked: none may leave the
deployment (no CDN: the plot is SVG drawn by the hub). The egress guard's log stays empty."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Page, sync_playwright

from tests.support.browser import CHROMIUM, CHROMIUM_ARGS, HostGuard
from tests.support.hub import HubProcess
from tests.support.idp import LocalIdP
from tests.support.ledger_rows import closed_record
from tests.support.portal import portal_stack

pytestmark = [pytest.mark.browser, pytest.mark.idp, pytest.mark.hub]

DOCS_SHOTS = Path(__file__).resolve().parents[2] / "docs" / "_static" / "screenshots"
ALICE, BOB = "alice@uni-a.example", "bob@uni-a.example"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[HubProcess, LocalIdP]]:
    with portal_stack(tmp_path_factory.mktemp("browser-usage")) as (hub, idp):
        db = f"sqlite:///{hub.dir / 'portal.sqlite'}"
        for days, hours in ((1, 2.0), (2, 0.5), (4, 1.5), (6, 3.0), (9, 1.0)):
            closed_record(db, ALICE, hours, owner_type="course", owner="ml101",
                          ended_days_ago=days)  # fmt: skip
        closed_record(db, BOB, 4, ended_days_ago=3, partition="gpu-de", country="DE",
                      site="HPC centre DE")  # fmt: skip
        yield hub, idp
        hub.assert_no_egress()


def login(page: Page, hub: HubProcess, who: str) -> None:
    page.goto(f"{hub.url}/hub/oauth_login")  # straight to the IdP form
    page.wait_for_selector("#username")
    page.fill("#username", who)
    page.fill("#password", f"pass-{who}")
    page.click("#login")
    page.wait_for_url(f"{hub.url}/hub/**")


def test_usage_pages_in_chromium_with_screenshots_and_no_foreign_request(
    stack: tuple[HubProcess, LocalIdP], tmp_path: Path
) -> None:
    hub, idp = stack
    guard = HostGuard(hub.url, idp.issuer)
    shots: list[Path] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            for who, path, shot, check in (
                ("alice", "usage", "usage-my.png", "#sp-usage"),
                ("ivan", "usage/courses/ml101", "usage-course.png", "#sp-usage-course"),
                ("olga", "usage/operator", "usage-operator.png", "#sp-usage-operator"),
            ):
                context = browser.new_context(viewport={"width": 1200, "height": 1100})
                context.route("**/*", guard)
                context.on("request", lambda req: guard.seen.append(req.url))
                page = context.new_page()
                page.set_default_timeout(60_000)
                login(page, hub, who)
                page.goto(f"{hub.url}/hub/{path}")
                page.wait_for_selector(check)
                svg = page.locator("svg.sp-plot")
                assert svg.count() == 1
                assert svg.locator("rect.sp-bar").count() == 30  # one bar per day
                box = svg.bounding_box()
                assert box is not None and box["width"] > 300 and box["height"] > 100
                assert page.locator("nav a", has_text="My usage").count() >= 1  # hub's nav bar
                if who == "alice":
                    assert page.locator(".sp-gpu-hours").inner_text() == "8.00"
                    link = page.locator("#sp-download")
                    assert link.get_attribute("href") == "/hub/usage/export"
                if who == "ivan":
                    assert page.locator("td.sp-user").all_inner_texts() == [ALICE]
                if who == "olga":
                    assert page.locator("td.sp-country").all_inner_texts() == ["DE", "FR"]
                out = tmp_path / shot
                page.screenshot(path=str(out), full_page=True)
                shots.append(out)
                context.close()
        finally:
            browser.close()

    assert guard.foreign == [], f"requests to hosts outside the deployment: {guard.foreign}"
    offsite = [u for u in guard.seen if urlsplit(u).netloc not in guard.own
               and not u.startswith("data:")]  # fmt: skip
    assert offsite == [], offsite
    assert any("/hub/usage/operator" in u for u in guard.seen)
    for out in shots:
        assert out.stat().st_size > 10_000, out  # a real picture, not a blank page
        if os.environ.get("SP_REFRESH_DOC_SHOTS") == "1":
            DOCS_SHOTS.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out, DOCS_SHOTS / out.name)
