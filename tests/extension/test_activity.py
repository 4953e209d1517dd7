"""The sampler in a real Jupyter server (pytest-jupyter) reporting to the real portal
service: ``GET /sovereign-portal/api/activity`` and ``/api/notices``, the report's route
on the service, and its refusals.

The server's devices are a scripted source (busy 80 % at 460 W for 5 scripted minutes,
then idle at 60 W; 60 scripted seconds per real second), so energy figures are exact.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.support.sessions import PortalServiceThread
from tests.support.sessions import extension_call as call

pytestmark = [pytest.mark.extension, pytest.mark.timeout(120)]

SCRIPT = {
    "time_scale": 60,
    "devices": [{"index": 0, "uuid": "GPU-script-0", "idle_w": 60, "busy_w": 460}],
    "phases": [
        {"seconds": 300, "utilization_pct": 80, "memory_util_pct": 30, "memory_used_mib": 2048},
        {"seconds": None, "utilization_pct": 0},
    ],
}


@pytest.fixture
def script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    path = tmp_path / "devices.json"
    path.write_text(json.dumps({**SCRIPT, "start": time.time()}))
    monkeypatch.setenv("SOVEREIGN_PORTAL_DEVICE_SCRIPT", str(path))
    yield path


@pytest.fixture
def jp_server_config(
    service: PortalServiceThread, server_token: str, tmp_path: Path, script: Path
) -> dict[str, Any]:
    return {
        "ServerApp": {"jpserver_extensions": {"sovereign_portal.extension": True}},
        "PortalExtension": {
            "hub_service_url": service.url,
            "hub_api_token": server_token,
            "poll_interval": 0.2,
            "session_root": str(tmp_path / "sessions"),
            "sample_interval": 0.1,
            "report_interval": 0.3,
        },
    }


def book(service: PortalServiceThread) -> Any:
    from sovereign_portal.hub.activity_service import book_of

    return book_of(service.service)


async def test_activity_shape_and_energy(jp_fetch: Any, service: PortalServiceThread) -> None:
    code, a = await call(jp_fetch, "GET", "activity")
    assert code == 200, a
    assert set(a) == {"devices", "source", "measured", "sampled_at"}
    assert a["source"] == "scripted" and a["measured"] is False
    (d,) = a["devices"]
    assert set(d) == {"index", "uuid", "utilization_pct", "memory_used_mib", "power_w", "energy_wh"}
    assert d["uuid"] == "GPU-script-0" and d["utilization_pct"] == 80
    assert d["memory_used_mib"] == 2048 and d["power_w"] == 380
    assert a["sampled_at"].endswith("Z")
    await asyncio.sleep(1.0)
    _, b = await call(jp_fetch, "GET", "activity")
    # one real second is a scripted minute at 380 W: about 6.3 Wh per second
    wh = b["devices"][0]["energy_wh"]
    assert 380 * 60 * 0.8 / 3600 < wh < 380 * 60 * 2.5 / 3600, wh

    # the reports reached the service: the target and its metered energy
    t = book(service).targets.get("server:alice/")
    assert t is not None and t.history[-1].source == "scripted"
    assert t.history[-1].devices[0].utilization_max_pct == 80
    m = t.meter.to_json()
    assert m["basis"] == "estimated"  # scripted counters are exact, but not measured
    assert 0 < m["board_wh"] <= wh + 1e-6


async def test_notices_idle_from_the_service_and_none_else(
    jp_fetch: Any, service: PortalServiceThread
) -> None:
    code, n = await call(jp_fetch, "GET", "notices")
    assert code == 200 and n == {"notices": []}
    for _ in range(50):
        if "server:alice/" in book(service).targets:
            break
        await asyncio.sleep(0.1)
    notice = {
        "id": "idle:server:alice/",
        "kind": "idle",
        "level": "warning",
        "message": "Your GPU has been idle for 50 minutes; it will be given back at 12:00.",
        "deadline": "2026-12-01T12:00:00Z",
    }
    book(service).targets["server:alice/"].notice = notice
    for _ in range(50):
        _, n = await call(jp_fetch, "GET", "notices")
        if n["notices"]:
            break
        await asyncio.sleep(0.1)
    assert n["notices"] == [notice]
    # the service's own notices route says the same to the user's token
    r = await asyncio.to_thread(
        requests.get,
        service.url + "api/notices",
        headers={"Authorization": "token server-token-of-alice"},
        timeout=10,
    )
    assert r.status_code == 200 and r.json() == {"notices": [notice]}
    book(service).targets["server:alice/"].notice = None


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"server": "", "source": "nvml"}, "measured"),
        ({"server": "a/b"}, "server"),
        ({"server": "", "source": "gpu", "measured": True}, "source"),
        ({"extra": 1}, "extra"),
    ],
)
def test_bad_reports_are_refused_naming_the_field(
    service: PortalServiceThread, body: dict[str, Any], field: str
) -> None:
    before = set(book(service).targets)
    r = requests.post(
        service.url + "api/activity",
        data=json.dumps(body),
        headers={"Authorization": "token server-token-of-alice"},
        timeout=10,
    )
    assert r.status_code == 400, r.text
    assert field in r.json()["error"]
    assert set(book(service).targets) == before  # nothing recorded


def test_reports_need_a_token_and_culler_routes_refuse_users(
    service: PortalServiceThread,
) -> None:
    r = requests.post(service.url + "api/activity", data="{}", timeout=10)
    assert r.status_code == 401
    for method, path in (("GET", "api/activity/all"), ("PUT", "api/activity/notice")):
        r = requests.request(
            method,
            service.url + path,
            data="{}",
            headers={"Authorization": "token server-token-of-alice"},
            timeout=10,
        )
        assert r.status_code == 403, (path, r.text)
