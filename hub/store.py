"""The portal's own database: SQLAlchemy 2 tables and Alembic migrations.

The portal keeps its records (account bindings, the audit log, and the ledger that builds on
them) in a database of its own, separate from JupyterHub's. The embedded default is SQLite in
WAL mode in the state directory (``sovereign-portal up`` needs no setup), with a busy timeout,
foreign keys on, and every transaction opened with ``BEGIN IMMEDIATE`` (writers queue instead
of failing). PostgreSQL is the production option. The code is engine-agnostic: only the URL changes.

- :class:`PortalDatabase` is the traitlets side: ``c.PortalDatabase.url``. Every part of the
  portal that needs the database builds ``PortalDatabase(parent=self)``, so one config section
  serves the authenticator, the CLI and the services.
- :class:`PortalStore` is the engine side: ``upgrade()`` brings the schema to the newest
  Alembic revision (the migrations ship inside the package, ``hub/migrations``), ``begin()``
  gives a session in a transaction that commits on success and rolls back on error.

Table definitions live here, on one :class:`Base`; a migration never imports them (each
revision spells out its own DDL, so an old revision stays what it was when it shipped).
"""

from __future__ import annotations

import json
import logging
import select
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    DateTime,
    Engine,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    create_engine,
    event,
    inspect,
)
from sqlalchemy.engine import Connection, Dialect, make_url
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from traitlets import Bool, Unicode, validate
from traitlets.config import Configurable

log = logging.getLogger("sovereign_portal.store")

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 5000
#: A pooled server connection (PostgreSQL) idle longer than this is pinged before use.
PING_IDLE_SECONDS = 10.0
#: The execution option that marks a read-only transaction (:meth:`PortalStore.read`).
READ_ONLY = "portal_read_only"


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every engine (SQLite stores no zone: UTC is implied)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("UTCDateTime needs a timezone-aware datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    """The declarative base of every portal table."""


class AccountBinding(Base):
    """A hub user name bound to the one IdP subject (``iss``, ``sub``) that may use it."""

    __tablename__ = "account_bindings"

    username: Mapped[str] = mapped_column(String(255), primary_key=True)
    issuer: Mapped[str] = mapped_column(String(1024))
    subject: Mapped[str] = mapped_column(String(255))
    bound_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())

    __table_args__ = (Index("ix_account_bindings_issuer_subject", "issuer", "subject"),)


class AuditEvent(Base):
    """One operator action (who, what, on what, why), append-only."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    actor: Mapped[str] = mapped_column(String(255))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(255))
    detail: Mapped[str] = mapped_column(Text, default="{}", server_default="{}")

    __table_args__ = (Index("ix_audit_events_target", "target"),)

    @property
    def details(self) -> dict[str, Any]:
        data = json.loads(self.detail or "{}")
        return data if isinstance(data, dict) else {}


def sqlite_file_in_wal(path: Path) -> None:
    """Put the SQLite database at ``path`` in WAL mode (created if missing, with its folder).

    For the hub's own database (``jupyterhub.sqlite``), which JupyterHub opens in SQLite's
    default rollback-journal mode: every commit there costs about four disk flushes,
    inside the hub's event loop (3.3 ms a commit on this project's test machine, against
    0.9 ms in WAL mode with the same ``synchronous=FULL``), and a login makes several.
    WAL mode is kept in the file itself, so JupyterHub's own connections get it without
    any hook of theirs; durability is unchanged (``synchronous`` stays FULL)."""
    import sqlite3

    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    try:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    finally:
        conn.close()
    if str(mode).lower() != "wal":
        raise RuntimeError(f"{path}: SQLite refused WAL mode (journal_mode is {mode})")


def _sqlite_pragmas(dbapi_connection: Any, connection_record: Any) -> None:
    # Let SQLAlchemy, not the driver, open transactions (see _sqlite_begin).
    dbapi_connection.isolation_level = None
    cur = dbapi_connection.cursor()
    try:
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA foreign_keys=ON")
    finally:
        cur.close()


def _sqlite_begin(connection: Any) -> None:
    # BEGIN IMMEDIATE takes SQLite's write lock at the start of each transaction. Two writers
    # then queue on busy_timeout instead of one failing at once with "database is locked"
    # (a deferred BEGIN that reads, then writes, cannot wait); DDL (migrations) becomes
    # transactional too. A read-only transaction (PortalStore.read) begins deferred, takes
    # no write lock (WAL readers never wait for a writer), and SQLite refuses any write in
    # it (query_only), so it can never become the writer that cannot wait.
    if connection.get_execution_options().get(READ_ONLY):
        connection.exec_driver_sql("BEGIN")
        connection.exec_driver_sql("PRAGMA query_only = ON")
    else:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def _sqlite_end(connection: Any) -> None:
    # before the COMMIT or ROLLBACK of a read-only transaction: the pooled connection
    # goes back able to write
    if connection.get_execution_options().get(READ_ONLY):
        connection.exec_driver_sql("PRAGMA query_only = OFF")


def _socket_stirs(dbapi_connection: Any) -> bool:
    """Whether an idle server connection's socket has something to read: a closed or
    reset connection (the server restarted, or ended the session), or a message sent
    while it was idle. True when the driver has no socket to look at."""
    try:
        fd = dbapi_connection.fileno()
    except Exception:  # no socket (closed), or a driver without fileno()
        return True
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLERR | select.POLLHUP)
    return bool(poller.poll(0))


class _Liveness:
    """Pool events that check a server connection before it is handed out, instead of
    ``pool_pre_ping``'s round trip on every checkout: a connection used less than
    :data:`PING_IDLE_SECONDS` ago is pinged only if its socket stirs (a server that
    restarted or closed the session leaves data or an end-of-file there, seen without
    a round trip); one idle longer is always pinged. A ping that finds the connection
    gone raises ``DisconnectionError``: the pool drops it and hands out a fresh one, as
    with pre-ping."""

    def __init__(self, engine: Engine) -> None:
        self.dialect = engine.dialect
        self.pings = 0
        event.listen(engine, "connect", self.connect)
        event.listen(engine, "checkin", self.checkin)
        event.listen(engine, "checkout", self.checkout)

    def connect(self, dbapi_connection: Any, record: Any) -> None:
        record.info["sp_idle_since"] = None  # new: nothing to check

    def checkin(self, dbapi_connection: Any, record: Any) -> None:
        if dbapi_connection is not None:
            record.info["sp_idle_since"] = time.monotonic()

    def checkout(self, dbapi_connection: Any, record: Any, proxy: Any) -> None:
        since = record.info.get("sp_idle_since")
        if since is None:
            return
        if time.monotonic() - since <= PING_IDLE_SECONDS and not _socket_stirs(dbapi_connection):
            return
        self.pings += 1
        try:
            alive = self.dialect.do_ping(dbapi_connection)
        except self.dialect.loaded_dbapi.Error as e:
            if self.dialect.is_disconnect(e, dbapi_connection, None):
                raise DisconnectionError(str(e)) from e
            raise
        if not alive:
            raise DisconnectionError("the database connection did not answer a ping")


def redact_url(url: str) -> str:
    """The URL with any password hidden, for logs and error messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparsable database URL>"


class PortalStore:
    """An engine on the portal database, with its migrations and session helpers."""

    def __init__(self, url: str, *, echo: bool = False) -> None:
        self.url = url
        parsed = make_url(url)
        self.engine: Engine = create_engine(url, echo=echo)
        #: the server connections' check before use (None on SQLite: no server)
        self.liveness: _Liveness | None = None
        if parsed.get_backend_name() == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
            event.listen(self.engine, "begin", _sqlite_begin)
            event.listen(self.engine, "commit", _sqlite_end)
            event.listen(self.engine, "rollback", _sqlite_end)
        else:
            self.liveness = _Liveness(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._read_sessions = sessionmaker(
            self.engine.execution_options(**{READ_ONLY: True}), expire_on_commit=False
        )

    def __repr__(self) -> str:
        return f"PortalStore({redact_url(self.url)!r})"

    def alembic_config(self) -> Any:
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        # configparser interpolation: a '%' in a password must be doubled.
        cfg.set_main_option("sqlalchemy.url", self.url.replace("%", "%%"))
        return cfg

    def upgrade(self, revision: str = "head") -> None:
        """Bring the schema to ``revision`` (the newest by default); a no-op when it is there."""
        from alembic import command

        cfg = self.alembic_config()
        with self.engine.begin() as connection:
            cfg.attributes["connection"] = connection
            command.upgrade(cfg, revision)

    def current_revision(self) -> str | None:
        from alembic.runtime.migration import MigrationContext

        with self.engine.connect() as connection:
            rev: str | None = MigrationContext.configure(connection).get_current_revision()
            return rev

    def head_revision(self) -> str:
        from alembic.script import ScriptDirectory

        head = ScriptDirectory.from_config(self.alembic_config()).get_current_head()
        assert head is not None
        return head

    def table_names(self) -> set[str]:
        return set(inspect(self.engine).get_table_names())

    def session(self) -> Session:
        """A new session (the caller closes it; prefer :meth:`begin`)."""
        return self._sessions()

    @contextmanager
    def begin(self) -> Iterator[Session]:
        """A session in one transaction: committed on success, rolled back on any error."""
        with self._sessions.begin() as session:
            yield session

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A session in one read-only transaction, for reads on hot paths (a login, a
        page): on SQLite it takes no write lock, so it never waits behind a writer, and a
        write in it fails at once ("attempt to write a readonly database")."""
        with self._read_sessions.begin() as session:
            yield session

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A Core connection in one transaction (committed on success, rolled back on any
        error): for hot paths that run Core statements and build no ORM objects."""
        with self.engine.begin() as connection:
            yield connection

    def dispose(self) -> None:
        self.engine.dispose()


class PortalDatabase(Configurable):
    """Where the portal keeps its own records (``c.PortalDatabase``)."""

    url = Unicode(
        "sqlite:///portal.sqlite",
        config=True,
        help="""SQLAlchemy URL of the portal's own database (account bindings, the audit log,
        the ledger), separate from JupyterHub's `db_url`. The default is SQLite in the hub's
        working directory; `configure()` puts it in the state directory
        (`sqlite:///<state_dir>/portal.sqlite`), in WAL mode with a busy timeout, which is
        enough for one hub. For production use PostgreSQL, e.g.
        `postgresql+psycopg://portal@db.example/portal`, with the password in the
        `PGPASSWORD` environment variable or a `.pgpass` file rather than in the URL. The
        schema is created and upgraded (Alembic) when the hub starts.""",
    )
    echo = Bool(
        False,
        config=True,
        help="""Log every SQL statement. For debugging only: statements carry user names.""",
    )

    @validate("url")
    def _check_url(self, proposal: Any) -> str:
        value = str(proposal["value"])
        try:
            make_url(value)
        except Exception:
            raise ValueError(
                f"PortalDatabase.url is not a database URL: {redact_url(value)!r}; "
                "use e.g. 'sqlite:////srv/portal/portal.sqlite'"
            ) from None
        return value

    def open(self, *, upgrade: bool = True) -> PortalStore:
        """A :class:`PortalStore` on :attr:`url`, its schema upgraded to the newest revision."""
        store = PortalStore(self.url, echo=self.echo)
        if upgrade:
            store.upgrade()
        return store
