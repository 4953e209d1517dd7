"""What Slurm's own accounting (slurmdbd, ``sacct``) says about finished jobs.

The ledger's reconciliation (:mod:`sovereign_portal.hub.reconcile`) compares each closed
record with this: the elapsed time and the GPUs Slurm allocated (``AllocTRES``). One
``sacct`` call covers every job id of a reconciliation run (batched, like the poll), and it
goes through the scheduler client's single command helper (:func:`.client.call`).

Only allocations are read (``-X``); ``ElapsedRaw`` is in seconds. In ``AllocTRES``,
``gres/gpu=N`` counts GPUs *and* MIG slices (each slice is one GRES ``gpu`` of a MIG type),
so the ledger compares devices, not GPU-equivalents.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .client import JOB_ID, call, slurm_env

SACCT_FIELDS = ("JobID", "State", "ElapsedRaw", "AllocTRES", "Account", "Start", "End")
#: The most job ids one sacct call names (its command line stays well under ARG_MAX).
MAX_IDS_PER_CALL = 2000


@dataclass(frozen=True)
class SacctJob:
    """One job allocation as slurmdbd recorded it."""

    job_id: str
    state: str
    elapsed_s: int
    gpus: int
    account: str
    start: str
    end: str


def sacct_argv(job_ids: Iterable[str]) -> list[str]:
    ids = list(job_ids)
    bad = [j for j in ids if not JOB_ID.fullmatch(j)]
    if bad:
        raise ValueError(f"job_ids: not Slurm job ids: {bad[:3]!r}")
    if not ids:
        raise ValueError("job_ids: at least one job id is needed")
    return [
        "sacct",
        "-X",
        "-n",
        "-P",
        "--duplicates",
        "-j",
        ",".join(ids),
        "-o",
        ",".join(SACCT_FIELDS),
    ]


def _gpus(tres: str) -> int:
    for item in tres.split(","):
        key, _, value = item.partition("=")
        if key == "gres/gpu" and value.isascii() and value.isdecimal():
            return int(value)
    return 0


def parse_sacct(text: str) -> dict[str, SacctJob]:
    """sacct's parsable output, by job id. With ``--duplicates`` (a requeued job) the last
    allocation of an id wins, as in Slurm's own reports."""
    out: dict[str, SacctJob] = {}
    for line in text.splitlines():
        parts = line.split("|")
        if len(parts) != len(SACCT_FIELDS) or not JOB_ID.fullmatch(parts[0]):
            continue
        job, state, elapsed, tres, account, start, end = parts
        out[job] = SacctJob(
            job_id=job,
            state=state.split()[0] if state else "",
            elapsed_s=int(elapsed) if elapsed.isascii() and elapsed.isdecimal() else 0,
            gpus=_gpus(tres),
            account=account,
            start=start,
            end=end,
        )
    return out


async def sacct_jobs(
    job_ids: Iterable[str],
    env: Mapping[str, str] | None = None,
    timeout: float = 60,  # noqa: ASYNC109 - one knob for the subprocess
) -> dict[str, SacctJob]:
    """Slurm's accounting of ``job_ids``: one sacct call per :data:`MAX_IDS_PER_CALL` ids."""
    ids = sorted(set(job_ids), key=lambda j: (len(j), j))
    out: dict[str, SacctJob] = {}
    for i in range(0, len(ids), MAX_IDS_PER_CALL):
        text = await call(
            sacct_argv(ids[i : i + MAX_IDS_PER_CALL]),
            env=dict(env) if env is not None else slurm_env(),
            timeout=timeout,
        )
        out.update(parse_sacct(text))
    return out
