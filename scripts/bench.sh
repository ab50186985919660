#!/usr/bin/env bash
# Decode speed, kiln CPU (kiln-run) vs onnxruntime CPU (Python), same greedy loop, same thread counts.
#
#   bash scripts/bench.sh                 # every model found, threads 1 and 2, 32 tokens
#   THREADS="1 2 4" STEPS=64 bash scripts/bench.sh [MODEL.onnx ...]
#   KILN_NO_BUILD=1 bash scripts/bench.sh   # measure the kiln-run already built
#
# Models by default: SmolLM2-135M q4f16 (../shared), bench/models/llama-135m-fp32 (made by bench/make_llama.py when
# missing), tiny-llama fp32 (conformance fixture). Prompt: "Once upon a time" ids for 49152-vocab models, else 11..55.
# Prints one row per model and thread count: ms/token (mean over the single-token decode steps), prefill ms, the
# ratio kiln/onnxruntime (below 1: kiln is faster) and whether both generated the same tokens.
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS="${THREADS:-1 2}"
STEPS="${STEPS:-32}"
PY=.venv/bin/python

KILN=target/release/kiln-run
if [ "${KILN_NO_BUILD:-0}" = 1 ]; then
  [ -x "$KILN" ] || { echo "KILN_NO_BUILD=1 but $KILN is missing"; exit 1; }
elif ! cargo build --release -q -p kiln-examples --bin kiln-run 2>/tmp/kiln-bench-build.log; then
  [ -x "$KILN" ] || { cat /tmp/kiln-bench-build.log; exit 1; }
  echo "warning: building kiln-run failed (see /tmp/kiln-bench-build.log); measuring the existing $KILN"
fi

models=("$@")
if [ ${#models[@]} -eq 0 ]; then
  [ -f ../shared/models/smollm2-135m-instruct/onnx/model_q4f16.onnx ] &&
    models+=(../shared/models/smollm2-135m-instruct/onnx/model_q4f16.onnx)
  [ -f bench/models/llama-135m-fp32/model.onnx ] || $PY bench/make_llama.py bench/models/llama-135m-fp32 >/dev/null
  models+=(bench/models/llama-135m-fp32/model.onnx conformance/fixtures/tiny/tiny-llama/onnx_optimum/model.onnx)
fi

echo "host: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "kiln-run built $(date -r "$KILN" '+%F %T') (HEAD $(git rev-parse --short HEAD 2>/dev/null || echo '?')), onnxruntime $($PY -c 'import onnxruntime; print(onnxruntime.__version__)'), $STEPS tokens"
printf '%-45s %3s  %12s %12s  %7s  %12s %12s  %s\n' model thr "kiln ms/tok" "ort ms/tok" ratio "kiln prefill" "ort prefill" "same tokens"
for m in "${models[@]}"; do
  name="$(basename "$(dirname "$(dirname "$m")")")/$(basename "$(dirname "$m")")/$(basename "$m")"
  name="${name#./}"
  vocab=$($PY - "$m" <<'PY'
import sys, onnx
m = onnx.load(sys.argv[1], load_external_data=False)
o = [x for x in m.graph.output if x.name == "logits"] or list(m.graph.output)
print(o[0].type.tensor_type.shape.dim[-1].dim_value)
PY
)
  if [ "$vocab" = 49152 ]; then ids=6403,1980,253,655; else ids=11,22,33,44,55; fi
  for t in $THREADS; do
    kout=$($KILN "$m" --ids "$ids" --greedy "$STEPS" --threads "$t" --no-text 2>&1) || { echo "$name: kiln failed: $(tail -1 <<<"$kout")"; continue; }
    kdec=$(sed -n 's/^decode: \([0-9.]*\) ms.*/\1/p' <<<"$kout")
    kpre=$(sed -n 's/^prefill: \([0-9.]*\) ms.*/\1/p' <<<"$kout")
    ktok=$(sed -n 's/^tokens: //p' <<<"$kout" | tr -d ' ')
    oout=$($PY bench/ort_decode.py "$m" --ids "$ids" --greedy "$STEPS" --threads "$t")
    read -r odec opre otok < <($PY -c 'import json,sys; r=json.loads(sys.argv[1]); print(r["decode_ms"], r["prefill_ms"], str(r["tokens"]).replace(" ",""))' "$oout")
    ratio=$(awk -v a="$kdec" -v b="$odec" 'BEGIN { printf "%.2fx", a / b }')
    same=no; [ "$ktok" = "$otok" ] && same=yes
    if [ "$same" = no ]; then
      same="no (first difference at $($PY -c 'import sys; a=eval(sys.argv[1]); b=eval(sys.argv[2]); print(next((i for i,(x,y) in enumerate(zip(a,b)) if x!=y), min(len(a),len(b))))' "$ktok" "$otok"))"
    fi
    printf '%-45s %3s  %12s %12s  %7s  %12s %12s  %s\n' "$name" "$t" "$kdec" "$odec" "$ratio" "$kpre" "$opre" "$same"
  done
done
