"""The GPUSessions widget: pick a session, see its cost and queue, start it, get a handle.

``SessionForm`` holds the choice and its invariants (validated in Python, testable without
a browser or kernel). ``GPUSessions`` renders it with ipywidgets, submits through the
server's REST API, shows progress, and keeps the handle in ``.handle``.
"""

from __future__ import annotations

import contextlib
import html
import threading
from typing import Any

import ipywidgets as w
from traitlets import Dict, HasTraits, Int, TraitError, Unicode, observe, validate

from ..spawners.request import TORCH_ON_SLICES, torch_on_slices
from .client import PortalClient, PortalError, SessionHandle, handle_for

KIND_LABELS = {"dask": "Dask cluster", "torch": "torch.distributed"}


class SessionForm(HasTraits):
    """A compute-session choice checked against the catalog the hub served this user."""

    catalog = Dict(help="The catalog JSON from GET /sovereign-portal/api/catalog.")
    kind = Unicode("dask", help="'dask' or 'torch'.")
    partition = Unicode("", help="Partition name from the catalog.")
    size_id = Unicode("", help="A size id of that partition, e.g. 'h100x2' or 'h100:3g.40gb'.")
    count = Int(1, help="Dask: jobs of this size. torch: nodes of this size.")
    walltime_minutes = Int(60, help="Walltime of the session in minutes.")

    def __init__(self, catalog: dict[str, Any], **kw: Any) -> None:
        super().__init__(catalog=catalog)
        parts = catalog.get("partitions") or []
        if not parts:
            raise PortalError("no partition is open to you: ask the operators", "no_partition")
        kinds = catalog.get("kinds") or []
        if not kinds:
            raise PortalError(f"your role ({catalog.get('role')}) may not start sessions", "role")
        self.kind = kw.pop("kind", kinds[0])
        self.partition = kw.pop("partition", parts[0]["name"])
        self.walltime_minutes = kw.pop("walltime_minutes", self._part()["default_walltime_minutes"])
        for k, v in kw.items():
            setattr(self, k, v)
        if not self.size_id:
            self.size_id = self.sizes()[0]["id"]

    # -- lookups --------------------------------------------------------------------------
    def _part(self, name: str | None = None) -> dict[str, Any]:
        name = name or self.partition
        for p in self.catalog["partitions"]:
            if p["name"] == name:
                return dict(p)
        raise TraitError(f"no partition {name!r}")

    def sizes(self) -> list[dict[str, Any]]:
        """Sizes offered for this kind on this partition (Dask takes one-node sizes)."""
        out = list(self._part()["sizes"])
        if self.kind == "dask":
            out = [s for s in out if s["nodes"] == 1]
        return out

    def size(self) -> dict[str, Any]:
        for s in self._part()["sizes"]:
            if s["id"] == self.size_id:
                return dict(s)
        raise TraitError(f"no size {self.size_id!r}")

    def max_count(self) -> int:
        p, s = self._part(), self.size()
        if p["backend"] == "local" or (self.kind == "torch" and s["slice"]):
            return 1
        if self.kind == "torch":
            return max(1, int(s.get("max_count", 1)) // int(s["nodes"]))
        return 64

    # -- validation -------------------------------------------------------------------------
    @validate("kind")
    def _kind(self, proposal: Any) -> str:
        v = proposal["value"]
        if v not in self.catalog.get("kinds", []):
            allowed = ", ".join(self.catalog.get("kinds", [])) or "none"
            raise TraitError(f"kind {v!r} is not open to you; allowed: {allowed}")
        return str(v)

    @validate("partition")
    def _partition(self, proposal: Any) -> str:
        self._part(proposal["value"])
        return str(proposal["value"])

    @validate("size_id")
    def _size(self, proposal: Any) -> str:
        v = proposal["value"]
        ids = [s["id"] for s in self.sizes()]
        if v not in ids:
            raise TraitError(f"size {v!r} is not offered here for {self.kind}; pick one of {ids}")
        return str(v)

    @validate("count")
    def _count(self, proposal: Any) -> int:
        v = int(proposal["value"])
        if self.size_id:
            s, top = self.size(), self.max_count()
            if torch_on_slices(self.kind, s["slice"], v):
                raise TraitError(TORCH_ON_SLICES)
            if not 1 <= v <= top:
                raise TraitError(f"count must be from 1 to {top} for this size")
        elif v < 1:
            raise TraitError("count must be at least 1")
        return v

    @validate("walltime_minutes")
    def _walltime(self, proposal: Any) -> int:
        v, top = int(proposal["value"]), int(self._part()["max_walltime_minutes"])
        if not 1 <= v <= top:
            raise TraitError(f"walltime must be from 1 to {top} minutes on {self.partition}")
        return v

    @observe("kind", "partition")
    def _reset_size(self, change: Any) -> None:
        ids = [s["id"] for s in self.sizes()] if self.partition else []
        if ids and self.size_id not in ids:
            self.size_id = ids[0]
        if self.size_id and self.count > self.max_count():
            self.count = 1

    @observe("size_id")
    def _clamp_count(self, change: Any) -> None:
        if self.count > self.max_count():
            self.count = 1

    # -- what the user sees and sends ---------------------------------------------------
    def workers(self) -> int:
        s = self.size()
        return int(s["devices_per_node"]) * int(s["nodes"]) * self.count

    def cost(self) -> dict[str, float]:
        s, hours = self.size(), self.walltime_minutes / 60
        rate = float(s["eur_per_hour"]) * self.count
        return {
            "eur_per_hour": round(rate, 2),
            "eur_max": round(rate * hours, 2),
            "gpu_hours_max": round(float(s["gpu_fraction"]) * self.count * hours, 2),
        }

    def queue_text(self) -> str:
        q = self._part().get("queue") or {}
        if "free_devices" in q:
            return f"{q['free_devices']} of {q['devices']} devices free on this box"
        if "pending" in q:
            return f"{q['pending']} job(s) waiting, {q['running']} running on {self.partition}"
        return "queue state unknown"

    def summary(self) -> str:
        c, s = self.cost(), self.size()
        unit = "workers" if self.kind == "dask" else "ranks"
        return (
            f"{self.count} × {s['label']} → {self.workers()} {unit} · "
            f"€{c['eur_per_hour']:.2f}/h, at most €{c['eur_max']:.2f} and "
            f"{c['gpu_hours_max']:g} GPU-hours for {self.walltime_minutes} min"
        ) + self.budget_text()

    def budget_text(self) -> str:
        """What is left of the budget a session charges, as the portal service words it
        (``catalog["budget"]["banner"]``): `` · ml101 has 1.2 GPU-hours left for you``."""
        b = self.catalog.get("budget")
        if not isinstance(b, dict) or not isinstance(b.get("banner"), str):
            return ""
        return f" · {b['banner']}"

    def request(self) -> dict[str, Any]:
        s = self.size()
        req: dict[str, Any] = {
            "kind": self.kind,
            "partition": self.partition,
            "accelerator": s["accelerator"],
            "count": self.count,
            "walltime_minutes": self.walltime_minutes,
        }
        if s["slice"]:
            req["slice"] = s["slice"]
        else:
            req["gpus"] = s["gpus_per_node"]
            if s["nodes"] > 1:
                req["nodes"] = s["nodes"]
        return req


class GPUSessions(w.VBox):
    """``GPUSessions()`` in a notebook cell: choose, see the cost, start, stop.

    After start-up ``.handle`` is a :class:`~.client.DaskSession` (``.client`` is a
    ``distributed.Client``) or a :class:`~.client.TorchSession` (``.run(fn)``).
    """

    def __init__(self, client: PortalClient | None = None, **choice: Any) -> None:
        self.portal = client or PortalClient()
        self.handle: SessionHandle | None = None
        self.session: dict[str, Any] | None = None
        self._thread: threading.Thread | None = None
        self.error = w.HTML()
        try:
            self.form = SessionForm(self.portal.catalog(), **choice)
        except (PortalError, TraitError) as e:
            self.error.value = _error(str(e))
            super().__init__([self.error])
            return
        f = self.form
        self.kind = w.ToggleButtons(
            options=[(KIND_LABELS.get(k, k), k) for k in f.catalog["kinds"]],
            value=f.kind,
            description="Kind",
        )
        self.partition = w.Dropdown(
            options=[(f"{p['name']} ({p['country']})", p["name"]) for p in f.catalog["partitions"]],
            value=f.partition,
            description="Partition",
        )
        self.size = w.Dropdown(description="Size")
        self.count = w.BoundedIntText(value=f.count, min=1, max=1, description="Count")
        self.walltime = w.BoundedIntText(
            value=f.walltime_minutes, min=1, max=10**6, description="Minutes"
        )
        self.cost = w.HTML()
        self.queue = w.HTML()
        self.status = w.HTML()
        self.progress = w.IntProgress(value=0, min=0, max=1, description="Workers")
        self.start_button = w.Button(description="Start", button_style="success", icon="play")
        self.stop_button = w.Button(
            description="Stop", button_style="danger", icon="stop", disabled=True
        )
        self.start_button.on_click(lambda _: self.start())
        self.stop_button.on_click(lambda _: self.stop())
        for ctl, name in (
            (self.kind, "kind"),
            (self.partition, "partition"),
            (self.size, "size_id"),
            (self.count, "count"),
            (self.walltime, "walltime_minutes"),
        ):
            ctl.observe(lambda ch, n=name: self._set(n, ch["new"]), names="value")
        self._sync()
        super().__init__(
            [
                self.kind,
                self.partition,
                self.size,
                w.HBox([self.count, self.walltime]),
                self.cost,
                self.queue,
                w.HBox([self.start_button, self.stop_button]),
                self.progress,
                self.status,
                self.error,
            ]
        )

    # -- form <-> controls ------------------------------------------------------------------
    def _set(self, name: str, value: Any) -> None:
        try:
            setattr(self.form, name, value)
            self.error.value = ""
        except TraitError as e:
            self.error.value = _error(str(e))
        self._sync()

    def _sync(self) -> None:
        f = self.form
        opts = [(s["label"], s["id"]) for s in f.sizes()]
        if list(self.size.options) != opts:
            self.size.options = opts
        self.size.value = f.size_id
        self.count.max = f.max_count()
        self.count.value = f.count
        self.walltime.max = int(f._part()["max_walltime_minutes"])
        self.walltime.value = f.walltime_minutes
        self.cost.value = html.escape(f.summary())
        self.queue.value = "Queue: " + html.escape(f.queue_text())

    # -- actions ----------------------------------------------------------------------------
    def start(self, wait: bool = False) -> None:
        """Submit the request; progress shows below. ``wait=True`` blocks until ready."""
        if self.handle is not None or (self._thread and self._thread.is_alive()):
            self.error.value = _error("a session is already running: stop it first")
            return
        self.error.value = ""
        self.start_button.disabled = True
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if wait:
            self._thread.join()

    def _run(self) -> None:
        from .client import _kernel_id

        try:
            self.session = info = self.portal.create(self.form.request(), _kernel_id())
            self.stop_button.disabled = False
            self._show(info)
            info = self.portal.wait(info["id"], on_update=self._show)
            self.handle = handle_for(self.portal, info)
            self._show(info)
        except Exception as e:
            self.error.value = _error(str(e))
            self.start_button.disabled = False
            if self.session is not None:
                self.stop()

    def _show(self, info: dict[str, Any]) -> None:
        self.session = info
        self.progress.max = max(1, int(info["workers_total"]))
        self.progress.value = int(info["workers_up"])
        q = info.get("queue") or {}
        extra = f" (reason {q['reason']}, position {q['position']})" if q else ""
        self.status.value = (
            f"<b>{html.escape(info['state'])}</b>: {html.escape(info['message'])}"
            + html.escape(extra)
        )

    def stop(self) -> None:
        """Stop the session and release every job."""
        if self.handle is not None:
            self.handle.close()
            self.handle = None
        elif self.session is not None:
            try:
                self._show(self.portal.stop(self.session["id"]))
            except PortalError as e:
                self.error.value = _error(str(e))
        if self.session is not None:
            with contextlib.suppress(PortalError):
                self._show(self.portal.get(self.session["id"]))
        self.stop_button.disabled = True
        self.start_button.disabled = False


def _error(msg: str) -> str:
    return f'<span style="color:#b00020">{html.escape(msg)}</span>'
