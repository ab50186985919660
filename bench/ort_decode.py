#!/usr/bin/env python3
"""onnxruntime CPU greedy decode timing, the same loop as `kiln-run --greedy` (scripts/ref_greedy.py).

    .venv/bin/python bench/ort_decode.py MODEL.onnx --ids 1,2,3 --greedy 32 --threads 1
prints one JSON line: {"prefill_ms", "decode_ms" (mean over the single-token steps), "tokens", "threads"}.
"""
import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))
from ref_greedy import greedy  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--ids", required=True)
    ap.add_argument("--greedy", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    ids = [int(x) for x in a.ids.split(",")]
    times = []
    tokens = greedy(a.model, ids, a.greedy, a.threads, times)
    decode = times[1:]
    print(json.dumps({
        "prefill_ms": round(times[0], 3),
        "decode_ms": round(statistics.mean(decode), 3) if decode else None,
        "tokens": tokens,
        "threads": a.threads,
    }))


if __name__ == "__main__":
    main()
