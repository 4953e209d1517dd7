"""The jupyter-server extension application."""

from __future__ import annotations

from jupyter_server.extension.application import ExtensionApp

from .placement import PlacementHandler


class PortalExtension(ExtensionApp):
    """sovereign-portal inside the single-user server."""

    name = "sovereign_portal"

    def initialize_handlers(self) -> None:
        self.handlers.extend([(r"/sovereign-portal/api/placement", PlacementHandler)])
