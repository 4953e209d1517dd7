"""Compute sessions in the real portal, as a user meets it.

The hub is configured by ``hub.portal.configure()`` (what ``sovereign-portal up`` runs):
institutional login at the local IdP, the local GPU spawner and the portal service on one
shared device lease file. Users log in through the IdP's form, spawn from the form, then
call their server's session API with their browser cookies, through the proxy.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from distributed import Client
from distributed.security import Security

from tests.support.hub import HubProcess
from tests.support.idp import LocalIdP
from tests.support.portal import UserBrowser, leases, portal_stack

pytestmark = [pytest.mark.hub, pytest.mark.idp, pytest.mark.timeout(240)]

ACCESS = "access:services!service=sovereign-portal"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[HubProcess, LocalIdP]]:
    with portal_stack(tmp_path_factory.mktemp("portal")) as (hub, idp):
        yield hub, idp
        hub.close()
        hub.assert_no_egress()


def wait(pred: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.3)
    raise TimeoutError(what)


def role_scopes(hub: HubProcess, name: str) -> list[str]:
    with sqlite3.connect(hub.dir / "jupyterhub.sqlite") as db:
        row = db.execute("SELECT scopes FROM roles WHERE name = ?", (name,)).fetchone()
    return list(json.loads(row[0])) if row else []


def test_researcher_dask_session_on_devices_of_her_own(
    stack: tuple[HubProcess, LocalIdP],
) -> None:
    hub, idp = stack
    carol = UserBrowser(hub, idp, "carol")
    # The login's managed roles ({"name": "user"}, portal-researcher) keep the service scope.
    model = hub.api("GET", f"/users/{carol.name}").json()
    assert {"user", "portal-researcher"} <= set(model["roles"]), model["roles"]
    assert ACCESS in role_scopes(hub, "user")

    carol.spawn("lab/h100x1")
    placement = carol.api("GET", "placement")
    assert placement.status_code == 200, placement.text
    notebook = placement.json()["devices"]
    assert len(notebook) == 1, placement.json()
    assert leases(hub) == {notebook[0]: carol.name}

    # The service knows her role from the login (portal-researcher), not from a group.
    cat = carol.api("GET", "catalog")
    assert cat.status_code == 200, cat.text
    assert cat.json()["role"] == "researcher" and cat.json()["kinds"] == ["dask", "torch"]

    r = carol.api("POST", "sessions", {"request": {"kind": "dask", "gpus": 2}})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    info = wait(
        lambda: (i := carol.api("GET", f"sessions/{sid}").json())["state"] == "ready" and i,
        90,
        "the Dask session ready",
    )
    granted = info["grant"]["devices"]
    assert len(granted) == 2 and not set(granted) & set(notebook), (granted, notebook)
    held = leases(hub)
    assert held[notebook[0]] == carol.name
    assert {d for d, o in held.items() if o.startswith(f"session:{carol.name}:")} == set(granted)

    # Each worker sees exactly one of the granted devices, none of the notebook's.
    tls = info["tls"]
    sec = Security(
        tls_ca_file=tls["ca_file"],
        tls_client_cert=tls["cert_file"],
        tls_client_key=tls["key_file"],
        require_encryption=True,
    )
    with Client(info["scheduler_address"], security=sec, timeout=30) as client:
        seen = client.run(lambda: __import__("os").environ["CUDA_VISIBLE_DEVICES"])
        assert sorted(seen.values()) == sorted(granted), seen
        assert client.submit(sum, range(10)).result(timeout=30) == 45

    # Stopping the server ends the session and gives every device back.
    hub.stop_server(carol.name)
    assert not [o for o in leases(hub).values() if carol.name in o], leases(hub)


def test_student_is_refused_torch_with_the_reason(stack: tuple[HubProcess, LocalIdP]) -> None:
    hub, idp = stack
    alice = UserBrowser(hub, idp, "alice")
    alice.spawn("lab/h100:1g.10gb")
    cat = alice.api("GET", "catalog").json()
    assert cat["role"] == "student" and cat["kinds"] == ["dask"]
    r = alice.api("POST", "sessions", {"request": {"kind": "torch", "gpus": 1}})
    assert r.status_code == 403, r.text
    assert "may not start torch" in r.json()["error"]
    assert r.json()["reason"] != "http"
    assert not [o for o in leases(hub).values() if o.startswith("session:")]
    hub.stop_server(alice.name)
    assert leases(hub) == {}


def test_killed_server_gives_back_its_sessions_devices(
    stack: tuple[HubProcess, LocalIdP],
) -> None:
    """kill -9 of a notebook server: the hub's poll notices, and the notebook's devices and
    its compute sessions' leases all return to the pool (no wait for the walltime)."""
    import os
    import signal

    hub, idp = stack
    bob = UserBrowser(hub, idp, "bob")
    bob.spawn("lab/h100x1")
    r = bob.api("POST", "sessions", {"request": {"kind": "dask", "gpus": 1}})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    wait(lambda: bob.api("GET", f"sessions/{sid}").json()["state"] == "ready", 90, "ready")
    assert len([o for o in leases(hub).values() if bob.name in o]) == 2
    pid = hub.api("GET", f"/users/{bob.name}").json()["servers"][""]["state"]["pid"]
    os.kill(pid, signal.SIGKILL)
    wait(lambda: not hub.api("GET", f"/users/{bob.name}").json()["servers"], 60, "noticed")
    assert not [o for o in leases(hub).values() if bob.name in o], leases(hub)
