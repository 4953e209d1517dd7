"""The browser tests' Chromium resolves no name but ``localhost`` and ``127.0.0.1``.

``page.route`` (the :class:`~tests.support.browser.HostGuard`) sees only what pages ask for;
Chromium's own look-ups bypass it. The launcher's ``--host-resolver-rules`` makes the
resolver itself answer "not found", so a name is never looked up off the machine. Here the
guard lets the names through on purpose, so that the resolver is what stops them.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import sync_playwright

from tests.support.browser import CHROMIUM, CHROMIUM_ARGS, HostGuard

pytestmark = [pytest.mark.browser]

PAGE = b"<!doctype html><title>local</title><p id=ok>served on the loopback</p>"


@contextmanager
def loopback_page() -> Iterator[tuple[int, list[str]]]:
    """A page on 127.0.0.1:<port>; yields the port and the Host header of every request."""
    hosts: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hosts.append(self.headers.get("Host", ""))
            self.send_response(200)
            self.send_header("content-type", "text/html")
            self.send_header("content-length", str(len(PAGE)))
            self.end_headers()
            self.wfile.write(PAGE)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], hosts
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def local_name() -> str:
    """A name other than localhost that this machine's own resolver maps to 127.0.0.1
    (its host name, from /etc/hosts): without the rules Chromium would reach the page."""
    for name in (socket.gethostname(), socket.getfqdn()):
        try:
            if name != "localhost" and socket.gethostbyname(name) == "127.0.0.1":
                return name
        except OSError:
            continue
    raise AssertionError(
        f"neither {socket.gethostname()!r} nor {socket.getfqdn()!r} resolves to 127.0.0.1 "
        "here: the test needs a non-localhost name for the loopback (add it to /etc/hosts)"
    )


def test_chromium_resolves_only_loopback_names() -> None:
    name = local_name()
    with loopback_page() as (port, hosts), sync_playwright() as pw:
        guard = HostGuard(
            f"http://127.0.0.1:{port}",
            f"http://localhost:{port}",
            f"http://{name}:{port}",
            "http://example.com",
        )
        failed: list[tuple[str, str]] = []
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context()
            context.route("**/*", guard)
            page = context.new_page()
            page.set_default_timeout(30_000)
            page.on("requestfailed", lambda r: failed.append((r.url, r.failure or "")))
            for host in ("127.0.0.1", "localhost"):
                resp = page.goto(f"http://{host}:{port}/")
                assert resp is not None and resp.status == 200
                assert page.locator("#ok").inner_text() == "served on the loopback"
            for url in ("http://example.com/", f"http://{name}:{port}/"):
                with pytest.raises(PlaywrightError, match="net::ERR_NAME_NOT_RESOLVED"):
                    page.goto(url)
        finally:
            browser.close()

    assert guard.foreign == [], guard.foreign  # the guard let them through: the resolver said no
    assert "http://example.com/" in guard.seen and f"http://{name}:{port}/" in guard.seen
    assert [u for u, _ in failed] == ["http://example.com/", f"http://{name}:{port}/"]
    assert all("ERR_NAME_NOT_RESOLVED" in why for _, why in failed), failed
    # Only the loopback names reached the page; the host name, resolvable by the system's
    # resolver, never did.
    assert sorted(hosts) == sorted([f"127.0.0.1:{port}", f"localhost:{port}"]), hosts
