//! Adapter limits: with the storage binding limit capped low (KILN_GPU_MAX_BINDING, 64 KiB here, for the whole
//! test binary), constant weights over the limit are split so their nodes still run on the GPU — a MatMul's weight
//! along N (both layouts, and a Gemm with transB), a Gather's table along its embedding axis — while a
//! non-constant tensor over the limit sends its node to the CPU with the reason "shape too large". Every output is
//! compared with the CPU reference on random inputs, with the GPU's output buffers poisoned (NaN) first; the tiny
//! fixtures still match their reference under the cap. Skips, loudly, only without a GPU adapter.
#![cfg(not(target_arch = "wasm32"))]

mod common;
mod graphs;

use common::*;
use graphs::*;
use kiln_graph::tract_onnx::pb;
use kiln_provider::blocking::Session;
use kiln_provider::{Device, ExecutionProvider, Tensor};

const CAP: usize = 64 << 10;

/// Caps the binding limit for every GPU session of this binary (once, before any session exists).
fn setup() -> bool {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| std::env::set_var("KILN_GPU_MAX_BINDING", CAP.to_string()));
    gpu_available()
}

fn i64_input(name: &str, dims: &[usize]) -> pb::ValueInfoProto {
    value_info(name, 7, Some(&dims.iter().map(|d| Some(*d)).collect::<Vec<_>>()))
}

fn f32_input(name: &str, dims: &[Option<usize>]) -> pb::ValueInfoProto {
    value_info(name, 1, Some(dims))
}

/// Runs `bytes` on the CPU and on the capped GPU with `feeds`; checks the outputs and returns the GPU placement.
fn compare(what: &str, bytes: &[u8], feeds: Vec<(String, Tensor)>) -> kiln_provider::PlacementReport {
    let cpu = Session::from_bytes(bytes, &options(ExecutionProvider::Cpu)).expect("loading on the CPU");
    let want = cpu.run(feeds.clone()).unwrap_or_else(|e| panic!("{what}: cpu: {e}"));
    let gpu = Session::from_bytes(bytes, &options(ExecutionProvider::WebGpu))
        .unwrap_or_else(|e| panic!("{what}: loading on the GPU: {e}"));
    let report = gpu.gpu_placement().unwrap_or_else(|| panic!("{what}: not on the GPU: {:?}", gpu.provider_note()));
    gpu.set_gpu_poison(true);
    for run in 0..2 {
        let got = gpu.run(feeds.clone()).unwrap_or_else(|e| panic!("{what}: gpu run {run}: {e}"));
        for (name, w) in want.iter() {
            assert_close(&format!("{what}: {name} (run {run})"), got.output(name).unwrap(), w, 1e-4, 1e-4);
        }
    }
    report
}

fn gpu_ops<'a>(report: &'a kiln_provider::PlacementReport, op: &str) -> Vec<&'a kiln_provider::NodePlacement> {
    report.nodes.iter().filter(|n| n.op.contains(op) && n.device == Device::Gpu).collect()
}

#[test]
fn matmul_weights_over_the_limit_are_split_along_n() {
    if !setup() {
        return;
    }
    let mut rng = Rng::seeded("gpu_split matmul");
    // W [k, n] with k·n·4 over the cap: n cut into chunks of cap / (4k) columns
    for (k, n, m) in [(64usize, 1000usize, 1usize), (64, 1000, 7), (33, 1531, 3), (17, 4099, 1)] {
        let w = rng.vec(k * n);
        let bytes = model(
            vec![node("MatMul", &["x", "w"], "y", vec![])],
            vec![f32_input("x", &[None, Some(k)])],
            vec![value_info("y", 1, None)],
            vec![f32_init("w", &[k, n], &w)],
        );
        let feeds = vec![("x".to_string(), Tensor::from_vec(&[m, k], rng.vec(m * k)).unwrap())];
        let what = format!("MatMul [{m},{k}]x[{k},{n}]");
        let report = compare(&what, &bytes, feeds);
        let chunks = (k * n * 4).div_ceil(CAP / (4 * k) * 4 * k);
        let mms = gpu_ops(&report, "MatMul");
        assert!(mms.len() >= chunks, "{what}: {} GPU matmuls for {chunks} chunks: {:?}", mms.len(), report.nodes);
        assert!(!gpu_ops(&report, "Concat").is_empty(), "{what}: no GPU concat: {:?}", report.nodes);
        assert!(report.nodes.iter().all(|p| p.device == Device::Gpu), "{what}: CPU nodes: {:?}", report.nodes);
        assert!(report.weights_on_gpu >= chunks, "{what}: {} weights uploaded", report.weights_on_gpu);
    }
}

#[test]
fn gemm_with_a_transposed_weight_is_split() {
    if !setup() {
        return;
    }
    let mut rng = Rng::seeded("gpu_split gemm");
    let (m, k, n) = (5usize, 48usize, 900usize);
    let trans_b = pb::AttributeProto {
        name: "transB".into(),
        i: 1,
        r#type: pb::attribute_proto::AttributeType::Int as i32,
        ..Default::default()
    };
    let bytes = model(
        vec![node("Gemm", &["x", "w", "b"], "y", vec![trans_b])],
        vec![f32_input("x", &[Some(m), Some(k)])],
        vec![value_info("y", 1, None)],
        vec![f32_init("w", &[n, k], &rng.vec(n * k)), f32_init("b", &[n], &rng.vec(n))],
    );
    let feeds = vec![("x".to_string(), Tensor::from_vec(&[m, k], rng.vec(m * k)).unwrap())];
    let report = compare("Gemm transB", &bytes, feeds);
    assert!(gpu_ops(&report, "MatMul").len() >= 3, "{:?}", report.nodes);
    assert!(report.nodes.iter().all(|p| p.device == Device::Gpu), "CPU nodes: {:?}", report.nodes);
}

#[test]
fn gather_tables_over_the_limit_are_split() {
    if !setup() {
        return;
    }
    let mut rng = Rng::seeded("gpu_split gather");
    // an embedding [vocab, hidden] over the cap, gathered by token ids (some negative, counted from the end)
    for (vocab, hidden, ids) in [(1000usize, 64usize, vec![1usize, 7]), (4099, 24, vec![3, 5]), (700, 130, vec![9])] {
        let table = rng.vec(vocab * hidden);
        let bytes = model(
            vec![node("Gather", &["table", "ids"], "y", vec![attr_int("axis", 0)])],
            vec![i64_input("ids", &ids)],
            vec![value_info("y", 1, None)],
            vec![f32_init("table", &[vocab, hidden], &table)],
        );
        let n: usize = ids.iter().product();
        let values: Vec<i64> = (0..n)
            .map(|i| {
                let v = rng.below(vocab) as i64;
                if i % 3 == 2 {
                    v - vocab as i64
                } else {
                    v
                }
            })
            .collect();
        let mut values = values;
        values[0] = vocab as i64 - 1; // the last row, in the last chunk
        let feeds = vec![("ids".to_string(), Tensor::from_vec(&ids, values).unwrap())];
        let what = format!("Gather [{vocab},{hidden}] by {ids:?}");
        let report = compare(&what, &bytes, feeds);
        let gathers = gpu_ops(&report, "Gather");
        assert!(gathers.len() >= 2, "{what}: {} GPU gathers: {:?}", gathers.len(), report.nodes);
        assert!(report.nodes.iter().all(|p| p.device == Device::Gpu), "{what}: CPU nodes: {:?}", report.nodes);
    }
}

#[test]
fn tensors_over_the_limit_fall_back_to_the_cpu() {
    if !setup() {
        return;
    }
    let mut rng = Rng::seeded("gpu_split fallback");
    // x [1, 20000] f32 (80 KB) is over the cap; y = relu(x) · 2 stays on the CPU, a small matmul after a reduction
    // still runs on the GPU
    let n = 20000usize;
    let bytes = model(
        vec![
            node("Relu", &["x"], "r", vec![]),
            node("ReduceSum", &["r", "axes"], "s", vec![attr_int("keepdims", 1)]),
            node("MatMul", &["s", "w"], "y", vec![]),
        ],
        vec![f32_input("x", &[Some(4), Some(n)])],
        vec![value_info("y", 1, None)],
        vec![
            pb::TensorProto {
                name: "axes".into(),
                dims: vec![1],
                data_type: 7,
                int64_data: vec![1],
                ..Default::default()
            },
            f32_init("w", &[1, 8], &rng.vec(8)),
        ],
    );
    let feeds = vec![("x".to_string(), Tensor::from_vec(&[4, n], rng.vec(4 * n)).unwrap())];
    let report = compare("fallback", &bytes, feeds);
    let relu =
        report.nodes.iter().find(|p| p.node.starts_with("r")).unwrap_or_else(|| panic!("no relu: {:?}", report.nodes));
    assert_eq!(relu.device, Device::Cpu, "{:?}", report.nodes);
    assert!(relu.reason.as_deref().is_some_and(|r| r.contains("shape too large")), "reason: {:?}", relu.reason);
    assert!(report.gpu_nodes() > 0, "{:?}", report.nodes);
}

#[test]
fn fixtures_match_under_a_small_binding_limit() {
    if !setup() {
        return;
    }
    for model in ["tiny-gpt2/onnx_optimum", "tiny-llama/onnx_dynamo_eager_op20"] {
        let dir = tiny_fixtures().join(model);
        let gpu = Session::from_path(dir.join("model.onnx"), &options(ExecutionProvider::WebGpu)).expect("loading");
        let report = gpu.gpu_placement().expect("a GPU session");
        let large =
            report.nodes.iter().filter(|p| p.reason.as_deref().is_some_and(|r| r.contains("too large"))).count();
        eprintln!(
            "{model} under a {CAP}-byte binding limit: {} of {} nodes on the GPU ({large} too large), {} weights",
            report.gpu_nodes(),
            report.nodes.len(),
            report.weights_on_gpu
        );
        assert!(report.gpu_nodes() > 0);
        for set in ["test_data_set_0", "test_data_set_1"] {
            let set_dir = dir.join(set);
            if !set_dir.exists() {
                continue;
            }
            let out = gpu.run(read_inputs(&gpu, &set_dir)).unwrap_or_else(|e| panic!("{model} {set}: {e}"));
            for (name, want) in read_outputs(&gpu, &set_dir) {
                let (diff, max) = max_diff(&name, out.output(&name).unwrap(), &want);
                assert!(diff <= 1e-4 * max.max(1.0), "{model} {set}: {name}: max|diff| {diff:.3e}");
            }
        }
    }
}
