"""Start and stop the local OIDC identity provider (``hub/idp/server.js``, npm ``oidc-provider``).

The IdP plays a university's identity provider for tests and for ``sovereign-portal up``. It binds
127.0.0.1 only. The hub's client secret and the IdP's signing keys are written to 0600 files in the
state directory and handed to node through the environment, never through argv.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SERVER_JS = HERE / "server.js"
USERS_FILE = HERE / "users.json"
DEFAULT_CLIENT_ID = "sovereign-portal"


class IdPError(RuntimeError):
    """The local IdP could not be started or did not answer."""


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (the usual small race applies)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def new_signing_key(kid: str | None = None) -> dict[str, Any]:
    """A fresh RSA-2048 private JWK for RS256 signing."""
    from cryptography.hazmat.primitives.asymmetric import rsa
    from jwt.algorithms import RSAAlgorithm

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk: dict[str, Any] = json.loads(RSAAlgorithm.to_jwk(key))
    jwk.update(kid=kid or f"k-{secrets.token_hex(6)}", use="sig", alg="RS256")
    return jwk


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(path, 0o600)


def sample_users(users_file: Path = USERS_FILE) -> list[dict[str, Any]]:
    """The sample users (login, password, note, claims) of the local IdP."""
    users: list[dict[str, Any]] = json.loads(users_file.read_text())["users"]
    return users


class LocalIdP:
    """A running ``oidc-provider`` process on 127.0.0.1.

    ``redirect_uris`` are the hub callback URLs the IdP accepts (exact match, as in production).
    ``extension`` is the path of an ES module that ``server.js`` loads before it listens (its
    ``IDP_EXTENSION``: extra middleware and routes); none by default.
    """

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        redirect_uris: list[str],
        *,
        port: int | None = None,
        client_id: str = DEFAULT_CLIENT_ID,
        users_file: str | os.PathLike[str] | None = None,
        extension: str | os.PathLike[str] | None = None,
        node: str | None = None,
    ) -> None:
        if not redirect_uris:
            raise IdPError("LocalIdP needs at least one redirect URI (the hub's oauth_callback)")
        self.state_dir = Path(state_dir)
        self.redirect_uris = list(redirect_uris)
        self.port = port or free_port()
        self.client_id = client_id
        self.users_file = Path(users_file) if users_file else USERS_FILE
        self.extension = Path(extension).resolve() if extension else None
        self.node = node or shutil.which("node") or "node"
        self.client_secret_file = self.state_dir / "idp-client-secret"
        self.jwks_file = self.state_dir / "idp-jwks.json"
        self.log_path = self.state_dir / "idp.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def discovery_url(self) -> str:
        return f"{self.issuer}/.well-known/openid-configuration"

    @property
    def client_secret(self) -> str:
        return self.client_secret_file.read_text().strip()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def _prepare(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if not (HERE / "node_modules" / "oidc-provider").is_dir():
            raise IdPError(
                f"oidc-provider is not installed in {HERE}: run scripts/install.sh "
                f"(or `npm install` in {HERE})"
            )
        if not self.client_secret_file.exists():
            _write_private(self.client_secret_file, secrets.token_urlsafe(32))
        if not self.jwks_file.exists():
            _write_private(self.jwks_file, json.dumps({"keys": [new_signing_key()]}))

    def rotate_keys(self) -> str:
        """Put a new signing key first (the old one stays published). Takes effect at restart.

        Returns the new key id.
        """
        keys = json.loads(self.jwks_file.read_text())["keys"]
        key = new_signing_key()
        _write_private(self.jwks_file, json.dumps({"keys": [key, *keys[:1]]}))
        return str(key["kid"])

    def start(self, timeout: float = 30.0) -> LocalIdP:
        if self.proc and self.proc.poll() is None:
            return self
        self._prepare()
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", str(self.state_dir)),
            "NODE_ENV": "production",
            "IDP_PORT": str(self.port),
            "IDP_ISSUER": self.issuer,
            "IDP_CLIENT_ID": self.client_id,
            "IDP_CLIENT_SECRET_FILE": str(self.client_secret_file),
            "IDP_REDIRECT_URIS": " ".join(self.redirect_uris),
            "IDP_JWKS_FILE": str(self.jwks_file),
            "IDP_USERS_FILE": str(self.users_file),
        }
        if self.extension is not None:
            env["IDP_EXTENSION"] = str(self.extension)
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child process
        try:
            self.proc = subprocess.Popen(
                [self.node, str(SERVER_JS)],
                cwd=HERE,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 30.0) -> dict[str, Any]:
        """Poll the discovery document until it answers with our issuer."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise IdPError(
                    f"the IdP exited with code {self.proc.returncode}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(self.discovery_url, timeout=2) as resp:  # noqa: S310
                    doc: dict[str, Any] = json.load(resp)
                if doc.get("issuer") != self.issuer:
                    raise IdPError(f"discovery issuer {doc.get('issuer')!r} != {self.issuer!r}")
                return doc
            except (OSError, urllib.error.URLError, ValueError) as exc:
                last = exc
                time.sleep(0.1)
        self.stop()
        raise IdPError(f"the IdP did not answer within {timeout}s ({last}):\n{self.log_tail()}")

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout: float = 5.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)

    def __enter__(self) -> LocalIdP:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
