//! SmolLM2-135M-Instruct q4f16 (210 com.microsoft MatMulNBits, tied float16 embedding) on the CPU provider,
//! teacher-forced against onnxruntime 1.32 CPU (../shared/README.md): one prefill of 24 tokens; argmax equal at every
//! position where onnxruntime's top-2 margin is above 0.25, mean |logit diff| <= 0.3. Skipped when ../shared is absent.

mod common;

use common::*;
use kiln_provider::{blocking, SessionOptions};

/// Positions where onnxruntime's top-2 logit margin is above 0.25 (../shared/README.md).
const CONFIDENT: [usize; 19] = [0, 1, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 16, 17, 19, 21, 22, 23];

fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = i;
        }
    }
    best
}

#[test]
fn smollm2_q4f16_teacher_forced() {
    let dir = shared_models().join("smollm2-135m-instruct/onnx");
    let model = dir.join("model_q4f16.onnx");
    let set = dir.join("test_data_q4f16");
    if !model.exists() || !set.exists() {
        eprintln!("skipped: model not found ({})", model.display());
        return;
    }
    let session = blocking::Session::from_path(&model, &SessionOptions::default()).expect("loading SmolLM2 q4f16");
    let outputs = session.run(read_inputs(&session, &set)).expect("prefill");
    let expected = read_tensor(&set.join("output_0.pb"));
    let got = outputs.get("logits").expect("logits");
    assert_eq!(got.dims(), expected.dims());
    let vocab = *expected.dims().last().unwrap();
    let (a, b) = (f32_values(got), f32_values(&expected));
    let mean = a.iter().zip(&b).map(|(x, y)| (x - y).abs() as f64).sum::<f64>() / a.len() as f64;
    let mut mismatched = vec![];
    for pos in 0..expected.dims()[1] {
        let (ga, ea) = (argmax(&a[pos * vocab..][..vocab]), argmax(&b[pos * vocab..][..vocab]));
        if ga != ea {
            mismatched.push((pos, ga, ea));
        }
    }
    eprintln!("SmolLM2 q4f16: mean |logit diff| {mean:.4}; argmax differs at (pos, kiln, ort) {mismatched:?}");
    let bad: Vec<_> = mismatched.iter().filter(|(p, _, _)| CONFIDENT.contains(p)).collect();
    assert!(bad.is_empty(), "argmax differs at confident positions (pos, kiln, ort): {bad:?}");
    assert!(mean <= 0.3, "mean |logit diff| {mean:.4} > 0.3");
    let log = &session.model().pass_log;
    eprintln!("pass log: {log:?}");
}
