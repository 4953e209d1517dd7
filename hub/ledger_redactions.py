"""The ledger's redaction log: how a chained row can lose a person's name and still verify.

The ledger is append-only and hash-chained (:mod:`.ledger`): a closed row's ``hash`` covers
its fields, and the next row's ``prev_hash`` is that hash. The GDPR erase and the retention
purge (:mod:`.gdpr`) must nevertheless remove the person's identity from old rows. They do
it like this:

1. the row's personal fields (:data:`.ledger.PERSONAL_FIELDS`) are rewritten with a keyed
   pseudonym (:func:`.gdpr.pseudonym`); amounts, rates, times, partition, site and the
   course or project it charged are not touched, so every total but the per-person one is
   unchanged;
2. the row keeps its original ``hash`` (the next row's link still holds);
3. one entry is appended to ``ledger_redactions`` (Alembic revision 0004): the row's id and
   ``seq``, its original hash, the hash of its redacted fields (:func:`.ledger.record_hash`
   over the new fields and the same ``prev_hash``), why (``erase`` or ``retention``) and
   when. The entries form a hash chain of their own (``prev_hash``/``hash``), so removing
   or editing one shows.

``ledger verify`` (:meth:`.ledger_store.LedgerStore.verify`) then accepts a row whose fields
match either its own hash or, for a redacted row, the redacted hash its newest log entry
names; anything else still breaks the chain. No entry holds a name: only hashes, ids and
the reason.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Column, Double, Integer, MetaData, String, Table, select, update
from sqlalchemy.engine import Connection

from . import ledger as L

metadata = MetaData()

redactions = Table(
    "ledger_redactions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("record_id", String(32), nullable=False),
    Column("record_seq", Integer),
    Column("original_hash", String(64)),
    Column("redacted_hash", String(64)),
    Column("reason", String(16), nullable=False),
    Column("at", Double, nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
)

REASONS = ("erase", "retention")
_ENTRY_FIELDS = ("record_id", "record_seq", "original_hash", "redacted_hash", "reason", "at")


def entry_hash(entry: Mapping[str, Any], prev_hash: str) -> str:
    data = {k: entry[k] for k in _ENTRY_FIELDS}
    data["prev_hash"] = prev_hash
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def present(conn: Connection) -> bool:
    from sqlalchemy import inspect

    return bool(inspect(conn).has_table("ledger_redactions"))


def load(conn: Connection) -> dict[str, tuple[str, str]]:
    """record id -> (original hash, redacted hash) of its newest redaction (chained rows)."""
    if not present(conn):
        return {}
    out: dict[str, tuple[str, str]] = {}
    q = select(redactions).where(redactions.c.original_hash.is_not(None))
    for row in conn.execute(q.order_by(redactions.c.id)):
        out[str(row.record_id)] = (str(row.original_hash), str(row.redacted_hash))
    return out


@dataclass(frozen=True)
class LogBreak:
    entry: int
    why: str

    def __str__(self) -> str:
        return f"redaction log entry {self.entry}: {self.why}"


def verify_log(conn: Connection) -> LogBreak | None:
    """The first broken link of the redaction log's own chain, or None."""
    if not present(conn):
        return None
    prev = L.GENESIS
    for row in conn.execute(select(redactions).order_by(redactions.c.id)):
        m = dict(row._mapping)
        if m["prev_hash"] != prev:
            return LogBreak(int(m["id"]), "its prev_hash is not the previous entry's hash")
        if m["hash"] != entry_hash(m, prev):
            return LogBreak(int(m["id"]), "its fields do not match its hash: it was changed")
        prev = str(m["hash"])
    return None


def _last_hash(conn: Connection) -> str:
    row = conn.execute(select(redactions.c.hash).order_by(redactions.c.id.desc()).limit(1)).first()
    return str(row.hash) if row is not None else L.GENESIS


def redact(
    conn: Connection, rec: L.Record, names: Mapping[str, str], *, reason: str, now: float
) -> bool:
    """Pseudonymise one record's personal fields in place (in ``conn``'s transaction) and
    log it; False when nothing in it names the person.

    The caller holds the ledger's write lock (the chain head row; :func:`lock`).
    """
    from .ledger_store import records, to_row

    if reason not in REASONS:
        raise L.LedgerError(f"reason: must be one of {', '.join(REASONS)}")
    new = L.pseudonymised(rec, names)
    if new == rec:
        return False
    row = to_row(new)
    values = {k: row[k] for k in ("username", "owner", "source", "note")}
    conn.execute(update(records).where(records.c.id == rec.id).values(**values))
    entry: dict[str, Any] = {
        "record_id": rec.id,
        "record_seq": rec.seq,
        "original_hash": rec.hash,
        "redacted_hash": (
            L.record_hash(new, rec.prev_hash) if rec.hash and rec.prev_hash else None
        ),
        "reason": reason,
        "at": round(now, 3),
    }
    prev = _last_hash(conn)
    conn.execute(redactions.insert().values(**entry, prev_hash=prev, hash=entry_hash(entry, prev)))
    return True


def lock(conn: Connection) -> None:
    """Take the ledger's write lock for a redaction: the chain head row (PostgreSQL row
    lock; SQLite transactions are ``BEGIN IMMEDIATE`` already)."""
    from .ledger_store import chain_head

    q = select(chain_head.c.seq).where(chain_head.c.id == 1)
    if conn.dialect.name == "postgresql":
        q = q.with_for_update()
    conn.execute(q)
