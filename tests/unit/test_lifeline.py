"""hub/lifeline.py with real processes: the parent-death signal, the getppid watchdog (the
fallback where prctl is not available), and finding a port's holder by PID."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from sovereign_portal.hub import lifeline

pytestmark = pytest.mark.unit

CHILD = textwrap.dedent(
    """
    import logging, os, sys
    from tornado.ioloop import IOLoop
    from sovereign_portal.hub import lifeline
    log = logging.getLogger("t")
    if sys.argv[1] == "prctl":
        lifeline.exit_with_parent(log)
        print(os.getpid(), flush=True)
        import time
        while True:
            time.sleep(1)
    else:  # the watchdog alone, as on a system without prctl
        lifeline._parent_pid = lifeline._START_PPID
        lifeline.watch_parent(log, 0.2)
        print(os.getpid(), flush=True)
        IOLoop.current().start()
        print("stopped", flush=True)
    """
)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("mode", ["prctl", "watchdog"])
def test_a_managed_process_exits_when_its_parent_is_killed(tmp_path: Path, mode: str) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    out = tmp_path / "pid"
    out.write_text("")  # exists before the shell's redirect does: the wait reads, never races
    env = {**os.environ, "JUPYTERHUB_SERVICE_NAME": "sovereign-portal"}
    # the parent: a shell that starts the child and waits, like the hub
    parent = subprocess.Popen(
        ["/bin/sh", "-c", f'"{sys.executable}" "{script}" {mode} > "{out}"; sleep 60'],
        env=env,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not out.read_text().strip():
            time.sleep(0.05)
        child = int(out.read_text().split()[0])
        assert _alive(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and _alive(child):
            time.sleep(0.05)
        assert not _alive(child), f"{mode}: the child outlived its parent"
    finally:
        if parent.poll() is None:
            parent.kill()
        for line in out.read_text().split()[:1]:
            if _alive(int(line)):
                os.kill(int(line), signal.SIGKILL)


def test_unmanaged_processes_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JUPYTERHUB_SERVICE_NAME", raising=False)
    assert not lifeline.managed() and lifeline.exit_with_parent(None) is False
    assert lifeline.watch_parent(None) is None


def test_port_holders_finds_the_listening_pid_and_only_it() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert lifeline.port_holders(port) == [os.getpid()]
        assert not lifeline.is_leftover(os.getpid())  # never ourselves
    assert lifeline.port_holders(port) == []
