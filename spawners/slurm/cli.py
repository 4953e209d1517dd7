"""``sovereign-portal job-script``: print the exact Slurm job a server of a size would be.

The lead's ``hub/cli.py`` registers it with :func:`add_parser`. Nothing is submitted.
The JupyterHub variables (``JUPYTERHUB_*``, all non-secret) that a real spawn adds to the
``export`` lines are left out; everything else is what ``sbatch`` receives on stdin.
"""

from __future__ import annotations

import argparse
import os
import pwd
import sys
from typing import Any

from ..request import RequestError, parse_request, request_from_size_id, resolve
from ..site import SiteError, load_site
from .jobscript import JobScriptError, JobSpec, make_tag, render_script, sbatch_argv


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "job-script",
        help="print the Slurm job script of a notebook server (nothing is submitted)",
        description="Print the sbatch argv and the job script that SlurmGPUSpawner would "
        "submit for USER and SIZE. Example: sovereign-portal job-script --user alice "
        "--size h100:3g.40gb --site /etc/sovereign-portal/site.toml",
    )
    p.add_argument("--user", required=True, help="Unix account the job runs as")
    p.add_argument("--size", required=True, help="a size id: h100:3g.40gb, h100x2, b200x8")
    p.add_argument("--partition", help="partition name from the site file (default: first)")
    p.add_argument("--walltime", type=int, help="minutes (default: the partition's default)")
    p.add_argument("--site", help="site file (default: the embedded example)")
    p.add_argument("--python", default=sys.executable, help="interpreter the job runs")
    p.set_defaults(func=job_script_command)
    return p


def job_script_command(args: argparse.Namespace) -> int:
    try:
        site = load_site(args.site)
        extra: dict[str, Any] = {}
        if args.partition:
            extra["partition"] = args.partition
        if args.walltime:
            extra["walltime_minutes"] = args.walltime
        req = parse_request(request_from_size_id(args.size, **extra))
        slurm = [p.name for p in site.partitions if p.backend == "slurm"]
        resolved = resolve(site, req, default_partition=slurm[0] if slurm else None)
        pw = pwd.getpwnam(args.user)
    except (SiteError, RequestError) as e:
        print(f"job-script: {e}", file=sys.stderr)
        return 2
    except KeyError:
        print(f"job-script: no Unix account {args.user!r}", file=sys.stderr)
        return 2
    tag = make_tag(b"preview", "0" * 12)
    env = {
        "HOME": pw.pw_dir,
        "USER": args.user,
        "PATH": f"{os.path.dirname(args.python)}:/usr/local/bin:/usr/bin:/bin",
    }
    if os.environ.get("SLURM_CONF"):
        env["SLURM_CONF"] = os.environ["SLURM_CONF"]
    try:
        spec = JobSpec(
            resolved=resolved,
            unix_user=args.user,
            tag=tag,
            home=pw.pw_dir,
            python=args.python,
            token_file=f"{pw.pw_dir}/.sovereign-portal/tokens/{tag}",
            output=f"{pw.pw_dir}/.sovereign-portal/logs/slurm-%j.log",
            env=env,
        )
    except JobScriptError as e:
        print(f"job-script: {e}", file=sys.stderr)
        return 2
    print("# argv: runuser -u " + args.user + " -- " + " ".join(sbatch_argv(spec)) + " < script")
    print(render_script(spec), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="sovereign-portal")
    add_parser(ap.add_subparsers(dest="command", required=True))
    args = ap.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
