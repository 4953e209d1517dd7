"""The portal database for tests: ``portal_db_url`` and ``portal_store`` fixtures.

``portal_db_url`` is parametrized by engine. SQLite (a file in ``tmp_path``, WAL mode) is always
there; a PostgreSQL engine is added to :data:`ENGINES` by the fixture that starts a real
PostgreSQL server, so every test that takes ``portal_db_url`` or ``portal_store`` runs on each
engine. A missing engine errors loudly; it is never skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sovereign_portal.hub.store import PortalStore

from tests.support import postgres

#: engine name -> a function of (request, tmp_path) that returns a fresh, empty database URL.
ENGINES: dict[str, Callable[[pytest.FixtureRequest, Path], str]] = {
    "sqlite": lambda request, tmp_path: f"sqlite:///{tmp_path / 'portal.sqlite'}",
    # A real server (tests/support/postgres.py); needs the postgres_server fixture in conftest.
    "postgresql": postgres.database_url,
}


@pytest.fixture(params=sorted(ENGINES))
def portal_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL of a fresh, empty portal database, on each engine in :data:`ENGINES`."""
    return ENGINES[request.param](request, tmp_path)


@pytest.fixture
def portal_store(portal_db_url: str) -> Iterator[PortalStore]:
    """A :class:`PortalStore` on a fresh database, upgraded to the newest revision."""
    store = PortalStore(portal_db_url)
    store.upgrade()
    try:
        yield store
    finally:
        store.dispose()
