"""A real Slurm cluster on this machine, with fake GPUs, for tests, CI and the demo.

It runs ``munged``, ``slurmctld -D`` and one ``slurmd -D -N <node>`` per emulated node, all
from a directory of its own (config, state, spool, logs, pid files, fake ``/dev/nvidia*``
character devices). Nothing outside that directory is touched except the test users, which
are real Unix accounts (``useradd``, idempotent) because jobs run as them.

Nodes (see :data:`NODES`): two 8x H100 nodes, one 8x B200 node and one MIG node whose GPU 0
holds 2x ``3g.40gb`` and GPU 1 holds 7x ``1g.10gb``. Partitions: ``gpu-fr`` (the H100 nodes
and the MIG node, France) and ``gpu-de`` (the B200 node, Germany); they match
``tests/support/sites/slurm-test.toml``.

As a CLI (CI's ``.ci/run`` and people use it the same way)::

    python -m tests.support.slurm_cluster up   --dir /tmp/sp-slurm   # start, wait for idle nodes
    eval "$(python -m tests.support.slurm_cluster env --dir /tmp/sp-slurm)"  # SLURM_CONF=...
    python -m tests.support.slurm_cluster down --dir /tmp/sp-slurm   # stop every daemon by PID

As a pytest fixture: ``from tests.support.slurm_cluster import slurm_cluster`` in a conftest.
With ``SOVEREIGN_SLURM_DIR`` set to the directory of a cluster that is already up (``up``
above), the fixture uses it and leaves it running; otherwise it starts its own and stops it.
Needs root (mknod, useradd, daemons as root), as the Slurm lab notes say.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .paths import VENV_BIN

REPO = Path(__file__).resolve().parents[2]
SITE_FILE = REPO / "tests" / "support" / "sites" / "slurm-test.toml"

#: Real Unix accounts that jobs run as. Hub user names are the same.
TEST_USERS = ("spalice", "spbob", "spcarol", "spdave")
#: The two-site files' own accounts (files marked ``slurm_sites``): their homes, token files
#: and job logs are theirs, so those files run beside the main cluster's (xdist_groups.py).
SITE_USERS = ("sxalice", "sxbob", "sxcarol", "sxdave")
#: The accounts of the second main-cluster unit (files marked ``slurm_second``): the same
#: cluster layout, started on that unit's own worker, so those files run beside the ones
#: on ``TEST_USERS`` (xdist_groups.py). The ``slurm_cluster`` fixture creates both sets.
SECOND_USERS = ("syalice", "sybob", "sycarol", "sydave")
TEST_GROUP = "sptest"


@dataclass(frozen=True)
class Node:
    """An emulated compute node: its GRES (type → count), CPUs and memory."""

    name: str
    gres: tuple[tuple[str, int], ...]
    cpus: int = 32
    memory_mb: int = 256_000
    features: tuple[str, ...] = ()

    @property
    def gpu_count(self) -> int:
        return sum(n for _, n in self.gres)


NODES: tuple[Node, ...] = (
    Node("h100-a", (("h100", 8),), features=("h100", "fr")),
    Node("h100-b", (("h100", 8),), features=("h100", "fr")),
    Node("b200-a", (("b200", 8),), features=("b200", "de")),
    Node("mig-a", (("h100_3g.40gb", 2), ("h100_1g.10gb", 7)), features=("h100", "mig", "fr")),
)

#: Slurm partition → (nodes, MaxTime in minutes). Limits match the site file.
PARTITIONS: dict[str, tuple[tuple[str, ...], int]] = {
    "gpu-fr": (("h100-a", "h100-b", "mig-a"), 480),
    "gpu-de": (("b200-a",), 240),
}


class ClusterError(RuntimeError):
    """The cluster could not be started, or a client call failed."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as gone.
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def ensure_users(users: Sequence[str] = TEST_USERS, group: str = TEST_GROUP) -> dict[str, int]:
    """Create the test users (home under /home, shell bash) if missing; return name → uid."""
    if subprocess.run(["getent", "group", group], capture_output=True).returncode != 0:
        subprocess.run(["groupadd", group], check=True, capture_output=True)
    out: dict[str, int] = {}
    for u in users:
        if subprocess.run(["getent", "passwd", u], capture_output=True).returncode != 0:
            r = subprocess.run(
                ["useradd", "-m", "-s", "/bin/bash", "-g", group, u],
                capture_output=True,
                text=True,
            )
            # Two processes may race to create the same user: accept "already exists" (9).
            if r.returncode not in (0, 9):
                raise ClusterError(f"useradd {u} failed ({r.returncode}): {r.stderr.strip()}")
        out[u] = pwd.getpwnam(u).pw_uid
    return out


def check_traversable(path: Path, user: str) -> None:
    """Fail loudly if ``user`` cannot reach ``path`` (every parent needs o+x): see LAB.md."""
    r = subprocess.run(["runuser", "-u", user, "--", "test", "-r", str(path)], capture_output=True)
    if r.returncode != 0:
        namei = subprocess.run(["namei", "-l", str(path)], capture_output=True, text=True).stdout
        raise ClusterError(
            f"user {user} cannot read {path}: jobs run as test users, so every parent directory "
            f"needs o+x (run scripts/install.sh, which chmods the checkout).\n{namei}"
        )


@dataclass
class SlurmCluster:
    """One cluster rooted at ``base``. ``up()`` writes config, starts daemons, waits for idle."""

    base: Path
    nodes: tuple[Node, ...] = NODES
    partitions: dict[str, tuple[tuple[str, ...], int]] = field(
        default_factory=lambda: dict(PARTITIONS)
    )
    users: tuple[str, ...] = TEST_USERS
    cluster_name: str = "sovereign-test"
    #: Run slurmdbd with MariaDB (tests/support/slurmdbd.py): sacct, associations, limits.
    accounting: bool = False
    #: Accept JWT tokens too (``auth/jwt``, a key of its own) and allow :meth:`start_rest`.
    jwt: bool = False
    #: The port slurmrestd listens on (127.0.0.1), chosen at :meth:`start_rest`.
    rest_port: int = 0
    _procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict, repr=False)
    _acct: Any = field(default=None, repr=False)

    # -- paths -------------------------------------------------------------------------
    @property
    def conf(self) -> Path:
        return self.base / "etc" / "slurm.conf"

    @property
    def munge_socket(self) -> Path:
        return self.base / "munge" / "munge.socket.2"

    @property
    def log_dir(self) -> Path:
        return self.base / "log"

    @property
    def spool_root(self) -> Path:
        return self.base / "spool"

    def spool(self, node: str) -> Path:
        return self.spool_root / node

    @property
    def hostname(self) -> str:
        return socket.gethostname().split(".")[0]

    @property
    def jwt_key(self) -> Path:
        return self.base / "jwt" / "jwt.key"

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{self.rest_port}"

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """The environment Slurm clients need (``SLURM_CONF``), over ``base`` or os.environ."""
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        return env

    # -- configuration -----------------------------------------------------------------
    def _write_config(self) -> None:
        b = self.base
        for d in ("etc", "state", "spool", "log", "run", "dev", "munge", "munge-key"):
            (b / d).mkdir(parents=True, exist_ok=True)
        os.chmod(b, 0o755)  # noqa: S103 - test users' jobs traverse it
        for d in ("etc", "spool", "dev", "munge"):
            os.chmod(b / d, 0o755)  # noqa: S103 - users' clients read slurm.conf, munge socket
        os.chmod(b / "munge-key", 0o700)
        os.chmod(b / "log", 0o700)
        os.chmod(b / "state", 0o700)
        # Fake GPUs: gres.conf needs File= in 22.05 (Count= alone drains the node).
        most = max(n.gpu_count for n in self.nodes)
        for i in range(most):
            dev = b / "dev" / f"nvidia{i}"
            if not dev.exists():
                os.mknod(dev, 0o666 | stat.S_IFCHR, os.makedev(195, i))
        ctl_port = _free_port()
        lines = [
            "# Generated by tests/support/slurm_cluster.py: a one-host test cluster.",
            f"ClusterName={self.cluster_name}",
            f"SlurmctldHost={self.hostname}(127.0.0.1)",
            f"SlurmctldPort={ctl_port}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"StateSaveLocation={b / 'state'}",
            f"SlurmdSpoolDir={b / 'spool' / '%n'}",
            f"SlurmctldPidFile={b / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={b / 'run' / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={b / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={b / 'log' / 'slurmd-%n.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "GresTypes=gpu",
            "SlurmdParameters=config_overrides",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=batch_sched_delay=0",
            "ReturnToService=2",
            "MpiDefault=none",
            *self._accounting_lines(),
            *self._jwt_lines(),
            "JobCompType=jobcomp/none",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=300",
            "InactiveLimit=0",
            "KillWait=2",
            "MinJobAge=120",
            "MessageTimeout=10",
        ]
        for n in self.nodes:
            gres = ",".join(f"gpu:{t}:{c}" for t, c in n.gres)
            feats = f" Feature={','.join(n.features)}" if n.features else ""
            lines.append(
                f"NodeName={n.name} NodeAddr=127.0.0.1 NodeHostname={self.hostname} "
                f"Port={_free_port()} CPUs={n.cpus} RealMemory={n.memory_mb} Gres={gres}"
                f"{feats} State=UNKNOWN"
            )
        for i, (pname, (pnodes, max_min)) in enumerate(self.partitions.items()):
            default = " Default=YES" if i == 0 else ""
            lines.append(
                f"PartitionName={pname} Nodes={','.join(pnodes)} MaxTime={max_min}"
                f" DefaultTime=60 State=UP{default}"
            )
        self.conf.write_text("\n".join(lines) + "\n")
        gres_lines = []
        for n in self.nodes:
            first = 0
            for t, c in n.gres:
                files = f"{b / 'dev'}/nvidia[{first}-{first + c - 1}]"
                gres_lines.append(f"NodeName={n.name} Name=gpu Type={t} File={files}")
                first += c
        (b / "etc" / "gres.conf").write_text("\n".join(gres_lines) + "\n")
        (b / "etc" / "cgroup.conf").write_text("# cgroups are not used (task/none)\n")
        for f in ("slurm.conf", "gres.conf", "cgroup.conf"):
            os.chmod(b / "etc" / f, 0o644)
        key = b / "munge-key" / "munge.key"
        if not key.exists():
            key.write_bytes(secrets.token_bytes(1024))
        os.chmod(key, 0o400)

    def _jwt_lines(self) -> list[str]:
        if not self.jwt:
            return []
        self.jwt_key.parent.mkdir(mode=0o700, exist_ok=True)
        if not self.jwt_key.exists():
            fd = os.open(self.jwt_key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(32))
        return ["AuthAltTypes=auth/jwt", f"AuthAltParameters=jwt_key={self.jwt_key}"]

    def mint_token(self, user: str = "root", lifespan: int = 3600) -> str:
        """A JWT for ``user`` signed with this cluster's key (what ``scontrol token`` gives).

        A root (SlurmUser) token may act as any user, which is what a portal's site
        credential is; tests also mint tokens of plain users to check what they cannot do.
        """
        import jwt as pyjwt

        now = int(time.time())
        claims = {"iat": now, "exp": now + lifespan, "sun": user}
        return str(pyjwt.encode(claims, self.jwt_key.read_bytes(), algorithm="HS256"))

    def write_token(self, path: Path, user: str = "root", lifespan: int = 3600) -> Path:
        """Write :meth:`mint_token` to ``path`` (0600): the token file a site file names."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.mint_token(user, lifespan) + "\n")
        return path

    def start_rest(self, timeout: float = 10) -> None:
        """Start slurmrestd (JWT, openapi/v0.0.38) on 127.0.0.1 as nobody; wait until it
        answers. The port is kept across restarts, so clients keep their URL."""
        if not self.jwt:
            raise ClusterError("slurmrestd needs a cluster started with jwt=True")
        exe = shutil.which("slurmrestd") or "/usr/sbin/slurmrestd"
        if not Path(exe).exists():
            raise ClusterError("slurmrestd not found: run scripts/install.sh --test")
        if not self.rest_port:
            self.rest_port = _free_port()
        argv = [exe, "-u", "nobody", "-g", "nogroup", "-s", "openapi/v0.0.38"]
        self._spawn("slurmrestd", [*argv, f"127.0.0.1:{self.rest_port}"], {"SLURM_JWT": "daemon"})
        self._wait("slurmrestd to listen", self.rest_up, timeout)

    def stop_rest(self) -> None:
        """Stop slurmrestd only (by PID): slurmctld and the jobs keep running."""
        self._stop_one("slurmrestd")

    def rest_up(self) -> bool:
        if not self.rest_port:
            return False
        with socket.socket() as s:
            s.settimeout(0.5)
            return s.connect_ex(("127.0.0.1", self.rest_port)) == 0

    @property
    def acct(self) -> Any:
        """The cluster's MariaDB + slurmdbd (only with ``accounting=True``)."""
        from tests.support.slurmdbd import AccountingDB

        if self._acct is None:
            port = _free_port()
            self._acct = AccountingDB(
                self.base / "acct", self.base / "etc", self.munge_socket, port
            )
        return self._acct

    def _accounting_lines(self) -> list[str]:
        if not self.accounting:
            return [
                "AccountingStorageType=accounting_storage/none",
                "JobAcctGatherType=jobacct_gather/none",
            ]
        types = sorted({t for n in self.nodes for t, _ in n.gres})
        tres = ",".join(["gres/gpu", *(f"gres/gpu:{t}" for t in types)])
        return [
            "AccountingStorageType=accounting_storage/slurmdbd",
            "AccountingStorageHost=127.0.0.1",
            f"AccountingStoragePort={self.acct.port}",
            f"AccountingStoragePass=socket={self.munge_socket}",
            f"AccountingStorageTRES={tres}",
            "AccountingStorageEnforce=associations,limits,qos,safe",
            "JobAcctGatherType=jobacct_gather/linux",
            "JobAcctGatherFrequency=5",
            "PriorityType=priority/multifactor",
            "PriorityDecayHalfLife=0",
            "PriorityUsageResetPeriod=NONE",
            "PriorityCalcPeriod=1",
        ]

    def start_accounting(self, timeout: float = 60) -> None:
        """MariaDB, then slurmdbd; register the cluster and a default account for the users."""
        from tests.support.slurmdbd import require_tools, wait_for

        require_tools()
        acct = self.acct
        acct.write_config()
        acct.install_db()
        self._spawn("mariadbd", acct.mariadbd_argv())
        self._wait("MariaDB", acct.db_ready, timeout)
        acct.create_database()
        self._spawn("slurmdbd", acct.slurmdbd_argv(), extra_env=acct.env({}))

        def dbd_up() -> bool:
            r = self.run(["sacctmgr", "-n", "-P", "show", "cluster"], check=False, timeout=10)
            return r.returncode == 0

        self._wait("slurmdbd to answer", dbd_up, timeout)
        self.sacctmgr("add", "cluster", self.cluster_name)
        self.sacctmgr("add", "account", "portal", "Description=portal default", "Organization=sp")
        for u in self.users:
            self.sacctmgr("add", "user", u, "Account=portal", "DefaultAccount=portal")
        wait_for("associations", lambda: bool(self.associations()), 10)

    def sacctmgr(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``sacctmgr -i ARGS``; "Nothing new added" (exit 1 on an existing entity) is fine."""
        r = self.run(["sacctmgr", "-i", *args], check=False, timeout=30)
        if r.returncode != 0 and "Nothing new added" not in r.stdout + r.stderr:
            raise ClusterError(f"sacctmgr {' '.join(args)}: {r.stdout} {r.stderr}")
        return r

    def associations(self) -> list[dict[str, str]]:
        r = self.run(
            ["sacctmgr", "-n", "-P", "show", "assoc", "format=cluster,account,user,grptresmins"],
            check=False,
            timeout=10,
        )
        keys = ("cluster", "account", "user", "grptresmins")
        return [dict(zip(keys, ln.split("|"), strict=False)) for ln in r.stdout.splitlines()]

    # -- processes ---------------------------------------------------------------------
    def _pidfile(self, name: str) -> Path:
        return self.base / "run" / f"{name}.owned-pid"

    def _spawn(self, name: str, argv: list[str], extra_env: dict[str, str] | None = None) -> None:
        log = open(self.log_dir / f"{name}.stdout", "ab")  # noqa: SIM115 - child keeps it
        env = self.env()
        env.update(extra_env or {})
        env.pop("SLURM_JOB_ID", None)
        p = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        log.close()
        self._procs[name] = p
        self._pidfile(name).write_text(str(p.pid))

    def _owned_pids(self) -> dict[str, int]:
        out = {}
        for f in sorted((self.base / "run").glob("*.owned-pid")):
            with contextlib.suppress(ValueError, OSError):
                out[f.name.removesuffix(".owned-pid")] = int(f.read_text())
        return out

    def _wait(self, what: str, check: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            for name, p in self._procs.items():
                if p.poll() is not None:
                    raise ClusterError(f"{name} exited with {p.returncode}\n{self.logs(name)}")
            time.sleep(0.05)
        raise ClusterError(f"timed out waiting for {what}\n{self.logs()}")

    def logs(self, only: str | None = None, tail: int = 30) -> str:
        out = []
        for f in sorted(self.log_dir.glob("*")):
            if only and only not in f.name:
                continue
            text = f.read_text(errors="replace").splitlines()[-tail:]
            out.append(f"--- {f.name}\n" + "\n".join(text))
        return "\n".join(out)

    def start_munge(self) -> None:
        self._spawn(
            "munged",
            [
                "munged",
                "-F",
                "--force",
                f"--socket={self.munge_socket}",
                f"--key-file={self.base / 'munge-key' / 'munge.key'}",
                f"--pid-file={self.base / 'munge' / 'munged.pid'}",
                f"--seed-file={self.base / 'munge-key' / 'munged.seed'}",
                f"--log-file={self.log_dir / 'munged.log'}",
            ],
        )
        self._wait("munged socket", self.munge_socket.exists, 10)

    def start_controller(self, clear_state: bool = False, timeout: float = 30) -> None:
        """Start slurmctld (``-c`` throws away saved jobs) and wait until it answers."""
        argv = ["slurmctld", "-D", "-f", str(self.conf)]
        if clear_state:
            argv.append("-c")
        self._spawn("slurmctld", argv)
        self._wait("slurmctld to answer", self.controller_up, timeout)

    def stop_controller(self) -> None:
        """Stop slurmctld only (SIGTERM, then wait): jobs keep running on the slurmds."""
        self._stop_one("slurmctld")

    def controller_up(self) -> bool:
        r = self.run(["scontrol", "ping"], check=False, timeout=5)
        return r.returncode == 0 and "UP" in r.stdout

    def start_nodes(self) -> None:
        for n in self.nodes:
            (self.spool(n.name)).mkdir(parents=True, exist_ok=True)
            os.chmod(self.spool(n.name), 0o755)  # noqa: S103 - slurmstepd as the user
            self._spawn(f"slurmd-{n.name}", ["slurmd", "-D", "-N", n.name, "-f", str(self.conf)])

    def node_states(self) -> dict[str, str]:
        r = self.run(["scontrol", "show", "nodes", "-o"], check=False, timeout=10)
        out = {}
        for line in r.stdout.splitlines():
            fields = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
            if "NodeName" in fields:
                out[fields["NodeName"]] = fields.get("State", "")
        return out

    def nodes_idle(self) -> bool:
        states = self.node_states()
        return len(states) == len(self.nodes) and all(
            s.split("+")[0] in ("IDLE", "MIXED", "ALLOCATED") for s in states.values()
        )

    def up(self, timeout: float = 60) -> SlurmCluster:
        """Write config, create users, start munged, slurmctld and the slurmds; wait idle."""
        for tool in ("munged", "slurmctld", "slurmd", "sbatch", "scontrol"):
            if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists():
                raise ClusterError(
                    f"{tool} not found: run scripts/install.sh (Debian slurm, munge)"
                )
        os.environ["PATH"] = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
        if self.is_up():
            raise ClusterError(f"a cluster is already running in {self.base}; run down first")
        self.base.mkdir(parents=True, exist_ok=True)
        ensure_users(self.users)
        self._write_config()
        # The users' sbatch reads slurm.conf: below a 0700 parent (mkdtemp's) it retries
        # "Permission denied" for 60 s, a hang; say so now instead.
        for u in self.users[:1]:
            check_traversable(self.conf, u)
        try:
            self.start_munge()
            if self.accounting:
                self.start_accounting(timeout)
            self.start_controller(clear_state=True, timeout=timeout)
            self.start_nodes()
            self._wait("nodes to be idle", self.nodes_idle, timeout)
        except BaseException:
            self.down()
            raise
        (self.base / "cluster.json").write_text(json.dumps(self.describe(), indent=2))
        return self

    def is_up(self) -> bool:
        pids = self._owned_pids()
        return bool(pids) and all(_pid_alive(p) for p in pids.values())

    def _stop_one(self, name: str, timeout: float = 15) -> None:
        pf = self._pidfile(name)
        try:
            pid = int(pf.read_text())
        except (OSError, ValueError):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            while _pid_alive(pid):
                time.sleep(0.05)
        if name in self._procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._procs.pop(name).wait(timeout=1)
        pf.unlink(missing_ok=True)

    def cancel_all_jobs(self) -> None:
        if self.controller_up():
            self.run(["scancel", "--full", "--quiet", *self._job_ids()], check=False)

    def _job_ids(self) -> list[str]:
        r = self.run(["squeue", "-h", "-o", "%i"], check=False, timeout=10)
        return r.stdout.split()

    def down(self) -> None:
        """Cancel jobs, then stop every daemon this cluster started, by PID (slurmds first)."""
        with contextlib.suppress(Exception):
            ids = self._job_ids() if self._owned_pids().get("slurmctld") else []
            if ids:
                self.run(["scancel", *ids], check=False, timeout=10)
                deadline = time.monotonic() + 10
                while self._job_ids() and time.monotonic() < deadline:
                    time.sleep(0.1)
        names = list(self._owned_pids())
        rank = {"slurmrestd": 0, "slurmctld": 1, "slurmdbd": 2, "mariadbd": 3, "munged": 4}
        order = sorted(names, key=lambda n: rank.get(n, 0))
        for name in order:
            self._stop_one(name)
        self._kill_leftover_steps()

    def _kill_leftover_steps(self) -> None:
        """slurmstepd processes whose spool is ours (jobs of a killed slurmd), by PID."""
        spool = str(self.spool_root)
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmd = (proc / "cmdline").read_bytes().split(b"\0")
                if not cmd or not cmd[0].endswith(b"slurmstepd"):
                    continue
                cwd = os.readlink(proc / "cwd")
            except OSError:
                continue
            if cwd.startswith(spool):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(proc.name), signal.SIGKILL)

    # -- clients -------------------------------------------------------------------------
    def run(
        self,
        argv: Sequence[str],
        user: str | None = None,
        check: bool = True,
        timeout: float = 30,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client (as ``user`` through runuser), with SLURM_CONF set."""
        cmd = list(argv)
        if user is not None:
            cmd = ["runuser", "-u", user, "--", *cmd]
        r = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            env=self.env(),
            timeout=timeout,
            input=input,
            cwd="/",
        )
        if check and r.returncode != 0:
            raise ClusterError(
                f"{' '.join(cmd)} exited {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
            )
        return r

    def jobs(self) -> list[dict[str, str]]:
        """Every job Slurm knows (all states), as dicts: id, name, user, state, nodes, comment."""
        fmt = "%i|%j|%u|%T|%N|%k"
        r = self.run(["squeue", "-h", "-t", "all", "-o", fmt])
        keys = ("id", "name", "user", "state", "nodes", "comment")
        return [dict(zip(keys, line.split("|", 5), strict=True)) for line in r.stdout.splitlines()]

    def wait_job_state(self, job_id: str, states: Sequence[str], timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            r = self.run(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T"], check=False)
            state = r.stdout.strip()
            if state in states:
                return state
            time.sleep(0.1)
        raise ClusterError(f"job {job_id} is {state or 'gone'}, not one of {list(states)}")

    def run_job(
        self,
        seconds: int,
        *,
        partition: str = "gpu-fr",
        gres: str = "gpu:h100:1",
        user: str = "spcarol",
    ) -> tuple[str, float, float]:
        """Submit a batch job (``sleep seconds``, 2 minutes' walltime) as ``user`` and wait
        until it has COMPLETED: its id and when this process saw it start and end."""
        argv = ["sbatch", "--parsable", "--chdir=/tmp", "--output=/dev/null", "-p", partition]
        r = self.run(
            [*argv, f"--gres={gres}", "-t", "2"],
            user=user,
            input=f"#!/bin/bash\nsleep {seconds}\n",
        )
        job = r.stdout.strip().split(";")[0]
        self.wait_job_state(job, ["RUNNING", "COMPLETING", "COMPLETED"])
        started = time.time()
        self.wait_job_state(job, ["COMPLETED"], timeout=60)
        return job, started, time.time()

    def describe(self) -> dict[str, Any]:
        return {
            "base": str(self.base),
            "slurm_conf": str(self.conf),
            "site_file": str(SITE_FILE),
            "users": list(self.users),
            "nodes": {n.name: dict(n.gres) for n in self.nodes},
            "partitions": {p: list(ns) for p, (ns, _) in self.partitions.items()},
        }


#: the PATH of the test hubs' Slurm jobs: this venv first (jupyterhub-singleuser), then the system's
JOB_PATH = f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin"


def spawner_config(
    *,
    tag_key: Path | str,
    job_egress: Path | str,
    site: Path | str = SITE_FILE,
    start_timeout: int = 240,
    http_timeout: int | None = None,
    start_slots: int | None = None,
    job_path: str = JOB_PATH,
) -> str:
    """The hub-config text (``jupyterhub_config.py`` lines) of a test hub whose servers are
    Slurm jobs on the test cluster: the ``slurm-gpu`` spawner on ``site`` (default: the test
    cluster's site file), servers on 127.0.0.1 as the hub user's own Unix account
    (``unix_user_template = "{login}"``), one batched ``squeue`` a second, the job tag's key
    in ``tag_key``, jobs with ``job_path`` as their PATH and the egress guard's log
    ``job_egress`` added to the servers' environment. ``start_timeout``, ``http_timeout``
    (JupyterHub's default when None) and ``start_slots`` (the spawner's default when None)
    are the values the hubs differ in. Append it to the rest of the config."""
    lines = [
        'c.JupyterHub.spawner_class = "slurm-gpu"',
        f"c.SlurmGPUSpawner.site_file = {str(site)!r}",
        'c.SlurmGPUSpawner.server_ip = "127.0.0.1"',
        'c.SlurmGPUSpawner.unix_user_template = "{login}"',
        "c.SlurmGPUSpawner.scheduler_poll_interval = 1.0",
        f"c.SlurmGPUSpawner.tag_key_file = {str(tag_key)!r}",
        f'c.SlurmGPUSpawner.job_environment = {{"PATH": {job_path!r}}}',
    ]
    if start_slots is not None:
        lines.append(f"c.SlurmGPUSpawner.start_slots = {start_slots}")
    lines += [
        "c.Spawner.environment = "
        f'{{**c.Spawner.get("environment", {{}}), "EGRESS_LOG": {str(job_egress)!r}}}',
        f"c.Spawner.start_timeout = {start_timeout}",
    ]
    if http_timeout is not None:
        lines.append(f"c.Spawner.http_timeout = {http_timeout}")
    return "\n" + "\n".join(lines) + "\n"


# -- pytest ------------------------------------------------------------------------------
def _fixture() -> Any:
    import pytest

    @pytest.fixture(scope="session")
    def slurm_cluster() -> Iterator[SlurmCluster]:
        """A running cluster for the whole session (reused from SOVEREIGN_SLURM_DIR if up),
        with the accounts of both main units (``TEST_USERS`` and ``SECOND_USERS``). Under
        xdist each worker that runs a main Slurm unit starts its own; a cluster given by
        SOVEREIGN_SLURM_DIR is one for both, so run with ``-n 0`` then (the units would
        see each other's jobs and slurmctld RPCs)."""
        given = os.environ.get("SOVEREIGN_SLURM_DIR")
        if given:
            cluster = SlurmCluster(Path(given), users=(*TEST_USERS, *SECOND_USERS))
            if not cluster.is_up():
                raise ClusterError(f"SOVEREIGN_SLURM_DIR={given} but no cluster is up there")
            ensure_users(cluster.users)
            os.environ["SLURM_CONF"] = str(cluster.conf)
            yield cluster
            return
        base = Path(tempfile.mkdtemp(prefix="sp-slurm-", dir="/tmp"))
        cluster = SlurmCluster(base, users=(*TEST_USERS, *SECOND_USERS)).up()
        old = os.environ.get("SLURM_CONF")
        os.environ["SLURM_CONF"] = str(cluster.conf)
        try:
            yield cluster
        finally:
            cluster.down()
            if old is None:
                os.environ.pop("SLURM_CONF", None)
            else:
                os.environ["SLURM_CONF"] = old
            shutil.rmtree(base, ignore_errors=True)

    return slurm_cluster


def _accounting_fixture() -> Any:
    import pytest

    @pytest.fixture(scope="session")
    def slurm_accounting_cluster() -> Iterator[SlurmCluster]:
        """A second cluster (``sovereign-acct``) with slurmdbd + MariaDB, for the session.

        It never touches ``SLURM_CONF`` of the process: use its ``env()``/``run()``.
        """
        base = Path(tempfile.mkdtemp(prefix="sp-acct-", dir="/tmp"))
        cluster = SlurmCluster(base, cluster_name="sovereign-acct", accounting=True)
        cluster.up()
        try:
            yield cluster
        finally:
            cluster.down()
            shutil.rmtree(base, ignore_errors=True)

    return slurm_accounting_cluster


#: The two sites of tests/support/sites/two-sites.toml: a site name -> (ClusterName, node).
SITES: dict[str, tuple[str, str]] = {
    "paris": ("paris", "fr-h100-a"),
    "julich": ("julich", "de-h100-a"),
}
TWO_SITE_FILE = REPO / "tests" / "support" / "sites" / "two-sites.toml"


def site_cluster(base: Path, site: str, jwt: bool = False) -> SlurmCluster:
    """One site's own cluster (ClusterName, ports, munge key and socket, JWT key): one
    8 x H100 node in partition ``gpu``, as two-sites.toml declares."""
    cluster_name, node = SITES[site]
    return SlurmCluster(
        base,
        nodes=(Node(node, (("h100", 8),), features=()),),
        partitions={"gpu": ((node,), 480)},
        cluster_name=cluster_name,
        jwt=jwt,
        users=(*SITE_USERS, *TEST_USERS),  # the sites' own, and the main files' (reconcile)
    )


def write_site_file(path: Path, paris: SlurmCluster, julich: SlurmCluster, token: Path) -> Path:
    """two-sites.toml with paris's slurm.conf and julich's slurmrestd URL and token file."""
    text = TWO_SITE_FILE.read_text()
    text = text.replace('slurm_conf = "/etc/slurm/slurm.conf"', f'slurm_conf = "{paris.conf}"')
    text = text.replace('url = "http://127.0.0.1:6820"', f'url = "{julich.rest_url}"')
    text = text.replace('"/etc/sovereign-portal/julich.jwt"', f'"{token}"')
    path.write_text(text)
    return path


def _sites_fixture() -> Any:
    import pytest

    @pytest.fixture(scope="session")
    def slurm_sites() -> Iterator[dict[str, SlurmCluster]]:
        """Two sites for the session: ``paris`` (FR, munge, reached by the CLI) and
        ``julich`` (DE, JWT, behind its slurmrestd); each its own cluster. Never touches
        the process's SLURM_CONF: use each cluster's ``env()``/``run()``."""
        root = Path(tempfile.mkdtemp(prefix="sp-sites-", dir="/tmp"))
        os.chmod(root, 0o755)  # noqa: S103 - test users' jobs traverse it
        paris = site_cluster(root / "paris", "paris")
        julich = site_cluster(root / "julich", "julich", jwt=True)
        started: list[SlurmCluster] = []
        try:
            for c in (paris, julich):
                c.up()
                started.append(c)
            julich.start_rest()
            yield {"paris": paris, "julich": julich}
        finally:
            for c in reversed(started):
                c.down()
            shutil.rmtree(root, ignore_errors=True)

    return slurm_sites


with contextlib.suppress(ImportError):  # the CLI works without pytest
    slurm_cluster = _fixture()
    slurm_accounting_cluster = _accounting_fixture()
    slurm_sites = _sites_fixture()


# -- CLI -----------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tests.support.slurm_cluster",
        description="Start or stop a local Slurm test cluster with fake GPUs.",
    )
    ap.add_argument("action", choices=["up", "down", "env", "status"])
    ap.add_argument("--dir", required=True, type=Path, help="the cluster's own directory")
    ap.add_argument(
        "--accounting", action="store_true", help="with slurmdbd + MariaDB (sacct, limits)"
    )
    a = ap.parse_args(argv)
    cluster = SlurmCluster(a.dir.resolve(), accounting=a.accounting)
    if a.action == "up":
        t0 = time.monotonic()
        cluster.up()
        print(f"slurm test cluster up in {time.monotonic() - t0:.1f}s: SLURM_CONF={cluster.conf}")
        for name, state in cluster.node_states().items():
            print(f"  {name}: {state}")
    elif a.action == "down":
        cluster.down()
        print(f"slurm test cluster in {a.dir} stopped")
    elif a.action == "env":
        print(f"export SLURM_CONF={cluster.conf}")
        print(f"export SOVEREIGN_SLURM_DIR={cluster.base}")
    else:
        up = cluster.is_up()
        print(json.dumps({"up": up, **cluster.describe()}, indent=2))
        return 0 if up else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
