"""Usage pages in the hub's own look: "My usage", a course's usage, the operator's view.

JupyterHub page handlers (``c.JupyterHub.extra_handlers``, set by :func:`install`, which
:func:`.portal.configure` calls) rendering templates of this package
(``hub/templates/usage*.html``, on ``c.JupyterHub.template_paths``) that extend
JupyterHub's ``page.html``:

``GET /hub/usage``                 My usage: sessions, totals (GPU-hours, €, Wh, gCO₂, each
                                   marked measured or estimated), each budget's balance, a
                                   plot over time, and "Download my data" (``usage/export``)
``GET /hub/usage/courses/<id>``    one course: per student, for its instructors and operators
``GET /hub/usage/operator``        per partition, site and country, for operators

Who may see what (JupyterHub RBAC, existing scopes, checked with the request's own scopes):

- your own usage: any logged-in user;
- ``/hub/usage?user=NAME``: ``read:users!user=NAME`` (an instructor reaches their students
  through ``read:users!group=course-<id>``; operators through ``admin``);
- a course page: ``read:users!group=course-<id>``, which the ``instructor-<id>`` role
  carries (:mod:`.rbac`), and operators hold unfiltered;
- the operator page: ``read:users`` unfiltered (the ``admin`` role, or a role an operator
  gives a support team).

Without the scope: 403 and a message naming it. An unknown course: 404.

Query parameters are declared per page and parsed strictly (:func:`parse_query`): ``from``
and ``to`` (``YYYY-MM-DD``, UTC days, both included, default: the last 30 days), ``step``
(``day`` or ``month`` buckets of the plot), ``by`` on the operator page (a comma list of
``partition``, ``site``, ``country``) and ``user`` on My usage. An unknown, repeated, empty
or out-of-range parameter is a 400 that names it, and nothing is read.

Every figure comes from :meth:`.ledger_store.LedgerStore.usage` (the ledger's one rule for
totals and grouping, shared with ``sovereign-portal usage`` and the metrics) and
:meth:`~.ledger_store.LedgerStore.rows`; the plot is :func:`.svg_plot.bar_chart`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sovereign_portal.spawners.errors import RequestRefused
from sovereign_portal.spawners.strict import shorten

from .claims import COURSE_GROUP
from .svg_plot import bar_chart

TEMPLATES = Path(__file__).resolve().parent / "templates"

#: The query parameters each page takes.
PAGE_PARAMS: dict[str, tuple[str, ...]] = {
    "my": ("from", "to", "step", "user"),
    "course": ("from", "to", "step"),
    "operator": ("from", "to", "step", "by"),
}
STEPS = ("day", "month")
OPERATOR_GROUPS = ("partition", "site", "country")
DEFAULT_DAYS = 30
MAX_DAYS = 3660  # ten years
MAX_DAY_STEPS = 366  # bars of a day-by-day plot
EARLIEST, LATEST = date(2000, 1, 1), date(2099, 12, 31)
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}\Z")
_COURSE = re.compile(r"[a-z0-9][a-z0-9_-]{0,39}\Z")
_USER = re.compile(r"[A-Za-z0-9@._+-]{1,255}\Z")
SESSION_ROWS = 200


class UsageQueryError(RequestRefused):
    """A bad query parameter of a usage page (HTTP 400); the message names it."""


@dataclass(frozen=True)
class UsageQuery:
    """A usage page's typed query: UTC days ``first``..``last`` (both included)."""

    first: date
    last: date
    step: str
    by: tuple[str, ...] = OPERATOR_GROUPS
    user: str | None = None

    @property
    def since(self) -> float:
        return datetime.combine(self.first, datetime.min.time(), UTC).timestamp()

    @property
    def until(self) -> float:
        return datetime.combine(self.last + timedelta(days=1), datetime.min.time(), UTC).timestamp()

    def args(self) -> dict[str, str]:
        """The query again, as text (links that keep the range)."""
        return {"from": self.first.isoformat(), "to": self.last.isoformat(), "step": self.step}


def _one(args: Mapping[str, Sequence[bytes | str]], name: str) -> str | None:
    values = args.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise UsageQueryError(f"{name}: given {len(values)} times; give it once", field=name)
    raw = values[0]
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError:
        raise UsageQueryError(f"{name}: not UTF-8 text", field=name) from None
    if not text:
        raise UsageQueryError(
            f"{name}: must not be empty (leave it out for the default)", field=name
        )
    if len(text) > 300:
        raise UsageQueryError(f"{name}: longer than 300 characters", field=name)
    return text


def _date(text: str, name: str) -> date:
    if not _DATE.match(text):
        raise UsageQueryError(
            f"{name}: {shorten(text)!r} is not a date; use YYYY-MM-DD, e.g. 2026-11-01", field=name
        )
    try:
        d = date.fromisoformat(text)
    except ValueError:
        raise UsageQueryError(
            f"{name}: {text!r} is not a day of the calendar", field=name
        ) from None
    if not EARLIEST <= d <= LATEST:
        raise UsageQueryError(
            f"{name}: {text} is outside {EARLIEST.isoformat()}..{LATEST.isoformat()}", field=name
        )
    return d


def parse_query(
    args: Mapping[str, Sequence[bytes | str]], page: str, today: date | None = None
) -> UsageQuery:
    """The typed query of ``page`` (a key of :data:`PAGE_PARAMS`) from request arguments."""
    allowed = PAGE_PARAMS[page]
    unknown = sorted(k for k in args if k not in allowed)
    if unknown:
        raise UsageQueryError(
            f"{shorten(unknown[0])}: unknown parameter; this page takes " + ", ".join(allowed),
            field=shorten(unknown[0]),
        )
    today = today or datetime.now(UTC).date()
    to_text, from_text = _one(args, "to"), _one(args, "from")
    last = _date(to_text, "to") if to_text else today
    first = _date(from_text, "from") if from_text else last - timedelta(days=DEFAULT_DAYS - 1)
    if first > last:
        raise UsageQueryError(
            f"from: {first.isoformat()} is after to ({last.isoformat()})", field="from"
        )
    days = (last - first).days + 1
    if days > MAX_DAYS:
        raise UsageQueryError(f"from: the range is {days} days; at most {MAX_DAYS}", field="from")
    step_text = _one(args, "step")
    if step_text is None:
        step = "day" if days <= 92 else "month"
    elif step_text in STEPS:
        step = step_text
    else:
        raise UsageQueryError(
            f"step: {shorten(step_text)!r} is not one of {', '.join(STEPS)}", field="step"
        )
    if step == "day" and days > MAX_DAY_STEPS:
        raise UsageQueryError(
            f"step: day by day covers at most {MAX_DAY_STEPS} days (this range has {days}); "
            "use step=month",
            field="step",
        )
    by: tuple[str, ...] = OPERATOR_GROUPS
    by_text = _one(args, "by")
    if by_text is not None:
        parts = by_text.split(",")
        bad = [p for p in parts if p not in OPERATOR_GROUPS]
        if bad or len(set(parts)) != len(parts):
            raise UsageQueryError(
                f"by: {shorten(by_text)!r}; give a comma list of "
                + ", ".join(OPERATOR_GROUPS)
                + " (each once), e.g. partition,country",
                field="by",
            )
        by = tuple(parts)
    user = _one(args, "user")
    if user is not None and not _USER.match(user):
        raise UsageQueryError(f"user: {shorten(user)!r} is not a user name", field="user")
    return UsageQuery(first=first, last=last, step=step, by=by, user=user)


def buckets(q: UsageQuery) -> list[str]:
    """The plot's bucket labels over the query's range: ``YYYY-MM-DD`` or ``YYYY-MM``,
    in the form :meth:`.ledger_store.LedgerStore.usage` groups ``day`` and ``month`` by."""
    if q.step == "day":
        days = (q.last - q.first).days + 1
        return [(q.first + timedelta(days=i)).isoformat() for i in range(days)]
    out, y, m = [], q.first.year, q.first.month
    while (y, m) <= (q.last.year, q.last.month):
        out.append(f"{y:04d}-{m:02d}")
        y, m = (y + 1, 1) if m == 12 else (y, m + 1)
    return out


def plot(rows: Sequence[Mapping[str, Any]], q: UsageQuery, what: str) -> str:
    """The SVG of GPU-hours per bucket (rows from ``usage(by=(q.step,))``; gaps are 0)."""
    per = {str(r[q.step]): float(r["gpu_hours"]) for r in rows}
    points = [(b, per.get(b, 0.0)) for b in buckets(q)]
    return bar_chart(points, title=f"GPU-hours per {q.step}, {what}", unit="GPU-h")


def basis(estimated: int, records: int) -> str:
    """The mark of a total: ``measured``, ``estimated``, or ``estimated for n of m records``."""
    if estimated <= 0 or records <= 0:
        return "measured"
    if estimated >= records:
        return "estimated"
    return f"estimated for {estimated} of {records} records"


def figures(row: Mapping[str, Any] | None) -> dict[str, Any]:
    """A usage row as the page shows it: the four amounts as text and their marks."""
    r = dict(row or {})
    n = int(r.get("records", 0))
    return {
        "records": n,
        "gpu_hours": f"{float(r.get('gpu_hours', 0.0)):.2f}",
        "eur": f"{float(r.get('eur', 0.0)):.2f}",
        "energy_wh": f"{float(r.get('energy_wh', 0.0)):.1f}",
        "co2_g": f"{float(r.get('co2_g', 0.0)):.1f}",
        "time_basis": basis(int(r.get("estimated_time_records", 0)), n),
        "energy_basis": basis(int(r.get("estimated_energy_records", n)), n),
    }


def session_row(rec: Any) -> dict[str, Any]:
    """One ledger record as a row of the sessions table."""

    def when(t: float | None) -> str:
        return "" if t is None else datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M")

    a = rec.amounts
    return {
        "kind": rec.kind,
        "size": rec.size,
        "partition": rec.partition,
        "country": rec.country,
        "started": when(rec.started_at if rec.started_at is not None else rec.opened_at),
        "ended": when(rec.ended_at),
        "state": rec.end_reason or "running",
        "row_type": rec.row_type,
        "gpu_hours": "" if a is None else f"{a.gpu_hours:.2f}",
        "eur": "" if a is None else f"{a.eur:.2f}",
        "energy_wh": "" if a is None else f"{a.energy_wh:.1f}",
        "co2_g": "" if a is None else f"{a.co2_g:.1f}",
        "time_basis": "" if a is None else a.gpu_seconds_basis,
        "energy_basis": "" if a is None else a.energy_basis,
    }


# -- the hub side --------------------------------------------------------------------------------

_STORES: dict[str, Any] = {}


def _app() -> Any:
    from jupyterhub.app import JupyterHub

    return JupyterHub.instance()


def ledger_store() -> Any:
    """The hub process's ledger store (the one the ledger hooks write)."""
    from .ledger_hub import HUB_LEDGER

    return HUB_LEDGER.ledger(_app())


def budget_store() -> tuple[Any, Any]:
    """(budget store, policy) on the portal database, opened once per process."""
    from .budget_store import BudgetPolicy

    policy = BudgetPolicy(parent=_app())
    if "budgets" not in _STORES:
        _STORES["budgets"] = policy.open(apply=False)
    return _STORES["budgets"], policy


def _handlers() -> list[tuple[str, Any]]:
    from jupyterhub.handlers import BaseHandler
    from tornado import web

    class UsagePage(BaseHandler):
        page = "my"

        def query(self) -> UsageQuery:
            try:
                return parse_query(self.request.query_arguments, self.page)
            except UsageQueryError as e:
                raise web.HTTPError(400, str(e)) from None

        def need(self, scope: str, what: str) -> None:
            if not self.has_scope(scope):
                raise web.HTTPError(
                    403, f"{what} needs the scope {scope}; ask an operator if you should have it"
                )

        async def show(self, template: str, **ns: Any) -> None:
            html = await self.render_template(template, **ns)
            self.finish(html)

    class MyUsageHandler(UsagePage):
        page = "my"

        @web.authenticated
        async def get(self) -> None:
            from .ledger_store import UsageFilter

            q = self.query()
            me = self.current_user
            name = q.user or me.name
            if name != me.name:
                self.need(f"read:users!user={name}", f"the usage of {name}")
            from jupyterhub import orm

            target = orm.User.find(self.db, name)
            if target is None and name != me.name:
                raise web.HTTPError(404, f"no user {name!r} on this hub")
            ledger = ledger_store()
            flt = UsageFilter(user=name, since=q.since, until=q.until)
            total = ledger.usage(flt, by=())
            per = ledger.usage(flt, by=(q.step,))
            rows, n = ledger.rows(flt, include_open=True, limit=SESSION_ROWS)
            groups = [g.name for g in (target.groups if target is not None else [])]
            bs, policy = budget_store()
            balances = [b.to_json(policy.warn_at) for b in bs.balances(name, groups)]
            # the archive of someone else is for operators only (hub/gdpr_pages.py)
            export = (
                "usage/export"
                if name == me.name
                else (f"usage/export?user={quote(name, safe='@')}" if me.admin else None)
            )
            await self.show(
                "usage.html",
                page_title="My usage" if name == me.name else f"Usage of {name}",
                who=name,
                own=name == me.name,
                q=q,
                totals=figures(total[0] if total else None),
                plot_svg=plot(per, q, name),
                sessions=[session_row(r) for r in rows],
                sessions_total=n,
                balances=balances,
                export_url=export,
            )

    class CourseUsageHandler(UsagePage):
        page = "course"

        @web.authenticated
        async def get(self, course: str) -> None:
            from jupyterhub import orm

            from .ledger_store import UsageFilter

            q = self.query()
            group = COURSE_GROUP.format(course)
            if not _COURSE.match(course):
                raise web.HTTPError(404, f"no course {shorten(course)!r}")
            self.need(f"read:users!group={group}", f"the usage of course {course}")
            found = orm.Group.find(self.db, group)
            if found is None:
                raise web.HTTPError(404, f"no course {course!r} on this hub (no group {group})")
            ledger = ledger_store()
            flt = UsageFilter(course=course, since=q.since, until=q.until)
            per_user = {r["user"]: r for r in ledger.usage(flt, by=("user",))}
            names = sorted(set(per_user) | {u.name for u in found.users})
            students = [{"user": u, **figures(per_user.get(u))} for u in names]
            total = ledger.usage(flt, by=())
            await self.show(
                "usage_course.html",
                page_title=f"Usage of course {course}",
                course=course,
                q=q,
                students=students,
                totals=figures(total[0] if total else None),
                plot_svg=plot(ledger.usage(flt, by=(q.step,)), q, f"course {course}"),
            )

    class OperatorUsageHandler(UsagePage):
        page = "operator"

        @web.authenticated
        async def get(self) -> None:
            from .activity_store import reclaimed as reclaimed_totals
            from .ledger_store import UsageFilter

            q = self.query()
            self.need("read:users", "the operator's usage page")
            ledger = ledger_store()
            flt = UsageFilter(since=q.since, until=q.until)
            groups = [{**{k: r[k] for k in q.by}, **figures(r)} for r in ledger.usage(flt, by=q.by)]
            total = ledger.usage(flt, by=())
            open_now: dict[tuple[str, str], int] = {}
            for rec in ledger.list_open():
                key = (rec.partition, rec.country)
                open_now[key] = open_now.get(key, 0) + 1
            await self.show(
                "usage_operator.html",
                page_title="Usage by partition, site and country",
                q=q,
                by=q.by,
                groups=groups,
                totals=figures(total[0] if total else None),
                open_now=sorted(open_now.items()),
                reclaimed=sorted(
                    (k, round(v["gpu_hours"], 3), int(v["stops"]))
                    for k, v in reclaimed_totals(ledger.engine).items()
                ),
                plot_svg=plot(ledger.usage(flt, by=(q.step,)), q, "all users"),
            )

    return [
        (r"/usage", MyUsageHandler),
        (r"/usage/courses/([^/]+)", CourseUsageHandler),
        (r"/usage/operator", OperatorUsageHandler),
    ]


def install(c: Any) -> None:
    """Add the usage pages to JupyterHub's config ``c`` (after handlers already there) and
    this package's templates to its template path."""
    extra = list(c.JupyterHub.get("extra_handlers", []))
    c.JupyterHub.extra_handlers = [*extra, *_handlers()]
    paths = [str(p) for p in c.JupyterHub.get("template_paths", [])]
    if str(TEMPLATES) not in paths:
        c.JupyterHub.template_paths = [*paths, str(TEMPLATES)]
