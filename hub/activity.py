"""GPU activity as the hub sees it: the samplers' reports, the idle rule, measured energy.

A pure core (no I/O; the portal service keeps one :class:`ActivityBook` in memory and the
culler reads it through REST). Everything is tested as tables.

- :func:`parse_report` turns a sampler's JSON report into a :class:`Report`, refusing a bad
  field by name (unknown fields, NaN, out-of-range numbers, too many devices).
- A **target** is what a report is about, named like its ledger record's source:
  ``server:<user>/<server name>`` for a notebook server, ``grant:<id>`` for a compute
  session (the devices of its Dask workers or torch ranks, reported by the server that
  started it). Its history is bounded (:data:`HISTORY`).
- **The idle rule** (:func:`idle_since`): a target is idle from the moment its GPUs are
  idle, that is every device's highest utilisation since the last report below
  ``util_pct`` *and* its highest memory activity below ``mem_pct``, *and* no kernel is
  busy; it stays idle while every later report says so. One busy report (a training loop
  in a thread, a cell running) starts it over. A target whose last report is older than
  ``stale_s`` is *unknown*, never idle: the culler acts only on evidence.
- **Measured energy** (:class:`Meter`): the sum of the energy counters' increases
  between reports, per device (a counter that goes back, or an NVML counter that jumps
  beyond what a board could draw, is a reset: that step is skipped and counted in
  ``resets``). Board energy ×
  the partition's PUE is the facility energy; gCO₂ is that energy × the grid intensity at
  the time of the report (:class:`Intensity`: the partition's static value, or a time
  series for the site). ``measured`` is true only for NVML counters; a scripted source's
  figures are exact but not measured.
"""

from __future__ import annotations

import bisect
import csv
import datetime as dt
import functools
import math
import re
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sovereign_portal.spawners.request import co2_g
from sovereign_portal.spawners.strict import json_number, only_fields

#: Reports kept per target (at one report per 30 s, about two hours).
HISTORY = 256
#: Devices in one report.
MAX_DEVICES = 64
#: Highest board power a device may draw, for the counter-jump check (W).
MAX_BOARD_W = 5000.0
SOURCES = ("nvml", "scripted", "none")
_SERVER_NAME_LEN = 255
#: A grant id as the portal service writes them (hex), as in its ``api/grants/<id>`` routes.
_GRANT_ID = re.compile(r"[0-9a-f]{1,64}")


class ActivityError(ValueError):
    """A report that cannot be used; the message names the field."""

    status = 400
    reason = "bad_activity"


#: A report's numbers, by the one strict rule (:func:`.strict.json_number` in spawners).
_num = functools.partial(json_number, error=ActivityError)


@dataclass(frozen=True)
class DeviceReport:
    index: int
    uuid: str | None
    utilization_pct: float
    utilization_max_pct: float
    memory_util_max_pct: float
    memory_used_mib: float
    power_w: float | None
    energy_mj: float | None
    shared: bool = False


@dataclass(frozen=True)
class Report:
    user: str
    server: str
    source: str
    measured: bool
    sampled_at: float
    received_at: float
    devices: tuple[DeviceReport, ...]
    kernels_busy: int
    kernels_total: int
    kernel_idle_since: float | None
    grant: str | None = None  # a compute session's grant id (its jobs' devices)

    @property
    def target(self) -> str:
        """The source of the ledger record the report is about."""
        if self.grant is not None:
            return f"grant:{self.grant}"
        return f"server:{self.user}/{self.server}"

    def gpus_idle(self, util_pct: float, mem_pct: float) -> bool:
        return all(
            d.utilization_max_pct < util_pct and d.memory_util_max_pct < mem_pct
            for d in self.devices
        )


_DEVICE_KEYS = {
    "index",
    "uuid",
    "utilization_pct",
    "utilization_max_pct",
    "memory_util_max_pct",
    "memory_used_mib",
    "power_w",
    "energy_mj",
    "shared",
}
_REPORT_KEYS = {"server", "grant", "source", "measured", "sampled_at", "devices", "kernels"}


def parse_report(user: str, data: Any, now: float) -> Report:
    """A sampler's report of ``user``'s server, checked field by field."""
    if not isinstance(data, dict):
        raise ActivityError("send a JSON object")
    only_fields(data, _REPORT_KEYS, error=ActivityError)
    server = data.get("server", "")
    if not isinstance(server, str) or len(server) > _SERVER_NAME_LEN or "/" in server:
        raise ActivityError("server: must be this server's name (JUPYTERHUB_SERVER_NAME)")
    grant = data.get("grant")
    if grant is not None and (not isinstance(grant, str) or not _GRANT_ID.fullmatch(grant)):
        raise ActivityError("grant: must be the id of one of your compute sessions, or null")
    source = data.get("source")
    if source not in SOURCES:
        raise ActivityError(f"source: must be one of {', '.join(SOURCES)}")
    measured = data.get("measured")
    if not isinstance(measured, bool):
        raise ActivityError("measured: must be true or false")
    sampled_at = _num(data, "sampled_at", "", lo=now - 86400, hi=now + 300)
    raw_devs = data.get("devices")
    if not isinstance(raw_devs, list) or len(raw_devs) > MAX_DEVICES:
        raise ActivityError(f"devices: must be a list of at most {MAX_DEVICES}")
    devices = []
    for i, d in enumerate(raw_devs):
        w = f"devices[{i}]."
        if not isinstance(d, dict):
            raise ActivityError(f"devices[{i}]: must be an object")
        only_fields(d, _DEVICE_KEYS, w, error=ActivityError)
        uuid = d.get("uuid")
        if uuid is not None and (not isinstance(uuid, str) or len(uuid) > 128):
            raise ActivityError(f"{w}uuid: must be a string of at most 128 characters")
        shared = d.get("shared", False)
        if not isinstance(shared, bool):
            raise ActivityError(f"{w}shared: must be true or false")
        util = _num(d, "utilization_pct", w, lo=0, hi=100)
        devices.append(
            DeviceReport(
                index=int(_num(d, "index", w, lo=0, hi=MAX_DEVICES)),
                uuid=uuid,
                utilization_pct=util,
                utilization_max_pct=max(util, _num(d, "utilization_max_pct", w, lo=0, hi=100)),
                memory_util_max_pct=_num(d, "memory_util_max_pct", w, lo=0, hi=100),
                memory_used_mib=_num(d, "memory_used_mib", w, lo=0, hi=1e8),
                power_w=_num(d, "power_w", w, lo=0, hi=MAX_BOARD_W, null=True),
                energy_mj=_num(d, "energy_mj", w, lo=0, hi=1e18, null=True),
                shared=shared,
            )
        )
    k = data.get("kernels")
    if not isinstance(k, dict) or set(k) - {"busy", "total", "idle_since"}:
        raise ActivityError('kernels: send {"busy": n, "total": n, "idle_since": t|null}')
    busy = int(_num(k, "busy", "kernels.", lo=0, hi=10_000))
    total = int(_num(k, "total", "kernels.", lo=0, hi=10_000))
    if busy > total:
        raise ActivityError("kernels.busy: more busy kernels than kernels")
    idle_since = _num(k, "idle_since", "kernels.", lo=0, hi=now + 300, null=True)
    return Report(
        user=user,
        server=server,
        source=str(source),
        measured=measured and source == "nvml",
        sampled_at=sampled_at,
        received_at=now,
        devices=tuple(devices),
        kernels_busy=busy,
        kernels_total=total,
        kernel_idle_since=None if busy else idle_since,
        grant=grant,
    )


# -- the idle rule ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Thresholds:
    """When GPUs count as idle, and when a report is too old to go by."""

    util_pct: float = 5.0
    mem_pct: float = 5.0
    stale_s: float = 180.0


def idle_since(history: Iterable[Report], th: Thresholds, now: float) -> float | None:
    """Since when the target has been idle (GPUs idle and no kernel busy), or None: busy
    in its last report, or no recent report (unknown is never idle).

    A report's figures are the highest since the report before it, so an idle report
    vouches for the whole interval since that earlier report: the idle time starts at the
    last busy report (or at the first report, with nothing before it), and never before
    the kernels' own idle start.
    """
    reports = list(history)
    if not reports or now - reports[-1].received_at > th.stale_s:
        return None
    since: float | None = None
    for i in range(len(reports) - 1, -1, -1):
        r = reports[i]
        if r.kernels_busy or not r.gpus_idle(th.util_pct, th.mem_pct):
            if since is not None:
                since = r.sampled_at  # the interval after this busy report was idle
            break
        since = r.sampled_at
    if since is None:
        return None
    # the kernels' own idle time, when it is later (a cell finished after the GPUs idled)
    k = reports[-1].kernel_idle_since
    if k is not None and k > since:
        since = k
    return since


# -- energy and carbon -----------------------------------------------------------------------


@dataclass(frozen=True)
class Intensity:
    """Grid carbon intensity (gCO₂/kWh): a static value, or a step series (epoch s →
    value; each value holds until the next)."""

    static: float
    times: tuple[float, ...] = ()
    values: tuple[float, ...] = ()

    @property
    def series(self) -> bool:
        return bool(self.times)

    def at(self, t: float) -> float:
        if not self.times or t < self.times[0]:
            return self.static
        return self.values[bisect.bisect_right(self.times, t) - 1]


def read_intensity_series(path: str | Path, static: float) -> Intensity:
    """A series from a CSV file of ``<ISO 8601 time>,<gCO₂/kWh>`` lines (a header line is
    allowed), e.g. exported from RTE eCO2mix for France; errors name the line."""
    times: list[float] = []
    values: list[float] = []
    with open(path, newline="") as f:
        for n, row in enumerate(csv.reader(f), start=1):
            if not row or row[0].startswith("#") or (n == 1 and not row[0][:1].isdigit()):
                continue
            if len(row) != 2:
                raise ActivityError(f"{path}:{n}: expected <time>,<gCO2/kWh>")
            try:
                t = dt.datetime.fromisoformat(row[0].strip().replace("Z", "+00:00"))
                v = float(row[1])
            except ValueError:
                raise ActivityError(f"{path}:{n}: expected <time>,<gCO2/kWh>") from None
            if t.tzinfo is None:
                raise ActivityError(f"{path}:{n}: the time needs a UTC offset")
            if not math.isfinite(v) or not 0 <= v <= 2000:
                raise ActivityError(f"{path}:{n}: gCO2/kWh must be between 0 and 2000")
            ts = t.timestamp()
            if times and ts <= times[-1]:
                raise ActivityError(f"{path}:{n}: times must increase")
            times.append(ts)
            values.append(v)
    return Intensity(static, tuple(times), tuple(values))


@dataclass
class Meter:
    """Measured energy of one target, from its reports' energy counters."""

    pue: float = 1.0
    board_wh: float = 0.0
    facility_wh: float = 0.0
    co2_g: float = 0.0
    first_at: float | None = None
    last_at: float | None = None
    resets: int = 0
    measured: bool = True  # every counted step came from NVML
    counted: bool = False  # at least one step was counted
    _last: dict[int, tuple[float, float]] = field(default_factory=dict)  # index -> (t, mJ)

    def add(self, r: Report, intensity: Intensity) -> float:
        """Count a report's counter steps; returns the facility Wh it added."""
        added = 0.0
        for d in r.devices:
            if d.energy_mj is None:
                continue
            prev = self._last.get(d.index)
            self._last[d.index] = (r.sampled_at, d.energy_mj)
            if prev is None:
                self.first_at = r.sampled_at if self.first_at is None else self.first_at
                continue
            dt_s = r.sampled_at - prev[0]
            step = d.energy_mj - prev[1]
            # (a scripted source's time runs faster than the clock: no power cap there)
            jump = r.measured and step > MAX_BOARD_W * dt_s * 1000
            if dt_s <= 0 or step < 0 or jump:
                self.resets += 1
                continue
            board = step / 3.6e6
            fac = board * self.pue
            self.board_wh += board
            self.facility_wh += fac
            self.co2_g += co2_g(fac, intensity.at(r.sampled_at))
            self.measured = self.measured and r.measured
            self.counted = True
            added += fac
        if self.counted:
            self.last_at = r.sampled_at
        return added

    def to_json(self) -> dict[str, Any]:
        return {
            "board_wh": round(self.board_wh, 4),
            "energy_wh": round(self.facility_wh, 4),
            "co2_g": round(self.co2_g, 4),
            "first_at": self.first_at,
            "last_at": self.last_at,
            "resets": self.resets,
            "basis": "measured" if self.counted and self.measured else "estimated",
        }


# -- the book --------------------------------------------------------------------------------


@dataclass
class Target:
    source: str
    user: str
    server: str
    history: deque[Report] = field(default_factory=lambda: deque(maxlen=HISTORY))
    meter: Meter = field(default_factory=Meter)
    notice: dict[str, Any] | None = None
    record_id: str | None = None  # the open ledger record the meter belongs to
    #: the culler reclaimed this compute session: the next report's answer says so, and
    #: the server that started it stops it
    reclaimed: bool = False

    @property
    def kind(self) -> str:
        return "session" if self.source.startswith("grant:") else "server"

    def to_json(self, th: Thresholds, now: float) -> dict[str, Any]:
        last = self.history[-1]
        return {
            "source": self.source,
            "kind": self.kind,
            "user": self.user,
            "server": self.server,
            "last_report_at": last.received_at,
            "idle_since": idle_since(self.history, th, now),
            "gpus": len(last.devices),
            "kernels_busy": last.kernels_busy,
            "kernels_total": last.kernels_total,
            "devices_source": last.source,
            "utilization_max_pct": max((d.utilization_max_pct for d in last.devices), default=0),
            "energy": self.meter.to_json(),
            "notice": self.notice,
        }


class ActivityBook:
    """Every target's recent reports, meter and notice (bounded: ``max_targets``)."""

    def __init__(self, max_targets: int = 10_000) -> None:
        self.targets: dict[str, Target] = {}
        self.max_targets = max_targets

    def add(self, r: Report, *, pue: float = 1.0, intensity: Intensity | None = None) -> Target:
        t = self.targets.get(r.target)
        if t is None:
            if len(self.targets) >= self.max_targets:
                oldest = min(self.targets.values(), key=lambda x: x.history[-1].received_at)
                del self.targets[oldest.source]
            t = self.targets[r.target] = Target(r.target, r.user, r.server)
            t.meter.pue = pue
        t.history.append(r)
        t.meter.add(r, intensity or Intensity(0.0))
        return t

    def forget(self, source: str) -> Target | None:
        return self.targets.pop(source, None)

    def notices_of(self, user: str) -> list[dict[str, Any]]:
        return [t.notice for t in self.targets.values() if t.user == user and t.notice]
