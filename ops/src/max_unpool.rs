//! ONNX MaxUnpool: scatters X into zeros at the flat indices MaxPool returned; the output shape is `output_shape`
//! (known at load) or `(in - 1)·stride - pads + kernel` per spatial axis.

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use crate::kernel::*;
use crate::BuildResult;

#[derive(Debug, Clone, PartialEq)]
pub struct MaxUnpool {
    pub kernel: Vec<i64>,
    pub strides: Option<Vec<i64>>,
    pub pads: Option<Vec<i64>>,
    pub has_shape: bool,
}

pub fn build(_ctx: &ParsingContext, node: &NodeProto) -> BuildResult {
    let op = MaxUnpool {
        kernel: node.get_attr_vec("kernel_shape")?,
        strides: node.get_attr_opt_vec("strides")?,
        pads: node.get_attr_opt_vec("pads")?,
        has_shape: node.input.get(2).is_some_and(|s| !s.is_empty()),
    };
    Ok((expand(KernelExpansion(op)), vec![]))
}

impl MaxUnpool {
    fn default_shape(&self, x: &[usize]) -> TractResult<Vec<usize>> {
        ensure!(x.len() >= 3, "MaxUnpool: X must be [N, C, spatial...]");
        let n = x.len() - 2;
        ensure!(
            self.kernel.len() == n,
            "MaxUnpool: kernel_shape has {} values for {n} spatial axes",
            self.kernel.len()
        );
        let strides = self.strides.clone().unwrap_or_else(|| vec![1; n]);
        let pads = self.pads.clone().unwrap_or_else(|| vec![0; 2 * n]);
        ensure!(strides.len() == n && pads.len() == 2 * n, "MaxUnpool: strides/pads length");
        let mut out = x[..2].to_vec();
        for i in 0..n {
            let d = (x[i + 2] as i64 - 1) * strides[i] - pads[i] - pads[i + n] + self.kernel[i];
            ensure!(d >= 0, "MaxUnpool: negative output size");
            out.push(d as usize);
        }
        Ok(out)
    }
}

impl Kernel for MaxUnpool {
    fn name(&self) -> &'static str {
        "MaxUnpool"
    }
    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 2 + self.has_shape as usize)?;
        s.equals(&outputs[0].datum_type, &inputs[0].datum_type)?;
        s.equals(&outputs[0].rank, &inputs[0].rank)
    }
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let shape: Vec<usize> = if self.has_shape {
            const_i64s("MaxUnpool", "output_shape", inputs[2])?.iter().map(|d| (*d).max(0) as usize).collect()
        } else {
            self.default_shape(&concrete_shape("MaxUnpool", inputs[0])?)?
        };
        Ok(tvec!(TypedFact::dt_shape(inputs[0].datum_type, &*shape)))
    }
    fn eval(&self, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let dt = inputs[0].datum_type();
        let x = to_f64(&inputs[0])?;
        let idx = to_i64(&inputs[1])?;
        ensure!(idx.shape() == x.shape(), "MaxUnpool: I must have X's shape");
        let shape: Vec<usize> = if self.has_shape {
            to_i64(&inputs[2])?.iter().map(|d| (*d).max(0) as usize).collect()
        } else {
            self.default_shape(x.shape())?
        };
        // scatter into the inferred shape, then place it at the origin of output_shape (onnx's reference)
        let inferred = self.default_shape(x.shape())?;
        let total: usize = inferred.iter().product();
        let mut scattered = vec![0f64; total];
        for (v, i) in x.iter().zip(idx.iter()) {
            ensure!(*i >= 0 && (*i as usize) < total, "MaxUnpool: index {i} out of range for {total} elements");
            scattered[*i as usize] = *v;
        }
        let scattered = tract_ndarray::ArrayD::from_shape_vec(inferred.clone(), scattered)?;
        ensure!(shape.len() == inferred.len(), "MaxUnpool: output_shape rank {} vs {}", shape.len(), inferred.len());
        let mut out = tract_ndarray::ArrayD::<f64>::zeros(shape.clone());
        {
            let mut view = out.view_mut();
            for (a, (d, o)) in inferred.iter().zip(&shape).enumerate() {
                ensure!(d <= o, "MaxUnpool: output_shape {shape:?} smaller than {inferred:?}");
                view.slice_axis_inplace(tract_ndarray::Axis(a), (0..*d).into());
            }
            view.assign(&scattered);
        }
        Ok(tvec!(from_f64(out, dt)?))
    }
}
