"""Placement: which site and partition a request runs on, and why. A pure function.

:func:`place` takes the request's needs (:class:`Need`), the caller's residency rules
(:class:`Rule`, from their courses and projects), the user's choice (a partition or a site,
and what to prefer), and each site's state right now (:class:`SiteState`: reachable, free
devices per partition, queue estimate), and answers a :class:`Placement` (site,
partition, a why-string, queued or not) or raises :class:`PlacementRefused`.

The order of the rules is fixed:

1. **Residency**: a partition whose country is outside any rule's countries is never a
   candidate, whatever else holds (a user's choice of it is refused, naming the rule);
2. **the user's choice**: a named partition or site is used if rule 1 allows it;
3. **then the site states**: only reachable sites are offered; among the allowed
   candidates, one with free devices for the request before one without; then by the
   user's preference (``soonest``: shortest queue, then price, then carbon; ``cheapest``:
   price first; ``greenest``: gCO2/kWh first); ties by site-file order.

When every allowed, reachable candidate is full, the request *queues* on the allowed one
with the shortest queue, with a message that says so: it never moves to a forbidden site.
When no allowed site is reachable, the request is refused and the message names the sites
that are down. ``tests/unit/test_placement.py`` checks these as properties over generated
site files, rules and states.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from .errors import RequestRefused
from .site import Partition, Site

Preference = Literal["soonest", "cheapest", "greenest"]
PREFERENCES: tuple[str, ...] = ("soonest", "cheapest", "greenest")

#: The name of the hub host's own cluster when the site file declares no [[sites]].
HOST_SITE = "local"


class PlacementRefused(RequestRefused):
    """No allowed site can take the request: the message says why (safe to show)."""


@dataclass(frozen=True)
class Rule:
    """A residency rule: ``owner_kind`` ``owner`` (a course or project) allows ``countries``.

    ``label`` is how the rule is named to users ("FR-only", "EU")."""

    owner_kind: str
    owner: str
    countries: frozenset[str]
    label: str = ""

    @property
    def name(self) -> str:
        label = self.label or (
            f"{next(iter(self.countries))}-only"
            if len(self.countries) == 1
            else "/".join(sorted(self.countries))
        )
        return f"{self.owner_kind} {self.owner}'s {label} rule"


@dataclass(frozen=True)
class SiteState:
    """One site right now: does it answer, free devices per partition, queue estimate."""

    reachable: bool = True
    #: Devices of the request's kind free now, by partition name (absent: 0).
    free: Mapping[str, int] = field(default_factory=dict)
    #: Estimated wait in minutes of a new job, by partition (absent: 0 when free, else
    #: the number of pending jobs, as a rough order).
    queue_minutes: Mapping[str, float] = field(default_factory=dict)
    #: Why the site cannot be reached (shown to users).
    why: str = ""


@dataclass(frozen=True)
class Need:
    """What the request needs: devices per job, and the partitions that offer its size
    (None: every partition of the caller's groups)."""

    devices: int = 1
    fits: frozenset[str] | None = None


@dataclass(frozen=True)
class Placement:
    """Where a request runs and why (the why-string is shown on the spawn page)."""

    site: str
    partition: str
    country: str
    why: str
    queued: bool = False
    #: Sites left out because they did not answer (the form says so).
    unreachable: tuple[str, ...] = ()


def site_name(site: Site, p: Partition) -> str:
    return p.site if p.site is not None else HOST_SITE


def residency_rules(
    groups: Iterable[str],
    residency: Mapping[str, Iterable[str]],
    kinds: Mapping[str, str] | None = None,
    labels: Mapping[str, str] | None = None,
) -> list[Rule]:
    """The :class:`Rule` of each of ``groups`` that ``residency`` restricts (group ->
    countries, as :func:`.policy.residency_countries` reads it); ``kinds`` names a group's
    kind ("course", "project"; default "project") and ``labels`` its rule's label."""
    kinds = kinds or {}
    labels = labels or {}
    out = []
    for g in sorted(set(groups)):
        if g in residency:
            countries = frozenset(c.upper() for c in residency[g])
            out.append(Rule(kinds.get(g, "project"), g, countries, labels.get(g, "")))
    return out


def _allowed_by(p: Partition, rules: Sequence[Rule]) -> Rule | None:
    """The first rule that forbids ``p``, or None when every rule allows it."""
    for r in rules:
        if p.jurisdiction.country not in r.countries:
            return r
    return None


def _reason(rules: Sequence[Rule], country: str) -> str:
    if not rules:
        return "no residency rule applies to you"
    names = [r.name for r in rules]
    return "allowed by " + " and ".join(names)


def place(
    site: Site,
    need: Need,
    rules: Sequence[Rule],
    states: Mapping[str, SiteState],
    *,
    groups: Iterable[str] = (),
    partition: str | None = None,
    site_choice: str | None = None,
    prefer: str = "soonest",
    backend: str = "slurm",
) -> Placement:
    """Place a request (see the module doc for the order of the rules). Pure.

    ``states`` maps a site name (``HOST_SITE`` for partitions without one) to its state;
    a site missing from ``states`` counts as unreachable (never a guess that it is up).
    Raises :class:`PlacementRefused` with a message naming the rule or the down sites."""
    if prefer not in PREFERENCES:
        raise PlacementRefused(
            f"prefer {prefer!r} is not one of {', '.join(PREFERENCES)}", field="prefer"
        )
    groups = set(groups)
    parts = [
        p
        for p in site.partitions
        if p.backend == backend
        and (not p.allowed_groups or groups & set(p.allowed_groups))
        and (need.fits is None or p.name in need.fits)
    ]
    if not parts:
        raise PlacementRefused(
            "no partition open to you offers this size", reason="no_partition", field="size"
        )
    # 1. residency: forbidden partitions are gone, and a choice of one is refused.
    allowed = [p for p in parts if _allowed_by(p, rules) is None]
    if partition is not None:
        chosen = [p for p in parts if p.name == partition]
        if not chosen:
            names = ", ".join(p.name for p in parts)
            raise PlacementRefused(
                f"partition {partition!r} does not offer this size to you; you may use: {names}",
                reason="partition",
                field="partition",
            )
        rule = _allowed_by(chosen[0], rules)
        if rule is not None:
            raise PlacementRefused(
                f"partition {partition!r} is in {chosen[0].jurisdiction.country}, which "
                f"{rule.name} does not allow ({'/'.join(sorted(rule.countries))} only)",
                reason="residency",
                field="partition",
            )
        allowed = chosen
    if site_choice is not None:
        known = {site_name(site, p) for p in parts}
        if site_choice not in known:
            raise PlacementRefused(
                f"site {site_choice!r} does not offer this size to you; sites: "
                f"{', '.join(sorted(known))}",
                reason="site",
                field="site",
            )
        in_site = [p for p in allowed if site_name(site, p) == site_choice]
        if not in_site:
            forbidden = next(p for p in parts if site_name(site, p) == site_choice)
            rule = _allowed_by(forbidden, rules)
            why = f", which {rule.name} does not allow" if rule is not None else ""
            raise PlacementRefused(
                f"site {site_choice!r} is in {forbidden.jurisdiction.country}{why}",
                reason="residency",
                field="site",
            )
        allowed = in_site
    if not allowed:
        countries = sorted({p.jurisdiction.country for p in parts})
        raise PlacementRefused(
            f"your work may run only in {_countries(rules)} ({_reason(rules, '')}), and no "
            f"partition there offers this size; this size runs in: {', '.join(countries)}",
            reason="residency",
        )
    # 2-3. reachable sites only; free before full; then the preference.
    down = sorted({site_name(site, p) for p in allowed if not _state(states, site, p).reachable})
    up = [p for p in allowed if _state(states, site, p).reachable]
    if not up:
        detail = "; ".join(
            f"{s}: {(states.get(s) or SiteState(False)).why or 'does not answer'}" for s in down
        )
        raise PlacementRefused(
            f"no site allowed to you can be reached right now ({detail}); try again later",
            reason="site_unreachable",
        )
    order = {p.name: i for i, p in enumerate(site.partitions)}

    def price(p: Partition) -> float:
        return min(p.price_eur_per_gpu_hour.values())

    def queue(p: Partition) -> float:
        return float(_state(states, site, p).queue_minutes.get(p.name, 0.0))

    def key(p: Partition) -> tuple[float, ...]:
        full = 0.0 if _state(states, site, p).free.get(p.name, 0) >= need.devices else 1.0
        if prefer == "cheapest":
            rest: tuple[float, ...] = (price(p), queue(p), p.carbon_g_per_kwh)
        elif prefer == "greenest":
            rest = (p.carbon_g_per_kwh, queue(p), price(p))
        else:
            rest = (queue(p), price(p), p.carbon_g_per_kwh)
        return (full, *rest, float(order[p.name]))

    ranked = sorted(up, key=key)
    best = ranked[0]
    queued = key(best)[0] == 1.0
    sname = site_name(site, best)
    country = best.jurisdiction.country
    head = f"{best.name} at site {sname} ({country}): {_reason(rules, country)}"
    if partition is not None:
        head += "; the partition you chose"
    elif site_choice is not None:
        head += "; the site you chose"
    if queued:
        why = (
            f"{head}; every allowed site is full, so the request waits in this queue "
            f"(about {queue(best):.0f} min)"
        )
        if rules:
            why += "; it never moves to a site your rules forbid"
    elif len(ranked) == 1:
        why = head + ("; the only allowed site with room" if down else "")
    elif sum(1 for p in ranked if key(p)[0] == 0.0) == 1:
        why = f"{head}; the only allowed site with room now"
    else:
        criterion = {
            "soonest": "shortest queue",
            "cheapest": "lowest price",
            "greenest": "lowest carbon intensity",
        }[prefer]
        why = f"{head}; {criterion}"
    if down:
        why += f" ({', '.join(down)} cannot be reached now)"
    return Placement(sname, best.name, country, why, queued, tuple(down))


def _state(states: Mapping[str, SiteState], site: Site, p: Partition) -> SiteState:
    return states.get(site_name(site, p)) or SiteState(reachable=False)


def _countries(rules: Sequence[Rule]) -> str:
    allowed: set[str] | None = None
    for r in rules:
        allowed = set(r.countries) if allowed is None else allowed & r.countries
    return "/".join(sorted(allowed or ())) or "no country"


def session_partitions(
    site: Site,
    parts: Sequence[Partition],
    notebook_site: str,
    requested: str | None,
    error: type[RequestRefused] = PlacementRefused,
) -> list[Partition]:
    """The partitions a compute session of a notebook at ``notebook_site`` may use, out of
    ``parts`` (those residency and groups already allow). Pure.

    A session runs at its notebook's site: its jobs are submitted from the notebook's own
    node with that site's scheduler, so one session never spans sites. Without [[sites]],
    or when the notebook's site is not known (a local server), ``parts`` is the answer.
    Raises ``error`` (field ``partition``) when the request names a partition at another
    site, or when the notebook's site has no partition the caller's rules allow (the
    session is refused; it never moves to another site)."""
    declared = {s.name: s for s in site.sites}
    if notebook_site not in declared:
        return list(parts)
    here = declared[notebook_site]
    where = f"{here.name} ({here.country})"
    home = [p for p in parts if p.site == notebook_site]
    by_name = {p.name: p for p in parts}
    if requested is not None and requested in by_name and requested not in {p.name for p in home}:
        other = by_name[requested].site or HOST_SITE
        raise error(
            f"partition {requested!r} is at site {other}; a compute session runs at its "
            f"notebook's site, {where}"
            + (f": choose one of {', '.join(p.name for p in home)}" if home else ""),
            reason="site",
            field="partition",
        )
    if not home:
        raise error(
            f"your notebook runs at site {where}, where your rules allow no partition for a "
            "compute session; a session never runs at another site than its notebook's "
            "(start your notebook at a site your rules allow)",
            reason="residency",
            field="partition",
        )
    return home
