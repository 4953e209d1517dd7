"""One torch.distributed rank of a portal session: a long-lived worker loop.

Started once per GPU (by ``srun`` on Slurm, as a local process on the local box) with
the session directory as its only argument. It:

1. pins itself to its own device (``CUDA_VISIBLE_DEVICES`` entry ``LOCAL_RANK``),
2. marks itself up (``ranks/<rank>`` in the session directory),
3. imports torch (a second or more) while the notebook attaches, then waits for the
   notebook's controller (``controller.json``) and connects to it over a
   ``multiprocessing.connection`` channel authenticated with the session secret
   (``secret``, mode 0600: never in argv, environment or job script),
4. joins the process group (c10d TCP store on rank 0's node; nccl on GPUs, gloo on CPU),
5. runs cloudpickled functions or scripts sent by the controller, streaming its output
   back, until told to stop or the controller goes away.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import runpy
import socket
import sys
import time
import traceback
from multiprocessing.connection import Client, Connection
from pathlib import Path
from typing import Any


def _env_int(*names: str, default: int = 0) -> int:
    for n in names:
        if os.environ.get(n, "").isdigit():
            return int(os.environ[n])
    return default


class _Stream(io.TextIOBase):
    """A file that forwards writes to the controller as ("out", job, rank, stream, text)."""

    def __init__(self, conn: Connection, job: int, rank: int, name: str) -> None:
        self.conn, self.job, self.rank, self.name = conn, job, rank, name

    def write(self, s: str) -> int:
        if s:
            self.conn.send(("out", self.job, self.rank, self.name, s))
        return len(s)

    def flush(self) -> None:
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def _wait_controller(sdir: Path, timeout: float) -> dict[str, Any]:
    end = time.monotonic() + timeout
    path = sdir / "controller.json"
    while time.monotonic() < end:
        if (sdir / "stop").exists():
            raise SystemExit(0)
        if path.exists():
            try:
                return dict(json.loads(path.read_text()))
            except ValueError:
                pass  # being written
        time.sleep(0.05)
    raise SystemExit("no controller attached in time")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    sdir = Path(args[0])
    rank = _env_int("SLURM_PROCID", "RANK")
    world = _env_int("SLURM_NTASKS", "WORLD_SIZE", default=1)
    local = _env_int("SLURM_LOCALID", "LOCAL_RANK")
    devs = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
    if len(devs) > 1 and local < len(devs):
        os.environ["CUDA_VISIBLE_DEVICES"] = devs[local]
    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    info = {
        "rank": rank,
        "local_rank": local,
        "world_size": world,
        "node": node,
        "host": socket.gethostname(),
        "device": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
        "pid": os.getpid(),
        "job": os.environ.get("SLURM_JOB_ID", ""),
    }
    from .job_sampler import start as start_sampler

    start_sampler(sdir, f"rank-{rank}")  # the rank's device, for the culler and the ledger
    (sdir / "ranks").mkdir(exist_ok=True)
    (sdir / "ranks" / str(rank)).write_text(json.dumps(info))
    secret = (sdir / "secret").read_bytes()
    # Up first (the session turns ready and the notebook attaches), then the slow import,
    # which overlaps that attach instead of following the controller's "init".
    import torch
    import torch.distributed as dist

    wait = float(os.environ.get("SOVEREIGN_PORTAL_ATTACH_TIMEOUT", "86400"))
    ctl = _wait_controller(sdir, wait)
    conn = Client((ctl["host"], int(ctl["port"])), authkey=secret)
    if rank == 0:
        info["master_port"] = _free_port()
    conn.send(("hello", info))
    msg = conn.recv()
    if msg[0] != "init":
        return 2
    _, master_addr, master_port, backend, timeout_s = msg
    import datetime

    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(0)
    dist.init_process_group(
        backend,
        init_method=f"tcp://{master_addr}:{master_port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    conn.send(("ready", rank, backend))
    return _loop(conn, rank, dist)


def _loop(conn: Connection, rank: int, dist: Any) -> int:
    import cloudpickle

    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            break  # the controller is gone: leave, which ends the job
        if msg[0] == "stop":
            break
        _, job, what, payload = msg
        out, err = sys.stdout, sys.stderr
        sys.stdout = _Stream(conn, job, rank, "stdout")
        sys.stderr = _Stream(conn, job, rank, "stderr")
        try:
            if what == "fn":
                fn, a, kw = cloudpickle.loads(payload)
                value = fn(*a, **kw)
            else:
                path, argv = payload
                old = sys.argv
                sys.argv = [path, *argv]
                try:
                    runpy.run_path(path, run_name="__main__")
                except SystemExit as e:
                    if e.code not in (None, 0):
                        raise
                finally:
                    sys.argv = old
                value = None
            reply = ("result", job, rank, cloudpickle.dumps(value))
        except BaseException:
            reply = ("error", job, rank, traceback.format_exc())
        finally:
            sys.stdout, sys.stderr = out, err
        conn.send(reply)
    with contextlib.suppress(Exception):  # best effort on the way out
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
