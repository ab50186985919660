//! ONNX MatMul: tract's, plus the vector·vector case it refuses (1-D × 1-D → scalar), wired as
//! [1,K]·[K,1] → [1,1] → scalar.

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;
use tract_onnx::tract_hir::ops::matmul::MatMulInference;

use crate::BuildResult;

pub fn build(_ctx: &ParsingContext, _node: &NodeProto) -> BuildResult {
    Ok((expand(MatMul(MatMulInference::default())), vec![]))
}

#[derive(Debug, Clone, Hash, PartialEq, Eq)]
pub struct MatMul(pub MatMulInference);

impl Expansion for MatMul {
    fn name(&self) -> StaticName {
        "MatMul".into()
    }
    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        self.0.rules(s, inputs, outputs)
    }
    fn wire(&self, prefix: &str, model: &mut TypedModel, inputs: &[OutletId]) -> TractResult<TVec<OutletId>> {
        ensure!(inputs.len() == 2, "MatMul: expects two inputs");
        let ra = model.outlet_fact(inputs[0])?.rank();
        let rb = model.outlet_fact(inputs[1])?.rank();
        if ra == 1 && rb == 1 {
            let a = model.wire_node(format!("{prefix}.a_row"), AxisOp::Add(0), &[inputs[0]])?[0];
            let b = model.wire_node(format!("{prefix}.b_col"), AxisOp::Add(1), &[inputs[1]])?[0];
            let c = self.0.wire(&format!("{prefix}.mm"), model, &[a, b])?;
            let c = model.wire_node(format!("{prefix}.rm1"), AxisOp::Rm(1), &c)?;
            return model.wire_node(format!("{prefix}.rm0"), AxisOp::Rm(0), &c);
        }
        self.0.wire(prefix, model, inputs)
    }
}
