//! ONNX Attention on the GPU: the fused kernel (`kernels/attention.wgsl`) behind kiln's [`AttentionYOp`], and the
//! graph pass that gives the lowering that op.
//!
//! kiln's typed `AttentionOp` has four outputs (Y, present_key, present_value, qk_matmul_output); a GPU kernel has
//! one. [`split_attention`] rewrites each f32 Attention node whose qk_matmul_output nobody reads into an
//! [`AttentionYOp`] (Y alone, reading past and new K/V in place: no concatenated or repeated K/V for the kernel)
//! plus, where present_key / present_value are used, their concatenation as ordinary nodes (Concat of the past and
//! the new keys; a 3D K is split into heads and transposed first), which have GPU kernels of their own.
//!
//! [`fuse_decomposed_attention`] maps the exporters' decomposed attention (MatMul, scale, mask, Softmax, MatMul,
//! with GQA's repeat_kv) to the same op; [`RotarySpec`] is RotaryEmbedding's one-dispatch kernel
//! (`kernels/rope.wgsl`, behind kiln-ops' `RotaryOp`).
//!
//! The kernel: one workgroup of 64 rows per (batch, kv head, row block), a row being one (q head of the group,
//! query); K/V tiles of 2048 floats each in workgroup memory (16 KiB in all); the query and the accumulator in
//! registers (head sizes up to 256); when there are fewer than 32 workgroups (decode), the keys are split across
//! up to 32 workgroups and a second dispatch (`combine_main`) merges their partial softmax states.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::array::TypedConcat;

pub use kiln_ops::attention::{AttentionConfig, AttentionOp, AttentionYOp};

use crate::context::Context;
use crate::exec::{GpuTensor, Recorder};
use crate::kernels::{dispatch_with, launch, pipeline_for, u32_of};
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
    /// A float16 model's attention (kiln-graph's lowering sets it): where the adapter has shader-f16, q · k and
    /// weight · v are multiplied in f16 (q scaled before its rounding by the power of two at or below the scale,
    /// exactly, so the partial scores stay within f16's range where the raw products of large q and k would not;
    /// q · k summed in f16 16 products at a time, those sums, the softmax and the value accumulators in f32; K / V
    /// tiles in f16). Without shader-f16 it changes nothing.
    pub f16_math: bool,
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

    /// Inputs: Q f32; K, V and past f32 or f16 (a float16 model's KV cache, read as f32); the mask bool or f32;
    /// nonpad i64 / i32. Output: f32.
    pub fn output_dt(&self, dts: &[DatumType]) -> Option<DatumType> {
        use DatumType::{Bool, F16, F32, I32, I64};
        let kv = |d: DatumType| matches!(d, F32 | F16);
        if dts.len() != self.arity() || dts[0] != F32 || !kv(dts[1]) || !kv(dts[2]) {
            return None;
        }
        let [mask, pk, pv, np] = self.slots();
        let ok = mask.is_none_or(|i| matches!(dts[i], Bool | F32))
            && pk.is_none_or(|i| kv(dts[i]))
            && pv.is_none_or(|i| kv(dts[i]))
            && np.is_none_or(|i| matches!(dts[i], I64 | I32));
        ok.then_some(F32)
    }

    /// The shader's element type and load of K / V binding `name` holding `dt` (f32, or f16 as `array<f16>` with
    /// shader-f16, else as u32 words of two halves).
    fn kv_access(name: &str, dt: DatumType, native_f16: bool) -> (String, String) {
        match dt {
            DatumType::F16 if native_f16 => ("f16".into(), format!("f32({name}[i])")),
            DatumType::F16 => ("u32".into(), format!("unpack2x16float({name}[i >> 1u])[i & 1u]")),
            _ => ("f32".into(), format!("{name}[i]")),
        }
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
        let (k, mut ks) = Self::view(&inputs[1].shape, c.kv_num_heads, "K")?;
        let (v, mut vs) = Self::view(&inputs[2].shape, c.kv_num_heads, "V")?;
        // a KV store (crate::kv) is read through its row stride
        for (t, st) in [(inputs[1], &mut ks), (inputs[2], &mut vs)] {
            if let (Some(l), [_, h, _, d]) = (&t.kv, &*t.shape) {
                *st = [h * l.cap * d, l.cap * d, *d];
            }
        }
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
        if c.seqlens {
            if np_ix.is_none() || pk_ix.is_some() || pv_ix.is_some() {
                return Err(bad("GroupQueryAttention masking needs seqlens_k and no past inputs".into()));
            }
            flags |= 32;
        }
        let window = match c.window {
            Some(w) if c.seqlens => {
                flags |= 64;
                u32_of("window", w)?
            }
            _ => 0,
        };
        let scale = c.scale.unwrap_or(1.0 / (dk as f32).sqrt());
        let ys = if inputs[0].shape.len() == 4 { [hq * s * dv, s * dv, dv] } else { [s * hq * dv, dv, hq * dv] };
        let wg = 64usize;
        let rows = group * s;
        let blocks = rows.div_ceil(wg);
        let dmax = dk.max(dv).max(16).next_power_of_two();
        // few workgroups (decode: one per batch and kv head) and many keys: the keys are cut across workgroups
        // decode (one query per row): decode_main, a workgroup per (batch, q head) whose invocations share the keys
        let decode = s == 1;
        let groups = if decode { b * hq } else { b * hkv * blocks };
        // decode: DWG invocations a workgroup (256 on GPUs, fewer where the adapter allows fewer; 64 on CPU
        // adapters), tiles of DWG / 4 keys
        let dwg = if ctx.caps.cpu_adapter { 64 } else { 256 }.min(ctx.caps.max_invocations as usize).max(8);
        let dwg = if dwg.is_power_of_two() { dwg } else { dwg.next_power_of_two() / 2 };
        let bk = if decode { dwg / 4 } else { 2048 / dmax };
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
        // the 4th word of K's and V's strides: the rows per (batch, head) of past K / V (0: their length)
        let past_rows = |ix: Option<usize>| ix.and_then(|i| inputs[i].kv.as_ref()).map_or(0, |l| l.cap);
        for (st, w) in [(qs, 0), (ks, past_rows(pk_ix)), (vs, past_rows(pv_ix)), (ys, 0)] {
            for x in st {
                u.push(u32_of("stride", x)?);
            }
            u.push(u32_of("stride", w)?);
        }
        for x in ms {
            u.push(u32_of("stride", x)?);
        }
        let all_rows = b * hkv * rows;
        u.extend([u32_of("splits", splits)?, u32_of("chunk", chunk)?, u32_of("rows", all_rows)?, window]);
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
        // K / V (and past K / V) of f16 are read as such: their element types and loads
        let native = ctx.caps.shader_f16;
        let kv = [("k", Some(1)), ("v", Some(2)), ("past_k", pk_ix), ("past_v", pv_ix)].map(|(n, ix)| (n, pick(ix).dt));
        if let Some((name, dt)) = kv.iter().find(|(_, dt)| !matches!(dt, DatumType::F32 | DatumType::F16)) {
            return Err(bad(format!("{name} of element type {dt:?}")));
        }
        let f16 = self.f16_math && native;
        let spec = || {
            let mut spec = vec![("WG", wg.to_string()), ("DMAX", dmax.to_string()), ("DWG", dwg.to_string())];
            for ((name, dt), (elem, load)) in kv.iter().zip([
                ("K_ELEM", "K_LOAD"),
                ("V_ELEM", "V_LOAD"),
                ("PK_ELEM", "PK_LOAD"),
                ("PV_ELEM", "PV_LOAD"),
            ]) {
                let (e, l) = Self::kv_access(name, *dt, native);
                spec.push((elem, e));
                spec.push((load, l));
            }
            if f16 {
                spec.extend([("HT", "f16".into()), ("CHUNK", "16".into()), ("PRESCALE", "true".into())]);
            } else {
                spec.extend([("HT", "f32".into()), ("CHUNK", "0x40000000".into()), ("PRESCALE", "false".into())]);
            }
            if f16 || native && kv.iter().any(|(_, dt)| *dt == DatumType::F16) {
                spec.push(("ENABLE", "enable f16;\n".into()));
            }
            spec
        };
        // the pipelines by what the specialisation depends on (made once)
        let kv_dts = kv.map(|(_, dt)| dt);
        let pipeline = |entry: &'static str| {
            ctx.memo_pipeline(&("attention", entry, wg, dmax, dwg, kv_dts, native, f16), || {
                pipeline_for(ctx, "attention", entry, spec())
            })
        };
        let entry = if decode { "decode_main" } else { "attention_main" };
        dispatch_with(rec, pipeline(entry)?, entry, &u, &bindings, (gx, gy, 1));
        if let Some(partial) = partial {
            let (cx, cy) = ctx.grid(((all_rows * dv) as u64).div_ceil(wg as u64))?;
            u[11] = cx;
            let b = [(1, &partial), (3, out)];
            dispatch_with(rec, pipeline("combine_main")?, "combine_main", &u, &b, (cx, cy, 1));
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
    Ok(crate::Kernel::Attention(Box::new(AttentionSpec { config: c.clone(), f16_math: false })))
}

pub use kiln_ops::rotary::{RotaryConfig, RotaryOp};

/// RotaryEmbedding's kernel (`kernels/rope.wgsl`): inputs (input, cos_cache, sin_cache, position_ids?), and with
/// `second` a second input rotated by the same caches and positions in the same dispatch (its own config: only
/// `num_heads` may differ), two outputs. `append`: with `second`, the second (a layer's new keys) is appended to
/// a past KV cache and a third input (its new values) to another, the way a Concat along the sequence axis does
/// (see [`RotarySpec::encode_append`]): inputs `[q, cos, sin, (positions), k, past_k, v, past_v]`, outputs
/// `[q rotated, (k rotated,) present_k, present_v]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RotarySpec {
    pub config: RotaryConfig,
    pub second: Option<RotaryConfig>,
    pub append: bool,
    /// With `append`: the rotated k is also an output (after q's), for a reader besides its cache.
    pub k_out: bool,
}

/// Storage buffers `rope_kv_main` binds: q, k and v, the two caches, q's output and the two stores; one more for
/// the positions (with position_ids) and for k's output (`k_out`).
pub const ROTARY_APPEND_BUFFERS: u32 = 8;

impl RotarySpec {
    pub fn arity(&self) -> usize {
        3 + self.config.has_positions as usize + self.second.is_some() as usize + 3 * self.append as usize
    }

    pub fn output_dt(&self, dts: &[DatumType]) -> Option<DatumType> {
        use DatumType::{F32, I32, I64};
        let p = self.config.has_positions as usize;
        // with `append`, past_k and past_v (after k and v) may be float16 caches
        let ok = dts.len() == self.arity()
            && dts[..3].iter().all(|d| *d == F32)
            && (p == 0 || matches!(dts[3], I64 | I32))
            && dts[3 + p..].iter().enumerate().all(|(i, d)| *d == F32 || (i % 2 == 1 && *d == DatumType::F16));
        ok.then_some(F32)
    }

    /// Whether `a` and `b` can share a dispatch: the same caches, positions and rotation, any head count.
    pub fn pairs(a: &RotaryConfig, b: &RotaryConfig) -> bool {
        RotaryConfig { num_heads: 0, ..a.clone() } == RotaryConfig { num_heads: 0, ..b.clone() }
    }

    /// The uniform block for rotating `x` (config `c`): sizes, strides, flags.
    fn params(&self, c: &RotaryConfig, inputs: &[&GpuTensor], x: &GpuTensor) -> Result<Vec<u32>> {
        let bad = |m: String| Error::new(format!("webgpu: rotary embedding: {m}"));
        let g = c.geometry(&x.shape).map_err(|e| bad(e.to_string()))?;
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
            if c.seqlens {
                if n != g.batch {
                    return Err(bad(format!("{n} seqlens_k for batch {}", g.batch)));
                }
                flags |= 8;
            } else if c.microsoft && n == 1 {
                flags |= 4;
            } else if n != g.batch * g.seq {
                return Err(bad(format!("{n} position_ids for [batch {}, seq {}]", g.batch, g.seq)));
            }
        } else if cos.len() != 3 || cos[0] != g.batch || cos[1] != g.seq {
            return Err(bad(format!("without position_ids the caches must be [batch, seq, half], got {cos:?}")));
        }
        let n = x.len();
        let mut u = vec![u32_of("length", n)?, 0, u32_of("batch", g.batch)?, u32_of("heads", g.heads)?];
        for x in [g.seq, g.head, g.rotary_dim, cols, g.strides[0], g.strides[1], g.strides[2]] {
            u.push(u32_of("size", x)?);
        }
        u.extend([flags, u32_of("cache rows", rows)?, u32_of("length", n)?, 0, 0]);
        u.extend([0u32; 12]);
        Ok(u)
    }

    pub fn encode(&self, ctx: &Context, rec: &mut Recorder, inputs: &[&GpuTensor], out: &GpuTensor) -> Result<()> {
        let mut u = self.params(&self.config, inputs, inputs[0])?;
        let n = inputs[0].len();
        let (gx, gy) = ctx.grid((n as u64).div_ceil(crate::kernels::WG as u64))?;
        u[1] = gx;
        let pos = if self.config.has_positions { inputs[3] } else { inputs[0] };
        let b = [(1, inputs[0]), (2, inputs[1]), (3, out), (4, inputs[2]), (5, pos)];
        launch(ctx, rec, "rope", "rope_main", vec![], &u, &b, (gx, gy, 1))
    }

    /// Both rotations of a paired spec (`second`), one dispatch; the outputs in input order.
    pub fn encode_pair(&self, ctx: &Context, rec: &mut Recorder, inputs: &[&GpuTensor]) -> Result<Vec<GpuTensor>> {
        let p = 3 + self.config.has_positions as usize;
        if self.second.is_none() || inputs.len() != self.arity() {
            return Err(Error::new("webgpu: rotary embedding: not a pair"));
        }
        let mut u = self.pair_params(inputs)?;
        let (gx, gy) = grid_of(ctx, &mut u, inputs[0].len() + inputs[p].len())?;
        let out1 = rec.alloc(ctx, &inputs[0].shape, DatumType::F32)?;
        let out2 = rec.alloc(ctx, &inputs[p].shape, DatumType::F32)?;
        let pos = if self.config.has_positions { inputs[3] } else { inputs[0] };
        let b = [(1, inputs[0]), (2, inputs[1]), (3, &out1), (4, inputs[2]), (5, pos), (6, inputs[p]), (7, &out2)];
        launch(ctx, rec, "rope", "rope2_main", vec![], &u, &b, (gx, gy, 1))?;
        Ok(vec![out1, out2])
    }

    /// A paired spec with `append` (inputs `[q, cos, sin, (positions), k, past_k, v, past_v]`): q rotated (and k
    /// rotated with `k_out`), and the past caches with k rotated and v appended, as the Concats along axis 2 would
    /// make them — f32 caches, or float16 ones (k and v rounded to float16 first, as a float16 model's Cast does);
    /// `make_store[i]`: that present leaves the run on the GPU ([`crate::kv::append`]). When both pasts are KV
    /// stores with room that end at their high-water mark, one dispatch (`rope_kv_main`) writes the outputs and
    /// the new rows in place; else the rotations as a pair, then each append (or Concat) on its own.
    pub fn encode_append(
        &self,
        ctx: &Context,
        rec: &mut Recorder,
        inputs: &[&GpuTensor],
        make_store: [bool; 2],
        syms: &SymbolValues,
    ) -> Result<Vec<GpuTensor>> {
        let p = 3 + self.config.has_positions as usize;
        if !self.append || self.second.is_none() || inputs.len() != self.arity() {
            return Err(Error::new("webgpu: rotary embedding: not a rotation with KV appends"));
        }
        let (k, past_k, v, past_v) = (inputs[p], inputs[p + 1], inputs[p + 2], inputs[p + 3]);
        let store_dt = past_k.dt;
        if past_v.dt != store_dt || !matches!(store_dt, DatumType::F32 | DatumType::F16) {
            return Err(Error::new(format!("webgpu: KV appends to caches of {store_dt:?} and {:?}", past_v.dt)));
        }
        // float16 words hold two values of one row: even head sizes only
        let pair = if store_dt == DatumType::F16 { 2 } else { 1 };
        let even = [k, v].iter().all(|t| t.shape.last().is_some_and(|d| d % pair == 0));
        let f32_new = [k, v].iter().all(|t| t.dt == DatumType::F32 && t.kv.is_none());
        let reserve = || crate::kv::reserve_pair([past_k, past_v], [&k.shape, &v.shape]);
        if let Some(stores) = (even && f32_new).then(reserve).flatten() {
            let mut u = self.pair_params(inputs)?;
            for (i, (new, store)) in [(k, &stores[0]), (v, &stores[1])].into_iter().enumerate() {
                let [_, _, s, d] = *new.shape else { return Err(Error::new("webgpu: KV append of a non-4D tensor")) };
                let cap = store.kv.as_ref().map_or(0, |l| l.cap);
                let past = store.shape[2] - s;
                let w = [new.len(), s * d, cap * d, past * d];
                for (j, x) in w.into_iter().enumerate() {
                    u[20 + 4 * i + j] = u32_of("KV append", x)?;
                }
                rec.counters.kv_appends_in_place += 1;
                rec.counters.kv_appends_fused += 1;
                rec.counters.kv_append_bytes += (new.len() * crate::exec::gpu_size_of(store_dt)) as u64;
            }
            let (gx, gy) = grid_of(ctx, &mut u, inputs[0].len() + (k.len() + v.len()) / pair)?;
            let q_out = rec.alloc(ctx, &inputs[0].shape, DatumType::F32)?;
            let k_out = if self.k_out { Some(rec.alloc(ctx, &k.shape, DatumType::F32)?) } else { None };
            let mut b = vec![(1, inputs[0]), (2, inputs[1]), (3, &q_out), (4, inputs[2]), (6, k), (8, v)];
            b.extend([(9, &stores[1]), (10, &stores[0])]);
            let positions = self.config.has_positions;
            if positions {
                b.push((5, inputs[3]));
            }
            if let Some(o) = &k_out {
                b.push((7, o));
            }
            // the pipeline by what its specialisation depends on (the WGSL snippets made once)
            let pipeline = ctx.memo_pipeline(&("rope_kv", positions, self.k_out, pair), || {
                let mut spec = vec![];
                if !positions {
                    spec.push(("POS_AT", "return 0;".to_string()));
                }
                if self.k_out {
                    let write = if pair == 2 { "out2[g] = r0;\n        out2[g + 1u] = r1;" } else { "out2[g] = r0;" };
                    spec.push(("K_OUT", write.to_string()));
                }
                if pair == 2 {
                    spec.extend([("STORE_T", "u32".to_string()), ("PAIR", "2".to_string())]);
                    spec.push(("STORE_VAL", "return pack2x16float(vec2<f32>(a, b));".to_string()));
                }
                pipeline_for(ctx, "rope", "rope_kv_main", spec)
            })?;
            dispatch_with(rec, pipeline, "rope_kv_main", &u, &b, (gx, gy, 1));
            let [sk, sv] = stores;
            return Ok(std::iter::once(q_out).chain(k_out).chain([sk, sv]).collect());
        }
        let rotations = RotarySpec { append: false, k_out: false, ..self.clone() };
        let mut outs = rotations.encode_pair(ctx, rec, &inputs[..p + 1])?;
        let k_rot = outs.pop().ok_or_else(|| Error::new("webgpu: rotary embedding: no second output"))?;
        for (past, new, make) in [(past_k, &k_rot, make_store[0]), (past_v, v, make_store[1])] {
            // a float16 cache takes the new rows rounded to float16
            let cast = (store_dt == DatumType::F16)
                .then(|| {
                    let to16 = crate::kernels::UnaryOp::Cast { from: DatumType::F32, to: DatumType::F16 };
                    crate::kernels::Kernel::Unary(to16).encode(ctx, rec, &[new], syms)
                })
                .transpose()?;
            let present = crate::kv::append_or_concat(ctx, rec, past, cast.as_ref().unwrap_or(new), make, syms)?;
            if let Some(c) = cast {
                rec.release(c);
            }
            outs.push(present);
        }
        if self.k_out {
            outs.insert(1, k_rot);
        } else {
            rec.release(k_rot);
        }
        Ok(outs)
    }

    /// The uniform block of a paired spec's dispatch (its length and grid words set by [`grid_of`]).
    fn pair_params(&self, inputs: &[&GpuTensor]) -> Result<Vec<u32>> {
        let Some(second) = &self.second else {
            return Err(Error::new("webgpu: rotary embedding: not a pair"));
        };
        let x2 = inputs[3 + self.config.has_positions as usize];
        let mut u = self.params(&self.config, inputs, inputs[0])?;
        let v = self.params(second, inputs, x2)?;
        // the second's rows are the same positions: the same batch, seq, head and rotary dim
        if u[2] != v[2] || u[4..7] != v[4..7] {
            return Err(Error::new(format!(
                "webgpu: rotary embedding: paired inputs {:?} and {:?} differ in batch, seq or head",
                inputs[0].shape, x2.shape
            )));
        }
        u[16..20].copy_from_slice(&[v[3], v[8], v[9], v[10]]);
        Ok(u)
    }
}

/// Sets a rope dispatch's invocation count `n` and workgroup row (uniform words 0 and 1): its grid.
fn grid_of(ctx: &Context, u: &mut [u32], n: usize) -> Result<(u32, u32)> {
    let (gx, gy) = ctx.grid((n as u64).div_ceil(crate::kernels::WG as u64))?;
    u[0] = u32_of("length", n)?;
    u[1] = gx;
    Ok((gx, gy))
}

/// The outlet a chain of reshapes (AxisOp other than a move) starts from.
fn before_reshapes(model: &TypedModel, mut o: OutletId) -> OutletId {
    loop {
        let n = model.node(o.node);
        match n.op_as::<AxisOp>() {
            Some(AxisOp::Move(..)) | None => return o,
            Some(_) => o = n.inputs[0],
        }
    }
}

/// The earliest rank-4 outlet of the chain of reshapes that ends at `o` (else where the chain starts).
fn rank4_before_reshapes(model: &TypedModel, mut o: OutletId) -> OutletId {
    let mut found = None;
    loop {
        if model.outlet_fact(o).is_ok_and(|f| f.rank() == 4) {
            found = Some(o);
        }
        let n = model.node(o.node);
        match n.op_as::<AxisOp>() {
            Some(AxisOp::Move(..)) | None => return found.unwrap_or(o),
            Some(_) => o = n.inputs[0],
        }
    }
}

/// The only consumer of an outlet, when it has exactly one and is no model output.
fn sole_successor(model: &TypedModel, o: OutletId) -> Option<usize> {
    let succ = &model.node(o.node).outputs[o.slot].successors;
    (succ.len() == 1 && !model.outputs.contains(&o)).then(|| succ[0].node)
}

/// Follows reshapes downstream (each the sole consumer) from `o`.
fn after_reshapes(model: &TypedModel, mut o: OutletId) -> OutletId {
    while let Some(n) = sole_successor(model, o) {
        match model.node(n).op_as::<AxisOp>() {
            Some(AxisOp::Move(..)) | None => return o,
            Some(_) => o = OutletId::new(n, 0),
        }
    }
    o
}

/// A scalar f32 constant.
pub(crate) fn scalar_const(model: &TypedModel, o: OutletId) -> Option<f32> {
    let k = model.outlet_fact(o).ok()?.konst.clone()?;
    (k.len() == 1 && k.datum_type() == DatumType::F32).then(|| k.cast_to_scalar::<f32>().ok()).flatten()
}

pub(crate) fn binop_name(node: &TypedNode) -> Option<String> {
    node.op_as::<tract_onnx::tract_core::ops::binary::TypedBinOp>().map(|b| b.0.name().to_string())
}

/// The `[batch, kv_heads, seq, head]` K that a repeat_kv (`Reshape([b, kv, g, t, d] → [b, kv·g, t, d])` of an
/// `Expand` of an `Unsqueeze(2)`, maybe with a scalar `Mul` on the way) repeated into `k4`, and that scalar.
pub(crate) fn unrepeat_kv(model: &TypedModel, k4: OutletId, kv_heads: &TDim) -> Option<(OutletId, f32)> {
    use tract_onnx::tract_core::ops::array::MultiBroadcastTo;
    let n = model.node(k4.node);
    match n.op_as::<AxisOp>()? {
        AxisOp::Reshape(1, from, to) if from.len() == 2 && to.len() == 1 && from[0] == *kv_heads => {}
        _ => return None,
    }
    let mut x = n.inputs[0];
    let mut scale = 1.0;
    let mut seen_expand = false;
    for _ in 0..3 {
        let m = model.node(x.node);
        if binop_name(m).as_deref() == Some("Mul") {
            let (c, data) = match (scalar_const(model, m.inputs[1]), scalar_const(model, m.inputs[0])) {
                (Some(c), _) => (c, m.inputs[0]),
                (None, Some(c)) => (c, m.inputs[1]),
                _ => return None,
            };
            scale *= c;
            x = data;
        } else if m.op_is::<MultiBroadcastTo>() && !seen_expand {
            seen_expand = true;
            x = m.inputs[0];
        } else if matches!(m.op_as::<AxisOp>(), Some(AxisOp::Add(2))) && seen_expand {
            let k = m.inputs[0];
            let f = model.outlet_fact(k).ok()?;
            return (f.rank() == 4 && f.shape[1] == *kv_heads && scale.is_finite()).then_some((k, scale));
        } else {
            return None;
        }
    }
    None
}

/// `(x, c)` when `o` is `x · c` or `c · x` for a finite scalar constant c.
fn strip_scalar_mul(model: &TypedModel, o: OutletId) -> Option<(OutletId, f32)> {
    let n = model.node(o.node);
    if binop_name(n).as_deref() != Some("Mul") {
        return None;
    }
    match (scalar_const(model, n.inputs[1]), scalar_const(model, n.inputs[0])) {
        (Some(c), _) if c.is_finite() => Some((n.inputs[0], c)),
        (None, Some(c)) if c.is_finite() => Some((n.inputs[1], c)),
        _ => None,
    }
}

/// Undoes tract's `ConcatThenEinsum` on a matmul's contraction axis: `MatMul(Slice(p, ..P), A) + MatMul(Slice(p,
/// P..), B)`, which declutter makes of `MatMul(p, Concat(A, B))` (attention's `P·V` with V the KV cache's
/// `Concat(past, new)`), becomes the single matmul again, reading the concatenation the model computes anyway (the
/// `present` output) or a new one. On the GPU the split costs two slices, a second matmul and the add, and hides the
/// attention from [`fuse_decomposed_attention`]. Returns how many it merged.
pub fn unsplit_concat_matmuls(model: &mut TypedModel) -> TractResult<usize> {
    let mut done = 0;
    for id in model.eval_order()? {
        if let Some(patch) = unsplit_at(model, id) {
            patch.apply(model)?;
            done += 1;
        }
    }
    Ok(done)
}

/// The reshapes (AxisOps other than moves, each with one consumer) that end at `o`, in order, and where they start.
fn reshapes_before(model: &TypedModel, mut o: OutletId) -> (OutletId, Vec<AxisOp>) {
    let mut ops = vec![];
    loop {
        let n = model.node(o.node);
        match n.op_as::<AxisOp>() {
            Some(op) if !matches!(op, AxisOp::Move(..)) && n.outputs[0].successors.len() == 1 => {
                ops.push(op.clone());
                o = n.inputs[0];
            }
            _ => break,
        }
    }
    ops.reverse();
    (o, ops)
}

/// One side of a split matmul: `reshapes(MatMul(reshapes(Slice(p, last axis)), operand))`.
struct SplitSide {
    op: tract_onnx::tract_core::ops::einsum::prefix_matmul::PrefixMatMul,
    p: OutletId,
    start: TDim,
    end: TDim,
    operand: OutletId,
    pre: Vec<AxisOp>,
    post: Vec<AxisOp>,
}

fn split_side(model: &TypedModel, add: usize, o: OutletId) -> Option<SplitSide> {
    use tract_onnx::tract_core::ops::array::Slice;
    use tract_onnx::tract_core::ops::einsum::prefix_matmul::PrefixMatMul;
    if sole_successor(model, o) != Some(add) {
        return None;
    }
    let (mo, post) = reshapes_before(model, o);
    let mm = model.node(mo.node);
    let op = mm.op_as::<PrefixMatMul>()?;
    if op.transpose_a || op.transpose_c || op.quantize_output.is_some() || sole_successor(model, mo).is_none() {
        return None;
    }
    let (so, pre) = reshapes_before(model, mm.inputs[0]);
    let sl = model.node(so.node);
    let s = sl.op_as::<Slice>()?;
    let rank = model.outlet_fact(sl.inputs[0]).ok()?.rank();
    // the sliced axis stays the last one (the contraction axis) through the reshapes
    let len = s.end.clone() - s.start.clone();
    let last = model.outlet_fact(mm.inputs[0]).ok()?.shape.last()?.clone();
    if s.axis + 1 != rank || sl.outputs[0].successors.len() != 1 || last != len {
        return None;
    }
    Some(SplitSide {
        op: *op,
        p: sl.inputs[0],
        start: s.start.clone(),
        end: s.end.clone(),
        operand: mm.inputs[1],
        pre,
        post,
    })
}

/// Where axis `c` is after `ops`, when none of them splits, merges or removes it.
fn axis_through(ops: &[AxisOp], mut c: usize) -> Option<usize> {
    for op in ops {
        match op {
            AxisOp::Add(x) if *x <= c => c += 1,
            AxisOp::Add(_) => {}
            AxisOp::Rm(x) if *x == c => return None,
            AxisOp::Rm(x) if *x < c => c -= 1,
            AxisOp::Rm(_) => {}
            AxisOp::Reshape(at, from, to) => {
                if c >= *at && c < at + from.len() {
                    return None;
                }
                if c >= at + from.len() {
                    c = c + to.len() - from.len();
                }
            }
            AxisOp::Move(..) => return None,
        }
    }
    Some(c)
}

fn unsplit_at(model: &TypedModel, id: usize) -> Option<TypedModelPatch> {
    use tract_onnx::tract_core::ops::array::TypedConcat;
    let node = model.node(id);
    if binop_name(node).as_deref() != Some("Add") || node.inputs.len() != 2 {
        return None;
    }
    let l = split_side(model, id, node.inputs[0])?;
    let r = split_side(model, id, node.inputs[1])?;
    let (first, second) = if l.start == 0.to_dim() { (l, r) } else { (r, l) };
    let full = model.outlet_fact(first.p).ok()?.shape.last()?.clone();
    if first.op != second.op
        || first.p != second.p
        || first.start != 0.to_dim()
        || first.end != second.start
        || second.end != full
        || first.pre != second.pre
        || first.post != second.post
    {
        return None;
    }
    let (a, b) = (first.operand, second.operand);
    let brank = model.outlet_fact(a).ok()?.rank();
    if brank < 2 || model.outlet_fact(b).ok()?.rank() != brank {
        return None;
    }
    // the operand's contraction axis
    let axis = if first.op.transpose_b { brank - 1 } else { brank - 2 };
    let concat_of = |a: OutletId, b: OutletId, axis: usize| {
        model
            .nodes()
            .iter()
            .find(|n| n.op_as::<TypedConcat>().is_some_and(|c| c.axis == axis) && n.inputs.as_slice() == [a, b])
            .map(|n| OutletId::new(n.id, 0))
    };
    // the concatenation made before the same reshapes of both operands (the KV cache's `present`), when the
    // reshapes leave its axis alone
    let mut existing: Option<(OutletId, Vec<AxisOp>)> = concat_of(a, b, axis).map(|c| (c, vec![]));
    let ((a0, a_ops), (b0, b_ops)) = (reshapes_before(model, a), reshapes_before(model, b));
    // both operands slices of one tensor, back to back along an axis: that tensor (tract slices the concatenation)
    let halves = |a0: OutletId, b0: OutletId| -> Option<(OutletId, usize)> {
        use tract_onnx::tract_core::ops::array::Slice;
        let (na, nb) = (model.node(a0.node), model.node(b0.node));
        let (sa, sb) = (na.op_as::<Slice>()?, nb.op_as::<Slice>()?);
        let whole = model.outlet_fact(na.inputs[0]).ok()?.shape.get(sa.axis)?.clone();
        (na.inputs[0] == nb.inputs[0]
            && sa.axis == sb.axis
            && sa.start == 0.to_dim()
            && sa.end == sb.start
            && sb.end == whole)
            .then_some((na.inputs[0], sa.axis))
    };
    if existing.is_none() && a_ops == b_ops {
        if let Some((x, c)) = halves(a0, b0) {
            if axis_through(&a_ops, c) == Some(axis) {
                existing = Some((x, a_ops.clone()));
            }
        }
    }
    if existing.is_none() && !a_ops.is_empty() && a_ops == b_ops {
        let rank0 = model.outlet_fact(a0).ok()?.rank();
        for c in 0..rank0 {
            if let Some(cat) = concat_of(a0, b0, c) {
                if axis_through(&a_ops, c) == Some(axis) {
                    existing = Some((cat, a_ops.clone()));
                    break;
                }
            }
        }
    }
    let name = node.name.clone();
    let build = || -> TractResult<TypedModelPatch> {
        let mut patch = TypedModelPatch::new(format!("merge the concat-split matmuls at {name}"));
        let mut x = patch.tap_model(model, first.p)?;
        for (i, op) in first.pre.iter().enumerate() {
            x = patch.wire_node(format!("{name}.unsplit_in{i}"), op.clone(), &[x])?[0];
        }
        let cat = match &existing {
            Some((c, ops)) => {
                let mut c = patch.tap_model(model, *c)?;
                for (i, op) in ops.iter().enumerate() {
                    c = patch.wire_node(format!("{name}.unsplit_kv{i}"), op.clone(), &[c])?[0];
                }
                c
            }
            None => {
                let (at, bt) = (patch.tap_model(model, a)?, patch.tap_model(model, b)?);
                patch.wire_node(format!("{name}.unsplit_concat"), TypedConcat::new(axis), &[at, bt])?[0]
            }
        };
        let mut y = patch.wire_node(format!("{name}.unsplit_matmul"), first.op, &[x, cat])?[0];
        for (i, op) in first.post.iter().enumerate() {
            y = patch.wire_node(format!("{name}.unsplit_out{i}"), op.clone(), &[y])?[0];
        }
        if patch.outlet_fact(y)? != model.outlet_fact(OutletId::new(id, 0))? {
            bail!("shapes differ");
        }
        patch.shunt_outside(model, OutletId::new(id, 0), y)?;
        Ok(patch)
    };
    build().ok()
}

/// `(y, c)` when `o` (through reshapes) is a softcap `Mul(Tanh(y'), c)` with `y' = y / c` (or `y · 1/c`), c > 0.
fn strip_softcap(model: &TypedModel, o: OutletId) -> Option<(OutletId, f32)> {
    let m = model.node(before_reshapes(model, o).node);
    if binop_name(m).as_deref() != Some("Mul") {
        return None;
    }
    let (c, t) = match (scalar_const(model, m.inputs[1]), scalar_const(model, m.inputs[0])) {
        (Some(c), _) => (c, m.inputs[0]),
        (None, Some(c)) => (c, m.inputs[1]),
        _ => return None,
    };
    let tanh = model.node(t.node);
    let is_tanh =
        tanh.op_as::<tract_onnx::tract_core::ops::element_wise::ElementWiseOp>().is_some_and(|e| e.0.name() == "Tanh");
    if !(is_tanh && c > 0.0 && c.is_finite()) {
        return None;
    }
    let d = model.node(before_reshapes(model, tanh.inputs[0]).node);
    let inv = match binop_name(d).as_deref() {
        Some("Div") => scalar_const(model, d.inputs[1]).map(|k| 1.0 / k),
        Some("Mul") => scalar_const(model, d.inputs[1]).or(scalar_const(model, d.inputs[0])),
        _ => None,
    }?;
    if (inv * c - 1.0).abs() > 1e-5 {
        return None;
    }
    let y = if scalar_const(model, d.inputs[1]).is_some() { d.inputs[0] } else { d.inputs[1] };
    Some((y, c))
}

/// Recognises the decomposed attention that exporters emit — `MatMul(Q, Kᵀ)` (· or / a scalar) (softcap
/// `c·tanh(x/c)`) (+ a float mask, or `Where(bool mask, x, −inf)`) → Softmax over the keys (→ `Where(IsNaN(p), 0, p)`) → `MatMul(·, V)`, with the batch and head axes merged or
/// split by reshapes around the matmuls — and computes it with one [`AttentionYOp`] (the fused kernel on the GPU)
/// on the 4D `[batch, heads, seq, head]` Q, K and V the reshapes start from (GQA: K from before its repeat_kv, V
/// as the grouped matmul reads it), when every shape checks; anything else is left alone. Returns how many it
/// fused.
pub fn fuse_decomposed_attention(model: &mut TypedModel) -> TractResult<usize> {
    use tract_onnx::tract_core::ops::einsum::prefix_matmul::PrefixMatMul;
    use tract_onnx::tract_core::ops::logic::Iff;
    use tract_onnx::tract_core::ops::nn::{Softmax, SoftmaxKind};
    let mut done = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(sm) = node.op_as::<Softmax>() else { continue };
        let fact = &node.outputs[0].fact;
        if sm.kind != SoftmaxKind::Softmax
            || sm.quant_output_dt.is_some()
            || fact.datum_type != DatumType::F32
            || fact.rank() != 4
            || sm.axes.as_slice() != [3]
        {
            continue;
        }
        let [b, hq, s, t]: [TDim; 4] = [0, 1, 2, 3].map(|i| fact.shape[i].clone());
        // upstream: (+ mask) (· scale) reshapes MatMul(Q, Kᵀ)
        let mut x = node.inputs[0];
        let mut mask = None;
        let fits_mask = |o: OutletId, dt: DatumType| {
            model.outlet_fact(o).is_ok_and(|mf| {
                let target = [&b, &hq, &s];
                mf.rank() == 4
                    && mf.datum_type == dt
                    && mf.shape[3] == t
                    && (0..3).all(|i| mf.shape[i] == *target[i] || mf.shape[i] == 1.to_dim())
            })
        };
        let xn = model.node(x.node);
        if xn.op_is::<Iff>() && xn.inputs.len() == 3 {
            // masked_fill: Where(mask, scores, -inf or the float minimum)
            let fill = scalar_const(model, xn.inputs[2]);
            if !fill.is_some_and(|f| f <= -1e30) || !fits_mask(xn.inputs[0], DatumType::Bool) {
                continue;
            }
            mask = Some(xn.inputs[0]);
            x = xn.inputs[1];
        } else if binop_name(model.node(x.node)).as_deref() == Some("Add") {
            let add = model.node(x.node);
            let ranks: Vec<usize> =
                add.inputs.iter().map(|i| model.outlet_fact(*i).map(|f| f.rank()).unwrap_or(0)).collect();
            // the scores come from a matmul (through reshapes / a scale); the other operand is the mask
            let from_mm = |o: OutletId| {
                let o = strip_softcap(model, o).map_or(o, |(y, _)| y);
                let mut o = before_reshapes(model, o);
                if matches!(binop_name(model.node(o.node)).as_deref(), Some("Mul" | "Div")) {
                    o = before_reshapes(model, model.node(o.node).inputs[0]);
                }
                model.node(o.node).op_is::<PrefixMatMul>()
            };
            let (si, mi) = if from_mm(add.inputs[0]) { (0, 1) } else { (1, 0) };
            let mf = model.outlet_fact(add.inputs[mi])?;
            // numpy broadcasting of the first three axes; the keys' axis whole (the kernel masks past its end)
            let target = [&b, &hq, &s];
            let fits = ranks[mi] == 4
                && mf.datum_type == DatumType::F32
                && mf.shape[3] == t
                && (0..3).all(|i| mf.shape[i] == *target[i] || mf.shape[i] == 1.to_dim());
            if !fits {
                continue;
            }
            mask = Some(add.inputs[mi]);
            x = add.inputs[si];
        }
        let mut scale = 1.0f32;
        let mut softcap = 0.0f32;
        if let Some((y, c)) = strip_softcap(model, x) {
            softcap = c;
            x = y;
        }
        // a scalar scale commutes with reshapes (tract's declutter moves it across them)
        x = before_reshapes(model, x);
        if let Some(op) = binop_name(model.node(x.node)).filter(|n| n == "Mul" || n == "Div") {
            let n = model.node(x.node);
            let c = if op == "Mul" {
                scalar_const(model, n.inputs[1]).or(scalar_const(model, n.inputs[0]))
            } else {
                scalar_const(model, n.inputs[1]).map(|c| 1.0 / c)
            };
            let Some(c) = c.filter(|c| c.is_finite()) else { continue };
            let data = if scalar_const(model, n.inputs[1]).is_some() { n.inputs[0] } else { n.inputs[1] };
            scale = c;
            x = data;
        }
        let mm1 = model.node(before_reshapes(model, x).node);
        let Some(m1) = mm1.op_as::<PrefixMatMul>() else { continue };
        if m1.transpose_a || !m1.transpose_b || m1.transpose_c || m1.quantize_output.is_some() {
            continue;
        }
        let (qa, kb) = (mm1.inputs[0], mm1.inputs[1]);
        // downstream: (Where(IsNaN(p), 0, p)) reshapes MatMul(p, V) reshapes
        let mut p = OutletId::new(id, 0);
        let succ = &node.outputs[0].successors;
        if succ.len() == 2 {
            let (n0, n1) = (model.node(succ[0].node), model.node(succ[1].node));
            let (isnan, iff) = if n0.op_is::<Iff>() { (n1, n0) } else { (n0, n1) };
            let ok = iff.op_is::<Iff>()
                && isnan.op.name().contains("IsNan")
                && iff.inputs[0] == OutletId::new(isnan.id, 0)
                && iff.inputs[2] == p
                && scalar_const(model, iff.inputs[1]) == Some(0.0)
                && isnan.outputs[0].successors.len() == 1;
            if !ok {
                continue;
            }
            p = OutletId::new(iff.id, 0);
        }
        let p_end = after_reshapes(model, p);
        let Some(mm2_id) = sole_successor(model, p_end) else { continue };
        let mm2 = model.node(mm2_id);
        let Some(m2) = mm2.op_as::<PrefixMatMul>() else { continue };
        if m2.transpose_a || m2.transpose_b || m2.transpose_c || m2.quantize_output.is_some() || mm2.inputs[0] != p_end
        {
            continue;
        }
        let vb = mm2.inputs[1];
        let out = after_reshapes(model, OutletId::new(mm2_id, 0));
        // the 4D tensors the reshapes start from, and the shapes the matmuls see
        let mut q4 = rank4_before_reshapes(model, qa);
        // a query scaled before the matmul (optimum splits 1/sqrt(d) between Q and K): the kernel scales
        let mut q_scale = 1.0;
        if let Some((data, c)) = strip_scalar_mul(model, q4) {
            if model.outlet_fact(data).is_ok_and(|f| f.rank() == 4) && sole_successor(model, q4).is_some() {
                q4 = data;
                q_scale = c;
            }
        }
        let k4 = rank4_before_reshapes(model, kb);
        let v4 = rank4_before_reshapes(model, vb);
        let shape = |o: OutletId| model.outlet_fact(o).map(|f| f.shape.to_tvec());
        let (q4s, k4s, v4s, outs) = (shape(q4)?, shape(k4)?, shape(v4)?, shape(out)?);
        if q4s.len() != 4 || k4s.len() != 4 || v4s.len() != 4 || outs.len() != 4 {
            continue;
        }
        let (hk, hv, dk, dv) = (k4s[1].clone(), v4s[1].clone(), k4s[3].clone(), v4s[3].clone());
        let four_ok = q4s[0] == b
            && q4s[1] == hq
            && q4s[2] == s
            && q4s[3] == dk
            && k4s[0] == b
            && k4s[2] == t
            && v4s[0] == b
            && v4s[2] == t
            && outs.as_slice() == [b.clone(), hq.clone(), s.clone(), dv.clone()];
        if !four_ok {
            continue;
        }
        // memory order: the matmuls' (batch, m) must enumerate (b, h, s) as the 4D tensors do
        let (qa_s, kb_s, pa_s, vb_s) = (shape(qa)?, shape(kb)?, shape(p_end)?, shape(vb)?);
        let batch = |s: &TVec<TDim>| -> TDim { s[..s.len() - 2].iter().cloned().product() };
        let r = qa_s.len();
        let r2 = pa_s.len();
        // K / V may broadcast over Q's trailing batch axes (GQA folded into the matmul: Q [b, kv, group, s, d]
        // against K [b, kv, 1, t, d], or into its rows: Q [b·kv, group·s, d] against K [b·kv, t, d]): q head
        // (kv, g) reads kv head kv, as the kernel does
        let grouped = |a: &[TDim], k: &[TDim]| {
            let split = a.iter().zip(k).position(|(x, y)| x != y).unwrap_or(a.len());
            a.len() == k.len() && k[split..].iter().all(|d| *d == 1.to_dim())
        };
        let mm_ok = r >= 2
            && kb_s.len() == r
            && grouped(&qa_s[..r - 2], &kb_s[..r - 2])
            && batch(&kb_s) == b.clone() * hk.clone()
            && qa_s[r - 1] == dk
            && kb_s[r - 2] == t
            && kb_s[r - 1] == dk
            // (batch, m) enumerate (b, h, s); with GQA folded into m (Q [b·kv, group·s, d]) each K batch still
            // serves one kv head's group of rows
            && batch(&qa_s) * qa_s[r - 2].clone() == b.clone() * hq.clone() * s.clone()
            && r2 >= 2
            && vb_s.len() == r2
            && grouped(&pa_s[..r2 - 2], &vb_s[..r2 - 2])
            && pa_s[r2 - 1] == t
            && vb_s[r2 - 2] == t
            && vb_s[r2 - 1] == dv
            && batch(&vb_s) == b.clone() * hv.clone()
            && batch(&pa_s) * pa_s[r2 - 2].clone() == b.clone() * hq.clone() * s.clone();
        if !mm_ok || [q4, k4, v4].iter().any(|o| model.outlet_fact(*o).map_or(true, |f| f.datum_type != DatumType::F32))
        {
            continue;
        }
        // GQA's repeat_kv: K read from before its repetition (never materialised for the kernel)
        let mut k4 = k4;
        // a scalar factor tract moved onto K: the kernel reads K as it is (a KV cache in place) and scales
        if let Some((data, c)) = crate::kv::scalar_factor(model, k4) {
            k4 = data;
            scale *= c;
        }
        if hk != hv {
            match unrepeat_kv(model, k4, &hv) {
                Some((k, c)) => {
                    k4 = k;
                    scale *= c;
                }
                None => continue,
            }
        }
        let config = AttentionConfig {
            q_num_heads: None,
            kv_num_heads: None,
            is_causal: false,
            scale: Some(scale * q_scale),
            softcap,
            qk_mode: 0,
            has_mask: mask.is_some(),
            has_past_key: false,
            has_past_value: false,
            has_nonpad: false,
            seqlens: false,
            window: None,
        };
        let name = model.node(id).name.clone();
        let mut patch = TypedModelPatch::new(format!("fuse decomposed attention at {name}"));
        let mut taps = tvec![patch.tap_model(model, q4)?, patch.tap_model(model, k4)?, patch.tap_model(model, v4)?];
        if let Some(m) = mask {
            taps.push(patch.tap_model(model, m)?);
        }
        let y = patch.wire_node(format!("{name}.attention"), AttentionYOp { config }, &taps)?[0];
        patch.shunt_outside(model, out, y)?;
        patch.apply(model)?;
        done += 1;
    }
    Ok(done)
}
