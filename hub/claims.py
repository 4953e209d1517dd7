"""From validated OIDC claims to a portal identity: username, home organisation, role and groups.

Pure functions over plain data (no network, no traitlets), so every rule is unit-tested. The
authenticator builds a :class:`ClaimPolicy` from its traitlets and calls :func:`map_claims`.

Group names are ``course-<id>`` (students of a course), ``instructors-<id>`` (its instructors) and
``project-<id>``. Ids match ``[a-z0-9][a-z0-9-]*``, and no prefix is a prefix of another, so two
different (kind, id) pairs can never produce the same group name.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

ROLES = ("student", "researcher", "instructor", "operator")

#: Claims and lists longer than this are cut before any use (unbounded input in logs is a DoS).
MAX_CLAIM_CHARS = 256
MAX_LIST_ITEMS = 200

ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")
ORG_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)+$")
CANONICAL_USERNAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}(@[a-z0-9][a-z0-9.-]{0,99})?$")
HASHED_SUFFIX_RE = re.compile(r"-[0-9a-f]{10}$")
# AARC-G002: urn:geant:<namespace>:group:<group>[:<subgroup>...][:role=<role>][#<authority>]
AARC_RE = re.compile(
    r"^urn:geant:(?P<ns>[^:#]+):group:(?P<path>[^#]+?)(?::role=(?P<role>[^:#]+))?(?:#(?P<auth>.+))?$"
)

COURSE_GROUP = "course-{}"
INSTRUCTOR_GROUP = "instructors-{}"
PROJECT_GROUP = "project-{}"


@dataclass(frozen=True)
class ClaimPolicy:
    """The claim-mapping rules. Defaults follow eduGAIN / REFEDS / AARC conventions."""

    allowed_organisations: frozenset[str] = frozenset()
    username_claim: str = "preferred_username"
    scope_username_with_organisation: bool = True
    home_organisation_claims: tuple[str, ...] = ("schacHomeOrganization", "schac_home_organization")
    email_claim: str = "email"
    email_verified_claim: str = "email_verified"
    affiliation_claims: tuple[str, ...] = (
        "eduPersonAffiliation",
        "eduperson_affiliation",
        "eduPersonScopedAffiliation",
        "eduperson_scoped_affiliation",
    )
    entitlement_claims: tuple[str, ...] = ("eduPersonEntitlement", "eduperson_entitlement")
    groups_claims: tuple[str, ...] = ("groups",)
    affiliation_roles: Mapping[str, str] = field(
        default_factory=lambda: {
            "student": "student",
            "faculty": "researcher",
            "staff": "researcher",
            "employee": "researcher",
        }
    )
    course_paths: frozenset[str] = frozenset({"course", "courses"})
    project_paths: frozenset[str] = frozenset({"project", "projects"})
    instructor_entitlement_roles: frozenset[str] = frozenset({"instructor", "teacher"})
    operator_entitlement_groups: frozenset[str] = frozenset({"portal:operators"})
    operator_entitlements: frozenset[str] = frozenset()
    required_entitlements: frozenset[str] = frozenset()
    trusted_entitlement_authorities: frozenset[str] = frozenset()
    support_contact: str = "your institution's IT service desk"


@dataclass(frozen=True)
class Identity:
    """Who logged in, as the portal sees it."""

    username: str
    home_organisation: str
    role: str
    courses: frozenset[str] = frozenset()
    teaching: frozenset[str] = frozenset()
    projects: frozenset[str] = frozenset()

    @property
    def groups(self) -> list[str]:
        names = [COURSE_GROUP.format(c) for c in self.courses]
        names += [INSTRUCTOR_GROUP.format(c) for c in self.teaching]
        names += [PROJECT_GROUP.format(p) for p in self.projects]
        return sorted(names)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Identity:
        """The inverse of :meth:`as_dict`."""
        return cls(
            username=str(data["username"]),
            home_organisation=str(data["home_organisation"]),
            role=str(data["role"]),
            courses=frozenset(data.get("courses", ())),
            teaching=frozenset(data.get("teaching", ())),
            projects=frozenset(data.get("projects", ())),
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "username": self.username,
            "home_organisation": self.home_organisation,
            "role": self.role,
            "courses": sorted(self.courses),
            "teaching": sorted(self.teaching),
            "projects": sorted(self.projects),
            "groups": self.groups,
        }


@dataclass(frozen=True)
class Denial:
    """A refused login. ``reason`` is a label for logs/metrics; ``message`` is for the user."""

    reason: str
    message: str
    detail: str = ""


def clip(value: Any, limit: int = 100) -> str:
    """A short printable form of an untrusted value, safe for a log line or an error page."""
    text = value if isinstance(value, str) else repr(value)
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _str_list(value: Any) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple):
        return []
    return [
        v for v in value[:MAX_LIST_ITEMS] if isinstance(v, str) and 0 < len(v) <= MAX_CLAIM_CHARS
    ]


def _first_str(claims: Mapping[str, Any], names: tuple[str, ...]) -> str | None:
    for name in names:
        values = _str_list(claims.get(name))
        if values:
            return values[0]
    return None


def _is_true(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.lower() == "true")


def home_organisation(claims: Mapping[str, Any], policy: ClaimPolicy) -> str | None:
    """``schacHomeOrganization``, else the domain of a *verified* email; lowercased, or None."""
    org = _first_str(claims, policy.home_organisation_claims)
    if org is None:
        email = _first_str(claims, (policy.email_claim,))
        if email and "@" in email and _is_true(claims.get(policy.email_verified_claim)):
            org = email.rsplit("@", 1)[1]
    if org is None:
        return None
    org = org.strip().lower().rstrip(".")
    return org if ORG_RE.match(org) else None


def normalise_username(raw: str, organisation: str, policy: ClaimPolicy) -> str:
    """A hub username that two different people can never share.

    With ``scope_username_with_organisation`` the value is scoped with the home organisation:
    ``alice`` and ``alice@<org>`` (an eduPersonPrincipalName) name the same account, and a value
    scoped with any *other* organisation is scoped again, so one institution's IdP cannot claim
    another institution's user. A value already in canonical form (lowercase ``[a-z0-9._-]``,
    one ``@domain``) is kept as is. Any other value (capitals, accents, spaces, a name that looks
    like a hashed one) becomes ``<slug>-<10 hex of sha256(value)>``; canonical names never end in
    such a suffix, so the mapping is injective up to a 40-bit hash collision.
    """
    value = raw
    if policy.scope_username_with_organisation:
        scope = raw.rsplit("@", 1)[1].lower() if "@" in raw else None
        if scope != organisation:
            # 'alice' -> 'alice@org'; 'alice@other.org' from this org's IdP is not that other
            # org's alice: it becomes 'alice@other.org@org', which is then hashed.
            value = f"{raw}@{organisation}"
    if CANONICAL_USERNAME_RE.match(value) and not HASHED_SUFFIX_RE.search(value):
        return value
    folded = unicodedata.normalize("NFKD", value).encode("ascii", "ignore").decode().lower()
    slug = re.sub(r"[^a-z0-9._-]+", "-", folded).strip("-._")[:60] or "user"
    digest = hashlib.sha256(value.encode("utf-8")).hexdigest()[:10]
    return f"{slug}-{digest}"


def _affiliations(claims: Mapping[str, Any], policy: ClaimPolicy, org: str) -> set[str]:
    found: set[str] = set()
    for name in policy.affiliation_claims:
        for value in _str_list(claims.get(name)):
            value = value.strip().lower()
            if "@" in value:  # scoped: student@uni-a.example counts only for the home organisation
                value, scope = value.split("@", 1)
                if scope != org and not scope.endswith("." + org):
                    continue
            found.add(value)
    return found


@dataclass
class _Memberships:
    courses: set[str] = field(default_factory=set)
    teaching: set[str] = field(default_factory=set)
    projects: set[str] = field(default_factory=set)
    operator: bool = False


def _memberships(claims: Mapping[str, Any], policy: ClaimPolicy, org: str) -> _Memberships:
    out = _Memberships()
    trusted = {org} | set(policy.trusted_entitlement_authorities)
    for name in policy.entitlement_claims:
        for ent in _str_list(claims.get(name)):
            if ent in policy.operator_entitlements:
                out.operator = True
            m = AARC_RE.match(ent)
            if not m or m["ns"].lower() not in trusted:
                continue
            path = m["path"].lower()
            role = (m["role"] or "member").lower()
            if path in policy.operator_entitlement_groups and role in ("member", "operator"):
                out.operator = True
                continue
            kind, _, ident = path.rpartition(":")
            if not ID_RE.match(ident):
                continue
            if kind in policy.course_paths:
                target = (
                    out.teaching if role in policy.instructor_entitlement_roles else out.courses
                )
                target.add(ident)
            elif kind in policy.project_paths:
                out.projects.add(ident)
    for name in policy.groups_claims:
        for group in _str_list(claims.get(name)):
            group = group.strip().lower()
            for prefix, target in (("course-", out.courses), ("project-", out.projects)):
                ident = group.removeprefix(prefix)
                if group.startswith(prefix) and ID_RE.match(ident):
                    target.add(ident)
    return out


def _contact(policy: ClaimPolicy) -> str:
    return f"If you think this is wrong, contact {policy.support_contact}."


def map_claims(claims: Mapping[str, Any], policy: ClaimPolicy) -> Identity | Denial:
    """Turn validated claims into an :class:`Identity`, or a :class:`Denial` that says why not."""
    org = home_organisation(claims, policy)
    if org is None or org not in policy.allowed_organisations:
        if org is None:
            why = (
                "We could not tell which institution you belong to: your identity provider sent "
                "no home organisation (schacHomeOrganization) and no verified email address."
            )
        else:
            why = f"Your institution ({clip(org, 60)}) is not connected to this portal."
        return Denial("unknown_institution", f"{why} {_contact(policy)}", detail=clip(org))

    raw = claims.get(policy.username_claim)
    if not isinstance(raw, str) or not raw.strip() or len(raw) > MAX_CLAIM_CHARS:
        return Denial(
            "no_username",
            f"Your institution did not send a usable user name ({policy.username_claim}). "
            + _contact(policy),
            detail=f"org={org}",
        )
    username = normalise_username(raw, org, policy)

    affiliations = _affiliations(claims, policy, org)
    roles = {
        policy.affiliation_roles[a]
        for a in affiliations
        if policy.affiliation_roles.get(a) in ROLES
    }
    if not roles:
        return Denial(
            "missing_affiliation",
            "Your institution did not say that you are a student or a member of staff "
            "(eduPersonAffiliation), which this portal needs to let you in. " + _contact(policy),
            detail=f"org={org} affiliations={clip(sorted(affiliations))}",
        )

    if policy.required_entitlements:
        held = {e for name in policy.entitlement_claims for e in _str_list(claims.get(name))}
        if not held & policy.required_entitlements:
            return Denial(
                "no_entitlement",
                "Your account does not hold the entitlement (eduPersonEntitlement) that this "
                "portal requires. " + _contact(policy),
                detail=f"org={org}",
            )

    mem = _memberships(claims, policy, org)
    if mem.operator:
        roles.add("operator")
    if mem.teaching:
        roles.add("instructor")
    role = max(roles, key=ROLES.index)  # the strongest role wins
    return Identity(
        username=username,
        home_organisation=org,
        role=role,
        courses=frozenset(mem.courses),
        teaching=frozenset(mem.teaching),
        projects=frozenset(mem.projects),
    )
