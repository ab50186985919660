#!/usr/bin/env python3
"""PyTorch reference for the GPU decode benchmark (docs/BENCHMARKS.md): a SmolLM2-135M-shaped Llama (transformers'
LlamaForCausalLM, random weights: 30 layers, hidden 576, 9 heads, 3 kv heads, MLP 1536, vocab 49152, tied
embeddings), greedy decode on CUDA: prefill PROMPT tokens, then STEPS single-token steps; ms/token = mean step time
(synchronised). Modes: eager with the dynamic cache; static cache + torch.compile (mode reduce-overhead: CUDA
graphs); the same pipelined (the token kept on the GPU, read back one step later, as kiln-run's default loop). Needs torch + transformers (the device machine has them; not a CI dependency).

    python3 bench/torch_decode.py [--dtype float32|float16|bfloat16] [--prompt 16] [--steps 64]
"""
import argparse
import json
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache


def config():
    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                       rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True)


def sync():
    torch.cuda.synchronize()


def eager(model, ids, steps):
    past = None
    times = []
    x = ids
    with torch.no_grad():
        for _ in range(steps + 1):
            sync()
            t = time.perf_counter()
            out = model(input_ids=x, past_key_values=past, use_cache=True)
            past = out.past_key_values
            x = out.logits[:, -1:].argmax(-1)
            sync()
            times.append((time.perf_counter() - t) * 1e3)
    return times


def compiled_setup(model, ids, steps, dtype):
    """A static cache, the compiled decode step, and the prefill: (cache, step, first token, prompt length, ms)."""
    cache = StaticCache(config=model.config, max_batch_size=1, max_cache_len=ids.shape[1] + steps + 8,
                        device="cuda", dtype=dtype)
    step = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    n = ids.shape[1]
    sync()
    t = time.perf_counter()
    out = model(input_ids=ids, past_key_values=cache, cache_position=torch.arange(n, device="cuda"), use_cache=True)
    x = out.logits[:, -1:].argmax(-1).clone()
    sync()
    return cache, step, x, n, (time.perf_counter() - t) * 1e3


def compiled(model, ids, steps, dtype):
    with torch.no_grad():
        cache, step, x, n, prefill_ms = compiled_setup(model, ids, steps, dtype)
        times = [prefill_ms]
        for i in range(steps):
            pos = torch.tensor([n + i], device="cuda")
            sync()
            t = time.perf_counter()
            out = step(input_ids=x, past_key_values=cache, cache_position=pos, use_cache=True)
            x = out.logits[:, -1:].argmax(-1).clone()
            sync()
            times.append((time.perf_counter() - t) * 1e3)
    return times


def compiled_pipelined(model, ids, steps, dtype):
    """Static cache + torch.compile, the token kept on the GPU and fed back; step s's token copied to pinned host
    memory right after it (queued before step s + 1) and waited for after step s + 1 is launched, as kiln-run's
    pipelined loop does. A token's time: since the one before it was known on the host (the prefill's: since the
    start)."""
    with torch.no_grad():
        cache, step, x, n, prefill_ms = compiled_setup(model, ids, steps, dtype)
        times = []
        # the prefill's token counts from the start of the prefill, as kiln-run's does
        last = time.perf_counter() - prefill_ms / 1e3
        pending = None
        for i in range(steps + 1):
            host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
            host.copy_(x, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            if i < steps:
                pos = torch.tensor([n + i], device="cuda")
                out = step(input_ids=x, past_key_values=cache, cache_position=pos, use_cache=True)
                x = out.logits[:, -1:].argmax(-1).clone()
            if pending is not None:
                pending[0].synchronize()
                _ = pending[1].item()
                now = time.perf_counter()
                times.append((now - last) * 1e3)
                last = now
            pending = (done, host)
        pending[0].synchronize()
        now = time.perf_counter()
        times.append((now - last) * 1e3)
    return times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--steps", type=int, default=64)
    a = ap.parse_args()
    dtype = getattr(torch, a.dtype)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config()).to("cuda", dtype).eval()
    ids = torch.randint(0, 49152, (1, a.prompt), device="cuda")
    res = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0), "dtype": a.dtype}
    for name, f in [("eager", lambda: eager(model, ids, a.steps)),
                    ("static+compile", lambda: compiled(model, ids, a.steps, dtype)),
                    ("static+compile, pipelined", lambda: compiled_pipelined(model, ids, a.steps, dtype))]:
        try:
            f()  # warm-up (and compilation)
            times = f()
            steady = sorted(times[1:])[: max(1, len(times[1:]) * 9 // 10)]  # drop the slowest 10% (recompiles)
            med = sorted(times[1:])[len(times[1:]) // 2]
            res[name] = {"prefill_ms": round(times[0], 2), "decode_ms": round(sum(times[1:]) / len(times[1:]), 3),
                         "decode_ms_p90": round(sum(steady) / len(steady), 3), "decode_ms_median": round(med, 3)}
        except Exception as e:  # noqa: BLE001 (report and go on)
            res[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
    print(json.dumps(res))


if __name__ == "__main__":
    main()
