"""One ``squeue`` per interval for the whole portal: a queue snapshot shared between processes.

The hub (its spawners' :class:`~.scheduler.JobPoller`) and the portal service (the sessions'
poller) are two processes on the hub host, and each polls once per interval. With a shared
snapshot file, whichever poller's turn comes first queries the *whole queue* once, under an
exclusive ``flock``, and writes the answer atomically; the other finds it fresh and reads it
instead of asking Slurm. So the scheduler gets one query per interval for every server and
every session of the portal, whatever their number.

A query of the whole queue answers any set of job ids the same way ``squeue --jobs`` does
(``-t all``: final states stay listed for ``MinJobAge``; a job missing from a successful
answer is gone). A failed query writes nothing: the snapshot never carries a guess, and
each poller then asks Slurm itself (and keeps its jobs unknown if Slurm does not answer).
The file holds the whole queue (users, comments with job tags): it is written 0600 in the
hub's own state directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import time
from collections.abc import Collection
from dataclasses import asdict, fields
from pathlib import Path

from .client import JobInfo, SchedulerClient

_FIELDS = {f.name for f in fields(JobInfo)}


class QueueSnapshot:
    """A whole-queue answer shared through ``path`` (and ``path.lock``)."""

    def __init__(self, path: str | os.PathLike[str], lock_timeout: float = 30.0) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.lock_timeout = lock_timeout
        #: How this process's queries were answered (for tests and the benchmarks).
        self.asked = 0
        self.shared = 0

    def read(self, max_age: float, newer_than: float = 0.0) -> dict[str, JobInfo] | None:
        """The snapshot if it is younger than ``max_age`` seconds and was taken after
        ``newer_than`` (a wall-clock time), else None."""
        try:
            raw = json.loads(self.path.read_text())
            at = float(raw["at"])  # when the query was *sent*: nothing newer can be in it
            jobs = raw["jobs"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not 0 <= time.time() - at < max_age or at < newer_than or not isinstance(jobs, list):
            return None
        out: dict[str, JobInfo] = {}
        for item in jobs:
            if not isinstance(item, dict) or set(item) != _FIELDS:
                return None
            info = JobInfo(**item)
            out[info.job_id] = info
        return out

    def _write(self, jobs: dict[str, JobInfo], at: float) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"at": at, "jobs": [asdict(j) for j in jobs.values()]}, f)
        os.replace(tmp, self.path)

    async def _lock(self) -> int:
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        deadline = time.monotonic() + self.lock_timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise TimeoutError(f"{self.lock_path} stayed locked") from None
                await asyncio.sleep(0.02)

    async def query(
        self,
        client: SchedulerClient,
        job_ids: Collection[str] | None,
        max_age: float,
        newer_than: float = 0.0,
    ) -> dict[str, JobInfo]:
        """``job_ids`` (or the whole queue) from a fresh snapshot, or from one whole-queue
        query of ``client`` that then becomes the snapshot. Raises as ``client.query``.

        ``newer_than``: when the newest of ``job_ids`` was submitted; an older snapshot
        cannot know it, and its absence there would read as "gone"."""
        whole = self.read(max_age, newer_than)
        if whole is None:
            fd = await self._lock()
            try:
                whole = self.read(max_age, newer_than)  # another process may have just asked
                if whole is None:
                    sent = time.time()
                    whole = await client.query(None)
                    self.asked += 1
                    with contextlib.suppress(OSError):
                        self._write(whole, sent)
                else:
                    self.shared += 1
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
        else:
            self.shared += 1
        if job_ids is None:
            return whole
        return {j: whole[j] for j in job_ids if j in whole}
