//! The torch.onnx dynamo exports of conformance/fixtures/tiny on the CPU provider: prefill (test_data_set_0, 7 tokens,
//! empty past) and one decode step (test_data_set_1, set 0's present.* fed back as past_key_values.*), every output
//! against onnxruntime 1.32 CPU's at max |diff| <= 1e-4 (float32).
//!
//! The `eager_op20` exports compute attention from primitives; the `sdpa_op23` ones use ONNX Attention (opset 23),
//! RotaryEmbedding and RMSNormalization (llama). All of them declare `attention_mask` as
//! `[batch, total_sequence_length]` while the graph computes `sequence_length + past_sequence_length`.
//!
//! Self-contained on purpose (no shared `common` module).

use std::path::{Path, PathBuf};

use kiln_provider::{blocking, SessionOptions, Tensor};

const ATOL: f64 = 1e-4;

fn fixture(model: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../conformance/fixtures/tiny").join(model)
}

fn read_tensor(path: &Path) -> Tensor {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    Tensor::from_onnx_proto(&bytes).unwrap_or_else(|e| panic!("decoding {}: {e}", path.display())).1
}

fn inputs_of(session: &blocking::Session, set: &Path) -> Vec<(String, Tensor)> {
    session
        .inputs()
        .iter()
        .enumerate()
        .map(|(i, info)| (info.name.clone(), read_tensor(&set.join(format!("input_{i}.pb")))))
        .collect()
}

fn expected_of(session: &blocking::Session, set: &Path) -> Vec<(String, Tensor)> {
    session
        .outputs()
        .iter()
        .enumerate()
        .map(|(i, info)| (info.name.clone(), read_tensor(&set.join(format!("output_{i}.pb")))))
        .collect()
}

/// Max |got - want| over every output; panics on a missing output, a shape or type mismatch.
fn compare(label: &str, outputs: &kiln_provider::Outputs, expected: &[(String, Tensor)]) -> Vec<String> {
    assert_eq!(outputs.len(), expected.len(), "{label}: output count");
    let mut failures = vec![];
    for (name, want) in expected {
        let got = outputs.get(name).unwrap_or_else(|| panic!("{label}: no output `{name}`"));
        assert_eq!(got.dims(), want.dims(), "{label}/{name}: dims");
        assert_eq!(got.element_type(), want.element_type(), "{label}/{name}: element type");
        let (g, w) = (got.to_f64_vec().unwrap(), want.to_f64_vec().unwrap());
        let mut diff = 0f64;
        for (a, b) in g.iter().zip(&w) {
            let d = (a - b).abs();
            diff = if d.is_nan() { f64::INFINITY } else { diff.max(d) };
        }
        eprintln!("{label}/{name} {:?}: max|diff| {diff:.3e}", got.dims());
        if diff > ATOL {
            failures.push(format!("{label}/{name}: max|diff| {diff:.3e} > {ATOL:e}"));
        }
    }
    failures
}

fn check(model: &str) {
    let dir = fixture(model);
    let session = blocking::Session::from_path(dir.join("model.onnx"), &SessionOptions::default())
        .unwrap_or_else(|e| panic!("{model}: loading: {e}"));
    // the declared dims stay what the model says
    let mask = session.inputs().iter().find(|i| i.name == "attention_mask").expect("attention_mask input");
    assert_eq!(mask.shape_string(), "[batch_size, total_sequence_length]", "{model}: attention_mask metadata");

    let mut failures = vec![];
    let set0 = dir.join("test_data_set_0");
    let set1 = dir.join("test_data_set_1");
    let out0 = session.run(inputs_of(&session, &set0)).unwrap_or_else(|e| panic!("{model}/set0: running: {e}"));
    failures.extend(compare(&format!("{model}/set0"), &out0, &expected_of(&session, &set0)));
    let expected1 = expected_of(&session, &set1);
    let out1 = session.run(inputs_of(&session, &set1)).unwrap_or_else(|e| panic!("{model}/set1: running: {e}"));
    failures.extend(compare(&format!("{model}/set1"), &out1, &expected1));

    // the decode step again, fed with kiln's own present.* of the prefill
    let feeds: Vec<(String, Tensor)> = inputs_of(&session, &set1)
        .into_iter()
        .map(|(name, t)| match name.strip_prefix("past_key_values.") {
            Some(rest) => {
                let own = out0.get(&format!("present.{rest}")).unwrap_or_else(|| panic!("no present.{rest}"));
                (name, own.clone())
            }
            None => (name, t),
        })
        .collect();
    let chained = session.run(feeds).unwrap_or_else(|e| panic!("{model}/set1 chained: running: {e}"));
    failures.extend(compare(&format!("{model}/set1 (own past)"), &chained, &expected1));
    assert!(failures.is_empty(), "{model}:\n  {}", failures.join("\n  "));
}

#[test]
fn tiny_llama_dynamo_eager_op20() {
    check("tiny-llama/onnx_dynamo_eager_op20");
}

#[test]
fn tiny_llama_dynamo_sdpa_op23() {
    check("tiny-llama/onnx_dynamo_sdpa_op23");
}

#[test]
fn tiny_gpt2_dynamo_eager_op20() {
    check("tiny-gpt2/onnx_dynamo_eager_op20");
}

#[test]
fn tiny_gpt2_dynamo_sdpa_op23() {
    check("tiny-gpt2/onnx_dynamo_sdpa_op23");
}
