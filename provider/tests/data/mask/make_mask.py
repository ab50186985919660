"""Writes the setup-chain models kiln's GPU fusion tests run (provider/tests/gpu_fusion.rs): the 4D attention mask
builders of three export styles (optimum_mask.onnx, dynamo_mask.onnx, rank_mask.onnx: a causal comparison of key
positions with query positions past the cache, joined with the padding of `attention_mask`, turned into 0 / the most
negative float) and transformers' rotary angles (hf_rope_angles.onnx, cut from the tiny llama fixture).

Mask inputs: input_ids [batch, seq] (its shape only), attention_mask [batch, past + seq] (int64), and for the first
two past [batch, 1, past, 1] (its shape only). Output: mask [batch, 1, seq, past + seq] float32.

    .venv/bin/python provider/tests/data/mask/make_mask.py
"""

import os

import onnx
from onnx import TensorProto, helper

i64 = lambda name, v: helper.make_tensor(name, TensorProto.INT64, [len(v)], v)
here = os.path.dirname(os.path.abspath(__file__))


def save(file, nodes, inits, total, opset, ir, past=True):
    """Checks and writes a mask model: `total` names attention_mask's last dim, `past` adds the past input."""
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", total]),
    ]
    if past:
        inputs.append(helper.make_tensor_value_info("past", TensorProto.FLOAT, ["batch", 1, "past", 1]))
    output = helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", 1, "seq", total])
    graph = helper.make_graph(nodes, file[: -len(".onnx")], inputs, [output], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir)
    onnx.checker.check_model(model)
    onnx.save(model, os.path.join(here, file))


nodes = [
    helper.make_node("Shape", ["input_ids"], ["ids_shape"]),
    helper.make_node("Gather", ["ids_shape", "one"], ["S"], axis=0),
    helper.make_node("Gather", ["ids_shape", "zero"], ["B"], axis=0),
    helper.make_node("Shape", ["past"], ["past_shape"]),
    helper.make_node("Gather", ["past_shape", "two"], ["P"], axis=0),
    helper.make_node("Shape", ["attention_mask"], ["mask_shape"]),
    helper.make_node("Gather", ["mask_shape", "one"], ["T"], axis=0),
    # cache_position = arange(P, P + S), kv_arange = arange(T), batch_arange = arange(B)
    helper.make_node("Add", ["P", "S"], ["PS"]),
    helper.make_node("Range", ["P", "PS", "step"], ["cache_position"]),
    helper.make_node("Range", ["zero_s", "T", "step"], ["kv_arange"]),
    helper.make_node("Range", ["zero_s", "B", "step"], ["batch_arange"]),
    helper.make_node("Unsqueeze", ["kv_arange", "axes012"], ["kv4"]),
    helper.make_node("Unsqueeze", ["cache_position", "axes013"], ["q4"]),
    helper.make_node("LessOrEqual", ["kv4", "q4"], ["causal"]),
    # padding: attention_mask.flatten()[batch * T + kv]
    helper.make_node("Cast", ["attention_mask"], ["mask_bool"], to=TensorProto.BOOL),
    helper.make_node("Flatten", ["mask_bool"], ["flat"], axis=2),
    helper.make_node("Reshape", ["flat", "minus_one_one"], ["flat2"]),
    helper.make_node("Unsqueeze", ["batch_arange", "axes123"], ["b4"]),
    helper.make_node("Mul", ["b4", "T"], ["row"]),
    helper.make_node("Add", ["kv4", "row"], ["idx"]),
    helper.make_node("Gather", ["flat2", "idx"], ["pad5"], axis=0),
    # pad_shape: [B, 1, 1, T]
    helper.make_node("Unsqueeze", ["B", "axes0"], ["B1"]),
    helper.make_node("Unsqueeze", ["T", "axes0"], ["T1"]),
    helper.make_node("Concat", ["B1", "one_one", "T1"], ["pad_shape"], axis=0),
    helper.make_node("Reshape", ["pad5", "pad_shape"], ["pad"]),
    helper.make_node("And", ["causal", "pad"], ["keep"]),
    helper.make_node("Where", ["keep", "zero_f", "min_f"], ["mask"]),
]
inits = [
    helper.make_tensor("zero", TensorProto.INT64, [], [0]),
    helper.make_tensor("one", TensorProto.INT64, [], [1]),
    helper.make_tensor("two", TensorProto.INT64, [], [2]),
    helper.make_tensor("zero_s", TensorProto.INT64, [], [0]),
    helper.make_tensor("step", TensorProto.INT64, [], [1]),
    i64("axes012", [0, 1, 2]),
    i64("axes013", [0, 1, 3]),
    i64("axes123", [1, 2, 3]),
    i64("axes0", [0]),
    i64("minus_one_one", [-1, 1]),
    i64("one_one", [1, 1]),
    helper.make_tensor("zero_f", TensorProto.FLOAT, [], [0.0]),
    helper.make_tensor("min_f", TensorProto.FLOAT, [], [-3.4028234663852886e38]),
]
save("optimum_mask.onnx", nodes, inits, "total", 17, 8)

# dynamo_mask.onnx: the same mask as torch.onnx's dynamo exporter writes it (the tiny llama fixture's
# onnx_dynamo_eager_op20 builds it this way): the causal part from `arange(seq) + past` against `arange(past + seq)`,
# the padding looked up by a GatherND over (batch, key) index tuples that Concat two Expanded ranges, joined and
# turned into 0 / the most negative float.
nodes = [
    helper.make_node("Shape", ["input_ids"], ["S1"], start=1, end=2),
    helper.make_node("Squeeze", ["S1"], ["S"]),
    helper.make_node("Shape", ["past"], ["P1"], start=2, end=3),
    helper.make_node("Squeeze", ["P1"], ["P"]),
    helper.make_node("Shape", ["attention_mask"], ["B1"], start=0, end=1),
    helper.make_node("Squeeze", ["B1"], ["B"]),
    helper.make_node("Add", ["P", "S"], ["PS"]),
    helper.make_node("Range", ["zero_s", "PS", "step"], ["kv_arange"]),
    helper.make_node("Unsqueeze", ["kv_arange", "axes0"], ["kv1"]),
    helper.make_node("Unsqueeze", ["kv1", "axes0"], ["kv2"]),
    helper.make_node("Unsqueeze", ["kv2", "axes0"], ["kv4"]),
    helper.make_node("Range", ["zero_s", "S", "step"], ["q_arange"]),
    helper.make_node("Add", ["q_arange", "P"], ["cache_position"]),
    helper.make_node("Unsqueeze", ["cache_position", "axes0"], ["q1"]),
    helper.make_node("Unsqueeze", ["q1", "axes0"], ["q2"]),
    helper.make_node("Unsqueeze", ["q2", "axes_last"], ["q4"]),
    helper.make_node("LessOrEqual", ["kv4", "q4"], ["causal"]),
    helper.make_node("Cast", ["attention_mask"], ["mask_bool"], to=TensorProto.BOOL),
    helper.make_node("Range", ["zero_s", "B", "step"], ["b_arange"]),
    helper.make_node("Unsqueeze", ["b_arange", "axes_123"], ["b4"]),
    helper.make_node("Max", ["b4", "kv4"], ["bk"]),
    helper.make_node("Shape", ["bk"], ["bk_shape"]),
    helper.make_node("Expand", ["b4", "bk_shape"], ["b_exp"]),
    helper.make_node("Unsqueeze", ["b_exp", "axes_last"], ["b_idx"]),
    helper.make_node("Expand", ["kv4", "bk_shape"], ["kv_exp"]),
    helper.make_node("Unsqueeze", ["kv_exp", "axes_last"], ["kv_idx"]),
    helper.make_node("Concat", ["b_idx", "kv_idx"], ["tuples"], axis=-1),
    helper.make_node("GatherND", ["mask_bool", "tuples"], ["pad"], batch_dims=0),
    helper.make_node("And", ["causal", "pad"], ["keep"]),
    helper.make_node("Where", ["keep", "zero_f", "min_f"], ["mask"]),
]
inits += [i64("axes_last", [-1]), i64("axes_123", [1, 2, 3])]
used = {i for n in nodes for i in n.input}
inits = [t for t in inits if t.name in used]
save("dynamo_mask.onnx", nodes, inits, "total", 20, 9)

# rank_mask.onnx: bench/make_llama.py's builder (transformers' older style): past = total - seq, a [seq, total]
# causal comparison of two ranges joined with `attention_mask` unsqueezed to [batch, 1, 1, total] (the comparison's
# rank fixed by leading unit axes before the And).
nodes = [
    helper.make_node("Shape", ["attention_mask"], ["am_shape"]),
    helper.make_node("Gather", ["am_shape", "one"], ["T"], axis=0),
    helper.make_node("Shape", ["input_ids"], ["ids_shape"]),
    helper.make_node("Gather", ["ids_shape", "one"], ["S"], axis=0),
    helper.make_node("Sub", ["T", "S"], ["P"]),
    helper.make_node("Range", ["P", "T", "step"], ["q_range"]),
    helper.make_node("Unsqueeze", ["q_range", "axes1"], ["q_idx"]),
    helper.make_node("Range", ["zero", "T", "step"], ["k_range"]),
    helper.make_node("Unsqueeze", ["k_range", "axes0"], ["k_idx"]),
    helper.make_node("LessOrEqual", ["k_idx", "q_idx"], ["causal"]),
    helper.make_node("Unsqueeze", ["attention_mask", "axes12"], ["am4"]),
    helper.make_node("Cast", ["am4"], ["am_bool"], to=TensorProto.BOOL),
    helper.make_node("And", ["causal", "am_bool"], ["keep"]),
    helper.make_node("Where", ["keep", "zero_f", "min_f"], ["mask"]),
]
inits = [
    helper.make_tensor("zero", TensorProto.INT64, [], [0]),
    helper.make_tensor("one", TensorProto.INT64, [], [1]),
    helper.make_tensor("step", TensorProto.INT64, [], [1]),
    i64("axes0", [0]),
    i64("axes1", [1]),
    i64("axes12", [1, 2]),
    helper.make_tensor("zero_f", TensorProto.FLOAT, [], [0.0]),
    helper.make_tensor("min_f", TensorProto.FLOAT, [], [-3.4028234663852886e38]),
]
save("rank_mask.onnx", nodes, inits, "past + seq", 17, 8, past=False)

# hf_rope_angles.onnx: transformers' rotary angles and tables as optimum exports them (cut from the tiny llama
# fixture's onnx_optimum): `inv_freq[None, :, None] @ position_ids[:, None, :]` (a MatMul with K = 1), transposed,
# concatenated with itself, cos and sin (times the attention scaling).
src = os.path.join(here, "../../../../conformance/fixtures/tiny/tiny-llama/onnx_optimum/model.onnx")
if os.path.exists(src):
    import onnx.utils

    onnx.utils.extract_model(
        src,
        os.path.join(here, "hf_rope_angles.onnx"),
        ["position_ids"],
        ["/model/rotary_emb/Cast_4_output_0", "/model/rotary_emb/Cast_5_output_0"],
    )
    # without the export's value_info (shapes of intermediates under the full model's names): inference decides
    cut = onnx.load(os.path.join(here, "hf_rope_angles.onnx"))
    del cut.graph.value_info[:]
    onnx.save(cut, os.path.join(here, "hf_rope_angles.onnx"))
