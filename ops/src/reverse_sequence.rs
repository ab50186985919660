//! ONNX ReverseSequence: reverses the first `sequence_lens[b]` steps along `time_axis` for each batch entry b.

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use crate::kernel::*;
use crate::BuildResult;

#[derive(Debug, Clone, PartialEq)]
pub struct ReverseSequence {
    pub batch_axis: usize,
    pub time_axis: usize,
}

pub fn build(_ctx: &ParsingContext, node: &NodeProto) -> BuildResult {
    let batch_axis = node.get_attr_opt::<i64>("batch_axis")?.unwrap_or(1);
    let time_axis = node.get_attr_opt::<i64>("time_axis")?.unwrap_or(0);
    ensure!(
        (batch_axis == 0 && time_axis == 1) || (batch_axis == 1 && time_axis == 0),
        "ReverseSequence: batch_axis and time_axis must be 0 and 1 in some order"
    );
    Ok((
        expand(KernelExpansion(ReverseSequence { batch_axis: batch_axis as usize, time_axis: time_axis as usize })),
        vec![],
    ))
}

impl Kernel for ReverseSequence {
    fn name(&self) -> &'static str {
        "ReverseSequence"
    }
    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 2)?;
        s.equals(&outputs[0].datum_type, &inputs[0].datum_type)?;
        s.equals(&outputs[0].shape, &inputs[0].shape)
    }
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs[0].rank() >= 2, "ReverseSequence: input must have rank >= 2");
        Ok(tvec!(inputs[0].without_value()))
    }
    fn eval(&self, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = inputs[0].clone().into_tensor();
        ensure!(x.rank() >= 2, "ReverseSequence: input must have rank >= 2");
        let lens = to_i64(&inputs[1])?;
        let batch = x.shape()[self.batch_axis];
        let time = x.shape()[self.time_axis];
        ensure!(lens.len() == batch, "ReverseSequence: sequence_lens has {} values for batch {batch}", lens.len());
        // gather indices along the time axis per batch entry
        let mut out = x.clone();
        for (b, l) in lens.iter().enumerate() {
            ensure!(*l >= 0 && *l as usize <= time, "ReverseSequence: sequence length {l} out of range 0..={time}");
            let l = *l as usize;
            let row = x.slice(self.batch_axis, b, b + 1)?;
            let idx: Vec<i64> = (0..time).map(|t| if t < l { (l - 1 - t) as i64 } else { t as i64 }).collect();
            let reversed = crate::compress::gather_axis(&row, self.time_axis, &tensor1(&idx))?;
            out.assign_slice(b..b + 1, &reversed, 0..1, self.batch_axis)?;
        }
        Ok(tvec!(out.into_tvalue()))
    }
}
