#!/usr/bin/env bash
# Every check CI runs, in order. Installs what is missing first (fresh Debian machine: a C compiler and Rust via
# rustup, python3-venv, chromium, node/npm, lavapipe; then the rustfmt/clippy components, the wasm32 target, the Python
# venv at .venv, wasm-bindgen-cli and the npm dependencies of js/).
#
#   bash scripts/test.sh            # everything
#   KILN_SKIP_INSTALL=1 bash scripts/test.sh   # checks only
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
SECONDS=0
step() { printf '\n=== [%4ds] %s\n' "$SECONDS" "$*"; }

# shellcheck source=scripts/lib.sh
. scripts/lib.sh

if [ "${KILN_SKIP_INSTALL:-0}" != 1 ]; then
  step "install what is missing"
  ensure_rust
  need_apt=()
  command -v python3 >/dev/null || need_apt+=(python3)
  python3 -c "import ensurepip, venv" 2>/dev/null || need_apt+=(python3-venv python3-pip)
  # headless chromium: kiln-web's browser test (js/test/browser.mjs)
  command -v chromium >/dev/null || need_apt+=(chromium)
  # node + npm: kiln-js's Node smoke test and kiln-web's npm test
  command -v node >/dev/null || need_apt+=(nodejs)
  command -v npm >/dev/null || need_apt+=(npm)
  [ ${#need_apt[@]} -eq 0 ] || apt_install "${need_apt[@]}"
  # lavapipe (Mesa's CPU Vulkan driver): the GPU backend's tests run on it
  if ! dpkg -s mesa-vulkan-drivers libvulkan1 >/dev/null 2>&1; then apt_install mesa-vulkan-drivers libvulkan1; fi
  if command -v rustup >/dev/null; then
    installed="$(rustup component list --installed 2>/dev/null || true)"
    for c in rustfmt clippy; do grep -q "^$c" <<<"$installed" || rustup component add "$c"; done
    rustup target list --installed | grep -qx wasm32-unknown-unknown || rustup target add wasm32-unknown-unknown
  fi
  if ! .venv/bin/python -c "import onnx, onnxruntime, numpy, onnxruntime_extensions" 2>/dev/null; then
    [ -x .venv/bin/pip ] || python3 -m venv .venv
    # onnxruntime-extensions: the tokenizer op tests check that kiln's tokenizer models load in it too
    .venv/bin/pip install -q onnx==1.22.0 onnxruntime numpy onnxruntime-extensions
  fi
fi

step "cargo fmt --all --check"
cargo fmt --all --check

step "cargo clippy --release --workspace --all-targets -- -D warnings"
cargo clippy --release --workspace --all-targets -- -D warnings

step "cargo test --release --workspace"
cargo test --release --workspace

step "cargo build --release -p kiln-js --target wasm32-unknown-unknown"
cargo build --release -p kiln-js --target wasm32-unknown-unknown
ls -l target/wasm32-unknown-unknown/release/kiln_js.wasm

# kiln-js in Node through wasm-bindgen's glue. wasm-bindgen must match the wasm-bindgen crate in Cargo.lock; it is
# installed when missing (a few minutes; KILN_SKIP_JS=1 skips this step for local runs).
if [ "${KILN_SKIP_JS:-0}" != 1 ]; then
  step "kiln-js in node (js/tests/smoke.cjs)"
  wbg_version="$(awk '/^name = "wasm-bindgen"$/ { getline; gsub(/version = |"/, ""); print; exit }' Cargo.lock)"
  wbg="$(command -v wasm-bindgen || true)"
  if [ -z "$wbg" ] || [ "$("$wbg" --version | cut -d' ' -f2)" != "$wbg_version" ]; then
    wbg=target/wasm-bindgen-cli/bin/wasm-bindgen
    if [ ! -x "$wbg" ] || [ "$("$wbg" --version | cut -d' ' -f2)" != "$wbg_version" ]; then
      cargo install -q wasm-bindgen-cli --version "=$wbg_version" --root target/wasm-bindgen-cli
    fi
  fi
  if [ -n "$wbg" ] && [ -x "$wbg" ]; then
    "$wbg" --target nodejs --out-dir target/kiln-js-node target/wasm32-unknown-unknown/release/kiln_js.wasm
    node js/tests/smoke.cjs target/kiln-js-node/kiln_js.js | tail -n 1
    # the npm package kiln-web: its parity suite against onnxruntime-web@1.30.0 (js/README.md)
    step "kiln-web: npm run build && npm test (parity with onnxruntime-web)"
    [ -d js/node_modules/onnxruntime-web ] && [ -d js/node_modules/onnxruntime-common ] ||
      (cd js && npm ci --no-audit --no-fund)
    wbg_path="$(realpath "$(command -v "$wbg")")"
    # (its browser part, test/browser.mjs, runs the package on 'wasm' and on 'webgpu' in headless chromium:
    # SwiftShader's WebGPU adapter, no GPU needed)
    (cd js && WASM_BINDGEN="$wbg_path" KILN_SKIP_CARGO=1 npm run build && npm test) |
      grep -E '^(=== |KNOWN|DIFF|parity|kiln-web:|✖|ℹ (pass|fail|skipped))|records the same|^ℹ (kiln-web|onnxruntime-web) (wasm|webgpu) [^ ]+( thread)?: '
    # kiln's GPU backend built for wasm32 on chromium's WebGPU (SwiftShader): the tiny fixtures mostly on the GPU,
    # one submit per run, within 1e-4 of the reference
    step "kiln's GPU backend in headless chromium (provider/tests/webgpu_browser/run.sh)"
    PATH="$(dirname "$wbg_path"):$PATH" bash provider/tests/webgpu_browser/run.sh 2>&1 | grep -vE '^\s+(Compiling|Finished)'
  else
    echo "wasm-bindgen $wbg_version is not installed"
    exit 1
  fi
fi

if [ -f conformance/src/main.rs ]; then
  step "conformance summary (informational)"
  # `cargo test` above built the binary; a `cargo build -p` here would resolve features differently and rebuild tract
  [ -x target/release/kiln-conformance ] || cargo build --release -p kiln-conformance --bin kiln-conformance
  timeout 1800 target/release/kiln-conformance --suite all 2>&1 | tail -n 5 || echo "(the conformance run did not finish cleanly)"
fi

step "demo"
KILN_DEMO_NO_BUILD=1 bash scripts/demo.sh --greedy 8 | grep -E '^(model|tokens|prefill|decode|text)'

step "all checks passed in ${SECONDS}s"
