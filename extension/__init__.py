"""sovereign_portal.extension: the jupyter-server extension inside each single-user server."""

from typing import Any


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    from .app import PortalExtension

    return [{"module": "sovereign_portal.extension.app", "app": PortalExtension}]


_LAZY = {
    "GPUSessions": "widget",
    "SessionForm": "widget",
    "PortalClient": "client",
    "request_session": "client",
}


def __getattr__(name: str) -> Any:
    """Import the widget and client only when asked: jupyter-server imports this package."""
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
