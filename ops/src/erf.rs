//! ONNX Erf, float32 computed as onnxruntime's CPU kernel does (MLAS `MlasComputeErf`: the faithfully rounded erff of
//! njuffa's answer at https://stackoverflow.com/questions/35148198, a polynomial below |x| = 0.921875 and
//! `1 - exp(-poly)` above, with fused multiply-adds), so that GELU feeds bit-identical values to the next
//! DynamicQuantizeLinear in int8 models. tract's own Erf (an Abramowitz–Stegun approximation, up to 2e-6 away) also
//! fuses `x * 0.5 * (1 + erf(x / sqrt(2)))` into GeluExact, which rounds differently again; kiln's Erf leaves the
//! expression as the model spells it. Other element types use tract's Erf.

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_core::ops::element_wise::{ElementWiseMiniOp, ElementWiseOp};
use tract_onnx::tract_core::ops::math::Erf as TractErf;
use tract_onnx::tract_hir::internal::*;
use tract_onnx::tract_hir::ops::element_wise::ElementWiseIntoHir;

use crate::BuildResult;

pub fn build(_ctx: &ParsingContext, _node: &NodeProto) -> BuildResult {
    Ok((ElementWiseOp(Box::new(OrtErf), None).into_hir(), vec![]))
}

#[derive(Debug, Clone, Hash, PartialEq, Eq)]
pub struct OrtErf;

impl ElementWiseMiniOp for OrtErf {
    fn name(&self) -> String {
        "Erf".into()
    }
    fn eval_in_place(&self, t: &mut Tensor, out_dt: Option<DatumType>) -> TractResult<()> {
        if t.datum_type() == f32::datum_type() {
            erf_slice(t.try_as_plain_ram_mut()?.as_slice_mut::<f32>()?);
            Ok(())
        } else {
            TractErf {}.eval_in_place(t, out_dt)
        }
    }
    fn cost_per_element(&self, dt: DatumType) -> TVec<(Cost, usize)> {
        tvec!((Cost::FMA(dt), 20))
    }
}

// MLAS's `MlasErfConstants`, bit for bit
const UPPER_ABS_RANGE: f32 = f32::from_bits(0x407b_3333); // 3.925
const SPLIT_BOUNDARY: f32 = 0.921875;
const SMALL: [f32; 6] = [
    f32::from_bits(0xba1d_0d41),
    f32::from_bits(0x3ba3_9fa4),
    f32::from_bits(0xbcdb_45e9),
    f32::from_bits(0x3de7_0d23),
    f32::from_bits(0xbec0_9370),
    f32::from_bits(0x3e03_75d3),
];
const BIG: [f32; 7] = [
    f32::from_bits(0x3791_1480),
    f32::from_bits(0xb9c8_e966),
    f32::from_bits(0x3b7e_899b),
    f32::from_bits(0xbcc6_b180),
    f32::from_bits(0x3dda_ae58),
    f32::from_bits(0x3f22_8550),
    f32::from_bits(0x3e03_ce86),
];
const EXP_LOWER_RANGE: f32 = f32::from_bits(0xc2b0_c0a5); // -88.3762626647949
const EXP_LOG2_RECIPROCAL: f32 = std::f32::consts::LOG2_E;
const EXP_LOG2_HI: f32 = f32::from_bits(0xbf31_7200);
const EXP_LOG2_LO: f32 = f32::from_bits(0xb5bf_be8e);
const EXP_P: [f32; 7] = [
    f32::from_bits(0x3ab5_4c6d),
    f32::from_bits(0x3c09_3965),
    f32::from_bits(0x3d2a_ad10),
    f32::from_bits(0x3e2a_aa17),
    f32::from_bits(0x3eff_fffb),
    1.0,
    1.0,
];
const EXP_C: f32 = 12_582_912.0;

/// erf in place over a slice (with the FMA instructions inlined where the CPU has them).
pub fn erf_slice(xs: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports FMA (checked just above).
        unsafe { erf_slice_fma(xs) };
        return;
    }
    xs.iter_mut().for_each(|x| *x = erf_f32(*x));
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
unsafe fn erf_slice_fma(xs: &mut [f32]) {
    xs.iter_mut().for_each(|x| *x = erf_f32(*x));
}

/// erf(x) as MLAS computes it on x86-64 (the FMA3/AVX512 kernels).
#[inline(always)]
pub fn erf_f32(x: f32) -> f32 {
    let sign = x.to_bits() & 0x8000_0000;
    let a = x.abs().min(UPPER_ABS_RANGE);
    let r = if a >= SPLIT_BOUNDARY {
        let mut r = BIG[0];
        for c in &BIG[1..] {
            r = r.mul_add(a, *c);
        }
        r = r.mul_add(a, a);
        // 1 - exp(-r)
        let v = (-r).max(EXP_LOWER_RANGE);
        let m = EXP_LOG2_RECIPROCAL.mul_add(v, EXP_C) - EXP_C;
        let f = m.mul_add(EXP_LOG2_HI, v);
        let f = m.mul_add(EXP_LOG2_LO, f);
        let mut y = EXP_P[0];
        for c in &EXP_P[1..] {
            y = y.mul_add(f, *c);
        }
        let pow2 = f32::from_bits(((m as i32 + 127) << 23) as u32);
        1.0 - y * pow2
    } else {
        let s = a * a;
        let mut r = SMALL[0];
        for c in &SMALL[1..] {
            r = r.mul_add(s, *c);
        }
        r.mul_add(a, a)
    };
    if x.is_nan() {
        return x;
    }
    f32::from_bits(r.to_bits() | sign)
}

#[cfg(test)]
mod tests {
    use super::erf_f32;

    /// (x, onnxruntime 1.32 CPU's Erf(x)) as float32 bits, both sides of the split at 0.921875 and of the clamp.
    const ORT: [(u32, u32); 12] = [
        (0x3dcc_cccd, 0x3de6_52f5),
        (0xbebd_70a4, 0xbecc_64ba),
        (0x3f00_0000, 0x3f05_3f7b),
        (0x3f66_6666, 0x3f4c_022d),
        (0x3f6c_0000, 0x3f4e_c3b4),
        (0xbfa6_6666, 0xbf6f_1b25),
        (0x400c_cccd, 0x3f7f_85eb),
        (0x4072_5e35, 0x3f7f_ffff),
        (0x407c_cccd, 0x3f80_0000),
        (0xc086_6666, 0xbf80_0000),
        (0x3f13_f97d, 0x3f16_19b3),
        (0x3a83_126f, 0x3a93_e61c),
    ];

    #[test]
    fn bit_identical_to_onnxruntime() {
        for (x, want) in ORT {
            let x = f32::from_bits(x);
            assert_eq!(erf_f32(x).to_bits(), want, "erf({x}) = {}, onnxruntime {}", erf_f32(x), f32::from_bits(want));
        }
        assert!(erf_f32(f32::NAN).is_nan());
        assert_eq!(erf_f32(f32::INFINITY), 1.0);
        assert_eq!(erf_f32(f32::NEG_INFINITY), -1.0);
    }
}
