"""The extension's sessions take Slurm job state from the hub, never from squeue.

Fast inner layer (no server, no Slurm): a SessionManager with an in-process hub and a
launcher that only has job ids. The real chain is tests/hub/test_scheduler_poll.py.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from sovereign_portal.extension.launchers import LaunchConfig, Launcher
from sovereign_portal.extension.sessions import Session, SessionManager

pytestmark = pytest.mark.unit


class Jobs(Launcher):
    kind, backend = "dask", "slurm"

    def __init__(self, ids: list[str]) -> None:
        self.ids = ids
        self.grant = {"workers": 1}
        self.stopped = False

    def job_ids(self) -> list[str]:
        return list(self.ids)

    def up(self) -> int:
        return 0

    async def stop(self) -> None:
        self.stopped = True


class Hub:
    """The portal service's job view, scripted; records registrations."""

    def __init__(self) -> None:
        self.view: dict[str, Any] = {"version": 1, "ok": False, "grants": {}}
        self.registered: list[tuple[str, list[str]]] = []
        self.released: list[str] = []

    async def register_jobs(self, grant_id: str, ids: list[str]) -> dict[str, Any]:
        self.registered.append((grant_id, ids))
        self.view["grants"].setdefault(grant_id, dict.fromkeys(ids))
        self.view["version"] += 1
        return dict(self.view)

    async def jobs(self, version: int, wait_s: int) -> dict[str, Any]:
        await asyncio.sleep(3600)  # the test drives the manager's view itself
        return self.view

    async def release(self, grant_id: str) -> None:
        self.released.append(grant_id)


def _manager(tmp_path: Path) -> tuple[SessionManager, Hub, Session, Jobs]:
    hub = Hub()
    m = SessionManager(hub, tmp_path, LaunchConfig())  # type: ignore[arg-type]
    launcher = Jobs(["41", "42"])
    grant = {"id": "g1", "walltime_minutes": 30, "kind": "dask"}
    s = Session("s1", "dask", grant, tmp_path / "s1", launcher, state="queued")
    m.sessions[s.id] = s
    return m, hub, s, launcher


def _job(state: str, position: int = 0, reason: str = "None") -> dict[str, Any]:
    return {"state": state, "reason": reason, "partition": "gpu-fr", "position": position}


def test_unknown_keeps_state_and_the_hubs_answer_moves_the_session(tmp_path: Path) -> None:
    async def run() -> None:
        m, hub, s, launcher = _manager(tmp_path)
        await m.poll()
        assert hub.registered == [("g1", ["41", "42"])]
        assert s.state == "queued" and s.queue == {}  # not polled yet: nothing changes
        m._take({**hub.view, "version": 10, "ok": True, "grants": {"g1": {"41": None}}})
        await m.poll()
        assert s.state == "queued"  # one job still unknown
        m._take(
            {
                "version": 11,
                "ok": True,
                "grants": {
                    "g1": {
                        "41": _job("PENDING", 3, "Priority"),
                        "42": _job("PENDING", 2, "Resources"),
                    }
                },
            }
        )
        await m.poll()
        assert s.state == "queued" and s.queue == {"position": 2, "reason": "Resources"}
        assert "position 2" in s.message and "2 of 2 job(s) waiting" in s.message
        # Slurm did not answer: no change, certainly no end
        m._take({"version": 12, "ok": False, "grants": {"g1": {}}})
        await m.poll()
        assert s.state == "queued" and not launcher.stopped
        # every job gone behind the portal's back: the session ends and releases its grant
        m._take(
            {
                "version": 13,
                "ok": True,
                "grants": {"g1": {"41": _job("GONE"), "42": _job("CANCELLED")}},
            }
        )
        await m.poll()
        assert s.state == "failed" and "its Slurm jobs ended" in s.message
        assert launcher.stopped and hub.released == ["g1"]
        assert m._follower is not None
        m._follower.cancel()

    asyncio.run(run())


def test_new_job_ids_are_registered_again(tmp_path: Path) -> None:
    async def run() -> list[tuple[str, list[str]]]:
        m, hub, _, launcher = _manager(tmp_path)
        await m.poll()
        await m.poll()  # unchanged: no second registration
        launcher.ids.append("43")
        await m.poll()
        if m._follower is not None:
            m._follower.cancel()
        return hub.registered

    assert asyncio.run(run()) == [("g1", ["41", "42"]), ("g1", ["41", "42", "43"])]
