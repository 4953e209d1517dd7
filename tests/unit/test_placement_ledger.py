"""A ledger record of a server placed at a site carries that site, its country and its
operator (hub/ledger_hub.py's pre-spawn hook, on the real store), for both sites of the
two-site file."""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sovereign_portal.hub.ledger_hub import HubLedger
from sovereign_portal.hub.ledger_store import LedgerStore
from sovereign_portal.hub.store import PortalStore
from sovereign_portal.spawners.request import parse_request, resolve
from sovereign_portal.spawners.site import load_site
from sovereign_portal.spawners.slurm.client import JobInfo, NodeInfo, SchedulerClient
from sovereign_portal.spawners.slurm.scheduler import JobPoller

from tests.support.paths import REPO

pytestmark = pytest.mark.unit
SITE = load_site(REPO / "tests" / "support" / "sites" / "two-sites.toml")


class Silent(SchedulerClient):
    async def submit(self, script: str, options: Sequence[str] = (), **kw: Any) -> str:
        raise AssertionError("the ledger never submits")

    async def cancel(self, job_ids: Sequence[str], *, user: str | None = None) -> None:
        raise AssertionError("the ledger never cancels")

    async def query(
        self, job_ids: Collection[str] | None = None, *, name: str | None = None
    ) -> dict[str, JobInfo]:
        return {}

    async def job_detail(self, job_id: str) -> dict[str, str]:
        raise AssertionError("no job detail")

    async def nodes(self, partition: str | None = None) -> dict[str, NodeInfo]:
        raise AssertionError("no nodes")


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("partition", "site", "country", "operator"),
    [("gpu-fr", "paris", "FR", "Test Centre FR"), ("gpu-de", "julich", "DE", "Test Centre DE")],
)
async def test_the_record_carries_the_placed_site(
    tmp_path: Path, partition: str, site: str, country: str, operator: str
) -> None:
    store = PortalStore(f"sqlite:///{tmp_path / 'portal.sqlite'}")
    store.upgrade()
    try:
        hub = HubLedger(LedgerStore(store))
        hub.ready = True
        r = resolve(SITE, parse_request({"kind": "notebook", "partition": partition, "gpus": 1}))
        sp = SimpleNamespace(
            user=SimpleNamespace(name="ada", groups=[], roles=[], admin=False),
            name="",
            backend="slurm",
            resolved=r,
            site=SITE,
            job_id="",
            stop_reason="",
            poller=JobPoller(interval=3600, client=Silent()),
            pending=None,
            ledger_end_reason="",
            log=logging.getLogger("test"),
        )
        await hub.pre_spawn_hook(sp)
        (rec,) = hub.store.list_open()  # type: ignore[union-attr]
        assert (rec.site, rec.country, rec.operator, rec.partition) == (
            site,
            country,
            operator,
            partition,
        )
    finally:
        store.dispose()
