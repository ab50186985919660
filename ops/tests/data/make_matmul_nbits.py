"""Generates the com.microsoft MatMulNBits unit-test data of kiln-ops (ops/tests/matmul_nbits.rs).

Each case is a one-node model `matmul_nbits_<case>.onnx` with random packed weights, and onnxruntime's CPU output for a
random A: `matmul_nbits_<case>_input_0.pb` (A) and `matmul_nbits_<case>_output_0.pb` (Y). `matmul_nbits_g_idx.onnx` has
a g_idx input (kiln refuses it). Run with the repository's venv (onnx 1.22, onnxruntime 1.32):

    .venv/bin/python ops/tests/data/make_matmul_nbits.py
"""

import os

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

HERE = os.path.dirname(os.path.abspath(__file__))
rng = np.random.default_rng(0)


def model(case, K, N, bs, bits=4, dtype=np.float32, zp=None, bias=False, acc=0, lead=(2, 5), g_idx=False):
    kb = (K + bs - 1) // bs
    blob = bs * bits // 8
    per = 8 // bits
    q = rng.integers(0, 2**bits, size=(N, kb, bs)).astype(np.uint8)
    B = np.zeros((N, kb, blob), np.uint8)
    for i in range(bs):
        B[:, :, i // per] |= (q[:, :, i] << (bits * (i % per))).astype(np.uint8)
    scales = (rng.random(N * kb) * 0.1 + 0.01).astype(dtype)
    elem = TensorProto.FLOAT if dtype == np.float32 else TensorProto.FLOAT16
    inits = [numpy_helper.from_array(B, "B"), numpy_helper.from_array(scales, "scales")]
    names = ["A", "B", "scales"]
    if zp == "packed":
        z = rng.integers(0, 2**bits, size=(N, kb)).astype(np.uint8)
        Z = np.zeros((N, (kb * bits + 7) // 8), np.uint8)
        for j in range(kb):
            Z[:, (j * bits) // 8] |= (z[:, j] << ((j * bits) % 8)).astype(np.uint8)
        inits.append(numpy_helper.from_array(Z.reshape(-1), "zero_points"))
        names.append("zero_points")
    elif zp == "float":
        z = (rng.random(N * kb) * 2**bits).astype(dtype)
        inits.append(numpy_helper.from_array(z, "zero_points"))
        names.append("zero_points")
    else:
        names.append("")
    if g_idx:
        inits.append(numpy_helper.from_array((np.arange(K) // bs).astype(np.int32), "g_idx"))
        names.append("g_idx")
    else:
        names.append("")
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(N).astype(dtype), "bias"))
        names.append("bias")
    while names[-1] == "":
        names.pop()
    node = helper.make_node(
        "MatMulNBits", names, ["Y"], domain="com.microsoft", K=K, N=N, bits=bits, block_size=bs, accuracy_level=acc
    )
    graph = helper.make_graph(
        [node],
        case,
        [helper.make_tensor_value_info("A", elem, [*lead, K])],
        [helper.make_tensor_value_info("Y", elem, [*lead, N])],
        inits,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 9
    onnx.save(m, os.path.join(HERE, f"matmul_nbits_{case}.onnx"))
    if g_idx:
        return
    A = rng.standard_normal((*lead, K)).astype(dtype)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    (Y,) = sess.run(None, {"A": A})
    onnx.save_tensor(numpy_helper.from_array(A, "A"), os.path.join(HERE, f"matmul_nbits_{case}_input_0.pb"))
    onnx.save_tensor(numpy_helper.from_array(Y, "Y"), os.path.join(HERE, f"matmul_nbits_{case}_output_0.pb"))


model("q4_bs32", K=64, N=48, bs=32)
model("q4_bs32_acc4", K=64, N=48, bs=32, acc=4)
model("q4_bs16_zp_bias", K=40, N=24, bs=16, zp="packed", bias=True)  # K=40: a partial last block
model("q4_bs16_zp_bias_acc4", K=40, N=24, bs=16, zp="packed", bias=True, acc=4)
model("q4_bs128_float_zp_acc4", K=256, N=32, bs=128, zp="float", acc=4)  # float zero points: no int8 path in ORT
model("q4_bs32_f16_acc4", K=64, N=48, bs=32, dtype=np.float16, acc=4)
model("q4_bs64_f16_zp_bias", K=128, N=40, bs=64, dtype=np.float16, zp="packed", bias=True)
model("q8_bs32", K=64, N=16, bs=32, bits=8, zp="packed")
model("q4_bs32_rank2", K=96, N=8, bs=32, lead=(3,))
model("g_idx", K=64, N=16, bs=32, g_idx=True)
