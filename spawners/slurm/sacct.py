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
from typing import Any

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


# -- several sites: each site's accounting through its own transport ----------------------
def _epoch_iso(t: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")


def _d(v: object) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def parse_slurmdb_jobs(body: Mapping[str, object], job_ids: Iterable[str]) -> dict[str, SacctJob]:
    """slurmrestd's ``GET /slurmdb/v0.0.38/jobs/`` answer, for ``job_ids`` only. The same
    :class:`SacctJob` as sacct gives: ``time.elapsed`` in seconds, ``gres/gpu`` from
    ``tres.allocated`` (a MIG slice is one ``gpu``); an id that ran twice (requeued) keeps
    its last allocation, as with ``sacct --duplicates``."""
    want = set(job_ids)
    jobs = body.get("jobs") if isinstance(body, Mapping) else None
    out: dict[str, SacctJob] = {}
    for j in jobs if isinstance(jobs, list) else []:
        if not isinstance(j, dict):
            continue
        jid = str(j.get("job_id", ""))
        task = _d(j.get("array")).get("task_id")
        if isinstance(task, int) and task >= 0 and f"{jid}_{task}" in want:
            jid = f"{jid}_{task}"
        if jid not in want:
            continue
        t, st = _d(j.get("time")), _d(j.get("state"))
        tres = _d(j.get("tres")).get("allocated")
        gpus = sum(
            int(x.get("count") or 0)
            for x in (tres if isinstance(tres, list) else [])
            if isinstance(x, dict) and x.get("type") == "gres" and x.get("name") == "gpu"
        )
        elapsed, start = t.get("elapsed"), t.get("start")
        start_n = start if isinstance(start, int) else 0
        prev = out.get(jid)
        if prev is not None and prev.start.isdecimal() and start_n < int(prev.start):
            continue
        current = str(st.get("current") or "").split()
        out[jid] = SacctJob(
            job_id=jid,
            state=current[0] if current else "",
            elapsed_s=elapsed if isinstance(elapsed, int) and elapsed >= 0 else 0,
            gpus=gpus,
            account=str(j.get("account") or ""),
            start=str(start_n or ""),
            end=str(t.get("end") or ""),
        )
    return out


def slurmdb_query(since: float | None) -> str:
    """The query of one ``/slurmdb/`` jobs call: allocations only (no steps), from the
    earliest record's opening (one call per site for every job there)."""
    from urllib.parse import urlencode

    q: dict[str, str] = {"skip_steps": "true"}
    if since is not None:
        q["start_time"] = _epoch_iso(max(0.0, since - 60))
    return urlencode(q)


async def site_accounting(
    client: object,
    job_ids: Iterable[str],
    *,
    since: float | None = None,
    timeout: float = 60,  # noqa: ASYNC109 - one knob for the subprocess
) -> dict[str, SacctJob]:
    """One site's accounting of ``job_ids`` through that site's own transport: ``sacct``
    with the site's ``SLURM_CONF`` for the CLI, slurmrestd's ``/slurmdb/`` for REST (one
    call for every job). Raises :class:`.client.SchedulerError` when the site's
    accounting does not answer."""
    from .client import SchedulerError, SlurmCLI

    ids = sorted(set(job_ids), key=lambda j: (len(j), j))
    if not ids:
        return {}
    if isinstance(client, SlurmCLI):
        return await sacct_jobs(ids, env=client.env, timeout=timeout)
    read = getattr(client, "accounting", None)
    if read is None:
        raise SchedulerError(f"{type(client).__name__} cannot read Slurm accounting")
    result: dict[str, SacctJob] = await read(ids, since=since)
    return result
