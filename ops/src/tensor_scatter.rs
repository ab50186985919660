//! ONNX TensorScatter (opset 24): writes `update` into a copy of `past_cache` along `axis` at each batch entry's
//! `write_indices` (default 0), linearly or circularly (modulo the cache length). Copies raw elements, so every
//! non-string type works.

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use crate::kernel::*;
use crate::BuildResult;

#[derive(Debug, Clone, PartialEq)]
pub struct TensorScatter {
    pub axis: i64,
    pub circular: bool,
    pub has_indices: bool,
}

pub fn build(_ctx: &ParsingContext, node: &NodeProto) -> BuildResult {
    let mode = node.get_attr_opt::<String>("mode")?.unwrap_or_else(|| "linear".into());
    let circular = match mode.as_str() {
        "linear" => false,
        "circular" => true,
        other => bail!("TensorScatter: unknown mode `{other}`"),
    };
    let op = TensorScatter {
        axis: node.get_attr_opt("axis")?.unwrap_or(-2),
        circular,
        has_indices: node.input.get(2).is_some_and(|s| !s.is_empty()),
    };
    Ok((expand(KernelExpansion(op)), vec![]))
}

impl Kernel for TensorScatter {
    fn name(&self) -> &'static str {
        "TensorScatter"
    }
    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 2 + self.has_indices as usize)?;
        s.equals(&outputs[0].datum_type, &inputs[0].datum_type)?;
        s.equals(&outputs[0].shape, &inputs[0].shape)
    }
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 2 + self.has_indices as usize, "TensorScatter: wrong number of inputs");
        ensure!(inputs[0].datum_type != DatumType::String, "TensorScatter: strings are not supported");
        ensure!(inputs[0].datum_type == inputs[1].datum_type, "TensorScatter: cache and update types differ");
        Ok(tvec!(inputs[0].without_value()))
    }
    fn eval(&self, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let op = "TensorScatter";
        let past = &inputs[0];
        let update = &inputs[1];
        let shape = past.shape().to_vec();
        let rank = shape.len();
        ensure!(rank >= 1 && update.rank() == rank, "{op}: cache and update must have the same rank");
        let axis = resolve_axis(op, self.axis, rank)?;
        let ushape = update.shape();
        for i in 0..rank {
            ensure!(i == axis || ushape[i] == shape[i], "{op}: update shape {ushape:?} vs cache {shape:?}");
        }
        let max = shape[axis];
        let seq = ushape[axis];
        ensure!(seq <= max, "{op}: update longer than the cache");
        let outer: usize = shape[..axis].iter().product();
        let inner: usize = shape[axis + 1..].iter().product();
        let batch = if axis == 0 { 1 } else { shape[0] };
        let per_batch = outer.checked_div(batch).unwrap_or(1);
        let indices: Vec<i64> =
            if self.has_indices { to_i64(&inputs[2])?.iter().copied().collect() } else { vec![0; batch.max(1)] };
        ensure!(indices.len() >= batch, "{op}: write_indices has {} values for batch {batch}", indices.len());
        let es = past.datum_type().size_of();
        let mut out = past.as_bytes().to_vec();
        let src = update.as_bytes();
        for o in 0..outer {
            let b = if axis == 0 { 0 } else { o / per_batch.max(1) };
            let start = indices[b];
            for s in 0..seq {
                let mut t = start + s as i64;
                if self.circular {
                    t = t.rem_euclid(max as i64);
                }
                ensure!(t >= 0 && (t as usize) < max, "{op}: write index {t} out of range 0..{max}");
                let dst = ((o * max + t as usize) * inner) * es;
                let from = ((o * seq + s) * inner) * es;
                out[dst..dst + inner * es].copy_from_slice(&src[from..from + inner * es]);
            }
        }
        let t = unsafe { Tensor::from_raw_dt(past.datum_type(), &shape, &out)? };
        Ok(tvec!(t.into_tvalue()))
    }
}
