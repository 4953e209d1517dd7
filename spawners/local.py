"""LocalGPUSpawner: single-user servers as local processes on one GPU box.

The embedded default backend. Each server gets devices of its own from the box's
inventory (NVML where a GPU is present, else the site file's declaration), sees exactly
those through ``CUDA_VISIBLE_DEVICES``, and gives them back when it stops or dies. After
a hub restart, running servers are re-adopted with their devices.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from jupyterhub.spawner import LocalProcessSpawner
from traitlets import Bool, Enum, List, Unicode

from .base import PortalSpawnerMixin
from .errors import ConfigError, Conflict, RequestRefused
from .inventory import (
    AllocationError,
    Allocator,
    Device,
    box_devices,
    server_owner,
    session_owner_prefix,
)
from .site import Partition
from .sizes import Size

#: Server arguments that stop JupyterLab from phoning home: news, update checks and the
#: PyPI-backed extension manager.
SOVEREIGN_LAB_ARGS = (
    "--LabApp.news_url=None",
    "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
    "--LabApp.extension_manager=readonly",
)

_ALLOCATORS: dict[tuple[str, str, str], Allocator] = {}


def _zombie(pid: int) -> bool:
    """True when ``pid`` has exited but not been reaped (state Z in /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[:1] == ["Z"]


class LocalGPUSpawner(PortalSpawnerMixin, LocalProcessSpawner):
    """Run each user's server as a local process with its own GPUs or MIG slices."""

    backend = "local"

    inventory_source = Enum(
        ["auto", "nvml", "declared"],
        "auto",
        config=True,
        help="""Where the box's devices come from. "nvml" reads real GPUs and MIG instances
        through NVML; "declared" uses the local partition's node type in the site file (for
        machines without a GPU, and tests); "auto" uses NVML when a driver answers, else the
        declaration.""",
    )
    switch_user = Bool(
        False,
        config=True,
        help="""Run each server as the user's own Unix account (like LocalProcessSpawner).
        False runs every server as the hub's account with its own home directory under
        home_dir_template: fine for a single-lab box and the demo, not for mutually
        untrusting users.""",
    )
    home_dir_template = Unicode(
        "/var/lib/sovereign-portal/home/{username}",
        config=True,
        help="Home directory of each user's server when switch_user is False; {username} "
        "is replaced by the (escaped) JupyterHub user name.",
    )
    lease_file = Unicode(
        "",
        config=True,
        help="""JSON file that holds the box's device leases, shared (under a file lock) with
        the portal service, which leases devices to compute sessions. Empty keeps leases in
        the hub's memory: then sessions must not run on this box.""",
    )
    sovereign_args = List(
        Unicode(),
        list(SOVEREIGN_LAB_ARGS),
        config=True,
        help="""Server arguments that keep JupyterLab from making requests outside the
        deployment (news, update checks, the PyPI extension manager). Appended to every
        server's command line.""",
    )

    devices: list[Device] = []
    ends_at: float = 0.0  # epoch seconds at which the walltime ends

    # -- inventory ----------------------------------------------------------------------
    def _local_partition(self) -> Partition:
        parts = [p for p in self.site.partitions if p.backend == "local"]
        if not parts:
            raise self.portal_error(
                ConfigError(
                    "This portal is not set up for local servers yet; contact the operators.",
                    log_message="the site file declares no local partition",
                    reason="no_local_partition",
                )
            )
        return parts[0]

    @property
    def allocator(self) -> Allocator:
        part = self._local_partition()
        key = (self.site_file, part.name, self.lease_file)
        if key not in _ALLOCATORS:
            try:
                devices = box_devices(part.nodes[0], self.inventory_source)
            except AllocationError as e:
                raise self.portal_error(
                    ConfigError(
                        "The GPU inventory of this box could not be read; contact the operators.",
                        log_message=f"local GPU inventory: {e}",
                        reason="inventory",
                    )
                ) from None
            self.log.info(
                "Local GPU inventory: %d devices (%s)", len(devices), self.inventory_source
            )
            _ALLOCATORS[key] = Allocator(devices, self.lease_file or None)
        return _ALLOCATORS[key]

    @property
    def owner(self) -> str:
        return server_owner(self.user.name, self.name)

    def free_devices(self, partition: Partition, size: Size) -> int | None:
        return self.allocator.free(size) // size.devices_per_node

    # -- state: re-adoption after a hub restart -----------------------------------------
    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        self.ends_at = float(state.get("ends_at") or 0)
        ids = state.get("devices") or []
        if ids and self.pid:
            try:
                self.devices = self.allocator.claim(self.owner, ids)
            except AllocationError as e:
                self.log.error("Cannot re-adopt devices of %s: %s", self.owner, e)

    def get_state(self) -> dict[str, Any]:
        state = super().get_state()
        if self.devices:
            state["devices"] = [d.id for d in self.devices]
        if self.ends_at:
            state["ends_at"] = self.ends_at
        return state

    def clear_state(self) -> None:
        super().clear_state()
        self._release()

    def _release(self) -> None:
        gone = self.allocator.release(self.owner)
        # Compute sessions die with the server that started them (even on kill -9): when
        # the user has no other server running, their session leases go back too.
        others = [
            s
            for s in getattr(self.user, "spawners", {}).values()
            if s is not self and getattr(s, "active", False)
        ]
        if not others:
            gone += self.allocator.release_prefix(session_owner_prefix(self.user.name))
        if gone:
            self.log.info("Released %s for %s", ",".join(gone), self.owner)
        self.devices = []

    # -- process environment ------------------------------------------------------------
    def check_account(self) -> None:
        """With switch_user, refuse (HTTP 403) a user whose Unix account is a system account
        (:class:`~.accounts.UnixAccountPolicy`) or does not exist. Without it, servers run
        as the hub's account and no user name becomes a process owner."""
        if self.switch_user:
            self.checked_account(self.user.name, "machine")

    def make_preexec_fn(self, name: str) -> Any:
        if self.switch_user:
            self.check_account()  # the process switches to this account: never a system one
            return super().make_preexec_fn(name)
        home = self._home()

        def preexec() -> None:
            os.makedirs(home, 0o700, exist_ok=True)
            os.chdir(home)

        return preexec

    def _home(self) -> str:
        return self.home_dir_template.format(username=self.user.escaped_name)

    def user_env(self, env: dict[str, str]) -> dict[str, str]:
        if self.switch_user:
            return super().user_env(env)
        env["USER"] = self.user.name
        env["HOME"] = self._home()
        env["SHELL"] = "/bin/bash"
        return env

    def get_env(self) -> dict[str, str]:
        env = super().get_env()
        ids = ",".join(d.id for d in self.devices)
        env["CUDA_VISIBLE_DEVICES"] = ids
        env["NVIDIA_VISIBLE_DEVICES"] = ids
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        if self.resolved is not None:
            env.update(self.portal_env(self.resolved))
        return env

    def get_args(self) -> list[str]:
        args: list[str] = super().get_args()
        if os.getuid() == 0 and not self.switch_user and "--allow-root" not in args:
            args.append("--allow-root")
        return args + list(self.sovereign_args)

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> Any:
        self.check_account()
        resolved = self.validate_request(self.user_options or {})
        if resolved.partition.backend != "local":
            raise self.portal_error(
                RequestRefused(
                    f"partition {resolved.partition.name!r} is not local",
                    reason="wrong_backend",
                    field="partition",
                )
            )
        self._release()
        try:
            self.devices = self.allocator.allocate(self.owner, resolved.size)
        except AllocationError as e:
            raise self.portal_error(Conflict(str(e), reason="no_free_devices")) from None
        self.log.info(
            "Starting %s on %s with devices %s",
            self.owner,
            resolved.size.id,
            ",".join(d.id for d in self.devices),
        )
        self.ends_at = time.time() + resolved.walltime_minutes * 60
        try:
            return await super().start()
        except BaseException:
            self._release()
            raise

    async def poll(self) -> int | None:
        if self.proc is None and self.pid and _zombie(self.pid):
            # A re-adopted server (not our child) that died but was not reaped yet by its
            # new parent: signal 0 still succeeds on it, yet it is dead.
            self.log.warning("Server of %s (pid %s) has died", self.owner, self.pid)
            self._ledger_died()
            self.clear_state()
            return 0
        status: int | None = await super().poll()
        if status is not None:
            self._ledger_died()
        if status is None and self.ends_at and time.time() >= self.ends_at:
            # The walltime is a promise to everyone else waiting for this box's GPUs.
            self.log.warning("Server of %s reached its walltime: stopping it", self.owner)
            self.ends_at = 0.0  # stop() polls again
            self.ledger_end_reason = "walltime"  # ledger (issue 10): why it ended
            await super().stop()
            self._release()
            return 0
        if status is not None and self.devices:
            self.log.warning("Server of %s has died (status %s)", self.owner, status)
            self._release()
        return status

    def _ledger_died(self) -> None:
        """Ledger (issue 10): the server ended by itself, not in a stop (nor its walltime)."""
        if self.pending != "stop" and not self.ledger_end_reason:
            self.ledger_end_reason = "died"

    async def stop(self, now: bool = False) -> None:
        try:
            await super().stop(now=now)
        finally:
            self._release()

    async def progress(self) -> AsyncIterator[dict[str, Any]]:
        if self.resolved is not None:
            yield {
                "progress": 30,
                "message": f"Allocated {self.resolved.size.label} on "
                f"{self.resolved.partition.name} "
                f"({self.resolved.partition.jurisdiction.country}): "
                f"devices {','.join(d.id[:12] for d in self.devices)}",
            }
        yield {"progress": 60, "message": "Starting JupyterLab…"}
