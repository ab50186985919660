//! GPU lowering: a rewrite of the typed tract model, the way tract's own GPU backends translate nodes. Each node
//! with a WGSL kernel becomes a [`GpuOp`] (carrying the op it replaces as its CPU reference), explicit
//! [`ToDevice`] / [`ToHost`] transfers mark the edges of CPU islands, and every other node keeps its tract op, to be
//! evaluated on the CPU. The result is still a tract model (it evaluates on the CPU exactly as before), which
//! kiln-provider's GPU executor runs.

use std::collections::HashMap;

use kiln_wgsl::ops::{kernel_for, GpuOp, ToDevice, ToHost};
use kiln_wgsl::{Caps, Kernel};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::array::{Gather, TypedConcat};
use tract_onnx::tract_core::ops::einsum::prefix_matmul::{rewrite_einsum_to_prefix_matmul, PrefixMatMul};
use tract_onnx::tract_core::ops::konst::Const;
use tract_onnx::tract_core::ops::source::TypedSource;

use kiln_ops::external_weight::{ExternalWeight, Layout};

use crate::error::{Error, ErrorKind, Result};

/// Where a node runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Device {
    Gpu,
    Cpu,
}

/// One compute node of the lowered model: its device and, for the CPU, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePlacement {
    pub node: String,
    /// The tract op the node had before lowering.
    pub op: String,
    pub device: Device,
    pub reason: Option<String>,
}

/// The lowered model and the placement of each of the source model's compute nodes.
#[derive(Debug, Clone)]
pub struct Lowered {
    pub model: TypedModel,
    pub placement: Vec<NodePlacement>,
}

impl Lowered {
    pub fn gpu_nodes(&self) -> usize {
        self.placement.iter().filter(|p| p.device == Device::Gpu).count()
    }
    /// The matmul and attention kernels that multiply in float16 (a float16 model on an adapter with shader-f16:
    /// [`crate::fuse_gpu::kernels_in_f16_math`]).
    pub fn f16_kernels(&self) -> usize {
        self.model
            .nodes()
            .iter()
            .filter(|n| n.op_as::<kiln_wgsl::ops::GpuOp>().is_some_and(|g| g.kernel.f16_math()))
            .count()
    }
    /// Transfer nodes in the lowered model: (to device, to host).
    pub fn transfers(&self) -> (usize, usize) {
        let to_dev = self.model.nodes().iter().filter(|n| n.op_is::<ToDevice>()).count();
        let to_host = self.model.nodes().iter().filter(|n| n.op_is::<ToHost>()).count();
        (to_dev, to_host)
    }
}

fn tract_err(what: &str) -> impl Fn(TractError) -> Error + '_ {
    move |e| Error::from_tract(ErrorKind::InvalidModel, what, &e)
}

/// Lowers a decluttered (not optimised) typed model for an adapter with `caps`.
pub fn lower(model: &TypedModel, caps: &Caps) -> Result<Lowered> {
    let mut src = model.clone();
    rewrite_einsum_to_prefix_matmul(&mut src, true).map_err(tract_err("rewriting einsums as matmuls"))?;
    split_large_weights(&mut src, caps)?;
    kiln_wgsl::quant::split_dynamic_quantize(&mut src).map_err(tract_err("splitting DynamicQuantizeLinear"))?;
    kiln_wgsl::quant::pack_matmul_integer_weights(&mut src).map_err(tract_err("packing MatMulInteger weights"))?;
    kiln_wgsl::attention::split_attention(&mut src).map_err(tract_err("splitting attention nodes"))?;
    // float16 models' attention split over the KV concat by declutter: merged back and fused only with the opt-in
    // (crate::passes::f16_fused_attention; SmolLM2's decode step then drifts from its prefill by 0.34 mean |logit|
    // instead of 0.07 — not understood yet)
    if crate::passes::f16_fused_attention(model) {
        kiln_wgsl::attention::unsplit_concat_matmuls(&mut src).map_err(tract_err("merging concat-split matmuls"))?;
    }
    kiln_wgsl::attention::fuse_decomposed_attention(&mut src).map_err(tract_err("fusing decomposed attention"))?;
    if std::env::var("KILN_GPU_FUSION").map_or(true, |v| v != "0") {
        crate::fuse_norm::fuse_residual_rms_norm(&mut src).map_err(tract_err("fusing residual norms"))?;
        crate::fuse_rope::fuse_rotate_half_rope(&mut src).map_err(tract_err("fusing rotate_half RoPE"))?;
    }
    kiln_wgsl::kv::unrepeat_attention_kv(&mut src).map_err(tract_err("reading attention's K / V unrepeated"))?;
    // float16 models: the fused attention reads the f16 past itself, and the KV concatenation is in f16 (appended in
    // place into the cache's store)
    kiln_wgsl::kv::attention_reads_f16_past(&mut src).map_err(tract_err("reading the float16 past in attention"))?;
    kiln_wgsl::kv::concat_kv_in_f16(&mut src).map_err(tract_err("concatenating float16 KV caches in float16"))?;
    kiln_wgsl::kv::attention_reads_f16_kv(&mut src).map_err(tract_err("reading float16 K / V in attention"))?;
    crate::int_dims::rewrite(&mut src).map_err(tract_err("rewriting shape arithmetic as i64"))?;
    let mut target = TypedModel { symbols: src.symbols.clone(), ..TypedModel::default() };
    let mut host: HashMap<OutletId, OutletId> = HashMap::new();
    let mut dev: HashMap<OutletId, OutletId> = HashMap::new();
    let mut placement = vec![];
    let order = src.eval_order().map_err(tract_err("ordering the model"))?;
    let mut kernels = placement_plan(&src, &order, caps);
    if src.nodes().iter().any(|n| n.op_is::<kiln_wgsl::quant::DynQuantParams>()) {
        // per-tensor dynamic quantization turns every ulp by which a float kernel's rounding differs from
        // onnxruntime's CPU into flipped uint8 codes that compound over the layers: such models get the kernels with
        // onnxruntime's arithmetic (float MatMul, Softmax, LayerNormalization) where the plain ones are faster but
        // round differently
        for k in kernels.values_mut() {
            if let Some(exact) = k.as_ref().ok().and_then(Kernel::exact_arithmetic) {
                *k = Ok(exact);
            }
        }
    }
    for id in order {
        let node = src.node(id);
        if node.op_is::<TypedSource>() {
            let fact = node.outputs[0].fact.clone();
            let o = target.add_source(&node.name, fact).map_err(tract_err("copying a source"))?;
            host.insert(OutletId::new(id, 0), o);
            continue;
        }
        let is_const = node.op_is::<Const>() || node.op_is::<ExternalWeight>();
        let kernel = kernels.get(&id).cloned().unwrap_or_else(|| Err("constant".to_string()));
        match kernel {
            Ok(kernel) => {
                let mut inputs = tvec![];
                for i in &node.inputs {
                    inputs.push(device_wire(&src, &mut target, &mut host, &mut dev, *i)?);
                }
                let op = GpuOp { kernel, cpu: node.op.clone() };
                let outs = target.wire_node(&node.name, op, &inputs).map_err(tract_err("wiring a GPU node"))?;
                dev.insert(OutletId::new(id, 0), outs[0]);
                placement.push(NodePlacement {
                    node: node.name.clone(),
                    op: node.op.name().to_string(),
                    device: Device::Gpu,
                    reason: None,
                });
            }
            Err(reason) => {
                let mut inputs = tvec![];
                for i in &node.inputs {
                    inputs.push(host_wire(&src, &mut target, &mut host, &dev, *i)?);
                }
                let outs =
                    target.wire_node(&node.name, node.op.clone(), &inputs).map_err(tract_err("copying a CPU node"))?;
                for (slot, o) in outs.iter().enumerate() {
                    host.insert(OutletId::new(id, slot), *o);
                }
                if !is_const {
                    placement.push(NodePlacement {
                        node: node.name.clone(),
                        op: node.op.name().to_string(),
                        device: Device::Cpu,
                        reason: Some(reason),
                    });
                }
            }
        }
    }
    let mut inputs = vec![];
    for i in src.input_outlets().map_err(tract_err("model inputs"))? {
        let h = match host.get(i) {
            Some(h) => *h,
            // an input no output depends on
            None => {
                let node = src.node(i.node);
                target.add_source(&node.name, node.outputs[0].fact.clone()).map_err(tract_err("copying a source"))?
            }
        };
        inputs.push(h);
    }
    let mut outputs = vec![];
    for o in src.output_outlets().map_err(tract_err("model outputs"))?.to_vec() {
        outputs.push(host_wire(&src, &mut target, &mut host, &dev, o)?);
    }
    target.inputs = inputs;
    target.outputs = outputs;
    target.properties.clone_from(&src.properties);
    // KILN_GPU_FUSION=0 keeps one dispatch per node (comparisons, debugging)
    if std::env::var("KILN_GPU_FUSION").map_or(true, |v| v != "0") {
        crate::fuse_gpu::float_matmuls_as_row_kernels(&mut target)?;
        crate::fuse_gpu::fuse_matmul_epilogues(&mut target, caps.max_storage_buffers)?;
        crate::fuse_gpu::fuse_matmul_splits(&mut target, caps.max_storage_buffers)?;
        crate::fuse_gpu::fuse_matmul_norms(&mut target, caps.max_storage_buffers)?;
        crate::fuse_gpu::fuse_rotary_pairs(&mut target, caps.max_storage_buffers)?;
        crate::fuse_gpu::fuse_rotary_appends(&mut target, caps.max_storage_buffers)?;
        crate::fuse_gpu::fuse_qkv_rotations(&mut target, caps.max_storage_buffers)?;
        crate::fuse_gpu::outer_products_as_muls(&mut target)?;
        crate::fuse_gpu::fuse_gather_casts(&mut target)?;
        crate::fuse_gpu::fuse_elementwise(&mut target)?;
    }
    crate::fuse_gpu::matmul_weights_in_f16(&mut target)?;
    if caps.shader_f16 && crate::passes::float16_math(model) {
        crate::fuse_gpu::kernels_in_f16_math(&mut target);
    }
    Ok(Lowered { model: target, placement })
}

/// Each compute node's kernel, or why it stays on the CPU. A cheap node (data movement, casts, comparisons,
/// elementwise) whose inputs all come from the host and whose result a CPU node needs stays on the CPU too: on
/// the GPU it would cost an upload, a readback and a submit in the middle of the run, for no gain. Repeated until
/// nothing changes, so host-side chains (shape and mask arithmetic) stay whole.
fn placement_plan(
    src: &TypedModel,
    order: &[usize],
    caps: &Caps,
) -> HashMap<usize, std::result::Result<Kernel, String>> {
    let mut kernels: HashMap<usize, std::result::Result<Kernel, String>> = HashMap::new();
    for &id in order {
        let node = src.node(id);
        if node.op_is::<TypedSource>() || node.op_is::<Const>() || node.op_is::<ExternalWeight>() {
            continue;
        }
        kernels.insert(id, kernel_for(src, node, caps));
    }
    let on_gpu =
        |k: &HashMap<usize, std::result::Result<Kernel, String>>, n: usize| k.get(&n).is_some_and(|k| k.is_ok());
    loop {
        let mut changed = false;
        for &id in order {
            let cheap = match kernels.get(&id) {
                Some(Ok(k)) => {
                    !matches!(
                        k,
                        Kernel::MatMul { .. }
                            | Kernel::QMatMul(_)
                            | Kernel::Softmax { .. }
                            | Kernel::Reduce { .. }
                            | Kernel::RmsNorm { .. }
                            | Kernel::Norm(_)
                            | Kernel::OrtLayerNorm(_)
                            | Kernel::Attention(_)
                    ) && !matches!(k, Kernel::Quant(q) if q.is_heavy())
                }
                _ => false,
            };
            if !cheap {
                continue;
            }
            let node = src.node(id);
            let host_inputs = node.inputs.iter().all(|i| !on_gpu(&kernels, i.node));
            let cpu_consumer = node.outputs.iter().any(|o| {
                o.successors.iter().any(|s| !on_gpu(&kernels, s.node) && !src.node(s.node).op_is::<TypedSource>())
            });
            if host_inputs && cpu_consumer {
                kernels.insert(id, Err("host-side chain (inputs and consumers on the CPU)".into()));
                changed = true;
            }
        }
        if !changed {
            return kernels;
        }
    }
}

fn device_wire(
    src: &TypedModel,
    target: &mut TypedModel,
    host: &mut HashMap<OutletId, OutletId>,
    dev: &mut HashMap<OutletId, OutletId>,
    outlet: OutletId,
) -> Result<OutletId> {
    if let Some(d) = dev.get(&outlet) {
        return Ok(*d);
    }
    let h = *host.get(&outlet).ok_or_else(|| Error::invalid_model("lowering: an input is not computed yet"))?;
    let name = format!("{}.to_device.{}", src.node(outlet.node).name, outlet.slot);
    let d = target.wire_node(name, ToDevice, &[h]).map_err(tract_err("wiring a transfer"))?[0];
    dev.insert(outlet, d);
    Ok(d)
}

fn host_wire(
    src: &TypedModel,
    target: &mut TypedModel,
    host: &mut HashMap<OutletId, OutletId>,
    dev: &HashMap<OutletId, OutletId>,
    outlet: OutletId,
) -> Result<OutletId> {
    if let Some(h) = host.get(&outlet) {
        return Ok(*h);
    }
    let d = *dev.get(&outlet).ok_or_else(|| Error::invalid_model("lowering: an input is not computed yet"))?;
    let name = format!("{}.to_host.{}", src.node(outlet.node).name, outlet.slot);
    let h = target.wire_node(name, ToHost, &[d]).map_err(tract_err("wiring a transfer"))?[0];
    host.insert(outlet, h);
    Ok(h)
}

/// A constant whose bytes live on the GPU only (uploaded when the session was created): the host keeps its fact
/// (element type, shape), not its data. The GPU executor never evaluates it (its only consumers are [`ToDevice`]
/// transfers, served by the uploaded buffer); evaluating it on the CPU is an error.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DeviceConst {
    pub fact: TypedFact,
}

impl Op for DeviceConst {
    fn name(&self) -> StaticName {
        "DeviceConst".into()
    }
    op_as_typed_op!();
}

impl EvalOp for DeviceConst {
    not_out_of_plan!();
    fn eval(&self, _ctx: &EvalContext, _inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        bail!("this constant lives on the GPU only; it has no host value")
    }
}

impl TypedOp for DeviceConst {
    as_op!();
    fn output_facts(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(self.fact.clone()))
    }
}

/// The constants of a lowered model that only feed [`ToDevice`] transfers (and are no model output): once their
/// bytes are on the GPU, the host does not need them.
pub fn device_only_constants(model: &TypedModel) -> Vec<usize> {
    let outputs: Vec<OutletId> = model.outputs.clone();
    model
        .nodes()
        .iter()
        .filter(|n| n.op_is::<Const>() && n.outputs.len() == 1 && !outputs.contains(&OutletId::new(n.id, 0)))
        .filter(|n| {
            let succ = &n.outputs[0].successors;
            !succ.is_empty() && succ.iter().all(|s| model.node(s.node).op_is::<ToDevice>())
        })
        .map(|n| n.id)
        .collect()
}

/// Replaces each constant node of `nodes` with a [`DeviceConst`] of the same fact (without its value), so the model
/// no longer holds the tensor. Returns the bytes released (counted once per tensor).
pub fn drop_host_constants(model: &mut TypedModel, nodes: &[usize]) -> u64 {
    let mut released = 0u64;
    for &id in nodes {
        let Some(node) = model.nodes.get_mut(id) else { continue };
        let Some(k) = node.op_as::<Const>() else { continue };
        released += (k.val().len() * k.val().datum_type().size_of()) as u64;
        let Some(out) = node.outputs.get_mut(0) else { continue };
        let fact = out.fact.without_value();
        out.fact = fact.clone();
        node.op = Box::new(DeviceConst { fact });
    }
    released
}

/// Bytes of the constant tensors a model holds on the host (each distinct tensor counted once).
pub fn host_constant_bytes(model: &TypedModel) -> u64 {
    let mut seen = std::collections::HashSet::new();
    let mut total = 0u64;
    for n in model.nodes() {
        if let Some(k) = n.op_as::<Const>() {
            if seen.insert(Arc::as_ptr(k.val()) as usize) {
                total += (k.val().len() * k.val().datum_type().size_of()) as u64;
            }
        }
    }
    total
}

/// A weight [`split_large_weights`] cuts: a constant, or one streamed from external data (with its output dims).
enum Weight {
    Const(Arc<Tensor>),
    External(ExternalWeight, TVec<usize>),
}

impl Weight {
    fn shape(&self) -> &[usize] {
        match self {
            Weight::Const(t) => t.shape(),
            Weight::External(_, shape) => shape,
        }
    }
    fn rank(&self) -> usize {
        self.shape().len()
    }
    fn len(&self) -> usize {
        self.shape().iter().product()
    }
    fn datum_type(&self) -> DatumType {
        match self {
            Weight::Const(t) => t.datum_type(),
            Weight::External(w, _) => w.output().map(|o| o.0).unwrap_or(DatumType::U8),
        }
    }
}

/// The largest tensor one GPU binding can hold, in bytes.
pub fn binding_limit(caps: &Caps) -> u64 {
    caps.max_storage_binding.min(caps.max_buffer_size)
}

/// Splits constant weights larger than the adapter's storage binding limit, so their nodes still run on the GPU:
/// a MatMul's constant operand is cut along N (or M, for a constant left operand) into chunks under the limit, one
/// matmul per chunk, the results concatenated; a Gather's constant table is cut along a non-gathered axis (the
/// embedding dimension of a `[vocab, hidden]` table), one gather per chunk, concatenated — no chunk repeats work.
/// A weight that cannot be cut under the limit is left whole (its node stays on the CPU: "shape too large").
pub fn split_large_weights(model: &mut TypedModel, caps: &Caps) -> Result<()> {
    let limit = binding_limit(caps);
    let order = model.eval_order().map_err(tract_err("ordering the model"))?;
    for id in order {
        let node = model.node(id);
        let konst = |slot: usize| -> Option<Weight> {
            let input = node.inputs.get(slot)?;
            let src = model.node(input.node);
            let (weight, dt, bytes) = if let Some(k) = src.op_as::<Const>() {
                let t = k.val();
                if !t.is_plain() {
                    return None;
                }
                (Weight::Const(t.clone()), t.datum_type(), (t.len() * t.datum_type().size_of()) as u64)
            } else if let Some(w) = src.op_as::<ExternalWeight>() {
                // a weight streamed from external data: its parts are read from the source (kiln_graph::stream)
                if w.slice.is_some() || matches!(w.layout, Layout::Words | Layout::Transposed) {
                    return None;
                }
                let (dt, shape) = w.output().ok()?;
                let bytes = (shape.iter().product::<usize>() * dt.size_of()) as u64;
                (Weight::External(w.clone(), shape), dt, bytes)
            } else {
                return None;
            };
            // f32 weights, and f16 tables (kept f16 for their gathers: kiln_wgsl::f16)
            let dt_ok = matches!(dt, DatumType::F32 | DatumType::F16);
            (bytes > limit && dt_ok).then_some(weight)
        };
        let plan = if let Some(mm) = node.op_as::<PrefixMatMul>() {
            // the matmul kernel is f32
            let konst = |slot: usize| konst(slot).filter(|t| t.datum_type() == DatumType::F32);
            if let Some(b) = konst(1) {
                // B: [.., K, N] (or [.., N, K] transposed); C: [.., M, N] (or [.., N, M])
                let r = b.rank();
                let cut = if mm.transpose_b { r.wrapping_sub(2) } else { r.wrapping_sub(1) };
                let rc = node.outputs[0].fact.rank();
                let out = if mm.transpose_c { rc.wrapping_sub(2) } else { rc.wrapping_sub(1) };
                Some((1, b, cut, out))
            } else if let Some(a) = konst(0) {
                // A: [.., M, K] (or [.., K, M]); C: [.., M, N] (or [.., N, M])
                let r = a.rank();
                let cut = if mm.transpose_a { r.wrapping_sub(1) } else { r.wrapping_sub(2) };
                let rc = node.outputs[0].fact.rank();
                let out = if mm.transpose_c { rc.wrapping_sub(1) } else { rc.wrapping_sub(2) };
                Some((0, a, cut, out))
            } else {
                None
            }
        } else if let Some(g) = node.op_as::<Gather>() {
            match konst(0) {
                // the table's axes after the gathered one land after the indices' axes in the output
                Some(t) if g.output_type.is_none() => {
                    let idx_rank = model.outlet_fact(node.inputs[1]).map(|f| f.rank()).unwrap_or(0);
                    let cut = (0..t.rank()).filter(|a| *a != g.axis).max_by_key(|a| t.shape()[*a]);
                    cut.map(|cut| {
                        let out = if cut < g.axis { cut } else { cut - 1 + idx_rank };
                        (0, t, cut, out)
                    })
                }
                _ => None,
            }
        } else {
            None
        };
        let Some((slot, weight, cut, out_axis)) = plan else { continue };
        if cut >= weight.rank() || out_axis >= node.outputs[0].fact.rank() {
            continue;
        }
        let len = weight.shape()[cut];
        let slice_bytes = (weight.len() / len.max(1) * weight.datum_type().size_of()) as u64;
        if len < 2 || slice_bytes == 0 || slice_bytes > limit {
            continue;
        }
        let per_chunk = ((limit / slice_bytes) as usize).clamp(1, len);
        let mut patch = TypedModelPatch::new(format!("split {} under the binding limit", node.name));
        let mut taps = tvec![];
        for i in &node.inputs {
            taps.push(patch.tap_model(model, *i).map_err(tract_err("splitting a weight"))?);
        }
        let mut parts = tvec![];
        let mut start = 0;
        while start < len {
            let end = (start + per_chunk).min(len);
            let name = format!("{}.split{}", model.node(node.inputs[slot].node).name, parts.len());
            let k = match &weight {
                Weight::Const(t) => {
                    let chunk = t.slice(cut, start, end).map_err(tract_err("slicing a weight"))?;
                    patch.add_const(name, chunk).map_err(tract_err("splitting a weight"))?
                }
                Weight::External(w, _) => {
                    let part = ExternalWeight { slice: Some((cut, start, end)), ..w.clone() };
                    patch.wire_node(name, part, &[]).map_err(tract_err("splitting a weight"))?[0]
                }
            };
            let mut inputs = taps.clone();
            inputs[slot] = k;
            let o = patch
                .wire_node(format!("{}.split{}", node.name, parts.len()), node.op.clone(), &inputs)
                .map_err(tract_err("splitting a weight"))?;
            parts.push(o[0]);
            start = end;
        }
        let cat = patch
            .wire_node(format!("{}.concat", node.name), TypedConcat::new(out_axis), &parts)
            .map_err(tract_err("splitting a weight"))?;
        patch.shunt_outside(model, OutletId::new(id, 0), cat[0]).map_err(tract_err("splitting a weight"))?;
        log::info!("webgpu: {} split into {} parts under the {limit}-byte binding limit", node.name, parts.len());
        patch.apply(model).map_err(tract_err("splitting a weight"))?;
    }
    Ok(())
}

// Unit tests: the unwraps below run on fixed, hand-built models, never on user data.
#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n).map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 1000) as f32 / 500.0 - 1.0).collect()
    }

    fn run(model: &TypedModel, inputs: TVec<TValue>) -> Vec<f32> {
        let plan = SimplePlan::new(model.clone()).expect("planning");
        let out = plan.run(inputs).expect("running");
        out[0].to_plain_array_view::<f32>().expect("f32 output").iter().copied().collect()
    }

    fn close(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "element {i}: {x} vs {y}");
        }
    }

    /// Three MatMulNBits of one input (no zero points): one split node of all three where a kernel may bind 16
    /// storage buffers (10 needed), of two (7) under WebGPU's default 8, and no lowered kernel over the limit.
    #[test]
    fn matmul_splits_stay_within_the_storage_buffer_limit() -> Result<()> {
        use tract_onnx::pb;
        let attr = |name: &str, i: i64| pb::AttributeProto {
            name: name.into(),
            i,
            r#type: pb::attribute_proto::AttributeType::Int as i32,
            ..Default::default()
        };
        let (k, n) = (64usize, 32usize);
        let mut nodes = vec![];
        let mut inits = vec![];
        let mut outputs = vec![];
        for i in 0..3 {
            let t = |name: &str, data_type: i32, dims: &[usize], raw: Vec<u8>| pb::TensorProto {
                name: format!("{name}{i}"),
                data_type,
                dims: dims.iter().map(|d| *d as i64).collect(),
                raw_data: raw,
                ..Default::default()
            };
            inits.push(t("b", 2, &[n, k / 32, 16], (0..n * k / 2).map(|j| (j * 7 + i) as u8).collect()));
            inits.push(t(
                "s",
                1,
                &[n, k / 32],
                (0..n * k / 32).flat_map(|j| (0.01 * j as f32).to_le_bytes()).collect(),
            ));
            nodes.push(pb::NodeProto {
                op_type: "MatMulNBits".into(),
                domain: "com.microsoft".into(),
                name: format!("p{i}"),
                input: vec!["x".into(), format!("b{i}"), format!("s{i}")],
                output: vec![format!("y{i}")],
                attribute: vec![attr("K", k as i64), attr("N", n as i64), attr("bits", 4), attr("block_size", 32)],
                ..Default::default()
            });
            outputs.push(pb::ValueInfoProto { name: format!("y{i}"), ..Default::default() });
        }
        let dims = [1usize, k].into_iter().map(|d| pb::tensor_shape_proto::Dimension {
            value: Some(pb::tensor_shape_proto::dimension::Value::DimValue(d as i64)),
            ..Default::default()
        });
        let x = pb::ValueInfoProto {
            name: "x".into(),
            r#type: Some(pb::TypeProto {
                value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                    elem_type: 1,
                    shape: Some(pb::TensorShapeProto { dim: dims.collect() }),
                })),
                ..Default::default()
            }),
            ..Default::default()
        };
        let proto = pb::ModelProto {
            ir_version: 8,
            opset_import: vec![
                pb::OperatorSetIdProto { domain: String::new(), version: 17 },
                pb::OperatorSetIdProto { domain: "com.microsoft".into(), version: 1 },
            ],
            graph: Some(pb::GraphProto {
                name: "qkv".into(),
                node: nodes,
                input: vec![x],
                output: outputs,
                initializer: inits,
                ..Default::default()
            }),
            ..Default::default()
        };
        let options = crate::LoadOptions { optimization: crate::OptimizationLevel::Basic, ..Default::default() };
        let model = crate::load_proto(proto, &options)?;
        for (limit, parts) in [(16, 3), (8, 2)] {
            let caps = Caps { max_storage_buffers: limit, ..Caps::webgpu_defaults() };
            let lowered = lower(&model.typed, &caps)?;
            let mut splits = vec![];
            for node in lowered.model.nodes() {
                if let Some(Kernel::QMatMul(q)) = node.op_as::<GpuOp>().map(|g| &g.kernel) {
                    assert!(q.storage_buffers() <= limit, "{q:?} binds {} buffers", q.storage_buffers());
                    splits.push(q.split_parts().len());
                }
            }
            splits.sort();
            let want = if parts == 3 { vec![3] } else { vec![0, 2] };
            assert_eq!(splits, want, "limit {limit}");
        }
        Ok(())
    }

    /// A 256 KB weight under a 64 KiB cap: four matmuls on the GPU and a concat, same values as the original.
    #[test]
    fn a_matmul_weight_over_the_limit_is_split_along_n() {
        let (m, k, n) = (3usize, 64usize, 1000usize);
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([m, k])).unwrap();
        let w = model.add_const("w", Tensor::from_shape(&[k, n], &values(k * n, 7)).unwrap()).unwrap();
        let mm = PrefixMatMul {
            transpose_a: false,
            transpose_b: false,
            transpose_c: false,
            quantize_output: None,
            operating_dt: None,
        };
        let y = model.wire_node("y", mm, &[x, w]).unwrap();
        model.select_output_outlets(&y).unwrap();
        let lowered = lower(&model, &Caps::webgpu_defaults().with_binding_cap(64 << 10)).unwrap();
        let mms = lowered.placement.iter().filter(|p| p.op == "PrefixMatMul" && p.device == Device::Gpu).count();
        assert_eq!(mms, 4, "{:?}", lowered.placement);
        assert!(lowered.placement.iter().all(|p| p.device == Device::Gpu), "{:?}", lowered.placement);
        let cut = lowered.model.nodes().iter().filter_map(|n| n.op_as::<Const>()).map(|k| k.val().len()).max();
        assert!(cut.unwrap_or(0) * 4 <= 64 << 10, "a constant over the limit is left");
        let input = Tensor::from_shape(&[m, k], &values(m * k, 3)).unwrap();
        close(&run(&lowered.model, tvec!(input.clone().into())), &run(&model, tvec!(input.into())));
    }

    /// An embedding over the cap is cut along its hidden axis; a 1-D table over the cap cannot be cut under it and
    /// stays on the CPU as "shape too large".
    #[test]
    fn gather_tables_over_the_limit_are_split_or_stay_on_the_cpu() {
        let caps = Caps::webgpu_defaults().with_binding_cap(64 << 10);
        let (vocab, hidden) = (1000usize, 64usize);
        let mut model = TypedModel::default();
        let ids = model.add_source("ids", i64::fact([2, 3])).unwrap();
        let table = model.add_const("t", Tensor::from_shape(&[vocab, hidden], &values(vocab * hidden, 1)).unwrap());
        let y = model.wire_node("y", Gather { axis: 0, output_type: None }, &[table.unwrap(), ids]).unwrap();
        model.select_output_outlets(&y).unwrap();
        let lowered = lower(&model, &caps).unwrap();
        let gathers = lowered.placement.iter().filter(|p| p.op == "Gather" && p.device == Device::Gpu).count();
        assert!(gathers >= 4, "{:?}", lowered.placement);
        assert!(lowered.placement.iter().all(|p| p.device == Device::Gpu), "{:?}", lowered.placement);
        let input = Tensor::from_shape(&[2, 3], &[0i64, 999, 5, -1, 500, 17]).unwrap();
        close(&run(&lowered.model, tvec!(input.clone().into())), &run(&model, tvec!(input.into())));

        let mut model = TypedModel::default();
        let ids = model.add_source("ids", i64::fact([4])).unwrap();
        let table = model.add_const("t", Tensor::from_shape(&[20000], &values(20000, 2)).unwrap()).unwrap();
        let y = model.wire_node("y", Gather { axis: 0, output_type: None }, &[table, ids]).unwrap();
        model.select_output_outlets(&y).unwrap();
        let lowered = lower(&model, &caps).unwrap();
        let g = lowered.placement.iter().find(|p| p.op == "Gather").expect("the gather's placement");
        assert_eq!(g.device, Device::Cpu);
        assert!(g.reason.as_deref().is_some_and(|r| r.contains("shape too large")), "{:?}", g.reason);
    }
}
