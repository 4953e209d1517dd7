"""Slurm accounts for the portal's budgets: names, and the ``sacctmgr`` calls that read and
write them (argv lists through :func:`.client.call`, never a shell).

Where slurmdbd runs, each course or project budget becomes one Slurm account
(:func:`account_name`: ``sp-course-ml101``, ``sp-project-x``) with ``GrpTRESMins=gres/gpu=N``,
the portal's QOS (:data:`QOS`, ``Flags=NoDecay``) and one user association per member, so
that Slurm itself holds a job that does not fit what is left (``AccountingStorageEnforce=
limits,safe``: reason ``AssocGrpGRESMinutes``; ../shared/LAB.md, "Slurm accounting").
The spawner and the session launchers pass the same name as ``--account``: the rule is
written here once. What the portal wants is computed on the hub side (``hub/budget_sync``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .client import SlurmError, call, slurm_env

#: The prefix of every account the portal manages; other accounts are never touched.
PREFIX = "sp-"
#: The QOS of the portal's accounts: its usage never decays (a budget is spent, not forgotten).
QOS = "sp-budget"
#: Owner kinds that get a Slurm account (a user budget charges the user's own account).
ACCOUNT_KINDS = ("course", "project")
_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")
ACCOUNT_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
_UNIX_USER = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}$")


#: What a pending reason of Slurm's limits means for the user (shown after the reason).
LIMIT_REASONS = {
    "AssocGrpGRESMinutes": "the budget's Slurm account has too few GPU-minutes left for "
    "this walltime; a shorter walltime or a smaller size may fit",
    "AssocGrpGRESRunMinutes": "the budget's running jobs hold its GPU-minutes; this one "
    "starts when they end",
    "QOSGrpGRESMinutes": "the QOS has too few GPU-minutes left for this walltime",
}


def reason_text(reason: str) -> str:
    """``AssocGrpGRESMinutes`` → ``AssocGrpGRESMinutes (the budget's Slurm account ...)``."""
    why = LIMIT_REASONS.get(reason)
    return f"{reason} ({why})" if why else reason


class AccountingError(ValueError):
    """A bad account name, owner or user for Slurm; ``field`` names what is wrong."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def account_name(kind: str, ident: str) -> str:
    """The Slurm account of a course or project budget: ``sp-<kind>-<id>`` (lower case)."""
    if kind not in ACCOUNT_KINDS:
        raise AccountingError("owner", f"only {' and '.join(ACCOUNT_KINDS)} budgets get an account")
    if not isinstance(ident, str) or not _ID.match(ident):
        raise AccountingError("owner", f"{ident!r} is not a valid {kind} id")
    return f"{PREFIX}{kind}-{ident}"


def check_account(name: str, field: str = "account") -> str:
    """A Slurm account name safe on an argv (``[a-z0-9_.-]``, at most 64)."""
    if not isinstance(name, str) or not ACCOUNT_RE.match(name):
        raise AccountingError(field, f"{name!r} is not a valid Slurm account name ([a-z0-9_.-])")
    return name


def check_user(name: str) -> str:
    if not isinstance(name, str) or not _UNIX_USER.match(name):
        raise AccountingError("user", f"{name!r} is not a valid Unix user name")
    return name


def gpu_minutes(gpu_hours: float) -> int:
    """``GrpTRESMins=gres/gpu=N`` of a GPU-hour amount: whole minutes, rounded down (Slurm
    never lets a budget spend more than the portal granted)."""
    if not (gpu_hours >= 0) or gpu_hours != gpu_hours:
        raise AccountingError("amount", f"must be a number ≥ 0, got {gpu_hours!r}")
    return int(gpu_hours * 60 + 1e-9)


@dataclass(frozen=True)
class Wanted:
    """One portal account as Slurm should have it."""

    account: str
    gpu_minutes: int
    users: frozenset[str] = frozenset()
    description: str = ""


@dataclass
class SlurmState:
    """What Slurm has for the portal's accounts (``sp-*``) and QOS."""

    qos_flags: str | None = None  # None: no such QOS
    limits: dict[str, int | None] = field(default_factory=dict)  # account -> gpu minutes
    users: dict[str, set[str]] = field(default_factory=dict)  # account -> users
    qos: dict[str, str] = field(default_factory=dict)  # account -> its QOS list


def parse_gpu_minutes(tres: str) -> int | None:
    """``gres/gpu=90,cpu=10`` → 90; no GPU limit → None."""
    for part in tres.split(","):
        k, _, v = part.partition("=")
        if k.strip() == "gres/gpu" and v.strip().isdigit():
            return int(v)
    return None


def parse_state(assoc: str, qos: str) -> SlurmState:
    """``sacctmgr -nP show assoc format=Account,User,GrpTRESMins,QOS`` and ``show qos
    format=Name,Flags`` → the portal's part of it."""
    st = SlurmState()
    for line in qos.splitlines():
        name, _, flags = line.partition("|")
        if name.strip() == QOS:
            st.qos_flags = flags.strip()
    for line in assoc.splitlines():
        fields = line.split("|")
        if len(fields) < 4 or not fields[0].startswith(PREFIX):
            continue
        acct, user, tres, q = (f.strip() for f in fields[:4])
        if user:
            st.users.setdefault(acct, set()).add(user)
        else:
            st.limits[acct] = parse_gpu_minutes(tres)
            st.qos[acct] = q
            st.users.setdefault(acct, set())
    return st


@dataclass(frozen=True)
class Drift:
    """One difference between the portal and Slurm, and the sacctmgr argv that fixes it."""

    what: str  # missing_qos, qos_flags, missing_account, limit, account_qos, missing_user
    account: str
    detail: str
    fix: tuple[str, ...]

    def to_json(self) -> dict[str, str]:
        return {"what": self.what, "account": self.account, "detail": self.detail}


def diff(wanted: Iterable[Wanted], st: SlurmState) -> list[Drift]:
    """What Slurm lacks or has differently, in the order the fixes must run."""
    out: list[Drift] = []
    want = list(wanted)
    if want and st.qos_flags is None:
        out.append(
            Drift("missing_qos", "", f"QOS {QOS} is missing", ("add", "qos", QOS, "Flags=NoDecay"))
        )
    elif want and "NoDecay" not in (st.qos_flags or "").split(","):
        out.append(
            Drift(
                "qos_flags",
                "",
                f"QOS {QOS} has flags {st.qos_flags!r}, not NoDecay",
                ("modify", "qos", QOS, "set", "Flags=NoDecay"),
            )
        )
    for w in want:
        a = check_account(w.account)
        limit = f"GrpTRESMins=gres/gpu={w.gpu_minutes}"
        if a not in st.limits:
            desc = (w.description or a).replace(" ", "_")
            out.append(
                Drift(
                    "missing_account",
                    a,
                    f"account {a} is missing",
                    (
                        "add",
                        "account",
                        a,
                        f"Description={desc}",
                        "Organization=sovereign-portal",
                        f"QOS={QOS}",
                        f"DefaultQOS={QOS}",
                        limit,
                    ),
                )
            )
        else:
            if st.limits[a] != w.gpu_minutes:
                have = "none" if st.limits[a] is None else f"{st.limits[a]}"
                out.append(
                    Drift(
                        "limit",
                        a,
                        f"{a}: GrpTRESMins gres/gpu is {have}, the portal has {w.gpu_minutes}",
                        ("modify", "account", a, "set", limit),
                    )
                )
            if QOS not in st.qos.get(a, "").split(","):
                out.append(
                    Drift(
                        "account_qos",
                        a,
                        f"{a}: QOS is {st.qos.get(a)!r}, not {QOS}",
                        ("modify", "account", a, "set", f"QOS={QOS}", f"DefaultQOS={QOS}"),
                    )
                )
        for u in sorted(w.users - st.users.get(a, set())):
            out.append(
                Drift(
                    "missing_user",
                    a,
                    f"{a}: user {check_user(u)} has no association",
                    ("add", "user", u, f"Account={a}"),
                )
            )
    return out


async def read_state(env: Mapping[str, str] | None = None, timeout: float = 30) -> SlurmState:  # noqa: ASYNC109
    e = slurm_env(env)
    assoc = await call(
        ["sacctmgr", "-n", "-P", "show", "assoc", "format=Account,User,GrpTRESMins,QOS"],
        env=e,
        timeout=timeout,
    )
    qos = await call(
        ["sacctmgr", "-n", "-P", "show", "qos", "format=Name,Flags"], env=e, timeout=timeout
    )
    return parse_state(assoc, qos)


async def apply(
    fixes: Iterable[Drift],
    env: Mapping[str, str] | None = None,
    timeout: float = 30,  # noqa: ASYNC109
) -> list[str]:
    """Run each fix (``sacctmgr -i``); "Nothing new added" (it exists already) is no error."""
    e = slurm_env(env)
    done: list[str] = []
    for d in fixes:
        try:
            await call(["sacctmgr", "-i", *d.fix], env=e, timeout=timeout)
        except SlurmError as err:
            if "Nothing new added" not in err.stdout + err.stderr:
                raise
        done.append(d.detail)
    return done


def job_account(
    charge_to: tuple[str, str] | None,
    default_account: str = "",
    partition_account: str | None = None,
    accounting: bool = False,
) -> str | None:
    """The ``--account`` of a job: the account of the budget it charges (a course or
    project), else the partition's account, else the site's default account. With Slurm
    accounting on (slurmdbd), a job without an account is refused here (AccountingError)
    rather than charged to whatever Slurm picks."""
    if charge_to and charge_to[0] in ACCOUNT_KINDS:
        return account_name(*charge_to)
    name = partition_account or default_account or None
    if name is not None:
        return check_account(name, "default_account")
    if accounting:
        raise AccountingError(
            "default_account",
            "Slurm accounting is on (slurm_accounting) but this job charges no course or "
            "project budget and no default account is configured",
        )
    return None
