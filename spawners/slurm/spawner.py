"""SlurmGPUSpawner: each notebook server is a Slurm job sized by the user's request.

Lifecycle, in short (docs/explanation/security.md has the why):

- ``start``: validate the request (HTTP 400 on bad input, before anything runs), write the
  API token to a one-time 0600 file owned by the user, render the job script from validated
  fields only, submit it *as the user* (``runuser -u U -- sbatch``, argv list, script on
  stdin, a clean environment), then follow the job through the shared poller: queued (with
  Slurm's reason and start estimate), starting on node N, and the port the job reported in
  its own comment. The host is Slurm's address of the node, never what the job says.
- ``poll``: answers from the shared poller's last *authoritative* answer; a failing or
  silent ``squeue`` keeps the server running (unknown is not stopped). The poll that sees
  the job end also tells the hub at once (``poll_and_notify``), so a job cancelled behind
  the hub's back shows as stopped within one scheduler interval, which is also the default
  JupyterHub ``poll_interval``.
- ``stop``: ``scancel`` as the user, then wait until Slurm says the job is gone.
- hub restart: ``load_state`` re-tracks the job id and tag; after every hub start
  (:func:`.sweep.sweep_on_hub_start`), portal jobs whose tag is ours but that no spawner
  tracks are reported and cancelled after a grace period. Nothing else is touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import secrets
import sys
import time
from collections.abc import AsyncIterator, Mapping
from html import escape
from pathlib import Path
from typing import Any

from jupyterhub.spawner import Spawner, SpawnException
from tornado import web
from traitlets import Any as AnyTrait
from traitlets import Bool, Dict, Float, List, TraitError, Unicode, default, validate

from ..accounts import UnixAccountPolicy
from ..base import PortalSpawnerMixin
from ..errors import Forbidden, RequestRefused
from ..images import ImageAllowList, ImageError, NotebookImage, load_image_allow_list
from ..request import Resolved
from .client import SchedulerClient, SchedulerError, SchedulerUnavailable, SlurmCLI
from .jobscript import (
    JOB_NAME,
    JobSpec,
    comment_port,
    comment_tag,
    render_script,
    sbatch_argv,
    tag_is_ours,
    valid_unix_user,
)
from .jobscript import make_tag as _make_tag
from .scheduler import (
    FINAL_STATES,
    GONE,
    NEVER_REASONS,
    JobInfo,
    JobPoller,
    SlurmError,
    shared_poller,
    slurm_env,
)
from .userfiles import UserFileError, below_home, remove_file, user_dir, write_secret

#: The tag of previews (``job_script``, ``sovereign-portal job-script``): never submitted.
PREVIEW_TAG = _make_tag(b"preview", "0" * 12)
_ALLOW_LISTS: dict[tuple[str, float], ImageAllowList] = {}
#: One scheduler client per submit prefix (one, in practice).
_CLIENTS: dict[tuple[str, ...], SchedulerClient] = {}


def _load_allow_list(path: str) -> ImageAllowList:
    """Read an image allow-list once per process (again when the file changes)."""
    try:
        key = (str(Path(path).resolve()), os.stat(path).st_mtime)
    except OSError as e:
        raise ImageError(f"{path}: {e.strerror}", "bad_config") from None
    if key not in _ALLOW_LISTS:
        _ALLOW_LISTS[key] = load_image_allow_list(path)
    return _ALLOW_LISTS[key]


#: Tags of every job a spawner in this process tracks (submitted or re-adopted).
TRACKED_TAGS: set[str] = set()
_NODE_ADDR: dict[str, str] = {}


def _user_error(
    message: str, reason: str, log_message: str = "", status: int = 500
) -> web.HTTPError:
    """An error whose message is safe and useful on the spawn page; the log gets detail."""
    return SpawnException(
        message, reason=reason, log_message=log_message or message, status_code=status
    )


def unix_user_name(template: str, name: str) -> str:
    """The Unix account of hub user ``name`` under ``template`` (``unix_user_template``):
    ``{username}`` is the hub name, ``{login}`` the part of it before the "@"."""
    return template.format(username=name, login=name.split("@", 1)[0])


class SlurmGPUSpawner(PortalSpawnerMixin, Spawner):
    """Run each user's server as a Slurm job on a GPU partition, as the user's Unix account."""

    backend = "slurm"

    submit_prefix = List(
        Unicode(),
        ["runuser", "-u", "{unix_user}", "--"],
        config=True,
        help="""argv prefix that runs a Slurm client as the user's Unix account; {unix_user}
        is replaced. The default needs a hub running as root. Use ["sudo", "-n", "-u",
        "{unix_user}", "--"] with a sudoers rule for sbatch and scancel otherwise.""",
    )
    unix_user_template = Unicode(
        "{username}",
        config=True,
        help="The Unix account of a hub user; {username} is the hub user name "
        '(alice@uni-a.example), {login} the part of it before the "@" (alice). The account '
        "must exist on the hub host and on the compute nodes.",
    )
    python = Unicode(
        sys.executable,
        config=True,
        help="""Python interpreter the job runs (with sovereign-portal and jupyterhub
        installed); it must be reachable from the compute nodes and readable by users.""",
    )
    server_ip = Unicode(
        "0.0.0.0",  # noqa: S104
        config=True,
        help="""Address the server binds on the compute node. The hub reaches it at Slurm's
        NodeAddr of the node and the port the job reports.""",
    )
    token_dir_template = Unicode(
        "{home}/.sovereign-portal/tokens",
        config=True,
        help="""Directory (owned by the user, mode 0700) where the hub writes each job's
        one-time API token file (mode 0600); the job reads and deletes it. {home} is the
        user's home directory; the directory must be below it, on a file system the compute
        nodes share. The hub creates it without following links and refuses to spawn if a
        part of it is a link or belongs to another account.""",
    )
    output_template = Unicode(
        "{home}/.sovereign-portal/logs/slurm-%j.log",
        config=True,
        help="The job's stdout/stderr file (Slurm patterns such as %j allowed); {home} is "
        "the user's home directory. The hub creates its directory when it is below the home "
        "(as for token_dir_template); a directory elsewhere must exist and be writable by "
        "the user.",
    )
    scheduler_poll_interval = Float(
        30.0,
        config=True,
        help="""Seconds between the shared squeue calls that cover every server's job. One
        call per interval, whatever the number of servers. The poll that sees a job end
        tells the hub at once, so a server whose job ends shows as stopped within one
        interval; JupyterHub's own Spawner.poll_interval defaults to the same value.""",
    )
    scheduler_poll_jitter = Float(
        0.1,
        config=True,
        help="Random spread (a fraction of the interval) added to each poll interval, so "
        "hubs restarted together do not poll in step.",
    )
    scheduler_fast_interval = Float(
        0.5,
        config=True,
        help="Poll interval while some job is being started or stopped (still one squeue "
        "for all jobs). It bounds how late the hub learns a starting job's port.",
    )
    queue_snapshot_file = Unicode(
        "sovereign-portal-slurm-queue.json",
        config=True,
        help="""File (mode 0600, relative to the hub's working directory) through which the
        hub's spawners and the portal service share one whole-queue squeue per interval:
        whichever polls first asks Slurm and writes it, the other reads it while it is
        fresh. `configure_hub` passes it to the service. Empty: each process polls on its
        own (two queries per interval).""",
    )
    connect_poll_interval = Float(
        0.05,
        config=True,
        help="""Once the job reports its port, start() tries a TCP connection to the server
        this often (up to http_timeout) and returns when it listens, so JupyterHub's HTTP
        check, which backs off exponentially, succeeds on its first try.""",
    )
    tag_key_file = Unicode(
        "sovereign-portal-slurm.key",
        config=True,
        help="""File with the secret that signs job tags (created, mode 0600, if missing;
        relative to the hub's working directory). Only jobs whose comment carries a tag
        signed with it are ever treated as portal jobs, adopted or cancelled.""",
    )
    orphan_grace_seconds = Float(
        120.0,
        config=True,
        help="""Seconds to wait after the hub has started (and re-adopted the servers in
        its database) before portal jobs that carry this hub's tag but that no server
        tracks are reported and cancelled. The sweep runs after every hub start when
        jupyterhub_config.py calls sweep_on_hub_start() (see the Slurm deployment how-to),
        and otherwise once the first server is loaded. 0 disables it.""",
    )
    stop_wait_timeout = Float(
        60.0,
        config=True,
        help="Seconds stop() waits for Slurm to report the cancelled job gone.",
    )
    slurm_accounting = Bool(
        False,
        config=True,
        help="""Whether this site runs Slurm accounting (slurmdbd) with budgets pushed into
        it (`sovereign-portal budgets sync`). Then every job gets --account: the account of
        the course or project budget it charges (sp-course-<id>, sp-project-<id>), else the
        partition's account, else default_account; with none of them the spawn is refused.""",
    )
    default_account = Unicode(
        "",
        config=True,
        help="""Slurm account (--account) of a job that charges no course or project budget
        (a user budget, or no budget), when its partition names none. Empty: no --account
        for such jobs, which slurm_accounting does not allow.""",
    )
    budget_charge = AnyTrait(
        None,
        allow_none=True,
        config=True,
        help="""A callable ``(spawner) -> (owner kind, owner id) | None``: the budget a spawn
        by this user would charge now (a course, project or user), without holding
        anything. The job-script preview (`sovereign-portal job-script`, job_script())
        names its --account with it, through the same rule a spawn uses, so it shows the
        account of the budget's Slurm account. configure() sets it from the hub's budgets;
        None previews with the partition's or the default account.""",
    )
    reservation_for = AnyTrait(
        None,
        allow_none=True,
        config=True,
        help="""A callable ``(spawner) -> str | None``: the Slurm reservation this server's
        job runs in (sbatch --reservation), or None. configure() sets it from the portal's
        class starts: a server pre-warmed for a class runs in the class's reservation
        (CoursePolicy.prewarm_reservations). Never taken from user input.""",
    )
    extra_sbatch_args = List(
        Unicode(),
        config=True,
        help="Operator sbatch options added to every server job, e.g. ['--mem=32G']. "
        "Never taken from user input.",
    )
    job_environment = Dict(
        key_trait=Unicode(),
        value_trait=Unicode(),
        config=True,
        help="Extra non-secret environment of every server job (names and values are "
        "checked; tokens are refused).",
    )
    image_allow_list = Unicode(
        "",
        config=True,
        help="""Image allow-list (TOML, see images/allow-list.example.toml): when set, servers
        can run inside an Apptainer image from it (``apptainer exec [--nv] [--cleanenv]
        [--bind ...] IMAGE jupyterhub-singleuser``). The form offers the images open to the
        user's groups; a request naming another image is refused (HTTP 400, naming the
        allowed ones). A user who names none gets their course's image, else the list's
        ``default``; with neither, the server runs on the host. The file is read when set
        (a broken list stops the hub) and again whenever it changes.""",
    )
    image_command = List(
        Unicode(),
        ["jupyterhub-singleuser"],
        config=True,
        help="The server command inside an image, found on the image's PATH; the portal's "
        "server arguments and the launcher's --ip/--port follow it.",
    )

    job_id: str = ""
    job_tag: str = ""
    job_host: str = ""
    #: The [[sites]] entry the job runs at ("": the hub host's cluster, no [[sites]]).
    job_site: str = ""
    #: Where placement put this spawn, and why (shown on the spawn page).
    placement_why: str = ""
    stop_reason: str = ""
    _events: list[dict[str, Any]]
    _starting = False
    _notify: asyncio.Future[Any] | None = None
    _hub_polls = False  # JupyterHub polls this server (start_polling until stop_polling)

    @validate("image_allow_list")
    def _check_image_allow_list(self, proposal: Any) -> str:
        path = str(proposal["value"])
        if path:
            try:
                _load_allow_list(path)
            except ImageError as e:
                raise TraitError(f"SlurmGPUSpawner.image_allow_list: {e}") from None
        return path

    @default("poll_interval")
    def _default_poll_interval(self) -> int:
        return max(1, round(self.scheduler_poll_interval))

    # -- shared machinery ---------------------------------------------------------------------
    def _site_pollers(self) -> dict[str, JobPoller]:
        from .sites import site_pollers

        return site_pollers(
            self.site,
            self.scheduler_poll_interval,
            self.scheduler_poll_jitter,
            self.scheduler_fast_interval,
            str(Path(self.queue_snapshot_file).resolve()) if self.queue_snapshot_file else "",
        )

    @property
    def poller(self) -> JobPoller:
        if self.job_site:  # one poller per site: a site that is down leaves only its jobs
            return self._site_pollers()[self.job_site]
        return shared_poller(
            self.scheduler_poll_interval,
            self.scheduler_poll_jitter,
            self.scheduler_fast_interval,
            str(Path(self.queue_snapshot_file).resolve()) if self.queue_snapshot_file else "",
        )

    @property
    def scheduler(self) -> SchedulerClient:
        """The scheduler client that submits and cancels as the user: the CLI on this host,
        or the client of the job's site (:func:`.sites.client_for`: CLI or slurmrestd)."""
        if self.job_site:
            from .sites import client_for

            return client_for(self.site.cluster_site(self.job_site), self.submit_prefix)
        key = tuple(self.submit_prefix)
        if key not in _CLIENTS:
            _CLIENTS[key] = SlurmCLI(env=slurm_env(), submit_prefix=key)
        return _CLIENTS[key]

    @property
    def unix_user(self) -> str:
        return self.unix_user_for(self.user.name)

    def unix_user_for(self, name: str) -> str:
        """The Unix account of hub user ``name``, as :attr:`unix_user_template` maps it."""
        return unix_user_name(self.unix_user_template, name)

    def account(self) -> pwd.struct_passwd:
        """The Unix account jobs run as, after :class:`~..accounts.UnixAccountPolicy`.

        Every use of the account (token file, directories, job script, sbatch, the
        job-script preview) goes through here: a system account (uid outside the policy's
        range, gid 0, or a denied name) is refused with HTTP 403 before anything is written
        or submitted, and so is an account that does not exist.
        """
        return self.checked_account(self.unix_user, "cluster")

    _pw = account

    def _key(self) -> bytes:
        p = Path(self.tag_key_file)
        if not p.exists():
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
        return p.read_text().strip().encode()

    def _as_user(self, argv: list[str]) -> list[str]:
        return [a.format(unix_user=self.unix_user) for a in self.submit_prefix] + argv

    def _event(self, progress: int, message: str) -> None:
        if not hasattr(self, "_events"):
            self._events = []
        self._events.append({"progress": progress, "message": message})
        self.log.info("Server %s: %s", self._label, message)

    @property
    def _label(self) -> str:
        return f"{self.user.name}/{self.name}" if self.name else self.user.name

    # -- state --------------------------------------------------------------------------------
    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        self.job_id = str(state.get("job_id") or "")
        self.job_tag = str(state.get("job_tag") or "")
        self.job_host = str(state.get("job_host") or "")
        site = str(state.get("job_site") or "")
        self.job_site = site if site in {s.name for s in self.site.sites} else ""
        if self.job_id:
            TRACKED_TAGS.add(self.job_tag)
            self.poller.track(self.job_id)
            self.poller.watch(self.job_id, self._job_ended)
            self._schedule_sweep()

    def get_state(self) -> dict[str, Any]:
        state: dict[str, Any] = super().get_state()
        if self.job_id:
            state.update(job_id=self.job_id, job_tag=self.job_tag, job_host=self.job_host)
            if self.job_site:
                state["job_site"] = self.job_site
        return state

    def clear_state(self) -> None:
        super().clear_state()
        if self.job_id:
            last = self.poller.info(self.job_id)
            if last is not None and last.active:  # COMPLETING: log its final state later
                job_id, name = self.job_id, self._label
                self.poller.follow(job_id, lambda info: self._log_end(name, job_id, info))
            else:
                self.poller.untrack(self.job_id)
        TRACKED_TAGS.discard(self.job_tag)
        self.job_id = self.job_tag = self.job_host = self.job_site = ""

    # -- the job --------------------------------------------------------------------------------
    def job_env(self, hub_env: Mapping[str, str] | None = None) -> dict[str, str]:
        """The job's environment: JupyterHub's (``get_env()``), minus every secret, plus the
        portal's. ``hub_env=None`` previews it without a hub (:meth:`preview_hub_env`)."""
        hub_env = self.preview_hub_env() if hub_env is None else hub_env
        env = {
            k: v
            for k, v in hub_env.items()
            if k not in ("JUPYTERHUB_API_TOKEN", "JPY_API_TOKEN") and "TOKEN" not in k
        }
        pw = self._pw()
        env.update(
            HOME=pw.pw_dir,
            USER=self.unix_user,
            LOGNAME=self.unix_user,
            SHELL=pw.pw_shell or "/bin/bash",
            PATH=f"{Path(self.python).parent}:/usr/local/bin:/usr/bin:/bin",
        )
        if os.environ.get("SLURM_CONF"):
            env["SLURM_CONF"] = os.environ["SLURM_CONF"]
        cs = self.site.cluster_site(self.job_site) if self.job_site else None
        if cs is not None:  # the job's own cluster: its slurmd sets SLURM_CONF for a remote site
            conf = getattr(cs.scheduler, "slurm_conf", None)
            if conf:
                env["SLURM_CONF"] = conf
            else:
                env.pop("SLURM_CONF", None)
        env.update(self.job_environment)
        return env

    def preview_hub_env(self) -> dict[str, str]:
        """What ``get_env()`` gives without a hub: ``env_keep`` and static ``environment``.

        JupyterHub's per-server ``JUPYTERHUB_*`` variables (user, URLs, OAuth client id)
        and callable ``environment`` values exist only at spawn time.
        """
        env = {k: os.environ[k] for k in self.env_keep if k in os.environ}
        env.update({k: v for k, v in self.environment.items() if not callable(v)})
        return env

    def job_spec(
        self, resolved: Resolved, tag: str, hub_env: Mapping[str, str] | None = None
    ) -> JobSpec:
        """Everything the job is made of. ``start`` passes ``get_env()``; ``None`` previews."""
        pw = self._pw()
        home = pw.pw_dir
        token_dir = self.token_dir_template.format(home=home)
        from ..local import SOVEREIGN_LAB_ARGS

        args = [*self.get_args(), *SOVEREIGN_LAB_ARGS]
        return JobSpec(
            resolved=resolved,
            unix_user=self.unix_user,
            tag=tag,
            home=home,
            python=self.python,
            token_file=f"{token_dir}/{tag}",
            output=self._output(home),
            server_args=args,
            env={**self.job_env(hub_env), **self.portal_env(resolved)},
            ip=self.server_ip,
            account=self.slurm_account(resolved, preview=hub_env is None),
            extra_sbatch=[*self.extra_sbatch_args, *self._reservation_args(hub_env)],
            image_argv=self.image_argv(resolved),
            image_command=list(self.image_command),
        )

    def _reservation_args(self, hub_env: Mapping[str, str] | None) -> list[str]:
        """``--reservation=<name>`` of a pre-warmed server's job (not in a preview)."""
        if hub_env is None or self.reservation_for is None:
            return []
        name = self.reservation_for(self)
        return [f"--reservation={name}"] if name else []

    def _output(self, home: str) -> str:
        """The job's log file; a site's job ids are its own, so its name carries the site."""
        out = self.output_template.format(home=home)
        return out.replace("%j", f"{self.job_site}-%j") if self.job_site else out

    def slurm_account(self, resolved: Resolved, preview: bool = False) -> str | None:
        """``--account`` of this server's job (:func:`.accounting.job_account`): the budget
        the spawn charges (``ledger_charge_to``, set by the budget gate at admission; in a
        ``preview``, the budget a spawn would charge now, from ``budget_charge``), else the
        partition's or the default account."""
        from .accounting import AccountingError, job_account

        charge = getattr(self, "ledger_charge_to", None)
        if preview and self.budget_charge is not None:
            charge = self.budget_charge(self)
        try:
            return job_account(
                charge,
                self.default_account,
                resolved.partition.account,
                self.slurm_accounting,
            )
        except AccountingError as e:
            raise self.portal_error(
                Forbidden(
                    f"This server cannot be charged to a Slurm account: {e}",
                    reason="no_slurm_account",
                )
            ) from None

    def render_job(
        self, resolved: Resolved, tag: str, hub_env: Mapping[str, str] | None = None
    ) -> tuple[JobSpec, list[str], str]:
        """The job ``start`` submits: its spec, the submit argv and the script (stdin).

        ``sovereign-portal job-script`` prints the output of this same method.
        """
        spec = self.job_spec(resolved, tag, hub_env)
        return spec, self._as_user(sbatch_argv(spec)), render_script(spec)

    def job_script(self, resolved: Resolved | None = None) -> str:
        """The script ``start`` would submit for ``resolved`` (or the last request), with
        the preview tag and without JupyterHub's per-server ``JUPYTERHUB_*`` variables."""
        r = resolved or self.resolved
        if r is None:
            raise ValueError("no request: pass a Resolved request")
        return self.render_job(r, PREVIEW_TAG)[2]

    # -- images -----------------------------------------------------------------------------
    def allow_list(self) -> ImageAllowList | None:
        return _load_allow_list(self.image_allow_list) if self.image_allow_list else None

    def _default_image(self, allow: ImageAllowList, groups: set[str]) -> NotebookImage | None:
        """The image of the user's course (first in the list's order), else the default."""
        for image in allow.images:
            if set(image.courses) & groups and image.allows(groups):
                return image
        default = allow.get(allow.default) if allow.default else None
        return default if default is not None and default.allows(groups) else None

    def image_choices(self) -> list[str]:
        """The images open to this user's groups; their course's (or the default) first."""
        allow = self.allow_list()
        if allow is None:
            return super().image_choices()
        groups = set(self.user_groups())
        names = [i.name for i in allow.available_to(groups)]
        first = self._default_image(allow, groups)
        if first is not None and first.name in names:
            names.remove(first.name)
            names.insert(0, first.name)
        return names

    def image_argv(self, resolved: Resolved) -> list[str]:
        """``apptainer exec ... IMAGE`` for this request, or [] to run on the host.

        Raises HTTP 400 (naming the allowed images) for an image not open to the user.
        """
        allow = self.allow_list()
        if allow is None:
            return []
        groups = set(self.user_groups())
        name = resolved.request.image
        if name is None:
            image = self._default_image(allow, groups)
            if image is None:
                return []
            name = image.name
        try:
            return allow.argv(name, groups)
        except ImageError as e:
            raise self.portal_error(e) from None

    def validate_request(self, options: Any) -> Resolved:
        resolved = super().validate_request(options)
        self.image_argv(resolved)  # an image that cannot run is refused now, not in start
        if not self.job_id:  # a running job keeps its site
            self.job_site = resolved.partition.site or ""
        return resolved

    _hidden_sites: frozenset[str] = frozenset()

    def partitions(self) -> list[Any]:
        return [p for p in super().partitions() if p.site not in self._hidden_sites]

    @default("options_form")
    def _default_slurm_options_form(self) -> Any:
        base = PortalSpawnerMixin._default_options_form(self)

        def form(spawner: SlurmGPUSpawner) -> Any:
            if not spawner.site.sites or not callable(base):
                return base(spawner) if callable(base) else base
            return sites_form(spawner)  # JupyterHub awaits it

        async def sites_form(spawner: SlurmGPUSpawner) -> str:
            site = spawner.site
            from .sites import refresh_states

            states = await refresh_states(
                site, spawner._site_pollers(), max_age=spawner.scheduler_poll_interval
            )
            down = frozenset(n for n, st in states.items() if not st.reachable)
            spawner._hidden_sites = down
            try:
                html = str(base(spawner))
            finally:
                spawner._hidden_sites = frozenset()
            items = []
            for cs in site.sites:
                what = "cannot be reached now; not offered" if cs.name in down else "open"
                items.append(f"<li>{escape(cs.name)} ({cs.country}): {what}</li>")
            note = (
                "<div class='sp-sites'><p>Sites. A request without a partition is placed "
                "by your residency rules, then by queue, price and carbon.</p><ul>"
                + "".join(items)
                + "</ul><label><input type='checkbox' name='placement' value='auto' checked> "
                "Let the portal choose the site for this size (your residency rules first, "
                "then the shortest queue)</label></div>"
            )
            return note + html

        return form

    def options_from_form(self, formdata: Any) -> dict[str, Any]:
        """The form's fields; with ``placement=auto`` (the sites' checkbox) the partition
        of the chosen size is left to placement (:meth:`place_request`)."""
        data = dict(formdata)
        auto = data.pop("placement", None)
        if auto is not None and list(auto) != ["auto"]:
            raise self.portal_error(
                RequestRefused("placement must be 'auto' or absent", field="placement")
            )
        out = super().options_from_form(data)
        if auto is not None and self.site.sites:
            out.pop("partition", None)
        return out

    @default("apply_user_options")
    def _default_apply_user_options(self) -> Any:
        async def apply(spawner: SlurmGPUSpawner, options: Any) -> None:
            spawner.validate_request(options)
            await spawner.place_request(options)

        return apply

    async def place_request(self, options: Any) -> Resolved:
        """With several [[sites]], place a request that names no partition
        (:func:`..placement.place`: residency rules, then the user's choice, then the sites'
        states from one fresh poll each) and pin the choice into ``user_options``, so
        admission, the ledger and start all see the placed partition. Before the hub's
        pre-spawn hooks (``apply_user_options`` runs first)."""
        from ..placement import Need, PlacementRefused, place, residency_rules
        from ..request import resolve
        from .sites import refresh_states

        resolved = self.validate_request(options)
        site = self.site
        if not site.sites or (isinstance(options, dict) and options.get("partition")):
            return resolved
        req = resolved.request
        fits = set()
        for p in self.partitions():
            with contextlib.suppress(Exception):
                resolve(site, req, default_partition=p.name)
                fits.add(p.name)
        groups = self.user_groups()
        states = await refresh_states(
            site, self._site_pollers(), max_age=self.scheduler_poll_interval
        )
        size = resolved.size
        try:
            placed = place(
                site,
                Need(max(1, size.devices_per_node * size.nodes), frozenset(fits)),
                residency_rules(groups, self.residency),
                states,
                groups=groups,
            )
        except PlacementRefused as e:
            raise self.portal_error(e) from None
        self.placement_why = placed.why
        self.log.info("Placed %s: %s", self._label, placed.why)
        self.user_options = {**dict(options), "partition": placed.partition}
        return self.validate_request(self.user_options)

    def _user_dir(self, d: str) -> None:
        """Make ``d`` (below the home) a 0700 directory of the user; never follows a link.

        A directory outside the home is the operator's to create: it is left alone.
        """
        pw = self._pw()
        try:
            parts = below_home(pw.pw_dir, d)
        except ValueError:
            return
        try:
            with user_dir(pw.pw_dir, parts, pw.pw_uid, pw.pw_gid):
                pass
        except UserFileError as e:
            raise _user_error(str(e), reason="unsafe_user_dir", status=409) from None

    def _write_token(self, path: str) -> None:
        """Write the API token to ``path``: new, 0600, owned by the user, in a 0700 directory
        below the home, each directory opened without following links (:mod:`.userfiles`)."""
        pw = self._pw()
        directory, _, name = path.rpartition("/")
        try:
            write_secret(pw.pw_dir, directory, name, self.api_token.encode(), pw.pw_uid, pw.pw_gid)
        except ValueError:
            raise _user_error(
                "The portal is misconfigured: the token directory is not below your home.",
                reason="bad_config",
                log_message=f"token_dir_template gives {directory!r}, not below {pw.pw_dir!r}",
            ) from None
        except UserFileError as e:
            raise _user_error(str(e), reason="unsafe_user_dir", status=409) from None

    def _remove_token(self, path: str) -> None:
        directory, _, name = path.rpartition("/")
        with contextlib.suppress(OSError, KeyError):
            remove_file(pwd.getpwnam(self.unix_user).pw_dir, directory, name)

    async def _available(self, resolved: Resolved) -> str:
        part = resolved.partition.scheduler_partition
        try:
            nodes = await self.scheduler.nodes(part)
        except (SchedulerError, TimeoutError, OSError):
            return f"Slurm partition {part!r} did not say what it has"
        gres = sorted({g for n in nodes.values() for g in n.gres})
        return f"Slurm partition {part!r} has: {', '.join(gres) or 'no GPUs'}"

    async def start(self) -> tuple[str, int]:
        self.account()  # a system account is refused before anything else happens
        resolved = self.validate_request(self.user_options or {})
        if resolved.partition.backend != "slurm":
            raise self.portal_error(
                RequestRefused(
                    f"partition {resolved.partition.name!r} is not a Slurm one",
                    reason="wrong_backend",
                    field="partition",
                )
            )
        self._events = []
        if self.placement_why:
            self._event(5, f"Placed: {self.placement_why}")
        self._starting = True
        self.stop_reason = ""
        try:
            return await self._start(resolved)
        finally:
            self._starting = False

    async def _start(self, resolved: Resolved) -> tuple[str, int]:
        pw = self._pw()
        tag = _make_tag(self._key(), secrets.token_hex(6))
        spec, _, script = self.render_job(resolved, tag, self.get_env())
        self._user_dir(str(Path(spec.output).parent))
        self._write_token(spec.token_file)
        TRACKED_TAGS.add(tag)
        self._event(
            10,
            f"Submitting {resolved.size.label} on {resolved.partition.name} "
            f"({resolved.partition.jurisdiction.country}), {resolved.walltime_minutes} min",
        )
        try:
            job_id = await self.scheduler.submit(script, user=self.unix_user, cwd=pw.pw_dir)
        except SchedulerError as e:  # sbatch's exit, or a site's slurmrestd refusal
            TRACKED_TAGS.discard(tag)
            self._remove_token(spec.token_file)
            self.log.error("sbatch for %s failed: %s", self._label, e)
            if isinstance(e, SchedulerUnavailable):  # sbatch hung: the job may exist
                await self._cancel_tagged(tag)
                raise _user_error(
                    "Slurm did not answer in time, so no server was started. Try again in "
                    "a minute; if it keeps happening, tell the site's operators.",
                    reason="scheduler_unavailable",
                    log_message=str(e),
                    status=503,
                ) from None
            stderr = e.stderr if isinstance(e, SlurmError) else str(e)
            if "configuration is not available" in stderr or "Invalid" in stderr:
                have = await self._available(resolved)
                raise _user_error(
                    f"Slurm can never run {resolved.size.label} on {resolved.partition.name}. "
                    f"{have}. Choose another size.",
                    reason="unsatisfiable",
                    log_message=str(e),
                    status=400,
                ) from None
            raise _user_error(
                f"Slurm refused the job: {stderr.strip()[:300]}", reason="sbatch_failed"
            ) from None
        self.job_id = job_id
        self.job_tag = tag
        self.poller.track(self.job_id, hurry=True)
        self._schedule_sweep()
        self._event(20, f"Submitted as Slurm job {self.job_id}; waiting in the queue")
        try:
            host, port = await self._wait_running(resolved)
            self.job_host = host
            await self._wait_listening(host, port)
        except BaseException:
            await self._cancel()
            self._remove_token(spec.token_file)
            raise
        finally:
            self.poller.calm(self.job_id)
        self.poller.watch(self.job_id, self._job_ended)
        return host, port

    async def _cancel_tagged(self, tag: str) -> None:
        """Cancel the job carrying ``tag``, if a submission that got no answer made one."""
        try:
            found = await self.scheduler.query(name=JOB_NAME)
            ids = [j.job_id for j in found.values() if j.active and comment_tag(j.comment) == tag]
            if ids:
                self.log.warning(
                    "sbatch for %s made job %s after all: cancelling", self._label, ids
                )
                await self.scheduler.cancel(ids, user=self.unix_user)
        except (SchedulerError, TimeoutError, OSError) as e:
            self.log.warning(
                "Could not look for a job of %s's unanswered sbatch (%s): if one exists, it "
                "has no token and runs until its walltime or the next hub start's sweep",
                self._label,
                e,
            )

    async def _wait_listening(self, host: str, port: int) -> None:
        """Return once the server accepts TCP connections (or the job ends, or timeout).

        JupyterHub's HTTP check backs off 0.2, 0.4, 0.8, 1.6 s...; a server that starts
        listening just after one try waits for the next. Probing here every
        ``connect_poll_interval`` lets the hub's first try succeed.
        """
        deadline = time.monotonic() + self.http_timeout
        while time.monotonic() < deadline:
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1)
            except (OSError, TimeoutError):
                info = self.poller.info(self.job_id)
                if info is not None and info.ended:
                    return  # _wait_running's checks did not see it end; the hub's will
                await asyncio.sleep(self.connect_poll_interval)
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            self.log.info("Server %s: accepting connections on %s:%d", self._label, host, port)
            return

    async def _wait_running(self, resolved: Resolved) -> tuple[str, int]:
        last = ""
        node_seen = ""
        while True:
            await self.poller.wait_change(self.scheduler_fast_interval * 4)
            info = self.poller.info(self.job_id)
            if info is None:
                continue
            if info.ended:
                why = FINAL_STATES.get(info.state) or (
                    "its processes are being stopped" if info.active else info.reason
                )
                raise _user_error(
                    f"Your Slurm job {self.job_id} ended before the server started: {why}. "
                    f"Its log is in {self._output(self._pw().pw_dir)}.",
                    reason="job_ended",
                    log_message=f"job {self.job_id} state {info.state} reason {info.reason}",
                )
            if info.state == "PENDING":
                if info.reason in NEVER_REASONS or info.reason.startswith("ReqNodeNotAvail"):
                    have = await self._available(resolved)
                    raise _user_error(
                        f"Slurm can never run {resolved.size.label} on "
                        f"{resolved.partition.name} ({info.reason}). {have}.",
                        reason="unsatisfiable",
                        status=400,
                    )
                from .accounting import reason_text

                msg = f"Queued in {resolved.partition.name}: {reason_text(info.reason)}"
                if info.start_estimate:
                    msg += f", expected to start at {info.start_estimate}"
                if msg != last:
                    self._event(30, msg)
                    last = msg
                continue
            if info.nodes and info.nodes != node_seen:
                node_seen = info.nodes
                self._event(60, f"Starting on node {info.nodes}")
                # Look the node's address up while the job starts, not after.
                addr = asyncio.ensure_future(self._node_addr(info.nodes.split(",")[0]))
                addr.add_done_callback(lambda f: f.cancelled() or f.exception())
            port = comment_port(info.comment, self.job_tag)
            if port is not None and info.state == "RUNNING":
                host = await self._node_addr(info.nodes.split(",")[0])
                self._event(80, f"Server listening on {info.nodes}:{port}; connecting")
                return host, port

    async def _node_addr(self, node: str) -> str:
        key = f"{self.job_site}/{node}"  # node names are a site's own
        if key not in _NODE_ADDR:
            for name, n in (await self.scheduler.nodes()).items():
                _NODE_ADDR[f"{self.job_site}/{name}"] = n.addr
        return _NODE_ADDR.get(key, node)

    def _job_ended(self, info: JobInfo) -> None:
        """The shared poll saw this server's job end: tell the hub now, not at its next poll.

        Only while the hub polls this server (between JupyterHub's public
        ``start_polling`` and ``stop_polling``) and no start or stop is in progress: those
        handle the end themselves.
        """
        if self.pending == "stop":
            return  # a stop in progress: stop() waits for the job itself
        self._note_end(info)
        if self._hub_polls and not self.pending:
            self._notify = asyncio.ensure_future(self.poll_and_notify())

    def start_polling(self) -> None:
        super().start_polling()
        self._hub_polls = self.poll_interval > 0  # JupyterHub does not poll at 0

    def stop_polling(self) -> None:
        self._hub_polls = False
        super().stop_polling()

    # -- running ---------------------------------------------------------------------------------
    async def poll(self) -> int | None:
        if not self.job_id:
            return 0
        info = self.poller.info(self.job_id)
        if info is None:
            # Not known yet (a hub restart): one shared query, joined by every spawner.
            await self.poller.refresh()
            info = self.poller.info(self.job_id)
        if info is None or not info.ended:
            return None  # running, or unknown: never "stopped" without an answer
        self._note_end(info)
        return 1

    def _note_end(self, info: JobInfo) -> None:
        reason = self._log_end(self._label, self.job_id, info, self.stop_reason)
        self.stop_reason = reason

    def _log_end(self, name: str, job_id: str, info: JobInfo, last: str = "") -> str:
        """Log why a server's job ended (once per reason); COMPLETING is not final yet."""
        if info.active:  # COMPLETING: Slurm is stopping its processes; the state comes later
            reason = f"Slurm job {job_id}: completing (its processes are being stopped)"
        else:
            why = "the job no longer exists" if info is GONE else FINAL_STATES.get(info.state)
            reason = f"Slurm job {job_id}: {info.state.lower()} ({why or info.reason})"
        if reason != last:
            self.log.warning("Server %s stopped: %s", name, reason)
        return reason

    async def _cancel(self) -> None:
        if not self.job_id:
            return
        try:
            await self.scheduler.cancel([self.job_id], user=self.unix_user)
        except (SchedulerError, TimeoutError, OSError) as e:  # an ended job is no error
            self.log.warning("scancel %s failed: %s", self.job_id, e)

    async def stop(self, now: bool = False) -> None:
        if not self.job_id:
            return
        known = self.poller.info(self.job_id)
        if known is not None and known.ended:
            # Slurm already said the job ended or is ending: nothing to cancel. A COMPLETING
            # job is followed to its final state (clear_state), which is logged.
            return
        self.poller.track(self.job_id, hurry=True)
        await self._cancel()
        deadline = time.monotonic() + self.stop_wait_timeout
        try:
            while time.monotonic() < deadline:
                info = self.poller.info(self.job_id)
                if info is not None and not info.active:
                    return
                await self.poller.wait_change(self.scheduler_fast_interval * 4)
            self.log.warning("Slurm job %s still listed after scancel", self.job_id)
        finally:
            self.poller.calm(self.job_id)

    async def progress(self) -> AsyncIterator[dict[str, Any]]:
        sent = 0
        while True:
            events = getattr(self, "_events", [])
            while sent < len(events):
                yield events[sent]
                sent += 1
            if not self._starting and sent >= len(events):
                break
            await asyncio.sleep(0.2)

    # -- untracked portal jobs ------------------------------------------------------------------
    def _schedule_sweep(self) -> None:
        from .sweep import schedule_sweep

        schedule_sweep(self)

    def _sweep_targets(self) -> list[tuple[str, SchedulerClient, JobPoller]]:
        """(site, client, poller) of every cluster the sweep looks at: each [[sites]] entry
        through its own client (CLI or slurmrestd), else the hub host's cluster ("")."""
        if not self.site.sites:
            return [("", self.scheduler, self.poller)]
        from .sites import client_for

        pollers = self._site_pollers()
        return [
            (cs.name, client_for(cs, self.submit_prefix), pollers[cs.name])
            for cs in self.site.sites
        ]

    async def sweep_orphans(self) -> list[str]:
        """Report and cancel active jobs tagged by this hub that no server tracks, at every
        site (one batched query per site, all sites at once; a site that does not answer
        is skipped and said so: nothing there is cancelled on a guess).

        A job is cancelled only if its comment carries a tag signed with this hub's key,
        no spawner in this process tracks that tag or job id at that site (re-adopted,
        running, or being started right now), and its owner is a plain Unix user name that
        is not a system account (:class:`~..accounts.UnixAccountPolicy`): ``scancel``
        never runs as one. Returns the ids; :attr:`swept` has them by site.
        """
        targets = self._sweep_targets()
        results = await asyncio.gather(
            *(self._sweep_site(site, client, poller) for site, client, poller in targets),
            return_exceptions=True,
        )
        self.swept: dict[str, list[str]] = {}
        for (site, _, _), res in zip(targets, results, strict=True):
            if isinstance(res, BaseException):
                if isinstance(res, asyncio.CancelledError):
                    raise res
                self.log.warning(
                    "Orphan sweep%s: the scheduler did not answer (%s); nothing cancelled there",
                    f" at site {site}" if site else "",
                    res,
                )
                continue
            self.swept[site] = res
        return [j for ids in self.swept.values() for j in ids]

    async def _sweep_site(self, site: str, client: SchedulerClient, poller: JobPoller) -> list[str]:
        where = f" at site {site}" if site else ""
        found = await client.query(name=JOB_NAME)
        key = self._key()
        policy = UnixAccountPolicy(parent=self)
        seen, cancelled = 0, []
        for job in found.values():
            if not job.active:
                continue
            job_id, user, comment = job.job_id, job.user, job.comment
            tag = comment_tag(comment)
            if tag is None or not tag_is_ours(key, tag):
                continue
            seen += 1
            if tag in TRACKED_TAGS or job_id in poller.tracked:
                continue
            if not job_id.isdigit() or not valid_unix_user(user):
                self.log.warning("Not touching portal job %r of %r: odd id or user", job_id, user)
                continue
            why = policy.refusal(user)
            if why is not None:
                self.log.error(
                    "Untracked portal job %s%s runs as system account %s (%s): not cancelling "
                    "it as that account; an operator must look at it",
                    job_id,
                    where,
                    user,
                    why,
                )
                continue
            self.log.warning(
                "Untracked portal job %s%s of %s (tag %s): no server of this hub tracks it; "
                "cancelling it",
                job_id,
                where,
                user,
                tag,
            )
            try:
                await client.cancel([job_id], user=user)
                cancelled.append(job_id)
            except (SchedulerError, TimeoutError, OSError) as e:
                self.log.warning("scancel of untracked job %s%s failed: %s", job_id, where, e)
        self.log.info(
            "Orphan sweep%s: %d active portal job(s) of this hub, %d untracked, cancelled %s",
            where,
            seen,
            len(cancelled),
            cancelled or "none",
        )
        return cancelled
