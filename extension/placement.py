"""GET /sovereign-portal/api/placement: where this server runs, as the server itself sees it.

It answers from the server process's own environment: the devices it may use, the
partition, size and country the hub placed it on. Nothing secret is returned.
"""

from __future__ import annotations

import os
import socket

from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from tornado import web

PLACEMENT_KEYS = (
    "CUDA_VISIBLE_DEVICES",
    "SLURM_JOB_ID",
    "SLURM_JOB_GPUS",
    "SLURM_JOB_NODELIST",
    "SLURMD_NODENAME",
    "SOVEREIGN_PORTAL_PARTITION",
    "SOVEREIGN_PORTAL_SIZE",
    "SOVEREIGN_PORTAL_COUNTRY",
    "SOVEREIGN_PORTAL_WALLTIME_MINUTES",
)


class PlacementHandler(APIHandler):
    auth_resource = "sovereign_portal"

    @web.authenticated
    @authorized
    def get(self) -> None:
        env = {k: os.environ[k] for k in PLACEMENT_KEYS if k in os.environ}
        devices = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
        self.finish({"host": socket.gethostname(), "devices": devices, "env": env})
