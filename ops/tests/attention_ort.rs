//! kiln's Attention against onnxruntime (CPU) on the cases `data/attention/generate.py` writes: boolean and float
//! masks, past key/value, is_causal with the past offset, GQA, 3D and 4D inputs.

use std::path::Path;

use tract_onnx::prelude::*;

fn framework() -> tract_onnx::Onnx {
    let mut onnx = tract_onnx::onnx();
    kiln_ops::register(&mut onnx.op_register);
    onnx
}

fn run_case(name: &str) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/attention").join(name);
    let onnx = framework();
    let data = onnx.proto_model_for_path(dir.join("data.onnx")).expect("data.onnx");
    let graph = data.graph.as_ref().expect("graph");
    let tensors: Vec<(String, Tensor)> = graph
        .initializer
        .iter()
        .map(|t| {
            let v = tract_onnx::tensor::load_tensor(&tract_onnx::data_resolver::FopenDataResolver, t, None)
                .expect("tensor");
            (t.name.clone(), v)
        })
        .collect();
    let get = |n: &str| tensors.iter().find(|(k, _)| k == n).map(|(_, t)| t.clone());

    let model = onnx.model_for_path(dir.join("model.onnx")).expect("model");
    let input_names: Vec<String> =
        model.input_outlets().unwrap().iter().map(|o| model.node(o.node).name.clone()).collect();
    let output_names: Vec<String> =
        model.output_outlets().unwrap().iter().map(|o| model.outlet_label(*o).unwrap().to_string()).collect();
    for level in ["typed", "optimized"] {
        let mut typed = model.clone().into_typed().expect("typed");
        if level == "optimized" {
            typed = typed.into_optimized().expect("optimized");
        }
        let plan = typed.into_runnable().expect("runnable");
        let inputs: TVec<TValue> =
            input_names.iter().map(|n| get(n).unwrap_or_else(|| panic!("no data for {n}")).into_tvalue()).collect();
        let outputs = plan.run(inputs).expect("run");
        assert_eq!(outputs.len(), output_names.len());
        for (name, got) in output_names.iter().zip(outputs) {
            let want = get(&format!("expected:{name}")).expect("expected output");
            assert_eq!(got.shape(), want.shape(), "{name}: shape");
            let got = got.cast_to::<f32>().unwrap().into_owned();
            let got = got.try_as_plain_ram().unwrap();
            let want = want.try_as_plain_ram().unwrap();
            let (g, w) = (got.as_slice::<f32>().unwrap(), want.as_slice::<f32>().unwrap());
            let worst = g.iter().zip(w).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(g.iter().all(|x| x.is_finite()), "{name}: {level} non-finite values");
            assert!(worst <= 1e-5, "{name} ({level}): max diff {worst:e} vs onnxruntime");
        }
    }
}

#[test]
fn bool_mask_past_causal_gqa_4d() {
    run_case("bool_mask_past_causal_gqa_4d");
}

#[test]
fn bool_mask_past_causal_decode_4d() {
    run_case("bool_mask_past_causal_decode_4d");
}

#[test]
fn past_causal_no_mask_4d() {
    run_case("past_causal_no_mask_4d");
}

#[test]
fn bool_mask_past_3d() {
    run_case("bool_mask_past_3d");
}

#[test]
fn float_mask_past_causal_3d() {
    run_case("float_mask_past_causal_3d");
}

#[test]
fn fully_masked_row_bool_past_causal_4d() {
    run_case("fully_masked_row_bool_past_causal_4d");
}
