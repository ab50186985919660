//! ONNX bytes → tract model: external data, free dimension overrides, constant inputs, kiln's op registrations,
//! typing, decluttering and kiln's passes.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use prost::Message;
use tract_onnx::pb;
use tract_onnx::pb::tensor_shape_proto::dimension::Value as DimValue;
use tract_onnx::pb::type_proto::Value as TypeValue;
use tract_onnx::prelude::*;

use crate::error::{Error, ErrorKind, Result};
use crate::types::{Dim, ElementType, ValueInfo};

/// Supplies the bytes of external tensor data (`model.onnx.data` and friends). Browsers have no filesystem: the
/// caller maps `location` (the path written in the model) to bytes it fetched itself.
pub trait ExternalDataResolver: Send + Sync {
    /// Returns `length` bytes (or everything to the end when `None`) of `location` from `offset`.
    fn read(&self, location: &str, offset: u64, length: Option<u64>) -> Result<Vec<u8>>;

    /// Reads `length` bytes of `location` from `offset`, asynchronously (a browser's Blob). The streaming import and
    /// the GPU backend's weight upload read through this, one bounded range at a time. Defaults to [`Self::read`].
    fn read_range<'a>(&'a self, location: &'a str, offset: u64, length: u64) -> ReadFuture<'a> {
        Box::pin(std::future::ready(self.read(location, offset, Some(length))))
    }
}

/// The future of [`ExternalDataResolver::read_range`] (`Send` on native targets; wasm32 has one thread and its
/// JavaScript promises are not `Send`).
#[cfg(not(target_arch = "wasm32"))]
pub type ReadFuture<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<u8>>> + Send + 'a>>;
#[cfg(target_arch = "wasm32")]
pub type ReadFuture<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<u8>>> + 'a>>;

/// The data source of a model's streamed weights (kept with the model for the provider).
#[derive(Clone)]
pub struct WeightSource(pub Arc<dyn ExternalDataResolver>);

impl std::fmt::Debug for WeightSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WeightSource")
    }
}

/// Resolves external data from files in memory, keyed by the location written in the model.
#[derive(Default, Clone)]
pub struct InMemoryResolver {
    pub files: HashMap<String, Arc<Vec<u8>>>,
}

impl InMemoryResolver {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn with_file(mut self, location: impl Into<String>, bytes: Vec<u8>) -> Self {
        self.files.insert(location.into(), Arc::new(bytes));
        self
    }
}

/// The end of the range `offset..offset + length` (or to the end) of data `location` of `size` bytes, checked to lie
/// inside it.
fn range_end(location: &str, offset: u64, length: Option<u64>, size: u64) -> Result<u64> {
    let end = match length {
        Some(l) => offset.checked_add(l).ok_or_else(|| {
            Error::invalid_model(format!("external data `{location}`: offset {offset} + length {l} overflows"))
        })?,
        None => size,
    };
    if offset > size || end > size {
        return Err(Error::invalid_model(format!(
            "external data `{location}`: range {offset}..{end} is past its end ({size} bytes)"
        )));
    }
    Ok(end)
}

fn slice_of(bytes: &[u8], location: &str, offset: u64, length: Option<u64>) -> Result<Vec<u8>> {
    let end = range_end(location, offset, length, bytes.len() as u64)?;
    // (range_end checked offset ≤ end ≤ bytes.len())
    Ok(bytes[offset as usize..end as usize].to_vec())
}

impl ExternalDataResolver for InMemoryResolver {
    fn read(&self, location: &str, offset: u64, length: Option<u64>) -> Result<Vec<u8>> {
        let bytes = self.files.get(location).ok_or_else(|| {
            Error::io(format!(
                "external data file `{location}` was not provided (provided: {:?})",
                self.files.keys().collect::<Vec<_>>()
            ))
        })?;
        slice_of(bytes, location, offset, length)
    }
}

/// Resolves external data from files beside the model (native only).
#[derive(Clone, Debug)]
pub struct DirectoryResolver {
    pub dir: PathBuf,
}

impl ExternalDataResolver for DirectoryResolver {
    fn read(&self, location: &str, offset: u64, length: Option<u64>) -> Result<Vec<u8>> {
        let rel = Path::new(location);
        if rel.is_absolute() || rel.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
            return Err(Error::invalid_model(format!(
                "external data location `{location}` must be a relative path inside the model's folder"
            )));
        }
        read_file_range(&self.dir.join(rel), location, offset, length)
    }
}

/// Reads `length` bytes (or everything to the end) of the file at `path` from `offset`: only that range, so that a
/// weight streamed to the GPU is read a chunk at a time. `location` names the data in errors.
fn read_file_range(path: &Path, location: &str, offset: u64, length: Option<u64>) -> Result<Vec<u8>> {
    let io = |e: std::io::Error| Error::io(format!("reading external data {}: {e}", path.display()));
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path).map_err(io)?;
    let size = file.metadata().map_err(io)?.len();
    let end = range_end(location, offset, length, size)?;
    let len = usize::try_from(end - offset)
        .map_err(|_| Error::io(format!("external data `{location}`: {} bytes do not fit in memory", end - offset)))?;
    let mut bytes = vec![0u8; len];
    file.seek(SeekFrom::Start(offset)).map_err(io)?;
    file.read_exact(&mut bytes).map_err(io)?;
    Ok(bytes)
}

/// A model file as a data source (native only): [`crate::MODEL_ITSELF`] reads the file at `path` (the large
/// initializers [`crate::skeleton`] left in it), every other location goes to `rest` (the model's external data).
#[derive(Clone)]
pub struct ModelFileResolver {
    pub path: PathBuf,
    pub rest: Arc<dyn ExternalDataResolver>,
}

impl ExternalDataResolver for ModelFileResolver {
    fn read(&self, location: &str, offset: u64, length: Option<u64>) -> Result<Vec<u8>> {
        if location == crate::MODEL_ITSELF {
            return read_file_range(&self.path, location, offset, length);
        }
        self.rest.read(location, offset, length)
    }

    fn read_range<'a>(&'a self, location: &'a str, offset: u64, length: u64) -> ReadFuture<'a> {
        if location == crate::MODEL_ITSELF {
            return Box::pin(std::future::ready(read_file_range(&self.path, location, offset, Some(length))));
        }
        self.rest.read_range(location, offset, length)
    }
}

/// How much of tract's optimisation to apply (onnxruntime's `graphOptimizationLevel`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OptimizationLevel {
    /// Typed model as imported.
    Disabled,
    /// Decluttered (constant folding, simplifications) and kiln's passes.
    Basic,
    /// Everything, including tract's optimised kernels. The default.
    #[default]
    All,
}

impl OptimizationLevel {
    /// Accepts onnxruntime's names: `disabled`, `basic`, `extended`, `layout`, `all`.
    pub fn from_name(s: &str) -> Result<Self> {
        match s {
            "disabled" => Ok(Self::Disabled),
            "basic" | "extended" => Ok(Self::Basic),
            "layout" | "all" => Ok(Self::All),
            other => Err(Error::invalid_argument(format!(
                "unknown graph optimization level `{other}` (expected disabled, basic, extended, layout or all)"
            ))),
        }
    }
}

#[derive(Clone, Default)]
pub struct LoadOptions {
    /// Named dimensions fixed to a value, like onnxruntime's `freeDimensionOverrides`.
    pub free_dimension_overrides: HashMap<String, i64>,
    pub optimization: OptimizationLevel,
    /// Where external data comes from; for [`load_path`] the model's folder is the default.
    pub external_data: Option<Arc<dyn ExternalDataResolver>>,
    /// Inputs whose values are fixed at load time (folded as constants, no longer model inputs).
    pub constant_inputs: Vec<(String, Tensor)>,
    /// Decoder helpers added to the graph (crate::generation): last-position logits, a next-token output.
    pub generation: crate::generation::GenerationOptions,
    /// Float16 models: the GPU lowering fuses their attention and appends their KV cache in place (see
    /// [`crate::passes::f16_fused_attention`]). `None`: on, unless KILN_GPU_F16_FUSED_ATTENTION=0.
    pub f16_fused_attention: Option<bool>,
    /// Float16 models: the GPU lowering gives their matmuls and attention float16 products where the adapter has
    /// shader-f16 (see [`crate::passes::float16_math`]). `None`: on, unless KILN_GPU_F16_MATH=0.
    pub f16_math: Option<bool>,
}

/// Weights left in the external data at import (GPU sessions): external initializers of at least `min_bytes`
/// become `ai.kiln` ExternalWeight nodes (kiln_ops::external_weight) that the GPU backend fills its buffers from,
/// `chunk_bytes` at a time; a weight a CPU node reads is read into memory instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WeightStreaming {
    pub enabled: bool,
    pub min_bytes: u64,
    pub chunk_bytes: u64,
}

impl Default for WeightStreaming {
    /// On, for weights of 64 KiB or more (`KILN_STREAM_MIN_BYTES` overrides, for experiments), read 4 MiB at a time.
    /// (64 KiB: a 4-bit model's per-layer weights stream too; SmolLM2-135M q4f16's peak memory 548 → 371 MB, the
    /// same dispatches.)
    fn default() -> Self {
        let min_bytes = std::env::var("KILN_STREAM_MIN_BYTES").ok().and_then(|v| v.parse().ok()).unwrap_or(64 << 10);
        WeightStreaming { enabled: true, min_bytes, chunk_bytes: 4 << 20 }
    }
}

impl WeightStreaming {
    /// Off: every external tensor is read into memory at import.
    pub fn off() -> Self {
        WeightStreaming { enabled: false, ..Default::default() }
    }
    /// The read size, at least 8 bytes and a multiple of 8 (whole elements of any type, whole u32 words).
    pub fn chunk(&self) -> u64 {
        (self.chunk_bytes.max(8) / 8) * 8
    }
}

impl std::fmt::Debug for LoadOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadOptions")
            .field("free_dimension_overrides", &self.free_dimension_overrides)
            .field("optimization", &self.optimization)
            .field("external_data", &self.external_data.is_some())
            .field("constant_inputs", &self.constant_inputs.iter().map(|c| &c.0).collect::<Vec<_>>())
            .field("generation", &self.generation)
            .field("f16_fused_attention", &self.f16_fused_attention)
            .field("f16_math", &self.f16_math)
            .finish()
    }
}

/// An imported model: tract's typed model plus onnxruntime-style metadata.
#[derive(Debug, Clone)]
pub struct Model {
    pub typed: TypedModel,
    pub inputs: Vec<ValueInfo>,
    pub outputs: Vec<ValueInfo>,
    /// The default-domain opset the model imports.
    pub opset: i64,
    /// Other domains and their versions (`com.microsoft`, ...).
    pub domains: Vec<(String, i64)>,
    /// What kiln's passes changed, one line each.
    pub pass_log: Vec<String>,
    /// Where the model's streamed weights (ExternalWeight nodes) are read from; `None` when it has none.
    pub weight_source: Option<WeightSource>,
}

/// Loads a model from a path; external data defaults to the model's folder.
pub fn load_path(path: impl AsRef<Path>, options: &LoadOptions) -> Result<Model> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| Error::io(format!("reading model {}: {e}", path.display())))?;
    let mut options = options.clone();
    if options.external_data.is_none() {
        let dir = path.parent().map(|p| p.to_path_buf()).unwrap_or_else(|| PathBuf::from("."));
        options.external_data = Some(Arc::new(DirectoryResolver { dir }));
    }
    load_bytes(&bytes, &options)
}

/// Decodes ONNX bytes into the protobuf model (no tract involved).
pub fn decode(bytes: &[u8]) -> Result<pb::ModelProto> {
    if bytes.is_empty() {
        return Err(Error::invalid_model("the model is empty (0 bytes)"));
    }
    let proto = pb::ModelProto::decode(bytes)
        .map_err(|e| Error::invalid_model(format!("not a valid ONNX model (protobuf decode failed: {e})")))?;
    if proto.graph.is_none() {
        return Err(Error::invalid_model("the ONNX model has no graph"));
    }
    Ok(proto)
}

/// Loads a model from ONNX bytes.
pub fn load_bytes(bytes: &[u8], options: &LoadOptions) -> Result<Model> {
    let proto = decode(bytes)?;
    load_proto(proto, options)
}

pub fn load_proto(mut proto: pb::ModelProto, options: &LoadOptions) -> Result<Model> {
    inline_external_data(&mut proto, options.external_data.as_deref())?;
    apply_free_dimension_overrides(&mut proto, &options.free_dimension_overrides)?;
    apply_constant_inputs(&mut proto, &options.constant_inputs)?;
    crate::generation::apply(&mut proto, &options.generation)?;
    let (inputs, outputs) = io_metadata(&proto)?;
    name_unnamed_input_dims(&mut proto)?;
    let opset = proto
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map(|o| o.version)
        .unwrap_or(0);
    let domains = proto
        .opset_import
        .iter()
        .filter(|o| !(o.domain.is_empty() || o.domain == "ai.onnx"))
        .map(|o| (o.domain.clone(), o.version))
        .collect();
    let graph = proto.graph.as_ref().ok_or_else(|| Error::invalid_model("the ONNX model has no graph"))?;
    let framework = crate::framework();
    check_supported(graph, &framework)?;

    let mut pass_log = vec![];
    let mut attempts = 0;
    let typed = loop {
        let parsed = framework
            .parse(&proto, None)
            .map_err(|e| Error::from_tract(ErrorKind::InvalidModel, "parsing the ONNX graph", &e))?;
        if !parsed.unresolved_inputs.is_empty() {
            return Err(Error::invalid_model(format!(
                "the graph uses values that no node, input or initializer defines: {:?}",
                parsed.unresolved_inputs
            )));
        }
        match parsed.model.into_typed() {
            Ok(typed) => break typed,
            Err(e) => {
                // A declared dim named independently of what the graph computes for it (dynamo's
                // `total_sequence_length` for seq + past): rename it to the expression the graph computes.
                attempts += 1;
                let msg = format!("{e:#}");
                let fix = if attempts <= 32 { resolve_dim_conflict(&mut proto, &msg) } else { None };
                match fix {
                    Some(line) => pass_log.push(line),
                    None => return Err(typing_error(&e)),
                }
            }
        }
    };
    let weight_source = if streams_weights(&proto) { options.external_data.clone().map(WeightSource) } else { None };
    let mut model = Model { typed, inputs, outputs, opset, domains, pass_log, weight_source };
    tdim_outputs_to_i64(&mut model.typed)?;
    let f16_fused = options
        .f16_fused_attention
        .unwrap_or_else(|| std::env::var("KILN_GPU_F16_FUSED_ATTENTION").map_or(true, |v| v != "0"));
    let f16_math = options
        .f16_math
        .unwrap_or_else(|| std::env::var(crate::passes::F16_MATH_ENV).map_or(true, |v| v.trim() != "0"));
    crate::passes::run(&mut model, options.optimization, f16_fused, f16_math)?;
    Ok(model)
}

/// A shape expression as tract prints it in its `Debug` form (`Add([Sym(a), MulInt(2, Sym(b))])`).
#[derive(Debug, Clone, PartialEq)]
enum DimExpr {
    Val(i64),
    Sym(String),
    Add(Vec<DimExpr>),
    Mul(Vec<DimExpr>),
    MulInt(i64, Box<DimExpr>),
}

impl DimExpr {
    /// Parses one expression from the start of `s`; returns it and the rest.
    fn parse(s: &str) -> Option<(DimExpr, &str)> {
        let s = s.trim_start();
        let int = |s: &str| -> Option<(i64, usize)> {
            let n = s.find(|c: char| !(c.is_ascii_digit() || c == '-')).unwrap_or(s.len());
            s[..n].parse().ok().map(|v| (v, n))
        };
        if let Some(rest) = s.strip_prefix("Val(") {
            let (v, n) = int(rest)?;
            return Some((DimExpr::Val(v), rest[n..].strip_prefix(')')?));
        }
        if let Some(rest) = s.strip_prefix("Sym(") {
            let end = rest.find(')')?;
            return Some((DimExpr::Sym(rest[..end].to_string()), &rest[end + 1..]));
        }
        if let Some(rest) = s.strip_prefix("Add") {
            let (items, rest) = DimExpr::parse_list(rest)?;
            return Some((DimExpr::Add(items), rest));
        }
        if let Some(rest) = s.strip_prefix("MulInt(") {
            let (k, n) = int(rest)?;
            let rest = rest[n..].trim_start().strip_prefix(',')?;
            let (e, rest) = DimExpr::parse(rest)?;
            return Some((DimExpr::MulInt(k, Box::new(e)), rest.trim_start().strip_prefix(')')?));
        }
        if let Some(rest) = s.strip_prefix("Mul") {
            let (items, rest) = DimExpr::parse_list(rest)?;
            return Some((DimExpr::Mul(items), rest));
        }
        None
    }

    fn parse_list(s: &str) -> Option<(Vec<DimExpr>, &str)> {
        let mut s = s.strip_prefix("([")?;
        let mut items = vec![];
        loop {
            s = s.trim_start();
            if let Some(rest) = s.strip_prefix("])") {
                return Some((items, rest));
            }
            let (e, rest) = DimExpr::parse(s)?;
            items.push(e);
            s = rest.trim_start();
            s = s.strip_prefix(',').unwrap_or(s);
        }
    }

    /// The expression as an ONNX `dim_param` tract's importer reads back.
    fn to_dim_param(&self) -> String {
        match self {
            DimExpr::Val(v) => v.to_string(),
            DimExpr::Sym(s) => s.clone(),
            DimExpr::Add(items) => items.iter().map(|e| e.to_dim_param()).collect::<Vec<_>>().join(" + "),
            DimExpr::Mul(items) => {
                items.iter().map(|e| format!("({})", e.to_dim_param())).collect::<Vec<_>>().join("*")
            }
            DimExpr::MulInt(k, e) => format!("{k}*({})", e.to_dim_param()),
        }
    }

    fn symbols(&self, out: &mut Vec<String>) {
        match self {
            DimExpr::Val(_) => {}
            DimExpr::Sym(s) => out.push(s.clone()),
            DimExpr::Add(items) | DimExpr::Mul(items) => items.iter().for_each(|e| e.symbols(out)),
            DimExpr::MulInt(_, e) => e.symbols(out),
        }
    }
}

/// Every dim of a value info list, with its dim_param name when it has one.
fn for_each_dim(values: &mut [pb::ValueInfoProto], f: &mut dyn FnMut(&mut pb::tensor_shape_proto::Dimension)) {
    for vi in values {
        if let Some(TypeValue::TensorType(tt)) = vi.r#type.as_mut().and_then(|t| t.value.as_mut()) {
            if let Some(shape) = tt.shape.as_mut() {
                shape.dim.iter_mut().for_each(&mut *f);
            }
        }
    }
}

fn dim_param_of(d: &pb::tensor_shape_proto::Dimension) -> Option<&str> {
    match &d.value {
        Some(DimValue::DimParam(p)) => Some(p.as_str()),
        _ => None,
    }
}

/// Reads `Impossible to unify A with B.` in a typing failure. Where one side is a named dim `X` and the other an
/// expression the graph computes:
/// - if `X` names a dim of a graph input and the expression only uses the inputs' other dims, every `X` (inputs,
///   value_info, outputs) becomes that expression, so the input facts stay determined and tract solves `X` at run
///   time from the other inputs;
/// - otherwise the value_info/output annotations naming `X` are dropped (they are hints; the graph's own inference
///   is what counts).
///
/// Returns a line for the pass log, or `None` when the failure is not such a conflict.
fn resolve_dim_conflict(proto: &mut pb::ModelProto, msg: &str) -> Option<String> {
    let at = msg.find("Impossible to unify ")?;
    let rest = &msg[at + "Impossible to unify ".len()..];
    let (a, rest) = DimExpr::parse(rest)?;
    let rest = rest.trim_start().strip_prefix("with")?;
    let (b, _) = DimExpr::parse(rest)?;
    let graph = proto.graph.as_mut()?;
    let mut input_syms: Vec<String> = vec![];
    for_each_dim(&mut graph.input, &mut |d| {
        if let Some(p) = dim_param_of(d) {
            input_syms.push(p.to_string());
        }
    });
    let candidates = [(a.clone(), b.clone()), (b, a)];
    // first choice: an input's dim renamed to what the graph computes
    for (named, expr) in &candidates {
        let DimExpr::Sym(x) = named else { continue };
        if !input_syms.contains(x) {
            continue;
        }
        let mut used = vec![];
        expr.symbols(&mut used);
        if used.is_empty() || used.contains(x) || !used.iter().all(|s| input_syms.contains(s)) {
            continue;
        }
        let replacement = expr.to_dim_param();
        let mut rename = |d: &mut pb::tensor_shape_proto::Dimension| {
            if dim_param_of(d) == Some(x.as_str()) {
                d.value = Some(DimValue::DimParam(replacement.clone()));
            }
        };
        for_each_dim(&mut graph.input, &mut rename);
        for_each_dim(&mut graph.value_info, &mut rename);
        for_each_dim(&mut graph.output, &mut rename);
        return Some(format!("dim `{x}` is computed by the graph as `{replacement}`; renamed"));
    }
    // otherwise: drop the annotations on intermediate values and outputs that name the conflicting dims
    let mut dropped = vec![];
    for (named, _) in &candidates {
        let DimExpr::Sym(x) = named else { continue };
        let mut hit = false;
        let mut drop = |d: &mut pb::tensor_shape_proto::Dimension| {
            if dim_param_of(d) == Some(x.as_str()) {
                d.value = None;
                hit = true;
            }
        };
        for_each_dim(&mut graph.value_info, &mut drop);
        for_each_dim(&mut graph.output, &mut drop);
        if hit {
            dropped.push(x.clone());
        }
    }
    if dropped.is_empty() {
        return None;
    }
    Some(format!("value annotations naming {dropped:?} dropped (they conflict with the graph's shapes)"))
}

/// tract computes shapes (Shape, Size) as TDim; a model output of that type leaves as ONNX's int64.
fn tdim_outputs_to_i64(typed: &mut TypedModel) -> Result<()> {
    for ix in 0..typed.outputs.len() {
        let outlet = typed.outputs[ix];
        let fact =
            typed.outlet_fact(outlet).map_err(|e| Error::from_tract(ErrorKind::InvalidModel, "output fact", &e))?;
        if fact.datum_type == DatumType::TDim {
            let name = format!("{}.to_i64", typed.node(outlet.node).name);
            let cast = tract_onnx::tract_core::ops::cast::cast(DatumType::I64);
            let wire = typed
                .wire_node(name, cast, &[outlet])
                .map_err(|e| Error::from_tract(ErrorKind::InvalidModel, "casting a shape output to int64", &e))?;
            typed.outputs[ix] = wire[0];
        }
    }
    Ok(())
}

fn typing_error(e: &TractError) -> Error {
    let msg = format!("{e:#}");
    let kind = if msg.contains("Unimplemented") || msg.contains("unimplemented") || msg.contains("not supported") {
        ErrorKind::NotImplemented
    } else {
        ErrorKind::InvalidModel
    };
    Error::new(kind, format!("analysing the model: {msg}"))
}

/// Every node must have a builder, and a domain kiln knows. Names the node and the op otherwise.
fn check_supported(graph: &pb::GraphProto, framework: &tract_onnx::Onnx) -> Result<()> {
    for node in &graph.node {
        let domain = node.domain.as_str();
        let known_domain =
            matches!(domain, "" | "ai.onnx" | "com.microsoft" | "ai.onnx.ml" | "org.pytorch.aten" | "ai.onnx.contrib")
                || domain == kiln_ops::external_weight::DOMAIN;
        if !known_domain || !framework.op_register.0.contains_key(&node.op_type) {
            return Err(Error::not_implemented(format!(
                "node `{}`: operator `{}`{} is not supported",
                node_label(node),
                node.op_type,
                if domain.is_empty() { String::new() } else { format!(" (domain `{domain}`)") }
            )));
        }
        for attr in &node.attribute {
            if let Some(g) = &attr.g {
                check_supported(g, framework)?;
            }
            for g in &attr.graphs {
                check_supported(g, framework)?;
            }
        }
    }
    Ok(())
}

pub(crate) fn node_label(node: &pb::NodeProto) -> String {
    if !node.name.is_empty() {
        node.name.clone()
    } else if let Some(o) = node.output.first() {
        o.clone()
    } else {
        node.op_type.clone()
    }
}

/// Every tensor of `graph`: its initializers, then those of its nodes' attributes and subgraphs ([`node_tensors`]).
fn graph_tensors(graph: &mut pb::GraphProto) -> Vec<&mut pb::TensorProto> {
    let pb::GraphProto { initializer, node, .. } = graph;
    let mut out: Vec<&mut pb::TensorProto> = initializer.iter_mut().collect();
    node_tensors(node, &mut out);
    out
}

/// The tensors of `nodes`' attributes (a Constant's value, ...) and of their subgraphs (initializers and nodes,
/// recursively).
fn node_tensors<'a>(nodes: &'a mut [pb::NodeProto], out: &mut Vec<&'a mut pb::TensorProto>) {
    for node in nodes {
        for attr in &mut node.attribute {
            let pb::AttributeProto { t, tensors, g, graphs, .. } = attr;
            out.extend(t.iter_mut().chain(tensors.iter_mut()));
            for sub in g.iter_mut().chain(graphs.iter_mut()) {
                out.extend(graph_tensors(sub));
            }
        }
    }
}

/// Replaces every external-data reference by the bytes the resolver returns, so tract sees plain raw_data.
fn inline_external_data(proto: &mut pb::ModelProto, resolver: Option<&dyn ExternalDataResolver>) -> Result<()> {
    let Some(graph) = proto.graph.as_mut() else {
        return Ok(());
    };
    for t in graph_tensors(graph).into_iter().filter(|t| is_external(t)) {
        let (location, offset, length) = external_ref(t)?;
        let resolver = resolver.ok_or_else(|| {
            Error::invalid_argument(format!(
                "tensor `{}` keeps its data in external file `{location}`, but no external data was provided",
                t.name
            ))
        })?;
        t.raw_data = resolver.read(&location, offset, length)?;
        t.external_data.clear();
        t.data_location = Some(pb::tensor_proto::DataLocation::Default as i32);
    }
    Ok(())
}

/// Whether the graph has streamed weights (ExternalWeight nodes).
fn streams_weights(proto: &pb::ModelProto) -> bool {
    proto.graph.as_ref().is_some_and(|g| {
        g.node
            .iter()
            .any(|n| n.domain == kiln_ops::external_weight::DOMAIN && n.op_type == kiln_ops::external_weight::OP_TYPE)
    })
}

/// Where a tensor's external data is: (location, offset, length if given).
fn external_ref(t: &pb::TensorProto) -> Result<(String, u64, Option<u64>)> {
    let get = |k: &str| t.external_data.iter().find(|e| e.key == k).map(|e| e.value.clone());
    let location = get("location")
        .ok_or_else(|| Error::invalid_model(format!("tensor `{}` has external data without a location", t.name)))?;
    let parse = |k: &str| -> Result<Option<u64>> {
        get(k)
            .map(|v| {
                v.parse::<u64>().map_err(|_| {
                    Error::invalid_model(format!("tensor `{}`: external data {k} `{v}` is not a number", t.name))
                })
            })
            .transpose()
    };
    Ok((location, parse("offset")?.unwrap_or(0), parse("length")?))
}

fn is_external(t: &pb::TensorProto) -> bool {
    t.data_location == Some(pb::tensor_proto::DataLocation::External as i32)
}

/// Whether a node reading a weight at input `slot` takes it as a runtime tensor (its kiln / tract builder needs no
/// constant there, and the lowering keeps it fast): only those weights are streamed. The others (an attention's caches,
/// DequantizeLinear's weights, Conv, ...) are read into memory at import, as before.
fn streamable_use(node: &pb::NodeProto, slot: usize) -> bool {
    let onnx = node.domain.is_empty() || node.domain == "ai.onnx";
    match (onnx, node.domain.as_str(), node.op_type.as_str()) {
        (true, _, "MatMul" | "Gemm" | "Add" | "Sub" | "Mul" | "Div" | "Cast" | "LayerNormalization") => true,
        (true, _, "Gather") => slot == 0,
        (true, _, "MatMulInteger") => slot == 1,
        (false, "com.microsoft", "MatMulNBits") => (1..=3).contains(&slot),
        (false, "com.microsoft", "GatherBlockQuantized") => slot != 1,
        (
            false,
            "com.microsoft",
            "SkipSimplifiedLayerNormalization" | "SkipLayerNormalization" | "SimplifiedLayerNormalization",
        ) => slot >= 2,
        _ => false,
    }
}

/// The main graph's initializers every reader of which takes them as a runtime tensor ([`streamable_use`]; a
/// Transpose counts when only MatMul / Gemm read its result: tract folds the transposition into the matmul), that
/// are no graph output and that no subgraph reads; each with whether only Gathers read it (a table).
fn streamable_initializers(graph: &pb::GraphProto) -> HashMap<String, bool> {
    fn subgraph_inputs(g: &pb::GraphProto, out: &mut HashSet<String>) {
        for n in &g.node {
            out.extend(n.input.iter().cloned());
            for a in &n.attribute {
                a.g.iter().chain(&a.graphs).for_each(|g| subgraph_inputs(g, out));
            }
        }
    }
    let mut captured = HashSet::new();
    for n in &graph.node {
        for a in &n.attribute {
            a.g.iter().chain(&a.graphs).for_each(|g| subgraph_inputs(g, &mut captured));
        }
    }
    let mut readers: HashMap<&str, Vec<(&pb::NodeProto, usize)>> = HashMap::new();
    for n in &graph.node {
        for (slot, i) in n.input.iter().enumerate() {
            readers.entry(i.as_str()).or_default().push((n, slot));
        }
    }
    let matmul_only = |name: &str| {
        readers.get(name).is_some_and(|r| {
            r.iter().all(|(n, _)| {
                (n.domain.is_empty() || n.domain == "ai.onnx") && matches!(n.op_type.as_str(), "MatMul" | "Gemm")
            })
        })
    };
    graph
        .initializer
        .iter()
        .map(|t| t.name.as_str())
        .filter(|name| !captured.contains(*name) && !graph.output.iter().any(|o| o.name == *name))
        .filter(|name| {
            readers.get(name).is_some_and(|r| {
                r.iter().all(|(n, slot)| {
                    streamable_use(n, *slot)
                        || (n.op_type == "Transpose"
                            && (n.domain.is_empty() || n.domain == "ai.onnx")
                            && n.output.iter().all(|o| matmul_only(o)))
                })
            })
        })
        .map(|name| {
            let gathered = readers.get(name).is_some_and(|r| {
                r.iter().all(|(n, slot)| {
                    (n.domain.is_empty() || n.domain == "ai.onnx") && n.op_type == "Gather" && *slot == 0
                })
            });
            (name.to_string(), gathered)
        })
        .collect()
}

/// Whether a float32 or float16 table `[n, d]` only gathered from looks like a rotary cos / sin cache (each row's two halves
/// equal, at two sampled rows, not all zero): kiln_graph's RoPE fusion (fuse_rope) needs its values at load, so it
/// is read at import instead of streamed. Two rows are read.
async fn is_rope_table(t: &pb::TensorProto, resolver: &dyn ExternalDataResolver, location: &str, offset: u64) -> bool {
    let [n, d] = t.dims[..] else { return false };
    // float32, or float16 (a float16 model's caches)
    let size = match t.data_type {
        1 => 4,
        10 => 2,
        _ => return false,
    };
    if n < 2 || d < 2 || d % 2 != 0 || d > 1024 {
        return false;
    }
    let row = d as u64 * size;
    for r in [n as u64 / 2, n as u64 - 1] {
        let Ok(bytes) = resolver.read_range(location, offset + r * row, row).await else { return false };
        if bytes.len() as u64 != row {
            return false;
        }
        let h = bytes.len() / 2;
        if bytes[..h] != bytes[h..] || bytes.iter().all(|b| *b == 0) {
            return false;
        }
    }
    true
}

/// The streaming import's first step, for GPU sessions: each external initializer of the main graph of at least
/// `streaming.min_bytes` whose readers take it as a runtime tensor ([`streamable_initializers`]) is replaced by an `ai.kiln` ExternalWeight node of the same name (its bytes stay in the
/// source), and every smaller one is read (asynchronously, through [`ExternalDataResolver::read_range`]) and inlined.
/// Tensors inside subgraphs and node attributes are read and inlined the same way. Returns the number of weights
/// left in the source.
pub async fn stream_external_initializers(
    proto: &mut pb::ModelProto,
    resolver: &dyn ExternalDataResolver,
    streaming: &WeightStreaming,
) -> Result<usize> {
    let Some(graph) = proto.graph.as_mut() else { return Ok(0) };
    let streamable = streamable_initializers(graph);
    let merged_heads: HashSet<String> = merged_heads_projections(graph).into_iter().map(String::from).collect();
    let float = |t: &pb::TensorProto| {
        use pb::tensor_proto::DataType;
        [DataType::Float as i32, DataType::Float16 as i32].contains(&t.data_type)
    };
    let mut streamed = vec![];
    let mut kept = vec![];
    for mut t in std::mem::take(&mut graph.initializer) {
        if !is_external(&t) {
            kept.push(t);
            continue;
        }
        let (location, offset, length) = external_ref(&t)?;
        let want = external_bytes(&t, &location, length)?;
        let stream = match streamable.get(&t.name) {
            // an attention's output projection: read into memory (tract folds the heads' transpose into its K rows
            // at load, which a streamed weight would pay as a transpose each run)
            _ if float(&t) && merged_heads.contains(&t.name) => false,
            Some(gathered) if want >= streaming.min_bytes && want > 0 => {
                !*gathered || !is_rope_table(&t, resolver, &location, offset).await
            }
            _ => false,
        };
        if stream {
            streamed.push(kiln_ops::external_weight::node_proto(
                &t.name,
                &location,
                offset,
                want,
                t.data_type,
                &t.dims,
            ));
            continue;
        }
        t.raw_data = read_in_ranges(resolver, &t.name, &location, offset, want, streaming.chunk()).await?;
        t.external_data.clear();
        t.data_location = Some(pb::tensor_proto::DataLocation::Default as i32);
        kept.push(t);
    }
    graph.initializer = kept;
    // tensors in subgraphs and node attributes: read here too, asynchronously (a browser's data source has no
    // synchronous read for the import's)
    let mut nested = vec![];
    node_tensors(&mut graph.node, &mut nested);
    for t in nested.into_iter().filter(|t| is_external(t)) {
        let (location, offset, length) = external_ref(t)?;
        let want = external_bytes(t, &location, length)?;
        t.raw_data = read_in_ranges(resolver, &t.name, &location, offset, want, streaming.chunk()).await?;
        t.external_data.clear();
        t.data_location = Some(pb::tensor_proto::DataLocation::Default as i32);
    }
    let names: HashSet<String> = streamed.iter().filter_map(|n| n.output.first().cloned()).collect();
    // an initializer listed as a graph input (old exports) is no input once it is a node's output
    graph.input.retain(|i| !names.contains(&i.name));
    let count = streamed.len();
    streamed.append(&mut graph.node);
    graph.node = streamed;
    Ok(count)
}

/// The tensors an ONNX MatMul reads as B after an A of `Reshape(Transpose(..))`: attention output projections after
/// their heads are merged back (`[b, H, s, D]` → `[b, s, H, D]` → `[b, s, H·D]`).
fn merged_heads_projections(graph: &pb::GraphProto) -> HashSet<&str> {
    let onnx = |n: &pb::NodeProto| n.domain.is_empty() || n.domain == "ai.onnx";
    let producers: HashMap<&str, &pb::NodeProto> =
        graph.node.iter().flat_map(|n| n.output.iter().map(move |o| (o.as_str(), n))).collect();
    let made_by = |name: &str, op: &str| producers.get(name).is_some_and(|n| onnx(n) && n.op_type == op);
    graph
        .node
        .iter()
        .filter(|n| onnx(n) && n.op_type == "MatMul" && n.input.len() == 2)
        .filter(|n| {
            producers
                .get(n.input[0].as_str())
                .filter(|r| onnx(r) && r.op_type == "Reshape")
                .and_then(|r| r.input.first())
                .is_some_and(|x| made_by(x, "Transpose"))
        })
        .map(|n| n.input[1].as_str())
        .collect()
}

/// The bytes an external tensor's dims and element type need (checked against a declared length).
fn external_bytes(t: &pb::TensorProto, location: &str, length: Option<u64>) -> Result<u64> {
    let dt = kiln_ops::external_weight::datum_type_of(t.data_type).ok().filter(|dt| *dt != DatumType::String);
    let numel = t.dims.iter().try_fold(1u64, |n, d| u64::try_from(*d).ok().and_then(|d| n.checked_mul(d)));
    let want = match (dt, numel) {
        (Some(dt), Some(n)) => n.checked_mul(dt.size_of() as u64),
        _ => None,
    };
    let Some(want) = want else {
        return Err(Error::invalid_model(format!(
            "tensor `{}` keeps its data in external file `{location}` but has an unsupported element type {} or dims \
             {:?}",
            t.name, t.data_type, t.dims
        )));
    };
    match length {
        Some(l) if l != want => Err(Error::invalid_model(format!(
            "tensor `{}`: external data length {l} in `{location}`, but its dims {:?} need {want} bytes",
            t.name, t.dims
        ))),
        _ => Ok(want),
    }
}

/// Reads `want` bytes of `location` from `offset` through [`ExternalDataResolver::read_range`], `chunk` at a time.
async fn read_in_ranges(
    resolver: &dyn ExternalDataResolver,
    name: &str,
    location: &str,
    offset: u64,
    want: u64,
    chunk: u64,
) -> Result<Vec<u8>> {
    let mut bytes = Vec::with_capacity(want as usize);
    let mut at = 0u64;
    while at < want {
        let n = (want - at).min(chunk.max(1));
        let piece = resolver
            .read_range(location, offset + at, n)
            .await
            .map_err(|e| Error::new(e.kind, format!("tensor `{name}`: {}", e.message)))?;
        if piece.len() as u64 != n {
            return Err(Error::io(format!(
                "tensor `{name}`: external data `{location}` returned {} bytes at {}, expected {n}",
                piece.len(),
                offset + at
            )));
        }
        bytes.extend_from_slice(&piece);
        at += n;
    }
    Ok(bytes)
}

/// tract needs a fact for every input: a dim declared with neither a value nor a name (or as `?`) gets a fresh symbol
/// of its own (it varies freely, as onnxruntime treats it); an input with no declared shape at all is refused, naming
/// it. The metadata the caller sees keeps the declared (unknown) dims.
fn name_unnamed_input_dims(proto: &mut pb::ModelProto) -> Result<()> {
    let Some(graph) = proto.graph.as_mut() else { return Ok(()) };
    let initialized: HashSet<String> = graph.initializer.iter().map(|i| i.name.clone()).collect();
    for (ix, vi) in graph.input.iter_mut().enumerate() {
        if initialized.contains(&vi.name) {
            continue;
        }
        let Some(TypeValue::TensorType(tt)) = vi.r#type.as_mut().and_then(|t| t.value.as_mut()) else { continue };
        let Some(shape) = tt.shape.as_mut() else {
            return Err(Error::not_implemented(format!(
                "input `{}` declares no shape: kiln needs at least its rank (declare its dims, or fix them with free \
                 dimension overrides)",
                vi.name
            )));
        };
        for (axis, d) in shape.dim.iter_mut().enumerate() {
            let unnamed = match &d.value {
                None => true,
                Some(DimValue::DimValue(v)) => *v < 0,
                Some(DimValue::DimParam(p)) => p.is_empty() || p == "?",
            };
            if unnamed {
                d.value = Some(DimValue::DimParam(format!("kiln_input{ix}_dim{axis}")));
            }
        }
    }
    Ok(())
}

fn apply_free_dimension_overrides(proto: &mut pb::ModelProto, overrides: &HashMap<String, i64>) -> Result<()> {
    if overrides.is_empty() {
        return Ok(());
    }
    for (k, v) in overrides {
        if *v < 0 {
            return Err(Error::invalid_argument(format!("free dimension override `{k}` = {v} is negative")));
        }
    }
    let Some(graph) = proto.graph.as_mut() else {
        return Ok(());
    };
    let mut used = HashSet::new();
    for vi in graph.input.iter_mut().chain(graph.output.iter_mut()).chain(graph.value_info.iter_mut()) {
        if let Some(TypeValue::TensorType(tt)) = vi.r#type.as_mut().and_then(|t| t.value.as_mut()) {
            if let Some(shape) = tt.shape.as_mut() {
                for d in &mut shape.dim {
                    if let Some(DimValue::DimParam(p)) = &d.value {
                        if let Some(v) = overrides.get(p) {
                            used.insert(p.clone());
                            d.value = Some(DimValue::DimValue(*v));
                        }
                    }
                }
            }
        }
    }
    if let Some(unused) = overrides.keys().find(|k| !used.contains(*k)) {
        log::warn!("free dimension override `{unused}` matches no named dimension of the model");
    }
    Ok(())
}

/// Converts a tract tensor into an ONNX TensorProto (raw little-endian data; strings in string_data).
pub fn tensor_to_proto(name: &str, t: &Tensor) -> Result<pb::TensorProto> {
    let et = ElementType::from_datum_type(t.datum_type())?;
    let mut p = pb::TensorProto {
        name: name.to_string(),
        dims: t.shape().iter().map(|d| *d as i64).collect(),
        data_type: et.onnx_code(),
        ..Default::default()
    };
    if et == ElementType::String {
        let view = t.try_as_plain_ram().map_err(|e| Error::from_tract(ErrorKind::Runtime, "string tensor", &e))?;
        let s = view.as_slice::<String>().map_err(|e| Error::from_tract(ErrorKind::Runtime, "string tensor", &e))?;
        p.string_data = s.iter().map(|s| s.as_bytes().to_vec()).collect();
    } else {
        p.raw_data = t.as_bytes().to_vec();
    }
    Ok(p)
}

fn apply_constant_inputs(proto: &mut pb::ModelProto, constants: &[(String, Tensor)]) -> Result<()> {
    let Some(graph) = proto.graph.as_mut() else {
        return Ok(());
    };
    for (name, t) in constants {
        if !graph.input.iter().any(|i| &i.name == name) {
            return Err(Error::invalid_argument(format!("constant input `{name}` is not an input of the model")));
        }
        graph.initializer.retain(|i| &i.name != name);
        graph.initializer.push(tensor_to_proto(name, t)?);
    }
    Ok(())
}

fn value_info(vi: &pb::ValueInfoProto) -> ValueInfo {
    let mut info = ValueInfo { name: vi.name.clone(), element_type: None, onnx_type: 0, shape: None };
    if let Some(TypeValue::TensorType(tt)) = vi.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        info.onnx_type = tt.elem_type;
        info.element_type = ElementType::from_onnx_code(tt.elem_type).ok();
        info.shape = tt.shape.as_ref().map(|s| {
            s.dim
                .iter()
                .map(|d| match &d.value {
                    Some(DimValue::DimValue(v)) if *v >= 0 => Dim::Fixed(*v as usize),
                    Some(DimValue::DimParam(p)) if !p.is_empty() => Dim::Symbolic(p.clone()),
                    _ => Dim::Unknown,
                })
                .collect()
        });
    }
    info
}

fn io_metadata(proto: &pb::ModelProto) -> Result<(Vec<ValueInfo>, Vec<ValueInfo>)> {
    let graph = proto.graph.as_ref().ok_or_else(|| Error::invalid_model("the ONNX model has no graph"))?;
    let initialized: HashSet<&str> = graph.initializer.iter().map(|i| i.name.as_str()).collect();
    let inputs = graph.input.iter().filter(|i| !initialized.contains(i.name.as_str())).map(value_info).collect();
    let outputs = graph.output.iter().map(value_info).collect();
    Ok((inputs, outputs))
}

/// Reads a serialized ONNX `TensorProto` (the backend test data's `input_0.pb` files).
pub fn tensor_from_proto_bytes(bytes: &[u8]) -> Result<(String, Tensor)> {
    let proto = pb::TensorProto::decode(bytes)
        .map_err(|e| Error::invalid_argument(format!("not a serialized ONNX TensorProto: {e}")))?;
    let t = tract_onnx::tensor::load_tensor(&tract_onnx::data_resolver::FopenDataResolver, &proto, None)
        .map_err(|e| Error::from_tract(ErrorKind::InvalidArgument, "decoding a TensorProto", &e))?;
    Ok((proto.name.clone(), t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tract_dim_debug() {
        let (e, rest) = DimExpr::parse("Add([Sym(s), MulInt(2, Sym(p)), Val(1)]) tail").expect("parse");
        assert_eq!(rest, " tail");
        assert_eq!(e.to_dim_param(), "s + 2*(p) + 1");
        let (e, _) = DimExpr::parse("Mul([Sym(a), Sym(b)])").expect("parse");
        assert_eq!(e.to_dim_param(), "(a)*(b)");
        assert!(DimExpr::parse("Div(Sym(a), 2)").is_none());
    }

    fn input(name: &str, dims: &[&str]) -> pb::ValueInfoProto {
        let dim = dims
            .iter()
            .map(|d| pb::tensor_shape_proto::Dimension {
                value: Some(DimValue::DimParam(d.to_string())),
                ..Default::default()
            })
            .collect();
        pb::ValueInfoProto {
            name: name.into(),
            r#type: Some(pb::TypeProto {
                value: Some(TypeValue::TensorType(pb::type_proto::Tensor {
                    elem_type: 7,
                    shape: Some(pb::TensorShapeProto { dim }),
                })),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn dims_of(vi: &pb::ValueInfoProto) -> Vec<String> {
        let Some(TypeValue::TensorType(tt)) = vi.r#type.as_ref().and_then(|t| t.value.as_ref()) else { return vec![] };
        tt.shape
            .as_ref()
            .map(|s| s.dim.iter().map(|d| dim_param_of(d).unwrap_or("?").to_string()).collect())
            .unwrap_or_default()
    }

    #[test]
    fn renames_a_conflicting_input_dim_only() {
        let mut proto = pb::ModelProto {
            graph: Some(pb::GraphProto {
                input: vec![
                    input("input_ids", &["batch", "sequence_length"]),
                    input("attention_mask", &["batch", "total_sequence_length"]),
                    input("past", &["batch", "past_sequence_length"]),
                ],
                value_info: vec![input("range", &["total_sequence_length"])],
                ..Default::default()
            }),
            ..Default::default()
        };
        let msg = "Failed analyse for node #50 \"arange\" Range: Infering facts: Applying rule outputs[0].shape[0] == \
                   Add([Sym(sequence_length), Sym(past_sequence_length)]): Impossible to unify \
                   Sym(total_sequence_length) with Add([Sym(sequence_length), Sym(past_sequence_length)]).";
        let line = resolve_dim_conflict(&mut proto, msg).expect("resolved");
        assert!(line.contains("total_sequence_length"), "{line}");
        let g = proto.graph.as_ref().unwrap();
        assert_eq!(dims_of(&g.input[0]), ["batch", "sequence_length"]);
        assert_eq!(dims_of(&g.input[1]), ["batch", "sequence_length + past_sequence_length"]);
        assert_eq!(dims_of(&g.input[2]), ["batch", "past_sequence_length"]);
        assert_eq!(dims_of(&g.value_info[0]), ["sequence_length + past_sequence_length"]);
        assert!(resolve_dim_conflict(&mut proto, "something else").is_none());
    }
}
