//! kiln's rewrite passes over tract's typed model.

use tract_onnx::prelude::*;

use crate::error::{Error, ErrorKind, Result};
use crate::import::{Model, OptimizationLevel};

/// Runs the passes the optimisation level asks for.
pub fn run(model: &mut Model, level: OptimizationLevel) -> Result<()> {
    if level == OptimizationLevel::Disabled {
        return Ok(());
    }
    let guarded = crate::symbolic::declutter(&mut model.typed)
        .map_err(|e| Error::from_tract(ErrorKind::InvalidModel, "decluttering the model", &e))?;
    if !guarded.is_empty() {
        model.pass_log.push(format!("declutter withheld on {guarded:?} (symbolic uniform operand)"));
    }
    if level == OptimizationLevel::All {
        model.typed.optimize().map_err(|e| Error::from_tract(ErrorKind::InvalidModel, "optimising the model", &e))?;
    }
    Ok(())
}

/// The typed model's nodes, for reports: (name, op name).
pub fn node_summary(model: &TypedModel) -> Vec<(String, String)> {
    model.nodes().iter().map(|n| (n.name.clone(), n.op.name().to_string())).collect()
}
