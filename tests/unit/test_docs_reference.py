"""The docs that are derived from code: every config trait has help, the generated reference
pages are current, and what the hand-written pages claim about the code is still true."""

from __future__ import annotations

import copy
import importlib.util
import re
import sys
import textwrap
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from sovereign_portal.spawners.catalog import ACCELERATORS, LayoutError, check_layout
from sovereign_portal.spawners.request import RequestError, parse_request, resolve
from sovereign_portal.spawners.site import SiteError, load_site, parse_site
from traitlets import Integer, Unicode
from traitlets.config import Configurable

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"


def _load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "gen_config_reference", DOCS / "gen_config_reference.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses need the module registered
    spec.loader.exec_module(mod)
    return mod


gen = _load_generator()


@pytest.fixture(scope="module")
def generated() -> Any:
    return gen.generate()


# -- the config reference ------------------------------------------------------------------
def test_every_module_imports(generated: Any) -> None:
    assert generated.problems == [], "modules that fail to import hide their options:\n" + (
        "\n".join(map(str, generated.problems))
    )


def test_every_config_trait_has_help(generated: Any) -> None:
    assert generated.classes, "found no Configurable in sovereign_portal.*"
    assert generated.missing_help == [], "config traits without help=:\n" + "\n".join(
        generated.missing_help
    )


def test_committed_reference_pages_are_current(generated: Any) -> None:
    stale = [str(p.relative_to(REPO)) for p, _ in gen.stale_pages(generated.pages)]
    assert not stale, (
        f"stale generated pages {stale}: run `.venv/bin/python docs/gen_config_reference.py`"
    )


def test_discovery_finds_portal_classes_only(generated: Any) -> None:
    names = {f"{c.__module__}.{c.__qualname__}" for c in generated.classes}
    assert "sovereign_portal.extension.app.PortalExtension" in names
    assert all(n.startswith("sovereign_portal.") for n in names)
    page = generated.pages[gen.REFERENCE / "config.md"]
    for cls in generated.classes:
        assert f"## {cls.__name__}\n" in page
        for name, _ in gen.config_traits(cls):
            assert f"### {cls.__name__}.{name}\n" in page


class _Documented(Configurable):
    """A class whose options are all documented."""

    size = Integer(3, config=True, help="How many.")
    hidden = Unicode("x", help="")  # not config=True: not an option


class _Undocumented(_Documented):
    """A subclass that adds one option without help."""

    colour = Unicode("blue", config=True)


def test_empty_help_is_detected() -> None:
    assert gen.empty_help([_Documented]) == []
    missing = gen.empty_help([_Documented, _Undocumented])
    assert missing == [f"{__name__}._Undocumented.colour"]
    page = gen.render_config([_Documented, _Undocumented])
    assert "### _Undocumented.colour" in page
    assert "no help string: this is a bug" in page
    assert "**Default:** `3`" in page
    assert "### _Documented.hidden" not in page


def test_import_failures_are_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "docsprobe_pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "good.py").write_text(
        textwrap.dedent(
            """
            from traitlets import Unicode
            from traitlets.config import Configurable

            class Probe(Configurable):
                name = Unicode("", config=True, help="A name.")
            """
        )
    )
    (pkg / "broken.py").write_text("import module_that_does_not_exist_here\n")
    (pkg / "sub" / "__init__.py").write_text("raise RuntimeError('boom')\n")
    (pkg / "__main__.py").write_text("raise SystemExit('must not be imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        modules, problems = gen.discover_modules(["docsprobe_pkg"])
        failed = {p.module: p.error for p in problems}
        assert set(failed) == {"docsprobe_pkg.broken", "docsprobe_pkg.sub"}
        assert "ModuleNotFoundError" in failed["docsprobe_pkg.broken"]
        assert "boom" in failed["docsprobe_pkg.sub"]
        classes = gen.configurable_classes(modules, prefix="docsprobe_pkg.")
        assert [c.__name__ for c in classes] == ["Probe"]
        page = gen.render_config(classes, problems)
        assert "could not be imported" in page and "docsprobe_pkg.broken" in page
    finally:
        for name in [m for m in sys.modules if m.startswith("docsprobe_pkg")]:
            del sys.modules[name]


def test_help_text_cannot_inject_markup() -> None:
    text = gen._help_markdown(
        """First line.
        # not a heading
        ```{eval-rst}
        (label)=
        """
    )
    assert text.splitlines() == [
        "First line.",
        "\\# not a heading",
        "\\```{eval-rst}",
        "\\(label)=",
    ]
    assert gen.code("a`b") == "``a`b``"


# -- the hardware and site pages -----------------------------------------------------------
def test_hardware_page_has_the_mig_tables(generated: Any) -> None:
    page = generated.pages[gen.REFERENCE / "hardware.md"]
    for acc in ACCELERATORS.values():
        assert f"### {acc.name}: " in page
        for p in acc.mig_profiles:
            assert f"| `{p.name}` | {p.compute_slices} | {p.memory_slices} " in page
            row = next(line for line in page.splitlines() if line.startswith(f"| `{p.name}` |"))
            assert f"| {p.max_count} |" in row
    assert "| `1g.10gb` | 1 | 1 | 10 GB | 7 |" in page
    assert "| `3g.90gb` | 3 | 4 | 90 GB | 2 |" in page


def test_site_page_documents_every_key(generated: Any) -> None:
    page = generated.pages[gen.REFERENCE / "site-file.md"]
    from sovereign_portal.spawners import site

    for model in (site.Site, site.Partition, site.NodeType, site.MigLayout, site.Jurisdiction):
        assert f"## {model.__name__}\n" in page
        for key in model.model_fields:
            assert f"| `{key}` |" in page, f"{model.__name__}.{key} missing"


# -- the hand-written pages say true things ------------------------------------------------
HOWTO = DOCS / "how-to" / "write-a-site-file.md"


def _example() -> dict[str, Any]:
    text = (REPO / "spawners" / "sites" / "example.toml").read_text()
    return tomllib.loads(text)


def _mutate(path: str, value: Any) -> dict[str, Any]:
    data = copy.deepcopy(_example())
    node: Any = data
    keys = [int(k) if k.isdigit() else k for k in path.split(".")]
    for k in keys[:-1]:
        node = node[k]
    if value is _DELETE:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return data


_DELETE = object()

# (mutation of the embedded example, a fragment of the message that the how-to quotes)
SITE_ERRORS = [
    (("partitions.0.price_eur_per_gpu_hour", {"b200": 3.0}), "no price for 'h100': add "),
    (
        ("partitions.0.nodes.0.mig.0.profiles", ["4g.40gb", "4g.40gb"]),
        "at most 1 × 4g.40gb fit on one GPU, the layout has 2",
    ),
    (
        ("partitions.0.nodes.0.mig.0.profiles", ["4g.40gb", "3g.40gb", "2g.20gb"]),
        "needs 9 compute slices, a GPU has 7",
    ),
    (
        ("partitions.0.nodes.0.mig.0.profiles", ["3g.20gb"]),
        "has no MIG profile '3g.20gb'; allowed:",
    ),
    (("partitions.0.nodes.0.mig.0.gpus", [7]), "GPU 7 appears in two MIG layouts"),
    (("partitions.0.nodes.0.mig.0.gpus", [9]), "Input should be less than or equal to 7"),
    (("partitions.0.jurisdiction.country", "France"), "String should match pattern '^[A-Z]{2}$'"),
    (("partitions.0.carbon_g_per_kwh2", 3), "Extra inputs are not permitted"),
    (("partitions.0.carbon_g_per_kwh", _DELETE), "Field required"),
    (
        ("partitions.0.nodes.0.count", 2),
        "a local partition is one box: exactly one node (count = 1)",
    ),
    (
        ("partitions.0.default_walltime_minutes", 600),
        "default_walltime_minutes is above max_walltime_minutes",
    ),
    (("partitions.0.nodes.0.accelerator", "a100"), "Input should be 'h100', 'h200' or 'b200'"),
    (("partitions.0.name", "Lab 1"), "String should match pattern"),
]


@pytest.mark.parametrize(("mutation", "fragment"), SITE_ERRORS, ids=[f for _, f in SITE_ERRORS])
def test_site_errors_in_the_how_to_are_real(mutation: tuple[str, Any], fragment: str) -> None:
    with pytest.raises(SiteError) as info:
        parse_site(_mutate(*mutation), "site.toml")
    message = str(info.value)
    assert message.startswith("site.toml: invalid site file\n  partitions[0]")
    assert fragment in message
    assert fragment in HOWTO.read_text(), f"the how-to should explain {fragment!r}"


def test_mig_index_outside_node_message() -> None:
    data = _mutate("partitions.0.nodes.0.gpus", 2)
    data["partitions"][0]["nodes"][0]["mig"] = [{"gpus": [2], "profiles": ["7g.80gb"]}]
    with pytest.raises(SiteError, match=re.escape("MIG GPU index 2 is outside 0..1")):
        parse_site(data, "site.toml")
    assert "MIG GPU index 2 is outside 0..1" in HOWTO.read_text()


def test_complete_site_files_in_the_docs_validate() -> None:
    blocks = []
    for page in DOCS.rglob("*.md"):
        if "_build" in page.parts:
            continue
        for block in re.findall(r"```toml\n(.*?)```", page.read_text(), flags=re.S):
            if block.startswith("# site.toml"):
                blocks.append((page, block))
    assert blocks, "the site-file how-to should have a complete example"
    for page, block in blocks:
        try:
            site = parse_site(tomllib.loads(block), str(page))
        except SiteError as e:
            raise AssertionError(f"example in {page} is invalid:\n{e}") from None
        assert site.partitions


def test_sizes_and_mig_claims() -> None:
    h100 = ACCELERATORS["h100"]
    check_layout(h100, ["4g.40gb", "3g.40gb"])
    check_layout(h100, ["1g.10gb", "1g.10gb", "2g.20gb", "3g.40gb"])
    with pytest.raises(LayoutError):
        check_layout(h100, ["4g.40gb", "4g.40gb"])
    site = load_site()
    req = parse_request({"kind": "torch", "slice": "1g.10gb", "count": 2})
    with pytest.raises(RequestError) as info:
        resolve(site, req)
    page = (DOCS / "explanation" / "sizes-and-mig.md").read_text()
    flat = " ".join(page.split())
    assert " ".join(str(info.value).split()) in flat


def test_cli_reference_covers_every_command_and_option() -> None:
    import argparse

    from sovereign_portal.hub.cli import build_parser

    page = (DOCS / "reference" / "cli.md").read_text()
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert {"catalog", "up", "site-schema", "job-script"} <= set(subparsers.choices)
    for name, sub in subparsers.choices.items():
        assert f"## {name}\n" in page, f"docs/reference/cli.md should document `{name}`"
        for action in sub._actions:
            for opt in action.option_strings:
                if opt not in ("-h", "--help"):
                    assert f"`{opt}" in page, f"cli.md: `{name} {opt}` is not documented"


# -- the build loads nothing off-site ------------------------------------------------------
def _load_ext() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "sovereign_docs", DOCS / "_ext" / "sovereign_docs.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_offsite_assets_are_found(tmp_path: Path) -> None:
    ext = _load_ext()
    (tmp_path / "ok.html").write_text(
        '<link rel="stylesheet" href="_static/a.css"><script src="_static/x.js"></script>'
        '<a href="https://example.org/">a link loads nothing</a>'
        '<link rel="next" href="https://example.org/next">'
    )
    (tmp_path / "bad.html").write_text(
        '<script src="https://cdn.example.com/mathjax.js"></script>'
        '<link rel="stylesheet" href="//fonts.example.com/css">'
        '<img srcset="x.png 1x, https://img.example.com/y.png 2x">'
        "<div style=\"background: url('http://t.example.com/p.gif')\"></div>"
        "<style>@import 'https://c.example.com/s.css';</style>"
    )
    (tmp_path / "_static").mkdir()
    (tmp_path / "_static" / "a.css").write_text(
        "/* https://comments.example.com are fine */ body { background: url(img/a.png) }\n"
        "@font-face { src: url(https://fonts.example.com/f.woff2) }"
    )
    hits = ext.external_assets(tmp_path)
    found = sorted((p.name, what) for p, what in hits)
    assert [name for name, _ in found] == ["a.css"] + ["bad.html"] * 5, found
    assert not any(p.name == "ok.html" for p, _ in hits)


def test_generated_pages_do_not_depend_on_hash_seed(generated: Any) -> None:
    """Set defaults, dict order and paths must render the same in every process."""
    import json
    import subprocess

    script = (
        "import json, runpy; g = runpy.run_path('docs/gen_config_reference.py');"
        "print(json.dumps({str(k): v for k, v in g['generate']().pages.items()}))"
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    other = json.loads(out.stdout)
    assert other == {str(k): v for k, v in generated.pages.items()}
    assert gen.stable_repr({"b", "a"}) == "{'a', 'b'}"
    assert gen.stable_repr({"k": frozenset({2, 1})}) == "{'k': frozenset({1, 2})}"
