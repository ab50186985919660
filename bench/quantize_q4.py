# Quantizes every MatMul of an fp32 ONNX model to com.microsoft MatMulNBits (4 bits, symmetric) with onnxruntime.
# usage: python3 bench/quantize_q4.py IN.onnx OUT.onnx [block_size=32]
import sys, onnx
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
m = onnx.load(sys.argv[1])
q = MatMulNBitsQuantizer(m, block_size=int(sys.argv[3]) if len(sys.argv) > 3 else 32, is_symmetric=True)
q.process()
q.model.save_model_to_file(sys.argv[2], use_external_data_format=False)
