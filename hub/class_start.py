"""Class starts: when to pre-warm, whom, when a warm server counts as claimed, when one
nobody claimed stops, and the Slurm reservation of a class window. Pure: every function
takes ``now``; :mod:`.class_start_store` keeps the state and :mod:`.class_start_api` acts.

A course with ``prewarm`` settings (:class:`.courses.Prewarm`) and a weekly schedule
(:class:`.courses.ClassSlot`, UTC) has, for each class, a :class:`Window`. Its timeline:

- ``prewarm.minutes`` before the start, the portal service starts the default server of
  ``fraction`` of the roster (:func:`pick`) on the course's pre-warm size, through the
  hub's REST API with its own token, so the server is the student's own; its walltime
  runs to the class's end plus a grace (:func:`warm_walltime`);
- a student *claims* their warm server by opening it in a browser after the pre-warm:
  JupyterHub then issues an OAuth token to the server's client (``Server at /user/...``),
  which the service reads (``GET /users/<name>/tokens``, scope ``read:tokens``); the
  token's ``created`` time is the claim (:func:`claim_time`; only the warm server's own
  client counts, never one of the student's named servers). The warm ledger record
  closes then and the student's own record begins;
- ``prewarm.unclaimed_minutes`` into the class, warm servers nobody claimed stop;
- at the end of the class the window is over (its reservation, if any, is deleted).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from typing import Any
from urllib.parse import urlsplit

from .courses import WEEKDAYS, ClassSlot, Course, CourseError, Prewarm

#: States of a class's pre-warm (the class API, ``prewarm.state``).
IDLE, WARMING, WARM, OVER = "idle", "warming", "warm", "over"
#: States of one student's place in a class (the class API, ``students[].state``).
STUDENT_STATES = ("warm", "claimed", "starting", "queued", "absent", "stopped")
#: Ledger ``role`` of a warm record: it charges the course pool, never a student.
WARM_ROLE = "warm"
#: A Slurm reservation name: ``class-<course>-<yyyymmddhhmm>``.
_RESV_RE = re.compile(r"^class-[a-z0-9][a-z0-9-]{0,39}-[0-9]{12}$")


@dataclass(frozen=True)
class Window:
    """One class: its course, its slot, and its start and end (UTC)."""

    course: str
    slot: ClassSlot
    start: datetime
    end: datetime

    @property
    def key(self) -> str:
        """The window's identity in the store: the course and its start minute."""
        return f"{self.course}@{self.start.strftime('%Y%m%dT%H%MZ')}"

    @property
    def reservation(self) -> str:
        """The name of the window's Slurm reservation."""
        return f"class-{self.course}-{self.start.strftime('%Y%m%d%H%M')}"

    def to_json(self) -> dict[str, Any]:
        return {"start": _iso(self.start), "end": _iso(self.end)}


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _slot_start(slot: ClassSlot, day: datetime) -> datetime:
    hh, mm = (int(x) for x in slot.time.split(":"))
    return datetime.combine(day.date(), time(hh, mm), tzinfo=UTC)


def window(course: Course, now: datetime) -> Window | None:
    """The class that matters at ``now``: the one under way, else the next one (within
    eight days), inside the course's dates. None when the course has no class left."""
    if now.tzinfo is None:
        raise ValueError("now: must be timezone-aware")
    best: Window | None = None
    lead = timedelta(minutes=course.prewarm.minutes if course.prewarm else 0)
    for slot in course.schedule:
        wd = WEEKDAYS.index(slot.weekday)
        for back in (-7, 0, 7):  # the slot this week, last week and next week
            day = now + timedelta(days=(wd - now.weekday()) + back)
            start = _slot_start(slot, day)
            end = start + timedelta(minutes=slot.minutes)
            if end <= now or start.date() < course.start or start.date() >= course.end:
                continue
            if start - lead > now + timedelta(days=8):
                continue
            w = Window(course.id, slot, start, end)
            if best is None or w.start < best.start:
                best = w
    return best


def prewarm_at(w: Window, p: Prewarm) -> datetime:
    return w.start - timedelta(minutes=p.minutes)


def stop_at(w: Window, p: Prewarm) -> datetime:
    """When warm servers nobody claimed stop (never after the class ends)."""
    return min(w.start + timedelta(minutes=p.unclaimed_minutes), w.end)


def due(w: Window, p: Prewarm, now: datetime) -> bool:
    """Whether the pre-warm of ``w`` should run at ``now``: from ``prewarm.minutes`` before
    the start until the unclaimed-stop time (a later server would only be stopped)."""
    return prewarm_at(w, p) <= now < stop_at(w, p)


def pick(roster: Iterable[str], fraction: float, key: str) -> list[str]:
    """The students to pre-warm for: ``ceil(fraction × n)`` of the roster (at least one of
    a non-empty roster), in an order fixed by ``key`` (the window) and each name, so the
    same class picks the same students and the next class picks others."""
    if not 0 < fraction <= 1 or not math.isfinite(fraction):
        raise CourseError("fraction", f"must be above 0 and at most 1, got {fraction!r}")
    people = sorted(set(roster))
    if not people:
        return []
    n = min(len(people), max(1, math.ceil(round(fraction * len(people), 9))))
    order = sorted(people, key=lambda u: hashlib.sha256(f"{key}\0{u}".encode()).hexdigest())
    return sorted(order[:n])


def parse_time(value: Any) -> datetime | None:
    """A JupyterHub ISO time (``...Z`` or an offset) as an aware datetime; None for none."""
    if not value or not isinstance(value, str):
        return None
    t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def claim_time(
    tokens: Sequence[Mapping[str, Any]], since: datetime, server_url: str
) -> datetime | None:
    """When the student claimed their warm server: the first OAuth token issued to the
    server's own client (``oauth_client`` ``Server at <server_url>``: the student opened
    it in a browser) created at or after ``since`` (the pre-warm's start). None: not
    claimed. ``server_url`` is the warm server's ``url`` in the hub's user model
    (``/user/<name>/``; only its path counts).

    The server's own API token (client ``JupyterHub``), the student's other tokens and
    the OAuth tokens of their named servers (``Server at /user/<name>/<server>/``) do
    not count: only a browser that reached the warm server makes that client's token."""
    path = urlsplit(server_url).path or server_url
    client = f"Server at {path if path.endswith('/') else path + '/'}"
    times = [
        t
        for tok in tokens
        if str(tok.get("oauth_client") or "") == client
        and (t := parse_time(tok.get("created"))) is not None
        and t >= since - timedelta(seconds=1)
    ]
    return min(times) if times else None


def warm_walltime(w: Window, now: datetime, grace_minutes: int, max_minutes: int) -> int:
    """The walltime of a warm server started at ``now``: until the class ends, plus
    ``grace_minutes`` (a student who claimed it keeps it that long after the class), in
    whole minutes rounded up; at most ``max_minutes`` (the size's longest walltime), at
    least 1."""
    if now.tzinfo is None:
        raise ValueError("now: must be timezone-aware")
    if grace_minutes < 0 or max_minutes < 1:
        raise ValueError("grace_minutes must be 0 or more and max_minutes at least 1")
    seconds = (w.end - now).total_seconds() + 60 * grace_minutes
    return max(1, min(max_minutes, math.ceil(seconds / 60)))


def prewarm_state(
    w: Window | None, p: Prewarm | None, requested: int, started: int, now: datetime
) -> str:
    """``idle`` (nothing pre-warmed yet), ``warming`` (servers starting), ``warm`` (every
    requested server ran), ``over`` (the unclaimed-stop time of the window passed)."""
    if w is None or p is None:
        return IDLE
    if now >= stop_at(w, p) and requested:
        return OVER
    if not requested:
        return IDLE
    return WARM if started >= requested else WARMING


def student_state(row_state: str | None, server: Mapping[str, Any] | None) -> str:
    """One student's state for the class view, from their warm row (None: not pre-warmed)
    and their default server's model in the hub (None: no server)."""
    if row_state == "claimed":
        return "claimed" if server else "stopped"
    if row_state in ("unclaimed", "stopped", "failed"):
        return "stopped" if not server else ("claimed" if server.get("ready") else "starting")
    if server is None:
        return "queued" if row_state == "starting" else "absent"
    if server.get("ready"):
        return "warm" if row_state in ("starting", "warm") else "claimed"
    return "starting"


# -- Slurm reservations -------------------------------------------------------------------------
def reservation_create_argv(
    name: str,
    users: Sequence[str],
    start: datetime,
    minutes: int,
    *,
    partition: str = "",
    node_count: int = 1,
    nodes: Sequence[str] = (),
    scontrol: str = "scontrol",
) -> list[str]:
    """``scontrol create reservation`` for a class window: the course's Unix ``users``, from
    ``start`` for ``minutes``, the named ``nodes`` (e.g. the MIG nodes) or else
    ``node_count`` nodes of ``partition``. An argv list."""
    if not _RESV_RE.match(name):
        raise CourseError("reservation", f"{name!r} is not a class reservation name")
    if not users:
        raise CourseError("reservation", "a reservation needs at least one user")
    for u in users:
        if not re.match(r"^[a-z_][a-z0-9_.-]{0,31}$", u):
            raise CourseError("reservation", f"{u[:40]!r} is not a Unix user name")
    if not 1 <= minutes <= 24 * 60 or not 1 <= node_count <= 1000:
        raise CourseError("reservation", "minutes 1..1440 and 1..1000 nodes")
    argv = [
        scontrol,
        "create",
        "reservation",
        f"ReservationName={name}",
        f"StartTime={start.astimezone(UTC).strftime('%Y-%m-%dT%H:%M:%S')}",
        f"Duration={minutes}",
        f"Users={','.join(sorted(set(users)))}",
    ]
    for n in nodes:
        if not re.match(r"^[A-Za-z0-9_.-]{1,64}$", n):
            raise CourseError("reservation", f"{n[:40]!r} is not a node name")
    argv.append(f"Nodes={','.join(nodes)}" if nodes else f"NodeCnt={node_count}")
    argv.append("Flags=IGNORE_JOBS")
    if partition:
        if not re.match(r"^[A-Za-z0-9_.-]{1,64}$", partition):
            raise CourseError("reservation", f"{partition[:40]!r} is not a partition name")
        argv.append(f"PartitionName={partition}")
    return argv


def reservation_delete_argv(name: str, scontrol: str = "scontrol") -> list[str]:
    if not _RESV_RE.match(name):
        raise CourseError("reservation", f"{name!r} is not a class reservation name")
    return [scontrol, "delete", f"ReservationName={name}"]


__all__ = [
    "IDLE",
    "OVER",
    "STUDENT_STATES",
    "WARM",
    "WARMING",
    "WARM_ROLE",
    "Window",
    "claim_time",
    "due",
    "pick",
    "prewarm_at",
    "prewarm_state",
    "reservation_create_argv",
    "reservation_delete_argv",
    "stop_at",
    "student_state",
    "warm_walltime",
    "window",
]
