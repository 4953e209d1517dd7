"""The portal service under a real JupyterHub: wiring, HubAuth with the user's token, roles."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.support.hub import HubProcess
from tests.support.paths import free_port

pytestmark = [pytest.mark.hub, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    port = free_port()
    config = f"""
from sovereign_portal.hub.service import configure_hub
c.JupyterHub.authenticator_class = "dummy"
c.Authenticator.allow_all = True
configure_hub(c, None, port={port}, default_role="student")
"""
    h = HubProcess(Path(tmp_path_factory.mktemp("hub-sessions")), config).start()
    for user in ("rita", "sam"):
        h.ensure_user(user)
    r = h.api("POST", "/groups/researcher", json={"users": ["rita"]})
    assert r.status_code in (201, 409), r.text
    if r.status_code == 409:
        h.api("POST", "/groups/researcher/users", json={"users": ["rita"]})
    yield h
    h.close()
    h.assert_no_egress()


def token(hub: HubProcess, user: str, scopes: list[str]) -> str:
    r = hub.api("POST", f"/users/{user}/tokens", json={"scopes": scopes})
    assert r.status_code == 201, r.text
    return str(r.json()["token"])


def svc(hub: HubProcess, method: str, path: str, tok: str, **kw: object) -> requests.Response:
    url = f"{hub.url}/services/sovereign-portal/api/{path}"
    return requests.request(
        method,
        url,
        headers={"Authorization": f"token {tok}"},
        timeout=30,
        **kw,  # type: ignore[arg-type]
    )


def wait_service(hub: HubProcess, tok: str) -> requests.Response:
    return hub.wait_for(
        lambda: (
            ((r := svc(hub, "GET", "catalog", tok)).status_code not in (404, 503) and r) or None
        ),
        30,
        "the portal service",
    )


SCOPE = ["access:services!service=sovereign-portal"]


def test_catalog_and_grant_with_the_users_own_token(hub: HubProcess) -> None:
    tok = token(hub, "rita", SCOPE)
    r = wait_service(hub, tok)
    assert r.status_code == 200, r.text
    cat = r.json()
    assert cat["user"] == "rita" and cat["role"] == "researcher"
    assert cat["kinds"] == ["dask", "torch"]
    g = svc(hub, "POST", "grants", tok, json={"kind": "torch", "gpus": 2})
    assert g.status_code == 201, g.text
    assert g.json()["user"] == "rita" and len(g.json()["devices"]) == 2
    assert svc(hub, "DELETE", f"grants/{g.json()['id']}", tok).status_code == 204


def test_a_student_is_refused_torch_with_the_reason(hub: HubProcess) -> None:
    tok = token(hub, "sam", SCOPE)
    wait_service(hub, tok)
    r = svc(hub, "POST", "grants", tok, json={"kind": "torch", "gpus": 1})
    assert r.status_code == 403 and "may not start torch" in r.json()["error"]


def test_tokens_without_the_service_scope_are_refused(hub: HubProcess) -> None:
    wait_service(hub, token(hub, "rita", SCOPE))
    tok = token(hub, "rita", ["read:users:name!user=rita"])
    r = svc(hub, "GET", "catalog", tok)
    assert r.status_code == 403
    assert svc(hub, "GET", "catalog", "not-a-token").status_code == 403
    assert tok not in hub.log_text()
