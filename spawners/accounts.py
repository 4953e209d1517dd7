"""Which Unix accounts may run a portal job: never a system account.

One rule, written once, for every place an account name turns into a process owner: the
login (a hub user name that names a system account is refused), each spawner (before a
token file is written or anything is submitted), the job-script preview and the orphan
sweep. Each builds ``UnixAccountPolicy(parent=self)``, so the one config section
``c.UnixAccountPolicy`` serves them all.

An account is a system account when its name is in ``denied_names``, or when it exists on
this host and its uid is outside ``[min_uid, max_uid]`` or its primary group is gid 0.
"""

from __future__ import annotations

import pwd

from traitlets import Integer, Set, Unicode, validate
from traitlets.config import Configurable

#: Names refused even where no such account exists on the hub host (it may exist on nodes).
DEFAULT_DENIED = frozenset(
    {
        "root",
        "toor",
        "daemon",
        "bin",
        "sys",
        "sync",
        "adm",
        "operator",
        "nobody",
        "nogroup",
        "www-data",
        "backup",
        "mail",
        "messagebus",
        "sshd",
        "systemd-network",
        "systemd-resolve",
        "systemd-timesync",
        "slurm",
        "munge",
        "postgres",
        "mysql",
        "jupyterhub",
    }
)


class SystemAccountError(PermissionError):
    """A job would run as a system account. ``message`` is safe to show the user."""

    def __init__(self, name: str, why: str) -> None:
        self.account = name
        self.why = why
        self.message = (
            f"The Unix account {name!r} is a system account ({why}); portal jobs never run "
            "as a system account. Ask the operators to map your login to a personal account."
        )
        super().__init__(self.message)


class UnixAccountPolicy(Configurable):
    """The uid range and deny list that keep portal jobs off system accounts."""

    min_uid = Integer(
        1000,
        config=True,
        help="""Lowest uid a portal job may run as. Accounts below it (root is 0; Debian's
        system accounts are below 1000) are refused at login, at spawn, in the job-script
        preview and in the orphan sweep.""",
    )
    max_uid = Integer(
        59999,
        config=True,
        help="""Highest uid a portal job may run as. Debian reserves 60000 and above
        (nobody is 65534) for dynamic and special system accounts.""",
    )
    denied_names = Set(
        Unicode(),
        default_value=set(DEFAULT_DENIED),
        config=True,
        help="""Account names that never run a portal job, whatever their uid and whether or
        not they exist on the hub host (they may exist on compute nodes). Extend it rather
        than replace it: `c.UnixAccountPolicy.denied_names.add("backupsvc")`.""",
    )

    @validate("min_uid")
    def _check_min_uid(self, proposal: dict[str, int]) -> int:
        if proposal["value"] < 1:
            raise ValueError("UnixAccountPolicy.min_uid must be at least 1: uid 0 is root")
        return proposal["value"]

    def refusal(self, name: str) -> str | None:
        """Why ``name`` may not run a job (a short reason), or None when it may.

        An account that does not exist on this host is not refused here: the login comes
        before the account is created, and a spawn refuses a missing account on its own.
        """
        if name.lower() in {n.lower() for n in self.denied_names}:
            return "on the deny list"
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            return None
        if pw.pw_uid < self.min_uid or pw.pw_uid > self.max_uid:
            return f"uid {pw.pw_uid}, outside {self.min_uid}-{self.max_uid}"
        if pw.pw_gid == 0:
            return "its primary group is root"
        return None

    def check(self, name: str) -> pwd.struct_passwd:
        """The account's passwd entry; raises :class:`SystemAccountError` for a system account
        and ``KeyError`` when the account does not exist."""
        why = self.refusal(name)
        if why is not None:
            raise SystemAccountError(name, why)
        return pwd.getpwnam(name)
