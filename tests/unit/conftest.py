"""Fixtures for the unit layer.

- ``portal_db_url``: a fresh portal database URL, once per engine (tests/support/portal_db.py);
- ``portal_store``: a :class:`~sovereign_portal.hub.store.PortalStore` on it, upgraded to head;
- ``postgres_server``: the real PostgreSQL server behind the ``postgresql`` engine
  (tests/support/postgres.py, started once per session, on 127.0.0.1).
"""

from tests.support.portal_db import portal_db_url, portal_store
from tests.support.postgres import postgres_server

__all__ = ["portal_db_url", "portal_store", "postgres_server"]
