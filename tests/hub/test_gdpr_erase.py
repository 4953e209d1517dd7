"""GDPR export and erase on the real portal (``hub.portal.configure()``), with real logins
at the local IdP (alice and bob: students; olga: operator).

alice has a running server and ledger rows (her own and charged to course ml101). The
export at /hub/usage/export is hers alone (403 for another user, 404 for an unknown one,
except for an operator), and holds every row the databases hold about her. Then
``sovereign-portal gdpr erase`` (an operator token) stops her server, deletes her hub user
and pseudonymises her rows; afterwards her name, e-mail and subject appear in no file under
the hub's state directory (the hub's and the portal's SQLite databases, byte by byte, every
log, her home), while the ledger totals per course and partition are unchanged and
``ledger verify`` passes. The egress guard's log stays empty.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import requests
from sovereign_portal.hub import ledger as L
from sovereign_portal.hub.ledger_store import LedgerStore, UsageFilter
from sovereign_portal.hub.store import PortalStore

from tests.support.hub import HubProcess
from tests.support.idp import LocalIdP, oidc_login
from tests.support.paths import VENV_BIN
from tests.support.portal import UserBrowser, portal_stack

pytestmark = [pytest.mark.hub, pytest.mark.idp, pytest.mark.timeout(300)]

ALICE, BOB, OLGA = "alice@uni-a.example", "bob@uni-a.example", "olga@uni-a.example"
#: alice's identifiers: the hub user name, her e-mail and IdP subject (all the same in the
#: sample IdP), their URL-quoted form, and her display name.
ALICE_FORMS = ["alice@uni-a.example", "alice%40uni-a.example", "Alice Student"]


def portal_db(hub: HubProcess) -> str:
    return f"sqlite:///{hub.dir / 'portal.sqlite'}"


def add_rows(hub: HubProcess, user: str, course: str) -> None:
    store = PortalStore(portal_db(hub))
    try:
        led = LedgerStore(store)
        for i, owner in enumerate((("user", user), ("course", course))):
            rec = L.Record(
                id=L.new_id(), user=user, owner_type=owner[0], owner=owner[1],
                source=f"server:{user}/old{i}", partition=("gpu-fr", "gpu-de")[i],
                opened_at=1_780_000_000.0, started_at=1_780_000_000.0,
                rates=L.Rates(1.0, 2.0, 700.0, 56.0),
            )  # fmt: skip
            led.open(rec)
            led.close(rec.id, reason="stopped", ended_at=1_780_003_600.0)
    finally:
        store.dispose()


def totals(hub: HubProcess, **flt: Any) -> list[dict[str, Any]]:
    store = PortalStore(portal_db(hub))
    try:
        return LedgerStore(store).usage(UsageFilter(**flt), by=("course", "partition"))
    finally:
        store.dispose()


def cli(hub: HubProcess, *args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    # the hub's environment (its config file reads it), under the egress guard
    env = {k: v for k, v in hub.env().items() if k != "JUPYTERHUB_API_TOKEN"}
    if token is not None:
        env["JUPYTERHUB_API_TOKEN"] = token
    return subprocess.run(
        [str(VENV_BIN / "sovereign-portal"), *args, "--config", str(hub.config_path)],
        capture_output=True, text=True, timeout=240, env=env, cwd=hub.dir,
    )  # fmt: skip


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[HubProcess, LocalIdP]]:
    with portal_stack(tmp_path_factory.mktemp("gdpr")) as (hub, idp):
        yield hub, idp
        hub.assert_no_egress()


@pytest.fixture(scope="module")
def users(stack: tuple[HubProcess, LocalIdP]) -> dict[str, Any]:
    hub, idp = stack
    alice = UserBrowser(hub, idp, "alice")
    alice.spawn("lab/h100:1g.10gb")
    bob = oidc_login(hub.url, idp, "bob").session
    olga = oidc_login(hub.url, idp, "olga").session
    add_rows(hub, ALICE, "ml101")
    add_rows(hub, BOB, "ml101")
    # what the portal writes in her home (the extension's session files live there too)
    logs = Path(str(hub.dir / "home" / ALICE)) / ".sovereign-portal" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    (logs / "slurm-1.log").write_text(f"server of {ALICE} started\n")
    return {"alice": alice.s, "bob": bob, "olga": olga}


def export(hub: HubProcess, s: requests.Session, **params: str) -> requests.Response:
    return s.get(f"{hub.url}/hub/usage/export", params=params, timeout=60, allow_redirects=False)


def audit_count(hub: HubProcess) -> int:
    with sqlite3.connect(hub.dir / "portal.sqlite") as db:
        return int(db.execute("SELECT count(*) FROM audit_events").fetchone()[0])


def check_export(hub: HubProcess, users: dict[str, Any]) -> None:
    """alice's own export holds what the databases hold about her, and no secret."""
    r = export(hub, users["alice"])
    assert r.status_code == 200, r.text[:500]
    assert r.headers["Content-Type"].startswith("application/json")
    assert "attachment" in r.headers["Content-Disposition"]
    data = r.json()
    assert data["format"] == "sovereign-portal-export" and data["user"] == ALICE
    # the portal database, table by table, against the database itself
    with sqlite3.connect(hub.dir / "portal.sqlite") as db:
        n_ledger = db.execute(
            "SELECT count(*) FROM ledger_records WHERE username = ?", (ALICE,)
        ).fetchone()[0]
        (subject,) = db.execute(
            "SELECT subject FROM account_bindings WHERE username = ?", (ALICE,)
        ).fetchone()
    portal = data["portal_database"]
    assert len(portal["ledger_records"]) == n_ledger == 3  # two old rows + the open server
    assert [b["subject"] for b in portal["account_bindings"]] == [subject]
    assert all(BOB not in json.dumps(rows) for rows in portal.values())
    # JupyterHub's database: every table that points at users, no secrets
    with sqlite3.connect(hub.dir / "jupyterhub.sqlite") as db:
        (uid,) = db.execute("SELECT id FROM users WHERE name = ?", (ALICE,)).fetchone()
        n_tokens = db.execute("SELECT count(*) FROM api_tokens WHERE user_id=?", (uid,)).fetchone()
        n_spawners = db.execute("SELECT count(*) FROM spawners WHERE user_id=?", (uid,)).fetchone()
        hashes = [h for (h,) in db.execute("SELECT hashed FROM api_tokens WHERE user_id=?", (uid,))]
        groups = {g for (g,) in db.execute(
            "SELECT g.name FROM groups g JOIN user_group_map m ON m.group_id = g.id "
            "WHERE m.user_id = ?", (uid,))}  # fmt: skip
    hubdb = data["hub_database"]
    assert [u["name"] for u in hubdb["users"]] == [ALICE]
    assert len(hubdb["api_tokens"]) == n_tokens[0] >= 1
    assert len(hubdb["spawners"]) == n_spawners[0] >= 1
    assert {m["group_id__name"] for m in hubdb["user_group_map"]} == groups
    assert hubdb.get("user_role_map")
    text = r.text
    assert hashes and not any(h in text for h in hashes)  # token metadata, never values
    assert '"hashed"' not in text and "encrypted_auth_state" not in text
    assert data["hub_user"]["name"] == ALICE and set(data["hub_user"]["groups"]) == groups
    assert {"path": "~/.sovereign-portal/logs/slurm-1.log", "bytes": 38} in data["files"]


def test_export_of_another_user_is_for_operators_only(
    stack: tuple[HubProcess, LocalIdP], users: dict[str, Any]
) -> None:
    hub, _ = stack
    before = audit_count(hub)
    r = export(hub, users["bob"], user=OLGA)
    assert r.status_code == 403 and "operator" in r.text, r.text[:300]
    r = export(hub, users["bob"], user="x" * 1000)
    assert r.status_code == 400 and "user" in r.text, r.text[:300]
    assert audit_count(hub) == before  # nothing written
    r = export(hub, users["olga"], user="nobody@uni-a.example")
    assert r.status_code == 404, r.text[:300]
    r = export(hub, users["olga"], user=BOB)
    assert r.status_code == 200 and r.json()["user"] == BOB
    assert len(r.json()["portal_database"]["ledger_records"]) == 2
    assert audit_count(hub) == before + 1  # an operator's export is audited
    r = requests.get(f"{hub.url}/hub/usage/export", timeout=30, allow_redirects=False)
    assert r.status_code in (302, 403), r.status_code  # no login, no data


def test_cli_refuses_bad_input_and_changes_nothing(
    stack: tuple[HubProcess, LocalIdP], users: dict[str, Any]
) -> None:
    hub, _ = stack
    r = cli(hub, "gdpr", "export", "nobody@uni-a.example")
    assert r.returncode == 2 and "USER:" in r.stderr and "nothing" in r.stderr, r.stderr
    r = cli(hub, "gdpr", "erase", ALICE)
    assert r.returncode == 2 and "JUPYTERHUB_API_TOKEN" in r.stderr, r.stderr
    # bob's own token cannot erase olga: the hub refuses it, nothing changes
    t = hub.api("POST", f"/users/{quote(BOB)}/tokens", json={"note": "bob"})
    assert t.status_code == 201, t.text
    before = totals(hub, user=BOB), audit_count(hub)
    r = cli(hub, "gdpr", "erase", OLGA, token=t.json()["token"])
    assert r.returncode == 2 and "JUPYTERHUB_API_TOKEN" in r.stderr, r.stderr
    assert "lacks admin:servers, admin:users" in r.stderr, r.stderr
    r = cli(hub, "gdpr", "erase", "nobody@uni-a.example", token=hub.token)
    assert r.returncode == 2 and "USER:" in r.stderr, r.stderr
    assert hub.api("GET", f"/users/{quote(OLGA)}").status_code == 200  # still there
    assert (totals(hub, user=BOB), audit_count(hub)) == before


def scan(root: Path, forms: list[str]) -> list[str]:
    """Every file under ``root`` whose name or bytes hold one of ``forms``."""
    hits = []
    needles = [f.encode() for f in forms]
    for p in sorted(root.rglob("*")):
        if any(f in p.name for f in forms):
            hits.append(f"name: {p}")
        if p.is_file():
            data = p.read_bytes()
            hits += [f"{p}: {n.decode()}" for n in needles if n in data]
    return hits


def test_export_then_erase_leaves_no_name_and_keeps_the_totals(
    stack: tuple[HubProcess, LocalIdP], users: dict[str, Any]
) -> None:
    hub, _ = stack
    check_export(hub, users)
    # the rows closed before the erase (her running server's record closes during it)
    t0 = time.time()
    before = totals(hub, until=t0)
    bob_rows = export(hub, users["olga"], user=BOB).json()["portal_database"]["ledger_records"]
    assert scan(hub.dir, ALICE_FORMS[:2])  # before: everywhere
    r = cli(hub, "gdpr", "erase", ALICE, "--json", token=hub.token)
    assert r.returncode == 0, r.stdout + r.stderr
    receipt = json.loads(r.stdout)
    steps = {s["step"]: s for s in receipt["steps"]}
    assert steps["servers stopped"]["servers"] == [""]
    assert steps["hub user deleted (tokens, auth state, groups, roles)"]["deleted"] is True
    assert steps["portal database"]["rows"]["ledger_records"] == 3
    assert steps["SQLite files compacted (no deleted rows left in free pages or the WAL)"] == {
        "step": "SQLite files compacted (no deleted rows left in free pages or the WAL)",
        "portal": True,
        "hub": True,
    }
    assert receipt["pseudonym"].startswith("erased-")
    assert ALICE not in r.stderr and "token" not in r.stderr.lower()
    # the ledger: totals per course and partition unchanged, the chain verifies
    assert totals(hub, until=t0) == before
    # her server's record was closed by the erase (stopped), under the pseudonym
    (server,) = totals(hub, since=t0)
    assert server["records"] == 1 and server["course"] == "", server
    v = subprocess.run(
        [str(VENV_BIN / "sovereign-portal"), "ledger", "verify", "--db", portal_db(hub)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert v.returncode == 0 and "OK" in v.stdout, v.stdout + v.stderr
    # bob is untouched
    after = export(hub, users["olga"], user=BOB).json()["portal_database"]["ledger_records"]
    assert after == bob_rows
    names = [u["name"] for u in hub.api("GET", "/users").json()]
    assert ALICE not in names and BOB in names
    # her name, e-mail and subject: in no database, log or file of the portal
    hits = scan(hub.dir, ALICE_FORMS)
    assert hits == [], "\n".join(hits)
