"""The strict input path under a real JupyterHub, its configurable-http-proxy, the portal
service and the local spawner (issue 9, section 2).

Refusals are 4xx (never a 200 error page, never a proxy 503), name the field, and start
nothing: the hub's REST spawn (whose ``user_options`` JupyterHub parses itself, NaN
included), the spawn form (numbers with non-ASCII digits), and the portal service's grant
API (duplicate keys, NaN, session fields that would be ignored, bodies far over the limit,
sent through the proxy).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from html import unescape
from typing import Any

import pytest
import requests

from tests.support.hub import HubProcess
from tests.support.paths import free_port
from tests.support.portal import local_service_config

pytestmark = [pytest.mark.hub, pytest.mark.timeout(240)]

SERVICE = "/services/sovereign-portal/api/"
ACCESS = ["access:servers!server", "access:services!service=sovereign-portal"]


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    port = free_port()
    home = tmp_path_factory.mktemp("homes")
    config = local_service_config(port, default_role="researcher", home=home)
    h = HubProcess(tmp_path_factory.mktemp("hub-strict"), config).start()
    yield h
    h.close()
    h.assert_no_egress()


def _nothing_started(hub: HubProcess, user: str, before: set[int]) -> None:
    model = hub.api("GET", f"/users/{user}").json()
    assert not model["servers"] and not model["pending"], model
    assert hub.singleuser_pids() == before


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        pytest.param(
            b'{"gpus": 8, "nodes": 2}', "nodes", "runs on one node", id="notebook-2-nodes"
        ),
        pytest.param(b'{"gpus": NaN}', "gpus", "NaN", id="nan"),
        pytest.param(b'{"walltime_minutes": Infinity}', "walltime_minutes", "NaN", id="infinity"),
        pytest.param(b'{"walltime_minutes": "30"}', "walltime_minutes", "integer", id="string"),
        pytest.param(b'{"gpus": true}', "gpus", "integer", id="bool"),
        pytest.param(b'{"kind": "notebook", "count": 2}', "count", "count must be 1", id="count"),
    ],
)
def test_rest_spawn_refusals_are_400_naming_the_field(
    hub: HubProcess, body: bytes, field: str, words: str
) -> None:
    before = hub.singleuser_pids()
    hub.ensure_user("rest-mallory")
    r = hub.api(
        "POST",
        "/users/rest-mallory/server",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 400, (r.status_code, r.text)
    message = r.json()["message"]
    assert field in message and words in message, message
    assert "invalid literal" not in message and "SpawnException" not in message
    _nothing_started(hub, "rest-mallory", before)


def _login(hub: HubProcess, name: str) -> requests.Session:
    s = requests.Session()
    s.get(f"{hub.url}/hub/login", timeout=10)
    r = s.post(
        f"{hub.url}/hub/login",
        data={"username": name, "password": "x", "_xsrf": s.cookies.get("_xsrf")},
        timeout=10,
    )
    assert r.status_code == 200, r.text[:300]
    return s


@pytest.mark.parametrize(
    ("form", "field"),
    [
        pytest.param(
            {"size": "lab/h100x2", "walltime_minutes": "٣٠"}, "walltime_minutes", id="arabic"
        ),
        pytest.param(
            {"size": "lab/h100x2", "walltime_minutes": "3³"}, "walltime_minutes", id="super"
        ),
        pytest.param(
            {"size": "lab/h100x2", "walltime_minutes": "+30"}, "walltime_minutes", id="plus"
        ),
        pytest.param(
            {"size": "lab/h100x2", "walltime_minutes": "030"}, "walltime_minutes", id="zero"
        ),
        pytest.param({"size": "lab/h100x٢", "walltime_minutes": "30"}, "size", id="size-digit"),
        pytest.param({"size": "lab/h100x8x2n", "walltime_minutes": "30"}, "nodes", id="nodes"),
    ],
)
def test_form_refusals_are_400_pages_naming_the_field(
    hub: HubProcess, form: dict[str, str], field: str
) -> None:
    before = hub.singleuser_pids()
    s = _login(hub, "form-mallory")
    page = s.get(f"{hub.url}/hub/spawn", timeout=10)
    assert page.status_code == 200 and 'name="size"' in page.text
    r = s.post(
        f"{hub.url}/hub/spawn",
        data={**form, "_xsrf": s.cookies.get("_xsrf")},
        allow_redirects=False,
        timeout=30,
    )
    assert r.status_code == 400, (r.status_code, r.text[:300])  # never an error page with 200
    text = unescape(r.text)
    assert field in text, text[:2000]
    assert not re.search(r"\(\d+, ['\"]", text)  # no tuple such as (40, "...")
    assert "invalid literal" not in text and "SpawnException(" not in text
    _nothing_started(hub, "form-mallory", before)


def _token(hub: HubProcess, user: str) -> str:
    hub.ensure_user(user)
    r = hub.api("POST", f"/users/{user}/tokens", json={"scopes": ACCESS})
    assert r.status_code == 201, r.text
    tok = str(r.json()["token"])
    hub.wait_for(
        lambda: _as(tok, "GET", f"{hub.url}{SERVICE}catalog").status_code == 200,
        30,
        "the portal service",
    )
    return tok


def _as(tok: str, method: str, url: str, **kw: Any) -> requests.Response:
    headers = {"Authorization": f"token {tok}", **kw.pop("headers", {})}
    return requests.request(method, url, headers=headers, timeout=120, **kw)


def _free(hub: HubProcess, tok: str) -> int:
    cat = _as(tok, "GET", f"{hub.url}{SERVICE}catalog").json()
    return int(cat["partitions"][0]["queue"]["free_devices"])


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        pytest.param(b'{"kind": "dask", "gpus": 1, "gpus": 8}', 400, "appears twice", id="dup"),
        pytest.param(
            b'{"kind": "dask", "x": {"a": 1, "a": 1}}', 400, "appears twice", id="dup-deep"
        ),
        pytest.param(b'{"kind": "dask", "gpus": NaN}', 400, "NaN", id="nan"),
        pytest.param(b'{"kind": "dask", "gpus": 1e400}', 400, "too large", id="overflow"),
        pytest.param(b'{"kind": "dask", "image": "base"}', 400, "image", id="session-image"),
        pytest.param(b'{"kind": "dask", "gpus": 8, "nodes": 2}', 400, "nodes", id="dask-nodes"),
        pytest.param(b"[" * 40 + b"]" * 40, 400, "nested deeper", id="deep"),
        pytest.param(b'{"kind": "dask", "p": "\xff"}', 400, "UTF-8", id="not-utf8"),
    ],
)
def test_grant_bodies_refused_by_the_one_helper(
    hub: HubProcess, body: bytes, status: int, words: str
) -> None:
    tok = _token(hub, "svc-mallory")
    before = _free(hub, tok)
    r = _as(tok, "POST", f"{hub.url}{SERVICE}grants", data=body)
    assert r.status_code == status, (r.status_code, r.text[:300])
    err = r.json()
    assert words in err["error"] and err["status"] == status, err
    assert _free(hub, tok) == before  # nothing leased


@pytest.mark.parametrize("size_mb", [2, 50])
def test_bodies_far_over_the_limit_are_413_through_the_proxy(hub: HubProcess, size_mb: int) -> None:
    tok = _token(hub, "svc-big")
    body = b'{"kind": "dask", "x": "' + b"a" * (size_mb * 1024 * 1024) + b'"}'
    r = _as(tok, "POST", f"{hub.url}{SERVICE}grants", data=body)
    assert r.status_code == 413, (r.status_code, r.text[:300])
    assert r.json()["reason"] == "too_large"
    # no credentials and a huge body: still an answer (401), not a reset turned into a 503
    anon = requests.post(f"{hub.url}{SERVICE}grants", data=body, timeout=120)
    assert anon.status_code == 401, (anon.status_code, anon.text[:300])
    # chunked, with no Content-Length
    chunks = (b"a" * 65536 for _ in range(size_mb * 16))
    c = _as(tok, "POST", f"{hub.url}{SERVICE}grants", data=chunks)
    assert c.status_code == 413, (c.status_code, c.text[:300])
    # the service still serves
    ok = _as(tok, "POST", f"{hub.url}{SERVICE}grants", json={"kind": "dask", "gpus": 1})
    assert ok.status_code == 201, ok.text
    gid = ok.json()["id"]
    assert _as(tok, "DELETE", f"{hub.url}{SERVICE}grants/{gid}").status_code == 204
