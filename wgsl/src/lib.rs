//! kiln-wgsl: kiln's WebGPU side. A wgpu [`Context`] (adapter, limits, error handler, pipeline cache), the WGSL
//! kernel families (`src/kernels/*.wgsl`), the [`Recorder`] that turns a run's GPU work into one submit per flush,
//! and the ops ([`ops::GpuOp`], [`ops::ToDevice`], [`ops::ToHost`]) that kiln-graph's lowering places in tract's model.
//!
//! Native shader text never contains `enable subgroups;` (naga rejects it).

pub mod attention;
pub mod context;
pub mod exec;

pub mod f16;
pub mod fused;
pub mod kernels;
pub mod kv;
pub mod msft;
pub mod ops;
pub mod qmatmul;
pub mod quant;

/// A HashMap with a fast, fixed-seed hasher for the per-dispatch lookups of the run loop (pipelines, bind groups,
/// buffer pool, held buffers): keys are kiln's own, never attacker-chosen, and SipHash showed in host profiles.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::FixedState>;

pub use context::{AdapterOptions, Caps, Context, PipelineKey, Tuning};
pub use exec::{Counters, GpuTensor, PendingRead, Recorder};
pub use kernels::{BinaryOp, Kernel, UnaryOp, View};
pub use wgpu;

/// A GPU-side failure; kiln-provider turns it into a kiln error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub message: String,
}

impl Error {
    pub fn new(message: impl Into<String>) -> Error {
        Error { message: message.into() }
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

pub type Result<T, E = Error> = std::result::Result<T, E>;
