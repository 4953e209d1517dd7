"""Security review of the portal under a real JupyterHub (debug logging on), its proxy, the
portal service and one real single-user server.

Covers: redirects the spawn pages issue, XSRF on the spawn form, what a server's token and
the portal service's own token may do, the grant API across users, sibling URL prefixes,
secrets in logs, argv and environments, the proxy API, and unbounded input to the spawn form
and the service. One hub and one spawn for the module.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from html import unescape
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
import requests

from tests.support.hub import HubProcess
from tests.support.idp import LocalIdP, browser_resolve, hub_auth_config, oidc_login
from tests.support.paths import free_port

pytestmark = [pytest.mark.hub, pytest.mark.timeout(180)]

SERVICE = "/services/sovereign-portal/api/"
ACCESS = ["access:servers!server", "access:services!service=sovereign-portal"]
EVIL_NEXT = [
    "//evil.example",
    "///evil.example",
    "\\\\evil.example",
    "/\\evil.example",
    "https://evil.example/",
    "%2F%2Fevil.example",
    "%09//evil.example",
]


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    port = free_port()
    home = tmp_path_factory.mktemp("homes")
    config = f"""
from sovereign_portal.hub.service import configure_hub
c.JupyterHub.authenticator_class = "dummy"
c.Authenticator.allow_all = True
c.JupyterHub.spawner_class = "local-gpu"
c.LocalGPUSpawner.inventory_source = "declared"
c.LocalGPUSpawner.home_dir_template = "{home}/{{username}}"
configure_hub(c, None, port={port}, default_role="student")
"""
    h = HubProcess(tmp_path_factory.mktemp("hub-security"), config, debug=True).start()
    h.service_port = port  # type: ignore[attr-defined]
    for user in ("sib", "sib2", "rita", "sam"):
        h.ensure_user(user)
    r = h.api("POST", "/groups/researcher", json={"users": ["rita"]})
    assert r.status_code == 201, r.text
    yield h
    h.close()
    h.assert_no_egress()


def login(hub: HubProcess, name: str) -> requests.Session:
    """A browser-like session logged in through the (development) login form."""
    s = requests.Session()
    page = s.get(f"{hub.url}/hub/login", timeout=10)
    r = s.post(
        f"{hub.url}/hub/login",
        data={"username": name, "password": "x", "_xsrf": xsrf(page.text)},
        allow_redirects=False,
        timeout=10,
    )
    assert r.status_code == 302, r.text[:300]
    return s


def xsrf(html: str) -> str:
    """The page's XSRF token: a hidden input (login) or the form action's query (spawn)."""
    m = re.search(r'name="_xsrf" value="([^"]+)"', html) or re.search(r"[?&]_xsrf=([^\"&]+)", html)
    assert m, html[:500]
    return unescape(unquote(m.group(1)))


def user_token(hub: HubProcess, user: str, scopes: list[str]) -> str:
    r = hub.api("POST", f"/users/{user}/tokens", json={"scopes": scopes})
    assert r.status_code == 201, r.text
    return str(r.json()["token"])


def as_token(tok: str, method: str, url: str, **kw: Any) -> requests.Response:
    return requests.request(
        method, url, headers={"Authorization": f"token {tok}"}, timeout=30, **kw
    )


def stays_on_hub(hub: HubProcess, r: requests.Response) -> None:
    assert r.status_code in (301, 302, 303, 307, 308), (r.status_code, r.text[:200])
    target = browser_resolve(r.url, r.headers["Location"])
    assert urlsplit(target).netloc == urlsplit(hub.url).netloc, target


def proc_of(pid: int) -> tuple[str, dict[str, str]]:
    """(argv as one string, environment) of a process, as root sees it in /proc."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    env = dict(e.decode().split("=", 1) for e in raw if b"=" in e)
    return argv, env


def service_pid(hub: HubProcess) -> int:
    """The pid of this hub's portal service (other hubs may run on this machine)."""
    mine = f"--port={hub.service_port}".encode()  # type: ignore[attr-defined]
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes()
            except OSError:
                continue
            if b"sovereign_portal.hub.service" in cmd and mine in cmd.split(b"\0"):
                return int(p.name)
    raise AssertionError("the portal service process is not running")


def wait_service(hub: HubProcess, tok: str) -> None:
    hub.wait_for(
        lambda: as_token(tok, "GET", f"{hub.url}{SERVICE}catalog").status_code == 200,
        30,
        "the portal service",
    )


@pytest.fixture(scope="module")
def sib(hub: HubProcess) -> requests.Session:
    """sib's browser session; the cross-site spawn below must fail, the form spawn succeed."""
    s = login(hub, "sib")
    form = s.get(f"{hub.url}/hub/spawn", timeout=10)
    assert form.status_code == 200 and 'name="size"' in form.text, form.text[:300]
    data = {"size": "lab/h100:1g.10gb", "walltime_minutes": "60"}
    # A cross-site form POST (no _xsrf) from another origin, as in JupyterHub's no-cors advisory.
    forged = s.post(
        f"{hub.url}/hub/spawn",
        data=data,
        headers={
            "Sec-Fetch-Mode": "no-cors",
            "Sec-Fetch-Site": "cross-site",
            "Origin": "http://evil.example",
            "Referer": "http://evil.example/",
        },
        allow_redirects=False,
        timeout=10,
    )
    assert forged.status_code == 403, (forged.status_code, forged.text[:300])
    model = hub.api("GET", "/users/sib").json()
    assert not model["servers"] and not model["pending"], model
    # The real form, with a hostile next=: the spawn starts and the redirect stays on the hub.
    r = s.post(
        f"{hub.url}/hub/spawn?next={EVIL_NEXT[0]}",
        data={**data, "_xsrf": xsrf(form.text)},
        allow_redirects=False,
        timeout=30,
    )
    stays_on_hub(hub, r)
    hub.wait_ready("sib")
    return s


def test_cross_site_spawn_is_refused_and_next_stays_on_the_hub(
    hub: HubProcess, sib: requests.Session
) -> None:
    for raw in EVIL_NEXT:
        # with the server running, /hub/spawn redirects to next=
        stays_on_hub(hub, sib.get(f"{hub.url}/hub/spawn?next={raw}", allow_redirects=False))
        stays_on_hub(hub, sib.get(f"{hub.url}/hub/user-redirect/{raw}", allow_redirects=False))
        r = sib.get(f"{hub.url}/hub/spawn-pending/sib?next={raw}", allow_redirects=False)
        if r.status_code != 200:
            stays_on_hub(hub, r)


def test_sibling_prefix_never_reaches_anothers_server(hub: HubProcess, sib: Any) -> None:
    tok = user_token(hub, "sib2", ["inherit"])
    own = hub.server_get("sib", "api/status")
    assert own.status_code == 200  # sib's server answers at /user/sib/
    r = as_token(tok, "GET", f"{hub.url}/user/sib/api/status", allow_redirects=False)
    assert r.status_code == 403, r.status_code
    # /user/sib2/ is not /user/sib/ + "2": sib2 has no server, so sib's never answers.
    r = as_token(tok, "GET", f"{hub.url}/user/sib2/api/status", allow_redirects=False)
    assert r.status_code != 200 and "last_activity" not in r.text, (r.status_code, r.text[:200])


def test_a_servers_token_acts_for_its_own_server_only(hub: HubProcess, sib: Any) -> None:
    pid = hub.api("GET", "/users/sib").json()["servers"][""]["state"]["pid"]
    argv, env = proc_of(pid)
    tok = env["JUPYTERHUB_API_TOKEN"]
    assert tok not in argv
    for secret in (hub.token, hub.proxy_token):  # the hub's own secrets stay in the hub
        assert secret not in argv and secret not in env.values()
    me = as_token(tok, "GET", f"{hub.url}/hub/api/user").json()
    assert me["name"] == "sib"
    assert all("!" in scope for scope in me["scopes"]), me["scopes"]  # every scope filtered
    assert as_token(tok, "GET", f"{hub.url}{SERVICE}catalog").status_code == 200
    forbidden = [
        ("GET", "/users"),
        ("POST", "/users/sib/tokens"),
        ("GET", "/users/sib/tokens"),
        ("POST", "/users/sib2/server"),
        ("DELETE", "/users/sib/server"),
        ("PATCH", "/users/sib"),
        ("GET", "/proxy"),
    ]
    got = {
        route: as_token(tok, route[0], f"{hub.url}/hub/api{route[1]}", json={}).status_code
        for route in forbidden
    }
    assert all(code in (403, 404) for code in got.values()), got


def test_the_services_own_token_only_reads_users(hub: HubProcess, sib: Any) -> None:
    argv, env = proc_of(service_pid(hub))
    tok = env["JUPYTERHUB_API_TOKEN"]
    assert tok not in argv
    for secret in (hub.token, hub.proxy_token):
        assert secret not in argv and secret not in env.values()
    assert as_token(tok, "GET", f"{hub.url}/hub/api/users/sib").status_code == 200
    # What the service may not do with its token. (It may start and stop servers and move
    # users in and out of groups: the course lifecycle and rosters, hub/course_api.py;
    # roles never come from groups here, since the authenticator manages them. It may read
    # token *metadata*, to see a warm server claimed, hub/class_start_api.py: never a
    # token's value, which JupyterHub shows only once, to whoever creates it.)
    listed = as_token(tok, "GET", f"{hub.url}/hub/api/users/sib/tokens")
    assert listed.status_code == 200, listed.text
    for t in listed.json()["api_tokens"]:
        assert "token" not in t, t  # metadata only
    forbidden = [
        ("POST", "/users/sib/tokens", {"scopes": ["inherit"]}),
        ("PATCH", "/users/sib", {"admin": True}),
        ("POST", "/users/mallory", {}),
        ("DELETE", "/users/sib2", None),
        ("GET", "/proxy", None),
    ]
    got = {
        (m, p): as_token(tok, m, f"{hub.url}/hub/api{p}", json=body).status_code
        for m, p, body in forbidden
    }
    assert all(code in (403, 404) for code in got.values()), got
    roles = hub.api("GET", "/users/sam").json()["roles"]
    r = as_token(tok, "POST", f"{hub.url}/hub/api/groups/operator/users", json={"users": ["sam"]})
    assert r.status_code in (200, 201, 403, 404), r.text
    sam = hub.api("GET", "/users/sam").json()
    assert sam["roles"] == roles and not sam["admin"]  # a group gives no role and no admin
    if r.status_code in (200, 201):
        as_token(tok, "DELETE", f"{hub.url}/hub/api/groups/operator/users", json={"users": ["sam"]})


def free_devices(hub: HubProcess, tok: str) -> int:
    cat = as_token(tok, "GET", f"{hub.url}{SERVICE}catalog").json()
    return int(cat["partitions"][0]["queue"]["free_devices"])


def test_grants_belong_to_the_tokens_user(hub: HubProcess) -> None:
    rita = user_token(hub, "rita", ACCESS)
    sam = user_token(hub, "sam", ACCESS)
    wait_service(hub, rita)
    before = free_devices(hub, rita)
    g = as_token(rita, "POST", f"{hub.url}{SERVICE}grants", json={"kind": "dask", "gpus": 2})
    assert g.status_code == 201 and g.json()["user"] == "rita", g.text
    # A student cannot ask in another user's name: the request has no such field.
    r = as_token(sam, "POST", f"{hub.url}{SERVICE}grants", json={"kind": "dask", "user": "rita"})
    assert r.status_code == 400 and "unknown field 'user'" in r.json()["error"]
    # ... nor release another user's grant: 204 like an unknown id, and nothing is released.
    gid = g.json()["id"]
    assert as_token(sam, "DELETE", f"{hub.url}{SERVICE}grants/{gid}").status_code == 204
    assert free_devices(hub, rita) == before - 2
    assert as_token(rita, "DELETE", f"{hub.url}{SERVICE}grants/{gid}").status_code == 204
    assert free_devices(hub, rita) == before


def test_service_takes_no_cookies_and_bounds_its_input(hub: HubProcess, sib: Any) -> None:
    # A logged-in browser's cookies are not credentials here: no cross-site request works.
    r = sib.post(f"{hub.url}{SERVICE}grants", json={"kind": "dask"}, timeout=10)
    assert r.status_code == 401, r.status_code
    sam = user_token(hub, "sam", ACCESS)
    wait_service(hub, sam)
    url = f"{hub.url}{SERVICE}grants"
    big = as_token(sam, "POST", url, data=b'{"kind": "dask", "x": "' + b"a" * 200_000 + b'"}')
    assert big.status_code == 413 and big.json()["reason"] == "too_large", big.text[:200]
    deep = as_token(sam, "POST", url, data=b"[" * 30_000 + b"]" * 30_000)
    assert deep.status_code == 400, deep.text[:200]
    long = as_token(sam, "POST", url, json={"kind": "dask", "partition": "p" * 50_000})
    assert long.status_code == 400 and len(long.text) < 1000, long.text[:200]
    assert free_devices(hub, sam) >= 0  # still serving


def test_huge_spawn_form_values_are_refused_briefly(hub: HubProcess) -> None:
    s = login(hub, "sib2")
    form = s.get(f"{hub.url}/hub/spawn", timeout=10)
    huge = "9" * 200_000
    r = s.post(
        f"{hub.url}/hub/spawn",
        data={"size": f"lab/h100x1x{huge}", "walltime_minutes": "60", "_xsrf": xsrf(form.text)},
        allow_redirects=False,
        timeout=30,
    )
    assert r.status_code in (200, 400) and "unknown size" in r.text, r.text[:300]
    assert huge[:1000] not in r.text and huge[:1000] not in hub.log_text()
    assert not hub.api("GET", "/users/sib2").json()["servers"]


def test_proxy_api_needs_its_token(hub: HubProcess) -> None:
    api = f"http://127.0.0.1:{hub.proxy_api_port}/api/routes"
    assert requests.get(api, timeout=10).status_code == 403
    assert as_token("not-the-token", "GET", api).status_code == 403


def test_debug_log_holds_no_secret(hub: HubProcess, sib: Any) -> None:
    """Runs last: after every login, spawn, refusal and token above, at debug level."""
    pid = hub.api("GET", "/users/sib").json()["servers"][""]["state"]["pid"]
    secrets = {
        "server token": proc_of(pid)[1]["JUPYTERHUB_API_TOKEN"],
        "service token": proc_of(service_pid(hub))[1]["JUPYTERHUB_API_TOKEN"],
        "admin token": hub.token,
        "proxy token": hub.proxy_token,
        "cookie secret": (hub.dir / "cookie_secret").read_text().strip(),
    }
    log = hub.log_text()
    assert "[D " in log  # debug level was on
    leaked = [name for name, value in secrets.items() if value and value in log]
    assert not leaked, leaked


def test_institutional_login_at_debug_level_logs_no_secret(tmp_path: Path) -> None:
    """The IdP client secret, codes, state and tokens stay out of a debug-level hub log, out
    of the hub's argv, and out of every URL of the login (one good and one forged login)."""
    h = HubProcess(tmp_path / "hub", debug=True)
    idp = LocalIdP(tmp_path / "idp", [f"{h.url}/hub/oauth_callback"], tamper=True).start()
    try:
        h.config_path.write_text(h.config_path.read_text() + hub_auth_config(idp))
        h.start()
        good = oidc_login(h.url, idp, "carol")
        me = good.session.get(f"{h.url}/hub/api/user", timeout=10)
        assert me.status_code == 200 and me.json()["name"] == "carol@uni-a.example", me.text
        idp.tamper("other_key")
        assert oidc_login(h.url, idp, "carol").response.status_code == 403
        assert h.hub is not None
        argv = proc_of(h.hub.pid)[0]
        log = h.log_text()
        assert "[D " in log and "login refused: reason=id_token_invalid" in log
        assert idp.client_secret not in log and idp.client_secret not in argv
        assert idp.client_secret not in " ".join(good.hops)
        assert "eyJ" not in log  # JWTs and the base64-JSON state
        assert not re.search(r"[?&](code|state)=(?!\[secret\])", log)
        assert "access_token" not in log and "id_token=" not in log
    finally:
        h.close()
        idp.stop()
    h.assert_no_egress()
