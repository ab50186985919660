//! KV caches in place: a `present.*` that stays on the GPU lives in a *KV store*, a buffer with spare rows along the
//! sequence axis (`[batch, heads, cap, head]`, `cap` ≥ the logical rows). When it comes back as the next run's
//! `past_key_values.*`, the Concat that appends the new keys / values writes only the new rows into the spare
//! capacity ([`append`]), so a decode step copies O(new tokens), not the whole cache; a full store is replaced by
//! one of twice the capacity (the old rows copied once). The attention kernel reads K / V and past K / V through
//! the store's row stride; every other reader gets a contiguous copy ([`compact`]).
//!
//! Several tensors may share one store (the past of one step and the present of the next): each sees its own
//! first rows, which later appends never overwrite. The store's high-water mark says how many rows are written;
//! an append in place needs the past to end exactly there (else — a past fed twice, as in a retry or a beam — the
//! append copies into a new store and the tensors already handed out keep their data).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tract_onnx::prelude::*;

use crate::context::Context;
use crate::exec::{gpu_size_of, GpuTensor, Recorder};
use crate::kernels::Kernel;
use crate::{Error, Result};

/// Rows a fresh store holds at least.
const MIN_ROWS: usize = 16;

/// A KV store's layout: rows allocated per (batch, head), and the store's high-water mark (rows written).
#[derive(Debug, Clone)]
pub struct KvLayout {
    pub cap: usize,
    high: Arc<AtomicUsize>,
}

impl KvLayout {
    /// Rows of the store written so far (by any tensor sharing it).
    pub fn rows_written(&self) -> usize {
        self.high.load(Ordering::Acquire)
    }
}

/// Whether `kernel` takes its input `slot` as a KV store (the fused attention reads K, V and past K / V through
/// the row stride; a KV Concat and the rotations with their appends append to their pasts in place or compact them
/// themselves); any other reader needs [`compact`] first.
pub fn reads_kv_layout(kernel: &Kernel, slot: usize) -> bool {
    match kernel {
        Kernel::Attention(a) => {
            let c = &a.config;
            let first_past = 3 + c.has_mask as usize;
            slot == 1
                || slot == 2
                || (c.has_past_key && slot == first_past)
                || (c.has_past_value && slot == first_past + c.has_past_key as usize)
        }
        Kernel::Concat { axis: 2, inputs: 2 } => true,
        Kernel::Rotary(r) if r.append => {
            let k = 3 + r.config.has_positions as usize;
            slot == k + 1 || slot == k + 3
        }
        Kernel::QkvRope(q) => slot + 2 >= q.arity(),
        _ => false,
    }
}

/// `t` as a contiguous tensor: itself when it is, else a copy of its logical rows into a pooled buffer.
pub fn compact(ctx: &Context, rec: &mut Recorder, t: &GpuTensor) -> Result<GpuTensor> {
    let Some(l) = &t.kv else { return Ok(t.clone()) };
    let [b, h, rows, d] = dims4(&t.shape)?;
    let out = rec.alloc_unpoisoned(ctx, &t.shape, t.dt)?;
    let row = (d * gpu_size_of(t.dt)) as u64;
    copy_rows(ctx, rec, t, l.cap, &out, rows, 0, b * h, rows, row)?;
    rec.counters.kv_compact_bytes += (b * h * rows) as u64 * row;
    Ok(out)
}

fn dims4(shape: &[usize]) -> Result<[usize; 4]> {
    match *shape {
        [b, h, s, d] => Ok([b, h, s, d]),
        _ => Err(Error::new(format!("webgpu: a KV store of shape {shape:?}"))),
    }
}

/// Copies `rows` rows of every (batch, head) block from `src` (`src_stride` rows per block) into `dst`
/// (`dst_stride` rows per block) starting at row `dst_row`: one buffer copy when both sides are contiguous, else one
/// dispatch of the kernels' strided copy over 4-byte words (a float16 row of an even head size is whole words) —
/// not a buffer copy per block, each of which would end the compute pass around it.
#[allow(clippy::too_many_arguments)]
fn copy_rows(
    ctx: &Context,
    rec: &mut Recorder,
    src: &GpuTensor,
    src_stride: usize,
    dst: &GpuTensor,
    dst_stride: usize,
    dst_row: usize,
    blocks: usize,
    rows: usize,
    row_bytes: u64,
) -> Result<()> {
    if rows == 0 || blocks == 0 {
        return Ok(());
    }
    if src_stride == rows && dst_stride == rows && dst_row == 0 {
        return rec.copy(&src.buffer, 0, &dst.buffer, 0, blocks as u64 * rows as u64 * row_bytes);
    }
    if !row_bytes.is_multiple_of(4) {
        return Err(Error::new(format!("webgpu: KV rows of {row_bytes} bytes (not whole 4-byte words)")));
    }
    let w = (row_bytes / 4) as usize;
    let words = |t: &GpuTensor| GpuTensor {
        buffer: t.buffer.clone(),
        shape: tvec![(t.buffer.size() / 4) as usize],
        dt: DatumType::U32,
        kv: None,
    };
    let (a, out) = (words(src), words(dst));
    let (sa, so) = ([src_stride * w, 1], [dst_stride * w, 1]);
    crate::kernels::strided_copy(ctx, rec, &a, 0, &sa, &out, dst_row * w, &so, &[blocks, rows * w])
}

/// Rows of a fresh or grown store for `rows` logical rows (`old`: the capacity outgrown).
fn capacity_for(rows: usize, old: usize) -> usize {
    (rows + 1).next_power_of_two().max(MIN_ROWS).max(old.saturating_mul(2))
}

/// The Concat along axis 2 of `past` and `new` (both `[batch, heads, rows, head]`) as a KV store, or `None` when
/// the caller should concatenate the ordinary way: in place when `past` is a store with room that ends at its
/// high-water mark; into a new store (capacity doubled, or fresh when `make_store`) otherwise, when `past` is a
/// store or `make_store` asks for one (a `present.*` that leaves the run on the GPU).
pub fn append(
    ctx: &Context,
    rec: &mut Recorder,
    past: &GpuTensor,
    new: &GpuTensor,
    make_store: bool,
) -> Result<Option<GpuTensor>> {
    if past.shape.len() != 4 || new.shape.len() != 4 || past.dt != new.dt || (past.kv.is_none() && !make_store) {
        return Ok(None);
    }
    let [b, h, pl, d] = dims4(&past.shape)?;
    let [nb, nh, nl, nd] = dims4(&new.shape)?;
    let es = gpu_size_of(past.dt);
    let row = (d * es) as u64;
    if nb != b || nh != h || nd != d || !row.is_multiple_of(4) || row == 0 || b * h == 0 {
        return Ok(None);
    }
    let new = if new.kv.is_some() { compact(ctx, rec, new)? } else { new.clone() };
    let total = pl + nl;
    let shape: TVec<usize> = tvec![b, h, total, d];
    if let Some(l) = &past.kv {
        if l.cap >= total && l.high.compare_exchange(pl, total, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            let out = GpuTensor { buffer: past.buffer.clone(), shape, dt: past.dt, kv: Some(l.clone()) };
            copy_rows(ctx, rec, &new, nl, &out, l.cap, pl, b * h, nl, row)?;
            rec.counters.kv_appends_in_place += 1;
            rec.counters.kv_append_bytes += (b * h * nl) as u64 * row;
            return Ok(Some(out));
        }
    }
    let Some(out) = grown_store(ctx, rec, past, total)? else { return Ok(None) };
    let cap = out.row_stride();
    copy_rows(ctx, rec, &new, nl, &out, cap, pl, b * h, nl, row)?;
    rec.counters.kv_append_bytes += (b * h * nl) as u64 * row;
    Ok(Some(out))
}

/// A new KV store for `past` (`[batch, heads, rows, head]`, rows of whole 4-byte words) grown to hold `total` rows
/// (capacity doubled, or fresh; within the binding limit), its past rows copied, its shape and high-water mark at
/// `total` (the caller writes the rest); `None` when the limit leaves no room for `total`.
fn grown_store(ctx: &Context, rec: &mut Recorder, past: &GpuTensor, total: usize) -> Result<Option<GpuTensor>> {
    let [b, h, pl, d] = dims4(&past.shape)?;
    let row = (d * gpu_size_of(past.dt)) as u64;
    let old = past.kv.as_ref().map_or(0, |l| l.cap);
    let mut cap = capacity_for(total, old);
    let limit = ctx.caps.max_storage_binding.min(ctx.caps.max_buffer_size);
    let per_row = (b * h) as u64 * row;
    if cap as u64 * per_row > limit {
        cap = (limit / per_row) as usize;
    }
    if cap < total {
        return Ok(None);
    }
    let buffer = Arc::new(ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("kiln kv store"),
        size: (cap as u64 * per_row).max(4),
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    }));
    let layout = KvLayout { cap, high: Arc::new(AtomicUsize::new(total)) };
    let out = GpuTensor { buffer, shape: tvec![b, h, total, d], dt: past.dt, kv: Some(layout) };
    copy_rows(ctx, rec, past, past.row_stride(), &out, cap, 0, b * h, pl, row)?;
    rec.counters.kv_stores_created += 1;
    rec.counters.kv_grow_bytes += (b * h * pl) as u64 * row;
    Ok(Some(out))
}

/// A present for `past` (`[batch, heads, rows, head]`, f32 or f16) with room for `new` (`[batch, heads, rows, head]`)
/// after its rows, the past rows copied in and the new ones left for the caller to write (a kernel that appends
/// itself: [`crate::qmatmul::QkvRope`]) — for when [`reserve_pair`] finds no room in place: a KV store (capacity as
/// [`append`] grows one) when `past` is a store or `make_store` asks for one, else a pooled tensor of exactly the
/// present's rows. Its shape counts the new rows. `None` when the shapes or types do not allow it.
pub fn present_with_room(
    ctx: &Context,
    rec: &mut Recorder,
    past: &GpuTensor,
    new: &[usize],
    make_store: bool,
) -> Result<Option<GpuTensor>> {
    let (Ok([b, h, pl, d]), Ok([nb, nh, nl, nd])) = (dims4(&past.shape), dims4(new)) else { return Ok(None) };
    let row = (d * gpu_size_of(past.dt)) as u64;
    let stored = matches!(past.dt, DatumType::F32 | DatumType::F16);
    if !stored || (nb, nh, nd) != (b, h, d) || !row.is_multiple_of(4) || row == 0 || b * h == 0 {
        return Ok(None);
    }
    let total = pl + nl;
    if past.kv.is_none() && !make_store {
        let out = rec.alloc_unpoisoned(ctx, &[b, h, total, d], past.dt)?;
        copy_rows(ctx, rec, past, pl, &out, total, 0, b * h, pl, row)?;
        return Ok(Some(out));
    }
    grown_store(ctx, rec, past, total)
}

/// [`append`], or where it declines the Concat kernel (a KV store among the inputs compacted first): a present as
/// the Concat along axis 2 of `past` and `new` makes it.
pub fn append_or_concat(
    ctx: &Context,
    rec: &mut Recorder,
    past: &GpuTensor,
    new: &GpuTensor,
    make_store: bool,
    syms: &SymbolValues,
) -> Result<GpuTensor> {
    if let Some(t) = append(ctx, rec, past, new, make_store)? {
        return Ok(t);
    }
    let (p, n) = (compact(ctx, rec, past)?, compact(ctx, rec, new)?);
    let t = Kernel::Concat { axis: 2, inputs: 2 }.encode(ctx, rec, &[&p, &n], syms)?;
    for (c, was) in [(p, past), (n, new)] {
        if was.kv.is_some() {
            rec.release(c);
        }
    }
    Ok(t)
}

/// Room for an in-place append of `new[i]` to each of `past` (`[batch, heads, rows, head]`, f32 or f16), reserved
/// for both or neither: the two presents (views of the stores with the new rows counted), when both pasts are KV
/// stores with room that end at their high-water mark and each new tensor (`[batch, heads, rows, head]` shapes,
/// f32 values the caller writes) has the past's batch, heads and head size. The caller writes the new rows
/// ([`crate::attention::RotarySpec::encode_append`], [`crate::qmatmul::QkvRope`]).
pub fn reserve_pair(past: [&GpuTensor; 2], new: [&[usize]; 2]) -> Option<[GpuTensor; 2]> {
    let mut plan = vec![];
    for (p, n) in past.iter().zip(new) {
        let l = p.kv.as_ref()?;
        let ([b, h, pl, d], [nb, nh, nl, nd]) = (dims4(&p.shape).ok()?, dims4(n).ok()?);
        let stored = matches!(p.dt, DatumType::F32 | DatumType::F16);
        let ok = stored && (nb, nh, nd) == (b, h, d);
        if !ok || l.cap < pl + nl || l.rows_written() != pl {
            return None;
        }
        plan.push((l, pl, pl + nl));
    }
    if Arc::ptr_eq(&past[0].buffer, &past[1].buffer) {
        return None;
    }
    for (i, (l, from, to)) in plan.iter().enumerate() {
        if l.high.compare_exchange(*from, *to, Ordering::AcqRel, Ordering::Acquire).is_err() {
            // give back what this call reserved
            for (l, from, to) in &plan[..i] {
                let _ = l.high.compare_exchange(*to, *from, Ordering::AcqRel, Ordering::Acquire);
            }
            return None;
        }
    }
    let present = |i: usize| {
        let (p, (l, _, to)) = (past[i], &plan[i]);
        let shape: TVec<usize> = tvec![p.shape[0], p.shape[1], *to, p.shape[3]];
        GpuTensor { buffer: p.buffer.clone(), shape, dt: p.dt, kv: Some((*l).clone()) }
    };
    Some([present(0), present(1)])
}

/// `o = x · c` (or `c · x`) with `c` a finite scalar f32 constant: `(x, c)`.
pub(crate) fn scalar_factor(model: &TypedModel, o: OutletId) -> Option<(OutletId, f32)> {
    use crate::attention::{binop_name, scalar_const};
    let n = model.node(o.node);
    if binop_name(n).as_deref() != Some("Mul") || n.inputs.len() != 2 {
        return None;
    }
    let (c, x) = match (scalar_const(model, n.inputs[1]), scalar_const(model, n.inputs[0])) {
        (Some(c), _) => (c, n.inputs[0]),
        (None, Some(c)) => (c, n.inputs[1]),
        _ => return None,
    };
    let same = model.outlet_fact(x).ok()?.shape == model.outlet_fact(o).ok()?.shape;
    (c.is_finite() && same).then_some((x, c))
}

/// Lets the fused attention read K and V from before GQA's repeat_kv (`Reshape([b, kv, g, t, d] → [b, kv·g, t,
/// d])` of an `Expand` of an `Unsqueeze(2)`), as exporters emit it in front of ONNX Attention (opset 23): the
/// kernel shares each kv head among its q heads itself, so the repeated K / V are never materialised, and a
/// `present.*` kept as a KV store is read in place. Only 4D K / V without past inputs, both repeated alike (V
/// without a scale). Returns how many attention nodes it rewrote.
pub fn unrepeat_attention_kv(model: &mut TypedModel) -> TractResult<usize> {
    use crate::attention::{unrepeat_kv, AttentionYOp};
    use tract_onnx::tract_core::internal::*;
    let mut done = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(op) = node.op_as::<AttentionYOp>() else { continue };
        let c = &op.config;
        if c.has_past_key || c.has_past_value || node.inputs.len() < 3 {
            continue;
        }
        let (k, v) = (node.inputs[1], node.inputs[2]);
        let kv_heads = |o: OutletId| match model.node(o.node).op_as::<AxisOp>() {
            Some(AxisOp::Reshape(1, from, to)) if from.len() == 2 && to.len() == 1 => Some(from[0].clone()),
            _ => None,
        };
        let (Some(hk), Some(hv)) = (kv_heads(k), kv_heads(v)) else { continue };
        if hk != hv || model.outlet_fact(k)?.rank() != 4 || model.outlet_fact(v)?.rank() != 4 {
            continue;
        }
        let (Some((k0, ck)), Some((v0, cv))) = (unrepeat_kv(model, k, &hk), unrepeat_kv(model, v, &hv)) else {
            continue;
        };
        if cv != 1.0 {
            continue;
        }
        let dk = model.outlet_fact(k)?.shape[3].to_usize().ok();
        let mut config = c.clone();
        if ck != 1.0 {
            let Some(base) = c.scale.or(dk.map(|d| 1.0 / (d as f32).sqrt())) else { continue };
            config.scale = Some(base * ck);
        }
        let name = node.name.clone();
        let inputs = node.inputs.clone();
        let mut patch = TypedModelPatch::new(format!("unrepeat kv of {name}"));
        let mut taps = tvec![];
        for (i, o) in inputs.iter().enumerate() {
            let o = match i {
                1 => k0,
                2 => v0,
                _ => *o,
            };
            taps.push(patch.tap_model(model, o)?);
        }
        let y = patch.wire_node(format!("{name}.unrepeated"), AttentionYOp { config }, &taps)?[0];
        patch.shunt_outside(model, OutletId::new(id, 0), y)?;
        patch.apply(model)?;
        done += 1;
    }
    Ok(done)
}

/// `Cast(to)` as tract's op, when `node` is one.
fn cast_to(node: &TypedNode) -> Option<DatumType> {
    node.op_as::<tract_onnx::tract_core::ops::cast::Cast>().map(|c| c.to)
}

/// `(past16, new32)` when `o` is `Concat(Cast32(past16), new32)` along axis 2 of 4D tensors: a float16 model's KV
/// concatenation as kiln-graph's float16 pass leaves it (computed in float32).
fn f16_kv_concat(model: &TypedModel, o: OutletId) -> Option<(OutletId, OutletId)> {
    use tract_onnx::tract_core::ops::array::TypedConcat;
    let node = model.node(o.node);
    let concat = node.op_as::<TypedConcat>()?;
    let fact = model.outlet_fact(o).ok()?;
    if concat.axis != 2 || node.inputs.len() != 2 || fact.rank() != 4 || fact.datum_type != DatumType::F32 {
        return None;
    }
    let (past32, new32) = (node.inputs[0], node.inputs[1]);
    let up = model.node(past32.node);
    let past16 = *up.inputs.first()?;
    let ok = cast_to(up) == Some(DatumType::F32)
        && up.inputs.len() == 1
        && model.outlet_fact(past16).ok()?.datum_type == DatumType::F16
        && model.outlet_fact(new32).ok()?.datum_type == DatumType::F32;
    ok.then_some((past16, new32))
}

/// A float16 model computes in float32 (kiln-graph's float16 pass), so its KV path is `present =
/// Cast16(Concat(Cast32(past16), new32))`: the cache is cast up and down whole every step and never appended in
/// place. Since f16 → f32 → f16 is the identity, `present` is exactly `Concat16(past16, Cast16(new32))`, which this
/// pass rewires it to: the concatenation in f16, so [`append`] writes only the new rows into the f16 store that
/// `past16` comes in. Other readers keep the float32 concatenation (exact: the new rows unrounded); the fused
/// attention reads the past from the f16 store instead ([`attention_reads_f16_past`], run first), so for it the
/// float32 concatenation is gone. Returns how many it rewrote.
pub fn concat_kv_in_f16(model: &mut TypedModel) -> TractResult<usize> {
    use tract_onnx::tract_core::internal::*;
    use tract_onnx::tract_core::ops::array::TypedConcat;
    use tract_onnx::tract_core::ops::cast::cast;
    let mut done = 0;
    for id in model.eval_order()? {
        let out = OutletId::new(id, 0);
        let Some((past16, new32)) = f16_kv_concat(model, out) else { continue };
        let node = model.node(id);
        let downs: Vec<usize> = node.outputs[0]
            .successors
            .iter()
            .map(|s| s.node)
            .filter(|n| cast_to(model.node(*n)) == Some(DatumType::F16) && model.node(*n).inputs.len() == 1)
            .collect();
        if downs.is_empty() {
            continue;
        }
        let name = node.name.clone();
        let mut patch = TypedModelPatch::new(format!("concatenate {name} in f16"));
        let p = patch.tap_model(model, past16)?;
        let n = patch.tap_model(model, new32)?;
        let n16 = patch.wire_node(format!("{name}.new_f16"), cast(DatumType::F16), &[n])?[0];
        let c16 = patch.wire_node(format!("{name}.f16"), TypedConcat::new(2), &[p, n16])?[0];
        for d in downs {
            patch.shunt_outside(model, OutletId::new(d, 0), c16)?;
        }
        patch.apply(model)?;
        done += 1;
    }
    Ok(done)
}

/// The fused attention of a float16 model reads K = `Concat(Cast32(past_k16), k32)` and V likewise (the float16
/// pass's KV concatenations): it becomes an attention with past inputs — K = `k32`, V = `v32`, past K / V the f16
/// caches, read in place (a KV store, through its row stride) and converted exactly — the same keys in the same
/// order, so the float32 concatenations of the whole cache are no longer made. Not for causal attention (its cut
/// depends on the past length) nor GroupQueryAttention's masking. Returns how many attention nodes it rewrote.
pub fn attention_reads_f16_past(model: &mut TypedModel) -> TractResult<usize> {
    use crate::attention::AttentionYOp;
    use tract_onnx::tract_core::internal::*;
    let mut done = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(op) = node.op_as::<AttentionYOp>() else { continue };
        let c = &op.config;
        if c.has_past_key || c.has_past_value || c.is_causal || c.seqlens || node.inputs.len() < 3 {
            continue;
        }
        let (Some((pk, k)), Some((pv, v))) =
            (f16_kv_concat(model, node.inputs[1]), f16_kv_concat(model, node.inputs[2]))
        else {
            continue;
        };
        if model.outlet_fact(k)?.rank() != 4 || model.outlet_fact(v)?.rank() != 4 {
            continue;
        }
        let mut config = c.clone();
        config.has_past_key = true;
        config.has_past_value = true;
        // inputs: Q, K, V, (mask), past K, past V, (nonpad)
        let mut inputs = vec![node.inputs[0], k, v];
        let mut at = 3;
        if c.has_mask {
            inputs.push(node.inputs[at]);
            at += 1;
        }
        inputs.extend([pk, pv]);
        if c.has_nonpad {
            inputs.push(node.inputs[at]);
        }
        let name = node.name.clone();
        let mut patch = TypedModelPatch::new(format!("{name} reads the f16 past"));
        let mut taps = tvec![];
        for o in &inputs {
            taps.push(patch.tap_model(model, *o)?);
        }
        let y = patch.wire_node(format!("{name}.f16_past"), AttentionYOp { config }, &taps)?[0];
        patch.shunt_outside(model, OutletId::new(id, 0), y)?;
        patch.apply(model)?;
        done += 1;
    }
    Ok(done)
}

/// The fused attention reads f16 K / V (and past K / V) itself: an input `Cast32(x16)` in those slots becomes
/// `x16`: the attention converts as it reads (exactly), and an f16 KV store is read in place, through its row
/// stride. Only with an f32 Q (the attention computes in f32 either way; f16 → f32 is exact).
/// Returns how many attention nodes it rewrote.
pub fn attention_reads_f16_kv(model: &mut TypedModel) -> TractResult<usize> {
    use crate::attention::AttentionYOp;
    use tract_onnx::tract_core::internal::*;
    let mut done = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(op) = node.op_as::<AttentionYOp>() else { continue };
        let c = &op.config;
        if node.inputs.is_empty() || model.outlet_fact(node.inputs[0])?.datum_type != DatumType::F32 {
            continue;
        }
        let first_past = 3 + c.has_mask as usize;
        let mut slots = vec![1, 2];
        if c.has_past_key {
            slots.push(first_past);
        }
        if c.has_past_value {
            slots.push(first_past + c.has_past_key as usize);
        }
        let mut inputs = node.inputs.clone();
        let mut changed = false;
        for s in slots {
            let Some(i) = inputs.get(s).copied() else { continue };
            let up = model.node(i.node);
            if cast_to(up) == Some(DatumType::F32)
                && up.inputs.len() == 1
                && model.outlet_fact(up.inputs[0])?.datum_type == DatumType::F16
            {
                inputs[s] = up.inputs[0];
                changed = true;
            }
        }
        if !changed {
            continue;
        }
        let name = node.name.clone();
        let config = c.clone();
        let mut patch = TypedModelPatch::new(format!("{name} reads f16 K / V"));
        let mut taps = tvec![];
        for o in &inputs {
            taps.push(patch.tap_model(model, *o)?);
        }
        let y = patch.wire_node(format!("{name}.f16kv"), AttentionYOp { config }, &taps)?[0];
        patch.shunt_outside(model, OutletId::new(id, 0), y)?;
        patch.apply(model)?;
        done += 1;
    }
    Ok(done)
}
