"""How the hub layer is shared out between xdist workers (tests/support/xdist_groups.py)."""

from __future__ import annotations

import contextlib
import re
from collections import OrderedDict
from pathlib import Path

import pytest
from xdist.scheduler import LoadScopeScheduling

from tests.support import xdist_groups as xg

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]
#: a test or fixture parameter that names a Slurm fixture
ASKS = re.compile(r"[(,]\s*(" + "|".join(sorted(xg.SLURM_FIXTURES)) + r")\s*[:,)]")


def test_slurm_files_are_one_unit_and_the_others_one_unit_each() -> None:
    assert xg.unit_of("tests/hub/test_slurm_spawner.py::test_x", REPO) == xg.SLURM_UNIT
    assert xg.unit_of("tests/hub/test_ledger_slurm.py::test_y[a::b]", REPO) == xg.SLURM_UNIT
    assert xg.unit_of("tests/hub/test_login.py::test_z", REPO) == "tests/hub/test_login.py"
    assert xg.unit_of("tests/hub/test_up.py::C::test_w", REPO) == "tests/hub/test_up.py"


def test_every_file_that_asks_for_a_slurm_cluster_is_in_the_slurm_unit() -> None:
    """The same rule the collection hook enforces, read from the files themselves."""
    users = [
        p
        for p in sorted((REPO / "tests" / "hub").glob("test_*.py"))
        if ASKS.search(p.read_text(encoding="utf-8"))
    ]
    assert len(users) >= 10, users
    for p in users:
        assert xg.unit_of(f"tests/hub/{p.name}::t", REPO) in (xg.SLURM_UNIT, xg.SITES_UNIT), p.name


class _Item:
    def __init__(self, nodeid: str, fixtures: tuple[str, ...], marked: bool) -> None:
        self.nodeid, self.fixturenames, self._marked = nodeid, fixtures, marked

    def get_closest_marker(self, name: str) -> object | None:
        return object() if self._marked and name == "slurm" else None


def test_a_slurm_fixture_outside_a_slurm_file_is_a_usage_error() -> None:
    ok = [_Item("a.py::t", ("slurm_cluster",), True), _Item("b.py::t", ("tmp_path",), False)]
    xg.pytest_collection_modifyitems(None, ok)  # type: ignore[arg-type]
    stray = [*ok, _Item("c.py::test_stray", ("tmp_path", "slurm_sites"), False)]
    with pytest.raises(pytest.UsageError, match=r"not marked .*c\.py::test_stray"):
        xg.pytest_collection_modifyitems(None, stray)  # type: ignore[arg-type]


def test_the_scheduler_hands_the_slurm_unit_out_first() -> None:
    assert issubclass(xg.FileAndSlurmScheduling, LoadScopeScheduling)
    sched = object.__new__(xg.FileAndSlurmScheduling)
    sched.workqueue = OrderedDict([("tests/hub/test_up.py", {}), (xg.SLURM_UNIT, {})])
    sched.assigned_work = {}
    sched.log = lambda *a: None
    node = object()
    assert callable(LoadScopeScheduling._assign_work_unit)  # the method we extend
    with contextlib.suppress(AttributeError):  # upstream then sends the work to the node,
        sched._assign_work_unit(node)  # and this fake node has no channel
    assert xg.SLURM_UNIT in sched.assigned_work[node]


def test_the_two_site_files_are_a_unit_of_their_own() -> None:
    for name in ("test_sites_hub.py", "test_sites_rest.py", "test_sites_sessions.py"):
        assert xg.unit_of(f"tests/hub/{name}::t", REPO) == xg.SITES_UNIT, name
    # reconcile also reads the main accounting cluster: it stays with the shared users
    assert xg.unit_of("tests/hub/test_sites_reconcile.py::t", REPO) == xg.SLURM_UNIT


def test_a_sites_file_may_not_use_the_main_cluster_or_skip_the_slurm_mark() -> None:
    class _Sites(_Item):
        def get_closest_marker(self, name: str) -> object | None:
            return object() if name == "slurm_sites" or (self._marked and name == "slurm") else None

    ok = [_Sites("s.py::t", ("slurm_sites",), True)]
    xg.pytest_collection_modifyitems(None, ok)  # type: ignore[arg-type]
    for bad in (
        _Sites("s.py::test_main", ("slurm_sites", "slurm_cluster"), True),
        _Sites("s.py::test_unmarked", ("tmp_path",), False),
    ):
        with pytest.raises(pytest.UsageError, match=bad.nodeid.replace(".", r"\.")):
            xg.pytest_collection_modifyitems(None, [*ok, bad])  # type: ignore[arg-type]


def test_both_slurm_units_go_out_first() -> None:
    sched = object.__new__(xg.FileAndSlurmScheduling)
    sched.workqueue = OrderedDict(
        [("tests/hub/test_up.py", {}), (xg.SITES_UNIT, {}), (xg.SLURM_UNIT, {})]
    )
    sched.assigned_work = {}
    sched.log = lambda *a: None
    node = object()
    with contextlib.suppress(AttributeError):
        sched._assign_work_unit(node)
    assert xg.SLURM_UNIT in sched.assigned_work[node]
    assert next(iter(sched.workqueue)) == xg.SITES_UNIT  # the next worker's
