"""``sovereign-portal course``: courses in the portal database, for operators and scripts.

- ``course create FILE``: a course from a JSON file (the fields of ``POST api/courses``);
- ``course list``: every course, its state and dates;
- ``course show ID``: one course, its roster changes and its audit trail;
- ``course edit ID FILE``: change fields (a partial JSON object, as ``PATCH``);
- ``course roster ID [--add-csv FILE] [--add ID ...] [--remove ID ...]``: roster changes
  by institutional identifier. From the CLI they take effect at each student's next login;
  through the portal service (``POST api/courses/<id>/roster``) a removal is at once.

Every command takes ``--db URL`` (default ``<state-dir>/portal.sqlite``) and ``--json``;
``create`` and ``edit`` check sizes against ``--site`` (default: the embedded example) and
images against ``--images`` (the allow-list; without it a course names no image). Bad input
is an error that names the field (a roster file: the row), exit 2, and nothing changes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .courses import CourseError


def _store(args: argparse.Namespace) -> Any:
    from .cli import CLIError, _db_url
    from .course_store import CourseStore
    from .store import PortalStore, redact_url

    url = _db_url(args)
    try:
        store = PortalStore(url)
        store.upgrade()
    except Exception as e:
        raise CLIError(f"--db: cannot open {redact_url(url)}: {type(e).__name__}: {e}") from None
    return CourseStore(store)


def _offer(args: argparse.Namespace) -> Any:
    from sovereign_portal.spawners.images import load_image_allow_list
    from sovereign_portal.spawners.site import load_site

    from .cli import CLIError
    from .course_store import site_offer

    site = load_site(args.site)
    images = None
    if args.images:
        try:
            images = [i.name for i in load_image_allow_list(args.images).images]
        except Exception as e:
            raise CLIError(f"--images: {e}") from None
    return site_offer(site, images, args.data_root or "")


def _read_json(path: str, option: str) -> Any:
    from sovereign_portal.spawners.errors import PortalError
    from sovereign_portal.spawners.strict import loads_json

    from .cli import CLIError

    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise CLIError(f"{option}: cannot read {path}: {e.strerror}") from None
    try:
        return loads_json(data, what=path)
    except PortalError as e:
        raise CLIError(f"{option}: {e}") from None


def _fail(e: CourseError) -> Any:
    from .cli import CLIError

    return CLIError(str(e))


def _out(args: argparse.Namespace, data: Any, text: str) -> None:
    if args.json:
        json.dump(data, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        print(text)


def cmd_create(args: argparse.Namespace) -> int:
    raw = _read_json(args.file, "FILE")
    cs = _store(args)
    try:
        c = cs.create(raw, _offer(args), f"cli:{args.actor}")
    except CourseError as e:
        raise _fail(e) from None
    _out(args, c.to_json(), f"created {c.id}: {c.title} ({c.start} to {c.end})")
    return 0


def cmd_edit(args: argparse.Namespace) -> int:
    raw = _read_json(args.file, "FILE")
    cs = _store(args)
    try:
        c = cs.update(args.id, raw, _offer(args), f"cli:{args.actor}", operator=True)
    except CourseError as e:
        raise _fail(e) from None
    _out(args, c.to_json(), f"changed {c.id}: {', '.join(sorted(raw)) or 'nothing'}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    rows = [{**c.to_json(), "state": state} for c, state in _store(args).rows()]
    lines = [f"{'ID':<24} {'STATE':<8} {'START':<10} {'END':<10}  TITLE"]
    lines += [
        f"{r['id']:<24} {r['state']:<8} {r['start']:<10} {r['end']:<10}  {r['title']}" for r in rows
    ]
    from sovereign_portal.spawners.strict import printable

    _out(args, {"courses": rows}, printable("\n".join(lines)))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    cs = _store(args)
    try:
        c = cs.get(args.id)
        data = {
            **c.to_json(),
            "state": cs.state(args.id),
            "roster": cs.roster(args.id),
            "audit": cs.audit_events(args.id),
        }
    except CourseError as e:
        raise _fail(e) from None
    from sovereign_portal.spawners.strict import printable

    _out(args, data, printable(json.dumps(data, indent=2, default=str), keep_newlines=True))
    return 0


def cmd_roster(args: argparse.Namespace) -> int:
    from .cli import CLIError
    from .courses import parse_roster_csv

    add = list(args.add or [])
    if args.add_csv:
        try:
            data = Path(args.add_csv).read_bytes()
        except OSError as e:
            raise CLIError(f"--add-csv: cannot read {args.add_csv}: {e.strerror}") from None
        try:
            add += parse_roster_csv(data)
        except CourseError as e:
            raise CLIError(f"--add-csv: {e}") from None
    if not add and not args.remove:
        raise CLIError("give --add, --add-csv or --remove")
    cs = _store(args)
    try:
        done = cs.change_roster(args.id, add, list(args.remove or []), f"cli:{args.actor}")
    except CourseError as e:
        raise _fail(e) from None
    _out(
        args,
        done,
        f"{args.id}: {len(done['added'])} added, {len(done['removed'])} removed "
        "(in effect at each student's next login)",
    )
    return 0


def add_parsers(sub: Any) -> None:
    """Add ``course create|list|show|edit|roster`` to the ``sovereign-portal`` parser."""
    from .cli import _add_db_args

    p = sub.add_parser("course", help="courses that instructors run")
    csub = p.add_subparsers(dest="course_command", required=True, metavar="ACTION")

    def common(q: argparse.ArgumentParser, offer: bool = False) -> None:
        q.add_argument("--json", action="store_true", help="JSON output for scripts")
        q.add_argument("--actor", default="operator", help="who acts, for the audit log")
        if offer:
            q.add_argument("--site", metavar="FILE", help="site file (default: the example)")
            q.add_argument("--images", metavar="FILE", help="the image allow-list (TOML)")
            q.add_argument("--data-root", metavar="DIR", help="where course data must lie")
        _add_db_args(q)

    c = csub.add_parser("create", help="create a course from a JSON file")
    c.add_argument("file", metavar="FILE", help="the course as JSON (see run-a-course.md)")
    common(c, offer=True)
    c.set_defaults(func=cmd_create)

    e = csub.add_parser("edit", help="change fields of a course (a partial JSON object)")
    e.add_argument("id", metavar="ID")
    e.add_argument("file", metavar="FILE", help="the fields to change, as JSON")
    common(e, offer=True)
    e.set_defaults(func=cmd_edit)

    ls = csub.add_parser("list", help="every course and its state")
    common(ls)
    ls.set_defaults(func=cmd_list)

    sh = csub.add_parser("show", help="one course, its roster changes and audit trail")
    sh.add_argument("id", metavar="ID")
    common(sh)
    sh.set_defaults(func=cmd_show)

    r = csub.add_parser("roster", help="add or remove students by institutional identifier")
    r.add_argument("id", metavar="ID")
    r.add_argument("--add", nargs="+", metavar="IDENTIFIER", help="e.g. alice@uni-a.example")
    r.add_argument("--add-csv", metavar="FILE", help="a CSV file with an identifier column")
    r.add_argument("--remove", nargs="+", metavar="IDENTIFIER")
    common(r)
    r.set_defaults(func=cmd_roster)
