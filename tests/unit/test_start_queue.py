"""The start queue (spawners/start_queue.py): first come first served with ``slots`` at
once, places and estimates as the spawn page shows them, turns given back on success,
failure, cancellation and the hold limit; and the spawner mixin's wiring (the turn is
taken after the pre-spawn hook, held through ``start``, shown first in ``progress``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from jupyterhub.spawner import Spawner
from sovereign_portal.spawners.base import PortalSpawnerMixin
from sovereign_portal.spawners.start_queue import (
    StartQueue,
    format_seconds,
    queue_events,
    queue_message,
    until_listening,
)

pytestmark = [pytest.mark.unit]


def test_places_follow_arrival_and_slots() -> None:
    q = StartQueue("t", slots=2, estimate_seconds=10, hold_seconds=0)
    t = [q.join(f"u{i}") for i in range(5)]
    assert [x.position() for x in t] == [None, None, 1, 2, 3]
    assert (q.holding, q.waiting) == (2, 3)
    # estimates: rounds of two starts of 10 s each
    assert [x.estimate_seconds() for x in t[2:]] == [10, 10, 20]
    t[0].release()
    assert [x.position() for x in t] == [None, None, None, 1, 2]
    t[3].release()  # left the line before its turn: the one behind moves up
    assert t[4].position() == 1
    t[1].release()
    assert t[4].position() is None and q.holding == 2
    t[1].release()  # twice: nothing more happens
    assert q.holding == 2


def test_estimate_learns_from_real_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr("sovereign_portal.spawners.start_queue.time.monotonic", lambda: now[0])
    q = StartQueue("t", slots=1, estimate_seconds=20, hold_seconds=0)
    a, b = q.join("a"), q.join("b")
    assert b.estimate_seconds() == 20  # no start timed yet
    now[0] += 4
    a.release()  # a took 4 s
    c = q.join("c")
    assert c.estimate_seconds() == 4


def test_messages_name_the_place_and_the_estimate() -> None:
    assert queue_message(1, 12, 4).startswith("You are next to start")
    m = queue_message(7, 95, 4)
    assert (
        "number 7 in line" in m
        and "(the portal starts 4 servers at a time)" in m
        and "1 min 35 s" in m
    )
    assert "Keep this page open" in m
    assert queue_message(None, None, 4).startswith("Your turn")
    assert "starts 1 server at a time" in queue_message(2, 8, 1)
    assert (format_seconds(0.2), format_seconds(60), format_seconds(61)) == (
        "1 s",
        "1 min",
        "1 min 1 s",
    )
    with pytest.raises(ValueError, match="slots must be at least 1"):
        StartQueue("t", slots=0, estimate_seconds=1, hold_seconds=0)


@pytest.mark.asyncio
async def test_wait_cancelled_leaves_the_line() -> None:
    q = StartQueue("t", slots=1, estimate_seconds=5, hold_seconds=0)
    first = q.join("a")
    second = q.join("b")
    task = asyncio.ensure_future(q.wait(second))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert second.released and q.waiting == 0
    first.release()
    assert q.holding == 0


@pytest.mark.asyncio
async def test_a_lost_start_frees_its_slot_after_the_hold() -> None:
    q = StartQueue("t", slots=1, estimate_seconds=5, hold_seconds=0.05)
    q.join("lost")  # never released by its start
    nxt = q.join("b")
    await asyncio.wait_for(q.wait(nxt), timeout=2)
    assert nxt.position() is None


@pytest.mark.asyncio
async def test_queue_events_stream_places_then_the_turn() -> None:
    q = StartQueue("t", slots=1, estimate_seconds=3, hold_seconds=0)
    a, b, c = q.join("a"), q.join("b"), q.join("c")
    seen: list[dict[str, Any]] = []

    async def watch() -> None:
        async for e in queue_events(c, every=0.01):
            seen.append(e)

    task = asyncio.ensure_future(watch())
    await asyncio.sleep(0.05)
    a.release()
    await asyncio.sleep(0.05)
    b.release()
    await asyncio.wait_for(task, timeout=2)
    assert [e["queue"]["position"] for e in seen] == [2, 1, None]
    assert "number 2 in line" in seen[0]["message"] and seen[-1]["progress"] == 10


class _Spawner(PortalSpawnerMixin, Spawner):
    backend = "local"
    order: list[str]
    _now = 0

    running: list[int] = [0]  # starts running now, then the largest seen

    async def start(self) -> tuple[str, int]:
        self.order.append(f"start {self.user.name}")
        _Spawner._now += 1
        _Spawner.running.append(_Spawner._now)
        try:
            await asyncio.sleep(0.05)
            if self.user.name == "bad":
                raise RuntimeError("start failed")
            return ("127.0.0.1", 1)
        finally:
            _Spawner._now -= 1

    async def stop(self, now: bool = False) -> None:
        pass

    async def poll(self) -> int | None:
        return None

    async def progress(self) -> AsyncIterator[dict[str, Any]]:
        yield {"progress": 50, "message": "backend event"}


class _User:
    def __init__(self, name: str) -> None:
        self.name = name
        self.groups: list[Any] = []


@pytest.mark.asyncio
async def test_mixin_takes_the_turn_after_the_hook_and_gives_it_back() -> None:
    order: list[str] = []

    def hook(spawner: Any) -> None:
        order.append(f"hook {spawner.user.name}")

    spawners = []
    for name in ("a", "bad", "c"):
        s = _Spawner(user=_User(name), start_slots=1, pre_spawn_hook=hook, http_timeout=1)  # type: ignore[arg-type]
        s.backend = f"test-{id(order)}"  # a queue of this test's own
        s.order = order
        spawners.append(s)

    async def spawn(s: _Spawner) -> Any:
        await s.run_pre_spawn_hook()
        return await s.start()

    results = await asyncio.gather(*(spawn(s) for s in spawners), return_exceptions=True)
    assert isinstance(results[1], RuntimeError)  # a failed start gave its turn back
    assert results[0] == results[2] == ("127.0.0.1", 1)
    # each start after its own hook; starts one at a time, in arrival order
    assert [e for e in order if e.startswith("start")] == ["start a", "start bad", "start c"]
    for name in ("a", "bad", "c"):
        assert order.index(f"hook {name}") < order.index(f"start {name}")
    assert max(_Spawner.running) == 1
    assert all(s._start_ticket is None for s in spawners)


@pytest.mark.asyncio
async def test_mixin_progress_shows_the_line_first() -> None:
    a = _Spawner(user=_User("a"), start_slots=1)  # type: ignore[arg-type]
    b = _Spawner(user=_User("b"), start_slots=1)  # type: ignore[arg-type]
    a.backend = b.backend = f"test-{id(a)}"
    a.order = b.order = []
    await a.wait_turn()
    waiting = asyncio.ensure_future(b.wait_turn())
    await asyncio.sleep(0.01)
    events: list[dict[str, Any]] = []

    async def watch() -> None:
        async for e in b.progress():
            events.append(e)

    task = asyncio.ensure_future(watch())
    await asyncio.sleep(0.05)
    a.give_turn_back()
    await asyncio.wait_for(waiting, timeout=2)
    await asyncio.wait_for(task, timeout=2)
    assert events[0]["message"].startswith("You are next to start")
    assert events[-1] == {"progress": 50, "message": "backend event"}
    b.give_turn_back()


@pytest.mark.asyncio
async def test_slots_zero_means_no_queue() -> None:
    s = _Spawner(user=_User("z"), start_slots=0)  # type: ignore[arg-type]
    await s.wait_turn()
    assert s._start_ticket is None


@pytest.mark.asyncio
async def test_until_listening_waits_for_the_port() -> None:
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        assert await until_listening(("127.0.0.1", port), 2)
        assert await until_listening(f"http://127.0.0.1:{port}/user/a/", 2)
    finally:
        server.close()
        await server.wait_closed()
    t0 = asyncio.get_running_loop().time()
    assert not await until_listening(("127.0.0.1", port), 0.3)  # closed now: gives up
    assert asyncio.get_running_loop().time() - t0 < 2
    assert not await until_listening(None, 1)


@pytest.mark.asyncio
async def test_the_turn_is_held_until_the_server_listens() -> None:
    """A local start returns while the server still imports: the next start waits until
    the first one's port accepts connections."""
    order: list[str] = []
    ports: dict[str, int] = {}

    class Late(_Spawner):
        async def start(self) -> tuple[str, int]:
            order.append(f"start {self.user.name}")
            server_ready = asyncio.get_running_loop().call_later(
                0.3, lambda: asyncio.ensure_future(listen(self.user.name))
            )
            del server_ready
            return ("127.0.0.1", ports[self.user.name])

    servers: list[asyncio.Server] = []

    async def listen(name: str) -> None:
        order.append(f"listening {name}")
        servers.append(await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", ports[name]))

    import socket

    for name in ("a", "b"):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            ports[name] = sock.getsockname()[1]
    spawners = [Late(user=_User(n), start_slots=1, http_timeout=5) for n in ("a", "b")]  # type: ignore[arg-type]
    for sp in spawners:
        sp.backend = f"test-late-{id(order)}"
        sp.order = order

    async def spawn(sp: Late) -> Any:
        await sp.run_pre_spawn_hook()
        return await sp.start()

    try:
        await asyncio.wait_for(asyncio.gather(*(spawn(sp) for sp in spawners)), 10)
    finally:
        for srv in servers:
            srv.close()
    assert order == ["start a", "listening a", "start b", "listening b"], order


def test_places_name_each_waiting_owner_across_the_processs_queues() -> None:
    from sovereign_portal.spawners import start_queue as sq

    q = sq.start_queue("places-test", slots=1, estimate_seconds=5, hold_seconds=0)
    try:
        held, a, b, a2 = q.join("s0"), q.join("sa"), q.join("sb"), q.join("sa")
        got = sq.places()
        assert (got.get("s0"), got["sa"], got["sb"]) == (None, 1, 2)  # sa's better place
        held.release()  # sa's first start gets the slot; its second waits behind sb
        assert (sq.places()["sb"], sq.places()["sa"]) == (1, 2)
        for t in (a, b, a2):
            t.release()
        assert not {"s0", "sa", "sb"} & set(sq.places())
    finally:
        sq._QUEUES.pop("places-test", None)
