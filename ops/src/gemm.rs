//! ONNX Gemm. tract's expansion scales by `alpha`/`beta` with f32 constants, so a float16 Gemm with a bias comes out
//! float32 ("Output mismatch after rewiring expansion ... expected F16 got F32", every fp16 GPT-2 export). kiln's
//! builds the scale constants in the operands' type and skips scaling by 1.

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_hir::internal::*;
use tract_onnx::tract_hir::ops;

use crate::BuildResult;

pub fn build(_ctx: &ParsingContext, node: &NodeProto) -> BuildResult {
    let alpha: f32 = node.get_attr_opt("alpha")?.unwrap_or(1.);
    let beta: f32 = node.get_attr_opt("beta")?.unwrap_or(1.);
    let trans_a: i64 = node.get_attr_opt("transA")?.unwrap_or(0);
    let trans_b: i64 = node.get_attr_opt("transB")?.unwrap_or(0);
    Ok((expand(Gemm { alpha, beta, trans_a: trans_a != 0, trans_b: trans_b != 0 }), vec![]))
}

#[derive(Debug, Clone)]
pub struct Gemm {
    pub alpha: f32,
    pub beta: f32,
    pub trans_a: bool,
    pub trans_b: bool,
}

impl Expansion for Gemm {
    fn name(&self) -> StaticName {
        "Gemm".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        if inputs.len() < 2 || inputs.len() > 3 {
            bail!("Gemm takes 2 or 3 inputs, this node has {}", inputs.len());
        }
        check_output_arity(outputs, 1)?;
        if inputs.len() == 3 {
            s.equals(&inputs[2].datum_type, &outputs[0].datum_type)?;
        }
        s.equals(&inputs[0].rank, 2)?;
        s.equals(&inputs[1].rank, 2)?;
        s.equals(&outputs[0].rank, 2)?;
        s.equals(&inputs[0].datum_type, &outputs[0].datum_type)?;
        s.equals(&inputs[1].datum_type, &outputs[0].datum_type)?;
        let (ca, ra) = if self.trans_a { (0, 1) } else { (1, 0) };
        let (cb, rb) = if self.trans_b { (0, 1) } else { (1, 0) };
        s.equals(&inputs[0].shape[ra], &outputs[0].shape[0])?;
        s.equals(&inputs[0].shape[ca], &inputs[1].shape[rb])?;
        s.equals(&inputs[1].shape[cb], &outputs[0].shape[1])?;
        Ok(())
    }

    fn wire(&self, name: &str, model: &mut TypedModel, inputs: &[OutletId]) -> TractResult<TVec<OutletId>> {
        let (a, b, c) = (inputs[0], inputs[1], inputs.get(2).copied());
        let dt = model.outlet_fact(a)?.datum_type;
        let scalar = |model: &mut TypedModel, v: f32, rank: usize, suffix: &str| -> TractResult<OutletId> {
            let t = tensor0(v).cast_to_dt(dt)?.into_owned().broadcast_into_rank(rank)?;
            model.add_const(format!("{name}.{suffix}"), t)
        };
        let axes = AxesMapping::for_numpy_matmul(2, self.trans_a, self.trans_b, false)?;
        let mut wire = model.wire_node(format!("{name}.ab"), EinSum::new(axes, dt), &[a, b])?[0];
        if self.alpha != 1.0 {
            let alpha = scalar(model, self.alpha, 2, "alpha")?;
            wire = model.wire_node(format!("{name}.alpha_ab"), ops::math::mul(), &[wire, alpha])?[0];
        }
        if let Some(mut c) = c.filter(|_| self.beta != 0.0) {
            while model.outlet_fact(c)?.rank() < 2 {
                let rank = model.outlet_fact(c)?.rank();
                c = model.wire_node(format!("{name}.c_add_axis_{rank}"), AxisOp::Add(0), &[c])?[0];
            }
            if self.beta != 1.0 {
                let beta = scalar(model, self.beta, 2, "beta")?;
                c = model.wire_node(format!("{name}.beta_c"), ops::math::mul(), &[c, beta])?[0];
            }
            wire = model.wire_node(name, ops::math::add(), &[wire, c])?[0];
        }
        Ok(tvec!(wire))
    }
}
