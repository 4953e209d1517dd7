"""A storm is a queue, not a failure: the portal's start queue (issue 12).

When more students press "Start" than the cluster (or this box) can start at once, each
start waits its turn here, in arrival order, and the spawn page says where it is in line
and about how long is left. Nobody gets a 429, a timeout or a stack trace.

How it fits JupyterHub's own spawn throttling:

- JupyterHub counts every pending spawn against ``JupyterHub.concurrent_spawn_limit`` and
  answers 429 ("Too many users trying to log in right now") above it. The portal sets that
  limit far above any class (:data:`HUB_SPAWN_CEILING`, set by ``configure()``): it is a
  last-resort ceiling, not the throttle.
- The throttle is this queue. A portal spawner takes its place in line in
  ``run_pre_spawn_hook`` (after the budget and course checks, so a refused spawn never
  waits), which JupyterHub runs *before* ``Spawner.start`` and so outside
  ``start_timeout``: waiting in line never times a start out. The turn is held while
  ``start()`` runs and until the server it started accepts connections (a local server
  is still importing JupyterLab when ``start()`` returns: that start-up CPU is what a
  storm is short of), or until the start fails (``PortalSpawnerMixin`` wraps every
  backend's ``start``), or at the latest after ``hold_seconds``.
- While a start waits, the spawner's ``progress()`` (JupyterHub's progress API, which the
  spawn-pending page streams) yields the place in line and the estimate first, every
  second, then the backend's own events.

The estimate is ``ceil(place / slots)`` rounds of the mean of the last starts' durations
(``estimate_seconds`` until there is one). Queues are per process and per name (one per
backend); spawners share them. This module imports neither hub nor JupyterHub.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

#: ``JupyterHub.concurrent_spawn_limit`` as ``configure()`` sets it: far above any class,
#: so the hub itself never answers 429 for one; the start queue is the throttle.
HUB_SPAWN_CEILING = 2000
#: How many recent start durations the estimate averages.
WINDOW = 20


@dataclass(eq=False)
class Ticket:
    """One start's place: waiting until ``granted`` is set, then holding a slot."""

    owner: str
    queue: StartQueue
    arrived: float = field(default_factory=time.monotonic)
    granted_at: float | None = None
    released: bool = False
    _event: asyncio.Event = field(default_factory=asyncio.Event)
    _timer: asyncio.TimerHandle | None = None

    @property
    def waiting(self) -> bool:
        return self.granted_at is None and not self.released

    def position(self) -> int | None:
        """1 for the next in line; None once it holds its slot (or left)."""
        return self.queue.position(self)

    def estimate_seconds(self) -> float | None:
        p = self.position()
        return None if p is None else self.queue.estimate(p)

    def message(self) -> str:
        """What the spawn page says while this start waits."""
        return queue_message(self.position(), self.estimate_seconds(), self.queue.slots)

    def release(self) -> None:
        self.queue.release(self)


def queue_message(position: int | None, estimate: float | None, slots: int) -> str:
    """The spawn page's line for a place in the queue (``position`` 1 is next)."""
    if position is None:
        return "Your turn: starting your server…"
    ahead = position - 1
    who = "You are next" if ahead == 0 else f"You are number {position} in line"
    about = "" if estimate is None else f"; about {format_seconds(estimate)} to go"
    return (
        f"{who} to start (the portal starts {slots} server{'' if slots == 1 else 's'} "
        f"at a time){about}. "
        "Keep this page open: your server starts when it is your turn."
    )


def format_seconds(s: float) -> str:
    s = max(0, math.ceil(s))
    if s < 60:
        return f"{s} s"
    m, rest = divmod(s, 60)
    return f"{m} min {rest} s" if rest else f"{m} min"


class StartQueue:
    """A first-come, first-served line of starts with ``slots`` running at once."""

    def __init__(self, name: str, slots: int, estimate_seconds: float, hold_seconds: float):
        if slots < 1:
            raise ValueError(f"start queue {name}: slots must be at least 1, got {slots}")
        self.name = name
        self.slots = slots
        self.estimate_seconds = float(estimate_seconds)
        self.hold_seconds = float(hold_seconds)
        self._waiting: deque[Ticket] = deque()
        self._holding: set[Ticket] = set()
        self._durations: deque[float] = deque(maxlen=WINDOW)

    # -- state ------------------------------------------------------------------------------
    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def holding(self) -> int:
        return len(self._holding)

    def position(self, ticket: Ticket) -> int | None:
        if not ticket.waiting:
            return None
        for i, t in enumerate(self._waiting, 1):
            if t is ticket:
                return i
        return None

    def mean_start_seconds(self) -> float:
        if not self._durations:
            return self.estimate_seconds
        return sum(self._durations) / len(self._durations)

    def estimate(self, position: int) -> float:
        """Seconds until a start at ``position`` gets its turn and is up: the rounds of
        ``slots`` starts ahead of it, plus its own."""
        return math.ceil(position / self.slots) * self.mean_start_seconds()

    # -- moves ------------------------------------------------------------------------------
    def join(self, owner: str) -> Ticket:
        """Take a place (granted at once when a slot is free); await :meth:`wait`."""
        t = Ticket(owner=owner, queue=self)
        self._waiting.append(t)
        self._grant()
        return t

    async def wait(self, ticket: Ticket) -> None:
        """Until ``ticket`` holds a slot. Cancelled: it leaves the line (and its slot)."""
        try:
            await ticket._event.wait()
        except BaseException:
            self.release(ticket)
            raise

    def release(self, ticket: Ticket) -> None:
        """Give the place or slot back (idempotent); the next in line gets it."""
        if ticket.released:
            return
        ticket.released = True
        if ticket._timer is not None:
            ticket._timer.cancel()
        if ticket in self._holding:
            self._holding.discard(ticket)
            if ticket.granted_at is not None:
                self._durations.append(time.monotonic() - ticket.granted_at)
        else:
            with contextlib.suppress(ValueError):
                self._waiting.remove(ticket)
        self._grant()

    def _grant(self) -> None:
        while self._waiting and len(self._holding) < self.slots:
            t = self._waiting.popleft()
            t.granted_at = time.monotonic()
            self._holding.add(t)
            t._event.set()
            if self.hold_seconds > 0:
                try:
                    loop = asyncio.get_running_loop()
                except RuntimeError:
                    continue
                # a start that never reports back (a bug, a lost task) frees its slot
                t._timer = loop.call_later(self.hold_seconds, self.release, t)


_QUEUES: dict[str, StartQueue] = {}


def start_queue(name: str, slots: int, estimate_seconds: float, hold_seconds: float) -> StartQueue:
    """The process's queue ``name`` (created on first use; later calls update its limits,
    so a config reload takes effect for the next grant)."""
    q = _QUEUES.get(name)
    if q is None:
        q = _QUEUES[name] = StartQueue(name, slots, estimate_seconds, hold_seconds)
    else:
        q.slots, q.estimate_seconds, q.hold_seconds = slots, float(estimate_seconds), hold_seconds
        q._grant()
    return q


def places() -> dict[str, int]:
    """Every waiting start's owner and its place in line (1 is next), over this process's
    queues; an owner waiting twice (two named servers) shows its better place. The class
    view, which runs in the hub process as the queues do, reads it."""
    out: dict[str, int] = {}
    for q in _QUEUES.values():
        for i, t in enumerate(q._waiting, 1):
            if t.waiting:
                out[t.owner] = min(i, out.get(t.owner, i))
    return out


async def queue_events(ticket: Ticket | None, every: float = 1.0) -> AsyncIterator[dict[str, Any]]:
    """Progress events while ``ticket`` waits: the place in line and the estimate, each
    time they change (at least every ``every`` seconds), then one "your turn" event."""
    if ticket is None or not ticket.waiting:
        return
    last = None
    while ticket.waiting:
        msg = ticket.message()
        if msg != last:
            yield {"progress": 5, "message": msg, "queue": _state(ticket)}
            last = msg
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ticket._event.wait(), timeout=every)
    if not ticket.released:
        yield {"progress": 10, "message": ticket.message(), "queue": _state(ticket)}


async def until_listening(address: Any, seconds: float) -> bool:
    """Wait until ``address`` (what ``Spawner.start`` returned: a URL or ``(ip, port)``)
    accepts a TCP connection, at most ``seconds``. A start holds its turn until
    then: a local server is still importing JupyterLab (the CPU a storm is short of) when
    ``start()`` returns. False on timeout or an address it cannot read (the hub's own
    HTTP check then decides, as always)."""
    from urllib.parse import urlsplit

    if isinstance(address, str):
        parts = urlsplit(address)
        host, port = parts.hostname, parts.port
    elif isinstance(address, tuple | list) and len(address) == 2:
        host, port = str(address[0]), int(address[1])
    else:
        return False
    if not host or not port:
        return False
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1.0)
        except (OSError, TimeoutError):
            await asyncio.sleep(0.1)
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True
    return False


def _state(ticket: Ticket) -> dict[str, Any]:
    p = ticket.position()
    e = ticket.estimate_seconds()
    return {"position": p, "estimate_seconds": None if e is None else round(e, 1)}


__all__ = [
    "HUB_SPAWN_CEILING",
    "StartQueue",
    "Ticket",
    "format_seconds",
    "queue_events",
    "queue_message",
    "start_queue",
    "until_listening",
]
