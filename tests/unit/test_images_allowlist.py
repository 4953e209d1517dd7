"""The operator's image allow-list and the Apptainer argv built from a chosen image."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sovereign_portal.spawners.images import (
    ImageAllowList,
    ImageError,
    NotebookImage,
    apptainer_argv,
    forward_env,
    load_image_allow_list,
)

from tests.support.paths import REPO

pytestmark = pytest.mark.unit

A = {"name": "a", "location": "/s/a.sif"}
EXAMPLE = REPO / "images" / "allow-list.example.toml"


def allow_list(**overrides: Any) -> ImageAllowList:
    data: dict[str, Any] = {
        "default": "base",
        "images": [
            {"name": "base", "location": "/sif/base.sif", "gpu": False},
            {"name": "gpu", "location": "/sif/gpu.sif", "groups": ["researchers"]},
            {"name": "ml101", "location": "docker://reg.example/c/ml101:1", "courses": ["ml101"]},
        ],
    }
    data.update(overrides)
    return load_image_allow_list(data)


def test_example_file_loads_and_builds_argv() -> None:
    allow = load_image_allow_list(EXAMPLE)
    assert [i.name for i in allow.images] == ["base", "gpu", "ml101"]
    assert allow.argv("gpu", {"project-climate"}) == [
        "apptainer", "exec", "--nv", "--cleanenv",
        "--bind", "/scratch", "--bind", "/datasets:/datasets:ro",
        "/shared/images/sovereign-portal/gpu-2026.11.sif",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "groups", "course", "expected"),
    [
        ("base", set(), None, "base"),
        ("gpu", {"researchers"}, None, "gpu"),
        ("ml101", {"ml101"}, None, "ml101"),
        (None, set(), None, "base"),  # the default
        (None, {"ml101"}, "ml101", "ml101"),  # the course's image
        (None, set(), "ml101", "base"),  # not in the course group: the default
    ],
)
def test_choose(name: str | None, groups: set[str], course: str | None, expected: str) -> None:
    assert allow_list().choose(name, groups, course).name == expected


@pytest.mark.parametrize(
    ("name", "groups"),
    [
        ("gpu", {"students"}),  # on the list, not for this group
        ("ml101", {"researchers"}),
        ("pytorch-latest", {"researchers"}),  # not on the list at all
        ("/tmp/evil.sif", set()),  # a path is never a name
        ("docker://evil/x", set()),
        ("--bind=/:/host", set()),
    ],
)
def test_refused_names_list_the_allowed_ones(name: str, groups: set[str]) -> None:
    with pytest.raises(ImageError) as e:
        allow_list().argv(name, groups)
    msg = str(e.value)
    assert "is not available to you" in msg
    allowed = [i.name for i in allow_list().available_to(groups)]
    assert msg.endswith(f"Choose one of: {', '.join(allowed)}.")
    assert e.value.reason == "image_not_allowed"


def test_long_name_is_cut_in_the_message() -> None:
    with pytest.raises(ImageError) as e:
        allow_list().choose("x" * 10_000)
    assert len(str(e.value)) < 200


def test_no_choice_and_no_default() -> None:
    with pytest.raises(ImageError, match="no default") as e:
        allow_list(default=None).choose(None, {"students"})
    assert e.value.reason == "image_missing"
    with pytest.raises(ImageError, match="No image is open to your groups"):
        load_image_allow_list(
            {"images": [{"name": "gpu", "location": "/s/g.sif", "groups": ["r"]}]}
        ).choose(None)


def test_argv_shapes() -> None:
    gpu = NotebookImage(name="gpu", location="/sif/gpu.sif")
    cpu = NotebookImage(name="cpu", location="oras://reg.example/img/cpu:2026.11", gpu=False)
    assert apptainer_argv(gpu) == ["apptainer", "exec", "--nv", "--cleanenv", "/sif/gpu.sif"]
    assert apptainer_argv(cpu, apptainer="/opt/apptainer/bin/apptainer", cleanenv=False) == [
        "/opt/apptainer/bin/apptainer", "exec", "oras://reg.example/img/cpu:2026.11",
    ]  # fmt: skip
    assert apptainer_argv(gpu, env_file="/run/user/1000/sp.env")[-3:] == [
        "--env-file", "/run/user/1000/sp.env", "/sif/gpu.sif",
    ]  # fmt: skip
    with pytest.raises(ImageError):
        apptainer_argv(gpu, env_file="relative.env")


@pytest.mark.parametrize(
    "location",
    [
        "base.sif",  # relative
        "/sif/../etc/base.sif",
        "/sif/base.img",  # not a .sif
        "-/sif/base.sif",
        "--fakeroot",
        "/sif/base .sif",
        "/sif/base.sif;rm -rf /",
        "docker://",
        "docker://-x",
        "docker://reg/x y",
        "http://reg.example/x.sif",
        "shub://x/y",
    ],
)
def test_bad_locations_are_refused_at_load(location: str) -> None:
    with pytest.raises(ImageError, match=r"images\.0\.location"):
        load_image_allow_list({"images": [{"name": "x", "location": location}]})


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"images": []}, "images"),
        ({"images": [A, {"name": "a", "location": "/s/b.sif"}]}, "repeated: a"),
        ({"images": [{"name": "Bad Name", "location": "/s/a.sif"}]}, r"images\.0\.name"),
        ({"default": "zzz", "images": [A]}, "not in images"),
        ({"images": [{"name": "a", "location": "/s/a.sif", "colour": "red"}]}, "colour"),
        ({"binds": ["relative:/x"], "images": [A]}, "binds"),
        ({"binds": ["/a:/b:rx"], "images": [A]}, "binds"),
        ({"apptainer": "apptainer --x", "images": [A]}, "apptainer"),
    ],
)
def test_bad_allow_lists(data: dict[str, Any], match: str) -> None:
    with pytest.raises(ImageError, match=match) as e:
        load_image_allow_list(data)
    assert e.value.reason == "bad_config"


def test_bad_file_names_the_file(tmp_path: Path) -> None:
    p = tmp_path / "images.toml"
    p.write_text('[[images]]\nname = "a"\nlocation = "a.sif"\n')
    with pytest.raises(ImageError, match=f"{p}: images.0.location"):
        load_image_allow_list(p)
    p.write_text("[[images]\n")
    with pytest.raises(ImageError, match=str(p)):
        load_image_allow_list(p)


def test_forward_env() -> None:
    env = {"CUDA_VISIBLE_DEVICES": "MIG-abc", "SLURM_JOB_ID": "42", "HOME": "/root"}
    assert forward_env(env) == {
        "APPTAINERENV_CUDA_VISIBLE_DEVICES": "MIG-abc",
        "APPTAINERENV_SLURM_JOB_ID": "42",
    }
    assert forward_env(env, ["HOME"]) == {"APPTAINERENV_HOME": "/root"}
    with pytest.raises(ImageError):
        forward_env(env, ["BAD NAME"])


def test_image_names_match_the_request_vocabulary() -> None:
    """A name the allow-list accepts is one a Request can carry, and the other way round."""
    from sovereign_portal.spawners.request import parse_request

    for name in ("base", "gpu", "ml101", "course-2026.1_b"):
        load_image_allow_list({"images": [{"name": name, "location": "/s/a.sif"}]})
        parse_request({"image": name})
