"""Session jobs, watched by the portal service: one scheduler query per interval for all.

The service writes every grant, so it knows every compute session. A notebook's
extension registers the Slurm job ids of each of its sessions (``PUT
api/grants/<id>/jobs?jobs=a,b``) and then long-polls ``GET api/jobs?version=V&wait=S``
for their state. One :class:`~sovereign_portal.spawners.slurm.scheduler.JobPoller` (the
whole queue, one ``squeue`` per interval) answers for every session of every user, and
for the catalog's queue state: no notebook server calls the scheduler.

With several Slurm sites (``[[sites]]`` in the site file) each site has its own poller,
through that site's own scheduler client (:func:`~sovereign_portal.spawners.slurm.sites.client_for`:
its CLI, or its slurmrestd): a session's jobs are watched at the site of its grant's
partition, never through the hub host's CLI for a remote site, and job ids (a site's own)
are looked up at that site only. Still one whole-queue query per site per interval, for
every session there. A site that does not answer leaves only its own jobs unknown.

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
from collections.abc import Callable, Mapping
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
    #: the site whose scheduler runs the session ("" without [[sites]]: the hub host's)
    site: str = ""


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
        site_clients: Mapping[str, Callable[[], SchedulerClient]] | None = None,
    ) -> None:
        """``make_client``: the hub host's scheduler (no [[sites]]). ``site_clients``: each
        declared site's client, by site name; with them, every session is watched at its
        own site and the hub host's client is never used."""
        self._make_client = make_client
        self._site_clients = dict(site_clients or {})
        self.interval = interval
        self.snapshot_file = snapshot_file
        self.timeout = timeout
        self._pollers: dict[str, JobPoller] = {}
        self.grants: dict[str, _Watch] = {}
        self.users: dict[str, _UserView] = {}
        #: called after every poll of any site (the ledger's check of open records)
        self.listeners: list[Callable[[bool], None]] = []

    @property
    def sites(self) -> tuple[str, ...]:
        """The declared sites (empty: one cluster, the hub host's)."""
        return tuple(self._site_clients)

    def site_key(self, site: str) -> str:
        """The poller a session at ``site`` uses: that site's, or "" (the hub host's)
        without [[sites]]. A site that is not declared is refused (never the host's)."""
        if not self._site_clients:
            return ""
        if site not in self._site_clients:
            raise JobsRequestError(
                f"'site': {site[:40]!r} is not a declared site; declared: "
                + ", ".join(self._site_clients)
            )
        return site

    def poller_for(self, site: str = "") -> JobPoller:
        """The poller of ``site`` (made on first use, inside the service's event loop):
        one whole-queue query per interval for every session job there."""
        key = self.site_key(site)
        if key not in self._pollers:
            make = self._site_clients[key] if key else self._make_client
            snap = ""
            if self.snapshot_file:
                snap = f"{self.snapshot_file}.{key}" if key else self.snapshot_file
            poller = JobPoller(
                interval=self.interval,
                jitter=0.1,
                fast_interval=self.interval,
                timeout=self.timeout,
                client=make(),
                whole_queue=True,
                snapshot=QueueSnapshot(snap) if snap else None,
            )
            poller.listeners.append(self._polled)
            self._pollers[key] = poller
        return self._pollers[key]

    @property
    def poller(self) -> JobPoller:
        """The hub host's poller (one cluster, no [[sites]]); with sites, the first site's."""
        return self.poller_for(self.sites[0] if self.sites else "")

    def pollers(self) -> dict[str, JobPoller]:
        """Every site's poller (made now if not yet), by site ("" without [[sites]])."""
        return {s: self.poller_for(s) for s in (self.sites or ("",))}

    def poller_of_record(self, site: str) -> JobPoller:
        """The poller for a ledger record's ``site`` (a declared site, else the host's)."""
        return self.poller_for(site if site in self._site_clients else (self.sites or ("",))[0])

    # -- grants and registrations ---------------------------------------------------------
    def note_grant(
        self, grant_id: str, user: str, walltime_minutes: int, ttl_s: float, site: str = ""
    ) -> None:
        """The service granted a Slurm session (at ``site``): bind the grant to its user."""
        until = time.time() + ttl_s + walltime_minutes * 60 + GRACE_S
        self.grants[grant_id] = _Watch(user, until, site=self.site_key(site))

    def register(
        self, grant_id: str, user: str, ids: tuple[str, ...], site: str = ""
    ) -> dict[str, Any] | None:
        """Set a session's job ids; None if the grant is another user's. ``site``: where
        a grant unknown here (after a restart) runs, from its ledger record."""
        w = self.grants.get(grant_id)
        if w is None:  # unknown here (the service restarted): the caller adopts it
            key = site if site in self._site_clients else (self.sites or ("",))[0]
            w = self.grants[grant_id] = _Watch(user, time.time() + 24 * 3600, site=key)
        if w.user != user:
            return None
        old, w.jobs = set(w.jobs), ids
        poller = self.poller_for(w.site)
        for j in set(ids) - old:
            poller.track(j)
        self._untrack(old - set(ids), w.site)
        self._refresh_user(user, force=True)
        return self.view(user)

    def forget(self, grant_id: str, user: str) -> bool:
        """The grant was released: stop watching its jobs."""
        w = self.grants.get(grant_id)
        if w is None or w.user != user:
            return False
        del self.grants[grant_id]
        self._untrack(set(w.jobs), w.site)
        self._refresh_user(user, force=True)
        return True

    def _untrack(self, ids: set[str], site: str = "") -> None:
        still = {j for w in self.grants.values() if w.site == site for j in w.jobs}
        poller = self.poller_for(site)
        for j in ids - still:
            poller.untrack(j)

    def expire(self) -> None:
        now = time.time()
        for gid, w in list(self.grants.items()):
            if w.until < now:
                self.forget(gid, w.user)

    # -- views ------------------------------------------------------------------------------
    def _job_view(self, job_id: str, site: str = "") -> dict[str, Any] | None:
        p = self.poller_for(site)
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
        mine = {gid: w for gid, w in self.grants.items() if w.user == user}
        # the sites of the caller's sessions (the host's, or the first site's, if none)
        sites = sorted({w.site for w in mine.values()}) or [self.sites[0] if self.sites else ""]
        polled = [self.poller_for(s) for s in sites]
        errors = [
            f"site {s}: {p.last_error}" if s else p.last_error
            for s, p in zip(sites, polled, strict=True)
            if p.last_error is not None
        ]
        return {
            "ok": not errors and all(p.last_ok > 0 for p in polled),
            "error": "; ".join(e for e in errors if e) or None,
            "grants": {
                gid: {j: self._job_view(j, w.site) for j in w.jobs} for gid, w in mine.items()
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
        for listener in list(self.listeners):
            listener(ok)

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
    async def queue_counts(self, max_age: float, site: str = "") -> dict[str, dict[str, int]]:
        """Pending and running jobs per Slurm partition of ``site``, from the shared poll
        (a fresh one if the last answer is older than ``max_age`` seconds)."""
        p = self.poller_for(site)
        if time.monotonic() - p.last_ok > max_age:
            await p.refresh()
        counts: dict[str, dict[str, int]] = {}
        for j in p.queue.values():
            if j.state in ("PENDING", "RUNNING"):
                c = counts.setdefault(j.partition, {"pending": 0, "running": 0})
                c["pending" if j.state == "PENDING" else "running"] += 1
        return counts
