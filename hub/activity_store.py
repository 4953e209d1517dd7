"""Measured energy and the culler's mark on open ledger records (no table of its own).

An open record's amount columns are empty until it closes (:mod:`.ledger_store`). While it
is open, the portal service keeps its running *measured* energy there (``energy_wh``,
``co2_g`` and their bases), and the culler's stop marks its coming end reason
(``end_reason = 'reclaimed'`` with ``ended_at`` still empty). :meth:`LedgerStore.close`
reads both in the closing transaction (:func:`pending`): the figures are fixed at close,
the hash covers them, and a closed record never changes. Only rows with ``ended_at IS
NULL`` are ever updated here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import case, func, select, update
from sqlalchemy.engine import Connection, Engine

from .ledger_store import records


@dataclass(frozen=True)
class Pending:
    """What an open record carries for its close."""

    energy_wh: float | None
    co2_g: float | None
    energy_basis: str | None
    co2_basis: str | None
    reclaimed: bool


def meter_open(
    engine: Engine,
    record_id: str,
    energy_wh: float,
    co2_g: float,
    energy_basis: str,
    co2_basis: str,
) -> bool:
    """Set the running measured energy of an open record; False when it is closed."""
    with engine.begin() as conn:
        n = conn.execute(
            update(records)
            .where(records.c.id == record_id, records.c.ended_at.is_(None))
            .values(
                energy_wh=round(energy_wh, 3),
                co2_g=round(co2_g, 3),
                energy_basis=energy_basis,
                co2_basis=co2_basis,
            )
        ).rowcount
    return bool(n)


def mark_reclaim(engine: Engine, record_id: str, source: str, now: float, saved: float) -> bool:
    """Mark an open record as reclaimed by the culler: a stop of its server that follows
    closes it as ``reclaimed`` rather than ``stopped``."""
    with engine.begin() as conn:
        n = conn.execute(
            update(records)
            .where(records.c.id == record_id, records.c.ended_at.is_(None))
            .values(end_reason="reclaimed")
        ).rowcount
    return bool(n)


def pending(conn: Connection, record_id: str) -> Pending:
    row = conn.execute(
        select(
            records.c.energy_wh,
            records.c.co2_g,
            records.c.energy_basis,
            records.c.co2_basis,
            records.c.end_reason,
        ).where(records.c.id == record_id, records.c.ended_at.is_(None))
    ).first()
    if row is None:
        return Pending(None, None, None, None, False)
    return Pending(
        row.energy_wh, row.co2_g, row.energy_basis, row.co2_basis, row.end_reason == "reclaimed"
    )


def measured_energy(
    rec: Any, meter: Any, now: float, *, series: bool, coverage: float = 0.9
) -> tuple[float, float, str, str]:
    """An open record's energy so far: the meter's measured facility Wh, plus the TDP × PUE
    model for the held time before the first report. It is *measured* when the meter's
    figures come from NVML and cover at least ``coverage`` of the held time; CO₂ is
    measured only when its energy is and the grid intensity is a time series."""
    start = rec.started_at if rec.started_at is not None else rec.opened_at
    held = max(0.0, now - start)
    first = meter.first_at if meter.first_at is not None else now
    gap = min(held, max(0.0, first - start))
    est_wh = rec.rates.power_w * gap / 3600
    wh = meter.facility_wh + est_wh
    co2 = meter.co2_g + est_wh / 1000 * rec.rates.carbon_g_per_kwh
    is_measured = bool(meter.counted and meter.measured) and (held - gap >= coverage * held - 1e-6)
    basis = "measured" if is_measured else "estimated"
    return wh, co2, basis, "measured" if is_measured and series else "estimated"


def reclaimed(engine: Engine) -> dict[tuple[str, str], dict[str, float]]:
    """What the culler's stops saved, per (partition, country), from the closed ledger
    records that ended ``reclaimed``: ``{"gpu_hours": ..., "stops": ...}``. GPU-hours saved
    are the rest of each record's granted walltime at its end × its GPU equivalents (a
    ``1g.10gb`` slice counts 1/7), which the ledger holds: the figures survive restarts
    of the hub and of the portal service, and need no table of their own."""
    c = records.c
    start = func.coalesce(c.started_at, c.opened_at)
    left = start + c.walltime_minutes * 60.0 - c.ended_at
    saved = case((left > 0, left), else_=0.0) * c.rate_gpu_equivalents
    q = (
        select(c.partition, c.country, func.sum(saved), func.count())
        .where(c.end_reason == "reclaimed", c.ended_at.is_not(None), c.row_type == "usage")
        .group_by(c.partition, c.country)
    )
    with engine.connect() as conn:
        return {
            (p, k): {"gpu_hours": float(s or 0.0) / 3600, "stops": float(n)}
            for p, k, s, n in conn.execute(q)
        }
