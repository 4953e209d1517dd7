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


class CLIScheduler(_Strict):
    """A Slurm cluster reached through its command-line tools on the hub's own host."""

    transport: Literal["cli"] = Field(description="'cli': sbatch, squeue... on this host")
    slurm_conf: Annotated[str, Field(pattern=r"^/[^\x00-\x1f]{0,1023}$")] | None = Field(
        None,
        description="the cluster's slurm.conf (SLURM_CONF of the portal's Slurm clients); "
        "default: the hub's own SLURM_CONF",
    )


class RESTScheduler(_Strict):
    """A Slurm cluster reached through its ``slurmrestd`` (JWT, openapi/v0.0.38)."""

    transport: Literal["rest"] = Field(description="'rest': the site's slurmrestd")
    url: Annotated[str, Field(min_length=8, max_length=256)] = Field(
        description="slurmrestd's base URL: https://host:port, or http to a loopback "
        "address only (a tunnel's local end); no credentials in it"
    )
    token_file: Annotated[str, Field(pattern=r"^/[^\x00-\x1f]{0,1023}$")] = Field(
        description="absolute path of the file (mode 0600, the hub's account) holding the "
        "site's JWT; the token is read at each call and sent only in a request header"
    )
    timeout_seconds: Annotated[float, Field(gt=0, le=300)] = Field(
        30.0, description="how long one call may take before the site counts as unreachable"
    )

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        from .slurm.rest import RESTConfigError, check_url

        try:
            return check_url(v)
        except RESTConfigError as e:
            raise ValueError(str(e)) from None


class ClusterSite(_Strict):
    """One Slurm site: its own cluster, run by one operator under one country's law."""

    name: Name = Field(description="the site's short name, e.g. 'paris'; shown on pages")
    description: Line = Field("", description="one line shown to users")
    country: Annotated[str, Field(pattern=r"^[A-Z]{2}$")] = Field(
        description="ISO 3166-1 alpha-2 code of the country whose law governs the site"
    )
    operator: Label = Field(description="the legal entity that runs the site")
    certifications: Annotated[list[Certification], Field(max_length=32)] = Field(
        [], description="certifications the site holds, e.g. ISO27001, HDS, C5"
    )
    scheduler: Annotated[CLIScheduler | RESTScheduler, Field(discriminator="transport")] = Field(
        description="how the hub reaches the site's scheduler: transport = 'cli' or 'rest'"
    )
    accounting: bool = Field(
        False,
        description="whether the site runs Slurm accounting (slurmdbd) that the portal may "
        "read: `sovereign-portal ledger reconcile` then asks it (sacct at a 'cli' site, "
        "slurmrestd's /slurmdb/ at a 'rest' one); false: its records are reported as "
        "'no accounting at this site', never silently skipped",
    )

    @property
    def jurisdiction(self) -> Jurisdiction:
        return Jurisdiction(
            country=self.country, operator=self.operator, certifications=self.certifications
        )


class Partition(_Strict):
    """Where sizes run: a Slurm partition or the local box."""

    name: Name = Field(description="the portal's name for this partition")
    site: Name | None = Field(
        None,
        description="the [[sites]] entry this partition belongs to; its jurisdiction then "
        "comes from that site (a jurisdiction table, if given, must match it)",
    )
    backend: Literal["local", "slurm"] = Field(
        description="'local': one box run by LocalGPUSpawner; 'slurm': a Slurm partition"
    )
    description: Line = Field("", description="one line shown to users")
    jurisdiction: Jurisdiction = Field(
        description="where the hardware is, legally; omit it when `site` is set (the site's)"
    )
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
    sites: Annotated[list[ClusterSite], Field(max_length=64)] = Field(
        [],
        description="the Slurm sites, each its own cluster under its own jurisdiction; "
        "empty: every Slurm partition is on the hub host's cluster (its CLI)",
    )
    partitions: Annotated[list[Partition], Field(min_length=1, max_length=256)] = Field(
        description="where sizes run"
    )

    @model_validator(mode="before")
    @classmethod
    def _site_jurisdictions(cls, data: Any) -> Any:
        """A partition of a declared site takes the site's jurisdiction unless it has one."""
        if not isinstance(data, dict):
            return data
        sites = {s.get("name"): s for s in data.get("sites") or [] if isinstance(s, dict)}
        parts = data.get("partitions")
        if not sites or not isinstance(parts, list):
            return data
        filled = []
        for p in parts:
            if isinstance(p, dict) and isinstance(p.get("site"), str) and p["site"] not in sites:
                raise ValueError(
                    f"partition {p.get('name')!r}: site {p['site']!r} is not declared in "
                    f"[[sites]] (declared: {', '.join(str(n) for n in sites)})"
                )
            if isinstance(p, dict) and "jurisdiction" not in p and p.get("site") in sites:
                s = sites[p["site"]]
                p = {
                    **p,
                    "jurisdiction": {
                        k: s[k] for k in ("country", "operator", "certifications") if k in s
                    },
                }
            filled.append(p)
        return {**data, "partitions": filled}

    @model_validator(mode="after")
    def _unique(self) -> Site:
        names = [p.name for p in self.partitions]
        if len(set(names)) != len(names):
            raise ValueError(f"partition names must be unique, got {names}")
        site_names = [s.name for s in self.sites]
        if len(set(site_names)) != len(site_names):
            raise ValueError(f"site names must be unique, got {site_names}")
        by_name = {s.name: s for s in self.sites}
        for p in self.partitions:
            if p.site is None:
                if self.sites and p.backend == "slurm":
                    raise ValueError(
                        f"partition {p.name!r}: this file declares [[sites]], so a Slurm "
                        f"partition needs site = one of {site_names}"
                    )
                continue
            s = by_name.get(p.site)
            if s is None:
                raise ValueError(
                    f"partition {p.name!r}: site {p.site!r} is not declared in [[sites]] "
                    f"(declared: {', '.join(site_names) or 'none'})"
                )
            if p.backend != "slurm":
                raise ValueError(f"partition {p.name!r}: only a Slurm partition has a site")
            j = p.jurisdiction
            if j.country != s.country or j.operator != s.operator:
                raise ValueError(
                    f"partition {p.name!r}: jurisdiction {j.country}/{j.operator!r} differs "
                    f"from its site {s.name!r} ({s.country}/{s.operator!r}); drop the "
                    "partition's jurisdiction table or make it match"
                )
        return self

    def cluster_site(self, name: str) -> ClusterSite:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(f"no site {name!r}; declared: {', '.join(s.name for s in self.sites)}")

    def site_of(self, partition: Partition | str) -> ClusterSite | None:
        """The declared site of a partition; None for the hub host's own (no [[sites]])."""
        p = self.partition(partition) if isinstance(partition, str) else partition
        return self.cluster_site(p.site) if p.site is not None else None

    def site_name_of(self, partition: Partition | str) -> str:
        """What a ledger record's ``site`` says: the declared site, else the deployment."""
        s = self.site_of(partition)
        return s.name if s is not None else self.name

    def partitions_of(self, site: str) -> list[Partition]:
        return [p for p in self.partitions if p.site == site]

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
