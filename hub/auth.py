"""InstitutionalAuthenticator: OIDC login against a university IdP or an eduGAIN proxy.

Builds on oauthenticator's GenericOAuthenticator and adds what a federation login needs:

- OIDC discovery (retried while the IdP starts) and a check of the issuer it announces;
- PKCE, a per-login ``nonce``, single-use ``state`` and the RFC 9207 ``iss`` response check;
- ID-token validation with PyJWT's ``PyJWKClient`` (JWKS with key rotation): signature, ``alg``
  allow-list, ``iss``, ``aud``/``azp``, ``exp``/``iat`` with a small leeway, and ``nonce``; the
  userinfo response must belong to the same ``sub``;
- claims -> username, home organisation, role and groups (:mod:`.claims`), and role -> RBAC
  (:mod:`.rbac`), re-evaluated at every login (``manage_groups`` and ``manage_roles``);
- each hub account bound to one IdP subject (``iss``, ``sub``) at its first login
  (:mod:`.accounts`); a login with another subject is refused (``subject_mismatch``);
- no hub user name that names a system account (``c.UnixAccountPolicy``, shared with the
  spawners) gets in (``system_account``);
- a 403 page that says why entry was refused and whom to contact, a 503 "try again" page when
  the IdP (or the portal database) fails mid-login, and log lines that carry the reason but
  never a token or the whole userinfo.

It rides oauthenticator's login pipeline and calls ``super()`` at each step, so the inherited
options work as the oauthenticator docs say:

- ``get_token_info``: 503 when the token endpoint is down; the ID token is validated here (its
  nonce is an HMAC of the OAuth ``state``, so no private state format is read);
- ``token_to_user``: 503 when userinfo is down; userinfo must carry the ID token's ``sub``;
  the signed claims win;
- ``user_info_to_username``: claims -> :class:`~.claims.Identity`, or a refusal page;
- ``build_auth_state_dict``: only the portal's view (identity, ``iss``/``sub``, scopes),
  never tokens;
- ``update_auth_model``: the system-account rule, admin (operator role, ``admin_users``,
  ``admin_groups``) and the managed RBAC roles;
- ``get_user_groups``: course and project groups (``manage_groups`` must stay on: the
  instructors' RBAC roles filter on them);
- ``check_blocked_users``: ``blocked_users``, with a refusal page;
- ``check_allowed``: ``allow_all``, ``allowed_users``, ``allowed_groups``, ``allowed_scopes``,
  admins, and (unless ``allow_allowed_organisations = False``) every member of an allowed
  organisation;
- ``run_post_auth_hook``: the subject binding, then the operator's ``post_auth_hook``.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import jwt
from oauthenticator.generic import GenericOAuthenticator
from oauthenticator.oauth2 import OAuthCallbackHandler, OAuthLoginHandler, OAuthLogoutHandler
from sovereign_portal.spawners.accounts import UnixAccountPolicy
from sqlalchemy.exc import SQLAlchemyError
from tornado import web
from tornado.httpclient import AsyncHTTPClient, HTTPClientError
from traitlets import Bool, Dict, Float, Integer, List, Set, Unicode, default, validate

from .accounts import bind_or_check
from .claims import ROLES, ClaimPolicy, Denial, Identity, clip, map_claims
from .rbac import roles_for
from .store import PortalDatabase, PortalStore, redact_url

ASYMMETRIC_ALGS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA"]
DEFAULT_SCOPES = [
    "openid",
    "profile",
    "email",
    "groups",
    "eduperson_affiliation",
    "eduperson_entitlement",
    "schac_home_organization",
]


class LoginRefused(web.HTTPError):
    """A 403 whose page text (``jupyterhub_message``) says why and whom to contact.

    ``label`` is the reason label for logs and metrics (``subject_mismatch``, ...).
    """

    status = 403

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(self.status)  # no log_message: tornado would log the URL with the code
        self.label = reason
        self.jupyterhub_message = message


class LoginUnavailable(LoginRefused):
    """A 503: the IdP (or the portal's database) failed mid-login; the user should retry."""

    status = 503


UNREACHABLE = "The institutional login service is not reachable. Try again in a minute."


def oidc_nonce(key: bytes | str, state: str) -> str:
    """The nonce for one login: an HMAC of its OAuth ``state`` under the hub's cookie secret.

    The state is single-use and matched against the browser's state cookie, so the nonce is
    bound to this browser's login without a second cookie or a peek into oauthenticator's
    state format.
    """
    if isinstance(key, str):
        key = key.encode()
    return hmac.new(key, b"sovereign-portal-oidc-nonce:" + state.encode(), "sha256").hexdigest()


class _OnceCache:
    """Remembers values for ``ttl`` seconds; ``add`` is False for a value already seen."""

    def __init__(self, ttl: float = 900.0, size: int = 20000) -> None:
        self.ttl, self.size = ttl, size
        self._seen: OrderedDict[str, float] = OrderedDict()

    def add(self, value: str) -> bool:
        now = time.monotonic()
        while self._seen and (
            len(self._seen) >= self.size or next(iter(self._seen.values())) < now - self.ttl
        ):
            self._seen.popitem(last=False)
        if value in self._seen:
            return False
        self._seen[value] = now
        return True


class InstitutionalLoginHandler(OAuthLoginHandler):
    """Discovers the IdP first, then redirects with PKCE, state and the state's nonce."""

    async def get(self) -> None:
        await self.authenticator.discover_or_503()
        super().get()

    def authorize_redirect(self, *args: Any, extra_params: Any = None, **kwargs: Any) -> None:
        params = dict(extra_params or {})
        params["nonce"] = oidc_nonce(self.settings["cookie_secret"], str(params["state"]))
        super().authorize_redirect(*args, extra_params=params, **kwargs)


class InstitutionalCallbackHandler(OAuthCallbackHandler):
    """The OAuth callback, with single-use state and the RFC 9207 issuer check."""

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        # Tornado's default logs the full URL, with the authorization code: log the path only.
        where = f"{self.request.method} {self.request.path}"
        if isinstance(value, web.HTTPError):
            if value.log_message:
                msg = value.log_message % value.args if value.args else value.log_message
                self.log.warning("%d %s: %s", value.status_code, where, clip(msg, 300))
            return
        self.log.error("Uncaught exception in %s", where, exc_info=(typ, value, tb))

    def check_state(self) -> None:
        super().check_state()  # the URL's state matches the browser's state cookie
        if not self.authenticator.used_states.add(self.get_state_url()):
            self.log.warning("login refused: reason=replayed_state")
            raise web.HTTPError(400, "OAuth state already used")
        iss = self.get_argument("iss", None)
        if iss is not None and iss != self.authenticator.oidc_issuer:
            self.log.warning("login refused: reason=wrong_response_issuer")
            raise web.HTTPError(400, "OAuth response from an unexpected issuer")


class InstitutionalAuthenticator(GenericOAuthenticator):
    """Log in through an institutional OpenID Connect provider with eduPerson claims."""

    login_handler = InstitutionalLoginHandler
    callback_handler = InstitutionalCallbackHandler
    logout_handler = OAuthLogoutHandler

    # --- the IdP ---------------------------------------------------------------------------
    oidc_issuer = Unicode(
        "",
        config=True,
        help="""The OIDC issuer URL of the institution's IdP or federation proxy, exactly as it
        appears in the `iss` claim (for Keycloak: https://HOST/realms/REALM). The authenticator
        reads `<issuer>/.well-known/openid-configuration` and takes the authorize, token,
        userinfo and JWKS endpoints from it; the document must announce the same issuer.""",
    )
    discovery_timeout = Float(
        60.0,
        config=True,
        help="""Seconds to keep retrying OIDC discovery (with backoff) while the IdP is starting.
        A login attempted before discovery succeeds gets a 503 'try again' page.""",
    )
    client_secret_file = Unicode(
        "",
        config=True,
        help="""Read the OAuth client secret from this file (mode 0600) instead of the config
        or the environment. Keeps the secret out of config files, argv and process listings.""",
    )
    id_token_leeway = Integer(
        30,
        config=True,
        help="""Seconds of clock skew tolerated when checking the ID token's `exp`, `iat` and
        `nbf`. Keep it small: a larger value extends the life of stolen tokens.""",
    )
    id_token_max_age = Integer(
        600,
        config=True,
        help="""Reject ID tokens whose `iat` is older than this many seconds (plus leeway), even
        if `exp` is far away.""",
    )
    id_token_algorithms = List(
        Unicode(),
        default_value=["RS256", "PS256", "ES256", "EdDSA"],
        config=True,
        help="""Signature algorithms accepted for ID tokens. Only asymmetric algorithms are
        allowed (`none` and HMAC algorithms are always refused), and only those the IdP
        announces in `id_token_signing_alg_values_supported`.""",
    )
    idp_connections = Integer(
        64,
        min=1,
        config=True,
        help="""How many requests to the IdP (token, userinfo, discovery) the hub makes at once,
        on a connection pool of the authenticator's own. Tornado's shared client runs 10 at a
        time for the whole hub (the proxy's and the servers' calls too) and fails a request
        that waited 20 s in its queue: at a class start with 100 students logging in at once,
        a third of them got the 503 "try again" page. Raise it for larger classes; the IdP
        must accept that many connections from the hub.""",
    )
    jwks_cache_lifespan = Integer(
        300,
        config=True,
        help="""Seconds to cache the IdP's JWKS. A token signed with an unknown key id triggers
        an immediate refetch, so key rotation at the IdP needs no hub restart.""",
    )
    jwks_refresh_cooldown = Float(
        30.0,
        config=True,
        help="""Minimum seconds between two JWKS refetches triggered by unknown key ids, so that
        a flood of tokens with random key ids cannot hammer the IdP. A key the IdP has just
        rotated in is accepted once this has passed since the last fetch; IdPs usually publish
        new keys well before signing with them.""",
    )

    # --- claims -> identity ----------------------------------------------------------------
    allowed_organisations = Set(
        Unicode(),
        config=True,
        help="""Home organisations (schacHomeOrganization values or verified email domains,
        lowercase, e.g. 'uni-a.example') whose members may log in. Empty means NOBODY can log
        in, and the hub says so loudly at start.""",
    ).tag(allow_config=True)
    scope_username_with_organisation = Bool(
        True,
        config=True,
        help="""Append '@<home organisation>' to usernames that have no '@', so that 'alice'
        at two institutions become two hub users. Turn off only for a single-institution IdP.""",
    )
    home_organisation_claims = List(
        Unicode(),
        default_value=list(ClaimPolicy.home_organisation_claims),
        config=True,
        help="""Claims holding the home organisation, tried in order. If none is present, the
        domain of the `email` claim is used, but only when `email_verified` is true.""",
    )
    affiliation_claims = List(
        Unicode(),
        default_value=list(ClaimPolicy.affiliation_claims),
        config=True,
        help="""Claims holding eduPersonAffiliation values. Scoped values ('student@uni-a.example')
        count only when the scope is the user's home organisation.""",
    )
    entitlement_claims = List(
        Unicode(),
        default_value=list(ClaimPolicy.entitlement_claims),
        config=True,
        help="""Claims holding eduPersonEntitlement values. AARC-G002 entitlements
        ('urn:geant:<org>:group:course:<id>[:role=instructor]#<authority>') map to course,
        instructor and project groups; only those whose namespace is the home organisation or in
        `trusted_entitlement_authorities` count.""",
    )
    groups_claims = List(
        Unicode(),
        default_value=list(ClaimPolicy.groups_claims),
        config=True,
        help="""Claims holding plain group names. Only 'course-<id>' (course membership) and
        'project-<id>' values are used; others are ignored.""",
    )
    affiliation_roles = Dict(
        key_trait=Unicode(),
        value_trait=Unicode(),
        config=True,
        help="""Map eduPersonAffiliation values to portal roles (student, researcher,
        instructor, operator). A user with no mapped affiliation is refused ('missing
        affiliation'). Default: student->student, faculty/staff/employee->researcher.""",
    )

    @default("affiliation_roles")
    def _affiliation_roles_default(self) -> dict[str, str]:
        return dict(ClaimPolicy().affiliation_roles)

    @validate("affiliation_roles")
    def _check_affiliation_roles(self, proposal: Any) -> dict[str, str]:
        bad = {k: v for k, v in proposal.value.items() if v not in ROLES}
        if bad:
            raise ValueError(f"affiliation_roles maps to unknown roles {bad}; use one of {ROLES}")
        return dict(proposal.value)

    instructor_entitlement_roles = Set(
        Unicode(),
        default_value=set(ClaimPolicy.instructor_entitlement_roles),
        config=True,
        help="""AARC-G002 `role=` values on a course entitlement that make the user an
        instructor of that course.""",
    )
    operator_entitlement_groups = Set(
        Unicode(),
        default_value=set(ClaimPolicy.operator_entitlement_groups),
        config=True,
        help="""AARC-G002 group paths (in the home organisation's namespace) whose members are
        portal operators (hub admins), e.g. 'portal:operators'.""",
    )
    operator_entitlements = Set(
        Unicode(),
        config=True,
        help="""Exact eduPersonEntitlement values that make the user a portal operator.""",
    )
    required_entitlements = Set(
        Unicode(),
        config=True,
        help="""If set, a user must hold at least one of these exact eduPersonEntitlement values
        to log in; others are refused ('no entitlement').""",
    )
    trusted_entitlement_authorities = Set(
        Unicode(),
        config=True,
        help="""Entitlement namespaces other than the user's own home organisation that may
        grant courses and projects (for example a federation-wide course catalogue).""",
    )
    extra_role_scopes = Dict(
        key_trait=Unicode(),
        value_trait=List(Unicode()),
        config=True,
        help="""Extra JupyterHub scopes for the users of each portal role, added to the
        `portal-<role>` role that the authenticator manages, e.g.
        `{"instructor": ["read:users:activity"]}`. Because the authenticator manages roles
        (`manage_roles`), `JupyterHub.load_roles` may define roles but not assign them to users
        or groups: grant per-role permissions here.""",
    )

    @validate("extra_role_scopes")
    def _check_extra_role_scopes(self, proposal: Any) -> dict[str, list[str]]:
        bad = sorted(set(proposal.value) - set(ROLES))
        if bad:
            raise ValueError(f"extra_role_scopes has unknown roles {bad}; use one of {ROLES}")
        return dict(proposal.value)

    allow_allowed_organisations = Bool(
        True,
        config=True,
        help="""Let in every member of an `allowed_organisations` institution whose claims map
        to a portal role. Set it to False to admit only those that the inherited
        oauthenticator options allow: `allowed_users`, `allowed_groups` (the portal's
        `course-<id>`, `instructors-<id>` and `project-<id>` groups), `allowed_scopes`,
        `admin_users` / `admin_groups` and operators; `allow_all = True` lets in everyone
        whose claims map. A user outside `allowed_organisations` never gets in: the
        organisation decides which institution a user name belongs to.""",
    ).tag(allow_config=True)

    support_contact = Unicode(
        "your institution's IT service desk",
        config=True,
        help="""Whom a refused user should contact, shown on the refusal page (for example
        'the HPC help desk, hpc-support@uni-a.example').""",
    )

    # --- defaults of the parent classes ---------------------------------------------------
    @default("scope")
    def _scope_default(self) -> list[str]:
        return list(DEFAULT_SCOPES)

    @default("username_claim")
    def _username_claim_default(self) -> str:
        return "preferred_username"

    @default("manage_groups")
    def _manage_groups_default(self) -> bool:
        return True

    @default("manage_roles")
    def _manage_roles_default(self) -> bool:
        return True

    @default("login_service")
    def _login_service_default(self) -> str:
        return "your institution"

    @default("client_secret")
    def _client_secret_default(self) -> str:
        if self.client_secret_file:
            return Path(self.client_secret_file).read_text().strip()
        # As oauthenticator's own default: the class's env variable, then OAUTH_CLIENT_SECRET.
        env = str(getattr(self, "client_secret_env", "") or "")
        return (os.environ.get(env, "") if env else "") or os.environ.get("OAUTH_CLIENT_SECRET", "")

    @staticmethod
    def _managed_error(name: str) -> ValueError:
        return ValueError(
            f"InstitutionalAuthenticator.{name} must stay True: course, project and "
            "instructor groups and the portal roles come from the IdP's claims at every "
            "login, and the instructors' RBAC roles filter on those groups. Remove the "
            "setting (or set it to True)."
        )

    @validate("manage_groups", "manage_roles")
    def _keep_managed(self, proposal: Any) -> bool:
        if not proposal.value:
            raise self._managed_error(proposal.trait.name)
        return True

    @default("http_client")
    def _own_http_client(self) -> AsyncHTTPClient:
        return AsyncHTTPClient(force_instance=True, max_clients=self.idp_connections)

    # --- state -----------------------------------------------------------------------------
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._discovery: dict[str, Any] | None = None
        self._discovery_lock = asyncio.Lock()
        self._jwks: jwt.PyJWKClient | None = None
        self.used_states = _OnceCache()
        self.used_nonces = _OnceCache()
        self._store: PortalStore | None = None
        self._account_policy: UnixAccountPolicy | None = None
        for name in ("manage_groups", "manage_roles"):  # config loading skips @validate
            if not getattr(self, name):
                raise self._managed_error(name)

    def claim_policy(self) -> ClaimPolicy:
        return ClaimPolicy(
            allowed_organisations=frozenset(o.lower() for o in self.allowed_organisations),
            username_claim=str(self.username_claim),
            scope_username_with_organisation=self.scope_username_with_organisation,
            home_organisation_claims=tuple(self.home_organisation_claims),
            affiliation_claims=tuple(self.affiliation_claims),
            entitlement_claims=tuple(self.entitlement_claims),
            groups_claims=tuple(self.groups_claims),
            affiliation_roles=dict(self.affiliation_roles),
            instructor_entitlement_roles=frozenset(self.instructor_entitlement_roles),
            operator_entitlement_groups=frozenset(self.operator_entitlement_groups),
            operator_entitlements=frozenset(self.operator_entitlements),
            required_entitlements=frozenset(self.required_entitlements),
            trusted_entitlement_authorities=frozenset(self.trusted_entitlement_authorities),
            support_contact=self.support_contact,
        )

    def portal_store(self) -> PortalStore:
        """The portal database (``c.PortalDatabase``), opened and upgraded once."""
        if self._store is None:
            self._store = PortalDatabase(parent=self).open()
        return self._store

    def account_policy(self) -> UnixAccountPolicy:
        """The system-account rule (``c.UnixAccountPolicy``, shared with the spawners)."""
        if self._account_policy is None:
            self._account_policy = UnixAccountPolicy(parent=self)
        return self._account_policy

    def check_allow_config(self) -> None:
        super().check_allow_config()
        url = PortalDatabase(parent=self).url
        try:
            self.portal_store()  # fail at start, not at the first login
        except Exception as exc:
            raise RuntimeError(
                f"the portal database ({redact_url(url)}) cannot be opened or upgraded: "
                f"{clip(str(exc), 300)}; check c.PortalDatabase.url"
            ) from exc
        self.log.info("Portal database %s ready (account bindings)", redact_url(url))
        if not self.oidc_issuer:
            self.log.error("InstitutionalAuthenticator.oidc_issuer is not set: nobody can log in")
        if not self.allowed_organisations:
            bar = "!" * 78
            self.log.error(
                "\n%s\nInstitutionalAuthenticator.allowed_organisations is EMPTY:"
                " NOBODY CAN LOG IN."
                "\nSet c.InstitutionalAuthenticator.allowed_organisations = {'uni-a.example'}"
                "\n%s",
                bar,
                bar,
            )
        else:
            self.log.info(
                "Institutional login for %s via %s",
                ", ".join(sorted(self.allowed_organisations)),
                self.oidc_issuer,
            )

    # --- discovery -------------------------------------------------------------------------
    async def discover(self) -> dict[str, Any]:
        """Fetch and check the discovery document (once), retrying with backoff."""
        if self._discovery is not None:
            return self._discovery
        async with self._discovery_lock:
            if self._discovery is not None:
                return self._discovery
            if not self.oidc_issuer:
                raise RuntimeError("InstitutionalAuthenticator.oidc_issuer is not configured")
            url = self.oidc_issuer.rstrip("/") + "/.well-known/openid-configuration"
            deadline = time.monotonic() + self.discovery_timeout
            delay = 0.2
            while True:
                try:
                    doc = await self.httpfetch(url, "OIDC discovery", method="GET")
                    break
                except Exception as exc:
                    if time.monotonic() + delay > deadline:
                        raise RuntimeError(f"OIDC discovery at {url} failed: {exc}") from exc
                    self.log.info("OIDC discovery at %s not ready (%s); retrying", url, exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
            self._apply_discovery(doc)
            self._discovery = doc
            return doc

    def _apply_discovery(self, doc: dict[str, Any]) -> None:
        if doc.get("issuer") != self.oidc_issuer:
            raise RuntimeError(
                f"the IdP announces issuer {clip(doc.get('issuer'))!r}, "
                f"expected {self.oidc_issuer!r}: check InstitutionalAuthenticator.oidc_issuer"
            )
        methods = doc.get("code_challenge_methods_supported")
        if methods is not None and "S256" not in methods:
            raise RuntimeError("the IdP does not announce PKCE S256 support")
        for key in ("authorization_endpoint", "token_endpoint", "userinfo_endpoint", "jwks_uri"):
            if not isinstance(doc.get(key), str):
                raise RuntimeError(f"the IdP's discovery document has no {key}")
        self.authorize_url = doc["authorization_endpoint"]
        self.token_url = doc["token_endpoint"]
        self.userdata_url = doc["userinfo_endpoint"]
        self._jwks = jwt.PyJWKClient(
            doc["jwks_uri"],
            cache_keys=True,
            lifespan=self.jwks_cache_lifespan,
            timeout=10,
            cooldown_duration=self.jwks_refresh_cooldown,
        )
        self.log.info("OIDC discovery: issuer %s ready", self.oidc_issuer)

    async def discover_or_503(self) -> dict[str, Any]:
        try:
            return await self.discover()
        except Exception as exc:
            self.log.error("login failed: reason=idp_unreachable step=discovery %s", exc)
            raise LoginUnavailable("idp_unreachable", UNREACHABLE) from exc

    def _idp_failure(self, step: str, exc: BaseException) -> LoginRefused:
        """A failed call to the IdP mid-login, as a page: 503 when it is down, else 403."""
        if isinstance(exc, HTTPClientError) and 400 <= exc.code < 500:
            # The IdP answered and said no (an expired or already used code, ...).
            self.log.warning("login refused: reason=idp_refused step=%s status=%d", step, exc.code)
            return LoginRefused(
                "idp_refused",
                "Your institution's sign-in service did not accept this sign-in, so you were "
                "not logged in. Please sign in again; if it keeps failing, contact "
                f"{self.support_contact}.",
            )
        what = f"HTTP {exc.code}" if isinstance(exc, HTTPClientError) else type(exc).__name__
        self.log.error("login failed: reason=idp_unreachable step=%s %s", step, what)
        return LoginUnavailable("idp_unreachable", UNREACHABLE)

    def _algorithms(self) -> list[str]:
        announced = (self._discovery or {}).get("id_token_signing_alg_values_supported")
        algs = [a for a in self.id_token_algorithms if a in ASYMMETRIC_ALGS]
        if announced is not None:
            algs = [a for a in algs if a in announced]
        return algs

    # --- the ID token ----------------------------------------------------------------------
    async def validate_id_token(self, id_token: Any, nonce: str) -> dict[str, Any]:
        """Verify the ID token and return its claims, or raise :class:`LoginRefused`."""

        def refuse(reason: str, exc: object = "") -> LoginRefused:
            self.log.warning("login refused: reason=%s %s", reason, clip(str(exc), 200))
            return LoginRefused(
                reason,
                "Your institution's sign-in answer could not be verified, so you were not "
                "logged in. Please try again; if it keeps failing, contact "
                f"{self.support_contact}.",
            )

        if not isinstance(id_token, str) or not id_token or len(id_token) > 16384:
            raise refuse("id_token_missing")
        if not nonce:
            raise refuse("nonce_missing_from_state")
        assert self._jwks is not None
        jwks = self._jwks
        try:
            header = jwt.get_unverified_header(id_token)
            if header.get("alg") not in self._algorithms():
                raise jwt.InvalidAlgorithmError(f"alg {clip(header.get('alg'))} not accepted")
            key = await asyncio.to_thread(jwks.get_signing_key_from_jwt, id_token)
            claims: dict[str, Any] = jwt.decode(
                id_token,
                key=key.key,
                algorithms=self._algorithms(),
                audience=self.client_id,
                issuer=self.oidc_issuer,
                leeway=self.id_token_leeway,
                options={"require": ["iss", "aud", "exp", "iat", "sub", "nonce"]},
            )
        except jwt.PyJWKClientConnectionError as exc:
            raise self._idp_failure("jwks", exc) from None
        except (jwt.PyJWTError, ValueError) as exc:
            raise refuse("id_token_invalid", f"{type(exc).__name__}: {exc}") from None
        aud = claims["aud"]
        if isinstance(aud, list) and len(aud) > 1 and claims.get("azp") != self.client_id:
            raise refuse("id_token_azp")
        now = time.time()
        if not isinstance(claims["iat"], int | float) or (
            claims["iat"] > now + self.id_token_leeway
            or claims["iat"] < now - self.id_token_max_age - self.id_token_leeway
        ):
            raise refuse("id_token_iat")
        if not isinstance(claims["nonce"], str) or not hmac.compare_digest(
            claims["nonce"].encode(), nonce.encode()
        ):
            raise refuse("id_token_nonce")
        if not self.used_nonces.add(nonce):
            raise refuse("replayed_nonce")
        if not isinstance(claims["sub"], str) or not claims["sub"]:
            raise refuse("id_token_sub")
        return claims

    # --- the login: oauthenticator's pipeline, one hook at a time --------------------------
    async def authenticate(self, handler: Any, data: Any = None, **kwargs: Any) -> Any:
        await self.discover_or_503()  # the endpoints come from discovery
        return await super().authenticate(handler, data, **kwargs)

    async def get_token_info(self, handler: Any, params: Any) -> dict[str, Any]:
        """The token response, with the validated ID-token claims under ``portal_id_claims``."""
        try:
            token_info: dict[str, Any] = await super().get_token_info(handler, params)
        except web.HTTPError as exc:  # oauthenticator's "no access token" answers
            self.log.warning("login refused: reason=token_response_invalid")
            raise LoginRefused(
                "token_response_invalid",
                "Your institution's sign-in answer could not be verified, so you were not "
                f"logged in. Please try again; if it keeps failing, contact "
                f"{self.support_contact}.",
            ) from exc
        except (HTTPClientError, OSError) as exc:
            raise self._idp_failure("token", exc) from None
        nonce = oidc_nonce(handler.settings["cookie_secret"], handler.get_state_url())
        token_info["portal_id_claims"] = await self.validate_id_token(
            token_info.get("id_token"), nonce
        )
        return token_info

    async def token_to_user(self, token_info: dict[str, Any]) -> dict[str, Any]:
        """Userinfo merged under the signed ID-token claims; it must be the same ``sub``."""
        id_claims = token_info["portal_id_claims"]
        try:
            userinfo = await super().token_to_user(token_info)
        except (HTTPClientError, OSError) as exc:
            raise self._idp_failure("userinfo", exc) from None
        if not isinstance(userinfo, dict) or userinfo.get("sub") != id_claims["sub"]:
            self.log.warning("login refused: reason=userinfo_sub_mismatch")
            raise LoginRefused(
                "userinfo_sub_mismatch",
                "Your institution's sign-in answer was inconsistent, so you were not logged in. "
                f"Contact {self.support_contact}.",
            )
        # Signed ID-token claims win over userinfo; userinfo fills in what the token lacks.
        return {**userinfo, **id_claims}

    def identity(self, claims: dict[str, Any]) -> Identity:
        """The portal identity of these claims, or :class:`LoginRefused` saying why not."""
        result = map_claims(claims, self.claim_policy())
        if isinstance(result, Denial):
            self.log.warning(
                "login refused: reason=%s sub=%s %s",
                result.reason,
                clip(claims.get("sub"), 80),
                result.detail,
            )
            raise LoginRefused(result.reason, result.message)
        return result

    def user_info_to_username(self, user_info: dict[str, Any]) -> str:
        return self.identity(user_info).username

    def build_auth_state_dict(self, token_info: Any, user_info: Any) -> dict[str, Any]:
        # Only the portal's view of the user: no tokens, no raw userinfo.
        scope = token_info.get("scope", "")
        return {
            "portal": self.identity(user_info).as_dict(),
            "oidc": {"iss": user_info["iss"], "sub": user_info["sub"]},
            "scope": scope.split(" ") if isinstance(scope, str) else list(scope or []),
        }

    async def update_auth_model(self, auth_model: dict[str, Any]) -> dict[str, Any]:
        """System accounts stay out; admin and the managed roles follow the portal role."""
        name = auth_model["name"]
        why = self.account_policy().refusal(name)
        if why is not None:
            self.log.warning("login refused: reason=system_account user=%s (%s)", clip(name), why)
            raise LoginRefused(
                "system_account",
                f"The user name your institution sent ({clip(name, 60)}) is the name of a "
                "system account on this portal, so you cannot log in with it. "
                f"Contact {self.support_contact}.",
            )
        identity = Identity.from_dict({**auth_model["auth_state"]["portal"], "username": name})
        identity, groups, assisting = await self.course_memberships(identity)
        portal = {**identity.as_dict(), "groups": groups, "assisting": assisting}
        auth_model["auth_state"]["portal"] = portal  # get_user_groups reads these groups
        admin = bool(
            auth_model["admin"]
            or identity.role == "operator"
            or name in self.admin_users
            or set(identity.groups) & set(self.admin_groups)
        )
        auth_model["admin"] = admin
        auth_model["roles"] = roles_for(
            identity, admin=admin, extra_scopes=self.extra_role_scopes, assisting=assisting
        )
        return auth_model

    async def course_memberships(self, identity: Identity) -> tuple[Identity, list[str], list[str]]:
        """The identity with the portal's course records folded in (roster additions and
        removals, instructors and TAs: :func:`.courses.apply_memberships`), its hub groups,
        and the courses the user assists in."""
        from .course_store import CourseStore
        from .courses import apply_memberships

        try:
            store = CourseStore(self.portal_store())
            m = await asyncio.to_thread(store.memberships, identity.username)
        except SQLAlchemyError as exc:
            self.log.error(
                "login failed: reason=portal_db_unavailable user=%s %s",
                clip(identity.username),
                clip(str(exc), 200),
            )
            raise LoginUnavailable(
                "portal_db_unavailable",
                "The portal cannot check your courses right now. Try again in a minute.",
            ) from None
        new, groups = apply_memberships(identity, m)
        return new, groups, sorted(m.assisting)

    async def get_user_groups(self, auth_state: dict[str, Any]) -> set[str]:
        return set(auth_state["portal"]["groups"])

    async def check_blocked_users(self, username: str, auth_model: Any = None) -> bool:
        passed = super().check_blocked_users(username, auth_model)
        if inspect.isawaitable(passed):
            passed = await passed
        if passed:
            return True
        self.log.warning("login refused: reason=blocked user=%s", clip(username))
        raise LoginRefused(
            "blocked",
            f"The account {clip(username, 60)} is blocked on this portal. "
            f"Contact {self.support_contact}.",
        )

    async def check_allowed(self, username: str, auth_model: Any) -> bool:
        """oauthenticator's allow rules, or membership of an allowed organisation."""
        if auth_model is None:  # JupyterHub < 5 asks without a model; a login always has one
            return False
        portal = (auth_model.get("auth_state") or {}).get("portal") or {}
        if portal.get("role") not in ROLES:
            return False
        if await super().check_allowed(username, auth_model):
            return True
        if self.allow_allowed_organisations and portal.get("home_organisation") in {
            o.lower() for o in self.allowed_organisations
        }:
            return True
        self.log.warning("login refused: reason=not_allowed user=%s", clip(username))
        raise LoginRefused(
            "not_allowed",
            "Your account is not on this portal's access list (the operators admit users by "
            f"name, course or project). Contact {self.support_contact}.",
        )

    async def run_post_auth_hook(self, handler: Any, authentication: Any) -> Any:
        """Bind the account to its IdP subject (or refuse another subject), then the hook."""
        name = authentication["name"]
        oidc = authentication["auth_state"]["oidc"]
        await self.check_binding(name, oidc["iss"], oidc["sub"])
        portal = authentication["auth_state"]["portal"]
        self.log.info(
            "login: %s role=%s org=%s groups=%s",
            name,
            portal["role"],
            portal["home_organisation"],
            ",".join(authentication.get("groups") or portal["groups"]) or "-",
        )
        return await super().run_post_auth_hook(handler, authentication)

    async def check_binding(self, username: str, issuer: str, subject: str) -> None:
        """Refuse (403 ``subject_mismatch``) a subject other than the one bound to the name."""
        try:
            store = self.portal_store()
            check = await asyncio.to_thread(bind_or_check, store, username, issuer, subject)
        except SQLAlchemyError as exc:
            self.log.error(
                "login failed: reason=portal_db_unavailable user=%s %s",
                clip(username),
                clip(str(exc), 200),
            )
            raise LoginUnavailable(
                "portal_db_unavailable",
                "The portal cannot check your account right now. Try again in a minute.",
            ) from None
        if check.ok:
            return
        self.log.warning(
            "login refused: reason=subject_mismatch user=%s iss=%s sub=%s "
            "(the account is bound to another subject since %s)",
            clip(username),
            clip(issuer, 200),
            clip(subject, 80),
            check.binding.bound_at.isoformat(timespec="seconds"),
        )
        raise LoginRefused(
            "subject_mismatch",
            f"The portal account {clip(username, 60)} belongs to another identity at your "
            "institution's sign-in service, so you were not logged in. This happens when two "
            "sign-in identities map to the same portal user name, or when your institution "
            "re-issued your identity. Contact "
            f"{self.support_contact} and quote the account name: an operator can check it "
            "and re-bind the account to you.",
        )

    async def refresh_user(self, user: Any, handler: Any = None, **kwargs: Any) -> bool:
        # Claims, role and groups are re-read at the next login; nothing to refresh in between
        # (no tokens are kept, so there is nothing to refresh them with).
        return True
