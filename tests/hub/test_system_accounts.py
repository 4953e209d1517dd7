"""No path runs a job or a server as a system account (issue 9, section 1), on real parts.

A real JupyterHub + configurable-http-proxy spawns into the real Slurm cluster
(tests/support/slurm_cluster.py) with the documented single-institution mapping (the hub
user name is the Unix account). Hub users that name system accounts (root, daemon, nobody,
an account made with ``useradd -r``, a personal account on the configured deny list) are
refused with 403 and a message. For each, Slurm's whole queue (every user, every state) is
unchanged and nothing appeared in the account's home (no token file, no portal directory).
A personal account still spawns. The same holds for the job-script preview, for a
``unix_user_template`` that maps a harmless hub name to root, for the orphan sweep (it never
runs ``scancel`` as a system account) and for LocalGPUSpawner with ``switch_user``.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from sovereign_portal.spawners.slurm.jobscript import make_tag

from tests.support.hub import HubProcess
from tests.support.paths import VENV_BIN
from tests.support.slurm_cluster import SITE_FILE, TEST_GROUP, SlurmCluster, ensure_users

pytestmark = [pytest.mark.slurm, pytest.mark.hub]

SYSTEM_USER = "spsysacct"  # made with useradd -r: a uid below 1000
DENIED_USER = "spdeniedacct"  # a personal uid, refused only by the configured deny list
PERSONAL = "spalice"  # a test user of the cluster (uid >= 1000)
REFUSED = ["root", "daemon", "nobody", SYSTEM_USER, DENIED_USER]
H100_1 = {"partition": "gpu-fr", "gpus": 1}
GRACE = 2  # orphan_grace_seconds

SLURM_CONFIG = """
from sovereign_portal.spawners.accounts import DEFAULT_DENIED
c.JupyterHub.authenticator_class = "dummy"
c.JupyterHub.spawner_class = "slurm-gpu"
c.SlurmGPUSpawner.site_file = {site!r}
c.SlurmGPUSpawner.server_ip = "127.0.0.1"
c.SlurmGPUSpawner.scheduler_poll_interval = 1.0
c.SlurmGPUSpawner.orphan_grace_seconds = {grace}
c.SlurmGPUSpawner.tag_key_file = {key!r}
c.SlurmGPUSpawner.job_environment = {{"PATH": {job_path!r}}}
c.Spawner.environment = {{"EGRESS_LOG": {job_egress!r}}}
c.Spawner.start_timeout = 90
c.UnixAccountPolicy.denied_names = set(DEFAULT_DENIED) | {{{denied!r}}}
{extra}
from sovereign_portal.spawners.slurm import sweep_on_hub_start
sweep_on_hub_start()
"""

LOCAL_CONFIG = """
from sovereign_portal.spawners.accounts import DEFAULT_DENIED
c.JupyterHub.authenticator_class = "dummy"
c.Authenticator.allow_all = True
c.JupyterHub.spawner_class = "local-gpu"
c.LocalGPUSpawner.inventory_source = "declared"
c.LocalGPUSpawner.switch_user = True
c.Spawner.environment = {{"EGRESS_LOG": {job_egress!r}}}
c.UnixAccountPolicy.denied_names = set(DEFAULT_DENIED) | {{{denied!r}}}
"""


# -- accounts ---------------------------------------------------------------------------------
def _useradd(*argv: str) -> None:
    r = subprocess.run(["useradd", *argv], capture_output=True, text=True)
    if r.returncode not in (0, 9):  # 9: exists already
        raise RuntimeError(f"useradd {' '.join(argv)} failed: {r.stderr.strip()}")


@pytest.fixture(scope="module")
def accounts(slurm_cluster: SlurmCluster) -> Iterator[dict[str, pwd.struct_passwd]]:
    """The system-ish accounts, created for this module and removed after it."""
    ensure_users((PERSONAL,))
    _useradd("-r", "-M", "-s", "/usr/sbin/nologin", SYSTEM_USER)
    _useradd("-m", "-s", "/bin/bash", "-g", TEST_GROUP, DENIED_USER)
    found = {name: pwd.getpwnam(name) for name in [*REFUSED, PERSONAL]}
    assert found["root"].pw_uid == 0
    assert found[SYSTEM_USER].pw_uid < 1000 <= found[DENIED_USER].pw_uid
    assert found[PERSONAL].pw_uid >= 1000
    try:
        yield found
    finally:
        subprocess.run(["userdel", SYSTEM_USER], capture_output=True)
        subprocess.run(["userdel", "-r", DENIED_USER], capture_output=True)


def _shared_dir() -> Path:
    """A directory job users can write to (pytest's tree is 0700)."""
    shared = Path(tempfile.mkdtemp(prefix="sp-sysacct-", dir="/tmp"))
    shared.chmod(0o777)
    log = shared / "job-egress.log"
    log.touch(0o666)
    log.chmod(0o666)
    return shared


def _slurm_hub(
    cluster: SlurmCluster, d: Path, shared: Path, extra: str = "", grace: int = GRACE
) -> HubProcess:
    config = SLURM_CONFIG.format(
        site=str(SITE_FILE),
        grace=grace,
        key=str(d / "tag.key"),
        job_path=f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin",
        job_egress=str(shared / "job-egress.log"),
        denied=DENIED_USER,
        extra=extra,
    )
    return HubProcess(d, config, env={"SLURM_CONF": str(cluster.conf)}, poll_interval=1)


@pytest.fixture(scope="module")
def hub(
    slurm_cluster: SlurmCluster,
    accounts: dict[str, pwd.struct_passwd],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[HubProcess]:
    shared = _shared_dir()
    h = _slurm_hub(slurm_cluster, tmp_path_factory.mktemp("sysacct-hub"), shared)
    h.start()
    try:
        yield h
    finally:
        h.close()
        h.assert_no_egress()
        job_egress = (shared / "job-egress.log").read_text()
        shutil.rmtree(shared)
        assert job_egress == "", job_egress


# -- what "nothing happened" means ------------------------------------------------------------
def queue(cluster: SlurmCluster) -> list[tuple[str, str, str]]:
    """Every job Slurm lists, of every user, in every state."""
    return sorted((j["id"], j["user"], j["state"]) for j in cluster.jobs())


def home_snapshot(account: pwd.struct_passwd) -> list[tuple[str, int, int]]:
    """What the portal would write in the account's home: its directory tree, or nothing."""
    root = Path(account.pw_dir) / ".sovereign-portal"
    if not root.exists() and not root.is_symlink():
        return []
    paths = [root, *sorted(root.rglob("*"))]
    return [(str(p), p.lstat().st_uid, p.lstat().st_mode) for p in paths]


def assert_refused(r: object, name: str) -> None:
    status = r.status_code  # type: ignore[attr-defined]
    assert status == 403, f"{name}: {status} {r.text}"  # type: ignore[attr-defined]
    message = r.json()["message"]  # type: ignore[attr-defined]
    assert "is a system account" in message and "never run as a system account" in message, message


def server(hub: HubProcess, user: str) -> dict[str, object] | None:
    model = hub.api("GET", f"/users/{user}").json()
    return model.get("servers", {}).get("")  # type: ignore[no-any-return]


# -- the Slurm spawner ------------------------------------------------------------------------
@pytest.mark.parametrize("name", REFUSED)
def test_rest_spawn_as_a_system_account_is_refused_and_submits_nothing(
    hub: HubProcess,
    slurm_cluster: SlurmCluster,
    accounts: dict[str, pwd.struct_passwd],
    name: str,
) -> None:
    account = accounts[name]
    before, home_before = queue(slurm_cluster), home_snapshot(account)
    hub.ensure_user(name)
    r = hub.api("POST", f"/users/{name}/server", json=H100_1)
    assert_refused(r, name)
    assert f"{name!r} is a system account" in r.json()["message"]
    assert server(hub, name) is None
    assert queue(slurm_cluster) == before
    assert home_snapshot(account) == home_before
    log = f"Refused for {name} (system_account): Unix account {name!r} is a system account ("
    assert log in hub.log_text()


def test_the_reason_names_the_rule(hub: HubProcess) -> None:
    """Each refusal says which rule applies (what the operator needs to fix the mapping)."""
    reasons = {}
    for name in ("root", SYSTEM_USER, "nobody", DENIED_USER):
        hub.ensure_user(name)
        reasons[name] = hub.api("POST", f"/users/{name}/server", json=H100_1).json()["message"]
    assert "on the deny list" in reasons["root"]
    uid = pwd.getpwnam(SYSTEM_USER).pw_uid
    assert f"uid {uid}, outside 1000-59999" in reasons[SYSTEM_USER]
    assert "deny list" in reasons["nobody"] or "uid 65534" in reasons["nobody"]
    assert "on the deny list" in reasons[DENIED_USER]


def test_a_personal_account_still_spawns(
    hub: HubProcess, slurm_cluster: SlurmCluster, accounts: dict[str, pwd.struct_passwd]
) -> None:
    before = {j["id"] for j in slurm_cluster.jobs()}  # other tests' ended jobs stay listed
    hub.spawn(PERSONAL, H100_1, timeout=90)
    try:
        mine = [
            j
            for j in slurm_cluster.jobs()
            if j["name"] == "sovereign-portal" and j["id"] not in before
        ]
        assert [(j["user"], j["state"]) for j in mine] == [(PERSONAL, "RUNNING")]
    finally:
        hub.stop_server(PERSONAL)


def _job_script(hub: HubProcess, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [str(VENV_BIN / "sovereign-portal"), "job-script", "--config", str(hub.config_path)]
    return subprocess.run(
        [*argv, *args], env=hub.env(), cwd=hub.dir, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("name", REFUSED)
def test_job_script_preview_refuses_a_system_account(
    hub: HubProcess, accounts: dict[str, pwd.struct_passwd], name: str
) -> None:
    r = _job_script(hub, "--user", name, "--partition", "gpu-fr", "--size", "h100x1")
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stdout == ""  # no script, not even a partial one
    assert r.stderr.startswith(f"job-script: The Unix account {name!r} is a system account (")
    assert "\n" not in r.stderr.rstrip("\n")  # one line, no traceback


def test_job_script_preview_of_a_personal_account_still_prints(hub: HubProcess) -> None:
    r = _job_script(hub, "--user", PERSONAL, "--partition", "gpu-fr", "--size", "h100x1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"# argv: runuser -u {PERSONAL} -- sbatch")


def test_unix_user_template_that_maps_to_root_is_refused(
    slurm_cluster: SlurmCluster,
    accounts: dict[str, pwd.struct_passwd],
    tmp_path: Path,
) -> None:
    """A template (here "{username:.0}root": every hub name, 'x' included, becomes root) is
    applied before the rule: the account checked is the one the job would run as."""
    shared = _shared_dir()
    extra = 'c.SlurmGPUSpawner.unix_user_template = "{username:.0}root"'
    h = _slurm_hub(slurm_cluster, tmp_path / "hub", shared, extra=extra, grace=0)
    h.start()
    try:
        before, home_before = queue(slurm_cluster), home_snapshot(accounts["root"])
        h.ensure_user("x")
        r = h.api("POST", "/users/x/server", json=H100_1)
        assert_refused(r, "x")
        assert "'root' is a system account" in r.json()["message"]
        assert server(h, "x") is None
        assert queue(slurm_cluster) == before
        assert home_snapshot(accounts["root"]) == home_before
        preview = _job_script(h, "--user", "x", "--partition", "gpu-fr", "--size", "h100x1")
        assert preview.returncode == 2 and "'root' is a system account" in preview.stderr
    finally:
        h.close()
        h.assert_no_egress()
        shutil.rmtree(shared)


def test_orphan_sweep_never_cancels_as_a_system_account(
    hub: HubProcess, slurm_cluster: SlurmCluster, accounts: dict[str, pwd.struct_passwd]
) -> None:
    """Untracked jobs signed with this hub's tag, owned by root, by a useradd -r account and
    by a personal account: after a hub restart the sweep cancels only the personal one (so
    it did run), and leaves the system accounts' jobs to an operator, logged."""
    key = (hub.dir / "tag.key").read_text().strip().encode()

    def submit(user: str | None, suffix: str) -> str:
        tag = make_tag(key, suffix)
        argv = ["sbatch", "--parsable", "-p", "gpu-fr", "-o", "/dev/null", "--chdir=/"]
        argv += ["--job-name=sovereign-portal", f"--comment=sovereign-portal:{tag}"]
        return slurm_cluster.run([*argv, "--wrap=sleep 300"], user=user).stdout.strip()

    as_root = submit(None, "0000000000a1")
    as_system = submit(SYSTEM_USER, "0000000000a2")
    as_personal = submit(PERSONAL, "0000000000a3")
    try:
        for job in (as_root, as_system, as_personal):
            slurm_cluster.wait_job_state(job, ["RUNNING"])
        hub.stop()
        hub.start()
        log = hub.dir / f"hub-{hub.starts}.log"
        line = hub.wait_for(
            lambda: next((x for x in log.read_text().splitlines() if "Orphan sweep:" in x), None),
            GRACE + 20,
            "the orphan sweep",
        )
        assert f"cancelled ['{as_personal}']" in line, line
        text = log.read_text()
        for job, user in ((as_root, "root"), (as_system, SYSTEM_USER)):
            assert f"Untracked portal job {job} runs as system account {user}" in text
            assert f"Untracked portal job {job} of {user}" not in text  # never "cancelling"
        slurm_cluster.wait_job_state(as_personal, ["CANCELLED", "COMPLETING"], timeout=10)
        states = {j["id"]: j["state"] for j in slurm_cluster.jobs()}
        assert states[as_root] == "RUNNING" and states[as_system] == "RUNNING"
    finally:
        slurm_cluster.run(["scancel", as_root, as_system, as_personal], check=False)


# -- LocalGPUSpawner with switch_user ---------------------------------------------------------
@pytest.fixture(scope="module")
def local_hub(
    accounts: dict[str, pwd.struct_passwd], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[HubProcess]:
    shared = _shared_dir()
    d = tmp_path_factory.mktemp("sysacct-local")
    config = LOCAL_CONFIG.format(job_egress=str(shared / "job-egress.log"), denied=DENIED_USER)
    h = HubProcess(d, config, poll_interval=2)
    h.start()
    try:
        yield h
    finally:
        h.close()
        h.assert_no_egress()
        egress = (shared / "job-egress.log").read_text()
        shutil.rmtree(shared)
        assert egress == "", egress


def _server_processes(user: str) -> list[int]:
    """PIDs of single-user servers of hub user ``user`` (by their JUPYTERHUB_USER)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"JUPYTERHUB_USER={user}".encode() in env:
            pids.append(int(proc.name))
    return pids


@pytest.mark.parametrize("name", REFUSED)
def test_local_switch_user_refuses_a_system_account(
    local_hub: HubProcess, accounts: dict[str, pwd.struct_passwd], name: str
) -> None:
    local_hub.ensure_user(name)
    r = local_hub.api("POST", f"/users/{name}/server", json={"gpus": 1})
    assert_refused(r, name)
    assert server(local_hub, name) is None
    assert _server_processes(name) == []


def test_local_switch_user_runs_a_personal_account_as_itself(
    local_hub: HubProcess, accounts: dict[str, pwd.struct_passwd]
) -> None:
    local_hub.spawn(PERSONAL, {"gpus": 1}, timeout=60)
    try:
        pids = _server_processes(PERSONAL)
        assert pids, "no server process"
        uids = {os.stat(f"/proc/{pid}").st_uid for pid in pids}
        assert uids == {accounts[PERSONAL].pw_uid}
    finally:
        local_hub.stop_server(PERSONAL)
