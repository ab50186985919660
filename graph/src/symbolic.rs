//! Guards tract's declutter against symbolic shape arithmetic it cannot simplify.
//!
//! tract 0.23.9's `Mul` declutter reads a uniform operand as a number (`cast_to_scalar::<f64>`); when that operand is
//! a symbolic `TDim` (optimum exports multiply a batch index by `past_sequence_length + sequence_length` to flatten the
//! attention mask) the cast fails and the whole declutter aborts with "Undetermined symbol in expression". kiln wraps
//! such nodes in [`NoDeclutter`], which evaluates exactly like the wrapped op but offers no rewrite while an operand is
//! still a symbolic uniform; once the operand becomes concrete the wrapper hands the node back to tract's op.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::optim::{Optimizer, OptimizerSession, TypedPass};
use tract_onnx::tract_hir::internal::*;

/// A typed op whose declutter is withheld while one of its inputs is a symbolic `TDim` uniform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoDeclutter(pub Box<dyn TypedOp>);

impl std::hash::Hash for NoDeclutter {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.name().hash(state)
    }
}

/// True when a fact carries a uniform or constant `TDim` value that still mentions a symbol.
fn symbolic_tdim(fact: &TypedFact) -> bool {
    [fact.uniform.as_deref(), fact.konst.as_deref()].into_iter().flatten().any(|t| {
        t.datum_type() == TDim::datum_type()
            && t.try_as_plain_ram()
                .ok()
                .and_then(|v| v.as_slice::<TDim>().ok().map(|s| s.iter().any(|d| d.to_i64().is_err())))
                .unwrap_or(false)
    })
}

/// Binary ops whose declutter reads a uniform operand as a number.
fn is_guarded(op: &dyn TypedOp) -> bool {
    op.downcast_ref::<TypedBinOp>().is_some_and(|b| b.0.name() == "Mul")
}

impl Op for NoDeclutter {
    fn name(&self) -> StaticName {
        self.0.name()
    }
    fn validation(&self) -> Validation {
        self.0.validation()
    }
    fn info(&self) -> TractResult<Vec<String>> {
        let mut info = self.0.info()?;
        info.push("kiln: declutter withheld (symbolic uniform operand)".into());
        Ok(info)
    }
    fn required_bound_symbols(&self, inputs: &[&TypedFact]) -> TVec<Symbol> {
        self.0.as_op().required_bound_symbols(inputs)
    }
    op_as_typed_op!();
}

impl EvalOp for NoDeclutter {
    fn eval(&self, ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        self.0.eval(ctx, inputs)
    }
    fn eval_out_of_plan(&self, inputs: TVec<TValue>) -> TractResult<Option<TVec<TValue>>> {
        self.0.eval_out_of_plan(inputs)
    }
    fn state(&self, ctx: &EvalContext) -> TractResult<Option<Box<dyn OpState>>> {
        self.0.state(ctx)
    }
}

impl TypedOp for NoDeclutter {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        self.0.output_facts(inputs)
    }

    fn axes_mapping(&self, inputs: &[&TypedFact], outputs: &[&TypedFact]) -> TractResult<AxesMapping> {
        self.0.axes_mapping(inputs, outputs)
    }

    fn declutter(&self, model: &TypedModel, node: &TypedNode) -> TractResult<Option<TypedModelPatch>> {
        let facts = model.node_input_facts(node.id)?;
        if facts.iter().any(|f| symbolic_tdim(f)) {
            return Ok(None);
        }
        // concrete again: give the node back to tract's op
        Ok(Some(TypedModelPatch::replace_single_op(model, node, &node.inputs, self.0.clone())?))
    }

    fn cost(&self, inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        self.0.cost(inputs)
    }

    fn change_axes(
        &self,
        model: &TypedModel,
        node: &TypedNode,
        io: InOut,
        change: &AxisOp,
    ) -> TractResult<Option<AxisChangeConsequence>> {
        let Some(mut consequence) = self.0.change_axes(model, node, io, change)? else {
            return Ok(None);
        };
        if let Some(op) = consequence.substitute_op.take() {
            consequence.substitute_op = Some(Box::new(NoDeclutter(op)));
        }
        Ok(Some(consequence))
    }

    fn set_symbols(
        &self,
        source: &TypedModel,
        node: &TypedNode,
        target: &mut TypedModel,
        mapping: &HashMap<OutletId, OutletId>,
        subs: &HashMap<Symbol, TDim>,
    ) -> TractResult<TVec<OutletId>> {
        self.0.set_symbols(source, node, target, mapping, subs)
    }
}

/// The pass: wraps every guarded node that has a symbolic `TDim` uniform input. Runs first in each declutter round.
#[derive(Debug, Clone, Default)]
pub struct GuardSymbolicUniforms;

impl TypedPass for GuardSymbolicUniforms {
    fn reset(&mut self) -> TractResult<()> {
        Ok(())
    }
    fn next(&mut self, _session: &mut OptimizerSession, model: &TypedModel) -> TractResult<Option<TypedModelPatch>> {
        for node in model.eval_order()? {
            let node = model.node(node);
            if !is_guarded(node.op.as_ref()) {
                continue;
            }
            let facts = model.node_input_facts(node.id)?;
            if facts.iter().any(|f| symbolic_tdim(f)) {
                let op = NoDeclutter(node.op.clone());
                return Ok(Some(TypedModelPatch::replace_single_op(model, node, &node.inputs, op)?));
            }
        }
        Ok(None)
    }
}

/// tract's declutter with [`GuardSymbolicUniforms`] first. Returns the names of the nodes it guarded.
pub fn declutter(model: &mut TypedModel) -> TractResult<Vec<String>> {
    let mut optimizer = Optimizer::declutter();
    optimizer.add_pass(0, Box::new(GuardSymbolicUniforms));
    optimizer.session().optimize(model)?;
    Ok(model.nodes().iter().filter(|n| n.op_is::<NoDeclutter>()).map(|n| n.name.clone()).collect())
}
