//! com.microsoft GroupQueryAttention and MultiHeadAttention: one-node models that `scripts/msft_ops_cases.py`
//! builds with the `onnx` package and runs in onnxruntime (the venv's) — kiln's CPU op against onnxruntime's
//! outputs, then kiln's GPU (output buffers poisoned with NaN first) against the same, with the attention node
//! required on the GPU. GQA ratios 1/2/3/4, odd head counts, past lengths 0/1/odd/long, a prompt after a past,
//! padded batches (per-batch seqlens_k), packed QKV, rotary (halves, interleaved, partial), local window + softcap,
//! scale. Skips, loudly, where the venv or a GPU adapter is absent (CI has both).
#![cfg(not(target_arch = "wasm32"))]

mod common;
mod msft_cases;

use msft_cases::check_family;

#[test]
fn group_query_attention_matches_onnxruntime_on_cpu_and_gpu() {
    check_family("gqa", "Attention");
}

#[test]
fn multi_head_attention_matches_onnxruntime_on_cpu_and_gpu() {
    check_family("mha", "Attention");
}
