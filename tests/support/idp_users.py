"""A local IdP with a users file of the test's own, and a hub that logs in through it.

- :func:`idp_user`: one IdP user (login, password, ``sub``, claims) in the format of
  ``hub/idp/users.json``, a student of uni-a.example unless the claims say otherwise;
- :func:`write_users`: the sample users plus extra ones, as a users file;
- :func:`hub_with_users` (context manager): that IdP and a real hub (institutional login, the
  local spawner, ``extra`` config lines), stopped by PID afterwards, the egress log checked.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .hub import HubProcess
from .idp import LocalIdP, hub_auth_config, sample_users

LOCAL_SPAWN = """
c.JupyterHub.spawner_class = "local-gpu"
c.LocalGPUSpawner.inventory_source = "declared"
c.LocalGPUSpawner.home_dir_template = "{home}/{{username}}"
"""


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
    workdir: Path, users: list[dict[str, Any]], extra: str = "", **idp_kw: Any
) -> Iterator[tuple[HubProcess, LocalIdP]]:
    workdir.mkdir(parents=True, exist_ok=True)
    users_file = write_users(workdir / "users.json", users)
    hub = HubProcess(workdir / "hub")
    idp = LocalIdP(
        workdir / "idp", [f"{hub.url}/hub/oauth_callback"], users_file=users_file, **idp_kw
    )
    idp.start()
    try:
        config = hub_auth_config(idp, LOCAL_SPAWN.format(home=hub.dir / "home") + extra)
        hub.config_path.write_text(hub.config_path.read_text() + config)
        hub.start()
        try:
            yield hub, idp
        finally:
            hub.close()
            hub.assert_no_egress()
    finally:
        idp.stop()
