"""``sovereign-portal course ...`` (hub/course_cli.py) on a real SQLite portal database:
create, edit, list, show, roster; bad input exits 2 naming the field and changes nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sovereign_portal.hub.cli import main
from sovereign_portal.hub.course_store import CourseStore
from sovereign_portal.hub.store import PortalStore

pytestmark = pytest.mark.unit

COURSE = {
    "id": "ml101",
    "title": "Machine learning 101",
    "instructors": ["ines@uni-a.example"],
    "sizes": ["h100:1g.10gb"],
    "budget": {"unit": "gpu_hours", "pool": 20, "per_student": 2},
    "start": "2026-09-01",
    "end": "2027-02-01",
}


def run(capsys: pytest.CaptureFixture[str], db: str, *args: str) -> tuple[int, str, str]:
    code = main(["course", *args, "--db", db])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'portal.sqlite'}"


def write(tmp_path: Path, name: str, data: Any) -> str:
    p = tmp_path / name
    p.write_bytes(data if isinstance(data, bytes) else json.dumps(data).encode())
    return str(p)


def test_create_show_edit_list(tmp_path: Path, db: str, capsys: Any) -> None:
    code, out, err = run(capsys, db, "create", write(tmp_path, "c.json", COURSE), "--json")
    assert code == 0, err
    assert json.loads(out)["id"] == "ml101"
    code, out, _ = run(capsys, db, "edit", "ml101", write(tmp_path, "e.json", {"title": "ML"}))
    assert code == 0 and "changed ml101: title" in out
    code, out, _ = run(capsys, db, "list")
    assert code == 0 and "ml101" in out and "active" in out and "ML" in out
    code, out, _ = run(capsys, db, "show", "ml101", "--json")
    shown = json.loads(out)
    assert [e["action"] for e in shown["audit"]] == ["course.create", "course.update"]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({**COURSE, "end": "2026-01-01"}, "end: must be after the start"),
        ({**COURSE, "sizes": ["h100x8"]}, "sizes[0]: this site has no size"),
        ({**COURSE, "image": "gpu"}, "image: this site has no image"),
        (
            {**COURSE, "budget": {"unit": "gpu_hours", "pool": 1, "per_student": 2}},
            "budget.per_student",
        ),
        (b'{"id": "a", "id": "b"}', "appears twice"),
    ],
)
def test_bad_input_exits_2_and_changes_nothing(
    tmp_path: Path, db: str, capsys: Any, data: Any, message: str
) -> None:
    code, _, err = run(capsys, db, "create", write(tmp_path, "c.json", data))
    assert code == 2 and message in err
    store = PortalStore(db)
    store.upgrade()  # the duplicate key is refused before the database is opened
    assert CourseStore(store).all() == []


def test_roster_csv(tmp_path: Path, db: str, capsys: Any) -> None:
    assert run(capsys, db, "create", write(tmp_path, "c.json", COURSE))[0] == 0
    good = write(tmp_path, "r.csv", b"identifier\nsam@uni-a.example\nsue@uni-b.example\n")
    code, out, _ = run(capsys, db, "roster", "ml101", "--add-csv", good)
    assert code == 0 and "2 added" in out
    for name, data, message in [
        ("bom.csv", b"\xef\xbb\xbfidentifier\nzed@uni-a.example\n", "row 1: the file starts"),
        ("dup.csv", b"identifier\nzed@uni-a.example\nzed@uni-a.example\n", "row 3"),
        ("bad.csv", b"identifier\nzed\n", "row 2"),
    ]:
        code, _, err = run(capsys, db, "roster", "ml101", "--add-csv", write(tmp_path, name, data))
        assert code == 2 and "--add-csv: roster: " + message in err, err
    assert CourseStore(PortalStore(db)).roster("ml101")["added"] == [
        "sam@uni-a.example",
        "sue@uni-b.example",
    ]
    code, out, _ = run(capsys, db, "roster", "ml101", "--remove", "sam@uni-a.example")
    assert code == 0 and "1 removed" in out
