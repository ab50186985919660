//! Streamed weights over the adapter's storage binding limit (capped at 64 KiB for this binary with
//! KILN_GPU_MAX_BINDING): split into parts like weights in memory (lower_gpu::split_large_weights), each part an
//! ExternalWeight slice whose buffer is filled from the source — the stored tensor read once, in reads of at most the
//! chunk size, every read cut into the parts' segments. The tiny fixtures against onnxruntime's reference and the CPU
//! session, and a weight whose rows are longer than a read. Skips, loudly, only without a GPU adapter.
#![cfg(all(not(target_arch = "wasm32"), target_os = "linux"))]

mod common;
mod graphs;
#[path = "common/stream.rs"]
mod stream;

use common::*;
use graphs::*;
use kiln_provider::blocking::Session;
use kiln_provider::{Device, Tensor};
use stream::*;

const CAP: usize = 64 << 10;

/// Caps the binding limit for every GPU session of this binary (once, before any session exists).
fn setup() -> bool {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| std::env::set_var("KILN_GPU_MAX_BINDING", CAP.to_string()));
    gpu_available()
}

#[test]
fn tiny_llama_fp32_streams_split_weights() {
    if setup() {
        fixture("tiny-llama/onnx_optimum", 1e-4);
    }
}

#[test]
fn tiny_llama_fp16_streams_split_weights() {
    if setup() {
        fixture("tiny-llama/onnx_optimum_fp16", 2e-2);
    }
}

/// y = x · W with W [2, 40000] float32 (312.5 KiB): split along N into parts under 64 KiB, each part's segment of a
/// 160000-byte row read in pieces of at most 4 KiB.
#[test]
fn rows_longer_than_a_read_are_read_in_pieces() {
    if !setup() {
        return;
    }
    let mut rng = Rng::seeded("gpu_stream_split");
    let (k, n) = (2usize, 40000usize);
    let bytes = model(
        vec![node("MatMul", &["x", "w"], "y", vec![])],
        vec![value_info("x", 1, Some(&[Some(1), Some(k)]))],
        vec![value_info("y", 1, None)],
        vec![f32_init("w", &[k, n], &rng.vec(k * n))],
    );
    let (ext, data, moved) = externalize(&bytes, 1024);
    let source = recording(data.clone());
    let session = Session::from_bytes(&ext, &gpu_options(source.clone(), 1024, 4096)).expect("loading");
    let report = session.gpu_placement().expect("on the GPU");
    let mms: Vec<_> = report.nodes.iter().filter(|p| p.op.contains("MatMul")).collect();
    assert!(mms.len() >= 5 && mms.iter().all(|p| p.device == Device::Gpu), "{mms:?}");
    assert_eq!(report.weights_streamed, mms.len(), "{report:?}");
    check_reads("rows", &source, &moved, 1024, 4096);
    let x = Tensor::from_vec(&[1, k], rng.vec(k)).unwrap();
    let got = session.run([("x", x.clone())]).expect("running on the GPU");
    let cpu = Session::from_bytes(&ext, &cpu_options(recording(data))).expect("loading on the CPU");
    let want = cpu.run([("x", x)]).expect("running on the CPU");
    let (diff, ref_max) = max_diff("y", got.output("y").unwrap(), want.output("y").unwrap());
    assert!(diff <= 1e-4 * ref_max.max(1.0), "y: max|diff| {diff:.3e} (max|ref| {ref_max})");
}

/// y = x + W with W [20000] float32 (78 KiB, a 1-D weight that cannot be cut): the Add stays on the CPU ("shape too
/// large"), so the streamed W is read into memory when the session is made, in reads of at most the chunk; V, read by
/// a MatMul on the GPU, is streamed into its buffer. Both outputs against the CPU session.
#[test]
fn a_streamed_weight_a_cpu_node_reads_is_read_into_memory() {
    if !setup() {
        return;
    }
    let mut rng = Rng::seeded("gpu_stream_split cpu reader");
    let (n, k) = (20000usize, 64usize);
    let bytes = model(
        vec![node("Add", &["x", "w"], "y", vec![]), node("MatMul", &["a", "v"], "z", vec![])],
        vec![value_info("x", 1, Some(&[Some(n)])), value_info("a", 1, Some(&[Some(1), Some(k)]))],
        vec![value_info("y", 1, None), value_info("z", 1, None)],
        vec![f32_init("w", &[n], &rng.vec(n)), f32_init("v", &[k, k], &rng.vec(k * k))],
    );
    let (ext, data, moved) = externalize(&bytes, 1024);
    let source = recording(data.clone());
    let session = Session::from_bytes(&ext, &gpu_options(source.clone(), 1024, 4096)).expect("loading");
    let report = session.gpu_placement().expect("on the GPU");
    let add = report.nodes.iter().find(|p| p.op.contains("Add")).expect("the Add");
    assert_eq!(add.device, Device::Cpu, "{add:?}");
    assert_eq!(report.weights_streamed, 1, "{report:?}");
    assert!(report.host_constants.iter().any(|c| c.1 == (n * 4) as u64), "w is a host constant: {report:?}");
    check_reads("cpu reader", &source, &moved, 1024, 4096);
    let feeds = vec![
        ("x".to_string(), Tensor::from_vec(&[n], rng.vec(n)).unwrap()),
        ("a".to_string(), Tensor::from_vec(&[1, k], rng.vec(k)).unwrap()),
    ];
    let got = session.run(feeds.clone()).expect("running on the GPU");
    let cpu = Session::from_bytes(&ext, &cpu_options(recording(data))).expect("loading on the CPU");
    let want = cpu.run(feeds).expect("running on the CPU");
    for name in ["y", "z"] {
        let (diff, ref_max) = max_diff(name, got.output(name).unwrap(), want.output(name).unwrap());
        assert!(diff <= 1e-4 * ref_max.max(1.0), "{name}: max|diff| {diff:.3e} (max|ref| {ref_max})");
    }
}
