"""The local OIDC IdP for tests, and a programmatic browser-like login with ``requests``.

The IdP itself is ``sovereign_portal.hub.idp.LocalIdP`` (also used by ``sovereign-portal up``).
This module's :class:`LocalIdP` adds the attack mode (``tamper=True``), which lives in the test
tree only (``idp_tamper.mjs``, loaded through the IdP's ``IDP_EXTENSION``) and never ships. It
also adds hub configuration text and a login helper that follows redirects by hand, the way a
browser resolves them (backslashes count as slashes), and never follows one off the deployment.
"""

from __future__ import annotations

import os
import re
import urllib.request
from dataclasses import dataclass, field
from html import unescape
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urljoin, urlsplit

import requests
from sovereign_portal.hub import idp as _idp
from sovereign_portal.hub.idp import IdPError, sample_users

__all__ = ["LocalIdP", "LoginResult", "hub_auth_config", "oidc_login", "sample_users"]

ALLOWED_ORG = "uni-a.example"
SUPPORT_CONTACT = "the portal help desk (portal-help@uni-a.example)"
#: The IdP extension that forges ID tokens on request (tests only).
TAMPER_JS = Path(__file__).with_name("idp_tamper.mjs")


class LocalIdP(_idp.LocalIdP):
    """The shipped local IdP; ``tamper=True`` loads the attack mode (:meth:`tamper`)."""

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        redirect_uris: list[str],
        *,
        tamper: bool = False,
        **kw: Any,
    ) -> None:
        if tamper:
            kw["extension"] = TAMPER_JS
        super().__init__(state_dir, redirect_uris, **kw)
        self.tamper_enabled = tamper

    def tamper(self, mode: str) -> None:
        """Make the IdP forge the next ID token it hands out (see ``idp_tamper.mjs``)."""
        if not self.tamper_enabled:
            raise IdPError("start LocalIdP(tamper=True) to forge tokens")
        data = urlencode({"mode": mode}).encode()
        url = f"{self.issuer}/__test__/tamper"
        req = urllib.request.Request(url, data=data, method="POST")
        with urllib.request.urlopen(req, timeout=5) as resp:
            if resp.status != 204:
                raise IdPError(f"tamper {mode}: HTTP {resp.status}")


def hub_auth_config(idp: LocalIdP, extra: str = "") -> str:
    """jupyterhub_config.py text that logs in through ``idp``."""
    return f"""
c.JupyterHub.authenticator_class = "sovereign_portal.hub.auth.InstitutionalAuthenticator"
c.InstitutionalAuthenticator.oidc_issuer = "{idp.issuer}"
c.InstitutionalAuthenticator.client_id = "{idp.client_id}"
c.InstitutionalAuthenticator.client_secret_file = "{idp.client_secret_file}"
c.InstitutionalAuthenticator.allowed_organisations = {{"{ALLOWED_ORG}"}}
c.InstitutionalAuthenticator.support_contact = "{SUPPORT_CONTACT}"
c.InstitutionalAuthenticator.auto_login = True
c.InstitutionalAuthenticator.jwks_refresh_cooldown = 1.0
{extra}
"""


def browser_resolve(base: str, location: str) -> str:
    """Resolve a Location header as a browser does (WHATWG: '\\' is '/', tabs/newlines dropped)."""
    cleaned = re.sub(r"[\t\n\r]", "", location).strip().replace("\\", "/")
    return urljoin(base, cleaned)


@dataclass
class LoginResult:
    session: requests.Session
    response: requests.Response
    hops: list[str] = field(default_factory=list)
    left_deployment: str | None = None
    callback_url: str | None = None

    @property
    def final_url(self) -> str:
        return self.hops[-1] if self.hops else self.response.url


def _follow(
    s: requests.Session,
    resp: requests.Response,
    hosts: set[str],
    result: LoginResult,
    stop_at_callback: bool = False,
) -> requests.Response:
    for _ in range(30):
        if resp.status_code not in (301, 302, 303, 307, 308):
            return resp
        target = browser_resolve(resp.url, resp.headers["Location"])
        result.hops.append(target)
        if urlsplit(target).netloc not in hosts:
            result.left_deployment = target
            return resp
        if "/hub/oauth_callback" in target:
            result.callback_url = target
            if stop_at_callback:
                return resp
        resp = s.get(target, allow_redirects=False, timeout=30)
    raise AssertionError(f"redirect loop: {result.hops[-5:]}")


def oidc_login(
    hub_url: str,
    idp: LocalIdP,
    username: str,
    password: str | None = None,
    *,
    start: str = "/hub/oauth_login",
    session: requests.Session | None = None,
    stop_at_callback: bool = False,
) -> LoginResult:
    """Log in like a browser: hub -> IdP form -> POST -> callback -> wherever the hub sends us.

    ``password`` defaults to the sample user's. Stops (without requesting it) at any redirect
    that leaves the hub and the IdP, recording it in ``left_deployment``. With
    ``stop_at_callback`` it records the hub callback URL without requesting it.
    """
    s = session or requests.Session()
    if password is None:
        password = next(u["password"] for u in sample_users() if u["username"] == username)
    hosts = {urlsplit(hub_url).netloc, urlsplit(idp.issuer).netloc}
    result = LoginResult(session=s, response=None)  # type: ignore[arg-type]
    resp = s.get(urljoin(hub_url, start), allow_redirects=False, timeout=30)
    resp = _follow(s, resp, hosts, result)
    if result.left_deployment or urlsplit(resp.url).netloc != urlsplit(idp.issuer).netloc:
        result.response = resp
        return result
    match = re.search(r'<form[^>]*action="([^"]+)"', resp.text)
    if not match:
        raise AssertionError(f"no login form at {resp.url}: {resp.status_code} {resp.text[:300]}")
    action = urljoin(resp.url, unescape(match.group(1)))
    resp = s.post(action, data={"username": username, "password": password}, allow_redirects=False)
    result.response = _follow(s, resp, hosts, result, stop_at_callback)
    return result


def idp_log(idp: LocalIdP) -> str:
    return Path(idp.log_path).read_text(errors="replace")
