//! ONNX Compress: keeps the slices (along `axis`, or of the flattened input) whose condition is true. tract's needs
//! the condition constant; kiln's sizes the output with a fresh symbol when it is not.

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use crate::kernel::*;
use crate::BuildResult;

#[derive(Debug, Clone, PartialEq)]
pub struct Compress {
    pub axis: Option<i64>,
    pub count: Option<Symbol>,
}

pub fn build(_ctx: &ParsingContext, node: &NodeProto) -> BuildResult {
    Ok((expand(KernelExpansion(Compress { axis: node.get_attr_opt("axis")?, count: None })), vec![]))
}

fn kept(cond: &[bool], len: usize) -> Vec<usize> {
    cond.iter().take(len).enumerate().filter(|(_, c)| **c).map(|(i, _)| i).collect()
}

impl Kernel for Compress {
    fn name(&self) -> &'static str {
        "Compress"
    }
    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 2)?;
        s.equals(&outputs[0].datum_type, &inputs[0].datum_type)?;
        if self.axis.is_some() {
            s.equals(&outputs[0].rank, &inputs[0].rank)?;
        } else {
            s.equals(&outputs[0].rank, 1)?;
        }
        Ok(())
    }
    fn with_symbols(&self, model: &mut TypedModel) -> Self {
        Compress { axis: self.axis, count: Some(model.symbols.new_with_prefix("compressed")) }
    }
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 2, "Compress: expects input and condition");
        ensure!(inputs[1].rank() == 1, "Compress: condition must be 1-D");
        let rank = inputs[0].rank();
        let len: TDim = match self.axis {
            Some(a) => inputs[0].shape[resolve_axis("Compress", a, rank)?].clone(),
            None => inputs[0].shape.iter().product(),
        };
        let count: TDim = match (&inputs[1].konst, len.to_usize()) {
            (Some(k), Ok(len)) => kept(k.cast_to::<bool>()?.try_as_plain_ram()?.as_slice::<bool>()?, len).len().into(),
            _ => self.count.clone().map(TDim::Sym).ok_or_else(|| format_err!("Compress: condition must be known"))?,
        };
        let shape: TVec<TDim> = match self.axis {
            Some(a) => {
                let mut s = inputs[0].shape.to_tvec();
                s[resolve_axis("Compress", a, rank)?] = count;
                s
            }
            None => tvec!(count),
        };
        Ok(tvec!(TypedFact::dt_shape(inputs[0].datum_type, shape)))
    }
    fn eval(&self, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = inputs[0].clone().into_tensor();
        let cond = inputs[1].cast_to::<bool>()?.into_owned();
        let cond = cond.try_as_plain_ram()?.as_slice::<bool>()?.to_vec();
        let (x, axis) = match self.axis {
            Some(a) => {
                let axis = resolve_axis("Compress", a, x.rank())?;
                (x, axis)
            }
            None => {
                let n = x.len();
                (x.into_shape(&[n])?, 0)
            }
        };
        let len = x.shape()[axis];
        let idx: Vec<i64> = kept(&cond, len).into_iter().map(|i| i as i64).collect();
        let indices = tensor1(&idx);
        let out = gather_axis(&x, axis, &indices)?;
        Ok(tvec!(out.into_tvalue()))
    }
}

/// `x` gathered along `axis` at `indices` (1-D i64), any datum type.
pub fn gather_axis(x: &Tensor, axis: usize, indices: &Tensor) -> TractResult<Tensor> {
    fn go<T: Datum + Clone>(x: &Tensor, axis: usize, idx: &[i64]) -> TractResult<Tensor> {
        let v = x.to_plain_array_view::<T>()?;
        let idx: Vec<usize> = idx.iter().map(|i| *i as usize).collect();
        ensure!(idx.iter().all(|i| *i < v.shape()[axis]), "index out of range");
        Ok(v.select(tract_ndarray::Axis(axis), &idx).into_tensor())
    }
    let idx = indices.try_as_plain_ram()?.as_slice::<i64>()?.to_vec();
    dispatch_datum!(go(x.datum_type())(x, axis, &idx))
}
