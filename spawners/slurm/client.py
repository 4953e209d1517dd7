"""One small scheduler client: submit, cancel, one batched query, job detail (and nodes).

Every call the portal makes to Slurm goes through a :class:`SchedulerClient`: the
spawner, the orphan sweep, the portal service's poll (session jobs and queue state) and
the compute sessions' launchers. A transport implements the five methods:

- :class:`SlurmCLI`, the command-line tools on this host (``sbatch``, ``scancel``,
  ``squeue``, ``scontrol``, ``sinfo``), each run as an argv list through :func:`call`;
- a REST transport (``slurmrestd`` with JWT, for a remote site) goes behind the same
  methods later.

:func:`call` runs one command in a process group of its own, raises :class:`SlurmError`
with the exit code, stdout and stderr, and on a timeout (or cancellation) kills the whole
group before it returns: no client process outlives its call. Every call is counted in
:data:`CALLS` (by command) for the benchmarks.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import os
import re
import shutil
import signal
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

#: Scheduler commands run by this process, by command name (``squeue``, ``sbatch``, ...).
CALLS: Counter[str] = Counter()

SLURM_COMMANDS = frozenset({"sbatch", "squeue", "scancel", "scontrol", "sinfo"})

#: States in which a job still holds, or will hold, resources.
ACTIVE_STATES = frozenset(
    {
        "PENDING",
        "CONFIGURING",
        "RUNNING",
        "COMPLETING",
        "SUSPENDED",
        "RESIZING",
        "SIGNALING",
        "STAGE_OUT",
        "REQUEUED",
        "REQUEUE_FED",
        "REQUEUE_HOLD",
        "RESV_DEL_HOLD",
        "STOPPED",
    }
)

#: squeue's fields, in :class:`JobInfo` order. The comment (free text) comes last. The
#: priority field also carries the job's TRES per node and node count (``%Q;%b;%D``), so a
#: line without them (an older format) still parses.
SQUEUE_FORMAT = "%i|%T|%r|%N|%S|%u|%P|%Q;%b;%D|%k"
_FIELDS = SQUEUE_FORMAT.count("|")
#: A Slurm job id as the portal accepts it: digits, or an array task ``123_4``.
JOB_ID = re.compile(r"[0-9]{1,12}(_[0-9]{1,9})?")
#: scancel's answers that mean "nothing left to cancel".
_GONE_ON_CANCEL = ("Invalid job id", "already completing", "Job/step already completing")


class SchedulerError(RuntimeError):
    """The scheduler refused or failed a call (any transport)."""


class SchedulerUnavailable(SchedulerError):
    """The scheduler did not answer (timeout, connection refused): states are unknown."""


class CallTimeout(TimeoutError):
    """A command that did not finish within its timeout (killed with its process group).

    It keeps what the command wrote to stderr before it was killed: ``sbatch`` says there
    why it waits (``cannot stat file .../slurm.conf: Permission denied, retrying``, or
    ``Socket timed out``), which is what an operator needs in the log.
    """

    def __init__(self, argv: Sequence[str], timeout: float, stderr: str) -> None:
        self.argv = list(argv)
        self.timeout = timeout
        self.stderr = stderr
        said = " ".join(stderr.split())[-300:]
        super().__init__(
            f"{' '.join(self.argv)} did not answer within {timeout:g} s"
            + (f"; it said: {said}" if said else "")
        )


class SlurmError(SchedulerError):
    """A Slurm command that failed: exit code, stdout and stderr for the log."""

    def __init__(self, argv: Sequence[str], returncode: int, stdout: str, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        super().__init__(
            f"{' '.join(self.argv)} exited with {returncode}: {stderr.strip() or stdout.strip()}"
        )


def slurm_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """A clean environment for Slurm clients: PATH, SLURM_CONF and locale, nothing else.

    The hub's own environment (which holds secrets such as the proxy token) never reaches
    ``sbatch``, so it can never reach a job.
    """
    src = os.environ if base is None else base
    env = {"PATH": src.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
    if src.get("SLURM_CONF"):
        env["SLURM_CONF"] = src["SLURM_CONF"]
    return env


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL the call's process group (the child and everything it started)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()


async def call(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    input: str | None = None,
    timeout: float = 30,  # noqa: ASYNC109 - one knob for the subprocess
    cwd: str = "/",
) -> str:
    """Run ``argv`` (never a shell) and return stdout, or raise :class:`SlurmError`.

    The command runs in a new session (its own process group). On a timeout, or if the
    caller is cancelled, the whole group is killed and reaped before the exception
    (:class:`CallTimeout`, a ``TimeoutError`` with the stderr written so far, or
    ``CancelledError``) goes on: ``runuser``'s ``sbatch`` child is not left behind.
    """
    names = [os.path.basename(a) for a in argv]
    CALLS[next((n for n in names if n in SLURM_COMMANDS), names[0])] += 1
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(env) if env is not None else slurm_env(),
        cwd=cwd,
        start_new_session=True,
    )
    out, err = bytearray(), bytearray()

    async def drain(stream: asyncio.StreamReader | None, buf: bytearray) -> None:
        while stream is not None and (chunk := await stream.read(65536)):
            buf.extend(chunk)

    async def feed() -> None:
        if input is not None and proc.stdin is not None:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                proc.stdin.write(input.encode())
                await proc.stdin.drain()
            proc.stdin.close()

    async def run() -> None:
        await asyncio.gather(feed(), drain(proc.stdout, out), drain(proc.stderr, err))
        await proc.wait()

    try:
        await asyncio.wait_for(run(), timeout)
    except BaseException as e:
        _kill_group(proc)
        await asyncio.shield(proc.wait())
        if isinstance(e, TimeoutError):
            raise CallTimeout(argv, timeout, err.decode(errors="replace")) from None
        raise
    stdout, stderr = out.decode(errors="replace"), err.decode(errors="replace")
    if proc.returncode != 0:
        raise SlurmError(argv, proc.returncode or 0, stdout, stderr)
    return stdout


@dataclass(frozen=True)
class JobInfo:
    """What the scheduler says about one job right now (one line of ``squeue``)."""

    job_id: str
    state: str
    reason: str
    nodes: str
    start: str
    user: str
    comment: str
    partition: str = ""
    priority: int = 0
    #: What the job asks per node (``gres:gpu:h100:2``) and on how many nodes; what a
    #: site's free capacity is counted from (:func:`devices`).
    tres_per_node: str = ""
    node_count: int = 0

    @property
    def devices(self) -> int:
        """GPUs (whole or MIG slices) the job holds or asks for, over all its nodes."""
        per_node = 0
        for item in self.tres_per_node.split(","):
            kind = item.replace("/", ":").split(":")
            if len(kind) >= 2 and kind[0] == "gres" and kind[1] == "gpu":
                last = re.split(r"[:=]", item)[-1]
                per_node += int(last) if last.isdecimal() else 1
        return per_node * max(1, self.node_count)

    @property
    def active(self) -> bool:
        """The job holds, or will hold, resources."""
        return self.state in ACTIVE_STATES

    @property
    def ended(self) -> bool:
        """The job's processes are gone or being stopped: final, or COMPLETING.

        squeue shows COMPLETING (not the final state) while Slurm stops the processes of a
        cancelled, timed-out or finished job, which can take a server's whole shutdown.
        """
        return not self.active or self.state == "COMPLETING"

    @property
    def start_estimate(self) -> str | None:
        """Slurm's expected start time of a pending job, when the backfill has one."""
        if self.state != "PENDING" or self.start in ("N/A", "", "Unknown"):
            return None
        return self.start


#: What a query knows of a job the scheduler no longer lists.
GONE = JobInfo("", "GONE", "the job no longer exists", "", "", "", "")


def parse_squeue(text: str) -> dict[str, JobInfo]:
    """Lines of :data:`SQUEUE_FORMAT` -> job id -> :class:`JobInfo`."""
    out: dict[str, JobInfo] = {}
    for line in text.splitlines():
        parts = line.split("|", _FIELDS)
        if len(parts) != _FIELDS + 1 or not parts[0].strip():
            continue
        f = [p.strip() for p in parts[:_FIELDS]]
        prio_s, _, extra = f[7].partition(";")
        tres, _, count = extra.partition(";")
        prio = int(prio_s) if prio_s.isascii() and prio_s.isdecimal() else 0
        tres = "" if tres in ("N/A", "(null)") else tres
        n = int(count) if count.isascii() and count.isdecimal() else 0
        info = JobInfo(f[0], f[1], f[2], f[3], f[4], f[5], parts[_FIELDS], f[6], prio, tres, n)
        out[info.job_id] = info
    return out


def queue_positions(jobs: Mapping[str, JobInfo]) -> dict[str, int]:
    """Each pending job's place in its partition's queue: 1 = next to start.

    Slurm starts pending jobs of a partition in priority order, then by submission (job
    number); the answer must hold every pending job of the partitions asked about.
    """
    by_part: dict[str, list[tuple[int, int, str]]] = {}
    for jid, j in jobs.items():
        if j.state == "PENDING":
            base = jid.split("_")[0]
            num = int(base) if base.isascii() and base.isdecimal() else 0
            by_part.setdefault(j.partition, []).append((-j.priority, num, jid))
    return {
        jid: pos for lst in by_part.values() for pos, (_, _, jid) in enumerate(sorted(lst), start=1)
    }


@dataclass(frozen=True)
class NodeInfo:
    """One compute node: its name, its address and its generic resources."""

    name: str
    addr: str
    gres: tuple[str, ...]


class SchedulerClient(abc.ABC):
    """The portal's only way to the scheduler. Transports implement every method."""

    @abc.abstractmethod
    async def submit(
        self,
        script: str,
        options: Sequence[str] = (),
        *,
        user: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str = "/",
    ) -> str:
        """Submit a batch script (its ``#SBATCH`` lines hold the options; ``options`` are
        added) as ``user`` (None: as this process) and return the job id."""

    @abc.abstractmethod
    async def cancel(self, job_ids: Sequence[str], *, user: str | None = None) -> None:
        """Cancel jobs; a job that already ended is not an error."""

    @abc.abstractmethod
    async def query(
        self, job_ids: Collection[str] | None = None, *, name: str | None = None
    ) -> dict[str, JobInfo]:
        """One batched query: the named jobs (``job_ids``), the jobs called ``name``, or
        with neither the whole queue, recent final states included. A job missing from a
        successful answer no longer exists. Raises :class:`SchedulerError` (unknown)."""

    @abc.abstractmethod
    async def job_detail(self, job_id: str) -> dict[str, str]:
        """Everything the scheduler says about one job (``scontrol show job``)."""

    @abc.abstractmethod
    async def nodes(self, partition: str | None = None) -> dict[str, NodeInfo]:
        """The compute nodes (of ``partition``), by name."""


class SlurmCLI(SchedulerClient):
    """The Slurm command-line tools on this host, as argv lists through :func:`call`.

    ``submit_prefix`` runs ``sbatch`` and ``scancel`` as another Unix account
    (``["runuser", "-u", "{unix_user}", "--"]``) when a call names a ``user``.
    """

    def __init__(
        self,
        *,
        env: Mapping[str, str] | None = None,
        submit_prefix: Sequence[str] = (),
        timeout: float = 30,
        squeue: str = "squeue",
        sbatch: str = "sbatch",
        scancel: str = "scancel",
        scontrol: str = "scontrol",
        sinfo: str = "sinfo",
    ) -> None:
        self.env = dict(env) if env is not None else None
        self.submit_prefix = list(submit_prefix)
        self.timeout = timeout
        self.squeue, self.sbatch, self.scancel = squeue, sbatch, scancel
        self.scontrol, self.sinfo = scontrol, sinfo

    def _env(self) -> dict[str, str]:
        return dict(self.env) if self.env is not None else slurm_env()

    def _as(self, user: str | None) -> list[str]:
        if user is None:
            return []
        return [a.format(unix_user=user) for a in self.submit_prefix]

    async def submit(
        self,
        script: str,
        options: Sequence[str] = (),
        *,
        user: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str = "/",
    ) -> str:
        exe = self.sbatch
        if env is not None:  # the command's own PATH may not name sbatch
            exe = shutil.which(exe) or exe
        argv = [*self._as(user), exe, "--parsable", *options]
        try:
            out = await call(
                argv,
                env=self._env() if env is None else env,
                input=script,
                timeout=self.timeout,
                cwd=cwd,
            )
        except TimeoutError as e:  # the job may exist or not: unknown, not a refusal
            raise SchedulerUnavailable(str(e) or f"sbatch did not answer: {e!r}") from e
        job_id = out.strip().split(";")[0]
        if not JOB_ID.fullmatch(job_id):
            raise SchedulerError(f"sbatch answered {out.strip()[:200]!r}, not a job id")
        return job_id

    async def cancel(self, job_ids: Sequence[str], *, user: str | None = None) -> None:
        ids = [str(j) for j in job_ids]
        bad = [j for j in ids if not JOB_ID.fullmatch(j)]
        if bad:
            raise SchedulerError(f"not Slurm job ids: {bad[:5]}")
        if not ids:
            return
        try:
            await call([*self._as(user), self.scancel, *ids], env=self._env(), timeout=self.timeout)
        except SlurmError as e:
            lines = [ln for ln in e.stderr.splitlines() if ln.strip()]
            if lines and all(any(g in ln for g in _GONE_ON_CANCEL) for ln in lines):
                return
            raise

    async def query(
        self, job_ids: Collection[str] | None = None, *, name: str | None = None
    ) -> dict[str, JobInfo]:
        argv = [self.squeue, "-h", "-t", "all"]
        if job_ids is not None:
            ids = sorted({str(j) for j in job_ids})
            if not ids:
                return {}
            bad = [j for j in ids if not JOB_ID.fullmatch(j)]
            if bad:
                raise SchedulerError(f"not Slurm job ids: {bad[:5]}")
            argv.append(f"--jobs={','.join(ids)}")
        if name is not None:
            argv.append(f"--name={name}")
        argv += ["-o", SQUEUE_FORMAT]
        try:
            out = await call(argv, env=self._env(), timeout=self.timeout)
        except SlurmError as e:
            if job_ids is not None and "Invalid job id specified" in e.stderr:
                return {}  # authoritative: none of these jobs exists any more
            raise
        except (TimeoutError, OSError) as e:
            raise SchedulerUnavailable(f"squeue did not answer: {e!r}") from e
        return parse_squeue(out)

    async def job_detail(self, job_id: str) -> dict[str, str]:
        if not JOB_ID.fullmatch(str(job_id)):
            raise SchedulerError(f"not a Slurm job id: {job_id!r}")
        out = await call(
            [self.scontrol, "show", "job", "-o", str(job_id)], env=self._env(), timeout=self.timeout
        )
        return parse_scontrol(out)

    async def nodes(self, partition: str | None = None) -> dict[str, NodeInfo]:
        argv = [self.sinfo, "-h", "-N", *(["-p", partition] if partition else []), "-o", "%N|%o|%G"]
        out = await call(argv, env=self._env(), timeout=self.timeout)
        nodes: dict[str, NodeInfo] = {}
        for line in out.splitlines():
            name, _, rest = line.strip().partition("|")
            addr, _, gres = rest.partition("|")
            if name:
                got = tuple(g for g in gres.split(",") if g and g != "(null)")
                prev = nodes.get(name)
                nodes[name] = NodeInfo(name, addr or name, (prev.gres if prev else ()) + got)
        return nodes


def parse_scontrol(text: str) -> dict[str, str]:
    """``scontrol show job -o`` (one line of ``Key=Value`` pairs) -> dict.

    Values may hold spaces (``Command=``, ``Reason=``): a token without ``=`` belongs to
    the value before it.
    """
    out: dict[str, str] = {}
    key = ""
    for tok in text.strip().split(" "):
        k, eq, v = tok.partition("=")
        if eq and k and k.replace("/", "").replace(":", "").isalnum():
            key = k
            out[key] = v
        elif key:
            out[key] += " " + tok
    return out
