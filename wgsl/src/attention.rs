//! ONNX Attention on the GPU: the fused kernel (`kernels/attention.wgsl`) behind kiln's [`AttentionYOp`], and the
//! graph pass that gives the lowering that op.
//!
//! kiln's typed `AttentionOp` has four outputs (Y, present_key, present_value, qk_matmul_output); a GPU kernel has
//! one. [`split_attention`] rewrites each f32 Attention node whose qk_matmul_output nobody reads into an
//! [`AttentionYOp`] (Y alone, reading past and new K/V in place: no concatenated or repeated K/V for the kernel)
//! plus, where present_key / present_value are used, their concatenation as ordinary nodes (Concat of the past and
//! the new keys; a 3D K is split into heads and transposed first), which have GPU kernels of their own.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::array::TypedConcat;

pub use kiln_ops::attention::{AttentionConfig, AttentionOp, AttentionYOp};

use crate::context::Context;
use crate::exec::{GpuTensor, Recorder};
use crate::kernels::{launch, u32_of};
use crate::{Error, Result};

/// Fewer workgroups than this (per batch, kv head and row block) and the keys are split across workgroups.
const SPLIT_BELOW: usize = 32;
/// At most this many key splits.
const MAX_SPLITS: usize = 32;

/// Largest head size the kernel takes.
pub const MAX_HEAD: usize = 256;

/// The kernel's specialisation: what of the node's configuration is fixed (sizes come at run time).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AttentionSpec {
    pub config: AttentionConfig,
}

impl AttentionSpec {
    pub fn arity(&self) -> usize {
        let c = &self.config;
        3 + c.has_mask as usize + c.has_past_key as usize + c.has_past_value as usize + c.has_nonpad as usize
    }

    fn slots(&self) -> [Option<usize>; 4] {
        let c = &self.config;
        let mut at = 3;
        let mut next = |on: bool| {
            on.then(|| {
                at += 1;
                at - 1
            })
        };
        [next(c.has_mask), next(c.has_past_key), next(c.has_past_value), next(c.has_nonpad)]
    }

    /// Inputs: Q, K, V f32; the mask bool or f32; past f32; nonpad i64 / i32. Output: f32.
    pub fn output_dt(&self, dts: &[DatumType]) -> Option<DatumType> {
        use DatumType::{Bool, F32, I32, I64};
        if dts.len() != self.arity() || dts[..3].iter().any(|d| *d != F32) {
            return None;
        }
        let [mask, pk, pv, np] = self.slots();
        let ok = mask.is_none_or(|i| matches!(dts[i], Bool | F32))
            && pk.is_none_or(|i| dts[i] == F32)
            && pv.is_none_or(|i| dts[i] == F32)
            && np.is_none_or(|i| matches!(dts[i], I64 | I32));
        ok.then_some(F32)
    }

    /// The [batch, heads, seq, head] reading of a 3D or 4D Q / K / V, with its element strides (batch, head, seq).
    fn view(shape: &[usize], heads: Option<usize>, what: &str) -> Result<([usize; 4], [usize; 3])> {
        match *shape {
            [b, h, s, d] => Ok(([b, h, s, d], [h * s * d, s * d, d])),
            [b, s, hidden] => {
                let h = heads.ok_or_else(|| Error::new(format!("webgpu: attention: 3D {what} needs its heads")))?;
                if h == 0 || hidden % h != 0 {
                    return Err(Error::new(format!("webgpu: attention: {what} hidden {hidden} over {h} heads")));
                }
                let d = hidden / h;
                Ok(([b, h, s, d], [s * hidden, d, hidden]))
            }
            _ => Err(Error::new(format!("webgpu: attention: {what} of shape {shape:?}"))),
        }
    }

    pub fn output_shape(&self, inputs: &[&[usize]]) -> Result<TVec<usize>> {
        let c = &self.config;
        let (q, _) = Self::view(inputs[0], c.q_num_heads, "Q")?;
        let (v, _) = Self::view(inputs[2], c.kv_num_heads, "V")?;
        Ok(if inputs[0].len() == 4 { tvec![q[0], q[1], q[2], v[3]] } else { tvec![q[0], q[2], q[1] * v[3]] })
    }

    pub fn encode(&self, ctx: &Context, rec: &mut Recorder, inputs: &[&GpuTensor], out: &GpuTensor) -> Result<()> {
        let c = &self.config;
        let bad = |m: String| Error::new(format!("webgpu: attention: {m}"));
        let (q, qs) = Self::view(&inputs[0].shape, c.q_num_heads, "Q")?;
        let (k, ks) = Self::view(&inputs[1].shape, c.kv_num_heads, "K")?;
        let (v, vs) = Self::view(&inputs[2].shape, c.kv_num_heads, "V")?;
        let [b, hq, s, dk] = q;
        let [_, hkv, l, _] = k;
        let dv = v[3];
        if k[0] != b || v[0] != b || k[3] != dk || v[1] != hkv || v[2] != l {
            return Err(bad(format!(
                "Q {:?}, K {:?}, V {:?} disagree",
                inputs[0].shape, inputs[1].shape, inputs[2].shape
            )));
        }
        if hkv == 0 || hq % hkv != 0 {
            return Err(bad(format!("{hq} q heads over {hkv} kv heads")));
        }
        if dk > MAX_HEAD || dv > MAX_HEAD {
            return Err(bad(format!("head sizes {dk} / {dv} over {MAX_HEAD}")));
        }
        let [mask_ix, pk_ix, pv_ix, np_ix] = self.slots();
        let mut past = 0;
        for (ix, d) in [(pk_ix, dk), (pv_ix, dv)] {
            if let Some(ix) = ix {
                let ps = &inputs[ix].shape;
                if ps.len() != 4 || ps[0] != b || ps[1] != hkv || ps[3] != d {
                    return Err(bad(format!("past of shape {ps:?} for [{b}, {hkv}, past, {d}]")));
                }
                past = ps[2];
            }
        }
        if let (Some(a), Some(bb)) = (pk_ix, pv_ix) {
            if inputs[a].shape[2] != inputs[bb].shape[2] {
                return Err(bad("past_key and past_value lengths differ".into()));
            }
        }
        let total = past + l;
        let group = hq / hkv;
        let mut flags = c.is_causal as u32;
        let mut ms = [0usize; 4];
        let mut mask_len = 0;
        if let Some(ix) = mask_ix {
            let shape = &inputs[ix].shape;
            if shape.is_empty() || shape.len() > 4 {
                return Err(bad(format!("mask of shape {shape:?}")));
            }
            let mut dims = [1usize; 4];
            dims[4 - shape.len()..].copy_from_slice(shape);
            let target = [b, hq, s, total];
            let mut acc = 1;
            for i in (0..4).rev() {
                let ok = if i == 3 { dims[i] <= total } else { dims[i] == target[i] || dims[i] == 1 };
                if !ok {
                    return Err(bad(format!("mask {shape:?} does not broadcast to {target:?}")));
                }
                ms[i] = if i < 3 && dims[i] == 1 { 0 } else { acc };
                acc *= dims[i];
            }
            mask_len = dims[3];
            flags |= 2;
            if inputs[ix].dt == DatumType::Bool {
                flags |= 4;
            }
        }
        if let Some(ix) = np_ix {
            if inputs[ix].len() != b {
                return Err(bad(format!("nonpad_kv_seqlen of {} values for batch {b}", inputs[ix].len())));
            }
            flags |= 8;
        }
        if c.softcap > 0.0 {
            flags |= 16;
        }
        let scale = c.scale.unwrap_or(1.0 / (dk as f32).sqrt());
        let ys = if inputs[0].shape.len() == 4 { [hq * s * dv, s * dv, dv] } else { [s * hq * dv, dv, hq * dv] };
        let wg = 64usize;
        let rows = group * s;
        let blocks = rows.div_ceil(wg);
        let dmax = dk.max(dv).max(16).next_power_of_two();
        // few workgroups (decode: one per batch and kv head) and many keys: the keys are cut across workgroups
        let groups = b * hkv * blocks;
        let bk = 2048 / dmax;
        let splits = if groups < SPLIT_BELOW && total >= 2 * bk { total.div_ceil(bk).min(MAX_SPLITS) } else { 1 };
        let chunk = total.div_ceil(splits).div_ceil(bk) * bk;
        let splits = total.div_ceil(chunk.max(1)).max(1);
        let (gx, gy) = ctx.grid((groups * splits) as u64)?;
        let mut u = vec![];
        for x in [b, hq, s, hkv, l, past, total, dk, dv, group, blocks] {
            u.push(u32_of("attention size", x)?);
        }
        u.push(gx);
        u.extend([flags, scale.to_bits(), c.softcap.to_bits(), u32_of("mask length", mask_len)?]);
        for st in [qs, ks, vs, ys] {
            for x in st {
                u.push(u32_of("stride", x)?);
            }
            u.push(0);
        }
        for x in ms {
            u.push(u32_of("stride", x)?);
        }
        let all_rows = b * hkv * rows;
        u.extend([u32_of("splits", splits)?, u32_of("chunk", chunk)?, u32_of("rows", all_rows)?, 0]);
        let pick = |ix: Option<usize>| ix.map_or(inputs[0], |i| inputs[i]);
        let partial =
            if splits > 1 { Some(rec.alloc(ctx, &[all_rows * splits * (dv + 2)], DatumType::F32)?) } else { None };
        let bindings = [
            (1, inputs[0]),
            (2, inputs[1]),
            (3, partial.as_ref().unwrap_or(out)),
            (4, inputs[2]),
            (5, pick(mask_ix)),
            (6, pick(pk_ix)),
            (7, pick(pv_ix)),
            (8, pick(np_ix)),
        ];
        let spec = vec![("WG", wg.to_string()), ("DMAX", dmax.to_string())];
        launch(ctx, rec, "attention", "attention_main", spec.clone(), &u, &bindings, (gx, gy, 1))?;
        if let Some(partial) = partial {
            let (cx, cy) = ctx.grid(((all_rows * dv) as u64).div_ceil(wg as u64))?;
            u[11] = cx;
            let b = [(1, &partial), (3, out)];
            launch(ctx, rec, "attention", "combine_main", spec, &u, &b, (cx, cy, 1))?;
            rec.release(partial);
        }
        Ok(())
    }
}

/// Whether an outlet is read (by a node or as a model output).
fn used(model: &TypedModel, o: OutletId) -> bool {
    !model.node(o.node).outputs[o.slot].successors.is_empty() || model.outputs.contains(&o)
}

/// Rewrites kiln's f32 Attention nodes (qk_matmul_output unused) as an [`AttentionYOp`] plus the present_key /
/// present_value concatenations they feed (see the module's documentation). Returns how many it rewrote.
pub fn split_attention(model: &mut TypedModel) -> TractResult<usize> {
    let mut done = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(op) = node.op_as::<AttentionOp>() else { continue };
        let config = op.config.clone();
        if node.outputs.len() != 4 || used(model, OutletId::new(id, 3)) {
            continue;
        }
        if model.outlet_fact(node.inputs[0])?.datum_type != DatumType::F32 {
            continue;
        }
        let name = node.name.clone();
        let inputs = node.inputs.clone();
        let mut patch = TypedModelPatch::new(format!("split attention {name}"));
        let mut taps = tvec![];
        for i in &inputs {
            taps.push(patch.tap_model(model, *i)?);
        }
        let y = patch.wire_node(format!("{name}.y"), AttentionYOp { config: config.clone() }, &taps)?[0];
        patch.shunt_outside(model, OutletId::new(id, 0), y)?;
        let first_past = 3 + config.has_mask as usize;
        for (which, slot) in [(1usize, 1usize), (2, 2)] {
            if !used(model, OutletId::new(id, slot)) {
                continue;
            }
            let cur = taps[which];
            let fact = patch.outlet_fact(cur)?.clone();
            let four = if fact.rank() == 3 {
                let heads = config.kv_num_heads.context("Attention: 3D K / V need kv_num_heads")?;
                let hidden = fact.shape[2].clone();
                let head = hidden.clone() / heads as u64;
                let split = AxisOp::Reshape(2, tvec![hidden], tvec![heads.to_dim(), head]);
                let x = patch.wire_node(format!("{name}.present{which}.heads"), split, &[cur])?[0];
                patch.wire_node(format!("{name}.present{which}.bhsd"), AxisOp::Move(1, 2), &[x])?[0]
            } else {
                cur
            };
            let out = if config.has_past_key && config.has_past_value {
                let past = taps[first_past + which - 1];
                patch.wire_node(format!("{name}.present{which}"), TypedConcat::new(2), &[past, four])?[0]
            } else {
                four
            };
            patch.shunt_outside(model, OutletId::new(id, slot), out)?;
        }
        patch.apply(model)?;
        done += 1;
    }
    Ok(done)
}

/// The kernel for an [`AttentionYOp`] node, or why it stays on the CPU: head sizes must be known and at most
/// [`MAX_HEAD`] (the rest — element types, ranks, sizes — the shared checks of `kernel_for` see to).
pub(crate) fn kernel_for(
    model: &TypedModel,
    node: &TypedNode,
    op: &AttentionYOp,
) -> std::result::Result<crate::Kernel, String> {
    let c = &op.config;
    let fact = |i: usize| model.outlet_fact(node.inputs[i]).map_err(|e| e.to_string());
    for (i, heads) in [(0, c.q_num_heads), (1, c.kv_num_heads), (2, c.kv_num_heads)] {
        let f = fact(i)?;
        let head = match f.rank() {
            4 => f.shape[3].clone(),
            3 => {
                let h = heads.ok_or("3D attention input without its heads attribute")?;
                f.shape[2].clone() / h as u64
            }
            r => return Err(format!("attention input of rank {r}")),
        };
        match head.to_usize() {
            Ok(d) if d <= MAX_HEAD => {}
            Ok(d) => return Err(format!("attention head size {d} over {MAX_HEAD}")),
            Err(_) => return Err(format!("attention head size {head} unknown before the run")),
        }
    }
    Ok(crate::Kernel::Attention(Box::new(AttentionSpec { config: c.clone() })))
}

pub use kiln_ops::rotary::{RotaryConfig, RotaryOp};

/// RotaryEmbedding's kernel (`kernels/rope.wgsl`): inputs (input, cos_cache, sin_cache, position_ids?).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RotarySpec {
    pub config: RotaryConfig,
}

impl RotarySpec {
    pub fn arity(&self) -> usize {
        3 + self.config.has_positions as usize
    }

    pub fn output_dt(&self, dts: &[DatumType]) -> Option<DatumType> {
        use DatumType::{F32, I32, I64};
        let ok = dts.len() == self.arity()
            && dts[..3].iter().all(|d| *d == F32)
            && dts.get(3).is_none_or(|d| matches!(d, I64 | I32));
        ok.then_some(F32)
    }

    pub fn encode(&self, ctx: &Context, rec: &mut Recorder, inputs: &[&GpuTensor], out: &GpuTensor) -> Result<()> {
        let c = &self.config;
        let bad = |m: String| Error::new(format!("webgpu: rotary embedding: {m}"));
        let g = c.geometry(&inputs[0].shape).map_err(|e| bad(e.to_string()))?;
        let (cos, sin) = (&inputs[1].shape, &inputs[2].shape);
        if cos != sin {
            return Err(bad(format!("cos {cos:?} and sin {sin:?} differ")));
        }
        let cols = cos.last().copied().unwrap_or(0);
        if cols < g.rotary_dim / 2 || cols == 0 {
            return Err(bad(format!("caches of {cos:?} for a rotary dim of {}", g.rotary_dim)));
        }
        let mut flags = c.interleaved as u32;
        let rows = inputs[1].len() / cols;
        if c.has_positions {
            if cos.len() != 2 {
                return Err(bad(format!("with position_ids the caches must be 2D, got {cos:?}")));
            }
            let n = inputs[3].len();
            flags |= 2;
            if c.microsoft && n == 1 {
                flags |= 4;
            } else if n != g.batch * g.seq {
                return Err(bad(format!("{n} position_ids for [batch {}, seq {}]", g.batch, g.seq)));
            }
        } else if cos.len() != 3 || cos[0] != g.batch || cos[1] != g.seq {
            return Err(bad(format!("without position_ids the caches must be [batch, seq, half], got {cos:?}")));
        }
        let n = out.len();
        let (gx, gy) = ctx.grid((n as u64).div_ceil(crate::kernels::WG as u64))?;
        let mut u = vec![u32_of("length", n)?, gx, u32_of("batch", g.batch)?, u32_of("heads", g.heads)?];
        for x in [g.seq, g.head, g.rotary_dim, cols, g.strides[0], g.strides[1], g.strides[2]] {
            u.push(u32_of("size", x)?);
        }
        u.extend([flags, u32_of("cache rows", rows)?, 0, 0, 0]);
        let pos = if c.has_positions { inputs[3] } else { inputs[0] };
        let b = [(1, inputs[0]), (2, inputs[1]), (3, out), (4, inputs[2]), (5, pos)];
        launch(ctx, rec, "rope", "rope_main", vec![], &u, &b, (gx, gy, 1))
    }
}
