//! Shape arithmetic as i64, for the GPU. tract computes values derived from symbolic dims (the optimum exports'
//! `arange(past + seq)` and `batch · total` offsets of the attention-mask gather, the dynamo exports' causal-mask
//! comparisons) as TDim tensors, which only the CPU can hold: each such chain was a CPU island costing an upload
//! per run. This pass rewrites them to i64 before lowering: a TDim constant becomes an i64 constant (concrete
//! values) or a [`DimValues`] (values with symbols, evaluated per run), a Range over TDim constants a [`DimRange`],
//! Casts between TDim and i64 disappear, and every other op is wired again on the i64 values. If any op refuses
//! the i64 inputs, the model is left as it was.

use kiln_ops::dim_values::{DimRange, DimValues};
use std::collections::HashMap;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::array::Range;
use tract_onnx::tract_core::ops::cast::Cast;
use tract_onnx::tract_core::ops::konst::Const;
use tract_onnx::tract_core::ops::source::TypedSource;
use tract_onnx::tract_hir::internal::*;

fn is_tdim(model: &TypedModel, o: OutletId) -> bool {
    model.outlet_fact(o).is_ok_and(|f| f.datum_type == DatumType::TDim)
}

/// The TDim constant of `outlet`, if it is one.
fn tdim_const(model: &TypedModel, o: OutletId) -> Option<TDim> {
    let c = model.node(o.node).op_as::<Const>()?;
    let t = c.val();
    if t.datum_type() != DatumType::TDim || t.len() != 1 {
        return None;
    }
    t.try_as_plain_ram().ok()?.as_slice::<TDim>().ok()?.first().cloned()
}

/// Rewrites the model's TDim computations to i64; returns whether anything changed.
pub fn rewrite(model: &mut TypedModel) -> TractResult<bool> {
    let computes_dims = model.nodes().iter().any(|n| {
        let tdim_out = n.outputs.iter().any(|o| o.fact.datum_type == DatumType::TDim);
        // a Range over TDim constants that gives i64 (its casts folded into the constants) is a range of dims too
        let dim_range = n.op_is::<Range>() && n.inputs.iter().all(|i| tdim_const(model, *i).is_some());
        (!n.op_is::<Const>() && !n.op_is::<TypedSource>() && tdim_out) || dim_range
    });
    if !computes_dims {
        return Ok(false);
    }
    if model.output_outlets()?.iter().any(|o| is_tdim(model, *o)) {
        return Ok(false);
    }
    match rebuild(model) {
        Ok(m) => {
            *model = m;
            Ok(true)
        }
        // an op that only takes TDim: keep the CPU island
        Err(_) => Ok(false),
    }
}

fn rebuild(src: &TypedModel) -> TractResult<TypedModel> {
    let mut target = TypedModel { symbols: src.symbols.clone(), ..TypedModel::default() };
    let mut map: HashMap<OutletId, OutletId> = HashMap::new();
    // every input, in order, read or not (one only its shape names is outside the evaluation order)
    let mut order: Vec<usize> = src.input_outlets()?.iter().map(|o| o.node).collect();
    let sources: std::collections::HashSet<usize> = order.iter().copied().collect();
    order.extend(src.eval_order()?.into_iter().filter(|id| !sources.contains(id)));
    for id in order {
        let node = src.node(id);
        let inputs: TVec<OutletId> = node
            .inputs
            .iter()
            .map(|i| map.get(i).copied().context("input not wired yet"))
            .collect::<TractResult<_>>()?;
        let outs: TVec<OutletId> = if node.op_is::<TypedSource>() {
            tvec!(target.add_source(&node.name, node.outputs[0].fact.clone())?)
        } else if let Some(c) = node.op_as::<Const>().filter(|c| c.val().datum_type() == DatumType::TDim) {
            let dims = DimValues::from_tensor(c.val())?;
            match dims.values.iter().map(|d| d.to_i64().ok()).collect::<Option<Vec<i64>>>() {
                Some(v) => tvec!(target.add_const(&node.name, Tensor::from_shape(&dims.shape, &v)?)?),
                None => target.wire_node(&node.name, dims, &[])?,
            }
        } else if node.op_is::<Range>() && node.inputs.iter().all(|i| tdim_const(src, *i).is_some()) {
            let [start, _limit, step] = [0, 1, 2].map(|k| tdim_const(src, node.inputs[k]).unwrap_or_default());
            let len = node.outputs[0].fact.shape[0].clone();
            target.wire_node(&node.name, DimRange { start, step, len }, &[])?
        } else if node.op_is::<Cast>()
            && [DatumType::TDim, DatumType::I64].contains(&node.outputs[0].fact.datum_type)
            && target.outlet_fact(inputs[0])?.datum_type == DatumType::I64
            && [DatumType::TDim, DatumType::I64].contains(&src.outlet_fact(node.inputs[0])?.datum_type)
        {
            // TDim ↔ i64: the values are i64 already
            tvec!(inputs[0])
        } else if let Some(guarded) = node.op_as::<crate::symbolic::NoDeclutter>() {
            // the guard only matters to tract's declutter of TDim operands, which are i64 now
            target.wire_node(&node.name, guarded.0.clone(), &inputs)?
        } else {
            target.wire_node(&node.name, node.op.clone(), &inputs)?
        };
        for (slot, o) in outs.iter().enumerate() {
            map.insert(OutletId::new(id, slot), *o);
        }
    }
    let wired = |o: &OutletId| map.get(o).copied().with_context(|| format!("{o:?} not wired"));
    target.inputs = src.input_outlets()?.iter().map(wired).collect::<TractResult<_>>()?;
    target.outputs = src.output_outlets()?.iter().map(wired).collect::<TractResult<_>>()?;
    target.properties.clone_from(&src.properties);
    for o in target.outputs.iter().chain(target.inputs.iter()) {
        ensure!(!is_tdim(&target, *o), "a TDim model input or output");
    }
    // facts must agree with the source's except TDim → i64
    for (old, new) in map.iter() {
        let (a, b) = (src.outlet_fact(*old)?, target.outlet_fact(*new)?);
        let same_dt =
            a.datum_type == b.datum_type || (a.datum_type == DatumType::TDim && b.datum_type == DatumType::I64);
        ensure!(same_dt && a.shape == b.shape, "rewired {old:?}: {a:?} became {b:?}");
    }
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `arange(s)` over a symbolic constant, unsqueezed and added to a TDim constant, cast to i64: the pass leaves
    /// no TDim value, and the result is the same for several symbol values.
    #[test]
    fn optimum_style_index_chain() -> TractResult<()> {
        let mut m = TypedModel::default();
        let s = m.symbols.sym("s");
        let x = m.add_source("x", f32::fact([TDim::from(s.clone())]))?;
        let zero = m.add_const("zero", tensor0(TDim::from(0)))?;
        let len = m.add_const("len", tensor0(TDim::from(s.clone())))?;
        let one = m.add_const("one", tensor0(TDim::from(1)))?;
        let r = m.wire_node("range", Range::new(TDim::from(s.clone())), &[zero, len, one])?[0];
        let r = m.wire_node("rcast", tract_onnx::tract_core::ops::cast::cast(DatumType::TDim), &[r])?[0];
        let off = m.add_const("off", tensor1(&[TDim::from(s.clone()) * 2]))?;
        let sum = m.wire_node("add", tract_onnx::tract_core::ops::math::add(), &[r, off])?[0];
        let i = m.wire_node("cast", tract_onnx::tract_core::ops::cast::cast(DatumType::I64), &[sum])?[0];
        let xi = m.wire_node("xcast", tract_onnx::tract_core::ops::cast::cast(DatumType::I64), &[x])?[0];
        let out = m.wire_node("out", tract_onnx::tract_core::ops::math::add(), &[i, xi])?[0];
        m.select_output_outlets(&[out])?;
        let mut rewritten = m.clone();
        assert!(rewrite(&mut rewritten)?);
        assert!(rewritten.nodes().iter().all(|n| n.outputs.iter().all(|o| o.fact.datum_type != DatumType::TDim)));
        for n in [1usize, 4, 7] {
            let x = Tensor::from_shape(&[n], &vec![1f32; n])?;
            let want = m.clone().into_runnable()?.run(tvec!(x.clone().into_tvalue()))?;
            let got = rewritten.clone().into_runnable()?.run(tvec!(x.into_tvalue()))?;
            let (want, got) = (want[0].cast_to::<i64>()?.into_owned(), got[0].clone().into_tensor());
            assert_eq!(
                want.try_as_plain_ram()?.as_slice::<i64>()?,
                got.try_as_plain_ram()?.as_slice::<i64>()?,
                "s = {n}"
            );
        }
        Ok(())
    }
}
