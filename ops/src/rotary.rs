//! RotaryEmbedding (ONNX opset 23, and com.microsoft's contrib op) as one kiln op, so the GPU runs it as one
//! dispatch (tract 0.23.9 expands it into some twenty slices, gathers, products and concatenations).
//!
//! Follows onnx's reference (`onnx/reference/ops/op_rotary_embedding.py`):
//! - input `[batch, heads, seq, head]` (4D) or `[batch, seq, heads·head]` (3D, `num_heads` required);
//! - the first `rotary_embedding_dim` channels (all when 0) rotate, the rest pass through;
//! - cos / sin: `cache[position_ids[b, s], i]` with `position_ids` (`[batch, seq]`), else `cache[b, s, i]`; only the
//!   first `rotary_dim / 2` columns of a cache are read;
//! - non-interleaved (NeoX halves): `x1 = x[i]`, `x2 = x[i + half]`; interleaved (GPT-J pairs): `x1 = x[2i]`,
//!   `x2 = x[2i + 1]`; then `x1' = cos·x1 − sin·x2`, `x2' = sin·x1 + cos·x2`.
//!
//! com.microsoft orders its inputs (input, position_ids, cos_cache, sin_cache); its `position_ids` may also be one
//! value, an offset (position `offset + s`). `scale != 1` and packed batching are rejected, as tract does.

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_core::internal as core;
use tract_onnx::tract_hir::internal::*;

use crate::BuildResult;

pub fn build(_ctx: &ParsingContext, node: &NodeProto) -> BuildResult {
    let microsoft = node.domain == "com.microsoft";
    ensure!(microsoft || crate::is_onnx_domain(node), "RotaryEmbedding of domain `{}`", node.domain);
    let interleaved = node.get_attr_opt::<i64>("interleaved")?.unwrap_or(0) != 0;
    let num_heads = node.get_attr_opt::<i64>("num_heads")?.unwrap_or(0);
    let rotary_dim = node.get_attr_opt::<i64>("rotary_embedding_dim")?.unwrap_or(0);
    ensure!(num_heads >= 0 && rotary_dim >= 0, "RotaryEmbedding: negative num_heads or rotary_embedding_dim");
    if microsoft {
        let scale = node.get_attr_opt::<f32>("scale")?.unwrap_or(1.0);
        ensure!(scale == 1.0, "com.microsoft RotaryEmbedding: scale={scale} (!= 1.0) is unsupported");
        let packed = node.get_attr_opt::<i64>("is_packed_batching")?.unwrap_or(0);
        ensure!(packed == 0, "com.microsoft RotaryEmbedding: is_packed_batching=1 is unsupported");
        ensure!(node.input.len() == 4, "com.microsoft RotaryEmbedding takes 4 inputs, got {}", node.input.len());
    } else {
        let n = node.input.iter().filter(|i| !i.is_empty()).count();
        ensure!(n == 3 || n == 4, "RotaryEmbedding takes 3 or 4 inputs, got {n}");
    }
    let config = RotaryConfig {
        interleaved,
        num_heads: num_heads as usize,
        rotary_dim: rotary_dim as usize,
        microsoft,
        has_positions: microsoft || node.input.get(3).is_some_and(|i| !i.is_empty()),
        seqlens: false,
    };
    Ok((expand(Rotary { config }), vec![]))
}

#[derive(Debug, Clone, Hash, PartialEq, Eq)]
pub struct RotaryConfig {
    pub interleaved: bool,
    /// Needed for a 3D input (0: absent).
    pub num_heads: usize,
    /// Rotated channels (0: the whole head).
    pub rotary_dim: usize,
    /// com.microsoft: a one-value `position_ids` is an offset.
    pub microsoft: bool,
    pub has_positions: bool,
    /// com.microsoft GroupQueryAttention's positions (kiln's GQA lowering): the positions input is `seqlens_k`
    /// (`[batch]`, each batch's total length − 1) and position `(b, s)` is `max(seqlens_k[b] + 1 − seq, 0) + s`.
    pub seqlens: bool,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq)]
struct Rotary {
    config: RotaryConfig,
}

impl Expansion for Rotary {
    fn name(&self) -> StaticName {
        "RotaryEmbedding".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 3 + self.config.has_positions as usize)?;
        check_output_arity(outputs, 1)?;
        s.equals(&inputs[0].datum_type, &outputs[0].datum_type)?;
        s.equals(&inputs[0].shape, &outputs[0].shape)?;
        Ok(())
    }

    fn wire(&self, prefix: &str, model: &mut TypedModel, inputs: &[OutletId]) -> TractResult<TVec<OutletId>> {
        // canonical order: input, cos, sin, position_ids
        let ins: TVec<OutletId> =
            if self.config.microsoft { tvec![inputs[0], inputs[2], inputs[3], inputs[1]] } else { inputs.into() };
        model.wire_node(prefix, RotaryOp { config: self.config.clone() }, &ins)
    }
}

/// The typed op: inputs (input, cos_cache, sin_cache, position_ids?), one output of the input's type and shape.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
pub struct RotaryOp {
    pub config: RotaryConfig,
}

/// The sizes of one evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RotaryGeometry {
    pub batch: usize,
    pub heads: usize,
    pub seq: usize,
    pub head: usize,
    /// Element strides of (batch, head, seq) in the input.
    pub strides: [usize; 3],
    pub rotary_dim: usize,
}

impl RotaryConfig {
    /// The geometry of an input of `shape`.
    pub fn geometry(&self, shape: &[usize]) -> TractResult<RotaryGeometry> {
        let (batch, heads, seq, head, strides) = match *shape {
            [b, h, s, d] => (b, h, s, d, [h * s * d, s * d, d]),
            [b, s, hidden] => {
                ensure!(self.num_heads > 0, "RotaryEmbedding: a 3D input needs num_heads");
                ensure!(hidden % self.num_heads == 0, "RotaryEmbedding: hidden {hidden} over {} heads", self.num_heads);
                let d = hidden / self.num_heads;
                (b, self.num_heads, s, d, [s * hidden, d, hidden])
            }
            _ => bail!("RotaryEmbedding: input must be 3D or 4D, got {shape:?}"),
        };
        let rotary_dim = if self.rotary_dim == 0 { head } else { self.rotary_dim };
        ensure!(
            rotary_dim <= head && rotary_dim % 2 == 0,
            "RotaryEmbedding: rotary_embedding_dim {rotary_dim} for head size {head}"
        );
        Ok(RotaryGeometry { batch, heads, seq, head, strides, rotary_dim })
    }
}

impl Op for RotaryOp {
    fn name(&self) -> StaticName {
        "KilnRotaryEmbedding".into()
    }
    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("{:?}", self.config)])
    }
    core::op_as_typed_op!();
}

impl TypedOp for RotaryOp {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 3 + self.config.has_positions as usize, "RotaryEmbedding: input count");
        let dt = inputs[0].datum_type;
        ensure!(dt.is_float(), "RotaryEmbedding: input must be float, got {dt:?}");
        Ok(tvec![dt.fact(inputs[0].shape.clone())])
    }
    core::as_op!();
}

impl EvalOp for RotaryOp {
    core::op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let c = &self.config;
        let x_t = &inputs[0];
        let g = c.geometry(x_t.shape())?;
        let half = g.rotary_dim / 2;
        let f64s = |t: &Tensor| -> TractResult<Vec<f64>> {
            Ok(t.cast_to_dt(DatumType::F64)?.try_as_plain_ram()?.as_slice::<f64>()?.to_vec())
        };
        let x = f64s(x_t)?;
        let (cos_t, sin_t) = (&inputs[1], &inputs[2]);
        ensure!(cos_t.shape() == sin_t.shape(), "RotaryEmbedding: cos and sin caches differ in shape");
        let cos = f64s(cos_t)?;
        let sin = f64s(sin_t)?;
        let cols = *cos_t.shape().last().context("RotaryEmbedding: scalar cos cache")?;
        ensure!(cols >= half, "RotaryEmbedding: caches of {cols} columns for a rotary dim of {}", g.rotary_dim);
        // the cache row of (b, s)
        let rows: Vec<usize> = if c.has_positions {
            let pos = inputs[3].cast_to_dt(DatumType::I64)?;
            let pos = pos.try_as_plain_ram()?.as_slice::<i64>()?.to_vec();
            let max = cos_t.len() / cols.max(1);
            ensure!(cos_t.rank() == 2, "RotaryEmbedding: with position_ids the caches must be 2D");
            let offset = c.microsoft && pos.len() == 1;
            ensure!(
                !c.seqlens || pos.len() == g.batch,
                "GroupQueryAttention: seqlens_k of {} values for batch {}",
                pos.len(),
                g.batch
            );
            ensure!(
                c.seqlens || offset || pos.len() == g.batch * g.seq,
                "RotaryEmbedding: position_ids of {} values for [batch {}, seq {}]",
                pos.len(),
                g.batch,
                g.seq
            );
            let mut rows = Vec::with_capacity(g.batch * g.seq);
            for b in 0..g.batch {
                for s in 0..g.seq {
                    let p = if c.seqlens {
                        (pos[b] + 1 - g.seq as i64).max(0) + s as i64
                    } else if offset {
                        pos[0] + s as i64
                    } else {
                        pos[b * g.seq + s]
                    };
                    ensure!(p >= 0 && (p as usize) < max, "RotaryEmbedding: position {p} outside the {max} cache rows");
                    rows.push(p as usize);
                }
            }
            rows
        } else {
            ensure!(
                cos_t.rank() == 3 && cos_t.shape()[0] == g.batch && cos_t.shape()[1] == g.seq,
                "RotaryEmbedding: without position_ids the caches must be [batch, seq, rotary_dim / 2], got {:?}",
                cos_t.shape()
            );
            (0..g.batch * g.seq).collect()
        };
        let mut y = x.clone();
        for b in 0..g.batch {
            for h in 0..g.heads {
                for s in 0..g.seq {
                    let base = b * g.strides[0] + h * g.strides[1] + s * g.strides[2];
                    let row = rows[b * g.seq + s] * cols;
                    for i in 0..half {
                        let (i1, i2) = if c.interleaved { (2 * i, 2 * i + 1) } else { (i, i + half) };
                        let (x1, x2) = (x[base + i1], x[base + i2]);
                        let (co, si) = (cos[row + i], sin[row + i]);
                        y[base + i1] = co * x1 - si * x2;
                        y[base + i2] = si * x1 + co * x2;
                    }
                }
            }
        }
        let t = Tensor::from_shape::<f64>(x_t.shape(), &y)?;
        Ok(tvec![t.cast_to_dt(x_t.datum_type())?.into_owned().into_tvalue()])
    }
}
