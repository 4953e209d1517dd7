"""Compute sessions against the real local Slurm cluster (emulated GPU nodes).

The chain is real from the REST API down: a ``jupyter server`` subprocess with the
portal extension asks the portal service (the real app; only hub authentication is a
token table here, see test_sessions_hub.py for the hub) for a Grant, then submits Dask
workers through dask-jobqueue or a torch job through sbatch + srun. After every test,
squeue shows no portal job.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import pytest
from sovereign_portal.extension.client import (
    DaskSession,
    PortalError,
    TorchSession,
    handle_for,
)

from tests.support.sessions import JupyterServer, PortalServiceThread
from tests.support.slurm_cluster import SITE_FILE, SlurmCluster

pytestmark = [pytest.mark.slurm, pytest.mark.slurm_second, pytest.mark.timeout(180)]

# workers cannot import the tests package: ship this module's functions by value
cloudpickle.register_pickle_by_value(sys.modules[__name__])

TOKEN = "server-token-of-syalice"


def portal_jobs(cluster: SlurmCluster) -> list[dict[str, str]]:
    return [
        j
        for j in cluster.jobs()
        if j["name"].startswith("portal-") and j["state"] in ("PENDING", "RUNNING", "COMPLETING")
    ]


def wait_no_portal_jobs(cluster: SlurmCluster, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not portal_jobs(cluster):
            return
        time.sleep(0.2)
    raise AssertionError(f"portal jobs left behind: {portal_jobs(cluster)}")


@pytest.fixture(scope="module")
def service() -> Iterator[PortalServiceThread]:
    svc = PortalServiceThread(
        str(SITE_FILE), {TOKEN: {"name": "syalice", "groups": ["researcher"]}}
    ).start()
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def server(
    slurm_cluster: SlurmCluster,
    service: PortalServiceThread,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[JupyterServer]:
    work = tmp_path_factory.mktemp("sessions-slurm")
    work.chmod(0o755)
    srv = JupyterServer(work, service.url, TOKEN, memory_per_worker="1GiB").start()
    yield srv
    srv.stop()
    assert srv.egress() == "", srv.egress()


@pytest.fixture(autouse=True)
def no_leftovers(slurm_cluster: SlurmCluster) -> Iterator[None]:
    yield
    wait_no_portal_jobs(slurm_cluster)


def start(srv: JupyterServer, timeout: float = 90, **request: object) -> DaskSession | TorchSession:
    c = srv.client()
    info = c.create(request)
    try:
        info = c.wait(info["id"], timeout)
    except BaseException:
        c.stop(info["id"])
        raise
    return handle_for(c, info)


def _where() -> tuple[str, str]:
    return os.environ.get("SLURMD_NODENAME", ""), os.environ.get("CUDA_VISIBLE_DEVICES", "")


def test_dask_four_gpu_workers_across_two_nodes(
    server: JupyterServer, slurm_cluster: SlurmCluster
) -> None:
    # Two fillers take 6 of 8 GPUs on each H100 node, so the two 2-GPU jobs land one per node.
    fillers = [
        slurm_cluster.run(
            [
                "sbatch",
                "--parsable",
                "-p",
                "gpu-fr",
                "--gres=gpu:h100:6",
                "-J",
                "filler",
                "--output=/dev/null",
                "--wrap",
                "sleep 300",
            ]
        ).stdout.strip()
        for _ in range(2)
    ]
    try:
        for f in fillers:
            slurm_cluster.wait_job_state(f, ["RUNNING"])
        s = start(server, kind="dask", partition="gpu-fr", accelerator="h100", gpus=2, count=2)
        assert isinstance(s, DaskSession)
        try:
            assert s.info["workers_up"] == 4 and len(s.info["jobs"]) == 2
            client = s.client
            where = sorted(client.run(_where).values())
            assert len(where) == 4 and len(set(where)) == 4, where
            assert {n for n, _ in where} == {"h100-a", "h100-b"}
            assert all("," not in dev and dev for _, dev in where), where
            futures = client.map(lambda x: x * x, range(100))
            assert client.submit(sum, futures).result() == sum(x * x for x in range(100))
            assert s.info["scheduler_address"].startswith("tls://")
        finally:
            s.close()
        assert server.client().get(s.id)["state"] == "stopped"
    finally:
        slurm_cluster.run(["scancel", *fillers], check=False)


def test_dask_workers_on_mig_slices_see_their_own_slice(server: JupyterServer) -> None:
    s = start(server, kind="dask", partition="gpu-fr", slice="1g.10gb", count=3)
    assert isinstance(s, DaskSession)
    with s:
        where = list(s.client.run(_where).values())
        assert len(where) == 3
        assert {n for n, _ in where} == {"mig-a"}
        assert len({d for _, d in where}) == 3, where
        grant = s.info["grant"]
        assert "--gres=gpu:h100_1g.10gb:1" in grant["scheduler_args"]


def _allreduce(offset: int) -> float:
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(dist.get_rank() + offset)])
    dist.all_reduce(t)
    print(f"sum={t.item()}")
    return float(t.item())


def _who() -> dict[str, object]:
    import torch.distributed as dist

    return {
        "rank": dist.get_rank(),
        "world": dist.get_world_size(),
        "node": os.environ.get("SLURMD_NODENAME"),
        "device": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "token_names": sorted(k for k in os.environ if "TOKEN" in k),
    }


def test_torch_two_nodes_by_two_ranks(
    server: JupyterServer, slurm_cluster: SlurmCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    s = start(server, kind="torch", partition="gpu-fr", accelerator="h100", gpus=2, count=2)
    assert isinstance(s, TorchSession)
    with s:
        assert s.world_size == 4 and s.backend == "gloo"
        assert s.run(_allreduce, 1) == [10.0] * 4  # (0+1)+(1+1)+(2+1)+(3+1)
        out = capsys.readouterr().out
        assert all(f"[rank {r}] sum=10.0" in out for r in range(4)), out
        # a second function on the same allocation: no new job
        jobs = [j["id"] for j in portal_jobs(slurm_cluster)]
        who = s.run(_who)
        assert [w["rank"] for w in who] == [0, 1, 2, 3]
        assert all(w["token_names"] == [] for w in who)  # the job env is the allow-list
        assert {w["node"] for w in who} == {"h100-a", "h100-b"}
        per_node = {(w["node"], w["device"]) for w in who}
        assert len(per_node) == 4
        assert [j["id"] for j in portal_jobs(slurm_cluster)] == jobs and len(jobs) == 1


def test_torch_on_mig_slices_is_refused_with_the_reason(server: JupyterServer) -> None:
    c = server.client()
    with pytest.raises(PortalError) as e:
        c.create({"kind": "torch", "partition": "gpu-fr", "slice": "3g.40gb", "count": 2})
    assert "MIG slices have no NVLink" in str(e.value)
    assert c.list() == [] or all(x["kind"] != "torch" or x["state"] != "queued" for x in c.list())


def test_stopping_the_server_releases_every_job(
    server: JupyterServer, slurm_cluster: SlurmCluster
) -> None:
    c = server.client()
    info = c.create({"kind": "dask", "partition": "gpu-fr", "slice": "3g.40gb", "count": 1})
    c.wait(info["id"], 60)
    assert portal_jobs(slurm_cluster)
    server.stop()  # SIGTERM: the extension's stop hook releases every job
    wait_no_portal_jobs(slurm_cluster)
    assert "Session" in server.log_text() and "the server stopped" in server.log_text()


def test_session_files_are_private(server: JupyterServer) -> None:
    # runs after the server stopped: the per-session directories and secrets it left
    dirs = [p for p in Path(server.session_root).iterdir() if p.is_dir()]
    assert dirs
    for d in dirs:
        assert d.stat().st_mode & 0o077 == 0
        assert (d / "secret").stat().st_mode & 0o077 == 0
        assert not (d / "tls").exists()  # TLS keys are deleted when a session ends
