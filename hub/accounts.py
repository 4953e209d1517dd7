"""Each hub account belongs to one IdP subject: bindings, checks and the audited re-bind.

A hub user name comes from claims (``preferred_username``, scoped with the home organisation
and normalised), and two different people at the IdP can produce the same name: another
``sub`` whose user name differs only in case, or arrives in e-mail or scoped form. So the
first login of a user name binds it to the (``iss``, ``sub``) pair of that login, in the
``account_bindings`` table, and every later login must present the same pair. The primary key
on the user name makes two concurrent first logins safe: one insert wins, the other login is
then checked against the winner.

When an IdP legitimately re-issues a subject (a migration, a merged account), an operator
re-binds the account with ``sovereign-portal accounts rebind``. Each re-bind writes an
``audit_events`` row (who, when, old and new subject, why) and a log line. Bad input is
refused with an error that names the field, and nothing changes.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from .store import AccountBinding, AuditEvent, PortalStore, utcnow

log = logging.getLogger("sovereign_portal.accounts")

MAX_USERNAME = 255
MAX_ISSUER = 1024
MAX_SUBJECT = 255
MAX_REASON = 500
MAX_ACTOR = 255
REBIND = "account.rebind"


class AccountError(ValueError):
    """Bad input or an unknown account. ``field`` names what is wrong; nothing was changed."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class Binding:
    username: str
    issuer: str
    subject: str
    bound_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, row: AccountBinding) -> Binding:
        return cls(row.username, row.issuer, row.subject, row.bound_at, row.updated_at)

    def as_dict(self) -> dict[str, str]:
        return {
            "username": self.username,
            "issuer": self.issuer,
            "subject": self.subject,
            "bound_at": self.bound_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
        }


@dataclass(frozen=True)
class BindingCheck:
    """The answer for one login: ``ok`` when (iss, sub) is the account's own subject."""

    ok: bool
    binding: Binding
    created: bool = False


def _printable(field: str, value: Any, limit: int) -> str:
    if not isinstance(value, str):
        raise AccountError(field, "must be a string")
    if not value or not value.strip():
        raise AccountError(field, "must not be empty")
    if len(value) > limit:
        raise AccountError(field, f"is {len(value)} characters long; at most {limit} are allowed")
    if not value.isprintable():
        raise AccountError(field, "contains control characters")
    return value


def check_subject(value: Any, field: str = "subject") -> str:
    """An OIDC ``sub``: 1-255 printable characters, no surrounding spaces (OIDC Core 2)."""
    value = _printable(field, value, MAX_SUBJECT)
    if value != value.strip():
        raise AccountError(field, "must not start or end with spaces")
    return value


def check_issuer(value: Any, field: str = "issuer") -> str:
    """An OIDC ``iss``: an http(s) URL without spaces, query or fragment."""
    value = _printable(field, value, MAX_ISSUER)
    parts = urlsplit(value)
    if (
        any(ch.isspace() for ch in value)
        or parts.scheme not in ("https", "http")
        or not parts.netloc
        or parts.query
        or parts.fragment
    ):
        raise AccountError(
            field, f"{value!r} is not an issuer URL (like https://idp.uni-a.example/realms/uni)"
        )
    return value


def check_username(value: Any, field: str = "username") -> str:
    return _printable(field, value, MAX_USERNAME)


def get_binding(store: PortalStore, username: str) -> Binding | None:
    with store.read() as s:  # read-only: no write lock (every login reads it)
        row = s.get(AccountBinding, username)
        return Binding.of(row) if row is not None else None


def bind_or_check(store: PortalStore, username: str, issuer: str, subject: str) -> BindingCheck:
    """Bind ``username`` to (issuer, subject) at its first login; afterwards compare.

    Safe under concurrent first logins of the same name: the user name is the primary key,
    so one insert wins and the loser is compared against the winner's subject.
    """
    known = get_binding(store, username)  # every login after the first only reads
    if known is not None:
        ok = known.issuer == issuer and known.subject == subject
        return BindingCheck(ok=ok, binding=known, created=False)
    for attempt in range(3):
        try:
            with store.begin() as s:
                row = s.get(AccountBinding, username)
                created = row is None
                if row is None:
                    now = utcnow()
                    row = AccountBinding(
                        username=username,
                        issuer=issuer,
                        subject=subject,
                        bound_at=now,
                        updated_at=now,
                    )
                    s.add(row)
                    s.flush()
                binding = Binding.of(row)
            ok = binding.issuer == issuer and binding.subject == subject
            if created:
                log.info("account bound: user=%s iss=%s sub=%s", username, issuer, subject)
            return BindingCheck(ok=ok, binding=binding, created=created)
        except IntegrityError:
            if attempt == 2:
                raise
            # Another first login of the same name committed first: compare against it.
    raise AssertionError("unreachable")


def rebind(
    store: PortalStore,
    username: Any,
    *,
    subject: Any,
    reason: Any,
    actor: str,
    issuer: Any = None,
) -> tuple[Binding, Binding]:
    """Bind ``username`` to a new subject (and issuer); returns (old, new).

    Writes the change and its ``audit_events`` row in one transaction, then a log line.
    Raises :class:`AccountError` (naming the field) for bad input, an unknown account or a
    re-bind to the subject it already has; nothing changes then.
    """
    username = check_username(username)
    subject = check_subject(subject)
    reason = _printable("reason", reason, MAX_REASON).strip()
    actor = _printable("actor", actor, MAX_ACTOR)
    if issuer is not None:
        issuer = check_issuer(issuer)
    with store.begin() as s:
        row = s.get(AccountBinding, username)
        if row is None:
            raise AccountError(
                "username",
                f"no account {username!r} is bound to a subject (it has never logged in); "
                "`sovereign-portal accounts show` needs the exact hub user name",
            )
        old = Binding.of(row)
        new_issuer = issuer if issuer is not None else old.issuer
        if (new_issuer, subject) == (old.issuer, old.subject):
            raise AccountError("subject", f"{username!r} is already bound to this subject")
        now = utcnow()
        row.issuer, row.subject, row.updated_at = new_issuer, subject, now
        s.add(
            AuditEvent(
                at=now,
                actor=actor,
                action=REBIND,
                target=username,
                detail=json.dumps(
                    {
                        "old_issuer": old.issuer,
                        "old_subject": old.subject,
                        "new_issuer": new_issuer,
                        "new_subject": subject,
                        "reason": reason,
                    },
                    sort_keys=True,
                ),
            )
        )
        s.flush()
        new = Binding.of(row)
    log.warning(
        "account rebind: user=%s iss=%s sub=%s -> iss=%s sub=%s by=%s reason=%s",
        username,
        old.issuer,
        old.subject,
        new.issuer,
        new.subject,
        actor,
        json.dumps(reason),
    )
    return old, new


def audit_trail(store: PortalStore, target: str) -> list[dict[str, Any]]:
    """The audit events about ``target``, oldest first."""
    with store.begin() as s:
        rows = s.scalars(
            select(AuditEvent).where(AuditEvent.target == target).order_by(AuditEvent.id)
        ).all()
        return [
            {
                "at": r.at.isoformat(),
                "actor": r.actor,
                "action": r.action,
                "target": r.target,
                "detail": r.details,
            }
            for r in rows
        ]
