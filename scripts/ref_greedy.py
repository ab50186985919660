#!/usr/bin/env python3
"""Greedy decoding with a KV cache in onnxruntime (CPU), the reference for `kiln-run --greedy`.

Same loop as kiln-run: prefill with all ids and an empty past ([1, kv_heads, 0, head_dim], the declared element type),
then one token at a time feeding present.* back as past_key_values.*; attention_mask all ones of length past+seq,
position_ids past..past+seq. Prints a JSON list: {"model", "ids", "steps", "tokens", "onnxruntime"} per model, one a line.

    .venv/bin/python scripts/ref_greedy.py MODEL.onnx [MODEL.onnx ...] --ids 1,2,3 --greedy 10 [--threads 1]
"""
import argparse
import json
import os
import re
import sys
import time

import numpy as np
import onnxruntime as ort

TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}


def kv_slot(name):
    low = name.lower()
    k, v = low.rfind("key"), low.rfind("value")
    kind = "kv" if k < 0 and v < 0 else ("key" if k > v else "value")
    digits = re.findall(r"\d+", low)
    return (int(digits[-1]), kind) if digits else None


def read_config(model):
    d = os.path.dirname(os.path.abspath(model))
    for c in (d, os.path.dirname(d)):
        p = os.path.join(c, "config.json")
        if os.path.isfile(p):
            with open(p) as f:
                return json.load(f)
    return {}


def empty_past(inp, model):
    cfg = read_config(model)
    heads = cfg.get("num_attention_heads", cfg.get("n_head"))
    kv_heads = cfg.get("num_key_value_heads", heads)
    hidden = cfg.get("hidden_size", cfg.get("n_embd"))
    head_dim = cfg.get("head_dim", hidden // heads if hidden and heads else None)
    shape = list(inp.shape) if inp.shape is not None else [None] * 4
    rank = len(shape)
    seq_axis = next(
        (i for i, d in enumerate(shape) if isinstance(d, str) and any(s in d.lower() for s in ("past", "seq", "total", "len"))),
        rank - 2,
    )
    dims = []
    for i, d in enumerate(shape):
        if i == seq_axis:
            dims.append(0)
        elif isinstance(d, int):
            dims.append(d)
        elif i == 0:
            dims.append(1)
        elif i == rank - 1:
            dims.append(head_dim)
        elif i == 1:
            dims.append(kv_heads)
        else:
            dims.append(1)
    return np.zeros(dims, dtype=TYPES[inp.type])


def greedy(model, ids, steps, threads, times=None):
    """Returns the generated ids; appends each step's milliseconds (prefill first) to `times` when given."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    ins = sess.get_inputs()
    outs = [o.name for o in sess.get_outputs()]
    logits_name = "logits" if "logits" in outs else next((o for o in outs if "logits" in o.lower()), outs[0])
    presents = [o for o in outs if o != logits_name]
    roles = {}
    pasts = []
    for i in ins:
        n = i.name.lower()
        if "input_ids" in n:
            roles["ids"] = i
        elif "attention_mask" in n:
            roles["mask"] = i
        elif "position_ids" in n:
            roles["pos"] = i
        elif "use_cache" in n:
            roles["use_cache"] = i
        elif "past" in n or "cache" in n:
            pasts.append(i)
        else:
            sys.exit(f"do not know how to feed input {i.name}")
    pair = {}
    for p in pasts:
        for a, b in (("past_key_values", "present"), ("past_key_values", "present_key_values"), ("past", "present")):
            c = p.name.replace(a, b, 1)
            if c != p.name and c in presents:
                pair[p.name] = c
                break
    if len(pair) < len(pasts):
        slots = {kv_slot(o): o for o in presents}
        for p in pasts:
            pair.setdefault(p.name, slots.get(kv_slot(p.name)))
    if any(v is None for v in pair.values()):
        pair = {p.name: o for p, o in zip(pasts, presents)}
    cache = {p.name: empty_past(p, model) for p in pasts}
    past_len, feed, tokens = 0, list(ids), []
    for _ in range(steps):
        t0 = time.perf_counter()
        seq = len(feed)
        feeds = {roles["ids"].name: np.array([feed], dtype=TYPES[roles["ids"].type])}
        if "mask" in roles:
            feeds[roles["mask"].name] = np.ones((1, past_len + seq), dtype=TYPES[roles["mask"].type])
        if "pos" in roles:
            feeds[roles["pos"].name] = np.arange(past_len, past_len + seq, dtype=TYPES[roles["pos"].type])[None, :]
        if "use_cache" in roles:
            feeds[roles["use_cache"].name] = np.array([past_len > 0])
        feeds.update(cache)
        result = dict(zip(outs, sess.run(outs, feeds)))
        logits = result[logits_name]
        nxt = int(np.argmax(logits.reshape(-1, logits.shape[-1])[-1].astype(np.float32)))
        tokens.append(nxt)
        cache = {p: result[o] for p, o in pair.items()}
        past_len += seq
        feed = [nxt]
        if times is not None:
            times.append((time.perf_counter() - t0) * 1e3)
    return tokens


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--ids", required=True)
    ap.add_argument("--greedy", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--root", default=None, help="print model paths relative to this folder")
    a = ap.parse_args()
    ids = [int(x) for x in a.ids.split(",") if x.strip()]
    results = []
    for m in a.models:
        tokens = greedy(m, ids, a.greedy, a.threads)
        name = os.path.relpath(m, a.root) if a.root else m
        results.append({"model": name, "ids": ids, "steps": a.greedy, "tokens": tokens, "onnxruntime": ort.__version__})
    print("[\n" + ",\n".join(" " + json.dumps(r) for r in results) + "\n]")


if __name__ == "__main__":
    main()
