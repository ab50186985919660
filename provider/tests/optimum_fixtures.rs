//! The optimum-style LLM exports of conformance/fixtures/tiny on the CPU provider: prefill (test_data_set_0, 7 tokens,
//! empty past) and one decode step (test_data_set_1), every output against onnxruntime 1.32 CPU's.
//!
//! Tolerances: float32 exports max |diff| <= 1e-4; float16 exports max |diff| <= 1e-2; int8 (MatMulInteger) and q4
//! (MatMulNBits) exports max |diff| <= 1e-3 · max |reference| per output.

mod common;

use common::*;
use kiln_provider::{blocking, SessionOptions};

fn check(model: &str, tol: Tolerance) {
    let dir = tiny_fixtures().join(model);
    let session = blocking::Session::from_path(dir.join("model.onnx"), &SessionOptions::default())
        .unwrap_or_else(|e| panic!("{model}: loading: {e}"));
    let mut failures = vec![];
    for set in ["test_data_set_0", "test_data_set_1"] {
        let set_dir = dir.join(set);
        let feeds = read_inputs(&session, &set_dir);
        let expected = read_outputs(&session, &set_dir);
        let outputs = session.run(feeds).unwrap_or_else(|e| panic!("{model}/{set}: running: {e}"));
        assert_eq!(outputs.len(), expected.len(), "{model}/{set}: output count");
        let mut worst = (String::new(), 0f64, 0f64);
        for (name, want) in &expected {
            let got = outputs.get(name).unwrap_or_else(|| panic!("{model}/{set}: no output `{name}`"));
            let (diff, ref_max) = max_diff(&format!("{model}/{set}/{name}"), got, want);
            let bound = tol.bound(ref_max);
            if diff > bound {
                failures.push(format!("{set}/{name}: max|diff| {diff:.3e} > {bound:.3e} (max|ref| {ref_max:.3})"));
            }
            if diff / bound.max(f64::MIN_POSITIVE) > worst.1 / tol.bound(worst.2).max(f64::MIN_POSITIVE) {
                worst = (name.clone(), diff, ref_max);
            }
        }
        eprintln!("{model}/{set}: worst output {} max|diff| {:.3e} (max|ref| {:.3})", worst.0, worst.1, worst.2);
    }
    assert!(failures.is_empty(), "{model}:\n  {}", failures.join("\n  "));
}

#[test]
fn tiny_llama_optimum() {
    check("tiny-llama/onnx_optimum", Tolerance::Abs(1e-4));
}

#[test]
fn tiny_llama_optimum_fp16() {
    check("tiny-llama/onnx_optimum_fp16", Tolerance::Abs(1e-2));
}

#[test]
fn tiny_llama_optimum_int8() {
    check("tiny-llama/onnx_optimum_int8", Tolerance::RelToMax(1e-3));
}

#[test]
fn tiny_llama_optimum_q4() {
    check("tiny-llama/onnx_optimum_q4", Tolerance::RelToMax(1e-3));
}

#[test]
fn tiny_gpt2_optimum() {
    check("tiny-gpt2/onnx_optimum", Tolerance::Abs(1e-4));
}

#[test]
fn tiny_gpt2_optimum_fp16() {
    check("tiny-gpt2/onnx_optimum_fp16", Tolerance::Abs(1e-2));
}

#[test]
fn tiny_gpt2_optimum_int8() {
    check("tiny-gpt2/onnx_optimum_int8", Tolerance::RelToMax(1e-3));
}

/// Decoding from kiln's own present.* (not onnxruntime's) gives the same step-1 logits.
#[test]
fn tiny_llama_optimum_decode_from_own_cache() {
    let dir = tiny_fixtures().join("tiny-llama/onnx_optimum");
    let session = blocking::Session::from_path(dir.join("model.onnx"), &SessionOptions::default()).unwrap();
    let prefill = session.run(read_inputs(&session, &dir.join("test_data_set_0"))).unwrap();
    let mut feeds = read_inputs(&session, &dir.join("test_data_set_1"));
    for (name, t) in feeds.iter_mut() {
        if let Some(layer) = name.strip_prefix("past_key_values.") {
            *t = prefill.get(&format!("present.{layer}")).unwrap().clone();
        }
    }
    let step = session.run(feeds).unwrap();
    let expected = read_outputs(&session, &dir.join("test_data_set_1"));
    let (diff, _) = max_diff("logits", step.get("logits").unwrap(), &expected[0].1);
    assert!(diff <= 1e-4, "decode from kiln's cache: logits max|diff| {diff:.3e}");
}
