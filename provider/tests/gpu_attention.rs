//! ONNX Attention (opset 23) on the GPU — kiln's fused kernel — against kiln's CPU op, on one-node models with
//! random inputs (a fresh seed per run, printed) and the GPU's output buffers poisoned (NaN) first: odd head
//! counts, GQA ratios 1/3/4, past lengths 0/1/odd/long (more than one K/V tile), one query and many, causal or
//! not, bool and float masks (broadcast, short last dim, padding, fully masked rows), head sizes 16/64/80 (and
//! different K and V head sizes), 3D and 4D inputs, scale and softcap; Y, present_key and present_value all
//! compared, and the attention node required on the GPU. Then RotaryEmbedding (opset 23) on the GPU, and the tiny
//! fixtures that use ONNX Attention.
//! Skips, loudly, only when the machine has no GPU adapter (CI installs lavapipe).
#![cfg(not(target_arch = "wasm32"))]

mod common;
mod graphs;

use graphs::{attr_int, fixed_value_info as value_info, gpu_available, options, seed, Rng};

use kiln_graph::tract_onnx::pb;
use kiln_provider::blocking::Session;
use kiln_provider::{Device, ExecutionProvider, SessionOptions, Tensor};

use prost::Message;

fn attr_float(name: &str, v: f32) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        f: v,
        r#type: pb::attribute_proto::AttributeType::Float as i32,
        ..Default::default()
    }
}

/// One node, its inputs (name, elem type, shape; an empty name is an absent optional input), its outputs.
fn one_node_model(
    op: &str,
    attrs: Vec<pb::AttributeProto>,
    inputs: &[(String, i32, Vec<usize>)],
    outputs: &[&str],
) -> Vec<u8> {
    let node = pb::NodeProto {
        op_type: op.into(),
        input: inputs.iter().map(|i| i.0.clone()).collect(),
        output: outputs.iter().map(|o| o.to_string()).collect(),
        attribute: attrs,
        ..Default::default()
    };
    let graph = pb::GraphProto {
        name: "g".into(),
        node: vec![node],
        input: inputs.iter().filter(|i| !i.0.is_empty()).map(|(n, t, s)| value_info(n, *t, Some(s))).collect(),
        output: outputs.iter().filter(|o| !o.is_empty()).map(|o| value_info(o, 1, None)).collect(),
        ..Default::default()
    };
    model_bytes(graph, 10, 23)
}

/// A model of `graph` in the default domain at `opset`, serialised.
fn model_bytes(graph: pb::GraphProto, ir_version: i64, opset: i64) -> Vec<u8> {
    pb::ModelProto {
        ir_version,
        opset_import: vec![pb::OperatorSetIdProto { domain: String::new(), version: opset }],
        graph: Some(graph),
        ..Default::default()
    }
    .encode_to_vec()
}

/// |a - b| <= tol·(1 + |a|), false on NaN.
fn close(a: f32, b: f32, tol: f32) -> bool {
    (a - b).abs() <= tol + tol * a.abs()
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mask {
    None,
    /// bool, [batch, 1, q_seq, total] with left padding (some batches, some leading keys masked) and random holes
    Bool,
    /// bool [q_seq, total - 2]: broadcast over batch and heads, its last dim short of total (the tail masked)
    BoolShort,
    /// float additive, [batch, q_heads, q_seq, total]: random values and -inf holes
    Float,
    /// float [batch, 1, 1, total] with the most negative f32 on padding (optimum's style)
    FloatPad,
    /// bool with every key of some rows masked (those rows are zeros)
    BoolEmptyRows,
}

#[derive(Clone, Copy, Debug)]
struct Case {
    batch: usize,
    hq: usize,
    hkv: usize,
    s: usize,
    /// new K/V length (the query length unless cross-attention)
    l: usize,
    past: usize,
    dk: usize,
    dv: usize,
    three_d: bool,
    causal: bool,
    mask: Mask,
    scale: Option<f32>,
    softcap: f32,
    /// past_key / past_value given with a length of 0 (a prefill that feeds an empty cache)
    empty_past: bool,
    /// nonpad_kv_seqlen (opset 24): batch b attends to its first total - 1 - 2b keys (at least one)
    nonpad: bool,
}

const BASE: Case = Case {
    batch: 1,
    hq: 4,
    hkv: 4,
    s: 5,
    l: 5,
    past: 0,
    dk: 16,
    dv: 16,
    three_d: false,
    causal: false,
    mask: Mask::None,
    scale: None,
    softcap: 0.0,
    empty_past: false,
    nonpad: false,
};

fn tensor_f32(rng: &mut Rng, dims: &[usize], lo: f32, hi: f32) -> Tensor {
    let n: usize = dims.iter().product();
    Tensor::from_vec(dims, (0..n).map(|_| rng.range(lo, hi)).collect::<Vec<f32>>()).unwrap()
}

fn run_case(rng: &mut Rng, c: Case) -> Result<(), String> {
    let what = format!("{c:?}");
    let total = c.past + c.l;
    let (qd, kd, vd) = if c.three_d {
        (vec![c.batch, c.s, c.hq * c.dk], vec![c.batch, c.l, c.hkv * c.dk], vec![c.batch, c.l, c.hkv * c.dv])
    } else {
        (vec![c.batch, c.hq, c.s, c.dk], vec![c.batch, c.hkv, c.l, c.dk], vec![c.batch, c.hkv, c.l, c.dv])
    };
    let mut inputs: Vec<(String, i32, Vec<usize>)> =
        vec![("q".into(), 1, qd.clone()), ("k".into(), 1, kd.clone()), ("v".into(), 1, vd.clone())];
    let mut feeds: Vec<(String, Tensor)> = vec![
        ("q".into(), tensor_f32(rng, &qd, -1.5, 1.5)),
        ("k".into(), tensor_f32(rng, &kd, -1.5, 1.5)),
        ("v".into(), tensor_f32(rng, &vd, -1.0, 1.0)),
    ];
    // the mask
    let bool_mask = |dims: Vec<usize>, f: &mut dyn FnMut(&[usize]) -> bool| -> Tensor {
        let n: usize = dims.iter().product();
        let mut data = Vec::with_capacity(n);
        for flat in 0..n {
            let mut ix = vec![0; dims.len()];
            let mut rem = flat;
            for d in (0..dims.len()).rev() {
                ix[d] = rem % dims[d];
                rem /= dims[d];
            }
            data.push(f(&ix));
        }
        Tensor::from_vec(&dims, data).unwrap()
    };
    let mask = match c.mask {
        Mask::None => None,
        Mask::Bool => {
            let dims = vec![c.batch, 1, c.s, total];
            // batch b is left-padded by b keys; ~1 in 7 of the rest masked at random
            let t = bool_mask(dims.clone(), &mut |ix| ix[3] >= ix[0].min(total - 1) && rng.next() > 0.15);
            Some((t, 9, dims))
        }
        Mask::BoolShort => {
            let dims = vec![c.s, total - 2];
            let t = bool_mask(dims.clone(), &mut |_| rng.next() > 0.2);
            Some((t, 9, dims))
        }
        Mask::BoolEmptyRows => {
            let dims = vec![c.batch, c.hq, c.s, total];
            let t = bool_mask(dims.clone(), &mut |ix| ix[2] % 2 == 1 && rng.next() > 0.3);
            Some((t, 9, dims))
        }
        Mask::Float => {
            let dims = vec![c.batch, c.hq, c.s, total];
            let n: usize = dims.iter().product();
            let data: Vec<f32> =
                (0..n).map(|_| if rng.next() < 0.1 { f32::NEG_INFINITY } else { rng.range(-2.0, 1.0) }).collect();
            Some((Tensor::from_vec(&dims, data).unwrap(), 1, dims))
        }
        Mask::FloatPad => {
            let dims = vec![c.batch, 1, 1, total];
            let n: usize = dims.iter().product();
            let data: Vec<f32> = (0..n).map(|i| if i % total < (i / total) * 2 { f32::MIN } else { 0.0 }).collect();
            Some((Tensor::from_vec(&dims, data).unwrap(), 1, dims))
        }
    };
    match mask {
        Some((t, ty, dims)) => {
            inputs.push(("mask".into(), ty, dims));
            feeds.push(("mask".into(), t));
        }
        None if c.past > 0 || c.empty_past || c.nonpad => inputs.push((String::new(), 1, vec![])),
        None => {}
    }
    if c.past > 0 || c.empty_past {
        let pk = vec![c.batch, c.hkv, c.past, c.dk];
        let pv = vec![c.batch, c.hkv, c.past, c.dv];
        inputs.push(("past_key".into(), 1, pk.clone()));
        inputs.push(("past_value".into(), 1, pv.clone()));
        feeds.push(("past_key".into(), tensor_f32(rng, &pk, -1.5, 1.5)));
        feeds.push(("past_value".into(), tensor_f32(rng, &pv, -1.0, 1.0)));
    } else if c.nonpad {
        inputs.push((String::new(), 1, vec![]));
        inputs.push((String::new(), 1, vec![]));
    }
    if c.nonpad {
        let n: Vec<i64> = (0..c.batch).map(|b| (total as i64 - 1 - 2 * b as i64).max(1)).collect();
        inputs.push(("nonpad".into(), 7, vec![c.batch]));
        feeds.push(("nonpad".into(), Tensor::from_vec(&[c.batch], n).unwrap()));
    }
    let mut attrs = vec![attr_int("is_causal", c.causal as i64)];
    if c.three_d {
        attrs.push(attr_int("q_num_heads", c.hq as i64));
        attrs.push(attr_int("kv_num_heads", c.hkv as i64));
    }
    if let Some(s) = c.scale {
        attrs.push(attr_float("scale", s));
    }
    if c.softcap > 0.0 {
        attrs.push(attr_float("softcap", c.softcap));
    }
    let outputs = ["y", "present_key", "present_value"];
    let mut bytes = one_node_model("Attention", attrs, &inputs, &outputs);
    if c.nonpad {
        let mut m = pb::ModelProto::decode(&bytes[..]).unwrap();
        m.opset_import[0].version = 24;
        bytes = m.encode_to_vec();
    }
    let cpu = Session::from_bytes(&bytes, &options(ExecutionProvider::Cpu)).map_err(|e| format!("{what}: cpu: {e}"))?;
    let want = cpu.run(feeds.clone()).map_err(|e| format!("{what}: cpu run: {e}"))?;
    // both kernel tunings (lavapipe is a CPU adapter: the GPU shapes, e.g. decode_main's 256 invocations, are
    // tested by forcing them)
    for tuning in [kiln_wgsl::Tuning::Cpu, kiln_wgsl::Tuning::Gpu] {
        let what = format!("{what} [{tuning:?} tuning]");
        let opts = SessionOptions { gpu_tuning: Some(tuning), ..options(ExecutionProvider::WebGpu) };
        let gpu = Session::from_bytes(&bytes, &opts).map_err(|e| format!("{what}: gpu load: {e}"))?;
        let report = gpu.gpu_placement().ok_or_else(|| format!("{what}: not on the GPU: {:?}", gpu.provider_note()))?;
        let att = report.nodes.iter().find(|n| n.op == "KilnAttentionY");
        if att.is_none_or(|n| n.device != Device::Gpu) {
            return Err(format!("{what}: the attention is not on the GPU: {:?}", report.nodes));
        }
        if let Some(n) = report.nodes.iter().find(|n| n.device == Device::Cpu) {
            return Err(format!("{what}: {} ({:?}) stays on the CPU", n.op, n.reason));
        }
        gpu.set_gpu_poison(true);
        let got = gpu.run(feeds.clone()).map_err(|e| format!("{what}: gpu run: {e}"))?;
        for name in outputs {
            let (w, g) = (want.output(name).unwrap(), got.output(name).unwrap());
            if w.dims() != g.dims() {
                return Err(format!("{what}: {name}: shape {:?} on the GPU, {:?} on the CPU", g.dims(), w.dims()));
            }
            let (w, g) = (w.to_vec::<f32>().unwrap(), g.to_vec::<f32>().unwrap());
            for (i, (a, b)) in w.iter().zip(&g).enumerate() {
                if !close(*a, *b, 2e-5) {
                    return Err(format!("{what}: {name}[{i}]: gpu {b} vs cpu {a}"));
                }
            }
        }
    }
    Ok(())
}

fn run_all(cases: &[Case]) {
    if !gpu_available() {
        return;
    }
    let mut rng = Rng(seed());
    let failures: Vec<String> = cases.iter().filter_map(|c| run_case(&mut rng, *c).err()).collect();
    assert!(failures.is_empty(), "{} of {} cases fail:\n{}", failures.len(), cases.len(), failures.join("\n"));
}

#[test]
fn attention_prefill_matches_cpu() {
    let mut cases = vec![];
    for (hq, hkv) in [(4, 4), (3, 1), (6, 2), (8, 2), (5, 5), (12, 3)] {
        for causal in [false, true] {
            for dk in [16, 64, 80] {
                cases.push(Case { hq, hkv, causal, dk, dv: dk, s: 7, l: 7, ..BASE });
            }
        }
    }
    // beyond one workgroup of rows (64) and one K/V tile, batches
    cases.push(Case { batch: 2, hq: 3, hkv: 1, s: 70, l: 70, causal: true, dk: 64, dv: 64, ..BASE });
    cases.push(Case { batch: 3, hq: 2, hkv: 2, s: 33, l: 33, causal: true, dk: 80, dv: 80, ..BASE });
    // K and V head sizes differ; cross-attention (L != S)
    cases.push(Case { dk: 16, dv: 80, ..BASE });
    cases.push(Case { s: 3, l: 11, dk: 64, dv: 16, ..BASE });
    cases.push(Case { s: 9, l: 4, causal: true, ..BASE });
    // one token, no past
    cases.push(Case { s: 1, l: 1, causal: true, hq: 3, hkv: 1, ..BASE });
    // an empty past (prefill feeding an empty cache)
    cases.push(Case { empty_past: true, causal: true, hq: 6, hkv: 2, ..BASE });
    cases.push(Case { empty_past: true, mask: Mask::Bool, batch: 2, three_d: true, ..BASE });
    run_all(&cases);
}

#[test]
fn attention_with_past_matches_cpu() {
    let mut cases = vec![];
    for (hq, hkv) in [(4, 4), (3, 1), (8, 2), (7, 7)] {
        for past in [1, 5, 129] {
            for s in [1, 4] {
                for causal in [false, true] {
                    cases.push(Case { hq, hkv, past, s, l: s, causal, dk: 64, dv: 64, ..BASE });
                }
            }
        }
    }
    cases.push(Case { batch: 2, hq: 9, hkv: 3, past: 300, s: 1, l: 1, causal: true, dk: 80, dv: 80, ..BASE });
    cases.push(Case { batch: 2, hq: 4, hkv: 1, past: 37, s: 1, l: 1, dk: 16, dv: 16, ..BASE });
    // enough workgroups that the keys are not split (the split path: the cases above with few batch × kv heads)
    cases.push(Case { batch: 4, hq: 16, hkv: 8, past: 150, s: 1, l: 1, causal: true, dk: 64, dv: 64, ..BASE });
    cases.push(Case { batch: 3, hq: 12, hkv: 12, past: 77, s: 2, l: 2, mask: Mask::Float, ..BASE });
    // long decode: many splits, splits past the causal limit and the mask's short last dim
    cases.push(Case { hq: 6, hkv: 2, past: 1500, s: 1, l: 1, causal: true, mask: Mask::BoolShort, ..BASE });
    cases.push(Case { hq: 3, hkv: 1, past: 600, s: 3, l: 3, causal: true, dk: 80, dv: 80, ..BASE });
    run_all(&cases);
}

#[test]
fn attention_masks_match_cpu() {
    let mut cases = vec![];
    for mask in [Mask::Bool, Mask::BoolShort, Mask::Float, Mask::FloatPad, Mask::BoolEmptyRows] {
        for (past, s) in [(0, 6), (3, 1), (17, 3), (70, 1)] {
            for causal in [false, true] {
                cases.push(Case { batch: 3, hq: 6, hkv: 2, past, s, l: s, causal, mask, ..BASE });
            }
        }
    }
    run_all(&cases);
}

#[test]
fn attention_3d_scale_softcap_match_cpu() {
    let mut cases = vec![];
    for three_d in [false, true] {
        for (hq, hkv) in [(4, 4), (6, 2), (3, 1)] {
            cases.push(Case { hq, hkv, three_d, s: 5, l: 5, causal: true, mask: Mask::Bool, batch: 2, ..BASE });
            cases.push(Case { hq, hkv, three_d, past: 9, s: 1, l: 1, dk: 80, dv: 80, ..BASE });
        }
    }
    cases.push(Case { scale: Some(0.37), ..BASE });
    cases.push(Case { softcap: 1.5, scale: Some(1.0), mask: Mask::Float, ..BASE });
    // nonpad_kv_seqlen, with and without past and mask, one query or many (split keys and not)
    cases.push(Case { nonpad: true, batch: 3, ..BASE });
    cases.push(Case { nonpad: true, batch: 2, past: 200, s: 1, l: 1, hq: 6, hkv: 2, mask: Mask::Bool, ..BASE });
    cases.push(Case { nonpad: true, batch: 4, past: 9, s: 3, l: 3, causal: true, three_d: true, ..BASE });
    cases.push(Case { softcap: 30.0, past: 4, s: 2, l: 2, causal: true, three_d: true, hq: 6, hkv: 3, ..BASE });
    // the decode kernel (one query): softcap with a float mask, head size 256 (four channels per invocation), split
    cases.push(Case { softcap: 2.0, past: 140, s: 1, l: 1, mask: Mask::Float, hq: 4, hkv: 2, ..BASE });
    cases.push(Case { past: 70, s: 1, l: 1, causal: true, dk: 256, dv: 256, hq: 2, hkv: 1, ..BASE });
    cases.push(Case { past: 200, s: 1, l: 1, dk: 48, dv: 200, hq: 3, hkv: 3, mask: Mask::FloatPad, ..BASE });
    run_all(&cases);
}

/// A tiny fixture that uses ONNX Attention (the dynamo exporter's sdpa at opset 23): every Attention node on the
/// GPU, prefill and one decode step matching onnxruntime's outputs at 1e-4.
fn fixture(model: &str) {
    use common::*;
    let dir = tiny_fixtures().join(model);
    let session = Session::from_path(dir.join("model.onnx"), &options(ExecutionProvider::WebGpu))
        .unwrap_or_else(|e| panic!("{model}: loading: {e}"));
    let Some(report) = session.gpu_placement() else {
        assert_no_gpu_adapter(session.provider_note());
        eprintln!("\n!!!!!!!! SKIPPING {model} ON THE GPU: no GPU adapter ({:?}) !!!!!!!!\n", session.provider_note());
        return;
    };
    session.set_gpu_poison(true);
    let att: Vec<_> = report.nodes.iter().filter(|n| n.op.starts_with("KilnAttention")).collect();
    assert!(!att.is_empty(), "{model}: no Attention node");
    for n in &att {
        assert_eq!(n.device, Device::Gpu, "{model}: {} stays on the CPU: {:?}", n.node, n.reason);
    }
    let cpu: Vec<String> = report
        .nodes
        .iter()
        .filter(|n| n.device == Device::Cpu)
        .map(|n| format!("{} ({})", n.op, n.reason.clone().unwrap_or_default()))
        .collect();
    eprintln!("{model}: {} of {} nodes on the GPU; on the CPU: {cpu:?}", report.gpu_nodes(), report.nodes.len());
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
    assert!(failures.is_empty(), "{model} on the GPU:\n  {}", failures.join("\n  "));
}

#[test]
fn tiny_gpt2_sdpa_op23_attention_on_gpu() {
    fixture("tiny-gpt2/onnx_dynamo_sdpa_op23");
}

#[test]
fn tiny_llama_sdpa_op23_attention_on_gpu() {
    fixture("tiny-llama/onnx_dynamo_sdpa_op23");
}

#[derive(Clone, Copy, Debug)]
struct Rope {
    batch: usize,
    heads: usize,
    seq: usize,
    head: usize,
    /// 0: the whole head
    rotary_dim: usize,
    interleaved: bool,
    three_d: bool,
    /// 0 none, 1 [batch, seq], 2 com.microsoft one-value offset (com.microsoft order for 1 and 2 when `microsoft`)
    positions: u8,
    microsoft: bool,
}

/// onnx's reference (op_rotary_embedding.py), written out: the independent check of both backends.
fn rope_reference(c: &Rope, x: &[f32], cos: &[f32], sin: &[f32], cols: usize, pos: &[i64]) -> Vec<f32> {
    let rot = if c.rotary_dim == 0 { c.head } else { c.rotary_dim };
    let half = rot / 2;
    let mut y = x.to_vec();
    for b in 0..c.batch {
        for h in 0..c.heads {
            for s in 0..c.seq {
                let base = if c.three_d {
                    (b * c.seq + s) * c.heads * c.head + h * c.head
                } else {
                    ((b * c.heads + h) * c.seq + s) * c.head
                };
                let row = match c.positions {
                    0 => b * c.seq + s,
                    1 => pos[b * c.seq + s] as usize,
                    _ => pos[0] as usize + s,
                };
                for i in 0..half {
                    let (i1, i2) = if c.interleaved { (2 * i, 2 * i + 1) } else { (i, i + half) };
                    let (co, si) = (cos[row * cols + i], sin[row * cols + i]);
                    y[base + i1] = co * x[base + i1] - si * x[base + i2];
                    y[base + i2] = si * x[base + i1] + co * x[base + i2];
                }
            }
        }
    }
    y
}

fn run_rope(rng: &mut Rng, c: Rope) -> Result<(), String> {
    let what = format!("{c:?}");
    let rot = if c.rotary_dim == 0 { c.head } else { c.rotary_dim };
    let xd = if c.three_d { vec![c.batch, c.seq, c.heads * c.head] } else { vec![c.batch, c.heads, c.seq, c.head] };
    let max_pos = 40;
    let cols = rot / 2;
    let cd = if c.positions == 0 { vec![c.batch, c.seq, cols] } else { vec![max_pos, cols] };
    let x = tensor_f32(rng, &xd, -2.0, 2.0);
    let cos = tensor_f32(rng, &cd, -1.0, 1.0);
    let sin = tensor_f32(rng, &cd, -1.0, 1.0);
    let pos: Vec<i64> = match c.positions {
        0 => vec![],
        1 => (0..c.batch * c.seq).map(|_| (rng.next() * max_pos as f32) as i64 % max_pos as i64).collect(),
        _ => vec![(max_pos - c.seq) as i64 - 3],
    };
    let pos_dims = if c.positions == 2 { vec![1] } else { vec![c.batch, c.seq] };
    let mut attrs = vec![attr_int("interleaved", c.interleaved as i64)];
    if c.three_d || c.rotary_dim > 0 {
        attrs.push(attr_int("num_heads", c.heads as i64));
    }
    if c.rotary_dim > 0 {
        attrs.push(attr_int("rotary_embedding_dim", c.rotary_dim as i64));
    }
    let mut inputs: Vec<(String, i32, Vec<usize>)> = vec![("x".into(), 1, xd.clone())];
    let mut feeds: Vec<(String, Tensor)> = vec![("x".into(), x.clone())];
    let p = ("pos".to_string(), 7, pos_dims.clone());
    let pt = ("pos".to_string(), Tensor::from_vec(&pos_dims, pos.clone()));
    if c.microsoft {
        inputs.push(p.clone());
        feeds.push((pt.0.clone(), pt.1.clone().unwrap()));
    }
    inputs.push(("cos".into(), 1, cd.clone()));
    inputs.push(("sin".into(), 1, cd.clone()));
    feeds.push(("cos".into(), cos.clone()));
    feeds.push(("sin".into(), sin.clone()));
    if !c.microsoft && c.positions > 0 {
        inputs.push(p);
        feeds.push((pt.0, pt.1.unwrap()));
    }
    let mut bytes = one_node_model("RotaryEmbedding", attrs, &inputs, &["y"]);
    if c.microsoft {
        let mut m = pb::ModelProto::decode(&bytes[..]).unwrap();
        m.opset_import.push(pb::OperatorSetIdProto { domain: "com.microsoft".into(), version: 1 });
        if let Some(g) = m.graph.as_mut() {
            g.node[0].domain = "com.microsoft".into();
        }
        bytes = m.encode_to_vec();
    }
    let want = rope_reference(
        &c,
        &x.to_vec::<f32>().unwrap(),
        &cos.to_vec::<f32>().unwrap(),
        &sin.to_vec::<f32>().unwrap(),
        cols,
        &pos,
    );
    let cpu = Session::from_bytes(&bytes, &options(ExecutionProvider::Cpu)).map_err(|e| format!("{what}: cpu: {e}"))?;
    let gpu = Session::from_bytes(&bytes, &options(ExecutionProvider::WebGpu))
        .map_err(|e| format!("{what}: gpu load: {e}"))?;
    let report = gpu.gpu_placement().ok_or_else(|| format!("{what}: not on the GPU: {:?}", gpu.provider_note()))?;
    if report.nodes.len() != 1 || report.nodes[0].device != Device::Gpu || report.nodes[0].op != "KilnRotaryEmbedding" {
        return Err(format!("{what}: not one GPU node: {:?}", report.nodes));
    }
    gpu.set_gpu_poison(true);
    for (backend, s) in [("cpu", &cpu), ("gpu", &gpu)] {
        let got = s.run(feeds.clone()).map_err(|e| format!("{what}: {backend} run: {e}"))?;
        let y = got.output("y").unwrap();
        if y.dims() != xd.as_slice() {
            return Err(format!("{what}: {backend}: shape {:?}", y.dims()));
        }
        for (i, (a, b)) in want.iter().zip(y.to_vec::<f32>().unwrap()).enumerate() {
            if !close(*a, b, 1e-5) {
                return Err(format!("{what}: {backend}: y[{i}] = {b}, reference {a}"));
            }
        }
    }
    Ok(())
}

#[test]
fn rotary_embedding_matches_reference_on_gpu() {
    if !gpu_available() {
        return;
    }
    let mut rng = Rng(seed());
    let base = Rope {
        batch: 2,
        heads: 3,
        seq: 5,
        head: 16,
        rotary_dim: 0,
        interleaved: false,
        three_d: false,
        positions: 1,
        microsoft: false,
    };
    let mut cases = vec![];
    for interleaved in [false, true] {
        for three_d in [false, true] {
            for positions in [0, 1] {
                for (head, rotary_dim) in [(16, 0), (64, 0), (80, 32), (6, 0)] {
                    cases.push(Rope { interleaved, three_d, positions, head, rotary_dim, ..base });
                }
            }
            cases.push(Rope { interleaved, three_d, seq: 1, batch: 1, heads: 5, ..base });
            // com.microsoft: position_ids [batch, seq] or one offset
            for positions in [1, 2] {
                cases.push(Rope { interleaved, three_d, positions, microsoft: true, ..base });
            }
        }
    }
    let failures: Vec<String> = cases.iter().filter_map(|c| run_rope(&mut rng, *c).err()).collect();
    assert!(failures.is_empty(), "{} of {} cases fail:\n{}", failures.len(), cases.len(), failures.join("\n"));
}

#[test]
fn tiny_gpt2_optimum_decomposed_attention_fused_on_gpu() {
    fixture("tiny-gpt2/onnx_optimum");
}

/// GQA: K read from before optimum's repeat_kv (Unsqueeze, Expand, Reshape), V as the grouped matmul reads it.
#[test]
fn tiny_llama_optimum_decomposed_gqa_attention_fused_on_gpu() {
    fixture("tiny-llama/onnx_optimum");
}

#[test]
fn tiny_gpt2_dynamo_eager_op20_decomposed_attention_fused_on_gpu() {
    fixture("tiny-gpt2/onnx_dynamo_eager_op20");
}

fn node(op: &str, inputs: &[&str], output: &str, attrs: Vec<pb::AttributeProto>) -> pb::NodeProto {
    pb::NodeProto {
        op_type: op.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        attribute: attrs,
        ..Default::default()
    }
}

/// `MatMul(Q, Transpose(K)) · scale (+ mask) → Softmax → MatMul(·, V)` as an exporter writes it (the scale a Mul or
/// a Div by a constant; the probabilities optionally through optimum's `Where(IsNaN(p), 0, p)`): one fused
/// attention node on the GPU, matching the CPU's evaluation of the decomposed graph.
#[test]
fn decomposed_attention_is_fused_on_gpu() {
    if !gpu_available() {
        return;
    }
    let mut rng = Rng(seed());
    let mut failures = vec![];
    for (b, h, s, t, d, dv, mask, div, nan_guard) in [
        (1, 4, 5, 5, 16, 16, true, false, true),
        (2, 3, 1, 40, 64, 64, true, true, false),
        (2, 2, 7, 9, 80, 32, false, false, false),
        (1, 6, 70, 70, 16, 16, true, false, true),
    ] {
        let what = format!("b {b} h {h} s {s} t {t} d {d} dv {dv} mask {mask} div {div} guard {nan_guard}");
        let mut nodes = vec![
            node(
                "Transpose",
                &["k"],
                "kt",
                vec![pb::AttributeProto {
                    name: "perm".into(),
                    ints: vec![0, 1, 3, 2],
                    r#type: pb::attribute_proto::AttributeType::Ints as i32,
                    ..Default::default()
                }],
            ),
            node("MatMul", &["q", "kt"], "qk", vec![]),
            node(if div { "Div" } else { "Mul" }, &["qk", "c"], "scaled", vec![]),
        ];
        let c = if div { (d as f32).sqrt() } else { 1.0 / (d as f32).sqrt() };
        let mut last = "scaled";
        if mask {
            nodes.push(node("Add", &["scaled", "mask"], "biased", vec![]));
            last = "biased";
        }
        nodes.push(node("Softmax", &[last], "p", vec![attr_int("axis", -1)]));
        let mut p = "p";
        if nan_guard {
            nodes.push(node("IsNaN", &["p"], "nan", vec![]));
            nodes.push(node("Where", &["nan", "zero", "p"], "p0", vec![]));
            p = "p0";
        }
        nodes.push(node("MatMul", &[p, "v"], "y", vec![]));
        let mut inputs = vec![
            value_info("q", 1, Some(&[b, h, s, d])),
            value_info("k", 1, Some(&[b, h, t, d])),
            value_info("v", 1, Some(&[b, h, t, dv])),
        ];
        let mut feeds = vec![
            ("q".to_string(), tensor_f32(&mut rng, &[b, h, s, d], -1.5, 1.5)),
            ("k".to_string(), tensor_f32(&mut rng, &[b, h, t, d], -1.5, 1.5)),
            ("v".to_string(), tensor_f32(&mut rng, &[b, h, t, dv], -1.0, 1.0)),
        ];
        if mask {
            // optimum's style: 0 or -inf per (batch, key), batch i padded by i keys on the left
            let data: Vec<f32> = (0..b * s * t)
                .map(|i| if i % t < i / (s * t) || (i % 7 == 3 && i % t != t - 1) { f32::NEG_INFINITY } else { 0.0 })
                .collect();
            inputs.push(value_info("mask", 1, Some(&[b, 1, s, t])));
            feeds.push(("mask".into(), Tensor::from_vec(&[b, 1, s, t], data).unwrap()));
        }
        let scalar = |name: &str, v: f32| pb::TensorProto {
            name: name.into(),
            data_type: 1,
            float_data: vec![v],
            ..Default::default()
        };
        let graph = pb::GraphProto {
            name: "g".into(),
            node: nodes,
            input: inputs,
            output: vec![value_info("y", 1, None)],
            initializer: vec![scalar("c", c), scalar("zero", 0.0)],
            ..Default::default()
        };
        let bytes = model_bytes(graph, 8, 17);
        let cpu = Session::from_bytes(&bytes, &options(ExecutionProvider::Cpu)).expect("cpu session");
        let want = cpu.run(feeds.clone()).expect("cpu run");
        let gpu = Session::from_bytes(&bytes, &options(ExecutionProvider::WebGpu)).expect("gpu session");
        let report = gpu.gpu_placement().expect("on the GPU");
        let fused = report.nodes.iter().filter(|n| n.op == "KilnAttentionY" && n.device == Device::Gpu).count();
        let softmax = report.nodes.iter().filter(|n| n.op.contains("Softmax")).count();
        if fused != 1 || softmax != 0 {
            failures.push(format!("{what}: not fused: {:?}", report.nodes));
            continue;
        }
        gpu.set_gpu_poison(true);
        let got = gpu.run(feeds).expect("gpu run");
        let (w, g) = (want.output("y").unwrap(), got.output("y").unwrap());
        assert_eq!(w.dims(), g.dims(), "{what}");
        let (w, g) = (w.to_vec::<f32>().unwrap(), g.to_vec::<f32>().unwrap());
        if let Some((i, (a, x))) = w.iter().zip(&g).enumerate().find(|(_, (a, x))| !close(**a, **x, 2e-5)) {
            // the decomposed graph without the NaN guard gives NaN on a fully masked row; the kernel zeros
            if !a.is_nan() || nan_guard {
                failures.push(format!("{what}: y[{i}]: gpu {x} vs cpu {a}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn konst_f32(name: &str, dims: &[usize], v: Vec<f32>) -> pb::TensorProto {
    pb::TensorProto {
        name: name.into(),
        data_type: 1,
        dims: dims.iter().map(|d| *d as i64).collect(),
        float_data: v,
        ..Default::default()
    }
}

fn konst_i64(name: &str, v: Vec<i64>) -> pb::TensorProto {
    pb::TensorProto { name: name.into(), data_type: 7, dims: vec![v.len() as i64], int64_data: v, ..Default::default() }
}

fn graph_model(nodes: Vec<pb::NodeProto>, inputs: Vec<pb::ValueInfoProto>, init: Vec<pb::TensorProto>) -> Vec<u8> {
    let graph = pb::GraphProto {
        name: "g".into(),
        node: nodes,
        input: inputs,
        output: vec![value_info("y", 1, None)],
        initializer: init,
        ..Default::default()
    };
    model_bytes(graph, 8, 17)
}

/// The CPU's y against the GPU's (output buffers poisoned), within `tol`.
fn compare_y(bytes: &[u8], feeds: Vec<(String, Tensor)>, what: &str, tol: f32) -> Result<(), String> {
    let cpu = Session::from_bytes(bytes, &options(ExecutionProvider::Cpu)).expect("cpu session");
    let want = cpu.run(feeds.clone()).expect("cpu run");
    let gpu = Session::from_bytes(bytes, &options(ExecutionProvider::WebGpu)).expect("gpu session");
    gpu.set_gpu_poison(true);
    let got = gpu.run(feeds).expect("gpu run");
    let (w, g) = (want.output("y").unwrap(), got.output("y").unwrap());
    if w.dims() != g.dims() {
        return Err(format!("{what}: dims {:?} vs {:?}", g.dims(), w.dims()));
    }
    let (w, g) = (w.to_vec::<f32>().unwrap(), g.to_vec::<f32>().unwrap());
    match w.iter().zip(&g).enumerate().find(|(_, (a, x))| !close(**a, **x, tol)) {
        Some((i, (a, x))) => Err(format!("{what}: y[{i}]: gpu {x} vs cpu {a}")),
        None => Ok(()),
    }
}

/// A decode step's attention over a KV cache as optimum writes it: `K = Concat(past_k, k)`, `V = Concat(past_v,
/// v)`, Q scaled by a constant before `MatMul(Q, Kᵀ)` (and K after), a float mask, the NaN guard. tract's declutter
/// splits `P·V` over V's concatenation (two slices, two matmuls, an add); the GPU lowering merges it back and the
/// whole attention is one fused node (no Softmax, no Slice left), matching the CPU's evaluation of the graph.
#[test]
fn kv_concat_attention_with_a_scaled_query_is_fused_on_gpu() {
    if !gpu_available() {
        return;
    }
    let mut rng = Rng(seed());
    let mut failures = vec![];
    for (b, h, s, past, d, q_scaled) in
        [(1, 3, 1, 7, 16, true), (1, 2, 1, 40, 64, true), (1, 4, 3, 5, 32, true), (1, 3, 1, 7, 16, false)]
    {
        let what = format!("b {b} h {h} s {s} past {past} d {d} q scaled {q_scaled}");
        let perm = pb::AttributeProto {
            name: "perm".into(),
            ints: vec![0, 1, 3, 2],
            r#type: pb::attribute_proto::AttributeType::Ints as i32,
            ..Default::default()
        };
        let mut nodes = vec![
            node("Concat", &["past_k", "k"], "kk", vec![attr_int("axis", 2)]),
            node("Concat", &["past_v", "v"], "vv", vec![attr_int("axis", 2)]),
            node("Transpose", &["kk"], "kt", vec![perm]),
            node("Mul", &["kt", "ck"], "kts", vec![]),
        ];
        let q = if q_scaled {
            nodes.push(node("Mul", &["q", "cq"], "qs", vec![]));
            "qs"
        } else {
            "q"
        };
        nodes.extend([
            node("MatMul", &[q, "kts"], "qk", vec![]),
            node("Add", &["qk", "mask"], "biased", vec![]),
            node("Softmax", &["biased"], "p", vec![attr_int("axis", -1)]),
            node("IsNaN", &["p"], "nan", vec![]),
            node("Where", &["nan", "zero", "p"], "p0", vec![]),
            node("MatMul", &["p0", "vv"], "y", vec![]),
        ]);
        let t = past + s;
        let dims = |n: usize| vec![b, h, n, d];
        let inputs = vec![
            value_info("q", 1, Some(&dims(s))),
            value_info("past_k", 1, Some(&dims(past))),
            value_info("k", 1, Some(&dims(s))),
            value_info("past_v", 1, Some(&dims(past))),
            value_info("v", 1, Some(&dims(s))),
            value_info("mask", 1, Some(&[b, 1, s, t])),
        ];
        let mask: Vec<f32> =
            (0..b * s * t).map(|i| if i % t > past + (i / t) % s { f32::NEG_INFINITY } else { 0.0 }).collect();
        let feeds = vec![
            ("q".to_string(), tensor_f32(&mut rng, &dims(s), -1.5, 1.5)),
            ("past_k".to_string(), tensor_f32(&mut rng, &dims(past), -1.5, 1.5)),
            ("k".to_string(), tensor_f32(&mut rng, &dims(s), -1.5, 1.5)),
            ("past_v".to_string(), tensor_f32(&mut rng, &dims(past), -1.0, 1.0)),
            ("v".to_string(), tensor_f32(&mut rng, &dims(s), -1.0, 1.0)),
            ("mask".to_string(), Tensor::from_vec(&[b, 1, s, t], mask).unwrap()),
        ];
        let quarter = (d as f32).powf(-0.25);
        let init = vec![
            konst_f32("cq", &[], vec![quarter]),
            konst_f32("ck", &[], vec![quarter]),
            konst_f32("zero", &[], vec![0.0]),
        ];
        let bytes = graph_model(nodes, inputs, init);
        // the merge of the split P·V (kiln_graph::passes::f16_fused_attention, on by default)
        let opts = SessionOptions { gpu_f16_fused_attention: Some(true), ..options(ExecutionProvider::WebGpu) };
        let gpu = Session::from_bytes(&bytes, &opts).expect("gpu session");
        let report = gpu.gpu_placement().expect("on the GPU");
        let fused = report.nodes.iter().filter(|n| n.op == "KilnAttentionY" && n.device == Device::Gpu).count();
        let left: Vec<&str> = report
            .nodes
            .iter()
            .filter(|n| n.op.contains("Softmax") || n.op == "Slice" || n.op.contains("MatMul"))
            .map(|n| n.op.as_str())
            .collect();
        if fused != 1 || !left.is_empty() {
            failures.push(format!("{what}: not fused ({fused} attention nodes, left {left:?})"));
            continue;
        }
        if let Err(e) = compare_y(&bytes, feeds, &what, 2e-5) {
            failures.push(e);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// rotate_half RoPE with its cos / sin rows gathered from constant `[positions, head]` tables by position ids
/// (bench/make_llama.py, transformers' older rotary cache): one rotary dispatch on the GPU when each table's two
/// halves are equal (the rotation reading its rows by position: no gather), left decomposed (and still right) when
/// they are not; both against the CPU.
#[test]
fn rope_with_gathered_tables_is_fused_on_gpu() {
    if !gpu_available() {
        return;
    }
    let mut rng = Rng(seed());
    let mut failures = vec![];
    for (b, h, s, d, equal_halves) in [(1, 3, 1, 64, true), (2, 2, 5, 16, true), (1, 2, 4, 16, false)] {
        let what = format!("b {b} h {h} s {s} d {d} equal halves {equal_halves}");
        let positions = 32usize;
        let half = d / 2;
        let mut cos_t = vec![];
        let mut sin_t = vec![];
        for p in 0..positions {
            for i in 0..d {
                let f = (i % half) as f32 + if equal_halves || i < half { 0.0 } else { 0.5 };
                let a = p as f32 / 10000f32.powf(2.0 * f / d as f32);
                cos_t.push(a.cos());
                sin_t.push(a.sin());
            }
        }
        let nodes = vec![
            node("Gather", &["cos_t", "pos"], "cg", vec![]),
            node("Gather", &["sin_t", "pos"], "sg", vec![]),
            node("Unsqueeze", &["cg", "one"], "cos", vec![]),
            node("Unsqueeze", &["sg", "one"], "sin", vec![]),
            node("Slice", &["x", "zero", "half", "last"], "x1", vec![]),
            node("Slice", &["x", "half", "full", "last"], "x2", vec![]),
            node("Neg", &["x2"], "nx2", vec![]),
            node("Concat", &["nx2", "x1"], "rot", vec![attr_int("axis", -1)]),
            node("Mul", &["x", "cos"], "xc", vec![]),
            node("Mul", &["rot", "sin"], "rs", vec![]),
            node("Add", &["xc", "rs"], "y", vec![]),
        ];
        let inputs = vec![value_info("x", 1, Some(&[b, h, s, d])), value_info("pos", 7, Some(&[b, s]))];
        let init = vec![
            konst_f32("cos_t", &[positions, d], cos_t),
            konst_f32("sin_t", &[positions, d], sin_t),
            konst_i64("one", vec![1]),
            konst_i64("zero", vec![0]),
            konst_i64("half", vec![half as i64]),
            konst_i64("full", vec![d as i64]),
            konst_i64("last", vec![-1]),
        ];
        let pos: Vec<i64> = (0..b * s).map(|i| ((i * 7 + 3) % positions) as i64).collect();
        let feeds = vec![
            ("x".to_string(), tensor_f32(&mut rng, &[b, h, s, d], -2.0, 2.0)),
            ("pos".to_string(), Tensor::from_vec(&[b, s], pos).unwrap()),
        ];
        let bytes = graph_model(nodes, inputs, init);
        let gpu = Session::from_bytes(&bytes, &options(ExecutionProvider::WebGpu)).expect("gpu session");
        let report = gpu.gpu_placement().expect("on the GPU");
        let rope = report.nodes.iter().filter(|n| n.op == "KilnRotaryEmbedding" && n.device == Device::Gpu).count();
        let neg = report.nodes.iter().filter(|n| n.op.contains("Neg")).count();
        let cpu = report.nodes.iter().filter(|n| n.device == Device::Cpu).count();
        let fused_as_expected = if equal_halves { rope == 1 && neg == 0 } else { rope == 0 && neg == 1 };
        if !fused_as_expected || cpu != 0 {
            failures.push(format!("{what}: {rope} rotary nodes, {neg} Neg, {cpu} on the CPU: {:?}", report.nodes));
            continue;
        }
        if equal_halves {
            // the rotation reads its table rows by position itself: one dispatch, no gathers
            let before = gpu.gpu_placement().expect("on the GPU").counters.dispatches;
            gpu.run(feeds.clone()).expect("gpu run");
            let ran = gpu.gpu_placement().expect("on the GPU").counters.dispatches - before;
            if ran != 1 {
                failures.push(format!("{what}: {ran} dispatches a run"));
            }
        }
        if let Err(e) = compare_y(&bytes, feeds, &what, 1e-5) {
            failures.push(e);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Decomposed attention with a boolean mask applied as `Where(mask, scores, −inf)` (or the float minimum), and
/// with a softcap `c·tanh(x/c)` on the scaled scores (before the mask, as Gemma 2 exports it): one fused attention
/// node on the GPU, matching the CPU's evaluation of the graph. No row is fully masked (the decomposed graph gives
/// NaN or a uniform average there, the kernel zeros).
#[test]
fn decomposed_attention_with_where_masks_and_softcap_is_fused_on_gpu() {
    if !gpu_available() {
        return;
    }
    let mut rng = Rng(seed());
    let mut failures = vec![];
    // (b, h, s, t, d, mask: 0 none / 1 Where −inf / 2 Where float min / 3 additive, softcap)
    for (b, h, s, t, d, mask, cap) in [
        (1, 3, 1, 9, 16, 1, 0.0),
        (2, 2, 4, 6, 32, 2, 0.0),
        (1, 2, 5, 5, 16, 1, 5.0),
        (1, 4, 1, 33, 64, 3, 2.0),
        (2, 2, 3, 7, 16, 0, 30.0),
    ] {
        let what = format!("b {b} h {h} s {s} t {t} d {d} mask {mask} softcap {cap}");
        let perm = pb::AttributeProto {
            name: "perm".into(),
            ints: vec![0, 1, 3, 2],
            r#type: pb::attribute_proto::AttributeType::Ints as i32,
            ..Default::default()
        };
        let mut nodes = vec![
            node("Transpose", &["k"], "kt", vec![perm]),
            node("MatMul", &["q", "kt"], "qk", vec![]),
            node("Mul", &["qk", "c"], "scores", vec![]),
        ];
        let mut last = "scores";
        if cap > 0.0 {
            nodes.push(node("Div", &["scores", "cap"], "shrunk", vec![]));
            nodes.push(node("Tanh", &["shrunk"], "th", vec![]));
            nodes.push(node("Mul", &["th", "cap"], "capped", vec![]));
            last = "capped";
        }
        match mask {
            1 | 2 => nodes.push(node("Where", &["mask", last, "fill"], "masked", vec![])),
            3 => nodes.push(node("Add", &[last, "mask"], "masked", vec![])),
            _ => {}
        }
        if mask != 0 {
            last = "masked";
        }
        nodes.push(node("Softmax", &[last], "p", vec![attr_int("axis", -1)]));
        nodes.push(node("MatMul", &["p", "v"], "y", vec![]));
        let mut inputs = vec![
            value_info("q", 1, Some(&[b, h, s, d])),
            value_info("k", 1, Some(&[b, h, t, d])),
            value_info("v", 1, Some(&[b, h, t, d])),
        ];
        let mut feeds = vec![
            ("q".to_string(), tensor_f32(&mut rng, &[b, h, s, d], -2.0, 2.0)),
            ("k".to_string(), tensor_f32(&mut rng, &[b, h, t, d], -2.0, 2.0)),
            ("v".to_string(), tensor_f32(&mut rng, &[b, h, t, d], -1.0, 1.0)),
        ];
        // causal-like with a hole per batch; key 0 always visible
        let keep: Vec<bool> =
            (0..b * s * t).map(|i| i % t == 0 || (i % t <= t - s + (i / t) % s && i % t != 1 + i / (s * t))).collect();
        if mask == 3 {
            let data: Vec<f32> = keep.iter().map(|k| if *k { 0.0 } else { f32::NEG_INFINITY }).collect();
            inputs.push(value_info("mask", 1, Some(&[b, 1, s, t])));
            feeds.push(("mask".into(), Tensor::from_vec(&[b, 1, s, t], data).unwrap()));
        } else if mask != 0 {
            inputs.push(value_info("mask", 9, Some(&[b, 1, s, t])));
            feeds.push(("mask".into(), Tensor::from_vec(&[b, 1, s, t], keep).unwrap()));
        }
        let fill = if mask == 2 { f32::MIN } else { f32::NEG_INFINITY };
        let init = vec![
            konst_f32("c", &[], vec![1.0 / (d as f32).sqrt()]),
            konst_f32("cap", &[], vec![cap]),
            konst_f32("fill", &[], vec![fill]),
        ];
        let bytes = graph_model(nodes, inputs, init);
        let gpu = Session::from_bytes(&bytes, &options(ExecutionProvider::WebGpu)).expect("gpu session");
        let report = gpu.gpu_placement().expect("on the GPU");
        let fused = report.nodes.iter().filter(|n| n.op == "KilnAttentionY" && n.device == Device::Gpu).count();
        let softmax = report.nodes.iter().filter(|n| n.op.contains("Softmax")).count();
        if fused != 1 || softmax != 0 {
            failures.push(format!("{what}: not fused: {:?}", report.nodes.iter().map(|n| &n.op).collect::<Vec<_>>()));
            continue;
        }
        if let Err(e) = compare_y(&bytes, feeds, &what, 2e-5) {
            failures.push(e);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A layer's q and k rotated by RotaryEmbedding nodes that share cos / sin / position_ids (different head counts:
/// GQA) run as one GPU dispatch (two outputs), and both match onnx's reference like the CPU does. With
/// KILN_GPU_FUSION=0 it would be two dispatches.
#[test]
fn rotary_embeddings_sharing_caches_run_as_one_dispatch() {
    if !gpu_available() {
        return;
    }
    let mut rng = Rng(seed());
    let mut failures = vec![];
    for (interleaved, three_d, rotary_dim, seq) in [(false, false, 0, 5), (true, true, 0, 1), (false, true, 8, 3)] {
        let (batch, hq, hkv, head, max_pos) = (2, 9, 3, 16, 40);
        let rot = if rotary_dim == 0 { head } else { rotary_dim };
        let cols = rot / 2;
        let c =
            |heads| Rope { batch, heads, seq, head, rotary_dim, interleaved, three_d, positions: 1, microsoft: false };
        let dims = |h: usize| if three_d { vec![batch, seq, h * head] } else { vec![batch, h, seq, head] };
        let what = format!("interleaved {interleaved} 3d {three_d} rotary_dim {rotary_dim} seq {seq}");
        let (q, k) = (tensor_f32(&mut rng, &dims(hq), -2.0, 2.0), tensor_f32(&mut rng, &dims(hkv), -2.0, 2.0));
        let cos = tensor_f32(&mut rng, &[max_pos, cols], -1.0, 1.0);
        let sin = tensor_f32(&mut rng, &[max_pos, cols], -1.0, 1.0);
        let pos: Vec<i64> = (0..batch * seq).map(|i| (7 * i as i64 + 3) % max_pos as i64).collect();
        let attrs = |h: usize| {
            let mut a = vec![attr_int("interleaved", interleaved as i64)];
            if three_d || rotary_dim > 0 {
                a.push(attr_int("num_heads", h as i64));
            }
            if rotary_dim > 0 {
                a.push(attr_int("rotary_embedding_dim", rotary_dim as i64));
            }
            a
        };
        let graph = pb::GraphProto {
            name: "g".into(),
            node: vec![
                node("RotaryEmbedding", &["q", "cos", "sin", "pos"], "qr", attrs(hq)),
                node("RotaryEmbedding", &["k", "cos", "sin", "pos"], "kr", attrs(hkv)),
            ],
            input: vec![
                value_info("q", 1, Some(&dims(hq))),
                value_info("k", 1, Some(&dims(hkv))),
                value_info("cos", 1, Some(&[max_pos, cols])),
                value_info("sin", 1, Some(&[max_pos, cols])),
                value_info("pos", 7, Some(&[batch, seq])),
            ],
            output: vec![value_info("qr", 1, None), value_info("kr", 1, None)],
            ..Default::default()
        };
        let bytes = model_bytes(graph, 10, 23);
        let feeds = vec![
            ("q".to_string(), q.clone()),
            ("k".to_string(), k.clone()),
            ("cos".to_string(), cos.clone()),
            ("sin".to_string(), sin.clone()),
            ("pos".to_string(), Tensor::from_vec(&[batch, seq], pos.clone()).unwrap()),
        ];
        let (cv, sv) = (cos.to_vec::<f32>().unwrap(), sin.to_vec::<f32>().unwrap());
        let want = [
            ("qr", rope_reference(&c(hq), &q.to_vec::<f32>().unwrap(), &cv, &sv, cols, &pos)),
            ("kr", rope_reference(&c(hkv), &k.to_vec::<f32>().unwrap(), &cv, &sv, cols, &pos)),
        ];
        let cpu = Session::from_bytes(&bytes, &options(ExecutionProvider::Cpu)).expect("cpu session");
        let gpu = Session::from_bytes(&bytes, &options(ExecutionProvider::WebGpu)).expect("gpu session");
        gpu.set_gpu_poison(true);
        for (backend, s) in [("cpu", &cpu), ("gpu", &gpu)] {
            let got = s.run(feeds.clone()).unwrap_or_else(|e| panic!("{what}: {backend}: {e}"));
            for (name, w) in &want {
                let y = got.output(name).unwrap().to_vec::<f32>().unwrap();
                if let Some((i, (a, b))) = w.iter().zip(&y).enumerate().find(|(_, (a, b))| !close(**a, **b, 1e-5)) {
                    failures.push(format!("{what}: {backend}: {name}[{i}] = {b}, reference {a}"));
                }
                if y.len() != w.len() {
                    failures.push(format!("{what}: {backend}: {name} has {} values, not {}", y.len(), w.len()));
                }
            }
        }
        let report = gpu.gpu_placement().expect("gpu report");
        let per_run = report.counters.dispatches as f64 / report.runs.max(1) as f64;
        // the poison fills are uploads, not dispatches
        if per_run != 1.0 {
            failures.push(format!("{what}: {per_run} dispatches per run, not 1: {:?}", report.counters));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
