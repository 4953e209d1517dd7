"""Slurm commands, run as argv lists, and one batched poller for every server job.

- :func:`call` runs one command and raises :class:`SlurmError` with the exit code, stdout
  and stderr. Every call is counted in :data:`CALLS` (by command) for the benchmarks.
- :class:`JobPoller` keeps one ``squeue`` per interval (with jitter) for all tracked jobs.
  A failed or timed-out query leaves every job *unknown*; only an authoritative answer (the
  job is listed in a final state, or ``squeue`` succeeded and no longer lists it) ends one.
  The poll that sees a job end (final, or COMPLETING) calls that job's watcher at once, so
  a spawner tells the hub within one scheduler interval, without waiting for JupyterHub's
  own poll. A job can be *followed* to its final state after its server is forgotten.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

log = logging.getLogger("sovereign_portal.slurm")

#: Scheduler commands run by this process, by command name (``squeue``, ``sbatch``, ...).
CALLS: Counter[str] = Counter()

#: States in which a job still holds, or will hold, resources.
ACTIVE_STATES = frozenset(
    {
        "PENDING",
        "CONFIGURING",
        "RUNNING",
        "COMPLETING",
        "SUSPENDED",
        "RESIZING",
        "SIGNALING",
        "STAGE_OUT",
        "REQUEUED",
        "REQUEUE_FED",
        "REQUEUE_HOLD",
        "RESV_DEL_HOLD",
        "STOPPED",
    }
)
#: Final states, and what each means to a user.
FINAL_STATES: dict[str, str] = {
    "COMPLETED": "the server exited",
    "CANCELLED": "the job was cancelled",
    "FAILED": "the job failed",
    "TIMEOUT": "the walltime ran out",
    "NODE_FAIL": "its node failed",
    "PREEMPTED": "the job was preempted by a higher-priority job",
    "BOOT_FAIL": "its node failed to boot",
    "DEADLINE": "the job reached its deadline",
    "OUT_OF_MEMORY": "the job ran out of memory",
    "SPECIAL_EXIT": "the job failed",
    "REVOKED": "the job was revoked",
}
#: Pending reasons that mean "this can never run here": fail the spawn at once.
NEVER_REASONS = frozenset(
    {
        "BadConstraints",
        "PartitionNodeLimit",
        "PartitionTimeLimit",
        "PartitionConfig",
        "InvalidAccount",
        "InvalidQOS",
        "QOSMaxGRESPerJob",
        "AssocMaxGRESPerJob",
        "ReqNodeNotAvail, UnavailableNodes",
    }
)
SQUEUE_FORMAT = "%i|%T|%r|%N|%S|%u|%k"
SLURM_COMMANDS = frozenset({"sbatch", "squeue", "scancel", "scontrol", "sinfo"})


class SlurmError(RuntimeError):
    """A Slurm command that failed: exit code, stdout and stderr for the log."""

    def __init__(self, argv: Sequence[str], returncode: int, stdout: str, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        super().__init__(
            f"{' '.join(self.argv)} exited with {returncode}: {stderr.strip() or stdout.strip()}"
        )


def slurm_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """A clean environment for Slurm clients: PATH, SLURM_CONF and locale, nothing else.

    The hub's own environment (which holds secrets such as the proxy token) never reaches
    ``sbatch``, so it can never reach a job.
    """
    src = os.environ if base is None else base
    env = {"PATH": src.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
    if src.get("SLURM_CONF"):
        env["SLURM_CONF"] = src["SLURM_CONF"]
    return env


async def call(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    input: str | None = None,
    timeout: float = 30,  # noqa: ASYNC109 - one knob for the subprocess
    cwd: str = "/",
) -> str:
    """Run ``argv`` (never a shell) and return stdout, or raise :class:`SlurmError`."""
    names = [os.path.basename(a) for a in argv]
    CALLS[next((n for n in names if n in SLURM_COMMANDS), names[0])] += 1
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(env) if env is not None else slurm_env(),
        cwd=cwd,
    )
    try:
        out, err = await asyncio.wait_for(
            proc.communicate(input.encode() if input is not None else None), timeout
        )
    except (TimeoutError, asyncio.CancelledError):
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    stdout, stderr = out.decode(errors="replace"), err.decode(errors="replace")
    if proc.returncode != 0:
        raise SlurmError(argv, proc.returncode or 0, stdout, stderr)
    return stdout


@dataclass(frozen=True)
class JobInfo:
    """One line of ``squeue``: what Slurm says about a job right now."""

    job_id: str
    state: str
    reason: str
    nodes: str
    start: str
    user: str
    comment: str

    @property
    def active(self) -> bool:
        """The job holds, or will hold, resources."""
        return self.state in ACTIVE_STATES

    @property
    def ended(self) -> bool:
        """The job's processes are gone or being stopped: final, or COMPLETING.

        squeue shows COMPLETING (not the final state) while Slurm stops the processes of a
        cancelled, timed-out or finished job, which can take a server's whole shutdown.
        """
        return not self.active or self.state == "COMPLETING"

    @property
    def start_estimate(self) -> str | None:
        """Slurm's expected start time of a pending job, when the backfill has one."""
        if self.state != "PENDING" or self.start in ("N/A", "", "Unknown"):
            return None
        return self.start


#: What the poller knows of a job Slurm no longer lists.
GONE = JobInfo("", "GONE", "the job no longer exists", "", "", "", "")


def parse_squeue(text: str) -> dict[str, JobInfo]:
    out: dict[str, JobInfo] = {}
    for line in text.splitlines():
        parts = line.split("|", 6)
        if len(parts) == 7 and parts[0].strip():
            f = [p.strip() for p in parts[:6]]
            info = JobInfo(f[0], f[1], f[2], f[3], f[4], f[5], parts[6])
            out[info.job_id] = info
    return out


class JobPoller:
    """One ``squeue`` per interval for every tracked job, shared by all spawners."""

    def __init__(
        self,
        interval: float = 30.0,
        jitter: float = 0.1,
        fast_interval: float = 0.5,
        timeout: float = 20.0,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.interval = interval
        self.jitter = jitter
        self.fast_interval = fast_interval
        self.timeout = timeout
        self.env = dict(env) if env is not None else slurm_env()
        self.jobs: dict[str, JobInfo] = {}
        self.tracked: set[str] = set()
        self.hurry: set[str] = set()  # jobs being started or stopped: poll them fast
        self.watchers: dict[str, Callable[[JobInfo], None]] = {}
        self.following: dict[str, tuple[float, Callable[[JobInfo], object]]] = {}
        self.last_ok = 0.0
        self.last_error: str | None = None
        self.polls = 0
        self._task: asyncio.Task[None] | None = None
        self._inflight: asyncio.Future[bool] | None = None
        self._wake = asyncio.Event()
        self._changed = asyncio.Condition()

    # -- tracking -------------------------------------------------------------------------
    def track(self, job_id: str, hurry: bool = False) -> None:
        self.tracked.add(job_id)
        if hurry:
            self.hurry.add(job_id)
            self._wake.set()
        self._ensure_running()

    def untrack(self, job_id: str) -> None:
        self.tracked.discard(job_id)
        self.hurry.discard(job_id)
        self.jobs.pop(job_id, None)
        self.watchers.pop(job_id, None)
        self.following.pop(job_id, None)

    def watch(self, job_id: str, on_end: Callable[[JobInfo], None]) -> None:
        """Call ``on_end(info)`` from the poll that first sees ``job_id`` end (once)."""
        self.watchers[job_id] = on_end

    def follow(
        self, job_id: str, on_final: Callable[[JobInfo], object], timeout: float = 600
    ) -> None:
        """Keep polling an ending job only to call ``on_final(info)`` with its final state,
        then forget it (or forget it after ``timeout`` seconds)."""
        self.watchers.pop(job_id, None)
        self.hurry.discard(job_id)
        self.following[job_id] = (time.monotonic() + timeout, on_final)
        self.track(job_id)

    def calm(self, job_id: str) -> None:
        self.hurry.discard(job_id)

    def info(self, job_id: str) -> JobInfo | None:
        """The last authoritative answer about ``job_id``; None while it is unknown."""
        return self.jobs.get(job_id)

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._loop())

    # -- polling --------------------------------------------------------------------------
    def _next_delay(self) -> float:
        base = self.fast_interval if self.hurry else self.interval
        return max(0.05, base * (1 + random.uniform(-self.jitter, self.jitter)))

    async def _loop(self) -> None:
        while self.tracked:
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._next_delay())
            if self.tracked:
                await self.refresh()

    async def refresh(self) -> bool:
        """Poll now (joining a poll already in flight). True if Slurm answered."""
        if self._inflight is not None and not self._inflight.done():
            return await asyncio.shield(self._inflight)
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._inflight = fut
        try:
            ok = await self._poll_once()
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()  # mark retrieved
            raise
        fut.set_result(ok)
        return ok

    async def _poll_once(self) -> bool:
        ids = sorted(self.tracked, key=int)
        if not ids:
            return True
        argv = ["squeue", "-h", "-t", "all", f"--jobs={','.join(ids)}", "-o", SQUEUE_FORMAT]
        self.polls += 1
        try:
            out = await call(argv, env=self.env, timeout=self.timeout)
            found = parse_squeue(out)
        except SlurmError as e:
            if "Invalid job id specified" in e.stderr:
                found = {}  # authoritative: none of these jobs exists any more
            else:
                return self._unknown(str(e))
        except (TimeoutError, OSError) as e:
            return self._unknown(f"squeue did not answer: {e!r}")
        now = time.monotonic()
        ended: list[tuple[Callable[[JobInfo], object], JobInfo]] = []
        for job_id in ids:
            info = self.jobs[job_id] = found.get(job_id, GONE)
            if info.ended and job_id in self.watchers:
                ended.append((self.watchers.pop(job_id), info))
            if job_id in self.following:
                deadline, on_final = self.following[job_id]
                if not info.active:
                    ended.append((on_final, info))
                if not info.active or now > deadline:
                    self.untrack(job_id)
        self.last_ok = now
        self.last_error = None
        for on_end, info in ended:
            try:
                on_end(info)
            except Exception:
                log.exception("A watcher of Slurm job %s failed", info.job_id or "?")
        async with self._changed:
            self._changed.notify_all()
        return True

    def _unknown(self, why: str) -> bool:
        if self.last_error is None:
            log.warning("Slurm query failed; job states are unknown until it answers: %s", why)
        self.last_error = why
        return False

    async def wait_change(self, timeout: float) -> None:  # noqa: ASYNC109
        """Wait for the next successful poll (or ``timeout``)."""
        with contextlib.suppress(TimeoutError):
            async with self._changed:
                await asyncio.wait_for(self._changed.wait(), timeout)


_POLLERS: dict[tuple[float, float, float], JobPoller] = {}


def shared_poller(interval: float, jitter: float, fast_interval: float) -> JobPoller:
    """The process-wide poller for these settings (one per hub, in practice)."""
    key = (interval, jitter, fast_interval)
    if key not in _POLLERS:
        _POLLERS[key] = JobPoller(interval, jitter, fast_interval)
    return _POLLERS[key]
