"""Sphinx extension for the sovereign-portal docs: the built site must load nothing off-site.

After an HTML build, every page and stylesheet is scanned for assets that a browser would fetch
from another host: ``<script src>``, ``<link href>`` (stylesheets, fonts, icons), ``<img src>``,
``<iframe src>``, ``<source src>``, and ``url(...)``/``@import`` in CSS. Each one is a warning, so
``sphinx-build -W`` fails. Plain ``<a href>`` links to other sites are fine: they load nothing.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from sphinx.application import Sphinx
from sphinx.util import logging

logger = logging.getLogger(__name__)

#: (tag, attribute) pairs whose URL the browser fetches without a click.
_FETCHED = {
    ("script", "src"),
    ("link", "href"),
    ("img", "src"),
    ("img", "srcset"),
    ("iframe", "src"),
    ("source", "src"),
    ("source", "srcset"),
    ("video", "src"),
    ("audio", "src"),
    ("embed", "src"),
    ("object", "data"),
}
_LINK_RELS_FETCHED = {"stylesheet", "icon", "preload", "prefetch", "preconnect", "dns-prefetch"}
_CSS_URL = re.compile(r"""(?:url\(\s*['"]?|@import\s+['"])([^'")\s]+)""", re.IGNORECASE)


def is_external(url: str) -> bool:
    """True for a URL that leaves the docs' own origin (``//host`` included)."""
    u = url.strip().lower()
    return u.startswith(("http://", "https://", "//", "ftp://"))


class _AssetFinder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.found: list[str] = []
        self._in_style = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        if tag == "link":
            rels = set(values.get("rel", "").lower().split())
            if not rels & _LINK_RELS_FETCHED:
                return
        for attr, value in values.items():
            if (tag, attr) in _FETCHED:
                urls = [part.split()[0] for part in value.split(",") if part.strip()]
                self.found += [f"<{tag} {attr}={u}>" for u in urls if is_external(u)]
            if attr == "style":
                self.found += [f"style url({u})" for u in _CSS_URL.findall(value) if is_external(u)]
        self._in_style = tag == "style"

    def handle_endtag(self, tag: str) -> None:
        if tag == "style":
            self._in_style = False

    def handle_data(self, data: str) -> None:
        if self._in_style:
            self.found += [f"<style> url({u})" for u in _CSS_URL.findall(data) if is_external(u)]


def external_assets(outdir: Path) -> list[tuple[Path, str]]:
    """Every off-site asset referenced by the built HTML and CSS under ``outdir``."""
    hits: list[tuple[Path, str]] = []
    for path in sorted(outdir.rglob("*")):
        if path.suffix == ".html":
            finder = _AssetFinder()
            finder.feed(path.read_text(encoding="utf-8", errors="replace"))
            hits += [(path, f) for f in finder.found]
        elif path.suffix == ".css":
            text = path.read_text(encoding="utf-8", errors="replace")
            hits += [(path, f"url({u})") for u in _CSS_URL.findall(text) if is_external(u)]
    return hits


def _check_build(app: Sphinx, exception: BaseException | None) -> None:
    if exception is not None or app.builder.format != "html":
        return
    outdir = Path(app.outdir)
    for path, what in external_assets(outdir):
        logger.warning(
            "off-site asset in %s: %s (the docs must load nothing from other hosts)",
            path.relative_to(outdir),
            what,
            type="sovereign",
            subtype="egress",
        )


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("build-finished", _check_build)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
