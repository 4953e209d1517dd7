"""The course data folder's ACLs and links (hub/course_data.py), on this machine's file
system (the real-service proof is tests/hub/test_course_data.py, on Slurm)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from sovereign_portal.hub import course_data as cd
from sovereign_portal.spawners.slurm.userfiles import UserFileError

pytestmark = pytest.mark.unit

STUDENT, STAFF = 4201, 4202  # uids need no account for an ACL entry


def folder(tmp_path: Path) -> Path:
    root = tmp_path / "ml101"
    (root / "sub").mkdir(parents=True)
    (root / "data.csv").write_text("a,b\n")
    run = root / "run.sh"
    run.write_text("#!/bin/sh\n")
    run.chmod(0o755)
    (root / "link").symlink_to("/etc/passwd")
    return root


def test_the_xattr_format_round_trips_and_refuses_garbage() -> None:
    entries = [(cd.OTHER, 0, 0xFFFFFFFF), (cd.USER, 5, 7), (cd.USER_OBJ, 7, 0xFFFFFFFF)]
    raw = cd.encode(entries)
    assert cd.decode(raw) == sorted(entries, key=lambda e: (e[0], e[2]))
    for bad in (b"", b"\x01\x00\x00\x00", cd.encode(entries)[:-1]):
        with pytest.raises(ValueError, match="POSIX ACL"):
            cd.decode(bad)


def test_apply_gives_staff_rwx_students_rx_and_nobody_else_anything(tmp_path: Path) -> None:
    root = folder(tmp_path)
    n = cd.apply(root, [STUDENT, STAFF], [STAFF])  # staff wins over student
    assert n == 4  # the folder, sub, data.csv, run.sh; the link is never followed
    assert cd.named_users(root) == {STAFF: 7, STUDENT: 5}
    assert cd.named_users(root / "data.csv") == {STAFF: 6, STUDENT: 4}  # no x on data
    assert cd.named_users(root / "run.sh") == {STAFF: 7, STUDENT: 5}
    default = cd.read_acl(root / "sub", cd.DEFAULT)
    assert default is not None and {(t, i): p for t, p, i in default}[(cd.USER, STUDENT)] == 5
    assert stat.S_IMODE(os.stat(root).st_mode) & 0o007 == 0  # other: nothing
    assert cd.read_acl(root / "link") is None and cd.read_acl("/etc/passwd") is None
    assert cd.apply(root, [STUDENT], [STAFF]) == 0  # already so: nothing written
    assert cd.apply(root, [], [STAFF]) == 4  # a student out of the course: entries go
    assert cd.named_users(root / "data.csv") == {STAFF: 6}


def test_a_new_file_inherits_the_course_entries(tmp_path: Path) -> None:
    root = folder(tmp_path)
    cd.apply(root, [STUDENT], [STAFF])
    new = root / "sub" / "new.txt"
    new.write_text("x")  # created 0666: the mask (rw-) limits the inherited entries
    acl = {(t, i): p for t, p, i in cd.read_acl(new) or []}
    mask = acl[(cd.MASK, 0xFFFFFFFF)]
    assert mask == 6
    effective = {i: p & mask for (t, i), p in acl.items() if t == cd.USER}
    assert effective == {STAFF: 6, STUDENT: 4}


def test_seal_takes_write_out_of_every_entry(tmp_path: Path) -> None:
    root = folder(tmp_path)
    cd.apply(root, [STUDENT], [STAFF])
    assert cd.seal(root) == 4
    for p in (root, root / "sub", root / "data.csv", root / "run.sh"):
        assert all(bits & cd.W == 0 for bits in cd.named_users(p).values()), p
        assert stat.S_IMODE(os.lstat(p).st_mode) & 0o222 == 0, p
    default = cd.read_acl(root / "sub", cd.DEFAULT) or []
    assert all(bits & cd.W == 0 for _, bits, _ in default)
    assert cd.seal(tmp_path / "gone") == 0


def test_apply_refuses_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        cd.apply(tmp_path / "f", [STUDENT], [STAFF])


def test_the_link_in_a_home(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    uid, gid = os.geteuid(), os.getegid()
    assert cd.link(str(home), uid, gid, "ml101", "/srv/courses/ml101")
    assert os.readlink(home / "course-data" / "ml101") == "/srv/courses/ml101"
    assert stat.S_IMODE(os.stat(home / "course-data").st_mode) == 0o700
    assert cd.link(str(home), uid, gid, "ml101", "/srv/courses/ml101-new")  # moved: replaced
    assert os.readlink(home / "course-data" / "ml101") == "/srv/courses/ml101-new"
    (home / "course-data" / "cv202").mkdir()  # the user's own folder there: left alone
    assert not cd.link(str(home), uid, gid, "cv202", "/srv/courses/cv202")
    assert (home / "course-data" / "cv202").is_dir()
    other = tmp_path / "home2"
    other.mkdir()
    (other / "course-data").symlink_to(tmp_path)  # a link where the folder goes: refused
    with pytest.raises(UserFileError, match="symbolic link"):
        cd.link(str(other), uid, gid, "ml101", "/srv/courses/ml101")
    assert not (tmp_path / "ml101").exists()
