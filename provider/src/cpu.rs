//! The CPU backend: tract's plan over the (optimised) typed model.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use kiln_graph::tract_onnx::prelude::*;
use kiln_graph::tract_onnx::tract_core::plan::SimplePlan;
use kiln_graph::tract_onnx::tract_core::runtime::RunOptions;
use kiln_graph::{Error, ErrorKind, Model, Result};

use crate::session::SessionOptions;
use crate::tensor::Tensor;

type Plan = Arc<TypedSimplePlan>;

pub(crate) struct CpuBackend {
    model: Arc<Model>,
    /// The model as planned (gathers guarded).
    typed: Arc<TypedModel>,
    options: RunOptions,
    full: Plan,
    subsets: Mutex<HashMap<Vec<usize>, Plan>>,
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
        Ok(CpuBackend { model, typed, options: run_options, full, subsets: Mutex::new(HashMap::new()) })
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
