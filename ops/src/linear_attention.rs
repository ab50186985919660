//! ONNX LinearAttention (opset 27): the recurrent linear-attention family (linear, gated, delta, gated_delta) run
//! token by token over packed [B, T, H·D] inputs, with GQA and an optional past state [B, H_kv, d_k, d_v].
//! Computed in f64, returned in the query's type.

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use crate::kernel::*;
use crate::BuildResult;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    Linear,
    Gated,
    Delta,
    GatedDelta,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LinearAttention {
    pub rule: Rule,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub scale: f32,
    /// input slot (among the node's present inputs) of past_state, decay, beta
    pub past: Option<usize>,
    pub decay: Option<usize>,
    pub beta: Option<usize>,
    pub n_inputs: usize,
}

pub fn build(_ctx: &ParsingContext, node: &NodeProto) -> BuildResult {
    let op = "LinearAttention";
    let rule = match node.get_attr_opt::<String>("update_rule")?.as_deref().unwrap_or("gated_delta") {
        "linear" => Rule::Linear,
        "gated" => Rule::Gated,
        "delta" => Rule::Delta,
        "gated_delta" => Rule::GatedDelta,
        other => bail!("{op}: unknown update_rule `{other}`"),
    };
    let q_heads: i64 = node.get_attr("q_num_heads")?;
    let kv_heads: i64 = node.get_attr("kv_num_heads")?;
    ensure!(
        q_heads > 0 && kv_heads > 0 && q_heads % kv_heads == 0,
        "{op}: q_num_heads must be a positive multiple of kv_num_heads"
    );
    let mut slots = tract_onnx::model::optional_inputs(node);
    let _q = slots.next();
    let _k = slots.next();
    let _v = slots.next();
    let past = slots.next().flatten();
    let decay = slots.next().flatten();
    let beta = slots.next().flatten();
    let n_inputs = node.input.iter().filter(|s| !s.is_empty()).count();
    ensure!(n_inputs >= 3, "{op}: query, key and value are required");
    if matches!(rule, Rule::Gated | Rule::GatedDelta) {
        ensure!(decay.is_some(), "{op}: update_rule {rule:?} needs decay");
    }
    if matches!(rule, Rule::Delta | Rule::GatedDelta) {
        ensure!(beta.is_some(), "{op}: update_rule {rule:?} needs beta");
    }
    let k = LinearAttention {
        rule,
        q_heads: q_heads as usize,
        kv_heads: kv_heads as usize,
        scale: node.get_attr_opt::<f32>("scale")?.unwrap_or(0.0),
        past,
        decay,
        beta,
        n_inputs,
    };
    Ok((expand(KernelExpansion(k)), vec![]))
}

impl Kernel for LinearAttention {
    fn name(&self) -> &'static str {
        "LinearAttention"
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
        check_input_arity(inputs, self.n_inputs)?;
        s.equals(&outputs[0].datum_type, &inputs[0].datum_type)?;
        s.equals(&outputs[1].datum_type, &inputs[0].datum_type)?;
        s.equals(&outputs[0].rank, 3)?;
        s.equals(&outputs[1].rank, 4)
    }
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let op = "LinearAttention";
        ensure!(inputs.len() == self.n_inputs, "{op}: wrong number of inputs");
        let (q, k, v) = (inputs[0], inputs[1], inputs[2]);
        ensure!(q.rank() == 3 && k.rank() == 3 && v.rank() == 3, "{op}: query, key, value must be [B, T, H*D]");
        let dt = q.datum_type;
        ensure!(dt.is_float(), "{op}: inputs must be float");
        let dk = k.shape[2].clone() / self.kv_heads as u64;
        let dv = v.shape[2].clone() / self.kv_heads as u64;
        let out = tvec!(q.shape[0].clone(), q.shape[1].clone(), dv.clone() * self.q_heads as u64);
        let state = tvec!(q.shape[0].clone(), self.kv_heads.into(), dk, dv);
        Ok(tvec!(TypedFact::dt_shape(dt, out), TypedFact::dt_shape(dt, state)))
    }
    fn eval(&self, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let op = "LinearAttention";
        let dt = inputs[0].datum_type();
        let q = to_f64(&inputs[0])?;
        let k = to_f64(&inputs[1])?;
        let v = to_f64(&inputs[2])?;
        ensure!(q.ndim() == 3 && k.ndim() == 3 && v.ndim() == 3, "{op}: query, key, value must be rank 3");
        let (b, t) = (q.shape()[0], q.shape()[1]);
        ensure!(k.shape()[..2] == [b, t] && v.shape()[..2] == [b, t], "{op}: batch/time of q, k, v differ");
        let (hq, hkv) = (self.q_heads, self.kv_heads);
        ensure!(q.shape()[2] % hq == 0 && k.shape()[2] % hkv == 0 && v.shape()[2] % hkv == 0, "{op}: head sizes");
        let dk = q.shape()[2] / hq;
        ensure!(k.shape()[2] / hkv == dk, "{op}: query and key head sizes differ");
        let dv = v.shape()[2] / hkv;
        let group = hq / hkv;
        let scale = if self.scale == 0.0 { 1.0 / (dk as f64).sqrt() } else { self.scale as f64 };
        let mut state = match self.past {
            Some(i) => {
                let p = to_f64(&inputs[i])?;
                ensure!(
                    p.shape() == [b, hkv, dk, dv],
                    "{op}: past_state must be [{b}, {hkv}, {dk}, {dv}], got {:?}",
                    p.shape()
                );
                p.into_shape_with_order((b, hkv, dk, dv))?
            }
            None => tract_ndarray::Array4::<f64>::zeros((b, hkv, dk, dv)),
        };
        let decay = self.decay.map(|i| to_f64(&inputs[i])).transpose()?;
        let per_key_decay = match &decay {
            Some(d) => {
                ensure!(d.ndim() == 3 && d.shape()[..2] == [b, t], "{op}: decay must be [B, T, ..]");
                if d.shape()[2] == hkv * dk {
                    true
                } else {
                    ensure!(d.shape()[2] == hkv, "{op}: decay last dim must be H_kv or H_kv*d_k");
                    false
                }
            }
            None => false,
        };
        let beta = self.beta.map(|i| to_f64(&inputs[i])).transpose()?;
        if let Some(bt) = &beta {
            ensure!(
                bt.ndim() == 3 && bt.shape()[..2] == [b, t] && (bt.shape()[2] == hkv || bt.shape()[2] == 1),
                "{op}: beta must be [B, T, H_kv] or [B, T, 1]"
            );
        }
        let gated = matches!(self.rule, Rule::Gated | Rule::GatedDelta);
        let delta = matches!(self.rule, Rule::Delta | Rule::GatedDelta);
        let mut out = tract_ndarray::Array3::<f64>::zeros((b, t, hq * dv));
        let mut kv_proj = vec![0f64; dv];
        for bi in 0..b {
            for ti in 0..t {
                for h in 0..hkv {
                    let mut s = state.slice_mut(tract_ndarray::s![bi, h, .., ..]);
                    if gated {
                        let d = decay
                            .as_ref()
                            .ok_or_else(|| format_err!("{op}: update_rule {:?} needs decay", self.rule))?;
                        for kk in 0..dk {
                            let g = if per_key_decay { d[[bi, ti, h * dk + kk]] } else { d[[bi, ti, h]] };
                            let e = g.exp();
                            s.row_mut(kk).mapv_inplace(|x| x * e);
                        }
                    }
                    let beta_t =
                        beta.as_ref().map(|bt| bt[[bi, ti, if bt.shape()[2] == 1 { 0 } else { h }]]).unwrap_or(1.0);
                    if delta {
                        for (vv, p) in kv_proj.iter_mut().enumerate() {
                            *p = (0..dk).map(|kk| s[[kk, vv]] * k[[bi, ti, h * dk + kk]]).sum();
                        }
                    }
                    for kk in 0..dk {
                        let kval = k[[bi, ti, h * dk + kk]];
                        for vv in 0..dv {
                            let vval = v[[bi, ti, h * dv + vv]];
                            s[[kk, vv]] += if delta { beta_t * kval * (vval - kv_proj[vv]) } else { kval * vval };
                        }
                    }
                    for g in 0..group {
                        let qh = h * group + g;
                        for vv in 0..dv {
                            let o: f64 = (0..dk).map(|kk| q[[bi, ti, qh * dk + kk]] * s[[kk, vv]]).sum();
                            out[[bi, ti, qh * dv + vv]] = scale * o;
                        }
                    }
                }
            }
        }
        Ok(tvec!(from_f64(out.into_dyn(), dt)?, from_f64(state.into_dyn(), dt)?))
    }
}
