"""A storm is a queue, not a failure (issue 12), on the real hub.

The hub and proxy as ``hub.portal.configure()`` sets them up (the local backend, the real
portal service, real IdP logins), with the start queue narrowed to one start at a time
(``LocalGPUSpawner.start_slots = 1``). Six students start at once through JupyterHub's
own REST spawn path: none gets a 429, a timeout or an error; each one's progress stream
(what the spawn-pending page shows) gives a place in line and an estimate before its
turn; the starts run one at a time in arrival order; every server ends up ready; and a
bystander's ``/hub/api`` answers quickly all along. Then a student on the spawn form in
Chromium, behind four others, reads the place in line on JupyterHub's spawn-pending page
before JupyterLab opens (screenshot under the test's tmp dir).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.browser import HostGuard, guarded_chromium, idp_login
from tests.support.hub import HubProcess
from tests.support.idp import LocalIdP, oidc_login
from tests.support.idp_users import idp_user, write_users
from tests.support.portal import configure_text, wait_portal_service
from tests.support.stack import hub_with_idp

pytestmark = [pytest.mark.hub, pytest.mark.idp, pytest.mark.browser, pytest.mark.timeout(600)]

STUDENTS = [f"q{i}" for i in range(1, 7)]
ORG = "uni-a.example"
LINE = re.compile(
    r"(You are next|You are number (\d+) in line) to start .*about (\d+ min )?(\d+ s)? ?to go"
)


def config(hub: HubProcess, idp: LocalIdP) -> str:
    return configure_text(hub, idp) + (
        "\nc.LocalGPUSpawner.start_slots = 1\n"
        "c.LocalGPUSpawner.start_estimate_seconds = 7\n"
        # the REST spawn answers 202 at once, so the line is watched live
        'c.JupyterHub.tornado_settings = {"slow_spawn_timeout": 0}\n'
    )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[HubProcess, LocalIdP]]:
    work = tmp_path_factory.mktemp("start-queue")
    users = write_users(
        work / "users.json", [idp_user(s, f"sub-{s}", s) for s in STUDENTS], sample=True
    )
    with hub_with_idp(work, config, idp_kw={"users_file": users}) as (hub, idp):
        wait_portal_service(hub)
        for s in [*STUDENTS, "alice"]:
            pw = None if s == "alice" else f"pass-{s}"
            assert oidc_login(hub.url, idp, s, pw).left_deployment is None
        yield hub, idp
        hub.close()
        hub.assert_no_egress()


def stop_all(hub: HubProcess, names: list[str]) -> None:
    """Stop these users' servers (a start still pending answers 400: ask again)."""

    def none_left() -> bool:
        left = [n for n in names if hub.api("GET", f"/users/{n}").json().get("servers")]
        for n in left:
            hub.api("DELETE", f"/users/{n}/server")
        return not left

    hub.wait_for(none_left, 180, "the servers stopped", interval=1.0)


def progress(hub: HubProcess, user: str, out: list[dict[str, Any]]) -> None:
    r = hub.api("GET", f"/users/{user}/server/progress", stream=True)
    r.raise_for_status()
    for line in r.iter_lines(decode_unicode=True):
        if line and line.startswith("data:"):
            event = json.loads(line[5:])
            out.append(event)
            if event.get("failed") or event.get("ready"):
                return


def test_six_students_at_once_wait_in_line_and_all_start(
    stack: tuple[HubProcess, LocalIdP], tmp_path: Path
) -> None:
    hub, _ = stack
    names = [f"{s}@{ORG}" for s in STUDENTS]
    me = hub.api("POST", f"/users/alice@{ORG}/tokens", json={"scopes": ["read:users:name!user"]})
    assert me.status_code == 201, me.text
    bystander = me.json()["token"]
    answers: list[int] = []
    events: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    latencies: list[float] = []
    stop = threading.Event()

    def watch_bystander() -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            r = hub.api("GET", "/user", token=bystander)
            latencies.append(time.perf_counter() - t0)
            assert r.status_code == 200, r.text
            time.sleep(0.2)

    def spawn(name: str) -> None:
        r = hub.api("POST", f"/users/{name}/server", json={"gpus": 1})
        answers.append(r.status_code)

    side = threading.Thread(target=watch_bystander, daemon=True)
    side.start()
    try:
        spawns = [threading.Thread(target=spawn, args=(n,)) for n in names]
        for t in spawns:
            t.start()
            time.sleep(0.05)  # arrival order: q1 first
        for t in spawns:
            t.join(60)
        watchers = [threading.Thread(target=progress, args=(hub, n, events[n])) for n in names]
        for t in watchers:
            t.start()
        for t in watchers:
            t.join(300)
    finally:
        stop.set()
        side.join(10)
        log = hub.log_text()
        stop_all(hub, names)

    assert sorted(answers) == [202] * len(names), answers  # never 429, never an error
    for n in names:
        assert events[n] and events[n][-1].get("ready"), (n, events[n][-3:])
        assert not any(e.get("failed") for e in events[n]), (n, events[n])
    # the last arrivals saw their place in line and an estimate before their turn
    lines = {n: [LINE.search(e.get("message", "")) for e in events[n]] for n in names}
    waited = [n for n in names if any(lines[n])]
    assert len(waited) >= 3, {n: [e.get("message") for e in events[n]] for n in names}
    last = names[-1]
    places = [int(m.group(2) or 1) for m in lines[last] if m]
    assert places and places == sorted(places, reverse=True), places  # moving up the line
    assert any(e.get("queue", {}).get("estimate_seconds") for e in events[last])
    # one start at a time, in arrival order: the hub's log says who waited where
    assert log.count("waits in line") >= 3, log[-3000:]
    # (arrival is when a start joins the line, after the hub's own pre-spawn steps, so it
    # can differ from the order of the HTTP requests)
    started = [m.group(1) for m in re.finditer(r"Starting (q\d@uni-a\.example) on", log)]
    joined = [m.group(1) for m in re.finditer(r"Start of (q\d@uni-a\.example) waits", log)]
    assert sorted(started) == names, started
    assert [n for n in started if n in joined] == joined, (joined, started)
    # the hub kept answering a bystander
    assert latencies, "no bystander request ran"
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    assert p99 < 2.0, latencies[-5:]
    (tmp_path / "bystander.json").write_text(json.dumps({"n": len(latencies), "p99": p99}))


def test_the_spawn_page_shows_the_place_in_line(
    stack: tuple[HubProcess, LocalIdP], tmp_path: Path
) -> None:
    """A student on the spawn form, in Chromium, behind four others: the spawn-pending page
    (JupyterHub's own, fed by the progress API) says where they are and about how long is
    left, then JupyterLab opens. No request leaves the deployment."""
    hub, idp = stack
    ahead = [f"{s}@{ORG}" for s in ("q1", "q2", "q4", "q5")]
    me = f"q3@{ORG}"
    guard = HostGuard(hub.url, idp.issuer)
    answers: list[int] = []
    try:
        with guarded_chromium(guard, 1100, 800) as page:
            idp_login(page, hub.url, idp.issuer, "q3")
            page.wait_for_url(f"{hub.url}/hub/**")
            page.goto(f"{hub.url}/hub/spawn")
            page.wait_for_selector("#sp-size")
            page.select_option("#sp-size", "lab/h100x1")
            threads = [
                threading.Thread(
                    target=lambda n: answers.append(
                        hub.api("POST", f"/users/{n}/server", json={"gpus": 1}).status_code
                    ),
                    args=(n,),
                )
                for n in ahead
            ]
            for t in threads:
                t.start()
                time.sleep(0.05)
            for t in threads:
                t.join(60)
            page.click("form#spawn_form input[type=submit], form#spawn_form button[type=submit]")
            page.wait_for_url("**/spawn-pending/**", timeout=60_000)
            page.wait_for_function(
                "() => /in line to start|You are next to start/.test(document.body.innerText)",
                timeout=60_000,
            )
            text = page.inner_text("body")
            assert LINE.search(text), text[:2000]
            page.screenshot(path=str(tmp_path / "spawn-pending-in-line.png"), full_page=True)
            page.wait_for_url(f"**/user/{me}/lab**", timeout=180_000)
            page.wait_for_selector("#jp-main-dock-panel", timeout=180_000)
        assert sorted(answers) == [202] * len(ahead), answers
        assert guard.foreign == [], guard.foreign
        assert (tmp_path / "spawn-pending-in-line.png").stat().st_size > 10_000
    finally:
        stop_all(hub, [*ahead, me])
