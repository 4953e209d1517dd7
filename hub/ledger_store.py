"""The ledger's store: records of :mod:`.ledger` in the portal database (:mod:`.store`).

Thin I/O around the pure core. Every change is one transaction:

- :meth:`LedgerStore.open` inserts an open record; :meth:`~LedgerStore.attach` adds job ids,
  nodes and the start time to an open one (a closed one is refused);
- :meth:`~LedgerStore.close` closes a record and places it in the hash chain. It is
  idempotent: closing a closed record returns it as it is (the first close wins). The chain
  head (``ledger_chain``, one row) is advanced first in the transaction, which takes the
  write lock on SQLite (``BEGIN IMMEDIATE``) and a row lock on PostgreSQL, so concurrent
  closes get consecutive numbers;
- :meth:`~LedgerStore.adjust` appends an adjustment row, closed and chained at once;
- :meth:`~LedgerStore.verify` walks the closed rows in chain order, in batches;
- :meth:`~LedgerStore.usage` sums closed rows, filtered and grouped in SQL.

SQLite and PostgreSQL, through SQLAlchemy 2 Core; the schema is Alembic revision 0002.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import (
    Column,
    Double,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    and_,
    case,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Connection

from . import ledger as L
from .store import PortalStore

metadata = MetaData()

#: The record's fields and their columns (``user`` is ``username``: a reserved word in SQL).
records = Table(
    "ledger_records",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("seq", Integer, unique=True),
    Column("row_type", String(16), nullable=False),
    Column("username", String(255), nullable=False),
    Column("role", String(32), nullable=False),
    Column("owner_type", String(16), nullable=False),
    Column("owner", String(255), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("size", String(64), nullable=False),
    Column("accelerator", String(16), nullable=False),
    Column("slice", String(32), nullable=False),
    Column("gpus", Integer, nullable=False),
    Column("count", Integer, nullable=False),
    Column("image", String(128), nullable=False),
    Column("walltime_minutes", Integer, nullable=False),
    Column("partition", String(64), nullable=False),
    Column("site", String(128), nullable=False),
    Column("nodes", Text, nullable=False),
    Column("country", String(2), nullable=False),
    Column("operator", String(128), nullable=False),
    Column("job_ids", Text, nullable=False),
    Column("source", String(255), nullable=False),
    Column("opened_at", Double, nullable=False),
    Column("started_at", Double),
    Column("ended_at", Double),
    Column("end_reason", String(16)),
    Column("rate_gpu_equivalents", Double, nullable=False),
    Column("rate_eur_per_hour", Double, nullable=False),
    Column("rate_power_w", Double, nullable=False),
    Column("rate_carbon_g_per_kwh", Double, nullable=False),
    Column("gpu_seconds", Double),
    Column("eur", Double),
    Column("energy_wh", Double),
    Column("co2_g", Double),
    Column("gpu_seconds_basis", String(16)),
    Column("eur_basis", String(16)),
    Column("energy_basis", String(16)),
    Column("co2_basis", String(16)),
    Column("corrects", String(32), nullable=False),
    Column("note", Text, nullable=False),
    Column("prev_hash", String(64)),
    Column("hash", String(64)),
)
chain_head = Table(
    "ledger_chain",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("seq", Integer, nullable=False),
    Column("hash", String(64), nullable=False),
)

#: ``usage`` may group by these (record fields; ``course``/``project`` are budget owners).
GROUP_BY = (
    "user",
    "owner",
    "course",
    "project",
    "partition",
    "country",
    "kind",
    "site",
    "month",
    "day",
)


def to_row(rec: L.Record) -> dict[str, Any]:
    row = L.record_json(rec)
    row["username"] = row.pop("user")
    row["job_ids"] = ",".join(rec.job_ids)
    return row


def from_row(row: Any) -> L.Record:
    data = dict(row._mapping)
    data["user"] = data.pop("username")
    return L.from_mapping(data)


@dataclass(frozen=True)
class UsageFilter:
    """Which closed rows a usage query sums (all fields optional; times are epoch seconds,
    on the end time: ``since <= ended_at < until``)."""

    user: str | None = None
    course: str | None = None
    project: str | None = None
    partition: str | None = None
    country: str | None = None
    since: float | None = None
    until: float | None = None

    def where(self, include_open: bool = False) -> list[Any]:
        """The SQL conditions; ``include_open`` also matches open rows (whatever the times)."""
        c = records.c
        out: list[Any] = [] if include_open else [c.ended_at.is_not(None)]
        if self.user is not None:
            out.append(c.username == self.user)
        if self.course is not None:
            out.append(and_(c.owner_type == "course", c.owner == self.course))
        if self.project is not None:
            out.append(and_(c.owner_type == "project", c.owner == self.project))
        if self.partition is not None:
            out.append(c.partition == self.partition)
        if self.country is not None:
            out.append(c.country == self.country)
        span = []
        if self.since is not None:
            span.append(c.ended_at >= self.since)
        if self.until is not None:
            span.append(c.ended_at < self.until)
        if span and include_open:
            out.append(or_(c.ended_at.is_(None), and_(*span)))
        else:
            out.extend(span)
        return out


class LedgerStore:
    """The ledger in one portal database."""

    def __init__(self, store: PortalStore) -> None:
        self.store = store
        self.engine = store.engine

    # -- records -------------------------------------------------------------------------
    def open(self, rec: L.Record) -> L.Record:
        """Insert an open record (a usage row, not yet closed)."""
        if rec.closed or rec.row_type != "usage":
            raise L.LedgerError("open: only an open usage record can be opened")
        with self.engine.begin() as conn:
            conn.execute(records.insert().values(**to_row(rec)))
        return rec

    def get(self, record_id: str, conn: Connection | None = None) -> L.Record | None:
        q = select(records).where(records.c.id == record_id)
        if conn is not None:
            row = conn.execute(q).first()
        else:
            with self.engine.connect() as c:
                row = c.execute(q).first()
        return from_row(row) if row is not None else None

    def attach(
        self,
        record_id: str,
        *,
        job_ids: Iterable[str] = (),
        nodes: str | None = None,
        started_at: float | None = None,
    ) -> L.Record:
        """Add job ids, nodes or the start to an open record (refused once it is closed)."""
        with self.engine.begin() as conn:
            rec = self._locked(conn, record_id)
            new = L.attach(rec, job_ids=job_ids, nodes=nodes, started_at=started_at)
            conn.execute(
                update(records)
                .where(records.c.id == record_id, records.c.ended_at.is_(None))
                .values(job_ids=",".join(new.job_ids), nodes=new.nodes, started_at=new.started_at)
            )
        return new

    def _locked(self, conn: Connection, record_id: str) -> L.Record:
        q = select(records).where(records.c.id == record_id)
        if conn.dialect.name == "postgresql":
            q = q.with_for_update()
        row = conn.execute(q).first()
        if row is None:
            raise L.LedgerError(f"record {record_id!r}: no such record")
        return from_row(row)

    def close(
        self,
        record_id: str,
        *,
        reason: str,
        ended_at: float | None = None,
        time_basis: str = "measured",
    ) -> L.Record:
        """Close an open record and chain it; a closed record is returned unchanged."""
        end = time.time() if ended_at is None else ended_at
        with self.engine.begin() as conn:
            rec = self._locked(conn, record_id)
            if rec.closed:
                return rec
            from .activity_store import pending

            # measured energy and the culler's mark, kept on the open row (activity_store)
            p = pending(conn, record_id)
            if p.reclaimed and reason in ("stopped", "scancel"):
                reason = "reclaimed"
            energy = None
            if p.energy_wh is not None and p.energy_basis and p.co2_basis:
                energy = (float(p.energy_wh), float(p.co2_g or 0.0), p.energy_basis, p.co2_basis)
            done = L.close(rec, ended_at=end, reason=reason, time_basis=time_basis, energy=energy)
            placed = self._chain(conn, done)
            # only what closing sets: an unchanged indexed column costs no index write
            row = to_row(placed)
            was = to_row(rec)
            changed = {k: v for k, v in row.items() if k != "id" and v != was.get(k)}
            conn.execute(update(records).where(records.c.id == record_id).values(**changed))
        return placed

    def _chain(self, conn: Connection, rec: L.Record) -> L.Record:
        head = conn.execute(
            update(chain_head)
            .where(chain_head.c.id == 1)
            .values(seq=chain_head.c.seq + 1)
            .returning(chain_head.c.seq, chain_head.c.hash)
        ).first()
        if head is None:
            raise L.LedgerError("ledger_chain has no head row: run the migrations")
        placed = L.chain(rec, int(head.seq), str(head.hash))
        conn.execute(update(chain_head).where(chain_head.c.id == 1).values(hash=placed.hash))
        return placed

    def adjust(self, record_id: str, delta: L.Amounts, *, note: str) -> L.Record:
        """Append a correction of a closed record (a new chained row; the old one stays)."""
        with self.engine.begin() as conn:
            rec = self._locked(conn, record_id)
            fix = L.adjustment(rec, delta, note=note, now=time.time())
            placed = self._chain(conn, fix)
            conn.execute(records.insert().values(**to_row(placed)))
        return placed

    def list_open(self, source_prefix: str | None = None) -> list[L.Record]:
        q = select(records).where(records.c.ended_at.is_(None))
        if source_prefix:
            q = q.where(records.c.source.startswith(source_prefix, autoescape=True))
        with self.engine.connect() as conn:
            return [from_row(r) for r in conn.execute(q.order_by(records.c.opened_at))]

    def open_for(self, source: str) -> L.Record | None:
        """The open record of ``source`` (e.g. ``server:ada/``), if any."""
        q = (
            select(records)
            .where(records.c.source == source, records.c.ended_at.is_(None))
            .order_by(records.c.opened_at.desc())
        )
        with self.engine.connect() as conn:
            row = conn.execute(q).first()
        return from_row(row) if row is not None else None

    # -- the chain -------------------------------------------------------------------------
    def chained(self, batch: int = 5000) -> Iterator[L.Record]:
        """Every chained row, in chain order, read in batches."""
        last = 0
        while True:
            q = select(records).where(records.c.seq > last).order_by(records.c.seq).limit(batch)
            with self.engine.connect() as conn:
                rows = [from_row(r) for r in conn.execute(q)]
            yield from rows
            if len(rows) < batch:
                return
            last = rows[-1].seq or last

    def verify(self) -> tuple[int, L.Break | None]:
        """(rows checked, the first broken link or None); the head must match the last row."""
        n = 0
        last: L.Record | None = None

        def walk() -> Iterator[L.Record]:
            nonlocal n, last
            for rec in self.chained():
                n += 1
                last = rec
                yield rec

        from . import ledger_redactions

        with self.engine.connect() as conn:  # redacted rows verify against the redaction log
            redacted = ledger_redactions.load(conn)
            log_break = ledger_redactions.verify_log(conn)
        found = L.verify(walk(), redacted)
        if found is not None:
            return n, found
        if log_break is not None:
            return n, L.Break(None, "ledger_redactions", str(log_break))
        with self.engine.connect() as conn:
            head = conn.execute(select(chain_head).where(chain_head.c.id == 1)).first()
            unchained = conn.execute(
                select(records.c.id).where(records.c.ended_at.is_not(None), records.c.seq.is_(None))
            ).first()
        if head is None:
            return n, L.Break(None, "ledger_chain", "the chain head row is missing")
        if unchained is not None:
            return n, L.Break(None, str(unchained.id), "a closed row is not in the chain")
        want = (last.seq, last.hash) if last is not None else (0, L.GENESIS)
        if (head.seq, head.hash) != want:
            return n, L.Break(
                head.seq, "ledger_chain", "the chain head does not match the last row: rows removed"
            )
        return n, None

    # -- totals ----------------------------------------------------------------------------
    def usage(
        self, flt: UsageFilter | None = None, by: Sequence[str] = ("user",)
    ) -> list[dict[str, Any]]:
        """Sums of closed rows (adjustments included), grouped; one dict per group."""
        flt = flt or UsageFilter()
        c = records.c
        cols: list[Any] = []
        for key in by:
            if key not in GROUP_BY:
                raise L.LedgerError(
                    f"group by: unknown field {key!r}; allowed: {', '.join(GROUP_BY)}"
                )
            cols.append(self._group_col(key).label(key))
        est = func.sum(case((c.gpu_seconds_basis == "estimated", 1), else_=0))
        est_energy = func.sum(case((c.energy_basis == "estimated", 1), else_=0))
        q = (
            select(
                *cols,
                func.count().label("records"),
                func.coalesce(func.sum(c.gpu_seconds), 0.0).label("gpu_seconds"),
                func.coalesce(func.sum(c.eur), 0.0).label("eur"),
                func.coalesce(func.sum(c.energy_wh), 0.0).label("energy_wh"),
                func.coalesce(func.sum(c.co2_g), 0.0).label("co2_g"),
                func.coalesce(est, 0).label("estimated_time_records"),
                func.coalesce(est_energy, 0).label("estimated_energy_records"),
            )
            .where(*flt.where())
            .group_by(*cols)
            .order_by(*cols)
        )
        with self.engine.connect() as conn:
            out = []
            for row in conn.execute(q):
                d = dict(row._mapping)
                d["gpu_hours"] = round(float(d["gpu_seconds"]) / 3600, 6)
                for k in ("gpu_seconds", "eur", "energy_wh", "co2_g"):
                    d[k] = round(float(d[k]), 6)
                d["records"] = int(d["records"])
                d["estimated_time_records"] = int(d["estimated_time_records"])
                d["estimated_energy_records"] = int(d["estimated_energy_records"])
                out.append(d)
        return out

    def rows(
        self, flt: UsageFilter | None = None, *, include_open: bool = True, limit: int = 200
    ) -> tuple[list[L.Record], int]:
        """The rows a usage query covers (and, with ``include_open``, the open ones), newest
        first, at most ``limit`` of them; with the number of all matching rows."""
        flt = flt or UsageFilter()
        where = flt.where(include_open=include_open)
        newest = func.coalesce(records.c.ended_at, records.c.opened_at).desc()
        q = select(records).where(*where).order_by(newest, records.c.id).limit(max(0, limit))
        with self.engine.connect() as conn:
            n = conn.execute(select(func.count()).select_from(records).where(*where)).scalar()
            return [from_row(r) for r in conn.execute(q)], int(n or 0)

    def _group_col(self, key: str) -> Any:
        c = records.c
        if key == "user":
            return c.username
        if key in ("course", "project"):
            return case((c.owner_type == key, c.owner), else_="")
        if key in ("month", "day"):  # of the end time, in UTC
            pg, lite = {"month": ("YYYY-MM", "%Y-%m"), "day": ("YYYY-MM-DD", "%Y-%m-%d")}[key]
            if self.engine.dialect.name == "postgresql":
                return func.to_char(func.timezone("UTC", func.to_timestamp(c.ended_at)), pg)
            return func.strftime(lite, c.ended_at, "unixepoch")
        return c[key]

    def balance(self, owner_type: str, owner: str, since: float | None = None) -> L.Amounts:
        """What an owner's closed rows add up to (since ``since``): the admission query."""
        c = records.c
        where = [c.owner_type == owner_type, c.owner == owner, c.ended_at.is_not(None)]
        if since is not None:
            where.append(c.ended_at >= since)
        q = select(
            func.coalesce(func.sum(c.gpu_seconds), 0.0),
            func.coalesce(func.sum(c.eur), 0.0),
            func.coalesce(func.sum(c.energy_wh), 0.0),
            func.coalesce(func.sum(c.co2_g), 0.0),
        ).where(*where)
        with self.engine.connect() as conn:
            row = conn.execute(q).one()
        return L.Amounts(
            gpu_seconds=float(row[0]),
            eur=float(row[1]),
            energy_wh=float(row[2]),
            co2_g=float(row[3]),
        )


def amounts_json(a: L.Amounts) -> dict[str, Any]:
    return asdict(a)
