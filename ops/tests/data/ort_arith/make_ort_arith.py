"""Reference data for ops/tests/ort_arith.rs: small models whose nodes onnxruntime runs with its own CPU arithmetic —
LayerNormalization, Add + LayerNormalization (fused by onnxruntime into com.microsoft SkipLayerNormalization) and the
exact-GELU subgraph (fused into com.microsoft Gelu) — with inputs and onnxruntime's outputs as float32 bit patterns.

    /work/main/.venv/bin/python ops/tests/data/ort_arith/make_ort_arith.py   (onnxruntime 1.32 CPU, x86-64)
"""

import json
import pathlib

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

HERE = pathlib.Path(__file__).resolve().parent
rng = np.random.default_rng(7)


def f32(shape, scale=3.0, shift=1.0):
    return (rng.standard_normal(shape) * scale + shift).astype(np.float32)


def save(name, nodes, inputs, output_shape, inits, feeds):
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, list(v.shape)) for k, v in inputs.items()],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, output_shape)],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    (HERE / f"{name}.onnx").write_bytes(model.SerializeToString())
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(HERE / f"{name}.optimized.onnx")
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    fused = sorted({n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node})
    (HERE / f"{name}.optimized.onnx").unlink()
    (y,) = sess.run(None, feeds)
    bits = lambda a: a.astype(np.float32).view(np.uint32).ravel().tolist()
    return {
        "model": f"{name}.onnx",
        "onnxruntime_nodes": fused,
        "inputs": {k: {"dims": list(v.shape), "bits": bits(v)} for k, v in feeds.items()},
        "output": {"dims": list(y.shape), "bits": bits(y)},
    }


def main():
    cases = []
    for n in (13, 40):
        cases.append(
            save(
                f"layer_norm_{n}",
                [helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], axis=-1, epsilon=1e-5)],
                {"x": f32((6, n))},
                [6, n],
                {"g": f32((n,), 1.0, 0.0), "b": f32((n,), 1.0, 0.0)},
                {"x": f32((6, n))},
            )
        )
    n = 40
    cases.append(
        save(
            "add_layer_norm",
            [
                helper.make_node("Add", ["a", "r"], ["s"]),
                helper.make_node("LayerNormalization", ["s", "g", "b"], ["y"], axis=-1, epsilon=1e-12),
            ],
            {"a": f32((2, 3, n)), "r": f32((2, 3, n))},
            [2, 3, n],
            {"g": f32((n,), 1.0, 0.0), "b": f32((n,), 1.0, 0.0)},
            {"a": f32((2, 3, n)), "r": f32((2, 3, n))},
        )
    )
    cases.append(
        save(
            "gelu",
            [
                helper.make_node("Div", ["x", "sqrt2"], ["d"]),
                helper.make_node("Erf", ["d"], ["e"]),
                helper.make_node("Add", ["e", "one"], ["p"]),
                helper.make_node("Mul", ["x", "p"], ["m"]),
                helper.make_node("Mul", ["m", "half"], ["y"]),
            ],
            {"x": f32((4, 64))},
            [4, 64],
            {
                "sqrt2": np.array(1.4142135, np.float32),
                "one": np.array(1.0, np.float32),
                "half": np.array(0.5, np.float32),
            },
            {"x": f32((4, 64))},
        )
    )
    out = {"onnxruntime": ort.__version__, "cases": cases}
    (HERE / "ort_arith.json").write_text(json.dumps(out) + "\n")
    for c in cases:
        print(c["model"], c["onnxruntime_nodes"])


if __name__ == "__main__":
    main()
