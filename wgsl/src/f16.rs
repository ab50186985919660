//! float16 tensors on the GPU: storage, casts and data movement.
//!
//! An f16 tensor lives on the GPU as the host lays it out: two bytes an element, little-endian, packed two to a u32
//! word — uploads and readbacks copy its bytes unchanged, and a model's float16 output comes back as float16. kiln
//! computes float16 models in float32 (kiln-graph's `float16` pass, as onnxruntime's CPU provider does: the graph's
//! arithmetic, weights included, is f32), so what stays float16 in a lowered model is its interface — float16 inputs
//! cast up on entry, outputs cast down on exit, past/present KV caches — and tables kept float16 to halve their
//! memory (an embedding gathered before its cast). Those nodes run here: casts between f16 and f32 / bool / i32 /
//! i64, Gather of an f16 table, and the strided copies behind Transpose, Expand, Slice, Downsample and Concat (views —
//! reshapes, added or removed axes — need no kernel).
//!
//! Two shader variants, chosen at pipeline creation from the adapter's features ([`crate::Caps::shader_f16`]):
//! with shader-f16, `enable f16;` and `array<f16>` storage, one element per invocation and the hardware's
//! conversions (`kernels/f16_native.wgsl`); without it (Chrome's SwiftShader, or [`crate::context::NO_F16_ENV`]),
//! u32 words, each invocation owning whole output words, conversions in integer arithmetic with round-to-nearest-even
//! (`kernels/f16_packed.wgsl`).

use tract_onnx::prelude::*;

use crate::context::{Context, PipelineKey};
use crate::exec::{Binding, GpuTensor, Recorder};
use crate::kernels::{u32_of, words, MAX_RANK, PRELUDE_WGSL, WG};
use crate::{Error, Result};

pub const F16_PACKED_WGSL: &str = include_str!("kernels/f16_packed.wgsl");
pub const F16_NATIVE_WGSL: &str = include_str!("kernels/f16_native.wgsl");

/// Element types a cast to or from f16 takes on the GPU (their GPU representations: f32, bool as f32 0/1, i32 /
/// i64 as i32).
fn cast_partner(dt: DatumType) -> bool {
    matches!(dt, DatumType::F16 | DatumType::F32 | DatumType::Bool | DatumType::I32 | DatumType::I64)
}

/// Whether a cast between `from` and `to` with f16 on a side has a kernel here.
pub fn cast_supported(from: DatumType, to: DatumType) -> bool {
    (from == DatumType::F16 || to == DatumType::F16) && cast_partner(from) && cast_partner(to)
}

/// Input element `i`'s value as f32 in WGSL.
fn in_value(dt: DatumType, native: bool) -> &'static str {
    match dt {
        DatumType::F16 if native => "f32(a[i])",
        DatumType::F16 => "f16_bits_to_f32(half_at(i))",
        DatumType::I32 | DatumType::I64 => "f32(bitcast<i32>(a[i]))",
        // f32, and bools (stored as f32 0.0 / 1.0)
        _ => "bitcast<f32>(a[i])",
    }
}

/// An f32 value `x` as the stored word of a 4-byte output type.
fn out_word(dt: DatumType) -> &'static str {
    match dt {
        DatumType::Bool => "bitcast<u32>(b2f(x != 0.0))",
        DatumType::I32 | DatumType::I64 => "bitcast<u32>(i32(x))",
        _ => "bitcast<u32>(x)",
    }
}

/// The uniform block: 12 scalars, then shape and two stride vectors of [`MAX_RANK`].
#[derive(Default)]
struct Params {
    n: usize,
    rank: usize,
    a_off: usize,
    o_off: usize,
    first: usize,
    axis_len: usize,
    inner: usize,
    count: usize,
    shape: Vec<usize>,
    a_strides: Vec<u32>,
    o_strides: Vec<usize>,
}

impl Params {
    fn words(&self, groups_x: u32) -> Result<Vec<u32>> {
        let mut u = vec![u32_of("length", self.n)?, groups_x, u32_of("rank", self.rank)?];
        for (what, v) in [
            ("offset", self.a_off),
            ("offset", self.o_off),
            ("offset", self.first),
            ("length", self.axis_len),
            ("length", self.inner),
            ("length", self.count),
        ] {
            u.push(u32_of(what, v)?);
        }
        u.extend([0u32; 3]);
        if self.shape.len() > MAX_RANK || self.a_strides.len() > MAX_RANK || self.o_strides.len() > MAX_RANK {
            return Err(Error::new(format!("webgpu: f16 copy of rank {} over {MAX_RANK}", self.shape.len())));
        }
        let mut block = |v: Vec<u32>| {
            let mut b = [0u32; MAX_RANK];
            b[..v.len()].copy_from_slice(&v);
            u.extend(b);
        };
        block(self.shape.iter().map(|x| u32_of("dim", *x)).collect::<Result<_>>()?);
        block(self.a_strides.clone());
        block(self.o_strides.iter().map(|x| u32_of("stride", *x)).collect::<Result<_>>()?);
        Ok(u)
    }
}

/// One dispatch of an f16 entry: the variant the adapter takes (shader-f16 or packed words), specialised by `spec`,
/// `invocations` invocations.
fn launch(
    ctx: &Context,
    rec: &mut Recorder,
    entry: &'static str,
    spec: Vec<(&'static str, String)>,
    params: &Params,
    bindings: &[(u32, &GpuTensor)],
    invocations: usize,
) -> Result<()> {
    if invocations == 0 {
        return Ok(());
    }
    let native = ctx.caps.shader_f16;
    let (gx, gy) = ctx.grid((invocations as u64).div_ceil(WG as u64))?;
    let family = if native { "f16_native" } else { "f16_packed" };
    let key = PipelineKey { family, entry, spec };
    let pipeline = ctx.pipeline(&key, || {
        let (enable, body) = if native { ("enable f16;\n", F16_NATIVE_WGSL) } else { ("", F16_PACKED_WGSL) };
        let mut text = format!("{enable}{}\n{body}", PRELUDE_WGSL.replace("{{WG}}", &WG.to_string()));
        for (k, v) in &key.spec {
            text = text.replace(&format!("{{{{{k}}}}}"), v);
        }
        text
    })?;
    let u = params.words(gx)?;
    let bindings = bindings.iter().map(|(index, t)| Binding { index: *index, buffer: t.buffer.clone() }).collect();
    rec.dispatch(pipeline, words(&u), bindings, (gx, gy, 1), entry);
    Ok(())
}

/// Records a cast of `a` (`from`) into `out` (`to`), f16 on one side at least.
pub(crate) fn cast(
    ctx: &Context,
    rec: &mut Recorder,
    from: DatumType,
    to: DatumType,
    a: &GpuTensor,
    out: &GpuTensor,
) -> Result<()> {
    if !cast_supported(from, to) || a.dt != from || out.dt != to {
        return Err(Error::new(format!("webgpu: no f16 cast from {from:?} to {to:?}")));
    }
    let n = out.len();
    let native = ctx.caps.shader_f16;
    let params = Params { n, ..Default::default() };
    let b = [(1, a), (3, out)];
    let spec = cast_spec(from, to, native);
    if native {
        launch(ctx, rec, "cast_main", spec, &params, &b, n)
    } else if to == DatumType::F16 {
        launch(ctx, rec, "cast_to_half_main", spec, &params, &b, n.div_ceil(2))
    } else {
        launch(ctx, rec, "cast_from_half_main", spec, &params, &b, n)
    }
}

/// The specialisation of the converting entries (cast_main, cast_*_half_main, gather_cast_main).
fn cast_spec(from: DatumType, to: DatumType, native: bool) -> Vec<(&'static str, String)> {
    if native {
        let elem = |dt: DatumType| if dt == DatumType::F16 { "f16" } else { "u32" };
        let store = if to == DatumType::F16 { "f16(x)".to_string() } else { out_word(to).to_string() };
        vec![
            ("A_ELEM", elem(from).to_string()),
            ("O_ELEM", elem(to).to_string()),
            ("IN_VALUE", in_value(from, true).to_string()),
            ("STORE", store),
            ("MOVE", String::new()),
        ]
    } else {
        vec![("IN_VALUE", in_value(from, false).to_string()), ("OUT_WORD", out_word(to).to_string())]
    }
}

/// The specialisation of the data-movement entries (no conversion).
fn movement_spec(native: bool) -> Vec<(&'static str, String)> {
    if native {
        ["A_ELEM", "O_ELEM"]
            .into_iter()
            .map(|k| (k, "f16".to_string()))
            .chain([
                ("IN_VALUE", "0.0".to_string()),
                ("STORE", "out[i]".to_string()),
                ("MOVE", "out[dst] = a[src];".to_string()),
            ])
            .collect()
    } else {
        vec![("IN_VALUE", "0.0".into()), ("OUT_WORD", "0u".into())]
    }
}

/// Records a Gather of f16 `data` (rows of `inner` elements, `axis_len` of them per outer index) by `idx` (i32)
/// into `out`: f16, or a 4-byte type each element is cast to as it is copied (an embedding lookup and its Cast).
pub(crate) fn gather(
    ctx: &Context,
    rec: &mut Recorder,
    data: &GpuTensor,
    idx: &GpuTensor,
    out: &GpuTensor,
    axis_len: usize,
    inner: usize,
) -> Result<()> {
    let to = out.dt;
    if data.dt != DatumType::F16 || !(to == DatumType::F16 || cast_supported(DatumType::F16, to)) {
        return Err(Error::new(format!("webgpu: no f16 gather into {to:?}")));
    }
    let n = out.len();
    let native = ctx.caps.shader_f16;
    let params = Params { n, axis_len, inner, count: idx.len(), ..Default::default() };
    let b = [(1, data), (2, idx), (3, out)];
    if to == DatumType::F16 {
        let invocations = if native { n } else { n.div_ceil(2) };
        launch(ctx, rec, "gather_main", movement_spec(native), &params, &b, invocations)
    } else {
        launch(ctx, rec, "gather_cast_main", cast_spec(DatumType::F16, to, native), &params, &b, n)
    }
}

/// Records `out[o_off + Σ c·so] = a[a_off + Σ c·sa]` over `shape` for f16 tensors: `so` the strides of a box of the
/// row-major output (each > 0, dims of size 1 dropped), `sa` signed (a negative stride walks backwards; u32
/// arithmetic wraps, and every address reached is in range).
#[allow(clippy::too_many_arguments)]
pub(crate) fn strided_copy(
    ctx: &Context,
    rec: &mut Recorder,
    a: &GpuTensor,
    a_off: usize,
    sa: &[i64],
    out: &GpuTensor,
    o_off: usize,
    so: &[usize],
    shape: &[usize],
) -> Result<()> {
    let n: usize = shape.iter().product();
    if n == 0 {
        return Ok(());
    }
    if a.dt != DatumType::F16 || out.dt != DatumType::F16 || sa.len() != shape.len() || so.len() != shape.len() {
        return Err(Error::new("webgpu: f16 copy operands disagree"));
    }
    let mut a_strides = vec![];
    for s in sa {
        if s.unsigned_abs() > u32::MAX as u64 {
            return Err(Error::new(format!("webgpu: stride {s} exceeds 32-bit indexing")));
        }
        a_strides.push(*s as u32);
    }
    let native = ctx.caps.shader_f16;
    let mut params = Params {
        n,
        rank: shape.len(),
        a_off,
        o_off,
        shape: shape.to_vec(),
        a_strides,
        o_strides: so.to_vec(),
        ..Default::default()
    };
    let b = [(1, a), (3, out)];
    if native {
        return launch(ctx, rec, "copy_main", movement_spec(true), &params, &b, n);
    }
    if so.contains(&0) {
        return Err(Error::new("webgpu: f16 copy into a broadcast output"));
    }
    // the words the box spans
    let last = o_off + shape.iter().zip(so).map(|(d, s)| (d - 1) * s).sum::<usize>();
    params.first = o_off / 2;
    params.n = last / 2 - params.first + 1;
    let count = params.n;
    launch(ctx, rec, "copy_main", movement_spec(false), &params, &b, count)
}
