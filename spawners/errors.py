"""The portal's one error family, modelled on ``jupyterhub.spawner.SpawnException``.

Every refusal or failure the portal can explain is a :class:`PortalError`. It carries

- ``user_message``: short, safe and actionable; the only text a page or a JSON body shows;
- ``log_message``: the detail for the log (defaults to the user message);
- ``reason``: a short label for metrics and for clients (``invalid_request``, ``too_large``);
- ``status``: the HTTP status it maps to (never 200);
- ``field``: the request field, form field or site-file key it is about, when there is one.

Code only raises. One place per process turns the error into a page or JSON:
:meth:`PortalError.to_json` for the portal service and the extension (their handlers'
``write_error``), and :meth:`PortalError.spawn_exception` for JupyterHub's spawn page and
REST API (the spawner mixin's single wrapper). ``str()`` of an error is its user message,
never a tuple of constructor arguments.

This module imports nothing from the portal, so every part (hub, spawners, extension) can
raise it.
"""

from __future__ import annotations

from typing import Any, ClassVar


class PortalError(Exception):
    """An error whose ``user_message`` is safe to show; ``log_message`` has the detail."""

    #: Defaults of the class; an instance may override each.
    default_status: ClassVar[int] = 500
    default_reason: ClassVar[str] = "error"

    def __init__(
        self,
        user_message: str,
        *,
        reason: str | None = None,
        log_message: str | None = None,
        status: int | None = None,
        field: str | None = None,
    ) -> None:
        if not isinstance(user_message, str):  # e.g. an errno passed first: a bug, say so
            raise TypeError(f"user_message must be a str, got {type(user_message).__name__}")
        super().__init__(user_message)
        self.user_message = user_message
        self.reason = reason or self.default_reason
        self.log_message = log_message or user_message
        self.status = status or self.default_status
        if not 400 <= self.status <= 599:
            raise ValueError(f"an error's status is 4xx or 5xx, got {self.status}")
        self.field = field

    def __str__(self) -> str:
        return self.user_message

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.user_message!r}, reason={self.reason!r}, "
            f"status={self.status})"
        )

    def to_json(self) -> dict[str, Any]:
        """The JSON body of this error: ``{"error", "reason", "status"[, "field"]}``."""
        out: dict[str, Any] = {
            "error": self.user_message,
            "reason": self.reason,
            "status": self.status,
        }
        if self.field is not None:
            out["field"] = self.field
        return out

    def spawn_exception(self) -> Exception:
        """This error as JupyterHub's ``SpawnException`` (spawn page, REST spawn, metrics)."""
        from jupyterhub.spawner import SpawnException  # only where a hub runs

        exc = SpawnException(
            self.user_message,
            reason=self.reason,
            log_message=self.log_message,
            status_code=self.status,
        )
        # The form page shows str(exc) ("400 SpawnException(reason=…): …") unless this is set.
        exc.jupyterhub_message = self.user_message
        return exc


class RequestRefused(PortalError, ValueError):
    """Bad input: a malformed or out-of-range request, form or body (HTTP 400).

    ``spawners.request.RequestError`` is this class; ``reason`` may be given second.
    """

    default_status = 400
    default_reason = "invalid_request"

    def __init__(self, user_message: str, reason: str | None = None, **kw: Any) -> None:
        super().__init__(user_message, reason=reason, **kw)


class Unauthenticated(PortalError):
    """No usable credentials (HTTP 401)."""

    default_status = 401
    default_reason = "unauthenticated"


class Forbidden(PortalError):
    """A well-formed request that policy or permissions refuse (HTTP 403)."""

    default_status = 403
    default_reason = "forbidden"


class NotFound(PortalError):
    """Something the caller named does not exist, or is not theirs (HTTP 404)."""

    default_status = 404
    default_reason = "not_found"


class Conflict(PortalError):
    """The request is fine but the state refuses it now: busy, already running (HTTP 409)."""

    default_status = 409
    default_reason = "conflict"


class TooLarge(PortalError):
    """A body or a value over the limit (HTTP 413)."""

    default_status = 413
    default_reason = "too_large"


class ConfigError(PortalError):
    """The deployment's configuration is wrong: the user can only report it (HTTP 500)."""

    default_status = 500
    default_reason = "bad_config"


class Unavailable(PortalError):
    """A component the portal needs does not answer (HTTP 503); trying again may work."""

    default_status = 503
    default_reason = "unavailable"


__all__ = [
    "ConfigError",
    "Conflict",
    "Forbidden",
    "NotFound",
    "PortalError",
    "RequestRefused",
    "TooLarge",
    "Unauthenticated",
    "Unavailable",
]
