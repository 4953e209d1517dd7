"""Admission of compute-session requests: a pure policy function and the Grant it writes.

The portal service (:mod:`.service`) calls :func:`admit` with the caller's identity and a
raw request (a JSON object from the notebook). Nothing here does I/O: the same inputs
always give the same Grant or the same refusal, so the policy is tested as a table.

Checks, in order: the request's shape (:func:`~sovereign_portal.spawners.request.parse_request`),
the partitions open to the caller (groups and residency,
:func:`~sovereign_portal.spawners.policy.allowed_partitions`), the placement on the site
(:func:`~sovereign_portal.spawners.request.resolve`), the session kind's own rules, and the
caller's role limits, then the budget step (``budget=``, :mod:`.budget_store`).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from sovereign_portal.spawners.placement import session_partitions
from sovereign_portal.spawners.policy import allowed_partitions, open_partition_names
from sovereign_portal.spawners.request import (
    Request,
    RequestError,
    Resolved,
    parse_request,
    resolve,
)
from sovereign_portal.spawners.site import Partition, Site
from sovereign_portal.spawners.sizes import max_nodes, partition_sizes, size_eur_per_hour

from .claims import ROLES

SESSION_KINDS = ("dask", "torch")


class AdmissionError(RequestError):
    """A well-formed request that policy refuses (HTTP 403; 409 when ``reason="busy"``).

    The message says why.
    """

    default_status = 403

    def __init__(self, message: str, reason: str = "forbidden", **kw: Any) -> None:
        kw.setdefault("status", 409 if reason == "busy" else None)
        super().__init__(message, reason, **kw)


@dataclass(frozen=True)
class Caller:
    """Who asks: the JupyterHub user name, their groups and their portal role."""

    name: str
    groups: frozenset[str] = frozenset()
    role: str = "student"
    #: the [[sites]] entry the asking notebook server runs at ("" when not known)
    site: str = ""


@dataclass(frozen=True)
class RoleLimits:
    """What one role may ask for in one compute session."""

    kinds: frozenset[str]
    rungs: frozenset[str] = frozenset({"slice", "gpus", "node", "nodes"})
    max_gpus: float = 64.0  # GPU equivalents of the whole session (slices count N/7)
    max_walltime_minutes: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "kinds": sorted(self.kinds),
            "rungs": sorted(self.rungs),
            "max_gpus": self.max_gpus,
            "max_walltime_minutes": self.max_walltime_minutes,
        }


DEFAULT_LIMITS: dict[str, RoleLimits] = {
    "student": RoleLimits(
        kinds=frozenset({"dask"}),
        rungs=frozenset({"slice", "gpus"}),
        max_gpus=1.0,
        max_walltime_minutes=240,
    ),
    "researcher": RoleLimits(kinds=frozenset(SESSION_KINDS), max_gpus=64.0),
    "instructor": RoleLimits(kinds=frozenset(SESSION_KINDS), max_gpus=64.0),
    "operator": RoleLimits(kinds=frozenset(SESSION_KINDS), max_gpus=1024.0),
}


#: JupyterHub role that labels a portal role, as the institutional login assigns it
#: (:mod:`.rbac`): ``portal-student``, ``portal-researcher``, ...
PORTAL_ROLE_PREFIX = "portal-"


def role_of(
    groups: Iterable[str],
    admin: bool = False,
    role_groups: Mapping[str, str] | None = None,
    default: str = "student",
    hub_roles: Iterable[str] = (),
) -> str:
    """The strongest portal role a user holds.

    Sources, strongest wins: the JupyterHub admin flag (operator); the user's JupyterHub
    roles named ``portal-<role>`` (set at each institutional login from the IdP's
    claims); and groups that confer a role (``role_groups`` maps group → role; by
    default the groups named after the roles). Anything else gets ``default``.
    """
    if admin:
        return "operator"
    mapping = dict(role_groups) if role_groups is not None else {r: r for r in ROLES}
    found = {mapping[g] for g in groups if g in mapping}
    for name in hub_roles:
        role = name.removeprefix(PORTAL_ROLE_PREFIX)
        if name.startswith(PORTAL_ROLE_PREFIX) and role in ROLES:
            found.add(role)
    for role in reversed(ROLES):
        if role in found:
            return role
    return default


@dataclass(frozen=True)
class Grant:
    """The hub's answer to a compute request: where, as whom, with which exact arguments."""

    id: str
    user: str
    kind: str
    request: dict[str, Any]
    partition: str
    backend: str
    country: str
    node_type: str
    size: dict[str, Any]
    count: int
    jobs: int
    nodes_per_job: int
    devices_per_node: int
    workers: int
    account: str | None
    qos: str | None
    scheduler_partition: str
    scheduler_args: list[str]
    walltime_minutes: int
    eur_per_hour: float
    cost: dict[str, float]
    issued_at: float
    expires_at: float
    devices: list[str] = field(default_factory=list)
    #: The budget this grant charges (``course:ml101@2026-autumn``), None without one.
    budget: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _session_shape(req: Request, r: Resolved) -> tuple[int, int]:
    """(jobs, nodes per job) for a session, or a RequestError saying what fits."""
    size, part, nt = r.size, r.partition, r.node_type
    if req.kind == "dask":
        # nodes > 1 is refused for Dask by spawners.request.check_fields_for_kind
        if part.backend == "local" and req.count > 1:
            raise RequestError(
                f"partition {part.name!r} is one box: ask for one size with more GPUs "
                "(gpus=2, 4 or 8) instead of count > 1"
            )
        return req.count, 1
    # torch: one gang-scheduled job; `count` copies of a one-node size become nodes.
    nodes = size.nodes * req.count
    if size.nodes > 1 and req.count > 1:
        raise RequestError(f"ask for nodes={nodes} with count=1, not both nodes and count")
    if part.backend == "local" and nodes > 1:
        raise RequestError(
            f"partition {part.name!r} is one box: a torch session there is one node, count=1"
        )
    top = max(max_nodes(part, nt), nt.count if part.backend == "slurm" else 1)
    if nodes > top:
        raise RequestError(
            f"partition {part.name!r} has {top} node(s) of {nt.name}: "
            f"{nodes} nodes cannot be granted"
        )
    return 1, nodes


def scheduler_args(r: Resolved, nodes_per_job: int) -> list[str]:
    """Exact sbatch arguments for one job of a granted session (argv items, no shell)."""
    size, part = r.size, r.partition
    args = [a for a in size.slurm_args(r.node_type) if not a.startswith("--nodes=")]
    args.insert(0, f"--nodes={nodes_per_job}")
    args.append(f"--partition={part.scheduler_partition}")
    if part.account:
        args.append(f"--account={part.account}")
    if part.qos:
        args.append(f"--qos={part.qos}")
    args.append(f"--time={r.walltime_minutes}")
    return args


def admit(
    site: Site,
    raw: Any,
    caller: Caller,
    *,
    residency: Mapping[str, Iterable[str]] | None = None,
    limits: Mapping[str, RoleLimits] | None = None,
    ttl_seconds: int = 300,
    now: float | None = None,
    grant_id: str | None = None,
    budget: Callable[[Resolved], int] | None = None,
) -> Grant:
    """Admit a raw compute request for ``caller`` and write its Grant.

    ``budget``, when given, is the budget step (:mod:`.budget_store`): called with the
    placed request after every other check, it holds what the request may cost and returns
    the walltime to grant (the asked one, or a shortened one that fits), or raises
    :class:`AdmissionError` (reason ``budget``) saying what is left and what would fit.

    Raises :class:`RequestError` for a malformed or impossible request (HTTP 400) and
    :class:`AdmissionError` when policy refuses it (HTTP 403). Both messages are safe to
    show the user and say what is allowed.
    """
    req = parse_request(raw)
    if req.kind not in SESSION_KINDS:
        raise RequestError(
            f"a compute session is 'dask' or 'torch', not {req.kind!r}", reason="kind"
        )
    lim = (limits or DEFAULT_LIMITS).get(caller.role)
    if lim is None:
        raise AdmissionError(f"role {caller.role!r} may not start compute sessions", "role")
    if req.kind not in lim.kinds:
        raise AdmissionError(
            f"your role ({caller.role}) may not start {req.kind} sessions; allowed: "
            + (", ".join(sorted(lim.kinds)) or "none"),
            reason="role",
        )
    parts = allowed_partitions(site, caller.groups, residency)
    # a session runs at its notebook's site (never spans sites; residency already holds)
    parts = session_partitions(site, parts, caller.site, req.partition, AdmissionError)
    names = open_partition_names(site, parts, req.partition, AdmissionError)
    r = resolve(site, req, default_partition=names[0])
    jobs, nodes_per_job = _session_shape(req, r)
    if r.size.rung not in lim.rungs:
        raise AdmissionError(
            f"your role ({caller.role}) may not use {r.size.label}; allowed sizes: "
            + ", ".join(sorted(lim.rungs)),
            reason="role",
        )
    gpus = r.size.gpu_fraction * req.count
    if gpus > lim.max_gpus + 1e-9:
        raise AdmissionError(
            f"{gpus:g} GPUs is over your role's limit of {lim.max_gpus:g} per session "
            f"({caller.role}); ask for fewer",
            reason="role",
        )
    if lim.max_walltime_minutes is not None and r.walltime_minutes > lim.max_walltime_minutes:
        raise AdmissionError(
            f"walltime {r.walltime_minutes} min is over your role's limit of "
            f"{lim.max_walltime_minutes} min",
            reason="walltime",
        )
    if budget is not None:
        minutes = budget(r)
        if minutes != r.walltime_minutes:
            r = replace(r, walltime_minutes=minutes)
    t = time.time() if now is None else now
    per_node = r.size.devices_per_node
    return Grant(
        id=grant_id or secrets.token_hex(8),
        user=caller.name,
        kind=req.kind,
        request=req.model_dump(exclude_none=True),
        partition=r.partition.name,
        backend=r.partition.backend,
        country=r.partition.jurisdiction.country,
        node_type=r.node_type.name,
        size=r.size.to_json(r.node_type),
        count=req.count,
        jobs=jobs,
        nodes_per_job=nodes_per_job,
        devices_per_node=per_node,
        workers=jobs * nodes_per_job * per_node,
        account=r.partition.account,
        qos=r.partition.qos,
        scheduler_partition=r.partition.scheduler_partition,
        scheduler_args=scheduler_args(r, nodes_per_job),
        walltime_minutes=r.walltime_minutes,
        eur_per_hour=r.eur_per_hour,
        cost=r.cost_json(),
        issued_at=t,
        expires_at=t + ttl_seconds,
    )


def _partition_json(p: Partition, lim: RoleLimits) -> dict[str, Any]:
    sizes = []
    for s in partition_sizes(p):
        if s.rung not in lim.rungs or s.gpu_fraction > lim.max_gpus + 1e-9:
            continue
        nt = p.node_type(s.node_type)
        unit = size_eur_per_hour(p, s)
        sizes.append({**s.to_json(nt), "eur_per_hour": round(unit, 4), "max_count": nt.count})
    return {
        "name": p.name,
        "backend": p.backend,
        "description": p.description,
        "country": p.jurisdiction.country,
        "operator": p.jurisdiction.operator,
        "carbon_g_per_kwh": p.carbon_g_per_kwh,
        "default_walltime_minutes": p.default_walltime_minutes,
        "max_walltime_minutes": min(p.max_walltime_minutes, lim.max_walltime_minutes or 10**9),
        "sizes": sizes,
    }


def catalog_for(
    site: Site,
    caller: Caller,
    *,
    residency: Mapping[str, Iterable[str]] | None = None,
    limits: Mapping[str, RoleLimits] | None = None,
) -> dict[str, Any]:
    """The catalog this caller may ask from: partitions, sizes with € rates, role limits."""
    lim = (limits or DEFAULT_LIMITS).get(caller.role) or RoleLimits(kinds=frozenset())
    parts = allowed_partitions(site, caller.groups, residency) if lim.kinds else []
    return {
        "user": caller.name,
        "role": caller.role,
        "limits": lim.to_json(),
        "kinds": sorted(lim.kinds),
        "partitions": [_partition_json(p, lim) for p in parts],
    }
