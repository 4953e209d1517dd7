"""Fixtures for the unit layer.

- ``portal_db_url``: a fresh portal database URL, once per engine (tests/support/portal_db.py);
- ``portal_store``: a :class:`~sovereign_portal.hub.store.PortalStore` on it, upgraded to head.
"""

from tests.support.portal_db import portal_db_url, portal_store

__all__ = ["portal_db_url", "portal_store"]
