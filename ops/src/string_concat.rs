//! ONNX StringConcat: element-wise concatenation of two string tensors, with broadcasting.

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_core::broadcast::multi_broadcast;
use tract_onnx::tract_hir::internal::*;

use crate::kernel::*;
use crate::BuildResult;

#[derive(Debug, Clone, PartialEq)]
pub struct StringConcat;

pub fn build(_ctx: &ParsingContext, _node: &NodeProto) -> BuildResult {
    Ok((expand(KernelExpansion(StringConcat)), vec![]))
}

impl Kernel for StringConcat {
    fn name(&self) -> &'static str {
        "StringConcat"
    }
    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 2)?;
        s.equals(&outputs[0].datum_type, DatumType::String)
    }
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 2, "StringConcat: expects two inputs");
        for i in inputs {
            ensure!(i.datum_type == DatumType::String, "StringConcat: inputs must be strings, got {:?}", i.datum_type);
        }
        let shape = multi_broadcast(&[inputs[0].shape.to_tvec(), inputs[1].shape.to_tvec()])?;
        Ok(tvec!(TypedFact::dt_shape(DatumType::String, shape)))
    }
    fn eval(&self, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let a = inputs[0].to_plain_array_view::<String>()?;
        let b = inputs[1].to_plain_array_view::<String>()?;
        let shape = multi_broadcast(&[a.shape().to_vec(), b.shape().to_vec()])?;
        let a = a.broadcast(&*shape).ok_or_else(|| format_err!("StringConcat: cannot broadcast"))?;
        let b = b.broadcast(&*shape).ok_or_else(|| format_err!("StringConcat: cannot broadcast"))?;
        let out = tract_ndarray::Zip::from(&a).and(&b).map_collect(|x, y| format!("{x}{y}"));
        Ok(tvec!(Tensor::from(out).into_tvalue()))
    }
}
