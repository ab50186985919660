"""One-node com.microsoft models (GroupQueryAttention, MultiHeadAttention, the norm family) with random inputs and
onnxruntime's outputs, as ONNX backend-test cases: OUT/<case>/model.onnx, OUT/<case>/test_data_set_0/input_j.pb,
output_j.pb. kiln's tests (provider/tests/gpu_msft_attention.rs, gpu_norms.rs) run them on kiln's CPU and GPU.

Usage: python scripts/msft_ops_cases.py OUT [gqa|mha|norms ...] (all families when none is named)
Rows of a GroupQueryAttention present_key / present_value past a batch's new tokens are unspecified in
onnxruntime (uninitialised memory); they are written as zeros in the reference, as kiln writes them.
"""
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

F32 = TensorProto.FLOAT


def make(name, node, inputs, outputs):
    graph = helper.make_graph(
        [node],
        name,
        [helper.make_tensor_value_info(n, t, list(a.shape)) for n, t, a in inputs],
        [helper.make_tensor_value_info(n, F32, None) for n in outputs],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 8
    return model


def save(out, name, node, inputs, outputs, reference=None, post=None):
    """inputs: [(name, elem_type, array)] in graph order. reference: (node, inputs) of an equivalent model that
    onnxruntime runs instead (packed layouts its CPU kernel lacks)."""
    model = make(name, node, inputs, outputs)
    ref_model, ref_inputs = (model, inputs) if reference is None else (make(name, reference[0], reference[1], outputs), reference[1])
    sess = ort.InferenceSession(ref_model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {n: a for n, _, a in ref_inputs})
    if post:
        got = post(got)
    d = os.path.join(out, name)
    os.makedirs(os.path.join(d, "test_data_set_0"), exist_ok=True)
    onnx.save(model, os.path.join(d, "model.onnx"))
    for j, (n, _, a) in enumerate(inputs):
        with open(os.path.join(d, "test_data_set_0", f"input_{j}.pb"), "wb") as f:
            f.write(numpy_helper.from_array(a, n).SerializeToString())
    for j, (n, a) in enumerate(zip(outputs, got)):
        with open(os.path.join(d, "test_data_set_0", f"output_{j}.pb"), "wb") as f:
            f.write(numpy_helper.from_array(np.asarray(a, dtype=np.float32), n).SerializeToString())


def rnd(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def gqa(out, rng):
    cases = [
        # name, batch, seq, past, heads, kv heads, head, seqlens_k (None: past + seq - 1), extra attrs
        ("gqa_prefill_r2", 1, 5, 0, 4, 2, 16, None, {}),
        ("gqa_prefill_r1_odd_heads", 2, 4, 0, 3, 3, 16, None, {}),
        ("gqa_decode_r3_past1", 1, 1, 1, 3, 1, 16, None, {}),
        ("gqa_decode_r4_past7", 2, 1, 7, 8, 2, 32, None, {}),
        ("gqa_decode_r4_long", 1, 1, 300, 4, 1, 64, None, {}),
        ("gqa_prompt_after_past", 1, 3, 4, 6, 2, 16, None, {}),
        ("gqa_decode_padded_batch", 2, 1, 6, 4, 2, 16, [6, 3], {}),
        ("gqa_prefill_padded_batch", 2, 4, 0, 2, 1, 16, [3, 1], {}),
        ("gqa_packed_qkv", 1, 3, 2, 4, 2, 16, None, {"packed": 1}),
        ("gqa_rotary", 1, 3, 5, 4, 2, 16, None, {"do_rotary": 1}),
        ("gqa_rotary_interleaved_decode", 2, 1, 4, 4, 2, 16, [4, 2], {"do_rotary": 1, "rotary_interleaved": 1}),
        ("gqa_rotary_partial", 1, 2, 3, 2, 1, 32, None, {"do_rotary": 1, "rot_dim": 16}),
        ("gqa_window_softcap", 1, 6, 3, 4, 2, 16, None, {"local_window_size": 2, "softcap": 1.5, "big": 1}),
        ("gqa_scale", 1, 2, 3, 5, 5, 16, None, {"scale": 0.3}),
    ]
    for name, b, s, p, n, nkv, h, seqlens, extra in cases:
        extra = dict(extra)
        packed = extra.pop("packed", 0)
        rot_dim = extra.pop("rot_dim", h)
        amp = 3.0 if extra.pop("big", 0) else 1.0
        total = p + s
        if seqlens is None:
            seqlens = [total - 1] * b
        seqlens = np.array(seqlens, dtype=np.int32)
        q = rnd(rng, b, s, n * h, scale=amp)
        k = rnd(rng, b, s, nkv * h, scale=amp)
        v = rnd(rng, b, s, nkv * h)
        ins = []
        if packed:
            ins += [("query", F32, np.concatenate([q, k, v], axis=2)), ("", F32, None), ("", F32, None)]
        else:
            ins += [("query", F32, q), ("key", F32, k), ("value", F32, v)]
        if p > 0:
            ins += [("past_key", F32, rnd(rng, b, nkv, p, h)), ("past_value", F32, rnd(rng, b, nkv, p, h))]
        else:
            ins += [("", F32, None), ("", F32, None)]
        ins += [
            ("seqlens_k", TensorProto.INT32, seqlens),
            ("total_sequence_length", TensorProto.INT32, np.array(total, dtype=np.int32)),
        ]
        if extra.get("do_rotary"):
            maxpos = total + 4
            inv = 1.0 / (10000 ** (np.arange(0, rot_dim, 2) / rot_dim))
            ang = np.outer(np.arange(maxpos), inv)
            ins += [("cos_cache", F32, np.cos(ang).astype(np.float32)), ("sin_cache", F32, np.sin(ang).astype(np.float32))]
        attrs = {"num_heads": n, "kv_num_heads": nkv, **extra}
        node = helper.make_node(
            "GroupQueryAttention",
            [x[0] for x in ins],
            ["output", "present_key", "present_value"],
            domain="com.microsoft",
            **attrs,
        )
        given = [x for x in ins if x[0]]

        def post(got, seqlens=seqlens, s=s):
            for t in (got[1], got[2]):
                for bi, sl in enumerate(seqlens):
                    pb = max(int(sl) + 1 - s, 0)
                    t[bi, :, pb + s :, :] = 0
            return got

        save(out, name, node, given, ["output", "present_key", "present_value"], None, post)


def mha(out, rng):
    I32 = TensorProto.INT32
    cases = [
        # name, batch, seq, kv seq, past, heads, head, options
        ("mha_self", 1, 5, 5, 0, 4, 16, {}),
        ("mha_odd_heads_cross", 2, 3, 7, 0, 3, 16, {}),
        ("mha_bias", 2, 4, 4, 0, 2, 16, {"bias": 1}),
        ("mha_causal_past1", 1, 1, 1, 1, 4, 16, {"unidirectional": 1}),
        ("mha_causal_past_odd", 2, 3, 3, 7, 5, 16, {"unidirectional": 1}),
        ("mha_past_long", 1, 1, 1, 300, 2, 64, {}),
        ("mha_padding_mask_2d", 2, 1, 1, 6, 4, 16, {"mask2d": [[1] * 7, [1] * 4 + [0] * 3]}),
        ("mha_key_lengths_1d", 2, 3, 6, 0, 2, 16, {"mask1d": [6, 2]}),
        ("mha_attention_bias", 2, 3, 5, 0, 4, 16, {"attn_bias": (2, 1)}),
        ("mha_bnsh_kv", 1, 4, 6, 0, 2, 32, {"bnsh": 1}),
        ("mha_packed_qkv", 2, 3, 3, 0, 2, 16, {"packed_qkv": 1, "bias": 1}),
        ("mha_packed_kv", 1, 2, 5, 0, 3, 16, {"packed_kv": 1}),
        ("mha_scale_mask_filter", 1, 2, 4, 0, 2, 16, {"scale": 0.2, "mask_filter_value": -5.0, "mask2d": [[1, 0, 1, 1]]}),
    ]
    for name, b, s, l, p, n, h, o in cases:
        d = n * h
        q = rnd(rng, b, s, d)
        k = rnd(rng, b, l, d)
        v = rnd(rng, b, l, d)
        ins = []
        if o.get("packed_qkv"):
            qkv = np.stack([x.reshape(b, s, n, h) for x in (q, k, v)], axis=3)
            ins += [("query", F32, qkv), ("", F32, None), ("", F32, None)]
        elif o.get("packed_kv"):
            kv = np.stack([x.reshape(b, l, n, h) for x in (k, v)], axis=3)
            ins += [("query", F32, q), ("key", F32, kv), ("", F32, None)]
        elif o.get("bnsh"):
            kb = k.reshape(b, l, n, h).transpose(0, 2, 1, 3).copy()
            vb = v.reshape(b, l, n, h).transpose(0, 2, 1, 3).copy()
            ins += [("query", F32, q), ("key", F32, kb), ("value", F32, vb)]
        else:
            ins += [("query", F32, q), ("key", F32, k), ("value", F32, v)]
        ins.append(("bias", F32, rnd(rng, 3 * d)) if o.get("bias") else ("", F32, None))
        if "mask2d" in o:
            ins.append(("key_padding_mask", I32, np.array(o["mask2d"], dtype=np.int32)))
        elif "mask1d" in o:
            ins.append(("key_padding_mask", I32, np.array(o["mask1d"], dtype=np.int32)))
        else:
            ins.append(("", I32, None))
        if "attn_bias" in o:
            bb, bn = o["attn_bias"]
            ins.append(("attention_bias", F32, rnd(rng, bb, bn, s, p + l)))
        else:
            ins.append(("", F32, None))
        if p > 0:
            ins += [("past_key", F32, rnd(rng, b, n, p, h)), ("past_value", F32, rnd(rng, b, n, p, h))]
        attrs = {"num_heads": n}
        for a in ("unidirectional", "scale", "mask_filter_value"):
            if a in o:
                attrs[a] = o[a]
        names = [x[0] for x in ins]
        while names and not names[-1]:
            names.pop()
        outs = ["output", "present_key", "present_value"] if p > 0 else ["output"]
        node = helper.make_node("MultiHeadAttention", names, outs, domain="com.microsoft", **attrs)
        reference = None
        if o.get("packed_qkv") or o.get("packed_kv"):
            # onnxruntime's CPU kernel takes no packed layout: its reference is the same numbers unpacked
            ref_ins = [("query", F32, q), ("key", F32, k), ("value", F32, v)] + ins[3:]
            ref_names = [x[0] for x in ref_ins]
            while ref_names and not ref_names[-1]:
                ref_names.pop()
            ref_node = helper.make_node("MultiHeadAttention", ref_names, outs, domain="com.microsoft", **attrs)
            reference = (ref_node, [x for x in ref_ins if x[0]])
        save(out, name, node, [x for x in ins if x[0]], outs, reference)


def norms(out, rng):
    # name, op, x shape, skip shape (None: no skip), bias, beta, sum output, epsilon
    cases = [
        ("ssln_64", "SkipSimplifiedLayerNormalization", (2, 3, 64), (2, 3, 64), False, False, True, 1e-6),
        ("ssln_bias_96", "SkipSimplifiedLayerNormalization", (1, 5, 96), (1, 5, 96), True, False, True, 1e-5),
        ("ssln_skip2d_300", "SkipSimplifiedLayerNormalization", (2, 3, 300), (3, 300), False, False, False, 1e-6),
        ("sln_64", "SkipLayerNormalization", (2, 4, 64), (2, 4, 64), False, True, True, 1e-12),
        ("sln_bias_beta_1000", "SkipLayerNormalization", (1, 2, 1000), (1, 2, 1000), True, True, True, 1e-5),
        ("sln_no_beta_130", "SkipLayerNormalization", (3, 1, 130), (3, 1, 130), False, False, False, 1e-5),
        ("simplified_96", "SimplifiedLayerNormalization", (2, 5, 96), None, False, False, False, 1e-6),
        ("simplified_2d_512", "SimplifiedLayerNormalization", (7, 512), None, False, False, False, 1e-5),
    ]
    for name, op, xs, ss, has_bias, has_beta, want_sum, eps in cases:
        d = xs[-1]
        ins = [("input", F32, rnd(rng, *xs, scale=2.0) + 0.5)]
        if op == "SimplifiedLayerNormalization":
            ins.append(("scale", F32, rnd(rng, d)))
            node = helper.make_node(op, [x[0] for x in ins], ["output"], epsilon=eps, axis=-1)
            save(out, name, node, ins, ["output"])
            continue
        ins.append(("skip", F32, rnd(rng, *ss)))
        ins.append(("gamma", F32, rnd(rng, d)))
        if op == "SkipLayerNormalization":
            ins.append(("beta", F32, rnd(rng, d)) if has_beta else ("", F32, None))
        if has_bias:
            ins.append(("bias", F32, rnd(rng, d)))
        outs = ["output", "", "", "input_skip_bias_sum"] if want_sum else ["output"]
        node = helper.make_node(op, [x[0] for x in ins], outs, domain="com.microsoft", epsilon=eps)
        save(out, name, node, [x for x in ins if x[0]], [o for o in outs if o])


def rmsfuse(out, rng):
    """Residual Add + RMSNorm as exporters write it (kiln's GPU lowering fuses each into one NormOp)."""
    n = helper.make_node
    c = lambda name, v: helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(v, dtype=np.float32), name))
    for name, d, shape, variant in [
        ("rms_optimum_pow_div", 64, (2, 3, 64), "div"),
        ("rms_dynamo_rsqrt", 96, (1, 4, 96), "rsqrt"),
        ("rms_onnx_op23", 300, (2, 2, 300), "onnx"),
    ]:
        a = rnd(rng, *shape)
        b = rnd(rng, *shape)
        g = rnd(rng, d)
        nodes = [n("Add", ["a", "b"], ["h"])]
        if variant == "onnx":
            nodes.append(n("RMSNormalization", ["h", "gamma"], ["y"], axis=-1, epsilon=1e-6))
            opset = 23
        else:
            nodes += [c("two", 2.0), c("eps", 1e-6), c("one", 1.0)]
            nodes += [n("Pow", ["h", "two"], ["sq"]), n("ReduceMean", ["sq"], ["ms"], axes=[-1], keepdims=1),
                      n("Add", ["ms", "eps"], ["mse"])]
            if variant == "div":
                nodes += [n("Sqrt", ["mse"], ["rt"]), n("Div", ["one", "rt"], ["inv"])]
            else:
                nodes += [n("Sqrt", ["mse"], ["rt"]), n("Reciprocal", ["rt"], ["inv"])]
            nodes += [n("Mul", ["h", "inv"], ["normed"]), n("Mul", ["gamma", "normed"], ["y"])]
            opset = 17
        # the residual sum is an output too (the next layer's residual)
        graph = helper.make_graph(
            nodes, name,
            [helper.make_tensor_value_info(x, F32, list(shape)) for x in ("a", "b")],
            [helper.make_tensor_value_info("y", F32, None), helper.make_tensor_value_info("h", F32, None)],
            initializer=[numpy_helper.from_array(g, "gamma")],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = 10
        got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, {"a": a, "b": b})
        d_ = os.path.join(out, name)
        os.makedirs(os.path.join(d_, "test_data_set_0"), exist_ok=True)
        onnx.save(model, os.path.join(d_, "model.onnx"))
        for j, (x, arr) in enumerate([("a", a), ("b", b)]):
            with open(os.path.join(d_, "test_data_set_0", f"input_{j}.pb"), "wb") as f:
                f.write(numpy_helper.from_array(arr, x).SerializeToString())
        for j, (x, arr) in enumerate(zip(["y", "h"], got)):
            with open(os.path.join(d_, "test_data_set_0", f"output_{j}.pb"), "wb") as f:
                f.write(numpy_helper.from_array(arr, x).SerializeToString())


def main():
    out = sys.argv[1]
    which = sys.argv[2:] or ["gqa", "mha", "norms", "rmsfuse"]
    rng = np.random.default_rng(20261130)
    for w in which:
        fn = globals().get(w)
        if fn:
            fn(out, rng)


if __name__ == "__main__":
    main()
