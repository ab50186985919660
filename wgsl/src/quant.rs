//! Quantized tensors on the GPU (`kernels/quant.wgsl`): DequantizeLinear / QuantizeLinear (tract's per-tensor
//! `DequantizeLinearF32`, `QuantizeLinearU8` / `QuantizeLinearI8`; per-axis ones are plain elementwise chains with
//! casts), DynamicQuantizeLinear (uint8: scale and zero point from a min/max reduction on the GPU), MatMulInteger
//! (what tract imports as a quantized `EinSumMatMul` with an i32 output: exact i32 accumulation), RoundHalfToEven,
//! and com.microsoft GatherBlockQuantized (kiln-ops' `PackedGatherBlockQuantized`: the packed table stays packed).
//!
//! Narrow integers (u8, i8, u16, i16) live on the GPU as one i32 word per element (zero- or sign-extended), like
//! i64 does as i32: every data-movement kernel (Gather, Reshape, Concat, Slice, ...) moves them as 4-byte words.
//!
//! DynamicQuantizeLinear has three outputs; [`split_dynamic_quantize`] rewrites it (before lowering) into three
//! single-output ops: [`DynQuantParams`] (x → f32 `[scale, zero point]`), [`DynQuantApply`] (x, params → u8) and
//! [`DynQuantPick`] (params → the scale, or the u8 zero point), each with the CPU semantics of tract's op.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::einsum::einsum_matmul::EinSumMatMul;
use tract_onnx::tract_core::ops::konst::Const;
use tract_onnx::tract_core::ops::quant::DequantizeLinearF32;

use crate::context::Context;
use crate::exec::{GpuTensor, Recorder};
use crate::kernels::{launch, u32_of, Kernel, MAX_BATCH_RANK};
use crate::{Error, Result};

/// The narrow integer types (one i32 word each on the GPU).
pub fn is_narrow(dt: DatumType) -> bool {
    matches!(dt, DatumType::U8 | DatumType::I8 | DatumType::U16 | DatumType::I16)
}

/// A narrow integer tensor's elements as i32 words (little-endian bytes).
pub(crate) fn widen(t: &Tensor) -> Result<Vec<u8>> {
    let err = |e: TractError| Error::new(format!("webgpu: tensor data: {e}"));
    let view = t.try_as_plain_ram().map_err(err)?;
    let words: Vec<i32> = match t.datum_type() {
        DatumType::U8 => view.as_slice::<u8>().map_err(err)?.iter().map(|v| *v as i32).collect(),
        DatumType::I8 => view.as_slice::<i8>().map_err(err)?.iter().map(|v| *v as i32).collect(),
        DatumType::U16 => view.as_slice::<u16>().map_err(err)?.iter().map(|v| *v as i32).collect(),
        DatumType::I16 => view.as_slice::<i16>().map_err(err)?.iter().map(|v| *v as i32).collect(),
        other => return Err(Error::new(format!("webgpu: {other:?} is not a narrow integer"))),
    };
    Ok(words.iter().flat_map(|w| w.to_le_bytes()).collect())
}

/// i32 words read back into a narrow integer tensor (`None`: `dt` is not narrow).
pub(crate) fn narrow(dt: DatumType, shape: &[usize], bytes: &[u8]) -> Option<Result<Tensor>> {
    fn build<T: Datum + Copy>(shape: &[usize], bytes: &[u8], f: impl Fn(i32) -> T) -> Result<Tensor> {
        let v: Vec<T> = bytes.chunks_exact(4).map(|w| f(i32::from_le_bytes([w[0], w[1], w[2], w[3]]))).collect();
        Tensor::from_shape(shape, &v).map_err(|e| Error::new(format!("webgpu: building a tensor: {e}")))
    }
    Some(match dt {
        DatumType::U8 => build(shape, bytes, |w| w as u8),
        DatumType::I8 => build(shape, bytes, |w| w as i8),
        DatumType::U16 => build(shape, bytes, |w| w as u16),
        DatumType::I16 => build(shape, bytes, |w| w as i16),
        _ => return None,
    })
}

/// The WGSL of a Cast to or from a narrow integer (`x` the input word as f32 bits), with Rust's `as` semantics
/// (what tract's Cast does): floats saturate and truncate toward zero (NaN → 0), integers wrap. `None`: no kernel.
pub fn narrow_cast_expr(from: DatumType, to: DatumType) -> Option<&'static str> {
    use DatumType::*;
    let int_like = |d: DatumType| matches!(d, I32 | I64) || is_narrow(d);
    if is_narrow(from) && !is_narrow(to) {
        return Some(match to {
            F32 => "f32(bitcast<i32>(x))",
            Bool => "b2f(bitcast<i32>(x) != 0)",
            I32 | I64 => "x",
            _ => return None,
        });
    }
    if !is_narrow(to) {
        return None;
    }
    Some(match (from, to) {
        (F32, U8) => "bitcast<f32>(i32(select(clamp(x, 0.0, 255.0), 0.0, is_nan(x))))",
        (F32, I8) => "bitcast<f32>(i32(select(clamp(x, -128.0, 127.0), 0.0, is_nan(x))))",
        (F32, U16) => "bitcast<f32>(i32(select(clamp(x, 0.0, 65535.0), 0.0, is_nan(x))))",
        (F32, I16) => "bitcast<f32>(i32(select(clamp(x, -32768.0, 32767.0), 0.0, is_nan(x))))",
        (Bool, _) => "bitcast<f32>(i32(x))",
        (f, U8) if int_like(f) => "bitcast<f32>(bitcast<i32>(x) & 255)",
        (f, I8) if int_like(f) => "bitcast<f32>((bitcast<i32>(x) << 24u) >> 24u)",
        (f, U16) if int_like(f) => "bitcast<f32>(bitcast<i32>(x) & 65535)",
        (f, I16) if int_like(f) => "bitcast<f32>((bitcast<i32>(x) << 16u) >> 16u)",
        _ => return None,
    })
}

/// How a MatMulInteger operand's axes sit in its tensor (runtime strides come from the shapes).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MatMulIntegerSpec {
    /// Positions of m and k in A, k and n in B, m and n in C (`None`: the axis is absent there, size 1).
    pub a_m: Option<usize>,
    pub a_k: Option<usize>,
    pub b_k: Option<usize>,
    pub b_n: Option<usize>,
    pub c_m: Option<usize>,
    pub c_n: Option<usize>,
    /// Batch axes: (position in C, in A, in B).
    pub batch: Vec<(usize, Option<usize>, Option<usize>)>,
    /// Axes of A or B in no other role (size 1 at run time, checked).
    pub a_free: Vec<usize>,
    pub b_free: Vec<usize>,
    /// The zero points per row of A (else one) / per column of B (else one).
    pub a0_per_m: bool,
    pub b0_per_n: bool,
    /// A constant uint8 / int8 B kept packed on the GPU (four per u32 word): its shape and signedness.
    pub b_packed: Option<(Vec<usize>, bool)>,
}

/// com.microsoft GatherBlockQuantized on its packed table (kiln-ops' `PackedGatherBlockQuantized`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GatherBlockSpec {
    pub bits: u32,
    pub block_size: u32,
    pub rows: usize,
    /// The unpacked shape of one row (the data's dims after the gathered axis 0).
    pub row_shape: Vec<usize>,
    pub zero_points: bool,
}

/// The quantization kernels ([`Kernel::Quant`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum QuantKernel {
    /// tract's DequantizeLinearF32: `f32(x - zero_point) * scale` (scale: the f32's bits).
    Dequantize { scale: u32, zero_point: i32 },
    /// tract's QuantizeLinearU8 / I8: `saturate(round_half_even(x * scale) + zero_point)` (`scale` is tract's
    /// 1 / y_scale, as its bits).
    Quantize { scale: u32, zero_point: i32, to: DatumType },
    /// tract's RoundHalfToEven (f32).
    RoundHalfEven,
    /// [`DynQuantParams`].
    DynParams,
    /// [`DynQuantApply`].
    DynApply,
    /// [`DynQuantPick`].
    DynPick { zero_point: bool },
    /// MatMulInteger: inputs (a, b, bias, a0, a_scale, b0, b_scale, c0, c_scale) with the bias, c0 zero and the
    /// scales one (checked when placed); i32 `Σ (a - a0)(b - b0)`.
    MatMulInteger(Box<MatMulIntegerSpec>),
    /// GatherBlockQuantized: inputs (packed data words, indices, scales[, packed zero points]).
    GatherBlock(GatherBlockSpec),
}

impl QuantKernel {
    pub fn name(&self) -> String {
        match self {
            QuantKernel::Dequantize { .. } => "DequantizeLinear".into(),
            QuantKernel::Quantize { .. } => "QuantizeLinear".into(),
            QuantKernel::RoundHalfEven => "RoundHalfToEven".into(),
            QuantKernel::DynParams => "DynamicQuantizeParams".into(),
            QuantKernel::DynApply => "DynamicQuantizeLinear".into(),
            QuantKernel::DynPick { .. } => "DynamicQuantizePick".into(),
            QuantKernel::MatMulInteger(_) => "MatMulInteger".into(),
            QuantKernel::GatherBlock(_) => "GatherBlockQuantized".into(),
        }
    }

    /// A kernel the placement pass should not treat as cheap (it is worth an upload).
    pub fn is_heavy(&self) -> bool {
        matches!(self, QuantKernel::MatMulInteger(_) | QuantKernel::DynParams | QuantKernel::GatherBlock(_))
    }

    pub fn arity(&self) -> usize {
        match self {
            QuantKernel::Dequantize { .. }
            | QuantKernel::Quantize { .. }
            | QuantKernel::RoundHalfEven
            | QuantKernel::DynParams
            | QuantKernel::DynPick { .. } => 1,
            QuantKernel::DynApply => 2,
            QuantKernel::MatMulInteger(_) => 9,
            QuantKernel::GatherBlock(g) => 3 + g.zero_points as usize,
        }
    }

    pub fn output_dt(&self, dts: &[DatumType]) -> Option<DatumType> {
        use DatumType::*;
        let first = dts.first().copied()?;
        match self {
            QuantKernel::Dequantize { .. } => (is_narrow(first) || first == I32).then_some(F32),
            QuantKernel::Quantize { to, .. } => matches!(first, F32 | I32).then_some(*to),
            QuantKernel::RoundHalfEven => (first == F32).then_some(F32),
            QuantKernel::DynParams => (first == F32).then_some(F32),
            QuantKernel::DynApply => (dts == [F32, F32]).then_some(U8),
            QuantKernel::DynPick { zero_point } => (first == F32).then_some(if *zero_point { U8 } else { F32 }),
            QuantKernel::MatMulInteger(s) => {
                let int = |d: DatumType| is_narrow(d) || d == I32;
                let b_ok =
                    if s.b_packed.is_some() { dts.get(1) == Some(&U32) } else { dts.get(1).is_some_and(|d| int(*d)) };
                (dts.len() == 9 && int(dts[0]) && b_ok && int(dts[3]) && int(dts[5])).then_some(I32)
            }
            QuantKernel::GatherBlock(g) => {
                let ok = matches!(dts, [U32, I64 | I32, F32] | [U32, I64 | I32, F32, U32]);
                (ok && dts.len() == 3 + g.zero_points as usize).then_some(F32)
            }
        }
    }

    pub fn output_shape(&self, inputs: &[&[usize]]) -> Result<TVec<usize>> {
        match self {
            QuantKernel::DynParams => Ok(tvec![2]),
            QuantKernel::DynPick { .. } => Ok(tvec![]),
            QuantKernel::MatMulInteger(s) => {
                let b = s.b_packed.as_ref().map_or(inputs[1], |(shape, _)| &shape[..]);
                Ok(mmi_layout(s, inputs[0], b)?.c_shape)
            }
            QuantKernel::GatherBlock(g) => {
                let mut s: TVec<usize> = inputs[1].into();
                s.extend(g.row_shape.iter().copied());
                Ok(s)
            }
            _ => Ok(inputs[0].into()),
        }
    }

    /// The output as a view of an input's buffer, where no dispatch is needed: DynamicQuantizeLinear's scale is
    /// element 0 of its parameters (`[scale, zero point]`, f32).
    pub(crate) fn alias(&self, inputs: &[&GpuTensor], shape: &[usize], dt: DatumType) -> Option<GpuTensor> {
        match self {
            QuantKernel::DynPick { zero_point: false } if shape.is_empty() && dt == DatumType::F32 => {
                let params = inputs.first()?;
                (params.dt == DatumType::F32 && params.kv.is_none() && !params.is_empty())
                    .then(|| GpuTensor::new(params.buffer.clone(), shape, dt))
            }
            _ => None,
        }
    }

    /// Records the kernel (`out` allocated by the caller).
    pub(crate) fn encode(
        &self,
        ctx: &Context,
        rec: &mut Recorder,
        inputs: &[&GpuTensor],
        out: &GpuTensor,
    ) -> Result<()> {
        let n = out.len();
        let (gx, gy) = ctx.grid((n as u64).div_ceil(256))?;
        let mut u = vec![u32_of("length", n)?, gx, 0, 0];
        match self {
            QuantKernel::Dequantize { scale, zero_point } => {
                u[2] = *scale;
                u[3] = *zero_point as u32;
                launch(ctx, rec, "quant", "dequant_main", spec0(), &pad(u), &[(1, inputs[0]), (3, out)], (gx, gy, 1))
            }
            QuantKernel::Quantize { scale, zero_point, to } => {
                u[2] = *scale;
                u[3] = *zero_point as u32;
                let (lo, hi) = match to {
                    DatumType::I8 => (-128i32, 127i32),
                    _ => (0, 255),
                };
                u.extend([lo as u32, hi as u32, (inputs[0].dt != DatumType::F32) as u32, 0]);
                launch(ctx, rec, "quant", "quant_main", spec0(), &pad(u), &[(1, inputs[0]), (3, out)], (gx, gy, 1))
            }
            QuantKernel::RoundHalfEven => {
                launch(ctx, rec, "quant", "round_main", spec0(), &pad(u), &[(1, inputs[0]), (3, out)], (gx, gy, 1))
            }
            QuantKernel::DynParams => {
                u[0] = u32_of("length", inputs[0].len())?;
                launch(ctx, rec, "quant", "dyn_params_main", spec0(), &pad(u), &[(1, inputs[0]), (3, out)], (1, 1, 1))
            }
            QuantKernel::DynApply => {
                let b = [(1, inputs[0]), (2, inputs[1]), (3, out)];
                launch(ctx, rec, "quant", "dyn_apply_main", spec0(), &pad(u), &b, (gx, gy, 1))
            }
            QuantKernel::DynPick { zero_point } => {
                u[2] = *zero_point as u32;
                launch(ctx, rec, "quant", "dyn_pick_main", spec0(), &pad(u), &[(1, inputs[0]), (3, out)], (1, 1, 1))
            }
            QuantKernel::MatMulInteger(s) => encode_mmi(ctx, rec, s, inputs, out),
            QuantKernel::GatherBlock(g) => {
                let row: usize = g.row_shape.iter().product();
                let last = g.row_shape.last().copied().unwrap_or(1).max(1);
                let blocks = last.div_ceil(g.block_size.max(1) as usize);
                let zp_row = (blocks * g.bits as usize).div_ceil(8);
                u.extend([u32_of("rows", g.rows)?, u32_of("length", row)?, u32_of("length", last)?]);
                u.extend([u32_of("blocks", blocks)?, u32_of("bytes", zp_row)?, 0, 0, 0]);
                let spec =
                    vec![("BITS", g.bits.to_string()), ("BS", g.block_size.to_string()), ("B_PACKED", "0".into())];
                let mut b = vec![(1, inputs[0]), (2, inputs[1]), (3, out), (4, inputs[2])];
                let entry = if g.zero_points {
                    b.push((5, inputs[3]));
                    "gbq_zp_main"
                } else {
                    "gbq_main"
                };
                launch(ctx, rec, "quant", entry, spec, &pad(u), &b, (gx, gy, 1))
            }
        }
    }
}

/// The specialisation of the entries that do not read the packed-table constants.
fn spec0() -> Vec<(&'static str, String)> {
    vec![("BITS", "8".into()), ("BS", "16".into()), ("B_PACKED", "0".into())]
}

/// The uniform block: 32 words.
fn pad(mut u: Vec<u32>) -> Vec<u32> {
    u.resize(32, 0);
    u
}

struct MmiLayout {
    m: usize,
    k: usize,
    n: usize,
    c_shape: TVec<usize>,
}

fn mmi_layout(s: &MatMulIntegerSpec, a: &[usize], b: &[usize]) -> Result<MmiLayout> {
    let dim = |shape: &[usize], at: Option<usize>| -> Result<usize> {
        match at {
            None => Ok(1),
            Some(i) => shape.get(i).copied().ok_or_else(|| Error::new("webgpu: MatMulInteger axis out of range")),
        }
    };
    let (m, ka, kb, n) = (dim(a, s.a_m)?, dim(a, s.a_k)?, dim(b, s.b_k)?, dim(b, s.b_n)?);
    if ka != kb {
        return Err(Error::new(format!("webgpu: MatMulInteger inner dims differ: {a:?} x {b:?}")));
    }
    for (shape, free) in [(a, &s.a_free), (b, &s.b_free)] {
        if free.iter().any(|f| shape.get(*f).copied() != Some(1)) {
            return Err(Error::new(format!("webgpu: MatMulInteger operands {a:?} x {b:?}")));
        }
    }
    let rank = s.batch.len() + s.c_m.is_some() as usize + s.c_n.is_some() as usize;
    let mut c = tvec![1usize; rank];
    for (ci, ai, bi) in &s.batch {
        let (da, db) = (dim(a, *ai)?, dim(b, *bi)?);
        if da != db && da != 1 && db != 1 {
            return Err(Error::new(format!("webgpu: MatMulInteger batch dims of {a:?} and {b:?}")));
        }
        *c.get_mut(*ci).ok_or_else(|| Error::new("webgpu: MatMulInteger output axis"))? = da.max(db);
    }
    if let Some(i) = s.c_m {
        *c.get_mut(i).ok_or_else(|| Error::new("webgpu: MatMulInteger output axis"))? = m;
    }
    if let Some(i) = s.c_n {
        *c.get_mut(i).ok_or_else(|| Error::new("webgpu: MatMulInteger output axis"))? = n;
    }
    Ok(MmiLayout { m, k: ka, n, c_shape: c })
}

fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

fn encode_mmi(
    ctx: &Context,
    rec: &mut Recorder,
    s: &MatMulIntegerSpec,
    inputs: &[&GpuTensor],
    out: &GpuTensor,
) -> Result<()> {
    let a = &inputs[0].shape;
    let b: &[usize] = s.b_packed.as_ref().map_or(&inputs[1].shape[..], |(shape, _)| &shape[..]);
    let l = mmi_layout(s, a, b)?;
    let (sa, sb, sc) = (strides(a), strides(b), strides(&l.c_shape));
    let st = |v: &[usize], at: Option<usize>| at.map_or(0, |i| v[i]);
    let mut bshape = vec![];
    let (mut abs, mut bbs, mut cbs) = (vec![], vec![], vec![]);
    for (ci, ai, bi) in &s.batch {
        let d = l.c_shape[*ci];
        if d == 1 {
            continue;
        }
        bshape.push(d);
        abs.push(ai.filter(|i| a[*i] != 1).map_or(0, |i| sa[i]));
        bbs.push(bi.filter(|i| b[*i] != 1).map_or(0, |i| sb[i]));
        cbs.push(sc[*ci]);
    }
    if bshape.len() > MAX_BATCH_RANK {
        return Err(Error::new(format!("webgpu: MatMulInteger with {} batch dims", bshape.len())));
    }
    let batch: usize = bshape.iter().product();
    let gx = u32_of("grid", l.n.div_ceil(16))?;
    let gy = u32_of("grid", l.m.div_ceil(16))?;
    let lim = ctx.caps.max_workgroups_per_dim;
    if gx > lim || gy > lim || batch as u64 > lim as u64 {
        return Err(Error::new(format!("webgpu: MatMulInteger {}x{} (batch {batch}) exceeds the grid", l.m, l.n)));
    }
    let a0_step = (s.a0_per_m && inputs[3].len() > 1) as usize;
    let b0_step = (s.b0_per_n && inputs[5].len() > 1) as usize;
    let mut u = vec![u32_of("m", l.m)?, u32_of("n", l.n)?, u32_of("k", l.k)?, bshape.len() as u32];
    for v in [st(&sa, s.a_m), st(&sa, s.a_k), st(&sb, s.b_k), st(&sb, s.b_n), st(&sc, s.c_m), st(&sc, s.c_n)] {
        u.push(u32_of("stride", v)?);
    }
    u.extend([a0_step as u32, b0_step as u32]);
    for v in [&bshape, &abs, &bbs, &cbs] {
        for i in 0..MAX_BATCH_RANK {
            u.push(u32_of("dim", v.get(i).copied().unwrap_or(0))?);
        }
    }
    let bind = [(1, inputs[0]), (2, inputs[1]), (3, out), (4, inputs[3]), (5, inputs[5])];
    let mut spec = spec0();
    spec.retain(|(k, _)| *k != "B_PACKED");
    spec.push(("B_PACKED", s.b_packed.as_ref().map_or("0", |(_, signed)| if *signed { "2" } else { "1" }).into()));
    launch(ctx, rec, "quant", "mmi_main", spec, &pad(u), &bind, (gx, gy, batch.max(1) as u32))
}

/// The kernel for a node of this module's kind (`None`: not one).
pub fn kernel_for(model: &TypedModel, node: &TypedNode) -> Option<std::result::Result<Kernel, String>> {
    use tract_onnx::tract_core::ops::element_wise::ElementWiseOp;
    use tract_onnx::tract_core::ops::quant::{QuantizeLinearI8, QuantizeLinearU8};
    let q = |k: QuantKernel| Some(Ok(Kernel::Quant(k)));
    if let Some(d) = node.op_as::<DequantizeLinearF32>() {
        return q(QuantKernel::Dequantize { scale: d.scale.to_bits(), zero_point: d.zero_point });
    }
    if let Some(ew) = node.op_as::<ElementWiseOp>() {
        if let Some(o) = ew.0.downcast_ref::<QuantizeLinearU8>() {
            let zero_point = o.zero_point as i32;
            return q(QuantKernel::Quantize { scale: o.scale.to_bits(), zero_point, to: DatumType::U8 });
        }
        if let Some(o) = ew.0.downcast_ref::<QuantizeLinearI8>() {
            let zero_point = o.zero_point as i32;
            return q(QuantKernel::Quantize { scale: o.scale.to_bits(), zero_point, to: DatumType::I8 });
        }
        if ew.0.name() == "RoundHalfToEven" {
            return q(QuantKernel::RoundHalfEven);
        }
        return None;
    }
    if node.op_is::<DynQuantParams>() {
        return q(QuantKernel::DynParams);
    }
    if node.op_is::<DynQuantApply>() {
        return q(QuantKernel::DynApply);
    }
    if let Some(p) = node.op_as::<DynQuantPick>() {
        return q(QuantKernel::DynPick { zero_point: p.zero_point });
    }
    if let Some(p) = node.op_as::<PackedMatMulInteger>() {
        return q(QuantKernel::MatMulInteger(Box::new(p.spec.clone())));
    }
    if let Some(op) = node.op_as::<EinSumMatMul>() {
        return Some(mmi_spec(model, node, op).map(|s| Kernel::Quant(QuantKernel::MatMulInteger(Box::new(s)))));
    }
    if let Some(g) = node.op_as::<kiln_ops::gather_block_quantized::PackedGatherBlockQuantized>() {
        return q(QuantKernel::GatherBlock(GatherBlockSpec {
            bits: g.bits as u32,
            block_size: g.block_size as u32,
            rows: g.rows,
            row_shape: g.row_shape.clone(),
            zero_points: g.zero_points,
        }));
    }
    None
}

/// The layout of a MatMulInteger-like quantized einsum, or why it has no kernel.
fn mmi_spec(model: &TypedModel, node: &TypedNode, op: &EinSumMatMul) -> std::result::Result<MatMulIntegerSpec, String> {
    if op.op.q_params != Some(DatumType::I32) || node.inputs.len() != 9 {
        return Err("einsum matmul that is not MatMulInteger".into());
    }
    // bias 0, c0 0, scales 1: the plain integer product
    let konst = |slot: usize, want: f32| -> bool {
        model
            .outlet_fact(node.inputs[slot])
            .ok()
            .and_then(|f| f.konst.clone())
            .and_then(|k| k.cast_to::<f32>().ok().map(|t| t.into_owned()))
            .and_then(|t| t.try_as_plain_ram().ok().and_then(|v| v.as_slice::<f32>().ok().map(|s| s.to_vec())))
            .is_some_and(|v| v.iter().all(|x| *x == want))
    };
    if !(konst(2, 0.0) && konst(4, 1.0) && konst(6, 1.0) && konst(7, 0.0) && konst(8, 1.0)) {
        return Err("quantized einsum with scales or an output zero point".into());
    }
    let axes = &op.op.axes;
    let pos = |c: char, io: InOut| -> std::result::Result<Option<usize>, String> {
        let a = axes.axis(c).map_err(|e| e.to_string())?;
        let v = match io {
            InOut::In(i) => a.inputs.get(i).cloned().unwrap_or_default(),
            InOut::Out(i) => a.outputs.get(i).cloned().unwrap_or_default(),
        };
        if v.len() > 1 {
            return Err("an axis repeated in one operand".into());
        }
        Ok(v.first().copied())
    };
    let (mc, kc, nc) = (op.m_axis, op.k_axis, op.n_axis);
    let in_params = |c: char, slot: usize| -> bool {
        axes.axis(c).ok().and_then(|a| a.inputs.get(slot).map(|v| !v.is_empty())).unwrap_or(false)
    };
    let mut spec = MatMulIntegerSpec {
        a_m: pos(mc, InOut::In(0))?,
        a_k: pos(kc, InOut::In(0))?,
        b_k: pos(kc, InOut::In(1))?,
        b_n: pos(nc, InOut::In(1))?,
        c_m: pos(mc, InOut::Out(0))?,
        c_n: pos(nc, InOut::Out(0))?,
        batch: vec![],
        a_free: vec![],
        b_free: vec![],
        a0_per_m: in_params(mc, 3),
        b0_per_n: in_params(nc, 5),
        b_packed: None,
    };
    if pos(kc, InOut::Out(0))?.is_some() || pos(mc, InOut::In(1))?.is_some() || pos(nc, InOut::In(0))?.is_some() {
        return Err("einsum matmul axes in unexpected operands".into());
    }
    for slot in [3usize, 5] {
        let f = model.outlet_fact(node.inputs[slot]).map_err(|e| e.to_string())?;
        if f.rank() > 1 {
            return Err("zero points of rank > 1".into());
        }
    }
    // a zero point of rank 1 must follow m (A's) or n (B's)
    for a in axes.iter_all_axes() {
        for slot in [2usize, 3, 4, 5, 6, 7, 8] {
            let linked = a.inputs.get(slot).is_some_and(|v| !v.is_empty());
            let ok = (slot == 3 && a.repr == mc) || (slot == 5 && a.repr == nc);
            if linked && !ok {
                let f = model.outlet_fact(node.inputs[slot]).map_err(|e| e.to_string())?;
                if f.shape.volume() != 1.to_dim() {
                    return Err("quantization parameters along an unexpected axis".into());
                }
            }
        }
        if [mc, kc, nc].contains(&a.repr) {
            continue;
        }
        let one = |v: &TVec<usize>| -> std::result::Result<Option<usize>, String> {
            if v.len() > 1 {
                return Err("an axis repeated in one operand".into());
            }
            Ok(v.first().copied())
        };
        let (ai, bi) = (one(&a.inputs[0])?, one(&a.inputs[1])?);
        match one(&a.outputs[0])? {
            Some(ci) => spec.batch.push((ci, ai, bi)),
            None => {
                spec.a_free.extend(ai);
                spec.b_free.extend(bi);
            }
        }
    }
    if spec.batch.len() > MAX_BATCH_RANK {
        return Err(format!("MatMulInteger with {} batch axes", spec.batch.len()));
    }
    Ok(spec)
}

/// DynamicQuantizeLinear (uint8) part 1: x → f32 `[scale, zero point]` (tract's arithmetic: the range widened to
/// include 0, `scale = (max - min) / 255`, `zero point = clamp(round_half_even(-min / scale), 0, 255)`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct DynQuantParams;

/// DynamicQuantizeLinear part 2: (x, params) → u8 `clamp(round_half_even(x / scale) + zero point, 0, 255)`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct DynQuantApply;

/// DynamicQuantizeLinear part 3: params → the scale (f32 scalar) or the zero point (u8 scalar).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct DynQuantPick {
    pub zero_point: bool,
}

/// tract's DynamicQuantizeLinearU8 parameters.
pub fn dyn_quant_params(xs: &[f32]) -> (f32, u8) {
    let (mut min, mut max) = (0f32, 0f32);
    for v in xs {
        if *v < min {
            min = *v;
        } else if *v > max {
            max = *v;
        }
    }
    let scale = (max - min) / 255.0;
    // max then min, not clamp: a NaN (scale 0) becomes 0 as in onnxruntime, where clamp would keep it
    #[allow(clippy::manual_clamp)]
    let zp = (-min / scale).round_ties_even().max(0.0).min(255.0);
    (scale, zp as u8)
}

fn dyn_quant_value(x: f32, scale: f32, zp: u8) -> u8 {
    (((x / scale).round_ties_even() as i32).wrapping_add(zp as i32)).clamp(0, 255) as u8
}

impl Op for DynQuantParams {
    fn name(&self) -> StaticName {
        "DynQuantParams".into()
    }
    op_as_typed_op!();
}
impl EvalOp for DynQuantParams {
    op_out_of_plan!();
    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = inputs[0].cast_to::<f32>()?;
        let view = x.try_as_plain_ram()?;
        let (scale, zp) = dyn_quant_params(view.as_slice::<f32>()?);
        Ok(tvec!(tensor1(&[scale, zp as f32]).into_tvalue()))
    }
}
impl TypedOp for DynQuantParams {
    as_op!();
    fn output_facts(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::fact([2])))
    }
}

impl Op for DynQuantApply {
    fn name(&self) -> StaticName {
        "DynQuantApply".into()
    }
    op_as_typed_op!();
}
impl EvalOp for DynQuantApply {
    op_out_of_plan!();
    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = inputs[0].cast_to::<f32>()?;
        let p = inputs[1].cast_to::<f32>()?;
        let pv = p.try_as_plain_ram()?;
        let pv = pv.as_slice::<f32>()?;
        ensure!(pv.len() == 2, "DynQuantApply: parameters of {} values", pv.len());
        let (scale, zp) = (pv[0], pv[1] as u8);
        let view = x.try_as_plain_ram()?;
        let q: Vec<u8> = view.as_slice::<f32>()?.iter().map(|v| dyn_quant_value(*v, scale, zp)).collect();
        Ok(tvec!(Tensor::from_shape(x.shape(), &q)?.into_tvalue()))
    }
}
impl TypedOp for DynQuantApply {
    as_op!();
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(u8::fact(inputs[0].shape.clone())))
    }
}

impl Op for DynQuantPick {
    fn name(&self) -> StaticName {
        "DynQuantPick".into()
    }
    op_as_typed_op!();
}
impl EvalOp for DynQuantPick {
    op_out_of_plan!();
    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let p = inputs[0].cast_to::<f32>()?;
        let pv = p.try_as_plain_ram()?;
        let pv = pv.as_slice::<f32>()?;
        ensure!(pv.len() == 2, "DynQuantPick: parameters of {} values", pv.len());
        Ok(tvec!(if self.zero_point { tensor0(pv[1] as u8) } else { tensor0(pv[0]) }.into_tvalue()))
    }
}
impl TypedOp for DynQuantPick {
    as_op!();
    fn output_facts(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(if self.zero_point { u8::fact([0usize; 0]) } else { f32::fact([0usize; 0]) }))
    }
}

/// Rewrites each DynamicQuantizeLinearU8 into [`DynQuantParams`], [`DynQuantApply`] and two [`DynQuantPick`]s (one
/// output each, what the GPU executor runs).
pub fn split_dynamic_quantize(model: &mut TypedModel) -> TractResult<()> {
    let ids: Vec<usize> =
        model.nodes().iter().filter(|n| n.op.name() == "DynamicQuantizeLinearU8").map(|n| n.id).collect();
    for id in ids {
        let node = model.node(id);
        if node.inputs.len() != 1 || node.outputs.len() != 3 {
            continue;
        }
        let name = node.name.clone();
        let mut patch = TypedModelPatch::new(format!("split {name}"));
        let x = patch.tap_model(model, node.inputs[0])?;
        let params = patch.wire_node(format!("{name}.params"), DynQuantParams, &[x])?[0];
        let y = patch.wire_node(format!("{name}.quantize"), DynQuantApply, &[x, params])?[0];
        let scale = patch.wire_node(format!("{name}.scale"), DynQuantPick { zero_point: false }, &[params])?[0];
        let zp = patch.wire_node(format!("{name}.zero_point"), DynQuantPick { zero_point: true }, &[params])?[0];
        for (slot, o) in [y, scale, zp].into_iter().enumerate() {
            patch.shunt_outside(model, OutletId::new(id, slot), o)?;
        }
        patch.apply(model)?;
    }
    Ok(())
}

/// Whether `node` is a constant (for tests and passes).
pub fn is_const(node: &TypedNode) -> bool {
    node.op_is::<Const>()
}

/// MatMulInteger with a constant uint8 / int8 B packed four per u32 word (what the GPU binds: a quarter of the
/// memory of one word per element). Inputs as the einsum's, B replaced by the words; the CPU evaluates the einsum on
/// the unpacked B.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PackedMatMulInteger {
    pub spec: MatMulIntegerSpec,
    pub reference: EinSumMatMul,
}

impl PackedMatMulInteger {
    fn unpack(&self, words: &Tensor) -> TractResult<Tensor> {
        let Some((shape, signed)) = &self.spec.b_packed else { bail!("PackedMatMulInteger without a packed B") };
        let view = words.try_as_plain_ram()?;
        let w = view.as_slice::<u32>()?;
        let n: usize = shape.iter().product();
        ensure!(w.len() * 4 >= n, "PackedMatMulInteger: {} words for {n} bytes", w.len());
        let bytes: Vec<u8> = (0..n).map(|i| (w[i / 4] >> (8 * (i % 4))) as u8).collect();
        if *signed {
            Tensor::from_shape(shape, &bytes.iter().map(|b| *b as i8).collect::<Vec<_>>())
        } else {
            Tensor::from_shape(shape, &bytes)
        }
    }
}

impl Op for PackedMatMulInteger {
    fn name(&self) -> StaticName {
        "EinSumMatMul".into()
    }
    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("MatMulInteger, B packed: {:?}", self.spec.b_packed)])
    }
    op_as_typed_op!();
}

impl EvalOp for PackedMatMulInteger {
    op_out_of_plan!();
    fn eval(&self, ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let mut inputs = inputs;
        ensure!(inputs.len() == 9, "PackedMatMulInteger: {} inputs", inputs.len());
        inputs[1] = self.unpack(&inputs[1])?.into_tvalue();
        self.reference.eval(ctx, inputs)
    }
}

impl TypedOp for PackedMatMulInteger {
    as_op!();
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let Some((shape, signed)) = &self.spec.b_packed else { bail!("PackedMatMulInteger without a packed B") };
        let b = if *signed { i8::fact(shape) } else { u8::fact(shape) };
        let mut facts: TVec<&TypedFact> = inputs.into();
        ensure!(facts.len() == 9, "PackedMatMulInteger: {} inputs", facts.len());
        facts[1] = &b;
        self.reference.output_facts(&facts)
    }
}

/// Replaces each MatMulInteger whose B is a constant uint8 / int8 tensor with a [`PackedMatMulInteger`] on B's
/// bytes as u32 words (the GPU binds a quarter of the memory).
pub fn pack_matmul_integer_weights(model: &mut TypedModel) -> TractResult<()> {
    let ids: Vec<usize> = model.nodes().iter().filter(|n| n.op_is::<EinSumMatMul>()).map(|n| n.id).collect();
    for id in ids {
        let node = model.node(id);
        let Some(op) = node.op_as::<EinSumMatMul>() else { continue };
        let Ok(mut spec) = mmi_spec(model, node, op) else { continue };
        let b_node = model.node(node.inputs[1].node);
        // a constant B, or one streamed from external data (the same bytes read as u32 words)
        let streamed = b_node
            .op_as::<kiln_ops::external_weight::ExternalWeight>()
            .filter(|w| w.layout == kiln_ops::external_weight::Layout::Plain);
        let (dt, shape, words) = if let Some(w) = streamed {
            (w.stored_datum_type()?, w.dims.to_vec(), None)
        } else {
            let Some(b) = b_node.op_as::<Const>().map(|k| k.val().clone()) else { continue };
            if !b.is_plain() {
                continue;
            }
            let bytes: Vec<u8> = b.try_as_plain_ram()?.as_bytes().to_vec();
            let words: Vec<u32> = bytes
                .chunks(4)
                .map(|c| c.iter().enumerate().fold(0u32, |w, (i, v)| w | (*v as u32) << (8 * i)))
                .collect();
            (b.datum_type(), b.shape().to_vec(), Some(words))
        };
        let signed = match dt {
            DatumType::U8 => false,
            DatumType::I8 => true,
            _ => continue,
        };
        spec.b_packed = Some((shape, signed));
        let packed = PackedMatMulInteger { spec, reference: op.clone() };
        let name = node.name.clone();
        let mut patch = TypedModelPatch::new(format!("pack the weight of {name}"));
        let mut taps = patch.taps(model, &node.inputs)?;
        taps[1] = match (words, streamed) {
            (Some(words), _) => {
                patch.add_const(format!("{name}.b_packed"), Tensor::from_shape(&[words.len()], &words)?)?
            }
            (None, Some(w)) => {
                let op = w.with_layout(kiln_ops::external_weight::Layout::Words);
                patch.wire_node(format!("{name}.b_packed"), op, &[])?[0]
            }
            (None, None) => continue,
        };
        let y = patch.wire_node(format!("{name}.packed"), packed, &taps)?[0];
        patch.shunt_outside(model, OutletId::new(id, 0), y)?;
        patch.apply(model)?;
    }
    Ok(())
}
