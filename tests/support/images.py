"""Read and lint the image definitions in images/: Dockerfiles, Apptainer .def files, locks.

The lint rules (each returns a list of problems; empty means clean):

- every ``pip install`` is either ``--isolated --require-hashes -r LOCK`` where LOCK was copied
  from ``images/*/requirements.txt``, or ``--isolated --no-deps --no-index`` of a copied local
  source tree (the portal itself); nothing else is installed by name;
- nothing is fetched from the network at build time: no curl, wget, ADD of a URL, git clone,
  piping into a shell;
- every COPY / %files source exists in the repository (and is let through the dockerignore);
- every lock line is ``name==version`` with at least one ``--hash=sha256:``.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from .paths import REPO

IMAGES = REPO / "images"
VENV_PREFIX = "/opt/venv"
FETCHERS = {"curl", "wget", "aria2c", "fetch", "scp", "rsync", "git", "svn", "hg"}
#: The one index option allowed: an operator's mirror, passed at build time (hashes still hold).
INDEX_ARG = "${PIP_INDEX_URL:+--index-url=$PIP_INDEX_URL}"


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int


@dataclass
class Definition:
    """An Apptainer .def file: header keys and sections."""

    header: dict[str, str]
    sections: dict[str, list[str]] = field(default_factory=dict)

    @property
    def files(self) -> list[tuple[str, str]]:
        out = []
        for raw in self.sections.get("files", []):
            parts = raw.split()
            if parts:
                out.append((parts[0], parts[-1]))
        return out


# -- parsing ---------------------------------------------------------------------------------


def parse_dockerfile(path: Path) -> list[Instruction]:
    out: list[Instruction] = []
    buf: list[str] = []
    start = 0
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # comments, parser directives and blank lines (also inside continuations)
        if not buf:
            start = n
        if line.endswith("\\"):
            buf.append(line[:-1].strip())
            continue
        buf.append(line)
        text = " ".join(buf)
        buf = []
        keyword, _, args = text.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
    if buf:
        raise ValueError(f"{path}: dangling line continuation at line {start}")
    return out


def copy_pairs(instructions: list[Instruction]) -> list[tuple[list[str], str, bool]]:
    """(sources, destination, from_build_context) for each COPY/ADD."""
    pairs = []
    for ins in instructions:
        if ins.keyword not in ("COPY", "ADD"):
            continue
        words = json.loads(ins.args) if ins.args.startswith("[") else shlex.split(ins.args)
        flags = [w for w in words if w.startswith("--")]
        paths = [w for w in words if not w.startswith("--")]
        from_context = not any(f.startswith("--from") for f in flags)
        pairs.append((paths[:-1], paths[-1], from_context))
    return pairs


def parse_def(path: Path) -> Definition:
    header: dict[str, str] = {}
    sections: dict[str, list[str]] = {}
    current: str | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("%"):
            current = line[1:].split()[0]
            sections.setdefault(current, [])
            continue
        if current is None:
            if line and not line.startswith("#"):
                key, _, value = line.partition(":")
                header[key.strip()] = value.strip()
        elif line and not line.startswith("#"):
            sections[current].append(line)
    return Definition(header, sections)


def shell_commands(script: str) -> list[list[str]]:
    """Split shell text into simple commands (argv lists), at &&, ||, ;, | and newlines."""
    text = script.replace("\\\n", " ")
    cmds = []
    for part in re.split(r"&&|\|\||;|\n|(?<!\|)\|(?!\|)", text):
        try:
            words = shlex.split(part, comments=True)
        except ValueError:
            words = part.split()
        while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
            words = words[1:]  # VAR=value prefixes
        if words and words[0] in ("export", "set"):
            continue
        if words:
            cmds.append(words)
    return cmds


def _is_pip_install(words: list[str]) -> bool:
    exe = Path(words[0]).name
    if exe in ("pip", "pip3") or re.fullmatch(r"pip3\.\d+", exe):
        return len(words) > 1 and words[1] == "install"
    if re.fullmatch(r"python(3(\.\d+)?)?", exe) and words[1:3] == ["-m", "pip"]:
        return len(words) > 3 and words[3] == "install"
    return False


def _pip_install_args(words: list[str]) -> list[str]:
    i = words.index("install")
    return words[i + 1 :]


# -- lint rules ------------------------------------------------------------------------------


def lint_script(script: str, where: str, copied: dict[str, str]) -> list[str]:
    """Problems in one shell script (a RUN, a %post). ``copied`` maps destination -> source."""
    problems = []
    if re.search(r"\|\s*(sudo\s+)?(ba|da|z)?sh\b", script):
        problems.append(f"{where}: pipes something into a shell")
    for words in shell_commands(script):
        exe = Path(words[0]).name
        if exe in FETCHERS:
            problems.append(f"{where}: runs {exe} ({' '.join(words)[:80]})")
        if exe in ("pip", "pip3", "uv", "conda", "mamba", "micromamba") and words[1:2] in (
            ["download"],
            ["pip"],
        ):
            problems.append(f"{where}: {' '.join(words[:3])} is not allowed")
        if exe in ("conda", "mamba", "micromamba", "npm", "apt-get", "apt") and "install" in words:
            problems.append(f"{where}: installs with {exe}; add the package to a lock instead")
        if not _is_pip_install(words):
            continue
        args = [a for a in _pip_install_args(words) if a != INDEX_ARG]
        if "--isolated" not in args:
            problems.append(f"{where}: pip install without --isolated (host pip config leaks in)")
        if any(
            a.startswith(("--index-url", "--extra-index-url", "-i", "--find-links")) for a in args
        ):
            problems.append(f"{where}: pip install names an index")
        reqs = [args[i + 1] for i, a in enumerate(args) if a in ("-r", "--requirement")]
        positional = []
        skip = False
        for a in args:
            if skip:
                skip = False
            elif a in ("-r", "--requirement", "-c", "--constraint"):
                skip = True
            elif not a.startswith("-"):
                positional.append(a)
        if reqs:
            if "--require-hashes" not in args:
                problems.append(f"{where}: pip install -r without --require-hashes")
            if positional:
                problems.append(f"{where}: pip install names packages {positional}")
            for r in reqs:
                src = copied.get(r)
                if src is None:
                    problems.append(f"{where}: installs {r}, which no COPY/%files put there")
                elif not re.fullmatch(r"images/[a-z0-9_-]+/requirements\.txt", src):
                    problems.append(f"{where}: {r} comes from {src}, not images/*/requirements.txt")
        else:
            if not {"--no-deps", "--no-index"} <= set(args):
                problems.append(
                    f"{where}: pip install of {positional} without a lock must use "
                    "--no-deps --no-index (only the portal's own source tree is allowed)"
                )
            for p in positional:
                root = p.rstrip("/") + "/"
                if not any(d.startswith(root) and copied[d] == "pyproject.toml" for d in copied):
                    problems.append(
                        f"{where}: installs {p!r}, which is not a copied source tree "
                        "with a pyproject.toml"
                    )
    return problems


def dockerignore_allows(ignore: Path, src: str) -> bool:
    """A small .dockerignore evaluator: last matching pattern wins; '!' re-includes."""
    if not ignore.exists():
        return True
    allowed = True
    parts = Path(src).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for raw in ignore.read_text().splitlines():
        pat = raw.strip()
        if not pat or pat.startswith("#"):
            continue
        neg = pat.startswith("!")
        pat = pat.lstrip("!").strip("/")
        if any(fnmatch.fnmatch(p, pat) for p in prefixes):
            allowed = neg
    return allowed


def lint_dockerfile(path: Path) -> list[str]:
    problems = []
    rel = path.relative_to(REPO)
    instructions = parse_dockerfile(path)
    copied: dict[str, str] = {}
    ignore = path.with_name(path.name + ".dockerignore")
    for srcs, dest, from_context in copy_pairs(instructions):
        for src in srcs:
            if re.match(r"^[a-z]+://", src):
                problems.append(f"{rel}: COPY/ADD of a URL {src}")
                continue
            if not from_context:
                continue
            if not (REPO / src).exists():
                problems.append(f"{rel}: COPY source {src} does not exist")
            elif not dockerignore_allows(ignore, src):
                problems.append(f"{rel}: COPY source {src} is excluded by {ignore.name}")
            target = dest.rstrip("/") + "/" + Path(src).name if dest.endswith("/") else dest
            copied[target] = src
    for ins in instructions:
        if ins.keyword == "ADD":
            problems.append(f"{rel}:{ins.line}: use COPY, not ADD")
        if ins.keyword == "RUN":
            problems += lint_script(ins.args, f"{rel}:{ins.line}", copied)
    return problems


def lint_def(path: Path) -> list[str]:
    problems = []
    rel = path.relative_to(REPO)
    d = parse_def(path)
    if d.header.get("Bootstrap") not in ("docker", "localimage"):
        problems.append(f"{rel}: Bootstrap must be docker or localimage")
    copied: dict[str, str] = {}
    for src, dest in d.files:
        if re.match(r"^[a-z]+://", src):
            problems.append(f"{rel}: %files of a URL {src}")
        elif not (REPO / src).exists():
            problems.append(f"{rel}: %files source {src} does not exist")
        copied[dest] = src
    for name in ("setup", "post", "test", "runscript", "environment", "startscript"):
        if name in d.sections:
            problems += lint_script("\n".join(d.sections[name]), f"{rel} %{name}", copied)
    return problems


def lock_entries(path: Path) -> tuple[dict[str, str], list[str]]:
    """({normalised name: version}, problems) for a pinned, hashed requirements file."""
    problems = []
    pins: dict[str, str] = {}
    logical: list[str] = []
    buf = ""
    for raw in path.read_text().splitlines():
        line = raw.split(" #")[0].strip() if not raw.lstrip().startswith("#") else ""
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        if buf.strip():
            logical.append(buf.strip())
        buf = ""
    for entry in logical:
        # extras as uv writes them keep their commas' spaces: "name[a, b]==1"
        entry = re.sub(r"\[[^\]]*\]", lambda m: m.group(0).replace(" ", ""), entry)
        head, *rest = entry.split()
        if head.startswith("-"):
            problems.append(f"{path.name}: option line {head!r} is not allowed in a lock")
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([A-Za-z0-9.+!_-]+)", head)
        if not m:
            problems.append(f"{path.name}: {head!r} is not pinned with ==")
            continue
        hashes = [r for r in rest if re.fullmatch(r"--hash=sha256:[0-9a-f]{64}", r)]
        if not hashes or len(hashes) != len(rest):
            problems.append(f"{path.name}: {head} lacks sha256 hashes (or has other options)")
        pins[normalise(m.group(1))] = m.group(3)
    return pins, problems


def input_names(path: Path) -> set[str]:
    """Names required by a requirements.in, following -r includes."""
    names: set[str] = set()
    for raw in path.read_text().splitlines():
        line = raw.split("#")[0].strip()
        if not line:
            continue
        if line.startswith(("-r ", "--requirement ")):
            names |= input_names((path.parent / line.split(maxsplit=1)[1]).resolve())
            continue
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)", line)
        if m:
            names.add(normalise(m.group(1)))
    return names


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def venv_copies(dockerfile: Path) -> list[tuple[str, str]]:
    """(repo source, path under the venv) for each COPY into /opt/venv in a Dockerfile."""
    out = []
    for srcs, dest, from_context in copy_pairs(parse_dockerfile(dockerfile)):
        if from_context and dest.startswith(VENV_PREFIX + "/"):
            for src in srcs:
                out.append((src, dest[len(VENV_PREFIX) + 1 :]))
    return out


def portal_sources(dockerfile: Path) -> list[tuple[str, str]]:
    """(repo source, path under the portal source tree) for COPY into /tmp/portal."""
    out = []
    for srcs, dest, from_context in copy_pairs(parse_dockerfile(dockerfile)):
        if from_context and dest.startswith("/tmp/portal/"):
            for src in srcs:
                out.append((src, dest[len("/tmp/portal/") :]))
    return out
