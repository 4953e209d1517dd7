"""The hardware vocabulary: accelerators and MIG profiles, as data.

Numbers come from the vendors' documentation (see ``docs/reference/hardware.md``).
This module is pure: no I/O, no imports from the rest of the portal.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

#: Compute and memory slices of every MIG-capable GPU in the catalog.
COMPUTE_SLICES = 7
MEMORY_SLICES = 8


@dataclass(frozen=True)
class MigProfile:
    """One MIG profile, such as ``3g.40gb`` on an H100."""

    name: str
    compute_slices: int
    memory_slices: int
    memory_gb: int
    max_count: int
    media_engines: bool = False

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "compute_slices": self.compute_slices,
            "memory_slices": self.memory_slices,
            "memory_gb": self.memory_gb,
            "max_count": self.max_count,
            "media_engines": self.media_engines,
        }


@dataclass(frozen=True)
class Accelerator:
    """A GPU model."""

    name: str
    model: str
    memory_gb: int
    tdp_w: int
    cuda_arch: str
    nvlink_gb_s: int
    mig_driver_min: str
    mig_profiles: tuple[MigProfile, ...] = field(default=())

    def profile(self, name: str) -> MigProfile:
        for p in self.mig_profiles:
            if p.name == name:
                return p
        allowed = ", ".join(p.name for p in self.mig_profiles)
        raise KeyError(f"{self.name} has no MIG profile {name!r}; allowed: {allowed}")

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "model": self.model,
            "memory_gb": self.memory_gb,
            "tdp_w": self.tdp_w,
            "cuda_arch": self.cuda_arch,
            "nvlink_gb_s": self.nvlink_gb_s,
            "mig_driver_min": self.mig_driver_min,
            "mig_profiles": [p.to_json() for p in self.mig_profiles],
        }


def _profiles(small_gb: int, sizes: tuple[int, int, int, int, int]) -> tuple[MigProfile, ...]:
    """Build one family's profiles from its smallest slice memory.

    ``sizes`` are the memory sizes in GB of 1g-large, 2g, 3g/4g and 7g, in that order with
    3g and 4g sharing a size; the memory-slice count of each profile follows from the
    smallest profile's memory (REFERENCE.md §1).
    """
    large, two, three, _four, seven = sizes
    table = [
        # name suffix, compute, memory slices, memory GB, max count
        ("1g", 1, 1, small_gb, 7),
        ("1g", 1, 2, large, 4),
        ("2g", 2, 2, two, 3),
        ("3g", 3, 4, three, 2),
        ("4g", 4, 4, three, 1),
        ("7g", 7, 8, seven, 1),
    ]
    out = [MigProfile(f"{c}.{gb}gb", cs, ms, gb, n) for c, cs, ms, gb, n in table]
    out.insert(1, MigProfile(f"1g.{small_gb}gb+me", 1, 1, small_gb, 1, media_engines=True))
    return tuple(out)


ACCELERATORS: dict[str, Accelerator] = {
    a.name: a
    for a in (
        Accelerator(
            name="h100",
            model="NVIDIA H100 SXM 80GB HBM3",
            memory_gb=80,
            tdp_w=700,
            cuda_arch="sm_90",
            nvlink_gb_s=900,
            mig_driver_min="R525",
            mig_profiles=_profiles(10, (20, 20, 40, 40, 80)),
        ),
        Accelerator(
            name="h200",
            model="NVIDIA H200 141GB HBM3e",
            memory_gb=141,
            tdp_w=700,
            cuda_arch="sm_90",
            nvlink_gb_s=900,
            mig_driver_min="R535",
            mig_profiles=_profiles(18, (35, 35, 71, 71, 141)),
        ),
        Accelerator(
            name="b200",
            model="NVIDIA B200 180GB HBM3e",
            memory_gb=180,
            tdp_w=1000,
            cuda_arch="sm_100",
            nvlink_gb_s=1800,
            mig_driver_min="R570",
            mig_profiles=_profiles(23, (45, 45, 90, 90, 180)),
        ),
    )
}

#: GPUs per HGX node; all-to-all through NVSwitch.
GPUS_PER_HGX_NODE = 8


def accelerator(name: str) -> Accelerator:
    try:
        return ACCELERATORS[name]
    except KeyError:
        allowed = ", ".join(sorted(ACCELERATORS))
        raise KeyError(f"unknown accelerator {name!r}; the catalog has: {allowed}") from None


class LayoutError(ValueError):
    """A MIG layout that cannot exist on one GPU."""


def check_layout(acc: Accelerator, profiles: Iterable[str]) -> None:
    """Raise :class:`LayoutError` unless ``profiles`` can coexist on one GPU of ``acc``.

    This is the necessary model of REFERENCE.md: at most 7 compute slices and
    8 memory slices, each profile at most its maximum count, and at most one ``+me``.
    Real hardware adds placement rules; the operator's declared layout stays the truth.
    """
    names = list(profiles)
    if not names:
        raise LayoutError("a MIG layout needs at least one profile")
    resolved = []
    for n in names:
        try:
            resolved.append(acc.profile(n))
        except KeyError as e:
            raise LayoutError(str(e.args[0])) from None
    counts = Counter(p.name for p in resolved)
    for p in resolved:
        if counts[p.name] > p.max_count:
            raise LayoutError(
                f"{acc.name}: at most {p.max_count} × {p.name} fit on one GPU, "
                f"the layout has {counts[p.name]}"
            )
    if sum(1 for p in resolved if p.media_engines) > 1:
        raise LayoutError(f"{acc.name}: at most one '+me' profile per GPU")
    compute = sum(p.compute_slices for p in resolved)
    memory = sum(p.memory_slices for p in resolved)
    if compute > COMPUTE_SLICES:
        raise LayoutError(
            f"{acc.name}: layout {'+'.join(names)} needs {compute} compute slices, "
            f"a GPU has {COMPUTE_SLICES}"
        )
    if memory > MEMORY_SLICES:
        raise LayoutError(
            f"{acc.name}: layout {'+'.join(names)} needs {memory} memory slices "
            f"({sum(p.memory_gb for p in resolved)} GB), a GPU has {MEMORY_SLICES} "
            f"({acc.memory_gb} GB)"
        )


def catalog_json() -> dict[str, object]:
    """The whole hardware catalog as JSON-ready data."""
    return {name: acc.to_json() for name, acc in ACCELERATORS.items()}
