"""How the hub layer is shared out between xdist workers (tests/support/xdist_groups.py)."""

from __future__ import annotations

import contextlib
import re
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

import pytest
from xdist.scheduler import LoadScopeScheduling

from tests.support import xdist_groups as xg
from tests.support.slurm_cluster import SECOND_USERS, TEST_USERS

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]
#: a test or fixture parameter that names a Slurm fixture
ASKS = re.compile(r"[(,]\s*(" + "|".join(sorted(xg.SLURM_FIXTURES)) + r")\s*[:,)]")


def test_slurm_files_are_one_unit_and_the_others_one_unit_each() -> None:
    assert xg.unit_of("tests/hub/test_budget_sync.py::test_x", REPO) == xg.SLURM_UNIT
    assert xg.unit_of("tests/hub/test_course_data.py::test_y[a::b]", REPO) == xg.SLURM_UNIT
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
        assert xg.unit_of(f"tests/hub/{p.name}::t", REPO) in xg.SLURM_UNITS, p.name


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


def test_the_three_slurm_units_go_out_first_the_main_ones_before_the_sites() -> None:
    sched = object.__new__(xg.FileAndSlurmScheduling)
    sched.workqueue = OrderedDict(
        [
            ("tests/hub/test_up.py", {}),
            (xg.SITES_UNIT, {}),
            (xg.SECOND_UNIT, {}),
            (xg.SLURM_UNIT, {}),
        ]
    )
    sched.assigned_work = {}
    sched.log = lambda *a: None
    node = object()
    with contextlib.suppress(AttributeError):
        sched._assign_work_unit(node)
    assert xg.SLURM_UNIT in sched.assigned_work[node]
    assert list(sched.workqueue)[:2] == [xg.SECOND_UNIT, xg.SITES_UNIT]  # the next workers'


def test_the_second_main_unit_holds_its_files_and_the_rest_stay_in_the_first() -> None:
    for name in ("test_slurm_spawner.py", "test_ledger_slurm.py", "test_culler_slurm.py"):
        assert xg.unit_of(f"tests/hub/{name}::t", REPO) == xg.SECOND_UNIT, name
    # the accounting cluster's files and the class start stay on the first users
    for name in ("test_budget_sync.py", "test_reconcile_sacct.py", "test_class_start_hub_slurm.py"):
        assert xg.unit_of(f"tests/hub/{name}::t", REPO) == xg.SLURM_UNIT, name


def _names(users: Iterable[str]) -> re.Pattern[str]:
    return re.compile(r"\b(" + "|".join(users) + r")\b")


def test_each_main_unit_names_only_its_own_unix_users() -> None:
    """Two main units run at once, each on its own cluster but on this machine's homes:
    a file of one that named the other's accounts would share their homes and job logs."""
    first, second = _names(TEST_USERS), _names(SECOND_USERS)
    seen = {xg.SLURM_UNIT: 0, xg.SECOND_UNIT: 0}
    for p in sorted((REPO / "tests" / "hub").glob("test_*.py")):
        unit, text = xg.unit_of(f"tests/hub/{p.name}::t", REPO), p.read_text(encoding="utf-8")
        if unit == xg.SLURM_UNIT:
            assert not second.search(text), (p.name, second.search(text))
        elif unit == xg.SECOND_UNIT:
            assert not first.search(text), (p.name, first.search(text))
        if unit in seen:
            seen[unit] += 1
    assert seen[xg.SLURM_UNIT] >= 5 and seen[xg.SECOND_UNIT] >= 5, seen


def test_a_second_unit_test_may_use_only_the_main_cluster() -> None:
    class _Second(_Item):
        def get_closest_marker(self, name: str) -> object | None:
            marked = name == "slurm_second" or (self._marked and name == "slurm")
            return object() if marked else None

    ok = [_Second("b.py::t", ("slurm_cluster", "tmp_path"), True)]
    xg.pytest_collection_modifyitems(None, ok)  # type: ignore[arg-type]
    for bad in (
        _Second("b.py::test_acct", ("slurm_cluster", "slurm_accounting_cluster"), True),
        _Second("b.py::test_sites", ("slurm_sites",), True),
        _Second("b.py::test_unmarked", ("tmp_path",), False),
    ):
        with pytest.raises(pytest.UsageError, match=bad.nodeid.replace(".", r"\.")):
            xg.pytest_collection_modifyitems(None, [*ok, bad])  # type: ignore[arg-type]
