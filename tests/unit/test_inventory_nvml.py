"""NVML inventory, against an in-process fake of the pynvml API (the fast inner layer).

The real NVML is exercised on a GPU machine by ``benchmarks/device_check.py``; here a
fake with the same calls checks the walk over whole GPUs and MIG instances.
"""

from __future__ import annotations

from typing import Any

import pytest
from sovereign_portal.spawners.inventory import _walk_nvml

pytestmark = pytest.mark.unit


class FakeNVML:
    NVML_DEVICE_MIG_ENABLE = 1

    class NVMLError(Exception):
        pass

    def __init__(self, gpus: list[dict[str, Any]]) -> None:
        self.gpus = gpus

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> dict[str, Any]:
        return self.gpus[i]

    def nvmlDeviceGetName(self, h: dict[str, Any]) -> bytes:
        return h["name"].encode()

    def nvmlDeviceGetMigMode(self, h: dict[str, Any]) -> tuple[int, int]:
        if "mig" not in h:
            raise self.NVMLError("not supported")
        return (1 if h["mig"] else 0, 0)

    def nvmlDeviceGetMaxMigDeviceCount(self, h: dict[str, Any]) -> int:
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, h: dict[str, Any], j: int) -> dict[str, Any]:
        if j >= len(h["mig"]):
            raise self.NVMLError("no instance")
        return h["mig"][j]

    def nvmlDeviceGetUUID(self, m: dict[str, Any]) -> str:
        return m["uuid"]


def test_walk_reads_whole_gpus_and_mig_instances() -> None:
    nv = FakeNVML(
        [
            {"name": "NVIDIA H100 80GB HBM3", "mig": []},
            {"name": "NVIDIA B200"},
            {
                "name": "NVIDIA H100 80GB HBM3",
                "mig": [
                    {"name": "NVIDIA H100 80GB HBM3 MIG 3g.40gb", "uuid": "MIG-aaa"},
                    {"name": "NVIDIA H100 80GB HBM3 MIG 1g.10gb+me", "uuid": "MIG-bbb"},
                ],
            },
        ]
    )
    devs = list(_walk_nvml(nv))
    assert [(d.id, d.gpu, d.accelerator, d.slice) for d in devs] == [
        ("0", 0, "h100", None),
        ("1", 1, "b200", None),
        ("MIG-aaa", 2, "h100", "3g.40gb"),
        ("MIG-bbb", 2, "h100", "1g.10gb+me"),
    ]
