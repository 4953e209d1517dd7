"""Class starts in the portal database (Alembic revision 0009): the class windows a course
pre-warmed and each pre-warmed server. The rules are :mod:`.class_start` (pure); acting on
the hub, the ledger and Slurm is :mod:`.class_start_api`.

A warm server's row goes ``starting`` (the service asked the hub for it) → ``warm`` (it is
ready, on the course pool) → ``claimed`` (its student opened it: from then on it is theirs)
or ``unclaimed`` (nobody came; stopped ``unclaimed_minutes`` into the class), or ``failed``
(the hub refused or the server never started: the reason is kept).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ForeignKey, ForeignKeyConstraint, Index, Integer, String, select
from sqlalchemy.orm import Mapped, mapped_column

from .class_start import Window
from .store import Base, PortalStore, UTCDateTime, utcnow

STARTING, WARM, CLAIMED, UNCLAIMED, FAILED = "starting", "warm", "claimed", "unclaimed", "failed"
#: Window states: pre-warm under way; over (its servers handled, its reservation gone).
ACTIVE, DONE = "active", "done"
_UPDATABLE = ("state", "ready_at", "claimed_at", "stopped_at", "record_id", "reason")


class ClassWindowRow(Base):
    __tablename__ = "class_windows"

    course_id: Mapped[str] = mapped_column(String(40), ForeignKey("courses.id"), primary_key=True)
    start: Mapped[datetime] = mapped_column(UTCDateTime(), primary_key=True)
    end: Mapped[datetime] = mapped_column(UTCDateTime())
    state: Mapped[str] = mapped_column(String(16))
    reservation: Mapped[str | None] = mapped_column(String(80), nullable=True)
    requested: Mapped[int] = mapped_column(Integer)
    started_by: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())

    __table_args__ = (Index("ix_class_windows_state", "state"),)


class ClassWarmRow(Base):
    __tablename__ = "class_warm"

    course_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    start: Mapped[datetime] = mapped_column(UTCDateTime(), primary_key=True)
    user: Mapped[str] = mapped_column(String(255), primary_key=True)
    state: Mapped[str] = mapped_column(String(16))
    requested_at: Mapped[datetime] = mapped_column(UTCDateTime())
    ready_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    stopped_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    record_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    reason: Mapped[str | None] = mapped_column(String(255), nullable=True)

    __table_args__ = (
        ForeignKeyConstraint(
            ["course_id", "start"], ["class_windows.course_id", "class_windows.start"]
        ),
        Index("ix_class_warm_user_state", "user", "state"),
    )


class ClassStartStore:
    """Class windows and warm servers on a :class:`.store.PortalStore`."""

    def __init__(self, store: PortalStore) -> None:
        self.store = store

    def window_row(self, w: Window) -> dict[str, Any] | None:
        with self.store.begin() as s:
            r = s.get(ClassWindowRow, (w.course, w.start))
            if r is None:
                return None
            return {
                "state": r.state,
                "reservation": r.reservation,
                "requested": r.requested,
                "started_by": r.started_by,
            }

    def begin_window(
        self, w: Window, users: list[str], actor: str, reservation: str | None = None
    ) -> list[str]:
        """Record the pre-warm of ``w`` for ``users`` (once: a second call adds only users
        not there yet). Returns the users newly recorded, whose servers are to start."""
        now = utcnow()
        with self.store.begin() as s:
            r = s.get(ClassWindowRow, (w.course, w.start))
            if r is None:
                r = ClassWindowRow(
                    course_id=w.course,
                    start=w.start,
                    end=w.end,
                    state=ACTIVE,
                    reservation=reservation,
                    requested=0,
                    started_by=actor[:255],
                    created_at=now,
                    updated_at=now,
                )
                s.add(r)
                s.flush()
            have = set(
                s.scalars(
                    select(ClassWarmRow.user).where(
                        ClassWarmRow.course_id == w.course, ClassWarmRow.start == w.start
                    )
                )
            )
            new = [u for u in users if u not in have]
            for u in new:
                s.add(
                    ClassWarmRow(
                        course_id=w.course, start=w.start, user=u, state=STARTING, requested_at=now
                    )
                )
            r.requested = len(have) + len(new)
            r.updated_at = now
            return new

    def set_reservation(self, w: Window, name: str | None) -> None:
        with self.store.begin() as s:
            r = s.get(ClassWindowRow, (w.course, w.start))
            if r is not None:
                r.reservation, r.updated_at = name, utcnow()

    def warm_rows(self, course: str, start: datetime) -> list[dict[str, Any]]:
        with self.store.begin() as s:
            q = select(ClassWarmRow).where(
                ClassWarmRow.course_id == course, ClassWarmRow.start == start
            )
            return [_row(r) for r in s.scalars(q.order_by(ClassWarmRow.user))]

    def active_windows(self) -> list[dict[str, Any]]:
        with self.store.begin() as s:
            q = select(ClassWindowRow).where(ClassWindowRow.state == ACTIVE)
            return [
                {
                    "course": r.course_id,
                    "start": r.start,
                    "end": r.end,
                    "reservation": r.reservation,
                }
                for r in s.scalars(q)
            ]

    def close_window(self, course: str, start: datetime) -> None:
        with self.store.begin() as s:
            r = s.get(ClassWindowRow, (course, start))
            if r is not None:
                r.state, r.updated_at = DONE, utcnow()

    def update(self, course: str, start: datetime, user: str, **values: Any) -> None:
        with self.store.begin() as s:
            r = s.get(ClassWarmRow, (course, start, user))
            if r is None:
                raise KeyError(f"no warm server of {user} in {course}@{start}")
            for k, v in values.items():
                if k not in (
                    "state",
                    "ready_at",
                    "claimed_at",
                    "stopped_at",
                    "record_id",
                    "reason",
                ):
                    raise KeyError(k)
                setattr(r, k, v[:255] if k == "reason" and isinstance(v, str) else v)

    def starting_for(self, user: str) -> dict[str, Any] | None:
        """The warm server of ``user`` being started now (the hub asks, to pick its
        reservation), if any."""
        with self.store.begin() as s:
            q = (
                select(ClassWarmRow, ClassWindowRow.reservation)
                .join(
                    ClassWindowRow,
                    (ClassWindowRow.course_id == ClassWarmRow.course_id)
                    & (ClassWindowRow.start == ClassWarmRow.start),
                )
                .where(ClassWarmRow.user == user, ClassWarmRow.state == STARTING)
                .order_by(ClassWarmRow.requested_at.desc())
                .limit(1)
            )
            got = s.execute(q).first()
            if got is None:
                return None
            return {**_row(got[0]), "reservation": got[1]}


def _row(r: ClassWarmRow) -> dict[str, Any]:
    return {
        "user": r.user,
        "state": r.state,
        "requested_at": r.requested_at,
        "ready_at": r.ready_at,
        "claimed_at": r.claimed_at,
        "stopped_at": r.stopped_at,
        "record_id": r.record_id,
        "reason": r.reason,
    }


__all__ = ["ClassStartStore"]
