//! float16 on the GPU (kiln_wgsl::f16), with and without shader-f16: every f16 kernel against the CPU (tract) —
//! casts between f16 and f32 / bool / i32 / i64 (special values, round-to-nearest-even ties, subnormals, overflow),
//! Gather of an f16 table and the strided copies (Transpose, Expand, Slice, stepped Slice, Concat) on odd sizes
//! whose elements straddle u32 words — with the GPU's output buffers poisoned first; float16 one-node models through
//! a session with every node on the GPU; and the fp16 tiny fixtures (tiny-llama and tiny-gpt2 onnx_optimum_fp16,
//! prefill and one decode step, every output against onnxruntime's) on the GPU with no CPU node for an f16 reason.
//!
//! Each test runs twice: on the adapter's shader-f16 (`enable f16;`, lavapipe has it) and with KILN_GPU_NO_F16=1
//! (packed u32 words, the path of adapters without it, such as Chrome's SwiftShader). The variable is read when a
//! context is created, so the tests of this file create their contexts one at a time under a lock.
//! Skips, loudly, only when the machine has no GPU adapter (CI installs lavapipe).
#![cfg(not(target_arch = "wasm32"))]

mod common;
mod graphs;

use graphs::{attr_int, fixed_value_info as value_info, seed, Rng};

use std::sync::{Arc, Mutex};

use common::*;
use half::f16;
use kiln_graph::tract_onnx::pb;
use kiln_graph::tract_onnx::prelude::{SpecialOps, Tensor as TTensor};
use kiln_graph::tract_onnx::tract_core::internal::{
    tvec, AxisOp, DatumType, IntoTValue, SymbolValues, TDim, TypedFact, TypedModel, TypedOp, TypedSimplePlan,
};
use kiln_graph::tract_onnx::tract_core::ops::array::{Gather, MultiBroadcastTo, Slice, TypedConcat};
use kiln_graph::tract_onnx::tract_core::ops::cast::cast;
use kiln_graph::tract_onnx::tract_core::ops::downsample::Downsample;
use kiln_provider::blocking::Session;
use kiln_provider::{Device, ElementType, ExecutionProvider, SessionOptions, Tensor};
use kiln_wgsl::context::NO_F16_ENV;
use kiln_wgsl::exec::tensor_from_bytes;
use kiln_wgsl::ops::kernel_for;
use kiln_wgsl::{Context, Recorder};
use prost::Message;

static CONTEXTS: Mutex<()> = Mutex::new(());

/// `f()` (which creates GPU contexts) with shader-f16 allowed (`native`) or forced off.
fn in_mode<T>(native: bool, f: impl FnOnce() -> T) -> T {
    let _guard = CONTEXTS.lock().unwrap_or_else(|p| p.into_inner());
    if native {
        std::env::remove_var(NO_F16_ENV);
    } else {
        std::env::set_var(NO_F16_ENV, "1");
    }
    let r = f();
    std::env::remove_var(NO_F16_ENV);
    r
}

fn mode_name(native: bool) -> &'static str {
    if native {
        "shader-f16"
    } else {
        "packed (KILN_GPU_NO_F16=1)"
    }
}

/// The context of each mode that this adapter has (shader-f16 only where the adapter offers it), or none (loudly).
fn contexts() -> Vec<(bool, Arc<Context>)> {
    let mut out = vec![];
    for native in [true, false] {
        let ctx = match in_mode(native, || pollster::block_on(Context::new())) {
            Ok(Some(ctx)) => ctx,
            other => {
                eprintln!(
                    "\n!!!!!!!! SKIPPING GPU f16 TESTS: no GPU adapter ({other:?}). \
                     Install lavapipe: apt-get install -y mesa-vulkan-drivers libvulkan1 !!!!!!!!\n"
                );
                return vec![];
            }
        };
        if native && !ctx.caps.shader_f16 {
            eprintln!("!!!! adapter {} has no shader-f16: only the packed path is tested here", ctx.caps.adapter);
            continue;
        }
        assert!(native || !ctx.caps.shader_f16, "{NO_F16_ENV}=1 left shader-f16 on");
        out.push((native, ctx));
    }
    out
}

/// f16 values of every class: random bit patterns (normals of every exponent, subnormals), and the edges.
fn f16_values(rng: &mut Rng, n: usize, finite_only: bool) -> Vec<f16> {
    let specials = [0x0000u16, 0x8000, 0x0001, 0x8001, 0x03ff, 0x0400, 0x7bff, 0xfbff, 0x3c00, 0xbc00, 0x3555];
    let inf_nan = [0x7c00u16, 0xfc00, 0x7e00, 0xfe01];
    (0..n)
        .map(|i| {
            let bits = if i < specials.len() {
                specials[i]
            } else if !finite_only && i < specials.len() + inf_nan.len() {
                inf_nan[i - specials.len()]
            } else {
                let b = rng.next_u32() as u16;
                // random finite patterns (an all-ones exponent is inf / NaN)
                if b & 0x7c00 == 0x7c00 {
                    b & !0x4000
                } else {
                    b
                }
            };
            f16::from_bits(bits)
        })
        .collect()
}

/// f32 values that exercise f32 → f16 rounding: ties to even both ways, just off ties, subnormal results, the
/// underflow edge 2^-25, overflow past 65504 (65519.99 stays finite, 65520 rounds to infinity), infinities, NaN,
/// then random magnitudes from 1e-9 to 1e5.
fn f32_values(rng: &mut Rng, n: usize, finite_only: bool) -> Vec<f32> {
    let mut v = vec![
        0.0,
        -0.0,
        1.0 + 2f32.powi(-11),       // tie, rounds down to even 1.0
        1.0 + 3.0 * 2f32.powi(-11), // tie, rounds up to even
        1.0 + 2f32.powi(-11) + 2f32.powi(-20),
        -(2.0 + 2f32.powi(-10)),
        2f32.powi(-25),       // tie between 0 and the smallest subnormal: 0
        2f32.powi(-25) * 1.5, // rounds to the smallest subnormal
        3.0 * 2f32.powi(-25), // tie: rounds to 2^-23 (even)
        6.0e-5,               // subnormal result
        -6.1e-5,              // near the smallest normal
        65504.0,
        65519.99,
        1e-9,
    ];
    if !finite_only {
        v.extend([65520.0, -70000.0, f32::INFINITY, f32::NEG_INFINITY, f32::NAN]);
    }
    while v.len() < n {
        let mag = 10f32.powf(rng.range(-9.0, 5.0));
        v.push(if rng.next_u32() & 1 == 0 { mag } else { -mag });
    }
    v.truncate(n);
    v
}

/// An f16 tensor from its values.
fn f16_tensor(shape: &[usize], v: Vec<f16>) -> TTensor {
    TTensor::from_shape(shape, &v).expect("an f16 tensor")
}

/// Runs the one-op model `op` on `inputs`: on the CPU (tract) and with the kernel kiln_wgsl places for it on the
/// GPU (poisoned output buffers); returns (cpu, gpu).
fn cpu_and_gpu(ctx: &Context, op: Box<dyn TypedOp>, inputs: &[TTensor]) -> Result<(TTensor, TTensor), String> {
    let name = op.name().to_string();
    cpu_and_gpu_inner(ctx, op, inputs).map_err(|e| format!("{name}: {e}"))
}

fn cpu_and_gpu_inner(ctx: &Context, op: Box<dyn TypedOp>, inputs: &[TTensor]) -> Result<(TTensor, TTensor), String> {
    let mut model = TypedModel::default();
    let mut wires = tvec![];
    for (i, t) in inputs.iter().enumerate() {
        let fact = TypedFact::dt_shape(t.datum_type(), t.shape());
        wires.push(model.add_source(format!("x{i}"), fact).map_err(|e| e.to_string())?);
    }
    let y = model.wire_node("y", op, &wires).map_err(|e| e.to_string())?;
    model.select_output_outlets(&y).map_err(|e| e.to_string())?;
    let node = model.node(y[0].node);
    let kernel = kernel_for(&model, node, &ctx.caps).map_err(|e| format!("not placed on the GPU: {e}"))?;
    let plan = TypedSimplePlan::new(model.clone()).map_err(|e| e.to_string())?;
    let cpu_out =
        plan.run(inputs.iter().map(|t| t.clone().into_tvalue()).collect()).map_err(|e| format!("cpu: {e}"))?;
    let cpu: TTensor = (*cpu_out[0]).clone();
    let mut rec = Recorder::default();
    rec.poison = true;
    let mut ins = vec![];
    for t in inputs {
        ins.push(rec.upload(ctx, t).map_err(|e| e.to_string())?);
    }
    let refs: Vec<_> = ins.iter().collect();
    let out = kernel.encode(ctx, &mut rec, &refs, &SymbolValues::default()).map_err(|e| e.to_string())?;
    let read = rec.readback(&out);
    let bytes = pollster::block_on(rec.flush(ctx)).map_err(|e| e.to_string())?;
    let gpu = tensor_from_bytes(out.dt, &out.shape, &bytes[read.0]).map_err(|e| e.to_string())?;
    Ok((cpu, gpu))
}

fn values<T: kiln_graph::tract_onnx::prelude::Datum + Copy>(t: &TTensor) -> Result<Vec<T>, String> {
    Ok(t.to_plain_array_view::<T>().map_err(|e| e.to_string())?.iter().copied().collect())
}

/// f16 bits as an ordered integer line (so that adjacent values differ by 1, across zero too).
fn f16_ordinal(h: f16) -> i32 {
    let b = h.to_bits() as i32;
    if b & 0x8000 != 0 {
        -(b & 0x7fff)
    } else {
        b
    }
}

/// Compares element by element. f16 outputs: bit for bit (NaN: any NaN), except `ulps` > 0 allows that many f16
/// ulps between finite values (the hardware's f32 → f16 conversion on the shader-f16 path rounds as the adapter
/// does; WGSL leaves the rounding of an inexact conversion to the implementation — lavapipe's was measured exact). Others: exactly (NaN: NaN).
fn compare(what: &str, cpu: &TTensor, gpu: &TTensor, ulps: i32) -> Result<(), String> {
    if cpu.datum_type() != gpu.datum_type() || cpu.shape() != gpu.shape() {
        return Err(format!(
            "{what}: {:?} {:?} on the GPU, {:?} {:?} on the CPU",
            gpu.datum_type(),
            gpu.shape(),
            cpu.datum_type(),
            cpu.shape()
        ));
    }
    let bad = |i: usize, g: String, c: String| Err(format!("{what}: element {i}: gpu {g} vs cpu {c}"));
    match cpu.datum_type() {
        DatumType::F16 => {
            let (c, g) = (values::<f16>(cpu)?, values::<f16>(gpu)?);
            for (i, (a, b)) in c.iter().zip(g.iter()).enumerate() {
                let ok = if a.is_nan() || b.is_nan() {
                    a.is_nan() && b.is_nan()
                } else if a.is_infinite() || b.is_infinite() || ulps == 0 {
                    a.to_bits() == b.to_bits()
                } else {
                    (f16_ordinal(*a) - f16_ordinal(*b)).abs() <= ulps
                };
                if !ok {
                    return bad(i, format!("{b} ({:#06x})", b.to_bits()), format!("{a} ({:#06x})", a.to_bits()));
                }
            }
        }
        DatumType::F32 => {
            let (c, g) = (values::<f32>(cpu)?, values::<f32>(gpu)?);
            for (i, (a, b)) in c.iter().zip(g.iter()).enumerate() {
                if !(a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())) {
                    return bad(i, b.to_string(), a.to_string());
                }
            }
        }
        _ => {
            let c = cpu.cast_to::<i64>().map_err(|e| e.to_string())?.into_owned();
            let g = gpu.cast_to::<i64>().map_err(|e| e.to_string())?.into_owned();
            let (c, g) = (values::<i64>(&c)?, values::<i64>(&g)?);
            for (i, (a, b)) in c.iter().zip(g.iter()).enumerate() {
                if a != b {
                    return bad(i, b.to_string(), a.to_string());
                }
            }
        }
    }
    Ok(())
}

const SIZES: [usize; 6] = [1, 2, 7, 256, 1001, 70_001];

#[test]
fn f16_casts_match_cpu_with_and_without_shader_f16() {
    let contexts = contexts();
    let mut rng = Rng(seed());
    let mut failures = vec![];
    let mut ran = 0;
    for (native, ctx) in &contexts {
        // the hardware's f32 → f16 rounding may differ from round-to-nearest-even by one ulp (see `compare`)
        let ulps = if *native { 1 } else { 0 };
        for n in SIZES {
            let shape = [n];
            let casts: Vec<(TTensor, DatumType)> = vec![
                (f16_tensor(&shape, f16_values(&mut rng, n, false)), DatumType::F32),
                (TTensor::from_shape(&shape, &f32_values(&mut rng, n, false)).unwrap(), DatumType::F16),
                // the integer and bool casts: finite values (NaN and infinities have no integer)
                (f16_tensor(&shape, f16_values(&mut rng, n, true)), DatumType::I64),
                (f16_tensor(&shape, f16_values(&mut rng, n, true)), DatumType::I32),
                (f16_tensor(&shape, f16_values(&mut rng, n, true)), DatumType::Bool),
                (
                    TTensor::from_shape(&shape, &(0..n).map(|i| (i as i64 - 3) * 977).collect::<Vec<_>>()).unwrap(),
                    DatumType::F16,
                ),
                (
                    TTensor::from_shape(&shape, &(0..n).map(|i| i as i32 * 13 - 40000).collect::<Vec<_>>()).unwrap(),
                    DatumType::F16,
                ),
                (
                    TTensor::from_shape(
                        &shape,
                        &(0..n).map(|i| rng.next_u32().is_multiple_of(3) || i == 1).collect::<Vec<_>>(),
                    )
                    .unwrap(),
                    DatumType::F16,
                ),
            ];
            for (input, to) in casts {
                ran += 1;
                let what = format!("{}: cast {:?} to {to:?} of [{n}]", mode_name(*native), input.datum_type());
                let r = cpu_and_gpu(ctx, Box::new(cast(to)), &[input]).and_then(|(c, g)| compare(&what, &c, &g, ulps));
                if let Err(e) = r {
                    failures.push(e);
                }
            }
        }
    }
    assert!(failures.is_empty(), "{} of {ran} cases failed:\n  {}", failures.len(), failures.join("\n  "));
}

/// An embedding lookup with its cast (kiln_wgsl's `GatherCast`: a float16 table's rows converted to f32 as they are
/// gathered, one dispatch) gives each element's exact f32 value (the half crate's conversion), in both modes: odd
/// rows, negative and repeated indices, every class of f16 value (subnormals, infinities, NaN).
#[test]
fn f16_gather_with_a_cast_gives_exact_f32_rows_with_and_without_shader_f16() {
    let contexts = contexts();
    let mut rng = Rng(seed());
    let mut failures = vec![];
    for (native, ctx) in &contexts {
        for (rows, cols, idx) in
            [(11usize, 5usize, vec![3i64, 0, -1, 10, 7]), (7, 64, vec![6i64, 6, -7, 2]), (1000, 3, vec![999i64])]
        {
            let values = f16_values(&mut rng, rows * cols, false);
            let table = f16_tensor(&[rows, cols], values.clone());
            let ids = TTensor::from_shape(&[1, idx.len()], &idx).unwrap();
            let kernel = kiln_wgsl::Kernel::GatherCast { axis: 0, to: DatumType::F32 };
            let mut rec = Recorder::default();
            rec.poison = true;
            let (t, i) = (rec.upload(ctx, &table).unwrap(), rec.upload(ctx, &ids).unwrap());
            let out = kernel.encode(ctx, &mut rec, &[&t, &i], &SymbolValues::default()).unwrap();
            let read = rec.readback(&out);
            let bytes = pollster::block_on(rec.flush(ctx)).unwrap();
            let got = tensor_from_bytes(out.dt, &out.shape, &bytes[read.0]).unwrap();
            assert_eq!(got.shape(), &[1, idx.len(), cols]);
            let got: Vec<f32> = values_of(&got);
            for (k, g) in got.iter().enumerate() {
                let (j, c) = (k / cols, k % cols);
                let row = if idx[j] < 0 { idx[j] + rows as i64 } else { idx[j] } as usize;
                let want = f32::from(values[row * cols + c]);
                if !(g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan())) {
                    failures
                        .push(format!("{}: {rows}x{cols} by {idx:?}, element {k}: {g} vs {want}", mode_name(*native)));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{} failures:\n  {}", failures.len(), failures.join("\n  "));
}

fn values_of(t: &TTensor) -> Vec<f32> {
    values::<f32>(t).unwrap()
}

#[test]
fn f16_gather_and_copies_match_cpu_with_and_without_shader_f16() {
    let contexts = contexts();
    let mut rng = Rng(seed());
    let mut failures = vec![];
    let mut ran = 0;
    for (native, ctx) in &contexts {
        let mut run = |what: String, op: Box<dyn TypedOp>, inputs: Vec<TTensor>| {
            ran += 1;
            let what = format!("{}: {what}", mode_name(*native));
            if let Err(e) = cpu_and_gpu(ctx, op, &inputs).and_then(|(c, g)| compare(&what, &c, &g, 0)) {
                failures.push(e);
            }
        };
        let mut data = |shape: &[usize]| {
            let n = shape.iter().product();
            f16_tensor(shape, f16_values(&mut rng, n, false))
        };
        // Gather: odd rows (output words straddle rows), odd index counts, negative indices, both axes
        for (shape, axis, idx) in [
            (vec![11, 5], 0, vec![3i64, 0, -1, 10, 7]),
            (vec![11, 5], 0, vec![4i64]),
            (vec![9, 7], 1, vec![6i64, -7, 2]),
            (vec![3, 4, 3], 1, vec![1i64, 3, 0, 2, 2, -4]),
            (vec![1000, 64], 0, vec![999i64, 0, 512, 1, 77, 31, 300]),
        ] {
            let ids = TTensor::from_shape(&[idx.len()], &idx).unwrap();
            let what = format!("gather axis {axis} of {shape:?} by {idx:?}");
            run(what, Box::new(Gather { axis, output_type: None }), vec![data(&shape), ids]);
        }
        // Transpose (MoveAxis)
        for (shape, from, to) in
            [(vec![3, 5, 7], 0, 2), (vec![3, 5, 7], 2, 0), (vec![2, 3, 5, 3], 1, 3), (vec![7, 9], 1, 0)]
        {
            let what = format!("move axis {from} to {to} of {shape:?}");
            run(what, Box::new(AxisOp::Move(from, to)), vec![data(&shape)]);
        }
        // Expand
        for (shape, target) in [(vec![1, 5, 1], vec![3, 5, 7]), (vec![3, 1], vec![2, 3, 9]), (vec![1], vec![13])] {
            let what = format!("expand {shape:?} to {target:?}");
            let dims: Vec<TDim> = target.iter().map(|d| TDim::from(*d as i64)).collect();
            let op = MultiBroadcastTo { shape: dims.into() };
            run(what, Box::new(op), vec![data(&shape)]);
        }
        // Slice, and Slice with a step (Downsample), forwards and backwards
        for (shape, axis, start, end) in [(vec![5, 7, 3], 1, 1, 6), (vec![9, 5], 0, 3, 4), (vec![4, 9], 1, 0, 5)] {
            let what = format!("slice {start}..{end} of axis {axis} of {shape:?}");
            let op = Slice { axis, start: (start as i64).into(), end: (end as i64).into() };
            run(what, Box::new(op), vec![data(&shape)]);
        }
        for (shape, axis, stride, modulo) in [(vec![5, 9], 1, 2, 1), (vec![7, 3], 0, 3, 0), (vec![3, 7], 1, -1, 0)] {
            let what = format!("downsample axis {axis} of {shape:?} by {stride} from {modulo}");
            run(what, Box::new(Downsample { axis, stride, modulo }), vec![data(&shape)]);
        }
        // Concat: odd sizes along each axis (inputs that start and end mid-word)
        for (shapes, axis) in [
            (vec![vec![3, 5], vec![3, 1], vec![3, 7]], 1),
            (vec![vec![1, 5], vec![4, 5], vec![3, 5]], 0),
            (vec![vec![2, 3, 3], vec![2, 1, 3], vec![2, 5, 3]], 1),
            (vec![vec![2, 2, 16], vec![2, 0, 16], vec![2, 3, 16]], 1),
        ] {
            let what = format!("concat of {shapes:?} along {axis}");
            let inputs = shapes.iter().map(|s| data(s)).collect();
            run(what, Box::new(TypedConcat::new(axis)), inputs);
        }
    }
    assert!(failures.is_empty(), "{} of {ran} cases failed:\n  {}", failures.len(), failures.join("\n  "));
}

const FLOAT: i32 = 1;
const INT64: i32 = 7;
const FLOAT16: i32 = 10;
const UINT8: i32 = 2;

/// A one-node model: `inputs` (name, type, dims), `inits` initializers, output `y` of `out_type`.
fn one_node(
    op: &str,
    attrs: Vec<pb::AttributeProto>,
    inputs: &[(&str, i32, &[usize])],
    inits: Vec<pb::TensorProto>,
    node_inputs: &[&str],
    out_type: i32,
) -> Vec<u8> {
    model_of(vec![node(op, attrs, node_inputs, "y")], inputs, inits, out_type)
}

fn node(op: &str, attrs: Vec<pb::AttributeProto>, inputs: &[&str], output: &str) -> pb::NodeProto {
    pb::NodeProto {
        op_type: op.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        attribute: attrs,
        ..Default::default()
    }
}

/// A model of `nodes` whose output is `y` of `out_type` (opset 17).
fn model_of(
    nodes: Vec<pb::NodeProto>,
    inputs: &[(&str, i32, &[usize])],
    inits: Vec<pb::TensorProto>,
    out_type: i32,
) -> Vec<u8> {
    model_at(nodes, inputs, inits, out_type, 17)
}

/// [`model_of`] at `opset`.
fn model_at(
    nodes: Vec<pb::NodeProto>,
    inputs: &[(&str, i32, &[usize])],
    inits: Vec<pb::TensorProto>,
    out_type: i32,
    opset: i64,
) -> Vec<u8> {
    let graph = pb::GraphProto {
        name: "g".into(),
        node: nodes,
        input: inputs.iter().map(|(n, t, d)| value_info(n, *t, Some(d))).collect(),
        output: vec![value_info("y", out_type, None)],
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

fn gpu_options() -> SessionOptions {
    SessionOptions { execution_providers: vec![ExecutionProvider::WebGpu], ..Default::default() }
}

/// float16 models through a session: Cast float16 ↔ float, and Gather from a float16 initializer (an embedding
/// table kept float16 on the GPU), each with every compute node on the GPU, the output's element type as declared,
/// values as the CPU session's.
#[test]
fn f16_models_run_on_the_gpu_with_and_without_shader_f16() {
    let mut rng = Rng(seed());
    let (vocab, hidden) = (37usize, 9usize);
    let table: Vec<f16> = f16_values(&mut rng, vocab * hidden, false);
    let table_bytes: Vec<u8> = table.iter().flat_map(|h| h.to_le_bytes()).collect();
    let init = pb::TensorProto {
        name: "table".into(),
        data_type: FLOAT16,
        dims: vec![vocab as i64, hidden as i64],
        raw_data: table_bytes,
        ..Default::default()
    };
    type Feeds = Vec<(String, Tensor)>;
    let cases: Vec<(&str, Vec<u8>, Feeds)> = vec![
        (
            "cast float16 to float",
            one_node("Cast", vec![attr_int("to", 1)], &[("x", FLOAT16, &[3, 1001])], vec![], &["x"], FLOAT),
            vec![("x".into(), Tensor::from_vec(&[3, 1001], f16_values(&mut rng, 3003, false)).unwrap())],
        ),
        (
            "cast float to float16",
            one_node("Cast", vec![attr_int("to", 10)], &[("x", FLOAT, &[5, 77])], vec![], &["x"], FLOAT16),
            vec![("x".into(), Tensor::from_vec(&[5, 77], f32_values(&mut rng, 385, true)).unwrap())],
        ),
        (
            "gather from a float16 table",
            one_node("Gather", vec![], &[("ids", INT64, &[2, 3])], vec![init], &["table", "ids"], FLOAT16),
            vec![("ids".into(), Tensor::from_vec(&[2, 3], vec![0i64, 36, 5, -1, 17, 17]).unwrap())],
        ),
    ];
    let mut failures = vec![];
    for native in [true, false] {
        for (what, bytes, feeds) in &cases {
            let what = format!("{}: {what}", mode_name(native));
            let cpu = Session::from_bytes(bytes, &SessionOptions::default()).expect("cpu session");
            let gpu = in_mode(native, || Session::from_bytes(bytes, &gpu_options())).expect("gpu session");
            let Some(report) = gpu.gpu_placement() else {
                assert_no_gpu_adapter(gpu.provider_note());
                eprintln!("\n!!!!!!!! SKIPPING: no GPU adapter ({:?}) !!!!!!!!\n", gpu.provider_note());
                return;
            };
            let cpu_nodes: Vec<_> = report.nodes.iter().filter(|n| n.device == Device::Cpu).collect();
            if !cpu_nodes.is_empty() || report.nodes.is_empty() {
                failures.push(format!("{what}: not all on the GPU: {:?}", report.nodes));
                continue;
            }
            gpu.set_gpu_poison(true);
            let want = cpu.run(feeds.clone()).expect("cpu run");
            let got = match gpu.run(feeds.clone()) {
                Ok(g) => g,
                Err(e) => {
                    failures.push(format!("{what}: gpu run: {e}"));
                    continue;
                }
            };
            let (w, g) = (want.get("y").unwrap(), got.get("y").unwrap());
            let ulps = if native && what.contains("to float16") { 1 } else { 0 };
            let r = compare(&what, &w.clone().into_tract(), &g.clone().into_tract(), ulps);
            if let Err(e) = r {
                failures.push(e);
            }
        }
    }
    assert!(failures.is_empty(), "{} cases failed:\n  {}", failures.len(), failures.join("\n  "));
}

/// An initializer `name` of ONNX type `t` (float, float16 or uint8) and `dims` holding `raw` bytes.
fn tensor_init(name: &str, t: i32, dims: &[usize], raw: Vec<u8>) -> pb::TensorProto {
    pb::TensorProto {
        name: name.into(),
        data_type: t,
        dims: dims.iter().map(|d| *d as i64).collect(),
        raw_data: raw,
        ..Default::default()
    }
}

/// `v` as the raw bytes of ONNX type `t` (float16, else float).
fn float_bytes(v: &[f32], t: i32) -> Vec<u8> {
    if t == FLOAT16 {
        v.iter().flat_map(|x| f16::from_f32(*x).to_le_bytes()).collect()
    } else {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }
}

/// ONNX Attention (opset 23, `scale`) of q `[1, 1, s, d]` over two keys (k, v `[1, 1, 2, d]`), all of ONNX type `t`
/// (a float16 model's output cast to float: y is f32 either way, no f16 rounding of the result); and its feeds.
fn attention_case(
    t: i32,
    s: usize,
    d: usize,
    scale: f32,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
) -> (Vec<u8>, Vec<(String, Tensor)>) {
    let float16 = t == FLOAT16;
    let mut attention = node("Attention", vec![], &["q", "k", "v"], if float16 { "a" } else { "y" });
    attention.attribute.push(pb::AttributeProto {
        name: "scale".into(),
        f: scale,
        r#type: pb::attribute_proto::AttributeType::Float as i32,
        ..Default::default()
    });
    let mut nodes = vec![attention];
    if float16 {
        nodes.push(node("Cast", vec![attr_int("to", FLOAT as i64)], &["a"], "y"));
    }
    let dims: [(&str, i32, &[usize]); 3] = [("q", t, &[1, 1, s, d]), ("k", t, &[1, 1, 2, d]), ("v", t, &[1, 1, 2, d])];
    let bytes = model_at(nodes, &dims, vec![], FLOAT, 23);
    let feeds = [("q", q, s), ("k", k, 2), ("v", v, 2)]
        .into_iter()
        .map(|(n, x, rows)| {
            let x = Tensor::from_vec(&[1, 1, rows, d], x).unwrap();
            (n.to_string(), if float16 { x.cast(ElementType::F16).unwrap() } else { x })
        })
        .collect();
    (bytes, feeds)
}

/// A float16 model's matmuls multiply in float16 where the adapter has shader-f16 (kiln_wgsl's `QMatMul::f16_math`:
/// f16 products summed in f16 a packed word, or a 16-wide K step, at a time, those sums in f32), and in f32 where it
/// has not (KILN_GPU_NO_F16=1, Chrome's SwiftShader) — and an fp32 model in f32 either way, even with weights that
/// are all float16 values. Column 0 of each product is made to tell the two apart: A's row holds 64 (q4: 512), 1 and
/// again 64 (512) at K 0, 1 and 2 (8) over weights 32, 1 and -32 (4, 1, -4): in f32 the sum is 2048 + 1 - 2048 = 1,
/// in f16 2048 + 1 rounds to 2048 (ties to even) and the sum is 0. The other columns (random weights and A) against
/// the CPU provider's f32 within 3e-3 of the largest output. A float16 MatMul (the float-weight row kernels) and a
/// MatMulNBits with float16 scales, each for 1 row (one-row kernel, both tunings) and 70 (tiled), outputs cast to
/// float so that no f16 rounding of the result hides the products' precision.
#[test]
fn float16_models_multiply_in_float16_where_the_adapter_has_shader_f16() {
    use kiln_wgsl::Tuning::{Cpu, Gpu};
    let mut rng = Rng(seed());
    let (k, n) = (32usize, 16usize);
    let h = |v: f32| f16::from_f32(v).to_f32();
    // the float weight [K, N]: column 0 as above, the rest random float16 values
    let mut w: Vec<f32> = (0..k * n).map(|i| if i % n == 0 { 0.0 } else { h(rng.range(-0.5, 0.5)) }).collect();
    (w[0], w[n], w[2 * n]) = (32.0, 1.0, -32.0);
    // the 4-bit weight: codes [N, 1 block of 32] (zero point 8), column 0: 12, 9, 8.., 4 at K 8 (scale 1)
    let mut codes: Vec<u8> = (0..k * n).map(|_| (rng.next_u32() % 16) as u8).collect();
    codes[..k].fill(8);
    (codes[0], codes[1], codes[8]) = (12, 9, 4);
    let blob: Vec<u8> = codes.chunks(2).map(|c| c[0] | (c[1] << 4)).collect();
    let mut scales: Vec<f32> = (0..n).map(|_| h(rng.range(0.02, 0.1))).collect();
    scales[0] = 1.0;
    let w = &w;
    let matmul = |t: i32| {
        let graph_nodes = if t == FLOAT16 {
            vec![
                node("MatMul", vec![], &["x", "w"], "p"),
                node("Cast", vec![attr_int("to", FLOAT as i64)], &["p"], "y"),
            ]
        } else {
            vec![node("MatMul", vec![], &["x", "w"], "y")]
        };
        move |rows: usize| {
            let w = tensor_init("w", t, &[k, n], float_bytes(w, t));
            model_of(graph_nodes.clone(), &[("x", t, &[rows, k])], vec![w], FLOAT)
        }
    };
    let nbits = |rows: usize| {
        let mut q = node("MatMulNBits", vec![], &["x", "b", "scales"], "p");
        q.domain = "com.microsoft".into();
        q.attribute =
            ["K", "N", "bits", "block_size"].iter().zip([k, n, 4, 32]).map(|(a, v)| attr_int(a, v as i64)).collect();
        model_of(
            vec![q, node("Cast", vec![attr_int("to", FLOAT as i64)], &["p"], "y")],
            &[("x", FLOAT16, &[rows, k])],
            vec![
                tensor_init("b", UINT8, &[n, 1, 16], blob.clone()),
                tensor_init("scales", FLOAT16, &[n, 1], float_bytes(&scales, FLOAT16)),
            ],
            FLOAT,
        )
    };
    let (fp16, fp32) = (matmul(FLOAT16), matmul(FLOAT));
    type Model<'a> = &'a dyn Fn(usize) -> Vec<u8>;
    // (what, the model, A's value at K 0 and at the cancelling K, that K, a float16 model)
    let cases: [(&str, Model, f32, usize, bool); 3] = [
        ("float16 MatMul", &fp16, 64.0, 2, true),
        ("float16 MatMulNBits", &nbits, 512.0, 8, true),
        ("fp32 MatMul", &fp32, 64.0, 2, false),
    ];
    let mut failures = vec![];
    let mut skipped = true;
    for native in [true, false] {
        for (what, model, big, at, float16) in cases {
            // (rows, tuning, SessionOptions::gpu_f16_math): the one-row kernel in both tunings, the tiled one, and
            // float16 products turned off by the session's options
            let runs = [(1, Cpu, None), (1, Gpu, None), (70, Cpu, None), (1, Cpu, Some(false)), (70, Cpu, Some(false))];
            for (rows, tuning, f16_option) in runs {
                let what = format!("{}: {what}, {rows} row(s), {tuning:?} tuning, {f16_option:?}", mode_name(native));
                let bytes = model(rows);
                let mut x: Vec<f32> = (0..rows * k).map(|_| h(rng.range(-1.0, 1.0))).collect();
                for r in 0..rows {
                    (x[r * k], x[r * k + 1], x[r * k + at]) = (big, 1.0, big);
                }
                let xt = Tensor::from_vec(&[rows, k], x).unwrap();
                let xt = if float16 { xt.cast(ElementType::F16).unwrap() } else { xt };
                let feeds = vec![("x".to_string(), xt)];
                let cpu = Session::from_bytes(&bytes, &SessionOptions::default()).expect("cpu session");
                let opts = SessionOptions { gpu_tuning: Some(tuning), gpu_f16_math: f16_option, ..gpu_options() };
                let gpu = in_mode(native, || Session::from_bytes(&bytes, &opts)).expect("gpu session");
                let Some(report) = gpu.gpu_placement() else {
                    assert_no_gpu_adapter(gpu.provider_note());
                    eprintln!("\n!!!!!!!! SKIPPING: no GPU adapter ({:?}) !!!!!!!!\n", gpu.provider_note());
                    return;
                };
                if native && !report.shader_f16 {
                    eprintln!("!!!! the adapter has no shader-f16: only f32 arithmetic is tested here");
                    continue;
                }
                skipped = false;
                // the report counts the matmuls with float16 products: the one matmul of a float16 model with
                // shader-f16, none otherwise
                let f16_kernels = usize::from(native && float16 && f16_option != Some(false));
                if report.f16_kernels != f16_kernels {
                    failures.push(format!("{what}: {} matmuls in f16, not {f16_kernels}", report.f16_kernels));
                }
                let cpu_nodes: Vec<_> = report.nodes.iter().filter(|n| n.device == Device::Cpu).collect();
                if !cpu_nodes.is_empty() {
                    failures.push(format!("{what}: nodes on the CPU: {cpu_nodes:?}"));
                }
                gpu.set_gpu_poison(true);
                let want = cpu.run(feeds.clone()).expect("cpu run").get("y").unwrap().to_f64_vec().unwrap();
                let got = gpu.run(feeds).expect("gpu run").get("y").unwrap().to_f64_vec().unwrap();
                let col0 = if f16_kernels == 1 { 0.0 } else { 1.0 };
                let max = want.iter().fold(0f64, |m, v| m.max(v.abs()));
                for r in 0..rows {
                    if want[r * n] != 1.0 || got[r * n] != col0 {
                        failures.push(format!(
                            "{what}: row {r} column 0: gpu {}, not {col0} (cpu {})",
                            got[r * n],
                            want[r * n]
                        ));
                        break;
                    }
                }
                if let Some((i, (a, b))) = want
                    .iter()
                    .zip(&got)
                    .enumerate()
                    .find(|(i, (a, b))| i % n != 0 && ((*a - *b).is_nan() || (*a - *b).abs() > 3e-3 * max))
                {
                    failures.push(format!("{what}: y[{i}]: gpu {b} vs cpu {a} (max |ref| {max})"));
                }
            }
        }
    }
    if skipped {
        eprintln!("!!!! no shader-f16 on this adapter: float16 products untested");
    }
    assert!(failures.is_empty(), "{} cases failed:\n  {}", failures.len(), failures.join("\n  "));
}

/// A float16 model's fused attention multiplies in float16 where the adapter has shader-f16
/// (`AttentionSpec::f16_math`: q · k and weight · v in f16, q · k summed in f16 16 products at a time), in f32
/// where it has not, and an fp32 model's in f32 either way. ONNX Attention (opset 23, scale 1) over two keys, one
/// query (the decode kernel) or four (the prefill kernel): q holds 64, 1, 64 at channels 0, 4, 8 (one lane of the
/// decode kernel's four), key 0 holds 32, 1, -32 there — q · k0 is 1 in f32 and 0 in f16 (2048 + 1 rounds to 2048)
/// — and key 1 is zeros, so the first output channel (v0 = e0, v1 = 0) is e / (e + 1) = 0.7311 in f32 and 0.5 in f16.
/// The other channels (random values, the same scores) against the CPU provider's.
#[test]
fn float16_attention_multiplies_in_float16_where_the_adapter_has_shader_f16() {
    let mut rng = Rng(seed());
    let d = 32usize;
    let h = |v: f32| f16::from_f32(v).to_f32();
    let mut failures = vec![];
    let mut tested_f16 = false;
    for native in [true, false] {
        for float16 in [true, false] {
            for s in [1usize, 4] {
                let what = format!(
                    "{}: {} attention, {s} queries",
                    mode_name(native),
                    if float16 { "float16" } else { "fp32" }
                );
                let mut q = vec![0f32; s * d];
                for row in q.chunks_mut(d) {
                    (row[0], row[4], row[8]) = (64.0, 1.0, 64.0);
                }
                let mut k = vec![0f32; 2 * d];
                (k[0], k[4], k[8]) = (32.0, 1.0, -32.0);
                let mut v: Vec<f32> = (0..2 * d).map(|_| h(rng.range(-1.0, 1.0))).collect();
                (v[0], v[d]) = (1.0, 0.0);
                let vals = v.clone();
                let (bytes, feeds) = attention_case(if float16 { FLOAT16 } else { FLOAT }, s, d, 1.0, q, k, v);
                let cpu = Session::from_bytes(&bytes, &SessionOptions::default()).expect("cpu session");
                let gpu = in_mode(native, || Session::from_bytes(&bytes, &gpu_options())).expect("gpu session");
                let Some(report) = gpu.gpu_placement() else {
                    assert_no_gpu_adapter(gpu.provider_note());
                    eprintln!("\n!!!!!!!! SKIPPING: no GPU adapter ({:?}) !!!!!!!!\n", gpu.provider_note());
                    return;
                };
                if native && !report.shader_f16 {
                    eprintln!("!!!! the adapter has no shader-f16: only f32 arithmetic is tested here");
                    continue;
                }
                let f16_math = native && float16;
                tested_f16 |= f16_math;
                let attention_on_gpu = report.nodes.iter().any(|n| n.op == "KilnAttentionY" && n.device == Device::Gpu);
                if !attention_on_gpu || report.f16_kernels != usize::from(f16_math) {
                    failures.push(format!("{what}: {} kernels in f16; {:?}", report.f16_kernels, report.nodes));
                    continue;
                }
                gpu.set_gpu_poison(true);
                let want = cpu.run(feeds.clone()).expect("cpu run").get("y").unwrap().to_f64_vec().unwrap();
                let got = gpu.run(feeds).expect("gpu run").get("y").unwrap().to_f64_vec().unwrap();
                // every channel c: w0 · v0[c] + w1 · v1[c], the weights those of the scores (1, 0) in f32, (0, 0) in
                // f16 (whose products of weight and value round in f16: 1e-3)
                let e = std::f64::consts::E;
                let f32_weights = [e / (e + 1.0), 1.0 / (e + 1.0)];
                let (weights, tol) = if f16_math { ([0.5, 0.5], 1e-3) } else { (f32_weights, 1e-5) };
                let expect = |w: [f64; 2], c: usize| w[0] * vals[c] as f64 + w[1] * vals[d + c] as f64;
                for i in 0..s * d {
                    let c = i % d;
                    if (want[i] - expect(f32_weights, c)).abs() > 1e-5 || (got[i] - expect(weights, c)).abs() > tol {
                        failures.push(format!(
                            "{what}: y[{i}] {} on the GPU, not {} (cpu {}, f32 {})",
                            got[i],
                            expect(weights, c),
                            want[i],
                            expect(f32_weights, c)
                        ));
                        break;
                    }
                }
            }
        }
    }
    if !tested_f16 {
        eprintln!("!!!! no shader-f16 on this adapter: float16 products in attention untested");
    }
    assert!(failures.is_empty(), "{} cases failed:\n  {}", failures.len(), failures.join("\n  "));
}

/// f16 products in attention (shader-f16) scale q before rounding it to f16: with q and k of 70 in every one of 64
/// channels a raw q · k partial sum of 16 products is 78400, past f16's 65504, while the scaled one (scale 1/8) is
/// 9800. Key 0 (k = q) scores 39200, key 1 (k = -q) -39200: the output is v0, as on the CPU — not NaN.
#[test]
fn float16_attention_scores_of_large_q_and_k_stay_finite() {
    let mut rng = Rng(seed());
    let d = 64usize;
    for s in [1usize, 4] {
        let k: Vec<f32> = (0..2 * d).map(|i| if i < d { 70.0 } else { -70.0 }).collect();
        let v: Vec<f32> = (0..2 * d).map(|_| f16::from_f32(rng.range(-1.0, 1.0)).to_f32()).collect();
        let (bytes, feeds) = attention_case(FLOAT16, s, d, 0.125, vec![70f32; s * d], k, v.clone());
        let gpu = in_mode(true, || Session::from_bytes(&bytes, &gpu_options())).expect("gpu session");
        let Some(report) = gpu.gpu_placement() else {
            assert_no_gpu_adapter(gpu.provider_note());
            eprintln!("\n!!!!!!!! SKIPPING: no GPU adapter ({:?}) !!!!!!!!\n", gpu.provider_note());
            return;
        };
        if !report.shader_f16 {
            eprintln!("!!!! the adapter has no shader-f16: f16 attention scores untested");
            return;
        }
        assert_eq!(report.f16_kernels, 1, "{s} queries: the attention multiplies in f16");
        let cpu = Session::from_bytes(&bytes, &SessionOptions::default()).expect("cpu session");
        let want = cpu.run(feeds.clone()).expect("cpu run").get("y").unwrap().to_f64_vec().unwrap();
        let got = gpu.run(feeds).expect("gpu run").get("y").unwrap().to_f64_vec().unwrap();
        for (i, (w, g)) in want.iter().zip(&got).enumerate() {
            let v0 = v[i % d] as f64;
            assert!((w - v0).abs() <= 1e-6, "{s} queries: the CPU's y[{i}] {w}, not v0 {v0}");
            assert!((g - v0).abs() <= 1e-3, "{s} queries: y[{i}] {g} on the GPU, not v0 {v0}");
        }
    }
}

/// An f16 table over the adapter's binding limit (KILN_GPU_MAX_BINDING, read with the context) is cut along its
/// hidden axis into chunks under it, one Gather each and an f16 Concat (chunks of odd widths: rows that start and end
/// mid-word), then the rows' cast to f32, all on the GPU, bit for bit the CPU's rows.
#[test]
fn an_f16_table_over_the_binding_limit_is_split_and_gathered_on_the_gpu() {
    let mut rng = Rng(seed());
    // 3 MB as f16: over tract's 4 MiB budget once cast, so the f16 constant stays f16 (as SmolLM2's embedding)
    let (vocab, hidden) = (20_000usize, 75usize);
    let table: Vec<f16> = f16_values(&mut rng, vocab * hidden, false);
    let init = pb::TensorProto {
        name: "table".into(),
        data_type: FLOAT16,
        dims: vec![vocab as i64, hidden as i64],
        raw_data: table.iter().flat_map(|h| h.to_le_bytes()).collect(),
        ..Default::default()
    };
    // an f16 embedding cast to float then gathered (kiln gathers from the f16 table, then casts the rows)
    let nodes =
        vec![node("Cast", vec![attr_int("to", 1)], &["table"], "t32"), node("Gather", vec![], &["t32", "ids"], "y")];
    let bytes = model_of(nodes, &[("ids", INT64, &[2, 3])], vec![init], FLOAT);
    let feeds = vec![("ids".to_string(), Tensor::from_vec(&[2, 3], vec![19_999i64, 0, 3, -1, 5000, 77]).unwrap())];
    let cpu = Session::from_bytes(&bytes, &SessionOptions::default()).expect("cpu session");
    let want = cpu.run(feeds.clone()).expect("cpu run");
    for native in [true, false] {
        let mode = mode_name(native);
        // 1 000 000 bytes: 25 of the table's 40 000-byte columns a chunk, three chunks
        let gpu = in_mode(native, || {
            std::env::set_var("KILN_GPU_MAX_BINDING", "1000000");
            let s = Session::from_bytes(&bytes, &gpu_options());
            std::env::remove_var("KILN_GPU_MAX_BINDING");
            s
        })
        .expect("gpu session");
        let Some(report) = gpu.gpu_placement() else {
            assert_no_gpu_adapter(gpu.provider_note());
            eprintln!("\n!!!!!!!! SKIPPING: no GPU adapter ({:?}) !!!!!!!!\n", gpu.provider_note());
            return;
        };
        let gathers = report.nodes.iter().filter(|n| n.op == "Gather" && n.device == Device::Gpu).count();
        assert_eq!(gathers, 3, "{mode}: {:?}", report.nodes);
        assert!(report.nodes.iter().all(|n| n.device == Device::Gpu), "{mode}: {:?}", report.nodes);
        gpu.set_gpu_poison(true);
        let got = gpu.run(feeds.clone()).expect("gpu run");
        let (w, g) = (want.get("y").unwrap().clone().into_tract(), got.get("y").unwrap().clone().into_tract());
        compare(&format!("{mode}: split f16 gather"), &w, &g, 0).unwrap_or_else(|e| panic!("{e}"));
    }
}

/// The f16 ulp at magnitude `v`: 2^(e - 10) for a normal f16 of exponent e, 2^-24 below the normals.
fn f16_ulp(v: f64) -> f64 {
    let v = v.abs();
    if v < 2f64.powi(-14) {
        2f64.powi(-24)
    } else {
        2f64.powi(v.log2().floor() as i32 - 10)
    }
}

/// Reasons the shape-arithmetic (TDim) nodes stay on the CPU: another piece of work, not f16's.
fn shape_arithmetic(reason: &str) -> bool {
    reason.contains("TDim") || reason.contains("shape arithmetic")
}

/// An fp16 fixture on the GPU in both modes: no CPU node for an f16 reason (only shape arithmetic may stay there),
/// prefill and one decode step, every output (float16) against onnxruntime's.
///
/// Tolerance: each element within 2 f16 ulps at the reference's largest magnitude (max|ref|). Why: onnxruntime
/// computes these float16 graphs with float16 storage between some of its kernels, kiln in float32 throughout,
/// rounding to float16 once at the outputs — so kiln's outputs differ from the reference by the rounding of
/// values that are themselves a little apart: the float32 runs of these fixtures measure 1–2 f16 ulps at that
/// magnitude (this test prints its figures: 1 ulp at most on lavapipe, both paths), and 2 covers one rounding
/// flip each side, while a wrong element (a misplaced half-word, an unconverted value) is off by far more. An ulp-per-element bound is not usable: elements near zero come from cancellation, where a float32
/// difference in the 6th digit of their inputs is many ulps of the tiny result. With shader-f16 the matmuls
/// multiply in float16 (`QMatMul::f16_math`): each product carries one more f16 rounding, and after two layers an
/// output measures up to 2.25 ulps (tiny-gpt2's present.1.value): 4 there.
fn check_fp16_fixture(model: &str) {
    let dir = tiny_fixtures().join(model);
    let mut failures = vec![];
    for native in [true, false] {
        let mode = mode_name(native);
        let session = in_mode(native, || Session::from_path(dir.join("model.onnx"), &gpu_options()))
            .unwrap_or_else(|e| panic!("{model}: loading: {e}"));
        let Some(report) = session.gpu_placement() else {
            assert_no_gpu_adapter(session.provider_note());
            eprintln!(
                "\n!!!!!!!! SKIPPING {model} ON THE GPU: no GPU adapter ({:?}) !!!!!!!!\n",
                session.provider_note()
            );
            return;
        };
        let cpu_nodes: Vec<String> = report
            .nodes
            .iter()
            .filter(|n| n.device == Device::Cpu)
            .map(|n| format!("{} {} ({})", n.node, n.op, n.reason.clone().unwrap_or_default()))
            .collect();
        eprintln!(
            "{model} [{mode}]: {} of {} compute nodes on the GPU; on the CPU: {cpu_nodes:?}",
            report.gpu_nodes(),
            report.nodes.len()
        );
        let f16_reasons: Vec<_> = report
            .nodes
            .iter()
            .filter(|n| n.device == Device::Cpu && !n.reason.as_deref().is_some_and(shape_arithmetic))
            .collect();
        assert!(f16_reasons.is_empty(), "{model} [{mode}]: CPU nodes beside shape arithmetic: {f16_reasons:?}");
        let casts = report.nodes.iter().filter(|n| n.op == "Cast" && n.node.contains("kiln_f")).count();
        assert!(casts > 0, "{model}: no float16 interface casts in the placement");
        // the matmuls multiply in float16 exactly where the adapter's shader-f16 is in use
        assert_eq!(report.f16_kernels > 0, native, "{model} [{mode}]: {} matmuls in f16", report.f16_kernels);
        session.set_gpu_poison(true);
        for set in ["test_data_set_0", "test_data_set_1"] {
            let set_dir = dir.join(set);
            let feeds = read_inputs(&session, &set_dir);
            let expected = read_outputs(&session, &set_dir);
            let outputs = session.run(feeds).unwrap_or_else(|e| panic!("{model}/{set} [{mode}]: running: {e}"));
            for (name, want) in &expected {
                let got = outputs.get(name).unwrap_or_else(|| panic!("{model}/{set}: no output `{name}`"));
                assert_eq!(want.element_type(), ElementType::F16, "{model}/{set}/{name}: the reference's type");
                let (diff, ref_max) = max_diff(&format!("{model}/{set}/{name}"), got, want);
                let ulp = f16_ulp(ref_max);
                eprintln!(
                    "{model}/{set}/{name} [{mode}]: max|diff| {diff:.3e} = {:.2} f16 ulps at {ref_max:.3}",
                    diff / ulp
                );
                let ulps = if report.f16_kernels > 0 { 4.0 } else { 2.0 };
                if diff > ulps * ulp {
                    failures.push(format!(
                        "{set}/{name} [{mode}]: max|diff| {diff:.3e} > {ulps} f16 ulps ({:.3e}) at max|ref| {ref_max:.3}",
                        ulps * ulp
                    ));
                }
            }
        }
        let report = session.gpu_placement().unwrap_or_default();
        eprintln!("{model} [{mode}]: {} runs, {:?}", report.runs, report.counters);
        assert_eq!(report.counters.submits, report.runs, "{model} [{mode}]: more than one submit a run");
    }
    assert!(failures.is_empty(), "{model} on the GPU:\n  {}", failures.join("\n  "));
}

#[test]
fn tiny_llama_optimum_fp16_gpu() {
    check_fp16_fixture("tiny-llama/onnx_optimum_fp16");
}

#[test]
fn tiny_gpt2_optimum_fp16_gpu() {
    check_fp16_fixture("tiny-gpt2/onnx_optimum_fp16");
}
