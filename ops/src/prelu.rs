//! ONNX PRelu: tract's from opset 7; before (pytorch-converted models at opset 6) a 1-D slope is per channel
//! (axis 1), not numpy-broadcast from the right, which kiln wires as slope [C] → [1, C, 1, ...].

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_core;
use tract_onnx::tract_hir::internal::*;

use crate::BuildResult;

pub fn build(ctx: &ParsingContext, node: &NodeProto) -> BuildResult {
    if ctx.onnx_operator_set_version >= 7 {
        return crate::tract_builder(ctx, node);
    }
    Ok((expand(LegacyPrelu), vec![]))
}

#[derive(Debug, Clone, Hash, PartialEq, Eq)]
pub struct LegacyPrelu;

impl Expansion for LegacyPrelu {
    fn name(&self) -> StaticName {
        "PRelu".into()
    }
    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 2)?;
        check_output_arity(outputs, 1)?;
        s.equals(&inputs[0].datum_type, &outputs[0].datum_type)?;
        s.equals(&inputs[0].shape, &outputs[0].shape)
    }
    fn wire(&self, name: &str, model: &mut TypedModel, inputs: &[OutletId]) -> TractResult<TVec<OutletId>> {
        let a = inputs[0];
        let mut b = inputs[1];
        let rank = model.outlet_fact(a)?.rank();
        let slope = model.outlet_fact(b)?.clone();
        if slope.rank() == 1 && rank >= 2 && slope.shape[0] != 1.to_dim() {
            ensure!(
                slope.shape[0] == model.outlet_fact(a)?.shape[1],
                "PRelu: slope of {} values for {} channels",
                slope.shape[0],
                model.outlet_fact(a)?.shape[1]
            );
            // [C] → [C, 1, ..] (rank - 1) → [1, C, 1, ..]
            for i in 1..rank - 1 {
                b = model.wire_node(format!("{name}.slope-axis-{i}"), AxisOp::Add(i), &[b])?[0];
            }
        }
        while model.outlet_fact(b)?.rank() < rank {
            let r = model.outlet_fact(b)?.rank();
            b = model.wire_node(format!("{name}.add-axis-{r}"), AxisOp::Add(0), &[b])?[0];
        }
        let dt = model.outlet_fact(a)?.datum_type;
        let zero = tensor0(0.0).cast_to_dt(dt)?.into_owned().broadcast_into_rank(rank)?;
        let ab = model.wire_node(format!("{name}.mul"), tract_onnx::tract_hir::ops::math::mul(), &[a, b])?[0];
        let zero = model.add_const(format!("{name}.zero"), zero)?;
        let test = model.wire_node(
            format!("{name}.test"),
            tract_core::ops::binary::TypedBinOp(tract_core::ops::logic::comp_gt(), None),
            &[zero, a],
        )?;
        model.wire_node(format!("{name}.iff"), tract_core::ops::logic::Iff, &[test[0], ab, a])
    }
}
