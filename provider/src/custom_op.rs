//! Custom operators: an application computes the nodes of a (domain, op type) itself, on CPU tensors, possibly
//! asynchronously; the session awaits it between two nodes of a CPU run. See `kiln_ops::host_op` for how such nodes
//! are imported and how their output shapes are known (declared types and ranks, runtime-bound dims).
//!
//! ```no_run
//! use std::sync::Arc;
//! use kiln_provider::{AttributeLookup, CustomOp, CustomOpFuture, CustomOpRegistration, HostOpInfo, SessionOptions, Tensor};
//!
//! struct Scale;
//! impl CustomOp for Scale {
//!     fn compute(&self, node: &HostOpInfo, inputs: Vec<Tensor>) -> CustomOpFuture {
//!         let factor = node.float_attribute("factor").unwrap_or(1.0);
//!         Box::pin(async move {
//!             let x = inputs[0].to_vec::<f32>()?;
//!             Ok(vec![Tensor::from_vec(inputs[0].dims(), x.iter().map(|v| v * factor).collect())?])
//!         })
//!     }
//! }
//! let mut options = SessionOptions::default();
//! options.custom_ops.push(CustomOpRegistration::new("my.domain", "Scale", Arc::new(Scale)));
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

pub use kiln_ops::host_op::{AttributeValue, HostOpInfo};

use crate::tensor::Tensor;
use crate::{ElementType, Result};

/// The future a custom operator returns: its outputs, in the node's output order.
#[cfg(not(target_arch = "wasm32"))]
pub type CustomOpFuture = Pin<Box<dyn Future<Output = Result<Vec<Tensor>>> + Send + 'static>>;
/// The future a custom operator returns: its outputs, in the node's output order (wasm32: JavaScript promises are
/// not `Send`, and wasm32 has one thread).
#[cfg(target_arch = "wasm32")]
pub type CustomOpFuture = Pin<Box<dyn Future<Output = Result<Vec<Tensor>>> + 'static>>;

/// An application's operator. `compute` is called once per node evaluation with the node's inputs; an `Err` (or
/// outputs that do not fit the node) fails that run only.
pub trait CustomOp: Send + Sync {
    fn compute(&self, node: &HostOpInfo, inputs: Vec<Tensor>) -> CustomOpFuture;
}

/// What the application declares about one output (both optional; see `kiln_ops::host_op`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CustomOpOutput {
    pub element_type: Option<ElementType>,
    /// `Some(n)`: a fixed dim; `None`: known at run time. `None` for the whole: undeclared.
    pub dims: Option<Vec<Option<usize>>>,
}

/// A custom operator registered for a (domain, op type). Later registrations of the same pair win; a registration
/// of a built-in op (the `ai.onnx.contrib` tokenizers, even a default-domain op) overrides it.
#[derive(Clone)]
pub struct CustomOpRegistration {
    /// `""` or `"ai.onnx"` for the default domain.
    pub domain: String,
    pub op_type: String,
    pub outputs: Vec<CustomOpOutput>,
    pub op: Arc<dyn CustomOp>,
}

impl CustomOpRegistration {
    pub fn new(domain: impl Into<String>, op_type: impl Into<String>, op: Arc<dyn CustomOp>) -> Self {
        CustomOpRegistration { domain: domain.into(), op_type: op_type.into(), outputs: vec![], op }
    }
    /// With declared outputs (element type and dims), for models whose value_info does not say.
    pub fn with_outputs(mut self, outputs: Vec<CustomOpOutput>) -> Self {
        self.outputs = outputs;
        self
    }
    pub(crate) fn decl(&self) -> kiln_ops::host_op::CustomOpDecl {
        kiln_ops::host_op::CustomOpDecl {
            domain: self.domain.clone(),
            op_type: self.op_type.clone(),
            outputs: self
                .outputs
                .iter()
                .map(|o| kiln_ops::host_op::DeclaredOutput {
                    datum_type: o.element_type.map(|t| t.to_datum_type()),
                    dims: o.dims.clone(),
                })
                .collect(),
        }
    }
    pub(crate) fn matches(&self, info: &HostOpInfo) -> bool {
        let norm = |d: &str| if d == "ai.onnx" { String::new() } else { d.to_string() };
        norm(&self.domain) == norm(&info.domain) && self.op_type == info.op_type
    }
}

impl std::fmt::Debug for CustomOpRegistration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CustomOpRegistration")
            .field("domain", &self.domain)
            .field("op_type", &self.op_type)
            .field("outputs", &self.outputs)
            .finish()
    }
}

/// Attribute lookups for callbacks.
pub trait AttributeLookup {
    fn attribute(&self, name: &str) -> Option<&AttributeValue>;
    fn float_attribute(&self, name: &str) -> Option<f32> {
        match self.attribute(name)? {
            AttributeValue::Float(f) => Some(*f),
            AttributeValue::Int(i) => Some(*i as f32),
            _ => None,
        }
    }
    fn int_attribute(&self, name: &str) -> Option<i64> {
        match self.attribute(name)? {
            AttributeValue::Int(i) => Some(*i),
            _ => None,
        }
    }
    fn string_attribute(&self, name: &str) -> Option<&str> {
        match self.attribute(name)? {
            AttributeValue::String(s) => Some(s),
            _ => None,
        }
    }
}

impl AttributeLookup for HostOpInfo {
    fn attribute(&self, name: &str) -> Option<&AttributeValue> {
        self.attributes.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }
}
