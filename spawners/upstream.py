"""The one fence around private names of the projects the portal builds on.

The portal goes through public routes where upstream has them: JupyterHub's REST API and
scopes, ``Spawner.pending``, ``start_polling``/``stop_polling``, the hub's own API
address to know that the hub has started (:func:`wait_hub_listening`, instead of
``JupyterHub._start_future``). What has no public route yet is reached here,
and only here: one accessor per private name, each listed in :data:`PRIVATE_NAMES` with
where it is used and what would replace it. ``tests/unit/test_upstream.py`` resolves every
name against the installed versions, so an upgrade that removes or renames one fails that
test (and the accessor raises :class:`UpstreamChanged`, naming the package and version),
instead of failing somewhere in a login or a session.

Imports are lazy: an optional dependency (distributed) is imported only when its
accessor is called.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import time
from dataclasses import dataclass
from importlib import metadata
from typing import Any
from urllib.parse import unquote, urlparse


class UpstreamChanged(RuntimeError):
    """A private upstream name the portal relies on is gone: the installed version differs
    from the tested one. The message names the package, its version and the name."""


@dataclass(frozen=True)
class PrivateName:
    """A private attribute of an upstream project, and why the portal still uses it."""

    distribution: str  #: the package on PyPI (for its installed version); "" for stdlib
    module: str  #: the module that holds it
    path: str  #: attribute path from the module: ``name`` or ``Class.name``
    used_by: str  #: the portal code that relies on it
    instead: str  #: the public route that would replace it, when upstream has one
    #: private attributes set on *instances* of ``path`` (checked by the accessor on a
    #: real object, since a class does not carry them)
    on_instance: str = ""

    @property
    def qualname(self) -> str:
        tail = f"().{self.on_instance}" if self.on_instance else ""
        return f"{self.module}.{self.path}{tail}"


SERVER_SIGNAL_STOP = PrivateName(
    "jupyter-server",
    "jupyter_server.serverapp",
    "ServerApp._signal_stop",
    "extension/app.py: SIGINT stops the server cleanly",
    "none public: ServerApp installs it for SIGTERM only",
)
DASK_CORRECT_STATE = PrivateName(
    "distributed",
    "distributed.deploy.spec",
    "SpecCluster._correct_state",
    "extension/launchers.py: apply a new worker_spec now",
    "SpecCluster.scale(n), awaited on an asynchronous cluster",
)
LISTENER_SOCKET = PrivateName(
    "",
    "multiprocessing.connection",
    "Listener",
    "extension/client.py: accept() of torch ranks with a timeout",
    "socket.create_server + multiprocessing.connection.Connection over it",
    on_instance="_listener._socket",
)

#: Every private upstream name the portal relies on. Keep it short.
PRIVATE_NAMES: tuple[PrivateName, ...] = (
    SERVER_SIGNAL_STOP,
    DASK_CORRECT_STATE,
    LISTENER_SOCKET,
)


def _version(distribution: str) -> str:
    if not distribution:
        import sys

        return "Python " + sys.version.split()[0]
    try:
        return f"{distribution} {metadata.version(distribution)}"
    except metadata.PackageNotFoundError:
        return f"{distribution} (not installed)"


def resolve(name: PrivateName) -> Any:
    """The object ``name`` refers to in the installed version, or :class:`UpstreamChanged`."""
    try:
        obj: Any = importlib.import_module(name.module)
        for part in name.path.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise UpstreamChanged(
            f"{name.qualname} is gone in {_version(name.distribution)} ({e}); "
            f"{name.used_by} relies on it. Public route: {name.instead}. Install the "
            "version pyproject.toml declares, or port that code."
        ) from None
    return obj


# -- public routes used instead of private names --------------------------------------------
async def _accepts(url: str) -> bool:
    """True when the server at ``url`` (http, https or http+unix) accepts a connection."""
    u = urlparse(url)
    try:
        if u.scheme.startswith("http+unix"):
            opened = asyncio.open_unix_connection(unquote(u.netloc))
        else:
            port = u.port or (443 if u.scheme == "https" else 80)
            opened = asyncio.open_connection(u.hostname or "127.0.0.1", port)
        _, writer = await asyncio.wait_for(opened, 2)
    except (OSError, TimeoutError, ValueError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def wait_hub_listening(app: Any, interval: float = 0.2, within: float = 3600) -> bool:
    """Wait until the hub's API address accepts connections: the hub has started.

    JupyterHub binds it only in ``start()``, after ``initialize()`` has created a spawner
    (and called its ``load_state``) for every server in the database. Public attributes
    only (``app.hub.url``). False after ``within`` seconds.
    """
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        hub = getattr(app, "hub", None)
        url = getattr(hub, "url", "")
        if url and await _accepts(url):
            return True
        await asyncio.sleep(interval)
    return False


# -- one accessor per name ------------------------------------------------------------------
def server_signal_stop(serverapp: Any) -> Any:
    """Jupyter Server's own clean-stop signal handler of ``serverapp`` (bound)."""
    resolve(SERVER_SIGNAL_STOP)
    return serverapp._signal_stop


async def dask_correct_state(cluster: Any) -> None:
    """Make an asynchronous SpecCluster start or stop workers to match its worker_spec."""
    resolve(DASK_CORRECT_STATE)
    await cluster._correct_state()


def resolve_on(name: PrivateName, obj: Any) -> Any:
    """``name.on_instance`` looked up on ``obj`` (an instance of ``name.path``)."""
    resolve(name)
    for part in name.on_instance.split("."):
        if not hasattr(obj, part):
            raise UpstreamChanged(
                f"{name.qualname}: {type(obj).__qualname__} has no {part} in "
                f"{_version(name.distribution)}; {name.used_by} relies on it. Public route: "
                f"{name.instead}."
            )
        obj = getattr(obj, part)
    return obj


def listener_socket(listener: Any) -> Any:
    """The listening socket of a ``multiprocessing.connection.Listener`` (AF_INET)."""
    return resolve_on(LISTENER_SOCKET, listener)


__all__ = [
    "PRIVATE_NAMES",
    "PrivateName",
    "UpstreamChanged",
    "dask_correct_state",
    "listener_socket",
    "resolve",
    "resolve_on",
    "server_signal_stop",
    "wait_hub_listening",
]
