"""Dask worker preload: pin each worker of a multi-GPU job to its own CUDA device.

dask-jobqueue starts ``--nworkers G`` worker processes in a job that holds G devices;
each is named ``<job name>-<i>``. This preload keeps device ``i`` of the job's
``CUDA_VISIBLE_DEVICES`` for worker ``i``, before anything initialises CUDA. The number
of workers per job comes from ``SOVEREIGN_PORTAL_WORKERS_PER_JOB`` (set in the job
script); without it the preload leaves the environment alone. It then starts the
worker's device sampler (:mod:`.job_sampler`).
"""

from __future__ import annotations

import os
from typing import Any


def device_for(name: str, devices: str, per_job: int) -> str | None:
    """The device token for worker ``name`` of a job that sees ``devices``."""
    devs = [d for d in devices.split(",") if d]
    if per_job < 1 or len(devs) < per_job:
        return None
    if per_job == 1:
        return devs[0]
    _, _, idx = str(name).rpartition("-")
    if not idx.isdigit() or int(idx) >= per_job:
        return None
    return devs[int(idx)]


def dask_setup(worker: Any) -> None:
    per_job = int(os.environ.get("SOVEREIGN_PORTAL_WORKERS_PER_JOB", "0") or 0)
    dev = device_for(worker.name, os.environ.get("CUDA_VISIBLE_DEVICES", ""), per_job)
    if dev is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = dev
        os.environ["NVIDIA_VISIBLE_DEVICES"] = dev
    # the worker's device sampler (its readings go to the session directory; the
    # notebook server reports them to the hub: :mod:`.job_sampler`)
    from .job_sampler import start

    start(os.environ.get("SOVEREIGN_PORTAL_SESSION_DIR"), f"worker-{worker.name}")
