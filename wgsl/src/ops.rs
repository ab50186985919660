//! The ops the GPU lowering places in tract's model. Each keeps its CPU semantics (tract evaluates the lowered
//! model as it did the original: [`GpuOp`] through the op it replaced, the transfers as identities), so the model
//! stays a valid tract model; kiln's GPU executor recognises them and runs the kernels instead.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::array::{
    CumSum, Gather, GatherNd, MultiBroadcastTo, Pad, PadMode, Range, Slice, Tile, Trilu, TypedConcat,
};
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::cast::Cast;
use tract_onnx::tract_core::ops::downsample::Downsample;
use tract_onnx::tract_core::ops::einsum::prefix_matmul::PrefixMatMul;
use tract_onnx::tract_core::ops::element_wise::ElementWiseOp;
use tract_onnx::tract_core::ops::logic::Iff;
use tract_onnx::tract_core::ops::math::PowConst;
use tract_onnx::tract_core::ops::nn::{GeluApproximate, GeluExact};
use tract_onnx::tract_core::ops::nn::{Reduce, Reducer, RmsNorm, Softmax, SoftmaxKind};

use crate::context::Caps;
use crate::kernels::{cast_supported, BinaryOp, Kernel, PadKind, ReduceOp, UnaryOp, View, MAX_BATCH_RANK, MAX_RANK};

/// A node computed by a GPU kernel. `cpu` is the op it replaced: the CPU reference and tract's evaluation.
#[derive(Debug, Clone)]
pub struct GpuOp {
    pub kernel: Kernel,
    pub cpu: Box<dyn TypedOp>,
}

impl PartialEq for GpuOp {
    fn eq(&self, other: &Self) -> bool {
        self.kernel == other.kernel && self.cpu.as_op() == other.cpu.as_op()
    }
}
impl Eq for GpuOp {}

impl Op for GpuOp {
    fn name(&self) -> StaticName {
        format!("Gpu{}", self.kernel.name()).into()
    }
    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("kernel: {:?}, replaces {}", self.kernel, self.cpu.name())])
    }
    op_as_typed_op!();
}

impl EvalOp for GpuOp {
    // never folded into a constant: the GPU executor owns this node
    not_out_of_plan!();
    fn eval(&self, ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        self.cpu.eval(ctx, inputs)
    }
}

impl TypedOp for GpuOp {
    as_op!();
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        self.cpu.output_facts(inputs)
    }
}

/// Host → device transfer (an identity for tract).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct ToDevice;

/// Device → host transfer (an identity for tract).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct ToHost;

macro_rules! transfer_op {
    ($op:ident, $name:literal) => {
        impl Op for $op {
            fn name(&self) -> StaticName {
                $name.into()
            }
            op_as_typed_op!();
        }
        impl EvalOp for $op {
            not_out_of_plan!();
            fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
                Ok(inputs)
            }
        }
        impl TypedOp for $op {
            as_op!();
            fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
                ensure!(inputs.len() == 1, concat!($name, " takes one input"));
                let mut f = inputs[0].without_value();
                f.konst = None;
                Ok(tvec!(f))
            }
        }
    };
}
transfer_op!(ToDevice, "ToDevice");
transfer_op!(ToHost, "ToHost");

/// The kernel for a node, or why it stays on the CPU.
pub fn kernel_for(model: &TypedModel, node: &TypedNode, caps: &Caps) -> Result<Kernel, String> {
    kernel_at_depth(model, node, caps, 0)
}

/// How far [`kernel_for`] follows integer results downstream.
const INT_CHAIN_DEPTH: usize = 8;

/// [`kernel_for`], `depth` consumers down an integer chain. An integer result (shape, position and mask arithmetic,
/// mostly) computed on the GPU that a CPU node then needs costs a readback and a submit in the middle of the run:
/// integer results go to the GPU only when no consumer down the chain stays on the CPU.
fn kernel_at_depth(model: &TypedModel, node: &TypedNode, caps: &Caps, depth: usize) -> Result<Kernel, String> {
    let kernel = kernel_of(model, node, caps)?;
    if matches!(node.outputs[0].fact.datum_type, DatumType::I64 | DatumType::I32) {
        if depth >= INT_CHAIN_DEPTH {
            return Err("integer chain too deep to place".into());
        }
        for s in &node.outputs[0].successors {
            if kernel_at_depth(model, model.node(s.node), caps, depth + 1).is_err() {
                return Err("integer result a CPU node needs (shape arithmetic)".into());
            }
        }
    }
    Ok(kernel)
}

fn kernel_of(model: &TypedModel, node: &TypedNode, caps: &Caps) -> Result<Kernel, String> {
    if let Some(k) = crate::quant::kernel_for(model, node) {
        return check(model, node, caps, k?);
    }
    let kernel = if let Some(bin) = node.op_as::<TypedBinOp>() {
        let k = BinaryOp::from_tract(bin.0.name()).ok_or_else(|| format!("no kernel for binary {}", bin.0.name()))?;
        Kernel::Binary(k)
    } else if let Some(ew) = node.op_as::<ElementWiseOp>() {
        let k = if let Some(p) = ew.0.downcast_ref::<PowConst>() {
            UnaryOp::PowConst(p.exponent.to_bits())
        } else if let Some(g) = ew.0.downcast_ref::<GeluApproximate>() {
            UnaryOp::GeluApprox { fast: g.fast_impl }
        } else if ew.0.downcast_ref::<GeluExact>().is_some() {
            UnaryOp::GeluExact
        } else {
            UnaryOp::from_tract(&ew.0.name()).ok_or_else(|| format!("no kernel for {}", ew.0.name()))?
        };
        Kernel::Unary(k)
    } else if let Some(mm) = node.op_as::<PrefixMatMul>() {
        if mm.quantize_output.is_some() || mm.operating_dt.is_some_and(|dt| dt != DatumType::F32) {
            return Err("quantized matmul".into());
        }
        Kernel::MatMul {
            transpose_a: mm.transpose_a,
            transpose_b: mm.transpose_b,
            transpose_c: mm.transpose_c,
            exact: false,
        }
    } else if let Some(q) = node.op_as::<kiln_ops::matmul_nbits::PackedMatMulNBits>() {
        Kernel::QMatMul(crate::qmatmul::QMatMul::for_op(q)?)
    } else if let Some(ax) = node.op_as::<AxisOp>() {
        Kernel::View(match ax {
            AxisOp::Add(a) => View::AddAxis(*a),
            AxisOp::Rm(a) => View::RmAxis(*a),
            AxisOp::Reshape(at, from, to) => View::Reshape { at: *at, from_len: from.len(), to: to.to_vec() },
            AxisOp::Move(from, to) => {
                // moving an axis only past axes of size 1 (or moving one of size 1) keeps the memory order: a view
                let dims = &model.outlet_fact(node.inputs[0]).map_err(|e| e.to_string())?.shape;
                let (lo, hi) = ((*from).min(*to), (*from).max(*to));
                let in_order = dims.get(*from).is_some_and(|d| d.is_one())
                    || (lo..=hi).filter(|i| i != from).all(|i| dims.get(i).is_some_and(|d| d.is_one()));
                if !in_order || hi >= dims.len() {
                    return check(model, node, caps, Kernel::MoveAxis { from: *from, to: *to });
                }
                let to = node.outputs[0].fact.shape.to_tvec().into_vec();
                View::Reshape { at: 0, from_len: dims.len(), to }
            }
        })
    } else if let Some(b) = node.op_as::<MultiBroadcastTo>() {
        Kernel::Broadcast { shape: b.shape.iter().cloned().collect() }
    } else if let Some(sl) = node.op_as::<Slice>() {
        Kernel::Slice { axis: sl.axis, start: sl.start.clone(), end: sl.end.clone() }
    } else if let Some(c) = node.op_as::<TypedConcat>() {
        Kernel::Concat { axis: c.axis, inputs: node.inputs.len() }
    } else if let Some(r) = node.op_as::<Reduce>() {
        let op = match r.reducer {
            Reducer::Sum => ReduceOp::Sum,
            Reducer::Prod => ReduceOp::Prod,
            Reducer::Max => ReduceOp::Max,
            Reducer::Min => ReduceOp::Min,
            Reducer::MeanOfSquares => ReduceOp::MeanOfSquares,
            Reducer::ArgMax(last) => ReduceOp::ArgMax { last },
            Reducer::ArgMin(last) => ReduceOp::ArgMin { last },
            other => return Err(format!("no kernel for reducer {other:?}")),
        };
        let mut axes: Vec<usize> = r.axes.to_vec();
        axes.sort_unstable();
        axes.dedup();
        if axes.is_empty() {
            return Err("reduction over no axis".into());
        }
        Kernel::Reduce { axes, op }
    } else if let Some(c) = node.op_as::<Cast>() {
        let from = model.outlet_fact(node.inputs[0]).map_err(|e| e.to_string())?.datum_type;
        if !cast_supported(from, c.to) {
            return Err(format!("cast {from:?} to {:?}", c.to));
        }
        Kernel::Unary(UnaryOp::Cast { from, to: c.to })
    } else if let Some(g) = node.op_as::<Gather>() {
        if g.output_type.is_some() {
            return Err("gather with an output type".into());
        }
        Kernel::Gather { axis: g.axis }
    } else if let Some(g) = node.op_as::<GatherNd>() {
        Kernel::GatherNd { batch_dims: g.batch_dims }
    } else if let Some(d) = node.op_as::<Downsample>() {
        if d.stride == 0 || (d.stride < 0 && d.modulo != 0) {
            return Err(format!("downsample by {} from {}", d.stride, d.modulo));
        }
        Kernel::Downsample { axis: d.axis, stride: d.stride, modulo: d.modulo }
    } else if let Some(p) = node.op_as::<Pad>() {
        if !matches!(p.mode, PadMode::Constant(_)) {
            // the CPU reads a reflection wider than the axis from the padded border: keep it there
            let fact = model.outlet_fact(node.inputs[0]).map_err(|e| e.to_string())?;
            for (d, (a, b)) in fact.shape.iter().zip(&p.pads) {
                let wide = |n: usize| (p.mode == PadMode::Reflect && (*a >= n || *b >= n)) || n == 0;
                if d.to_usize().is_ok_and(|n| (*a > 0 || *b > 0) && wide(n)) {
                    return Err(format!("{:?} padding by {:?} of an axis of {d}", p.mode, (a, b)));
                }
            }
        }
        let mode = match &p.mode {
            PadMode::Reflect => PadKind::Reflect,
            PadMode::Edge => PadKind::Edge,
            PadMode::Constant(v) => {
                let dt = model.outlet_fact(node.inputs[0]).map_err(|e| e.to_string())?.datum_type;
                PadKind::Constant(pad_bits(v, dt)?)
            }
        };
        Kernel::Pad { pads: p.pads.clone(), mode }
    } else if let Some(t) = node.op_as::<Tile>() {
        Kernel::Tile { multipliers: t.multipliers.to_vec() }
    } else if let Some(t) = node.op_as::<Trilu>() {
        Kernel::Trilu { upper: t.upper }
    } else if node.op_is::<Range>() {
        // the length must come from the run's symbols (an input's dims), not from the values on the GPU
        let len = node.outputs[0].fact.shape.iter().next().cloned().ok_or("a Range without a length")?;
        let mut known = std::collections::HashSet::new();
        for i in model.input_outlets().map_err(|e| e.to_string())? {
            let f = model.outlet_fact(*i).map_err(|e| e.to_string())?;
            for d in f.shape.iter() {
                known.extend(d.symbols());
            }
        }
        if !len.symbols().iter().all(|s| known.contains(s)) {
            return Err(format!("Range of a length only its values tell ({len})"));
        }
        Kernel::Range { len }
    } else if let Some(c) = node.op_as::<CumSum>() {
        Kernel::CumSum { axis: c.axis, exclusive: c.exclusive, reverse: c.reverse }
    } else if node.op_is::<Iff>() {
        Kernel::Where
    } else if let Some(n) = node.op_as::<RmsNorm>() {
        let eps = n.eps.cast_to_scalar::<f32>().map_err(|e| e.to_string())?;
        Kernel::RmsNorm { axis: n.axis, eps: eps.to_bits() }
    } else if let Some(sm) = node.op_as::<Softmax>() {
        if sm.axes.len() != 1 || sm.quant_output_dt.is_some() {
            return Err("softmax over several axes or quantized".into());
        }
        Kernel::Softmax { axis: sm.axes[0], log: sm.kind == SoftmaxKind::LogSoftmax, exact: false }
    } else if let Some(a) = node.op_as::<crate::attention::AttentionYOp>() {
        crate::attention::kernel_for(model, node, a)?
    } else if let Some(d) = node.op_as::<kiln_ops::dim_values::DimValues>() {
        if d.values.len() > crate::kernels::MAX_DIM_VALUES {
            return Err(format!("more than {} dim values", crate::kernels::MAX_DIM_VALUES));
        }
        Kernel::DimValues { shape: d.shape.to_vec(), values: d.values.clone() }
    } else if let Some(d) = node.op_as::<kiln_ops::dim_values::DimRange>() {
        Kernel::DimRange { start: d.start.clone(), step: d.step.clone(), len: d.len.clone() }
    } else if let Some(r) = node.op_as::<crate::attention::RotaryOp>() {
        Kernel::Rotary(crate::attention::RotarySpec {
            config: r.config.clone(),
            second: None,
            append: false,
            k_out: false,
        })
    } else if let Some(g) = node.op_as::<crate::msft::GqaKvOp>() {
        Kernel::GqaKv(crate::msft::GqaKvSpec { op: g.clone() })
    } else if let Some(n) = node.op_as::<crate::msft::NormOp>() {
        Kernel::Norm(crate::msft::NormSpec { op: n.clone() })
    } else if let Some(n) = node.op_as::<kiln_ops::layer_norm::OrtLayerNorm>() {
        Kernel::OrtLayerNorm(crate::msft::OrtLayerNormSpec::from_op(n, node.inputs.len()))
    } else {
        // shape arithmetic (tract's TDim values) is host work, whatever op wraps it
        if node.outputs.iter().any(|o| o.fact.datum_type == DatumType::TDim) {
            return Err("element type TDim".into());
        }
        return Err(format!("no kernel for {}", node.op.name()));
    };
    check(model, node, caps, kernel)
}

/// A Pad constant's bits as the GPU stores `dt` (f32; bool as f32 0/1; i32 / i64 as i32).
fn pad_bits(v: &Tensor, dt: DatumType) -> Result<u32, String> {
    let err = |e: TractError| e.to_string();
    Ok(match dt {
        DatumType::F32 => v.cast_to_scalar::<f32>().map_err(err)?.to_bits(),
        DatumType::Bool => if v.cast_to_scalar::<bool>().map_err(err)? { 1f32 } else { 0f32 }.to_bits(),
        DatumType::I32 | DatumType::I64 => {
            let x = v.cast_to_scalar::<i64>().map_err(err)?;
            i32::try_from(x).map_err(|_| format!("pad value {x} does not fit the GPU's i32"))? as u32
        }
        other => return Err(format!("element type {other:?}")),
    })
}

/// The checks every kernel shares: arity, element type, rank, size.
fn check(model: &TypedModel, node: &TypedNode, caps: &Caps, kernel: Kernel) -> Result<Kernel, String> {
    if node.inputs.len() != kernel.arity() || node.outputs.len() != 1 {
        return Err("arity".into());
    }
    let mut facts = vec![];
    for i in &node.inputs {
        facts.push(model.outlet_fact(*i).map_err(|e| e.to_string())?.clone());
    }
    facts.push(node.outputs[0].fact.clone());
    let dts: Vec<DatumType> = facts.iter().map(|f| f.datum_type).collect();
    if let Some((out, ins)) = dts.split_last() {
        if kernel.output_dt(ins) != Some(*out) {
            let odd = dts
                .iter()
                .find(|d| !matches!(d, DatumType::F32 | DatumType::Bool | DatumType::I32 | DatumType::I64))
                .unwrap_or(out);
            return Err(format!("element type {odd:?}"));
        }
    }
    for f in &facts {
        if !f.is_plain() {
            return Err("not a plain tensor".into());
        }
        if f.rank() > MAX_RANK {
            return Err(format!("rank {}", f.rank()));
        }
        if let Some(n) = f.shape.as_concrete().map(|s| s.iter().product::<usize>()) {
            if (n * crate::exec::gpu_size_of(f.datum_type)) as u64 > caps.max_storage_binding {
                return Err(format!("shape too large ({n} elements over the adapter's storage binding limit)"));
            }
        }
    }
    if let Kernel::MatMul { .. } = kernel {
        if facts[0].rank() != facts[1].rank() || facts[0].rank() < 2 || facts[0].rank() - 2 > MAX_BATCH_RANK {
            return Err("matmul operand ranks".into());
        }
    }
    Ok(kernel)
}
