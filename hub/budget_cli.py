"""``sovereign-portal budgets``: the operator's budgets in the portal database.

- ``budgets set OWNER --period NAME [--start DATE --end DATE] (--gpu-hours N | --eur N |
  --kwh N) [--per-student N]``: create or change a budget (OWNER is ``course:ml101``,
  ``project:<id>`` or ``user:<name>``); ``--start``/``--end`` define the period too;
- ``budgets list [--period NAME]``: every budget with what is left;
- ``budgets show OWNER --period NAME``: one budget, its holds and allowances;
- ``budgets sync [--check]``: push course and project budgets into Slurm (one account each,
  ``GrpTRESMins``, the NoDecay QOS, user associations; :mod:`.budget_sync`); ``--check``
  changes nothing and exits 1 when Slurm differs from the portal.

Every command takes ``--db URL`` (default ``<state-dir>/portal.sqlite``) and ``--json``.
Bad input is an error that names the option (exit 2), and nothing changes.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .budgets import UNIT_LABELS, Balance, BudgetError

#: Option name of each unit.
UNIT_OPTIONS = {"gpu_hours": "--gpu-hours", "eur": "--eur", "kwh": "--kwh"}
#: The option each BudgetError field is about.
FIELD_OPTIONS = {
    "owner": "OWNER",
    "period": "--period",
    "start": "--start",
    "end": "--end",
    "per_student": "--per-student",
    "unit": "--gpu-hours/--eur/--kwh",
}


def _store(args: argparse.Namespace) -> Any:
    from .budget_store import BudgetStore
    from .cli import CLIError, _db_url
    from .store import PortalStore, redact_url

    url = _db_url(args)
    try:
        store = PortalStore(url)
        store.upgrade()  # the hub does this at start; the CLI may run first
    except Exception as e:
        raise CLIError(f"--db: cannot open {redact_url(url)}: {type(e).__name__}: {e}") from None
    return BudgetStore(store)


def _fail(e: BudgetError, amount_option: str = "--gpu-hours/--eur/--kwh") -> Any:
    from .cli import CLIError

    option = FIELD_OPTIONS.get(e.field or "", amount_option if e.field == "amount" else "")
    return CLIError(f"{option}: {e}" if option else str(e))


def _row(b: Balance) -> dict[str, Any]:
    return {**b.to_json(), "per_student": b.budget.per_student}


def _print_table(rows: list[dict[str, Any]]) -> None:
    w = sys.stdout.write
    w(f"{'OWNER':<32} {'PERIOD':<14} {'UNIT':<10} {'AMOUNT':>10} {'SETTLED':>10} "
      f"{'HELD':>10} {'LEFT':>10}  WARN\n")  # fmt: skip
    for r in rows:
        warn = f"{r['warning']} %" if r["warning"] else ""
        w(
            f"{r['owner']:<32} {r['period']:<14} {UNIT_LABELS[r['unit']]:<10} "
            f"{r['amount']:>10.2f} {r['settled']:>10.2f} {r['held']:>10.2f} {r['left']:>10.2f}"
            f"  {warn}".rstrip()
            + "\n"
        )


def cmd_set(args: argparse.Namespace) -> int:
    from .cli import CLIError

    given = [(u, getattr(args, u)) for u in UNIT_OPTIONS if getattr(args, u) is not None]
    if len(given) != 1:
        raise CLIError("give exactly one of --gpu-hours, --eur or --kwh (the amount and unit)")
    unit, amount = given[0]
    bs = _store(args)
    try:
        b = bs.set_budget(
            args.owner,
            args.period,
            unit,
            amount,
            args.per_student,
            start=args.start,
            end=args.end,
            actor=f"cli:{args.actor}",
        )
        bal = bs.balance(b.owner, b.period.name)
    except BudgetError as e:
        raise _fail(e, UNIT_OPTIONS[unit]) from None
    if args.json:
        json.dump(_row(bal), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        each = b.per_student
        extra = f", {amount_text(each, b.unit)} per student" if each is not None else ""
        print(f"set {b.key}: {amount_text(b.amount, b.unit)}{extra}")
    return 0


def amount_text(x: float, unit: str) -> str:
    return f"€{x:g}" if unit == "eur" else f"{x:g} {UNIT_LABELS[unit]}"


def cmd_list(args: argparse.Namespace) -> int:
    bs = _store(args)
    try:
        rows = [_row(bs.balance(b.owner, b.period.name)) for b in bs.budgets(period=args.period)]
    except BudgetError as e:
        raise _fail(e) from None
    if args.json:
        json.dump({"budgets": rows}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        _print_table(rows)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    bs = _store(args)
    try:
        bal = bs.balance(args.owner, args.period)
        allowances = (
            bs.allowances(bal.budget.owner.id, args.period)
            if bal.budget.owner.kind == "course"
            else {}
        )
    except BudgetError as e:
        raise _fail(e) from None
    holds = [h for h in bs.holds(budget=bal.budget.key) if h["state"] == "held"]
    out = {**_row(bal), "allowances": allowances, "holds": holds}
    if args.json:
        json.dump(out, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    _print_table([out])
    if bal.budget.per_student is not None:
        print(f"per student: {amount_text(bal.budget.per_student, bal.budget.unit)}")
    for user, amount in sorted(allowances.items()):
        print(f"allowance {user}: {amount_text(amount, bal.budget.unit)}")
    for h in holds:
        print(f"held {h['held']:.4f} for {h['user']} ({h['ref']})")
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    import asyncio
    import os
    from pathlib import Path

    from sovereign_portal.spawners.slurm import accounting
    from sovereign_portal.spawners.slurm.client import SchedulerError

    from .budget_sync import plan
    from .cli import CLIError

    bs = _store(args)
    hub_file = Path(args.state_dir).resolve() / "jupyterhub.sqlite"
    if not args.hub_db and not hub_file.exists():
        raise CLIError(f"--hub-db: no hub database at {hub_file}; give --hub-db URL")
    hub_db = args.hub_db or f"sqlite:///{hub_file}"
    if "{username}" not in args.unix_user:
        raise CLIError(f"--unix-user: must contain {{username}}, got {args.unix_user!r}")
    try:
        want, notes = plan(bs, hub_db, args.unix_user)
    except accounting.AccountingError as e:
        raise CLIError(str(e)) from None
    except Exception as e:  # the hub database could not be read
        raise CLIError(f"--hub-db: cannot read hub groups: {type(e).__name__}: {e}") from None
    env = dict(os.environ)
    if args.slurm_conf:
        env["SLURM_CONF"] = args.slurm_conf
    try:
        drift = accounting.diff(want, asyncio.run(accounting.read_state(env)))
        done = [] if args.check else asyncio.run(accounting.apply(drift, env))
    except (SchedulerError, OSError) as e:
        raise CLIError(f"sacctmgr: {e}") from None
    if args.json:
        out = {
            "accounts": [
                {"account": w.account, "gpu_minutes": w.gpu_minutes, "users": sorted(w.users)}
                for w in want
            ],
            "drift": [d.to_json() for d in drift],
            "changed": done,
            "notes": notes,
        }
        json.dump(out, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        for n in notes:
            print(f"note: {n}")
        for d in drift:
            print(f"{'drift' if args.check else 'fixed'}: {d.detail}")
        if not drift:
            print(f"in sync: {len(want)} account(s)")
    return 1 if args.check and drift else 0


def add_parsers(sub: Any) -> None:
    """Add ``budgets set|list|show`` to the ``sovereign-portal`` parser."""
    from .cli import _add_db_args

    p = sub.add_parser("budgets", help="budgets of users, courses and projects")
    bsub = p.add_subparsers(dest="budgets_command", required=True, metavar="ACTION")

    s = bsub.add_parser("set", help="create or change a budget")
    s.add_argument("owner", metavar="OWNER", help="course:<id>, project:<id> or user:<name>")
    s.add_argument("--period", required=True, help="period name, e.g. 2026-autumn")
    s.add_argument("--start", help="period start (ISO date); defines the period with --end")
    s.add_argument("--end", help="period end (ISO date, exclusive)")
    for unit, option in UNIT_OPTIONS.items():
        s.add_argument(option, dest=unit, metavar="N", help=f"amount in {UNIT_LABELS[unit]}")
    s.add_argument("--per-student", metavar="N", help="a course's default allowance per student")
    s.add_argument("--actor", default="operator", help="who sets it, for the audit log")
    s.add_argument("--json", action="store_true", help="JSON output for scripts")
    _add_db_args(s)
    s.set_defaults(func=cmd_set)

    ls = bsub.add_parser("list", help="every budget and what is left")
    ls.add_argument("--period", help="only this period")
    ls.add_argument("--json", action="store_true", help="JSON output for scripts")
    _add_db_args(ls)
    ls.set_defaults(func=cmd_list)

    sh = bsub.add_parser("show", help="one budget, its allowances and open holds")
    sh.add_argument("owner", metavar="OWNER", help="course:<id>, project:<id> or user:<name>")
    sh.add_argument("--period", required=True, help="period name")
    sh.add_argument("--json", action="store_true", help="JSON output for scripts")
    _add_db_args(sh)
    sh.set_defaults(func=cmd_show)

    sy = bsub.add_parser("sync", help="push course and project budgets into Slurm (slurmdbd)")
    sy.add_argument(
        "--check",
        action="store_true",
        help="change nothing; report drift between the portal and Slurm (exit 1 if any)",
    )
    sy.add_argument(
        "--hub-db",
        metavar="URL",
        help="JupyterHub's database, for the members of course-<id>/project-<id> groups; "
        "default: <state-dir>/jupyterhub.sqlite",
    )
    sy.add_argument(
        "--unix-user",
        default="{username}",
        metavar="TEMPLATE",
        help="the Unix user of a hub user (as c.SlurmGPUSpawner.unix_user_template)",
    )
    sy.add_argument("--slurm-conf", metavar="PATH", help="slurm.conf (default: $SLURM_CONF)")
    sy.add_argument("--json", action="store_true", help="JSON output for scripts")
    _add_db_args(sy)
    sy.set_defaults(func=cmd_sync)
