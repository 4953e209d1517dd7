"""`sovereign-portal up`, the README's run command: IdP login → spawn → JupyterLab, Ctrl-C.

It runs the real console script with the egress guard on, on a machine without a GPU.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.support.idp import oidc_login
from tests.support.paths import VENV_BIN, free_port, guarded_env

pytestmark = [pytest.mark.hub, pytest.mark.idp]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead too.
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.split(") ", 1)[1][0] != "Z"


def wait_for(pred, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.2)
    raise TimeoutError(what)


def server_pids_from_db(db: Path) -> list[int]:
    import sqlite3

    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT state FROM spawners").fetchall()
    return [json.loads(r[0])["pid"] for r in rows if r[0] and json.loads(r[0]).get("pid")]


def test_up_login_spawn_jupyterlab_and_ctrl_c(tmp_path: Path) -> None:
    port = free_port()
    state = tmp_path / "state"
    egress = tmp_path / "egress.log"
    out = open(tmp_path / "up.out", "wb")  # noqa: SIM115
    up = subprocess.Popen(
        [str(VENV_BIN / "sovereign-portal"), "up", "--port", str(port), "--state-dir", str(state)],
        env=guarded_env(egress),
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    try:
        info = wait_for(
            lambda: (state / "up.json").exists() and json.loads((state / "up.json").read_text()),
            90,
            "up.json",
        )
        url = info["url"]
        banner = (tmp_path / "up.out").read_text()
        assert f"sovereign-portal is up: {url}" in banner
        assert "alice      pass-alice" in banner
        assert oct((state / "jupyterhub_cookie_secret").stat().st_mode & 0o777) == "0o600"

        # A student signs in at the local IdP and lands on the spawn form.
        login = oidc_login(url, SimpleNamespace(issuer=info["idp"]["issuer"]), "alice")
        s = login.session
        assert login.left_deployment is None
        page = s.get(f"{url}/hub/spawn", timeout=30)
        assert 'value="lab/h100:1g.10gb"' in page.text, page.text[:500]
        r = s.post(
            f"{url}/hub/spawn",
            data={
                "size": "lab/h100:1g.10gb",
                "walltime_minutes": "60",
                "_xsrf": s.cookies["_xsrf"],
            },
            timeout=120,
        )
        assert r.status_code == 200, r.text[:500]
        # Institutional names are scoped by home organisation: alice@uni-a.example.
        assert r.url.endswith("/hub/spawn-pending/alice@uni-a.example"), r.url
        lab = wait_for(
            lambda: (
                (p := s.get(f"{url}/user/alice@uni-a.example/lab", timeout=30)).status_code == 200
                and "JupyterLab" in p.text
                and p
            ),
            120,
            "JupyterLab page",
        )
        # JupyterLab's news feed is off, and so are its prompt and update checks.
        assert '"news": {"disabled": true}' in lab.text
        notif = s.get(
            f"{url}/user/alice@uni-a.example/lab/api/settings/"
            "@jupyterlab/apputils-extension:notification",
            timeout=30,
        )
        assert notif.status_code == 200, notif.text[:300]
        # The shipped overrides.json turns the defaults to "never ask, never fetch".
        props = notif.json()["schema"]["properties"]
        assert props["fetchNews"]["default"] == "false"
        assert props["checkForUpdates"]["default"] is False
        server_pids = server_pids_from_db(state / "jupyterhub.sqlite")
        assert len(server_pids) == 1 and alive(server_pids[0])
        # A second `up` on the same port refuses at once, with the reason.
        again = subprocess.run(
            [
                str(VENV_BIN / "sovereign-portal"),
                "up",
                "--port",
                str(port),
                "--state-dir",
                str(tmp_path / "other"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert again.returncode == 1
        assert f"port {port} on 127.0.0.1 is already in use" in again.stderr

        # Ctrl-C stops the hub, the proxy, the IdP and the server.
        up.send_signal(signal.SIGINT)
        assert up.wait(60) == 0
        for name, pid in info["pids"].items():
            assert not alive(pid), f"{name} (pid {pid}) still running after Ctrl-C"
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0, "proxy still listening"
        assert not [p for p in server_pids if alive(p)]
    finally:
        if up.poll() is None:
            up.kill()
            up.wait(10)
        out.close()
    assert (egress.read_text() if egress.exists() else "") == ""
