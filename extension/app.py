"""The jupyter-server extension application."""

from __future__ import annotations

from jupyter_server.extension.application import ExtensionApp


class PortalExtension(ExtensionApp):
    """sovereign-portal inside the single-user server."""

    name = "sovereign_portal"
