//! Cross-backend op tests: every GPU kernel against the CPU (tract) on one-node ONNX models, from one table, on
//! random inputs (a fresh seed per run, printed; never zeros) over many shapes — odd sizes, size 1, broadcasting,
//! beyond one workgroup, empty — with the GPU's output buffers poisoned (NaN) first so unwritten elements fail.
//! Skips, loudly, only when the machine has no GPU adapter (CI installs lavapipe).
#![cfg(not(target_arch = "wasm32"))]

use kiln_graph::tract_onnx::pb;
use kiln_graph::tract_onnx::pb::tensor_shape_proto::dimension::Value as DimValue;
use kiln_graph::tract_onnx::pb::type_proto::Value as TypeValue;
use kiln_provider::blocking::Session;
use kiln_provider::{ExecutionProvider, SessionOptions, Tensor};

use prost::Message;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 24) as f32
    }
    /// Uniform in [lo, hi), never exactly zero.
    fn range(&mut self, lo: f32, hi: f32) -> f32 {
        let v = lo + (hi - lo) * self.next();
        if v == 0.0 {
            0.25
        } else {
            v
        }
    }
}

fn seed() -> u64 {
    let s = std::env::var("KILN_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
    });
    eprintln!("gpu_ops: seed {s} (KILN_TEST_SEED={s} to replay)");
    s | 1
}

fn value_info(name: &str, dims: Option<&[usize]>) -> pb::ValueInfoProto {
    let shape = dims.map(|d| pb::TensorShapeProto {
        dim: d
            .iter()
            .map(|v| pb::tensor_shape_proto::Dimension {
                value: Some(DimValue::DimValue(*v as i64)),
                ..Default::default()
            })
            .collect(),
    });
    pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            value: Some(TypeValue::TensorType(pb::type_proto::Tensor { elem_type: 1, shape })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn attr_int(name: &str, v: i64) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        i: v,
        r#type: pb::attribute_proto::AttributeType::Int as i32,
        ..Default::default()
    }
}

fn one_node_model(op: &str, attrs: Vec<pb::AttributeProto>, shapes: &[&[usize]]) -> Vec<u8> {
    let names: Vec<String> = (0..shapes.len()).map(|i| format!("x{i}")).collect();
    let node = pb::NodeProto {
        op_type: op.into(),
        input: names.clone(),
        output: vec!["y".into()],
        attribute: attrs,
        ..Default::default()
    };
    let graph = pb::GraphProto {
        name: "g".into(),
        node: vec![node],
        input: names.iter().zip(shapes).map(|(n, s)| value_info(n, Some(s))).collect(),
        output: vec![value_info("y", None)],
        ..Default::default()
    };
    pb::ModelProto {
        ir_version: 8,
        opset_import: vec![pb::OperatorSetIdProto { domain: String::new(), version: 17 }],
        graph: Some(graph),
        ..Default::default()
    }
    .encode_to_vec()
}

fn options(ep: ExecutionProvider) -> SessionOptions {
    SessionOptions { execution_providers: vec![ep], ..Default::default() }
}

/// A GPU session, or `None` (with a loud message) when there is no adapter.
fn gpu_available() -> bool {
    let bytes = one_node_model("Relu", vec![], &[&[2]]);
    let s = Session::from_bytes(&bytes, &options(ExecutionProvider::WebGpu)).expect("loading");
    if s.execution_provider() != ExecutionProvider::WebGpu {
        eprintln!(
            "\n!!!!!!!! SKIPPING GPU TESTS: no GPU adapter on this machine ({:?}). \
             Install lavapipe: apt-get install -y mesa-vulkan-drivers libvulkan1 !!!!!!!!\n",
            s.provider_note()
        );
        return false;
    }
    true
}

#[derive(Clone, Copy)]
struct Case {
    op: &'static str,
    attrs: fn() -> Vec<pb::AttributeProto>,
    /// Input value range.
    lo: f32,
    hi: f32,
    atol: f32,
    rtol: f32,
}

fn none() -> Vec<pb::AttributeProto> {
    vec![]
}

fn run_case(rng: &mut Rng, case: Case, shapes: &[&[usize]], const_inputs: &[usize]) -> Result<(), String> {
    let bytes = one_node_model(case.op, (case.attrs)(), shapes);
    let inputs: Vec<(String, Tensor)> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let n: usize = s.iter().product();
            let data: Vec<f32> = (0..n).map(|_| rng.range(case.lo, case.hi)).collect();
            (format!("x{i}"), Tensor::from_vec(s, data).unwrap())
        })
        .collect();
    let mut gpu_opts = options(ExecutionProvider::WebGpu);
    let mut feeds = vec![];
    for (i, (n, t)) in inputs.iter().enumerate() {
        if const_inputs.contains(&i) {
            gpu_opts.constant_inputs.push((n.clone(), t.clone()));
        } else {
            feeds.push((n.clone(), t.clone()));
        }
    }
    let what = format!("{} {:?} (const inputs {:?})", case.op, shapes, const_inputs);
    let cpu = Session::from_bytes(&bytes, &options(ExecutionProvider::Cpu)).map_err(|e| format!("{what}: cpu: {e}"))?;
    let want = cpu.run(inputs.clone()).map_err(|e| format!("{what}: cpu run: {e}"))?;
    let gpu = Session::from_bytes(&bytes, &gpu_opts).map_err(|e| format!("{what}: gpu load: {e}"))?;
    let report = gpu.gpu_placement().ok_or_else(|| format!("{what}: not on the GPU: {:?}", gpu.provider_note()))?;
    // an empty output folds to a constant, and so does a scalar exponent (PowConst: no kernel yet)
    let folded = shapes.iter().any(|s| s.contains(&0)) || (case.op == "Pow" && const_inputs.contains(&1));
    if report.gpu_nodes() == 0 && !folded {
        return Err(format!("{what}: no node on the GPU: {:?}", report.nodes));
    }
    gpu.set_gpu_poison(true);
    let got = gpu.run(feeds).map_err(|e| format!("{what}: gpu run: {e}"))?;
    let (w, g) = (want.output("y").unwrap(), got.output("y").unwrap());
    if w.dims() != g.dims() {
        return Err(format!("{what}: shape {:?} on the GPU, {:?} on the CPU", g.dims(), w.dims()));
    }
    let (w, g) = (w.to_vec::<f32>().unwrap(), g.to_vec::<f32>().unwrap());
    for (i, (a, b)) in w.iter().zip(&g).enumerate() {
        let ok = (a - b).abs() <= case.atol + case.rtol * a.abs() || (a.is_nan() && b.is_nan());
        if !ok {
            return Err(format!("{what}: element {i}: gpu {b} vs cpu {a}"));
        }
    }
    Ok(())
}

const fn case(op: &'static str, lo: f32, hi: f32) -> Case {
    Case { op, attrs: none, lo, hi, atol: 1e-5, rtol: 1e-5 }
}

#[test]
fn elementwise_binary_matches_cpu() {
    if !gpu_available() {
        return;
    }
    let mut rng = Rng(seed());
    let shapes: &[(&[usize], &[usize])] = &[
        (&[7], &[7]),
        (&[1], &[1]),
        (&[3, 1, 5], &[4, 1]),
        (&[1], &[300]),
        (&[2, 3, 4, 5], &[5]),
        (&[1000, 3], &[1, 3]),
        (&[2, 1, 3, 1, 2, 1, 2], &[1, 3, 1, 2, 1, 2, 1]),
        (&[70001], &[70001]),
        (&[0, 3], &[1, 3]),
    ];
    let cases = [
        case("Add", -3.0, 3.0),
        case("Sub", -3.0, 3.0),
        case("Mul", -3.0, 3.0),
        case("Div", 0.5, 2.0),
        case("Max", -3.0, 3.0),
        case("Min", -3.0, 3.0),
        Case { rtol: 1e-4, ..case("Pow", 0.5, 2.0) },
    ];
    let mut failures = vec![];
    for c in cases {
        for (a, b) in shapes {
            for consts in [&[][..], &[1][..]] {
                if let Err(e) = run_case(&mut rng, c, &[a, b], consts) {
                    failures.push(e);
                }
            }
        }
    }
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn elementwise_unary_matches_cpu() {
    if !gpu_available() {
        return;
    }
    let mut rng = Rng(seed());
    let shapes: &[&[usize]] = &[&[1], &[17], &[3, 5, 7], &[0, 4], &[66000]];
    let cases = [
        case("Neg", -3.0, 3.0),
        case("Abs", -3.0, 3.0),
        Case { rtol: 1e-5, ..case("Exp", -5.0, 5.0) },
        case("Log", 0.01, 10.0),
        case("Sqrt", 0.01, 10.0),
        case("Reciprocal", 0.1, 10.0),
        case("Tanh", -10.0, 10.0),
        case("Sigmoid", -20.0, 20.0),
        case("Relu", -3.0, 3.0),
        Case { atol: 5e-6, ..case("Erf", -4.0, 4.0) },
        case("Sin", -6.0, 6.0),
        case("Cos", -6.0, 6.0),
    ];
    let mut failures = vec![];
    for c in cases {
        for s in shapes {
            if let Err(e) = run_case(&mut rng, c, &[s], &[]) {
                failures.push(e);
            }
        }
    }
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn matmul_matches_cpu() {
    if !gpu_available() {
        return;
    }
    let mut rng = Rng(seed());
    let shapes: &[(&[usize], &[usize])] = &[
        (&[1, 8], &[8, 5]),
        (&[1, 1], &[1, 1]),
        (&[5, 7], &[7, 3]),
        (&[2, 3, 33, 17], &[17, 65]),
        (&[3, 1, 20, 9], &[1, 4, 9, 70]),
        (&[1, 64], &[64, 300]),
        (&[130, 70], &[70, 129]),
        (&[2, 1, 300], &[300, 7]),
        (&[2, 0, 5], &[2, 5, 3]),
        (&[4, 6], &[6, 0]),
    ];
    let c = Case { atol: 1e-4, rtol: 1e-4, ..case("MatMul", -1.0, 1.0) };
    let mut failures = vec![];
    for (a, b) in shapes {
        for consts in [&[][..], &[1][..]] {
            if let Err(e) = run_case(&mut rng, c, &[a, b], consts) {
                failures.push(e);
            }
        }
    }
    // transposed weights (Linear layers exported as Gemm transB=1)
    fn trans_b() -> Vec<pb::AttributeProto> {
        vec![attr_int("transB", 1)]
    }
    let gemm = Case { op: "Gemm", attrs: trans_b, ..c };
    for (a, b) in [(&[1usize, 16][..], &[10usize, 16][..]), (&[5, 16], &[10, 16]), (&[70, 33], &[65, 33])] {
        for consts in [&[][..], &[1][..]] {
            if let Err(e) = run_case(&mut rng, gemm, &[a, b], consts) {
                failures.push(format!("Gemm transB: {e}"));
            }
        }
    }
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn softmax_matches_cpu() {
    if !gpu_available() {
        return;
    }
    let mut rng = Rng(seed());
    fn last() -> Vec<pb::AttributeProto> {
        vec![attr_int("axis", -1)]
    }
    fn middle() -> Vec<pb::AttributeProto> {
        vec![attr_int("axis", 1)]
    }
    let mut failures = vec![];
    for (attrs, shapes) in [
        (last as fn() -> Vec<pb::AttributeProto>, &[&[3usize, 10][..], &[2, 3, 1000], &[1, 1], &[5], &[0, 7]][..]),
        (middle, &[&[2, 5, 3][..], &[1, 300, 2]][..]),
    ] {
        for op in ["Softmax", "LogSoftmax"] {
            let c = Case { attrs, atol: 1e-6, rtol: 1e-4, ..case(op, -8.0, 8.0) };
            for s in shapes {
                if let Err(e) = run_case(&mut rng, c, &[s], &[]) {
                    failures.push(e);
                }
            }
        }
    }
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
}
