"""Placement by residency (spawners/placement.py): properties over generated site files,
rules and site states, then the cases the issue names, as examples.

The properties: a placement is never on a partition whose country a rule forbids, never
on an unreachable site, never on a partition that does not offer the size or is closed to
the caller's groups; it queues only when every allowed, reachable candidate is full; when
no allowed site is reachable it is refused; a user's choice of a forbidden partition or
site is refused, never moved.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sovereign_portal.spawners.placement import (
    HOST_SITE,
    Need,
    PlacementRefused,
    Rule,
    SiteState,
    place,
    residency_rules,
)
from sovereign_portal.spawners.site import Site, load_site, parse_site

from tests.support.paths import REPO

pytestmark = pytest.mark.unit

COUNTRIES = ("FR", "DE", "IT", "NL", "CH")
GROUPS = ("climate", "bio", "cs101")


def _partition(i: int, site: str | None, country: str, groups: list[str]) -> dict[str, Any]:
    p: dict[str, Any] = {
        "name": f"p{i}",
        "backend": "slurm",
        "carbon_g_per_kwh": float(50 + 37 * i % 400),
        "price_eur_per_gpu_hour": {"h100": 1.0 + (i * 7 % 5) / 2},
        "nodes": [{"name": "n", "accelerator": "h100", "gpus": 8}],
        "allowed_groups": groups,
    }
    if site is None:
        p["jurisdiction"] = {"country": country, "operator": f"Op {country}"}
    else:
        p["site"] = site
    return p


@st.composite
def site_files(draw: st.DrawFn) -> Site:
    """A site file with 1-4 declared sites (or none), each with 1-3 partitions."""
    n_sites = draw(st.integers(0, 4))
    sites = []
    parts = []
    i = 0
    if n_sites == 0:
        for _ in range(draw(st.integers(1, 4))):
            country = draw(st.sampled_from(COUNTRIES))
            groups = draw(st.lists(st.sampled_from(GROUPS), max_size=1, unique=True))
            parts.append(_partition(i, None, country, groups))
            i += 1
    for s in range(n_sites):
        country = draw(st.sampled_from(COUNTRIES))
        name = f"s{s}"
        sites.append(
            {
                "name": name,
                "country": country,
                "operator": f"Op {country}",
                "scheduler": {"transport": "cli"},
            }
        )
        for _ in range(draw(st.integers(1, 3))):
            groups = draw(st.lists(st.sampled_from(GROUPS), max_size=1, unique=True))
            parts.append(_partition(i, name, country, groups))
            i += 1
    return parse_site({"name": "gen", "sites": sites, "partitions": parts})


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, Any]:
    site = draw(site_files())
    site_names = sorted({p.site or HOST_SITE for p in site.partitions})
    states = {}
    for name in site_names:
        parts = [p.name for p in site.partitions if (p.site or HOST_SITE) == name]
        states[name] = SiteState(
            reachable=draw(st.booleans()),
            free={p: draw(st.integers(0, 8)) for p in parts},
            queue_minutes={p: draw(st.floats(0, 600)) for p in parts},
        )
    if draw(st.booleans()):  # sometimes a site the poll knows nothing of
        states.pop(draw(st.sampled_from(site_names)), None)
    rules = [
        Rule(
            draw(st.sampled_from(["project", "course"])),
            g,
            frozenset(draw(st.lists(st.sampled_from(COUNTRIES), min_size=1, unique=True))),
        )
        for g in draw(st.lists(st.sampled_from(GROUPS), max_size=2, unique=True))
    ]
    names = [p.name for p in site.partitions]
    return {
        "site": site,
        "states": states,
        "rules": rules,
        "groups": set(draw(st.lists(st.sampled_from(GROUPS), max_size=3, unique=True))),
        "need": Need(
            draw(st.integers(1, 8)),
            frozenset(draw(st.lists(st.sampled_from(names), unique=True)))
            if draw(st.booleans())
            else None,
        ),
        "partition": draw(st.none() | st.sampled_from(names)),
        "site_choice": draw(st.none() | st.sampled_from(site_names)),
        "prefer": draw(st.sampled_from(["soonest", "cheapest", "greenest"])),
    }


def _candidates(sc: dict[str, Any]) -> list[Any]:
    """Partitions every rule allows, open to the groups, offering the size."""
    site: Site = sc["site"]
    out = []
    for p in site.partitions:
        if p.allowed_groups and not sc["groups"] & set(p.allowed_groups):
            continue
        if sc["need"].fits is not None and p.name not in sc["need"].fits:
            continue
        if any(p.jurisdiction.country not in r.countries for r in sc["rules"]):
            continue
        out.append(p)
    return out


def _up(sc: dict[str, Any], p: Any) -> bool:
    state = sc["states"].get(p.site or HOST_SITE)
    return state is not None and state.reachable


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_residency_is_never_violated(sc: dict[str, Any]) -> None:
    site: Site = sc["site"]
    try:
        got = place(
            site,
            sc["need"],
            sc["rules"],
            sc["states"],
            groups=sc["groups"],
            partition=sc["partition"],
            site_choice=sc["site_choice"],
            prefer=sc["prefer"],
        )
    except PlacementRefused as e:
        # Refused: then no allowed, reachable candidate matches the user's choice.
        ok = [
            p
            for p in _candidates(sc)
            if _up(sc, p)
            and (sc["partition"] is None or p.name == sc["partition"])
            and (sc["site_choice"] is None or (p.site or HOST_SITE) == sc["site_choice"])
        ]
        assert not ok, f"refused ({e}) although {[p.name for p in ok]} could take it"
        return
    part = site.partition(got.partition)
    # Never a forbidden country, whatever the states say.
    for r in sc["rules"]:
        assert part.jurisdiction.country in r.countries, (got, r)
    assert got.country == part.jurisdiction.country
    assert part in _candidates(sc)
    assert _up(sc, part), f"placed on unreachable site {got.site}"
    assert got.site == (part.site or HOST_SITE)
    if sc["partition"] is not None:
        assert got.partition == sc["partition"]
    if sc["site_choice"] is not None:
        assert got.site == sc["site_choice"]
    # Queued only when every allowed, reachable candidate of the choice is full.
    room = [
        p
        for p in _candidates(sc)
        if _up(sc, p)
        and sc["states"][p.site or HOST_SITE].free.get(p.name, 0) >= sc["need"].devices
        and (sc["partition"] is None or p.name == sc["partition"])
        and (sc["site_choice"] is None or (p.site or HOST_SITE) == sc["site_choice"])
    ]
    assert got.queued == (not room), (got, [p.name for p in room])
    # The why-string says where, and the rule(s) that allowed it.
    assert got.why.startswith(f"{got.partition} at site {got.site} ({got.country}): ")
    for r in sc["rules"]:
        assert r.name in got.why
    # Sites the form must mark as unreachable are exactly the down ones among the allowed.
    for s in got.unreachable:
        assert s not in sc["states"] or not sc["states"][s].reachable


@settings(max_examples=200, deadline=None)
@given(scenarios())
def test_a_forbidden_choice_is_refused_not_moved(sc: dict[str, Any]) -> None:
    site: Site = sc["site"]
    forbidden = [
        p
        for p in site.partitions
        if any(p.jurisdiction.country not in r.countries for r in sc["rules"])
    ]
    for p in forbidden:
        with pytest.raises(PlacementRefused) as e:
            place(site, Need(1), sc["rules"], sc["states"], groups=set(GROUPS), partition=p.name)
        assert e.value.reason in ("residency", "partition")


# -- the issue's cases, on the two-site test file ----------------------------------------------
TWO = REPO / "tests" / "support" / "sites" / "two-sites.toml"
FR_ONLY = [Rule("project", "climate", frozenset({"FR"}))]
EU = [Rule("project", "europa", frozenset({"FR", "DE", "IT", "NL"}), "EU")]


def _states(fr_free: int, de_free: int = 8, de_up: bool = True) -> dict[str, SiteState]:
    return {
        "paris": SiteState(True, {"gpu-fr": fr_free}, {"gpu-fr": 0 if fr_free else 25}),
        "julich": SiteState(de_up, {"gpu-de": de_free}, {"gpu-de": 0}, why="slurmrestd down"),
    }


def test_fr_only_never_lands_in_de_even_when_fr_is_full() -> None:
    site = load_site(TWO)
    got = place(site, Need(1), FR_ONLY, _states(fr_free=0))
    assert (got.site, got.partition, got.queued) == ("paris", "gpu-fr", True)
    assert got.why == (
        "gpu-fr at site paris (FR): allowed by project climate's FR-only rule; every "
        "allowed site is full, so the request waits in this queue (about 25 min); it never "
        "moves to a site your rules forbid"
    )


def test_fr_only_with_room_says_where_and_why() -> None:
    got = place(load_site(TWO), Need(1), FR_ONLY, _states(fr_free=4))
    assert not got.queued
    assert got.why == "gpu-fr at site paris (FR): allowed by project climate's FR-only rule"


def test_an_eu_user_goes_to_de_when_fr_is_full() -> None:
    got = place(load_site(TWO), Need(1), EU, _states(fr_free=0))
    assert (got.site, got.country, got.queued) == ("julich", "DE", False)
    assert "the only allowed site with room now" in got.why


def test_an_eu_user_prefers_the_shorter_queue_then_the_price() -> None:
    site = load_site(TWO)
    got = place(site, Need(1), EU, _states(fr_free=4, de_free=4))
    assert got.partition == "gpu-fr"  # same queue (0); FR is cheaper (2.10 < 2.40)
    assert got.why.endswith("; shortest queue")
    greener = place(site, Need(1), EU, _states(fr_free=4), prefer="greenest")
    assert greener.partition == "gpu-fr" and "lowest carbon" in greener.why


def test_an_unreachable_site_is_not_offered_and_is_named() -> None:
    site = load_site(TWO)
    got = place(site, Need(1), EU, _states(fr_free=0, de_up=False))
    assert (got.site, got.queued, got.unreachable) == ("paris", True, ("julich",))
    assert "julich cannot be reached now" in got.why
    with pytest.raises(PlacementRefused, match="julich: slurmrestd down"):
        place(site, Need(1), EU, _states(fr_free=0, de_up=False), site_choice="julich")


def test_a_site_the_poll_has_not_heard_from_is_not_offered() -> None:
    got = place(load_site(TWO), Need(1), EU, {"julich": SiteState(True, {"gpu-de": 8})})
    assert got.site == "julich" and got.unreachable == ("paris",)


def test_choices_of_a_forbidden_partition_or_site_are_refused() -> None:
    site = load_site(TWO)
    with pytest.raises(PlacementRefused, match="FR-only rule does not allow") as e:
        place(site, Need(1), FR_ONLY, _states(0), partition="gpu-de")
    assert e.value.field == "partition"
    with pytest.raises(PlacementRefused, match="site 'julich' is in DE") as e:
        place(site, Need(1), FR_ONLY, _states(0), site_choice="julich")
    assert e.value.field == "site"
    with pytest.raises(PlacementRefused, match="prefer 'fastest'") as e:
        place(site, Need(1), [], _states(0), prefer="fastest")
    assert e.value.field == "prefer"


def test_rules_of_two_groups_intersect() -> None:
    rules = residency_rules(
        ["climate", "europa", "other"],
        {"climate": ["fr"], "europa": ["FR", "DE"]},
        kinds={"europa": "course"},
        labels={"europa": "EU"},
    )
    assert [r.name for r in rules] == [
        "project climate's FR-only rule",
        "course europa's EU rule",
    ]
    got = place(load_site(TWO), Need(1), rules, _states(fr_free=0))
    assert got.site == "paris" and got.queued
    assert "allowed by project climate's FR-only rule and course europa's EU rule" in got.why
