"""The sampler inside a compute session's jobs: each Dask worker and each torch rank.

A session's workers and ranks run on the GPU nodes, where the devices are, but hold no
credential for the hub (no secret goes into a job's argv, environment or script). So each
one reads its own granted device (``CUDA_VISIBLE_DEVICES``, after the worker or rank has
pinned itself) through the same device source as a notebook server
(:func:`sovereign_portal.spawners.telemetry.source_for`), and writes the last few readings
to ``<session dir>/activity/<name>.json`` (mode 0600, replaced atomically). The notebook
server that started the session reads these files (:func:`read_job_samples`) and reports
them to the hub's portal service as the session's activity, with its own token, at its
report interval (:class:`sovereign_portal.extension.sampler.SessionReporter`).

What a job samples, and how often, comes from ``<session dir>/sampler.json``, written by
the server when it creates the session: ``{"interval": s, "device_script": path}`` (a
scripted source for tests; empty: NVML for the granted device, or none). A file is at most
:data:`KEEP` readings: its size stays bounded however long the job runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

from ..spawners.telemetry import DeviceSource, TelemetryError, source_for

#: Readings kept in each job's file (at 5 s, two minutes; a report reads the new ones).
KEEP = 24
#: Files read for one session (a Dask session has a worker per GPU).
MAX_FILES = 256
SETTINGS = "sampler.json"
DIR = "activity"
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,100}")


def settings(sdir: Path) -> dict[str, Any]:
    """The server's settings for the session's samplers (defaults if none)."""
    try:
        raw = json.loads((sdir / SETTINGS).read_text())
    except (OSError, ValueError):
        raw = {}
    interval = raw.get("interval", 5.0) if isinstance(raw, dict) else 5.0
    script = raw.get("device_script", "") if isinstance(raw, dict) else ""
    ok = isinstance(interval, int | float) and not isinstance(interval, bool)
    return {
        "interval": min(max(float(interval), 0.1), 600.0) if ok else 5.0,
        "device_script": script if isinstance(script, str) else "",
    }


def write_settings(sdir: Path, interval: float, device_script: str) -> None:
    tmp = sdir / f".{SETTINGS}.tmp"
    tmp.write_text(json.dumps({"interval": interval, "device_script": device_script}))
    tmp.replace(sdir / SETTINGS)


class JobSampler:
    """Reads one worker's or rank's device; keeps the last :data:`KEEP` readings in its
    file. ``step`` is one reading (the thread calls it every interval)."""

    def __init__(self, sdir: Path, name: str, source: DeviceSource | None = None) -> None:
        if not _NAME.fullmatch(name):
            raise ValueError(f"name: {name[:40]!r} is not a worker or rank name")
        self.dir, self.name = Path(sdir), name
        self.conf = settings(self.dir)
        self.source = source
        self.readings: list[dict[str, Any]] = []

    def _source(self) -> DeviceSource | None:
        if self.source is None:
            script = self.conf["device_script"]
            try:
                self.source = source_for("scripted" if script else "auto", script=script)
            except TelemetryError:
                return None  # a script not written yet: try again at the next step
        return self.source

    def step(self) -> bool:
        src = self._source()
        if src is None:
            return False
        try:
            got = src.read()
        except Exception:  # a driver hiccup is not a dead job
            return False
        self.readings.append(
            {"at": round(time.time(), 3), "devices": [d.to_json() for d in got[:8]]}
        )
        del self.readings[:-KEEP]
        out = self.dir / DIR
        out.mkdir(mode=0o700, exist_ok=True)
        tmp = out / f".{self.name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(
                {"source": src.name, "measured": bool(src.measured), "readings": self.readings},
                f,
            )
        tmp.replace(out / f"{self.name}.json")
        return True

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set() and not (self.dir / "stop").exists():
            with contextlib.suppress(OSError):
                self.step()
            stop.wait(self.conf["interval"])


def start(sdir: str | Path | None, name: str) -> threading.Event | None:
    """Start a job's sampler thread (a daemon); None without a session directory."""
    if not sdir or not Path(sdir).is_dir():
        return None
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", str(name))[:100] or "job"
    sampler = JobSampler(Path(sdir), safe)
    stop = threading.Event()
    threading.Thread(target=sampler.run, args=(stop,), daemon=True, name="portal-sampler").start()
    return stop


def read_job_samples(sdir: Path, since: float) -> dict[str, Any] | None:
    """Every job's readings of a session, as one report's devices: per device (numbered
    in the order of the jobs' names) its latest figures and the highest utilisation and
    memory activity of the readings taken after ``since``. None when no job has a reading
    after ``since`` (no fresh evidence: the server sends nothing, and the hub's copy goes
    stale rather than idle)."""
    folder = sdir / DIR
    try:
        files = sorted(p for p in folder.iterdir() if p.suffix == ".json")[:MAX_FILES]
    except OSError:
        return None
    devices: list[dict[str, Any]] = []
    sources, measured, fresh, latest_at = set(), True, False, 0.0
    for p in files:
        try:
            data = json.loads(p.read_text())
            readings = [r for r in data["readings"] if isinstance(r, dict)]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not readings:
            continue
        sources.add(str(data.get("source")))
        measured = measured and data.get("measured") is True
        last = readings[-1]
        new = [r for r in readings if float(r.get("at", 0)) > since]
        fresh = fresh or bool(new)
        latest_at = max(latest_at, float(last.get("at", 0)))
        for d in last.get("devices", []):
            key = (d.get("index"), d.get("uuid"))
            seen = [
                x
                for r in new
                for x in r.get("devices", [])
                if (x.get("index"), x.get("uuid")) == key
            ]
            devices.append(
                {
                    "index": len(devices),
                    "uuid": d.get("uuid"),
                    "utilization_pct": round(float(d["utilization_pct"]), 2),
                    "utilization_max_pct": round(
                        max([float(x["utilization_pct"]) for x in seen] or [0.0]), 2
                    ),
                    "memory_util_max_pct": round(
                        max([float(x["memory_util_pct"]) for x in seen] or [0.0]), 2
                    ),
                    "memory_used_mib": round(float(d["memory_used_mib"]), 1),
                    "power_w": None if d.get("power_w") is None else round(float(d["power_w"]), 2),
                    "energy_mj": None
                    if d.get("energy_mj") is None
                    else round(float(d["energy_mj"]), 1),
                    "shared": bool(d.get("shared", False)),
                }
            )
    if not fresh:
        return None
    source = sources.pop() if len(sources) == 1 else "none"
    return {
        "source": source if source in ("nvml", "scripted", "none") else "none",
        "measured": measured and source == "nvml",
        "sampled_at": round(latest_at, 3),
        "devices": devices[:64],
    }
