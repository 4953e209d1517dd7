"""GDPR on the portal database (hub/gdpr.py), on SQLite and PostgreSQL: the export covers
every table with a person in it (derived from the schema), erase and retention pseudonymise
with the ledger chain still verifying and the totals per course and partition unchanged."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from sovereign_portal.hub import gdpr
from sovereign_portal.hub import ledger as L
from sovereign_portal.hub.ledger_store import LedgerStore, UsageFilter
from sovereign_portal.hub.store import PortalStore
from sqlalchemy import DateTime, Double, Float, Integer, MetaData, String, Text, select, text

KEY = b"k" * 64
ADA, BOB = "ada@uni-a.example", "bob@uni-a.example"
SUB = "sub-of-ada-7f3c"


def _value(col: Any, person: str, n: int) -> Any:
    t = col.type
    if isinstance(t, DateTime):
        return datetime(2026, 1, 1, tzinfo=UTC)
    if isinstance(t, Float | Double):
        return 1.0 + n
    if isinstance(t, Integer):
        return n
    if isinstance(t, String | Text):
        return f"v{n}-{col.name}"[: getattr(t, "length", None) or 200]
    raise AssertionError(f"{col.table.name}.{col.name}: no test value for {t!r}")


def fill(store: PortalStore, person: str, n: int) -> None:
    """One row naming ``person`` in every personal table (generic: any new table too)."""
    md = MetaData()
    md.reflect(store.engine)
    with store.engine.begin() as conn:
        made: dict[str, dict[str, Any]] = {}
        parents = {fk.column.table.name for t in md.sorted_tables for fk in t.foreign_keys}
        for t in md.sorted_tables:
            if t.name not in gdpr.PORTAL_TABLES and t.name not in parents:
                continue
            exact, inside, _ = gdpr.PORTAL_TABLES.get(t.name, ((), (), ""))
            row: dict[str, Any] = {}
            for col in t.c:
                if col.autoincrement is True or (
                    col.primary_key and isinstance(col.type, Integer) and not col.foreign_keys
                ):
                    continue
                fks = list(col.foreign_keys)
                if fks:
                    row[col.name] = made[fks[0].column.table.name][fks[0].column.name]
                elif col.name in exact:
                    row[col.name] = person
                elif col.name in inside:
                    row[col.name] = (
                        f"server:{person}/" if col.name in ("source", "ref") else f"about {person}"
                    )
                else:
                    row[col.name] = _value(col, person, n)
            if t.name == "ledger_records":
                continue  # through the ledger store below (closed and chained)
            if t.name == "account_bindings":
                row["subject"] = SUB if person == ADA else "sub-of-bob"
            res = conn.execute(t.insert().values(**row))
            pk = res.inserted_primary_key
            keys = zip(t.primary_key.columns, pk or (), strict=False)
            made[t.name] = {**row, **{c.name: v for c, v in keys}}


def ledger_rows(store: PortalStore, person: str, course: str, n: int = 2) -> None:
    led = LedgerStore(store)
    for i in range(n):
        for owner in (("user", person), ("course", course)):
            rec = L.Record(
                id=L.new_id(), user=person, owner_type=owner[0], owner=owner[1],
                source=f"server:{person}/", partition=("gpu-fr", "gpu-de")[i % 2],
                opened_at=1000.0 + i, started_at=1000.0 + i,
                rates=L.Rates(1.0, 2.0, 700.0, 56.0),
            )  # fmt: skip
            led.open(rec)
            led.close(rec.id, reason="stopped", ended_at=5000.0 + 100 * i)
    closed = next(r for r in led.chained() if r.user == person)
    led.adjust(closed.id, L.Amounts(gpu_seconds=-10.0, eur=-0.01), note=f"refund for {person}")


@pytest.fixture
def filled(portal_store: PortalStore) -> PortalStore:
    fill(portal_store, ADA, 1)
    fill(portal_store, BOB, 2)
    ledger_rows(portal_store, ADA, "ml101")
    ledger_rows(portal_store, BOB, "ml101")
    return portal_store


def test_every_table_is_classified(portal_store: PortalStore) -> None:
    """Derived from the schema: a new table must say what in it is personal, or fail here."""
    with portal_store.engine.connect() as conn:
        assert gdpr.unknown_tables(conn) == []
    tables = portal_store.table_names()
    personal = {t for t in gdpr.PORTAL_TABLES if t in tables}
    assert {"account_bindings", "audit_events", "ledger_records", "budget_charges"} <= personal
    # every column that can name someone is declared for its table
    md = MetaData()
    md.reflect(portal_store.engine)
    suspicious = (
        "user",
        "owner",
        "actor",
        "target",
        "_by",
        "subject",
        "source",
        "ref",
        "note",
        "detail",
    )
    for name in personal:
        exact, inside, action = gdpr.PORTAL_TABLES[name]
        if action == "delete":
            continue  # the whole row goes
        for col in md.tables[name].c:
            if any(s in col.name for s in suspicious) and col.name not in exact + inside:
                assert col.name in ("owner_type", "owner_kind"), f"{name}.{col.name} not declared"


def test_export_holds_every_row_about_the_person(filled: PortalStore) -> None:
    out = gdpr.export_portal(filled, ADA)
    md = MetaData()
    md.reflect(filled.engine)
    with filled.engine.connect() as conn:
        for name, (exact, inside, _) in gdpr.PORTAL_TABLES.items():
            if name not in md.tables:
                continue
            t = md.tables[name]
            conds = [t.c[c] == ADA for c in exact] + [t.c[c].contains(ADA) for c in inside]
            from sqlalchemy import or_

            want = conn.execute(select(t).where(or_(*conds))).all()
            assert want, f"{name}: the test put no row about the person in it"
            assert len(out[name]) == len(want), name
            assert all(BOB not in json.dumps(r) for r in out[name]), name
    assert {r["subject"] for r in out["account_bindings"]} == {SUB}
    assert len(out["ledger_records"]) == 5  # 4 usage rows + 1 adjustment


def test_erase_pseudonymises_and_the_chain_still_verifies(filled: PortalStore) -> None:
    led = LedgerStore(filled)
    before = led.usage(UsageFilter(), by=("course", "partition"))
    bob_before = led.usage(UsageFilter(user=BOB), by=("partition",))
    counts = gdpr.erase_portal(filled, ADA, KEY, actor="operator-x")
    assert counts["account_bindings"] == 1 and counts["ledger_records"] == 5
    assert led.verify()[1] is None
    assert led.usage(UsageFilter(), by=("course", "partition")) == before
    assert led.usage(UsageFilter(user=BOB), by=("partition",)) == bob_before
    p = gdpr.pseudonym(KEY, ADA)
    assert led.usage(UsageFilter(user=p), by=("user",))[0]["records"] == 5
    # no table holds the name or the subject any more; bob's rows are untouched
    with filled.engine.connect() as conn:
        for name in filled.table_names():
            dump = json.dumps(
                [list(map(str, r)) for r in conn.execute(text(f'SELECT * FROM "{name}"'))]  # noqa: S608
            )
            assert ADA not in dump and SUB not in dump, name
    assert gdpr.export_portal(filled, ADA) == {k: [] for k in gdpr.export_portal(filled, ADA)}
    assert any(gdpr.export_portal(filled, BOB).values())
    # the erase is audited under the pseudonym; erasing again changes nothing more
    with filled.engine.connect() as conn:
        rows = conn.execute(
            text("SELECT actor, target FROM audit_events WHERE action='gdpr_erase'")
        ).all()
    assert [tuple(r) for r in rows] == [("operator-x", p)]


def test_a_changed_redacted_row_or_log_entry_breaks_verify(filled: PortalStore) -> None:
    led = LedgerStore(filled)
    gdpr.erase_portal(filled, ADA, KEY, actor="op")
    with filled.engine.begin() as conn:
        conn.execute(text("UPDATE ledger_records SET partition='gpu-xx' WHERE seq=1"))
    _, broken = led.verify()
    assert broken is not None and broken.seq == 1 and "changed" in broken.why
    with filled.engine.begin() as conn:
        conn.execute(text("UPDATE ledger_records SET partition='gpu-fr' WHERE seq=1"))
        conn.execute(text("UPDATE ledger_redactions SET reason='retention' WHERE id=1"))
    _n, broken = led.verify()
    assert broken is not None and "redaction log entry 1" in broken.why


def test_retention_purges_only_old_rows(filled: PortalStore) -> None:
    led = LedgerStore(filled)
    before = led.usage(UsageFilter(), by=("course", "partition"))
    # rows ended at 5000 and 5100 (epoch seconds): 'now' one day and a bit later
    counts = gdpr.retention(filled, KEY, 1, now=5050.0 + 86400)
    assert counts["ledger_records"] == 4  # ada's and bob's rows that ended at 5000
    users = {r.user for r in led.chained()}
    assert ADA in users and BOB in users  # the newer rows keep their names
    assert gdpr.pseudonym(KEY, ADA) in users and gdpr.pseudonym(KEY, BOB) in users
    assert led.verify()[1] is None
    assert led.usage(UsageFilter(), by=("course", "partition")) == before
    with pytest.raises(gdpr.GDPRError, match="ledger_retention_days"):
        gdpr.retention(filled, KEY, 0)


def test_pseudonym_is_keyed_and_stable() -> None:
    assert gdpr.pseudonym(KEY, ADA) == gdpr.pseudonym(KEY, ADA)
    assert gdpr.pseudonym(KEY, ADA) != gdpr.pseudonym(b"z" * 64, ADA)
    assert ADA not in gdpr.pseudonym(KEY, ADA)


def test_upgrade_from_0003_keeps_the_chain_and_erase_works_on_old_rows(
    portal_db_url: str,
) -> None:
    store = PortalStore(portal_db_url)
    try:
        store.upgrade("0003")
        assert "ledger_redactions" not in store.table_names()
        ledger_rows(store, ADA, "ml101")
        ledger_rows(store, BOB, "ml101")
        led = LedgerStore(store)
        assert led.verify() == (10, None)  # verify works before the redaction log exists
        before = led.usage(UsageFilter(), by=("course", "partition"))
        store.upgrade()
        assert "ledger_redactions" in store.table_names()
        assert led.verify() == (10, None)
        counts = gdpr.erase_portal(store, ADA, KEY, actor="op")
        assert counts["ledger_records"] == 5
        assert led.verify() == (10, None)
        assert led.usage(UsageFilter(), by=("course", "partition")) == before
    finally:
        store.dispose()
