//! Elementwise fusion on the lowered model: each maximal tree of GPU elementwise nodes (unary, binary, Where on f32
//! and bools) whose inner results feed only the tree becomes one [`GpuOp`] with a [`Kernel::Fused`] program, so
//! the chain runs as one dispatch and its intermediates never reach memory. The replaced ops stay as the node's
//! CPU reference ([`FusedChain`]). The placement report is unchanged (it describes the source model's nodes).

use std::collections::{HashMap, HashSet};

use kiln_wgsl::fused::{FusedChain, FusedProgram, Src, Step, MAX_FUSED_INPUTS, MAX_FUSED_STEPS};
use kiln_wgsl::ops::GpuOp;
use kiln_wgsl::Kernel;
use tract_onnx::prelude::*;

use crate::error::{Error, ErrorKind, Result};

fn tract_err(what: &str) -> impl Fn(TractError) -> Error + '_ {
    move |e| Error::from_tract(ErrorKind::InvalidModel, what, &e)
}

/// The step a node computes, when it is a fusable GPU elementwise node (operands filled in later).
fn step_of(model: &TypedModel, node: &TypedNode) -> Option<Step> {
    let op = node.op_as::<GpuOp>()?;
    let float_like = |dt: DatumType| matches!(dt, DatumType::F32 | DatumType::Bool);
    if node.outputs.len() != 1 || !float_like(node.outputs[0].fact.datum_type) {
        return None;
    }
    for i in &node.inputs {
        if !float_like(model.outlet_fact(*i).ok()?.datum_type) {
            return None;
        }
    }
    let x = Src::Input(0);
    match &op.kernel {
        Kernel::Unary(kiln_wgsl::UnaryOp::Cast { .. }) => None,
        Kernel::Unary(u) if node.inputs.len() == 1 => Some(Step::Unary(*u, x)),
        Kernel::Binary(b) if node.inputs.len() == 2 => Some(Step::Binary(*b, x, x)),
        Kernel::Where if node.inputs.len() == 3 => Some(Step::Where(x, x, x)),
        _ => None,
    }
}

/// Fuses every group of two or more elementwise GPU nodes; returns how many fused nodes it made.
pub fn fuse_elementwise(model: &mut TypedModel) -> Result<usize> {
    let order = model.eval_order().map_err(tract_err("ordering the lowered model"))?;
    let outputs: HashSet<OutletId> =
        model.output_outlets().map_err(tract_err("model outputs"))?.iter().copied().collect();
    let fusable: HashSet<usize> = order.iter().copied().filter(|&n| step_of(model, model.node(n)).is_some()).collect();
    // a fusable node folds into its consumer when that consumer is its only use and is fusable too
    let folds_into = |n: usize| -> Option<usize> {
        let node = model.node(n);
        let succ = &node.outputs[0].successors;
        if succ.len() != 1 || outputs.contains(&OutletId::new(n, 0)) {
            return None;
        }
        fusable.contains(&succ[0].node).then_some(succ[0].node)
    };
    let position: HashMap<usize, usize> = order.iter().enumerate().map(|(i, n)| (*n, i)).collect();
    let mut groups: Vec<(usize, Vec<usize>)> = vec![];
    for &sink in &order {
        if !fusable.contains(&sink) || folds_into(sink).is_some() {
            continue;
        }
        let mut members = vec![sink];
        let mut stack = vec![sink];
        while let Some(n) = stack.pop() {
            for i in &model.node(n).inputs {
                if fusable.contains(&i.node) && folds_into(i.node) == Some(n) && !members.contains(&i.node) {
                    members.push(i.node);
                    stack.push(i.node);
                }
            }
        }
        if members.len() >= 2 {
            members.sort_by_key(|n| position[n]);
            groups.push((sink, members));
        }
    }
    let mut remap: HashMap<OutletId, OutletId> = HashMap::new();
    let mut fused = 0;
    for (sink, members) in groups {
        let Some((program, chain, externals)) = build(model, &members) else { continue };
        let mut patch = TypedModelPatch::default();
        let mut taps = tvec![];
        for e in &externals {
            let e = remap.get(e).copied().unwrap_or(*e);
            taps.push(patch.tap_model(model, e).map_err(tract_err("fusing elementwise nodes"))?);
        }
        let name = model.node(sink).name.clone();
        let op = GpuOp { kernel: Kernel::Fused(Box::new(program)), cpu: Box::new(chain) };
        let out = patch.wire_node(name, op, &taps).map_err(tract_err("fusing elementwise nodes"))?[0];
        patch.shunt_outside(model, OutletId::new(sink, 0), out).map_err(tract_err("fusing elementwise nodes"))?;
        let before = model.nodes().len();
        patch.apply(model).map_err(tract_err("fusing elementwise nodes"))?;
        // the patch appends the fused node; later groups reading the old sink read it instead
        if model.nodes().len() > before {
            remap.insert(OutletId::new(sink, 0), OutletId::new(model.nodes().len() - 1, 0));
        }
        fused += 1;
    }
    if fused > 0 {
        model.compact().map_err(tract_err("compacting the fused model"))?;
    }
    Ok(fused)
}

/// The program, its CPU reference and its external inputs for `members` (in evaluation order, sink last), or
/// `None` when the group exceeds the kernel's limits.
fn build(model: &TypedModel, members: &[usize]) -> Option<(FusedProgram, FusedChain, Vec<OutletId>)> {
    if members.len() > MAX_FUSED_STEPS {
        return None;
    }
    let mut externals: Vec<OutletId> = vec![];
    let mut steps = vec![];
    let mut cpu_steps = vec![];
    let step_index: HashMap<usize, u8> = members.iter().enumerate().map(|(i, n)| (*n, i as u8)).collect();
    for &n in members {
        let node = model.node(n);
        let mut srcs = vec![];
        for i in &node.inputs {
            let s = match step_index.get(&i.node) {
                Some(k) if i.slot == 0 => Src::Step(*k),
                _ => {
                    let k = match externals.iter().position(|e| e == i) {
                        Some(k) => k,
                        None => {
                            externals.push(*i);
                            externals.len() - 1
                        }
                    };
                    Src::Input(k as u8)
                }
            };
            srcs.push(s);
        }
        let step = match (step_of(model, node)?, srcs.as_slice()) {
            (Step::Unary(u, _), [a]) => Step::Unary(u, *a),
            (Step::Binary(b, _, _), [x, y]) => Step::Binary(b, *x, *y),
            (Step::Where(..), [c, a, b]) => Step::Where(*c, *a, *b),
            _ => return None,
        };
        steps.push(step);
        cpu_steps.push((node.op_as::<GpuOp>()?.cpu.clone(), srcs));
    }
    if externals.is_empty() || externals.len() > MAX_FUSED_INPUTS {
        return None;
    }
    let out_dt = model.node(*members.last()?).outputs[0].fact.datum_type;
    let program = FusedProgram::new(externals.len(), steps, out_dt);
    program.check().ok()?;
    Some((program, FusedChain { inputs: externals.len(), steps: cpu_steps }, externals))
}
