"""The ledger store (hub/ledger_store.py) on SQLite and on a real PostgreSQL server.

Every test takes ``portal_db_url`` or ``portal_store`` (tests/support/portal_db.py), so it
runs once per engine; the PostgreSQL one is a real server (tests/support/postgres.py).
Also: the migration from revision 0001 with data in it, and ``sovereign-portal ledger
verify`` / ``usage`` against a database edited with SQL.
"""

from __future__ import annotations

import json
import subprocess
import threading
from datetime import UTC, datetime
from typing import Any

import pytest
from sovereign_portal.hub import ledger as L
from sovereign_portal.hub.ledger_store import LedgerStore, UsageFilter
from sovereign_portal.hub.store import PortalStore
from sovereign_portal.spawners.request import parse_request, resolve
from sovereign_portal.spawners.site import load_site
from sqlalchemy import text

from tests.support.paths import VENV_BIN
from tests.support.slurm_cluster import SITE_FILE

SITE = load_site(SITE_FILE)
T0 = datetime(2026, 9, 1, tzinfo=UTC).timestamp()


def new(
    ledger: LedgerStore, user: str = "ada", start: float = T0, owner: tuple[str, str] | None = None,
    **req: Any,
) -> L.Record:  # fmt: skip
    r = resolve(
        SITE, parse_request({"kind": "notebook", **({} if "slice" in req else {"gpus": 1}), **req})
    )
    ot, o = owner or ("user", user)
    rec = L.open_record(
        r, user=user, now=start, source=f"server:{user}/", owner_type=ot, owner=o, site="t"
    )
    return ledger.open(rec)


@pytest.fixture
def ledger(portal_store: PortalStore) -> LedgerStore:
    return LedgerStore(portal_store)


def test_open_attach_close_and_close_twice_keeps_the_first(ledger: LedgerStore) -> None:
    rec = new(ledger)
    assert [r.id for r in ledger.list_open()] == [rec.id]
    assert ledger.open_for("server:ada/") == rec
    ledger.attach(rec.id, job_ids=["17"], nodes="gpu-fr-1", started_at=T0 + 10)
    ledger.attach(rec.id, job_ids=["17", "18"])
    got = ledger.get(rec.id)
    assert got is not None and got.job_ids == ("17", "18") and got.started_at == T0 + 10
    first = ledger.close(rec.id, reason="scancel", ended_at=T0 + 3610)
    assert first.seq == 1 and first.prev_hash == L.GENESIS and first.hash
    assert first.amounts is not None and first.amounts.gpu_seconds == 3600
    assert first.amounts.eur == pytest.approx(2.10)
    again = ledger.close(rec.id, reason="stopped", ended_at=T0 + 9999)
    assert again == first and ledger.get(rec.id) == first
    assert ledger.list_open() == [] and ledger.open_for("server:ada/") is None
    with pytest.raises(L.LedgerError, match="never change"):
        ledger.attach(rec.id, nodes="elsewhere")
    with pytest.raises(L.LedgerError, match="no such record"):
        ledger.close("nope", reason="died")
    assert ledger.verify() == (1, None)


def test_bad_close_changes_nothing(ledger: LedgerStore) -> None:
    rec = new(ledger)
    with pytest.raises(L.LedgerError, match="reason"):
        ledger.close(rec.id, reason="bored", ended_at=T0 + 1)
    assert ledger.get(rec.id) == rec
    assert ledger.verify() == (0, None)


def test_concurrent_closes_get_consecutive_links(ledger: LedgerStore) -> None:
    recs = [new(ledger, user=f"u{i}") for i in range(12)]
    errors: list[BaseException] = []

    def close(rec: L.Record) -> None:
        try:
            ledger.close(rec.id, reason="stopped", ended_at=T0 + 60)
            ledger.close(rec.id, reason="died", ended_at=T0 + 99)  # a racing second close
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=close, args=(r,)) for r in recs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    rows = list(ledger.chained())
    assert [r.seq for r in rows] == list(range(1, 13))
    assert {r.end_reason for r in rows} == {"stopped"}
    assert ledger.verify() == (12, None)


def test_adjustment_is_a_new_chained_row(ledger: LedgerStore) -> None:
    rec = new(ledger)
    ledger.close(rec.id, reason="node_failure", ended_at=T0 + 3600)
    fix = ledger.adjust(rec.id, L.Amounts(gpu_seconds=-1800, eur=-1.05), note="half refunded")
    assert fix.seq == 2 and fix.corrects == rec.id and fix.row_type == "adjustment"
    assert ledger.get(rec.id).amounts.gpu_seconds == 3600  # type: ignore[union-attr]
    (row,) = ledger.usage(UsageFilter(user="ada"))
    assert row["records"] == 2 and row["gpu_seconds"] == 1800
    assert row["eur"] == pytest.approx(1.05)
    assert ledger.verify() == (2, None)


def test_usage_groups_and_filters_in_sql(ledger: LedgerStore) -> None:
    day = 86400
    rows = [
        ("ada", ("course", "ml101"), {}, 0),
        ("bob", ("course", "ml101"), {"slice": "3g.40gb", "gpus": None}, 0),
        ("ada", ("project", "health"), {"partition": "gpu-de"}, day),
        ("cy", ("user", "cy"), {"gpus": 2}, 2 * day),
    ]
    for user, owner, req, shift in rows:
        rec = new(ledger, user=user, start=T0 + shift, owner=owner,
                  **{k: v for k, v in req.items() if v is not None})  # fmt: skip
        ledger.close(rec.id, reason="stopped", ended_at=T0 + shift + 3600)
    new(ledger, user="ada")  # open: never counted
    by_user = {r["user"]: r for r in ledger.usage(by=["user"])}
    assert set(by_user) == {"ada", "bob", "cy"}
    assert by_user["ada"]["gpu_hours"] == pytest.approx(2.0)
    assert by_user["ada"]["eur"] == pytest.approx(2.10 + 3.90)
    assert by_user["bob"]["gpu_hours"] == pytest.approx(3 / 7, abs=1e-6)
    assert by_user["cy"]["energy_wh"] == pytest.approx(2 * 700 * 1.3)
    ml = ledger.usage(UsageFilter(course="ml101"), by=["course", "user"])
    assert [(r["course"], r["user"], r["records"]) for r in ml] == [
        ("ml101", "ada", 1),
        ("ml101", "bob", 1),
    ]
    de = ledger.usage(UsageFilter(country="DE"), by=["partition"])
    assert [(r["partition"], r["co2_g"]) for r in de] == [("gpu-de", pytest.approx(1.2 * 380))]
    window = ledger.usage(UsageFilter(since=T0 + day, until=T0 + 2 * day + 1), by=[])
    assert window[0]["records"] == 1 and window[0]["eur"] == pytest.approx(3.90)
    assert ledger.usage(UsageFilter(project="health"), by=["project"])[0]["project"] == "health"
    months = ledger.usage(by=["month"])
    assert [m["month"] for m in months] == ["2026-09"]
    days = ledger.usage(by=["day"])  # UTC days of the end time, on either engine
    assert [(d["day"], d["records"]) for d in days] == [
        ("2026-09-01", 2),
        ("2026-09-02", 1),
        ("2026-09-03", 1),
    ]
    assert ledger.balance("course", "ml101").gpu_seconds == pytest.approx(3600 + 3600 * 3 / 7)
    assert ledger.balance("course", "ml101", since=T0 + 7200).gpu_seconds == 0
    with pytest.raises(L.LedgerError, match="unknown field 'color'"):
        ledger.usage(by=["color"])


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VENV_BIN / "sovereign-portal"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_verify_names_the_changed_row(portal_db_url: str, ledger: LedgerStore) -> None:
    recs = [new(ledger, user=f"u{i}") for i in range(4)]
    for i, rec in enumerate(recs):
        ledger.close(rec.id, reason="stopped", ended_at=T0 + 60 * (i + 1))
    ok = _cli("ledger", "verify", "--db", portal_db_url)
    assert ok.returncode == 0 and "OK, 4 closed rows" in ok.stdout, ok.stderr
    with ledger.engine.begin() as conn:
        conn.execute(text("UPDATE ledger_records SET eur = 0 WHERE seq = 3"))
    bad = _cli("ledger", "verify", "--db", portal_db_url)
    assert bad.returncode == 1
    assert f"#3 ({recs[2].id})" in bad.stderr and "the row was changed" in bad.stderr


def test_cli_verify_sees_a_removed_last_row(portal_db_url: str, ledger: LedgerStore) -> None:
    for i in range(3):
        ledger.close(new(ledger, user=f"u{i}").id, reason="stopped", ended_at=T0 + 60)
    with ledger.engine.begin() as conn:
        conn.execute(text("DELETE FROM ledger_records WHERE seq = 3"))
    bad = _cli("ledger", "verify", "--db", portal_db_url)
    assert bad.returncode == 1 and "rows removed" in bad.stderr


def test_cli_usage_table_json_csv(portal_db_url: str, ledger: LedgerStore) -> None:
    for user in ("ada", "bob"):
        ledger.close(new(ledger, user=user).id, reason="stopped", ended_at=T0 + 1800)
    out = _cli("usage", "--db", portal_db_url, "--json", "--since", "2026-09-01")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert [(g["user"], g["gpu_hours"]) for g in data["groups"]] == [("ada", 0.5), ("bob", 0.5)]
    csv = _cli("usage", "--db", portal_db_url, "--csv", "--by", "user,country", "--user", "bob")
    assert csv.stdout.splitlines() == [
        "user,country,records,gpu_hours,eur,energy_wh,co2_g,estimated_time_records",
        "bob,FR,1,0.5,1.05,455.0,25.48,0",
    ]
    table = _cli("usage", "--db", portal_db_url, "--by", "partition")
    assert table.returncode == 0 and "gpu-fr" in table.stdout and "2.10" in table.stdout


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--since", "yesterday"], "--since"),
        (["--country", "France"], "--country"),
        (["--by", "color"], "--by"),
        (["--user", "a b"], "--user"),
        (["--since", "2026-09-02", "--until", "2026-09-01"], "--until"),
        (["--partition", "GPU"], "--partition"),
    ],
)
def test_cli_usage_bad_values_name_the_option(
    portal_db_url: str, ledger: LedgerStore, args: list[str], option: str
) -> None:
    out = _cli("usage", "--db", portal_db_url, *args)
    assert out.returncode == 2 and option in out.stderr, out.stderr
    assert out.stdout == ""


def test_cli_refuses_a_database_without_a_ledger(tmp_path: Any) -> None:
    out = _cli("ledger", "verify", "--db", f"sqlite:///{tmp_path / 'empty.sqlite'}")
    assert out.returncode == 2 and "--db" in out.stderr and "has no ledger" in out.stderr


def test_upgrade_from_0001_keeps_its_data(portal_db_url: str) -> None:
    store = PortalStore(portal_db_url)
    try:
        store.upgrade("0001")
        assert "ledger_records" not in store.table_names()
        now = datetime(2026, 8, 1, tzinfo=UTC)
        with store.engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO account_bindings (username, issuer, subject, bound_at, updated_at)"
                    " VALUES ('ada', 'https://idp.example', 'sub-1', :t, :t)"
                ),
                {"t": now},
            )
            conn.execute(
                text(
                    "INSERT INTO audit_events (at, actor, action, target, detail)"
                    " VALUES (:t, 'op', 'rebind', 'ada', '{\"why\": \"test\"}')"
                ),
                {"t": now},
            )
        store.upgrade()
        assert store.current_revision() == store.head_revision()
        with store.engine.connect() as conn:
            assert conn.execute(text("SELECT subject FROM account_bindings")).scalar() == "sub-1"
            assert conn.execute(text("SELECT detail FROM audit_events")).scalar() == (
                '{"why": "test"}'
            )
        ledger = LedgerStore(store)
        rec = new(ledger)
        assert ledger.close(rec.id, reason="stopped", ended_at=T0 + 1).seq == 1
        assert ledger.verify() == (1, None)
    finally:
        store.dispose()
