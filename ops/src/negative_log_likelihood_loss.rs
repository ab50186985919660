//! ONNX NegativeLogLikelihoodLoss (and, with `softmax`, the core of SoftmaxCrossEntropyLoss): tract has neither.
//! Computed in f64 and returned in the input's type, following onnx's reference implementation (weights gathered
//! by target, `ignore_index` entries weigh 0, `mean` divides by the sum of the weights used).

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use crate::kernel::*;
use crate::BuildResult;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reduction {
    None,
    Sum,
    Mean,
}

impl Reduction {
    pub fn parse(node: &NodeProto) -> TractResult<Reduction> {
        let r: Option<String> = node.get_attr_opt("reduction")?;
        Ok(match r.as_deref().unwrap_or("mean") {
            "none" => Reduction::None,
            "sum" => Reduction::Sum,
            "mean" => Reduction::Mean,
            other => bail!("{}: unknown reduction `{other}`", node.op_type),
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct LossKernel {
    pub op: &'static str,
    pub reduction: Reduction,
    pub ignore_index: Option<i64>,
    pub has_weight: bool,
    /// Apply log-softmax over axis 1 first (SoftmaxCrossEntropyLoss).
    pub softmax: bool,
    /// Also output the log-probabilities (SoftmaxCrossEntropyLoss's second output).
    pub log_prob_output: bool,
}

pub fn build(_ctx: &ParsingContext, node: &NodeProto) -> BuildResult {
    let inputs = node.input.iter().filter(|s| !s.is_empty()).count();
    let has_weight = node.input.get(2).is_some_and(|s| !s.is_empty());
    ensure!(inputs >= 2, "NegativeLogLikelihoodLoss needs input and target");
    let k = LossKernel {
        op: "NegativeLogLikelihoodLoss",
        reduction: Reduction::parse(node)?,
        ignore_index: node.get_attr_opt("ignore_index")?,
        has_weight,
        softmax: false,
        log_prob_output: false,
    };
    Ok((expand(KernelExpansion(k)), vec![]))
}

impl Kernel for LossKernel {
    fn name(&self) -> &'static str {
        self.op
    }
    fn nboutputs(&self) -> usize {
        1 + self.log_prob_output as usize
    }
    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 2 + self.has_weight as usize)?;
        s.equals(&outputs[0].datum_type, &inputs[0].datum_type)?;
        if self.reduction == Reduction::None {
            s.equals(&outputs[0].rank, &inputs[1].rank)?;
            s.equals(&outputs[0].shape, &inputs[1].shape)?;
        } else {
            s.equals(&outputs[0].rank, 0)?;
        }
        if self.log_prob_output {
            s.equals(&outputs[1].datum_type, &inputs[0].datum_type)?;
            s.equals(&outputs[1].shape, &inputs[0].shape)?;
        }
        Ok(())
    }
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 2 + self.has_weight as usize, "{}: wrong number of inputs", self.op);
        let dt = inputs[0].datum_type;
        ensure!(dt.is_float(), "{}: input must be a float tensor, got {dt:?}", self.op);
        ensure!(
            inputs[1].datum_type.is_integer(),
            "{}: target must be integer, got {:?}",
            self.op,
            inputs[1].datum_type
        );
        let loss = if self.reduction == Reduction::None {
            TypedFact::dt_shape(dt, inputs[1].shape.clone())
        } else {
            TypedFact::dt_scalar(dt)
        };
        let mut v = tvec!(loss);
        if self.log_prob_output {
            v.push(TypedFact::dt_shape(dt, inputs[0].shape.clone()));
        }
        Ok(v)
    }
    fn eval(&self, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let op = self.op;
        let dt = inputs[0].datum_type();
        let mut x = to_f64(&inputs[0])?;
        let target = to_i64(&inputs[1])?;
        let weight = if self.has_weight { Some(to_f64(&inputs[2])?) } else { None };
        let shape = x.shape().to_vec();
        ensure!(shape.len() >= 2, "{op}: input must have rank >= 2, got {shape:?}");
        let (n, c) = (shape[0], shape[1]);
        let d: usize = shape[2..].iter().product();
        let mut tshape = vec![n];
        tshape.extend_from_slice(&shape[2..]);
        ensure!(
            target.shape() == tshape.as_slice(),
            "{op}: target shape {:?} does not match input {shape:?}",
            target.shape()
        );
        if let Some(w) = &weight {
            ensure!(w.shape() == [c], "{op}: weight shape {:?} must be [{c}]", w.shape());
        }
        if self.softmax {
            // log-softmax over axis 1
            let mut xs = x.into_shape_with_order((n, c, d))?;
            for i in 0..n {
                for j in 0..d {
                    let max = (0..c).map(|k| xs[(i, k, j)]).fold(f64::NEG_INFINITY, f64::max);
                    let sum: f64 = (0..c).map(|k| (xs[(i, k, j)] - max).exp()).sum();
                    let lse = max + sum.ln();
                    for k in 0..c {
                        xs[(i, k, j)] -= lse;
                    }
                }
            }
            x = xs.into_shape_with_order(shape.clone())?.into_dyn();
        }
        let x3 = x.view().into_shape_with_order((n, c, d))?;
        let t2 = target.view().into_shape_with_order((n, d))?;
        let mut loss = vec![0f64; n * d];
        let mut wsum = 0f64;
        for i in 0..n {
            for j in 0..d {
                let t = t2[(i, j)];
                if Some(t) == self.ignore_index {
                    continue;
                }
                ensure!(t >= 0 && (t as usize) < c, "{op}: target {t} is out of range for {c} classes");
                let w = weight.as_ref().map(|w| w[t as usize]).unwrap_or(1.0);
                loss[i * d + j] = -x3[(i, t as usize, j)] * w;
                wsum += w;
            }
        }
        let out = match self.reduction {
            Reduction::None => tract_ndarray::ArrayD::from_shape_vec(tshape, loss)?,
            Reduction::Sum => tract_ndarray::arr0(loss.iter().sum::<f64>()).into_dyn(),
            Reduction::Mean => {
                let denom = if weight.is_none() && self.ignore_index.is_none() { (n * d) as f64 } else { wsum };
                tract_ndarray::arr0(loss.iter().sum::<f64>() / denom).into_dyn()
            }
        };
        let mut v = tvec!(from_f64(out, dt)?);
        if self.log_prob_output {
            v.push(from_f64(x, dt)?);
        }
        Ok(v)
    }
}
