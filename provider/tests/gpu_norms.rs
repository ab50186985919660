//! com.microsoft SkipSimplifiedLayerNormalization, SkipLayerNormalization and SimplifiedLayerNormalization (kiln's
//! one-dispatch NormOp): one-node models that `scripts/msft_ops_cases.py` builds with the `onnx` package and runs
//! in onnxruntime — kiln's CPU op against onnxruntime's outputs (incl. the input_skip_bias_sum output), then the
//! GPU (output buffers poisoned first) against the same, the norm required on the GPU. Channel counts 64 / 96 /
//! 130 / 300 / 512 / 1000 (under and over one workgroup), skip shaped like the input or 2D, with and without bias
//! and beta. Then the residual Add + RMSNorm fusion pass on decomposed and ONNX RMSNormalization graphs.
//! Skips, loudly, where the venv or a GPU adapter is absent (CI has both).
#![cfg(not(target_arch = "wasm32"))]

mod common;
mod msft_cases;

use msft_cases::check_family;

#[test]
fn microsoft_norms_match_onnxruntime_on_cpu_and_gpu() {
    check_family("norms", "KilnNorm");
}

/// Residual Add + RMSNorm as optimum (Pow/ReduceMean/Add/Sqrt/Div/Mul), dynamo (…/Reciprocal/Mul) and ONNX
/// RMSNormalization (opset 23) write it, the residual sum an output too: outputs against onnxruntime on the CPU and
/// the GPU, and the norm fused into one KilnNorm node on the GPU.
#[test]
fn residual_rms_norm_is_fused_on_gpu() {
    msft_cases::REQUIRE_ON_GPU.with(|r| *r.borrow_mut() = Some("KilnNorm".into()));
    check_family("rmsfuse", "KilnNorm");
}
