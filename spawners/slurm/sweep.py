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
import logging
from typing import TYPE_CHECKING, Any

from ..upstream import wait_hub_listening

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
