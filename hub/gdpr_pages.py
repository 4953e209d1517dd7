"""``GET /hub/usage/export``: the caller's GDPR archive, as a download (issue 11).

A JupyterHub page handler (``c.JupyterHub.extra_handlers``, set by
:func:`.portal.configure`). The caller gets their own archive (:func:`.gdpr.archive`, the
format of docs/reference/gdpr-export.md); an operator (a hub admin) may add
``?user=NAME`` for anyone's, which is written to the audit log. Anyone else asking for
another user gets 403, an unknown user 404; nothing is written then.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from jupyterhub.handlers import BaseHandler
from tornado import web

from . import gdpr
from .accounts import AccountError, check_username
from .store import AuditEvent, PortalDatabase, PortalStore

_stores: dict[str, PortalStore] = {}


def _portal_store(config: Any) -> PortalStore:
    url = PortalDatabase(config=config).url
    if url not in _stores:
        _stores[url] = PortalDatabase(config=config).open(upgrade=False)
    return _stores[url]


class ExportHandler(BaseHandler):
    """The "Download my data" link of the usage page."""

    @web.authenticated
    async def get(self) -> None:
        me = self.current_user
        raw = self.get_argument("user", me.name)
        try:
            target = check_username(raw, "user")
        except AccountError as e:
            raise web.HTTPError(400, "%s", str(e)) from None
        if target != me.name and not me.admin:
            raise web.HTTPError(403, "user: only an operator may download another person's data")
        store = _portal_store(self.settings["config"])
        portal = gdpr.export_portal(store, target)
        with self.db.get_bind().connect() as conn:
            hub = gdpr.export_hub_db(conn, target)
        if hub is None and not any(portal.values()):
            raise web.HTTPError(404, "user: the portal holds nothing about %r", target)
        hub_user = None
        user = self.find_user(target)
        if user is not None:
            state = await user.get_auth_state()
            hub_user = {
                "name": user.name,
                "admin": user.admin,
                "groups": sorted(g.name for g in user.groups),
                "roles": sorted(r.name for r in user.roles),
                "created": user.created.isoformat() if user.created else None,
                "last_activity": user.last_activity.isoformat() if user.last_activity else None,
                "auth_state": state,  # the portal keeps no tokens in it (hub/auth.py)
            }
        home = _home(self.settings["config"], target)
        data = gdpr.archive(
            target, portal=portal, hub=hub, hub_user=hub_user, files=gdpr.portal_files(home)
        )
        if target != me.name:
            with store.begin() as s:
                s.add(
                    AuditEvent(
                        at=datetime.now(UTC),
                        actor=me.name,
                        action="gdpr_export",
                        target=target,
                        detail="{}",
                    )
                )
        stamp = datetime.now(UTC).strftime("%Y%m%d")
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.set_header(
            "Content-Disposition", f'attachment; filename="sovereign-portal-data-{stamp}.json"'
        )
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps(data, indent=1, ensure_ascii=False))


def _home(config: Any, username: str) -> Path | None:
    tmpl = config.get("LocalGPUSpawner", {}).get("home_dir_template", "")
    return Path(str(tmpl).format(username=username)) if tmpl else None


#: For ``c.JupyterHub.extra_handlers`` (the hub prefix is added: ``/hub/usage/export``).
HANDLERS = [(r"/usage/export", ExportHandler)]
