"""The ``sovereign-portal`` console script.

Subcommands:
- ``catalog``: what a site offers per partition (accelerators, MIG profiles, sizes and
  their scheduler arguments);
- ``site-schema``: the JSON schema of the site file;
- ``up``: run the portal on its embedded default (hub, proxy, local IdP, local backend);
- ``job-script`` (with the Slurm backend): print the batch script a spawn would submit.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from sovereign_portal.spawners.catalog import ACCELERATORS
from sovereign_portal.spawners.site import Partition, Site, SiteError, load_site, site_schema
from sovereign_portal.spawners.sizes import partition_sizes


def catalog_data(site: Site) -> dict[str, Any]:
    """Everything ``catalog --json`` prints: the hardware tables and each partition's offer."""
    used = sorted({nt.accelerator for p in site.partitions for nt in p.nodes})
    return {
        "site": site.name,
        "accelerators": {a: ACCELERATORS[a].to_json() for a in ACCELERATORS},
        "mig_tables": {
            a: {p.name: p.max_count for p in ACCELERATORS[a].mig_profiles} for a in ACCELERATORS
        },
        "accelerators_in_use": used,
        "partitions": [_partition_data(p) for p in site.partitions],
    }


def _partition_data(p: Partition) -> dict[str, Any]:
    nts = {nt.name: nt for nt in p.nodes}
    return {
        "name": p.name,
        "backend": p.backend,
        "jurisdiction": p.jurisdiction.model_dump(),
        "carbon_g_per_kwh": p.carbon_g_per_kwh,
        "max_walltime_minutes": p.max_walltime_minutes,
        "node_types": [
            {
                "name": nt.name,
                "accelerator": nt.accelerator,
                "gpus": nt.gpus,
                "count": nt.count,
                "whole_gpus": nt.whole_gpus,
                "mig": [layout.model_dump() for layout in nt.mig],
            }
            for nt in p.nodes
        ],
        "sizes": [
            {
                **s.to_json(nts[s.node_type]),
                "eur_per_hour": round(p.price(s.accelerator, s.slice) * (s.total_gpus or 1), 4),
            }
            for s in partition_sizes(p)
        ],
    }


def print_catalog(site: Site, out: Any = sys.stdout) -> None:
    w = out.write
    w(f"{site.name}\n")
    for p in site.partitions:
        j = p.jurisdiction
        certs = ", ".join(j.certifications) or "none"
        w(f"\npartition {p.name} [{p.backend}] — {j.country}, {j.operator} (certified: {certs})\n")
        w(f"  carbon {p.carbon_g_per_kwh:g} gCO₂/kWh, max walltime {p.max_walltime_minutes} min\n")
        for nt in p.nodes:
            acc = ACCELERATORS[nt.accelerator]
            w(
                f"  nodes {nt.name}: {nt.count} × {nt.gpus} {acc.model} "
                f"({acc.memory_gb} GB, {acc.tdp_w} W, {acc.cuda_arch}, "
                f"NVLink {acc.nvlink_gb_s} GB/s)\n"
            )
            for layout in nt.mig:
                w(f"    MIG on GPU {layout.gpus}: {' + '.join(layout.profiles)}\n")
        w("  sizes:\n")
        nts = {nt.name: nt for nt in p.nodes}
        for s in partition_sizes(p):
            price = p.price(s.accelerator, s.slice) * (s.total_gpus or 1)
            args = " ".join(s.slurm_args(nts[s.node_type]))
            w(f"    {s.id:<16} {s.label:<48} €{price:>7.2f}/h  {args}\n")
    w("\nMIG profiles (most instances per GPU):\n")
    for a in ACCELERATORS.values():
        w(f"  {a.name}: " + ", ".join(f"{p.name} ×{p.max_count}" for p in a.mig_profiles) + "\n")


def _cmd_catalog(args: argparse.Namespace) -> int:
    site = load_site(args.site)
    if args.json:
        json.dump(catalog_data(site), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print_catalog(site)
    return 0


def _cmd_schema(args: argparse.Namespace) -> int:
    json.dump(site_schema(), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def _cmd_up(args: argparse.Namespace) -> int:
    from .up import run_up

    return run_up(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sovereign-portal",
        description="A Jupyter-native research portal for sovereign GPU clusters.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("catalog", help="show what a site offers per partition")
    p.add_argument("--site", metavar="FILE", help="site file (default: the embedded example)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_catalog)

    p = sub.add_parser("site-schema", help="print the JSON schema of the site file")
    p.set_defaults(func=_cmd_schema)

    p = sub.add_parser("up", help="run the portal on its embedded default")
    p.add_argument("--site", metavar="FILE", help="site file (default: the embedded example)")
    p.add_argument("--ip", default="127.0.0.1", help="address the proxy listens on")
    p.add_argument("--port", type=int, default=8000, help="port the proxy listens on")
    p.add_argument("--state-dir", default=".run", help="database, secrets and logs (0700)")
    p.add_argument(
        "--dev-login",
        action="store_true",
        help="use a labelled development login instead of the local OIDC IdP",
    )
    p.set_defaults(func=_cmd_up)

    for hook in _plugin_parsers():
        hook(sub)
    return parser


def _plugin_parsers() -> list[Callable[[Any], None]]:
    """Subcommands contributed by backends (imported lazily, optional)."""
    hooks: list[Callable[[Any], None]] = []
    try:
        from sovereign_portal.spawners.slurm.cli import add_parser
    except ImportError:
        pass
    else:
        hooks.append(add_parser)
    return hooks


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except SiteError as e:
        print(f"sovereign-portal: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
