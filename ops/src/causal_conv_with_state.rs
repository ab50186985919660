//! ONNX CausalConvWithState (opset 27): causal depthwise 1-D convolution carrying the last k-1 positions as state,
//! optional bias and fused SiLU/Swish. Computed in f64, returned in the input's type.

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use crate::kernel::*;
use crate::BuildResult;

#[derive(Debug, Clone, PartialEq)]
pub struct CausalConvWithState {
    pub has_bias: bool,
    pub has_past: bool,
    pub silu: bool,
}

pub fn build(_ctx: &ParsingContext, node: &NodeProto) -> BuildResult {
    let present = |i: usize| node.input.get(i).is_some_and(|s| !s.is_empty());
    ensure!(present(0) && present(1), "CausalConvWithState needs input and weight");
    let activation = node.get_attr_opt::<String>("activation")?.unwrap_or_else(|| "none".into());
    let silu = match activation.to_ascii_lowercase().as_str() {
        "none" | "" => false,
        "silu" | "swish" => true,
        other => bail!("CausalConvWithState: unsupported activation `{other}`"),
    };
    Ok((expand(KernelExpansion(CausalConvWithState { has_bias: present(2), has_past: present(3), silu })), vec![]))
}

impl CausalConvWithState {
    fn n_inputs(&self) -> usize {
        2 + self.has_bias as usize + self.has_past as usize
    }
}

impl Kernel for CausalConvWithState {
    fn name(&self) -> &'static str {
        "CausalConvWithState"
    }
    fn nboutputs(&self) -> usize {
        2
    }
    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, self.n_inputs())?;
        s.equals(&outputs[0].datum_type, &inputs[0].datum_type)?;
        s.equals(&outputs[1].datum_type, &inputs[0].datum_type)?;
        s.equals(&outputs[0].shape, &inputs[0].shape)?;
        s.equals(&outputs[1].rank, 3)
    }
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == self.n_inputs(), "CausalConvWithState: wrong number of inputs");
        let dt = inputs[0].datum_type;
        ensure!(dt.is_float(), "CausalConvWithState: input must be float");
        ensure!(inputs[0].rank() == 3 && inputs[1].rank() == 3, "CausalConvWithState: input and weight must be rank 3");
        let k = inputs[1].shape[2].clone();
        let state = tvec!(inputs[0].shape[0].clone(), inputs[0].shape[1].clone(), k - 1);
        Ok(tvec!(TypedFact::dt_shape(dt, inputs[0].shape.clone()), TypedFact::dt_shape(dt, state)))
    }
    fn eval(&self, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let op = "CausalConvWithState";
        let dt = inputs[0].datum_type();
        let x = to_f64(&inputs[0])?;
        let w = to_f64(&inputs[1])?;
        ensure!(x.ndim() == 3 && w.ndim() == 3, "{op}: input and weight must be rank 3");
        let (n, c, l) = (x.shape()[0], x.shape()[1], x.shape()[2]);
        ensure!(w.shape()[0] == c && w.shape()[1] == 1, "{op}: weight must be [{c}, 1, k], got {:?}", w.shape());
        let k = w.shape()[2];
        ensure!(k >= 1, "{op}: kernel size must be >= 1");
        let mut ix = 2;
        let bias = if self.has_bias {
            let b = to_f64(&inputs[ix])?;
            ix += 1;
            ensure!(b.shape() == [c], "{op}: bias must be [{c}]");
            Some(b)
        } else {
            None
        };
        let past = if self.has_past {
            let p = to_f64(&inputs[ix])?;
            ensure!(p.shape() == [n, c, k - 1], "{op}: past_state must be [{n}, {c}, {}], got {:?}", k - 1, p.shape());
            Some(p)
        } else {
            None
        };
        let total = k - 1 + l;
        let mut out = tract_ndarray::Array3::<f64>::zeros((n, c, l));
        let mut state = tract_ndarray::Array3::<f64>::zeros((n, c, k - 1));
        let mut padded = vec![0f64; total];
        for b in 0..n {
            for ch in 0..c {
                for t in 0..k - 1 {
                    padded[t] = past.as_ref().map(|p| p[[b, ch, t]]).unwrap_or(0.0);
                }
                for t in 0..l {
                    padded[k - 1 + t] = x[[b, ch, t]];
                }
                for t in 0..l {
                    let mut acc = bias.as_ref().map(|b| b[ch]).unwrap_or(0.0);
                    for j in 0..k {
                        acc += w[[ch, 0, j]] * padded[t + j];
                    }
                    if self.silu {
                        acc /= 1.0 + (-acc).exp();
                    }
                    out[[b, ch, t]] = acc;
                }
                for t in 0..k - 1 {
                    state[[b, ch, t]] = padded[l + t];
                }
            }
        }
        Ok(tvec!(from_f64(out.into_dyn(), dt)?, from_f64(state.into_dyn(), dt)?))
    }
}
