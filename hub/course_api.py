"""Courses over REST, on the portal service (mounted by :meth:`.service.PortalService.make_app`).

Every route takes the caller's own hub token (as the rest of the service) and answers JSON;
who may do what is :data:`.courses.PERMISSIONS`, read through :func:`.courses.require`:

``GET    {prefix}api/courses``                    the caller's courses, with their role in each
``POST   {prefix}api/courses``                    create (operators, ``CoursePolicy.creators``)
``GET    {prefix}api/courses/<id>``               a course (students: their view and allowance)
``PATCH  {prefix}api/courses/<id>``               change fields (instructors, operators)
``GET    {prefix}api/courses/<id>/roster``        the portal's roster changes and the members
``POST   {prefix}api/courses/<id>/roster``        add/remove: JSON ``{"add": [...], "remove":
                                                  [...]}`` or a CSV file (``text/csv``) to add
``DELETE {prefix}api/courses/<id>/roster/<user>`` remove one student, at once
``POST   {prefix}api/courses/<id>/servers/<user>/access``  open a student's server (when the
                                                  course allows it): recorded, then shared
``GET    {prefix}api/courses/access``             who opened the caller's server, and when
``POST   {prefix}api/courses/<id>/end``           end the course now (as its end date does)

A removal takes effect at once: the student leaves the hub group ``course-<id>`` through the
hub's REST API (their course image, sizes and budget go with it, and the staff's group-
filtered scopes no longer reach them), their running course server stops, and the hub sets
the course data folder's ACL without them (:func:`sync_data_access`); an addition
is applied to a user the hub knows at once, else at their first login
(:func:`.courses.effective_groups`). Bad input is a 4xx naming the field (a roster file: the
row), and nothing changes.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

from sovereign_portal.spawners.errors import TooLarge, Unavailable
from sovereign_portal.spawners.strict import MAX_JSON_BYTES, loads_json
from tornado import httpclient, web
from tornado.ioloop import IOLoop, PeriodicCallback

from .course_store import ENDED, PURGED, CoursePolicy, CourseStore, delete_data, make_read_only
from .courses import (
    Course,
    CourseError,
    CourseForbidden,
    check_user,
    course_role,
    parse_roster_csv,
    require,
)
from .service import PortalService, _Base

#: The largest roster file read (10⁵ lines of identifiers fit; the row limit refuses them).
MAX_ROSTER_BYTES = 8 * 1024 * 1024
COURSE_ID = r"([a-z0-9][a-z0-9-]{0,39})"
USER = r"([^/]{1,255})"


# -- the hub's REST API, with the service's own token ----------------------------------------
async def hub_api(portal: PortalService, method: str, path: str, body: Any = None) -> Any:
    """Call the hub's REST API as the service; None for 404, the JSON answer otherwise."""
    from jupyterhub.services.auth import HubAuth

    hub_auth: HubAuth = getattr(portal, "_hub_auth", None) or HubAuth()
    portal._hub_auth = hub_auth
    resp = await httpclient.AsyncHTTPClient().fetch(
        f"{hub_auth.api_url}{path}",
        method=method,
        headers={"Authorization": f"token {hub_auth.api_token}"},
        body=None if body is None else json.dumps(body),
        allow_nonstandard_methods=True,
        raise_error=False,
    )
    if resp.code == 404:
        return None
    if resp.code >= 400 and not (resp.code == 409 and method == "POST"):
        raise Unavailable(
            "the hub refused a course change; try again or ask the operators",
            log_message=f"hub API {method} {path}: HTTP {resp.code} {resp.body[:200]!r}",
        )
    return json.loads(resp.body) if resp.body else {}


async def group_members(portal: PortalService, group: str) -> list[str]:
    got = await hub_api(portal, "GET", f"/groups/{quote(group, safe='')}")
    return sorted(got.get("users", [])) if got else []


async def apply_roster(
    portal: PortalService, course: Course, added: list[str], removed: list[str]
) -> dict[str, Any]:
    """Bring the hub group in line with a roster change, at once. Returns who was added
    now (users the hub knows; others get the group at their first login)."""
    g = quote(course.group, safe="")
    known = []
    if await hub_api(portal, "GET", f"/groups/{g}") is not None:
        # a group no one has logged in to yet: everyone gets it at their first login
        for u in added:
            if await hub_api(portal, "GET", f"/users/{quote(u, safe='')}") is not None:
                known.append(u)
        if known:
            await hub_api(portal, "POST", f"/groups/{g}/users", {"users": known})
        if removed:
            await hub_api(portal, "DELETE", f"/groups/{g}/users", {"users": removed})
    # a removed student's running course server stops too: the course is no longer theirs
    stopped = await stop_course_servers(portal, course, removed) if removed else []
    # and the data folder's ACL follows the group now, not at the next course spawn
    data = await sync_data_access(portal, course) if added or removed else None
    return {
        "added_now": known,
        "at_first_login": sorted(set(added) - set(known)),
        "stopped": stopped,
        "data_access": data,
    }


async def sync_data_access(portal: PortalService, course: Course) -> int | None:
    """Have the hub set the course data folder's ACL from the course's staff and group
    now (its ``data-access`` route, :mod:`.class_start_hub`: the code path of every
    course spawn). Returns the entries written; None when the course has no folder, or
    the hub could not (logged: the next course spawn sets it)."""
    if not course.data_path:
        return None
    try:
        got = await hub_api(
            portal, "POST", f"/sovereign-portal/courses/{course.id}/data-access", {}
        )
    except Unavailable as e:
        portal.log.warning("Course %s: the data folder's ACL was not set: %s", course.id, e)
        return None
    if got is None:
        portal.log.warning("Course %s: this hub has no data-access route", course.id)
        return None
    return int(got.get("entries", 0))


# -- handlers ----------------------------------------------------------------------------------
class _CourseBase(_Base):
    @property
    def courses(self) -> CourseStore:
        p = self.portal
        store: CourseStore | None = getattr(p, "_course_store", None)
        if store is None:
            store = CourseStore(p.budgets.store)
            setattr(p, "_course_store", store)  # noqa: B010 (one store per service)
        return store

    @property
    def policy(self) -> CoursePolicy:
        return CoursePolicy(parent=self.portal)

    def role_in(self, course: Course) -> str | None:
        c = self.caller
        assert c is not None
        role = course_role(course, c.name, c.groups, c.role == "operator")
        if role == "student" and c.name in self.courses.roster(course.id)["removed"]:
            return None  # removed: at once, even while the service still caches their groups
        return role

    def course_for(self, course_id: str, action: str) -> tuple[Course, str]:
        """The course and the caller's role in it, or 403/404; ``action`` must be allowed."""
        try:
            course = self.courses.get(course_id)
        except CourseError:
            if self.caller is not None and self.caller.role == "operator":
                raise
            # Another course than yours answers as forbidden, whether or not it exists.
            raise CourseForbidden(
                f"course {course_id}: you are not in this course", field="course"
            ) from None
        return course, require(self.role_in(course), action, course_id)

    def view(self, course: Course, role: str) -> dict[str, Any]:
        if role == "student":
            out = course.student_view()
            out["allowance"] = self.allowance(course)
        else:
            out = course.to_json()
            out["state"] = self.courses.state(course.id)
        out["role"] = role
        return out

    def allowance(self, course: Course) -> dict[str, Any] | None:
        """What is left of the course pool for the caller (their allowance where set)."""
        if course.budget is None or self.caller is None:
            return None
        try:
            bal = self.portal.budgets.balance(
                f"course:{course.id}", course.budget.period, user=self.caller.name
            )
        except Exception:
            return None
        return bal.to_json(self.portal.budget_policy.warn_at)


@web.stream_request_body
class _CourseBody(_CourseBase):
    """A course route with a body: JSON (64 KiB) or, for a roster, CSV (8 MiB). The body is
    read to its end before any answer (an answer mid-upload reaches the client as a reset)."""

    limit = MAX_JSON_BYTES

    async def prepare(self) -> None:
        self._chunks: list[bytes] = []
        self._size = 0

    def data_received(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._size <= self.limit:
            self._chunks.append(chunk)
        else:
            self._chunks = []

    async def body(self) -> tuple[str, bytes]:
        await self.authenticate()
        if self._size > self.limit:
            raise TooLarge(
                f"the body is over {self.limit} bytes", log_message=f"{self._size} bytes"
            )
        kind = self.request.headers.get("Content-Type", "application/json").split(";")[0]
        return kind.strip().lower(), b"".join(self._chunks)

    async def json(self) -> Any:
        kind, data = await self.body()
        if kind not in ("application/json", ""):
            raise CourseError("body", f"send JSON (Content-Type: application/json), not {kind}")
        return loads_json(data, limit=MAX_JSON_BYTES, empty={})


class CoursesHandler(_CourseBody):
    async def get(self) -> None:
        await self.authenticate()
        got = [(course, self.role_in(course)) for course in self.courses.all()]
        self.finish({"courses": [self.view(course, role) for course, role in got if role]})

    async def post(self) -> None:
        raw = await self.json()
        c = self.caller
        assert c is not None
        operator = c.role == "operator"
        policy = self.policy
        if not policy.may_create(c.name, c.groups, operator):
            raise CourseForbidden(
                "only operators and the course creators they name (CoursePolicy.creators) "
                "may create a course",
                field="course",
            )
        offer = policy.offer(self.portal.site)
        course = self.courses.create(
            raw, offer, c.name, limits=None if operator else policy.limits()
        )
        self.portal.log.info("Course %s created by %s", course.id, c.name)
        self.set_status(201)
        self.finish(self.view(course, course_role(course, c.name, c.groups, operator) or "creator"))


class CourseHandler(_CourseBody):
    async def get(self, course_id: str) -> None:
        await self.authenticate()
        course, role = self.course_for(course_id, "read")
        self.finish(self.view(course, role))

    async def patch(self, course_id: str) -> None:
        raw = await self.json()
        _, role = self.course_for(course_id, "edit")
        assert self.caller is not None
        new = self.courses.update(
            course_id,
            raw,
            self.policy.offer(self.portal.site),
            self.caller.name,
            operator=role == "operator",
        )
        self.portal.log.info(
            "Course %s changed by %s: %s", course_id, self.caller.name, sorted(raw)
        )
        if isinstance(raw, dict) and {"instructors", "tas"} & set(raw):
            await sync_data_access(self.portal, new)  # new staff: the folder's ACL now
        self.finish(self.view(new, role))


class RosterHandler(_CourseBody):
    limit = MAX_ROSTER_BYTES

    async def get(self, course_id: str) -> None:
        await self.authenticate()
        course, _ = self.course_for(course_id, "read_staff")
        changes = self.courses.roster(course_id)
        self.finish({**changes, "members": await group_members(self.portal, course.group)})

    async def post(self, course_id: str) -> None:
        kind, data = await self.body()
        course, _ = self.course_for(course_id, "roster")
        assert self.caller is not None
        if kind in ("text/csv", "application/csv"):
            add, remove = parse_roster_csv(data), []
        else:
            raw = loads_json(data, limit=self.limit, empty=None)
            if not isinstance(raw, dict) or not raw or set(raw) - {"add", "remove"}:
                raise CourseError(
                    "body", 'send {"add": [identifiers], "remove": [identifiers]} or a CSV file'
                )
            add, remove = raw.get("add", []), raw.get("remove", [])
            for name, value in (("add", add), ("remove", remove)):
                if not isinstance(value, list):
                    raise CourseError(name, "must be a list of institutional identifiers")
        done = self.courses.change_roster(course_id, add, remove, self.caller.name)
        now = await apply_roster(self.portal, course, done["added"], done["removed"])
        self.portal.log.info(
            "Roster of %s: %d added, %d removed by %s",
            course_id,
            len(done["added"]),
            len(done["removed"]),
            self.caller.name,
        )
        self.finish({**done, **now})


class RosterMemberHandler(_CourseBase):
    async def delete(self, course_id: str, user: str) -> None:
        course, _ = self.course_for(course_id, "roster")
        assert self.caller is not None
        check_user(user, "user")
        done = self.courses.change_roster(course_id, remove=[user], actor=self.caller.name)
        await apply_roster(self.portal, course, [], done["removed"])
        self.portal.log.info("%s removed from %s by %s", user, course_id, self.caller.name)
        self.set_status(204)
        self.finish()


class ServerAccessHandler(_CourseBody):
    """Open a student's server: only where the course allows it (``ta_server_access``,
    off by default), for a student of that course; recorded first (the student sees it
    in ``GET api/courses/access``), then the server is shared with the caller."""

    async def post(self, course_id: str, student: str) -> None:
        raw = await self.json()
        course, role = self.course_for(course_id, "open_server")
        assert self.caller is not None
        if not self.policy.server_access:
            raise CourseForbidden(
                "this site does not let course staff open students' servers "
                "(CoursePolicy.server_access)",
                field="ta_server_access",
            )
        if not course.ta_server_access and role != "operator":
            raise CourseForbidden(
                f"course {course_id} does not let its staff open students' servers "
                "(ta_server_access is off)",
                field="ta_server_access",
            )
        why = raw.get("reason", "") if isinstance(raw, dict) else ""
        if not isinstance(why, str) or not 0 < len(why) <= 200 or set(raw) - {"reason"}:
            raise CourseError("reason", 'say why, in at most 200 characters: {"reason": ...}')
        check_user(student, "user")
        if student not in await group_members(self.portal, course.group):
            raise CourseForbidden(f"{student} is not a student of {course_id}", field="user")
        self.courses.record_access(course_id, student, self.caller.name, why)
        await hub_api(
            self.portal,
            "POST",
            f"/shares/{quote(student, safe='')}/",
            {"user": self.caller.name},
        )
        self.portal.log.info(
            "%s opened the server of %s (%s)", self.caller.name, student, course_id
        )
        self.finish({"course": course_id, "student": student, "url": f"/user/{student}/"})


class AccessLogHandler(_CourseBase):
    async def get(self) -> None:
        assert self.caller is not None
        self.finish({"access": self.courses.access_log(self.caller.name)})


class EndHandler(_CourseBody):
    async def post(self, course_id: str) -> None:
        raw = await self.json()
        course, _ = self.course_for(course_id, "end")
        assert self.caller is not None
        if raw != {}:
            raise CourseError("body", "send an empty JSON object {}: ending takes no fields")
        done = await end_course(self.portal, self.courses, course, self.caller.name)
        self.finish(done)


# -- the end of a course ---------------------------------------------------------------------
async def stop_course_servers(portal: PortalService, course: Course, users: list[str]) -> list[str]:
    """Stop the servers of ``users`` that run for ``course`` (their ``user_options`` name
    it); returns ``user/server name`` of each."""
    stopped = []
    for user in users:
        q = quote(user, safe="")
        model = await hub_api(portal, "GET", f"/users/{q}")
        for name, server in list(((model or {}).get("servers") or {}).items()):
            if (server.get("user_options") or {}).get("course") == course.id:
                path = (
                    f"/users/{q}/servers/{quote(name, safe='')}" if name else f"/users/{q}/server"
                )
                await hub_api(portal, "DELETE", path)
                stopped.append(f"{user}/{name}")
    return stopped


async def end_course(
    portal: PortalService, store: CourseStore, course: Course, actor: str
) -> dict[str, Any]:
    """The course's data goes read-only and its students' course servers stop; audited."""
    if course.data_path:  # write permission out of every ACL entry, files to the owner
        from .course_data import seal

        try:
            seal(course.data_path)
        except OSError as e:  # the modes below still go read-only
            portal.log.warning("Course %s: sealing %s: %s", course.id, course.data_path, e)
    changed = make_read_only(course.data_path) if course.data_path else 0
    stopped = await stop_course_servers(portal, course, await group_members(portal, course.group))
    store.mark(course.id, ENDED, actor, read_only=changed, stopped=stopped)
    portal.log.warning(  # rare, and it changes students' files and servers: always shown
        "Course %s ended by %s: data read-only (%d entries), %d servers stopped",
        course.id,
        actor,
        changed,
        len(stopped),
    )
    return {"course": course.id, "state": ENDED, "read_only": changed, "stopped": stopped}


async def lifecycle(portal: PortalService, store: CourseStore) -> list[tuple[str, str]]:
    """One pass of the schedule: end the courses whose end date came, delete the data of
    those whose retention ended. Returns (course, what was done)."""
    from .store import utcnow

    done = []
    for course, what in store.due(utcnow()):
        try:
            if what == "end":
                await end_course(portal, store, course, "schedule")
            else:
                gone = delete_data(course.data_path) if course.data_path else False
                store.mark(course.id, PURGED, "schedule", data=course.data_path, deleted=gone)
                portal.log.warning(
                    "Course %s: retention over, data %s %s",
                    course.id,
                    course.data_path,
                    "deleted" if gone else "was already gone",
                )
            done.append((course.id, what))
        except Exception:
            portal.log.exception("Course %s: %s failed; retried next pass", course.id, what)
    return done


def course_handlers(portal: PortalService, prefix: str) -> list[tuple[str, type]]:
    """The course routes under ``prefix``; starts the end-of-course schedule on the loop."""

    def start() -> None:
        store = CourseStore(portal.budgets.store)
        setattr(portal, "_course_store", store)  # noqa: B010
        seconds = CoursePolicy(parent=portal).lifecycle_interval_seconds
        pc = PeriodicCallback(lambda: lifecycle(portal, store), seconds * 1000)
        pc.start()
        IOLoop.current().add_callback(lambda: lifecycle(portal, store))

    IOLoop.current().add_callback(start)
    base = prefix + "api/courses"
    from .class_start_api import class_handlers

    return [
        *class_handlers(portal, base, COURSE_ID),
        (base, CoursesHandler),
        (base + "/access", AccessLogHandler),
        (base + "/" + COURSE_ID, CourseHandler),
        (base + "/" + COURSE_ID + "/roster", RosterHandler),
        (base + "/" + COURSE_ID + "/roster/" + USER, RosterMemberHandler),
        (base + "/" + COURSE_ID + "/servers/" + USER + "/access", ServerAccessHandler),
        (base + "/" + COURSE_ID + "/end", EndHandler),
    ]


__all__ = ["course_handlers", "end_course", "hub_api", "lifecycle"]
