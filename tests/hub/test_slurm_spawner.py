"""SlurmGPUSpawner against a real Slurm cluster (tests/support/slurm_cluster.py) and a real
JupyterHub + configurable-http-proxy (tests/support/hub.py).

Servers are real ``jupyterhub-singleuser`` processes in Slurm jobs that run as real Unix
users; each reports from inside what it sees (``/sovereign-portal/api/placement``). The
tests run in file order and share the servers they start, to keep the module short.
``SOVEREIGN_SLURM_OUTAGE_S`` shortens the slurmctld outage (default 60 s, as the issue asks).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from sovereign_portal.spawners.local import SOVEREIGN_LAB_ARGS
from sovereign_portal.spawners.slurm.jobscript import make_tag
from sovereign_portal.spawners.slurm.spawner import PREVIEW_TAG

from tests.support.hub import HubProcess
from tests.support.paths import VENV_BIN
from tests.support.sdiag import job_info_rpcs
from tests.support.slurm_cluster import SITE_FILE, SlurmCluster

pytestmark = [pytest.mark.slurm, pytest.mark.slurm_second]

SCHED_POLL = 1.0  # the shared squeue interval, seconds
POLL = 1  # JupyterHub's Spawner.poll_interval: the same interval (the spawner's default)
GRACE = 3  # orphan_grace_seconds
OUTAGE_S = float(os.environ.get("SOVEREIGN_SLURM_OUTAGE_S", "60"))

# A partition that validates against the site file but that Slurm can never satisfy.
IMPOSSIBLE = """
[[partitions]]
name = "gpu-fr-h200"
backend = "slurm"
slurm_partition = "gpu-fr"
carbon_g_per_kwh = 56.0
price_eur_per_gpu_hour = { h200 = 2.5 }
[partitions.jurisdiction]
country = "FR"
operator = "Test Centre FR"
[[partitions.nodes]]
name = "hgx-h200"
accelerator = "h200"
"""

CONFIG = """
c.JupyterHub.authenticator_class = "dummy"
c.JupyterHub.spawner_class = "slurm-gpu"
c.JupyterHub.log_level = "DEBUG"
c.SlurmGPUSpawner.site_file = {site!r}
c.SlurmGPUSpawner.server_ip = "127.0.0.1"
c.SlurmGPUSpawner.scheduler_poll_interval = {sched}
c.SlurmGPUSpawner.orphan_grace_seconds = {grace}
c.SlurmGPUSpawner.residency = {{"proj-fr": ["FR"]}}
c.SlurmGPUSpawner.tag_key_file = {key!r}
c.Spawner.environment = {{"EGRESS_LOG": {job_egress!r}}}
c.SlurmGPUSpawner.image_allow_list = {allow!r}
c.SlurmGPUSpawner.job_environment = {{"PATH": {job_path!r}}}
c.Spawner.start_timeout = 90
from sovereign_portal.spawners.slurm import sweep_on_hub_start
sweep_on_hub_start()
"""


# The image allow-list of this hub: no default, so servers run on the host unless the user
# names an image or is in the course.
ALLOW_LIST = """
apptainer = "apptainer"
cleanenv = true
binds = ["{shared}"]
[[images]]
name = "base"
location = "/images/base.sif"
gpu = false
[[images]]
name = "gpu"
location = "/images/gpu.sif"
groups = ["proj-gpu"]
[[images]]
name = "ml101"
location = "/images/ml101.sif"
courses = ["course-ml101"]
"""

# Apptainer is not installable here (no Debian package): this stand-in, first on the job's
# PATH, records its argv and the names (never the values) of the APPTAINERENV_* variables,
# then runs the command after the image the way `apptainer exec --cleanenv` would: only the
# APPTAINERENV_* variables, mapped back, plus HOME (Apptainer sets it) and PATH/PYTHONPATH
# standing in for the image's own environment and the test's egress guard.
STAND_IN = """#!{python} -I
import json, os, pwd, sys
args = sys.argv[1:]
with open({record!r}, "a") as f:
    names = sorted(k for k in os.environ if k.startswith("APPTAINERENV_"))
    f.write(json.dumps({{"argv": args, "env": names}}) + "\\n")
assert args[0] == "exec", args
i = 1
while args[i].startswith("-"):
    i += 2 if args[i] in ("--bind", "-B", "--env-file") else 1
cmd = args[i + 1 :]
env = {{k[13:]: v for k, v in os.environ.items() if k.startswith("APPTAINERENV_")}}
env["HOME"] = pwd.getpwuid(os.getuid()).pw_dir
env.update({{k: os.environ[k] for k in ("PATH", "PYTHONPATH") if k in os.environ}})
os.execvpe(cmd[0], cmd, env)
"""


@pytest.fixture(scope="module")
def hub(
    slurm_cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[HubProcess]:
    d = tmp_path_factory.mktemp("slurm-hub")
    site = d / "site.toml"
    site.write_text(SITE_FILE.read_text() + IMPOSSIBLE)
    # Jobs run as the test users: what they read or write must be outside pytest's 0700
    # temporary tree.
    shared = Path(tempfile.mkdtemp(prefix="sp-slurm-shared-", dir="/tmp"))
    shared.chmod(0o777)
    job_egress = shared / "job-egress.log"
    job_egress.touch(0o666)
    job_egress.chmod(0o666)
    bin_dir = shared / "bin"
    bin_dir.mkdir(mode=0o755)
    record = shared / "apptainer-record.jsonl"
    record.touch(0o666)
    record.chmod(0o666)
    stand_in = bin_dir / "apptainer"
    stand_in.write_text(STAND_IN.format(python=VENV_BIN / "python", record=str(record)))
    stand_in.chmod(0o755)
    allow = shared / "images.toml"
    allow.write_text(ALLOW_LIST.format(shared=shared))
    config = CONFIG.format(
        site=str(site),
        sched=SCHED_POLL,
        grace=GRACE,
        key=str(d / "tag.key"),
        job_egress=str(job_egress),
        allow=str(allow),
        job_path=f"{bin_dir}:{VENV_BIN}:/usr/local/bin:/usr/bin:/bin",
    )
    h = HubProcess(d, config, env={"SLURM_CONF": str(slurm_cluster.conf)}, poll_interval=POLL)
    h.job_egress = job_egress  # type: ignore[attr-defined]
    h.apptainer_record = record  # type: ignore[attr-defined]
    h.shared = shared  # type: ignore[attr-defined]
    h.start()
    try:
        yield h
    finally:
        h.close()
        h.assert_no_egress()
        job_egress_log = job_egress.read_text()
        shutil.rmtree(shared)
        assert job_egress_log == "", job_egress_log


def portal_jobs(cluster: SlurmCluster, active: bool = True) -> list[dict[str, str]]:
    jobs = [j for j in cluster.jobs() if j["name"] == "sovereign-portal"]
    if active:
        jobs = [j for j in jobs if j["state"] in ("PENDING", "RUNNING", "CONFIGURING")]
    return jobs


def placement(hub: HubProcess, user: str) -> dict[str, Any]:
    r = hub.server_get(user, "sovereign-portal/api/placement")
    assert r.status_code == 200, r.text
    return r.json()


def sweep_line(hub: HubProcess, timeout: float) -> str:
    """Wait for the orphan sweep of the hub's latest start; return its summary line."""
    log = hub.dir / f"hub-{hub.starts}.log"

    def line() -> str | None:
        found = [x for x in log.read_text().splitlines() if "Orphan sweep:" in x]
        return found[-1] if found else None

    return str(hub.wait_for(line, timeout, "the orphan sweep after this hub start"))


def wait_logged(hub: HubProcess, text: str, timeout: float = 10) -> None:
    """The final state of an ending job is logged once Slurm reports it (after COMPLETING)."""
    hub.wait_for(lambda: text in hub.log_text(), timeout, f"{text!r} in the hub log")


def server(hub: HubProcess, user: str) -> dict[str, Any] | None:
    model = hub.api("GET", f"/users/{user}").json()
    return model.get("servers", {}).get("")


SIZES = {
    # user: (options, node prefix, visible device count, country)
    "syalice": ({"partition": "gpu-fr", "gpus": 2}, "h100-", 2, "FR"),
    "sybob": ({"partition": "gpu-fr", "gpus": 4}, "h100-", 4, "FR"),
    "sycarol": ({"partition": "gpu-fr", "slice": "3g.40gb"}, "mig-a", 1, "FR"),
}


def test_placement_per_size_with_disjoint_gpus(hub: HubProcess, slurm_cluster: SlurmCluster):
    for user, (options, *_) in SIZES.items():
        hub.ensure_user(user)
        r = hub.api("POST", f"/users/{user}/server", json=options)
        assert r.status_code in (201, 202), r.text
    seen: dict[str, tuple[str, set[str]]] = {}
    for user, (_, node, count, country) in SIZES.items():
        hub.wait_ready(user, timeout=90)
        env = placement(hub, user)["env"]
        assert env["SLURMD_NODENAME"].startswith(node), env
        devices = set(env["CUDA_VISIBLE_DEVICES"].split(","))
        assert len(devices) == count and env["SLURM_JOB_GPUS"] == env["CUDA_VISIBLE_DEVICES"]
        assert env["SOVEREIGN_PORTAL_COUNTRY"] == country
        for other, (other_node, other_devices) in seen.items():
            if other_node == env["SLURMD_NODENAME"]:
                assert not other_devices & devices, (user, other)
        seen[user] = (env["SLURMD_NODENAME"], devices)
    # First fit puts both H100 users on one node, so "disjoint" is really tested.
    assert seen["syalice"][0] == seen["sybob"][0]
    jobs = portal_jobs(slurm_cluster)
    assert sorted(j["user"] for j in jobs) == sorted(SIZES)  # each runs as its own account


def test_progress_names_queue_and_node(hub: HubProcess) -> None:
    log = hub.log_text()
    assert "Submitted as Slurm job" in log and "Starting on node" in log


def test_token_never_reaches_slurm_or_logs(hub: HubProcess, slurm_cluster: SlurmCluster):
    job = next(j for j in portal_jobs(slurm_cluster) if j["user"] == "syalice")
    token = _server_token("syalice")
    assert len(token) >= 32
    show = slurm_cluster.run(["scontrol", "show", "job", "-d", job["id"]]).stdout
    script = slurm_cluster.run(["scontrol", "write", "batch_script", job["id"], "-"]).stdout
    assert "slurm/launch.py --token-file=" in script  # we read the right thing
    assert token not in show and token not in script
    assert "TOKEN" not in script
    for root in (slurm_cluster.spool_root, slurm_cluster.base / "state"):
        hits = subprocess.run(["grep", "-rl", token, str(root)], capture_output=True, text=True)
        assert hits.stdout == "", f"token found in {hits.stdout}"
    assert token not in hub.log_text()
    assert "[D " in hub.log_text()  # the hub really logged at debug level
    token_dir = Path("/home/syalice/.sovereign-portal/tokens")
    # the one-time file was taken (files older than this hub are not this module's)
    since = hub.config_path.stat().st_mtime
    assert [p for p in token_dir.iterdir() if p.stat().st_mtime >= since] == []


def cli_script(hub: HubProcess, *args: str) -> str:
    """`sovereign-portal job-script` with this hub's configuration file and environment."""
    argv = [str(VENV_BIN / "sovereign-portal"), "job-script", "--config", str(hub.config_path)]
    r = subprocess.run(
        [*argv, *args], env=hub.env(), cwd=hub.dir, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    head, preview, script = r.stdout.split("\n", 2)
    assert head.startswith("# argv: runuser -u ") and preview.startswith("# preview: ")
    return script


def assert_cli_prints_the_submitted_script(
    hub: HubProcess, cluster: SlurmCluster, job_id: str, *args: str
) -> None:
    """The CLI's script is the submitted one, modulo the per-spawn tag (and the token file
    named after it) and JupyterHub's per-server JUPYTERHUB_* variables, which exist only
    once the hub spawns (the CLI says so)."""
    submitted = cluster.run(["scontrol", "write", "batch_script", job_id, "-"]).stdout
    tag = re.search(r"^#SBATCH --comment=sovereign-portal:(\S+)$", submitted, re.M)
    assert tag is not None, submitted
    submitted = submitted.replace(tag.group(1), PREVIEW_TAG)
    printed = cli_script(hub, *args)
    exports = set(re.findall(r"^export (\w+)=", printed, re.M))
    hub_only = [
        line
        for line in submitted.splitlines()
        if (m := re.match(r"export (\w+)=", line)) and m.group(1) not in exports
    ]
    assert hub_only and all(line.startswith("export JUPYTERHUB_") for line in hub_only), hub_only
    kept = [line for line in submitted.splitlines() if line not in hub_only]
    assert printed.splitlines() == kept


def test_job_script_cli_prints_what_the_spawn_submitted(
    hub: HubProcess, slurm_cluster: SlurmCluster
) -> None:
    job = next(j for j in portal_jobs(slurm_cluster) if j["user"] == "syalice")
    args = ["--user", "syalice", "--partition", "gpu-fr", "--size", "h100x2"]
    assert_cli_prints_the_submitted_script(hub, slurm_cluster, job["id"], *args)


def _server_token(user: str) -> str:
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"JUPYTERHUB_USER={user}".encode() in env:
            for kv in env:
                if kv.startswith(b"JUPYTERHUB_API_TOKEN="):
                    return kv.split(b"=", 1)[1].decode()
    raise AssertionError(f"no server process of {user} found")


BAD = ["\n#SBATCH --uid=0", "#SBATCH --uid=0", "$(id)", "`id`", "x; id", "a\nb"]
STRING_FIELDS = ["kind", "partition", "accelerator", "slice", "image"]
BAD_OPTIONS = [
    pytest.param({"colour": "blue"}, "unknown field", id="unknown-field"),
    pytest.param({"gpus": -1}, "greater than or equal to 1", id="negative-gpus"),
    pytest.param({"gpus": 10**12}, "less than or equal to 8", id="huge-gpus"),
    pytest.param({"gpus": 8, "nodes": -3}, "nodes", id="negative-nodes"),
    pytest.param({"count": 10**9}, "count", id="huge-count"),
    pytest.param({"partition": "gpu-us"}, "does not exist", id="partition-not-in-catalog"),
    pytest.param({"slice": "7g.80gb"}, "no MIG slice", id="slice-not-in-catalog"),
    pytest.param({"partition": "gpu-fr", "walltime_minutes": 481}, "limit", id="walltime"),
    *[
        pytest.param({field: bad}, "", id=f"{field}-{i}")
        for field in STRING_FIELDS
        for i, bad in enumerate(BAD)
    ],
]


@pytest.mark.parametrize(("options", "message"), BAD_OPTIONS)
def test_bad_input_is_4xx_and_submits_nothing(
    hub: HubProcess, slurm_cluster: SlurmCluster, options: dict[str, Any], message: str
) -> None:
    before = {j["id"] for j in slurm_cluster.jobs()}
    hub.ensure_user("sydave")
    r = hub.api("POST", "/users/sydave/server", json=options)
    assert 400 <= r.status_code < 500, r.text
    assert message in r.json()["message"]
    assert server(hub, "sydave") is None
    assert not {j["id"] for j in slurm_cluster.jobs()} - before  # no new job (old ones age out)


def test_symlinked_portal_dir_fails_the_spawn_and_touches_nothing(
    hub: HubProcess, slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    """The hub runs as root: a user's ~/.sovereign-portal that is a link to a root-owned
    directory (standing in for /etc) fails the spawn with a message saying what to do, and
    nothing there changes owner or mode or gains a file. The race (a swap between check and
    use) is tested deterministically in tests/unit/test_slurm_userfiles.py."""
    etc = tmp_path / "etc"
    etc.mkdir(mode=0o755)
    (etc / "passwd").write_text("root:x:0:0::/root:/bin/bash\n")

    def snapshot() -> list[tuple[str, int, int]]:
        return [(str(p), p.lstat().st_uid, p.lstat().st_mode) for p in [etc, *etc.rglob("*")]]

    before_etc = snapshot()
    hub.ensure_user("sydave")
    portal = Path("/home/sydave/.sovereign-portal")
    aside = portal.with_name(".sovereign-portal.aside")
    if portal.exists() or portal.is_symlink():
        portal.rename(aside)
    portal.symlink_to(etc)
    before = {j["id"] for j in slurm_cluster.jobs()}
    try:
        r = hub.api("POST", "/users/sydave/server", json={"partition": "gpu-fr", "gpus": 1})
        if r.status_code == 202:  # failed after the API answered: read the spawn's outcome
            hub.wait_for(lambda: not hub.api("GET", "/users/sydave").json()["pending"], 30, "fail")
        text = r.text + hub.log_text()
        assert "~/.sovereign-portal is a symbolic link or not a directory" in text, r.text
        assert "remove or rename ~/.sovereign-portal" in text
        assert server(hub, "sydave") is None
        assert not {j["id"] for j in slurm_cluster.jobs()} - before  # no new job (old ones age out)
        assert snapshot() == before_etc
    finally:
        portal.unlink()
        if aside.exists():
            aside.rename(portal)


def test_residency_fr_only_project_never_lands_in_de(hub: HubProcess) -> None:
    hub.ensure_user("sydave")
    hub.api("POST", "/groups/proj-fr")
    r = hub.api("POST", "/groups/proj-fr/users", json={"users": ["sydave"]})
    assert r.status_code == 200, r.text
    try:
        r = hub.api("POST", "/users/sydave/server", json={"partition": "gpu-de", "gpus": 1})
        assert r.status_code == 400 and "not open to you" in r.json()["message"], r.text
        s = requests.Session()
        s.get(f"{hub.url}/hub/login")
        login = {"username": "sydave", "password": "x", "_xsrf": s.cookies.get("_xsrf")}
        s.post(f"{hub.url}/hub/login", data=login)
        page = s.get(f"{hub.url}/hub/spawn").text
        assert "gpu-fr/h100x1" in page and "gpu-de" not in page
    finally:
        hub.api("DELETE", "/groups/proj-fr/users", json={"users": ["sydave"]})


def test_impossible_request_fails_at_once_naming_what_exists(hub: HubProcess) -> None:
    hub.ensure_user("sydave")
    t0 = time.monotonic()
    r = hub.api("POST", "/users/sydave/server", json={"partition": "gpu-fr-h200", "gpus": 1})
    if r.status_code == 202:  # failed after the API answered: read the spawn's outcome
        hub.wait_for(lambda: not hub.api("GET", "/users/sydave").json()["pending"], 30, "fail")
    assert time.monotonic() - t0 < 15
    assert server(hub, "sydave") is None
    assert "Slurm can never run" in r.text or "Slurm can never run" in hub.log_text()
    assert "gpu:h100:8" in (r.text + hub.log_text())  # it names what the partition has


def test_kill9_hub_restart_readopts_without_duplicates(
    hub: HubProcess, slurm_cluster: SlurmCluster
) -> None:
    before = sorted((j["user"], j["id"]) for j in portal_jobs(slurm_cluster))
    assert len(before) == 3
    hub.kill()
    hub.start()
    for user in SIZES:
        hub.wait_ready(user, timeout=30)
        assert placement(hub, user)["env"]["SLURM_JOB_ID"] == dict(before)[user]
    # The sweep after this start must leave every adopted job alone.
    assert "cancelled none" in sweep_line(hub, GRACE + 15)
    after = sorted((j["user"], j["id"]) for j in portal_jobs(slurm_cluster))
    assert after == before


def test_slurmctld_outage_marks_nothing_stopped(
    hub: HubProcess, slurm_cluster: SlurmCluster
) -> None:
    slurm_cluster.stop_controller()
    try:
        deadline = time.monotonic() + OUTAGE_S
        while time.monotonic() < deadline:
            for user in SIZES:
                s = server(hub, user)
                assert s is not None and s["ready"], f"{user} marked stopped during outage"
            time.sleep(POLL)
    finally:
        slurm_cluster.start_controller()
    time.sleep(SCHED_POLL + POLL + 1)
    for user in SIZES:
        assert server(hub, user) is not None
        assert placement(hub, user)["env"]["SLURM_JOB_ID"]
    assert "job states are unknown" in hub.log_text()


def test_scancel_behind_the_hubs_back_stops_within_one_poll(
    hub: HubProcess, slurm_cluster: SlurmCluster
) -> None:
    job = next(j for j in portal_jobs(slurm_cluster) if j["user"] == "sycarol")
    polls0 = job_info_rpcs(slurm_cluster)
    slurm_cluster.run(["scancel", job["id"]])
    hub.wait_for(lambda: server(hub, "sycarol") is None, 30, "sycarol stopped", interval=0.05)
    polls = job_info_rpcs(slurm_cluster) - polls0
    # The next shared squeue sees the job end and tells the hub at once: counted in
    # slurmctld's own polls (sdiag), not in seconds, which a loaded machine stretches. One
    # poll may have been on its way when the job was cancelled; one more may run while the
    # hub's answer catches up.
    assert 1 <= polls <= 3, polls
    wait_logged(hub, f"Slurm job {job['id']}: cancelled (the job was cancelled)")


def test_node_failure_is_noticed_with_reason(hub: HubProcess, slurm_cluster: SlurmCluster) -> None:
    hub.spawn("sydave", {"partition": "gpu-fr", "slice": "1g.10gb"}, timeout=60)
    job = next(j for j in portal_jobs(slurm_cluster) if j["user"] == "sydave")
    slurm_cluster.run(["scontrol", "update", "NodeName=mig-a", "State=DOWN", "Reason=test"])
    try:
        hub.wait_for(lambda: server(hub, "sydave") is None, 30, "sydave stopped")
        wait_logged(hub, f"Slurm job {job['id']}: node_fail")
    finally:
        slurm_cluster.run(["scontrol", "update", "NodeName=mig-a", "State=RESUME"], check=False)


def test_walltime_expiry_is_noticed_with_reason(
    hub: HubProcess, slurm_cluster: SlurmCluster
) -> None:
    """sybob's job has run for over a minute: a 1-minute limit (Slurm's smallest) is already
    spent, and slurmctld ends the job at its next time-limit check. slurmctld checks every
    30 s from its start, and the outage test restarted it, so this test comes late."""
    job = next(j for j in portal_jobs(slurm_cluster) if j["user"] == "sybob")
    elapsed = slurm_cluster.run(["squeue", "-h", "-j", job["id"], "-o", "%M"]).stdout.strip()
    ran = sum(int(x) * 60**i for i, x in enumerate(reversed(elapsed.split(":"))))
    slurm_cluster.run(["scontrol", "update", f"JobId={job['id']}", "TimeLimit=1"])
    wait = max(0, 60 - ran) + 30 + 15  # until the limit, one check period, slack
    hub.wait_for(lambda: server(hub, "sybob") is None, wait, "sybob stopped at its walltime")
    wait_logged(hub, f"Slurm job {job['id']}: timeout (the walltime ran out)")


def test_stop_cancels_and_waits_until_gone(hub: HubProcess, slurm_cluster: SlurmCluster):
    hub.stop_server("syalice")
    assert portal_jobs(slurm_cluster) == []


def test_course_image_runs_the_server_through_apptainer(
    hub: HubProcess, slurm_cluster: SlurmCluster
) -> None:
    """Issue 6 in a real Slurm job behind the real hub. Apptainer itself is a stand-in
    (STAND_IN above: it records its argv and runs the command after the image), so what is
    proven is the argv and environment the spawner composes, not Apptainer."""
    hub.ensure_user("sydave")
    hub.api("POST", "/groups/course-ml101")
    r = hub.api("POST", "/groups/course-ml101/users", json={"users": ["sydave"]})
    assert r.status_code == 200, r.text
    try:
        s = requests.Session()
        s.get(f"{hub.url}/hub/login")
        login = {"username": "sydave", "password": "x", "_xsrf": s.cookies.get("_xsrf")}
        s.post(f"{hub.url}/hub/login", data=login)
        page = s.get(f"{hub.url}/hub/spawn").text
        offered = re.findall(r'<option value="([a-z0-9]+)">', page)
        assert offered == ["ml101", "base"], offered  # the course's first; not the "gpu" one
        before = {j["id"] for j in slurm_cluster.jobs()}
        r = hub.api("POST", "/users/sydave/server", json={**H100_1, "image": "gpu"})
        assert r.status_code == 400, r.text
        assert "image 'gpu' is not offered; allowed: ml101, base" in r.json()["message"]
        assert not {j["id"] for j in slurm_cluster.jobs()} - before  # no new job (old ones age out)

        hub.spawn("sydave", H100_1, timeout=60)  # no image named: the course's
        job = next(j for j in portal_jobs(slurm_cluster) if j["user"] == "sydave")
        env = placement(hub, "sydave")["env"]  # answered from inside the "image"
        assert env["SLURM_JOB_ID"] == job["id"] and env["SOVEREIGN_PORTAL_SIZE"] == "h100x1"
        assert env["CUDA_VISIBLE_DEVICES"] == env["SLURM_JOB_GPUS"] != ""
        record = json.loads(hub.apptainer_record.read_text().splitlines()[-1])
        image_argv = ["exec", "--nv", "--cleanenv", "--bind", str(hub.shared), "/images/ml101.sif"]
        server_argv = ["jupyterhub-singleuser", *SOVEREIGN_LAB_ARGS, "--ip=127.0.0.1"]
        assert record["argv"][: len(image_argv) + len(server_argv)] == image_argv + server_argv
        assert re.fullmatch(r"--port=\d+", record["argv"][-1])
        for name in (
            "CUDA_VISIBLE_DEVICES",
            "SLURM_JOB_GPUS",
            "SLURM_JOB_ID",
            "SLURMD_NODENAME",
            "SOVEREIGN_PORTAL_COUNTRY",
            "JUPYTERHUB_USER",
            "JUPYTERHUB_API_TOKEN",
        ):
            assert f"APPTAINERENV_{name}" in record["env"], name
        assert "APPTAINERENV_PATH" not in record["env"]  # the image keeps its own PATH
        token = _server_token("sydave")
        assert token not in json.dumps(record)
        assert token not in slurm_cluster.run(["scontrol", "show", "job", "-d", job["id"]]).stdout
        args = ["--user", "sydave", "--group", "course-ml101", "--partition", "gpu-fr"]
        assert_cli_prints_the_submitted_script(
            hub, slurm_cluster, job["id"], *args, "--size", "h100x1"
        )
    finally:
        hub.api("DELETE", "/groups/course-ml101/users", json={"users": ["sydave"]})
        hub.stop_server("sydave")
    assert portal_jobs(slurm_cluster) == []


H100_1 = {"partition": "gpu-fr", "gpus": 1}


def test_untracked_portal_job_is_reported_and_cancelled_after_restart(
    hub: HubProcess, slurm_cluster: SlurmCluster
) -> None:
    """A hub with no servers still sweeps after it starts. Of three jobs of one user, only
    the one whose tag this hub signed (and that no server tracks) is cancelled."""
    assert not any(u.get("servers") for u in hub.api("GET", "/users").json())
    key = (hub.dir / "tag.key").read_text().strip().encode()
    tag = make_tag(key, "feedc0ffee00")  # as a spawner whose hub row was since deleted

    def submit(*opts: str) -> str:
        argv = ["sbatch", "--parsable", "-p", "gpu-fr", "-o", "/dev/null", *opts]
        return slurm_cluster.run([*argv, "--wrap=sleep 300"], user="sydave").stdout.strip()

    ours = submit("--job-name=sovereign-portal", f"--comment=sovereign-portal:{tag}")
    forged = submit(
        "--job-name=sovereign-portal", "--comment=sovereign-portal:0123456789ab.0123456789abcdef"
    )
    plain = submit("--job-name=training")
    try:
        for job in (ours, forged, plain):
            slurm_cluster.wait_job_state(job, ["RUNNING"])
        hub.stop()
        hub.start()
        t0 = time.monotonic()
        assert slurm_cluster.wait_job_state(ours, ["RUNNING"], timeout=1)  # not before grace
        line = sweep_line(hub, GRACE + 15)
        assert time.monotonic() - t0 >= GRACE - 1
        assert f"cancelled ['{ours}']" in line, line
        log = (hub.dir / f"hub-{hub.starts}.log").read_text()
        assert f"Untracked portal job {ours} of sydave (tag {tag})" in log
        slurm_cluster.wait_job_state(ours, ["CANCELLED", "COMPLETING"], timeout=10)
        states = {j["id"]: j["state"] for j in slurm_cluster.jobs()}
        assert states[forged] == "RUNNING"  # a tag this hub did not sign is not its job
        assert states[plain] == "RUNNING"  # a non-portal job of the same user
    finally:
        slurm_cluster.run(["scancel", ours, forged, plain], check=False)
