"""One scheduler query per interval for every compute session, against the real Slurm cluster.

N notebook servers (real ``jupyter server`` processes with the portal extension, one per
user) each run a Slurm Dask session. The portal service (the real app; only hub
authentication is a token table, as in test_sessions_slurm.py) polls Slurm once per
interval for all of them; the servers long-poll the service and never call ``squeue``.
slurmctld's own ``sdiag`` counts the job-info RPCs. Queue position and pending reason
reach the session through the service, exact; a job cancelled behind the portal's back
ends its session within one interval.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.support.sdiag import job_info_rpcs
from tests.support.sessions import JupyterServer, PortalServiceThread
from tests.support.slurm_cluster import SITE_FILE, SlurmCluster

pytestmark = [pytest.mark.slurm, pytest.mark.slurm_second, pytest.mark.timeout(300)]

INTERVAL = 2.0  # the service's session_poll_interval here
USERS = ("syalice", "sybob", "sycarol")
TOKENS = {f"server-token-of-{u}": {"name": u, "groups": ["researcher"]} for u in USERS}
SLICE = {"kind": "dask", "partition": "gpu-fr", "slice": "1g.10gb", "count": 1}


@pytest.fixture(scope="module")
def service() -> Iterator[PortalServiceThread]:
    svc = PortalServiceThread(str(SITE_FILE), TOKENS, session_poll_interval=INTERVAL).start()
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def servers(
    slurm_cluster: SlurmCluster,
    service: PortalServiceThread,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[list[JupyterServer]]:
    out: list[JupyterServer] = []
    try:
        for token, user in TOKENS.items():
            work = tmp_path_factory.mktemp(f"poll-{user['name']}")
            work.chmod(0o755)
            out.append(JupyterServer(work, service.url, token, memory_per_worker="1GiB").start())
        yield out
    finally:
        for srv in out:
            srv.stop()
        for srv in out:
            assert srv.egress() == "", srv.egress()


def _portal_jobs(cluster: SlurmCluster) -> list[dict[str, str]]:
    return [
        j
        for j in cluster.jobs()
        if j["name"].startswith("portal-") and j["state"] in ("PENDING", "RUNNING", "COMPLETING")
    ]


@pytest.fixture(autouse=True)
def no_leftovers(slurm_cluster: SlurmCluster) -> Iterator[None]:
    yield
    deadline = time.monotonic() + 30
    while _portal_jobs(slurm_cluster) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _portal_jobs(slurm_cluster), _portal_jobs(slurm_cluster)


def _rpcs_per_interval(cluster: SlurmCluster, intervals: int = 5) -> float:
    time.sleep(INTERVAL)  # let anything in flight settle
    before = job_info_rpcs(cluster)
    time.sleep(INTERVAL * intervals)
    return (job_info_rpcs(cluster) - before) / intervals


def _wait(cond: object, timeout: float, what: str, step: float = 0.1) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():  # type: ignore[operator]
            return time.monotonic() - t0
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_n_sessions_in_n_servers_cost_one_squeue_per_interval(
    servers: list[JupyterServer], slurm_cluster: SlurmCluster
) -> None:
    sessions: list[tuple[JupyterServer, str]] = []
    per_interval: dict[int, float] = {}
    try:
        for n, srv in enumerate(servers, start=1):
            c = srv.client()
            info = c.create(SLICE)
            sessions.append((srv, info["id"]))
            assert c.wait(info["id"], 90)["state"] == "ready"
            if n in (1, len(servers)):
                per_interval[n] = _rpcs_per_interval(slurm_cluster)
        # every session is ready and its job is watched through the service
        for srv, sid in sessions:
            info = srv.client().get(sid)
            assert info["state"] == "ready" and len(info["jobs"]) == 1, info
        one, many = per_interval[1], per_interval[len(servers)]
        # one query per interval (jitter ±10 %), whatever the number of sessions
        assert 0.6 <= one <= 1.4, per_interval
        assert many <= 1.4 and abs(many - one) <= 0.4, per_interval
        for srv, _ in sessions:
            assert "squeue" not in srv.log_text()
    finally:
        for srv, sid in sessions:
            srv.client().stop(sid)


def _expected_queue(cluster: SlurmCluster, job_id: str, partition: str) -> tuple[int, str]:
    """The job's place among the partition's pending jobs and its reason, from squeue."""
    out = cluster.run(["squeue", "-h", "-t", "PENDING", "-p", partition, "-o", "%i|%Q|%r"]).stdout
    rows = [line.split("|") for line in out.splitlines() if line.strip()]
    order = sorted(rows, key=lambda r: (-int(r[1]), int(r[0])))
    place = [r[0] for r in order].index(job_id) + 1
    return place, next(r[2] for r in rows if r[0] == job_id)


def test_queue_position_and_reason_come_exact_through_the_hub(
    servers: list[JupyterServer], slurm_cluster: SlurmCluster
) -> None:
    srv = servers[0]
    c = srv.client()

    def filler(gpus: int) -> str:
        return slurm_cluster.run(
            [
                "sbatch",
                "--parsable",
                "-p",
                "gpu-de",
                f"--gres=gpu:b200:{gpus}",
                "-J",
                "filler",
                "--output=/dev/null",
                "--wrap",
                "sleep 300",
            ]
        ).stdout.strip()

    full = filler(8)
    slurm_cluster.wait_job_state(full, ["RUNNING"])
    ahead = filler(1)  # pending, ahead of the session
    sid = ""
    try:
        info = c.create({"kind": "dask", "partition": "gpu-de", "accelerator": "b200", "gpus": 1})
        sid = info["id"]
        _wait(lambda: c.get(sid)["queue"].get("position") == 2, 30, "position 2")
        info = c.get(sid)
        job = info["jobs"][0]
        place, reason = _expected_queue(slurm_cluster, job, "gpu-de")
        assert info["state"] == "queued" and info["queue"] == {"position": place, "reason": reason}
        assert place == 2 and f"position {place}" in info["message"] and reason in info["message"]
        # the job ahead goes: the session is next, within one interval of the service
        slurm_cluster.run(["scancel", ahead])
        took = _wait(lambda: c.get(sid)["queue"].get("position") == 1, 30, "position 1")
        assert took <= INTERVAL * 1.1 + 2.0, took
        assert c.get(sid)["queue"]["reason"] == _expected_queue(slurm_cluster, job, "gpu-de")[1]
        # the node frees up: the session runs
        slurm_cluster.run(["scancel", full])
        assert c.wait(sid, 90)["state"] == "ready"
        assert c.get(sid)["queue"] == {}
    finally:
        slurm_cluster.run(["scancel", full, ahead], check=False)
        if sid:
            c.stop(sid)


def test_a_job_cancelled_behind_the_portals_back_ends_its_session_within_an_interval(
    servers: list[JupyterServer], slurm_cluster: SlurmCluster
) -> None:
    srv = servers[1]
    c = srv.client()
    info = c.create(SLICE)
    sid = info["id"]
    try:
        info = c.wait(sid, 90)
        assert info["state"] == "ready"
        slurm_cluster.run(["scancel", info["jobs"][0]])
        took = _wait(lambda: c.get(sid)["state"] not in ("ready", "starting"), 30, "the end")
        assert took <= INTERVAL * 1.1 + 1.5, took
        _wait(lambda: c.get(sid)["state"] == "failed", 30, "failed")
        assert "its Slurm jobs ended" in c.get(sid)["message"]
    finally:
        c.stop(sid)


def test_the_service_shows_each_user_only_their_own_session_jobs(
    servers: list[JupyterServer], service: PortalServiceThread
) -> None:
    import requests

    alice, bob = (f"server-token-of-{u}" for u in USERS[:2])
    grant = requests.post(
        service.url + "api/grants",
        json=SLICE,
        headers={"Authorization": f"token {alice}"},
        timeout=10,
    ).json()
    gid = grant["id"]
    try:
        url = service.url + f"api/grants/{gid}/jobs"
        as_bob = requests.put(
            url + "?jobs=1", headers={"Authorization": f"token {bob}"}, timeout=10
        )
        assert as_bob.status_code == 404  # alice's grant: bob cannot bind jobs to it
        ok = requests.put(
            url + "?jobs=1,2", headers={"Authorization": f"token {alice}"}, timeout=10
        )
        assert ok.status_code == 200 and set(ok.json()["grants"][gid]) == {"1", "2"}
        bad = requests.put(
            url + "?jobs=1;2", headers={"Authorization": f"token {alice}"}, timeout=10
        )
        assert bad.status_code == 400 and "jobs" in bad.json()["error"]
        mine = requests.get(
            service.url + "api/jobs?wait=0", headers={"Authorization": f"token {bob}"}, timeout=10
        ).json()
        assert gid not in mine["grants"]
        nobody = requests.get(service.url + "api/jobs?wait=0", timeout=10)
        assert nobody.status_code == 401
    finally:
        requests.delete(
            service.url + f"api/grants/{gid}",
            headers={"Authorization": f"token {alice}"},
            timeout=10,
        )
    after = requests.get(
        service.url + "api/jobs?wait=0", headers={"Authorization": f"token {alice}"}, timeout=10
    ).json()
    assert gid not in after["grants"]
