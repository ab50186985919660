//! `KilnSliceBarrier` (domain `ai.kiln`): an identity that tract's declutter cannot slice through. kiln's
//! generation helpers (kiln-graph's `generation`) slice the language-model head's input to the last position;
//! tract's `PushSliceUp` would otherwise push that slice up into the last decoder layer (its MLP, its attention's
//! `P · V`), which then no longer matches the patterns the GPU lowering fuses (the attention kernel, the projections
//! with their rotation and KV appends). The barrier keeps the slice where it was put, and kiln-graph removes it once
//! decluttered ([`remove`]); it never reaches a plan.

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use crate::kernel::*;
use crate::BuildResult;

/// The barrier's ONNX domain (its op type: [`OP_TYPE`]).
pub const DOMAIN: &str = "ai.kiln";
pub const OP_TYPE: &str = "KilnSliceBarrier";

#[derive(Debug, Clone, PartialEq)]
pub struct SliceBarrier;

pub fn build(ctx: &ParsingContext, node: &NodeProto) -> BuildResult {
    if node.domain != DOMAIN {
        return crate::tract_builder(ctx, node);
    }
    Ok((expand(KernelExpansion(SliceBarrier)), vec![]))
}

impl Kernel for SliceBarrier {
    fn name(&self) -> &'static str {
        OP_TYPE
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
        Ok(tvec!(inputs[0].without_value()))
    }
    fn eval(&self, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        Ok(inputs)
    }
}

/// Removes every barrier of `model` (each output wired to its input); returns how many.
pub fn remove(model: &mut TypedModel) -> TractResult<usize> {
    let mut removed = 0;
    while let Some(id) = model.nodes().iter().find(|n| n.op_is::<KernelOp<SliceBarrier>>()).map(|n| n.id) {
        let patch = TypedModelPatch::shunt_one_op(model, model.node(id))?
            .ok_or_else(|| format_err!("a slice barrier that cannot be removed"))?;
        patch.apply(model)?;
        removed += 1;
    }
    if removed > 0 {
        model.compact()?;
    }
    Ok(removed)
}
