"""The instructor's pages on the real portal (issue 12): the real local IdP (full OIDC
logins), the real hub and proxy as ``hub.portal.configure()`` sets them up, and the real
portal service behind the pages (its course API and its class API, never a stub).

The people (tests/support/idp_users.py ``COURSE_USERS``): ml101 has the instructor ines,
the TA tara and the students s1, s2, s5; cv202 has the instructor igor. First with plain
HTTP sessions (every change the page makes is read back from the course API; a refused
one shows the API's message naming the field, and nothing changed), then in headless
Chromium: ines's course page and class view and s1's spawn form, with screenshots under
the test's tmp dir (never docs/) and no request leaving the deployment.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
from playwright.sync_api import Page

from tests.support.browser import HostGuard, guarded_chromium, idp_login
from tests.support.courses import TODAY, CourseStack, course, course_hub, u

pytestmark = [pytest.mark.hub, pytest.mark.idp, pytest.mark.browser, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CourseStack]:
    work = tmp_path_factory.mktemp("course-pages")
    (work / "course-data").mkdir()
    courses = {"data_root": str(work / "course-data"), "lifecycle_interval_seconds": 3600}
    with course_hub(work, courses) as (hub, idp):
        st = CourseStack(hub, idp)
        warm = {"minutes": 10, "fraction": 1.0, "unclaimed_minutes": 15}
        st.create_courses(  # the operator creates both courses
            course("ml101", tas=[u("tara")], prewarm=warm),
            course("cv202", instructors=[u("igor")]),
        )
        st.login_all("ines", "tara", "s1", "s2", "igor")
        yield st


# -- plain HTTP: every cell is the real page over the real API ---------------------------------
def test_my_courses_lists_the_callers_courses_with_their_role(stack: CourseStack) -> None:
    r = stack.page("ines", "courses")
    assert r.status_code == 200, r.text[:500]
    assert re.search(r'data-course="ml101".*?sp-role">instructor<', r.text, re.S)
    assert 'data-course="cv202"' not in r.text
    r = stack.page("tara", "courses")
    assert re.search(r'data-course="ml101".*?sp-role">ta<', r.text, re.S)
    r = stack.page("s1", "courses")
    assert re.search(r'data-course="ml101".*?sp-role">student<', r.text, re.S)
    assert "/hub/courses/ml101/class" not in r.text  # a student gets the spawn link


def test_instructor_edits_the_course_through_the_page(stack: CourseStack) -> None:
    page = stack.page("ines", "courses/ml101")
    assert page.status_code == 200 and 'id="sp-save"' in page.text, page.text[:500]
    assert "tue 09:15 90" in page.text  # the schedule as the form shows it
    r = stack.post("ines", "courses/ml101", {"action": "edit", "title": "Machine learning",
                   "schedule": "tue 09:15 90\nthu 14:00 60", "per_student": "3"})  # fmt: skip
    assert r.status_code == 200, r.text[:800]
    assert "Saved: budget, schedule, title." in r.text
    got = stack.portal("ines", "GET", "/ml101").json()
    assert got["title"] == "Machine learning" and got["budget"]["per_student"] == 3
    assert got["schedule"][1] == {"weekday": "thu", "time": "14:00", "minutes": 60}


@pytest.mark.parametrize(
    ("form", "field", "words"),
    [
        ({"end": str(TODAY - timedelta(days=5))}, "end", "must be after the start"),
        ({"per_student": "500"}, "budget.per_student", "500"),
        ({"sizes": "h100:7g.80gb-nope"}, "sizes[0]", "h100:7g.80gb-nope"),
        ({"schedule": "someday 09:15 90"}, "schedule[0].weekday", "someday"),
    ],
)
def test_a_refused_edit_shows_the_apis_message_and_changes_nothing(
    stack: CourseStack, form: dict[str, str], field: str | None, words: str
) -> None:
    before = stack.portal("ines", "GET", "/ml101").json()
    r = stack.post("ines", "courses/ml101", {"action": "edit", **form})
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:500])
    assert "Nothing was changed." in r.text and words in r.text, r.text[:3000]
    if field is not None:
        assert f'data-field="{field}"' in r.text
    assert stack.portal("ines", "GET", "/ml101").json() == before


def test_the_roster_through_the_page(stack: CourseStack) -> None:
    r = stack.post("ines", "courses/ml101", {"action": "add", "user": u("late1")})
    assert r.status_code == 200 and f"Added {u('late1')}." in r.text, r.text[:800]
    assert u("late1") in stack.portal("ines", "GET", "/ml101/roster").json()["added"]
    assert "access at first login" in r.text

    def upload(csv: bytes) -> requests.Response:
        files = {"roster": ("roster.csv", csv, "text/csv")}
        return stack.post("ines", "courses/ml101", {"action": "upload"}, files=files)

    # a CSV file with a duplicate row: 400 naming the row, nothing added
    bad = f"identifier\n{u('late2')}\n{u('late2')}\n".encode()
    r = upload(bad)
    assert r.status_code == 400 and "Nothing was changed." in r.text, r.text[:800]
    assert re.search(r"row 3|line 3|duplicate", r.text), r.text[:3000]
    assert u("late2") not in stack.portal("ines", "GET", "/ml101/roster").json()["added"]
    bom = f"\ufeffidentifier\n{u('late2')}\n".encode()  # refused, not skipped (run-a-course)
    r = upload(bom)
    assert r.status_code == 400 and "Nothing was changed." in r.text, r.text[:800]
    assert "byte-order mark" in r.text or "BOM" in r.text, r.text[:3000]
    good = f"identifier\n{u('late2')}\n{u('late3')}\n".encode()
    r = upload(good)
    assert r.status_code == 200 and "Roster file: 2 added" in r.text, r.text[:800]
    # a removal through the page: s2 leaves the course group at once
    r = stack.post("ines", "courses/ml101", {"action": "remove", "user": u("s2")})
    assert r.status_code == 200 and f"Removed {u('s2')}" in r.text, r.text[:800]
    assert "course-ml101" not in stack.hub.api("GET", f"/users/{u('s2')}").json()["groups"]


def test_a_ta_sees_the_course_and_cannot_change_it(stack: CourseStack) -> None:
    r = stack.page("tara", "courses/ml101")
    assert r.status_code == 200, r.text[:500]
    assert "<fieldset disabled>" in r.text and 'id="sp-save"' not in r.text
    assert 'id="sp-add"' not in r.text and u("s1") in r.text  # the roster, read-only
    before = stack.portal("olga", "GET", "/ml101").json()
    r = stack.post("tara", "courses/ml101", {"action": "edit", "title": "TA was here"})
    assert r.status_code == 403 and "teaching assistant cannot do this" in r.text, r.text[:800]
    r = stack.post("tara", "courses/ml101", {"action": "add", "user": u("ta-add")})
    assert r.status_code == 403
    assert stack.portal("olga", "GET", "/ml101").json() == before


@pytest.mark.parametrize(
    ("who", "path"),
    [
        ("s1", "courses/ml101"),
        ("s1", "courses/ml101/class"),
        ("igor", "courses/ml101"),
        ("igor", "courses/ml101/class"),
        ("ines", "courses/cv202"),
        ("ines", "courses/no-such"),
    ],
)
def test_students_and_other_courses_staff_get_403(stack: CourseStack, who: str, path: str) -> None:
    r = stack.page(who, path)
    assert r.status_code == 403, (r.status_code, r.text[:500])


def test_the_class_view_on_the_real_class_api(stack: CourseStack) -> None:
    api = stack.portal("ines", "GET", "/ml101/class")
    assert api.status_code == 200, (api.status_code, api.text[:300])  # H2's real endpoint
    view = api.json()
    r = stack.page("ines", "courses/ml101/class")
    assert r.status_code == 200, r.text[:800]
    assert 'id="sp-prewarm-now"' in r.text
    assert f'class="sp-prewarm-state">{view["prewarm"]["state"]}<' in r.text
    for s in view["students"]:
        assert f'data-user="{s["user"]}" data-state="{s["state"]}"' in r.text
    r = stack.post("ines", "courses/ml101/class", {"fraction": "lots"})
    assert r.status_code == 400 and "fraction" in r.text, r.text[:800]
    try:
        r = stack.post("ines", "courses/ml101/class", {})
        assert r.status_code == 200 and "Pre-warm started." in r.text, r.text[:800]
        after = stack.portal("ines", "GET", "/ml101/class").json()
        assert after["prewarm"]["state"] in ("warming", "warm"), after
        assert after["prewarm"]["requested"] >= 1, after
        shown = re.search(r'class="sp-prewarm-state">(\w+)<', r.text)
        assert shown and shown.group(1) in ("warming", "warm"), r.text[:2000]
    finally:  # the warm servers go again (a pending start answers 400: ask again)
        names = [x["user"] for x in stack.portal("olga", "GET", "/ml101/class").json()["students"]]

        def none_left() -> bool:
            left = [n for n in names if stack.hub.api("GET", f"/users/{n}").json().get("servers")]
            for n in left:
                stack.hub.api("DELETE", f"/users/{n}/server")
            return not left

        stack.hub.wait_for(none_left, 180, "the warm servers stopped", interval=2.0)


# -- Chromium ----------------------------------------------------------------------------------
def test_course_pages_in_chromium_with_screenshots_and_no_foreign_request(
    stack: CourseStack, tmp_path: Path
) -> None:
    hub, idp = stack.hub, stack.idp
    guard = HostGuard(hub.url, idp.issuer)
    shots: list[Path] = []

    def shot(page: Page, name: str) -> None:
        shots.append(tmp_path / name)  # the test's own dir, never docs/
        page.screenshot(path=str(shots[-1]), full_page=True)

    with guarded_chromium(guard, 1200, 1100) as page:
        idp_login(page, hub.url, idp.issuer, "ines")
        page.wait_for_url(f"{hub.url}/hub/**")
        page.goto(f"{hub.url}/hub/courses/ml101")
        page.wait_for_selector("#sp-course")
        assert page.locator("nav a", has_text="My courses").count() >= 1  # the hub's nav bar
        # a refused edit in the browser: the message names the field, nothing changed
        page.fill("#sp-end", str(TODAY - timedelta(days=9)))
        page.click("#sp-save")
        page.wait_for_selector(".sp-error")
        assert page.locator(".sp-error-field").inner_text() == "end"
        shot(page, "course-page-refused.png")
        page.goto(f"{hub.url}/hub/courses/ml101")
        page.fill("#sp-add-user", u("chromium1"))
        page.click("#sp-add button")
        page.wait_for_selector(".sp-done")
        assert u("chromium1") in page.locator(".sp-done").inner_text()
        shot(page, "course-page.png")
        page.goto(f"{hub.url}/hub/courses/ml101/class")
        page.wait_for_selector("#sp-class")
        assert page.locator("#sp-prewarm-now").count() == 1
        shot(page, "course-class.png")

    # a student's spawn form: the course's sizes and the remaining allowance
    with guarded_chromium(guard, 1200, 1100) as page:
        idp_login(page, hub.url, idp.issuer, "s1")
        page.wait_for_url(f"{hub.url}/hub/**")
        page.goto(f"{hub.url}/hub/spawn")
        page.wait_for_selector("#sp-size")
        values = page.locator("#sp-size option").evaluate_all("els => els.map(e => e.value)")
        assert sorted(v for v in values if v) == ["lab/h100:1g.10gb", "lab/h100:3g.40gb"], values
        assert re.search(r"ml101 has [0-9.]+ GPU-hours left for you", page.content())
        shot(page, "course-spawn-form.png")

    assert guard.foreign == [], f"requests to hosts outside the deployment: {guard.foreign}"
    offsite = [x for x in guard.seen if urlsplit(x).netloc not in guard.own
               and not x.startswith(("data:", "blob:"))]  # fmt: skip
    assert offsite == [], offsite
    assert any("/hub/courses/ml101/class" in x for x in guard.seen)
    for out in shots:
        assert out.stat().st_size > 10_000, out  # a real picture, not a blank page
