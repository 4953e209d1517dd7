"""Sphinx configuration for the sovereign-portal docs (MyST Markdown, Diátaxis folders).

The build is offline: no intersphinx, no CDN assets, no theme buttons that call out.
``_ext/sovereign_docs.py`` fails the build (a warning, an error under ``-W``) when a page
would load a script, stylesheet, image or font from another host.

Build: ``.venv/bin/sphinx-build -W --keep-going -b html docs docs/_build/html``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "_ext"))

project = "sovereign-portal"
author = "sovereign-portal developers"
copyright = "sovereign-portal developers"
language = "en"

extensions = [
    "myst_parser",
    "sovereign_docs",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "_ext", "**/.ipynb_checkpoints", "**/README.md"]
templates_path: list[str] = []

myst_enable_extensions = ["colon_fence", "deflist", "fieldlist", "substitution"]
myst_heading_anchors = 3
# Keep external links as plain links; never fetch anything at build time.
intersphinx_mapping: dict[str, tuple[str, str | None]] = {}
# Section indexes are glob toctrees (``*``, alphabetical), so a page dropped into a section
# folder appears without editing any index.

html_theme = "alabaster"
html_title = "sovereign-portal"
html_theme_options = {
    "description": "JupyterHub for sovereign GPU clusters",
    "show_powered_by": False,
    "github_button": False,
    "github_banner": False,
    "travis_button": False,
    "codecov_button": False,
    "show_relbars": True,
    "fixed_sidebar": False,
}
html_sidebars = {"**": ["about.html", "navigation.html", "relations.html", "searchbox.html"]}
html_static_path: list[str] = []
html_show_sourcelink = False
html_last_updated_fmt = None
# The docs use no math: MathJax would come from a CDN, and the asset check would fail.
