#!/usr/bin/env bash
# Greedy decoding with kiln-run on SmolLM2-135M (../shared) when present, else on a tiny fixture.
# Extra arguments go to kiln-run (e.g. --threads 2 --provider gpu --greedy 40).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh
ensure_rust
smol=../shared/models/smollm2-135m-instruct/onnx/model_q4f16.onnx
if [ -f "$smol" ]; then
  model=$smol ids=6403,1980,253,655   # "Once upon a time"
else
  model=conformance/fixtures/tiny/tiny-llama/onnx_optimum/model.onnx ids=11,22,33,44,55
fi
# scripts/test.sh sets KILN_DEMO_NO_BUILD=1: its `cargo test` already built kiln-run
if [ "${KILN_DEMO_NO_BUILD:-0}" != 1 ] || [ ! -x target/release/kiln-run ]; then
  cargo build --release -q -p kiln-examples --bin kiln-run
fi
exec target/release/kiln-run "$model" --ids "$ids" --greedy 20 "$@"
