"""What a hub and a notebook server import when they start.

Every notebook server, class pre-warm and hub restart pays its imports in CPU, and on a
2-core node a class start of 100 servers is bound by exactly that. jsonschema 4.24+ pulls
``rfc3987-syntax`` in through jupyter-events' ``[format-nongpl]`` extra, and that module
compiles about 35 Lark parsers at import (python-jsonschema/jsonschema#1428): measured here,
``import jupyter_server.serverapp`` went from 4.3 s to 0.9 s of CPU without it. pyproject.toml
caps jsonschema for that reason; this test fails when the cost comes back by any route (a new
jsonschema, another package importing the parser, a lifted cap).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit

#: modules whose import compiles parsers at start-up, and that no Jupyter schema needs
GRAMMAR_COMPILERS = ("lark", "rfc3987_syntax")

PROBE = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
# the validators jupyter-events builds at import are where jsonschema loads its format checkers
import jupyter_events.validators  # noqa: F401
print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in sys.argv[2:])))
"""


@pytest.mark.parametrize(
    "module",
    [
        "jupyter_server.serverapp",  # every notebook server
        "jupyterhub.app",  # the hub
        "sovereign_portal.extension",  # the portal's server extension
        "sovereign_portal.hub.service",  # the portal service
    ],
)
def test_start_up_compiles_no_grammar(module: str) -> None:
    r = subprocess.run(
        [sys.executable, "-c", PROBE, module, *GRAMMAR_COMPILERS],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    loaded = json.loads(r.stdout.strip().splitlines()[-1])
    assert loaded == [], (
        f"importing {module} loads {loaded}: jsonschema's rfc3987-syntax checker compiles Lark "
        "parsers at import (seconds of CPU per server start); see pyproject.toml's jsonschema cap"
    )
