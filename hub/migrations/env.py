"""Alembic environment of the portal database.

:meth:`sovereign_portal.hub.store.PortalStore.upgrade` runs it with an open connection in
``config.attributes["connection"]``. Run by the ``alembic`` command instead, it opens
``sqlalchemy.url`` through :class:`~sovereign_portal.hub.store.PortalStore`, so SQLite gets the
same WAL mode, busy timeout and ``BEGIN IMMEDIATE`` as the portal itself.
"""

from __future__ import annotations

from alembic import context
from sovereign_portal.hub.store import Base, PortalStore
from sqlalchemy.engine import Connection

config = context.config
target_metadata = Base.metadata


def run_migrations_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=True,  # ALTER on SQLite goes through batch mode
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    store = PortalStore(str(config.get_main_option("sqlalchemy.url")))
    try:
        with store.engine.begin() as conn:
            _run(conn)
    finally:
        store.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
