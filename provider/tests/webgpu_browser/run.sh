#!/usr/bin/env bash
# Builds this crate for wasm32 (kiln's GPU backend on the browser's WebGPU), runs wasm-bindgen, and checks the tiny
# fixtures in headless Chromium (run.mjs). Needs chromium, node, js/node_modules (playwright-core: `npm ci` in js/)
# and wasm-bindgen-cli matching Cargo.lock (target/wasm-bindgen-cli/bin/wasm-bindgen or on the PATH).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
export CARGO_TARGET_DIR="$root/target"
cp "$root/Cargo.lock" "$here/Cargo.lock"
cargo build --release --target wasm32-unknown-unknown --manifest-path "$here/Cargo.toml"
wbg="$root/target/wasm-bindgen-cli/bin/wasm-bindgen"
[ -x "$wbg" ] || wbg=wasm-bindgen
"$wbg" --target web --out-dir "$here/pkg" --out-name check "$root/target/wasm32-unknown-unknown/release/kiln_webgpu_browser_check.wasm"
if [ -z "${XDG_RUNTIME_DIR:-}" ]; then
  XDG_RUNTIME_DIR=$(mktemp -d)
  chmod 700 "$XDG_RUNTIME_DIR"
  export XDG_RUNTIME_DIR
fi
node "$here/run.mjs"
