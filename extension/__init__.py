"""sovereign_portal.extension: the jupyter-server extension inside each single-user server."""

from typing import Any


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    from .app import PortalExtension

    return [{"module": "sovereign_portal.extension.app", "app": PortalExtension}]
