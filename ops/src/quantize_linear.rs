//! ONNX DequantizeLinear / QuantizeLinear where tract 0.23.9 has no implementation: blocked quantization
//! (`block_size`, opset 21) and 16-bit integers (uint16 / int16 zero points or `output_dtype`). Every other form
//! (per tensor or per axis, 8-bit or int32) keeps tract's builder.
//!
//! Both become plain elementwise chains on the typed model, computed in float32 exactly as the spec writes them (so
//! the GPU lowering runs them with its elementwise kernels):
//! - DequantizeLinear: `y = (f32(x) - f32(zero_point)) · scale`, in the scale's type;
//! - QuantizeLinear: `y = saturate(round_half_to_even(x / scale) + zero_point)`, in the zero point's type (or
//!   `output_dtype`, else uint8).
//!
//! `scale` and `zero_point` are a scalar (per tensor), a 1-D tensor along `axis` (per axis), or, with `block_size`,
//! the input's shape with `axis` cut to `ceil(dim / block_size)`: each value then covers `block_size` consecutive
//! elements along `axis` (expanded by broadcast, reshape and slice; constant-folded for constant parameters).

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_core::ops::array::{MultiBroadcastTo, Slice};
use tract_onnx::tract_core::ops::cast::cast;
use tract_onnx::tract_core::ops::change_axes::wire_with_rank_broadcast;
use tract_onnx::tract_core::ops::math;
use tract_onnx::tract_hir::internal::*;

use crate::BuildResult;

const UINT8: i32 = 2;
const INT8: i32 = 3;
const UINT16: i32 = 4;
const INT16: i32 = 5;
const INT32: i32 = 6;

fn datum_of(elem_type: i32) -> Option<DatumType> {
    Some(match elem_type {
        UINT8 => DatumType::U8,
        INT8 => DatumType::I8,
        UINT16 => DatumType::U16,
        INT16 => DatumType::I16,
        INT32 => DatumType::I32,
        _ => return None,
    })
}

/// The ONNX element type of a value of the model's graphs, where the model declares it.
fn elem_type_of(ctx: &ParsingContext, name: &str) -> Option<i32> {
    use tract_onnx::pb::type_proto::Value;
    let graphs = ctx.model.graph.iter().chain(ctx.parent_graphs.iter().copied());
    for g in graphs {
        if let Some(t) = g.initializer.iter().find(|t| t.name == name) {
            return Some(t.data_type);
        }
        for vi in g.input.iter().chain(&g.value_info).chain(&g.output) {
            if vi.name == name {
                if let Some(Value::TensorType(t)) = vi.r#type.as_ref().and_then(|t| t.value.as_ref()) {
                    return Some(t.elem_type);
                }
            }
        }
        for n in &g.node {
            if n.op_type == "Constant" && n.output.first().map(|o| o.as_str()) == Some(name) {
                if let Some(t) = n.attribute.iter().find(|a| a.name == "value").and_then(|a| a.t.as_ref()) {
                    return Some(t.data_type);
                }
            }
        }
    }
    None
}

fn is_16_bit(t: Option<i32>) -> bool {
    matches!(t, Some(UINT16) | Some(INT16))
}

pub fn build_dequantize(ctx: &ParsingContext, node: &NodeProto) -> BuildResult {
    build(ctx, node, false)
}

pub fn build_quantize(ctx: &ParsingContext, node: &NodeProto) -> BuildResult {
    build(ctx, node, true)
}

fn build(ctx: &ParsingContext, node: &NodeProto, quantize: bool) -> BuildResult {
    let block_size: i64 = node.get_attr_opt("block_size")?.unwrap_or(0);
    let output_dtype: i64 = node.get_attr_opt("output_dtype")?.unwrap_or(0);
    let zp = node.input.get(2).filter(|s| !s.is_empty()).cloned();
    let zp_type = zp.as_deref().and_then(|z| elem_type_of(ctx, z));
    // DequantizeLinear's integer input decides its type too
    let x_type = if quantize { None } else { node.input.first().and_then(|x| elem_type_of(ctx, x)) };
    let sixteen = is_16_bit(zp_type) || is_16_bit(x_type) || (quantize && is_16_bit(Some(output_dtype as i32)));
    if block_size == 0 && !sixteen {
        return crate::tract_builder(ctx, node);
    }
    ensure!(block_size >= 0, "{} node `{}`: block_size {block_size}", node.op_type, node.name);
    let out = if quantize {
        let t = zp_type.or((output_dtype != 0).then_some(output_dtype as i32)).unwrap_or(UINT8);
        Some(datum_of(t).ok_or_else(|| format_err!("{}: output type {t} is not supported", node.op_type))?)
    } else {
        None
    };
    let op = QdqLinear {
        quantize,
        axis: node.get_attr_opt("axis")?.unwrap_or(1),
        block_size: block_size as usize,
        has_zero_point: zp.is_some(),
        out,
    };
    Ok((expand(op), vec![]))
}

/// DequantizeLinear (`quantize` false) or QuantizeLinear as an elementwise chain.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
pub struct QdqLinear {
    pub quantize: bool,
    pub axis: i64,
    pub block_size: usize,
    pub has_zero_point: bool,
    /// QuantizeLinear's output type.
    pub out: Option<DatumType>,
}

impl QdqLinear {
    /// `p` (a scale or zero point, as f32) broadcastable against `x` of rank `rank`.
    fn expand_param(&self, prefix: &str, model: &mut TypedModel, x: OutletId, p: OutletId) -> TractResult<OutletId> {
        let x_fact = model.outlet_fact(x)?.clone();
        let rank = x_fact.rank();
        let p_fact = model.outlet_fact(p)?.clone();
        let axis = if self.axis < 0 { self.axis + rank as i64 } else { self.axis };
        let mut p = model.wire_node(format!("{prefix}.f32"), cast(f32::datum_type()), &[p])?[0];
        if p_fact.rank() == 0 || (self.block_size == 0 && p_fact.shape.volume().is_one()) {
            return Ok(p);
        }
        ensure!((0..rank as i64).contains(&axis), "quantization axis {} out of range for rank {rank}", self.axis);
        let axis = axis as usize;
        if self.block_size == 0 {
            ensure!(p_fact.rank() == 1, "per-axis quantization parameters must be 1-D");
            for i in 0..axis {
                p = model.wire_node(format!("{prefix}.lead{i}"), AxisOp::Add(0), &[p])?[0];
            }
            for at in axis + 1..rank {
                p = model.wire_node(format!("{prefix}.trail{at}"), AxisOp::Add(at), &[p])?[0];
            }
            // the axes were added around the parameter's one axis: it now sits at `axis`
            return Ok(p);
        }
        ensure!(p_fact.rank() == rank, "blocked quantization parameters must have the input's rank");
        let bs = self.block_size;
        let nb = p_fact.shape[axis].clone();
        // [.., nb, ..] → [.., nb, 1, ..] → [.., nb, bs, ..] → [.., nb·bs, ..] → [.., dim, ..]
        p = model.wire_node(format!("{prefix}.block_axis"), AxisOp::Add(axis + 1), &[p])?[0];
        let mut shape: TVec<TDim> = p_fact.shape.iter().cloned().collect();
        shape.insert(axis + 1, bs.to_dim());
        p = model.wire_node(format!("{prefix}.blocks"), MultiBroadcastTo::new(shape.into()), &[p])?[0];
        p = model.wire_node(
            format!("{prefix}.merge"),
            AxisOp::Reshape(axis, tvec![nb.clone(), bs.to_dim()], tvec![nb * bs]),
            &[p],
        )?[0];
        let dim = x_fact.shape[axis].clone();
        p = model.wire_node(format!("{prefix}.cut"), Slice::new(axis, 0, dim), &[p])?[0];
        Ok(p)
    }
}

impl Expansion for QdqLinear {
    fn name(&self) -> StaticName {
        if self.quantize { "QuantizeLinear" } else { "DequantizeLinear" }.into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 2 + self.has_zero_point as usize)?;
        check_output_arity(outputs, 1)?;
        s.equals(&inputs[0].shape, &outputs[0].shape)?;
        match self.out {
            Some(dt) => s.equals(&outputs[0].datum_type, dt)?,
            None => s.equals(&outputs[0].datum_type, &inputs[1].datum_type)?,
        }
        Ok(())
    }

    fn wire(&self, prefix: &str, model: &mut TypedModel, inputs: &[OutletId]) -> TractResult<TVec<OutletId>> {
        let x = inputs[0];
        let scale_dt = model.outlet_fact(inputs[1])?.datum_type;
        let scale = self.expand_param(&format!("{prefix}.scale"), model, x, inputs[1])?;
        let zp = match self.has_zero_point {
            true => Some(self.expand_param(&format!("{prefix}.zero_point"), model, x, inputs[2])?),
            false => None,
        };
        let mut y = model.wire_node(format!("{prefix}.x_f32"), cast(f32::datum_type()), &[x])?[0];
        if self.quantize {
            let out = self.out.unwrap_or(DatumType::U8);
            let (lo, hi) = match out {
                DatumType::U8 => (0f32, 255f32),
                DatumType::I8 => (-128.0, 127.0),
                DatumType::U16 => (0.0, 65535.0),
                DatumType::I16 => (-32768.0, 32767.0),
                DatumType::I32 => (i32::MIN as f32, i32::MAX as f32),
                other => bail!("QuantizeLinear to {other:?} is not supported"),
            };
            y = wire_with_rank_broadcast(format!("{prefix}.div"), model, math::div(), &[y, scale])?[0];
            y = model.wire_node(format!("{prefix}.round"), math::round_half_to_even(), &[y])?[0];
            if let Some(z) = zp {
                y = wire_with_rank_broadcast(format!("{prefix}.add"), model, math::add(), &[y, z])?[0];
            }
            let lo = model.add_const(format!("{prefix}.lo"), tensor0(lo))?;
            let hi = model.add_const(format!("{prefix}.hi"), tensor0(hi))?;
            y = wire_with_rank_broadcast(format!("{prefix}.max"), model, math::max(), &[y, lo])?[0];
            y = wire_with_rank_broadcast(format!("{prefix}.min"), model, math::min(), &[y, hi])?[0];
            y = model.wire_node(format!("{prefix}.cast"), cast(out), &[y])?[0];
        } else {
            if let Some(z) = zp {
                y = wire_with_rank_broadcast(format!("{prefix}.sub"), model, math::sub(), &[y, z])?[0];
            }
            y = wire_with_rank_broadcast(format!("{prefix}.mul"), model, math::mul(), &[y, scale])?[0];
            if scale_dt != f32::datum_type() {
                y = model.wire_node(format!("{prefix}.cast"), cast(scale_dt), &[y])?[0];
            }
        }
        Ok(tvec!(y))
    }
}
