"""``sovereign-portal job-script``: print the exact Slurm job a server of a size would be.

The lead's ``hub/cli.py`` registers it with :func:`add_parser`. Nothing is submitted.

It builds a :class:`~.spawner.SlurmGPUSpawner` with the hub's configuration (``--config``
reads ``jupyterhub_config.py``) and a stand-in for the hub user and their groups, validates
the request as a spawn would (partitions open to those groups, residency, walltime, image),
and prints :meth:`~.spawner.SlurmGPUSpawner.render_job`'s output: the same method ``start``
submits. Two things differ from a real spawn, and the output says so: the tag (and the token
file named after it) is the fixed preview tag, and JupyterHub's per-server ``JUPYTERHUB_*``
variables (user, URLs, OAuth client id; never a token) are added only at spawn time.
"""

from __future__ import annotations

import argparse
import sys
from types import SimpleNamespace
from typing import Any

from ..request import RequestError, parse_request, request_from_size_id
from ..site import SiteError
from .jobscript import JobScriptError


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "job-script",
        help="print the Slurm job script of a notebook server (nothing is submitted)",
        description="Print the submit argv and the job script that SlurmGPUSpawner would "
        "submit for USER and SIZE, exactly as a spawn renders it. Example: sovereign-portal "
        "job-script --config /etc/jupyterhub/jupyterhub_config.py --user alice "
        "--group course-ml101 --size h100:3g.40gb --image ml101",
    )
    p.add_argument(
        "--user",
        required=True,
        help="hub user name (its Unix account must exist and not be a system account: "
        "UnixAccountPolicy)",
    )
    p.add_argument("--size", required=True, help="a size id: h100:3g.40gb, h100x2, b200x8")
    p.add_argument(
        "--partition", help="partition name (default: the first Slurm one open to the user)"
    )
    p.add_argument("--walltime", type=int, help="minutes (default: the partition's default)")
    p.add_argument(
        "--image",
        help="image name from the image allow-list (default: the "
        "user's course image, else the list's default, else none)",
    )
    p.add_argument(
        "--group",
        action="append",
        default=[],
        help="a hub group of the user (repeatable): groups open partitions, residency "
        "rules and images, as at spawn time",
    )
    p.add_argument(
        "--config",
        help="the hub's jupyterhub_config.py (c.SlurmGPUSpawner.*, "
        "c.Spawner.*); default: built-in defaults",
    )
    p.add_argument("--site", help="site file (overrides the config's site_file)")
    p.add_argument("--python", help="interpreter the job runs (overrides the config)")
    p.set_defaults(func=job_script_command)
    return p


def _config(args: argparse.Namespace) -> Any:
    from traitlets.config import Config
    from traitlets.config.loader import PyFileConfigLoader

    cfg = Config()
    if args.config:
        cfg = PyFileConfigLoader(args.config).load_config()
    if args.site:
        cfg.SlurmGPUSpawner.site_file = args.site
    if args.python:
        cfg.SlurmGPUSpawner.python = args.python
    return cfg


def job_script_command(args: argparse.Namespace) -> int:
    from tornado import web

    from .spawner import PREVIEW_TAG, SlurmGPUSpawner

    def fail(message: str) -> int:
        print(f"job-script: {message}", file=sys.stderr)
        return 2

    groups = [SimpleNamespace(name=g) for g in args.group]
    try:
        spawner = SlurmGPUSpawner(
            config=_config(args), user=SimpleNamespace(name=args.user, groups=groups)
        )
        try:
            spawner.account()  # a system account has no job to preview, as it has no spawn
        except web.HTTPError as e:
            return fail(str(getattr(e, "message", "") or e.log_message))
        site = spawner.site
        slurm = [p.name for p in site.partitions if p.backend == "slurm"]
        if not slurm:
            kinds = ", ".join(f"{p.name} ({p.backend})" for p in site.partitions)
            return fail(
                f"this site has no Slurm partition (it has: {kinds}); job-script shows Slurm "
                "jobs only, and a local partition's servers are processes on the box"
            )
        named = {p.name: p for p in site.partitions}
        if args.partition in named and named[args.partition].backend != "slurm":
            return fail(
                f"partition {args.partition!r} is a {named[args.partition].backend} one, not "
                f"Slurm; the Slurm partitions are: {', '.join(slurm)}"
            )
        extra: dict[str, Any] = {}
        if args.partition:
            extra["partition"] = args.partition
        if args.walltime:
            extra["walltime_minutes"] = args.walltime
        if args.image:
            extra["image"] = args.image
        options = parse_request(request_from_size_id(args.size, **extra)).model_dump(
            exclude_none=True
        )
        resolved = spawner.validate_request(options)
        _, argv, script = spawner.render_job(resolved, PREVIEW_TAG)
    except (SiteError, RequestError, JobScriptError) as e:
        return fail(str(e))
    except web.HTTPError as e:
        message = str(e.log_message or e)
        if "open to you" in message and not args.group:
            message += " (the user's groups decide this at spawn time: pass them with --group)"
        return fail(message)
    except Exception as e:  # config errors (TraitError, ImageError, a missing account...)
        message = getattr(e, "message", None) or str(e)
        return fail(f"{type(e).__name__}: {message}")
    print("# argv: " + " ".join(argv) + " < script")
    print(
        f"# preview: tag {PREVIEW_TAG} (a spawn signs a fresh one); a spawn also exports "
        "JupyterHub's JUPYTERHUB_* variables (user, URLs, OAuth client id; never a token)"
    )
    print(script, end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="sovereign-portal")
    add_parser(ap.add_subparsers(dest="command", required=True))
    args = ap.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
