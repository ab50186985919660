//! Elementwise fusion on the GPU: small multi-node ONNX graphs (chains and trees of unary, binary and Where nodes,
//! broadcasting, shared intermediates, more inputs than one fused kernel binds) run on the webgpu provider with
//! poisoned output buffers and must match the CPU provider; each run's dispatch count shows what was fused.
//! Skips, loudly, only when the machine has no GPU adapter (CI installs lavapipe).
#![cfg(not(target_arch = "wasm32"))]

use kiln_graph::tract_onnx::pb;
use kiln_graph::tract_onnx::pb::tensor_shape_proto::dimension::Value as DimValue;
use kiln_graph::tract_onnx::pb::type_proto::Value as TypeValue;
use kiln_provider::blocking::Session;
use kiln_provider::{ExecutionProvider, SessionOptions, Tensor};
use prost::Message;

fn value_info(name: &str, dims: &[usize]) -> pb::ValueInfoProto {
    let dim = dims
        .iter()
        .map(|v| pb::tensor_shape_proto::Dimension { value: Some(DimValue::DimValue(*v as i64)), ..Default::default() })
        .collect();
    pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            value: Some(TypeValue::TensorType(pb::type_proto::Tensor {
                elem_type: 1,
                shape: Some(pb::TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A graph of `nodes` (op, inputs, output) over f32 `inputs`; the output is `y`.
fn model(inputs: &[(&str, &[usize])], nodes: &[(&str, &[&str], &str)]) -> Vec<u8> {
    let graph = pb::GraphProto {
        name: "g".into(),
        node: nodes
            .iter()
            .enumerate()
            .map(|(i, (op, ins, out))| pb::NodeProto {
                op_type: (*op).into(),
                name: format!("n{i}_{op}"),
                input: ins.iter().map(|s| s.to_string()).collect(),
                output: vec![out.to_string()],
                ..Default::default()
            })
            .collect(),
        input: inputs.iter().map(|(n, d)| value_info(n, d)).collect(),
        output: vec![pb::ValueInfoProto { name: "y".into(), ..value_info("y", &[]) }],
        ..Default::default()
    };
    let mut graph = graph;
    // the output's shape is left to inference
    if let Some(Some(TypeValue::TensorType(t))) = graph.output[0].r#type.as_mut().map(|t| t.value.as_mut()) {
        t.shape = None;
    }
    pb::ModelProto {
        ir_version: 8,
        opset_import: vec![pb::OperatorSetIdProto { domain: String::new(), version: 17 }],
        graph: Some(graph),
        ..Default::default()
    }
    .encode_to_vec()
}

fn seed() -> u64 {
    let s = std::env::var("KILN_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
    });
    eprintln!("gpu_fusion: seed {s} (KILN_TEST_SEED={s} to replay)");
    s | 1
}

fn random(state: &mut u64, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| {
            *state ^= *state << 13;
            *state ^= *state >> 7;
            *state ^= *state << 17;
            let v = ((*state >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0;
            if v == 0.0 {
                0.5
            } else {
                v
            }
        })
        .collect()
}

fn session(bytes: &[u8], ep: ExecutionProvider) -> Session {
    let options = SessionOptions { execution_providers: vec![ep], ..Default::default() };
    Session::from_bytes(bytes, &options).expect("loading")
}

/// Runs the graph on both providers twice (fresh random inputs), compares, and returns the GPU's dispatches per run
/// (`None` when there is no GPU adapter).
fn check(name: &str, inputs: &[(&str, &[usize])], nodes: &[(&str, &[&str], &str)]) -> Option<usize> {
    let bytes = model(inputs, nodes);
    let gpu = session(&bytes, ExecutionProvider::WebGpu);
    if gpu.execution_provider() != ExecutionProvider::WebGpu {
        eprintln!("\n!!!!!!!! SKIPPING GPU FUSION TESTS: no GPU adapter ({:?}) !!!!!!!!\n", gpu.provider_note());
        return None;
    }
    gpu.set_gpu_poison(true);
    let report = gpu.gpu_placement().expect("a GPU session has a placement report");
    let cpu_nodes: Vec<_> = report.nodes.iter().filter(|p| p.reason.is_some()).collect();
    assert!(cpu_nodes.is_empty(), "{name}: nodes left on the CPU: {cpu_nodes:?}");
    let cpu = session(&bytes, ExecutionProvider::Cpu);
    let mut state = seed();
    for _ in 0..2 {
        let feeds: Vec<(String, Tensor)> = inputs
            .iter()
            .map(|(n, d)| {
                let len: usize = d.iter().product();
                (n.to_string(), Tensor::from_vec(d, random(&mut state, len)).expect("tensor"))
            })
            .collect();
        let want = cpu.run(feeds.clone()).expect("cpu run");
        let got = gpu.run(feeds).expect("gpu run");
        let (w, g) = (want.output("y").expect("y"), got.output("y").expect("y"));
        assert_eq!(w.dims(), g.dims(), "{name}: shapes differ");
        let (w, g): (Vec<f32>, Vec<f32>) = (w.to_vec().expect("f32"), g.to_vec().expect("f32"));
        for (i, (a, b)) in w.iter().zip(&g).enumerate() {
            let close = (a - b).abs() <= 1e-5 + 1e-4 * a.abs() || (a.is_nan() && b.is_nan());
            assert!(close, "{name}: element {i}: cpu {a} gpu {b}");
        }
    }
    let report = gpu.gpu_placement().expect("report");
    Some(report.counters.dispatches / report.runs.max(1))
}

#[test]
fn a_silu_residual_chain_is_one_dispatch() {
    let x: &[usize] = &[3, 37, 64];
    let Some(d) = check(
        "silu residual",
        &[("x", x), ("r", x)],
        &[("Sigmoid", &["x"], "s"), ("Mul", &["x", "s"], "m"), ("Add", &["m", "r"], "y")],
    ) else {
        return;
    };
    assert_eq!(d, 1, "three elementwise nodes should run as one fused dispatch");
}

#[test]
fn a_where_tree_with_broadcasting_is_one_dispatch() {
    let Some(d) = check(
        "leaky where",
        &[("x", &[2, 3, 300]), ("z", &[1]), ("s", &[300])],
        &[("Greater", &["x", "z"], "c"), ("Mul", &["x", "s"], "m"), ("Where", &["c", "x", "m"], "y")],
    ) else {
        return;
    };
    assert_eq!(d, 1);
    let Some(d) = check(
        "broadcast chain",
        &[("x", &[2, 1, 5]), ("b", &[3, 1]), ("w", &[5])],
        &[("Add", &["x", "b"], "t"), ("Mul", &["t", "w"], "u"), ("Tanh", &["u"], "v"), ("Neg", &["v"], "y")],
    ) else {
        return;
    };
    assert_eq!(d, 1);
}

#[test]
fn a_shared_intermediate_is_computed_once_and_the_rest_fused() {
    // e feeds two nodes: it stays its own dispatch, the tree above it is one more
    let x: &[usize] = &[5, 129];
    let Some(d) = check(
        "shared intermediate",
        &[("x", x), ("a", x), ("b", x)],
        &[
            ("Exp", &["x"], "e"),
            ("Add", &["e", "a"], "p"),
            ("Mul", &["e", "b"], "q"),
            ("Abs", &["q"], "aq"),
            ("Div", &["p", "aq"], "y"),
        ],
    ) else {
        return;
    };
    assert_eq!(d, 2);
}

#[test]
fn groups_beyond_the_kernels_limits_still_match() {
    // seven distinct inputs: more than one fused kernel binds
    let x: &[usize] = &[4, 33];
    let names = ["x0", "x1", "x2", "x3", "x4", "x5", "x6"];
    let inputs: Vec<(&str, &[usize])> = names.iter().map(|n| (*n, x)).collect();
    let Some(d) = check(
        "seven inputs",
        &inputs,
        &[
            ("Add", &["x0", "x1"], "t1"),
            ("Mul", &["t1", "x2"], "t2"),
            ("Sub", &["t2", "x3"], "t3"),
            ("Max", &["t3", "x4"], "t4"),
            ("Add", &["t4", "x5"], "t5"),
            ("Mul", &["t5", "x6"], "y"),
        ],
    ) else {
        return;
    };
    assert!((1..=6).contains(&d), "dispatches per run: {d}");
    // an empty tensor through a fused chain
    check("empty", &[("x", &[0, 4]), ("r", &[0, 4])], &[("Exp", &["x"], "e"), ("Add", &["e", "r"], "y")]);
}
