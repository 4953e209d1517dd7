"""Headless Debian Chromium for browser tests, and a guard that keeps pages on the deployment.

Launch it with Playwright's ``executable_path=CHROMIUM`` and ``args=CHROMIUM_ARGS``
(never ``playwright install``: nothing is downloaded). Route every request through a
:class:`HostGuard`: requests to the deployment's own hosts go through, any other host is
aborted and recorded, and the test fails on it.

``page.route`` sees only the pages' requests, not Chromium's own look-ups (it resolves
Google hosts despite ``--disable-background-networking``), so the resolver itself answers
"not found" for every name but ``localhost`` and ``127.0.0.1``
(:data:`HOST_RESOLVER_RULES`): no name of the harness's browser is looked up off the machine.

The steps every browser test repeats are written once here: :func:`guarded_chromium` (a fresh
profile, every request through the guard and recorded), :func:`idp_login` (the university's
sign-in form, straight from ``/hub/oauth_login``), :func:`spawn_lab` (pick a size on the
spawn form and wait for JupyterLab) and :func:`server_xsrf` (the single-user server's XSRF
cookie, for calls to its REST routes from the page).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

from playwright.sync_api import BrowserContext, Page, Route, sync_playwright

CHROMIUM = "/usr/bin/chromium"
HOST_RESOLVER_RULES = "MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    f"--host-resolver-rules={HOST_RESOLVER_RULES}",
]


class HostGuard:
    """``context.route("**/*", guard)``: let through only the deployment's own hosts."""

    def __init__(self, *urls: str) -> None:
        self.own = {urlsplit(u).netloc for u in urls}
        self.seen: list[str] = []
        self.foreign: list[str] = []

    def allowed(self, url: str) -> bool:
        return urlsplit(url).scheme in ("data", "blob") or urlsplit(url).netloc in self.own

    def __call__(self, route: Route) -> None:
        url = route.request.url
        self.seen.append(url)
        if self.allowed(url):
            route.continue_()
        else:
            self.foreign.append(url)
            route.abort()


@contextlib.contextmanager
def guarded_chromium(guard: HostGuard, width: int = 1280, height: int = 900) -> Iterator[Page]:
    """A page of a fresh headless Chromium whose every request (and websocket) goes through
    ``guard`` and is recorded in ``guard.seen``; closed on the way out."""
    with (
        tempfile.TemporaryDirectory(prefix="chromium-") as profile,
        sync_playwright() as pw,
    ):
        context = pw.chromium.launch_persistent_context(
            profile,
            executable_path=CHROMIUM,
            args=CHROMIUM_ARGS,
            viewport={"width": width, "height": height},
        )
        try:
            context.route("**/*", guard)
            context.on("request", lambda req: guard.seen.append(req.url))
            page = context.pages[0] if context.pages else context.new_page()
            page.on("websocket", lambda ws: guard.seen.append(ws.url))
            page.set_default_timeout(60_000)
            yield page
        finally:
            context.close()


def idp_login(page: Page, hub_url: str, idp_url: str, who: str, password: str = "") -> None:
    """Sign in as ``who`` at the local IdP's form (password ``pass-<who>`` unless given)."""
    page.goto(f"{hub_url}/hub/oauth_login")
    page.wait_for_selector("#username")
    assert urlsplit(page.url).netloc == urlsplit(idp_url).netloc, page.url
    page.fill("#username", who)
    page.fill("#password", password or f"pass-{who}")
    page.click("#login")


def spawn_lab(page: Page, user: str, size: str, timeout_ms: int = 90_000) -> None:
    """On the spawn form: pick ``size`` (``partition/size``), start, wait for JupyterLab."""
    page.wait_for_selector("#sp-size")
    page.select_option("#sp-size", size)
    page.click("form#spawn_form input[type=submit], form#spawn_form button[type=submit]")
    page.wait_for_url(f"**/user/{user}/lab**", timeout=timeout_ms)
    page.wait_for_selector("#jp-main-dock-panel", timeout=timeout_ms)


def server_xsrf(context: BrowserContext | Any) -> str:
    """The single-user server's ``_xsrf`` cookie (path ``/user/...``)."""
    return str(
        next(
            c["value"]
            for c in context.cookies()
            if c["name"] == "_xsrf" and c["path"].startswith("/user/")
        )
    )
