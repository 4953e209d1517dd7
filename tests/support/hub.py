"""HubProcess: a real JupyterHub subprocess behind a real configurable-http-proxy.

Everything binds to 127.0.0.1 on free ports. The hub and every single-user server it
starts run under the egress guard; ``assert_no_egress()`` checks its log. The proxy runs
as a separate process (not the hub's child), so killing the hub leaves routes and
servers in place, as in production. Every process is stopped by PID.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import textwrap
import time
from pathlib import Path
from typing import Any

import requests

from .paths import NODE_BIN, VENV_BIN, free_port, guarded_env, require_tool

BASE_CONFIG = """\
import os
c = get_config()  # noqa
c.JupyterHub.ip = "127.0.0.1"
c.JupyterHub.port = {port}
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = {hub_port}
c.JupyterHub.db_url = "sqlite:///{dir}/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = "{dir}/cookie_secret"
c.JupyterHub.pid_file = "{dir}/hub.pid"
c.JupyterHub.cleanup_servers = False
c.ConfigurableHTTPProxy.should_start = False
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{proxy_api_port}"
c.JupyterHub.services = [{{"name": "test-admin", "api_token": os.environ["SP_TEST_ADMIN_TOKEN"]}}]
c.JupyterHub.load_roles = [{{"name": "admin", "services": ["test-admin"]}}]
c.Spawner.start_timeout = 60
c.Spawner.http_timeout = 60
c.Spawner.poll_interval = {poll_interval}
# The egress guard's log must reach the single-user servers too.
c.Spawner.env_keep = [
    "PATH", "PYTHONPATH", "VIRTUAL_ENV", "LANG", "LC_ALL", "JUPYTERHUB_SINGLEUSER_APP", "EGRESS_LOG"
]
"""


class HubProcess:
    """A JupyterHub + configurable-http-proxy pair for one test module."""

    def __init__(
        self,
        workdir: Path,
        config: str = "",
        env: dict[str, str] | None = None,
        poll_interval: int = 5,
        debug: bool = False,
    ) -> None:
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.hub_port = free_port()
        self.proxy_api_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = secrets.token_hex(24)
        self.proxy_token = secrets.token_hex(24)
        self.egress_log = self.dir / "egress.log"
        self.config_path = self.dir / "jupyterhub_config.py"
        base = BASE_CONFIG.format(
            port=self.port,
            hub_port=self.hub_port,
            proxy_api_port=self.proxy_api_port,
            dir=self.dir,
            poll_interval=poll_interval,
        )
        self.config_path.write_text(base + textwrap.dedent(config))
        self.extra_env = env or {}
        self.debug = debug
        self.hub: subprocess.Popen[bytes] | None = None
        self.proxy: subprocess.Popen[bytes] | None = None
        self.starts = 0

    # -- processes ------------------------------------------------------------------------
    def singleuser_pids(self) -> set[int]:
        """The single-user servers of this hub: their environment names its API port (other
        hubs run on this machine at the same time, in other test workers)."""
        mine = f"127.0.0.1:{self.hub_port}".encode()
        out = set()
        for p in Path("/proc").iterdir():
            if p.name.isdecimal():
                try:
                    if (
                        b"jupyterhub-singleuser" in (p / "cmdline").read_bytes()
                        and mine in (p / "environ").read_bytes()
                    ):
                        out.add(int(p.name))
                except OSError:
                    continue
        return out

    def env(self) -> dict[str, str]:
        env = guarded_env(self.egress_log)
        env.update(self.extra_env)
        env["SP_TEST_ADMIN_TOKEN"] = self.token
        env["CONFIGPROXY_AUTH_TOKEN"] = self.proxy_token
        return env

    def start_proxy(self) -> None:
        chp = require_tool("configurable-http-proxy", NODE_BIN)
        log = open(self.dir / "proxy.log", "ab")  # noqa: SIM115 - closed with the process
        self.proxy = subprocess.Popen(
            [
                chp,
                "--ip=127.0.0.1",
                f"--port={self.port}",
                "--api-ip=127.0.0.1",
                f"--api-port={self.proxy_api_port}",
                f"--default-target=http://127.0.0.1:{self.hub_port}",
                f"--error-target=http://127.0.0.1:{self.hub_port}/hub/error",
            ],
            env=self.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        _wait_port(self.proxy_api_port, 15, self.proxy, self.dir / "proxy.log")

    def start(self, timeout: float = 60) -> HubProcess:
        if self.proxy is None or self.proxy.poll() is not None:
            self.start_proxy()
        self.starts += 1
        log = open(self.dir / f"hub-{self.starts}.log", "ab")  # noqa: SIM115
        cmd = [str(VENV_BIN / "jupyterhub"), "-f", str(self.config_path)]
        if self.debug:
            cmd.append("--debug")
        self.hub = subprocess.Popen(
            cmd,
            cwd=self.dir,
            env=self.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.hub.poll() is not None:
                raise RuntimeError(f"jupyterhub exited with {self.hub.returncode}:\n{self.tail()}")
            try:
                if self.api("GET", "/").status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"jupyterhub not ready in {timeout}s:\n{self.tail()}")

    def stop(self) -> None:
        """Stop the hub (SIGTERM, like Ctrl-C); servers keep running (cleanup_servers=False)."""
        _terminate(self.hub)
        self.hub = None

    def kill(self) -> None:
        """kill -9 the hub: no cleanup at all."""
        if self.hub and self.hub.poll() is None:
            self.hub.send_signal(signal.SIGKILL)
            self.hub.wait(10)
        self.hub = None

    def close(self) -> None:
        """Stop every server through the API, then the hub and the proxy."""
        if self.hub is not None and self.hub.poll() is None:
            try:
                for user in self.api("GET", "/users").json():
                    for name in user.get("servers", {}):
                        path = (
                            f"/users/{user['name']}/servers/{name}"
                            if name
                            else (f"/users/{user['name']}/server")
                        )
                        self.api("DELETE", path)
                self.wait_for(
                    lambda: not any(u.get("servers") for u in self.api("GET", "/users").json()),
                    60,
                    "all servers stopped",
                )
            finally:
                self.stop()
        _terminate(self.proxy)
        self.proxy = None

    # -- API ------------------------------------------------------------------------------
    def api(self, method: str, path: str, token: str | None = None, **kw: Any) -> requests.Response:
        headers = kw.pop("headers", {})
        headers["Authorization"] = f"token {token or self.token}"
        return requests.request(
            method, f"{self.url}/hub/api{path}", headers=headers, timeout=30, **kw
        )

    def server_get(self, user: str, path: str, server: str = "") -> requests.Response:
        """GET a path of a user's server through the proxy, as the admin service."""
        prefix = f"/user/{user}/{server + '/' if server else ''}"
        return requests.get(
            f"{self.url}{prefix}{path.lstrip('/')}",
            headers={"Authorization": f"token {self.token}"},
            timeout=30,
        )

    def ensure_user(self, name: str) -> None:
        r = self.api("POST", f"/users/{name}")
        if r.status_code not in (201, 409):
            raise RuntimeError(f"cannot create user {name}: {r.status_code} {r.text}")

    def spawn(self, user: str, options: Any, timeout: float = 90) -> dict[str, Any]:
        """POST a server with ``options`` and wait until it is ready."""
        self.ensure_user(user)
        r = self.api("POST", f"/users/{user}/server", json=options)
        if r.status_code not in (201, 202):
            raise RuntimeError(f"spawn {user}: {r.status_code} {r.text}")
        return self.wait_ready(user, timeout=timeout)

    def wait_ready(self, user: str, timeout: float = 90) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            model = self.api("GET", f"/users/{user}").json()
            server = model.get("servers", {}).get("")
            if server and server.get("ready"):
                return server
            if not model.get("pending") and not server:
                raise RuntimeError(f"{user}'s server failed to start:\n{self.tail()}")
            return None

        return self.wait_for(ready, timeout, f"{user}'s server ready")

    def stop_server(self, user: str, timeout: float = 60) -> None:
        r = self.api("DELETE", f"/users/{user}/server")
        if r.status_code not in (202, 204):
            raise RuntimeError(f"stop {user}: {r.status_code} {r.text}")
        self.wait_for(
            lambda: not self.api("GET", f"/users/{user}").json().get("servers"),
            timeout,
            f"{user}'s server stopped",
        )

    def wait_for(self, pred: Any, timeout: float, what: str, interval: float = 0.2) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            v = pred()
            if v:
                return v
            time.sleep(interval)
        raise TimeoutError(f"timed out after {timeout}s waiting for {what}\n{self.tail()}")

    # -- logs -----------------------------------------------------------------------------
    def log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.dir.glob("hub-*.log")))

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def assert_no_egress(self) -> None:
        text = self.egress_log.read_text() if self.egress_log.exists() else ""
        assert text == "", f"processes tried to reach outside the deployment:\n{text}"


def _wait_port(port: int, timeout: float, proc: subprocess.Popen[bytes], log: Path) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}:\n{log.read_text()}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"port {port} not open after {timeout}s:\n{log.read_text()}")


def _terminate(proc: subprocess.Popen[bytes] | None, timeout: float = 15) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
