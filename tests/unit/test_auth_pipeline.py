"""The authenticator's contract with oauthenticator: options it cannot honour are refused at
start-up, and it reaches no private upstream name."""

from __future__ import annotations

import ast
import asyncio
import logging
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
from sovereign_portal.hub import auth
from sovereign_portal.hub.auth import (
    InstitutionalAuthenticator,
    LoginRefused,
    LoginUnavailable,
    oidc_nonce,
)
from traitlets.config import Config

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("option", ["manage_groups", "manage_roles"])
def test_managed_groups_and_roles_cannot_be_turned_off(option: str) -> None:
    c = Config()
    c.InstitutionalAuthenticator[option] = False
    with pytest.raises(ValueError, match=f"InstitutionalAuthenticator.{option} must stay True"):
        InstitutionalAuthenticator(config=c)
    assert getattr(InstitutionalAuthenticator(), option) is True


def test_the_portal_allow_rule_counts_as_allow_config(caplog: pytest.LogCaptureFixture) -> None:
    a = InstitutionalAuthenticator(allowed_organisations={"uni-a.example"})
    assert a.any_allow_config
    a.allow_allowed_organisations = False
    a.allowed_users = set()
    assert a.any_allow_config  # allowed_organisations itself is allow config


def test_the_nonce_is_bound_to_the_state_and_the_secret() -> None:
    n = oidc_nonce(b"k" * 32, "state-1")
    assert n == oidc_nonce(b"k" * 32, "state-1") == oidc_nonce("k" * 32, "state-1")
    assert n != oidc_nonce(b"k" * 32, "state-2")
    assert n != oidc_nonce(b"j" * 32, "state-1")
    assert len(n) == 64 and "state" not in n


def _private_upstream_uses(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in (
            "oauthenticator",
            "jupyterhub",
            "tornado",
        ):
            found += [a.name for a in node.names if a.name.startswith("_")]
        # super()._name(...): a private method of a parent class
        if (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and isinstance(node.value, ast.Call)
            and isinstance(node.value.func, ast.Name)
            and node.value.func.id == "super"
        ):
            found.append(f"super().{node.attr}")
    return found


def test_the_authenticator_uses_no_private_upstream_name() -> None:
    source = Path(auth.__file__).read_text()
    assert _private_upstream_uses(ast.parse(source)) == []
    # The check does see such uses:
    bad = "from oauthenticator.oauth2 import _serialize_state\nx = super()._client_secret_default()"
    assert _private_upstream_uses(ast.parse(bad)) == [
        "_serialize_state",
        "super()._client_secret_default",
    ]


def test_client_secret_file_or_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OAUTH_CLIENT_SECRET", "from-env")
    assert InstitutionalAuthenticator().client_secret == "from-env"
    secret = tmp_path / "secret"
    secret.write_text("from-file\n")
    assert InstitutionalAuthenticator(client_secret_file=str(secret)).client_secret == "from-file"
    logging.getLogger(__name__).debug("no secret is logged here")


# --- the IdP failing mid-login: fast inner layer (the real-IdP test is in tests/hub) ------
class _Answer(BaseHTTPRequestHandler):
    status = 500

    def _reply(self) -> None:
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"error": "temporarily_unavailable"}')

    do_GET = do_POST = _reply

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def idp_answering() -> Iterator[Callable[[int], str]]:
    servers: list[ThreadingHTTPServer] = []

    def start(status: int) -> str:
        handler = type("Answer", (_Answer,), {"status": status})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


TOKEN = {"access_token": "at", "token_type": "Bearer", "portal_id_claims": {"sub": "s"}}


@pytest.mark.parametrize(
    ("answer", "status", "label"),
    [(None, 503, "idp_unreachable"), (500, 503, "idp_unreachable"), (503, 503, "idp_unreachable"),
     (401, 403, "idp_refused")],
)  # fmt: skip
def test_userinfo_failing_is_a_page_not_a_500(
    idp_answering: Callable[[int], str], answer: int | None, status: int, label: str
) -> None:
    a = InstitutionalAuthenticator()
    base = _closed_port() if answer is None else idp_answering(answer)
    a.userdata_url = f"{base}/userinfo"
    with pytest.raises(LoginRefused) as info:
        asyncio.run(a.token_to_user(dict(TOKEN)))
    assert (info.value.status_code, info.value.label) == (status, label)
    if status == 503:
        assert isinstance(info.value, LoginUnavailable)
        assert "not reachable. Try again" in info.value.jupyterhub_message


class _Handler:
    settings: ClassVar[dict[str, bytes]] = {"cookie_secret": b"k" * 32}

    def get_state_url(self) -> str:
        return "state"


@pytest.mark.parametrize(
    ("answer", "status", "label"),
    [(None, 503, "idp_unreachable"), (502, 503, "idp_unreachable"), (400, 403, "idp_refused")],
)
def test_token_endpoint_failing_is_a_page_not_a_500(
    idp_answering: Callable[[int], str], answer: int | None, status: int, label: str
) -> None:
    a = InstitutionalAuthenticator()
    base = _closed_port() if answer is None else idp_answering(answer)
    a.token_url = f"{base}/token"
    with pytest.raises(LoginRefused) as info:
        asyncio.run(a.get_token_info(_Handler(), {"code": "c", "grant_type": "authorization_code"}))
    assert (info.value.status_code, info.value.label) == (status, label)


class _Slow(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        import time

        time.sleep(1.5)  # an IdP busy with a class start
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


def test_idp_calls_have_a_pool_of_their_own_so_a_class_start_does_not_queue_them_out() -> None:
    """bench_storm, 100 students at once: on Tornado's shared client (10 at a time for
    the whole hub) an IdP call that waited past its connect timeout in the client's queue
    failed (599), and a third of the class got the 503 page. 30 calls at once to an IdP
    that takes 1.5 s each, with a 1 s connect timeout: every one is answered."""
    server = type("Server", (ThreadingHTTPServer,), {"request_queue_size": 128})(
        ("127.0.0.1", 0), _Slow
    )
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/token"

    async def run() -> list[object]:
        a = InstitutionalAuthenticator(http_request_kwargs={"connect_timeout": 1.0})
        assert a.http_client.max_clients == a.idp_connections == 64
        calls = [a.httpfetch(url, "token", method="GET") for _ in range(30)]
        return await asyncio.gather(*calls, return_exceptions=True)

    try:
        got = asyncio.run(run())
    finally:
        server.shutdown()
    assert got == [{}] * 30, [g for g in got if g != {}][:3]
    c = Config()
    c.InstitutionalAuthenticator.idp_connections = 200

    async def configured() -> int:
        return int(InstitutionalAuthenticator(config=c).http_client.max_clients)

    assert asyncio.run(configured()) == 200
