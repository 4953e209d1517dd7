"""The GPU-aware culler: a JupyterHub service that gives idle GPUs back.

jupyterhub-idle-culler sees only the hub's ``last_activity`` (HTTP traffic): a training
loop in a background thread looks idle to it, and an open browser tab with a forgotten
notebook looks busy. This culler decides from what the servers' samplers report to the
portal service (:mod:`.activity`): a server is **idle** when its GPUs are idle (highest
utilisation and memory activity since the previous report below the thresholds) **and**
no kernel is busy, and it has been so for ``idle_minutes``.

The policy (:func:`decide`, pure, tested as a table):

- at ``idle_minutes - warn_minutes`` of idleness the user gets a warning (a notice that
  JupyterLab shows through ``/sovereign-portal/api/notices``, and the hub's
  ``api/notices``), which says what will be stopped, when, and how to keep it;
- when the warning's deadline has passed and the server is still idle, the server is
  stopped (``DELETE /users/<name>/servers/<server>``); the portal service is told first
  (``api/activity/reclaim``), so the ledger record closes as ``reclaimed`` and the GPU-
  hours saved (the rest of the granted walltime) are counted;
- a compute session (Dask workers, torch ranks: target ``grant:<id>``, reported by the
  server that started it) follows the same rule on its own GPUs; ``api/activity/reclaim``
  marks it, the server stops it at its next report (the portal service does, cancelling
  its jobs as its user, if the server has not within a minute), and the user's notebook
  server stays;
- any activity (a cell, a busy GPU) clears the warning and starts the count over;
- a server with no recent report is *unknown* and never stopped: no evidence, no stop;
- never a stop without a warning first, never during quiet hours (the warning stays and
  the stop waits), never for an exempt role, course or project.

It runs as a hub service (:func:`culler_service`, :func:`configure_culler`) with a
narrow role: ``list:users``, ``read:users`` (names, groups, roles, servers),
``admin:servers`` (to stop them), and the portal service's activity routes, which accept
only the services named in ``PortalService.culler_services``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import re
import secrets
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote
from zoneinfo import ZoneInfo

from tornado import httpclient
from traitlets import Bool, Float, Int, List, Unicode, default, validate
from traitlets.config import Application

from .admission import role_of
from .claims import COURSE_GROUP, PROJECT_GROUP

NAME = "sovereign-portal-culler"
_HHMM = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)$")


def iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def parse_quiet_hours(spans: Iterable[str]) -> list[tuple[int, int]]:
    """``["22:00-07:00", "12:00-13:30"]`` → minute spans; a bad span names itself."""
    out = []
    for s in spans:
        m = _HHMM.match(s.strip())
        if not m:
            raise ValueError(f"quiet_hours: {s!r} is not HH:MM-HH:MM (e.g. 22:00-07:00)")
        a = int(m.group(1)) * 60 + int(m.group(2))
        b = int(m.group(3)) * 60 + int(m.group(4))
        out.append((a, b))
    return out


def in_quiet_hours(now: float, spans: list[tuple[int, int]], tz: str) -> bool:
    local = dt.datetime.fromtimestamp(now, ZoneInfo(tz))
    minute = local.hour * 60 + local.minute
    return any(a <= minute < b if a <= b else minute >= a or minute < b for a, b in spans)


@dataclass(frozen=True)
class Policy:
    idle_minutes: float = 60.0
    warn_minutes: float = 10.0
    exempt_roles: frozenset[str] = frozenset()
    exempt_courses: frozenset[str] = frozenset()
    exempt_projects: frozenset[str] = frozenset()
    quiet: tuple[tuple[int, int], ...] = ()
    timezone: str = "UTC"
    cull_cpu_only: bool = False

    def exempt(self, role: str, groups: Iterable[str]) -> str | None:
        """Why this user is exempt, or None."""
        if role in self.exempt_roles:
            return f"role {role}"
        gs = set(groups)
        for c in sorted(self.exempt_courses):
            if COURSE_GROUP.format(c) in gs:
                return f"course {c}"
        for p in sorted(self.exempt_projects):
            if PROJECT_GROUP.format(p) in gs:
                return f"project {p}"
        return None


@dataclass(frozen=True)
class Decision:
    action: str  # "none", "warn", "clear" or "stop"
    why: str
    notice: dict[str, Any] | None = None


def _notice_deadline(notice: dict[str, Any] | None) -> float | None:
    if not notice or not notice.get("deadline"):
        return None
    try:
        return dt.datetime.fromisoformat(str(notice["deadline"]).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def warning_text(
    server: str, idle_min: float, deadline: float, tz: str, session: str | None = None
) -> str:
    at = dt.datetime.fromtimestamp(deadline, ZoneInfo(tz)).strftime("%H:%M")
    if session is not None:
        on = f" of your server {server!r}" if server else ""
        return (
            f"The GPUs of your compute session {session}{on} have been idle for "
            f"{idle_min:.0f} minutes: the session (its Dask workers or torch ranks) will be "
            f"stopped and its GPUs given back at {at} ({tz}). To keep it, run a cell or use "
            "its GPUs before then; your server and your files stay."
        )
    what = f"your server {server!r}" if server else "your server"
    return (
        f"Your GPU has been idle for {idle_min:.0f} minutes: {what} will be stopped and its "
        f"GPU given back at {at} ({tz}). To keep it, run a cell or use the GPU before then; "
        "your files stay in your home directory."
    )


def decide(
    target: dict[str, Any],
    *,
    role: str,
    groups: Iterable[str],
    policy: Policy,
    now: float,
) -> Decision:
    """What to do with one target (an entry of ``api/activity/all``)."""
    has_notice = bool(target.get("notice"))
    none = Decision("clear" if has_notice else "none", "")
    if not target.get("gpus") and not policy.cull_cpu_only:
        return Decision(none.action, "holds no GPU")
    why = policy.exempt(role, groups)
    if why:
        return Decision(none.action, f"exempt ({why})")
    since = target.get("idle_since")
    if since is None:
        return Decision(none.action, "active (or no recent report)")
    idle_s = now - float(since)
    limit_s = policy.idle_minutes * 60
    warn_s = max(0.0, limit_s - policy.warn_minutes * 60)
    if idle_s < warn_s:
        return Decision(none.action, f"idle {idle_s / 60:.1f} min")
    deadline = _notice_deadline(target.get("notice"))
    if deadline is not None and now >= deadline and idle_s >= limit_s:
        if policy.quiet and in_quiet_hours(now, list(policy.quiet), policy.timezone):
            return Decision("none", "quiet hours: the stop waits")
        return Decision("stop", f"idle {idle_s / 60:.1f} min, warned")
    if deadline is not None:
        return Decision("none", "warned; waiting for the deadline")
    # warn now; the stop comes at the limit, and never sooner than warn_minutes from now
    end = max(float(since) + limit_s, now + policy.warn_minutes * 60)
    notice = {
        "id": f"idle:{target['source']}",
        "kind": "idle",
        "level": "warning",
        "message": warning_text(
            target.get("server", ""),
            idle_s / 60,
            end,
            policy.timezone,
            session=_session_of(str(target["source"])),
        ),
        "deadline": iso(end),
    }
    return Decision("warn", f"idle {idle_s / 60:.1f} min", notice)


def _session_of(source: str) -> str | None:
    """A compute session's grant id (``grant:<id>``), None for a server."""
    return source.split(":", 1)[1] if source.startswith("grant:") else None


@dataclass
class Tally:
    """What one culler run did (the replay benchmark reads these)."""

    warned: int = 0
    stopped: list[str] = field(default_factory=list)
    cleared: int = 0


class GPUCuller(Application):
    """Stops servers whose GPUs and kernels have been idle (see the module docstring)."""

    name = "sovereign-portal-culler"

    hub_api_url = Unicode(
        config=True,
        help="The hub's REST API URL. Default: $JUPYTERHUB_API_URL (set for a hub service).",
    )
    api_token = Unicode(
        config=True,
        help="""The culler's own API token (list:users, read:users, admin:servers). Default:
        $JUPYTERHUB_API_TOKEN. Never logged.""",
    )
    portal_url = Unicode(
        config=True,
        help="""URL of the portal service (ending in /services/<name>/) whose activity
        routes the culler reads. Default: $SOVEREIGN_PORTAL_SERVICE_URL.""",
    )
    interval = Float(60.0, config=True, help="Seconds between two checks of every server.")
    idle_minutes = Float(
        60.0,
        config=True,
        help="""Minutes a server's GPUs and kernels must be idle before it is stopped and its
        GPU given back (N). Set it above the longest pause your users take between cells
        on purpose (a lecture, lunch).""",
    )
    warn_minutes = Float(
        10.0,
        config=True,
        help="""Minutes before the stop that the user is warned (W): the warning appears at
        N - W minutes of idleness, in JupyterLab and on the spawn page. A stop is never
        sooner than W minutes after its warning.""",
    )
    util_threshold_pct = Float(
        5.0,
        config=True,
        help="""GPU utilisation (SM activity, %) below which a GPU counts as idle: the highest
        value each sampler saw between two reports is compared, so a short burst counts.""",
    )
    memory_threshold_pct = Float(
        5.0,
        config=True,
        help="""Memory-controller activity (%) below which a GPU counts as idle (a data-
        loading loop that keeps memory busy keeps the GPU).""",
    )
    stale_seconds = Float(
        180.0,
        config=True,
        help="""A server whose last activity report is older than this is unknown, never
        idle: the culler stops only on evidence. Keep it above a few report intervals.""",
    )
    exempt_roles = List(
        Unicode(),
        [],
        config=True,
        help="""Portal roles never culled, e.g. ["operator"] (roles: student, researcher,
        instructor, operator).""",
    )
    exempt_courses = List(
        Unicode(), [], config=True, help="Course ids whose students' servers are never culled."
    )
    exempt_projects = List(
        Unicode(), [], config=True, help="Project ids whose members' servers are never culled."
    )
    quiet_hours = List(
        Unicode(),
        [],
        config=True,
        help="""Local times when nothing is stopped, as HH:MM-HH:MM spans (a span may cross
        midnight: "22:00-07:00"). Warnings still appear; the stop waits until the span ends.
        Use it for exams or scheduled overnight runs.""",
    )
    timezone = Unicode(
        "UTC",
        config=True,
        help="IANA time zone of quiet_hours and of the times in warnings, e.g. Europe/Paris.",
    )
    cull_cpu_only = Bool(
        False,
        config=True,
        help="""Whether servers that hold no GPU are culled too (on their kernels alone).
        Off by default: this culler is about GPUs; jupyterhub-idle-culler covers the rest.""",
    )
    concurrency = Int(
        10,
        config=True,
        help="""Warnings and stops sent at once in one check (as jupyterhub-idle-culler's
        --concurrency): a check of many servers then takes a few round trips, not one
        per server.""",
    )
    dry_run = Bool(False, config=True, help="Log what would be warned and stopped; change nothing.")

    @default("hub_api_url")
    def _hub_api(self) -> str:
        return os.environ.get("JUPYTERHUB_API_URL", "")

    @default("api_token")
    def _token(self) -> str:
        return os.environ.get("JUPYTERHUB_API_TOKEN", "")

    @default("portal_url")
    def _portal(self) -> str:
        return os.environ.get("SOVEREIGN_PORTAL_SERVICE_URL", "")

    @validate("quiet_hours")
    def _check_quiet(self, proposal: Any) -> list[str]:
        parse_quiet_hours(proposal["value"])
        return list(proposal["value"])

    @validate("timezone")
    def _check_tz(self, proposal: Any) -> str:
        try:
            ZoneInfo(proposal["value"])
        except Exception:
            raise ValueError(f"timezone: {proposal['value']!r} is not an IANA zone") from None
        return str(proposal["value"])

    @validate("warn_minutes")
    def _check_warn(self, proposal: Any) -> float:
        v = float(proposal["value"])
        if v < 0 or v > self.idle_minutes:
            raise ValueError("warn_minutes: must be between 0 and idle_minutes")
        return v

    aliases = {"interval": "GPUCuller.interval", "idle-minutes": "GPUCuller.idle_minutes"}

    def policy(self) -> Policy:
        return Policy(
            idle_minutes=self.idle_minutes,
            warn_minutes=self.warn_minutes,
            exempt_roles=frozenset(self.exempt_roles),
            exempt_courses=frozenset(self.exempt_courses),
            exempt_projects=frozenset(self.exempt_projects),
            quiet=tuple(parse_quiet_hours(self.quiet_hours)),
            timezone=self.timezone,
            cull_cpu_only=self.cull_cpu_only,
        )

    # -- HTTP ------------------------------------------------------------------------------
    async def _fetch(self, url: str, method: str = "GET", body: Any = None) -> tuple[int, Any]:
        req = httpclient.HTTPRequest(
            url,
            method=method,
            headers={"Authorization": f"token {self.api_token}"},
            body=None if body is None else json.dumps(body),
            allow_nonstandard_methods=True,
            request_timeout=30,
        )
        resp = await httpclient.AsyncHTTPClient().fetch(req, raise_error=False)
        try:
            data = json.loads(resp.body) if resp.body else None
        except ValueError:
            data = None
        return resp.code, data

    def _purl(self, path: str) -> str:
        base = self.portal_url if self.portal_url.endswith("/") else self.portal_url + "/"
        return base + path

    async def users(self, page: int = 200) -> dict[str, dict[str, Any]]:
        """Every user with a running server, page by page (the hub pages its lists)."""
        out: dict[str, dict[str, Any]] = {}
        offset = 0
        while True:
            url = f"{self.hub_api_url}/users?state=active&offset={offset}&limit={page}"
            code, data = await self._fetch(url)
            if code != 200 or not isinstance(data, list):
                raise RuntimeError(f"the hub did not list users (HTTP {code})")
            out.update({u["name"]: u for u in data})
            if len(data) < page:
                return out
            offset += len(data)

    async def cull_once(self, now: float | None = None) -> Tally:
        now = time.time() if now is None else now
        th = f"util={self.util_threshold_pct}&mem={self.memory_threshold_pct}"
        code, act = await self._fetch(
            self._purl(f"api/activity/all?{th}&stale={self.stale_seconds}")
        )
        if code != 200 or not isinstance(act, dict):
            raise RuntimeError(f"the portal service did not answer its activity (HTTP {code})")
        users = await self.users()
        policy, tally = self.policy(), Tally()
        todo = []
        for t in act.get("targets", []):
            user = users.get(t["user"])
            server = (user or {}).get("servers", {}).get(t["server"])
            if user is None or not server or not server.get("ready"):
                continue  # not running now: nothing to stop
            role = role_of(
                user.get("groups", []),
                bool(user.get("admin")),
                None,
                "student",
                hub_roles=user.get("roles", []),
            )
            d = decide(t, role=role, groups=user.get("groups", []), policy=policy, now=now)
            if d.action in ("none",):
                continue
            self.log.info("Culler: %s %s (%s)", d.action, t["source"], d.why)
            if not self.dry_run:
                todo.append((t, d))
        gate = asyncio.Semaphore(max(1, self.concurrency))

        async def act_on(t: dict[str, Any], d: Decision) -> None:
            async with gate:
                if d.action == "stop":
                    await self.stop(t, tally)
                    return
                code, _ = await self._fetch(
                    self._purl("api/activity/notice"),
                    "PUT",
                    {"source": t["source"], "notice": d.notice},
                )
                if code == 200:
                    tally.warned += d.action == "warn"
                    tally.cleared += d.action == "clear"

        await asyncio.gather(*(act_on(t, d) for t, d in todo))
        return tally

    async def stop(self, t: dict[str, Any], tally: Tally) -> None:
        code, got = await self._fetch(
            self._purl("api/activity/reclaim"), "POST", {"source": t["source"]}
        )
        if code != 200 or not isinstance(got, dict):
            self.log.warning(
                "Culler: the portal service refused the reclaim of %s (HTTP %s)", t["source"], code
            )
            return
        if _session_of(t["source"]) is not None:
            # a compute session: the portal service has it stopped (by its server, else
            # by itself), its record closing "reclaimed"; the user's server stays
            tally.stopped.append(t["source"])
            self.log.warning(
                "Culler: reclaimed %s, idle since %s: %.3f GPU-hours saved",
                t["source"],
                iso(float(t["idle_since"])) if t.get("idle_since") else "?",
                float(got.get("saved_gpu_hours") or 0.0),
            )
            return
        name = quote(t["user"], safe="")
        path = (
            f"/users/{name}/servers/{quote(t['server'], safe='')}"
            if t["server"]
            else f"/users/{name}/server"
        )
        code, data = await self._fetch(self.hub_api_url + path, "DELETE")
        if code in (202, 204):
            tally.stopped.append(t["source"])
            # a stop of someone's server is worth a line at the default log level
            self.log.warning(
                "Culler: reclaimed %s, idle since %s: %.3f GPU-hours saved",
                t["source"],
                iso(float(t["idle_since"])) if t.get("idle_since") else "?",
                float(got.get("saved_gpu_hours") or 0.0),
            )
        else:
            self.log.warning("Culler: stopping %s failed: HTTP %s %s", t["source"], code, data)

    async def run_forever(self) -> None:
        while True:
            try:
                await self.cull_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                self.log.exception("Culler: one check failed")
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        if not (self.hub_api_url and self.api_token and self.portal_url):
            raise SystemExit(
                "sovereign-portal-culler: needs the hub API URL, its token and the portal "
                "service URL (run it as a hub service: configure_culler(c))"
            )
        from . import lifeline

        lifeline.exit_with_parent(self.log)
        asyncio.run(self.run_forever())


def culler_service(
    *,
    name: str = NAME,
    portal_service: str = "sovereign-portal",
    portal_url: str = "http://127.0.0.1:10101",
    args: Iterable[str] = (),
) -> dict[str, Any]:
    """The ``c.JupyterHub.services`` entry that runs the culler under the hub.

    ``args`` are more ``--GPUCuller.<trait>=<value>`` flags (e.g. ``--GPUCuller.idle_minutes=45``).
    """
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "SOVEREIGN_PORTAL_SERVICE_URL": f"{portal_url}/services/{portal_service}/",
    }
    for key in ("PYTHONPATH", "EGRESS_LOG"):
        if key in os.environ:
            env[key] = os.environ[key]
    return {
        "name": name,
        "command": [sys.executable, "-m", "sovereign_portal.hub.culler", *args],
        "environment": env,
        "display": False,
    }


def culler_role(name: str = NAME) -> dict[str, Any]:
    """The culler's narrow role, like jupyterhub-idle-culler's."""
    return {
        "name": f"{name}-role",
        "description": "GPU-aware culler: list users and their servers, stop idle ones",
        "scopes": ["list:users", "read:users", "read:roles:users", "admin:servers"],
        "services": [name],
    }


def configure_culler(
    c: Any, args: Iterable[str] = (), name: str = NAME, notice_interval: float = 5.0
) -> dict[str, Any]:
    """Add the culler service and its role to a hub config already wired by
    :func:`.service.configure_hub` (the portal service it reads), in one call; and its
    idle warnings to the hub's home and spawn pages (:mod:`.activity_pages`, read again
    every ``notice_interval`` seconds)."""
    portal = next(
        (s for s in c.JupyterHub.get("services", []) if s.get("name") == "sovereign-portal"),
        None,
    )
    if portal is None:
        raise ValueError("configure_culler: call configure_hub (or portal.configure) first")
    svc = culler_service(name=name, portal_url=portal["url"], args=args)
    # the culler's token, made here so that the hub's pages can read the idle warnings
    # with it too (:mod:`.activity_pages`); JupyterHub hands it to the culler's process
    svc["api_token"] = secrets.token_hex(32)
    c.JupyterHub.services = [*list(c.JupyterHub.get("services", [])), svc]
    from .activity_pages import install as show_on_hub_pages

    show_on_hub_pages(c, portal["url"], svc["api_token"], notice_interval)
    c.JupyterHub.load_roles = [*list(c.JupyterHub.get("load_roles", [])), culler_role(name)]
    if name not in ("sovereign-portal-culler",):
        portal["command"].append(f"--PortalService.culler_services={json.dumps([name])}")
    return svc


def main(argv: list[str] | None = None) -> None:
    app = GPUCuller.instance()
    app.initialize(argv)
    app.start()


if __name__ == "__main__":
    main()
