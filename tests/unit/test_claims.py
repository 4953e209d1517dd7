"""Claims -> identity, role, groups and RBAC roles: the pure rules, no network."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sovereign_portal.hub.auth import InstitutionalAuthenticator
from sovereign_portal.hub.claims import (
    ClaimPolicy,
    Denial,
    Identity,
    home_organisation,
    map_claims,
    normalise_username,
)
from sovereign_portal.hub.idp import sample_users
from sovereign_portal.hub.rbac import instructor_role, roles_for

pytestmark = pytest.mark.unit

ORG = "uni-a.example"
POLICY = ClaimPolicy(allowed_organisations=frozenset({ORG}), support_contact="the help desk")


def ent(path: str, role: str | None = None, ns: str = ORG) -> str:
    return f"urn:geant:{ns}:group:{path}{f':role={role}' if role else ''}#{ns}"


def claims(**kw: object) -> dict[str, object]:
    base: dict[str, object] = {
        "sub": "x",
        "preferred_username": "alice",
        "schacHomeOrganization": ORG,
        "eduPersonAffiliation": ["student", "member"],
    }
    base.update(kw)
    return base


def identity(**kw: object) -> Identity:
    out = map_claims(claims(**kw), POLICY)
    assert isinstance(out, Identity), out
    return out


def denial(**kw: object) -> Denial:
    out = map_claims(claims(**kw), POLICY)
    assert isinstance(out, Denial), out
    return out


ROLE_TABLE = [
    # affiliations, entitlements, groups -> role, hub groups
    (["student"], [ent("course:ml101")], [], "student", ["course-ml101"]),
    (["student"], [], ["course-ml101", "project-x", "staff-lounge"], "student",
     ["course-ml101", "project-x"]),
    (["faculty"], [ent("project:climate")], [], "researcher", ["project-climate"]),
    (["staff", "member"], [], [], "researcher", []),
    (["employee"], [ent("courses:cv202", "instructor")], [], "instructor", ["instructors-cv202"]),
    (["faculty"], [ent("course:ml101", "teacher"), ent("course:cv202")], [], "instructor",
     ["course-cv202", "instructors-ml101"]),
    (["staff"], [ent("portal:operators")], [], "operator", []),
    (["student"], [ent("portal:operators", "operator")], [], "operator", []),
    (["student@uni-a.example"], [], [], "student", []),  # scoped affiliation, own scope
    (["faculty@cs.uni-a.example"], [], [], "researcher", []),  # subdomain scope
]  # fmt: skip


@pytest.mark.parametrize(("aff", "ents", "groups", "role", "hub_groups"), ROLE_TABLE)
def test_role_and_groups_table(aff, ents, groups, role, hub_groups):
    who = identity(eduPersonAffiliation=aff, eduPersonEntitlement=ents, groups=groups)
    assert who.role == role
    assert who.groups == hub_groups
    assert who.username == "alice@uni-a.example"


def test_entitlements_from_another_namespace_grant_nothing():
    who = identity(
        eduPersonEntitlement=[
            ent("portal:operators", ns="evil.example"),
            ent("course:ml101", "instructor", ns="evil.example"),
            "urn:geant:uni-a.example:group:course:Bad_Id#uni-a.example",
        ]
    )
    assert who.role == "student" and who.groups == []
    trusting = ClaimPolicy(
        allowed_organisations=frozenset({ORG}),
        trusted_entitlement_authorities=frozenset({"courses.example"}),
    )
    out = map_claims(
        claims(eduPersonEntitlement=[ent("course:ml101", ns="courses.example")]), trusting
    )
    assert isinstance(out, Identity) and out.courses == {"ml101"}


def test_exact_operator_entitlement():
    policy = ClaimPolicy(
        allowed_organisations=frozenset({ORG}),
        operator_entitlements=frozenset({"urn:mace:uni-a.example:hpc-admins"}),
    )
    out = map_claims(claims(eduPersonEntitlement=["urn:mace:uni-a.example:hpc-admins"]), policy)
    assert isinstance(out, Identity) and out.role == "operator"


def test_scoped_affiliation_from_another_organisation_does_not_count():
    d = denial(eduPersonAffiliation=["faculty@other.example"])
    assert d.reason == "missing_affiliation"


@pytest.mark.parametrize(
    ("kw", "reason", "text"),
    [
        ({"schacHomeOrganization": "other-college.example"}, "unknown_institution",
         "Your institution (other-college.example) is not connected"),
        ({"schacHomeOrganization": None, "email": "eve@uni-a.example", "email_verified": False},
         "unknown_institution", "no verified email"),
        ({"schacHomeOrganization": None, "email": "eve@uni-a.example"}, "unknown_institution",
         "no verified email"),
        ({"schacHomeOrganization": None, "email": "eve@uni-a.example", "email_verified": "no"},
         "unknown_institution", "no verified email"),
        ({"schacHomeOrganization": "uni-a.example.evil.example"}, "unknown_institution",
         "not connected"),
        ({"schacHomeOrganization": "not a domain"}, "unknown_institution", "could not tell"),
        ({"eduPersonAffiliation": []}, "missing_affiliation", "(eduPersonAffiliation)"),
        ({"eduPersonAffiliation": ["affiliate", "alum"]}, "missing_affiliation", "student"),
        ({"preferred_username": ""}, "no_username", "user name"),
        ({"preferred_username": ["alice"]}, "no_username", "user name"),
        ({"preferred_username": "a" * 300}, "no_username", "user name"),
    ],
)  # fmt: skip
def test_denials_say_why_and_whom_to_contact(kw, reason, text):
    d = denial(**kw)
    assert d.reason == reason
    assert text in d.message
    assert "contact the help desk" in d.message


def test_verified_email_gives_the_home_organisation():
    who = identity(schacHomeOrganization=None, email="Victor@Uni-A.example", email_verified=True)
    assert who.home_organisation == ORG
    assert home_organisation({"email": "v@uni-a.example", "email_verified": "true"}, POLICY) == ORG
    # schacHomeOrganization wins over the email domain
    assert (
        home_organisation(
            {"schacHomeOrganization": "b.example", "email": "v@a.example", "email_verified": True},
            POLICY,
        )
        == "b.example"
    )


def test_required_entitlement():
    policy = ClaimPolicy(
        allowed_organisations=frozenset({ORG}),
        required_entitlements=frozenset({"urn:mace:uni-a.example:gpu-users"}),
    )
    out = map_claims(claims(), policy)
    assert isinstance(out, Denial) and out.reason == "no_entitlement"
    assert "(eduPersonEntitlement)" in out.message
    ok = map_claims(claims(eduPersonEntitlement=["urn:mace:uni-a.example:gpu-users"]), policy)
    assert isinstance(ok, Identity)


def test_empty_allow_list_lets_nobody_in():
    for user in sample_users():
        out = map_claims(user["claims"] | {"sub": user["sub"]}, ClaimPolicy())
        assert isinstance(out, Denial) and out.reason == "unknown_institution"


def test_sample_users_map_as_documented():
    got = {}
    for user in sample_users():
        out = map_claims(user["claims"] | {"sub": user["sub"]}, POLICY)
        got[user["username"]] = out.role if isinstance(out, Identity) else out.reason
    assert got == {
        "alice": "student",
        "bob": "student",
        "carol": "researcher",
        "ivan": "instructor",
        "olga": "operator",
        "victor": "student",
        "mallory": "unknown_institution",
        "nora": "missing_affiliation",
        "eve": "unknown_institution",
    }


def test_unbounded_claims_are_cut():
    huge = ["student"] * 10_000 + ["x" * 100_000]
    who = identity(eduPersonAffiliation=huge, groups=["course-" + "a" * 5000] * 1000)
    assert who.role == "student" and who.groups == []
    d = denial(schacHomeOrganization="evil" * 10_000 + ".example")
    assert len(d.message) < 400 and len(d.detail) <= 100


# --- usernames ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("alice", "alice@uni-a.example"),
        ("alice@uni-a.example", "alice@uni-a.example"),
        ("a.b-c_d@uni-a.example", "a.b-c_d@uni-a.example"),
        ("a.b+c@uni-a.example", None),  # '+' is not canonical: hashed
    ],
)
def test_canonical_usernames_are_kept(raw, expected):
    out = normalise_username(raw, ORG, POLICY)
    if expected:
        assert out == expected
    else:
        assert out.startswith("a.b-c-uni-a.example-") and len(out.rsplit("-", 1)[1]) == 10


def test_case_and_escaping_never_collide():
    names = [
        "alice",
        "Alice",
        "ALICE",
        "alice@UNI-A.example",
        "alice@uni-b.example",
        "alice@uni-a.example@uni-a.example",
        "alïce",
        "alice ",
        "al ice",
        "al/ice",
        "al%20ice",
    ]
    out = [normalise_username(n, ORG, POLICY) for n in names]
    assert len(set(out)) == len(names), out
    # A canonical name that looks like a hashed one is hashed too, so it cannot be forged.
    hashed = normalise_username("Alice", ORG, POLICY)
    assert normalise_username(hashed, ORG, POLICY) != hashed


def test_an_idp_cannot_claim_another_institutions_user():
    # uni-b's IdP says its user is "alice@uni-a.example": not uni-a's alice.
    forged = normalise_username("alice@uni-a.example", "uni-b.example", POLICY)
    assert forged != "alice@uni-a.example" and forged.startswith("alice-uni-a.example-uni-b")
    # An eduPersonPrincipalName scoped with the home organisation is the same account.
    assert normalise_username("alice@uni-a.example", ORG, POLICY) == "alice@uni-a.example"


def test_same_local_name_at_two_institutions():
    assert normalise_username("alice", "uni-a.example", POLICY) != normalise_username(
        "alice", "uni-b.example", POLICY
    )


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=20), min_size=2, max_size=8, unique=True))
def test_normalisation_is_injective(raws):
    out = {normalise_username(r, ORG, POLICY) for r in raws}
    assert len(out) == len(raws)
    for name in out:
        assert name == name.lower() and len(name) <= 112


@settings(max_examples=200, deadline=None)
@given(st.lists(st.from_regex(r"[a-z0-9][a-z0-9-]{0,12}", fullmatch=True), min_size=1, max_size=6))
def test_group_names_are_injective(ids):
    ents = [ent(f"course:{i}") for i in ids] + [ent(f"course:{i}", "instructor") for i in ids]
    ents += [ent(f"project:{i}") for i in ids]
    who = identity(eduPersonAffiliation=["faculty"], eduPersonEntitlement=ents)
    assert len(who.groups) == 3 * len(set(ids))


# --- RBAC --------------------------------------------------------------------------------------
def test_rbac_roles():
    student = Identity("a@x", "x", "student", courses=frozenset({"ml101"}))
    assert roles_for(student) == [
        {"name": "user"},
        {"name": "portal-student", "description": roles_for(student)[1]["description"],
         "scopes": ["self"]},
    ]  # fmt: skip
    teacher = Identity("i@x", "x", "instructor", teaching=frozenset({"ml101", "cv202"}))
    names = [r["name"] for r in roles_for(teacher)]
    assert names == ["user", "portal-instructor", "instructor-cv202", "instructor-ml101"]
    scopes = instructor_role("ml101")["scopes"]
    assert all(s.endswith("!group=course-ml101") for s in scopes)
    # staff start and stop the course's servers; opening one is a recorded share (courses)
    assert "servers!group=course-ml101" in scopes
    assert not any(s.startswith(("admin", "access:")) for s in scopes)
    ta = roles_for(Identity("t@x", "x", "student"), assisting=["ml101"])
    assert [r["name"] for r in ta] == ["user", "portal-student", "ta-ml101"]
    assert ta[2]["scopes"] == scopes
    operator = Identity("o@x", "x", "operator")
    assert {"name": "admin"} in roles_for(operator)
    assert {"name": "admin"} not in roles_for(teacher)
    # an admin from admin_users keeps the admin role (manage_roles would strip it otherwise)
    assert {"name": "admin"} in roles_for(student, admin=True)
    extra = roles_for(teacher, extra_scopes={"instructor": ["read:users:activity"]})
    assert extra[1]["scopes"] == ["self", "read:users:activity"]


def test_extra_role_scopes_are_checked_at_config_time():
    with pytest.raises(ValueError, match="unknown roles"):
        InstitutionalAuthenticator(extra_role_scopes={"professor": ["list:users"]})


# --- authenticator configuration ---------------------------------------------------------------
def test_authenticator_defaults_and_policy():
    auth = InstitutionalAuthenticator(allowed_organisations={"Uni-A.example"})
    assert auth.enable_pkce and auth.manage_groups and auth.manage_roles
    assert "eduperson_entitlement" in auth.scope and "openid" in auth.scope
    policy = auth.claim_policy()
    assert policy.allowed_organisations == {"uni-a.example"}
    assert policy.affiliation_roles["faculty"] == "researcher"


def test_bad_affiliation_role_is_refused_at_config_time():
    with pytest.raises(ValueError, match="unknown roles"):
        InstitutionalAuthenticator(affiliation_roles={"student": "superuser"})


def test_client_secret_from_file(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("s3cret-from-file\n")
    auth = InstitutionalAuthenticator(client_secret_file=str(secret))
    assert auth.client_secret == "s3cret-from-file"


def test_empty_allow_config_warns_loudly(caplog):
    auth = InstitutionalAuthenticator(oidc_issuer="http://127.0.0.1:1")
    auth.log = logging.getLogger("test-auth")
    with caplog.at_level(logging.WARNING, logger="test-auth"):
        auth.check_allow_config()
    assert "NOBODY CAN LOG IN" in caplog.text
    assert all(r.levelno >= logging.ERROR for r in caplog.records)


def test_entry_point_is_registered():
    from importlib.metadata import entry_points

    eps = entry_points(group="jupyterhub.authenticators")
    assert any(
        ep.name == "institutional" and ep.value.endswith(":InstitutionalAuthenticator")
        for ep in eps
    )


def test_discovery_must_announce_the_configured_issuer():
    auth = InstitutionalAuthenticator(oidc_issuer="https://idp.uni-a.example/realms/u")
    doc = {
        "issuer": "https://evil.example/realms/u",
        "authorization_endpoint": "https://idp.uni-a.example/auth",
        "token_endpoint": "https://idp.uni-a.example/token",
        "userinfo_endpoint": "https://idp.uni-a.example/userinfo",
        "jwks_uri": "https://idp.uni-a.example/jwks",
        "code_challenge_methods_supported": ["S256"],
    }
    with pytest.raises(RuntimeError, match="announces issuer"):
        auth._apply_discovery(doc)
    doc["issuer"] = auth.oidc_issuer
    with pytest.raises(RuntimeError, match="PKCE"):
        auth._apply_discovery(doc | {"code_challenge_methods_supported": ["plain"]})
    auth._apply_discovery(doc)
    assert auth.token_url == "https://idp.uni-a.example/token"


def test_only_asymmetric_algorithms_are_accepted():
    auth = InstitutionalAuthenticator(id_token_algorithms=["RS256", "HS256", "none"])
    auth._discovery = {"id_token_signing_alg_values_supported": ["RS256", "HS256", "none"]}
    assert auth._algorithms() == ["RS256"]
