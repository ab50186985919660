//! ONNX CumProd (opset 26): cumulative product along an axis, with `exclusive` and `reverse`.

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use crate::kernel::*;
use crate::BuildResult;

#[derive(Debug, Clone, PartialEq)]
pub struct CumProd {
    pub exclusive: bool,
    pub reverse: bool,
}

pub fn build(_ctx: &ParsingContext, node: &NodeProto) -> BuildResult {
    let exclusive = node.get_attr_opt::<i64>("exclusive")?.unwrap_or(0) != 0;
    let reverse = node.get_attr_opt::<i64>("reverse")?.unwrap_or(0) != 0;
    Ok((expand(KernelExpansion(CumProd { exclusive, reverse })), vec![]))
}

fn scan<T: Copy>(
    data: &mut [T],
    shape: &[usize],
    axis: usize,
    one: T,
    exclusive: bool,
    reverse: bool,
    mul: impl Fn(T, T) -> T,
) {
    let len = shape[axis];
    let inner: usize = shape[axis + 1..].iter().product();
    let outer: usize = shape[..axis].iter().product();
    for o in 0..outer {
        for i in 0..inner {
            let mut acc = one;
            for step in 0..len {
                let k = if reverse { len - 1 - step } else { step };
                let ix = (o * len + k) * inner + i;
                let v = data[ix];
                if exclusive {
                    data[ix] = acc;
                    acc = mul(acc, v);
                } else {
                    acc = mul(acc, v);
                    data[ix] = acc;
                }
            }
        }
    }
}

impl Kernel for CumProd {
    fn name(&self) -> &'static str {
        "CumProd"
    }
    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 2)?;
        s.equals(&outputs[0].datum_type, &inputs[0].datum_type)?;
        s.equals(&outputs[0].shape, &inputs[0].shape)
    }
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 2, "CumProd: expects x and axis");
        let dt = inputs[0].datum_type;
        ensure!(dt.is_number(), "CumProd: {dt:?} is not a numeric type");
        Ok(tvec!(TypedFact::dt_shape(dt, inputs[0].shape.clone())))
    }
    fn eval(&self, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = &inputs[0];
        let axis = to_i64(&inputs[1])?;
        ensure!(axis.len() == 1, "CumProd: axis must hold one value");
        let shape = x.shape().to_vec();
        ensure!(!shape.is_empty(), "CumProd: input must have rank >= 1");
        let axis = resolve_axis("CumProd", axis.iter().next().copied().unwrap_or(0), shape.len())?;
        let dt = x.datum_type();
        let out = if dt.is_float() {
            let mut a = to_f64(x)?;
            let data = a.as_slice_mut().ok_or_else(|| format_err!("CumProd: non contiguous"))?;
            scan(data, &shape, axis, 1.0, self.exclusive, self.reverse, |a, b| a * b);
            from_f64(a, dt)?
        } else {
            let mut a = to_i64(x)?;
            let data = a.as_slice_mut().ok_or_else(|| format_err!("CumProd: non contiguous"))?;
            scan(data, &shape, axis, 1i64, self.exclusive, self.reverse, |a, b| a.wrapping_mul(b));
            Tensor::from(a).cast_to_dt(dt)?.into_owned().into_tvalue()
        };
        Ok(tvec!(out))
    }
}
