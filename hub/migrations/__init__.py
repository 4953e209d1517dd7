"""Alembic migrations of the portal database (see :mod:`sovereign_portal.hub.store`)."""
