"""Fixtures of the extension layer: pytest-jupyter's in-process Jupyter server with the
sovereign_portal extension, against the real portal service. Written once for every file here.

- ``server_token`` (module): the hub API token of the notebook server under test. The
  service knows it as alice, a researcher. A module overrides this fixture to pick its own.
- ``service`` (module): :class:`~tests.support.sessions.PortalServiceThread`, the real
  portal service (admission, catalog, device leases) in a background thread, with hub
  authentication replaced by a token table ``{server_token: alice}``; stopped afterwards.
- ``jp_server_config`` (test): pytest-jupyter's server config: the extension pointed at
  ``service`` with ``server_token``, a 0.2 s poll, 1 GiB Dask workers, and session files
  under the test's own ``tmp_path / "sessions"`` (no test sees another's leftovers).

The REST helper of these tests is :func:`tests.support.sessions.extension_call`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.sessions import PortalServiceThread


@pytest.fixture(scope="module")
def server_token() -> str:
    return "server-token-of-alice"


@pytest.fixture(scope="module")
def service(server_token: str) -> Iterator[PortalServiceThread]:
    svc = PortalServiceThread(None, {server_token: {"name": "alice", "groups": ["researcher"]}})
    yield svc.start()
    svc.stop()


@pytest.fixture
def jp_server_config(
    service: PortalServiceThread, server_token: str, tmp_path: Path
) -> dict[str, Any]:
    return {
        "ServerApp": {"jpserver_extensions": {"sovereign_portal.extension": True}},
        "PortalExtension": {
            "hub_service_url": service.url,
            "hub_api_token": server_token,
            "poll_interval": 0.2,
            "memory_per_worker": "1GiB",
            "session_root": str(tmp_path / "sessions"),
        },
    }
