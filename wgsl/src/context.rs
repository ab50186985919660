//! The wgpu device: adapter selection, limits and features, the error handler, the pipeline cache.

use crate::FastMap as HashMap;
use std::sync::{Arc, Mutex};

use crate::{Error, Result};

/// What the adapter can do, as the kernels and the lowering need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caps {
    pub adapter: String,
    pub backend: String,
    /// Largest storage buffer binding (128 MiB on lavapipe).
    pub max_storage_binding: u64,
    pub max_buffer_size: u64,
    /// Invocations per workgroup (256 on SwiftShader).
    pub max_invocations: u32,
    pub max_workgroups_per_dim: u32,
    pub min_uniform_alignment: u32,
    /// Storage buffers one kernel may bind (WebGPU's default and Chrome's usual: 8); the fusions that bind more
    /// buffers (kiln-graph's matmul epilogues and splits) stay within it.
    pub max_storage_buffers: u32,
    /// The adapter runs on the CPU (lavapipe, SwiftShader where the browser says so): kernels tuned for few
    /// invocations with more work each.
    pub cpu_adapter: bool,
    pub shader_f16: bool,
    /// Subgroup operations are enabled on the device (natively only; the one-row matmul's reductions use them).
    pub subgroups: bool,
}

impl Caps {
    /// The limits every WebGPU implementation offers, for lowering without a device (tests, reports).
    pub fn webgpu_defaults() -> Caps {
        Caps {
            adapter: "(none)".into(),
            backend: "(none)".into(),
            max_storage_binding: 128 << 20,
            max_buffer_size: 256 << 20,
            max_invocations: 256,
            max_workgroups_per_dim: 65535,
            min_uniform_alignment: 256,
            max_storage_buffers: 8,
            cpu_adapter: false,
            shader_f16: false,
            subgroups: false,
        }
    }
}

/// Environment variable capping the storage binding size kiln plans for (bytes; tests of the splitting and the
/// "shape too large" fallback use a small cap on any adapter).
pub const MAX_BINDING_ENV: &str = "KILN_GPU_MAX_BINDING";

/// Environment variable that, set to `1`, leaves the adapter's shader-f16 feature unused: f16 tensors are then
/// handled as u32 words (pack / unpack in f32 arithmetic), as on an adapter without it (Chrome's SwiftShader) —
/// so CI on lavapipe, which has shader-f16, tests both paths.
pub const NO_F16_ENV: &str = "KILN_GPU_NO_F16";

/// Environment variable choosing the kernels' tuning whatever the adapter: `gpu` or `cpu` ([`Caps::cpu_adapter`]),
/// so CI on lavapipe (a CPU adapter) tests the GPU shapes of the kernels too.
pub const TUNING_ENV: &str = "KILN_GPU_TUNING";

/// The kernels' tuning ([`Caps::cpu_adapter`]): for a GPU (wide workgroups, many of them) or for a CPU adapter
/// (lavapipe, SwiftShader: few invocations, little synchronisation). A session may force either
/// ([`Context::with_tuning`]); by default the adapter decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Tuning {
    #[default]
    Gpu,
    Cpu,
}

impl Caps {
    /// These caps with `max_storage_binding` (and `max_buffer_size`) lowered to [`MAX_BINDING_ENV`] when it is set
    /// to a smaller positive number of bytes (a multiple of 4 is kept). (There is no environment in a browser.)
    pub fn with_env_cap(mut self) -> Caps {
        if let Some(cap) = std::env::var(MAX_BINDING_ENV).ok().and_then(|v| v.trim().parse::<u64>().ok()) {
            let cap = cap / 4 * 4;
            if cap > 0 {
                self = self.with_binding_cap(cap);
            }
        }
        self
    }

    /// These caps with the storage binding and buffer size limits lowered to at most `cap` bytes.
    pub fn with_binding_cap(mut self, cap: u64) -> Caps {
        self.max_storage_binding = self.max_storage_binding.min(cap);
        self.max_buffer_size = self.max_buffer_size.min(cap);
        self
    }
}

/// A compute pipeline's identity: the kernel family, the entry point and the specialisation (the substituted
/// template values). Runtime sizes never enter it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PipelineKey {
    pub family: &'static str,
    pub entry: &'static str,
    pub spec: Vec<(&'static str, String)>,
}

/// [`Context::memo_pipeline`]'s cache: by the hash of (key type, key), the keys of that hash and their pipelines.
type MemoMap = crate::FastMap<u64, Vec<(Box<dyn std::any::Any + Send + Sync>, Arc<wgpu::ComputePipeline>)>>;

pub struct Context {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub caps: Caps,
    errors: Arc<Mutex<Vec<String>>>,
    pipelines: Mutex<HashMap<PipelineKey, Arc<wgpu::ComputePipeline>>>,
    /// Pipelines by a kernel's own key ([`Context::memo_pipeline`]).
    memo: Mutex<MemoMap>,
    compiled: Mutex<usize>,
    /// Staging buffers of finished downloads ([`crate::exec::Download`]), reused: a decode loop reading its token
    /// back each step makes none after the first.
    pub(crate) staging: Arc<Mutex<Vec<wgpu::Buffer>>>,
    /// Timestamp queries around every dispatch (KILN_GPU_PROFILE=1, native, where the adapter has them).
    pub profiling: bool,
    /// With `profiling`: kernels also labelled by their node's kernel (KILN_GPU_PROFILE=ops).
    pub profile_ops: bool,
    /// Shared by the contexts of one device ([`Context::with_tuning`]): wgpu's device equality compares ids,
    /// which two instances may repeat.
    device_key: Arc<()>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").field("caps", &self.caps).finish()
    }
}

#[cfg(not(target_arch = "wasm32"))]
fn quiet_loader() {
    // The Vulkan loader complains on stderr when XDG_RUNTIME_DIR is unset or unusable; give it a private folder.
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("XDG_RUNTIME_DIR").is_some() {
            return;
        }
        let dir = std::env::temp_dir().join(format!("kiln-xdg-{}", std::process::id()));
        if std::fs::create_dir_all(&dir).is_ok() {
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
            }
            std::env::set_var("XDG_RUNTIME_DIR", &dir);
        }
    });
}

/// How the adapter is requested (WebGPU's `GPURequestAdapterOptions`; onnxruntime-web's `env.webgpu.powerPreference`
/// and `env.webgpu.forceFallbackAdapter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AdapterOptions {
    /// `wgpu::PowerPreference::None`: the platform's default (what a browser does without a preference).
    pub power_preference: wgpu::PowerPreference,
    pub force_fallback_adapter: bool,
}

impl Default for AdapterOptions {
    fn default() -> Self {
        AdapterOptions { power_preference: wgpu::PowerPreference::HighPerformance, force_fallback_adapter: false }
    }
}

thread_local! {
    /// The context [`Context::shared`] hands out (kept for the thread's lifetime, like onnxruntime-web's one device).
    static SHARED: std::cell::RefCell<Option<Arc<Context>>> = const { std::cell::RefCell::new(None) };
}

impl Context {
    /// The first adapter wgpu offers (high performance preferred), or `Ok(None)` when there is none.
    pub async fn new() -> Result<Option<Arc<Context>>> {
        Self::with_adapter(&AdapterOptions::default()).await
    }

    /// One context for every caller on this thread (onnxruntime-web's single `GPUDevice` per page: GPU tensors of
    /// one session feed another): the first call makes it with `options`, later calls get the same one, whatever
    /// their options. `Ok(None)` when there is no adapter (asked again next time).
    pub async fn shared(options: &AdapterOptions) -> Result<Option<Arc<Context>>> {
        if let Some(ctx) = SHARED.with(|s| s.borrow().clone()) {
            return Ok(Some(ctx));
        }
        let made = Self::with_adapter(options).await?;
        let Some(made) = made else { return Ok(None) };
        // another caller may have made one while this one awaited the adapter: the first stays
        Ok(Some(SHARED.with(|s| s.borrow_mut().get_or_insert(made).clone())))
    }

    /// The adapter `options` asks for, or `Ok(None)` when there is none.
    pub async fn with_adapter(options: &AdapterOptions) -> Result<Option<Arc<Context>>> {
        #[cfg(not(target_arch = "wasm32"))]
        quiet_loader();
        // In a page or worker without WebGPU (or in Node, which has neither window nor worker scope and where
        // wgpu's instance would panic), there is no adapter.
        #[cfg(target_arch = "wasm32")]
        if !wgpu::util::is_browser_webgpu_supported().await {
            log::info!("webgpu: navigator.gpu is missing or has no adapter");
            return Ok(None);
        }
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
        let adapter = match instance
            .request_adapter(&wgpu::RequestAdapterOptions {
                power_preference: options.power_preference,
                force_fallback_adapter: options.force_fallback_adapter,
                ..Default::default()
            })
            .await
        {
            Ok(a) => a,
            Err(e) => {
                log::info!("webgpu: no adapter ({e})");
                return Ok(None);
            }
        };
        let info = adapter.get_info();
        let limits = adapter.limits();
        let features = adapter.features();
        let mut required = wgpu::Features::empty();
        let no_f16 = std::env::var(NO_F16_ENV).is_ok_and(|v| v.trim() == "1");
        let shader_f16 = features.contains(wgpu::Features::SHADER_F16) && !no_f16;
        if shader_f16 {
            required |= wgpu::Features::SHADER_F16;
        }
        // subgroup operations natively (browsers want `enable subgroups;`, which naga rejects: not used there)
        let subgroups = cfg!(not(target_arch = "wasm32")) && features.contains(wgpu::Features::SUBGROUP);
        if subgroups {
            required |= wgpu::Features::SUBGROUP;
        }
        // KILN_GPU_PROFILE=1 (native): GPU time per kernel from timestamp queries (kiln-run --placement prints it);
        // KILN_GPU_PROFILE=ops: per kernel entry and node kernel
        #[cfg(not(target_arch = "wasm32"))]
        let profiling = std::env::var("KILN_GPU_PROFILE").is_ok_and(|v| v == "1" || v == "ops")
            && features.contains(wgpu::Features::TIMESTAMP_QUERY);
        #[cfg(target_arch = "wasm32")]
        let profiling = false;
        let profile_ops = profiling && std::env::var("KILN_GPU_PROFILE").is_ok_and(|v| v == "ops");
        if profiling {
            required |= wgpu::Features::TIMESTAMP_QUERY;
        }
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("kiln"),
                required_features: required,
                required_limits: limits.clone(),
                ..Default::default()
            })
            .await
            .map_err(|e| Error::new(format!("webgpu: requesting a device from {}: {e}", info.name)))?;
        let errors: Arc<Mutex<Vec<String>>> = Arc::default();
        let sink = errors.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            log::error!("webgpu: {e}");
            if let Ok(mut v) = sink.lock() {
                v.push(e.to_string());
            }
        }));
        let caps = Caps {
            adapter: info.name.clone(),
            backend: format!("{:?}", info.backend),
            max_storage_binding: limits.max_storage_buffer_binding_size,
            max_buffer_size: limits.max_buffer_size,
            max_invocations: limits.max_compute_invocations_per_workgroup,
            max_workgroups_per_dim: limits.max_compute_workgroups_per_dimension,
            min_uniform_alignment: limits.min_uniform_buffer_offset_alignment,
            shader_f16,
            subgroups,
            max_storage_buffers: limits.max_storage_buffers_per_shader_stage,
            cpu_adapter: match std::env::var(TUNING_ENV).as_deref() {
                Ok("gpu") => false,
                Ok("cpu") => true,
                _ => info.device_type == wgpu::DeviceType::Cpu || info.name.contains("SwiftShader"),
            },
        };
        let caps = caps.with_env_cap();
        log::info!("webgpu: adapter {} ({}), {:?}", caps.adapter, caps.backend, caps);
        Ok(Some(Arc::new(Context {
            device,
            queue,
            caps,
            errors,
            pipelines: Mutex::default(),
            memo: Mutex::default(),
            compiled: Mutex::new(0),
            staging: Arc::default(),
            profiling,
            profile_ops,
            device_key: Arc::default(),
        })))
    }

    /// This device with the kernels tuned as `tuning` says: itself when it already is, else a context on the
    /// same device and queue (tensors pass between them) with its own pipeline cache.
    pub fn with_tuning(self: &Arc<Self>, tuning: Tuning) -> Arc<Context> {
        let cpu_adapter = tuning == Tuning::Cpu;
        if self.caps.cpu_adapter == cpu_adapter {
            return self.clone();
        }
        Arc::new(Context {
            device: self.device.clone(),
            queue: self.queue.clone(),
            caps: Caps { cpu_adapter, ..self.caps.clone() },
            errors: self.errors.clone(),
            pipelines: Mutex::default(),
            memo: Mutex::default(),
            compiled: Mutex::new(0),
            staging: self.staging.clone(),
            profiling: self.profiling,
            profile_ops: self.profile_ops,
            device_key: self.device_key.clone(),
        })
    }

    /// Whether `other` drives the same wgpu device (buffers pass between them).
    pub fn same_device(&self, other: &Context) -> bool {
        Arc::ptr_eq(&self.device_key, &other.device_key)
    }

    /// Errors the device reported since the last call, as one kiln error.
    pub fn take_error(&self) -> Result<()> {
        let mut v = self.errors.lock().map_err(|_| Error::new("webgpu: error log poisoned"))?;
        if v.is_empty() {
            return Ok(());
        }
        let msg = v.join("; ");
        v.clear();
        Err(Error::new(format!("webgpu: {msg}")))
    }

    /// How many shader modules this context compiled (a run in the steady state compiles none).
    pub fn compiled_pipelines(&self) -> usize {
        self.compiled.lock().map(|c| *c).unwrap_or(0)
    }

    /// The pipeline for `key`, compiled on first use from `source` (already specialised).
    pub fn pipeline(&self, key: &PipelineKey, source: impl FnOnce() -> String) -> Result<Arc<wgpu::ComputePipeline>> {
        let mut cache = self.pipelines.lock().map_err(|_| Error::new("webgpu: pipeline cache poisoned"))?;
        if let Some(p) = cache.get(key) {
            return Ok(p.clone());
        }
        let text = source();
        debug_assert!(!text.contains("enable subgroups"));
        let label = format!("{}::{}", key.family, key.entry);
        let module = self.device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(&label),
            source: wgpu::ShaderSource::Wgsl(text.into()),
        });
        let pipeline = self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(&label),
            layout: None,
            module: &module,
            entry_point: Some(key.entry),
            compilation_options: Default::default(),
            cache: None,
        });
        self.take_error().map_err(|e| Error::new(format!("compiling {label} {:?}: {}", key.spec, e.message)))?;
        let p = Arc::new(pipeline);
        cache.insert(key.clone(), p.clone());
        if let Ok(mut c) = self.compiled.lock() {
            *c += 1;
        }
        Ok(p)
    }

    /// The pipeline of a kernel known by its own small `key` (its specialisation before any WGSL is made: a
    /// QMatMul's parameters, the attention's configuration and input types), made by `make` the first time: a
    /// dispatch of a kernel seen before costs a hash of that key, not the formatting, hashing and comparing of the
    /// shader's specialisation text. `key` must determine everything `make` puts in the shader.
    pub fn memo_pipeline<K>(
        &self,
        key: &K,
        make: impl FnOnce() -> Result<Arc<wgpu::ComputePipeline>>,
    ) -> Result<Arc<wgpu::ComputePipeline>>
    where
        K: std::hash::Hash + Eq + Clone + Send + Sync + 'static,
    {
        use std::hash::BuildHasher;
        let h = foldhash::fast::FixedState::default().hash_one((std::any::TypeId::of::<K>(), key));
        let poisoned = || Error::new("webgpu: pipeline cache poisoned");
        {
            let memo = self.memo.lock().map_err(|_| poisoned())?;
            let found = memo.get(&h).and_then(|v| v.iter().find(|(k, _)| k.downcast_ref::<K>() == Some(key)));
            if let Some((_, p)) = found {
                return Ok(p.clone());
            }
        }
        // made without the lock held (`make` compiles through Context::pipeline)
        let p = make()?;
        let mut memo = self.memo.lock().map_err(|_| poisoned())?;
        memo.entry(h).or_default().push((Box::new(key.clone()), p.clone()));
        Ok(p)
    }

    /// A 1-D count of workgroups laid on a 2-D grid within the per-dimension limit: (x, y).
    pub fn grid(&self, groups: u64) -> Result<(u32, u32)> {
        let max = self.caps.max_workgroups_per_dim.max(1) as u64;
        if groups <= max {
            return Ok((groups.max(1) as u32, 1));
        }
        let y = groups.div_ceil(max);
        if y > max {
            return Err(Error::new(format!("webgpu: {groups} workgroups exceed the adapter's grid")));
        }
        Ok((max as u32, y as u32))
    }
}
