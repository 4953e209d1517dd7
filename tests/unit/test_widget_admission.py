"""Admission policy behind the widget (hub/admission.py): a table of callers and requests."""

from __future__ import annotations

from typing import Any

import pytest
from sovereign_portal.extension.gpu_pin import device_for
from sovereign_portal.hub.admission import AdmissionError, Caller, admit, role_of
from sovereign_portal.spawners.request import RequestError
from sovereign_portal.spawners.site import load_site

from tests.support.slurm_cluster import SITE_FILE

pytestmark = pytest.mark.unit

SITE = load_site(SITE_FILE)
RES = Caller("rita", frozenset({"researcher"}), "researcher")
STU = Caller("sam", frozenset({"student"}), "student")
HEALTH = Caller("hana", frozenset({"researcher", "proj-health"}), "researcher")
RESIDENCY = {"proj-health": ["FR"]}


@pytest.mark.parametrize(
    ("caller", "req", "error", "match"),
    [
        (RES, {"kind": "notebook"}, RequestError, "'dask' or 'torch'"),
        (RES, {"kind": "dask", "color": "red"}, RequestError, "unknown field 'color'"),
        (RES, {"kind": "torch", "slice": "3g.40gb", "count": 2}, RequestError, "no NVLink"),
        (RES, {"kind": "dask", "gpus": 8, "nodes": 2}, RequestError, "one-node sizes"),
        (RES, {"kind": "torch", "gpus": 2, "count": 3}, RequestError, "2 node"),
        (RES, {"kind": "dask", "walltime_minutes": 9999}, RequestError, "over partition"),
        (RES, {"kind": "dask", "partition": "nope"}, AdmissionError, "does not exist"),
        (STU, {"kind": "torch"}, AdmissionError, "may not start torch"),
        (STU, {"kind": "dask", "gpus": 2}, AdmissionError, "over your role's limit"),
        (STU, {"kind": "dask", "gpus": 8}, AdmissionError, "may not use one 8-GPU"),
        (HEALTH, {"kind": "dask", "partition": "gpu-de"}, AdmissionError, "not open to you"),
    ],
)
def test_refusals_say_why(caller: Caller, req: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        admit(SITE, req, caller, residency=RESIDENCY)


def test_grant_has_exact_scheduler_arguments_rate_and_expiry() -> None:
    g = admit(
        SITE,
        {"kind": "torch", "partition": "gpu-fr", "gpus": 2, "count": 2, "walltime_minutes": 30},
        RES,
        now=1000.0,
        ttl_seconds=60,
    )
    assert g.scheduler_args == [
        "--nodes=2",
        "--gres=gpu:h100:2",
        "--partition=gpu-fr",
        "--time=30",
    ]
    assert (g.jobs, g.nodes_per_job, g.devices_per_node, g.workers) == (1, 2, 2, 4)
    assert g.eur_per_hour == pytest.approx(8.4) and g.cost["eur_max"] == pytest.approx(4.2)
    assert g.expires_at == 1060.0 and g.country == "FR" and len(g.id) == 16


def test_dask_on_slices_one_job_per_slice() -> None:
    g = admit(SITE, {"kind": "dask", "slice": "1g.10gb", "count": 3}, STU)
    assert (g.jobs, g.workers) == (3, 3)
    assert "--gres=gpu:h100_1g.10gb:1" in g.scheduler_args


def test_residency_keeps_a_health_project_in_france() -> None:
    g = admit(SITE, {"kind": "dask", "gpus": 1}, HEALTH, residency=RESIDENCY)
    assert g.country == "FR"


@pytest.mark.parametrize(
    ("groups", "admin", "hub_roles", "role"),
    [
        ([], False, [], "student"),
        (["researcher", "student"], False, [], "researcher"),
        (["instructor"], False, [], "instructor"),
        ([], True, [], "operator"),
        # the institutional login: JupyterHub roles portal-<role>, course/project groups
        (["project-climate"], False, ["user", "portal-researcher"], "researcher"),
        (["course-ml101"], False, ["user", "portal-student"], "student"),
        ([], False, ["user", "portal-instructor", "instructor-ml101"], "instructor"),
        ([], False, ["portal-student", "portal-researcher"], "researcher"),
        # only portal-<known role> counts
        ([], False, ["portal-superuser", "researcher", "portal-"], "student"),
    ],
)
def test_role_of(groups: list[str], admin: bool, hub_roles: list[str], role: str) -> None:
    assert role_of(groups, admin, hub_roles=hub_roles) == role


@pytest.mark.parametrize(
    ("name", "devices", "per_job", "want"),
    [
        ("SLURMCluster-0-1", "4,5", 2, "5"),
        ("SLURMCluster-3-0", "4,5", 2, "4"),
        ("SLURMCluster-3", "6", 1, "6"),
        ("SLURMCluster-3", "6", 0, None),
        ("x-7", "1,2", 2, None),
    ],
)
def test_each_dask_worker_gets_its_own_device(
    name: str, devices: str, per_job: int, want: str | None
) -> None:
    assert device_for(name, devices, per_job) == want
