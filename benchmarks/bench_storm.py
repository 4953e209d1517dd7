"""Class-start storm: N students log in at once and each opens a MIG notebook on Slurm.

    .venv/bin/python -m benchmarks.bench_storm [--students 100] [--slots 4] [--no-prewarm]

Not part of CI (minutes of the whole machine). Everything is real: its own Slurm cluster
(``ceil(N / 7)`` emulated MIG nodes of 7 x ``1g.10gb``, partition ``class-fr``), the local
IdP, the hub and proxy as ``hub.portal.configure()`` sets them up with the portal service,
and one real Unix account per student (``spst001``...; the IdP's ``spst001`` logs in as
hub user ``spst001@uni-a.example``, and ``SlurmGPUSpawner.unix_user_template = "{login}"``
maps that to the Unix name).

Two storms, each with every student's full OIDC flow (hub -> IdP form -> callback) in its
own thread, all released at once:

1. **cold**: each student submits the spawn form (``class-fr/h100:1g.10gb``), follows the
   progress stream the spawn-pending page reads (the start queue: a place in line and an
   estimate), then opens ``/user/<name>/lab`` until JupyterLab answers;
2. **pre-warmed**: the instructor presses "Pre-warm now" (``POST api/courses/<id>/prewarm``,
   the class-start engine), the benchmark waits until the class view shows every server
   warm, then the students log in afresh and open JupyterLab.

Meanwhile a bystander (not in the class) calls ``GET /hub/api/user`` four times a second.

Prints: failures (any 4xx/5xx, 429, timeout or failed spawn; the goal is 0), p50 and p95
from the start of the login to JupyterLab for both storms and their ratio, the largest
place in line seen, the bystander's p50/p99, the machine's memory peak and the hub log's
errors, tracebacks and 429s.

N = 100 fits this 23 GiB, 2-core machine: at N = 100 the machine's memory in use peaked at
10.6 GiB (each server's processes about 126 MiB RSS). Time, not memory, is the limit: the
two cores start about one server per 3-4 s, so one run (cold storm, pre-warm, pre-warmed
storm) takes about 15 minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import pwd
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.cpu_share import CpuShare, Part, Proc
from tests.support.hub import HubProcess
from tests.support.idp import LocalIdP, oidc_login
from tests.support.idp_users import idp_user, write_users
from tests.support.portal import configure_text, wait_portal_service
from tests.support.slurm_cluster import TEST_USERS, Node, SlurmCluster, spawner_config
from tests.support.stack import hub_with_idp

ORG = "uni-a.example"
COURSE = "storm"
SIZE = "h100:1g.10gb"
PARTITION = "class-fr"
SVC = "/services/sovereign-portal/api/courses"
SITE = """
name = "Storm bench cluster"
description = "Emulated MIG nodes for bench_storm."

[[partitions]]
name = "class-fr"
backend = "slurm"
description = "MIG slices for a class."
slurm_partition = "class-fr"
carbon_g_per_kwh = 56.0
pue = 1.3
max_walltime_minutes = 240
default_walltime_minutes = 60
price_eur_per_gpu_hour = {{ h100 = 2.10 }}

[partitions.jurisdiction]
country = "FR"
operator = "Bench Centre FR"
certifications = ["ISO27001"]

[[partitions.nodes]]
name = "mig-h100"
accelerator = "h100"
gpus = 1
count = {nodes}
gres_type = "h100"

[[partitions.nodes.mig]]
gpus = [0]
profiles = ["1g.10gb", "1g.10gb", "1g.10gb", "1g.10gb", "1g.10gb", "1g.10gb", "1g.10gb"]
"""


@dataclass
class Result:
    who: str
    seconds: float | None = None
    error: str | None = None
    max_place: int = 0
    login_s: float | None = None  # the OIDC flow alone (hub -> IdP -> callback)
    messages: list[str] = field(default_factory=list)


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(p / 100 * len(s)) - 1))]


def login(hub: HubProcess, idp: LocalIdP, who: str) -> requests.Session:
    r = oidc_login(hub.url, idp, who, f"pass-{who}")
    if r.left_deployment is not None or r.response.status_code != 200:
        raise RuntimeError(f"login: HTTP {r.response.status_code} {r.left_deployment or ''}")
    return r.session


def open_lab(hub: HubProcess, s: requests.Session, name: str, deadline: float) -> None:
    """GET /user/<name>/lab until JupyterLab answers (the server's OAuth handshake once)."""
    while time.monotonic() < deadline:
        r = s.get(f"{hub.url}/user/{name}/lab", timeout=120)
        if r.status_code == 200 and "/user/" in r.url and "JupyterLab" in r.text:
            return
        if r.status_code >= 400 and r.status_code != 424:
            raise RuntimeError(f"lab: HTTP {r.status_code} {r.text[:200]!r}")
        time.sleep(0.5)
    raise TimeoutError("lab: no JupyterLab before the deadline")


def cold_student(hub: HubProcess, idp: LocalIdP, who: str, go: threading.Event) -> Result:
    res = Result(who)
    name = f"{who}@{ORG}"
    go.wait()
    t0 = time.monotonic()
    try:
        s = login(hub, idp, who)
        res.login_s = time.monotonic() - t0
        xsrf = s.cookies.get("_xsrf", path="/hub/")
        r = s.post(
            f"{hub.url}/hub/spawn",
            data={"size": f"{PARTITION}/{SIZE}", "walltime_minutes": "60", "_xsrf": xsrf},
            timeout=600,
        )
        if r.status_code != 200:
            raise RuntimeError(f"spawn form: HTTP {r.status_code} {r.text[:200]!r}")
        ev = s.get(
            f"{hub.url}/hub/api/users/{name}/server/progress",
            headers={"X-XSRFToken": xsrf or "", "Accept": "text/event-stream"},
            stream=True,
            timeout=600,
        )
        if ev.status_code != 200:
            raise RuntimeError(f"progress: HTTP {ev.status_code} {ev.text[:200]!r}")
        for line in ev.iter_lines(decode_unicode=True):
            if not line or not line.startswith("data:"):
                continue
            event = json.loads(line[5:])
            res.messages.append(str(event.get("message", "")))
            place = (event.get("queue") or {}).get("position")
            if place:
                res.max_place = max(res.max_place, int(place))
            if event.get("failed"):
                raise RuntimeError(f"spawn failed: {event.get('message')}")
            if event.get("ready"):
                break
        open_lab(hub, s, name, t0 + 900)
        res.seconds = time.monotonic() - t0
    except Exception as e:  # a failure of this student, counted and printed
        res.error = f"{type(e).__name__}: {e}"
    return res


def warm_student(hub: HubProcess, idp: LocalIdP, who: str, go: threading.Event) -> Result:
    res = Result(who)
    go.wait()
    t0 = time.monotonic()
    try:
        s = login(hub, idp, who)
        res.login_s = time.monotonic() - t0
        open_lab(hub, s, f"{who}@{ORG}", t0 + 900)
        res.seconds = time.monotonic() - t0
    except Exception as e:
        res.error = f"{type(e).__name__}: {e}"
    return res


def storm(hub: HubProcess, idp: LocalIdP, students: list[str], fn: Any) -> list[Result]:
    go = threading.Event()
    out: list[Result] = []
    lock = threading.Lock()

    def run(who: str) -> None:
        r = fn(hub, idp, who, go)
        with lock:
            out.append(r)

    threads = [threading.Thread(target=run, args=(w,), daemon=True) for w in students]
    for t in threads:
        t.start()
    time.sleep(0.5)
    go.set()
    for t in threads:
        t.join(1200)
    return out


class Bystander(threading.Thread):
    def __init__(self, hub: HubProcess, token: str) -> None:
        super().__init__(daemon=True)
        self.hub, self.token = hub, token
        self.latencies: list[float] = []
        self.errors = 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            t0 = time.perf_counter()
            try:
                r = self.hub.api("GET", "/user", token=self.token)
                ok = r.status_code == 200
            except requests.RequestException:
                ok = False
            self.latencies.append(time.perf_counter() - t0)
            self.errors += 0 if ok else 1
            time.sleep(0.25)


def mem_used() -> int:
    """Bytes of this machine's memory in use (MemTotal - MemAvailable)."""
    info = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        info[key] = int(rest.split()[0]) * 1024
    return info["MemTotal"] - info["MemAvailable"]


def rss_of(uids: set[int]) -> tuple[int, int]:
    """Summed RSS of every process of these Unix accounts (the students' jobs: job script,
    launcher and notebook server), and how many of the accounts run one."""
    total, seen = 0, set()
    for p in Path("/proc").iterdir():
        if not p.name.isdecimal():
            continue
        try:
            fields = dict(
                ln.split(":", 1) for ln in (p / "status").read_text().splitlines() if ":" in ln
            )
            uid = int(fields["Uid"].split()[0])
            if uid in uids and "VmRSS" in fields:
                total += int(fields["VmRSS"].split()[0]) * 1024
                seen.add(uid)
        except (OSError, KeyError, ValueError):
            continue
    return total, len(seen)


class Memory(threading.Thread):
    """The machine's memory in use (every second) and the servers' summed RSS (every 10 s),
    with their peaks."""

    def __init__(self, uids: set[int]) -> None:
        super().__init__(daemon=True)
        self.uids = uids
        self.base = mem_used()
        self.peak = self.base
        self.servers_peak, self.servers_at_peak = 0, 0
        self.halt = threading.Event()

    def run(self) -> None:
        n = 0
        while not self.halt.wait(1.0):
            self.peak = max(self.peak, mem_used())
            n += 1
            if n % 10 == 0:
                total, servers = rss_of(self.uids)
                if total > self.servers_peak:
                    self.servers_peak, self.servers_at_peak = total, servers


def report(label: str, results: list[Result]) -> list[float]:
    times = [r.seconds for r in results if r.seconds is not None]
    bad = [r for r in results if r.error]
    print(f"{label}: {len(results)} students, failures {len(bad)}")
    for r in bad[:10]:
        print(f"  {r.who}: {r.error}")
    if times:
        print(
            f"  login -> JupyterLab p50 {statistics.median(times):.1f} s, "
            f"p95 {pct(times, 95):.1f} s, max {max(times):.1f} s"
        )
    logins = [r.login_s for r in results if r.login_s is not None]
    if logins:
        print(
            f"  of which the OIDC login alone: p50 {statistics.median(logins):.1f} s, "
            f"p95 {pct(logins, 95):.1f} s"
        )
    places = [r.max_place for r in results if r.max_place]
    if places:
        print(f"  waited in line: {len(places)} students, largest place {max(places)}")
    return times


def cpu_parts(students: set[int]) -> list[Part]:
    """The parts of the storm whose CPU the benchmark prints."""
    me = os.getpid()

    def slurm(p: Proc) -> bool:
        return p.comm.startswith("slurm") or p.comm == "munged"

    return [
        ("the students' servers (their jobs' processes)", lambda p: p.uid in students),
        ("the hub (JupyterHub)", lambda p: p.comm == "jupyterhub" or p.has("bin/jupyterhub")),
        ("configurable-http-proxy", lambda p: p.has("configurable-http-proxy")),
        ("the IdP", lambda p: p.comm == "node" and p.has("server.js")),
        ("the portal service", lambda p: p.has("sovereign_portal.hub.service")),
        ("Slurm and munge", slurm),
        ("this benchmark (the students' browsers)", lambda p: p.pid == me),
        ("kernel threads", lambda p: not p.argv),
    ]


def stop_all(hub: HubProcess, names: list[str]) -> None:
    """Stop every student's server, 8 stops at a time (each waits for Slurm's word)."""
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda n: hub.api("DELETE", f"/users/{n}/server"), names))
    mine = set(names)

    def none_left() -> bool:
        active = hub.api("GET", "/users", params={"state": "active"}).json()
        return not [u for u in active if u["name"] in mine]

    hub.wait_for(none_left, 600, "every server stopped", 2.0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--students", type=int, default=100)
    ap.add_argument("--slots", type=int, default=4, help="start_slots of the start queue")
    ap.add_argument("--no-prewarm", action="store_true")
    ap.add_argument(
        "--warm-only",
        action="store_true",
        help="skip the cold storm: the students log in once (8 at a time), then the "
        "pre-warm and the pre-warmed storm (no ratio is printed)",
    )
    ap.add_argument("--hub-log", type=Path, help="copy the hub's log here at the end")
    a = ap.parse_args()
    n = a.students
    students = [f"spst{i:03d}" for i in range(1, n + 1)]
    names = [f"{s}@{ORG}" for s in students]
    nodes = math.ceil(n / 7)
    base = Path(tempfile.mkdtemp(prefix="sp-storm-", dir="/tmp"))
    # The students' sbatch reads slurm.conf below it: mkdtemp's 0700 made every sbatch
    # retry "cannot stat file .../slurm.conf: Permission denied" until the client's 30 s.
    base.chmod(0o755)
    mig = tuple(
        Node(f"mig-{i:02d}", (("h100_1g.10gb", 7),), features=("h100", "mig", "fr"))
        for i in range(nodes)
    )
    cluster = SlurmCluster(
        base / "slurm",
        nodes=mig,
        partitions={PARTITION: (tuple(x.name for x in mig), 240)},
        users=(*TEST_USERS, *students),
        cluster_name="storm-bench",
    )
    shared = Path(tempfile.mkdtemp(prefix="sp-storm-jobs-", dir="/tmp"))
    shared.chmod(0o777)
    job_egress = shared / "job-egress.log"
    job_egress.touch(0o666)
    job_egress.chmod(0o666)
    site = base / "site.toml"
    site.write_text(SITE.format(nodes=nodes))
    site.chmod(0o644)
    extra = [
        idp_user("ines", "sub-ines", "ines", eduPersonAffiliation=["faculty", "member"]),
        *(idp_user(s, f"sub-{s}", s) for s in students),
    ]
    users = write_users(base / "users.json", extra)
    t0 = time.monotonic()
    cluster.up(timeout=120)
    print(
        f"N = {n} students; cluster: {nodes} MIG nodes x 7 {SIZE} up in "
        f"{time.monotonic() - t0:.0f} s; start_slots {a.slots}",
        flush=True,
    )

    def config(hub: HubProcess, idp: LocalIdP) -> str:
        text = configure_text(hub, idp).replace(
            '    inventory_source="declared",\n)',
            f'    inventory_source="declared",\n    site_file={str(site)!r},\n)',
        )
        return text + spawner_config(
            site=site,
            tag_key=base / "tag.key",
            job_egress=job_egress,
            start_slots=a.slots,
            start_timeout=900,
            http_timeout=300,
        )

    code = 0
    try:
        with hub_with_idp(
            base / "stack",
            config,
            idp_kw={"users_file": users},
            env={"SLURM_CONF": str(cluster.conf)},
            poll_interval=2,
        ) as (hub, idp):
            wait_portal_service(hub)
            admin = hub.token
            assert oidc_login(hub.url, idp, "olga").left_deployment is None  # operator
            olga = hub.api("POST", f"/users/olga@{ORG}/tokens", json={"scopes": ["inherit"]})
            tok = olga.json()["token"]
            now = datetime.now(UTC)
            course = {
                "id": COURSE,
                "title": "Storm class",
                "instructors": [f"ines@{ORG}"],
                "sizes": [SIZE],
                "start": str((now - timedelta(days=1)).date()),
                "end": str((now + timedelta(days=30)).date()),
                "schedule": [
                    {
                        "weekday": now.strftime("%a").lower(),
                        "time": (now + timedelta(minutes=20)).strftime("%H:%M"),
                        "minutes": 90,
                    }
                ],
            }
            r = requests.post(
                f"{hub.url}{SVC}",
                json=course,
                timeout=60,
                headers={"Authorization": f"token {tok}"},
            )
            if r.status_code != 201:
                raise RuntimeError(f"course: {r.status_code} {r.text}")
            csv = "identifier\n" + "".join(f"{x}\n" for x in names)
            r = requests.post(
                f"{hub.url}{SVC}/{COURSE}/roster",
                data=csv.encode(),
                headers={"Authorization": f"token {tok}", "Content-Type": "text/csv"},
                timeout=120,
            )
            if r.status_code != 200:
                raise RuntimeError(f"roster: {r.status_code} {r.text}")
            assert oidc_login(hub.url, idp, "alice").left_deployment is None
            by = hub.api(
                "POST", f"/users/alice@{ORG}/tokens", json={"scopes": ["read:users:name!user"]}
            )
            bystander = Bystander(hub, by.json()["token"])
            bystander.start()
            uids = {pwd.getpwnam(x).pw_uid for x in students}
            memory = Memory(uids)
            memory.start()

            cold: list[Result] = []
            if a.warm_only:
                with ThreadPoolExecutor(8) as pool:
                    first = list(pool.map(lambda s: login(hub, idp, s), students))
                print(f"first logins: {len(first)} (8 at a time, no storm)", flush=True)
            else:
                t1 = time.monotonic()
                with CpuShare(cpu_parts(uids)) as share:
                    cold = storm(hub, idp, students, cold_student)
                print(f"cold storm took {time.monotonic() - t1:.0f} s", flush=True)
                print(share.report(n), flush=True)
            if cold:
                running = sum(j["state"] == "RUNNING" for j in cluster.jobs())
                print(f"  Slurm jobs RUNNING after it: {running}", flush=True)
            cold_t = report("cold (spawn form, start queue)", cold) if cold else []
            code |= 1 if any(r.error for r in cold) else 0
            if any(r.error for r in cold):
                bad = [
                    x
                    for x in hub.log_text().splitlines()
                    if x.startswith(("[E", "[W")) or "rror" in x
                ]
                print("hub log, errors (last 15):\n  " + "\n  ".join(x[:300] for x in bad[-15:]))
            stop_all(hub, names)

            warm_t: list[float] = []
            if not a.no_prewarm:
                assert oidc_login(hub.url, idp, "ines", "pass-ines").left_deployment is None
                it = hub.api("POST", f"/users/ines@{ORG}/tokens", json={"scopes": ["inherit"]})
                ines = {"Authorization": f"token {it.json()['token']}"}
                r = requests.patch(
                    f"{hub.url}{SVC}/{COURSE}",
                    headers=ines,
                    timeout=60,
                    json={"prewarm": {"minutes": 30, "fraction": 1.0, "unclaimed_minutes": 20}},
                )
                t1 = time.monotonic()
                r2 = requests.post(
                    f"{hub.url}{SVC}/{COURSE}/prewarm", headers=ines, json={}, timeout=120
                )
                if r.status_code != 200 or r2.status_code != 202:
                    print(
                        f"pre-warm: NOT AVAILABLE (PATCH prewarm {r.status_code}, "
                        f"POST prewarm {r2.status_code}: {r2.text[:200]})"
                    )
                else:

                    def all_warm() -> bool:
                        v = requests.get(
                            f"{hub.url}{SVC}/{COURSE}/class", headers=ines, timeout=60
                        ).json()
                        return sum(s["state"] == "warm" for s in v["students"]) >= n

                    hub.wait_for(all_warm, 1800, "every server warm", 3.0)
                    print(f"pre-warm of {n} servers took {time.monotonic() - t1:.0f} s", flush=True)
                    t1 = time.monotonic()
                    with CpuShare(cpu_parts(uids)) as share:
                        warm = storm(hub, idp, students, warm_student)
                    print(f"pre-warmed storm took {time.monotonic() - t1:.0f} s", flush=True)
                    print(share.report(n), flush=True)
                    states: dict[str, int] = {}

                    def all_claimed() -> bool:
                        v = requests.get(f"{hub.url}{SVC}/{COURSE}/class", headers=ines, timeout=60)
                        states.clear()
                        for st in v.json()["students"]:
                            states[st["state"]] = states.get(st["state"], 0) + 1
                        return states.get("claimed", 0) >= n

                    with contextlib.suppress(TimeoutError):
                        hub.wait_for(all_claimed, 180, "every warm server claimed", 3.0)
                    print(f"  class view after it (the engine's claims): {states}", flush=True)
                    warm_t = report("pre-warmed (log in, open JupyterLab)", warm)
                    code |= 1 if any(r.error for r in warm) else 0
            bystander.halt.set()
            bystander.join(10)
            memory.halt.set()
            memory.join(15)
            gib = 1 << 30
            per = memory.servers_peak / max(1, memory.servers_at_peak) / (1 << 20)
            print(
                f"memory in use on the machine: {memory.base / gib:.1f} GiB before the storms, "
                f"peak {memory.peak / gib:.1f} GiB; the servers' RSS peak "
                f"{memory.servers_peak / gib:.2f} GiB for {memory.servers_at_peak} servers "
                f"({per:.0f} MiB each)"
            )
            log = hub.log_text()
            if a.hub_log:
                a.hub_log.write_text(log)
            print(
                f"hub log: {log.count(chr(10) + '[E ')} error lines, "
                f"{log.count('Traceback')} tracebacks, {log.count(' 429 ')} 429s"
            )
            if cold_t and warm_t:
                print(
                    f"ratio cold / pre-warmed: p50 "
                    f"{statistics.median(cold_t) / statistics.median(warm_t):.1f}, p95 "
                    f"{pct(cold_t, 95) / pct(warm_t, 95):.1f} (goal: pre-warmed p95 <= 5 s)"
                )
            lat = bystander.latencies
            print(
                f"bystander GET /hub/api/user during the storms: {len(lat)} calls, "
                f"{bystander.errors} errors, p50 {1000 * statistics.median(lat):.0f} ms, "
                f"p99 {1000 * pct(lat, 99):.0f} ms"
            )
            del admin
            stop_all(hub, names)
    finally:
        cluster.down()
        egress = job_egress.read_text() if job_egress.exists() else ""
        subprocess.run(["rm", "-rf", str(shared)], check=False)
        shutil.rmtree(base, ignore_errors=True)
        if egress:
            print(f"EGRESS from jobs: {egress[:500]}")
            code = 1
    return code


if __name__ == "__main__":
    os.umask(0o022)
    raise SystemExit(main())
