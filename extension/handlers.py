"""REST API of compute sessions, under ``/sovereign-portal/api/``.

=======  ==============================  =================================================
GET      catalog                         sizes, € rates and queue state open to this user
GET      sessions                        this server's sessions
POST     sessions                        ``{"request": {...}, "kernel_id": "..."}`` → 201
GET      sessions/<id>                   one session: state, progress, handle information;
                                        ``?version=V&wait=S`` answers once its version is
                                        not V, or after S seconds (at most 30)
DELETE   sessions/<id>                   stop it and release every job → 200
POST     sessions/<id>/scale             ``{"workers": n}`` (Dask; at most the grant)
GET      activity                        this server's granted devices: utilisation,
                                        memory, power, energy so far (:mod:`.sampler`)
GET      notices                         idle warnings (from the culler, through the hub)
                                        and budget warnings
=======  ==============================  =================================================

Every handler requires an authenticated, authorized user of this server. Errors are JSON
``{"error": "<plain words>", "reason": "<label>", "status": <code>}``, written in one place
(``_Base.write_error``); handlers only raise. Bodies are parsed by
:func:`sovereign_portal.spawners.strict.loads_json` (duplicate keys, NaN, deep nesting and
bodies over 64 KiB refused).
"""

from __future__ import annotations

import json
from typing import Any

from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from tornado import web

from ..spawners.errors import PortalError
from ..spawners.strict import MAX_JSON_BYTES, loads_json, parse_decimal, parse_int
from .sessions import MAX_WAIT_S, SessionError, SessionManager

AUTH_RESOURCE = "sovereign_portal"
#: Largest request body a handler reads (a session request is a few hundred bytes).
MAX_BODY_BYTES = MAX_JSON_BYTES


class _Base(APIHandler):
    auth_resource = AUTH_RESOURCE

    @property
    def manager(self) -> SessionManager:
        manager: SessionManager = self.settings["sovereign_portal_sessions"]
        return manager

    def fail(self, e: SessionError | PortalError) -> None:
        """Answer with ``e`` as JSON (kept for callers; handlers may just raise)."""
        self.set_status(e.status)
        self.finish(json.dumps(_error_json(e)))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """The one place this API turns an error into JSON (never with status 200)."""
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, PortalError | SessionError):
            self.set_status(exc.status)
            self.set_header("Content-Type", "application/json")
            self.finish(json.dumps(_error_json(exc)))
            return
        super().write_error(status_code, **kwargs)

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if isinstance(value, PortalError | SessionError):
            self.log.info("sovereign-portal refused (%s): %s", value.reason, value)
            return
        super().log_exception(typ, value, tb)

    def body(self) -> Any:
        return loads_json(self.request.body, limit=MAX_BODY_BYTES, empty={})


def _error_json(e: SessionError | PortalError) -> dict[str, Any]:
    if isinstance(e, PortalError):
        return e.to_json()
    return {"error": str(e), "reason": e.reason, "status": e.status}


class CatalogHandler(_Base):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        try:
            self.finish(json.dumps(await self.manager.hub.catalog()))
        except SessionError as e:
            self.fail(e)


class SessionsHandler(_Base):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        self.finish(json.dumps([s.to_json() for s in self.manager.sessions.values()]))

    @web.authenticated
    @authorized
    async def post(self) -> None:
        body = self.body()
        if not isinstance(body, dict) or set(body) - {"request", "kernel_id"}:
            self.fail(SessionError('send {"request": {...}, "kernel_id": "<optional>"}'))
            return
        try:
            s = await self.manager.create(body.get("request"), body.get("kernel_id"))
        except SessionError as e:
            self.fail(e)
            return
        self.set_status(201)
        self.finish(json.dumps(s.to_json()))


class SessionHandler(_Base):
    @web.authenticated
    @authorized
    async def get(self, sid: str) -> None:
        try:
            version, wait_s = self._wait_args()
            s = self.manager.get(sid)
            if version is not None and wait_s > 0:
                s = await self.manager.wait_change(sid, version, wait_s)
            self.finish(json.dumps(s.to_json()))
        except SessionError as e:
            self.fail(e)

    def _wait_args(self) -> tuple[int | None, float]:
        v, w = self.get_query_argument("version", None), self.get_query_argument("wait", "0")
        version = None if v is None else parse_int(v, "version", lo=0, hi=2**53)
        return version, parse_decimal(w, "wait", lo=0, hi=MAX_WAIT_S)

    @web.authenticated
    @authorized
    async def delete(self, sid: str) -> None:
        try:
            s = await self.manager.stop(sid, "stopped", "stopped by the user")
        except SessionError as e:
            self.fail(e)
            return
        self.finish(json.dumps(s.to_json()))


class ScaleHandler(_Base):
    @web.authenticated
    @authorized
    async def post(self, sid: str) -> None:
        body = self.body()
        try:
            if not isinstance(body, dict) or set(body) != {"workers"}:
                raise SessionError('send {"workers": <number>}')
            s = await self.manager.scale(sid, body["workers"])
        except SessionError as e:
            self.fail(e)
            return
        self.finish(json.dumps(s.to_json()))


class ActivityHandler(_Base):
    """``GET activity``: ``{"devices": [...], "source", "measured", "sampled_at"}``."""

    @web.authenticated
    @authorized
    async def get(self) -> None:
        self.finish(json.dumps(self.settings["sovereign_portal_sampler"].activity_json()))


class NoticesHandler(_Base):
    """``GET notices``: ``{"notices": [{"id", "kind", "level", "message", "deadline"}]}``:
    the culler's idle warnings for this server and its compute sessions (from the answers
    to their activity reports) and the budget warnings of the hub's ``api/budgets``."""

    @web.authenticated
    @authorized
    async def get(self) -> None:
        from .sampler import budget_notices

        sampler = self.settings["sovereign_portal_sampler"]
        notices = sampler.all_notices()
        try:
            code, data = await self.manager.hub._call("GET", "api/budgets")
            if code == 200:
                notices += budget_notices(data)
        except SessionError:
            pass  # the hub is away: its idle notices still show
        self.finish(json.dumps({"notices": notices}))


SID = r"([0-9a-f]{12})"
HANDLERS = [
    (r"/sovereign-portal/api/activity", ActivityHandler),
    (r"/sovereign-portal/api/notices", NoticesHandler),
    (r"/sovereign-portal/api/catalog", CatalogHandler),
    (r"/sovereign-portal/api/sessions", SessionsHandler),
    (rf"/sovereign-portal/api/sessions/{SID}", SessionHandler),
    (rf"/sovereign-portal/api/sessions/{SID}/scale", ScaleHandler),
]
