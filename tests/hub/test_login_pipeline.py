"""The inherited oauthenticator options work as the oauthenticator docs say.

The authenticator rides oauthenticator's pipeline (hooks that call ``super()``), so
``allowed_users``, ``allowed_groups``, ``blocked_users``, ``admin_groups`` and ``allow_all``
apply to portal logins, on top of the portal's own rule (members of an allowed organisation,
switched off here with ``allow_allowed_organisations = False``). ``manage_groups`` and
``manage_roles`` cannot be turned off (tests/unit/test_auth_pipeline.py). Real local IdP, real
JupyterHub; the hub is restarted once with ``allow_all`` added.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from tests.support.hub import HubProcess
from tests.support.idp import SUPPORT_CONTACT, LocalIdP, oidc_login
from tests.support.idp_users import hub_with_users

pytestmark = [pytest.mark.idp, pytest.mark.hub]

OPTIONS = """
c.InstitutionalAuthenticator.allow_allowed_organisations = False
c.InstitutionalAuthenticator.allowed_users = {"carol@uni-a.example"}
c.InstitutionalAuthenticator.allowed_groups = {"course-ml101"}
c.InstitutionalAuthenticator.blocked_users = {"victor@uni-a.example"}
c.InstitutionalAuthenticator.admin_groups = {"project-climate"}
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[HubProcess, LocalIdP]]:
    with hub_with_users(tmp_path_factory.mktemp("pipeline"), [], OPTIONS) as s:
        yield s


def attempt(hub: HubProcess, idp: LocalIdP, who: str) -> tuple[int, str | None, str]:
    result = oidc_login(hub.url, idp, who)
    me = result.session.get(f"{hub.url}/hub/api/user", timeout=10)
    name = me.json()["name"] if me.status_code == 200 else None
    return result.response.status_code, name, re.sub(r"\s+", " ", result.response.text)


# who -> (status, admin, why); names are <who>@uni-a.example
ADMITTED = {
    "alice": (False, "allowed_groups: course-ml101"),
    "carol": (True, "allowed_users; admin through admin_groups (project-climate)"),
    "olga": (True, "an operator is an admin, and admins are allowed"),
}
NOT_LISTED = "access list (the operators admit users by name, course or project)"
REFUSED = {
    "bob": ("not_allowed", NOT_LISTED),  # course-cv202 only
    "ivan": ("not_allowed", NOT_LISTED),  # instructors-ml101 only
    "victor": ("blocked", "is blocked on this portal"),  # in course-ml101, but blocked
}


@pytest.mark.parametrize("who", sorted(ADMITTED))
def test_allowed_users_groups_and_admins_get_in(stack: tuple[HubProcess, LocalIdP], who: str):
    hub, idp = stack
    admin, _why = ADMITTED[who]
    name = f"{who}@uni-a.example"
    status, me, _ = attempt(hub, idp, who)
    assert (status, me) == (200, name)
    model = hub.api("GET", f"/users/{name}").json()
    assert model["admin"] is admin
    assert ("admin" in model["roles"]) is admin


@pytest.mark.parametrize("who", sorted(REFUSED))
def test_others_are_refused_with_a_page_that_says_why(stack: tuple[HubProcess, LocalIdP], who: str):
    hub, idp = stack
    reason, text = REFUSED[who]
    status, me, page = attempt(hub, idp, who)
    assert (status, me) == (403, None)
    assert text in page and "portal-help@uni-a.example" in page
    assert SUPPORT_CONTACT.split(" (")[0] in page
    assert f"login refused: reason={reason} user={who}@uni-a.example" in hub.log_text()


def test_allow_all_lets_everyone_in_but_blocked_users_stay_out(
    stack: tuple[HubProcess, LocalIdP],
):
    hub, idp = stack
    hub.stop()
    hub.config_path.write_text(
        hub.config_path.read_text() + "\nc.InstitutionalAuthenticator.allow_all = True\n"
    )
    hub.start()
    assert attempt(hub, idp, "bob")[:2] == (200, "bob@uni-a.example")
    assert attempt(hub, idp, "ivan")[:2] == (200, "ivan@uni-a.example")
    status, me, page = attempt(hub, idp, "victor")
    assert (status, me) == (403, None) and "is blocked on this portal" in page
    # admin_groups still applies, and a user outside admin_groups is no admin.
    assert hub.api("GET", "/users/carol@uni-a.example").json()["admin"] is True
    assert hub.api("GET", "/users/bob@uni-a.example").json()["admin"] is False
