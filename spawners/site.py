"""The site file: which partitions a deployment offers, where they are, what they cost.

A site file is TOML. It is validated by the pydantic models below, in strict mode (no
string or bool where a number belongs; TOML integers are fine for decimal fields), whose
JSON schema is published in the docs (``sovereign-portal site-schema``). Free text is
bounded and holds no control or format characters. A wrong or unreadable file fails with
one message naming the file, the key path and the reason.
"""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .catalog import ACCELERATORS, GPUS_PER_HGX_NODE, LayoutError, accelerator, check_layout
from .errors import ConfigError
from .strict import control_character, printable


def _no_control(value: str) -> str:
    ch = control_character(value)
    if ch is not None:
        raise ValueError(f"text may not hold the control or format character {ch!a}")
    return value


#: Free text: bounded, with no control or format characters (see ``strict.printable``).
Label = Annotated[str, Field(min_length=1, max_length=128), AfterValidator(_no_control)]
Certification = Annotated[str, Field(min_length=1, max_length=64), AfterValidator(_no_control)]
Line = Annotated[str, Field(max_length=256), AfterValidator(_no_control)]


Name = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$")]
SlurmWord = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
AcceleratorName = Literal["h100", "h200", "b200"]


class SiteError(ConfigError, ValueError):
    """A site file that cannot be used. The message names the file, the key and the reason."""

    def __init__(self, message: str) -> None:
        super().__init__(
            "the site's configuration is broken; the operators have been told",
            log_message=message,
        )
        self.args = (message,)

    def __str__(self) -> str:
        return self.log_message


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Jurisdiction(_Strict):
    """Where a partition runs, legally."""

    country: Annotated[str, Field(pattern=r"^[A-Z]{2}$", description="ISO 3166-1 alpha-2")]
    operator: Label = Field(description="the legal entity that runs the hardware")
    certifications: Annotated[list[Certification], Field(max_length=32)] = Field(
        [], description="certifications held, e.g. ISO27001, HDS, SecNumCloud"
    )


class MigLayout(_Strict):
    """GPUs of a node type that run in MIG mode, and the instances on each of them."""

    gpus: Annotated[list[Annotated[int, Field(ge=0, le=7)]], Field(min_length=1, max_length=8)] = (
        Field(description="GPU indices on each node that carry this layout")
    )
    profiles: Annotated[
        list[Annotated[str, Field(max_length=32)]], Field(min_length=1, max_length=64)
    ] = Field(description="MIG profiles on each of those GPUs, e.g. ['3g.40gb', '3g.40gb']")


class NodeType(_Strict):
    """A kind of node in a partition: one accelerator model, a GPU count, maybe MIG."""

    name: Name = Field(description="a short name for this kind of node")
    accelerator: AcceleratorName = Field(description="the GPU model: h100, h200 or b200")
    gpus: Annotated[int, Field(ge=1, le=GPUS_PER_HGX_NODE)] = Field(
        GPUS_PER_HGX_NODE, description="GPUs per node"
    )
    count: Annotated[int, Field(ge=1, le=100_000)] = Field(1, description="nodes of this type")
    gres_type: SlurmWord | None = Field(
        None, description="Slurm GRES type of whole GPUs; defaults to the accelerator name"
    )
    mig: Annotated[list[MigLayout], Field(max_length=8)] = Field(
        [], description="GPUs in MIG mode; the others are whole"
    )
    features: Annotated[list[SlurmWord], Field(max_length=32)] = Field(
        [], description="Slurm node features; a size on this node type adds --constraint"
    )

    @model_validator(mode="after")
    def _check_mig(self) -> NodeType:
        acc = accelerator(self.accelerator)
        seen: set[int] = set()
        for layout in self.mig:
            for g in layout.gpus:
                if g >= self.gpus:
                    raise ValueError(f"MIG GPU index {g} is outside 0..{self.gpus - 1}")
                if g in seen:
                    raise ValueError(f"GPU {g} appears in two MIG layouts")
                seen.add(g)
            try:
                check_layout(acc, layout.profiles)
            except LayoutError as e:
                raise ValueError(str(e)) from None
        return self

    @property
    def slurm_gres_type(self) -> str:
        return self.gres_type or self.accelerator

    def slice_gres_type(self, profile: str) -> str:
        return f"{self.slurm_gres_type}_{profile}"

    @property
    def mig_gpus(self) -> list[int]:
        return sorted(g for layout in self.mig for g in layout.gpus)

    @property
    def whole_gpus(self) -> list[int]:
        mig = set(self.mig_gpus)
        return [g for g in range(self.gpus) if g not in mig]

    def slices_per_node(self) -> dict[str, int]:
        """Each MIG profile on one node of this type, with its instance count."""
        out: dict[str, int] = {}
        for layout in self.mig:
            for p in layout.profiles:
                out[p] = out.get(p, 0) + len(layout.gpus)
        return out


class Partition(_Strict):
    """Where sizes run: a Slurm partition or the local box."""

    name: Name = Field(description="the portal's name for this partition")
    backend: Literal["local", "slurm"] = Field(
        description="'local': one box run by LocalGPUSpawner; 'slurm': a Slurm partition"
    )
    description: Line = Field("", description="one line shown to users")
    jurisdiction: Jurisdiction = Field(description="where the hardware is, legally")
    nodes: Annotated[list[NodeType], Field(min_length=1, max_length=64)] = Field(
        description="the node types of this partition"
    )
    price_eur_per_gpu_hour: dict[str, Annotated[float, Field(ge=0, le=10_000)]] = Field(
        description="€ per GPU-hour by accelerator ('h100'); a slice ('h100:3g.40gb') may "
        "have its own price, else it pays its share of compute slices (N/7)"
    )
    carbon_g_per_kwh: Annotated[float, Field(ge=0, le=2000)] = Field(
        description="grid carbon intensity where the partition runs, in gCO₂/kWh"
    )
    pue: Annotated[float, Field(ge=1.0, le=3.0)] = Field(
        1.2, description="the data centre's power usage effectiveness, for energy estimates"
    )
    max_walltime_minutes: Annotated[int, Field(ge=1, le=43_200)] = Field(
        24 * 60, description="the longest walltime a request may ask for"
    )
    default_walltime_minutes: Annotated[int, Field(ge=1, le=43_200)] = Field(
        60, description="the walltime of a request that names none"
    )
    max_nodes: Annotated[int, Field(ge=1, le=100_000)] | None = Field(
        None, description="the most nodes one request may span (default: all of a type)"
    )
    slurm_partition: SlurmWord | None = Field(
        None, description="the Slurm partition name, if it differs from name"
    )
    account: SlurmWord | None = Field(None, description="the Slurm account jobs are charged to")
    qos: SlurmWord | None = Field(None, description="the Slurm QOS of jobs on this partition")
    allowed_groups: Annotated[list[Label], Field(max_length=1024)] = Field(
        [], description="groups that may use this partition; empty means everyone"
    )

    @field_validator("price_eur_per_gpu_hour")
    @classmethod
    def _price_keys(cls, v: dict[str, float]) -> dict[str, float]:
        for key in v:
            acc_name, _, prof = key.partition(":")
            acc = accelerator(acc_name) if acc_name in ACCELERATORS else None
            if acc is None:
                raise ValueError(f"price key {key!r}: unknown accelerator {acc_name!r}")
            if prof:
                try:
                    acc.profile(prof)
                except KeyError as e:
                    raise ValueError(f"price key {key!r}: {e.args[0]}") from None
        return v

    @model_validator(mode="after")
    def _check(self) -> Partition:
        names = [n.name for n in self.nodes]
        if len(set(names)) != len(names):
            raise ValueError(f"node type names must be unique, got {names}")
        for n in self.nodes:
            if n.accelerator not in self.price_eur_per_gpu_hour:
                raise ValueError(
                    f"no price for {n.accelerator!r}: add "
                    f"price_eur_per_gpu_hour.{n.accelerator} = <€ per GPU-hour>"
                )
        if self.default_walltime_minutes > self.max_walltime_minutes:
            raise ValueError("default_walltime_minutes is above max_walltime_minutes")
        if self.backend == "local" and sum(n.count for n in self.nodes) != 1:
            raise ValueError("a local partition is one box: exactly one node (count = 1)")
        return self

    @property
    def scheduler_partition(self) -> str:
        return self.slurm_partition or self.name

    def price(self, acc: str, profile: str | None = None) -> float:
        """€ per hour of one GPU of ``acc``, or of one ``profile`` slice of it."""
        base = self.price_eur_per_gpu_hour[acc]
        if profile is None:
            return base
        own = self.price_eur_per_gpu_hour.get(f"{acc}:{profile}")
        if own is not None:
            return own
        return round(base * accelerator(acc).profile(profile).compute_slices / 7, 4)

    def node_type(self, name: str) -> NodeType:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)


class Site(_Strict):
    """A whole deployment."""

    name: Label = Field(description="the deployment's name, shown on pages")
    description: Line = Field("", description="one line about the deployment")
    partitions: Annotated[list[Partition], Field(min_length=1, max_length=256)] = Field(
        description="where sizes run"
    )

    @model_validator(mode="after")
    def _unique(self) -> Site:
        names = [p.name for p in self.partitions]
        if len(set(names)) != len(names):
            raise ValueError(f"partition names must be unique, got {names}")
        return self

    def partition(self, name: str) -> Partition:
        for p in self.partitions:
            if p.name == name:
                return p
        allowed = ", ".join(p.name for p in self.partitions)
        raise KeyError(f"no partition {name!r}; this site has: {allowed}")


def _loc(loc: tuple[Any, ...], data: Any) -> str:
    """Render a pydantic error location as a TOML-ish key path, with names where known."""
    parts: list[str] = []
    node = data
    for item in loc:
        if isinstance(item, int):
            label = ""
            if isinstance(node, list) and 0 <= item < len(node) and isinstance(node[item], dict):
                nm = node[item].get("name")
                label = f" (name={nm!r})" if nm else ""
            parts[-1:] = [f"{parts[-1] if parts else ''}[{item}]{label}"]
        else:
            parts.append(str(item))
        try:
            node = node[item]
        except (KeyError, IndexError, TypeError):
            node = None
    return ".".join(parts) or "<top level>"


def parse_site(data: Any, source: str = "<site>") -> Site:
    try:
        return Site.model_validate(data)
    except ValidationError as e:
        lines = [f"{printable(source)}: invalid site file"]
        for err in e.errors()[:20]:
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"  {printable(_loc(err['loc'], data))}: {printable(msg)}")
        if e.error_count() > 20:
            lines.append(f"  and {e.error_count() - 20} more problem(s)")
        raise SiteError("\n".join(lines)) from None


def load_site(path: str | Path | None = None) -> Site:
    """Load and validate a site file; ``None`` loads the embedded example (8 × H100 box)."""
    if path is None:
        text = resources.files(__package__).joinpath("sites/example.toml").read_text()
        return parse_site(tomllib.loads(text), "example.toml")
    p = Path(path)
    shown = printable(str(p))
    try:
        data = tomllib.loads(p.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise SiteError(f"{shown}: site file not found") from None
    except IsADirectoryError:
        raise SiteError(f"{shown}: is a directory, not a site file") from None
    except PermissionError:
        raise SiteError(f"{shown}: cannot read the site file (permission denied)") from None
    except OSError as e:
        raise SiteError(f"{shown}: cannot read the site file ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise SiteError(f"{shown}: not UTF-8 text (byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise SiteError(f"{shown}: not valid TOML: {printable(str(e))}") from None
    return parse_site(data, str(p))


def site_schema() -> dict[str, Any]:
    return Site.model_json_schema()
