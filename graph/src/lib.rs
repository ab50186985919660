//! kiln-graph: ONNX bytes → tract model with symbolic dims, and kiln's rewrite passes.
//!
//! Data flows one way: bytes → [`import`] → [`passes`] → a typed (optionally optimised) tract model that a provider
//! plans and runs.

pub mod error;
pub mod float16;
pub mod fuse_gpu;
pub mod fuse_norm;
pub mod fuse_rope;
pub mod generation;
pub mod import;
pub mod int_dims;
pub mod lower_gpu;
pub mod passes;
pub mod skeleton;
pub mod stream;
pub mod symbolic;
pub mod types;
pub mod untie;

pub use error::{Error, ErrorKind, Result};
pub use import::{
    decode, load_bytes, load_path, load_proto, stream_external_initializers, tensor_from_proto_bytes, tensor_to_proto,
    DirectoryResolver, ExternalDataResolver, InMemoryResolver, LoadOptions, Model, ModelFileResolver,
    OptimizationLevel, ReadFuture, WeightSource, WeightStreaming,
};
pub use skeleton::{skeleton, Skeleton, MODEL_ITSELF};
pub use tract_onnx;
pub use types::{onnx_type_name, Dim, ElementType, ValueInfo};

/// tract's ONNX framework with kiln's operator registrations layered on top.
pub fn framework() -> tract_onnx::Onnx {
    let mut onnx = tract_onnx::onnx();
    kiln_ops::register(&mut onnx.op_register);
    onnx
}
