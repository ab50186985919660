//! ONNX Flatten. tract's refuses inputs with more than one symbolic dim ("square of symbols"), which every optimum
//! LLM export hits in its causal-mask construction ([batch, seq, total] → [batch·seq, total]). kiln's computes the
//! products symbolically and wires a single reshape.

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use crate::BuildResult;

pub fn build(_ctx: &ParsingContext, node: &NodeProto) -> BuildResult {
    let axis: i64 = node.get_attr_opt("axis")?.unwrap_or(1);
    Ok((expand(Flatten { axis }), vec![]))
}

#[derive(Debug, Clone, Hash, PartialEq, Eq)]
pub struct Flatten {
    pub axis: i64,
}

impl Flatten {
    fn split(&self, rank: usize) -> TractResult<usize> {
        let axis = if self.axis < 0 { self.axis + rank as i64 } else { self.axis };
        ensure!(axis >= 0 && axis as usize <= rank, "Flatten: axis {} is out of range for rank {rank}", self.axis);
        Ok(axis as usize)
    }
    /// The output shape `[prod(shape[..axis]), prod(shape[axis..])]`.
    pub fn compute_shape(&self, shape: &[TDim]) -> TractResult<[TDim; 2]> {
        let axis = self.split(shape.len())?;
        Ok([shape[..axis].iter().cloned().product(), shape[axis..].iter().cloned().product()])
    }
}

impl Expansion for Flatten {
    fn name(&self) -> StaticName {
        "Flatten".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        check_output_arity(outputs, 1)?;
        s.equals(&outputs[0].datum_type, &inputs[0].datum_type)?;
        s.equals(&outputs[0].rank, 2)?;
        s.given(&inputs[0].shape, move |s, shape| {
            let [a, b] = self.compute_shape(&shape)?;
            s.equals(&outputs[0].shape, ShapeFactoid::from(vec![a, b]))
        })
    }

    fn wire(&self, prefix: &str, model: &mut TypedModel, inputs: &[OutletId]) -> TractResult<TVec<OutletId>> {
        let shape: TVec<TDim> = model.outlet_fact(inputs[0])?.shape.to_tvec();
        let axis = self.split(shape.len())?;
        let mut wire = tvec!(inputs[0]);
        // [d0..d(axis-1)] → [prod] and [d(axis)..] → [prod], each a reshape of a contiguous axis range
        let tail: TDim = shape[axis..].iter().cloned().product();
        let head: TDim = shape[..axis].iter().cloned().product();
        let tail_op = AxisOp::Reshape(axis, shape[axis..].iter().cloned().collect(), tvec!(tail));
        wire = model.wire_node(format!("{prefix}.tail"), tail_op, &wire)?;
        let head_op = AxisOp::Reshape(0, shape[..axis].iter().cloned().collect(), tvec!(head));
        wire = model.wire_node(format!("{prefix}.head"), head_op, &wire)?;
        Ok(wire)
    }
}
