"""One device pool shared by processes through a lease file (spawner + portal service)."""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import pytest
from sovereign_portal.spawners import load_site
from sovereign_portal.spawners.inventory import AllocationError, Allocator, declared_devices
from sovereign_portal.spawners.sizes import Size

pytestmark = pytest.mark.unit

NODE = load_site().partitions[0].nodes[0]
ONE = Size("hgx-h100", "h100", gpus_per_node=1)


def _grab(path: str, owner: str, q: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    a = Allocator(declared_devices(NODE), path)
    got = []
    while True:
        try:
            got.append(a.allocate(f"{owner}-{len(got)}", ONE)[0].id)
        except AllocationError:
            break
    q.put(got)


def test_processes_racing_on_one_lease_file_never_share(tmp_path: Path) -> None:
    path = str(tmp_path / "leases.json")
    q: multiprocessing.Queue = multiprocessing.Queue()  # type: ignore[type-arg]
    procs = [multiprocessing.Process(target=_grab, args=(path, f"p{i}", q)) for i in range(4)]
    for p in procs:
        p.start()
    results = [q.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(10)
    ids = [i for r in results for i in r]
    assert len(ids) == len(set(ids)) == 6  # the six whole GPUs, each to exactly one owner
    assert oct(Path(path).stat().st_mode & 0o777) == "0o600"


def test_a_second_process_sees_the_first_ones_leases(tmp_path: Path) -> None:
    f = tmp_path / "leases.json"
    spawner = Allocator(declared_devices(NODE), f)
    service = Allocator(declared_devices(NODE), f)
    held = spawner.allocate("server:alice", Size("hgx-h100", "h100", gpus_per_node=4))
    with pytest.raises(AllocationError, match="2 of 4 device"):
        service.allocate("session:g1", Size("hgx-h100", "h100", gpus_per_node=4))
    got = service.allocate("session:g1", Size("hgx-h100", "h100", gpus_per_node=2))
    assert not {d.id for d in held} & {d.id for d in got}
    # A restart (a new Allocator on the same file) forgets nothing.
    again = Allocator(declared_devices(NODE), f)
    assert sorted(again.held_by("server:alice")) == sorted(d.id for d in held)
    assert spawner.release("server:alice")
    assert service.free(Size("hgx-h100", "h100", gpus_per_node=4)) == 4


def test_session_leases_lapse_at_their_end_time(tmp_path: Path) -> None:
    f = tmp_path / "leases.json"
    a = Allocator(declared_devices(NODE), f)
    a.allocate("session:short", ONE, until=time.time() - 1)
    a.allocate("session:long", ONE, until=time.time() + 3600)
    owners = {v["owner"] for v in json.loads(f.read_text())["leases"].values()}
    assert owners == {"session:long"}
    assert a.free(ONE) == 5
