//! Elementwise fusion on the lowered model: each maximal tree of GPU elementwise nodes (unary, binary, Where on
//! 4-byte words: f32, bools, i64 / i32 as i32) whose inner results feed only the tree becomes one [`GpuOp`] with a
//! [`Kernel::Fused`] program, so the chain runs as one dispatch and its intermediates never reach memory. The tree
//! also takes in, without a dispatch of their own:
//! - kiln's DimRange / DimValues (one value) seen through views, as leaves computed per element (they stay for other
//!   readers: a leaf costs nothing to repeat);
//! - a Gather of an input with one non-unit axis at indices the tree computes, followed by views that only add or
//!   remove leading unit axes, with the unary steps (a Cast) and views between the gathered input and the Gather
//!   (an attention mask's padding looked up per key: optimum's mask builder is one dispatch, not ten).
//!
//! The replaced ops stay as the node's CPU reference ([`FusedChain`]). The placement report is unchanged (it
//! describes the source model's nodes).

use std::collections::{HashMap, HashSet};

use kiln_ops::external_weight::{ExternalWeight, Layout};
use kiln_wgsl::fused::{
    is_word, FusedChain, FusedProgram, Indexed, Leaf, Src, Step, MAX_FUSED_INPUTS, MAX_FUSED_LEAVES, MAX_FUSED_STEPS,
};
use kiln_wgsl::ops::GpuOp;
use kiln_wgsl::qmatmul::{QEpilogue, QNorm};
use kiln_wgsl::Kernel;
use tract_onnx::prelude::*;

use crate::error::{Error, ErrorKind, Result};

fn tract_err(what: &str) -> impl Fn(TractError) -> Error + '_ {
    move |e| Error::from_tract(ErrorKind::InvalidModel, what, &e)
}

fn float_like(dt: DatumType) -> bool {
    matches!(dt, DatumType::F32 | DatumType::Bool)
}

fn int_like(dt: DatumType) -> bool {
    matches!(dt, DatumType::I64 | DatumType::I32)
}

/// The step a node computes, when it is a fusable GPU elementwise node (operands filled in later).
fn step_of(model: &TypedModel, node: &TypedNode) -> Option<Step> {
    let op = node.op_as::<GpuOp>()?;
    if node.outputs.len() != 1 || !is_word(node.outputs[0].fact.datum_type) {
        return None;
    }
    let mut dts = vec![];
    for i in &node.inputs {
        dts.push(model.outlet_fact(*i).ok()?.datum_type);
    }
    if !dts.iter().all(|d| is_word(*d)) {
        return None;
    }
    let out = node.outputs[0].fact.datum_type;
    let x = Src::Input(0);
    match (&op.kernel, dts.as_slice()) {
        // a cast between the word representations moves or converts the word
        (Kernel::Unary(u @ kiln_wgsl::UnaryOp::Cast { .. }), [_]) => Some(Step::Unary(*u, x)),
        (Kernel::Unary(u), [a]) if float_like(*a) && float_like(out) => Some(Step::Unary(*u, x)),
        (Kernel::Binary(b), [a, c]) if float_like(*a) && float_like(*c) => Some(Step::Binary(*b, x, x)),
        (Kernel::Binary(b), [a, c]) if int_like(*a) && a == c && b.int_expr().is_some() => {
            Some(Step::BinaryInt(*b, x, x))
        }
        (Kernel::Where, [DatumType::Bool, a, b]) if a == b => Some(Step::Where(x, x, x)),
        _ => None,
    }
}

fn gpu_op(model: &TypedModel, n: usize) -> Option<&GpuOp> {
    model.node(n).op_as::<GpuOp>()
}

fn is_view(model: &TypedModel, n: usize) -> bool {
    gpu_op(model, n).is_some_and(|g| matches!(g.kernel, Kernel::View(_)))
}

/// The leaf behind `o`, read in `o`'s shape: a value affine in the element's flat offset — kiln's DimRange, a
/// DimValues of one value, integer Add / Sub of such values that follow the output's offsets (or are constants),
/// Mul by a constant, through views (which keep the flat offsets).
fn leaf_of(model: &TypedModel, o: OutletId) -> Option<Leaf> {
    let node = model.node(o.node);
    let fact = model.outlet_fact(o).ok()?;
    let shape: Vec<TDim> = fact.shape.iter().cloned().collect();
    let zero = TDim::Val(0);
    let (start, step) = match &gpu_op(model, o.node)?.kernel {
        Kernel::View(_) => {
            let l = leaf_of(model, *node.inputs.first()?)?;
            (l.start, l.step)
        }
        Kernel::DimRange { start, step, .. } => (start.clone(), step.clone()),
        Kernel::DimValues { values, .. } if values.len() == 1 => (values[0].clone(), zero),
        Kernel::Binary(b @ (kiln_wgsl::BinaryOp::Add | kiln_wgsl::BinaryOp::Sub | kiln_wgsl::BinaryOp::Mul))
            if int_like(fact.datum_type) && node.inputs.len() == 2 =>
        {
            let (x, y) = (leaf_of(model, node.inputs[0])?, leaf_of(model, node.inputs[1])?);
            let konst = |l: &Leaf| l.step == TDim::Val(0);
            // a varying operand must walk the output's offsets (no broadcast of its own)
            if !(konst(&x) || x.shape == shape) || !(konst(&y) || y.shape == shape) {
                return None;
            }
            match b {
                kiln_wgsl::BinaryOp::Add => (x.start + y.start, x.step + y.step),
                kiln_wgsl::BinaryOp::Sub => (x.start - y.start, x.step - y.step),
                _ if konst(&x) => (y.start * x.start.clone(), y.step * x.start),
                _ if konst(&y) => (x.start * y.start.clone(), x.step * y.start),
                _ => return None,
            }
        }
        _ => return None,
    };
    Some(Leaf { start, step, shape })
}

/// The leaf of one index component of a GatherND (`o`: an input of the Concat that builds its index tuples, last
/// dim 1), read in the GatherND's frame (the tuples' shape without the last axis), and the Expand it was seen
/// through, if any.
fn index_component(model: &TypedModel, o: OutletId) -> Option<(Leaf, Option<usize>)> {
    let expand = gpu_op(model, o.node).is_some_and(|g| matches!(g.kernel, Kernel::Broadcast { .. }));
    let (leaf, seen) = if expand {
        // an Expand broadcasts: the leaf read with broadcast strides gives its values
        (leaf_of(model, *model.node(o.node).inputs.first()?)?, Some(o.node))
    } else {
        (leaf_of(model, o)?, None)
    };
    let mut shape = leaf.shape.clone();
    if shape.pop()? != TDim::Val(1) {
        return None;
    }
    Some((Leaf { shape, ..leaf }, seen))
}

/// A GatherND the fusion reads as a strided input: batch_dims 0, word data of rank k, index tuples a Concat along
/// their last axis of k leaves (ranges of the run's dims, through views and Expands). Returns the components, the
/// Concat, Expands and views after it that it takes in, and the consumer.
fn fusable_gather_nd(
    model: &TypedModel,
    outputs: &HashSet<OutletId>,
    g: usize,
) -> Option<(Vec<Leaf>, Vec<usize>, usize)> {
    let node = model.node(g);
    let Kernel::GatherNd { batch_dims: 0 } = gpu_op(model, g)?.kernel else { return None };
    let data = model.outlet_fact(*node.inputs.first()?).ok()?;
    let idx = *node.inputs.get(1)?;
    let k = data.rank();
    if !is_word(data.datum_type) || k == 0 || !is_word(node.outputs.first()?.fact.datum_type) {
        return None;
    }
    let cat = model.node(idx.node);
    let last = model.outlet_fact(idx).ok()?.rank().checked_sub(1)?;
    match gpu_op(model, idx.node)?.kernel {
        Kernel::Concat { axis, inputs } if axis == last && inputs == k && cat.inputs.len() == k => {}
        _ => return None,
    }
    let mut comps = vec![];
    let mut taken = vec![idx.node];
    for i in &cat.inputs {
        let (leaf, expand) = index_component(model, *i)?;
        comps.push(leaf);
        taken.extend(expand);
    }
    let own: Vec<TDim> = node.outputs[0].fact.shape.iter().cloned().collect();
    let (consumer, views) = reader_through_views(model, outputs, g, &own)?;
    taken.extend(views);
    Some((comps, taken, consumer))
}

/// The single reader of `n`'s output (not a model output), with the input slot it reads.
fn sole_reader(model: &TypedModel, outputs: &HashSet<OutletId>, n: usize) -> Option<(usize, usize)> {
    let node = model.node(n);
    let succ = &node.outputs.first()?.successors;
    if node.outputs.len() != 1 || succ.len() != 1 || outputs.contains(&OutletId::new(n, 0)) {
        return None;
    }
    Some((succ[0].node, succ[0].slot))
}

fn strip_leading_ones(s: &[TDim]) -> &[TDim] {
    let k = s.iter().take_while(|d| **d == TDim::Val(1)).count();
    &s[k..]
}

/// The elementwise node a gather's value reaches through views it alone reads (`.0`), the views (`.1`), and
/// whether the node sees the value in `own` shape (leading unit axes aside): the frame it is computed in.
fn reader_through_views(
    model: &TypedModel,
    outputs: &HashSet<OutletId>,
    g: usize,
    own: &[TDim],
) -> Option<(usize, Vec<usize>)> {
    let mut views = vec![];
    let mut at = g;
    let consumer = loop {
        let (next, _) = sole_reader(model, outputs, at)?;
        if !is_view(model, next) {
            break next;
        }
        views.push(next);
        at = next;
    };
    step_of(model, model.node(consumer))?;
    let seen: Vec<TDim> = model.node(at).outputs[0].fact.shape.iter().cloned().collect();
    (strip_leading_ones(&seen) == strip_leading_ones(own)).then_some((consumer, views))
}

/// A Gather the fusion can read at computed indices: word data with one non-unit axis (the gathered one), i32 / i64
/// indices. Returns the views after it (up to the consumer `.0`) when they only reshape it to the indices' frame.
fn fusable_gather(model: &TypedModel, outputs: &HashSet<OutletId>, g: usize) -> Option<(usize, Vec<usize>)> {
    let node = model.node(g);
    let Kernel::Gather { axis } = gpu_op(model, g)?.kernel else { return None };
    let (data, idx) = (model.outlet_fact(*node.inputs.first()?).ok()?, model.outlet_fact(*node.inputs.get(1)?).ok()?);
    if !is_word(data.datum_type) || !int_like(idx.datum_type) || !is_word(node.outputs.first()?.fact.datum_type) {
        return None;
    }
    if data.shape.iter().enumerate().any(|(a, d)| a != axis && *d != TDim::Val(1)) {
        return None;
    }
    // read per element of the indices' frame: the consumer must see the indices' shape
    let frame: Vec<TDim> = idx.shape.iter().cloned().collect();
    reader_through_views(model, outputs, g, &frame)
}

/// The unary nodes and views between a fusable Gather's data and the input it stands on (read in that input's
/// flat layout), nearest first, and that input. Only nodes that nothing else reads and no other fusion takes.
fn gather_data_chain(
    model: &TypedModel,
    outputs: &HashSet<OutletId>,
    fed: &HashSet<usize>,
    g: usize,
) -> (Vec<usize>, OutletId) {
    let mut chain = vec![];
    let mut o = model.node(g).inputs[0];
    loop {
        let n = o.node;
        if sole_reader(model, outputs, n).is_none() || fed.contains(&n) {
            break;
        }
        let take = is_view(model, n) || matches!(step_of(model, model.node(n)), Some(Step::Unary(..)));
        match model.node(n).inputs.first() {
            Some(i) if take => {
                chain.push(n);
                o = *i;
            }
            _ => break,
        }
    }
    (chain, o)
}

/// One group of the fusion: its sink, its member nodes (elementwise nodes and gathers, with the views and data
/// chains they take in), and the sinks of sibling groups joined with it (outputs of the same kernel).
struct Group {
    sink: usize,
    nodes: HashSet<usize>,
    siblings: Vec<usize>,
}

/// Joins groups whose sinks read one value X (none reads another's output, their outputs of one shape, every
/// reader of X among them, X no model output) into one group with an output per sink — a rotary's cos and sin of
/// the same angles in one dispatch. X's own group, when it has one, is computed inside the joined kernel.
fn join_siblings(model: &TypedModel, outputs: &HashSet<OutletId>, groups: &mut HashMap<usize, Group>) {
    let mut sinks: Vec<usize> = groups.keys().copied().collect();
    sinks.sort_unstable();
    let mut taken: HashSet<usize> = HashSet::new();
    for s in sinks {
        for &x in &model.node(s).inputs {
            let readers: Vec<usize> = model.outlet_successors(x).iter().map(|i| i.node).collect();
            let mut uniq = readers.clone();
            uniq.sort_unstable();
            uniq.dedup();
            if uniq.len() < 2 || uniq.len() > MAX_FUSED_INPUTS || outputs.contains(&x) {
                continue;
            }
            let shape = |n: usize| model.node(n).outputs.first().map(|o| o.fact.shape.clone());
            let ok = uniq.iter().all(|r| groups.contains_key(r) && !taken.contains(r) && shape(*r) == shape(uniq[0]))
                && !taken.contains(&x.node);
            // no sibling reads another's output
            // no sibling reads another's output, directly or through other nodes (one node would be a cycle)
            let reads_sibling = |r: &usize| uniq.iter().any(|o| o != r && depends_on(model, *r, *o));
            if !ok || uniq.iter().any(reads_sibling) {
                continue;
            }
            let mut joined = Group { sink: uniq[0], nodes: HashSet::new(), siblings: uniq[1..].to_vec() };
            for r in &uniq {
                if let Some(g) = groups.remove(r) {
                    joined.nodes.extend(g.nodes);
                }
                taken.insert(*r);
            }
            // X's group (one output only: its readers are the siblings) is computed inside
            if x.slot == 0 && model.node(x.node).outputs.len() == 1 {
                if let Some(g) = groups.remove(&x.node) {
                    joined.nodes.extend(g.nodes);
                    taken.insert(x.node);
                }
            }
            groups.insert(joined.sink, joined);
            break;
        }
    }
}

/// Fuses every group of two or more elementwise GPU nodes (leaves and gathers count); returns how many fused nodes
/// it made.
pub fn fuse_elementwise(model: &mut TypedModel) -> Result<usize> {
    let order = model.eval_order().map_err(tract_err("ordering the lowered model"))?;
    let outputs: HashSet<OutletId> =
        model.output_outlets().map_err(tract_err("model outputs"))?.iter().copied().collect();
    let fusable: HashSet<usize> = order.iter().copied().filter(|&n| step_of(model, model.node(n)).is_some()).collect();
    // where each fusable node or gather folds: its only reader, when that reader takes it
    let mut folds_into: HashMap<usize, usize> = HashMap::new();
    let mut gathers: HashMap<usize, Vec<usize>> = HashMap::new();
    for &n in &order {
        if let Some((consumer, views)) = fusable_gather(model, &outputs, n) {
            folds_into.insert(n, consumer);
            gathers.insert(n, views);
        } else if let Some((_, taken, consumer)) = fusable_gather_nd(model, &outputs, n) {
            folds_into.insert(n, consumer);
            gathers.insert(n, taken);
        }
    }
    // views that only add or remove leading unit axes between a node and its reader (a rank fix before a
    // broadcast): the value is the same at every element of the right-aligned frame
    let mut leading_views: HashMap<usize, Vec<usize>> = HashMap::new();
    for &n in &order {
        let Some((mut r, mut slot)) = fusable.contains(&n).then(|| sole_reader(model, &outputs, n)).flatten() else {
            continue;
        };
        let own: Vec<TDim> = model.node(n).outputs[0].fact.shape.iter().cloned().collect();
        let mut views = vec![];
        while is_view(model, r) {
            let seen: Vec<TDim> = model.node(r).outputs[0].fact.shape.iter().cloned().collect();
            match sole_reader(model, &outputs, r) {
                Some(next) if strip_leading_ones(&seen) == strip_leading_ones(&own) => {
                    views.push(r);
                    (r, slot) = next;
                }
                _ => break,
            }
        }
        if is_view(model, r) {
            continue;
        }
        // into another elementwise node, or as the indices of a gather that folds
        let is_gather = gpu_op(model, r).is_some_and(|g| matches!(g.kernel, Kernel::Gather { .. }));
        if fusable.contains(&r) || (slot == 1 && is_gather && views.is_empty() && gathers.contains_key(&r)) {
            folds_into.insert(n, r);
            if !views.is_empty() {
                leading_views.insert(n, views);
            }
        }
    }
    let fed: HashSet<usize> = folds_into.values().copied().collect();
    let root = |mut n: usize| {
        while let Some(r) = folds_into.get(&n) {
            n = *r;
        }
        n
    };
    let mut groups: HashMap<usize, Group> = HashMap::new();
    for &n in &order {
        let is_member = fusable.contains(&n) || gathers.contains_key(&n);
        if !is_member {
            continue;
        }
        let r = root(n);
        if !fusable.contains(&r) {
            // folds into a gather that does not fold: not a group of ours
            continue;
        }
        let g = groups.entry(r).or_insert_with(|| Group { sink: r, nodes: HashSet::new(), siblings: vec![] });
        g.nodes.insert(n);
        if let Some(views) = gathers.get(&n).or_else(|| leading_views.get(&n)) {
            g.nodes.extend(views.iter().copied());
        }
    }
    // the data chains of the gathers (unary steps and views read before the lookup)
    for g in groups.values_mut() {
        let gs: Vec<usize> = g.nodes.iter().copied().filter(|n| gathers.contains_key(n)).collect();
        for n in gs {
            let (chain, _) = gather_data_chain(model, &outputs, &fed, n);
            g.nodes.extend(chain);
        }
    }
    join_siblings(model, &outputs, &mut groups);
    // the nodes a group takes in: elementwise nodes, gathers and what they take in (index tuples, views)
    let taken_in: HashSet<usize> = fusable
        .iter()
        .copied()
        .chain(gathers.iter().flat_map(|(g, t)| std::iter::once(*g).chain(t.iter().copied())))
        .collect();
    let position: HashMap<usize, usize> = order.iter().enumerate().map(|(i, n)| (*n, i)).collect();
    let mut groups: Vec<Group> = groups.into_values().collect();
    groups.sort_by_key(|g| position[&g.sink]);
    let mut remap: HashMap<OutletId, OutletId> = HashMap::new();
    let mut fused = 0;
    for group in groups {
        // an affine value of the run's dims that every reader takes in as a leaf needs no node of its own
        let lone = group.siblings.is_empty();
        if lone
            && leaf_of(model, OutletId::new(group.sink, 0)).is_some()
            && read_as_leaf_only(model, &outputs, &taken_in, group.sink)
        {
            continue;
        }
        let Some((program, chain, externals)) = build(model, &outputs, &fed, &group) else { continue };
        // worth a node: two dispatches or more become one (a leaf or a gather's cast count)
        let work = group.nodes.iter().filter(|n| !is_view(model, **n)).count() + program.leaves.len();
        if work < 2 {
            continue;
        }
        let sink = group.sink;
        let mut patch = TypedModelPatch::default();
        let mut taps = tvec![];
        for e in &externals {
            let e = remap.get(e).copied().unwrap_or(*e);
            taps.push(patch.tap_model(model, e).map_err(tract_err("fusing elementwise nodes"))?);
        }
        let name = model.node(sink).name.clone();
        let op = GpuOp { kernel: Kernel::Fused(Box::new(program)), cpu: Box::new(chain) };
        let outs = patch.wire_node(name, op, &taps).map_err(tract_err("fusing elementwise nodes"))?;
        // the outputs: the sink's, then its siblings'
        let replaced: Vec<OutletId> =
            std::iter::once(sink).chain(group.siblings.iter().copied()).map(|n| OutletId::new(n, 0)).collect();
        for (r, o) in replaced.iter().zip(&outs) {
            patch.shunt_outside(model, *r, *o).map_err(tract_err("fusing elementwise nodes"))?;
        }
        let before = model.nodes().len();
        patch.apply(model).map_err(tract_err("fusing elementwise nodes"))?;
        // the patch appends the fused node; later groups reading the old sinks read it instead
        if model.nodes().len() > before {
            for (slot, r) in replaced.iter().enumerate() {
                remap.insert(*r, OutletId::new(model.nodes().len() - 1, slot));
            }
        }
        fused += 1;
    }
    if fused > 0 {
        model.compact().map_err(tract_err("compacting the fused model"))?;
    }
    Ok(fused)
}

/// A view of `x` (shape `from`) as `to` (the same elements in the same order).
fn reshape_op(from: &[TDim], to: &[TDim]) -> GpuOp {
    use tract_onnx::tract_core::ops::change_axes::AxisOp;
    GpuOp {
        kernel: Kernel::View(kiln_wgsl::View::Reshape { at: 0, from_len: from.len(), to: to.to_vec() }),
        cpu: Box::new(AxisOp::Reshape(0, from.iter().cloned().collect(), to.iter().cloned().collect())),
    }
}

fn product(dims: &[TDim]) -> TDim {
    dims.iter().fold(TDim::Val(1), |a, d| a * d.clone()).simplify()
}

/// An outer product written as an f32 MatMul with K = 1 and unit batch dims (transformers' rotary angles:
/// `inv_freq[:, None] @ positions[None, :]`, then a transpose and reshapes) becomes a broadcast Mul in the shape its
/// readers see: with the rotary's cos and sin (and the positions' Cast, moved after the reshape) it fuses into one
/// dispatch, where it was a Cast, a tiled matmul, a transpose and the cos / sin kernel. Exact: each element is the one
/// product the matmul would sum. Returns how many it rewrote. Runs before [`fuse_elementwise`].
pub fn outer_products_as_muls(model: &mut TypedModel) -> Result<usize> {
    const WHAT: &str = "rewriting an outer product as a Mul";
    let outputs: HashSet<OutletId> = model.output_outlets().map_err(tract_err(WHAT))?.iter().copied().collect();
    let one = TDim::Val(1);
    let mut found = vec![];
    for node in model.nodes() {
        let Some(Kernel::MatMul { transpose_a, transpose_b, transpose_c, .. }) =
            node.op_as::<GpuOp>().map(|g| &g.kernel)
        else {
            continue;
        };
        let (Some(a), Some(b)) = (node.inputs.first(), node.inputs.get(1)) else { continue };
        let (fa, fb) =
            (model.outlet_fact(*a).map_err(tract_err(WHAT))?, model.outlet_fact(*b).map_err(tract_err(WHAT))?);
        let r = fa.rank();
        let f32s = [fa.datum_type, fb.datum_type, node.outputs[0].fact.datum_type].iter().all(|d| *d == DatumType::F32);
        if !f32s || r < 2 || fb.rank() != r {
            continue;
        }
        let batch_ones = fa.shape.iter().take(r - 2).chain(fb.shape.iter().take(r - 2)).all(|d| *d == one);
        let (ma, ka) =
            if *transpose_a { (&fa.shape[r - 1], &fa.shape[r - 2]) } else { (&fa.shape[r - 2], &fa.shape[r - 1]) };
        let (kb, nb) =
            if *transpose_b { (&fb.shape[r - 1], &fb.shape[r - 2]) } else { (&fb.shape[r - 2], &fb.shape[r - 1]) };
        if !batch_ones || *ka != one || *kb != one {
            continue;
        }
        // the readers: transposes (while the product's two axes are whole) then views; `m_major`: the flat order
        let mut m_major = !*transpose_c;
        let mut at = OutletId::new(node.id, 0);
        let mut seen_view = false;
        let mut ok = true;
        while let Some((next, _)) = sole_reader(model, &outputs, at.node) {
            match &gpu_op(model, next).map(|g| &g.kernel) {
                Some(Kernel::MoveAxis { from, to }) if !seen_view => {
                    // the order of the non-unit axes after the move (this chain's shapes hold at most two)
                    let shape = &model.outlet_fact(at).map_err(tract_err(WHAT))?.shape;
                    let big: Vec<usize> = (0..shape.len()).filter(|i| shape[*i] != one).collect();
                    let mut perm: Vec<usize> = (0..shape.len()).collect();
                    let moved = perm.remove(*from);
                    perm.insert(*to, moved);
                    let after: Vec<usize> = perm.iter().copied().filter(|p| big.contains(p)).collect();
                    if big.len() > 2 {
                        ok = false;
                        break;
                    }
                    if big.len() == 2 && after != big {
                        m_major = !m_major;
                    }
                }
                Some(Kernel::View(_)) => seen_view = true,
                _ => break,
            }
            at = OutletId::new(next, 0);
        }
        if !ok {
            continue;
        }
        let x_shape: Vec<TDim> = model.outlet_fact(at).map_err(tract_err(WHAT))?.shape.iter().cloned().collect();
        let (outer_len, inner_len) = if m_major { (ma.clone(), nb.clone()) } else { (nb.clone(), ma.clone()) };
        let Some(k) = (0..=x_shape.len()).find(|k| {
            product(&x_shape[..*k]) == outer_len.clone().simplify()
                && product(&x_shape[*k..]) == inner_len.clone().simplify()
        }) else {
            continue;
        };
        let (outer, inner) = if m_major { (*a, *b) } else { (*b, *a) };
        let mut outer_shape = x_shape[..k].to_vec();
        outer_shape.extend(std::iter::repeat_n(one.clone(), x_shape.len() - k));
        // tract's binary ops take equal ranks: the inner operand's leading axes are unit ones
        let mut inner_shape = vec![one.clone(); k];
        inner_shape.extend(x_shape[k..].iter().cloned());
        found.push((node.name.clone(), at, [(outer, outer_shape), (inner, inner_shape)]));
    }
    let rewritten = found.len();
    for (name, x, operands) in found {
        let mut patch = TypedModelPatch::default();
        let mut wired = vec![];
        for (i, (o, target)) in operands.into_iter().enumerate() {
            // the tensor behind the operand's views (same elements, same order)
            let mut src = o;
            while is_view(model, src.node) {
                src = model.node(src.node).inputs[0];
            }
            // a unary node there (the positions' Cast) moves after the reshape, next to the Mul it then fuses with
            let unary = match step_of(model, model.node(src.node)) {
                Some(Step::Unary(..)) => {
                    gpu_op(model, src.node).cloned().map(|op| (op, model.node(src.node).inputs[0]))
                }
                _ => None,
            };
            let base = unary.as_ref().map_or(src, |(_, i)| *i);
            let from: Vec<TDim> = model.outlet_fact(base).map_err(tract_err(WHAT))?.shape.iter().cloned().collect();
            let t = patch.tap_model(model, base).map_err(tract_err(WHAT))?;
            let v = patch
                .wire_node(format!("{name}.outer.{i}"), reshape_op(&from, &target), &[t])
                .map_err(tract_err(WHAT))?[0];
            let v = match unary {
                Some((op, _)) => patch.wire_node(format!("{name}.outer.{i}.op"), op, &[v]).map_err(tract_err(WHAT))?[0],
                None => v,
            };
            wired.push(v);
        }
        let mul = GpuOp {
            kernel: Kernel::Binary(kiln_wgsl::BinaryOp::Mul),
            cpu: Box::new(tract_onnx::tract_core::ops::math::mul()),
        };
        let y = patch.wire_node(format!("{name}.outer"), mul, &wired).map_err(tract_err(WHAT))?[0];
        patch.shunt_outside(model, x, y).map_err(tract_err(WHAT))?;
        patch.apply(model).map_err(tract_err(WHAT))?;
    }
    if rewritten > 0 {
        model.compact().map_err(tract_err(WHAT))?;
    }
    Ok(rewritten)
}

/// Joins a Gather of a float16 table and the Cast of its rows that is its only reader (an embedding lookup in a
/// float16 model computing in f32) into one dispatch ([`Kernel::GatherCast`]). Returns how many it joined.
pub fn fuse_gather_casts(model: &mut TypedModel) -> Result<usize> {
    let outputs: HashSet<OutletId> =
        model.output_outlets().map_err(tract_err("model outputs"))?.iter().copied().collect();
    let mut found = vec![];
    for node in model.nodes() {
        let Some(Kernel::Gather { axis }) = node.op_as::<GpuOp>().map(|g| &g.kernel) else { continue };
        let data = model.outlet_fact(node.inputs[0]).map_err(tract_err("gather data"))?;
        if data.datum_type != DatumType::F16 {
            continue;
        }
        let Some((c, _)) = sole_reader(model, &outputs, node.id) else { continue };
        let Some(Kernel::Unary(kiln_wgsl::UnaryOp::Cast { from: DatumType::F16, to })) =
            gpu_op(model, c).map(|g| &g.kernel)
        else {
            continue;
        };
        let kernel = Kernel::GatherCast { axis: *axis, to: *to };
        let dts = [DatumType::F16, model.outlet_fact(node.inputs[1]).map_err(tract_err("gather indices"))?.datum_type];
        if kernel.output_dt(&dts).is_none() {
            continue;
        }
        found.push((node.id, c, kernel));
    }
    let joined = found.len();
    for (g, c, kernel) in found {
        let (Some(gather), Some(cast)) = (gpu_op(model, g), gpu_op(model, c)) else { continue };
        let cpu = FusedChain {
            inputs: 2,
            steps: vec![
                (gather.cpu.clone(), vec![Src::Input(0), Src::Input(1)]),
                (cast.cpu.clone(), vec![Src::Step(0)]),
            ],
            outputs: 1,
        };
        let op = GpuOp { kernel, cpu: Box::new(cpu) };
        let inputs = model.node(g).inputs.clone();
        let name = model.node(c).name.clone();
        replace_with(model, name, op, &inputs, &[OutletId::new(c, 0)], "joining a gather and its cast")?;
    }
    if joined > 0 {
        model.compact().map_err(tract_err("compacting the model"))?;
    }
    Ok(joined)
}

/// Whether every reader of `n` (through views) is a node a group takes in (`taken_in`: they read it as a leaf),
/// and it is no model output.
fn read_as_leaf_only(model: &TypedModel, outputs: &HashSet<OutletId>, taken_in: &HashSet<usize>, n: usize) -> bool {
    let mut stack = vec![n];
    while let Some(m) = stack.pop() {
        let node = model.node(m);
        if (0..node.outputs.len()).any(|s| outputs.contains(&OutletId::new(m, s))) {
            return false;
        }
        for r in node.outputs.iter().flat_map(|o| &o.successors).map(|s| s.node) {
            if is_view(model, r) {
                stack.push(r);
            } else if !taken_in.contains(&r) {
                return false;
            }
        }
    }
    true
}

/// Builds a group's GPU program and CPU reference, outlet by outlet from the sink.
struct Builder<'a> {
    model: &'a TypedModel,
    outputs: &'a HashSet<OutletId>,
    fed: &'a HashSet<usize>,
    nodes: &'a HashSet<usize>,
    externals: Vec<OutletId>,
    leaves: Vec<Leaf>,
    indexed: Vec<Indexed>,
    steps: Vec<Step>,
    gpu: HashMap<OutletId, Src>,
    cpu_steps: Vec<(Box<dyn TypedOp>, Vec<Src>)>,
    cpu: HashMap<OutletId, Src>,
}

impl Builder<'_> {
    fn external(&mut self, o: OutletId) -> Option<Src> {
        let indexed = |k: usize| self.indexed.iter().any(|x| x.input as usize == k);
        let k = match self.externals.iter().enumerate().position(|(k, e)| *e == o && !indexed(k)) {
            Some(k) => k,
            None => {
                self.externals.push(o);
                self.externals.len() - 1
            }
        };
        Some(Src::Input(u8::try_from(k).ok()?))
    }

    fn push(&mut self, step: Step) -> Option<Src> {
        self.steps.push(step);
        Some(Src::Step(u8::try_from(self.steps.len() - 1).ok()?))
    }

    /// The GPU program's source for outlet `o`.
    fn gpu(&mut self, o: OutletId) -> Option<Src> {
        if let Some(s) = self.gpu.get(&o) {
            return Some(*s);
        }
        let n = o.node;
        let src = if !self.nodes.contains(&n) {
            match leaf_of(self.model, o) {
                Some(leaf) => {
                    let at = match self.leaves.iter().position(|l| *l == leaf) {
                        Some(at) => at,
                        None => {
                            self.leaves.push(leaf);
                            self.leaves.len() - 1
                        }
                    };
                    Src::Leaf(u8::try_from(at).ok()?)
                }
                None => self.external(o)?,
            }
        } else if is_view(self.model, n) {
            // a view after a gather: the gather's value in the indices' frame
            self.gpu(self.model.node(n).inputs[0])?
        } else if gpu_op(self.model, n).is_some_and(|g| matches!(g.kernel, Kernel::GatherNd { .. })) {
            let (comps, ..) = fusable_gather_nd(self.model, self.outputs, n)?;
            let (chain, data) = gather_data_chain(self.model, self.outputs, self.fed, n);
            // its own input (read at indices), even where the same tensor is read elementwise too
            self.externals.push(data);
            let k = u8::try_from(self.externals.len() - 1).ok()?;
            self.indexed.push(Indexed { input: k, comps });
            let mut at = Src::Input(k);
            for &c in chain.iter().rev() {
                if let Some(Step::Unary(u, _)) = step_of(self.model, self.model.node(c)) {
                    at = self.push(Step::Unary(u, at))?;
                }
            }
            at
        } else if gpu_op(self.model, n).is_some_and(|g| matches!(g.kernel, Kernel::Gather { .. })) {
            let idx = self.gpu(self.model.node(n).inputs[1])?;
            let (chain, data) = gather_data_chain(self.model, self.outputs, self.fed, n);
            let Src::Input(k) = self.external(data)? else { return None };
            let mut at = self.push(Step::Gather(k, idx))?;
            // the unary steps on the gathered word, nearest the data first
            for &c in chain.iter().rev() {
                if let Some(Step::Unary(u, _)) = step_of(self.model, self.model.node(c)) {
                    at = self.push(Step::Unary(u, at))?;
                }
            }
            at
        } else {
            let node = self.model.node(n);
            let mut srcs = vec![];
            for i in node.inputs.clone() {
                srcs.push(self.gpu(i)?);
            }
            let step = match (step_of(self.model, node)?, srcs.as_slice()) {
                (Step::Unary(u, _), [a]) => Step::Unary(u, *a),
                (Step::Binary(b, _, _), [x, y]) => Step::Binary(b, *x, *y),
                (Step::BinaryInt(b, _, _), [x, y]) => Step::BinaryInt(b, *x, *y),
                (Step::Where(..), [c, a, b]) => Step::Where(*c, *a, *b),
                _ => return None,
            };
            self.push(step)?
        };
        self.gpu.insert(o, src);
        Some(src)
    }

    /// The CPU reference's source for outlet `o`: the group's nodes, leaves and their views as steps.
    fn cpu(&mut self, o: OutletId) -> Option<Src> {
        if let Some(s) = self.cpu.get(&o) {
            return Some(*s);
        }
        let n = o.node;
        let inside = self.nodes.contains(&n) || leaf_of(self.model, o).is_some();
        let src = if inside {
            let node = self.model.node(n);
            let mut srcs = vec![];
            for i in node.inputs.clone() {
                srcs.push(self.cpu(i)?);
            }
            self.cpu_steps.push((gpu_op(self.model, n)?.cpu.clone(), srcs));
            Src::Step(u8::try_from(self.cpu_steps.len() - 1).ok()?)
        } else {
            // the GPU side's input for it (the CPU reads whole tensors: read at indices or not is all one)
            let k = self.externals.iter().position(|e| *e == o)?;
            Src::Input(u8::try_from(k).ok()?)
        };
        self.cpu.insert(o, src);
        Some(src)
    }
}

/// The program, its CPU reference and its external inputs for a group, or `None` when the group exceeds the
/// kernel's limits.
fn build(
    model: &TypedModel,
    outputs: &HashSet<OutletId>,
    fed: &HashSet<usize>,
    group: &Group,
) -> Option<(FusedProgram, FusedChain, Vec<OutletId>)> {
    let mut b = Builder {
        model,
        outputs,
        fed,
        nodes: &group.nodes,
        externals: vec![],
        leaves: vec![],
        indexed: vec![],
        steps: vec![],
        gpu: HashMap::new(),
        cpu_steps: vec![],
        cpu: HashMap::new(),
    };
    let sink = OutletId::new(group.sink, 0);
    // the siblings first, the sink last: its step is the program's last (the first output)
    let mut more = vec![];
    for s in &group.siblings {
        let Src::Step(k) = b.gpu(OutletId::new(*s, 0))? else { return None };
        more.push((k, model.outlet_fact(OutletId::new(*s, 0)).ok()?.datum_type));
    }
    let Src::Step(last) = b.gpu(sink)? else { return None };
    if last as usize != b.steps.len() - 1 {
        return None;
    }
    // the CPU reference: everything the sinks read, then the sinks in the outputs' order (its last values)
    let sinks: Vec<usize> = std::iter::once(group.sink).chain(group.siblings.iter().copied()).collect();
    for s in &sinks {
        for i in model.node(*s).inputs.clone() {
            b.cpu(i)?;
        }
    }
    for s in &sinks {
        let srcs: Vec<Src> = model.node(*s).inputs.iter().map(|i| b.cpu.get(i).copied()).collect::<Option<_>>()?;
        b.cpu_steps.push((gpu_op(model, *s)?.cpu.clone(), srcs));
    }
    if b.steps.len() > MAX_FUSED_STEPS || b.externals.len() > MAX_FUSED_INPUTS || b.leaves.len() > MAX_FUSED_LEAVES {
        return None;
    }
    // a gathered input is read at indices only
    let gathered: HashSet<u8> =
        b.steps.iter().filter_map(|s| if let Step::Gather(k, _) = s { Some(*k) } else { None }).collect();
    let read: bool = b.steps.iter().any(|s| {
        let srcs: Vec<Src> = match *s {
            Step::Unary(_, a) | Step::Gather(_, a) => vec![a],
            Step::Binary(_, a, c) | Step::BinaryInt(_, a, c) => vec![a, c],
            Step::Where(c, a, d) => vec![c, a, d],
        };
        srcs.iter().any(|x| matches!(x, Src::Input(k) if gathered.contains(k)))
    });
    if read {
        return None;
    }
    let out_dt = model.outlet_fact(sink).ok()?.datum_type;
    let inputs = b.externals.len();
    let program = FusedProgram::with_leaves(inputs, b.leaves, b.indexed, b.steps, out_dt).with_more_outputs(more);
    program.check().ok()?;
    let outputs = program.outputs();
    Some((program, FusedChain { inputs, steps: b.cpu_steps, outputs }, b.externals))
}

/// Taps `outlets` of `model` into `patch`.
fn tap_all(
    patch: &mut TypedModelPatch,
    model: &TypedModel,
    outlets: &[OutletId],
    what: &str,
) -> Result<TVec<OutletId>> {
    outlets.iter().map(|o| patch.tap_model(model, *o).map_err(tract_err(what))).collect()
}

/// Wires `op` on `inputs` (patch outlets) as node `name`; its i-th output replaces `replaced[i]` outside the patch.
fn wire_replacing(
    patch: &mut TypedModelPatch,
    model: &TypedModel,
    name: String,
    op: GpuOp,
    inputs: &[OutletId],
    replaced: &[OutletId],
    what: &str,
) -> Result<TVec<OutletId>> {
    let outs = patch.wire_node(name, op, inputs).map_err(tract_err(what))?;
    for (r, o) in replaced.iter().zip(&outs) {
        patch.shunt_outside(model, *r, *o).map_err(tract_err(what))?;
    }
    Ok(outs)
}

/// Replaces `replaced` (the i-th outside the patch by the i-th output) with `op` on `inputs` as node `name`: one
/// patch, applied.
fn replace_with(
    model: &mut TypedModel,
    name: String,
    op: GpuOp,
    inputs: &[OutletId],
    replaced: &[OutletId],
    what: &str,
) -> Result<()> {
    let mut patch = TypedModelPatch::default();
    let taps = tap_all(&mut patch, model, inputs, what)?;
    wire_replacing(&mut patch, model, name, op, &taps, replaced, what)?;
    patch.apply(model).map_err(tract_err(what))
}

/// Applies `patch`, then drops the nodes it left unused (the next search walks a clean model).
fn apply_compacted(patch: TypedModelPatch, model: &mut TypedModel, what: &str) -> Result<()> {
    patch.apply(model).map_err(tract_err(what))?;
    model.compact().map_err(tract_err(what))
}

/// The node behind `o` when it is a GPU MatMulNBits without an epilogue whose only use is `user`.
fn sole_qmatmul(
    model: &TypedModel,
    outputs: &HashSet<OutletId>,
    o: OutletId,
    user: usize,
) -> Option<kiln_wgsl::qmatmul::QMatMul> {
    qmatmul_used_by(model, outputs, o, user, 0)
}

/// The node behind `o` when it is a GPU MatMulNBits without an epilogue, used once by `user` and by `others` other
/// nodes (which the caller checks), and not a model output.
fn qmatmul_used_by(
    model: &TypedModel,
    outputs: &HashSet<OutletId>,
    o: OutletId,
    user: usize,
    others: usize,
) -> Option<kiln_wgsl::qmatmul::QMatMul> {
    let node = model.node(o.node);
    let Kernel::QMatMul(q) = &node.op_as::<GpuOp>()?.kernel else { return None };
    let succ = &node.outputs[0].successors;
    let used = succ.len() == 1 + others && succ.iter().filter(|s| s.node == user).count() == 1;
    (q.epilogue == QEpilogue::None && o.slot == 0 && used && !outputs.contains(&o)).then(|| q.clone())
}

/// Whether a GPU node is the binary op `b` / unary op `u` with one output.
fn is_binary(node: &TypedNode, b: kiln_wgsl::BinaryOp) -> bool {
    node.inputs.len() == 2 && node.op_as::<GpuOp>().is_some_and(|op| op.kernel == Kernel::Binary(b))
}

/// One epilogue fusion found in the model: the node whose output the fused node replaces, the fused kernel, its
/// CPU reference and its inputs.
struct EpilogueMatch {
    sink: usize,
    kernel: kiln_wgsl::qmatmul::QMatMul,
    chain: FusedChain,
    inputs: Vec<OutletId>,
    /// Skip norms of the same residual sum (kiln-graph's `fuse_norm`), to read the fused node's sum instead.
    norms: Vec<usize>,
    /// Every node the fusion replaces.
    members: Vec<usize>,
}

/// The kiln NormOp behind a GPU node that adds a skip.
fn skip_norm(node: &TypedNode) -> Option<kiln_ops::skip_norm::NormOp> {
    match &node.op_as::<GpuOp>()?.kernel {
        Kernel::Norm(n) if n.op.has_skip && node.inputs.len() >= 2 => Some(n.op.clone()),
        _ => None,
    }
}

fn find_epilogue(
    model: &TypedModel,
    order: &[usize],
    outputs: &HashSet<OutletId>,
    max_storage_buffers: u32,
) -> Option<EpilogueMatch> {
    use kiln_wgsl::BinaryOp::{Add, Mul};
    let same_shape = |a: OutletId, b: OutletId| {
        let (fa, fb) = (model.outlet_fact(a).ok(), model.outlet_fact(b).ok());
        fa.zip(fb).is_some_and(|(fa, fb)| fa.shape == fb.shape && fa.datum_type == DatumType::F32)
    };
    let cpu = |n: usize| model.node(n).op_as::<GpuOp>().map(|g| g.cpu.clone());
    let srcs = |r: std::ops::Range<usize>| r.map(|i| Src::Input(i as u8)).collect::<Vec<_>>();
    for &id in order {
        let node = model.node(id);
        // Mul(Silu(A · Gᵀ), A · Uᵀ) (either operand order): the gated MLP
        if is_binary(node, Mul) {
            for (si, ui) in [(0, 1), (1, 0)] {
                let silu = model.node(node.inputs[si].node);
                let is_silu =
                    silu.op_as::<GpuOp>().is_some_and(|g| g.kernel == Kernel::Unary(kiln_wgsl::UnaryOp::Silu))
                        && silu.inputs.len() == 1
                        && silu.outputs[0].successors.len() == 1
                        && !outputs.contains(&node.inputs[si]);
                if !is_silu {
                    continue;
                }
                let (Some(g), Some(u)) = (
                    sole_qmatmul(model, outputs, silu.inputs[0], silu.id),
                    sole_qmatmul(model, outputs, node.inputs[ui], id),
                ) else {
                    continue;
                };
                let (gn, un) = (model.node(silu.inputs[0].node), model.node(node.inputs[ui].node));
                if g != u
                    || gn.inputs[0] != un.inputs[0]
                    || gn.inputs.len() != un.inputs.len()
                    || !same_shape(silu.inputs[0], OutletId::new(id, 0))
                    || !same_shape(node.inputs[ui], OutletId::new(id, 0))
                {
                    continue;
                }
                let wa = gn.inputs.len() - 1;
                let mut inputs: Vec<OutletId> = gn.inputs.to_vec();
                inputs.extend(un.inputs[1..].iter().copied());
                let mut up_srcs = vec![Src::Input(0)];
                up_srcs.extend(srcs(1 + wa..1 + 2 * wa));
                let mul_srcs =
                    if si == 0 { vec![Src::Step(2), Src::Step(1)] } else { vec![Src::Step(1), Src::Step(2)] };
                let chain = FusedChain {
                    inputs: inputs.len(),
                    steps: vec![
                        (cpu(gn.id)?, srcs(0..1 + wa)),
                        (cpu(un.id)?, up_srcs),
                        (cpu(silu.id)?, vec![Src::Step(0)]),
                        (cpu(id)?, mul_srcs),
                    ],
                    outputs: 1,
                };
                let kernel = kiln_wgsl::qmatmul::QMatMul { epilogue: QEpilogue::SiluMul, ..g };
                if kernel.storage_buffers() > max_storage_buffers {
                    continue;
                }
                let members = vec![gn.id, un.id, silu.id, id];
                return Some(EpilogueMatch { sink: id, kernel, chain, inputs, norms: vec![], members });
            }
        }
        // Add(A · Bᵀ, R) (either operand order): a residual
        if is_binary(node, Add) {
            for (qi, ri) in [(0, 1), (1, 0)] {
                // the product's other users may be skip norms of the same sum: they read the fused node instead
                let (qo, ro) = (node.inputs[qi], node.inputs[ri]);
                let norms: Vec<usize> =
                    model.node(qo.node).outputs[0].successors.iter().map(|s| s.node).filter(|&n| n != id).collect();
                let same_sum = |n: usize| {
                    let nn = model.node(n);
                    skip_norm(nn).is_some() && (nn.inputs[..2] == [qo, ro] || nn.inputs[..2] == [ro, qo])
                };
                if !norms.iter().all(|&n| same_sum(n)) {
                    continue;
                }
                let Some(q) = qmatmul_used_by(model, outputs, qo, id, norms.len()) else { continue };
                if node.inputs[ri].node == node.inputs[qi].node
                    || !same_shape(node.inputs[qi], OutletId::new(id, 0))
                    || !same_shape(node.inputs[ri], OutletId::new(id, 0))
                {
                    continue;
                }
                let qn = model.node(node.inputs[qi].node);
                let n = qn.inputs.len();
                let mut inputs: Vec<OutletId> = qn.inputs.to_vec();
                inputs.push(node.inputs[ri]);
                let add_srcs = if qi == 0 {
                    vec![Src::Step(0), Src::Input(n as u8)]
                } else {
                    vec![Src::Input(n as u8), Src::Step(0)]
                };
                let chain = FusedChain {
                    inputs: inputs.len(),
                    steps: vec![(cpu(qn.id)?, srcs(0..n)), (cpu(id)?, add_srcs)],
                    outputs: 1,
                };
                let kernel = kiln_wgsl::qmatmul::QMatMul { epilogue: QEpilogue::Residual, ..q };
                if kernel.storage_buffers() > max_storage_buffers {
                    continue;
                }
                let mut members = vec![qn.id, id];
                members.extend(norms.iter().copied());
                return Some(EpilogueMatch { sink: id, kernel, chain, inputs, norms, members });
            }
        }
    }
    None
}

/// Folds the elementwise work after GPU MatMulNBits nodes into their kernel ([`QEpilogue`]): a gated MLP's gate and
/// up projections with their SiLU · Mul become one dispatch, and a projection followed by a residual Add stores the
/// sum. Returns how many fused nodes it made. Runs on the lowered model, before [`fuse_elementwise`].
///
/// `max_storage_buffers`: the adapter's limit per kernel; fusions that would bind more are left out.
pub fn fuse_matmul_epilogues(model: &mut TypedModel, max_storage_buffers: u32) -> Result<usize> {
    const WHAT: &str = "fusing a matmul epilogue";
    batched(model, WHAT, |model, order, outputs| {
        let m = find_epilogue(model, order, outputs, max_storage_buffers)?;
        let apply = move |model: &mut TypedModel| -> Result<()> {
            let mut patch = TypedModelPatch::default();
            let taps = tap_all(&mut patch, model, &m.inputs, WHAT)?;
            let name = model.node(m.sink).name.clone();
            let op = GpuOp { kernel: Kernel::QMatMul(m.kernel), cpu: Box::new(m.chain) };
            let out = wire_replacing(&mut patch, model, name, op, &taps, &[OutletId::new(m.sink, 0)], WHAT)?[0];
            for n in m.norms {
                // NormOp(a, b, rest..) of the sum a + b → NormOp(sum, rest..)
                let node = model.node(n);
                let op = skip_norm(node).ok_or_else(|| Error::invalid_model("matmul epilogue: not a skip norm"))?;
                let op = kiln_ops::skip_norm::NormOp { has_skip: false, ..op };
                let mut ins = tvec![out];
                ins.extend(tap_all(&mut patch, model, &node.inputs[2..], WHAT)?);
                let gpu =
                    GpuOp { kernel: Kernel::Norm(kiln_wgsl::msft::NormSpec { op: op.clone() }), cpu: Box::new(op) };
                wire_replacing(&mut patch, model, node.name.clone(), gpu, &ins, &[OutletId::new(n, 0)], WHAT)?;
            }
            patch.apply(model).map_err(tract_err(WHAT))
        };
        Some(Found { at: m.sink, members: m.members.clone(), apply: Box::new(apply) })
    })
}

/// Applies one fusion to the model (its patch, without compacting).
type ApplyFn<'a> = Box<dyn FnOnce(&mut TypedModel) -> Result<()> + 'a>;

/// A fusion a pass found: the node the search stopped at, the nodes it replaces, and how to apply it.
struct Found<'a> {
    at: usize,
    members: Vec<usize>,
    apply: ApplyFn<'a>,
}

/// Runs a fusion pass in rounds: each round walks the evaluation order once, applying every fusion `find` reports
/// (searching on after the last one's node) whose nodes no earlier fusion of the round replaced, then compacts the
/// model once — not an ordering and a compaction per fusion (~100 fusions in a 30-layer model). A fusion skipped
/// for overlap is found again in the next round. Returns how many fusions it applied.
fn batched<'a>(
    model: &mut TypedModel,
    what: &str,
    mut find: impl FnMut(&TypedModel, &[usize], &HashSet<OutletId>) -> Option<Found<'a>>,
) -> Result<usize> {
    let mut fused = 0;
    loop {
        let order = model.eval_order().map_err(tract_err(what))?;
        let outputs: HashSet<OutletId> = model.output_outlets().map_err(tract_err(what))?.iter().copied().collect();
        let mut touched: HashSet<usize> = HashSet::new();
        let mut applied = 0;
        let mut rest: &[usize] = &order;
        while let Some(f) = find(model, rest, &outputs) {
            let Some(pos) = rest.iter().position(|&n| n == f.at) else { break };
            rest = &rest[pos + 1..];
            if f.members.iter().any(|n| touched.contains(n)) {
                continue;
            }
            touched.extend(f.members.iter().copied());
            (f.apply)(model)?;
            applied += 1;
        }
        if applied > 0 {
            model.compact().map_err(tract_err(what))?;
        }
        fused += applied;
        // a round that applied nothing ends the pass (one that did may have made new matches possible)
        if applied == 0 {
            break;
        }
    }
    Ok(fused)
}

/// The most weights one split matmul reads ([`QEpilogue::Split`]).
const MAX_SPLIT: usize = 3;

/// Joins GPU MatMulNBits nodes of one input and one specialisation but N (a layer's q, k and v projections) into
/// one node with an output per weight ([`QEpilogue::Split`]): one dispatch on a decode step instead of three, as
/// many of them as `max_storage_buffers` lets one kernel bind. Returns how many split nodes it made. Runs on the
/// lowered model, after [`fuse_matmul_epilogues`].
pub fn fuse_matmul_splits(model: &mut TypedModel, max_storage_buffers: u32) -> Result<usize> {
    let mut fused = 0;
    loop {
        let order = model.eval_order().map_err(tract_err("ordering the lowered model"))?;
        // the plain GPU MatMulNBits nodes reading each outlet, by specialisation (N aside), in evaluation order
        let mut groups: Vec<(OutletId, kiln_wgsl::qmatmul::QMatMul, Vec<usize>)> = vec![];
        for &id in &order {
            let node = model.node(id);
            let Some(Kernel::QMatMul(q)) = node.op_as::<GpuOp>().map(|g| &g.kernel) else { continue };
            if q.epilogue != QEpilogue::None || node.outputs.len() != 1 {
                continue;
            }
            let key = kiln_wgsl::qmatmul::QMatMul { n: 0, ..q.clone() };
            match groups.iter_mut().find(|(a, k, _)| *a == node.inputs[0] && *k == key) {
                Some((_, _, members)) => members.push(id),
                None => groups.push((node.inputs[0], key, vec![id])),
            }
        }
        // the most weights of a group one kernel can bind
        let fits = |key: &kiln_wgsl::qmatmul::QMatMul, parts: usize| {
            let mut ns = [0usize; 3];
            ns[..parts].fill(1);
            kiln_wgsl::qmatmul::QMatMul { epilogue: QEpilogue::Split(ns), ..key.clone() }.storage_buffers()
                <= max_storage_buffers
        };
        // every group that fits, in this round (the groups' nodes are disjoint); then one compaction
        let found: Vec<_> = groups
            .into_iter()
            .filter_map(|(a, key, members)| {
                let parts = (2..=members.len().min(MAX_SPLIT)).rev().find(|p| fits(&key, *p))?;
                Some((a, key, members[..parts].to_vec()))
            })
            .collect();
        if found.is_empty() {
            break;
        }
        const WHAT: &str = "joining matmuls";
        for (a, key, members) in found {
            let mut ns = [0usize; 3];
            let mut inputs = vec![a];
            let mut steps = vec![];
            for (w, &m) in members.iter().enumerate() {
                let node = model.node(m);
                let Some(Kernel::QMatMul(q)) = node.op_as::<GpuOp>().map(|g| &g.kernel) else { break };
                ns[w] = q.n;
                let mut srcs = vec![Src::Input(0)];
                for i in &node.inputs[1..] {
                    srcs.push(Src::Input(inputs.len() as u8));
                    inputs.push(*i);
                }
                let cpu = node.op_as::<GpuOp>().map(|g| g.cpu.clone());
                steps.push((cpu.ok_or_else(|| Error::invalid_model("split matmul: not a GPU node"))?, srcs));
            }
            let kernel = kiln_wgsl::qmatmul::QMatMul { n: ns.iter().sum(), epilogue: QEpilogue::Split(ns), ..key };
            let chain = FusedChain { inputs: inputs.len(), steps, outputs: members.len() };
            let name = format!("{}.split", model.node(members[0]).name);
            let op = GpuOp { kernel: Kernel::QMatMul(kernel), cpu: Box::new(chain) };
            let replaced: Vec<OutletId> = members.iter().map(|m| OutletId::new(*m, 0)).collect();
            replace_with(model, name, op, &inputs, &replaced, WHAT)?;
            fused += 1;
        }
        model.compact().map_err(tract_err(WHAT))?;
    }
    Ok(fused)
}

/// Whether node `b` reads, directly or not, an output of node `a`.
fn depends_on(model: &TypedModel, b: usize, a: usize) -> bool {
    let mut seen = HashSet::new();
    let mut stack = vec![b];
    while let Some(n) = stack.pop() {
        for i in &model.node(n).inputs {
            if i.node == a {
                return true;
            }
            if seen.insert(i.node) {
                stack.push(i.node);
            }
        }
    }
    false
}

/// Storage buffers of a paired rotary embedding: both inputs and outputs, the two caches and the positions.
const ROTARY_PAIR_BUFFERS: u32 = 7;

/// Joins GPU rotary embeddings that share their caches and positions (a layer's q and k) in pairs: one node with
/// two outputs, one dispatch (`rope2_main`) instead of two. Returns how many pairs it made. The pairs are found in
/// one walk and applied together (disjoint nodes; neither of a pair reads the other's output).
pub fn fuse_rotary_pairs(model: &mut TypedModel, max_storage_buffers: u32) -> Result<usize> {
    if max_storage_buffers < ROTARY_PAIR_BUFFERS {
        return Ok(0);
    }
    let order = model.eval_order().map_err(tract_err("ordering the lowered model"))?;
    // single GPU rotary nodes by their cache / position inputs, in evaluation order
    let mut groups: Vec<(Vec<OutletId>, Vec<usize>)> = vec![];
    for &id in &order {
        let node = model.node(id);
        let Some(Kernel::Rotary(r)) = node.op_as::<GpuOp>().map(|g| &g.kernel) else { continue };
        if r.second.is_some() || node.outputs.len() != 1 {
            continue;
        }
        let shared = node.inputs[1..].to_vec();
        match groups.iter_mut().find(|(k, _)| *k == shared) {
            Some((_, members)) => members.push(id),
            None => groups.push((shared, vec![id])),
        }
    }
    let spec = |model: &TypedModel, id: usize| match model.node(id).op_as::<GpuOp>().map(|g| &g.kernel) {
        Some(Kernel::Rotary(r)) => Some(r.config.clone()),
        _ => None,
    };
    // greedily in evaluation order: each with the first later member it can share a dispatch with (a layer's q
    // with its k); never two where one depends on the other (that would be a cycle)
    let mut pairs = vec![];
    for (_, members) in groups {
        let mut used = vec![false; members.len()];
        for i in 0..members.len() {
            if used[i] {
                continue;
            }
            let Some(ci) = spec(model, members[i]) else { continue };
            let partner = (i + 1..members.len()).find(|&j| {
                !used[j]
                    && spec(model, members[j]).is_some_and(|cj| kiln_wgsl::attention::RotarySpec::pairs(&ci, &cj))
                    && !depends_on(model, members[j], members[i])
            });
            if let Some(j) = partner {
                used[i] = true;
                used[j] = true;
                pairs.push((members[i], members[j]));
            }
        }
    }
    const WHAT: &str = "pairing rotary embeddings";
    for &(a, b) in &pairs {
        let (na, nb) = (model.node(a), model.node(b));
        let (Some(ca), Some(cb)) = (spec(model, a), spec(model, b)) else { continue };
        let shared = na.inputs[1..].to_vec();
        let mut inputs = vec![na.inputs[0]];
        inputs.extend(shared.iter().copied());
        inputs.push(nb.inputs[0]);
        let last = inputs.len() as u8 - 1;
        let srcs = |x: u8| -> Vec<Src> { std::iter::once(Src::Input(x)).chain((1..last).map(Src::Input)).collect() };
        let cpu = |n: &TypedNode| n.op_as::<GpuOp>().map(|g| g.cpu.clone());
        let (Some(cpu_a), Some(cpu_b)) = (cpu(na), cpu(nb)) else { continue };
        let chain = FusedChain { inputs: inputs.len(), steps: vec![(cpu_a, srcs(0)), (cpu_b, srcs(last))], outputs: 2 };
        let kernel = Kernel::Rotary(kiln_wgsl::attention::RotarySpec {
            config: ca,
            second: Some(cb),
            append: false,
            k_out: false,
        });
        let name = format!("{}.pair", na.name);
        let op = GpuOp { kernel, cpu: Box::new(chain) };
        replace_with(model, name, op, &inputs, &[OutletId::new(a, 0), OutletId::new(b, 0)], WHAT)?;
    }
    model.compact().map_err(tract_err(WHAT))?;
    Ok(pairs.len())
}

/// The Concat along axis 2 of two inputs (a KV append: past, new) behind `o`, as a GPU node.
fn kv_concat(model: &TypedModel, o: OutletId) -> Option<&TypedNode> {
    let n = model.node(o.node);
    let is = n.op_as::<GpuOp>().is_some_and(|g| g.kernel == Kernel::Concat { axis: 2, inputs: 2 });
    (is && o.slot == 0 && n.inputs.len() == 2).then_some(n)
}

/// The node behind `o` when it is a GPU Cast from f32 to f16 read by one node only (and not a model output).
fn sole_cast16<'m>(model: &'m TypedModel, outputs: &HashSet<OutletId>, o: OutletId) -> Option<&'m TypedNode> {
    let n = model.node(o.node);
    let to16 = kiln_wgsl::UnaryOp::Cast { from: DatumType::F32, to: DatumType::F16 };
    let is = n.op_as::<GpuOp>().is_some_and(|g| g.kernel == Kernel::Unary(to16));
    (is && o.slot == 0 && n.outputs[0].successors.len() == 1 && !outputs.contains(&o)).then_some(n)
}

/// The KV Concat that is the only reader of `o` through a Cast to f16 (a float16 model's cache: see
/// kiln_wgsl::kv::concat_kv_in_f16), with the Cast's id.
fn f16_kv_append_of(model: &TypedModel, outputs: &HashSet<OutletId>, o: OutletId) -> Option<(usize, usize)> {
    let cast = model.node(o.node).outputs[o.slot].successors.iter().find_map(|s| {
        let c = model.node(s.node);
        sole_cast16(model, outputs, OutletId::new(c.id, 0)).filter(|c| c.inputs[0] == o)
    })?;
    let concat = kv_concat(model, OutletId::new(cast.outputs[0].successors[0].node, 0))?;
    let past16 = model.outlet_fact(concat.inputs[0]).ok()?;
    let ok = concat.inputs[1] == OutletId::new(cast.id, 0) && past16.datum_type == DatumType::F16 && past16.rank() == 4;
    ok.then_some((cast.id, concat.id))
}

/// A rotation pair with the KV appends after it ([`fuse_rotary_appends`]).
struct RotaryAppends {
    pair: usize,
    /// the K and V Concats, and (float16 caches) the Casts to f16 in front of them
    k_concat: usize,
    v_concat: usize,
    casts: Option<(usize, usize)>,
    /// the new values
    v: OutletId,
}

/// Joins a layer's paired q / k rotation ([`fuse_rotary_pairs`]) with the KV appends after it into one node
/// ([`kiln_wgsl::attention::RotarySpec`] with `append`): on a decode step whose caches stay on the GPU, one
/// dispatch rotates q and writes k rotated and v into the caches' spare rows, instead of a dispatch and a copy per
/// (batch, head) and cache. Two forms, 4D keys and values:
/// - f32 caches: the Concat of the past keys and the rotated k (its only reader), and the Concat of the past
///   values and v that the same attention reads as its V;
/// - float16 caches (a float16 model): the attention reads the rotated k and v itself (and the f16 pasts), and
///   each goes to its cache through a Cast to f16 and a Concat; the node also outputs the rotated k (`k_out`).
///
/// Returns how many it joined. Runs after [`fuse_rotary_pairs`].
pub fn fuse_rotary_appends(model: &mut TypedModel, max_storage_buffers: u32) -> Result<usize> {
    const WHAT: &str = "joining a rotation with its KV appends";
    batched(model, WHAT, |model, order, outputs| {
        let f32_4d = |o: OutletId| model.outlet_fact(o).is_ok_and(|f| f.datum_type == DatumType::F32 && f.rank() == 4);
        let attention_at = |o: OutletId, slot: usize| {
            model.node(o.node).outputs[o.slot].successors.iter().find_map(|s| {
                let a = model.node(s.node);
                let is = matches!(a.op_as::<GpuOp>()?.kernel, Kernel::Attention(_));
                (is && s.slot == slot && a.inputs.len() > 2).then_some(a)
            })
        };
        let found = order.iter().find_map(|&id| {
            let pair = model.node(id);
            let g = pair.op_as::<GpuOp>()?;
            let Kernel::Rotary(r) = &g.kernel else { return None };
            let chain = g.cpu.as_op().downcast_ref::<FusedChain>()?;
            let k_rot = OutletId::new(id, 1);
            let readers = &pair.outputs.get(1)?.successors;
            if r.second.is_none() || r.append || chain.steps.len() != 2 || outputs.contains(&k_rot) || !f32_4d(k_rot) {
                return None;
            }
            let m = if readers.len() == 1 {
                // f32 caches: k_rot → Concat(past_k, ·), read by the attention with Concat(past_v, v) as V
                let ck = kv_concat(model, OutletId::new(readers[0].node, 0))?;
                let a = attention_at(OutletId::new(ck.id, 0), 1)?;
                let cv = kv_concat(model, a.inputs[2])?;
                let ok = ck.inputs[1] == k_rot && f32_4d(ck.inputs[0]) && f32_4d(cv.inputs[0]) && cv.id != ck.id;
                ok.then_some(RotaryAppends {
                    pair: id,
                    k_concat: ck.id,
                    v_concat: cv.id,
                    casts: None,
                    v: cv.inputs[1],
                })?
            } else {
                // float16 caches: the attention reads k_rot and v; each also goes Cast16 → Concat(past16, ·)
                let a = attention_at(k_rot, 1)?;
                let v = a.inputs[2];
                let (kc, ck) = f16_kv_append_of(model, outputs, k_rot)?;
                let (vc, cv) = f16_kv_append_of(model, outputs, v)?;
                let ok = readers.len() == 2 && f32_4d(v) && cv != ck;
                ok.then_some(RotaryAppends { pair: id, k_concat: ck, v_concat: cv, casts: Some((kc, vc)), v })?
            };
            let vn = model.node(m.v_concat);
            let independent = !depends_on(model, m.v_concat, id)
                && !depends_on(model, id, m.v_concat)
                && !depends_on(model, id, m.k_concat)
                && m.v.node != id;
            let buffers =
                kiln_wgsl::attention::ROTARY_APPEND_BUFFERS + r.config.has_positions as u32 + m.casts.is_some() as u32;
            (independent && vn.inputs.len() == 2 && buffers <= max_storage_buffers).then_some((
                m,
                r.clone(),
                chain.clone(),
            ))
        });
        let (m, r, chain) = found?;
        let (pair, ck, cv) = (model.node(m.pair), model.node(m.k_concat), model.node(m.v_concat));
        let cpu = |n: usize| model.node(n).op_as::<GpuOp>().map(|g| g.cpu.clone());
        let (ck_cpu, cv_cpu) = (cpu(ck.id)?, cpu(cv.id)?);
        // inputs: the pair's (q, cos, sin, positions, k), then past_k, v, past_v
        let mut inputs: Vec<OutletId> = pair.inputs.to_vec();
        let base = inputs.len() as u8;
        inputs.extend([ck.inputs[0], m.v, cv.inputs[0]]);
        let (rot_q, rot_k) = (chain.steps[0].clone(), chain.steps[1].clone());
        let mut members = vec![m.pair, m.k_concat, m.v_concat];
        let mut replaced = vec![OutletId::new(m.pair, 0)];
        let steps = match m.casts {
            // values: k_rot, q_rot, present_k, present_v
            None => vec![
                rot_k,
                rot_q,
                (ck_cpu, vec![Src::Input(base), Src::Step(0)]),
                (cv_cpu, vec![Src::Input(base + 2), Src::Input(base + 1)]),
            ],
            // values: v16, k_rot, k16, q_rot, k_rot, present_k, present_v
            Some((kc, vc)) => {
                members.extend([kc, vc]);
                replaced.push(OutletId::new(m.pair, 1));
                vec![
                    (cpu(vc)?, vec![Src::Input(base + 1)]),
                    rot_k.clone(),
                    (cpu(kc)?, vec![Src::Step(1)]),
                    rot_q,
                    rot_k,
                    (ck_cpu, vec![Src::Input(base), Src::Step(2)]),
                    (cv_cpu, vec![Src::Input(base + 2), Src::Step(0)]),
                ]
            }
        };
        replaced.extend([OutletId::new(m.k_concat, 0), OutletId::new(m.v_concat, 0)]);
        let chain = FusedChain { inputs: inputs.len(), steps, outputs: replaced.len() };
        let spec = kiln_wgsl::attention::RotarySpec { append: true, k_out: m.casts.is_some(), ..r };
        let name = format!("{}.kv", pair.name);
        let apply = move |model: &mut TypedModel| -> Result<()> {
            let op = GpuOp { kernel: Kernel::Rotary(spec), cpu: Box::new(chain) };
            replace_with(model, name, op, &inputs, &replaced, WHAT)
        };
        Some(Found { at: m.pair, members, apply: Box::new(apply) })
    })
}

/// Appends `chain`'s steps to `steps` with its inputs read from `map` (nested chains inlined, so that every step
/// has one output): the Srcs of its outputs.
fn inline_chain(steps: &mut Vec<(Box<dyn TypedOp>, Vec<Src>)>, chain: &FusedChain, map: &[Src]) -> Option<Vec<Src>> {
    // the values of the chain's steps, in order (a nested chain's are its outputs)
    let mut values: Vec<Src> = vec![];
    let mut firsts: Vec<Src> = vec![];
    for (op, srcs) in &chain.steps {
        let srcs: Vec<Src> = srcs
            .iter()
            .map(|s| match *s {
                Src::Input(i) => map.get(i as usize).copied(),
                Src::Step(j) => firsts.get(j as usize).copied(),
                Src::Leaf(_) => None,
            })
            .collect::<Option<_>>()?;
        if let Some(inner) = op.as_op().downcast_ref::<FusedChain>() {
            let outs = inline_chain(steps, inner, &srcs)?;
            firsts.push(*outs.first()?);
            values.extend(outs);
        } else {
            steps.push((op.clone(), srcs));
            let at = Src::Step(u8::try_from(steps.len() - 1).ok()?);
            firsts.push(at);
            values.push(at);
        }
    }
    values.get(values.len().checked_sub(chain.outputs)?..).map(|v| v.to_vec())
}

/// Joins a layer's q / k / v projections (a split GPU MatMulNBits, [`fuse_matmul_splits`]) with the rotation and
/// KV appends after them ([`fuse_rotary_appends`]) when each projection reaches the rotation only through its
/// head split (a reshape to `[batch, seq, heads, head]`) and transpose to `[batch, heads, seq, head]`: one node
/// ([`kiln_wgsl::qmatmul::QkvRope`]) whose decode step is one dispatch — the matvec's workgroups own both columns
/// of each rotated pair, rotate them and write q, and k and v into the caches' spare rows. Returns how many it
/// joined. Runs after [`fuse_rotary_appends`].
pub fn fuse_qkv_rotations(model: &mut TypedModel, max_storage_buffers: u32) -> Result<usize> {
    const WHAT: &str = "joining q/k/v projections with their rotation";
    batched(model, WHAT, |model, order, outputs| {
        let gpu = |n: usize| model.node(n).op_as::<GpuOp>();
        // the projection output and head size behind a rotation input `x`: MoveAxis ← View ← split output (`shared`:
        // the MoveAxis may have other readers, the float16 cache form's attention reading v)
        let head_split = |x: OutletId, shared: bool| -> Option<(OutletId, usize, usize, usize)> {
            let t = model.node(x.node);
            let is_move =
                matches!(gpu(t.id)?.kernel, Kernel::MoveAxis { from: 1, to: 2 } | Kernel::MoveAxis { from: 2, to: 1 });
            let v = model.node(t.inputs.first()?.node);
            let is_view = matches!(gpu(v.id)?.kernel, Kernel::View(_));
            let o = *v.inputs.first()?;
            let single =
                |n: &TypedNode| n.outputs[0].successors.len() == 1 && !outputs.contains(&OutletId::new(n.id, 0));
            let split = model.outlet_fact(OutletId::new(v.id, 0)).ok()?;
            let d = usize::try_from(split.shape.last()?.as_i64()?).ok()?;
            let ok = is_move
                && is_view
                && x.slot == 0
                && (shared && !outputs.contains(&x) || single(t))
                && single(v)
                && split.rank() == 4
                && model.outlet_fact(x).ok()?.rank() == 4
                && model.node(o.node).outputs[o.slot].successors.len() == 1
                && !outputs.contains(&o);
            ok.then_some((o, d, v.id, t.id))
        };
        let found = order.iter().find_map(|&id| {
            let rn = model.node(id);
            let Kernel::Rotary(r) = &gpu(id)?.kernel else { return None };
            // NeoX halves over whole heads, plain per-(batch, seq) positions or gathered caches
            let plain = |c: &kiln_wgsl::attention::RotaryConfig| !c.interleaved && !c.microsoft && !c.seqlens;
            if !r.append || !plain(&r.config) || !r.second.as_ref().is_some_and(plain) {
                return None;
            }
            let p = r.config.has_positions as usize;
            let (q, k) = (head_split(rn.inputs[0], false)?, head_split(rn.inputs[3 + p], false)?);
            // float16 caches (the rotation outputs k rotated): v's other readers then read the fused node's v
            let v = head_split(rn.inputs[5 + p], r.k_out)?;
            let v_out = model.node(v.3).outputs[0].successors.len() > 1;
            let split = q.0.node;
            let Kernel::QMatMul(mm) = &gpu(split)?.kernel else { return None };
            let same = [q.0, k.0, v.0] == [0, 1, 2].map(|slot| OutletId::new(split, slot));
            let d = q.1;
            let parts = mm.split_parts();
            let buffers = mm.storage_buffers().saturating_sub(2) + r.k_out as u32 + v_out as u32 + 4 + p as u32;
            let whole = |c: &kiln_wgsl::attention::RotaryConfig| c.rotary_dim == 0 || c.rotary_dim == d;
            let ok = same
                && whole(&r.config)
                && r.second.as_ref().is_some_and(whole)
                && k.1 == d
                && v.1 == d
                && d % 2 == 0
                && parts.len() == 3
                && parts.iter().all(|n| n % d == 0)
                && buffers <= max_storage_buffers;
            ok.then(|| (id, split, mm.clone(), r.clone(), d, [q.2, q.3, k.2, k.3, v.2, v.3], v_out))
        });
        let (rid, sid, mm, r, d, views, v_out) = found?;
        let (rn, sn) = (model.node(rid), model.node(sid));
        let p = r.config.has_positions as usize;
        let chain_of =
            |n: &TypedNode| n.op_as::<GpuOp>().and_then(|g| g.cpu.as_op().downcast_ref::<FusedChain>().cloned());
        let (s_chain, r_chain) = (chain_of(sn)?, chain_of(rn)?);
        // inputs: the split's, then cos, sin[, positions], past K, past V
        let mut inputs: Vec<OutletId> = sn.inputs.to_vec();
        let extra = |i: usize| Src::Input((sn.inputs.len() + i) as u8);
        inputs.extend(rn.inputs[1..3 + p].iter().copied());
        inputs.extend([rn.inputs[4 + p], rn.inputs[6 + p]]);
        let mut steps = vec![];
        let s_map: Vec<Src> = (0..sn.inputs.len()).map(|i| Src::Input(i as u8)).collect();
        let qkv = inline_chain(&mut steps, &s_chain, &s_map)?;
        // each projection through its view and transpose
        let mut t4 = vec![];
        for (i, pair) in views.chunks(2).enumerate() {
            let cpu = |n: usize| model.node(n).op_as::<GpuOp>().map(|g| g.cpu.clone());
            steps.push((cpu(pair[0])?, vec![*qkv.get(i)?]));
            steps.push((cpu(pair[1])?, vec![Src::Step((steps.len() - 1) as u8)]));
            t4.push(Src::Step((steps.len() - 1) as u8));
        }
        let mut r_map = vec![t4[0], extra(0), extra(1)];
        if p == 1 {
            r_map.push(extra(2));
        }
        r_map.extend([t4[1], extra(2 + p), t4[2], extra(3 + p)]);
        let outs = inline_chain(&mut steps, &r_chain, &r_map)?;
        let n_out = rn.outputs.len();
        if outs.len() != n_out {
            return None;
        }
        let mut replaced: Vec<OutletId> = (0..n_out).map(|slot| OutletId::new(rid, slot)).collect();
        if v_out {
            // v as [batch, heads, seq, head], the last output
            steps.push((Box::new(tract_onnx::tract_core::ops::identity::Identity), vec![t4[2]]));
            replaced.push(OutletId::new(views[5], 0));
        }
        if steps.len() > u8::MAX as usize {
            return None;
        }
        let chain = FusedChain { inputs: inputs.len(), steps, outputs: replaced.len() };
        let kernel = Kernel::QkvRope(Box::new(kiln_wgsl::qmatmul::QkvRope { q: mm, rope: r, head: d, v_out }));
        let name = format!("{}.rotated", sn.name);
        let mut members = vec![rid, sid];
        members.extend(views);
        let apply = move |model: &mut TypedModel| -> Result<()> {
            let op = GpuOp { kernel, cpu: Box::new(chain) };
            replace_with(model, name, op, &inputs, &replaced, WHAT)
        };
        Some(Found { at: rid, members, apply: Box::new(apply) })
    })
}

/// Folds an RMS norm (no skip, gamma or not) into the GPU MatMulNBits node that is its only reader (a layer's
/// q / k / v split, its gate / up, the LM head): the matmul kernel normalises A itself ([`QNorm`]), one dispatch
/// less per norm on a decode step. Returns how many it folded. Runs after [`fuse_matmul_splits`].
pub fn fuse_matmul_norms(model: &mut TypedModel, max_storage_buffers: u32) -> Result<usize> {
    const WHAT: &str = "folding a norm into a matmul";
    batched(model, WHAT, |model, order, outputs| {
        let found = order.iter().find_map(|&id| {
            let node = model.node(id);
            let Kernel::QMatMul(q) = &node.op_as::<GpuOp>()?.kernel else { return None };
            let a = node.inputs[0];
            let norm = model.node(a.node);
            let Kernel::Norm(n) = &norm.op_as::<GpuOp>()?.kernel else { return None };
            let o = &n.op;
            if !o.rms || o.has_skip || o.has_bias || o.has_beta || norm.inputs.len() != 1 + o.has_gamma as usize {
                return None;
            }
            if o.has_gamma {
                let gamma = model.outlet_fact(norm.inputs[1]).ok()?;
                let len: usize = gamma.shape.as_concrete()?.iter().product();
                if gamma.datum_type != DatumType::F32 || len != q.k {
                    return None;
                }
            }
            let sole = norm.outputs[0].successors.len() == 1 && node.inputs.iter().filter(|i| **i == a).count() == 1;
            let spec = QNorm { eps: o.eps.to_bits(), gamma: o.has_gamma };
            let kernel = kiln_wgsl::qmatmul::QMatMul { norm: Some(spec), ..q.clone() };
            (q.norm.is_none() && sole && !outputs.contains(&a) && kernel.storage_buffers() <= max_storage_buffers)
                .then_some((id, a.node, kernel))
        });
        let (id, norm_id, kernel) = found?;
        let (node, norm) = (model.node(id), model.node(norm_id));
        let cpu = |n: &TypedNode| n.op_as::<GpuOp>().map(|g| g.cpu.clone());
        let (norm_cpu, mm_cpu) = (cpu(norm)?, cpu(node)?);
        // inputs: the norm's input, the matmul's others, gamma
        let mut inputs: Vec<OutletId> = vec![norm.inputs[0]];
        inputs.extend(node.inputs[1..].iter().copied());
        let mut norm_srcs = vec![Src::Input(0)];
        if let Some(g) = norm.inputs.get(1) {
            norm_srcs.push(Src::Input(inputs.len() as u8));
            inputs.push(*g);
        }
        let mut mm_srcs = vec![Src::Step(0)];
        mm_srcs.extend((1..node.inputs.len()).map(|i| Src::Input(i as u8)));
        let chain = FusedChain {
            inputs: inputs.len(),
            steps: vec![(norm_cpu, norm_srcs), (mm_cpu, mm_srcs)],
            outputs: node.outputs.len(),
        };
        let name = format!("{}.normed", node.name);
        let replaced: Vec<OutletId> = (0..node.outputs.len()).map(|slot| OutletId::new(id, slot)).collect();
        let apply = move |model: &mut TypedModel| -> Result<()> {
            let op = GpuOp { kernel: Kernel::QMatMul(kernel), cpu: Box::new(chain) };
            replace_with(model, name, op, &inputs, &replaced, WHAT)
        };
        Some(Found { at: id, members: vec![id, norm_id], apply: Box::new(apply) })
    })
}

/// Turns each GPU float MatMul `A[.., K] · W` whose weight W is a constant (`[.., K, N]` or, transposed, `[.., N,
/// K]`, leading dims 1; K a multiple of 16) into the MatMulNBits kernels' float-weight form
/// ([`kiln_wgsl::qmatmul::QMatMul::for_float_weight`]): W stored transposed, `[N, K]` — as float16 when every value
/// is one (a float16 model's weights cast up by kiln's float16 pass: half the bytes, read exactly), else f32. The
/// one-row kernel then runs an fp32 model's decode projections, and the matmul fusions that follow (epilogues,
/// joined projections, norms, the rotation with the KV appends) apply to them as to 4-bit weights.
///
/// tract runs a `[b, s, K] · [K, N]` matmul on `[b·s, K]` between two reshapes (merge the leading axes, split them
/// back): the new node takes the unmerged input and makes the unmerged output, as MatMulNBits does, so the
/// projections of one input read one outlet (joined) and their outputs reach their Adds (residual epilogues)
/// directly. The CPU reference is the same matmul on the transposed weight (after its cast up). Returns how many
/// it turned.
pub fn float_matmuls_as_row_kernels(model: &mut TypedModel) -> Result<usize> {
    const WHAT: &str = "a float matmul as a row kernel";
    // one patch per matmul, applied and compacted before the next: the host holds a weight and its transposed
    // copy one weight at a time, not the model's weights twice
    let names: Vec<String> =
        model.eval_order().map_err(tract_err(WHAT))?.iter().map(|id| model.node(*id).name.clone()).collect();
    let mut done = 0;
    let mut shared = SharedWeights::default();
    for name in names {
        let Ok(id) = model.node_id_by_name(&name) else { continue };
        if let Some(patch) = float_matmul_as_row_kernel(model, id, &mut shared)? {
            apply_compacted(patch, model, WHAT)?;
            done += 1;
        }
    }
    Ok(done)
}

/// The transposed weights made for a weight several matmuls read (layers sharing their weights): by the weight
/// (held, so its address stays its own) and how it was laid out, the name of the node uploading the copy — the
/// other readers take the same copy instead of one each.
#[derive(Default)]
struct SharedWeights(Vec<(Arc<Tensor>, WeightLayout, String)>);

/// How a transposed weight was laid out: W given transposed, the unfolded (D, H) of a transposed K, the rank.
type WeightLayout = (bool, Option<[usize; 2]>, usize);

/// A GPU view (a reshape: the memory order unchanged) that keeps its input's last axis, so every row of it is a row
/// of its input: leading axes merged, split, added or removed.
fn keeps_last_axis(model: &TypedModel, n: &TypedNode) -> bool {
    let (Some(Kernel::View(_)), [i]) = (n.op_as::<GpuOp>().map(|g| &g.kernel), n.inputs.as_slice()) else {
        return false;
    };
    let Ok(f) = model.outlet_fact(*i) else { return false };
    f.shape.last().is_some() && f.shape.last() == n.outputs[0].fact.shape.last()
}

/// W (`[1.., K, N]`, or `[1.., N, K]` when `transpose_b`) as the row kernel reads it: `[1.., N, K]` of `rank`
/// (`[n, rank]`), its K rows from `d·H + h` back to `h·D + d` when `unfold` gives (D, H), as `dt`.
fn transposed_weight(
    w: &Tensor,
    transpose_b: bool,
    unfold: Option<[usize; 2]>,
    [n, rank]: [usize; 2],
    dt: DatumType,
) -> Result<Tensor> {
    const WHAT: &str = "a float matmul's weight transposed";
    let r = w.rank();
    let mut wt = if transpose_b { w.clone() } else { w.clone().move_axis(r - 1, r - 2).map_err(tract_err(WHAT))? };
    if let Some([d, h]) = unfold {
        let shape = wt.shape().to_vec();
        wt = wt
            .into_shape(&[n, d, h])
            .and_then(|t| t.move_axis(2, 1))
            .and_then(|t| t.into_shape(&shape))
            .map_err(tract_err(WHAT))?;
    }
    while wt.rank() < rank {
        wt.insert_axis(0).map_err(tract_err(WHAT))?;
    }
    while wt.rank() > rank {
        wt.remove_axis(0).map_err(tract_err(WHAT))?;
    }
    Ok(wt.cast_to_dt(dt).map_err(tract_err(WHAT))?.into_owned())
}

/// tract's fold of a transpose into a matmul's K, as it lowers an attention output `[b, H, s, D]` transposed to
/// `[b, s, H, D]` and merged to `[b, s, H·D]` before the o-projection: it moves H last instead (`[b, s, D, H]`, a
/// copy even where s = 1) and permutes the weight's K rows to `d·H + h`. Found on the row kernel's A (`a`): the
/// fold's reshape of the last two axes, views that keep the last axis, and the MoveAxis of an axis to the end;
/// returns its input X, the moved axis, (D, H) and the leading dims of the MoveAxis's output.
fn transposed_k(model: &TypedModel, a: OutletId) -> Option<(OutletId, usize, [usize; 2], TVec<TDim>)> {
    use tract_onnx::tract_hir::internal::DimLike;
    let fold = model.node(a.node);
    let Some(Kernel::View(kiln_wgsl::View::Reshape { at, from_len: 2, to })) = fold.op_as::<GpuOp>().map(|g| &g.kernel)
    else {
        return None;
    };
    let folded = model.outlet_fact(*fold.inputs.first()?).ok()?;
    let r = folded.rank();
    if r < 3 || *at != r - 2 || to.len() != 1 {
        return None;
    }
    let (d, h) = (folded.shape[r - 2].to_usize().ok()?, folded.shape[r - 1].to_usize().ok()?);
    let mut up = fold.inputs[0];
    loop {
        let n = model.node(up.node);
        match n.op_as::<GpuOp>().map(|g| &g.kernel) {
            Some(Kernel::MoveAxis { from, to }) => {
                let x = model.outlet_fact(*n.inputs.first()?).ok()?;
                let rx = x.rank();
                let moved_last = *to == rx - 1 && *from < rx - 1;
                let dims_fit = x.shape[*from].to_usize().ok() == Some(h) && x.shape[rx - 1].to_usize().ok() == Some(d);
                let out = &n.outputs[0].fact.shape;
                return (moved_last && dims_fit)
                    .then(|| (n.inputs[0], *from, [d, h], out.iter().take(rx - 2).cloned().collect()));
            }
            _ if keeps_last_axis(model, n) => up = n.inputs[0],
            _ => return None,
        }
    }
}

/// The patch turning node `id` into the float-weight row kernel ([`float_matmuls_as_row_kernels`]), when it is a
/// GPU float MatMul with a constant weight the kernel takes.
fn float_matmul_as_row_kernel(
    model: &TypedModel,
    id: usize,
    shared: &mut SharedWeights,
) -> Result<Option<TypedModelPatch>> {
    use kiln_wgsl::ops::ToDevice;
    use tract_onnx::tract_core::ops::einsum::prefix_matmul::PrefixMatMul;
    use tract_onnx::tract_core::ops::konst::Const;
    const WHAT: &str = "a float matmul as a row kernel";
    let node = model.node(id);
    let Some(g) = node.op_as::<GpuOp>() else { return Ok(None) };
    let Kernel::MatMul { transpose_a: false, transpose_b, transpose_c: false, exact: false } = g.kernel else {
        return Ok(None);
    };
    let Some(mm) = g.cpu.as_op().downcast_ref::<PrefixMatMul>() else { return Ok(None) };
    if node.inputs.len() != 2 || node.inputs[0] == node.inputs[1] {
        return Ok(None);
    }
    // a streamed weight reaches the matmul through the unit axes tract adds (folded into a constant, views here)
    let mut b = node.inputs[1];
    while let Some(Kernel::View(kiln_wgsl::View::AddAxis(_))) = model.node(b.node).op_as::<GpuOp>().map(|g| &g.kernel) {
        b = model.node(b.node).inputs[0];
    }
    let b = if model.node(b.node).op_is::<ToDevice>()
        && model.node(model.node(b.node).inputs[0].node).op_is::<ExternalWeight>()
    {
        b
    } else {
        node.inputs[1]
    };
    let to_device = model.node(b.node);
    if !to_device.op_is::<ToDevice>() {
        return Ok(None);
    }
    let konst = model.node(to_device.inputs[0].node);
    // the weight: a constant (transposed here to the kernel's [N, K]), or a weight streamed from the model's data:
    // as stored when the matmul reads it transposed (a tied LM head: the embedding table is [N, K]), else transposed
    // as it is uploaded (Layout::Transposed; not where tract folded an attention's heads into K: kiln_graph's import
    // reads such weights into memory)
    let streamed = konst.op_as::<ExternalWeight>().filter(|w| {
        w.slice.is_none()
            && matches!(
                (w.layout, w.stored_datum_type()),
                (Layout::F16ToF32, Ok(DatumType::F16)) | (Layout::Plain, Ok(DatumType::F32))
            )
    });
    let (w, shape) = match (konst.op_as::<Const>(), streamed) {
        (Some(c), _) => (Some(c.val().clone()), c.val().shape().to_vec()),
        (None, Some(_)) => {
            let f = model.outlet_fact(node.inputs[1]).map_err(tract_err(WHAT))?;
            let Some(dims) = f.shape.as_concrete() else { return Ok(None) };
            // broadcast over A's leading axes: unit axes in front (the same stored bytes)
            let a_rank = model.outlet_fact(node.inputs[0]).map_err(tract_err(WHAT))?.rank();
            let mut dims = dims.to_vec();
            while dims.len() < a_rank {
                dims.insert(0, 1);
            }
            (None, dims)
        }
        _ => return Ok(None),
    };
    let readers = to_device.outputs[0].successors.len() + konst.outputs[0].successors.len() - 1;
    let r = shape.len();
    let f32_const = w.as_ref().is_none_or(|w| w.datum_type() == DatumType::F32);
    if !f32_const || r < 2 || shape[..r - 2].iter().any(|d| *d != 1) {
        return Ok(None);
    }
    let (k, n) = if transpose_b { (shape[r - 1], shape[r - 2]) } else { (shape[r - 2], shape[r - 1]) };
    let a = model.outlet_fact(node.inputs[0]).map_err(tract_err(WHAT))?;
    if a.datum_type != DatumType::F32 || a.rank() != r || a.shape.last() != Some(&k.to_dim()) {
        return Ok(None);
    }
    let exact16 = match (&w, streamed) {
        (Some(w), _) => {
            let Ok(plain) = w.try_as_plain_ram() else { return Ok(None) };
            let Ok(values) = plain.as_slice::<f32>() else { return Ok(None) };
            values.iter().all(|v| v.is_nan() || f16::from_f32(*v).to_f32() == *v)
        }
        (None, Some(sw)) => sw.layout == Layout::F16ToF32,
        (None, None) => return Ok(None),
    };
    let dt = if exact16 { DatumType::F16 } else { DatumType::F32 };
    let Ok(kernel) = kiln_wgsl::qmatmul::QMatMul::for_float_weight(k, n, dt) else { return Ok(None) };
    let outputs: HashSet<OutletId> = model.output_outlets().map_err(tract_err(WHAT))?.iter().copied().collect();
    // the views after the product that keep its last axis (tract's split of merged leading axes, its removal of
    // unit ones), each the only reader of the one before: the new node makes their result itself
    let mut views = vec![];
    let mut end = OutletId::new(id, 0);
    loop {
        let succ = &model.node(end.node).outputs[end.slot].successors;
        if succ.len() != 1 || outputs.contains(&end) {
            break;
        }
        let v = model.node(succ[0].node);
        if !keeps_last_axis(model, v) || v.outputs[0].fact.rank() < 2 {
            break;
        }
        views.push(v.id);
        end = OutletId::new(v.id, 0);
    }
    let out_shape = model.outlet_fact(end).map_err(tract_err(WHAT))?.shape.clone();
    let rank = out_shape.len();
    // its A: an outlet up A's chain of such views with the leading dims of that result, else those views applied
    // to A (reusing the same views another projection of this A made: projections of one input then read one
    // outlet, and join)
    // tract's transposed K: the heads moved before the last axis instead, the weight's rows permuted back
    let unfold = transposed_k(model, node.inputs[0])
        .filter(|(_, _, _, lead)| lead.len() + 1 == rank && lead.iter().eq(out_shape.iter().take(rank - 1)));
    // a streamed weight as stored, with the leading unit axes of the kernel's rank
    let stored_dims: TVec<usize> =
        std::iter::repeat_n(1, rank.saturating_sub(2)).chain(if transpose_b { [n, k] } else { [k, n] }).collect();
    if streamed.is_some() && (unfold.is_some() || rank < 2 || (!transpose_b && dt == DatumType::F16 && k % 2 == 1)) {
        // (a float16 matrix transposed at upload is written in rows of whole words)
        return Ok(None);
    }
    let mut up = node.inputs[0];
    let found = loop {
        if unfold.is_some() {
            break None;
        }
        let f = model.outlet_fact(up).map_err(tract_err(WHAT))?;
        if f.rank() == rank && f.shape.iter().take(rank - 1).eq(out_shape.iter().take(rank - 1)) {
            break Some(up);
        }
        let p = model.node(up.node);
        if !keeps_last_axis(model, p) {
            break None;
        }
        up = p.inputs[0];
    };
    let mut patch = TypedModelPatch::default();
    let a = match (found, &unfold) {
        (_, Some((x, from, [d, h], _))) => {
            use tract_onnx::tract_core::ops::change_axes::AxisOp;
            let x_rank = model.outlet_fact(*x).map_err(tract_err(WHAT))?.rank();
            let x = patch.tap_model(model, *x).map_err(tract_err(WHAT))?;
            let moved = GpuOp {
                kernel: Kernel::MoveAxis { from: *from, to: x_rank - 2 },
                cpu: Box::new(AxisOp::Move(*from, x_rank - 2)),
            };
            let x = patch.wire_node(format!("{}.heads_first", node.name), moved, &[x]).map_err(tract_err(WHAT))?[0];
            let merged = GpuOp {
                kernel: Kernel::View(kiln_wgsl::View::Reshape { at: x_rank - 2, from_len: 2, to: vec![k.to_dim()] }),
                cpu: Box::new(AxisOp::Reshape(x_rank - 2, tvec![h.to_dim(), d.to_dim()], tvec![k.to_dim()])),
            };
            patch.wire_node(format!("{}.heads_merged", node.name), merged, &[x]).map_err(tract_err(WHAT))?[0]
        }
        (Some(x), None) => patch.tap_model(model, x).map_err(tract_err(WHAT))?,
        (None, None) => {
            let mut at = node.inputs[0];
            let mut wired: Option<OutletId> = None;
            for v in &views {
                let vn = model.node(*v);
                let op = vn.op_as::<GpuOp>().cloned().ok_or_else(|| Error::invalid_model(WHAT))?;
                let same = wired.is_none().then(|| {
                    model.node(at.node).outputs[at.slot].successors.iter().find(|s| {
                        let other = model.node(s.node);
                        other.name.ends_with(".rows_in")
                            && other.op_as::<GpuOp>().is_some_and(|g| g.kernel == op.kernel)
                    })
                });
                match (same.flatten(), wired) {
                    (Some(s), None) => at = OutletId::new(s.node, 0),
                    (_, w) => {
                        let input = match w {
                            Some(w) => w,
                            None => patch.tap_model(model, at).map_err(tract_err(WHAT))?,
                        };
                        let name = format!("{}.rows_in", vn.name);
                        wired = Some(patch.wire_node(name, op, &[input]).map_err(tract_err(WHAT))?[0]);
                    }
                }
            }
            match wired {
                Some(w) => w,
                None => patch.tap_model(model, at).map_err(tract_err(WHAT))?,
            }
        }
    };
    let layout = (transpose_b, unfold.as_ref().map(|u| u.2), rank);
    let made = shared
        .0
        .iter()
        .find(|(t, l, _)| w.as_ref().is_some_and(|w| Arc::ptr_eq(t, w)) && *l == layout)
        .and_then(|(_, _, name)| model.node_id_by_name(name).ok());
    let wt = match (made, w, streamed) {
        (Some(up), _, _) => patch.tap_model(model, OutletId::new(up, 0)).map_err(tract_err(WHAT))?,
        (None, None, Some(sw)) => {
            // stored [1.., N, K] (the kernel's layout) or [1.., K, N] (transposed as it is uploaded); float16
            // data stays float16
            let layout = if transpose_b { Layout::Plain } else { Layout::Transposed };
            let stored = ExternalWeight { layout, dims: stored_dims, ..sw.clone() };
            let stored = patch.wire_node(format!("{}.wt", node.name), stored, &[]).map_err(tract_err(WHAT))?;
            patch.wire_node(format!("{}.wt.to_device", node.name), ToDevice, &stored).map_err(tract_err(WHAT))?[0]
        }
        (None, None, None) => return Ok(None),
        (None, Some(w), _) => {
            let wt = transposed_weight(&w, transpose_b, unfold.as_ref().map(|u| u.2), [n, rank], dt)?;
            let c = patch.add_const(format!("{}.wt", node.name), wt).map_err(tract_err(WHAT))?;
            let name = format!("{}.wt.to_device", node.name);
            if readers > 1 {
                shared.0.push((w.clone(), layout, name.clone()));
            }
            patch.wire_node(name, ToDevice, &[c]).map_err(tract_err(WHAT))?[0]
        }
    };
    let matmul = PrefixMatMul { transpose_b: true, ..*mm };
    let steps: Vec<(Box<dyn TypedOp>, Vec<Src>)> = if exact16 {
        vec![
            (Box::new(tract_onnx::tract_core::ops::cast::cast(DatumType::F32)), vec![Src::Input(1)]),
            (Box::new(matmul), vec![Src::Input(0), Src::Step(0)]),
        ]
    } else {
        vec![(Box::new(matmul), vec![Src::Input(0), Src::Input(1)])]
    };
    let op = GpuOp { kernel: Kernel::QMatMul(kernel), cpu: Box::new(FusedChain { inputs: 2, steps, outputs: 1 }) };
    wire_replacing(&mut patch, model, format!("{}.rows", node.name), op, &[a, wt], &[end], WHAT)?;
    Ok(Some(patch))
}

/// Gives every matmul on the row / tiled kernels (MatMulNBits, the float-weight projections, their fusions) and
/// every fused attention float16 products ([`kiln_wgsl::qmatmul::QMatMul::f16_math`],
/// [`kiln_wgsl::attention::AttentionSpec::f16_math`]): a float16 model on an adapter with shader-f16
/// ([`crate::passes::float16_math`]). MatMulNBits with accuracy_level 4 keeps its int8 scheme. Returns how many.
pub fn kernels_in_f16_math(model: &mut TypedModel) -> usize {
    let mut n = 0;
    for node in model.nodes_mut() {
        let Some(g) = node.op_as::<GpuOp>() else { continue };
        let Some(kernel) = g.kernel.with_f16_math() else { continue };
        node.op = Box::new(GpuOp { kernel, cpu: g.cpu.clone() });
        n += 1;
    }
    n
}

/// Weights this large or larger are considered for [`matmul_weights_in_f16`] (bytes of their f32 values).
const F16_WEIGHT_MIN_BYTES: usize = 1 << 20;

/// A weight [`matmul_weights_in_f16`] keeps float16: a constant, or a streamed float16 weight read as f32.
enum Weight16 {
    Const(Arc<Tensor>),
    Streamed(ExternalWeight),
}

/// Keeps float16 the f32 weights of GPU MatMuls whose every value is a float16 (a float16 model's weights, cast to
/// f32 by kiln's float16 pass: a tied LM head, dense projections; or streamed float16 weights whose cast
/// [`crate::stream::fold_external_casts`] folded into the upload): the GPU stores them as float16 and the kernels
/// convert as they read, exactly — half the bytes to read a step (SmolLM2's 49152 × 576 LM head: 113 MB → 57 MB).
/// Only weights all of whose readers are such MatMuls; the CPU reference of each becomes `Cast(f32)` then the
/// matmul. Returns how many weights it rewrote.
pub fn matmul_weights_in_f16(model: &mut TypedModel) -> Result<usize> {
    use kiln_wgsl::ops::ToDevice;
    use tract_onnx::tract_core::ops::konst::Const;
    let mut done = 0;
    loop {
        let outputs: HashSet<OutletId> =
            model.output_outlets().map_err(tract_err("model outputs"))?.iter().copied().collect();
        let found = model.nodes().iter().find_map(|n| {
            if !n.op_is::<ToDevice>() || outputs.contains(&OutletId::new(n.id, 0)) {
                return None;
            }
            let source = model.node(n.inputs[0].node);
            // a streamed float16 weight read as f32 (its cast folded into the upload): float16 by construction
            let streamed = source.op_as::<ExternalWeight>().filter(|w| w.layout == Layout::F16ToF32);
            let weight = match (source.op_as::<Const>(), streamed) {
                (Some(k), _) => Weight16::Const(k.val().clone()),
                (None, Some(w)) => Weight16::Streamed(w.clone()),
                _ => return None,
            };
            let (dt, len) = match &weight {
                Weight16::Const(k) => (k.datum_type(), k.len()),
                Weight16::Streamed(w) => (DatumType::F32, w.fact().ok()?.shape.as_concrete()?.iter().product()),
            };
            if dt != DatumType::F32 || len * 4 < F16_WEIGHT_MIN_BYTES {
                return None;
            }
            let succ = &n.outputs[0].successors;
            let all_matmuls = !succ.is_empty()
                && succ.iter().all(|s| {
                    let m = model.node(s.node);
                    s.slot == 1
                        && m.inputs.len() == 2
                        && m.inputs[0] != m.inputs[1]
                        && matches!(m.op_as::<GpuOp>().map(|g| &g.kernel), Some(Kernel::MatMul { exact: false, .. }))
                });
            if !all_matmuls {
                return None;
            }
            let exact = match &weight {
                Weight16::Const(k) => {
                    let values = k.try_as_plain_ram().ok()?;
                    values.as_slice::<f32>().ok()?.iter().all(|v| v.is_nan() || f16::from_f32(*v).to_f32() == *v)
                }
                Weight16::Streamed(_) => true,
            };
            exact.then_some((n.id, weight))
        });
        let Some((to_device, weight)) = found else { break };
        let mut patch = TypedModelPatch::default();
        let name = model.node(to_device).name.clone();
        let c = match weight {
            Weight16::Const(k) => {
                let k16 = k.cast_to_dt(DatumType::F16).map_err(tract_err("a float16 weight"))?.into_owned();
                patch.add_const(format!("{name}.f16"), k16).map_err(tract_err("a float16 weight"))?
            }
            Weight16::Streamed(w) => patch
                .wire_node(format!("{name}.f16"), w.with_layout(Layout::Plain), &[])
                .map_err(tract_err("a float16 weight"))?[0],
        };
        let w =
            patch.wire_node(format!("{name}.f16.to_device"), ToDevice, &[c]).map_err(tract_err("a float16 weight"))?[0];
        for s in model.node(to_device).outputs[0].successors.clone() {
            let m = model.node(s.node);
            let Some(g) = m.op_as::<GpuOp>() else { break };
            let chain = FusedChain {
                inputs: 2,
                steps: vec![
                    (Box::new(tract_onnx::tract_core::ops::cast::cast(DatumType::F32)), vec![Src::Input(1)]),
                    (g.cpu.clone(), vec![Src::Input(0), Src::Step(0)]),
                ],
                outputs: 1,
            };
            let a = patch.tap_model(model, m.inputs[0]).map_err(tract_err("a float16 weight"))?;
            let op = GpuOp { kernel: g.kernel.clone(), cpu: Box::new(chain) };
            let replaced = [OutletId::new(m.id, 0)];
            wire_replacing(&mut patch, model, format!("{}.f16", m.name), op, &[a, w], &replaced, "a float16 weight")?;
        }
        apply_compacted(patch, model, "a float16 weight")?;
        done += 1;
    }
    Ok(done)
}
