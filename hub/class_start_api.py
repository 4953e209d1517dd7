"""Class starts on the portal service: the pre-warm engine and the class routes
(registered by :func:`.course_api.course_handlers`).

``GET  {prefix}api/courses/<id>/class``    the class view: the current or next class, its
                                           pre-warm, and each student's state
``POST {prefix}api/courses/<id>/prewarm``  pre-warm now (body ``{}`` or ``{"fraction": f}``):
                                           202 with the class view

Both are for the course's instructors, TAs and operators (:data:`.courses.PERMISSIONS`,
``class``). The engine (:class:`ClassEngine`) runs every
``CoursePolicy.class_start_interval_seconds``:

- **pre-warm**: a class is due ``prewarm.minutes`` before its start
  (:func:`.class_start.due`); the service starts the default server of the picked students
  (:func:`.class_start.pick`) through the hub's REST API with its own token, on the
  course's pre-warm size, so the server is the student's own (``user_options`` name the
  course and the size; the course and budget rules apply as to any spawn), with a
  walltime to the class's end plus ``CoursePolicy.prewarm_grace_minutes``. The roster is
  the course group plus students added by identifier who never logged in: the hub
  creates those (its own route, :mod:`.class_start_hub`; the service cannot). On Slurm with
  ``CoursePolicy.prewarm_reservations`` a reservation for the window comes first and the
  jobs run in it (``--reservation``, set by the hub's spawn hook, :func:`reservation_for`).
- **warm charging**: as soon as the hub has opened the server's ledger record and budget
  hold, the service marks the record ``role = "warm"`` (with a note) and moves the hold to
  the course pool's ``warm:<course>`` share: the warm time is charged to the course pool,
  never to the student's allowance.
- **claim**: the first OAuth token of the server's own client created after the
  pre-warm is the student opening it (:func:`.class_start.claim_time`). Then, at that
  instant, the warm record closes (``claimed``) and a record of the student's own opens,
  with a hold on their allowance for the rest of the walltime: every GPU-second is in
  exactly one record. A student whose allowance cannot hold it gets no warm server (it
  stops; its warm record closes, on the pool).
- **unclaimed**: ``prewarm.unclaimed_minutes`` into the class, warm servers nobody claimed
  stop; their records close ``stopped``, on the pool, as warm.
- at the end of the class its reservation is deleted.

The class view's ``position`` (a place in the hub's start queue) comes from the hub's
``start-queue`` route: the queue lives in the hub process.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import quote

from tornado.ioloop import IOLoop, PeriodicCallback

from . import class_start as CS
from . import ledger as L
from .class_start_store import (
    CLAIMED,
    FAILED,
    STARTING,
    UNCLAIMED,
    WARM,
    ClassStartStore,
)
from .course_store import ACTIVE, CoursePolicy, CourseStore
from .courses import Course, CourseError
from .store import utcnow

log = logging.getLogger("sovereign_portal.class_start")

#: The share of a course pool that warm time charges (budget charges' ``user``).
WARM_SHARE = "warm:{}"
#: Warm starts asked of the hub at once. Tornado's AsyncHTTPClient runs 10 requests at a
#: time and fails one that waits in its own queue past its connect timeout (20 s), and a
#: start in line takes the hub 10 s to answer: 8 leave room for the engine's other calls.
PREWARM_REQUESTS = 8


def _ts(t: datetime | None) -> str | None:
    return t.isoformat().replace("+00:00", "Z") if t is not None else None


class ClassEngine:
    """The class-start passes of one portal service. ``now`` is injectable (tests)."""

    def __init__(self, portal: Any, courses: CourseStore, now: Any = utcnow) -> None:
        self.portal, self.courses, self.now = portal, courses, now
        self.store = ClassStartStore(courses.store)
        self.policy = CoursePolicy(parent=portal)
        self._running = False
        #: (window key, student) whose warm start the engine is still asking the hub for
        self._asking: set[tuple[str, str]] = set()
        self._tasks: set[asyncio.Future[int]] = set()

    # -- the hub's REST API -----------------------------------------------------------------
    async def hub(self, method: str, path: str, body: Any = None) -> Any:
        from .course_api import hub_api

        return await hub_api(self.portal, method, path, body)

    async def servers(self, users: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The hub's word on many users' default servers, in one call per
        :data:`~.class_start_hub.MAX_USERS` (``POST /hub/api/sovereign-portal/class-servers``):
        per name the hub knows, ``server`` (its server model, or None), ``server_tokens``
        and ``groups``."""
        from .class_start_hub import MAX_USERS

        names = sorted(set(users))
        out: dict[str, dict[str, Any]] = {}
        for i in range(0, len(names), MAX_USERS):
            got = await self.hub(
                "POST", "/sovereign-portal/class-servers", {"users": names[i : i + MAX_USERS]}
            )
            out.update((got or {}).get("users") or {})
        return out

    async def _raw(self, method: str, path: str, body: Any = None) -> tuple[int, str]:
        """A hub call whose refusal is an answer (a spawn the hub refuses), not an error."""
        import json

        from jupyterhub.services.auth import HubAuth
        from tornado import httpclient

        auth: HubAuth = getattr(self.portal, "_hub_auth", None) or HubAuth()
        self.portal._hub_auth = auth
        resp = await httpclient.AsyncHTTPClient().fetch(
            f"{auth.api_url}{path}",
            method=method,
            headers={"Authorization": f"token {auth.api_token}"},
            body=None if body is None else json.dumps(body),
            allow_nonstandard_methods=True,
            raise_error=False,
            request_timeout=60,
        )
        return resp.code, resp.body.decode(errors="replace") if resp.body else ""

    # -- one pass ---------------------------------------------------------------------------
    async def tick(self) -> None:
        if self._running:
            return  # the previous pass is still at work (a slow hub): skip this one
        self._running = True
        try:
            now = self.now()
            for course, state in self.courses.rows():
                if state != ACTIVE or course.prewarm is None:
                    continue
                w = CS.window(course, now)
                if w is None or not CS.due(w, course.prewarm, now):
                    continue
                if self.store.window_row(w) is None:
                    try:
                        await self.prewarm(course, w, "schedule")
                    except Exception:
                        log.exception("Class %s: the pre-warm failed; retried next pass", w.key)
            for row in self.store.active_windows():
                try:
                    await self.follow(row)
                except Exception:
                    log.exception("Class %s@%s: a pass failed", row["course"], row["start"])
        finally:
            self._running = False

    async def prewarm(
        self,
        course: Course,
        w: CS.Window,
        actor: str,
        fraction: float | None = None,
        wait: bool = True,
    ) -> int:
        """Start the warm servers of ``w`` (those not started yet). Returns how many (with
        ``wait=False``, how many it asks the hub for, in the background)."""
        p = course.prewarm
        frac = fraction if fraction is not None else (p.fraction if p else 1.0)
        from .course_api import group_members

        members = await group_members(self.portal, course.group)
        changes = self.courses.roster(course.id)
        removed = set(changes["removed"])
        staff = set(course.instructors) | set(course.tas)
        # the group's members, and students an instructor added who never logged in
        everyone = set(members) | set(changes["added"])
        roster = sorted(m for m in everyone if m not in removed and m not in staff)
        chosen = CS.pick(roster, frac, w.key)
        reservation = None
        if self.policy.prewarm_reservations and chosen:
            reservation = await self.reserve(course, w, chosen)
        new = self.store.begin_window(w, chosen, actor, reservation)
        unknown = await self.create_users(course, w, [u for u in new if u not in set(members)])
        size = course.prewarm_size()
        todo = [u for u in new if u not in unknown]
        self._asking.update((w.key, u) for u in todo)
        log.info(
            "Class %s: pre-warm by %s, %d of %d students (%d new), size %s%s",
            w.key,
            actor,
            len(chosen),
            len(roster),
            len(todo),
            size,
            f", reservation {reservation}" if reservation else "",
        )
        run = self._start_all(course, w, todo, size)
        if wait:
            return await run
        task = asyncio.ensure_future(run)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return len(todo)

    async def _start_all(
        self, course: Course, w: CS.Window, users: list[str], size: str | None
    ) -> int:
        """Ask the hub for every warm server, :data:`PREWARM_REQUESTS` at a time. The hub
        answers a start that waits in its start queue only after ``slow_spawn_timeout``
        (10 s): one after the other, 30 students took 300 s just to be in line (the
        storm benchmark). The hub's start queue keeps the order and the pace."""
        gate = asyncio.Semaphore(PREWARM_REQUESTS)

        async def one(user: str) -> bool:
            try:
                async with gate:
                    return await self._start(course, w, user, size)
            except Exception:
                log.exception("Class %s: asking for the warm server of %s failed", w.key, user)
                return False
            finally:
                self._asking.discard((w.key, user))

        started = sum(await asyncio.gather(*(one(u) for u in users)))
        log.info("Class %s: the hub took %d of %d warm starts", w.key, started, len(users))
        return started

    async def create_users(self, course: Course, w: CS.Window, users: list[str]) -> set[str]:
        """Students on the roster that are not in the course's hub group yet (added by an
        instructor, never logged in): the hub creates those it does not know and puts
        them in the group (its ``courses/<id>/users`` route, :mod:`.class_start_hub`;
        the service cannot create users). Returns the users whose servers cannot start
        (their warm rows ``failed``, the reason kept)."""
        if not users:
            return set()
        import json

        code, body = await self._raw(
            "POST", f"/sovereign-portal/courses/{course.id}/users", {"users": users}
        )
        if code == 200:
            got = json.loads(body)
            if got.get("created"):
                log.info("Class %s: the hub created %s", w.key, ", ".join(got["created"]))
            return set()
        reason = f"hub: HTTP {code} {body[:160]}"
        for u in users:
            self.store.update(w.course, w.start, u, state=FAILED, reason=reason)
        log.warning("Class %s: the hub did not create %d users: %s", w.key, len(users), reason)
        return set(users)

    def walltime(self, w: CS.Window, size: str | None) -> int:
        """The warm server's walltime (:func:`.class_start.warm_walltime`): to the class's
        end plus ``CoursePolicy.prewarm_grace_minutes``, at most the longest walltime of
        the partitions that offer ``size``."""
        from sovereign_portal.spawners.request import MAX_WALLTIME_MINUTES
        from sovereign_portal.spawners.sizes import partition_sizes

        site = getattr(self.portal, "site", None)
        tops = [
            p.max_walltime_minutes
            for p in (site.partitions if site is not None else [])
            if any(s.id == size for s in partition_sizes(p))
        ]
        top = min(tops) if tops else MAX_WALLTIME_MINUTES
        return CS.warm_walltime(w, self.now(), self.policy.prewarm_grace_minutes, top)

    async def _start(self, course: Course, w: CS.Window, user: str, size: str | None) -> bool:
        q = quote(user, safe="")
        model = await self.hub("GET", f"/users/{q}")
        server = ((model or {}).get("servers") or {}).get("")
        if server is not None:
            # the student runs their server already: nothing to warm, nothing on the pool
            self.store.update(w.course, w.start, user, state=FAILED, reason="running already")
            return False
        from sovereign_portal.spawners.request import request_from_size_id

        options: dict[str, Any] = {"course": course.id}
        if size:
            options.update(request_from_size_id(size))
        options["walltime_minutes"] = self.walltime(w, size)
        code, body = await self._raw("POST", f"/users/{q}/server", options)
        if code not in (201, 202):
            self.store.update(
                w.course, w.start, user, state=FAILED, reason=f"hub: HTTP {code} {body[:160]}"
            )
            log.warning("Class %s: the warm server of %s was refused: %s", w.key, user, code)
            return False
        self.mark_warm(course, w, user)
        return True

    # -- warm charging ----------------------------------------------------------------------
    def _source(self, user: str) -> str:
        return f"server:{user}/"

    def mark_warm(self, course: Course, w: CS.Window, user: str) -> str | None:
        """The open ledger record of the warm server: ``role`` warm, charged to the course
        pool; its budget hold moved to the pool's warm share. Returns the record id."""
        from sqlalchemy import select, update

        from .budget_store import HELD, BudgetCharge
        from .ledger_store import records

        rows = {r["user"]: r for r in self.store.warm_rows(w.course, w.start)}
        row = rows.get(user)
        if row is None:
            return None
        since = row["requested_at"].timestamp() - 1.0
        source = self._source(user)
        store = self.courses.store
        note = f"warm: pre-warmed for {w.key}; charged to the course pool until claimed"
        with store.engine.begin() as conn:
            rec = conn.execute(
                select(records.c.id).where(
                    records.c.source == source,
                    records.c.ended_at.is_(None),
                    records.c.opened_at >= since,
                )
            ).first()
            if rec is None:
                return None
            conn.execute(
                update(records)
                .where(records.c.id == rec[0], records.c.ended_at.is_(None))
                .values(role=CS.WARM_ROLE, note=note, owner_type="course", owner=course.id)
            )
        with store.begin() as s:
            for charge in s.scalars(
                select(BudgetCharge).where(
                    BudgetCharge.ref == source,
                    BudgetCharge.state == HELD,
                    BudgetCharge.user == user,
                    BudgetCharge.created_at >= row["requested_at"] - timedelta(seconds=1),
                )
            ):
                charge.user = WARM_SHARE.format(course.id)
        if row["record_id"] != rec[0]:
            self.store.update(w.course, w.start, user, record_id=rec[0])
        return str(rec[0])

    # -- following a window -----------------------------------------------------------------
    async def follow(self, wrow: dict[str, Any]) -> None:
        try:
            course = self.courses.get(wrow["course"])
        except CourseError:
            self.store.close_window(wrow["course"], wrow["start"])
            return
        p = course.prewarm
        now = self.now()
        w = _stored_window(course, wrow["start"], wrow["end"])
        stop = CS.stop_at(w, p) if p else w.start
        rows = [
            r
            for r in self.store.warm_rows(w.course, w.start)
            if r["state"] not in (CLAIMED, UNCLAIMED, FAILED)
        ]
        # starts still being asked for when the hub answered: no server there is no news
        asking = set(self._asking)
        hub = await self.servers(r["user"] for r in rows)  # one call
        for row in rows:
            user = row["user"]
            q = quote(user, safe="")
            model = hub.get(user)
            server = (model or {}).get("server")
            if server is None:
                if (w.key, user) in asking or (w.key, user) in self._asking:
                    continue  # its start is still being asked for (_start_all)
                if now - row["requested_at"] > timedelta(seconds=30) or row["state"] == WARM:
                    self.store.update(
                        w.course, w.start, user, state=FAILED, stopped_at=now, reason="gone"
                    )
                continue
            if row["record_id"] is None:
                self.mark_warm(course, w, user)
            if row["state"] == STARTING and server.get("ready"):
                self.store.update(w.course, w.start, user, state=WARM, ready_at=now)
                row["state"] = WARM
            if row["state"] == WARM:
                got = (model or {}).get("server_tokens") or []
                claimed = CS.claim_time(got, row["requested_at"], server.get("url") or "")
                if claimed is not None:
                    # the full user model (roles, admin) once, at the claim
                    full = await self.hub("GET", f"/users/{q}")
                    await self.hand_over(course, w, user, full or {}, claimed)
                    continue
            if now >= stop:  # nobody claimed it (still starting, or warm and waiting)
                await self.hub("DELETE", f"/users/{q}/server")
                self.store.update(
                    w.course,
                    w.start,
                    user,
                    state=UNCLAIMED,
                    stopped_at=now,
                    reason=f"unclaimed {p.unclaimed_minutes if p else 0} min into the class",
                )
                log.info("Class %s: the unclaimed warm server of %s stopped", w.key, user)
        if now >= w.end:
            if wrow["reservation"]:
                await self.unreserve(wrow["reservation"])
            self.store.close_window(w.course, w.start)

    async def hand_over(
        self, course: Course, w: CS.Window, user: str, model: dict[str, Any], at: datetime
    ) -> None:
        """The claim: the warm record closes at ``at`` and the student's own opens then,
        with a hold on their allowance for the rest of the walltime."""
        from sovereign_portal.spawners.errors import PortalError

        from .admission import role_of
        from .ledger_store import LedgerStore

        rows = {r["user"]: r for r in self.store.warm_rows(w.course, w.start)}
        rid = rows[user]["record_id"] or self.mark_warm(course, w, user)
        ledger = LedgerStore(self.courses.store)
        warm = ledger.get(rid) if rid else None
        t = at.timestamp()
        if warm is None or warm.closed:
            self.store.update(w.course, w.start, user, state=CLAIMED, claimed_at=at)
            return
        groups = list(model.get("groups") or [])
        start = warm.started_at if warm.started_at is not None else warm.opened_at
        left = max(1, warm.walltime_minutes - int((t - start) // 60))
        try:
            # held from the claim on: the hold and the record that settles it share a start
            self.portal.budgets.admit(
                user, groups, warm.rates, left, f"the warm server of {w.key}", warm.source, now=at
            )
        except PortalError as e:
            await self.hub("DELETE", f"/users/{quote(user, safe='')}/server")
            self.store.update(
                w.course, w.start, user, state=FAILED, stopped_at=at, reason=str(e)[:255]
            )
            log.warning("Class %s: %s claimed a warm server but %s", w.key, user, e)
            return
        if warm.started_at is None:  # a Slurm job the hub's poll has not seen run yet
            ready = rows[user]["ready_at"]
            ledger.attach(warm.id, started_at=min(t, ready.timestamp() if ready else t))
        ledger.close(warm.id, reason="claimed", ended_at=t)
        role = role_of(
            frozenset(groups),
            bool(model.get("admin")),
            hub_roles=list(model.get("roles") or []),
        )
        mine = replace(
            warm,
            id=L.new_id(),
            role=role,
            note="",
            opened_at=round(t, 3),
            started_at=round(t, 3),
            ended_at=None,
            end_reason=None,
            amounts=None,
        )
        ledger.open(mine)
        self.store.update(w.course, w.start, user, state=CLAIMED, claimed_at=at, record_id=mine.id)
        log.info("Class %s: %s claimed their warm server (record %s)", w.key, user, mine.id)

    # -- Slurm reservations -----------------------------------------------------------------
    def unix_users(self, users: list[str]) -> list[str]:
        t = self.policy.reservation_user_template
        return [t.format(username=u, login=u.split("@", 1)[0]) for u in users]

    async def reserve(self, course: Course, w: CS.Window, users: list[str]) -> str | None:
        """Create the window's reservation: from now (or the window's pre-warm) to its end
        plus ``CoursePolicy.prewarm_grace_minutes``, as long as the warm servers' walltime
        (Slurm starts no job in a reservation that would outlive it)."""
        from sovereign_portal.spawners.slurm.client import SlurmError, call

        start = max(self.now(), CS.prewarm_at(w, course.prewarm)) if course.prewarm else w.start
        start = start.replace(second=0, microsecond=0)
        end = w.end + timedelta(minutes=self.policy.prewarm_grace_minutes)
        minutes = max(1, int((end - start).total_seconds() // 60) + 1)
        argv = CS.reservation_create_argv(
            w.reservation,
            self.unix_users(users),
            start,
            minutes,
            partition=self.policy.prewarm_partition,
            node_count=self.policy.reservation_nodes,
            nodes=list(self.policy.reservation_node_names),
        )
        try:
            await call(argv, timeout=30)
        except SlurmError as e:
            try:  # made by an earlier pass (Slurm calls a second one an overlap)
                await call(["scontrol", "show", "reservation", w.reservation], timeout=30)
            except SlurmError:
                log.warning("Class %s: no reservation (%s); submitting early", w.key, e)
                return None
        log.info("Class %s: reservation %s", w.key, w.reservation)
        return w.reservation

    async def unreserve(self, name: str) -> None:
        from sovereign_portal.spawners.slurm.client import SlurmError, call

        try:
            await call(CS.reservation_delete_argv(name), timeout=30)
            log.info("Reservation %s deleted (the class ended)", name)
        except SlurmError as e:
            said = (e.stderr + e.stdout).lower()
            if "invalid reservation name" not in said and "reservation is invalid" not in said:
                raise  # anything but "no such reservation" (gone already)

    # -- the class view ---------------------------------------------------------------------
    async def places(self) -> dict[str, int]:
        """Who waits in the hub's start queue, and where (1 is next): the hub's
        ``start-queue`` route (:mod:`.class_start_hub`; the queue lives in the hub
        process). Empty when the hub has no such route (it answers 404)."""
        got = await self.hub("GET", "/sovereign-portal/start-queue")
        places = (got or {}).get("places") or {}
        return {str(u): int(p) for u, p in places.items() if isinstance(p, int)}

    async def view(self, course: Course) -> dict[str, Any]:
        from .course_api import group_members

        now = self.now()
        w = CS.window(course, now)
        p = course.prewarm
        wrow = self.store.window_row(w) if w else None
        rows = {r["user"]: r for r in self.store.warm_rows(w.course, w.start)} if w else {}
        staff = set(course.instructors) | set(course.tas)
        changes = self.courses.roster(course.id)
        roster = set(await group_members(self.portal, course.group)) | set(changes["added"])
        members = [m for m in roster if m not in staff and m not in set(changes["removed"])]
        places = await self.places()
        students = []
        started = 0
        everyone = sorted(set(members) | set(rows))
        hub = await self.servers(everyone)  # one call for the class
        for user in everyone:
            server = (hub.get(user) or {}).get("server")
            row = rows.get(user)
            if row is not None and row["state"] in (WARM, CLAIMED, UNCLAIMED):
                started += 1
            state = CS.student_state(row["state"] if row else None, server)
            position = places.get(user)
            if position is not None and state not in ("warm", "claimed"):
                state = "queued"  # in the hub's start queue, at that place
            else:
                position = None
            since = None
            if row is not None:
                since = (
                    row["claimed_at"] or row["stopped_at"] or row["ready_at"] or row["requested_at"]
                )
            elif server is not None:
                since = CS.parse_time(server.get("started"))
            students.append(
                {
                    "user": user,
                    "state": state,
                    "since": _ts(since),
                    "reason": (row or {}).get("reason"),
                    "position": position,
                }
            )
        requested = wrow["requested"] if wrow else 0
        return {
            "course": course.id,
            "slot": w.slot.to_json() if w else None,
            "window": w.to_json() if w else None,
            "prewarm": {
                "state": CS.prewarm_state(w, p, requested, started, now),
                "reservation": wrow["reservation"] if wrow else None,
                "requested": requested,
                "started": started,
            },
            "students": students,
        }


def _stored_window(course: Course, start: datetime, end: datetime) -> CS.Window:
    """The window of a stored pre-warm (its slot: the schedule's, or as stored)."""
    from .courses import WEEKDAYS, ClassSlot

    minutes = max(1, int((end - start).total_seconds() // 60))
    slot = ClassSlot(WEEKDAYS[start.weekday()], start.strftime("%H:%M"), minutes)
    for s in course.schedule:
        if (s.weekday, s.time) == (slot.weekday, slot.time):
            slot = s
    return CS.Window(course.id, slot, start, end)


# -- handlers ----------------------------------------------------------------------------------
def engine_of(portal: Any, courses: CourseStore) -> ClassEngine:
    eng: ClassEngine | None = getattr(portal, "_class_engine", None)
    if eng is None:
        eng = ClassEngine(portal, courses)
        setattr(portal, "_class_engine", eng)  # noqa: B010 (one engine per service)
    return eng


def _handlers() -> tuple[type, type]:
    from .course_api import _CourseBase, _CourseBody

    class ClassHandler(_CourseBase):
        async def get(self, course_id: str) -> None:
            course, _ = self.course_for(course_id, "class")
            self.finish(await engine_of(self.portal, self.courses).view(course))

    class PrewarmHandler(_CourseBody):
        async def post(self, course_id: str) -> None:
            raw = await self.json()
            course, _ = self.course_for(course_id, "class")
            assert self.caller is not None
            if not isinstance(raw, dict):
                raise CourseError("body", 'send {} or {"fraction": 0..1}')
            unknown = sorted(k for k in raw if k != "fraction")
            if unknown:
                raise CourseError(unknown[0][:40], 'unknown field; send {} or {"fraction": 0..1}')
            eng = engine_of(self.portal, self.courses)
            top = eng.policy.max_prewarm_fraction
            fraction = raw.get("fraction")
            if fraction is not None and (
                isinstance(fraction, bool)
                or not isinstance(fraction, int | float)
                or not 0 < fraction <= top
            ):
                raise CourseError(
                    "fraction", f"must be a number above 0 and at most {top:g}, got {fraction!r}"
                )
            if self.courses.state(course.id) != ACTIVE:
                raise CourseError("course", f"course {course.id} has ended", status=409)
            if course.prewarm_size() is None:
                raise CourseError(
                    "prewarm", "set the course's prewarm settings (and a size) first", status=409
                )
            w = CS.window(course, eng.now())
            if w is None:
                raise CourseError(
                    "schedule", "the course has no class ahead to pre-warm for", status=409
                )
            if course.prewarm is not None and eng.now() >= CS.stop_at(w, course.prewarm):
                raise CourseError(
                    "schedule",
                    "this class is past its unclaimed-stop time; nothing to pre-warm",
                    status=409,
                )
            # the starts go on in the background (minutes for a big class): 202 at once,
            # and the class view follows them
            await eng.prewarm(course, w, self.caller.name, fraction, wait=False)
            self.set_status(202)
            self.finish(await eng.view(course))

    return ClassHandler, PrewarmHandler


def class_handlers(portal: Any, base: str, course_id: str) -> list[tuple[str, type]]:
    """The class routes under ``base`` (``.../api/courses``); starts the engine's passes."""

    def start() -> None:
        courses = getattr(portal, "_course_store", None) or CourseStore(portal.budgets.store)
        eng = engine_of(portal, courses)
        seconds = eng.policy.class_start_interval_seconds
        PeriodicCallback(eng.tick, seconds * 1000).start()

    IOLoop.current().add_callback(start)
    get, post = _handlers()
    return [
        (base + "/" + course_id + "/class", get),
        (base + "/" + course_id + "/prewarm", post),
    ]


def reservation_for(store: ClassStartStore, user: str) -> str | None:
    """The reservation a warm server of ``user`` being started now runs in (the hub's
    spawn asks), or None."""
    row = store.starting_for(user)
    return row["reservation"] if row else None


__all__ = ["ClassEngine", "class_handlers", "reservation_for"]
