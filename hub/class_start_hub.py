"""The hub's side of class starts: three small REST routes in the hub process, for the
portal service (which talks to the hub only over HTTP). :func:`install` adds them to
``c.JupyterHub.extra_handlers`` (:func:`.portal.configure` calls it).

``GET  /hub/api/sovereign-portal/start-queue``
    Who waits in the hub's start queue and where (:func:`.start_queue.places`: the queue
    lives in the hub process). Scope ``read:servers``, filtered as JupyterHub filters it:
    a caller sees only the users whose servers it may read (the portal service: all; a
    student: themselves). The class API (``GET <service>/api/courses/<id>/class``) fills
    each student's ``position`` from it.

``POST /hub/api/sovereign-portal/courses/<id>/users``  ``{"users": [names]}``
    Create the hub users of students an instructor put on the course's roster who never
    logged in, and put them in the course's group, so that a class's pre-warm can start
    their servers. Scope :data:`SCOPE` (held by the portal service's role only). Only
    names on the portal's roster of that active course (added, not removed) are
    accepted: one other name is a 403 naming it and nothing is created. The service's
    token never gets ``admin:users``: it cannot create anybody else, nor make an admin.

``POST /hub/api/sovereign-portal/courses/<id>/data-access``  ``{}``
    Set the course's data folder's ACL now, from the course's staff and the members of
    its group (:func:`.course_data.sync_course`, the code path every course spawn runs):
    after a roster change a removed student loses the folder at once. Scope :data:`SCOPE`.

``POST /hub/api/sovereign-portal/class-servers``  ``{"users": [names]}``
    The default servers of many users in one call, for the class-start engine's pass
    and the class view (one hub call per pass for the whole portal, whatever the size
    of the class): ``{"users": {name: {"server": <the hub's server model> | null,
    "server_tokens": [<token models>], "groups": [names]}}}``. ``server_tokens`` are
    the OAuth tokens issued to that server's own client (a browser reached it:
    :func:`.class_start.claim_time`). A name the hub does not know is left out.
    Scopes ``read:servers``, ``read:tokens`` and ``read:users:groups``, filtered as
    JupyterHub filters them: a user the caller may not read is a 403 naming them, and
    nothing is answered.

Errors are JSON ``{"status", "message", "field"}`` (JupyterHub's API error shape, plus
the field).
"""

from __future__ import annotations

import json
from typing import Any

from jupyterhub import orm
from jupyterhub.apihandlers import APIHandler
from jupyterhub.roles import assign_default_roles
from sovereign_portal.spawners import start_queue
from sovereign_portal.spawners.errors import Forbidden, PortalError
from tornado import web

from .courses import COURSE_GROUP, CourseError, check_user

#: The custom JupyterHub scope of the two course routes; only the portal service's role
#: holds it (:func:`install`).
SCOPE = "custom:sovereign-portal:rosters"
SCOPE_HELP = (
    "Apply course rosters in the hub: create the hub users of students on a course's "
    "roster (in that course's group only) and set the course data folder's ACL."
)
PREFIX = r"/api/sovereign-portal"
COURSE_ID = r"([a-z0-9][a-z0-9-]{0,39})"
MAX_USERS = 2000
#: what ``POST /hub/api/sovereign-portal/class-servers`` needs, each for every user asked
CLASS_SERVER_SCOPES = ("read:servers", "read:tokens", "read:users:groups")


class _Refused(web.HTTPError):
    """A portal refusal (:class:`~sovereign_portal.spawners.errors.PortalError`) as a
    tornado error: its status, its message for the caller, the field it names."""

    def __init__(self, e: PortalError) -> None:
        super().__init__(e.status, "%s", e.log_message)
        self.text, self.field = e.user_message, e.field


def _refusals(method: Any) -> Any:
    import functools

    @functools.wraps(method)
    async def run(self: Any, *args: Any) -> None:
        try:
            await method(self, *args)
        except PortalError as e:
            raise _Refused(e) from None

    return run


class _PortalAPI(APIHandler):
    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if not isinstance(exc, _Refused):
            super().write_error(status_code, **kwargs)
            return
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"status": status_code, "message": exc.text, "field": exc.field}))

    def need(self, scope: str) -> None:
        if self.current_user is None:
            raise web.HTTPError(403, "Missing or invalid credentials.")
        if not self.has_scope(scope):
            raise Forbidden(f"this route needs the scope {scope}", field="scope")

    def course(self, course_id: str) -> Any:
        from .course_data import course_store

        store = course_store(self.settings["config"])
        course = store.get(course_id)  # CourseError 400/404, field "course"
        from .course_store import ACTIVE

        if store.state(course_id) != ACTIVE:
            raise CourseError("course", f"course {course_id} has ended", status=409)
        return store, course


class StartQueueHandler(_PortalAPI):
    @_refusals
    async def get(self) -> None:
        self.need("read:servers")
        readable = self.get_scope_filter("read:servers")
        out: dict[str, int] = {}
        for owner, place in start_queue.places().items():
            orm_user = orm.User.find(self.db, owner)
            if orm_user is not None and readable(orm_user, kind="user"):
                out[owner] = place
        self.finish({"places": out})


class ClassServersHandler(_PortalAPI):
    @_refusals
    async def post(self) -> None:
        for scope in CLASS_SERVER_SCOPES:
            self.need(scope)
        body = self.get_json_body()
        if not isinstance(body, dict) or set(body) != {"users"}:
            raise CourseError("users", 'send {"users": [user names]}')
        names = body["users"]
        if not isinstance(names, list) or len(names) > MAX_USERS:
            raise CourseError("users", f"must be a list of at most {MAX_USERS} user names")
        for i, n in enumerate(names):
            if not isinstance(n, str) or not 0 < len(n) <= 255:
                raise CourseError(f"users[{i}]", "must be a user name (1 to 255 characters)")
        wanted = list(dict.fromkeys(names))
        found = {
            u.name: u
            for u in self.db.query(orm.User).filter(orm.User.name.in_(wanted))
        }  # fmt: skip
        readable = [self.get_scope_filter(scope) for scope in CLASS_SERVER_SCOPES]
        for i, name in enumerate(names):  # all checked before anything is answered
            u = found.get(name)
            if u is not None and not all(may(u, kind="user") for may in readable):
                raise Forbidden(f"you may not read the servers of {name}", field=f"users[{i}]")
        out: dict[str, Any] = {}
        for name, orm_user in found.items():
            # as the hub's user model: a user it holds no wrapper of runs no server
            user = self.users.get(orm_user.id)
            spawner = user.spawners.get("") if user is not None else None
            server = None
            if spawner is not None and spawner.active:
                server = self.server_model(spawner, user=user)
            client = spawner.oauth_client_id if spawner is not None else None
            own = [t for t in orm_user.api_tokens if client and t.client_id == client]
            out[name] = {
                "groups": [g.name for g in orm_user.groups],
                "server": server,
                "server_tokens": [self.token_model(t) for t in own],
            }
        self.finish(json.dumps({"users": out}, default=str))


class ClassUsersHandler(_PortalAPI):
    @_refusals
    async def post(self, course_id: str) -> None:
        self.need(SCOPE)
        store, course = self.course(course_id)
        body = self.get_json_body()
        if not isinstance(body, dict) or set(body) != {"users"}:
            raise CourseError("users", 'send {"users": [institutional identifiers]}')
        names = body["users"]
        if not isinstance(names, list) or not 0 < len(names) <= MAX_USERS:
            raise CourseError("users", f"must be a list of 1 to {MAX_USERS} identifiers")
        users = [check_user(n, f"users[{i}]") for i, n in enumerate(names)]
        roster = store.roster(course_id)
        on_roster = set(roster["added"]) - set(roster["removed"])
        for i, name in enumerate(users):  # all checked before anything is created
            if name not in on_roster:
                raise CourseError(
                    f"users[{i}]",
                    f"{name} is not on the roster of {course_id} (only students an "
                    "instructor added are created here)",
                    status=403,
                )
            if not self.authenticator.validate_username(name):
                raise CourseError(f"users[{i}]", f"{name} is not a valid user name here")
        group = orm.Group.find(self.db, COURSE_GROUP.format(course.id))
        if group is None:
            group = orm.Group(name=COURSE_GROUP.format(course.id))
            self.db.add(group)
            self.db.commit()
        created, known = [], []
        for name in users:
            user = self.find_user(name)
            if user is None:
                user = self.user_from_username(name)
                assign_default_roles(self.db, entity=user)
                await self._maybe(self.authenticator.add_user(user))
                created.append(name)
            else:
                known.append(name)
            if group not in user.orm_user.groups:
                user.orm_user.groups.append(group)
        self.db.commit()
        if created:
            self.log.info(
                "Course %s: created %d hub users from its roster for %s: %s",
                course.id, len(created), self.current_user.name, ", ".join(created),
            )  # fmt: skip
        self.finish({"course": course.id, "created": created, "known": known})

    @staticmethod
    async def _maybe(out: Any) -> None:
        import inspect

        if inspect.isawaitable(out):
            await out


class DataAccessHandler(_PortalAPI):
    @_refusals
    async def post(self, course_id: str) -> None:
        self.need(SCOPE)
        _, course = self.course(course_id)
        body = self.get_json_body()
        if body not in (None, {}):
            raise CourseError("body", "send an empty JSON object {}")
        from .course_data import server_account, sync_course

        n, account = 0, False
        if course.data_path:
            names = [*course.instructors, *course.tas]
            group = orm.Group.find(self.db, COURSE_GROUP.format(course.id))
            names += [u.name for u in (group.users if group is not None else [])]
            orm_user = next(
                (u for n_ in names if (u := orm.User.find(self.db, n_)) is not None), None
            )
            if orm_user is not None:  # any user's spawner maps names to Unix accounts
                spawner = self.users[orm_user].spawner
                # as at a spawn: servers that run as the hub's own account get no ACL
                if server_account(spawner) is not None:
                    n, account = sync_course(spawner, course), True
        self.finish({"course": course.id, "entries": n, "per_user": account})


HANDLERS: list[tuple[str, type]] = [
    (PREFIX + r"/start-queue", StartQueueHandler),
    (PREFIX + r"/class-servers", ClassServersHandler),
    (PREFIX + r"/courses/" + COURSE_ID + r"/users", ClassUsersHandler),
    (PREFIX + r"/courses/" + COURSE_ID + r"/data-access", DataAccessHandler),
]


def install(c: Any, service_name: str = "sovereign-portal") -> None:
    """The routes in hub config ``c``, the custom scope, and that scope on the portal
    service's role (``<service_name>-service``, set by :func:`.service.configure_hub`)."""
    c.JupyterHub.extra_handlers = [*c.JupyterHub.get("extra_handlers", []), *HANDLERS]
    scopes = dict(c.JupyterHub.get("custom_scopes", {}))
    scopes[SCOPE] = {"description": SCOPE_HELP}
    c.JupyterHub.custom_scopes = scopes
    roles = [dict(r) for r in c.JupyterHub.get("load_roles", [])]
    for r in roles:
        if r.get("name") == f"{service_name}-service" and SCOPE not in r.get("scopes", []):
            r["scopes"] = [*r.get("scopes", []), SCOPE]
    c.JupyterHub.load_roles = roles


__all__ = ["HANDLERS", "SCOPE", "install"]
