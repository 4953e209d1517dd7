"""Budgets in the portal database: periods, budgets, allowances, and the holds of admission.

The arithmetic is :mod:`.budgets` (pure); this module keeps its inputs in four tables
(Alembic revision 0003) and makes admission safe under concurrency:

- :meth:`BudgetStore.admit` locks the budget row, folds its charges into the balance,
  decides (:func:`.budgets.decide`) and writes the hold, all in **one transaction**. On
  PostgreSQL the lock is ``SELECT ... FOR UPDATE`` on the budget row; on SQLite every
  transaction of the portal store is ``BEGIN IMMEDIATE`` (:mod:`.store`), so writers queue.
  Two admissions can therefore never both see the same balance and overspend it.
- :meth:`BudgetStore.settle` turns a hold into settled usage when the ledger record that it
  covers closes (the hold's ``ref`` is the record's ``source``: ``grant:<id>`` or
  ``server:<user>/<name>``); :meth:`BudgetStore.release` drops a hold that never ran.

Every operator or instructor change is an audit event (:class:`.store.AuditEvent`). Bad
input raises :class:`.budgets.BudgetError` naming the field, before anything is written.
"""

from __future__ import annotations

import functools
import json
import logging
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sovereign_portal.spawners.errors import Unavailable
from sovereign_portal.spawners.request import Resolved
from sqlalchemy import (
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    UniqueConstraint,
    and_,
    bindparam,
    case,
    func,
    literal,
    literal_column,
    null,
    or_,
    select,
    union_all,
)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Mapped, Session, mapped_column
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement
from traitlets import Bool, Dict, Int, List, default, validate
from traitlets import Float as FloatTrait
from traitlets.config import Configurable

from .budgets import (
    Balance,
    Budget,
    BudgetError,
    BudgetRefused,
    Charge,
    Decision,
    Owner,
    Period,
    applicable,
    balance_of,
    charged,
    check_allowance,
    decide,
    describe,
    make_budget,
)
from .ledger import Amounts, Rates
from .store import AuditEvent, Base, PortalDatabase, PortalStore, UTCDateTime, utcnow

log = logging.getLogger("sovereign_portal.budgets")

BUDGETS_ENV = "SOVEREIGN_PORTAL_BUDGETS"
#: The portal database URL for a process the hub starts (the portal service): in its
#: environment, never on its argv.
DB_URL_ENV = "SOVEREIGN_PORTAL_DB_URL"

HELD, SETTLED, RELEASED = "held", "settled", "released"
#: Attempts of one admission when SQLite's write lock stays taken past its busy timeout.
LOCK_RETRIES = 5
#: A hold not settled this long after its walltime ends is charged in full (the ledger
#: closes every record; a hold this old covers a job that was never recorded).
HOLD_SLACK = timedelta(hours=1)


class BudgetPeriod(Base):
    __tablename__ = "budget_periods"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    start_at: Mapped[datetime] = mapped_column(UTCDateTime())
    end_at: Mapped[datetime] = mapped_column(UTCDateTime())


class BudgetRow(Base):
    __tablename__ = "budgets"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    owner_kind: Mapped[str] = mapped_column(String(16))
    owner_id: Mapped[str] = mapped_column(String(255))
    period: Mapped[str] = mapped_column(String(32), ForeignKey("budget_periods.name"))
    unit: Mapped[str] = mapped_column(String(16))
    amount: Mapped[float] = mapped_column(Float)
    per_student: Mapped[float | None] = mapped_column(Float, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_by: Mapped[str] = mapped_column(String(255))

    __table_args__ = (
        UniqueConstraint("owner_kind", "owner_id", "period", name="uq_budgets_owner_period"),
    )


class BudgetAllowance(Base):
    __tablename__ = "budget_allowances"

    budget_id: Mapped[int] = mapped_column(Integer, ForeignKey("budgets.id"), primary_key=True)
    user: Mapped[str] = mapped_column(String(255), primary_key=True)
    amount: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_by: Mapped[str] = mapped_column(String(255))


class BudgetCharge(Base):
    __tablename__ = "budget_charges"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    budget_id: Mapped[int] = mapped_column(Integer, ForeignKey("budgets.id"))
    user: Mapped[str] = mapped_column(String(255))
    ref: Mapped[str] = mapped_column(String(255))
    state: Mapped[str] = mapped_column(String(16))
    held: Mapped[float] = mapped_column(Float)
    settled: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    closed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    __table_args__ = (
        # covering: a balance is one index-only aggregate (Alembic revision 0004)
        Index(
            "ix_budget_charges_balance",
            "budget_id",
            "state",
            "user",
            "expires_at",
            "held",
            "settled",
        ),
        Index("ix_budget_charges_ref", "ref"),
    )


class BudgetTotal(Base):
    """Running totals of a budget's settled charges (Alembic revision 0008): ``user`` ''
    is the whole budget, any other value that user's share (a course allowance). A cache
    of ``budget_charges``, written in the same transaction as every settle
    (:func:`add_settled`) and checked by :func:`totals_drift` (``ledger verify``)."""

    __tablename__ = "budget_totals"

    budget_id: Mapped[int] = mapped_column(Integer, ForeignKey("budgets.id"), primary_key=True)
    user: Mapped[str] = mapped_column(String(255), primary_key=True)
    settled: Mapped[float] = mapped_column(Float)
    charges: Mapped[int] = mapped_column(Integer)


_TOTALS = cast(Table, BudgetTotal.__table__)
_CHARGES = cast(Table, BudgetCharge.__table__)
_ALLOWANCES = cast(Table, BudgetAllowance.__table__)
_BUDGETS = cast(Table, BudgetRow.__table__)

#: The ``user`` of a budget's own totals row.
WHOLE = ""
#: How far a running total may be from the sum of its charges (float additions in another
#: order) before ``ledger verify`` calls it drift.
TOTALS_TOLERANCE = 1e-6


#: Where the budget store's statements run: an ORM session or a Core connection, each in
#: its transaction (admission uses a connection: no ORM objects on its hot path).
Exec = Session | Connection


def _is_pg(s: Exec) -> bool:
    bind = s.get_bind() if isinstance(s, Session) else s
    return bool(bind.dialect.name == "postgresql")


@functools.cache
def _totals_upsert(dialect: str) -> Any:
    """The running totals' upsert (add to a row, or create it), built once per dialect and
    run with one parameter set per row (one round trip on psycopg, which pipelines)."""
    from sqlalchemy.dialects.postgresql import insert as pg_insert
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    t = _TOTALS
    stmt: Any = pg_insert(t) if dialect == "postgresql" else sqlite_insert(t)
    return stmt.on_conflict_do_update(
        index_elements=[t.c.budget_id, t.c.user],
        set_={
            "settled": t.c.settled + stmt.excluded.settled,
            "charges": t.c.charges + stmt.excluded.charges,
        },
    )


def add_settled(s: Exec, budget_id: int, user: str, amount: float) -> None:
    """Add one settled charge of ``amount`` to the running totals of ``budget_id`` (the
    budget's row and ``user``'s), in the caller's transaction."""
    add_settled_many(s, budget_id, [(user, amount)])


def add_settled_many(s: Exec, budget_id: int, settled: Iterable[tuple[str, float]]) -> None:
    """Add settled charges, each ``(user, amount)``, to the running totals of ``budget_id``
    (the budget's row and each user's): one upsert per totals row, sent together, in the
    caller's transaction."""
    sums: dict[str, list[float]] = {}
    for user, amount in settled:
        for who in dict.fromkeys((WHOLE, user)):
            acc = sums.setdefault(who, [0.0, 0])
            acc[0] += amount
            acc[1] += 1
    if not sums:
        return
    rows = [
        {"budget_id": budget_id, "user": who, "settled": x, "charges": int(n)}
        for who, (x, n) in sums.items()
    ]
    dialect = "postgresql" if _is_pg(s) else "sqlite"
    s.execute(_totals_upsert(dialect), rows)


class _epoch(FunctionElement[float]):
    """Seconds since the epoch of a UTC timestamp column (the ledger's times are epoch
    seconds): ``EXTRACT(EPOCH ...)`` on PostgreSQL, from ``julianday`` on SQLite (which
    keeps the UTC time as text; milliseconds are what it reads of the fraction)."""

    type = Float()
    inherit_cache = True
    name = "epoch"


@compiles(_epoch)
def _epoch_pg(element: _epoch, compiler: SQLCompiler, **kw: Any) -> str:
    (arg,) = list(element.clauses)
    return f"CAST(EXTRACT(EPOCH FROM {compiler.process(arg, **kw)}) AS DOUBLE PRECISION)"


@compiles(_epoch, "sqlite")
def _epoch_sqlite(element: _epoch, compiler: SQLCompiler, **kw: Any) -> str:
    (arg,) = list(element.clauses)
    return f"((julianday({compiler.process(arg, **kw)}) - 2440587.5) * 86400.0)"


def _sums_query(budget_ids: Iterable[int] | None = None) -> Any:
    """(budget_id, user, settled, charges) summed from the settled charges: per budget
    (user '') and per (budget, user)."""
    c = _CHARGES.c
    where: list[Any] = [c.state == SETTLED]
    if budget_ids is not None:
        where.append(c.budget_id.in_(list(budget_ids)))
    amount = func.coalesce(func.sum(func.coalesce(c.settled, 0.0)), 0.0)
    whole = (
        select(c.budget_id, literal(WHOLE).label("user"), amount.label("settled"),
               func.count().label("charges"))
        .where(*where)
        .group_by(c.budget_id)
    )  # fmt: skip
    per_user = (
        select(c.budget_id, c.user, amount.label("settled"), func.count().label("charges"))
        .where(*where, c.user != WHOLE)
        .group_by(c.budget_id, c.user)
    )
    return union_all(whole, per_user)


def rebuild_totals(s: Session | Connection, budget_ids: Iterable[int] | None = None) -> None:
    """Recompute the running totals (of ``budget_ids``, or all) from the charges, in the
    caller's transaction: the migration's backfill, and after a GDPR erase or retention
    renames charges' users. Takes the budget rows' locks first on PostgreSQL."""
    t = _TOTALS
    ids = None if budget_ids is None else sorted(set(budget_ids))
    if ids == []:
        return
    b = _BUDGETS
    if _is_pg(s):
        lock = select(b.c.id).order_by(b.c.id).with_for_update()
        s.execute(lock if ids is None else lock.where(b.c.id.in_(ids)))
    s.execute(t.delete() if ids is None else t.delete().where(t.c.budget_id.in_(ids)))
    rows = [dict(r._mapping) for r in s.execute(_sums_query(ids))]
    if rows:
        s.execute(t.insert(), rows)


def lock_budgets_of(s: Session | Connection, users: Iterable[str]) -> set[int]:
    """The ids of the budgets ``users`` have charges in, their rows locked (``FOR UPDATE``,
    in id order) on PostgreSQL: taken *before* a GDPR tool renames those charges, so it
    and a settle (which takes the budget lock first, then the charge's) never wait on
    each other in a circle."""
    c = _CHARGES.c
    ids = set(s.scalars(select(c.budget_id).where(c.user.in_(list(users))).distinct()))
    if ids and _is_pg(s):
        s.execute(
            select(_BUDGETS.c.id).where(_BUDGETS.c.id.in_(sorted(ids))).order_by(_BUDGETS.c.id)
            .with_for_update()
        )  # fmt: skip
    return ids


def totals_drift(s: Session | Connection) -> list[dict[str, Any]]:
    """Where the running totals differ from the sums of the settled charges (beyond
    :data:`TOTALS_TOLERANCE`, or in their count): ``{"budget_id", "user", "total",
    "sum", "charges_total", "charges_sum", "budget"}`` (``budget`` its key) per differing
    row; [] when they agree."""
    t = _TOTALS
    have = {(r.budget_id, r.user): (float(r.settled), int(r.charges)) for r in s.execute(select(t))}
    want = {
        (r.budget_id, r.user): (float(r.settled), int(r.charges)) for r in s.execute(_sums_query())
    }
    names = {
        r.id: f"{r.owner_kind}:{r.owner_id}@{r.period}"
        for r in s.execute(select(_BUDGETS.c.id, _BUDGETS.c.owner_kind, _BUDGETS.c.owner_id,
                                  _BUDGETS.c.period))
    }  # fmt: skip
    out = []
    for key in sorted(set(have) | set(want)):
        h, w = have.get(key, (0.0, 0)), want.get(key, (0.0, 0))
        if abs(h[0] - w[0]) > TOTALS_TOLERANCE * max(1.0, abs(w[0])) or h[1] != w[1]:
            out.append(
                {"budget_id": key[0], "budget": names.get(key[0], f"#{key[0]}"),
                 "user": key[1], "total": h[0], "sum": w[0],
                 "charges_total": h[1], "charges_sum": w[1]}
            )  # fmt: skip
    return out


def _period(row: Any) -> Period:
    """A period from its row (ORM or Core: ``name``, ``start_at``, ``end_at``)."""
    return Period(row.name, row.start_at, row.end_at)


def _budget(row: Any, period: Period) -> Budget:
    """A budget from its row (ORM or Core: ``owner_kind``, ``owner_id``, ``unit``,
    ``amount``, ``per_student``)."""
    return Budget(
        Owner(row.owner_kind, row.owner_id), period, row.unit, row.amount, row.per_student
    )


_PERIODS = cast(Table, BudgetPeriod.__table__)
#: The kinds of owner a user's groups name (``course-<id>``, ``project-<id>``).
_GROUP_KINDS = ("course", "project")


def _owner_params(user: str, groups: Iterable[str]) -> dict[str, Any]:
    """The parameters of :func:`_candidates`: the user, and the ids of the courses and
    projects whose groups (:mod:`.claims`) it is in."""
    from .claims import COURSE_GROUP, PROJECT_GROUP

    prefixes = {"course": COURSE_GROUP.format(""), "project": PROJECT_GROUP.format("")}
    out: dict[str, Any] = {"user": user}
    for kind in _GROUP_KINDS:
        pre = prefixes[kind]
        out[kind] = sorted({g.removeprefix(pre) for g in groups if g.startswith(pre)})
    return out


@functools.cache
def _candidates(lock: bool) -> Any:
    """Every budget a user might charge (its own, and those of the course and project
    groups it is in; parameters from :func:`_owner_params`), with its period, in id order,
    read on the owner index: admission never loads a site's thousands of other budgets.
    :func:`.budgets.applicable` still decides which of them apply. With ``lock`` the
    budget rows are locked (``FOR UPDATE OF budgets``, taken in id order as every other
    locker takes them, and read at their newest after the wait) in the same statement.
    Built once: the same statement every call, so SQLAlchemy's compiled cache and the
    driver's prepared statements serve it."""
    b, p = _BUDGETS.c, _PERIODS.c
    q = (
        select(b.id, b.owner_kind, b.owner_id, b.unit, b.amount, b.per_student,
               p.name, p.start_at, p.end_at)
        .join_from(_BUDGETS, _PERIODS, p.name == b.period)
        .where(
            or_(
                and_(b.owner_kind == "user", b.owner_id == bindparam("user")),
                *(
                    and_(b.owner_kind == kind,
                         b.owner_id.in_(bindparam(kind, expanding=True)))
                    for kind in _GROUP_KINDS
                ),
            )
        )
        .order_by(b.id)
    )  # fmt: skip
    return q.with_for_update(of=_BUDGETS) if lock else q


@functools.cache
def _fold_stmt(allowance: bool) -> Any:
    """The one statement a balance reads (parameters ``budget_id``, ``users``, ``now``,
    and ``user`` with ``allowance``): rows ``(kind, user, ref, amount, done, charge,
    record)``, where ``kind`` is

    - 1: a running total of settled charges (``budget_totals``: user '' the budget's,
      else that user's; O(1) however many charges a semester has made);
    - 0: an open hold (``done`` 1 once it is past its walltime and :data:`HOLD_SLACK`),
      with ``charge`` its id and ``record`` the id of the closed ledger record that
      settles it (its ``source`` the hold's ``ref``, opened after the hold was written,
      the first such), or NULL;
    - 2: the user's allowance in a course pool (``allowance``: no other budget has one).

    One snapshot on PostgreSQL, whatever commits meanwhile."""
    from .ledger_store import records

    tt, c, a, r = _TOTALS.c, _CHARGES.c, _ALLOWANCES.c, records.c
    nothing = null()
    totals = select(
        literal_column("1").label("kind"),
        tt.user,
        nothing.label("ref"),
        tt.settled.label("amount"),
        literal_column("1").label("done"),
        nothing.label("charge"),
        nothing.label("record"),
    ).where(tt.budget_id == bindparam("budget_id"),
            tt.user.in_(bindparam("users", expanding=True)))  # fmt: skip
    closed = (
        select(r.id)
        .where(
            r.source == c.ref,
            r.row_type == "usage",
            r.opened_at >= _epoch(c.created_at) - 1.0,
            r.ended_at.is_not(None),
        )
        .order_by(r.opened_at)
        .limit(1)
        .correlate(_CHARGES)
        .scalar_subquery()
    )
    holds = select(
        literal_column("0"),
        c.user,
        c.ref,
        c.held,
        case((c.expires_at <= bindparam("now"), 1), else_=0),
        c.id,
        closed,
    ).where(c.budget_id == bindparam("budget_id"), c.state == HELD)
    parts = [totals, holds]
    if allowance:
        parts.append(
            select(
                literal_column("2"), a.user, nothing, a.amount, literal_column("0"), nothing,
                nothing,
            ).where(a.budget_id == bindparam("budget_id"), a.user == bindparam("user"))
        )  # fmt: skip
    return union_all(*parts)


@functools.cache
def _record_amounts() -> Any:
    """(id, gpu_seconds, eur, energy_wh) of the ledger records ``ids``."""
    from .ledger_store import records

    r = records.c
    return select(r.id, r.gpu_seconds, r.eur, r.energy_wh).where(
        r.id.in_(bindparam("ids", expanding=True))
    )


@functools.cache
def _settle_update() -> Any:
    """One hold (``charge_id``) settled at ``x`` at ``at``; matches nothing once it is no
    longer a hold."""
    c = _CHARGES.c
    return (
        _CHARGES.update()
        .where(c.id == bindparam("charge_id"), c.state == HELD)
        .values(state=SETTLED, settled=bindparam("x"), closed_at=bindparam("at"))
    )


@functools.cache
def _lock_budget() -> Any:
    """The budget row ``id`` locked (``FOR UPDATE``: PostgreSQL), read at its newest."""
    b = _BUDGETS.c
    return select(b.unit, b.amount, b.per_student).where(b.id == bindparam("id")).with_for_update()


#: A hold, as admission writes it.
_HOLD = _CHARGES.insert()
#: :meth:`BudgetStore._balance` marks a hold it has just settled with this row kind.
_SETTLED_NOW = 3


class BudgetStore:
    """Budgets, allowances and holds on a :class:`.store.PortalStore`."""

    def __init__(self, store: PortalStore) -> None:
        self.store = store
        self._pg = store.engine.dialect.name == "postgresql"

    # -- periods --------------------------------------------------------------------------
    def set_period(self, name: str, start: Any, end: Any, actor: str = "operator") -> Period:
        p = Period.make(name, start, end)
        with self.store.begin() as s:
            self._put_period(s, p)
            self._audit(s, actor, "budget.period", p.name, start=str(p.start), end=str(p.end))
        return p

    def periods(self) -> list[Period]:
        with self.store.begin() as s:
            rows = s.scalars(select(BudgetPeriod).order_by(BudgetPeriod.start_at)).all()
            return [_period(r) for r in rows]

    def _known_period(self, s: Session, name: Any) -> BudgetPeriod:
        row = s.get(BudgetPeriod, name) if isinstance(name, str) else None
        if row is None:
            known = ", ".join(r for r in s.scalars(select(BudgetPeriod.name))) or "none"
            raise BudgetError(
                "period",
                f"unknown period {str(name)[:40]!r}; known: {known} "
                "(define one with --start and --end)",
            )
        return row

    # -- budgets --------------------------------------------------------------------------
    def set_budget(
        self,
        owner: Any,
        period: str,
        unit: Any,
        amount: Any,
        per_student: Any = None,
        *,
        start: Any = None,
        end: Any = None,
        actor: str = "operator",
    ) -> Budget:
        """Create or change a budget. With ``start`` and ``end`` the period is defined (or
        redefined) too; otherwise it must exist. Nothing is written on bad input."""
        with self.store.begin() as s:
            return self._set_budget(s, owner, period, unit, amount, per_student, start, end, actor)

    def _set_budget(
        self,
        s: Session,
        owner: Any,
        period: str,
        unit: Any,
        amount: Any,
        per_student: Any,
        start: Any,
        end: Any,
        actor: str,
    ) -> Budget:
        if (start is None) != (end is None):
            raise BudgetError("start" if start is None else "end", "give both start and end")
        if start is not None:
            p = self._put_period(s, Period.make(period, start, end))
        else:
            p = _period(self._known_period(s, period))
        b = make_budget(owner, p, unit, amount, per_student)
        row = self._row(s, b.owner, p.name, lock=True)
        if row is not None:
            top = s.scalars(
                select(BudgetAllowance.amount).where(BudgetAllowance.budget_id == row.id)
            ).all()
            if top and max(top) > b.amount:
                raise BudgetError(
                    "amount",
                    f"{b.amount:g} is below an allowance already given in this course "
                    f"({max(top):g}); lower that allowance first",
                )
            if row.unit != b.unit and self._has_charges(s, row.id):
                raise BudgetError(
                    "unit", f"this budget has charges in {row.unit}: its unit cannot change"
                )
            row.unit, row.amount, row.per_student = b.unit, b.amount, b.per_student
            row.updated_at, row.updated_by = utcnow(), actor
        else:
            s.add(
                BudgetRow(
                    owner_kind=b.owner.kind,
                    owner_id=b.owner.id,
                    period=p.name,
                    unit=b.unit,
                    amount=b.amount,
                    per_student=b.per_student,
                    updated_at=utcnow(),
                    updated_by=actor,
                )
            )
        s.flush()
        self._audit(s, actor, "budget.set", b.key, **b.to_json())
        return b

    def _put_period(self, s: Session, p: Period) -> Period:
        row = s.get(BudgetPeriod, p.name)
        if row is None:
            s.add(BudgetPeriod(name=p.name, start_at=p.start, end_at=p.end))
        else:
            row.start_at, row.end_at = p.start, p.end
        s.flush()
        return p

    def _has_charges(self, s: Session, budget_id: int) -> bool:
        q = select(BudgetCharge.id).where(BudgetCharge.budget_id == budget_id).limit(1)
        return s.scalar(q) is not None

    def _row(self, s: Session, owner: Owner, period: str, *, lock: bool) -> BudgetRow | None:
        q = select(BudgetRow).where(
            BudgetRow.owner_kind == owner.kind,
            BudgetRow.owner_id == owner.id,
            BudgetRow.period == period,
        )
        if lock and self._pg:
            q = q.with_for_update().execution_options(populate_existing=True)
        return s.scalars(q).first()

    def _budgets(
        self, s: Exec, user: str | None = None, groups: Iterable[str] = ()
    ) -> list[tuple[int, Budget]]:
        """(id, budget) of every budget, by owner; with ``user``, only those it might
        charge (:func:`_candidates`), by id."""
        if user is not None:
            rows = s.execute(_candidates(False), _owner_params(user, groups))
        else:
            b, p = _BUDGETS.c, _PERIODS.c
            rows = s.execute(
                select(b.id, b.owner_kind, b.owner_id, b.unit, b.amount, b.per_student,
                       p.name, p.start_at, p.end_at)
                .join_from(_BUDGETS, _PERIODS, p.name == b.period)
                .order_by(b.owner_kind, b.owner_id)
            )  # fmt: skip
        return [(r.id, _budget(r, _period(r))) for r in rows]

    def budgets(self, owner: Any = None, period: str | None = None) -> list[Budget]:
        own = Owner.parse(owner) if isinstance(owner, str) else owner
        with self.store.begin() as s:
            if period is not None:
                self._known_period(s, period)
            return [
                b
                for _, b in self._budgets(s)
                if (own is None or b.owner == own) and (period is None or b.period.name == period)
            ]

    def get(self, owner: Any, period: str) -> Budget:
        own = owner if isinstance(owner, Owner) else Owner.parse(owner)
        with self.store.begin() as s:
            p = _period(self._known_period(s, period))
            row = self._row(s, own, period, lock=False)
            if row is None:
                raise BudgetError("owner", f"{own} has no budget in {period}", status=404)
            return _budget(row, p)

    # -- allowances -----------------------------------------------------------------------
    def set_allowance(self, course: str, period: str, user: Any, amount: Any, actor: str) -> float:
        """An instructor's allowance for one student, within the course pool."""
        own = Owner("course", course)
        with self.store.begin() as s:
            p = _period(self._known_period(s, period))
            row = self._row(s, own, period, lock=True)
            if row is None:
                raise BudgetError("course", f"course {course} has no budget in {period}", 404)
            x = check_allowance(_budget(row, p), user, amount)
            a = s.get(BudgetAllowance, (row.id, user))
            if a is None:
                s.add(
                    BudgetAllowance(
                        budget_id=row.id, user=user, amount=x, updated_at=utcnow(), updated_by=actor
                    )
                )
            else:
                a.amount, a.updated_at, a.updated_by = x, utcnow(), actor
            self._audit(s, actor, "budget.allowance", f"{own}@{period}", user=user, amount=x)
        return x

    def allowances(self, course: str, period: str) -> dict[str, float]:
        with self.store.begin() as s:
            row = self._row(s, Owner("course", course), period, lock=False)
            if row is None:
                return {}
            return self._allowances(s, row.id)

    def _allowances(self, s: Session, budget_id: int) -> dict[str, float]:
        q = select(BudgetAllowance).where(BudgetAllowance.budget_id == budget_id)
        return {a.user: a.amount for a in s.scalars(q)}

    # -- balances and admission -----------------------------------------------------------
    def _settle_due(
        self, s: Exec, budget_id: int, unit: str, due: Iterable[tuple[str, str, str]]
    ) -> dict[str, float]:
        """Settle holds of ``budget_id`` from their closed ledger records: ``due`` holds
        ``(charge id, user, record id)``. Returns charge id -> what it settled at, for each
        that was still a hold; the running totals get them in the same transaction. The
        caller holds the budget row's lock (every writer of the totals takes it first)."""
        from .budgets import amount_in

        due = list(due)
        found = {
            rid: Amounts(gpu_seconds=g or 0.0, eur=e or 0.0, energy_wh=w or 0.0)
            for rid, g, e, w in s.execute(_record_amounts(), {"ids": sorted({d[2] for d in due})})
        }
        done: dict[str, float] = {}
        for charge_id, _who, rid in due:
            used = found.get(rid)
            if used is None:
                continue
            x = self._mark_settled(s, charge_id, amount_in(used, unit))
            if x is not None:
                done[charge_id] = x
        add_settled_many(s, budget_id, [(d[1], done[d[0]]) for d in due if d[0] in done])
        return done

    def _mark_settled(self, s: Exec, charge_id: str, used: float) -> float | None:
        """Turn one hold into settled usage (at least 0); what it settled at, or None
        (nothing changed) when it is no longer a hold (another transaction settled or
        released it first). The caller adds it to the running totals."""
        x = max(0.0, used)
        done = s.execute(_settle_update(), {"charge_id": charge_id, "x": x, "at": utcnow()})
        return x if done.rowcount else None  # type: ignore[attr-defined]

    def _settle_charge(
        self, s: Exec, charge_id: str, budget_id: int, user: str, used: float
    ) -> bool:
        """:meth:`_mark_settled` and the running totals, in one transaction; False when
        it is no longer a hold."""
        x = self._mark_settled(s, charge_id, used)
        if x is None:
            return False
        add_settled(s, budget_id, user, x)
        return True

    def _lock_budgets(self, s: Exec, budget_ids: Iterable[int]) -> None:
        """The budget rows' locks (``FOR UPDATE``, in id order) on PostgreSQL, where
        settles take them as admission does; SQLite's ``BEGIN IMMEDIATE`` already queues
        every writer."""
        ids = sorted(set(budget_ids))
        if self._pg and ids:
            b = _BUDGETS.c
            s.execute(select(b.id).where(b.id.in_(ids)).order_by(b.id).with_for_update())

    def release_unrecorded(self, ref: str, user: str | None = None) -> int:
        """Release the holds of ``ref`` that no ledger record covers (the job never started:
        a failed spawn, a grant never used); holds with a record wait for it to close."""
        from .ledger_store import records

        with self.store.begin() as s:
            n = 0
            q = select(BudgetCharge).where(BudgetCharge.ref == ref, BudgetCharge.state == HELD)
            if user is not None:  # only the caller's own holds
                q = q.where(BudgetCharge.user == user)
            for charge in s.scalars(q):
                since = charge.created_at.timestamp() - 1.0
                has = s.execute(
                    select(records.c.id)
                    .where(records.c.source == ref, records.c.opened_at >= since)
                    .limit(1)
                ).first()
                if has is None:
                    charge.state, charge.closed_at = RELEASED, utcnow()
                    n += 1
            return n

    def _balance(
        self,
        s: Exec,
        budget_id: int,
        b: Budget,
        user: str | None,
        now: datetime,
        *,
        locked: bool = False,
        live: Mapping[str, float] | None = None,
    ) -> Balance:
        """The balance of ``b`` (for ``user`` in a course pool): :func:`_fold_stmt`, one
        statement. Holds whose ledger record has closed settle first, from that record
        (:meth:`_settle_due`), under the budget row's lock (``locked``: the caller holds
        it, as admission does; SQLite's ``BEGIN IMMEDIATE`` always does); they then count
        what they settled at. ``live`` maps the refs of running jobs to what they used
        until now: their holds count that instead (:meth:`running_balances`)."""
        course_user = user is not None and b.owner.kind == "course"
        params: dict[str, Any] = {
            "budget_id": budget_id,
            "users": [WHOLE] if user is None else [WHOLE, user],
            "now": now,
        }
        if course_user:
            params["user"] = user
        stmt = _fold_stmt(course_user)
        rows: list[Any] = list(s.execute(stmt, params))
        due = [(r[5], r[1], r[6]) for r in rows if r[0] == 0 and r[6] is not None]
        if due:
            locked = locked or not self._pg
            if not locked:  # every writer of the totals takes the budget lock first
                self._lock_budgets(s, [budget_id])
            done = self._settle_due(s, budget_id, b.unit, due)
            if locked and len(done) == len(due):
                # under the lock nothing else changed the totals: what was read, with these
                # holds now settled usage, is what a second read would give
                rows = [
                    (_SETTLED_NOW, r[1], r[2], done[r[5]], 1, r[5], None)
                    if r[0] == 0 and r[5] in done
                    else r
                    for r in rows
                ]
            else:
                rows = list(s.execute(stmt, params))
        return self._fold(b, user, rows, live)

    @staticmethod
    def _fold(
        b: Budget, user: str | None, rows: Iterable[Any], live: Mapping[str, float] | None
    ) -> Balance:
        """Fold the rows of :func:`_fold_stmt` into the balance of ``b``
        (:func:`.budgets.balance_of`). A settled charge counts what it settled at; a hold
        counts in full, as settled usage once it is past its walltime and
        :data:`HOLD_SLACK`; a running job in ``live`` counts what it used until now."""
        whole = mine = 0.0
        allowances: dict[str, float] = {}
        charges: list[Charge] = []
        for kind, who, ref, amount, done, _charge, _record in rows:
            if kind == 2:
                allowances[who] = float(amount)
            elif kind == 1:
                if who == WHOLE:
                    whole = float(amount)
                else:
                    mine = float(amount)
            elif kind == _SETTLED_NOW:
                charges.append(Charge(b.key, who, float(amount), settled=True))
            elif live and ref in live:
                charges.append(Charge(b.key, who, live[ref], settled=True))
            else:
                charges.append(Charge(b.key, who, float(amount), settled=bool(done)))
        if user is not None:
            charges.append(Charge(b.key, user, mine, settled=True))
        # WHOLE is no user name: the settled charges of everybody else
        charges.append(Charge(b.key, WHOLE, whole - mine, settled=True))
        return balance_of(b, charges, user, allowances)

    def balances(
        self, user: str, groups: Iterable[str], now: datetime | None = None
    ) -> list[Balance]:
        """The balances ``user`` charges now, in the order admission uses them."""
        t = now or utcnow()
        groups = list(groups)
        with self.store.transaction() as conn:
            pairs = self._budgets(conn, user, groups)
            ids = {b.key: bid for bid, b in pairs}
            found = applicable([b for _, b in pairs], user, groups, t)
            return [self._balance(conn, ids[b.key], b, user, t) for b in found]

    def balance(self, owner: Any, period: str, user: str | None = None) -> Balance:
        own = owner if isinstance(owner, Owner) else Owner.parse(owner)
        t = utcnow()
        with self.store.begin() as s:
            p = _period(self._known_period(s, period))
            row = self._row(s, own, period, lock=False)
            if row is None:
                raise BudgetError("owner", f"{own} has no budget in {period}", status=404)
            return self._balance(s, row.id, _budget(row, p), user, t)

    def admit(
        self,
        user: str,
        groups: Iterable[str],
        rates: Rates,
        walltime_minutes: int,
        what: str,
        ref: str,
        *,
        shorten: bool = False,
        min_minutes: int = 10,
        now: datetime | None = None,
    ) -> Decision:
        """Check ``user``'s first applicable budget and hold the most the request can cost,
        in one transaction with the budget row locked. Raises BudgetRefused (403)."""
        t = now or utcnow()
        groups = list(groups)
        for attempt in range(LOCK_RETRIES):
            try:
                return self._admit(
                    user, groups, rates, walltime_minutes, what, ref, shorten, min_minutes, t
                )
            except OperationalError as e:
                # SQLite: the write lock stayed taken past busy_timeout (a loaded host)
                if "locked" not in str(e) or attempt == LOCK_RETRIES - 1:
                    raise Unavailable(
                        "the budget database is busy: try again in a moment",
                        log_message=f"budget admission of {user}: {e}",
                    ) from None
                time.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    def _admit(
        self,
        user: str,
        groups: list[str],
        rates: Rates,
        walltime_minutes: int,
        what: str,
        ref: str,
        shorten: bool,
        min_minutes: int,
        t: datetime,
    ) -> Decision:
        """One admission, in one transaction on a Core connection (no ORM objects): the
        user's candidate budgets (one statement), the charged one's row locked
        (PostgreSQL: ``FOR UPDATE``, read at its newest; SQLite: ``BEGIN IMMEDIATE``
        already holds the write lock), its balance (one statement, plus the settles of
        holds whose records closed), the decision, and the hold (one statement)."""
        with self.store.transaction() as conn:
            pairs = self._budgets(conn, user, groups)
            b = charged([b for _, b in pairs], user, groups, t)
            if b is None:
                return decide(None, rates, walltime_minutes, what)
            bid = next(i for i, x in pairs if x.key == b.key)
            if self._pg:
                fresh = conn.execute(_lock_budget(), {"id": bid}).one()
                b = replace(b, unit=fresh.unit, amount=fresh.amount, per_student=fresh.per_student)
            d = decide(
                self._balance(conn, bid, b, user, t, locked=True),
                rates,
                walltime_minutes,
                what,
                shorten=shorten,
                min_minutes=min_minutes,
            )
            conn.execute(
                _HOLD,
                {
                    "id": secrets.token_hex(16),
                    "budget_id": bid,
                    "user": user,
                    "ref": ref,
                    "state": HELD,
                    "held": d.hold,
                    "created_at": t,
                    "expires_at": t + timedelta(minutes=d.walltime_minutes) + HOLD_SLACK,
                },
            )
            return d

    def live_balance(
        self, key: str, user: str | None, live: Mapping[str, float], now: datetime | None = None
    ) -> Balance | None:
        """The balance of budget ``key`` with running jobs at what they used so far:
        ``live`` maps a hold's ref to its usage until now (in the budget's unit), which
        replaces that hold. None when the budget is gone."""
        t = now or utcnow()
        with self.store.transaction() as conn:
            for bid, b in self._budgets(conn):
                if b.key == key:
                    return self._balance(conn, bid, b, user, t, live=live)
        return None

    def charged_budget(
        self, user: str, groups: Iterable[str], now: datetime | None = None
    ) -> Budget | None:
        """The budget an admission of ``user`` charges now (:func:`.budgets.charged`), or
        None; nothing is held. The job-script preview names its Slurm account with it."""
        groups = list(groups)
        with self.store.transaction() as conn:
            found = [b for _, b in self._budgets(conn, user, groups)]
            return charged(found, user, groups, now or utcnow())

    def running_balances(self, refs: Iterable[str], now: float | None = None) -> dict[str, Balance]:
        """For each of ``refs`` that holds a charge (a running server ``server:<user>/<name>``
        or session ``grant:<id>``), the balance its user has in the budget it charges, with
        **every** running job of that budget, servers and sessions alike, at what it has
        used until ``now`` (epoch seconds) instead of its hold: the figure the budget watch
        (:class:`BudgetWatch`) stops jobs on. A job counts from its ledger record's start
        (``started_at``; nothing while it is still queued)."""
        t = time.time() if now is None else now
        wanted = list(dict.fromkeys(refs))
        out: dict[str, Balance] = {}
        if not wanted:
            return out
        with self.store.begin() as s:
            q = select(BudgetCharge.ref, BudgetCharge.user, BudgetCharge.budget_id).where(
                BudgetCharge.ref.in_(wanted), BudgetCharge.state == HELD
            )
            by_budget: dict[int, list[tuple[str, str]]] = {}
            for ref, who, bid in s.execute(q):
                by_budget.setdefault(bid, []).append((ref, who))
            if not by_budget:
                return out
            pairs = dict(self._budgets(s))
            when = datetime.fromtimestamp(t, tz=UTC)
            for bid, items in by_budget.items():
                if bid not in pairs:
                    continue
                b = pairs[bid]
                live = self._live_usage(s, bid, b.unit, t)
                for ref, who in items:
                    out[ref] = self._balance(s, bid, b, who, when, live=live)
        return out

    def _live_usage(self, s: Session, budget_id: int, unit: str, now: float) -> dict[str, float]:
        """ref -> what the open ledger record of each hold of ``budget_id`` used until now."""
        from .budgets import amount_in
        from .ledger import amounts_for
        from .ledger_store import from_row, records

        held = s.execute(
            select(BudgetCharge.ref, BudgetCharge.created_at).where(
                BudgetCharge.budget_id == budget_id, BudgetCharge.state == HELD
            )
        ).all()
        live: dict[str, float] = {}
        for ref, created in held:
            row = s.execute(
                select(records)
                .where(
                    records.c.source == ref,
                    records.c.ended_at.is_(None),
                    records.c.opened_at >= created.timestamp() - 1.0,
                )
                .order_by(records.c.opened_at.desc())
                .limit(1)
            ).first()
            if row is None:
                continue  # no record yet: the hold counts in full
            rec = from_row(row)
            ran = 0.0 if rec.started_at is None else max(0.0, now - rec.started_at)
            live[ref] = amount_in(amounts_for(rec.rates, ran), unit)
        return live

    def admit_resolved(
        self,
        user: str,
        groups: Iterable[str],
        resolved: Resolved,
        ref: str,
        policy: BudgetPolicy | None = None,
    ) -> Decision:
        """:meth:`admit` for a placed request: its own rates, its size as the message names it."""
        r = resolved
        pol = policy or BudgetPolicy()
        return self.admit(
            user,
            groups,
            Rates.from_resolved(r),
            r.walltime_minutes,
            describe(r.size.to_json(r.node_type), r.request.count),
            ref,
            shorten=pol.shorten_walltime,
            min_minutes=pol.min_walltime_minutes,
        )

    def settle(self, ref: str, amounts: Amounts | None = None, used: float | None = None) -> int:
        """Settle the open holds of ``ref`` at what was used (ledger amounts, in each budget's
        unit, or ``used`` directly), with the running totals, under the budget rows' locks.
        Returns how many holds were settled."""
        from .budgets import amount_in

        c = _CHARGES.c
        with self.store.begin() as s:
            q = (
                select(c.id, c.budget_id, c.user, BudgetRow.unit)
                .join(BudgetRow, BudgetRow.id == c.budget_id)
                .where(c.ref == ref, c.state == HELD)
            )
            found = s.execute(q).all()
            self._lock_budgets(s, [bid for _, bid, _, _ in found])
            n = 0
            for charge_id, bid, who, unit in found:
                x = used if used is not None else amount_in(amounts or Amounts(), unit)
                n += self._settle_charge(s, charge_id, bid, who, x)
            return n

    def release(self, ref: str) -> int:
        """Drop the open holds of ``ref`` (nothing ran). Returns how many were released."""
        with self.store.begin() as s:
            q = select(BudgetCharge).where(BudgetCharge.ref == ref, BudgetCharge.state == HELD)
            n = 0
            for charge in s.scalars(q):
                charge.state, charge.closed_at = RELEASED, utcnow()
                n += 1
            return n

    def holds(self, ref: str | None = None, budget: str | None = None) -> list[dict[str, Any]]:
        """Charges (held, settled, released), oldest first; by ``ref`` or Budget.key."""
        with self.store.begin() as s:
            q = select(BudgetCharge, BudgetRow).join(BudgetRow).order_by(BudgetCharge.created_at)
            if ref is not None:
                q = q.where(BudgetCharge.ref == ref)
            out = []
            for c, b in s.execute(q).all():
                key = f"{b.owner_kind}:{b.owner_id}@{b.period}"
                if budget is not None and key != budget:
                    continue
                out.append(
                    {
                        "id": c.id,
                        "budget": key,
                        "user": c.user,
                        "ref": c.ref,
                        "state": c.state,
                        "held": c.held,
                        "settled": c.settled,
                        "created_at": c.created_at.isoformat(),
                    }
                )
            return out

    # -- audit --------------------------------------------------------------------------------
    def _audit(self, s: Session, actor: str, action: str, target: str, **detail: Any) -> None:
        s.add(
            AuditEvent(
                at=utcnow(),
                actor=actor,
                action=action,
                target=target[:255],
                detail=json.dumps(detail, default=str, sort_keys=True),
            )
        )


def apply_config(
    bs: BudgetStore,
    periods: Mapping[str, Any],
    budgets: Iterable[Any],
    actor: str = "config",
) -> list[Budget]:
    """Apply the operator's traitlets config (periods, then budgets) in one transaction:
    a bad entry (its field named) changes nothing."""
    out = []
    with bs.store.begin() as s:
        for name, span in periods.items():
            if not isinstance(span, Mapping) or set(span) != {"start", "end"}:
                raise BudgetError("budget_periods", f"{str(name)[:40]}: give exactly start and end")
            bs._put_period(s, Period.make(name, span["start"], span["end"]))
        for i, entry in enumerate(budgets):
            if not isinstance(entry, Mapping):
                raise BudgetError("budgets", f"entry {i}: must be a dict")
            extra = set(entry) - {"owner", "period", "unit", "amount", "per_student"}
            if extra:
                raise BudgetError(
                    "budgets", f"entry {i}: unknown key(s) {', '.join(sorted(map(str, extra)))}"
                )
            missing = {"owner", "period", "unit", "amount"} - set(entry)
            if missing:
                raise BudgetError("budgets", f"entry {i}: missing {', '.join(sorted(missing))}")
            out.append(
                bs._set_budget(
                    s,
                    entry["owner"],
                    entry["period"],
                    entry["unit"],
                    entry["amount"],
                    entry.get("per_student"),
                    None,
                    None,
                    actor,
                )
            )
    return out


def _from_env(key: str) -> Any:
    import os

    from sovereign_portal.spawners.strict import loads_json

    raw = os.environ.get(BUDGETS_ENV)
    if not raw:
        return None
    data = loads_json(raw, what=BUDGETS_ENV)
    if not isinstance(data, dict):
        raise ValueError(f"{BUDGETS_ENV} must be a JSON object with periods and budgets")
    return data.get(key)


class BudgetPolicy(Configurable):
    """How admission uses budgets (``c.BudgetPolicy``), and the budgets an operator sets in
    config. The hub (spawn path) and the portal service (grants) each build one."""

    shorten_walltime = Bool(
        False,
        config=True,
        help="""When a request does not fit what is left of its budget, shorten its walltime
        to the longest that fits (at least min_walltime_minutes) instead of refusing it
        with 403. The grant or the server then runs for the shorter time, and the user is
        told why.""",
    )
    min_walltime_minutes = Int(
        10,
        config=True,
        help="""Shortest walltime that shorten_walltime will grant, in minutes; below it the
        request is refused with what is left and what would fit.""",
    )
    warn_at = List(
        FloatTrait(),
        [0.8, 0.95],
        config=True,
        help="""Fractions of a budget (or a student's allowance) spent or held at which the
        user is warned: on the spawn form, in the widget's cost line and in
        GET api/budgets. 1.0 (spent) always shows as 100 %.""",
    )
    grace_seconds = Int(
        300,
        config=True,
        help="""How long a running notebook server may stay over 100 % of its budget (what
        is settled plus what its running servers have used so far) before the hub stops it;
        its ledger record then ends with reason "budget". Holds make this rare: it happens
        when an operator lowers a budget or an allowance below what is already used.""",
    )
    check_interval_seconds = Int(
        60,
        config=True,
        help="""Seconds between the hub's checks of running servers against their budgets
        (one query per budget that has running servers; no scheduler call).""",
    )
    periods = Dict(
        config=True,
        help="""Budget periods by name, each {"start": ISO date, "end": ISO date}, e.g.
        {"2026-autumn": {"start": "2026-09-01", "end": "2027-02-01"}}. Applied to the portal
        database when the portal service starts, with budgets. `sovereign-portal budgets
        set --period NAME --start --end` defines periods too.""",
    )
    budgets = List(
        Dict(),
        config=True,
        help="""Budgets set by the operator: a list of {"owner": "course:ml101" |
        "project:<id>" | "user:<name>", "period": NAME, "unit": "gpu_hours" | "eur" | "kwh",
        "amount": N, "per_student": N (courses only, optional)}. Applied (created or
        changed) when the portal service starts; a bad entry stops the start with the field
        named, and nothing is changed. configure() passes them to the service.""",
    )

    @default("periods")
    def _periods_env(self) -> dict[str, Any]:
        return dict(_from_env("periods") or {})

    @default("budgets")
    def _budgets_env(self) -> list[Any]:
        return list(_from_env("budgets") or [])

    @validate("warn_at")
    def _check_warn_at(self, proposal: Any) -> list[float]:
        values = list(proposal["value"])
        if not all(0 < v < 1 for v in values):
            raise ValueError("BudgetPolicy.warn_at: fractions between 0 and 1, e.g. [0.8, 0.95]")
        return sorted(values)

    def database_configured(self) -> bool:
        """Whether a portal database was named (config or the hub's environment)."""
        import os

        return bool(os.environ.get(DB_URL_ENV)) or "url" in self.config.get("PortalDatabase", {})

    def open(self, *, apply: bool = True, url: str | None = None) -> BudgetStore:
        """The budget store on the portal database (``c.PortalDatabase``, or ``url``), with
        the config's periods and budgets applied."""
        import os

        db = PortalDatabase(parent=self)
        if url is not None:
            db.url = url
        elif os.environ.get(DB_URL_ENV) and "url" not in self.config.get("PortalDatabase", {}):
            db.url = os.environ[DB_URL_ENV]
        bs = BudgetStore(db.open())
        if apply and (self.periods or self.budgets):
            apply_config(bs, self.periods, self.budgets)
        return bs


# -- while jobs run: the one rule that stops them for their budget ---------------------------------
class BudgetWatch:
    """When a running job must stop for its budget: the one rule, for notebook servers
    (the hub's :class:`SpawnBudgetGate`) and compute sessions (the portal service).

    A job must stop once the budget it charges (or its user's allowance in a course) has
    been at 100 % for longer than the grace, counting what is settled plus what **every**
    running job of that budget has used until now (:meth:`BudgetStore.running_balances`:
    servers and sessions alike, from their open ledger records). Whoever runs the job
    stops it and closes its record with reason ``budget``. The grace starts when the
    budget is first seen spent; it restarts if the budget is raised meanwhile.
    """

    def __init__(self, grace_seconds: float) -> None:
        self.grace_seconds = grace_seconds
        self._over_since: dict[tuple[str, str | None], float] = {}

    def due(self, bs: BudgetStore, refs: Iterable[str], now: float) -> list[tuple[str, Balance]]:
        """The refs among ``refs`` (the running jobs this caller stops) that must stop now,
        with the balance that says why."""
        from .budgets import over_budget

        out: list[tuple[str, Balance]] = []
        for ref, bal in bs.running_balances(refs, now).items():
            mark = (bal.budget.key, bal.user)
            if bal.used_fraction < 1.0 - 1e-9:
                self._over_since.pop(mark, None)
                continue
            since = self._over_since.setdefault(mark, now)
            if over_budget(bal, since, now, self.grace_seconds):
                out.append((ref, bal))
        return out


# -- the hub's spawn path -------------------------------------------------------------------------
class SpawnBudgetGate:
    """The budget step of a notebook spawn, from the hub side (spawners never import hub).

    :func:`.portal.configure` sets :meth:`pre_spawn_hook` and :meth:`post_stop_hook` on
    ``c.Spawner``. Before anything is submitted, the hook checks the request that the
    spawner has validated (``spawner.resolved``) against the user's budget and holds its
    maximum (ref ``server:<user>/<server name>``, the ledger record's source); a request
    that does not fit is refused with 403 and the message, and nothing starts. With
    ``BudgetPolicy.shorten_walltime`` the server's walltime is shortened instead. After a
    stop, a hold that no ledger record covers (the server never started) is released.
    """

    def __init__(self, previous_pre: Any = None, previous_post: Any = None) -> None:
        self._stores: dict[str, BudgetStore] = {}
        self._readers: dict[str, BudgetStore] = {}  # previews: config budgets not applied
        self._previous = (previous_pre, previous_post)
        #: ref -> (spawner, budget key) of the servers admitted against a budget
        self._running: dict[str, tuple[Any, str]] = {}
        self._watch: Any = None
        self._watchman = BudgetWatch(BudgetPolicy.grace_seconds.default_value)

    def __deepcopy__(self, memo: Any) -> SpawnBudgetGate:
        # traitlets deep-copies config values (the hooks are bound methods of this gate):
        # every spawner shares the one gate and its database engines.
        return self

    def _store(self, spawner: Any) -> tuple[BudgetStore, BudgetPolicy]:
        policy = BudgetPolicy(parent=spawner)
        url = PortalDatabase(parent=spawner).url
        if url not in self._stores:
            self._stores[url] = policy.open()
        return self._stores[url], policy

    def charge_to(self, spawner: Any) -> tuple[str, str] | None:
        """``budget_charge`` of the Slurm spawner: (owner kind, id) of the budget a spawn by
        this user would charge now (:meth:`BudgetStore.charged_budget`, the rule admission
        holds on), or None. Nothing is held or written: the job-script preview
        (``sovereign-portal job-script``, ``job_script()``) names its ``--account`` with it."""
        url = PortalDatabase(parent=spawner).url
        bs = self._stores.get(url) or self._readers.get(url)
        if bs is None:
            bs = self._readers[url] = BudgetPolicy(parent=spawner).open(apply=False)
        groups = [g.name for g in getattr(spawner.user, "groups", []) or []]
        b = bs.charged_budget(spawner.user.name, groups)
        return (b.owner.kind, b.owner.id) if b is not None else None

    @staticmethod
    def ref(spawner: Any) -> str:
        return f"server:{spawner.user.name}/{spawner.name or ''}"

    def display(self, spawner: Any, partitions: Any) -> tuple[dict[str, str], str]:
        """``budget_display`` of the spawn form: per-size notes and a banner, as plain data."""
        from sovereign_portal.spawners.request import (
            RequestError,
            parse_request,
            request_from_size_id,
            resolve,
        )
        from sovereign_portal.spawners.sizes import partition_sizes

        from .budgets import banner_text, size_note

        bs, policy = self._store(spawner)
        groups = [g.name for g in getattr(spawner.user, "groups", []) or []]
        bals = bs.balances(spawner.user.name, groups)
        if not bals:
            return {}, ""
        b = bals[0]
        notes: dict[str, str] = {}
        for p in partitions:
            for size in partition_sizes(p):
                if size.nodes > 1:
                    continue
                try:
                    req = parse_request(request_from_size_id(size.id, partition=p.name))
                    r = resolve(spawner.site, req, default_partition=p.name)
                except RequestError:
                    continue
                notes[f"{p.name}/{size.id}"] = size_note(b, Rates.from_resolved(r))
        return notes, banner_text(b, policy.warn_at)

    async def pre_spawn_hook(self, spawner: Any) -> None:
        import inspect

        if self._previous[0] is not None:
            out = self._previous[0](spawner)
            if inspect.isawaitable(out):
                await out
        resolved = getattr(spawner, "resolved", None)
        if resolved is None:
            return  # not a portal spawner: nothing was placed, nothing to charge
        bs, policy = self._store(spawner)
        groups = [g.name for g in getattr(spawner.user, "groups", []) or []]
        ref = self.ref(spawner)
        bs.release_unrecorded(ref)  # a hold left by an earlier spawn that never started
        try:
            d = bs.admit_resolved(spawner.user.name, groups, resolved, ref, policy)
        except BudgetRefused as e:
            raise spawner.portal_error(e) from None  # logged and counted there
        # the ledger record (hub/ledger_hub.py) and the job's --account charge the budget
        # that admitted it (none: the user's own record, the default account)
        spawner.ledger_charge_to = None
        if d.budget is not None:
            owner = Owner.parse(d.budget.rsplit("@", 1)[0])
            spawner.ledger_charge_to = (owner.kind, owner.id)
            self._running[ref] = (spawner, d.budget)
            self._start_watch(policy)
        if d.shortened:
            spawner.log.info("Budget shortened %s: %s", spawner.user.name, d.message)
            spawner.user_options = {
                **(spawner.user_options or {}),
                "walltime_minutes": d.walltime_minutes,
            }
            spawner.resolved = replace(resolved, walltime_minutes=d.walltime_minutes)

    async def post_stop_hook(self, spawner: Any) -> None:
        import inspect

        try:
            if getattr(spawner, "resolved", None) is not None:
                self._running.pop(self.ref(spawner), None)
                bs, _ = self._store(spawner)
                bs.release_unrecorded(self.ref(spawner))
        finally:
            if self._previous[1] is not None:
                out = self._previous[1](spawner)
                if inspect.isawaitable(out):
                    await out

    # -- while servers run: 100 % of the budget, after the grace, stops them ---------------
    def _start_watch(self, policy: BudgetPolicy) -> None:
        if self._watch is not None:
            return
        from tornado.ioloop import PeriodicCallback

        self._watchman.grace_seconds = policy.grace_seconds
        self._watch = PeriodicCallback(self.check, policy.check_interval_seconds * 1000)
        self._watch.start()

    async def check(self, now: float | None = None) -> list[str]:
        """Stop the servers that :class:`BudgetWatch` says must stop (their budget has been
        over 100 % for longer than the grace). Returns the refs stopped (their ledger
        records end with reason "budget")."""
        t = time.time() if now is None else now
        stopped: list[str] = []
        by_store: dict[int, tuple[BudgetStore, list[str]]] = {}
        for ref, (spawner, _key) in list(self._running.items()):
            try:
                bs, _ = self._store(spawner)
            except Exception:  # one server's trouble never stops the watch
                spawner.log.exception("Budget check of %s failed", ref)
                continue
            by_store.setdefault(id(bs), (bs, []))[1].append(ref)
        for bs, refs in by_store.values():
            try:
                due = self._watchman.due(bs, refs, t)
            except Exception:
                log.exception("Budget check of %d server(s) failed", len(refs))
                continue
            for ref, bal in due:
                found = self._running.pop(ref, None)
                if found is None:
                    continue
                spawner = found[0]
                try:
                    spawner.log.warning(
                        "Budget %s is spent (%s): stopping the server of %s",
                        bal.budget.key,
                        bal.to_json()["banner"],
                        spawner.user.name,
                    )
                    spawner.ledger_end_reason = "budget"
                    await spawner.user.stop(spawner.name)
                    stopped.append(ref)
                except Exception:  # one server's trouble never stops the watch
                    spawner.log.exception("Budget stop of %s failed", ref)
        return stopped
