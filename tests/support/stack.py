"""A real hub that logs in through the real local IdP: the stack of the login, browser and
portal tests, written once.

- :func:`hub_with_idp` (context manager): the IdP (its attack mode on with ``tamper=True``)
  and a :class:`~tests.support.hub.HubProcess` whose ``jupyterhub_config.py`` gets the text
  ``config(hub, idp)`` returns (the hub's ports and the IdP's issuer are known by then).
  Afterwards it stops every server, the hub, the proxy and the IdP by PID, and (unless
  ``check_egress=False``) asserts the egress guard's log is empty. Use it in a module-scoped
  fixture::

      @pytest.fixture(scope="module")
      def stack(tmp_path_factory):
          with hub_with_idp(tmp_path_factory.mktemp("login"), login_config()) as s:
              yield s

- :func:`login_config`: that ``config`` for institutional login (:func:`.idp.hub_auth_config`)
  with the local GPU spawner, homes under the hub's directory, plus extra config lines.
- :func:`~tests.support.portal.portal_stack` builds on it for the hub that
  ``hub.portal.configure()`` sets up.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .hub import HubProcess
from .idp import LocalIdP, hub_auth_config

HubConfig = Callable[[HubProcess, LocalIdP], str]

LOCAL_SPAWN = """
c.JupyterHub.spawner_class = "local-gpu"
c.LocalGPUSpawner.inventory_source = "declared"
c.LocalGPUSpawner.home_dir_template = "{home}/{{username}}"
"""


def login_config(*extra: str) -> HubConfig:
    """Institutional login through the IdP, the local GPU spawner, and ``extra`` lines."""

    def config(hub: HubProcess, idp: LocalIdP) -> str:
        spawn = LOCAL_SPAWN.format(home=hub.dir / "home") + "".join(f"{x}\n" for x in extra)
        return hub_auth_config(idp, spawn)

    return config


@contextmanager
def hub_with_idp(
    workdir: Path,
    config: HubConfig,
    *,
    tamper: bool = False,
    check_egress: bool = True,
    idp_kw: dict[str, Any] | None = None,
    **hub_kw: Any,
) -> Iterator[tuple[HubProcess, LocalIdP]]:
    """The IdP and a hub configured by ``config(hub, idp)``, stopped by PID afterwards.

    ``idp_kw`` goes to :class:`LocalIdP` (e.g. ``users_file``), ``hub_kw`` to the hub."""
    hub = HubProcess(workdir / "hub", **hub_kw)  # ports are known before it starts
    idp = LocalIdP(
        workdir / "idp", [f"{hub.url}/hub/oauth_callback"], tamper=tamper, **(idp_kw or {})
    )
    idp.start()
    try:
        hub.config_path.write_text(hub.config_path.read_text() + config(hub, idp))
        hub.start()
        try:
            yield hub, idp
        finally:
            hub.close()
            if check_egress:
                hub.assert_no_egress()
    finally:
        idp.stop()
