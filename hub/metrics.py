"""Prometheus metrics of the portal, served by JupyterHub's own ``/hub/metrics``.

JupyterHub already serves ``/hub/metrics`` behind the ``read:metrics`` scope
(``JupyterHub.authenticate_prometheus``, on by default) from prometheus_client's default
registry. :func:`install` (called by :func:`.portal.configure`) registers one
:class:`PortalCollector` in that registry when it runs inside a starting hub, so the
portal's figures come with the hub's own, behind the same scope, with no second endpoint.

What it exports, each labelled by ``partition`` and ``country``:

- ``sovereign_portal_gpu_hours``, ``sovereign_portal_cost_eur``,
  ``sovereign_portal_energy_wh`` and ``sovereign_portal_co2_grams``: sums of the closed
  ledger rows, adjustments included (:meth:`.ledger_store.LedgerStore.usage`, the one
  rule for totals). Gauges, since a correction row may lower them;
- ``sovereign_portal_open_records``: records open now (servers and sessions running);
- ``sovereign_portal_reclaimed_gpu_hours`` and ``sovereign_portal_reclaimed_stops``: what
  the GPU-aware culler gave back, from the records that closed ``reclaimed``
  (:func:`.activity_store.reclaimed`: so it survives restarts);
- ``sovereign_portal_admission_refusals_total`` (also by ``reason``): compute-session
  requests that admission refused with 403, and notebook spawns refused with 403 (policy,
  course, budget: ``Spawner.refusal_hook`` = :func:`spawn_refusal`).

Session refusals happen in the portal service, another process. The service writes one row per
refusal to the portal database (:func:`record_refusal`, table ``admission_refusals``,
Alembic 0006), and the collector in the hub reads the counts from there, so the figure
survives restarts of either process. A row holds when, what kind, where (the partition
the request named, ``""`` when it named none, and that partition's country) and the
reason label; it holds nothing about who asked.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Mapping
from typing import Any

from sqlalchemy import Column, Double, Engine, Integer, MetaData, String, Table, func, select

log = logging.getLogger("JupyterHub")

metadata = MetaData()
refusals = Table(
    "admission_refusals",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", Double, nullable=False),
    Column("kind", String(16), nullable=False),
    Column("partition", String(64), nullable=False),
    Column("country", String(2), nullable=False),
    Column("reason", String(32), nullable=False),
)

PREFIX = "sovereign_portal"


def refusal_place(raw: Any, partitions: Mapping[str, str]) -> tuple[str, str, str]:
    """(kind, partition, country) of a refused raw request, for the refusal row.

    Only values the site knows are kept (a partition of ``partitions``, name → country;
    a kind of the ledger's), so a request's free text never reaches the database.
    """
    from .ledger import KINDS

    kind = raw.get("kind") if isinstance(raw, dict) else None
    part = raw.get("partition") if isinstance(raw, dict) else None
    kind = kind if isinstance(kind, str) and kind in KINDS else ""
    if isinstance(part, str) and part in partitions:
        return kind, part, partitions[part][:2]
    return kind, "", ""


def record_refusal(
    engine: Engine,
    *,
    kind: str,
    partition: str,
    country: str,
    reason: str,
    now: float | None = None,
) -> None:
    """Append one refusal row (its reason label cut to 32 characters)."""
    with engine.begin() as conn:
        conn.execute(
            refusals.insert().values(
                at=time.time() if now is None else now,
                kind=kind[:16],
                partition=partition[:64],
                country=country[:2],
                reason=(reason or "forbidden")[:32],
            )
        )


def spawn_refusal(spawner: Any, error: Any) -> None:
    """``Spawner.refusal_hook`` (set by ``configure()``): one refusal row for a notebook
    spawn refused with 403, placed where the spawner resolved it (else where the form
    asked), in the hub's own portal database."""
    from jupyterhub.app import JupyterHub

    from .ledger_hub import HUB_LEDGER

    resolved = getattr(spawner, "resolved", None)
    countries = {p.name: p.jurisdiction.country for p in spawner.site.partitions}
    if resolved is not None:
        raw: Any = {"kind": "notebook", "partition": resolved.partition.name}
    else:
        options = getattr(spawner, "user_options", None) or {}
        raw = {"kind": "notebook", "partition": options.get("partition")}
    kind, partition, country = refusal_place(raw, countries)
    engine = HUB_LEDGER.ledger(JupyterHub.instance()).engine
    record_refusal(
        engine,
        kind=kind,
        partition=partition,
        country=country,
        reason=str(getattr(error, "reason", "") or "forbidden"),
    )


def refusal_counts(engine: Engine) -> dict[tuple[str, str, str], int]:
    """(partition, country, reason) → number of refusals, all time."""
    c = refusals.c
    q = select(c.partition, c.country, c.reason, func.count()).group_by(
        c.partition, c.country, c.reason
    )
    with engine.connect() as conn:
        return {(p, k, r): int(n) for p, k, r, n in conn.execute(q)}


def snapshot(ledger: Any) -> dict[str, dict[tuple[str, ...], float]]:
    """Every figure the collector exports, from one ledger store: name → labels → value."""
    from .ledger_store import UsageFilter

    out: dict[str, dict[tuple[str, ...], float]] = {
        "gpu_hours": {},
        "cost_eur": {},
        "energy_wh": {},
        "co2_grams": {},
        "open_records": {},
        "admission_refusals": {},
        "reclaimed_gpu_hours": {},
        "reclaimed_stops": {},
    }
    for row in ledger.usage(UsageFilter(), by=("partition", "country")):
        key = (row["partition"], row["country"])
        out["gpu_hours"][key] = row["gpu_hours"]
        out["cost_eur"][key] = row["eur"]
        out["energy_wh"][key] = row["energy_wh"]
        out["co2_grams"][key] = row["co2_g"]
    for rec in ledger.list_open():
        key = (rec.partition, rec.country)
        out["open_records"][key] = out["open_records"].get(key, 0) + 1
    for key3, n in refusal_counts(ledger.engine).items():
        out["admission_refusals"][key3] = float(n)
    from .activity_store import reclaimed

    for key, got in reclaimed(ledger.engine).items():
        out["reclaimed_gpu_hours"][key] = got["gpu_hours"]
        out["reclaimed_stops"][key] = got["stops"]
    return out


HELP = {
    "gpu_hours": "GPU-hours of closed ledger records (adjustments included)",
    "cost_eur": "Euros charged by closed ledger records (adjustments included)",
    "energy_wh": "Facility energy of closed ledger records, in watt-hours",
    "co2_grams": "CO2 of closed ledger records, in grams",
    "open_records": "Ledger records open now (servers and compute sessions running)",
    "admission_refusals": "Compute-session requests and notebook spawns refused (HTTP 403)",
    "reclaimed_gpu_hours": "GPU-hours the GPU-aware culler gave back (the rest of the "
    "granted walltime of the servers and sessions it stopped)",
    "reclaimed_stops": "Servers and compute sessions the GPU-aware culler stopped (idle GPUs)",
}


class PortalCollector:
    """A prometheus_client collector reading the portal database at each scrape.

    ``ledger`` is a :class:`~.ledger_store.LedgerStore`, or a callable that returns one
    (opened on the first scrape, when the hub's config is loaded). A failing database
    read is logged and the scrape goes on with the hub's own metrics and
    ``sovereign_portal_up 0``.
    """

    def __init__(self, ledger: Any) -> None:
        self._ledger = ledger

    def describe(self) -> Iterator[Any]:
        return iter(self._families({}))

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        up = GaugeMetricFamily(
            f"{PREFIX}_up", "Whether the portal database answered this scrape (1) or not (0)"
        )
        try:
            if callable(self._ledger):
                self._ledger = self._ledger()
            data = snapshot(self._ledger)
        except Exception:
            log.exception("Metrics: reading the portal database failed")
            up.add_metric([], 0)
            return iter([up])
        up.add_metric([], 1)
        return iter([up, *self._families(data)])

    @staticmethod
    def _families(data: Mapping[str, Mapping[tuple[str, ...], float]]) -> list[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        fams: list[Any] = []
        for name in (
            "gpu_hours",
            "cost_eur",
            "energy_wh",
            "co2_grams",
            "open_records",
            "reclaimed_gpu_hours",
            "reclaimed_stops",
        ):
            g = GaugeMetricFamily(f"{PREFIX}_{name}", HELP[name], labels=["partition", "country"])
            for key, v in sorted(data.get(name, {}).items()):
                g.add_metric(list(key), v if math.isfinite(v) else 0.0)
            fams.append(g)
        r = CounterMetricFamily(
            f"{PREFIX}_admission_refusals",
            HELP["admission_refusals"],
            labels=["partition", "country", "reason"],
        )
        for key, v in sorted(data.get("admission_refusals", {}).items()):
            r.add_metric(list(key), v)
        fams.append(r)
        return fams


_INSTALLED: list[PortalCollector] = []


def install(c: Any) -> PortalCollector | None:
    """Register the collector in prometheus_client's default registry, once per process,
    and only inside a starting hub (a config loaded elsewhere, e.g. by a test or the CLI,
    registers nothing)."""
    from jupyterhub.app import JupyterHub

    if _INSTALLED or not JupyterHub.initialized():
        return _INSTALLED[0] if _INSTALLED else None
    app = JupyterHub.instance()

    def open_ledger() -> Any:
        from .ledger_hub import HUB_LEDGER

        return HUB_LEDGER.ledger(app)

    from prometheus_client import REGISTRY

    collector = PortalCollector(open_ledger)
    REGISTRY.register(collector)
    _INSTALLED.append(collector)
    return collector
