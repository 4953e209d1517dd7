"""A hub-managed service lives and dies with its hub, and restarts over its own leftovers.

JupyterHub starts a managed service as its child and restarts it when it exits. After a
``kill -9`` of the hub nobody stops that child: it kept its port, the next hub's service
crash-looped on "address in use", and the orphan outlived the next clean stop. So:

- :func:`exit_with_parent` asks Linux to send SIGTERM when the parent dies
  (``prctl(PR_SET_PDEATHSIG)``), and :func:`watch_parent` checks ``os.getppid()`` every
  interval as the fallback (another OS, or a parent that died before the ``prctl``);
- :func:`listen_reclaiming` binds the port and, when it is held by a leftover instance of
  the *same* service run by the same account, stops that leftover (SIGTERM, then SIGKILL)
  and binds again. A port held by anything else is a one-line error naming the holder.

Both apply only to a process started by a hub (``JUPYTERHUB_SERVICE_NAME`` is set); run
by hand, the service is left alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from tornado.ioloop import IOLoop, PeriodicCallback

#: <linux/prctl.h>
PR_SET_PDEATHSIG = 1
#: What marks a process as an instance of the portal service (its ``-m`` module).
SERVICE_MODULE = "sovereign_portal.hub.service"

#: Our parent when this module was imported (early in the service's start-up).
_START_PPID = os.getppid()
_parent_pid: int | None = None


def managed() -> bool:
    """Whether this process was started by a hub as a managed service."""
    return bool(os.environ.get("JUPYTERHUB_SERVICE_NAME"))


def exit_with_parent(log: logging.Logger | Any) -> bool:
    """Arrange to get SIGTERM when the hub (our parent) dies. Returns whether prctl took."""
    global _parent_pid
    if not managed():
        return False
    _parent_pid = _START_PPID
    ok = False
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        ok = libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) == 0
        if not ok:
            log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %s", ctypes.get_errno())
    if os.getppid() != _parent_pid:
        # the hub died before the prctl: nobody would stop us. (A parent of pid 1 is not
        # proof of that: a hub may run as pid 1 in a container. An orphan made before the
        # import is stopped by the next hub's service, see listen_reclaiming.)
        log.warning("The hub that started this service is gone: exiting")
        sys.exit(0)
    return ok


def watch_parent(log: logging.Logger | Any, interval_s: float = 1.0) -> PeriodicCallback | None:
    """Stop the IOLoop when our parent changes (the fallback of :func:`exit_with_parent`)."""
    if not managed() or _parent_pid is None:
        return None
    parent = _parent_pid

    def check() -> None:
        if os.getppid() != parent:
            log.warning("The hub (pid %s) that started this service is gone: exiting", parent)
            IOLoop.current().stop()

    cb = PeriodicCallback(check, interval_s * 1000)
    cb.start()
    return cb


def listen_reclaiming(
    server: Any, port: int, ip: str, log: logging.Logger | Any, timeout_s: float = 10.0
) -> None:
    """``server.listen(port, ip)``; a leftover of this service on the port is stopped first."""
    deadline = time.monotonic() + timeout_s
    stopped: set[int] = set()
    while True:
        try:
            server.listen(port, ip)
            return
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise
            holders = port_holders(port)
            ours = [pid for pid in holders if is_leftover(pid)]
            others = [pid for pid in holders if pid not in ours]
            if others or (not ours and not stopped):
                shown = ", ".join(f"pid {p} ({_cmdline(p)[:80]})" for p in others) or "unknown"
                raise SystemExit(
                    f"port {ip}:{port} is in use by {shown}: stop it or give the service "
                    "another port (service_config(port=...))"
                ) from None
            if time.monotonic() > deadline:
                raise SystemExit(f"port {ip}:{port} is still held by pids {ours}") from None
            for pid in ours:
                if pid not in stopped:
                    log.warning(
                        "Port %s is held by a leftover portal service (pid %s) of an earlier "
                        "hub: stopping it",
                        port,
                        pid,
                    )
                    _stop(pid)
                    stopped.add(pid)
            time.sleep(0.1)


def is_leftover(pid: int) -> bool:
    """Whether ``pid`` is another instance of this service run by this account."""
    if pid == os.getpid():
        return False
    try:
        st = os.stat(f"/proc/{pid}")
    except OSError:
        return False
    return st.st_uid == os.geteuid() and SERVICE_MODULE in _cmdline(pid).split(" ")


def port_holders(port: int) -> list[int]:
    """Pids of processes with a listening TCP socket on ``port`` (Linux ``/proc``)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                listening = len(fields) > 9 and fields[3] == "0A"  # LISTEN
                if listening and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(fields[9])
    if not inodes:
        return []
    wanted = {f"socket:[{i}]" for i in inodes}
    pids: list[int] = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isascii() or not proc.name.isdecimal():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in wanted:
                        pids.append(int(proc.name))
                        break
    return pids


def _cmdline(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline")
            .read_bytes()
            .replace(b"\0", b" ")
            .decode("utf-8", "replace")
        )
    except OSError:
        return "?"


def _stop(pid: int, grace_s: float = 5.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    end = time.monotonic() + grace_s
    while time.monotonic() < end:
        if not Path(f"/proc/{pid}").exists() or _zombie(pid):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


__all__ = ["exit_with_parent", "is_leftover", "listen_reclaiming", "port_holders", "watch_parent"]
