"""The ledger's pure core (hub/ledger.py), as tables: amounts, reasons, close, the chain."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from typing import Any

import pytest
from sovereign_portal.hub import ledger as L
from sovereign_portal.spawners.request import parse_request, resolve
from sovereign_portal.spawners.site import load_site

from tests.support.slurm_cluster import SITE_FILE

pytestmark = pytest.mark.unit

SITE = load_site(SITE_FILE)
T0 = 1_790_000_000.0


def resolved(**req: Any) -> Any:
    return resolve(SITE, parse_request({"kind": "notebook", **req}))


def opened(start: float = T0, **req: Any) -> L.Record:
    rec = L.open_record(resolved(**req), user="ada", role="researcher", now=start, site="test")
    return L.attach(rec, job_ids=["41"], nodes="gpu-fr-1", started_at=start)


# Hand-computed from the test site: gpu-fr has H100 at 2.10 €/GPU-h, PUE 1.3, 56 g/kWh;
# gpu-de has B200 at 3.90 €/GPU-h, PUE 1.2, 380 g/kWh. H100 TDP 700 W, B200 1000 W.
# A slice pays and draws its compute share: 3g = 3/7, 1g = 1/7.
@pytest.mark.parametrize(
    ("req", "seconds", "gpu_seconds", "eur", "wh", "co2"),
    [
        ({"slice": "3g.40gb"}, 3600, 3600 * 3 / 7, 0.90, 390.0, 21.84),
        ({"slice": "1g.10gb"}, 7200, 7200 / 7, 0.60, 260.0, 14.56),
        ({"kind": "torch", "gpus": 8, "nodes": 2}, 1800, 16 * 1800, 16.8, 7280.0, 407.68),
        ({"partition": "gpu-de", "gpus": 1}, 600, 600, 0.65, 200.0, 76.0),
        ({"gpus": 2}, 0, 0, 0, 0, 0),
    ],
)
def test_amounts_follow_the_site_prices_and_the_tdp_pue_model(
    req: dict[str, Any], seconds: float, gpu_seconds: float, eur: float, wh: float, co2: float
) -> None:
    rec = L.close(opened(**req), ended_at=T0 + seconds, reason="stopped")
    a = rec.amounts
    assert a is not None
    assert a.gpu_seconds == pytest.approx(gpu_seconds, abs=1e-3)
    assert a.eur == pytest.approx(eur, abs=1e-6)
    assert a.energy_wh == pytest.approx(wh, abs=1e-3)
    assert a.co2_g == pytest.approx(co2, abs=1e-3)
    assert (a.gpu_seconds_basis, a.eur_basis, a.energy_basis, a.co2_basis) == (
        "measured",
        "measured",
        "estimated",
        "estimated",
    )


def test_record_says_who_what_where() -> None:
    rec = opened(slice="3g.40gb")
    assert (rec.user, rec.role, rec.owner_type, rec.owner) == ("ada", "researcher", "user", "ada")
    assert (rec.kind, rec.size, rec.accelerator, rec.slice, rec.gpus) == (
        "notebook",
        "h100:3g.40gb",
        "h100",
        "3g.40gb",
        0,
    )
    assert (rec.partition, rec.country, rec.operator, rec.site) == (
        "gpu-fr",
        "FR",
        "Test Centre FR",
        "test",
    )
    assert rec.job_ids == ("41",) and rec.nodes == "gpu-fr-1" and not rec.closed
    assert rec.walltime_minutes == 60  # the partition's default


def test_hold_is_the_whole_walltime_and_estimated() -> None:
    r = resolved(gpus=4, walltime_minutes=120)
    hold = L.max_amounts(L.Rates.from_resolved(r), r.walltime_minutes)
    assert hold.gpu_seconds == 4 * 7200
    assert hold.eur == pytest.approx(r.cost_json()["eur_max"])  # the same price as admission
    assert hold.energy_wh == pytest.approx(r.energy_wh)
    assert hold.gpu_seconds_basis == "estimated"


@pytest.mark.parametrize(
    ("state", "reason"),
    [
        ("CANCELLED", "scancel"),
        ("CANCELLED by 1000", "scancel"),
        ("TIMEOUT", "walltime"),
        ("NODE_FAIL", "node_failure"),
        ("PREEMPTED", "reclaimed"),
        ("COMPLETED", "died"),
        ("FAILED", "died"),
        ("GONE", "died"),
        ("RUNNING", None),
        ("COMPLETING", None),
        ("PENDING", None),
        ("", None),
    ],
)
def test_slurm_states_map_to_end_reasons(state: str, reason: str | None) -> None:
    assert L.slurm_end_reason(state) == reason


@pytest.mark.parametrize(
    ("state", "seconds", "walltime", "reason"),
    [
        ("COMPLETED", 3550, 60, "walltime"),  # stopped by the 60 s warning before the limit
        ("FAILED", 3541, 60, "walltime"),
        ("FAILED", 3539, 60, "died"),  # before the warning: it died by itself
        ("COMPLETED", 20, 1, "walltime"),  # a 1-minute walltime is all warning
        ("GONE", 3599, 60, "died"),  # no final state: nothing says why
        ("CANCELLED", 3590, 60, "scancel"),
        ("TIMEOUT", 3600, 60, "walltime"),
        ("COMPLETED", 3590, 0, "died"),  # no walltime known
    ],
)
def test_an_end_within_the_walltime_warning_is_walltime(
    state: str, seconds: float, walltime: int, reason: str
) -> None:
    got = L.slurm_end_reason(state, seconds=seconds, walltime_minutes=walltime, warning_s=60)
    assert got == reason


def test_close_counts_from_the_start_not_the_admission() -> None:
    rec = L.open_record(resolved(gpus=1), user="ada", now=T0)
    assert L.close(rec, ended_at=T0 + 100, reason="died").amounts.gpu_seconds == 100  # type: ignore[union-attr]
    late = L.attach(rec, started_at=T0 + 40)
    assert L.close(late, ended_at=T0 + 100, reason="died").amounts.gpu_seconds == 60  # type: ignore[union-attr]
    early_end = L.close(late, ended_at=T0, reason="died")
    assert early_end.amounts is not None and early_end.amounts.gpu_seconds == 0


def test_guessed_end_time_is_flagged_estimated() -> None:
    rec = L.close(opened(gpus=1), ended_at=T0 + 10, reason="died", time_basis="estimated")
    assert rec.amounts is not None
    assert rec.amounts.gpu_seconds_basis == "estimated" and rec.amounts.eur_basis == "estimated"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"kind": "spark"}, "kind"),
        ({"owner_type": "faculty"}, "owner_type"),
        ({"end_reason": "bored"}, "end_reason"),
        ({"user": ""}, "user"),
        ({"job_ids": ("12;rm",)}, "job_ids"),
        ({"opened_at": math.nan}, "opened_at"),
        ({"row_type": "gift"}, "row_type"),
    ],
)
def test_bad_records_name_the_field(change: dict[str, Any], field: str) -> None:
    with pytest.raises(L.LedgerError, match=field):
        replace(opened(gpus=1), **change)


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"gpu_equivalents": -1.0}, "gpu_equivalents"),
        ({"eur_per_hour": math.inf}, "eur_per_hour"),
        ({"power_w": math.nan}, "power_w"),
    ],
)
def test_bad_rates_name_the_field(kw: dict[str, float], field: str) -> None:
    base = {"gpu_equivalents": 1.0, "eur_per_hour": 1.0, "power_w": 1.0, "carbon_g_per_kwh": 1.0}
    with pytest.raises(L.LedgerError, match=field):
        L.Rates(**{**base, **kw})


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"eur": math.nan}, "eur"),
        ({"gpu_seconds": 1e300}, "gpu_seconds"),
        ({"energy_basis": "guessed"}, "energy_basis"),
    ],
)
def test_bad_amounts_name_the_field(kw: dict[str, Any], field: str) -> None:
    with pytest.raises(L.LedgerError, match=field):
        L.Amounts(**kw)


def test_close_refuses_bad_input_and_closed_records() -> None:
    rec = opened(gpus=1)
    with pytest.raises(L.LedgerError, match="reason"):
        L.close(rec, ended_at=T0 + 1, reason="because")
    with pytest.raises(L.LedgerError, match="ended_at"):
        L.close(rec, ended_at=math.nan, reason="died")
    done = L.close(rec, ended_at=T0 + 1, reason="died")
    with pytest.raises(L.LedgerError, match="already closed"):
        L.close(done, ended_at=T0 + 2, reason="died")
    with pytest.raises(L.LedgerError, match="never change"):
        L.attach(done, nodes="elsewhere")


def build_chain(n: int) -> list[L.Record]:
    out, prev = [], L.GENESIS
    for i in range(n):
        rec = L.close(opened(T0 + i, gpus=1), ended_at=T0 + i + 60, reason="stopped")
        rec = L.chain(rec, i + 1, prev)
        out.append(rec)
        prev = rec.hash or ""
    return out


def test_chain_links_each_row_to_the_previous() -> None:
    rows = build_chain(4)
    assert rows[0].prev_hash == L.GENESIS
    assert [r.prev_hash for r in rows[1:]] == [r.hash for r in rows[:-1]]
    assert all(r.hash and len(r.hash) == 64 for r in rows)
    assert L.verify(rows) is None
    assert L.verify([]) is None


def test_hash_is_sha256_of_the_canonical_json() -> None:
    import hashlib

    rec = build_chain(1)[0]
    text = L.canonical_json(rec, L.GENESIS)
    data = json.loads(text)
    assert data["prev_hash"] == L.GENESIS and "hash" not in data
    assert data["eur"] == rec.amounts.eur and data["job_ids"] == ["41"]  # type: ignore[union-attr]
    assert text == json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert hashlib.sha256(text.encode()).hexdigest() == rec.hash


def _edit(rows: list[L.Record], i: int, **change: Any) -> list[L.Record]:
    rows = list(rows)
    rows[i] = replace(rows[i], **change)
    return rows


@pytest.mark.parametrize(
    ("tamper", "seq", "why"),
    [
        (lambda r: _edit(r, 2, user="eve"), 3, "do not match its hash"),
        (lambda r: _edit(r, 1, amounts=L.Amounts(gpu_seconds=1.0)), 2, "do not match"),
        (lambda r: _edit(r, 3, end_reason="budget"), 4, "do not match"),
        (lambda r: _edit(r, 0, ended_at=T0 + 1), 1, "do not match"),
        (lambda r: r[:1] + r[2:], 3, "missing or inserted"),
        (lambda r: [r[0], r[2], r[1], *r[3:]], 3, "missing or inserted"),
        (lambda r: _edit(r, 4, prev_hash="f" * 64), 5, "prev_hash"),
        (lambda r: _edit(_edit(r, 1, user="eve"), 1, hash=None), 2, "do not match"),
    ],
)
def test_verify_names_the_first_broken_link(tamper: Any, seq: int, why: str) -> None:
    found = L.verify(tamper(build_chain(5)))
    assert found is not None
    assert found.seq == seq and why in found.why
    assert f"#{seq}" in str(found)


def test_a_recomputed_hash_still_breaks_the_next_link() -> None:
    rows = build_chain(3)
    forged = replace(rows[1], user="eve")
    forged = replace(forged, hash=L.record_hash(forged, forged.prev_hash or ""))
    found = L.verify([rows[0], forged, rows[2]])
    assert found is not None and found.seq == 3 and "prev_hash" in found.why


def test_adjustments_are_new_rows_and_count_in_totals() -> None:
    rec = L.close(opened(gpus=1), ended_at=T0 + 3600, reason="died")
    with pytest.raises(L.LedgerError, match="note"):
        L.adjustment(rec, L.Amounts(gpu_seconds=-600, eur=-0.35), note=" ", now=T0)
    with pytest.raises(L.LedgerError, match="still open"):
        L.adjustment(opened(gpus=1), L.Amounts(), note="x", now=T0)
    fix = L.adjustment(
        rec, L.Amounts(gpu_seconds=-600, eur=-0.35), note="node lost 10 min", now=T0 + 7200
    )
    assert fix.row_type == "adjustment" and fix.corrects == rec.id and fix.id != rec.id
    assert fix.closed and fix.hash is None and rec.amounts is not None
    tot = L.totals([rec, fix], by=["user"])
    assert tot[("ada",)].gpu_seconds == 3000
    assert tot[("ada",)].eur == pytest.approx(2.10 - 0.35)


def test_totals_group_by_fields_and_skip_open_records() -> None:
    a = L.close(opened(gpus=1), ended_at=T0 + 3600, reason="stopped")
    b = L.close(opened(partition="gpu-de", gpus=1), ended_at=T0 + 3600, reason="stopped")
    c = replace(a, id="c", owner_type="course", owner="ml101")
    tot = L.totals([a, b, c, opened(gpus=8)], by=["country"])
    assert set(tot) == {("FR",), ("DE",)}
    assert tot[("FR",)].gpu_seconds == 7200 and tot[("DE",)].eur == pytest.approx(3.9)
    by_course = L.totals([a, b, c], by=["course"])
    assert by_course[("ml101",)].gpu_seconds == 3600 and by_course[("",)].gpu_seconds == 7200
    with pytest.raises(L.LedgerError, match="unknown field 'color'"):
        L.totals([a], by=["color"])


def test_flat_form_round_trips() -> None:
    for rec in [opened(slice="3g.40gb"), *build_chain(2)]:
        back = L.from_mapping(L.record_json(rec))
        assert back == rec
        if rec.hash:
            assert L.record_hash(back, back.prev_hash or "") == rec.hash
