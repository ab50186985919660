//! com.microsoft ops' own GPU kernels (`kernels/msft.wgsl`): GroupQueryAttention's present K/V writer
//! ([`GqaKvSpec`], behind kiln-ops' `GqaKvOp`). The attention itself runs on the fused attention kernel
//! (crate::attention) and RoPE on the rope kernel.

use tract_onnx::prelude::*;

pub use kiln_ops::group_query_attention::{gqa_kv_geometry, GqaKvOp};

use crate::context::Context;
use crate::exec::{GpuTensor, Recorder};
use crate::kernels::{launch, u32_of, WG};
use crate::{Error, Result};

/// GroupQueryAttention's present key / value: inputs (new `[batch, seq, kv_heads·head]`, seqlens_k, past?).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GqaKvSpec {
    pub op: GqaKvOp,
}

impl GqaKvSpec {
    pub fn arity(&self) -> usize {
        2 + self.op.has_past as usize
    }

    pub fn output_dt(&self, dts: &[DatumType]) -> Option<DatumType> {
        use DatumType::{F32, I32, I64};
        let ok = dts.len() == self.arity()
            && dts[0] == F32
            && matches!(dts[1], I32 | I64)
            && dts.get(2).is_none_or(|d| *d == F32);
        ok.then_some(F32)
    }

    pub fn output_shape(&self, inputs: &[&[usize]]) -> Result<TVec<usize>> {
        let past = inputs.get(2).copied();
        let [b, s, d, p] =
            gqa_kv_geometry(&self.op, inputs[0], past).map_err(|e| Error::new(format!("webgpu: {e}")))?;
        if inputs[1].iter().product::<usize>() != b {
            return Err(Error::new(format!("webgpu: GroupQueryAttention: seqlens_k {:?} for batch {b}", inputs[1])));
        }
        Ok(tvec![b, self.op.kv_heads, p + s, d])
    }

    pub fn encode(&self, ctx: &Context, rec: &mut Recorder, inputs: &[&GpuTensor], out: &GpuTensor) -> Result<()> {
        let past = inputs.get(2).map(|t| &*t.shape);
        let [b, s, d, p] =
            gqa_kv_geometry(&self.op, &inputs[0].shape, past).map_err(|e| Error::new(format!("webgpu: {e}")))?;
        let n = out.len();
        let (gx, gy) = ctx.grid((n as u64).div_ceil(WG as u64))?;
        let mut u = vec![u32_of("length", n)?, gx, u32_of("batch", b)?, u32_of("heads", self.op.kv_heads)?];
        for x in [s, d, p, p + s] {
            u.push(u32_of("size", x)?);
        }
        let past = inputs.get(2).copied().unwrap_or(inputs[0]);
        let bindings = [(1, inputs[0]), (2, inputs[1]), (3, out), (4, past)];
        launch(ctx, rec, "msft", "gqa_kv_main", vec![], &u, &bindings, (gx, gy, 1))
    }
}

pub use kiln_ops::skip_norm::NormOp;

/// kiln's [`NormOp`] (`kernels/norm.wgsl`): inputs (x, skip?, bias?, gamma?, beta?), all f32.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NormSpec {
    pub op: NormOp,
}

impl NormSpec {
    pub fn arity(&self) -> usize {
        self.op.arity()
    }

    pub fn output_dt(&self, dts: &[DatumType]) -> Option<DatumType> {
        (dts.len() == self.arity() && dts.iter().all(|d| *d == DatumType::F32)).then_some(DatumType::F32)
    }

    pub fn encode(&self, ctx: &Context, rec: &mut Recorder, inputs: &[&GpuTensor], out: &GpuTensor) -> Result<()> {
        let lens: Vec<usize> = inputs.iter().map(|t| t.len()).collect();
        let (rows, d) = self.op.geometry(&inputs[0].shape, &lens).map_err(|e| Error::new(format!("webgpu: {e}")))?;
        let o = &self.op;
        let flags = o.has_skip as u32
            | (o.has_bias as u32) << 1
            | (o.has_gamma as u32) << 2
            | (o.has_beta as u32) << 3
            | (o.rms as u32) << 4;
        let wg = if d <= 64 {
            64
        } else if d <= 128 {
            128
        } else {
            256
        };
        let (gx, gy) = ctx.grid(rows as u64)?;
        let skip_len = if o.has_skip { lens[1] } else { 1 };
        let u = [
            u32_of("rows", rows)?,
            u32_of("channels", d)?,
            gx,
            o.eps.to_bits(),
            flags,
            u32_of("skip length", skip_len)?,
            0,
            0,
        ];
        let mut at = 1;
        let mut next = |on: bool| {
            if on {
                at += 1;
                inputs[at - 1]
            } else {
                inputs[0]
            }
        };
        let skip = next(o.has_skip);
        let bias = next(o.has_bias);
        let gamma = next(o.has_gamma);
        let beta = next(o.has_beta);
        let bindings = [(1, inputs[0]), (2, skip), (3, out), (4, bias), (5, gamma), (6, beta)];
        launch(ctx, rec, "norm", "norm_main", vec![("WG", wg.to_string())], &u, &bindings, (gx, gy, 1))
    }
}
