"""Upstream contracts: declared versions are the tested ones, and private names are fenced.

- Every dependency in pyproject.toml has one floor (``>=X.Y``, the major.minor it was tested
  with; a fresh install may test a newer minor of the same major), the installed version
  satisfies every specifier, and JupyterHub and
  oauthenticator are capped below their next major (the upgrade policy in
  docs/reference/upstream.md).
- Every private upstream name in :data:`sovereign_portal.spawners.upstream.PRIVATE_NAMES`
  resolves in the installed versions, and its accessor works on a real object: an upgrade
  that removes one fails here, by name, not in a login.
- No portal module touches a private attribute of JupyterHub's Spawner, app or
  Authenticator classes (the names are read from the installed JupyterHub, so a new one is
  covered too).
"""

from __future__ import annotations

import ast
import tomllib
from importlib import metadata
from multiprocessing.connection import Listener
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version
from sovereign_portal.spawners import upstream
from sovereign_portal.spawners.upstream import (
    PRIVATE_NAMES,
    PrivateName,
    UpstreamChanged,
    resolve,
)

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
CAPPED = {"jupyterhub": 7, "oauthenticator": 18}


def _requirements() -> list[Requirement]:
    project = PYPROJECT["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        reqs += [Requirement(r) for r in extra]
    return reqs


REQUIREMENTS = _requirements()


def test_the_runtime_dependencies_are_all_checked() -> None:
    names = {r.name.lower() for r in REQUIREMENTS}
    assert {"jupyterhub", "oauthenticator", "jupyter-server", "jupyterlab"} <= names
    assert len(REQUIREMENTS) >= 25  # runtime, dask, test and docs extras


@pytest.mark.parametrize("req", REQUIREMENTS, ids=lambda r: r.name)
def test_floor_is_the_tested_major_minor(req: Requirement) -> None:
    installed = Version(metadata.version(req.name))
    floors = [s for s in req.specifier if s.operator == ">="]
    assert len(floors) == 1, f"{req}: declare one floor, >=X.Y (the version CI tests)"
    floor = Version(floors[0].version)
    assert installed in req.specifier, f"installed {req.name} {installed} does not satisfy {req}"
    tested = f"{installed.major}.{installed.minor}"
    # The floor is the major.minor this project was last tested with (set when it was
    # raised); a fresh install may bring a newer minor of the same major, which the
    # specifier allows and this run then tests. A floor of an older major is untested.
    assert floor <= installed and floor.major == installed.major, (
        f"{req}: CI tests {req.name} {installed}; set the floor to >={tested} "
        "(pyproject.toml, and the CHANGELOG), so that what is declared is what is tested"
    )


@pytest.mark.parametrize(("name", "major"), sorted(CAPPED.items()))
def test_jupyterhub_and_oauthenticator_are_capped_below_the_next_major(
    name: str, major: int
) -> None:
    req = next(r for r in REQUIREMENTS if r.name.lower() == name)
    caps = [s for s in req.specifier if s.operator == "<"]
    assert [c.version for c in caps] == [str(major)], req
    assert Version(metadata.version(name)).major == major - 1


def test_spawn_exception_of_jupyterhub_6_is_there() -> None:
    """The reason for the floor: SpawnException (status_code, reason) is JupyterHub 6."""
    from jupyterhub.spawner import SpawnException

    e = SpawnException("no", reason="system_account", status_code=403)
    assert (e.status_code, e.reason, e.log_message) == (403, "system_account", "no")


# -- the fence ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PRIVATE_NAMES, ids=lambda n: n.qualname)
def test_every_fenced_private_name_resolves_in_the_installed_versions(name: PrivateName) -> None:
    assert resolve(name) is not None
    assert name.used_by and name.instead


def test_a_removed_name_fails_loudly_naming_package_version_and_user(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from distributed.deploy.spec import SpecCluster

    monkeypatch.delattr(SpecCluster, "_correct_state")
    with pytest.raises(UpstreamChanged) as e:
        resolve(upstream.DASK_CORRECT_STATE)
    text = str(e.value)
    version = metadata.version("distributed")
    assert (
        f"distributed.deploy.spec.SpecCluster._correct_state is gone in distributed {version}"
        in text
    )
    assert "extension/launchers.py" in text


def test_server_signal_stop_is_a_bound_method_of_the_server() -> None:
    from jupyter_server.serverapp import ServerApp

    app = ServerApp()
    stop = upstream.server_signal_stop(app)
    assert callable(stop) and stop.__self__ is app


def test_listener_socket_is_the_listening_socket() -> None:
    listener = Listener(("127.0.0.1", 0), authkey=b"k")
    try:
        sock = upstream.listener_socket(listener)
        assert sock.getsockname() == listener.address
    finally:
        listener.close()


def test_a_missing_instance_attribute_fails_loudly() -> None:
    class NotAListener:
        _listener = object()

    with pytest.raises(UpstreamChanged, match="has no _socket"):
        upstream.listener_socket(NotAListener())


@pytest.mark.asyncio
async def test_dask_correct_state_applies_a_smaller_worker_spec() -> None:
    from distributed import LocalCluster

    cluster = await LocalCluster(
        n_workers=2,
        processes=False,
        asynchronous=True,
        dashboard_address=None,
    )
    try:
        assert len(cluster.workers) == 2
        cluster.worker_spec = dict(list(cluster.worker_spec.items())[:1])
        await upstream.dask_correct_state(cluster)
        assert len(cluster.workers) == 1
    finally:
        await cluster.close()


# -- no private JupyterHub names outside the fence ------------------------------------------
#: Private attributes JupyterHub sets on instances (not visible on the classes).
INSTANCE_PRIVATES = {"_start_future", "_service_map", "_periodic_callbacks", "_callbacks"}


def _jupyterhub_private_names() -> set[str]:
    from jupyterhub.app import JupyterHub
    from jupyterhub.auth import Authenticator
    from jupyterhub.spawner import LocalProcessSpawner

    names: set[str] = set(INSTANCE_PRIVATES)
    for cls in (LocalProcessSpawner, JupyterHub, Authenticator):
        for k in cls.__mro__:
            if k.__module__.startswith("jupyterhub"):
                names |= {n for n in vars(k) if n.startswith("_") and not n.startswith("__")}
    return names


def _private_uses(tree: ast.AST, names: set[str]) -> list[tuple[int, str]]:
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in names:
            hits.append((node.lineno, node.attr))
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name in names:
            hits.append((node.lineno, f"def {node.name}"))  # an override of a private name
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "hasattr", "setattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and node.args[1].value in names
        ):
            hits.append((node.lineno, f"{node.func.id}(..., {node.args[1].value!r})"))
    return hits


def test_the_scan_finds_the_names_it_must() -> None:
    names = _jupyterhub_private_names()
    assert {"_start_future", "_stop_pending", "_poll_callback", "_log_name"} <= names
    code = (
        "class S:\n"
        "    def _log_name(self): ...\n"
        "    def f(self, app):\n"
        "        return self._stop_pending, getattr(app, '_start_future', None)\n"
    )
    found = {what for _, what in _private_uses(ast.parse(code), names)}
    assert found == {"def _log_name", "_stop_pending", "getattr(..., '_start_future')"}


#: The fenced names themselves: outside upstream.py, only their accessors may reach them.
FENCED = {
    part
    for n in PRIVATE_NAMES
    for part in (n.path.rsplit(".", 1)[-1], *n.on_instance.split("."))
    if part.startswith("_")
}


def test_no_portal_module_touches_private_jupyterhub_names() -> None:
    assert {"_signal_stop", "_correct_state", "_listener", "_socket"} <= FENCED
    names = _jupyterhub_private_names() | FENCED
    hits = []
    for package in ("spawners", "hub", "extension"):
        for path in sorted((REPO / package).rglob("*.py")):
            if path.name == "upstream.py":
                continue
            for line, what in _private_uses(ast.parse(path.read_text()), names):
                hits.append(f"{path.relative_to(REPO)}:{line}: {what}")
    assert hits == [], "use a public route, or an accessor in spawners/upstream.py:\n" + "\n".join(
        hits
    )


def test_the_upgrade_policy_page_lists_the_floors_and_every_private_name() -> None:
    page = (REPO / "docs" / "reference" / "upstream.md").read_text()
    for name in ("jupyterhub", "oauthenticator"):
        req = next(r for r in REQUIREMENTS if r.name.lower() == name)
        assert f"`{name}{req.specifier}`" in page or f"`{name}{_spec(req)}`" in page, req
    for private in PRIVATE_NAMES:
        assert f"`{private.qualname}`" in page, private.qualname


def _spec(req: Requirement) -> str:
    """The specifier as pyproject.toml writes it (floor first)."""
    return ",".join(sorted((str(s) for s in req.specifier), key=lambda s: not s.startswith(">")))


# -- the public route that replaced JupyterHub._start_future --------------------------------
@pytest.mark.asyncio
async def test_wait_hub_listening_returns_once_the_hub_address_accepts(tmp_path: Path) -> None:
    """A stand-in for the hub app whose API address starts listening later (TCP), and one on
    a unix socket (``http+unix://``), as JupyterHub binds in ``start()``."""
    import asyncio
    import socket
    import time
    from types import SimpleNamespace
    from urllib.parse import quote

    from sovereign_portal.spawners.upstream import wait_hub_listening

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = SimpleNamespace(hub=None)  # before init_hub: no address yet
    waiter = asyncio.ensure_future(wait_hub_listening(app, interval=0.05, within=10))
    await asyncio.sleep(0.3)
    app.hub = SimpleNamespace(url=f"http://127.0.0.1:{port}/hub/")
    await asyncio.sleep(0.3)
    assert not waiter.done()  # an address that does not accept yet: still waiting
    t0 = time.monotonic()
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", port)
    try:
        assert await waiter is True
        assert time.monotonic() - t0 < 2
    finally:
        server.close()
        await server.wait_closed()

    path = tmp_path / "hub.sock"
    unix = await asyncio.start_unix_server(lambda r, w: w.close(), str(path))
    try:
        app = SimpleNamespace(hub=SimpleNamespace(url=f"http+unix://{quote(str(path), '')}/hub/"))
        assert await wait_hub_listening(app, interval=0.05, within=5) is True
    finally:
        unix.close()
        await unix.wait_closed()
    closed = SimpleNamespace(hub=SimpleNamespace(url=f"http://127.0.0.1:{port}/hub/"))
    assert await wait_hub_listening(closed, interval=0.05, within=0.5) is False
