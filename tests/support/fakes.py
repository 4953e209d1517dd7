"""In-process fakes for the fast layer: a scripted Slurm, and a Slurm spawner that runs on it.

The idea is batchspawner's scripted command replay, in the style of JupyterHub's
``tests/mocking.py``. A test declares each scheduler command it expects (its argv) and the
canned answer (stdout, stderr, exit code, or no answer at all). Then it runs the real
:class:`~sovereign_portal.spawners.slurm.spawner.SlurmGPUSpawner` logic against that script:
start, poll, stop, failures and re-adoption, in milliseconds, with no Slurm cluster.
The real-Slurm layer (tests/hub/test_slurm_spawner.py) stays the proof. These fakes are its
fast inner layer.

- :class:`ScriptedCommands` replaces the one command-running helper, ``call``. So the real
  CLI transport of the scheduler client (:class:`~sovereign_portal.spawners.slurm.client.SlurmCLI`:
  argv building, parsing, "Invalid job id" as an answer) runs on top of the script. Steps are
  kept in order for each command (``sbatch``, ``squeue``, ``scancel``, ``sinfo``, ...). A step
  with ``repeat=True`` answers every further call (any number, none included) until the test
  scripts the next step for that command: use it for a steady state that a background poll
  may read any number of times. Every other step must be used. An unscripted call, or an
  argv that differs from the script, is recorded and fails :meth:`ScriptedCommands.run` at
  once.
- :func:`squeue_answer` and :func:`sinfo_answer` render canned output in whatever ``-o``
  format the caller asked for, so a script does not repeat the format strings.
- :class:`FakeAccount` is one Unix account (a non-system uid, its home under the test's
  tmp dir) added to ``pwd.getpwnam``. The real account policy, token file and directory code
  then run on it.
- :class:`ScriptedSlurmSpawner` is a ``SlurmGPUSpawner`` with its own scheduler client and
  poller (nothing shared with other tests), fast poll intervals, no orphan sweep, and a
  fixed hub environment in place of ``get_env()`` (there is no hub in this layer).
- :func:`slurm_script` installs it all for one test (used by the ``slurm_fake`` fixture of
  tests/unit/test_spawner_fakes.py).
- :func:`local_spawner` is a ``LocalGPUSpawner`` whose server process is one of the failure
  modes (:data:`EXITS_AT_ONCE`, :data:`NO_SUCH_PROGRAM`, or :data:`RUNS` for a server that
  stays up), with its own lease file: JupyterHub's Bad and Slow spawners, for the device
  leases.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import pytest
from sovereign_portal.spawners.slurm import scheduler as scheduler_mod
from sovereign_portal.spawners.slurm import spawner as spawner_mod
from sovereign_portal.spawners.slurm.scheduler import SLURM_COMMANDS, JobPoller, SlurmError
from sovereign_portal.spawners.slurm.spawner import SlurmGPUSpawner

T = TypeVar("T")


class _Any:
    """Matches any one argv element."""

    def __repr__(self) -> str:
        return "ANY"


ANY: Any = _Any()

#: A canned stdout: text, or a function of (argv, the script) that returns it.
Answer = str | Callable[[list[str], "ScriptedCommands"], str]


@dataclass
class Step:
    argv: list[Any]
    stdout: Answer = ""
    stderr: str = ""
    returncode: int = 0
    hang: bool = False  # no answer: the caller's timeout fires (TimeoutError)
    repeat: bool = False
    used: int = 0

    def matches(self, argv: Sequence[str]) -> bool:
        return len(argv) == len(self.argv) and all(
            want is ANY or want == got for want, got in zip(self.argv, argv, strict=True)
        )


@dataclass
class Call:
    """One command the code under test ran."""

    argv: list[str]
    input: str | None
    env: dict[str, str] | None
    cwd: str


def command_of(argv: Sequence[str]) -> str:
    """The scheduler command of an argv (``runuser -u x -- sbatch`` is ``sbatch``)."""
    names = [os.path.basename(a) for a in argv]
    return next((n for n in names if n in SLURM_COMMANDS), names[0] if names else "")


@dataclass
class ScriptedCommands:
    """The scheduler's commands, replayed from a script (an async stand-in for ``call``)."""

    steps: dict[str, list[Step]] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._failed: asyncio.Event | None = None

    def expect(
        self,
        argv: Sequence[Any],
        stdout: Answer = "",
        stderr: str = "",
        returncode: int = 0,
        *,
        hang: bool = False,
        repeat: bool = False,
    ) -> ScriptedCommands:
        """Script the next call of ``argv``'s command (``ANY`` matches one element)."""
        queue = self.steps.setdefault(command_of([str(a) for a in argv if a is not ANY]), [])
        if queue and queue[-1].repeat:
            queue.pop()  # a steady state ends where the next step begins
        queue.append(Step(list(argv), stdout, stderr, returncode, hang, repeat))
        return self

    def _fail(self, why: str) -> None:
        self.unexpected.append(why)
        if self._failed is not None:
            self._failed.set()

    async def __call__(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        input: str | None = None,
        timeout: float = 30,  # noqa: ASYNC109 - the signature of call()
        cwd: str = "/",
    ) -> str:
        argv = [str(a) for a in argv]
        assert all(isinstance(a, str) for a in argv)  # argv lists, never a shell string
        self.calls.append(Call(argv, input, dict(env) if env is not None else None, cwd))
        queue = self.steps.get(command_of(argv), [])
        if not queue:
            self._fail(f"unscripted call: {argv}")
            raise SlurmError(argv, 97, "", "unscripted call (tests.support.fakes)")
        step = queue[0]
        if not step.matches(argv):
            self._fail(f"call {argv} does not match the script's next {step.argv}")
            raise SlurmError(argv, 98, "", "argv differs from the script (tests.support.fakes)")
        step.used += 1
        if not step.repeat:
            queue.pop(0)
        await asyncio.sleep(0)  # a real call yields to the loop too
        if step.hang:
            raise TimeoutError(f"{argv[0]} did not answer within {timeout}s (scripted)")
        stdout = step.stdout(argv, self) if callable(step.stdout) else step.stdout
        if step.returncode != 0:
            raise SlurmError(argv, step.returncode, stdout, step.stderr)
        return stdout

    # -- for the test -------------------------------------------------------------------
    def ran(self, command: str) -> list[Call]:
        return [c for c in self.calls if command_of(c.argv) == command]

    def pending(self) -> list[tuple[str, list[Any]]]:
        """Scripted steps not used yet (a repeat step is never owed)."""
        return [(cmd, s.argv) for cmd, queue in self.steps.items() for s in queue if not s.repeat]

    def assert_done(self) -> None:
        assert self.unexpected == [], self.unexpected
        assert self.pending() == [], f"scripted but never called: {self.pending()}"

    async def run(self, aw: Awaitable[T], timeout: float = 10) -> T:  # noqa: ASYNC109
        """Await ``aw``, failing at once on an unscripted call, or after ``timeout``."""
        self._failed = asyncio.Event()
        if self.unexpected:
            self._failed.set()
        task = asyncio.ensure_future(aw)
        failed = asyncio.ensure_future(self._failed.wait())
        try:
            done, _ = await asyncio.wait(
                {task, failed}, timeout=timeout, return_when="FIRST_COMPLETED"
            )
        finally:
            failed.cancel()
        if task in done:
            return task.result()
        task.cancel()
        with_calls = "\n  ".join(" ".join(c.argv) for c in self.calls[-10:])
        raise AssertionError(
            f"{self.unexpected or f'no result within {timeout}s'}; "
            f"still scripted: {self.pending()}; last calls:\n  {with_calls}"
        )

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Put the script where the one command helper ``call`` is looked up."""
        real = scheduler_mod.call
        for name in ("client", "scheduler", "spawner", "sweep"):
            mod = __import__(f"sovereign_portal.spawners.slurm.{name}", fromlist=["_"])
            if getattr(mod, "call", None) is real:
                monkeypatch.setattr(mod, "call", self)


# -- canned output in the caller's own -o format ---------------------------------------------
def _format_of(argv: Sequence[str]) -> str:
    i = argv.index("-o")
    return argv[i + 1]


def _render(fmt: str, fields: Mapping[str, str]) -> str:
    return re.sub(r"%([a-zA-Z])", lambda m: fields.get(m.group(1), ""), fmt)


def squeue_answer(*jobs: Mapping[str, Any]) -> Answer:
    """squeue's lines for ``jobs``: dicts of id, state, reason, nodes, start, user, comment,
    partition, priority. ``comment`` may be a function of the script (the last stdin sbatch
    got), e.g. :func:`port_comment`."""

    def answer(argv: list[str], script: ScriptedCommands) -> str:
        lines = []
        for job in jobs:
            comment = job.get("comment", "")
            if callable(comment):
                comment = comment(script)
            fields = {
                "i": str(job["id"]),
                "A": str(job["id"]),
                "T": job.get("state", "RUNNING"),
                "r": job.get("reason", "None"),
                "N": job.get("nodes", ""),
                "S": job.get("start", "N/A"),
                "u": job.get("user", "spfake"),
                "k": comment,
                "P": job.get("partition", "gpu-fr"),
                "Q": str(job.get("priority", 1)),
                "j": job.get("name", "sovereign-portal"),
            }
            lines.append(_render(_format_of(argv), fields))
        return "".join(f"{line}\n" for line in lines)

    return answer


def sinfo_answer(nodes: Mapping[str, tuple[str, str]]) -> Answer:
    """sinfo's lines: node name -> (address, GRES such as ``gpu:h100:8``)."""

    def answer(argv: list[str], script: ScriptedCommands) -> str:
        fmt = _format_of(argv)
        return "".join(
            _render(fmt, {"N": n, "n": n, "o": addr, "G": gres}) + "\n"
            for n, (addr, gres) in nodes.items()
        )

    return answer


def submitted_tag(script: ScriptedCommands) -> str:
    """The job tag of the last script sbatch got (its ``#SBATCH --comment=`` line)."""
    stdin = script.ran("sbatch")[-1].input or ""
    m = re.search(r"--comment=sovereign-portal:(\S+)", stdin)
    assert m, f"no tag in the submitted script:\n{stdin[:500]}"
    return m.group(1)


def port_comment(port: int) -> Callable[[ScriptedCommands], str]:
    """The comment a job sets once its server listens on ``port`` (as launch.py does)."""
    return lambda script: f"sovereign-portal:{submitted_tag(script)}:port={port}"


# -- one Unix account ----------------------------------------------------------------------------
class FakeAccount:
    """A non-system Unix account whose home is a tmp dir, seen by ``pwd.getpwnam`` only.

    As root it gets uid 4242 (root may chown to it); otherwise the test's own uid.
    """

    def __init__(self, home: Path, name: str = "spfake") -> None:
        uid, gid = (4242, 4242) if os.getuid() == 0 else (os.getuid(), os.getgid())
        home.mkdir(parents=True, exist_ok=True)
        os.chown(home, uid, gid)
        home.chmod(0o700)
        self.name, self.home = name, home
        self.entry = pwd.struct_passwd((name, "x", uid, gid, "", str(home), "/bin/bash"))

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real = pwd.getpwnam

        def getpwnam(name: str) -> pwd.struct_passwd:
            return self.entry if name == self.name else real(name)

        monkeypatch.setattr(pwd, "getpwnam", getpwnam)


# -- the spawner --------------------------------------------------------------------------------
class ScriptedSlurmSpawner(SlurmGPUSpawner):
    """The real SlurmGPUSpawner with its own client and poller, on whatever ``call`` is."""

    hub_env: dict[str, str]

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self._own_poller = JobPoller(
            self.scheduler_poll_interval, 0.0, self.scheduler_fast_interval
        )
        self.hub_env = {
            "JUPYTERHUB_API_TOKEN": self.api_token,
            "JUPYTERHUB_USER": self.user.name,
            "JUPYTERHUB_API_URL": "http://127.0.0.1:8081/hub/api",
        }

    @property
    def poller(self) -> JobPoller:
        return self._own_poller

    def get_env(self) -> dict[str, str]:
        return dict(self.hub_env)


def make_spawner(account: FakeAccount, workdir: Path, **config: Any) -> ScriptedSlurmSpawner:
    """A spawner for ``account``'s hub user, with fast intervals and its own tag key."""
    from tests.support.slurm_cluster import SITE_FILE

    user = SimpleNamespace(name=account.name, groups=[], url=f"/user/{account.name}/")
    settings: dict[str, Any] = {
        "site_file": str(SITE_FILE),
        "user": user,
        "api_token": "t0ken-" + "s" * 26,
        "tag_key_file": str(workdir / "tag.key"),
        "scheduler_poll_interval": 3600.0,  # between tests' explicit polls: none by itself
        "scheduler_fast_interval": 0.01,
        "connect_poll_interval": 0.01,
        "orphan_grace_seconds": 0.0,
        "stop_wait_timeout": 10.0,
        "http_timeout": 5,
        "user_options": {"partition": "gpu-fr", "gpus": 1},
    }
    settings.update(config)
    return ScriptedSlurmSpawner(**settings)


@dataclass
class SlurmScript:
    """What :func:`slurm_script` installs: the command script and the account."""

    commands: ScriptedCommands
    account: FakeAccount
    workdir: Path

    def spawner(self, **config: Any) -> ScriptedSlurmSpawner:
        return make_spawner(self.account, self.workdir, **config)


def slurm_script(monkeypatch: pytest.MonkeyPatch, workdir: Path) -> SlurmScript:
    """A scripted scheduler and a fake account for one test; module caches start empty."""
    commands = ScriptedCommands()
    commands.install(monkeypatch)
    account = FakeAccount(workdir / "home")
    account.install(monkeypatch)
    monkeypatch.setattr(spawner_mod, "_NODE_ADDR", {})
    monkeypatch.setattr(spawner_mod, "TRACKED_TAGS", set())
    if hasattr(spawner_mod, "_CLIENTS"):
        monkeypatch.setattr(spawner_mod, "_CLIENTS", {})
    return SlurmScript(commands, account, workdir)


# -- the local GPU spawner -----------------------------------------------------------------------
#: Servers that fail the way real ones do, as the process LocalGPUSpawner starts (``cmd``).
#: Each ignores the server arguments appended to it.
EXITS_AT_ONCE = ["-c", "import sys; sys.exit(3)"]
RUNS = ["-c", "import time; time.sleep(60)"]
NO_SUCH_PROGRAM = "/nonexistent/jupyterhub-singleuser"


def local_spawner(workdir: Path, server: Sequence[str] | str = RUNS, **config: Any) -> Any:
    """A LocalGPUSpawner of user ``alice`` on the embedded one-box site, with its own lease
    file under ``workdir`` (no lease is shared with another test), declared devices, and a
    hub that is only the addresses ``get_env()`` reads. ``server`` is the server process:
    python arguments (:data:`EXITS_AT_ONCE`, :data:`RUNS`) or a program path."""
    import sys

    from sovereign_portal.spawners.local import LocalGPUSpawner

    name = config.pop("user_name", "alice")
    user = SimpleNamespace(
        name=name, escaped_name=name, groups=[], url=f"/user/{name}/", spawners={}
    )
    hub = SimpleNamespace(
        api_url="http://127.0.0.1:9/hub/api",
        base_url="/hub/",
        public_host="",
        url="http://127.0.0.1:9/hub/",
    )
    cmd = [server] if isinstance(server, str) else [sys.executable, *server]
    settings: dict[str, Any] = {
        "user": user,
        "hub": hub,
        "api_token": "t0ken-" + "l" * 26,
        "inventory_source": "declared",
        "lease_file": str(workdir / "leases.json"),
        "home_dir_template": str(workdir / "home" / "{username}"),
        "cmd": cmd,
        "user_options": {"gpus": 1},
    }
    settings.update(config)
    sp = LocalGPUSpawner(**settings)
    user.spawners[""] = sp
    return sp


def leases(workdir: Path) -> dict[str, str]:
    """The lease file of :func:`local_spawner`: device id -> owner."""
    import json

    path = workdir / "leases.json"
    if not path.exists():
        return {}
    return {d: lease["owner"] for d, lease in json.loads(path.read_text())["leases"].items()}
