//! Softmax (float32) computed as onnxruntime's CPU kernel does on x86-64 with AVX512F (MLAS
//! `MlasComputeSumExpF32KernelAvx512F`): per row, `e = exp(x - max)` by MLAS's polynomial (fused multiply-adds,
//! `vscalefps` reconstruction), summed in 16 lanes block after block and reduced as `vhaddps` does, then
//! `y = e * (1 / sum)`. tract's softmax rounds differently by an ulp; in int8 models (per-tensor dynamic quantization of
//! the attention output) such ulps flip uint8 codes and the flips compound over the layers.
//!
//! Not an import-time op: tract's `Softmax` stays in the model for the GPU lowering (which knows it), and
//! [`use_ort_softmax`] swaps it for [`OrtSoftmax`] in CPU-optimised models.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::nn::{Softmax, SoftmaxKind};

/// Replaces tract's float32 softmax nodes (over one axis, or over the trailing axes) with [`OrtSoftmax`]; returns how
/// many.
pub fn use_ort_softmax(model: &mut TypedModel) -> TractResult<usize> {
    let mut swapped = 0;
    for id in 0..model.nodes().len() {
        let node = &model.nodes()[id];
        let Some(sm) = node.op_as::<Softmax>() else { continue };
        if sm.kind != SoftmaxKind::Softmax || sm.quant_output_dt.is_some() || node.inputs.len() != 1 {
            continue;
        }
        let fact = model.outlet_fact(node.inputs[0])?;
        if fact.datum_type != f32::datum_type() || sm.axes.is_empty() {
            continue;
        }
        let rank = fact.rank();
        let mut axes: Vec<usize> = sm.axes.to_vec();
        axes.sort_unstable();
        let trailing = axes.iter().enumerate().all(|(i, a)| *a == axes[0] + i) && axes.last() == Some(&(rank - 1));
        if !trailing && axes.len() != 1 {
            continue;
        }
        let op = OrtSoftmax { first_axis: axes[0], trailing };
        model.node_mut(id).op = Box::new(op);
        swapped += 1;
    }
    Ok(swapped)
}

/// Softmax over the axes from `first_axis` on (`trailing`), or over the single axis `first_axis`.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
pub struct OrtSoftmax {
    pub first_axis: usize,
    pub trailing: bool,
}

impl Op for OrtSoftmax {
    fn name(&self) -> StaticName {
        "Softmax".into()
    }
    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("axis {}{}, onnxruntime's arithmetic", self.first_axis, if self.trailing { ".." } else { "" })])
    }
    op_as_typed_op!();
}

impl EvalOp for OrtSoftmax {
    op_out_of_plan!();
    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        ensure!(inputs.len() == 1, "Softmax takes one input");
        let x = &inputs[0];
        ensure!(x.datum_type() == f32::datum_type(), "Softmax: float32 expected, got {:?}", x.datum_type());
        let shape = x.shape().to_vec();
        ensure!(self.first_axis < shape.len(), "Softmax: axis {} for rank {}", self.first_axis, shape.len());
        let xs = x.try_as_plain_ram()?;
        let xs = xs.as_slice::<f32>()?;
        let mut y = Tensor::zero_dt(f32::datum_type(), &shape)?;
        {
            let mut ys = y.try_as_plain_ram_mut()?;
            let ys = ys.as_slice_mut::<f32>()?;
            if self.trailing {
                let d: usize = shape[self.first_axis..].iter().product();
                if d > 0 {
                    for (xr, yr) in xs.chunks_exact(d).zip(ys.chunks_exact_mut(d)) {
                        softmax_row(xr, yr);
                    }
                }
            } else {
                let d = shape[self.first_axis];
                let inner: usize = shape[self.first_axis + 1..].iter().product();
                let outer: usize = shape[..self.first_axis].iter().product();
                let (mut row, mut out) = (vec![0f32; d], vec![0f32; d]);
                for o in 0..outer {
                    for i in 0..inner {
                        let base = o * d * inner + i;
                        for (k, r) in row.iter_mut().enumerate() {
                            *r = xs[base + k * inner];
                        }
                        softmax_row(&row, &mut out);
                        for (k, v) in out.iter().enumerate() {
                            ys[base + k * inner] = *v;
                        }
                    }
                }
            }
        }
        Ok(tvec!(y.into_tvalue()))
    }
}

impl TypedOp for OrtSoftmax {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(inputs[0].datum_type.fact(inputs[0].shape.clone())))
    }
    as_op!();
}

const LOWER_RANGE: f32 = f32::from_bits(0xc2cf_f1b5); // -103.9720840454
const ROUNDING_BIAS: f32 = 12_582_912.0;
const LOG2_RECIPROCAL: f32 = std::f32::consts::LOG2_E;
const LOG2_HIGH: f32 = -6.931_457_5e-1;
const LOG2_LOW: f32 = -1.428_606_8e-6;
const POLY: [f32; 5] = [
    f32::from_bits(0x3ab4_a000), // 0x1.694000p-10
    f32::from_bits(0x3c09_2f6e), // 0x1.125edcp-7
    f32::from_bits(0x3d2a_adad), // 0x1.555b5ap-5
    f32::from_bits(0x3e2a_aa28), // 0x1.555450p-3
    f32::from_bits(0x3eff_fffb), // 0x1.fffff6p-2
];

/// MLAS's exp of `v` (already biased by the negative maximum).
#[inline(always)]
fn exp_mlas(v: f32) -> f32 {
    let v = if v > LOWER_RANGE { v } else { LOWER_RANGE };
    let biased = LOG2_RECIPROCAL.mul_add(v, ROUNDING_BIAS);
    let m = biased - ROUNDING_BIAS;
    let v = m.mul_add(LOG2_HIGH, v);
    let v = m.mul_add(LOG2_LOW, v);
    let mut p = POLY[0];
    for c in &POLY[1..] {
        p = p.mul_add(v, *c);
    }
    p = p.mul_add(v, 1.0);
    p = p.mul_add(v, 1.0);
    // vscalefps: p * 2^m, rounded once (m is an integer in [-150, 128]: 2^m is exact in f64)
    let pow2 = f64::from_bits(((m as i64 + 1023) as u64) << 52);
    (p as f64 * pow2) as f32
}

/// One softmax row, onnxruntime's AVX512F arithmetic (with the FMA instructions inlined where the CPU has them).
pub fn softmax_row(x: &[f32], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports FMA (checked just above).
        unsafe { softmax_row_fma(x, y) };
        return;
    }
    softmax_row_impl(x, y)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
unsafe fn softmax_row_fma(x: &[f32], y: &mut [f32]) {
    softmax_row_impl(x, y)
}

#[inline(always)]
fn softmax_row_impl(x: &[f32], y: &mut [f32]) {
    let max = x.iter().fold(f32::MIN, |m, &v| if v > m { v } else { m });
    let negative_max = -max;
    let mut acc = [0f32; 16];
    for (i, (xv, yv)) in x.iter().zip(y.iter_mut()).enumerate() {
        let e = exp_mlas(xv + negative_max);
        *yv = e;
        acc[i % 16] += e;
    }
    let t: [f32; 8] = std::array::from_fn(|i| acc[i + 8] + acc[i]);
    let sum = ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
    let scale = 1.0 / sum;
    y.iter_mut().for_each(|v| *v *= scale);
}

#[cfg(test)]
mod tests {
    use super::softmax_row;

    #[test]
    fn bit_identical_to_onnxruntime() {
        let x = [
            1.5f32, -0.25, 3.0, 0.0, -2.0, 7.25, 0.5, -9.0, 2.75, 1.0, -0.5, 4.0, -3.5, 0.75, 2.0, -1.0, 6.0, 0.25,
            -7.5, 1.25,
        ];
        // onnxruntime 1.32 CPU (x86-64, AVX512F)
        let want: [u32; 20] = [
            0x3b18_58f4,
            0x39d3_cacb,
            0x3c2a_b189,
            0x3a07_f928,
            0x3893_3741,
            0x3f3a_fa27,
            0x3a60_2e98,
            0x3389_771f,
            0x3c04_efad,
            0x3ab8_ce8c,
            0x39a4_f1a4,
            0x3ce7_ff1c,
            0x3783_64a7,
            0x3a8f_ed7d,
            0x3b7b_2db3,
            0x3948_164b,
            0x3e56_4788,
            0x3a2e_97d7,
            0x349a_04ea,
            0x3aed_4bf1,
        ];
        let mut y = [0f32; 20];
        softmax_row(&x, &mut y);
        assert_eq!(y.map(f32::to_bits), want);
    }
}
