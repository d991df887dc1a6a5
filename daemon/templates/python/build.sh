#!/usr/bin/env bash
# Builds this plugin into a component and prints its path:
#   ./build.sh OUT.wasm
# Installs componentize-py (pinned below) from PyPI into a cached venv
# (BYCLAW_PY_TOOLS, default /tmp/byclaw-gateway-py-tools), then componentizes
# app.py (and any other *.py here) against ./wit, world `agent`, in a scratch
# directory. OUT is written by rename, so a daemon watching its directory
# never loads a half-written file. Needs python3 with venv.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=$(realpath -m "${1:?usage: build.sh OUT.wasm}")
version=0.25.1
venv=${BYCLAW_PY_TOOLS:-${TMPDIR:-/tmp}/byclaw-gateway-py-tools}
if [ "$("$venv/bin/componentize-py" --version 2>/dev/null | awk '{print $2}')" != "$version" ]; then
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check "componentize-py==$version" >&2
fi
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
cp "$here"/*.py "$scratch/"
mkdir -p "$(dirname "$out")"
(cd "$scratch" && "$venv/bin/componentize-py" -d "$here/wit" -w agent componentize app -o "$out.tmp" >&2)
mv "$out.tmp" "$out"
echo "$out"
