"""Compute-session test rig: the hub's portal service and a real Jupyter server.

``PortalServiceThread`` runs :class:`sovereign_portal.hub.service.PortalService` (the real
app: admission, catalog, leases) in a background event loop, with hub authentication
replaced by a token table, for tests that have no JupyterHub. ``JupyterServer`` runs
``jupyter server`` with the sovereign_portal extension as a subprocess under the egress
guard, pointed at that service; stop it by PID. :func:`extension_call` calls the
extension's REST API through pytest-jupyter's ``jp_fetch`` (tests/extension/conftest.py has
that layer's fixtures).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import requests

from .paths import VENV_BIN, free_port, guarded_env


async def extension_call(
    jp_fetch: Any, method: str, *path: str, body: Any = None
) -> tuple[int, Any]:
    """``method /sovereign-portal/api/<path>`` on the in-process server: (status, JSON body).

    ``body`` is sent as JSON (bytes as they are); a body that is not JSON comes back raw.
    """
    kw: dict[str, Any] = {"method": method, "raise_error": False}
    if body is not None:
        kw["body"] = body if isinstance(body, bytes) else json.dumps(body)
    elif method == "POST":
        kw["body"] = ""
    r = await jp_fetch("sovereign-portal", "api", *path, **kw)
    try:
        return r.code, json.loads(r.body) if r.body else None
    except ValueError:
        return r.code, r.body


class PortalServiceThread:
    """The portal service on 127.0.0.1:<free port>, users given as {token: user model}."""

    PREFIX = "/services/sovereign-portal/"

    def __init__(
        self, site_file: str | None, users: dict[str, dict[str, Any]], **config: Any
    ) -> None:
        """``config``: more PortalService traits, e.g. ``session_poll_interval=2.0``."""
        from sovereign_portal.hub.service import PortalService

        self.users = users
        self.service = PortalService(site_file=site_file or "", default_role="student", **config)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}{self.PREFIX}"
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, daemon=True)

    async def _auth(self, token: str) -> dict[str, Any] | None:
        return self.users.get(token)

    def _run(self) -> None:
        from tornado.httpserver import HTTPServer

        asyncio.set_event_loop(self.loop)
        self.service.set_authenticator(self._auth)
        self._server = HTTPServer(self.service.make_app(self.PREFIX))
        self._server.listen(self.port, "127.0.0.1")
        self.loop.run_forever()

    def start(self) -> PortalServiceThread:
        self._thread.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                requests.get(self.url.rstrip("/"), timeout=1)
                return self
            except requests.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("portal service did not start")

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self._server.stop)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


class JupyterServer:
    """``jupyter server`` with the portal extension, as a subprocess."""

    def __init__(self, workdir: Path, service_url: str, hub_token: str, **extra: str) -> None:
        self.dir = workdir
        self.port = free_port()
        self.token = secrets.token_hex(16)
        self.url = f"http://127.0.0.1:{self.port}/"
        self.api = self.url + "sovereign-portal/api/"
        self.egress_log = workdir / "egress.log"
        self.log = workdir / "server.log"
        self.session_root = workdir / "sessions"
        env = guarded_env(self.egress_log)
        env["JUPYTERHUB_API_TOKEN"] = hub_token  # the server's own token, as under the hub
        env["HOME"] = str(workdir)
        env["JUPYTER_RUNTIME_DIR"] = str(workdir / "runtime")
        self.env = env
        self.argv = [
            str(VENV_BIN / "jupyter-server"),
            "--no-browser",
            "--ip=127.0.0.1",
            f"--port={self.port}",
            f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={workdir}",
            f"--PortalExtension.hub_service_url={service_url}",
            f"--PortalExtension.session_root={self.session_root}",
            "--PortalExtension.poll_interval=0.5",
            *(f"--PortalExtension.{k}={v}" for k, v in extra.items()),
        ]
        if os.getuid() == 0:
            self.argv.append("--allow-root")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> JupyterServer:
        self.dir.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv, env=self.env, stdout=log, stderr=log, cwd=self.dir
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jupyter server exited:\n{self.log.read_text()[-3000:]}")
            try:
                r = requests.get(self.api + "sessions", headers=self.headers, timeout=2)
                if r.status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"jupyter server not up:\n{self.log.read_text()[-3000:]}")

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"token {self.token}"}

    def client(self) -> Any:
        from sovereign_portal.extension.client import PortalClient

        return PortalClient(self.api, self.token)

    def stop(self, timeout: float = 30) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def egress(self) -> str:
        return self.egress_log.read_text() if self.egress_log.exists() else ""
