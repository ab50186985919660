//! SmolLM2-135M-Instruct q4f16 (210 com.microsoft MatMulNBits, tied float16 embedding) on the CPU provider,
//! teacher-forced against onnxruntime 1.32 CPU (../shared/README.md): one prefill of 24 tokens; argmax equal at every
//! position where onnxruntime's top-2 margin is above 0.25, mean |logit diff| <= 0.3. Skipped when ../shared is absent.

mod common;

use common::*;
use kiln_provider::{blocking, SessionOptions, Tensor};

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
    assert!(
        log.iter().any(|l| l.starts_with("untied `model.embed_tokens.weight")),
        "the tied lm_head should be untied: {log:?}"
    );

    // decode: prefill 23 tokens, then feed token 24 with kiln's own present.* as past; its logits must agree with the
    // 24-token prefill's last row
    let feeds = read_inputs(&session, &set);
    let ids = feeds[0].1.to_vec::<i64>().unwrap();
    let n = ids.len();
    let mut prefill = vec![];
    for (name, t) in &feeds {
        let t = match name.as_str() {
            "input_ids" => Tensor::from_vec(&[1, n - 1], ids[..n - 1].to_vec()).unwrap(),
            "attention_mask" => Tensor::from_vec(&[1, n - 1], vec![1i64; n - 1]).unwrap(),
            "position_ids" => Tensor::from_vec(&[1, n - 1], (0..n as i64 - 1).collect()).unwrap(),
            _ => t.clone(),
        };
        prefill.push((name.clone(), t));
    }
    let first = session.run(prefill).expect("prefill of 23");
    let mut step = vec![
        ("input_ids".to_string(), Tensor::from_vec(&[1, 1], vec![ids[n - 1]]).unwrap()),
        ("attention_mask".to_string(), Tensor::from_vec(&[1, n], vec![1i64; n]).unwrap()),
        ("position_ids".to_string(), Tensor::from_vec(&[1, 1], vec![n as i64 - 1]).unwrap()),
    ];
    for info in session.inputs() {
        if let Some(layer) = info.name.strip_prefix("past_key_values.") {
            step.push((info.name.clone(), first.get(&format!("present.{layer}")).unwrap().clone()));
        }
    }
    let decoded = session.run(step).expect("decode step");
    let d = f32_values(decoded.get("logits").unwrap());
    let last = &a[(n - 1) * vocab..][..vocab];
    let mean = d.iter().zip(last).map(|(x, y)| (x - y).abs() as f64).sum::<f64>() / vocab as f64;
    eprintln!("decode step vs prefill row {}: mean |diff| {mean:.4}", n - 1);
    assert_eq!(argmax(&d), argmax(last), "decode step argmax differs from the prefill's");
    // kiln computes float16 models in float32 and rounds only the outputs, so the prefill's attention reads unrounded
    // keys/values where the decode step reads the float16 cache (onnxruntime reads float16 in both: identical);
    // measured 0.136 on this model
    assert!(mean <= 0.25, "decode step vs prefill: mean |diff| {mean:.4}");
}
