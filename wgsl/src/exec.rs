//! Recording GPU work for one run: tensors in pooled buffers, dispatches, uploads and readbacks are recorded in
//! order and encoded into one command encoder per flush; a flush submits once and reads back what was asked for.
//! Uniforms, uploads and readbacks go through three arenas reused run after run, and tensor buffers come from a pool,
//! so a run in the steady state creates no GPU buffer.

use crate::FastMap as HashMap;
use std::sync::Arc;

use tract_onnx::prelude::*;

use crate::context::{Caps, Context};
use crate::{Error, Result};

/// A tensor on the GPU: a storage buffer (at least 4 bytes, even when empty), its shape and element type.
///
/// With `kv` set the tensor is rank 4 (`[batch, heads, rows, head]`) and its buffer holds `kv.cap` rows per
/// (batch, head) — a KV cache with spare capacity (see [`crate::kv`]): only the attention kernels and the KV append
/// read it as it is; anything else gets a compacted copy first.
#[derive(Debug, Clone)]
pub struct GpuTensor {
    pub buffer: Arc<wgpu::Buffer>,
    pub shape: TVec<usize>,
    pub dt: DatumType,
    pub kv: Option<crate::kv::KvLayout>,
}

impl GpuTensor {
    /// A contiguous tensor in `buffer`.
    pub fn new(buffer: Arc<wgpu::Buffer>, shape: &[usize], dt: DatumType) -> GpuTensor {
        GpuTensor { buffer, shape: shape.into(), dt, kv: None }
    }
    /// Rows allocated per (batch, head) along axis 2: the capacity of a KV store, else the logical rows.
    pub fn row_stride(&self) -> usize {
        match &self.kv {
            Some(l) => l.cap,
            None => self.shape.get(2).copied().unwrap_or(0),
        }
    }
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn byte_len(&self) -> u64 {
        (self.len() * gpu_size_of(self.dt)) as u64
    }
}

fn storage_usage() -> wgpu::BufferUsages {
    wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST
}

/// Buffers by size class (powers of two from 256 bytes), reused across runs.
#[derive(Default)]
pub struct BufferPool {
    free: HashMap<u64, Vec<Arc<wgpu::Buffer>>>,
    /// The buffers this pool made and may take back (by address); a buffer handed to the application leaves it.
    owned: std::collections::HashSet<usize>,
    pub created: usize,
    pub bytes: u64,
    /// The buffer (by address) of each allocation of the last run and of this one, in order: a run that allocates
    /// like the last gets the same buffers even when the free lists changed (a buffer handed to the application,
    /// a new one made), so the bind groups cached for its dispatches still hit. 0: no buffer in particular (the
    /// allocation's buffer went to the application).
    last: Vec<usize>,
    now: Vec<usize>,
    /// How many of the last run's allocations still ahead in this run want each buffer: a fallback takes a buffer
    /// no later allocation wants, so one lost buffer does not displace the rest.
    ahead: HashMap<usize, u32>,
    /// A buffer of the last run handed to the application since (a next token a decode loop feeds back), and the
    /// buffer that stands in for it this run: every later allocation that had it takes the stand-in, instead of
    /// each displacing another allocation's buffer (and its cached bind groups).
    stand_in: HashMap<usize, usize>,
    /// Buffers the pool made and handed to the application (native), each with its flag of exposure: once the
    /// application has dropped every handle (the pool's is the last) and never took the `wgpu::Buffer` itself (nor
    /// released the tensor: the flag), an allocation that handed its buffer out last run takes one back instead of
    /// creating a buffer (a decode loop's next token: a buffer made and freed every step otherwise). Not in wasm,
    /// where the application may hold the GPUBuffer itself beyond kiln's handle.
    handed: Vec<(Arc<wgpu::Buffer>, Arc<std::sync::atomic::AtomicBool>)>,
}

impl BufferPool {
    fn class(bytes: u64) -> u64 {
        bytes.max(256).next_power_of_two()
    }
    pub fn take(&mut self, ctx: &Context, bytes: u64) -> Result<Arc<wgpu::Buffer>> {
        let class = Self::class(bytes);
        let last = self.last.get(self.now.len()).copied();
        // an allocation whose buffer went to the application last run (an output it keeps, say a next token a
        // decode loop feeds back) gets a new buffer: one from the free lists would leave the pool with it again
        if last == Some(0) {
            if let Some(b) = self.take_handed_back(class) {
                return Ok(b);
            }
            return self.create(ctx, bytes, class);
        }
        let lost = last.filter(|w| !self.owned.contains(w));
        let want = last.map(|w| self.stand_in.get(&w).copied().unwrap_or(w));
        if let Some(w) = want {
            if let Some(n) = self.ahead.get_mut(&w) {
                *n = n.saturating_sub(1);
            }
        }
        let b = self.take_class(ctx, bytes, class, want)?;
        if let Some(w) = lost {
            // the first allocation of a lost buffer: what it got stands in for it for the rest of the run
            if let std::collections::hash_map::Entry::Vacant(e) = self.stand_in.entry(w) {
                let addr = Arc::as_ptr(&b) as usize;
                e.insert(addr);
                let later = self.ahead.remove(&w).unwrap_or(0);
                *self.ahead.entry(addr).or_default() += later;
            }
        }
        Ok(b)
    }

    fn take_class(&mut self, ctx: &Context, bytes: u64, class: u64, want: Option<usize>) -> Result<Arc<wgpu::Buffer>> {
        if let Some(v) = self.free.get_mut(&class) {
            // the buffer this allocation had last run, if free; else the last freed that no later allocation
            // wants; else the last freed
            let addr = |b: &Arc<wgpu::Buffer>| Arc::as_ptr(b) as usize;
            let at = want
                .and_then(|w| v.iter().rposition(|b| addr(b) == w))
                .or_else(|| v.iter().rposition(|b| self.ahead.get(&addr(b)).is_none_or(|n| *n == 0)));
            let b = match at {
                Some(i) => Some(v.remove(i)),
                None => v.pop(),
            };
            if let Some(b) = b {
                self.now.push(Arc::as_ptr(&b) as usize);
                return Ok(b);
            }
        }
        self.create(ctx, bytes, class)
    }

    fn create(&mut self, ctx: &Context, bytes: u64, class: u64) -> Result<Arc<wgpu::Buffer>> {
        let size = if class > ctx.caps.max_buffer_size { bytes.max(4).div_ceil(4) * 4 } else { class };
        if size > ctx.caps.max_storage_binding {
            return Err(Error::new(format!(
                "webgpu: a {bytes}-byte tensor exceeds the adapter's storage binding limit ({} bytes)",
                ctx.caps.max_storage_binding
            )));
        }
        self.created += 1;
        self.bytes += size;
        let b = Arc::new(ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("kiln tensor"),
            size,
            usage: storage_usage(),
            mapped_at_creation: false,
        }));
        self.owned.insert(Arc::as_ptr(&b) as usize);
        self.now.push(Arc::as_ptr(&b) as usize);
        Ok(b)
    }

    /// A buffer of `class` the application had and let go of (the pool holds its only handle), owned again.
    fn take_handed_back(&mut self, class: u64) -> Option<Arc<wgpu::Buffer>> {
        let free = |(b, exposed): &(Arc<wgpu::Buffer>, Arc<std::sync::atomic::AtomicBool>)| {
            b.size() == class && Arc::strong_count(b) == 1 && !exposed.load(std::sync::atomic::Ordering::Acquire)
        };
        let at = self.handed.iter().position(free)?;
        let (b, _) = self.handed.swap_remove(at);
        let addr = Arc::as_ptr(&b) as usize;
        self.owned.insert(addr);
        self.bytes += b.size();
        self.now.push(addr);
        Some(b)
    }

    /// A run ended: its allocations become the ones the next run tries to repeat.
    fn end_run(&mut self) {
        // the buffers the application let go of (the pool's handle is the last) beyond one of each size, and those
        // it exposed or released, are freed
        let mut kept = std::collections::HashSet::new();
        self.handed.retain(|(b, exposed)| {
            Arc::strong_count(b) > 1 || (!exposed.load(std::sync::atomic::Ordering::Acquire) && kept.insert(b.size()))
        });
        self.last = std::mem::take(&mut self.now);
        self.ahead.clear();
        self.stand_in.clear();
        // a buffer handed to the application went with its last allocation (the output): that allocation asks
        // for no buffer in particular next run, the earlier ones (temporaries that shared it) for one stand-in
        let mut lost = std::collections::HashSet::new();
        for a in self.last.iter_mut().rev() {
            if !self.owned.contains(a) && lost.insert(*a) {
                *a = 0;
            }
        }
        for a in self.last.iter().filter(|a| **a != 0) {
            *self.ahead.entry(*a).or_default() += 1;
        }
    }
    /// Whether the pool made `buffer` and may take it back.
    pub fn owns(&self, buffer: &Arc<wgpu::Buffer>) -> bool {
        self.owned.contains(&(Arc::as_ptr(buffer) as usize))
    }
    /// The pool lets go of `buffer` for good (it goes to the application: freed when its last holder drops it).
    /// Returns the flag the application's handle sets when it exposes the `wgpu::Buffer` or releases the tensor
    /// (the pool then never takes the buffer back), when the pool may take it back (native).
    pub fn disown(&mut self, buffer: &Arc<wgpu::Buffer>) -> Option<Arc<std::sync::atomic::AtomicBool>> {
        if self.owned.remove(&(Arc::as_ptr(buffer) as usize)) {
            self.bytes = self.bytes.saturating_sub(buffer.size());
            if cfg!(not(target_arch = "wasm32")) && buffer.size().is_power_of_two() {
                let exposed = Arc::new(std::sync::atomic::AtomicBool::new(false));
                self.handed.push((buffer.clone(), exposed.clone()));
                return Some(exposed);
            }
        }
        None
    }
    /// Gives a buffer back; only buffers the pool made (power-of-two sizes) are kept.
    pub fn give(&mut self, buffer: Arc<wgpu::Buffer>) {
        let size = buffer.size();
        if self.owns(&buffer) && size.is_power_of_two() && size >= 256 && Arc::strong_count(&buffer) == 1 {
            self.free.entry(size).or_default().push(buffer);
        }
    }
}

/// A growable buffer reused flush after flush.
struct Arena {
    usage: wgpu::BufferUsages,
    buffer: Option<wgpu::Buffer>,
    /// Bumped each time the buffer is replaced (bind groups on the old one are stale).
    generation: u64,
}

impl Arena {
    fn new(usage: wgpu::BufferUsages) -> Arena {
        Arena { usage, buffer: None, generation: 0 }
    }
    fn ensure(&mut self, ctx: &Context, bytes: u64) -> wgpu::Buffer {
        let need = bytes.max(256);
        if let Some(b) = &self.buffer {
            if b.size() >= need {
                return b.clone();
            }
        }
        let b = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("kiln arena"),
            size: need.next_power_of_two(),
            usage: self.usage,
            mapped_at_creation: false,
        });
        self.buffer = Some(b.clone());
        self.generation += 1;
        b
    }
}

/// A bind group by what it binds: pipeline, uniform arena generation, uniform offset and size, and each
/// (binding, buffer) by address, padded with zeros (a fixed-size key: no allocation per dispatch). The entry holds
/// the buffers weakly (so the pool's "nobody else holds it" test still works, and an address cannot be reused while
/// the entry exists); an entry with a dead buffer is rebuilt.
type BindKey = (usize, u64, u64, u64, [(u32, usize); MAX_BINDINGS]);

/// The most storage bindings one dispatch has (kiln's kernels bind at most 15).
const MAX_BINDINGS: usize = 16;

struct BindEntry {
    group: wgpu::BindGroup,
    _pipeline: Arc<wgpu::ComputePipeline>,
    buffers: Vec<std::sync::Weak<wgpu::Buffer>>,
}

/// Bind groups cached across flushes (the steady state of a run creates none); cleared past this many.
const BIND_CACHE_MAX: usize = 8192;

/// One binding of a dispatch: its binding index and the buffer.
pub struct Binding {
    pub index: u32,
    pub buffer: Arc<wgpu::Buffer>,
}

enum Command {
    Dispatch {
        pipeline: Arc<wgpu::ComputePipeline>,
        bindings: Vec<Binding>,
        uniform: Vec<u8>,
        groups: (u32, u32, u32),
        label: &'static str,
    },
    Upload {
        dst: Arc<wgpu::Buffer>,
        bytes: Vec<u8>,
    },
    Readback {
        src: Arc<wgpu::Buffer>,
        bytes: u64,
        slot: usize,
    },
    Copy {
        src: Arc<wgpu::Buffer>,
        src_offset: u64,
        dst: Arc<wgpu::Buffer>,
        dst_offset: u64,
        bytes: u64,
    },
}

/// Statistics of a session's GPU work.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Flushes: a run's last submit, and those whose readbacks the host waits for (a run that reads nothing back
    /// does not wait for the GPU).
    pub submits: usize,
    /// Submits of a run's first dispatches while the host records the rest (no wait; see
    /// [`Recorder::submit_every`]).
    pub early_submits: usize,
    pub dispatches: usize,
    pub uploads: usize,
    pub readbacks: usize,
    /// Tensor buffers the pool has created (never freed: reused run after run), and their bytes.
    pub buffers_created: usize,
    pub buffer_bytes: u64,
    /// Bytes of the uniform / upload / staging arenas now.
    pub arena_bytes: u64,
    /// Buffers given back to the pool within a flush, for later dispatches of the same flush.
    pub reused_in_flush: usize,
    /// Bind groups created (the others came from the cache).
    pub bind_groups_created: usize,
    /// Bytes uploaded from the host (inputs and other host values; not the weights) and read back to it.
    pub upload_bytes: u64,
    pub readback_bytes: u64,
    /// Feeds bound as GPU tensors (no copy) and outputs left on the GPU (not read back).
    pub gpu_feeds: usize,
    pub gpu_outputs: usize,
    /// KV appends done in place (only the new rows written) and their bytes; KV stores created or grown (the
    /// old rows copied into a bigger buffer) and the bytes those copies moved; bytes copied to hand a KV store's
    /// logical tensor to a reader that needs it contiguous (a readback, a kernel other than attention).
    pub kv_appends_in_place: usize,
    /// Of the appends in place, those the kernel that makes the new rows wrote itself (a layer's rotation:
    /// [`crate::attention::RotarySpec::encode_append`]): no dispatch or copy of their own.
    pub kv_appends_fused: usize,
    /// Decode steps' q / k / v projections that rotated q and k and appended k and v themselves
    /// ([`crate::qmatmul::QkvRope`]): no dispatch of their own for the rotation.
    pub rotations_in_matmul: usize,
    pub kv_append_bytes: u64,
    pub kv_stores_created: usize,
    pub kv_grow_bytes: u64,
    pub kv_compact_bytes: u64,
    /// Host time (µs, native only) spent encoding and submitting flushes, and waiting for their results.
    pub submit_us: u64,
    pub wait_us: u64,
    /// Host time (µs, native only) of whole runs: recording, the CPU nodes, encoding, submitting and waiting.
    pub run_us: u64,
}

/// GPU time per kernel (KILN_GPU_PROFILE=1): label → (dispatches, nanoseconds).
pub type Profile = std::collections::BTreeMap<&'static str, (u64, u64)>;

/// Timestamp queries fit in one query set per flush; dispatches past this many go unmeasured.
const PROFILE_MAX_DISPATCHES: u32 = 2048;

/// What [`clock`] returns: a monotonic instant natively; nothing in wasm32 (`Instant` panics there).
#[cfg(not(target_arch = "wasm32"))]
pub type Instant = std::time::Instant;
#[cfg(target_arch = "wasm32")]
pub type Instant = ();

/// A monotonic clock for the counters (native only).
pub fn clock() -> Option<Instant> {
    #[cfg(not(target_arch = "wasm32"))]
    return Some(std::time::Instant::now());
    #[cfg(target_arch = "wasm32")]
    None
}

/// Microseconds since `t` (0 without a clock).
pub fn micros_since(t: Option<Instant>) -> u64 {
    nanos_since(t) / 1000
}

/// Nanoseconds since `t` (0 without a clock).
pub fn nanos_since(t: Option<Instant>) -> u64 {
    #[cfg(not(target_arch = "wasm32"))]
    return t.map_or(0, |t| t.elapsed().as_nanos() as u64);
    #[cfg(target_arch = "wasm32")]
    {
        let _ = t;
        0
    }
}

/// [`Recorder::submit_every`] for an adapter: KILN_GPU_SUBMIT_EVERY when set, else 32 on GPUs (a 30-layer model's
/// decode step, ~190 dispatches, goes in ~6 submits: its host encoding overlaps its GPU time; on an H200 32 beat 16,
/// 48 and 96) and 0 on CPU adapters
/// (lavapipe, SwiftShader: the "GPU" runs on the host's cores, which the encoding would take from it).
pub fn default_submit_every(caps: &Caps) -> usize {
    let env = std::env::var("KILN_GPU_SUBMIT_EVERY").ok().and_then(|v| v.trim().parse().ok());
    env.unwrap_or(if caps.cpu_adapter { 0 } else { 32 })
}

/// The run-to-run GPU state: pool, arenas, pending commands.
pub struct Recorder {
    pub pool: BufferPool,
    uniforms: Arena,
    uploads: Arena,
    staging: Arena,
    commands: Vec<Command>,
    /// Dispatches among `commands`.
    recorded: usize,
    /// A run's recorded work is submitted (without a wait) each time it reaches this many dispatches, so the GPU
    /// starts while the host records the rest; 0: one submit per flush. See [`default_submit_every`].
    pub submit_every: usize,
    pending_reads: usize,
    retired: Vec<Arc<wgpu::Buffer>>,
    /// How many recorded commands hold each buffer (by address): a released tensor whose buffer nothing else
    /// holds goes back to the pool at once, for the later work of the same flush (commands run in order).
    cmd_refs: HashMap<usize, usize>,
    bind_cache: HashMap<BindKey, BindEntry>,
    bind_generation: u64,
    /// Fill every fresh output buffer with NaN first (tests: unwritten elements show).
    pub poison: bool,
    pub counters: Counters,
    /// GPU time per kernel (KILN_GPU_PROFILE=1).
    pub profile: Profile,
    /// The node kernel being recorded (KILN_GPU_PROFILE=ops): profile labels become `entry <kernel>`.
    pub tag: Option<&'static str>,
}

/// `entry <tag>` as a static label (interned: a profile has a few dozen distinct ones).
fn tagged_label(entry: &'static str, tag: &'static str) -> &'static str {
    use std::sync::Mutex;
    static LABELS: Mutex<Vec<&'static str>> = Mutex::new(vec![]);
    let want = format!("{entry} <{tag}>");
    let Ok(mut labels) = LABELS.lock() else { return entry };
    if let Some(l) = labels.iter().find(|l| **l == want) {
        return l;
    }
    let l: &'static str = Box::leak(want.into_boxed_str());
    labels.push(l);
    l
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder {
            pool: BufferPool::default(),
            uniforms: Arena::new(wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST),
            uploads: Arena::new(wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST),
            staging: Arena::new(wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST),
            commands: vec![],
            recorded: 0,
            submit_every: 0,
            pending_reads: 0,
            retired: vec![],
            cmd_refs: HashMap::default(),
            bind_cache: HashMap::default(),
            bind_generation: 0,
            poison: false,
            counters: Counters::default(),
            profile: Profile::default(),
            tag: None,
        }
    }
}

/// A readback recorded but not flushed yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingRead(pub usize);

impl Recorder {
    /// A recorder whose runs submit every `n` dispatches ([`Recorder::submit_every`]).
    pub fn with_submit_every(n: usize) -> Recorder {
        Recorder { submit_every: n, ..Recorder::default() }
    }

    /// A fresh output tensor from the pool (poisoned with NaN when asked).
    pub fn alloc(&mut self, ctx: &Context, shape: &[usize], dt: DatumType) -> Result<GpuTensor> {
        let bytes = shape
            .iter()
            .try_fold(gpu_size_of(dt), |a, d| a.checked_mul(*d))
            .ok_or_else(|| Error::new(format!("webgpu: tensor of shape {shape:?} is too large")))?
            as u64;
        let buffer = self.pool.take(ctx, bytes)?;
        if self.poison && bytes > 0 {
            let n = buffer.size() as usize;
            self.hold(&buffer);
            self.commands.push(Command::Upload { dst: buffer.clone(), bytes: vec![0xff; n] });
        }
        Ok(GpuTensor { buffer, shape: shape.into(), dt, kv: None })
    }

    /// Returns a dead tensor's buffer to the pool once the recorded work that uses it has run (after the next
    /// flush); buffers still shared (views, weights) stay out of the pool.
    pub fn release(&mut self, t: GpuTensor) {
        let refs = self.cmd_refs.get(&(Arc::as_ptr(&t.buffer) as usize)).copied().unwrap_or(0);
        let size = t.buffer.size();
        if Arc::strong_count(&t.buffer) == refs + 1
            && size.is_power_of_two()
            && size >= 256
            && self.pool.owns(&t.buffer)
        {
            // only recorded commands hold it besides this tensor: later commands may overwrite it
            self.counters.reused_in_flush += 1;
            self.pool.free.entry(size).or_default().push(t.buffer);
        } else {
            self.retired.push(t.buffer);
        }
    }

    fn hold(&mut self, b: &Arc<wgpu::Buffer>) {
        *self.cmd_refs.entry(Arc::as_ptr(b) as usize).or_default() += 1;
    }

    fn recycle(&mut self) {
        for b in std::mem::take(&mut self.retired) {
            self.pool.give(b);
        }
    }

    /// Ends a run: the pool's free buffers are put in a fixed order, so that every run with the same shapes gets
    /// the same buffers (and its cached bind groups) whatever order the previous run freed them in.
    pub fn end_run(&mut self) {
        self.discard();
        self.pool.end_run();
        for v in self.pool.free.values_mut() {
            v.sort_by_key(|b| Arc::as_ptr(b) as usize);
        }
    }

    /// Drops recorded work nobody reads (a failed run, or GPU results no output needs).
    pub fn discard(&mut self) {
        self.commands.clear();
        self.recorded = 0;
        self.cmd_refs.clear();
        self.pending_reads = 0;
        self.recycle();
    }

    /// A host tensor copied to a pooled buffer (in order with the recorded work).
    pub fn upload(&mut self, ctx: &Context, t: &Tensor) -> Result<GpuTensor> {
        let g = self.alloc_unpoisoned(ctx, t.shape(), t.datum_type())?;
        let bytes = host_bytes(t)?;
        if !bytes.is_empty() {
            self.hold(&g.buffer);
            self.counters.upload_bytes += bytes.len() as u64;
            self.commands.push(Command::Upload { dst: g.buffer.clone(), bytes });
            self.counters.uploads += 1;
        }
        Ok(g)
    }

    pub(crate) fn alloc_unpoisoned(&mut self, ctx: &Context, shape: &[usize], dt: DatumType) -> Result<GpuTensor> {
        let poison = std::mem::replace(&mut self.poison, false);
        let r = self.alloc(ctx, shape, dt);
        self.poison = poison;
        r
    }

    /// Records a dispatch. `uniform` is the kernel's parameter block (bound at binding 0).
    pub fn dispatch(
        &mut self,
        pipeline: Arc<wgpu::ComputePipeline>,
        uniform: Vec<u8>,
        bindings: Vec<Binding>,
        groups: (u32, u32, u32),
        label: &'static str,
    ) {
        if groups.0 == 0 || groups.1 == 0 || groups.2 == 0 {
            return;
        }
        for b in &bindings {
            self.hold(&b.buffer);
        }
        let label = match self.tag {
            Some(tag) => tagged_label(label, tag),
            None => label,
        };
        self.commands.push(Command::Dispatch { pipeline, bindings, uniform, groups, label });
        self.recorded += 1;
    }

    /// Submits the recorded work now, without waiting for it, once it holds [`Recorder::submit_every`]
    /// dispatches and no readback: the GPU runs a step's first kernels while the host records the rest (a decode
    /// step's host encoding otherwise precedes all of its GPU time). Returns whether it submitted.
    pub fn submit_early(&mut self, ctx: &Context) -> Result<bool> {
        if self.submit_every == 0 || self.recorded < self.submit_every || self.pending_reads > 0 || ctx.profiling {
            return Ok(false);
        }
        let t = clock();
        let submitted = self.submit(ctx)?;
        self.counters.submit_us += micros_since(t);
        // nothing to read: the next flush's wait covers this work too (the queue runs in order)
        self.counters.early_submits += submitted.wait as usize;
        Ok(true)
    }

    /// Adds the timestamps of `labels`' dispatches (resolved into `read`) to the profile (native: waits).
    #[cfg(not(target_arch = "wasm32"))]
    fn read_profile(&mut self, ctx: &Context, read: &wgpu::Buffer, labels: &[&'static str]) -> Result<()> {
        read.map_async(wgpu::MapMode::Read, .., |_| {});
        ctx.device
            .poll(wgpu::PollType::Wait { submission_index: None, timeout: None })
            .map_err(|e| Error::new(format!("webgpu: reading the profile: {e}")))?;
        let period = ctx.queue.get_timestamp_period() as f64;
        {
            let view = read.get_mapped_range(..).map_err(|e| Error::new(format!("webgpu: profile: {e}")))?;
            let ticks: Vec<u64> =
                view.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect();
            for (k, label) in labels.iter().enumerate() {
                let (a, b) = (ticks.get(2 * k).copied().unwrap_or(0), ticks.get(2 * k + 1).copied().unwrap_or(0));
                let e = self.profile.entry(label).or_default();
                e.0 += 1;
                e.1 += (b.saturating_sub(a) as f64 * period) as u64;
            }
        }
        read.unmap();
        Ok(())
    }

    /// Records a copy of `t` to the host; its data comes with the next [`Recorder::flush`].
    pub fn readback(&mut self, t: &GpuTensor) -> PendingRead {
        let slot = self.pending_reads;
        self.pending_reads += 1;
        self.hold(&t.buffer);
        self.counters.readback_bytes += t.byte_len();
        self.commands.push(Command::Readback { src: t.buffer.clone(), bytes: t.byte_len(), slot });
        PendingRead(slot)
    }

    /// Records a buffer-to-buffer copy, in order with the other work. Offsets and length must be multiples of 4,
    /// in range, and the buffers distinct (checked here: wgpu would panic).
    pub fn copy(
        &mut self,
        src: &Arc<wgpu::Buffer>,
        src_offset: u64,
        dst: &Arc<wgpu::Buffer>,
        dst_offset: u64,
        bytes: u64,
    ) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        let aligned = src_offset.is_multiple_of(4) && dst_offset.is_multiple_of(4) && bytes.is_multiple_of(4);
        let fits = src_offset.checked_add(bytes).is_some_and(|e| e <= src.size())
            && dst_offset.checked_add(bytes).is_some_and(|e| e <= dst.size());
        if !aligned || !fits || Arc::ptr_eq(src, dst) || src == dst {
            return Err(Error::new(format!(
                "webgpu: bad buffer copy ({bytes} bytes from {src_offset} of {} to {dst_offset} of {})",
                src.size(),
                dst.size()
            )));
        }
        self.hold(src);
        self.hold(dst);
        self.commands.push(Command::Copy { src: src.clone(), src_offset, dst: dst.clone(), dst_offset, bytes });
        Ok(())
    }

    pub fn has_pending_reads(&self) -> bool {
        self.pending_reads > 0
    }

    /// Encodes everything recorded into one command encoder, submits once, and returns the bytes of each readback
    /// in the order recorded, once the GPU is done: `map_async` and a future (natively the future waits on the
    /// device; in a browser it resolves when the browser has mapped the staging buffer — nothing blocks).
    pub async fn flush(&mut self, ctx: &Context) -> Result<Vec<Vec<u8>>> {
        let t = clock();
        let submitted = self.submit(ctx)?;
        self.counters.submit_us += micros_since(t);
        self.counters.submits += submitted.wait as usize;
        let t = clock();
        let r = submitted.read(ctx).await;
        self.counters.wait_us += micros_since(t);
        r
    }

    /// The first half of [`Recorder::flush`]: encodes and submits the recorded work, and asks for the staging
    /// buffer's mapping; [`Submitted::read`] awaits it.
    pub fn submit(&mut self, ctx: &Context) -> Result<Submitted> {
        let commands = std::mem::take(&mut self.commands);
        self.recorded = 0;
        self.cmd_refs.clear();
        let reads = std::mem::replace(&mut self.pending_reads, 0);
        if commands.is_empty() {
            return Ok(Submitted { reads: vec![], staging: None, mapped: None, wait: false });
        }
        let align = ctx.caps.min_uniform_alignment.max(16) as u64;
        // lay out the arenas
        let (mut uni_len, mut up_len, mut st_len) = (0u64, 0u64, 0u64);
        let mut offsets = Vec::with_capacity(commands.len());
        let mut read_at = vec![(0u64, 0u64); reads];
        for c in &commands {
            match c {
                Command::Dispatch { uniform, .. } => {
                    offsets.push(uni_len);
                    uni_len += (uniform.len() as u64).div_ceil(align) * align;
                }
                Command::Upload { bytes, .. } => {
                    offsets.push(up_len);
                    up_len += (bytes.len() as u64).div_ceil(4) * 4;
                }
                Command::Copy { .. } => offsets.push(0),
                Command::Readback { bytes, slot, .. } => {
                    offsets.push(st_len);
                    if let Some(r) = read_at.get_mut(*slot) {
                        *r = (st_len, *bytes);
                    }
                    st_len += bytes.div_ceil(4) * 4;
                }
            }
        }
        let uni = self.uniforms.ensure(ctx, uni_len);
        if self.uniforms.generation != self.bind_generation || self.bind_cache.len() > BIND_CACHE_MAX {
            self.bind_cache.clear();
            self.bind_generation = self.uniforms.generation;
        }
        let up = self.uploads.ensure(ctx, up_len);
        let st = self.staging.ensure(ctx, st_len);
        let mut uni_bytes = vec![0u8; uni_len as usize];
        let mut up_bytes = vec![0u8; up_len as usize];
        for (c, off) in commands.iter().zip(&offsets) {
            match c {
                Command::Dispatch { uniform, .. } => {
                    uni_bytes[*off as usize..*off as usize + uniform.len()].copy_from_slice(uniform)
                }
                Command::Upload { bytes, .. } => {
                    up_bytes[*off as usize..*off as usize + bytes.len()].copy_from_slice(bytes)
                }
                Command::Readback { .. } | Command::Copy { .. } => {}
            }
        }
        if uni_len > 0 {
            ctx.queue.write_buffer(&uni, 0, &uni_bytes);
        }
        if up_len > 0 {
            ctx.queue.write_buffer(&up, 0, &up_bytes);
        }
        let mut encoder =
            ctx.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("kiln run") });
        let queries = ctx.profiling.then(|| {
            ctx.device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("kiln profile"),
                ty: wgpu::QueryType::Timestamp,
                count: 2 * PROFILE_MAX_DISPATCHES,
            })
        });
        let mut profiled: Vec<&'static str> = vec![];
        let mut i = 0;
        while i < commands.len() {
            match &commands[i] {
                Command::Dispatch { .. } => {
                    // profiling: one pass per dispatch, timestamps at its start and end
                    let timestamp_writes = match (&queries, commands.get(i)) {
                        (Some(q), Some(Command::Dispatch { label, .. }))
                            if (profiled.len() as u32) < PROFILE_MAX_DISPATCHES =>
                        {
                            let k = profiled.len() as u32;
                            profiled.push(label);
                            Some(wgpu::ComputePassTimestampWrites {
                                query_set: q,
                                beginning_of_pass_write_index: Some(2 * k),
                                end_of_pass_write_index: Some(2 * k + 1),
                            })
                        }
                        _ => None,
                    };
                    let one = timestamp_writes.is_some();
                    let mut pass = encoder
                        .begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some("kiln"), timestamp_writes });
                    // the pipeline set last in this pass (not set again for a dispatch of the same kernel)
                    let mut current: Option<&Arc<wgpu::ComputePipeline>> = None;
                    while let Some(Command::Dispatch { pipeline, bindings, uniform, groups, .. }) = commands.get(i) {
                        if bindings.len() > MAX_BINDINGS {
                            return Err(Error::new(format!("webgpu: a dispatch of {} bindings", bindings.len())));
                        }
                        let mut bound = [(0u32, 0usize); MAX_BINDINGS];
                        for (k, b) in bound.iter_mut().zip(bindings) {
                            *k = (b.index, Arc::as_ptr(&b.buffer) as usize);
                        }
                        let key: BindKey = (
                            Arc::as_ptr(pipeline) as usize,
                            self.bind_generation,
                            offsets[i],
                            uniform.len() as u64,
                            bound,
                        );
                        let cached = self
                            .bind_cache
                            .get(&key)
                            .filter(|e| e.buffers.iter().all(|w| w.strong_count() > 0))
                            .map(|e| e.group.clone());
                        let group = match cached {
                            Some(g) => g,
                            None => {
                                let mut entries = vec![wgpu::BindGroupEntry {
                                    binding: 0,
                                    resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                                        buffer: &uni,
                                        offset: offsets[i],
                                        size: wgpu::BufferSize::new(uniform.len() as u64),
                                    }),
                                }];
                                for b in bindings {
                                    entries.push(wgpu::BindGroupEntry {
                                        binding: b.index,
                                        resource: b.buffer.as_entire_binding(),
                                    });
                                }
                                let group = ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
                                    label: None,
                                    layout: &pipeline.get_bind_group_layout(0),
                                    entries: &entries,
                                });
                                self.counters.bind_groups_created += 1;
                                let buffers = bindings.iter().map(|b| Arc::downgrade(&b.buffer)).collect();
                                let entry = BindEntry { group: group.clone(), _pipeline: pipeline.clone(), buffers };
                                self.bind_cache.insert(key, entry);
                                group
                            }
                        };
                        if !current.is_some_and(|c| Arc::ptr_eq(c, pipeline)) {
                            pass.set_pipeline(pipeline);
                            current = Some(pipeline);
                        }
                        pass.set_bind_group(0, &group, &[]);
                        pass.dispatch_workgroups(groups.0, groups.1, groups.2);
                        self.counters.dispatches += 1;
                        i += 1;
                        if one {
                            break;
                        }
                    }
                }
                Command::Upload { dst, bytes } => {
                    let n = (bytes.len() as u64).div_ceil(4) * 4;
                    encoder.copy_buffer_to_buffer(&up, offsets[i], dst, 0, n.min(dst.size()));
                    i += 1;
                }
                Command::Copy { src, src_offset, dst, dst_offset, bytes } => {
                    encoder.copy_buffer_to_buffer(src, *src_offset, dst, *dst_offset, *bytes);
                    i += 1;
                }
                Command::Readback { src, bytes, .. } => {
                    let n = bytes.div_ceil(4) * 4;
                    if n > 0 {
                        encoder.copy_buffer_to_buffer(src, 0, &st, offsets[i], n.min(src.size()));
                    }
                    self.counters.readbacks += 1;
                    i += 1;
                }
            }
        }
        let profile_read = match &queries {
            Some(q) if !profiled.is_empty() => {
                let bytes = 16 * profiled.len() as u64;
                let usage = wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC;
                let resolve = ctx.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("kiln profile"),
                    size: bytes,
                    usage,
                    mapped_at_creation: false,
                });
                let read = ctx.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("kiln profile read"),
                    size: bytes,
                    usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                });
                encoder.resolve_query_set(q, 0..2 * profiled.len() as u32, &resolve, 0);
                encoder.copy_buffer_to_buffer(&resolve, 0, &read, 0, bytes);
                Some(read)
            }
            _ => None,
        };
        ctx.queue.submit([encoder.finish()]);
        #[cfg(not(target_arch = "wasm32"))]
        if let Some(read) = profile_read {
            self.read_profile(ctx, &read, &profiled)?;
        }
        // wasm32: no timestamp queries (Context::profiling is false there), so there is nothing to read
        #[cfg(target_arch = "wasm32")]
        drop(profile_read);
        self.counters.buffers_created = self.pool.created;
        self.counters.buffer_bytes = self.pool.bytes;
        self.counters.arena_bytes = [&self.uniforms, &self.uploads, &self.staging]
            .iter()
            .map(|a| a.buffer.as_ref().map_or(0, |b| b.size()))
            .sum();
        drop(commands);
        self.recycle();
        if st_len > 0 && reads > 0 {
            let signal = Arc::new(Signal::default());
            let sig = signal.clone();
            st.map_async(wgpu::MapMode::Read, 0..st_len, move |r| {
                sig.set(r.map_err(|e| format!("webgpu: reading results back: {e}")))
            });
            Ok(Submitted { reads: read_at, staging: Some((st, st_len)), mapped: Some(signal), wait: true })
        } else {
            Ok(Submitted { reads: vec![(0, 0); reads], staging: None, mapped: None, wait: true })
        }
    }
}

/// The outcome of a map request, once known, and the task waiting for it.
type SignalState = (Option<std::result::Result<(), String>>, Option<std::task::Waker>);

/// A one-shot completion set by a wgpu callback (which may run on any thread, or from the browser's event loop).
#[derive(Default)]
struct Signal {
    state: std::sync::Mutex<SignalState>,
}

impl Signal {
    fn set(&self, r: std::result::Result<(), String>) {
        let waker = match self.state.lock() {
            Ok(mut g) => {
                g.0 = Some(r);
                g.1.take()
            }
            Err(_) => None,
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
    fn take(&self, waker: Option<&std::task::Waker>) -> Option<std::result::Result<(), String>> {
        let mut g = self.state.lock().ok()?;
        let r = g.0.take();
        if r.is_none() {
            if let Some(w) = waker {
                g.1 = Some(w.clone());
            }
        }
        r
    }
}

/// Waits for the device: natively a blocking `poll` (the map callback fires inside it); in a browser the future
/// stays pending until the browser runs the callback, and nothing blocks.
struct MapWait<'a> {
    device: &'a wgpu::Device,
    signal: &'a Signal,
}

impl std::future::Future for MapWait<'_> {
    type Output = Result<()>;
    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<()>> {
        use std::task::Poll;
        if let Some(r) = self.signal.take(Some(cx.waker())) {
            return Poll::Ready(r.map_err(Error::new));
        }
        #[cfg(not(target_arch = "wasm32"))]
        {
            if let Err(e) = self.device.poll(wgpu::PollType::Wait { submission_index: None, timeout: None }) {
                return Poll::Ready(Err(Error::new(format!("webgpu: waiting for the device: {e}"))));
            }
            match self.signal.take(None) {
                Some(r) => Poll::Ready(r.map_err(Error::new)),
                None => Poll::Ready(Err(Error::new("webgpu: the readback did not complete"))),
            }
        }
        #[cfg(target_arch = "wasm32")]
        {
            let _ = self.device;
            Poll::Pending
        }
    }
}

/// Work submitted by [`Recorder::submit`]; [`Submitted::read`] returns the readbacks' bytes.
#[must_use = "a submission's readbacks come with `read`"]
pub struct Submitted {
    /// (offset, length) of each readback in the staging buffer.
    reads: Vec<(u64, u64)>,
    staging: Option<(wgpu::Buffer, u64)>,
    mapped: Option<Arc<Signal>>,
    /// Whether anything was submitted.
    wait: bool,
}

impl Submitted {
    /// The bytes of each readback, in the order recorded, once the GPU is done.
    pub async fn read(self, ctx: &Context) -> Result<Vec<Vec<u8>>> {
        let mut out = vec![];
        match (&self.staging, &self.mapped) {
            (Some((st, st_len)), Some(signal)) => {
                let r = MapWait { device: &ctx.device, signal }.await;
                ctx.take_error()?;
                r?;
                {
                    let view = st
                        .get_mapped_range(0..*st_len)
                        .map_err(|e| Error::new(format!("webgpu: reading results back: {e}")))?;
                    for (off, len) in &self.reads {
                        let (a, b) = (*off as usize, (*off + *len) as usize);
                        let bytes = view.get(a..b).ok_or_else(|| Error::new("webgpu: a readback is out of range"))?;
                        out.push(bytes.to_vec());
                    }
                }
                st.unmap();
            }
            _ => {
                // nothing to read: no wait, natively as in a browser (onnxruntime-web's run resolves once its
                // gpu-buffer outputs' work is submitted), so the host records an application's next run while the
                // GPU runs this one — a decode loop that feeds the next token back on the GPU overlaps its steps.
                // Validation errors surfaced at the submit; natively, completed work is retired without blocking
                #[cfg(target_arch = "wasm32")]
                let _ = self.wait;
                #[cfg(not(target_arch = "wasm32"))]
                if self.wait {
                    ctx.device
                        .poll(wgpu::PollType::Poll)
                        .map_err(|e| Error::new(format!("webgpu: polling the device: {e}")))?;
                }
                ctx.take_error()?;
                out.resize(self.reads.len(), vec![]);
            }
        }
        Ok(out)
    }
}

/// A download of the logical bytes of `t` (a KV store's rows without its spare capacity) through a staging buffer,
/// outside any recorder (a GPU tensor an application holds): the copy submitted and its map asked for
/// ([`Download::start`]), the bytes awaited later ([`Download::bytes`]; never blocks in a browser). Work submitted
/// after the start runs behind the copy, so the host may queue the next run before it waits for this tensor.
pub struct Download {
    staging: Option<(wgpu::Buffer, u64, u64)>,
    signal: Arc<Signal>,
    /// Where the staging buffer goes back once read ([`Context`]'s staging buffers).
    pool: Arc<std::sync::Mutex<Vec<wgpu::Buffer>>>,
}

/// Staging buffers kept for downloads, and the largest kept (a big tensor's staging is not held on to).
const STAGING_KEPT: usize = 8;
const STAGING_KEPT_BYTES: u64 = 64 << 10;

impl Download {
    /// Submits the copy of `t`'s logical bytes into a staging buffer (one a finished download left, when one of
    /// its size class is free) and asks for its map.
    pub fn start(ctx: &Context, t: &GpuTensor) -> Result<Download> {
        let (device, queue) = (&ctx.device, &ctx.queue);
        let bytes = t.byte_len();
        let signal = Arc::new(Signal::default());
        let pool = ctx.staging.clone();
        if bytes == 0 {
            return Ok(Download { staging: None, signal, pool });
        }
        let padded = bytes.div_ceil(4) * 4;
        let class = padded.max(256).next_power_of_two();
        let kept =
            pool.lock().ok().and_then(|mut v| v.iter().position(|b| b.size() == class).map(|i| v.swap_remove(i)));
        let staging = kept.unwrap_or_else(|| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("kiln download"),
                size: class,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        });
        let mut encoder =
            device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("kiln download") });
        match (&t.kv, &*t.shape) {
            (Some(l), [b, h, rows, d]) => {
                let row = (d * gpu_size_of(t.dt)) as u64;
                let n = *rows as u64 * row;
                for bh in 0..(b * h) as u64 {
                    let from = bh * l.cap as u64 * row;
                    if !n.is_multiple_of(4) || from + n > t.buffer.size() {
                        return Err(Error::new("webgpu: a KV store's rows are not 4-byte aligned"));
                    }
                    encoder.copy_buffer_to_buffer(&t.buffer, from, &staging, bh * n, n);
                }
            }
            _ => {
                if padded > t.buffer.size() {
                    return Err(Error::new(format!(
                        "webgpu: a {bytes}-byte tensor in a {}-byte buffer",
                        t.buffer.size()
                    )));
                }
                encoder.copy_buffer_to_buffer(&t.buffer, 0, &staging, 0, padded);
            }
        }
        queue.submit([encoder.finish()]);
        let sig = signal.clone();
        staging.map_async(wgpu::MapMode::Read, 0..padded, move |r| {
            sig.set(r.map_err(|e| format!("webgpu: downloading a GPU tensor: {e}")))
        });
        Ok(Download { staging: Some((staging, bytes, padded)), signal, pool })
    }

    /// The bytes, once the GPU has run everything submitted before the copy.
    pub async fn bytes(self, device: &wgpu::Device) -> Result<Vec<u8>> {
        let Some((staging, bytes, padded)) = self.staging else { return Ok(vec![]) };
        MapWait { device, signal: &self.signal }.await?;
        let out = {
            let view = staging
                .get_mapped_range(0..padded)
                .map_err(|e| Error::new(format!("webgpu: downloading a GPU tensor: {e}")))?;
            view.get(..bytes as usize).ok_or_else(|| Error::new("webgpu: a download is out of range"))?.to_vec()
        };
        staging.unmap();
        if let Ok(mut kept) = self.pool.lock() {
            if kept.len() < STAGING_KEPT && staging.size() <= STAGING_KEPT_BYTES {
                kept.push(staging);
            }
        }
        Ok(out)
    }
}

/// Bytes per element on the GPU: a bool is an f32 0.0 / 1.0 (one 4-byte word, like every GPU element).
/// An i64 is an i32 on the GPU (range-checked at upload, like onnxruntime's WebGPU EP).
pub fn gpu_size_of(dt: DatumType) -> usize {
    match dt {
        DatumType::Bool | DatumType::I64 => 4,
        // narrow integers: one i32 word each (sign- or zero-extended)
        DatumType::U8 | DatumType::I8 | DatumType::U16 | DatumType::I16 => 4,
        _ => dt.size_of(),
    }
}

/// A host tensor's bytes as the GPU stores them (f32, i32, u32, f16 as is; bool as f32 0.0 / 1.0; i64 as i32;
/// others are refused for now).
pub fn host_bytes(t: &Tensor) -> Result<Vec<u8>> {
    match t.datum_type() {
        DatumType::Bool => {
            let view = t.try_as_plain_ram().map_err(|e| Error::new(format!("webgpu: tensor data: {e}")))?;
            let v = view.as_slice::<bool>().map_err(|e| Error::new(format!("webgpu: tensor data: {e}")))?;
            Ok(v.iter().flat_map(|b| if *b { 1f32 } else { 0f32 }.to_le_bytes()).collect())
        }
        DatumType::I64 => {
            let view = t.try_as_plain_ram().map_err(|e| Error::new(format!("webgpu: tensor data: {e}")))?;
            let v = view.as_slice::<i64>().map_err(|e| Error::new(format!("webgpu: tensor data: {e}")))?;
            let mut out = Vec::with_capacity(v.len() * 4);
            for x in v {
                let x = i32::try_from(*x)
                    .map_err(|_| Error::new(format!("webgpu: i64 value {x} does not fit the GPU's 32-bit integers")))?;
                out.extend(x.to_le_bytes());
            }
            Ok(out)
        }
        // f16: two bytes an element, as on the host (crate::f16)
        DatumType::F32 | DatumType::I32 | DatumType::U32 | DatumType::F16 => {
            let view = t.try_as_plain_ram().map_err(|e| Error::new(format!("webgpu: tensor data: {e}")))?;
            Ok(view.as_bytes().to_vec())
        }
        DatumType::U8 | DatumType::I8 | DatumType::U16 | DatumType::I16 => crate::quant::widen(t),
        other => Err(Error::new(format!("webgpu: element type {other:?} has no GPU layout yet"))),
    }
}

/// Bytes read back into a host tensor of `shape` and `dt`.
pub fn tensor_from_bytes(dt: DatumType, shape: &[usize], bytes: &[u8]) -> Result<Tensor> {
    let n = shape.iter().product::<usize>();
    let want = n * gpu_size_of(dt);
    if bytes.len() < want {
        return Err(Error::new(format!("webgpu: read back {} bytes, expected {want}", bytes.len())));
    }
    if dt == DatumType::I64 {
        let v: Vec<i64> =
            bytes[..want].chunks_exact(4).map(|w| i32::from_le_bytes([w[0], w[1], w[2], w[3]]) as i64).collect();
        return Tensor::from_shape(shape, &v).map_err(|e| Error::new(format!("webgpu: building a tensor: {e}")));
    }
    if dt == DatumType::Bool {
        let v: Vec<bool> =
            bytes[..want].chunks_exact(4).map(|w| f32::from_le_bytes([w[0], w[1], w[2], w[3]]) != 0.0).collect();
        return Tensor::from_shape(shape, &v).map_err(|e| Error::new(format!("webgpu: building a tensor: {e}")));
    }
    if let Some(t) = crate::quant::narrow(dt, shape, &bytes[..want]) {
        return t;
    }
    unsafe { Tensor::from_raw_dt(dt, shape, &bytes[..want]) }
        .map_err(|e| Error::new(format!("webgpu: building a tensor: {e}")))
}
