#!/usr/bin/env bash
# Install everything sovereign-portal needs on a fresh Debian 12 machine, as root:
# Debian packages (Node.js, Slurm, munge, Chromium), the Python virtual environment at
# .venv, and the npm parts (configurable-http-proxy, the local OIDC IdP).
# Idempotent: a second run only checks. Usage: scripts/install.sh [--test]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WANT_TEST=0
[[ "${1:-}" == "--test" ]] && WANT_TEST=1

log() { printf '\033[1m[install]\033[0m %s\n' "$*"; }

apt_pkgs=(ca-certificates curl git nodejs npm python3 python3-venv python3-dev build-essential
          slurmctld slurmd slurm-client munge chromium fonts-dejavu-core procps iproute2 util-linux)
# The test suite also runs Slurm accounting (slurmdbd on MariaDB) for ledger reconciliation
# and Slurm-enforced budgets.
if ((WANT_TEST)); then apt_pkgs+=(slurmdbd slurm-wlm-mysql-plugin mariadb-server); fi
# ... and a throwaway PostgreSQL server (tests/support/postgres.py) for the portal database.
if ((WANT_TEST)); then apt_pkgs+=(postgresql); fi
# ... and slurmrestd with JWT for a second (remote) site (tests/support/slurm_cluster.py).
if ((WANT_TEST)); then apt_pkgs+=(slurmrestd slurm-wlm-jwt-plugin); fi
missing=()
for p in "${apt_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
# Node may come from elsewhere (nodesource, pyenv images): accept a working node + npm.
if command -v node >/dev/null && command -v npm >/dev/null; then
  missing=("${missing[@]/nodejs}"); missing=("${missing[@]/npm}")
fi
# python3 -m venv may be satisfied without python3-venv (e.g. pyenv builds).
if python3 -c 'import venv, ensurepip' 2>/dev/null; then
  missing=("${missing[@]/python3-venv}"); missing=("${missing[@]/python3-dev}")
  missing=("${missing[@]/python3}")
fi
read -r -a missing <<<"${missing[*]:-}"
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "install: missing Debian packages: ${missing[*]}; run as root or install them" >&2
    exit 1
  fi
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  log "creating .venv with $($PY --version)"
  $PY -m venv .venv
fi
extras="dask,docs"
((WANT_TEST)) && extras="dask,docs,test"
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)-$extras"
if [[ ! -f $stamp ]]; then
  log "pip install -e .[$extras] (torch CPU build for torch.distributed sessions)"
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -e ".[$extras]"
  .venv/bin/python -m pip install -q "torch==2.13.0" || .venv/bin/python -m pip install -q torch
  rm -f .venv/.installed-*; touch "$stamp"
fi

# An editable install does not lay down data files: enable the server extension the
# way the wheel's jupyter_server_config.d file does.
if [[ ! -f .venv/etc/jupyter/jupyter_server_config.d/sovereign_portal.json ]]; then
  mkdir -p .venv/etc/jupyter/jupyter_server_config.d
  cp extension/etc/sovereign_portal.json .venv/etc/jupyter/jupyter_server_config.d/
fi

# JupyterLab settings that keep the browser side quiet: no news prompt, no update checks,
# no extension manager (the wheel ships the same file as a data file).
mkdir -p .venv/share/jupyter/lab/settings
cmp -s extension/etc/overrides.json .venv/share/jupyter/lab/settings/overrides.json ||
  cp extension/etc/overrides.json .venv/share/jupyter/lab/settings/overrides.json

if [[ ! -x node_modules/.bin/configurable-http-proxy ]]; then
  log "npm install configurable-http-proxy"
  npm install --no-audit --no-fund --loglevel=error >/dev/null
fi
if [[ -f hub/idp/package.json && ! -d hub/idp/node_modules/oidc-provider ]]; then
  log "npm install the local OIDC IdP (oidc-provider)"
  (cd hub/idp && npm install --no-audit --no-fund --loglevel=error >/dev/null)
fi
# The JupyterLab extension: prebuilt/ is committed, so this builds (jlpm + @jupyter/builder,
# npm registry only, about 45 s cold) only when its sources changed since prebuilt.sha256.
extension/labextension/build.sh
# An editable install does not lay down data files: link the prebuilt extension where the
# wheel puts it (share/jupyter/labextensions/sovereign-portal-lab).
mkdir -p .venv/share/jupyter/labextensions
ln -sfn "$ROOT/extension/labextension/prebuilt" .venv/share/jupyter/labextensions/sovereign-portal-lab
# Jobs run as unprivileged test users: the checkout and .venv must be traversable.
d=$ROOT
while [[ "$d" != "/" ]]; do chmod o+x "$d" 2>/dev/null || true; d=$(dirname "$d"); done
# Never the portal's state (.run: cookie secret, tokens, IdP keys) nor git's objects.
find "$ROOT" \( -path "$ROOT/.run" -o -path "$ROOT/.git" \) -prune -o \
  -exec chmod o+rX {} + 2>/dev/null || true
# --- Slurm spawner (issue 4): the venv's base interpreter may live under a 0700 home
# (pyenv in /root/.pyenv): make its parents traversable (o+x only) so jobs can exec it.
base_py=$(readlink -f .venv/bin/python)
d=$(dirname "$base_py")
while [[ "$d" != "/" ]]; do chmod o+x "$d" 2>/dev/null || true; d=$(dirname "$d"); done
base_prefix=$(.venv/bin/python -c 'import sys; print(sys.base_prefix)')
[[ -d "$base_prefix" ]] && chmod -R o+rX "$base_prefix" 2>/dev/null || true
# --- end Slurm spawner
log "ready: $ROOT/.venv"
