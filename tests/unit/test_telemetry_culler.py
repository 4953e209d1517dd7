"""The culler's policy as a table, and measured energy into the ledger (pure core and the
real store on SQLite and PostgreSQL: the ``portal_store`` fixture)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from sovereign_portal.hub import activity as A
from sovereign_portal.hub import culler as C
from sovereign_portal.hub import ledger as L
from sovereign_portal.hub.activity_store import mark_reclaim, measured_energy, meter_open
from sovereign_portal.hub.ledger_store import LedgerStore

pytestmark = pytest.mark.unit

NOW = 1_796_126_400.0  # 2026-12-01T12:00:00Z
POLICY = C.Policy(idle_minutes=60, warn_minutes=10)


def target(idle_min: float | None, notice: Any = None, gpus: int = 1) -> dict[str, Any]:
    return {
        "source": "server:ada/",
        "user": "ada",
        "server": "",
        "gpus": gpus,
        "idle_since": None if idle_min is None else NOW - idle_min * 60,
        "notice": notice,
    }


def warned(deadline: float) -> dict[str, Any]:
    return {
        "id": "idle:server:ada/",
        "kind": "idle",
        "level": "warning",
        "message": "...",
        "deadline": C.iso(deadline),
    }


@pytest.mark.parametrize(
    ("t", "policy", "role", "groups", "action"),
    [
        (target(None), POLICY, "student", [], "none"),  # busy (or no recent report)
        (target(None, warned(NOW)), POLICY, "student", [], "clear"),  # busy again
        (target(49), POLICY, "student", [], "none"),
        (target(50), POLICY, "student", [], "warn"),  # N - W
        (target(55, warned(NOW + 300)), POLICY, "student", [], "none"),  # waiting
        (target(60, warned(NOW)), POLICY, "student", [], "stop"),
        # idle past N but never warned (the culler just started): warn first, never stop
        (target(300), POLICY, "student", [], "warn"),
        # exemptions: role, course, project
        (
            target(300, warned(NOW)),
            C.Policy(exempt_roles=frozenset({"operator"})),
            "operator",
            [],
            "clear",
        ),
        (
            target(300),
            C.Policy(exempt_courses=frozenset({"ml101"})),
            "student",
            ["course-ml101"],
            "none",
        ),
        (
            target(300),
            C.Policy(exempt_projects=frozenset({"climate"})),
            "researcher",
            ["project-climate"],
            "none",
        ),
        (
            target(300),
            C.Policy(exempt_courses=frozenset({"ml101"})),
            "student",
            ["course-ml102"],
            "warn",
        ),
        # quiet hours (12:00 UTC is inside 11:30-13:00): the stop waits
        (target(70, warned(NOW)), C.Policy(quiet=((690, 780),)), "student", [], "none"),
        (target(70, warned(NOW)), C.Policy(quiet=((780, 690),)), "student", [], "stop"),
        # no GPU: not this culler's business unless asked
        (target(300, gpus=0), POLICY, "student", [], "none"),
        (target(300, gpus=0), C.Policy(cull_cpu_only=True), "student", [], "warn"),
    ],
)
def test_decide(
    t: dict[str, Any], policy: C.Policy, role: str, groups: list[str], action: str
) -> None:
    d = C.decide(t, role=role, groups=groups, policy=policy, now=NOW)
    assert d.action == action, d.why


def test_warning_says_what_when_and_how_to_keep_it() -> None:
    d = C.decide(target(50), role="student", groups=[], policy=POLICY, now=NOW)
    assert d.notice is not None and d.notice["kind"] == "idle"
    assert d.notice["deadline"] == C.iso(NOW + 600)  # idle since 50 min: 10 min left
    assert "12:10" in d.notice["message"] and "run a cell" in d.notice["message"]
    # idle far past the limit when first seen: the stop is W minutes after the warning
    late = C.decide(target(300), role="student", groups=[], policy=POLICY, now=NOW)
    assert late.notice is not None and late.notice["deadline"] == C.iso(NOW + 600)


@pytest.mark.parametrize(
    ("spans", "hhmm", "quiet"),
    [
        (["22:00-07:00"], "23:30", True),
        (["22:00-07:00"], "06:59", True),
        (["22:00-07:00"], "07:00", False),
        (["12:00-13:30"], "12:00", True),
        ([], "12:00", False),
    ],
)
def test_quiet_hours(spans: list[str], hhmm: str, quiet: bool) -> None:
    h, m = map(int, hhmm.split(":"))
    t = dt.datetime(2026, 12, 1, h, m, tzinfo=dt.UTC).timestamp()
    assert C.in_quiet_hours(t, C.parse_quiet_hours(spans), "UTC") is quiet


@pytest.mark.parametrize("bad", ["25:00-01:00", "9:00-10:00", "22:00"])
def test_quiet_hours_errors_name_the_trait(bad: str) -> None:
    with pytest.raises(ValueError, match="quiet_hours"):
        C.GPUCuller(quiet_hours=[bad])


def test_culler_traits_are_checked_at_start() -> None:
    with pytest.raises(ValueError, match="timezone"):
        C.GPUCuller(timezone="Mars/Olympus")
    with pytest.raises(ValueError, match="warn_minutes"):
        C.GPUCuller(idle_minutes=10, warn_minutes=20)


def test_configure_culler_adds_a_narrow_role() -> None:
    from traitlets.config import Config

    c = Config()
    with pytest.raises(ValueError, match="configure_hub"):
        C.configure_culler(c)
    from sovereign_portal.hub.service import configure_hub

    configure_hub(c, None, port=10999)
    svc = C.configure_culler(c, ["--GPUCuller.idle_minutes=45"])
    assert svc["environment"]["SOVEREIGN_PORTAL_SERVICE_URL"] == (
        "http://127.0.0.1:10999/services/sovereign-portal/"
    )
    role = next(r for r in c.JupyterHub.load_roles if r["name"].startswith(C.NAME))
    assert set(role["scopes"]) == {"list:users", "read:users", "read:roles:users", "admin:servers"}
    assert "admin:users" not in role["scopes"] and "--GPUCuller.idle_minutes=45" in svc["command"]


# -- measured energy ---------------------------------------------------------------------------


def rates() -> L.Rates:
    # 1 GPU at 700 W TDP × PUE 1.2 = 840 W facility, 50 gCO2/kWh
    return L.Rates(gpu_equivalents=1.0, eur_per_hour=2.0, power_w=840.0, carbon_g_per_kwh=50.0)


def open_rec(started: float) -> L.Record:
    return L.Record(
        id=L.new_id(),
        user="ada",
        source="server:ada/",
        opened_at=started,
        started_at=started,
        walltime_minutes=120,
        rates=rates(),
    )


def meter(first: float, facility_wh: float, measured: bool = True) -> A.Meter:
    m = A.Meter(pue=1.2)
    m.first_at, m.facility_wh, m.co2_g = first, facility_wh, facility_wh / 1000 * 50
    m.counted, m.measured = True, measured
    return m


@pytest.mark.parametrize(
    ("first_after", "wh", "measured", "series", "want_wh", "basis", "co2_basis"),
    [
        # reports from the start: all measured (CO2 from a static intensity: estimated)
        (0, 100.0, True, False, 100.0, "measured", "estimated"),
        (0, 100.0, True, True, 100.0, "measured", "measured"),
        # the first report came 6 of 60 minutes in: 6 min of the model added, still ≥ 90 %
        (360, 100.0, True, False, 100.0 + 840 * 0.1, "measured", "estimated"),
        # 30 minutes before the first report: mostly the model, estimated
        (1800, 100.0, True, False, 100.0 + 840 * 0.5, "estimated", "estimated"),
        # a scripted source: exact, never called measured
        (0, 100.0, False, True, 100.0, "estimated", "estimated"),
    ],
)
def test_measured_energy(
    first_after: float,
    wh: float,
    measured: bool,
    series: bool,
    want_wh: float,
    basis: str,
    co2_basis: str,
) -> None:
    start = NOW - 3600
    got = measured_energy(
        open_rec(start), meter(start + first_after, wh, measured), NOW, series=series
    )
    assert got[0] == pytest.approx(want_wh)
    assert got[2:] == (basis, co2_basis)


def test_close_fixes_measured_energy_in_the_chain(portal_store: Any) -> None:
    store = LedgerStore(portal_store)
    start = NOW - 3600
    rec = store.open(open_rec(start))
    assert meter_open(store.engine, rec.id, 123.4567, 6.17, "measured", "estimated")
    assert mark_reclaim(store.engine, rec.id, rec.source, NOW, 3600.0)
    done = store.close(rec.id, reason="stopped", ended_at=NOW)
    assert done.end_reason == "reclaimed"
    a = done.amounts
    assert a is not None
    assert a.energy_wh == pytest.approx(123.457) and a.energy_basis == "measured"
    assert a.co2_g == pytest.approx(6.17) and a.co2_basis == "estimated"
    assert a.gpu_seconds == pytest.approx(3600) and a.eur == pytest.approx(2.0)
    assert store.verify()[1] is None  # the hash covers the measured figures
    # a closed record never changes
    assert not meter_open(store.engine, rec.id, 1.0, 1.0, "measured", "measured")
    assert store.get(rec.id) == done
    # without a meter: the TDP × PUE model, estimated, and 'stopped' stays 'stopped'
    other = store.open(open_rec(start))
    plain = store.close(other.id, reason="stopped", ended_at=NOW)
    assert plain.end_reason == "stopped"
    assert plain.amounts is not None and plain.amounts.energy_basis == "estimated"
    assert plain.amounts.energy_wh == pytest.approx(840.0)
    assert store.verify()[1] is None


def test_reclaimed_gpu_hours_come_from_the_ledger_and_survive_restarts(portal_store: Any) -> None:
    from sovereign_portal.hub.activity_store import reclaimed
    from sovereign_portal.hub.metrics import snapshot

    store = LedgerStore(portal_store)
    start = NOW - 3600  # 120 min granted, reclaimed after 60: 1 GPU-hour given back
    rec = store.open(open_rec(start))
    assert reclaimed(store.engine) == {}
    mark_reclaim(store.engine, rec.id, rec.source, NOW, 3600.0)
    assert reclaimed(store.engine) == {}  # open: nothing given back yet
    store.close(rec.id, reason="stopped", ended_at=NOW)
    # a stop the user made, and a reclaim past the walltime, count nothing more
    store.close(store.open(open_rec(start)).id, reason="stopped", ended_at=NOW)
    late = store.open(open_rec(NOW - 3 * 3600))
    mark_reclaim(store.engine, late.id, late.source, NOW, 0.0)
    store.close(late.id, reason="stopped", ended_at=NOW)
    key = (rec.partition, rec.country)
    got = reclaimed(store.engine)
    assert list(got) == [key]
    assert got[key]["gpu_hours"] == pytest.approx(1.0) and got[key]["stops"] == 2
    # a new store on the same database (a restarted hub) reads the same figures
    again = LedgerStore(portal_store)
    snap = snapshot(again)
    assert snap["reclaimed_gpu_hours"] == {key: pytest.approx(1.0)}
    assert snap["reclaimed_stops"] == {key: 2.0}
