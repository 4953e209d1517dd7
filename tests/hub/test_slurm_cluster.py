"""The local Slurm test cluster itself: fake GPUs are scheduled and visible inside jobs."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.support.slurm_cluster import REPO, ClusterError, Node, SlurmCluster, check_traversable

pytestmark = pytest.mark.slurm


def _submit(cluster: SlurmCluster, user: str, args: list[str]) -> tuple[str, Path]:
    out = Path(tempfile.mkdtemp(prefix="sp-job-", dir="/tmp"))
    out.chmod(0o777)
    script = (
        "#!/bin/bash\n"
        'echo "CVD=$CUDA_VISIBLE_DEVICES"\n'
        'echo "JOB_GPUS=$SLURM_JOB_GPUS"\n'
        'echo "NODE=$SLURMD_NODENAME"\n'
    )
    r = cluster.run(
        ["sbatch", "--parsable", "--chdir=/tmp", f"--output={out}/%j.out", *args],
        user=user,
        input=script,
    )
    return r.stdout.strip().split(";")[0], out


def _result(cluster: SlurmCluster, job_id: str, out: Path) -> dict[str, str]:
    cluster.wait_job_state(job_id, ["COMPLETED"], timeout=30)
    deadline = time.monotonic() + 10
    f = out / f"{job_id}.out"
    while not f.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return dict(line.split("=", 1) for line in f.read_text().splitlines() if "=" in line)


def test_nodes_and_gres(slurm_cluster: SlurmCluster) -> None:
    states = slurm_cluster.node_states()
    assert set(states) == {"h100-a", "h100-b", "b200-a", "mig-a"}
    r = slurm_cluster.run(["scontrol", "show", "node", "mig-a", "-o"])
    assert "gpu:h100_3g.40gb:2" in r.stdout and "gpu:h100_1g.10gb:7" in r.stdout


def test_job_sees_its_gpus(slurm_cluster: SlurmCluster) -> None:
    user = slurm_cluster.users[0]
    jobs = [
        _submit(slurm_cluster, user, ["-p", "gpu-fr", "--gres=gpu:h100:2"]),
        _submit(slurm_cluster, user, ["-p", "gpu-fr", "--gres=gpu:h100_3g.40gb:1"]),
        _submit(slurm_cluster, user, ["-p", "gpu-de", "--gres=gpu:b200:8", "--exclusive"]),
    ]
    two, mig, b200 = (_result(slurm_cluster, j, out) for j, out in jobs)
    assert two["NODE"] in ("h100-a", "h100-b")
    assert len(two["CVD"].split(",")) == 2 and two["CVD"] == two["JOB_GPUS"]
    assert mig["NODE"] == "mig-a" and mig["CVD"] in ("0", "1")
    assert b200["NODE"] == "b200-a" and b200["CVD"] == "0,1,2,3,4,5,6,7"


def test_impossible_request_is_rejected(slurm_cluster: SlurmCluster) -> None:
    r = slurm_cluster.run(
        ["sbatch", "-p", "gpu-de", "--gres=gpu:h100:1", "--wrap=true"],
        user=slurm_cluster.users[0],
        check=False,
    )
    assert r.returncode != 0 and "node configuration is not available" in r.stderr


def test_jobs_can_run_the_checkout(slurm_cluster: SlurmCluster) -> None:
    """Jobs run as test users: the venv's python and the checkout must be reachable."""
    for user in slurm_cluster.users:
        check_traversable(Path(sys.executable), user)
        check_traversable(REPO / "spawners" / "__init__.py", user)


def test_a_cluster_its_users_cannot_reach_fails_at_up_not_at_sbatch() -> None:
    """Below a 0700 directory the users' sbatch cannot read slurm.conf and retries for 60 s
    (bench_storm's spawns all hung so): up() refuses at once, naming the file."""
    hidden = Path(tempfile.mkdtemp(prefix="sp-hidden-", dir="/tmp"))  # 0700
    try:
        node = Node("mig-z", (("h100_1g.10gb", 7),))
        cluster = SlurmCluster(hidden / "c", nodes=(node,), partitions={"p": (("mig-z",), 60)})
        with pytest.raises(ClusterError, match=r"cannot read .*/c/etc/slurm\.conf"):
            cluster.up(timeout=10)
        assert not cluster.is_up() and not cluster._owned_pids()
    finally:
        subprocess.run(["rm", "-rf", str(hidden)], check=False)
