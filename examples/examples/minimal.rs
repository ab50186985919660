//! The README's Rust API example: load a model, list its inputs, run it once (prefill with an empty KV cache).
//!
//! cargo run --release -p kiln-examples --example minimal -- conformance/fixtures/tiny/tiny-llama/onnx_optimum/model.onnx

use kiln_provider::blocking::Session;
use kiln_provider::{Dim, ExecutionProvider, SessionOptions, Tensor};

fn main() -> kiln_provider::Result<()> {
    let path = std::env::args().nth(1).unwrap_or("conformance/fixtures/tiny/tiny-llama/onnx_optimum/model.onnx".into());
    let options = SessionOptions {
        execution_providers: vec![ExecutionProvider::Cpu],
        intra_op_num_threads: Some(2),
        ..Default::default()
    };
    let session = Session::from_path(&path, &options)?;
    let ids = [6i64, 40, 253, 655];
    let mut feeds = vec![];
    for input in session.inputs() {
        println!("{} {:?} {}", input.name, input.element_type, input.shape_string());
        let tensor = match input.name.as_str() {
            "input_ids" => Tensor::from_vec(&[1, 4], ids.to_vec())?,
            "attention_mask" => Tensor::from_vec(&[1, 4], vec![1i64; 4])?,
            "position_ids" => Tensor::from_vec(&[1, 4], vec![0i64, 1, 2, 3])?,
            // past_key_values.*: [batch, kv_heads, 0, head_dim], empty
            _ => {
                let dims: Vec<usize> = input
                    .shape
                    .iter()
                    .flatten()
                    .enumerate()
                    .map(|(i, d)| match d {
                        Dim::Fixed(v) => *v,
                        _ if i == 0 => 1,
                        _ => 0,
                    })
                    .collect();
                let et = input.element_type.ok_or_else(|| {
                    kiln_provider::Error::not_implemented(format!("input `{}` has an unsupported type", input.name))
                })?;
                Tensor::from_bytes(et, &dims, &[])?
            }
        };
        feeds.push((input.name.clone(), tensor));
    }
    let outputs = session.run(feeds)?;
    let logits = outputs.output("logits")?;
    println!("logits {:?} {}", logits.dims(), logits.element_type());
    Ok(())
}
