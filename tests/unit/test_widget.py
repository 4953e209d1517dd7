"""The GPUSessions widget's model, without a browser or a kernel.

The catalog comes from the real admission code (``catalog_for``) on the real test sites;
only the REST client of the widget actions is a stand-in (the browser test drives the
real one).
"""

from __future__ import annotations

from typing import Any

import pytest
from sovereign_portal.extension.client import DaskSession, PortalError
from sovereign_portal.extension.widget import GPUSessions, SessionForm
from sovereign_portal.hub.admission import Caller, admit, catalog_for
from sovereign_portal.spawners.request import parse_request, resolve
from sovereign_portal.spawners.site import load_site
from traitlets import TraitError

from tests.support.slurm_cluster import SITE_FILE

pytestmark = pytest.mark.unit

SLURM = load_site(SITE_FILE)
LOCAL = load_site(None)
ALICE = Caller("alice", frozenset({"researcher"}), "researcher")


def slurm_form(**kw: Any) -> SessionForm:
    return SessionForm(catalog_for(SLURM, ALICE), **kw)


def test_defaults_come_from_the_catalog() -> None:
    f = slurm_form()
    assert f.kind == "dask" and f.partition == "gpu-fr"
    assert f.walltime_minutes == 60
    assert f.size_id == f.sizes()[0]["id"]


def test_cost_matches_the_hub_resolution() -> None:
    f = slurm_form(size_id="h100x2", count=2, walltime_minutes=90)
    r = resolve(SLURM, parse_request(f.request()))
    assert f.cost() == {
        "eur_per_hour": r.cost_json()["eur_per_hour"],
        "eur_max": r.cost_json()["eur_max"],
        "gpu_hours_max": r.cost_json()["gpu_hours_max"],
    }
    assert "4 workers" in f.summary() and "€8.40/h" in f.summary()


@pytest.mark.parametrize(
    ("kind", "size_id", "count", "workers"),
    [
        ("dask", "h100x2", 2, 4),
        ("dask", "h100:1g.10gb", 3, 3),
        ("torch", "h100x2", 2, 4),
        ("torch", "h100x8x2n", 1, 16),
    ],
)
def test_request_is_admitted_with_the_workers_the_widget_shows(
    kind: str, size_id: str, count: int, workers: int
) -> None:
    f = slurm_form(kind=kind, size_id=size_id, count=count)
    grant = admit(SLURM, f.request(), ALICE)
    assert f.workers() == grant.workers == workers
    assert grant.cost["eur_max"] == f.cost()["eur_max"]


def test_torch_on_slices_refused_in_python_with_the_reason() -> None:
    f = slurm_form(kind="torch", size_id="h100:3g.40gb")
    with pytest.raises(TraitError, match="MIG slices have no NVLink"):
        f.count = 2
    assert f.count == 1 and f.max_count() == 1


def test_dask_offers_one_node_sizes_only_and_resets_the_size() -> None:
    f = slurm_form(kind="torch", size_id="h100x8x2n")
    assert "h100x8x2n" in [s["id"] for s in f.sizes()]
    f.kind = "dask"
    assert all(s["nodes"] == 1 for s in f.sizes())
    assert f.size_id == f.sizes()[0]["id"]


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("walltime_minutes", 10_000, "walltime must be from 1 to 480"),
        ("size_id", "h100x3", "not offered"),
        ("kind", "notebook", "not open to you"),
        ("partition", "nowhere", "no partition"),
        ("count", 0, "count must be from 1"),
    ],
)
def test_bad_choices_are_refused_in_plain_words(field: str, value: Any, match: str) -> None:
    f = slurm_form()
    with pytest.raises(TraitError, match=match):
        setattr(f, field, value)


def test_local_box_counts_are_one_and_queue_shows_free_devices() -> None:
    cat = catalog_for(LOCAL, ALICE)
    cat["partitions"][0]["queue"] = {"free_devices": 12, "devices": 15}
    f = SessionForm(cat, size_id="h100x4")
    assert f.max_count() == 1
    assert f.queue_text() == "12 of 15 devices free on this box"


def test_a_student_sees_no_torch_and_no_whole_nodes() -> None:
    cat = catalog_for(SLURM, Caller("sam", frozenset(), "student"))
    assert cat["kinds"] == ["dask"]
    ids = {s["id"] for p in cat["partitions"] for s in p["sizes"]}
    assert "h100x8" not in ids and "h100:1g.10gb" in ids
    with pytest.raises(TraitError):
        SessionForm(cat, kind="torch")


class FakePortal:
    """The REST client's surface, answering like the server does."""

    def __init__(self, catalog: dict[str, Any], fail: str = "") -> None:
        self._catalog, self.fail = catalog, fail
        self.created: list[dict[str, Any]] = []
        self.stopped: list[str] = []

    def catalog(self) -> dict[str, Any]:
        return self._catalog

    def _info(self, state: str, up: int) -> dict[str, Any]:
        return {
            "id": "0123456789ab",
            "kind": "dask",
            "state": state,
            "message": f"{up} of 2 workers up",
            "workers_up": up,
            "workers_total": 2,
            "queue": {"position": 1, "reason": "Resources"} if state == "queued" else {},
            "scheduler_address": "tls://127.0.0.1:1",
            "tls": {},
        }

    def create(self, request: dict[str, Any], kernel_id: str | None = None) -> dict[str, Any]:
        if self.fail:
            raise PortalError(self.fail, "role")
        self.created.append(request)
        return self._info("queued", 0)

    def wait(self, sid: str, timeout: float = 600, on_update: Any = None) -> dict[str, Any]:
        on_update(self._info("starting", 1))
        return self._info("ready", 2)

    def get(self, sid: str) -> dict[str, Any]:
        return self._info("stopped" if self.stopped else "ready", 0 if self.stopped else 2)

    def stop(self, sid: str) -> dict[str, Any]:
        self.stopped.append(sid)
        return self._info("stopped", 0)


def test_widget_start_progress_handle_and_stop() -> None:
    portal = FakePortal(catalog_for(SLURM, ALICE))
    g = GPUSessions(portal)
    g.size.value = "h100x2"
    assert "2 workers" in g.cost.value and "Queue:" in g.queue.value
    g.start(wait=True)
    assert portal.created == [g.form.request()]
    assert isinstance(g.handle, DaskSession)
    assert g.progress.value == 2 and "ready" in g.status.value
    g.stop_button.click()
    assert portal.stopped == ["0123456789ab"] and g.handle is None
    assert "stopped" in g.status.value


def test_widget_shows_refusals_in_plain_words() -> None:
    portal = FakePortal(catalog_for(SLURM, ALICE), fail="your role may not use 2 nodes")
    g = GPUSessions(portal)
    g.start(wait=True)
    assert "your role may not use 2 nodes" in g.error.value and g.handle is None
    g.count.value = 5000  # beyond the bounded control: clamped by the widget
    assert g.form.count <= g.form.max_count()


def test_widget_with_no_partition_says_why() -> None:
    cat = catalog_for(SLURM, ALICE)
    cat["partitions"] = []
    g = GPUSessions(FakePortal(cat))
    assert "no partition is open to you" in g.error.value
