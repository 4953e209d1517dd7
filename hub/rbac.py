"""JupyterHub RBAC roles for a portal identity (used with ``Authenticator.manage_roles``).

The authenticator returns these role dicts at every login; JupyterHub creates or updates them and
strips any role the user no longer holds, so a change at the IdP takes effect at the next login.

- every user keeps JupyterHub's default ``user`` role (their own server only, the ``self`` scope);
- ``portal-<role>`` labels the portal role (scopes: ``self``);
- an instructor gets one ``instructor-<course>`` role per course taught, a teaching assistant
  one ``ta-<course>`` role per course assisted (the IdP's instructor entitlements and the
  portal's course records, :mod:`.course_store`); their scopes are all filtered with
  ``!group=course-<course>``: they list that course's students, see their servers and start
  and stop them, nothing else. Neither holds ``access:servers``: opening a student's server
  is a recorded share, where the course allows it (:mod:`.course_api`). Never admin;
- an operator gets JupyterHub's ``admin`` role.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .claims import COURSE_GROUP, Identity

#: What course staff (instructors and TAs) may do over the students of one course: list
#: them, see them and their servers, start and stop those servers. Not access:servers.
INSTRUCTOR_SCOPES = (
    "list:users",
    "read:users",
    "read:users:activity",
    "read:servers",
    "servers",
    "read:groups",
)

ROLE_DESCRIPTIONS = {
    "student": "Portal student: their own servers only.",
    "researcher": "Portal researcher: their own servers and project sessions.",
    "instructor": "Portal instructor: their own servers; see instructor-<course> roles.",
    "operator": "Portal operator: administers the hub.",
}


def instructor_role(course: str, kind: str = "instructor") -> dict[str, Any]:
    """The role that lets course staff (``kind``: instructor or ta) see one course's
    students and start and stop their servers."""
    group = COURSE_GROUP.format(course)
    who = "an instructor" if kind == "instructor" else "a teaching assistant"
    return {
        "name": f"{kind}-{course}",
        "description": f"As {who} of {course}: see the students in {group}, start and stop "
        "their servers.",
        "scopes": [f"{scope}!group={group}" for scope in INSTRUCTOR_SCOPES],
    }


def ta_role(course: str) -> dict[str, Any]:
    """The role of a teaching assistant of ``course``: the instructor's scopes."""
    return instructor_role(course, "ta")


def roles_for(
    identity: Identity,
    *,
    admin: bool = False,
    extra_scopes: Mapping[str, Sequence[str]] | None = None,
    assisting: Iterable[str] = (),
) -> list[dict[str, Any]]:
    """The complete list of roles the user must hold after this login.

    ``admin`` keeps JupyterHub's admin role for users made admins by config (``admin_users``);
    ``extra_scopes`` adds scopes to the ``portal-<role>`` roles (``{"student": [...]}``);
    ``assisting`` names the courses where the user is a teaching assistant.
    """
    roles: list[dict[str, Any]] = [{"name": "user"}]
    extra = list((extra_scopes or {}).get(identity.role, ()))
    roles.append(
        {
            "name": f"portal-{identity.role}",
            "description": ROLE_DESCRIPTIONS[identity.role],
            "scopes": ["self", *extra],
        }
    )
    if admin or identity.role == "operator":
        roles.append({"name": "admin"})
    roles.extend(instructor_role(course) for course in sorted(identity.teaching))
    roles.extend(ta_role(c) for c in sorted(set(assisting) - set(identity.teaching)))
    return roles
