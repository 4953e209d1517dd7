"""Security properties of the pure layers: bounded messages, lease owners that cannot collide,
no secret names in job environments, and the scopes the portal hands out.

The same properties are proven end to end against a real hub in
``tests/hub/test_security_portal.py`` and in the extension in
``tests/extension/test_security_sessions.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sovereign_portal.extension.launchers import HTTP_ROUTES, safe_env_names
from sovereign_portal.hub.service import SERVER_TOKEN_SCOPES, service_role
from sovereign_portal.spawners.form import parse_form
from sovereign_portal.spawners.inventory import (
    Allocator,
    declared_devices,
    server_owner,
    session_owner,
    session_owner_prefix,
)
from sovereign_portal.spawners.request import RequestError, parse_request, request_from_size_id
from sovereign_portal.spawners.site import load_site
from sovereign_portal.spawners.sizes import Size

pytestmark = pytest.mark.unit

HUGE = "x" * 1_000_000


@pytest.mark.parametrize(
    "call",
    [
        lambda: parse_request({HUGE: 1}),
        lambda: parse_request({f"k{i}" + "y" * 1000: i for i in range(10_000)}),
        lambda: parse_request({"kind": HUGE, "partition": HUGE, "image": HUGE, "slice": HUGE}),
        lambda: request_from_size_id("h100x2x" + HUGE),
        lambda: request_from_size_id(HUGE),
        lambda: parse_form({HUGE: ["1"], "size": ["lab/h100x1"]}),
        lambda: parse_form({f"f{i}" + "y" * 1000: ["1"] for i in range(10_000)}),
        lambda: parse_form({"size": ["lab/h100x1x" + HUGE]}),
        lambda: parse_form({"size": ["lab/h100x1"], "walltime_minutes": [HUGE]}),
    ],
)
def test_refusals_of_huge_input_are_short(call: Callable[[], object]) -> None:
    """Unbounded input never becomes an unbounded message (shown to users and logged)."""
    with pytest.raises(RequestError) as e:
        call()
    assert len(str(e.value)) < 1000, str(e.value)[:200]


_names = st.text(st.characters(codec="utf-8"), min_size=1, max_size=12)


@settings(max_examples=300, deadline=None)
@given(_names, _names, st.text("0123456789abcdef", min_size=1, max_size=16))
def test_lease_owners_of_different_users_never_collide(a: str, b: str, gid: str) -> None:
    """No user name, however chosen (':' and '/' included), can name another user's lease."""
    owners_a = {server_owner(a), server_owner(a, "gpu"), session_owner(a, gid)}
    if a != b:
        owners_b = {server_owner(b), server_owner(b, "gpu"), session_owner(b, gid)}
        assert not owners_a & owners_b
        assert not any(o.startswith(session_owner_prefix(a)) for o in owners_b)
    # a notebook server is never taken for a session
    assert not server_owner(a).startswith("session:")
    assert not server_owner(a, "gpu").startswith(session_owner_prefix(a))


def test_stopping_alice_releases_no_one_elses_leases(tmp_path: Path) -> None:
    """Sibling names: 'alice' vs 'alice:x' (a session owner's prefix) and 'session:alice:ff'."""
    nt = load_site(None).partitions[0].nodes[0]
    alloc = Allocator(declared_devices(nt), tmp_path / "leases.json")
    one = Size(nt.name, nt.accelerator, gpus_per_node=1)
    alloc.allocate(session_owner("alice", "aa"), one)
    alloc.allocate(session_owner("alice:x", "bb"), one)
    alloc.allocate(server_owner("session:alice:ff"), one)
    alloc.allocate(server_owner("alice2"), one)
    gone = alloc.release_prefix(session_owner_prefix("alice"))
    assert len(gone) == 1
    reread = Allocator(declared_devices(nt), tmp_path / "leases.json")
    held = {
        o for o in (server_owner("session:alice:ff"), server_owner("alice2")) if reread.held_by(o)
    }
    assert len(held) == 2 and reread.held_by(session_owner("alice:x", "bb"))


def test_names_that_could_carry_a_secret_never_reach_jobs() -> None:
    for name in ("JUPYTERHUB_API_TOKEN", "JPY_API_TOKEN", "AWS_SECRET_ACCESS_KEY", "PGPASSWORD"):
        with pytest.raises(ValueError, match="looks like a secret"):
            safe_env_names(["PATH", name])


def test_dask_http_serves_health_only() -> None:
    """Dask's HTTP servers have no authentication: sessions serve /health and nothing else."""
    assert HTTP_ROUTES == ["distributed.http.health"]


def test_server_tokens_and_the_service_hold_no_admin_scope() -> None:
    """A server's token acts for its own server only; the service's token reads users, and
    for courses changes group membership and starts/stops servers, and for class starts reads
    token metadata (a claim is the student's OAuth token); it never accesses a server."""
    assert sorted(SERVER_TOKEN_SCOPES) == ["access:servers!server", "users:activity!user"]
    role = service_role()
    assert set(role["scopes"]) == {
        "read:users:name",
        "read:users:groups",
        "read:users",
        "read:roles:users",
        "groups",
        "servers",
        "read:tokens",
    }
    assert role["services"] == ["sovereign-portal"]
