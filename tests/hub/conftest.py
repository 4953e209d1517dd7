"""Fixtures for tests against real services (hub, Slurm, IdP, browser)."""

from tests.support.portal_db import portal_db_url, portal_store
from tests.support.postgres import postgres_server
from tests.support.slurm_cluster import slurm_accounting_cluster, slurm_cluster

__all__ = [
    "portal_db_url",
    "portal_store",
    "postgres_server",
    "slurm_accounting_cluster",
    "slurm_cluster",
]
