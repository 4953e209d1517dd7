"""Compute sessions across sites, inner layer (the real two-cluster test is
tests/hub/test_sites_sessions.py).

- Admission places a session at its notebook's site (``Caller.site``), never at another
  one, and residency still holds: an FR-only caller whose notebook is in DE is refused.
- The portal service's watch polls each site through that site's own client (one
  whole-queue query per site per refresh), looks a job id up at its session's site only
  (ids are a site's own), and never makes the hub host's client when sites are declared.
- The server a token belongs to is read from its scopes.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sovereign_portal.hub.admission import AdmissionError, Caller, admit
from sovereign_portal.hub.service import server_of_token
from sovereign_portal.hub.session_jobs import JobsRequestError, SessionJobs
from sovereign_portal.spawners.placement import session_partitions
from sovereign_portal.spawners.site import load_site
from sovereign_portal.spawners.slurm.client import JobInfo

from tests.support.slurm_cluster import TWO_SITE_FILE
from tests.unit.test_session_jobs import ScriptedQueue

pytestmark = pytest.mark.unit

SITE = load_site(TWO_SITE_FILE)
RESIDENCY = {"proj-fr": ["FR"], "proj-eu": ["FR", "DE"]}


def caller(site: str, *groups: str) -> Caller:
    return Caller("rita", frozenset({"researcher", *groups}), "researcher", site=site)


@pytest.mark.parametrize(
    ("site", "groups", "partition", "placed"),
    [
        ("julich", ("proj-eu",), None, "gpu-de"),
        ("paris", ("proj-eu",), None, "gpu-fr"),
        ("julich", (), None, "gpu-de"),
        ("paris", ("proj-fr",), None, "gpu-fr"),
        ("julich", ("proj-eu",), "gpu-de", "gpu-de"),
        ("", ("proj-eu",), None, "gpu-fr"),  # not known: the first allowed partition
        ("", ("proj-eu",), "gpu-de", "gpu-de"),
    ],
)
def test_a_session_runs_at_its_notebooks_site(
    site: str, groups: tuple[str, ...], partition: str | None, placed: str
) -> None:
    req: dict[str, Any] = {"kind": "dask", "gpus": 1}
    if partition:
        req["partition"] = partition
    g = admit(SITE, req, caller(site, *groups), residency=RESIDENCY)
    assert g.partition == placed


@pytest.mark.parametrize(
    ("site", "groups", "partition", "reason", "match"),
    [
        # FR-only, notebook in DE (it cannot be: the refusal says why, never DE)
        ("julich", ("proj-fr",), None, "residency", "site julich \\(DE\\), where your rules"),
        ("julich", ("proj-fr",), "gpu-de", "residency", "site julich \\(DE\\)"),
        # the other site, although residency allows it: never spans or moves sites
        ("julich", ("proj-eu",), "gpu-fr", "site", "'gpu-fr' is at site paris; .* julich"),
        ("paris", ("proj-eu",), "gpu-de", "site", "'gpu-de' is at site julich; .* paris"),
        # residency refuses DE whatever the site
        ("", ("proj-fr",), "gpu-de", "partition", "not open to you"),
    ],
)
def test_a_session_never_leaves_its_notebooks_site(
    site: str, groups: tuple[str, ...], partition: str | None, reason: str, match: str
) -> None:
    req: dict[str, Any] = {"kind": "dask", "gpus": 1}
    if partition:
        req["partition"] = partition
    with pytest.raises(AdmissionError, match=match) as e:
        admit(SITE, req, caller(site, *groups), residency=RESIDENCY)
    assert e.value.reason == reason


def test_session_partitions_without_sites_is_the_identity() -> None:
    from tests.support.slurm_cluster import SITE_FILE

    one = load_site(SITE_FILE)
    parts = list(one.partitions)
    assert session_partitions(one, parts, "julich", None) == parts
    assert session_partitions(SITE, list(SITE.partitions), "nowhere", None) == list(SITE.partitions)


def job(jid: str, state: str, partition: str = "gpu") -> JobInfo:
    return JobInfo(jid, state, "None", "", "N/A", "u", "", partition, 100)


def test_each_site_is_polled_through_its_own_client_once_per_refresh() -> None:
    paris, julich = ScriptedQueue(), ScriptedQueue()
    # the same job id at both sites: each session sees its own site's job
    paris.jobs = [job("5", "RUNNING")]
    julich.jobs = [job("5", "PENDING"), job("6", "RUNNING")]

    def host() -> Any:
        raise AssertionError("with [[sites]] the hub host's client is never made")

    async def run() -> None:
        w = SessionJobs(
            host, interval=60, site_clients={"paris": lambda: paris, "julich": lambda: julich}
        )
        w.note_grant("aa", "alice", 30, 300, site="julich")
        w.note_grant("bb", "bob", 30, 300, site="paris")
        w.register("aa", "alice", ("5", "6"))
        w.register("bb", "bob", ("5",))
        for p in w.pollers().values():
            assert await p.refresh()
        assert (len(paris.queries), len(julich.queries)) == (1, 1)
        a = w.view("alice")
        assert a["ok"] and a["grants"]["aa"]["5"]["state"] == "PENDING"
        assert a["grants"]["aa"]["6"]["state"] == "RUNNING"
        assert w.view("bob")["grants"]["bb"]["5"]["state"] == "RUNNING"
        # julich stops answering: only its sessions are unknown, with the site named
        julich.down = True
        assert not await w.poller_for("julich").refresh()
        assert await w.poller_for("paris").refresh()
        a, b = w.view("alice"), w.view("bob")
        assert not a["ok"] and "site julich" in a["error"]
        assert b["ok"] and b["error"] is None
        # after a restart, a grant adopts its site from its record
        w.register("cc", "carol", ("6",), site="julich")
        assert w.grants["cc"].site == "julich"
        with pytest.raises(JobsRequestError, match=r"'site'.*not a declared site"):
            w.note_grant("dd", "dan", 30, 300, site="berlin")

    asyncio.run(run())


@pytest.mark.parametrize(
    ("scopes", "server"),
    [
        (["access:servers!server=ada/", "users:activity!user=ada"], ""),
        (["access:servers!server=ada/big"], "big"),
        (["access:servers!user=ada", "read:users"], None),  # a user's own token
        (["access:servers!server=bob/"], None),  # another user's server: not hers
        (["access:servers!server=ada/", "access:servers!server=ada/x"], None),
    ],
)
def test_the_server_of_a_token_comes_from_its_scopes(scopes: list[str], server: str | None) -> None:
    assert server_of_token("ada", scopes) == server


class _Cluster(ScriptedQueue):
    """A site's queue that records cancels (the sweep cancels as the job's owner)."""

    def __init__(self) -> None:
        super().__init__()
        self.cancelled: list[tuple[list[str], str | None]] = []

    async def cancel(self, job_ids: Any, *, user: str | None = None) -> None:
        self.cancelled.append((list(job_ids), user))


def test_the_orphan_sweep_looks_at_every_site_through_its_own_client(tmp_path: Any) -> None:
    from sovereign_portal.spawners.slurm.client import JobInfo as Info
    from sovereign_portal.spawners.slurm.jobscript import JOB_NAME, make_tag
    from sovereign_portal.spawners.slurm.scheduler import JobPoller
    from sovereign_portal.spawners.slurm.spawner import SlurmGPUSpawner
    from traitlets.config import Config

    key_file = tmp_path / "tag.key"
    key_file.write_text("k" * 64)
    cfg = Config()
    cfg.SlurmGPUSpawner.site_file = str(TWO_SITE_FILE)
    cfg.SlurmGPUSpawner.tag_key_file = str(key_file)
    paris, julich, down = _Cluster(), _Cluster(), _Cluster()
    down.down = True
    tag = make_tag(b"k" * 64, "feedc0ffee00")

    def portal_job(jid: str) -> Info:
        return Info(
            jid, "RUNNING", "None", "n", "N/A", "spdave", f"sovereign-portal:{tag}", "gpu", 1
        )

    class Sweeper(SlurmGPUSpawner):
        targets: list[Any] = []

        def _sweep_targets(self) -> list[Any]:
            return self.targets

    async def run() -> None:
        # job 5 at both sites: tracked at paris only (a re-adopted server), an orphan at julich
        paris.jobs, julich.jobs = [portal_job("5")], [portal_job("5")]
        pollers = {
            s: JobPoller(60, 0, 60, client=c) for s, c in (("paris", paris), ("julich", julich))
        }
        pollers["paris"].track("5")
        sw = Sweeper(config=cfg)
        sw.targets = [("paris", paris, pollers["paris"]), ("julich", julich, pollers["julich"])]
        assert await sw.sweep_orphans() == ["5"]
        assert julich.cancelled == [(["5"], "spdave")] and paris.cancelled == []
        assert sw.swept == {"paris": [], "julich": ["5"]}
        assert paris.queries == [None] and julich.queries == [None]  # one query per site
        # a site that does not answer: nothing cancelled there, the others still swept
        julich.cancelled.clear()
        sw.targets = [("paris", down, pollers["paris"]), ("julich", julich, pollers["julich"])]
        assert await sw.sweep_orphans() == ["5"] and set(sw.swept) == {"julich"}
        for p in pollers.values():
            p.untrack("5")

    asyncio.run(run())
    assert JOB_NAME == "sovereign-portal"
