//! GPU lowering: a rewrite of the typed tract model, the way tract's own GPU backends translate nodes. Each node
//! with a WGSL kernel becomes a [`GpuOp`] (carrying the op it replaces as its CPU reference), explicit
//! [`ToDevice`] / [`ToHost`] transfers mark the edges of CPU islands, and every other node keeps its tract op, to be
//! evaluated on the CPU. The result is still a tract model (it evaluates on the CPU exactly as before), which
//! kiln-provider's GPU executor runs.

use std::collections::HashMap;

use kiln_wgsl::ops::{kernel_for, GpuOp, ToDevice, ToHost};
use kiln_wgsl::{Caps, Kernel};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::einsum::prefix_matmul::rewrite_einsum_to_prefix_matmul;
use tract_onnx::tract_core::ops::konst::Const;
use tract_onnx::tract_core::ops::source::TypedSource;

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
    let mut target = TypedModel { symbols: src.symbols.clone(), ..TypedModel::default() };
    let mut host: HashMap<OutletId, OutletId> = HashMap::new();
    let mut dev: HashMap<OutletId, OutletId> = HashMap::new();
    let mut placement = vec![];
    let order = src.eval_order().map_err(tract_err("ordering the model"))?;
    let kernels = placement_plan(&src, &order, caps);
    for id in order {
        let node = src.node(id);
        if node.op_is::<TypedSource>() {
            let fact = node.outputs[0].fact.clone();
            let o = target.add_source(&node.name, fact).map_err(tract_err("copying a source"))?;
            host.insert(OutletId::new(id, 0), o);
            continue;
        }
        let is_const = node.op_is::<Const>();
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
        if node.op_is::<TypedSource>() || node.op_is::<Const>() {
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
                Some(Ok(k)) => !matches!(
                    k,
                    Kernel::MatMul { .. } | Kernel::Softmax { .. } | Kernel::Reduce { .. } | Kernel::RmsNorm { .. }
                ),
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
