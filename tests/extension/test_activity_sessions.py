"""A compute session's GPU activity, end to end on the local backend: a real Jupyter
server (pytest-jupyter) with the portal extension, the real portal service, a local Dask
session whose worker runs the job sampler (the ``gpu_pin`` preload) over a scripted
device source, and the culler's reclaim route.

- the worker's readings reach the service as the session's own target ``grant:<id>``,
  with its energy counted on the session's open ledger record;
- a report about a grant that is not the caller's is refused, naming ``grant``;
- the culler's reclaim of the session closes its record ``reclaimed``, and the server
  hears it and stops the session, saying why.
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

pytestmark = [pytest.mark.extension, pytest.mark.timeout(180)]

CULLER_TOKEN = "culler-token-for-this-test"


@pytest.fixture
def session_script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    path = tmp_path / "session-devices.json"
    body = {
        "start": time.time(),
        "devices": [{"index": 0, "uuid": "GPU-sess", "idle_w": 40, "busy_w": 400}],
        "phases": [{"seconds": None, "utilization_pct": 0}],
    }
    path.write_text(json.dumps(body))
    monkeypatch.setenv("SOVEREIGN_PORTAL_SESSION_DEVICE_SCRIPT", str(path))
    yield path


@pytest.fixture
def jp_server_config(
    service: PortalServiceThread, server_token: str, tmp_path: Path, session_script: Path
) -> dict[str, Any]:
    async def culler(token: str) -> str | None:
        return "sovereign-portal-culler" if token == CULLER_TOKEN else None

    service.service._service_for_token = culler  # the hub's answer for the culler's token
    return {
        "ServerApp": {"jpserver_extensions": {"sovereign_portal.extension": True}},
        "PortalExtension": {
            "hub_service_url": service.url,
            "hub_api_token": server_token,
            "poll_interval": 0.2,
            "memory_per_worker": "1GiB",
            "session_root": str(tmp_path / "sessions"),
            "sample_interval": 0.1,
            "report_interval": 0.3,
        },
    }


def book(service: PortalServiceThread) -> Any:
    from sovereign_portal.hub.activity_service import book_of

    return book_of(service.service)


async def on_service(service: PortalServiceThread, fn: Any) -> Any:
    """``fn()`` in the service's own thread (its in-memory database is per thread)."""

    async def run() -> Any:
        return fn()

    def wait() -> Any:
        return asyncio.run_coroutine_threadsafe(run(), service.loop).result(10)

    return await asyncio.to_thread(wait)


async def culler_view(service: PortalServiceThread) -> list[dict[str, Any]]:
    r = await asyncio.to_thread(
        requests.get,
        service.url + "api/activity/all",
        headers={"Authorization": f"token {CULLER_TOKEN}"},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    return list(r.json()["targets"])


async def wait_for(pred: Any, seconds: float, what: str) -> Any:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        got = pred()
        if got:
            return got
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


async def test_session_activity_reaches_its_grant_and_a_reclaim_stops_it(
    jp_fetch: Any, service: PortalServiceThread
) -> None:
    code, info = await call(
        jp_fetch, "POST", "sessions", body={"request": {"kind": "dask", "gpus": 1}}
    )
    assert code == 201, info
    sid, gid = info["id"], info["grant"]["id"]
    src = f"grant:{gid}"

    async def state() -> dict[str, Any]:
        _, got = await call(jp_fetch, "GET", "sessions", sid)
        return dict(got)

    t = await wait_for(
        lambda: (
            (book(service).targets.get(src) or None)
            if (book(service).targets.get(src) and book(service).targets[src].meter.counted)
            else None
        ),
        90,
        "the session's reports with counted energy",
    )
    last = t.history[-1]
    assert t.kind == "session" and t.user == "alice" and last.source == "scripted"
    assert [d.uuid for d in last.devices] == ["GPU-sess"]
    assert t.meter.board_wh > 0  # 40 W scripted, from the worker's counter
    store = service.service.grant_ledger.store
    rec = await on_service(service, lambda: store.open_for(src))
    assert rec is not None and t.record_id == rec.id

    # a report about a grant that is not the caller's: refused, nothing recorded
    before = set(book(service).targets)
    body = {
        "server": "",
        "grant": "abcdef0123",
        "source": "scripted",
        "measured": False,
        "sampled_at": time.time(),
        "devices": [],
        "kernels": {"busy": 0, "total": 0, "idle_since": None},
    }
    r = await asyncio.to_thread(
        requests.post,
        service.url + "api/activity",
        data=json.dumps(body),
        headers={"Authorization": "token server-token-of-alice"},
        timeout=10,
    )
    assert r.status_code == 404 and "grant" in r.json()["error"], r.text
    assert set(book(service).targets) == before

    # the culler sees the session as its own target, idle, and reclaims it
    assert any(x["source"] == src and x["kind"] == "session" for x in await culler_view(service))
    r = await asyncio.to_thread(
        requests.post,
        service.url + "api/activity/reclaim",
        data=json.dumps({"source": src}),
        headers={"Authorization": f"token {CULLER_TOKEN}"},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    assert r.json()["record"] == rec.id and r.json()["saved_gpu_hours"] > 0
    # the server hears it at its next report and stops the session, saying why
    end = time.monotonic() + 30
    while time.monotonic() < end:
        s = await state()
        if s["state"] == "stopped":
            break
        await asyncio.sleep(0.2)
    assert s["state"] == "stopped" and "reclaimed" in s["message"], s
    # its release closed the record "reclaimed", with the measured (scripted) energy
    done = await on_service(service, lambda: store.get(rec.id))
    assert done is not None and done.closed and done.end_reason == "reclaimed"
    assert done.amounts is not None and done.amounts.energy_wh is not None
    assert src not in [t["source"] for t in await culler_view(service)]  # done with
