"""The portal database: migrations, engine settings, timestamps, transactions, and the
account bindings (hub user -> IdP subject) with their audited re-bind.

Every test that takes ``portal_db_url`` or ``portal_store`` runs once per engine (SQLite here;
PostgreSQL where its fixture adds it, see tests/support/portal_db.py).
"""

from __future__ import annotations

import itertools
import json
import threading
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sovereign_portal.hub.accounts import (
    AccountError,
    audit_trail,
    bind_or_check,
    get_binding,
    rebind,
)
from sovereign_portal.hub.store import (
    MIGRATIONS,
    AuditEvent,
    PortalDatabase,
    PortalStore,
    utcnow,
)
from sqlalchemy import select, text

pytestmark = pytest.mark.unit

ISS = "http://127.0.0.1:9999"


# --- migrations ----------------------------------------------------------------------------
def test_upgrade_creates_the_tables_and_is_idempotent(portal_db_url: str) -> None:
    store = PortalStore(portal_db_url)
    try:
        assert store.current_revision() is None
        store.upgrade()
        assert store.current_revision() == store.head_revision()
        assert {"account_bindings", "audit_events", "alembic_version"} <= store.table_names()
        store.upgrade()  # a second start is a no-op
        assert store.current_revision() == store.head_revision()
    finally:
        store.dispose()


def test_revisions_form_one_line_from_0001() -> None:
    """One head, no branches: each revision file names the one before it."""
    from alembic.script import ScriptDirectory

    store = PortalStore("sqlite://")
    script = ScriptDirectory.from_config(store.alembic_config())
    assert len(script.get_heads()) == 1
    chain = list(script.walk_revisions())  # newest first
    assert chain[-1].revision == "0001" and chain[-1].down_revision is None
    for newer, older in itertools.pairwise(chain):
        assert newer.down_revision == older.revision
    assert (MIGRATIONS / "env.py").is_file() and (MIGRATIONS / "script.py.mako").is_file()


def test_downgrade_to_base_and_up_again(portal_db_url: str) -> None:
    from alembic import command

    store = PortalStore(portal_db_url)
    try:
        store.upgrade()
        cfg = store.alembic_config()
        with store.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "base")
        assert not {"account_bindings", "audit_events"} & store.table_names()
        store.upgrade()
        assert {"account_bindings", "audit_events"} <= store.table_names()
    finally:
        store.dispose()


# --- engine settings -----------------------------------------------------------------------
def test_sqlite_runs_in_wal_mode_with_busy_timeout_and_foreign_keys(tmp_path: Path) -> None:
    store = PortalStore(f"sqlite:///{tmp_path / 'p.sqlite'}")
    try:
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 5000
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    finally:
        store.dispose()


def test_sqlite_writers_queue_instead_of_failing(tmp_path: Path) -> None:
    """Eight threads write at once, each read-then-write: none gets 'database is locked'."""
    store = PortalStore(f"sqlite:///{tmp_path / 'p.sqlite'}")
    store.upgrade()
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for j in range(10):
                with store.begin() as s:
                    s.scalars(select(AuditEvent)).all()
                    s.add(AuditEvent(at=utcnow(), actor=f"t{i}", action="x", target=f"{j}"))
        except BaseException as exc:  # collected, asserted below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert errors == []
        with store.begin() as s:
            assert len(s.scalars(select(AuditEvent)).all()) == 80
    finally:
        store.dispose()


def test_sqlite_reads_never_wait_behind_a_writer_and_cannot_write(tmp_path: Path) -> None:
    """A read() transaction (a login's course lookup) takes no write lock: it answers at
    once while another connection holds the write lock, sees only committed rows, refuses a
    write, and leaves its pooled connection able to write afterwards."""
    from sqlalchemy.exc import OperationalError

    store = PortalStore(f"sqlite:///{tmp_path / 'p.sqlite'}")
    store.upgrade()
    try:
        with store.begin() as s:
            s.add(AuditEvent(at=utcnow(), actor="a", action="x", target="committed"))
        writer = store.engine.connect()
        try:
            writer.begin()  # BEGIN IMMEDIATE: holds SQLite's write lock
            writer.execute(
                AuditEvent.__table__.insert().values(
                    at=utcnow(), actor="w", action="x", target="uncommitted", detail="{}"
                )
            )
            started = threading.Event()
            seen: list[list[str]] = []

            def read() -> None:
                started.set()
                with store.read() as r:
                    seen.append([e.target for e in r.scalars(select(AuditEvent))])

            t = threading.Thread(target=read)
            t.start()
            t.join(timeout=2)  # busy_timeout is 5 s: a locking BEGIN would still wait here
            assert started.is_set() and not t.is_alive(), "the read waited for the writer"
            assert seen == [["committed"]]
            with pytest.raises(OperationalError, match="readonly"), store.read() as r:
                r.add(AuditEvent(at=utcnow(), actor="r", action="x", target="nope"))
                r.flush()
        finally:
            writer.rollback()
            writer.close()
        for _ in range(3):  # every pooled connection writes again
            with store.begin() as s:
                s.add(AuditEvent(at=utcnow(), actor="b", action="x", target="after"))
        with store.read() as r:
            assert sorted(e.target for e in r.scalars(select(AuditEvent))) == [
                "after",
                "after",
                "after",
                "committed",
            ]
    finally:
        store.dispose()


def test_portal_database_url_is_validated_and_opened_upgraded(tmp_path: Path) -> None:
    with pytest.raises(Exception, match=r"PortalDatabase\.url is not a database URL"):
        PortalDatabase(url="not a url")
    db = PortalDatabase(url=f"sqlite:///{tmp_path / 'x.sqlite'}")
    store = db.open()
    try:
        assert store.current_revision() == store.head_revision()
    finally:
        store.dispose()


def test_urls_in_logs_and_reprs_hide_the_password() -> None:
    from sovereign_portal.hub.store import redact_url

    url = "postgresql+psycopg://portal:s3cret@db.example/portal"
    assert redact_url(url) == "postgresql+psycopg://portal:***@db.example/portal"
    store = PortalStore.__new__(PortalStore)
    store.url = url  # repr only; no engine needed
    assert "s3cret" not in repr(store) and "db.example" in repr(store)


# --- timestamps and transactions -----------------------------------------------------------
def test_timestamps_come_back_as_aware_utc(portal_store: PortalStore) -> None:
    paris = datetime(2026, 3, 1, 13, 30, tzinfo=timezone(timedelta(hours=1)))
    with portal_store.begin() as s:
        s.add(AuditEvent(at=paris, actor="a", action="x", target="t"))
    with portal_store.begin() as s:
        (event,) = s.scalars(select(AuditEvent)).all()
        assert event.at == paris and event.at.tzinfo is not None
        assert event.at.utcoffset() == timedelta(0)
        assert event.at.hour == 12
        assert event.details == {}
    with pytest.raises(Exception, match="timezone-aware"), portal_store.begin() as s:
        s.add(AuditEvent(at=datetime(2026, 1, 1), actor="a", action="x", target="t"))


def test_begin_rolls_back_on_error(portal_store: PortalStore) -> None:
    with pytest.raises(RuntimeError), portal_store.begin() as s:
        s.add(AuditEvent(at=utcnow(), actor="a", action="x", target="t"))
        s.flush()
        raise RuntimeError("boom")
    with portal_store.begin() as s:
        assert s.scalars(select(AuditEvent)).all() == []


# --- account bindings ----------------------------------------------------------------------
def test_first_login_binds_and_the_same_subject_passes(portal_store: PortalStore) -> None:
    first = bind_or_check(portal_store, "alice@uni-a.example", ISS, "sub-alice")
    assert first.ok and first.created
    again = bind_or_check(portal_store, "alice@uni-a.example", ISS, "sub-alice")
    assert again.ok and not again.created
    assert again.binding.bound_at == first.binding.bound_at
    assert again.binding.bound_at.tzinfo is not None


@pytest.mark.parametrize(
    ("issuer", "subject"),
    [
        (ISS, "sub-mallory"),  # another person, same name
        (ISS, "SUB-ALICE"),  # subjects are case-sensitive
        (ISS, "sub-alice "),  # and compared exactly
        ("http://127.0.0.1:9998", "sub-alice"),  # the same sub from another issuer
        (ISS + "/", "sub-alice"),  # issuers are compared exactly too
    ],
)
def test_another_subject_is_refused_and_changes_nothing(
    portal_store: PortalStore, issuer: str, subject: str
) -> None:
    bind_or_check(portal_store, "alice@uni-a.example", ISS, "sub-alice")
    check = bind_or_check(portal_store, "alice@uni-a.example", issuer, subject)
    assert not check.ok and not check.created
    assert (check.binding.issuer, check.binding.subject) == (ISS, "sub-alice")
    binding = get_binding(portal_store, "alice@uni-a.example")
    assert binding is not None and binding.subject == "sub-alice"


def test_concurrent_first_logins_bind_exactly_one_subject(portal_store: PortalStore) -> None:
    results = []
    barrier = threading.Barrier(6)

    def login(i: int) -> None:
        barrier.wait()
        results.append(bind_or_check(portal_store, "bob@uni-a.example", ISS, f"sub-{i}"))

    threads = [threading.Thread(target=login, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 6
    assert sum(r.ok for r in results) == 1 and sum(r.created for r in results) == 1
    winner = next(r for r in results if r.ok).binding.subject
    assert {r.binding.subject for r in results} == {winner}


def test_rebind_changes_the_subject_and_writes_one_audit_row(
    portal_store: PortalStore, caplog: pytest.LogCaptureFixture
) -> None:
    bind_or_check(portal_store, "carol@uni-a.example", ISS, "old-sub")
    with caplog.at_level("INFO", logger="sovereign_portal.accounts"):
        old, new = rebind(
            portal_store,
            "carol@uni-a.example",
            subject="new-sub",
            reason="IdP migration, ticket 4711",
            actor="operator1",
        )
    assert (old.subject, new.subject, new.issuer) == ("old-sub", "new-sub", ISS)
    assert new.updated_at >= old.updated_at and new.bound_at == old.bound_at
    assert not bind_or_check(portal_store, "carol@uni-a.example", ISS, "old-sub").ok
    assert bind_or_check(portal_store, "carol@uni-a.example", ISS, "new-sub").ok
    (event,) = audit_trail(portal_store, "carol@uni-a.example")
    assert event["action"] == "account.rebind" and event["actor"] == "operator1"
    assert event["detail"] == {
        "old_issuer": ISS,
        "old_subject": "old-sub",
        "new_issuer": ISS,
        "new_subject": "new-sub",
        "reason": "IdP migration, ticket 4711",
    }
    assert "account rebind: user=carol@uni-a.example" in caplog.text
    assert "by=operator1" in caplog.text and "ticket 4711" in caplog.text


def test_rebind_can_move_an_account_to_another_issuer(portal_store: PortalStore) -> None:
    bind_or_check(portal_store, "dan@uni-a.example", ISS, "s1")
    _, new = rebind(
        portal_store,
        "dan@uni-a.example",
        subject="s2",
        issuer="https://idp.uni-a.example/realms/uni",
        reason="moved to the new IdP",
        actor="op",
    )
    assert new.issuer == "https://idp.uni-a.example/realms/uni"
    assert bind_or_check(portal_store, "dan@uni-a.example", new.issuer, "s2").ok


BAD_REBINDS = [
    ({"subject": ""}, "subject"),
    ({"subject": "   "}, "subject"),
    ({"subject": " padded"}, "subject"),
    ({"subject": "x" * 256}, "subject"),
    ({"subject": "line\nbreak"}, "subject"),
    ({"subject": "old-sub"}, "subject"),  # already bound to it
    ({"subject": 42}, "subject"),
    ({"reason": ""}, "reason"),
    ({"reason": "  "}, "reason"),
    ({"reason": "x" * 501}, "reason"),
    ({"reason": "esc\x1b[31m"}, "reason"),
    ({"issuer": "not a url"}, "issuer"),
    ({"issuer": "ftp://idp.example"}, "issuer"),
    ({"issuer": "https://idp.example/?x=1"}, "issuer"),
    ({"issuer": ""}, "issuer"),
    ({"username": "nobody@uni-a.example"}, "username"),  # never logged in
    ({"username": ""}, "username"),
    ({"actor": ""}, "actor"),
]


@pytest.mark.parametrize(("change", "field"), BAD_REBINDS)
def test_bad_rebind_names_the_field_and_changes_nothing(
    portal_store: PortalStore, change: dict, field: str
) -> None:
    bind_or_check(portal_store, "erin@uni-a.example", ISS, "old-sub")
    args = {
        "username": "erin@uni-a.example",
        "subject": "new-sub",
        "reason": "ticket 1",
        "actor": "op",
        "issuer": None,
        **change,
    }
    username = args.pop("username")
    with pytest.raises(AccountError) as info:
        rebind(portal_store, username, **args)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    binding = get_binding(portal_store, "erin@uni-a.example")
    assert binding is not None and (binding.issuer, binding.subject) == (ISS, "old-sub")
    assert audit_trail(portal_store, "erin@uni-a.example") == []
    with portal_store.begin() as s:
        assert s.execute(text("SELECT count(*) FROM audit_events")).scalar() == 0


def test_audit_detail_is_json_text(portal_store: PortalStore) -> None:
    bind_or_check(portal_store, "f@uni-a.example", ISS, "a")
    rebind(portal_store, "f@uni-a.example", subject="b", reason="r", actor="op")
    with portal_store.begin() as s:
        raw = s.execute(text("SELECT detail FROM audit_events")).scalar()
    assert json.loads(raw)["new_subject"] == "b"
    assert datetime.now(UTC) - timedelta(minutes=5) < utcnow()
