//! ONNX LayerNormalization (float32) computed as onnxruntime 1.32's CPU kernel does on x86-64 (the build in the PyPI
//! wheel: `LayerNormImpl`'s `ComputeJob`, compiled to AVX2 with fused multiply-adds and vectorised reductions):
//!
//! - mean: the row summed in float64 in four lanes (element `i` into lane `i % 4` over the whole blocks of four,
//!   reduced as `(l0 + l2) + (l1 + l3)`, then the remaining elements added in order), divided by `N` in float64 and
//!   rounded to float32;
//! - variance: `d = x - mean` in float32, `fma(d, d, acc)` in eight lanes over the whole blocks of eight, reduced as
//!   `((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7))`; of the remaining elements a block of four adds `d * d` in
//!   order and the last ones `fma(d, d, acc)`; divided by `N` (float32);
//! - `inv = 1 / sqrt(var + epsilon)` (float32), `y = fma((x - mean) * inv, scale, bias)` (`* scale` without bias).
//!
//! tract's decomposition (a float32 sum, `d * rsqrt(var + eps)`) lands an ulp away on most elements; in int8 models
//! (per-tensor dynamic quantization of the LayerNormalization output) such ulps flip uint8 codes of the next
//! DynamicQuantizeLinear and the flips compound over the layers (all-MiniLM-L6-v2 on a padded batch).
//!
//! onnxruntime's graph optimiser fuses some `Add` + LayerNormalization pairs into com.microsoft
//! SkipLayerNormalization, whose CPU kernel (scalar SSE code) has its own arithmetic: Welford's running mean and
//! squared deviation in float32, `y = (x - mean) / sqrt(var + epsilon) * scale + bias` without fused multiply-adds.
//! [`skip_row`] is that arithmetic; [`LayerNormArith::Skip`] selects it.
//!
//! Other element types, a stash type other than float32, scale or bias that are not exactly `X.shape[axis..]`-sized,
//! and nodes asking for the optional Mean / InvStdDev outputs keep tract's LayerNormalization.

use std::collections::HashMap;
use tract_onnx::model::ParsingContext;

use tract_onnx::pb::{GraphProto, NodeProto, TensorProto};
use tract_onnx::tract_hir::internal::*;

use crate::BuildResult;

pub fn build(ctx: &ParsingContext, node: &NodeProto) -> BuildResult {
    let (inner, extra) = crate::tract_builder(ctx, node)?;
    let Some(tract_ln) = inner.as_op().downcast_ref::<Box<dyn Expansion>>().cloned() else {
        return Ok((inner, extra));
    };
    let axis: i64 = node.get_attr_opt("axis")?.unwrap_or(-1);
    let epsilon: f32 = node.get_attr_opt("epsilon")?.unwrap_or(1e-5);
    let stash: i64 = node.get_attr_opt("stash_type")?.unwrap_or(1);
    let have_bias = node.input.len() == 3 && !node.input[2].is_empty();
    let extra_outputs = node.output.iter().skip(1).any(|o| !o.is_empty());
    let arith = if skip_fused(ctx, node) { LayerNormArith::Skip } else { LayerNormArith::Plain };
    let op = OrtLayerNormExpansion {
        tract_ln,
        axis,
        epsilon,
        usable: stash == 1 && !extra_outputs && node.input.len() >= 2,
        have_bias,
        arith,
    };
    Ok((expand(op), extra))
}

/// Whether onnxruntime's optimiser (SkipLayerNormFusion, on by default) turns this node and the `Add` feeding it into
/// SkipLayerNormalization: a float32 LayerNormalization fed by an `Add` that has no other consumer, is no graph output,
/// and adds two rank-3 tensors of the same shape as onnxruntime's shape inference names it (values and symbols; an
/// unknown dimension gets a fresh symbol, so e.g. the output of a Reshape to a computed shape never matches another
/// tensor). [`SymbolicShapes`] mirrors that inference for the operators of transformer encoders; where it does not
/// know an operator, it reports no shape and the node keeps the LayerNormalization arithmetic.
fn skip_fused(ctx: &ParsingContext, node: &NodeProto) -> bool {
    let Some(graph) = ctx.parent_graphs.last() else { return false };
    let Some(x) = node.input.first() else { return false };
    if graph.output.iter().any(|o| &o.name == x) {
        return false;
    }
    let consumers = graph.node.iter().flat_map(|n| n.input.iter()).filter(|i| *i == x).count();
    let Some(add) = graph.node.iter().find(|n| n.output.iter().any(|o| o == x)) else { return false };
    if consumers != 1 || add.op_type != "Add" || !crate::is_onnx_domain(add) || add.input.len() != 2 {
        return false;
    }
    let mut shapes = SymbolicShapes::new(graph);
    let (Some(a), Some(b)) = (shapes.shape(&add.input[0], 0), shapes.shape(&add.input[1], 0)) else { return false };
    let float = shapes.is_float(&add.input[0]);
    a.len() == 3 && a == b && float
}

/// An `ai.kiln` ExternalWeight node (an initializer left in the external data by the streaming import).
fn is_external_weight(node: &NodeProto) -> bool {
    node.domain == crate::external_weight::DOMAIN && node.op_type == crate::external_weight::OP_TYPE
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Dim {
    Value(i64),
    Symbol(String),
}

/// A small model of onnxruntime's (ONNX's) shape inference with symbolic dimensions, over one graph.
struct SymbolicShapes<'g> {
    graph: &'g GraphProto,
    memo: HashMap<String, Option<Vec<Dim>>>,
    fresh: usize,
}

impl<'g> SymbolicShapes<'g> {
    fn new(graph: &'g GraphProto) -> Self {
        SymbolicShapes { graph, memo: HashMap::new(), fresh: 0 }
    }

    fn fresh(&mut self) -> Dim {
        self.fresh += 1;
        Dim::Symbol(format!("unk__{}", self.fresh))
    }

    fn producer(&self, name: &str) -> Option<&'g NodeProto> {
        self.graph.node.iter().find(|n| n.output.iter().any(|o| o == name))
    }

    fn constant(&self, name: &str) -> Option<&'g TensorProto> {
        if let Some(t) = self.graph.initializer.iter().find(|t| t.name == name) {
            return Some(t);
        }
        let node = self.producer(name)?;
        if node.op_type != "Constant" {
            return None;
        }
        node.attribute.iter().find(|a| a.name == "value")?.t.as_ref()
    }

    fn constant_ints(&self, name: &str) -> Option<Vec<i64>> {
        let t = self.constant(name)?;
        if t.data_type != 7 {
            return None;
        }
        if !t.int64_data.is_empty() {
            return Some(t.int64_data.clone());
        }
        Some(t.raw_data.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect())
    }

    fn is_float(&self, name: &str) -> bool {
        // the elementwise chains feeding a LayerNormalization in float models; an initializer or graph input says so
        if let Some(t) = self.constant(name) {
            return t.data_type == 1;
        }
        if let Some(w) = self.producer(name).filter(|n| is_external_weight(n)) {
            return w.attribute.iter().find(|a| a.name == "data_type").is_some_and(|a| a.i == 1);
        }
        let declared = self.graph.input.iter().chain(&self.graph.value_info).find(|v| v.name == name);
        match declared.and_then(|v| v.r#type.as_ref()) {
            Some(t) => matches!(&t.value, Some(tract_onnx::pb::type_proto::Value::TensorType(tt)) if tt.elem_type == 1),
            None => true,
        }
    }

    fn shape(&mut self, name: &str, depth: usize) -> Option<Vec<Dim>> {
        if let Some(s) = self.memo.get(name) {
            return s.clone();
        }
        let s = if depth > 4000 { None } else { self.infer(name, depth + 1) };
        self.memo.insert(name.to_string(), s.clone());
        s
    }

    fn infer(&mut self, name: &str, depth: usize) -> Option<Vec<Dim>> {
        if let Some(t) = self.constant(name) {
            return Some(t.dims.iter().map(|d| Dim::Value(*d)).collect());
        }
        if let Some(v) = self.graph.input.iter().find(|v| v.name == name) {
            let Some(tract_onnx::pb::type_proto::Value::TensorType(tt)) = v.r#type.as_ref()?.value.as_ref() else {
                return None;
            };
            let dims = &tt.shape.as_ref()?.dim;
            return Some(
                dims.iter()
                    .map(|d| match &d.value {
                        Some(tract_onnx::pb::tensor_shape_proto::dimension::Value::DimValue(v)) => Dim::Value(*v),
                        Some(tract_onnx::pb::tensor_shape_proto::dimension::Value::DimParam(p)) if !p.is_empty() => {
                            Dim::Symbol(p.clone())
                        }
                        _ => self.fresh(),
                    })
                    .collect(),
            );
        }
        let node = self.producer(name)?;
        let output = node.output.iter().position(|o| o == name)?;
        let ints = |n: &NodeProto, attr: &str| n.attribute.iter().find(|a| a.name == attr).map(|a| a.ints.clone());
        let int = |n: &NodeProto, attr: &str| n.attribute.iter().find(|a| a.name == attr).map(|a| a.i);
        if is_external_weight(node) {
            // an initializer the streaming import left in the external data: its dims as the initializer's
            return Some(ints(node, "dims")?.into_iter().map(Dim::Value).collect());
        }
        match node.op_type.as_str() {
            "Cast"
            | "Erf"
            | "Sqrt"
            | "Relu"
            | "Tanh"
            | "Sigmoid"
            | "Neg"
            | "Abs"
            | "Exp"
            | "Log"
            | "Softmax"
            | "Identity"
            | "Not"
            | "Reciprocal"
            | "Gelu"
            | "FastGelu"
            | "DequantizeLinear"
            | "QuantizeLinear"
            | "LayerNormalization"
            | "SkipLayerNormalization"
            | "Dropout"
                if output == 0 =>
            {
                self.shape(node.input.first()?, depth)
            }
            "DynamicQuantizeLinear" => {
                if output == 0 {
                    self.shape(node.input.first()?, depth)
                } else {
                    Some(vec![])
                }
            }
            "Add" | "Sub" | "Mul" | "Div" | "Pow" | "Equal" | "Less" | "Greater" | "And" | "Or" | "Where" => {
                let mut shapes = vec![];
                for i in &node.input {
                    shapes.push(self.shape(i, depth)?);
                }
                self.broadcast(&shapes)
            }
            "MatMul" | "MatMulInteger" | "MatMulIntegerToFloat" => {
                let a = self.shape(node.input.first()?, depth)?;
                let b = self.shape(node.input.get(1)?, depth)?;
                if a.len() < 2 || b.len() < 2 {
                    return None;
                }
                let mut batch = self.broadcast(&[a[..a.len() - 2].to_vec(), b[..b.len() - 2].to_vec()])?;
                batch.push(a[a.len() - 2].clone());
                batch.push(b[b.len() - 1].clone());
                Some(batch)
            }
            "Transpose" => {
                let x = self.shape(node.input.first()?, depth)?;
                let perm = ints(node, "perm").unwrap_or_else(|| (0..x.len() as i64).rev().collect());
                perm.iter().map(|p| x.get(usize::try_from(*p).ok()?).cloned()).collect()
            }
            "Gather" => {
                let data = self.shape(node.input.first()?, depth)?;
                let indices = self.shape(node.input.get(1)?, depth)?;
                let axis = int(node, "axis").unwrap_or(0);
                let axis = usize::try_from(if axis < 0 { axis + data.len() as i64 } else { axis }).ok()?;
                let mut out = data.get(..axis)?.to_vec();
                out.extend(indices);
                out.extend(data.get(axis + 1..)?.iter().cloned());
                Some(out)
            }
            "Reshape" => {
                let x = self.shape(node.input.first()?, depth)?;
                if let Some(target) = self.constant_ints(node.input.get(1)?) {
                    let mut out: Vec<Option<Dim>> = target
                        .iter()
                        .enumerate()
                        .map(|(i, t)| match t {
                            0 => x.get(i).cloned(),
                            -1 => None,
                            v => Some(Dim::Value(*v)),
                        })
                        .collect();
                    let volume: Option<i64> =
                        x.iter().map(|d| if let Dim::Value(v) = d { Some(*v) } else { None }).product();
                    let known: Option<i64> = out
                        .iter()
                        .filter_map(|d| d.as_ref())
                        .map(|d| if let Dim::Value(v) = d { Some(*v) } else { None })
                        .product();
                    let missing = match (volume, known) {
                        (Some(v), Some(k)) if k > 0 && v % k == 0 => Some(Dim::Value(v / k)),
                        _ => None,
                    };
                    for d in out.iter_mut().filter(|d| d.is_none()) {
                        *d = Some(missing.clone().unwrap_or_else(|| self.fresh()));
                    }
                    return out.into_iter().collect();
                }
                let rank = match self.shape(node.input.get(1)?, depth)?.as_slice() {
                    [Dim::Value(r)] => usize::try_from(*r).ok()?,
                    _ => return None,
                };
                Some((0..rank).map(|_| self.fresh()).collect())
            }
            "ConstantOfShape" => {
                if let Some(target) = self.constant_ints(node.input.first()?) {
                    return Some(target.into_iter().map(Dim::Value).collect());
                }
                let rank = match self.shape(node.input.first()?, depth)?.as_slice() {
                    [Dim::Value(r)] => usize::try_from(*r).ok()?,
                    _ => return None,
                };
                Some((0..rank).map(|_| self.fresh()).collect())
            }
            "Expand" => {
                let x = self.shape(node.input.first()?, depth)?;
                if let Some(target) = self.constant_ints(node.input.get(1)?) {
                    return self.broadcast(&[x, target.into_iter().map(Dim::Value).collect()]);
                }
                let rank = match self.shape(node.input.get(1)?, depth)?.as_slice() {
                    [Dim::Value(r)] => usize::try_from(*r).ok()?.max(x.len()),
                    _ => return None,
                };
                Some((0..rank).map(|_| self.fresh()).collect())
            }
            "Slice" => {
                let x = self.shape(node.input.first()?, depth)?;
                Some(x.iter().map(|_| self.fresh()).collect())
            }
            "Shape" => {
                let x = self.shape(node.input.first()?, depth)?;
                Some(vec![Dim::Value(x.len() as i64)])
            }
            "Unsqueeze" => {
                let x = self.shape(node.input.first()?, depth)?;
                let axes = match ints(node, "axes") {
                    Some(a) if !a.is_empty() => a,
                    _ => self.constant_ints(node.input.get(1)?)?,
                };
                let rank = (x.len() + axes.len()) as i64;
                let mut axes: Vec<i64> = axes.iter().map(|a| if *a < 0 { a + rank } else { *a }).collect();
                axes.sort_unstable();
                let mut out = x;
                for a in axes {
                    out.insert(usize::try_from(a).ok()?.min(out.len()), Dim::Value(1));
                }
                Some(out)
            }
            "Concat" => {
                let mut total = 0i64;
                for i in &node.input {
                    match self.shape(i, depth)?.as_slice() {
                        [Dim::Value(v)] => total += v,
                        _ => return None,
                    }
                }
                Some(vec![Dim::Value(total)])
            }
            _ => None,
        }
    }

    /// Multidirectional broadcasting; differing symbols give a fresh one.
    fn broadcast(&mut self, shapes: &[Vec<Dim>]) -> Option<Vec<Dim>> {
        let rank = shapes.iter().map(|s| s.len()).max()?;
        let mut out = Vec::with_capacity(rank);
        for axis in 0..rank {
            let dims: Vec<&Dim> =
                shapes.iter().filter_map(|s| (axis + s.len()).checked_sub(rank).map(|i| &s[i])).collect();
            let not_one: Vec<&Dim> = dims.iter().copied().filter(|d| **d != Dim::Value(1)).collect();
            let values: Vec<i64> =
                not_one.iter().filter_map(|d| if let Dim::Value(v) = d { Some(*v) } else { None }).collect();
            let dim = if not_one.is_empty() {
                Dim::Value(1)
            } else if let Some(v) = values.first() {
                if values.iter().any(|w| w != v) {
                    return None;
                }
                Dim::Value(*v)
            } else if not_one.iter().all(|d| *d == not_one[0]) {
                not_one[0].clone()
            } else {
                self.fresh()
            };
            out.push(dim);
        }
        Some(out)
    }
}

/// Which of onnxruntime's two CPU arithmetics a node follows.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum LayerNormArith {
    /// The LayerNormalization kernel.
    Plain,
    /// The com.microsoft SkipLayerNormalization kernel (after onnxruntime fused `Add` + LayerNormalization).
    Skip,
}

#[derive(Debug, Clone)]
struct OrtLayerNormExpansion {
    tract_ln: Box<dyn Expansion>,
    axis: i64,
    epsilon: f32,
    usable: bool,
    have_bias: bool,
    arith: LayerNormArith,
}

impl Expansion for OrtLayerNormExpansion {
    fn name(&self) -> StaticName {
        "LayerNorm".into()
    }

    fn nboutputs(&self) -> TractResult<usize> {
        Expansion::nboutputs(self.tract_ln.as_ref())
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        Expansion::rules(self.tract_ln.as_ref(), s, inputs, outputs)
    }

    fn wire(&self, prefix: &str, model: &mut TypedModel, inputs: &[OutletId]) -> TractResult<TVec<OutletId>> {
        if let Some(op) = self.typed_op(model, inputs)? {
            return model.wire_node(prefix, op, inputs);
        }
        Expansion::wire(self.tract_ln.as_ref(), prefix, model, inputs)
    }
}

impl OrtLayerNormExpansion {
    /// kiln's op where the node is float32 with scale (and bias) of exactly the normalised size.
    fn typed_op(&self, model: &TypedModel, inputs: &[OutletId]) -> TractResult<Option<OrtLayerNorm>> {
        if !self.usable || inputs.len() != 2 + self.have_bias as usize {
            return Ok(None);
        }
        let x = model.outlet_fact(inputs[0])?;
        if x.datum_type != f32::datum_type() {
            return Ok(None);
        }
        let rank = x.rank() as i64;
        let axis = if self.axis < 0 { self.axis + rank } else { self.axis };
        if axis < 0 || axis >= rank {
            return Ok(None);
        }
        let axis = axis as usize;
        let Some(norm) = x.shape[axis..].iter().map(|d| d.to_usize().ok()).collect::<Option<Vec<usize>>>() else {
            return Ok(None);
        };
        let norm_size: usize = norm.iter().product();
        for input in &inputs[1..] {
            let fact = model.outlet_fact(*input)?;
            let Some(dims) = fact.shape.as_concrete() else { return Ok(None) };
            let trailing = dims.len() <= norm.len() && dims.iter().rev().zip(norm.iter().rev()).all(|(a, b)| a == b);
            if fact.datum_type != f32::datum_type() || dims.iter().product::<usize>() != norm_size || !trailing {
                return Ok(None);
            }
        }
        Ok(Some(OrtLayerNorm { axis, epsilon: self.epsilon, arith: self.arith, tract_ln: self.tract_ln.clone() }))
    }
}

/// LayerNormalization over the axes from `axis` on, float32, onnxruntime's arithmetic.
#[derive(Debug, Clone)]
pub struct OrtLayerNorm {
    pub axis: usize,
    pub epsilon: f32,
    pub arith: LayerNormArith,
    /// tract's LayerNormalization for the same node, which [`use_tract_layer_norm`] wires back.
    tract_ln: Box<dyn Expansion>,
}

impl PartialEq for OrtLayerNorm {
    fn eq(&self, other: &Self) -> bool {
        self.axis == other.axis && self.epsilon.to_bits() == other.epsilon.to_bits() && self.arith == other.arith
    }
}

/// Replaces every [`OrtLayerNorm`] of `model` by tract's decomposition of the node (reductions and elementwise ops);
/// returns how many. (The WebGPU lowering has kernels for [`OrtLayerNorm`] itself, onnxruntime's arithmetic
/// included, so kiln's passes no longer call this.)
pub fn use_tract_layer_norm(model: &mut TypedModel) -> TractResult<usize> {
    let ids: Vec<usize> = model.nodes().iter().filter(|n| n.op_is::<OrtLayerNorm>()).map(|n| n.id).collect();
    for id in &ids {
        let node = model.node(*id);
        let Some(op) = node.op_as::<OrtLayerNorm>() else { continue };
        let mut patch = TypedModelPatch::default();
        let taps = patch.taps(model, &node.inputs)?;
        let wires = Expansion::wire(op.tract_ln.as_ref(), &node.name, &mut patch.model, &taps)?;
        ensure!(!wires.is_empty(), "tract's LayerNormalization wired no output");
        patch.shunt_outside(model, OutletId::new(*id, 0), wires[0])?;
        patch.apply(model)?;
    }
    Ok(ids.len())
}

impl std::hash::Hash for OrtLayerNorm {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.axis.hash(state);
        self.epsilon.to_bits().hash(state);
        self.arith.hash(state);
    }
}

impl Eq for OrtLayerNorm {}

impl Op for OrtLayerNorm {
    fn name(&self) -> StaticName {
        "LayerNorm".into()
    }
    fn info(&self) -> TractResult<Vec<String>> {
        let kernel = match self.arith {
            LayerNormArith::Plain => "LayerNormalization",
            LayerNormArith::Skip => "SkipLayerNormalization",
        };
        Ok(vec![format!("axis {}.., epsilon {}, onnxruntime's {kernel} arithmetic", self.axis, self.epsilon)])
    }
    op_as_typed_op!();
}

impl EvalOp for OrtLayerNorm {
    op_out_of_plan!();
    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        ensure!(inputs.len() == 2 || inputs.len() == 3, "LayerNormalization takes 2 or 3 inputs");
        let x = &inputs[0];
        ensure!(x.datum_type() == f32::datum_type(), "LayerNormalization: float32 expected, got {:?}", x.datum_type());
        let shape = x.shape().to_vec();
        ensure!(self.axis < shape.len(), "LayerNormalization: axis {} for rank {}", self.axis, shape.len());
        let n: usize = shape[self.axis..].iter().product();
        let xs = x.try_as_plain_ram()?;
        let xs = xs.as_slice::<f32>()?;
        let gs = inputs[1].try_as_plain_ram()?;
        let gs = gs.as_slice::<f32>()?;
        ensure!(gs.len() == n, "LayerNormalization: scale has {} elements, the normalised size is {n}", gs.len());
        let bs = match inputs.get(2) {
            Some(b) => Some(b.try_as_plain_ram()?),
            None => None,
        };
        let bs = match &bs {
            Some(b) => Some(b.as_slice::<f32>()?),
            None => None,
        };
        if let Some(b) = bs {
            ensure!(b.len() == n, "LayerNormalization: bias has {} elements, the normalised size is {n}", b.len());
        }
        let mut y = Tensor::zero_dt(f32::datum_type(), &shape)?;
        if n > 0 {
            let mut ys = y.try_as_plain_ram_mut()?;
            let ys = ys.as_slice_mut::<f32>()?;
            for (xr, yr) in xs.chunks_exact(n).zip(ys.chunks_exact_mut(n)) {
                match self.arith {
                    LayerNormArith::Plain => plain_row(xr, gs, bs, self.epsilon, yr),
                    LayerNormArith::Skip => skip_row(xr, gs, bs, self.epsilon, yr),
                }
            }
        }
        Ok(tvec!(y.into_tvalue()))
    }
}

impl TypedOp for OrtLayerNorm {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::datum_type().fact(inputs[0].shape.clone())))
    }
    as_op!();
}

/// One row, onnxruntime's LayerNormalization kernel (with the FMA instructions inlined where the CPU has them).
pub fn plain_row(x: &[f32], scale: &[f32], bias: Option<&[f32]>, epsilon: f32, y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports FMA (checked just above).
        unsafe { plain_row_fma(x, scale, bias, epsilon, y) };
        return;
    }
    plain_row_impl(x, scale, bias, epsilon, y)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
unsafe fn plain_row_fma(x: &[f32], scale: &[f32], bias: Option<&[f32]>, epsilon: f32, y: &mut [f32]) {
    plain_row_impl(x, scale, bias, epsilon, y)
}

#[inline(always)]
fn plain_row_impl(x: &[f32], scale: &[f32], bias: Option<&[f32]>, epsilon: f32, y: &mut [f32]) {
    let n = x.len();
    let fours = n / 4 * 4;
    let mut l = [0f64; 4];
    for block in x[..fours].chunks_exact(4) {
        for (acc, v) in l.iter_mut().zip(block) {
            *acc += *v as f64;
        }
    }
    let mut sum = (l[0] + l[2]) + (l[1] + l[3]);
    for v in &x[fours..] {
        sum += *v as f64;
    }
    let mean = (sum / n as f64) as f32;

    let eights = n / 8 * 8;
    let mut a = [0f32; 8];
    for block in x[..eights].chunks_exact(8) {
        for (acc, v) in a.iter_mut().zip(block) {
            let d = v - mean;
            *acc = d.mul_add(d, *acc);
        }
    }
    let t: [f32; 4] = std::array::from_fn(|i| a[i + 4] + a[i]);
    let mut acc = (t[0] + t[2]) + (t[1] + t[3]);
    let mut i = eights;
    if n - i >= 4 {
        for v in &x[i..i + 4] {
            let d = v - mean;
            acc += d * d;
        }
        i += 4;
    }
    for v in &x[i..] {
        let d = v - mean;
        acc = d.mul_add(d, acc);
    }
    let var = acc / n as f32;
    let inv = 1.0 / (var + epsilon).sqrt();
    match bias {
        Some(b) => {
            for (((yv, xv), g), b) in y.iter_mut().zip(x).zip(scale).zip(b) {
                *yv = ((xv - mean) * inv).mul_add(*g, *b);
            }
        }
        None => {
            for ((yv, xv), g) in y.iter_mut().zip(x).zip(scale) {
                *yv = (xv - mean) * inv * g;
            }
        }
    }
}

/// One row, onnxruntime's SkipLayerNormalization kernel on the already summed input (`input + skip (+ bias)`):
/// Welford's running mean and squared deviation, no fused multiply-adds.
pub fn skip_row(x: &[f32], scale: &[f32], bias: Option<&[f32]>, epsilon: f32, y: &mut [f32]) {
    let n = x.len();
    let (mut mean, mut m2) = (0f32, 0f32);
    for (h, v) in x.iter().enumerate() {
        let delta = v - mean;
        mean += delta / (h + 1) as f32;
        m2 += (v - mean) * delta;
    }
    let std = (m2 / n as f32 + epsilon).sqrt();
    match bias {
        Some(b) => {
            for (((yv, xv), g), b) in y.iter_mut().zip(x).zip(scale).zip(b) {
                *yv = (xv - mean) / std * g + b;
            }
        }
        None => {
            for ((yv, xv), g) in y.iter_mut().zip(x).zip(scale) {
                *yv = (xv - mean) / std * g;
            }
        }
    }
}
