//! com.microsoft GroupQueryAttention as kiln ops: the node expands into kiln's own pieces, each with a CPU
//! evaluation (the reference) and a GPU kernel — the packed-QKV split (slices), [`RotaryOp`] on Q and K with
//! positions from `seqlens_k`, [`GqaKvOp`] writing present_key / present_value, and [`AttentionOp`] in its
//! GroupQueryAttention mode (`seqlens`), which kiln's GPU lowering runs as its fused attention kernel reading the
//! shared K/V heads in place.
//!
//! Semantics (onnxruntime's CPU kernel):
//! - query `[batch, seq, num_heads·head]`, key / value `[batch, seq, kv_num_heads·head]`, or packed QKV in query
//!   (`[batch, seq, (num_heads + 2·kv_num_heads)·head]`, key and value absent);
//! - `seqlens_k[b]` is batch b's total length − 1; its queries sit after `past_b = max(seqlens_k[b] + 1 − seq, 0)`
//!   keys (0 for a first prompt) and attend causally: query i sees keys `j <= past_b + i` and `j <= seqlens_k[b]`,
//!   and with `local_window_size = w >= 0` only those with `past_b + i − j < w`;
//! - present (BNSH): the first `past_b` rows of past, then the new keys/values, then zeros (rows a batch does not
//!   use); its length is past + seq (`total_sequence_length` is not read: the shared past/present buffer layout,
//!   whose present is as long as its past, is not supported);
//! - `do_rotary`: RoPE (NeoX halves, or interleaved pairs) on Q and K at positions `past_b + s`, the rotary dim
//!   twice the caches' width;
//! - `scale` (default `1/sqrt(head)`), `softcap` (`c·tanh(x/c)` after the scale).
//!
//! Rejected with an error naming the attribute or input: `smooth_softmax`, `qk_output`, quantized KV caches,
//! `position_ids`, `attention_bias`, `head_sink` and the later inputs.

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_core::internal as core;
use tract_onnx::tract_core::ops::array::Slice;
use tract_onnx::tract_hir::internal::*;

use crate::attention::{AttentionConfig, AttentionOp};
use crate::rotary::{RotaryConfig, RotaryOp};
use crate::BuildResult;

fn given(names: &[String], ix: usize) -> bool {
    names.get(ix).is_some_and(|n| !n.is_empty())
}

pub fn build(ctx: &ParsingContext, node: &NodeProto) -> BuildResult {
    if node.domain != "com.microsoft" {
        return crate::tract_builder(ctx, node);
    }
    let int = |name: &str, default: i64| -> TractResult<i64> { Ok(node.get_attr_opt::<i64>(name)?.unwrap_or(default)) };
    let num_heads = int("num_heads", 0)?;
    let kv_num_heads = int("kv_num_heads", 0)?;
    ensure!(
        num_heads > 0 && kv_num_heads > 0 && num_heads % kv_num_heads == 0,
        "GroupQueryAttention: num_heads={num_heads} must be a positive multiple of kv_num_heads={kv_num_heads}"
    );
    let scale = node.get_attr_opt::<f32>("scale")?.filter(|s| *s != 0.0);
    if let Some(s) = scale {
        ensure!(s.is_finite(), "GroupQueryAttention: scale={s} is not finite");
    }
    let softcap = node.get_attr_opt::<f32>("softcap")?.unwrap_or(0.0);
    ensure!(softcap >= 0.0 && softcap.is_finite(), "GroupQueryAttention: softcap={softcap} must be finite and >= 0");
    let window = int("local_window_size", -1)?;
    let window = (window >= 0).then_some(window as usize);
    for (attr, what) in [("smooth_softmax", "smooth_softmax=1"), ("qk_output", "qk_output != 0")] {
        ensure!(int(attr, 0)? == 0, "GroupQueryAttention: unsupported attribute {what}");
    }
    for quant in ["k_quant_type", "v_quant_type"] {
        let mode = node.get_attr_opt::<String>(quant)?.unwrap_or_else(|| "NONE".to_string());
        ensure!(mode == "NONE", "GroupQueryAttention: unsupported attribute {quant}={mode} (quantized KV cache)");
    }
    let do_rotary = int("do_rotary", 0)? != 0;
    let interleaved = int("rotary_interleaved", 0)? != 0;
    ensure!(given(&node.input, 0), "GroupQueryAttention needs its query");
    let packed = !given(&node.input, 1) && !given(&node.input, 2);
    ensure!(
        packed || (given(&node.input, 1) && given(&node.input, 2)),
        "GroupQueryAttention: key and value must be given together (or neither, for packed QKV)"
    );
    ensure!(
        given(&node.input, 3) == given(&node.input, 4),
        "GroupQueryAttention: past_key and past_value must be given together"
    );
    ensure!(given(&node.input, 5), "GroupQueryAttention needs seqlens_k");
    ensure!(given(&node.input, 6), "GroupQueryAttention needs total_sequence_length");
    if do_rotary {
        ensure!(
            given(&node.input, 7) && given(&node.input, 8),
            "GroupQueryAttention: do_rotary=1 needs cos_cache and sin_cache"
        );
    }
    let later = ["position_ids", "attention_bias", "head_sink", "k_scale", "v_scale", "q_norm_weight", "k_norm_weight"];
    for (i, name) in later.iter().enumerate() {
        ensure!(!given(&node.input, 9 + i), "GroupQueryAttention: unsupported input {name}");
    }
    ensure!(node.input.len() <= 9 + later.len(), "GroupQueryAttention: too many inputs");
    // position of each ONNX input among the inputs given (tract drops empty names)
    let mut slots = [None; 9];
    let mut next = 0;
    for (i, slot) in slots.iter_mut().enumerate() {
        if given(&node.input, i) {
            *slot = Some(next);
            next += 1;
        }
    }
    let outputs = [0, 1, 2].map(|i| given(&node.output, i));
    ensure!(outputs.iter().any(|o| *o), "GroupQueryAttention has no output");
    ensure!(!given(&node.output, 3), "GroupQueryAttention: unsupported output output_qk");
    let gqa = Gqa {
        num_heads: num_heads as usize,
        kv_num_heads: kv_num_heads as usize,
        scale,
        softcap,
        window,
        rotary: do_rotary.then_some(interleaved),
        packed,
        slots,
        n_inputs: next,
        outputs,
    };
    Ok((expand(gqa), vec![]))
}

#[derive(Debug, Clone)]
struct Gqa {
    num_heads: usize,
    kv_num_heads: usize,
    scale: Option<f32>,
    softcap: f32,
    window: Option<usize>,
    /// do_rotary: Some(interleaved)
    rotary: Option<bool>,
    packed: bool,
    /// The given-input position of ONNX inputs 0..9.
    slots: [Option<usize>; 9],
    n_inputs: usize,
    outputs: [bool; 3],
}

impl std::hash::Hash for Gqa {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (self.num_heads, self.kv_num_heads, self.window, self.rotary, self.packed).hash(state);
        self.scale.map(f32::to_bits).hash(state);
        self.softcap.to_bits().hash(state);
        (self.slots, self.n_inputs, self.outputs).hash(state);
    }
}

impl Eq for Gqa {}

impl PartialEq for Gqa {
    fn eq(&self, o: &Self) -> bool {
        (self.num_heads, self.kv_num_heads, self.window, self.rotary, self.packed)
            == (o.num_heads, o.kv_num_heads, o.window, o.rotary, o.packed)
            && self.scale.map(f32::to_bits) == o.scale.map(f32::to_bits)
            && self.softcap.to_bits() == o.softcap.to_bits()
            && (self.slots, self.n_inputs, self.outputs) == (o.slots, o.n_inputs, o.outputs)
    }
}

impl Gqa {
    /// (head size, present length) from the query's and past's shapes.
    fn head(&self, q: &[TDim]) -> TractResult<TDim> {
        ensure!(q.len() == 3, "GroupQueryAttention: query must be 3D [batch, seq, hidden], got rank {}", q.len());
        let heads = if self.packed { self.num_heads + 2 * self.kv_num_heads } else { self.num_heads };
        Ok(q[2].clone() / heads as u64)
    }
}

impl Expansion for Gqa {
    fn name(&self) -> StaticName {
        "GroupQueryAttention".into()
    }

    fn nboutputs(&self) -> TractResult<usize> {
        Ok(self.outputs.iter().filter(|o| **o).count())
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, self.n_inputs)?;
        check_output_arity(outputs, self.nboutputs()?)?;
        let q = &inputs[0];
        let mut slot = 0;
        let mut out_slots = [None; 3];
        for (i, o) in self.outputs.iter().enumerate() {
            if *o {
                out_slots[i] = Some(slot);
                slot += 1;
            }
        }
        for (i, o) in out_slots.iter().enumerate() {
            if let Some(o) = o {
                s.equals(&outputs[*o].datum_type, &q.datum_type)?;
                s.equals(&outputs[*o].rank, if i == 0 { 3 } else { 4 })?;
            }
        }
        let past = self.slots[3];
        let shape_ins: Vec<usize> = std::iter::once(0).chain(past).collect();
        s.given_all(shape_ins.iter().map(|i| &inputs[*i].shape), move |s, shapes| {
            let q: TVec<TDim> = shapes[0].iter().cloned().collect();
            let head = self.head(&q)?;
            let p: TDim = if past.is_some() {
                let pk: TVec<TDim> = shapes[1].iter().cloned().collect();
                ensure!(pk.len() == 4, "GroupQueryAttention: past_key must be 4D");
                pk[2].clone()
            } else {
                0.to_dim()
            };
            if let Some(o) = out_slots[0] {
                let y = tvec![q[0].clone(), q[1].clone(), head.clone() * self.num_heads as u64];
                s.equals(&outputs[o].shape, ShapeFactoid::from(y))?;
            }
            for o in out_slots[1..].iter().flatten() {
                let pr = tvec![q[0].clone(), self.kv_num_heads.to_dim(), p.clone() + q[1].clone(), head.clone()];
                s.equals(&outputs[*o].shape, ShapeFactoid::from(pr))?;
            }
            Ok(())
        })
    }

    fn wire(&self, prefix: &str, model: &mut TypedModel, inputs: &[OutletId]) -> TractResult<TVec<OutletId>> {
        let input = |i: usize| self.slots[i].map(|s| inputs[s]);
        let q_in = input(0).context("GroupQueryAttention: no query")?;
        let qf = model.outlet_fact(q_in)?.clone();
        let head = self.head(&qf.shape.to_tvec())?;
        let (n, nkv) = (self.num_heads, self.kv_num_heads);
        let (mut q, mut k, v) = if self.packed {
            let cut = |model: &mut TypedModel, name: &str, a: usize, b: usize| -> TractResult<OutletId> {
                let op = Slice { axis: 2, start: head.clone() * a as u64, end: head.clone() * b as u64 };
                Ok(model.wire_node(format!("{prefix}.{name}"), op, &[q_in])?[0])
            };
            (cut(model, "q", 0, n)?, cut(model, "k", n, n + nkv)?, cut(model, "v", n + nkv, n + 2 * nkv)?)
        } else {
            (q_in, input(1).context("GroupQueryAttention: no key")?, input(2).context("GroupQueryAttention: no value")?)
        };
        let seqlens = input(5).context("GroupQueryAttention: no seqlens_k")?;
        if let Some(interleaved) = self.rotary {
            let cos = input(7).context("GroupQueryAttention: no cos_cache")?;
            let sin = input(8).context("GroupQueryAttention: no sin_cache")?;
            let cols =
                model.outlet_fact(cos)?.shape.last().cloned().context("GroupQueryAttention: scalar cos_cache")?;
            let rotary_dim = cols.to_usize().map(|c| 2 * c).unwrap_or(0);
            for (x, heads, name) in [(&mut q, n, "q"), (&mut k, nkv, "k")] {
                let config = RotaryConfig {
                    interleaved,
                    num_heads: heads,
                    rotary_dim,
                    microsoft: true,
                    has_positions: true,
                    seqlens: true,
                };
                *x = model.wire_node(
                    format!("{prefix}.rotary_{name}"),
                    RotaryOp { config },
                    &[*x, cos, sin, seqlens],
                )?[0];
            }
        }
        let mut present = tvec![];
        for (x, past, name) in [(k, input(3), "present_key"), (v, input(4), "present_value")] {
            let mut ins = tvec![x, seqlens];
            ins.extend(past);
            let op = GqaKvOp { kv_heads: nkv, has_past: past.is_some() };
            present.push(model.wire_node(format!("{prefix}.{name}"), op, &ins)?[0]);
        }
        let config = AttentionConfig {
            q_num_heads: Some(n),
            kv_num_heads: Some(nkv),
            is_causal: false,
            scale: self.scale,
            softcap: self.softcap,
            qk_mode: 0,
            has_mask: false,
            has_past_key: false,
            has_past_value: false,
            has_nonpad: true,
            seqlens: true,
            window: self.window,
        };
        let att = model.wire_node(
            format!("{prefix}.attention"),
            AttentionOp { config },
            &[q, present[0], present[1], seqlens],
        )?;
        let all = [att[0], present[0], present[1]];
        Ok(all.into_iter().zip(self.outputs).filter(|(_, keep)| *keep).map(|(o, _)| o).collect())
    }
}

/// GroupQueryAttention's present key or value: inputs (new `[batch, seq, kv_heads·head]`, seqlens_k `[batch]`,
/// past `[batch, kv_heads, past, head]`?), output `[batch, kv_heads, past + seq, head]` — for batch b, rows
/// `< past_b` from past, rows `past_b .. past_b + seq` the new ones, zeros after them (`past_b = max(seqlens_k[b] + 1
/// − seq, 0)`).
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
pub struct GqaKvOp {
    pub kv_heads: usize,
    pub has_past: bool,
}

impl Op for GqaKvOp {
    fn name(&self) -> StaticName {
        "KilnGqaPresent".into()
    }
    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("{self:?}")])
    }
    core::op_as_typed_op!();
}

/// The sizes of one evaluation: (batch, seq, head, past).
pub fn gqa_kv_geometry(op: &GqaKvOp, new: &[usize], past: Option<&[usize]>) -> TractResult<[usize; 4]> {
    ensure!(new.len() == 3, "GroupQueryAttention: key / value must be 3D, got {new:?}");
    let (b, s, hidden) = (new[0], new[1], new[2]);
    ensure!(
        op.kv_heads > 0 && hidden % op.kv_heads == 0,
        "GroupQueryAttention: hidden {hidden} over {} kv heads",
        op.kv_heads
    );
    let d = hidden / op.kv_heads;
    let p = match past {
        Some(ps) => {
            ensure!(
                ps.len() == 4 && ps[0] == b && ps[1] == op.kv_heads && ps[3] == d,
                "GroupQueryAttention: past of shape {ps:?} for [batch {b}, kv heads {}, past, head {d}]",
                op.kv_heads
            );
            ps[2]
        }
        None => 0,
    };
    Ok([b, s, d, p])
}

impl TypedOp for GqaKvOp {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 2 + self.has_past as usize, "GroupQueryAttention present: input count");
        let new = &inputs[0].shape;
        ensure!(new.rank() == 3, "GroupQueryAttention: key / value must be 3D");
        let p = if self.has_past { inputs[2].shape[2].clone() } else { 0.to_dim() };
        let shape =
            tvec![new[0].clone(), self.kv_heads.to_dim(), p + new[1].clone(), new[2].clone() / self.kv_heads as u64];
        Ok(tvec![inputs[0].datum_type.fact(shape)])
    }
    core::as_op!();
}

fn present_rows<T: Datum + Copy + Default>(
    new: &Tensor,
    past: Option<&Tensor>,
    seqlens: &[i64],
    [b, s, d, p]: [usize; 4],
    heads: usize,
) -> TractResult<Tensor> {
    let x = new.try_as_plain_ram()?;
    let x = x.as_slice::<T>()?;
    let past_data = match past {
        Some(t) => Some(t.try_as_plain_ram()?.as_slice::<T>()?.to_vec()),
        None => None,
    };
    let t = p + s;
    let mut out = vec![T::default(); b * heads * t * d];
    ensure!(seqlens.len() >= b, "GroupQueryAttention: {} seqlens_k for batch {b}", seqlens.len());
    for (bi, &len) in seqlens.iter().enumerate().take(b) {
        let pb = (len + 1 - s as i64).max(0) as usize;
        ensure!(
            pb + s <= t,
            "GroupQueryAttention: seqlens_k[{bi}] = {len} puts the new tokens past the present length {t}"
        );
        for h in 0..heads {
            for r in 0..t {
                let o = ((bi * heads + h) * t + r) * d;
                if r >= pb && r < pb + s {
                    let at = (bi * s + (r - pb)) * heads * d + h * d;
                    out[o..o + d].copy_from_slice(&x[at..at + d]);
                } else if r < pb && r < p {
                    if let Some(pd) = &past_data {
                        let at = ((bi * heads + h) * p + r) * d;
                        out[o..o + d].copy_from_slice(&pd[at..at + d]);
                    }
                }
            }
        }
    }
    Tensor::from_shape::<T>(&[b, heads, t, d], &out)
}

impl EvalOp for GqaKvOp {
    core::op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        ensure!(inputs.len() == 2 + self.has_past as usize, "GroupQueryAttention present: input count");
        let new = &inputs[0];
        let past = self.has_past.then(|| &*inputs[2]);
        let g = gqa_kv_geometry(self, new.shape(), past.map(|t| t.shape()))?;
        let seqlens = inputs[1].cast_to_dt(DatumType::I64)?;
        let seqlens = seqlens.try_as_plain_ram()?.as_slice::<i64>()?.to_vec();
        ensure!(seqlens.len() == g[0], "GroupQueryAttention: seqlens_k of {} values for batch {}", seqlens.len(), g[0]);
        if let Some(p) = past {
            ensure!(p.datum_type() == new.datum_type(), "GroupQueryAttention: past and new element types differ");
        }
        let out = match new.datum_type() {
            DatumType::F32 => present_rows::<f32>(new, past, &seqlens, g, self.kv_heads)?,
            DatumType::F16 => present_rows::<f16>(new, past, &seqlens, g, self.kv_heads)?,
            DatumType::F64 => present_rows::<f64>(new, past, &seqlens, g, self.kv_heads)?,
            dt => bail!("GroupQueryAttention: element type {dt:?}"),
        };
        Ok(tvec![out.into_tvalue()])
    }
}
