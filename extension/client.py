"""Kernel side: talk to this server's session API and hold session handles.

``PortalClient`` finds the Jupyter server that started this kernel (``$JPY_PARENT_PID``
in the server's runtime files, or ``$SOVEREIGN_PORTAL_API``) and calls its REST API.
Handles stop their session when closed, garbage-collected, or when the kernel exits.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import weakref
from collections.abc import Callable
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, Listener
from pathlib import Path
from typing import Any

import requests

from ..spawners.errors import PortalError as _PortalError
from ..spawners.upstream import listener_socket

TERMINAL = ("stopped", "failed", "expired")


class PortalError(_PortalError, RuntimeError):
    """A refusal or failure, in plain words: the portal's error family as the notebook sees
    it (``.reason`` a label, ``.status`` the HTTP status, ``.field`` the field refused)."""

    default_status = 502
    default_reason = "error"

    def __init__(
        self,
        message: str,
        reason: str = "error",
        *,
        status: int | None = None,
        field: str | None = None,
    ) -> None:
        _PortalError.__init__(self, message, reason=reason, status=status, field=field)


def _server_info() -> tuple[str, str]:
    api = os.environ.get("SOVEREIGN_PORTAL_API")
    token = os.environ.get("SOVEREIGN_PORTAL_TOKEN") or os.environ.get("JUPYTERHUB_API_TOKEN", "")
    if api:
        return api, token
    from jupyter_server.serverapp import list_running_servers

    ppid = os.environ.get("JPY_PARENT_PID", "")
    for info in list_running_servers():
        if str(info.get("pid")) == ppid:
            return info["url"].rstrip("/") + "/sovereign-portal/api/", info.get("token") or token
    raise PortalError(
        "cannot find the Jupyter server of this kernel: set SOVEREIGN_PORTAL_API to "
        "http://<server>/<base_url>/sovereign-portal/api/",
        "no_server",
    )


def _kernel_id() -> str | None:
    try:
        from ipykernel.connect import get_connection_file

        name = Path(get_connection_file()).stem
    except Exception:
        return None
    return name.removeprefix("kernel-") if name.startswith("kernel-") else None


class PortalClient:
    """REST client of ``/sovereign-portal/api/``."""

    def __init__(self, api: str | None = None, token: str | None = None) -> None:
        if api is None:
            api, found = _server_info()
            token = token if token is not None else found
        self.api = api if api.endswith("/") else api + "/"
        self._token = token or ""

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        headers = {"Authorization": f"token {self._token}"} if self._token else {}
        try:
            r = requests.request(method, self.api + path, json=body, headers=headers, timeout=60)
        except requests.RequestException as e:
            raise PortalError(f"the Jupyter server did not answer: {e}", "server") from None
        try:
            data = r.json()
        except ValueError:
            data = None
        if r.status_code >= 400:
            msg = data.get("error") if isinstance(data, dict) else None
            reason = data.get("reason", "http") if isinstance(data, dict) else "http"
            field = data.get("field") if isinstance(data, dict) else None
            raise PortalError(
                str(msg or f"HTTP {r.status_code} from {path}"),
                str(reason),
                status=r.status_code if r.status_code <= 599 else None,
                field=field if isinstance(field, str) else None,
            )
        return data

    def catalog(self) -> dict[str, Any]:
        return dict(self._call("GET", "catalog"))

    def create(self, request: dict[str, Any], kernel_id: str | None = None) -> dict[str, Any]:
        return dict(self._call("POST", "sessions", {"request": request, "kernel_id": kernel_id}))

    def get(self, sid: str, version: int | None = None, wait: float = 0) -> dict[str, Any]:
        """One session; with ``version`` and ``wait``, the server answers as soon as the
        session's version differs from ``version`` (or after ``wait`` seconds)."""
        query = "" if version is None else f"?version={int(version)}&wait={wait:.3f}"
        return dict(self._call("GET", f"sessions/{sid}{query}"))

    def list(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "sessions"))

    def stop(self, sid: str) -> dict[str, Any]:
        return dict(self._call("DELETE", f"sessions/{sid}"))

    def scale(self, sid: str, workers: int) -> dict[str, Any]:
        return dict(self._call("POST", f"sessions/{sid}/scale", {"workers": workers}))

    def wait(
        self,
        sid: str,
        timeout: float = 600,
        on_update: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Wait until the session is ready; raise PortalError if it ends or times out.

        Each request waits on the server for the next change of the session (a long
        poll), so readiness is seen as it happens; a server without that answers at
        once, and then this polls every 0.25 s."""
        end = time.monotonic() + timeout
        last = None
        info = self.get(sid)
        while True:
            if on_update is not None and info["message"] != last:
                on_update(info)
                last = info["message"]
            if info["state"] == "ready":
                return info
            if info["state"] in TERMINAL:
                raise PortalError(f"session {sid} {info['state']}: {info['message']}", "ended")
            left = end - time.monotonic()
            if left <= 0:
                break
            if "version" in info:
                info = self.get(sid, info["version"], min(left, 10.0))
            else:
                time.sleep(min(0.25, left))
                info = self.get(sid)
        raise PortalError(f"session {sid} was not ready after {timeout:.0f} s", "timeout")


def _stop_quietly(client: PortalClient, sid: str) -> None:
    with contextlib.suppress(Exception):  # the server may already be gone at exit
        client.stop(sid)


class SessionHandle:
    """A running session. ``close()`` (or the kernel exiting) releases every job."""

    def __init__(self, portal: PortalClient, info: dict[str, Any]) -> None:
        self.portal, self.info, self.id = portal, info, info["id"]
        self._finalizer = weakref.finalize(self, _stop_quietly, portal, self.id)

    def status(self) -> dict[str, Any]:
        self.info = self.portal.get(self.id)
        return self.info

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> SessionHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id} {self.info.get('state')}>"


class DaskSession(SessionHandle):
    """A Dask session: ``.client`` is a :class:`distributed.Client` over TLS."""

    _client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            from distributed import Client
            from distributed.security import Security

            tls = self.info["tls"]
            sec = Security(
                tls_ca_file=tls["ca_file"],
                tls_client_cert=tls["cert_file"],
                tls_client_key=tls["key_file"],
                require_encryption=True,
            )
            self._client = Client(self.info["scheduler_address"], security=sec, timeout=30)
        return self._client

    def scale(self, workers: int) -> None:
        """Scale to ``workers`` (at most what the grant holds)."""
        self.info = self.portal.scale(self.id, workers)

    def close(self) -> None:
        if self._client is not None:
            try:
                self._client.close()
            finally:
                self._client = None
        super().close()


class RemoteError(RuntimeError):
    """A function raised on one or more ranks; the message holds each rank's traceback."""


class TorchSession(SessionHandle):
    """A torch.distributed session: ``.run(fn, *args)`` runs ``fn`` on every rank and
    returns the results in rank order; output is streamed as ``[rank r] ...``."""

    def __init__(self, client: PortalClient, info: dict[str, Any], timeout: float = 300) -> None:
        super().__init__(client, info)
        self.world_size = int(info["workers_total"])
        self._dir = Path(info["session_dir"])
        self._conns: dict[int, Connection] = {}
        self._jobs = 0
        self.ranks: list[dict[str, Any]] = []
        self.backend = ""
        self._attach(info.get("controller_host") or "127.0.0.1", timeout)

    def _attach(self, host: str, timeout: float) -> None:
        secret = (self._dir / "secret").read_bytes()
        listener = Listener((host, 0), authkey=secret)
        try:
            port = listener.address[1]
            tmp = self._dir / ".controller.json.tmp"
            tmp.write_text(json.dumps({"host": host, "port": port}))
            tmp.replace(self._dir / "controller.json")
            listener_socket(listener).settimeout(timeout)
            while len(self._conns) < self.world_size:
                try:
                    conn = listener.accept()
                except (OSError, EOFError, AuthenticationError) as e:
                    # AuthenticationError is not an OSError: a peer without the session
                    # secret (anyone on the host can connect) must not end the attach.
                    if "timed out" in str(e):
                        raise PortalError(
                            f"only {len(self._conns)} of {self.world_size} ranks connected "
                            f"within {timeout:.0f} s",
                            "timeout",
                        ) from None
                    continue
                kind, info = conn.recv()
                if kind == "hello":
                    self._conns[int(info["rank"])] = conn
                    self.ranks.append(info)
        finally:
            listener.close()
        self.ranks.sort(key=lambda r: r["rank"])
        master = self.ranks[0]
        addr = host if host != "0.0.0.0" else "127.0.0.1"  # noqa: S104
        addr = master.get("host_addr", addr)
        for conn in self._conns.values():
            conn.send(("init", addr, master["master_port"], "auto", timeout))
        for conn in self._conns.values():
            msg = conn.recv()
            self.backend = msg[2]

    def _send(self, what: str, payload: Any) -> list[Any]:
        if not self._conns:
            raise PortalError("this torch session is closed", "closed")
        self._jobs += 1
        job = self._jobs
        for conn in self._conns.values():
            conn.send(("run", job, what, payload))
        return self._collect(job)

    def _collect(self, job: int) -> list[Any]:
        from multiprocessing.connection import wait

        import cloudpickle

        results: dict[int, Any] = {}
        errors: dict[int, str] = {}
        by_conn = {c: r for r, c in self._conns.items()}
        pending: dict[tuple[int, str], str] = {}
        while len(results) + len(errors) < len(self._conns):
            for c in wait(list(by_conn)):
                assert isinstance(c, Connection)
                try:
                    msg = c.recv()
                except EOFError:
                    r = by_conn.pop(c)
                    errors[r] = "the rank's process ended"
                    continue
                if msg[0] == "out":
                    _, _, rank, stream, text = msg
                    buf = pending.get((rank, stream), "") + text
                    *lines, pending[(rank, stream)] = buf.split("\n")
                    out = sys.stderr if stream == "stderr" else sys.stdout
                    for line in lines:
                        out.write(f"[rank {rank}] {line}\n")
                elif msg[0] == "result":
                    results[msg[2]] = cloudpickle.loads(msg[3])
                elif msg[0] == "error":
                    errors[msg[2]] = msg[3]
        for (rank, stream), rest in pending.items():
            if rest:
                (sys.stderr if stream == "stderr" else sys.stdout).write(f"[rank {rank}] {rest}\n")
        if errors:
            detail = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
            raise RemoteError(f"{len(errors)} rank(s) failed:\n{detail}")
        return [results[r] for r in sorted(results)]

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        import cloudpickle

        return self._send("fn", cloudpickle.dumps((fn, args, kwargs)))

    def run_script(self, path: str, *argv: str) -> None:
        self._send("script", (str(Path(path).resolve()), list(argv)))

    def close(self) -> None:
        for conn in self._conns.values():
            try:
                conn.send(("stop",))
                conn.close()
            except OSError:
                pass
        self._conns = {}
        super().close()


def request_session(
    kind: str = "dask",
    *,
    client: PortalClient | None = None,
    timeout: float = 600,
    on_update: Callable[[dict[str, Any]], None] | None = None,
    **request: Any,
) -> DaskSession | TorchSession:
    """Ask for a session and wait until it is ready: ``request_session("dask", gpus=2)``."""
    client = client or PortalClient()
    info = client.create({"kind": kind, **request}, _kernel_id())
    try:
        info = client.wait(info["id"], timeout, on_update)
    except BaseException:
        _stop_quietly(client, info["id"])
        raise
    return handle_for(client, info)


def handle_for(client: PortalClient, info: dict[str, Any]) -> DaskSession | TorchSession:
    if info["kind"] == "dask":
        return DaskSession(client, info)
    return TorchSession(client, info)
