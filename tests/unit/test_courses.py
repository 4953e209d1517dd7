"""The course model (hub/courses.py) as tables: validation, roster files, roles, the spawn
rule, the phases of a course."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from sovereign_portal.hub.courses import (
    MAX_ROSTER_ROWS,
    Course,
    CourseError,
    CourseForbidden,
    Limits,
    Memberships,
    RosterError,
    SiteOffer,
    apply_changes,
    check_spawn,
    course_role,
    effective_groups,
    parse_course,
    parse_roster_csv,
    phase,
    pick_course,
    require,
)

pytestmark = pytest.mark.unit

OFFER = SiteOffer(
    sizes=frozenset({"h100:1g.10gb", "h100:3g.40gb", "h100x1"}),
    images=frozenset({"ml101", "base"}),
    data_root="/srv/courses",
)


def raw(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": "ml101",
        "title": "Machine learning 101",
        "instructors": ["ines@uni-a.example"],
        "tas": ["tom@uni-a.example"],
        "image": "ml101",
        "sizes": ["h100:1g.10gb", "h100:3g.40gb"],
        "budget": {"period": "2026-autumn", "unit": "gpu_hours", "pool": 100, "per_student": 5},
        "data_path": "/srv/courses/ml101",
        "start": "2026-09-01",
        "end": "2027-02-01",
        "schedule": [{"weekday": "tue", "time": "09:15", "minutes": 90}],
    }
    base.update(over)
    return {k: v for k, v in base.items() if v is not ...}


def test_a_whole_course_parses_and_round_trips() -> None:
    c = parse_course(raw(), OFFER)
    assert c.id == "ml101" and c.sizes == ("h100:1g.10gb", "h100:3g.40gb")
    assert c.budget is not None and c.budget.pool == 100 and c.budget.per_student == 5
    assert c.ta_server_access is False  # off by default
    assert parse_course(c.to_json(), OFFER) == c
    assert c.group == "course-ml101" and c.ta_group == "tas-ml101"


@pytest.mark.parametrize(
    ("over", "field", "match"),
    [
        ({"colour": "red"}, "colour", "unknown field"),
        ({"id": "ML 101"}, "id", "a-z0-9"),
        ({"title": ...}, "title", "required"),
        ({"title": "x\u202ey"}, "title", "control character"),
        ({"start": "2027-02-01", "end": "2026-09-01"}, "end", "after the start"),
        ({"end": "2026-09-01"}, "end", "after the start"),
        ({"start": "01/09/2026"}, "start", "ISO date"),
        ({"sizes": ["h100x8"]}, "sizes[0]", "no size 'h100x8'"),
        ({"sizes": ["h100x1", "h100x1"]}, "sizes[1]", "twice"),
        ({"image": "cuda-latest"}, "image", "no image 'cuda-latest'"),
        ({"instructors": []}, "instructors", "at least 1"),
        ({"instructors": ["Ines"]}, "instructors[0]", "institutional identifier"),
        ({"instructors": ["ines"]}, "instructors[0]", "institutional identifier"),
        ({"tas": ["ines@uni-a.example"]}, "tas", "instructor already"),
        ({"tas": ["a@uni-a.example", "a@uni-a.example"]}, "tas", "twice"),
        (
            {"budget": {"unit": "gpu_hours", "pool": 10, "per_student": 11}},
            "budget.per_student",
            "above the course pool",
        ),
        ({"budget": {"unit": "gpu_hours", "pool": -1}}, "budget.pool", "negative"),
        ({"budget": {"unit": "gpu_hours", "pool": "nan"}}, "budget.pool", "digits"),
        ({"budget": {"unit": "hours", "pool": 1}}, "budget.unit", "one of"),
        ({"budget": {"unit": "eur", "pool": 1, "owner": "x"}}, "budget.owner", "unknown"),
        ({"budget": {"pool": 1}}, "budget.unit", "required"),
        ({"data_path": "/etc/passwd"}, "data_path", "under the site's course data root"),
        ({"data_path": "/srv/courses/../etc"}, "data_path", "no '..'"),
        ({"data_path": "data/ml101"}, "data_path", "absolute"),
        (
            {"schedule": [{"weekday": "Tuesday", "time": "09:00", "minutes": 60}]},
            "schedule[0].weekday",
            "one of",
        ),
        (
            {"schedule": [{"weekday": "tue", "time": "9:00", "minutes": 60}]},
            "schedule[0].time",
            "HH:MM",
        ),
        (
            {"schedule": [{"weekday": "tue", "time": "09:00", "minutes": 0}]},
            "schedule[0].minutes",
            "from 1",
        ),
        ({"schedule": [{"weekday": "tue", "time": "09:00"}]}, "schedule[0].minutes", "required"),
        ({"ta_server_access": "yes"}, "ta_server_access", "true or false"),
        ({"retention_days": -1}, "retention_days", "from 0"),
        ({"retention_days": True}, "retention_days", "whole number"),
    ],
)
def test_bad_input_names_the_field(over: dict[str, Any], field: str, match: str) -> None:
    with pytest.raises(CourseError, match=match) as info:
        parse_course(raw(**over), OFFER)
    assert info.value.field == field
    assert info.value.status == 400
    assert str(info.value).startswith(f"{field}: ")


def test_a_site_that_keeps_servers_closed_refuses_ta_server_access() -> None:
    closed = SiteOffer(sizes=OFFER.sizes, images=OFFER.images, server_access=False)
    with pytest.raises(CourseError) as info:
        parse_course(raw(data_path=None, ta_server_access=True), closed)
    assert info.value.field == "ta_server_access" and info.value.status == 403
    assert not parse_course(raw(data_path=None), closed).ta_server_access


def test_a_site_without_an_image_list_takes_no_image() -> None:
    bare = SiteOffer(sizes=OFFER.sizes, images=None)
    with pytest.raises(CourseError, match="no image allow-list"):
        parse_course(raw(data_path=None), bare)
    assert parse_course(raw(image=None, data_path=None), bare).image is None


def test_changes_are_validated_as_a_whole_and_the_id_stays() -> None:
    c = parse_course(raw(), OFFER)
    c2 = apply_changes(c, {"sizes": ["h100x1"], "ta_server_access": True}, OFFER)
    assert c2.sizes == ("h100x1",) and c2.ta_server_access and c2.title == c.title
    with pytest.raises(CourseError) as info:
        apply_changes(c, {"id": "other"}, OFFER)
    assert info.value.field == "id"
    with pytest.raises(CourseError) as info:
        apply_changes(c, {"end": "2026-08-01"}, OFFER)
    assert info.value.field == "end"
    with pytest.raises(CourseError) as info:
        apply_changes(c, {"retention_days": 10}, OFFER)  # an operator's field
    assert info.value.field == "retention_days" and info.value.status == 403
    assert apply_changes(c, {"retention_days": 10}, OFFER, operator=True).retention_days == 10


# -- roster files ---------------------------------------------------------------------------------
def test_a_roster_file_gives_its_identifiers() -> None:
    data = b"identifier,name\nalice@uni-a.example,Alice\n\nbob@uni-b.example,Bob\n"
    assert parse_roster_csv(data) == ["alice@uni-a.example", "bob@uni-b.example"]
    assert parse_roster_csv("Identifier\r\ncarol@uni-a.example\r\n") == ["carol@uni-a.example"]


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\xef\xbb\xbfidentifier\nalice@uni-a.example\n", "row 1: .*byte-order mark"),
        ("\ufeffidentifier\nalice@uni-a.example\n", "row 1: .*byte-order mark"),
        (b"identifier\nalice@uni-a.example\nalice@uni-a.example\n", "row 3: .*twice .*row 2"),
        (b"identifier\nalice@uni-a.example\nAlice Smith\n", "row 3: .*institutional"),
        (b"identifier\nalice@uni-a.example,extra\n", "row 2: has 2 columns"),
        (b"email\nalice@uni-a.example\n", "row 1: the header"),
        (b"identifier,identifier\na@uni-a.example,a@uni-a.example\n", "row 1: the header"),
        (b"identifier\n\xff\xfe\n", "row 2: is not UTF-8"),
        (b"identifier\n", "lists nobody"),
        (b"", "empty"),
        (b'identifier\n"alice@uni-a.example\n', "not CSV|institutional"),
    ],
)
def test_bad_roster_files_name_the_row(data: bytes | str, match: str) -> None:
    with pytest.raises(RosterError, match=match) as info:
        parse_roster_csv(data)
    assert info.value.field == "roster" and info.value.status == 400


def test_a_roster_of_a_hundred_thousand_lines_is_refused_at_the_limit() -> None:
    data = "identifier\n" + "".join(f"s{i}@uni-a.example\n" for i in range(100_000))
    with pytest.raises(RosterError, match=f"row {MAX_ROSTER_ROWS + 2}: .*more than") as info:
        parse_roster_csv(data.encode())
    assert info.value.field == "roster"
    assert len(parse_roster_csv(data.encode(), max_rows=100_000)) == 100_000


# -- memberships and roles ------------------------------------------------------------------------
def test_portal_additions_and_removals_fold_into_the_idp_groups() -> None:
    m = Memberships(
        added=frozenset({"ml101"}),
        removed=frozenset({"phys1"}),
        teaching=frozenset({"cs50"}),
        assisting=frozenset({"db1"}),
    )
    got = effective_groups(["course-phys1", "project-x"], m)
    assert got == ["course-ml101", "instructors-cs50", "project-x", "tas-db1"]


def _course(**over: Any) -> Course:
    return parse_course(raw(**over), OFFER)


@pytest.mark.parametrize(
    ("user", "groups", "operator", "role"),
    [
        ("ines@uni-a.example", [], False, "instructor"),
        ("ivan@uni-a.example", ["instructors-ml101"], False, "instructor"),
        ("tom@uni-a.example", [], False, "ta"),
        ("sam@uni-a.example", ["course-ml101"], False, "student"),
        ("sam@uni-a.example", ["course-cs50"], False, None),
        ("sam@uni-a.example", ["instructors-cs50", "tas-cs50"], False, None),
        ("op@uni-a.example", [], True, "operator"),
    ],
)
def test_course_role(user: str, groups: list[str], operator: bool, role: str | None) -> None:
    assert course_role(_course(), user, groups, operator) == role


@pytest.mark.parametrize(
    ("role", "action", "ok"),
    [
        ("student", "read", True),
        ("student", "read_staff", False),
        ("student", "roster", False),
        ("ta", "read_staff", True),
        ("ta", "servers", True),
        ("ta", "roster", False),
        ("ta", "edit", False),
        ("instructor", "roster", True),
        ("instructor", "edit", True),
        (None, "read", False),
        ("operator", "edit", True),
    ],
)
def test_permissions_table(role: str | None, action: str, ok: bool) -> None:
    if ok:
        assert require(role, action, "ml101") == role
    else:
        with pytest.raises(CourseForbidden, match="course ml101") as info:
            require(role, action, "ml101")
        assert info.value.status == 403 and info.value.field == "course"


# -- the spawn rule -------------------------------------------------------------------------------
def test_the_spawn_rule_names_the_course_rule() -> None:
    c = _course()
    check_spawn(c, "h100:1g.10gb", "ml101")
    check_spawn(c, "h100:3g.40gb", None)
    with pytest.raises(CourseForbidden, match="course ml101 allows the sizes") as info:
        check_spawn(c, "h100x1", "ml101")
    assert info.value.status == 403 and info.value.field == "size"
    with pytest.raises(CourseForbidden, match="runs the image ml101") as info:
        check_spawn(c, "h100:1g.10gb", "base")
    assert info.value.field == "image"
    check_spawn(_course(sizes=[], image=None), "h100x1", "base")  # no rule: anything


def test_a_student_of_two_courses_picks_the_course_first() -> None:
    a, b = _course(), _course(id="cs50")
    assert pick_course([a], None) is a
    assert pick_course([], None) is None
    assert pick_course([a, b], "cs50") is b
    with pytest.raises(CourseError, match="choose the course first") as info:
        pick_course([a, b], None)
    assert info.value.field == "course"
    with pytest.raises(CourseForbidden, match="not one of yours"):
        pick_course([a], "cs50")


# -- phases and limits ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("when", "expected"),
    [
        ("2026-08-31T23:59:00", "upcoming"),
        ("2026-09-01T00:00:00", "running"),
        ("2027-01-31T23:59:00", "running"),
        ("2027-02-01T00:00:00", "ended"),
        ("2027-02-10T23:59:00", "ended"),
        ("2027-02-11T00:00:00", "purge"),
    ],
)
def test_phases(when: str, expected: str) -> None:
    c = _course(retention_days=10)
    assert phase(c, datetime.fromisoformat(when).replace(tzinfo=UTC)) == expected


def test_creator_limits() -> None:
    lim = Limits(max_courses=1, max_pool={"gpu_hours": 50.0}, max_days=200)
    with pytest.raises(CourseError) as info:
        lim.check(_course(), 0)  # pool 100 > 50
    assert info.value.field == "budget.pool" and info.value.status == 403
    with pytest.raises(CourseError) as info:
        lim.check(_course(budget=None), 1)
    assert info.value.field == "id"
    with pytest.raises(CourseError) as info:
        lim.check(_course(budget=None, end="2027-09-01"), 0)
    assert info.value.field == "end"
    lim.check(_course(budget=None, end="2026-12-01"), 0)


def test_a_login_folds_in_the_portals_course_records() -> None:
    from sovereign_portal.hub.claims import Identity
    from sovereign_portal.hub.courses import apply_memberships

    idp = Identity("sam@uni-a.example", "uni-a.example", "student", courses=frozenset({"phys1"}))
    m = Memberships(added=frozenset({"ml101"}), removed=frozenset({"phys1"}))
    new, groups = apply_memberships(idp, m)
    assert new.courses == {"ml101"} and new.role == "student"
    assert groups == ["course-ml101"]
    ta, groups = apply_memberships(idp, Memberships(assisting=frozenset({"ml101"})))
    assert ta.role == "student" and groups == ["course-phys1", "tas-ml101"]
    teacher, groups = apply_memberships(idp, Memberships(teaching=frozenset({"ml101"})))
    assert teacher.role == "instructor" and "instructors-ml101" in groups
    op = Identity("o@uni-a.example", "uni-a.example", "operator")
    assert apply_memberships(op, Memberships(teaching=frozenset({"x"})))[0].role == "operator"
