"""The sampler, the report the hub takes, the idle rule and the energy arithmetic, as tables.

No network: the sampler reads a scripted source through a fake clock, its reports go to
a list, and the hub side is the pure core of :mod:`sovereign_portal.hub.activity`.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from sovereign_portal.extension.sampler import Sampler, budget_notices
from sovereign_portal.hub import activity as A
from sovereign_portal.spawners.telemetry import DeviceSample, ScriptedSource

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def scripted(tmp_path: Path, clock: Clock, phases: list[dict[str, Any]]) -> ScriptedSource:
    path = tmp_path / "s.json"
    path.write_text(
        json.dumps(
            {
                "start": clock.t,
                "time_scale": 1,
                "devices": [{"index": 0, "uuid": "GPU-0", "idle_w": 50, "busy_w": 450}],
                "phases": phases,
            }
        )
    )
    return ScriptedSource(path, clock=clock)


def test_sampler_reports_the_highest_utilisation_between_reports(tmp_path: Path) -> None:
    clock = Clock()
    # a 20 s burst at 90 % between two idle stretches
    src = scripted(
        tmp_path,
        clock,
        [
            {"seconds": 10, "utilization_pct": 0},
            {"seconds": 20, "utilization_pct": 90, "memory_util_pct": 40},
            {"seconds": None, "utilization_pct": 0},
        ],
    )
    sent: list[dict[str, Any]] = []

    async def post(body: dict[str, Any]) -> Any:
        sent.append(body)
        return {"notices": [{"id": "n"}]}

    s = Sampler(src, server="gpu", post=post, clock=clock, ring=4, kernels=lambda: (0, 1))
    for t in range(0, 60, 5):
        clock.t = 1000 + t
        s.sample()
    asyncio.run(s.report())
    (body,) = sent
    d = body["devices"][0]
    assert d["utilization_pct"] == 0  # now idle...
    assert d["utilization_max_pct"] == 90 and d["memory_util_max_pct"] == 40  # ...not missed
    # energy: 10 s × 50 W + 20 s × 410 W + 25 s × 50 W (the last sample at 55 s)
    assert d["energy_mj"] == pytest.approx((500 + 8200 + 1250) * 1000)
    assert body["kernels"] == {"busy": 0, "total": 1, "idle_since": 1000.0}
    assert len(s.ring) == 4  # bounded
    assert s.notices == [{"id": "n"}]
    # after a report the maximum starts over
    clock.t = 1060
    s.sample()
    asyncio.run(s.report())
    assert sent[1]["devices"][0]["utilization_max_pct"] == 0
    # the agreed activity shape: energy so far since the first sample
    a = s.activity_json()
    assert a["devices"][0]["energy_wh"] == pytest.approx((500 + 8200 + 1500) / 3600, abs=1e-4)
    assert a["source"] == "scripted" and a["measured"] is False


def test_sampler_survives_a_failed_read_and_a_failed_report(tmp_path: Path) -> None:
    class Broken:
        name, measured = "nvml", True

        def read(self) -> list[DeviceSample]:
            raise RuntimeError("NVML_ERROR_GPU_IS_LOST")

        def close(self) -> None:
            pass

    async def post(body: dict[str, Any]) -> Any:
        raise OSError("connection refused")

    s = Sampler(Broken(), post=post)
    assert s.sample() == []
    assert asyncio.run(s.report()) is False and s.last_report_ok is False
    assert s.activity_json() == {
        "devices": [],
        "source": "nvml",
        "measured": True,
        "sampled_at": None,
    }


def test_busy_kernel_resets_kernel_idle_time(tmp_path: Path) -> None:
    clock = Clock()
    state = {"busy": 1}
    s = Sampler(
        scripted(tmp_path, clock, [{"seconds": None}]),
        clock=clock,
        kernels=lambda: (state["busy"], 1),
    )
    s.sample()
    assert s.report_body()["kernels"]["idle_since"] is None
    state["busy"] = 0
    clock.t = 1010
    s.sample()
    clock.t = 1020
    s.sample()
    assert s.report_body()["kernels"]["idle_since"] == 1010


@pytest.mark.parametrize(
    ("budgets", "levels"),
    [
        ({"budgets": []}, []),
        ({"budgets": [{"budget": "user:a/2026", "warning": None}]}, []),
        ({"budgets": [{"budget": "b", "warning": 80, "banner": "80 % used"}]}, ["info"]),
        ({"budgets": [{"budget": "b", "warning": 95}]}, ["warning"]),
        ({"budgets": [{"budget": "b", "warning": 100}]}, ["error"]),
        ("not json", []),
    ],
)
def test_budget_notices(budgets: Any, levels: list[str]) -> None:
    got = budget_notices(budgets)
    assert [n["level"] for n in got] == levels
    assert all(n["kind"] == "budget" and n["deadline"] is None for n in got)


# -- the hub's side ----------------------------------------------------------------------------

NOW = 10_000.0


def report(
    at: float,
    util: float = 0.0,
    mem: float = 0.0,
    busy: int = 0,
    energy_mj: float | None = None,
    source: str = "nvml",
    kernel_idle: float | None = None,
) -> A.Report:
    return A.parse_report(
        "alice",
        {
            "server": "",
            "grant": None,
            "source": source,
            "measured": source == "nvml",
            "sampled_at": at,
            "devices": [
                {
                    "index": 0,
                    "uuid": "GPU-0",
                    "utilization_pct": 0,
                    "utilization_max_pct": util,
                    "memory_util_max_pct": mem,
                    "memory_used_mib": 100,
                    "power_w": 60,
                    "energy_mj": energy_mj,
                    "shared": False,
                }
            ],
            "kernels": {"busy": busy, "total": 1, "idle_since": kernel_idle},
        },
        at + 0.5,
    )


TH = A.Thresholds(util_pct=5, mem_pct=5, stale_s=120)


@pytest.mark.parametrize(
    ("reports", "now", "since"),
    [
        # both idle from the first report on
        ([report(NOW - 60), report(NOW - 30), report(NOW)], NOW, NOW - 60),
        # a busy GPU (a training loop in a thread) while the kernel is idle: not idle
        # ...until a report vouches for the interval after the busy one
        ([report(NOW - 60), report(NOW - 30, util=70), report(NOW)], NOW, NOW - 30),
        ([report(NOW - 60), report(NOW, util=70)], NOW, None),
        # memory activity alone keeps it
        ([report(NOW - 30), report(NOW, mem=20)], NOW, None),
        # a busy kernel on an idle GPU (a cell running on the CPU): not idle
        ([report(NOW - 60), report(NOW, busy=1)], NOW, None),
        ([report(NOW - 60, busy=1), report(NOW - 30), report(NOW)], NOW, NOW - 60),
        ([report(NOW - 60, busy=1), report(NOW - 30, kernel_idle=NOW - 45)], NOW, NOW - 45),
        # the kernels' own idle time, when it is later
        ([report(NOW - 60), report(NOW, kernel_idle=NOW - 10)], NOW, NOW - 10),
        # below the thresholds is idle
        ([report(NOW - 30, util=4.9, mem=4.9), report(NOW)], NOW, NOW - 30),
        # no recent report: unknown, never idle
        ([report(NOW - 300), report(NOW - 200)], NOW, None),
        ([], NOW, None),
    ],
)
def test_idle_rule(reports: list[A.Report], now: float, since: float | None) -> None:
    assert A.idle_since(reports, TH, now) == since


def test_a_server_without_devices_is_idle_on_its_kernels_alone() -> None:
    r = A.parse_report(
        "alice",
        {
            "server": "",
            "source": "none",
            "measured": False,
            "sampled_at": NOW,
            "devices": [],
            "kernels": {"busy": 0, "total": 0, "idle_since": None},
        },
        NOW,
    )
    assert A.idle_since([r], TH, NOW) == NOW


@pytest.mark.parametrize(
    ("steps", "pue", "wh", "resets"),
    [
        # 3.6e6 mJ is 1 Wh; the first report only sets the counter's origin
        ([0, 3.6e6, 7.2e6], 1.0, 2.0, 0),
        ([1e9, 1e9 + 3.6e6], 1.2, 1.2, 0),  # facility = board × PUE
        ([0, 3.6e6, 1.0, 3.6e6 + 1.0], 1.0, 2.0, 1),  # the driver reloaded: step skipped
        ([0, 1e12], 1.0, 0.0, 1),  # beyond 5 kW for 30 s: a jump, not energy
        ([None, None], 1.0, 0.0, 0),  # no counter
    ],
)
def test_meter_energy_arithmetic(
    steps: list[float | None], pue: float, wh: float, resets: int
) -> None:
    m = A.Meter(pue=pue)
    for i, e in enumerate(steps):
        m.add(report(NOW + 30 * i, energy_mj=e), A.Intensity(50.0))
    assert m.facility_wh == pytest.approx(wh)
    assert m.co2_g == pytest.approx(wh / 1000 * 50)
    assert m.resets == resets
    assert m.to_json()["basis"] == ("measured" if wh else "estimated")


def test_scripted_counters_are_exact_but_not_measured() -> None:
    m = A.Meter()
    m.add(report(NOW, energy_mj=0, source="scripted"), A.Intensity(0))
    m.add(report(NOW + 30, energy_mj=3.6e6, source="scripted"), A.Intensity(0))
    assert m.facility_wh == pytest.approx(1.0) and m.to_json()["basis"] == "estimated"


def test_intensity_series(tmp_path: Path) -> None:
    p = tmp_path / "grid.csv"
    p.write_text("time,gco2_per_kwh\n2026-12-01T00:00:00Z,40\n2026-12-01T12:00:00+00:00,90\n")
    s = A.read_intensity_series(p, 55.0)
    t0 = 1796083200.0  # 2026-12-01T00:00Z
    assert s.at(t0 - 1) == 55.0 and s.at(t0) == 40 and s.at(t0 + 13 * 3600) == 90
    m = A.Meter()
    m.add(report(t0 + 12 * 3600, energy_mj=0), s)
    m.add(report(t0 + 12 * 3600 + 30, energy_mj=3.6e6), s)
    assert m.co2_g == pytest.approx(90 / 1000)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("2026-12-01T00:00:00,40\n", "UTC offset"),
        ("2026-12-01T00:00:00Z,4000\n", "between 0 and 2000"),
        ("2026-12-01T01:00:00Z,40\n2026-12-01T00:00:00Z,40\n", "increase"),
        ("2026-12-01T00:00:00Z\n", "expected"),
    ],
)
def test_intensity_series_errors_name_the_line(tmp_path: Path, text: str, why: str) -> None:
    p = tmp_path / "grid.csv"
    p.write_text(text)
    with pytest.raises(A.ActivityError, match=why):
        A.read_intensity_series(p, 0)


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"devices": [{"index": 0}] * 65}, "devices"),
        ({"kernels": {"busy": 2, "total": 1, "idle_since": None}}, "kernels.busy"),
        ({"sampled_at": float("nan")}, "sampled_at"),
        ({"sampled_at": NOW + 3600}, "sampled_at"),
        ({"grant": "not-hex"}, "grant"),
        ({"measured": "yes"}, "measured"),
        ({"devices": [{"index": 0, "utilization_pct": 101}]}, "utilization_pct"),
        ({"devices": [{"index": 0, "gpu": 1}]}, "gpu"),
    ],
)
def test_bad_reports_name_the_field(patch: dict[str, Any], field: str) -> None:
    body = {
        "server": "",
        "source": "nvml",
        "measured": True,
        "sampled_at": NOW,
        "devices": [],
        "kernels": {"busy": 0, "total": 0, "idle_since": None},
        **patch,
    }
    with pytest.raises(A.ActivityError, match=field):
        A.parse_report("alice", body, NOW)


def test_book_is_bounded_and_keeps_notices_per_user() -> None:
    book = A.ActivityBook(max_targets=2)
    for i, user in enumerate(["a", "b", "c"]):
        r = report(NOW + i)
        book.add(A.Report(**{**r.__dict__, "user": user}))
    assert set(book.targets) == {"server:b/", "server:c/"}
    book.targets["server:b/"].notice = {"id": "x"}
    assert book.notices_of("b") == [{"id": "x"}] and book.notices_of("c") == []
    t = book.targets["server:c/"]
    assert len(t.history) == 1 and t.history.maxlen == A.HISTORY
