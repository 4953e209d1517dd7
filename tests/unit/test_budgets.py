"""Budget arithmetic (hub/budgets.py) as tables: owners, periods, amounts, balances, admission."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

import pytest
from sovereign_portal.hub.budgets import (
    Balance,
    Budget,
    BudgetError,
    BudgetRefused,
    Charge,
    Owner,
    Period,
    amount_in,
    applicable,
    balance_of,
    check_allowance,
    decide,
    describe,
    fmt,
    make_budget,
    need,
    over_budget,
    parse_amount,
    warning_level,
)
from sovereign_portal.hub.ledger import Amounts, Rates, max_amounts
from sovereign_portal.spawners.request import parse_request, resolve
from sovereign_portal.spawners.site import load_site

pytestmark = pytest.mark.unit

AUTUMN = Period.make("2026-autumn", "2026-09-01", "2027-02-01")
ML101 = Owner("course", "ml101")
SLICE = Rates(gpu_equivalents=1 / 7, eur_per_hour=0.5, power_w=100.0, carbon_g_per_kwh=50.0)
GPU = Rates(gpu_equivalents=1.0, eur_per_hour=2.5, power_w=700.0, carbon_g_per_kwh=50.0)


def pool(amount: float = 10.0, per_student: float | None = None, unit: str = "gpu_hours") -> Budget:
    return make_budget(ML101, AUTUMN, unit, amount, per_student)


@pytest.mark.parametrize(
    ("value", "field", "match"),
    [
        (-1, "amount", "must not be negative"),
        (float("nan"), "amount", "finite"),
        ("nan", "amount", "digits 0-9"),
        ("\u0662", "amount", "digits 0-9"),  # ARABIC-INDIC TWO: float() would take it
        (" 2", "amount", "digits 0-9"),
        ("1e3", "amount", "digits 0-9"),
        (float("inf"), "amount", "finite"),
        ("1e400", "amount", "digits 0-9"),
        (1e12, "amount", "over the largest allowed"),
        ("lots", "amount", "must be a number"),
        (True, "amount", "must be a number"),
        (None, "amount", "must be a number"),
        ([1], "amount", "must be a number"),
    ],
)
def test_bad_amounts_name_the_field(value: Any, field: str, match: str) -> None:
    with pytest.raises(BudgetError, match=match) as e:
        parse_amount(value)
    assert e.value.field == field
    assert str(e.value).startswith(f"{field}: ")
    assert e.value.status == 400


@pytest.mark.parametrize(("value", "want"), [(0, 0.0), ("12.5", 12.5), (1e7, 1e7), (3, 3.0)])
def test_good_amounts(value: Any, want: float) -> None:
    assert parse_amount(value) == want


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("ml101", "KIND:ID"),
        ("team:ml101", "kind must be one of"),
        ("course:ML 101", "not a valid course id"),
        ("course:", "not a valid course id"),
        ("user:Alice Smith", "not a valid user id"),
        ("project:" + "x" * 60, "not a valid project id"),
        (42, "KIND:ID"),
    ],
)
def test_unknown_or_malformed_owners(text: Any, match: str) -> None:
    with pytest.raises(BudgetError, match=match) as e:
        Owner.parse(text)
    assert e.value.field == "owner"


@pytest.mark.parametrize(
    ("text", "kind", "ident", "group"),
    [
        ("course:ml101", "course", "ml101", "course-ml101"),
        ("project:health-ai", "project", "health-ai", "project-health-ai"),
        ("user:alice@uni-a.example", "user", "alice@uni-a.example", None),
    ],
)
def test_owners(text: str, kind: str, ident: str, group: str | None) -> None:
    o = Owner.parse(text)
    assert (o.kind, o.id, o.group, str(o)) == (kind, ident, group, text)


@pytest.mark.parametrize(
    ("name", "start", "end", "field", "match"),
    [
        ("Autumn 2026", "2026-09-01", "2027-02-01", "period", "a name such as"),
        ("2026-autumn", "2026-13-01", "2027-02-01", "start", "ISO date"),
        ("2026-autumn", "2026-09-01", "soon", "end", "ISO date"),
        ("2026-autumn", "2026-09-01", "2026-09-01", "end", "after start"),
        ("2026-autumn", "2026-09-01", "2026-08-01", "end", "after start"),
        ("forever", "2026-01-01", "2099-01-01", "end", "at most"),
    ],
)
def test_bad_periods(name: str, start: str, end: str, field: str, match: str) -> None:
    with pytest.raises(BudgetError, match=match) as e:
        Period.make(name, start, end)
    assert e.value.field == field


def test_period_covers_half_open_span() -> None:
    assert AUTUMN.covers(datetime(2026, 9, 1, tzinfo=UTC))
    assert AUTUMN.covers(datetime(2027, 1, 31, 23, 59, tzinfo=UTC))
    assert not AUTUMN.covers(datetime(2027, 2, 1, tzinfo=UTC))
    assert not AUTUMN.covers(datetime(2026, 8, 31, tzinfo=UTC))


@pytest.mark.parametrize(
    ("owner", "unit", "amount", "per_student", "field", "match"),
    [
        ("course:ml101", "gpu_hours", 10, 11, "per_student", "above the course pool"),
        ("project:x", "gpu_hours", 10, 1, "per_student", "only a course"),
        ("course:ml101", "hours", 10, None, "unit", "must be one of gpu_hours, eur, kwh"),
        ("course:ml101", "eur", -5, None, "amount", "negative"),
        ("course:ml101", "eur", 5, "nan", "per_student", "digits 0-9"),
    ],
)
def test_bad_budgets(
    owner: str, unit: str, amount: Any, per_student: Any, field: str, match: str
) -> None:
    with pytest.raises(BudgetError, match=match) as e:
        make_budget(owner, AUTUMN, unit, amount, per_student)
    assert e.value.field == field


@pytest.mark.parametrize(
    ("user", "amount", "field", "match"),
    [
        ("sam@uni-a.example", 10.5, "amount", "above the pool of ml101"),
        ("sam@uni-a.example", -1, "amount", "negative"),
        ("sam@uni-a.example", "inf", "amount", "digits 0-9"),
        ("Sam Smith", 1, "user", "not a user name"),
    ],
)
def test_bad_allowances(user: str, amount: Any, field: str, match: str) -> None:
    with pytest.raises(BudgetError, match=match) as e:
        check_allowance(pool(10), user, amount)
    assert e.value.field == field


def test_allowance_only_in_a_course() -> None:
    proj = make_budget("project:x", AUTUMN, "gpu_hours", 10)
    with pytest.raises(BudgetError, match="not a course") as e:
        check_allowance(proj, "sam@uni-a.example", 1)
    assert e.value.field == "course"
    assert check_allowance(pool(10), "sam@uni-a.example", 10) == 10


SAM, ANA = "sam@uni-a.example", "ana@uni-a.example"


@pytest.mark.parametrize(
    ("charges", "user", "allowances", "per_student", "left", "used"),
    [
        ([], None, {}, None, 10.0, 0.0),
        ([Charge("course:ml101@2026-autumn", SAM, 2.0, True)], None, {}, None, 8.0, 0.2),
        (  # holds count like usage
            [
                Charge("course:ml101@2026-autumn", SAM, 2.0, True),
                Charge("course:ml101@2026-autumn", ANA, 3.0, False),
            ],
            None,
            {},
            None,
            5.0,
            0.5,
        ),
        (  # another budget's charges do not count
            [Charge("project:x@2026-autumn", SAM, 9.0, True)],
            None,
            {},
            None,
            10.0,
            0.0,
        ),
        (  # sam's allowance of 3 binds: 1 used by sam, 6 by others
            [
                Charge("course:ml101@2026-autumn", SAM, 1.0, True),
                Charge("course:ml101@2026-autumn", ANA, 6.0, True),
            ],
            SAM,
            {},
            3.0,
            2.0,
            max(1 / 3, 0.7),
        ),
        (  # the pool binds before sam's allowance
            [
                Charge("course:ml101@2026-autumn", SAM, 1.0, True),
                Charge("course:ml101@2026-autumn", ANA, 8.5, False),
            ],
            SAM,
            {},
            5.0,
            0.5,
            0.95,
        ),
        (  # an instructor's per-student allowance overrides the default
            [Charge("course:ml101@2026-autumn", SAM, 1.0, True)],
            SAM,
            {SAM: 1.5},
            3.0,
            0.5,
            1 / 1.5 * 1.0,
        ),
        (  # overspent (a job ran past its hold): nothing left, never negative
            [Charge("course:ml101@2026-autumn", SAM, 12.0, True)],
            SAM,
            {},
            None,
            0.0,
            1.0,
        ),
    ],
)
def test_balances(
    charges: list[Charge],
    user: str | None,
    allowances: dict[str, float],
    per_student: float | None,
    left: float,
    used: float,
) -> None:
    b = balance_of(pool(10, per_student), charges, user, allowances)
    assert math.isclose(b.left, left, abs_tol=1e-9)
    assert math.isclose(b.used_fraction, used, abs_tol=1e-9)


@pytest.mark.parametrize(
    ("settled", "level"),
    [(0.0, None), (7.9, None), (8.0, 80), (9.4, 80), (9.5, 95), (9.99, 95), (10.0, 100)],
)
def test_warning_levels(settled: float, level: int | None) -> None:
    b = balance_of(pool(10), [Charge("course:ml101@2026-autumn", SAM, settled, True)])
    assert warning_level(b) == level
    assert b.to_json()["warning"] == level


def test_over_budget_after_grace() -> None:
    spent = balance_of(pool(10), [Charge("course:ml101@2026-autumn", SAM, 10.0, True)])
    fine = balance_of(pool(10), [Charge("course:ml101@2026-autumn", SAM, 9.0, True)])
    assert not over_budget(spent, since=100.0, now=150.0, grace_seconds=60)
    assert over_budget(spent, since=100.0, now=160.0, grace_seconds=60)
    assert not over_budget(fine, since=100.0, now=1e9, grace_seconds=60)
    assert not over_budget(spent, since=None, now=1e9, grace_seconds=60)


def test_which_budget_a_caller_charges() -> None:
    when = datetime(2026, 10, 1, tzinfo=UTC)
    spring = Period.make("2027-spring", "2027-02-01", "2027-07-01")
    budgets = [
        make_budget(f"user:{SAM}", AUTUMN, "eur", 100),
        make_budget("project:health", AUTUMN, "gpu_hours", 50),
        make_budget("course:ml101", spring, "gpu_hours", 10),  # not this period
        make_budget("course:ml101", AUTUMN, "gpu_hours", 10),
        make_budget("course:cv200", AUTUMN, "gpu_hours", 10),  # not sam's course
    ]
    got = applicable(budgets, SAM, ["course-ml101", "project-health", "instructors-cv200"], when)
    assert [b.key for b in got] == [
        "course:ml101@2026-autumn",
        "project:health@2026-autumn",
        f"user:{SAM}@2026-autumn",
    ]
    assert applicable(budgets, ANA, ["course-ml101"], datetime(2027, 3, 1, tzinfo=UTC))[0].key == (
        "course:ml101@2027-spring"
    )
    assert applicable(budgets, ANA, [], when) == []


@pytest.mark.parametrize(("unit", "want"), [("gpu_hours", 2.0), ("eur", 3.5), ("kwh", 1.25)])
def test_amounts_in_a_unit(unit: str, want: float) -> None:
    a = Amounts(gpu_seconds=7200, eur=3.5, energy_wh=1250)
    assert amount_in(a, unit) == want


def test_hold_is_rate_times_walltime_from_the_ledger() -> None:
    # 1/7 GPU for 2 h = 0.2857 GPU-hours; the same figure the ledger would settle at most.
    assert math.isclose(need(SLICE, 120, "gpu_hours"), 2 / 7, abs_tol=1e-6)
    assert need(SLICE, 120, "eur") == max_amounts(SLICE, 120).eur == 1.0
    assert math.isclose(need(GPU, 60, "kwh"), 0.7)


@pytest.mark.parametrize(
    ("x", "up", "want"),
    [
        (1.2, False, "1.2"),
        (2 / 7, True, "0.29"),
        (2 / 7, False, "0.28"),
        (0.0, False, "0"),
        (1.0, True, "1"),
        (1.005, False, "1"),
    ],
)
def test_fmt(x: float, up: bool, want: str) -> None:
    assert fmt(x, up=up) == want


def student_balance(left: float) -> Balance:
    # sam's allowance is what binds: `left` of it is left
    return balance_of(pool(10, per_student=left), [], SAM)


def test_request_that_fits_holds_its_maximum() -> None:
    d = decide(student_balance(1.2), SLICE, 120, "a 1g.10gb slice")
    assert d.message == (
        "ml101 has 1.2 GPU-hours left for you; a 1g.10gb slice for 120 min needs at most 0.29"
    )
    assert d.walltime_minutes == 120 and not d.shortened
    assert d.budget == "course:ml101@2026-autumn"
    assert math.isclose(d.hold, 2 / 7, abs_tol=1e-6)


def test_request_that_does_not_fit_says_what_is_left_and_what_fits() -> None:
    with pytest.raises(BudgetRefused) as e:
        decide(student_balance(0.2), SLICE, 120, "a 1g.10gb slice")
    assert str(e.value) == (
        "ml101 has 0.2 GPU-hours left for you; a 1g.10gb slice for 120 min needs at most "
        "0.29: ask for at most 84 min, or a smaller size"
    )
    assert e.value.status == 403 and e.value.reason == "budget"
    # and 84 min does fit
    assert decide(student_balance(0.2), SLICE, 84, "a 1g.10gb slice").hold <= 0.2


def test_shorten_instead_of_refusing() -> None:
    d = decide(student_balance(0.2), SLICE, 120, "a 1g.10gb slice", shorten=True)
    assert d.shortened and d.walltime_minutes == 84
    assert d.hold <= 0.2 + 1e-9
    assert d.message.endswith("shortened to 84 min, which fits")


def test_shorten_refuses_below_the_minimum() -> None:
    with pytest.raises(BudgetRefused, match="ask for at most 5 min"):
        decide(student_balance(0.0125), SLICE, 120, "a 1g.10gb slice", shorten=True)


def test_nothing_left() -> None:
    with pytest.raises(BudgetRefused, match=r"has 0 GPU-hours left for you.*nothing of this size"):
        decide(student_balance(0.0), GPU, 60, "1 H100 GPU (80 GB)")


def test_euro_budget_message() -> None:
    eur = balance_of(make_budget("project:x", AUTUMN, "eur", 2), [])
    with pytest.raises(BudgetRefused) as e:
        decide(eur, GPU, 60, "1 H100 GPU (80 GB)")
    assert str(e.value) == (
        "x has €2 left; 1 H100 GPU (80 GB) for 60 min needs at most 2.5: "
        "ask for at most 48 min, or a smaller size"
    )


def test_no_budget_means_no_check() -> None:
    d = decide(None, GPU, 600, "x")
    assert (d.walltime_minutes, d.budget, d.hold) == (600, None, 0.0)


def test_describe_sizes() -> None:
    assert describe({"slice": "1g.10gb", "label": "MIG"}) == "a 1g.10gb slice"
    assert describe({"slice": "1g.10gb"}, 3) == "3 × 1g.10gb slices"
    assert describe({"slice": None, "label": "2 H100 GPUs (160 GB)"}) == "2 H100 GPUs (160 GB)"


def test_hold_uses_the_requests_own_rates() -> None:
    # The example site's 1g.10gb slice: the hold is the ledger's max over the request's rates.
    site = load_site(None)
    part = site.partitions[0]
    r = resolve(
        site,
        parse_request(
            {"kind": "dask", "accelerator": "h100", "slice": "1g.10gb", "walltime_minutes": 120}
        ),
        default_partition=part.name,
    )
    rates = Rates.from_resolved(r)
    assert math.isclose(need(rates, 120, "gpu_hours"), r.gpu_hours, abs_tol=1e-3)
    assert math.isclose(need(rates, 120, "eur"), r.cost_json()["eur_max"], abs_tol=0.01)


def test_banner_and_widget_cost_line_show_what_is_left() -> None:
    from sovereign_portal.extension.widget import SessionForm
    from sovereign_portal.hub.admission import Caller, catalog_for

    spent = balance_of(pool(10), [Charge("course:ml101@2026-autumn", SAM, 8.5, True)], SAM)
    assert spent.to_json()["banner"] == "ml101 has 1.5 GPU-hours left for you (80 % used)"
    cat = catalog_for(load_site(None), Caller(SAM, frozenset({"course-ml101"}), "student"))
    plain = SessionForm(cat)
    assert "left" not in plain.summary()
    cat["budget"] = spent.to_json()
    f = SessionForm(cat)
    assert f.summary().startswith(plain.summary())
    assert f.summary().endswith(" · ml101 has 1.5 GPU-hours left for you (80 % used)")
    gone = balance_of(pool(10), [Charge("course:ml101@2026-autumn", SAM, 10, True)], SAM)
    cat["budget"] = gone.to_json()
    assert SessionForm(cat).summary().endswith("has 0 GPU-hours left for you: the budget is spent")


def test_form_notes_show_the_remaining_budget_next_to_each_size() -> None:
    from sovereign_portal.hub.budgets import banner_text, size_note
    from sovereign_portal.spawners.form import render_form

    site = load_site(None)
    part = site.partitions[0]
    b = student_balance(0.2)
    r = resolve(
        site,
        parse_request({"accelerator": "h100", "slice": "1g.10gb"}),
        default_partition=part.name,
    )
    note = size_note(b, Rates.from_resolved(r))
    assert note == "0.15 GPU-hours/h, fits 84 min of your budget"
    html = render_form([part], notes={f"{part.name}/h100:1g.10gb": note}, banner=banner_text(b))
    assert '<p class="sp-budget">ml101 has 0.2 GPU-hours left for you</p>' in html
    assert "€0.30/h · 0.15 GPU-hours/h, fits 84 min of your budget</option>" in html
    gpu = resolve(site, parse_request({"accelerator": "h100", "gpus": 1}), part.name)
    assert size_note(student_balance(0.01), Rates.from_resolved(gpu)).endswith("over your budget")
