"""The ledger's pure core: usage records, their amounts, and the hash chain.

Nothing here does I/O; :mod:`.ledger_store` keeps records in the portal database and
:mod:`.ledger_hub` opens and closes them from the hub. Everything is tested as tables.

The record model (for budgets and everything that reads the books)
-------------------------------------------------------------------

One :class:`Record` per notebook server and per compute session (``row_type="usage"``),
plus correction rows (``row_type="adjustment"``). A record says:

- **who**: ``user`` (hub user name) and ``role`` (portal role at the time);
- **which budget it charges**: ``owner_type`` (``user``, ``course`` or ``project``) and
  ``owner`` (the user name, course or project group);
- **what**: ``kind`` (notebook, dask, torch), ``size`` (the size id, e.g. ``h100:3g.40gb``),
  ``accelerator``, ``slice`` (MIG profile or ""), ``gpus`` (whole GPUs, all nodes, all
  copies), ``count``, ``image``, ``walltime_minutes`` (granted);
- **where**: ``partition``, ``site``, ``nodes`` (Slurm node list or the box), ``country``,
  ``operator``;
- **the jobs**: ``job_ids`` (Slurm job ids; empty on the local box); ``source`` names what
  the record is about (``server:<user>/<server name>`` or ``grant:<id>``);
- **when**: ``opened_at`` (admitted), ``started_at`` (devices held), ``ended_at`` and
  ``end_reason``, one of :data:`END_REASONS`;
- **rates** (:class:`Rates`, fixed when the record opens, from the admitted request's own
  price and energy model in :class:`~sovereign_portal.spawners.request.Resolved`);
- **how much** (:class:`Amounts`, set once, at close): ``gpu_seconds`` (a MIG slice
  counts its compute share of a GPU), ``eur``, ``energy_wh`` and ``co2_g``, and for each
  figure its basis, ``measured`` or ``estimated`` (:data:`BASES`). Time measured by the
  hub or Slurm is measured; energy from the TDP × PUE model is estimated.

States: a record is *open* (``ended_at is None``; its job ids, nodes and start may still be
attached) and then *closed* by :func:`close`. Closing is final: a closed record never
changes. A correction is a new adjustment row (:func:`adjustment`) that names the record it
corrects (``corrects``) and carries signed amounts, so totals are plain sums over closed rows.

Holds and settlement: :func:`max_amounts` is the most a record can cost (its rates over
its whole walltime), the amount to hold at admission; :func:`close` gives the amount to
settle. Both use the same :func:`amounts_for`.

The chain: closed rows are numbered ``seq`` = 1, 2, 3... in the order they close; each
carries ``prev_hash`` (the previous closed row's ``hash``, :data:`GENESIS` for the first)
and ``hash`` = sha256 over the canonical JSON (:func:`canonical_json`) of its fields
(:data:`HASHED_FIELDS`) and ``prev_hash``. :func:`verify` walks the rows and names the first
broken link: a changed, removed or inserted closed row breaks the chain from there on.
"""

from __future__ import annotations

import hashlib
import json
import math
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from sovereign_portal.spawners.request import Resolved, co2_g

#: Why a record closed.
#: ``claimed``: a pre-warmed server's warm record, closed when its student claimed it (the
#: student's own record begins then; hub/class_start_api.py).
END_REASONS = (
    "stopped",
    "died",
    "walltime",
    "scancel",
    "node_failure",
    "budget",
    "reclaimed",
    "claimed",
)
KINDS = ("notebook", "dask", "torch")
OWNER_TYPES = ("user", "course", "project")
ROW_TYPES = ("usage", "adjustment")
BASES = ("measured", "estimated")
#: ``prev_hash`` of the first closed row.
GENESIS = "0" * 64

#: Slurm's final job states, and the end reason each means for a job the hub did not stop.
#: (The hub's own stop is ``stopped``; a budget stop ``budget``; a cull ``reclaimed``.)
SLURM_END_REASONS: dict[str, str] = {
    "CANCELLED": "scancel",
    "TIMEOUT": "walltime",
    "DEADLINE": "walltime",
    "NODE_FAIL": "node_failure",
    "BOOT_FAIL": "node_failure",
    "PREEMPTED": "reclaimed",
    "REVOKED": "reclaimed",
    "COMPLETED": "died",
    "FAILED": "died",
    "OUT_OF_MEMORY": "died",
    "SPECIAL_EXIT": "died",
    "GONE": "died",
}


class LedgerError(ValueError):
    """A ledger operation that cannot be done; the message names the field."""


def slurm_end_reason(
    state: str,
    *,
    seconds: float | None = None,
    walltime_minutes: int = 0,
    warning_s: float = 0,
) -> str | None:
    """The end reason of a job in Slurm ``state``; None while it is not final.

    A server is told ``warning_s`` before its walltime that it must stop (SIGTERM), and
    its job then ends COMPLETED or FAILED: after ``seconds`` of a ``walltime_minutes``
    walltime, such an end within the warning counts as ``walltime``, not ``died``.
    """
    reason = SLURM_END_REASONS.get(state.split()[0].upper() if state else "")
    if (
        reason == "died"
        and state != "GONE"
        and walltime_minutes > 0
        and seconds is not None
        and seconds >= walltime_minutes * 60 - warning_s
    ):
        return "walltime"
    return reason


@dataclass(frozen=True)
class Rates:
    """What one second of a record costs, fixed when it opens."""

    gpu_equivalents: float  # GPUs billed: whole GPUs, or compute slices / 7
    eur_per_hour: float
    power_w: float  # facility power: board power at TDP x PUE
    carbon_g_per_kwh: float

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
                raise LedgerError(f"{f.name}: must be a finite number, got {v!r}")
            if v < 0:
                raise LedgerError(f"{f.name}: must not be negative, got {v!r}")
            object.__setattr__(self, f.name, float(v))  # one JSON form for the hash

    @classmethod
    def from_resolved(cls, r: Resolved) -> Rates:
        """The rates of an admitted request: its own price and energy model."""
        return cls(
            gpu_equivalents=r.gpu_equivalents,
            eur_per_hour=r.eur_per_hour,
            power_w=r.facility_power_w,
            carbon_g_per_kwh=r.partition.carbon_g_per_kwh,
        )


@dataclass(frozen=True)
class Amounts:
    """How much: GPU-seconds, euros, watt-hours and grams of CO₂, each with its basis."""

    gpu_seconds: float = 0.0
    eur: float = 0.0
    energy_wh: float = 0.0
    co2_g: float = 0.0
    gpu_seconds_basis: str = "measured"
    eur_basis: str = "measured"
    energy_basis: str = "estimated"
    co2_basis: str = "estimated"

    def __post_init__(self) -> None:
        for name in ("gpu_seconds", "eur", "energy_wh", "co2_g"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
                raise LedgerError(f"{name}: must be a finite number, got {v!r}")
            if abs(v) > 1e15:
                raise LedgerError(f"{name}: {v!r} is beyond any real usage")
            object.__setattr__(self, name, float(v))
        for name in ("gpu_seconds_basis", "eur_basis", "energy_basis", "co2_basis"):
            if getattr(self, name) not in BASES:
                raise LedgerError(f"{name}: must be one of {', '.join(BASES)}")

    @property
    def gpu_hours(self) -> float:
        return self.gpu_seconds / 3600


def _round(a: Amounts) -> Amounts:
    return replace(
        a,
        gpu_seconds=round(a.gpu_seconds, 3),
        eur=round(a.eur, 6),
        energy_wh=round(a.energy_wh, 3),
        co2_g=round(a.co2_g, 3),
    )


def amounts_for(rates: Rates, seconds: float, time_basis: str = "measured") -> Amounts:
    """What ``seconds`` of wall-clock time at ``rates`` amount to.

    GPU-seconds and € follow the time (``time_basis``: the hub's or Slurm's clock is
    measured; an end time the hub had to guess is estimated); energy and CO₂ come from
    the TDP × PUE model, so they are estimated.
    """
    if not math.isfinite(seconds) or seconds < 0:
        raise LedgerError(f"seconds: must be a finite number ≥ 0, got {seconds!r}")
    if time_basis not in BASES:
        raise LedgerError(f"time_basis: must be one of {', '.join(BASES)}")
    hours = seconds / 3600
    wh = rates.power_w * hours
    return _round(
        Amounts(
            gpu_seconds=rates.gpu_equivalents * seconds,
            eur=rates.eur_per_hour * hours,
            energy_wh=wh,
            co2_g=co2_g(wh, rates.carbon_g_per_kwh),
            gpu_seconds_basis=time_basis,
            eur_basis=time_basis,
        )
    )


def max_amounts(rates: Rates, walltime_minutes: int) -> Amounts:
    """The most a record can cost: its rates over its whole walltime (the amount to hold)."""
    if walltime_minutes < 0:
        raise LedgerError(f"walltime_minutes: must be ≥ 0, got {walltime_minutes!r}")
    most = amounts_for(rates, walltime_minutes * 60.0)
    return replace(most, gpu_seconds_basis="estimated", eur_basis="estimated")


@dataclass(frozen=True)
class Record:
    """One ledger row. Open while ``ended_at`` is None; immutable once closed."""

    id: str
    user: str
    role: str = "student"
    owner_type: str = "user"
    owner: str = ""
    kind: str = "notebook"
    size: str = ""
    accelerator: str = ""
    slice: str = ""
    gpus: int = 0
    count: int = 1
    image: str = ""
    walltime_minutes: int = 0
    partition: str = ""
    site: str = ""
    nodes: str = ""
    country: str = ""
    operator: str = ""
    job_ids: tuple[str, ...] = ()
    source: str = ""
    opened_at: float = 0.0
    started_at: float | None = None
    ended_at: float | None = None
    end_reason: str | None = None
    rates: Rates = field(default_factory=lambda: Rates(0.0, 0.0, 0.0, 0.0))
    amounts: Amounts | None = None
    row_type: str = "usage"
    corrects: str = ""
    note: str = ""
    seq: int | None = None
    prev_hash: str | None = None
    hash: str | None = None

    def __post_init__(self) -> None:
        if not self.id:
            raise LedgerError("id: must not be empty")
        if not self.user:
            raise LedgerError("user: must not be empty")
        if self.kind not in KINDS:
            raise LedgerError(f"kind: must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.owner_type not in OWNER_TYPES:
            raise LedgerError(
                f"owner_type: must be one of {', '.join(OWNER_TYPES)}, got {self.owner_type!r}"
            )
        if self.row_type not in ROW_TYPES:
            raise LedgerError(f"row_type: must be one of {', '.join(ROW_TYPES)}")
        if self.end_reason is not None and self.end_reason not in END_REASONS:
            raise LedgerError(
                f"end_reason: must be one of {', '.join(END_REASONS)}, got {self.end_reason!r}"
            )
        for name in ("opened_at", "started_at", "ended_at"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int | float) or not math.isfinite(v)):
                raise LedgerError(f"{name}: must be a finite time, got {v!r}")
            if v is not None:
                object.__setattr__(self, name, float(v))
        if self.gpus < 0 or self.count < 1 or self.walltime_minutes < 0:
            raise LedgerError("gpus, count and walltime_minutes must be ≥ 0 (count ≥ 1)")
        if any(not j.isdigit() for j in self.job_ids):
            raise LedgerError(f"job_ids: Slurm job ids are digits, got {list(self.job_ids)!r}")

    @property
    def closed(self) -> bool:
        return self.ended_at is not None

    @property
    def charged_to(self) -> tuple[str, str]:
        return (self.owner_type, self.owner)


def new_id() -> str:
    return uuid.uuid4().hex


def open_record(
    resolved: Resolved,
    *,
    user: str,
    role: str = "student",
    now: float,
    site: str = "",
    source: str = "",
    owner_type: str = "user",
    owner: str | None = None,
    image: str = "",
    record_id: str | None = None,
) -> Record:
    """A new open record for an admitted request, with its rates fixed now."""
    size, part = resolved.size, resolved.partition
    return Record(
        id=record_id or new_id(),
        user=user,
        role=role,
        owner_type=owner_type,
        owner=owner if owner is not None else user,
        kind=resolved.request.kind,
        size=size.id,
        accelerator=size.accelerator,
        slice=size.slice or "",
        gpus=size.total_gpus * resolved.request.count,
        count=resolved.request.count,
        image=image or (resolved.request.image or ""),
        walltime_minutes=resolved.walltime_minutes,
        partition=part.name,
        site=site,
        country=part.jurisdiction.country,
        operator=part.jurisdiction.operator,
        source=source,
        opened_at=round(now, 3),
        rates=Rates.from_resolved(resolved),
    )


def attach(
    rec: Record,
    *,
    job_ids: Iterable[str] = (),
    nodes: str | None = None,
    started_at: float | None = None,
) -> Record:
    """An open record with its jobs, nodes or start time added (job ids are kept, in order)."""
    if rec.closed:
        raise LedgerError(f"record {rec.id}: closed records never change")
    ids = tuple(dict.fromkeys([*rec.job_ids, *(str(j) for j in job_ids)]))
    return replace(
        rec,
        job_ids=ids,
        nodes=rec.nodes if nodes is None else nodes,
        started_at=rec.started_at if started_at is None else round(started_at, 3),
    )


def close(
    rec: Record,
    *,
    ended_at: float,
    reason: str,
    time_basis: str = "measured",
    energy: tuple[float, float, str, str] | None = None,
) -> Record:
    """The closed record: end time, reason, and its amounts (not yet chained).

    Time runs from ``started_at`` (or ``opened_at`` when the devices were never reported
    held) to ``ended_at``; an end before the start counts zero. ``energy`` is
    ``(Wh, gCO₂, energy_basis, co2_basis)`` from the samplers' counters
    (:func:`.activity_store.measured_energy`); without it energy and CO₂ come from the
    TDP × PUE model (estimated).
    """
    if rec.closed:
        raise LedgerError(f"record {rec.id}: already closed")
    if reason not in END_REASONS:
        raise LedgerError(f"reason: must be one of {', '.join(END_REASONS)}, got {reason!r}")
    if not math.isfinite(ended_at):
        raise LedgerError(f"ended_at: must be a finite time, got {ended_at!r}")
    start = rec.started_at if rec.started_at is not None else rec.opened_at
    end = round(ended_at, 3)
    seconds = max(0.0, end - start)
    amounts = amounts_for(rec.rates, seconds, time_basis)
    if energy is not None and seconds > 0:
        wh, co2, e_basis, c_basis = energy
        amounts = _round(
            replace(amounts, energy_wh=wh, co2_g=co2, energy_basis=e_basis, co2_basis=c_basis)
        )
    return replace(rec, ended_at=end, end_reason=reason, amounts=amounts)


def adjustment(
    of: Record,
    delta: Amounts,
    *,
    note: str,
    now: float,
    record_id: str | None = None,
) -> Record:
    """A correction of a closed record: a new closed row with signed amounts.

    It charges the same owner, and counts once in totals, like any row.
    """
    if not of.closed:
        raise LedgerError(f"corrects: record {of.id} is still open; close it first")
    if not note.strip():
        raise LedgerError("note: say why the correction is made")
    t = round(now, 3)
    return replace(
        of,
        id=record_id or new_id(),
        row_type="adjustment",
        corrects=of.id,
        note=note.strip()[:500],
        opened_at=t,
        started_at=t,
        ended_at=t,
        amounts=delta,
        seq=None,
        prev_hash=None,
        hash=None,
    )


# -- the hash chain --------------------------------------------------------------------------

#: Fields a closed row's hash covers (with ``prev_hash``), in canonical JSON.
HASHED_FIELDS = tuple(
    f.name for f in fields(Record) if f.name not in ("hash", "prev_hash", "rates", "amounts")
)


def record_json(rec: Record) -> dict[str, Any]:
    """Every field of a record, flat (``rate_*`` and the amounts inline), JSON-ready."""
    out: dict[str, Any] = {name: getattr(rec, name) for name in HASHED_FIELDS}
    out["job_ids"] = list(rec.job_ids)
    out.update({f"rate_{k}": v for k, v in asdict(rec.rates).items()})
    out.update(asdict(rec.amounts) if rec.amounts is not None else {})
    out["prev_hash"] = rec.prev_hash
    out["hash"] = rec.hash
    return out


def canonical_json(rec: Record, prev_hash: str) -> str:
    """The exact text a closed row's hash is taken over: sorted keys, no spaces, UTF-8."""
    data = record_json(rec)
    data.pop("hash")
    data["prev_hash"] = prev_hash
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def record_hash(rec: Record, prev_hash: str) -> str:
    return hashlib.sha256(canonical_json(rec, prev_hash).encode()).hexdigest()


def chain(rec: Record, seq: int, prev_hash: str) -> Record:
    """A closed record placed in the chain: number ``seq``, after ``prev_hash``."""
    if not rec.closed or rec.amounts is None:
        raise LedgerError(f"record {rec.id}: only closed records are chained")
    if rec.hash is not None:
        raise LedgerError(f"record {rec.id}: already chained as #{rec.seq}")
    placed = replace(rec, seq=seq)
    return replace(placed, prev_hash=prev_hash, hash=record_hash(placed, prev_hash))


@dataclass(frozen=True)
class Break:
    """The first broken link of a chain: which row, and why."""

    seq: int | None
    id: str
    why: str

    def __str__(self) -> str:
        return f"closed record #{self.seq} ({self.id}): {self.why}"


def verify(
    rows: Iterable[Record], redactions: Mapping[str, tuple[str, str]] | None = None
) -> Break | None:
    """Check closed rows in ``seq`` order; None when every link holds, else the first break.

    ``redactions`` maps a record id to (its original hash, the hash of its redacted fields):
    a row whose personal fields were pseudonymised (GDPR erase, retention; :mod:`.gdpr`)
    keeps its original ``hash``, so the next row's link still holds, and its fields must
    hash to the redacted hash the (separately chained) redaction log recorded.
    """
    prev, expect = GENESIS, 1
    redactions = redactions or {}
    for rec in rows:
        if rec.seq != expect:
            why = f"expected #{expect} here, found #{rec.seq}: a row is missing or inserted"
            return Break(rec.seq, rec.id, why)
        if rec.prev_hash != prev:
            return Break(rec.seq, rec.id, "its prev_hash is not the previous row's hash")
        if not rec.closed or rec.amounts is None:
            return Break(rec.seq, rec.id, "it is chained but not closed")
        want = record_hash(rec, prev)
        if rec.hash is None or (rec.hash != want and redactions.get(rec.id) != (rec.hash, want)):
            return Break(rec.seq, rec.id, "its fields do not match its hash: the row was changed")
        prev, expect = rec.hash, expect + 1
    return None


#: The record fields that can name a person: the hub user, a personal budget owner, the
#: source (``server:<user>/<name>``) and an operator's note. Pseudonymisation rewrites only
#: these; amounts, rates, partition, site and course stay, so every total but the per-person
#: one is unchanged.
PERSONAL_FIELDS = ("user", "owner", "source", "note")


def pseudonymised(rec: Record, names: Mapping[str, str]) -> Record:
    """``rec`` with the person's names (the keys of ``names``) replaced by their pseudonyms
    (the values) in its personal fields (:data:`PERSONAL_FIELDS`).

    ``user`` and a personal ``owner`` are replaced when they equal a name, the user part of
    a ``server:<user>/<name>`` source likewise, and any occurrence in the free-text ``note``
    (longest names first). A course or project owner and a ``grant:<id>`` source never
    change, so totals per course and project stay exactly as they were.
    """
    order = sorted((k for k in names if k), key=len, reverse=True)
    note = rec.note
    for k in order:
        note = note.replace(k, names[k])
    source = rec.source
    if source.startswith("server:") and "/" in source:
        who, _, server = source[len("server:") :].partition("/")
        source = f"server:{names.get(who, who)}/{server}"
    owner = names.get(rec.owner, rec.owner) if rec.owner_type == "user" else rec.owner
    return replace(rec, user=names.get(rec.user, rec.user), owner=owner, source=source, note=note)


# -- totals ----------------------------------------------------------------------------------

GROUP_KEYS = ("user", "owner", "course", "project", "partition", "country", "kind", "site")


def totals(rows: Iterable[Record], by: Iterable[str] = ()) -> dict[tuple[str, ...], Amounts]:
    """Sums of closed rows (adjustments included), grouped by record fields."""
    keys = list(by)
    for k in keys:
        if k not in GROUP_KEYS:
            raise LedgerError(f"group by: unknown field {k!r}; allowed: {', '.join(GROUP_KEYS)}")
    out: dict[tuple[str, ...], list[float]] = {}
    est: dict[tuple[str, ...], set[str]] = {}
    for rec in rows:
        if rec.amounts is None:
            continue
        key = tuple(_group_value(rec, k) for k in keys)
        acc = out.setdefault(key, [0.0, 0.0, 0.0, 0.0])
        a = rec.amounts
        for i, v in enumerate((a.gpu_seconds, a.eur, a.energy_wh, a.co2_g)):
            acc[i] += v
        flags = est.setdefault(key, set())
        for name in ("gpu_seconds_basis", "eur_basis"):
            if getattr(a, name) == "estimated":
                flags.add(name)
    return {
        key: _round(
            Amounts(
                gpu_seconds=acc[0],
                eur=acc[1],
                energy_wh=acc[2],
                co2_g=acc[3],
                gpu_seconds_basis="estimated" if "gpu_seconds_basis" in est[key] else "measured",
                eur_basis="estimated" if "eur_basis" in est[key] else "measured",
            )
        )
        for key, acc in out.items()
    }


def _group_value(rec: Record, key: str) -> str:
    if key in ("course", "project"):
        return rec.owner if rec.owner_type == key else ""
    return str(getattr(rec, key))


def from_mapping(data: Mapping[str, Any]) -> Record:
    """A record from its flat form (:func:`record_json`, or a database row)."""
    names = {f.name for f in fields(Record)} - {"rates", "amounts"}
    kw = {k: data[k] for k in names if k in data}
    ids = data.get("job_ids") or ()
    kw["job_ids"] = tuple(j for j in (ids.split(",") if isinstance(ids, str) else ids) if j)
    kw["rates"] = Rates(**{k: float(data[f"rate_{k}"]) for k in asdict(Rates(0, 0, 0, 0))})
    if data.get("gpu_seconds") is not None:
        kw["amounts"] = Amounts(**{k: data[k] for k in asdict(Amounts())})
    return Record(**kw)
