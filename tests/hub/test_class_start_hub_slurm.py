"""A class start end to end on the real Slurm cluster: the portal service's class-start
engine -> the hub (as ``hub.portal.configure()`` sets it up, with the real IdP) -> the
Slurm spawner -> warm jobs in the class's Slurm reservation -> students who log in
through the real IdP and are handed their running server.

Course ml101 (pool 40 GPU-hours, 4 a student; a data folder) has a class starting two
to three minutes from now. Its students: spalice and spbob by IdP entitlement, spcarol
added by the instructor by identifier (she never logged in: the hub does not know her).
Each runs as their own Unix account (``unix_user_template = "{login}"``). The start
queue takes one start at a time (``start_slots = 1``), so the pre-warm of three is a
line.

One run (the steps depend on each other, so it is one test):

- the pre-warm creates the reservation (the three Unix users, node mig-a) and starts
  the three servers through the hub, spcarol's hub user created by the hub itself (the
  service's token cannot create users), in the course's group;
- while they start, the class API shows the students waiting in the hub's start queue
  at their places in line (``position``), as the hub's own ``start-queue`` route does;
- every warm job runs in the reservation, with a walltime to the class's end plus the
  grace (not the size's default of 60 minutes); its record is "warm", on the pool;
- spalice logs in through the IdP and opens her server: the same job (no new one), the
  warm record closes "claimed" and her own begins; spcarol, at her first login, too;
- spcarol is removed from the roster: the data folder's ACL loses her at once (no spawn
  in between) and her course server stops;
- spbob never comes: at the unclaimed-stop time (the class's start) his server stops,
  its record "warm" and its charge on the pool's warm share, never his allowance.

Also: the hub's roster route refuses a name that is not on the roster (nothing is
created) and callers without its scope, and the service's token still cannot create a
user through JupyterHub's own API.
"""

from __future__ import annotations

import math
import os
import pwd
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from sovereign_portal.hub.class_start_hub import SCOPE
from sovereign_portal.hub.course_data import LINK_DIR, named_users

from tests.support.courses import CourseStack, course, courses_config, u
from tests.support.hub import HubProcess
from tests.support.idp import LocalIdP
from tests.support.idp_users import idp_user, write_users
from tests.support.portal import wait_portal_service
from tests.support.slurm_cluster import SITE_FILE, SlurmCluster, spawner_config
from tests.support.stack import hub_with_idp

pytestmark = [pytest.mark.slurm, pytest.mark.idp, pytest.mark.timeout(900)]

ENT = "urn:geant:uni-a.example:group:course:ml101#uni-a.example"
STUDENTS = ("spalice", "spbob", "spcarol")
GRACE = 10
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")

#: the REST spawn answers 202 at once, so the pre-warm's line is there to be seen
SLOW_SPAWN = 'c.JupyterHub.tornado_settings = {"slow_spawn_timeout": 0}\n'


def unix(login: str) -> str:
    return login


def uid(login: str) -> int:
    return pwd.getpwnam(login).pw_uid


def wait_for(what: str, check: Callable[[], Any], timeout: float = 180) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


class Stack(CourseStack):
    def __init__(self, hub: HubProcess, idp: LocalIdP, cluster: SlurmCluster, data: Path):
        super().__init__(hub, idp)
        self.cluster, self.data = cluster, data

    def view(self) -> dict[str, Any]:
        r = self.portal("ines", "GET", "/ml101/class")
        assert r.status_code == 200, r.text
        got: dict[str, Any] = r.json()
        return got

    def students(self) -> dict[str, dict[str, Any]]:
        return {s["user"]: s for s in self.view()["students"]}

    def jobs(self, login: str) -> list[str]:
        """The user's Slurm jobs that are not over."""
        r = self.cluster.run(["squeue", "-h", "-u", unix(login), "-o", "%i"], check=False)
        return sorted(r.stdout.split())

    def job(self, job: str) -> dict[str, str]:
        out = self.cluster.run(["scontrol", "show", "job", job, "-o"]).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def service_token(self) -> str:
        """The portal service's own API token, as root reads it in /proc (this hub's)."""
        mine = f"127.0.0.1:{self.hub.hub_port}".encode()
        for p in Path("/proc").iterdir():
            if not p.name.isdigit():
                continue
            try:
                cmd = (p / "cmdline").read_bytes()
                env = (p / "environ").read_bytes()
            except OSError:
                continue
            if b"sovereign_portal.hub.service" in cmd and mine in env:
                for e in env.split(b"\0"):
                    if e.startswith(b"JUPYTERHUB_API_TOKEN="):
                        return e.split(b"=", 1)[1].decode()
        raise AssertionError("the portal service of this hub is not running")


def minutes(limit: str) -> int:
    """Slurm's TimeLimit (``[D-]HH:MM:SS``) in minutes."""
    days, _, rest = limit.rpartition("-")
    h, m, s = (int(x) for x in rest.split(":"))
    return (int(days or 0) * 24 + h) * 60 + m + (1 if s else 0)


@pytest.fixture(scope="module")
def stack(slurm_cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("class-slurm")
    shared = Path(tempfile.mkdtemp(prefix="sp-class-", dir="/tmp"))
    shared.chmod(0o755)
    data = shared / "courses" / "ml101"
    data.mkdir(parents=True)
    data.parent.chmod(0o755)
    (data / "readme.txt").write_text("welcome to ml101\n")
    job_egress = shared / "job-egress.log"
    job_egress.touch(0o666)
    job_egress.chmod(0o666)
    opts = {
        "class_start_interval_seconds": 1,
        "max_prewarm_minutes": 30,
        "prewarm_reservations": True,
        "prewarm_partition": "gpu-fr",
        "reservation_node_names": ["mig-a"],  # the node with 1g.10gb slices
        "reservation_user_template": "{login}",
        "prewarm_grace_minutes": GRACE,
        "data_root": str(shared / "courses"),
    }
    base = courses_config(opts)

    def config(hub: HubProcess, idp: LocalIdP) -> str:
        text = base(hub, idp).replace(
            '    inventory_source="declared",\n',
            f'    inventory_source="declared",\n    site_file={str(SITE_FILE)!r},\n',
            1,
        )
        slurm = spawner_config(
            tag_key=work / "tag.key", job_egress=job_egress, start_slots=1, http_timeout=120
        )
        return text + slurm + SLOW_SPAWN

    users = write_users(
        work / "users.json",
        [
            idp_user("spalice", "sub-spalice", "spalice", eduPersonEntitlement=[ENT]),
            idp_user("spbob", "sub-spbob", "spbob", eduPersonEntitlement=[ENT]),
            idp_user("spcarol", "sub-spcarol", "spcarol"),  # on no course by the IdP
            idp_user("ines", "sub-ines", "ines", eduPersonAffiliation=["faculty", "member"]),
        ],
    )
    try:
        with hub_with_idp(
            work,
            config,
            idp_kw={"users_file": users},
            env={"SLURM_CONF": str(slurm_cluster.conf)},
            poll_interval=1,
        ) as (hub, idp):
            wait_portal_service(hub)
            st = Stack(hub, idp, slurm_cluster, data)
            st.create_courses(course("ml101", sizes=["h100:1g.10gb"], data_path=str(data)))
            st.login_all("ines", "spalice", "spbob")
            yield st
            hub.close()
            hub.assert_no_egress()
    finally:
        r = slurm_cluster.run(["scontrol", "show", "reservation", "-o"], check=False)
        for line in r.stdout.splitlines():
            name = line.split()[0].removeprefix("ReservationName=")
            if name.startswith("class-ml101-"):
                slurm_cluster.run(["scontrol", "delete", f"ReservationName={name}"], check=False)
        egress = job_egress.read_text()
        subprocess.run(["rm", "-rf", str(shared)], check=False)
        for login in STUDENTS:
            subprocess.run(["rm", "-rf", f"{pwd.getpwnam(login).pw_dir}/{LINK_DIR}"], check=False)
        assert egress == "", egress


@pytest.mark.parametrize(
    ("who", "body", "status", "field"),
    [
        # a name an instructor never put on the roster: refused, nobody created
        ("service", {"users": [u("spdave")]}, 403, "users[0]"),
        ("service", {"users": [u("spcarol"), u("spdave")]}, 403, "users[0]"),
        ("service", {"users": "x"}, 400, "users"),
        ("service", {"people": []}, 400, "users"),
        ("service", {"users": []}, 400, "users"),
        ("service", {"users": [1]}, 400, "users[0]"),
        # a student, and the hub's admin service (the admin role has no custom scope)
        ("spbob", {"users": [u("spdave")]}, 403, "scope"),
        ("admin", {"users": [u("spdave")]}, 403, "scope"),
    ],
)
def test_the_hubs_roster_route_refuses_and_creates_nobody(
    stack: Stack, who: str, body: Any, status: int, field: str
) -> None:
    token = {"service": stack.service_token(), "admin": stack.hub.token}.get(who)
    token = token or stack.tokens[who]
    before = sorted(x["name"] for x in stack.hub.api("GET", "/users").json())
    r = requests.post(
        f"{stack.hub.url}/hub/api/sovereign-portal/courses/ml101/users",
        json=body,
        headers={"Authorization": f"token {token}"},
        timeout=60,
    )
    assert r.status_code == status and r.json()["field"] == field, r.text
    if field == "scope":
        assert SCOPE in r.json()["message"], r.text
    assert sorted(x["name"] for x in stack.hub.api("GET", "/users").json()) == before


def test_the_services_token_still_cannot_create_users(stack: Stack) -> None:
    r = requests.post(
        f"{stack.hub.url}/hub/api/users/{u('mallory')}",
        headers={"Authorization": f"token {stack.service_token()}"},
        timeout=60,
    )
    assert r.status_code == 403, r.text
    assert stack.hub.api("GET", f"/users/{u('mallory')}").status_code == 404


def test_a_class_on_slurm_from_the_service_to_the_reservation(stack: Stack) -> None:
    alice, bob, carol = STUDENTS
    # spcarol: added by the instructor, never logged in; the hub does not know her
    r = stack.portal("ines", "POST", "/ml101/roster", json={"add": [u(carol)]})
    assert r.status_code == 200, r.text
    assert r.json()["at_first_login"] == [u(carol)], r.text
    assert stack.hub.api("GET", f"/users/{u(carol)}").status_code == 404

    t0 = datetime.now(UTC)
    start = (t0 + timedelta(seconds=150) + timedelta(minutes=1)).replace(second=0, microsecond=0)
    slot = {"weekday": WEEKDAYS[start.weekday()], "time": start.strftime("%H:%M"), "minutes": 60}
    end = start + timedelta(minutes=60)
    r = stack.portal(
        "ines",
        "PATCH",
        "/ml101",
        json={
            "schedule": [slot],
            "prewarm": {"minutes": 10, "fraction": 1, "unclaimed_minutes": 0},
        },
    )
    assert r.status_code == 200, r.text

    # -- the line: one start at a time, the others at their places (the hub's queue) ------
    def queued() -> dict[str, int] | None:
        got = {s["user"]: s["position"] for s in stack.view()["students"] if s["state"] == "queued"}
        return got if got and all(isinstance(p, int) for p in got.values()) else None

    places = wait_for("students waiting in line in the class API", queued, timeout=120)
    assert sorted(places.values()) == list(range(1, len(places) + 1)), places
    assert set(places) <= {u(s) for s in STUDENTS} and len(places) < len(STUDENTS), places

    # -- the hub created spcarol, in the course's group -----------------------------------
    model = stack.hub.api("GET", f"/users/{u(carol)}")
    assert model.status_code == 200, model.text
    assert "course-ml101" in model.json()["groups"]

    wait_for(
        "three warm servers",
        lambda: all(stack.students().get(u(s), {}).get("state") == "warm" for s in STUDENTS),
        timeout=400,
    )
    t1 = datetime.now(UTC)
    view = stack.view()
    assert all(s["position"] is None for s in view["students"]), view
    resv = view["prewarm"]["reservation"]
    assert resv == f"class-ml101-{start.strftime('%Y%m%d%H%M')}", view
    shown = stack.cluster.run(["scontrol", "show", "reservation", resv, "-o"]).stdout
    assert f"Users={alice},{bob},{carol}" in shown and "Nodes=mig-a" in shown, shown
    # the hub's own route says the same: nobody waits now (the admin sees everyone)
    assert stack.hub.api("GET", "/sovereign-portal/start-queue").json() == {"places": {}}

    jobs = {}
    for login in STUDENTS:
        (job,) = stack.jobs(login)
        detail = stack.job(job)
        assert detail["Reservation"] == resv, detail
        assert detail["JobState"] == "RUNNING", detail
        # the walltime runs to the class's end plus the grace, not the size's default (60)
        low = math.ceil((end - t1).total_seconds() / 60) + GRACE
        high = math.ceil((end - t0).total_seconds() / 60) + GRACE
        assert low <= minutes(detail["TimeLimit"]) <= high, (detail["TimeLimit"], low, high)
        (rec,) = stack.records(login)
        assert rec["role"] == "warm" and rec["owner"] == "ml101" and rec["ended_at"] is None
        (hold,) = stack.charges(login)
        assert hold["user"] == "warm:ml101" and hold["state"] == "held"
        jobs[login] = job
    # the data folder: staff (none has an account here) and the three students read-only
    assert named_users(stack.data) == {uid(s): 5 for s in STUDENTS}

    # -- spalice and (at her first login) spcarol are handed their running servers ---------
    for login in (alice, carol):
        warm = stack.server(login)
        assert warm is not None and warm["ready"]
        stack.login(login)
        got = stack.sessions[login].get(
            f"{stack.hub.url}/hub/user-redirect/api/status", timeout=120
        )
        assert got.status_code == 200 and "started" in got.json(), (got.status_code, got.text)
        now = stack.server(login)
        assert now is not None and now["started"] == warm["started"]  # no new spawn
        assert stack.jobs(login) == [jobs[login]]  # the same job, no new one
    wait_for(
        "the claims",
        lambda: all(stack.students()[u(s)]["state"] == "claimed" for s in (alice, carol)),
    )
    assert datetime.now(UTC) < start, "the class began before the claims: lengthen the lead"
    for login in (alice, carol):
        warm_rec, mine = stack.records(login)
        assert warm_rec["role"] == "warm" and warm_rec["end_reason"] == "claimed"
        assert mine["role"] == "student" and mine["ended_at"] is None
        assert mine["started_at"] == warm_rec["ended_at"]  # every GPU-second in one record
        warm_hold, own = stack.charges(login)
        assert warm_hold["user"] == "warm:ml101" and own["user"] == u(login)
    assert "course-ml101" in stack.groups(carol)  # her login kept the roster's course

    # -- spcarol leaves the roster: the folder's ACL loses her at once --------------------
    r = stack.portal("ines", "DELETE", f"/ml101/roster/{u(carol)}")
    assert r.status_code == 204, r.text
    assert named_users(stack.data) == {uid(alice): 5, uid(bob): 5}  # no spawn in between
    wait_for("spcarol's course server to stop", lambda: stack.server(carol) is None)
    wait_for("spcarol's job to end", lambda: stack.jobs(carol) == [])

    # -- spbob never came: stopped at the unclaimed-stop time, on the pool as warm --------
    assert stack.students()[u(bob)]["state"] == "warm"
    wait_for(
        "the unclaimed stop",
        lambda: stack.students()[u(bob)]["state"] == "stopped",
        timeout=(start - datetime.now(UTC)).total_seconds() + 90,
    )
    assert datetime.now(UTC) >= start
    wait_for("spbob's server to go", lambda: stack.server(bob) is None)
    assert "unclaimed" in (stack.students()[u(bob)]["reason"] or "")
    wait_for("the warm record to close", lambda: stack.records(bob)[-1]["ended_at"] is not None)
    (rec,) = stack.records(bob)
    assert rec["role"] == "warm" and rec["end_reason"] == "stopped" and rec["gpu_seconds"] > 0
    (charge,) = stack.charges(bob)
    assert charge["user"] == "warm:ml101"  # the pool's warm share, never spbob's allowance
    got = stack.portal("spbob", "GET", "/ml101").json()["allowance"]
    assert got is not None and got["left"] == got["allowance"] == 4, got
    # spalice still has her server, in the reservation
    assert stack.jobs(alice) == [jobs[alice]]
    assert os.path.exists(stack.data / "readme.txt")
