"""The instructor's pages, pure parts (hub/course_pages.py): the settings form to the
course API's PATCH body (only what changed, numbers as numbers, the rest as typed for the
API to refuse by name), schedule lines, the pre-warm form, the class view's grouping, and
the templates rendered on a stand-in ``page.html`` with a class API answer in the agreed
shape (the real endpoint is exercised in tests/hub/test_browser_courses.py)."""

from __future__ import annotations

from typing import Any

import jinja2
import pytest
from sovereign_portal.hub.course_pages import (
    TEMPLATES,
    FormError,
    api_error,
    class_groups,
    form_changes,
    parse_fraction,
    parse_schedule,
    schedule_text,
)

pytestmark = pytest.mark.unit

COURSE: dict[str, Any] = {
    "id": "ml101",
    "title": "Machine learning",
    "image": None,
    "sizes": ["h100:1g.10gb"],
    "start": "2026-11-01",
    "end": "2026-12-31",
    "schedule": [{"weekday": "tue", "time": "09:15", "minutes": 90}],
    "budget": {"period": "course", "unit": "gpu_hours", "pool": 40, "per_student": 4},
    "role": "instructor",
}


def form(**kw: str) -> dict[str, list[str]]:
    return {"action": ["edit"], **{k: [v] for k, v in kw.items()}}


def test_unchanged_form_changes_nothing() -> None:
    f = form(
        title="Machine learning",
        start="2026-11-01",
        end="2026-12-31",
        image="",
        sizes="h100:1g.10gb",
        schedule="tue 09:15 90",
        per_student="4",
        pool="40",
    )
    assert form_changes(f, COURSE) == {}


def test_changes_are_typed_and_only_what_differs() -> None:
    f = form(
        title="ML",
        sizes="h100:1g.10gb, h100:3g.40gb",
        per_student="2.5",
        pool="40",
        schedule="tue 09:15 90\nthu 14:00 60",
    )
    assert form_changes(f, COURSE) == {
        "title": "ML",
        "sizes": ["h100:1g.10gb", "h100:3g.40gb"],
        "schedule": [
            {"weekday": "tue", "time": "09:15", "minutes": 90},
            {"weekday": "thu", "time": "14:00", "minutes": 60},
        ],
        "budget": {"period": "course", "unit": "gpu_hours", "pool": 40, "per_student": 2.5},
    }


def test_text_that_is_no_number_goes_to_the_api_as_typed() -> None:
    # the API's validation names the field; the page does not decide it
    assert form_changes(form(pool="lots"), COURSE)["budget"]["pool"] == "lots"
    assert form_changes(form(end="2026-10-01"), COURSE) == {"end": "2026-10-01"}
    assert form_changes(form(per_student=""), COURSE)["budget"]["per_student"] is None


def test_form_errors_name_the_field() -> None:
    with pytest.raises(FormError) as e:
        form_changes(form(colour="red"), COURSE)
    assert e.value.field == "colour"
    with pytest.raises(FormError) as e:
        parse_schedule("tue 09:15")
    assert e.value.field == "schedule" and "line 1" in str(e.value)
    with pytest.raises(FormError) as e:
        form_changes({"title": ["a", "b"]}, COURSE)
    assert e.value.field == "title"
    with pytest.raises(FormError) as e:
        form_changes(form(pool=""), COURSE)
    assert e.value.field == "pool"


def test_schedule_round_trip() -> None:
    text = schedule_text(COURSE["schedule"])
    assert text == "tue 09:15 90"
    assert parse_schedule(text + "\n\n") == COURSE["schedule"]


def test_prewarm_form() -> None:
    assert parse_fraction({"_xsrf": ["x"]}) == {}
    assert parse_fraction({"fraction": ["0.5"]}) == {"fraction": 0.5}
    assert parse_fraction({"fraction": ["half"]}) == {"fraction": "half"}  # the API refuses it
    with pytest.raises(FormError):
        parse_fraction({"n": ["3"]})


def test_api_errors_keep_the_message_and_field() -> None:
    assert api_error(400, b'{"error": "end: before start", "field": "end"}') == (
        "end: before start",
        "end",
    )
    msg, field = api_error(502, b"<html>bad gateway</html>")
    assert "HTTP 502" in msg and field is None


CLASS_VIEW: dict[str, Any] = {
    "course": "ml101",
    "slot": {"weekday": "tue", "time": "09:15", "minutes": 90},
    "window": {"start": "2026-12-01T09:15:00+00:00", "end": "2026-12-01T10:45:00+00:00"},
    "prewarm": {
        "state": "warm",
        "reservation": "class-ml101-202612010915",
        "requested": 4,
        "started": 3,
    },
    "students": [
        {
            "user": "s3",
            "state": "queued",
            "since": None,
            "reason": "waiting for a slot",
            "position": 2,
        },
        {
            "user": "s1",
            "state": "claimed",
            "since": "2026-12-01T09:10:00+00:00",
            "reason": None,
            "position": None,
        },
        {"user": "s4", "state": "queued", "since": None, "reason": "Priority", "position": 1},
        {"user": "s2", "state": "warm", "since": None, "reason": None, "position": None},
        {"user": "s5", "state": "absent", "since": None, "reason": None, "position": None},
    ],
}


def test_class_groups() -> None:
    g = class_groups(CLASS_VIEW)
    assert [s["user"] for s in g["in"]] == ["s1", "s2"]  # claimed first, then warm
    assert [s["user"] for s in g["waiting"]] == ["s4", "s3"]  # by place in line
    assert [s["user"] for s in g["out"]] == ["s5"]
    # the hub's start queue knows the places the service cannot: s5 waits there, 1st
    g = class_groups(CLASS_VIEW, {"s5": 1, "s1": 3})
    assert [(s["user"], s["position"]) for s in g["waiting"]] == [("s4", 1), ("s5", 1), ("s3", 2)]
    assert [s["user"] for s in g["in"]] == ["s1", "s2"] and g["out"] == []  # s1 is in already


def _env() -> jinja2.Environment:
    stub = jinja2.DictLoader(
        {
            "page.html": "<nav>{% block nav_bar_left_items %}{% endblock %}</nav>"
            "{% block main %}{% endblock %}"
        }
    )
    loader = jinja2.ChoiceLoader([stub, jinja2.FileSystemLoader(str(TEMPLATES))])
    return jinja2.Environment(loader=loader, autoescape=True, undefined=jinja2.StrictUndefined)


def test_templates_render_the_class_view_and_the_course() -> None:
    env = _env()
    html = env.get_template("course_class.html").render(
        base_url="/hub/",
        xsrf="x",
        page_title="Class view",
        course=COURSE,
        view=CLASS_VIEW,
        groups=class_groups(CLASS_VIEW),
        can_prewarm=True,
        error=None,
        done="",
    )
    assert "Pre-warm now" in html and "class-ml101-202612010915" in html
    assert 'data-user="s4" data-state="queued"' in html and "Priority" in html
    html = env.get_template("course.html").render(
        base_url="/hub/",
        xsrf="x",
        page_title="Course",
        course={**COURSE, "state": None},
        can_edit=False,
        roster={"members": ["s1@uni-a.example"], "added": ["s4@uni-a.example"]},
        schedule="tue 09:15 90",
        error="end: must be after the start",
        error_field="end",
        done=None,
        form={},
    )
    assert "<fieldset disabled>" in html and 'id="sp-save"' not in html  # a TA sees only
    assert 'data-field="end"' in html and "Nothing was changed." in html
    assert '<strong class="sp-error-field">end</strong>: must be after the start' in html
    assert "access at first login" in html
    html = env.get_template("courses.html").render(
        base_url="/hub/", page_title="My courses", courses=[COURSE]
    )
    assert "/hub/courses/ml101/class" in html
