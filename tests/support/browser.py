"""Headless Debian Chromium for browser tests, and a guard that keeps pages on the deployment.

Launch it with Playwright's ``executable_path=CHROMIUM`` and ``args=CHROMIUM_ARGS``
(never ``playwright install``: nothing is downloaded). Route every request through a
:class:`HostGuard`: requests to the deployment's own hosts go through, any other host is
aborted and recorded, and the test fails on it.

``page.route`` sees only the pages' requests, not Chromium's own look-ups (it resolves
Google hosts despite ``--disable-background-networking``), so the resolver itself answers
"not found" for every name but ``localhost`` and ``127.0.0.1``
(:data:`HOST_RESOLVER_RULES`): no name of the harness's browser is looked up off the machine.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from playwright.sync_api import Route

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
