"""Data-subject tools (GDPR, issue 11): export everything the portal holds about a person,
erase it, and purge personal fields from old ledger rows.

The pure parts and the database work live here; :mod:`.gdpr_cli` drives them from the
command line (with the hub's REST API for servers and the hub user) and
:mod:`.gdpr_pages` serves the export at ``/hub/usage/export``.

What is personal, written once
------------------------------
:data:`PORTAL_TABLES` names, for every table of the portal database, the columns that can
hold a person's name (exactly, or inside text) and what the erase does with its rows:
``delete`` (identity data: the account binding) or ``pseudonymise`` (billing and audit
data: the name is replaced by the keyed pseudonym, the row and its amounts stay);
``totals`` (the budgets' running totals) are recomputed from the pseudonymised charges.
:data:`NO_PERSONAL_DATA` lists the tables without any. The test derives the tables from
the schema: a table in neither list fails it, so a new table cannot skip the export.

JupyterHub's own database is read generically: every table with a foreign key (directly
or through another exported table) to the person's ``users`` row, minus the columns that
hold secrets (:data:`HUB_SECRET_COLUMNS`: token hashes, OAuth codes, encrypted auth state).

The pseudonym
-------------
``erased-`` + the first 20 hex digits of HMAC-SHA256(key, user name). The key is a file
(``GDPRPolicy.pseudonym_key_file``, created 0600 on first use) and is never logged. The
same person always gets the same pseudonym, so their rows still add up together, and
without the key nobody can tell whose they were by hashing candidate names.

Ledger rows are pseudonymised through the redaction log (:mod:`.ledger_redactions`), so
``sovereign-portal ledger verify`` still passes after an erase or a retention purge.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sqlalchemy import Engine, MetaData, Table, inspect, or_, select
from sqlalchemy.engine import Connection
from sqlalchemy.exc import OperationalError
from traitlets import Int, List, Unicode
from traitlets.config import Configurable

from . import ledger as L
from . import ledger_redactions
from .store import PortalStore

FORMAT = "sovereign-portal-export"
FORMAT_VERSION = 1
PSEUDONYM_PREFIX = "erased-"

#: table -> (columns that equal a person's name, columns that may contain it, erase action)
PORTAL_TABLES: dict[str, tuple[tuple[str, ...], tuple[str, ...], str]] = {
    "account_bindings": (("username",), (), "delete"),
    "audit_events": (("actor", "target"), ("detail",), "pseudonymise"),
    "ledger_records": (("username", "owner"), ("source", "note"), "ledger"),
    "budgets": (("owner_id", "updated_by"), (), "pseudonymise"),
    "budget_allowances": (("user", "updated_by"), (), "pseudonymise"),
    "budget_charges": (("user",), ("ref",), "pseudonymise"),
    # running totals of budget_charges: rebuilt from the pseudonymised charges
    "budget_totals": (("user",), (), "totals"),
    "courses": (("created_by", "updated_by"), ("spec",), "pseudonymise"),
    "course_staff": (("user",), (), "delete"),
    "course_roster": (("user", "updated_by"), (), "pseudonymise"),
    # class starts (hub/class_start_store.py): who pressed pre-warm, whose server was warm
    "class_windows": (("started_by",), (), "pseudonymise"),
    "class_warm": (("user",), ("reason",), "pseudonymise"),
}
#: Tables of the portal database that hold nothing about a person.
NO_PERSONAL_DATA = (
    "alembic_version",
    "ledger_chain",
    "ledger_redactions",
    "budget_periods",
    "admission_refusals",
)
#: Columns of JupyterHub's tables that are secrets: never exported.
HUB_SECRET_COLUMNS = frozenset(
    {"hashed", "prefix", "code", "encrypted_auth_state", "cookie_id", "secret", "api_token"}
)


class GDPRError(ValueError):
    """A data-subject request that cannot be done; the message names the field."""

    def __init__(self, field: str, message: str, status: int = 400) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.status = field, message, status


class GDPRPolicy(Configurable):
    """Data-subject tools: the pseudonym key, the logs to scrub, ledger retention."""

    pseudonym_key_file = Unicode(
        "gdpr-pseudonym.key",
        config=True,
        help="""File holding the secret key of the keyed hash (HMAC-SHA256) that turns an
        erased person's name into their pseudonym in the ledger, the budget rows and the
        audit log. Created with mode 0600 on first use; `configure()` puts it in the state
        directory. Keep it secret and back it up with the database: with it, the same
        person always gets the same pseudonym (their erased rows still add up); without
        it, nobody can recover whose rows they were by hashing candidate names. It is
        never logged.""",
    )
    log_files = List(
        Unicode(),
        config=True,
        help="""Glob patterns of the log files the portal writes (the hub's and the
        proxy's logs in the state directory). `gdpr erase` replaces the person's name,
        e-mail and subject in them by the pseudonym. Logs kept elsewhere (journald, a log
        server) are the operator's to purge; see the GDPR how-to.""",
    )
    ledger_retention_days = Int(
        0,
        config=True,
        help="""Ledger and budget-charge rows that ended more than this many days ago
        lose their personal fields (user, personal budget owner, server name in the
        source, notes): they are pseudonymised with the same keyed hash as an erase, and
        the hash chain still verifies. The amounts, times, partition, site and the course
        or project charged stay, so every total but the per-person one is unchanged. 0
        (the default) keeps them. Run `sovereign-portal gdpr retention` daily (a systemd
        timer or cron), which applies this setting.""",
    )


# -- the pseudonym -----------------------------------------------------------------------------
def load_key(path: str | Path, *, create: bool = True) -> bytes:
    """The pseudonym key in ``path``; a new random one (0600) when it is missing."""
    p = Path(path)
    if not p.exists():
        if not create:
            raise GDPRError("pseudonym_key_file", f"{p} does not exist")
        p.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
    key = p.read_text().strip().encode()
    if len(key) < 32:
        raise GDPRError("pseudonym_key_file", f"{p} holds no key (at least 32 characters)")
    return key


def pseudonym(key: bytes, username: str) -> str:
    return PSEUDONYM_PREFIX + hmac.new(key, username.encode(), hashlib.sha256).hexdigest()[:20]


def name_forms(names: Iterable[str]) -> list[str]:
    """Each name as it can appear in text: as is, URL-quoted (``%40``) and JSON-escaped."""
    out: list[str] = []
    for n in names:
        if not n:
            continue
        for form in (n, quote(n, safe=""), quote(n, safe="@"), json.dumps(n)[1:-1]):
            if form not in out:
                out.append(form)
    return sorted(out, key=len, reverse=True)


def replace_names(value: str, names: Mapping[str, str]) -> str:
    for k in sorted(names, key=len, reverse=True):
        value = value.replace(k, names[k])
    return value


# -- the portal database -----------------------------------------------------------------------
def _tables(conn: Connection) -> dict[str, Table]:
    md = MetaData()
    md.reflect(conn)
    return dict(md.tables)


def _json_value(v: Any) -> Any:
    if isinstance(v, datetime):
        return (v if v.tzinfo else v.replace(tzinfo=UTC)).isoformat()
    if isinstance(v, bytes):
        return None
    return v


def _row(row: Any, drop: Iterable[str] = ()) -> dict[str, Any]:
    skip = set(drop)
    return {k: _json_value(v) for k, v in row._mapping.items() if k not in skip}


def _where(t: Table, name: str, exact: tuple[str, ...], inside: tuple[str, ...]) -> Any:
    conds = [t.c[c] == name for c in exact if c in t.c]
    conds += [t.c[c].contains(name, autoescape=True) for c in inside if c in t.c]
    return or_(*conds)


def unknown_tables(conn: Connection) -> list[str]:
    """Tables of the portal database that :data:`PORTAL_TABLES` does not cover."""
    names = set(inspect(conn).get_table_names())
    return sorted(names - set(PORTAL_TABLES) - set(NO_PERSONAL_DATA))


def export_portal(store: PortalStore, username: str) -> dict[str, list[dict[str, Any]]]:
    """Every row of every personal table that names ``username``, by table."""
    out: dict[str, list[dict[str, Any]]] = {}
    with store.engine.connect() as conn:
        tables = _tables(conn)
        for name, (exact, inside, _) in sorted(PORTAL_TABLES.items()):
            t = tables.get(name)
            if t is None:
                continue
            q = select(t).where(_where(t, username, exact, inside))
            out[name] = [_row(r) for r in conn.execute(q)]
    return out


def _subjects(store: PortalStore, username: str) -> list[str]:
    with store.engine.connect() as conn:
        t = _tables(conn).get("account_bindings")
        if t is None:
            return []
        return [str(r.subject) for r in conn.execute(select(t).where(t.c.username == username))]


# -- JupyterHub's database ---------------------------------------------------------------------
def export_hub_db(conn: Connection, username: str) -> dict[str, list[dict[str, Any]]] | None:
    """The rows of JupyterHub's database about ``username``: its ``users`` row and every row
    that points at it (foreign keys, followed transitively), secrets left out; None when the
    hub has no such user."""
    tables = _tables(conn)
    users = tables.get("users")
    if users is None:
        return None
    first = conn.execute(select(users).where(users.c.name == username)).first()
    if first is None:
        return None
    found: dict[str, list[Any]] = {"users": [first]}
    keys: dict[str, dict[str, set[Any]]] = {"users": {"id": {first.id}}}
    grew = True
    while grew:
        grew = False
        for tname, t in sorted(tables.items()):
            for fk in t.foreign_keys:
                ref = fk.column.table.name
                if ref not in keys or ref == tname:
                    continue
                vals = sorted(
                    (v for v in keys[ref].get(fk.column.name) or () if v is not None), key=str
                )
                if not vals:
                    continue
                have = {tuple(r) for r in found.get(tname, [])}
                for r in conn.execute(select(t).where(fk.parent.in_(vals))):
                    if tuple(r) in have:
                        continue
                    have.add(tuple(r))
                    found.setdefault(tname, []).append(r)
                    for col in t.c:
                        keys.setdefault(tname, {}).setdefault(col.name, set()).add(
                            r._mapping[col.name]
                        )
                    grew = True
    out: dict[str, list[dict[str, Any]]] = {}
    for tname in sorted(set(found) | hub_user_tables(tables)):
        rows = [_row(r, HUB_SECRET_COLUMNS) for r in found.get(tname, [])]
        for d in rows:  # name the groups and roles a mapping row points at
            for fk in tables[tname].foreign_keys:
                target = fk.column.table
                if fk.parent.name in d and "name" in target.c and target.name != "users":
                    row = conn.execute(
                        select(target.c.name).where(fk.column == d[fk.parent.name])
                    ).first()
                    d[f"{fk.parent.name}__name"] = row.name if row is not None else None
        out[tname] = rows
    return out


def hub_user_tables(tables: Mapping[str, Table]) -> set[str]:
    """The tables of JupyterHub's schema that point at ``users`` (directly or through
    another such table)."""
    got = {"users"}
    grew = True
    while grew:
        grew = False
        for name, t in tables.items():
            if name not in got and any(fk.column.table.name in got for fk in t.foreign_keys):
                got.add(name)
                grew = True
    return got


# -- the archive -------------------------------------------------------------------------------
def archive(
    username: str,
    *,
    portal: Mapping[str, Any],
    hub: Mapping[str, Any] | None,
    hub_user: Mapping[str, Any] | None = None,
    files: Iterable[Mapping[str, Any]] = (),
    now: float | None = None,
) -> dict[str, Any]:
    """The one JSON document of an export (docs/reference/gdpr-export.md)."""
    ledger = portal.get("ledger_records", [])
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "user": username,
        "generated_at": datetime.fromtimestamp(now or time.time(), UTC).isoformat(),
        "summary": {
            "ledger_records": len(ledger),
            "servers": sum(1 for r in ledger if str(r.get("source", "")).startswith("server:")),
            "sessions": sum(1 for r in ledger if str(r.get("source", "")).startswith("grant:")),
            "gpu_seconds": round(sum(float(r.get("gpu_seconds") or 0) for r in ledger), 3),
            "eur": round(sum(float(r.get("eur") or 0) for r in ledger), 6),
        },
        "hub_user": dict(hub_user) if hub_user is not None else None,
        "hub_database": dict(hub) if hub is not None else None,
        "portal_database": dict(portal),
        "files": list(files),
    }


def portal_files(home: Path | None) -> list[dict[str, Any]]:
    """The portal's files in a home (``~/.sovereign-portal``): paths and sizes, not contents
    (they are the person's own logs and token files)."""
    if home is None:
        return []
    root = home / ".sovereign-portal"
    out = []
    if root.is_dir():
        for p in sorted(root.rglob("*")):
            if p.is_file():
                rel = p.relative_to(home)
                out.append({"path": f"~/{rel}", "bytes": p.stat().st_size})
    return out


# -- erase -------------------------------------------------------------------------------------
@dataclass
class Receipt:
    """What an erase did, step by step; printed, and kept (counts only) in the audit log."""

    pseudonym: str
    steps: list[dict[str, Any]] = field(default_factory=list)

    def add(self, step: str, **detail: Any) -> None:
        self.steps.append({"step": step, **detail})

    def to_json(self) -> dict[str, Any]:
        return {"pseudonym": self.pseudonym, "steps": self.steps}


def erase_portal(
    store: PortalStore,
    username: str,
    key: bytes,
    *,
    also: Iterable[str] = (),
    actor: str,
    now: float | None = None,
) -> dict[str, int]:
    """Erase ``username`` from the portal database in one transaction: delete identity
    rows, pseudonymise billing and audit rows (ledger rows through the redaction log).
    ``also`` are other identifiers of the person to replace (e-mail, IdP subject).
    Returns rows changed per table."""
    t0 = time.time() if now is None else now
    pseud = pseudonym(key, username)
    idents = [username, *_subjects(store, username), *also]
    names = dict.fromkeys(name_forms(idents), pseud)
    counts: dict[str, int] = {}
    with store.engine.begin() as conn:
        if conn.dialect.name == "sqlite":
            conn.exec_driver_sql("PRAGMA secure_delete=ON")
        tables = _tables(conn)
        missing = unknown_tables(conn)
        if missing:
            raise GDPRError(
                "database",
                f"tables {', '.join(missing)} are not covered by the GDPR tools "
                "(hub/gdpr.py PORTAL_TABLES): nothing was erased",
            )
        ledger_redactions.lock(conn)
        if "budget_totals" in tables:  # the budget locks first, as every settle takes them
            from .budget_store import lock_budgets_of

            lock_budgets_of(conn, [n for n in idents if n])
        for tname, (exact, inside, action) in sorted(PORTAL_TABLES.items()):
            t = tables.get(tname)
            if t is None:
                continue
            conds = [_where(t, n, exact, inside) for n in idents if n]
            if not conds:
                continue
            rows = list(conn.execute(select(t).where(or_(*conds))))
            if action == "delete":
                pk = list(t.primary_key.columns)
                for r in rows:
                    conn.execute(t.delete().where(*[c == r._mapping[c.name] for c in pk]))
            elif action == "ledger":
                from .ledger_store import from_row

                for r in rows:
                    ledger_redactions.redact(conn, from_row(r), names, reason="erase", now=t0)
            elif action == "totals":  # after budget_charges (sorted): sum them again
                from .budget_store import rebuild_totals

                rebuild_totals(conn, {r._mapping["budget_id"] for r in rows})
            else:
                pk = list(t.primary_key.columns)
                for r in rows:
                    values: dict[str, Any] = {}
                    for c in exact:
                        if c in t.c and r._mapping[c] in idents:
                            values[c] = pseud
                    for c in inside:
                        if c in t.c and isinstance(r._mapping[c], str):
                            values[c] = replace_names(r._mapping[c], names)
                    if values:
                        conn.execute(
                            t.update()
                            .where(*[c == r._mapping[c.name] for c in pk])
                            .values(**values)
                        )
            counts[tname] = len(rows)
        audit = tables["audit_events"]
        conn.execute(
            audit.insert().values(
                at=datetime.fromtimestamp(t0, UTC).replace(tzinfo=None)
                if conn.dialect.name == "sqlite"
                else datetime.fromtimestamp(t0, UTC),
                actor=actor,
                action="gdpr_erase",
                target=pseud,
                detail=json.dumps({"rows": counts}),
            )
        )
    return counts


def open_records(store: PortalStore, username: str) -> list[L.Record]:
    """The user's ledger records that are still open (running servers and sessions)."""
    from .ledger_store import from_row, records

    with store.engine.connect() as conn:
        q = select(records).where(records.c.username == username, records.c.ended_at.is_(None))
        return [from_row(r) for r in conn.execute(q)]


def retention(
    store: PortalStore, key: bytes, days: int, *, now: float | None = None
) -> dict[str, int]:
    """Pseudonymise the personal fields of ledger rows and budget charges that ended more
    than ``days`` days ago; rows changed per table."""
    from .ledger_store import from_row, records

    if days <= 0:
        raise GDPRError("ledger_retention_days", f"must be a positive number of days, got {days}")
    t0 = time.time() if now is None else now
    cutoff = t0 - days * 86400
    counts = {"ledger_records": 0, "budget_charges": 0}
    with store.engine.begin() as conn:
        ledger_redactions.lock(conn)
        q = select(records).where(
            records.c.ended_at.is_not(None),
            records.c.ended_at < cutoff,
            ~records.c.username.startswith(PSEUDONYM_PREFIX),
        )
        for r in list(conn.execute(q)):
            rec = from_row(r)
            names = {rec.user: pseudonym(key, rec.user)}
            if ledger_redactions.redact(conn, rec, names, reason="retention", now=t0):
                counts["ledger_records"] += 1
        charges = _tables(conn).get("budget_charges")
        if charges is not None:
            cut = datetime.fromtimestamp(cutoff, UTC)
            if conn.dialect.name == "sqlite":
                cut = cut.replace(tzinfo=None)
            q2 = select(charges).where(
                charges.c.closed_at.is_not(None),
                charges.c.closed_at < cut,
                ~charges.c.user.startswith(PSEUDONYM_PREFIX),
            )
            renamed = set()
            for r in list(conn.execute(q2)):
                p = pseudonym(key, r.user)
                conn.execute(
                    charges.update()
                    .where(charges.c.id == r.id)
                    .values(user=p, ref=replace_names(r.ref, {f"server:{r.user}/": f"server:{p}/"}))
                )
                counts["budget_charges"] += 1
                renamed.add(r.budget_id)
            if renamed and "budget_totals" in _tables(conn):
                from .budget_store import rebuild_totals

                rebuild_totals(conn, renamed)  # the users' running totals follow their charges
    return counts


# -- files and SQLite files --------------------------------------------------------------------
def scrub_file(path: Path, names: Mapping[str, str]) -> int:
    """Replace the names in one text file, in place (same inode: a process appending to it
    keeps appending); occurrences replaced."""
    data = path.read_bytes()
    n = 0
    for k in sorted(names, key=len, reverse=True):
        b = k.encode()
        c = data.count(b)
        if c:
            data = data.replace(b, names[k].encode())
            n += c
    if n:
        with open(path, "r+b") as f:
            f.write(data)
            f.truncate()
    return n


_SQLITE_URL = re.compile(r"^sqlite(\+\w+)?:///(?P<path>.+)$")


def sqlite_path(url: str) -> Path | None:
    m = _SQLITE_URL.match(url)
    return Path(m.group("path")) if m and m.group("path") != ":memory:" else None


def compact_sqlite(engine: Engine, attempts: int = 20) -> bool:
    """Rewrite a SQLite database so deleted rows leave no trace in free pages or the WAL
    (VACUUM, then a truncating WAL checkpoint); False if other connections kept it busy."""
    for _ in range(attempts):
        if _compact_once(engine):
            return True
        time.sleep(0.25)
    return False


def _compact_once(engine: Engine) -> bool:
    import sqlite3

    try:
        with engine.connect() as conn:
            raw = conn.connection.dbapi_connection
            assert raw is not None
            raw.isolation_level = None  # VACUUM runs outside a transaction
            cur = raw.cursor()
            cur.execute("VACUUM")
            busy = cur.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            cur.close()
    except (sqlite3.OperationalError, OperationalError):  # locked while the hub writes
        return False
    return not busy or busy[0] == 0


def sqlite_engine(path: Path) -> Engine:
    from sqlalchemy import create_engine

    return create_engine(f"sqlite:///{path}", connect_args={"timeout": 10})
