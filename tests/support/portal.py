"""The portal as an operator runs it: a hub configured by ``hub.portal.configure()``.

:func:`portal_stack` starts the local IdP and a :class:`~tests.support.hub.HubProcess` whose
``jupyterhub_config.py`` calls :func:`sovereign_portal.hub.portal.configure` (the function
``sovereign-portal up`` writes into its generated config): institutional login, the local GPU
spawner and the portal service on one shared device lease file. The test harness adds only
its admin service token and an external proxy.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests

from .hub import HubProcess
from .idp import LocalIdP, oidc_login
from .paths import free_port
from .stack import hub_with_idp

CONFIGURE = """
from sovereign_portal.hub.portal import configure
configure(
    c,
    state_dir={state!r},
    port={port},
    hub_port={hub_port},
    proxy_api_port={proxy_api_port},
    auth="idp",
    idp={idp!r},
    service_port={service_port},
    inventory_source="declared",
)
"""


def configure_text(hub: HubProcess, idp: LocalIdP) -> str:
    """The ``configure()`` call of an operator's config for this hub and IdP."""
    info = {
        "issuer": idp.issuer,
        "client_id": idp.client_id,
        "client_secret_file": str(idp.client_secret_file),
        "allowed_organisations": ["uni-a.example"],
    }
    return CONFIGURE.format(
        state=str(hub.dir),
        port=hub.port,
        hub_port=hub.hub_port,
        proxy_api_port=hub.proxy_api_port,
        idp=info,
        service_port=free_port(),
    )


@contextmanager
def portal_stack(workdir: Path) -> Iterator[tuple[HubProcess, LocalIdP]]:
    """The IdP and a hub configured by ``configure()``, stopped by PID afterwards.

    The callers check the egress log themselves, after their own last request.
    """
    with hub_with_idp(workdir, configure_text, check_egress=False) as stack:
        wait_portal_service(stack[0])
        yield stack


def wait_portal_service(hub: HubProcess, timeout: float = 60) -> None:
    """Until the portal service answers behind the proxy (its health route, JSON), not the
    hub's error page: the hub starts a managed service after it listens itself."""
    deadline, last = time.monotonic() + timeout, "no answer"
    while time.monotonic() < deadline:
        try:
            r = requests.get(f"{hub.url}/services/sovereign-portal", timeout=5)
            if r.status_code == 200 and r.headers.get("Content-Type", "").startswith(
                "application/json"
            ):
                assert r.json()["service"] == "sovereign-portal", r.text
                return
            last = f"{r.status_code} {r.text[:200]}"
        except requests.RequestException as e:
            last = repr(e)
        time.sleep(0.2)
    raise TimeoutError(f"the portal service did not answer in {timeout}s: {last}")


def leases(hub: HubProcess) -> dict[str, str]:
    """The shared lease file: device id -> owner."""
    path = hub.dir / "device-leases.json"
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    return {dev: lease["owner"] for dev, lease in data.get("leases", {}).items()}


class UserBrowser:
    """A user's logged-in ``requests`` session, used like a browser on their server."""

    def __init__(self, hub: HubProcess, idp: LocalIdP, username: str) -> None:
        login = oidc_login(hub.url, idp, username)
        assert login.left_deployment is None, login.left_deployment
        self.hub, self.s = hub, login.session
        self.name = f"{username}@uni-a.example"
        self.prefix = f"{hub.url}/user/{quote(self.name, safe='@')}/"

    def spawn(self, size: str, walltime_minutes: int = 60) -> None:
        """Submit the spawn form, then open JupyterLab once (the server's OAuth handshake)."""
        r = self.s.post(
            f"{self.hub.url}/hub/spawn",
            data={
                "size": size,
                "walltime_minutes": str(walltime_minutes),
                "_xsrf": self.s.cookies.get("_xsrf", path="/hub/"),
            },
            timeout=120,
        )
        assert r.status_code == 200, r.text[:500]
        self.hub.wait_ready(self.name, timeout=120)
        lab = self.s.get(self.prefix + "lab", timeout=60)
        assert lab.status_code == 200 and "JupyterLab" in lab.text, lab.text[:500]

    def xsrf(self) -> str:
        for cookie in self.s.cookies:
            if cookie.name == "_xsrf" and cookie.path.startswith("/user/"):
                return str(cookie.value)
        raise AssertionError(f"no _xsrf cookie of the server: {list(self.s.cookies)}")

    def api(self, method: str, path: str, body: Any = None) -> requests.Response:
        """Call the server's sovereign-portal REST API with the browser's cookies."""
        return self.s.request(
            method,
            self.prefix + "sovereign-portal/api/" + path,
            json=body,
            headers={"X-XSRFToken": self.xsrf()},
            timeout=60,
        )


def local_service_config(
    service_port: int, *, default_role: str = "student", home: Path | None = None
) -> str:
    """``jupyterhub_config.py`` lines for a hub with the dummy login, the local GPU spawner
    (declared devices) and the portal service on ``service_port`` (:func:`configure_hub`)."""
    lines = [
        "from sovereign_portal.hub.service import configure_hub",
        'c.JupyterHub.authenticator_class = "dummy"',
        "c.Authenticator.allow_all = True",
        'c.JupyterHub.spawner_class = "local-gpu"',
        'c.LocalGPUSpawner.inventory_source = "declared"',
    ]
    if home is not None:
        lines.append(f'c.LocalGPUSpawner.home_dir_template = "{home}/{{username}}"')
    lines.append(
        f"configure_hub(c, None, port={service_port}, default_role={default_role!r}, "
        'inventory_source="declared")'
    )
    return "\n".join(lines) + "\n"
