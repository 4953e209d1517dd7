"""The class-start engine's books (hub/class_start_api.py) on a real portal database
(SQLite and PostgreSQL), with the hub's REST API faked: a warm server's record and hold
go to the course pool, the claim closes the warm record and opens the student's at the
same instant, and every GPU-second is in exactly one record. The same against the real
hub, IdP and spawner: tests/hub/test_class_start.py."""

from __future__ import annotations

import asyncio
import math
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sovereign_portal.hub import class_start as CS
from sovereign_portal.hub import ledger as L
from sovereign_portal.hub.budget_store import BudgetCharge, BudgetStore
from sovereign_portal.hub.class_start_api import ClassEngine
from sovereign_portal.hub.class_start_store import CLAIMED, ClassStartStore
from sovereign_portal.hub.course_store import CourseStore
from sovereign_portal.hub.courses import WEEKDAYS, SiteOffer
from sovereign_portal.hub.ledger_store import LedgerStore
from sovereign_portal.hub.store import PortalStore
from sqlalchemy import select
from traitlets.config import Configurable

pytestmark = pytest.mark.unit

S1 = "s1@uni-a.example"
RATES = L.Rates(gpu_equivalents=1 / 7, eur_per_hour=0.5, power_w=100.0, carbon_g_per_kwh=50.0)
OFFER = SiteOffer(sizes=frozenset({"h100:1g.10gb"}))


class Portal(Configurable):
    budgets: Any = None


def _setup(store: PortalStore) -> tuple[ClassEngine, Any, CS.Window]:
    today = datetime.now(UTC).date()
    now = datetime.now(UTC)
    courses = CourseStore(store)
    course = courses.create(
        {
            "id": "ml101",
            "title": "ML",
            "instructors": ["ines@uni-a.example"],
            "sizes": ["h100:1g.10gb"],
            "budget": {"unit": "gpu_hours", "pool": 40, "per_student": 4},
            "start": str(today - timedelta(days=1)),
            "end": str(today + timedelta(days=30)),
            "schedule": [
                {
                    "weekday": WEEKDAYS[now.weekday()],
                    "time": (now + timedelta(minutes=5)).strftime("%H:%M"),
                    "minutes": 60,
                }
            ],
            "prewarm": {"minutes": 10, "unclaimed_minutes": 15},
        },
        OFFER,
        "op@uni-a.example",
    )
    portal = Portal()
    portal.budgets = BudgetStore(store)
    eng = ClassEngine(portal, courses)
    w = CS.Window("ml101", course.schedule[0], now, now + timedelta(minutes=60))
    return eng, course, w


def _hub_warm_start(store: PortalStore, t0: float) -> L.Record:
    """What the hub does when the service asks for the warm server: the budget gate holds
    (as the student, ref server:<user>/), the ledger opens the record."""
    BudgetStore(store).admit(
        S1, ["course-ml101"], RATES, 120, "a 1g.10gb slice", f"server:{S1}/",
        now=datetime.fromtimestamp(t0, UTC),
    )  # fmt: skip
    rec = L.Record(
        id=L.new_id(),
        user=S1,
        owner_type="course",
        owner="ml101",
        size="h100:1g.10gb",
        walltime_minutes=120,
        source=f"server:{S1}/",
        opened_at=t0,
        started_at=t0,
        nodes="local",
        rates=RATES,
    )
    return LedgerStore(store).open(rec)


def test_warm_then_claimed_books_balance(portal_store: PortalStore) -> None:
    eng, course, w = _setup(portal_store)
    cls = ClassStartStore(portal_store)
    assert cls.begin_window(w, [S1], "schedule") == [S1]
    assert cls.begin_window(w, [S1], "schedule") == []  # once
    t0 = time.time()
    rec = _hub_warm_start(portal_store, t0)
    assert eng.mark_warm(course, w, S1) == rec.id
    ledger = LedgerStore(portal_store)
    warm = ledger.get(rec.id)
    assert warm is not None and warm.role == CS.WARM_ROLE and "warm" in warm.note
    with portal_store.begin() as s:
        (hold,) = s.scalars(select(BudgetCharge)).all()
        assert hold.user == "warm:ml101"  # the pool's warm share, not the student's
    bal = BudgetStore(portal_store).balance("course:ml101", "ml101", user=S1)
    assert bal.user_held == 0 and bal.held > 0  # the student's allowance is untouched

    at = datetime.fromtimestamp(t0 + 600, UTC)
    asyncio.run(eng.hand_over(course, w, S1, {"groups": ["course-ml101"]}, at))
    warm = ledger.get(rec.id)
    assert warm is not None and warm.end_reason == "claimed" and warm.ended_at == round(t0 + 600, 3)
    (row,) = cls.warm_rows(w.course, w.start)
    assert row["state"] == CLAIMED and row["record_id"] != rec.id
    mine = ledger.get(row["record_id"])
    assert mine is not None and not mine.closed
    assert mine.role == "student" and mine.note == "" and mine.user == S1
    assert mine.started_at == mine.opened_at == warm.ended_at  # no gap, no overlap
    assert ledger.open_for(f"server:{S1}/") == mine  # the hub closes this one at the stop
    # the student stops 300 s later
    done = ledger.close(mine.id, reason="stopped", ended_at=t0 + 900)
    assert warm.amounts is not None and done.amounts is not None
    total = warm.amounts.gpu_seconds + done.amounts.gpu_seconds
    assert total == pytest.approx(900 / 7, abs=0.01)  # every GPU-second in exactly one record
    assert warm.amounts.gpu_seconds == pytest.approx(600 / 7, abs=0.01)
    bal = BudgetStore(portal_store).balance("course:ml101", "ml101", user=S1)
    assert bal.user_settled == pytest.approx(300 / 7 / 3600, abs=1e-5)  # only their part
    assert bal.settled == pytest.approx(900 / 7 / 3600, abs=1e-5)  # the pool: all of it
    assert bal.held == 0
    n, broken = ledger.verify()
    assert n == 2 and broken is None


def test_a_claim_the_allowance_cannot_hold_stops_the_server(portal_store: PortalStore) -> None:
    eng, course, w = _setup(portal_store)
    BudgetStore(portal_store).set_allowance("ml101", "ml101", S1, 0.0, "ines@uni-a.example")
    cls = ClassStartStore(portal_store)
    cls.begin_window(w, [S1], "schedule")
    t0 = time.time()
    # the warm server runs on the pool; the student's own allowance is 0
    rec = L.Record(
        id=L.new_id(), user=S1, owner_type="course", owner="ml101", walltime_minutes=120,
        source=f"server:{S1}/", opened_at=t0, started_at=t0, rates=RATES,
    )  # fmt: skip
    LedgerStore(portal_store).open(rec)
    calls: list[tuple[str, str]] = []

    async def hub(method: str, path: str, body: Any = None) -> Any:
        calls.append((method, path))
        return {}

    eng.hub = hub  # type: ignore[method-assign]
    at = datetime.fromtimestamp(t0 + 60, UTC)
    asyncio.run(eng.hand_over(course, w, S1, {"groups": ["course-ml101"]}, at))
    assert calls == [("DELETE", "/users/s1%40uni-a.example/server")]
    (row,) = cls.warm_rows(w.course, w.start)
    assert row["state"] == "failed" and "left for you" in (row["reason"] or ""), row
    still = LedgerStore(portal_store).get(rec.id)
    assert still is not None and not still.closed  # the hub's stop closes it, on the pool


def test_the_warm_servers_job_names_the_reservation_and_a_preview_does_not() -> None:
    """SlurmGPUSpawner.reservation_for (set by configure() from the class starts): the
    job script of a start carries ``#SBATCH --reservation=<name>``; the preview never."""
    from types import SimpleNamespace

    from sovereign_portal.spawners.slurm.spawner import PREVIEW_TAG, SlurmGPUSpawner

    from tests.support.slurm_cluster import SITE_FILE, TEST_USERS, ensure_users

    ensure_users(TEST_USERS[:1])
    asked: list[Any] = []

    def reservation_for(sp: Any) -> str | None:
        asked.append(sp)
        return "class-ml101-202702020915"

    sp = SlurmGPUSpawner(
        site_file=str(SITE_FILE),
        user=SimpleNamespace(name=TEST_USERS[0], groups=[]),
        api_token="x" * 32,
        reservation_for=reservation_for,
    )
    r = sp.validate_request({"partition": "gpu-fr", "accelerator": "h100", "slice": "1g.10gb"})
    script = sp.render_job(r, PREVIEW_TAG, hub_env={})[2]
    assert "#SBATCH --reservation=class-ml101-202702020915" in script.splitlines()
    assert asked == [sp]
    assert "--reservation" not in sp.render_job(r, PREVIEW_TAG)[2]
    sp.reservation_for = lambda _sp: None
    assert "--reservation" not in sp.render_job(r, PREVIEW_TAG, hub_env={})[2]


def test_a_prewarm_covers_students_the_hub_never_saw_and_sizes_the_walltime(
    portal_store: PortalStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The roster is the course group plus students added by identifier: the hub is asked
    to create those it lacks (its own route; the service creates nobody), and each warm
    server's walltime runs to the class's end plus the grace."""
    from sovereign_portal.hub import course_api

    eng, course, _ = _setup(portal_store)
    s4 = "s4@uni-a.example"
    eng.courses.change_roster("ml101", add=[s4], actor="ines@uni-a.example")
    calls: list[tuple[str, str, Any]] = []

    async def hub_api(portal: Any, method: str, path: str, body: Any = None) -> Any:
        calls.append((method, path, body))
        if path == "/groups/course-ml101":
            return {"users": [S1]}
        return None if path.startswith("/users/") else {}

    async def raw(method: str, path: str, body: Any = None) -> tuple[int, str]:
        calls.append((method, path, body))
        if path.endswith("/users"):
            return 200, '{"created": ["s4@uni-a.example"], "known": []}'
        return 202, ""

    monkeypatch.setattr(course_api, "hub_api", hub_api)
    eng._raw = raw  # type: ignore[method-assign]
    w = CS.window(course, datetime.now(UTC))
    assert w is not None
    before = datetime.now(UTC)
    asyncio.run(eng.prewarm(course, w, "ines@uni-a.example"))
    posts = [(p, b) for m, p, b in calls if m == "POST"]
    assert posts[0] == ("/sovereign-portal/courses/ml101/users", {"users": [s4]})
    spawns = dict(posts[1:])
    assert set(spawns) == {"/users/s1%40uni-a.example/server", "/users/s4%40uni-a.example/server"}
    want = math.ceil((w.end - before).total_seconds() / 60) + eng.policy.prewarm_grace_minutes
    for body in spawns.values():
        assert body["course"] == "ml101" and body["slice"] == "1g.10gb"
        assert body["walltime_minutes"] in (want - 1, want), body  # not the size's default


def test_a_student_the_hub_refuses_to_create_is_not_started(
    portal_store: PortalStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sovereign_portal.hub import course_api

    eng, course, _ = _setup(portal_store)
    s4 = "s4@uni-a.example"
    eng.courses.change_roster("ml101", add=[s4], actor="ines@uni-a.example")
    spawned: list[str] = []

    async def hub_api(portal: Any, method: str, path: str, body: Any = None) -> Any:
        return {"users": []} if path.startswith("/groups/") else None

    async def raw(method: str, path: str, body: Any = None) -> tuple[int, str]:
        if path.endswith("/users"):
            return 403, '{"status": 403, "message": "no", "field": "users[0]"}'
        spawned.append(path)
        return 202, ""

    monkeypatch.setattr(course_api, "hub_api", hub_api)
    eng._raw = raw  # type: ignore[method-assign]
    w = CS.window(course, datetime.now(UTC))
    assert w is not None
    assert asyncio.run(eng.prewarm(course, w, "ines@uni-a.example")) == 0
    assert spawned == []
    (row,) = ClassStartStore(portal_store).warm_rows(w.course, w.start)
    assert row["user"] == s4 and row["state"] == "failed" and "403" in (row["reason"] or "")


def test_install_gives_the_custom_scope_to_the_services_role_only(tmp_path: Any) -> None:
    from sovereign_portal.hub.class_start_hub import HANDLERS, SCOPE
    from sovereign_portal.hub.portal import configure
    from traitlets.config import Config

    c = Config()
    configure(c, str(tmp_path), auth="dev")
    assert SCOPE in c.JupyterHub.custom_scopes
    holders = [r["name"] for r in c.JupyterHub.load_roles if SCOPE in r.get("scopes", [])]
    assert holders == ["sovereign-portal-service"]
    roles = {r["name"]: r for r in c.JupyterHub.load_roles}
    assert "admin:users" not in roles["sovereign-portal-service"]["scopes"]
    assert all(h in c.JupyterHub.extra_handlers for h in HANDLERS)


def test_a_big_prewarm_asks_in_parallel_in_the_background_and_nobody_is_gone_meanwhile(
    portal_store: PortalStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The storm benchmark's class: the hub answers a start that waits in its start queue
    only after 10 s, so asking one after the other held "Pre-warm now" for minutes, and
    the engine's pass marked students whose start was not asked for yet "gone". Now the
    button returns at once, the starts go PREWARM_REQUESTS at a time, and a student still
    being asked for is never gone; one whose server vanished afterwards still is."""
    from sovereign_portal.hub import course_api
    from sovereign_portal.hub.class_start_api import PREWARM_REQUESTS

    eng, course, _ = _setup(portal_store)
    students = [f"s{i:02d}@uni-a.example" for i in range(20)]
    posted: set[str] = set()
    inflight = [0, 0]  # now, most

    async def hub_api(portal: Any, method: str, path: str, body: Any = None) -> Any:
        if path.startswith("/groups/"):
            return {"users": students}
        if path == "/sovereign-portal/class-servers":  # the engine's one call per pass
            assert method == "POST" and set(body) == {"users"}
            await asyncio.sleep(0.02)  # starts finish while the hub answers
            return {
                "users": {
                    n: {"server": {"ready": False} if n in posted else None, "server_tokens": []}
                    for n in body["users"]
                }
            }
        if method == "GET" and path.startswith("/users/"):
            name = path.split("/")[2].replace("%40", "@")
            return {"name": name, "servers": {"": {"ready": False}} if name in posted else {}}
        return None

    async def raw(method: str, path: str, body: Any = None) -> tuple[int, str]:
        assert method == "POST" and path.endswith("/server"), path
        inflight[0] += 1
        inflight[1] = max(inflight[1], inflight[0])
        await asyncio.sleep(0.05)  # the hub's answer after its slow_spawn_timeout
        posted.add(path.split("/")[2].replace("%40", "@"))
        inflight[0] -= 1
        return 202, ""

    monkeypatch.setattr(course_api, "hub_api", hub_api)
    eng._raw = raw  # type: ignore[method-assign]
    w = CS.window(course, datetime.now(UTC))
    assert w is not None
    cls = ClassStartStore(portal_store)

    async def run() -> None:
        assert await eng.prewarm(course, w, "ines@uni-a.example", wait=False) == 20
        assert len(posted) < 20  # it returned before the hub took them all
        eng.now = lambda: datetime.now(UTC) + timedelta(minutes=1)  # every row > 30 s old
        (wrow,) = cls.active_windows()
        while eng._tasks:
            await eng.follow(wrow)
            assert {r["state"] for r in cls.warm_rows(w.course, w.start)} == {"starting"}
            await asyncio.sleep(0.01)
        assert posted == set(students)
        posted.discard(students[0])  # its server is gone after the engine asked for it
        await eng.follow(wrow)

    asyncio.run(run())
    assert 1 < inflight[1] <= PREWARM_REQUESTS
    rows = {r["user"]: r for r in cls.warm_rows(w.course, w.start)}
    assert rows[students[0]]["state"] == "failed" and rows[students[0]]["reason"] == "gone"
    assert {rows[s]["state"] for s in students[1:]} == {"starting"}
