//! The GPU lowering's RoPE fusion: the rotate_half pattern optimum and dynamo (eager) emit for llama-style models,
//!
//! ```text
//! x·cos + Concat(−x[.., h..2h], x[.., ..h])·sin      cos = Cos(Concat(f, f)), sin = Sin(Concat(f, f))
//! ```
//!
//! (x `[batch, heads, seq, 2h]`, the tables broadcast over the heads, f `[batch, (1,) seq, h]` the angles), becomes
//! one kiln [`RotaryOp`] (NeoX halves, caches `[batch, seq, h]` = Cos(f), Sin(f), made once per f and shared by
//! every layer): one dispatch instead of two slices, a negation, a concatenation and the products. Tables whose two
//! halves are not the same angles (`Concat(f, f)` of one f) are left alone.

use std::collections::HashMap;

use kiln_ops::rotary::{RotaryConfig, RotaryOp};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::array::{Slice, TypedConcat};
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::element_wise::ElementWiseOp;
use tract_onnx::tract_core::ops::math;

fn binop(node: &TypedNode) -> Option<String> {
    node.op_as::<TypedBinOp>().map(|b| b.0.name().to_string())
}

fn unop(node: &TypedNode) -> Option<String> {
    node.op_as::<ElementWiseOp>().map(|e| e.0.name().to_string())
}

/// Skips AddAxis nodes upstream.
fn before_add_axes(model: &TypedModel, mut o: OutletId) -> OutletId {
    while let Some(AxisOp::Add(_)) = model.node(o.node).op_as::<AxisOp>() {
        o = model.node(o.node).inputs[0];
    }
    o
}

/// `(x, f)` when `t` is `Concat(last)[Neg(Slice(x, h..2h)), Slice(x, 0..h)]` and the table is `Cos|Sin(Concat(f, f))`.
fn rotated_half(model: &TypedModel, t: OutletId) -> Option<OutletId> {
    let cat = model.node(t.node);
    let c = cat.op_as::<TypedConcat>()?;
    let fact = model.outlet_fact(t).ok()?;
    let last = fact.rank().checked_sub(1)?;
    if c.axis != last || cat.inputs.len() != 2 {
        return None;
    }
    let d = fact.shape[last].to_usize().ok()?;
    if d % 2 != 0 {
        return None;
    }
    let h = d / 2;
    let neg = model.node(cat.inputs[0].node);
    if unop(neg).as_deref() != Some("Neg") {
        return None;
    }
    let slice_of = |o: OutletId, a: usize, b: usize| -> Option<OutletId> {
        let n = model.node(o.node);
        let s = n.op_as::<Slice>()?;
        (s.axis == last && s.start.to_usize().ok()? == a && s.end.to_usize().ok()? == b).then_some(n.inputs[0])
    };
    let x1 = slice_of(neg.inputs[0], h, d)?;
    let x0 = slice_of(cat.inputs[1], 0, h)?;
    (x0 == x1).then_some(x0)
}

/// The angles f of a `Cos` / `Sin` (named `which`) table `Concat(last)[f, f]`, through AddAxis nodes.
fn table_angles(model: &TypedModel, t: OutletId, which: &str) -> Option<OutletId> {
    let n = model.node(before_add_axes(model, t).node);
    if unop(n).as_deref() != Some(which) {
        return None;
    }
    let cat = model.node(n.inputs[0].node);
    let c = cat.op_as::<TypedConcat>()?;
    let rank = model.outlet_fact(n.inputs[0]).ok()?.rank();
    (c.axis + 1 == rank && cat.inputs.len() == 2 && cat.inputs[0] == cat.inputs[1]).then_some(cat.inputs[0])
}

/// Where a RoPE's half-angle caches come from.
#[derive(Clone, Debug, PartialEq)]
enum Angles {
    /// `Cos(f)`, `Sin(f)` of the angles f `[b, (1,) s, h]`.
    Angles(OutletId),
    /// Rows of constant tables `[positions, 2h]` gathered by position ids `[b, s]` (each table's two halves equal):
    /// the caches are the same rows of the tables' first halves.
    Gathered { cos: Arc<Tensor>, sin: Arc<Tensor>, ids: OutletId },
}

/// `(table, ids)` when `t` (through AddAxis nodes) is `Gather(axis 0)` of a constant f32 table `[n, 2h]` whose two
/// halves are equal, by ids `[b, s]`.
fn gathered_table(model: &TypedModel, t: OutletId) -> Option<(Arc<Tensor>, OutletId)> {
    use tract_onnx::tract_core::ops::array::Gather;
    use tract_onnx::tract_core::ops::konst::Const;
    let n = model.node(before_add_axes(model, t).node);
    let g = n.op_as::<Gather>()?;
    let table = model.node(n.inputs[0].node).op_as::<Const>()?.val().clone();
    if g.axis != 0 || g.output_type.is_some() || table.rank() != 2 || table.datum_type() != DatumType::F32 {
        return None;
    }
    let d = table.shape()[1];
    if d % 2 != 0 || model.outlet_fact(n.inputs[1]).ok()?.rank() != 2 {
        return None;
    }
    let plain = table.try_as_plain_ram().ok()?;
    let v = plain.as_slice::<f32>().ok()?;
    let h = d / 2;
    let halves_equal = v.chunks(d).all(|row| row[..h].iter().zip(&row[h..]).all(|(a, b)| a.to_bits() == b.to_bits()));
    halves_equal.then_some((table, n.inputs[1]))
}

/// A rotate_half RoPE ending at Add node `id`: (x, where its angles come from).
fn rope_at(model: &TypedModel, id: usize) -> Option<(OutletId, Angles)> {
    let add = model.node(id);
    if binop(add).as_deref() != Some("Add") || add.inputs.len() != 2 {
        return None;
    }
    for (direct, rotated) in [(add.inputs[0], add.inputs[1]), (add.inputs[1], add.inputs[0])] {
        let (m1, m2) = (model.node(direct.node), model.node(rotated.node));
        if binop(m1).as_deref() != Some("Mul") || binop(m2).as_deref() != Some("Mul") {
            continue;
        }
        if m1.outputs[0].successors.len() != 1 || m2.outputs[0].successors.len() != 1 {
            continue;
        }
        for (r, sin) in [(m2.inputs[0], m2.inputs[1]), (m2.inputs[1], m2.inputs[0])] {
            let Some(x) = rotated_half(model, r) else { continue };
            let cos = if m1.inputs[0] == x {
                m1.inputs[1]
            } else if m1.inputs[1] == x {
                m1.inputs[0]
            } else {
                continue;
            };
            let xs = model.outlet_fact(x).ok()?.shape.to_tvec();
            if let (Some((ct, ci)), Some((st, si))) = (gathered_table(model, cos), gathered_table(model, sin)) {
                let one = 1.to_dim();
                let table_ok = |o: OutletId| {
                    model.outlet_fact(o).is_ok_and(|f| {
                        f.shape.to_tvec() == tvec![xs[0].clone(), one.clone(), xs[2].clone(), xs[3].clone()]
                    })
                };
                let f32s = model.outlet_fact(x).is_ok_and(|f| f.datum_type == DatumType::F32);
                if ci == si && ct.shape() == st.shape() && xs.len() == 4 && table_ok(cos) && table_ok(sin) && f32s {
                    return Some((x, Angles::Gathered { cos: ct, sin: st, ids: ci }));
                }
                continue;
            }
            let (Some(fc), Some(fs)) = (table_angles(model, cos, "Cos"), table_angles(model, sin, "Sin")) else {
                continue;
            };
            if fc != fs {
                continue;
            }
            // shapes: x [b, heads, s, 2h]; the tables [b, 1, s, 2h]; f [b, s, h] or [b, 1, s, h]
            let xs = model.outlet_fact(x).ok()?.shape.to_tvec();
            let one = 1.to_dim();
            let table_ok = |o: OutletId| {
                model
                    .outlet_fact(o)
                    .is_ok_and(|f| f.shape.to_tvec() == tvec![xs[0].clone(), one.clone(), xs[2].clone(), xs[3].clone()])
            };
            if xs.len() != 4 || !table_ok(cos) || !table_ok(sin) {
                continue;
            }
            let half = xs[3].clone() / 2;
            let fs_ = model.outlet_fact(fc).ok()?.shape.to_tvec();
            let f_ok = fs_ == tvec![xs[0].clone(), xs[2].clone(), half.clone()]
                || fs_ == tvec![xs[0].clone(), one.clone(), xs[2].clone(), half];
            let f32s = [x, fc].iter().all(|o| model.outlet_fact(*o).is_ok_and(|f| f.datum_type == DatumType::F32));
            if f_ok && f32s {
                return Some((x, Angles::Angles(fc)));
            }
        }
    }
    None
}

/// Fuses every rotate_half RoPE of `model` into a [`RotaryOp`]; returns how many it fused.
pub fn fuse_rotate_half_rope(model: &mut TypedModel) -> TractResult<usize> {
    let mut done = 0;
    // the half caches made so far, by the angles' outlet: (cos, sin) node names
    let mut caches: HashMap<OutletId, (String, String)> = HashMap::new();
    for id in model.eval_order()? {
        let Some((x, angles)) = rope_at(model, id) else { continue };
        let name = model.node(id).name.clone();
        let mut patch = TypedModelPatch::new(format!("fuse rotate_half rope at {name}"));
        let xt = patch.tap_model(model, x)?;
        let key = match &angles {
            Angles::Angles(f) => *f,
            Angles::Gathered { ids, .. } => *ids,
        };
        let cached =
            caches.get(&key).and_then(|(c, s)| Some((model.node_by_name(c).ok()?, model.node_by_name(s).ok()?)));
        // gathered tables: the rotation reads its rows by position itself (no gather nodes)
        let positions = match &angles {
            Angles::Gathered { ids, .. } => {
                let f = model.outlet_fact(*ids)?;
                (f.rank() == 2 && matches!(f.datum_type, DatumType::I64 | DatumType::I32)).then_some(*ids)
            }
            Angles::Angles(_) => None,
        };
        let (cos, sin) = match (cached, &angles) {
            (Some((c, s)), _) => {
                (patch.tap_model(model, OutletId::new(c.id, 0))?, patch.tap_model(model, OutletId::new(s.id, 0))?)
            }
            (None, Angles::Gathered { cos, sin, ids }) => {
                // gathered_table checked: rank-2 tables with an even last axis
                let base = model.node(ids.node).name.clone();
                let h = cos.shape()[1] / 2;
                let it = patch.tap_model(model, *ids)?;
                let mut halves = vec![];
                for (which, t) in [("cos", cos), ("sin", sin)] {
                    let k = patch.add_const(format!("{base}.rope_{which}_table"), t.slice(1, 0, h)?)?;
                    if positions.is_some() {
                        halves.push(k);
                        continue;
                    }
                    let g = tract_onnx::tract_core::ops::array::Gather { axis: 0, output_type: None };
                    halves.push(patch.wire_node(format!("{base}.rope_{which}_half"), g, &[k, it])?[0]);
                }
                let kind = if positions.is_some() { "table" } else { "half" };
                caches.insert(key, (format!("{base}.rope_cos_{kind}"), format!("{base}.rope_sin_{kind}")));
                (halves[0], halves[1])
            }
            (None, Angles::Angles(f)) => {
                let base = model.node(f.node).name.clone();
                let mut ft = patch.tap_model(model, *f)?;
                if patch.outlet_fact(ft)?.rank() == 4 {
                    ft = patch.wire_node(format!("{base}.rope_angles"), AxisOp::Rm(1), &[ft])?[0];
                }
                let (cn, sn) = (format!("{base}.rope_cos_half"), format!("{base}.rope_sin_half"));
                let c = patch.wire_node(&cn, math::cos(), &[ft])?[0];
                let s = patch.wire_node(&sn, math::sin(), &[ft])?[0];
                caches.insert(key, (cn, sn));
                (c, s)
            }
        };
        let config = RotaryConfig {
            interleaved: false,
            num_heads: 0,
            rotary_dim: 0,
            microsoft: false,
            has_positions: positions.is_some(),
            seqlens: false,
        };
        let mut inputs = vec![xt, cos, sin];
        if let Some(p) = positions {
            inputs.push(patch.tap_model(model, p)?);
        }
        let y = patch.wire_node(format!("{name}.rope"), RotaryOp { config }, &inputs)?[0];
        patch.shunt_outside(model, OutletId::new(id, 0), y)?;
        patch.apply(model)?;
        done += 1;
    }
    Ok(done)
}
