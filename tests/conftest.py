"""Options shared by every test layer (unit, hub, extension).

``--order=random[:SEED]`` runs the test files in a shuffled order, and the tests of each
file in a shuffled order too. ``--order=reverse`` runs them back to front. The default is
``--order=file``, the collected order. The seed is printed in the header, so a failing order
can be run again. Tests must pass in any order: none may depend on another's leftovers.
Each file's tests stay together, so its module-scoped fixtures (a hub, an IdP) start once.
``SP_TEST_ORDER`` sets the same thing from the environment.

The fixtures of each layer are listed in the docstrings of tests/unit/conftest.py,
tests/hub/conftest.py and tests/extension/conftest.py. The shared rigs are in tests/support.
"""

from __future__ import annotations

import os
import random
from typing import Any

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--order",
        default=os.environ.get("SP_TEST_ORDER", "file"),
        help="test order: file (default), reverse, random or random:SEED (env SP_TEST_ORDER)",
    )


def _order(config: pytest.Config) -> tuple[str, int | None]:
    value = str(config.getoption("--order"))
    mode, _, seed = value.partition(":")
    if mode not in ("file", "reverse", "random"):
        raise pytest.UsageError(f"--order={value}: use file, reverse, random or random:SEED")
    if mode != "random":
        return mode, None
    if seed and not (seed.isascii() and seed.isdecimal()):
        raise pytest.UsageError(f"--order={value}: the seed must be a number")
    if not hasattr(config, "_sp_order_seed"):
        # an xdist worker takes the controller's seed: every worker must collect one order
        given = getattr(config, "workerinput", {}).get("sp_order_seed")
        config._sp_order_seed = (  # type: ignore[attr-defined]
            int(seed) if seed else given if given is not None else random.randrange(10**6)
        )
    return mode, config._sp_order_seed  # type: ignore[attr-defined]


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """pytest-xdist: hand the controller's random seed to each worker."""
    mode, seed = _order(node.config)
    if mode == "random":
        node.workerinput["sp_order_seed"] = seed


def pytest_report_header(config: pytest.Config) -> str:
    mode, seed = _order(config)
    if mode == "random":
        return f"test order: random, seed {seed} (again: --order=random:{seed})"
    return f"test order: {mode}"


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """The order once more at the end (``-q`` hides the header), so it can be run again."""
    mode, _ = _order(config)
    if mode != "file":
        terminalreporter.write_line(pytest_report_header(config))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    mode, seed = _order(config)
    if mode == "file":
        return
    files: dict[str, list[pytest.Item]] = {}
    for item in items:
        files.setdefault(str(item.path), []).append(item)
    groups = list(files.values())
    if mode == "reverse":
        ordered = [t for group in reversed(groups) for t in reversed(group)]
    else:
        rng = random.Random(seed)
        rng.shuffle(groups)
        for group in groups:
            rng.shuffle(group)
        ordered = [t for group in groups for t in group]
    items[:] = ordered
