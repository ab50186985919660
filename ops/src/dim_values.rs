//! Shape arithmetic as integer tensors. tract keeps values computed from symbolic dims (an optimum export's
//! `arange(past + seq)`, `batch · total` offsets) as TDim tensors, which no GPU kernel can hold. kiln-graph's
//! `int_dims` pass rewrites those chains to i64: the constants that still carry symbols become [`DimValues`], a
//! Range over such constants becomes [`DimRange`]; both take the run's symbol values when evaluated, on the CPU
//! (here) or by a GPU kernel.

use tract_onnx::tract_core::internal::*;

fn eval_i64(d: &TDim, symbols: &SymbolValues) -> TractResult<i64> {
    d.eval(symbols).to_i64().with_context(|| format!("the dim {d} has no value in this run"))
}

/// An i64 tensor of symbolic values, each evaluated with the run's symbols.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DimValues {
    pub shape: TVec<usize>,
    pub values: Vec<TDim>,
}

impl DimValues {
    /// From a TDim tensor.
    pub fn from_tensor(t: &Tensor) -> TractResult<DimValues> {
        let values = t.try_as_plain_ram()?.as_slice::<TDim>()?.to_vec();
        Ok(DimValues { shape: t.shape().into(), values })
    }

    pub fn eval_with(&self, symbols: &SymbolValues) -> TractResult<Vec<i64>> {
        self.values.iter().map(|d| eval_i64(d, symbols)).collect()
    }
}

impl Op for DimValues {
    fn name(&self) -> StaticName {
        "KilnDimValues".into()
    }
    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![self.values.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")])
    }
    op_as_typed_op!();
}

impl EvalOp for DimValues {
    not_out_of_plan!();
    fn eval(&self, ctx: &EvalContext, _inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let v = self.eval_with(ctx.symbols)?;
        Ok(tvec!(Tensor::from_shape(&self.shape, &v)?.into_tvalue()))
    }
}

impl TypedOp for DimValues {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.is_empty(), "KilnDimValues takes no input");
        ensure!(self.shape.iter().product::<usize>() == self.values.len(), "KilnDimValues: shape and values differ");
        Ok(tvec!(i64::fact(&self.shape)))
    }
    as_op!();
}

/// `len` i64 values `start, start + step, …`, all three dims of the run's symbols (tract's Range over TDim
/// constants, which knows its length symbolically).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DimRange {
    pub start: TDim,
    pub step: TDim,
    pub len: TDim,
}

impl Op for DimRange {
    fn name(&self) -> StaticName {
        "KilnDimRange".into()
    }
    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("start {} step {} len {}", self.start, self.step, self.len)])
    }
    op_as_typed_op!();
}

impl EvalOp for DimRange {
    not_out_of_plan!();
    fn eval(&self, ctx: &EvalContext, _inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (start, step) = (eval_i64(&self.start, ctx.symbols)?, eval_i64(&self.step, ctx.symbols)?);
        let len = eval_i64(&self.len, ctx.symbols)?.max(0) as usize;
        let v: Vec<i64> = (0..len as i64).map(|i| start.wrapping_add(i.wrapping_mul(step))).collect();
        Ok(tvec!(tensor1(&v).into_tvalue()))
    }
}

impl TypedOp for DimRange {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.is_empty(), "KilnDimRange takes no input");
        Ok(tvec!(i64::fact([self.len.clone()])))
    }
    as_op!();
}
