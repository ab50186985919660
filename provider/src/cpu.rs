//! The CPU backend: tract's plan over the (optimised) typed model.
//!
//! A model with custom operators (`kiln_ops::host_op::HostOp` nodes) runs node by node in the plan's order
//! ([`CpuBackend::run_stepwise`]): tract computes every other node (`SimpleState::compute_one`, as the GPU backend
//! does for its CPU nodes), and at a host node the session awaits the application's callback, checks what it
//! returned against the node's output facts and binds the runtime symbols of its output shapes before going on.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use kiln_graph::tract_onnx::prelude::*;
use kiln_graph::tract_onnx::tract_core::internal::{bail, ensure};
use kiln_graph::tract_onnx::tract_core::ops::konst::Const;
use kiln_graph::tract_onnx::tract_core::plan::{SimplePlan, SimpleState};
use kiln_graph::tract_onnx::tract_core::runtime::RunOptions;
use kiln_graph::{Error, ErrorKind, Model, Result};
use kiln_ops::host_op::HostOp;

use crate::custom_op::CustomOpRegistration;
use crate::session::{guard, SessionOptions};
use crate::tensor::Tensor;

type Plan = Arc<TypedSimplePlan>;

pub(crate) struct CpuBackend {
    model: Arc<Model>,
    /// The model as planned (gathers guarded).
    typed: Arc<TypedModel>,
    options: RunOptions,
    full: Plan,
    subsets: Mutex<HashMap<Vec<usize>, Plan>>,
    /// The application's custom operators, when the model has host nodes.
    custom_ops: Vec<CustomOpRegistration>,
}

/// True when the model has nodes a custom operator computes.
pub(crate) fn has_host_ops(model: &TypedModel) -> bool {
    model.nodes().iter().any(|n| n.op_is::<HostOp>())
}

type TractTensor = kiln_graph::tract_onnx::prelude::Tensor;

/// Binds the symbols of an output fact's dims from a computed shape; with `strict`, a dim that disagrees with what
/// is already bound (a declared symbol, a fixed size) is an error.
fn bind_symbols(state: &mut TypedSimpleState, fact: &TypedFact, shape: &[usize], strict: bool) -> TractResult<()> {
    for (d, v) in fact.shape.iter().zip(shape) {
        let v = *v as i64;
        if let TDim::Sym(s) = d {
            match state.turn_state.resolved_symbols.get(s) {
                None => {
                    state.turn_state.resolved_symbols.set(s, v);
                    if state.turn_state.scenario.is_none() {
                        if let Some(scope) = s.scope() {
                            state.turn_state.scenario = scope.guess_scenario(&state.turn_state.resolved_symbols)?;
                        }
                    }
                }
                Some(bound) if strict && bound != v => {
                    bail!("dim `{s}` is {v} here but {bound} elsewhere in this run (shape {shape:?})")
                }
                _ => {}
            }
        } else if strict {
            if let Ok(want) = d.eval(&state.turn_state.resolved_symbols).to_i64() {
                ensure!(want == v, "dim {d} should be {want}, got {v} (shape {shape:?})");
            }
        }
    }
    Ok(())
}

impl CpuBackend {
    pub(crate) fn new(model: Arc<Model>, options: &SessionOptions) -> Result<CpuBackend> {
        #[cfg(not(target_arch = "wasm32"))]
        let run_options = RunOptions {
            executor: options
                .intra_op_num_threads
                .filter(|n| *n > 1)
                .map(tract_linalg::multithread::Executor::multithread),
            ..RunOptions::default()
        };
        #[cfg(target_arch = "wasm32")]
        let run_options = {
            let _ = options;
            RunOptions::default()
        };
        // tract's Gather indexes without bounds checks: an out-of-range index must be an error, not a panic (a trap
        // in wasm)
        let mut typed = model.typed.clone();
        kiln_ops::checked_gather::guard_gathers(&mut typed)
            .map_err(|e| Error::from_tract(ErrorKind::InvalidModel, "guarding gathers", &e))?;
        let typed = Arc::new(typed);
        let full = SimplePlan::new_with_options((*typed).clone(), &run_options)
            .map_err(|e| Error::from_tract(ErrorKind::InvalidModel, "planning the model", &e))?;
        let custom_ops = if has_host_ops(&typed) {
            for node in typed.nodes() {
                if let Some(op) = node.op_as::<HostOp>() {
                    if !options.custom_ops.iter().any(|r| r.matches(&op.info)) {
                        return Err(Error::invalid_model(format!(
                            "{}: no such custom operator registered",
                            op.info.describe()
                        )));
                    }
                }
            }
            options.custom_ops.clone()
        } else {
            vec![]
        };
        Ok(CpuBackend { model, typed, options: run_options, full, subsets: Mutex::new(HashMap::new()), custom_ops })
    }

    pub(crate) fn has_host_ops(&self) -> bool {
        !self.custom_ops.is_empty()
    }

    fn compute_one(&self, state: &mut TypedSimpleState, id: usize) -> TractResult<()> {
        #[cfg(not(target_arch = "wasm32"))]
        if let Some(executor) = &self.options.executor {
            return tract_linalg::multithread::multithread_tract_scope(executor.clone(), || state.compute_one(id));
        }
        state.compute_one(id)
    }

    /// Runs the plan node by node, awaiting the custom operators' callbacks at host nodes.
    pub(crate) async fn run_stepwise(&self, inputs: Vec<Tensor>, outputs: &[usize]) -> Result<Vec<Tensor>> {
        let plan = self.plan_for(outputs)?;
        let model = plan.model();
        let order: Vec<usize> = plan.order_without_consts().to_vec();
        // the step after which each value is no longer needed (model outputs are kept)
        let mut last_use: HashMap<usize, usize> = HashMap::new();
        for (step, &n) in order.iter().enumerate() {
            for i in &model.node(n).inputs {
                last_use.insert(i.node, step);
            }
        }
        for o in &model.outputs {
            last_use.insert(o.node, usize::MAX);
        }
        let tvalues: TVec<TValue> = inputs.into_iter().map(|t| t.into_tract().into_tvalue()).collect();
        let mut state = guard("running the model", || {
            let mut state =
                SimpleState::new(&plan).map_err(|e| Error::from_tract(ErrorKind::Runtime, "starting a run", &e))?;
            state
                .set_inputs(tvalues)
                .map_err(|e| Error::from_tract(ErrorKind::InvalidArgument, "feeding the inputs", &e))?;
            Ok(state)
        })?;
        for (step, &id) in order.iter().enumerate() {
            let node = model.node(id);
            if let Some(op) = node.op_as::<HostOp>() {
                let what = op.info.describe();
                let ins = state.prepare_inputs(id).map_err(|e| Error::from_tract(ErrorKind::Runtime, &what, &e))?;
                let mut tensors = vec![];
                for v in ins {
                    tensors.push(Tensor::from_tract(v.into_tensor())?);
                }
                let reg = self
                    .custom_ops
                    .iter()
                    .rev()
                    .find(|r| r.matches(&op.info))
                    .ok_or_else(|| Error::runtime(format!("{what}: no such custom operator registered")))?;
                let outs = reg.op.compute(&op.info, tensors).await.map_err(|e| {
                    let message = if e.message.contains(&what) { e.message } else { format!("{what}: {}", e.message) };
                    Error::new(e.kind, message)
                })?;
                let outs: Vec<TractTensor> = outs.into_iter().map(|t| t.into_tract()).collect();
                op.check_outputs(&outs).map_err(|e| Error::runtime(format!("{e:#}")))?;
                for (ix, (fact, v)) in op.facts.iter().zip(&outs).enumerate() {
                    bind_symbols(&mut state, fact, v.shape(), true).map_err(|e| {
                        Error::runtime(format!(
                            "{what}: output `{}`: {e:#}",
                            op.info.outputs.get(ix).cloned().unwrap_or_default()
                        ))
                    })?;
                }
                state.turn_state.values[id] = Some(outs.into_iter().map(|t| t.into_tvalue()).collect());
            } else {
                guard("running the model", || {
                    self.compute_one(&mut state, id)
                        .map_err(|e| Error::from_tract(ErrorKind::Runtime, "running the model", &e))?;
                    if let Some(vs) = state.turn_state.values[id].clone() {
                        for (o, v) in node.outputs.iter().zip(vs.iter()) {
                            bind_symbols(&mut state, &o.fact, v.shape(), false)
                                .map_err(|e| Error::from_tract(ErrorKind::Runtime, "running the model", &e))?;
                        }
                    }
                    Ok(())
                })?;
            }
            for i in &node.inputs {
                if last_use.get(&i.node) == Some(&step) && !model.node(i.node).op_is::<Const>() {
                    state.turn_state.values[i.node] = None;
                }
            }
        }
        let results =
            state.outputs().map_err(|e| Error::from_tract(ErrorKind::Runtime, "collecting the outputs", &e))?;
        results.into_iter().map(|v| Tensor::from_tract(v.into_tensor())).collect()
    }

    fn plan_for(&self, outputs: &[usize]) -> Result<Plan> {
        if outputs.len() == self.model.outputs.len() && outputs.iter().enumerate().all(|(i, o)| i == *o) {
            return Ok(self.full.clone());
        }
        let mut cache = self.subsets.lock().map_err(|_| Error::runtime("plan cache poisoned"))?;
        if let Some(p) = cache.get(outputs) {
            return Ok(p.clone());
        }
        let mut typed = (*self.typed).clone();
        let outlets: Vec<OutletId> = outputs.iter().map(|o| typed.outputs[*o]).collect();
        typed
            .select_output_outlets(&outlets)
            .map_err(|e| Error::from_tract(ErrorKind::Runtime, "selecting outputs", &e))?;
        let plan = SimplePlan::new_with_options(typed, &self.options)
            .map_err(|e| Error::from_tract(ErrorKind::Runtime, "planning the selected outputs", &e))?;
        cache.insert(outputs.to_vec(), plan.clone());
        Ok(plan)
    }

    pub(crate) fn run(&self, inputs: Vec<Tensor>, outputs: &[usize]) -> Result<Vec<Tensor>> {
        let plan = self.plan_for(outputs)?;
        let inputs: TVec<TValue> = inputs.into_iter().map(|t| t.into_tract().into_tvalue()).collect();
        let results = plan.run(inputs).map_err(|e| Error::from_tract(ErrorKind::Runtime, "running the model", &e))?;
        results.into_iter().map(|v| Tensor::from_tract(v.into_tensor())).collect()
    }
}
