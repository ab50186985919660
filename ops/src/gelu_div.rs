//! The `x / sqrt(2)` of an exact-GELU subgraph, computed as onnxruntime's fused Gelu does.
//!
//! onnxruntime's graph optimiser (GeluFusion, on by default) replaces `Div(x, sqrt 2) → Erf → Add(1) → Mul(x) →
//! Mul(0.5)` by com.microsoft Gelu, whose CPU kernel computes `0.5 * x * (erf(x * M_SQRT1_2) + 1)`: a multiplication
//! by the float32 `1/sqrt(2)` (0x3f3504f3) where the model divides by `sqrt(2)`, an ulp apart on about half of the
//! elements. In int8 models (per-tensor dynamic quantization of the GELU output) such ulps flip uint8 codes of the
//! next DynamicQuantizeLinear (all-MiniLM-L6-v2 on a padded batch). The rest of the subgraph already rounds as the
//! fused kernel does (kiln's Erf is MLAS's, and `(x * (e + 1)) * 0.5 == (0.5 * x) * (e + 1)`: halving is exact).
//!
//! So a float32 Div whose node heads that pattern (the divisor a scalar constant within onnxruntime's tolerance of
//! sqrt 2, every intermediate consumed once and no graph output) multiplies by 1/sqrt(2); every other Div is
//! [`crate::div`]'s.

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::{GraphProto, NodeProto, TensorProto};
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::change_axes::wire_with_rank_broadcast;
use tract_onnx::tract_core::ops::math::mul;
use tract_onnx::tract_hir::internal::*;

use crate::BuildResult;

pub fn build(ctx: &ParsingContext, node: &NodeProto) -> BuildResult {
    // the graph being parsed (tract pushes it before building its nodes)
    if ctx.parent_graphs.last().is_some_and(|g| heads_gelu(g, node)) {
        return Ok((expand(GeluDiv), vec![]));
    }
    crate::div::build(ctx, node)
}

/// `1/sqrt(2)` as onnxruntime's Gelu kernel rounds `M_SQRT1_2` to float32.
pub const SQRT1_2: f32 = std::f32::consts::FRAC_1_SQRT_2;

/// `x / sqrt(2)` as `x * SQRT1_2` for float32 `x` (the divisor input is ignored: the builder checked it); other
/// element types divide as [`crate::div::ExactDiv`].
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
pub struct GeluDiv;

impl Expansion for GeluDiv {
    fn name(&self) -> StaticName {
        "Div".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec!["GELU's x / sqrt(2), as onnxruntime's fused Gelu: x * 0.70710677".into()])
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 2)?;
        check_output_arity(outputs, 1)?;
        s.equals(&inputs[0].datum_type, &inputs[1].datum_type)?;
        s.equals(&outputs[0].datum_type, &inputs[0].datum_type)?;
        s.equals(&outputs[0].shape, &inputs[0].shape)?;
        Ok(())
    }

    fn wire(&self, prefix: &str, model: &mut TypedModel, inputs: &[OutletId]) -> TractResult<TVec<OutletId>> {
        let x = model.outlet_fact(inputs[0])?.clone();
        if x.datum_type == f32::datum_type() {
            let c = model.add_const(format!("{prefix}.sqrt1_2"), tensor0(SQRT1_2))?;
            return wire_with_rank_broadcast(prefix, model, mul(), &[inputs[0], c]);
        }
        let op = TypedBinOp(Box::new(crate::div::ExactDiv), None);
        wire_with_rank_broadcast(prefix, model, op, inputs)
    }
}

/// True when `div` is the Div of onnxruntime's GeluFusion pattern in `graph`.
fn heads_gelu(graph: &GraphProto, div: &NodeProto) -> bool {
    if div.input.len() != 2 || div.output.len() != 1 {
        return false;
    }
    let x = &div.input[0];
    let Some(sqrt2) = scalar_constant(graph, &div.input[1]) else { return false };
    if !close(sqrt2, std::f32::consts::SQRT_2) {
        return false;
    }
    let Some(erf) = only_consumer(graph, &div.output[0]) else { return false };
    if erf.op_type != "Erf" || !crate::is_onnx_domain(erf) || erf.output.len() != 1 {
        return false;
    }
    let Some(add) = only_consumer(graph, &erf.output[0]) else { return false };
    if add.op_type != "Add" || !crate::is_onnx_domain(add) || add.input.len() != 2 || add.output.len() != 1 {
        return false;
    }
    let one = if add.input[0] == erf.output[0] { &add.input[1] } else { &add.input[0] };
    if !scalar_constant(graph, one).is_some_and(|v| close(v, 1.0)) {
        return false;
    }
    let Some(mul1) = only_consumer(graph, &add.output[0]) else { return false };
    if mul1.op_type != "Mul" || !crate::is_onnx_domain(mul1) || mul1.input.len() != 2 || mul1.output.len() != 1 {
        return false;
    }
    let other = if mul1.input[0] == add.output[0] { &mul1.input[1] } else { &mul1.input[0] };
    if other == x {
        // Mul(x, erf + 1) then Mul(0.5)
        let Some(mul2) = only_consumer(graph, &mul1.output[0]) else { return false };
        return mul2.op_type == "Mul"
            && crate::is_onnx_domain(mul2)
            && mul2.input.len() == 2
            && mul2
                .input
                .iter()
                .any(|i| i != &mul1.output[0] && scalar_constant(graph, i).is_some_and(|v| close(v, 0.5)));
    }
    // Mul(0.5 * x, erf + 1), with 0.5 * x computed by a Mul of x
    graph.node.iter().any(|n| {
        n.output.first() == Some(other)
            && n.op_type == "Mul"
            && crate::is_onnx_domain(n)
            && n.input.len() == 2
            && n.input.contains(x)
            && n.input.iter().any(|i| i != x && scalar_constant(graph, i).is_some_and(|v| close(v, 0.5)))
    })
}

/// onnxruntime's `IsInitializerWithExpectedValue` tolerance.
fn close(v: f32, want: f32) -> bool {
    (v - want).abs() <= 1e-8 + 1e-5 * want.abs()
}

/// The node consuming `name`, when exactly one node input (and no graph output) uses it.
fn only_consumer<'g>(graph: &'g GraphProto, name: &str) -> Option<&'g NodeProto> {
    if name.is_empty() || graph.output.iter().any(|o| o.name == name) {
        return None;
    }
    let mut uses = graph.node.iter().flat_map(|n| n.input.iter().filter(|i| *i == name).map(move |_| n));
    let first = uses.next()?;
    uses.next().is_none().then_some(first)
}

/// The value of a one-element float32 initializer or Constant named `name`.
fn scalar_constant(graph: &GraphProto, name: &str) -> Option<f32> {
    if let Some(t) = graph.initializer.iter().find(|t| t.name == name) {
        return scalar_of(t);
    }
    let node = graph.node.iter().find(|n| n.op_type == "Constant" && n.output.first().is_some_and(|o| o == name))?;
    let attr = node.attribute.iter().find(|a| a.name == "value")?;
    scalar_of(attr.t.as_ref()?)
}

fn scalar_of(t: &TensorProto) -> Option<f32> {
    if t.data_type != 1 || t.dims.iter().product::<i64>() != 1 || t.dims.len() > 1 {
        return None;
    }
    if let Some(v) = t.float_data.first() {
        return Some(*v);
    }
    let raw: [u8; 4] = t.raw_data.get(..4)?.try_into().ok()?;
    Some(f32::from_le_bytes(raw))
}
