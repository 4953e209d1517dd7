"""Courses in the portal database (Alembic revision 0005), and the operator's course policy.

The rules are :mod:`.courses` (pure); this module keeps a course's spec, its staff and its
roster changes in three tables, and its pool in the budget tables through
:class:`.budget_store.BudgetStore` (the same rules and audit events as ``sovereign-portal
budgets``). Every write is one transaction: bad input (a :class:`.courses.CourseError`
naming the field) changes nothing, and every change is an audit event.

- :class:`CoursePolicy` (``c.CoursePolicy``): who may create courses and the limits on
  them, where course data lives, the site's images;
- :class:`CourseStore`: create, edit, the roster, memberships at login, the end of a course.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from sovereign_portal.spawners.site import Site
from sovereign_portal.spawners.sizes import partition_sizes
from sqlalchemy import ForeignKey, Index, String, Text, select
from sqlalchemy.orm import Mapped, Session, mapped_column
from traitlets import Bool, Dict, Int, List, Unicode
from traitlets import Float as FloatTrait
from traitlets.config import Configurable

from .budgets import BudgetError
from .courses import (
    Course,
    CourseError,
    Limits,
    Memberships,
    SiteOffer,
    apply_changes,
    check_user,
    course_role,
    parse_course,
    phase,
)
from .store import AuditEvent, Base, PortalStore, UTCDateTime, utcnow

ACTIVE, ENDED, PURGED = "active", "ended", "purged"
#: The hub's CoursePolicy options for the portal service (a separate process), as JSON in
#: its environment (:func:`install`).
COURSES_ENV = "SOVEREIGN_PORTAL_COURSES"
ADDED, REMOVED = "added", "removed"
#: Audit action of a staff member opening a student's server (the student sees these).
SERVER_ACCESS = "course.server_access"


class CourseRow(Base):
    __tablename__ = "courses"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    title: Mapped[str] = mapped_column(String(255))
    spec: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16))
    created_by: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_by: Mapped[str] = mapped_column(String(255))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    purged_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    __table_args__ = (Index("ix_courses_created_by", "created_by"),)


class CourseStaff(Base):
    __tablename__ = "course_staff"

    course_id: Mapped[str] = mapped_column(String(40), ForeignKey("courses.id"), primary_key=True)
    user: Mapped[str] = mapped_column(String(255), primary_key=True)
    role: Mapped[str] = mapped_column(String(16))

    __table_args__ = (Index("ix_course_staff_user", "user"),)


class CourseRosterRow(Base):
    __tablename__ = "course_roster"

    course_id: Mapped[str] = mapped_column(String(40), ForeignKey("courses.id"), primary_key=True)
    user: Mapped[str] = mapped_column(String(255), primary_key=True)
    state: Mapped[str] = mapped_column(String(16))
    updated_by: Mapped[str] = mapped_column(String(255))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())

    __table_args__ = (Index("ix_course_roster_user", "user"),)


def _course(row: CourseRow) -> Course:
    return parse_course(json.loads(row.spec), _ANY_OFFER)


class _All(frozenset[str]):
    """Reading back a stored course: what was valid when it was written stays readable."""

    def __contains__(self, item: object) -> bool:
        return True


_ANY_OFFER = SiteOffer(sizes=_All(), images=_All(), data_root=None)


def site_offer(
    site: Site,
    images: Iterable[str] | None,
    data_root: str = "",
    server_access: bool = True,
    **bounds: Any,
) -> SiteOffer:
    """What a course on ``site`` may name: its one-node size ids, the allow-list's images
    (None: the site has none), the data root, whether staff may open servers, and the
    operator's class-start ``bounds`` (``max_prewarm_minutes`` ...; :class:`SiteOffer`)."""
    sizes = frozenset(s.id for p in site.partitions for s in partition_sizes(p) if s.nodes == 1)
    return SiteOffer(
        sizes=sizes,
        images=frozenset(images) if images is not None else None,
        data_root=data_root or None,
        server_access=server_access,
        **bounds,
    )


class CourseStore:
    """Courses, their staff and rosters on a :class:`.store.PortalStore`."""

    def __init__(self, store: PortalStore) -> None:
        self.store = store

    # -- reading ----------------------------------------------------------------------------
    def get(self, course_id: Any) -> Course:
        with self.store.begin() as s:
            return _course(self._row(s, course_id))

    def state(self, course_id: str) -> str:
        with self.store.begin() as s:
            return self._row(s, course_id).state

    def _row(self, s: Session, course_id: Any) -> CourseRow:
        row = s.get(CourseRow, course_id) if isinstance(course_id, str) else None
        if row is None:
            raise CourseError("course", f"no course {str(course_id)[:40]!r}", status=404)
        return row

    def all(self) -> list[Course]:
        with self.store.begin() as s:
            return [_course(r) for r in s.scalars(select(CourseRow).order_by(CourseRow.id))]

    def rows(self) -> list[tuple[Course, str]]:
        """Every course with its state (active, ended, purged)."""
        with self.store.begin() as s:
            q = select(CourseRow).order_by(CourseRow.id)
            return [(_course(r), r.state) for r in s.scalars(q)]

    def courses_for(
        self, user: str, groups: Iterable[str], operator: bool = False
    ) -> list[tuple[Course, str]]:
        """The courses ``user`` has a role in, with that role (operators: every course)."""
        gs = set(groups)
        out = []
        for c in self.all():
            role = course_role(c, user, gs, operator)
            if role is not None:
                out.append((c, role))
        return out

    def student_courses(self, user: str, groups: Iterable[str]) -> list[Course]:
        """The active courses whose group ``user`` is in (a course server is for one)."""
        gs = set(groups)
        with self.store.begin() as s:
            rows = s.scalars(select(CourseRow).where(CourseRow.state == ACTIVE)).all()
            return [c for r in rows if (c := _course(r)).group in gs]

    # -- writing ------------------------------------------------------------------------------
    def create(
        self,
        raw: Any,
        offer: SiteOffer,
        actor: str,
        *,
        limits: Limits | None = None,
    ) -> Course:
        """A new course; ``limits`` (a creator who is not an operator) are checked first."""
        course = parse_course(raw, offer)
        with self.store.begin() as s:
            if s.get(CourseRow, course.id) is not None:
                raise CourseError("id", f"a course {course.id} exists already", status=409)
            if limits is not None:
                owned = s.scalars(
                    select(CourseRow.id).where(
                        CourseRow.created_by == actor, CourseRow.state == ACTIVE
                    )
                ).all()
                limits.check(course, len(owned))
            now = utcnow()
            s.add(
                CourseRow(
                    id=course.id,
                    title=course.title,
                    spec=json.dumps(course.to_json(), sort_keys=True),
                    state=ACTIVE,
                    created_by=actor,
                    created_at=now,
                    updated_by=actor,
                    updated_at=now,
                )
            )
            s.flush()
            self._put_staff(s, course)
            self._put_budget(s, course, actor)
            self._audit(s, actor, "course.create", course.id, **course.to_json())
        return course

    def update(
        self, course_id: str, changes: Any, offer: SiteOffer, actor: str, *, operator: bool = False
    ) -> Course:
        """Apply a partial change; validated as a whole, written in one transaction."""
        with self.store.begin() as s:
            row = self._row(s, course_id)
            if row.state != ACTIVE:
                raise CourseError("course", f"course {course_id} has {row.state}", status=409)
            old = _course(row)
            course = apply_changes(old, changes, offer, operator=operator)
            row.title, row.spec = course.title, json.dumps(course.to_json(), sort_keys=True)
            row.updated_by, row.updated_at = actor, utcnow()
            self._put_staff(s, course)
            if course.budget != old.budget:
                self._put_budget(s, course, actor)
            changed = sorted(k for k in changes if course.to_json()[k] != old.to_json()[k])
            self._audit(s, actor, "course.update", course.id, changed=changed, **changes)
        return course

    def _put_staff(self, s: Session, course: Course) -> None:
        for r in s.scalars(select(CourseStaff).where(CourseStaff.course_id == course.id)):
            s.delete(r)
        s.flush()
        for u in course.instructors:
            s.add(CourseStaff(course_id=course.id, user=u, role="instructor"))
        for u in course.tas:
            s.add(CourseStaff(course_id=course.id, user=u, role="ta"))
        s.flush()

    def _put_budget(self, s: Session, course: Course, actor: str) -> None:
        """The course pool in the budget tables: the budgets' own rules and audit events. A
        period that exists is used as it is; otherwise it is the course's dates."""
        b = course.budget
        if b is None:
            return
        from .budget_store import BudgetPeriod, BudgetStore

        bs = BudgetStore(self.store)
        exists = s.get(BudgetPeriod, b.period) is not None
        try:
            bs._set_budget(
                s,
                f"course:{course.id}",
                b.period,
                b.unit,
                b.pool,
                b.per_student,
                None if exists else course.start.isoformat(),
                None if exists else course.end.isoformat(),
                actor,
            )
        except BudgetError as e:
            name = "pool" if e.field == "amount" else e.field
            raise CourseError(f"budget.{name}", str(e).split(": ", 1)[-1]) from None

    # -- the roster ---------------------------------------------------------------------------
    def roster(self, course_id: str) -> dict[str, list[str]]:
        """The portal's own roster changes: who was added and who was removed."""
        with self.store.begin() as s:
            self._row(s, course_id)
            q = select(CourseRosterRow).where(CourseRosterRow.course_id == course_id)
            out: dict[str, list[str]] = {ADDED: [], REMOVED: []}
            for r in s.scalars(q.order_by(CourseRosterRow.user)):
                out[r.state].append(r.user)
            return out

    def change_roster(
        self,
        course_id: str,
        add: Iterable[str] = (),
        remove: Iterable[str] = (),
        actor: str = "operator",
    ) -> dict[str, list[str]]:
        """Add and remove students by institutional identifier, all or nothing. Returns
        ``{"added": [...], "removed": [...]}`` of this change."""
        adds = [check_user(u, f"add[{i}]") for i, u in enumerate(add)]
        removes = [check_user(u, f"remove[{i}]") for i, u in enumerate(remove)]
        both = sorted(set(adds) & set(removes))
        if both:
            raise CourseError("remove", f"{both[0]} is both added and removed")
        with self.store.begin() as s:
            row = self._row(s, course_id)
            if row.state != ACTIVE:
                raise CourseError("course", f"course {course_id} has {row.state}", status=409)
            now = utcnow()
            for users, state in ((adds, ADDED), (removes, REMOVED)):
                for u in users:
                    r = s.get(CourseRosterRow, (course_id, u))
                    if r is None:
                        s.add(
                            CourseRosterRow(
                                course_id=course_id,
                                user=u,
                                state=state,
                                updated_by=actor,
                                updated_at=now,
                            )
                        )
                    else:
                        r.state, r.updated_by, r.updated_at = state, actor, now
            self._audit(
                s, actor, "course.roster", course_id, added=len(adds), removed=sorted(removes)
            )
        return {ADDED: adds, REMOVED: removes}

    def memberships(self, user: str) -> Memberships:
        """What the portal adds to (or takes from) ``user``'s IdP groups at login; courses
        that ended are left out (their staff and students keep no course role). At every
        login: a read-only transaction, which never waits behind a writer."""
        with self.store.read() as s:
            active = set(s.scalars(select(CourseRow.id).where(CourseRow.state == ACTIVE)))
            roster = s.scalars(select(CourseRosterRow).where(CourseRosterRow.user == user))
            added = {r.course_id for r in roster if r.state == ADDED}
            roster = s.scalars(select(CourseRosterRow).where(CourseRosterRow.user == user))
            removed = {r.course_id for r in roster if r.state == REMOVED}
            staff = s.scalars(select(CourseStaff).where(CourseStaff.user == user)).all()
            return Memberships(
                added=frozenset(added & active),
                removed=frozenset(removed),
                teaching=frozenset(r.course_id for r in staff if r.role == "instructor") & active,
                assisting=frozenset(r.course_id for r in staff if r.role == "ta") & active,
            )

    # -- access to students' servers ----------------------------------------------------------
    def record_access(self, course_id: str, student: str, actor: str, why: str) -> None:
        """Record that ``actor`` opened ``student``'s server (the student sees it)."""
        with self.store.begin() as s:
            self._audit(s, actor, SERVER_ACCESS, student, course=course_id, reason=why)

    def access_log(self, student: str) -> list[dict[str, Any]]:
        """Every time staff opened ``student``'s server: who, when, for which course."""
        with self.store.begin() as s:
            q = (
                select(AuditEvent)
                .where(AuditEvent.action == SERVER_ACCESS, AuditEvent.target == student)
                .order_by(AuditEvent.id)
            )
            return [{"at": e.at.isoformat(), "by": e.actor, **e.details} for e in s.scalars(q)]

    def audit_events(self, course_id: str) -> list[dict[str, Any]]:
        with self.store.begin() as s:
            q = select(AuditEvent).where(AuditEvent.target == course_id).order_by(AuditEvent.id)
            return [
                {"at": e.at.isoformat(), "actor": e.actor, "action": e.action, **e.details}
                for e in s.scalars(q)
            ]

    # -- the end of a course ------------------------------------------------------------------
    def mark(self, course_id: str, state: str, actor: str, **detail: Any) -> None:
        with self.store.begin() as s:
            row = self._row(s, course_id)
            row.state = state
            if state == ENDED:
                row.ended_at = utcnow()
            if state == PURGED:
                row.purged_at = utcnow()
            self._audit(s, actor, f"course.{state}", course_id, **detail)

    def due(self, now: datetime) -> list[tuple[Course, str]]:
        """Courses whose end (``ended``) or retention (``purge``) has come and not been
        acted on yet, with what to do."""
        out = []
        for c, state in self.rows():
            p = phase(c, now)
            if state == ACTIVE and p in ("ended", "purge"):
                out.append((c, "end"))
            elif state == ENDED and p == "purge":
                out.append((c, "purge"))
        return out

    # -- audit --------------------------------------------------------------------------------
    def _audit(self, s: Session, actor: str, action: str, target: str, **detail: Any) -> None:
        s.add(
            AuditEvent(
                at=utcnow(),
                actor=actor[:255],
                action=action,
                target=target[:255],
                detail=json.dumps(detail, default=str, sort_keys=True),
            )
        )


# -- the course data folder ----------------------------------------------------------------------
def make_read_only(path: str | os.PathLike[str]) -> int:
    """Take write permission off every file and folder under ``path`` (the end of a course:
    staff and students keep reading). Returns how many entries changed. Symlinks are not
    followed."""
    root = Path(path)
    if not root.exists():
        return 0
    n = 0
    for p in [root, *root.rglob("*")]:
        st = p.lstat()
        if stat.S_ISLNK(st.st_mode):
            continue
        mode = stat.S_IMODE(st.st_mode)
        ro = mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
        if ro != mode:
            os.chmod(p, ro)
            n += 1
    return n


def delete_data(path: str | os.PathLike[str]) -> bool:
    """Delete the course data folder (after the retention period). True when it existed."""
    root = Path(path)
    if not root.exists():
        return False
    for p in [root, *root.rglob("*")]:
        if p.is_dir() and not p.is_symlink():
            os.chmod(p, 0o700)  # read-only folders cannot be emptied
    shutil.rmtree(root)
    return True


class CourseSpawnGate:
    """The course step of a notebook spawn, from the hub side (spawners never import hub).

    :func:`.portal.configure` sets :meth:`display` (``course_display``) and
    :meth:`apply_user_options` on ``c.Spawner``; the latter runs the backend's own step
    (validation, placement) inside it. A student of a course gets its sizes and image on
    the form (a student of several picks the course first); whatever the form or a REST
    spawn sends is checked against the course (:func:`.courses.check_spawn`, the one rule):
    another size or image is a 403 naming the course rule, before anything is held or
    submitted. The server's
    ``user_options`` keep the course's id (the end of a course stops those servers).
    """

    def __init__(self) -> None:
        self._stores: dict[str, CourseStore] = {}

    def __deepcopy__(self, memo: Any) -> CourseSpawnGate:
        return self  # traitlets deep-copies config values; every spawner shares one gate

    def store(self, spawner: Any) -> CourseStore:
        from .store import PortalDatabase

        url = PortalDatabase(parent=spawner).url
        if url not in self._stores:
            self._stores[url] = CourseStore(PortalDatabase(parent=spawner).open())
        return self._stores[url]

    def courses(self, spawner: Any) -> list[Course]:
        groups = [g.name for g in getattr(spawner.user, "groups", []) or []]
        return self.store(spawner).student_courses(spawner.user.name, groups)

    def display(self, spawner: Any) -> tuple[set[str] | None, set[str] | None, list[Any]]:
        """``course_display`` of the spawn form: the sizes and images of the user's courses
        (None where a course does not narrow them), and the courses to pick from first."""
        courses = self.courses(spawner)
        if not courses:
            return None, None, []
        sizes = {s for c in courses for s in c.sizes} if all(c.sizes for c in courses) else None
        images = {str(c.image) for c in courses} if all(c.image for c in courses) else None
        pick = [(c.id, c.title) for c in courses] if len(courses) > 1 else []
        return sizes, images, pick

    def reservation_for(self, spawner: Any) -> str | None:
        """``reservation_for`` of the Slurm spawner: the class reservation of a server the
        portal service is pre-warming for this user (:mod:`.class_start_api`), or None."""
        if spawner.name:
            return None  # class starts warm the default server only
        from .class_start_api import reservation_for
        from .class_start_store import ClassStartStore

        return reservation_for(ClassStartStore(self.store(spawner).store), spawner.user.name)

    async def apply_user_options(self, spawner: Any, options: Any) -> Any:
        """The course step, then the backend's own ``apply_user_options`` (validation, and
        placement where the backend places), then the course rule on the result."""
        import inspect

        from sovereign_portal.spawners.errors import PortalError

        from .courses import check_spawn, pick_course

        opts = dict(options) if isinstance(options, dict) else options
        chosen = opts.pop("course", None) if isinstance(opts, dict) else None
        try:
            course = pick_course(self.courses(spawner), chosen)
        except PortalError as e:
            raise spawner.portal_error(e) from None
        inner = spawner.trait_defaults("apply_user_options")  # the backend's, not config's
        if not callable(inner):
            if not hasattr(spawner, "validate_request"):
                return None  # not a portal spawner: no request, no course rule
            out = spawner.validate_request(opts)
        else:
            out = inner(spawner, opts)
        if inspect.isawaitable(out):
            out = await out
        resolved = getattr(spawner, "resolved", None)
        if course is None or resolved is None:
            return out
        try:
            check_spawn(course, resolved.size.id, resolved.request.image)
        except PortalError as e:
            raise spawner.portal_error(e) from None
        kept = {**(opts if isinstance(opts, dict) else {}), "course": course.id}
        spawner.user_options = kept
        if getattr(spawner, "orm_spawner", None) is not None:
            spawner.orm_spawner.user_options = kept
        return out


class CoursePolicy(Configurable):
    """Who may create courses and the limits on them (``c.CoursePolicy``). Operators
    (JupyterHub admins) always may; instructors edit the rest of their own courses."""

    creators = List(
        Unicode(),
        config=True,
        help="""Who may create a course besides operators: user names
        (alice@uni-a.example) and hub groups prefixed with "group:"
        (e.g. "group:faculty"). Empty: only operators create courses. A creator becomes
        subject to the limits below (max_courses, max_pool, max_days).""",
    )
    max_courses = Int(
        10,
        config=True,
        help="""How many active courses one creator (not an operator) may run at once.""",
    )
    max_pool = Dict(
        key_trait=Unicode(),
        value_trait=FloatTrait(),
        config=True,
        help="""The largest course pool a creator (not an operator) may give a course, per
        unit: {"gpu_hours": 500, "eur": 2000, "kwh": 1000}. A unit not named has no limit
        besides the budgets' own maximum.""",
    )
    max_days = Int(
        366,
        config=True,
        help="""How long a course made by a creator (not an operator) may last, start to end,
        in days.""",
    )
    data_root = Unicode(
        "",
        config=True,
        help="""Folder under which course data folders must lie (data_path), e.g.
        /srv/courses. Empty: any absolute path. The portal makes the folder read-only at
        the course's end date and deletes it after the retention period.""",
    )
    image_allow_list = Unicode(
        "",
        config=True,
        help="""The image allow-list (TOML) a course's image must come from; the same file
        as c.SlurmGPUSpawner.image_allow_list. Empty: the site has no images, so a course
        names none.""",
    )
    server_access = Bool(
        False,
        config=True,
        help="""Whether a course may let its staff open students' servers
        (ta_server_access, off by default in each course). Each opening is recorded in the
        audit log, shown to the student (GET api/courses/access), and done as a JupyterHub
        share of that one server with that staff member; the portal service's role then
        gets the "shares" scope. Off: no course can turn it on.""",
    )
    lifecycle_interval_seconds = Int(
        300,
        config=True,
        help="""Seconds between the portal service's checks for courses that reached their
        end date (data read-only, students' course servers stopped) or the end of their
        retention period (data deleted). Each action is logged and audited.""",
    )

    max_prewarm_minutes = Int(
        60,
        config=True,
        help="""The most minutes before a class a course may pre-warm its students'
        servers (the course's prewarm.minutes, 1 to this). Pre-warmed servers run on the
        course pool, marked "warm", until their student claims them.""",
    )
    max_unclaimed_minutes = Int(
        30,
        config=True,
        help="""The most minutes into a class that a pre-warmed server nobody claimed may
        keep running (the course's prewarm.unclaimed_minutes, 0 to this); then it stops.""",
    )
    max_prewarm_fraction = FloatTrait(
        1.0,
        config=True,
        help="""The largest share of a course's roster that may be pre-warmed (the course's
        prewarm.fraction, above 0 and at most this; 1.0: everyone).""",
    )
    prewarm_reservations = Bool(
        False,
        config=True,
        help="""On Slurm, whether a class's pre-warm first creates a Slurm reservation for
        the class window (scontrol create reservation: the course's Unix users, the
        window's start and duration, the nodes its servers need; the portal's Slurm user
        must be a Slurm operator). The reservation is deleted when the class ends. Off:
        the pre-warm submits its jobs early, in the normal queue.""",
    )
    prewarm_partition = Unicode(
        "",
        config=True,
        help="""The Slurm partition whose nodes a class reservation takes
        (prewarm_reservations). Empty: the site's default partition.""",
    )
    reservation_user_template = Unicode(
        "{login}",
        config=True,
        help="""The Unix user a class reservation names for each student
        (prewarm_reservations), as c.SlurmGPUSpawner.unix_user_template makes it:
        {username} is the portal user name (alice@uni-a.example), {login} the part before
        the "@".""",
    )
    reservation_nodes = Int(
        1,
        config=True,
        help="""How many nodes of prewarm_partition a class reservation takes
        (prewarm_reservations). A pre-warmed class needs its students' MIG slices: one
        8-GPU node of 1g.10gb slices holds 56 students.""",
    )
    reservation_node_names = List(
        Unicode(),
        config=True,
        help="""The nodes a class reservation takes, by name (e.g. the MIG nodes whose
        slices the course's size needs: ["mig-a", "mig-b"]). Empty: reservation_nodes
        nodes of prewarm_partition, as Slurm picks them.""",
    )
    prewarm_grace_minutes = Int(
        10,
        config=True,
        help="""Minutes past the end of a class that a pre-warmed server keeps running: its
        walltime runs from the pre-warm to the class's end plus this, capped by the
        longest walltime of the partitions that offer the pre-warm size (not the size's
        default walltime). A student who claimed it keeps it that long; a server nobody
        claimed stops unclaimed_minutes into the class anyway.""",
    )
    class_start_interval_seconds = Int(
        30,
        config=True,
        help="""Seconds between the portal service's class-start passes: start the
        pre-warm of classes about to begin, hand claimed servers to their students (the
        ledger's warm record closes, the student's own begins), stop servers nobody
        claimed, and delete reservations of classes that ended.""",
    )

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        raw = os.environ.get(COURSES_ENV)
        if not raw:
            return
        from sovereign_portal.spawners.strict import loads_json

        data = loads_json(raw, what=COURSES_ENV)
        if not isinstance(data, dict):
            raise ValueError(f"{COURSES_ENV} must be a JSON object of CoursePolicy options")
        configured = self.config.get("CoursePolicy", {})
        names = set(self.trait_names(config=True))
        for key, value in data.items():
            if key not in names:
                raise ValueError(f"{COURSES_ENV}: CoursePolicy has no option {key!r}")
            if key not in configured:
                setattr(self, key, value)

    def limits(self) -> Limits:
        return Limits(
            max_courses=self.max_courses, max_pool=dict(self.max_pool), max_days=self.max_days
        )

    def may_create(self, user: str, groups: Iterable[str], operator: bool) -> bool:
        gs = set(groups)
        return operator or any(
            c == user or (c.startswith("group:") and c[6:] in gs) for c in self.creators
        )

    def images(self) -> list[str] | None:
        if not self.image_allow_list:
            return None
        from sovereign_portal.spawners.images import load_image_allow_list

        return [i.name for i in load_image_allow_list(self.image_allow_list).images]

    def offer(self, site: Site) -> SiteOffer:
        return site_offer(
            site,
            self.images(),
            self.data_root,
            self.server_access,
            max_prewarm_minutes=self.max_prewarm_minutes,
            max_unclaimed_minutes=self.max_unclaimed_minutes,
            max_prewarm_fraction=self.max_prewarm_fraction,
        )


def install(c: Any, service: dict[str, Any], options: dict[str, Any] | None = None) -> None:
    """Courses in a hub config ``c`` (:func:`.portal.configure` calls it): the spawn gate on
    ``c.Spawner``, and the CoursePolicy ``options`` for the hub and, through its
    environment, for the portal ``service`` entry."""
    gate = CourseSpawnGate()
    c.Spawner.course_display = gate.display
    c.Spawner.apply_user_options = gate.apply_user_options
    c.SlurmGPUSpawner.reservation_for = gate.reservation_for
    opts = dict(options or {})
    CoursePolicy(**opts)  # a bad option stops the hub's start here, named
    for key, value in opts.items():
        c.CoursePolicy[key] = value
    if opts:
        service.setdefault("environment", {})[COURSES_ENV] = json.dumps(opts)
    if opts.get("server_access"):
        role = f"{service['name']}-service"
        roles = [dict(r) for r in c.JupyterHub.get("load_roles", [])]
        for r in roles:
            if r.get("name") == role:
                r["scopes"] = [*r.get("scopes", []), "shares", "read:users:name"]
        c.JupyterHub.load_roles = roles


__all__ = [
    "ACTIVE",
    "ENDED",
    "PURGED",
    "CoursePolicy",
    "CourseSpawnGate",
    "CourseStore",
    "delete_data",
    "install",
    "make_read_only",
    "site_offer",
]
