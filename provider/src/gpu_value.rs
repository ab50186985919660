//! GPU-resident values: onnxruntime-web's `Tensor.fromGpuBuffer` / `tensor.gpuBuffer` and its
//! `preferredOutputLocation: 'cpu' | 'gpu-buffer'`, in Rust.
//!
//! A [`GpuTensor`] is a tensor that lives in a wgpu buffer: an output a WebGPU session left on the GPU, or a buffer
//! the application made (`Session::gpu_tensor_from_buffer`). Fed back to the session it belongs to, it is bound
//! without a copy; a `present.*` fed back as `past_key_values.*` has the next
//! run's KV append write only the new rows (see `kiln_wgsl::kv`). [`Value`] is a feed or an output: a host
//! [`Tensor`] or a [`GpuTensor`].

use std::collections::HashMap;
use std::sync::Arc;

use kiln_graph::{ElementType, Error, ErrorKind, Result};
use kiln_wgsl::wgpu;

use crate::tensor::Tensor;

/// Where a value lives: onnxruntime-web's `Tensor.location` / `preferredOutputLocation` values `'cpu'` and
/// `'gpu-buffer'`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Location {
    #[default]
    Cpu,
    GpuBuffer,
}

impl Location {
    /// onnxruntime-web's names: `'cpu'` (and `'cpu-pinned'`, the same here) and `'gpu-buffer'`; anything else is
    /// refused with onnxruntime-web's message.
    pub fn from_name(name: &str) -> Result<Location> {
        match name {
            "cpu" | "cpu-pinned" => Ok(Location::Cpu),
            "gpu-buffer" => Ok(Location::GpuBuffer),
            other => Err(Error::invalid_argument(format!("Not supported preferred output location: {other}."))),
        }
    }
    pub fn name(&self) -> &'static str {
        match self {
            Location::Cpu => "cpu",
            Location::GpuBuffer => "gpu-buffer",
        }
    }
}

/// onnxruntime-web's `preferredOutputLocation`: one location for every output, or one per output name (outputs
/// not named stay on the CPU; names that are no output are ignored, as onnxruntime-web does).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PreferredOutputLocation {
    All(Location),
    PerOutput(HashMap<String, Location>),
}

impl Default for PreferredOutputLocation {
    fn default() -> Self {
        PreferredOutputLocation::All(Location::Cpu)
    }
}

impl From<Location> for PreferredOutputLocation {
    fn from(l: Location) -> Self {
        PreferredOutputLocation::All(l)
    }
}

impl PreferredOutputLocation {
    pub fn location_of(&self, output: &str) -> Location {
        match self {
            PreferredOutputLocation::All(l) => *l,
            PreferredOutputLocation::PerOutput(m) => m.get(output).copied().unwrap_or(Location::Cpu),
        }
    }
}

/// Options of one run.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Overrides the session's [`crate::SessionOptions::preferred_output_location`] for this run.
    pub preferred_output_location: Option<PreferredOutputLocation>,
}

/// A tensor in a wgpu buffer (onnxruntime-web's `location: 'gpu-buffer'` tensor). Cloning shares the buffer.
///
/// Element layout on the GPU: f32, f16, i32 and u32 as on the host; kiln stores int64 as int32 and bool as f32
/// (0.0 / 1.0) on the GPU, so GPU tensors of those types come only from kiln's own outputs.
/// A `present.*` left on the GPU may be a KV store: its buffer holds [`GpuTensor::row_capacity`] rows per
/// (batch, head) along axis 2, of which the first `dims()[2]` are the tensor; [`GpuTensor::download`] and
/// [`GpuTensor::contiguous`] give the exact logical tensor.
#[derive(Clone)]
pub struct GpuTensor {
    pub(crate) raw: kiln_wgsl::GpuTensor,
    /// The session's GPU context the buffer belongs to (its identity: wgpu's device handles of two instances may
    /// compare equal).
    pub(crate) ctx: Arc<kiln_wgsl::Context>,
    element_type: ElementType,
    /// An output the session's buffer pool may take back when every handle is gone (kiln_wgsl's
    /// `BufferPool::disown`): set once the application exposes or releases the buffer.
    pooled: Option<Arc<std::sync::atomic::AtomicBool>>,
}

impl std::fmt::Debug for GpuTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuTensor")
            .field("element_type", &self.element_type)
            .field("dims", &self.dims())
            .field("buffer_size", &self.raw.buffer.size())
            .field("row_capacity", &self.row_capacity())
            .finish()
    }
}

impl PartialEq for GpuTensor {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.raw.buffer, &other.raw.buffer)
            && self.raw.shape == other.raw.shape
            && self.element_type == other.element_type
    }
}

fn gpu_err(e: kiln_wgsl::Error) -> Error {
    Error::runtime(e.message)
}

impl GpuTensor {
    pub(crate) fn from_raw(raw: kiln_wgsl::GpuTensor, ctx: &Arc<kiln_wgsl::Context>) -> Result<Self> {
        let element_type = ElementType::from_datum_type(raw.dt)?;
        Ok(GpuTensor { raw, ctx: ctx.clone(), element_type, pooled: None })
    }

    /// An output whose buffer the session's pool may take back once every handle is dropped, unless the flag is
    /// set (the buffer exposed or released).
    pub(crate) fn from_pool(
        raw: kiln_wgsl::GpuTensor,
        ctx: &Arc<kiln_wgsl::Context>,
        pooled: Option<Arc<std::sync::atomic::AtomicBool>>,
    ) -> Result<Self> {
        Ok(GpuTensor { pooled, ..GpuTensor::from_raw(raw, ctx)? })
    }

    /// The pool never takes this buffer back (the application may hold the `wgpu::Buffer` itself, or released it).
    fn expose(&self) {
        if let Some(f) = &self.pooled {
            f.store(true, std::sync::atomic::Ordering::Release);
        }
    }

    /// A tensor of `element_type` and `dims` in an application's buffer (onnxruntime-web's
    /// `Tensor.fromGpuBuffer`), made on the device of the session `ctx` belongs to: row-major from offset 0, the
    /// buffer made with `STORAGE` and `COPY_SRC` usage (a session only reads its feeds), at least as large as the
    /// tensor. Element types: f32, f16, i32, u32 (their GPU layout is the host's). `Session::gpu_tensor_from_buffer`
    /// is the public way in.
    pub(crate) fn from_buffer(
        ctx: &Arc<kiln_wgsl::Context>,
        buffer: wgpu::Buffer,
        element_type: ElementType,
        dims: &[usize],
    ) -> Result<GpuTensor> {
        if !matches!(element_type, ElementType::F32 | ElementType::F16 | ElementType::I32 | ElementType::U32) {
            return Err(Error::new(
                ErrorKind::NotImplemented,
                format!("a GPU tensor from a buffer of {element_type} is not supported (f32, f16, int32, uint32 are)"),
            ));
        }
        let needed =
            dims.iter()
                .try_fold(element_type.size_of(), |a, d| a.checked_mul(*d))
                .ok_or_else(|| Error::invalid_argument(format!("tensor dims {dims:?} overflow")))? as u64;
        if buffer.size() < needed {
            return Err(Error::invalid_argument(format!(
                "the GPU buffer holds {} bytes but a {element_type} tensor of dims {dims:?} needs {needed}",
                buffer.size()
            )));
        }
        let usage = buffer.usage();
        let want = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC;
        if !usage.contains(want) {
            return Err(Error::invalid_argument(format!(
                "a GPU tensor's buffer needs STORAGE and COPY_SRC usage (it has {usage:?})"
            )));
        }
        let raw = kiln_wgsl::GpuTensor::new(Arc::new(buffer), dims, element_type.to_datum_type());
        GpuTensor::from_raw(raw, ctx)
    }

    pub fn dims(&self) -> &[usize] {
        &self.raw.shape
    }
    pub fn element_type(&self) -> ElementType {
        self.element_type
    }
    pub fn len(&self) -> usize {
        self.raw.len()
    }
    pub fn is_empty(&self) -> bool {
        self.raw.is_empty()
    }
    /// The wgpu buffer (in a browser `wgpu::Buffer::as_webgpu` gives the `GPUBuffer`). For a KV store see
    /// [`GpuTensor::row_capacity`]; [`GpuTensor::contiguous`] gives a buffer holding exactly the tensor.
    pub fn buffer(&self) -> &wgpu::Buffer {
        // the application may keep a clone of the handle: the buffer is its own from now on
        self.expose();
        &self.raw.buffer
    }
    /// The device the buffer belongs to.
    pub fn device(&self) -> &wgpu::Device {
        &self.ctx.device
    }
    /// For a KV store (a `present.*` with spare rows): the rows its buffer holds per (batch, head) along axis 2.
    pub fn row_capacity(&self) -> Option<usize> {
        self.raw.kv.as_ref().map(|l| l.cap)
    }
    /// Whether the buffer holds exactly the tensor, row-major from offset 0.
    pub fn is_contiguous(&self) -> bool {
        self.raw.kv.is_none()
    }

    /// This tensor in a buffer of its own holding exactly its elements (itself when it is already contiguous).
    /// The copy is queued on the device; nothing waits.
    pub fn contiguous(&self) -> Result<GpuTensor> {
        let Some(l) = &self.raw.kv else { return Ok(self.clone()) };
        let [b, h, rows, d] = match *self.raw.shape {
            [b, h, r, d] => [b, h, r, d],
            _ => return Err(Error::runtime("a KV store that is not rank 4")),
        };
        let row = (d * kiln_wgsl::exec::gpu_size_of(self.raw.dt)) as u64;
        let n = rows as u64 * row;
        let buffer = self.ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("kiln tensor"),
            size: ((b * h) as u64 * n).max(4),
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        if n > 0 {
            let mut enc =
                self.ctx.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("kiln") });
            for bh in 0..(b * h) as u64 {
                enc.copy_buffer_to_buffer(&self.raw.buffer, bh * l.cap as u64 * row, &buffer, bh * n, n);
            }
            self.ctx.queue.submit([enc.finish()]);
        }
        let raw = kiln_wgsl::GpuTensor::new(Arc::new(buffer), &self.raw.shape, self.raw.dt);
        GpuTensor::from_raw(raw, &self.ctx)
    }

    /// Lets go of this handle (onnxruntime-web's `dispose()` of a gpu-buffer tensor). When no other handle, run or
    /// KV store holds the buffer, the buffer is destroyed at once, so its memory is freed now rather than when the
    /// last handle is dropped (in a browser: when the garbage collector gets to the `GPUBuffer`); a buffer still
    /// shared (a `present.*` appended in place into the store a `past_key_values.*` handle also sees) is left alone.
    /// For a tensor made from an application's buffer that buffer is destroyed too. Returns whether it was.
    pub fn release(self) -> bool {
        // the session's pool keeps a handle on an output it may take back (not any more: released)
        self.expose();
        let pool = self.pooled.is_some() as usize;
        if Arc::strong_count(&self.raw.buffer) <= 1 + pool {
            self.raw.buffer.destroy();
            true
        } else {
            false
        }
    }

    /// The tensor's data on the host (onnxruntime-web's `getData()` / `download()` of a gpu-buffer tensor):
    /// exactly its logical elements. The copy is queued when this is called, the future awaits its result: a
    /// decode loop can start the download of step s's token, run step s + 1 (queued behind the copy) and only then
    /// wait, so the GPU never idles while the host records a step.
    pub fn download(&self) -> impl std::future::Future<Output = Result<Tensor>> + 'static {
        let started = kiln_wgsl::exec::Download::start(&self.ctx, &self.raw);
        let (ctx, dt, shape) = (self.ctx.clone(), self.raw.dt, self.raw.shape.clone());
        async move {
            let bytes = started.map_err(gpu_err)?.bytes(&ctx.device).await.map_err(gpu_err)?;
            let t = kiln_wgsl::exec::tensor_from_bytes(dt, &shape, &bytes).map_err(gpu_err)?;
            Tensor::from_tract(t)
        }
    }
}

/// A feed or an output: a host tensor or a GPU tensor.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Cpu(Tensor),
    Gpu(GpuTensor),
}

impl From<Tensor> for Value {
    fn from(t: Tensor) -> Value {
        Value::Cpu(t)
    }
}

impl From<GpuTensor> for Value {
    fn from(t: GpuTensor) -> Value {
        Value::Gpu(t)
    }
}

impl Value {
    pub fn location(&self) -> Location {
        match self {
            Value::Cpu(_) => Location::Cpu,
            Value::Gpu(_) => Location::GpuBuffer,
        }
    }
    pub fn dims(&self) -> &[usize] {
        match self {
            Value::Cpu(t) => t.dims(),
            Value::Gpu(t) => t.dims(),
        }
    }
    pub fn element_type(&self) -> ElementType {
        match self {
            Value::Cpu(t) => t.element_type(),
            Value::Gpu(t) => t.element_type(),
        }
    }
    pub fn as_tensor(&self) -> Option<&Tensor> {
        match self {
            Value::Cpu(t) => Some(t),
            Value::Gpu(_) => None,
        }
    }
    pub fn as_gpu(&self) -> Option<&GpuTensor> {
        match self {
            Value::Gpu(t) => Some(t),
            Value::Cpu(_) => None,
        }
    }
    /// The data on the host: the tensor itself, or a GPU tensor downloaded.
    pub async fn to_host(&self) -> Result<Tensor> {
        match self {
            Value::Cpu(t) => Ok(t.clone()),
            Value::Gpu(g) => g.download().await,
        }
    }
}
