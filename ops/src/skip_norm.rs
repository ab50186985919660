//! Norms fused with their neighbours, as one kiln op ([`NormOp`]: one GPU dispatch): com.microsoft
//! SkipSimplifiedLayerNormalization, SkipLayerNormalization and SimplifiedLayerNormalization, and (through kiln's
//! GPU fusion pass) the residual Add + RMSNorm that optimum and dynamo exports decompose.
//!
//! [`NormOp`] normalises the last axis of `s = x (+ skip) (+ bias)`:
//! - RMS (simplified): `y = s / sqrt(mean(s²) + eps) (· gamma)`;
//! - layer norm: `y = (s − mean(s)) / sqrt(mean((s − mean)²) + eps) (· gamma) (+ beta)`.
//!
//! The ops' `input_skip_bias_sum` output (the residual stream) is the plain sum, wired as Add nodes beside the
//! norm (they fuse into one elementwise dispatch on the GPU). The `mean` and `inv_std_var` outputs are rejected
//! when named (onnxruntime computes them for training only); SimplifiedLayerNormalization normalises the last axis
//! only (`axis` = −1 or rank − 1).

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_core::internal as core;
use tract_onnx::tract_core::ops::math;
use tract_onnx::tract_hir::internal::*;

use crate::BuildResult;

fn given(names: &[String], ix: usize) -> bool {
    names.get(ix).is_some_and(|n| !n.is_empty())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Family {
    SkipSimplified,
    Skip,
    Simplified,
}

fn build_family(ctx: &ParsingContext, node: &NodeProto, family: Family) -> BuildResult {
    let ms = node.domain == "com.microsoft";
    // SimplifiedLayerNormalization is registered in onnxruntime's default domain too
    if !(ms || (family == Family::Simplified && crate::is_onnx_domain(node))) {
        return crate::tract_builder(ctx, node);
    }
    let eps = node.get_attr_opt::<f32>("epsilon")?.unwrap_or(if family == Family::Simplified { 1e-5 } else { 1e-12 });
    ensure!(eps.is_finite() && eps >= 0.0, "{}: epsilon={eps} must be finite and >= 0", node.op_type);
    let mut slots = [None; 5];
    let mut next = 0;
    for (i, slot) in slots.iter_mut().enumerate() {
        if given(&node.input, i) {
            *slot = Some(next);
            next += 1;
        }
    }
    ensure!(node.input.len() <= 5, "{}: too many inputs", node.op_type);
    let (stats, sum_out): (&[usize], Option<usize>) = match family {
        Family::Simplified => {
            ensure!(given(&node.input, 0) && given(&node.input, 1), "SimplifiedLayerNormalization needs X and scale");
            (&[1], None)
        }
        _ => {
            ensure!(
                given(&node.input, 0) && given(&node.input, 1) && given(&node.input, 2),
                "{} needs input, skip and gamma",
                node.op_type
            );
            (&[1, 2], Some(3))
        }
    };
    for &i in stats {
        ensure!(!given(&node.output, i), "{}: unsupported output {i} (mean / inv_std_var)", node.op_type);
    }
    let axis = if family == Family::Simplified { node.get_attr_opt::<i64>("axis")?.unwrap_or(-1) } else { -1 };
    let outputs = [given(&node.output, 0), sum_out.is_some_and(|i| given(&node.output, i))];
    ensure!(outputs.iter().any(|o| *o), "{} has no output", node.op_type);
    Ok((expand(FusedNorm { family, eps, slots, n_inputs: next, outputs, axis }), vec![]))
}

pub fn build_skip_simplified(ctx: &ParsingContext, node: &NodeProto) -> BuildResult {
    build_family(ctx, node, Family::SkipSimplified)
}

pub fn build_skip(ctx: &ParsingContext, node: &NodeProto) -> BuildResult {
    build_family(ctx, node, Family::Skip)
}

pub fn build_simplified(ctx: &ParsingContext, node: &NodeProto) -> BuildResult {
    build_family(ctx, node, Family::Simplified)
}

#[derive(Debug, Clone)]
struct FusedNorm {
    family: Family,
    eps: f32,
    /// Given-input position of the ONNX inputs 0..5.
    slots: [Option<usize>; 5],
    n_inputs: usize,
    /// [output, input_skip_bias_sum]
    outputs: [bool; 2],
    axis: i64,
}

impl Expansion for FusedNorm {
    fn name(&self) -> StaticName {
        match self.family {
            Family::SkipSimplified => "SkipSimplifiedLayerNormalization",
            Family::Skip => "SkipLayerNormalization",
            Family::Simplified => "SimplifiedLayerNormalization",
        }
        .into()
    }

    fn nboutputs(&self) -> TractResult<usize> {
        Ok(self.outputs.iter().filter(|o| **o).count())
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, self.n_inputs)?;
        check_output_arity(outputs, self.nboutputs()?)?;
        for o in outputs {
            s.equals(&o.datum_type, &inputs[0].datum_type)?;
            s.equals(&o.shape, &inputs[0].shape)?;
        }
        Ok(())
    }

    fn wire(&self, prefix: &str, model: &mut TypedModel, inputs: &[OutletId]) -> TractResult<TVec<OutletId>> {
        let input = |i: usize| self.slots[i].map(|s| inputs[s]);
        let x = input(0).context("norm: no input")?;
        let xf = model.outlet_fact(x)?.clone();
        let rank = xf.rank();
        ensure!(rank >= 1, "{}: scalar input", self.name());
        let axis = if self.axis < 0 { self.axis + rank as i64 } else { self.axis };
        ensure!(axis == rank as i64 - 1, "{}: axis {} (only the last axis is supported)", self.name(), self.axis);
        let (skip, gamma, beta, bias) = match self.family {
            Family::Simplified => (None, input(1), None, None),
            Family::SkipSimplified => (input(1), input(2), None, input(3)),
            Family::Skip => (input(1), input(2), input(3), input(4)),
        };
        let op = NormOp {
            rms: self.family != Family::Skip,
            eps: self.eps,
            has_skip: skip.is_some(),
            has_bias: bias.is_some(),
            has_gamma: gamma.is_some(),
            has_beta: beta.is_some(),
        };
        let mut ins = tvec![x];
        ins.extend(skip);
        ins.extend(bias);
        ins.extend(gamma);
        ins.extend(beta);
        let y = model.wire_node(format!("{prefix}.norm"), op, &ins)?[0];
        let mut outs = tvec![];
        if self.outputs[0] {
            outs.push(y);
        }
        if self.outputs[1] {
            let skip = skip.context("norm: no skip")?;
            let mut sum = x;
            for (t, name) in [(Some(skip), "skip"), (bias, "bias")] {
                let Some(mut t) = t else { continue };
                while model.outlet_fact(t)?.rank() < rank {
                    t = model.wire_node(
                        format!("{prefix}.sum_{name}.rank{}", model.outlet_fact(t)?.rank()),
                        AxisOp::Add(0),
                        &[t],
                    )?[0];
                }
                sum = model.wire_node(format!("{prefix}.sum_{name}"), math::add(), &[sum, t])?[0];
            }
            outs.push(sum);
        }
        Ok(outs)
    }
}

/// A norm over the last axis of `x (+ skip) (+ bias)`, then `· gamma`, `+ beta`: inputs (x, skip?, bias?, gamma?,
/// beta?) — skip shaped like x or like its last axes (broadcast over the leading rows), bias / gamma / beta one
/// value per channel. RMS when `rms`, else layer norm (mean subtracted).
#[derive(Debug, Clone, PartialEq)]
pub struct NormOp {
    pub rms: bool,
    pub eps: f32,
    pub has_skip: bool,
    pub has_bias: bool,
    pub has_gamma: bool,
    pub has_beta: bool,
}

impl Eq for NormOp {}

impl std::hash::Hash for NormOp {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (self.rms, self.eps.to_bits(), self.has_skip, self.has_bias, self.has_gamma, self.has_beta).hash(state)
    }
}

impl NormOp {
    pub fn arity(&self) -> usize {
        1 + self.has_skip as usize + self.has_bias as usize + self.has_gamma as usize + self.has_beta as usize
    }

    /// (rows, channels) of an evaluation, after checking every input's size; `lens` are the inputs' lengths.
    pub fn geometry(&self, x: &[usize], lens: &[usize]) -> TractResult<(usize, usize)> {
        ensure!(lens.len() == self.arity(), "norm: {} inputs for {}", lens.len(), self.arity());
        let d = *x.last().context("norm: scalar input")?;
        let n: usize = x.iter().product();
        let rows = n.checked_div(d).unwrap_or(0);
        let mut at = 1;
        if self.has_skip {
            let s = lens[at];
            ensure!(
                s > 0 && d > 0 && s.is_multiple_of(d) && rows % (s / d) == 0,
                "norm: skip of {s} values for input {x:?}"
            );
            at += 1;
        }
        for _ in 0..(self.has_bias as usize + self.has_gamma as usize + self.has_beta as usize) {
            ensure!(lens[at] == d, "norm: a per-channel input of {} values for {d} channels", lens[at]);
            at += 1;
        }
        Ok((rows, d))
    }
}

impl Op for NormOp {
    fn name(&self) -> StaticName {
        "KilnNorm".into()
    }
    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("{self:?}")])
    }
    core::op_as_typed_op!();
}

impl TypedOp for NormOp {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == self.arity(), "norm: input count");
        let dt = inputs[0].datum_type;
        ensure!(dt.is_float(), "norm: input must be float, got {dt:?}");
        Ok(tvec![dt.fact(inputs[0].shape.clone())])
    }
    core::as_op!();
}

impl EvalOp for NormOp {
    core::op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let lens: Vec<usize> = inputs.iter().map(|t| t.len()).collect();
        let (rows, d) = self.geometry(inputs[0].shape(), &lens)?;
        let f64s = |t: &Tensor| -> TractResult<Vec<f64>> {
            Ok(t.cast_to_dt(DatumType::F64)?.try_as_plain_ram()?.as_slice::<f64>()?.to_vec())
        };
        let x = f64s(&inputs[0])?;
        let mut at = 1;
        let mut next = |on: bool| -> TractResult<Option<Vec<f64>>> {
            if !on {
                return Ok(None);
            }
            at += 1;
            f64s(&inputs[at - 1]).map(Some)
        };
        let skip = next(self.has_skip)?;
        let bias = next(self.has_bias)?;
        let gamma = next(self.has_gamma)?;
        let beta = next(self.has_beta)?;
        let mut y = vec![0f64; x.len()];
        let mut s = vec![0f64; d];
        for r in 0..rows {
            for (c, v) in s.iter_mut().enumerate() {
                let i = r * d + c;
                *v = x[i] + skip.as_ref().map_or(0.0, |k| k[i % k.len()]) + bias.as_ref().map_or(0.0, |b| b[c]);
            }
            let mean = if self.rms { 0.0 } else { s.iter().sum::<f64>() / d as f64 };
            let var = s.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / d as f64;
            let inv = 1.0 / (var + self.eps as f64).sqrt();
            for c in 0..d {
                let mut v = (s[c] - mean) * inv;
                if let Some(g) = &gamma {
                    v *= g[c];
                }
                if let Some(b) = &beta {
                    v += b[c];
                }
                y[r * d + c] = v;
            }
        }
        let t = Tensor::from_shape::<f64>(inputs[0].shape(), &y)?;
        Ok(tvec![t.cast_to_dt(inputs[0].datum_type())?.into_owned().into_tvalue()])
    }
}
