"""What every portal spawner shares: the site, the options form and request validation.

A backend spawner mixes :class:`PortalSpawnerMixin` into a JupyterHub ``Spawner`` and
sets ``backend``. User options, from the form or straight from the REST API, become a
:class:`~.request.Resolved` request before anything starts; bad input is HTTP 400.
"""

from __future__ import annotations

import functools
import inspect
import os
import pwd
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from traitlets import Any as AnyTrait
from traitlets import Dict, Float, Int, List, Unicode, default
from traitlets.config import LoggingConfigurable

from .accounts import SystemAccountError, UnixAccountPolicy
from .errors import Forbidden, PortalError
from .form import parse_form, render_form
from .policy import allowed_partitions, open_partition_names
from .request import RequestError, Resolved, parse_request, resolve
from .site import Partition, Site, load_site
from .sizes import Size
from .start_queue import Ticket, queue_events, start_queue, until_listening

_SITES: dict[tuple[str, float], Site] = {}


def cached_site(path: str | None) -> Site:
    """Load a site file once per process (reloaded when the file changes)."""
    try:
        key = (path or "", os.stat(path).st_mtime if path else 0.0)
    except OSError:
        return load_site(path)  # raises a SiteError naming the file and the reason
    if key not in _SITES:
        _SITES[key] = load_site(path)
    return _SITES[key]


def _user_name(spawner: Any) -> str:
    return str(getattr(getattr(spawner, "user", None), "name", "?"))


def _gives_turn_back(start: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(start)
    async def wrapped(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            out = await start(self, *args, **kwargs)
            if self._start_ticket is not None:  # hold the turn until the server listens
                await until_listening(out, float(getattr(self, "http_timeout", 30)))
            return out
        finally:
            self.give_turn_back()

    return wrapped


def _line_first(progress: Callable[..., AsyncIterator[dict[str, Any]]]) -> Callable[..., Any]:
    @functools.wraps(progress)
    async def wrapped(self: Any) -> AsyncIterator[dict[str, Any]]:
        async for event in queue_events(self._start_ticket):
            yield event
        async for event in progress(self):
            yield event

    return wrapped


class PortalSpawnerMixin(LoggingConfigurable):
    """Site, options form and validated requests for a portal backend."""

    #: The site-file backend this spawner runs: "local" or "slurm".
    backend: ClassVar[str] = ""

    site_file = Unicode(
        "",
        config=True,
        help="""Path of the site file (TOML) that declares partitions, node types, MIG layouts,
        jurisdictions, prices and carbon intensity. Empty uses the embedded example site:
        one local box with 8 × H100.""",
    )
    residency = Dict(
        key_trait=Unicode(),
        value_trait=List(Unicode()),
        config=True,
        help="""Residency rules: a group (project or course) mapped to the ISO country codes
        its work may run in, e.g. {"proj-health": ["FR"]}. A member of several restricted
        groups may only use countries allowed by all of them.""",
    )
    allowed_images = List(
        Unicode(),
        config=True,
        help="Image names a user may choose in the form; empty hides the image choice.",
    )

    budget_display = AnyTrait(
        None,
        allow_none=True,
        config=True,
        help="""A callable ``(spawner, partitions) -> (notes, banner)`` that puts the user's
        remaining budget on the spawn form: ``notes`` maps a form value
        (``<partition>/<size id>``) to a short text shown next to that size, ``banner`` is a
        line above the choices. ``configure()`` sets it from the hub's budgets; None shows
        no budget.""",
    )

    course_display = AnyTrait(
        None,
        allow_none=True,
        config=True,
        help="""A callable ``(spawner) -> (sizes, images, courses)`` that narrows the spawn
        form to the user's courses: ``sizes`` the size ids to offer (None: all),
        ``images`` the image names (None: all the user may choose), ``courses`` a list of
        (id, title) to pick from first (empty: no choice). ``configure()`` sets it from the
        portal's courses; the hub checks every spawn against the course as well. None
        narrows nothing.""",
    )

    refusal_hook = AnyTrait(
        None,
        allow_none=True,
        config=True,
        help="""A callable ``(spawner, error)`` called once for every spawn the portal refuses
        with HTTP 403 (policy, course, budget), before the user sees it. ``configure()``
        sets it to count refusals for the hub's /hub/metrics (where and why, never who);
        None counts nothing. An exception in it is logged, never shown to the user.""",
    )

    resolved: Resolved | None = None
    #: Ledger (issue 10): why the server ended when the hub did not stop it, in the
    #: ledger's words ("died", "walltime", "budget", "reclaimed"); set by the backend (or
    #: by whoever stops it for a budget or a cull) and read by the hub's post_stop_hook.
    #: Empty means a plain stop. The hub resets it before each start.
    ledger_end_reason: str = ""

    start_slots = Int(
        4,
        min=0,
        config=True,
        help="""How many servers of this backend the hub starts at once (the start queue,
        issue 12). More starts than that wait in line, first come first served, and the
        spawn page shows each one its place in line and an estimate; waiting in line does
        not count against start_timeout. 0 turns the queue off (every start runs at once,
        and JupyterHub's concurrent_spawn_limit is then the only throttle).""",
    )
    start_estimate_seconds = Float(
        20.0,
        min=1.0,
        config=True,
        help="""The seconds one start is assumed to take, for the spawn page's estimate,
        until the queue has timed real starts (then it uses the mean of the last 20).""",
    )

    _start_ticket: Ticket | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__name__.endswith("Mixin") and cls.backend not in ("local", "slurm"):
            raise TypeError(f"{cls.__name__} must set backend = 'local' or 'slurm'")
        # the start queue: a backend's start gives its turn back when it ends, and its
        # progress shows the place in line first (spawners/start_queue.py)
        if "start" in cls.__dict__:
            setattr(cls, "start", _gives_turn_back(cls.__dict__["start"]))  # noqa: B010
        if "progress" in cls.__dict__:
            setattr(cls, "progress", _line_first(cls.__dict__["progress"]))  # noqa: B010

    # -- the start queue (issue 12) -------------------------------------------------------
    async def run_pre_spawn_hook(self) -> None:
        """JupyterHub's pre-spawn hook (budget, course), then this start's turn in the
        start queue: outside ``start_timeout``, after every check that may refuse."""
        inner = getattr(super(), "run_pre_spawn_hook", None)
        out = inner() if inner is not None else None
        if inspect.isawaitable(out):
            await out
        await self.wait_turn()

    async def wait_turn(self) -> None:
        """Take this start's place in the backend's start queue and wait for a slot."""
        self.give_turn_back()
        if self.start_slots <= 0:
            return
        hold = float(getattr(self, "start_timeout", 120)) + 60.0
        q = start_queue(self.backend, self.start_slots, self.start_estimate_seconds, hold)
        ticket = q.join(_user_name(self))
        self._start_ticket = ticket
        if ticket.waiting:
            self.log.info(
                "Start of %s waits in line: place %s of %d (%d starting)",
                _user_name(self),
                ticket.position(),
                q.waiting,
                q.holding,
            )
        await q.wait(ticket)

    def give_turn_back(self) -> None:
        ticket, self._start_ticket = self._start_ticket, None
        if ticket is not None:
            ticket.release()

    async def progress(self) -> AsyncIterator[dict[str, Any]]:
        async for event in queue_events(self._start_ticket):
            yield event

    # -- the site, filtered for this user -------------------------------------------------
    @property
    def site(self) -> Site:
        return cached_site(str(Path(self.site_file).resolve()) if self.site_file else None)

    def user_groups(self) -> list[str]:
        user = getattr(self, "user", None)
        return sorted(g.name for g in getattr(user, "groups", []) or [])

    def partitions(self) -> list[Partition]:
        return allowed_partitions(self.site, self.user_groups(), self.residency, self.backend)

    def free_devices(self, partition: Partition, size: Size) -> int | None:
        """How many of ``size`` are free now; ``None`` when the backend cannot tell."""
        return None

    def image_choices(self) -> list[str]:
        """The image names this user may choose (the form's order; the first is preselected).

        ``allowed_images`` here; a backend with a per-user allow-list overrides this.
        """
        return list(self.allowed_images)

    # -- the form -------------------------------------------------------------------------
    @default("options_form")
    def _default_options_form(self) -> Any:
        def form(spawner: Any) -> str:
            parts = spawner.partitions()
            if not parts:
                return (
                    "<p>No partition of this site is open to you. Ask your course instructor "
                    "or the operators to add you to a project.</p>"
                )
            notes, banner = ({}, "")
            if spawner.budget_display is not None:
                notes, banner = spawner.budget_display(spawner, parts)
            sizes, images, courses = None, None, []
            if spawner.course_display is not None:
                sizes, images, courses = spawner.course_display(spawner)
            choices = spawner.image_choices()
            if images is not None:
                choices = [i for i in choices if i in images]
            return render_form(
                parts,
                spawner.free_devices,
                choices,
                notes=notes,
                banner=banner,
                sizes=sizes,
                courses=courses,
            )

        return form

    def options_from_form(self, formdata: Mapping[str, Sequence[str]]) -> dict[str, Any]:
        try:
            return parse_form(formdata)
        except PortalError as e:
            raise self.portal_error(e) from None

    def checked_account(self, name: str, where: str) -> pwd.struct_passwd:
        """The passwd entry of the Unix account ``name`` that this user's processes run as,
        after :class:`~.accounts.UnixAccountPolicy`; else a 403 (a system account, or none
        on this ``where``: "cluster", "machine"). The one place both backends check it."""
        try:
            return UnixAccountPolicy(parent=self).check(name)
        except SystemAccountError as e:
            log = f"Unix account {name!r} is a system account ({e.why})"
            raise self.portal_error(
                Forbidden(e.message, reason="system_account", log_message=log)
            ) from None
        except KeyError:
            message = (
                f"Your account has no Unix account {name!r} on this {where} yet; "
                "ask the operators to create it."
            )
            raise self.portal_error(Forbidden(message, reason="no_unix_account")) from None

    def portal_error(self, e: PortalError) -> Exception:
        """The one place a spawner turns a :class:`PortalError` into what JupyterHub shows:
        a ``SpawnException`` with the user message, the log message, reason and status."""
        self.log.info("Refused for %s (%s): %s", _user_name(self), e.reason, e.log_message)
        if e.status == 403 and self.refusal_hook is not None:
            try:
                self.refusal_hook(self, e)
            except Exception:
                self.log.exception("refusal_hook failed (the refusal stands)")
        return e.spawn_exception()

    @default("apply_user_options")
    def _default_apply_user_options(self) -> Any:
        return lambda spawner, options: spawner.validate_request(options)

    # -- validation -------------------------------------------------------------------------
    def validate_request(self, options: Any) -> Resolved:
        """Turn user options into a Resolved request, or raise HTTP 400 saying what is allowed."""
        if isinstance(options, dict) and "course" in options:
            # the course a server is for: the hub's course step reads it (hub/course_store),
            # the request does not carry it
            options = {k: v for k, v in options.items() if k != "course"}
        try:
            req = parse_request(dict(options) if isinstance(options, dict) else options)
            names = open_partition_names(self.site, self.partitions(), req.partition)
            if req.kind != "notebook":
                raise RequestError("a server is a notebook: kind must be 'notebook'", field="kind")
            images = self.image_choices()
            if req.image is not None and req.image not in images:
                allowed = ", ".join(images) or "none"
                raise RequestError(
                    f"image {req.image!r} is not offered; allowed: {allowed}", field="image"
                )
            resolved = resolve(self.site, req, default_partition=names[0])
        except PortalError as e:
            raise self.portal_error(e) from None
        self.resolved = resolved
        return resolved

    def portal_env(self, resolved: Resolved) -> dict[str, str]:
        """Non-secret environment that tells the server where it runs."""
        p = resolved.partition
        return {
            "SOVEREIGN_PORTAL_PARTITION": p.name,
            "SOVEREIGN_PORTAL_SIZE": resolved.size.id,
            "SOVEREIGN_PORTAL_COUNTRY": p.jurisdiction.country,
            "SOVEREIGN_PORTAL_WALLTIME_MINUTES": str(resolved.walltime_minutes),
        }
