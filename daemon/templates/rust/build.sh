#!/usr/bin/env bash
# Builds this plugin into a component and prints its path:
#   ./build.sh OUT.wasm
# Rust for wasm32-wasip2 (the target is added with rustup when missing), the
# release profile of Cargo.toml; CARGO_TARGET_DIR is honoured (default:
# ./target). OUT is written by rename, so a daemon watching its directory
# never loads a half-written file.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=$(realpath -m "${1:?usage: build.sh OUT.wasm}")
if command -v rustup >/dev/null && ! rustup target list --installed | grep -qx wasm32-wasip2; then
  rustup target add wasm32-wasip2 >&2
fi
package=$(sed -n 's/^name *= *"\(.*\)"/\1/p' "$here/Cargo.toml" | head -1)
target_dir=${CARGO_TARGET_DIR:-$here/target}
cargo build --release --target wasm32-wasip2 --manifest-path "$here/Cargo.toml" >&2
mkdir -p "$(dirname "$out")"
cp "$target_dir/wasm32-wasip2/release/${package//-/_}.wasm" "$out.tmp"
mv "$out.tmp" "$out"
echo "$out"
