"""The ``sovereign-portal`` console script.

Subcommands:
- ``catalog``: what a site offers per partition (accelerators, MIG profiles, sizes and
  their scheduler arguments);
- ``site-schema``: the JSON schema of the site file;
- ``up``: run the portal on its embedded default (hub, proxy, local IdP, local backend);
- ``job-script`` (with the Slurm backend): print the batch script a spawn would submit;
- ``ledger verify``: check the ledger's hash chain (exit 1 names the first broken record)
  and the budgets' running totals against their charges (exit 1 names each drift);
- ``usage``: GPU-hours, €, energy and CO₂ from the ledger, filtered and grouped;
- ``accounts show USER`` / ``accounts rebind USER --subject NEW --reason TEXT``: which IdP
  subject a hub account is bound to, and the audited re-bind when the IdP re-issued it;
- ``gdpr export|erase|retention``: data-subject tools (:mod:`.gdpr_cli`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from sovereign_portal.spawners.catalog import ACCELERATORS
from sovereign_portal.spawners.site import Partition, Site, SiteError, load_site, site_schema
from sovereign_portal.spawners.sizes import partition_sizes, size_eur_per_hour
from sovereign_portal.spawners.strict import printable


def catalog_data(site: Site) -> dict[str, Any]:
    """Everything ``catalog --json`` prints: the hardware tables and each partition's offer."""
    used = sorted({nt.accelerator for p in site.partitions for nt in p.nodes})
    return {
        "site": site.name,
        "accelerators": {a: ACCELERATORS[a].to_json() for a in ACCELERATORS},
        "mig_tables": {
            a: {p.name: p.max_count for p in ACCELERATORS[a].mig_profiles} for a in ACCELERATORS
        },
        "accelerators_in_use": used,
        "partitions": [_partition_data(p) for p in site.partitions],
    }


def _partition_data(p: Partition) -> dict[str, Any]:
    nts = {nt.name: nt for nt in p.nodes}
    return {
        "name": p.name,
        "backend": p.backend,
        "jurisdiction": p.jurisdiction.model_dump(),
        "carbon_g_per_kwh": p.carbon_g_per_kwh,
        "max_walltime_minutes": p.max_walltime_minutes,
        "node_types": [
            {
                "name": nt.name,
                "accelerator": nt.accelerator,
                "gpus": nt.gpus,
                "count": nt.count,
                "whole_gpus": nt.whole_gpus,
                "mig": [layout.model_dump() for layout in nt.mig],
            }
            for nt in p.nodes
        ],
        "sizes": [
            {
                **s.to_json(nts[s.node_type]),
                "eur_per_hour": round(size_eur_per_hour(p, s), 4),
            }
            for s in partition_sizes(p)
        ],
    }


def print_catalog(site: Site, out: Any = sys.stdout) -> None:
    def w(text: str) -> None:
        # The site file is validated without control characters; escape any anyway, so
        # that no text from a file reaches a terminal as a control sequence.
        out.write(printable(text, keep_newlines=True))

    w(f"{site.name}\n")
    for p in site.partitions:
        j = p.jurisdiction
        certs = ", ".join(j.certifications) or "none"
        w(f"\npartition {p.name} [{p.backend}] — {j.country}, {j.operator} (certified: {certs})\n")
        w(f"  carbon {p.carbon_g_per_kwh:g} gCO₂/kWh, max walltime {p.max_walltime_minutes} min\n")
        for nt in p.nodes:
            acc = ACCELERATORS[nt.accelerator]
            w(
                f"  nodes {nt.name}: {nt.count} × {nt.gpus} {acc.model} "
                f"({acc.memory_gb} GB, {acc.tdp_w} W, {acc.cuda_arch}, "
                f"NVLink {acc.nvlink_gb_s} GB/s)\n"
            )
            for layout in nt.mig:
                w(f"    MIG on GPU {layout.gpus}: {' + '.join(layout.profiles)}\n")
        w("  sizes:\n")
        nts = {nt.name: nt for nt in p.nodes}
        for s in partition_sizes(p):
            price = size_eur_per_hour(p, s)
            args = " ".join(s.slurm_args(nts[s.node_type]))
            w(f"    {s.id:<16} {s.label:<48} €{price:>7.2f}/h  {args}\n")
    w("\nMIG profiles (most instances per GPU):\n")
    for a in ACCELERATORS.values():
        w(f"  {a.name}: " + ", ".join(f"{p.name} ×{p.max_count}" for p in a.mig_profiles) + "\n")


def _cmd_catalog(args: argparse.Namespace) -> int:
    site = load_site(args.site)
    if args.json:
        json.dump(catalog_data(site), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print_catalog(site)
    return 0


def _cmd_schema(args: argparse.Namespace) -> int:
    json.dump(site_schema(), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def _cmd_up(args: argparse.Namespace) -> int:
    from .up import run_up

    return run_up(args)


# -- the ledger (issue 10) ------------------------------------------------------------------
def _db_url(args: argparse.Namespace) -> str:
    if args.db:
        return str(args.db)
    from pathlib import Path

    return f"sqlite:///{Path(args.state_dir).resolve() / 'portal.sqlite'}"


def _portal_store(url: str, table: str, missing: str) -> Any:
    """The portal database at ``url`` if it has ``table``; else a CLI error naming --db."""
    from .store import PortalStore, redact_url

    try:
        store = PortalStore(url)
        present = table in store.table_names()
    except Exception as e:
        raise CLIError(f"--db: cannot open {redact_url(url)}: {type(e).__name__}: {e}") from None
    if not present:
        raise CLIError(f"--db: {redact_url(url)} has no {missing}")
    return store


def _ledger(args: argparse.Namespace) -> Any:
    """The ledger of ``--db`` (or ``<state-dir>/portal.sqlite``), or a CLI error (exit 2)."""
    from .ledger_store import LedgerStore

    store = _portal_store(
        _db_url(args),
        "ledger_records",
        "ledger (the hub creates it when it starts; or give the portal database's URL)",
    )
    return LedgerStore(store)


class CLIError(Exception):
    """A usage error of a subcommand: printed with the option it is about, exit 2."""


def _cmd_ledger_verify(args: argparse.Namespace) -> int:
    from .budget_store import rebuild_totals, totals_drift

    ledger = _ledger(args)
    n, broken = ledger.verify()
    if broken is not None:
        print(f"ledger verify: BROKEN at {broken} (checked {n} rows)", file=sys.stderr)
        return 1
    print(f"ledger verify: OK, {n} closed rows chained")
    if "budget_totals" not in ledger.store.table_names():
        return 0
    # the budgets' running totals are a cache of their settled charges: they must agree
    with ledger.store.begin() as s:
        drift = totals_drift(s)
        for d in drift:
            print(
                f"ledger verify: budget totals DRIFT in {d['budget']} "
                f"({'the whole budget' if not d['user'] else 'user ' + d['user']}): "
                f"total {d['total']:.6g} over {d['charges_total']} charge(s), the charges "
                f"sum to {d['sum']:.6g} over {d['charges_sum']}",
                file=sys.stderr,
            )
        if drift and args.rebuild_totals:
            rebuild_totals(s)
            print(f"ledger verify: budget totals rebuilt from the charges ({len(drift)} fixed)")
            return 0
    if drift:
        print(
            f"ledger verify: {len(drift)} budget total(s) differ from their charges "
            "(--rebuild-totals recomputes them)",
            file=sys.stderr,
        )
        return 1
    print("ledger verify: OK, budget totals equal the sums of their charges")
    return 0


def _cmd_ledger_reconcile(args: argparse.Namespace) -> int:
    import asyncio

    from sovereign_portal.spawners.slurm.client import SchedulerError

    from .reconcile import print_differences, reconcile

    ledger = _ledger(args)
    since = args.since if args.since is not None else 0.0
    rows = [r for r in ledger.chained() if (r.ended_at or 0.0) >= since]
    if getattr(args, "site", None):
        return _reconcile_sites(args, rows)
    try:
        checked, diffs = asyncio.run(reconcile(rows, tolerance_s=args.tolerance_seconds))
    except (SchedulerError, OSError) as e:
        print(f"ledger reconcile: sacct failed (is slurmdbd running?): {e}", file=sys.stderr)
        return 2
    print_differences(checked, diffs, args.json, sys.stdout)
    return 1 if diffs else 0


def _reconcile_sites(args: argparse.Namespace, rows: list[Any]) -> int:
    """``ledger reconcile --site FILE``: one report per [[sites]] entry, each site asked
    through its own transport. Exit 2 if a site's accounting did not answer, 1 if there
    are differences, else 0 (a site without accounting is listed, and is not a failure)."""
    import asyncio

    from sovereign_portal.spawners.site import load_site
    from sovereign_portal.spawners.slurm.sites import site_client

    from .reconcile import print_site_reports, reconcile_sites

    site = load_site(args.site)
    if not site.sites:
        print(f"ledger reconcile: {args.site} declares no [[sites]]", file=sys.stderr)
        return 2
    clients = {cs.name: site_client(cs, timeout=60) for cs in site.sites}
    reports = asyncio.run(reconcile_sites(rows, site, clients, tolerance_s=args.tolerance_seconds))
    print_site_reports(reports, args.json, sys.stdout)
    if any(r.status == "error" for r in reports):
        return 2
    return 1 if any(r.differences for r in reports) else 0


def _time_arg(name: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        from datetime import UTC, datetime

        try:
            t = datetime.fromisoformat(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a date or time; use e.g. 2026-09-01 or 2026-09-01T08:00"
            ) from None
        if t.tzinfo is None:
            t = t.replace(tzinfo=UTC)
        return t.timestamp()

    parse.__name__ = name
    return parse


def _tolerance(text: str) -> float:
    from sovereign_portal.spawners.strict import parse_int

    try:
        return float(parse_int(text, "--tolerance-seconds", lo=0, hi=86400))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _word_arg(name: str, pattern: str, example: str) -> Callable[[str], str]:
    import re

    rx = re.compile(pattern)

    def parse(text: str) -> str:
        if not rx.fullmatch(text):
            raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a valid {name}, e.g. {example}")
        return text

    parse.__name__ = name
    return parse


USAGE_COLUMNS = ("records", "gpu_hours", "eur", "energy_wh", "co2_g", "estimated_time_records")


def _cmd_usage(args: argparse.Namespace) -> int:
    from .ledger_store import UsageFilter

    if args.since is not None and args.until is not None and args.until <= args.since:
        raise CLIError("--until: must be after --since")
    ledger = _ledger(args)
    flt = UsageFilter(
        user=args.user,
        course=args.course,
        project=args.project,
        partition=args.partition,
        country=args.country,
        since=args.since,
        until=args.until,
    )
    by = [b for b in args.by.split(",") if b]
    from .ledger import LedgerError

    try:
        rows = ledger.usage(flt, by)
    except LedgerError as e:
        raise CLIError(f"--by: {e}") from None
    cols = [*by, *USAGE_COLUMNS]
    if args.json:
        json.dump({"filters": {k: v for k, v in vars(flt).items() if v is not None},
                   "groups": rows}, sys.stdout, indent=2)  # fmt: skip
        sys.stdout.write("\n")
    elif args.csv:
        import csv

        w = csv.DictWriter(sys.stdout, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    else:
        fmt = {"gpu_hours": "{:.3f}", "eur": "{:.2f}", "energy_wh": "{:.1f}", "co2_g": "{:.1f}"}
        table = [cols] + [
            [fmt.get(c, "{}").format(r[c]) if r[c] != "" else "-" for c in cols] for r in rows
        ]
        widths = [max(len(str(row[i])) for row in table) for i in range(len(cols))]
        for row in table:
            print("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
        if not rows:
            print("(no closed records match)")
    return 0


def _add_db_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--db",
        metavar="URL",
        help="the portal database (SQLAlchemy URL, e.g. postgresql+psycopg://portal@db/portal); "
        "default: <state-dir>/portal.sqlite",
    )
    p.add_argument("--state-dir", default=".run", help="the portal's state directory")


def _add_ledger_parsers(sub: Any) -> None:
    p = sub.add_parser("ledger", help="the ledger: check its hash chain")
    lsub = p.add_subparsers(dest="ledger_command", required=True, metavar="ACTION")
    v = lsub.add_parser(
        "verify",
        help="check every closed record's hash chain, and that the budgets' running totals "
        "equal the sums of their settled charges",
    )
    _add_db_args(v)
    v.add_argument(
        "--rebuild-totals",
        action="store_true",
        help="when the budgets' running totals differ from their charges, report the "
        "difference and recompute the totals from the charges",
    )
    v.set_defaults(func=_cmd_ledger_verify)
    r = lsub.add_parser(
        "reconcile",
        help="compare closed records with Slurm's accounting (sacct): report differences",
        description="One batched sacct call for every Slurm job of the closed records; "
        "prints each record whose elapsed time or device count disagrees beyond the "
        "tolerance, or whose job Slurm has no record of. Exit 1 when there are differences. "
        "Nothing is changed: correct a record with an adjustment.",
    )
    _add_db_args(r)
    r.add_argument("--since", type=_time_arg("since"), help="records that ended at or after (UTC)")
    r.add_argument(
        "--tolerance-seconds",
        type=_tolerance,
        default=30.0,
        help="seconds of difference always tolerated (default 30; 5 %% more on top)",
    )
    r.add_argument(
        "--site",
        metavar="FILE",
        help="site file with [[sites]]: reconcile each site's records with that site's own "
        "accounting (sacct, or slurmrestd's /slurmdb/), one call per site; a site that "
        "declares no accounting is reported as such",
    )
    r.add_argument("--json", action="store_true", help="JSON output for scripts")
    r.set_defaults(func=_cmd_ledger_reconcile)

    from .ledger_store import GROUP_BY

    u = sub.add_parser("usage", help="GPU-hours, €, Wh and gCO₂ used, from the ledger")
    _add_db_args(u)
    name = r"[A-Za-z0-9][A-Za-z0-9_.@+-]{0,254}"
    u.add_argument("--user", type=_word_arg("user name", name, "ada"), help="one hub user")
    u.add_argument("--course", type=_word_arg("course", name, "ml101"), help="one course budget")
    u.add_argument("--project", type=_word_arg("project", name, "health"), help="one project")
    u.add_argument(
        "--partition", type=_word_arg("partition", r"[a-z][a-z0-9_-]{0,31}", "gpu-fr"),
        help="one partition",
    )  # fmt: skip
    u.add_argument(
        "--country", type=_word_arg("country", r"[A-Z]{2}", "FR"), help="ISO 3166 code, e.g. FR"
    )
    u.add_argument("--since", type=_time_arg("since"), help="records that ended at or after (UTC)")
    u.add_argument("--until", type=_time_arg("until"), help="records that ended before (UTC)")
    u.add_argument(
        "--by",
        default="user",
        type=_word_arg("--by list", rf"(({'|'.join(GROUP_BY)}),?)*", "user,partition"),
        help=f"group by, comma-separated: {', '.join(GROUP_BY)} (default: user)",
    )
    out = u.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="JSON output for scripts")
    out.add_argument("--csv", action="store_true", help="CSV output")
    u.set_defaults(func=_cmd_usage)


# -- accounts: the (iss, sub) each hub account is bound to (issue 9) ------------------------
def _accounts_db_url(args: argparse.Namespace) -> str:
    """``--db``, else ``c.PortalDatabase.url`` of ``--config``, else the state directory's."""
    if args.db or not args.config:
        return _db_url(args)
    from pathlib import Path

    from sqlalchemy.engine import make_url
    from traitlets.config.loader import PyFileConfigLoader

    path = Path(args.config).resolve()
    try:
        config = PyFileConfigLoader(path.name, str(path.parent)).load_config()
    except Exception as e:
        raise CLIError(f"--config: cannot load {path}: {type(e).__name__}: {e}") from None
    section = config.get("PortalDatabase", {})
    url = str(section["url"]) if "url" in section else "sqlite:///portal.sqlite"
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database:
        db = Path(parsed.database)
        if not db.is_absolute():  # relative to the hub's directory, where its config lives
            url = parsed.set(database=str(path.parent / db)).render_as_string(False)
    return url


def _accounts_store(args: argparse.Namespace) -> Any:
    return _portal_store(
        _accounts_db_url(args),
        "account_bindings",
        "account bindings (the hub creates them when it starts; give the portal "
        "database's URL with --db or the hub's --config)",
    )


def _actor() -> str:
    import getpass
    import os

    return os.environ.get("SUDO_USER") or getpass.getuser()


def _cmd_accounts_show(args: argparse.Namespace) -> int:
    from .accounts import AccountError, audit_trail, check_username, get_binding

    try:
        username = check_username(args.user, "USER")
    except AccountError as e:
        raise CLIError(str(e)) from None
    store = _accounts_store(args)
    try:
        binding = get_binding(store, username)
        if binding is None:
            raise CLIError(
                f"USER: no account {username!r} is bound to a subject (it has never logged "
                "in, or the name is not the exact hub user name, e.g. alice@uni-a.example)"
            )
        trail = audit_trail(store, username)
    finally:
        store.dispose()
    if args.json:
        json.dump({**binding.as_dict(), "audit": trail}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print(f"account    {_printable(binding.username)}")
    print(f"issuer     {_printable(binding.issuer)}")
    print(f"subject    {_printable(binding.subject)}")
    print(f"bound at   {binding.bound_at.isoformat(timespec='seconds')}")
    print(f"updated at {binding.updated_at.isoformat(timespec='seconds')}")
    for event in trail:
        d = event["detail"]
        print(
            f"  {event['at'][:19]}Z {event['action']} by {_printable(event['actor'])}: "
            f"{_printable(d.get('old_subject'))} -> {_printable(d.get('new_subject'))} "
            f"({_printable(d.get('reason'))})"
        )
    return 0


def _printable(value: Any) -> str:
    """A value for the terminal: no raw control characters."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in str(value))


def _cmd_accounts_rebind(args: argparse.Namespace) -> int:
    import logging

    from .accounts import AccountError, check_issuer, check_subject, check_username, rebind

    # Check every argument before touching the database: bad input changes nothing.
    try:
        check_username(args.user, "USER")
        check_subject(args.subject, "--subject")
        if args.issuer is not None:
            check_issuer(args.issuer, "--issuer")
    except AccountError as e:
        raise CLIError(str(e)) from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    store = _accounts_store(args)
    try:
        old, new = rebind(
            store,
            args.user,
            subject=args.subject,
            issuer=args.issuer,
            reason=args.reason,
            actor=_actor(),
        )
    except AccountError as e:
        field = {"username": "USER", "subject": "--subject", "issuer": "--issuer"}
        raise CLIError(f"{field.get(e.field, '--' + e.field)}: {e.message}") from None
    finally:
        store.dispose()
    print(
        f"{_printable(new.username)}: subject {_printable(old.subject)} -> "
        f"{_printable(new.subject)}"
        + (
            f", issuer {_printable(old.issuer)} -> {_printable(new.issuer)}"
            if old.issuer != new.issuer
            else ""
        )
        + "; audit event written. The next login with the new subject gets in."
    )
    return 0


def _add_accounts_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "accounts", help="which IdP subject each hub account is bound to; audited re-bind"
    )
    asub = p.add_subparsers(dest="accounts_command", required=True, metavar="ACTION")

    def db_args(q: argparse.ArgumentParser) -> None:
        _add_db_args(q)
        q.add_argument(
            "--config",
            metavar="FILE",
            help="the hub's jupyterhub_config.py: use its c.PortalDatabase.url (a relative "
            "SQLite path is taken from the file's directory)",
        )

    s = asub.add_parser("show", help="the subject an account is bound to, and its audit trail")
    s.add_argument("user", metavar="USER", help="the exact hub user name (alice@uni-a.example)")
    s.add_argument("--json", action="store_true", help="JSON output for scripts")
    db_args(s)
    s.set_defaults(func=_cmd_accounts_show)

    r = asub.add_parser(
        "rebind",
        help="bind an account to a new IdP subject (the IdP re-issued it); audited",
        description="Bind USER to a new subject (and issuer). Writes an audit event (who, "
        "when, old and new subject, reason) and a log line. Check with the IdP's operators "
        "that the new subject is the same person before you run it.",
    )
    r.add_argument("user", metavar="USER", help="the exact hub user name (alice@uni-a.example)")
    r.add_argument("--subject", required=True, help="the new `sub` the IdP sends for this person")
    r.add_argument("--issuer", help="the new `iss`, when the account moves to another IdP")
    r.add_argument("--reason", required=True, help="why (a ticket number): kept in the audit log")
    db_args(r)
    r.set_defaults(func=_cmd_accounts_rebind)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sovereign-portal",
        description="A Jupyter-native research portal for sovereign GPU clusters.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("catalog", help="show what a site offers per partition")
    p.add_argument("--site", metavar="FILE", help="site file (default: the embedded example)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_catalog)

    p = sub.add_parser("site-schema", help="print the JSON schema of the site file")
    p.set_defaults(func=_cmd_schema)

    p = sub.add_parser("up", help="run the portal on its embedded default")
    p.add_argument("--site", metavar="FILE", help="site file (default: the embedded example)")
    p.add_argument("--ip", default="127.0.0.1", help="address the proxy listens on")
    p.add_argument("--port", type=int, default=8000, help="port the proxy listens on")
    p.add_argument("--state-dir", default=".run", help="database, secrets and logs (0700)")
    p.add_argument(
        "--dev-login",
        action="store_true",
        help="use a labelled development login instead of the local OIDC IdP",
    )
    p.set_defaults(func=_cmd_up)

    _add_ledger_parsers(sub)
    _add_accounts_parsers(sub)
    from .budget_cli import add_parsers as _add_budget_parsers

    _add_budget_parsers(sub)
    from .course_cli import add_parsers as _add_course_parsers

    _add_course_parsers(sub)
    from .gdpr_cli import add_parsers as _add_gdpr_parsers

    _add_gdpr_parsers(sub)

    for hook in _plugin_parsers():
        hook(sub)
    return parser


def _plugin_parsers() -> list[Callable[[Any], None]]:
    """Subcommands contributed by backends (imported lazily, optional)."""
    hooks: list[Callable[[Any], None]] = []
    try:
        from sovereign_portal.spawners.slurm.cli import add_parser
    except ImportError:
        pass
    else:
        hooks.append(add_parser)
    return hooks


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except SiteError as e:
        print(f"sovereign-portal: {printable(str(e), keep_newlines=True)}", file=sys.stderr)
        return 2
    except CLIError as e:
        print(f"sovereign-portal {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
