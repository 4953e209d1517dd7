"""The jupyter-server extension application."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from jupyter_server.extension.application import ExtensionApp
from tornado.ioloop import PeriodicCallback
from traitlets import Float, Int, List, Unicode, default

from ..spawners.upstream import server_signal_stop
from .handlers import HANDLERS
from .launchers import LaunchConfig
from .placement import PlacementHandler
from .sessions import HubService, SessionManager
from .status import HANDLERS as STATUS_HANDLERS


class PortalExtension(ExtensionApp):
    """sovereign-portal inside the single-user server: compute sessions and placement."""

    name = "sovereign_portal"

    hub_service_url = Unicode(
        config=True,
        help="""URL of the hub's portal service (ending in /services/<name>/). Default:
        $SOVEREIGN_PORTAL_SERVICE_URL, which the hub sets for each server.""",
    )
    hub_api_token = Unicode(
        config=True,
        help="""Token used to call the portal service: this server's own API token. Default:
        $JUPYTERHUB_API_TOKEN. It is sent only to the service, never logged or passed to jobs.""",
    )
    session_root = Unicode(
        config=True,
        help="""Directory for per-session files (TLS credentials, secrets, logs), one
        subdirectory of mode 0700 per session. On Slurm it must be on a file system the
        compute nodes share (the home directory by default).""",
    )
    job_env = List(
        Unicode(),
        ["PATH", "HOME", "LANG", "PYTHONPATH", "EGRESS_LOG", "SLURM_CONF"],
        config=True,
        help="""Names of environment variables passed to session jobs and processes (an
        allow-list; everything else, including API tokens, stays behind). Names that look
        like secrets (TOKEN, SECRET, PASSWORD, KEY) are refused.""",
    )
    dask_interface = Unicode(
        "",
        config=True,
        help="""Network interface Dask schedulers and Slurm workers listen on (e.g. 'ib0').
        Empty binds the scheduler to callback_host and lets workers choose.""",
    )
    callback_host = Unicode(
        "127.0.0.1",
        config=True,
        help="""Address of this server that session jobs connect back to (the Dask scheduler,
        the torch controller). 127.0.0.1 suits the local box and an emulated cluster; on a
        real cluster set the address of the notebook's node on the cluster network.""",
    )
    memory_per_worker = Unicode(
        "4GiB", config=True, help="Memory limit of each Dask worker, e.g. '16GiB'."
    )
    poll_interval = Float(
        2.0,
        config=True,
        help="""Seconds between checks of all sessions: kernel liveness, walltime, and new
        Slurm job ids to register with the hub's portal service. No check calls the
        scheduler: the service polls Slurm once per interval for every session of every
        user, and this server long-polls it for its own sessions' job state (queue
        position, reason, running, ended) and follows each change at once.""",
    )
    start_timeout = Float(
        600.0,
        config=True,
        help="Seconds a session may take from running jobs to all workers or ranks up.",
    )
    device_source = Unicode(
        "auto",
        config=True,
        help="""Where the sampler reads this server's granted devices: "auto" (a scripted
        source if $SOVEREIGN_PORTAL_DEVICE_SCRIPT names one, else NVML for the devices in
        CUDA_VISIBLE_DEVICES if NVML loads, else none), "nvml", "scripted" or "none".""",
    )
    sample_interval = Float(
        5.0,
        config=True,
        help="""Seconds between two readings of the granted devices (utilisation, memory,
        power, energy counter). NVML reads take well under a millisecond.""",
    )
    report_interval = Float(
        30.0,
        config=True,
        help="""Seconds between two activity reports to the hub's portal service (the
        highest utilisation seen since the last one, the energy counter, busy kernels).
        The culler decides from these reports: keep it well under its warning time.""",
    )
    sample_ring = Int(
        120,
        config=True,
        help="Readings kept in memory (a bounded ring; 120 at 5 s is ten minutes).",
    )
    sbatch = Unicode("sbatch", config=True, help="sbatch command (argv[0]).")
    scancel = Unicode("scancel", config=True, help="scancel command (argv[0]).")

    @default("hub_service_url")
    def _default_service_url(self) -> str:
        return os.environ.get("SOVEREIGN_PORTAL_SERVICE_URL", "")

    @default("hub_api_token")
    def _default_token(self) -> str:
        return os.environ.get("JUPYTERHUB_API_TOKEN", "")

    @default("session_root")
    def _default_root(self) -> str:
        return str(Path.home() / ".sovereign-portal" / "sessions")

    manager: SessionManager

    def initialize_settings(self) -> None:
        root = Path(self.session_root)
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        cfg = LaunchConfig(
            env_names=list(self.job_env),
            interface=self.dask_interface or None,
            host=self.callback_host,
            memory_per_worker=self.memory_per_worker,
            sbatch=self.sbatch,
            scancel=self.scancel,
        )
        hub = HubService(self.hub_service_url, self.hub_api_token)
        self.manager = SessionManager(
            hub,
            root,
            cfg,
            start_timeout=self.start_timeout,
            kernel_alive=self._kernel_alive,
            logger=self.log,
        )
        self.settings["sovereign_portal_sessions"] = self.manager
        self.settings["sovereign_portal_started_at"] = time.time()  # for api/status
        self._start_sampler(hub)
        self._poller = PeriodicCallback(self._poll, self.poll_interval * 1000)
        self._poller.start()
        self._stop_on_sigint()

    def _start_sampler(self, hub: HubService) -> None:
        from ..spawners.telemetry import SESSION_SCRIPT_ENV, NoSource, TelemetryError, source_for
        from .sampler import Sampler, SessionReporter, kernel_counter, service_post

        try:
            source = source_for(self.device_source)
        except TelemetryError as e:
            self.log.error("sovereign-portal: no device telemetry: %s", e)
            source = NoSource()
        self.sampler = Sampler(
            source,
            server=os.environ.get("JUPYTERHUB_SERVER_NAME", ""),
            ring=self.sample_ring,
            kernels=kernel_counter(self.serverapp),
            post=service_post(hub) if self.hub_service_url else None,
            log=self.log,
        )
        self.settings["sovereign_portal_sampler"] = self.sampler
        self.sampler.sample()
        self._sampling = PeriodicCallback(self._sample, self.sample_interval * 1000)
        self._sampling.start()
        self.session_reporter = SessionReporter(
            self.manager,
            self.sampler,
            service_post(hub) if self.hub_service_url else None,
            log=self.log,
        )
        # the samplers in session jobs: their interval, and a scripted source's file
        script = os.environ.get(SESSION_SCRIPT_ENV, "")
        for key, env in (("{user}", "JUPYTERHUB_USER"), ("{server}", "JUPYTERHUB_SERVER_NAME")):
            script = script.replace(key, os.environ.get(env, ""))
        self.manager.job_sampler = (self.sample_interval, script)
        self._reporting = PeriodicCallback(self._report, self.report_interval * 1000)
        self._reporting.start()
        self.log.info("sovereign-portal: device telemetry from %s", source.name)

    def _sample(self) -> None:
        self.sampler.sample()

    async def _report(self) -> None:
        await self.sampler.report()
        try:
            await self.session_reporter.report()
        except Exception:
            self.log.exception("sovereign-portal: reporting sessions' activity failed")

    def _stop_on_sigint(self) -> None:
        """Make SIGINT a clean stop, so stopping the server releases every session.

        JupyterHub's spawners stop a server with SIGINT first. Without a terminal, Jupyter
        Server installs no SIGINT handler and Python's KeyboardInterrupt kills its event
        loop without running any cleanup: sessions (their workers, ranks and Slurm jobs)
        and their device leases would outlive the server. JupyterHub's legacy single-user
        app maps SIGINT to the server's own stop; do the same in extension mode.
        """
        serverapp = self.serverapp
        stop = server_signal_stop(serverapp)
        if (
            stop is None
            or "JUPYTERHUB_API_URL" not in os.environ  # only a server a hub started
            or threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
        ):
            return
        signal.signal(signal.SIGINT, stop)

    def _kernel_alive(self, kernel_id: str) -> bool:
        return self.serverapp is None or kernel_id in self.serverapp.kernel_manager

    async def _poll(self) -> None:
        try:
            await self.manager.poll()
        except Exception:
            self.log.exception("sovereign-portal: session poll failed")

    def initialize_handlers(self) -> None:
        handlers: list[Any] = [(r"/sovereign-portal/api/placement", PlacementHandler)]
        self.handlers.extend(handlers + list(HANDLERS) + list(STATUS_HANDLERS))

    async def stop_extension(self) -> None:
        self._poller.stop()
        self._sampling.stop()
        self._reporting.stop()
        self.sampler.source.close()
        await self.manager.stop_all()
