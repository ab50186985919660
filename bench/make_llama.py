#!/usr/bin/env python3
"""Writes a Llama-shaped fp32 decoder with random weights (onnx.helper only, no torch), for benchmarks.

Default shape: SmolLM2-135M (30 layers, hidden 576, 9 heads, 3 kv heads, head 64, MLP 1536, vocab 49152), ~650 MB.
Same interface as optimum's text-generation-with-past export: inputs input_ids, attention_mask, position_ids,
past_key_values.{i}.{key,value}; outputs logits, present.{i}.{key,value}. Also writes config.json.
Attention as optimum exports transformers' Llama: q and the repeat_kv'd k each scaled by head^-1/4, MatMul, additive
mask, Softmax, MatMul (`--grouped-rows`: the older g*S-rows-per-kv-head GQA layout).

    .venv/bin/python bench/make_llama.py OUT_DIR [--layers 30 --hidden 576 --heads 9 --kv-heads 3 --mlp 1536 --vocab 49152]
                                                 [--fp16]

`--fp16`: the same model in float16 (every float tensor, input and output; the additive mask's -1e9 as -65504, as
fp16 exports clip it), ~270 MB.
"""
import argparse
import json
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def build(layers, hidden, heads, kv_heads, mlp, vocab, max_pos=2048, theta=100000.0, eps=1e-5, seed=0, grouped_rows=False):
    rng = np.random.default_rng(seed)
    d = hidden // heads
    g = heads // kv_heads
    nodes, inits = [], []
    counter = [0]

    def name(prefix):
        counter[0] += 1
        return f"{prefix}_{counter[0]}"

    def const(value, prefix="c", dtype=None):
        n = name(prefix)
        arr = np.array(value, dtype=dtype) if not isinstance(value, np.ndarray) else value
        inits.append(numpy_helper.from_array(arr, n))
        return n

    def node(op, inputs, prefix=None, **attrs):
        out = name(prefix or op.lower())
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def weight(shape, scale=0.02, prefix="w"):
        return const((rng.standard_normal(shape, dtype=np.float32) * scale).astype(np.float32), prefix)

    def rmsnorm(x, prefix):
        w = const(np.ones([hidden], np.float32), prefix + "_weight")
        sq = node("Mul", [x, x])
        mean = node("ReduceMean", [sq, const([-1], dtype=np.int64)], keepdims=1)
        rs = node("Sqrt", [node("Add", [mean, const(np.float32(eps))])])
        return node("Mul", [node("Div", [x, rs]), w])

    def rope(x, cos, sin):
        half = d // 2
        axes = const([-1], dtype=np.int64)
        x1 = node("Slice", [x, const([0], dtype=np.int64), const([half], dtype=np.int64), axes])
        x2 = node("Slice", [x, const([half], dtype=np.int64), const([d], dtype=np.int64), axes])
        rot = node("Concat", [node("Neg", [x2]), x1], axis=-1)
        return node("Add", [node("Mul", [x, cos]), node("Mul", [rot, sin])])

    # rotary tables [max_pos, d]
    inv = 1.0 / (theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    freqs = np.outer(np.arange(max_pos, dtype=np.float64), inv)
    emb = np.concatenate([freqs, freqs], axis=-1)
    cos_t = const(np.cos(emb).astype(np.float32), "cos_cached")
    sin_t = const(np.sin(emb).astype(np.float32), "sin_cached")
    cos = node("Unsqueeze", [node("Gather", [cos_t, "position_ids"]), const([1], dtype=np.int64)])  # [B,1,S,d]
    sin = node("Unsqueeze", [node("Gather", [sin_t, "position_ids"]), const([1], dtype=np.int64)])

    # mask [B,1,S,T] additive: causal (key j visible to query i when j <= past + i) and attention_mask
    total = node("Gather", [node("Shape", ["attention_mask"]), const(np.int64(1))])
    seq = node("Gather", [node("Shape", ["input_ids"]), const(np.int64(1))])
    past = node("Sub", [total, seq])
    q_idx = node("Unsqueeze", [node("Range", [past, total, const(np.int64(1))]), const([1], dtype=np.int64)])
    k_idx = node("Unsqueeze", [node("Range", [const(np.int64(0)), total, const(np.int64(1))]), const([0], dtype=np.int64)])
    causal = node("LessOrEqual", [k_idx, q_idx])  # [S,T]
    am = node("Cast", [node("Unsqueeze", ["attention_mask", const([1, 2], dtype=np.int64)])], to=TensorProto.BOOL)
    allowed = node("And", [causal, am])  # [B,1,S,T]
    mask = node("Where", [allowed, const(np.float32(0.0)), const(np.float32(-1e9))])
    mask_g = (node("Concat", [mask] * g, axis=2) if g > 1 else mask) if grouped_rows else None  # [B,1,g*S,T]

    x = node("Gather", [weight([vocab, hidden], prefix="embed_tokens"), "input_ids"])
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info(
            "attention_mask", TensorProto.INT64, ["batch_size", "past_sequence_length + sequence_length"]
        ),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
    ]
    outputs = []
    scale = const(np.float32(1.0 / np.sqrt(d)))
    quarter = const(np.float32(d ** -0.25))
    perm = [0, 2, 1, 3]
    for i in range(layers):
        h = rmsnorm(x, f"l{i}_input_norm")
        q = node("Transpose", [node("Reshape", [node("MatMul", [h, weight([hidden, heads * d])]), const([0, 0, heads, d], dtype=np.int64)])], perm=perm)
        k = node("Transpose", [node("Reshape", [node("MatMul", [h, weight([hidden, kv_heads * d])]), const([0, 0, kv_heads, d], dtype=np.int64)])], perm=perm)
        v = node("Transpose", [node("Reshape", [node("MatMul", [h, weight([hidden, kv_heads * d])]), const([0, 0, kv_heads, d], dtype=np.int64)])], perm=perm)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        for kind in ("key", "value"):
            inputs.append(
                helper.make_tensor_value_info(
                    f"past_key_values.{i}.{kind}", TensorProto.FLOAT, ["batch_size", kv_heads, "past_sequence_length", d]
                )
            )
        pk, pv = f"present.{i}.key", f"present.{i}.value"
        nodes.append(helper.make_node("Concat", [f"past_key_values.{i}.key", k], [pk], name=pk, axis=2))
        nodes.append(helper.make_node("Concat", [f"past_key_values.{i}.value", v], [pv], name=pv, axis=2))
        for n in (pk, pv):
            outputs.append(
                helper.make_tensor_value_info(
                    n, TensorProto.FLOAT, ["batch_size", kv_heads, "past_sequence_length + sequence_length", d]
                )
            )
        if grouped_rows:
            # grouped-query attention: the g query heads of a kv head become g*S rows
            qg = node("Reshape", [q, const([0, kv_heads, -1, d], dtype=np.int64)])
            scores = node("Mul", [node("MatMul", [qg, node("Transpose", [pk], perm=[0, 1, 3, 2])]), scale])
            probs = node("Softmax", [node("Add", [scores, mask_g])], axis=-1)
            ctx = node("Reshape", [node("MatMul", [probs, pv]), const([0, heads, -1, d], dtype=np.int64)])
        else:
            # transformers' repeat_kv (what optimum exports): [B, kv, T, D] → [B, kv, g, T, D] → [B, H, T, D]
            def repeat_kv(t):
                if g == 1:
                    return t
                shape = node("Shape", [t])
                b_, t_ = node("Gather", [shape, const(np.int64(0))]), node("Gather", [shape, const(np.int64(2))])
                unsq = lambda x: node("Unsqueeze", [x, const([0], dtype=np.int64)])  # noqa: E731
                big = node("Concat", [unsq(b_), const([kv_heads, g], dtype=np.int64), unsq(t_), const([d], dtype=np.int64)], axis=0)
                flat = node("Concat", [unsq(b_), const([heads], dtype=np.int64), unsq(t_), const([d], dtype=np.int64)], axis=0)
                e = node("Expand", [node("Unsqueeze", [t, const([2], dtype=np.int64)]), big])
                return node("Reshape", [e, flat])
            kr, vr = repeat_kv(pk), repeat_kv(pv)
            # optimum's SDPA export scales q and the repeated k by d^-1/4 each (as SmolLM2's export does)
            qs, ks = node("Mul", [q, quarter]), node("Mul", [kr, quarter])
            scores = node("MatMul", [qs, node("Transpose", [ks], perm=[0, 1, 3, 2])])
            probs = node("Softmax", [node("Add", [scores, mask])], axis=-1)
            ctx = node("MatMul", [probs, vr])
        ctx = node("Reshape", [node("Transpose", [ctx], perm=perm), const([0, 0, hidden], dtype=np.int64)])
        x = node("Add", [x, node("MatMul", [ctx, weight([heads * d, hidden])])])
        h = rmsnorm(x, f"l{i}_post_attention_norm")
        gate = node("MatMul", [h, weight([hidden, mlp])])
        up = node("MatMul", [h, weight([hidden, mlp])])
        act = node("Mul", [node("Mul", [gate, node("Sigmoid", [gate])]), up])
        x = node("Add", [x, node("MatMul", [act, weight([mlp, hidden])])])
    h = rmsnorm(x, "final_norm")
    nodes.append(helper.make_node("MatMul", [h, weight([hidden, vocab], prefix="lm_head")], ["logits"], name="lm_head"))
    outputs.insert(0, helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", vocab]))
    graph = helper.make_graph(nodes, "llama", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="kiln bench/make_llama.py")
    model.ir_version = 8
    return model


def to_fp16(model):
    """Every float initializer, input and output as float16 (values clipped to float16's finite range)."""
    for t in model.graph.initializer:
        if t.data_type == TensorProto.FLOAT:
            arr = np.clip(numpy_helper.to_array(t), -65504.0, 65504.0).astype(np.float16)
            t.CopyFrom(numpy_helper.from_array(arr, t.name))
    for vi in list(model.graph.input) + list(model.graph.output):
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
            vi.type.tensor_type.elem_type = TensorProto.FLOAT16
    return model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--mlp", type=int, default=1536)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--grouped-rows", action="store_true",
                    help="GQA as g*S query rows per kv head (the older layout) instead of transformers' repeat_kv")
    ap.add_argument("--fp16", action="store_true", help="the model in float16")
    a = ap.parse_args()
    model = build(a.layers, a.hidden, a.heads, a.kv_heads, a.mlp, a.vocab, grouped_rows=a.grouped_rows)
    if a.fp16:
        model = to_fp16(model)
    os.makedirs(a.out_dir, exist_ok=True)
    path = os.path.join(a.out_dir, "model.onnx")
    onnx.save(model, path)
    onnx.checker.check_model(path)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "num_hidden_layers": a.layers,
        "hidden_size": a.hidden,
        "num_attention_heads": a.heads,
        "num_key_value_heads": a.kv_heads,
        "head_dim": a.hidden // a.heads,
        "intermediate_size": a.mlp,
        "vocab_size": a.vocab,
        "torch_dtype": "float16" if a.fp16 else "float32",
        "note": "random weights (seed 0), written by kiln's bench/make_llama.py",
    }
    with open(os.path.join(a.out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    print(f"{path}: {os.path.getsize(path) / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
