#!/usr/bin/env bash
# Compile every images/*/requirements.in into a pinned, hashed requirements.txt.
#
# Usage (from anywhere):  images/lock.sh [extra uv pip compile flags, e.g. --upgrade]
# Needs uv (`pip install uv` into any virtual environment, or set UV=/path/to/uv).
# It reads package metadata and sha256 hashes from the index; it downloads no wheels when the
# index serves metadata files (PyPI does), so locking torch's CUDA wheels costs megabytes, not GB.
#
# The images run CPython ${PYTHON_VERSION} on glibc x86_64 (Debian bookworm); the lock is resolved
# for exactly that target, whatever machine runs this script. Every pinned version carries the
# hashes of all its files, so the same lock also installs on other Linux x86_64 machines (the smoke
# test installs it in a plain virtual environment).
set -euo pipefail
cd "$(dirname "$0")/.."
UV=${UV:-uv}
PYTHON_VERSION=3.11
PLATFORM=x86_64-manylinux_2_28

compile() {
  # --no-strip-extras: a pin keeps the extras a dependent asks for (jupyter-events wants
  # jsonschema[format-nongpl]); pip's --require-hashes (pip 23) otherwise treats that
  # extra as an unpinned requirement whenever the pin is not the newest release.
  "$UV" pip compile --quiet --no-config --generate-hashes --no-strip-extras \
    --python-version "$PYTHON_VERSION" --python-platform "$PLATFORM" \
    --custom-compile-command "images/lock.sh" "$@"
}

compile "$@" images/base/requirements.in -o images/base/requirements.txt
for image in gpu course-example; do
  compile "$@" -c images/base/requirements.txt \
    "images/$image/requirements.in" -o "images/$image/requirements.txt"
done
echo "locked: $(ls images/*/requirements.txt | tr '\n' ' ')"
