//! ONNX Det: determinants of square matrices [*, M, M] → [*], by LU decomposition with partial pivoting in f64.

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use crate::kernel::*;
use crate::BuildResult;

#[derive(Debug, Clone, PartialEq)]
pub struct Det;

pub fn build(_ctx: &ParsingContext, _node: &NodeProto) -> BuildResult {
    Ok((expand(KernelExpansion(Det)), vec![]))
}

fn det(mut a: Vec<f64>, m: usize) -> f64 {
    let mut d = 1.0;
    for col in 0..m {
        let pivot = (col..m).max_by(|x, y| a[x * m + col].abs().total_cmp(&a[y * m + col].abs())).unwrap_or(col);
        if a[pivot * m + col] == 0.0 {
            return 0.0;
        }
        if pivot != col {
            for k in 0..m {
                a.swap(pivot * m + k, col * m + k);
            }
            d = -d;
        }
        let p = a[col * m + col];
        d *= p;
        for row in col + 1..m {
            let f = a[row * m + col] / p;
            for k in col..m {
                a[row * m + k] -= f * a[col * m + k];
            }
        }
    }
    d
}

impl Kernel for Det {
    fn name(&self) -> &'static str {
        "Det"
    }
    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        s.equals(&outputs[0].datum_type, &inputs[0].datum_type)
    }
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let r = inputs[0].rank();
        ensure!(r >= 2, "Det: input must have rank >= 2");
        ensure!(inputs[0].datum_type.is_float(), "Det: input must be float");
        Ok(tvec!(TypedFact::dt_shape(inputs[0].datum_type, &inputs[0].shape[..r - 2])))
    }
    fn eval(&self, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let dt = inputs[0].datum_type();
        let x = to_f64(&inputs[0])?;
        let shape = x.shape().to_vec();
        ensure!(shape.len() >= 2, "Det: input must have rank >= 2");
        let m = shape[shape.len() - 1];
        ensure!(shape[shape.len() - 2] == m, "Det: matrices must be square, got {shape:?}");
        let x = x.as_standard_layout();
        let data = x.as_slice().ok_or_else(|| format_err!("Det: non contiguous"))?;
        let out: Vec<f64> = if m == 0 {
            vec![1.0; shape[..shape.len() - 2].iter().product()]
        } else {
            data.chunks(m * m).map(|c| det(c.to_vec(), m)).collect()
        };
        Ok(tvec!(from_f64(tract_ndarray::ArrayD::from_shape_vec(shape[..shape.len() - 2].to_vec(), out)?, dt)?))
    }
}
