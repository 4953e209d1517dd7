"""Render a server's Slurm job: the batch script and the sbatch argv. Pure functions.

Every value that reaches the script comes from a validated :class:`~..request.Resolved`
request, the site file (already pattern-checked) or the hub's own configuration, and is
checked again here against a narrow pattern before it is written. The script never holds a
secret: the API token travels in a 0600 file that the job reads once (see ``launch``).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..images import JOB_ENV
from ..request import Resolved

#: The job name of every portal server job; the comment carries the signed tag.
#: Seconds before the walltime at which the server is sent SIGTERM (``--signal``), so it
#: shuts down cleanly; its job then ends COMPLETED or FAILED, not TIMEOUT. The ledger
#: counts such an end as the walltime.
WALLTIME_WARNING_S = 60
#: Slurm may send that signal up to this many seconds earlier than asked (its event
#: resolution, see ``sbatch --signal``).
SIGNAL_RESOLUTION_S = 60
JOB_NAME = "sovereign-portal"
COMMENT_PREFIX = "sovereign-portal:"

_USER = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}$")
_TAG = re.compile(r"^[0-9a-f]{12}\.[0-9a-f]{16}$")
_ENV_KEY = re.compile(r"^[A-Z][A-Z0-9_]{0,63}$")
_SAFE_VALUE = re.compile(r"^[A-Za-z0-9_./:@%+=,{}\-]*$")
_PRINTABLE = re.compile(r"^[^\x00-\x1f\x7f]*$")
_PATH = re.compile(r"^/[A-Za-z0-9_./+@%-]*$")
#: The in-job launcher, run by path (it imports only the standard library).
LAUNCHER = str(Path(__file__).resolve().with_name("launch.py"))
#: Environment variables a job script may never set, whatever the configuration says.
FORBIDDEN_ENV = frozenset({"JUPYTERHUB_API_TOKEN", "JPY_API_TOKEN", "CONFIGPROXY_AUTH_TOKEN"})
#: Job variables that describe the host, not the server: never forwarded into an image
#: (Apptainer sets HOME and the image's own PATH itself).
HOST_ONLY_ENV = frozenset(
    {"PATH", "PYTHONPATH", "VIRTUAL_ENV", "CONDA_ROOT", "CONDA_DEFAULT_ENV", "SLURM_CONF"}
    | {"SHELL", "HOME"}
)


class JobScriptError(ValueError):
    """A value that must not go into a job script."""


def valid_unix_user(name: str) -> bool:
    """A plain Unix user name (what may follow ``runuser -u``)."""
    return bool(_USER.match(name))


def make_tag(key: bytes, nonce: str) -> str:
    """A job tag: ``<nonce>.<hmac>``. Only a hub holding ``key`` can make a valid one."""
    mac = hmac.new(key, nonce.encode(), hashlib.sha256).hexdigest()[:16]
    return f"{nonce}.{mac}"


def tag_is_ours(key: bytes, tag: str) -> bool:
    if not _TAG.match(tag):
        return False
    nonce = tag.split(".", 1)[0]
    return hmac.compare_digest(make_tag(key, nonce), tag)


def comment_tag(comment: str) -> str | None:
    """The tag in a job comment ``sovereign-portal:<tag>[:port=N]``, or None."""
    if not comment.startswith(COMMENT_PREFIX):
        return None
    return comment[len(COMMENT_PREFIX) :].split(":", 1)[0]


def comment_port(comment: str, tag: str) -> int | None:
    """The port a job reported in its comment, if the comment is exactly ours."""
    m = re.fullmatch(re.escape(COMMENT_PREFIX + tag) + r":port=([0-9]{4,5})", comment)
    if not m:
        return None
    port = int(m.group(1))
    return port if 1024 <= port <= 65535 else None


@dataclass(frozen=True)
class JobSpec:
    """Everything one server job needs; validated on construction."""

    resolved: Resolved
    unix_user: str
    tag: str
    home: str
    python: str
    token_file: str
    output: str
    server_args: Sequence[str] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    ip: str = "0.0.0.0"  # noqa: S104 - the server binds where the proxy can reach it
    account: str | None = None
    qos: str | None = None
    extra_sbatch: Sequence[str] = ()
    launcher: str = LAUNCHER
    #: ``apptainer exec [--nv] [--cleanenv] [--bind B]... IMAGE``: run the server in an
    #: image (from the operator's allow-list, :mod:`..images`); empty runs it on the host.
    image_argv: Sequence[str] = ()
    #: The server command inside an image (found on the image's PATH).
    image_command: Sequence[str] = ("jupyterhub-singleuser",)

    def __post_init__(self) -> None:
        if not _USER.match(self.unix_user):
            raise JobScriptError(f"not a valid Unix user name: {self.unix_user!r}")
        if not _TAG.match(self.tag):
            raise JobScriptError(f"not a valid job tag: {self.tag!r}")
        for name in ("home", "python", "token_file", "output", "launcher"):
            value = getattr(self, name)
            if not _PATH.match(value) or "/../" in value + "/":
                raise JobScriptError(f"{name} must be a plain absolute path, got {value!r}")
        if not re.fullmatch(r"[0-9a-fA-F.:]{2,45}", self.ip):
            raise JobScriptError(f"ip must be an IP address, got {self.ip!r}")
        for key, value in self.env.items():
            if not _ENV_KEY.match(key) or key in FORBIDDEN_ENV:
                raise JobScriptError(f"environment variable {key!r} may not be set in a job")
            # Values are shell-quoted when written; control characters never get that far.
            if not _PRINTABLE.match(value) or len(value) > 4096:
                raise JobScriptError(f"environment value of {key} has unsafe characters")
        for arg in (*self.server_args, *self.extra_sbatch, *self.image_argv, *self.image_command):
            if not _SAFE_VALUE.match(arg.removeprefix("--")) or len(arg) > 256:
                raise JobScriptError(f"unsafe argument {arg!r}")
        for word in (self.account, self.qos):
            if word is not None and not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", word):
                raise JobScriptError(f"unsafe Slurm word {word!r}")


def sbatch_directives(spec: JobSpec) -> list[str]:
    """The sbatch options of a server job, in the order they are written."""
    r = spec.resolved
    part = r.partition
    out = [
        f"--job-name={JOB_NAME}",
        f"--comment={COMMENT_PREFIX}{spec.tag}",
        f"--partition={part.scheduler_partition}",
    ]
    account = spec.account or part.account
    qos = spec.qos or part.qos
    if account:
        out.append(f"--account={account}")
    if qos:
        out.append(f"--qos={qos}")
    out += r.size.slurm_args(r.node_type)
    out += [
        "--ntasks=1",
        f"--time={r.walltime_minutes}",
        f"--chdir={spec.home}",
        f"--output={spec.output}",
        "--export=NONE",
        "--no-requeue",
        f"--signal=B:TERM@{WALLTIME_WARNING_S}",
        *spec.extra_sbatch,
    ]
    return out


def sbatch_argv(spec: JobSpec) -> list[str]:
    """The argv that submits the script (read from stdin): no option carries a secret."""
    return ["sbatch", "--parsable"]


def forwarded_env(spec: JobSpec) -> list[str]:
    """Names the launcher passes into the image as ``APPTAINERENV_<NAME>``.

    The job's own variables except the host's (:data:`HOST_ONLY_ENV`), then the device
    variables Slurm sets at run time (:data:`..images.JOB_ENV`). JupyterHub's per-server
    ``JUPYTERHUB_*`` variables are not named: the launcher forwards that prefix, and with it
    the API token it read from its 0600 file (in the environment, never on argv).
    """
    own = sorted(k for k in spec.env if k not in HOST_ONLY_ENV and not k.startswith("JUPYTERHUB_"))
    return own + [n for n in JOB_ENV if n not in own]


def server_command(spec: JobSpec) -> list[str]:
    """The server's argv (the launcher appends ``--ip`` and ``--port``)."""
    if spec.image_argv:
        return [*spec.image_argv, *spec.image_command, *spec.server_args]
    return [spec.python, "-m", "jupyterhub.singleuser", *spec.server_args]


def render_script(spec: JobSpec) -> str:
    """The batch script, with every sbatch option as an ``#SBATCH`` line.

    The one renderer of server jobs: ``SlurmGPUSpawner.start`` submits its output and
    ``sovereign-portal job-script`` prints it.
    """
    lines = ["#!/bin/bash", "# A sovereign-portal notebook server. Contains no secrets."]
    lines += [f"#SBATCH {d}" for d in sbatch_directives(spec)]
    lines += ["set -eu", "umask 077"]
    for key, value in sorted(spec.env.items()):
        lines.append(f"export {key}={shlex.quote(value)}")
    launch = [
        spec.python,
        "-I",  # the launcher needs only the standard library: start fast, run by path
        spec.launcher,
        f"--token-file={spec.token_file}",
        f"--tag={spec.tag}",
        f"--ip={spec.ip}",
    ]
    if spec.image_argv:
        launch.append("--forward-env=" + ",".join(forwarded_env(spec)))
    launch += ["--", *server_command(spec)]
    lines.append("exec " + " ".join(shlex.quote(a) for a in launch))
    return "\n".join(lines) + "\n"
