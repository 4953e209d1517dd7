"""Ledger records of compute sessions: one record per grant, source ``grant:<id>``.

The portal service opens the record when it writes a grant (with the grant's placed
request, so the same rates as its budget hold), adds the session's Slurm job ids when the
server registers them, marks the start when a job first runs, and closes it:

- ``stopped`` when the grant is released (the session was stopped), or, with no job and
  no time charged, when nobody registered a job before its walltime and an hour were over;
- the reason of the jobs' final Slurm state (``scancel``, ``walltime``, ``died``, ...)
  once every job of the session has ended, seen in the service's one shared poll;
- ``budget`` when the service stopped the session because its budget was spent
  (:class:`.budget_store.BudgetWatch`): a Slurm session's jobs are cancelled and the
  record closes at the poll that sees them end (:attr:`GrantLedger.ending`); a session
  with no job (a local one, or a Slurm one not yet registered) closes at once.

The budget hold of the grant (ref ``grant:<id>``) settles from the closed record
(:mod:`.budget_store`). A record never closes twice; errors are logged, never raised into
a request that already succeeded.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from . import ledger as L
from .ledger_store import LedgerStore

log = logging.getLogger("sovereign_portal.grant_ledger")


def source(grant_id: str) -> str:
    return f"grant:{grant_id}"


class GrantLedger:
    def __init__(self, store: LedgerStore, site: str = "", site_of: Any = None) -> None:
        """``site``: the deployment's name; ``site_of``: a partition's site for its record
        (``Site.site_name_of``: the declared [[sites]] entry, else the deployment)."""
        self.store = store
        self.site = site
        self.site_of = site_of
        self.adopted: set[str] = set()  # job ids polled only for their open record
        #: grant id -> the end reason of a session the portal is stopping (``budget``):
        #: its record closes with it, not with the cancelled jobs' own final state
        self.ending: dict[str, str] = {}
        #: grants stopped for their budget: jobs registered for them later are refused
        self.budget_stopped: set[str] = set()

    def adopt(self, poller: Any, poller_of: Any = None) -> None:
        """At start (a restart too): poll the jobs of every open session record, so that
        a session whose server never registers again still ends in a closed record.
        ``poller_of(site)``: the poller of a record's site (several sites), else ``poller``."""
        for rec in self.store.list_open("grant:"):
            p = poller_of(rec.site) if poller_of is not None else poller
            for j in rec.job_ids:
                self.adopted.add(f"{rec.site}/{j}")
                p.track(j)

    def open(self, grant: Any, resolved: Any, role: str) -> L.Record:
        owner_type, owner = "user", grant.user
        if grant.budget:
            owner_type, _, owner = grant.budget.rsplit("@", 1)[0].partition(":")
        now = time.time()
        rec = L.open_record(
            resolved,
            user=grant.user,
            role=role,
            now=now,
            site=self.site_of(resolved.partition) if self.site_of else self.site,
            source=source(grant.id),
            owner_type=owner_type,
            owner=owner,
        )
        if grant.backend == "local":
            rec = L.attach(rec, nodes="local", started_at=now)
        return self.store.open(rec)

    def jobs(self, grant_id: str, ids: tuple[str, ...]) -> None:
        rec = self.store.open_for(source(grant_id))
        if rec is not None and ids:
            self.store.attach(rec.id, job_ids=ids)

    def close(
        self, grant_id: str, reason: str, when: float | None = None, user: str | None = None
    ) -> L.Record | None:
        """Close the grant's open record (only ``user``'s, when given)."""
        rec = self.store.open_for(source(grant_id))
        if rec is None or (user is not None and rec.user != user):
            return None
        return self._close(rec, when or time.time(), reason)

    def _close(self, rec: L.Record, end: float, reason: str) -> L.Record:
        """Close at ``end``; a Slurm session whose jobs never ran is charged no time."""
        if rec.started_at is None:
            rec = self.store.attach(rec.id, started_at=end)
        return self.store.close(rec.id, ended_at=end, reason=reason)

    def on_poll(self, poller: Any, watched: set[str], poller_of: Any = None) -> None:
        """After each shared poll: starts, and sessions whose jobs have all ended. With
        several sites, ``poller_of(site)`` is the poller of a record's site (its job ids
        are that site's own)."""
        from sovereign_portal.spawners.slurm.jobscript import SIGNAL_RESOLUTION_S

        now = time.time()
        for rec in self.store.list_open("grant:"):
            gid = rec.source.split(":", 1)[1]
            if not rec.job_ids:
                # a Slurm grant whose session never registered a job, and that nobody
                # watches any more (its walltime and an hour are over): no time is charged
                late = now > rec.opened_at + rec.walltime_minutes * 60 + 3600
                if gid not in watched and rec.nodes != "local" and late:
                    self._close(rec, now, "stopped")
                continue
            site_poller = poller_of(rec.site) if poller_of is not None else poller
            infos = [site_poller.info(j) for j in rec.job_ids]
            if any(i is None for i in infos):
                continue  # not seen yet
            running = [i for i in infos if i.state == "RUNNING"]
            if running and rec.started_at is None:
                nodes = ",".join(sorted({i.nodes for i in running if i.nodes}))
                rec = self.store.attach(rec.id, nodes=nodes or None, started_at=now)
            final = [i for i in infos if not i.active]
            if len(final) == len(infos):
                start = rec.started_at if rec.started_at is not None else now
                reason = self.ending.pop(gid, None) or (
                    L.slurm_end_reason(
                        final[-1].state,
                        seconds=now - start,
                        walltime_minutes=rec.walltime_minutes,
                        warning_s=SIGNAL_RESOLUTION_S,
                    )
                    or "died"
                )
                self._close(rec, now, reason)
                log.info("Ledger: grant %s ended (%s)", gid, reason)
                if gid not in watched:
                    for j in rec.job_ids:
                        if f"{rec.site}/{j}" in self.adopted:
                            self.adopted.discard(f"{rec.site}/{j}")
                            site_poller.untrack(j)
