//! kiln-provider: the public Rust API. A [`Session`] loads an ONNX model, places it on an execution provider and
//! runs it; [`blocking::Session`] wraps it for native callers that do not run an async executor.

mod cpu;
pub mod custom_op;
mod gpu;
mod gpu_stream;
pub mod gpu_value;
pub mod session;
pub mod tensor;

pub use custom_op::{
    AttributeLookup, AttributeValue, CustomOp, CustomOpFuture, CustomOpOutput, CustomOpRegistration, HostOpInfo,
};
pub use gpu::PlacementReport;
pub use gpu_value::{GpuTensor, Location, PreferredOutputLocation, RunOptions, Value};
pub use kiln_graph::generation::{GenerationOptions, NEXT_TOKEN};
pub use kiln_graph::lower_gpu::{Device, NodePlacement};
pub use kiln_graph::{
    Dim, DirectoryResolver, ElementType, Error, ErrorKind, ExternalDataResolver, InMemoryResolver, ModelFileResolver,
    OptimizationLevel, ReadFuture, Result, ValueInfo, WeightStreaming, MODEL_ITSELF,
};
pub use kiln_wgsl::{wgpu, AdapterOptions, Counters, Tuning};
pub use session::{ExecutionProvider, Outputs, Session, SessionOptions};
pub use tensor::{Element, Tensor};

/// Blocking wrappers for native code.
pub mod blocking {
    use std::path::Path;

    use crate::{Outputs, Result, RunOptions, SessionOptions, Value, ValueInfo};

    pub struct Session(pub crate::Session);

    impl Session {
        pub fn from_bytes(bytes: &[u8], options: &SessionOptions) -> Result<Session> {
            pollster::block_on(crate::Session::from_bytes(bytes, options)).map(Session)
        }
        pub fn from_path(path: impl AsRef<Path>, options: &SessionOptions) -> Result<Session> {
            pollster::block_on(crate::Session::from_path(path, options)).map(Session)
        }
        pub fn from_source(
            source: std::sync::Arc<dyn crate::ExternalDataResolver>,
            size: u64,
            options: &SessionOptions,
        ) -> Result<Session> {
            pollster::block_on(crate::Session::from_source(source, size, options)).map(Session)
        }
        pub fn inputs(&self) -> &[ValueInfo] {
            self.0.inputs()
        }
        pub fn outputs(&self) -> &[ValueInfo] {
            self.0.outputs()
        }
        pub fn run<N: AsRef<str>, V: Into<Value>>(&self, feeds: impl IntoIterator<Item = (N, V)>) -> Result<Outputs> {
            pollster::block_on(self.0.run(feeds))
        }
        pub fn run_with_outputs<N: AsRef<str>, V: Into<Value>>(
            &self,
            feeds: impl IntoIterator<Item = (N, V)>,
            output_names: &[&str],
        ) -> Result<Outputs> {
            pollster::block_on(self.0.run_with_outputs(feeds, output_names))
        }
        pub fn run_with<N: AsRef<str>, V: Into<Value>>(
            &self,
            feeds: impl IntoIterator<Item = (N, V)>,
            output_names: Option<&[&str]>,
            options: &RunOptions,
        ) -> Result<Outputs> {
            pollster::block_on(self.0.run_with(feeds, output_names, options))
        }
    }

    impl std::ops::Deref for Session {
        type Target = crate::Session;
        fn deref(&self) -> &crate::Session {
            &self.0
        }
    }
}
