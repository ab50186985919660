//! The GPU lowering's norm fusion: residual Add + RMSNorm (+ the gamma Mul) become one kiln [`NormOp`] — one
//! dispatch that reads the two residual operands, sums, normalises and scales; the residual sum itself stays an
//! Add for its other consumers (the next residual). Recognised on the decluttered typed model:
//!
//! - tract's RmsNorm (what it makes of ONNX RMSNormalization and of dynamo's `Pow/ReduceMean/Add/Rsqrt/Mul`);
//! - the decomposition optimum emits, as tract's declutter leaves it: `x · 1/sqrt(MeanOfSquares(x) + eps)` (the
//!   reciprocal as `Div(1, ·)`, `Recip` or `Rsqrt`, or `x / sqrt(..)`),
//!
//! over the last axis, in f32, followed (when it is the only consumer) by a `Mul` with a per-channel constant
//! (gamma), and with `x = a + b` of two same-shaped tensors folded in as the norm's skip.

use kiln_ops::skip_norm::NormOp;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::element_wise::ElementWiseOp;
use tract_onnx::tract_core::ops::nn::{Reduce, Reducer, RmsNorm};

fn binop(node: &TypedNode) -> Option<String> {
    node.op_as::<TypedBinOp>().map(|b| b.0.name().to_string())
}

fn unop(node: &TypedNode) -> Option<String> {
    node.op_as::<ElementWiseOp>().map(|e| e.0.name().to_string())
}

/// The only consumer of an outlet (none when it has several or is a model output).
fn sole(model: &TypedModel, o: OutletId) -> Option<usize> {
    let succ = &model.node(o.node).outputs[o.slot].successors;
    (succ.len() == 1 && !model.outputs.contains(&o)).then(|| succ[0].node)
}

fn konst(model: &TypedModel, o: OutletId) -> Option<Arc<Tensor>> {
    model.outlet_fact(o).ok()?.konst.clone()
}

fn scalar(model: &TypedModel, o: OutletId) -> Option<f32> {
    let k = konst(model, o)?;
    (k.len() == 1 && k.datum_type() == DatumType::F32).then(|| k.cast_to_scalar::<f32>().ok()).flatten()
}

/// The other operand of a binary node, given one of them.
fn other(node: &TypedNode, o: OutletId) -> Option<OutletId> {
    match node.inputs.as_slice() {
        [a, b] if *a == o => Some(*b),
        [a, b] if *b == o => Some(*a),
        _ => None,
    }
}

/// An RMS norm ending at node `id`: (x, eps, the outlet of x·inv).
fn rms_at(model: &TypedModel, id: usize) -> Option<(OutletId, f32, OutletId)> {
    let node = model.node(id);
    let last = node.outputs.first()?.fact.rank().checked_sub(1)?;
    if let Some(r) = node.op_as::<RmsNorm>() {
        let eps = r.eps.cast_to_scalar::<f32>().ok()?;
        return (r.axis == last).then_some((node.inputs[0], eps, OutletId::new(id, 0)));
    }
    // x · inv or x / sqrt(..), with inv = 1 / sqrt(ms + eps) | recip(sqrt(..)) | rsqrt(ms + eps)
    let op = binop(node)?;
    let (x, den_or_inv) = match op.as_str() {
        "Mul" | "Div" => (node.inputs[0], node.inputs[1]),
        _ => return None,
    };
    let candidates: Vec<(OutletId, OutletId)> =
        if op == "Mul" { vec![(x, den_or_inv), (den_or_inv, x)] } else { vec![(x, den_or_inv)] };
    for (x, t) in candidates {
        let tn = model.node(t.node);
        // the path from x's norm: find ms + eps under sqrt / rsqrt
        let sum = if op == "Div" {
            (unop(tn).as_deref() == Some("Sqrt")).then(|| tn.inputs[0])
        } else {
            match (unop(tn).as_deref(), binop(tn).as_deref()) {
                (Some("Rsqrt"), _) => Some(tn.inputs[0]),
                (Some("Recip"), _) => {
                    let s = model.node(tn.inputs[0].node);
                    (unop(s).as_deref() == Some("Sqrt") && sole(model, tn.inputs[0]) == Some(t.node))
                        .then(|| s.inputs[0])
                }
                (_, Some("Div")) if scalar(model, tn.inputs[0]) == Some(1.0) => {
                    let s = model.node(tn.inputs[1].node);
                    (unop(s).as_deref() == Some("Sqrt") && sole(model, tn.inputs[1]) == Some(t.node))
                        .then(|| s.inputs[0])
                }
                _ => None,
            }
        };
        let Some(sum) = sum else { continue };
        if sole(model, t) != Some(id) {
            continue;
        }
        let add = model.node(sum.node);
        if binop(add).as_deref() != Some("Add") || add.outputs[0].successors.len() != 1 {
            continue;
        }
        let (ms, eps) = match (scalar(model, add.inputs[1]), scalar(model, add.inputs[0])) {
            (Some(e), _) => (add.inputs[0], e),
            (None, Some(e)) => (add.inputs[1], e),
            _ => continue,
        };
        let red = model.node(ms.node);
        let Some(r) = red.op_as::<Reduce>() else { continue };
        if r.reducer != Reducer::MeanOfSquares
            || r.axes.as_slice() != [last]
            || red.inputs[0] != x
            || red.outputs[0].successors.len() != 1
        {
            continue;
        }
        return Some((x, eps, OutletId::new(id, 0)));
    }
    None
}

/// Fuses every residual Add + RMSNorm (+ gamma) of `model` into a [`NormOp`]; returns how many norms it fused.
pub fn fuse_residual_rms_norm(model: &mut TypedModel) -> TractResult<usize> {
    let mut done = 0;
    for id in model.eval_order()? {
        // the node may have been rewired by an earlier patch
        if id >= model.nodes().len() {
            continue;
        }
        let Some((x, eps, normed)) = rms_at(model, id) else { continue };
        let xf = model.outlet_fact(x)?.clone();
        if xf.datum_type != DatumType::F32 || !eps.is_finite() || eps < 0.0 {
            continue;
        }
        let Some(d) = xf.shape.last().and_then(|d| d.to_usize().ok()) else { continue };
        // gamma: a Mul by a per-channel constant, the norm's only consumer
        let mut out = normed;
        let mut gamma = None;
        if let Some(m) = sole(model, normed) {
            let mn = model.node(m);
            if binop(mn).as_deref() == Some("Mul") {
                if let Some(g) = other(mn, normed) {
                    let gk = konst(model, g);
                    let per_channel = gk.as_ref().is_some_and(|k| {
                        k.datum_type() == DatumType::F32
                            && k.len() == d
                            && k.shape().last() == Some(&d)
                            && k.rank() <= xf.rank()
                    });
                    if per_channel {
                        gamma = Some(g);
                        out = OutletId::new(m, 0);
                    }
                }
            }
        }
        // the residual: x = a + b, same shapes
        let xn = model.node(x.node);
        let skip = (binop(xn).as_deref() == Some("Add")
            && xn.inputs.len() == 2
            && xn
                .inputs
                .iter()
                .all(|i| model.outlet_fact(*i).is_ok_and(|f| f.shape == xf.shape && f.datum_type == DatumType::F32)))
        .then(|| (xn.inputs[0], xn.inputs[1]));
        let op = NormOp {
            rms: true,
            eps,
            has_skip: skip.is_some(),
            has_bias: false,
            has_gamma: gamma.is_some(),
            has_beta: false,
        };
        let name = model.node(id).name.clone();
        let mut patch = TypedModelPatch::new(format!("fuse residual rms norm at {name}"));
        let mut ins = tvec![];
        match skip {
            Some((a, b)) => {
                ins.push(patch.tap_model(model, a)?);
                ins.push(patch.tap_model(model, b)?);
            }
            None => ins.push(patch.tap_model(model, x)?),
        }
        if let Some(g) = gamma {
            ins.push(patch.tap_model(model, g)?);
        }
        let y = patch.wire_node(format!("{name}.fused_norm"), op, &ins)?[0];
        patch.shunt_outside(model, out, y)?;
        patch.apply(model)?;
        done += 1;
    }
    Ok(done)
}
