"""The culler's idle warnings on the hub's own pages (home and spawn), not only in JupyterLab.

JupyterHub's templates have a public hook for this: ``home.html`` and ``spawn.html`` show
``announcement_home`` / ``announcement_spawn`` when it is a string, and
``JupyterHub.template_vars`` values may be callables, called with the logged-in user at
each render. :class:`HubNotices` is that callable. It never calls anything while a page
renders: a task on the hub's event loop (started by the first render) reads every
target's notice from the portal service every ``interval`` seconds (``api/activity/all``,
with the culler's token, the one route that lists them) and keeps them by user; a render
reads that dict. With no notice (or the service away) it gives ``None``, and the page
shows the hub's usual announcement, if any.

:func:`install` is called by :func:`.culler.configure_culler`.
"""

from __future__ import annotations

import asyncio
import functools
import html
import json
import logging
from typing import Any

log = logging.getLogger("JupyterHub")


class HubNotices:
    """The users' idle warnings, followed from the portal service; :meth:`announcement`
    is the ``template_vars`` callable."""

    def __init__(self, url: str, token: str, interval: float = 5.0) -> None:
        self.url, self._token, self.interval = url, token, interval
        self.by_user: dict[str, list[dict[str, Any]]] = {}
        self._task: asyncio.Task[None] | None = None

    def announcement(self, user: Any, fallback: Any = None) -> Any:
        """The page's announcement for ``user``: their idle warnings, else ``fallback``
        (the operator's own announcement for the page: a string, a callable or None)."""
        self._ensure()
        notices = self.by_user.get(getattr(user, "name", ""), []) if user is not None else []
        if not notices:
            return fallback(user) if callable(fallback) else fallback
        items = "".join(
            f'<p class="sp-idle-notice mb-1" data-deadline="{html.escape(str(n.get("deadline")))}">'
            f"{html.escape(str(n.get('message', '')))}</p>"
            for n in notices[:5]
        )
        return f'<div id="sp-idle-notices" role="alert">{items}</div>'

    def _ensure(self) -> None:
        if self._task is not None and not self._task.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # not inside the hub's loop (a config check): nothing to start
        self._task = loop.create_task(self._follow())

    async def refresh(self) -> bool:
        """Read every target's notice once; False when the service did not answer."""
        from tornado import httpclient

        req = httpclient.HTTPRequest(
            self.url, headers={"Authorization": f"token {self._token}"}, request_timeout=10
        )
        resp = await httpclient.AsyncHTTPClient().fetch(req, raise_error=False)
        if resp.code != 200:
            return False
        data = json.loads(resp.body)
        by_user: dict[str, list[dict[str, Any]]] = {}
        for t in data.get("targets", []):
            n = t.get("notice")
            if isinstance(n, dict) and n.get("kind") == "idle":
                by_user.setdefault(str(t.get("user")), []).append(n)
        self.by_user = by_user
        return True

    async def _follow(self) -> None:
        failing = False
        while True:
            try:
                ok = await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                ok = False
                if not failing:
                    log.warning("Idle notices: the portal service did not answer: %s", e)
            failing = not ok
            if failing:
                self.by_user = {}  # no stale warning on the page
            await asyncio.sleep(self.interval)


def install(c: Any, portal_url: str, token: str, interval: float = 5.0) -> HubNotices:
    """Show the idle warnings on the hub's home and spawn pages (``template_vars``), over
    the operator's own announcement for those pages, if any. ``portal_url`` is the portal
    service's base URL (``http://127.0.0.1:<port>``)."""
    url = f"{portal_url.rstrip('/')}/services/sovereign-portal/api/activity/all"
    notices = HubNotices(url, token, interval)
    tv = dict(c.JupyterHub.get("template_vars", {}))
    for page in ("announcement_home", "announcement_spawn"):
        tv[page] = functools.partial(notices.announcement, fallback=tv.get(page))
    c.JupyterHub.template_vars = tv
    return notices
