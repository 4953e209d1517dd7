"""Pure tests of the Slurm job renderer, tags, squeue parsing and the residency filter.

The real-Slurm counterparts are in tests/hub/test_slurm_spawner.py.
"""

from __future__ import annotations

import asyncio
import shlex
import subprocess
import sys
from pathlib import Path

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
        env = _fake_squeue(tmp_path, "5|RUNNING|None|h100-a|N/A|u|")
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
        env = _fake_squeue(tmp_path, "5|COMPLETING|None|h100-a|N/A|u|")
        poller = JobPoller(interval=60, env=env)
        poller.tracked.add("5")
        poller.watch("5", lambda info: seen.append(info.state))
        assert await poller.refresh()
        info = poller.info("5")
        assert info is not None and info.ended and info.active
        poller.follow("5", lambda info: final.append(info.state))
        assert await poller.refresh() and final == []  # still completing
        (tmp_path / "answer").write_text("5|CANCELLED|None|h100-a|N/A|u|")
        assert await poller.refresh()
        return seen, final, poller.tracked

    assert asyncio.run(run()) == (["COMPLETING"], ["CANCELLED"], set())


def test_parse_squeue() -> None:
    jobs = parse_squeue("7|PENDING|Resources|||spalice|c|x\n8|RUNNING|None|h100-a|N/A|spbob|\n")
    assert jobs["7"].reason == "Resources" and jobs["7"].comment == "c|x"
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
