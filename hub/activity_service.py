"""The portal service's activity routes (:mod:`.activity` is the pure core).

=====  ==============================  ===================================================
POST   ``{prefix}api/activity``        a sampler's report, with the server's own token:
                                        of the server, or (``"grant": id``) of one of its
                                        compute sessions; answers ``{"notices": [...],
                                        "reclaimed": bool}`` for that target
GET    ``{prefix}api/notices``         the caller's notices (idle warnings), e.g. for the
                                        spawn page
GET    ``{prefix}api/activity/all``    every target: idle since, GPUs, kernels, energy,
                                        notice (``?util=&mem=&stale=`` thresholds). For
                                        the culler service only
PUT    ``{prefix}api/activity/notice``  ``{"source": "server:<u>/<n>", "notice": {...} |
                                        null}``: set or clear a target's idle warning.
                                        Culler only
POST   ``{prefix}api/activity/reclaim``  ``{"source": ...}``: the culler is about to
                                        stop a server (it then stops it through the hub),
                                        or stops a compute session (here); the GPU-hours
                                        it saves are counted. Culler only
=====  ==============================  ===================================================

The culler is a hub service (:mod:`.culler`); its token is accepted here only if the hub
says it belongs to a service named in ``PortalService.culler_services``.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

from sovereign_portal.spawners.errors import Forbidden, PortalError

from .activity import ActivityBook, ActivityError, Intensity, Thresholds, parse_report
from .service import _Base, _BodyBase

NOTICE_KEYS = {"id", "kind", "level", "message", "deadline"}
#: Seconds a reclaimed compute session's server has to stop it before the service does.
RECLAIM_GRACE_S = 60.0
_FALLBACKS: set[Any] = set()  # the fallback stops under way (kept from the collector)


def _bad(e: ActivityError) -> PortalError:
    return PortalError(str(e), status=400, reason="bad_activity")


def book_of(portal: Any) -> ActivityBook:
    book = getattr(portal, "_activity_book", None)
    if book is None:
        book = portal._activity_book = ActivityBook()
        portal._reclaimed = {}  # source -> saved GPU-seconds
    return book


def intensity_for(portal: Any, partition: Any) -> Intensity:
    static = float(partition.carbon_g_per_kwh) if partition is not None else 0.0
    path = getattr(portal, "carbon_series_file", "")
    if not path:
        return Intensity(static)
    cache = getattr(portal, "_intensity_cache", None)
    if cache is None or cache[0] != (path, static):
        from .activity import read_intensity_series

        portal._intensity_cache = ((path, static), read_intensity_series(path, static))
    got: Intensity = portal._intensity_cache[1]
    return got


def reclaimed_of(portal: Any) -> dict[str, float]:
    """GPU-seconds saved by the culler's stops, per target."""
    book_of(portal)
    got: dict[str, float] = portal._reclaimed
    return got


class ActivityReportHandler(_BodyBase):
    """A sampler's report: into the book, and its measured energy onto the open ledger
    record of that server (the figures are fixed when the record closes)."""

    async def post(self) -> None:
        raw = await self.json_body()
        assert self.caller is not None
        now = time.time()
        try:
            report = parse_report(self.caller.name, raw, now)
        except ActivityError as e:
            raise _bad(e) from None
        p = self.portal
        book = book_of(p)
        rec = _open_record(p, report.target)
        known = book.targets.get(report.target)
        if known is not None and known.reclaimed and known.user == self.caller.name:
            # reclaimed (its record may be closed already): tell the server to stop it
            self.finish({"notices": [], "reclaimed": True})
            return
        if report.grant is not None and (rec is None or rec.user != self.caller.name):
            # a session's report needs its open record: the grant is the caller's own
            raise PortalError(
                "grant: no running compute session of yours has this id",
                status=404,
                reason="not_found",
            )
        target = book.targets.get(report.target)
        if target is not None and rec is not None and target.record_id != rec.id:
            book.forget(report.target)  # a new server in the same place: a new meter
            target = None
        part = None
        if rec is not None:
            try:
                part = p.site.partition(rec.partition)
            except Exception:
                part = None
        intensity = intensity_for(p, part)
        pue = float(part.pue) if part is not None else 1.0
        target = book.add(report, pue=pue, intensity=intensity)
        if rec is not None:
            target.record_id = rec.id
            if target.meter.counted:
                from .activity_store import measured_energy, meter_open

                try:
                    wh, co2, eb, cb = measured_energy(
                        rec, target.meter, now, series=intensity.series
                    )
                    meter_open(p.grant_ledger.store.engine, rec.id, wh, co2, eb, cb)
                except Exception:
                    p.log.exception("Activity: metering record %s failed", rec.id)
        self.finish(
            {"notices": [target.notice] if target.notice else [], "reclaimed": target.reclaimed}
        )


def _open_record(portal: Any, source: str) -> Any:
    try:
        return portal.grant_ledger.store.open_for(source)
    except Exception:
        portal.log.exception("Activity: reading the open record of %s failed", source)
        return None


class NoticesHandler(_Base):
    async def get(self) -> None:
        assert self.caller is not None
        self.finish({"notices": book_of(self.portal).notices_of(self.caller.name)})


class _CullerBase(_Base):
    async def authenticate(self) -> None:
        header = self.request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() not in ("token", "bearer") or not token.strip():
            raise PortalError("send the culler's token", status=401, reason="unauthenticated")
        allowed = set(getattr(self.portal, "culler_services", []) or [])
        check = getattr(self.portal, "_service_for_token", None)
        if check is None and getattr(self.portal, "_authenticate", None) is not None:
            check = _no_service  # a service with hub authentication replaced (tests)
        name = await (check(token.strip()) if check else _hub_service_name(token.strip()))
        if name is None or name not in allowed:
            raise Forbidden("only the culler service may read all activity")


async def _no_service(token: str) -> str | None:
    return None


_HUB_AUTH: list[Any] = []
_SERVICE_NAMES: dict[bytes, tuple[float, str | None]] = {}


async def _hub_service_name(token: str) -> str | None:
    """The hub service that owns ``token`` (None: not a service's), reused for 30 s."""
    import hashlib

    from jupyterhub.services.auth import HubAuth

    key, now = hashlib.sha256(token.encode()).digest(), time.monotonic()
    hit = _SERVICE_NAMES.get(key)
    if hit is not None and hit[0] > now:
        return hit[1]
    if not _HUB_AUTH:
        _HUB_AUTH.append(HubAuth())
    model = await _HUB_AUTH[0].user_for_token(token, sync=False)
    name = str(model.get("name")) if model and model.get("kind") == "service" else None
    if name is not None:
        if len(_SERVICE_NAMES) > 100:
            _SERVICE_NAMES.clear()
        _SERVICE_NAMES[key] = (now + 30.0, name)
    return name


class _CullerBody(_BodyBase, _CullerBase):
    """A culler route with a JSON body (authenticated as the culler after the body)."""


class AllActivityHandler(_CullerBase):
    async def get(self) -> None:
        try:
            th = Thresholds(
                util_pct=_q(self, "util", 5.0, 0, 100),
                mem_pct=_q(self, "mem", 5.0, 0, 100),
                stale_s=_q(self, "stale", 180.0, 1, 86400),
            )
        except ActivityError as e:
            raise _bad(e) from None
        now = time.time()
        book = book_of(self.portal)
        self.finish(
            {
                "now": now,
                "targets": [
                    t.to_json(th, now)
                    for t in book.targets.values()
                    if t.history and not t.reclaimed  # a reclaimed session is done with
                ],
                "reclaimed": dict(reclaimed_of(self.portal)),
            }
        )


def _q(h: Any, name: str, default: float, lo: float, hi: float) -> float:
    raw = h.get_query_argument(name, None)
    if raw is None:
        return default
    try:
        v = float(raw)
    except ValueError:
        raise ActivityError(f"{name}: must be a number") from None
    if not math.isfinite(v) or not lo <= v <= hi:
        raise ActivityError(f"{name}: must be between {lo:g} and {hi:g}")
    return v


def _source(book: ActivityBook, raw: Any) -> str:
    src = raw.get("source") if isinstance(raw, dict) else None
    if not isinstance(src, str) or src not in book.targets:
        raise ActivityError("source: no such target (a server that has reported)")
    return src


class NoticeHandler(_CullerBody):
    async def put(self) -> None:
        raw = await self.json_body()
        book = book_of(self.portal)
        try:
            src = _source(book, raw)
            if set(raw) != {"source", "notice"}:
                raise ActivityError('send {"source": ..., "notice": {...} | null}')
            n = raw["notice"]
            if n is not None:
                if not isinstance(n, dict) or set(n) != NOTICE_KEYS:
                    raise ActivityError(f"notice: send exactly {', '.join(sorted(NOTICE_KEYS))}")
                if n["kind"] not in ("idle", "budget") or n["level"] not in (
                    "info",
                    "warning",
                    "error",
                ):
                    raise ActivityError("notice: kind idle|budget, level info|warning|error")
                if not all(isinstance(n[k], str) and len(n[k]) <= 1000 for k in ("id", "message")):
                    raise ActivityError("notice: id and message are strings of ≤ 1000 characters")
        except ActivityError as e:
            raise _bad(e) from None
        book.targets[src].notice = n
        self.finish({"source": src, "notice": n})


class ReclaimHandler(_CullerBody):
    """The culler stops a target: its notice goes, the GPU-seconds it saves are counted
    (the rest of its granted walltime × its GPUs, from its open ledger record), and the
    record is marked so that it closes as ``reclaimed``."""

    async def post(self) -> None:
        raw = await self.json_body()
        book = book_of(self.portal)
        try:
            src = _source(book, raw)
            if set(raw) != {"source"}:
                raise ActivityError('send {"source": "server:<user>/<server>"}')
        except ActivityError as e:
            raise _bad(e) from None
        now = time.time()
        saved, record_id = 0.0, None
        try:
            rec = self.portal.grant_ledger.store.open_for(src)
        except Exception:
            self.portal.log.exception("Culler: reading the ledger record of %s failed", src)
            rec = None
        if rec is not None:
            from .activity_store import mark_reclaim

            start = rec.started_at if rec.started_at is not None else rec.opened_at
            left = max(0.0, start + rec.walltime_minutes * 60 - now)
            saved, record_id = rec.rates.gpu_equivalents * left, rec.id
            try:
                mark_reclaim(self.portal.grant_ledger.store.engine, rec.id, src, now, saved)
            except Exception:
                self.portal.log.exception("Culler: marking %s reclaimed failed", src)
        done = reclaimed_of(self.portal)
        done[src] = done.get(src, 0.0) + saved
        target = book.targets[src]
        target.notice = None
        if target.kind == "session":
            # The culler cannot stop a compute session through the hub. The server that
            # started it hears "reclaimed" in the answer to its next report and stops
            # it (its jobs, its processes; its record then closes "reclaimed"). If it
            # has not within RECLAIM_GRACE_S, the service stops it itself: its Slurm
            # jobs cancelled as its user, or a local one's devices released.
            target.reclaimed = True
            portal, gid = self.portal, src.split(":", 1)[1]

            async def fallback() -> None:
                try:
                    if await portal.stop_session(gid, "reclaimed", "idle GPUs, not stopped"):
                        portal.log.warning("Culler: compute session %s stopped by the service", gid)
                except Exception:
                    portal.log.exception("Culler: stopping compute session %s failed", src)

            asyncio.get_running_loop().call_later(RECLAIM_GRACE_S, _keep, fallback)
        self.portal.log.info("Culler reclaims %s (%.3f GPU-hours saved)", src, saved / 3600)
        self.finish(
            {
                "source": src,
                "record": record_id,
                "saved_gpu_hours": round(saved / 3600, 6),
                "energy": target.meter.to_json(),
            }
        )


def _keep(coro_fn: Any) -> None:
    """Run a fallback stop, holding its task until it is done."""
    task = asyncio.ensure_future(coro_fn())
    _FALLBACKS.add(task)
    task.add_done_callback(_FALLBACKS.discard)


def routes(prefix: str) -> list[tuple[str, Any]]:
    return [
        (prefix + "api/activity", ActivityReportHandler),
        (prefix + "api/activity/all", AllActivityHandler),
        (prefix + "api/activity/notice", NoticeHandler),
        (prefix + "api/activity/reclaim", ReclaimHandler),
        (prefix + "api/notices", NoticesHandler),
    ]
