#!/usr/bin/env bash
# Builds the C agent into a component:
#   plugins/c-echo/build.sh OUT.wasm
# Compiler: Debian's clang + lld + wasi-libc (wasm32-wasi, i.e. WASI
# preview1), installed with apt-get if missing. Bindings: `wit-bindgen c`;
# component: `wasm-tools component new` with the preview1 reactor adapter;
# both from crates.io through scripts/component-tools (pinned there, cached).
# Generated bindings and the core module live in a scratch directory; nothing
# is written into the repository.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=$(realpath -m "${1:?usage: build.sh OUT.wasm}")

# The C toolchain for wasm32-wasi, from Debian (bookworm: clang 14).
packages=(clang lld wasi-libc libclang-rt-dev-wasm32)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]} with apt-get" >&2
  sudo_if_needed() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
  sudo_if_needed apt-get update -qq >&2
  sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
fi

tools=$("$here/../../scripts/component-tools")
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

# agent.h, agent.c and agent_component_type.o (the world's type, which the
# linker keeps as a custom section for `component new`).
"$tools/bin/wit-bindgen" c --world agent --out-dir "$scratch" "$here/../../wit" >"$scratch/log" 2>&1 ||
  { cat "$scratch/log" >&2; exit 1; }
# A reactor: no main, the host calls the exports.
clang --target=wasm32-wasi -mexec-model=reactor -std=c11 -O2 -Wall -Wextra -Werror \
  -I "$scratch" -o "$scratch/core.wasm" \
  "$here/echo.c" "$scratch/agent.c" "$scratch/agent_component_type.o" >&2
mkdir -p "$(dirname "$out")"
"$tools/bin/wasm-tools" component new "$scratch/core.wasm" \
  --adapt "wasi_snapshot_preview1=$tools/wasi_snapshot_preview1.reactor.wasm" \
  -o "$out.tmp" >&2
mv "$out.tmp" "$out"
echo "$out"
