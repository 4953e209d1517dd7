"""Class reservations on the real Slurm test cluster: the class-start engine's own
``reserve`` and ``unreserve`` (``scontrol create/delete reservation``, argv lists), and the
job the Slurm spawner renders for a pre-warmed server (``reservation_for`` set, as the
hub's spawn hook sets it) runs in that reservation, while another user cannot use it."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sovereign_portal.hub import class_start as CS
from sovereign_portal.hub.class_start_api import ClassEngine
from sovereign_portal.hub.course_store import CourseStore
from sovereign_portal.hub.courses import SiteOffer, parse_course
from sovereign_portal.hub.store import PortalStore
from traitlets.config import Config, Configurable

from tests.support.slurm_cluster import SITE_FILE, SlurmCluster

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(300)]

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def _course(start: datetime) -> Any:
    raw = {
        "id": "ml101",
        "title": "ML",
        "instructors": ["ines@uni-a.example"],
        "sizes": ["h100:1g.10gb"],
        "start": str((start - timedelta(days=1)).date()),
        "end": str((start + timedelta(days=30)).date()),
        "schedule": [
            {"weekday": WEEKDAYS[start.weekday()], "time": start.strftime("%H:%M"), "minutes": 60}
        ],
        "prewarm": {"minutes": 10, "fraction": 1, "unclaimed_minutes": 15},
    }
    return parse_course(raw, SiteOffer(sizes=frozenset({"h100:1g.10gb"})))


def _show(cluster: SlurmCluster, name: str) -> str:
    r = cluster.run(["scontrol", "show", "reservation", name, "-o"], check=False)
    return r.stdout + r.stderr


def test_a_class_reservation_exists_and_the_warm_job_runs_in_it(
    slurm_cluster: SlurmCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sovereign_portal.spawners.slurm.spawner import PREVIEW_TAG, SlurmGPUSpawner

    for k, v in slurm_cluster.env().items():
        if k.startswith("SLURM") or k == "PATH":
            monkeypatch.setenv(k, v)
    alice, bob = slurm_cluster.users[0], slurm_cluster.users[1]
    start = (datetime.now(UTC) + timedelta(minutes=5)).replace(second=0, microsecond=0)
    course = _course(start)
    w = CS.window(course, datetime.now(UTC))
    assert w is not None and w.start == start
    portal = Configurable(
        config=Config(
            {
                "CoursePolicy": {
                    "prewarm_reservations": True,
                    "prewarm_partition": "gpu-fr",
                    "reservation_node_names": ["mig-a"],  # the node with 1g.10gb slices
                    "reservation_user_template": "{login}",
                }
            }
        )
    )
    store = PortalStore(f"sqlite:///{tmp_path / 'portal.sqlite'}")
    try:
        eng = ClassEngine(portal, CourseStore(store))
        name = asyncio.run(eng.reserve(course, w, [f"{alice}@uni-a.example"]))
        assert name == w.reservation
        try:
            shown = _show(slurm_cluster, name)
            assert f"ReservationName={name}" in shown, shown
            assert f"Users={alice}" in shown and "PartitionName=gpu-fr" in shown, shown
            assert "Nodes=mig-a" in shown, shown
            assert "State=ACTIVE" in shown, shown  # from now (the pre-warm) to the class's end
            end = datetime.strptime(
                shown.split("EndTime=", 1)[1].split()[0], "%Y-%m-%dT%H:%M:%S"
            ).replace(tzinfo=UTC)
            assert end >= w.end - timedelta(seconds=1), (end, w.end)
            # a second pre-warm pass keeps the same reservation
            assert asyncio.run(eng.reserve(course, w, [f"{alice}@uni-a.example"])) == name

            # the job the spawner renders for the warm server names the reservation
            sp = SlurmGPUSpawner(
                site_file=str(SITE_FILE),
                user=SimpleNamespace(name=alice, groups=[]),
                api_token="x" * 32,
                reservation_for=lambda _sp: name,
            )
            resolved = sp.validate_request(
                {"partition": "gpu-fr", "accelerator": "h100", "slice": "1g.10gb"}
            )
            _, argv, script = sp.render_job(resolved, PREVIEW_TAG, hub_env={})
            assert f"#SBATCH --reservation={name}" in script.splitlines()
            assert "--reservation" not in sp.render_job(resolved, PREVIEW_TAG)[2]  # preview
            r = slurm_cluster.run(argv[4:], user=alice, input=script)
            job = r.stdout.strip().split(";")[0]
            slurm_cluster.wait_job_state(
                job, ["RUNNING", "COMPLETED", "FAILED", "CANCELLED"], timeout=60
            )
            detail = slurm_cluster.run(["scontrol", "show", "job", job, "-o"]).stdout
            assert f"Reservation={name}" in detail, detail
            slurm_cluster.run(["scancel", job], check=False)
            # someone not in the class cannot use the reservation
            r = slurm_cluster.run(
                ["sbatch", f"--reservation={name}", "-p", "gpu-fr", "--wrap=true"],
                user=bob,
                check=False,
            )
            assert r.returncode != 0 and "reservation" in r.stderr.lower(), r.stderr
        finally:
            asyncio.run(eng.unreserve(name))
        assert "not found" in _show(slurm_cluster, name).lower()
        asyncio.run(eng.unreserve(name))  # gone already: not an error
    finally:
        store.dispose()
