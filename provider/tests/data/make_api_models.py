"""Generates the small ONNX models and onnxruntime reference outputs used by provider/tests/api.rs.

Run: .venv/bin/python provider/tests/data/make_api_models.py  (from the repo root; needs onnx==1.22.0, onnxruntime)
"""
import os
import numpy as np
import onnx
from onnx import helper, TensorProto, numpy_helper
import onnxruntime as ort

HERE = os.path.dirname(os.path.abspath(__file__))
OPSET = [helper.make_opsetid("", 18)]


def save(model, name):
    onnx.checker.check_model(model)
    onnx.save(model, os.path.join(HERE, name))


# 1. Identity for every element type kiln supports, with a symbolic and a fixed dim.
TYPES = {
    "float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "float64": TensorProto.DOUBLE,
    "int64": TensorProto.INT64, "int32": TensorProto.INT32, "int16": TensorProto.INT16, "int8": TensorProto.INT8,
    "uint8": TensorProto.UINT8, "uint16": TensorProto.UINT16, "uint32": TensorProto.UINT32,
    "uint64": TensorProto.UINT64, "bool": TensorProto.BOOL, "string": TensorProto.STRING,
}
for name, code in TYPES.items():
    x = helper.make_tensor_value_info("x", code, ["n", 2])
    y = helper.make_tensor_value_info("y", code, ["n", 2])
    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], f"identity_{name}", [x], [y])
    save(helper.make_model(g, opset_imports=OPSET), f"identity_{name}.onnx")

# 2. Two outputs, an initializer, symbolic batch dim: sum = a + b, prod = a * a
a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch_size", 3])
s = helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["batch_size", 3])
p = helper.make_tensor_value_info("prod", TensorProto.FLOAT, ["batch_size", 3])
b = numpy_helper.from_array(np.array([1.5, -2.0, 0.25], dtype=np.float32), "b")
g = helper.make_graph(
    [helper.make_node("Add", ["a", "b"], ["sum"]), helper.make_node("Mul", ["a", "a"], ["prod"])],
    "two_outputs", [a], [s, p], [b])
model = helper.make_model(g, opset_imports=OPSET)
save(model, "two_outputs.onnx")
feed = np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5
sess = ort.InferenceSession(os.path.join(HERE, "two_outputs.onnx"), providers=["CPUExecutionProvider"])
outs = sess.run(None, {"a": feed})
onnx.save_tensor(numpy_helper.from_array(feed, "a"), os.path.join(HERE, "two_outputs_input_0.pb"))
for i, o in enumerate(outs):
    onnx.save_tensor(numpy_helper.from_array(o), os.path.join(HERE, f"two_outputs_output_{i}.pb"))

# 3. Fixed shape input [2, 3] int64 → y = x * 2
x = helper.make_tensor_value_info("x", TensorProto.INT64, [2, 3])
y = helper.make_tensor_value_info("y", TensorProto.INT64, [2, 3])
two = numpy_helper.from_array(np.array(2, dtype=np.int64), "two")
g = helper.make_graph([helper.make_node("Mul", ["x", "two"], ["y"])], "fixed", [x], [y], [two])
save(helper.make_model(g, opset_imports=OPSET), "fixed_shape.onnx")

# 4. External data: y = x @ W with W [4, 3] in weights.bin
W = (np.arange(12, dtype=np.float32).reshape(4, 3) / 7.0).astype(np.float32)
x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])
wt = numpy_helper.from_array(W, "W")
g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "ext", [x], [y], [wt])
model = helper.make_model(g, opset_imports=OPSET)
if os.path.exists(os.path.join(HERE, "weights.bin")):
    os.remove(os.path.join(HERE, "weights.bin"))  # onnx appends to an existing file
onnx.external_data_helper.convert_model_to_external_data(
    model, all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
onnx.save(model, os.path.join(HERE, "external_data.onnx"))
feed = np.array([[1, 2, 3, 4], [-1, 0.5, 0, 2]], dtype=np.float32)
sess = ort.InferenceSession(os.path.join(HERE, "external_data.onnx"), providers=["CPUExecutionProvider"])
onnx.save_tensor(numpy_helper.from_array(feed, "x"), os.path.join(HERE, "external_data_input_0.pb"))
onnx.save_tensor(numpy_helper.from_array(sess.run(None, {"x": feed})[0]), os.path.join(HERE, "external_data_output_0.pb"))

# 5. An operator nobody implements, in a custom domain.
x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
g = helper.make_graph([helper.make_node("FrobnicateTensor", ["x"], ["y"], name="frob_1", domain="com.example")],
                      "unsupported", [x], [y])
m = helper.make_model(g, opset_imports=OPSET + [helper.make_opsetid("com.example", 1)])
onnx.save(m, os.path.join(HERE, "unsupported_op.onnx"))

# 6. A free dimension the model uses in two inputs: z = x + y, both [batch, seq]
x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq"])
yv = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq"])
z = helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", "seq"])
g = helper.make_graph([helper.make_node("Add", ["x", "y"], ["z"])], "free_dims", [x, yv], [z])
save(helper.make_model(g, opset_imports=OPSET), "free_dims.onnx")
print("ok")

# 7. Unnamed dims: x [?, 3] (no value, no name) → y = x + 1; and an input declared without any shape.
x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3])
y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])
one = numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one")
g = helper.make_graph([helper.make_node("Add", ["x", "one"], ["y"])], "unnamed", [x], [y], [one])
save(helper.make_model(g, opset_imports=OPSET), "unnamed_dim.onnx")
x = helper.make_tensor_value_info("x", TensorProto.FLOAT, None)
y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
g = helper.make_graph([helper.make_node("Add", ["x", "one"], ["y"])], "no_shape", [x], [y], [one])
onnx.save(helper.make_model(g, opset_imports=OPSET), os.path.join(HERE, "no_shape.onnx"))  # the checker refuses it; onnxruntime loads it
print("ok")
