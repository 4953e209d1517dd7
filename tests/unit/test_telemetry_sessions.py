"""Compute sessions report their GPU activity as notebook servers do: the samplers in their
jobs (files in the session directory, no token in a job), the server's report of them
(``"grant": <id>``), the hub's target ``grant:<id>``, and the culler's stop of a session
(the portal service's, never the hub server's)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from sovereign_portal.extension import job_sampler as J
from sovereign_portal.extension.sampler import Sampler, SessionReporter
from sovereign_portal.hub import activity as A
from sovereign_portal.hub import culler as C
from sovereign_portal.spawners.telemetry import ScriptedSource

pytestmark = pytest.mark.unit

NOW = time.time()


def script(path: Path, util: float, power: float = 100.0) -> Path:
    body = {
        "start": NOW - 10,
        "devices": [{"index": 0, "uuid": "MIG-x", "idle_w": power, "busy_w": power}],
        "phases": [{"seconds": None, "utilization_pct": util, "memory_util_pct": util / 2}],
    }
    path.write_text(json.dumps(body))
    return path


def report(grant: str | None = "0af3", **over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "server": "gpu",
        "grant": grant,
        "source": "scripted",
        "measured": False,
        "sampled_at": NOW,
        "devices": [
            {
                "index": 0,
                "uuid": "MIG-x",
                "utilization_pct": 0,
                "utilization_max_pct": 0,
                "memory_util_max_pct": 0,
                "memory_used_mib": 10,
                "power_w": 100,
                "energy_mj": 5,
                "shared": False,
            }
        ],
        "kernels": {"busy": 0, "total": 1, "idle_since": NOW - 60},
    }
    body.update(over)
    return body


def test_a_session_report_is_about_its_grant_and_a_server_report_about_the_server() -> None:
    r = A.parse_report("ada", report(), NOW)
    assert r.grant == "0af3" and r.target == "grant:0af3"
    s = A.parse_report("ada", report(None), NOW)
    assert s.grant is None and s.target == "server:ada/gpu"
    book = A.ActivityBook()
    t = book.add(r)
    assert t.kind == "session" and t.to_json(A.Thresholds(), NOW)["kind"] == "session"
    assert book.add(s).kind == "server"
    assert len(book.targets) == 2  # a session is its own target beside its server


@pytest.mark.parametrize("grant", ["", "0AF3", "../x", "g" * 3, "a" * 65, 12, ["a"]])
def test_a_bad_grant_is_refused_by_name(grant: Any) -> None:
    with pytest.raises(A.ActivityError, match=r"^grant:"):
        A.parse_report("ada", report(grant), NOW)


def test_job_sampler_keeps_a_bounded_file_per_job(tmp_path: Path) -> None:
    J.write_settings(tmp_path, 0.5, "")
    src = ScriptedSource(script(tmp_path / "s.json", 40))
    js = J.JobSampler(tmp_path, "worker-gpu-0", src)
    assert js.conf == {"interval": 0.5, "device_script": ""}
    for _ in range(J.KEEP + 5):
        assert js.step()
    f = tmp_path / "activity" / "worker-gpu-0.json"
    data = json.loads(f.read_text())
    assert len(data["readings"]) == J.KEEP  # bounded
    assert data["source"] == "scripted" and data["measured"] is False
    assert data["readings"][-1]["devices"][0]["utilization_pct"] == 40
    assert f.stat().st_mode & 0o077 == 0
    with pytest.raises(ValueError, match="name"):
        J.JobSampler(tmp_path, "../../etc", src)


def test_job_sampler_waits_for_a_script_not_written_yet(tmp_path: Path) -> None:
    J.write_settings(tmp_path, 0.5, str(tmp_path / "later.json"))
    js = J.JobSampler(tmp_path, "rank-0")
    assert js.step() is False and not (tmp_path / "activity").exists()
    script(tmp_path / "later.json", 70)
    assert js.step() is True
    assert (tmp_path / "activity" / "rank-0.json").exists()


def test_read_job_samples_merges_jobs_and_keeps_the_highest_since(tmp_path: Path) -> None:
    busy = J.JobSampler(tmp_path, "rank-0", ScriptedSource(script(tmp_path / "a.json", 90)))
    idle = J.JobSampler(tmp_path, "rank-1", ScriptedSource(script(tmp_path / "b.json", 0)))
    busy.step()
    idle.step()
    script(tmp_path / "a.json", 0)  # rank 0 goes idle: its burst still counts once
    os.utime(tmp_path / "a.json", ns=(time.time_ns(), time.time_ns() + 10**9))
    busy.step()
    got = J.read_job_samples(tmp_path, 0.0)
    assert got is not None and got["source"] == "scripted" and got["measured"] is False
    d0, d1 = got["devices"]
    assert (d0["index"], d1["index"]) == (0, 1)
    assert d0["utilization_pct"] == 0 and d0["utilization_max_pct"] == 90
    assert d1["utilization_max_pct"] == 0
    # nothing new since the last report: no evidence, nothing to send
    assert J.read_job_samples(tmp_path, got["sampled_at"]) is None
    assert J.read_job_samples(tmp_path / "none", 0.0) is None
    # what the server sends passes the hub's checks as it is
    body = {"server": "", "grant": "ab", **got, "kernels": {"busy": 0, "total": 0}}
    body["kernels"]["idle_since"] = None
    r = A.parse_report("ada", body, time.time())
    assert r.target == "grant:ab" and len(r.devices) == 2
    assert not r.gpus_idle(5, 5)  # rank 0's burst


class _Session:
    def __init__(self, sid: str, sdir: Path, state: str = "ready") -> None:
        self.id, self.dir, self.state = sid, sdir, state
        self.grant = {"id": "c0ffee"}


class _Manager:
    def __init__(self, sessions: dict[str, _Session]) -> None:
        self.sessions = sessions
        self.stopped: list[tuple[str, str, str]] = []

    async def stop(self, sid: str, state: str, message: str) -> None:
        self.stopped.append((sid, state, message))
        self.sessions[sid].state = state


def test_session_reporter_sends_grant_reports_and_stops_a_reclaimed_session(
    tmp_path: Path,
) -> None:
    sdir = tmp_path / "s1"
    sdir.mkdir()
    J.JobSampler(sdir, "worker-0", ScriptedSource(script(tmp_path / "a.json", 0))).step()
    queued = tmp_path / "s2"
    queued.mkdir()
    J.JobSampler(queued, "worker-0", ScriptedSource(script(tmp_path / "b.json", 0))).step()
    mgr = _Manager({"s1": _Session("s1", sdir), "s2": _Session("s2", queued, "queued")})
    sent: list[dict[str, Any]] = []
    answers = [
        {"notices": [{"id": "idle:grant:c0ffee", "kind": "idle"}], "reclaimed": False},
        {"notices": [], "reclaimed": True},
    ]

    async def post(body: dict[str, Any]) -> Any:
        sent.append(body)
        return answers[len(sent) - 1]

    sampler = Sampler(server="gpu", kernels=lambda: (0, 2))
    sampler.sample()
    rep = SessionReporter(mgr, sampler, post)
    assert asyncio.run(rep.report()) == 1  # the queued session sends nothing
    (b,) = sent
    assert b["grant"] == "c0ffee" and b["server"] == "gpu" and b["kernels"]["total"] == 2
    A.parse_report("ada", b, time.time())  # the hub takes it as it is
    assert [n["id"] for n in sampler.all_notices()] == ["idle:grant:c0ffee"]
    assert asyncio.run(rep.report()) == 0  # no new reading: nothing sent
    J.JobSampler(sdir, "worker-0", ScriptedSource(tmp_path / "a.json")).step()
    assert asyncio.run(rep.report()) == 1
    assert mgr.stopped == [("s1", "stopped", "reclaimed: its GPUs were idle (the hub's culler)")]
    assert sampler.all_notices() == []


def test_the_warning_for_a_session_says_the_session_and_that_the_server_stays() -> None:
    t = {
        "source": "grant:c0ffee",
        "user": "ada",
        "server": "gpu",
        "gpus": 2,
        "idle_since": NOW - 3000,
        "notice": None,
    }
    d = C.decide(t, role="student", groups=[], policy=C.Policy(), now=NOW)
    assert d.action == "warn" and d.notice is not None
    msg = d.notice["message"]
    assert "compute session c0ffee" in msg and "server 'gpu'" in msg
    assert "your server and your files stay" in msg
    assert d.notice["id"] == "idle:grant:c0ffee"


class _Culler(C.GPUCuller):
    calls: list[tuple[str, str]]

    async def _fetch(self, url: str, method: str = "GET", body: Any = None) -> tuple[int, Any]:
        self.calls.append((method, url))
        if url.endswith("api/activity/reclaim"):
            return 200, {"saved_gpu_hours": 0.5}
        return 204, None


def test_the_culler_stops_a_session_through_the_service_never_the_server() -> None:
    c = _Culler(hub_api_url="http://hub/api", api_token="t", portal_url="http://svc/")
    c.calls = []
    tally = C.Tally()
    t = {"source": "grant:c0ffee", "user": "ada", "server": "", "idle_since": NOW - 4000}
    asyncio.run(c.stop(t, tally))
    assert c.calls == [("POST", "http://svc/api/activity/reclaim")]  # no DELETE of the server
    assert tally.stopped == ["grant:c0ffee"]
    c.calls, tally = [], C.Tally()
    asyncio.run(c.stop({**t, "source": "server:ada/"}, tally))
    assert c.calls == [
        ("POST", "http://svc/api/activity/reclaim"),
        ("DELETE", "http://hub/api/users/ada/server"),
    ]


def test_hub_pages_show_the_users_idle_warnings_over_the_operators_announcement() -> None:
    from types import SimpleNamespace

    from sovereign_portal.hub.activity_pages import HubNotices, install
    from traitlets.config import Config

    c = Config()
    c.JupyterHub.template_vars = {"announcement_home": "Maintenance at 18:00", "x": 1}
    notices = install(c, "http://127.0.0.1:9", "tok", interval=1)
    tv = c.JupyterHub.template_vars
    assert tv["x"] == 1 and callable(tv["announcement_home"]) and callable(tv["announcement_spawn"])
    ada, bob = SimpleNamespace(name="ada"), SimpleNamespace(name="bob")
    assert tv["announcement_home"](ada) == "Maintenance at 18:00"  # no warning: the operator's
    assert tv["announcement_spawn"](ada) is None  # none for that page: the hub's default
    notices.by_user = {
        "ada": [{"kind": "idle", "message": "<b>idle</b> GPU", "deadline": "2026-12-01T12:00:00Z"}]
    }
    got = tv["announcement_home"](ada)
    assert 'class="sp-idle-notice' in got and "&lt;b&gt;idle&lt;/b&gt; GPU" in got  # escaped
    assert tv["announcement_spawn"](ada) == got
    assert tv["announcement_home"](bob) == "Maintenance at 18:00"
    assert tv["announcement_home"](None) == "Maintenance at 18:00"
    assert isinstance(notices, HubNotices)


def test_hub_notices_follow_the_services_targets() -> None:
    from sovereign_portal.hub.activity_pages import HubNotices
    from tornado.httpserver import HTTPServer
    from tornado.web import Application, RequestHandler

    from tests.support.paths import free_port

    seen: list[str] = []

    class All(RequestHandler):
        def get(self) -> None:
            seen.append(self.request.headers.get("Authorization", ""))
            n = {"kind": "idle", "message": "m", "deadline": None}
            self.finish(
                {
                    "targets": [
                        {"user": "ada", "notice": n},
                        {"user": "bob", "notice": None},
                        {"user": "cy", "notice": {**n, "kind": "budget"}},
                    ]
                }
            )

    async def main() -> None:
        port = free_port()
        srv = HTTPServer(Application([(r"/services/sovereign-portal/api/activity/all", All)]))
        srv.listen(port, "127.0.0.1")
        try:
            url = f"http://127.0.0.1:{port}/services/sovereign-portal/api/activity/all"
            n = HubNotices(url, "culler-token", interval=0.05)
            assert await n.refresh()
            assert list(n.by_user) == ["ada"] and seen == ["token culler-token"]
            gone = HubNotices(url.replace(str(port), str(free_port())), "t", interval=0.05)
            with pytest.raises(OSError):
                await gone.refresh()
        finally:
            srv.stop()

    asyncio.run(main())
