//! Host operators: nodes whose evaluation an application supplies at run time (custom operators registered from
//! Rust or JavaScript), computed outside tract's plan by the session, which may await the application's (possibly
//! asynchronous) callback between two nodes.
//!
//! tract's op register is static and keyed by op type, so a session with custom operators rewrites the ONNX proto
//! before import ([`rewrite_custom_nodes`]): every top-level node whose (domain, op type) is registered becomes an
//! `ai.onnx.contrib` `KilnHostOp` node carrying the original domain, op type and attributes, plus the element type
//! and shape of each output. [`build_host_op`] turns it into a [`HostOp`], which tract plans like any op but never
//! evaluates ([`HostOp`] refuses to run inside a plan and out of one, so it is never constant-folded either).
//!
//! **Output facts.** The output's element type and rank must be known when the model loads (tract types every
//! wire). They come from the op's declaration (`outputs`), else from the model's `value_info` / graph outputs for
//! that value; with neither, loading fails with an error naming the node and saying how to declare them. Each
//! dimension is the declared number (checked at run time), the declared symbolic name (the model's symbol: a value
//! that disagrees with what the graph already bound is a run error), or, when undeclared, a fresh symbol of its
//! own: so shapes downstream stay symbolic and are bound from the tensors the callback returns, as for any op whose
//! output size depends on values (NonZero, the tokenizers).

use std::sync::Arc;

use tract_onnx::model::ParsingContext;
use tract_onnx::pb;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use crate::kernel::datum_type_of_onnx;
use crate::tokenizer::{is_contrib_domain, node_label, CONTRIB_DOMAIN};
use crate::BuildResult;

/// The op type a registered custom node is rewritten to (in `ai.onnx.contrib`).
pub const HOST_OP_TYPE: &str = "KilnHostOp";
const ATTR_DOMAIN: &str = "__kiln_domain";
const ATTR_OP_TYPE: &str = "__kiln_op_type";
const ATTR_LABEL: &str = "__kiln_node";
const ATTR_TYPES: &str = "__kiln_output_types";
const ATTR_RANKS: &str = "__kiln_output_ranks";
const ATTR_DIMS: &str = "__kiln_output_dims";
const ATTR_NAMES: &str = "__kiln_output_names";

/// A node attribute as a custom operator sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum AttributeValue {
    Float(f32),
    Int(i64),
    String(String),
    Tensor(Tensor),
    Floats(Vec<f32>),
    Ints(Vec<i64>),
    Strings(Vec<String>),
}

/// What a custom operator's callback is told about the node it computes.
#[derive(Debug, Clone, PartialEq)]
pub struct HostOpInfo {
    /// The node's original domain (`""` for the default domain) and op type.
    pub domain: String,
    pub op_type: String,
    /// The node's name (else its first output).
    pub node: String,
    /// The node's attributes, in the model's order.
    pub attributes: Vec<(String, AttributeValue)>,
    /// The node's output names (those the model uses).
    pub outputs: Vec<String>,
}

impl HostOpInfo {
    /// `domain/opType` node `name`, for messages.
    pub fn describe(&self) -> String {
        let domain = if self.domain.is_empty() { "ai.onnx" } else { &self.domain };
        format!("custom operator {domain}/{} (node `{}`)", self.op_type, self.node)
    }
}

/// The typed op: the node's description and its output facts.
#[derive(Debug, Clone)]
pub struct HostOp {
    pub info: Arc<HostOpInfo>,
    pub facts: TVec<TypedFact>,
}

impl PartialEq for HostOp {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.info, &other.info) && self.facts == other.facts
    }
}
impl Eq for HostOp {}

impl HostOp {
    /// Checks what a callback returned against the output facts: count, element type, rank, fixed dims.
    pub fn check_outputs(&self, values: &[Tensor]) -> TractResult<()> {
        let what = self.info.describe();
        ensure!(
            values.len() == self.facts.len(),
            "{what} returned {} output(s), the node has {} ({})",
            values.len(),
            self.facts.len(),
            self.info.outputs.join(", ")
        );
        for (ix, (v, f)) in values.iter().zip(&self.facts).enumerate() {
            let name = self.info.outputs.get(ix).map(|s| s.as_str()).unwrap_or("?");
            ensure!(
                v.datum_type() == f.datum_type,
                "{what}: output `{name}` is {:?}, the model expects {:?}",
                v.datum_type(),
                f.datum_type
            );
            ensure!(
                v.rank() == f.rank(),
                "{what}: output `{name}` has dims {:?} (rank {}), the model expects rank {} ({:?})",
                v.shape(),
                v.rank(),
                f.rank(),
                f.shape
            );
            for (d, (got, want)) in v.shape().iter().zip(f.shape.iter()).enumerate() {
                if let Ok(want) = want.to_i64() {
                    ensure!(
                        *got as i64 == want,
                        "{what}: output `{name}` has dims {:?}, the model expects {want} at axis {d} ({:?})",
                        v.shape(),
                        f.shape
                    );
                }
            }
        }
        Ok(())
    }
}

impl Op for HostOp {
    fn name(&self) -> StaticName {
        format!("Host({}/{})", self.info.domain, self.info.op_type).into()
    }
    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![self.info.describe()])
    }
    fn mints_runtime_symbols(&self) -> bool {
        true
    }
    op_as_typed_op!();
}

impl EvalOp for HostOp {
    not_out_of_plan!();
    fn eval(&self, _ctx: &EvalContext, _inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        bail!(
            "{} is computed by the application's callback, which only a kiln session's CPU run can call",
            self.info.describe()
        )
    }
}

impl TypedOp for HostOp {
    as_op!();
    fn output_facts(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(self.facts.clone())
    }
}

/// The inference-time face: the output element types and shapes as declared.
#[derive(Debug, Clone)]
struct HostExpansion(HostOp);

impl Expansion for HostExpansion {
    fn name(&self) -> StaticName {
        self.0.name()
    }
    fn nboutputs(&self) -> TractResult<usize> {
        Ok(self.0.facts.len())
    }
    fn runs_out_of_plan(&self) -> bool {
        false
    }
    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        _inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_output_arity(outputs, self.0.facts.len())?;
        for (o, f) in outputs.iter().zip(&self.0.facts) {
            s.equals(&o.datum_type, f.datum_type)?;
            s.equals(&o.rank, f.rank() as i64)?;
            for (ix, d) in f.shape.iter().enumerate() {
                s.equals(&o.shape[ix], d.clone())?;
            }
        }
        Ok(())
    }
    fn wire(&self, prefix: &str, model: &mut TypedModel, inputs: &[OutletId]) -> TractResult<TVec<OutletId>> {
        model.wire_node(prefix, self.0.clone(), inputs)
    }
}

fn attr<'a>(node: &'a NodeProto, name: &str) -> Option<&'a pb::AttributeProto> {
    node.attribute.iter().find(|a| a.name == name)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Builds the [`HostOp`] of a rewritten node (`ai.onnx.contrib` `KilnHostOp`); other domains go to tract's builder.
pub fn build_host_op(ctx: &ParsingContext, node: &NodeProto) -> BuildResult {
    if !is_contrib_domain(node) {
        return crate::tract_builder(ctx, node);
    }
    let label = attr(node, ATTR_LABEL).map(|a| text(&a.s)).unwrap_or_else(|| node_label(node));
    let domain = attr(node, ATTR_DOMAIN).map(|a| text(&a.s)).unwrap_or_default();
    let op_type = attr(node, ATTR_OP_TYPE).map(|a| text(&a.s)).unwrap_or_default();
    let what = format!("custom operator {domain}/{op_type} (node `{label}`)");
    let types = attr(node, ATTR_TYPES).map(|a| a.ints.clone()).unwrap_or_default();
    let ranks = attr(node, ATTR_RANKS).map(|a| a.ints.clone()).unwrap_or_default();
    let dims: Vec<String> =
        attr(node, ATTR_DIMS).map(|a| a.strings.iter().map(|s| text(s)).collect()).unwrap_or_default();
    let names: Vec<String> =
        attr(node, ATTR_NAMES).map(|a| a.strings.iter().map(|s| text(s)).collect()).unwrap_or_default();
    ensure!(
        types.len() == ranks.len() && types.len() == names.len(),
        "{what}: the node's output declarations are inconsistent"
    );
    let mut facts = tvec![];
    let mut dims = dims.into_iter();
    for ((code, rank), name) in types.iter().zip(&ranks).zip(&names) {
        let dt = datum_type_of_onnx(&what, *code)?;
        let mut shape: TVec<TDim> = tvec![];
        for _ in 0..(*rank).max(0) {
            let d = dims.next().ok_or_else(|| format_err!("{what}: the output dims are inconsistent"))?;
            shape.push(match d.parse::<u64>() {
                Ok(n) => (n as i64).into(),
                Err(_) if d == "?" || d.is_empty() => {
                    let prefix: String = name.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                    let prefix = if prefix.is_empty() { "host".to_string() } else { format!("{prefix}_") };
                    TDim::Sym(ctx.template.symbols.new_with_prefix(&prefix))
                }
                Err(_) => match tract_onnx::dim_expr::parse_onnx_dim(&ctx.template.symbols, &d) {
                    Ok(dim) => dim,
                    Err(_) => TDim::Sym(ctx.template.symbols.new_with_prefix("host")),
                },
            });
        }
        facts.push(dt.fact(shape));
    }
    let mut attributes = vec![];
    for a in &node.attribute {
        if a.name.starts_with("__kiln_") {
            continue;
        }
        use pb::attribute_proto::AttributeType as T;
        let value = match T::try_from(a.r#type).unwrap_or(T::Undefined) {
            T::Float => AttributeValue::Float(a.f),
            T::Int => AttributeValue::Int(a.i),
            T::String => AttributeValue::String(text(&a.s)),
            T::Floats => AttributeValue::Floats(a.floats.clone()),
            T::Ints => AttributeValue::Ints(a.ints.clone()),
            T::Strings => AttributeValue::Strings(a.strings.iter().map(|s| text(s)).collect()),
            T::Tensor => match &a.t {
                Some(t) => AttributeValue::Tensor(
                    ctx.load_tensor(t).map_err(|e| format_err!("{what}: attribute `{}`: {e}", a.name))?,
                ),
                None => bail!("{what}: tensor attribute `{}` has no tensor", a.name),
            },
            other => bail!("{what}: attribute `{}` is of type {other:?}, which custom operators do not take", a.name),
        };
        attributes.push((a.name.clone(), value));
    }
    let info = HostOpInfo { domain, op_type, node: label, attributes, outputs: names };
    Ok((expand(HostExpansion(HostOp { info: Arc::new(info), facts })), vec![]))
}

/// What an application declares about one output of its custom operator (both optional).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeclaredOutput {
    /// The element type.
    pub datum_type: Option<DatumType>,
    /// The shape: `Some(n)` a fixed dim, `None` one known only at run time. `None` for the whole: undeclared.
    pub dims: Option<Vec<Option<usize>>>,
}

/// A registered custom operator, as the rewrite needs it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CustomOpDecl {
    pub domain: String,
    pub op_type: String,
    pub outputs: Vec<DeclaredOutput>,
}

fn same_domain(a: &str, b: &str) -> bool {
    let norm = |d: &str| if d == "ai.onnx" { "" } else { d }.to_string();
    norm(a) == norm(b)
}

fn onnx_code(dt: DatumType) -> TractResult<i64> {
    Ok(match dt {
        DatumType::F32 => 1,
        DatumType::U8 => 2,
        DatumType::I8 => 3,
        DatumType::U16 => 4,
        DatumType::I16 => 5,
        DatumType::I32 => 6,
        DatumType::I64 => 7,
        DatumType::String => 8,
        DatumType::Bool => 9,
        DatumType::F16 => 10,
        DatumType::F64 => 11,
        DatumType::U32 => 12,
        DatumType::U64 => 13,
        other => bail!("element type {other:?} is not supported for custom operator outputs"),
    })
}

/// The element type code and dims ("3", "N" or "?") the graph declares for a value, if it does.
fn graph_type(graph: &pb::GraphProto, name: &str) -> Option<(i64, Option<Vec<String>>)> {
    use pb::tensor_shape_proto::dimension::Value as D;
    let vi = graph.value_info.iter().chain(graph.output.iter()).find(|v| v.name == name)?;
    let pb::type_proto::Value::TensorType(t) = vi.r#type.as_ref()?.value.as_ref()?;
    let dims = t.shape.as_ref().map(|s| {
        s.dim
            .iter()
            .map(|d| match &d.value {
                Some(D::DimValue(v)) if *v >= 0 => v.to_string(),
                Some(D::DimParam(p)) if p != "?" && !p.starts_with("unk__") => p.clone(),
                _ => "?".to_string(),
            })
            .collect()
    });
    Some((t.elem_type as i64, dims))
}

fn any_nested_match(graph: &pb::GraphProto, decls: &[CustomOpDecl]) -> Option<(String, String)> {
    for node in &graph.node {
        for a in &node.attribute {
            for g in a.g.iter().chain(a.graphs.iter()) {
                for n in &g.node {
                    if decls.iter().any(|d| same_domain(&d.domain, &n.domain) && d.op_type == n.op_type) {
                        return Some((node_label(n), n.op_type.clone()));
                    }
                }
                if let Some(found) = any_nested_match(g, decls) {
                    return Some(found);
                }
            }
        }
    }
    None
}

/// Rewrites the model's nodes that a registered custom operator computes into `KilnHostOp` nodes; returns how many.
/// Errors name the node: an output whose element type or rank is neither declared nor in the model, or a custom
/// node inside a subgraph (an If/Loop/Scan body runs inside tract, where no callback can be awaited).
pub fn rewrite_custom_nodes(proto: &mut pb::ModelProto, decls: &[CustomOpDecl]) -> TractResult<usize> {
    let Some(graph) = proto.graph.as_mut() else { return Ok(0) };
    if let Some((node, op)) = any_nested_match(graph, decls) {
        bail!("node `{node}`: custom operator {op} inside a subgraph (If, Loop or Scan body) is not supported");
    }
    let mut count = 0;
    let lookup = graph.clone();
    for node in graph.node.iter_mut() {
        let Some(decl) = decls.iter().rev().find(|d| same_domain(&d.domain, &node.domain) && d.op_type == node.op_type)
        else {
            continue;
        };
        let label = node_label(node);
        let domain_shown = if node.domain.is_empty() { "ai.onnx" } else { node.domain.as_str() };
        let what = format!("custom operator {domain_shown}/{} (node `{label}`)", node.op_type);
        // trailing unused outputs go; an unused one in the middle stays as a value the op must return
        while node.output.last().is_some_and(|o| o.is_empty()) {
            node.output.pop();
        }
        ensure!(
            node.output.iter().all(|o| !o.is_empty()),
            "{what}: an unnamed output before a named one is not supported"
        );
        let (mut types, mut ranks, mut dims, mut names) = (vec![], vec![], vec![], vec![]);
        for (ix, out) in node.output.iter().enumerate() {
            let declared = decl.outputs.get(ix).cloned().unwrap_or_default();
            let from_graph = graph_type(&lookup, out);
            let code = match (declared.datum_type, &from_graph) {
                (Some(dt), _) => onnx_code(dt).map_err(|e| format_err!("{what}: output `{out}`: {e}"))?,
                (None, Some((code, _))) if *code != 0 => *code,
                _ => bail!(
                    "{what}: the element type of output `{out}` is unknown: declare it in the custom operator's \
                     `outputs` or in the model's value_info"
                ),
            };
            let shape: Vec<String> = match (declared.dims, from_graph.and_then(|g| g.1)) {
                (Some(d), _) => d.iter().map(|d| d.map(|n| n.to_string()).unwrap_or_else(|| "?".into())).collect(),
                (None, Some(d)) => d,
                (None, None) => bail!(
                    "{what}: the rank of output `{out}` is unknown: declare its dims in the custom operator's \
                     `outputs` or its shape in the model's value_info"
                ),
            };
            types.push(code);
            ranks.push(shape.len() as i64);
            dims.extend(shape.into_iter().map(String::into_bytes));
            names.push(out.clone().into_bytes());
        }
        let s = |name: &str, v: &str| pb::AttributeProto {
            name: name.into(),
            r#type: pb::attribute_proto::AttributeType::String as i32,
            s: v.as_bytes().to_vec(),
            ..Default::default()
        };
        let ints = |name: &str, v: Vec<i64>| pb::AttributeProto {
            name: name.into(),
            r#type: pb::attribute_proto::AttributeType::Ints as i32,
            ints: v,
            ..Default::default()
        };
        let strings = |name: &str, v: Vec<Vec<u8>>| pb::AttributeProto {
            name: name.into(),
            r#type: pb::attribute_proto::AttributeType::Strings as i32,
            strings: v,
            ..Default::default()
        };
        let original_domain = std::mem::replace(&mut node.domain, CONTRIB_DOMAIN.into());
        let original_op = std::mem::replace(&mut node.op_type, HOST_OP_TYPE.into());
        node.attribute.retain(|a| !a.name.starts_with("__kiln_"));
        node.attribute.extend([
            s(ATTR_DOMAIN, &original_domain),
            s(ATTR_OP_TYPE, &original_op),
            s(ATTR_LABEL, &label),
            ints(ATTR_TYPES, types),
            ints(ATTR_RANKS, ranks),
            strings(ATTR_DIMS, dims),
            strings(ATTR_NAMES, names),
        ]);
        count += 1;
    }
    if count > 0 && !proto.opset_import.iter().any(|o| o.domain == CONTRIB_DOMAIN) {
        proto.opset_import.push(pb::OperatorSetIdProto { domain: CONTRIB_DOMAIN.into(), version: 1 });
    }
    Ok(count)
}
