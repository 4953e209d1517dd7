"""The GPU-aware culler end to end: a real hub (``hub.portal.configure()``, institutional
login through the local IdP), real single-user servers on the local backend with declared
devices, the real portal service and the culler as hub services, and each server's
sampler reading a scripted device source (one script per user, written by the test).

Time is scaled: the culler's limit is 12 s of idleness with the warning 6 s before, the
samplers report every 0.5 s, the culler checks every second.

- warn, then stop: an idle server gets the notice in JupyterLab's REST API, then is
  stopped; its ledger record closes as ``reclaimed`` with the energy of its scripted
  counters (30 W × PUE, not the 100 W slice model), and the service counted the
  GPU-hours saved;
- a cell running ``time.sleep`` on an idle GPU is never stopped; a GPU busy with a
  training loop while the kernel is idle is never stopped.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import websocket
from sovereign_portal.hub import ledger as L
from sovereign_portal.hub.ledger_store import LedgerStore
from sovereign_portal.hub.store import PortalStore
from sovereign_portal.spawners.base import cached_site

from tests.support.hub import HubProcess
from tests.support.idp import LocalIdP
from tests.support.portal import UserBrowser, configure_text, wait_portal_service
from tests.support.stack import hub_with_idp

pytestmark = [pytest.mark.hub, pytest.mark.timeout(300)]

IDLE_S, WARN_S = 12, 6

EXTRA = """
c.Spawner.environment = {{**c.Spawner.environment,
    "SOVEREIGN_PORTAL_DEVICE_SCRIPT": "{scripts}/{{user}}.json"}}
c.LocalGPUSpawner.sovereign_args.extend(
    ["--PortalExtension.sample_interval=0.2", "--PortalExtension.report_interval=0.5"])
from sovereign_portal.hub.culler import configure_culler
configure_culler(c, ["--GPUCuller.interval=1", "--GPUCuller.idle_minutes={idle}",
    "--GPUCuller.warn_minutes={warn}", "--GPUCuller.stale_seconds=10"], notice_interval=1)
"""


def write_script(scripts: Path, user: str, phases: list[dict[str, Any]]) -> None:
    scripts.mkdir(exist_ok=True)
    body = {
        "start": time.time(),
        "time_scale": 1,
        "devices": [{"index": 0, "uuid": "MIG-script", "idle_w": 30, "busy_w": 300}],
        "phases": phases,
    }
    tmp = scripts / f".{user}.json"
    tmp.write_text(json.dumps(body))
    tmp.replace(scripts / f"{user}@uni-a.example.json")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[HubProcess, LocalIdP, Path]]:
    workdir = tmp_path_factory.mktemp("culler")
    scripts = workdir / "scripts"

    def config(hub: HubProcess, idp: LocalIdP) -> str:
        extra = EXTRA.format(scripts=scripts, idle=IDLE_S / 60, warn=WARN_S / 60)
        return configure_text(hub, idp) + extra

    with hub_with_idp(workdir, config, check_egress=False) as (hub, idp):
        wait_portal_service(hub)
        yield hub, idp, scripts
        hub.assert_no_egress()


def ledger(hub: HubProcess) -> LedgerStore:
    return LedgerStore(PortalStore(f"sqlite:///{hub.dir / 'portal.sqlite'}"))


def closed(hub: HubProcess, user: str) -> L.Record:
    store = ledger(hub)
    try:
        rec = hub.wait_for(
            lambda: next((r for r in store.chained() if r.user == user), None),
            60,
            f"{user}'s record closed",
        )
    finally:
        store.store.dispose()
    assert isinstance(rec, L.Record)
    return rec


def running(hub: HubProcess, name: str) -> bool:
    model = hub.api("GET", f"/users/{name}").json()
    return bool(model.get("servers", {}).get("", {}).get("ready"))


def test_warn_then_stop_closes_the_record_as_reclaimed(
    stack: tuple[HubProcess, LocalIdP, Path],
) -> None:
    hub, idp, scripts = stack
    write_script(scripts, "alice", [{"seconds": None, "utilization_pct": 0}])
    alice = UserBrowser(hub, idp, "alice")
    started = time.time()  # no report, so no idle time, before the spawn
    alice.spawn("lab/h100:1g.10gb")
    act = alice.api("GET", "activity").json()
    assert act["source"] == "scripted" and act["devices"][0]["uuid"] == "MIG-script"

    def warned() -> Any:
        r = alice.api("GET", "notices")
        assert r.status_code == 200, r.text
        return next((n for n in r.json()["notices"] if n["kind"] == "idle"), None)

    notice = hub.wait_for(warned, IDLE_S + 20, "the idle warning in JupyterLab's API")
    assert notice["level"] == "warning" and notice["deadline"].endswith("Z")
    assert "run a cell" in notice["message"]
    assert time.time() - started >= IDLE_S - WARN_S  # not before N - W

    # the same warning on the hub's home page (JupyterHub's announcement_home hook)
    def on_home() -> bool:
        page = alice.s.get(f"{hub.url}/hub/home", timeout=30)
        assert page.status_code == 200, page.text[:300]
        return 'class="sp-idle-notice' in page.text and "will be stopped" in page.text

    hub.wait_for(on_home, WARN_S, "the idle warning on the hub's home page")
    hub.wait_for(lambda: not running(hub, alice.name), IDLE_S + 30, "alice's server stopped")
    assert time.time() - started >= IDLE_S  # not before N

    rec = closed(hub, alice.name)
    assert rec.end_reason == "reclaimed"
    a = rec.amounts
    assert a is not None and rec.started_at is not None and rec.ended_at is not None
    held_h = (rec.ended_at - rec.started_at) / 3600
    # the scripted counters (30 W board × PUE), with the slice model (its TDP share × PUE)
    # only for the seconds before the server's first report: well under the model alone
    pue = cached_site(None).partition(rec.partition).pue
    model_wh = rec.rates.power_w * held_h
    assert rec.rates.power_w > 30 * pue * 1.5  # the two are told apart
    assert 0.5 * 30 * pue * held_h <= a.energy_wh <= 0.8 * model_wh, (a, held_h, model_wh)
    assert a.energy_basis == "estimated"  # scripted figures are exact, not measured
    # the GPU-hours the stop saved were counted: the rest of the walltime (60 min) × 1/7
    line = hub.wait_for(
        lambda: next(
            (x for x in hub.log_text().splitlines() if f"reclaimed server:{alice.name}/" in x),
            None,
        ),
        20,
        "the culler's line",
    )
    saved = float(line.split(": ")[-1].split()[0])
    assert 0.1 < saved <= 60 / 60 / 7 + 1e-3, line


def execute(hub: HubProcess, name: str, code: str) -> websocket.WebSocket:
    """Start ``code`` in a new kernel of ``name``'s server (returns while it runs)."""
    tok = hub.api(
        "POST", f"/users/{name}/tokens", json={"scopes": [f"access:servers!user={name}"]}
    ).json()["token"]
    base = f"{hub.url}/user/{name}"
    import requests

    k = requests.post(
        f"{base}/api/kernels", headers={"Authorization": f"token {tok}"}, json={}, timeout=60
    )
    assert k.status_code == 201, k.text
    ws = websocket.create_connection(
        f"{base.replace('http', 'ws', 1)}/api/kernels/{k.json()['id']}/channels",
        header=[f"Authorization: token {tok}"],
        timeout=60,
    )
    msg = {
        "header": {
            "msg_id": uuid.uuid4().hex,
            "username": name,
            "session": uuid.uuid4().hex,
            "msg_type": "execute_request",
            "version": "5.3",
        },
        "parent_header": {},
        "metadata": {},
        "content": {
            "code": code,
            "silent": False,
            "store_history": True,
            "user_expressions": {},
            "allow_stdin": False,
            "stop_on_error": True,
        },
        "channel": "shell",
        "buffers": [],
    }
    ws.send(json.dumps(msg))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # until the kernel says busy
        m = json.loads(ws.recv())
        if m.get("msg_type") == "status" and m["content"]["execution_state"] == "busy":
            return ws
    raise AssertionError("the kernel never went busy")


def test_no_stop_while_a_cell_runs_or_the_gpu_is_busy(
    stack: tuple[HubProcess, LocalIdP, Path],
) -> None:
    hub, idp, scripts = stack
    # bob: an idle GPU, but a cell running (time.sleep) for longer than the limit
    write_script(scripts, "bob", [{"seconds": None, "utilization_pct": 0}])
    # carol: an idle kernel, but a GPU busy with a training loop (scripted 90 %)
    write_script(scripts, "carol", [{"seconds": None, "utilization_pct": 90}])
    bob, carol = UserBrowser(hub, idp, "bob"), UserBrowser(hub, idp, "carol")
    # bob's cell starts as soon as his server is up (not after carol's spawn, which may
    # take longer than the warning time on a loaded machine), and outlasts the watch
    bob.spawn("lab/h100:1g.10gb")
    ws = execute(hub, bob.name, f"import time; time.sleep({IDLE_S * 8})")
    carol.spawn("lab/h100x1")

    def idle_of(u: UserBrowser) -> list[Any]:
        return [x for x in u.api("GET", "notices").json()["notices"] if x["kind"] == "idle"]

    # a warning from the seconds before the cell began goes at the culler's next check
    hub.wait_for(lambda: not idle_of(bob), 10, "no idle warning once bob's cell runs")
    try:
        deadline = time.time() + IDLE_S * 2.5
        while time.time() < deadline:
            assert running(hub, bob.name), "bob's server was stopped while a cell ran"
            assert running(hub, carol.name), "carol's busy GPU was stopped"
            for u in (bob, carol):
                n = u.api("GET", "notices").json()["notices"]
                assert not [x for x in n if x["kind"] == "idle"], (u.name, n)
            time.sleep(1)
    finally:
        ws.close()
    # the culler was running all along: carol's GPU goes idle, and she is warned
    write_script(scripts, "carol", [{"seconds": None, "utilization_pct": 0}])
    hub.wait_for(
        lambda: any(n["kind"] == "idle" for n in carol.api("GET", "notices").json()["notices"]),
        IDLE_S + 20,
        "carol warned once her GPU is idle",
    )
    for u in (bob, carol):
        hub.stop_server(u.name)
