"""An account belongs to one IdP subject; no login names a system account; the IdP failing
mid-login is a "try again" page. Against the real local IdP and a real JupyterHub.

- Each hub user name is bound to the (``iss``, ``sub``) of its first login. Another subject
  whose user name normalises to the same hub name (the same name, its e-mail form) is refused
  with a page that says why and whom to contact; forms that normalise elsewhere (case, another
  scope) land in an account of their own, never in the first one.
- An IdP that re-issues a user's ``sub`` locks the user out until an operator re-binds the
  account with ``sovereign-portal accounts rebind`` (audited); then the login works.
- With ``scope_username_with_organisation = False`` (the single-institution setting) a user
  name that names a system account (``root``, ``daemon``, a configured deny-list name) is
  refused, through the same ``c.UnixAccountPolicy`` the spawners read.
- The IdP going down after the redirect to the callback gives a 503 "try again" page.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from sovereign_portal.hub.accounts import get_binding
from sovereign_portal.hub.store import PortalStore

from tests.support.hub import HubProcess
from tests.support.idp import SUPPORT_CONTACT, LocalIdP, oidc_login
from tests.support.idp_users import hub_with_users, idp_user, password
from tests.support.paths import VENV_BIN

pytestmark = [pytest.mark.idp, pytest.mark.hub]

ALICE = "alice@uni-a.example"
OLGA = "olga@uni-a.example"

# Other people at the IdP whose user-name claim is some form of "alice" (or "olga").
TWINS = [
    idp_user("alice-twin", "twin-sub-1", "alice"),
    idp_user("alice-mail", "twin-sub-2", "alice@uni-a.example"),
    idp_user("alice-cap", "twin-sub-3", "Alice"),
    idp_user("alice-upper", "twin-sub-4", "ALICE@UNI-A.EXAMPLE"),
    idp_user("alice-scoped", "twin-sub-5", "alice@uni-b.example"),
    idp_user("olga-twin", "twin-sub-6", "olga"),
    idp_user("rita", "rita-v1", "rita"),
]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[HubProcess, LocalIdP]]:
    with hub_with_users(tmp_path_factory.mktemp("binding"), TWINS) as s:
        yield s


def login(hub: HubProcess, idp: LocalIdP, who: str) -> requests.Response:
    result = oidc_login(hub.url, idp, who, password(idp.users_file, who))
    assert result.left_deployment is None, result.hops
    return result.response


def whoami(resp: requests.Response, hub: HubProcess) -> str | None:
    r = requests.get(f"{hub.url}/hub/api/user", cookies=resp.cookies, timeout=10)
    return r.json()["name"] if r.status_code == 200 else None


def logged_in_as(hub: HubProcess, idp: LocalIdP, who: str) -> tuple[int, str | None]:
    result = oidc_login(hub.url, idp, who, password(idp.users_file, who))
    me = result.session.get(f"{hub.url}/hub/api/user", timeout=10)
    return result.response.status_code, (me.json()["name"] if me.status_code == 200 else None)


def store(hub: HubProcess) -> PortalStore:
    return PortalStore(f"sqlite:///{hub.dir / 'portal.sqlite'}")


def bound_subject(hub: HubProcess, name: str) -> str | None:
    s = store(hub)
    try:
        b = get_binding(s, name)
        return b.subject if b else None
    finally:
        s.dispose()


def page_text(resp: requests.Response) -> str:
    return re.sub(r"\s+", " ", resp.text)


def assert_no_secrets(hub: HubProcess) -> None:
    log = hub.log_text()
    assert "eyJ" not in log and "access_token" not in log and "id_token=" not in log


def test_first_login_binds_the_account_to_its_subject(stack: tuple[HubProcess, LocalIdP]):
    hub, idp = stack
    assert logged_in_as(hub, idp, "alice") == (200, ALICE)
    assert bound_subject(hub, ALICE) == "alice@uni-a.example"  # the sample user's sub
    assert logged_in_as(hub, idp, "alice") == (200, ALICE)  # the same subject: in again


def test_another_subject_with_the_same_user_name_is_refused(stack: tuple[HubProcess, LocalIdP]):
    hub, idp = stack
    assert logged_in_as(hub, idp, "alice") == (200, ALICE)
    before = hub.api("GET", f"/users/{ALICE}").json()
    result = oidc_login(hub.url, idp, "alice-twin", "pass-alice-twin")
    resp = result.response
    assert resp.status_code == 403, resp.text[:300]
    text = page_text(resp)
    assert f"The portal account {ALICE} belongs to another identity" in text
    assert "portal-help@uni-a.example" in text and SUPPORT_CONTACT.split(" (")[0] in text
    assert result.session.get(f"{hub.url}/hub/api/user", timeout=10).status_code == 403
    log = hub.log_text()
    assert f"login refused: reason=subject_mismatch user={ALICE}" in log
    assert "sub=twin-sub-1" in log
    assert_no_secrets(hub)
    # Nothing changed for the account's owner: same subject, same groups and roles.
    assert bound_subject(hub, ALICE) == "alice@uni-a.example"
    after = hub.api("GET", f"/users/{ALICE}").json()
    assert (after["groups"], sorted(after["roles"])) == (before["groups"], sorted(before["roles"]))
    assert logged_in_as(hub, idp, "alice") == (200, ALICE)


# login -> True when its name normalises to alice@uni-a.example (refused), else False (an
# account of its own). Either way it never lands in alice's account.
FORMS = {
    "alice-twin": True,  # "alice"
    "alice-mail": True,  # "alice@uni-a.example": the e-mail / eduPersonPrincipalName form
    "alice-cap": False,  # "Alice": not canonical, hashed into a name of its own
    "alice-upper": False,  # "ALICE@UNI-A.EXAMPLE"
    "alice-scoped": False,  # "alice@uni-b.example" sent by uni-a's IdP: scoped again
}


@pytest.mark.parametrize("form", sorted(FORMS))
def test_other_forms_of_the_name_never_reach_the_account(
    stack: tuple[HubProcess, LocalIdP], form: str
):
    hub, idp = stack
    assert logged_in_as(hub, idp, "alice") == (200, ALICE)
    status, name = logged_in_as(hub, idp, form)
    assert name != ALICE
    if FORMS[form]:
        assert (status, name) == (403, None)
        assert "login refused: reason=subject_mismatch" in hub.tail(10)
    else:
        assert status == 200 and name is not None
        assert bound_subject(hub, name) == next(u["sub"] for u in TWINS if u["username"] == form)
    assert bound_subject(hub, ALICE) == "alice@uni-a.example"


def test_an_operator_account_cannot_be_taken_over(stack: tuple[HubProcess, LocalIdP]):
    hub, idp = stack
    assert logged_in_as(hub, idp, "olga") == (200, OLGA)
    assert hub.api("GET", f"/users/{OLGA}").json()["admin"] is True
    assert logged_in_as(hub, idp, "olga-twin") == (403, None)
    model = hub.api("GET", f"/users/{OLGA}").json()
    assert model["admin"] is True and "admin" in model["roles"]
    assert bound_subject(hub, OLGA) == "olga@uni-a.example"


def cli(hub: HubProcess, *args: str) -> subprocess.CompletedProcess[str]:
    """``sovereign-portal accounts ...`` as an operator runs it: with the hub's environment
    (its config file reads it), finding the database through ``--config``."""
    return subprocess.run(
        [str(VENV_BIN / "sovereign-portal"), "accounts", *args, "--config", str(hub.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=hub.env(),
    )


def test_a_reissued_subject_is_refused_until_an_operator_rebinds(
    stack: tuple[HubProcess, LocalIdP], tmp_path: Path
):
    hub, idp = stack
    rita = "rita@uni-a.example"
    assert logged_in_as(hub, idp, "rita") == (200, rita)
    shown = cli(hub, "show", rita, "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["subject"] == "rita-v1"

    # The IdP re-issues rita's subject (a migration): same person, same user name, new sub.
    data = json.loads(idp.users_file.read_text())
    for user in data["users"]:
        if user["username"] == "rita":
            user["sub"] = "rita-v2"
    original = idp.users_file
    changed = tmp_path / "users.json"
    changed.write_text(json.dumps(data))
    idp.stop()
    idp.users_file = changed
    idp.start()
    try:
        result = oidc_login(hub.url, idp, "rita", "pass-rita")
        assert result.response.status_code == 403
        assert "an operator can check it and re-bind the account" in page_text(result.response)
        assert f"reason=subject_mismatch user={rita}" in hub.tail(10)

        # Bad operator input names the field and changes nothing.
        for args, field in [
            (["--subject", "", "--reason", "ticket 7"], "--subject"),
            (["--subject", "rita-v2", "--reason", ""], "--reason"),
            (["--subject", "rita-v2", "--reason", "t", "--issuer", "not a url"], "--issuer"),
        ]:
            bad = cli(hub, "rebind", rita, *args)
            assert bad.returncode == 2 and f"{field}: " in bad.stderr, (args, bad.stderr)
        unknown = cli(hub, "rebind", "nobody@uni-a.example", "--subject", "x", "--reason", "t")
        assert unknown.returncode == 2 and "USER: no account" in unknown.stderr
        assert bound_subject(hub, rita) == "rita-v1"
        assert json.loads(cli(hub, "show", rita, "--json").stdout)["audit"] == []
        assert oidc_login(hub.url, idp, "rita", "pass-rita").response.status_code == 403

        done = cli(hub, "rebind", rita, "--subject", "rita-v2", "--reason", "IdP migration #42")
        assert done.returncode == 0, done.stderr
        assert "rita-v1 -> rita-v2" in done.stdout
        assert "account rebind: user=rita@uni-a.example" in done.stderr  # the log line
        assert "by=" in done.stderr and "IdP migration #42" in done.stderr
        (event,) = json.loads(cli(hub, "show", rita, "--json").stdout)["audit"]
        assert event["action"] == "account.rebind"
        assert event["detail"]["old_subject"] == "rita-v1"
        assert event["detail"]["new_subject"] == "rita-v2"
        assert event["detail"]["reason"] == "IdP migration #42"
        assert event["actor"]

        # No hub restart: the next login with the new subject gets in.
        assert logged_in_as(hub, idp, "rita") == (200, rita)
    finally:
        idp.stop()
        idp.users_file = original
        idp.start()


def test_the_idp_failing_mid_login_gives_a_try_again_page(stack: tuple[HubProcess, LocalIdP]):
    hub, idp = stack
    first = oidc_login(hub.url, idp, "bob", stop_at_callback=True)
    assert first.callback_url
    idp.stop()  # after the redirect back, before the hub reaches the token endpoint
    try:
        r = first.session.get(first.callback_url, allow_redirects=False, timeout=30)
        assert r.status_code == 503, r.text[:300]
        text = page_text(r)
        assert "The institutional login service is not reachable. Try again in a minute." in text
        assert "login failed: reason=idp_unreachable step=token" in hub.tail(20)
        assert "Traceback" not in hub.tail(20)
        assert first.session.get(f"{hub.url}/hub/api/user", timeout=10).status_code == 403
    finally:
        idp.start()
    assert logged_in_as(hub, idp, "bob") == (200, "bob@uni-a.example")  # and it recovers
    assert_no_secrets(hub)


# --- system accounts -----------------------------------------------------------------------
SYSTEM = [
    idp_user("root", "sub-root", "root"),  # uid 0, and on the deny list
    idp_user("daemon", "sub-daemon", "daemon"),  # uid 1 on this host
    idp_user("backupsvc", "sub-backupsvc", "backupsvc"),  # denied by this hub's config only
    idp_user("dave", "sub-dave", "dave"),  # a person
]
SINGLE_INSTITUTION = """
c.InstitutionalAuthenticator.scope_username_with_organisation = False
c.UnixAccountPolicy.denied_names.add("backupsvc")
"""


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[HubProcess, LocalIdP]]:
    with hub_with_users(tmp_path_factory.mktemp("single"), SYSTEM, SINGLE_INSTITUTION) as s:
        yield s


@pytest.mark.parametrize("who", ["root", "daemon", "backupsvc"])
def test_a_system_account_name_is_refused_at_login(single: tuple[HubProcess, LocalIdP], who: str):
    hub, idp = single
    result = oidc_login(hub.url, idp, who, f"pass-{who}")
    resp = result.response
    assert resp.status_code == 403, resp.text[:300]
    text = page_text(resp)
    assert f"The user name your institution sent ({who}) is the name of a system account" in text
    assert "portal-help@uni-a.example" in text
    assert result.session.get(f"{hub.url}/hub/api/user", timeout=10).status_code == 403
    assert f"login refused: reason=system_account user={who}" in hub.log_text()
    assert hub.api("GET", f"/users/{who}").status_code == 404  # no hub user was created
    assert bound_subject(hub, who) is None  # and no account binding
    assert_no_secrets(hub)


def test_a_person_logs_in_with_scoping_off(single: tuple[HubProcess, LocalIdP]):
    hub, idp = single
    assert logged_in_as(hub, idp, "dave") == (200, "dave")
    assert bound_subject(hub, "dave") == "sub-dave"
