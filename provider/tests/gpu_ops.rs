//! Cross-backend op tests: every GPU kernel against the CPU (tract) on one-node ONNX models, from one table, on
//! random inputs (a fresh seed per run, printed; never zeros) over many shapes — odd sizes, size 1, broadcasting,
//! beyond one workgroup, empty — with the GPU's output buffers poisoned (NaN) first so unwritten elements fail (an
//! integer output's poison reads as -1: never a valid index, a possible sum). The newer tables also require every
//! compute node of the graph on the GPU (`Graph::all_gpu`), not only some; integer inputs are nonzero i64.
//! Skips, loudly, only when the machine has no GPU adapter (CI installs lavapipe).
#![cfg(not(target_arch = "wasm32"))]

mod common;
mod graphs;

use graphs::{attr_int, fixed_value_info as value_info, gpu_available, options, seed, Rng};

use kiln_graph::tract_onnx::pb;
use kiln_graph::tract_onnx::pb::tensor_shape_proto::dimension::Value as DimValue;
use kiln_graph::tract_onnx::pb::type_proto::Value as TypeValue;
use kiln_provider::blocking::Session;
use kiln_provider::{ExecutionProvider, Tensor};

use prost::Message;

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
        input: names.iter().zip(shapes).map(|(n, s)| value_info(n, 1, Some(s))).collect(),
        output: vec![value_info("y", 1, None)],
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
    // an empty output folds to a constant
    let folded = shapes.iter().any(|s| s.contains(&0));
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
        // decode shapes (M = 1, mv_split): odd k past the 4-wide unrolled steps, n not a multiple of 16
        (&[1, 1, 1539], &[1539, 577]),
        (&[1, 576], &[576, 33]),
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

// ---- data movement, reductions, norms: one-node models with integer parameters as initializers ----

fn i64_init(name: &str, v: &[i64]) -> pb::TensorProto {
    pb::TensorProto {
        name: name.into(),
        dims: vec![v.len() as i64],
        data_type: 7,
        int64_data: v.to_vec(),
        ..Default::default()
    }
}

fn f32_init(name: &str, dims: &[usize], v: &[f32]) -> pb::TensorProto {
    pb::TensorProto {
        name: name.into(),
        dims: dims.iter().map(|d| *d as i64).collect(),
        data_type: 1,
        float_data: v.to_vec(),
        ..Default::default()
    }
}

fn attr_ints(name: &str, v: &[i64]) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        ints: v.to_vec(),
        r#type: pb::attribute_proto::AttributeType::Ints as i32,
        ..Default::default()
    }
}

fn attr_float(name: &str, v: f32) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        f: v,
        r#type: pb::attribute_proto::AttributeType::Float as i32,
        ..Default::default()
    }
}

/// One node `op` over f32 inputs of `shapes` (named x0, x1, ...) followed by initializers, at `opset`.
struct Graph {
    op: &'static str,
    attrs: Vec<pb::AttributeProto>,
    shapes: Vec<Vec<usize>>,
    inits: Vec<pb::TensorProto>,
    opset: i64,
    /// Inputs fed as random bools (ONNX elem_type 9) rather than f32.
    bools: Vec<usize>,
    /// Some inputs' elements are NaN (IsNaN).
    nans: bool,
    /// Inputs fed as random nonzero i64 (ONNX elem_type 7) in [-int_max, int_max].
    ints: Vec<usize>,
    int_max: i64,
    /// Every compute node must be placed on the GPU (not only some).
    all_gpu: bool,
    /// f32 inputs drawn from {-2, -1, 1, 2} (ties for ArgMax / ArgMin).
    ties: bool,
    /// The node's outputs (y, y1, y2, ...), all compared.
    outputs: usize,
}

impl Graph {
    fn new(op: &'static str, shapes: &[&[usize]]) -> Graph {
        Graph {
            op,
            attrs: vec![],
            shapes: shapes.iter().map(|s| s.to_vec()).collect(),
            inits: vec![],
            opset: 17,
            bools: vec![],
            nans: false,
            ints: vec![],
            int_max: 9,
            all_gpu: false,
            ties: false,
            outputs: 1,
        }
    }
    fn ties(mut self) -> Graph {
        self.ties = true;
        self
    }
    fn outputs(mut self, n: usize) -> Graph {
        self.outputs = n;
        self
    }
    fn output_names(&self) -> Vec<String> {
        (0..self.outputs).map(|i| if i == 0 { "y".to_string() } else { format!("y{i}") }).collect()
    }
    fn ints(mut self, inputs: &[usize]) -> Graph {
        self.ints = inputs.to_vec();
        self
    }
    fn int_max(mut self, m: i64) -> Graph {
        self.int_max = m;
        self
    }
    fn all_gpu(mut self) -> Graph {
        self.all_gpu = true;
        self
    }
    fn bools(mut self, inputs: &[usize]) -> Graph {
        self.bools = inputs.to_vec();
        self
    }
    fn attr(mut self, a: pb::AttributeProto) -> Graph {
        self.attrs.push(a);
        self
    }
    fn init(mut self, t: pb::TensorProto) -> Graph {
        self.inits.push(t);
        self
    }
    fn opset(mut self, v: i64) -> Graph {
        self.opset = v;
        self
    }
    fn bytes(&self) -> Vec<u8> {
        let mut names: Vec<String> = (0..self.shapes.len()).map(|i| format!("x{i}")).collect();
        names.extend(self.inits.iter().map(|t| t.name.clone()));
        let node = pb::NodeProto {
            op_type: self.op.into(),
            input: names,
            output: self.output_names(),
            attribute: self.attrs.clone(),
            ..Default::default()
        };
        let graph = pb::GraphProto {
            name: "g".into(),
            node: vec![node],
            input: self
                .shapes
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let mut v = value_info(&format!("x{i}"), 1, Some(s));
                    let elem_type = if self.bools.contains(&i) {
                        9
                    } else if self.ints.contains(&i) {
                        7
                    } else {
                        1
                    };
                    if let Some(TypeValue::TensorType(t)) = v.r#type.as_mut().and_then(|t| t.value.as_mut()) {
                        t.elem_type = elem_type;
                    }
                    v
                })
                .collect(),
            initializer: self.inits.clone(),
            output: self.output_names().iter().map(|n| value_info(n, 1, None)).collect(),
            ..Default::default()
        };
        pb::ModelProto {
            ir_version: 9,
            opset_import: vec![pb::OperatorSetIdProto { domain: String::new(), version: self.opset }],
            graph: Some(graph),
            ..Default::default()
        }
        .encode_to_vec()
    }
    fn what(&self) -> String {
        let attrs: Vec<String> = self
            .attrs
            .iter()
            .map(|a| format!("{}={:?}{:?}{}", a.name, a.i, a.ints, String::from_utf8_lossy(&a.s)))
            .collect();
        let inits: Vec<String> =
            self.inits.iter().map(|t| format!("{}{:?}={:?}", t.name, t.dims, t.int64_data)).collect();
        let ints = if self.ints.is_empty() { String::new() } else { format!(" i64 inputs {:?}", self.ints) };
        format!("{} {:?} {attrs:?} {inits:?}{ints}", self.op, self.shapes)
    }
}

/// Runs `g` on the CPU and on the GPU (outputs poisoned) on random inputs in [-3, 3); every element must agree
/// within `tol` (absolute and relative), and some node must run on the GPU unless the output is empty.
fn run_graph(rng: &mut Rng, g: &Graph, tol: f32) -> Result<(), String> {
    let what = g.what();
    let bytes = g.bytes();
    let all_gpu = g.all_gpu;
    let names = g.output_names();
    let feeds: Vec<(String, Tensor)> = g
        .shapes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let n: usize = s.iter().product();
            let t = if g.bools.contains(&i) {
                Tensor::from_vec(s, (0..n).map(|_| rng.next() < 0.5).collect()).unwrap()
            } else if g.ints.contains(&i) {
                let m = g.int_max;
                let v = (0..n).map(|_| {
                    let v = ((rng.next() as f64 * (2 * m + 1) as f64) as i64 - m).clamp(-m, m);
                    if v == 0 {
                        1
                    } else {
                        v
                    }
                });
                Tensor::from_vec(s, v.collect::<Vec<i64>>()).unwrap()
            } else if g.ties {
                let v = (0..n).map(|_| [-2.0f32, -1.0, 1.0, 2.0][((rng.next() * 4.0) as usize).min(3)]);
                Tensor::from_vec(s, v.collect()).unwrap()
            } else {
                let v = (0..n).map(|_| if g.nans && rng.next() < 0.3 { f32::NAN } else { rng.range(-3.0, 3.0) });
                Tensor::from_vec(s, v.collect()).unwrap()
            };
            (format!("x{i}"), t)
        })
        .collect();
    let cpu = Session::from_bytes(&bytes, &options(ExecutionProvider::Cpu)).map_err(|e| format!("{what}: cpu: {e}"))?;
    let want = cpu.run(feeds.clone()).map_err(|e| format!("{what}: cpu run: {e}"))?;
    let gpu = Session::from_bytes(&bytes, &options(ExecutionProvider::WebGpu))
        .map_err(|e| format!("{what}: gpu load: {e}"))?;
    let report = gpu.gpu_placement().ok_or_else(|| format!("{what}: not on the GPU: {:?}", gpu.provider_note()))?;
    let empty = names.iter().all(|n| want.output(n).is_ok_and(|w| w.dims().contains(&0)));
    // (an identity, e.g. a full slice, leaves no compute node at all)
    if report.gpu_nodes() == 0 && !report.nodes.is_empty() && !empty {
        return Err(format!("{what}: no node on the GPU: {:?}", report.nodes));
    }
    let on_cpu: Vec<String> = report
        .nodes
        .iter()
        .filter(|n| n.device == kiln_provider::Device::Cpu)
        .map(|n| format!("{} ({})", n.op, n.reason.clone().unwrap_or_default()))
        .collect();
    if !on_cpu.is_empty() {
        if all_gpu {
            return Err(format!("{what}: on the CPU: {on_cpu:?}"));
        }
        eprintln!("{what}: on the CPU: {on_cpu:?}");
    }
    if std::env::var("KILN_PROBE").is_ok() {
        let all: Vec<String> = report.nodes.iter().map(|n| format!("{}:{:?}:{:?}", n.op, n.device, n.reason)).collect();
        eprintln!("PROBE {what}: {all:?}");
    }
    gpu.set_gpu_poison(true);
    let got = gpu.run(feeds).map_err(|e| format!("{what}: gpu run: {e}"))?;
    for name in &names {
        let (w, g) = (want.output(name).unwrap(), got.output(name).unwrap());
        if w.dims() != g.dims() || w.element_type() != g.element_type() {
            return Err(format!(
                "{what}: {name}: {:?} {:?} on the GPU, {:?} {:?} on the CPU",
                g.element_type(),
                g.dims(),
                w.element_type(),
                w.dims()
            ));
        }
        let (w, g) = (w.to_f64_vec().unwrap(), g.to_f64_vec().unwrap());
        let tol = tol as f64;
        for (i, (a, b)) in w.iter().zip(&g).enumerate() {
            if !((a - b).abs() <= tol + tol * a.abs() || (a.is_nan() && b.is_nan()) || a == b) {
                return Err(format!("{what}: {name} element {i}: gpu {b} vs cpu {a}"));
            }
        }
    }
    Ok(())
}

fn check_all(rng: &mut Rng, graphs: Vec<Graph>, tol: f32) {
    let failures: Vec<String> = graphs.iter().filter_map(|g| run_graph(rng, g, tol).err()).collect();
    assert!(failures.is_empty(), "{} of {} failures:\n{}", failures.len(), graphs.len(), failures.join("\n"));
}

#[test]
fn transpose_matches_cpu() {
    if !gpu_available() {
        return;
    }
    let mut rng = Rng(seed());
    let cases: &[(&[usize], &[i64])] = &[
        (&[2, 3, 4], &[2, 0, 1]),
        (&[70, 300], &[1, 0]),
        (&[2, 3, 5, 7], &[1, 0, 2, 3]),
        (&[1, 4, 1, 9], &[0, 2, 1, 3]),
        (&[3, 1], &[1, 0]),
        (&[5, 17, 3, 2], &[3, 2, 1, 0]),
        (&[2, 3, 4, 5, 6], &[0, 3, 1, 4, 2]),
        (&[0, 3], &[1, 0]),
        (&[257, 3], &[1, 0]),
        // a decode step's head split: unit axes only move (no dispatch: a view)
        (&[1, 1, 9, 64], &[0, 2, 1, 3]),
        (&[2, 1, 3, 1], &[1, 0, 3, 2]),
    ];
    let mut graphs: Vec<Graph> =
        cases.iter().map(|(s, p)| Graph::new("Transpose", &[s]).attr(attr_ints("perm", p))).collect();
    // integers move as bits
    graphs.extend(cases.iter().map(|(s, p)| Graph::new("Transpose", &[s]).attr(attr_ints("perm", p)).ints(&[0])));
    check_all(&mut rng, graphs, 0.0);
}

#[test]
fn concat_matches_cpu() {
    if !gpu_available() {
        return;
    }
    let mut rng = Rng(seed());
    let cases: &[(&[&[usize]], i64)] = &[
        (&[&[3, 4], &[5, 4]], 0),
        (&[&[3, 4], &[3, 1], &[3, 7]], 1),
        (&[&[2, 3, 5], &[2, 1, 5]], -2),
        (&[&[1], &[1]], 0),
        (&[&[2, 0, 3], &[2, 4, 3]], 1),
        (&[&[300, 7], &[300, 9]], -1),
        (&[&[1, 2, 1, 64], &[1, 2, 3, 64]], 2),
    ];
    let mut graphs: Vec<Graph> =
        cases.iter().map(|(s, a)| Graph::new("Concat", s).attr(attr_int("axis", *a))).collect();
    for (s, a) in cases {
        let ints: Vec<usize> = (0..s.len()).collect();
        graphs.push(Graph::new("Concat", s).attr(attr_int("axis", *a)).ints(&ints).all_gpu());
    }
    check_all(&mut rng, graphs, 0.0);
}

#[test]
fn slice_matches_cpu() {
    if !gpu_available() {
        return;
    }
    let mut rng = Rng(seed());
    type C = (&'static [usize], &'static [i64], &'static [i64], &'static [i64]);
    let cases: &[C] = &[
        (&[10], &[2], &[7], &[0]),
        (&[4, 9], &[1], &[-1], &[1]),
        (&[4, 9], &[-3, 0], &[100, 5], &[0, 1]),
        (&[2, 3, 300], &[0, 150], &[1, 299], &[1, 2]),
        (&[1, 1], &[0], &[1], &[0]),
        (&[5, 6], &[3], &[3], &[1]),
        (&[1, 2, 7, 8], &[0], &[4], &[-1]),
        // from 0 under unit outer axes: the input's first elements (no dispatch)
        (&[1, 1, 5, 6], &[0], &[3], &[2]),
        (&[1, 300], &[0], &[299], &[1]),
        (&[1, 7, 9], &[0, 0], &[1, 4], &[0, 1]),
    ];
    let graphs = cases
        .iter()
        .map(|(s, st, en, ax)| {
            Graph::new("Slice", &[s]).init(i64_init("starts", st)).init(i64_init("ends", en)).init(i64_init("axes", ax))
        })
        .collect();
    check_all(&mut rng, graphs, 0.0);
}

#[test]
fn expand_matches_cpu() {
    if !gpu_available() {
        return;
    }
    let mut rng = Rng(seed());
    let cases: &[(&[usize], &[i64])] = &[
        (&[3, 1], &[2, 3, 5]),
        (&[1], &[300]),
        (&[4], &[2, 1, 4]),
        (&[1, 3, 1], &[2, 3, 257]),
        (&[2, 1], &[2, 0]),
        (&[1, 1], &[1, 1]),
    ];
    let mut graphs: Vec<Graph> =
        cases.iter().map(|(s, t)| Graph::new("Expand", &[s]).init(i64_init("shape", t))).collect();
    graphs.extend(cases.iter().map(|(s, t)| Graph::new("Expand", &[s]).init(i64_init("shape", t)).ints(&[0])));
    check_all(&mut rng, graphs, 0.0);
}

#[test]
fn reduce_matches_cpu() {
    if !gpu_available() {
        return;
    }
    let mut rng = Rng(seed());
    let shapes: &[(&[usize], &[i64])] = &[
        (&[7], &[0]),
        (&[3, 5], &[1]),
        (&[3, 5], &[0]),
        (&[2, 3, 4], &[1, 2]),
        (&[2, 1, 4], &[0, 1]),
        (&[4, 1000], &[-1]),
        (&[1, 1], &[1]),
        (&[600, 3], &[0]),
    ];
    let mut graphs = vec![];
    for (s, axes) in shapes {
        for keep in [0, 1] {
            // opset 18: axes as an input for every reduction
            for op in ["ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceSumSquare"] {
                graphs
                    .push(Graph::new(op, &[s]).init(i64_init("axes", axes)).attr(attr_int("keepdims", keep)).opset(18));
            }
        }
    }
    check_all(&mut rng, graphs, 1e-4);
}

#[test]
fn norms_match_cpu() {
    if !gpu_available() {
        return;
    }
    let mut rng = Rng(seed());
    let mut graphs = vec![];
    for s in [&[2usize, 8][..], &[3, 5, 64], &[1, 1], &[2, 1000], &[4, 7]] {
        let d = *s.last().unwrap();
        let gamma: Vec<f32> = (0..d).map(|_| rng.range(0.5, 1.5)).collect();
        let beta: Vec<f32> = (0..d).map(|_| rng.range(-0.5, 0.5)).collect();
        graphs.push(
            Graph::new("RMSNormalization", &[s])
                .init(f32_init("scale", &[d], &gamma))
                .attr(attr_int("axis", -1))
                .attr(attr_float("epsilon", 1e-5))
                .opset(23),
        );
        graphs.push(
            Graph::new("LayerNormalization", &[s])
                .init(f32_init("scale", &[d], &gamma))
                .init(f32_init("bias", &[d], &beta))
                .attr(attr_int("axis", -1))
                .attr(attr_float("epsilon", 1e-5)),
        );
    }
    check_all(&mut rng, graphs, 1e-4);
}

#[test]
fn logic_matches_cpu() {
    if !gpu_available() {
        return;
    }
    let mut rng = Rng(seed());
    let pairs: &[(&[usize], &[usize])] =
        &[(&[7], &[7]), (&[1], &[1]), (&[3, 1, 5], &[4, 1]), (&[2, 300], &[300]), (&[0, 3], &[1, 3])];
    let mut graphs = vec![];
    for (a, b) in pairs {
        for op in ["Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual"] {
            graphs.push(Graph::new(op, &[a, b]));
            // equal elements too: x == x
            graphs.push(Graph::new(op, &[a, a]));
        }
        for op in ["And", "Or"] {
            graphs.push(Graph::new(op, &[a, b]).bools(&[0, 1]));
        }
        graphs.push(Graph::new("Where", &[a, b, a]).bools(&[0]));
        graphs.push(Graph::new("Where", &[b, a, &[1]]).bools(&[0]));
    }
    for s in [&[1usize][..], &[17], &[3, 5, 7], &[0, 4], &[66000]] {
        graphs.push(Graph::new("Not", &[s]).bools(&[0]));
        let mut g = Graph::new("IsNaN", &[s]);
        g.nans = true;
        graphs.push(g);
    }
    check_all(&mut rng, graphs, 0.0);
}

#[test]
fn gather_matches_cpu() {
    if !gpu_available() {
        return;
    }
    let mut rng = Rng(seed());
    type C = (&'static [usize], &'static [i64], &'static [usize], i64);
    let cases: &[C] = &[
        (&[10, 4], &[3, 0, 9, -1], &[4], 0),
        (&[10, 4], &[1, 2, 3, 1, 0, 2], &[2, 3], 1),
        (&[5, 300], &[4, 4, -5], &[3], 0),
        (&[2, 3, 4], &[2, 0], &[1, 2], -1),
        (&[1, 1], &[0], &[1], 0),
        (&[6, 2], &[], &[0], 0),
        (&[1000, 3], &[999, 0, 500], &[3], 0),
    ];
    let mut graphs = vec![];
    for ints in [false, true] {
        for (s, idx, ishape, axis) in cases {
            let mut t = i64_init("idx", idx);
            t.dims = ishape.iter().map(|d| *d as i64).collect();
            let g = Graph::new("Gather", &[s]).init(t).attr(attr_int("axis", *axis));
            graphs.push(if ints { g.ints(&[0]) } else { g });
        }
    }
    check_all(&mut rng, graphs, 0.0);
}

#[test]
fn cast_and_gelu_match_cpu() {
    if !gpu_available() {
        return;
    }
    let mut rng = Rng(seed());
    let mut graphs = vec![];
    for s in [&[1usize][..], &[17], &[3, 5, 7], &[0, 4], &[66000]] {
        // to: 1 f32, 6 i32, 9 bool (a cast to i64 goes through kiln's TDim pair of casts, on the CPU)
        for to in [6, 9, 1] {
            graphs.push(Graph::new("Cast", &[s]).attr(attr_int("to", to)));
        }
        for to in [1, 6] {
            graphs.push(Graph::new("Cast", &[s]).attr(attr_int("to", to)).bools(&[0]));
        }
        for approximate in ["none", "tanh"] {
            let a = pb::AttributeProto {
                name: "approximate".into(),
                s: approximate.as_bytes().to_vec(),
                r#type: pb::attribute_proto::AttributeType::String as i32,
                ..Default::default()
            };
            graphs.push(Graph::new("Gelu", &[s]).attr(a).opset(20));
        }
    }
    check_all(&mut rng, graphs, 1e-5);
}

// ---- the kernels of the second round: every node of these graphs must run on the GPU ----

fn i64_scalar(name: &str, v: i64) -> pb::TensorProto {
    pb::TensorProto { name: name.into(), dims: vec![], data_type: 7, int64_data: vec![v], ..Default::default() }
}

fn f32_scalar(name: &str, v: f32) -> pb::TensorProto {
    pb::TensorProto { name: name.into(), dims: vec![], data_type: 1, float_data: vec![v], ..Default::default() }
}

fn attr_str(name: &str, v: &str) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        s: v.as_bytes().to_vec(),
        r#type: pb::attribute_proto::AttributeType::String as i32,
        ..Default::default()
    }
}

#[test]
fn argmax_argmin_match_cpu() {
    if !gpu_available() {
        return;
    }
    let mut rng = Rng(seed());
    let cases: &[(&[usize], i64)] = &[
        (&[3, 5], 1),
        (&[3, 5], 0),
        (&[7], 0),
        (&[1, 1], 0),
        (&[2, 300, 3], 1),
        (&[4, 1000], -1),
        (&[600, 3], 0),
        (&[2, 3, 4], 2),
        (&[0, 5], 1),
    ];
    let mut graphs = vec![];
    for (s, axis) in cases {
        for op in ["ArgMax", "ArgMin"] {
            for keep in [0, 1] {
                for last in [0, 1] {
                    let g = || {
                        Graph::new(op, &[s])
                            .attr(attr_int("axis", *axis))
                            .attr(attr_int("keepdims", keep))
                            .attr(attr_int("select_last_index", last))
                            .all_gpu()
                    };
                    graphs.push(g());
                    // many ties: first or last index among equal values
                    graphs.push(g().ties());
                }
            }
        }
    }
    check_all(&mut rng, graphs, 0.0);
}

#[test]
fn reduce_any_axes_matches_cpu() {
    if !gpu_available() {
        return;
    }
    let mut rng = Rng(seed());
    let shapes: &[(&[usize], &[i64])] = &[
        (&[3, 4, 5], &[0, 2]),
        (&[2, 3, 4, 5], &[1, 3]),
        (&[2, 3, 4, 5], &[0, 3]),
        (&[2, 3, 4, 5], &[0, 2, 3]),
        (&[5, 1, 7], &[0, 2]),
        (&[2, 300, 3], &[0, 2]),
        (&[3, 70, 5, 2], &[0, 1, 3]),
        (&[4, 3, 2], &[2, 0]),
        (&[1, 1, 1], &[0, 2]),
        (&[7, 0, 3], &[0, 2]),
    ];
    let mut graphs = vec![];
    for (s, axes) in shapes {
        for keep in [0, 1] {
            for op in ["ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceSumSquare", "ReduceProd"] {
                // a product of hundreds of values in [-3, 3) overflows: small shapes only
                if op == "ReduceProd" && s.iter().product::<usize>() > 60 {
                    continue;
                }
                let g = Graph::new(op, &[s]).init(i64_init("axes", axes)).attr(attr_int("keepdims", keep)).opset(18);
                graphs.push(g.all_gpu());
            }
        }
    }
    check_all(&mut rng, graphs, 1e-4);
}

#[test]
fn gather_nd_matches_cpu() {
    if !gpu_available() {
        return;
    }
    let mut rng = Rng(seed());
    // (data shape, index shape, batch_dims); indices drawn in range (tract's CPU GatherND takes no negative index)
    let cases: &[(&[usize], &[usize], i64)] = &[
        (&[3, 4, 5], &[2, 2], 0),
        (&[3, 4, 5], &[2, 3], 0),
        (&[3, 4, 5], &[4, 1], 0),
        (&[3, 4, 5], &[2, 3, 1], 0),
        (&[2, 3, 4], &[2, 1], 1),
        (&[2, 3, 4], &[2, 5, 2], 1),
        (&[300, 7], &[500, 1], 0),
        (&[1, 1], &[3, 2], 0),
        (&[5, 6], &[0, 1], 0),
    ];
    let mut graphs = vec![];
    for (d, ishape, bd) in cases {
        let k = *ishape.last().unwrap();
        let bd = *bd as usize;
        let n: usize = ishape.iter().product::<usize>() / k;
        let mut idx = vec![];
        for q in 0..n {
            for t in 0..k {
                let dim = d[bd + t];
                let _ = q;
                idx.push(((rng.next() * dim as f32) as i64).min(dim as i64 - 1));
            }
        }
        let mut t = i64_init("idx", &idx);
        t.dims = ishape.iter().map(|v| *v as i64).collect();
        let g = Graph::new("GatherND", &[d]).init(t).attr(attr_int("batch_dims", bd as i64)).opset(13);
        graphs.push(g.all_gpu());
    }
    // integer data
    let mut t = i64_init("idx", &[1, 0, 2, 3]);
    t.dims = vec![2, 2];
    graphs.push(Graph::new("GatherND", &[&[3, 4, 2]]).init(t).ints(&[0]).all_gpu());
    check_all(&mut rng, graphs, 0.0);
}

#[test]
fn slice_with_steps_matches_cpu() {
    if !gpu_available() {
        return;
    }
    let mut rng = Rng(seed());
    type C = (&'static [usize], &'static [i64], &'static [i64], &'static [i64], &'static [i64]);
    let cases: &[C] = &[
        (&[10], &[1], &[9], &[0], &[2]),
        (&[10], &[-1], &[-11], &[0], &[-1]),
        (&[9, 8], &[1, -1], &[9, -100], &[0, 1], &[2, -3]),
        (&[301], &[0], &[301], &[0], &[7]),
        (&[4, 5, 6], &[5], &[0], &[2], &[-2]),
        (&[1, 1], &[0], &[1], &[1], &[2]),
        (&[5], &[0], &[5], &[0], &[10]),
        (&[2, 600], &[598], &[-601], &[1], &[-1]),
        (&[3, 4, 5, 6], &[1, 0, 4], &[3, 4, 0], &[1, 2, 3], &[1, 3, -3]),
        (&[6, 5], &[4], &[1], &[0], &[-2]),
    ];
    let mut graphs = vec![];
    for (s, st, en, ax, steps) in cases {
        for ints in [false, true] {
            let mut g = Graph::new("Slice", &[s])
                .init(i64_init("starts", st))
                .init(i64_init("ends", en))
                .init(i64_init("axes", ax))
                .init(i64_init("steps", steps))
                .all_gpu();
            if ints {
                g = g.ints(&[0]);
            }
            graphs.push(g);
        }
    }
    check_all(&mut rng, graphs, 0.0);
}

#[test]
fn pad_matches_cpu() {
    if !gpu_available() {
        return;
    }
    let mut rng = Rng(seed());
    let cases: &[(&[usize], &[i64])] = &[
        (&[4, 5], &[1, 2, 0, 1]),
        (&[7], &[3, 2]),
        (&[2, 3, 300], &[0, 1, 2, 1, 0, 3]),
        (&[3, 4], &[0, 0, 0, 0]),
        (&[5, 6, 4], &[2, 0, 3, 1, 5, 2]),
        (&[1, 1], &[2, 2, 2, 2]),
    ];
    let mut graphs = vec![];
    for (s, pads) in cases {
        for mode in ["constant", "reflect", "edge"] {
            // reflect needs more than the pad on each side
            let max_pad = *pads.iter().max().unwrap() as usize;
            if mode == "reflect" && s.iter().any(|d| *d <= max_pad) {
                continue;
            }
            let base = || Graph::new("Pad", &[s]).init(i64_init("pads", pads)).attr(attr_str("mode", mode)).opset(18);
            graphs.push(base().all_gpu());
            graphs.push(base().ints(&[0]).all_gpu());
            if mode == "constant" {
                graphs.push(base().init(f32_scalar("value", 2.5)).all_gpu());
            }
        }
    }
    // padding an empty tensor with a constant
    graphs.push(Graph::new("Pad", &[&[0, 3]]).init(i64_init("pads", &[1, 0, 2, 1])).opset(18).all_gpu());
    check_all(&mut rng, graphs, 0.0);
}

#[test]
fn tile_matches_cpu() {
    if !gpu_available() {
        return;
    }
    let mut rng = Rng(seed());
    let cases: &[(&[usize], &[i64])] = &[
        (&[4, 5], &[2, 3]),
        (&[7], &[1]),
        (&[1, 1], &[3, 300]),
        (&[2, 3, 4], &[1, 2, 1]),
        (&[0, 3], &[2, 2]),
        (&[300], &[5]),
    ];
    let mut graphs = vec![];
    for (s, r) in cases {
        graphs.push(Graph::new("Tile", &[s]).init(i64_init("repeats", r)).all_gpu());
        graphs.push(Graph::new("Tile", &[s]).init(i64_init("repeats", r)).ints(&[0]).all_gpu());
    }
    check_all(&mut rng, graphs, 0.0);
}

#[test]
fn trilu_matches_cpu() {
    if !gpu_available() {
        return;
    }
    let mut rng = Rng(seed());
    let shapes: &[&[usize]] = &[&[4, 5], &[3, 7, 7], &[1, 1], &[300, 2], &[2, 0, 3], &[2, 70, 300]];
    let mut graphs = vec![];
    for s in shapes {
        for upper in [0, 1] {
            graphs.push(Graph::new("Trilu", &[s]).attr(attr_int("upper", upper)).opset(14).all_gpu());
            for k in [-1, 2, 10, -10, i32::MAX as i64, i32::MIN as i64 + 1] {
                let g = || {
                    Graph::new("Trilu", &[s])
                        .init(i64_scalar("k", k))
                        .attr(attr_int("upper", upper))
                        .opset(14)
                        .all_gpu()
                };
                graphs.push(g());
                if k == 2 {
                    graphs.push(g().ints(&[0]));
                }
            }
        }
    }
    check_all(&mut rng, graphs, 0.0);
}

#[test]
fn cumsum_matches_cpu() {
    if !gpu_available() {
        return;
    }
    let mut rng = Rng(seed());
    let cases: &[(&[usize], i64)] =
        &[(&[4, 5], 1), (&[4, 5], 0), (&[1000], 0), (&[2, 3, 4], 1), (&[3, 1], -1), (&[0, 3], 1), (&[70, 300], -2)];
    let mut graphs = vec![];
    for (s, axis) in cases {
        for exclusive in [0, 1] {
            for reverse in [0, 1] {
                let g = || {
                    Graph::new("CumSum", &[s])
                        .init(i64_scalar("axis", *axis))
                        .attr(attr_int("exclusive", exclusive))
                        .attr(attr_int("reverse", reverse))
                        .all_gpu()
                };
                graphs.push(g());
                graphs.push(g().ints(&[0]));
            }
        }
    }
    // in-order sums: the GPU adds in the CPU's order
    check_all(&mut rng, graphs, 1e-6);
}

#[test]
fn integer_elementwise_matches_cpu() {
    if !gpu_available() {
        return;
    }
    let mut rng = Rng(seed());
    let pairs: &[(&[usize], &[usize])] =
        &[(&[7], &[7]), (&[1], &[1]), (&[3, 1, 5], &[4, 1]), (&[2, 300], &[300]), (&[70001], &[1]), (&[0, 3], &[1, 3])];
    let mut graphs = vec![];
    for (a, b) in pairs {
        for op in
            ["Add", "Sub", "Mul", "Div", "Max", "Min", "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual"]
        {
            graphs.push(Graph::new(op, &[a, b]).ints(&[0, 1]).all_gpu());
            // equal elements too: x op x
            graphs.push(Graph::new(op, &[a, a]).ints(&[0, 1]).int_max(2).all_gpu());
        }
        graphs.push(Graph::new("Where", &[a, b, a]).bools(&[0]).ints(&[1, 2]).all_gpu());
    }
    // wide values (still within the GPU's i32)
    graphs.push(Graph::new("Add", &[&[500], &[500]]).ints(&[0, 1]).int_max(1_000_000_000).all_gpu());
    graphs.push(Graph::new("Div", &[&[500], &[500]]).ints(&[0, 1]).int_max(2_000_000_000).all_gpu());
    check_all(&mut rng, graphs, 0.0);
}

#[test]
fn split_and_views_match_cpu() {
    if !gpu_available() {
        return;
    }
    let mut rng = Rng(seed());
    let mut graphs = vec![];
    // Split: equal parts (opset 18 num_outputs) and given sizes
    for (s, axis, n) in [(&[6usize, 4][..], 0, 3), (&[5, 300], 1, 2), (&[2, 7, 3], 1, 3), (&[1, 1], 0, 1)] {
        graphs.push(
            Graph::new("Split", &[s])
                .attr(attr_int("axis", axis))
                .attr(attr_int("num_outputs", n))
                .outputs(n as usize)
                .opset(18)
                .all_gpu(),
        );
    }
    for (s, axis, sizes) in
        [(&[5usize, 300][..], 1, &[100i64, 200][..]), (&[7, 2], 0, &[3, 0, 4]), (&[9], 0, &[1, 1, 7])]
    {
        for ints in [false, true] {
            let mut g = Graph::new("Split", &[s])
                .init(i64_init("split", sizes))
                .attr(attr_int("axis", axis))
                .outputs(sizes.len())
                .all_gpu();
            if ints {
                g = g.ints(&[0]);
            }
            graphs.push(g);
        }
    }
    // views: no kernel, the output shares the input's buffer
    for ints in [false, true] {
        let mut views = vec![
            Graph::new("Squeeze", &[&[6, 1, 2]]).init(i64_init("axes", &[1])),
            Graph::new("Squeeze", &[&[1, 300, 1]]),
            Graph::new("Unsqueeze", &[&[6, 2]]).init(i64_init("axes", &[0, 3])),
            Graph::new("Flatten", &[&[6, 4, 2]]).attr(attr_int("axis", 1)),
            Graph::new("Flatten", &[&[3, 5, 7, 2]]).attr(attr_int("axis", 3)),
            Graph::new("Identity", &[&[6, 1, 2]]),
            Graph::new("Reshape", &[&[6, 1, 2]]).init(i64_init("shape", &[3, -1])),
            Graph::new("Reshape", &[&[2, 3, 4]]).init(i64_init("shape", &[0, 12])),
            Graph::new("Reshape", &[&[0, 3]]).init(i64_init("shape", &[0, 1, 3])),
        ];
        if ints {
            views = views.into_iter().map(|g| g.ints(&[0])).collect();
        }
        graphs.extend(views.into_iter().map(|g| g.all_gpu()));
    }
    check_all(&mut rng, graphs, 0.0);
}

/// Range on the GPU: its length must be a dim the run knows (an input's symbol), so the model takes `x` of a
/// symbolic length `S` and builds `Range(start, Cast(Shape(x)[0]) + shift, step)` in int32 (`elem` 6) or int64.
fn range_model(elem: i32, start: i64, shift: i64, step: i64) -> Vec<u8> {
    let dim = |v: DimValue| pb::tensor_shape_proto::Dimension { value: Some(v), ..Default::default() };
    let tensor = |elem: i32, shape: Vec<pb::tensor_shape_proto::Dimension>| pb::TypeProto {
        value: Some(TypeValue::TensorType(pb::type_proto::Tensor {
            elem_type: elem,
            shape: Some(pb::TensorShapeProto { dim: shape }),
        })),
        ..Default::default()
    };
    let scalar = |name: &str, v: i64| {
        if elem == 6 {
            pb::TensorProto { name: name.into(), data_type: 6, int32_data: vec![v as i32], ..Default::default() }
        } else {
            i64_scalar(name, v)
        }
    };
    let node = |op: &str, inputs: &[&str], output: &str, attrs: Vec<pb::AttributeProto>| pb::NodeProto {
        op_type: op.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        attribute: attrs,
        ..Default::default()
    };
    let graph = pb::GraphProto {
        name: "g".into(),
        node: vec![
            node("Shape", &["x"], "shape", vec![]),
            node("Gather", &["shape", "zero"], "len", vec![attr_int("axis", 0)]),
            node("Cast", &["len"], "len_cast", vec![attr_int("to", elem as i64)]),
            node("Add", &["len_cast", "shift"], "limit", vec![]),
            node("Range", &["start", "limit", "step"], "y", vec![]),
        ],
        input: vec![pb::ValueInfoProto {
            name: "x".into(),
            r#type: Some(tensor(1, vec![dim(DimValue::DimParam("S".into()))])),
            ..Default::default()
        }],
        initializer: vec![i64_scalar("zero", 0), scalar("shift", shift), scalar("start", start), scalar("step", step)],
        output: vec![pb::ValueInfoProto { name: "y".into(), ..Default::default() }],
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

#[test]
fn range_matches_cpu() {
    if !gpu_available() {
        return;
    }
    let mut failures = vec![];
    // int32 (an int64 cast of a shape stays a TDim in tract: shape arithmetic, on the CPU)
    for elem in [6] {
        for (start, shift, step) in [(0, 0, 1), (3, 5, 2), (-4, 0, 3), (2, 0, 1), (5, 1, 1)] {
            let bytes = range_model(elem, start, shift, step);
            let what = format!("Range elem {elem} start {start} limit S+{shift} step {step}");
            let cpu = Session::from_bytes(&bytes, &options(ExecutionProvider::Cpu)).expect("cpu");
            let gpu = Session::from_bytes(&bytes, &options(ExecutionProvider::WebGpu)).expect("gpu");
            let report = gpu.gpu_placement().expect("placement");
            let range = report.nodes.iter().find(|n| n.op == "Range");
            if range.is_none_or(|n| n.device != kiln_provider::Device::Gpu) {
                failures.push(format!("{what}: Range not on the GPU: {:?}", report.nodes));
                continue;
            }
            gpu.set_gpu_poison(true);
            // one session, several lengths (S is a uniform: no recompilation), including 0 and beyond a workgroup
            for s in [1usize, 7, 300, 0, 70001] {
                let x = Tensor::from_vec(&[s], vec![0.5f32; s]).unwrap();
                let want = cpu.run(vec![("x".to_string(), x.clone())]).map_err(|e| format!("{what}: cpu: {e}"));
                let got = gpu.run(vec![("x".to_string(), x)]).map_err(|e| format!("{what}: gpu: {e}"));
                match (want, got) {
                    (Ok(w), Ok(g)) => {
                        let (w, g) = (w.output("y").unwrap(), g.output("y").unwrap());
                        if w.dims() != g.dims() || w.to_f64_vec().unwrap() != g.to_f64_vec().unwrap() {
                            failures.push(format!("{what} S={s}: gpu {:?} vs cpu {:?}", g.dims(), w.dims()));
                        }
                    }
                    (w, g) => failures.push(format!("{what} S={s}: {:?} / {:?}", w.err(), g.err())),
                }
            }
        }
    }
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn clip_and_einsum_match_cpu() {
    if !gpu_available() {
        return;
    }
    let mut rng = Rng(seed());
    let mut graphs = vec![];
    for s in [&[1usize][..], &[17], &[3, 5, 7], &[0, 4], &[66000]] {
        // Clip with both bounds, with only a min (empty max name), and with bounds as initializers
        graphs.push(Graph::new("Clip", &[s]).init(f32_scalar("lo", -0.5)).init(f32_scalar("hi", 0.75)).all_gpu());
        graphs.push(Graph::new("Clip", &[s]).init(f32_scalar("lo", 0.1)).all_gpu());
    }
    // Einsum as tract rewrites it into a matmul: batched, transposed operand
    let einsum = |eq: &str, a: &[usize], b: &[usize]| {
        let attr = pb::AttributeProto {
            name: "equation".into(),
            s: eq.as_bytes().to_vec(),
            r#type: pb::attribute_proto::AttributeType::String as i32,
            ..Default::default()
        };
        Graph::new("Einsum", &[a, b]).attr(attr).opset(12)
    };
    graphs.push(einsum("bij,bjk->bik", &[3, 5, 7], &[3, 7, 9]));
    graphs.push(einsum("ij,kj->ik", &[33, 17], &[65, 17]));
    graphs.push(einsum("bhqd,bhkd->bhqk", &[1, 3, 4, 16], &[1, 3, 9, 16]));
    check_all(&mut rng, graphs, 1e-4);
}
