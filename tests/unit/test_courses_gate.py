"""The hub's course step of a spawn (hub/course_store.CourseSpawnGate) on the real local
spawner and a real portal database: the form narrowed to the course, the backend's own
validation kept, and the course rule on every spawn."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sovereign_portal.hub.course_store import CourseSpawnGate, CourseStore, site_offer
from sovereign_portal.hub.store import PortalStore
from sovereign_portal.spawners.local import LocalGPUSpawner
from sovereign_portal.spawners.site import load_site
from traitlets.config import Config

pytestmark = pytest.mark.unit

ORG = "uni-a.example"


def course(cid: str, **over: Any) -> dict[str, Any]:
    return {
        "id": cid,
        "title": f"Course {cid}",
        "instructors": [f"ines@{ORG}"],
        "sizes": ["h100:1g.10gb", "h100:3g.40gb"],
        "start": "2026-01-01",
        "end": "2036-01-01",
        **over,
    }


@pytest.fixture
def gate(tmp_path: Path) -> tuple[CourseSpawnGate, Config]:
    url = f"sqlite:///{tmp_path / 'portal.sqlite'}"
    store = PortalStore(url)
    store.upgrade()
    cs = CourseStore(store)
    offer = site_offer(load_site(None), None)
    cs.create(course("ml101"), offer, "op")
    cs.create(course("cv202", sizes=["h100x1"]), offer, "op")
    c = Config()
    c.PortalDatabase.url = url
    g = CourseSpawnGate()
    c.Spawner.course_display = g.display
    c.Spawner.apply_user_options = g.apply_user_options
    return g, c


def spawner(c: Config, *groups: str) -> LocalGPUSpawner:
    user = SimpleNamespace(name=f"sam@{ORG}", groups=[SimpleNamespace(name=g) for g in groups])
    return LocalGPUSpawner(config=c, user=user, inventory_source="declared")


def test_one_course_narrows_the_form_and_refuses_other_sizes(gate: Any) -> None:
    _g, c = gate
    sp = spawner(c, "course-ml101")
    html = sp.options_form(sp)
    assert 'value="lab/h100:1g.10gb"' in html and 'value="lab/h100x1"' not in html
    assert 'name="course"' not in html
    resolved = asyncio.run(sp.apply_user_options(sp, {"accelerator": "h100", "slice": "1g.10gb"}))
    assert resolved.size.id == "h100:1g.10gb" and sp.user_options["course"] == "ml101"
    assert sp.validate_request(sp.user_options).size.id == "h100:1g.10gb"  # start re-validates
    with pytest.raises(Exception) as info:
        asyncio.run(sp.apply_user_options(sp, {"accelerator": "h100", "gpus": 1}))
    assert info.value.status_code == 403  # type: ignore[attr-defined]
    assert "course ml101 allows the sizes" in str(info.value.jupyterhub_message)  # type: ignore[attr-defined]
    with pytest.raises(Exception) as info:  # the backend's own validation still runs
        asyncio.run(sp.apply_user_options(sp, {"accelerator": "h100", "gpus": 1, "uid": 0}))
    assert info.value.status_code == 400  # type: ignore[attr-defined]


def test_two_courses_pick_first(gate: Any) -> None:
    _g, c = gate
    sp = spawner(c, "course-ml101", "course-cv202")
    html = sp.options_form(sp)
    assert html.index('name="course"') < html.index('name="size"')
    assert 'value="lab/h100x1"' in html and 'value="lab/h100x2"' not in html
    with pytest.raises(Exception) as info:
        asyncio.run(sp.apply_user_options(sp, {"accelerator": "h100", "gpus": 1}))
    assert info.value.status_code == 400  # type: ignore[attr-defined]
    assert "choose the course first" in str(info.value.jupyterhub_message)  # type: ignore[attr-defined]
    opts = {"accelerator": "h100", "gpus": 1, "course": "cv202"}
    assert asyncio.run(sp.apply_user_options(sp, opts)).size.id == "h100x1"


def test_no_course_changes_nothing(gate: Any) -> None:
    _g, c = gate
    sp = spawner(c, "project-x")
    html = sp.options_form(sp)
    assert 'value="lab/h100x4"' in html and 'name="course"' not in html
    out = asyncio.run(sp.apply_user_options(sp, {"accelerator": "h100", "gpus": 4}))
    assert out.size.id == "h100x4" and "course" not in (sp.user_options or {})
