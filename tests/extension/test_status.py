"""``GET /sovereign-portal/api/status``: the grant this server holds and its cost so far.

The pure part (:func:`grant_status`) is a table; the handler runs in-process with
pytest-jupyter against the real portal service (its real catalog gives the € rate and
the budget; fixtures: conftest.py). Run as its own pytest session:

    .venv/bin/pytest -p pytest_jupyter.jupyter_server -o asyncio_mode=strict \
        tests/extension/test_status.py
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

import pytest
from sovereign_portal.extension.status import grant_status, short_label
from sovereign_portal.spawners.sizes import Size
from tornado.httpclient import HTTPClientError

from tests.support.sessions import extension_call as call

pytestmark = [pytest.mark.extension, pytest.mark.timeout(60)]

T0 = 1_780_000_000.0  # a fixed epoch second for the table
CATALOG = {
    "partitions": [
        {"name": "lab", "sizes": [{"id": "h100:1g.10gb", "eur_per_hour": 0.5}]},
        {"name": "hpc", "sizes": [{"id": "h100:1g.10gb", "eur_per_hour": 9.0}]},
    ],
    "budget": {"text": "€40.00 of €50.00 left", "left": 40.0, "warning": None},
}
GRANT = {
    "SOVEREIGN_PORTAL_PARTITION": "lab",
    "SOVEREIGN_PORTAL_SIZE": "h100:1g.10gb",
    "SOVEREIGN_PORTAL_COUNTRY": "FR",
    "SOVEREIGN_PORTAL_WALLTIME_MINUTES": "120",
}


@pytest.mark.parametrize(
    ("size_id", "country", "label"),
    [
        ("h100:1g.10gb", "FR", "H100 · MIG 1g.10gb · FR"),
        ("h200x1", "DE", "H200 · DE"),
        ("h100x2", "FR", "2× H100 · FR"),
        ("b200x8x2n", None, "2 nodes × 8 B200"),
    ],
)
def test_short_label(size_id: str, country: str | None, label: str) -> None:
    status = grant_status(
        {**GRANT, "SOVEREIGN_PORTAL_SIZE": size_id, "SOVEREIGN_PORTAL_COUNTRY": country or ""},
        T0,
        T0,
        None,
    )
    assert status["device"]["label"] == label


def test_cost_and_gpu_hours_are_rate_times_elapsed_and_say_estimated() -> None:
    s = grant_status(GRANT, T0, T0 + 1800, CATALOG)  # half an hour in
    assert s["granted"] and s["partition"] == "lab" and s["country"] == "FR"
    assert s["eur_per_hour"] == 0.5  # the lab partition's rate, not hpc's
    assert s["eur_so_far"] == pytest.approx(0.25)
    # a 1g slice bills 1/7 of a GPU
    assert s["gpu_hours_so_far"] == pytest.approx(0.5 / 7, abs=1e-4)
    assert s["device"]["gpu_fraction"] == pytest.approx(1 / 7, abs=1e-4)
    assert s["estimated"] is True and "rate × elapsed" in s["basis"]
    assert s["seconds_left"] == 5400.0 and s["elapsed_s"] == 1800.0
    assert datetime.fromisoformat(s["ends_at"]).timestamp() == T0 + 7200
    assert datetime.fromisoformat(s["started_at"]).timestamp() == T0
    assert s["budget"] == CATALOG["budget"] and s["catalog"] is True


def test_whole_gpus_count_whole_gpu_hours() -> None:
    env = {**GRANT, "SOVEREIGN_PORTAL_SIZE": "h100x2"}
    s = grant_status(env, T0, T0 + 3600, None)
    assert s["gpu_hours_so_far"] == 2.0 and s["device"]["gpus"] == 2
    # no catalog (the hub did not answer): no rate, so no € figure, never a guess
    assert s["eur_per_hour"] is None and s["eur_so_far"] is None and s["catalog"] is False


def test_slurm_times_win_over_the_server_start() -> None:
    env = {**GRANT, "SLURM_JOB_START_TIME": str(int(T0) - 60), "SLURM_JOB_END_TIME": "0"}
    s = grant_status(env, T0, T0 + 60, CATALOG)
    assert s["elapsed_s"] == 120.0  # from the job's start, not the server's
    assert datetime.fromisoformat(s["ends_at"]).timestamp() == T0 - 60 + 7200  # 0: unset
    env["SLURM_JOB_END_TIME"] = str(int(T0) + 600)
    assert grant_status(env, T0, T0 + 60, CATALOG)["seconds_left"] == 540.0


def test_walltime_over_is_zero_left() -> None:
    s = grant_status(GRANT, T0, T0 + 9000, CATALOG)
    assert s["seconds_left"] == 0.0


@pytest.mark.parametrize(
    "env",
    [
        {},  # a server the portal did not spawn
        {**GRANT, "SOVEREIGN_PORTAL_SIZE": "h100:9g.999gb"},  # not a profile of the H100
        {**GRANT, "SOVEREIGN_PORTAL_SIZE": "x100x2"},  # no such accelerator
        {**GRANT, "SOVEREIGN_PORTAL_SIZE": "h100x٢"},  # non-ASCII digit
    ],
)
def test_no_grant_or_unknown_size_gives_nulls(env: dict[str, str]) -> None:
    s = grant_status(env, T0, T0 + 10, CATALOG)
    assert s["granted"] is False and s["device"] is None
    assert s["eur_so_far"] is None and s["gpu_hours_so_far"] is None and s["eur_per_hour"] is None


def test_bad_walltime_is_no_end() -> None:
    s = grant_status({**GRANT, "SOVEREIGN_PORTAL_WALLTIME_MINUTES": "1e3"}, T0, T0, CATALOG)
    assert s["walltime_minutes"] is None and s["ends_at"] is None and s["seconds_left"] is None


def test_label_uses_the_size_model() -> None:
    size = Size("x", "h100", slice="3g.40gb")
    assert short_label(size, "FR") == "H100 · MIG 3g.40gb · FR"


# -- the handler, in a real server against the real portal service ------------------------


@pytest.fixture
def granted(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    env = {**GRANT, "SOVEREIGN_PORTAL_SIZE": "h100:3g.40gb"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for k in ("SLURM_JOB_START_TIME", "SLURM_JOB_END_TIME"):
        monkeypatch.delenv(k, raising=False)
    return env


async def test_status_of_a_granted_server(jp_fetch: Any, granted: dict[str, str]) -> None:
    before = time.time()
    code, cat = await call(jp_fetch, "GET", "catalog")
    assert code == 200
    (lab,) = [p for p in cat["partitions"] if p["name"] == "lab"]
    (size,) = [s for s in lab["sizes"] if s["id"] == "h100:3g.40gb"]
    code, s = await call(jp_fetch, "GET", "status")
    assert code == 200, s
    assert s["device"]["label"] == "H100 · MIG 3g.40gb · FR"
    assert s["device"]["size_label"] == size["label"]
    assert s["eur_per_hour"] == size["eur_per_hour"] > 0
    assert s["estimated"] is True and s["catalog"] is True
    assert s["budget"] == cat["budget"]
    started = datetime.fromisoformat(s["started_at"]).timestamp()
    assert started <= before + 1 and before - started < 60  # this server's own start
    assert s["eur_so_far"] == pytest.approx(size["eur_per_hour"] * s["elapsed_s"] / 3600, abs=1e-3)
    assert 0 < s["seconds_left"] <= 7200


async def test_status_without_a_hub_keeps_the_device_and_drops_the_euros(
    jp_fetch: Any, jp_serverapp: Any, granted: dict[str, str]
) -> None:
    settings = jp_serverapp.web_app.settings
    settings["sovereign_portal_sessions"].hub.url = "http://127.0.0.1:9/services/x/"
    settings.pop("sovereign_portal_status_cache", None)
    code, s = await call(jp_fetch, "GET", "status")
    assert code == 200
    assert s["device"]["label"] == "H100 · MIG 3g.40gb · FR"
    assert s["catalog"] is False and s["eur_per_hour"] is None and s["eur_so_far"] is None
    assert s["gpu_hours_so_far"] is not None


async def test_status_without_a_grant(jp_fetch: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    for k in GRANT:
        monkeypatch.delenv(k, raising=False)
    code, s = await call(jp_fetch, "GET", "status")
    assert code == 200 and s["granted"] is False and s["device"] is None


async def test_status_needs_the_servers_auth(jp_fetch: Any) -> None:
    with pytest.raises(HTTPClientError) as e:
        await jp_fetch(
            "sovereign-portal", "api", "status", headers={"Authorization": "token wrong"}
        )
    assert e.value.code in (401, 403)
