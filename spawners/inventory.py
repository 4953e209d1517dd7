"""Device inventory and exclusive allocation for the local backend.

Devices come from NVML (``nvidia-ml-py``) where a GPU is present, else from the node type
declared in the site file, so the portal runs on a machine without a GPU. Each device is
one ``CUDA_VISIBLE_DEVICES`` token: a GPU index, or a MIG instance's UUID.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .site import NodeType
from .sizes import Size

_MIG_NAME = re.compile(r"([0-9]+g\.[0-9]+gb(?:\+me)?)")
_MODEL = {"H100": "h100", "H200": "h200", "B200": "b200"}


@dataclass(frozen=True)
class Device:
    """One schedulable device: a whole GPU or one MIG instance."""

    id: str  # the CUDA_VISIBLE_DEVICES token
    gpu: int  # physical GPU index
    accelerator: str
    slice: str | None = None  # MIG profile, None for a whole GPU

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "gpu": self.gpu,
            "accelerator": self.accelerator,
            "slice": self.slice,
        }


def declared_devices(nt: NodeType, host: str = "local") -> list[Device]:
    """Devices of one declared node: whole GPUs by index, MIG instances by a stable UUID."""
    out = [Device(str(g), g, nt.accelerator) for g in nt.whole_gpus]
    for layout in nt.mig:
        for g in layout.gpus:
            for i, prof in enumerate(layout.profiles):
                ns = uuid.uuid5(uuid.NAMESPACE_URL, f"sovereign-portal:{host}:{nt.name}:{g}:{i}")
                out.append(Device(f"MIG-{ns}", g, nt.accelerator, prof))
    return out


def nvml_devices() -> list[Device] | None:
    """Real devices through NVML, or ``None`` when no NVIDIA driver is present."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    try:
        return list(_walk_nvml(pynvml))
    finally:
        pynvml.nvmlShutdown()


def _text(v: str | bytes) -> str:
    return v.decode() if isinstance(v, bytes) else v


def _walk_nvml(nv: Any) -> Iterable[Device]:
    for i in range(nv.nvmlDeviceGetCount()):
        h = nv.nvmlDeviceGetHandleByIndex(i)
        name = _text(nv.nvmlDeviceGetName(h))
        acc = next((v for k, v in _MODEL.items() if k in name), "h100")
        try:
            mig_on = nv.nvmlDeviceGetMigMode(h)[0] == nv.NVML_DEVICE_MIG_ENABLE
        except nv.NVMLError:
            mig_on = False
        if not mig_on:
            yield Device(str(i), i, acc)
            continue
        for j in range(nv.nvmlDeviceGetMaxMigDeviceCount(h)):
            try:
                m = nv.nvmlDeviceGetMigDeviceHandleByIndex(h, j)
            except nv.NVMLError:
                continue
            match = _MIG_NAME.search(_text(nv.nvmlDeviceGetName(m)))
            yield Device(_text(nv.nvmlDeviceGetUUID(m)), i, acc, match.group(1) if match else None)


#: Owner prefix of the portal service's session leases: ``session:<user>:<grant id>``.
SESSION_OWNER_PREFIX = "session:"


def _owner_part(name: str) -> str:
    """A user or server name inside a lease owner, with ``:``, ``/`` and ``%`` escaped."""
    return quote(name, safe="@._-~")


def server_owner(user: str, server: str = "") -> str:
    """Lease owner of a notebook server: ``alice`` or ``alice/<server name>``.

    Names are escaped, so an owner never contains ``:`` and no user name (even one such as
    ``session:bob:1f``) can look like another user's server or any user's session.
    """
    return f"{_owner_part(user)}/{_owner_part(server)}" if server else _owner_part(user)


def session_owner_prefix(user: str) -> str:
    """``session:<escaped user>:``: starts the owners of ``user``'s sessions and no one else's."""
    return f"{SESSION_OWNER_PREFIX}{_owner_part(user)}:"


def session_owner(user: str, grant_id: str) -> str:
    """Lease owner of a compute session's devices."""
    return session_owner_prefix(user) + grant_id


class AllocationError(RuntimeError):
    """No free devices for a size right now."""


class Allocator:
    """Hands out devices exclusively: two owners never share one.

    With ``state_file``, the leases live in a JSON file under an exclusive ``flock``, so
    several processes (the hub's spawner and the portal service) share one pool and a
    restart forgets nothing. A lease may carry an end time (a session's walltime), after
    which it lapses by itself.
    """

    def __init__(self, devices: Iterable[Device], state_file: str | Path | None = None) -> None:
        self.devices = list(devices)
        self.state_file = Path(state_file) if state_file else None
        self._owner: dict[str, str] = {}
        self._until: dict[str, float] = {}

    @contextmanager
    def _state(self, write: bool = True) -> Iterator[None]:
        if self.state_file is None:
            self._lapse()
            yield
            return
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        lock = self.state_file.with_name(self.state_file.name + ".lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._load()
            self._lapse()
            yield
            if write:
                self._save()
        finally:
            os.close(fd)  # closing releases the lock

    def _load(self) -> None:
        assert self.state_file is not None
        try:
            data = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            data = {}
        known = {d.id for d in self.devices}
        leases = {k: v for k, v in data.get("leases", {}).items() if k in known}
        self._owner = {k: v["owner"] for k, v in leases.items()}
        self._until = {k: v["until"] for k, v in leases.items() if v.get("until")}

    def _save(self) -> None:
        assert self.state_file is not None
        leases = {k: {"owner": o, "until": self._until.get(k)} for k, o in self._owner.items()}
        tmp = self.state_file.with_name(self.state_file.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"leases": leases}, f, indent=1, sort_keys=True)
        os.replace(tmp, self.state_file)

    def _lapse(self) -> None:
        now = time.time()
        for k, end in list(self._until.items()):
            if end < now:
                self._owner.pop(k, None)
                del self._until[k]

    def _fits(self, d: Device, size: Size) -> bool:
        return d.accelerator == size.accelerator and d.slice == size.slice

    def free(self, size: Size) -> int:
        with self._state(write=False):
            return sum(1 for d in self.devices if self._fits(d, size) and d.id not in self._owner)

    def free_ids(self) -> list[str]:
        with self._state(write=False):
            return [d.id for d in self.devices if d.id not in self._owner]

    def allocate(self, owner: str, size: Size, until: float | None = None) -> list[Device]:
        """Lease devices for ``size`` to ``owner`` (until the epoch time ``until``, if given)."""
        with self._state():
            if any(o == owner for o in self._owner.values()):
                raise AllocationError(f"{owner} already holds devices")
            want = size.devices_per_node
            free = [d for d in self.devices if self._fits(d, size) and d.id not in self._owner]
            if len(free) < want:
                raise AllocationError(
                    f"{size.label}: {len(free)} of {want} device(s) free on this box right now; "
                    "try a smaller size or wait for a running server or session to stop"
                )
            got = free[:want]
            for d in got:
                self._owner[d.id] = owner
                if until is not None:
                    self._until[d.id] = until
            return got

    def claim(self, owner: str, ids: Iterable[str]) -> list[Device]:
        """Re-adopt devices recorded in a server's state (after a hub restart)."""
        by_id = {d.id: d for d in self.devices}
        ids = list(ids)
        with self._state():
            for i in ids:
                if i not in by_id:
                    raise AllocationError(f"device {i} is not in this box's inventory")
                if self._owner.get(i, owner) != owner:
                    raise AllocationError(f"device {i} is already held by {self._owner[i]}")
            for i in ids:
                self._owner[i] = owner
            return [by_id[i] for i in ids]

    def release(self, owner: str) -> list[str]:
        with self._state():
            gone = [i for i, o in self._owner.items() if o == owner]
            for i in gone:
                del self._owner[i]
                self._until.pop(i, None)
            return gone

    def release_prefix(self, prefix: str) -> list[str]:
        """Release every lease whose owner starts with ``prefix`` (a user's sessions)."""
        with self._state():
            gone = [i for i, o in self._owner.items() if o.startswith(prefix)]
            for i in gone:
                del self._owner[i]
                self._until.pop(i, None)
            return gone

    def held_by(self, owner: str) -> list[str]:
        with self._state(write=False):
            return [i for i, o in self._owner.items() if o == owner]


def box_devices(nt: NodeType, source: str = "auto") -> list[Device]:
    """The devices of the local box: NVML where a driver answers (unless ``declared``)."""
    devices = None if source == "declared" else nvml_devices()
    if devices is None:
        if source == "nvml":
            raise AllocationError("inventory source is 'nvml' but NVML found no GPU")
        devices = declared_devices(nt)
    return devices
