"""Headless Debian Chromium for browser tests, and a guard that keeps pages on the deployment.

Launch it with Playwright's ``executable_path=CHROMIUM`` and ``args=CHROMIUM_ARGS``
(never ``playwright install``: nothing is downloaded). Route every request through a
:class:`HostGuard`: requests to the deployment's own hosts go through, any other host is
aborted and recorded, and the test fails on it.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from playwright.sync_api import Route

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
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
