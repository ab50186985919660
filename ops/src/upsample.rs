//! ONNX Upsample (deprecated since opset 10; Resize replaced it): nearest-neighbour upsampling by per-axis scales
//! (`out = floor(in · scale)`, `y[i] = x[floor(i / scale)]`). `scales` must be known at load; linear mode is not
//! implemented.

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use crate::kernel::*;
use crate::BuildResult;

#[derive(Debug, Clone, PartialEq)]
pub struct Upsample {
    /// opset < 9 carries the scales as an attribute
    pub scales: Option<Vec<f32>>,
}

pub fn build(_ctx: &ParsingContext, node: &NodeProto) -> BuildResult {
    let mode = node.get_attr_opt::<String>("mode")?.unwrap_or_else(|| "nearest".into());
    ensure!(mode == "nearest", "Upsample: mode `{mode}` is not supported (only nearest)");
    let scales: Option<Vec<f32>> = node.get_attr_opt_vec("scales")?;
    Ok((expand(KernelExpansion(Upsample { scales })), vec![]))
}

impl Upsample {
    fn n_inputs(&self) -> usize {
        if self.scales.is_some() {
            1
        } else {
            2
        }
    }
    fn out_shape(&self, shape: &[usize], scales: &[f32]) -> TractResult<Vec<usize>> {
        ensure!(scales.len() == shape.len(), "Upsample: {} scales for rank {}", scales.len(), shape.len());
        ensure!(scales.iter().all(|s| *s >= 1.0), "Upsample: scales must be >= 1");
        Ok(shape.iter().zip(scales).map(|(d, s)| (*d as f32 * s).floor() as usize).collect())
    }
}

impl Kernel for Upsample {
    fn name(&self) -> &'static str {
        "Upsample"
    }
    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, self.n_inputs())?;
        s.equals(&outputs[0].datum_type, &inputs[0].datum_type)?;
        s.equals(&outputs[0].rank, &inputs[0].rank)
    }
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let scales: Vec<f32> = match &self.scales {
            Some(s) => s.clone(),
            None => {
                let k = inputs
                    .get(1)
                    .and_then(|f| f.konst.as_ref())
                    .ok_or_else(|| format_err!("Upsample: scales must be a constant"))?;
                k.cast_to::<f32>()?.try_as_plain_ram()?.as_slice::<f32>()?.to_vec()
            }
        };
        let shape = concrete_shape("Upsample", inputs[0])?;
        let out = self.out_shape(&shape, &scales)?;
        Ok(tvec!(TypedFact::dt_shape(inputs[0].datum_type, &*out)))
    }
    fn eval(&self, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let scales: Vec<f32> = match &self.scales {
            Some(s) => s.clone(),
            None => inputs[1].cast_to::<f32>()?.try_as_plain_ram()?.as_slice::<f32>()?.to_vec(),
        };
        let mut x = inputs[0].clone().into_tensor();
        let out = self.out_shape(x.shape(), &scales)?;
        for (axis, (len, s)) in out.iter().zip(&scales).enumerate() {
            let n = x.shape()[axis];
            let idx: Vec<i64> =
                (0..*len).map(|i| ((i as f32 / s).floor() as usize).min(n.saturating_sub(1)) as i64).collect();
            x = crate::compress::gather_axis(&x, axis, &tensor1(&idx))?;
        }
        Ok(tvec!(x.into_tvalue()))
    }
}
