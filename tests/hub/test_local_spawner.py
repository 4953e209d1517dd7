"""LocalGPUSpawner against a real JupyterHub and configurable-http-proxy.

Servers are real jupyterhub-singleuser processes; each one reports, from inside, the
devices it sees. The hub and servers run under the egress guard.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from sovereign_portal.spawners import load_site
from sovereign_portal.spawners.inventory import declared_devices

from tests.support.hub import HubProcess

pytestmark = pytest.mark.hub

CONFIG = """
c.JupyterHub.authenticator_class = "dummy"
c.Authenticator.allow_all = True
c.JupyterHub.spawner_class = "local-gpu"
c.LocalGPUSpawner.inventory_source = "declared"
c.LocalGPUSpawner.home_dir_template = "{home}/{{username}}"
c.LocalGPUSpawner.default_url = "/lab"
"""


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    d = tmp_path_factory.mktemp("hub")
    h = HubProcess(d, CONFIG.format(home=d / "home"), poll_interval=2)
    h.start()
    try:
        yield h
    finally:
        h.close()
        h.assert_no_egress()


def placement(hub: HubProcess, user: str) -> dict:
    r = hub.server_get(user, "sovereign-portal/api/placement")
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def server_pid(hub: HubProcess, user: str) -> int:
    state = hub.api("GET", f"/users/{user}", params={"include_stopped_servers": "1"}).json()
    return int(state["servers"][""]["state"]["pid"])


def alive(pid: int) -> bool:
    """Running: it exists and is not a zombie waiting for its (re)parent to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[:1] != ["Z"]


BOX = declared_devices(load_site().partitions[0].nodes[0])


def test_disjoint_devices_release_and_readoption(hub: HubProcess) -> None:
    a = hub.spawn("alice", {"gpus": 2})
    b = hub.spawn("bob", {"gpus": 4})
    pa, pb = placement(hub, "alice"), placement(hub, "bob")
    # Seen from inside each server: exactly the granted number, disjoint.
    assert len(pa["devices"]) == 2 and len(pb["devices"]) == 4
    assert not set(pa["devices"]) & set(pb["devices"])
    whole = {d.id for d in BOX if d.slice is None}
    assert set(pa["devices"]) | set(pb["devices"]) <= whole
    assert pa["env"]["SOVEREIGN_PORTAL_SIZE"] == "h100x2"
    assert pa["env"]["SOVEREIGN_PORTAL_COUNTRY"] == "FR"
    assert a["ready"] and b["ready"]

    # Only 6 whole GPUs: a third server asking for 2 more than remain is refused.
    hub.ensure_user("carol")
    r = hub.api("POST", "/users/carol/server", json={"gpus": 4})
    assert r.status_code == 409, r.text
    assert "free" in r.json()["message"]

    # Hub restart (SIGTERM; servers keep running): alice is re-adopted with her devices.
    pid = server_pid(hub, "alice")
    hub.stop()
    hub.start()
    assert alive(pid)
    hub.wait_ready("alice", 30)
    assert placement(hub, "alice")["devices"] == pa["devices"]
    # Her devices stay hers after the restart: bob's 4 + alice's 2 leave nothing for carol.
    r = hub.api("POST", "/users/carol/server", json={"gpus": 1})
    assert r.status_code == 409, r.text

    # Stop both: devices come back, so carol can now have all 4 that bob held.
    hub.stop_server("alice")
    hub.stop_server("bob")
    assert not alive(pid)
    c = hub.spawn("carol", {"gpus": 4})
    assert c["ready"]
    assert set(placement(hub, "carol")["devices"]) <= set(pa["devices"]) | set(pb["devices"])
    hub.stop_server("carol")


def test_slices_are_exclusive_mig_devices(hub: HubProcess) -> None:
    hub.spawn("dora", {"slice": "3g.40gb"})
    hub.spawn("eve", {"slice": "3g.40gb"})
    pd, pe = placement(hub, "dora"), placement(hub, "eve")
    slices = {d.id for d in BOX if d.slice == "3g.40gb"}
    assert {*pd["devices"], *pe["devices"]} == slices
    assert all(x.startswith("MIG-") for x in slices)
    # Both 3g.40gb slices are taken now: a third is refused with the reason.
    hub.ensure_user("frank")
    r = hub.api("POST", "/users/frank/server", json={"slice": "3g.40gb"})
    assert r.status_code == 409, r.text
    hub.stop_server("dora")
    hub.stop_server("eve")


def test_dead_server_releases_devices(hub: HubProcess) -> None:
    hub.spawn("gina", {"gpus": 4})
    pid = server_pid(hub, "gina")
    os.kill(pid, 9)
    # The hub's poll notices the death and the devices return to the pool.
    hub.wait_for(lambda: not hub.api("GET", "/users/gina").json().get("servers"), 30, "dead")
    hub.spawn("hank", {"gpus": 4})
    hub.stop_server("hank")


BAD_OPTIONS = [
    pytest.param({"colour": "blue"}, "unknown field", id="unknown-field"),
    pytest.param({"gpus": -1}, "greater than or equal to 1", id="negative-gpus"),
    pytest.param({"slice": "7g.80gb"}, "no MIG slice '7g.80gb'", id="slice-not-here"),
    pytest.param({"gpus": 10**9}, "less than or equal to 8", id="1e9-gpus"),
    pytest.param({"gpus": "2"}, "valid integer", id="string-for-number"),
    pytest.param({"gpus": {"n": 2}}, "valid integer", id="nested-object"),
    pytest.param({"gpus": 3}, "1, 2, 4 or 8", id="off-ladder"),
    pytest.param({"partition": "elsewhere"}, "does not exist", id="unknown-partition"),
    pytest.param({"walltime_minutes": 100000}, "walltime", id="walltime-over-limit"),
    pytest.param({"gpus": 8, "nodes": 2}, "nodes", id="multi-node-on-a-box"),
]


@pytest.mark.parametrize(("options", "message"), BAD_OPTIONS)
def test_bad_options_get_400_and_start_nothing(
    hub: HubProcess, options: dict, message: str
) -> None:
    before = hub.singleuser_pids()
    hub.ensure_user("mallory")
    r = hub.api("POST", "/users/mallory/server", json=options)
    assert r.status_code == 400, r.text
    assert message in r.json()["message"]
    model = hub.api("GET", "/users/mallory").json()
    assert not model["servers"] and not model["pending"]
    assert hub.singleuser_pids() == before


def test_options_form_offers_only_this_box(hub: HubProcess) -> None:
    import requests

    s = requests.Session()
    s.get(f"{hub.url}/hub/login")
    r = s.post(
        f"{hub.url}/hub/login",
        data={"username": "formuser", "password": "x", "_xsrf": s.cookies.get("_xsrf")},
    )
    assert r.status_code == 200
    page = s.get(f"{hub.url}/hub/spawn").text
    assert 'value="lab/h100:3g.40gb"' in page and 'value="lab/h100x4"' in page
    assert "h100x8" not in page  # two GPUs are in MIG mode: no full node here
    xsrf = s.cookies.get("_xsrf")
    r = s.post(
        f"{hub.url}/hub/spawn",
        data={"size": "lab/h100:1g.10gb", "walltime_minutes": "30", "_xsrf": xsrf},
    )
    hub.wait_ready("formuser")
    p = placement(hub, "formuser")
    assert p["env"]["SOVEREIGN_PORTAL_SIZE"] == "h100:1g.10gb"
    assert p["env"]["SOVEREIGN_PORTAL_WALLTIME_MINUTES"] == "30"
    assert len(p["devices"]) == 1 and p["devices"][0].startswith("MIG-")
    hub.stop_server("formuser")


def test_progress_names_the_devices(tmp_path: Path) -> None:
    """The spawn page's event stream says what was allocated, where, before 'ready'."""
    import requests

    # A hub that answers the spawn POST at once (202), so progress is observed live.
    cfg = CONFIG.format(home=tmp_path / "home") + (
        'c.JupyterHub.tornado_settings = {"slow_spawn_timeout": 0}\n'
    )
    hub = HubProcess(tmp_path, cfg)
    hub.start()
    try:
        hub.ensure_user("ivan")
        r = hub.api("POST", "/users/ivan/server", json={"gpus": 1})
        assert r.status_code == 202, r.text
        events = requests.get(
            f"{hub.url}/hub/api/users/ivan/server/progress",
            headers={"Authorization": f"token {hub.token}"},
            stream=True,
            timeout=60,
        )
        text = ""
        for line in events.iter_lines(decode_unicode=True):
            text += line + "\n"
            if '"ready": true' in line:
                break
        assert "Allocated 1 H100 GPU (80 GB) on lab (FR)" in text
        assert text.index("Allocated") < text.index('"ready": true')
    finally:
        hub.close()
    hub.assert_no_egress()


def test_server_that_died_while_the_hub_was_down_is_cleaned_up(hub: HubProcess) -> None:
    hub.spawn("jack", {"gpus": 4})
    pid = server_pid(hub, "jack")
    hub.stop()
    os.kill(pid, 9)
    hub.start()
    # The hub's start-up check (it may still be running when the API answers) finds the
    # server dead: it is gone and its GPUs are free again.
    hub.wait_for(
        lambda: not hub.api("GET", "/users/jack").json().get("servers"), 30, "jack cleaned up"
    )
    hub.spawn("kate", {"gpus": 4})
    hub.stop_server("kate")


def test_walltime_ends_a_local_server(hub: HubProcess) -> None:
    """The walltime is enforced on the local box too. The clock is moved in the hub's
    database while the hub is down (the smallest walltime is a minute)."""
    import json
    import sqlite3

    hub.spawn("lena", {"gpus": 4, "walltime_minutes": 1})
    pid = server_pid(hub, "lena")
    hub.stop()
    with sqlite3.connect(hub.dir / "jupyterhub.sqlite") as db:
        (sid, raw) = db.execute(
            "SELECT spawners.id, spawners.state FROM spawners JOIN users "
            "ON users.id = spawners.user_id WHERE users.name = 'lena'"
        ).fetchone()
        state = json.loads(raw)
        assert state["ends_at"] > 0
        state["ends_at"] -= 61
        db.execute("UPDATE spawners SET state = ? WHERE id = ?", (json.dumps(state), sid))
    hub.start()
    hub.wait_for(lambda: not alive(pid), 30, "the server process to end")
    hub.wait_for(
        lambda: not hub.api("GET", "/users/lena").json().get("servers"), 30, "lena's record"
    )
    assert "reached its walltime" in hub.log_text()
    hub.spawn("mia", {"gpus": 4})  # lena's four GPUs are free again
    hub.stop_server("mia")
