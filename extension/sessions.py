"""Compute sessions inside the single-user server: ask the hub for a Grant, launch, watch,
release.

A :class:`SessionManager` owns every session of this server. One poll loop serves them
all: walltime expiry, dead local processes, sessions whose kernel has gone away, and the
state of every Slurm job. That state comes from the hub: the server registers each
session's job ids with the portal service (``PUT api/grants/<id>/jobs``) and long-polls
it (``GET api/jobs?version=&wait=``); the service runs one scheduler query per interval
for every session of every user (queue position, pending reason, running, gone). This
server never calls ``squeue``. An unknown answer (the hub or Slurm not answering, a job
not polled yet) keeps a session's state: it is not a dead job. Stopping the server stops
every session.

Readiness does not wait for that poll. While a session is queued or starting, a watch
looks at local state only (the in-process Dask scheduler's workers, which wake it as they
join; the torch ranks' marker files) every :data:`WATCH_INTERVAL` seconds, and marks the
session ready as soon as every worker or rank is up. Every change of a session's state,
message or progress bumps its ``version`` and wakes clients that wait for one
(:meth:`SessionManager.wait_change`, ``GET sessions/<id>?wait=S&version=V``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tornado import httpclient

from .launchers import LAUNCHERS, LaunchConfig, Launcher, write_meta, write_secret

ACTIVE = ("queued", "starting", "ready")
STARTING = ("queued", "starting")
#: Seconds between looks at local state (no scheduler call) while a session starts.
WATCH_INTERVAL = 0.05
#: The longest a client may wait for a change in one request.
MAX_WAIT_S = 30.0
#: How long one long-poll of the hub's session-job state waits (under the service's 25 s).
HUB_WAIT_S = 20
#: Slurm states in which a session's job counts as its own (as squeue's default listing).
LIVE_JOB_STATES = ("PENDING", "RUNNING", "CONFIGURING")
log = logging.getLogger("sovereign_portal.sessions")


class SessionError(Exception):
    """A failure safe to show the user, with an HTTP status and a reason label."""

    def __init__(self, message: str, status: int = 400, reason: str = "invalid") -> None:
        super().__init__(message)
        self.status, self.reason = status, reason


class HubService:
    """Client of the hub's portal service, with this server's own token (never logged)."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url if url.endswith("/") else url + "/"
        self._token = token

    async def _call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        if not self.url.strip("/"):
            raise SessionError(
                "the hub's portal service is not configured for this server "
                "(SOVEREIGN_PORTAL_SERVICE_URL is empty): ask the operators",
                503,
                "no_service",
            )
        req = httpclient.HTTPRequest(
            self.url + path,
            method=method,
            headers={"Authorization": f"token {self._token}", "Content-Type": "application/json"},
            body=None if body is None else json.dumps(body),
            allow_nonstandard_methods=True,
            request_timeout=30,
        )
        try:
            resp = await httpclient.AsyncHTTPClient().fetch(req, raise_error=False)
        except OSError as e:
            raise SessionError(
                f"the hub's portal service cannot be reached: {e}", 502, "hub"
            ) from e
        data = json.loads(resp.body) if resp.body else None
        return resp.code, data

    async def catalog(self) -> dict[str, Any]:
        code, data = await self._call("GET", "api/catalog")
        if code != 200:
            raise SessionError(_msg(data, code), code, "hub")
        return dict(data)

    async def grant(self, request: dict[str, Any]) -> dict[str, Any]:
        code, data = await self._call("POST", "api/grants", request)
        if code != 201:
            reason = data.get("reason", "hub") if isinstance(data, dict) else "hub"
            raise SessionError(_msg(data, code), code if code < 500 else 502, reason)
        return dict(data)

    async def release(self, grant_id: str) -> None:
        await self._call("DELETE", f"api/grants/{grant_id}")

    async def register_jobs(self, grant_id: str, job_ids: list[str]) -> dict[str, Any]:
        """Tell the service a session's Slurm jobs; returns the caller's job view."""
        code, data = await self._call("PUT", f"api/grants/{grant_id}/jobs?jobs={','.join(job_ids)}")
        if code != 200:
            raise SessionError(_msg(data, code), code if code < 500 else 502, "hub")
        return dict(data)

    async def jobs(self, version: int, wait_s: int) -> dict[str, Any]:
        """The caller's session jobs, once their version is not ``version`` (long-poll)."""
        q = f"api/jobs?wait={wait_s}" + (f"&version={version}" if version >= 0 else "")
        code, data = await self._call("GET", q)
        if code != 200:
            raise SessionError(_msg(data, code), code if code < 500 else 502, "hub")
        return dict(data)


def _msg(data: Any, code: int) -> str:
    if isinstance(data, dict) and data.get("error"):
        return str(data["error"])
    return f"the hub's portal service answered HTTP {code}"


@dataclass
class Session:
    id: str
    kind: str
    grant: dict[str, Any]
    dir: Path
    launcher: Launcher
    kernel_id: str | None = None
    state: str = "queued"
    message: str = "submitted"
    created: float = field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None
    queue: dict[str, Any] = field(default_factory=dict)
    task: asyncio.Task[None] | None = None
    version: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def snapshot(self) -> tuple[Any, ...]:
        """What a client sees change: state, message, progress and queue."""
        up = self.launcher.up() if self.state in ACTIVE else 0
        return (self.state, self.message, up, tuple(sorted(self.queue.items())))

    def notify(self) -> None:
        """Bump the version and wake every waiter."""
        self.version += 1
        ev, self.changed = self.changed, asyncio.Event()
        ev.set()

    @property
    def ends_at(self) -> float:
        return (self.started or self.created) + int(self.grant["walltime_minutes"]) * 60

    def to_json(self) -> dict[str, Any]:
        g = self.grant
        up = self.launcher.up() if self.state in ACTIVE else 0
        return {
            "id": self.id,
            "kind": self.kind,
            "version": self.version,
            "state": self.state,
            "message": self.message,
            "kernel_id": self.kernel_id,
            "workers_up": up,
            "workers_total": self.launcher.total,
            "queue": self.queue,
            "jobs": self.launcher.job_ids(),
            "created": self.created,
            "started": self.started,
            "ended": self.ended,
            "ends_at": self.ends_at,
            "session_dir": str(self.dir),
            "grant": {
                k: g.get(k)
                for k in (
                    "id",
                    "partition",
                    "backend",
                    "country",
                    "size",
                    "count",
                    "jobs",
                    "nodes_per_job",
                    "workers",
                    "walltime_minutes",
                    "eur_per_hour",
                    "cost",
                    "scheduler_args",
                    "devices",
                )
            },
            **(self.launcher.info() if self.state in ACTIVE else {}),
        }


class SessionManager:
    """All compute sessions of one server."""

    def __init__(
        self,
        hub: HubService,
        root: Path,
        cfg: LaunchConfig,
        *,
        start_timeout: float = 600,
        kernel_alive: Any = None,
        logger: logging.Logger | None = None,
    ) -> None:
        self.log = logger or log
        self.hub, self.root, self.cfg = hub, root, cfg
        self.start_timeout = start_timeout
        self.kernel_alive = kernel_alive  # callable(kernel_id) -> bool, or None
        self.sessions: dict[str, Session] = {}
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None
        # Slurm job state from the hub: its last view, the session job ids it knows
        self._hub_view: dict[str, Any] | None = None
        self._hub_version = -1
        self._registered: dict[str, tuple[str, ...]] = {}
        self._follower: asyncio.Task[None] | None = None
        #: (sample interval, device script) for the samplers in session jobs; None: none
        self.job_sampler: tuple[float, str] | None = None

    # -- create / stop ----------------------------------------------------------------------
    async def create(self, request: Any, kernel_id: str | None = None) -> Session:
        if not isinstance(request, dict):
            raise SessionError('\'request\' must be a JSON object such as {"kind": "dask"}')
        if request.get("kind") not in ("dask", "torch"):
            raise SessionError("a compute session's kind is 'dask' or 'torch'", 400, "kind")
        if kernel_id is not None and not (isinstance(kernel_id, str) and 0 < len(kernel_id) <= 64):
            raise SessionError("kernel_id must be a kernel's id")
        grant = await self.hub.grant(request)
        sid = secrets.token_hex(6)
        sdir = self.root / sid
        sdir.mkdir(mode=0o700, parents=True)
        write_secret(sdir)
        cls = LAUNCHERS[(grant["kind"], grant["backend"])]
        s = Session(sid, grant["kind"], grant, sdir, cls(grant, sdir, self.cfg), kernel_id)
        s.launcher.on_change = self._kick
        self.sessions[sid] = s
        write_meta(sdir, {"id": sid, "grant": grant, "kernel_id": kernel_id})
        if self.job_sampler is not None:  # what the jobs' samplers read (:mod:`.job_sampler`)
            from .job_sampler import write_settings

            interval, script = self.job_sampler
            write_settings(sdir, interval, script.replace("{session}", sid))
        s.task = asyncio.create_task(self._start(s))
        self._ensure_watch()
        self.log.info(
            "Session %s: %s %s on %s", sid, grant["kind"], grant["size"]["id"], grant["partition"]
        )
        return s

    async def _start(self, s: Session) -> None:
        try:
            s.message = "submitting"
            await s.launcher.start()
            s.state = "queued" if s.launcher.backend == "slurm" else "starting"
            s.message = "waiting for the scheduler" if s.state == "queued" else "starting"
            s.notify()
            self._kick()
            if s.launcher.backend == "slurm":
                await self._register(s)
                self._ensure_follow()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.log.exception("Session %s failed to start", s.id)
            await self._end(s, "failed", f"could not start: {e}")

    def get(self, sid: str) -> Session:
        if sid not in self.sessions:
            raise SessionError(f"no session {sid!r} on this server", 404, "not_found")
        return self.sessions[sid]

    async def stop(self, sid: str, state: str = "stopped", message: str = "stopped") -> Session:
        s = self.get(sid)
        await self._end(s, state, message)
        return s

    async def _end(self, s: Session, state: str, message: str) -> None:
        if s.state in ("stopping", "stopped", "failed", "expired"):
            return
        prev, s.state, s.message = s.state, "stopping", "releasing jobs"
        if s.task is not None and not s.task.done() and s.task is not asyncio.current_task():
            s.task.cancel()
        try:
            await s.launcher.stop()
        except Exception:
            self.log.exception("Session %s: stop failed (was %s)", s.id, prev)
        try:
            await self.hub.release(str(s.grant["id"]))
        except Exception as e:
            self.log.warning("Session %s: could not release grant: %s", s.id, e)
        self._registered.pop(s.id, None)
        s.state, s.message, s.ended = state, message, time.time()
        s.notify()
        shutil.rmtree(s.dir / "tls", ignore_errors=True)
        self.log.info("Session %s %s: %s", s.id, state, message)

    async def stop_all(self, message: str = "the server stopped") -> None:
        if self._follower is not None:
            self._follower.cancel()
        await asyncio.gather(
            *(self._end(s, "stopped", message) for s in list(self.sessions.values())),
            return_exceptions=True,
        )

    async def scale(self, sid: str, workers: Any) -> Session:
        s = self.get(sid)
        if s.kind != "dask":
            raise SessionError("only Dask sessions scale; a torch session has fixed ranks")
        if s.state not in ACTIVE:
            raise SessionError(f"session {sid} is {s.state}", 409, "state")
        total = s.launcher.total
        if not isinstance(workers, int) or isinstance(workers, bool) or not 0 <= workers <= total:
            raise SessionError(f"workers must be a number from 0 to {total} (the grant)")
        await s.launcher.scale(workers)  # type: ignore[attr-defined]
        return s

    # -- waiting for a change ----------------------------------------------------------------
    async def wait_change(self, sid: str, version: int, wait_s: float) -> Session:
        """Return the session once its version differs from ``version`` (at once if it
        already does), or after ``wait_s`` seconds (at most :data:`MAX_WAIT_S`)."""
        s = self.get(sid)
        end = time.monotonic() + min(max(wait_s, 0.0), MAX_WAIT_S)
        while s.version == version:
            left = end - time.monotonic()
            if left <= 0:
                break
            try:
                await asyncio.wait_for(s.changed.wait(), left)
            except TimeoutError:
                break
        return s

    # -- the watch while sessions start (local state only, no scheduler call) ---------------
    def _kick(self) -> None:
        self._wake.set()

    def _ensure_watch(self) -> None:
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while any(s.state in STARTING for s in self.sessions.values()):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), WATCH_INTERVAL)
            self._wake.clear()
            for s in [s for s in self.sessions.values() if s.state in STARTING]:
                try:
                    self._look(s)
                except Exception:
                    self.log.exception("Session %s: watch failed", s.id)

    def _look(self, s: Session) -> None:
        """Follow workers or ranks coming up; all up means every job runs: ready."""
        if s.task is not None and not s.task.done():
            return  # still submitting
        before = s.snapshot()
        up, total = s.launcher.up(), s.launcher.total
        if total and up >= total and s.launcher.local_alive() is not False:
            if s.started is None:
                s.started = time.time()
            s.queue = {}
            s.state, s.message = "ready", f"{total} of {total} {_unit(s)} up"
        elif s.state == "starting":
            s.message = f"{up} of {total} {_unit(s)} up"
        if s.snapshot() != before:
            s.notify()

    # -- the one poll loop --------------------------------------------------------------------
    async def poll(self) -> None:
        async with self._lock:
            active = [s for s in self.sessions.values() if s.state in ACTIVE]
            if not active:
                return
            for s in active:
                await self._register(s)
            if any(s.launcher.backend == "slurm" for s in active):
                self._ensure_follow()
            t = time.time()
            for s in active:
                before = s.snapshot()
                await self._update(s, self._jobs_for(s), t)
                if s.state in ACTIVE and s.snapshot() != before:
                    s.notify()
            if any(s.state in STARTING for s in active):
                self._ensure_watch()

    async def _update(self, s: Session, jobs: dict[str, dict[str, Any]] | None, t: float) -> None:
        if s.kernel_id and self.kernel_alive is not None and not self.kernel_alive(s.kernel_id):
            await self._end(s, "stopped", "its kernel shut down")
            return
        wall = int(s.grant["walltime_minutes"])
        if s.started and t >= s.ends_at:
            await self._end(s, "expired", f"the walltime of {wall} min ended")
            return
        if s.task is not None and not s.task.done():
            return  # still submitting
        ids = s.launcher.job_ids()
        if s.launcher.backend == "slurm" and ids and jobs is None:
            return  # unknown (the hub, or Slurm, has not answered about them): keep state
        if s.launcher.backend == "slurm" and ids and jobs is not None:
            mine = [jobs[i] for i in ids if i in jobs]
            if not mine:
                end = f"its Slurm jobs ended (logs in {s.dir / 'logs'})"
                if s.started and t >= s.ends_at - 90:
                    await self._end(s, "expired", f"the walltime of {wall} min ended")
                else:
                    await self._end(s, "failed", end)
                return
            pending = [j for j in mine if j["state"] == "PENDING"]
            if pending:
                p = min(pending, key=lambda j: j["position"])
                s.queue = {"position": p["position"], "reason": p["reason"]}
                s.state = "queued"
                s.message = (
                    f"{len(pending)} of {len(mine)} job(s) waiting "
                    f"({p['reason']}, position {p['position']})"
                )
                return
            s.queue = {}
        if s.launcher.local_alive() is False:
            await self._end(s, "failed", f"its processes exited (logs in {s.dir / 'logs'})")
            return
        if s.started is None:
            s.started = t
        up, total = s.launcher.up(), s.launcher.total
        if up >= total:
            s.state, s.message = "ready", f"{total} of {total} {_unit(s)} up"
        else:
            s.state, s.message = "starting", f"{up} of {total} {_unit(s)} up"
            if t - (s.started or t) > self.start_timeout:
                await self._end(s, "failed", f"only {up} of {total} {_unit(s)} came up in time")

    # -- Slurm job state, from the hub --------------------------------------------------------
    async def _register(self, s: Session) -> None:
        """Tell the hub this session's job ids when they change (no scheduler call)."""
        if s.launcher.backend != "slurm" or s.state not in ACTIVE:
            return
        if s.task is not None and not s.task.done() and s.task is not asyncio.current_task():
            return  # still submitting
        ids = tuple(s.launcher.job_ids())
        if self._registered.get(s.id) == ids:
            return
        try:
            view = await self.hub.register_jobs(str(s.grant["id"]), list(ids))
        except SessionError as e:
            self.log.warning("Session %s: the hub did not take its job ids: %s", s.id, e)
            return
        self._registered[s.id] = ids
        self._take(view)

    def _take(self, view: dict[str, Any]) -> bool:
        version = view.get("version")
        if not isinstance(version, int) or version == self._hub_version:
            return False
        self._hub_version, self._hub_view = version, view
        return True

    def _ensure_follow(self) -> None:
        if self._follower is None or self._follower.done():
            self._follower = asyncio.create_task(self._follow())

    def _slurm_active(self) -> bool:
        return any(
            s.launcher.backend == "slurm" and s.state in ACTIVE for s in self.sessions.values()
        )

    async def _follow(self) -> None:
        """Long-poll the hub for this user's session jobs; poll the sessions on a change."""
        failing = False
        while self._slurm_active():
            try:
                view = await self.hub.jobs(self._hub_version, HUB_WAIT_S)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the hub is away: sessions keep their state
                if not failing:
                    self.log.warning("The hub's session-job state is unavailable: %s", e)
                failing = True
                self._hub_view = None
                await asyncio.sleep(2)
                continue
            failing = False
            if self._take(view):
                await self.poll()

    def _jobs_for(self, s: Session) -> dict[str, dict[str, Any]] | None:
        """This session's live jobs as the hub last saw them; None while unknown."""
        if s.launcher.backend != "slurm":
            return {}
        view = self._hub_view
        if view is None or not view.get("ok"):
            return None
        grant = (view.get("grants") or {}).get(str(s.grant["id"]))
        ids = s.launcher.job_ids()
        if not isinstance(grant, dict) or any(grant.get(i) is None for i in ids):
            return None  # not registered, or not polled yet
        return {i: grant[i] for i in ids if grant[i].get("state") in LIVE_JOB_STATES}


def _unit(s: Session) -> str:
    return "workers" if s.kind == "dask" else "ranks"
