"""A course's data folder in its servers, on the real hub and the real Slurm cluster.

Course ml101 (in the portal database the hub reads) has a data folder; its instructor is
spbob@uni-a.example, its student spalice@uni-a.example (hub group ``course-ml101``);
spdave@uni-a.example is in no course. Each spawns a MIG notebook on Slurm as their own Unix
account (``unix_user_template = "{login}"``: spalice, spbob, spdave). The hub (hub/course_data.py)
sets the folder's ACL and links it at ``~/course-data/ml101`` in the server's home:

- the student's server reads the folder through the link (JupyterLab's contents API of
  the running server) and cannot write to it (a 403 there; the Unix account is refused
  too); an outsider's account cannot even list it;
- the instructor's server writes a file that the student's server then reads;
- a student taken out of the course group loses access at the next course spawn even on a
  hub without the portal service (the roster change through the service takes it away at
  once: tests/hub/test_class_start_hub_slurm.py);
- the end of a course (``seal`` and ``make_read_only``, what ``end_course`` does) makes
  the folder read-only for everyone, the instructor's server included.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from sovereign_portal.hub.course_data import LINK_DIR, named_users, seal
from sovereign_portal.hub.course_store import ENDED, CourseStore, make_read_only, site_offer
from sovereign_portal.hub.store import PortalStore
from sovereign_portal.spawners.site import load_site

from tests.support.hub import HubProcess
from tests.support.slurm_cluster import SITE_FILE, SlurmCluster, spawner_config

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(600)]

ORG = "uni-a.example"
#: hub users (institutional identifiers); their Unix accounts are the login before the "@"
STUDENT, STAFF, OUTSIDER = f"spalice@{ORG}", f"spbob@{ORG}", f"spdave@{ORG}"


def unix(user: str) -> str:
    return user.split("@", 1)[0]


CONFIG = """
c.JupyterHub.authenticator_class = "dummy"
c.Authenticator.allow_all = True
c.PortalDatabase.url = "sqlite:///{db}"
from sovereign_portal.hub.course_data import install
install(c)
"""


class Stack:
    def __init__(self, hub: HubProcess, data: Path) -> None:
        self.hub, self.data = hub, data

    def spawn(self, user: str) -> None:
        self.hub.ensure_user(user)
        if self.hub.api("GET", f"/users/{user}").json().get("servers"):
            self.hub.stop_server(user)
        self.hub.spawn(user, {"partition": "gpu-fr", "slice": "1g.10gb"}, timeout=180)

    def contents(self, user: str, path: str, method: str = "GET", **kw: Any) -> requests.Response:
        """The running server's own contents API (the server's files, as its account)."""
        return requests.request(
            method,
            f"{self.hub.url}/user/{user}/api/contents/{path}",
            headers={"Authorization": f"token {self.hub.token}"},
            timeout=30,
            **kw,
        )

    def put(self, user: str, path: str, text: str) -> requests.Response:
        body = {"type": "file", "format": "text", "content": text}
        return self.contents(user, path, "PUT", json=body)


def as_user(user: str, *argv: str) -> subprocess.CompletedProcess[str]:
    """``argv`` as the hub user's Unix account, outside any server."""
    return subprocess.run(
        ["runuser", "-u", unix(user), "--", *argv], capture_output=True, text=True, timeout=30
    )


@pytest.fixture(scope="module")
def stack(slurm_cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    d = tmp_path_factory.mktemp("course-data-hub")
    shared = Path(tempfile.mkdtemp(prefix="sp-coursedata-", dir="/tmp"))
    shared.chmod(0o755)  # the course data root: traversable, as a site's would be
    data = shared / "courses" / "ml101"
    data.mkdir(parents=True)
    data.parent.chmod(0o755)
    (data / "readme.txt").write_text("welcome to ml101\n")
    job_egress = shared / "job-egress.log"
    job_egress.touch(0o666)
    job_egress.chmod(0o666)
    db = d / "portal.sqlite"
    store = PortalStore(f"sqlite:///{db}")
    store.upgrade()
    today = datetime.now(UTC).date()
    CourseStore(store).create(
        {
            "id": "ml101",
            "title": "Machine learning 101",
            "instructors": [STAFF],
            "sizes": ["h100:1g.10gb"],
            "budget": None,
            "data_path": str(data),
            "start": str(today - timedelta(days=1)),
            "end": str(today + timedelta(days=30)),
        },
        site_offer(load_site(SITE_FILE), None, str(shared / "courses")),
        "operator",
    )
    store.dispose()
    config = CONFIG.format(db=db) + spawner_config(tag_key=d / "tag.key", job_egress=job_egress)
    h = HubProcess(d, config, env={"SLURM_CONF": str(slurm_cluster.conf)}, poll_interval=1)
    h.start()
    try:
        for user in (STUDENT, STAFF, OUTSIDER):
            h.ensure_user(user)
        r = h.api("POST", "/groups/course-ml101", json={"users": [STUDENT]})
        assert r.status_code == 201, r.text
        yield Stack(h, data)
    finally:
        for user in (STUDENT, STAFF, OUTSIDER):
            if h.api("GET", f"/users/{user}").json().get("servers"):
                h.stop_server(user)
        h.close()
        h.assert_no_egress()
        egress = job_egress.read_text()
        subprocess.run(["rm", "-rf", str(shared)], check=False)
        for user in (STUDENT, STAFF, OUTSIDER):
            subprocess.run(["rm", "-rf", f"{home(user)}/{LINK_DIR}"], check=False)
        assert egress == "", egress


def uid(user: str) -> int:
    return pwd.getpwnam(unix(user)).pw_uid


def home(user: str) -> str:
    return pwd.getpwnam(unix(user)).pw_dir


def test_the_students_server_reads_the_folder_through_its_link_and_cannot_write(
    stack: Stack,
) -> None:
    stack.spawn(STUDENT)
    link = Path(home(STUDENT)) / LINK_DIR / "ml101"
    assert os.readlink(link) == str(stack.data)
    assert os.lstat(link.parent).st_uid == uid(STUDENT)
    # staff rwx, the student r-x, by uid; nobody else
    assert named_users(stack.data) == {uid(STAFF): 7, uid(STUDENT): 5}
    r = stack.contents(STUDENT, "course-data/ml101/readme.txt")
    assert r.status_code == 200, r.text
    assert r.json()["content"] == "welcome to ml101\n"
    listing = stack.contents(STUDENT, "course-data/ml101")
    assert listing.status_code == 200 and [e["name"] for e in listing.json()["content"]] == [
        "readme.txt"
    ]
    w = stack.put(STUDENT, "course-data/ml101/mine.txt", "a student's file")
    assert w.status_code == 403, (w.status_code, w.text[:300])
    assert not (stack.data / "mine.txt").exists()
    assert stack.put(STUDENT, "course-data/ml101/readme.txt", "changed").status_code == 403
    assert (stack.data / "readme.txt").read_text() == "welcome to ml101\n"
    # the Unix account itself, outside the server: read yes, write no
    assert as_user(STUDENT, "cat", str(stack.data / "readme.txt")).returncode == 0
    assert as_user(STUDENT, "touch", str(stack.data / "x")).returncode != 0
    # someone in no course cannot even list it
    outsider = as_user(OUTSIDER, "ls", str(stack.data))
    assert outsider.returncode != 0 and "Permission denied" in outsider.stderr


def test_the_instructors_server_writes_and_the_student_reads_it(stack: Stack) -> None:
    stack.spawn(STAFF)
    assert os.readlink(Path(home(STAFF)) / LINK_DIR / "ml101") == str(stack.data)
    w = stack.put(STAFF, "course-data/ml101/week1.txt", "exercise 1\n")
    assert w.status_code in (200, 201), (w.status_code, w.text[:300])
    made = stack.data / "week1.txt"
    assert made.read_text() == "exercise 1\n" and made.stat().st_uid == uid(STAFF)
    # the folder's default ACL gave the new file to the course: the student reads it
    if not stack.hub.api("GET", f"/users/{STUDENT}").json().get("servers"):
        stack.spawn(STUDENT)
    r = stack.contents(STUDENT, "course-data/ml101/week1.txt")
    assert r.status_code == 200 and r.json()["content"] == "exercise 1\n", r.text
    assert stack.put(STUDENT, "course-data/ml101/week1.txt", "overwritten").status_code == 403
    assert made.read_text() == "exercise 1\n"


def test_a_student_out_of_the_course_loses_access_at_the_next_course_spawn(
    stack: Stack,
) -> None:
    hub = stack.hub
    r = hub.api("DELETE", "/groups/course-ml101/users", json={"users": [STUDENT]})
    assert r.status_code == 200, r.text
    try:
        stack.spawn(STAFF)  # any course server's spawn sets the folder's ACL anew
        assert named_users(stack.data) == {uid(STAFF): 7}
        assert as_user(STUDENT, "cat", str(stack.data / "readme.txt")).returncode != 0
    finally:
        r = hub.api("POST", "/groups/course-ml101/users", json={"users": [STUDENT]})
        assert r.status_code == 200, r.text
    stack.spawn(STUDENT)  # back in: the student's own spawn grants it again
    assert named_users(stack.data) == {uid(STAFF): 7, uid(STUDENT): 5}
    assert as_user(STUDENT, "cat", str(stack.data / "readme.txt")).returncode == 0


def test_the_end_makes_the_folder_read_only_for_everyone(stack: Stack) -> None:
    if not stack.hub.api("GET", f"/users/{STAFF}").json().get("servers"):
        stack.spawn(STAFF)
    assert stack.put(STAFF, "course-data/ml101/late.txt", "before the end").status_code == 201
    # what end_course does (hub/course_api.py), on the folder the servers have open: the
    # course is ended (no spawn sets its ACL again), sealed, and made read-only
    store = PortalStore(f"sqlite:///{stack.hub.dir / 'portal.sqlite'}")
    try:
        CourseStore(store).mark("ml101", ENDED, "schedule")
    finally:
        store.dispose()
    assert seal(stack.data) >= 3
    make_read_only(stack.data)
    w = stack.put(STAFF, "course-data/ml101/after.txt", "after the end")
    assert w.status_code == 403, (w.status_code, w.text[:300])
    assert stack.put(STAFF, "course-data/ml101/late.txt", "changed").status_code == 403
    assert (stack.data / "late.txt").read_text() == "before the end"
    # the instructor owned week1.txt: it is the folder owner's now, so no chmod gives
    # write permission back
    assert as_user(STAFF, "chmod", "u+w", str(stack.data / "week1.txt")).returncode != 0
    assert all(p & 2 == 0 for p in named_users(stack.data).values())
    stack.spawn(STUDENT)  # a spawn after the end sets no ACL: the data stays read-only
    assert all(p & 2 == 0 for p in named_users(stack.data).values())
    r = stack.contents(STUDENT, "course-data/ml101/late.txt")
    assert r.status_code == 200 and r.json()["content"] == "before the end", r.text
