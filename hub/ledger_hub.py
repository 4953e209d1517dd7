"""The ledger in the hub process: a record opens when a server starts and closes however
it ends.

:func:`install` (called by :func:`.portal.configure`) sets JupyterHub's public hooks,
``Spawner.pre_spawn_hook`` and ``Spawner.post_stop_hook``, around any hooks already set
(the budget gate's: budgets decide and hold first, then the record opens; on the way out
the record closes first). Spawners never import the hub: the hub reads what they already
keep (``resolved``, ``job_id``, ``stop_reason``, ``ledger_end_reason``) and the shared
Slurm poll.

- **Open** (``pre_spawn_hook``): one record per server, ``source = server:<user>/<name>``,
  with the request's rates, charged to ``spawner.ledger_charge_to`` (``(owner_type,
  owner)``, set by the budget gate that admitted it) or else to the user. Local servers
  hold their devices from here; a Slurm record starts when the poll first sees its job
  RUNNING (job id and node list attached then).
- **Close** (``post_stop_hook``, which JupyterHub runs on every stop: the user's, an
  admin's, a server found dead by a poll or at start-up):
  - the hub stopped it: ``stopped`` (or the spawner's ``ledger_end_reason``: ``budget``,
    ``reclaimed``);
  - local: the spawner's ``ledger_end_reason`` (``died``, ``walltime``);
  - Slurm: the job's final state (:data:`.ledger.SLURM_END_REASONS`: CANCELLED is
    ``scancel``, TIMEOUT ``walltime``, NODE_FAIL ``node_failure``, COMPLETED/FAILED
    ``died``). A job still COMPLETING is closed by the next poll that sees it final,
    at the time the hub first saw it end.
- **Reconcile** after every poll: a listener on the Slurm spawner's batched poller
  (:attr:`~sovereign_portal.spawners.slurm.scheduler.JobPoller.listeners`) reads the answer
  the spawners already asked for. Open records whose server the hub no longer runs join
  that same query (``track``), so no scheduler call is added. At hub start-up (after
  JupyterHub has re-adopted its servers), open records of servers that are gone are
  closed: with their job's final state, or ``died``; their end time is then the time the
  hub saw it, marked *estimated* (the hub was down when it happened).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from dataclasses import dataclass
from typing import Any

from . import ledger as L
from .ledger_store import LedgerStore

#: The hub's own log (JupyterHub's application logger), so ledger lines sit with the rest.
log = logging.getLogger("JupyterHub")


def source_of(spawner: Any) -> str:
    return f"server:{spawner.user.name}/{spawner.name or ''}"


@dataclass
class Live:
    """What the hub knows of an open record between polls."""

    record: L.Record
    spawner: Any = None  # the JupyterHub spawner running it, while it does
    end_seen: float | None = None  # when the hub first saw its job end
    estimated: bool = False  # the end happened while the hub was down
    tracked_by_us: bool = False


class HubLedger:
    """Open records of this hub's servers, and the hooks that open and close them."""

    def __init__(self, store: LedgerStore | None = None) -> None:
        self.store = store
        self.live: dict[str, Live] = {}  # record id -> Live
        self.pollers: list[Any] = []
        self.ready = False  # the start-up reconciliation ran
        self._previous: tuple[Any, Any] = (None, None)

    # -- the store -------------------------------------------------------------------------
    def ledger(self, parent: Any) -> LedgerStore:
        if self.store is None:
            from .store import PortalDatabase

            self.store = LedgerStore(PortalDatabase(parent=parent).open())
        return self.store

    # -- hooks -----------------------------------------------------------------------------
    async def pre_spawn_hook(self, spawner: Any) -> None:
        await _call(self._previous[0], spawner)
        resolved = getattr(spawner, "resolved", None)
        if resolved is None:
            return  # not a portal spawner: nothing placed, nothing to record
        spawner.ledger_end_reason = ""
        ledger = self.ledger(spawner)
        source = source_of(spawner)
        old = ledger.open_for(source)
        if old is not None:  # a record left open by a stop the hub never finished
            self._close_lost(ledger, old)
        now = time.time()
        owner_type, owner = getattr(spawner, "ledger_charge_to", None) or (
            "user",
            spawner.user.name,
        )
        rec = L.open_record(
            resolved,
            user=spawner.user.name,
            role=_role(spawner.user),
            now=now,
            site=spawner.site.site_name_of(resolved.partition),
            source=source,
            owner_type=owner_type,
            owner=owner,
        )
        if spawner.backend == "local":
            rec = L.attach(rec, nodes="local", started_at=now)
        ledger.open(rec)
        self.live[rec.id] = Live(rec, spawner)
        poller = getattr(spawner, "poller", None)
        if poller is not None:
            self.listen(poller)
        spawner.log.info("Ledger: record %s opened for %s", rec.id, source)

    async def post_stop_hook(self, spawner: Any) -> None:
        try:
            if hasattr(spawner, "ledger_end_reason"):  # a portal spawner (even re-adopted)
                self._stopped(spawner)
        except Exception:
            spawner.log.exception("Ledger: closing the record of %s failed", source_of(spawner))
        finally:
            await _call(self._previous[1], spawner)

    def _stopped(self, spawner: Any) -> None:
        ledger = self.ledger(spawner)
        source = source_of(spawner)
        rec = ledger.open_for(source)
        if rec is None:
            return
        for key in [k for k, lv in self.live.items() if lv.spawner is spawner and k != rec.id]:
            self.live.pop(key)  # a warm record its student claimed (hub/class_start_api.py)
        live = self.live.setdefault(rec.id, Live(rec))
        live.spawner = None
        now = time.time()
        basis = "measured" if self.ready else "estimated"
        own = getattr(spawner, "ledger_end_reason", "")
        job_id = str(getattr(spawner, "job_id", "") or "")
        if spawner.backend == "local" or not job_id:
            # Local: the spawner says why (died, walltime), else the hub stopped it. Slurm
            # with no job: nothing was submitted, nothing is charged.
            self._close(ledger, live, own or "stopped", now, basis)
            return
        if job_id not in rec.job_ids:
            rec = live.record = ledger.attach(rec.id, job_ids=[job_id])
        info = spawner.poller.info(job_id)
        if not getattr(spawner, "stop_reason", ""):
            # The hub stopped it (its scancel: CANCELLED), unless the job had already ended
            # by itself, e.g. while the server was starting.
            ended = info is not None and not info.active and info.state != "CANCELLED"
            why = _job_reason(rec, info.state, now) if ended and info is not None else None
            self._close(ledger, live, own or why or "stopped", now, basis)
            return
        reason = own or (_job_reason(rec, info.state, now) if info is not None else None)
        if reason is not None:
            self._close(ledger, live, reason, now, basis)
            return
        # COMPLETING (or unknown): the final state comes with a later poll.
        live.end_seen, live.estimated = now, not self.ready
        self._track(spawner.poller, live)

    # -- closing ---------------------------------------------------------------------------
    def _close(self, ledger: LedgerStore, live: Live, reason: str, now: float, basis: str) -> None:
        rec = live.record
        end = live.end_seen or now
        if rec.started_at is None:
            end = rec.opened_at  # the job never ran: nothing held, nothing charged
        done = ledger.close(rec.id, reason=reason, ended_at=end, time_basis=basis)
        self.live.pop(rec.id, None)
        if live.tracked_by_us:
            for poller in self.pollers:
                for j in rec.job_ids:
                    if j not in poller.watchers:
                        poller.untrack(j)
        log.info("Ledger: record %s of %s closed: %s", rec.id, rec.source, done.end_reason)

    def _handed_over(self, live: Live) -> None:
        """The record was closed by the portal service: a pre-warmed server claimed by its
        student (its warm record closes, the student's own opens; hub/class_start_api.py).
        Follow the server's open record from now on."""
        assert self.store is not None
        self.live.pop(live.record.id, None)
        new = self.store.open_for(live.record.source)
        if new is not None:
            live.record = new
            self.live[new.id] = live

    def _close_lost(self, ledger: LedgerStore, rec: L.Record) -> None:
        live = self.live.pop(rec.id, None) or Live(rec)
        if rec.job_ids and self.pollers:
            self.live[rec.id] = live  # its job closes it (the poll's answer)
            self._track(self.pollers[0], live)
            return
        self._close(ledger, live, "died", time.time(), "estimated")

    def _track(self, poller: Any, live: Live) -> None:
        self.listen(poller)
        for j in live.record.job_ids:
            if j not in poller.tracked:
                poller.track(j)
                live.tracked_by_us = True

    # -- every poll ------------------------------------------------------------------------
    def listen(self, poller: Any) -> None:
        if any(p is poller for p in self.pollers):
            return
        self.pollers.append(poller)
        poller.listeners.append(lambda ok, p=poller: self.on_poll(p, ok))

    def on_poll(self, poller: Any, ok: bool) -> None:
        """After each batched poll: start running records, close those whose job ended."""
        if not ok or self.store is None:
            return
        now = time.time()
        for live in list(self.live.values()):
            try:
                self._reconcile(poller, live, now)
            except Exception:
                log.exception("Ledger: reconciling record %s failed", live.record.id)

    def _reconcile(self, poller: Any, live: Live, now: float) -> None:
        assert self.store is not None
        rec, sp = live.record, live.spawner
        if sp is not None:
            job_id = str(getattr(sp, "job_id", "") or "")
            info = poller.jobs.get(job_id) if job_id else None
            if info is not None and rec.started_at is None and info.state == "RUNNING":
                try:
                    live.record = self.store.attach(
                        rec.id, job_ids=[job_id], nodes=info.nodes, started_at=now
                    )
                except L.LedgerError:
                    self._handed_over(live)
            return  # a running server: its stop (post_stop_hook) closes it
        if not rec.job_ids:
            return
        for j in rec.job_ids:
            if j not in poller.tracked:
                # Followed to its end by its spawner, then dropped before its final state
                # reached us: the next batched poll answers for it.
                poller.track(j)
                live.tracked_by_us = True
        infos = [poller.jobs.get(j) for j in rec.job_ids]
        if any(i is None for i in infos):
            return
        reasons = [_job_reason(rec, i.state, live.end_seen or now) for i in infos]
        if any(r is None for r in reasons):
            if live.end_seen is None and any(i.ended for i in infos):
                live.end_seen = now
            return
        basis = "estimated" if live.estimated else "measured"
        self._close(self.store, live, str(reasons[0]), now, basis)

    # -- hub start-up ----------------------------------------------------------------------
    async def reconcile_at_start(self, app: Any, poller: Any | None) -> None:
        """After JupyterHub has re-adopted its servers: deal with every open record."""
        ledger = self.ledger(app)
        running = _running_spawners(app)
        if poller is not None:
            self.listen(poller)
        for rec in ledger.list_open("server:"):
            if rec.id in self.live:
                continue
            sp = running.get(rec.source)
            if sp is not None:
                self.live[rec.id] = Live(rec, sp)
            elif rec.job_ids and poller is not None:
                live = self.live[rec.id] = Live(rec, estimated=True)
                self._track(poller, live)
            else:
                self._close(ledger, Live(rec), "died", time.time(), "estimated")
        self.ready = True
        if poller is not None and any(lv.tracked_by_us for lv in self.live.values()):
            await poller.refresh()  # joins, or is, the poll the re-adopted servers need


def _job_reason(rec: L.Record, state: str, end: float) -> str | None:
    """Why a record's Slurm job ended: its final state, the walltime warning included."""
    from sovereign_portal.spawners.slurm.jobscript import SIGNAL_RESOLUTION_S, WALLTIME_WARNING_S

    start = rec.started_at if rec.started_at is not None else end
    return L.slurm_end_reason(
        state,
        seconds=end - start,
        walltime_minutes=rec.walltime_minutes,
        warning_s=WALLTIME_WARNING_S + SIGNAL_RESOLUTION_S,
    )


async def _call(hook: Any, spawner: Any) -> None:
    if hook is not None:
        out = hook(spawner)
        if inspect.isawaitable(out):
            await out


def _role(user: Any) -> str:
    from .admission import role_of

    groups = [g.name for g in getattr(user, "groups", []) or []]
    roles = [r.name for r in getattr(user, "roles", []) or []]
    return role_of(groups, admin=bool(getattr(user, "admin", False)), hub_roles=roles)


def _running_spawners(app: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for user in list(app.users.values()):
        for sp in list(user.spawners.values()):
            if sp.active or sp.ready:
                out[source_of(sp)] = sp
    return out


#: The ledger of this hub process (one per process, as the scheduler poller).
HUB_LEDGER = HubLedger()


async def pre_spawn_hook(spawner: Any) -> None:
    """``c.Spawner.pre_spawn_hook``: open the server's record (after earlier hooks)."""
    await HUB_LEDGER.pre_spawn_hook(spawner)


async def post_stop_hook(spawner: Any) -> None:
    """``c.Spawner.post_stop_hook``: close the server's record (before earlier hooks)."""
    await HUB_LEDGER.post_stop_hook(spawner)


def install(c: Any) -> HubLedger:
    """Set the ledger's spawner hooks on config ``c`` (around hooks already set) and
    schedule the start-up reconciliation when this runs inside a starting hub.

    The hooks are plain functions: JupyterHub deep-copies each spawner's config, and a
    function is copied as itself, so every spawner reaches the one ledger of the process.
    """
    hub = HUB_LEDGER
    pre = c.Spawner.pre_spawn_hook if "pre_spawn_hook" in c.Spawner else None
    post = c.Spawner.post_stop_hook if "post_stop_hook" in c.Spawner else None
    if pre is not pre_spawn_hook:
        hub._previous = (pre, post)
    c.Spawner.pre_spawn_hook = pre_spawn_hook
    c.Spawner.post_stop_hook = post_stop_hook
    _schedule_start(hub)
    return hub


def _schedule_start(hub: HubLedger) -> None:
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return
    from jupyterhub.app import JupyterHub

    if not JupyterHub.initialized():
        return
    app = JupyterHub.instance()

    async def after_start() -> None:
        from sovereign_portal.spawners.upstream import wait_hub_listening

        await wait_hub_listening(app)  # public route: the hub has re-adopted its servers
        poller = None
        try:
            from sovereign_portal.spawners.slurm.spawner import SlurmGPUSpawner

            cls = app.spawner_class
            if isinstance(cls, type) and issubclass(cls, SlurmGPUSpawner):
                poller = cls(config=app.config, log=app.log).poller
        except ImportError:
            pass
        try:
            await hub.reconcile_at_start(app, poller)
        except Exception:
            app.log.exception("Ledger: the start-up reconciliation failed")

    def schedule() -> None:
        task = asyncio.ensure_future(after_start())
        _TASKS.add(task)
        task.add_done_callback(_TASKS.discard)

    loop.call_soon(schedule)


_TASKS: set[asyncio.Task[None]] = set()
