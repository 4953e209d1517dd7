"""How the real-service layer shares out its test files between pytest-xdist workers.

Its hooks are imported by tests/hub/conftest.py; scripts/test.sh runs that layer with ``-n 3``.

- **A file is one unit.** Its module-scoped rigs (a hub, an IdP, a portal database) start
  once, on one worker, and its tests run there in order.
- **The files marked ``slurm`` (and neither of the two marks below) are one unit
  together.** Those files drive the Unix test users (``TEST_USERS``: spalice, spbob, ...)
  through real Slurm clusters: their homes, token files and job logs are shared by every
  cluster on the machine, and two clusters both start at job id 1. So they run one after
  the other, on one worker, which starts the session's Slurm cluster once. They go out
  first, because they are the longest unit; the other files follow in collection order.
- **The files also marked ``slurm_second`` are a second main unit.** They use the same
  cluster layout (``slurm_cluster``, which their worker starts for itself) as the second
  set of Unix users (``SECOND_USERS``: syalice, ...), so they run beside the first main unit
  on another worker. They may not use the accounting cluster (one slurmdbd and MariaDB)
  or the two sites. (As one unit, the main files were 18 minutes of CI on one worker.)
- **The files also marked ``slurm_sites`` are a third Slurm unit.** They use only the
  two-site clusters (``slurm_sites``), as the sites' own Unix users (``SITE_USERS``:
  sxalice, ...), so they run beside the main units on another worker. All three go out
  first, the longest first.
- A test that asks for a Slurm cluster from a file not marked ``slurm`` is a collection
  error: it would otherwise run beside the group on the users' shared homes. So is a
  ``slurm_sites`` test that asks for the main cluster, and a ``slurm_second`` test that
  asks for the accounting cluster or the sites.
- At the end, the longest units are listed with their seconds, to show where CI time goes.

Why not ``--dist loadgroup``: pytest-xdist 3.8 groups by rewriting ``item._nodeid``, which
pytest 9 no longer reads, so grouped files were split across workers and their hubs
collided. ``pytest_xdist_make_scheduler`` is xdist's public hook for a scheduler of one's own,
and :class:`LoadScopeScheduling` is its public scheduler class; only ``_split_scope`` (the
documented extension point of that class) is overridden.
"""

from __future__ import annotations

import re
from collections import Counter
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from xdist.scheduler import LoadScopeScheduling  # pytest-xdist: a test dependency

#: the fixtures that start (or hand out) a real Slurm cluster on the shared Unix users
SLURM_FIXTURES = frozenset({"slurm_cluster", "slurm_accounting_cluster", "slurm_sites"})
#: the clusters whose users' homes the main ``slurm`` unit shares
MAIN_FIXTURES = frozenset({"slurm_cluster", "slurm_accounting_cluster"})
#: the unit of work that holds every file marked ``slurm`` (and neither ``slurm_second``
#: nor ``slurm_sites``)
SLURM_UNIT = "slurm: the files that share the Unix test users"
#: the main cluster's files on the second set of Unix users (``SECOND_USERS``)
SECOND_UNIT = "slurm_second: the main cluster's files on the second Unix users"
#: the only Slurm fixture a ``slurm_second`` test may use
SECOND_FIXTURES = frozenset({"slurm_cluster"})
#: the two-site files: their own clusters and their own Unix users (``SITE_USERS``)
SITES_UNIT = "slurm_sites: the two-site files, on the sites' own Unix users"
_MARK = re.compile(r"\bpytest\.mark\.slurm\b")
_SITES_MARK = re.compile(r"\bpytest\.mark\.slurm_sites\b")
_SECOND_MARK = re.compile(r"\bpytest\.mark\.slurm_second\b")
#: the Slurm units, handed out in this order before every other unit
SLURM_UNITS = (SLURM_UNIT, SECOND_UNIT, SITES_UNIT)


@cache
def _marks(path: str) -> tuple[bool, bool, bool]:
    """(marked ``slurm``, ``slurm_sites``, ``slurm_second``), read from the file's text."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError:
        return False, False, False
    found = (bool(m.search(text)) for m in (_MARK, _SITES_MARK, _SECOND_MARK))
    slurm, sites, second = found
    return slurm, sites, second


def unit_of(nodeid: str, rootdir: Path) -> str:
    """The work unit of one collected test: its file, or one of :data:`SLURM_UNITS`."""
    file = nodeid.split("::", 1)[0]
    slurm, sites, second = _marks(str(rootdir / file))
    if not slurm:
        return file
    return SITES_UNIT if sites else SECOND_UNIT if second else SLURM_UNIT


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    stray = [
        i.nodeid
        for i in items
        if SLURM_FIXTURES.intersection(getattr(i, "fixturenames", ()))
        and i.get_closest_marker("slurm") is None
    ]
    if stray:
        raise pytest.UsageError(
            "these tests use a Slurm cluster but their file is not marked "
            "pytestmark = pytest.mark.slurm, so they would run beside the Slurm files on "
            "the shared Unix test users: " + ", ".join(stray[:5])
        )
    mixed = [
        i.nodeid
        for i in items
        if i.get_closest_marker("slurm_sites") is not None
        and (i.get_closest_marker("slurm") is None or MAIN_FIXTURES.intersection(i.fixturenames))
    ]
    if mixed:
        raise pytest.UsageError(
            "these tests are marked slurm_sites (they run beside the main Slurm files) but "
            "are not marked slurm, or use the main cluster, whose users' homes the slurm "
            "unit shares: " + ", ".join(mixed[:5])
        )
    second = [
        i.nodeid
        for i in items
        if i.get_closest_marker("slurm_second") is not None
        and (
            i.get_closest_marker("slurm") is None
            or i.get_closest_marker("slurm_sites") is not None
            or (SLURM_FIXTURES - SECOND_FIXTURES).intersection(i.fixturenames)
        )
    ]
    if second:
        raise pytest.UsageError(
            "these tests are marked slurm_second (they run beside the main Slurm files, on "
            "a cluster of their worker's own) but are not marked slurm, are marked "
            "slurm_sites too, or use the accounting cluster or the sites, which the other "
            "units use: " + ", ".join(second[:5])
        )


class FileAndSlurmScheduling(LoadScopeScheduling):  # type: ignore[misc]
    """One unit per file, and the Slurm units (:data:`SLURM_UNITS`), handed out first."""

    def __init__(self, config: pytest.Config, log: Any = None) -> None:
        super().__init__(config, log)
        self._root = Path(str(config.rootpath))
        # Collection order, not "most tests first": the one-test browser files are among
        # the longest, and they come first in the alphabet, so they do not make the tail.
        config.option.loadscopereorder = False

    def _split_scope(self, nodeid: str) -> str:
        return unit_of(nodeid, self._root)

    def _assign_work_unit(self, node: Any) -> None:
        for unit in reversed(SLURM_UNITS):  # the two main units first, then the sites
            if unit in self.workqueue:
                self.workqueue.move_to_end(unit, last=False)
        super()._assign_work_unit(node)


#: seconds each unit's tests took (setup + call + teardown), summed from the workers' reports
_unit_seconds: Counter[str] = Counter()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _unit_seconds[report.nodeid.split("::", 1)[0]] += report.duration


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """The longest units, so that CI time can be cut where it is spent (not a timed test)."""
    if not _unit_seconds:
        return
    root = Path(str(config.rootpath))
    units: Counter[str] = Counter()
    for file, seconds in _unit_seconds.items():
        units[unit_of(file, root)] += seconds
    terminalreporter.write_sep("=", "longest units of work (seconds on their worker)")
    for unit, seconds in units.most_common(12):
        terminalreporter.write_line(f"{seconds:8.1f}  {unit}")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    return FileAndSlurmScheduling(config, log)
