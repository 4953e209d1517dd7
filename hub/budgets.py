"""Budgets: who may spend how much in which period, and whether a request fits. Pure.

A :class:`Budget` belongs to an :class:`Owner` (a user, a course or a project: the groups
that login makes, ``course-<id>`` and ``project-<id>``, see :mod:`.claims`), covers a
:class:`Period`, and holds an amount in one unit: GPU-hours, € or kWh. A course budget is
a pool; inside it each student may have an allowance (the budget's ``per_student``
default, or an instructor's per-student :class:`Allowance`).

Money moves in :class:`Charge` rows: a charge is *held* at admission for the most the
request can cost (its rates over its walltime, :func:`.ledger.max_amounts` on
:class:`.ledger.Rates` taken from the request's own price model, never written twice),
and *settled* at what was really used (:func:`.ledger.close`'s amounts) when the ledger
record closes. Both go through :func:`amount_in`. So

    balance = amount − settled usage − open holds

and concurrent admissions cannot overspend (the store holds and checks in one
transaction, :mod:`.budget_store`). Nothing here does I/O: every rule is tested as a table.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from sovereign_portal.spawners.errors import RequestRefused
from sovereign_portal.spawners.strict import is_canonical_decimal

from .admission import AdmissionError
from .claims import CANONICAL_USERNAME_RE, COURSE_GROUP, ID_RE, PROJECT_GROUP
from .ledger import Amounts, Rates, max_amounts

OWNER_KINDS = ("user", "course", "project")
#: Units a budget may be kept in.
UNITS = ("gpu_hours", "eur", "kwh")
UNIT_LABELS = {"gpu_hours": "GPU-hours", "eur": "€", "kwh": "kWh"}
#: The largest amount a budget or allowance may hold, in any unit (a typo guard: 10 M).
MAX_AMOUNT = 10_000_000.0
#: The longest period a budget may cover, in days.
MAX_PERIOD_DAYS = 5 * 366
PERIOD_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,31}$")
#: Warning levels, as fractions of the binding limit (allowance, else pool) used.
DEFAULT_WARN_AT = (0.8, 0.95)


class BudgetError(RequestRefused):
    """Bad budget input (HTTP 400). ``field`` names the field; ``str()`` is safe to show."""

    default_reason = "invalid_budget"

    def __init__(self, field: str, message: str, status: int | None = None) -> None:
        super().__init__(f"{field}: {message}", field=field, status=status)


class BudgetRefused(AdmissionError):
    """A well-formed request that does not fit what is left (HTTP 403)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="budget")


def _short(value: Any, limit: int = 40) -> str:
    s = str(value)
    return s if len(s) <= limit else s[: limit - 1] + "…"


# -- validated values -------------------------------------------------------------------------
def parse_amount(value: Any, field: str = "amount", *, maximum: float = MAX_AMOUNT) -> float:
    """A finite, non-negative amount no larger than ``maximum``; else BudgetError(field)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise BudgetError(field, f"must be a number, got {type(value).__name__}")
    if isinstance(value, str) and value.startswith("-") and is_canonical_decimal(value[1:]):
        raise BudgetError(field, f"must not be negative, got {_short(value)}")
    if isinstance(value, str) and not is_canonical_decimal(value):
        # float() would take "nan", " 2", "1e9" and non-ASCII digits such as "٢"
        raise BudgetError(
            field,
            "must be a number written with the digits 0-9 and at most one '.', "
            f"got {_short(value)!r}",
        )
    try:
        x = float(value)
    except (ValueError, OverflowError):
        raise BudgetError(field, f"must be a number, got {_short(value)!r}") from None
    if not math.isfinite(x):
        raise BudgetError(field, f"must be a finite number, got {_short(value)!r}")
    if x < 0:
        raise BudgetError(field, f"must not be negative, got {x:g}")
    if x > maximum:
        raise BudgetError(field, f"{x:g} is over the largest allowed, {maximum:g}")
    return x


def parse_unit(value: Any, field: str = "unit") -> str:
    if value not in UNITS:
        raise BudgetError(field, f"must be one of {', '.join(UNITS)}, got {_short(value)!r}")
    return str(value)


@dataclass(frozen=True, order=True)
class Owner:
    """Who a budget belongs to: ``user:alice@uni-a.example``, ``course:ml101``, ``project:x``."""

    kind: str
    id: str

    def __post_init__(self) -> None:
        if self.kind not in OWNER_KINDS:
            raise BudgetError(
                "owner", f"kind must be one of {', '.join(OWNER_KINDS)}, got {_short(self.kind)!r}"
            )
        pattern = CANONICAL_USERNAME_RE if self.kind == "user" else ID_RE
        if not isinstance(self.id, str) or not pattern.match(self.id):
            raise BudgetError("owner", f"{_short(self.id)!r} is not a valid {self.kind} id")

    @classmethod
    def parse(cls, text: Any) -> Owner:
        """``course:ml101`` → Owner("course", "ml101")."""
        if not isinstance(text, str) or ":" not in text:
            raise BudgetError("owner", f"write KIND:ID, e.g. course:ml101, got {_short(text)!r}")
        kind, _, ident = text.partition(":")
        return cls(kind, ident)

    @property
    def group(self) -> str | None:
        """The hub group whose members charge this budget (none for a user budget)."""
        if self.kind == "course":
            return COURSE_GROUP.format(self.id)
        if self.kind == "project":
            return PROJECT_GROUP.format(self.id)
        return None

    def __str__(self) -> str:
        return f"{self.kind}:{self.id}"


def _as_datetime(value: Any, field: str) -> datetime:
    if isinstance(value, datetime):
        d = value
    elif isinstance(value, date):
        d = datetime(value.year, value.month, value.day)
    elif isinstance(value, str) and len(value) <= 40:
        try:
            d = datetime.fromisoformat(value)
        except ValueError:
            raise BudgetError(
                field, f"must be an ISO date, e.g. 2026-09-01, got {value!r}"
            ) from None
    else:
        raise BudgetError(field, f"must be an ISO date, e.g. 2026-09-01, got {_short(value)!r}")
    return d if d.tzinfo else d.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Period:
    """A named span of time, such as a semester: ``[start, end)``, in UTC."""

    name: str
    start: datetime
    end: datetime

    @classmethod
    def make(cls, name: Any, start: Any, end: Any) -> Period:
        if not isinstance(name, str) or not PERIOD_RE.match(name):
            raise BudgetError(
                "period", f"a name such as 2026-autumn ([a-z0-9._-], ≤ 32), got {_short(name)!r}"
            )
        s, e = _as_datetime(start, "start"), _as_datetime(end, "end")
        if e <= s:
            raise BudgetError("end", f"must be after start ({s.date()}), got {e.date()}")
        if (e - s).days > MAX_PERIOD_DAYS:
            raise BudgetError("end", f"a period spans at most {MAX_PERIOD_DAYS} days")
        return cls(name, s, e)

    def covers(self, when: datetime) -> bool:
        return self.start <= when < self.end


@dataclass(frozen=True)
class Budget:
    """An owner's amount for a period. A course's ``per_student`` is each student's default
    allowance inside the pool (None: no per-student cap)."""

    owner: Owner
    period: Period
    unit: str
    amount: float
    per_student: float | None = None

    def __post_init__(self) -> None:
        parse_unit(self.unit)
        parse_amount(self.amount)
        if self.per_student is not None:
            if self.owner.kind != "course":
                raise BudgetError("per_student", "only a course budget has per-student allowances")
            parse_amount(self.per_student, "per_student", maximum=self.amount)

    @property
    def key(self) -> str:
        """``course:ml101@2026-autumn``: unique per owner and period."""
        return f"{self.owner}@{self.period.name}"

    @property
    def label(self) -> str:
        return self.owner.id

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "owner": str(self.owner),
            "owner_kind": self.owner.kind,
            "owner_id": self.owner.id,
            "period": self.period.name,
            "start": self.period.start.isoformat(),
            "end": self.period.end.isoformat(),
            "unit": self.unit,
            "amount": self.amount,
            "per_student": self.per_student,
        }


def make_budget(
    owner: Any,
    period: Period,
    unit: Any,
    amount: Any,
    per_student: Any = None,
) -> Budget:
    """Validate raw input (CLI, config, REST) into a Budget; BudgetError names the field."""
    own = owner if isinstance(owner, Owner) else Owner.parse(owner)
    u = parse_unit(unit)
    amt = parse_amount(amount)
    ps = None
    if per_student is not None:
        if own.kind != "course":
            raise BudgetError("per_student", "only a course budget has per-student allowances")
        ps = parse_amount(per_student, "per_student")
        if ps > amt:
            raise BudgetError(
                "per_student", f"{ps:g} is above the course pool of {amt:g} {UNIT_LABELS[u]}"
            )
    return Budget(own, period, u, amt, ps)


def check_allowance(budget: Budget, user: Any, amount: Any) -> float:
    """An instructor's per-student allowance, validated against the pool; returns it."""
    if budget.owner.kind != "course":
        raise BudgetError("course", f"{budget.owner} is not a course: allowances are per course")
    if not isinstance(user, str) or not CANONICAL_USERNAME_RE.match(user):
        raise BudgetError("user", f"{_short(user)!r} is not a user name")
    x = parse_amount(amount)
    if x > budget.amount:
        raise BudgetError(
            "amount",
            f"{x:g} is above the pool of {budget.owner.id} "
            f"({budget.amount:g} {UNIT_LABELS[budget.unit]})",
        )
    return x


# -- charges and balances ---------------------------------------------------------------------
@dataclass(frozen=True)
class Charge:
    """A hold (``settled`` False: the most a request may cost) or settled usage."""

    budget: str  # Budget.key
    user: str
    amount: float
    settled: bool = False


@dataclass(frozen=True)
class Balance:
    """What is left of one budget, for one user where the budget is a course pool."""

    budget: Budget
    user: str | None
    settled: float
    held: float
    allowance: float | None = None
    user_settled: float = 0.0
    user_held: float = 0.0

    @property
    def pool_left(self) -> float:
        return max(0.0, self.budget.amount - self.settled - self.held)

    @property
    def allowance_left(self) -> float | None:
        if self.allowance is None:
            return None
        return max(0.0, self.allowance - self.user_settled - self.user_held)

    @property
    def left(self) -> float:
        a = self.allowance_left
        return self.pool_left if a is None else min(self.pool_left, a)

    @property
    def limit(self) -> float:
        """The binding limit: the allowance where there is one, else the pool."""
        return self.budget.amount if self.allowance is None else self.allowance

    @property
    def used_fraction(self) -> float:
        """Share of the binding limit spent or held (1.0 when the limit is 0)."""
        if self.allowance is not None and self.allowance_left is not None:
            a_used = 1.0 - self.allowance_left / self.allowance if self.allowance else 1.0
            p_used = 1.0 - self.pool_left / self.budget.amount if self.budget.amount else 1.0
            return max(a_used, p_used)
        if not self.budget.amount:
            return 1.0
        return 1.0 - self.pool_left / self.budget.amount

    def to_json(self, warn_at: Sequence[float] = DEFAULT_WARN_AT) -> dict[str, Any]:
        return {
            "budget": self.budget.key,
            "owner": str(self.budget.owner),
            "period": self.budget.period.name,
            "unit": self.budget.unit,
            "amount": self.budget.amount,
            "allowance": self.allowance,
            "settled": round(self.settled, 6),
            "held": round(self.held, 6),
            "left": round(self.left, 6),
            "used_fraction": round(self.used_fraction, 6),
            "warning": warning_level(self, warn_at),
            "text": left_text(self),
            "banner": banner_text(self, warn_at),
        }


def balance_of(
    budget: Budget,
    charges: Iterable[Charge],
    user: str | None = None,
    allowances: Mapping[str, float] | None = None,
) -> Balance:
    """Fold the charges of ``budget`` into its balance, for ``user`` when given."""
    settled = held = u_settled = u_held = 0.0
    for c in charges:
        if c.budget != budget.key:
            continue
        if c.settled:
            settled += c.amount
        else:
            held += c.amount
        if user is not None and c.user == user:
            if c.settled:
                u_settled += c.amount
            else:
                u_held += c.amount
    allowance = None
    if user is not None and budget.owner.kind == "course":
        allowance = (allowances or {}).get(user, budget.per_student)
    return Balance(budget, user, settled, held, allowance, u_settled, u_held)


def warning_level(balance: Balance, warn_at: Sequence[float] = DEFAULT_WARN_AT) -> int | None:
    """The highest warning level reached, in percent (80, 95, 100), or None."""
    used = balance.used_fraction
    if used >= 1.0 - 1e-9:
        return 100
    hit = [w for w in sorted(warn_at) if used >= w - 1e-9]
    return round(hit[-1] * 100) if hit else None


def over_budget(balance: Balance, since: float | None, now: float, grace_seconds: float) -> bool:
    """Whether a running job charging ``balance`` must stop: the budget has been spent
    (100 %) since ``since`` (epoch seconds) for longer than the grace."""
    return warning_level(balance) == 100 and since is not None and now - since >= grace_seconds


# -- which budget a caller charges -------------------------------------------------------------
def applicable(
    budgets: Iterable[Budget], user: str, groups: Iterable[str], when: datetime
) -> list[Budget]:
    """The budgets ``user`` may charge at ``when``, in the order they are charged: course
    pools (by id), then projects, then the user's own budget."""
    gs = set(groups)
    order = {"course": 0, "project": 1, "user": 2}
    found = [
        b
        for b in budgets
        if b.period.covers(when)
        and ((b.owner.kind == "user" and b.owner.id == user) or b.owner.group in gs)
    ]
    return sorted(found, key=lambda b: (order[b.owner.kind], b.owner.id, b.period.start))


def charged(
    budgets: Iterable[Budget], user: str, groups: Iterable[str], when: datetime
) -> Budget | None:
    """The one budget an admission of ``user`` charges at ``when``: the first of
    :func:`applicable`, or None. Admission holds on it, and the Slurm ``--account`` of the
    job (and of its preview) is its account."""
    found = applicable(budgets, user, groups, when)
    return found[0] if found else None


# -- admission ------------------------------------------------------------------------------------
def fmt(x: float, *, up: bool = False) -> str:
    """Two decimals, rounded down (what is left) or up (what is needed), no trailing zeros."""
    scaled = x * 100
    v = (math.ceil(scaled - 1e-9) if up else math.floor(scaled + 1e-9)) / 100
    return f"{v:.2f}".rstrip("0").rstrip(".") or "0"


def amount_in(amounts: Amounts, unit: str) -> float:
    """Ledger amounts in a budget's unit: GPU-hours, € or kWh. The one conversion."""
    if unit == "gpu_hours":
        return amounts.gpu_seconds / 3600
    if unit == "eur":
        return amounts.eur
    if unit == "kwh":
        return amounts.energy_wh / 1000
    raise BudgetError("unit", f"must be one of {', '.join(UNITS)}, got {_short(unit)!r}")


def need(rates: Rates, walltime_minutes: int, unit: str) -> float:
    """The most a request at ``rates`` can cost over ``walltime_minutes``: what to hold."""
    return amount_in(max_amounts(rates, walltime_minutes), unit)


def describe(size: Mapping[str, Any], count: int = 1) -> str:
    """``a 1g.10gb slice``, ``2 H100 GPUs``: a size as the refusal message names it."""
    if size.get("slice"):
        one = f"{size['slice']} slice"
        return f"a {one}" if count == 1 else f"{count} × {one}s"
    return str(size.get("label")) if count == 1 else f"{count} × {size.get('label')}"


def left_text(balance: Balance) -> str:
    """``ml101 has 1.2 GPU-hours left for you``."""
    unit = balance.budget.unit
    left = fmt(balance.left)
    amount = f"€{left}" if unit == "eur" else f"{left} {UNIT_LABELS[unit]}"
    who = " for you" if balance.user is not None else ""
    return f"{balance.budget.label} has {amount} left{who}"


def fit_minutes(balance: Balance, rates: Rates, cap: int = 30 * 24 * 60) -> int:
    """The longest walltime (minutes, at most ``cap``) whose most cost fits what is left:
    the largest ``m`` with ``need(rates, m) <= left`` (the cost rises with the walltime)."""
    unit, left = balance.budget.unit, balance.left + 1e-9
    per_minute = need(rates, 60, unit) / 60
    if per_minute <= 0:
        return cap
    m = max(0, min(cap, math.floor(balance.left / per_minute)))
    while m < cap and need(rates, m + 1, unit) <= left:  # rounding in the amounts
        m += 1
    while m > 0 and need(rates, m, unit) > left:
        m -= 1
    return m


def banner_text(balance: Balance, warn_at: Sequence[float] = DEFAULT_WARN_AT) -> str:
    """The line above the spawn form: what is left, and the warning level reached."""
    level = warning_level(balance, warn_at)
    if level is None:
        return left_text(balance)
    if level == 100:
        return f"{left_text(balance)}: the budget is spent"
    return f"{left_text(balance)} ({level} % used)"


def size_note(balance: Balance, rates: Rates) -> str:
    """The text next to one size on the spawn form: its rate, and how long fits."""
    unit = balance.budget.unit
    per_hour = fmt(need(rates, 60, unit), up=True)
    rate = f"€{per_hour}/h" if unit == "eur" else f"{per_hour} {UNIT_LABELS[unit]}/h"
    m = fit_minutes(balance, rates)
    return f"{rate}, fits {m} min of your budget" if m >= 1 else f"{rate}, over your budget"


@dataclass(frozen=True)
class Decision:
    """Admission's budget answer: the (maybe shortened) walltime, and what to hold where."""

    walltime_minutes: int
    budget: str | None = None  # Budget.key; None when no budget applies
    hold: float = 0.0
    message: str = ""
    shortened: bool = False


def decide(
    balance: Balance | None,
    rates: Rates,
    walltime_minutes: int,
    what: str,
    *,
    shorten: bool = False,
    min_minutes: int = 10,
) -> Decision:
    """Does a request fit what is left of ``balance``? Shorten it or raise BudgetRefused.

    The most it can cost is :func:`need` (rate × walltime). When that is over what is left,
    the refusal says what is left and how many minutes of this size would fit; with
    ``shorten`` (an operator option) the walltime becomes the longest that fits, if that is
    at least ``min_minutes``. With no balance (no budget applies) anything fits.
    """
    if balance is None:
        return Decision(walltime_minutes)
    unit = balance.budget.unit
    most = need(rates, walltime_minutes, unit)
    left = balance.left
    head = (
        f"{left_text(balance)}; {what} for {walltime_minutes} min needs at most "
        f"{fmt(most, up=True)}"
    )
    if most <= left + 1e-9:
        return Decision(walltime_minutes, balance.budget.key, most, head)
    minutes = fit_minutes(balance, rates, cap=walltime_minutes)
    if shorten and minutes >= min_minutes:
        return Decision(
            minutes,
            balance.budget.key,
            need(rates, minutes, unit),
            f"{head}: shortened to {minutes} min, which fits",
            shortened=True,
        )
    if minutes >= 1:
        hint = f": ask for at most {minutes} min, or a smaller size"
    else:
        hint = ": nothing of this size fits; ask your instructor or the operators for more"
    raise BudgetRefused(head + hint)
