"""``sovereign-portal budgets sync``: push the portal's course and project budgets into Slurm.

What the portal wants (:func:`wanted`) is one Slurm account per course or project budget
whose period covers now (:func:`~sovereign_portal.spawners.slurm.accounting.account_name`),
with ``GrpTRESMins=gres/gpu=<GPU-hours × 60>``, the portal's ``NoDecay`` QOS and a user
association for every member. The members come from JupyterHub's own database: the hub
groups ``course-<id>`` / ``project-<id>`` that login keeps (the same groups admission
charges), mapped to Unix users by the spawner's ``unix_user_template`` (``--unix-user``),
plus any user an instructor gave an allowance. A € or kWh budget has no GPU-minute
equivalent that holds on every partition, so it is skipped with a message (Slurm does not
enforce it; the portal's admission still does).

The Slurm side lives in :mod:`sovereign_portal.spawners.slurm.accounting`; this module only
decides what should be there.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from sovereign_portal.spawners.slurm.accounting import (
    AccountingError,
    Wanted,
    account_name,
    check_user,
    gpu_minutes,
    job_account,
)

from .budgets import Budget

__all__ = ["AccountingError", "hub_group_members", "plan", "wanted", "with_account"]


def hub_group_members(hub_db_url: str, groups: Iterable[str]) -> dict[str, set[str]]:
    """Members of each hub group, read from JupyterHub's database (read-only)."""
    from sqlalchemy import create_engine, text

    names = sorted(set(groups))
    out: dict[str, set[str]] = {g: set() for g in names}
    if not names:
        return out
    engine = create_engine(hub_db_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT g.name, u.name FROM groups g "
                    "JOIN user_group_map m ON m.group_id = g.id "
                    "JOIN users u ON u.id = m.user_id"
                )
            )
            for g, u in rows:
                if g in out:
                    out[g].add(u)
    finally:
        engine.dispose()
    return out


def wanted(
    budgets: Iterable[Budget],
    members: Mapping[str, set[str]],
    allowances: Mapping[str, Mapping[str, float]],
    unix_user: str = "{username}",
    now: datetime | None = None,
) -> tuple[list[Wanted], list[str]]:
    """The accounts Slurm should have, and a message for each budget or user left out."""
    when = now or datetime.now(UTC)
    out: list[Wanted] = []
    notes: list[str] = []
    for b in sorted(budgets, key=lambda x: (str(x.owner), x.period.start)):
        if b.owner.kind == "user" or not b.period.covers(when):
            continue
        if b.unit != "gpu_hours":
            notes.append(
                f"{b.key}: skipped, a budget in {b.unit} has no GPU-minute limit in Slurm "
                "(the portal's admission still enforces it)"
            )
            continue
        group = b.owner.group or ""
        hub_users = set(members.get(group, set())) | set(allowances.get(b.key, {}))
        users: set[str] = set()
        for name in sorted(hub_users):
            try:
                users.add(check_user(unix_user.format(username=name)))
            except AccountingError as e:
                notes.append(f"{b.key}: hub user {name!r} left out: {e}")
        out.append(
            Wanted(
                account_name(b.owner.kind, b.owner.id),
                gpu_minutes(b.amount),
                frozenset(users),
                f"{b.owner}@{b.period.name}",
            )
        )
    return out, notes


def plan(bs: Any, hub_db_url: str | None, unix_user: str) -> tuple[list[Wanted], list[str]]:
    """:func:`wanted` from a :class:`~.budget_store.BudgetStore` and the hub's database."""
    budgets = [b for b in bs.budgets() if b.owner.kind != "user"]
    groups = [b.owner.group for b in budgets if b.owner.group]
    members = hub_group_members(hub_db_url, groups) if hub_db_url else {}
    allowances = {
        b.key: bs.allowances(b.owner.id, b.period.name) for b in budgets if b.owner.kind == "course"
    }
    return wanted(budgets, members, allowances, unix_user)


def with_account(grant: Any, default_account: str, accounting: bool) -> Any:
    """A Slurm session's grant with the ``--account`` of the budget it charges
    (:func:`~sovereign_portal.spawners.slurm.accounting.job_account`), in ``account`` and in
    its ``scheduler_args`` (which the launchers pass to sbatch). AccountingError when Slurm
    accounting is on and no account applies."""
    from dataclasses import replace

    charge = None
    if grant.budget:
        kind, _, ident = grant.budget.rsplit("@", 1)[0].partition(":")
        charge = (kind, ident)
    account = job_account(charge, default_account, grant.account, accounting)
    args = [a for a in grant.scheduler_args if not a.startswith("--account=")]
    if account:
        args.append(f"--account={account}")
    return replace(grant, account=account, scheduler_args=args)
