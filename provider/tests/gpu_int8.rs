//! Quantized tensors on the GPU (kiln-wgsl's `quant`): DequantizeLinear / QuantizeLinear (per-tensor and per-axis,
//! uint8 and int8: zero points, saturation, ties rounded half to even), DynamicQuantizeLinear (uint8, scale and zero
//! point from the GPU's min/max reduction), MatMulInteger (uint8 / int8, scalar and per-column zero points, batch
//! dims, odd shapes), the quantize_dynamic pattern (DynamicQuantizeLinear → MatMulInteger → Cast → Mul) with no CPU
//! island, Gather and Cast on uint8 / int8 — each on one-node (or few-node) models against the CPU provider, with the
//! GPU's outputs poisoned (NaN) first and every node placed on the GPU. Then com.microsoft GatherBlockQuantized
//! (4 and 8 bits, block sizes 16 to 128, with and without zero points, float and float16 scales) against
//! onnxruntime's contrib op from the test venv; the int8 tiny fixtures (prefill and decode) against onnxruntime's
//! reference data with no CPU node but shape arithmetic; and all-MiniLM-L6-v2 int8 against onnxruntime within 1e-2.
//! Skips, loudly, only when the machine has no GPU adapter (CI installs lavapipe).
#![cfg(not(target_arch = "wasm32"))]

mod common;
mod graphs;

use graphs::{attr_int, fixed_value_info as value_info, gpu_available, options, seed, Rng};

use common::*;
use kiln_graph::tract_onnx::pb;
use kiln_provider::blocking::Session;
use kiln_provider::{Device, ElementType, ExecutionProvider, Tensor};

use prost::Message;

const FLOAT: i32 = 1;
const UINT8: i32 = 2;
const INT8: i32 = 3;
const INT32: i32 = 6;
const INT64: i32 = 7;
const FLOAT16: i32 = 10;

fn init(name: &str, elem_type: i32, dims: &[usize], raw: Vec<u8>) -> pb::TensorProto {
    pb::TensorProto {
        name: name.into(),
        data_type: elem_type,
        dims: dims.iter().map(|d| *d as i64).collect(),
        raw_data: raw,
        ..Default::default()
    }
}

fn f32_raw(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn node(op: &str, inputs: &[&str], outputs: &[&str], attrs: Vec<pb::AttributeProto>) -> pb::NodeProto {
    pb::NodeProto {
        op_type: op.into(),
        name: outputs.first().map(|o| format!("{op}_{o}")).unwrap_or_default(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        attribute: attrs,
        ..Default::default()
    }
}

fn model(
    nodes: Vec<pb::NodeProto>,
    inputs: Vec<pb::ValueInfoProto>,
    outputs: Vec<pb::ValueInfoProto>,
    inits: Vec<pb::TensorProto>,
) -> Vec<u8> {
    model_at(19, nodes, inputs, outputs, inits)
}

fn model_at(
    opset: i64,
    nodes: Vec<pb::NodeProto>,
    inputs: Vec<pb::ValueInfoProto>,
    outputs: Vec<pb::ValueInfoProto>,
    inits: Vec<pb::TensorProto>,
) -> Vec<u8> {
    let graph = pb::GraphProto {
        name: "g".into(),
        node: nodes,
        input: inputs,
        output: outputs,
        initializer: inits,
        ..Default::default()
    };
    pb::ModelProto {
        ir_version: 8,
        opset_import: vec![
            pb::OperatorSetIdProto { domain: String::new(), version: opset },
            pb::OperatorSetIdProto { domain: "com.microsoft".into(), version: 1 },
        ],
        graph: Some(graph),
        ..Default::default()
    }
    .encode_to_vec()
}

/// Runs `bytes` on the CPU and on the GPU (poisoned outputs): every compute node must be on the GPU and every
/// output equal to the CPU's (`tol` 0: bit for bit; else max |diff| <= tol · max |ref|). Returns the GPU outputs.
fn cross(what: &str, bytes: &[u8], feeds: Vec<(String, Tensor)>, outputs: &[&str], tol: f64) -> Vec<Tensor> {
    let cpu = Session::from_bytes(bytes, &options(ExecutionProvider::Cpu)).unwrap_or_else(|e| panic!("{what}: {e}"));
    let want = cpu.run(feeds.clone()).unwrap_or_else(|e| panic!("{what}: cpu run: {e}"));
    let gpu = Session::from_bytes(bytes, &options(ExecutionProvider::WebGpu)).unwrap_or_else(|e| panic!("{what}: {e}"));
    let report = gpu.gpu_placement().unwrap_or_else(|| panic!("{what}: not on the GPU"));
    // a float16 output's final cast is the float16 work's (another kernel family), not this file's
    let f16_cast = |n: &&kiln_provider::NodePlacement| n.reason.as_deref() == Some("cast F32 to F16");
    let cpu_nodes: Vec<_> = report.nodes.iter().filter(|n| n.device == Device::Cpu && !f16_cast(n)).collect();
    assert!(cpu_nodes.is_empty(), "{what}: nodes on the CPU: {cpu_nodes:?}");
    gpu.set_gpu_poison(true);
    let got = gpu.run(feeds).unwrap_or_else(|e| panic!("{what}: gpu run: {e}"));
    let mut result = vec![];
    for name in outputs {
        let (w, g) = (want.output(name).expect("cpu output"), got.output(name).expect("gpu output"));
        assert_eq!(w.element_type(), g.element_type(), "{what}/{name}: element type");
        assert_eq!(w.dims(), g.dims(), "{what}/{name}: dims");
        let (wv, gv) = (w.to_f64_vec().expect("numeric"), g.to_f64_vec().expect("numeric"));
        let max = wv.iter().fold(0f64, |m, v| m.max(v.abs()));
        for (i, (a, b)) in wv.iter().zip(&gv).enumerate() {
            let ok = if tol == 0.0 { a.to_bits() == b.to_bits() } else { (a - b).abs() <= tol * max };
            assert!(ok, "{what}/{name}: element {i}: gpu {b} vs cpu {a}");
        }
        result.push(g.clone());
    }
    result
}

fn u8_tensor(dims: &[usize], v: Vec<u8>) -> Tensor {
    Tensor::from_vec(dims, v).expect("u8 tensor")
}

/// round half to even, as ONNX specifies for QuantizeLinear / DynamicQuantizeLinear
fn rne(x: f32) -> f32 {
    x.round_ties_even()
}

#[test]
fn dequantize_and_quantize_linear_match_cpu_and_onnx() {
    if !gpu_available() {
        return;
    }
    let mut rng = Rng(seed());
    let dims = [3usize, 5, 7];
    let n: usize = dims.iter().product();
    for (elem, zp) in [(UINT8, 131i32), (INT8, -7)] {
        // DequantizeLinear, per tensor: y = (x - zp) * scale, exactly
        let scale = 0.0371f32;
        let zp_raw = vec![zp as u8];
        let bytes = model(
            vec![node("DequantizeLinear", &["x", "s", "z"], &["y"], vec![])],
            vec![value_info("x", elem, Some(&dims))],
            vec![value_info("y", FLOAT, None)],
            vec![init("s", FLOAT, &[], f32_raw(&[scale])), init("z", elem, &[], zp_raw.clone())],
        );
        let raw: Vec<u8> = (0..n).map(|_| rng.next_u32() as u8).collect();
        let x = if elem == UINT8 {
            u8_tensor(&dims, raw.clone())
        } else {
            Tensor::from_vec(&dims, raw.iter().map(|v| *v as i8).collect::<Vec<_>>()).expect("i8")
        };
        let y = cross("DequantizeLinear", &bytes, vec![("x".into(), x.clone())], &["y"], 0.0);
        let xv = x.to_f64_vec().expect("x");
        for (i, (xv, yv)) in xv.iter().zip(y[0].to_vec::<f32>().expect("f32")).enumerate() {
            assert_eq!(yv, (*xv as i32 - zp) as f32 * scale, "DequantizeLinear element {i}");
        }

        // DequantizeLinear, per axis (axis 1): a cast and an elementwise chain on the GPU
        let scales: Vec<f32> = (0..dims[1]).map(|_| rng.range(0.01, 0.1)).collect();
        let zps: Vec<u8> = (0..dims[1])
            .map(|_| if elem == UINT8 { rng.next_u32() as u8 } else { rng.next_u32() as u8 % 16 })
            .collect();
        let bytes = model(
            vec![node("DequantizeLinear", &["x", "s", "z"], &["y"], vec![attr_int("axis", 1)])],
            vec![value_info("x", elem, Some(&dims))],
            vec![value_info("y", FLOAT, None)],
            vec![init("s", FLOAT, &[dims[1]], f32_raw(&scales)), init("z", elem, &[dims[1]], zps)],
        );
        cross("DequantizeLinear per axis", &bytes, vec![("x".into(), x)], &["y"], 0.0);

        // QuantizeLinear, per tensor, scale a power of two: ties (k + 1/2) round to even, out-of-range values saturate
        let scale = 0.25f32;
        let bytes = model(
            vec![node("QuantizeLinear", &["x", "s", "z"], &["y"], vec![])],
            vec![value_info("x", FLOAT, Some(&dims))],
            vec![value_info("y", elem, None)],
            vec![init("s", FLOAT, &[], f32_raw(&[scale])), init("z", elem, &[], zp_raw)],
        );
        let xs: Vec<f32> = (0..n)
            .map(|i| match i % 4 {
                0 => ((rng.next_u32() % 200) as f32 - 100.0 + 0.5) * scale, // a tie
                1 => rng.range(-300.0, 300.0) * scale,                      // saturates now and then
                2 => rng.range(-1000.0, 1000.0),                            // mostly saturates
                _ => ((rng.next_u32() % 60) as f32 - 30.0) * scale,         // exact
            })
            .collect();
        let x = Tensor::from_vec(&dims, xs.clone()).expect("x");
        let y = cross("QuantizeLinear", &bytes, vec![("x".into(), x)], &["y"], 0.0);
        let (lo, hi) = if elem == UINT8 { (0f32, 255f32) } else { (-128f32, 127f32) };
        for (i, (xv, yv)) in xs.iter().zip(y[0].to_f64_vec().expect("y")).enumerate() {
            let onnx = (rne(xv / scale) + zp as f32).clamp(lo, hi);
            assert_eq!(yv as f32, onnx, "QuantizeLinear element {i}: x {xv}");
        }

        // QuantizeLinear, per axis: cast, div, round half to even, add, clamp, cast on the GPU
        let scales: Vec<f32> = (0..dims[1]).map(|j| [0.25f32, 0.5, 0.125, 1.0, 2.0][j % 5]).collect();
        let zps: Vec<u8> =
            (0..dims[1]).map(|j| if elem == UINT8 { 100 + j as u8 } else { (j as i8 - 2) as u8 }).collect();
        let bytes = model(
            vec![node("QuantizeLinear", &["x", "s", "z"], &["y"], vec![attr_int("axis", 1)])],
            vec![value_info("x", FLOAT, Some(&dims))],
            vec![value_info("y", elem, None)],
            vec![init("s", FLOAT, &[dims[1]], f32_raw(&scales)), init("z", elem, &[dims[1]], zps.clone())],
        );
        let x = Tensor::from_vec(&dims, xs.clone()).expect("x");
        let y = cross("QuantizeLinear per axis", &bytes, vec![("x".into(), x)], &["y"], 0.0);
        let yv = y[0].to_f64_vec().expect("y");
        for (i, xv) in xs.iter().enumerate() {
            let j = (i / dims[2]) % dims[1];
            let z = if elem == UINT8 { zps[j] as f32 } else { zps[j] as i8 as f32 };
            let onnx = (rne(xv / scales[j]) + z).clamp(lo, hi);
            assert_eq!(yv[i] as f32, onnx, "QuantizeLinear per axis element {i}: x {xv}");
        }
    }
}

/// ONNX's DynamicQuantizeLinear: (y, scale, zero point).
fn onnx_dql(xs: &[f32]) -> (Vec<u8>, f32, u8) {
    let min = xs.iter().fold(0f32, |m, v| m.min(*v));
    let max = xs.iter().fold(0f32, |m, v| m.max(*v));
    let scale = (max - min) / 255.0;
    let zp = rne(-min / scale).clamp(0.0, 255.0);
    let y = xs.iter().map(|x| (rne(x / scale) + zp).clamp(0.0, 255.0) as u8).collect();
    (y, scale, zp as u8)
}

#[test]
fn dynamic_quantize_linear_matches_cpu_and_onnx() {
    if !gpu_available() {
        return;
    }
    let mut rng = Rng(seed());
    let spec_example = vec![0f32, 2., -3., -2.5, 1.34, 0.5];
    // the zero point on a tie (-min / scale = 126.5 → 126), values on ties
    let tie = vec![-253f32, 257., 1., 3., -5.];
    let positive: Vec<f32> = (0..1000).map(|_| rng.range(0.5, 9.0)).collect();
    let negative: Vec<f32> = (0..77).map(|_| rng.range(-4.0, -0.1)).collect();
    let big: Vec<f32> = (0..7 * 333).map(|_| rng.range(-2.0, 5.0)).collect();
    for (what, xs, dims) in [
        ("spec example", spec_example, vec![6]),
        ("ties", tie, vec![5]),
        ("positive", positive, vec![10, 100]),
        ("negative", negative, vec![7, 11]),
        ("several workgroups", big, vec![7, 333]),
    ] {
        let bytes = model(
            vec![node("DynamicQuantizeLinear", &["x"], &["y", "s", "z"], vec![])],
            vec![value_info("x", FLOAT, Some(&dims))],
            vec![value_info("y", UINT8, None), value_info("s", FLOAT, None), value_info("z", UINT8, None)],
            vec![],
        );
        let x = Tensor::from_vec(&dims, xs.clone()).expect("x");
        let got = cross(&format!("DynamicQuantizeLinear {what}"), &bytes, vec![("x".into(), x)], &["y", "s", "z"], 0.0);
        let (y, s, z) = onnx_dql(&xs);
        assert_eq!(got[0].to_vec::<u8>().expect("y"), y, "{what}: y");
        assert_eq!(got[1].to_vec::<f32>().expect("s"), vec![s], "{what}: scale");
        assert_eq!(got[2].to_vec::<u8>().expect("z"), vec![z], "{what}: zero point");
    }
}

#[test]
fn matmul_integer_matches_cpu() {
    if !gpu_available() {
        return;
    }
    let mut rng = Rng(seed());
    // (A dims, B dims, A from an input (else both inputs), B type, B zero points per column)
    #[allow(clippy::type_complexity)]
    let cases: Vec<(Vec<usize>, Vec<usize>, i32, bool, bool)> = vec![
        (vec![1, 37], vec![37, 19], UINT8, false, false),
        (vec![5, 300], vec![300, 33], INT8, true, true),
        (vec![3, 5, 37], vec![37, 19], UINT8, true, false),
        (vec![2, 17, 64], vec![64, 70], INT8, false, true),
        (vec![2, 3, 9, 21], vec![2, 3, 21, 4], UINT8, true, false),
        (vec![1, 1, 13], vec![3, 13, 5], INT8, false, false),
    ];
    for (a_dims, b_dims, b_type, per_col, zps) in cases {
        let what = format!("MatMulInteger {a_dims:?} x {b_dims:?} ({b_type}, per column {per_col}, zp {zps})");
        let (k, n) = (b_dims[b_dims.len() - 2], b_dims[b_dims.len() - 1]);
        let b_count: usize = b_dims.iter().product();
        let b_raw: Vec<u8> = (0..b_count).map(|_| rng.next_u32() as u8).collect();
        let a_count: usize = a_dims.iter().product();
        let a = u8_tensor(&a_dims, (0..a_count).map(|_| rng.next_u32() as u8).collect());
        let mut inits = vec![];
        let mut ins = vec!["a", "b"];
        let b_input = b_dims.len() > 2;
        if !b_input {
            inits.push(init("b", b_type, &b_dims, b_raw.clone()));
        }
        if zps {
            inits.push(init("a0", UINT8, &[], vec![rng.next_u32() as u8]));
            let bz: Vec<u8> = (0..if per_col { n } else { 1 }).map(|_| rng.next_u32() as u8).collect();
            let bz_dims: Vec<usize> = if per_col { vec![n] } else { vec![] };
            inits.push(init("b0", b_type, &bz_dims, bz));
            ins.extend(["a0", "b0"]);
        }
        let mut inputs = vec![value_info("a", UINT8, Some(&a_dims))];
        let mut feeds = vec![("a".to_string(), a)];
        if b_input {
            inputs.push(value_info("b", b_type, Some(&b_dims)));
            let b = if b_type == UINT8 {
                u8_tensor(&b_dims, b_raw)
            } else {
                Tensor::from_vec(&b_dims, b_raw.iter().map(|v| *v as i8).collect::<Vec<_>>()).expect("i8")
            };
            feeds.push(("b".into(), b));
        }
        let bytes =
            model(vec![node("MatMulInteger", &ins, &["y"], vec![])], inputs, vec![value_info("y", INT32, None)], inits);
        let got = cross(&what, &bytes, feeds, &["y"], 0.0);
        assert_eq!(got[0].element_type(), ElementType::I32);
        assert!(k > 0);
    }
}

/// onnxruntime's quantize_dynamic pattern: DynamicQuantizeLinear → MatMulInteger → Cast → Mul(scale · w_scale)
/// (→ Add bias), all on the GPU.
#[test]
fn quantize_dynamic_pattern_runs_on_the_gpu() {
    if !gpu_available() {
        return;
    }
    let mut rng = Rng(seed());
    for (w_type, dims, k, n) in [(INT8, vec![1usize, 7, 96], 96usize, 40usize), (UINT8, vec![2, 3, 50], 50, 19)] {
        let w: Vec<u8> = (0..k * n).map(|_| rng.next_u32() as u8).collect();
        let bias: Vec<f32> = (0..n).map(|_| rng.range(-1.0, 1.0)).collect();
        let bytes = model(
            vec![
                node("DynamicQuantizeLinear", &["x"], &["xq", "xs", "xz"], vec![]),
                node("MatMulInteger", &["xq", "w", "xz", "wz"], &["acc"], vec![]),
                node("Cast", &["acc"], &["accf"], vec![attr_int("to", FLOAT as i64)]),
                node("Mul", &["xs", "ws"], &["s"], vec![]),
                node("Mul", &["accf", "s"], &["yy"], vec![]),
                node("Add", &["yy", "bias"], &["y"], vec![]),
            ],
            vec![value_info("x", FLOAT, Some(&dims))],
            vec![value_info("y", FLOAT, None)],
            vec![
                init("w", w_type, &[k, n], w),
                init("wz", w_type, &[], vec![if w_type == UINT8 { 128 } else { 3 }]),
                init("ws", FLOAT, &[], f32_raw(&[0.0123])),
                init("bias", FLOAT, &[n], f32_raw(&bias)),
            ],
        );
        let count: usize = dims.iter().product();
        let x = Tensor::from_vec(&dims, (0..count).map(|_| rng.range(-3.0, 4.0)).collect::<Vec<f32>>()).expect("x");
        cross(&format!("quantize_dynamic {w_type} {dims:?}"), &bytes, vec![("x".into(), x)], &["y"], 1e-6);
        // the weight stays packed on the GPU, four per u32 word (plus the bias and scalars), not a word per element
        let gpu = Session::from_bytes(&bytes, &options(ExecutionProvider::WebGpu)).expect("loading");
        let report = gpu.gpu_placement().expect("on the GPU");
        let packed = (k * n) as u64;
        assert!(
            report.weight_bytes_on_gpu <= packed + 4 * n as u64 + 64 && report.weight_bytes_on_gpu < 4 * packed,
            "{} weight bytes on the GPU for a {k}x{n} int8 weight",
            report.weight_bytes_on_gpu
        );
    }
}

/// An int8 embedding: Gather on a uint8 / int8 table, then DequantizeLinear; Casts between narrow and wide types.
#[test]
fn gather_and_cast_on_narrow_integers() {
    if !gpu_available() {
        return;
    }
    let mut rng = Rng(seed());
    for elem in [UINT8, INT8] {
        let (vocab, hidden) = (50usize, 24usize);
        let table: Vec<u8> = (0..vocab * hidden).map(|_| rng.next_u32() as u8).collect();
        let bytes = model(
            vec![
                node("Gather", &["t", "ids"], &["g"], vec![]),
                node("DequantizeLinear", &["g", "s", "z"], &["y"], vec![]),
            ],
            vec![value_info("ids", INT64, Some(&[2, 3]))],
            vec![value_info("y", FLOAT, None), value_info("g", elem, None)],
            vec![
                init("t", elem, &[vocab, hidden], table),
                init("s", FLOAT, &[], f32_raw(&[0.02])),
                init("z", elem, &[], vec![if elem == UINT8 { 120 } else { 250 }]),
            ],
        );
        let ids = Tensor::from_vec(&[2, 3], vec![0i64, 49, 7, -1, 13, 21]).expect("ids");
        cross(&format!("Gather {elem}"), &bytes, vec![("ids".into(), ids)], &["y", "g"], 0.0);

        // casts: f32 → narrow (saturating, truncating), narrow → f32 / i32, i32 → narrow (wrapping)
        let xs = vec![-3.7f32, 300.2, 255.9, 127.5, -128.9, 0.4, -0.6, 42.0, 1e9, -1e9];
        let bytes = model(
            vec![
                node("Cast", &["x"], &["q"], vec![attr_int("to", elem as i64)]),
                node("Cast", &["q"], &["f"], vec![attr_int("to", FLOAT as i64)]),
                node("Cast", &["q"], &["i"], vec![attr_int("to", INT32 as i64)]),
                node("Cast", &["j"], &["w"], vec![attr_int("to", elem as i64)]),
            ],
            vec![value_info("x", FLOAT, Some(&[xs.len()])), value_info("j", INT32, Some(&[6]))],
            vec![value_info("f", FLOAT, None), value_info("i", INT32, None), value_info("w", elem, None)],
            vec![],
        );
        let j = Tensor::from_vec(&[6], vec![0i32, 255, 256, -1, -129, 70000]).expect("j");
        let feeds = vec![("x".to_string(), Tensor::from_vec(&[xs.len()], xs.clone()).expect("x")), ("j".into(), j)];
        cross(&format!("Cast {elem}"), &bytes, feeds, &["f", "i", "w"], 0.0);
    }
}

fn venv_python() -> Option<std::path::PathBuf> {
    let p = workspace_root().join(".venv/bin/python");
    p.exists().then_some(p)
}

/// Runs `model_bytes` in onnxruntime (CPU) from the test venv on `feeds` (name, numpy dtype, dims, raw
/// little-endian bytes); output 0 as f64.
fn onnxruntime_run(
    python: &std::path::Path,
    model_bytes: &[u8],
    feeds: &[(&str, &str, Vec<usize>, Vec<u8>)],
) -> Vec<f64> {
    let dir = std::env::temp_dir().join(format!("kiln-int8-{}-{}", std::process::id(), rand_suffix()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::write(dir.join("m.onnx"), model_bytes).expect("writing the model");
    let mut lines = vec![];
    for (i, (name, dtype, dims, raw)) in feeds.iter().enumerate() {
        std::fs::write(dir.join(format!("in{i}.bin")), raw).expect("writing a feed");
        let shape: Vec<String> = dims.iter().map(|d| d.to_string()).collect();
        lines.push(format!(
            "f['{name}'] = np.fromfile('{d}/in{i}.bin', dtype=np.{dtype}).reshape([{shape}])",
            d = dir.display(),
            shape = shape.join(",")
        ));
    }
    let script = format!(
        "import numpy as np, onnxruntime as ort\n\
         s = ort.InferenceSession('{d}/m.onnx', providers=['CPUExecutionProvider'])\n\
         f = {{}}\n{feeds}\n\
         y = s.run(None, f)[0]\n\
         y.astype(np.float64).tofile('{d}/y.bin')\n",
        d = dir.display(),
        feeds = lines.join("\n")
    );
    let out = std::process::Command::new(python).arg("-c").arg(script).output().expect("running python");
    assert!(out.status.success(), "onnxruntime: {}", String::from_utf8_lossy(&out.stderr));
    let bytes = std::fs::read(dir.join("y.bin")).expect("reading onnxruntime's output");
    let _ = std::fs::remove_dir_all(&dir);
    bytes.chunks_exact(8).map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])).collect()
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

#[test]
fn gather_block_quantized_matches_onnxruntime() {
    if !gpu_available() {
        return;
    }
    let Some(python) = venv_python() else {
        eprintln!(
            "\n!!!!!!!! SKIPPING GatherBlockQuantized vs onnxruntime: no .venv (scripts/test.sh makes it) !!!!!!!!\n"
        );
        return;
    };
    let mut rng = Rng(seed());
    let mut ran = 0;
    for bits in [4usize, 8] {
        for (i, block_size) in [16usize, 32, 64, 128].into_iter().enumerate() {
            for zp in [false, true] {
                let f16 = i == 2 && zp;
                let (rows, cols) = (23usize, block_size * 2 + if i % 2 == 0 { block_size } else { 0 });
                let packed_cols = cols * bits / 8;
                let blocks = cols.div_ceil(block_size);
                let data: Vec<u8> = (0..rows * packed_cols).map(|_| rng.next_u32() as u8).collect();
                let scales: Vec<f32> = (0..rows * blocks).map(|_| rng.range(0.01, 0.2)).collect();
                let (s_type, s_raw) = if f16 {
                    (FLOAT16, scales.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect())
                } else {
                    (FLOAT, f32_raw(&scales))
                };
                let mut inits = vec![
                    init("data", UINT8, &[rows, packed_cols], data),
                    init("scales", s_type, &[rows, blocks], s_raw),
                ];
                let mut ins = vec!["data", "ids", "scales"];
                if zp {
                    let per_row = (blocks * bits).div_ceil(8);
                    let z: Vec<u8> = (0..rows * per_row).map(|_| rng.next_u32() as u8).collect();
                    inits.push(init("zp", UINT8, &[rows, per_row], z));
                    ins.push("zp");
                }
                let mut gbq = node(
                    "GatherBlockQuantized",
                    &ins,
                    &["y"],
                    vec![attr_int("bits", bits as i64), attr_int("block_size", block_size as i64)],
                );
                gbq.domain = "com.microsoft".into();
                for idx_dims in [vec![3usize], vec![2, 4]] {
                    let count: usize = idx_dims.iter().product();
                    let ids: Vec<i64> =
                        (0..count).map(|j| if j == 1 { -1 } else { (rng.next_u32() % rows as u32) as i64 }).collect();
                    let bytes = model(
                        vec![gbq.clone()],
                        vec![value_info("ids", INT64, Some(&idx_dims))],
                        vec![value_info("y", s_type, None)],
                        inits.clone(),
                    );
                    let what = format!(
                        "GatherBlockQuantized bits {bits} block {block_size} zp {zp} f16 {f16} ids {idx_dims:?}"
                    );
                    let feeds = vec![("ids".to_string(), Tensor::from_vec(&idx_dims, ids.clone()).expect("ids"))];
                    let got = cross(&what, &bytes, feeds, &["y"], 0.0);
                    let mut want_dims = idx_dims.clone();
                    want_dims.push(cols);
                    assert_eq!(got[0].dims(), &want_dims[..], "{what}: dims");
                    let raw: Vec<u8> = ids.iter().flat_map(|v| v.to_le_bytes()).collect();
                    let want = onnxruntime_run(&python, &bytes, &[("ids", "int64", idx_dims.clone(), raw)]);
                    let g = got[0].to_f64_vec().expect("numeric");
                    assert_eq!(g.len(), want.len(), "{what}: length");
                    for (e, (a, b)) in g.iter().zip(&want).enumerate() {
                        assert!(
                            (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                            "{what}: element {e}: kiln {a} vs onnxruntime {b}"
                        );
                    }
                    ran += 1;
                }
            }
        }
    }
    eprintln!("GatherBlockQuantized: {ran} cases match onnxruntime");
}

/// Compute nodes on the CPU, except shape arithmetic (TDim values: another kernel family's work).
fn cpu_nodes(session: &Session) -> (usize, Vec<String>) {
    let report = session.gpu_placement().expect("on the GPU");
    let all: Vec<_> = report.nodes.iter().filter(|n| n.device == Device::Cpu).collect();
    let shape_arith = |r: &str| r.contains("TDim") || r.contains("shape arithmetic");
    let rest = all
        .iter()
        .filter(|n| !shape_arith(n.reason.as_deref().unwrap_or("")))
        .map(|n| format!("{} ({})", n.op, n.reason.clone().unwrap_or_default()))
        .collect();
    (all.len(), rest)
}

fn fixture(model: &str) {
    let dir = tiny_fixtures().join(model);
    let session = Session::from_path(dir.join("model.onnx"), &options(ExecutionProvider::WebGpu))
        .unwrap_or_else(|e| panic!("{model}: loading: {e}"));
    let report = session.gpu_placement().expect("on the GPU");
    let (all, rest) = cpu_nodes(&session);
    eprintln!(
        "{model}: {} of {} compute nodes on the GPU, {all} on the CPU (shape arithmetic but {:?})",
        report.gpu_nodes(),
        report.nodes.len(),
        rest
    );
    assert!(rest.is_empty(), "{model}: CPU nodes besides shape arithmetic: {rest:?}");
    session.set_gpu_poison(true);
    let mut failures = vec![];
    for set in ["test_data_set_0", "test_data_set_1"] {
        let set_dir = dir.join(set);
        let feeds = read_inputs(&session, &set_dir);
        let expected = read_outputs(&session, &set_dir);
        let outputs = session.run(feeds).unwrap_or_else(|e| panic!("{model}/{set}: running on the GPU: {e}"));
        for (name, want) in &expected {
            let got = outputs.get(name).unwrap_or_else(|| panic!("{model}/{set}: no output `{name}`"));
            let (diff, ref_max) = max_diff(&format!("{model}/{set}/{name}"), got, want);
            // the CPU provider's bound for the int8 exports (optimum_fixtures.rs)
            let bound = Tolerance::RelToMax(1e-3).bound(ref_max);
            eprintln!("{model}/{set}/{name}: max|diff| {diff:.3e} (bound {bound:.3e})");
            if diff > bound {
                failures.push(format!("{set}/{name}: max|diff| {diff:.3e} > {bound:.3e}"));
            }
        }
    }
    let report = session.gpu_placement().unwrap_or_default();
    eprintln!("{model}: {} runs, {:?}", report.runs, report.counters);
    assert!(failures.is_empty(), "{model} on the GPU:\n  {}", failures.join("\n  "));
}

#[test]
fn tiny_llama_optimum_int8_gpu() {
    if gpu_available() {
        fixture("tiny-llama/onnx_optimum_int8");
    }
}

#[test]
fn tiny_gpt2_optimum_int8_gpu() {
    if gpu_available() {
        fixture("tiny-gpt2/onnx_optimum_int8");
    }
}

/// all-MiniLM-L6-v2 int8 on the GPU: (max |last_hidden_state diff| against onnxruntime's reference
/// (provider/tests/data/minilm, made by make_reference.py with onnxruntime), lowest sentence-embedding cosine).
fn minilm_gpu() -> Option<(f64, f64)> {
    if !gpu_available() {
        return None;
    }
    let model = shared_models().join("all-minilm-l6-v2/onnx/model_quantized.onnx");
    if !model.exists() {
        eprintln!("skipped: model not found ({})", model.display());
        return None;
    }
    let set = workspace_root().join("provider/tests/data/minilm");
    let session = Session::from_path(&model, &options(ExecutionProvider::WebGpu)).expect("loading MiniLM int8");
    let report = session.gpu_placement().expect("on the GPU");
    let (all, rest) = cpu_nodes(&session);
    eprintln!(
        "MiniLM int8: {} of {} compute nodes on the GPU, {all} on the CPU ({} besides shape arithmetic: {rest:?})",
        report.gpu_nodes(),
        report.nodes.len(),
        rest.len()
    );
    assert_eq!(all, 0, "MiniLM int8: nodes on the CPU");
    // its uint8 word embeddings (11 MiB) stream from the model file: the LayerNormalization after a residual Add
    // must still see the shapes onnxruntime's SkipLayerNorm fusion sees through them (kiln-ops' layer_norm)
    // (its 30522 × 384 uint8 table is one i32 word an element on the GPU)
    assert!(report.weight_bytes_streamed >= 30522 * 384 * 4, "MiniLM int8: streamed weights {report:?}");
    session.set_gpu_poison(true);
    let feeds = read_inputs(&session, &set);
    let mask = feeds[1].1.to_vec::<i64>().expect("attention_mask");
    let outputs = session.run(feeds).expect("MiniLM int8 on the GPU");
    let got = outputs.get("last_hidden_state").expect("last_hidden_state");
    let want = read_tensor(&set.join("output_0.pb"));
    let (diff, _) = max_diff("last_hidden_state", got, &want);
    // sentence embeddings: mean over the attention mask, L2-normalised (as minilm.rs)
    let (n, l, h) = (want.dims()[0], want.dims()[1], want.dims()[2]);
    let (a, b) = (f32_values(got), f32_values(&want));
    let embed = |x: &[f32], s: usize| -> Vec<f64> {
        let mut e = vec![0f64; h];
        for t in (0..l).filter(|t| mask[s * l + t] != 0) {
            for (acc, v) in e.iter_mut().zip(&x[(s * l + t) * h..][..h]) {
                *acc += *v as f64;
            }
        }
        let norm = e.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-12);
        e.iter().map(|v| v / norm).collect()
    };
    let lowest =
        (0..n).map(|s| embed(&a, s).iter().zip(embed(&b, s)).map(|(x, y)| x * y).sum::<f64>()).fold(1f64, f64::min);
    eprintln!("MiniLM int8 on the GPU: max |last_hidden_state diff| {diff:.3e}, lowest embedding cosine {lowest:.7}");
    Some((diff, lowest))
}

/// Every node of all-MiniLM-L6-v2 int8 on the GPU; its sentence embeddings agree with onnxruntime's.
#[test]
fn minilm_int8_gpu_embeddings_match_onnxruntime() {
    if let Some((_, lowest)) = minilm_gpu() {
        // onnxruntime's arithmetic on the GPU (see below): the CPU provider's 0.99999
        assert!(lowest >= 0.99999, "lowest embedding cosine {lowest}");
    }
}

/// The issue's bound: last_hidden_state within 1e-2 of onnxruntime. Per-tensor dynamic quantization turns every ulp
/// by which a float kernel rounds differently from onnxruntime's CPU into flipped uint8 codes that compound over the
/// six layers. So in models with DynamicQuantizeLinear the GPU computes as onnxruntime's CPU kernels do:
/// LayerNormalization (kiln-ops' OrtLayerNorm: exact mean and fused multiply-adds in eight lanes, or
/// SkipLayerNormalization's Welford), Softmax (MLAS's exp and summation order), float MatMul (one fused multiply-add
/// per k, in order), and Erf in every model (MLAS's polynomial); fused multiply-adds are emulated exactly, as
/// lavapipe's fma() is a multiply and an add. Measured on lavapipe: max |diff| 0 (bit-identical to onnxruntime 1.32; was 0.3).
#[test]
fn minilm_int8_gpu_last_hidden_state_within_1e_2() {
    if let Some((diff, _)) = minilm_gpu() {
        assert!(diff <= 1e-2, "max |last_hidden_state diff| {diff:.3e} > 1e-2");
    }
}

const UINT16: i32 = 4;
const INT16: i32 = 5;

/// Blocked (opset 21) and 16-bit DequantizeLinear / QuantizeLinear (kiln-ops' `QdqLinear`: tract has neither) on
/// the GPU against the CPU and onnxruntime: blocks along axis 0 and 1 with a partial last block, uint8 / int8 /
/// uint16 / int16, ties and saturation.
#[test]
fn blocked_and_16_bit_quantize_linear_match_onnxruntime() {
    if !gpu_available() {
        return;
    }
    let Some(python) = venv_python() else {
        eprintln!(
            "\n!!!!!!!! SKIPPING blocked QuantizeLinear vs onnxruntime: no .venv (scripts/test.sh makes it) !!!!!!!!\n"
        );
        return;
    };
    let mut rng = Rng(seed());
    let dims = [6usize, 10];
    let n: usize = dims.iter().product();
    for (elem, dtype) in [(UINT8, "uint8"), (INT8, "int8"), (UINT16, "uint16"), (INT16, "int16")] {
        let size = if elem == UINT8 || elem == INT8 { 1 } else { 2 };
        let zero_raw = |rng: &mut Rng, count: usize| -> Vec<u8> {
            (0..count)
                .flat_map(|_| {
                    let v = rng.next_u32();
                    let z: i64 = match elem {
                        UINT8 => (v % 256) as i64,
                        INT8 => (v % 256) as i64 - 128,
                        UINT16 => (v % 65536) as i64,
                        _ => (v % 65536) as i64 - 32768,
                    };
                    z.to_le_bytes()[..size].to_vec()
                })
                .collect()
        };
        // (axis, block size): blocks of 4 along axis 1 (10 = 4 + 4 + 2), blocks of 4 along axis 0 (6 = 4 + 2), or
        // per tensor / per axis (16-bit only)
        let layouts: Vec<(i64, usize)> = if size == 2 { vec![(1, 4), (0, 4), (1, 0)] } else { vec![(1, 4), (0, 4)] };
        for (axis, block) in layouts {
            let p_dims: Vec<usize> = match block {
                0 => vec![dims[axis as usize]],
                b => {
                    let mut d = dims.to_vec();
                    d[axis as usize] = d[axis as usize].div_ceil(b);
                    d
                }
            };
            let p_count: usize = p_dims.iter().product();
            let scales: Vec<f32> =
                (0..p_count).map(|i| [0.25f32, 0.5, 0.125, 2.0][i % 4] * if size == 2 { 0.01 } else { 1.0 }).collect();
            let zps = zero_raw(&mut rng, p_count);
            let mut attrs = vec![attr_int("axis", axis)];
            if block > 0 {
                attrs.push(attr_int("block_size", block as i64));
            }
            let what = format!("{dtype} axis {axis} block {block}");

            // QuantizeLinear: ties and saturating values
            let xs: Vec<f32> = (0..n)
                .map(|i| {
                    let s = 8.0 * if size == 2 { 0.01 } else { 1.0 };
                    match i % 3 {
                        0 => ((rng.next_u32() % 40) as f32 - 20.0 + 0.5) * 0.125 * s,
                        1 => rng.range(-400.0, 400.0) * s,
                        _ => rng.range(-1e6, 1e6),
                    }
                })
                .collect();
            let bytes = model_at(
                21,
                vec![node("QuantizeLinear", &["x", "s", "z"], &["y"], attrs.clone())],
                vec![value_info("x", FLOAT, Some(&dims))],
                vec![value_info("y", elem, None)],
                vec![init("s", FLOAT, &p_dims, f32_raw(&scales)), init("z", elem, &p_dims, zps.clone())],
            );
            let x = Tensor::from_vec(&dims, xs.clone()).expect("x");
            let got = cross(&format!("QuantizeLinear {what}"), &bytes, vec![("x".into(), x)], &["y"], 0.0);
            let want = onnxruntime_run(&python, &bytes, &[("x", "float32", dims.to_vec(), f32_raw(&xs))]);
            // equal, except by one where x / scale is within two f32 ulps of a tie (n + 0.5): there the f32 quotient
            // may round onto the tie (then half-to-even) or not, as each implementation divides
            let scale_of = |i: usize| {
                let (r, c) = (i / dims[1], i % dims[1]);
                let p = match (axis, block) {
                    (_, 0) => [r, c][axis as usize],
                    (0, b) => (r / b) * dims[1] + c,
                    (_, b) => r * dims[1].div_ceil(b) + c / b,
                };
                scales[p] as f64
            };
            let got = got[0].to_f64_vec().expect("y");
            assert_eq!(got.len(), want.len(), "QuantizeLinear {what}: lengths");
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                let q = xs[i] as f64 / scale_of(i);
                // within two f32 ulps of the tie: the f32 quotient may be the tie itself (then half-to-even)
                let ulp = 2f64.powi(q.abs().max(1.0).log2().floor() as i32 - 23);
                let near_tie = (q.abs().fract() - 0.5).abs() <= 2.0 * ulp;
                assert!(
                    g == w || ((g - w).abs() == 1.0 && near_tie),
                    "QuantizeLinear {what} against onnxruntime: element {i}: kiln {g}, onnxruntime {w} (x / scale {q})"
                );
            }

            // DequantizeLinear of the quantized values
            let q_raw: Vec<u8> = (0..n).flat_map(|_| rng.next_u32().to_le_bytes()[..size].to_vec()).collect();
            let bytes = model_at(
                21,
                vec![node("DequantizeLinear", &["x", "s", "z"], &["y"], attrs)],
                vec![value_info("x", elem, Some(&dims))],
                vec![value_info("y", FLOAT, None)],
                vec![init("s", FLOAT, &p_dims, f32_raw(&scales)), init("z", elem, &p_dims, zps)],
            );
            let x = match elem {
                UINT8 => u8_tensor(&dims, q_raw.clone()),
                INT8 => Tensor::from_vec(&dims, q_raw.iter().map(|v| *v as i8).collect::<Vec<_>>()).expect("i8"),
                UINT16 => Tensor::from_vec(
                    &dims,
                    q_raw.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect::<Vec<_>>(),
                )
                .expect("u16"),
                _ => Tensor::from_vec(
                    &dims,
                    q_raw.chunks_exact(2).map(|c| i16::from_le_bytes([c[0], c[1]])).collect::<Vec<_>>(),
                )
                .expect("i16"),
            };
            let got = cross(&format!("DequantizeLinear {what}"), &bytes, vec![("x".into(), x)], &["y"], 0.0);
            let want = onnxruntime_run(&python, &bytes, &[("x", dtype, dims.to_vec(), q_raw)]);
            assert_eq!(got[0].to_f64_vec().expect("y"), want, "DequantizeLinear {what} against onnxruntime");
        }
    }
}

/// The kernels with onnxruntime's CPU arithmetic (what int8 models need: see
/// `minilm_int8_gpu_last_hidden_state_within_1e_2`) are bit-identical to the CPU provider's, whose kernels are ports
/// of onnxruntime's (tested bit for bit against it in kiln-ops), in models with DynamicQuantizeLinear (what selects
/// them): LayerNormalization (rows around the blocks of eight and four, with and without bias, over one or two
/// axes), SkipLayerNormalization's arithmetic (an Add of two same-shaped rank-3 tensors feeding it, which
/// onnxruntime fuses), float MatMul, Softmax over masked scores, and Erf on both sides of its polynomial split.
#[test]
fn onnxruntime_arithmetic_kernels_are_bit_identical_to_the_cpu() {
    if !gpu_available() {
        return;
    }
    let mut rng = Rng(seed());
    let random = |rng: &mut Rng, dims: &[usize], lo: f32, hi: f32| -> Tensor {
        let n: usize = dims.iter().product();
        Tensor::from_vec(dims, (0..n).map(|_| rng.range(lo, hi)).collect::<Vec<f32>>()).expect("f32 tensor")
    };
    for d in [1usize, 7, 8, 12, 13, 384, 1000] {
        for bias in [true, false] {
            for two_axes in [false, true] {
                let dims = [3usize, 2, d];
                let norm: &[usize] = if two_axes { &dims[1..] } else { &dims[2..] };
                let count: usize = norm.iter().product();
                let gamma: Vec<f32> = (0..count).map(|_| rng.range(0.5, 1.5)).collect();
                let beta: Vec<f32> = (0..count).map(|_| rng.range(-0.5, 0.5)).collect();
                let mut inits = vec![init("g", FLOAT, norm, f32_raw(&gamma))];
                let mut ins = vec!["x", "g"];
                if bias {
                    inits.push(init("b", FLOAT, norm, f32_raw(&beta)));
                    ins.push("b");
                }
                let attrs = vec![attr_int("axis", if two_axes { 1 } else { -1 })];
                // (a DynamicQuantizeLinear makes it an int8 model)
                let bytes = model(
                    vec![
                        node("LayerNormalization", &ins, &["y"], attrs),
                        node("DynamicQuantizeLinear", &["y"], &["qy", "qs", "qz"], vec![]),
                    ],
                    vec![value_info("x", FLOAT, Some(&dims))],
                    vec![value_info("y", FLOAT, None), value_info("qy", UINT8, None)],
                    inits,
                );
                let x = random(&mut rng, &dims, -2.0, 4.0);
                cross(
                    &format!("LayerNormalization {dims:?} bias {bias} two axes {two_axes}"),
                    &bytes,
                    vec![("x".into(), x)],
                    &["y", "qy"],
                    0.0,
                );
            }
        }
    }
    for d in [13usize, 384] {
        let dims = [2usize, 5, d];
        let gamma: Vec<f32> = (0..d).map(|_| rng.range(0.5, 1.5)).collect();
        let beta: Vec<f32> = (0..d).map(|_| rng.range(-0.5, 0.5)).collect();
        let bytes = model(
            vec![
                node("Add", &["a", "r"], &["s"], vec![]),
                node("LayerNormalization", &["s", "g", "b"], &["y"], vec![]),
                node("DynamicQuantizeLinear", &["y"], &["qy", "qs", "qz"], vec![]),
            ],
            vec![value_info("a", FLOAT, Some(&dims)), value_info("r", FLOAT, Some(&dims))],
            vec![value_info("y", FLOAT, None), value_info("qy", UINT8, None)],
            vec![init("g", FLOAT, &[d], f32_raw(&gamma)), init("b", FLOAT, &[d], f32_raw(&beta))],
        );
        let feeds =
            vec![("a".into(), random(&mut rng, &dims, -2.0, 4.0)), ("r".into(), random(&mut rng, &dims, -1.0, 1.0))];
        cross(
            &format!("Add + LayerNormalization (SkipLayerNormalization's arithmetic) {dims:?}"),
            &bytes,
            feeds,
            &["y", "qy"],
            0.0,
        );
    }
    // an int8 model: float MatMul, Softmax and Erf with onnxruntime's arithmetic
    for (k, n) in [(32usize, 7usize), (19, 40)] {
        let (ad, bd, md) = ([2usize, 3, 5, k], [2usize, 3, k, n], [2usize, 1, 1, n]);
        let bytes = model(
            vec![
                node("DynamicQuantizeLinear", &["q"], &["qy", "qs", "qz"], vec![]),
                node("MatMul", &["a", "b"], &["m"], vec![]),
                node("Add", &["m", "mask"], &["s"], vec![]),
                node("Softmax", &["s"], &["y"], vec![attr_int("axis", -1)]),
                node("Erf", &["e"], &["ye"], vec![]),
            ],
            vec![
                value_info("q", FLOAT, Some(&[4, 6])),
                value_info("a", FLOAT, Some(&ad)),
                value_info("b", FLOAT, Some(&bd)),
                value_info("mask", FLOAT, Some(&md)),
                value_info("e", FLOAT, Some(&[1000])),
            ],
            vec![
                value_info("qy", UINT8, None),
                value_info("m", FLOAT, None),
                value_info("y", FLOAT, None),
                value_info("ye", FLOAT, None),
            ],
            vec![],
        );
        // masked scores as transformers' attention masks make them (the last key never masked)
        let mask: Vec<f32> = (0..2 * n)
            .map(|i| if i % n != n - 1 && rng.next_u32().is_multiple_of(3) { f32::MIN } else { 0.0 })
            .collect();
        let feeds = vec![
            ("q".into(), random(&mut rng, &[4, 6], -3.0, 5.0)),
            ("a".into(), random(&mut rng, &ad, -2.0, 2.0)),
            ("b".into(), random(&mut rng, &bd, -2.0, 2.0)),
            ("mask".into(), Tensor::from_vec(&md, mask).expect("mask")),
            ("e".into(), random(&mut rng, &[1000], -5.0, 5.0)),
        ];
        cross(
            &format!("int8 model: MatMul {ad:?} x {bd:?}, Softmax, Erf"),
            &bytes,
            feeds,
            &["qy", "m", "y", "ye"],
            0.0,
        );
    }
}
