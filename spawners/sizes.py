"""Sizes: the ladder MIG slice → 1, 2 or 4 GPUs → one 8-GPU node → N nodes.

A :class:`Size` is pure data. It renders to Slurm arguments and to the number of
devices a local backend must hand out. :func:`partition_sizes` lists what a partition
offers.
"""

from __future__ import annotations

from dataclasses import dataclass

from .catalog import GPUS_PER_HGX_NODE, accelerator
from .site import NodeType, Partition

#: Whole-GPU counts on one node that the ladder offers below a full node.
GPU_STEPS = (1, 2, 4)


@dataclass(frozen=True)
class Size:
    """One rung of the ladder on one node type."""

    node_type: str
    accelerator: str
    slice: str | None = None  # MIG profile name, e.g. "3g.40gb"
    gpus_per_node: int = 0  # whole GPUs per node; 0 for a slice
    nodes: int = 1

    def __post_init__(self) -> None:
        if (self.slice is None) == (self.gpus_per_node == 0):
            raise ValueError("a size is either a MIG slice or a number of whole GPUs")
        if self.slice is not None and self.nodes != 1:
            raise ValueError("a MIG slice lives on one GPU of one node")
        if self.nodes > 1 and self.gpus_per_node != GPUS_PER_HGX_NODE:
            raise ValueError("sizes of several nodes take whole 8-GPU nodes")

    # -- naming -----------------------------------------------------------------
    @property
    def rung(self) -> str:
        if self.slice:
            return "slice"
        if self.nodes > 1:
            return "nodes"
        return "node" if self.gpus_per_node == GPUS_PER_HGX_NODE else "gpus"

    @property
    def id(self) -> str:
        """A stable identifier, used as the form value: ``h100:3g.40gb``, ``h100x2``,
        ``h100x8``, ``h100x8x4n``."""
        if self.slice:
            return f"{self.accelerator}:{self.slice}"
        base = f"{self.accelerator}x{self.gpus_per_node}"
        return base if self.nodes == 1 else f"{base}x{self.nodes}n"

    @property
    def label(self) -> str:
        acc = accelerator(self.accelerator)
        if self.slice:
            prof = acc.profile(self.slice)
            return f"MIG slice {self.slice} of an {self.accelerator.upper()} ({prof.memory_gb} GB)"
        if self.nodes > 1:
            return f"{self.nodes} nodes × 8 {self.accelerator.upper()} ({self.total_gpus} GPUs)"
        mem = self.gpus_per_node * acc.memory_gb
        if self.rung == "node":
            return f"one 8-GPU NVLink node of {self.accelerator.upper()} ({mem} GB)"
        plural = "s" if self.gpus_per_node > 1 else ""
        return f"{self.gpus_per_node} {self.accelerator.upper()} GPU{plural} ({mem} GB)"

    # -- quantities -------------------------------------------------------------
    @property
    def total_gpus(self) -> int:
        """Whole GPUs across all nodes (0 for a slice)."""
        return self.gpus_per_node * self.nodes

    @property
    def gpu_fraction(self) -> float:
        """GPU equivalents billed: whole GPUs, or compute slices ÷ 7 for a slice."""
        if self.slice:
            return accelerator(self.accelerator).profile(self.slice).compute_slices / 7
        return float(self.total_gpus)

    @property
    def devices_per_node(self) -> int:
        """CUDA devices each node exposes to the job (a slice is one device)."""
        return 1 if self.slice else self.gpus_per_node

    @property
    def power_w(self) -> float:
        """Board power at TDP for the GPUs of this size (slices pay their share)."""
        return accelerator(self.accelerator).tdp_w * self.gpu_fraction

    # -- rendering --------------------------------------------------------------
    def slurm_args(self, node_type: NodeType) -> list[str]:
        """sbatch arguments that ask Slurm for exactly this size."""
        if self.slice:
            gres = f"gpu:{node_type.slice_gres_type(self.slice)}:1"
        else:
            gres = f"gpu:{node_type.slurm_gres_type}:{self.gpus_per_node}"
        args = [f"--nodes={self.nodes}", f"--gres={gres}"]
        if self.rung in ("node", "nodes"):
            args.append("--exclusive")
        if node_type.features:
            args.append("--constraint=" + "&".join(node_type.features))
        return args

    def to_json(self, node_type: NodeType | None = None) -> dict[str, object]:
        out: dict[str, object] = {
            "id": self.id,
            "rung": self.rung,
            "label": self.label,
            "node_type": self.node_type,
            "accelerator": self.accelerator,
            "slice": self.slice,
            "gpus_per_node": self.gpus_per_node,
            "nodes": self.nodes,
            "devices_per_node": self.devices_per_node,
            "gpu_fraction": round(self.gpu_fraction, 4),
        }
        if node_type is not None:
            out["slurm_args"] = self.slurm_args(node_type)
        return out


def node_type_sizes(partition: Partition, nt: NodeType) -> list[Size]:
    """Every size one node type offers, smallest first (N-node sizes at 2 and the maximum)."""
    out: list[Size] = []
    for prof in sorted(
        nt.slices_per_node(),
        key=lambda p: accelerator(nt.accelerator).profile(p).compute_slices,
    ):
        out.append(Size(nt.name, nt.accelerator, slice=prof))
    whole = len(nt.whole_gpus)
    for n in GPU_STEPS:
        if n <= whole:
            out.append(Size(nt.name, nt.accelerator, gpus_per_node=n))
    if whole == GPUS_PER_HGX_NODE:
        out.append(Size(nt.name, nt.accelerator, gpus_per_node=GPUS_PER_HGX_NODE))
        top = max_nodes(partition, nt)
        for n in sorted({2, top}):
            if 2 <= n <= top:
                out.append(Size(nt.name, nt.accelerator, gpus_per_node=GPUS_PER_HGX_NODE, nodes=n))
    return out


def max_nodes(partition: Partition, nt: NodeType) -> int:
    """How many whole nodes of ``nt`` one request may span on ``partition``."""
    if partition.backend == "local" or len(nt.whole_gpus) != GPUS_PER_HGX_NODE:
        return 1
    return min(nt.count, partition.max_nodes or nt.count)


def partition_sizes(partition: Partition) -> list[Size]:
    return [s for nt in partition.nodes for s in node_type_sizes(partition, nt)]


def size_eur_per_hour(p: Partition, s: Size) -> float:
    """€ per hour of one copy of size ``s`` on partition ``p``: its slice's price, or its
    whole GPUs' (all nodes). The one price rule of a size; unrounded."""
    if s.slice:
        return p.price(s.accelerator, s.slice)
    return p.price(s.accelerator) * s.total_gpus
