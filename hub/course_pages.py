"""The instructor's pages (issue 12): courses run by their staff, in the hub's own look.

JupyterHub page handlers (``c.JupyterHub.extra_handlers``, set by :func:`install`, which
:func:`.portal.configure` calls) rendering templates of this package
(``hub/templates/course*.html``, extending JupyterHub's ``page.html``):

``GET  /hub/courses``                  the caller's courses and their role in each
``GET  /hub/courses/<id>``             a course: title, dates, image, sizes, allowance,
                                       pool, schedule and the roster
``POST /hub/courses/<id>``             one change: ``action`` = ``edit`` (the settings
                                       form), ``add`` (one student), ``remove`` (one
                                       student) or ``upload`` (a roster CSV file)
``GET  /hub/courses/<id>/class``       the class view: who is in, who waits and why
                                       (their place in line), and "Pre-warm now"
``POST /hub/courses/<id>/class``       pre-warm now (optionally a fraction of the roster)

No rule is written twice: each page reads and changes the course through the portal
service's course REST API (:mod:`.course_api`; the class view through the class routes,
``api/courses/<id>/class`` and ``.../prewarm``), called from the hub with a short-lived
token of the caller's own, scoped to the service alone. Who may see or change what is
therefore the API's course RBAC (:data:`.courses.PERMISSIONS`): instructors and
operators edit, teaching assistants see, students and other courses' staff get the
API's 403, shown as the page's. A refused change shows the API's message, which names
the field, and changes nothing.

The form holds text as a person types it; :func:`form_changes` turns it into the JSON
the API takes (numbers where the text is one, the rest as typed, so the API's own
validation names the field) and sends only what differs from the course.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sovereign_portal.spawners import start_queue

TEMPLATES = Path(__file__).resolve().parent / "templates"

_COURSE = re.compile(r"[a-z0-9][a-z0-9-]{0,39}\Z")
#: The fields of the settings form, as the API names them.
EDIT_FIELDS = ("title", "start", "end", "image", "sizes", "schedule", "per_student", "pool")
#: The actions of ``POST /hub/courses/<id>``.
ACTIONS = ("edit", "add", "remove", "upload")
#: Class view: the student states (the class API's words) in the order the page groups them.
IN_STATES = ("claimed", "warm")
WAITING_STATES = ("starting", "queued")
OUT_STATES = ("absent", "stopped")
TOKEN_SECONDS = 3600
TOKEN_RENEW_SECONDS = 600


class FormError(ValueError):
    """A form the page cannot even turn into a request (HTTP 400, names the field)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


# -- pure: the form to the API's JSON, and back ---------------------------------------------
def _text(form: Mapping[str, Sequence[str]], name: str) -> str | None:
    values = form.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise FormError(name, f"given {len(values)} times; give it once")
    return values[0].strip()


def _number(text: str) -> Any:
    """A number where the text is one (the API checks its range); the text otherwise, for
    the API to refuse by name."""
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if value.is_integer() and "." not in text else value


def schedule_text(schedule: Sequence[Mapping[str, Any]]) -> str:
    """A course's schedule as the form shows it: ``tue 09:15 90`` per line."""
    return "\n".join(f"{s['weekday']} {s['time']} {s['minutes']}" for s in schedule)


def parse_schedule(text: str) -> list[dict[str, Any]]:
    """The form's schedule lines (``weekday time minutes``) as the API's list of slots."""
    out: list[dict[str, Any]] = []
    for n, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 3:
            raise FormError(
                "schedule",
                f"line {n}: {line.strip()[:60]!r}; write weekday, time and minutes, "
                "e.g. tue 09:15 90",
            )
        out.append({"weekday": parts[0], "time": parts[1], "minutes": _number(parts[2])})
    return out


def form_changes(form: Mapping[str, Sequence[str]], current: Mapping[str, Any]) -> dict[str, Any]:
    """The PATCH body for a settings form: the fields that differ from ``current`` (the
    API's course JSON). Empty image means none; sizes are a comma or space list."""
    unknown = sorted(set(form) - {*EDIT_FIELDS, "action", "_xsrf"})
    if unknown:
        raise FormError(unknown[0], "not a field of this form")
    want: dict[str, Any] = {}
    for name in ("title", "start", "end"):
        v = _text(form, name)
        if v is not None:
            want[name] = v
    image = _text(form, "image")
    if image is not None:
        want["image"] = image or None
    sizes = _text(form, "sizes")
    if sizes is not None:
        want["sizes"] = [s for s in re.split(r"[,\s]+", sizes) if s]
    sched = _text(form, "schedule")
    if sched is not None:
        want["schedule"] = parse_schedule(sched)
    per, pool = _text(form, "per_student"), _text(form, "pool")
    if per is not None or pool is not None:
        budget = dict(current.get("budget") or {})
        if pool is not None:
            if not pool:
                raise FormError("pool", "give the course pool (a number)")
            budget["pool"] = _number(pool)
        if per is not None:
            budget["per_student"] = _number(per) if per else None
        want["budget"] = {k: v for k, v in budget.items() if v is not None or k == "per_student"}
    changes = {}
    for k, v in want.items():
        if k == "budget":
            if (current.get("budget") or {}) != v:
                changes[k] = v
        elif current.get(k) != v:
            changes[k] = v
    return changes


def api_error(status: int, body: bytes) -> tuple[str, str | None]:
    """The message and field of an API error answer (``{"error", "field"}``)."""
    try:
        got = json.loads(body)
    except ValueError:
        got = None
    if isinstance(got, dict) and isinstance(got.get("error"), str):
        field = got.get("field")
        return got["error"], field if isinstance(field, str) else None
    return f"the portal service answered HTTP {status}; try again or ask the operators", None


def class_groups(
    view: Mapping[str, Any], places: Mapping[str, int] | None = None
) -> dict[str, list[dict[str, Any]]]:
    """The class API's students, grouped as the class view shows them: ``in`` (claimed
    or warm), ``waiting`` (starting or queued, by place in line) and ``out``.

    ``places``: who waits in the hub's start queue, and where (:func:`.start_queue.places`;
    the queue lives in the hub process, so the portal service's API cannot say): a student
    in line is "queued" at that place."""
    students = [dict(s) for s in view.get("students") or []]
    for s in students:
        place = (places or {}).get(s.get("user", ""))
        if place is not None and s.get("state") not in IN_STATES:
            s["state"], s["position"] = "queued", place
    waiting = [s for s in students if s.get("state") in WAITING_STATES]
    waiting.sort(key=lambda s: (s.get("position") is None, s.get("position") or 0, s["user"]))
    return {
        "in": sorted(
            (s for s in students if s.get("state") in IN_STATES),
            key=lambda s: (IN_STATES.index(s["state"]), s["user"]),
        ),
        "waiting": waiting,
        "out": sorted(
            (s for s in students if s.get("state") not in (*IN_STATES, *WAITING_STATES)),
            key=lambda s: s["user"],
        ),
    }


def _student(form: Mapping[str, Sequence[str]]) -> str:
    """The ``user`` of an add or remove form: a student's institutional identifier."""
    who = (form.get("user") or [""])[0].strip()
    if not who:
        raise FormError("user", "give the student's institutional identifier")
    return who


def parse_fraction(form: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """The pre-warm body: ``{}`` (the course's own fraction) or ``{"fraction": x}``."""
    unknown = sorted(set(form) - {"fraction", "_xsrf"})
    if unknown:
        raise FormError(unknown[0], "not a field of this form")
    text = _text(form, "fraction")
    if not text:
        return {}
    return {"fraction": _number(text)}


# -- the hub side --------------------------------------------------------------------------------
_TOKENS: dict[str, tuple[str, float]] = {}


def _service() -> str:
    from .service import SERVICE_NAME

    return SERVICE_NAME


def _handlers() -> list[tuple[str, Any]]:
    from jupyterhub.handlers import BaseHandler
    from tornado import httpclient, web

    class CoursePage(BaseHandler):
        def user_token(self) -> str:
            """A token of the caller's own that reaches only the portal service, kept
            in this process for an hour (renewed ten minutes before it expires)."""
            me = self.current_user
            hit = _TOKENS.get(me.name)
            now = time.time()
            if hit is not None and hit[1] - now > TOKEN_RENEW_SECONDS:
                return hit[0]
            token = me.new_api_token(
                note="course pages (hub/course_pages.py)",
                expires_in=TOKEN_SECONDS,
                scopes=[f"access:services!service={_service()}"],
            )
            _TOKENS[me.name] = (token, now + TOKEN_SECONDS)
            return str(token)

        async def api(
            self, method: str, path: str, body: Any = None, content_type: str = "application/json"
        ) -> tuple[int, Any, bytes]:
            """Call the portal service's course API as the caller: (status, JSON, raw)."""
            svc = self.services.get(_service())
            if svc is None or not svc.url:
                raise web.HTTPError(503, "the portal service is not configured on this hub")
            if body is not None and not isinstance(body, bytes):
                body = json.dumps(body).encode()
            url = f"{svc.url.rstrip('/')}{svc.prefix.rstrip('/')}/api/courses{path}"
            try:
                resp = await httpclient.AsyncHTTPClient().fetch(
                    url,
                    method=method,
                    headers={
                        "Authorization": f"token {self.user_token()}",
                        "Content-Type": content_type,
                    },
                    body=body,
                    allow_nonstandard_methods=True,
                    raise_error=False,
                    request_timeout=60,
                )
            except OSError as e:
                self.log.error("Portal service unreachable for %s: %s", path, e)
                raise web.HTTPError(
                    503, "the portal service does not answer; try again in a minute"
                ) from None
            if resp.code == 599:
                raise web.HTTPError(503, "the portal service does not answer; try again")
            data: Any = None
            if resp.body and resp.code < 300:
                try:
                    data = json.loads(resp.body)
                except ValueError:
                    data = None
            return resp.code, data, resp.body or b""

        def refuse(self, status: int, raw: bytes) -> None:
            """A page-level refusal with the API's own words (403, 404, 5xx)."""
            message, _ = api_error(status, raw)
            raise web.HTTPError(status if status < 600 else 503, "%s", message)

        async def read(self, path: str) -> Any:
            """``GET`` the course API's ``path`` as the caller: its JSON, or the page's
            refusal in the API's words."""
            status, data, raw = await self.api("GET", path)
            if status != 200:
                self.refuse(status, raw)
            return data

        def course_id(self, course: str) -> str:
            if not _COURSE.match(course):
                raise web.HTTPError(404, "no course %r", course[:60])
            return course

        def posted(self, course: str) -> tuple[str, dict[str, list[str]]]:
            """A POST's course id (404 unless it is one) and its form fields, decoded."""
            course = self.course_id(course)
            return course, {
                k: [v.decode("utf-8", "replace") for v in vs]
                for k, vs in self.request.body_arguments.items()
            }

        async def show(self, template: str, status: int = 200, **ns: Any) -> None:
            self.set_status(status)
            html = await self.render_template(template, **ns)
            self.finish(html)

    class CoursesHandler(CoursePage):
        @web.authenticated
        async def get(self) -> None:
            data = await self.read("")
            courses = sorted(data.get("courses", []), key=lambda c: c["id"])
            await self.show("courses.html", page_title="My courses", courses=courses)

    class OneCoursePage(CoursePage):
        """A page of one course, ``/hub/courses/<id>...``: ``GET`` shows it."""

        async def page(self, course: str) -> None:
            raise NotImplementedError

        @web.authenticated
        async def get(self, course: str) -> None:
            await self.page(self.course_id(course))

    class CourseHandler(OneCoursePage):
        async def load(self, course: str) -> tuple[dict[str, Any], dict[str, Any]]:
            data = await self.read(f"/{course}")
            if data.get("role") == "student":
                raise web.HTTPError(
                    403,
                    "course %s: this page is for its instructors and teaching assistants; "
                    "your course is on the spawn form",
                    course,
                )
            roster = await self.read(f"/{course}/roster")
            return data, roster

        async def page(
            self,
            course: str,
            status: int = 200,
            error: str | None = None,
            field: str | None = None,
            done: str | None = None,
            form: Mapping[str, str] | None = None,
        ) -> None:
            data, roster = await self.load(course)
            await self.show(
                "course.html",
                status=status,
                page_title=f"Course {data['id']}: {data['title']}",
                course=data,
                can_edit=data.get("role") in ("instructor", "operator"),
                roster=roster,
                schedule=schedule_text(data.get("schedule") or []),
                error=error,
                error_field=field,
                done=done,
                form=dict(form or {}),
            )

        @web.authenticated
        async def post(self, course: str) -> None:
            course, form = self.posted(course)
            action = (form.get("action") or [""])[0]
            if action not in ACTIONS:
                raise web.HTTPError(400, "action: one of %s", ", ".join(ACTIONS))
            typed = {k: v[0] for k, v in form.items() if v and k != "_xsrf"}
            try:
                if action == "edit":
                    current = await self.read(f"/{course}")
                    changes = form_changes(form, current)
                    if not changes:
                        await self.page(course, done="Nothing changed.")
                        return
                    status, _, raw = await self.api("PATCH", f"/{course}", changes)
                    done = "Saved: " + ", ".join(sorted(changes)) + "."
                elif action == "add":
                    who = _student(form)
                    status, _, raw = await self.api("POST", f"/{course}/roster", {"add": [who]})
                    done = f"Added {who}."
                elif action == "remove":
                    who = _student(form)
                    status, _, raw = await self.api(
                        "DELETE", f"/{course}/roster/{quote(who, safe='@')}"
                    )
                    done = f"Removed {who}: their access and course server ended now."
                else:
                    files = self.request.files.get("roster") or []
                    if len(files) != 1 or not files[0].body:
                        raise FormError("roster", "choose one CSV file to upload")
                    status, got, raw = await self.api(
                        "POST", f"/{course}/roster", files[0].body, content_type="text/csv"
                    )
                    if status == 200 and isinstance(got, dict):
                        done = (
                            f"Roster file: {len(got.get('added', []))} added "
                            f"({len(got.get('at_first_login', []))} at their first login)."
                        )
                    else:
                        done = ""
            except FormError as e:
                await self.page(course, 400, str(e), e.field, form=typed)
                return
            if status >= 300:
                if status in (401, 403, 404) or status >= 500:
                    self.refuse(status, raw)
                message, field = api_error(status, raw)
                await self.page(course, status, message, field, form=typed)
                return
            await self.page(course, done=done)

    class ClassHandler(OneCoursePage):
        async def page(
            self, course: str, status: int = 200, error: str | None = None, done: str = ""
        ) -> None:
            info = await self.read(f"/{course}")
            if info.get("role") == "student":
                raise web.HTTPError(
                    403, "course %s: the class view is for its instructors and TAs", course
                )
            code, view, raw = await self.api("GET", f"/{course}/class")
            if code != 200:
                if code == 404 and not raw.lstrip().startswith(b"{"):
                    raise web.HTTPError(
                        501, "class starts are not available on this hub's portal service"
                    )
                self.refuse(code, raw)
            await self.show(
                "course_class.html",
                status=status,
                page_title=f"Class view: {info['title']}",
                course=info,
                view=view,
                groups=class_groups(view, start_queue.places()),
                can_prewarm=info.get("role") in ("instructor", "ta", "operator"),
                error=error,
                done=done,
            )

        @web.authenticated
        async def post(self, course: str) -> None:
            course, form = self.posted(course)
            try:
                body = parse_fraction(form)
            except FormError as e:
                await self.page(course, 400, str(e))
                return
            status, _, raw = await self.api("POST", f"/{course}/prewarm", body)
            if status >= 300:
                if status in (401, 404) or status >= 500:
                    self.refuse(status, raw)
                message, _ = api_error(status, raw)
                await self.page(course, status, message)
                return
            await self.page(course, done="Pre-warm started.")

    return [
        (r"/courses", CoursesHandler),
        (r"/courses/([^/]+)", CourseHandler),
        (r"/courses/([^/]+)/class", ClassHandler),
    ]


def install(c: Any) -> None:
    """Add the course pages to JupyterHub's config ``c`` (after the handlers already
    there) and this package's templates to its template path."""
    extra = list(c.JupyterHub.get("extra_handlers", []))
    c.JupyterHub.extra_handlers = [*extra, *_handlers()]
    paths = [str(p) for p in c.JupyterHub.get("template_paths", [])]
    if str(TEMPLATES) not in paths:
        c.JupyterHub.template_paths = [*paths, str(TEMPLATES)]


__all__ = ["class_groups", "form_changes", "install", "parse_fraction", "parse_schedule"]
