"""The commands and configuration keys that the docs show actually work.

- Every ``sovereign-portal ...`` command line in a shell code block of the docs (and the
  README) parses with the real argument parser; the cheap, read-only ones (``catalog``,
  ``site-schema``, ``job-script``, ``--help``) are run through the installed console script
  and must succeed. Site files the docs only name (``/etc/sovereign-portal/site.toml``) are
  replaced by the page's own ``# site.toml`` example, or by the test cluster's site file;
  ``--user`` by an account that exists here. Output the docs show for an unmodified command
  must appear in the real output.
- Every ``c.<Class>.<trait>`` and ``--<Class>.<trait>=`` in the docs names a configurable
  trait of that class, in sovereign_portal or in the upstream packages it builds on.
- The residency recipe of the course how-to really hands the rule to the portal service, and
  the image allow-list example gives the command the page shows.
"""

from __future__ import annotations

import ast
import json
import os
import pwd
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from traitlets.config import Config, Configurable

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
TEST_SITE = REPO / "tests" / "support" / "sites" / "slurm-test.toml"
CLI = Path(sys.executable).parent / "sovereign-portal"
SHELL_LANGS = {"console", "bash", "shell", "sh", "shell-session"}
RUNNABLE = {"catalog", "site-schema", "job-script"}
FENCE = re.compile(
    r"^(?P<fence>`{3,}|~{3,})(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=fence)[ \t]*$", re.M | re.S
)


def doc_pages() -> list[Path]:
    pages = [p for p in DOCS.rglob("*.md") if "_build" not in p.parts]
    return [*sorted(pages), REPO / "README.md"]


@dataclass
class Command:
    page: Path
    line: int
    argv: list[str]  # after the program name
    shown_output: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}:{' '.join(self.argv)[:60]}"


def _blocks(text: str) -> list[tuple[str, int, str]]:
    """``(language, first line number, body)`` of each fenced code block."""
    out = []
    for m in FENCE.finditer(text):
        lang = m["info"].strip().split()[0] if m["info"].strip() else ""
        out.append((lang, text.count("\n", 0, m.start("body")) + 1, m["body"]))
    return out


def _logical_lines(body: str, console: bool) -> list[tuple[int, str, list[str]]]:
    """``(offset, command line, output lines)``: continuations joined, prompts stripped."""
    out: list[tuple[int, str, list[str]]] = []
    lines = body.splitlines()
    i = 0
    while i < len(lines):
        raw = lines[i]
        start = i
        if console:
            if not raw.startswith("$ "):
                if out:
                    out[-1][2].append(raw)
                i += 1
                continue
            raw = raw[2:]
        while raw.endswith("\\") and i + 1 < len(lines):
            i += 1
            raw = raw[:-1] + " " + lines[i].strip()
        out.append((start, raw, []))
        i += 1
    return out


ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def _portal_invocations(line: str) -> list[list[str]]:
    """The argv (after the program) of each ``sovereign-portal`` call in a shell line.

    Only a word in command position counts: the first of a simple command, after any
    ``NAME=value`` assignments (``cd /opt/sovereign-portal`` is not a call).
    """
    try:
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        words = list(lexer)
    except ValueError:
        return []
    calls: list[list[str]] = []
    current: list[str] | None = None
    at_command = True
    for w in words:
        if w in ("&&", "||", "|", ";", "&"):
            current, at_command = None, True
        elif current is not None:
            current.append(w)
        elif at_command and ASSIGNMENT.match(w):
            continue
        elif at_command:
            at_command = False
            if os.path.basename(w) == "sovereign-portal":
                current = []
                calls.append(current)
    return calls


def doc_commands() -> list[Command]:
    found: list[Command] = []
    for page in doc_pages():
        for lang, lineno, body in _blocks(page.read_text(encoding="utf-8")):
            # A transcript whose output Pygments cannot lex as a console (lines starting
            # with "# " read as root prompts) is fenced as text but still starts with "$ ".
            transcript = lang == "text" and body.lstrip().startswith("$ ")
            if lang not in SHELL_LANGS and not transcript:
                continue
            console = lang == "console" or transcript
            for offset, line, output in _logical_lines(body, console=console):
                for argv in _portal_invocations(line):
                    found.append(Command(page, lineno + offset, argv, output))
    return found


COMMANDS = doc_commands()


def test_the_docs_show_the_commands_worth_checking() -> None:
    """Guard against a parser that silently finds nothing."""
    subcommands = {c.argv[0] for c in COMMANDS if c.argv}
    assert {"catalog", "site-schema", "job-script", "up"} <= subcommands, subcommands
    assert sum(1 for c in COMMANDS if c.argv and c.argv[0] in RUNNABLE) >= 6


def _page_site_example(page: Path, tmp_path: Path) -> Path | None:
    for lang, _, body in _blocks(page.read_text(encoding="utf-8")):
        if lang == "toml" and body.startswith("# site.toml"):
            path = tmp_path / f"{page.stem}-site.toml"
            path.write_text(body, encoding="utf-8")
            return path
    return None


def _prepare(cmd: Command, tmp_path: Path) -> tuple[list[str], bool]:
    """The argv to run here, and whether it had to be changed."""
    argv, changed = list(cmd.argv), False
    for i, word in enumerate(argv[:-1]):
        value = argv[i + 1]
        if word == "--site" and not (REPO / value).exists():
            example = _page_site_example(cmd.page, tmp_path)
            use = example if example is not None and value.endswith("site.toml") else TEST_SITE
            argv[i + 1], changed = str(use), True
        elif word == "--user":
            try:
                pwd.getpwnam(value)
            except KeyError:
                # A personal account: job-script refuses system accounts such as root.
                from tests.support.slurm_cluster import TEST_USERS, ensure_users

                ensure_users(TEST_USERS[:1])
                argv[i + 1], changed = TEST_USERS[0], True
    return argv, changed


@pytest.mark.parametrize("cmd", COMMANDS, ids=[c.id for c in COMMANDS])
def test_doc_command_parses(cmd: Command) -> None:
    from sovereign_portal.hub.cli import build_parser

    parser = build_parser()
    if "--help" in cmd.argv or "-h" in cmd.argv:
        with pytest.raises(SystemExit) as info:
            parser.parse_args(cmd.argv)
        assert info.value.code == 0
        return
    try:
        parser.parse_args(cmd.argv)
    except SystemExit as e:  # argparse's way of refusing
        raise AssertionError(f"{cmd.id}: sovereign-portal refuses these arguments") from e


RUN = [c for c in COMMANDS if c.argv and (c.argv[0] in RUNNABLE or "--help" in c.argv)]


@pytest.mark.parametrize("cmd", RUN, ids=[c.id for c in RUN])
def test_doc_command_runs(cmd: Command, tmp_path: Path) -> None:
    argv, changed = _prepare(cmd, tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "SLURM_CONF"}
    r = subprocess.run(
        [str(CLI), *argv], capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env
    )
    assert r.returncode == 0, f"{cmd.id}\n$ sovereign-portal {shlex.join(argv)}\n{r.stderr}"
    assert r.stdout.strip(), f"{cmd.id}: printed nothing"
    if "--help" in argv:
        assert "usage: sovereign-portal" in r.stdout
    elif argv[0] == "site-schema" or "--json" in argv:
        json.loads(r.stdout)
    elif argv[0] == "job-script":
        assert "#SBATCH --export=NONE" in r.stdout and "API_TOKEN" not in r.stdout
    if not changed:
        shown = [
            line.rstrip()
            for line in cmd.shown_output
            if line.strip() and "..." not in line and "…" not in line
        ]
        real = {line.rstrip() for line in r.stdout.splitlines()}
        missing = [line for line in shown if line not in real]
        assert not missing, f"{cmd.id}: the docs show output the command does not print: {missing}"


# -- configuration keys ------------------------------------------------------------------------
C_KEY = re.compile(r"\bc\.([A-Z][A-Za-z0-9_]*)\.([a-z_][A-Za-z0-9_]*)\b")
CLI_KEY = re.compile(r"--([A-Z][A-Za-z0-9_]*)\.([a-z_][A-Za-z0-9_]*)=")


def _configurable_classes() -> dict[str, list[type[Configurable]]]:
    """Every Configurable class of the portal and of the packages it configures, by name."""
    import importlib

    from sovereign_portal.hub.cli import build_parser  # noqa: F401 - imports the hub side

    for mod in (
        "jupyterhub.app",
        "jupyterhub.spawner",
        "jupyterhub.proxy",
        "jupyterhub.auth",
        "oauthenticator.generic",
        "jupyter_server.serverapp",
        "jupyterlab.labapp",
        "sovereign_portal.hub.auth",
        "sovereign_portal.hub.service",
        "sovereign_portal.hub.course_store",
        "sovereign_portal.hub.gdpr",
        "sovereign_portal.hub.culler",
        "sovereign_portal.spawners.local",
        "sovereign_portal.spawners.slurm.spawner",
        "sovereign_portal.extension.app",
    ):
        importlib.import_module(mod)
    found: dict[str, list[type[Configurable]]] = {}
    todo: list[type[Configurable]] = [Configurable]
    while todo:
        cls = todo.pop()
        found.setdefault(cls.__name__, []).append(cls)
        todo.extend(cls.__subclasses__())
    return found


def _doc_keys() -> list[tuple[str, str, str]]:
    keys = set()
    for page in doc_pages():
        text = page.read_text(encoding="utf-8")
        where = str(page.relative_to(REPO))
        for pattern in (C_KEY, CLI_KEY):
            keys |= {
                (cls, trait, where)
                for cls, trait in pattern.findall(text)
                if cls != "ClassName"  # the config page's "c.ClassName.option = value"
            }
    return sorted(keys)


def test_every_config_key_in_the_docs_exists() -> None:
    classes = _configurable_classes()
    keys = _doc_keys()
    assert len(keys) > 40, "expected the docs to name many options"
    wrong = []
    for cls_name, trait, where in keys:
        candidates = classes.get(cls_name, [])
        if not any(trait in c.class_traits(config=True) for c in candidates):
            why = "no such configurable class" if not candidates else "no such option"
            wrong.append(f"{where}: c.{cls_name}.{trait} ({why})")
    assert not wrong, "the docs name options that do not exist:\n" + "\n".join(wrong)


def test_the_key_check_can_fail() -> None:
    classes = _configurable_classes()
    local = classes["LocalGPUSpawner"]
    assert any("lease_file" in c.class_traits(config=True) for c in local)
    assert not any("lease_files" in c.class_traits(config=True) for c in local)
    assert C_KEY.findall("c.LocalGPUSpawner.lease_file = x") == [("LocalGPUSpawner", "lease_file")]


# -- recipes of the course how-to ------------------------------------------------------------
COURSE = DOCS / "how-to" / "run-a-course.md"


def test_residency_recipe_reaches_spawner_and_service(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sovereign_portal.hub.service import RESIDENCY_ENV, PortalService

    (recipe,) = [b for lang, _, b in _blocks(COURSE.read_text()) if "RESIDENCY =" in b]
    c = Config()
    scope: dict[str, object] = {"c": c}
    exec(compile(recipe, str(COURSE), "exec"), scope)  # noqa: S102 - our own docs
    rules = scope["RESIDENCY"]
    assert c.LocalGPUSpawner.residency == rules
    (svc,) = c.JupyterHub.services
    monkeypatch.setenv(RESIDENCY_ENV, svc["environment"][RESIDENCY_ENV])
    assert PortalService().residency == rules


def test_course_image_allow_list_gives_the_command_shown(tmp_path: Path) -> None:
    from sovereign_portal.spawners.images import load_image_allow_list

    blocks = _blocks(COURSE.read_text())
    (toml_text,) = [b for lang, _, b in blocks if lang == "toml" and "[[images]]" in b]
    path = tmp_path / "images.toml"
    path.write_text(toml_text)
    allow = load_image_allow_list(path)
    (console,) = [b for lang, _, b in blocks if lang == "console" and "load_image_allow_list" in b]
    shown = ast.literal_eval(console.strip().splitlines()[-1])
    assert allow.argv(None, {"course-ml101"}, course="course-ml101") == shown
    assert tomllib.loads(toml_text)["images"][1]["courses"] == ["course-ml101", "instructors-ml101"]


# -- the researcher tutorial calls what exists -------------------------------------------------
TUTORIAL = DOCS / "tutorials" / "one-notebook-to-16-gpus.md"


def test_tutorial_calls_exist_with_those_signatures() -> None:
    import inspect

    from sovereign_portal.extension import GPUSessions, request_session
    from sovereign_portal.extension.client import DaskSession, SessionHandle, TorchSession
    from sovereign_portal.spawners.request import parse_request

    known = {
        "GPUSessions": GPUSessions,
        "request_session": request_session,
        "scale": DaskSession.scale,
        "run": TorchSession.run,
        "run_script": TorchSession.run_script,
        "close": SessionHandle.close,
    }
    methods = {"scale", "run", "run_script", "close"}
    checked: set[str] = set()
    for lang, line, body in _blocks(TUTORIAL.read_text()):
        if lang != "python":
            continue
        for node in ast.walk(ast.parse(body)):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            name = (
                f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
            )
            if name not in known:
                continue
            args: list[object] = [object()] * len(node.args)
            kwargs = {k.arg: object() for k in node.keywords if k.arg}
            if name in methods:
                args = [object(), *args]
            try:
                inspect.signature(known[name]).bind(*args, **kwargs)
            except TypeError as e:
                raise AssertionError(f"{TUTORIAL.name}:{line}: {ast.unparse(node)}: {e}") from None
            if name == "request_session":
                kind = ast.literal_eval(node.args[0]) if node.args else "dask"
                fields = {k.arg: ast.literal_eval(k.value) for k in node.keywords if k.arg}
                parse_request({"kind": kind, **fields})  # the fields are real request fields
            checked.add(name)
    assert checked == set(known), f"the tutorial no longer shows {set(known) - checked}"
    for attr in ("client", "scale", "status", "close"):
        assert hasattr(DaskSession, attr)
    for attr in ("run", "run_script", "close"):
        assert hasattr(TorchSession, attr)
