//! The GPU backend: runs kiln-graph's lowered model. GPU nodes are recorded (one command encoder per flush),
//! CPU nodes are evaluated by tract on the host; the recorder is flushed (one submit) only where a CPU node or a
//! requested output needs GPU data, and only the ToHost values actually needed are read back. Weights are uploaded
//! once, when the session is created; intermediate buffers come from a pool and go back to it at their last use.

use kiln_wgsl::FastMap as HashMap;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};

use kiln_graph::lower_gpu::{
    device_only_constants, drop_host_constants, host_constant_bytes, lower, Device, DeviceConst, Lowered, NodePlacement,
};
use kiln_graph::tract_onnx::prelude::*;
use kiln_graph::tract_onnx::tract_core::ops::konst::Const;
use kiln_graph::tract_onnx::tract_core::ops::source::TypedSource;
use kiln_graph::tract_onnx::tract_core::plan::{SimplePlan, SimpleState};
use kiln_graph::{Error, ErrorKind, Model, Result};
use kiln_ops::external_weight::ExternalWeight;
use kiln_wgsl::exec::tensor_from_bytes;
use kiln_wgsl::ops::{GpuOp, ToDevice, ToHost};
use kiln_wgsl::{Context, Counters, GpuTensor, PendingRead, Recorder};

use crate::gpu_value::{Location, Value};
use crate::tensor::Tensor;

fn gpu_err(e: kiln_wgsl::Error) -> Error {
    Error::runtime(e.message)
}

fn tract_err(what: &'static str) -> impl Fn(TractError) -> Error {
    move |e| Error::from_tract(ErrorKind::Runtime, what, &e)
}

/// The placement report: each compute node's device, and what a run costs in submits and transfers.
#[derive(Debug, Clone, Default)]
pub struct PlacementReport {
    pub adapter: String,
    /// The kernels' tuning: for a CPU adapter (lavapipe, SwiftShader: narrow workgroups) or for a GPU.
    pub tuning: kiln_wgsl::Tuning,
    /// The adapter's shader-f16 is in use (float16 storage as `array<f16>`, float16 products in a float16 model's
    /// matmuls).
    pub shader_f16: bool,
    /// Matmul and attention kernels that multiply in float16 (a float16 model with shader-f16: kiln_wgsl's
    /// `QMatMul::f16_math`, `AttentionSpec::f16_math`).
    pub f16_kernels: usize,
    pub nodes: Vec<NodePlacement>,
    /// ToDevice / ToHost nodes in the lowered model.
    pub to_device: usize,
    pub to_host: usize,
    /// Totals over the session's runs so far.
    pub counters: Counters,
    pub runs: usize,
    /// Constant tensors uploaded once at session creation, and their bytes on the GPU.
    pub weights_on_gpu: usize,
    pub weight_bytes_on_gpu: u64,
    /// Bytes of constants the lowered plan still holds on the host (those CPU nodes use); the weights placed on
    /// the GPU are not among them.
    pub host_constant_bytes: u64,
    /// Of the weights on the GPU, those streamed from the model's external data straight into their buffers
    /// (never whole in host memory), and their bytes on the GPU.
    pub weights_streamed: usize,
    pub weight_bytes_streamed: u64,
    /// The constants the lowered plan holds on the host: (node, bytes).
    pub host_constants: Vec<(String, u64)>,
    /// GPU time per kernel over the runs so far (KILN_GPU_PROFILE=1, native): (kernel entry, dispatches, ns).
    pub profile: Vec<(String, u64, u64)>,
}

impl PlacementReport {
    pub fn gpu_nodes(&self) -> usize {
        self.nodes.iter().filter(|n| n.device == Device::Gpu).count()
    }
}

pub(crate) struct GpuBackend {
    ctx: Arc<Context>,
    lowered: Lowered,
    plan: Arc<TypedSimplePlan>,
    order: Vec<usize>,
    weights: HashMap<usize, GpuTensor>,
    weight_bytes: u64,
    host_constant_bytes: u64,
    /// The recorder, one run at a time (runs queue on it without blocking a thread).
    rec: AsyncLock<Recorder>,
    /// Counters after the last run, and the number of runs.
    stats: Mutex<(Counters, usize)>,
    profile: Mutex<kiln_wgsl::exec::Profile>,
    poison: AtomicBool,
    /// Weights streamed from the external data into their GPU buffers: (count, bytes on the GPU).
    streamed: (usize, u64),
    host_constants: Vec<(String, u64)>,
    /// Each node's first outlet in a flat outlet index ([`RunPlan::uses`]).
    outlet_base: Vec<usize>,
    /// KILN_HOST_PROFILE=1 (native): host time per kind of node in the profile.
    host_profile: bool,
    /// The run plans of recent (outputs, locations) requests: a decode loop asks the same every step.
    run_plans: Mutex<Vec<(RunKey, Arc<RunPlan>)>>,
}

/// What a run asks for: output indices and whether each stays on the GPU.
type RunKey = (Vec<usize>, Vec<bool>);

/// Run plans kept ([`GpuBackend::run_plans`]).
const RUN_PLANS: usize = 4;

/// The per-request part of a run, computed once per (outputs, locations): the nodes to run in order, how often
/// each outlet is read, and the outputs left on the GPU.
struct RunPlan {
    /// The nodes the wanted outputs need, in evaluation order (a GPU weight's constant is not among them: its
    /// ToDevice node hands out the uploaded buffer).
    nodes: Vec<usize>,
    needed: Vec<bool>,
    /// Reads of each outlet (flat index: `outlet_base[node] + slot`), the wanted outputs included.
    uses: Vec<u32>,
    /// Outputs left on the GPU: the device value behind each (a ToHost's input), kept to the end of the run.
    keep: HashMap<OutletId, OutletId>,
    store_outlets: std::collections::HashSet<OutletId>,
    /// The symbols the plan's outputs name as whole dimensions ([`resolve_symbols`] sets those no input did).
    symbols: Vec<Symbol>,
}

impl GpuBackend {
    /// The backend on the first adapter, or why there is none (no adapter, a device or lowering failure).
    ///
    /// On success the constants of `model.typed` are replaced by [`DeviceConst`] placeholders: the session runs the
    /// backend's lowered plan, which holds the constants CPU nodes need, and the GPU holds the rest, so no weight
    /// placed on the GPU stays in host memory. (`model.typed` keeps the graph, for inspection.)
    pub(crate) async fn create(
        model: &mut Model,
        options: &crate::SessionOptions,
    ) -> std::result::Result<GpuBackend, String> {
        let ctx = if options.share_gpu_device {
            kiln_wgsl::Context::shared(&options.webgpu_adapter).await
        } else {
            kiln_wgsl::Context::with_adapter(&options.webgpu_adapter).await
        };
        let ctx = match ctx {
            Ok(Some(ctx)) => ctx,
            Ok(None) => return Err("no GPU adapter found".into()),
            Err(e) => return Err(e.message),
        };
        let ctx = match options.gpu_tuning {
            Some(t) => ctx.with_tuning(t),
            None => ctx,
        };
        let adapter = ctx.caps.adapter.clone();
        let lowered = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| lower(&model.typed, &ctx.caps))) {
            Ok(Ok(l)) => l,
            Ok(Err(e)) => return Err(format!("adapter {adapter}: {e}")),
            Err(_) => return Err(format!("adapter {adapter}: internal error while lowering the model")),
        };
        // streamed weights (kiln_graph::stream) a CPU node reads: into memory first, in bounded reads
        let mut lowered = lowered;
        let chunk = options.weight_streaming.chunk();
        let host_read = crate::gpu_stream::host_read_weights(&lowered);
        kiln_graph::stream::materialize(&mut lowered.model, &host_read, model.weight_source.as_ref(), chunk)
            .await
            .map_err(|e| format!("adapter {adapter}: {}", e.message))?;
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            GpuBackend::new(ctx, lowered, options.gpu_submit_every)
        })) {
            Ok(Ok((b, jobs))) => {
                // the other streamed weights: from the source into their GPU buffers, a chunk at a time
                crate::gpu_stream::stream_weights(&b.ctx, &jobs, model.weight_source.as_ref(), chunk, UPLOAD_WINDOW)
                    .await
                    .map_err(|e| format!("adapter {adapter}: {}", e.message))?;
                let consts: Vec<usize> =
                    model.typed.nodes().iter().filter(|n| n.op_is::<Const>()).map(|n| n.id).collect();
                drop_host_constants(&mut model.typed, &consts);
                log::info!(
                    "execution provider webgpu: adapter {adapter}, {} of {} compute nodes on the GPU",
                    b.lowered.gpu_nodes(),
                    b.lowered.placement.len()
                );
                Ok(b)
            }
            Ok(Err(e)) => Err(format!("adapter {adapter}: {e}")),
            Err(_) => Err(format!("adapter {adapter}: internal error while lowering the model")),
        }
    }

    /// The backend for a lowered model: constants feeding the GPU uploaded; buffers made for the streamed weights
    /// (filled by [`crate::gpu_stream::stream_weights`] from the returned jobs before the first run).
    pub(crate) fn new(
        ctx: Arc<Context>,
        mut lowered: Lowered,
        submit_every: Option<usize>,
    ) -> Result<(GpuBackend, Vec<crate::gpu_stream::StreamJob>)> {
        // weights: constants that feed the GPU, uploaded once
        let mut weights = HashMap::default();
        let mut weight_bytes = 0u64;
        let mut staged = 0u64;
        let mut jobs = vec![];
        let mut streamed_bytes = 0u64;
        for node in lowered.model.nodes() {
            if !node.op_is::<ToDevice>() {
                continue;
            }
            let src = lowered.model.node(node.inputs[0].node);
            if let Some(w) = src.op_as::<ExternalWeight>() {
                let (dt, shape, size) = crate::gpu_stream::gpu_bytes(w)?;
                if size > ctx.caps.max_storage_binding || size > ctx.caps.max_buffer_size {
                    return Err(Error::runtime(format!(
                        "webgpu: weight `{}` ({size} bytes) exceeds the adapter's storage binding limit",
                        w.tensor
                    )));
                }
                let buffer = Arc::new(ctx.device.create_buffer(&kiln_wgsl::wgpu::BufferDescriptor {
                    label: Some(&src.name),
                    size,
                    usage: kiln_wgsl::wgpu::BufferUsages::STORAGE
                        | kiln_wgsl::wgpu::BufferUsages::COPY_DST
                        | kiln_wgsl::wgpu::BufferUsages::COPY_SRC,
                    mapped_at_creation: false,
                }));
                weight_bytes += size;
                streamed_bytes += size;
                weights.insert(node.id, GpuTensor::new(buffer.clone(), &shape, dt));
                jobs.push(crate::gpu_stream::StreamJob { buffer, weight: w.clone() });
                continue;
            }
            if let Some(k) = src.op_as::<Const>() {
                let t = k.val();
                // f32 / i32 / u32 / f16 go up from the tensor's own bytes; bool and i64 are converted first
                let plain = matches!(t.datum_type(), DatumType::F32 | DatumType::I32 | DatumType::U32 | DatumType::F16);
                let converted = if plain { None } else { Some(kiln_wgsl::exec::host_bytes(t).map_err(gpu_err)?) };
                let view = if plain {
                    Some(t.try_as_plain_ram().map_err(|e| Error::runtime(format!("webgpu: weight data: {e}")))?)
                } else {
                    None
                };
                let bytes: &[u8] = match (&converted, &view) {
                    (Some(c), _) => c,
                    (None, Some(v)) => v.as_bytes(),
                    (None, None) => &[],
                };
                let size = (bytes.len() as u64).div_ceil(4).max(1) * 4;
                if size > ctx.caps.max_storage_binding || size > ctx.caps.max_buffer_size {
                    return Err(Error::runtime(format!(
                        "webgpu: weight `{}` ({} bytes) exceeds the adapter's storage binding limit",
                        src.name, size
                    )));
                }
                let buffer = ctx.device.create_buffer(&kiln_wgsl::wgpu::BufferDescriptor {
                    label: Some(&src.name),
                    size,
                    usage: kiln_wgsl::wgpu::BufferUsages::STORAGE
                        | kiln_wgsl::wgpu::BufferUsages::COPY_DST
                        | kiln_wgsl::wgpu::BufferUsages::COPY_SRC,
                    mapped_at_creation: false,
                });
                upload_in_chunks(&ctx, &buffer, bytes, &mut staged)?;
                weight_bytes += size;
                weights.insert(node.id, GpuTensor::new(Arc::new(buffer), t.shape(), t.datum_type()));
            }
        }
        ctx.take_error().map_err(gpu_err)?;
        // the uploaded constants only the GPU reads leave the host: the lowered model (and the plan built from it)
        // keeps their facts, not their bytes
        let device_only = device_only_constants(&lowered.model);
        drop_host_constants(&mut lowered.model, &device_only);
        crate::gpu_stream::streamed_to_device_consts(&mut lowered.model);
        let host_constant_bytes = host_constant_bytes(&lowered.model);
        let host_constants: Vec<(String, u64)> = lowered
            .model
            .nodes()
            .iter()
            .filter_map(|n| {
                n.op_as::<Const>().map(|k| (n.name.clone(), (k.val().len() * k.val().datum_type().size_of()) as u64))
            })
            .collect();
        let order = lowered.model.eval_order().map_err(tract_err("ordering the lowered model"))?;
        // KILN_GPU_DUMP=1 (native): the lowered model, one node a line in evaluation order
        if cfg!(not(target_arch = "wasm32")) && std::env::var("KILN_GPU_DUMP").is_ok_and(|v| v == "1") {
            for &id in &order {
                let n = lowered.model.node(id);
                let ins: Vec<String> = n.inputs.iter().map(|i| format!("{}/{}", i.node, i.slot)).collect();
                let outs: Vec<String> = n.outputs.iter().map(|o| format!("{:?}", o.fact)).collect();
                eprintln!("#{id} {} [{}] ({}) -> {}", n.name, n.op.name(), ins.join(", "), outs.join(", "));
                if std::env::var("KILN_GPU_DUMP_INFO").is_ok() {
                    eprintln!("   {:?}", n.op.info());
                }
            }
        }
        let outlet_base: Vec<usize> = lowered
            .model
            .nodes()
            .iter()
            .scan(0, |at, n| {
                let base = *at;
                *at += n.outputs.len();
                Some(base)
            })
            .collect();
        let plan = SimplePlan::new(lowered.model.clone()).map_err(tract_err("planning the lowered model"))?;
        let poison = std::env::var("KILN_GPU_POISON").is_ok_and(|v| v == "1");
        let streamed = (jobs.len(), streamed_bytes);
        let submit_every = submit_every.unwrap_or_else(|| kiln_wgsl::exec::default_submit_every(&ctx.caps));
        let backend = GpuBackend {
            ctx,
            lowered,
            plan,
            order,
            weights,
            weight_bytes,
            host_constant_bytes,
            rec: AsyncLock::new(Recorder::with_submit_every(submit_every)),
            stats: Mutex::new((Counters::default(), 0)),
            profile: Mutex::default(),
            poison: AtomicBool::new(poison),
            streamed,
            host_constants,
            outlet_base,
            host_profile: cfg!(not(target_arch = "wasm32"))
                && std::env::var("KILN_HOST_PROFILE").is_ok_and(|v| v == "1"),
            run_plans: Mutex::default(),
        };
        Ok((backend, jobs))
    }

    pub(crate) fn report(&self) -> PlacementReport {
        let (to_device, to_host) = self.lowered.transfers();
        let (counters, runs) = self.stats.lock().map(|g| *g).unwrap_or_default();
        PlacementReport {
            adapter: format!("{} ({})", self.ctx.caps.adapter, self.ctx.caps.backend),
            tuning: if self.ctx.caps.cpu_adapter { kiln_wgsl::Tuning::Cpu } else { kiln_wgsl::Tuning::Gpu },
            shader_f16: self.ctx.caps.shader_f16,
            f16_kernels: self.lowered.f16_kernels(),
            nodes: self.lowered.placement.clone(),
            to_device,
            to_host,
            counters,
            runs,
            weights_on_gpu: self.weights.len(),
            weight_bytes_on_gpu: self.weight_bytes,
            host_constant_bytes: self.host_constant_bytes,
            weights_streamed: self.streamed.0,
            weight_bytes_streamed: self.streamed.1,
            host_constants: self.host_constants.clone(),
            profile: self
                .profile
                .lock()
                .map(|p| p.iter().map(|(k, (n, ns))| (k.to_string(), *n, *ns)).collect())
                .unwrap_or_default(),
        }
    }

    /// Poisons fresh output buffers with NaN (tests).
    pub(crate) fn device(&self) -> &kiln_wgsl::wgpu::Device {
        &self.ctx.device
    }

    pub(crate) fn context(&self) -> &Arc<Context> {
        &self.ctx
    }

    pub(crate) fn set_poison(&self, on: bool) {
        self.poison.store(on, Ordering::Relaxed);
    }

    /// One run: GPU work is recorded and submitted once per flush; readbacks are awaited (`map_async`), never
    /// blocked on in a browser. Runs on one backend queue one after another. `locations[i]` says whether output
    /// `outputs[i]` is read back or left on the GPU.
    pub(crate) async fn run(
        &self,
        inputs: Vec<Value>,
        outputs: &[usize],
        locations: &[Location],
    ) -> Result<Vec<Value>> {
        let mut rec = self.rec.lock().await;
        // work a run that panicked half-way left behind (a finished run leaves none)
        rec.discard();
        rec.poison = self.poison.load(Ordering::Relaxed);
        let t = kiln_wgsl::exec::clock();
        let r = self.run_with(&mut rec, inputs, outputs, locations).await;
        rec.counters.run_us += kiln_wgsl::exec::micros_since(t);
        if r.is_err() {
            rec.discard();
        }
        if let Ok(mut g) = self.stats.lock() {
            g.0 = rec.counters;
            g.1 += 1;
        }
        if !rec.profile.is_empty() {
            if let Ok(mut p) = self.profile.lock() {
                p.clone_from(&rec.profile);
            }
        }
        r
    }

    /// [`GpuBackend::run`], with a panic inside turned into an error (as the CPU path does).
    pub(crate) async fn run_guarded(
        &self,
        inputs: Vec<Value>,
        outputs: &[usize],
        locations: &[Location],
    ) -> Result<Vec<Value>> {
        CatchUnwind(Box::pin(self.run(inputs, outputs, locations))).await
    }

    /// A GPU feed as this backend binds it: on this device, its buffer large enough.
    fn bind_feed(&self, name: &str, g: &crate::gpu_value::GpuTensor) -> Result<GpuTensor> {
        if !g.ctx.same_device(&self.ctx) {
            return Err(Error::invalid_argument(format!(
                "input `{name}`: the GPU tensor lives on another device than this session's (make it on \
                 Session::gpu_device(), or download() it and feed the host tensor)"
            )));
        }
        let raw = &g.raw;
        let rows = raw.row_stride().max(raw.shape.get(2).copied().unwrap_or(0));
        let elems = if raw.kv.is_some() { raw.len() / raw.shape[2].max(1) * rows } else { raw.len() };
        let need = (elems * kiln_wgsl::exec::gpu_size_of(raw.dt)) as u64;
        if raw.buffer.size() < need {
            return Err(Error::invalid_argument(format!(
                "input `{name}`: the GPU buffer holds {} bytes, the tensor needs {need}",
                raw.buffer.size()
            )));
        }
        Ok(raw.clone())
    }

    /// The uploaded weight behind outlet `o`, when `o` is a weight's ToDevice.
    fn weight_at(&self, o: &OutletId) -> Option<&GpuTensor> {
        if o.slot == 0 {
            self.weights.get(&o.node)
        } else {
            None
        }
    }

    /// The run plan for `wanted` (the model outputs `outputs` asks for) at `locations`, from the cache or made now.
    fn run_plan(&self, wanted: &[OutletId], outputs: &[usize], locations: &[Location]) -> Result<Arc<RunPlan>> {
        let on_gpu = |i: usize| locations.get(i) == Some(&Location::GpuBuffer);
        let is_key = |k: &RunKey| k.0 == outputs && k.1.iter().copied().eq((0..outputs.len()).map(on_gpu));
        if let Ok(plans) = self.run_plans.lock() {
            if let Some((_, p)) = plans.iter().find(|(k, _)| is_key(k)) {
                return Ok(p.clone());
            }
        }
        let key: RunKey = (outputs.to_vec(), (0..outputs.len()).map(on_gpu).collect());
        let model = self.plan.model();
        let mut keep: HashMap<OutletId, OutletId> = HashMap::default();
        for (i, o) in wanted.iter().enumerate() {
            if on_gpu(i) && model.node(o.node).op_is::<ToHost>() {
                keep.insert(*o, model.node(o.node).inputs[0]);
            }
        }
        let store_outlets: std::collections::HashSet<OutletId> = keep.values().copied().collect();
        // the nodes the wanted outputs need (a ToHost nobody else reads is not run), and how often each outlet is
        // used
        let mut needed = vec![false; model.nodes().len()];
        let mut stack: Vec<usize> = wanted
            .iter()
            .map(|o| match keep.get(o) {
                Some(d) => d.node,
                None => o.node,
            })
            .collect();
        for (i, o) in wanted.iter().enumerate() {
            if !on_gpu(i) || !keep.contains_key(o) {
                stack.push(o.node);
            }
        }
        while let Some(n) = stack.pop() {
            if std::mem::replace(&mut needed[n], true) {
                continue;
            }
            // a weight's ToDevice hands out the uploaded buffer: its constant is not needed
            if !self.weights.contains_key(&n) {
                stack.extend(model.node(n).inputs.iter().map(|i| i.node));
            }
        }
        // a weight's ToDevice has nothing to do in a run (its readers find the uploaded buffer): not walked
        let nodes: Vec<usize> =
            self.order.iter().copied().filter(|n| needed[*n] && !self.weights.contains_key(n)).collect();
        let total = self.outlet_base.last().copied().unwrap_or(0) + model.nodes().last().map_or(0, |n| n.outputs.len());
        let mut uses = vec![0u32; total];
        let mut count = |o: &OutletId| {
            if let Some(u) = self.outlet_base.get(o.node).and_then(|b| uses.get_mut(b + o.slot)) {
                *u += 1;
            }
        };
        for &n in &nodes {
            for i in &model.node(n).inputs {
                count(i);
            }
        }
        for (i, o) in wanted.iter().enumerate() {
            count(o);
            if on_gpu(i) {
                if let Some(d) = keep.get(o) {
                    count(d);
                }
            }
        }
        let mut symbols: Vec<Symbol> = vec![];
        for &n in &nodes {
            for o in &model.node(n).outputs {
                for d in o.fact.shape.iter() {
                    if let TDim::Sym(sym) = d {
                        if !symbols.contains(sym) {
                            symbols.push(sym.clone());
                        }
                    }
                }
            }
        }
        let plan = Arc::new(RunPlan { nodes, needed, uses, keep, store_outlets, symbols });
        if let Ok(mut plans) = self.run_plans.lock() {
            if plans.len() >= RUN_PLANS {
                plans.remove(0);
            }
            plans.push((key, plan.clone()));
        }
        Ok(plan)
    }

    async fn run_with(
        &self,
        rec: &mut Recorder,
        inputs: Vec<Value>,
        outputs: &[usize],
        locations: &[Location],
    ) -> Result<Vec<Value>> {
        let ctx = &*self.ctx;
        let model = self.plan.model();
        let mut wanted = vec![];
        for o in outputs {
            wanted.push(*model.outputs.get(*o).ok_or_else(|| Error::invalid_argument("no such output"))?);
        }
        let on_gpu = |i: usize| locations.get(i) == Some(&Location::GpuBuffer);
        let plan = self.run_plan(&wanted, outputs, locations)?;
        let (keep, store_outlets, needed) = (&plan.keep, &plan.store_outlets, &plan.needed);
        let mut uses = plan.uses.clone();
        let base = &self.outlet_base;
        let flat = |o: &OutletId| base.get(o.node).map(|b| b + o.slot);

        let mut state = SimpleState::new(&self.plan).map_err(tract_err("starting a run"))?;
        let input_outlets = model.input_outlets().map_err(tract_err("the model's inputs"))?.to_vec();
        if input_outlets.len() != inputs.len() {
            return Err(Error::invalid_argument("wrong number of inputs"));
        }
        let mut gpu_feeds: HashMap<usize, GpuTensor> = HashMap::default();
        for (ix, (v, outlet)) in inputs.into_iter().zip(&input_outlets).enumerate() {
            match v {
                Value::Cpu(t) => state
                    .set_input(ix, t.into_tract().into_tvalue())
                    .map_err(|e| Error::from_tract(ErrorKind::InvalidArgument, "feeding the inputs", &e))?,
                Value::Gpu(g) => {
                    let name = model.node(outlet.node).name.clone();
                    gpu_feeds.insert(outlet.node, self.bind_feed(&name, &g)?);
                }
            }
        }
        if state.turn_state.values.len() != model.nodes().len() {
            state.turn_state.values = vec![None; model.nodes().len()];
        }
        // a GPU feed's dims resolve the model's symbols as a host feed's would, and must agree with them
        for (node, g) in &gpu_feeds {
            let fact = model.outlet_fact(OutletId::new(*node, 0)).map_err(tract_err("the model's inputs"))?;
            for (d, v) in fact.shape.iter().zip(&g.shape) {
                if let TDim::Sym(sym) = d {
                    match state.turn_state.resolved_symbols.get(sym) {
                        Some(x) if x != *v as i64 => {
                            return Err(Error::invalid_argument(format!(
                                "input `{}`: dimension {sym} is {v} here but {x} in another input",
                                model.node(*node).name
                            )))
                        }
                        Some(_) => {}
                        None => state.turn_state.resolved_symbols.set(sym, *v as i64),
                    }
                }
            }
        }
        let mut dev: HashMap<OutletId, GpuTensor> = HashMap::default();
        let mut pending: Vec<(OutletId, PendingRead, TVec<usize>, DatumType)> = vec![];

        // whether some output dimension's symbol is still unknown (else the nodes' output shapes add nothing)
        let mut unresolved = plan.symbols.iter().any(|s| state.turn_state.resolved_symbols.get(s).is_none());
        // KILN_HOST_PROFILE=1 (native): host time per kind of node, as `host <kind>` entries of the profile
        let mut host_lap = None;
        for &id in &plan.nodes {
            let node = model.node(id);
            if self.host_profile {
                end_lap(rec, host_lap.take());
                host_lap = Some((host_label(node), kiln_wgsl::exec::clock()));
            }
            if node.inputs.is_empty() && !node.op_is::<GpuOp>() {
                if let Some(g) = gpu_feeds.get(&id) {
                    // a GPU feed a CPU node (or a host output) reads: read back (with the next flush, which the
                    // first such reader asks for)
                    let host_readers = node.outputs[0]
                        .successors
                        .iter()
                        .any(|s| needed[s.node] && !model.node(s.node).op_is::<ToDevice>())
                        || wanted.iter().enumerate().any(|(i, o)| o.node == id && !on_gpu(i));
                    if host_readers {
                        let c = kiln_wgsl::kv::compact(ctx, rec, g).map_err(gpu_err)?;
                        let p = rec.readback(&c);
                        pending.push((OutletId::new(id, 0), p, c.shape.clone(), c.dt));
                        if g.kv.is_some() {
                            rec.release(c);
                        }
                    }
                    continue;
                }
                // a weight that lives on the GPU only: its ToDevice consumers use the uploaded buffer
                if node.op_is::<DeviceConst>() {
                    continue;
                }
                // constants once; other input-less ops (kiln's DimValues: the run's symbols) every run
                let per_run = !(node.op_is::<Const>() || node.op_is::<TypedSource>());
                if per_run || state.turn_state.values[id].is_none() {
                    state.compute_one(id).map_err(tract_err("evaluating a constant"))?;
                }
                continue;
            }
            if node.op_is::<ToDevice>() {
                // (not a weight's: the plan leaves those out, their readers find the uploaded buffer)
                let g = match gpu_feeds.get(&node.inputs[0].node) {
                    Some(g) => {
                        rec.counters.gpu_feeds += 1;
                        g.clone()
                    }
                    None => {
                        let i = node.inputs[0];
                        let t = host_value(&state, i)?;
                        rec.upload(ctx, &t).map_err(gpu_err)?
                    }
                };
                dev.insert(OutletId::new(id, 0), g);
            } else if let Some(op) = node.op_as::<GpuOp>() {
                let mut ins = vec![];
                for i in &node.inputs {
                    ins.push(
                        dev.get(i)
                            .or_else(|| self.weight_at(i))
                            .ok_or_else(|| Error::runtime(format!("webgpu: input of {} not on the GPU", node.name)))?,
                    );
                }
                if ctx.profile_ops {
                    let name: String = op.kernel.name().chars().take(48).collect();
                    rec.tag = Some(intern(name));
                }
                // a KV store goes to kernels other than attention and the KV appends as a contiguous copy
                let mut temps = vec![];
                let mut args: Vec<GpuTensor> = vec![];
                for (slot, t) in ins.iter().enumerate() {
                    if t.kv.is_some() && !kiln_wgsl::kv::reads_kv_layout(&op.kernel, slot) {
                        let c = kiln_wgsl::kv::compact(ctx, rec, t).map_err(gpu_err)?;
                        temps.push(c.clone());
                        args.push(c);
                    } else {
                        args.push((*t).clone());
                    }
                }
                let refs: Vec<&GpuTensor> = args.iter().collect();
                // outputs that leave the run on the GPU: a KV append makes them KV stores
                let stores = |slot: usize| store_outlets.contains(&OutletId::new(id, slot));
                let outs =
                    op.kernel.encode_outputs(ctx, rec, &refs, &state.turn_state.resolved_symbols, &stores).map_err(
                        |e| Error::runtime(format!("webgpu: {} ({}): {}", node.name, op.kernel.name(), e.message)),
                    )?;
                drop(args);
                for t in temps {
                    rec.release(t);
                }
                rec.tag = None;
                if outs.len() != node.outputs.len() {
                    return Err(Error::runtime(format!(
                        "webgpu: {} gave {} outputs for {}",
                        node.name,
                        outs.len(),
                        node.outputs.len()
                    )));
                }
                for (slot, out) in outs.into_iter().enumerate() {
                    if unresolved {
                        resolve_symbols(&mut state, &node.outputs[slot].fact, &out.shape);
                        unresolved = plan.symbols.iter().any(|s| state.turn_state.resolved_symbols.get(s).is_none());
                    }
                    dev.insert(OutletId::new(id, slot), out);
                }
            } else if node.op_is::<ToHost>() {
                let g = dev
                    .get(&node.inputs[0])
                    .or_else(|| self.weight_at(&node.inputs[0]))
                    .ok_or_else(|| Error::runtime("webgpu: ToHost of a host value"))?;
                let c = kiln_wgsl::kv::compact(ctx, rec, g).map_err(gpu_err)?;
                let p = rec.readback(&c);
                pending.push((OutletId::new(id, 0), p, c.shape.clone(), c.dt));
                if c.kv.is_none() && g.kv.is_some() {
                    rec.release(c);
                }
            } else {
                if node.inputs.iter().any(|i| pending.iter().any(|p| p.0 == *i)) {
                    self.flush(rec, &mut state, &mut pending).await?;
                }
                state.compute_one(id).map_err(|e| Error::from_tract(ErrorKind::Runtime, "running the model", &e))?;
                if let Some(vs) = state.turn_state.values[id].clone().filter(|_| unresolved) {
                    for (o, v) in node.outputs.iter().zip(vs.iter()) {
                        resolve_symbols(&mut state, &o.fact, v.shape());
                    }
                    unresolved = plan.symbols.iter().any(|s| state.turn_state.resolved_symbols.get(s).is_none());
                }
            }
            // last uses
            for i in &node.inputs {
                if let Some(u) = flat(i).and_then(|f| uses.get_mut(f)) {
                    *u = u.saturating_sub(1);
                    if *u == 0 {
                        if let Some(g) = dev.remove(i) {
                            rec.release(g);
                        }
                        let all_dead = (0..model.node(i.node).outputs.len())
                            .all(|s| flat(&OutletId::new(i.node, s)).and_then(|f| uses.get(f)).is_none_or(|u| *u == 0));
                        if all_dead && !model.node(i.node).inputs.is_empty() {
                            state.turn_state.values[i.node] = None;
                        }
                    }
                }
            }
            rec.submit_early(ctx).map_err(gpu_err)?;
        }
        end_lap(rec, host_lap.take());
        // outputs left on the GPU: the device values behind them; host values (CPU nodes' outputs) go up
        let mut gpu_out: HashMap<usize, (GpuTensor, Option<Arc<std::sync::atomic::AtomicBool>>)> = HashMap::default();
        for (i, o) in wanted.iter().enumerate() {
            if !on_gpu(i) {
                continue;
            }
            let g = match keep.get(o).and_then(|d| dev.get(d).or_else(|| self.weight_at(d))) {
                Some(g) => g.clone(),
                None => match gpu_feeds.get(&o.node) {
                    Some(g) => g.clone(),
                    None => {
                        let t = host_value(&state, *o)?;
                        if t.datum_type() == DatumType::String {
                            return Err(Error::invalid_argument("String tensor is not supported on GPU."));
                        }
                        rec.upload(ctx, &t).map_err(gpu_err)?
                    }
                },
            };
            // the application holds it now: the pool hands it out again only once the application has dropped
            // every handle without exposing the wgpu buffer (kiln_wgsl's BufferPool::disown)
            let pooled = rec.pool.disown(&g.buffer);
            gpu_out.insert(i, (g, pooled));
        }
        if !pending.is_empty() || !gpu_out.is_empty() {
            self.flush(rec, &mut state, &mut pending).await?;
        }
        rec.discard();
        // in a fixed order, so that run after run the pool hands out the same buffers (cached bind groups hit)
        let mut rest: Vec<(OutletId, GpuTensor)> = dev.drain().collect();
        rest.sort_by_key(|(o, _)| (o.node, o.slot));
        for (_, g) in rest {
            rec.release(g);
        }
        rec.end_run();
        let mut result = vec![];
        for (i, o) in wanted.into_iter().enumerate() {
            match gpu_out.remove(&i) {
                // an empty tensor has no buffer to hand out: it comes back on the host (as onnxruntime-web does)
                Some((g, _)) if g.is_empty() => {
                    let t = tensor_from_bytes(g.dt, &g.shape, &[]).map_err(gpu_err)?;
                    result.push(Value::Cpu(Tensor::from_tract(t)?));
                }
                Some((g, pooled)) => {
                    rec.counters.gpu_outputs += 1;
                    let t = crate::gpu_value::GpuTensor::from_pool(g, &self.ctx, pooled)?;
                    result.push(Value::Gpu(t));
                }
                None => {
                    let v = host_value(&state, o)?;
                    result.push(Value::Cpu(Tensor::from_tract(v)?));
                }
            }
        }
        Ok(result)
    }

    async fn flush(
        &self,
        rec: &mut Recorder,
        state: &mut TypedSimpleState,
        pending: &mut Vec<(OutletId, PendingRead, TVec<usize>, DatumType)>,
    ) -> Result<()> {
        let bytes = rec.flush(&self.ctx).await.map_err(gpu_err)?;
        for (outlet, p, shape, dt) in pending.drain(..) {
            let b = bytes.get(p.0).ok_or_else(|| Error::runtime("webgpu: a readback is missing"))?;
            let t = tensor_from_bytes(dt, &shape, b).map_err(gpu_err)?;
            state.turn_state.values[outlet.node] = Some(tvec!(t.into_tvalue()));
        }
        Ok(())
    }
}

/// Bytes written through the queue between two waits while uploading weights (native).
const UPLOAD_WINDOW: u64 = 16 << 20;
const UPLOAD_CHUNK: usize = 4 << 20;

/// Writes `bytes` to `buffer` in chunks. Natively the queue's staging memory is recycled every
/// [`UPLOAD_WINDOW`] bytes (a submit, then a wait): the staging copies of a big weight never pile up in host
/// memory beside the weight itself (they would on lavapipe, whose GPU memory is host memory).
fn upload_in_chunks(ctx: &Context, buffer: &kiln_wgsl::wgpu::Buffer, bytes: &[u8], staged: &mut u64) -> Result<()> {
    let mut offset = 0u64;
    for chunk in bytes.chunks(UPLOAD_CHUNK) {
        // write_buffer wants a multiple of 4 bytes
        if chunk.len() % 4 == 0 {
            ctx.queue.write_buffer(buffer, offset, chunk);
        } else {
            let mut padded = chunk.to_vec();
            padded.resize(chunk.len().div_ceil(4) * 4, 0);
            ctx.queue.write_buffer(buffer, offset, &padded);
        }
        offset += chunk.len() as u64;
        *staged += chunk.len() as u64;
        if *staged >= UPLOAD_WINDOW {
            *staged = 0;
            #[cfg(not(target_arch = "wasm32"))]
            {
                ctx.queue.submit([]);
                ctx.device
                    .poll(kiln_wgsl::wgpu::PollType::Wait { submission_index: None, timeout: None })
                    .map_err(|e| Error::runtime(format!("webgpu: uploading weights: {e}")))?;
            }
        }
    }
    Ok(())
}

fn host_value(state: &TypedSimpleState, o: OutletId) -> Result<TractTensor> {
    state
        .turn_state
        .values
        .get(o.node)
        .and_then(|v| v.as_ref())
        .and_then(|v| v.get(o.slot))
        .map(|v| v.clone().into_tensor())
        .ok_or_else(|| Error::runtime("webgpu: a host value was not computed"))
}

type TractTensor = kiln_graph::tract_onnx::prelude::Tensor;

fn resolve_symbols(state: &mut TypedSimpleState, fact: &TypedFact, shape: &[usize]) {
    for (d, v) in fact.shape.iter().zip(shape) {
        if let TDim::Sym(s) = d {
            if state.turn_state.resolved_symbols.get(s).is_none() {
                state.turn_state.resolved_symbols.set(s, *v as i64);
            }
        }
    }
}

/// A FIFO lock whose waiters are futures: a run waits for the one before it without blocking a thread (a browser's
/// main thread cannot block). The value leaves the lock while a guard holds it.
struct AsyncLock<T> {
    state: Mutex<(Option<T>, VecDeque<Waker>)>,
}

struct AsyncGuard<'a, T> {
    lock: &'a AsyncLock<T>,
    value: Option<T>,
}

impl<T> AsyncLock<T> {
    fn new(value: T) -> AsyncLock<T> {
        AsyncLock { state: Mutex::new((Some(value), VecDeque::new())) }
    }

    fn lock(&self) -> impl Future<Output = AsyncGuard<'_, T>> + '_ {
        std::future::poll_fn(move |cx| {
            let mut g = match self.state.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            match g.0.take() {
                Some(value) => Poll::Ready(AsyncGuard { lock: self, value: Some(value) }),
                None => {
                    if !g.1.iter().any(|w| w.will_wake(cx.waker())) {
                        g.1.push_back(cx.waker().clone());
                    }
                    Poll::Pending
                }
            }
        })
    }
}

impl<T> std::ops::Deref for AsyncGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // the value is only taken out in Drop
        self.value.as_ref().expect("an async guard holds its value until dropped")
    }
}

impl<T> std::ops::DerefMut for AsyncGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // the value is only taken out in Drop
        self.value.as_mut().expect("an async guard holds its value until dropped")
    }
}

impl<T> Drop for AsyncGuard<'_, T> {
    fn drop(&mut self) {
        let waiter = {
            let mut g = match self.lock.state.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            g.0 = self.value.take();
            g.1.pop_front()
        };
        if let Some(w) = waiter {
            w.wake();
        }
    }
}

/// Polls a future inside `catch_unwind`: a panic becomes a kiln error.
struct CatchUnwind<'a>(Pin<Box<dyn Future<Output = Result<Vec<Value>>> + Send + 'a>>);

impl Future for CatchUnwind<'_> {
    type Output = Result<Vec<Value>>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Self::Output> {
        let inner = &mut self.0;
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.as_mut().poll(cx))) {
            Ok(p) => p,
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown panic".into());
                Poll::Ready(Err(Error::runtime(format!("running the model: internal error (caught panic: {msg})"))))
            }
        }
    }
}

/// Adds a host-profile lap (a node's label and when it started) to the recorder's profile.
fn end_lap(rec: &mut Recorder, lap: Option<(&'static str, Option<kiln_wgsl::exec::Instant>)>) {
    if let Some((label, t)) = lap {
        let e = rec.profile.entry(label).or_default();
        e.0 += 1;
        e.1 += kiln_wgsl::exec::nanos_since(t);
    }
}

/// The host-profile label of a node: `host <kernel>` for GPU nodes, `host cpu <op>` for CPU nodes.
fn host_label(node: &TypedNode) -> &'static str {
    if let Some(op) = node.op_as::<GpuOp>() {
        return intern(format!("host {}", op.kernel.name()));
    }
    if node.op_is::<ToDevice>() {
        return "host ToDevice";
    }
    if node.op_is::<ToHost>() {
        return "host ToHost";
    }
    if node.inputs.is_empty() {
        return "host source/const";
    }
    intern(format!("host cpu {}", node.op.name()))
}

/// A static copy of a kernel name for profile labels (a model has a few dozen distinct ones).
fn intern(name: String) -> &'static str {
    use std::sync::Mutex;
    static NAMES: Mutex<Vec<&'static str>> = Mutex::new(vec![]);
    let Ok(mut names) = NAMES.lock() else { return "?" };
    if let Some(n) = names.iter().find(|n| **n == name) {
        return n;
    }
    let n: &'static str = Box::leak(name.into_boxed_str());
    names.push(n);
    n
}
