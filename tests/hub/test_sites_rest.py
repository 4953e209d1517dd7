"""Two real Slurm sites: paris (FR, its CLI) and julich (DE, behind slurmrestd with JWT).

Each is its own cluster (tests/support/slurm_cluster.py ``slurm_sites``: own ClusterName,
slurmctld and slurmd ports, munge key and socket; julich has its own JWT key and a real
slurmrestd on 127.0.0.1). The portal side is the real code: the site file
(two-sites.toml, rewritten to these clusters), each site's scheduler client, per-site
pollers, site states from their whole-queue answers, and placement.

Shown here: the REST transport gives the same job states as the CLI on the same cluster;
a bad token submits nothing; an FR-only project never lands in DE even when FR is full
(it queues on FR with a message); an EU-wide user goes to DE when FR is full; stopping
julich's slurmrestd removes it from the offer while its running job is kept unknown (not
stopped), and the job is reconciled when slurmrestd returns.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from sovereign_portal.spawners.placement import Need, PlacementRefused, Rule, place
from sovereign_portal.spawners.site import load_site
from sovereign_portal.spawners.slurm.client import SchedulerError, SlurmCLI, slurm_env
from sovereign_portal.spawners.slurm.rest import SlurmREST
from sovereign_portal.spawners.slurm.sites import (
    client_for,
    refresh_states,
    site_clients,
    site_pollers,
)

from tests.support.slurm_cluster import (  # noqa: F401 - the fixture
    SlurmCluster,
    slurm_sites,
    write_site_file,
)

pytestmark = [pytest.mark.slurm, pytest.mark.slurm_sites, pytest.mark.timeout(300)]

FR_ONLY = [Rule("project", "climate", frozenset({"FR"}))]
EU = [Rule("project", "europa", frozenset({"FR", "DE", "IT", "NL"}), "EU")]
SCRIPT = (
    "#!/bin/bash\n#SBATCH --job-name={name}\n#SBATCH --partition=gpu\n"
    "#SBATCH --gres=gpu:h100:{gpus}\n#SBATCH --time=10\n#SBATCH --comment={comment}\n"
    "#SBATCH --output=/dev/null\n"
    "sleep 600\n"
)


def _script(gpus: int, name: str = "sp-sites-test", comment: str = "sites-test") -> str:
    return SCRIPT.format(gpus=gpus, name=name, comment=comment)


@pytest.fixture(scope="module")
def sites(slurm_sites: dict[str, SlurmCluster], tmp_path_factory: Any) -> dict[str, Any]:  # noqa: F811
    d = tmp_path_factory.mktemp("sites")
    token = slurm_sites["julich"].write_token(d / "julich.jwt", user="root")
    site_file = write_site_file(
        d / "two-sites.toml", slurm_sites["paris"], slurm_sites["julich"], token
    )
    return {"clusters": slurm_sites, "file": site_file, "token": token, "dir": d}


@pytest.fixture(autouse=True)
def _clean(sites: dict[str, Any]) -> Any:
    yield
    for c in sites["clusters"].values():
        c.cancel_all_jobs()
    for c in sites["clusters"].values():
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            r = c.run(["squeue", "-h", "-t", "PD,R,CG,CF", "-o", "%i"], check=False)
            if not r.stdout.strip():
                break
            time.sleep(0.2)


def _cli(c: SlurmCluster) -> SlurmCLI:
    env = slurm_env()
    env["SLURM_CONF"] = str(c.conf)
    return SlurmCLI(env=env, submit_prefix=["runuser", "-u", "{unix_user}", "--"])


async def _wait_state(client: Any, job_id: str, states: set[str], within: float = 30) -> Any:
    deadline = time.monotonic() + within
    info = None
    while time.monotonic() < deadline:
        info = (await client.query([job_id])).get(job_id)
        if info is not None and info.state in states:
            return info
        if info is not None and info.ended and not states & {"CANCELLED", "COMPLETED"}:
            break
        await asyncio.sleep(0.1)
    raise AssertionError(f"job {job_id} is {info}, not in {states}")


def test_rest_gives_the_cli_s_job_states_on_the_same_cluster(sites: dict[str, Any]) -> None:
    julich = sites["clusters"]["julich"]
    rest = SlurmREST(julich.rest_url, sites["token"])
    cli = _cli(julich)

    async def run() -> None:
        job_id = await rest.submit(_script(2), user="sxalice", cwd="/tmp")
        running = await _wait_state(rest, job_id, {"RUNNING"})
        by_cli = (await cli.query([job_id]))[job_id]
        assert running == by_cli, (running, by_cli)
        assert running.user == "sxalice" and running.nodes == "de-h100-a"
        assert running.comment == "sites-test" and running.devices == 2
        # The whole queue in one call, as squeue -t all gives it.
        assert (await rest.query(None)).keys() == (await cli.query(None)).keys()
        detail = await rest.job_detail(job_id)
        assert (detail["JobState"], detail["UserId"], detail["Partition"]) == (
            "RUNNING",
            "sxalice",
            "gpu",
        )
        nodes = await rest.nodes("gpu")
        assert list(nodes) == ["de-h100-a"] and nodes["de-h100-a"].addr == "127.0.0.1"
        await rest.cancel([job_id], user="sxalice")
        gone = await _wait_state(cli, job_id, {"CANCELLED"})
        assert gone.ended
        await rest.cancel([job_id], user="sxalice")  # already ended: not an error

    asyncio.run(run())


def test_a_server_job_s_sbatch_lines_submit_through_rest(sites: dict[str, Any]) -> None:
    """The directives a notebook server's job carries (jobscript.sbatch_directives)."""
    julich = sites["clusters"]["julich"]
    rest = SlurmREST(julich.rest_url, sites["token"])
    script = (
        "#!/bin/bash\n#SBATCH --job-name=sovereign-portal\n#SBATCH --comment=sp:test\n"
        "#SBATCH --partition=gpu\n#SBATCH --nodes=1\n#SBATCH --gres=gpu:h100:1\n"
        "#SBATCH --ntasks=1\n#SBATCH --time=10\n#SBATCH --chdir=/tmp\n"
        "#SBATCH --output=/dev/null\n#SBATCH --export=NONE\n#SBATCH --no-requeue\n"
        "#SBATCH --signal=B:TERM@60\nset -eu\nexec sleep 600\n"
    )

    async def run() -> None:
        job_id = await rest.submit(script, user="sxalice")
        info = await _wait_state(rest, job_id, {"RUNNING"})
        assert (info.comment, info.devices, info.user) == ("sp:test", 1, "sxalice")
        detail = await rest.job_detail(job_id)
        assert detail["TimeLimit"] == "10" and detail["WorkDir"] == "/tmp", detail
        await rest.cancel([job_id], user="sxalice")

    asyncio.run(run())


def test_a_bad_token_submits_nothing(sites: dict[str, Any]) -> None:
    julich = sites["clusters"]["julich"]
    d: Path = sites["dir"]
    other = SlurmCluster(d / "unused", cluster_name="other", jwt=True)
    other.jwt_key.parent.mkdir(parents=True, exist_ok=True)
    other._jwt_lines()  # a key of its own: a token julich never issued
    forged = other.write_token(d / "forged.jwt", user="root")
    before = {j["id"] for j in julich.jobs()}

    async def run() -> None:
        with pytest.raises(SchedulerError) as e:
            await SlurmREST(julich.rest_url, forged).submit(_script(1), user="sxalice", cwd="/tmp")
        assert forged.read_text().strip() not in str(e.value)
        # A plain user's own token cannot act for another user.
        bob = julich.write_token(d / "bob.jwt", user="sxbob")
        with pytest.raises(SchedulerError):
            await SlurmREST(julich.rest_url, bob).submit(_script(1), user="sxalice", cwd="/tmp")

    asyncio.run(run())
    assert {j["id"] for j in julich.jobs()} - before == set()


def _fill(c: SlurmCluster, client: Any) -> str:
    """A real job holding all 8 GPUs of the site's only node; returns its id."""

    async def run() -> str:
        job_id = await client.submit(_script(8, name="filler"), user="sxbob", cwd="/tmp")
        await _wait_state(client, job_id, {"RUNNING"})
        return job_id

    return asyncio.run(run())


def test_fr_only_never_lands_in_de_even_when_fr_is_full(sites: dict[str, Any]) -> None:
    site = load_site(sites["file"])
    paris, julich = sites["clusters"]["paris"], sites["clusters"]["julich"]
    clients = site_clients(site, ["runuser", "-u", "{unix_user}", "--"])
    _fill(paris, clients["paris"])
    pollers = site_pollers(site, 1.0, 0.0, 0.2)

    async def run() -> None:
        states = await refresh_states(site, pollers, max_age=0)
        assert states["paris"].free == {"gpu-fr": 0} and states["julich"].free == {"gpu-de": 8}
        got = place(site, Need(1), FR_ONLY, states)
        assert (got.site, got.partition, got.queued) == ("paris", "gpu-fr", True)
        assert "it never moves to a site your rules forbid" in got.why
        with pytest.raises(PlacementRefused, match="FR-only rule does not allow"):
            place(site, Need(1), FR_ONLY, states, site_choice="julich")
        # Submitted where placement said: it waits in paris's queue; julich gets nothing.
        job_id = await clients[got.site].submit(_script(1), user="sxalice", cwd="/tmp")
        info = await _wait_state(clients["paris"], job_id, {"PENDING"})
        assert info.reason in ("Resources", "Priority", "None")
        states = await refresh_states(site, pollers, max_age=0)
        assert place(site, Need(1), FR_ONLY, states).queued

    asyncio.run(run())
    assert [j for j in julich.jobs() if j["state"] in ("PENDING", "RUNNING")] == []
    assert any(j["user"] == "sxalice" and j["state"] == "PENDING" for j in paris.jobs())


def test_an_eu_user_goes_to_de_when_fr_is_full(sites: dict[str, Any]) -> None:
    site = load_site(sites["file"])
    paris, julich = sites["clusters"]["paris"], sites["clusters"]["julich"]
    clients = site_clients(site, ["runuser", "-u", "{unix_user}", "--"])
    pollers = site_pollers(site, 1.0, 0.0, 0.2)

    async def run() -> str:
        states = await refresh_states(site, pollers, max_age=0)
        first = place(site, Need(1), EU, states)
        assert first.site == "paris" and not first.queued  # both free: FR's queue and price
        return ""

    asyncio.run(run())
    _fill(paris, clients["paris"])

    async def full() -> str:
        states = await refresh_states(site, pollers, max_age=0)
        got = place(site, Need(1), EU, states)
        assert (got.site, got.partition, got.country, got.queued) == (
            "julich",
            "gpu-de",
            "DE",
            False,
        )
        assert got.why.startswith("gpu-de at site julich (DE): allowed by project europa's EU")
        assert site.site_name_of(got.partition) == "julich"  # what the ledger records
        assert site.partition(got.partition).jurisdiction.country == "DE"
        job_id = await clients[got.site].submit(_script(1), user="sxalice", cwd="/tmp")
        await _wait_state(clients["julich"], job_id, {"RUNNING"})
        return job_id

    job_id = asyncio.run(full())
    assert [j["user"] for j in julich.jobs() if j["id"] == job_id] == ["sxalice"]
    # (job ids are each cluster's own: paris may have an ended job with the same id)
    active = ("PENDING", "RUNNING", "CONFIGURING")
    assert [j for j in paris.jobs() if j["user"] == "sxalice" and j["state"] in active] == []


def test_an_unreachable_site_is_not_offered_and_its_jobs_are_kept(sites: dict[str, Any]) -> None:
    site = load_site(sites["file"])
    julich = sites["clusters"]["julich"]
    rest = client_for(site.cluster_site("julich"))
    pollers = site_pollers(site, 1.0, 0.0, 0.2)
    poller = pollers["julich"]

    async def run() -> None:
        job_id = await rest.submit(_script(1), user="sxalice", cwd="/tmp")
        await _wait_state(rest, job_id, {"RUNNING"})
        poller.track(job_id)
        assert await poller.refresh()
        assert poller.info(job_id) is not None and poller.info(job_id).state == "RUNNING"
        julich.stop_rest()
        try:
            assert not await poller.refresh()  # unknown, not an answer
            info = poller.info(job_id)
            assert info is not None and info.state == "RUNNING" and not info.ended
            states = await refresh_states(site, pollers, max_age=0)
            assert not states["julich"].reachable and states["paris"].reachable
            got = place(site, Need(1), EU, states)
            assert got.site == "paris" and got.unreachable == ("julich",)
            assert "julich cannot be reached now" in got.why
            with pytest.raises(PlacementRefused, match="julich: its scheduler does not answer"):
                place(site, Need(1), EU, states, site_choice="julich")
            # The job itself runs on: slurmctld never lost it.
            r = julich.run(["squeue", "-h", "-j", job_id, "-o", "%T"])
            assert r.stdout.strip() == "RUNNING"
            julich.run(["scancel", job_id])  # it ends while the hub cannot see the site
        finally:
            julich.start_rest()
        assert await poller.refresh()  # reconciled from the site's own answer
        info = poller.info(job_id)
        assert info is not None and info.ended, info
        states = await refresh_states(site, pollers, max_age=0)
        assert states["julich"].reachable
        poller.untrack(job_id)

    asyncio.run(run())
