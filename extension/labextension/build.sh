#!/usr/bin/env bash
# Build the JupyterLab extension into prebuilt/ (committed; the wheel ships it as
# share/jupyter/labextensions/sovereign-portal-lab/). Only the npm registry is used, through
# jlpm (yarn, shipped with jupyter_builder in the venv) and @jupyter/builder.
# prebuilt.sha256 records the sources it was built from: when they have not changed, this
# script does nothing (a fresh clone needs no Node build). Usage: build.sh [--force|--check]
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-../../.venv}

sources_hash() {
  # Every file the build reads, in a fixed order (tests/unit/test_labextension.py
  # computes the same hash).
  find package.json tsconfig.json yarn.lock .yarnrc.yml install.json src style -type f \
    | LC_ALL=C sort | while read -r f; do printf '%s\n' "$f"; cat "$f"; done | sha256sum | cut -c1-64
}

want=$(sources_hash)
have=$(cat prebuilt.sha256 2>/dev/null || true)
if [[ ${1:-} == --check ]]; then
  [[ $want == "$have" && -f prebuilt/package.json ]] && { echo "prebuilt/ is current"; exit 0; }
  echo "prebuilt/ is stale: run extension/labextension/build.sh and commit prebuilt/" >&2
  exit 1
fi
if [[ ${1:-} != --force && $want == "$have" && -f prebuilt/package.json ]]; then
  echo "labextension: prebuilt/ is current (sources unchanged)"
  exit 0
fi
export PATH="$(cd "$VENV/bin" && pwd):$PATH"
# jlpm writes its cache and settings under HOME: keep them out of the user's home.
export HOME=${LABEXT_HOME:-$PWD/.yarn/home}
mkdir -p "$HOME"
start=$(date +%s)
jlpm install --immutable
rm -rf prebuilt/static lib tsconfig.tsbuildinfo
jlpm build
cp install.json prebuilt/install.json
printf '%s\n' "$want" > prebuilt.sha256
echo "labextension: built prebuilt/ in $(( $(date +%s) - start )) s"
