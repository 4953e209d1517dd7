"""Ledger rows written through the real ledger store API (hub/ledger_store.py), for tests of
what reads the ledger (usage pages, metrics).

:func:`closed_record` opens and closes one record in a portal database, so it is chained
like any record a spawn closes: ``hours`` of one GPU-equivalent at :data:`RATES`
(€2/GPU-hour, 1000 W facility power, 50 gCO₂/kWh): 1 GPU-hour, €2, 1000 Wh and 50 g per
hour. ``ended_days_ago`` places its end time.
"""

from __future__ import annotations

import time
from typing import Any

from sovereign_portal.hub import ledger as L
from sovereign_portal.hub.ledger_store import LedgerStore
from sovereign_portal.hub.store import PortalStore

RATES = L.Rates(gpu_equivalents=1.0, eur_per_hour=2.0, power_w=1000.0, carbon_g_per_kwh=50.0)


def closed_record(
    db_url: str,
    user: str,
    hours: float,
    *,
    ended_days_ago: float = 1.0,
    partition: str = "lab",
    country: str = "FR",
    site: str = "Example University GPU lab",
    owner_type: str = "user",
    owner: str | None = None,
    **fields: Any,
) -> L.Record:
    """One closed, chained record of ``user`` (its owner the user unless given)."""
    end = time.time() - ended_days_ago * 86400
    start = end - hours * 3600
    rec = L.Record(
        id=L.new_id(),
        user=user,
        owner_type=owner_type,
        owner=owner if owner is not None else user,
        partition=partition,
        country=country,
        site=site,
        size=fields.pop("size", "h100:1g.10gb"),
        accelerator="h100",
        opened_at=start,
        started_at=start,
        rates=RATES,
        source=f"test:{L.new_id()}",
        **fields,
    )
    store = PortalStore(db_url)
    try:
        ledger = LedgerStore(store)
        ledger.open(rec)
        return ledger.close(rec.id, reason="stopped", ended_at=end)
    finally:
        store.dispose()
