"""The hub-managed portal service lives and dies with its hub (issue 9, section 5).

A real JupyterHub and configurable-http-proxy; the service is the real
``python -m sovereign_portal.hub.service`` the hub starts. Processes are found and
checked by PID in /proc, scoped to this test's service port.

- ``kill -9`` of the hub: its service exits at once (parent death), the restarted hub's
  service serves within one interval, and a clean stop leaves no service process;
- a leftover service of an earlier hub holding the port (as the versions before this fix
  left them): the new hub's service stops it and takes the port, without a crash loop.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.support.hub import HubProcess
from tests.support.paths import free_port
from tests.support.portal import local_service_config

pytestmark = [pytest.mark.hub, pytest.mark.timeout(240)]

#: How long the restarted service may take to serve: one JupyterHub service start plus
#: the lifeline's one-second parent check, with room for a loaded test machine.
INTERVAL_S = 15.0


def service_pids(port: int) -> list[int]:
    """Live (not zombie) portal service processes for ``port``."""
    flag = f"--port={port}".encode()
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdecimal():
            continue
        try:
            argv = (p / "cmdline").read_bytes().split(b"\0")
            state = (p / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if b"sovereign_portal.hub.service" in argv and flag in argv and state != "Z":
            out.append(int(p.name))
    return out


def health(port: int) -> bool:
    try:
        r = requests.get(f"http://127.0.0.1:{port}/services/sovereign-portal", timeout=2)
    except requests.ConnectionError:
        return False
    return r.status_code == 200 and r.json().get("ok") is True


def wait_until(pred: object, timeout: float, what: str) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if pred():  # type: ignore[operator]
            return time.monotonic() - start
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubProcess]:
    port = free_port()
    config = local_service_config(port)
    h = HubProcess(tmp_path / "hub", config)
    h.service_port = port  # type: ignore[attr-defined]
    yield h
    h.kill()
    h.close()
    for pid in service_pids(port):  # never leave one behind, even when a test failed
        os.kill(pid, 9)
    h.assert_no_egress()


def test_hub_kill_9_takes_its_service_along_and_a_restart_serves(hub: HubProcess) -> None:
    port: int = hub.service_port  # type: ignore[attr-defined]
    hub.start()
    wait_until(lambda: health(port), 30, "the first service")
    (first,) = service_pids(port)

    hub.kill()  # kill -9: the hub runs no cleanup at all
    wait_until(lambda: not service_pids(port), 5, "the orphaned service to exit")
    assert not Path(f"/proc/{first}").exists() or first not in service_pids(port)

    t0 = time.monotonic()
    hub.start()
    wait_until(lambda: health(port), INTERVAL_S, "the restarted hub's service")
    assert time.monotonic() - t0 < INTERVAL_S + 60  # hub start included
    (second,) = service_pids(port)
    assert second != first
    # no crash loop: the new hub started its service once
    time.sleep(2)
    log = (hub.dir / f"hub-{hub.starts}.log").read_text(errors="replace")
    assert "Service sovereign-portal exited" not in log, log[-3000:]
    assert service_pids(port) == [second]

    hub.stop()  # a clean stop: the hub stops its service, and nothing outlives it
    wait_until(lambda: not service_pids(port), 10, "no service after a clean stop")


def test_a_leftover_service_on_the_port_is_replaced_without_a_crash_loop(
    hub: HubProcess,
) -> None:
    port: int = hub.service_port  # type: ignore[attr-defined]
    # An orphan as the versions before this fix left them: same module, same port, its own
    # session, no hub parent to follow.
    env = {k: v for k, v in hub.env().items() if not k.startswith("JUPYTERHUB_")}
    orphan = subprocess.Popen(
        [sys.executable, "-m", "sovereign_portal.hub.service", f"--port={port}"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_until(lambda: health(port), 30, "the leftover service")
        hub.start()
        wait_until(lambda: orphan.poll() is not None, INTERVAL_S, "the leftover to be stopped")
        wait_until(lambda: health(port), INTERVAL_S, "the new service")
        pids = service_pids(port)
        assert len(pids) == 1 and pids[0] != orphan.pid, pids
        log = (hub.dir / f"hub-{hub.starts}.log").read_text(errors="replace")
        assert "Service sovereign-portal exited" not in log, log[-3000:]
        hub.stop()
        wait_until(lambda: not service_pids(port), 10, "no service after a clean stop")
    finally:
        if orphan.poll() is None:
            orphan.kill()
        orphan.wait(10)
