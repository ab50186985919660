//! ONNX BitCast (opset 26): reinterprets the bytes of a tensor as another element type of the same width.

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use crate::kernel::*;
use crate::BuildResult;

#[derive(Debug, Clone, PartialEq)]
pub struct BitCast {
    pub to: DatumType,
}

pub fn build(_ctx: &ParsingContext, node: &NodeProto) -> BuildResult {
    let to: i64 = node.get_attr("to")?;
    let to = datum_type_of_onnx("BitCast", to)?;
    ensure!(to != DatumType::String, "BitCast: to STRING is not supported");
    Ok((expand(KernelExpansion(BitCast { to })), vec![]))
}

impl Kernel for BitCast {
    fn name(&self) -> &'static str {
        "BitCast"
    }
    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        s.equals(&outputs[0].datum_type, self.to)?;
        s.equals(&outputs[0].shape, &inputs[0].shape)
    }
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let from = inputs[0].datum_type;
        ensure!(from != DatumType::String, "BitCast: from STRING is not supported");
        ensure!(
            from.size_of() == self.to.size_of(),
            "BitCast: {from:?} and {:?} differ in width ({} vs {} bytes)",
            self.to,
            from.size_of(),
            self.to.size_of()
        );
        Ok(tvec!(TypedFact::dt_shape(self.to, inputs[0].shape.clone())))
    }
    fn eval(&self, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = &inputs[0];
        ensure!(x.datum_type() != DatumType::String, "BitCast: from STRING is not supported");
        ensure!(x.datum_type().size_of() == self.to.size_of(), "BitCast: element widths differ");
        let mut bytes = x.as_bytes().to_vec();
        if self.to == DatumType::Bool {
            // a bool must be 0 or 1
            bytes.iter_mut().for_each(|b| *b = (*b != 0) as u8);
        }
        let t = unsafe { Tensor::from_raw_dt(self.to, x.shape(), &bytes)? };
        Ok(tvec!(t.into_tvalue()))
    }
}
