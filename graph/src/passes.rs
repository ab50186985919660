//! kiln's rewrite passes over tract's typed model.

use tract_onnx::prelude::*;

use crate::error::{Error, ErrorKind, Result};
use crate::import::{Model, OptimizationLevel};

/// Runs the passes the optimisation level asks for.
/// `f16_fused`: [`f16_fused_attention`]'s switch; `f16_math`: [`float16_math`]'s.
pub fn run(model: &mut Model, level: OptimizationLevel, f16_fused: bool, f16_math: bool) -> Result<()> {
    // Every level declutters: tract's typed model as imported cannot always run (symbolic shape arithmetic is only
    // resolved by declutter), and float16 arithmetic in float32 is how onnxruntime's CPU kernels compute, not a
    // graph optimisation. `Disabled` stops there.
    if crate::float16::compute_in_f32(&mut model.typed)
        .map_err(|e| Error::from_tract(ErrorKind::InvalidModel, "computing float16 in float32", &e))?
    {
        model
            .pass_log
            .push("float16 computation runs in float32 (inputs/outputs stay float16), as onnxruntime's CPU".into());
        model.typed.properties.insert(FLOAT16_MATH.into(), Arc::new(tensor0(f16_math)));
    }
    // a float16 model's KV concatenations (`present = Cast16(Concat(..))`) are no model outputs once computed in
    // float32, so tract's declutter would split the attention's matmul over them (ConcatThenEinsum), and the GPU
    // lowering (which loads at Basic) could no longer fuse that attention, nor read the cache in place: during
    // declutter they are kept as extra outputs, as a float32 model's concatenations are. The full level (the
    // CPU's) is left as it was.
    let outputs = model.typed.outputs.len();
    if f16_fused {
        model.typed.properties.insert(F16_FUSED_ATTENTION.into(), Arc::new(tensor0(true)));
    }
    if level != OptimizationLevel::All && f16_fused_attention(&model.typed) {
        protect_f16_output_concats(&mut model.typed);
    }
    let guarded = crate::symbolic::declutter(&mut model.typed);
    model.typed.outputs.truncate(outputs);
    let guarded = guarded.map_err(|e| Error::from_tract(ErrorKind::InvalidModel, "decluttering the model", &e))?;
    if !guarded.is_empty() {
        model.pass_log.push(format!("declutter withheld on {guarded:?} (symbolic uniform operand)"));
    }
    // the generation helpers' slices stay where they were put; their barriers go
    kiln_ops::slice_barrier::remove(&mut model.typed)
        .map_err(|e| Error::from_tract(ErrorKind::InvalidModel, "removing slice barriers", &e))?;
    if level == OptimizationLevel::Disabled {
        return fold_external_casts(model);
    }
    let untied = crate::untie::untie_matmul_constants(&mut model.typed)
        .map_err(|e| Error::from_tract(ErrorKind::InvalidModel, "untying matmul constants", &e))?;
    model.pass_log.extend(untied);
    let gathers = crate::untie::gather_before_cast(&mut model.typed)
        .map_err(|e| Error::from_tract(ErrorKind::InvalidModel, "moving gathers before casts", &e))?;
    model.pass_log.extend(gathers);
    fold_external_casts(model)?;
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

/// Streamed float16 weights cast to float32 are read as float32 (crate::stream).
fn fold_external_casts(model: &mut Model) -> Result<()> {
    let folded = crate::stream::fold_external_casts(&mut model.typed)
        .map_err(|e| Error::from_tract(ErrorKind::InvalidModel, "folding casts of streamed weights", &e))?;
    model.pass_log.extend(folded);
    Ok(())
}

/// The model property set on a float16 model (its float16 computation translated to float32 by
/// [`crate::float16::compute_in_f32`]): true when its GPU lowering gives its matmuls and attention float16 products
/// where the adapter has shader-f16 ([`float16_math`]), false when the load options turned that off.
pub const FLOAT16_MATH: &str = "kiln.float16_math";

/// Environment variable that, set to `0`, keeps a float16 model's GPU matmuls and attention in f32 arithmetic on
/// an adapter with shader-f16 (as on one without), unless the load options say otherwise
/// (`LoadOptions::f16_math`, kiln-provider's `SessionOptions::gpu_f16_math`).
pub const F16_MATH_ENV: &str = "KILN_GPU_F16_MATH";

/// Whether the GPU lowering computes the matmuls and attention of `model` with float16 products where the adapter
/// has shader-f16 (kiln_wgsl's `QMatMul::f16_math`, `AttentionSpec::f16_math`): a float16 model whose load options
/// left it on (the default: products in f16 as onnxruntime-web's WebGPU kernels compute float16 models; f32 with
/// `LoadOptions::f16_math` `Some(false)`, KILN_GPU_F16_MATH=0 or kiln-web's `extra.kiln.f16Math: false`).
pub fn float16_math(model: &TypedModel) -> bool {
    model.properties.get(FLOAT16_MATH).is_some_and(|t| t.cast_to_scalar::<bool>().unwrap_or(false))
}

/// The model property that turns [`f16_fused_attention`] on (set at import from `LoadOptions::f16_fused_attention`).
pub const F16_FUSED_ATTENTION: &str = "kiln.f16_fused_attention";

/// Whether float16 models get the fused attention and the KV cache appended in place on the GPU: the default
/// since 12-01 (off with `LoadOptions::f16_fused_attention` / `SessionOptions::gpu_f16_fused_attention`
/// `Some(false)`, KILN_GPU_F16_FUSED_ATTENTION=0, kiln-web `extra: { kiln: { f16FusedAttention: false } }`). It cuts SmolLM2 q4f16's decode step by ~12 dispatches
/// a layer (lavapipe: 861 → 291) and makes the step O(new tokens); natively on lavapipe (with and without
/// shader-f16) SmolLM2 passes its teacher-forced check with it and its decode step is the closer one to the CPU
/// provider's (provider/tests/gpu_quant.rs). In Chrome on SwiftShader SmolLM2's prefill argmax on
/// bench/browser_decode.mjs's prompt is 253 with it, 1811 without and on onnxruntime-web: a float16 tie, not a
/// wrong result — onnxruntime's logits there are 20.328 (1811) and 20.156 (253), kiln-web's 20.25 and 20.25 (the
/// first index wins), and layer by layer kiln-web 'webgpu' with it is as close to onnxruntime as kiln-web 'wasm' is.
pub fn f16_fused_attention(model: &TypedModel) -> bool {
    model.properties.get(F16_FUSED_ATTENTION).is_some_and(|t| t.cast_to_scalar::<bool>().unwrap_or(false))
}

/// Adds to the model's outputs each Concat whose result only reaches an output through a cast to float16.
fn protect_f16_output_concats(model: &mut TypedModel) {
    use tract_onnx::tract_core::ops::array::TypedConcat;
    use tract_onnx::tract_core::ops::cast::Cast;
    let mut extra = vec![];
    for o in &model.outputs {
        let node = model.node(o.node);
        let down = node.op_as::<Cast>().is_some_and(|c| c.to == DatumType::F16);
        if let (true, [i]) = (down, node.inputs.as_slice()) {
            if model.node(i.node).op_is::<TypedConcat>() && !model.outputs.contains(i) && !extra.contains(i) {
                extra.push(*i);
            }
        }
    }
    model.outputs.extend(extra);
}

/// The typed model's nodes, for reports: (name, op name).
pub fn node_summary(model: &TypedModel) -> Vec<(String, String)> {
    model.nodes().iter().map(|n| (n.name.clone(), n.op.name().to_string())).collect()
}
