"""Every image definition installs only pinned, hashed files from this repository.

The lint rules live in tests/support/images.py; the last tests feed them bad definitions to
show that they catch what they claim to.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import tomllib
from pathlib import Path

import pytest

from tests.support.images import (
    IMAGES,
    input_names,
    lint_def,
    lint_dockerfile,
    lock_entries,
    normalise,
    parse_def,
    parse_dockerfile,
    venv_copies,
)
from tests.support.paths import REPO

pytestmark = pytest.mark.unit

NAMES = ["base", "gpu", "course-example"]
DOCKERFILES = sorted(IMAGES.glob("*/Dockerfile"))
DEFS = sorted(IMAGES.glob("*/*.def"))
LOCKS = sorted(IMAGES.glob("*/requirements.txt"))
CONFIG = IMAGES / "config"


def ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(IMAGES)) for p in paths]


def test_every_image_has_both_definitions_and_a_lock() -> None:
    for name in NAMES:
        d = IMAGES / name
        assert (d / "Dockerfile").is_file(), d
        assert (d / "Dockerfile.dockerignore").is_file(), d
        assert len(list(d.glob("*.def"))) == 1, d
        assert (d / "requirements.in").is_file() and (d / "requirements.txt").is_file(), d
    assert {p.parent.name for p in DOCKERFILES} == set(NAMES)
    assert {p.parent.name for p in DEFS} == set(NAMES)


@pytest.mark.parametrize("path", DOCKERFILES, ids=ids(DOCKERFILES))
def test_dockerfile_lint(path: Path) -> None:
    assert lint_dockerfile(path) == []


@pytest.mark.parametrize("path", DEFS, ids=ids(DEFS))
def test_def_lint(path: Path) -> None:
    assert lint_def(path) == []


@pytest.mark.parametrize("path", LOCKS, ids=ids(LOCKS))
def test_lock_is_pinned_hashed_and_covers_its_inputs(path: Path) -> None:
    pins, problems = lock_entries(path)
    assert problems == []
    missing = input_names(path.with_suffix(".in")) - set(pins)
    assert not missing, f"{path}: inputs not in the lock (run images/lock.sh): {missing}"


def test_derived_locks_agree_with_the_base_lock() -> None:
    base, _ = lock_entries(IMAGES / "base" / "requirements.txt")
    for name in ("gpu", "course-example"):
        pins, _ = lock_entries(IMAGES / name / "requirements.txt")
        assert set(base) <= set(pins), f"{name} lock lacks base packages"
        differ = {k: (base[k], pins[k]) for k in base if pins[k] != base[k]}
        assert not differ, f"{name} lock disagrees with the base lock: {differ}"


def test_base_input_covers_the_portals_dependencies() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["dask"]
    names = {normalise(re.match(r"[A-Za-z0-9._-]+", d).group(0)) for d in wanted}  # type: ignore[union-attr]
    missing = names - input_names(IMAGES / "base" / "requirements.in")
    assert not missing, f"images/base/requirements.in lacks portal dependencies: {missing}"


def test_gpu_lock_has_cuda_torch() -> None:
    pins, _ = lock_entries(IMAGES / "gpu" / "requirements.txt")
    major, minor = (int(x) for x in pins["torch"].split(".")[:2])
    assert (major, minor) >= (2, 13)
    assert "+cpu" not in pins["torch"]
    # PyPI's Linux torch wheels pull the CUDA runtime as wheels; their presence is the CUDA build.
    assert "nvidia-cuda-runtime" in pins or "nvidia-cuda-runtime-cu12" in pins
    assert any(k.startswith("nvidia-nccl") for k in pins)


def test_python_version_is_the_same_everywhere() -> None:
    lock_sh = (IMAGES / "lock.sh").read_text()
    version = re.search(r"^PYTHON_VERSION=(\d+\.\d+)$", lock_sh, re.M).group(1)  # type: ignore[union-attr]
    base_from = next(
        i for i in parse_dockerfile(IMAGES / "base" / "Dockerfile") if i.keyword == "ARG"
    )
    assert f"python:{version}-" in base_from.args
    assert parse_def(IMAGES / "base" / "base.def").header["From"].startswith(f"python:{version}-")


def test_derived_images_build_on_base() -> None:
    for name in ("gpu", "course-example"):
        froms = [
            i.args for i in parse_dockerfile(IMAGES / name / "Dockerfile") if i.keyword == "FROM"
        ]
        assert froms == ["${BASE_IMAGE}"], name
        header = parse_def(next((IMAGES / name).glob("*.def"))).header
        assert header == {"Bootstrap": "localimage", "From": "base.sif"}, name


# -- the JupyterLab settings every image ships ------------------------------------------------


def test_base_image_ships_the_no_egress_settings() -> None:
    expected = {
        ("images/config/jupyter_server_config.json", "etc/jupyter/jupyter_server_config.json"),
        ("extension/etc/overrides.json", "share/jupyter/lab/settings/overrides.json"),
    }  # fmt: skip
    assert expected <= set(venv_copies(IMAGES / "base" / "Dockerfile"))
    post = "\n".join(parse_def(IMAGES / "base" / "base.def").sections["post"])
    for _, dest in expected:
        assert f"/opt/venv/{dest}" in post


def test_server_settings_name_real_jupyterlab_options() -> None:
    from jupyterlab.extensions import MANAGERS
    from jupyterlab.handlers.announcements import CheckForUpdateABC
    from jupyterlab.labapp import LabApp
    from traitlets.utils.importstring import import_item

    data = json.loads((CONFIG / "jupyter_server_config.json").read_text())
    lab = data["LabApp"]
    assert set(lab) == {"news_url", "check_for_updates_class", "extension_manager"}
    traits = LabApp.class_traits(config=True)
    assert set(lab) <= set(traits)
    assert lab["news_url"] is None and traits["news_url"].allow_none
    checker = import_item(lab["check_for_updates_class"])
    assert issubclass(checker, CheckForUpdateABC) and checker.__name__ == "NeverCheckForUpdate"
    assert lab["extension_manager"] == "readonly" and "readonly" in MANAGERS


def test_lab_overrides_match_the_installed_schemas() -> None:
    import jupyterlab

    schemas = Path(jupyterlab.__file__).parents[4] / "share" / "jupyter" / "lab" / "schemas"
    assert importlib.metadata.version("jupyterlab").startswith("4.")
    overrides = json.loads((REPO / "extension" / "etc" / "overrides.json").read_text())
    assert overrides["@jupyterlab/apputils-extension:notification"] == {
        "fetchNews": "false",
        "checkForUpdates": False,
    }
    assert overrides["@jupyterlab/extensionmanager-extension:plugin"]["enabled"] is False
    for plugin, values in overrides.items():
        package, _, name = plugin.partition(":")
        schema = json.loads((schemas / package / f"{name}.json").read_text())
        for key, value in values.items():
            prop = schema["properties"][key]
            if "oneOf" in prop:
                assert value in [o["const"] for o in prop["oneOf"]], (plugin, key)
            else:
                assert type(value).__name__ == {"boolean": "bool", "string": "str"}[prop["type"]]


# -- the rules catch what they claim to -------------------------------------------------------

BAD_DOCKERFILE = """\
FROM python:3.11-slim
COPY images/base/requirements.in /r.txt
COPY no/such/file /x
ADD https://example.org/get.sh /get.sh
RUN curl -fsSL https://example.org/install.sh | sh
RUN pip install --isolated numpy
RUN pip install --isolated -r /r.txt
RUN python -m pip install --require-hashes -r /nowhere.txt
RUN pip install --isolated --no-deps --no-index /not/copied
RUN pip install --isolated --require-hashes --extra-index-url=https://m.example -r /r.txt
"""

BAD_DEF = """\
Bootstrap: library
From: ubuntu

%files
    missing.txt /opt/missing.txt

%post
    wget -O- https://example.org/x.sh | bash
    pip install torch
"""


def test_the_lint_catches_bad_definitions(tmp_path: Path) -> None:
    # Files must sit inside the repository for relative paths; use a throwaway folder there.
    d = REPO / "images" / f".lint-selftest-{tmp_path.name}"
    d.mkdir()
    try:
        (d / "Dockerfile").write_text(BAD_DOCKERFILE)
        (d / "bad.def").write_text(BAD_DEF)
        text = "\n".join(lint_dockerfile(d / "Dockerfile"))
        for needle in [
            "COPY source no/such/file does not exist",
            "COPY/ADD of a URL https://example.org/get.sh",
            "runs curl",
            "pipes something into a shell",
            "pip install of ['numpy'] without a lock",
            "pip install -r without --require-hashes",
            "/r.txt comes from images/base/requirements.in",
            "pip install without --isolated",
            "installs /nowhere.txt, which no COPY",
            "installs '/not/copied', which is not a copied source tree",
            "pip install names an index",
        ]:
            assert needle in text, f"{needle!r} not reported:\n{text}"
        text = "\n".join(lint_def(d / "bad.def"))
        for needle in [
            "Bootstrap must be docker or localimage",
            "%files source missing.txt does not exist",
            "runs wget",
            "pipes something into a shell",
            "pip install of ['torch'] without a lock",
        ]:
            assert needle in text, f"{needle!r} not reported:\n{text}"
        (d / "requirements.txt").write_text(
            "numpy==2.0 \\\n    --hash=sha256:" + "a" * 64 + "\nrequests>=2\n-e .\ntorch==2.14.1\n"
        )
        _, problems = lock_entries(d / "requirements.txt")
        assert problems == [
            "requirements.txt: 'requests>=2' is not pinned with ==",
            "requirements.txt: option line '-e' is not allowed in a lock",
            "requirements.txt: torch==2.14.1 lacks sha256 hashes (or has other options)",
        ]
    finally:
        for p in d.iterdir():
            p.unlink()
        d.rmdir()
