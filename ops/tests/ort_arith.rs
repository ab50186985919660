//! kiln's LayerNormalization and GELU `x / sqrt(2)` against onnxruntime 1.32 CPU bit for bit
//! (`data/ort_arith/make_ort_arith.py` writes the models, inputs and onnxruntime's outputs): a plain
//! LayerNormalization (onnxruntime's LayerNormalization kernel, with and without whole blocks of eight), an
//! `Add` + LayerNormalization that onnxruntime fuses into SkipLayerNormalization (Welford arithmetic), and the exact
//! GELU subgraph that onnxruntime fuses into Gelu (`x * 0.70710677`).

use std::path::PathBuf;

use kiln_provider::blocking::Session;
use kiln_provider::{SessionOptions, Tensor};
use serde_json::Value;

fn data(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/ort_arith").join(p)
}

fn bits(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn dims(v: &Value) -> Vec<usize> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect()
}

fn check(model: &str, want_ort_node: &str) {
    let reference: Value = serde_json::from_str(&std::fs::read_to_string(data("ort_arith.json")).unwrap()).unwrap();
    let case = reference["cases"].as_array().unwrap().iter().find(|c| c["model"] == model).expect("case");
    let nodes: Vec<&str> = case["onnxruntime_nodes"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert!(nodes.contains(&want_ort_node), "{model}: onnxruntime ran {nodes:?}");
    let session = Session::from_path(data(model), &SessionOptions::default()).expect("session");
    let feeds: Vec<(String, Tensor)> = case["inputs"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            let values: Vec<f32> = bits(&v["bits"]).into_iter().map(f32::from_bits).collect();
            (k.clone(), Tensor::from_vec(&dims(&v["dims"]), values).unwrap())
        })
        .collect();
    let out = session.run(feeds).expect("run");
    let y = out.output("y").unwrap();
    assert_eq!(y.dims(), dims(&case["output"]["dims"]).as_slice());
    let got: Vec<u32> = y.to_vec::<f32>().unwrap().into_iter().map(f32::to_bits).collect();
    let want = bits(&case["output"]["bits"]);
    let differ = got.iter().zip(&want).filter(|(a, b)| a != b).count();
    assert_eq!(differ, 0, "{model}: {differ} of {} values differ from onnxruntime's", want.len());
}

#[test]
fn layer_norm_tail_only_matches_onnxruntime() {
    // 13 = one block of eight, a block of four and one element
    check("layer_norm_13.onnx", "LayerNormalization");
}

#[test]
fn layer_norm_blocks_match_onnxruntime() {
    check("layer_norm_40.onnx", "LayerNormalization");
}

#[test]
fn add_layer_norm_matches_onnxruntime_skip_layer_norm() {
    check("add_layer_norm.onnx", "SkipLayerNormalization");
}

#[test]
fn gelu_subgraph_matches_onnxruntime_gelu() {
    check("gelu.onnx", "Gelu");
}

#[test]
fn use_tract_layer_norm_restores_tract_decomposition() {
    use tract_onnx::prelude::*;
    let mut onnx = tract_onnx::onnx();
    kiln_ops::register(&mut onnx.op_register);
    let mut model = onnx.model_for_path(data("layer_norm_40.onnx")).unwrap().into_typed().unwrap();
    let ort = model.nodes().iter().filter(|n| n.op_is::<kiln_ops::layer_norm::OrtLayerNorm>()).count();
    assert_eq!(ort, 1, "the float32 LayerNormalization is kiln's");
    let x = Tensor::from_shape(&[6, 40], &(0..240).map(|i| ((i * 37 % 101) as f32) / 7.0 - 3.0).collect::<Vec<_>>())
        .unwrap();
    let run = |m: &TypedModel| -> Vec<f32> {
        let plan = m.clone().into_runnable().unwrap();
        let out = plan.run(tvec!(x.clone().into_tvalue())).unwrap();
        out[0].try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec()
    };
    let want = run(&model);
    assert_eq!(kiln_ops::layer_norm::use_tract_layer_norm(&mut model).unwrap(), 1);
    assert!(!model.nodes().iter().any(|n| n.op_is::<kiln_ops::layer_norm::OrtLayerNorm>()));
    let got = run(&model);
    for (a, b) in want.iter().zip(&got) {
        assert!((a - b).abs() <= 1e-5, "tract's decomposition {b} vs onnxruntime's arithmetic {a}");
    }
}
