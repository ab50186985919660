//! Checks for the WebGPU path of kiln's wasm build, called from a page in headless Chromium (see README.md).

use kiln_provider::{ExecutionProvider, Session, SessionOptions, Tensor};
use wasm_bindgen::prelude::*;

fn e(x: impl std::fmt::Display) -> JsError {
    JsError::new(&x.to_string())
}

/// Runs an ONNX backend-test data set (`input_j.pb`, `output_j.pb` bytes) on kiln's WebGPU provider; returns a report.
#[wasm_bindgen]
pub async fn gpu_fixture(bytes: Vec<u8>, inputs: js_sys::Array, outputs: js_sys::Array) -> Result<String, JsError> {
    let gpu_opts = SessionOptions { execution_providers: vec![ExecutionProvider::WebGpu], ..Default::default() };
    let gpu = Session::from_bytes(&bytes, &gpu_opts).await.map_err(e)?;
    let names: Vec<String> = gpu.input_names().iter().map(|s| s.to_string()).collect();
    let mut feeds = vec![];
    for (i, v) in inputs.iter().enumerate() {
        let b = js_sys::Uint8Array::new(&v).to_vec();
        let (_, t) = Tensor::from_onnx_proto(&b).map_err(e)?;
        feeds.push((names[i].clone(), t));
    }
    let out_names: Vec<String> = gpu.output_names().iter().map(|s| s.to_string()).collect();
    let mut worst = 0f64;
    for _ in 0..2 {
        let got = gpu.run(feeds.clone()).await.map_err(e)?;
        for (i, v) in outputs.iter().enumerate() {
            let b = js_sys::Uint8Array::new(&v).to_vec();
            let (_, w) = Tensor::from_onnx_proto(&b).map_err(e)?;
            let g = got.output(&out_names[i]).map_err(e)?;
            if g.dims() != w.dims() {
                return Err(e(format!("{}: dims {:?} vs {:?}", out_names[i], g.dims(), w.dims())));
            }
            let (a, b) = (g.to_f64_vec().map_err(e)?, w.to_f64_vec().map_err(e)?);
            for (p, q) in a.iter().zip(&b) {
                let d = (p - q).abs();
                worst = if d.is_nan() { f64::INFINITY } else { worst.max(d) };
            }
        }
    }
    let r = gpu.gpu_placement().ok_or_else(|| e(format!("not on the GPU: {:?}", gpu.provider_note())))?;
    Ok(format!(
        "{} of {} nodes on the GPU; {} runs, {} submits; max|gpu-ref| {worst:.3e}",
        r.gpu_nodes(),
        r.nodes.len(),
        r.runs,
        r.counters.submits
    ))
}
