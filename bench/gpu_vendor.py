"""Vendor reference for docs/BENCHMARKS.md (run on an NVIDIA machine with PyTorch): cuBLAS f32/TF32 matmul of 4096^2 and a 256 MiB CUDA copy."""
import torch, time
d = torch.device("cuda")
print("torch", torch.__version__, torch.cuda.get_device_name(0))
def t(f, n=20):
    f(); torch.cuda.synchronize()
    s = time.perf_counter()
    for _ in range(n): f()
    torch.cuda.synchronize()
    return (time.perf_counter() - s) / n
for tf32 in (False, True):
    torch.backends.cuda.matmul.allow_tf32 = tf32
    a = torch.randn(4096, 4096, device=d); b = torch.randn(4096, 4096, device=d)
    s = t(lambda: a @ b)
    print(f"cuBLAS f32 4096^3 (tf32={tf32}): {2*4096**3/s/1e9:.0f} GFLOP/s")
x = torch.empty(64 << 20, device=d); y = torch.empty_like(x)
s = t(lambda: y.copy_(x))
print(f"cuda copy 256 MiB: {2*x.numel()*4/s/1e9:.0f} GB/s (read+write)")
