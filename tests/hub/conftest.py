"""Fixtures for tests against real services (hub, Slurm, IdP, browser).

- ``slurm_cluster`` / ``slurm_accounting_cluster``: the real local Slurm cluster (with
  slurmdbd for the second), tests/support/slurm_cluster.py;
- ``postgres_server``, ``portal_db_url``, ``portal_store``: PostgreSQL and the portal database
  (tests/support/postgres.py, tests/support/portal_db.py).

Rigs that a module wraps in its own module-scoped fixture, written once in tests/support:
``stack.hub_with_idp`` (a hub that logs in through the local IdP, ``tamper=True`` for the
attack mode), ``portal.portal_stack`` (the hub ``configure()`` sets up), ``hub.HubProcess``,
and ``browser`` (the one Chromium launch configuration and its host guard).
"""

import pytest

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


#: Fixtures whose tests run jobs as the real Unix test users (their homes are shared
#: machine-wide: token files, portal logs), so under pytest-xdist they share one worker.
UNIX_ACCOUNT_FIXTURES = ("slurm",)


def _shares_unix_accounts(item: pytest.Item) -> bool:
    names = getattr(item, "fixturenames", ())
    return any(word in name for name in names for word in UNIX_ACCOUNT_FIXTURES) or any(
        item.get_closest_marker(m) for m in ("unix_accounts", "slurm")
    )


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Groups for ``pytest -n N --dist loadgroup`` (scripts/test.sh): each module stays on one
    worker (its module-scoped hub and IdP start once), and every module whose tests run jobs
    as the real Unix test users (any fixture named ``*slurm*``, or the ``unix_accounts``
    marker) shares one worker, since those users' homes are machine-wide. Without xdist the
    markers change nothing."""
    modules: dict[str, list[pytest.Item]] = {}
    for item in items:
        modules.setdefault(str(item.path), []).append(item)
    for path, group in modules.items():
        shared = any(_shares_unix_accounts(item) for item in group)
        name = "unix-accounts" if shared else path
        for item in group:
            item.add_marker(pytest.mark.xdist_group(name))
