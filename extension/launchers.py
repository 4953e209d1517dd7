"""Launchers: turn a Grant into running Dask workers or torch ranks, and release them.

One small class per (kind, backend). Each writes only into its session directory
(mode 0700), passes no secret through argv, environment or job script, and builds every
command as an argv list. Job environments are an allow-list: ``sbatch`` runs in an
environment made of the allow-listed names only (:func:`job_env`) and passes exactly that
on (``--export=ALL``). ``--export=NAME,...`` or ``NONE`` would make slurmd load the user's
login environment before the job starts (0.1-1.5 s per job on the test cluster, and
variables the portal did not choose). Jobs are submitted and cancelled through the one
scheduler client (:class:`~sovereign_portal.spawners.slurm.client.SlurmCLI`); their state
comes from the hub's portal service, which polls once for every session (see
:mod:`.sessions`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shlex
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sovereign_portal.spawners.slurm.client import SchedulerClient, SlurmCLI
from sovereign_portal.spawners.upstream import dask_correct_state

FORBIDDEN_ENV = ("TOKEN", "SECRET", "PASSWORD", "KEY")
#: A Dask worker's session directory, where its device sampler writes (:mod:`.job_sampler`).
SESSION_DIR_ENV = "SOVEREIGN_PORTAL_SESSION_DIR"

#: Dask's HTTP servers take no credentials: anyone who can reach the port could read worker
#: logs, call stacks and task names (``/info``, ``/json``, ``/metrics``) or, with
#: jupyter-server-proxy installed, use ``/proxy`` as an open proxy. Sessions serve only
#: ``/health``; the client and the workers talk to the scheduler over mutual TLS.
HTTP_ROUTES = ["distributed.http.health"]
QUIET_HTTP = {
    "distributed.scheduler.http.routes": HTTP_ROUTES,
    "distributed.worker.http.routes": HTTP_ROUTES,
}


def safe_env_names(names: list[str]) -> list[str]:
    """The names of ``names`` that are set here and cannot carry a secret."""
    out = []
    for n in names:
        if any(bad in n.upper() for bad in FORBIDDEN_ENV):
            raise ValueError(f"{n} looks like a secret: it may not be passed to jobs")
        if n in os.environ:
            out.append(n)
    return out


def job_env(names: list[str]) -> dict[str, str]:
    """The whole environment of ``sbatch`` and so of the job: the allow-listed names."""
    return {n: os.environ[n] for n in safe_env_names(names)}


def _minutes_hms(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}:00"


@dataclass
class LaunchConfig:
    """What launchers need from the extension's configuration."""

    env_names: list[str] = field(default_factory=lambda: ["PATH", "HOME", "LANG"])
    interface: str | None = None
    host: str = "127.0.0.1"
    memory_per_worker: str = "2GiB"
    sbatch: str = "sbatch"
    scancel: str = "scancel"
    python: str = sys.executable

    def scheduler(self) -> SchedulerClient:
        """The scheduler client that submits and cancels this server's session jobs."""
        return SlurmCLI(sbatch=self.sbatch, scancel=self.scancel)


class Launcher:
    """Start and stop the processes of one session. Subclasses are mostly data."""

    kind = ""
    backend = ""
    #: Called (in the event loop) when workers or ranks come or go, so the session's state
    #: follows at once instead of at the next poll.
    on_change: Callable[[], None] | None = None

    def __init__(self, grant: dict[str, Any], sdir: Path, cfg: LaunchConfig) -> None:
        self.grant, self.dir, self.cfg = grant, sdir, cfg
        self.sid = sdir.name

    @property
    def total(self) -> int:
        return int(self.grant["workers"])

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    def up(self) -> int:
        """How many workers or ranks are up now."""
        raise NotImplementedError

    def job_ids(self) -> list[str]:
        return []

    def info(self) -> dict[str, Any]:
        return {}

    def local_alive(self) -> bool | None:
        """Whether local processes still run (``None`` for scheduler jobs)."""
        return None


# -- Dask ------------------------------------------------------------------------------------
class _DaskLauncher(Launcher):
    kind = "dask"
    cluster: Any = None

    def _security(self) -> Any:
        from distributed.security import Security

        sec = Security.temporary()
        tls = self.dir / "tls"
        tls.mkdir(mode=0o700, exist_ok=True)
        for name, value in (
            ("ca.pem", sec.tls_ca_file),
            ("cert.pem", sec.tls_client_cert),
            ("key.pem", sec.tls_client_key),
        ):
            p = tls / name
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(value)
        return sec

    def up(self) -> int:
        if self.cluster is None or self.cluster.scheduler is None:
            return 0
        return len(self.cluster.scheduler.workers)

    def _watch_workers(self) -> None:
        """Wake the session manager when a worker joins or leaves the (in-process)
        scheduler."""
        from distributed.diagnostics.plugin import SchedulerPlugin

        wake = self.on_change
        scheduler = getattr(self.cluster, "scheduler", None)
        if wake is None or scheduler is None:
            return
        notify: Callable[[], None] = wake

        class _Wake(SchedulerPlugin):
            name = "sovereign-portal-wake"

            def add_worker(self, *args: Any, **kwargs: Any) -> None:
                notify()

            def remove_worker(self, *args: Any, **kwargs: Any) -> None:
                notify()

        scheduler.add_plugin(_Wake())

    def info(self) -> dict[str, Any]:
        if self.cluster is None:
            return {}
        return {
            "scheduler_address": self.cluster.scheduler_address,
            "tls": {
                "ca_file": str(self.dir / "tls" / "ca.pem"),
                "cert_file": str(self.dir / "tls" / "cert.pem"),
                "key_file": str(self.dir / "tls" / "key.pem"),
            },
        }

    async def stop(self) -> None:
        if self.cluster is not None:
            cluster, self.cluster = self.cluster, None
            await cluster.close()

    async def scale(self, workers: int) -> None:
        raise NotImplementedError


class LocalDask(_DaskLauncher):
    """A Dask cluster on this box: one Nanny per granted device, TLS everywhere."""

    backend = "local"

    async def start(self) -> None:
        from distributed import Nanny, Scheduler, SpecCluster

        sec = self._security()
        env = {n: os.environ[n] for n in safe_env_names(self.cfg.env_names)}
        self._spec = {
            f"gpu-{i}": {
                "cls": Nanny,
                "options": {
                    "security": sec,
                    "host": "127.0.0.1",
                    "nthreads": 1,
                    "name": f"gpu-{i}",
                    "env": {
                        **env,
                        "CUDA_VISIBLE_DEVICES": dev,
                        "NVIDIA_VISIBLE_DEVICES": dev,
                        SESSION_DIR_ENV: str(self.dir),  # where its sampler writes
                    },
                    "local_directory": str(self.dir / "work"),
                    "dashboard_address": "127.0.0.1:0",
                    "preload": ["sovereign_portal.extension.gpu_pin"],  # its sampler
                },
            }
            for i, dev in enumerate(self.grant["devices"])
        }
        import dask

        with dask.config.set(QUIET_HTTP):  # read when the scheduler and Nannies are made
            self.cluster = await SpecCluster(
                workers=self._spec,
                scheduler={
                    "cls": Scheduler,
                    "options": {
                        "security": sec,
                        "protocol": "tls://",
                        "host": "127.0.0.1",
                        "dashboard": False,
                        "dashboard_address": "127.0.0.1:0",
                    },
                },
                security=sec,
                asynchronous=True,
                name=f"portal-{self.sid}",
            )
        self._watch_workers()

    async def scale(self, workers: int) -> None:
        keep = dict(list(self._spec.items())[:workers])
        self.cluster.worker_spec = keep
        import dask

        with dask.config.set(QUIET_HTTP):
            await dask_correct_state(self.cluster)


class SlurmDask(_DaskLauncher):
    """Workers through dask-jobqueue's SLURMCluster: one job per granted size, one worker
    per GPU or MIG slice of that job, pinned to its own device by :mod:`.gpu_pin`."""

    backend = "slurm"

    def _extra(self) -> list[str]:
        skip = ("--partition=", "--account=", "--time=")
        extra = [a for a in self.grant["scheduler_args"] if not a.startswith(skip)]
        extra.append("--export=ALL")  # sbatch's own environment is the allow-list
        return extra

    def _worker_host_args(self) -> list[str]:
        """Without an interface, workers on an emulated cluster bind the loopback address
        (else distributed guesses an address by routing towards a public IP)."""
        if self.cfg.interface or not self.cfg.host.startswith("127."):
            return []
        return ["--host", self.cfg.host, "--dashboard-address", f"{self.cfg.host}:0"]

    async def start(self) -> None:
        import dask
        from dask_jobqueue import SLURMCluster

        per_job = int(self.grant["devices_per_node"])
        sec = self._security()
        (self.dir / "logs").mkdir(exist_ok=True)
        with dask.config.set(QUIET_HTTP):  # the scheduler runs here, in this process
            self.cluster = await self._slurm_cluster(SLURMCluster, per_job, sec)
        self._watch_workers()
        self.cluster.scale(jobs=int(self.grant["jobs"]))

    async def _slurm_cluster(self, cls: Any, per_job: int, sec: Any) -> Any:
        routes = json.dumps(HTTP_ROUTES)  # the workers' own HTTP servers, on the nodes
        return await cls(
            queue=self.grant["scheduler_partition"],
            account=self.grant.get("account"),
            walltime=_minutes_hms(int(self.grant["walltime_minutes"])),
            cores=per_job,
            processes=per_job,
            memory=self.cfg.memory_per_worker,
            job_directives_skip=["--mem"],
            job_extra_directives=self._extra(),
            job_name=f"portal-dask-{self.sid}",
            job_cls=_slurm_job_cls(self.cfg.scheduler(), job_env(self.cfg.env_names)),
            job_script_prologue=[
                f"export SOVEREIGN_PORTAL_WORKERS_PER_JOB={per_job}",
                f"export {SESSION_DIR_ENV}={shlex.quote(str(self.dir))}",
                f"export DASK_DISTRIBUTED__WORKER__HTTP__ROUTES={shlex.quote(routes)}",
            ],
            worker_extra_args=[
                "--preload",
                "sovereign_portal.extension.gpu_pin",
                *self._worker_host_args(),
            ],
            interface=self.cfg.interface,
            protocol="tls://",
            security=sec,
            shared_temp_directory=str(self.dir),
            log_directory=str(self.dir / "logs"),
            local_directory=str(self.dir / "work"),
            python=self.cfg.python,
            scheduler_options={"dashboard": False}
            | (
                {}
                if self.cfg.interface
                else {"host": self.cfg.host, "dashboard_address": f"{self.cfg.host}:0"}
            ),
            asynchronous=True,
            name=f"portal-{self.sid}",
        )

    def job_ids(self) -> list[str]:
        if self.cluster is None:
            return []
        return [str(j.job_id) for j in self.cluster.workers.values() if getattr(j, "job_id", None)]

    def job_script(self) -> str:
        return str(self.cluster.job_script()) if self.cluster is not None else ""

    async def scale(self, workers: int) -> None:
        self.cluster.scale(n=workers)


def _slurm_job_cls(client: SchedulerClient, env: dict[str, str]) -> Any:
    """dask-jobqueue's SLURMJob, submitting and cancelling through the scheduler client,
    with ``env`` as sbatch's whole environment."""
    from dask_jobqueue.slurm import SLURMJob

    class PortalSLURMJob(SLURMJob):
        async def _submit_job(self, script_filename: str) -> str:
            script = await asyncio.to_thread(Path(script_filename).read_text)
            # submitted from the server's directory, as dask-jobqueue's own sbatch call
            return await client.submit(script, env=env, cwd=os.getcwd())

        @classmethod
        async def _close_job(cls, job_id: str, cancel_command: str) -> None:
            if job_id:
                try:
                    await client.cancel([str(job_id)])
                except (RuntimeError, OSError, TimeoutError) as e:  # as dask-jobqueue does
                    logging.getLogger("sovereign_portal.sessions").warning(
                        "scancel %s failed: %s", job_id, e
                    )

    return PortalSLURMJob


# -- torch.distributed ------------------------------------------------------------------
class _TorchLauncher(Launcher):
    kind = "torch"

    def up(self) -> int:
        ranks = self.dir / "ranks"
        return len(list(ranks.iterdir())) if ranks.is_dir() else 0

    def info(self) -> dict[str, Any]:
        return {"controller_host": self.cfg.host, "world_size": self.total}


class LocalTorch(_TorchLauncher):
    """One rank process per granted device on this box."""

    backend = "local"
    procs: list[asyncio.subprocess.Process]

    async def start(self) -> None:
        devices = list(self.grant["devices"])
        base = {n: os.environ[n] for n in safe_env_names(self.cfg.env_names)}
        (self.dir / "logs").mkdir(exist_ok=True)
        self.procs = []
        for r, dev in enumerate(devices):
            env = {
                **base,
                "RANK": str(r),
                "LOCAL_RANK": str(r),
                "WORLD_SIZE": str(len(devices)),
                "CUDA_VISIBLE_DEVICES": dev,
                "NVIDIA_VISIBLE_DEVICES": dev,
            }
            log = (self.dir / "logs" / f"rank-{r}.log").open("wb")
            self.procs.append(
                await asyncio.create_subprocess_exec(
                    self.cfg.python,
                    "-m",
                    "sovereign_portal.extension.rank_worker",
                    str(self.dir),
                    env=env,
                    stdout=log,
                    stderr=log,
                    stdin=asyncio.subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
            log.close()

    def local_alive(self) -> bool | None:
        return any(p.returncode is None for p in getattr(self, "procs", []))

    async def stop(self) -> None:
        (self.dir / "stop").touch()
        for p in getattr(self, "procs", []):
            if p.returncode is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        for p in getattr(self, "procs", []):
            try:
                await asyncio.wait_for(p.wait(), 5)
            except TimeoutError:
                os.killpg(p.pid, signal.SIGKILL)
                await p.wait()


class SlurmTorch(_TorchLauncher):
    """One gang-scheduled job: N nodes × G ranks through ``srun``, c10d on the first node."""

    backend = "slurm"
    job_id: str | None = None

    def job_script(self) -> str:
        gres = [a for a in self.grant["scheduler_args"] if a.startswith("--gres=")]
        srun = [
            "srun",
            "--kill-on-bad-exit=1",
            f"--ntasks-per-node={self.grant['devices_per_node']}",
            *gres,
            self.cfg.python,
            "-m",
            "sovereign_portal.extension.rank_worker",
            str(self.dir),
        ]
        return "#!/bin/sh\n# sovereign-portal torch session\nexec " + shlex.join(srun) + "\n"

    def sbatch_options(self) -> list[str]:
        """sbatch's options for the job (the script goes on stdin)."""
        return [
            f"--job-name=portal-torch-{self.sid}",
            f"--output={self.dir / 'logs' / 'slurm-%j.out'}",
            "--export=ALL",  # sbatch's own environment is the allow-list (module doc)
            f"--ntasks-per-node={self.grant['devices_per_node']}",
            *self.grant["scheduler_args"],
        ]

    async def start(self) -> None:
        (self.dir / "logs").mkdir(exist_ok=True)
        script = self.dir / "job.sh"
        script.write_text(self.job_script())
        self.job_id = await self.cfg.scheduler().submit(
            script.read_text(),
            self.sbatch_options(),
            env=job_env(self.cfg.env_names),
            cwd=os.getcwd(),
        )

    def job_ids(self) -> list[str]:
        return [self.job_id] if self.job_id else []

    async def stop(self) -> None:
        (self.dir / "stop").touch()
        if self.job_id:
            await self.cfg.scheduler().cancel([self.job_id])


LAUNCHERS: dict[tuple[str, str], type[Launcher]] = {
    ("dask", "local"): LocalDask,
    ("dask", "slurm"): SlurmDask,
    ("torch", "local"): LocalTorch,
    ("torch", "slurm"): SlurmTorch,
}


def write_secret(sdir: Path) -> None:
    """The per-session secret that authenticates torch ranks and the controller (0600)."""
    fd = os.open(sdir / "secret", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(os.urandom(32).hex().encode())


def write_meta(sdir: Path, data: dict[str, Any]) -> None:
    tmp = sdir / ".session.json.tmp"
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(sdir / "session.json")


def now() -> float:
    return time.time()
