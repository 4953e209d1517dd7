"""Where things are: the repository, shared/ beside it, the venv and node tools."""

from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("SOVEREIGN_SHARED", REPO.parent / "shared"))
EGRESS_GUARD = SHARED / "tools" / "egress_guard"
VENV_BIN = Path(sys.executable).parent
NODE_BIN = REPO / "node_modules" / ".bin"


def require_egress_guard() -> Path:
    """The egress guard's folder; a missing guard is an error, never a skip."""
    if not (EGRESS_GUARD / "sitecustomize.py").is_file():
        raise RuntimeError(
            f"egress guard not found at {EGRESS_GUARD}; set SOVEREIGN_SHARED to the shared/ folder"
        )
    return EGRESS_GUARD


def require_tool(name: str, where: Path | None = None) -> str:
    path = str(where / name) if where and (where / name).exists() else shutil.which(name)
    if not path:
        raise RuntimeError(f"{name} not found: run scripts/install.sh --test first")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def guarded_env(egress_log: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """An environment whose Python processes run under the egress guard."""
    env = dict(base if base is not None else os.environ)
    guard = str(require_egress_guard())
    env["PYTHONPATH"] = os.pathsep.join(p for p in (guard, env.get("PYTHONPATH", "")) if p)
    env["EGRESS_LOG"] = str(egress_log)
    env["PATH"] = os.pathsep.join([str(VENV_BIN), str(NODE_BIN), env.get("PATH", "")])
    return env
