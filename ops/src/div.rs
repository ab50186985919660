//! ONNX Div. tract declutters every float division `a / b` into `a * recip(b)`, which is up to an ulp off IEEE
//! division (ONNX's and onnxruntime's semantics). In int8 models (dynamic quantization per tensor) such ulps flip
//! uint8 codes of the next DynamicQuantizeLinear and the flips compound over the layers (all-MiniLM-L6-v2: GELU's
//! `x / sqrt(2)`). kiln's Div is tract's in every respect (name, eval, integer shift declutter) except that float
//! divisions stay divisions.

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_core::ops::binary::BinMiniOp;
use tract_onnx::tract_core::ops::math::Div;
use tract_onnx::tract_hir::internal::*;
use tract_onnx::tract_hir::ops::binary::BinIntoHir;

use crate::BuildResult;

pub fn build(_ctx: &ParsingContext, _node: &NodeProto) -> BuildResult {
    Ok((ExactDiv.into_hir(), vec![]))
}

/// tract's `Div` without its float `a * recip(b)` rewrite.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
pub struct ExactDiv;

impl BinMiniOp for ExactDiv {
    fn name(&self) -> &'static str {
        Div.name()
    }
    fn validation(&self) -> Validation {
        Div.validation()
    }
    fn operating_datum_type(&self, a: DatumType, b: DatumType) -> TractResult<DatumType> {
        Div.operating_datum_type(a, b)
    }
    fn result_datum_type(&self, a: DatumType, b: DatumType) -> TractResult<DatumType> {
        Div.result_datum_type(a, b)
    }
    fn eval_in_a(&self, a: &mut Tensor, b: &Tensor) -> TractResult<()> {
        Div.eval_in_a(a, b)
    }
    fn eval_out_of_place(&self, c: &mut Tensor, a: &Tensor, b: &Tensor) -> TractResult<()> {
        Div.eval_out_of_place(c, a, b)
    }
    fn is_commutative(&self) -> bool {
        Div.is_commutative()
    }
    fn neutral_element(&self) -> Option<i64> {
        Div.neutral_element()
    }
    fn absorbing_element(&self) -> Option<i64> {
        Div.absorbing_element()
    }
    fn maybe_eval_qbinary_as_float_op(&self, a: &TValue, b: &TValue, c_dt: &DatumType) -> TractResult<Option<Tensor>> {
        Div.maybe_eval_qbinary_as_float_op(a, b, c_dt)
    }
    fn eval(&self, a: TValue, b: TValue, c_dt: DatumType) -> TractResult<Tensor> {
        Div.eval(a, b, c_dt)
    }
    fn declutter(&self, model: &TypedModel, node: &TypedNode) -> TractResult<Option<TypedModelPatch>> {
        let float = node.inputs.iter().any(|i| model.outlet_fact(*i).map(|f| f.datum_type.is_float()).unwrap_or(true));
        if float {
            return Ok(None);
        }
        Div.declutter(model, node)
    }
    fn codegen(&self, model: &TypedModel, node: &TypedNode) -> TractResult<Option<TypedModelPatch>> {
        Div.codegen(model, node)
    }
    fn cost_per_element(&self, dt: DatumType) -> TVec<(Cost, usize)> {
        Div.cost_per_element(dt)
    }
    fn as_linalg_binop(&self) -> Option<tract_onnx::tract_core::tract_linalg::BinOp> {
        Div.as_linalg_binop()
    }
    fn eval_symbolic(&self, ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<Option<TVec<TValue>>> {
        Div.eval_symbolic(ctx, inputs)
    }
    fn uniform_tdim_comparison(&self, a: &TDim, b: &TDim) -> Option<TDim> {
        Div.uniform_tdim_comparison(a, b)
    }
}
