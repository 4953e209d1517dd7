"""The portal service's session-job watch (hub/session_jobs.py) with an in-process client.

Fast inner layer of tests/hub/test_scheduler_poll.py: a scripted :class:`SchedulerClient`
answers the whole-queue query; the checks are the registry, the per-user views (only the
caller's grants), exact queue positions, versions and the long-poll.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Mapping, Sequence

import pytest
from sovereign_portal.hub.session_jobs import (
    MAX_JOBS_PER_SESSION,
    JobsRequestError,
    SessionJobs,
    parse_job_ids,
)
from sovereign_portal.spawners.slurm.client import (
    JobInfo,
    NodeInfo,
    SchedulerClient,
    SchedulerUnavailable,
)

pytestmark = pytest.mark.unit


class ScriptedQueue(SchedulerClient):
    """The whole queue as a list of JobInfo; ``down`` makes every query fail."""

    def __init__(self) -> None:
        self.jobs: list[JobInfo] = []
        self.down = False
        self.queries: list[Collection[str] | None] = []

    async def submit(
        self,
        script: str,
        options: Sequence[str] = (),
        *,
        user: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str = "/",
    ) -> str:
        raise AssertionError("the watch never submits")

    async def cancel(self, job_ids: Sequence[str], *, user: str | None = None) -> None:
        raise AssertionError("the watch never cancels")

    async def query(
        self, job_ids: Collection[str] | None = None, *, name: str | None = None
    ) -> dict[str, JobInfo]:
        self.queries.append(job_ids)
        if self.down:
            raise SchedulerUnavailable("slurmctld is down")
        return {j.job_id: j for j in self.jobs}

    async def job_detail(self, job_id: str) -> dict[str, str]:
        return {}

    async def nodes(self, partition: str | None = None) -> dict[str, NodeInfo]:
        return {}


def job(jid: str, state: str, reason: str = "None", prio: int = 100) -> JobInfo:
    return JobInfo(jid, state, reason, "", "N/A", "u", "", "gpu-fr", prio)


@pytest.mark.parametrize(
    ("raw", "ok"),
    [
        ("", ()),
        ("12", ("12",)),
        ("12,13,12", ("12", "13")),
        ("7_3", ("7_3",)),
        ("12;13", None),
        ("-1", None),
        ("١٢", None),  # Arabic-Indic digits are not job ids
        ("12 ", None),
        (",".join(str(i) for i in range(MAX_JOBS_PER_SESSION + 1)), None),
    ],
)
def test_job_ids_are_slurm_ids_only(raw: str, ok: tuple[str, ...] | None) -> None:
    if ok is None:
        with pytest.raises(JobsRequestError, match="'jobs'"):
            parse_job_ids(raw)
    else:
        assert parse_job_ids(raw) == ok


def test_one_query_serves_every_user_and_each_sees_only_their_own() -> None:
    q = ScriptedQueue()

    async def run() -> None:
        w = SessionJobs(lambda: q, interval=60)
        w.note_grant("aa", "alice", 30, 300)
        w.note_grant("bb", "bob", 30, 300)
        assert w.register("aa", "bob", ("1",)) is None  # alice's grant
        before = w.register("aa", "alice", ("1", "2"))
        assert before is not None and before["grants"] == {"aa": {"1": None, "2": None}}
        assert not before["ok"]  # not polled yet: unknown, never "gone"
        w.register("bb", "bob", ("3",))
        q.jobs = [
            job("9", "PENDING", "Resources", prio=500),  # someone else's, ahead
            job("1", "PENDING", "Priority"),
            job("2", "RUNNING"),
            job("3", "PENDING", "Priority", prio=50),
        ]
        assert await w.poller.refresh()
        assert len(q.queries) == 1 and q.queries[0] is None  # one whole-queue query
        alice, bob = w.view("alice"), w.view("bob")
        assert alice["ok"] and set(alice["grants"]) == {"aa"} and set(bob["grants"]) == {"bb"}
        assert alice["grants"]["aa"]["1"] == {
            "state": "PENDING",
            "reason": "Priority",
            "partition": "gpu-fr",
            "position": 2,
        }
        assert alice["grants"]["aa"]["2"]["position"] == 0
        assert bob["grants"]["bb"]["3"]["position"] == 3
        # job 9 starts: everyone moves up, each user's version moves once
        v = w.view("alice")["version"]
        q.jobs[0] = job("9", "RUNNING")
        await w.poller.refresh()
        assert w.view("alice")["version"] == v + 1
        assert w.view("alice")["grants"]["aa"]["1"]["position"] == 1
        # a job that vanished from a successful answer is GONE; a failed answer is unknown
        q.jobs = []
        await w.poller.refresh()
        assert w.view("alice")["grants"]["aa"]["2"]["state"] == "GONE"
        q.down = True
        await w.poller.refresh()
        assert not w.view("alice")["ok"] and "down" in w.view("alice")["error"]
        # released: the grant and its jobs are no longer watched
        assert w.forget("aa", "alice") and w.view("alice")["grants"] == {}
        assert w.poller.tracked == {"3"}

    asyncio.run(run())


def test_long_poll_answers_on_a_change_or_after_the_wait() -> None:
    q = ScriptedQueue()

    async def run() -> None:
        w = SessionJobs(lambda: q, interval=60)
        w.note_grant("aa", "alice", 30, 300)
        v = w.register("aa", "alice", ("1",))["version"]  # type: ignore[index]
        waiter = asyncio.ensure_future(w.wait("alice", v, 10))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        q.jobs = [job("1", "RUNNING")]
        await w.poller.refresh()
        got = await asyncio.wait_for(waiter, 2)
        assert got["version"] > v and got["grants"]["aa"]["1"]["state"] == "RUNNING"
        same = await asyncio.wait_for(w.wait("alice", got["version"], 0.2), 2)
        assert same["version"] == got["version"]

    asyncio.run(run())


def test_queue_counts_come_from_the_same_query() -> None:
    q = ScriptedQueue()
    q.jobs = [job("1", "PENDING"), job("2", "RUNNING"), job("3", "RUNNING"), job("4", "CANCELLED")]

    async def run() -> dict[str, dict[str, int]]:
        w = SessionJobs(lambda: q, interval=60)
        first = await w.queue_counts(max_age=60)
        await w.queue_counts(max_age=60)  # fresh enough: no second query
        assert len(q.queries) == 1
        return first

    assert asyncio.run(run()) == {"gpu-fr": {"pending": 1, "running": 2}}


def test_the_service_reuses_the_hubs_answer_about_a_token_for_a_while() -> None:
    """Long-polls must not cost the hub two API calls each; refusals are never reused."""
    from sovereign_portal.hub.service import PortalService

    asked: list[str] = []

    async def hub(token: str) -> dict[str, object] | None:
        asked.append(token)
        return {"name": "alice", "groups": ["researcher"]} if token == "good" else None

    async def run() -> None:
        svc = PortalService(caller_cache_seconds=30)
        svc._hub_authenticate = hub  # type: ignore[method-assign]
        for _ in range(3):
            caller = await svc.caller_for("good")
            assert caller is not None and caller.name == "alice"
            assert await svc.caller_for("bad") is None
        assert asked == ["good", "bad", "bad", "bad"]
        assert all(b"good" not in k for k in svc._callers)  # a digest, not the token
        off = PortalService(caller_cache_seconds=0)
        off._hub_authenticate = hub  # type: ignore[method-assign]
        await off.caller_for("good")
        await off.caller_for("good")
        assert asked[-2:] == ["good", "good"]

    asyncio.run(run())
