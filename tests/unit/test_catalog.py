"""The hardware catalog: the REFERENCE.md tables exactly, and the MIG layout rule."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sovereign_portal.spawners.catalog import (
    ACCELERATORS,
    COMPUTE_SLICES,
    MEMORY_SLICES,
    LayoutError,
    check_layout,
)

from tests.support.paths import SHARED

pytestmark = pytest.mark.unit

# REFERENCE.md §1, typed in by hand: the anchor the code is checked against.
EXPECTED_MIG = {
    "h100": {"1g.10gb": 7, "1g.20gb": 4, "2g.20gb": 3, "3g.40gb": 2, "4g.40gb": 1, "7g.80gb": 1},
    "h200": {"1g.18gb": 7, "1g.35gb": 4, "2g.35gb": 3, "3g.71gb": 2, "4g.71gb": 1, "7g.141gb": 1},
    "b200": {"1g.23gb": 7, "1g.45gb": 4, "2g.45gb": 3, "3g.90gb": 2, "4g.90gb": 1, "7g.180gb": 1},
}


def reference_mig_tables() -> dict[str, dict[str, int]]:
    """Parse the MIG table straight out of shared/REFERENCE.md."""
    text = (SHARED / "REFERENCE.md").read_text()
    out: dict[str, dict[str, int]] = {}
    for line in text.splitlines():
        m = re.match(r"\|\s*(H100|H200|B200)\s+\d+GB\s*\|(.*)\|\s*$", line)
        if not m:
            continue
        cells = re.findall(r"(\d+g\.\d+gb)\s*×(\d+)", m.group(2))
        out[m.group(1).lower()] = {name: int(n) for name, n in cells}
    return out


def catalog_json_tables() -> dict[str, dict[str, int]]:
    out = subprocess.run(
        [sys.executable, "-m", "sovereign_portal.hub.cli", "catalog", "--json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    tables = json.loads(out)["mig_tables"]
    return {a: {p: n for p, n in t.items() if not p.endswith("+me")} for a, t in tables.items()}


def test_reference_md_is_parsed() -> None:
    assert reference_mig_tables() == EXPECTED_MIG


def test_catalog_json_gives_reference_tables_exactly() -> None:
    assert catalog_json_tables() == reference_mig_tables()


def test_each_family_has_one_media_engine_variant() -> None:
    for acc in ACCELERATORS.values():
        me = [p for p in acc.mig_profiles if p.media_engines]
        assert len(me) == 1 and me[0].max_count == 1 and me[0].name.startswith("1g.")


@pytest.mark.parametrize(
    ("acc", "name", "compute", "memory"),
    [
        ("h100", "1g.10gb", 1, 1),
        ("h100", "1g.20gb", 1, 2),
        ("h100", "2g.20gb", 2, 2),
        ("h100", "3g.40gb", 3, 4),
        ("h100", "4g.40gb", 4, 4),
        ("h100", "7g.80gb", 7, 8),
    ],
)
def test_slice_model_matches_reference(acc: str, name: str, compute: int, memory: int) -> None:
    p = ACCELERATORS[acc].profile(name)
    assert (p.compute_slices, p.memory_slices) == (compute, memory)


def test_hardware_numbers() -> None:
    h100, h200, b200 = ACCELERATORS["h100"], ACCELERATORS["h200"], ACCELERATORS["b200"]
    assert (h100.memory_gb, h100.tdp_w, h100.cuda_arch, h100.nvlink_gb_s) == (80, 700, "sm_90", 900)
    assert (h200.memory_gb, h200.cuda_arch) == (141, "sm_90")
    assert (b200.memory_gb, b200.tdp_w, b200.cuda_arch, b200.nvlink_gb_s) == (
        180,
        1000,
        "sm_100",
        1800,
    )


@pytest.mark.parametrize(
    ("profiles", "ok"),
    [
        (["1g.10gb", "1g.10gb", "2g.20gb", "3g.40gb"], True),  # H100 "balanced"
        (["4g.40gb", "3g.40gb"], True),
        (["4g.40gb", "4g.40gb"], False),  # 8 compute slices
        (["3g.40gb", "3g.40gb", "1g.10gb"], False),  # 9 memory slices
        (["3g.40gb", "3g.40gb", "1g.20gb"], False),  # 10 memory slices
        (["1g.10gb"] * 8, False),
        (["1g.20gb"] * 5, False),  # over the 1g.20gb maximum of 4
        (["1g.10gb+me", "1g.10gb+me"], False),
        (["7g.80gb"], True),
        (["9g.90gb"], False),
    ],
)
def test_layout_rule(profiles: list[str], ok: bool) -> None:
    if ok:
        check_layout(ACCELERATORS["h100"], profiles)
    else:
        with pytest.raises(LayoutError):
            check_layout(ACCELERATORS["h100"], profiles)


def test_layout_error_says_why() -> None:
    with pytest.raises(LayoutError, match="needs 8 compute slices, a GPU has 7"):
        check_layout(ACCELERATORS["h100"], ["4g.40gb", "3g.40gb", "1g.10gb"])


@settings(max_examples=300, deadline=None)
@given(
    acc=st.sampled_from(sorted(ACCELERATORS)),
    picks=st.lists(st.integers(min_value=0, max_value=6), min_size=1, max_size=10),
)
def test_no_accepted_layout_exceeds_the_gpu(acc: str, picks: list[int]) -> None:
    a = ACCELERATORS[acc]
    names = [a.mig_profiles[i].name for i in picks]
    try:
        check_layout(a, names)
    except LayoutError:
        return
    profs = [a.profile(n) for n in names]
    assert sum(p.compute_slices for p in profs) <= COMPUTE_SLICES
    assert sum(p.memory_slices for p in profs) <= MEMORY_SLICES
    # Nominal sizes are rounded up (2 × H200 3g.71gb is a real layout on 141 GB):
    # allow under 1 GB of rounding per instance.
    assert sum(p.memory_gb for p in profs) < a.memory_gb + len(profs)
    for p in profs:
        assert names.count(p.name) <= p.max_count
