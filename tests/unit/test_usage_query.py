"""Usage pages' pure parts: the strict query parser, the plot buckets, the figures' marks,
and the metrics' refusal rows and snapshot (on a real SQLite portal database)."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from sovereign_portal.hub import ledger as L
from sovereign_portal.hub.ledger_store import LedgerStore
from sovereign_portal.hub.metrics import (
    PortalCollector,
    record_refusal,
    refusal_counts,
    refusal_place,
    snapshot,
)
from sovereign_portal.hub.store import PortalStore
from sovereign_portal.hub.usage_pages import (
    UsageQuery,
    UsageQueryError,
    basis,
    buckets,
    figures,
    parse_query,
    plot,
)

pytestmark = pytest.mark.unit
TODAY = date(2026, 12, 1)


def q(page: str = "my", **args: str | list[str]) -> UsageQuery:
    raw = {k: (v if isinstance(v, list) else [v.encode()]) for k, v in args.items()}
    return parse_query(raw, page, today=TODAY)  # type: ignore[arg-type]


def test_defaults_are_the_last_30_days_by_day() -> None:
    got = q()
    assert (got.first, got.last, got.step) == (date(2026, 11, 2), TODAY, "day")
    assert got.until - got.since == 30 * 86400
    assert got.by == ("partition", "site", "country")


def test_a_long_range_plots_by_month() -> None:
    got = q(**{"from": "2025-01-01", "to": "2026-06-30"})
    assert got.step == "month"
    b = buckets(got)
    assert b[0] == "2025-01" and b[-1] == "2026-06" and len(b) == 18


@pytest.mark.parametrize(
    ("page", "args", "field"),
    [
        ("my", {"frm": "2026-01-01"}, "frm"),
        ("course", {"user": "x"}, "user"),
        ("my", {"by": "partition"}, "by"),
        ("my", {"from": "2026-1-1"}, "from"),
        ("my", {"from": "01/11/2026"}, "from"),
        ("my", {"from": "２０２６-01-01"}, "from"),
        ("my", {"from": "2026-02-30"}, "from"),
        ("my", {"to": "1999-12-31"}, "to"),
        ("my", {"to": "2100-01-01"}, "to"),
        ("my", {"from": "2026-12-02", "to": "2026-12-01"}, "from"),
        ("my", {"from": "2000-01-01", "to": "2026-01-01"}, "from"),
        ("my", {"from": "2025-01-01", "step": "day"}, "step"),
        ("my", {"step": "week"}, "step"),
        ("my", {"step": ""}, "step"),
        ("my", {"to": ["2026-01-01", "2026-02-01"]}, "to"),
        ("my", {"user": "a b"}, "user"),
        ("my", {"user": "x" * 301}, "user"),
        ("operator", {"by": "user"}, "by"),
        ("operator", {"by": "partition,partition"}, "by"),
        ("operator", {"by": "partition,"}, "by"),
    ],
)
def test_bad_parameters_name_themselves(page: str, args: dict, field: str) -> None:
    raw = {k: ([x.encode() for x in v] if isinstance(v, list) else [v.encode()])
           for k, v in args.items()}  # fmt: skip
    with pytest.raises(UsageQueryError) as e:
        parse_query(raw, page, today=TODAY)
    assert e.value.field == field
    assert str(e.value).startswith(f"{field}:")
    assert e.value.status == 400


def test_bytes_that_are_not_utf8_are_refused() -> None:
    with pytest.raises(UsageQueryError, match=r"^from: not UTF-8"):
        parse_query({"from": [b"\xff"]}, "my", today=TODAY)


def test_operator_grouping_and_user() -> None:
    assert q("operator", by="country,partition").by == ("country", "partition")
    assert q("my", user="alice@uni-a.example").user == "alice@uni-a.example"


@pytest.mark.parametrize(
    ("est", "n", "text"),
    [(0, 3, "measured"), (3, 3, "estimated"), (1, 3, "estimated for 1 of 3 records"),
     (0, 0, "measured")],
)  # fmt: skip
def test_basis_marks(est: int, n: int, text: str) -> None:
    assert basis(est, n) == text


def test_figures_of_nothing_are_zero() -> None:
    f = figures(None)
    got = (f["gpu_hours"], f["eur"], f["records"], f["time_basis"])
    assert got == ("0.00", "0.00", 0, "measured")


def test_plot_fills_the_gaps_with_zero() -> None:
    got = q(**{"from": "2026-11-28", "to": "2026-12-01"})
    svg = plot([{"day": "2026-11-29", "gpu_hours": 2.5}], got, "ada")
    assert svg.count('class="sp-bar"') == 4
    assert 'data-value="2.5"' in svg and svg.count('data-value="0"') == 3


# -- metrics: refusal rows and the snapshot, on a real SQLite portal database ------------------


@pytest.fixture
def ledger(tmp_path: Path) -> LedgerStore:
    store = PortalStore(f"sqlite:///{tmp_path / 'portal.sqlite'}")
    store.upgrade()
    return LedgerStore(store)


def test_refusal_place_keeps_only_what_the_site_knows() -> None:
    parts = {"lab": "FR", "hpc": "DE"}
    assert refusal_place({"kind": "dask", "partition": "hpc"}, parts) == ("dask", "hpc", "DE")
    assert refusal_place({"kind": "dask", "partition": "<evil>"}, parts) == ("dask", "", "")
    assert refusal_place({"kind": "x" * 99}, parts) == ("", "", "")
    assert refusal_place("not a dict", parts) == ("", "", "")


def _closed(ledger: LedgerStore, user: str, partition: str, country: str, seconds: float) -> None:
    rec = L.Record(
        id=L.new_id(),
        user=user,
        partition=partition,
        country=country,
        opened_at=1000.0,
        started_at=1000.0,
        rates=L.Rates(gpu_equivalents=1.0, eur_per_hour=2.0, power_w=700.0, carbon_g_per_kwh=50.0),
    )
    ledger.open(rec)
    ledger.close(rec.id, reason="stopped", ended_at=1000.0 + seconds)


def test_snapshot_sums_the_ledger_and_counts_refusals(ledger: LedgerStore) -> None:
    _closed(ledger, "a", "lab", "FR", 3600)
    _closed(ledger, "b", "lab", "FR", 1800)
    _closed(ledger, "a", "hpc", "DE", 7200)
    ledger.open(L.Record(id=L.new_id(), user="c", partition="hpc", country="DE", opened_at=5.0))
    for _ in range(3):
        record_refusal(ledger.engine, kind="dask", partition="lab", country="FR", reason="role")
    record_refusal(ledger.engine, kind="torch", partition="", country="", reason="budget")
    assert refusal_counts(ledger.engine) == {("lab", "FR", "role"): 3, ("", "", "budget"): 1}
    s = snapshot(ledger)
    assert s["gpu_hours"] == {("hpc", "DE"): 2.0, ("lab", "FR"): 1.5}
    assert s["cost_eur"] == {("hpc", "DE"): 4.0, ("lab", "FR"): 3.0}
    assert s["open_records"] == {("hpc", "DE"): 1}
    registry = CollectorRegistry()
    registry.register(PortalCollector(ledger))
    text = generate_latest(registry).decode()
    assert "sovereign_portal_up 1.0" in text
    assert 'sovereign_portal_gpu_hours{country="FR",partition="lab"} 1.5' in text
    assert 'sovereign_portal_open_records{country="DE",partition="hpc"} 1.0' in text
    assert (
        'sovereign_portal_admission_refusals_total{country="FR",partition="lab",reason="role"} 3.0'
    ) in text
    assert "# TYPE sovereign_portal_admission_refusals_total counter" in text


def test_a_failing_database_scrapes_as_down() -> None:
    def broken() -> LedgerStore:
        raise RuntimeError("no database")

    (up,) = list(PortalCollector(broken).collect())
    assert up.name == "sovereign_portal_up" and up.samples[0].value == 0


def test_ledger_groups_by_utc_day_and_lists_rows_with_the_open_ones(ledger: LedgerStore) -> None:
    from sovereign_portal.hub.ledger_store import UsageFilter

    day = 86400.0
    t0 = 20000 * day  # 2024-10-04 00:00 UTC
    for user, start, hours in (("a", t0 + 3600, 1), ("a", t0 + day + 7200, 2), ("b", t0, 4)):
        rec = L.Record(id=L.new_id(), user=user, opened_at=start, started_at=start,
                       rates=L.Rates(1.0, 1.0, 100.0, 10.0))  # fmt: skip
        ledger.open(rec)
        ledger.close(rec.id, reason="stopped", ended_at=start + hours * 3600)
    ledger.open(L.Record(id="open1", user="a", opened_at=t0 + 3 * day))
    rows = ledger.usage(UsageFilter(user="a"), by=("day",))
    assert [(r["day"], r["gpu_hours"]) for r in rows] == [("2024-10-04", 1.0), ("2024-10-05", 2.0)]
    assert rows[0]["estimated_energy_records"] == 1 and rows[0]["estimated_time_records"] == 0
    got, n = ledger.rows(UsageFilter(user="a", since=t0 + day, until=t0 + 2 * day))
    assert n == 2 and got[0].id == "open1"  # the open one, then the day's record
    assert got[1].amounts is not None and got[1].amounts.gpu_hours == 2.0
    closed_only, n = ledger.rows(UsageFilter(user="a"), include_open=False, limit=1)
    assert n == 2 and len(closed_only) == 1 and closed_only[0].closed
