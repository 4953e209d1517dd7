"""The hub side of the ledger (hub/ledger_hub.py) on the real batched poller with a fake
scheduler client: the fast inner layer of tests/hub/test_ledger_slurm.py.

It shows what the real-Slurm tests cannot count: the ledger adds no scheduler call. Every
record is attached and closed from the answer of a poll the spawners already make, and a
record whose server is gone joins that same query.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sovereign_portal.hub import ledger as L
from sovereign_portal.hub.ledger_hub import HubLedger
from sovereign_portal.hub.ledger_store import LedgerStore
from sovereign_portal.hub.store import PortalStore
from sovereign_portal.spawners.request import parse_request, resolve
from sovereign_portal.spawners.site import load_site
from sovereign_portal.spawners.slurm.client import JobInfo, NodeInfo, SchedulerClient
from sovereign_portal.spawners.slurm.scheduler import JobPoller

from tests.support.slurm_cluster import SITE_FILE

pytestmark = pytest.mark.unit
SITE = load_site(SITE_FILE)


class FakeSlurm(SchedulerClient):
    """Job states set by the test; counts every query."""

    def __init__(self) -> None:
        self.states: dict[str, tuple[str, str]] = {}  # job id -> (state, nodes)
        self.queries: list[list[str]] = []

    async def submit(self, script: str, options: Sequence[str] = (), **kw: Any) -> str:
        raise AssertionError("the ledger never submits")

    async def cancel(self, job_ids: Sequence[str], *, user: str | None = None) -> None:
        raise AssertionError("the ledger never cancels")

    async def query(
        self, job_ids: Collection[str] | None = None, *, name: str | None = None
    ) -> dict[str, JobInfo]:
        ids = sorted(job_ids or [])
        self.queries.append(ids)
        return {
            j: JobInfo(j, s, "None", n, "N/A", "u", "")
            for j, (s, n) in self.states.items()
            if j in ids
        }

    async def job_detail(self, job_id: str) -> dict[str, str]:
        raise AssertionError("the ledger asks for no job detail")

    async def nodes(self, partition: str | None = None) -> Mapping[str, NodeInfo]:  # type: ignore[override]
        raise AssertionError("the ledger asks for no nodes")


def fake_spawner(user: str, poller: JobPoller, **req: Any) -> Any:
    r = resolve(SITE, parse_request({"kind": "notebook", "partition": "gpu-fr", **req}))
    return SimpleNamespace(
        user=SimpleNamespace(name=user, groups=[], roles=[], admin=False),
        name="",
        backend="slurm",
        resolved=r,
        site=SITE,
        job_id="",
        stop_reason="",
        poller=poller,
        pending=None,
        ledger_end_reason="",
        log=logging.getLogger("test"),
    )


@pytest.fixture
def env(tmp_path: Path) -> Any:
    store = PortalStore(f"sqlite:///{tmp_path / 'portal.sqlite'}")
    store.upgrade()
    fake = FakeSlurm()
    poller = JobPoller(interval=3600, client=fake)
    hub = HubLedger(LedgerStore(store))
    hub.ready = True
    yield SimpleNamespace(hub=hub, fake=fake, poller=poller, ledger=hub.store)
    store.dispose()


async def finish(poller: JobPoller) -> None:
    """Stop the poller's background loop (the test drives every poll itself)."""
    task = poller._task
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _lifecycle(env: Any, final: str, stop_reason: str) -> L.Record:
    hub, fake, poller = env.hub, env.fake, env.poller
    sp = fake_spawner("ada", poller, slice="3g.40gb")
    await hub.pre_spawn_hook(sp)
    (rec,) = env.ledger.list_open()
    assert rec.started_at is None  # a Slurm record starts when its job runs
    sp.job_id = "41"  # submitted (the spawner tracks its job)
    poller.track("41")
    fake.states["41"] = ("PENDING", "")
    await poller.refresh()
    assert env.ledger.get(rec.id).started_at is None  # queued: not charged
    fake.states["41"] = ("RUNNING", "mig-a")
    await poller.refresh()
    got = env.ledger.get(rec.id)
    assert got.job_ids == ("41",) and got.nodes == "mig-a" and got.started_at is not None
    fake.states["41"] = ("COMPLETING", "mig-a")
    await poller.refresh()
    seen = time.time()
    sp.stop_reason = stop_reason  # what the spawner's own poll noted
    await hub.post_stop_hook(sp)
    sp.job_id = ""  # clear_state: the spawner follows its COMPLETING job to its end
    poller.follow("41", lambda info: None)
    fake.states["41"] = (final, "mig-a")
    await poller.refresh()  # the follow sees the final state, then forgets the job
    if env.ledger.get(rec.id).closed is False:
        await poller.refresh()  # the ledger kept it in the batch: the next poll answers
    done = env.ledger.get(rec.id)
    assert done.closed
    assert done.ended_at == pytest.approx(seen, abs=0.5)  # when the hub first saw it end
    # Every query was the batched poll, one id each time: the ledger added none.
    assert all(q == ["41"] for q in fake.queries) and len(fake.queries) <= 5
    await finish(poller)
    return done


@pytest.mark.parametrize(
    ("final", "reason"),
    [
        ("CANCELLED", "scancel"),
        ("TIMEOUT", "walltime"),
        ("NODE_FAIL", "node_failure"),
        ("FAILED", "died"),
        ("COMPLETED", "died"),
    ],
)
@pytest.mark.asyncio
async def test_a_job_that_ends_by_itself_closes_with_its_final_state(
    env: Any, final: str, reason: str
) -> None:
    done = await _lifecycle(env, final, stop_reason="Slurm job 41: completing")
    assert done.end_reason == reason
    assert done.amounts is not None and done.amounts.gpu_seconds_basis == "measured"
    assert env.ledger.verify() == (1, None)


@pytest.mark.asyncio
async def test_the_hubs_own_stop_is_stopped(env: Any) -> None:
    assert (await _lifecycle(env, "CANCELLED", stop_reason="")).end_reason == "stopped"


@pytest.mark.asyncio
async def test_a_budget_stop_keeps_its_reason(env: Any) -> None:
    sp = fake_spawner("bo", env.poller, gpus=1)
    await env.hub.pre_spawn_hook(sp)
    (rec,) = env.ledger.list_open()
    sp.ledger_end_reason = "budget"
    await env.hub.post_stop_hook(sp)
    assert env.ledger.get(rec.id).end_reason == "budget"


@pytest.mark.asyncio
async def test_start_up_tracks_orphans_in_the_same_query(env: Any) -> None:
    hub, fake, poller = env.hub, env.fake, env.poller
    r = resolve(SITE, parse_request({"kind": "notebook", "gpus": 1}))
    lost = L.attach(
        L.open_record(r, user="cy", now=1.0, source="server:cy/"),
        job_ids=["7"],
        started_at=2.0,
    )
    env.ledger.open(lost)
    never = L.open_record(r, user="di", now=1.0, source="server:di/")
    env.ledger.open(never)
    poller.track("8")  # a re-adopted server's job
    fake.states.update({"7": ("CANCELLED", "h100-1"), "8": ("RUNNING", "h100-2")})
    hub.ready = False
    app = SimpleNamespace(users={})
    await hub.reconcile_at_start(app, poller)
    assert fake.queries == [["7", "8"]]  # one query for both
    cy = env.ledger.get(lost.id)
    assert cy.end_reason == "scancel" and cy.amounts.gpu_seconds_basis == "estimated"
    di = env.ledger.get(never.id)  # no job ever: closed, nothing charged
    assert di.end_reason == "died" and di.amounts.gpu_seconds == 0
    assert "7" not in poller.tracked and "8" in poller.tracked
    await finish(poller)
