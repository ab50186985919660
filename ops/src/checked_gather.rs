//! Gather with its indices checked. tract's Gather indexes its data slice with the raw indices, so an out-of-range
//! index (a token id past the vocabulary, say) panics — in wasm, a trap that kills the module. [`guard_gathers`] wraps
//! every Gather of a model about to run on the CPU in [`CheckedGather`], which checks the indices against the axis
//! (ONNX allows `-n..n`) and then runs tract's Gather unchanged.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::array::Gather;

/// Wraps every tract Gather node in [`CheckedGather`]; returns how many.
pub fn guard_gathers(model: &mut TypedModel) -> TractResult<usize> {
    let mut n = 0;
    for id in 0..model.nodes().len() {
        let Some(g) = model.nodes()[id].op_as::<Gather>() else { continue };
        let op = CheckedGather { inner: g.clone() };
        model.node_mut(id).op = Box::new(op);
        n += 1;
    }
    Ok(n)
}

/// Checks that every index `i` satisfies `-n <= i < n` for the gathered axis of length `n`.
pub fn check_indices(indices: &Tensor, axis_len: usize, what: &str) -> TractResult<()> {
    let idx = indices.cast_to::<i64>()?;
    let view = idx.try_as_plain_ram()?;
    let n = axis_len as i64;
    if let Some(bad) = view.as_slice::<i64>()?.iter().find(|i| **i < -n || **i >= n) {
        bail!("{what}: index {bad} is out of range for an axis of length {axis_len} (valid: {}..{})", -n, n - 1);
    }
    Ok(())
}

#[derive(Debug, Clone, Hash, PartialEq, Eq)]
pub struct CheckedGather {
    pub inner: Gather,
}

impl Op for CheckedGather {
    fn name(&self) -> StaticName {
        "Gather".into()
    }
    fn info(&self) -> TractResult<Vec<String>> {
        self.inner.info()
    }
    op_as_typed_op!();
}

impl EvalOp for CheckedGather {
    op_out_of_plan!();
    fn eval(&self, ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        ensure!(inputs.len() == 2, "Gather takes 2 inputs, got {}", inputs.len());
        let axis = self.inner.axis;
        let axis_len = *inputs[0]
            .shape()
            .get(axis)
            .ok_or_else(|| format_err!("Gather: axis {axis} is out of range for rank {}", inputs[0].rank()))?;
        check_indices(&inputs[1], axis_len, "Gather")?;
        self.inner.eval(ctx, inputs)
    }
}

impl TypedOp for CheckedGather {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        self.inner.output_facts(inputs)
    }
    as_op!();
}
