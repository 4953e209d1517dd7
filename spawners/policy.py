"""Which partitions a user may use: groups and residency rules. Pure functions."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from .errors import RequestRefused
from .site import Partition, Site

NO_PARTITION = (
    "no partition of this site is open to you: ask your instructor or the operators to add "
    "you to a project"
)


def residency_countries(
    groups: Iterable[str], residency: Mapping[str, Iterable[str]]
) -> set[str] | None:
    """The countries a user's work may run in, or ``None`` for no restriction.

    ``residency`` maps a group (a project or course) to the countries its data may go to.
    A user in several restricted groups gets the intersection: every rule must hold.
    """
    allowed: set[str] | None = None
    for g in groups:
        if g in residency:
            countries = {c.upper() for c in residency[g]}
            allowed = countries if allowed is None else allowed & countries
    return allowed


def allowed_partitions(
    site: Site,
    groups: Iterable[str],
    residency: Mapping[str, Iterable[str]] | None = None,
    backend: str | None = None,
) -> list[Partition]:
    """Partitions of ``backend`` that a member of ``groups`` may use, in site order."""
    groups = set(groups)
    countries = residency_countries(groups, residency or {})
    out = []
    for p in site.partitions:
        if backend is not None and p.backend != backend:
            continue
        if p.allowed_groups and not groups & set(p.allowed_groups):
            continue
        if countries is not None and p.jurisdiction.country not in countries:
            continue
        out.append(p)
    return out


def open_partition_names(
    site: Site,
    parts: list[Partition],
    requested: str | None,
    error: type[RequestRefused] = RequestRefused,
) -> list[str]:
    """The names of ``parts`` (the partitions open to the caller), after checking that there
    is one and that ``requested`` is one of them; else ``error`` saying what is allowed.

    The one rule of "partition open to you", for notebook servers and compute sessions."""
    if not parts:
        raise error(NO_PARTITION, reason="no_partition", field="partition")
    names = [p.name for p in parts]
    if requested is not None and requested not in names:
        known = requested in {p.name for p in site.partitions}
        why = "is not open to you" if known else "does not exist"
        raise error(
            f"partition {requested!r} {why}; you may use: {', '.join(names)}",
            reason="partition" if known else "unknown_partition",
            field="partition",
        )
    return names
