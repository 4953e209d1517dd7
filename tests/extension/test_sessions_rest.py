"""The extension's session REST API, in-process with pytest-jupyter, on the local backend.

Run as its own pytest session (pytest-jupyter conflicts with pytest-asyncio's auto mode):

    .venv/bin/pytest -p pytest_jupyter.jupyter_server tests/extension

The portal service is the real app (admission, catalog, device leases) in a background
thread; only hub authentication is replaced by a token table (fixtures: conftest.py).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from tornado.httpclient import HTTPClientError

from tests.support.sessions import PortalServiceThread
from tests.support.sessions import extension_call as call

pytestmark = [pytest.mark.extension, pytest.mark.timeout(120)]


async def wait_state(jp_fetch: Any, sid: str, states: tuple[str, ...], t: float = 60) -> Any:
    for _ in range(int(t / 0.1)):
        code, info = await call(jp_fetch, "GET", "sessions", sid)
        assert code == 200
        if info["state"] in states:
            return info
        await asyncio.sleep(0.1)
    raise AssertionError(f"session {sid} stuck in {info['state']}: {info['message']}")


async def test_catalog_is_the_hubs_answer_for_this_user(jp_fetch: Any) -> None:
    code, cat = await call(jp_fetch, "GET", "catalog")
    assert code == 200
    assert cat["user"] == "alice" and cat["role"] == "researcher"
    lab = cat["partitions"][0]
    assert lab["name"] == "lab" and lab["queue"]["devices"] == 15
    assert {"h100x2", "h100:3g.40gb"} <= {s["id"] for s in lab["sizes"]}


async def test_dask_session_lifecycle(jp_fetch: Any, service: PortalServiceThread) -> None:
    code, info = await call(
        jp_fetch, "POST", "sessions", body={"request": {"kind": "dask", "gpus": 2}}
    )
    assert code == 201, info
    sid = info["id"]
    info = await wait_state(jp_fetch, sid, ("ready", "failed"))
    assert info["state"] == "ready", info["message"]
    assert info["workers_up"] == 2 and info["message"] == "2 of 2 workers up"
    assert info["scheduler_address"].startswith("tls://127.0.0.1:")
    devices = info["grant"]["devices"]
    assert len(devices) == 2 and service.service._leases

    from distributed import Client
    from distributed.security import Security

    tls = info["tls"]
    sec = Security(
        tls_ca_file=tls["ca_file"],
        tls_client_cert=tls["cert_file"],
        tls_client_key=tls["key_file"],
        require_encryption=True,
    )
    async with Client(info["scheduler_address"], security=sec, asynchronous=True) as c:
        seen = await c.run(lambda: __import__("os").environ["CUDA_VISIBLE_DEVICES"])
        assert sorted(seen.values()) == sorted(devices)
        assert await c.submit(sum, range(10)) == 45
    # another session's credentials (another CA) do not get in
    with pytest.raises((OSError, TimeoutError)):
        await Client(
            info["scheduler_address"], security=Security.temporary(), asynchronous=True, timeout=2
        )

    code, listed = await call(jp_fetch, "GET", "sessions")
    assert [s["id"] for s in listed] == [sid]
    code, body = await call(jp_fetch, "POST", "sessions", sid, "scale", body={"workers": 9})
    assert code == 400 and "from 0 to 2" in body["error"]
    code, info = await call(jp_fetch, "DELETE", "sessions", sid)
    assert code == 200 and info["state"] == "stopped"
    assert not service.service._leases  # the grant's devices went back to the hub


async def test_torch_on_mig_slices_refused_with_the_reason(jp_fetch: Any) -> None:
    req = {"kind": "torch", "slice": "3g.40gb", "count": 2}
    code, body = await call(jp_fetch, "POST", "sessions", body={"request": req})
    assert code == 400
    assert "MIG slices have no NVLink" in body["error"]
    code, listed = await call(jp_fetch, "GET", "sessions")
    assert listed == []


@pytest.mark.parametrize(
    ("body", "status", "match"),
    [
        ({"request": {"kind": "dask", "gpus": 3}}, 400, "gpus must be 1, 2, 4 or 8"),
        ({"request": {"kind": "dask", "evil": 1}}, 400, "unknown field 'evil'"),
        ({"request": {"kind": "notebook"}}, 400, "'dask' or 'torch'"),
        ({"request": {"kind": "dask"}, "extra": 1}, 400, "send"),
        ({"request": {"kind": "dask", "partition": "x"}}, 403, "does not exist"),
    ],
)
async def test_bad_requests_are_refused_and_nothing_starts(
    jp_fetch: Any, body: Any, status: int, match: str
) -> None:
    code, err = await call(jp_fetch, "POST", "sessions", body=body)
    assert code == status and match in err["error"], err
    _, listed = await call(jp_fetch, "GET", "sessions")
    assert listed == []


async def test_unknown_session_and_no_token(jp_fetch: Any) -> None:
    code, err = await call(jp_fetch, "GET", "sessions", "0123456789ab")
    assert code == 404 and "no session" in err["error"]
    with pytest.raises(HTTPClientError) as e:
        await jp_fetch("sovereign-portal", "api", "sessions", headers={"Authorization": ""})
    assert e.value.code in (401, 403)


async def test_torch_session_released_when_its_kernel_goes(jp_fetch: Any) -> None:
    r = await jp_fetch("api", "kernels", method="POST", body=json.dumps({"name": "python3"}))
    kid = json.loads(r.body)["id"]
    req = {"request": {"kind": "torch", "gpus": 2}, "kernel_id": kid}
    code, info = await call(jp_fetch, "POST", "sessions", body=req)
    assert code == 201, info
    info = await wait_state(jp_fetch, info["id"], ("ready", "failed"))
    assert info["state"] == "ready" and info["world_size"] == 2
    await jp_fetch("api", "kernels", kid, method="DELETE")
    info = await wait_state(jp_fetch, info["id"], ("stopped",), t=20)
    assert info["message"] == "its kernel shut down"


async def test_walltime_expiry_is_reported_and_releases_everything(
    jp_fetch: Any, jp_serverapp: Any, service: PortalServiceThread
) -> None:
    """A session past its walltime ends as 'expired' with the reason, and its workers and
    devices go. The clock is moved, not waited for: the smallest walltime is a minute."""
    import time

    code, info = await call(
        jp_fetch,
        "POST",
        "sessions",
        body={"request": {"kind": "dask", "gpus": 1, "walltime_minutes": 1}},
    )
    assert code == 201, info
    sid = info["id"]
    info = await wait_state(jp_fetch, sid, ("ready", "failed"))
    assert info["state"] == "ready", info["message"]
    apps = jp_serverapp.extension_manager.extension_apps
    app = next(iter(apps["sovereign_portal.extension"]))
    session = app.manager.sessions[sid]
    launcher = session.launcher
    session.started = time.time() - 61  # the minute is over
    info = await wait_state(jp_fetch, sid, ("expired",), t=20)
    assert info["message"] == "the walltime of 1 min ended"
    assert launcher.local_alive() is not True
    for _ in range(50):
        if not service.service._leases:
            break
        await asyncio.sleep(0.1)
    assert not service.service._leases
