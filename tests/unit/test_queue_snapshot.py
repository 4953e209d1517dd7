"""One whole-queue query per interval shared by two pollers (the hub's and the service's)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
from sovereign_portal.spawners.slurm.client import GONE
from sovereign_portal.spawners.slurm.scheduler import JobPoller
from sovereign_portal.spawners.slurm.snapshot import QueueSnapshot

from tests.unit.test_session_jobs import ScriptedQueue, job

pytestmark = pytest.mark.unit


def _pollers(tmp_path: Path, client: ScriptedQueue) -> tuple[JobPoller, JobPoller]:
    path = tmp_path / "queue.json"
    hub = JobPoller(30.0, 0.0, 0.5, client=client, snapshot=QueueSnapshot(path))
    service = JobPoller(
        5.0, 0.0, 5.0, client=client, whole_queue=True, snapshot=QueueSnapshot(path)
    )
    return hub, service


def test_two_pollers_make_one_query_per_interval(tmp_path: Path) -> None:
    client = ScriptedQueue()
    client.jobs = [job("11", "RUNNING"), job("12", "PENDING", "Resources"), job("13", "PENDING")]

    async def run() -> tuple[JobPoller, JobPoller]:
        hub, service = _pollers(tmp_path, client)
        hub.track("11")
        hub.track("99")  # gone: not in the (successful) whole-queue answer
        for _ in range(5):  # five intervals' worth of turns of both pollers
            assert await service.refresh()
            assert await hub.refresh()
        return hub, service

    hub, service = asyncio.run(run())
    assert client.queries == [None]  # one whole-queue squeue served all ten polls
    assert hub.info("11") == client.jobs[0]
    assert hub.info("99") is GONE
    assert set(service.positions) == {"12", "13"}
    assert (tmp_path / "queue.json").stat().st_mode & 0o777 == 0o600


def test_a_stale_snapshot_is_asked_again_and_a_failure_writes_nothing(tmp_path: Path) -> None:
    client = ScriptedQueue()
    client.jobs = [job("11", "RUNNING")]
    path = tmp_path / "queue.json"

    async def run() -> JobPoller:
        hub, service = _pollers(tmp_path, client)
        hub.track("11")
        assert await hub.refresh()
        raw = json.loads(path.read_text())
        raw["at"] = time.time() - 120  # older than any interval
        path.write_text(json.dumps(raw))
        client.jobs = [job("11", "COMPLETED")]
        assert await service.refresh()  # stale: asks Slurm itself
        assert await hub.refresh()  # ... and the hub reads that fresh answer
        assert hub.info("11").state == "COMPLETED"
        raw = json.loads(path.read_text())
        raw["at"] = time.time() - 120
        path.write_text(json.dumps(raw))
        client.down = True
        assert not await hub.refresh()  # unknown, never a guess from the stale file
        assert json.loads(path.read_text())["at"] == raw["at"]  # nothing written
        return hub

    hub = asyncio.run(run())
    assert client.queries == [None, None, None]
    assert hub.info("11").state == "COMPLETED"  # the last authoritative answer stays


def test_a_hurried_poll_wants_a_fresh_answer(tmp_path: Path) -> None:
    client = ScriptedQueue()
    client.jobs = [job("11", "PENDING")]

    async def run() -> None:
        hub, service = _pollers(tmp_path, client)
        assert await service.refresh()
        await asyncio.sleep(0.6)
        hub.track("11", hurry=True)  # a server starting: 0.5 s polls
        assert await hub.refresh()

    asyncio.run(run())
    assert client.queries == [None, None]


@pytest.mark.parametrize(
    "content",
    [
        "",
        "{",
        '{"at": "x", "jobs": []}',
        '{"at": 1e20, "jobs": []}',
        '{"at": 0, "jobs": 3}',
        '{"at": %f, "jobs": [{"job_id": "1"}]}',
    ],
)
def test_a_broken_snapshot_is_never_used(tmp_path: Path, content: str) -> None:
    path = tmp_path / "queue.json"
    path.write_text(content.replace("%f", str(time.time())) if "%f" in content else content)
    assert QueueSnapshot(path).read(max_age=3600) is None


def test_a_job_submitted_after_the_snapshot_is_never_read_as_gone(tmp_path: Path) -> None:
    """The snapshot is fresh, but older than the job: its absence there proves nothing."""
    client = ScriptedQueue()
    client.jobs = [job("11", "RUNNING")]

    async def run() -> JobPoller:
        hub, service = _pollers(tmp_path, client)
        assert await service.refresh()  # a snapshot without job 12
        client.jobs = [job("11", "RUNNING"), job("12", "PENDING", "Resources")]
        hub.track("12")  # just submitted by a spawner
        assert await hub.refresh()
        assert await service.refresh()  # and the service reads the newer snapshot
        return hub

    hub = asyncio.run(run())
    assert hub.info("12") == client.jobs[1]
    assert client.queries == [None, None]
