"""The sampler inside a notebook server, and the reports of its compute sessions.

It reads its own granted devices (:mod:`sovereign_portal.spawners.telemetry`) every
``interval`` seconds into a bounded ring, and every ``report_interval`` seconds sends the
hub's portal service one small report (``POST {service}api/activity``, with the server's
own token): per device the latest figures, the **highest** utilisation and memory
activity seen since the last report (so a burst between two reports is never missed by
the culler), and the cumulative energy counter; and how many of the server's kernels are
busy, and since when none has been. The answer carries the server's notices (an idle
warning from the culler), which ``GET /sovereign-portal/api/notices`` returns together
with the budget warnings.

A report is at most :data:`MAX_REPORT_DEVICES` devices and a few hundred bytes each; the
ring is at most ``ring`` samples: memory stays bounded however long the server runs.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from ..spawners.telemetry import DeviceSample, DeviceSource, NoSource

#: Devices in one report (an 8-GPU node with every GPU cut in 7 slices is 56).
MAX_REPORT_DEVICES = 64

Kernels = Callable[[], tuple[int, int]]  # (busy, total)
Post = Callable[[dict[str, Any]], Awaitable[Any]]


def iso(t: float | None) -> str | None:
    if t is None:
        return None
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat().replace("+00:00", "Z")


class Sampler:
    """Samples one process's granted devices; reports them to the hub."""

    def __init__(
        self,
        source: DeviceSource | None = None,
        *,
        server: str = "",
        grant: str | None = None,
        ring: int = 120,
        kernels: Kernels | None = None,
        post: Post | None = None,
        clock: Callable[[], float] = time.time,
        log: Any = None,
    ) -> None:
        self.source: DeviceSource = source or NoSource()
        self.server, self.grant = server, grant
        self.ring: deque[list[DeviceSample]] = deque(maxlen=max(2, ring))
        self.kernels = kernels or (lambda: (0, 0))
        self.post, self.clock, self.log = post, clock, log
        self._first_mj: dict[int, float] = {}  # energy counter at the first sample
        self._max: dict[int, tuple[float, float]] = {}  # since the last report
        self._kernel_idle_since: float | None = None
        self.notices: list[dict[str, Any]] = []
        #: the notices of this server's compute sessions (session id -> notices), from
        #: the answers to their reports (:class:`SessionReporter`)
        self.session_notices: dict[str, list[dict[str, Any]]] = {}
        self.last_report_ok: bool | None = None

    def all_notices(self) -> list[dict[str, Any]]:
        """The server's notices, then its sessions'."""
        return [*self.notices, *(n for ns in self.session_notices.values() for n in ns)]

    def kernels_json(self) -> dict[str, Any]:
        busy, total = self.kernels()
        return {
            "busy": int(busy),
            "total": int(total),
            "idle_since": None
            if self._kernel_idle_since is None
            else round(self._kernel_idle_since, 3),
        }

    # -- sampling --------------------------------------------------------------------------
    def sample(self) -> list[DeviceSample]:
        try:
            got = self.source.read()[:MAX_REPORT_DEVICES]
        except Exception as e:  # a driver hiccup is not a dead server
            if self.log:
                self.log.warning("sovereign-portal: reading devices failed: %s", e)
            return []
        self.ring.append(got)
        for d in got:
            if d.energy_mj is not None:
                self._first_mj.setdefault(d.index, d.energy_mj)
            u, m = self._max.get(d.index, (0.0, 0.0))
            self._max[d.index] = (max(u, d.utilization_pct), max(m, d.memory_util_pct))
        busy, _ = self.kernels()
        now = self.clock()
        if busy:
            self._kernel_idle_since = None
        elif self._kernel_idle_since is None:
            self._kernel_idle_since = now
        return got

    @property
    def latest(self) -> list[DeviceSample]:
        return self.ring[-1] if self.ring else []

    def activity_json(self) -> dict[str, Any]:
        """``GET /sovereign-portal/api/activity``: the agreed shape."""
        latest = self.latest
        devices = []
        for d in latest:
            first = self._first_mj.get(d.index)
            wh = None
            if d.energy_mj is not None and first is not None:
                wh = round(max(0.0, d.energy_mj - first) / 3.6e6, 4)
            devices.append(
                {
                    "index": d.index,
                    "uuid": d.uuid,
                    "utilization_pct": round(d.utilization_pct, 2),
                    "memory_used_mib": round(d.memory_used_mib, 1),
                    "power_w": None if d.power_w is None else round(d.power_w, 2),
                    "energy_wh": wh,
                }
            )
        return {
            "devices": devices,
            "source": self.source.name,
            "measured": bool(self.source.measured),
            "sampled_at": iso(latest[0].at) if latest else None,
        }

    # -- reporting -------------------------------------------------------------------------
    def report_body(self) -> dict[str, Any]:
        """One report: bounded, plain JSON numbers."""
        devices = []
        for d in self.latest:
            u, m = self._max.get(d.index, (d.utilization_pct, d.memory_util_pct))
            devices.append(
                {
                    "index": d.index,
                    "uuid": d.uuid,
                    "utilization_pct": round(d.utilization_pct, 2),
                    "utilization_max_pct": round(u, 2),
                    "memory_util_max_pct": round(m, 2),
                    "memory_used_mib": round(d.memory_used_mib, 1),
                    "power_w": None if d.power_w is None else round(d.power_w, 2),
                    "energy_mj": None if d.energy_mj is None else round(d.energy_mj, 1),
                    "shared": d.shared,
                }
            )
        return {
            "server": self.server,
            "grant": self.grant,
            "source": self.source.name,
            "measured": bool(self.source.measured),
            "sampled_at": round(self.latest[0].at, 3) if self.latest else round(self.clock(), 3),
            "devices": devices,
            "kernels": self.kernels_json(),
        }

    async def report(self) -> bool:
        if self.post is None:
            return False
        body = self.report_body()
        try:
            answer = await self.post(body)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.last_report_ok = False
            if self.log:
                self.log.warning("sovereign-portal: activity report not sent: %s", e)
            return False
        self._max.clear()
        if isinstance(answer, dict) and isinstance(answer.get("notices"), list):
            self.notices = answer["notices"][:20]
        self.last_report_ok = True
        return True


class SessionReporter:
    """Reports this server's compute sessions' activity to the hub, as the server's own.

    Each session's workers or ranks write their readings into the session directory
    (:mod:`.job_sampler`: the jobs hold no token); at each report this reads the readings
    taken since the session's last report (:func:`.job_sampler.read_job_samples`) and
    sends them as ``{"grant": <the session's grant id>, ...}`` with the server's kernels
    (a cell running in any kernel keeps the session: it may be driving the workers).
    A session with no fresh reading sends nothing: the hub's copy goes stale, never idle.
    The answer carries the session's notices, and ``"reclaimed": true`` once the culler
    has reclaimed it: the session is then stopped here too (its processes, its files).
    """

    def __init__(self, manager: Any, sampler: Sampler, post: Post | None, log: Any = None):
        self.manager, self.sampler, self.post, self.log = manager, sampler, post, log
        self._since: dict[str, float] = {}

    async def report(self) -> int:
        """One round; returns the number of sessions reported."""
        from .job_sampler import read_job_samples

        if self.post is None:
            return 0
        sent = 0
        live = {sid for sid, s in self.manager.sessions.items() if s.state in ("starting", "ready")}
        for sid in set(self.sampler.session_notices) - live:
            del self.sampler.session_notices[sid]
        for sid in sorted(live):
            s = self.manager.sessions[sid]
            got = read_job_samples(s.dir, self._since.get(sid, 0.0))
            if got is None:
                continue
            body = {
                "server": self.sampler.server,
                "grant": str(s.grant["id"]),
                **got,
                "kernels": self.sampler.kernels_json(),
            }
            try:
                answer = await self.post(body)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if self.log:
                    self.log.warning("sovereign-portal: session %s activity not sent: %s", sid, e)
                continue
            sent += 1
            self._since[sid] = float(got["sampled_at"])
            if not isinstance(answer, dict):
                continue
            if isinstance(answer.get("notices"), list):
                self.sampler.session_notices[sid] = answer["notices"][:20]
            if answer.get("reclaimed") is True:
                self.sampler.session_notices.pop(sid, None)
                await self.manager.stop(
                    sid, "stopped", "reclaimed: its GPUs were idle (the hub's culler)"
                )
        return sent


def kernel_counter(serverapp: Any) -> Kernels:
    """(busy kernels, all kernels) of a Jupyter server, from each kernel's
    ``execution_state`` (a cell running is ``busy``)."""

    def count() -> tuple[int, int]:
        km = getattr(serverapp, "kernel_manager", None)
        if km is None:
            return (0, 0)
        busy = total = 0
        for kid in list(km.list_kernel_ids()):
            try:
                state = km.get_kernel(kid).execution_state
            except KeyError:
                continue
            total += 1
            busy += state in ("busy", "starting")
        return (busy, total)

    return count


def budget_notices(budgets: Any) -> list[dict[str, Any]]:
    """Notices for the budgets the hub says have reached a warning level
    (``GET {service}api/budgets``): 80 % info, 95 % warning, 100 % error."""
    out: list[dict[str, Any]] = []
    if not isinstance(budgets, dict) or not isinstance(budgets.get("budgets"), list):
        return out
    for b in budgets["budgets"][:20]:
        if not isinstance(b, dict) or not isinstance(b.get("warning"), int):
            continue
        level = b["warning"]
        out.append(
            {
                "id": f"budget:{b.get('budget', '')}:{level}",
                "kind": "budget",
                "level": "error" if level >= 100 else "warning" if level >= 95 else "info",
                "message": str(b.get("banner") or b.get("text") or f"{level} % of a budget used"),
                "deadline": None,
            }
        )
    return out


def service_post(hub: Any) -> Post:
    """``POST {service}api/activity`` through the extension's portal-service client."""

    async def post(body: dict[str, Any]) -> Any:
        code, data = await hub._call("POST", "api/activity", body)
        if code != 200:
            err = data.get("error") if isinstance(data, dict) else None
            raise RuntimeError(f"HTTP {code}: {err or 'no answer'}")
        return data

    return post
