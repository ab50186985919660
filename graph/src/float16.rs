//! Float16 models computed in float32, as onnxruntime's CPU provider does.
//!
//! onnxruntime has float16 CPU kernels for data movement (Reshape, Transpose, Concat, ...) and a few fused ops only;
//! its `InsertCastTransformer` wraps every other float16 node in casts to float32 and then removes the back-to-back
//! casts, so a float16 LLM export really runs its arithmetic (norms, softmax, matmuls, rotary) in float32. tract
//! computes float16 nodes in float16, which drifts far from onnxruntime on real models (SmolLM2 q4f16: mean |logit
//! diff| 0.2, argmax differences at confident positions). kiln translates the typed model's float16 computation to
//! float32 (tract's `FloatPrecisionTranslator`) while keeping the interface: float16 inputs are cast up on entry and
//! float16 outputs cast back down on exit.
//!
//! Explicit casts to float16 inside the graph become float32 too. onnxruntime 1.32 removes most of those round trips
//! as well ("precision free" casts: an optimum Llama's residual stream and MLP stay float32 there), keeping float16
//! storage only around its float16 kernels (q/k/v/o projections, attention outputs). Emulating exactly those points
//! would tie kiln to onnxruntime's graph transformers; rounding at every explicit cast was measured further from it on
//! SmolLM2 (argmax flips at a confident position), so kiln rounds nowhere but the outputs.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::floats::FloatPrecisionTranslator;
use tract_onnx::tract_core::model::translator::Translate;
use tract_onnx::tract_core::ops::cast::cast;
use tract_onnx::tract_core::ops::source::TypedSource;
use tract_onnx::tract_hir::internal::*;

#[derive(Debug)]
struct F16ToF32 {
    inner: FloatPrecisionTranslator,
}

impl Translate<TypedFact, Box<dyn TypedOp>, TypedFact, Box<dyn TypedOp>> for F16ToF32 {
    fn translate_node(
        &self,
        source: &TypedModel,
        node: &TypedNode,
        target: &mut TypedModel,
        mapping: &HashMap<OutletId, OutletId>,
    ) -> TractResult<TVec<OutletId>> {
        if let Some(src) = node.op_as::<TypedSource>() {
            if src.fact.datum_type == f16::datum_type() {
                let wire = target.add_source(&node.name, src.fact.clone())?;
                return target.wire_node(format!("{}.kiln_f32", node.name), cast(f32::datum_type()), &[wire]);
            }
        }
        // a streamed float16 weight: as a constant, read as is and cast once (crate::stream folds the cast into
        // the upload)
        if let Some(w) = node.op_as::<kiln_ops::external_weight::ExternalWeight>() {
            if node.outputs[0].fact.datum_type == f16::datum_type() {
                let wire = target.wire_node(format!("{}.f16", node.name), w.clone(), &[])?;
                return target.wire_node(&node.name, cast(f32::datum_type()), &wire);
            }
        }
        self.inner.translate_node(source, node, target, mapping)
    }
}

/// True when any fact of the model is float16.
pub fn uses_f16(model: &TypedModel) -> bool {
    model.nodes().iter().any(|n| n.outputs.iter().any(|o| o.fact.datum_type == f16::datum_type()))
}

/// Rewrites the model's float16 computation to float32, keeping float16 inputs and outputs. Returns whether anything
/// changed.
pub fn compute_in_f32(model: &mut TypedModel) -> TractResult<bool> {
    if !uses_f16(model) {
        return Ok(false);
    }
    let translator = F16ToF32 { inner: FloatPrecisionTranslator::new(f16::datum_type(), f32::datum_type()) };
    let mut target = translator.translate_model(model)?;
    // float16 inputs map to their cast; the model's input is the source before it
    let mut inputs = target.inputs.clone();
    for input in inputs.iter_mut() {
        let node = target.node(input.node);
        if !node.op_is::<TypedSource>() {
            let source = node.inputs.first().copied().ok_or_else(|| format_err!("float16 input without its source"))?;
            ensure!(target.node(source.node).op_is::<TypedSource>(), "float16 input cast does not follow its source");
            *input = source;
        }
    }
    target.inputs = inputs;
    // translated nodes keep float32 outputs: cast the model's float16 outputs back down
    let mut outputs = target.outputs.clone();
    for (ix, output) in outputs.iter_mut().enumerate() {
        let was = model.outlet_fact(model.outputs[ix])?.datum_type;
        if was == f16::datum_type() && target.outlet_fact(*output)?.datum_type != was {
            let name = format!("{}.kiln_f16_output_{ix}", target.node(output.node).name);
            *output = target.wire_node(name, cast(was), &[*output])?[0];
        }
    }
    target.outputs = outputs;
    *model = target;
    Ok(true)
}
