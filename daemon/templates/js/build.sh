#!/usr/bin/env bash
# Builds this plugin into a component and prints its path:
#   ./build.sh OUT.wasm
# Installs jco and componentize-js (versions pinned in package-lock.json;
# @bytecodealliance/preview2-shim held at 0.25.0, as 0.26.1 breaks
# `jco componentize`) into a cached directory (BYCLAW_JS_TOOLS, default
# /tmp/byclaw-gateway-js-tools), then componentizes app.js against ./wit,
# world `agent`. OUT is written by rename, so a daemon watching its
# directory never loads a half-written file. Needs node and npm.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=$(realpath -m "${1:?usage: build.sh OUT.wasm}")
tools=${BYCLAW_JS_TOOLS:-${TMPDIR:-/tmp}/byclaw-gateway-js-tools}
# What a lock file pins: all of it but the project's own name, so projects
# with the same pins share the cached tools.
pins() {
  node -e 'const lock = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"));
    delete lock.name; delete lock.packages[""].name; console.log(JSON.stringify(lock));' "$1" 2>/dev/null || true
}
mkdir -p "$tools" "$(dirname "$out")"
if [ ! -x "$tools/node_modules/.bin/jco" ] || [ "$(pins "$here/package-lock.json")" != "$(pins "$tools/package-lock.json")" ]; then
  cp "$here/package.json" "$here/package-lock.json" "$tools/"
  (cd "$tools" && npm ci --no-audit --no-fund --loglevel=error >&2)
fi
"$tools/node_modules/.bin/jco" componentize "$here/app.js" \
  --wit "$here/wit" --world-name agent \
  --disable http --disable fetch-event \
  --out "$out.tmp" >&2
mv "$out.tmp" "$out"
echo "$out"
