//! The fp32 tiny fixtures on the WebGPU provider (GPU kernels, CPU fallback for the rest): prefill
//! (test_data_set_0) and one decode step (test_data_set_1), every output against onnxruntime's at 1e-4, plus the
//! placement report: no node of these models stays on the CPU. Skips, loudly, only when the machine has no GPU adapter (CI installs lavapipe).
#![cfg(not(target_arch = "wasm32"))]

mod common;

use common::*;
use kiln_provider::{blocking, ExecutionProvider, SessionOptions};

fn check(model: &str) {
    let dir = tiny_fixtures().join(model);
    let opts = SessionOptions { execution_providers: vec![ExecutionProvider::WebGpu], ..Default::default() };
    let session =
        blocking::Session::from_path(dir.join("model.onnx"), &opts).unwrap_or_else(|e| panic!("{model}: loading: {e}"));
    let Some(report) = session.gpu_placement() else {
        assert_no_gpu_adapter(session.provider_note());
        eprintln!(
            "\n!!!!!!!! SKIPPING {model} ON THE GPU: no GPU adapter ({:?}). \
             Install lavapipe: apt-get install -y mesa-vulkan-drivers libvulkan1 !!!!!!!!\n",
            session.provider_note()
        );
        return;
    };
    session.set_gpu_poison(true);
    let cpu_nodes: Vec<String> = report
        .nodes
        .iter()
        .filter(|n| n.device == kiln_provider::Device::Cpu)
        .map(|n| format!("{} ({})", n.op, n.reason.clone().unwrap_or_default()))
        .collect();
    eprintln!(
        "{model}: {} of {} compute nodes on the GPU ({}), transfers to device {} / to host {}",
        report.gpu_nodes(),
        report.nodes.len(),
        report.adapter,
        report.to_device,
        report.to_host
    );
    let mut ops: std::collections::BTreeMap<String, usize> = Default::default();
    for n in &cpu_nodes {
        *ops.entry(n.clone()).or_default() += 1;
    }
    eprintln!("{model}: on the CPU: {ops:?}");
    // a whole step on the GPU: no CPU island (shape arithmetic included: kiln-graph's int_dims pass)
    assert!(cpu_nodes.is_empty(), "{model}: CPU islands {ops:?}");
    let mut failures = vec![];
    for set in ["test_data_set_0", "test_data_set_1"] {
        let set_dir = dir.join(set);
        let feeds = read_inputs(&session, &set_dir);
        let expected = read_outputs(&session, &set_dir);
        let outputs = session.run(feeds).unwrap_or_else(|e| panic!("{model}/{set}: running on the GPU: {e}"));
        for (name, want) in &expected {
            let got = outputs.get(name).unwrap_or_else(|| panic!("{model}/{set}: no output `{name}`"));
            let (diff, ref_max) = max_diff(&format!("{model}/{set}/{name}"), got, want);
            if diff > 1e-4 {
                failures.push(format!("{set}/{name}: max|diff| {diff:.3e} > 1e-4 (max|ref| {ref_max:.3})"));
            }
        }
    }
    let report = session.gpu_placement().unwrap_or_default();
    eprintln!("{model}: {} runs, {:?}", report.runs, report.counters);
    assert!(failures.is_empty(), "{model} on the GPU:\n  {}", failures.join("\n  "));
}

#[test]
fn tiny_gpt2_optimum_gpu() {
    check("tiny-gpt2/onnx_optimum");
}

#[test]
fn tiny_gpt2_dynamo_eager_op20_gpu() {
    check("tiny-gpt2/onnx_dynamo_eager_op20");
}

#[test]
fn tiny_gpt2_dynamo_sdpa_op23_gpu() {
    check("tiny-gpt2/onnx_dynamo_sdpa_op23");
}

#[test]
fn tiny_llama_optimum_gpu() {
    check("tiny-llama/onnx_optimum");
}

#[test]
fn tiny_llama_dynamo_eager_op20_gpu() {
    check("tiny-llama/onnx_dynamo_eager_op20");
}

#[test]
fn tiny_llama_dynamo_sdpa_op23_gpu() {
    check("tiny-llama/onnx_dynamo_sdpa_op23");
}

#[test]
fn tiny_llama_optimum_q4_gpu() {
    check("tiny-llama/onnx_optimum_q4");
}
