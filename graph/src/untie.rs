//! Untying constant weights so tract can prepack them.
//!
//! A tied LM head (SmolLM2, Llama-style exports with `tie_word_embeddings`) reads the float16 embedding through a Cast
//! to float32 that both the embedding Gather and the final MatMul consume. tract folds no constant larger than its
//! budget (the float32 copy is twice the float16 one), so every decode step casts the whole 49152×576 table and the
//! MatMul repacks it as a non-constant operand (~53 ms/token on SmolLM2). Two rewrites, after declutter:
//!
//! - untie: a matmul (`EinSum`) operand computed from a constant by a chain of single-input ops (Cast, axis moves) gets
//!   its own constant, evaluated once at load; tract's codegen then prepacks it. The original chain stays for its
//!   other consumers.
//! - gather first: `Gather(Cast(C), i)` becomes `Cast(Gather(C, i))`, so an embedding lookup casts only the rows it
//!   reads.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::array::Gather;
use tract_onnx::tract_core::ops::cast::Cast;
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_core::ops::konst::Const;
use tract_onnx::tract_hir::internal::*;

/// Ops a constant may pass through on its way to a matmul and still be evaluated at load.
fn is_const_chain_op(node: &TypedNode) -> bool {
    node.inputs.len() == 1 && (node.op_is::<Cast>() || node.op_is::<AxisOp>())
}

/// The chain `[first, ..., last]` of single-input ops from a plain constant to `outlet`, and that constant's node.
fn const_chain(model: &TypedModel, outlet: OutletId) -> Option<(usize, Vec<usize>)> {
    let mut chain = vec![];
    let mut current = outlet;
    loop {
        let node = model.node(current.node);
        if let Some(k) = node.op_as::<Const>() {
            if chain.is_empty() || k.exotic_fact().is_some() || !k.val().is_plain() {
                return None;
            }
            chain.reverse();
            return Some((node.id, chain));
        }
        if !is_const_chain_op(node) || current.slot != 0 {
            return None;
        }
        chain.push(node.id);
        current = node.inputs[0];
    }
}

fn mib(t: &Tensor) -> f64 {
    (t.len() * t.datum_type().size_of()) as f64 / (1024.0 * 1024.0)
}

/// Gives every matmul operand computed from a constant its own evaluated constant. Returns one log line per operand.
pub fn untie_matmul_constants(model: &mut TypedModel) -> TractResult<Vec<String>> {
    let mut log = vec![];
    let einsums: Vec<usize> = model.nodes().iter().filter(|n| n.op_is::<EinSum>()).map(|n| n.id).collect();
    for id in einsums {
        for slot in 0..model.node(id).inputs.len() {
            let outlet = model.node(id).inputs[slot];
            let Some((konst, chain)) = const_chain(model, outlet) else { continue };
            let Some(mut value) = model.node(konst).op_as::<Const>().map(|k| k.val().clone().into_tensor()) else {
                continue;
            };
            let mut evaluated = true;
            for op_node in &chain {
                let op = &model.node(*op_node).op;
                match op.eval_out_of_plan(tvec!(value.clone().into_tvalue()))? {
                    Some(mut out) if out.len() == 1 => value = out.remove(0).into_tensor(),
                    _ => {
                        evaluated = false;
                        break;
                    }
                }
            }
            if !evaluated {
                continue;
            }
            let shared = model.node(chain[0]).inputs.len() == 1
                && chain.iter().chain([&konst]).any(|n| model.node(*n).outputs[0].successors.len() > 1);
            let (konst_name, matmul_name) = (model.node(konst).name.clone(), model.node(id).name.clone());
            let shape = value.shape().to_vec();
            let size = mib(&value);
            let dt = value.datum_type();
            let wire = model.add_const(format!("{matmul_name}.kiln_weight_{slot}"), value)?;
            model.add_edge(wire, InletId::new(id, slot))?;
            log.push(format!(
                "{} `{konst_name}` for `{matmul_name}`: its own {dt:?} {shape:?} constant ({size:.1} MiB), prepackable",
                if shared { "untied" } else { "materialized" }
            ));
        }
    }
    if !log.is_empty() {
        // drop the chains nothing reads any more
        model.compact()?;
    }
    Ok(log)
}

/// Rewrites `Gather(Cast(C), i)` into `Cast(Gather(C, i))` where C is a constant. Returns one log line per gather.
pub fn gather_before_cast(model: &mut TypedModel) -> TractResult<Vec<String>> {
    let mut log = vec![];
    let gathers: Vec<usize> = model.nodes().iter().filter(|n| n.op_is::<Gather>()).map(|n| n.id).collect();
    for id in gathers {
        let gather = model.node(id);
        let Some(op) = gather.op_as::<Gather>() else { continue };
        if op.output_type.is_some() || gather.inputs.len() != 2 {
            continue;
        }
        let cast_node = model.node(gather.inputs[0].node);
        if !cast_node.op_is::<Cast>() || cast_node.inputs.len() != 1 {
            continue;
        }
        let source = model.node(cast_node.inputs[0].node);
        // a constant, or a weight streamed to the GPU (the gather then reads the stored float16 table)
        if !source.op_is::<Const>() && !source.op_is::<kiln_ops::external_weight::ExternalWeight>() {
            continue;
        }
        let mut patch = TypedModelPatch::default();
        let data = patch.tap_model(model, cast_node.inputs[0])?;
        let indices = patch.tap_model(model, gather.inputs[1])?;
        let rows = patch.wire_node(format!("{}.kiln_rows", gather.name), gather.op.clone(), &[data, indices])?;
        let out = patch.wire_node(format!("{}.kiln_cast", gather.name), cast_node.op.clone(), &rows)?;
        patch.shunt_outside(model, id.into(), out[0])?;
        log.push(format!("`{}` gathers from `{}` before casting", gather.name, source.name));
        patch.apply(model)?;
    }
    if !log.is_empty() {
        model.compact()?;
    }
    Ok(log)
}
