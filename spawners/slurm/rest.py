"""The REST transport of the scheduler client: a remote site's ``slurmrestd`` with JWT.

:class:`SlurmREST` implements :class:`~.client.SchedulerClient` (submit, cancel, one
batched query, job detail, nodes) over ``slurmrestd``'s ``openapi/v0.0.38``:

- ``POST /slurm/v0.0.38/job/submit``: the script and a ``job`` object built from the
  script's own ``#SBATCH`` lines (:func:`job_properties`; slurmrestd does not read them
  the way ``sbatch`` does), so the CLI and REST transports submit the same job;
- ``DELETE /slurm/v0.0.38/job/{id}``: cancel (a job that is gone is not an error);
- ``GET /slurm/v0.0.38/jobs``: the whole queue in one call, the batched query every
  poller shares; ``job_ids`` and ``name`` filter its answer here;
- ``GET /slurm/v0.0.38/job/{id}``: job detail; ``GET /slurm/v0.0.38/nodes``: nodes.

Its JSON maps to the same :class:`~.client.JobInfo` the CLI transport gives (state,
reason, nodes, start time, user, comment, partition, priority).

Credentials: a JWT read from ``token_file`` at each call (so a site can rotate it), sent
only in the ``X-SLURM-USER-TOKEN`` header; never in a URL, argv or a log line. The token's
own user (its ``sun`` claim) is who the portal is; a call made for a user (submit and
cancel as the job's owner) names that user in ``X-SLURM-USER-NAME``, which slurmctld
accepts only from a token of root or its SlurmUser. Plain HTTP is allowed to a loopback
address only (the token would cross the network in clear); anything else must be https.
slurmrestd answers most failures (bad token, unknown job, another user's job) with HTTP
500 and an ``errors`` list: the message names the call and Slurm's error, not the token.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shlex
import time
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .client import CALLS, JOB_ID, JobInfo, NodeInfo, SchedulerClient, SchedulerError
from .client import SchedulerUnavailable as SchedulerUnavailable
from .sacct import SacctJob, parse_slurmdb_jobs, slurmdb_query

API = "v0.0.38"
#: A JWT as slurmctld issues it: three base64url parts.
_JWT = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_USER = re.compile(r"[a-z_][a-z0-9_.-]{0,31}")
#: Errors of a cancel that mean "nothing left to cancel".
_GONE = ("Invalid job id", "already completing", "Job/step already completing", "already done")


class RESTConfigError(ValueError):
    """A slurmrestd endpoint or token file that cannot be used (names the field)."""


def check_url(url: str) -> str:
    """``url`` without a trailing slash, if it is https, or http to a loopback address."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RESTConfigError(f"rest_url {url!r}: must be http(s)://host:port")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise RESTConfigError(f"rest_url {url!r}: no credentials, query or fragment in it")
    if parts.scheme == "http":
        try:
            loopback = ipaddress.ip_address(parts.hostname).is_loopback
        except ValueError:
            loopback = parts.hostname == "localhost"
        if not loopback:
            raise RESTConfigError(
                f"rest_url {url!r}: plain http is allowed to a loopback address only "
                "(the token would cross the network in clear); use https"
            )
    return url.rstrip("/")


def token_user(token: str) -> str:
    """The user a slurmrestd JWT belongs to (its ``sun`` claim; not verified here, that is
    slurmctld's job): the name the portal uses for its own calls."""
    import jwt

    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        raise RESTConfigError("the token file does not hold a JWT") from None
    sun = claims.get("sun")
    if not isinstance(sun, str) or not _USER.fullmatch(sun):
        raise RESTConfigError("the token has no valid 'sun' (Slurm user name) claim")
    return sun


# -- #SBATCH lines -> slurmrestd's job object --------------------------------------------------
def _minutes(v: str) -> int:
    """``--time`` as sbatch reads it: minutes, ``MM:SS``, ``HH:MM:SS``, ``D-HH[:MM[:SS]]``."""
    days, _, rest = v.rpartition("-") if "-" in v else ("", "", v)
    parts = [int(p) for p in rest.split(":")]
    if days:
        h, m, s = [*parts, 0, 0][:3]
        total = int(days) * 1440 + h * 60 + m + (1 if s else 0)
    elif len(parts) == 1:
        total = parts[0]
    elif len(parts) == 2:
        total = parts[0] + (1 if parts[1] else 0)
    else:
        total = parts[0] * 60 + parts[1] + (1 if parts[2] else 0)
    return total


def _flag(opts: dict[str, Any], key: str, value: Any) -> None:
    opts[key] = value


#: sbatch option -> (job property, conversion). Options the portal writes, and common ones.
_OPTIONS: dict[str, tuple[str, Any]] = {
    "job-name": ("name", str),
    "comment": ("comment", str),
    "partition": ("partition", str),
    "account": ("account", str),
    "qos": ("qos", str),
    "time": ("time_limit", _minutes),
    "chdir": ("current_working_directory", str),
    "output": ("standard_output", str),
    "error": ("standard_error", str),
    "nodes": ("nodes", int),
    "ntasks": ("tasks", int),
    "cpus-per-task": ("cpus_per_task", int),
    "gres": ("gres", str),
    "gpus-per-node": ("gpus_per_node", str),
    "constraint": ("constraints", str),
    "signal": ("signal", str),
    "mem": ("memory_per_node", lambda v: int(v.rstrip("M")) if v.rstrip("M").isdigit() else v),
    "reservation": ("reservation", str),
}
_BOOL_OPTIONS = {"exclusive": ("exclusive", "exclusive"), "no-requeue": ("requeue", False)}
_IGNORED = {"export", "parsable"}  # the REST job gets exactly the environment it is given


def directives(script: str) -> list[str]:
    """The script's ``#SBATCH`` options, as sbatch reads them (until the first command)."""
    out: list[str] = []
    for line in script.splitlines()[1:]:
        s = line.strip()
        if not s or (s.startswith("#") and not s.startswith("#SBATCH")):
            continue
        if not s.startswith("#SBATCH"):
            break
        out += shlex.split(s.removeprefix("#SBATCH"))
    return out


def job_properties(options: Sequence[str]) -> dict[str, Any]:
    """sbatch options (``--key=value``) -> slurmrestd v0.0.38 job properties.

    An option this transport does not know is refused, naming it, so no job ever runs
    without a limit the CLI would have given it."""
    props: dict[str, Any] = {}
    for opt in options:
        if not opt.startswith("--"):
            raise SchedulerError(f"sbatch option {opt!r}: the REST transport takes --key=value")
        key, eq, value = opt[2:].partition("=")
        if key in _IGNORED:
            continue
        if key in _BOOL_OPTIONS and not eq:
            prop, val = _BOOL_OPTIONS[key]
            props[prop] = val
            continue
        if key not in _OPTIONS or not eq:
            raise SchedulerError(f"sbatch option {opt!r} has no slurmrestd equivalent here")
        prop, conv = _OPTIONS[key]
        try:
            props[prop] = conv(value)
        except ValueError:
            raise SchedulerError(f"sbatch option {opt!r}: bad value") from None
    if "exclusive" in props:
        props["exclusive"] = "exclusive"
    sig = props.get("signal")
    if isinstance(sig, str) and sig[:2].upper() == "B:":
        # 22.05's REST parser refuses the batch-shell flag ("Invalid SIGNAL
        # specification"): the warning goes to the job's steps instead.
        props["signal"] = sig[2:]
    return props


def _start(epoch: Any) -> str:
    """slurmrestd's start time (epoch seconds) in squeue's ``%S`` form."""
    if not isinstance(epoch, int) or epoch <= 0:
        return "N/A"
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(epoch))


def job_info(job: Mapping[str, Any]) -> JobInfo:
    """One job of ``GET /jobs`` -> the :class:`JobInfo` squeue's line would give."""
    jid = str(job.get("job_id", ""))
    array = job.get("array_job_id")
    task = job.get("array_task_id")
    if isinstance(array, int) and array and isinstance(task, int) and array != job.get("job_id"):
        jid = f"{array}_{task}"
    reason = str(job.get("state_reason") or "None")
    prio = job.get("priority")
    return JobInfo(
        job_id=jid,
        state=str(job.get("job_state") or "UNKNOWN"),
        reason=reason,
        nodes=str(job.get("nodes") or ""),
        start=_start(job.get("start_time")),
        user=str(job.get("user_name") or ""),
        comment=str(job.get("comment") or ""),
        partition=str(job.get("partition") or ""),
        priority=prio if isinstance(prio, int) else 0,
        tres_per_node=str(job.get("tres_per_node") or ""),
        node_count=count if isinstance(count := job.get("node_count"), int) else 0,
    )


def parse_jobs(body: Mapping[str, Any]) -> dict[str, JobInfo]:
    """``GET /slurm/v0.0.38/jobs`` -> job id -> :class:`JobInfo` (as :func:`.parse_squeue`)."""
    jobs = body.get("jobs")
    if not isinstance(jobs, list):
        raise SchedulerError("slurmrestd's jobs answer has no 'jobs' list")
    out: dict[str, JobInfo] = {}
    for job in jobs:
        if isinstance(job, dict) and job.get("job_id") is not None:
            info = job_info(job)
            out[info.job_id] = info
    return out


def _flat(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(_flat(x) for x in v)
    if isinstance(v, dict):
        return json.dumps(v, sort_keys=True)
    return "" if v is None else str(v)


#: job detail keys as ``scontrol show job`` names them, from the REST fields.
_DETAIL = {
    "JobId": "job_id",
    "JobName": "name",
    "UserId": "user_name",
    "JobState": "job_state",
    "Reason": "state_reason",
    "Partition": "partition",
    "NodeList": "nodes",
    "Comment": "comment",
    "TimeLimit": "time_limit",
    "Account": "account",
    "QOS": "qos",
    "NumNodes": "node_count",
    "TresPerNode": "tres_per_node",
    "WorkDir": "current_working_directory",
    "StdOut": "standard_output",
    "BatchHost": "batch_host",
    "ExitCode": "exit_code",
}


def job_detail_map(job: Mapping[str, Any]) -> dict[str, str]:
    """One job of ``GET /job/{id}`` -> ``scontrol show job``'s keys (and every REST field
    under its own name)."""
    out = {k: _flat(v) for k, v in job.items()}
    for key, field in _DETAIL.items():
        if field in job:
            out[key] = _flat(job[field])
    if "start_time" in job:
        out["StartTime"] = _start(job["start_time"])
    return out


def _errors(body: Any) -> str:
    if not isinstance(body, dict):
        return ""
    errs = body.get("errors") or []
    msgs = []
    for e in errs if isinstance(errs, list) else []:
        if isinstance(e, dict):
            msgs.append(str(e.get("error") or e.get("description") or e.get("error_number")))
    return "; ".join(m for m in msgs if m)


class SlurmREST(SchedulerClient):
    """A site's ``slurmrestd`` (JWT) behind the scheduler-client interface.

    ``url``: https (or http to loopback); ``token_file``: a file (mode 0600, owned by the
    hub's account) holding the site's JWT. Every call is counted in :data:`.client.CALLS`
    under ``rest:<METHOD> <path kind>``.
    """

    def __init__(
        self,
        url: str,
        token_file: str | os.PathLike[str],
        *,
        timeout: float = 30,
        api: str = API,
    ) -> None:
        self.url = check_url(url)
        self.token_file = Path(token_file)
        self.timeout = timeout
        self.api = api
        #: Calls this client made (for tests and the benchmarks), by kind.
        self.calls = 0

    def __repr__(self) -> str:  # never the token
        return f"SlurmREST({self.url!r}, token_file={str(self.token_file)!r})"

    def _token(self) -> str:
        try:
            st = self.token_file.stat()
            token = self.token_file.read_text().strip()
        except OSError as e:
            raise SchedulerError(
                f"token_file {str(self.token_file)!r}: cannot read it ({e.strerror})"
            ) from None
        if st.st_mode & 0o077:
            raise SchedulerError(
                f"token_file {str(self.token_file)!r}: readable by others "
                f"(mode {st.st_mode & 0o777:o}); make it 0600"
            )
        if not _JWT.fullmatch(token):
            raise SchedulerError(f"token_file {str(self.token_file)!r}: does not hold a JWT")
        return token

    async def _request(
        self, method: str, path: str, body: Any = None, *, user: str | None = None
    ) -> tuple[int, Any]:
        from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

        token = self._token()
        name = user if user is not None else token_user(token)
        if not _USER.fullmatch(name):
            raise SchedulerError(f"not a Unix user name: {name!r}")
        kind = path.split("/")[3].split("?")[0] if path.count("/") >= 3 else path
        if path.startswith("/slurmdb/"):
            kind = f"slurmdb {kind}"
        CALLS[f"rest:{method} {kind}"] += 1
        self.calls += 1
        req = HTTPRequest(
            self.url + path,
            method=method,
            headers={
                "X-SLURM-USER-NAME": name,
                "X-SLURM-USER-TOKEN": token,
                "Content-Type": "application/json",
                "Accept": "application/json",
            },
            body=json.dumps(body) if body is not None else None,
            allow_nonstandard_methods=True,
            request_timeout=self.timeout,
            connect_timeout=min(self.timeout, 10),
            follow_redirects=False,
        )
        client = AsyncHTTPClient()
        try:
            resp = await client.fetch(req, raise_error=False)
        except HTTPClientError as e:  # pragma: no cover - raise_error=False
            raise SchedulerError(f"slurmrestd {method} {path}: {e.code}") from None
        except (OSError, TimeoutError) as e:
            raise SchedulerUnavailable(
                f"slurmrestd at {self.url} did not answer {method} {path}: {e!r}"
            ) from e
        if resp.code == 599:  # tornado: connection refused, timeout, reset
            raise SchedulerUnavailable(
                f"slurmrestd at {self.url} did not answer {method} {path}: {resp.error!r}"
            )
        try:
            data = json.loads(resp.body or b"null")
        except ValueError:
            data = None
        return resp.code, data

    async def _ok(
        self, method: str, path: str, body: Any = None, *, user: str | None = None
    ) -> Any:
        code, data = await self._request(method, path, body, user=user)
        errs = _errors(data)
        if code >= 400 or errs:
            raise SchedulerError(
                f"slurmrestd {method} {path} answered {code}: {errs or 'no detail'}"
            )
        return data

    def _path(self, rest: str) -> str:
        return f"/slurm/{self.api}/{rest}"

    async def submit(
        self,
        script: str,
        options: Sequence[str] = (),
        *,
        user: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str = "/",
    ) -> str:
        props = job_properties([*directives(script), *options])
        props.setdefault("current_working_directory", cwd)
        # The job's environment is exactly what it is given (sbatch --export=NONE): PATH and
        # locale, as the CLI transport's clean environment; never the hub's own.
        props["environment"] = (
            dict(env)
            if env is not None
            else {
                "PATH": "/usr/local/bin:/usr/bin:/bin",
                "LANG": "C.UTF-8",
            }
        )
        data = await self._ok(
            "POST", self._path("job/submit"), {"script": script, "job": props}, user=user
        )
        job_id = str(data.get("job_id", "")) if isinstance(data, dict) else ""
        if not JOB_ID.fullmatch(job_id):
            raise SchedulerError(f"slurmrestd answered no job id ({str(data)[:200]!r})")
        return job_id

    async def cancel(self, job_ids: Sequence[str], *, user: str | None = None) -> None:
        ids = [str(j) for j in job_ids]
        bad = [j for j in ids if not JOB_ID.fullmatch(j)]
        if bad:
            raise SchedulerError(f"not Slurm job ids: {bad[:5]}")
        for jid in ids:
            code, data = await self._request("DELETE", self._path(f"job/{jid}"), user=user)
            errs = _errors(data)
            if code < 400 and not errs:
                continue
            if any(g in errs for g in _GONE):
                continue
            # 22.05 answers 500 for an unknown job too: ask whether it is still there.
            left = await self.query([jid])
            if jid not in left or left[jid].ended:
                continue
            raise SchedulerError(f"slurmrestd DELETE job/{jid} answered {code}: {errs}")

    async def query(
        self, job_ids: Collection[str] | None = None, *, name: str | None = None
    ) -> dict[str, JobInfo]:
        ids: set[str] | None = None
        if job_ids is not None:
            ids = {str(j) for j in job_ids}
            if not ids:
                return {}
            bad = [j for j in ids if not JOB_ID.fullmatch(j)]
            if bad:
                raise SchedulerError(f"not Slurm job ids: {sorted(bad)[:5]}")
        data = await self._ok("GET", self._path("jobs"))
        jobs = parse_jobs(data if isinstance(data, dict) else {})
        if ids is not None:
            jobs = {j: i for j, i in jobs.items() if j in ids}
        if name is not None:
            names = {
                str(j.get("job_id")): j.get("name")
                for j in (data.get("jobs") or [])
                if isinstance(j, dict)
            }
            jobs = {
                j: i for j, i in jobs.items() if names.get(j.split("_")[0], names.get(j)) == name
            }
        return jobs

    async def job_detail(self, job_id: str) -> dict[str, str]:
        if not JOB_ID.fullmatch(str(job_id)):
            raise SchedulerError(f"not a Slurm job id: {job_id!r}")
        data = await self._ok("GET", self._path(f"job/{job_id}"))
        jobs = data.get("jobs") if isinstance(data, dict) else None
        if not jobs or not isinstance(jobs[0], dict):
            raise SchedulerError(f"slurmrestd knows no job {job_id}")
        return job_detail_map(jobs[0])

    async def accounting(
        self, job_ids: Collection[str], *, since: float | None = None
    ) -> dict[str, SacctJob]:
        """The site's slurmdbd records of ``job_ids`` (as :func:`.sacct.sacct_jobs`), in one
        ``GET /slurmdb/<api>/jobs/`` from ``since`` (epoch seconds)."""
        ids = {str(j) for j in job_ids}
        bad = [j for j in ids if not JOB_ID.fullmatch(j)]
        if bad:
            raise SchedulerError(f"not Slurm job ids: {sorted(bad)[:5]}")
        if not ids:
            return {}
        data = await self._ok("GET", f"/slurmdb/{self.api}/jobs/?{slurmdb_query(since)}")
        return parse_slurmdb_jobs(data if isinstance(data, dict) else {}, ids)

    async def nodes(self, partition: str | None = None) -> dict[str, NodeInfo]:
        data = await self._ok("GET", self._path("nodes"))
        out: dict[str, NodeInfo] = {}
        for n in (data.get("nodes") or []) if isinstance(data, dict) else []:
            if not isinstance(n, dict) or not n.get("name"):
                continue
            if partition is not None and partition not in (n.get("partitions") or []):
                continue
            gres = tuple(
                re.sub(r"\(.*\)$", "", g) for g in str(n.get("gres") or "").split(",") if g
            )
            name = str(n["name"])
            out[name] = NodeInfo(name, str(n.get("address") or name), gres)
        return out
