"""After every hub start, report and cancel portal jobs that the hub no longer tracks.

JupyterHub has no start-up hook, and it creates spawners only for servers in its
database, so a hub with no running servers would never create one. The sweep therefore
starts from the hub's configuration file, which JupyterHub executes inside the hub process,
on its event loop, at every start::

    from sovereign_portal.spawners.slurm import sweep_on_hub_start
    sweep_on_hub_start()

It waits for the hub to finish starting, through a public route: the hub's own API
address accepts connections. JupyterHub binds it in ``JupyterHub.start()``, after
``initialize()`` has loaded every server in the database (each spawner's ``load_state``
re-tracks its job). Then it waits ``orphan_grace_seconds`` and runs
:meth:`SlurmGPUSpawner.sweep_orphans` in the hub process, where the set of tracked jobs is
exact, including jobs of spawns in flight. (Server state read over REST with
``admin:server_state`` would miss those: JupyterHub stores a spawner's state only after
``start()`` returns, so a sweep outside the hub could cancel a queued job being started.)
Without the call, the first spawner loaded schedules the same sweep (the older, weaker
behaviour). One sweep per hub process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

if TYPE_CHECKING:
    from .spawner import SlurmGPUSpawner

log = logging.getLogger("sovereign_portal.slurm")

#: The sweep of this hub process, once scheduled.
_SWEEP: dict[str, asyncio.Task[None]] = {}


def _hub_app() -> Any:
    from jupyterhub.app import JupyterHub

    return JupyterHub.instance() if JupyterHub.initialized() else None


def schedule_sweep(sweeper: SlurmGPUSpawner) -> asyncio.Task[None] | None:
    """Schedule this process's one sweep (no-op if scheduled already or disabled)."""
    if sweeper.orphan_grace_seconds <= 0 or "sweep" in _SWEEP:
        return None
    task = _SWEEP["sweep"] = asyncio.ensure_future(_sweep_after_start(sweeper))
    return task


async def _accepts(url: str) -> bool:
    """True when the server at ``url`` (http, https or http+unix) accepts a connection."""
    u = urlparse(url)
    try:
        if u.scheme.startswith("http+unix"):
            opened = asyncio.open_unix_connection(unquote(u.netloc))
        else:
            port = u.port or (443 if u.scheme == "https" else 80)
            opened = asyncio.open_connection(u.hostname or "127.0.0.1", port)
        _, writer = await asyncio.wait_for(opened, 2)
    except (OSError, TimeoutError, ValueError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def wait_hub_listening(app: Any, interval: float = 0.2, within: float = 3600) -> bool:
    """Wait until the hub's API address accepts connections: the hub has started.

    JupyterHub binds it only in ``start()``, after ``initialize()`` has created a spawner
    (and called its ``load_state``) for every server in the database. Public attributes
    only (``app.hub.url``). False after ``within`` seconds.
    """
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        hub = getattr(app, "hub", None)
        url = getattr(hub, "url", "")
        if url and await _accepts(url):
            return True
        await asyncio.sleep(interval)
    return False


async def _sweep_after_start(sweeper: SlurmGPUSpawner) -> None:
    app = _hub_app()
    if app is not None and not await wait_hub_listening(app):
        sweeper.log.error("The hub did not start listening within an hour: no orphan sweep")
        return
    await asyncio.sleep(sweeper.orphan_grace_seconds)
    try:
        await sweeper.sweep_orphans()
    except Exception:
        sweeper.log.exception("Sweeping untracked portal jobs failed")


def sweep_on_hub_start() -> bool:
    """Call from jupyterhub_config.py: sweep untracked portal jobs after every hub start.

    Returns False (and does nothing) outside a starting hub, e.g. when the file is read by
    another tool. The sweep uses the configured spawner class (a SlurmGPUSpawner subclass)
    or SlurmGPUSpawner, with the hub's configuration, so ``c.SlurmGPUSpawner.*`` applies.
    """
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return False
    app = _hub_app()
    if app is None:
        return False

    def schedule() -> None:  # runs once the configuration file has been read
        from .spawner import SlurmGPUSpawner

        cls = app.spawner_class
        if not (isinstance(cls, type) and issubclass(cls, SlurmGPUSpawner)):
            cls = SlurmGPUSpawner
        # A spawner without a user: the sweep uses only its scheduler and tag settings.
        schedule_sweep(cls(config=app.config, log=app.log))

    loop.call_soon(schedule)
    return True
