"""``GET /sovereign-portal/api/status``: what this server holds and what it has cost so far.

The answer is derived from what the server knows of its own grant: the environment its
spawner sets (``SOVEREIGN_PORTAL_PARTITION``, ``_SIZE``, ``_COUNTRY``,
``_WALLTIME_MINUTES``; see :meth:`PortalSpawnerMixin.portal_env`), the time it started
(Slurm's ``SLURM_JOB_START_TIME``/``SLURM_JOB_END_TIME`` where Slurm sets them) and the
€ rate of its size in the hub's catalog. Cost and GPU-hours are **estimated** as
rate × elapsed (the ledger settles the real figures when the server stops), and the answer
says so: ``"estimated": true``.

:func:`grant_status` is pure (environment, times and catalog in, JSON out) and tested as a
table; :class:`StatusHandler` is the thin I/O around it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from jupyter_server.auth.decorator import authorized
from tornado import web

from ..spawners.errors import PortalError
from ..spawners.request import request_from_size_id
from ..spawners.sizes import Size
from .handlers import _Base
from .sessions import SessionError

#: Seconds the hub's catalog (the € rate and the budget) is reused between status calls.
CATALOG_TTL_S = 60.0


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


def _epoch(env: Mapping[str, str], name: str) -> float | None:
    v = env.get(name, "")
    return float(v) if v.isdigit() and int(v) > 0 else None


def _size(size_id: str) -> Size | None:
    """The :class:`Size` a size id names (for its GPU fraction), or None if it names none."""
    try:
        f = request_from_size_id(size_id)
        size = Size(
            node_type="",
            accelerator=f["accelerator"],
            slice=f.get("slice"),
            gpus_per_node=0 if f.get("slice") else f["gpus"],
            nodes=f.get("nodes", 1),
        )
        size.label  # noqa: B018  (an unknown accelerator or MIG profile raises KeyError)
        return size
    except (PortalError, ValueError, KeyError):
        return None


def short_label(size: Size, country: str | None) -> str:
    """A status-bar label: ``H100 · MIG 1g.10gb · FR``, ``2× H100 · FR``, ``2 nodes × 8 H200``."""
    acc = size.accelerator.upper()
    if size.slice:
        parts = [acc, f"MIG {size.slice}"]
    elif size.nodes > 1:
        parts = [f"{size.nodes} nodes × {size.gpus_per_node} {acc}"]
    else:
        parts = [acc if size.gpus_per_node == 1 else f"{size.gpus_per_node}× {acc}"]
    if country:
        parts.append(country)
    return " · ".join(parts)


def _catalog_size(catalog: Mapping[str, Any] | None, partition: str, size_id: str) -> Any:
    for p in (catalog or {}).get("partitions") or []:
        if isinstance(p, dict) and p.get("name") == partition:
            for s in p.get("sizes") or []:
                if isinstance(s, dict) and s.get("id") == size_id:
                    return s
    return None


def grant_status(
    env: Mapping[str, str],
    started_at: float,
    now: float,
    catalog: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The status JSON for a server started at ``started_at`` (epoch s), seen at ``now``.

    ``catalog`` is the hub's catalog for this user (None when the hub did not answer): it
    gives the size's € rate and the budget. Without a grant in ``env`` (a server that the
    portal did not spawn) every grant field is null.
    """
    size_id = env.get("SOVEREIGN_PORTAL_SIZE", "")
    partition = env.get("SOVEREIGN_PORTAL_PARTITION") or None
    country = env.get("SOVEREIGN_PORTAL_COUNTRY") or None
    wall = env.get("SOVEREIGN_PORTAL_WALLTIME_MINUTES", "")
    walltime = int(wall) if wall.isdigit() and wall.isascii() else None
    start = _epoch(env, "SLURM_JOB_START_TIME") or started_at
    end = _epoch(env, "SLURM_JOB_END_TIME")
    if end is None and walltime is not None:
        end = start + walltime * 60
    elapsed = max(0.0, now - start)
    size = _size(size_id) if size_id else None
    entry = _catalog_size(catalog, partition or "", size_id) if size else None
    rate = entry.get("eur_per_hour") if isinstance(entry, dict) else None
    rate = float(rate) if isinstance(rate, int | float) and not isinstance(rate, bool) else None
    budget = (catalog or {}).get("budget")
    return {
        "granted": size is not None,
        "device": None
        if size is None
        else {
            "label": short_label(size, country),
            "size": size.id,
            "size_label": size.label,
            "accelerator": size.accelerator,
            "slice": size.slice,
            "gpus": size.total_gpus,
            "gpu_fraction": round(size.gpu_fraction, 4),
        },
        "partition": partition,
        "country": country,
        "walltime_minutes": walltime,
        "started_at": _iso(start),
        "ends_at": _iso(end),
        "seconds_left": None if end is None else round(max(0.0, end - now), 1),
        "elapsed_s": round(elapsed, 1),
        "eur_per_hour": rate,
        "eur_so_far": None if rate is None else round(rate * elapsed / 3600, 4),
        "gpu_hours_so_far": None if size is None else round(size.gpu_fraction * elapsed / 3600, 4),
        "estimated": True,
        "basis": "rate × elapsed time (the ledger settles the real figures at the end)",
        "budget": budget if isinstance(budget, dict) else None,
        "catalog": catalog is not None,
        "sampled_at": _iso(now),
    }


class StatusHandler(_Base):
    """``GET /sovereign-portal/api/status`` (see the module docstring)."""

    @web.authenticated
    @authorized
    async def get(self) -> None:
        started: float = self.settings.get("sovereign_portal_started_at", time.time())
        now = time.time()
        self.finish(json.dumps(grant_status(os.environ, started, now, await self._catalog(now))))

    async def _catalog(self, now: float) -> dict[str, Any] | None:
        """The hub's catalog, reused for :data:`CATALOG_TTL_S`; None when the hub fails."""
        cache: dict[str, Any] = self.settings.setdefault("sovereign_portal_status_cache", {})
        if cache and now - cache["at"] < CATALOG_TTL_S:
            cat: dict[str, Any] | None = cache["catalog"]
            return cat
        try:
            cat = await self.manager.hub.catalog()
        except (SessionError, ValueError) as e:
            self.log.info("sovereign-portal status: no catalog from the hub (%s)", e)
            cat = None
        if cat is not None:  # a failure is retried at the next call
            cache.update(at=now, catalog=cat)
        return cat


HANDLERS = [(r"/sovereign-portal/api/status", StatusHandler)]
