//! The session: load → place → plan → run, async-first like onnxruntime-web's `InferenceSession`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use kiln_graph::{
    Dim, ElementType, Error, ErrorKind, ExternalDataResolver, LoadOptions, Model, OptimizationLevel, Result, ValueInfo,
};

use crate::cpu::CpuBackend;
use crate::custom_op::CustomOpRegistration;
use crate::gpu_value::{GpuTensor, Location, PreferredOutputLocation, RunOptions, Value};
use crate::tensor::Tensor;

/// Execution providers, in onnxruntime-web's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExecutionProvider {
    /// tract's optimised CPU plan (`'cpu'`, `'wasm'`).
    Cpu,
    /// WGSL kernels through wgpu (`'webgpu'`, `'gpu'`).
    WebGpu,
}

impl ExecutionProvider {
    pub fn from_name(name: &str) -> Result<Self> {
        match name.to_ascii_lowercase().as_str() {
            "cpu" | "wasm" => Ok(Self::Cpu),
            "webgpu" | "gpu" => Ok(Self::WebGpu),
            other => Err(Error::invalid_argument(format!(
                "unknown execution provider `{other}` (expected cpu, wasm, webgpu or gpu)"
            ))),
        }
    }
    pub fn name(&self) -> &'static str {
        match self {
            Self::Cpu => "cpu",
            Self::WebGpu => "webgpu",
        }
    }
}

#[derive(Clone, Default)]
pub struct SessionOptions {
    /// Providers in order of preference; the CPU is always the last resort. Empty means `[Cpu]`.
    pub execution_providers: Vec<ExecutionProvider>,
    /// onnxruntime's `freeDimensionOverrides`: named dims fixed at load.
    pub free_dimension_overrides: HashMap<String, i64>,
    /// onnxruntime's `graphOptimizationLevel`.
    pub optimization: OptimizationLevel,
    /// Where external tensor data comes from (browsers: bytes the caller fetched).
    pub external_data: Option<Arc<dyn ExternalDataResolver>>,
    /// Inputs fixed at load time and folded as constants (they leave `inputs()`).
    pub constant_inputs: Vec<(String, Tensor)>,
    /// CPU threads for tract's kernels (`None` or 1: the calling thread only).
    pub intra_op_num_threads: Option<usize>,
    /// Custom operators the application computes (later entries win for the same domain and op type; they
    /// override kiln's built-in ops, the tokenizers included). A model using them runs on the CPU, node by node.
    pub custom_ops: Vec<CustomOpRegistration>,
    /// onnxruntime-web's `preferredOutputLocation`: outputs to leave on the GPU (`'gpu-buffer'`, WebGPU sessions
    /// only) instead of reading them back (`'cpu'`, the default). [`RunOptions`] may override it per run.
    pub preferred_output_location: PreferredOutputLocation,
    /// kiln's decoder helpers (not onnxruntime's): the logits of the last position only, and an extra output
    /// `kiln_next_token` (the greedy token, int64 `[batch, 1]`) so a greedy step reads back one integer.
    pub generation: kiln_graph::generation::GenerationOptions,
    /// How the WebGPU provider requests its adapter (power preference, fallback adapter).
    pub webgpu_adapter: kiln_wgsl::AdapterOptions,
    /// WebGPU sessions on this thread share one device (made by the first with its `webgpu_adapter`), as onnxruntime-web's
    /// sessions do: a GPU tensor of one session feeds another. Off: each session has a device of its own.
    pub share_gpu_device: bool,
    /// WebGPU sessions: large external-data weights go from the data source straight into their GPU buffers, in
    /// bounded reads, never whole in host memory (on by default: weights of 64 KiB or more, 4 MiB reads). CPU
    /// sessions read external data into memory as before.
    pub weight_streaming: kiln_graph::WeightStreaming,
    /// WebGPU sessions: submit a run's recorded work each time it reaches this many dispatches, without waiting,
    /// so the GPU starts while the rest is recorded (0: one submit per flush). `None`: 32 on GPUs, 0 on CPU adapters
    /// (`kiln_wgsl::exec::default_submit_every`).
    pub gpu_submit_every: Option<usize>,
    /// WebGPU sessions: the kernels' tuning, for a GPU or for a CPU adapter (`None`: what the adapter is;
    /// KILN_GPU_TUNING=gpu|cpu changes that default for the whole process).
    pub gpu_tuning: Option<kiln_wgsl::Tuning>,
    /// WebGPU sessions of float16 models: fuse their attention and append their KV cache in place (see
    /// `kiln_graph::passes::f16_fused_attention`). `None`: on, unless KILN_GPU_F16_FUSED_ATTENTION=0.
    pub gpu_f16_fused_attention: Option<bool>,
    /// WebGPU sessions of float16 models: float16 products in their matmuls and attention where the adapter has
    /// shader-f16 (see `kiln_graph::passes::float16_math`). `None`: on, unless KILN_GPU_F16_MATH=0.
    pub gpu_f16_math: Option<bool>,
}

impl std::fmt::Debug for SessionOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionOptions")
            .field("execution_providers", &self.execution_providers)
            .field("free_dimension_overrides", &self.free_dimension_overrides)
            .field("optimization", &self.optimization)
            .field("intra_op_num_threads", &self.intra_op_num_threads)
            .field("custom_ops", &self.custom_ops)
            .field("preferred_output_location", &self.preferred_output_location)
            .field("generation", &self.generation)
            .field("webgpu_adapter", &self.webgpu_adapter)
            .field("share_gpu_device", &self.share_gpu_device)
            .field("weight_streaming", &self.weight_streaming)
            .field("gpu_submit_every", &self.gpu_submit_every)
            .field("gpu_tuning", &self.gpu_tuning)
            .field("gpu_f16_fused_attention", &self.gpu_f16_fused_attention)
            .field("gpu_f16_math", &self.gpu_f16_math)
            .finish()
    }
}

impl SessionOptions {
    fn wants_gpu(&self) -> bool {
        self.execution_providers.first() == Some(&ExecutionProvider::WebGpu)
    }
    /// Whether the import leaves large external weights in the source (GPU sessions without custom operators).
    fn streams_weights(&self) -> bool {
        self.wants_gpu() && self.weight_streaming.enabled && self.custom_ops.is_empty()
    }
    fn load_options(&self) -> LoadOptions {
        // The GPU lowering works on the decluttered model; the CPU fallback optimises it afterwards.
        let optimization = if self.wants_gpu() && self.optimization == OptimizationLevel::All {
            OptimizationLevel::Basic
        } else {
            self.optimization
        };
        LoadOptions {
            free_dimension_overrides: self.free_dimension_overrides.clone(),
            optimization,
            external_data: self.external_data.clone(),
            constant_inputs: self.constant_inputs.iter().map(|(n, t)| (n.clone(), t.as_tract().clone())).collect(),
            generation: self.generation.clone(),
            f16_fused_attention: if self.wants_gpu() { self.gpu_f16_fused_attention } else { Some(false) },
            f16_math: if self.wants_gpu() { self.gpu_f16_math } else { Some(false) },
        }
    }
}

/// The outputs of a run, in the order asked for. Outputs left on the GPU (`'gpu-buffer'`) are [`Value::Gpu`]:
/// [`Outputs::get`], [`Outputs::iter`], [`Outputs::take`] and [`Outputs::into_vec`] see the host tensors only;
/// [`Outputs::value`], [`Outputs::gpu`], [`Outputs::take_value`] and [`Outputs::into_values`] see every output.
#[derive(Debug, Clone, Default)]
pub struct Outputs {
    entries: Vec<(String, Value)>,
}

impl Outputs {
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.value(name).and_then(|v| v.as_tensor())
    }
    /// One output, on the host or on the GPU.
    pub fn value(&self, name: &str) -> Option<&Value> {
        self.entries.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }
    /// One output left on the GPU.
    pub fn gpu(&self, name: &str) -> Option<&GpuTensor> {
        self.value(name).and_then(|v| v.as_gpu())
    }
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(n, _)| n.as_str())
    }
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.entries.iter().filter_map(|(n, v)| v.as_tensor().map(|t| (n.as_str(), t)))
    }
    pub fn values(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.entries.iter().map(|(n, v)| (n.as_str(), v))
    }
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    pub fn into_vec(self) -> Vec<(String, Tensor)> {
        self.entries
            .into_iter()
            .filter_map(|(n, v)| match v {
                Value::Cpu(t) => Some((n, t)),
                Value::Gpu(_) => None,
            })
            .collect()
    }
    pub fn into_values(self) -> Vec<(String, Value)> {
        self.entries
    }
    /// Removes and returns one host output.
    pub fn take(&mut self, name: &str) -> Option<Tensor> {
        let ix = self.entries.iter().position(|(n, v)| n == name && v.as_tensor().is_some())?;
        match self.entries.remove(ix).1 {
            Value::Cpu(t) => Some(t),
            Value::Gpu(_) => None,
        }
    }
    /// Removes and returns one output, on the host or on the GPU.
    pub fn take_value(&mut self, name: &str) -> Option<Value> {
        let ix = self.entries.iter().position(|(n, _)| n == name)?;
        Some(self.entries.remove(ix).1)
    }
}

impl Outputs {
    /// One output by name; an error lists the outputs this run returned (and says when it is on the GPU).
    pub fn output(&self, name: &str) -> Result<&Tensor> {
        match self.value(name) {
            Some(Value::Cpu(t)) => Ok(t),
            Some(Value::Gpu(_)) => Err(Error::invalid_argument(format!(
                "output `{name}` is on the GPU (preferred output location 'gpu-buffer'): download() it"
            ))),
            None => Err(Error::invalid_argument(format!(
                "no output named `{name}` in this run's outputs ({})",
                self.names().collect::<Vec<_>>().join(", ")
            ))),
        }
    }
}

pub(crate) enum Backend {
    Cpu(CpuBackend),
    Gpu(Box<crate::gpu::GpuBackend>),
}

/// A loaded model ready to run.
pub struct Session {
    model: Arc<Model>,
    backend: Backend,
    provider: ExecutionProvider,
    provider_note: Option<String>,
    preferred_output_location: PreferredOutputLocation,
}

/// Loads a model after rewriting the nodes of registered custom operators into host-op nodes.
fn load_with_custom_ops(bytes: &[u8], load: LoadOptions, options: &SessionOptions) -> Result<Model> {
    let mut proto = kiln_graph::decode(bytes)?;
    let decls: Vec<_> = options.custom_ops.iter().map(|c| c.decl()).collect();
    kiln_ops::host_op::rewrite_custom_nodes(&mut proto, &decls)
        .map_err(|e| Error::from_tract(ErrorKind::InvalidModel, "custom operators", &e))?;
    kiln_graph::load_proto(proto, &load)
}

pub(crate) fn guard<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            Err(Error::runtime(format!("{what}: internal error (caught panic: {msg})")))
        }
    }
}

impl Session {
    /// Loads a model from ONNX bytes.
    pub async fn from_bytes(bytes: &[u8], options: &SessionOptions) -> Result<Session> {
        if options.streams_weights() {
            if let Some(resolver) = options.external_data.clone() {
                let model = Self::load_streaming(bytes, resolver, options).await?;
                return Self::from_model(model, options).await;
            }
        }
        let model = guard("loading the model", || {
            if options.custom_ops.is_empty() {
                kiln_graph::load_bytes(bytes, &options.load_options())
            } else {
                load_with_custom_ops(bytes, options.load_options(), options)
            }
        })?;
        Self::from_model(model, options).await
    }

    /// Loads a model from a file; external data defaults to the model's folder. A GPU session reads the file without
    /// its large initializers' data ([`Session::from_source`]): those stream from the file into GPU buffers.
    pub async fn from_path(path: impl AsRef<Path>, options: &SessionOptions) -> Result<Session> {
        let path = path.as_ref();
        if options.streams_weights() {
            let size = std::fs::metadata(path)
                .map_err(|e| Error::new(ErrorKind::Io, format!("reading model {}: {e}", path.display())))?
                .len();
            let rest: Arc<dyn ExternalDataResolver> = match &options.external_data {
                Some(r) => r.clone(),
                None => {
                    let dir = path.parent().map(|p| p.to_path_buf()).unwrap_or_else(|| ".".into());
                    Arc::new(kiln_graph::DirectoryResolver { dir })
                }
            };
            let source = Arc::new(kiln_graph::ModelFileResolver { path: path.to_path_buf(), rest });
            return Self::from_source(source, size, options).await;
        }
        let model = guard("loading the model", || {
            if options.custom_ops.is_empty() {
                return kiln_graph::load_path(path, &options.load_options());
            }
            let bytes = std::fs::read(path)
                .map_err(|e| Error::new(ErrorKind::Io, format!("reading model {}: {e}", path.display())))?;
            let mut load = options.load_options();
            if load.external_data.is_none() {
                let dir = path.parent().map(|p| p.to_path_buf()).unwrap_or_else(|| ".".into());
                load.external_data = Some(Arc::new(kiln_graph::DirectoryResolver { dir }));
            }
            load_with_custom_ops(&bytes, load, options)
        })?;
        Self::from_model(model, options).await
    }

    /// Loads a model of `size` bytes that `source` reads under [`kiln_graph::MODEL_ITSELF`] (a browser's Blob, a
    /// file), its external data from the same source. A GPU session reads the protobuf without the data of its large
    /// initializers ([`kiln_graph::skeleton`]), which stays in the source like external data and streams into GPU
    /// buffers: the model is never whole in memory. Other sessions read the model whole.
    pub async fn from_source(
        source: Arc<dyn ExternalDataResolver>,
        size: u64,
        options: &SessionOptions,
    ) -> Result<Session> {
        if options.streams_weights() {
            let streaming = &options.weight_streaming;
            let sk =
                kiln_graph::skeleton(&*source, kiln_graph::MODEL_ITSELF, size, streaming.min_bytes, streaming.chunk())
                    .await?;
            if sk.moved > 0 {
                log::info!(
                    "{} initializer(s), {} bytes, left in the model file for streaming",
                    sk.moved,
                    sk.moved_bytes
                );
            }
            let model = Self::load_streaming(&sk.bytes, source, options).await?;
            return Self::from_model(model, options).await;
        }
        let bytes = source.read_range(kiln_graph::MODEL_ITSELF, 0, size).await?;
        let mut options = options.clone();
        options.external_data = Some(source);
        Box::pin(Self::from_bytes(&bytes, &options)).await
    }

    /// The streaming import (GPU sessions): large external initializers stay in `resolver` as ExternalWeight
    /// nodes, smaller ones are read asynchronously (kiln_graph::stream_external_initializers).
    async fn load_streaming(
        bytes: &[u8],
        resolver: Arc<dyn ExternalDataResolver>,
        options: &SessionOptions,
    ) -> Result<Model> {
        let mut proto = guard("loading the model", || kiln_graph::decode(bytes))?;
        let streamed =
            kiln_graph::stream_external_initializers(&mut proto, &*resolver, &options.weight_streaming).await?;
        if streamed > 0 {
            log::info!("{streamed} external weight(s) left in the external data, for streaming to the GPU");
        }
        let mut load = options.load_options();
        load.external_data = Some(resolver);
        guard("loading the model", || kiln_graph::load_proto(proto, &load))
    }

    /// Streamed weights read into memory (the CPU runs the model).
    async fn materialize_weights(model: &mut Model, options: &SessionOptions) -> Result<()> {
        let source = model.weight_source.clone();
        kiln_graph::stream::materialize_all(&mut model.typed, source.as_ref(), options.weight_streaming.chunk())
            .await?;
        Ok(())
    }

    async fn from_model(mut model: Model, options: &SessionOptions) -> Result<Session> {
        let mut gpu_backend = None;
        let mut gpu_note = String::new();
        let host_ops = crate::cpu::has_host_ops(&model.typed);
        if options.wants_gpu() && host_ops {
            gpu_note = "the model has custom operators, which run on the CPU only".into();
            log::warn!("execution provider webgpu: {gpu_note}; using the next provider");
            Self::materialize_weights(&mut model, options).await?;
            if options.optimization == OptimizationLevel::All {
                model
                    .typed
                    .optimize()
                    .map_err(|e| Error::from_tract(ErrorKind::InvalidModel, "optimising the model", &e))?;
            }
        } else if options.wants_gpu() {
            match crate::gpu::GpuBackend::create(&mut model, options).await {
                Ok(b) => gpu_backend = Some(b),
                Err(msg) => {
                    log::warn!("execution provider webgpu: {msg}; using the next provider");
                    gpu_note = msg;
                    Self::materialize_weights(&mut model, options).await?;
                    if options.optimization == OptimizationLevel::All {
                        model
                            .typed
                            .optimize()
                            .map_err(|e| Error::from_tract(ErrorKind::InvalidModel, "optimising the model", &e))?;
                    }
                }
            }
        }
        // every streamed weight is on the GPU or in memory now: the source (a browser's Blob, caller's bytes) is let go
        model.weight_source = None;
        let model = Arc::new(model);
        let mut note = None;
        let wanted = if options.execution_providers.is_empty() {
            vec![ExecutionProvider::Cpu]
        } else {
            options.execution_providers.clone()
        };
        for ep in &wanted {
            match ep {
                ExecutionProvider::Cpu => {
                    let backend = guard("planning the model", || CpuBackend::new(model.clone(), options))?;
                    return Ok(Session {
                        model,
                        backend: Backend::Cpu(backend),
                        provider: ExecutionProvider::Cpu,
                        provider_note: note,
                        preferred_output_location: options.preferred_output_location.clone(),
                    });
                }
                ExecutionProvider::WebGpu if gpu_backend.is_some() => {
                    if let Some(backend) = gpu_backend.take() {
                        return Ok(Session {
                            model,
                            backend: Backend::Gpu(Box::new(backend)),
                            provider: ExecutionProvider::WebGpu,
                            provider_note: note,
                            preferred_output_location: options.preferred_output_location.clone(),
                        });
                    }
                }
                ExecutionProvider::WebGpu => {
                    let why = gpu_note.as_str();
                    note = Some(format!("execution provider webgpu: {why}; using the next provider"));
                }
            }
        }
        log::warn!("no requested execution provider is available; falling back to cpu");
        let backend = guard("planning the model", || CpuBackend::new(model.clone(), options))?;
        Ok(Session {
            model,
            backend: Backend::Cpu(backend),
            provider: ExecutionProvider::Cpu,
            provider_note: note.or(Some("falling back to cpu".into())),
            preferred_output_location: options.preferred_output_location.clone(),
        })
    }

    pub fn inputs(&self) -> &[ValueInfo] {
        &self.model.inputs
    }
    pub fn outputs(&self) -> &[ValueInfo] {
        &self.model.outputs
    }
    pub fn input_names(&self) -> Vec<&str> {
        self.model.inputs.iter().map(|i| i.name.as_str()).collect()
    }
    pub fn output_names(&self) -> Vec<&str> {
        self.model.outputs.iter().map(|i| i.name.as_str()).collect()
    }
    /// The provider the session runs on.
    pub fn execution_provider(&self) -> ExecutionProvider {
        self.provider
    }
    /// Why the session is not on the first provider asked for, if it is not.
    pub fn provider_note(&self) -> Option<&str> {
        self.provider_note.as_deref()
    }
    /// The loaded model. On the WebGPU provider its typed graph keeps the structure but not the constants' data:
    /// those live in the GPU backend's plan (what CPU nodes need) and on the GPU (the weights), not twice.
    pub fn model(&self) -> &Model {
        &self.model
    }
    /// The GPU placement report (`None` when the session runs on the CPU).
    pub fn gpu_placement(&self) -> Option<crate::gpu::PlacementReport> {
        match &self.backend {
            Backend::Gpu(g) => Some(g.report()),
            Backend::Cpu(_) => None,
        }
    }
    /// The wgpu device the WebGPU provider runs on (`None` on the CPU). In a browser it wraps a `GPUDevice`
    /// (`wgpu::Device::as_webgpu`).
    pub fn gpu_device(&self) -> Option<&kiln_wgsl::wgpu::Device> {
        match &self.backend {
            Backend::Gpu(g) => Some(g.device()),
            Backend::Cpu(_) => None,
        }
    }
    /// Tests: fill fresh GPU output buffers with NaN so unwritten elements show.
    pub fn set_gpu_poison(&self, on: bool) {
        if let Backend::Gpu(g) = &self.backend {
            g.set_poison(on);
        }
    }

    /// Runs the model and returns every output. Feeds are host [`Tensor`]s or [`GpuTensor`]s (anything
    /// `Into<Value>`).
    pub async fn run<N: AsRef<str>, V: Into<Value>>(&self, feeds: impl IntoIterator<Item = (N, V)>) -> Result<Outputs> {
        self.run_with(feeds, None, &RunOptions::default()).await
    }

    /// Runs the model computing only the named outputs (in that order).
    pub async fn run_with_outputs<N: AsRef<str>, V: Into<Value>>(
        &self,
        feeds: impl IntoIterator<Item = (N, V)>,
        output_names: &[&str],
    ) -> Result<Outputs> {
        self.run_with(feeds, Some(output_names), &RunOptions::default()).await
    }

    /// Runs the model computing the named outputs (every output when `None`), with run options.
    pub async fn run_with<N: AsRef<str>, V: Into<Value>>(
        &self,
        feeds: impl IntoIterator<Item = (N, V)>,
        output_names: Option<&[&str]>,
        options: &RunOptions,
    ) -> Result<Outputs> {
        let ixs = match output_names {
            None => (0..self.model.outputs.len()).collect(),
            Some(names) => self.output_indices(names)?,
        };
        let prefs = options.preferred_output_location.as_ref().unwrap_or(&self.preferred_output_location);
        self.run_indices(feeds, &ixs, prefs).await
    }

    fn output_indices(&self, output_names: &[&str]) -> Result<Vec<usize>> {
        let mut ixs = vec![];
        for name in output_names {
            let ix = self.model.outputs.iter().position(|o| o.name == *name).ok_or_else(|| {
                Error::invalid_argument(format!(
                    "invalid output name: `{name}` (the model's outputs are: {})",
                    self.output_names().join(", ")
                ))
            })?;
            if ixs.contains(&ix) {
                return Err(Error::invalid_argument(format!("output `{name}` is asked for twice")));
            }
            ixs.push(ix);
        }
        if ixs.is_empty() {
            return Err(Error::invalid_argument("no output asked for"));
        }
        Ok(ixs)
    }

    /// A GPU tensor in an application's `buffer` (onnxruntime-web's `Tensor.fromGpuBuffer`): the buffer must have
    /// been made on this session's device ([`Session::gpu_device`]; wgpu cannot tell a buffer's device, so this is
    /// the caller's promise), row-major from offset 0, with `STORAGE` and `COPY_SRC` usage and at least the
    /// tensor's bytes; element types f32, f16, int32, uint32. The tensor feeds this session (and is refused by a
    /// session on another device). An error on the CPU provider.
    pub fn gpu_tensor_from_buffer(
        &self,
        buffer: kiln_wgsl::wgpu::Buffer,
        element_type: ElementType,
        dims: &[usize],
    ) -> Result<GpuTensor> {
        match &self.backend {
            Backend::Gpu(g) => GpuTensor::from_buffer(g.context(), buffer, element_type, dims),
            Backend::Cpu(_) => {
                Err(Error::invalid_argument("Tensor location \"gpu-buffer\" is not supported without using WebGPU."))
            }
        }
    }

    /// True when the model has nodes computed by the application's custom operators.
    pub fn has_custom_ops(&self) -> bool {
        match &self.backend {
            Backend::Cpu(cpu) => cpu.has_host_ops(),
            Backend::Gpu(_) => false,
        }
    }

    async fn run_indices<N: AsRef<str>, V: Into<Value>>(
        &self,
        feeds: impl IntoIterator<Item = (N, V)>,
        outputs: &[usize],
        prefs: &PreferredOutputLocation,
    ) -> Result<Outputs> {
        let inputs = self.order_feeds(feeds)?;
        let locations: Vec<Location> =
            outputs.iter().map(|ix| prefs.location_of(&self.model.outputs[*ix].name)).collect();
        let values = match &self.backend {
            Backend::Gpu(gpu) => gpu.run_guarded(inputs, outputs, &locations).await?,
            Backend::Cpu(cpu) => {
                let mut host = Vec::with_capacity(inputs.len());
                for (v, info) in inputs.into_iter().zip(&self.model.inputs) {
                    match v {
                        Value::Cpu(t) => host.push(t),
                        Value::Gpu(_) => {
                            return Err(Error::invalid_argument(format!(
                                "input `{}`: Tensor location \"gpu-buffer\" is not supported without using WebGPU.",
                                info.name
                            )))
                        }
                    }
                }
                if locations.contains(&Location::GpuBuffer) {
                    return Err(Error::invalid_argument(
                        "preferredLocation \"gpu-buffer\" is not supported without using WebGPU.",
                    ));
                }
                let v = if cpu.has_host_ops() {
                    cpu.run_stepwise(host, outputs).await?
                } else {
                    guard("running the model", || cpu.run(host, outputs))?
                };
                v.into_iter().map(Value::Cpu).collect()
            }
        };
        let mut entries = vec![];
        for (ix, v) in outputs.iter().zip(values) {
            entries.push((self.model.outputs[*ix].name.clone(), v));
        }
        Ok(Outputs { entries })
    }

    /// Checks feeds against the model's declared inputs, in onnxruntime's words, and orders them.
    fn order_feeds<N: AsRef<str>, V: Into<Value>>(
        &self,
        feeds: impl IntoIterator<Item = (N, V)>,
    ) -> Result<Vec<Value>> {
        let mut slots: Vec<Option<Value>> = vec![None; self.model.inputs.len()];
        for (name, t) in feeds {
            let name = name.as_ref();
            let t: Value = t.into();
            let ix = self.model.inputs.iter().position(|i| i.name == name).ok_or_else(|| {
                Error::invalid_argument(format!(
                    "invalid input name: `{name}` (the model's inputs are: {})",
                    self.input_names().join(", ")
                ))
            })?;
            if slots[ix].is_some() {
                return Err(Error::invalid_argument(format!("input `{name}` is fed twice")));
            }
            check_feed(&self.model.inputs[ix], &t)?;
            slots[ix] = Some(t);
        }
        let missing: Vec<&str> =
            self.model.inputs.iter().zip(&slots).filter(|(_, s)| s.is_none()).map(|(i, _)| i.name.as_str()).collect();
        if !missing.is_empty() {
            return Err(Error::invalid_argument(format!("missing input(s): {}", missing.join(", "))));
        }
        Ok(slots.into_iter().flatten().collect())
    }
}

fn check_feed(info: &ValueInfo, t: &Value) -> Result<()> {
    match info.element_type {
        Some(et) if et != t.element_type() => {
            return Err(Error::invalid_argument(format!(
                "input `{}`: unexpected element type. Actual: {}, expected: {}",
                info.name,
                t.element_type(),
                et
            )))
        }
        None => {
            return Err(Error::not_implemented(format!(
                "input `{}` has element type {} which kiln does not support",
                info.name,
                kiln_graph::onnx_type_name(info.onnx_type)
            )))
        }
        _ => {}
    }
    if let Some(shape) = &info.shape {
        if shape.len() != t.dims().len() {
            return Err(Error::invalid_argument(format!(
                "input `{}`: invalid rank. Got: {} (dims {:?}), expected: {} (shape {})",
                info.name,
                t.dims().len(),
                t.dims(),
                shape.len(),
                info.shape_string()
            )));
        }
        let bad: Vec<String> = shape
            .iter()
            .zip(t.dims())
            .enumerate()
            .filter_map(|(i, (d, got))| match d {
                Dim::Fixed(v) if v != got => Some(format!("index {i}: got {got}, expected {v}")),
                _ => None,
            })
            .collect();
        if !bad.is_empty() {
            return Err(Error::invalid_argument(format!(
                "input `{}`: invalid dimensions ({}); the model expects shape {}",
                info.name,
                bad.join("; "),
                info.shape_string()
            )));
        }
    }
    Ok(())
}

/// Element type of a declared value, for callers building feeds.
pub fn element_type_of(info: &ValueInfo) -> Result<ElementType> {
    info.element_type.ok_or_else(|| {
        Error::new(ErrorKind::NotImplemented, format!("`{}` has an unsupported element type", info.name))
    })
}
