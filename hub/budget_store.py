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

import json
import secrets
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Float, ForeignKey, Index, Integer, String, UniqueConstraint, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from .budgets import (
    Balance,
    Budget,
    BudgetError,
    Charge,
    Decision,
    Owner,
    Period,
    applicable,
    balance_of,
    check_allowance,
    decide,
    make_budget,
)
from .ledger import Amounts, Rates
from .store import AuditEvent, Base, PortalStore, UTCDateTime, utcnow

HELD, SETTLED, RELEASED = "held", "settled", "released"
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
        Index("ix_budget_charges_budget_state", "budget_id", "state"),
        Index("ix_budget_charges_ref", "ref"),
    )


def _period(row: BudgetPeriod) -> Period:
    return Period(row.name, row.start_at, row.end_at)


def _budget(row: BudgetRow, period: Period) -> Budget:
    return Budget(
        Owner(row.owner_kind, row.owner_id), period, row.unit, row.amount, row.per_student
    )


def _charge(key: str, row: BudgetCharge, now: datetime) -> Charge | None:
    if row.state == SETTLED:
        return Charge(key, row.user, row.settled or 0.0, settled=True)
    if row.state == HELD:
        # a hold past its walltime and slack is charged in full, as settled usage
        return Charge(key, row.user, row.held, settled=row.expires_at <= now)
    return None


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

    def _budgets(self, s: Session) -> list[tuple[BudgetRow, Budget]]:
        periods = {r.name: _period(r) for r in s.scalars(select(BudgetPeriod))}
        rows = s.scalars(select(BudgetRow).order_by(BudgetRow.owner_kind, BudgetRow.owner_id))
        return [(r, _budget(r, periods[r.period])) for r in rows]

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
    def _balance(
        self, s: Session, row: BudgetRow, b: Budget, user: str | None, now: datetime
    ) -> Balance:
        q = select(BudgetCharge).where(
            BudgetCharge.budget_id == row.id, BudgetCharge.state != RELEASED
        )
        charges = [c for r in s.scalars(q) if (c := _charge(b.key, r, now)) is not None]
        return balance_of(b, charges, user, self._allowances(s, row.id))

    def balances(
        self, user: str, groups: Iterable[str], now: datetime | None = None
    ) -> list[Balance]:
        """The balances ``user`` charges now, in the order admission uses them."""
        t = now or utcnow()
        with self.store.begin() as s:
            pairs = self._budgets(s)
            rows = {b.key: r for r, b in pairs}
            found = applicable([b for _, b in pairs], user, groups, t)
            return [self._balance(s, rows[b.key], b, user, t) for b in found]

    def balance(self, owner: Any, period: str, user: str | None = None) -> Balance:
        own = owner if isinstance(owner, Owner) else Owner.parse(owner)
        t = utcnow()
        with self.store.begin() as s:
            p = _period(self._known_period(s, period))
            row = self._row(s, own, period, lock=False)
            if row is None:
                raise BudgetError("owner", f"{own} has no budget in {period}", status=404)
            return self._balance(s, row, _budget(row, p), user, t)

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
        with self.store.begin() as s:
            pairs = self._budgets(s)
            found = applicable([b for _, b in pairs], user, groups, t)
            if not found:
                return decide(None, rates, walltime_minutes, what)
            b = found[0]
            row = self._row(s, b.owner, b.period.name, lock=True)  # FOR UPDATE on PostgreSQL
            assert row is not None
            d = decide(
                self._balance(s, row, b, user, t),
                rates,
                walltime_minutes,
                what,
                shorten=shorten,
                min_minutes=min_minutes,
            )
            s.add(
                BudgetCharge(
                    id=secrets.token_hex(16),
                    budget_id=row.id,
                    user=user,
                    ref=ref,
                    state=HELD,
                    held=d.hold,
                    created_at=t,
                    expires_at=t + timedelta(minutes=d.walltime_minutes) + HOLD_SLACK,
                )
            )
            return d

    def settle(self, ref: str, amounts: Amounts | None = None, used: float | None = None) -> int:
        """Settle the open holds of ``ref`` at what was used (ledger amounts, in each budget's
        unit, or ``used`` directly). Returns how many holds were settled."""
        from .budgets import amount_in

        with self.store.begin() as s:
            q = (
                select(BudgetCharge, BudgetRow.unit)
                .join(BudgetRow)
                .where(BudgetCharge.ref == ref, BudgetCharge.state == HELD)
            )
            n = 0
            for charge, unit in s.execute(q).all():
                x = used if used is not None else amount_in(amounts or Amounts(), unit)
                charge.state, charge.settled, charge.closed_at = SETTLED, max(0.0, x), utcnow()
                n += 1
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

    def holds(self, ref: str | None = None) -> list[dict[str, Any]]:
        with self.store.begin() as s:
            q = select(BudgetCharge).order_by(BudgetCharge.created_at)
            if ref is not None:
                q = q.where(BudgetCharge.ref == ref)
            return [
                {
                    "id": c.id,
                    "user": c.user,
                    "ref": c.ref,
                    "state": c.state,
                    "held": c.held,
                    "settled": c.settled,
                }
                for c in s.scalars(q)
            ]

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
