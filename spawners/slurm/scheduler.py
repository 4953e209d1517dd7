"""One batched poller for every job of a process (the scheduler calls are in :mod:`.client`).

- :mod:`.client` holds the one scheduler interface (:class:`SchedulerClient`: submit,
  cancel, one batched query, job detail) and its CLI transport; its names are re-exported
  here for the older imports.
- :class:`JobPoller` keeps one query per interval (with jitter) for all tracked jobs: the
  hub's for every server job (``squeue --jobs=a,b,c``), the portal service's for every
  session job of every user together with the queue state (``whole_queue``: one ``squeue``
  of the whole queue, from which queue positions are exact).
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
import random
import time
from collections.abc import Callable, Mapping

from .client import (
    ACTIVE_STATES,
    CALLS,
    GONE,
    SLURM_COMMANDS,
    SQUEUE_FORMAT,
    JobInfo,
    SchedulerClient,
    SchedulerError,
    SlurmCLI,
    SlurmError,
    call,
    parse_squeue,
    queue_positions,
    slurm_env,
)
from .snapshot import QueueSnapshot

log = logging.getLogger("sovereign_portal.slurm")

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

__all__ = [
    "ACTIVE_STATES",
    "CALLS",
    "FINAL_STATES",
    "GONE",
    "NEVER_REASONS",
    "SLURM_COMMANDS",
    "SQUEUE_FORMAT",
    "JobInfo",
    "JobPoller",
    "SlurmError",
    "call",
    "parse_squeue",
    "shared_poller",
    "slurm_env",
]


class JobPoller:
    """One scheduler query per interval for every tracked job, shared by all its users.

    With ``whole_queue`` the query is the whole queue (still one RPC: ``squeue`` of
    several job ids loads the whole queue from slurmctld anyway), kept in :attr:`queue`,
    with :attr:`positions` of every pending job, and a :meth:`refresh` polls even when no
    job is tracked (the portal service's queue state).
    """

    def __init__(
        self,
        interval: float = 30.0,
        jitter: float = 0.1,
        fast_interval: float = 0.5,
        timeout: float = 20.0,
        env: Mapping[str, str] | None = None,
        *,
        client: SchedulerClient | None = None,
        whole_queue: bool = False,
        snapshot: QueueSnapshot | None = None,
    ) -> None:
        self.interval = interval
        #: Shared with the other pollers of the portal (hub and service): one query each
        #: interval for all of them (:mod:`.snapshot`).
        self.snapshot = snapshot
        self.jitter = jitter
        self.fast_interval = fast_interval
        self.timeout = timeout
        self.env = dict(env) if env is not None else slurm_env()
        self.client = client or SlurmCLI(env=self.env, timeout=timeout)
        self.whole_queue = whole_queue
        #: The last whole-queue answer, and each pending job's place in its partition.
        self.queue: dict[str, JobInfo] = {}
        self.positions: dict[str, int] = {}
        #: Called after every poll with True (the scheduler answered) or False (unknown).
        self.listeners: list[Callable[[bool], None]] = []
        self.jobs: dict[str, JobInfo] = {}
        self.tracked: set[str] = set()
        self.tracked_since: dict[str, float] = {}
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
        if job_id not in self.tracked:
            # A shared snapshot taken before this moment may not list the job yet.
            self.tracked_since[job_id] = time.time()
        self.tracked.add(job_id)
        if hurry:
            self.hurry.add(job_id)
            self._wake.set()
        self._ensure_running()

    def untrack(self, job_id: str) -> None:
        self.tracked.discard(job_id)
        self.tracked_since.pop(job_id, None)
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
        ids = sorted(self.tracked, key=lambda j: [int(x) for x in j.split("_")])
        if not ids and not self.whole_queue:
            return True
        self.polls += 1
        try:
            wanted = None if self.whole_queue else ids
            if self.snapshot is not None:
                base = self.fast_interval if self.hurry else self.interval
                newest = max((self.tracked_since.get(j, 0.0) for j in ids), default=0.0)
                found = await self.snapshot.query(
                    self.client, wanted, max_age=base * (1 + self.jitter), newer_than=newest
                )
            else:
                found = await self.client.query(wanted)
        except SchedulerError as e:
            return self._unknown(str(e))
        except (TimeoutError, OSError) as e:
            return self._unknown(f"squeue did not answer: {e!r}")
        if self.whole_queue:
            self.queue = found
            self.positions = queue_positions(found)
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
        self._tell(True)
        async with self._changed:
            self._changed.notify_all()
        return True

    def _tell(self, ok: bool) -> None:
        for listener in list(self.listeners):
            try:
                listener(ok)
            except Exception:
                log.exception("A listener of the Slurm poll failed")

    def _unknown(self, why: str) -> bool:
        if self.last_error is None:
            log.warning("Slurm query failed; job states are unknown until it answers: %s", why)
        self.last_error = why
        self._tell(False)
        return False

    async def wait_change(self, timeout: float) -> None:  # noqa: ASYNC109
        """Wait for the next successful poll (or ``timeout``)."""
        with contextlib.suppress(TimeoutError):
            async with self._changed:
                await asyncio.wait_for(self._changed.wait(), timeout)


_POLLERS: dict[tuple[float, float, float, str], JobPoller] = {}


def shared_poller(
    interval: float, jitter: float, fast_interval: float, snapshot_file: str = ""
) -> JobPoller:
    """The process-wide poller for these settings (one per hub, in practice); with
    ``snapshot_file`` its queries are shared with the portal service's (:mod:`.snapshot`)."""
    key = (interval, jitter, fast_interval, snapshot_file)
    if key not in _POLLERS:
        snap = QueueSnapshot(snapshot_file) if snapshot_file else None
        _POLLERS[key] = JobPoller(interval, jitter, fast_interval, snapshot=snap)
    return _POLLERS[key]
