//! ai.onnx.ml Binarizer: `x > threshold ? 1 : 0`, in x's type.

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use crate::kernel::*;
use crate::BuildResult;

#[derive(Debug, Clone, PartialEq)]
pub struct Binarizer {
    pub threshold: f32,
}

pub fn build(_ctx: &ParsingContext, node: &NodeProto) -> BuildResult {
    let threshold = node.get_attr_opt::<f32>("threshold")?.unwrap_or(0.0);
    Ok((expand(KernelExpansion(Binarizer { threshold })), vec![]))
}

impl Kernel for Binarizer {
    fn name(&self) -> &'static str {
        "Binarizer"
    }
    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        s.equals(&outputs[0].datum_type, &inputs[0].datum_type)?;
        s.equals(&outputs[0].shape, &inputs[0].shape)
    }
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs[0].datum_type.is_number(), "Binarizer: input must be numeric");
        Ok(tvec!(inputs[0].without_value()))
    }
    fn eval(&self, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let dt = inputs[0].datum_type();
        let x = to_f64(&inputs[0])?;
        let t = self.threshold as f64;
        Ok(tvec!(from_f64(x.mapv(|v| if v > t { 1.0 } else { 0.0 }), dt)?))
    }
}
