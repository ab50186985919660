//! A weight placed on the GPU is not also kept in host memory. The session uploads the constants the GPU nodes read
//! once, at creation, and then neither the lowered plan nor the session's model holds their bytes: a model with a
//! 120 MiB weight grows the process by about one copy of it (lavapipe keeps GPU buffers in host memory), not two;
//! the placement report counts the bytes left on the host; outputs still match the CPU reference.
//! Skips, loudly, only when the machine has no GPU adapter (CI installs lavapipe).
#![cfg(all(not(target_arch = "wasm32"), target_os = "linux"))]

mod common;
mod graphs;

use std::sync::Mutex;

use common::*;
use graphs::*;
use kiln_provider::blocking::Session;
use kiln_provider::{ExecutionProvider, Tensor};

/// The tests measure process memory: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// Resident memory of this process, in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("reading /proc/self/status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status");
    kb * 1024
}

/// y = x · W with W [k, n] an initializer.
fn matmul_model(k: usize, n: usize, w: &[f32]) -> Vec<u8> {
    model(
        vec![node("MatMul", &["x", "w"], "y", vec![])],
        vec![value_info("x", 1, Some(&[Some(1), Some(k)]))],
        vec![value_info("y", 1, None)],
        vec![f32_init("w", &[k, n], w)],
    )
}

#[test]
fn a_big_gpu_weight_is_held_once() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !gpu_available() {
        return;
    }
    let mut rng = Rng::seeded("gpu_weights");
    // warm up the driver (lavapipe's LLVM, the loader) and the pipelines on a small model of the same graph
    let small = Session::from_bytes(&matmul_model(8, 8, &rng.vec(64)), &options(ExecutionProvider::WebGpu))
        .expect("loading the small model");
    small.run([("x", Tensor::from_vec(&[1, 8], rng.vec(8)).unwrap())]).expect("running the small model");
    drop(small);

    let (k, n) = (3840usize, 8192usize);
    let weight_bytes = (k * n * 4) as u64; // 120 MiB: under lavapipe's 128 MiB storage binding limit
    let x = Tensor::from_vec(&[1, k], rng.vec(k)).unwrap();
    let seed = rng.0;
    let before = rss();
    let gpu = {
        let bytes = matmul_model(k, n, &Rng(seed).vec(k * n));
        Session::from_bytes(&bytes, &options(ExecutionProvider::WebGpu)).expect("loading on the GPU")
    };
    let report = gpu.gpu_placement().expect("a GPU session");
    assert_eq!(report.gpu_nodes(), 1, "the matmul runs on the GPU: {:?}", report.nodes);
    let got = gpu.run([("x", x.clone())]).expect("running on the GPU");
    let after = rss();
    let grew = after.saturating_sub(before);
    let report = gpu.gpu_placement().expect("a GPU session");
    eprintln!(
        "gpu_weights: {} MiB weight; RSS {} → {} MiB (+{} MiB); on the GPU {} weights, {} bytes; host constants {} bytes",
        weight_bytes >> 20,
        before >> 20,
        after >> 20,
        grew >> 20,
        report.weights_on_gpu,
        report.weight_bytes_on_gpu,
        report.host_constant_bytes
    );
    assert_eq!(report.weights_on_gpu, 1);
    assert!(report.weight_bytes_on_gpu >= weight_bytes, "{report:?}");
    assert!(report.host_constant_bytes < 4096, "the plan still holds constants: {} bytes", report.host_constant_bytes);
    let model_bytes = kiln_graph::lower_gpu::host_constant_bytes(&gpu.model().typed);
    assert_eq!(model_bytes, 0, "the session's model still holds {model_bytes} bytes of constants");
    // one copy (the GPU buffer, in host memory on lavapipe) plus slack, not two
    assert!(
        grew < weight_bytes * 3 / 2,
        "the process grew by {} MiB for a {} MiB weight: the weight is held twice",
        grew >> 20,
        weight_bytes >> 20
    );
    // a second run reads the same uploaded weight
    let again = gpu.run([("x", x.clone())]).expect("running on the GPU again");
    drop(gpu);

    let cpu = Session::from_bytes(&matmul_model(k, n, &Rng(seed).vec(k * n)), &options(ExecutionProvider::Cpu))
        .expect("loading on the CPU");
    let want = cpu.run([("x", x)]).expect("running on the CPU");
    assert_close("y", got.output("y").unwrap(), want.output("y").unwrap(), 1e-3, 1e-3);
    assert_close("y (second run)", again.output("y").unwrap(), want.output("y").unwrap(), 1e-3, 1e-3);
}

#[test]
fn tiny_gpt2_keeps_only_cpu_constants_on_the_host() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !gpu_available() {
        return;
    }
    let dir = tiny_fixtures().join("tiny-gpt2/onnx_optimum");
    let cpu = Session::from_path(dir.join("model.onnx"), &options(ExecutionProvider::Cpu)).expect("loading on the CPU");
    let total = kiln_graph::lower_gpu::host_constant_bytes(&cpu.model().typed);
    let gpu = Session::from_path(dir.join("model.onnx"), &options(ExecutionProvider::WebGpu)).expect("loading");
    let report = gpu.gpu_placement().expect("a GPU session");
    eprintln!(
        "tiny-gpt2: model constants {total} bytes; on the GPU {} weights, {} bytes; left on the host {} bytes",
        report.weights_on_gpu, report.weight_bytes_on_gpu, report.host_constant_bytes
    );
    assert!(report.weights_on_gpu > 0);
    assert!(
        report.host_constant_bytes * 10 < report.weight_bytes_on_gpu,
        "the plan keeps {} constant bytes on the host beside {} on the GPU",
        report.host_constant_bytes,
        report.weight_bytes_on_gpu
    );
    assert_eq!(kiln_graph::lower_gpu::host_constant_bytes(&gpu.model().typed), 0);
    for set in ["test_data_set_0", "test_data_set_1"] {
        let feeds = read_inputs(&gpu, &dir.join(set));
        let expected = read_outputs(&gpu, &dir.join(set));
        let out = gpu.run(feeds).unwrap_or_else(|e| panic!("{set}: {e}"));
        for (name, want) in expected {
            let (diff, _) = max_diff(&name, out.output(&name).unwrap(), &want);
            assert!(diff <= 1e-4, "{set}: {name}: max|diff| {diff:.3e}");
        }
    }
}
