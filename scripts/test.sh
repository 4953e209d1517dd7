#!/usr/bin/env bash
# Set up everything (scripts/install.sh --test) and run the whole test suite:
# lint, format check, types, unit + property tests, the real-service layer (JupyterHub,
# configurable-http-proxy, the OIDC IdP, Slurm, Chromium), the jupyter-server extension
# layer, and the docs build. Usage: scripts/test.sh [extra pytest args for every layer]
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --test || { echo "test: install failed" >&2; exit 1; }
export PATH="$PWD/.venv/bin:$PWD/node_modules/.bin:$PATH"
export PYTHONDONTWRITEBYTECODE=1
failed=()
step() {  # step NAME CMD...: run one layer, remember failures, never stop early
  local name=$1; shift
  printf '\n\033[1m== %s ==\033[0m\n' "$name"
  "$@"; local rc=$?
  if ((rc == 5)); then
    echo "test: $name collected no tests (pytest exit 5): the layer is broken" >&2
  fi
  ((rc == 0)) || failed+=("$name (exit $rc)")
}
step "ruff lint"   ruff check .
step "ruff format" ruff format --check .
step "mypy"        mypy hub spawners extension
step "unit"        pytest -m unit -n 2 tests/unit "$@"
# three workers (a third beats two on 2 cores; a fourth made every test slower: 20 min, the
# layer is CPU-bound); each file is one unit, and the Slurm files three units (two main
# ones, each on its own Unix users and its own cluster, and the two sites'), handed out
# first (tests/support/xdist_groups.py)
step "hub, idp, slurm, browser" pytest -n 3 tests/hub "$@"
step "extension"   pytest -p pytest_jupyter.jupyter_server -o asyncio_mode=strict tests/extension "$@"
step "docs"        bash -c 'python docs/gen_config_reference.py --check && sphinx-build -E -a -W --keep-going -q -b html docs docs/_build/html'
echo
if ((${#failed[@]})); then
  printf 'FAILED layers:\n'; printf '  - %s\n' "${failed[@]}"
  exit 1
fi
echo "all layers passed"
