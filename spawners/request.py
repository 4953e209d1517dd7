"""Requests: a user's typed, bounded ask, validated against the site before anything runs.

The same model serves the spawn form, the REST API (``user_options``) and the compute-
session widget. Unknown fields, wrong types, out-of-range numbers and nested objects
are rejected with a message that says what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .catalog import GPUS_PER_HGX_NODE, accelerator
from .errors import RequestRefused
from .site import NodeType, Partition, Site
from .sizes import GPU_STEPS, Size, max_nodes, partition_sizes, size_eur_per_hour
from .strict import check_json_value, parse_int, shorten

Word = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_.:-]{0,63}$")]

#: Hard upper bounds, whatever the site says; the site narrows them further.
MAX_COUNT = 256
MAX_NODES = 1024
MAX_WALLTIME_MINUTES = 30 * 24 * 60
#: At most this many problems are listed in one RequestError message.
MAX_PROBLEMS = 5


#: A request that cannot be granted (HTTP 400 unless a subclass says otherwise). ``str()``
#: is safe and useful to show the user; ``field`` names the request field.
RequestError = RequestRefused


#: What a user may type as an image name (the request, the allow-list and the form).
ImageName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")]

#: The MIG-and-torch rule, written once (the request model and the widget both use it).
TORCH_ON_SLICES = (
    "multi-GPU torch.distributed needs whole GPUs: MIG slices have no NVLink and no "
    "peer-to-peer access, so NCCL cannot span them. Ask for gpus=2, 4 or 8."
)


def torch_on_slices(kind: str, slice_: str | None, count: int) -> bool:
    """Whether a request asks torch.distributed to span several MIG slices (refused)."""
    return kind == "torch" and bool(slice_) and count > 1


class Request(BaseModel):
    """What a user asks for. Every field is typed and bounded; nothing else is accepted."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    kind: Literal["notebook", "dask", "torch"] = "notebook"
    partition: Word | None = None
    accelerator: Literal["h100", "h200", "b200"] | None = None
    slice: Annotated[str, Field(pattern=r"^[1-7]g\.[0-9]{1,3}gb(\+me)?$")] | None = Field(
        None, description="a MIG profile such as '3g.40gb'"
    )
    gpus: Annotated[int, Field(ge=1, le=GPUS_PER_HGX_NODE)] | None = Field(
        None, description="whole GPUs per node: 1, 2, 4 or 8"
    )
    nodes: Annotated[int, Field(ge=1, le=MAX_NODES)] = 1
    count: Annotated[int, Field(ge=1, le=MAX_COUNT)] = Field(
        1, description="how many of this size (Dask workers per size, or sizes); 1 for notebooks"
    )
    walltime_minutes: Annotated[int, Field(ge=1, le=MAX_WALLTIME_MINUTES)] | None = None
    image: ImageName | None = None


#: Which kinds each field of :class:`Request` is for. A field outside its kinds is refused
#: with a message naming it: a field the portal accepts is a field it enforces.
FIELD_KINDS: dict[str, frozenset[str]] = {
    "kind": frozenset({"notebook", "dask", "torch"}),
    "partition": frozenset({"notebook", "dask", "torch"}),
    "accelerator": frozenset({"notebook", "dask", "torch"}),
    "slice": frozenset({"notebook", "dask", "torch"}),
    "gpus": frozenset({"notebook", "dask", "torch"}),
    # a notebook server runs on one node; a Dask session takes one-node sizes (count jobs)
    "nodes": frozenset({"torch"}),
    "count": frozenset({"dask", "torch"}),
    "walltime_minutes": frozenset({"notebook", "dask", "torch"}),
    # a session's workers and ranks run in the notebook's own environment, not an image
    "image": frozenset({"notebook"}),
}
#: Why a field is refused for a kind (the default of each field is always accepted).
_FIELD_REFUSALS = {
    ("nodes", "notebook"): "a notebook server runs on one node: nodes must be 1 (start a "
    "torch session from the notebook to use several nodes)",
    ("nodes", "dask"): "a Dask session takes one-node sizes, one job each: ask for gpus=8 "
    "with count=N instead of nodes=N",
    ("count", "notebook"): "a notebook server is one size: count must be 1",
    ("image", "dask"): "a Dask session runs in its notebook's image: remove image (choose "
    "the image when you start the notebook server)",
    ("image", "torch"): "a torch session runs in its notebook's image: remove image (choose "
    "the image when you start the notebook server)",
}


def check_fields_for_kind(req: Request) -> None:
    """Refuse a field set away from its default for a kind that does not use it."""
    for name in req.model_fields_set:
        if req.kind in FIELD_KINDS[name]:
            continue
        value = getattr(req, name)
        if value == Request.model_fields[name].default:
            continue  # e.g. nodes=1 or count=1 written out
        raise RequestError(_FIELD_REFUSALS[(name, req.kind)], reason="field_kind", field=name)


def parse_request(data: Any) -> Request:
    """Validate raw user input (a JSON object) into a :class:`Request`.

    ``data`` may come from :func:`~.strict.loads_json` or from another parser (JupyterHub
    parses the REST API's ``user_options``): :func:`~.strict.check_json_value` checks it
    again, so NaN, Infinity, lone surrogates and deep nesting are refused here too. A key
    repeated in the body cannot be seen after another parser: only the portal's own
    bodies refuse it.
    """
    if not isinstance(data, dict):
        raise RequestError(f"a request must be a JSON object, got {type(data).__name__}")
    check_json_value(data, what="the request")
    try:
        req = Request.model_validate(data)
    except ValidationError as e:
        msgs = []
        fields: list[str] = []
        # Untrusted keys are shown cut short, and only the first few problems: the message
        # reaches logs and pages, so its size must not depend on the input's.
        for err in e.errors()[:MAX_PROBLEMS]:
            key = _short(".".join(str(x) for x in err["loc"]) or "request")
            fields.append(key)
            if err["type"] == "extra_forbidden":
                allowed = ", ".join(Request.model_fields)
                msgs.append(f"unknown field {key!r} (allowed: {allowed})")
            else:
                msgs.append(f"{key}: {_short(err['msg'], 200)}")
        if e.error_count() > MAX_PROBLEMS:
            msgs.append(f"and {e.error_count() - MAX_PROBLEMS} more problem(s)")
        raise RequestError("; ".join(msgs), field=fields[0] if fields else None) from None
    check_fields_for_kind(req)
    return req


_short = shorten


def co2_g(energy_wh: float, carbon_g_per_kwh: float) -> float:
    """Grams of CO₂ for an energy, at a grid's carbon intensity."""
    return energy_wh / 1000 * carbon_g_per_kwh


@dataclass(frozen=True)
class Resolved:
    """A request placed on a partition, node type and size, with its walltime."""

    request: Request
    partition: Partition
    node_type: NodeType
    size: Size
    walltime_minutes: int

    @property
    def eur_per_hour(self) -> float:
        """€ per hour for the whole request (all ``count`` copies)."""
        return round(size_eur_per_hour(self.partition, self.size) * self.request.count, 4)

    @property
    def gpu_equivalents(self) -> float:
        """GPUs billed for the whole request: whole GPUs, a slice its compute share (N/7)."""
        return self.size.gpu_fraction * self.request.count

    @property
    def facility_power_w(self) -> float:
        """Power drawn for the whole request: board power at TDP × the partition's PUE.

        The energy model of estimates and of the ledger (until measured energy lands).
        """
        return self.size.power_w * self.request.count * self.partition.pue

    @property
    def gpu_hours(self) -> float:
        return round(self.gpu_equivalents * self.walltime_minutes / 60, 4)

    @property
    def energy_wh(self) -> float:
        """Energy at TDP and the partition's PUE for the whole walltime, an upper bound."""
        return round(self.facility_power_w * self.walltime_minutes / 60, 1)

    def cost_json(self) -> dict[str, float]:
        hours = self.walltime_minutes / 60
        wh = self.energy_wh
        return {
            "eur_per_hour": self.eur_per_hour,
            "eur_max": round(self.eur_per_hour * hours, 2),
            "gpu_hours_max": self.gpu_hours,
            "energy_wh_max": wh,
            "co2_g_max": round(co2_g(wh, self.partition.carbon_g_per_kwh), 1),
        }


def _size_for(req: Request, part: Partition) -> tuple[NodeType, Size]:
    offered = partition_sizes(part)
    candidates = [nt for nt in part.nodes if req.accelerator in (None, nt.accelerator)]
    if not candidates:
        have = sorted({nt.accelerator for nt in part.nodes})
        raise RequestError(
            f"partition {part.name!r} has no {req.accelerator}; it has: {', '.join(have)}",
            field="accelerator",
        )
    ids = ", ".join(dict.fromkeys(s.id for s in offered))
    if req.slice is not None:
        if req.gpus is not None:
            raise RequestError("ask for either a MIG slice or whole GPUs, not both", field="gpus")
        if req.nodes != 1:
            raise RequestError(
                "a MIG slice lives on one GPU of one node: ask for whole GPUs to span nodes",
                field="nodes",
            )
        if torch_on_slices(req.kind, req.slice, req.count):
            raise RequestError(TORCH_ON_SLICES, field="slice")
        for nt in candidates:
            if req.slice in nt.slices_per_node():
                return nt, Size(nt.name, nt.accelerator, slice=req.slice)
        raise RequestError(
            f"partition {part.name!r} has no MIG slice {req.slice!r}; it offers: {ids}",
            field="slice",
        )
    gpus = req.gpus if req.gpus is not None else 1
    if req.nodes > 1:
        if gpus != GPUS_PER_HGX_NODE:
            raise RequestError(
                f"sizes of several nodes take whole 8-GPU nodes: set gpus=8 (got gpus={gpus})",
                field="gpus",
            )
        if part.backend == "local":
            raise RequestError(
                f"partition {part.name!r} is a single box: nodes must be 1", field="nodes"
            )
    if gpus not in (*GPU_STEPS, GPUS_PER_HGX_NODE):
        raise RequestError(f"gpus must be 1, 2, 4 or 8 on one node (got {gpus})", field="gpus")
    for nt in candidates:
        if gpus <= len(nt.whole_gpus) and req.nodes <= max_nodes(part, nt):
            return nt, Size(nt.name, nt.accelerator, gpus_per_node=gpus, nodes=req.nodes)
    raise RequestError(
        f"partition {part.name!r} cannot give {req.nodes} node(s) × {gpus} whole GPU(s); "
        f"it offers: {ids}",
        field="nodes" if req.nodes > 1 else "gpus",
    )


def resolve(site: Site, req: Request, default_partition: str | None = None) -> Resolved:
    """Place ``req`` on the site, or raise :class:`RequestError` saying what is allowed."""
    name = req.partition or default_partition or site.partitions[0].name
    try:
        part = site.partition(name)
    except KeyError as e:
        raise RequestError(str(e.args[0]), reason="unknown_partition", field="partition") from None
    check_fields_for_kind(req)
    if req.accelerator is not None:
        accelerator(req.accelerator)
    nt, size = _size_for(req, part)
    wall = req.walltime_minutes or part.default_walltime_minutes
    if wall > part.max_walltime_minutes:
        raise RequestError(
            f"walltime {wall} min is over partition {part.name!r}'s limit of "
            f"{part.max_walltime_minutes} min",
            reason="walltime",
            field="walltime_minutes",
        )
    return Resolved(req, part, nt, size, wall)


def request_from_size_id(size_id: str, **extra: Any) -> dict[str, Any]:
    """Turn a form value such as ``h100:3g.40gb`` or ``h100x8x2n`` into request fields.

    The numbers in it are read by :func:`~.strict.parse_int` (canonical ASCII digits only).
    """
    acc, sep, rest = size_id.partition(":")
    if sep:
        return {"accelerator": acc, "slice": rest, **extra}
    parts = size_id.split("x")
    unknown = RequestError(f"unknown size {_short(size_id)!r}", field="size")
    if len(parts) not in (2, 3):
        raise unknown
    try:
        out: dict[str, Any] = {
            "accelerator": parts[0],
            "gpus": parse_int(parts[1], "size", lo=1, hi=GPUS_PER_HGX_NODE),
            **extra,
        }
        if len(parts) == 3:
            if not parts[2].endswith("n"):
                raise unknown
            out["nodes"] = parse_int(parts[2][:-1], "size", lo=2, hi=MAX_NODES)
    except RequestRefused:
        raise unknown from None
    return out
