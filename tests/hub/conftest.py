"""Fixtures for tests against real services (hub, Slurm, IdP, browser).

- ``slurm_cluster`` / ``slurm_accounting_cluster``: the real local Slurm cluster (with
  slurmdbd for the second), tests/support/slurm_cluster.py;
- ``postgres_server``, ``portal_db_url``, ``portal_store``: PostgreSQL and the portal database
  (tests/support/postgres.py, tests/support/portal_db.py).

Rigs that a module wraps in its own module-scoped fixture, written once in tests/support:
``stack.hub_with_idp`` (a hub that logs in through the local IdP, ``tamper=True`` for the
attack mode), ``portal.portal_stack`` (the hub ``configure()`` sets up), ``courses.course_hub``
and ``courses.CourseStack`` (that hub with course options, the course people's logins and
their calls), ``hub.HubProcess``, and ``browser`` (the one Chromium launch configuration and
its host guard).

Under ``pytest -n 3`` (scripts/test.sh) the files are shared out by
tests/support/xdist_groups.py: each file on one worker, and the ``slurm`` files in three
units (the main cluster's on ``TEST_USERS``, ``slurm_second`` on ``SECOND_USERS``, the two
sites' on ``SITE_USERS``), each on one worker.
"""

from tests.support.portal_db import portal_db_url, portal_store
from tests.support.postgres import postgres_server
from tests.support.slurm_cluster import slurm_accounting_cluster, slurm_cluster
from tests.support.xdist_groups import (
    pytest_collection_modifyitems,
    pytest_runtest_logreport,
    pytest_terminal_summary,
    pytest_xdist_make_scheduler,
)

__all__ = [
    "portal_db_url",
    "portal_store",
    "postgres_server",
    "pytest_collection_modifyitems",
    "pytest_runtest_logreport",
    "pytest_terminal_summary",
    "pytest_xdist_make_scheduler",
    "slurm_accounting_cluster",
    "slurm_cluster",
]
