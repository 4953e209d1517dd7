"""Courses that instructors run themselves: the model, its validation and its rules. Pure.

A :class:`Course` is data an instructor provisions: a title, its instructors and teaching
assistants (TAs), an image from the operator's allow-list, the sizes students may pick,
a budget (a course pool with a per-student allowance: a :class:`.budgets.Budget`, kept and
checked by :mod:`.budget_store`; nothing here re-implements a budget rule), a shared data
folder, start and end dates, and a weekly class schedule.

The roster is the IdP's entitlements (groups ``course-<id>``, :mod:`.claims`) plus the
additions and removals an instructor makes by institutional identifier (the portal user
name, e.g. ``alice@uni-a.example``): :func:`effective_groups` folds them into a user's
groups at login, and the portal service removes a user from the hub group at once.

Everything that reads user input raises :class:`CourseError` (HTTP 400, ``field`` named)
before anything is written: unknown or repeated fields, an end before the start, an
allowance above the pool, sizes or images the site does not have. The store
(:mod:`.course_store`) calls :func:`parse_course` and writes nothing on error.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, time, timedelta
from pathlib import PurePosixPath
from typing import Any

from sovereign_portal.spawners.errors import Forbidden, RequestRefused
from sovereign_portal.spawners.strict import control_character, shorten

from .claims import (
    CANONICAL_USERNAME_RE,
    COURSE_GROUP,
    ID_RE,
    INSTRUCTOR_GROUP,
    ROLES,
    Identity,
)

#: Group of a course's teaching assistants (``tas-<id>``; not a prefix of another group).
TA_GROUP = "tas-{}"
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
UNITS = ("gpu_hours", "eur", "kwh")
MAX_TITLE = 120
MAX_STAFF = 50
MAX_SIZES = 32
MAX_CLASSES = 14
MAX_CLASS_MINUTES = 8 * 60
MAX_RETENTION_DAYS = 10 * 366
DEFAULT_RETENTION_DAYS = 365
#: The most rows one roster file may hold (a lecture hall is a few hundred; 10⁵ is a mistake).
MAX_ROSTER_ROWS = 5000
#: Columns a roster CSV may have; ``identifier`` is required, ``name`` is for people only.
ROSTER_COLUMNS = ("identifier", "name")
BOM_MESSAGE = (
    "the file starts with a byte-order mark (BOM); save it as UTF-8 without a BOM "
    '(some editors add one to "CSV UTF-8")'
)
_TIME_RE = re.compile(r"^([01][0-9]|2[0-3]):([0-5][0-9])$")
_SIZE_RE = re.compile(r"^[a-z0-9][a-z0-9:.+x-]{0,63}$")

#: Fields of a course and which of them an instructor (rather than the creator or an
#: operator) may change.
FIELDS = (
    "id",
    "title",
    "instructors",
    "tas",
    "image",
    "sizes",
    "budget",
    "data_path",
    "start",
    "end",
    "schedule",
    "ta_server_access",
    "retention_days",
    "prewarm",
)
REQUIRED = ("id", "title", "instructors", "start", "end")
#: Ids that are words of the REST API (``api/courses/access``).
RESERVED_IDS = frozenset({"access"})
#: Fields only an operator changes once the course exists (the id never changes).
OPERATOR_FIELDS = frozenset({"id", "retention_days"})
BUDGET_FIELDS = ("period", "unit", "pool", "per_student")
CLASS_FIELDS = ("weekday", "time", "minutes")
#: Fields of a course's class-start settings (``prewarm``; :mod:`.class_start`).
PREWARM_FIELDS = ("minutes", "fraction", "unclaimed_minutes", "size")
#: The largest pre-warm lead and unclaimed-stop delay any site allows (operators narrow
#: them: ``CoursePolicy.max_prewarm_minutes``, ``max_unclaimed_minutes``).
MAX_PREWARM_MINUTES = 240


class CourseError(RequestRefused):
    """Bad course input (HTTP 400 unless ``status`` says otherwise); ``field`` is named."""

    default_reason = "invalid_course"

    def __init__(self, field: str, message: str, status: int | None = None) -> None:
        super().__init__(f"{field}: {message}", field=field, status=status)


class CourseForbidden(Forbidden):
    """A well-formed request the course's rules refuse (HTTP 403), naming the rule."""

    default_reason = "course_rule"


def _short(value: Any, limit: int = 40) -> str:
    return shorten(value if isinstance(value, str) else repr(value), limit)


# -- the model ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClassSlot:
    """One weekly class: weekday, start time (site time zone: UTC) and duration."""

    weekday: str
    time: str  # "HH:MM"
    minutes: int

    def to_json(self) -> dict[str, Any]:
        return {"weekday": self.weekday, "time": self.time, "minutes": self.minutes}


@dataclass(frozen=True)
class CourseBudget:
    """The course pool and the per-student allowance, as :mod:`.budget_store` keeps them
    (owner ``course:<id>``, period ``period``)."""

    period: str
    unit: str
    pool: float
    per_student: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "period": self.period,
            "unit": self.unit,
            "pool": self.pool,
            "per_student": self.per_student,
        }


@dataclass(frozen=True)
class Prewarm:
    """A course's class starts: servers start ``minutes`` before each class for
    ``fraction`` of the roster on ``size`` (the course's first size when None), and those
    nobody claimed stop ``unclaimed_minutes`` into the class."""

    minutes: int
    fraction: float = 1.0
    unclaimed_minutes: int = 15
    size: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "minutes": self.minutes,
            "fraction": self.fraction,
            "unclaimed_minutes": self.unclaimed_minutes,
            "size": self.size,
        }


@dataclass(frozen=True)
class Course:
    id: str
    title: str
    instructors: tuple[str, ...]
    start: date
    end: date
    tas: tuple[str, ...] = ()
    image: str | None = None
    sizes: tuple[str, ...] = ()
    budget: CourseBudget | None = None
    data_path: str | None = None
    schedule: tuple[ClassSlot, ...] = ()
    ta_server_access: bool = False
    retention_days: int = DEFAULT_RETENTION_DAYS
    prewarm: Prewarm | None = None

    @property
    def group(self) -> str:
        return COURSE_GROUP.format(self.id)

    @property
    def instructor_group(self) -> str:
        return INSTRUCTOR_GROUP.format(self.id)

    @property
    def ta_group(self) -> str:
        return TA_GROUP.format(self.id)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "title": self.title,
            "instructors": list(self.instructors),
            "tas": list(self.tas),
            "image": self.image,
            "sizes": list(self.sizes),
            "budget": self.budget.to_json() if self.budget else None,
            "data_path": self.data_path,
            "start": self.start.isoformat(),
            "end": self.end.isoformat(),
            "schedule": [c.to_json() for c in self.schedule],
            "ta_server_access": self.ta_server_access,
            "retention_days": self.retention_days,
            "prewarm": self.prewarm.to_json() if self.prewarm else None,
        }

    def prewarm_size(self) -> str | None:
        """The size pre-warmed servers get: the one named, else the course's first size."""
        if self.prewarm is None:
            return None
        return self.prewarm.size or (self.sizes[0] if self.sizes else None)

    def student_view(self) -> dict[str, Any]:
        """What a student of the course sees (no staff lists, no budget internals)."""
        return {
            "id": self.id,
            "title": self.title,
            "image": self.image,
            "sizes": list(self.sizes),
            "start": self.start.isoformat(),
            "end": self.end.isoformat(),
            "schedule": [c.to_json() for c in self.schedule],
            "ta_server_access": self.ta_server_access,
        }


@dataclass(frozen=True)
class SiteOffer:
    """What the site has, for validation: size ids and image names (None: no allow-list,
    so a course names no image), where course data may live, and whether a course may let
    its staff open students' servers."""

    sizes: frozenset[str]
    images: frozenset[str] | None = None
    data_root: str | None = None
    server_access: bool = True
    max_prewarm_minutes: int = MAX_PREWARM_MINUTES
    max_unclaimed_minutes: int = MAX_CLASS_MINUTES
    max_prewarm_fraction: float = 1.0


# -- validation -----------------------------------------------------------------------------------
def _text(value: Any, name: str, limit: int) -> str:
    if not isinstance(value, str) or not value.strip():
        raise CourseError(name, "must be a non-empty text")
    if len(value) > limit:
        raise CourseError(name, f"at most {limit} characters, got {len(value)}")
    bad = control_character(value)
    if bad is not None:
        raise CourseError(name, f"holds a control character ({bad!a})")
    return value.strip()


def check_user(value: Any, name: str) -> str:
    """An institutional identifier: the portal user name, ``<login>@<home organisation>``."""
    if (
        not isinstance(value, str)
        or not CANONICAL_USERNAME_RE.match(value)
        or "@" not in value
        or value.endswith("@")
    ):
        raise CourseError(
            name,
            f"{_short(value)!r} is not an institutional identifier such as alice@uni-a.example "
            "(lower case, the portal user name)",
        )
    return value


def _users(value: Any, name: str, *, minimum: int = 0) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise CourseError(name, "must be a list of institutional identifiers")
    if len(value) > MAX_STAFF:
        raise CourseError(name, f"at most {MAX_STAFF} people, got {len(value)}")
    out = [check_user(v, f"{name}[{i}]") for i, v in enumerate(value)]
    dupes = sorted({u for u in out if out.count(u) > 1})
    if dupes:
        raise CourseError(name, f"{dupes[0]} is listed twice")
    if len(out) < minimum:
        raise CourseError(name, f"a course needs at least {minimum}")
    return tuple(out)


def _date(value: Any, name: str) -> date:
    if isinstance(value, date) and not isinstance(value, datetime):
        return value
    if not isinstance(value, str) or not re.match(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$", value):
        raise CourseError(name, f"must be an ISO date such as 2027-02-01, got {_short(value)!r}")
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise CourseError(name, f"{value!r} is not a date") from None


def _int(value: Any, name: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise CourseError(name, f"must be a whole number from {lo} to {hi}, got {_short(value)!r}")
    return value


def _only(raw: Any, allowed: Sequence[str], name: str) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise CourseError(name, "must be a JSON object")
    unknown = sorted(str(k) for k in raw if k not in allowed)
    if unknown:
        where = f"{name}.{_short(unknown[0])}" if name != "course" else _short(unknown[0])
        raise CourseError(where, f"unknown field; a {name} has {', '.join(allowed)}", status=None)
    return raw


def _budget(raw: Any, course_id: str, start: date, end: date) -> CourseBudget | None:
    """The course pool, validated by the budgets' own rules (:func:`.budgets.make_budget`:
    units, amounts, an allowance above the pool); their field is named under ``budget.``."""
    if raw is None:
        return None
    from .budgets import BudgetError, Owner, Period, make_budget

    b = _only(raw, BUDGET_FIELDS, "budget")
    for need in ("unit", "pool"):
        if need not in b:
            raise CourseError(f"budget.{need}", "is required")
    period = b.get("period", course_id[:32])
    try:
        span = Period.make(period, _at(start), _at(end))
        made = make_budget(
            Owner("course", course_id), span, b["unit"], b["pool"], b.get("per_student")
        )
    except BudgetError as e:
        name = "pool" if e.field == "amount" else e.field
        raise CourseError(f"budget.{name}", str(e).split(": ", 1)[-1]) from None
    return CourseBudget(made.period.name, made.unit, made.amount, made.per_student)


def _schedule(raw: Any) -> tuple[ClassSlot, ...]:
    if not isinstance(raw, list):
        raise CourseError("schedule", "must be a list of {weekday, time, minutes}")
    if len(raw) > MAX_CLASSES:
        raise CourseError("schedule", f"at most {MAX_CLASSES} classes a week")
    out = []
    for i, item in enumerate(raw):
        name = f"schedule[{i}]"
        c = _only(item, CLASS_FIELDS, name)
        for need in CLASS_FIELDS:
            if need not in c:
                raise CourseError(f"{name}.{need}", "is required")
        if c["weekday"] not in WEEKDAYS:
            raise CourseError(
                f"{name}.weekday", f"one of {', '.join(WEEKDAYS)}, got {_short(c['weekday'])!r}"
            )
        if not isinstance(c["time"], str) or not _TIME_RE.match(c["time"]):
            raise CourseError(f"{name}.time", f"HH:MM (24 h), got {_short(c['time'])!r}")
        minutes = _int(c["minutes"], f"{name}.minutes", 1, MAX_CLASS_MINUTES)
        out.append(ClassSlot(c["weekday"], c["time"], minutes))
    return tuple(out)


def _prewarm(raw: Any, sizes: Sequence[str], offer: SiteOffer) -> Prewarm | None:
    """A course's class-start settings, within the site's bounds (``prewarm.<field>``
    named on error); None: no pre-warm."""
    if raw is None:
        return None
    p = _only(raw, PREWARM_FIELDS, "prewarm")
    if "minutes" not in p:
        raise CourseError("prewarm.minutes", "is required (minutes before a class)")
    minutes = _int(p["minutes"], "prewarm.minutes", 1, offer.max_prewarm_minutes)
    fraction = p.get("fraction", 1.0)
    top = offer.max_prewarm_fraction
    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, int | float)
        or not math.isfinite(fraction)
        or not 0 < fraction <= top
    ):
        raise CourseError(
            "prewarm.fraction",
            f"must be a number above 0 and at most {top:g} (the share of the roster), "
            f"got {_short(fraction)!r}",
        )
    unclaimed = _int(
        p.get("unclaimed_minutes", 15), "prewarm.unclaimed_minutes", 0, offer.max_unclaimed_minutes
    )
    size = p.get("size")
    if size is not None:
        if not isinstance(size, str) or not _SIZE_RE.match(size):
            raise CourseError("prewarm.size", f"{_short(size)!r} is not a size id")
        allowed = sizes or sorted(offer.sizes)
        if size not in allowed:
            raise CourseError(
                "prewarm.size", f"{size} is not one of the course's sizes ({', '.join(allowed)})"
            )
    elif not sizes:
        raise CourseError(
            "prewarm.size", "name the size to pre-warm: the course does not list its sizes"
        )
    return Prewarm(minutes, round(float(fraction), 6), unclaimed, size)


def _data_path(raw: Any, course_id: str, offer: SiteOffer) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, str) or not raw.startswith("/") or len(raw) > 1024:
        raise CourseError("data_path", "must be an absolute path such as /data/courses/ml101")
    if control_character(raw) is not None or "\\" in raw:
        raise CourseError("data_path", "holds a control character or a backslash")
    p = PurePosixPath(raw)
    if ".." in p.parts or str(p) != raw.rstrip("/") or raw == "/":
        raise CourseError("data_path", f"{_short(raw)!r} is not a plain absolute path (no '..')")
    if offer.data_root is not None:
        root = PurePosixPath(offer.data_root)
        if root not in p.parents:
            raise CourseError(
                "data_path", f"must be a folder under the site's course data root {root}"
            )
    return str(p)


def parse_course(raw: Any, offer: SiteOffer) -> Course:
    """A whole course from raw input (REST body, CLI file), or CourseError naming the field."""
    c = _only(raw, FIELDS, "course")
    for need in REQUIRED:
        if need not in c:
            raise CourseError(need, "is required")
    cid = c["id"]
    if not isinstance(cid, str) or not ID_RE.match(cid):
        raise CourseError("id", f"[a-z0-9][a-z0-9-]*, at most 40, got {_short(cid)!r}")
    if cid in RESERVED_IDS:
        raise CourseError("id", f"{cid!r} is a word of the REST API; choose another id")
    start, end = _date(c["start"], "start"), _date(c["end"], "end")
    if end <= start:
        raise CourseError("end", f"must be after the start ({start.isoformat()}), got {end}")
    sizes = c.get("sizes", [])
    if not isinstance(sizes, list) or len(sizes) > MAX_SIZES:
        raise CourseError("sizes", f"must be a list of at most {MAX_SIZES} size ids")
    for i, s in enumerate(sizes):
        if not isinstance(s, str) or not _SIZE_RE.match(s):
            raise CourseError(f"sizes[{i}]", f"{_short(s)!r} is not a size id such as h100:1g.10gb")
        if s not in offer.sizes:
            known = ", ".join(sorted(offer.sizes)[:12])
            raise CourseError(f"sizes[{i}]", f"this site has no size {s!r}; it has {known}")
        if s in sizes[:i]:
            raise CourseError(f"sizes[{i}]", f"{s} is listed twice")
    image = c.get("image")
    if image is not None:
        if not isinstance(image, str):
            raise CourseError("image", "must be an image name from the site's allow-list")
        if offer.images is None or image not in offer.images:
            known = ", ".join(sorted(offer.images or ())) or "none (no image allow-list)"
            raise CourseError("image", f"this site has no image {_short(image)!r}; it has {known}")
    access = c.get("ta_server_access", False)
    if not isinstance(access, bool):
        raise CourseError("ta_server_access", "must be true or false")
    if access and not offer.server_access:
        raise CourseError(
            "ta_server_access",
            "this site does not let course staff open students' servers",
            status=403,
        )
    instructors = _users(c["instructors"], "instructors", minimum=1)
    tas = _users(c.get("tas", []), "tas")
    both = sorted(set(instructors) & set(tas))
    if both:
        raise CourseError("tas", f"{both[0]} is an instructor already")
    return Course(
        id=cid,
        title=_text(c["title"], "title", MAX_TITLE),
        instructors=instructors,
        tas=tas,
        image=image,
        sizes=tuple(sizes),
        budget=_budget(c.get("budget"), cid, start, end),
        data_path=_data_path(c.get("data_path"), cid, offer),
        start=start,
        end=end,
        schedule=_schedule(c.get("schedule", [])),
        ta_server_access=access,
        retention_days=_int(
            c.get("retention_days", DEFAULT_RETENTION_DAYS),
            "retention_days",
            0,
            MAX_RETENTION_DAYS,
        ),
        prewarm=_prewarm(c.get("prewarm"), tuple(sizes), offer),
    )


def apply_changes(
    course: Course, changes: Any, offer: SiteOffer, *, operator: bool = False
) -> Course:
    """``course`` with ``changes`` (a partial object) applied, validated as a whole. Only an
    operator changes :data:`OPERATOR_FIELDS`; the id never changes."""
    ch = _only(changes, FIELDS, "course")
    if "id" in ch and ch["id"] != course.id:
        raise CourseError("id", "a course's id cannot change")
    for name in ch:
        if name in OPERATOR_FIELDS and name != "id" and not operator:
            raise CourseError(name, "only an operator changes this field", status=403)
    merged = {**course.to_json(), **ch}
    return parse_course(merged, offer)


# -- the roster -----------------------------------------------------------------------------------
class RosterError(CourseError):
    """A bad roster file: ``field`` is ``roster``; the message names the row."""

    def __init__(self, row: int | None, message: str, status: int | None = None) -> None:
        where = f"row {row}: " if row is not None else ""
        super().__init__("roster", where + message, status=status)


def parse_roster_csv(data: bytes | str, max_rows: int = MAX_ROSTER_ROWS) -> list[str]:
    """The identifiers of a roster file, or RosterError naming the row.

    The file is UTF-8 CSV with a header row whose columns are ``identifier`` and,
    optionally, ``name`` (for people; ignored). A byte-order mark is refused (it would
    otherwise glue itself to the first column's name, or to an identifier); so are empty
    identifiers, malformed identifiers, rows with the wrong number of columns, an
    identifier listed twice, and more than ``max_rows`` rows.
    """
    if isinstance(data, str):
        text = data
    else:
        if data.startswith(b"\xef\xbb\xbf"):
            raise RosterError(1, BOM_MESSAGE)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            row = data[: e.start].count(b"\n") + 1
            raise RosterError(row, "is not UTF-8 text") from None
    if text.startswith("\ufeff"):
        raise RosterError(1, BOM_MESSAGE)
    if not text.strip():
        raise RosterError(None, "the file is empty; the first row is the header: identifier")
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader)
    except csv.Error as e:
        raise RosterError(1, f"is not CSV ({e})") from None
    cols = [h.strip().lower() for h in header]
    unknown = [h for h in cols if h not in ROSTER_COLUMNS]
    if unknown or "identifier" not in cols or len(set(cols)) != len(cols):
        raise RosterError(
            1,
            f"the header must name the columns identifier[,name], got {_short(','.join(header))!r}",
        )
    at = cols.index("identifier")
    seen: dict[str, int] = {}
    out: list[str] = []
    row = 1
    try:
        for fields in reader:
            row = reader.line_num
            if not fields or (len(fields) == 1 and not fields[0].strip()):
                continue  # a blank line
            if len(seen) >= max_rows:
                raise RosterError(
                    row, f"the roster has more than {max_rows} rows; split it or ask an operator"
                )
            if len(fields) != len(cols):
                raise RosterError(row, f"has {len(fields)} columns, the header has {len(cols)}")
            ident = fields[at].strip()
            try:
                check_user(ident, "identifier")
            except CourseError as e:
                raise RosterError(row, str(e)) from None
            if ident in seen:
                raise RosterError(row, f"{ident} is listed twice (first on row {seen[ident]})")
            seen[ident] = row
            out.append(ident)
    except csv.Error as e:
        raise RosterError(reader.line_num or row, f"is not CSV ({e})") from None
    if not out:
        raise RosterError(None, "the file lists nobody under its header")
    return out


@dataclass(frozen=True)
class Memberships:
    """A user's course memberships kept by the portal (not the IdP's): courses they were
    added to or removed from, and courses where they teach or assist."""

    added: frozenset[str] = frozenset()
    removed: frozenset[str] = frozenset()
    teaching: frozenset[str] = frozenset()
    assisting: frozenset[str] = frozenset()


def effective_groups(idp_groups: Iterable[str], m: Memberships) -> list[str]:
    """The hub groups after a login: the IdP's groups, plus the courses a user was added
    to, minus those they were removed from, plus staff groups of the courses they teach
    (``instructors-<id>``) or assist (``tas-<id>``)."""
    out = set(idp_groups)
    out |= {COURSE_GROUP.format(c) for c in m.added}
    out -= {COURSE_GROUP.format(c) for c in m.removed}
    out |= {INSTRUCTOR_GROUP.format(c) for c in m.teaching}
    out |= {TA_GROUP.format(c) for c in m.assisting}
    return sorted(out)


def apply_memberships(identity: Identity, m: Memberships) -> tuple[Identity, list[str]]:
    """The login identity with the portal's course records folded in, and its groups.

    Courses added by an instructor join the IdP's, removed ones leave (the IdP's too);
    courses taught by the record make the user an instructor of them (the portal role
    becomes at least ``instructor``); TAs get the ``tas-<id>`` groups."""
    teaching = identity.teaching | m.teaching
    role = identity.role
    if teaching and ROLES.index(role) < ROLES.index("instructor"):
        role = "instructor"
    new = replace(
        identity,
        role=role,
        courses=(identity.courses | m.added) - m.removed,
        teaching=teaching,
    )
    return new, effective_groups(new.groups, Memberships(assisting=m.assisting))


def courses_in(groups: Iterable[str]) -> set[str]:
    """Course ids of the ``course-<id>`` groups among ``groups``."""
    prefix = COURSE_GROUP.format("")
    return {g[len(prefix) :] for g in groups if g.startswith(prefix)}


# -- who may do what ------------------------------------------------------------------------------
STAFF_ROLES = ("instructor", "ta")


def course_role(course: Course, user: str, groups: Collection[str], operator: bool) -> str | None:
    """The caller's role in ``course``: operator, instructor, ta, student, or None."""
    if operator:
        return "operator"
    if user in course.instructors or course.instructor_group in groups:
        return "instructor"
    if user in course.tas or course.ta_group in groups:
        return "ta"
    if course.group in groups:
        return "student"
    return None


#: What each course role may do, by action. One table, read by the REST API and the CLI.
PERMISSIONS: dict[str, frozenset[str]] = {
    "read": frozenset({"operator", "instructor", "ta", "student"}),
    "read_staff": frozenset({"operator", "instructor", "ta"}),
    "roster": frozenset({"operator", "instructor"}),
    "edit": frozenset({"operator", "instructor"}),
    "servers": frozenset({"operator", "instructor", "ta"}),
    "open_server": frozenset({"operator", "instructor", "ta"}),
    "end": frozenset({"operator", "instructor"}),
    "class": frozenset({"operator", "instructor", "ta"}),
}


def require(role: str | None, action: str, course_id: str) -> str:
    """``role`` if it may do ``action`` in the course, else CourseForbidden naming the rule."""
    if role in PERMISSIONS[action]:
        assert role is not None
        return role
    who = {
        None: "you are not in",
        "student": "a student cannot do this in",
        "ta": "a teaching assistant cannot do this in",
    }.get(role, "you cannot do this in")
    needed = ", ".join(sorted(PERMISSIONS[action] - {"operator"})) or "operator"
    raise CourseForbidden(
        f"course {course_id}: {who} this course ({action} needs: {needed})",
        field="course",
    )


# -- the spawn rule: the course's image and sizes -------------------------------------------------
def check_spawn(course: Course, size_id: str, image: str | None) -> None:
    """The one rule of a course server: a size the course allows (all, when it names none)
    and the course's image. CourseForbidden (403) names the course and the rule."""
    if course.sizes and size_id not in course.sizes:
        raise CourseForbidden(
            f"course {course.id} allows the sizes {', '.join(course.sizes)}; "
            f"you asked for {size_id}",
            field="size",
        )
    if course.image is not None and image is not None and image != course.image:
        raise CourseForbidden(
            f"course {course.id} runs the image {course.image}; you asked for {image}",
            field="image",
        )


def pick_course(courses: Sequence[Course], chosen: Any) -> Course | None:
    """The course a spawn is for: the one chosen, the only one, or None (no course).
    A student of two or more courses must choose (CourseError, field ``course``)."""
    if chosen is not None:
        match = [c for c in courses if c.id == chosen]
        if not match:
            names = ", ".join(c.id for c in courses) or "none"
            raise CourseForbidden(
                f"course {_short(chosen)!r} is not one of yours ({names})", field="course"
            )
        return match[0]
    if len(courses) == 1:
        return courses[0]
    if len(courses) > 1:
        raise CourseError(
            "course", f"choose the course first: one of {', '.join(c.id for c in courses)}"
        )
    return None


# -- the end of a course --------------------------------------------------------------------------
def _at(d: date) -> datetime:
    return datetime.combine(d, time(0, 0), tzinfo=UTC)


def phase(course: Course, now: datetime) -> str:
    """``upcoming`` before the start date, ``running`` until the end date, ``ended`` from
    the end date (data read-only, students' course servers stopped), ``purge`` from the end
    date plus the retention period (the data is deleted)."""
    if now < _at(course.start):
        return "upcoming"
    if now < _at(course.end):
        return "running"
    if now < _at(course.end) + timedelta(days=course.retention_days):
        return "ended"
    return "purge"


def purge_at(course: Course) -> datetime:
    return _at(course.end) + timedelta(days=course.retention_days)


def without_staff(course: Course, user: str) -> Course:
    """``course`` with ``user`` no longer a TA (instructors are changed by edit)."""
    return replace(course, tas=tuple(t for t in course.tas if t != user))


@dataclass(frozen=True)
class Limits:
    """What an operator allows a course creator (``CoursePolicy``)."""

    max_courses: int = 10
    max_pool: Mapping[str, float] = field(default_factory=dict)
    max_days: int = 366

    def check(self, course: Course, owned: int) -> None:
        """CourseError (403) when a creator's new course is over the operator's limits."""
        if owned >= self.max_courses:
            raise CourseError(
                "id", f"you may run at most {self.max_courses} courses at once", status=403
            )
        if (course.end - course.start).days > self.max_days:
            raise CourseError(
                "end", f"a course lasts at most {self.max_days} days on this site", status=403
            )
        b = course.budget
        if b is not None and b.unit in self.max_pool and b.pool > self.max_pool[b.unit]:
            raise CourseError(
                "budget.pool",
                f"{b.pool:g} is above the site's limit for a course pool, "
                f"{self.max_pool[b.unit]:g} {b.unit}",
                status=403,
            )


__all__ = [
    "DEFAULT_RETENTION_DAYS",
    "FIELDS",
    "MAX_ROSTER_ROWS",
    "PERMISSIONS",
    "PREWARM_FIELDS",
    "TA_GROUP",
    "ClassSlot",
    "Course",
    "CourseBudget",
    "CourseError",
    "CourseForbidden",
    "Limits",
    "Memberships",
    "Prewarm",
    "RosterError",
    "SiteOffer",
    "apply_changes",
    "apply_memberships",
    "check_spawn",
    "check_user",
    "course_role",
    "courses_in",
    "effective_groups",
    "parse_course",
    "parse_roster_csv",
    "phase",
    "pick_course",
    "purge_at",
    "require",
]
