"""Ledger records of local servers, against a real JupyterHub + configurable-http-proxy.

Each way a server ends closes its record with the right reason and amounts: a stop, a
kill -9 of the server, its walltime, and a kill -9 of the hub (the server survives: the
same record stays open; the server dies while the hub is down: closed at start-up,
*estimated*). The records are read from the portal database the hub writes.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sovereign_portal.hub import ledger as L
from sovereign_portal.hub.ledger_store import LedgerStore
from sovereign_portal.hub.store import PortalStore
from sovereign_portal.spawners import load_site

from tests.support.hub import HubProcess

pytestmark = pytest.mark.hub

CONFIG = """
c.JupyterHub.authenticator_class = "dummy"
c.Authenticator.allow_all = True
c.JupyterHub.spawner_class = "local-gpu"
c.LocalGPUSpawner.inventory_source = "declared"
c.LocalGPUSpawner.home_dir_template = "{home}/{{username}}"
c.PortalDatabase.url = "sqlite:///{db}"
from sovereign_portal.hub.ledger_hub import install
install(c)
"""


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    d = tmp_path_factory.mktemp("ledger-hub")
    h = HubProcess(d, CONFIG.format(home=d / "home", db=d / "portal.sqlite"), poll_interval=1)
    h.start()
    try:
        yield h
    finally:
        h.close()
        h.assert_no_egress()


@pytest.fixture(scope="module")
def ledger(hub: HubProcess) -> Iterator[LedgerStore]:
    store = PortalStore(f"sqlite:///{hub.dir / 'portal.sqlite'}")
    try:
        yield LedgerStore(store)
    finally:
        store.dispose()


def records(ledger: LedgerStore, user: str) -> list[L.Record]:
    return [r for r in [*ledger.chained(), *ledger.list_open()] if r.user == user]


def closed_record(hub: HubProcess, ledger: LedgerStore, user: str) -> L.Record:
    def one() -> L.Record | None:
        recs = [r for r in records(ledger, user) if r.closed]
        return recs[-1] if recs else None

    rec = hub.wait_for(one, 90, f"{user}'s record closed")
    assert isinstance(rec, L.Record)
    return rec


def server_pid(hub: HubProcess, user: str) -> int:
    state = hub.api("GET", f"/users/{user}", params={"include_stopped_servers": "1"}).json()
    return int(state["servers"][""]["state"]["pid"])


def gone(hub: HubProcess, user: str) -> bool:
    return not hub.api("GET", f"/users/{user}").json().get("servers")


def test_stop_closes_the_record_with_its_amounts(hub: HubProcess, ledger: LedgerStore) -> None:
    t0 = time.time()
    hub.spawn("ana", {"gpus": 4})
    (rec,) = records(ledger, "ana")
    assert not rec.closed and rec.source == "server:ana/" and rec.nodes == "local"
    assert (rec.kind, rec.size, rec.gpus, rec.country) == ("notebook", "h100x4", 4, "FR")
    assert rec.started_at is not None and t0 - 1 <= rec.started_at <= time.time()
    time.sleep(2)
    hub.stop_server("ana")
    t1 = time.time()
    done = closed_record(hub, ledger, "ana")
    assert done.id == rec.id and done.end_reason == "stopped" and done.seq is not None
    assert done.ended_at is not None and done.ended_at <= t1
    a = done.amounts
    assert a is not None and a.gpu_seconds_basis == "measured" and a.energy_basis == "estimated"
    seconds = done.ended_at - (done.started_at or 0)
    assert seconds >= 2 and a.gpu_seconds == pytest.approx(4 * seconds, abs=0.01)
    # The example box: H100 at its site price, TDP 700 W at its PUE.
    box = load_site().partitions[0]
    assert rec.rates.eur_per_hour == pytest.approx(4 * box.price("h100"))
    assert rec.rates.power_w == pytest.approx(4 * 700 * box.pue)
    assert a.eur == pytest.approx(rec.rates.eur_per_hour * seconds / 3600, abs=1e-5)
    assert a.energy_wh == pytest.approx(rec.rates.power_w * seconds / 3600, abs=1e-3)
    assert ledger.verify()[1] is None


def test_kill9_of_the_server_closes_it_as_died(hub: HubProcess, ledger: LedgerStore) -> None:
    hub.spawn("ben", {"slice": "3g.40gb"})
    os.kill(server_pid(hub, "ben"), 9)
    hub.wait_for(lambda: gone(hub, "ben"), 90, "ben's server noticed dead")
    done = closed_record(hub, ledger, "ben")
    assert done.end_reason == "died" and done.slice == "3g.40gb"
    assert done.amounts is not None and done.amounts.gpu_seconds_basis == "measured"
    secs = (done.ended_at or 0) - (done.started_at or 0)
    assert done.amounts.gpu_seconds == pytest.approx(secs * 3 / 7, abs=0.01)


def test_hub_kill9_keeps_a_surviving_servers_record_open(
    hub: HubProcess, ledger: LedgerStore
) -> None:
    hub.spawn("cleo", {"gpus": 1})
    (rec,) = records(ledger, "cleo")
    hub.kill()
    hub.start(timeout=180)
    hub.wait_ready("cleo", timeout=120)
    time.sleep(2)  # past the start-up reconciliation
    assert [r.id for r in records(ledger, "cleo")] == [rec.id]
    assert not records(ledger, "cleo")[0].closed
    hub.stop_server("cleo")
    assert closed_record(hub, ledger, "cleo").end_reason == "stopped"


def test_server_that_died_while_the_hub_was_down_is_closed_estimated(
    hub: HubProcess, ledger: LedgerStore
) -> None:
    hub.spawn("dora", {"gpus": 2})
    pid = server_pid(hub, "dora")
    hub.kill()
    os.kill(pid, 9)
    hub.start(timeout=180)
    hub.wait_for(lambda: gone(hub, "dora"), 90, "dora cleaned up at start-up")
    done = closed_record(hub, ledger, "dora")
    assert done.end_reason == "died"
    assert done.amounts is not None and done.amounts.gpu_seconds_basis == "estimated"
    assert ledger.verify()[1] is None


def test_walltime_closes_it_as_walltime(hub: HubProcess, ledger: LedgerStore) -> None:
    hub.spawn("eli", {"gpus": 1, "walltime_minutes": 1})
    hub.stop()
    with sqlite3.connect(hub.dir / "jupyterhub.sqlite") as db:
        (sid, raw) = db.execute(
            "SELECT spawners.id, spawners.state FROM spawners JOIN users "
            "ON users.id = spawners.user_id WHERE users.name = 'eli'"
        ).fetchone()
        state = json.loads(raw)
        state["ends_at"] -= 61
        db.execute("UPDATE spawners SET state = ? WHERE id = ?", (json.dumps(state), sid))
    hub.start(timeout=180)
    hub.wait_for(lambda: gone(hub, "eli"), 90, "eli stopped at its walltime")
    assert closed_record(hub, ledger, "eli").end_reason == "walltime"


def test_every_record_is_closed_and_chained(hub: HubProcess, ledger: LedgerStore) -> None:
    assert ledger.list_open() == []
    n, broken = ledger.verify()
    assert broken is None and n == 5
    assert {r.end_reason for r in ledger.chained()} == {"stopped", "died", "walltime"}


def test_usage_cli_reads_the_hubs_ledger(hub: HubProcess) -> None:
    import subprocess

    from tests.support.paths import VENV_BIN

    out = subprocess.run(
        [str(VENV_BIN / "sovereign-portal"), "usage", "--json", "--state-dir", str(hub.dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    users = {g["user"]: g for g in json.loads(out.stdout)["groups"]}
    assert set(users) == {"ana", "ben", "cleo", "dora", "eli"}
    assert users["dora"]["estimated_time_records"] == 1 and users["ana"]["gpu_hours"] > 0
    assert Path(hub.dir / "portal.sqlite").exists()
