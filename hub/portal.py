"""The portal's JupyterHub configuration, as one function an operator's config can call.

``jupyterhub_config.py``::

    from sovereign_portal.hub.portal import configure
    configure(c, state_dir="/srv/portal", site_file="/etc/sovereign-portal/site.toml")

It sets the sovereign defaults (loopback binds, SQLite in the state directory for both
JupyterHub's database and the portal's own, ``portal.sqlite``, a 0600
cookie secret, no outside requests from JupyterLab), the local backend, and the portal
service that admits compute sessions (Dask, torch) from notebooks. The spawner and the
service share one device lease file, ``<state_dir>/device-leases.json``, so a notebook
server and a compute session never get the same GPU or MIG slice. An operator's own
settings after the call win.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("sovereign_portal")

DEV_LOGIN_BANNER = (
    "DEVELOPMENT LOGIN — any user name, no password check. "
    "Not for production: run `sovereign-portal up` without --dev-login to sign in "
    "through the institutional IdP."
)


def configure(
    c: Any,
    state_dir: str,
    site_file: str = "",
    ip: str = "127.0.0.1",
    port: int = 8000,
    hub_port: int = 8081,
    proxy_api_port: int = 8001,
    auth: str = "idp",
    idp: dict[str, Any] | None = None,
    service_port: int = 10101,
    default_role: str = "student",
    inventory_source: str = "auto",
    residency: dict[str, list[str]] | None = None,
    budgets: dict[str, Any] | None = None,
    shorten_walltime: bool = False,
    courses: dict[str, Any] | None = None,
) -> None:
    """Configure JupyterHub's config object ``c`` as a sovereign portal.

    ``service_port`` is the loopback port of the portal service (compute-session
    admission); ``default_role`` is the portal role of a user whose login carries none;
    ``idp`` holds ``issuer``, ``client_id``, ``client_secret_file``, the required
    ``allowed_organisations`` (there is no default: production names its institutions) and
    an optional ``support_contact``;
    ``inventory_source`` ("auto", "nvml" or "declared") is where the spawner and the
    service both take the box's devices from; ``residency`` maps a group to the countries
    its work may run in, for notebooks and sessions alike. ``budgets`` is
    ``{"periods": {...}, "budgets": [...]}`` (see ``BudgetPolicy``): checked and held at
    every spawn and grant; ``shorten_walltime`` shortens a request to what is left instead
    of refusing it. ``courses`` holds ``CoursePolicy`` options (who may create courses, the
    limits, the data root, the image allow-list), for the hub and the portal service.
    """
    from .service import configure_hub

    state = Path(state_dir)
    leases = str(state / "device-leases.json")
    c.JupyterHub.ip = ip
    c.JupyterHub.port = port
    c.JupyterHub.hub_ip = "127.0.0.1"
    c.JupyterHub.hub_port = hub_port
    c.ConfigurableHTTPProxy.api_url = f"http://127.0.0.1:{proxy_api_port}"
    c.ConfigurableHTTPProxy.pid_file = str(state / "proxy.pid")
    c.JupyterHub.db_url = f"sqlite:///{state / 'jupyterhub.sqlite'}"
    # the hub's own database in WAL mode: its commits run in the hub's event loop
    from .store import sqlite_file_in_wal

    sqlite_file_in_wal(state / "jupyterhub.sqlite")
    # The portal's own records (account bindings, audit log, ledger): SQLite in WAL mode.
    c.PortalDatabase.url = f"sqlite:///{state / 'portal.sqlite'}"
    c.JupyterHub.cookie_secret_file = str(state / "jupyterhub_cookie_secret")
    c.JupyterHub.pid_file = str(state / "jupyterhub.pid")
    c.JupyterHub.cleanup_servers = True
    c.JupyterHub.spawner_class = "local-gpu"
    c.LocalGPUSpawner.site_file = site_file
    c.LocalGPUSpawner.home_dir_template = str(state / "home" / "{username}")
    c.LocalGPUSpawner.default_url = "/lab"
    c.LocalGPUSpawner.lease_file = leases
    c.LocalGPUSpawner.inventory_source = inventory_source
    c.LocalGPUSpawner.residency = dict(residency or {})
    c.Spawner.start_timeout = 120
    # A storm is a queue, not a failure (issue 12): the portal's start queue
    # (spawners/start_queue.py, PortalSpawnerMixin.start_slots) is the throttle, with a
    # place in line on the spawn page; JupyterHub's own limit is only a far ceiling, so
    # the hub never answers a class with 429.
    from sovereign_portal.spawners.start_queue import HUB_SPAWN_CEILING

    c.JupyterHub.concurrent_spawn_limit = HUB_SPAWN_CEILING
    # EGRESS_LOG: an egress audit guard's log (acceptance runs) reaches the servers too.
    c.Spawner.env_keep = [
        "PATH",
        "PYTHONPATH",
        "VIRTUAL_ENV",
        "LANG",
        "LC_ALL",
        "JUPYTERHUB_SINGLEUSER_APP",
        "EGRESS_LOG",
    ]

    # The portal service: catalog and admission of compute sessions, on the same leases.
    svc = configure_hub(
        c,
        site_file or None,
        port=service_port,
        lease_file=leases,
        default_role=default_role,
        inventory_source=inventory_source,
        residency=residency,
        db_url=c.PortalDatabase.url,
        budgets=budgets,
        shorten_walltime=shorten_walltime,
    )
    # Budgets on the spawn path, from the hub side: check and hold before anything starts.
    from .budget_store import SpawnBudgetGate

    if budgets:
        c.BudgetPolicy.periods = dict(budgets.get("periods", {}))
        c.BudgetPolicy.budgets = list(budgets.get("budgets", []))
    c.BudgetPolicy.shorten_walltime = shorten_walltime
    gate = SpawnBudgetGate(c.Spawner.get("pre_spawn_hook"), c.Spawner.get("post_stop_hook"))
    c.Spawner.pre_spawn_hook = gate.pre_spawn_hook
    c.Spawner.post_stop_hook = gate.post_stop_hook
    c.Spawner.budget_display = gate.display  # the remaining budget on the spawn form
    # every refused spawn (policy, course, budget) counts for /hub/metrics (hub/metrics.py)
    from .metrics import spawn_refusal

    c.Spawner.refusal_hook = spawn_refusal
    # the job-script preview names the --account of the budget a spawn would charge
    c.SlurmGPUSpawner.budget_charge = gate.charge_to
    # Courses (issue 12): the course's sizes and image on the form and at every spawn.
    from .course_store import install as install_courses

    install_courses(c, svc, courses)
    # The ledger (issue 10), around the budget gate: a record opens once the budget has
    # admitted the spawn, and closes before the gate releases what was not used.
    from .ledger_hub import install as install_ledger

    install_ledger(c)
    # The course data folder (issue 12): its ACL set and linked in every course server.
    from .course_data import install as install_course_data

    install_course_data(c)
    # GDPR (issue 11): "Download my data" at /hub/usage/export; the pseudonym key and the
    # logs `sovereign-portal gdpr erase` scrubs live in the state directory.
    from .gdpr_pages import HANDLERS as GDPR_HANDLERS

    c.JupyterHub.extra_handlers = [*c.JupyterHub.get("extra_handlers", []), *GDPR_HANDLERS]
    c.GDPRPolicy.pseudonym_key_file = str(state / "gdpr-pseudonym.key")
    c.GDPRPolicy.log_files = [str(state / "*.log")]
    # Usage pages (/hub/usage...) and the portal's figures on the hub's /hub/metrics.
    from . import course_pages, metrics, usage_pages

    usage_pages.install(c)
    course_pages.install(c)  # the instructor's pages: /hub/courses... (issue 12)
    from .class_start_hub import install as install_class_hub

    install_class_hub(c, svc["name"])  # the hub's routes for the class starts (issue 12)
    metrics.install(c)

    if auth == "dev":
        c.JupyterHub.authenticator_class = "dummy"
        c.Authenticator.allow_all = True
        c.JupyterHub.template_vars = {"announcement_login": DEV_LOGIN_BANNER}
        log.warning(DEV_LOGIN_BANNER)
    elif auth == "idp":
        if not idp:
            raise ValueError("auth='idp' needs the IdP's issuer, client id and secret file")
        c.JupyterHub.authenticator_class = "institutional"
        a = c.InstitutionalAuthenticator
        a.oidc_issuer = idp["issuer"]
        a.client_id = idp["client_id"]
        a.client_secret_file = idp["client_secret_file"]
        a.oauth_callback_url = f"http://{ip}:{port}/hub/oauth_callback"
        orgs = idp.get("allowed_organisations")
        if not orgs or isinstance(orgs, str):
            raise ValueError(
                "configure(auth='idp'): idp['allowed_organisations'] must list the home "
                "organisations whose members may log in, e.g. "
                "idp={..., 'allowed_organisations': ['uni-a.example']} "
                "nobody can log in without it"
            )
        a.allowed_organisations = {str(o) for o in orgs}
        if idp.get("support_contact"):
            a.support_contact = str(idp["support_contact"])
    else:
        raise ValueError(f"auth must be 'idp' or 'dev', got {auth!r}")
