//! ONNX BatchNormalization with `training_mode = 1` (tract implements inference mode only, and keeps handling
//! that): normalises with the batch's statistics and also outputs the updated running mean and variance
//! (`running · momentum + batch · (1 - momentum)`, population variance), as onnx's reference does.

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use crate::kernel::*;
use crate::BuildResult;

#[derive(Debug, Clone, PartialEq)]
pub struct BatchNormTraining {
    pub epsilon: f32,
    pub momentum: f32,
    pub outputs: usize,
}

pub fn build(ctx: &ParsingContext, node: &NodeProto) -> BuildResult {
    if node.get_attr_opt::<i64>("training_mode")?.unwrap_or(0) == 0 {
        return crate::tract_builder(ctx, node);
    }
    let op = BatchNormTraining {
        epsilon: node.get_attr_opt("epsilon")?.unwrap_or(1e-5),
        momentum: node.get_attr_opt("momentum")?.unwrap_or(0.9),
        outputs: node.output.iter().filter(|s| !s.is_empty()).count().clamp(1, 3),
    };
    Ok((expand(KernelExpansion(op)), vec![]))
}

impl Kernel for BatchNormTraining {
    fn name(&self) -> &'static str {
        "BatchNormalization"
    }
    fn nboutputs(&self) -> usize {
        self.outputs
    }
    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 5)?;
        s.equals(&outputs[0].datum_type, &inputs[0].datum_type)?;
        s.equals(&outputs[0].shape, &inputs[0].shape)?;
        for o in &outputs[1..] {
            s.equals(&o.datum_type, &inputs[3].datum_type)?;
            s.equals(&o.shape, &inputs[3].shape)?;
        }
        Ok(())
    }
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 5, "BatchNormalization: expects X, scale, B, input_mean, input_var");
        ensure!(inputs[0].rank() >= 2, "BatchNormalization: X must have rank >= 2");
        let mut v = tvec!(inputs[0].without_value());
        for _ in 1..self.outputs {
            v.push(inputs[3].without_value());
        }
        Ok(v)
    }
    fn eval(&self, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let op = "BatchNormalization";
        let x = to_f64(&inputs[0])?;
        let params: Vec<Vec<f64>> =
            (1..5).map(|i| to_f64(&inputs[i]).map(|a| a.iter().copied().collect())).collect::<TractResult<_>>()?;
        let shape = x.shape().to_vec();
        ensure!(shape.len() >= 2, "{op}: X must have rank >= 2");
        let c = shape[1];
        ensure!(params.iter().all(|p| p.len() == c), "{op}: scale, B, mean and var must have {c} values");
        let (n, inner) = (shape[0], shape[2..].iter().product::<usize>());
        let x3 = x.view().into_shape_with_order((n, c, inner))?;
        let count = (n * inner) as f64;
        let mut mean = vec![0f64; c];
        let mut var = vec![0f64; c];
        for ch in 0..c {
            let slice = x3.slice(tract_ndarray::s![.., ch, ..]);
            mean[ch] = slice.sum() / count;
            var[ch] = slice.iter().map(|v| (v - mean[ch]).powi(2)).sum::<f64>() / count;
        }
        let mut y = x3.to_owned();
        for ch in 0..c {
            let k = params[0][ch] / (var[ch] + self.epsilon as f64).sqrt();
            y.slice_mut(tract_ndarray::s![.., ch, ..]).mapv_inplace(|v| (v - mean[ch]) * k + params[1][ch]);
        }
        let m = self.momentum as f64;
        let run_mean: Vec<f64> = (0..c).map(|ch| params[2][ch] * m + mean[ch] * (1.0 - m)).collect();
        let run_var: Vec<f64> = (0..c).map(|ch| params[3][ch] * m + var[ch] * (1.0 - m)).collect();
        let mut v = tvec!(from_f64(y.into_shape_with_order(shape)?.into_dyn(), inputs[0].datum_type())?);
        let pdt = inputs[3].datum_type();
        let pshape = inputs[3].shape().to_vec();
        for vals in [run_mean, run_var].into_iter().take(self.outputs - 1) {
            v.push(from_f64(tract_ndarray::ArrayD::from_shape_vec(pshape.clone(), vals)?, pdt)?);
        }
        Ok(v)
    }
}
