"""JupyterHub RBAC roles for a portal identity (used with ``Authenticator.manage_roles``).

The authenticator returns these role dicts at every login; JupyterHub creates or updates them and
strips any role the user no longer holds, so a change at the IdP takes effect at the next login.

- every user keeps JupyterHub's default ``user`` role (their own server only, the ``self`` scope);
- ``portal-<role>`` labels the portal role (scopes: ``self``);
- an instructor gets one ``instructor-<course>`` role per course taught, whose scopes are all
  filtered with ``!group=course-<course>``: they see and reach that course's students, nothing else;
- an operator gets JupyterHub's ``admin`` role.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .claims import COURSE_GROUP, Identity

#: What an instructor may do over the students of one course.
INSTRUCTOR_SCOPES = (
    "list:users",
    "read:users",
    "read:users:activity",
    "read:servers",
    "access:servers",
    "read:groups",
)

ROLE_DESCRIPTIONS = {
    "student": "Portal student: their own servers only.",
    "researcher": "Portal researcher: their own servers and project sessions.",
    "instructor": "Portal instructor: their own servers; see instructor-<course> roles.",
    "operator": "Portal operator: administers the hub.",
}


def instructor_role(course: str) -> dict[str, Any]:
    """The role that lets an instructor see and access the servers of one course's students."""
    group = COURSE_GROUP.format(course)
    return {
        "name": f"instructor-{course}",
        "description": f"See and access the servers of students in {group}.",
        "scopes": [f"{scope}!group={group}" for scope in INSTRUCTOR_SCOPES],
    }


def roles_for(
    identity: Identity,
    *,
    admin: bool = False,
    extra_scopes: Mapping[str, Sequence[str]] | None = None,
) -> list[dict[str, Any]]:
    """The complete list of roles the user must hold after this login.

    ``admin`` keeps JupyterHub's admin role for users made admins by config (``admin_users``);
    ``extra_scopes`` adds scopes to the ``portal-<role>`` roles (``{"student": [...]}``).
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
    return roles
