"""Institutional OIDC login against the real local IdP (oidc-provider) and a real JupyterHub.

One IdP (with its attack mode on) and one hub per module. Logins are programmatic (``requests``
driving the IdP's own form), each well under a second.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests

from tests.support.hub import HubProcess
from tests.support.idp import SUPPORT_CONTACT, LocalIdP, hub_auth_config, oidc_login
from tests.support.stack import hub_with_idp, login_config

pytestmark = [pytest.mark.idp, pytest.mark.hub]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[HubProcess, LocalIdP]]:
    """The IdP (attack mode on) and a hub that logs in through it."""
    with hub_with_idp(tmp_path_factory.mktemp("login"), login_config(), tamper=True) as s:
        yield s


@pytest.fixture(scope="module")
def hub(stack: tuple[HubProcess, LocalIdP]) -> HubProcess:
    return stack[0]


@pytest.fixture(scope="module")
def idp(stack: tuple[HubProcess, LocalIdP]) -> LocalIdP:
    return stack[1]


def user_model(hub: HubProcess, name: str) -> dict:
    r = hub.api("GET", f"/users/{name}")
    assert r.status_code == 200, r.text
    return r.json()


def server_status(session: requests.Session, hub: HubProcess, user: str) -> requests.Response:
    """Open a user's server like a browser (one HTML page runs the server's OAuth), then its API."""
    page = session.get(f"{hub.url}/user/{user}/lab", timeout=30)
    if page.status_code == 200 and "/hub/api/oauth2/authorize" in page.url:
        # Another user's server: JupyterHub asks the visitor to confirm, as a browser user would.
        fields = re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', page.text)
        page = session.post(page.url, data=fields, timeout=30)
    if page.status_code != 200:
        return page
    return session.get(f"{hub.url}/user/{user}/api/status", timeout=30)


def whoami(session: requests.Session, hub: HubProcess) -> requests.Response:
    return session.get(f"{hub.url}/hub/api/user", timeout=10)


EXPECTED = {
    "alice": ("student", ["course-ml101"], {"user", "portal-student"}, False),
    "bob": ("student", ["course-cv202"], {"user", "portal-student"}, False),
    "carol": ("researcher", ["project-climate"], {"user", "portal-researcher"}, False),
    "ivan": (
        "instructor",
        ["instructors-ml101"],
        {"user", "portal-instructor", "instructor-ml101"},
        False,
    ),
    "olga": ("operator", [], {"user", "portal-operator", "admin"}, True),
    # no schacHomeOrganization: the home organisation comes from his *verified* email
    "victor": ("student", ["course-ml101"], {"user", "portal-student"}, False),
}


@pytest.mark.parametrize("login", sorted(EXPECTED))
def test_each_role_lands_with_role_groups_and_scopes(hub: HubProcess, idp: LocalIdP, login: str):
    role, groups, roles, admin = EXPECTED[login]
    result = oidc_login(hub.url, idp, login)
    assert result.left_deployment is None
    assert result.response.status_code == 200, (result.hops, result.response.text[:500])
    assert urlsplit(result.final_url).netloc == urlsplit(hub.url).netloc
    name = f"{login}@uni-a.example"
    me = whoami(result.session, hub)
    assert me.status_code == 200, me.text
    assert me.json()["name"] == name
    model = user_model(hub, name)
    assert sorted(model["groups"]) == groups
    assert set(model["roles"]) == roles
    assert model["admin"] is admin
    scopes = set(me.json()["scopes"])
    if login == "ivan":
        assert "servers!group=course-ml101" in scopes  # start and stop, not access
        assert "access:servers!group=course-ml101" not in scopes
        assert "read:users!group=course-ml101" in scopes
    if login == "olga":
        assert "admin:users" in scopes and "admin:servers" in scopes
    if login in ("alice", "bob", "carol", "victor"):
        assert not any("!group=" in s for s in scopes), scopes
        assert "admin:users" not in scopes and "list:users" not in {
            s for s in scopes if "!" not in s
        }
    assert f"login: {name} role={role}" in hub.log_text()


REFUSALS = {
    "mallory": (
        "unknown_institution",
        "Your institution (other-college.example) is not connected to this portal.",
    ),
    "nora": ("missing_affiliation", "(eduPersonAffiliation)"),
    "eve": ("unknown_institution", "no home organisation (schacHomeOrganization) and no verified"),
}


@pytest.mark.parametrize("login", sorted(REFUSALS))
def test_refused_logins_say_why_and_whom_to_contact(hub: HubProcess, idp: LocalIdP, login: str):
    reason, text = REFUSALS[login]
    result = oidc_login(hub.url, idp, login)
    resp = result.response
    assert resp.status_code == 403, (result.hops, resp.text[:300])
    page = re.sub(r"\s+", " ", resp.text)
    assert text in page
    assert "portal-help@uni-a.example" in page and SUPPORT_CONTACT.split(" (")[0] in page
    assert whoami(result.session, hub).status_code == 403
    assert hub.api("GET", f"/users/{login}@other-college.example").status_code == 404
    assert hub.api("GET", f"/users/{login}@uni-a.example").status_code == 404
    log = hub.log_text()
    assert f"login refused: reason={reason}" in log
    # The log never carries tokens (JWTs start with eyJ) nor the whole userinfo.
    assert "eyJ" not in log and "access_token" not in log
    assert "eduPersonEntitlement" not in log and "Mallory Elsewhere" not in log


def test_wrong_password_is_refused_at_the_idp(hub: HubProcess, idp: LocalIdP):
    result = oidc_login(hub.url, idp, "alice", "not-her-password")
    assert result.response.status_code == 401
    assert "Invalid username or password." in result.response.text
    assert result.callback_url is None
    assert whoami(result.session, hub).status_code == 403


TOKEN_ATTACKS = [
    "other_key",  # signed by another key, with the IdP's own key id
    "unknown_kid",  # signed by another key under a new key id (forces a JWKS refetch)
    "alg_none",
    "alg_hs256",  # HMAC with the public key as the secret (key confusion)
    "wrong_iss",
    "wrong_aud",
    "expired",
    "future_iat",
    "no_nonce",
    "wrong_nonce",
    "replay",  # a genuine ID token from an earlier login: stale nonce
    "drop",  # no ID token at all: userinfo alone is not enough
]


@pytest.mark.parametrize("mode", TOKEN_ATTACKS)
def test_forged_id_tokens_are_rejected(hub: HubProcess, idp: LocalIdP, mode: str):
    assert oidc_login(hub.url, idp, "carol").response.status_code == 200  # an earlier token
    idp.tamper(mode)
    result = oidc_login(hub.url, idp, "carol")
    assert f"tampered ID token ({mode})" in idp.log_tail(5)
    assert result.response.status_code == 403, (mode, result.response.text[:300])
    assert "could not be verified" in result.response.text
    assert whoami(result.session, hub).status_code == 403
    assert "login refused: reason=" in hub.tail(5)


def test_replayed_state_is_rejected(hub: HubProcess, idp: LocalIdP):
    first = oidc_login(hub.url, idp, "alice", stop_at_callback=True)
    assert first.callback_url
    cookies = requests.utils.dict_from_cookiejar(first.session.cookies)
    ok = first.session.get(first.callback_url, allow_redirects=False, timeout=10)
    assert ok.status_code == 302, ok.text[:300]
    # The same callback again, with the same state cookie restored: refused.
    again = requests.Session()
    again.cookies.update(cookies)
    r = again.get(first.callback_url, allow_redirects=False, timeout=10)
    assert r.status_code == 400 and "already used" in r.text
    assert whoami(again, hub).status_code == 403
    # And with no state cookie at all.
    r = requests.get(first.callback_url, allow_redirects=False, timeout=10)
    assert r.status_code == 400


def test_response_from_another_issuer_is_rejected(hub: HubProcess, idp: LocalIdP):
    first = oidc_login(hub.url, idp, "alice", stop_at_callback=True)
    assert first.callback_url and "iss=" in first.callback_url
    mixed = re.sub(r"iss=[^&]+", "iss=http%3A%2F%2F127.0.0.1%3A9", first.callback_url)
    r = first.session.get(mixed, allow_redirects=False, timeout=10)
    assert r.status_code == 400 and "unexpected issuer" in r.text


OPEN_REDIRECTS = [
    "//evil.example",
    "///evil.example",
    "\\\\evil.example",
    "/\\evil.example",
    "https:evil.example",
    "https://evil.example/",
    "%2F%2Fevil.example",
    "%2F%2F%2Fevil.example",
    "%5C%5Cevil.example",
    "%2F%5Cevil.example",
    "https%3Aevil.example",
    "https%3A%2F%2Fevil.example",
    "%252F%252Fevil.example",
    "%09//evil.example",
    "/%09/evil.example",
]


@pytest.mark.parametrize("start", ["/hub/login", "/hub/oauth_login"])
@pytest.mark.parametrize("raw_next", OPEN_REDIRECTS)
def test_next_never_leaves_the_hub(hub: HubProcess, idp: LocalIdP, start: str, raw_next: str):
    result = oidc_login(hub.url, idp, "alice", start=f"{start}?next={raw_next}")
    assert result.left_deployment is None, result.hops
    assert result.response.status_code in (200, 404), result.hops
    # Once logged in, the hub's login page honours next= too: still on the hub.
    r = result.session.get(f"{hub.url}{start}?next={raw_next}", allow_redirects=False)
    if r.status_code in (301, 302, 303, 307, 308):
        from tests.support.idp import browser_resolve

        target = browser_resolve(r.url, r.headers["Location"])
        assert urlsplit(target).netloc in {urlsplit(hub.url).netloc, urlsplit(idp.issuer).netloc}


def test_instructor_reaches_own_students_only(hub: HubProcess, idp: LocalIdP):
    for login in ("alice", "bob"):
        assert oidc_login(hub.url, idp, login).response.status_code == 200
        hub.spawn(f"{login}@uni-a.example", {})
    ivan = oidc_login(hub.url, idp, "ivan").session
    listed = ivan.get(f"{hub.url}/hub/api/users", timeout=10)
    assert listed.status_code == 200
    names = {u["name"] for u in listed.json()}
    assert "alice@uni-a.example" in names and "bob@uni-a.example" not in names
    assert all("course-ml101" in u["groups"] for u in listed.json()), listed.json()
    assert ivan.get(f"{hub.url}/hub/api/users/alice@uni-a.example").status_code == 200
    assert ivan.get(f"{hub.url}/hub/api/users/bob@uni-a.example").status_code == 404
    # Course staff hold no access:servers: opening a student's server is a recorded share
    # where the course allows it (hub/course_api.py, tests/hub/test_course_rbac.py).
    own = server_status(ivan, hub, "alice@uni-a.example")
    assert own.status_code == 403, own.text[:300]
    other = server_status(ivan, hub, "bob@uni-a.example")
    assert other.status_code == 403, other.text[:300]
    # Instructors stop their own students' servers, and no one else's; they administer nobody.
    for method, path in [
        ("DELETE", "/users/bob@uni-a.example/server"),
        ("POST", "/users"),
        ("GET", "/proxy"),
    ]:
        r = ivan.request(method, f"{hub.url}/hub/api{path}", timeout=10)
        assert r.status_code in (403, 404), (method, path, r.status_code)
    token = hub.api(
        "POST", "/users/ivan@uni-a.example/tokens", json={"scopes": ["inherit"]}
    ).json()["token"]
    stop = hub.api("DELETE", "/users/alice@uni-a.example/server", token=token)
    assert stop.status_code in (202, 204), stop.text[:300]


def test_student_gets_403_on_others_servers_and_privileged_routes(hub: HubProcess, idp: LocalIdP):
    for login in ("alice", "bob"):  # both servers running, whatever ran before
        name = f"{login}@uni-a.example"
        assert oidc_login(hub.url, idp, login).response.status_code == 200
        deadline = time.monotonic() + 60
        model = hub.api("GET", f"/users/{name}").json()
        while model.get("pending") and time.monotonic() < deadline:  # e.g. a stop under way
            time.sleep(0.5)
            model = hub.api("GET", f"/users/{name}").json()
        if not (model.get("servers") or {}).get("", {}).get("ready"):
            hub.spawn(name, {})
    alice = oidc_login(hub.url, idp, "alice").session
    token = hub.api(
        "POST", "/users/alice@uni-a.example/tokens", json={"scopes": ["inherit"]}
    ).json()["token"]
    r = server_status(alice, hub, "bob@uni-a.example")
    assert r.status_code == 403, r.text[:300]
    assert server_status(alice, hub, "alice@uni-a.example").status_code == 200
    auth = {"Authorization": f"token {token}"}
    # 403, or 404 where JupyterHub hides that a resource you may not read exists at all.
    forbidden = {
        ("GET", "/users"): 403,  # listing users is an instructor/operator route
        ("GET", "/users/bob@uni-a.example"): 404,
        ("POST", "/users/bob@uni-a.example/server"): 404,
        ("DELETE", "/users/bob@uni-a.example/server"): 404,
        ("GET", "/users/bob@uni-a.example/tokens"): 404,
        ("GET", "/groups/course-ml101"): 403,
        ("GET", "/groups"): 403,
        ("POST", "/users/mallory"): 403,
        ("DELETE", "/users/bob@uni-a.example"): 403,
        ("POST", "/groups/course-ml101/users"): 403,
        ("GET", "/proxy"): 403,
        ("POST", "/shutdown"): 403,
    }
    got = {
        route: requests.request(
            route[0], f"{hub.url}/hub/api{route[1]}", headers=auth, json={}, timeout=10
        ).status_code
        for route in forbidden
    }
    assert got == forbidden
    assert server_status(alice, hub, "bob@uni-a.example").status_code == 403


def test_hub_waits_for_a_late_idp_and_empty_allow_list_lets_nobody_in(tmp_path: Path):
    """Discovery is retried while the IdP starts; with no allowed organisation nobody gets in."""
    hub2 = HubProcess(tmp_path / "hub")
    late = LocalIdP(tmp_path / "idp", [f"{hub2.url}/hub/oauth_callback"])
    cfg = hub_auth_config(late).replace(
        'allowed_organisations = {"uni-a.example"}', "allowed_organisations = set()"
    )
    hub2.config_path.write_text(hub2.config_path.read_text() + cfg)
    hub2.start()
    try:
        assert "allowed_organisations is EMPTY: NOBODY CAN LOG IN" in hub2.log_text()
        starter = threading.Timer(1.5, late.start)
        starter.start()
        try:
            result = oidc_login(hub2.url, late, "alice")  # blocks in discovery until the IdP is up
        finally:
            starter.join()
        assert "not ready" in hub2.log_text()  # it did retry
        assert result.response.status_code == 403
        assert "Your institution (uni-a.example) is not connected" in result.response.text
    finally:
        late.stop()
        hub2.close()
        hub2.assert_no_egress()


def test_hub_log_holds_no_secrets(hub: HubProcess, idp: LocalIdP):
    """After every login, refusal and attack above: no token, code, state or secret in the log."""
    log = hub.log_text()
    assert "login refused: reason=id_token_invalid" in log  # the attacks did run
    assert idp.client_secret not in log
    assert "eyJ" not in log  # JWTs and the base64-JSON state both start with eyJ
    assert not re.search(r"[?&]code=(?!\[secret\])", log)
    assert "access_token" not in log and "id_token=" not in log


def test_key_rotation_and_idp_changes_apply_at_next_login(
    hub: HubProcess, idp: LocalIdP, tmp_path: Path
):
    """Runs last: restarts the IdP with a new signing key and changed claims."""
    assert oidc_login(hub.url, idp, "ivan").response.status_code == 200
    assert "instructor-ml101" in user_model(hub, "ivan@uni-a.example")["roles"]
    data = json.loads(idp.users_file.read_text())
    for user in data["users"]:
        if user["username"] == "ivan":  # now teaches cv202 instead of ml101
            user["claims"]["eduPersonEntitlement"] = [
                "urn:geant:uni-a.example:group:course:cv202:role=instructor#uni-a.example"
            ]
        if user["username"] == "olga":  # no longer an operator
            user["claims"]["eduPersonEntitlement"] = []
    changed = tmp_path / "users.json"
    changed.write_text(json.dumps(data))
    idp.stop()
    new_kid = idp.rotate_keys()
    idp.users_file = changed
    idp.start()
    time.sleep(1.1)  # jwks_refresh_cooldown = 1 s in the test config
    # The hub has the old JWKS cached: the unknown kid makes it refetch, and the login works.
    ivan = oidc_login(hub.url, idp, "ivan")
    assert ivan.response.status_code == 200, hub.tail(8)
    model = user_model(hub, "ivan@uni-a.example")
    assert model["groups"] == ["instructors-cv202"]
    assert set(model["roles"]) == {"user", "portal-instructor", "instructor-cv202"}
    listed = ivan.session.get(f"{hub.url}/hub/api/users", timeout=10).json()
    assert {u["name"] for u in listed} == {"bob@uni-a.example"}
    olga = oidc_login(hub.url, idp, "olga")
    assert olga.response.status_code == 200
    model = user_model(hub, "olga@uni-a.example")
    assert model["admin"] is False and set(model["roles"]) == {"user", "portal-researcher"}
    assert json.loads(idp.jwks_file.read_text())["keys"][0]["kid"] == new_kid
