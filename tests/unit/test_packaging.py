"""The built wheel: import names, package data, the config.d file, the prebuilt JupyterLab
extension and the entry points."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.support.paths import REPO

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("build")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(REPO),
        ],
        check=True,
        cwd=build,
        capture_output=True,
    )
    (whl,) = out.glob("sovereign_portal-*.whl")
    return zipfile.ZipFile(whl)


def test_wheel_has_only_namespaced_packages(wheel: zipfile.ZipFile) -> None:
    tops = {n.split("/")[0] for n in wheel.namelist()}
    assert {t for t in tops if not t.endswith((".dist-info", ".data"))} == {"sovereign_portal"}
    assert "sovereign_portal/__init__.py" not in wheel.namelist()  # a namespace package


def test_wheel_carries_package_data(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    for must in [
        "sovereign_portal/hub/cli.py",
        "sovereign_portal/spawners/local.py",
        "sovereign_portal/spawners/sites/example.toml",
        "sovereign_portal/extension/app.py",
        "sovereign_portal/hub/idp/server.js",
        "sovereign_portal/hub/idp/package.json",
        "sovereign_portal/hub/idp/users.json",
        "sovereign_portal/hub/store.py",
        "sovereign_portal/hub/migrations/env.py",
        "sovereign_portal/hub/migrations/script.py.mako",
        "sovereign_portal/hub/migrations/versions/0001_accounts_and_audit.py",
        "sovereign_portal/hub/templates/usage.html",  # the usage pages' templates
        "sovereign_portal/hub/templates/usage_macros.html",
    ]:
        assert must in names, must
    conf = [n for n in names if n.endswith("jupyter_server_config.d/sovereign_portal.json")]
    assert conf and ".data/data/etc/jupyter/" in conf[0]
    assert b'"sovereign_portal.extension": true' in wheel.read(conf[0])
    lab = [n for n in names if n.endswith("share/jupyter/lab/settings/overrides.json")]
    assert lab and b'"fetchNews": "false"' in wheel.read(lab[0])
    assert not [n for n in names if "node_modules" in n]


def test_wheel_ships_the_prebuilt_labextension(wheel: zipfile.ZipFile) -> None:
    """The JupyterLab extension lands in share/jupyter/labextensions/sovereign-portal-lab/
    with its remote entry, the chunks it loads, and install.json (the pip package)."""
    prefix = "share/jupyter/labextensions/sovereign-portal-lab/"
    shipped = {
        n.split(".data/data/", 1)[1]: n for n in wheel.namelist() if ".data/data/" + prefix in n
    }
    built = REPO / "extension/labextension/prebuilt"
    want = {prefix + str(p.relative_to(built)) for p in built.rglob("*") if p.is_file()}
    assert want and set(shipped) == want
    pkg = json.loads(wheel.read(shipped[prefix + "package.json"]))
    assert pkg["name"] == "sovereign-portal-lab"
    entry = prefix + pkg["jupyterlab"]["_build"]["load"]
    assert entry in shipped and b"sovereign-portal-lab" in wheel.read(shipped[entry])
    install = json.loads(wheel.read(shipped[prefix + "install.json"]))
    assert install["packageManager"] == "python" and install["packageName"] == "sovereign-portal"
    assert not [n for n in wheel.namelist() if "/labextension/src/" in n or n.endswith(".ts")]


def test_wheel_declares_entry_points_and_dependencies(wheel: zipfile.ZipFile) -> None:
    ep = next(n for n in wheel.namelist() if n.endswith("entry_points.txt"))
    text = wheel.read(ep).decode()
    assert "sovereign-portal = sovereign_portal.hub.cli:main" in text
    assert "local-gpu = sovereign_portal.spawners.local:LocalGPUSpawner" in text
    assert "institutional = sovereign_portal.hub.auth:InstitutionalAuthenticator" in text
    meta = wheel.read(next(n for n in wheel.namelist() if n.endswith("METADATA"))).decode()
    for dep in (
        "jupyterhub",
        "oauthenticator",
        "pydantic",
        "nvidia-ml-py",
        "SQLAlchemy",
        "alembic",
    ):
        assert f"Requires-Dist: {dep}" in meta


def test_no_bare_top_level_imports() -> None:
    code = (
        "import importlib.util as u; "
        "print([m for m in ('hub', 'extension', 'spawners') if u.find_spec(m)])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path("/")
    )
    assert out.stdout.strip() == "[]"


#: Words that mark a test-only hook (the IdP's attack mode lives in tests/support only).
TEST_HOOK_WORDS = (b"tamper", b"__test__")


def test_wheel_ships_no_test_hooks(wheel: zipfile.ZipFile) -> None:
    """No test package and no test hook in any shipped file (code, data, metadata)."""
    names = wheel.namelist()
    assert not [n for n in names if n.startswith("tests/") or "/tests/" in n]
    found = [
        (name, word.decode())
        for name in names
        for word in TEST_HOOK_WORDS
        if word in wheel.read(name).lower()
    ]
    assert found == [], f"test hooks in the wheel: {found}"
    # The words do name the hook: the test tree's IdP extension has them.
    hook = (REPO / "tests/support/idp_tamper.mjs").read_bytes().lower()
    assert all(word in hook for word in TEST_HOOK_WORDS)


def test_prebuilt_labextension_is_current() -> None:
    """prebuilt/ was built from the TypeScript sources as they are (build.sh --check hashes
    them against prebuilt.sha256): a source edit without a rebuild fails here."""
    out = subprocess.run(
        ["bash", str(REPO / "extension/labextension/build.sh"), "--check"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert "current" in out.stdout
