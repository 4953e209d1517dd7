"""A local IdP with a users file of the test's own, and a hub that logs in through it.

- :func:`idp_user`: one IdP user (login, password, ``sub``, claims) in the format of
  ``hub/idp/users.json``, a student of uni-a.example unless the claims say otherwise;
- :func:`write_users`: the sample users plus extra ones, as a users file;
- :func:`hub_with_users` (context manager): that IdP and a real hub
  (:func:`~.stack.hub_with_idp`: institutional login, the local spawner, ``extra`` config
  lines), stopped by PID afterwards, the egress log checked.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .hub import HubProcess
from .idp import LocalIdP, sample_users
from .stack import hub_with_idp, login_config


def idp_user(login: str, sub: str, preferred_username: str, **claims: Any) -> dict[str, Any]:
    """An IdP user whose password is ``pass-<login>``."""
    base = {
        "name": f"Test {login}",
        "preferred_username": preferred_username,
        "eduPersonAffiliation": ["student", "member"],
        "eduPersonEntitlement": [],
        "groups": [],
        "schacHomeOrganization": "uni-a.example",
    }
    return {
        "username": login,
        "password": f"pass-{login}",
        "sub": sub,
        "note": "test user",
        "claims": {**base, **claims},
    }


def write_users(path: Path, extra: list[dict[str, Any]], *, sample: bool = True) -> Path:
    users = [*(sample_users() if sample else []), *extra]
    path.write_text(json.dumps({"users": users}, indent=1))
    return path


def password(users_file: Path, login: str) -> str:
    users = json.loads(users_file.read_text())["users"]
    return str(next(u["password"] for u in users if u["username"] == login))


@contextmanager
def hub_with_users(
    workdir: Path, users: list[dict[str, Any]], extra: str = ""
) -> Iterator[tuple[HubProcess, LocalIdP]]:
    """:func:`~.stack.hub_with_idp` with the sample users plus ``users``, and ``extra``
    config lines."""
    workdir.mkdir(parents=True, exist_ok=True)
    users_file = write_users(workdir / "users.json", users)
    with hub_with_idp(workdir, login_config(extra), idp_kw={"users_file": users_file}) as s:
        yield s


# -- courses (issue 12): two courses, five students, one TA, two instructors ------------------
def _course_ent(course: str, role: str | None = None) -> str:
    r = f":role={role}" if role else ""
    return f"urn:geant:uni-a.example:group:course:{course}{r}#uni-a.example"


#: Students of ml101 and cv202 by IdP entitlement (``s5`` in both; ``s4`` in none: an
#: instructor adds them by identifier), a TA (a student by affiliation, made TA of ml101 by
#: the course record), and an instructor of each course (``ines`` by entitlement as well,
#: ``igor`` only by the course record).
COURSE_USERS = [
    idp_user("s1", "sub-s1", "s1", eduPersonEntitlement=[_course_ent("ml101")]),
    idp_user("s2", "sub-s2", "s2", eduPersonEntitlement=[_course_ent("ml101")]),
    idp_user("s3", "sub-s3", "s3", eduPersonEntitlement=[_course_ent("cv202")]),
    idp_user("s4", "sub-s4", "s4"),
    idp_user(
        "s5", "sub-s5", "s5", eduPersonEntitlement=[_course_ent("ml101"), _course_ent("cv202")]
    ),
    idp_user("tara", "sub-tara", "tara"),
    idp_user(
        "ines",
        "sub-ines",
        "ines",
        eduPersonAffiliation=["faculty", "member"],
        eduPersonEntitlement=[_course_ent("ml101", "instructor")],
    ),
    idp_user("igor", "sub-igor", "igor", eduPersonAffiliation=["faculty", "member"]),
]
