"""Device telemetry: what a server's or a session's granted GPUs are doing.

One interface, :class:`DeviceSource`, with three sources:

- :class:`NvmlSource` reads exactly the granted devices through NVML (``nvidia-ml-py``):
  utilisation, memory used, power, and the energy counter (millijoules since the driver
  loaded, ``nvmlDeviceGetTotalEnergyConsumption``).
- :class:`ScriptedSource` reads a JSON script that tests (and the replay benchmark) write:
  "busy 80 % for 5 minutes, then idle", time-scaled so that minutes pass in seconds. Its
  energy counter is the integral of its scripted power, so energy arithmetic is tested
  with exact figures.
- :class:`NoSource`: no device to read (a CPU-only server).

:func:`source_for` picks one from the environment the spawner gave the process.

The granted devices
-------------------
``CUDA_VISIBLE_DEVICES`` names them: indices (``0,1``), GPU UUIDs (``GPU-...``) or MIG
instance UUIDs (``MIG-...``). Nothing else on the node is read.

The MIG rule
------------
A MIG instance has its own memory figure (``nvmlDeviceGetMemoryInfo`` on its handle).
NVML has no utilisation, power or energy counter per instance. So:

1. **Utilisation**: the instance's own SM activity from GPM metrics
   (``NVML_GPM_METRIC_SM_UTIL`` through ``nvmlGpmMigSampleGet``, Hopper and later) where
   the parent GPU supports GPM; otherwise the parent GPU's utilisation, marked
   ``shared=True`` (a busy neighbour makes a slice look busy: the culler then keeps it,
   which is the safe side).
2. **Power and energy**: always the parent GPU's, times the instance's share of the
   GPU's compute slices (``g / 7`` for a ``<g>g.<mem>gb`` profile: 1/7 for ``1g.10gb``,
   3/7 for ``3g.40gb``), marked ``shared=True``. A slice is billed the same share
   (:attr:`sovereign_portal.spawners.sizes.Size.gpu_equivalents`), so the energy of a
   GPU is split the way its price is.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from .strict import json_number, only_fields

#: Environment variable naming a scripted device source file (tests, the replay benchmark).
SCRIPT_ENV = "SOVEREIGN_PORTAL_DEVICE_SCRIPT"
#: The same for a compute session's jobs (``{user}``, ``{server}`` and ``{session}``: the
#: session id), read by the notebook server and handed to the jobs' samplers.
SESSION_SCRIPT_ENV = "SOVEREIGN_PORTAL_SESSION_DEVICE_SCRIPT"
#: Compute slices of a whole GPU (MIG on A100/H100/H200/B200).
COMPUTE_SLICES = 7
_PROFILE = re.compile(r"(\d)g\.\d+gb")
#: The most devices one source reports (an 8-GPU node has 8; 7 slices × 8 is 56).
MAX_DEVICES = 64


class TelemetryError(ValueError):
    """A device source that cannot be used; the message names the field."""


@dataclass(frozen=True)
class DeviceSample:
    """One reading of one granted device."""

    index: int  # position in CUDA_VISIBLE_DEVICES (what torch calls cuda:<index>)
    uuid: str | None
    at: float  # epoch seconds
    utilization_pct: float  # SM activity, 0..100
    memory_util_pct: float  # memory controller activity, 0..100
    memory_used_mib: float
    power_w: float | None  # None where the device has no power reading
    energy_mj: float | None  # cumulative counter (mJ), None where there is none
    shared: bool = False  # a MIG instance's figures taken from its parent GPU

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class DeviceSource(Protocol):
    """What a sampler reads. ``name`` is ``nvml``, ``scripted`` or ``none``; ``measured``
    says whether its figures come from hardware counters (NVML) or not."""

    name: str
    measured: bool

    def read(self) -> list[DeviceSample]: ...

    def close(self) -> None: ...


class NoSource:
    """No device to read: a CPU-only server, or no NVML and no script."""

    name = "none"
    measured = False

    def read(self) -> list[DeviceSample]:
        return []

    def close(self) -> None:
        pass


def visible_devices(value: str | None) -> list[str]:
    """The granted device ids from ``CUDA_VISIBLE_DEVICES`` (empty: none granted)."""
    if value is None:
        return []
    ids = [v.strip() for v in value.split(",") if v.strip()]
    if len(ids) > MAX_DEVICES:
        raise TelemetryError(f"CUDA_VISIBLE_DEVICES: more than {MAX_DEVICES} devices")
    for v in ids:
        if not re.fullmatch(r"\d{1,3}|(GPU|MIG)-[0-9A-Za-z/_.-]{1,100}", v):
            raise TelemetryError(f"CUDA_VISIBLE_DEVICES: {v[:40]!r} is not an index or UUID")
    return ids


def _v(x: Any) -> Any:
    """A ctypes value or a plain one (pynvml returns both kinds)."""
    return getattr(x, "value", x)


def _text(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def mig_share(profile_name: str) -> float:
    """The compute share of a MIG instance from its name (``... MIG 3g.40gb`` → 3/7)."""
    m = _PROFILE.search(profile_name)
    return int(m.group(1)) / COMPUTE_SLICES if m else 1 / COMPUTE_SLICES


@dataclass
class _Handle:
    index: int
    uuid: str | None
    handle: Any
    parent: Any = None  # a MIG instance's GPU
    share: float = 1.0
    gi_id: int | None = None
    gpm_prev: Any = None


class NvmlSource:
    """The granted devices through NVML. ``nvml`` is the ``pynvml`` module (or a fake of it
    with the same functions, return types and :class:`NVMLError`)."""

    name = "nvml"
    measured = True

    def __init__(self, visible: Sequence[str] | None = None, nvml: Any = None) -> None:
        if nvml is None:
            import pynvml

            nvml = pynvml
        self.nv = nvml
        self.nv.nvmlInit()
        try:
            ids = list(visible) if visible is not None else self._all_indices()
            self.handles = [self._open(i, d) for i, d in enumerate(ids)]
        except Exception:
            self.nv.nvmlShutdown()
            raise

    def _all_indices(self) -> list[str]:
        return [str(i) for i in range(self.nv.nvmlDeviceGetCount())]

    def _open(self, index: int, dev: str) -> _Handle:
        nv = self.nv
        if dev.isdigit():
            h = nv.nvmlDeviceGetHandleByIndex(int(dev))
        else:
            h = nv.nvmlDeviceGetHandleByUUID(dev)
        uuid = _text(nv.nvmlDeviceGetUUID(h))
        out = _Handle(index, uuid, h)
        try:
            is_mig = bool(_v(nv.nvmlDeviceIsMigDeviceHandle(h)))
        except nv.NVMLError:
            is_mig = False
        if is_mig:
            out.parent = nv.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(h)
            out.share = mig_share(_text(nv.nvmlDeviceGetName(h)))
            out.gi_id = int(_v(nv.nvmlDeviceGetGpuInstanceId(h)))
        return out

    def _gpm_util(self, d: _Handle) -> float | None:
        """The MIG instance's own SM utilisation (GPM), or None where GPM is not offered."""
        nv = self.nv
        try:
            if not _v(nv.nvmlGpmQueryDeviceSupport(d.parent).isSupportedDevice):
                return None
            sample = nv.nvmlGpmSampleAlloc()
            nv.nvmlGpmMigSampleGet(d.parent, d.gi_id, sample)
        except (nv.NVMLError, AttributeError):
            return None
        prev, d.gpm_prev = d.gpm_prev, sample
        if prev is None:
            # the first sample has nothing to compare with: one more, a moment later
            time.sleep(0.1)
            return self._gpm_util(d) if self._free(prev) else None
        try:
            get = nv.c_nvmlGpmMetricsGet_t()
            get.version = nv.NVML_GPM_METRICS_GET_VERSION
            get.numMetrics = 1
            get.sample1, get.sample2 = prev, sample
            get.metrics[0].metricId = nv.NVML_GPM_METRIC_SM_UTIL
            got = nv.nvmlGpmMetricsGet(get)
            value = float(got.metrics[0].value)
        except (nv.NVMLError, AttributeError):
            return None
        finally:
            self._free(prev)
        return min(100.0, max(0.0, value)) if math.isfinite(value) else None

    def _free(self, sample: Any) -> bool:
        if sample is not None:
            with contextlib.suppress(self.nv.NVMLError, AttributeError):
                self.nv.nvmlGpmSampleFree(sample)
        return True

    def read(self) -> list[DeviceSample]:
        nv, now = self.nv, time.time()
        out = []
        for d in self.handles:
            gpu = d.parent if d.parent is not None else d.handle
            mem = nv.nvmlDeviceGetMemoryInfo(d.handle)
            util = nv.nvmlDeviceGetUtilizationRates(gpu)
            sm: float | None = float(util.gpu)
            shared = d.parent is not None
            if d.parent is not None:
                own = self._gpm_util(d)
                if own is not None:
                    sm = own
            power = energy = None
            with contextlib.suppress(nv.NVMLError):
                power = float(nv.nvmlDeviceGetPowerUsage(gpu)) / 1000 * d.share
            with contextlib.suppress(nv.NVMLError):
                energy = float(nv.nvmlDeviceGetTotalEnergyConsumption(gpu)) * d.share
            out.append(
                DeviceSample(
                    index=d.index,
                    uuid=d.uuid,
                    at=now,
                    utilization_pct=float(sm or 0.0),
                    memory_util_pct=float(util.memory),
                    memory_used_mib=float(mem.used) / 2**20,
                    power_w=power,
                    energy_mj=energy,
                    shared=shared,
                )
            )
        return out

    def close(self) -> None:
        for d in self.handles:
            self._free(d.gpm_prev)
            d.gpm_prev = None
        self.nv.nvmlShutdown()


# -- the scripted source ---------------------------------------------------------------------


@dataclass(frozen=True)
class Phase:
    """A stretch of scripted time: ``seconds`` long (None: until the end)."""

    seconds: float | None
    utilization_pct: float = 0.0
    memory_util_pct: float = 0.0
    memory_used_mib: float = 0.0


@dataclass(frozen=True)
class ScriptedDevice:
    index: int
    uuid: str | None
    idle_w: float
    busy_w: float
    phases: tuple[Phase, ...]

    def power_at(self, p: Phase) -> float:
        return self.idle_w + (self.busy_w - self.idle_w) * p.utilization_pct / 100


@dataclass(frozen=True)
class Script:
    """A scripted device source: real time since ``start`` × ``time_scale`` is the
    scripted time (``time_scale: 60`` plays 5 minutes in 5 seconds)."""

    start: float
    time_scale: float
    devices: tuple[ScriptedDevice, ...]

    def phase_at(self, dev: ScriptedDevice, t: float) -> Phase:
        """The phase at scripted time ``t`` (seconds since the start)."""
        at = 0.0
        for p in dev.phases:
            if p.seconds is None or t < at + p.seconds:
                return p
            at += p.seconds
        return Phase(None)  # after the last phase: idle

    def energy_mj(self, dev: ScriptedDevice, t: float) -> float:
        """The energy counter at scripted time ``t``: the integral of the scripted power."""
        joules, at = 0.0, 0.0
        for p in dev.phases:
            end = t if p.seconds is None else min(t, at + p.seconds)
            if end > at:
                joules += dev.power_at(p) * (end - at)
            if p.seconds is None:
                return joules * 1000
            at += p.seconds
            if at >= t:
                return joules * 1000
        if t > at:
            joules += dev.idle_w * (t - at)
        return joules * 1000


def _num(d: dict[str, Any], key: str, default: float, lo: float, hi: float, where: str) -> float:
    """A script's number, by the one strict rule (:func:`.strict.json_number`)."""
    got: float = json_number(
        d, key, f"{where}.", lo=lo, hi=hi, default=float(default), error=TelemetryError
    )
    return got


_DEVICE_KEYS = {"index", "uuid", "idle_w", "busy_w", "phases"}
_PHASE_KEYS = {"seconds", "utilization_pct", "memory_util_pct", "memory_used_mib"}


def _phases(raw: Any, where: str) -> tuple[Phase, ...]:
    if not isinstance(raw, list) or len(raw) > 1000:
        raise TelemetryError(f"{where}: must be a list of at most 1000 phases")
    out = []
    for i, p in enumerate(raw):
        w = f"{where}[{i}]"
        if not isinstance(p, dict):
            raise TelemetryError(f"{w}: must be an object")
        only_fields(p, _PHASE_KEYS, f"{w}.", error=TelemetryError)
        secs = None if p.get("seconds") is None else _num(p, "seconds", 0, 0, 1e9, w)
        out.append(
            Phase(
                secs,
                _num(p, "utilization_pct", 0, 0, 100, w),
                _num(p, "memory_util_pct", 0, 0, 100, w),
                _num(p, "memory_used_mib", 0, 0, 1e7, w),
            )
        )
    return tuple(out)


def parse_script(data: Any) -> Script:
    """A :class:`Script` from its JSON form; a bad field raises :class:`TelemetryError`
    naming it.

    ``{"start": <epoch s>, "time_scale": 60, "devices": [{"index": 0, "uuid": "GPU-a",
    "idle_w": 60, "busy_w": 400, "phases": [{"seconds": 300, "utilization_pct": 80,
    "memory_used_mib": 2048}, {"seconds": null, "utilization_pct": 0}]}]}``. A device
    without ``phases`` takes the top-level ``phases``.
    """
    if not isinstance(data, dict):
        raise TelemetryError("script: must be a JSON object")
    only_fields(data, {"start", "time_scale", "devices", "phases"}, "script.", error=TelemetryError)
    start = _num(data, "start", 0, 0, 1e11, "script")
    scale = _num(data, "time_scale", 1, 1e-3, 1e6, "script")
    default = _phases(data.get("phases", []), "script.phases")
    devs = data.get("devices", [])
    if not isinstance(devs, list) or len(devs) > MAX_DEVICES:
        raise TelemetryError(f"script.devices: must be a list of at most {MAX_DEVICES}")
    out = []
    for i, d in enumerate(devs):
        w = f"script.devices[{i}]"
        if not isinstance(d, dict):
            raise TelemetryError(f"{w}: must be an object")
        only_fields(
            d, {"index", "uuid", "idle_w", "busy_w", "phases"}, f"{w}.", error=TelemetryError
        )
        uuid = d.get("uuid")
        if uuid is not None and (not isinstance(uuid, str) or len(uuid) > 128):
            raise TelemetryError(f"{w}.uuid: must be a string of at most 128 characters")
        idle = _num(d, "idle_w", 50, 0, 5000, w)
        out.append(
            ScriptedDevice(
                index=int(_num(d, "index", i, 0, MAX_DEVICES, w)),
                uuid=uuid,
                idle_w=idle,
                busy_w=_num(d, "busy_w", idle, 0, 5000, w),
                phases=_phases(d["phases"], f"{w}.phases") if "phases" in d else default,
            )
        )
    return Script(start, scale, tuple(out))


class ScriptedSource:
    """Devices that do what a script file says. The file is read again when it changes,
    so a test can turn a device busy while the server runs."""

    name = "scripted"
    measured = False  # scripted counters stand in for NVML; reports say "scripted"

    def __init__(self, path: str | os.PathLike[str], clock: Callable[[], float] = time.time):
        self.path, self.clock = Path(path), clock
        self._mtime: float | None = None
        self._script: Script | None = None

    def script(self) -> Script:
        try:
            mtime = self.path.stat().st_mtime_ns
        except OSError as e:
            if self._script is not None:
                return self._script  # being replaced: keep the last good script
            raise TelemetryError(f"{self.path}: no script file ({e.strerror})") from None
        if self._script is None or mtime != self._mtime:
            try:
                data = json.loads(self.path.read_text())
            except (OSError, ValueError) as e:
                if self._script is not None:
                    return self._script  # a half-written file: keep the last good script
                raise TelemetryError(f"{self.path}: not a readable JSON script ({e})") from None
            self._script, self._mtime = parse_script(data), mtime
        return self._script

    def read(self) -> list[DeviceSample]:
        s, now = self.script(), self.clock()
        t = max(0.0, (now - s.start) * s.time_scale)
        out = []
        for d in s.devices:
            p = s.phase_at(d, t)
            out.append(
                DeviceSample(
                    index=d.index,
                    uuid=d.uuid,
                    at=now,
                    utilization_pct=p.utilization_pct,
                    memory_util_pct=p.memory_util_pct,
                    memory_used_mib=p.memory_used_mib,
                    power_w=d.power_at(p),
                    energy_mj=round(s.energy_mj(d, t), 3),
                )
            )
        return out

    def close(self) -> None:
        pass


def source_for(
    kind: str = "auto",
    *,
    env: dict[str, str] | None = None,
    script: str = "",
    nvml: Any = None,
) -> DeviceSource:
    """The device source for this process.

    ``kind`` is ``auto`` (a script if one is named, else NVML for the granted devices if
    NVML loads, else none), ``nvml``, ``scripted`` or ``none``. ``env`` defaults to
    ``os.environ``; ``script`` defaults to ``$SOVEREIGN_PORTAL_DEVICE_SCRIPT``, in which
    ``{user}`` and ``{server}`` are the hub user and server name (one script per server).
    """
    env = dict(os.environ) if env is None else env
    script = script or env.get(SCRIPT_ENV, "")
    if kind not in ("auto", "nvml", "scripted", "none"):
        raise TelemetryError(f"device_source: must be auto, nvml, scripted or none, got {kind!r}")
    if kind == "none":
        return NoSource()
    if kind == "scripted" or (kind == "auto" and script):
        if not script:
            raise TelemetryError(f"device_source is 'scripted' but {SCRIPT_ENV} is not set")
        # one file per server: {user} and {server} name the hub user and server
        script = script.replace("{user}", env.get("JUPYTERHUB_USER", "")).replace(
            "{server}", env.get("JUPYTERHUB_SERVER_NAME", "")
        )
        src = ScriptedSource(script)
        src.script()  # a bad script fails now, naming the field
        return src
    visible = env.get("CUDA_VISIBLE_DEVICES")
    try:
        ids = visible_devices(visible) if visible is not None else None
    except TelemetryError:
        if kind == "nvml":
            raise
        return NoSource()
    if ids == []:
        return NoSource()  # the spawner granted no GPU
    try:
        return NvmlSource(ids, nvml)
    except Exception as e:
        if kind == "nvml":
            raise TelemetryError(f"device_source is 'nvml' but NVML cannot be used: {e}") from e
        return NoSource()
