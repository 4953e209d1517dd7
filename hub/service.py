"""The portal service: catalog and admission for compute sessions, run by the hub.

A small tornado app that JupyterHub starts as a managed service
(``c.JupyterHub.services``, see :func:`service_config` and :func:`configure_hub`). The
notebook extension calls it with the single-user server's own API token:

``GET  {prefix}api/catalog``        the catalog filtered for the caller, with € rates and queue
``POST {prefix}api/grants``         a Request (JSON object) → a Grant (201), 400 or 403
``DELETE {prefix}api/grants/<id>``  give a grant's local devices back (204)
``PUT  {prefix}api/grants/<id>/jobs?jobs=a,b``  the Slurm jobs of that session (200)
``GET  {prefix}api/jobs?version=V&wait=S``  the state, reason and queue position of the
                                    caller's session jobs; answers once its version is
                                    not V, or after S seconds (long-poll, at most 25)

The service polls the scheduler once per ``session_poll_interval`` for every session job
of every user and for the catalog's queue state (:mod:`.session_jobs`); the notebook
servers never call it.

Callers are identified through :class:`jupyterhub.services.auth.HubAuth` (the token must
carry ``access:services!service=<name>``); their groups, JupyterHub roles and admin flag
come from the hub API with the service's own token (scopes ``read:users``,
``read:roles:users``). The portal role is the strongest of: admin (operator), a JupyterHub
role ``portal-<role>`` (what the institutional login assigns), a role group. Tokens are
never logged.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sovereign_portal.spawners.base import cached_site
from sovereign_portal.spawners.errors import (
    Forbidden,
    PortalError,
    TooLarge,
    Unauthenticated,
    Unavailable,
)
from sovereign_portal.spawners.inventory import (
    AllocationError,
    Allocator,
    box_devices,
    session_owner,
)
from sovereign_portal.spawners.site import Site
from sovereign_portal.spawners.sizes import Size
from sovereign_portal.spawners.slurm.client import SlurmCLI, slurm_env
from sovereign_portal.spawners.strict import MAX_JSON_BYTES, loads_json, parse_int
from tornado import httpclient, web
from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop, PeriodicCallback
from traitlets import Bool, Dict, Float, Int, List, Unicode, default
from traitlets.config import Application

from . import lifeline
from .admission import (
    DEFAULT_LIMITS,
    ROLES,
    AdmissionError,
    Caller,
    Grant,
    admit,
    catalog_for,
    role_of,
)
from .budget_store import BUDGETS_ENV, DB_URL_ENV, BudgetPolicy, BudgetStore
from .budget_sync import AccountingError, with_account
from .budgets import BudgetError
from .claims import COURSE_GROUP, INSTRUCTOR_GROUP
from .session_jobs import JobsRequestError, SessionJobs, parse_job_ids

SERVICE_NAME = "sovereign-portal"
RESIDENCY_ENV = "SOVEREIGN_PORTAL_RESIDENCY"
#: Largest request body the service reads (a Request is a few hundred bytes).
MAX_BODY_BYTES = MAX_JSON_BYTES
#: A body up to this size is read to its end and answered 413; beyond it the connection is
#: closed (tornado's max_body_size). Reading first is what lets the proxy relay the 413: a
#: response sent while the client is still uploading ends in a reset, which the proxy
#: turns into a 503.
DRAIN_BODY_BYTES = 256 * 1024 * 1024
#: Seconds between checks that the hub that started this service is still its parent.
PARENT_CHECK_SECONDS = 1.0
#: ``api/budgets/course/<id>/<period>``: a course pool, for its instructors.
COURSE_BUDGET = r"api/budgets/course/([a-z0-9-]{1,40})/([a-z0-9._-]{1,32})"
SERVER_TOKEN_SCOPES = ["users:activity!user", "access:servers!server"]

#: A caller identity as the hub describes it: {"name", "groups", "roles", "admin"}.
UserModel = dict[str, Any]
Authenticate = Callable[[str], Awaitable[UserModel | None]]


class PortalService(Application):
    """Catalog and admission of compute sessions, as a JupyterHub service."""

    name = "sovereign-portal-service"
    description = "Admits compute-session requests and serves the catalog for each user."

    site_file = Unicode(
        "",
        config=True,
        help="""Site file (TOML) with partitions, prices and jurisdictions; the same file the
        spawner uses. Empty uses the embedded example site (one local 8 × H100 box).""",
    )
    residency = Dict(
        key_trait=Unicode(),
        value_trait=List(Unicode()),
        config=True,
        help="""Residency rules: a group mapped to the ISO country codes its work may run in,
        e.g. {"proj-health": ["FR"]}. Same meaning as the spawner's residency option.""",
    )

    @default("residency")
    def _residency_from_env(self) -> dict[str, list[str]]:
        raw = os.environ.get(RESIDENCY_ENV)
        if not raw:
            return {}
        rules = loads_json(raw, what=RESIDENCY_ENV)
        if not isinstance(rules, dict) or not all(
            isinstance(v, list) and all(isinstance(c, str) for c in v) for v in rules.values()
        ):
            raise ValueError(f"{RESIDENCY_ENV} must be a JSON object of group -> [countries]")
        return rules

    role_groups = Dict(
        key_trait=Unicode(),
        value_trait=Unicode(),
        config=True,
        help="""Groups that confer a portal role, e.g. {"staff": "researcher"}. Empty maps
        the groups named student, researcher, instructor and operator to those roles.
        JupyterHub admins are operators.""",
    )
    default_role = Unicode(
        "student",
        config=True,
        help="""Role of a user in no role group. The default, student, may only run small
        Dask sessions; set "researcher" on a site where everyone is staff.""",
    )
    grant_ttl_seconds = Int(
        300,
        config=True,
        help="How long a grant may wait before the extension starts its jobs, in seconds.",
    )
    squeue = Unicode(
        "squeue",
        config=True,
        help="""squeue command (argv[0]) of the service's one scheduler query: the queue
        state of Slurm partitions and the state of every compute session's jobs.""",
    )
    caller_cache_seconds = Float(
        30.0,
        config=True,
        help="""Seconds the hub's answer about a caller's token (name, groups, roles, admin
        flag) is reused. Every notebook server long-polls the service for its sessions'
        job state, so without reuse each poll would cost the hub two API calls. A change of
        a user's groups or roles, or a revoked token, takes effect within this time. 0
        asks the hub on every request.""",
    )
    session_poll_interval = Float(
        5.0,
        config=True,
        help="""Seconds between the service's scheduler queries while compute sessions run
        on Slurm. One squeue of the whole queue per interval serves every session of every
        user (state, reason, exact queue position) and the catalog's queue state; notebook
        servers ask the service (long-poll), never the scheduler. A session whose jobs end
        behind the portal's back ends within one interval.""",
    )
    queue_snapshot_file = Unicode(
        "",
        config=True,
        help="""The hub's queue snapshot (`SlurmGPUSpawner.queue_snapshot_file`, which
        `configure_hub` passes on): the service and the hub's spawners then share one
        whole-queue squeue per interval, whichever polls first. Empty: the service polls on
        its own.""",
    )
    queue_cache_seconds = Float(
        5.0,
        config=True,
        help="""Seconds a queue-state answer is reused. One squeue call serves every user and
        every partition in that window.""",
    )
    lease_file = Unicode(
        "",
        config=True,
        help="""JSON file of the local box's device leases, shared with LocalGPUSpawner's
        lease_file so that notebook servers and compute sessions never get the same device.
        Empty keeps a separate in-memory pool (only safe when no notebook runs on the box).""",
    )
    inventory_source = Unicode(
        "auto",
        config=True,
        help='Where local devices come from: "auto", "nvml" or "declared" (as the spawner).',
    )
    slurm_accounting = Bool(
        False,
        config=True,
        help="""Whether the site runs Slurm accounting (slurmdbd) with budgets pushed into it
        (`sovereign-portal budgets sync`); as c.SlurmGPUSpawner.slurm_accounting, which
        configure_hub passes on. Then every compute session's jobs get --account: the
        account of the course or project budget the grant charges, else the partition's
        account, else default_account; with none of them the grant is refused.""",
    )
    default_account = Unicode(
        "",
        config=True,
        help="""Slurm account (--account) of a compute session that charges no course or
        project budget, when its partition names none (as c.SlurmGPUSpawner.default_account,
        which configure_hub passes on).""",
    )
    culler_services = List(
        Unicode(),
        ["sovereign-portal-culler"],
        config=True,
        help="""Names of the hub services whose tokens may read every server's GPU activity
        and set idle notices (``api/activity/all``, ``api/activity/notice``,
        ``api/activity/reclaim``): the GPU-aware culler (:mod:`.culler`). Users' tokens
        never can.""",
    )
    carbon_series_file = Unicode(
        "",
        config=True,
        help="""CSV file of the site's grid carbon intensity over time, lines of
        ``<ISO 8601 time with offset>,<gCO2/kWh>`` (e.g. exported from RTE eCO2mix). Measured
        energy is then multiplied by the intensity at the time of each report; empty uses
        the partition's static ``carbon_g_per_kwh``.""",
    )
    submit_prefix = List(
        Unicode(),
        ["runuser", "-u", "{unix_user}", "--"],
        config=True,
        help="""argv prefix that runs scancel as the session user's Unix account when the
        service stops a compute session whose budget is spent (as
        c.SlurmGPUSpawner.submit_prefix; {unix_user} is replaced): Slurm itself then lets
        it cancel only that user's own jobs. The default needs the service to run as
        root, as the hub does; use ["sudo", "-n", "-u", "{unix_user}", "--"] with a
        sudoers rule for scancel otherwise.""",
    )
    unix_user_template = Unicode(
        "{username}",
        config=True,
        help="""The Unix account of a hub user, whose compute-session jobs the service may
        cancel (as c.SlurmGPUSpawner.unix_user_template; {username} is the hub user
        name). A system account (UnixAccountPolicy) is never used.""",
    )
    ip = Unicode("127.0.0.1", config=True, help="Address to listen on (default from the URL).")
    port = Int(0, config=True, help="Port to listen on (default from $JUPYTERHUB_SERVICE_URL).")

    aliases = {"site-file": "PortalService.site_file", "port": "PortalService.port"}

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self._authenticate: Authenticate | None = None
        self._allocators: dict[str, Allocator] = {}
        # grant id -> (partition, lease owner, end time)
        self._leases: dict[str, tuple[str, str, float]] = {}
        self._budgets: BudgetStore | None = None
        self._groups_of: Callable[[str], Awaitable[list[str] | None]] | None = None
        self._session_jobs: SessionJobs | None = None
        self._callers: dict[bytes, tuple[float, UserModel]] = {}

    # -- budgets ----------------------------------------------------------------------------
    @property
    def budget_policy(self) -> BudgetPolicy:
        return BudgetPolicy(parent=self)

    @property
    def budgets(self) -> BudgetStore:
        """The budget store on the portal database (opened, and the config's budgets
        applied, on first use: :meth:`start` does it before listening)."""
        if self._budgets is None:
            policy = self.budget_policy
            if policy.database_configured():
                self._budgets = policy.open()
            else:
                # A bare service (no hub wiring, e.g. the extension's tests): nothing is
                # written to a stray ./portal.sqlite; an empty in-memory store has no budgets.
                self.log.warning(
                    "No portal database configured (c.PortalDatabase.url or %s): budgets are "
                    "not checked for compute sessions; wire the service with configure()",
                    DB_URL_ENV,
                )
                self._budgets = policy.open(url="sqlite://")
        return self._budgets

    def note_refusal(self, raw: Any, reason: str) -> None:
        """One admission refusal row in the portal database (where and why, not who)."""
        from .metrics import record_refusal, refusal_place

        try:
            countries = {p.name: p.jurisdiction.country for p in self.site.partitions}
            kind, partition, country = refusal_place(raw, countries)
            record_refusal(
                self.budgets.store.engine,
                kind=kind,
                partition=partition,
                country=country,
                reason=reason,
            )
        except Exception:
            self.log.exception("Metrics: recording an admission refusal failed")

    @property
    def grant_ledger(self) -> Any:
        """Ledger records of compute sessions (:mod:`.grant_ledger`), on the portal database."""
        if getattr(self, "_grant_ledger", None) is None:
            from .grant_ledger import GrantLedger
            from .ledger_store import LedgerStore

            self._grant_ledger = GrantLedger(
                LedgerStore(self.budgets.store), self.site.name, site_of=self.site.site_name_of
            )
            jobs = self.session_jobs
            jobs.listeners.append(
                lambda ok: self._grant_poll(jobs)  # after each shared poll (of any site)
            )
            try:
                self._grant_ledger.adopt(jobs.poller, poller_of=jobs.poller_of_record)
            except Exception:
                self.log.exception("Ledger: adopting open compute-session records failed")
        return self._grant_ledger

    def _grant_poll(self, jobs: Any) -> None:
        try:
            self.grant_ledger.on_poll(
                jobs.poller, set(jobs.grants), poller_of=jobs.poller_of_record
            )
        except Exception:
            self.log.exception("Ledger: checking compute sessions failed")

    # -- budgets while sessions run: spent, after the grace, stops them --------------------
    def _start_budget_watch(self) -> None:
        """The same watch as the hub's for notebook servers (:class:`.budget_store.BudgetWatch`,
        every ``BudgetPolicy.check_interval_seconds``), for compute sessions."""
        from .budget_store import BudgetWatch

        if getattr(self, "_budget_watch", None) is not None:
            return
        policy = self.budget_policy
        self._budget_watch = BudgetWatch(policy.grace_seconds)
        PeriodicCallback(self.check_budgets, policy.check_interval_seconds * 1000).start()

    async def check_budgets(self, now: float | None = None) -> list[str]:
        """Stop the compute sessions whose budget has been spent for longer than the grace
        (:class:`.budget_store.BudgetWatch`, the one rule for servers and sessions).
        Returns the ids of the grants stopped; their records end with reason "budget"."""
        from .budget_store import BudgetWatch

        t = time.time() if now is None else now
        gl = self.grant_ledger
        watch = getattr(self, "_budget_watch", None)
        if watch is None:
            watch = self._budget_watch = BudgetWatch(self.budget_policy.grace_seconds)
        try:
            refs = [
                r.source
                for r in gl.store.list_open("grant:")
                if r.source.split(":", 1)[1] not in gl.ending
            ]
            due = watch.due(self.budgets, refs, t) if refs else []
        except Exception:
            self.log.exception("Budget check of compute sessions failed")
            return []
        stopped = []
        for ref, bal in due:
            gid = ref.split(":", 1)[1]
            try:
                if await self.stop_for_budget(gid, bal.budget.key, bal.to_json()["banner"]):
                    stopped.append(gid)
            except Exception:  # one session's trouble never stops the watch
                self.log.exception("Budget stop of compute session %s failed", gid)
        return stopped

    async def stop_for_budget(self, grant_id: str, key: str, why: str) -> bool:
        """Stop one compute session for its budget (:meth:`stop_session`, reason "budget")."""
        rec = self.grant_ledger.store.open_for(f"grant:{grant_id}")
        if rec is None:
            return False
        self.log.warning(
            "Budget %s is spent (%s): stopping compute session %s of %s",
            key,
            why,
            grant_id,
            rec.user,
        )
        self.grant_ledger.budget_stopped.add(grant_id)
        return await self.stop_session(grant_id, "budget", why)

    async def stop_session(self, grant_id: str, reason: str, why: str) -> bool:
        """Stop one compute session from the service (its budget is spent, or the culler
        reclaims its idle GPUs): cancel its Slurm jobs (its record closes ``reason`` at the
        poll that sees them end), or release a local one's devices and close its record
        ``reason`` now. False when it has no open record."""
        gl = self.grant_ledger
        rec = gl.store.open_for(f"grant:{grant_id}")
        if rec is None:
            return False
        self.log.info("Stopping compute session %s of %s (%s: %s)", grant_id, rec.user, reason, why)
        jobs = self.session_jobs
        watch = jobs.grants.get(grant_id)
        ids = sorted(set(rec.job_ids) | set(watch.jobs if watch is not None else ()))
        if ids:
            from sovereign_portal.spawners.accounts import UnixAccountPolicy

            # scancel as the session user's own account: Slurm lets it cancel its jobs only
            unix = self.unix_user_template.format(username=rec.user)
            UnixAccountPolicy(parent=self).check(unix)  # never as a system account
            client = self.scheduler_for(watch.site if watch is not None else rec.site)
            gl.ending[grant_id] = reason
            try:
                await client.cancel(ids, user=unix)
            except Exception:
                gl.ending.pop(grant_id, None)  # still running: the next check tries again
                raise
            return True
        self.release(grant_id)  # a local session's devices
        gl.close(grant_id, reason)
        return True

    def budget_step(self, caller: Caller, ref: str) -> BudgetStep:
        """The ``budget=`` step of :func:`.admission.admit` for one grant."""
        return BudgetStep(self, caller, ref)

    # -- site and identity ------------------------------------------------------------------
    @property
    def site(self) -> Site:
        # Parsed once per file version, as the spawner does: not on every request.
        return cached_site(str(Path(self.site_file).resolve()) if self.site_file else None)

    async def groups_of(self, name: str) -> list[str] | None:
        """A hub user's groups (None: no such user), with the service's own token."""
        if self._groups_of is not None:
            return await self._groups_of(name)
        from jupyterhub.services.auth import HubAuth

        hub_auth: HubAuth = getattr(self, "_hub_auth", None) or HubAuth()
        self._hub_auth = hub_auth
        resp = await httpclient.AsyncHTTPClient().fetch(
            f"{hub_auth.api_url}/users/{quote(name, safe='')}",
            headers={"Authorization": f"token {hub_auth.api_token}"},
            raise_error=False,
        )
        if resp.code == 404:
            return None
        if resp.code != 200:
            raise Unavailable(f"the hub did not answer for user {name[:64]!r} (HTTP {resp.code})")
        return list(json.loads(resp.body).get("groups") or [])

    def set_authenticator(self, fn: Authenticate) -> None:
        """Replace hub authentication (used by tests of the extension, which have no hub)."""
        self._authenticate = fn

    async def caller_for(self, token: str) -> Caller | None:
        if not token:
            return None
        auth = self._authenticate or self._hub_authenticate_cached
        model = await auth(token)
        if not model:
            return None
        groups = frozenset(model.get("groups") or [])
        role = role_of(
            groups,
            bool(model.get("admin")),
            self.role_groups or None,
            self.default_role,
            hub_roles=model.get("roles") or [],
        )
        site = str(model.get("site") or "") or self.notebook_site(
            model["name"], model.get("server")
        )
        return Caller(name=model["name"], groups=groups, role=role, site=site)

    def notebook_site(self, user: str, server: str | None) -> str:
        """The [[sites]] entry where ``user``'s notebook server ``server`` runs: the site of
        its open ledger record (the hub's spawner wrote it at spawn, with the placed
        partition). "" without [[sites]], or when it is not known (no such record)."""
        if server is None or not self.site.sites:
            return ""
        try:
            rec = self.grant_ledger.store.open_for(f"server:{user}/{server}")
        except Exception:
            self.log.exception("Ledger: reading the server record of %s failed", user)
            return ""
        names = {cs.name for cs in self.site.sites}
        return rec.site if rec is not None and rec.site in names else ""

    async def _hub_authenticate_cached(self, token: str) -> UserModel | None:
        """The hub's answer for ``token``, reused for ``caller_cache_seconds``.

        Every server long-polls its sessions' job state (``GET api/jobs``): without the
        cache each of those requests would cost the hub two API calls. Keyed by a digest
        of the token (the token itself is not kept); refusals are not cached.
        """
        key = hashlib.sha256(token.encode()).digest()
        now = time.monotonic()
        hit = self._callers.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        model = await self._hub_authenticate(token)
        if model and self.caller_cache_seconds > 0:
            if len(self._callers) > 10_000:
                self._callers = {k: v for k, v in self._callers.items() if v[0] > now}
            self._callers[key] = (now + self.caller_cache_seconds, model)
        return model

    async def _hub_authenticate(self, token: str) -> UserModel | None:
        from jupyterhub.services.auth import HubAuth

        hub_auth: HubAuth = getattr(self, "_hub_auth", None) or HubAuth()
        self._hub_auth = hub_auth
        model = await hub_auth.user_for_token(token, sync=False)
        if not model or not hub_auth.check_scopes(hub_auth.access_scopes, model):
            return None
        if model.get("kind", "user") != "user":
            return None
        # groups and admin flag from the hub, with the service's own token
        client = httpclient.AsyncHTTPClient()
        resp = await client.fetch(
            f"{hub_auth.api_url}/users/{quote(model['name'], safe='')}",
            headers={"Authorization": f"token {hub_auth.api_token}"},
            raise_error=False,
        )
        if resp.code != 200:
            self.log.error(
                "Cannot read groups and roles of %s from the hub: HTTP %s",
                model["name"],
                resp.code,
            )
            return {"name": model["name"], "groups": [], "roles": [], "admin": False}
        full = json.loads(resp.body)
        if "roles" not in full:
            self.log.warning(
                "The hub did not return the roles of %s: give the service's role the "
                "read:roles:users scope (see service_role()); falling back to groups",
                full["name"],
            )
        return {
            "name": full["name"],
            "groups": full.get("groups", []),
            "roles": full.get("roles", []),
            "admin": full.get("admin"),
            "server": server_of_token(full["name"], model.get("scopes") or []),
        }

    # -- local devices --------------------------------------------------------------------
    def allocator(self, partition: str) -> Allocator:
        if partition not in self._allocators:
            part = self.site.partition(partition)
            devices = box_devices(part.nodes[0], self.inventory_source)
            self._allocators[partition] = Allocator(devices, self.lease_file or None)
        return self._allocators[partition]

    def lease_devices(self, grant: Grant) -> list[str]:
        a = self.allocator(grant.partition)
        size = Size(
            grant.node_type,
            str(grant.size["accelerator"]),
            slice=grant.size["slice"],
            gpus_per_node=int(grant.size["gpus_per_node"]),
        )
        # The owner names the user, so an operator reading the lease file sees whose it is.
        owner = session_owner(grant.user, grant.id)
        end = time.time() + grant.walltime_minutes * 60
        try:
            got = a.allocate(owner, size, until=end)
        except AllocationError as e:
            raise AdmissionError(str(e), reason="busy") from None
        self._leases[grant.id] = (grant.partition, owner, end)
        return [d.id for d in got]

    def release(self, grant_id: str, user: str | None = None) -> list[str]:
        """Give a grant's devices back; with ``user``, only if that user holds the grant."""
        lease = self._leases.get(grant_id)
        if lease is None or (user is not None and lease[1] != session_owner(user, grant_id)):
            return []
        del self._leases[grant_id]
        return self.allocator(lease[0]).release(lease[1])

    def expire_leases(self) -> None:
        now = time.time()
        for gid, (_, _, end) in list(self._leases.items()):
            if end < now:
                self.log.info("Walltime of grant %s is over: releasing its devices", gid)
                self.release(gid)
                try:
                    self.grant_ledger.close(gid, "walltime", when=end)
                except Exception:
                    self.log.exception("Ledger: closing the record of grant %s failed", gid)

    # -- session jobs and queue state: one scheduler query per interval ------------------
    @property
    def session_jobs(self) -> SessionJobs:
        if self._session_jobs is None:
            from sovereign_portal.spawners.slurm.sites import site_client

            def factory(cs: Any) -> Callable[[], Any]:
                return lambda: site_client(cs, timeout=20, squeue=self.squeue)

            self._session_jobs = SessionJobs(
                lambda: SlurmCLI(env=slurm_env(), squeue=self.squeue, timeout=20),
                self.session_poll_interval,
                snapshot_file=self.queue_snapshot_file,
                site_clients={cs.name: factory(cs) for cs in self.site.sites},
            )
        return self._session_jobs

    def scheduler_for(self, site: str) -> Any:
        """The client that cancels a session's jobs at ``site`` (with submit_prefix): the
        declared site's own (its CLI or its slurmrestd), else the hub host's CLI."""
        from sovereign_portal.spawners.slurm.sites import site_client

        names = {cs.name for cs in self.site.sites}
        if site in names:
            cs = self.site.cluster_site(site)
            return site_client(cs, submit_prefix=self.submit_prefix, timeout=20)
        if names:  # a record of no declared site: never the hub host's CLI instead
            raise Unavailable(f"no declared site {site[:40]!r} to cancel its jobs at")
        return SlurmCLI(env=slurm_env(), submit_prefix=self.submit_prefix, timeout=20)

    async def queue_state(self, site: Site) -> dict[str, dict[str, int]]:
        """Pending and running jobs per Slurm partition; free sizes on local partitions."""
        out: dict[str, dict[str, int]] = {}
        for p in site.partitions:
            if p.backend == "local":
                a = self.allocator(p.name)
                out[p.name] = {
                    "free_devices": len(a.free_ids()),
                    "devices": len(a.devices),
                }
        slurm = [p for p in site.partitions if p.backend == "slurm"]
        if not slurm:
            return out
        jobs = self.session_jobs
        by_site: dict[str, dict[str, dict[str, int]]] = {}
        for p in slurm:  # each site's own queue (a partition name is a site's own)
            key = (p.site or "") if jobs.sites else ""
            if key not in by_site:
                by_site[key] = await jobs.queue_counts(self.queue_cache_seconds, site=key)
            out[p.name] = by_site[key].get(p.scheduler_partition, {"pending": 0, "running": 0})
        return out

    # -- app ----------------------------------------------------------------------------
    def make_app(self, prefix: str = "/") -> web.Application:
        prefix = prefix if prefix.endswith("/") else prefix + "/"
        from .activity_service import routes as activity_routes
        from .course_api import course_handlers as course_routes

        # Compute sessions' open ledger records are watched from the start (after a
        # restart too), once the loop runs.
        IOLoop.current().add_callback(lambda: self.grant_ledger)
        IOLoop.current().add_callback(self._start_budget_watch)
        return web.Application(
            [
                (prefix + "api/catalog", CatalogHandler),
                (prefix + "api/grants", GrantsHandler),
                (prefix + r"api/grants/([0-9a-f]{1,64})", GrantHandler),
                (prefix + r"api/grants/([0-9a-f]{1,64})/jobs", GrantJobsHandler),
                (prefix + "api/jobs", JobsHandler),
                (prefix + "api/budgets", BudgetsHandler),
                (prefix + COURSE_BUDGET, CourseBudgetHandler),
                (prefix + COURSE_BUDGET + "/allowances/([^/]{1,128})", AllowanceHandler),
                *activity_routes(prefix),
                *course_routes(self, prefix),
                (prefix.rstrip("/") or "/", HealthHandler),
            ],
            portal=self,
        )

    def start(self) -> None:
        url = os.environ.get("JUPYTERHUB_SERVICE_URL", "")
        prefix = os.environ.get("JUPYTERHUB_SERVICE_PREFIX", f"/services/{SERVICE_NAME}/")
        port = self.port
        if not port and url:
            from urllib.parse import urlparse

            port = urlparse(url).port or 80
        if not port:
            raise SystemExit("no port: set --port or run as a hub-managed service with a url")
        # Open the portal database and apply the configured budgets before listening: a
        # bad budget entry stops the start here, with its field named.
        self.log.info("Budgets: %d in the portal database", len(self.budgets.budgets()))
        # Handlers that take a body read it streaming: up to 64 KiB is kept, the rest of a
        # body up to DRAIN_BODY_BYTES is read and dropped, and the answer is 413.
        server = HTTPServer(self.make_app(prefix), max_body_size=DRAIN_BODY_BYTES)
        lifeline.exit_with_parent(self.log)
        lifeline.listen_reclaiming(server, port, self.ip, self.log)
        self.log.info("sovereign-portal service on %s:%s%s", self.ip, port, prefix)
        PeriodicCallback(self.expire_leases, 30_000).start()
        lifeline.watch_parent(self.log, PARENT_CHECK_SECONDS)
        IOLoop.current().start()


class BudgetStep:
    """The budget step of one grant: hold its maximum, remember which budget it charges."""

    def __init__(self, portal: PortalService, caller: Caller, ref: str) -> None:
        self.portal, self.caller, self.ref = portal, caller, ref
        self.budget: str | None = None
        self.resolved: Any = None  # the placed request, for the grant's ledger record

    def __call__(self, resolved: Any) -> int:
        p, who = self.portal, self.caller.name
        self.resolved = resolved
        d = p.budgets.admit_resolved(who, self.caller.groups, resolved, self.ref, p.budget_policy)
        if d.budget is not None:
            p.log.info("Budget %s for %s: %s", d.budget, who, d.message)
        self.budget = d.budget
        return d.walltime_minutes


class _Base(web.RequestHandler):
    """Authenticates the caller; every error leaves through :meth:`write_error` as JSON."""

    caller: Caller | None = None

    @property
    def portal(self) -> PortalService:
        portal: PortalService = self.settings["portal"]
        return portal

    async def prepare(self) -> None:
        await self.authenticate()

    async def authenticate(self) -> None:
        header = self.request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() not in ("token", "bearer") or not token.strip():
            raise Unauthenticated("send the server's API token: Authorization: token <...>")
        self.caller = await self.portal.caller_for(token.strip())
        if self.caller is None:
            raise Forbidden("this token is not allowed to use the portal service")

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if isinstance(value, PortalError):
            who = self.caller.name if self.caller else "?"
            self.portal.log.info("Refused %s for %s: %s", value.reason, who, value.log_message)
            return
        super().log_exception(typ, value, tb)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """The one place the service turns an error into JSON (never with status 200)."""
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, PortalError):
            body = exc.to_json()
            self.set_status(exc.status)
        else:
            # tornado's own errors (405, a bad request line); never a traceback
            message = exc.log_message if isinstance(exc, web.HTTPError) else None
            body = {"error": message or self._reason, "reason": "http", "status": status_code}
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(body))


@web.stream_request_body
class _BodyBase(_Base):
    """A handler that takes a JSON body, read streaming so that any size gets an answer.

    Authentication waits for the end of the body too: an answer sent while the client is
    still uploading would reach it through the proxy as a reset (a 503), not a 401 or 413.
    """

    _chunks: list[bytes]
    _size: int

    async def prepare(self) -> None:
        self._chunks, self._size = [], 0

    def data_received(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._size <= MAX_BODY_BYTES:
            self._chunks.append(chunk)
        else:
            self._chunks = []  # over the limit: drop what came, count the rest

    async def json_body(self) -> Any:
        await self.authenticate()
        if self._size > MAX_BODY_BYTES:
            raise TooLarge(
                f"the body is over {MAX_BODY_BYTES} bytes",
                log_message=f"a body of {self._size} bytes",
            )
        return loads_json(b"".join(self._chunks), limit=MAX_BODY_BYTES)


class HealthHandler(web.RequestHandler):
    def get(self) -> None:
        self.finish({"service": SERVICE_NAME, "ok": True})


class CatalogHandler(_Base):
    async def get(self) -> None:
        assert self.caller is not None
        p = self.portal
        site = p.site
        cat = catalog_for(site, self.caller, residency=p.residency)
        queue = await p.queue_state(site)
        for part in cat["partitions"]:
            part["queue"] = queue.get(part["name"], {})
        # What is left of the budget a session would charge (the widget's cost line).
        bals = p.budgets.balances(self.caller.name, self.caller.groups)
        cat["budget"] = bals[0].to_json(p.budget_policy.warn_at) if bals else None
        self.finish(cat)


class BudgetsHandler(_Base):
    """``GET api/budgets``: the caller's balances, in the order admission charges them."""

    async def get(self) -> None:
        assert self.caller is not None
        p = self.portal
        bals = p.budgets.balances(self.caller.name, self.caller.groups)
        self.finish({"budgets": [b.to_json(p.budget_policy.warn_at) for b in bals]})


def _may_manage(caller: Caller, course: str) -> bool:
    """An instructor of ``course`` (group ``instructors-<id>``) or an operator."""
    return caller.role == "operator" or INSTRUCTOR_GROUP.format(course) in caller.groups


class CourseBudgetHandler(_Base):
    """``GET api/budgets/course/<id>/<period>``: a course pool and its allowances, for its
    instructors."""

    async def get(self, course: str, period: str) -> None:
        assert self.caller is not None
        if not _may_manage(self.caller, course):
            raise Forbidden(f"only an instructor of {course} may see its budget", field="course")
        bs = self.portal.budgets
        bal = bs.balance(f"course:{course}", period)
        self.finish(
            {
                **bal.to_json(self.portal.budget_policy.warn_at),
                "per_student": bal.budget.per_student,
                "allowances": bs.allowances(course, period),
            }
        )


class AllowanceHandler(_BodyBase):
    """``PUT api/budgets/course/<id>/<period>/allowances/<user>`` with ``{"amount": N}``:
    an instructor of that course sets one student's allowance within the pool."""

    async def put(self, course: str, period: str, user: str) -> None:
        raw = await self.json_body()
        assert self.caller is not None
        if not _may_manage(self.caller, course):
            raise Forbidden(
                f"only an instructor of {course} may set its allowances", field="course"
            )
        if not isinstance(raw, dict) or set(raw) != {"amount"}:
            raise BudgetError("amount", 'send a JSON object {"amount": N}')
        groups = await self.portal.groups_of(user)
        if groups is None or COURSE_GROUP.format(course) not in groups:
            raise BudgetError("user", f"{user[:64]!r} is not a student of {course}", status=404)
        bs = self.portal.budgets
        amount = bs.set_allowance(course, period, user, raw["amount"], self.caller.name)
        self.portal.log.info(
            "Allowance of %s in %s/%s set to %g by %s",
            user,
            course,
            period,
            amount,
            self.caller.name,
        )
        self.finish({"course": course, "period": period, "user": user, "amount": amount})


class GrantsHandler(_BodyBase):
    async def post(self) -> None:
        raw = await self.json_body()
        try:
            await self._grant(raw)
        except PortalError as e:
            if e.status == 403:  # a policy refusal: counted for /hub/metrics (hub/metrics.py)
                self.portal.note_refusal(raw, e.reason)
            raise

    async def _grant(self, raw: Any) -> None:
        assert self.caller is not None
        p = self.portal
        grant_id = secrets.token_hex(8)
        ref = f"grant:{grant_id}"  # the ledger record's source; the hold settles with it
        grant = admit(
            p.site,
            raw,
            self.caller,
            residency=p.residency,
            ttl_seconds=p.grant_ttl_seconds,
            grant_id=grant_id,
            budget=(step := p.budget_step(self.caller, ref)),
        )
        from dataclasses import replace

        grant = replace(grant, budget=step.budget)
        if grant.backend == "slurm":
            try:
                grant = with_account(grant, p.default_account, p.slurm_accounting)
            except AccountingError as e:
                p.budgets.release(ref)  # nothing was granted: nothing stays held
                raise Forbidden(str(e), reason="no_slurm_account") from None
        if grant.backend == "local":
            try:
                grant = replace(grant, devices=p.lease_devices(grant))
            except PortalError:
                p.budgets.release(ref)  # nothing was granted: nothing stays held
                raise
        else:  # a Slurm session: its jobs are watched here (at its site), for its user only
            cs = p.site.site_of(grant.partition)
            p.session_jobs.note_grant(
                grant.id,
                self.caller.name,
                grant.walltime_minutes,
                p.grant_ttl_seconds,
                site=cs.name if cs is not None else "",
            )
        try:
            from dataclasses import replace as _replace

            placed = _replace(step.resolved, walltime_minutes=grant.walltime_minutes)
            p.grant_ledger.open(grant, placed, self.caller.role)
        except Exception:
            p.log.exception("Ledger: opening the record of grant %s failed", grant.id)
        p.log.info(
            "Granted %s %s to %s on %s (%s)",
            grant.kind,
            grant.size["id"],
            self.caller.name,
            grant.partition,
            grant.id,
        )
        self.set_status(201)
        self.finish(grant.to_json())


class GrantHandler(_Base):
    async def delete(self, grant_id: str) -> None:
        assert self.caller is not None
        # Another user's grant id answers like an unknown one: nothing is released.
        gone = self.portal.release(grant_id, self.caller.name)
        # The session's ledger record closes (stopped); its budget hold settles from it.
        try:
            self.portal.grant_ledger.close(grant_id, "stopped", user=self.caller.name)
        except Exception:
            self.portal.log.exception("Ledger: closing the record of grant %s failed", grant_id)
        # A grant whose session never opened a ledger record gives its budget hold back.
        self.portal.budgets.release_unrecorded(f"grant:{grant_id}", self.caller.name)
        if gone:
            self.portal.log.info("Released %s of grant %s", ",".join(gone), grant_id)
        self.portal.session_jobs.forget(grant_id, self.caller.name)
        self.set_status(204)
        self.finish()


class GrantJobsHandler(_Base):
    """``PUT api/grants/<id>/jobs?jobs=a,b``: the Slurm jobs of one of the caller's
    sessions (the whole list; an empty one stops the watch). No body."""

    async def put(self, grant_id: str) -> None:
        assert self.caller is not None
        try:
            ids = parse_job_ids(self.get_query_argument("jobs", ""))
        except JobsRequestError as e:
            raise web.HTTPError(400, str(e)) from None
        if grant_id in self.portal.grant_ledger.budget_stopped:
            # stopped for its budget before its jobs were registered: nothing is recorded
            # or watched for it any more; the caller cancels its jobs
            raise Forbidden("the budget of this session is spent: it was stopped", reason="budget")
        rec = None
        if grant_id not in self.portal.session_jobs.grants:  # after a restart: its record
            rec = self.portal.grant_ledger.store.open_for(f"grant:{grant_id}")
        site = rec.site if rec is not None else ""
        view = self.portal.session_jobs.register(grant_id, self.caller.name, ids, site=site)
        if view is None:  # another user's grant answers like an unknown one
            raise web.HTTPError(404, f"no grant {grant_id} of yours")
        try:
            self.portal.grant_ledger.jobs(grant_id, ids)
        except Exception:
            self.portal.log.exception("Ledger: job ids of grant %s not recorded", grant_id)
        self.finish(view)


class JobsHandler(_Base):
    """``GET api/jobs?version=V&wait=S``: the caller's session jobs (long-poll)."""

    async def get(self) -> None:
        assert self.caller is not None
        try:
            raw_version = self.get_query_argument("version", "")
            version = parse_int(raw_version, "'version'") if raw_version else -1
            wait = parse_int(self.get_query_argument("wait", "0"), "'wait'", hi=3600)
        except ValueError as e:  # RequestRefused: the message names the field
            raise web.HTTPError(400, str(e)) from None
        jobs = self.portal.session_jobs
        self.finish(await jobs.wait(self.caller.name, version, float(wait)))


def server_of_token(user: str, scopes: list[str]) -> str | None:
    """The server a token was issued to, from its scopes (``access:servers!server=
    <user>/<name>``, what ``SERVER_TOKEN_SCOPES`` expands to); None for any other token
    (a user's own API token, a browser session): exactly one server, or none."""
    prefix = f"access:servers!server={user}/"
    names = {s[len(prefix) :] for s in scopes if isinstance(s, str) and s.startswith(prefix)}
    return names.pop() if len(names) == 1 else None


# -- configuration helpers for jupyterhub_config.py ----------------------------------------
def service_config(
    site_path: str | os.PathLike[str] | None = None,
    *,
    port: int = 10101,
    ip: str = "127.0.0.1",
    name: str = SERVICE_NAME,
    default_role: str = "student",
    residency: dict[str, list[str]] | None = None,
    extra_env: dict[str, str] | None = None,
    lease_file: str | None = None,
    inventory_source: str = "auto",
    db_url: str | None = None,
    budgets: dict[str, Any] | None = None,
    shorten_walltime: bool = False,
    slurm_accounting: bool = False,
    default_account: str = "",
    queue_snapshot_file: str = "",
) -> dict[str, Any]:
    """The ``c.JupyterHub.services`` entry that runs the portal service under the hub.

    Pass the spawner's ``lease_file`` when notebooks and sessions share a local box, and
    the hub's ``c.PortalDatabase.url`` as ``db_url`` (it travels in the environment, never
    on argv). ``budgets`` is ``{"periods": {...}, "budgets": [...]}`` as in
    ``BudgetPolicy``; ``shorten_walltime`` is ``BudgetPolicy.shorten_walltime``.
    """
    if default_role not in ROLES:
        raise ValueError(f"default_role must be one of {', '.join(ROLES)}")
    cmd = [sys.executable, "-m", "sovereign_portal.hub.service", f"--port={port}"]
    cmd.append(f"--PortalService.ip={ip}")
    cmd.append(f"--PortalService.default_role={default_role}")
    cmd.append(f"--PortalService.inventory_source={inventory_source}")
    if lease_file:
        cmd.append(f"--PortalService.lease_file={Path(lease_file).resolve()}")
    if shorten_walltime:
        cmd.append("--BudgetPolicy.shorten_walltime=True")
    if slurm_accounting:
        cmd.append("--PortalService.slurm_accounting=True")
    if queue_snapshot_file:
        cmd.append(f"--PortalService.queue_snapshot_file={Path(queue_snapshot_file).resolve()}")
    if default_account:
        from sovereign_portal.spawners.slurm.accounting import check_account

        cmd.append(f"--PortalService.default_account={check_account(default_account)}")
    if site_path:
        cmd.append(f"--site-file={Path(site_path).resolve()}")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **(extra_env or {})}
    if residency:
        # A Dict trait does not travel well as a command-line flag: use the environment.
        env[RESIDENCY_ENV] = json.dumps(residency)
    if db_url:
        env[DB_URL_ENV] = db_url
    if budgets:
        env[BUDGETS_ENV] = json.dumps(budgets)
    # The hub's SLURM_CONF, if any: the service runs Slurm clients too (the batched
    # queue poll, class reservations), and JupyterHub hands a service no other variable.
    for key in ("PYTHONPATH", "EGRESS_LOG", "SLURM_CONF"):
        if key in os.environ and key not in env:
            env[key] = os.environ[key]
    return {
        "name": name,
        "url": f"http://{ip}:{port}",
        "command": cmd,
        "environment": env,
        "display": False,
    }


def service_role(name: str = SERVICE_NAME) -> dict[str, Any]:
    """The ``load_roles`` entry for the service's own token: read users' names, groups,
    admin flag and JupyterHub roles (``portal-<role>``), which decide admission."""
    return {
        "name": f"{name}-service",
        "description": "sovereign-portal service: reads users' groups and roles for admission",
        "scopes": [
            "read:users:name",
            "read:users:groups",
            "read:users",
            "read:roles:users",
            # courses (hub/course_api.py): a roster change moves users in and out of the
            # course-<id> group at once; the end of a course stops its students' servers.
            # (CoursePolicy.server_access adds "shares": a recorded, shared access.)
            "groups",
            "servers",
            # class starts (hub/class_start_api.py): a warm server is claimed when its
            # student's browser gets an OAuth token for it (token metadata, never values)
            "read:tokens",
        ],
        "services": [name],
    }


def configure_hub(c: Any, site_path: str | None = None, **kw: Any) -> dict[str, Any]:
    """Wire the service into a JupyterHub config object ``c``, in one call.

    Adds the service, its role, the access scope on each server's token, and the
    service URL to each server's environment. Returns the service entry.
    """
    if "db_url" not in kw and "url" in c.PortalDatabase:
        kw["db_url"] = c.PortalDatabase.url  # the hub's own portal database, for budgets
    # sessions get the same --account rule as notebook servers (budgets pushed into Slurm)
    for trait in ("slurm_accounting", "default_account", "queue_snapshot_file"):
        if trait not in kw and trait in c.SlurmGPUSpawner:
            kw[trait] = c.SlurmGPUSpawner[trait]
    if "queue_snapshot_file" not in kw and c.JupyterHub.get("spawner_class") in (
        "slurm-gpu",
        "sovereign_portal.spawners.slurm.spawner.SlurmGPUSpawner",
    ):
        from sovereign_portal.spawners.slurm.spawner import SlurmGPUSpawner

        kw["queue_snapshot_file"] = SlurmGPUSpawner.queue_snapshot_file.default_value
    svc = service_config(site_path, **kw)
    name = svc["name"]
    c.JupyterHub.services = [*list(c.JupyterHub.get("services", [])), svc]
    access = f"access:services!service={name}"
    roles = [dict(r) for r in c.JupyterHub.get("load_roles", [])]
    # users must hold the access scope, else their servers' tokens cannot carry it
    user_role = next((r for r in roles if r.get("name") == "user"), None)
    if user_role is None:
        roles.append({"name": "user", "scopes": ["self", access]})
    else:
        user_role["scopes"] = [*user_role.get("scopes", ["self"]), access]
    c.JupyterHub.load_roles = [*roles, service_role(name)]
    scopes = list(c.Spawner.get("server_token_scopes", SERVER_TOKEN_SCOPES))
    scopes.append(access)
    c.Spawner.server_token_scopes = scopes
    env = dict(c.Spawner.get("environment", {}))
    env["SOVEREIGN_PORTAL_SERVICE_URL"] = f"{svc['url']}/services/{name}/"
    c.Spawner.environment = env
    return svc


def main(argv: list[str] | None = None) -> None:
    app = PortalService.instance()
    app.initialize(argv)
    app.start()


if __name__ == "__main__":
    main()

__all__ = ["DEFAULT_LIMITS", "PortalService", "configure_hub", "service_config", "service_role"]
