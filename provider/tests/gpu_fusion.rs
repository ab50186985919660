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

mod common;
use common::assert_no_gpu_adapter;

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

/// A graph of `nodes` (op, inputs, output) over f32 `inputs` with the outputs `outs` (shapes left to inference).
fn model_with_outputs(inputs: &[(&str, &[usize])], nodes: &[(&str, &[&str], &str)], outs: &[&str]) -> Vec<u8> {
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
        output: outs.iter().map(|o| value_info(o, &[])).collect(),
        ..Default::default()
    };
    let mut graph = graph;
    // the outputs' shapes are left to inference
    for o in graph.output.iter_mut() {
        if let Some(Some(TypeValue::TensorType(t))) = o.r#type.as_mut().map(|t| t.value.as_mut()) {
            t.shape = None;
        }
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

/// The model on the GPU with poisoned output buffers, or `None` (loudly) when the machine has no GPU adapter; an
/// adapter that did not take the model fails the test.
fn gpu_session(bytes: &[u8]) -> Option<Session> {
    let gpu = session(bytes, ExecutionProvider::WebGpu);
    if gpu.execution_provider() != ExecutionProvider::WebGpu {
        assert_no_gpu_adapter(gpu.provider_note());
        eprintln!("\n!!!!!!!! SKIPPING GPU FUSION TESTS: no GPU adapter ({:?}) !!!!!!!!\n", gpu.provider_note());
        return None;
    }
    gpu.set_gpu_poison(true);
    Some(gpu)
}

/// Runs the graph (output `y`) on both providers twice (fresh random inputs), compares, and returns the GPU's
/// dispatches per run (`None` when there is no GPU adapter).
fn check(name: &str, inputs: &[(&str, &[usize])], nodes: &[(&str, &[&str], &str)]) -> Option<usize> {
    check_outputs(name, inputs, nodes, &["y"])
}

/// [`check`] of a graph with the outputs `outs`.
fn check_outputs(
    name: &str,
    inputs: &[(&str, &[usize])],
    nodes: &[(&str, &[&str], &str)],
    outs: &[&str],
) -> Option<usize> {
    let bytes = model_with_outputs(inputs, nodes, outs);
    let gpu = gpu_session(&bytes)?;
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
        for out in outs {
            let (w, g) = (want.output(out).expect("output"), got.output(out).expect("output"));
            assert_eq!(w.dims(), g.dims(), "{name}: {out}'s shapes differ");
            let (w, g): (Vec<f32>, Vec<f32>) = (w.to_vec().expect("f32"), g.to_vec().expect("f32"));
            for (i, (a, b)) in w.iter().zip(&g).enumerate() {
                let close = (a - b).abs() <= 1e-5 + 1e-4 * a.abs() || (a.is_nan() && b.is_nan());
                assert!(close, "{name}: {out}[{i}]: cpu {a} gpu {b}");
            }
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

/// Sibling nodes reading one value (a rotary's cos and sin of the same angles) run as one dispatch with an output
/// each, the value's own chain computed inside (dynamo's `Cast · Mul` angles: three dispatches become one), and
/// match the CPU; siblings whose outputs differ in shape, or one of which reads the other, are not joined.
#[test]
fn siblings_reading_one_value_are_one_dispatch_with_an_output_each() {
    let x: &[usize] = &[2, 3, 40];
    type Case<'a> = (&'a str, &'a [(&'a str, &'a [usize])], &'a [(&'a str, &'a [&'a str], &'a str)], usize);
    let cases: &[Case] = &[
        ("cos and sin of an input", &[("x", x)], &[("Cos", &["x"], "y"), ("Sin", &["x"], "z")], 1),
        (
            "cos and sin of a product",
            &[("x", x), ("f", &[40])],
            &[("Mul", &["x", "f"], "a"), ("Cos", &["a"], "y"), ("Sin", &["a"], "z")],
            1,
        ),
        (
            "siblings of two shapes",
            &[("x", x), ("b", &[5, 1, 1, 1])],
            &[("Cos", &["x"], "y"), ("Add", &["x", "b"], "z")],
            2,
        ),
        // one sibling reads the other through a Softmax: joined they would be a cycle
        (
            "a sibling reading the other",
            &[("x", x)],
            &[("Sin", &["x"], "z"), ("Softmax", &["z"], "s"), ("Mul", &["x", "s"], "y")],
            3,
        ),
    ];
    for (name, inputs, nodes, want) in cases {
        let Some(ran) = check_outputs(name, inputs, nodes, &["y", "z"]) else { return };
        assert_eq!(ran, *want, "{name}: dispatches");
    }
}

/// An attention-mask builder cut from an export (`data/mask/`, written by make_mask.py) on the GPU with left
/// padding and holes, past lengths 0 / 1 / odd / long, one and several rows: every element matches the mask's
/// definition (0 where key j is at most past + i and not padding, f32::MIN elsewhere) and the CPU's, in
/// `dispatches` dispatches a run, with `attention_mask` the only upload. `past`: the inputs that give the past
/// length (their shape only).
fn check_mask_builder(file: &str, past: &[(&str, usize, usize)], dispatches: usize) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/mask").join(file);
    let bytes = std::fs::read(&path).expect("a mask model");
    let Some(gpu) = gpu_session(&bytes) else { return };
    let report = gpu.gpu_placement().expect("a GPU session has a placement report");
    let cpu_nodes: Vec<_> = report.nodes.iter().filter(|p| p.reason.is_some()).collect();
    assert!(cpu_nodes.is_empty(), "{file}: nodes left on the CPU: {cpu_nodes:?}");
    let cpu = session(&bytes, ExecutionProvider::Cpu);
    let out = gpu.outputs()[0].name.clone();
    let mut state = seed();
    // (batch, seq, past)
    let cases: &[(usize, usize, usize)] =
        &[(1, 1, 0), (1, 1, 1), (1, 1, 9), (2, 3, 4), (3, 1, 17), (2, 5, 0), (1, 7, 300)];
    for &(b, s, p) in cases {
        let t = p + s;
        // row r is left-padded by r keys, and ~1 in 5 of the others is a hole
        let mask: Vec<i64> = (0..b * t)
            .map(|k| {
                let (r, j) = (k / t, k % t);
                let hole = random(&mut state, 1)[0] > 1.2;
                i64::from(j >= r && !hole)
            })
            .collect();
        let mut feeds = vec![
            ("input_ids".to_string(), Tensor::from_vec(&[b, s], vec![0i64; b * s]).expect("ids")),
            ("attention_mask".to_string(), Tensor::from_vec(&[b, t], mask.clone()).expect("mask")),
        ];
        for (name, heads, head) in past {
            let t = Tensor::from_vec(&[b, *heads, p, *head], vec![0f32; b * heads * p * head]).expect("past");
            feeds.push((name.to_string(), t));
        }
        let before = gpu.gpu_placement().expect("report").counters;
        let got = gpu.run(feeds.clone()).expect("gpu run");
        let after = gpu.gpu_placement().expect("report").counters;
        let (ran, uploads) = (after.dispatches - before.dispatches, after.uploads - before.uploads);
        let want = cpu.run(feeds).expect("cpu run");
        let (g, w) = (got.output(&out).expect("mask"), want.output(&out).expect("mask"));
        assert_eq!(g.dims(), &[b, 1, s, t], "{file} ({b}, {s}, {p}): shape");
        assert_eq!(w.dims(), g.dims(), "{file} ({b}, {s}, {p}): shapes differ");
        let (g, w): (Vec<f32>, Vec<f32>) = (g.to_vec().expect("f32"), w.to_vec().expect("f32"));
        for (k, (gv, wv)) in g.iter().zip(&w).enumerate() {
            let (r, i, j) = (k / (s * t), (k / t) % s, k % t);
            let keep = j <= p + i && mask[r * t + j] != 0;
            let def = if keep { 0.0 } else { f32::MIN };
            assert_eq!(gv.to_bits(), def.to_bits(), "{file} ({b}, {s}, {p}) element {k}: gpu {gv}, definition {def}");
            assert_eq!(wv.to_bits(), def.to_bits(), "{file} ({b}, {s}, {p}) element {k}: cpu {wv}, definition {def}");
        }
        assert_eq!(ran, dispatches, "{file} ({b}, {s}, {p}): dispatches of the mask builder");
        // attention_mask goes up; the ranges are computed on the GPU
        assert_eq!(uploads, 1, "{file} ({b}, {s}, {p}): uploads");
    }
}

/// optimum's builder (`optimum_mask.onnx`): ranges of the run's dims, a causal comparison past the cache,
/// `attention_mask` cast to bool, flattened and looked up per (batch, key), joined and turned into 0 / f32::MIN:
/// one fused dispatch (ten before: three ranges, a dim value, Mul, Add, LessOrEqual, Cast, Gather, And / Where).
#[test]
fn the_optimum_mask_builder_is_one_dispatch_and_matches_its_definition() {
    check_mask_builder("optimum_mask.onnx", &[("past", 1, 1)], 1);
}

/// torch.onnx dynamo's builder (`dynamo_mask.onnx`, as the tiny llama fixture's op20 export has it): the padding
/// looked up by a GatherND whose (batch, key) index tuples Concat two Expanded ranges, the causal part from
/// `arange(seq) + past`: one fused dispatch (eight before: two ranges, `arange + past`, two Expands, the Concat,
/// the GatherND, the Cast, the comparison with And / Where).
#[test]
fn the_dynamo_mask_builder_is_one_dispatch_and_matches_its_definition() {
    check_mask_builder("dynamo_mask.onnx", &[("past", 1, 1)], 1);
}

/// bench/make_llama.py's builder (`rank_mask.onnx`): two ranges of the run's dims (past = total − seq) compared into
/// a [seq, total] causal matrix whose rank leading unit axes fix before the And with `attention_mask` cast to bool:
/// one fused dispatch and no upload (before: the ranges ran on the CPU and went up every run, the comparison was
/// a dispatch of its own).
#[test]
fn a_mask_builder_with_a_rank_fix_is_one_dispatch_and_matches_its_definition() {
    check_mask_builder("rank_mask.onnx", &[], 1);
}

/// transformers' rotary angles as optimum exports them (`hf_rope_angles.onnx`: `inv_freq[None, :, None] @
/// positions[:, None, :]` — a MatMul with K = 1 — transposed, concatenated with itself, cos and sin): the outer
/// product runs as a broadcast Mul fused with the positions' Cast, and cos and sin as one kernel — 4 dispatches a
/// run (the Cast · Mul, the Concat's two copies, cos and sin), where the Cast, the tiled matmul and the transpose
/// (a copy for more than one position) were one each; the tables match the CPU's for one and several rows, odd and
/// long positions.
#[test]
fn transformers_rotary_angles_fuse_into_the_positions_cast() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/mask/hf_rope_angles.onnx");
    let bytes = std::fs::read(&path).expect("hf_rope_angles.onnx");
    let Some(gpu) = gpu_session(&bytes) else { return };
    let cpu = session(&bytes, ExecutionProvider::Cpu);
    let outs: Vec<String> = gpu.outputs().iter().map(|o| o.name.clone()).collect();
    for (b, s, first) in [(1usize, 1usize, 0i64), (1, 1, 2047), (2, 5, 3), (1, 33, 100)] {
        let pos: Vec<i64> = (0..b * s).map(|k| first + (k % s) as i64 + 7 * (k / s) as i64).collect();
        let feeds = vec![("position_ids".to_string(), Tensor::from_vec(&[b, s], pos).expect("positions"))];
        let before = gpu.gpu_placement().expect("report").counters.dispatches;
        let got = gpu.run(feeds.clone()).expect("gpu run");
        let ran = gpu.gpu_placement().expect("report").counters.dispatches - before;
        let want = cpu.run(feeds).expect("cpu run");
        for out in &outs {
            let (w, g) = (want.output(out).expect("output"), got.output(out).expect("output"));
            assert_eq!(w.dims(), g.dims(), "({b}, {s}): {out}'s shapes differ");
            let (w, g): (Vec<f32>, Vec<f32>) = (w.to_vec().expect("f32"), g.to_vec().expect("f32"));
            for (i, (x, y)) in w.iter().zip(&g).enumerate() {
                // cos / sin of the same f32 angle: the GPU's and the CPU's transcendentals, a few ulps of 1
                assert!((x - y).abs() <= 2e-6, "({b}, {s}): {out}[{i}]: cpu {x} gpu {y}");
            }
        }
        assert_eq!(ran, 4, "({b}, {s}): dispatches");
    }
}
