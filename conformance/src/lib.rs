//! kiln-conformance: runs the ONNX backend test data (`node`, `pytorch-converted`, `pytorch-operator`, `simple`,
//! `light`) and kiln's tiny SLM fixtures through kiln, compares against the expected outputs and reports per case.
//!
//! Cases run in worker processes (the `kiln-conformance --worker` mode of the binary) so that a panic, an abort, a
//! stack overflow or a hang in one case never takes the run down: the parent times each case out, kills the worker
//! and starts another. [`run_case`] runs one case in-process (with `catch_unwind`) for library callers.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_graph::tract_onnx::pb;
use kiln_graph::tract_onnx::pb::type_proto::Value as TypeValue;
use kiln_provider::blocking::Session;
use kiln_provider::{ElementType, ExecutionProvider, SessionOptions, Tensor};
use prost::Message;

/// Default tolerances of onnx's backend tests (`np.testing.assert_allclose(actual, expected, rtol, atol)`).
pub const RTOL: f64 = 1e-3;
pub const ATOL: f64 = 1e-7;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Suite {
    Node,
    PytorchConverted,
    PytorchOperator,
    Simple,
    Light,
    Slm,
}

impl Suite {
    pub const ALL: [Suite; 6] =
        [Suite::Node, Suite::PytorchConverted, Suite::PytorchOperator, Suite::Simple, Suite::Light, Suite::Slm];
    pub fn name(&self) -> &'static str {
        match self {
            Suite::Node => "node",
            Suite::PytorchConverted => "pytorch-converted",
            Suite::PytorchOperator => "pytorch-operator",
            Suite::Simple => "simple",
            Suite::Light => "light",
            Suite::Slm => "slm",
        }
    }
    pub fn from_name(s: &str) -> Option<Suite> {
        Suite::ALL.iter().copied().find(|x| x.name() == s)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Cpu,
    Gpu,
}

impl Backend {
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Cpu => "cpu",
            Backend::Gpu => "gpu",
        }
    }
    pub fn from_name(s: &str) -> Option<Backend> {
        match s {
            "cpu" => Some(Backend::Cpu),
            "gpu" | "webgpu" => Some(Backend::Gpu),
            _ => None,
        }
    }
}

/// One test case: a folder with `model.onnx` and `test_data_set_*` (or, for `light`, a model file and its expected
/// output beside it).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Case {
    pub suite: Suite,
    /// `test_abs`, `tiny-llama/onnx_optimum`, ...
    pub name: String,
    /// The case folder (light: the model file).
    pub path: PathBuf,
}

impl Case {
    pub fn id(&self) -> String {
        format!("{}/{}", self.suite.name(), self.name)
    }
}

/// Tolerances for one comparison: `|actual - expected| <= atol + rtol * |expected|`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerance {
    pub rtol: f64,
    pub atol: f64,
    /// Extra absolute slack as a fraction of the expected tensor's largest magnitude (quantized SLMs).
    pub atol_of_max: f64,
}

impl Tolerance {
    pub const ONNX: Tolerance = Tolerance { rtol: RTOL, atol: ATOL, atol_of_max: 0.0 };

    /// The tolerance for a case: onnx's defaults (or the case's `data.json`), or the SLM tolerances by variant.
    pub fn for_case(case: &Case) -> Tolerance {
        if case.suite == Suite::Slm {
            let n = case.name.to_ascii_lowercase();
            return if n.contains("int8") || n.contains("q4") || n.contains("int4") {
                Tolerance { rtol: 1e-3, atol: 0.0, atol_of_max: 1e-3 }
            } else if n.contains("fp16") {
                Tolerance { rtol: RTOL, atol: 1e-2, atol_of_max: 0.0 }
            } else {
                Tolerance { rtol: RTOL, atol: 1e-4, atol_of_max: 0.0 }
            };
        }
        let mut t = Tolerance::ONNX;
        if case.path.is_dir() {
            if let Ok(s) = std::fs::read_to_string(case.path.join("data.json")) {
                if let Some(v) = json_number(&s, "rtol") {
                    t.rtol = v;
                }
                if let Some(v) = json_number(&s, "atol") {
                    t.atol = v;
                }
            }
        }
        t
    }
}

/// `"key": number` from a flat JSON object (enough for the backend tests' `data.json`).
fn json_number(s: &str, key: &str) -> Option<f64> {
    let at = s.find(&format!("\"{key}\""))?;
    let rest = &s[at + key.len() + 2..];
    let rest = rest.trim_start().strip_prefix(':')?.trim_start();
    let end = rest.find(|c: char| !(c.is_ascii_digit() || "+-.eE".contains(c))).unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// The outcome of one case.
#[derive(Debug, Clone, PartialEq)]
pub enum Status {
    Pass,
    /// Passed once some inputs were folded as constants (`SessionOptions::constant_inputs`); names them.
    PassConstInputs(Vec<String>),
    /// Ran, but an output differs: the output's name and what differs.
    Mismatch {
        output: String,
        detail: String,
    },
    /// Failed to load or run; a one-line reason.
    Error(String),
    /// Uses an operator kiln has no implementation of (counted as failed).
    UnsupportedOp(String),
    /// Uses an element or value type kiln cannot represent (bfloat16, float8, int4, complex, sequences, optionals);
    /// counted as skipped.
    UnsupportedType(String),
}

impl Status {
    pub fn is_pass(&self) -> bool {
        matches!(self, Status::Pass | Status::PassConstInputs(_))
    }
    pub fn is_skip(&self) -> bool {
        matches!(self, Status::UnsupportedType(_))
    }
    pub fn label(&self) -> &'static str {
        match self {
            Status::Pass => "pass",
            Status::PassConstInputs(_) => "pass (const inputs)",
            Status::Mismatch { .. } => "mismatch",
            Status::Error(_) => "error",
            Status::UnsupportedOp(_) => "unsupported op",
            Status::UnsupportedType(_) => "unsupported type",
        }
    }
    /// One deterministic line (no timings; differences rounded to a power of ten).
    pub fn line(&self) -> String {
        match self {
            Status::Pass => "pass".into(),
            Status::PassConstInputs(names) => format!("pass (const inputs: {})", names.join(", ")),
            Status::Mismatch { output, detail } => format!("mismatch: output `{output}`: {detail}"),
            Status::Error(e) => format!("error: {e}"),
            Status::UnsupportedOp(e) => format!("unsupported op: {e}"),
            Status::UnsupportedType(e) => format!("unsupported type: {e}"),
        }
    }

    fn encode(&self) -> String {
        match self {
            Status::Pass => "pass".into(),
            Status::PassConstInputs(n) => format!("passconst\t{}", n.join("\u{1}")),
            Status::Mismatch { output, detail } => format!("mismatch\t{}\t{}", clean(output), clean(detail)),
            Status::Error(e) => format!("error\t{}", clean(e)),
            Status::UnsupportedOp(e) => format!("unsupportedop\t{}", clean(e)),
            Status::UnsupportedType(e) => format!("unsupportedtype\t{}", clean(e)),
        }
    }

    fn decode(fields: &[&str]) -> Option<Status> {
        let arg = |i: usize| fields.get(i).map(|s| s.to_string()).unwrap_or_default();
        Some(match *fields.first()? {
            "pass" => Status::Pass,
            "passconst" => Status::PassConstInputs(arg(1).split('\u{1}').map(String::from).collect()),
            "mismatch" => Status::Mismatch { output: arg(1), detail: arg(2) },
            "error" => Status::Error(arg(1)),
            "unsupportedop" => Status::UnsupportedOp(arg(1)),
            "unsupportedtype" => Status::UnsupportedType(arg(1)),
            _ => return None,
        })
    }
}

/// Makes a message one line without tabs, bounded in length.
fn clean(s: &str) -> String {
    let mut out: String =
        s.chars().map(|c| if c == '\n' || c == '\t' || c == '\r' || c == '\u{1}' { ' ' } else { c }).collect();
    while out.contains("  ") {
        out = out.replace("  ", " ");
    }
    let out = out.trim().to_string();
    if out.chars().count() > 240 {
        let mut t: String = out.chars().take(240).collect();
        t.push('…');
        t
    } else {
        out
    }
}

#[derive(Debug, Clone)]
pub struct CaseResult {
    pub case: Case,
    pub status: Status,
    /// Op types of the model's main graph, in order of first use.
    pub ops: Vec<String>,
    /// The execution provider that actually ran (empty when no session was created).
    pub provider: String,
    /// Why the provider differs from the one asked for, if it does.
    pub provider_note: String,
    /// On the webgpu provider: `gpu/total` compute nodes placed on the GPU (empty otherwise).
    pub placement: String,
}

impl CaseResult {
    /// Every compute node of the case ran on the GPU (and it has at least one).
    pub fn fully_on_gpu(&self) -> bool {
        self.provider == "webgpu"
            && self.placement.split_once('/').is_some_and(|(g, t)| g == t && t.parse::<usize>().is_ok_and(|t| t > 0))
    }
}

#[derive(Debug, Clone)]
pub struct RunConfig {
    pub backend: Backend,
    /// Per-case wall-clock limit (isolated runs only).
    pub timeout: Duration,
    /// Worker processes.
    pub jobs: usize,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig { backend: Backend::Cpu, timeout: Duration::from_secs(60), jobs: default_jobs() }
    }
}

pub fn default_jobs() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).max(1)
}

// ---------------------------------------------------------------------------------------------------------------
// Locating data and discovering cases
// ---------------------------------------------------------------------------------------------------------------

/// How to get the onnx backend test data, for error messages.
pub const INSTALL_HINT: &str = "the ONNX backend test data was not found. Install the onnx wheel (it ships the data): \
`python3 -m venv .venv && .venv/bin/pip install onnx==1.22.0` in the workspace root, or set KILN_ONNX_DATA to a \
folder holding node/, pytorch-converted/, pytorch-operator/, simple/ and light/ (onnx/backend/test/data).";

/// The workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."))
}

/// kiln's SLM fixtures (`conformance/fixtures`).
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// The onnx backend test data: `KILN_ONNX_DATA`, else the onnx package of `.venv/bin/python` (or `python3`).
pub fn default_data_dir() -> Result<PathBuf, String> {
    if let Ok(d) = std::env::var("KILN_ONNX_DATA") {
        let p = PathBuf::from(d);
        if p.join("node").is_dir() {
            return Ok(p);
        }
        return Err(format!("KILN_ONNX_DATA={} has no node/ folder; {INSTALL_HINT}", p.display()));
    }
    let venv = workspace_root().join(".venv/bin/python");
    let pythons: Vec<PathBuf> = vec![venv, PathBuf::from("python3")];
    for py in pythons {
        let out = Command::new(&py)
            .args(["-c", "import onnx,os;print(os.path.dirname(onnx.__file__))"])
            .stderr(Stdio::null())
            .output();
        if let Ok(out) = out {
            if out.status.success() {
                let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("backend/test/data");
                if dir.join("node").is_dir() {
                    return Ok(dir);
                }
            }
        }
    }
    Err(INSTALL_HINT.to_string())
}

fn sorted_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_dir()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

fn file_name(p: &Path) -> String {
    p.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Lists the cases of a suite, sorted by name, keeping those whose id contains `filter`.
pub fn discover(suite: Suite, data_dir: Option<&Path>, filter: Option<&str>) -> Result<Vec<Case>, String> {
    let mut cases = vec![];
    match suite {
        Suite::Slm => {
            let root = fixtures_dir().join("tiny");
            for model in sorted_dirs(&root) {
                for variant in sorted_dirs(&model) {
                    if variant.join("model.onnx").is_file() && has_data_sets(&variant) {
                        let name = format!("{}/{}", file_name(&model), file_name(&variant));
                        cases.push(Case { suite, name, path: variant });
                    }
                }
            }
        }
        Suite::Light => {
            let data = data_dir.ok_or_else(|| INSTALL_HINT.to_string())?;
            let dir = data.join("light");
            let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
                .map_err(|e| format!("reading {}: {e}; {INSTALL_HINT}", dir.display()))?
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "onnx"))
                .collect();
            files.sort();
            for f in files {
                let name = f.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
                cases.push(Case { suite, name, path: f });
            }
        }
        _ => {
            let data = data_dir.ok_or_else(|| INSTALL_HINT.to_string())?;
            let dir = data.join(suite.name());
            if !dir.is_dir() {
                return Err(format!("{} is missing; {INSTALL_HINT}", dir.display()));
            }
            for case in sorted_dirs(&dir) {
                if case.join("model.onnx").is_file() {
                    cases.push(Case { suite, name: file_name(&case), path: case });
                }
            }
        }
    }
    if let Some(f) = filter {
        cases.retain(|c| c.id().contains(f));
    }
    Ok(cases)
}

fn has_data_sets(dir: &Path) -> bool {
    !data_set_dirs(dir).is_empty()
}

fn data_set_dirs(dir: &Path) -> Vec<PathBuf> {
    sorted_dirs(dir).into_iter().filter(|p| file_name(p).starts_with("test_data_set")).collect()
}

// ---------------------------------------------------------------------------------------------------------------
// Running one case
// ---------------------------------------------------------------------------------------------------------------

struct DataSet {
    inputs: Vec<(String, Tensor)>,
    outputs: Vec<(String, Tensor)>,
}

/// Outcome of loading the case before any session: either data sets or a final status.
#[allow(clippy::large_enum_variant)]
enum Prepared {
    Ready { model: pb::ModelProto, model_bytes: Vec<u8>, sets: Vec<DataSet> },
    Done(Status),
}

/// Just enough of ONNX's protobuf to tell the non-tensor value types apart (tract's `pb` only knows tensors).
mod lite {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Model {
        #[prost(message, optional, tag = "7")]
        pub graph: Option<Graph>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Graph {
        #[prost(message, repeated, tag = "11")]
        pub input: Vec<ValueInfo>,
        #[prost(message, repeated, tag = "12")]
        pub output: Vec<ValueInfo>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ValueInfo {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(message, optional, tag = "2")]
        pub r#type: Option<Type>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Type {
        #[prost(message, optional, tag = "4")]
        pub sequence_type: Option<Empty>,
        #[prost(message, optional, tag = "5")]
        pub map_type: Option<Empty>,
        #[prost(message, optional, tag = "8")]
        pub sparse_tensor_type: Option<Empty>,
        #[prost(message, optional, tag = "9")]
        pub optional_type: Option<Empty>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Empty {}
}

/// Non-tensor graph inputs/outputs (sequence, map, optional, sparse).
fn non_tensor_io(model_bytes: &[u8], out: &mut BTreeSet<String>) {
    let Ok(m) = lite::Model::decode(model_bytes) else { return };
    let Some(g) = m.graph else { return };
    for vi in g.input.iter().chain(&g.output) {
        if let Some(t) = &vi.r#type {
            if t.sequence_type.is_some() {
                out.insert("sequence".into());
            }
            if t.map_type.is_some() {
                out.insert("map".into());
            }
            if t.sparse_tensor_type.is_some() {
                out.insert("sparse tensor".into());
            }
            if t.optional_type.is_some() {
                out.insert("optional".into());
            }
        }
    }
}

fn value_type_problem(vi: &pb::ValueInfoProto) -> Option<String> {
    match vi.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        Some(TypeValue::TensorType(tt)) => elem_type_problem(tt.elem_type),
        _ => None,
    }
}

fn elem_type_problem(code: i32) -> Option<String> {
    if code == 0 {
        return None;
    }
    match ElementType::from_onnx_code(code) {
        Ok(_) => None,
        Err(_) => Some(match code {
            24 => "float8e8m0".to_string(),
            25 => "uint2".to_string(),
            26 => "int2".to_string(),
            _ => kiln_graph::onnx_type_name(code).to_ascii_lowercase(),
        }),
    }
}

/// Element types the graph names that kiln cannot represent (graph I/O, initializers, Cast targets, constants).
fn graph_type_problems(g: &pb::GraphProto, out: &mut BTreeSet<String>) {
    for vi in g.input.iter().chain(&g.output) {
        if let Some(p) = value_type_problem(vi) {
            out.insert(p);
        }
    }
    for t in &g.initializer {
        if let Some(p) = elem_type_problem(t.data_type) {
            out.insert(p);
        }
    }
    for n in &g.node {
        for a in &n.attribute {
            if matches!(
                n.op_type.as_str(),
                "Cast"
                    | "EyeLike"
                    | "RandomNormal"
                    | "RandomUniform"
                    | "RandomNormalLike"
                    | "RandomUniformLike"
                    | "Multinomial"
                    | "Bernoulli"
                    | "QuantizeLinear"
                    | "DequantizeLinear"
            ) && matches!(a.name.as_str(), "to" | "dtype" | "output_dtype")
            {
                if let Some(p) = elem_type_problem(a.i as i32) {
                    out.insert(p);
                }
            }
            if let Some(t) = &a.t {
                if let Some(p) = elem_type_problem(t.data_type) {
                    out.insert(p);
                }
            }
            if let Some(sg) = &a.g {
                graph_type_problems(sg, out);
            }
            for sg in &a.graphs {
                graph_type_problems(sg, out);
            }
        }
        if matches!(
            n.op_type.as_str(),
            "SequenceConstruct"
                | "SequenceEmpty"
                | "SequenceInsert"
                | "SequenceAt"
                | "SequenceErase"
                | "SequenceLength"
                | "SplitToSequence"
                | "ConcatFromSequence"
                | "SequenceMap"
                | "Optional"
                | "OptionalHasElement"
                | "OptionalGetElement"
        ) {
            out.insert(format!("sequence/optional op {}", n.op_type));
        }
    }
}

fn missing_ops(g: &pb::GraphProto, framework: &kiln_graph::tract_onnx::Onnx, out: &mut BTreeSet<String>) {
    for n in &g.node {
        if !framework.op_register.0.contains_key(&n.op_type) {
            out.insert(if n.domain.is_empty() { n.op_type.clone() } else { format!("{}:{}", n.domain, n.op_type) });
        }
        for a in &n.attribute {
            if let Some(sg) = &a.g {
                missing_ops(sg, framework, out);
            }
            for sg in &a.graphs {
                missing_ops(sg, framework, out);
            }
        }
    }
}

fn ops_of(g: &pb::GraphProto) -> Vec<String> {
    let mut v: Vec<String> = vec![];
    for n in &g.node {
        if !v.contains(&n.op_type) {
            v.push(n.op_type.clone());
        }
    }
    v
}

fn framework() -> &'static kiln_graph::tract_onnx::Onnx {
    static F: std::sync::OnceLock<kiln_graph::tract_onnx::Onnx> = std::sync::OnceLock::new();
    F.get_or_init(kiln_graph::framework)
}

/// The graph inputs that are fed (not initializers), in order.
fn fed_inputs(g: &pb::GraphProto) -> Vec<&pb::ValueInfoProto> {
    let inits: BTreeSet<&str> = g.initializer.iter().map(|i| i.name.as_str()).collect();
    g.input.iter().filter(|i| !inits.contains(i.name.as_str())).collect()
}

fn read_tensor(path: &Path) -> Result<Tensor, Status> {
    let bytes = std::fs::read(path).map_err(|e| Status::Error(format!("reading {}: {e}", file_name(path))))?;
    if let Ok(p) = pb::TensorProto::decode(bytes.as_slice()) {
        if let Some(t) = elem_type_problem(p.data_type) {
            return Err(Status::UnsupportedType(t));
        }
    }
    Tensor::from_onnx_proto(&bytes)
        .map(|(_, t)| t)
        .map_err(|e| Status::Error(format!("{}: {}", file_name(path), e.message)))
}

fn numbered(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut v: Vec<(usize, PathBuf)> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let n = file_name(&e.path());
                    let ix = n.strip_prefix(prefix)?.strip_suffix(".pb")?.parse().ok()?;
                    Some((ix, e.path()))
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v.into_iter().map(|(_, p)| p).collect()
}

/// The light suite's dummy input: `arange(n).reshape(shape) / n` in float32, unknown dims taken as 1.
fn dummy_input(vi: &pb::ValueInfoProto) -> Result<Tensor, Status> {
    let Some(TypeValue::TensorType(tt)) = vi.r#type.as_ref().and_then(|t| t.value.as_ref()) else {
        return Err(Status::UnsupportedType("non-tensor input".into()));
    };
    if tt.elem_type != 1 {
        return Err(Status::Error(format!("input `{}`: dummy data is float32 only", vi.name)));
    }
    use pb::tensor_shape_proto::dimension::Value as D;
    let dims: Vec<usize> = tt
        .shape
        .as_ref()
        .map(|s| s.dim.iter().map(|d| if let Some(D::DimValue(v)) = d.value { v.max(0) as usize } else { 1 }).collect())
        .unwrap_or_default();
    let n: usize = dims.iter().product();
    let data: Vec<f32> = (0..n).map(|i| (i as f64 / n as f64) as f32).collect();
    Tensor::from_vec(&dims, data).map_err(|e| Status::Error(e.message))
}

fn prepare(case: &Case) -> Prepared {
    let model_path = if case.suite == Suite::Light { case.path.clone() } else { case.path.join("model.onnx") };
    let model_bytes = match std::fs::read(&model_path) {
        Ok(b) => b,
        Err(e) => return Prepared::Done(Status::Error(format!("reading the model: {e}"))),
    };
    let model = match pb::ModelProto::decode(model_bytes.as_slice()) {
        Ok(m) => m,
        Err(e) => return Prepared::Done(Status::Error(format!("decoding the model: {e}"))),
    };
    let Some(graph) = model.graph.as_ref() else {
        return Prepared::Done(Status::Error("the model has no graph".into()));
    };
    let mut problems = BTreeSet::new();
    non_tensor_io(&model_bytes, &mut problems);
    graph_type_problems(graph, &mut problems);
    if !problems.is_empty() {
        return Prepared::Done(Status::UnsupportedType(problems.into_iter().collect::<Vec<_>>().join(", ")));
    }
    let mut missing = BTreeSet::new();
    missing_ops(graph, framework(), &mut missing);
    if !missing.is_empty() {
        return Prepared::Done(Status::UnsupportedOp(missing.into_iter().collect::<Vec<_>>().join(", ")));
    }
    let fed = fed_inputs(graph);
    let mut sets = vec![];
    if case.suite == Suite::Light {
        let mut inputs = vec![];
        for vi in &fed {
            match dummy_input(vi) {
                Ok(t) => inputs.push((vi.name.clone(), t)),
                Err(s) => return Prepared::Done(s),
            }
        }
        let stem = case.path.with_extension("");
        let mut outputs = vec![];
        for (i, o) in graph.output.iter().enumerate() {
            let p = PathBuf::from(format!("{}_output_{i}.pb", stem.display()));
            match read_tensor(&p) {
                Ok(t) => outputs.push((o.name.clone(), t)),
                Err(s) => return Prepared::Done(s),
            }
        }
        sets.push(DataSet { inputs, outputs });
    } else {
        for ds in data_set_dirs(&case.path) {
            let mut inputs = vec![];
            for (i, p) in numbered(&ds, "input_").iter().enumerate() {
                let Some(vi) = fed.get(i) else {
                    return Prepared::Done(Status::Error(format!(
                        "{} has more inputs than the model ({})",
                        file_name(&ds),
                        fed.len()
                    )));
                };
                match read_tensor(p) {
                    Ok(t) => inputs.push((vi.name.clone(), t)),
                    Err(s) => return Prepared::Done(s),
                }
            }
            let mut outputs = vec![];
            for (i, p) in numbered(&ds, "output_").iter().enumerate() {
                let Some(vi) = graph.output.get(i) else {
                    return Prepared::Done(Status::Error(format!(
                        "{} has more outputs than the model",
                        file_name(&ds)
                    )));
                };
                match read_tensor(p) {
                    Ok(t) => outputs.push((vi.name.clone(), t)),
                    Err(s) => return Prepared::Done(s),
                }
            }
            sets.push(DataSet { inputs, outputs });
        }
        if sets.is_empty() {
            return Prepared::Done(Status::Error("no test_data_set_*".into()));
        }
    }
    Prepared::Ready { model, model_bytes, sets }
}

/// Compares one output, onnx backend-test style: same element type, same shape, then
/// `|a - e| <= atol + rtol·|e|` element-wise (NaN equals NaN, equal infinities are equal); strings exactly.
pub fn compare(actual: &Tensor, expected: &Tensor, tol: Tolerance) -> Result<(), String> {
    if actual.element_type() != expected.element_type() {
        return Err(format!("element type {} (expected {})", actual.element_type(), expected.element_type()));
    }
    if actual.dims() != expected.dims() {
        return Err(format!("shape {:?} (expected {:?})", actual.dims(), expected.dims()));
    }
    if actual.element_type() == ElementType::String {
        let (a, e) = match (actual.as_slice::<String>(), expected.as_slice::<String>()) {
            (Ok(a), Ok(e)) => (a, e),
            _ => return Err("string data unreadable".into()),
        };
        let bad = a.iter().zip(e).filter(|(x, y)| x != y).count();
        return if bad == 0 { Ok(()) } else { Err(format!("{bad} of {} strings differ", a.len())) };
    }
    let a = actual.to_f64_vec().map_err(|e| e.message)?;
    let e = expected.to_f64_vec().map_err(|e| e.message)?;
    let scale = if tol.atol_of_max > 0.0 {
        e.iter().fold(0f64, |m, v| if v.is_finite() { m.max(v.abs()) } else { m })
    } else {
        0.0
    };
    let atol = tol.atol + tol.atol_of_max * scale;
    let mut bad = 0usize;
    let mut max_diff = 0f64;
    for (x, y) in a.iter().zip(&e) {
        let ok = if x.is_nan() || y.is_nan() {
            x.is_nan() && y.is_nan()
        } else if x.is_infinite() || y.is_infinite() {
            x == y
        } else {
            (x - y).abs() <= atol + tol.rtol * y.abs()
        };
        if !ok {
            bad += 1;
            let d = (x - y).abs();
            max_diff = if d.is_nan() { f64::INFINITY } else { max_diff.max(d) };
        }
    }
    if bad == 0 {
        Ok(())
    } else {
        Err(format!("{bad} of {} values differ, max abs diff {}", a.len(), round_diff(max_diff)))
    }
}

/// A difference rounded up to a power of ten (`~1e-3`), so reports stay stable across machines.
pub fn round_diff(d: f64) -> String {
    if !d.is_finite() {
        return "inf/nan".into();
    }
    if d == 0.0 {
        return "0".into();
    }
    format!("~1e{}", d.log10().ceil() as i32)
}

struct Outcome {
    status: Status,
    provider: String,
    note: String,
    placement: String,
}

/// `gpu/total` compute nodes on the GPU, for a session on the webgpu provider.
fn gpu_placement(session: &Session) -> String {
    #[cfg(not(target_arch = "wasm32"))]
    if let Some(r) = session.gpu_placement() {
        let gpu = r.nodes.iter().filter(|n| n.device == kiln_provider::Device::Gpu).count();
        return format!("{gpu}/{}", r.nodes.len());
    }
    let _ = session;
    String::new()
}

fn run_sets(
    model_bytes: &[u8],
    sets: &[DataSet],
    options: &SessionOptions,
    constants: &[String],
    tol: Tolerance,
) -> Outcome {
    let mut provider = String::new();
    let mut note = String::new();
    let mut placement = String::new();
    // with constant inputs the session depends on the data set; otherwise one session serves every set
    let mut shared: Option<Session> = None;
    for set in sets {
        let mut opts = options.clone();
        let mut feeds = vec![];
        for (n, t) in &set.inputs {
            if constants.contains(n) {
                opts.constant_inputs.push((n.clone(), t.clone()));
            } else {
                feeds.push((n.clone(), t.clone()));
            }
        }
        let fresh;
        let session = if constants.is_empty() {
            if shared.is_none() {
                match Session::from_bytes(model_bytes, &opts) {
                    Ok(s) => shared = Some(s),
                    Err(e) => {
                        return Outcome {
                            status: Status::Error(format!("load: {}", e.message)),
                            provider,
                            note,
                            placement: placement.clone(),
                        }
                    }
                }
            }
            // cannot fire: set just above when it was empty
            shared.as_ref().unwrap()
        } else {
            match Session::from_bytes(model_bytes, &opts) {
                Ok(s) => {
                    fresh = s;
                    &fresh
                }
                Err(e) => {
                    return Outcome {
                        status: Status::Error(format!("load: {}", e.message)),
                        provider,
                        note,
                        placement: placement.clone(),
                    }
                }
            }
        };
        provider = session.execution_provider().name().to_string();
        note = session.provider_note().unwrap_or_default().to_string();
        placement = gpu_placement(session);
        let names: Vec<&str> = set.outputs.iter().map(|(n, _)| n.as_str()).collect();
        let result = if names.is_empty() { session.run(feeds) } else { session.run_with_outputs(feeds, &names) };
        let outs = match result {
            Ok(o) => o,
            Err(e) => {
                return Outcome {
                    status: Status::Error(format!("run: {}", e.message)),
                    provider,
                    note,
                    placement: placement.clone(),
                }
            }
        };
        for (name, expected) in &set.outputs {
            let Some(actual) = outs.get(name) else {
                return Outcome {
                    status: Status::Error(format!("output `{name}` missing")),
                    provider,
                    note,
                    placement: placement.clone(),
                };
            };
            if let Err(detail) = compare(actual, expected, tol) {
                return Outcome {
                    status: Status::Mismatch { output: name.clone(), detail },
                    provider,
                    note,
                    placement: placement.clone(),
                };
            }
        }
    }
    let status = if constants.is_empty() { Status::Pass } else { Status::PassConstInputs(constants.to_vec()) };
    Outcome { status, provider, note, placement }
}

fn guarded<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| {
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown panic".into())
    })
}

/// Runs one case in this process (panics are caught; hangs are not: use [`run_isolated`] for those).
pub fn run_case(case: &Case, backend: Backend) -> CaseResult {
    let mut result = CaseResult {
        case: case.clone(),
        status: Status::Error(String::new()),
        ops: vec![],
        provider: String::new(),
        provider_note: String::new(),
        placement: String::new(),
    };
    let r = guarded(|| run_case_inner(case, backend, &mut result.ops));
    match r {
        Ok(o) => {
            result.status = o.status;
            result.provider = o.provider;
            result.provider_note = o.note;
            result.placement = o.placement;
        }
        Err(msg) => result.status = Status::Error(format!("panic: {}", clean(&msg))),
    }
    result
}

fn run_case_inner(case: &Case, backend: Backend, ops: &mut Vec<String>) -> Outcome {
    let none = |status| Outcome { status, provider: String::new(), note: String::new(), placement: String::new() };
    let (model, model_bytes, sets) = match prepare(case) {
        Prepared::Done(s) => {
            if let Ok(bytes) =
                std::fs::read(if case.suite == Suite::Light { case.path.clone() } else { case.path.join("model.onnx") })
            {
                if let Ok(m) = pb::ModelProto::decode(bytes.as_slice()) {
                    *ops = m.graph.as_ref().map(ops_of).unwrap_or_default();
                }
            }
            return none(s);
        }
        Prepared::Ready { model, model_bytes, sets } => (model, model_bytes, sets),
    };
    // cannot fire: prepare() returns Done for a model without a graph
    let graph = model.graph.as_ref().expect("checked in prepare");
    *ops = ops_of(graph);
    let tol = Tolerance::for_case(case);
    let options = SessionOptions {
        execution_providers: match backend {
            Backend::Cpu => vec![ExecutionProvider::Cpu],
            Backend::Gpu => vec![ExecutionProvider::WebGpu],
        },
        ..SessionOptions::default()
    };
    let first = match guarded(|| run_sets(&model_bytes, &sets, &options, &[], tol)) {
        Ok(o) => o,
        Err(p) => none(Status::Error(format!("panic: {}", clean(&p)))),
    };
    if first.status.is_pass() {
        return first;
    }
    // tract needs shapes, axes, pads, repeats... as constants: retry with the non-float inputs folded, then with
    // every input but the first.
    let names: Vec<String> = sets[0].inputs.iter().map(|(n, _)| n.clone()).collect();
    let non_float: Vec<String> = sets[0]
        .inputs
        .iter()
        .filter(|(_, t)| !matches!(t.element_type(), ElementType::F32 | ElementType::F16 | ElementType::F64))
        .map(|(n, _)| n.clone())
        .collect();
    let mut attempts: Vec<Vec<String>> = vec![];
    if !non_float.is_empty() {
        attempts.push(non_float);
    }
    if names.len() > 1 {
        let rest = names[1..].to_vec();
        if !attempts.contains(&rest) {
            attempts.push(rest);
        }
    }
    if case.suite == Suite::Slm {
        attempts.clear();
    }
    for constants in attempts {
        if let Ok(o) = guarded(|| run_sets(&model_bytes, &sets, &options, &constants, tol)) {
            if o.status.is_pass() {
                return o;
            }
            if std::env::var_os("KILN_CONFORMANCE_DEBUG").is_some() {
                eprintln!("{}: with const inputs {constants:?}: {}", case.id(), o.status.line());
            }
        }
    }
    first
}

// ---------------------------------------------------------------------------------------------------------------
// Worker processes
// ---------------------------------------------------------------------------------------------------------------

/// The worker loop: reads `suite<TAB>name<TAB>path` lines from stdin, runs each case, and writes one
/// `RESULT<TAB>ops<TAB>provider<TAB>note<TAB>placement<TAB>status...` line per case on stdout.
pub fn worker_main(backend: Backend) {
    std::panic::set_hook(Box::new(|_| {}));
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() != 3 {
            continue;
        }
        let Some(suite) = Suite::from_name(f[0]) else { continue };
        let case = Case { suite, name: f[1].to_string(), path: PathBuf::from(f[2]) };
        let r = run_case(&case, backend);
        let msg = format!(
            "RESULT\t{}\t{}\t{}\t{}\t{}\n",
            r.ops.join(","),
            clean(&r.provider),
            clean(&r.provider_note),
            clean(&r.placement),
            r.status.encode()
        );
        if stdout.write_all(msg.as_bytes()).and_then(|_| stdout.flush()).is_err() {
            break;
        }
    }
}

struct Worker {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl Worker {
    fn spawn(exe: &Path, backend: Backend, verbose: bool) -> std::io::Result<Worker> {
        let mut child = Command::new(exe)
            .args(["--worker", "--backend", backend.name()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(if verbose { Stdio::inherit() } else { Stdio::null() })
            .spawn()?;
        // cannot fire: the worker is spawned with piped stdin/stdout just above
        let stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.starts_with("RESULT\t") && tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Worker { child, stdin, lines: rx })
    }
    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs cases in `cfg.jobs` worker processes of `exe` (the `kiln-conformance` binary), each case under
/// `cfg.timeout`. A case that crashes or hangs its worker is reported as an error and the worker replaced.
/// `progress` is called after each case. Results come back in the order of `cases`.
pub fn run_isolated(
    exe: &Path,
    cases: &[Case],
    cfg: &RunConfig,
    verbose: bool,
    progress: &(dyn Fn(&CaseResult, usize, usize) + Sync),
) -> Vec<CaseResult> {
    let queue: Arc<Mutex<std::collections::VecDeque<usize>>> = Arc::new(Mutex::new((0..cases.len()).collect()));
    let results: Arc<Mutex<Vec<Option<CaseResult>>>> = Arc::new(Mutex::new(vec![None; cases.len()]));
    let done = Arc::new(Mutex::new(0usize));
    // The lock unwraps below cannot fire: a lock is only poisoned by a panic while held, and no code in these short
    // critical sections panics (cases run in worker processes).
    std::thread::scope(|s| {
        for _ in 0..cfg.jobs.max(1) {
            let queue = queue.clone();
            let results = results.clone();
            let done = done.clone();
            s.spawn(move || {
                let mut worker: Option<Worker> = None;
                loop {
                    let Some(ix) = queue.lock().unwrap().pop_front() else { break };
                    let case = &cases[ix];
                    let r = run_in_worker(exe, &mut worker, case, cfg, verbose);
                    let n = {
                        let mut d = done.lock().unwrap();
                        *d += 1;
                        *d
                    };
                    progress(&r, n, cases.len());
                    results.lock().unwrap()[ix] = Some(r);
                }
                if let Some(w) = worker.take() {
                    drop(w.stdin);
                    let mut child = w.child;
                    let _ = child.wait();
                }
            });
        }
    });
    let v = std::mem::take(&mut *results.lock().unwrap());
    v.into_iter().flatten().collect()
}

fn run_in_worker(exe: &Path, slot: &mut Option<Worker>, case: &Case, cfg: &RunConfig, verbose: bool) -> CaseResult {
    let fail = |status| CaseResult {
        case: case.clone(),
        status,
        ops: vec![],
        provider: String::new(),
        provider_note: String::new(),
        placement: String::new(),
    };
    if slot.is_none() {
        match Worker::spawn(exe, cfg.backend, verbose) {
            Ok(w) => *slot = Some(w),
            Err(e) => return fail(Status::Error(format!("starting a worker ({}): {e}", exe.display()))),
        }
    }
    // cannot fire: the slot was filled just above when empty
    let w = slot.as_mut().expect("spawned");
    let line = format!("{}\t{}\t{}\n", case.suite.name(), case.name, case.path.display());
    if w.stdin.write_all(line.as_bytes()).and_then(|_| w.stdin.flush()).is_err() {
        if let Some(w) = slot.take() {
            w.kill();
        }
        return fail(Status::Error("worker died before the case started".into()));
    }
    match w.lines.recv_timeout(cfg.timeout) {
        Ok(line) => {
            let f: Vec<&str> = line.split('\t').collect();
            let status = Status::decode(&f[5.min(f.len())..]).unwrap_or(Status::Error("bad worker reply".into()));
            CaseResult {
                case: case.clone(),
                status,
                ops: f
                    .get(1)
                    .map(|s| s.split(',').filter(|s| !s.is_empty()).map(String::from).collect())
                    .unwrap_or_default(),
                provider: f.get(2).map(|s| s.to_string()).unwrap_or_default(),
                provider_note: f.get(3).map(|s| s.to_string()).unwrap_or_default(),
                placement: f.get(4).map(|s| s.to_string()).unwrap_or_default(),
            }
        }
        Err(mpsc::RecvTimeoutError::Timeout) => {
            if let Some(w) = slot.take() {
                w.kill();
            }
            fail(Status::Error(format!("timed out after {}s", cfg.timeout.as_secs())))
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            // cannot fire: `w` above borrowed from this slot, which nothing emptied since
            let mut w = slot.take().expect("present");
            let code = w.child.wait().ok().map(|s| format!("{s}")).unwrap_or_default();
            fail(Status::Error(format!("the worker crashed ({code})")))
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Reports
// ---------------------------------------------------------------------------------------------------------------

/// The op family of each result: the longest op type (seen in any model of the run) whose lower-cased name,
/// underscores dropped, prefixes the test name (`test_reduce_mean_keepdims` → ReduceMean); otherwise the model's
/// first op other than Constant. SLM cases group under `slm`.
pub fn families(results: &[CaseResult]) -> Vec<String> {
    let mut known: BTreeSet<String> = BTreeSet::new();
    for r in results {
        for o in &r.ops {
            known.insert(o.clone());
        }
    }
    let norm: Vec<(String, String)> =
        known.iter().map(|o| (o.to_ascii_lowercase().replace('_', ""), o.clone())).collect();
    results
        .iter()
        .map(|r| {
            if r.case.suite == Suite::Slm {
                return "slm".to_string();
            }
            let mut n = r.case.name.strip_prefix("test_").unwrap_or(&r.case.name).to_ascii_lowercase();
            for p in ["ai_onnx_ml_", "operator_", "training_", "basic_"] {
                if let Some(rest) = n.strip_prefix(p) {
                    n = rest.to_string();
                }
            }
            for (alias, op) in FAMILY_ALIASES {
                if n.starts_with(alias) {
                    return op.to_string();
                }
            }
            let n = n.replace('_', "");
            let best =
                norm.iter().filter(|(k, _)| !k.is_empty() && n.starts_with(k.as_str())).max_by_key(|(k, _)| k.len());
            if let Some((_, o)) = best {
                return o.clone();
            }
            r.ops.iter().find(|o| *o != "Constant").or(r.ops.first()).cloned().unwrap_or_else(|| "?".into())
        })
        .collect()
}

/// Test-name prefixes that do not spell their op.
const FAMILY_ALIASES: &[(&str, &str)] = &[
    ("sce_", "SoftmaxCrossEntropyLoss"),
    ("nllloss", "NegativeLogLikelihoodLoss"),
    ("strnorm", "StringNormalizer"),
    ("batchnorm", "BatchNormalization"),
    ("instancenorm", "InstanceNormalization"),
    ("layer_normalization", "LayerNormalization"),
    ("group_normalization", "GroupNormalization"),
    ("rms_normalization", "RMSNormalization"),
    ("lrn", "LRN"),
    ("gridsample", "GridSample"),
    ("logsoftmax", "LogSoftmax"),
    ("log_softmax", "LogSoftmax"),
    ("rnn_seq", "RNN"),
    ("simple_rnn", "RNN"),
    ("globalaveragepool", "GlobalAveragePool"),
    ("globalmaxpool", "GlobalMaxPool"),
];

/// `N passed, M failed, K skipped`.
pub fn totals_line(results: &[CaseResult]) -> String {
    let passed = results.iter().filter(|r| r.status.is_pass()).count();
    let skipped = results.iter().filter(|r| r.status.is_skip()).count();
    let failed = results.len() - passed - skipped;
    format!("{passed} passed, {failed} failed, {skipped} skipped")
}

/// One line per case, sorted: `node/test_abs: pass`.
pub fn case_lines(results: &[CaseResult]) -> String {
    let mut lines: Vec<String> = results
        .iter()
        .map(|r| {
            if r.placement.is_empty() {
                format!("{}: {}", r.case.id(), r.status.line())
            } else {
                format!("{}: {} [gpu nodes {}]", r.case.id(), r.status.line(), r.placement)
            }
        })
        .collect();
    lines.sort();
    lines.join("\n")
}

/// The summary by op family (failing families first by failures, then alphabetical), then the totals line.
pub fn summary(results: &[CaseResult]) -> String {
    let fams = families(results);
    #[derive(Default)]
    struct Row {
        pass: usize,
        pass_const: usize,
        fail: usize,
        skip: usize,
        kinds: BTreeMap<&'static str, usize>,
    }
    let mut rows: HashMap<String, Row> = HashMap::new();
    for (r, f) in results.iter().zip(&fams) {
        let row = rows.entry(f.clone()).or_default();
        match &r.status {
            Status::Pass => row.pass += 1,
            Status::PassConstInputs(_) => row.pass_const += 1,
            s if s.is_skip() => row.skip += 1,
            s => {
                row.fail += 1;
                *row.kinds.entry(s.label()).or_default() += 1;
            }
        }
    }
    let mut keys: Vec<&String> = rows.keys().collect();
    keys.sort_by(|a, b| rows[*b].fail.cmp(&rows[*a].fail).then(a.cmp(b)));
    let mut out = String::new();
    out.push_str(&format!("{:<32} {:>6} {:>6} {:>6} {:>6}  failures\n", "family", "pass", "const", "fail", "skip"));
    for k in keys {
        let r = &rows[k];
        let kinds: Vec<String> = r.kinds.iter().map(|(k, n)| format!("{n} {k}")).collect();
        out.push_str(&format!(
            "{:<32} {:>6} {:>6} {:>6} {:>6}  {}\n",
            k,
            r.pass,
            r.pass_const,
            r.fail,
            r.skip,
            kinds.join(", ")
        ));
    }
    let by_kind = |label: &str| results.iter().filter(|r| r.status.label() == label).count();
    out.push_str(&format!(
        "statuses: {} pass, {} pass (const inputs), {} mismatch, {} error, {} unsupported op, {} unsupported type\n",
        by_kind("pass"),
        by_kind("pass (const inputs)"),
        by_kind("mismatch"),
        by_kind("error"),
        by_kind("unsupported op"),
        by_kind("unsupported type"),
    ));
    out.push_str(&totals_line(results));
    if results.iter().any(|r| r.provider == "webgpu") {
        let passing: Vec<&CaseResult> = results.iter().filter(|r| r.status.is_pass()).collect();
        out.push_str(&format!(
            "\nfully on the GPU: {} of {} passing cases (every compute node placed on the GPU)",
            passing.iter().filter(|r| r.fully_on_gpu()).count(),
            passing.len()
        ));
    }
    out
}

/// Which provider actually ran, for the report header.
pub fn backend_line(backend: Backend, results: &[CaseResult]) -> String {
    let mut ran: BTreeMap<String, usize> = BTreeMap::new();
    let mut notes: BTreeSet<String> = BTreeSet::new();
    for r in results {
        if !r.provider.is_empty() {
            *ran.entry(r.provider.clone()).or_default() += 1;
        }
        if !r.provider_note.is_empty() {
            notes.insert(r.provider_note.clone());
        }
    }
    let ran: Vec<String> = ran.iter().map(|(p, n)| format!("{p} ({n} cases)")).collect();
    let mut s = format!(
        "backend requested: {}; actually ran: {}",
        backend.name(),
        if ran.is_empty() { "none".into() } else { ran.join(", ") }
    );
    for n in notes {
        s.push_str(&format!("\n  note: {n}"));
    }
    s
}
