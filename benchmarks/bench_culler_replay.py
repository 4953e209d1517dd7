"""Replay a trace of 200 servers through the real hub and two cullers: the portal's GPU-aware
culler and jupyterhub-idle-culler, on the same trace, in the same run.

The trace (generated, seeded) has four patterns, 50 servers each, over 150 scripted minutes:

- ``kernel-busy``: a cell runs the whole time on the CPU; the GPU is idle. Active.
- ``gpu-busy``: a training loop in a background thread keeps the GPU at 85 %; the kernel is
  idle. Active.
- ``both-idle``: busy for the first 15-25 minutes, then GPU and kernel idle to the end.
- ``bursts``: 10 busy minutes every 25 minutes (gaps shorter than the limit), then idle.

Each pattern's idle stretches longer than the limit (N = 30 minutes) are *reclaimable*
beyond the limit. For each culler the run prints:

- GPU-hours reclaimed / idle GPU-hours beyond the limit (goal ≥ 90 %): a stop at time s
  reclaims the reclaimable time after s;
- active servers stopped (goal 0): a stop at a time that is not reclaimable.

What is real and what stands in
-------------------------------
Real: JupyterHub and configurable-http-proxy, the portal service (``configure_hub``), the GPU
culler (``configure_culler``) and jupyterhub-idle-culler as hub services, each server's
sampler (``extension.sampler.Sampler``) reading a scripted device source
(``spawners.telemetry.ScriptedSource``, one script per server) and reporting to the portal
service with the server's own token.

Stand-in: 200 real single-user servers do not fit on 2 cores. Each server is a slot of one
light HTTP process (this script): it listens on its own port, the hub registers it as the
user's server through a test spawner (``StandinSpawner``), and it does what a single-user
server does for the cullers: it sends the sampler's reports, and it reports its last
activity to the hub (``POST /users/<name>/activity``, as jupyterhub-singleuser does) while
its kernel is busy. A GPU busy in a background thread makes no kernel activity, as in Jupyter.

Time is scaled: one real second is one scripted minute (``--scale 60``). The two cullers run
one after the other on the same trace (each on a fresh hub), so neither sees the other's
stops.

    .venv/bin/python benchmarks/bench_culler_replay.py [--servers 200] [--scale 60]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from jupyterhub.spawner import Spawner
from tornado import httpclient, web
from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop, PeriodicCallback
from tornado.netutil import bind_sockets
from traitlets import Unicode

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

LIMIT_MIN = 30.0  # N, scripted minutes
WARN_MIN = 5.0  # W
TRACE_MIN = 150.0
REPORT_S = 3.0  # real seconds between a stand-in's reports


# -- the trace -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pattern:
    name: str
    kind: str
    gpu: tuple[tuple[float, float], ...]  # busy intervals of the GPU (scripted minutes)
    kernel: tuple[tuple[float, float], ...]  # busy intervals of the kernel

    def busy(self, t: float) -> bool:
        return any(a <= t < b for a, b in (*self.gpu, *self.kernel))

    def kernel_busy(self, t: float) -> bool:
        return any(a <= t < b for a, b in self.kernel)

    def reclaimable(self) -> list[tuple[float, float]]:
        """Idle stretches beyond the limit: [a + N, b) for each idle run [a, b) longer than N."""
        edges = sorted({0.0, TRACE_MIN, *(x for iv in (*self.gpu, *self.kernel) for x in iv)})
        out, start = [], None
        for a, b in itertools.pairwise(edges):
            idle = not self.busy((a + b) / 2)
            if idle and start is None:
                start = a
            if not idle and start is not None:
                if a - start > LIMIT_MIN:
                    out.append((start + LIMIT_MIN, a))
                start = None
        if start is not None and TRACE_MIN - start > LIMIT_MIN:
            out.append((start + LIMIT_MIN, TRACE_MIN))
        return out

    def script_phases(self) -> list[dict[str, Any]]:
        """The GPU's pattern as the scripted source's phases (scripted seconds)."""
        phases, t = [], 0.0
        for a, b in sorted(self.gpu):
            if a > t:
                phases.append({"seconds": (a - t) * 60, "utilization_pct": 0})
            phases.append({"seconds": (b - a) * 60, "utilization_pct": 85, "memory_util_pct": 30})
            t = b
        phases.append({"seconds": None, "utilization_pct": 0})
        return phases


def trace(n: int, seed: int = 13) -> list[Pattern]:
    rng = random.Random(seed)
    out = []
    kinds = ["kernel-busy", "gpu-busy", "both-idle", "bursts"]
    for i in range(n):
        kind = kinds[i % 4]
        name = f"u{i:03d}"
        if kind == "kernel-busy":
            out.append(Pattern(name, kind, (), ((0.0, TRACE_MIN + 10),)))
        elif kind == "gpu-busy":
            out.append(Pattern(name, kind, ((0.0, TRACE_MIN + 10),), ()))
        elif kind == "both-idle":
            end = rng.uniform(15, 25)
            out.append(Pattern(name, kind, ((0.0, end),), ((0.0, end),)))
        else:
            off = rng.uniform(0, 5)
            ivs = tuple((off + 25 * k, off + 25 * k + 10) for k in range(4))
            out.append(Pattern(name, kind, ivs, ivs))
    return out


@dataclass
class Figures:
    reclaimable_h: float = 0.0
    reclaimed_h: float = 0.0
    active_stopped: list[str] = field(default_factory=list)
    stopped: int = 0

    @property
    def ratio(self) -> float:
        return self.reclaimed_h / self.reclaimable_h if self.reclaimable_h else 0.0


def score(patterns: list[Pattern], stops: dict[str, float], tol_min: float = 1.0) -> Figures:
    """Figures of one culler from its stop times (scripted minutes, by user)."""
    f = Figures()
    for p in patterns:
        rec = p.reclaimable()
        f.reclaimable_h += sum(b - a for a, b in rec) / 60
        s = stops.get(p.name)
        if s is None:
            continue
        f.stopped += 1
        if not any(a - tol_min <= s < b for a, b in rec):
            f.active_stopped.append(f"{p.name} ({p.kind}) at {s:.1f} min")
        f.reclaimed_h += sum(max(0.0, b - max(a, s)) for a, b in rec) / 60
    return f


# -- the stand-in servers --------------------------------------------------------------------


class StandinSpawner(Spawner):
    """Registers a slot of the stand-in process as the user's server."""

    control_url = Unicode(config=True, help="The stand-in process's control URL.")

    async def _call(self, path: str, body: dict[str, Any]) -> Any:
        resp = await httpclient.AsyncHTTPClient().fetch(
            f"{self.control_url}/{path}", method="POST", body=json.dumps(body), request_timeout=60
        )
        return json.loads(resp.body)

    async def start(self) -> tuple[str, int]:
        env = self.get_env()
        got = await self._call(
            "open",
            {
                "user": self.user.name,
                "token": self.api_token,
                "api_url": self.hub.api_url,
                "service_url": env.get("SOVEREIGN_PORTAL_SERVICE_URL", ""),
            },
        )
        return ("127.0.0.1", int(got["port"]))

    async def poll(self) -> int | None:
        got = await self._call("alive", {"user": self.user.name})
        return None if got["alive"] else 0

    async def stop(self, now: bool = False) -> None:
        await self._call("close", {"user": self.user.name})


class Slot:
    def __init__(self, host: StandinHost, user: str, token: str, api_url: str, svc: str) -> None:
        from sovereign_portal.extension.sampler import Sampler
        from sovereign_portal.spawners.telemetry import ScriptedSource

        self.host, self.user, self.token, self.api_url, self.svc = host, user, token, api_url, svc
        self.pattern = host.patterns[user]
        script = host.dir / f"{user}.json"
        script.write_text(
            json.dumps(
                {
                    "start": host.start,
                    "time_scale": host.scale,
                    "devices": [{"index": 0, "uuid": f"GPU-{user}", "idle_w": 60, "busy_w": 500}],
                    "phases": self.pattern.script_phases(),
                }
            )
        )
        self.sampler = Sampler(
            ScriptedSource(script), server="", kernels=self.kernels, post=self.post
        )
        sockets = bind_sockets(0, "127.0.0.1")
        self.port = sockets[0].getsockname()[1]
        self.server = HTTPServer(web.Application([(r"/.*", _Any)]))
        self.server.add_sockets(sockets)
        self.sampling = PeriodicCallback(self.sampler.sample, 1000 * REPORT_S / 5)
        self.reporting = PeriodicCallback(self.report, 1000 * REPORT_S, jitter=0.2)
        self.kernel_seen_busy = False
        # until the trace starts: a user at work (hub activity every 10 s), no reports yet
        self.prestart = PeriodicCallback(self.hub_activity, 10_000)
        self.prestart.start()
        IOLoop.current().add_callback(self.hub_activity)

    def begin(self) -> None:
        """The trace starts (``host.start``): the script's clock, then sample and report."""
        self.prestart.stop()
        path = self.host.dir / f"{self.user}.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "start": self.host.start}))
        self.sampler.source._script = None  # type: ignore[attr-defined]
        self.sampler.sample()
        self.sampling.start()
        self.reporting.start()

    def minute(self) -> float:
        return self.host.minute()

    def kernels(self) -> tuple[int, int]:
        t = self.minute()
        busy = t < 0 or self.pattern.kernel_busy(t)  # before the trace: a user at work
        self.kernel_seen_busy |= busy
        return (1 if busy else 0, 1)

    async def post(self, body: dict[str, Any]) -> Any:
        resp = await httpclient.AsyncHTTPClient().fetch(
            self.svc + "api/activity",
            method="POST",
            headers={"Authorization": f"token {self.token}"},
            body=json.dumps(body),
            raise_error=False,
            request_timeout=30,
        )
        self.host.reports += 1
        if resp.code != 200:
            self.host.refused += 1
            raise RuntimeError(f"HTTP {resp.code}: {resp.body[:200]!r}")
        return json.loads(resp.body)

    async def report(self) -> None:
        await self.sampler.report()
        if self.kernel_seen_busy:  # what jupyterhub-singleuser reports: the kernel's activity
            self.kernel_seen_busy = False
            await self.hub_activity()

    async def hub_activity(self) -> None:
        now = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())
        await httpclient.AsyncHTTPClient().fetch(
            f"{self.api_url}/users/{self.user}/activity",
            method="POST",
            headers={"Authorization": f"token {self.token}"},
            body=json.dumps({"last_activity": now, "servers": {"": {"last_activity": now}}}),
            raise_error=False,
            request_timeout=30,
        )

    def close(self) -> None:
        self.prestart.stop()
        self.sampling.stop()
        self.reporting.stop()
        self.server.stop()


class _Any(web.RequestHandler):
    def get(self) -> None:
        self.finish({"standin": True})


class StandinHost:
    """One process serving every stand-in server, and the spawner's control routes."""

    def __init__(self, workdir: Path, patterns: list[Pattern], scale: float) -> None:
        self.dir = workdir
        self.patterns = {p.name: p for p in patterns}
        self.scale = scale
        self.start = time.time() + 3600  # set when the replay starts
        self.slots: dict[str, Slot] = {}
        self.stops: dict[str, float] = {}
        self.reports = self.refused = 0
        self.loop = IOLoop()
        sockets = bind_sockets(0, "127.0.0.1")
        self.control_port = sockets[0].getsockname()[1]
        self._sockets = sockets
        self.thread = threading.Thread(target=self._run, daemon=True)

    def minute(self) -> float:
        return (time.time() - self.start) * self.scale / 60

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop.asyncio_loop)  # type: ignore[attr-defined]
        httpclient.AsyncHTTPClient.configure(None, max_clients=64)
        host = self

        class Control(web.RequestHandler):
            def post(self, what: str) -> None:
                body = json.loads(self.request.body)
                user = body["user"]
                if what == "open":
                    slot = Slot(host, user, body["token"], body["api_url"], body["service_url"])
                    host.slots[user] = slot
                    self.finish({"port": slot.port})
                elif what == "alive":
                    self.finish({"alive": user in host.slots})
                elif what == "close":
                    slot = host.slots.pop(user, None)
                    if slot is not None:
                        slot.close()
                        if host.minute() >= 0:
                            host.stops.setdefault(user, host.minute())
                    self.finish({})

        server = HTTPServer(web.Application([(r"/(open|alive|close)", Control)]))
        server.add_sockets(self._sockets)
        self.loop.start()

    def run(self) -> StandinHost:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.loop.add_callback(self.loop.stop)
        self.thread.join(10)


# -- one replay ------------------------------------------------------------------------------

CONFIG = """
import sys
sys.path.insert(0, {here!r})
c.JupyterHub.authenticator_class = "dummy"
c.Authenticator.allow_all = True
c.JupyterHub.spawner_class = "bench_culler_replay.StandinSpawner"
c.StandinSpawner.control_url = "http://127.0.0.1:{control}"
c.JupyterHub.concurrent_spawn_limit = 0
c.JupyterHub.api_page_default_limit = 1000
c.JupyterHub.api_page_max_limit = 1000
c.JupyterHub.last_activity_interval = 5
c.PortalDatabase.url = "sqlite:///{dir}/portal.sqlite"
from sovereign_portal.hub.service import configure_hub
configure_hub(c, None, port={service_port}, db_url=c.PortalDatabase.url)
"""

GPU_CULLER = """
from sovereign_portal.hub.culler import configure_culler
configure_culler(c, ["--GPUCuller.interval=1", "--GPUCuller.idle_minutes={idle}",
    "--GPUCuller.warn_minutes={warn}", "--GPUCuller.stale_seconds={stale}"])
"""

IDLE_CULLER = """
c.JupyterHub.services.append({{"name": "idle-culler", "command": [sys.executable, "-m",
    "jupyterhub_idle_culler", "--timeout={timeout}", "--cull-every=2"]}})
c.JupyterHub.load_roles.append({{"name": "idle-culler", "services": ["idle-culler"],
    "scopes": ["list:users", "read:users:activity", "read:servers", "delete:servers"]}})
"""


def replay(which: str, patterns: list[Pattern], scale: float, workdir: Path) -> Figures:
    from tests.support.hub import HubProcess
    from tests.support.paths import free_port

    host = StandinHost(workdir, patterns, scale).run()
    real_min = 60 / scale  # real seconds per scripted minute
    extra = (
        GPU_CULLER.format(
            idle=LIMIT_MIN * real_min / 60,
            warn=WARN_MIN * real_min / 60,
            stale=max(30, 6 * REPORT_S),
        )
        if which == "gpu"
        else IDLE_CULLER.format(timeout=int(LIMIT_MIN * real_min))
    )
    config = CONFIG.format(
        here=str(HERE),
        control=host.control_port,
        dir=workdir,
        service_port=free_port(),
    )
    hub = HubProcess(workdir / "hub", config + extra, poll_interval=30)
    hub.start(timeout=120)
    try:
        names = [p.name for p in patterns]
        r = hub.api("POST", "/users", json={"usernames": names})
        assert r.status_code in (201, 409), r.text
        with ThreadPoolExecutor(4) as pool:
            codes = list(
                pool.map(
                    lambda n: (
                        requests.post(
                            f"{hub.url}/hub/api/users/{n}/server",
                            headers={"Authorization": f"token {hub.token}"},
                            timeout=180,
                        ).status_code
                    ),
                    names,
                )
            )
        assert all(c in (201, 202) for c in codes), codes
        deadline = time.time() + 300
        while len(host.slots) < len(names) and time.time() < deadline:
            time.sleep(0.5)
        assert len(host.slots) == len(names), f"{len(host.slots)} of {len(names)} servers up"
        # the servers started; the trace starts now, for all at once
        host.start = time.time() + 2
        for slot in list(host.slots.values()):
            host.loop.add_callback(slot.begin)
        t_end = host.start + TRACE_MIN * real_min
        while time.time() < t_end:
            time.sleep(1)
        print(
            f"  [{which}] {host.reports} reports ({host.refused} refused), "
            f"{len(host.stops)} servers stopped",
            flush=True,
        )
        return score(patterns, dict(host.stops))
    finally:
        hub.close()
        host.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--servers", type=int, default=200)
    ap.add_argument("--scale", type=float, default=60.0, help="scripted seconds per real second")
    args = ap.parse_args()
    if args.servers < 4:
        ap.error("--servers: at least 4 (one of each pattern)")
    sys.path.insert(0, str(ROOT))
    patterns = trace(args.servers)
    print(
        f"Replay: {len(patterns)} servers (stand-ins: one light HTTP process, real hub, real "
        f"portal service, real cullers), {TRACE_MIN:.0f} scripted min at {args.scale:g}x, "
        f"limit N = {LIMIT_MIN:.0f} min, warning W = {WARN_MIN:.0f} min",
        flush=True,
    )
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-culler-") as tmp:
        for which in ("gpu", "idle"):
            d = Path(tmp) / which
            d.mkdir()
            results[which] = replay(which, patterns, args.scale, d)
    g, i = results["gpu"], results["idle"]
    print()
    print(f"{'':46s}{'GPU-aware culler':>18s}{'jupyterhub-idle-culler':>24s}")
    print(
        f"{'GPU-hours reclaimed / idle beyond the limit':46s}"
        f"{g.ratio * 100:17.1f}%{i.ratio * 100:23.1f}%"
    )
    print(
        f"{'  (reclaimed / reclaimable GPU-hours)':46s}"
        f"{g.reclaimed_h:8.2f} / {g.reclaimable_h:6.2f}"
        f"{i.reclaimed_h:13.2f} / {i.reclaimable_h:6.2f}"
    )
    print(f"{'active servers stopped':46s}{len(g.active_stopped):18d}{len(i.active_stopped):24d}")
    print(f"{'servers stopped':46s}{g.stopped:18d}{i.stopped:24d}")
    for p in ("kernel-busy", "gpu-busy", "both-idle", "bursts"):
        gs = sum(1 for x in g.active_stopped if f"({p})" in x)
        is_ = sum(1 for x in i.active_stopped if f"({p})" in x)
        print(f"{'  active stopped, ' + p:46s}{gs:18d}{is_:24d}")
    ok = g.ratio >= 0.9 and not g.active_stopped
    print()
    print(
        "goal (GPU-aware culler: >= 90 % reclaimed, 0 active stopped):", "met" if ok else "NOT met"
    )
    if g.active_stopped:
        print("  active stopped:", "; ".join(g.active_stopped[:10]))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
