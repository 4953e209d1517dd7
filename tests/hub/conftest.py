"""Fixtures for tests against real services (hub, Slurm, IdP, browser)."""

from tests.support.slurm_cluster import slurm_accounting_cluster, slurm_cluster

__all__ = ["slurm_accounting_cluster", "slurm_cluster"]
