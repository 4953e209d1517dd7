"""Runs inside a server's Slurm job: take the token, pick a port, report it, exec the server.

1. Read the hub API token from the one-time 0600 file the hub wrote for this job, then
   delete it. The token lives only in the server process's own environment from then on:
   never in the job script, the sbatch argv, Slurm's job environment, or the spool.
2. Bind a free port on the node, release it, and report it by setting the job's own
   comment to ``sovereign-portal:<tag>:port=<n>`` (``scontrol update``; the job's owner may
   change its own job's comment). The hub reads it in its single batched ``squeue`` and takes
   the host from Slurm's node address, so the job can tell the hub one port and nothing else.
   The report runs in a detached child while the server starts (it needs ~2 s to import);
   if Slurm refuses it, the child stops the server, so the job ends visibly.
3. ``exec`` ``jupyterhub-singleuser`` with ``--ip`` and ``--port``. In an image
   (``--forward-env=NAMES``, the command is ``apptainer exec ... IMAGE jupyterhub-singleuser``)
   each named variable that is set, the device variables Slurm set for this job included,
   goes in as ``APPTAINERENV_<NAME>`` (``--cleanenv`` keeps the rest of the host out), and
   so do the token and the service URL: in the environment, never on argv.

This file is run by path with ``python -I`` and imports only the standard library: the
package's ``__init__`` (pydantic, the site schema) would add a quarter of a second to every
spawn. :data:`COMMENT_PREFIX` must equal ``jobscript.COMMENT_PREFIX`` (a unit test checks).

Usage (rendered by :mod:`.jobscript`)::

    python -I .../slurm/launch.py --token-file F --tag T --ip IP [--forward-env A,B] -- CMD...
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

COMMENT_PREFIX = "sovereign-portal:"


def take_token(path: str) -> str:
    """Read and delete the token file; refuse one that others could have read."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        if st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise SystemExit(f"launch: {path} must be owned by you and mode 0600")
        token = os.read(fd, 4096).decode().strip()
    finally:
        os.close(fd)
    os.unlink(path)
    if not token:
        raise SystemExit(f"launch: {path} is empty")
    return token


def free_port(ip: str) -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        return int(s.getsockname()[1])


def report_port(job_id: str, tag: str, port: int) -> None:
    comment = f"Comment={COMMENT_PREFIX}{tag}:port={port}"
    for attempt in range(30):
        r = subprocess.run(
            ["scontrol", "update", f"JobId={job_id}", comment], capture_output=True, text=True
        )
        if r.returncode == 0:
            return
        time.sleep(min(0.2 * (attempt + 1), 2.0))
    raise SystemExit(f"launch: cannot report the port to Slurm: {r.stderr.strip()}")


def report_in_background(job_id: str, tag: str, port: int) -> None:
    """Report the port from a detached grandchild; stop the server if that fails."""
    server = os.getpid()  # exec keeps the pid: this is the server's
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child:
        os.waitpid(child, 0)  # the child exits at once; the grandchild is reparented
        return
    code = 0
    try:
        if os.fork() == 0:
            try:
                report_port(job_id, tag, port)
            except SystemExit as e:
                print(e, file=sys.stderr, flush=True)
                os.kill(server, signal.SIGTERM)
                code = 1
    except BaseException:
        code = 1
    os._exit(code)


def forward_into_image(names: str, extra: dict[str, str]) -> None:
    """Set ``APPTAINERENV_<NAME>`` for each set variable in ``names``, every ``JUPYTERHUB_*``
    variable (JupyterHub's, per server), and ``extra``."""
    wanted = set(filter(None, names.split(",")))
    for name in wanted:
        if not re.fullmatch(r"[A-Z][A-Z0-9_]{0,63}", name):
            raise SystemExit(f"launch: {name!r} is not a variable name")
    for name, value in list(os.environ.items()):
        if name in wanted or name.startswith("JUPYTERHUB_"):
            os.environ[f"APPTAINERENV_{name}"] = value
    for name, value in extra.items():
        os.environ[f"APPTAINERENV_{name}"] = value


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="sovereign-portal-launch")
    ap.add_argument("--token-file", required=True)
    ap.add_argument("--tag", required=True)
    ap.add_argument("--ip", default="0.0.0.0")  # noqa: S104
    ap.add_argument("--forward-env", default=None, help="comma-separated names (image)")
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    a = ap.parse_args(argv)
    cmd = [c for c in a.cmd if c != "--"] if a.cmd[:1] == ["--"] else a.cmd
    if not cmd:
        raise SystemExit("launch: no server command given")
    job_id = os.environ.get("SLURM_JOB_ID", "")
    if not job_id.isdigit():
        raise SystemExit("launch: not inside a Slurm job (SLURM_JOB_ID is not set)")
    program = shutil.which(cmd[0])
    if program is None:
        raise SystemExit(f"launch: {cmd[0]!r} not found (PATH={os.environ.get('PATH', '')})")
    token = take_token(a.token_file)
    port = free_port(a.ip)
    report_in_background(job_id, a.tag, port)  # before the token enters the environment
    prefix = os.environ.get("JUPYTERHUB_SERVICE_PREFIX", "/")
    url = f"http://{a.ip}:{port}{prefix}"
    os.environ["JUPYTERHUB_SERVICE_URL"] = url
    if a.forward_env is None:
        os.environ["JUPYTERHUB_API_TOKEN"] = token
    else:
        forward_into_image(a.forward_env, {"JUPYTERHUB_API_TOKEN": token})
    os.execv(program, [*cmd, f"--ip={a.ip}", f"--port={port}"])  # noqa: S606 - argv, no shell


if __name__ == "__main__":
    main()
