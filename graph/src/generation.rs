//! Generation helpers added to a decoder's graph at load time (kiln's own options, not onnxruntime's):
//!
//! - `last_logits_only`: the language-model head runs on the last position only — a `Slice` of its input to the
//!   last row, so a prefill of S tokens computes one row of logits instead of S (`logits` becomes `[batch, 1,
//!   vocab]`).
//! - `next_token`: an extra output [`NEXT_TOKEN`] = `ArgMax` over the vocabulary of the last position's logits
//!   (`[batch, 1]`, int64), so a greedy step that fetches it (and leaves `logits` unfetched) reads back one integer
//!   per sequence, not the logits. On the GPU both are kernels: nothing else crosses to the host.

use std::collections::{HashMap, HashSet};

use tract_onnx::pb;
use tract_onnx::pb::tensor_shape_proto::dimension::Value as DimValue;
use tract_onnx::pb::type_proto::Value as TypeValue;

use crate::error::{Error, Result};

/// The name of the `next_token` output.
pub const NEXT_TOKEN: &str = "kiln_next_token";

/// What to add to a decoder's graph (all off by default).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GenerationOptions {
    /// The output holding the logits; `None`: `logits`, else the only output whose name contains "logits".
    pub logits: Option<String>,
    /// Compute the logits of the last position only.
    pub last_logits_only: bool,
    /// Add the [`NEXT_TOKEN`] output: the argmax of the last position's logits.
    pub next_token: bool,
}

impl GenerationOptions {
    pub fn is_off(&self) -> bool {
        !self.last_logits_only && !self.next_token
    }
}

fn logits_name(graph: &pb::GraphProto, wanted: Option<&str>) -> Result<String> {
    let names: Vec<&str> = graph.output.iter().map(|o| o.name.as_str()).collect();
    if let Some(w) = wanted {
        return names
            .iter()
            .find(|n| **n == w)
            .map(|n| n.to_string())
            .ok_or_else(|| Error::invalid_argument(format!("generation options: the model has no output `{w}`")));
    }
    if names.contains(&"logits") {
        return Ok("logits".into());
    }
    let found: Vec<&&str> = names.iter().filter(|n| n.to_ascii_lowercase().contains("logits")).collect();
    match found.as_slice() {
        [one] => Ok(one.to_string()),
        _ => Err(Error::invalid_argument(format!(
            "generation options: cannot tell which output holds the logits (outputs: {}); name it",
            names.join(", ")
        ))),
    }
}

fn tensor_dims(vi: &pb::ValueInfoProto) -> Option<&Vec<pb::tensor_shape_proto::Dimension>> {
    let TypeValue::TensorType(tt) = vi.r#type.as_ref()?.value.as_ref()?;
    tt.shape.as_ref().map(|s| &s.dim)
}

fn fixed_dim(v: i64) -> pb::tensor_shape_proto::Dimension {
    pb::tensor_shape_proto::Dimension { value: Some(DimValue::DimValue(v)), ..Default::default() }
}

fn i64_initializer(name: &str, v: i64) -> pb::TensorProto {
    pb::TensorProto { name: name.into(), dims: vec![1], data_type: 7, int64_data: vec![v], ..Default::default() }
}

fn node(op: &str, name: &str, inputs: &[&str], outputs: &[&str], attrs: Vec<pb::AttributeProto>) -> pb::NodeProto {
    pb::NodeProto {
        op_type: op.into(),
        name: name.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        attribute: attrs,
        ..Default::default()
    }
}

fn int_attr(name: &str, v: i64) -> pb::AttributeProto {
    pb::AttributeProto { name: name.into(), r#type: 2, i: v, ..Default::default() }
}

/// Adds a `Slice` of `input` to its last row along `axis` (negative: from the end) as nodes `at` and `at + 1`
/// (nodes stay in topological order): behind a `KilnSliceBarrier` (kiln_ops::slice_barrier), so that tract's
/// declutter leaves the slice where it is instead of pushing it into the last decoder layer. Returns the new
/// tensor's name.
fn slice_last(graph: &mut pb::GraphProto, input: &str, axis: i64, tag: &str, at: usize) -> String {
    let out = format!("kiln_{tag}_last");
    let held = format!("kiln_{tag}_held");
    let (s, e, a) = (format!("kiln_{tag}_starts"), format!("kiln_{tag}_ends"), format!("kiln_{tag}_axes"));
    graph.initializer.push(i64_initializer(&s, -1));
    graph.initializer.push(i64_initializer(&e, i64::MAX));
    graph.initializer.push(i64_initializer(&a, axis));
    let mut barrier =
        node(kiln_ops::slice_barrier::OP_TYPE, &format!("kiln_{tag}_barrier"), &[input], &[&held], vec![]);
    barrier.domain = kiln_ops::slice_barrier::DOMAIN.into();
    let slice = node("Slice", &format!("kiln_{tag}_slice"), &[&held, &s, &e, &a], &[&out], vec![]);
    let at = at.min(graph.node.len());
    graph.node.insert(at, slice);
    graph.node.insert(at, barrier);
    out
}

/// Applies `options` to the model (see the module's documentation).
pub fn apply(proto: &mut pb::ModelProto, options: &GenerationOptions) -> Result<()> {
    if options.is_off() {
        return Ok(());
    }
    let graph = proto.graph.as_mut().ok_or_else(|| Error::invalid_model("the ONNX model has no graph"))?;
    let logits = logits_name(graph, options.logits.as_deref())?;
    let out_ix = graph.output.iter().position(|o| o.name == logits).unwrap_or(0);
    let rank = tensor_dims(&graph.output[out_ix]).map(|d| d.len());
    if rank.is_some_and(|r| r < 2) {
        return Err(Error::invalid_argument(format!("generation options: `{logits}` has rank {rank:?}, not 2 or 3")));
    }
    if options.next_token && graph.output.iter().any(|o| o.name == NEXT_TOKEN) {
        return Err(Error::invalid_argument(format!(
            "generation options: the model already has an output `{NEXT_TOKEN}`"
        )));
    }
    if options.last_logits_only {
        last_only(graph, &logits, out_ix)?;
    }
    if options.next_token {
        // [batch, seq, vocab] → last row → argmax over the vocabulary → [batch, 1]
        let end = graph.node.len();
        let last = slice_last(graph, &logits, -2, "next_token", end);
        graph.node.push(node(
            "ArgMax",
            "kiln_next_token_argmax",
            &[&last],
            &[NEXT_TOKEN],
            vec![int_attr("axis", -1), int_attr("keepdims", 0)],
        ));
        let mut dims = vec![];
        if let Some(d) = tensor_dims(&graph.output[out_ix]) {
            dims.extend(d.iter().take(d.len().saturating_sub(2)).cloned());
        }
        dims.push(fixed_dim(1));
        graph.output.push(pb::ValueInfoProto {
            name: NEXT_TOKEN.into(),
            r#type: Some(pb::TypeProto {
                value: Some(TypeValue::TensorType(pb::type_proto::Tensor {
                    elem_type: 7,
                    shape: Some(pb::TensorShapeProto { dim: dims }),
                })),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    Ok(())
}

/// Moves the language-model head onto the last position: walks back from the logits through shape-preserving
/// unary nodes and bias adds to the head (`MatMul`, com.microsoft `MatMulNBits`), slices its input to the last row.
fn last_only(graph: &mut pb::GraphProto, logits: &str, out_ix: usize) -> Result<()> {
    let producer: HashMap<String, usize> =
        graph.node.iter().enumerate().flat_map(|(i, n)| n.output.iter().map(move |o| (o.clone(), i))).collect();
    let initializers: HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let mut path = vec![logits.to_string()];
    let mut at = logits.to_string();
    let head = loop {
        let Some(&ix) = producer.get(&at) else {
            return Err(Error::invalid_argument(format!(
                "generation options: `{logits}` does not come from a MatMul head (stopped at `{at}`)"
            )));
        };
        let n = &graph.node[ix];
        match n.op_type.as_str() {
            "MatMul" | "MatMulNBits" if n.input.len() >= 2 => break ix,
            "Cast" | "Identity" | "Softcap" | "Tanh" | "Relu" => at = n.input[0].clone(),
            "Add" | "Mul" | "Div" if n.input.len() == 2 && initializers.contains(n.input[1].as_str()) => {
                at = n.input[0].clone()
            }
            other => {
                return Err(Error::invalid_argument(format!(
                    "generation options: `{logits}` comes from a {other} node, not a MatMul head"
                )))
            }
        }
        path.push(at.clone());
    };
    let a = graph.node[head].input[0].clone();
    let sliced = slice_last(graph, &a, -2, "head", head);
    // the head moved two places down
    graph.node[head + 2].input[0] = sliced;
    // the tensors between the head and the logits now have one row: drop their declared shapes
    let on_path: HashSet<&str> = path.iter().map(|s| s.as_str()).collect();
    graph.value_info.retain(|vi| !on_path.contains(vi.name.as_str()));
    if let Some(TypeValue::TensorType(tt)) = graph.output[out_ix].r#type.as_mut().and_then(|t| t.value.as_mut()) {
        if let Some(shape) = tt.shape.as_mut() {
            let r = shape.dim.len();
            if r >= 2 {
                shape.dim[r - 2] = fixed_dim(1);
            }
        }
    }
    Ok(())
}
