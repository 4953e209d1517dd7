"""How the real-service layer shares out its test files between pytest-xdist workers.

Its hooks are imported by tests/hub/conftest.py; scripts/test.sh runs that layer with ``-n 2``.

- **A file is one unit.** Its module-scoped rigs (a hub, an IdP, a portal database) start
  once, on one worker, and its tests run there in order.
- **Every file marked ``slurm`` is one unit together.** Those files drive the Unix test users
  (spalice, spbob, ...) through real Slurm clusters: their homes, token files and job logs
  are shared by every cluster on the machine, and two clusters both start at job id 1. So
  they run one after the other, on one worker, which starts the session's Slurm cluster once.
  They go out first, because they are the longest unit; the other files follow in
  collection order.
- A test that asks for a Slurm cluster from a file not marked ``slurm`` is a collection
  error: it would otherwise run beside the group on the users' shared homes.

Why not ``--dist loadgroup``: pytest-xdist 3.8 groups by rewriting ``item._nodeid``, which
pytest 9 no longer reads, so grouped files were split across workers and their hubs
collided. ``pytest_xdist_make_scheduler`` is xdist's public hook for a scheduler of one's own,
and :class:`LoadScopeScheduling` is its public scheduler class; only ``_split_scope`` (the
documented extension point of that class) is overridden.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from xdist.scheduler import LoadScopeScheduling  # pytest-xdist: a test dependency

#: the fixtures that start (or hand out) a real Slurm cluster on the shared Unix users
SLURM_FIXTURES = frozenset({"slurm_cluster", "slurm_accounting_cluster", "slurm_sites"})
#: the unit of work that holds every file marked ``slurm``
SLURM_UNIT = "slurm: the files that share the Unix test users"
_MARK = re.compile(r"\bpytest\.mark\.slurm\b")


@cache
def _marked_slurm(path: str) -> bool:
    try:
        return bool(_MARK.search(Path(path).read_text(encoding="utf-8")))
    except OSError:
        return False


def unit_of(nodeid: str, rootdir: Path) -> str:
    """The work unit of one collected test: its file, or :data:`SLURM_UNIT`."""
    file = nodeid.split("::", 1)[0]
    return SLURM_UNIT if _marked_slurm(str(rootdir / file)) else file


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


class FileAndSlurmScheduling(LoadScopeScheduling):  # type: ignore[misc]
    """One unit per file, and one unit for every ``slurm`` file, handed out first."""

    def __init__(self, config: pytest.Config, log: Any = None) -> None:
        super().__init__(config, log)
        self._root = Path(str(config.rootpath))
        # Collection order, not "most tests first": the one-test browser files are among
        # the longest, and they come first in the alphabet, so they do not make the tail.
        config.option.loadscopereorder = False

    def _split_scope(self, nodeid: str) -> str:
        return unit_of(nodeid, self._root)

    def _assign_work_unit(self, node: Any) -> None:
        if SLURM_UNIT in self.workqueue:
            self.workqueue.move_to_end(SLURM_UNIT, last=False)
        super()._assign_work_unit(node)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    return FileAndSlurmScheduling(config, log)
