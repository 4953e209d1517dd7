"""Security review of the extension's session API and of what a session exposes on the host.

pytest-jupyter (in-process server) with the real portal service in a thread, as in
``test_sessions_rest.py``. Run in the extension session:

    .venv/bin/pytest -p pytest_jupyter.jupyter_server tests/extension

Covers: XSRF on cookie-authenticated REST calls, bounded input, session ids that cannot walk
the file system, the Dask scheduler's and workers' ports (mutual TLS, no HTTP pages), file
modes of session credentials, and the torch rank channel (no secret in argv or environment;
a peer without the session secret cannot break the attach).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import ssl
import stat
import threading
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client as MPClient
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.support.sessions import extension_call as call

pytestmark = [pytest.mark.extension, pytest.mark.timeout(180)]

TOKEN = "server-token-of-mallorys-target"


@pytest.fixture(scope="module")
def server_token() -> str:
    """This module's server token (the service and ``jp_server_config`` of conftest.py)."""
    return TOKEN


async def ready(jp_fetch: Any, request: dict[str, Any]) -> dict[str, Any]:
    code, info = await call(jp_fetch, "POST", "sessions", body={"request": request})
    assert code == 201, info
    for _ in range(900):
        code, info = await call(jp_fetch, "GET", "sessions", info["id"])
        if info["state"] in ("ready", "failed", "stopped"):
            break
        await asyncio.sleep(0.1)
    assert info["state"] == "ready", info["message"]
    return dict(info)


def manager(jp_serverapp: Any) -> Any:
    return jp_serverapp.web_app.settings["sovereign_portal_sessions"]


async def test_cookie_requests_need_the_xsrf_token(
    jp_fetch: Any, jp_serverapp: Any, jp_http_port: int, jp_base_url: str
) -> None:
    """A logged-in browser's cookie alone cannot create or stop sessions (cross-site)."""
    base = f"http://localhost:{jp_http_port}{jp_base_url}"
    api = base + "sovereign-portal/api/sessions"
    body = {"request": {"kind": "dask", "gpus": 1}}

    def browser() -> tuple[int, int, int, int]:
        s = requests.Session()
        s.get(base + "login", timeout=10)
        xsrf = s.cookies["_xsrf"]
        r = s.post(
            base + "login",
            data={"password": jp_serverapp.identity_provider.token, "_xsrf": xsrf},
            allow_redirects=False,
            timeout=10,
        )
        assert r.status_code == 302, r.text[:300]
        cross_site = {
            "Sec-Fetch-Mode": "no-cors",
            "Sec-Fetch-Site": "cross-site",
            "Origin": "http://evil.example",
            "Referer": "http://evil.example/",
        }
        forged = s.post(api, json=body, headers=cross_site, timeout=10).status_code
        no_origin = s.post(api, json=body, headers={"Sec-Fetch-Mode": "no-cors"}, timeout=10)
        delete = s.delete(api + "/0123456789ab", headers=cross_site, timeout=10).status_code
        # same origin, with the XSRF token: the cookie works (bad body -> the handler's 400)
        ok = s.post(api, data="{", headers={"X-XSRFToken": xsrf}, timeout=10).status_code
        return forged, no_origin.status_code, delete, ok

    forged, no_origin, delete, ok = await asyncio.to_thread(browser)
    assert forged in (403, 404) and no_origin == 403 and delete in (403, 404), (
        forged,
        no_origin,
        delete,
    )
    assert ok == 400
    _, listed = await call(jp_fetch, "GET", "sessions")
    assert listed == []


async def test_unbounded_or_hostile_input_is_4xx_and_starts_nothing(
    jp_fetch: Any, tmp_path: Path
) -> None:
    huge = {"request": {"kind": "dask", "x": "a" * 200_000}}
    assert (await call(jp_fetch, "POST", "sessions", body=huge))[0] == 413
    deep = b"[" * 30_000 + b"]" * 30_000
    assert (await call(jp_fetch, "POST", "sessions", body=deep))[0] == 400
    assert (await call(jp_fetch, "POST", "sessions", "0123456789ab", "scale", body=deep))[0] == 400
    long_kernel = {"request": {"kind": "dask"}, "kernel_id": "k" * 50_000}
    code, err = await call(jp_fetch, "POST", "sessions", body=long_kernel)
    assert code == 400 and len(json.dumps(err)) < 1000
    code, err = await call(jp_fetch, "POST", "sessions", body={"request": {"kind": "d" * 50_000}})
    assert code == 400 and len(json.dumps(err)) < 1000
    for sid in ("..", "../../etc", "0123456789ab/..", "0123456789AB", "0123456789abc"):
        assert (await call(jp_fetch, "GET", "sessions", sid))[0] == 404, sid
        assert (await call(jp_fetch, "DELETE", "sessions", sid))[0] == 404, sid
    _, listed = await call(jp_fetch, "GET", "sessions")
    assert listed == [] and not list((tmp_path / "sessions").iterdir())


def _proc_text(pid: int, name: str) -> str:
    return Path(f"/proc/{pid}/{name}").read_bytes().decode(errors="replace")


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


async def test_dask_ports_need_client_certificates_and_serve_no_pages(
    jp_fetch: Any, jp_serverapp: Any
) -> None:
    info = await ready(jp_fetch, {"kind": "dask", "gpus": 1})
    sdir = Path(info["session_dir"])
    assert _mode(sdir) == 0o700 and _mode(sdir / "secret") == 0o600
    assert all(_mode(sdir / "tls" / f) == 0o600 for f in ("ca.pem", "cert.pem", "key.pem"))
    assert TOKEN not in (sdir / "session.json").read_text()

    sched = manager(jp_serverapp).sessions[info["id"]].launcher.cluster.scheduler
    ports = {s.getsockname()[1] for s in sched.http_server._sockets.values()}
    workers = [ws.services.get("dashboard") for ws in sched.workers.values()]
    assert ports and all(workers), workers
    for ws in sched.workers.values():  # worker processes: no key material or token in ps/env
        argv, environ = _proc_text(ws.pid, "cmdline"), _proc_text(ws.pid, "environ")
        assert "PRIVATE KEY" not in argv + environ and TOKEN not in argv + environ

    def http() -> dict[str, int]:
        got = {}
        for port in [*ports, *workers]:
            for path in ("info/main/workers.html", "json/identity.json", "metrics", "health"):
                got[f"{port}/{path}"] = requests.get(
                    f"http://127.0.0.1:{port}/{path}", timeout=10
                ).status_code
        return got

    got = await asyncio.to_thread(http)
    pages = {k: v for k, v in got.items() if not k.endswith("/health")}
    assert set(pages.values()) == {404}, got
    assert {v for k, v in got.items() if k.endswith("/health")} == {200}, got

    from distributed import Client
    from distributed.comm import connect
    from distributed.security import Security

    addr = info["scheduler_address"]
    with pytest.raises((OSError, TimeoutError)):  # plain TCP to the TLS port
        await connect(addr.replace("tls://", "tcp://"), timeout=2)
    # TLS with the right CA but no client certificate: the scheduler drops the connection.
    ctx = ssl.create_default_context(cafile=info["tls"]["ca_file"])
    ctx.check_hostname = False
    host, port = addr.removeprefix("tls://").rsplit(":", 1)
    answer: bytes | OSError
    try:
        reader, writer = await asyncio.open_connection(host, int(port), ssl=ctx)
        writer.write(b"\x00" * 64)
        answer = await asyncio.wait_for(reader.read(1), 5)
        writer.close()
    except OSError as e:  # ssl.SSLError: certificate required
        answer = e
    assert answer == b"" or isinstance(answer, OSError), answer
    with pytest.raises((OSError, TimeoutError)):  # another session's certificate (another CA)
        await Client(addr, security=Security.temporary(), asynchronous=True, timeout=2)
    code, _ = await call(jp_fetch, "DELETE", "sessions", info["id"])
    assert code == 200


async def test_torch_rank_channel_keeps_its_secret_and_shrugs_off_strangers(
    jp_fetch: Any, jp_serverapp: Any, jp_http_port: int, jp_base_url: str
) -> None:
    from sovereign_portal.extension.client import PortalClient, TorchSession

    info = await ready(jp_fetch, {"kind": "torch", "gpus": 2})
    sdir = Path(info["session_dir"])
    secret = (sdir / "secret").read_bytes().decode()
    launcher = manager(jp_serverapp).sessions[info["id"]].launcher
    for p in launcher.procs:
        argv, environ = _proc_text(p.pid, "cmdline"), _proc_text(p.pid, "environ")
        assert secret not in argv and secret not in environ
        assert TOKEN not in environ and not re.search(r"(^|\0)[A-Z_]*TOKEN[A-Z_]*=", environ)

    stranger: dict[str, Any] = {}

    def intrude() -> None:
        """Anyone on the host may connect to the controller's port: without the secret."""
        path = sdir / "controller.json"
        end = time.monotonic() + 60
        while not path.exists() and time.monotonic() < end:
            time.sleep(0.001)
        ctl = json.loads(path.read_text())
        try:
            MPClient((ctl["host"], ctl["port"]), authkey=os.urandom(32))
        except AuthenticationError as e:
            stranger["refused"] = str(e)
        except Exception as e:
            stranger["other"] = repr(e)

    api = f"http://localhost:{jp_http_port}{jp_base_url}sovereign-portal/api/"
    client = PortalClient(api, jp_serverapp.identity_provider.token)
    t = threading.Thread(target=intrude, daemon=True)
    t.start()
    session = await asyncio.to_thread(TorchSession, client, info, 120)
    t.join(10)
    try:
        assert "refused" in stranger, stranger  # the controller did see and refuse it
        ranks = await asyncio.to_thread(session.run, lambda: __import__("os").getpid())
        assert len(ranks) == 2
    finally:
        await asyncio.to_thread(session.close)


async def test_slurm_dask_job_script_holds_no_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch script dask-jobqueue would submit: certificate paths (0600 files in the 0700
    session directory), never key material or a token; an allow-listed job environment; the
    workers' HTTP servers limited to /health. Nothing is submitted."""
    import dask
    from dask_jobqueue import SLURMCluster
    from sovereign_portal.extension.launchers import QUIET_HTTP, LaunchConfig, SlurmDask

    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", TOKEN)
    sdir = tmp_path / "0123456789ab"
    sdir.mkdir(mode=0o700)
    grant = {
        "scheduler_partition": "gpu",
        "walltime_minutes": 30,
        "devices_per_node": 2,
        "scheduler_args": ["--nodes=1", "--gres=gpu:h100:2", "--partition=gpu", "--time=30"],
        "workers": 2,
        "jobs": 1,
    }
    launcher = SlurmDask(grant, sdir, LaunchConfig(env_names=["PATH", "HOME"]))
    sec = launcher._security()
    with dask.config.set(QUIET_HTTP):
        cluster = await launcher._slurm_cluster(SLURMCluster, 2, sec)
    try:
        script = cluster.job_script()
        assert TOKEN not in script and "PRIVATE KEY" not in script
        assert "--export=ALL" in script  # sbatch runs with the allow-list only
        assert "DASK_DISTRIBUTED__WORKER__HTTP__ROUTES" in script
        keys = re.findall(r"--tls-key (\S+)", script)
        assert keys and all(_mode(Path(k)) == 0o600 and Path(k).parent == sdir for k in keys)
    finally:
        await cluster.close()
