#!/usr/bin/env bash
# Builds the JavaScript agent into a component:
#   plugins/js-echo/build.sh OUT.wasm
# Installs jco and componentize-js (versions pinned in package-lock.json;
# @bytecodealliance/preview2-shim held at 0.25.0, as 0.26.1 breaks
# `jco componentize`) into a cached directory, then componentizes app.js
# against ../../wit. Needs node and npm.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=$(realpath -m "${1:?usage: build.sh OUT.wasm}")
tools=${BYCLAW_JS_TOOLS:-${TMPDIR:-/tmp}/byclaw-gateway-js-tools}
mkdir -p "$tools" "$(dirname "$out")"
if ! cmp -s "$here/package-lock.json" "$tools/package-lock.json" || [ ! -x "$tools/node_modules/.bin/jco" ]; then
  cp "$here/package.json" "$here/package-lock.json" "$tools/"
  (cd "$tools" && npm ci --no-audit --no-fund --loglevel=error >&2)
fi
"$tools/node_modules/.bin/jco" componentize "$here/app.js" \
  --wit "$here/../../wit" --world-name agent \
  --disable http --disable fetch-event \
  --out "$out" >&2
echo "$out"
