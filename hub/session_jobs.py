"""Session jobs, watched by the portal service: one scheduler query per interval for all.

The service writes every grant, so it knows every compute session. A notebook's
extension registers the Slurm job ids of each of its sessions (``PUT
api/grants/<id>/jobs?jobs=a,b``) and then long-polls ``GET api/jobs?version=V&wait=S``
for their state. One :class:`~sovereign_portal.spawners.slurm.scheduler.JobPoller` (the
whole queue, one ``squeue`` per interval) answers for every session of every user, and
for the catalog's queue state: no notebook server calls the scheduler.

Each answer is the caller's own sessions only: a grant is bound to the user it was
granted to (or, after a service restart, to the first user who registers it; grant ids
are random and never shown to anyone else). For each job it gives Slurm's state and
reason, its partition and its exact place in that partition's queue (position 1 starts
next), or ``null`` while the poll has not seen the job yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sovereign_portal.spawners.slurm.client import JOB_ID, SchedulerClient
from sovereign_portal.spawners.slurm.scheduler import JobPoller
from sovereign_portal.spawners.slurm.snapshot import QueueSnapshot

#: Most job ids one session may register (a Dask session has one job per worker group).
MAX_JOBS_PER_SESSION = 256
#: The longest one long-poll may wait, in seconds.
MAX_WAIT_S = 25.0
#: How long after its walltime a grant's registration is kept (the job's own end, logs).
GRACE_S = 600.0


class JobsRequestError(ValueError):
    """A registration the service refuses: the message names the field."""


@dataclass
class _Watch:
    user: str
    until: float
    jobs: tuple[str, ...] = ()


@dataclass
class _UserView:
    version: int = 0
    view: dict[str, Any] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def bump(self) -> None:
        self.version += 1
        ev, self.changed = self.changed, asyncio.Event()
        ev.set()


def parse_job_ids(raw: str) -> tuple[str, ...]:
    """``"12,13"`` -> ("12", "13"): Slurm job ids only, at most :data:`MAX_JOBS_PER_SESSION`."""
    ids = tuple(dict.fromkeys(j for j in raw.split(",") if j)) if raw else ()
    if len(ids) > MAX_JOBS_PER_SESSION:
        raise JobsRequestError(f"'jobs': at most {MAX_JOBS_PER_SESSION} job ids per session")
    bad = [j for j in ids if not JOB_ID.fullmatch(j)]
    if bad:
        raise JobsRequestError(f"'jobs': {bad[0][:40]!r} is not a Slurm job id")
    return ids


class SessionJobs:
    """Every user's session jobs and one poller for them all."""

    def __init__(
        self,
        make_client: Callable[[], SchedulerClient],
        interval: float,
        timeout: float = 20,
        snapshot_file: str = "",
    ) -> None:
        self._make_client = make_client
        self.interval = interval
        self.snapshot_file = snapshot_file
        self.timeout = timeout
        self._poller: JobPoller | None = None
        self.grants: dict[str, _Watch] = {}
        self.users: dict[str, _UserView] = {}

    @property
    def poller(self) -> JobPoller:
        """Made on first use, inside the service's event loop."""
        if self._poller is None:
            self._poller = JobPoller(
                interval=self.interval,
                jitter=0.1,
                fast_interval=self.interval,
                timeout=self.timeout,
                client=self._make_client(),
                whole_queue=True,
                snapshot=QueueSnapshot(self.snapshot_file) if self.snapshot_file else None,
            )
            self._poller.listeners.append(self._polled)
        return self._poller

    # -- grants and registrations ---------------------------------------------------------
    def note_grant(self, grant_id: str, user: str, walltime_minutes: int, ttl_s: float) -> None:
        """The service granted a Slurm session: bind the grant to its user."""
        until = time.time() + ttl_s + walltime_minutes * 60 + GRACE_S
        self.grants[grant_id] = _Watch(user, until)

    def register(self, grant_id: str, user: str, ids: tuple[str, ...]) -> dict[str, Any] | None:
        """Set a session's job ids; None if the grant is another user's."""
        w = self.grants.get(grant_id)
        if w is None:  # unknown here (the service restarted): the caller adopts it
            w = self.grants[grant_id] = _Watch(user, time.time() + 24 * 3600)
        if w.user != user:
            return None
        old, w.jobs = set(w.jobs), ids
        for j in set(ids) - old:
            self.poller.track(j)
        self._untrack(old - set(ids))
        self._refresh_user(user, force=True)
        return self.view(user)

    def forget(self, grant_id: str, user: str) -> bool:
        """The grant was released: stop watching its jobs."""
        w = self.grants.get(grant_id)
        if w is None or w.user != user:
            return False
        del self.grants[grant_id]
        self._untrack(set(w.jobs))
        self._refresh_user(user, force=True)
        return True

    def _untrack(self, ids: set[str]) -> None:
        still = {j for w in self.grants.values() for j in w.jobs}
        for j in ids - still:
            self.poller.untrack(j)

    def expire(self) -> None:
        now = time.time()
        for gid, w in list(self.grants.items()):
            if w.until < now:
                self.forget(gid, w.user)

    # -- views ------------------------------------------------------------------------------
    def _job_view(self, job_id: str) -> dict[str, Any] | None:
        p = self.poller
        info = p.info(job_id)
        if info is None:
            return None
        return {
            "state": info.state,
            "reason": info.reason,
            "partition": info.partition,
            "position": p.positions.get(job_id, 0),
        }

    def _compute(self, user: str) -> dict[str, Any]:
        p = self.poller
        return {
            "ok": p.last_error is None and p.last_ok > 0,
            "error": p.last_error,
            "grants": {
                gid: {j: self._job_view(j) for j in w.jobs}
                for gid, w in self.grants.items()
                if w.user == user
            },
        }

    def _refresh_user(self, user: str, force: bool = False) -> None:
        uv = self.users.setdefault(user, _UserView())
        new = self._compute(user)
        if force or new != uv.view:
            uv.view = new
            uv.bump()

    def _polled(self, ok: bool) -> None:
        self.expire()
        for user in {w.user for w in self.grants.values()} | set(self.users):
            self._refresh_user(user)

    def view(self, user: str) -> dict[str, Any]:
        uv = self.users.get(user)
        if uv is None:
            self._refresh_user(user)
            uv = self.users[user]
        return {"version": uv.version, **uv.view}

    async def wait(self, user: str, version: int, wait_s: float) -> dict[str, Any]:
        """The caller's view once its version is not ``version`` (or after ``wait_s``)."""
        self.view(user)
        uv = self.users[user]
        end = time.monotonic() + min(max(wait_s, 0.0), MAX_WAIT_S)
        while uv.version == version:
            left = end - time.monotonic()
            if left <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(uv.changed.wait(), left)
        return self.view(user)

    # -- queue state (the catalog) --------------------------------------------------------
    async def queue_counts(self, max_age: float) -> dict[str, dict[str, int]]:
        """Pending and running jobs per Slurm partition, from the shared poll (a fresh
        one if the last answer is older than ``max_age`` seconds)."""
        p = self.poller
        if time.monotonic() - p.last_ok > max_age:
            await p.refresh()
        counts: dict[str, dict[str, int]] = {}
        for j in p.queue.values():
            if j.state in ("PENDING", "RUNNING"):
                c = counts.setdefault(j.partition, {"pending": 0, "running": 0})
                c["pending" if j.state == "PENDING" else "running"] += 1
        return counts
