"""``sovereign-portal gdpr export|erase|retention`` (issue 11; the model is :mod:`.gdpr`).

- ``export USER``: one JSON archive (docs/reference/gdpr-export.md) of everything the portal
  holds about USER: the portal database's rows, JupyterHub's rows (no secrets) and the list
  of the portal's files in their home;
- ``erase USER``: stops the user's servers (hub REST API) and compute sessions (their Slurm
  jobs, by the open ledger records), deletes the hub user (tokens, auth state, groups and
  roles go with it), erases the portal database's rows (:func:`.gdpr.erase_portal`),
  deletes ``~/.sovereign-portal``, replaces the names in the portal's log files, compacts
  the SQLite files, and prints a receipt;
- ``retention``: applies ``GDPRPolicy.ledger_retention_days``.

Every command reads the hub's ``jupyterhub_config.py`` (``--config``) for the databases,
the key file, the log files and the homes. The hub API token (``admin:users``,
``admin:servers`` and ``read:users`` scopes) comes from ``JUPYTERHUB_API_TOKEN``, never
from the command line.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import pwd
import shutil
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .cli import CLIError, _actor, _printable

TOKEN_ENV = "JUPYTERHUB_API_TOKEN"  # noqa: S105 - the name of the variable
#: What the erase's token must be allowed (unfiltered): an operator's.
NEEDED_SCOPES = frozenset({"admin:users", "admin:servers"})


class HubConfig:
    """The parts of the hub's config the GDPR commands use."""

    def __init__(self, args: argparse.Namespace) -> None:
        from traitlets.config import Config
        from traitlets.config.loader import PyFileConfigLoader

        self.config: Any = Config()
        self.dir = Path.cwd()
        if args.config:
            path = Path(args.config).resolve()
            try:
                self.config = PyFileConfigLoader(path.name, str(path.parent)).load_config()
            except Exception as e:
                raise CLIError(f"--config: cannot load {path}: {type(e).__name__}: {e}") from None
            self.dir = path.parent
        from .gdpr import GDPRPolicy

        self.policy = GDPRPolicy(config=self.config)
        self.portal_url = self._url(args.db or self._get("PortalDatabase", "url", ""))
        if not self.portal_url:
            raise CLIError("--db: give the portal database's URL, or the hub's --config")
        self.hub_db_url = self._url(
            getattr(args, "hub_db", None) or self._get("JupyterHub", "db_url", "")
        )
        self.key_file = self._path(self.policy.pseudonym_key_file)
        ip = self._get("JupyterHub", "hub_ip", "127.0.0.1") or "127.0.0.1"
        port = self._get("JupyterHub", "hub_port", 8081)
        self.hub_api = getattr(args, "hub_api", None) or f"http://{ip}:{port}/hub/api"
        self.home_template = str(self._get("LocalGPUSpawner", "home_dir_template", ""))
        spawner = str(self._get("JupyterHub", "spawner_class", ""))
        #: on Slurm a user's home is their Unix account's (SlurmGPUSpawner.unix_user_template)
        self.unix_user_template = (
            str(self._get("SlurmGPUSpawner", "unix_user_template", "{username}"))
            if spawner == "slurm-gpu" or spawner.endswith("SlurmGPUSpawner")
            else ""
        )

    def _get(self, section: str, name: str, default: Any) -> Any:
        sec = self.config.get(section, {})
        return sec.get(name, default)

    def _path(self, p: str) -> Path:
        q = Path(p)
        return q if q.is_absolute() else self.dir / q

    def _url(self, url: str) -> str:
        from .gdpr import sqlite_path

        db = sqlite_path(url) if url else None
        if db is not None and not db.is_absolute():
            return f"sqlite:///{self.dir / db}"
        return url

    def home(self, username: str, override: str | None) -> Path | None:
        if override:
            return Path(override)
        if self.home_template:
            return Path(self.home_template.format(username=username))
        if self.unix_user_template:
            from sovereign_portal.spawners.slurm.spawner import unix_user_name

            try:
                return Path(pwd.getpwnam(unix_user_name(self.unix_user_template, username)).pw_dir)
            except KeyError:
                return None
        return None

    def log_files(self) -> list[Path]:
        out: list[Path] = []
        for pattern in self.policy.log_files:
            out += [Path(p) for p in sorted(glob.glob(str(self._path(pattern))))]
        return out


def _store(url: str) -> Any:
    from .cli import _portal_store

    return _portal_store(url, "account_bindings", "portal tables (the hub creates them)")


def _user(value: str) -> str:
    from .accounts import AccountError, check_username

    try:
        return check_username(value, "USER")
    except AccountError as e:
        raise CLIError(str(e)) from None


def build_export(cfg: HubConfig, username: str, home: str | None) -> dict[str, Any]:
    from . import gdpr

    store = _store(cfg.portal_url)
    try:
        portal = gdpr.export_portal(store, username)
    finally:
        store.dispose()
    hub = None
    hub_file = gdpr.sqlite_path(cfg.hub_db_url) if cfg.hub_db_url else None
    if cfg.hub_db_url and (hub_file is None or hub_file.exists()):
        from sqlalchemy import create_engine

        engine = create_engine(cfg.hub_db_url)
        try:
            with engine.connect() as conn:
                hub = gdpr.export_hub_db(conn, username)
        finally:
            engine.dispose()
    if hub is None and not any(portal.values()):
        raise CLIError(f"USER: the portal holds nothing about {username!r} (no such user)")
    return gdpr.archive(
        username, portal=portal, hub=hub, files=gdpr.portal_files(cfg.home(username, home))
    )


def _cmd_export(args: argparse.Namespace) -> int:
    username = _user(args.user)
    cfg = HubConfig(args)
    data = build_export(cfg, username, args.home)
    text = json.dumps(data, indent=1, ensure_ascii=False) + "\n"
    if args.output:
        fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        print(f"gdpr export: {username}: written to {args.output} (mode 0600)", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


# -- erase -------------------------------------------------------------------------------------
class Hub:
    """The hub's REST API with the operator's token (never printed)."""

    def __init__(self, api: str, token: str) -> None:
        self.api, self.token = api.rstrip("/"), token

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        import urllib.error
        import urllib.request

        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.api + path, data=data, method=method)  # noqa: S310
        req.add_header("Authorization", f"token {self.token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:  # noqa: S310
                raw = resp.read()
                return resp.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as e:
            return e.code, None
        except OSError as e:
            raise CLIError(f"--hub-api: cannot reach the hub at {self.api}: {e}") from None

    def user_path(self, username: str) -> str:
        return "/users/" + quote(username, safe="")


def _stop_servers(hub: Hub, username: str, timeout: float = 120) -> list[str]:
    path = hub.user_path(username)
    status, model = hub.call("GET", path)
    if status == 404 or model is None:
        return []
    names = sorted((model.get("servers") or {}).keys())
    for name in names:
        sp = f"{path}/server" if name == "" else f"{path}/servers/{quote(name, safe='')}"
        status, _ = hub.call("DELETE", sp)
        if status not in (202, 204, 404):
            raise CLIError(f"USER: the hub refused to stop server {name!r} ({status})")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, model = hub.call("GET", path)
        if status == 404 or not (model or {}).get("servers"):
            return names
        time.sleep(0.5)
    raise CLIError(f"USER: the servers of {username!r} did not stop in {timeout:.0f}s")


def _stop_sessions(store: Any, username: str, sites: Any = None) -> list[dict[str, Any]]:
    """Cancel the Slurm jobs of the user's open records and close the records, per site:
    a record of a declared site (``sites``: the site file's Site) is cancelled through that
    site's own client (its CLI, or its slurmrestd), never the hub host's CLI."""
    from sovereign_portal.spawners.slurm.client import SchedulerError, SlurmCLI
    from sovereign_portal.spawners.slurm.sites import site_client

    from . import gdpr
    from .ledger_store import LedgerStore

    declared = {cs.name: cs for cs in (sites.sites if sites is not None else [])}
    ledger = LedgerStore(store)
    by_site: dict[str, dict[str, Any]] = {}
    for rec in gdpr.open_records(store, username):
        site = by_site.setdefault(rec.site or "local", {"site": rec.site or "local", "jobs": []})
        if rec.job_ids:
            cs = declared.get(rec.site)
            try:
                client = site_client(cs) if cs is not None else SlurmCLI()
                asyncio.run(client.cancel(list(rec.job_ids)))
            except (SchedulerError, OSError) as e:
                site.setdefault("errors", []).append(f"cancel {','.join(rec.job_ids)}: {e}")
            site["jobs"] += list(rec.job_ids)
        ledger.close(rec.id, reason="stopped")
        site["records_closed"] = site.get("records_closed", 0) + 1
    return list(by_site.values())


def _site_file(args: argparse.Namespace, cfg: HubConfig) -> Any:
    """The site file's Site when it declares [[sites]] (``--site``, else the hub config's
    SlurmGPUSpawner.site_file), else None."""
    from sovereign_portal.spawners.site import SiteError, load_site

    path = getattr(args, "site", None) or cfg._get("SlurmGPUSpawner", "site_file", "")
    if not path:
        return None
    try:
        site = load_site(cfg._path(str(path)))
    except (SiteError, OSError) as e:
        raise CLIError(f"--site: {e}") from None
    return site if site.sites else None


def site_receipt(
    sites: Any, stopped: list[dict[str, Any]], records: list[Any], home: Path | None
) -> list[dict[str, Any]]:
    """Per declared site, what the erase touched there: its jobs cancelled and records
    closed (``stopped``), the user's ledger records that ran there (pseudonymised with the
    rest), and the job logs of that site in ~/.sovereign-portal (their names carry the
    site: ``slurm-<site>-<job>.log``), which the erase then deletes."""
    logs = home / ".sovereign-portal" if home is not None else None
    out = []
    for cs in sites.sites:
        done = next((s for s in stopped if s["site"] == cs.name), {})
        files = (
            sorted(
                str(p.relative_to(home))
                for p in logs.rglob(f"*-{cs.name}-*")
                if p.is_file() and home is not None
            )
            if logs is not None and logs.is_dir()
            else []
        )
        out.append(
            {
                "site": cs.name,
                "country": cs.country,
                "operator": cs.operator,
                "transport": cs.scheduler.transport,
                "jobs_cancelled": list(done.get("jobs", [])),
                "records_closed": int(done.get("records_closed", 0)),
                "errors": list(done.get("errors", [])),
                "ledger_records_pseudonymised": sum(1 for r in records if r.site == cs.name),
                "job_logs_deleted": [f"~/{f}" for f in files],
            }
        )
    return out


def _cmd_erase(args: argparse.Namespace) -> int:
    from . import gdpr

    username = _user(args.user)
    cfg = HubConfig(args)
    token = os.environ.get(TOKEN_ENV, "")
    if not token:
        raise CLIError(
            f"{TOKEN_ENV}: set it to a hub API token with the admin:users, admin:servers "
            "and read:users scopes (the token is never taken from the command line)"
        )
    hub = Hub(cfg.hub_api, token)
    store = _store(cfg.portal_url)
    try:
        # Bad input changes nothing: check the token, the user and the tables first.
        st, me = hub.call("GET", "/user")
        missing_scopes = sorted(NEEDED_SCOPES - set((me or {}).get("scopes") or ()))
        if st != 200 or missing_scopes:
            raise CLIError(
                f"{TOKEN_ENV}: the hub answered {st}"
                + (f"; the token lacks {', '.join(missing_scopes)}" if st == 200 else "")
                + ": use an operator's token"
            )
        status, _ = hub.call("GET", hub.user_path(username))
        if status not in (200, 404):
            raise CLIError(
                f"{TOKEN_ENV}: the hub answered {status} (does the token have the scopes?)"
            )
        held = any(gdpr.export_portal(store, username).values())
        if status == 404 and not held:
            raise CLIError(f"USER: the portal holds nothing about {username!r} (no such user)")
        with store.engine.connect() as conn:
            missing = gdpr.unknown_tables(conn)
        if missing:
            raise CLIError(f"database: tables {', '.join(missing)} are not covered (hub/gdpr.py)")
        key = gdpr.load_key(cfg.key_file)
        receipt = gdpr.Receipt(gdpr.pseudonym(key, username))
        idents = [username, *args.email]
        sites = _site_file(args, cfg)
        receipt.add("servers stopped", servers=_stop_servers(hub, username))
        stopped = _stop_sessions(store, username, sites)
        receipt.add("compute sessions stopped", sites=stopped)
        if sites is not None:  # before the erase: the records still name the user
            from .ledger_store import LedgerStore

            ledger = LedgerStore(store)
            mine = [r for r in [*ledger.chained(), *ledger.list_open()] if r.user == username]
            home_at = cfg.home(username, args.home)
            receipt.add("per site", sites=site_receipt(sites, stopped, mine, home_at))
        if status == 200:
            st, _ = hub.call("DELETE", hub.user_path(username))
            if st not in (204, 404):
                raise CLIError(f"USER: the hub refused to delete {username!r} ({st})")
        receipt.add("hub user deleted (tokens, auth state, groups, roles)", deleted=status == 200)
        subjects = gdpr._subjects(store, username)
        counts = gdpr.erase_portal(store, username, key, also=args.email, actor=_actor())
        receipt.add("portal database", rows=counts)
        home = cfg.home(username, args.home)
        removed: list[str] = []
        if home is not None and home.resolve().is_relative_to(cfg.dir.resolve()) and home.is_dir():
            # A home the portal made in its own state directory (the local box): all of it.
            shutil.rmtree(home)
            removed.append("the home in the portal's state directory")
        elif home is not None and (home / ".sovereign-portal").is_symlink():
            (home / ".sovereign-portal").unlink()  # a link the user made: never followed
            removed.append("~/.sovereign-portal (a link)")
        elif home is not None and (home / ".sovereign-portal").exists():
            shutil.rmtree(home / ".sovereign-portal")  # fd-based: follows no link inside
            removed.append("~/.sovereign-portal")
        receipt.add("portal files in the home deleted", removed=removed)
        time.sleep(1.0)  # the hub writes its access-log line after answering
        names = dict.fromkeys(gdpr.name_forms([*idents, *subjects]), receipt.pseudonym)
        scrubbed = {str(p): gdpr.scrub_file(p, names) for p in cfg.log_files() if p.is_file()}
        receipt.add("log files scrubbed", files={k: v for k, v in scrubbed.items() if v})
        compacted = {
            "portal": gdpr.compact_sqlite(store.engine)
            if store.engine.dialect.name == "sqlite"
            else None
        }
        hub_db = gdpr.sqlite_path(cfg.hub_db_url) if cfg.hub_db_url else None
        if hub_db is not None and hub_db.exists():
            engine = gdpr.sqlite_engine(hub_db)
            try:
                compacted["hub"] = gdpr.compact_sqlite(engine)
            finally:
                engine.dispose()
        receipt.add(
            "SQLite files compacted (no deleted rows left in free pages or the WAL)", **compacted
        )
    finally:
        store.dispose()
    if args.json:
        json.dump(receipt.to_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(f"GDPR erase receipt: {_printable(username)} -> {receipt.pseudonym}")
        for s in receipt.steps:
            detail = {k: v for k, v in s.items() if k != "step"}
            print(f"  - {s['step']}: {_printable(json.dumps(detail, sort_keys=True))}")
        print("  Slurm accounting: job names and comments carry no user name (docs); the")
        print("  Unix account and uid are the site's records, not the portal's.")
    return 0


def _cmd_retention(args: argparse.Namespace) -> int:
    from . import gdpr

    cfg = HubConfig(args)
    days = args.days if args.days is not None else cfg.policy.ledger_retention_days
    if days <= 0:
        raise CLIError(
            "--days: retention is off (GDPRPolicy.ledger_retention_days is 0); give --days N"
        )
    store = _store(cfg.portal_url)
    try:
        counts = gdpr.retention(store, gdpr.load_key(cfg.key_file), days)
    finally:
        store.dispose()
    print(
        f"gdpr retention: rows older than {days} days pseudonymised: "
        + ", ".join(f"{k} {v}" for k, v in counts.items())
    )
    return 0


def _days(text: str) -> int:
    from sovereign_portal.spawners.strict import parse_int

    try:
        return parse_int(text, "--days", lo=1, hi=36500)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("gdpr", help="data-subject tools: export, erase, retention")
    gsub = p.add_subparsers(dest="gdpr_command", required=True, metavar="ACTION")

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--config", metavar="FILE", help="the hub's jupyterhub_config.py")
        q.add_argument("--db", metavar="URL", help="the portal database (default: from --config)")

    e = gsub.add_parser("export", help="one JSON archive of everything the portal holds about USER")
    e.add_argument("user", metavar="USER", help="the exact hub user name (alice@uni-a.example)")
    common(e)
    e.add_argument("--hub-db", metavar="URL", help="JupyterHub's database (default: from --config)")
    e.add_argument("--home", metavar="DIR", help="USER's home (default: the spawner's template)")
    e.add_argument("-o", "--output", metavar="FILE", help="write here (0600) instead of stdout")
    e.set_defaults(func=_cmd_export)

    r = gsub.add_parser(
        "erase",
        help="stop everything USER runs, delete them from the hub, pseudonymise their records",
        description="Erase USER: stop their servers and compute sessions, delete the hub "
        "user, delete their account binding, pseudonymise their ledger, budget and audit "
        f"rows (a keyed hash), delete ~/.sovereign-portal and scrub the log files. Needs "
        f"{TOKEN_ENV} (an operator token). Prints a receipt.",
    )
    r.add_argument("user", metavar="USER", help="the exact hub user name (alice@uni-a.example)")
    common(r)
    r.add_argument("--hub-db", metavar="URL", help="JupyterHub's database (default: from --config)")
    r.add_argument("--hub-api", metavar="URL", help="the hub's API (default: from --config)")
    r.add_argument("--home", metavar="DIR", help="USER's home (default: the spawner's template)")
    r.add_argument(
        "--email", action="append", default=[], metavar="ADDRESS",
        help="another identifier of the person to erase from logs and notes (repeatable)",
    )  # fmt: skip
    r.add_argument(
        "--site",
        metavar="FILE",
        help="the site file, for several Slurm sites (default: the config's "
        "SlurmGPUSpawner.site_file): jobs are cancelled through each site's own client and "
        "the receipt lists, per site, what the erase touched there",
    )
    r.add_argument("--json", action="store_true", help="the receipt as JSON")
    r.set_defaults(func=_cmd_erase)

    t = gsub.add_parser("retention", help="pseudonymise ledger rows older than the retention")
    common(t)
    t.add_argument("--days", type=_days, help="override GDPRPolicy.ledger_retention_days")
    t.set_defaults(func=_cmd_retention)
