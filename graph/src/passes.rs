//! kiln's rewrite passes over tract's typed model.

use tract_onnx::prelude::*;

use crate::error::{Error, ErrorKind, Result};
use crate::import::{Model, OptimizationLevel};

/// Runs the passes the optimisation level asks for.
pub fn run(model: &mut Model, level: OptimizationLevel) -> Result<()> {
    // Every level declutters: tract's typed model as imported cannot always run (symbolic shape arithmetic is only
    // resolved by declutter), and float16 arithmetic in float32 is how onnxruntime's CPU kernels compute, not a
    // graph optimisation. `Disabled` stops there.
    if crate::float16::compute_in_f32(&mut model.typed)
        .map_err(|e| Error::from_tract(ErrorKind::InvalidModel, "computing float16 in float32", &e))?
    {
        model
            .pass_log
            .push("float16 computation runs in float32 (inputs/outputs stay float16), as onnxruntime's CPU".into());
    }
    let guarded = crate::symbolic::declutter(&mut model.typed)
        .map_err(|e| Error::from_tract(ErrorKind::InvalidModel, "decluttering the model", &e))?;
    if !guarded.is_empty() {
        model.pass_log.push(format!("declutter withheld on {guarded:?} (symbolic uniform operand)"));
    }
    if level == OptimizationLevel::Disabled {
        return Ok(());
    }
    let untied = crate::untie::untie_matmul_constants(&mut model.typed)
        .map_err(|e| Error::from_tract(ErrorKind::InvalidModel, "untying matmul constants", &e))?;
    model.pass_log.extend(untied);
    let gathers = crate::untie::gather_before_cast(&mut model.typed)
        .map_err(|e| Error::from_tract(ErrorKind::InvalidModel, "moving gathers before casts", &e))?;
    model.pass_log.extend(gathers);
    if level == OptimizationLevel::All {
        // CPU only (the GPU lowering loads at Basic and knows tract's Softmax): onnxruntime's softmax arithmetic
        let n = kiln_ops::softmax::use_ort_softmax(&mut model.typed)
            .map_err(|e| Error::from_tract(ErrorKind::InvalidModel, "swapping softmax kernels", &e))?;
        if n > 0 {
            model.pass_log.push(format!("{n} softmax node(s) use onnxruntime's CPU arithmetic"));
        }
        model.typed.optimize().map_err(|e| Error::from_tract(ErrorKind::InvalidModel, "optimising the model", &e))?;
    }
    Ok(())
}

/// The typed model's nodes, for reports: (name, op name).
pub fn node_summary(model: &TypedModel) -> Vec<(String, String)> {
    model.nodes().iter().map(|n| (n.name.clone(), n.op.name().to_string())).collect()
}
