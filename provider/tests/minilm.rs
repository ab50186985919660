//! all-MiniLM-L6-v2 int8 (onnxruntime quantize_dynamic QUInt8: DynamicQuantizeLinear → MatMulInteger after every
//! LayerNormalization, attention and GELU) on the CPU provider against onnxruntime 1.32 CPU (default session options):
//! 8 sentences padded to 14 tokens (`data/minilm/make_reference.py`). Per-tensor dynamic quantization turns any ulp of
//! difference before a DynamicQuantizeLinear into flipped uint8 codes that compound over the six layers, so kiln
//! computes Div, Erf and Softmax as onnxruntime does (bit for bit) and the hidden states agree to float rounding.
//! Skipped when ../shared is absent.

mod common;

use common::*;
use kiln_provider::{blocking, SessionOptions};

#[test]
fn minilm_int8_matches_onnxruntime() {
    let model = shared_models().join("all-minilm-l6-v2/onnx/model_quantized.onnx");
    if !model.exists() {
        eprintln!("skipped: model not found ({})", model.display());
        return;
    }
    let set = workspace_root().join("provider/tests/data/minilm");
    let session = blocking::Session::from_path(&model, &SessionOptions::default()).expect("loading MiniLM int8");
    let feeds = read_inputs(&session, &set);
    let mask = feeds[1].1.to_vec::<i64>().expect("attention_mask");
    let outputs = session.run(feeds).expect("MiniLM int8");
    let got = outputs.get("last_hidden_state").expect("last_hidden_state");
    let want = read_tensor(&set.join("output_0.pb"));
    let (diff, _) = max_diff("last_hidden_state", got, &want);

    // sentence embeddings: mean over the attention mask, L2-normalised
    let (n, l, h) = (want.dims()[0], want.dims()[1], want.dims()[2]);
    let (a, b) = (f32_values(got), f32_values(&want));
    let embed = |x: &[f32], s: usize| -> Vec<f64> {
        let mut e = vec![0f64; h];
        for t in (0..l).filter(|t| mask[s * l + t] != 0) {
            for (acc, v) in e.iter_mut().zip(&x[(s * l + t) * h..][..h]) {
                *acc += *v as f64;
            }
        }
        let norm = e.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-12);
        e.iter().map(|v| v / norm).collect()
    };
    let lowest =
        (0..n).map(|s| embed(&a, s).iter().zip(embed(&b, s)).map(|(x, y)| x * y).sum::<f64>()).fold(1f64, f64::min);
    eprintln!("MiniLM int8: max |last_hidden_state diff| {diff:.3e}, lowest embedding cosine {lowest:.7}");
    assert!(diff <= 1e-3, "max |last_hidden_state diff| {diff:.3e} > 1e-3");
    assert!(lowest >= 0.99999, "lowest embedding cosine {lowest}");
    let log = &session.model().pass_log;
    assert!(
        log.iter().any(|l| l.contains("softmax")),
        "the softmax nodes should use onnxruntime's arithmetic: {log:?}"
    );
}
