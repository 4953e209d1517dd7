"""slurmctld's own count of the RPCs it served (``sdiag``), for tests and benchmarks."""

from __future__ import annotations

import re
from typing import Any

_RPC = re.compile(r"^\s*(REQUEST_\w+)\s+\(\s*\d+\)\s+count:(\d+)", re.M)


def rpc_counts(cluster: Any) -> dict[str, int]:
    """RPC name -> how many slurmctld served since it started (or ``sdiag -r``)."""
    out = cluster.run(["sdiag"]).stdout
    counts: dict[str, int] = {}
    for m in _RPC.finditer(out):
        counts[m.group(1)] = counts.get(m.group(1), 0) + int(m.group(2))
    return counts


def job_info_rpcs(cluster: Any) -> int:
    """The job-info RPCs (what ``squeue`` and ``scontrol show job`` send)."""
    return sum(n for k, n in rpc_counts(cluster).items() if k.startswith("REQUEST_JOB_INFO"))
