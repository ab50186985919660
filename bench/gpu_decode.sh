#!/usr/bin/env bash
# Decode speed of a SmolLM2-135M-shaped llama (bench/make_llama.py, random weights) on a GPU: kiln-run on the GPU
# (fp32, and 4-bit MatMulNBits from bench/quantize_q4.py), its GPU time per kernel (KILN_GPU_PROFILE=1), and kiln's
# CPU provider. Prompt: 16 tokens; decode: STEPS-1 tokens.
#
#   bash bench/gpu_decode.sh [KILN_RUN=target/release/kiln-run] [STEPS=65] [MODELS=/tmp]
# PyTorch on the same GPU: python3 bench/torch_decode.py --dtype float32|float16 --prompt 16 --steps 64
set -euo pipefail
KILN_RUN="${1:-target/release/kiln-run}"
STEPS="${2:-65}"
MODELS="${3:-/tmp}"
IDS=6403,1980,253,655,28,339,436,253,3241,282,253,9835,259,30,339,436
here="$(dirname "$0")"
[ -f "$MODELS/llama/model.onnx" ] || python3 "$here/make_llama.py" "$MODELS/llama" > /dev/null
if [ ! -f "$MODELS/llama-q4/model.onnx" ]; then
  mkdir -p "$MODELS/llama-q4"
  python3 "$here/quantize_q4.py" "$MODELS/llama/model.onnx" "$MODELS/llama-q4/model.onnx" 32 2>&1 | tail -n 1
fi
for m in "$MODELS/llama" "$MODELS/llama-q4"; do
  echo "=== $m: gpu (pipelined: the next token stays on the GPU, read back while the next step runs)"
  "$KILN_RUN" "$m/model.onnx" --ids $IDS --greedy "$STEPS" --provider gpu --placement --no-text 2>&1 |
    grep -E "adapter|nodes:|^prefill|^decode|gpu work|gpu host"
  echo "=== $m: gpu, stepwise (--no-pipeline: each token read back before the next step is recorded)"
  "$KILN_RUN" "$m/model.onnx" --ids $IDS --greedy "$STEPS" --provider gpu --placement --no-text --no-pipeline 2>&1 |
    grep -E "^decode|gpu host time per decode"
  echo "=== $m: gpu, time per kernel (8 decode steps)"
  KILN_GPU_PROFILE=1 "$KILN_RUN" "$m/model.onnx" --ids $IDS --greedy 9 --provider gpu --placement --no-text 2>&1 |
    grep "gpu profile" | head -n 12
done
echo "=== $MODELS/llama: cpu, 1 thread"
"$KILN_RUN" "$MODELS/llama/model.onnx" --ids $IDS --greedy 33 --provider cpu --no-text 2>&1 | grep -E "^prefill|^decode"
