"""Device sources: NVML against a faithful fake of pynvml, the scripted source as tables.

The fake keeps pynvml's own return types (its ctypes structures, ``c_uint`` where pynvml
returns one), its constants and its :class:`pynvml.NVMLError` (raised with NVML's error
codes), and only replaces the calls into the driver. The real NVML is read by
``benchmarks/device_check.sh`` on a GPU machine.
"""

from __future__ import annotations

import json
import time
from ctypes import c_uint
from pathlib import Path
from typing import Any

import pynvml
import pytest
from sovereign_portal.spawners import telemetry as T

pytestmark = pytest.mark.unit


class FakeNVML:
    """pynvml with the driver calls answered from ``gpus`` (dicts)."""

    def __init__(self, gpus: list[dict[str, Any]], gpm: bool = False) -> None:
        self.gpus, self.gpm, self.inited, self.freed = gpus, gpm, 0, 0
        self.migs = {m["uuid"]: (g, m) for g in gpus for m in g.get("mig", [])}

    def __getattr__(self, name: str) -> Any:
        if name.startswith(("NVML_", "c_nvml")) or name == "NVMLError":
            return getattr(pynvml, name)  # constants, structures and errors: pynvml's own
        raise AttributeError(name)

    def _err(self, code: int) -> pynvml.NVMLError:
        return pynvml.NVMLError(code)

    def nvmlInit(self) -> None:
        self.inited += 1

    def nvmlShutdown(self) -> None:
        self.inited -= 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> dict[str, Any]:
        if not 0 <= i < len(self.gpus):
            raise self._err(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return self.gpus[i]

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> dict[str, Any]:
        for g in self.gpus:
            if g["uuid"] == uuid:
                return g
        if uuid in self.migs:
            return self.migs[uuid][1]
        raise self._err(pynvml.NVML_ERROR_NOT_FOUND)

    def nvmlDeviceGetUUID(self, h: dict[str, Any]) -> str:
        return str(h["uuid"])

    def nvmlDeviceGetName(self, h: dict[str, Any]) -> str:
        return str(h["name"])

    def nvmlDeviceIsMigDeviceHandle(self, h: dict[str, Any]) -> c_uint:
        return c_uint(1 if h["uuid"].startswith("MIG-") else 0)

    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, h: dict[str, Any]) -> dict[str, Any]:
        return self.migs[h["uuid"]][0]

    def nvmlDeviceGetGpuInstanceId(self, h: dict[str, Any]) -> int:
        return int(h["gi"])

    def nvmlDeviceGetMemoryInfo(self, h: dict[str, Any]) -> Any:
        m = pynvml.c_nvmlMemory_t()
        m.total, m.used = h.get("total", 80 * 2**30), h["used_mib"] * 2**20
        m.free = m.total - m.used
        return m

    def nvmlDeviceGetUtilizationRates(self, h: dict[str, Any]) -> Any:
        if h["uuid"].startswith("MIG-"):
            raise self._err(pynvml.NVML_ERROR_NOT_SUPPORTED)  # as on a real MIG handle
        u = pynvml.c_nvmlUtilization_t()
        u.gpu, u.memory = h["util"], h.get("mem_util", 0)
        return u

    def nvmlDeviceGetPowerUsage(self, h: dict[str, Any]) -> int:
        if "power_mw" not in h:
            raise self._err(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return int(h["power_mw"])

    def nvmlDeviceGetTotalEnergyConsumption(self, h: dict[str, Any]) -> int:
        if "energy_mj" not in h:
            raise self._err(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return int(h["energy_mj"])

    # GPM (Hopper and later)
    def nvmlGpmQueryDeviceSupport(self, h: dict[str, Any]) -> Any:
        s = pynvml.c_nvmlGpmSupport_t()
        s.isSupportedDevice = 1 if self.gpm else 0
        return s

    def nvmlGpmSampleAlloc(self) -> Any:
        return {"taken": None}

    def nvmlGpmSampleFree(self, sample: Any) -> None:
        self.freed += 1

    def nvmlGpmMigSampleGet(self, h: dict[str, Any], gi: int, sample: Any) -> None:
        sample["taken"] = gi

    def nvmlGpmMetricsGet(self, get: Any) -> Any:
        assert get.version == pynvml.NVML_GPM_METRICS_GET_VERSION and get.numMetrics == 1
        assert get.metrics[0].metricId == pynvml.NVML_GPM_METRIC_SM_UTIL
        gi = get.sample2["taken"]
        get.metrics[0].value = next(m["gpm_util"] for _, m in self.migs.values() if m["gi"] == gi)
        return get


def gpus() -> list[dict[str, Any]]:
    return [
        {
            "uuid": "GPU-aaa",
            "name": "NVIDIA H100 80GB HBM3",
            "util": 91,
            "mem_util": 40,
            "used_mib": 30000,
            "power_mw": 612_000,
            "energy_mj": 9_000_000,
        },
        {"uuid": "GPU-bbb", "name": "NVIDIA H100 80GB HBM3", "util": 0, "used_mib": 1},
        {
            "uuid": "GPU-ccc",
            "name": "NVIDIA H100 80GB HBM3",
            "util": 70,
            "mem_util": 10,
            "used_mib": 0,
            "power_mw": 700_000,
            "energy_mj": 7_000_000,
            "mig": [
                {
                    "uuid": "MIG-111",
                    "name": "NVIDIA H100 80GB HBM3 MIG 3g.40gb",
                    "gi": 1,
                    "used_mib": 5000,
                    "gpm_util": 12.5,
                },
                {
                    "uuid": "MIG-222",
                    "name": "NVIDIA H100 80GB HBM3 MIG 1g.10gb",
                    "gi": 9,
                    "used_mib": 0,
                    "gpm_util": 0.0,
                },
            ],
        },
    ]


@pytest.fixture(autouse=True)
def _no_gpm_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(T.time, "sleep", lambda s: None)


# pynvml's c_nvmlGpmMetricsGet_t takes ctypes samples; the fake's samples are dicts, so
# the structure is swapped for one with the same fields that holds any value.
class _MetricsGet:
    def __init__(self) -> None:
        self.version = 0
        self.numMetrics = 0
        self.sample1: Any = None
        self.sample2: Any = None
        self.metrics = [pynvml.c_nvmlGpmMetric_t() for _ in range(pynvml.NVML_GPM_METRIC_MAX)]


def fake(gpm: bool = False) -> FakeNVML:
    nv = FakeNVML(gpus(), gpm=gpm)
    nv.c_nvmlGpmMetricsGet_t = _MetricsGet  # type: ignore[attr-defined]
    return nv


def test_whole_gpus_by_index_read_exactly_the_granted_ones() -> None:
    nv = fake()
    src = T.NvmlSource(["1", "0"], nv)
    s = src.read()
    assert [(d.index, d.uuid) for d in s] == [(0, "GPU-bbb"), (1, "GPU-aaa")]
    busy = s[1]
    assert busy.utilization_pct == 91 and busy.memory_util_pct == 40
    assert busy.memory_used_mib == 30000
    assert busy.power_w == pytest.approx(612.0) and busy.energy_mj == 9_000_000
    assert not busy.shared
    # no power or energy reading on that board: None, not 0
    assert s[0].power_w is None and s[0].energy_mj is None
    src.close()
    assert nv.inited == 0


def test_by_uuid_and_an_unknown_uuid_is_an_nvml_error() -> None:
    src = T.NvmlSource(["GPU-aaa"], fake())
    assert src.read()[0].uuid == "GPU-aaa"
    with pytest.raises(pynvml.NVMLError):
        T.NvmlSource(["GPU-zzz"], fake())


@pytest.mark.parametrize(
    ("uuid", "gpm", "util", "power", "energy"),
    [
        # no GPM: the parent's utilisation; power and energy: the parent's × g/7
        ("MIG-111", False, 70.0, 700 * 3 / 7, 7_000_000 * 3 / 7),
        ("MIG-222", False, 70.0, 700 / 7, 7_000_000 / 7),
        # GPM: the instance's own SM activity; power and energy still the parent's share
        ("MIG-111", True, 12.5, 700 * 3 / 7, 7_000_000 * 3 / 7),
        ("MIG-222", True, 0.0, 700 / 7, 7_000_000 / 7),
    ],
)
def test_mig_rule(uuid: str, gpm: bool, util: float, power: float, energy: float) -> None:
    nv = fake(gpm)
    src = T.NvmlSource([uuid], nv)
    (d,) = src.read()
    assert d.uuid == uuid and d.shared
    assert d.utilization_pct == pytest.approx(util)
    assert d.power_w == pytest.approx(power) and d.energy_mj == pytest.approx(energy)
    assert d.memory_used_mib == (5000 if uuid == "MIG-111" else 0)
    src.close()


def test_source_for_picks_by_environment(tmp_path: Path) -> None:
    assert T.source_for(env={"CUDA_VISIBLE_DEVICES": ""}, nvml=fake()).name == "none"
    assert T.source_for(env={"CUDA_VISIBLE_DEVICES": "0"}, nvml=fake()).name == "nvml"
    assert T.source_for("none", env={"CUDA_VISIBLE_DEVICES": "0"}).name == "none"
    script = tmp_path / "s.json"
    script.write_text(json.dumps({"devices": [{"index": 0}]}))
    got = T.source_for(env={T.SCRIPT_ENV: str(script), "CUDA_VISIBLE_DEVICES": "0"})
    assert got.name == "scripted"

    class Broken:
        class NVMLError(Exception):
            pass

        def nvmlInit(self) -> None:
            raise self.NVMLError("NVML Shared Library Not Found")

    assert T.source_for(env={"CUDA_VISIBLE_DEVICES": "0"}, nvml=Broken()).name == "none"
    with pytest.raises(T.TelemetryError, match="'nvml' but NVML cannot be used"):
        T.source_for("nvml", env={"CUDA_VISIBLE_DEVICES": "0"}, nvml=Broken())
    with pytest.raises(T.TelemetryError, match="SOVEREIGN_PORTAL_DEVICE_SCRIPT"):
        T.source_for("scripted", env={})
    with pytest.raises(T.TelemetryError, match="device_source"):
        T.source_for("gpu", env={})


@pytest.mark.parametrize(
    ("value", "ids"),
    [("", []), ("0,1", ["0", "1"]), (" MIG-abc-1 ", ["MIG-abc-1"]), ("GPU-x,3", ["GPU-x", "3"])],
)
def test_visible_devices(value: str, ids: list[str]) -> None:
    assert T.visible_devices(value) == ids


@pytest.mark.parametrize("value", ["0;rm -rf", "cuda:0", ",".join(["0"] * 65)])
def test_visible_devices_refused(value: str) -> None:
    with pytest.raises(T.TelemetryError, match="CUDA_VISIBLE_DEVICES"):
        T.visible_devices(value)


# -- the scripted source: energy is the integral of the scripted power ---------------------

SCRIPT = {
    "time_scale": 60,
    "devices": [{"index": 0, "uuid": "GPU-s0", "idle_w": 60, "busy_w": 460}],
    "phases": [
        {"seconds": 300, "utilization_pct": 80, "memory_used_mib": 2048},
        {"seconds": None, "utilization_pct": 0},
    ],
}


@pytest.mark.parametrize(
    ("real_s", "util", "power", "energy_j"),
    [
        (0, 80, 380, 0),  # 60 + 400 × 0.8
        (1, 80, 380, 380 * 60),  # one real second = one scripted minute
        (5, 0, 60, 380 * 300),  # the busy 5 minutes are over
        (10, 0, 60, 380 * 300 + 60 * 300),  # then idle: 60 W
    ],
)
def test_scripted_phases_and_counter(
    tmp_path: Path, real_s: float, util: float, power: float, energy_j: float
) -> None:
    path = tmp_path / "script.json"
    path.write_text(json.dumps({**SCRIPT, "start": 1000.0}))
    src = T.ScriptedSource(path, clock=lambda: 1000.0 + real_s)
    (d,) = src.read()
    assert d.utilization_pct == util and d.power_w == power
    assert d.energy_mj == pytest.approx(energy_j * 1000)
    assert d.uuid == "GPU-s0" and not src.measured


def test_scripted_file_change_is_read_and_a_torn_write_keeps_the_last(tmp_path: Path) -> None:
    path = tmp_path / "script.json"
    path.write_text(json.dumps({**SCRIPT, "start": time.time()}))
    src = T.ScriptedSource(path)
    assert src.read()[0].utilization_pct == 80
    busy = {**SCRIPT, "start": time.time(), "phases": [{"seconds": None, "utilization_pct": 5}]}
    path.write_text(json.dumps(busy))
    import os

    os.utime(path, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    assert src.read()[0].utilization_pct == 5
    path.write_text('{"devices": [')
    os.utime(path, ns=(time.time_ns() + 2 * 10**9, time.time_ns() + 2 * 10**9))
    assert src.read()[0].utilization_pct == 5


@pytest.mark.parametrize(
    ("script", "field"),
    [
        ({"devices": [{"index": 0, "phases": [{"utilization_pct": 180}]}]}, "utilization_pct"),
        ({"devices": [{"index": 0, "phases": [{"seconds": -1}]}]}, "seconds"),
        ({"devices": [{"index": 0, "busy_w": "lots"}]}, "busy_w"),
        ({"devices": [{"index": 0, "watts": 1}]}, "watts: unknown field"),
        ({"time_scale": 0}, "time_scale"),
        ({"clock": 1}, "script.clock: unknown field"),
        ([], "JSON object"),
        ({"devices": [{"uuid": 5}]}, "uuid"),
    ],
)
def test_bad_scripts_name_the_field(script: Any, field: str) -> None:
    with pytest.raises(T.TelemetryError, match=field):
        T.parse_script(script)


@pytest.mark.parametrize(
    ("name", "share"),
    [("NVIDIA H100 MIG 1g.10gb", 1 / 7), ("NVIDIA H100 MIG 3g.40gb", 3 / 7), ("x", 1 / 7)],
)
def test_mig_share(name: str, share: float) -> None:
    assert T.mig_share(name) == pytest.approx(share)
