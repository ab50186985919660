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
