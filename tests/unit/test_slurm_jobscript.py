"""Pure tests of the Slurm job renderer, tags, squeue parsing and the residency filter.

The real-Slurm counterparts are in tests/hub/test_slurm_spawner.py.
"""

from __future__ import annotations

import asyncio
import functools
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sovereign_portal.spawners.policy import allowed_partitions
from sovereign_portal.spawners.request import parse_request, resolve
from sovereign_portal.spawners.site import load_site, parse_site
from sovereign_portal.spawners.slurm.jobscript import (
    COMMENT_PREFIX,
    LAUNCHER,
    JobScriptError,
    JobSpec,
    comment_port,
    make_tag,
    render_script,
    tag_is_ours,
)
from sovereign_portal.spawners.slurm.scheduler import GONE, JobPoller, parse_squeue

from tests.support.slurm_cluster import SITE_FILE

pytestmark = pytest.mark.unit
SITE = load_site(SITE_FILE)
TAG = make_tag(b"k", "0123456789ab")


def spec(**kw: object) -> JobSpec:
    resolved = resolve(SITE, parse_request({"partition": "gpu-fr", "slice": "3g.40gb"}))
    base: dict[str, object] = {
        "resolved": resolved,
        "unix_user": "spalice",
        "tag": TAG,
        "home": "/home/spalice",
        "python": "/opt/venv/bin/python",
        "token_file": f"/home/spalice/.sovereign-portal/tokens/{TAG}",
        "output": "/home/spalice/.sovereign-portal/logs/slurm-%j.log",
        "env": {"JUPYTERHUB_USER": "spalice", "JUPYTERHUB_OAUTH_SCOPES": '["access:servers"]'},
    }
    base.update(kw)
    return JobSpec(**base)


def test_script_has_partition_gres_and_no_secret() -> None:
    script = render_script(spec())
    assert "#SBATCH --partition=gpu-fr" in script
    assert "#SBATCH --gres=gpu:h100_3g.40gb:1" in script
    assert "#SBATCH --export=NONE" in script
    assert "TOKEN" not in script
    # Every non-directive line parses as shell without surprises.
    for line in script.splitlines():
        if line.startswith("export "):
            assert len(shlex.split(line)) == 2


@pytest.mark.parametrize(
    "kw",
    [
        {"unix_user": "root;id"},
        {"home": "/home/x\n#SBATCH --uid=0"},
        {"python": "$(id)"},
        {"env": {"JUPYTERHUB_API_TOKEN": "x"}},
        {"env": {"X": "a\nb"}},
        {"extra_sbatch": ["--uid=0;id"]},
        {"tag": "not-a-tag"},
    ],
)
def test_unsafe_values_are_refused(kw: dict[str, object]) -> None:
    with pytest.raises(JobScriptError):
        spec(**kw)


def test_tags_are_signed() -> None:
    assert tag_is_ours(b"k", TAG)
    assert not tag_is_ours(b"other", TAG)
    assert not tag_is_ours(b"k", "0123456789ab.0123456789abcdef")
    assert comment_port(f"sovereign-portal:{TAG}:port=4242", TAG) == 4242
    assert comment_port(f"sovereign-portal:{TAG}:port=22", TAG) is None
    assert comment_port(f"sovereign-portal:{TAG}:port=4242;host=evil", TAG) is None
    # The comment is user-editable: non-ASCII digits that re's \d would take are refused.
    assert comment_port(f"sovereign-portal:{TAG}:port=\u0664\u0662\u0664\u0662", TAG) is None
    assert comment_port(f"sovereign-portal:{TAG}:port=\uff14\uff12\uff14\uff12", TAG) is None


def test_launcher_is_standalone_and_agrees_on_the_comment_format() -> None:
    """The job runs launch.py by path with ``python -I``: standard library only."""
    script = render_script(spec())
    assert f"/opt/venv/bin/python -I {LAUNCHER} " in script
    src = Path(LAUNCHER).read_text()
    assert "from ." not in src and "sovereign_portal" not in src.split('"""', 2)[2]
    r = subprocess.run(
        [sys.executable, "-I", LAUNCHER, "--help"], capture_output=True, text=True, timeout=10
    )
    assert r.returncode == 0 and "--token-file" in r.stdout
    ns: dict[str, object] = {}
    exec(compile(src, LAUNCHER, "exec"), ns)  # noqa: S102 - our own file, as the job runs it
    assert ns["COMMENT_PREFIX"] == COMMENT_PREFIX


def _fake_squeue(tmp_path: Path, answer: str) -> dict[str, str]:
    """A ``squeue`` on PATH that prints ``tmp_path/answer`` (or fails if it says FAIL)."""
    (tmp_path / "answer").write_text(answer)
    exe = tmp_path / "squeue"
    exe.write_text(f'#!/bin/sh\nA=$(cat {tmp_path}/answer)\n[ "$A" = FAIL ] && exit 1\necho "$A"\n')
    exe.chmod(0o755)
    return {"PATH": f"{tmp_path}:/usr/bin:/bin"}


def test_poller_tells_a_watcher_once_when_the_job_ends_and_never_on_errors(
    tmp_path: Path,
) -> None:
    """Fast inner layer of the real-Slurm scancel test: the poll that sees the end calls
    the watcher; a failing squeue (unknown) never does."""

    async def run() -> list[str]:
        seen: list[str] = []
        env = _fake_squeue(tmp_path, "5|RUNNING|None|h100-a|N/A|u|gpu-fr|100|")
        poller = JobPoller(interval=60, env=env)
        poller.tracked.add("5")
        poller.watch("5", lambda info: seen.append(info.state))
        assert await poller.refresh() and seen == []
        (tmp_path / "answer").write_text("FAIL")
        assert not await poller.refresh() and seen == []
        (tmp_path / "answer").write_text("")  # squeue answered: the job is gone
        assert await poller.refresh() and seen == ["GONE"]
        assert await poller.refresh() and seen == ["GONE"]  # once
        return seen

    assert asyncio.run(run()) == ["GONE"]


def test_completing_counts_as_ended_and_is_followed_to_its_final_state(tmp_path: Path) -> None:
    """squeue says COMPLETING while Slurm stops a cancelled server: the watcher fires then
    (the server is going away), and a follower gets the final state, then the job is
    forgotten."""

    async def run() -> tuple[list[str], list[str], set[str]]:
        seen: list[str] = []
        final: list[str] = []
        env = _fake_squeue(tmp_path, "5|COMPLETING|None|h100-a|N/A|u|gpu-fr|100|")
        poller = JobPoller(interval=60, env=env)
        poller.tracked.add("5")
        poller.watch("5", lambda info: seen.append(info.state))
        assert await poller.refresh()
        info = poller.info("5")
        assert info is not None and info.ended and info.active
        poller.follow("5", lambda info: final.append(info.state))
        assert await poller.refresh() and final == []  # still completing
        (tmp_path / "answer").write_text("5|CANCELLED|None|h100-a|N/A|u|gpu-fr|100|")
        assert await poller.refresh()
        return seen, final, poller.tracked

    assert asyncio.run(run()) == (["COMPLETING"], ["CANCELLED"], set())


def test_parse_squeue() -> None:
    jobs = parse_squeue(
        "7|PENDING|Resources|||spalice|gpu-fr|42|c|x\n8|RUNNING|None|h100-a|N/A|spbob|gpu-de|1|\n"
    )
    assert jobs["7"].reason == "Resources" and jobs["7"].comment == "c|x"
    assert jobs["7"].partition == "gpu-fr" and jobs["7"].priority == 42
    assert jobs["8"].active and not GONE.active


# -- residency, as a property over generated site files ---------------------------------
COUNTRIES = ["FR", "DE", "NL", "IT"]


@st.composite
def sites(draw: st.DrawFn) -> dict[str, object]:
    n = draw(st.integers(1, 6))
    parts = []
    for i in range(n):
        parts.append(
            {
                "name": f"p{i}",
                "backend": draw(st.sampled_from(["slurm", "local"])) if i == 0 else "slurm",
                "jurisdiction": {"country": draw(st.sampled_from(COUNTRIES)), "operator": "o"},
                "carbon_g_per_kwh": 50.0,
                "price_eur_per_gpu_hour": {"h100": 2.0},
                "allowed_groups": draw(st.lists(st.sampled_from(["g1", "g2", "g3"]), max_size=2)),
                "nodes": [{"name": "n", "accelerator": "h100"}],
            }
        )
    return {"name": "generated", "partitions": parts}


@settings(max_examples=200, deadline=None)
@given(
    site=sites(),
    groups=st.lists(st.sampled_from(["g1", "g2", "g3", "proj-fr", "proj-eu"]), max_size=4),
)
def test_residency_never_places_outside_allowed_countries(
    site: dict[str, object], groups: list[str]
) -> None:
    s = parse_site(site)
    rules = {"proj-fr": ["FR"], "proj-eu": ["FR", "DE", "NL"]}
    got = allowed_partitions(s, groups, rules, backend="slurm")
    for p in got:
        if "proj-fr" in groups:
            assert p.jurisdiction.country == "FR"
        if "proj-eu" in groups:
            assert p.jurisdiction.country in ("FR", "DE", "NL")
        assert not p.allowed_groups or set(p.allowed_groups) & set(groups)
        assert p.backend == "slurm"
    # Complete: every partition that satisfies all rules is offered.
    for p in s.partitions:
        ok = p.backend == "slurm" and (
            not p.allowed_groups or bool(set(p.allowed_groups) & set(groups))
        )
        if "proj-fr" in groups:
            ok = ok and p.jurisdiction.country == "FR"
        if "proj-eu" in groups:
            ok = ok and p.jurisdiction.country in ("FR", "DE", "NL")
        assert (p in got) == ok


# -- images (issue 6) and the one renderer shared with `sovereign-portal job-script` ------------
ALLOW = """
cleanenv = true
binds = ["/scratch", "/datasets:/datasets:ro"]
[[images]]
name = "base"
location = "/images/base.sif"
gpu = false
[[images]]
name = "gpu"
location = "/images/gpu.sif"
groups = ["proj-gpu"]
[[images]]
name = "ml101"
location = "/images/ml101.sif"
courses = ["course-ml101"]
"""


def image_spawner(tmp_path: Path, groups: tuple[str, ...] = (), default: str = "") -> Any:
    from types import SimpleNamespace

    from sovereign_portal.spawners.slurm.spawner import SlurmGPUSpawner

    allow = tmp_path / "images.toml"
    allow.write_text((f'default = "{default}"\n' if default else "") + ALLOW)
    user = SimpleNamespace(name=me(), groups=[SimpleNamespace(name=g) for g in groups])
    return SlurmGPUSpawner(
        site_file=str(SITE_FILE), image_allow_list=str(allow), user=user, api_token="x" * 32
    )


@functools.cache
def me() -> str:
    """A personal (uid >= 1000) account to preview jobs for: the spawner and job-script refuse
    system accounts such as root (UnixAccountPolicy). The first Slurm test user, created
    (idempotent useradd, as root) if missing."""
    from tests.support.slurm_cluster import TEST_USERS, ensure_users

    ensure_users(TEST_USERS[:1])
    return TEST_USERS[0]


H100 = {"partition": "gpu-fr", "gpus": 1}


def test_image_job_runs_the_server_under_apptainer_with_forwarded_names_only() -> None:
    s = spec(
        image_argv=["apptainer", "exec", "--nv", "--cleanenv", "/images/gpu.sif"],
        env={
            "JUPYTERHUB_USER": "spalice",
            "HOME": "/home/spalice",
            "PATH": "/usr/bin",
            "SOVEREIGN_PORTAL_SIZE": "h100x1",
            "EGRESS_LOG": "/tmp/e",
        },
    )
    script = render_script(s)
    exec_line = shlex.split(script.splitlines()[-1])
    cmd = exec_line[exec_line.index("--") + 1 :]
    assert cmd == [
        "apptainer",
        "exec",
        "--nv",
        "--cleanenv",
        "/images/gpu.sif",
        "jupyterhub-singleuser",
    ]
    forward = next(a for a in exec_line if a.startswith("--forward-env="))
    names = forward.split("=", 1)[1].split(",")
    assert {"SOVEREIGN_PORTAL_SIZE", "EGRESS_LOG", "CUDA_VISIBLE_DEVICES", "SLURM_JOB_GPUS"} <= set(
        names
    )
    assert not {"PATH", "HOME", "JUPYTERHUB_USER"} & set(names)  # host's / forwarded by prefix
    assert "TOKEN" not in script


def test_launcher_forwards_names_and_the_jupyterhub_prefix_into_the_image(monkeypatch) -> None:
    import importlib.util
    import os

    mod_spec = importlib.util.spec_from_file_location("launch_under_test", LAUNCHER)
    launch = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(launch)  # type: ignore[union-attr]
    for k, v in {"CUDA_VISIBLE_DEVICES": "2,3", "JUPYTERHUB_USER": "a", "PATH": "/usr/bin"}.items():
        monkeypatch.setenv(k, v)
    launch.forward_into_image("CUDA_VISIBLE_DEVICES,SLURM_JOB_GPUS", {"JUPYTERHUB_API_TOKEN": "t"})
    assert os.environ["APPTAINERENV_CUDA_VISIBLE_DEVICES"] == "2,3"
    assert os.environ["APPTAINERENV_JUPYTERHUB_USER"] == "a"
    assert os.environ["APPTAINERENV_JUPYTERHUB_API_TOKEN"] == "t"
    assert "APPTAINERENV_PATH" not in os.environ and "APPTAINERENV_SLURM_JOB_GPUS" not in os.environ
    for k in [k for k in os.environ if k.startswith("APPTAINERENV_")]:
        monkeypatch.delenv(k)


def test_images_offered_per_user_course_first(tmp_path: Path) -> None:
    assert image_spawner(tmp_path).image_choices() == ["base"]
    assert image_spawner(tmp_path, ("proj-gpu",)).image_choices() == ["base", "gpu"]
    assert image_spawner(tmp_path, ("course-ml101",)).image_choices() == ["ml101", "base"]
    assert image_spawner(tmp_path, default="base").image_choices() == ["base"]
    form = image_spawner(tmp_path, ("course-ml101",)).options_form(
        image_spawner(tmp_path, ("course-ml101",))
    )
    assert form.index('value="ml101"') < form.index('value="base"') and "gpu.sif" not in form
    assert 'value="gpu"' not in form


def test_image_not_open_to_the_user_is_400_naming_the_allowed(tmp_path: Path) -> None:
    from tornado import web

    sp = image_spawner(tmp_path, ("course-ml101",))
    with pytest.raises(web.HTTPError) as e:
        sp.validate_request({**H100, "image": "gpu"})
    assert e.value.status_code == 400 and "allowed: ml101, base" in e.value.log_message


def test_course_image_then_default_then_host(tmp_path: Path) -> None:
    def argv(sp: Any, **kw: Any) -> list[str]:
        return sp.image_argv(sp.validate_request({**H100, **kw}))

    course = image_spawner(tmp_path, ("course-ml101",))
    assert argv(course) == [
        "apptainer",
        "exec",
        "--nv",
        "--cleanenv",
        "--bind",
        "/scratch",
        "--bind",
        "/datasets:/datasets:ro",
        "/images/ml101.sif",
    ]
    assert argv(course, image="base")[-1] == "/images/base.sif"  # the user's choice wins
    assert "--nv" not in argv(course, image="base")  # base is gpu = false
    assert argv(image_spawner(tmp_path, default="base"))[-1] == "/images/base.sif"
    assert argv(image_spawner(tmp_path)) == []  # no course, no default: on the host


def test_broken_allow_list_stops_the_configuration(tmp_path: Path) -> None:
    from sovereign_portal.spawners.slurm.spawner import SlurmGPUSpawner
    from traitlets import TraitError

    bad = tmp_path / "bad.toml"
    bad.write_text('[[images]]\nname = "x"\nlocation = "--privileged"\n')
    with pytest.raises(TraitError, match="location"):
        SlurmGPUSpawner(image_allow_list=str(bad))


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    cli = Path(sys.executable).with_name("sovereign-portal")
    return subprocess.run(
        [str(cli), "job-script", "--user", me(), *args], capture_output=True, text=True, timeout=60
    )


def test_cli_prints_what_a_spawn_renders(tmp_path: Path) -> None:
    """The CLI and the spawner share SlurmGPUSpawner.render_job: the server arguments that keep
    JupyterLab quiet and the SOVEREIGN_PORTAL_* variables are there. (The real-Slurm test
    compares it with a submitted job's script.)"""
    from sovereign_portal.spawners.local import SOVEREIGN_LAB_ARGS
    from sovereign_portal.spawners.slurm.spawner import PREVIEW_TAG

    r = _cli("--site", str(SITE_FILE), "--size", "h100x2", "--partition", "gpu-fr")
    assert r.returncode == 0, r.stderr
    sp = image_spawner(tmp_path)
    sp.image_allow_list = ""
    resolved = sp.validate_request({"partition": "gpu-fr", "accelerator": "h100", "gpus": 2})
    script = r.stdout.split("\n", 2)[2]  # after the "# argv:" and "# preview:" lines
    assert script == sp.render_job(resolved, PREVIEW_TAG)[2]
    assert " ".join(SOVEREIGN_LAB_ARGS) in script
    assert "export SOVEREIGN_PORTAL_PARTITION=gpu-fr" in script
    assert "export SOVEREIGN_PORTAL_SIZE=h100x2" in script


def test_cli_shows_the_image_and_refuses_what_a_spawn_refuses(tmp_path: Path) -> None:
    allow = tmp_path / "images.toml"
    allow.write_text(ALLOW)
    config = tmp_path / "jupyterhub_config.py"
    config.write_text(f"c.SlurmGPUSpawner.image_allow_list = {str(allow)!r}\n")
    base = ["--config", str(config), "--site", str(SITE_FILE), "--size", "h100x1"]
    r = _cli(*base, "--group", "course-ml101")
    assert r.returncode == 0, r.stderr
    assert "-- apptainer exec --nv --cleanenv --bind /scratch" in r.stdout
    assert "/images/ml101.sif jupyterhub-singleuser --LabApp.news_url=None" in r.stdout
    r = _cli(*base, "--image", "gpu")
    assert r.returncode == 2 and "image 'gpu' is not offered; allowed: base" in r.stderr
    assert r.stdout == ""


def test_cli_refuses_a_local_site_naming_what_it_has(tmp_path: Path) -> None:
    r = _cli("--size", "h100x1")  # the embedded example: one local box
    assert r.returncode == 2 and r.stdout == ""
    assert "this site has no Slurm partition (it has: lab (local))" in r.stderr
    mixed = tmp_path / "mixed.toml"
    example = (Path(SITE_FILE).parents[3] / "spawners" / "sites" / "example.toml").read_text()
    partitions = example[example.index("[[partitions]]") :]
    mixed.write_text(SITE_FILE.read_text() + "\n" + partitions)
    r = _cli("--site", str(mixed), "--size", "h100x1", "--partition", "lab")
    assert r.returncode == 2 and r.stdout == ""
    assert "partition 'lab' is a local one, not Slurm; the Slurm partitions are: gpu-fr" in r.stderr
