//! ONNX CenterCropPad: crops or zero-pads each listed axis to the wanted size around its center (the `shape`
//! input must be known at load: a constant or an initializer).

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use crate::kernel::*;
use crate::BuildResult;

#[derive(Debug, Clone, PartialEq)]
pub struct CenterCropPad {
    pub axes: Option<Vec<i64>>,
}

pub fn build(_ctx: &ParsingContext, node: &NodeProto) -> BuildResult {
    let axes: Option<Vec<i64>> = node.get_attr_opt_vec("axes")?;
    Ok((expand(KernelExpansion(CenterCropPad { axes })), vec![]))
}

impl CenterCropPad {
    /// (axis, wanted size) pairs.
    fn targets(&self, rank: usize, shape: &[i64]) -> TractResult<Vec<(usize, usize)>> {
        let axes: Vec<usize> = match &self.axes {
            Some(a) => a.iter().map(|a| resolve_axis("CenterCropPad", *a, rank)).collect::<TractResult<_>>()?,
            None => (0..rank).collect(),
        };
        ensure!(axes.len() == shape.len(), "CenterCropPad: shape has {} values for {} axes", shape.len(), axes.len());
        axes.into_iter()
            .zip(shape)
            .map(|(a, s)| {
                ensure!(*s >= 0, "CenterCropPad: negative size {s}");
                Ok((a, *s as usize))
            })
            .collect()
    }
}

impl Kernel for CenterCropPad {
    fn name(&self) -> &'static str {
        "CenterCropPad"
    }
    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 2)?;
        s.equals(&outputs[0].datum_type, &inputs[0].datum_type)?;
        s.equals(&outputs[0].rank, &inputs[0].rank)
    }
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 2, "CenterCropPad: expects input_data and shape");
        let wanted = const_i64s("CenterCropPad", "shape", inputs[1])?;
        let mut shape: TVec<TDim> = inputs[0].shape.to_tvec();
        for (a, s) in self.targets(shape.len(), &wanted)? {
            shape[a] = s.into();
        }
        Ok(tvec!(TypedFact::dt_shape(inputs[0].datum_type, shape)))
    }
    fn eval(&self, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = &inputs[0];
        let wanted: Vec<i64> = to_i64(&inputs[1])?.iter().copied().collect();
        let in_shape = x.shape().to_vec();
        let mut out_shape = in_shape.clone();
        let mut src_start = vec![0usize; in_shape.len()];
        let mut dst_start = vec![0usize; in_shape.len()];
        let mut copy = in_shape.clone();
        for (a, s) in self.targets(in_shape.len(), &wanted)? {
            let dim = in_shape[a];
            out_shape[a] = s;
            if s < dim {
                src_start[a] = (dim - s) / 2;
                copy[a] = s;
            } else if s > dim {
                dst_start[a] = (s - dim) / 2;
            }
        }
        let mut out = Tensor::zero_dt(x.datum_type(), &out_shape)?;
        if copy.iter().all(|c| *c > 0) {
            let mut src = x.clone().into_tensor();
            for (a, (st, len)) in src_start.iter().zip(&copy).enumerate() {
                src = src.slice(a, *st, st + len)?;
            }
            assign_block(&mut out, &src, &dst_start)?;
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

/// Copies `src` into `dst` at `offset` (same rank, any datum type).
fn assign_block(dst: &mut Tensor, src: &Tensor, offset: &[usize]) -> TractResult<()> {
    fn go<T: Datum + Clone>(dst: &mut Tensor, src: &Tensor, offset: &[usize]) -> TractResult<()> {
        let s = src.to_plain_array_view::<T>()?;
        let mut d = dst.to_plain_array_view_mut::<T>()?;
        let mut view = d.view_mut();
        for (a, o) in offset.iter().enumerate() {
            view.slice_axis_inplace(tract_ndarray::Axis(a), (*o..o + s.shape()[a]).into());
        }
        view.assign(&s);
        Ok(())
    }
    dispatch_datum!(go(dst.datum_type())(dst, src, offset))
}
