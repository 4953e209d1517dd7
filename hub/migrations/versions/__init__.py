"""Alembic revisions of the portal database, one file each, in order (0001, 0002, ...)."""
