"""Generates ONNX Attention (opset 23) cases with onnxruntime CPU as the reference.

Each case is a folder with `model.onnx` (one Attention node) and `data.onnx`: a carrier model whose graph
initializers are the inputs (named as the model's inputs) and the expected outputs (named `expected:<output>`).
Packing tensors as initializers lets the Rust test decode them with tract's own ONNX loader.

Run from the repository root: .venv/bin/python ops/tests/data/attention/generate.py
"""

import os

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

HERE = os.path.dirname(os.path.abspath(__file__))
OPSET = 23


def make_case(name, inputs, attrs, outputs=("Y", "present_key", "present_value"), seed=0):
    """inputs: list of (onnx input name, array or None for an omitted optional input)."""
    names = [n if a is not None else "" for n, a in inputs]
    while names and names[-1] == "":
        names.pop()
    node = helper.make_node("Attention", names, list(outputs), **attrs)
    graph_inputs = [
        helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), list(a.shape))
        for n, a in inputs
        if a is not None
    ]
    elem = helper.np_dtype_to_tensor_dtype(inputs[0][1].dtype)
    graph_outputs = [helper.make_tensor_value_info(o, elem, None) for o in outputs if o]
    graph = helper.make_graph([node], name, graph_inputs, graph_outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 10
    feeds = {n: a for n, a in inputs if a is not None}
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, feeds)
    ref = ReferenceEvaluator(model).run(None, feeds)
    for o, g, r in zip([o for o in outputs if o], got, ref):
        diff = np.nanmax(np.abs(g.astype(np.float64) - r.astype(np.float64))) if g.size else 0.0
        print(f"{name}: {o} {g.shape} ort vs onnx reference maxdiff {diff:.2e}")
    folder = os.path.join(HERE, name)
    os.makedirs(folder, exist_ok=True)
    onnx.save(model, os.path.join(folder, "model.onnx"))
    inits = [numpy_helper.from_array(a, n) for n, a in inputs if a is not None]
    inits += [numpy_helper.from_array(g, "expected:" + o) for o, g in zip([o for o in outputs if o], got)]
    carrier = helper.make_model(
        helper.make_graph([], "data", [], [], initializer=inits), opset_imports=[helper.make_opsetid("", OPSET)]
    )
    onnx.save(carrier, os.path.join(folder, "data.onnx"))


def rnd(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def main():
    rng = np.random.default_rng(7)
    B, HQ, HKV, D = 2, 4, 2, 8

    # prefill continuing a cache: past 3, 4 new queries, GQA, bool mask [B, 1, S, T] with a padded key, causal
    P, S = 3, 4
    T = P + S
    mask = np.ones((B, 1, S, T), dtype=bool)
    mask[1, :, :, 0] = False  # batch 1's first key is padding
    make_case(
        "bool_mask_past_causal_gqa_4d",
        [
            ("Q", rnd(rng, B, HQ, S, D)),
            ("K", rnd(rng, B, HKV, S, D)),
            ("V", rnd(rng, B, HKV, S, D)),
            ("attn_mask", mask),
            ("past_key", rnd(rng, B, HKV, P, D)),
            ("past_value", rnd(rng, B, HKV, P, D)),
        ],
        dict(is_causal=1),
    )

    # one decode step with a 2D bool mask [S, T] and past, causal (the offset lets the query see every key)
    P, S = 5, 1
    T = P + S
    mask = np.ones((S, T), dtype=bool)
    mask[:, 1] = False
    make_case(
        "bool_mask_past_causal_decode_4d",
        [
            ("Q", rnd(rng, B, HQ, S, D)),
            ("K", rnd(rng, B, HKV, S, D)),
            ("V", rnd(rng, B, HKV, S, D)),
            ("attn_mask", mask),
            ("past_key", rnd(rng, B, HKV, P, D)),
            ("past_value", rnd(rng, B, HKV, P, D)),
        ],
        dict(is_causal=1),
    )

    # causal + past without a mask
    P, S = 2, 3
    make_case(
        "past_causal_no_mask_4d",
        [
            ("Q", rnd(rng, B, HQ, S, D)),
            ("K", rnd(rng, B, HQ, S, D)),
            ("V", rnd(rng, B, HQ, S, D)),
            ("attn_mask", None),
            ("past_key", rnd(rng, B, HQ, P, D)),
            ("past_value", rnd(rng, B, HQ, P, D)),
        ],
        dict(is_causal=1),
    )

    # 3D inputs, bool mask 2D, past, no causal, explicit scale
    P, S = 2, 3
    T = P + S
    mask = rng.random((S, T)) > 0.3
    mask[:, -1] = True
    make_case(
        "bool_mask_past_3d",
        [
            ("Q", rnd(rng, B, S, HQ * D)),
            ("K", rnd(rng, B, S, HKV * D)),
            ("V", rnd(rng, B, S, HKV * D)),
            ("attn_mask", mask),
            ("past_key", rnd(rng, B, HKV, P, D)),
            ("past_value", rnd(rng, B, HKV, P, D)),
        ],
        dict(q_num_heads=HQ, kv_num_heads=HKV, scale=0.2),
    )

    # float additive mask + causal + past, 3D
    P, S = 3, 2
    T = P + S
    fmask = rnd(rng, S, T)
    make_case(
        "float_mask_past_causal_3d",
        [
            ("Q", rnd(rng, B, S, HQ * D)),
            ("K", rnd(rng, B, S, HKV * D)),
            ("V", rnd(rng, B, S, HKV * D)),
            ("attn_mask", fmask),
            ("past_key", rnd(rng, B, HKV, P, D)),
            ("past_value", rnd(rng, B, HKV, P, D)),
        ],
        dict(q_num_heads=HQ, kv_num_heads=HKV, is_causal=1),
    )

    # a query whose keys are all masked (left padding): onnxruntime returns a zero row (onnx's reference, NaN)
    P, S = 2, 3
    T = P + S
    mask = np.ones((B, 1, S, T), dtype=bool)
    mask[0, :, 0, :] = False
    make_case(
        "fully_masked_row_bool_past_causal_4d",
        [
            ("Q", rnd(rng, B, HQ, S, D)),
            ("K", rnd(rng, B, HKV, S, D)),
            ("V", rnd(rng, B, HKV, S, D)),
            ("attn_mask", mask),
            ("past_key", rnd(rng, B, HKV, P, D)),
            ("past_value", rnd(rng, B, HKV, P, D)),
        ],
        dict(is_causal=1),
    )


if __name__ == "__main__":
    main()
