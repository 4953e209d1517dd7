"""Smoke test of the base notebook image's Python environment, without a container engine.

The environment is built the way images/base/Dockerfile builds it: a fresh virtual
environment, ``pip install --isolated --require-hashes --only-binary=:all:`` of
images/base/requirements.txt from the package index, then the portal from the source files the
Dockerfile copies (``--no-deps --no-index``), then the settings files it copies into /opt/venv.
A real JupyterHub then starts ``jupyterhub-singleuser`` from that environment with no extra
arguments, under the egress guard, and the test checks from outside that:

- the portal's jupyter-server extension is loaded (its REST endpoint answers);
- JupyterLab's news, update check and extension manager answer without a request leaving the
  machine, because of the image's own settings;
- the egress log stays empty.

Building the environment takes about a minute; it is cached outside the repository, keyed by the
lock file's hash (``SOVEREIGN_IMAGE_CACHE``, default ~/.cache/sovereign-portal/image-envs).
The portal and the settings are reinstalled on every run.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.hub import HubProcess
from tests.support.images import IMAGES, portal_sources, venv_copies
from tests.support.paths import REPO, guarded_env

# Building the environment on a machine with a cold pip cache downloads ~100 MB.
pytestmark = [pytest.mark.hub, pytest.mark.timeout(600)]

DOCKERFILE = IMAGES / "base" / "Dockerfile"
LOCK = IMAGES / "base" / "requirements.txt"
PY = f"{sys.version_info.major}.{sys.version_info.minor}"
PIP = ["-m", "pip", "--disable-pip-version-check", "--no-input"]


def _run(argv: list[str], timeout: float) -> None:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if p.returncode:
        raise RuntimeError(
            f"{argv[:6]} exited {p.returncode}:\n{p.stdout[-3000:]}{p.stderr[-3000:]}"
        )


def build_image_env() -> Path:
    """The base image's environment, built from the lock (cached by the lock's hash)."""
    lock_sh = (IMAGES / "lock.sh").read_text()
    if f"PYTHON_VERSION={PY}\n" not in lock_sh:
        raise RuntimeError(f"the image lock targets another Python than this one ({PY})")
    cache = Path(
        os.environ.get("SOVEREIGN_IMAGE_CACHE", Path.home() / ".cache/sovereign-portal/image-envs")
    )
    key = hashlib.sha256(LOCK.read_bytes() + PY.encode()).hexdigest()[:16]
    venv = cache / f"base-py{PY}-{key}"
    if not (venv / ".complete").exists():
        building = cache / f"{venv.name}.building-{os.getpid()}"
        shutil.rmtree(building, ignore_errors=True)
        building.mkdir(parents=True)
        # Same interpreter as the image (the lock targets one Python version), no pip config.
        _run([sys.executable, "-m", "venv", str(building)], 120)
        py = str(building / "bin" / "python")
        _run(
            [py, *PIP, "install", "--isolated", "--require-hashes", "--only-binary=:all:",
             "-r", str(LOCK)],
            600,
        )  # fmt: skip
        (building / ".complete").write_text(LOCK.name + " " + key + "\n")
        shutil.rmtree(venv, ignore_errors=True)
        building.rename(venv)  # console scripts keep the old path in their #! line: see below
    return venv


def install_portal_and_settings(venv: Path, work: Path) -> None:
    """What the Dockerfile does after the lock: the portal, pip check, the settings files."""
    src = work / "portal"
    for rel, dest in portal_sources(DOCKERFILE):
        target = src / dest
        target.parent.mkdir(parents=True, exist_ok=True)
        if (REPO / rel).is_dir():
            shutil.copytree(REPO / rel, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / rel, target)
    py = str(venv / "bin" / "python")
    _run(
        [py, *PIP, "install", "--isolated", "--no-deps", "--no-build-isolation", "--no-index",
         "--force-reinstall", str(src)],
        300,
    )  # fmt: skip
    _run([py, *PIP, "check"], 120)
    copies = venv_copies(DOCKERFILE)
    assert len(copies) >= 2, copies
    # Forget what a previous run copied into the cached environment, so that a file the
    # Dockerfile no longer copies cannot make this test pass.
    manifest = venv / ".sovereign-copied"
    if manifest.exists():
        for line in manifest.read_text().splitlines():
            (venv / line).unlink(missing_ok=True)
    for rel, dest in copies:
        (venv / dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, venv / dest)
    manifest.write_text("".join(dest + "\n" for _, dest in copies))


@pytest.fixture(scope="module")
def image_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = build_image_env()
    install_portal_and_settings(venv, tmp_path_factory.mktemp("image-build"))
    return venv


def singleuser_cmd(venv: Path) -> list[str]:
    # The cached environment was renamed after it was built, so run the console script through
    # the environment's own interpreter rather than trusting its #! line.
    return [str(venv / "bin" / "python"), str(venv / "bin" / "jupyterhub-singleuser")]


@pytest.fixture(scope="module")
def hub(image_env: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    d = tmp_path_factory.mktemp("image-hub")
    root_args = ["--allow-root"] if os.getuid() == 0 else []
    config = f"""
c.JupyterHub.authenticator_class = "dummy"
c.JupyterHub.spawner_class = "simple"
c.SimpleLocalProcessSpawner.home_dir_template = {str(d / "home" / "{username}")!r}
c.Spawner.cmd = {singleuser_cmd(image_env)!r}
c.Spawner.args = {root_args!r}
c.Spawner.default_url = "/lab"
c.Spawner.env_keep = ["PYTHONPATH", "EGRESS_LOG", "LANG", "LC_ALL"]
c.Spawner.environment = {{"PATH": {f"{image_env}/bin:/usr/bin:/bin"!r}}}
"""
    h = HubProcess(d, config)
    h.start()
    try:
        yield h
    finally:
        h.close()


def page_config(text: str) -> dict[str, Any]:
    m = re.search(r'<script id="jupyter-config-data"[^>]*>(.*?)</script>', text, re.S)
    assert m, text[:2000]
    data: dict[str, Any] = json.loads(html.unescape(m.group(1)))
    return data


def test_image_env_serves_the_portal_without_egress(hub: HubProcess, image_env: Path) -> None:
    user = "imgsmoke"
    hub.spawn(user, {})
    state = hub.api("GET", f"/users/{user}").json()
    assert state["servers"][""]["ready"]

    # The server is the image environment's, runs under the guard, with no sovereign arguments.
    pid = int(hub.api("GET", f"/users/{user}", params={"include_stopped_servers": "1"}).json()[
        "servers"][""]["state"]["pid"])  # fmt: skip
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert cmdline[0].decode() == str(image_env / "bin" / "python"), cmdline
    assert not any(b"news_url" in a or b"extension_manager" in a for a in cmdline), cmdline
    environ = dict(
        e.split(b"=", 1)
        for e in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if b"=" in e
    )
    assert environ[b"EGRESS_LOG"].decode() == str(hub.egress_log)
    assert b"egress_guard" in environ[b"PYTHONPATH"]

    # The portal's jupyter-server extension, installed from the copied source, is loaded.
    r = hub.server_get(user, "sovereign-portal/api/placement")
    assert r.status_code == 200, r.text
    assert "devices" in r.json()

    # JupyterLab's outward features, each answered locally because of the image's settings.
    r = hub.server_get(user, "lab/api/news")
    assert r.status_code == 200, r.text
    assert r.json()["news"] == []
    r = hub.server_get(user, "lab/api/update")
    assert r.status_code == 200, r.text
    assert r.json()["notification"] is None
    r = hub.server_get(user, "lab/api/extensions?query=numpy&page=1&per_page=10")
    assert r.status_code == 200, r.text
    r = hub.server_get(user, "lab/api/settings/@jupyterlab/apputils-extension:notification")
    assert r.status_code == 200, r.text
    props = r.json()["schema"]["properties"]
    assert props["fetchNews"]["default"] == "false"
    assert props["checkForUpdates"]["default"] is False
    r = hub.server_get(user, "lab/api/settings/@jupyterlab/extensionmanager-extension:plugin")
    assert r.json()["schema"]["properties"]["enabled"]["default"] is False

    r = hub.server_get(user, "lab")
    assert r.status_code == 200, r.text
    cfg = page_config(r.text)
    assert cfg["news"] == {"disabled": True}
    assert cfg["extensionManager"]["name"] == "read-only"
    assert cfg["extensionManager"]["can_install"] is False

    hub.stop_server(user)
    hub.assert_no_egress()


def test_the_guard_is_live_in_the_image_env(image_env: Path, tmp_path: Path) -> None:
    """The empty egress log above means something: the same guard refuses and logs here."""
    log = tmp_path / "egress.log"
    p = subprocess.run(
        [str(image_env / "bin" / "python"), "-c",
         "import socket\ntry:\n socket.getaddrinfo('jupyterlab.github.io', 443)\n"
         "except OSError as e:\n print(e)"],
        env=guarded_env(log), capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert "egress refused" in p.stdout
    assert "jupyterlab.github.io" in log.read_text()
