# Writes the toy models of js/test/custom-ops.mjs (run with the repo venv: .venv/bin/python js/test/data/make_custom_op_models.py).
#   scale.onnx:        x float [N, 3] -> test.kiln/Scale(factor=2.5) -> y (value_info [N, 3]) -> Add(bias) -> z [N, 3]
#   scale_noinfo.onnx: the same without y's value_info (its type and rank then come from the op's `outputs`)
#   repeat.onnx:       x float [N] -> test.kiln/Repeat(times=3) -> r [?] -> ReduceSum -> total []; Shape(r) -> s [1]
import os

import onnx
from onnx import TensorProto, helper

here = os.path.dirname(os.path.abspath(__file__))
opsets = [helper.make_opsetid("", 17), helper.make_opsetid("test.kiln", 1)]
bias = helper.make_tensor("bias", TensorProto.FLOAT, [3], [1.0, -1.0, 0.5])


def scale(value_info):
    nodes = [
        helper.make_node("Scale", ["x"], ["y"], name="scale_node", domain="test.kiln", factor=2.5, label="scale"),
        helper.make_node("Add", ["y", "bias"], ["z"], name="add"),
    ]
    vis = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])] if value_info else []
    g = helper.make_graph(
        nodes,
        "scale",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 3])],
        [bias],
        value_info=vis,
    )
    return helper.make_model(g, opset_imports=opsets, ir_version=8)


def repeat():
    nodes = [
        helper.make_node("Repeat", ["x"], ["r"], name="rep", domain="test.kiln", times=3),
        helper.make_node("ReduceSum", ["r"], ["total"], name="sum", keepdims=0),
        helper.make_node("Shape", ["r"], ["s"], name="shape"),
    ]
    g = helper.make_graph(
        nodes,
        "repeat",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N"])],
        [helper.make_tensor_value_info("total", TensorProto.FLOAT, []), helper.make_tensor_value_info("s", TensorProto.INT64, [1])],
        value_info=[helper.make_tensor_value_info("r", TensorProto.FLOAT, ["?"])],
    )
    return helper.make_model(g, opset_imports=opsets, ir_version=8)


onnx.save(scale(True), os.path.join(here, "scale.onnx"))
onnx.save(scale(False), os.path.join(here, "scale_noinfo.onnx"))
onnx.save(repeat(), os.path.join(here, "repeat.onnx"))
