//! ONNX Attention (opset 23/24), kiln's own kernel.
//!
//! tract 0.23.9's importer hands boolean masks to its SDPA unconverted (codegen then refuses them), builds the causal
//! mask without the past offset, and rejects `softcap`, `qk_matmul_output_mode` and `nonpad_kv_seqlen`. kiln's op
//! follows onnx's reference implementation (`onnx/reference/ops/op_attention.py`):
//!
//! - Q/K/V are 4D `[batch, heads, seq, head_size]` or 3D `[batch, seq, heads·head_size]` (then `q_num_heads` and
//!   `kv_num_heads` are required);
//! - `past_key`/`past_value` (`[batch, kv_heads, past, head_size]`) are prepended to K/V; the concatenations are the
//!   `present_key`/`present_value` outputs;
//! - `attn_mask` broadcasts to `[batch, q_heads, q_seq, total]`: bool (true = attend) or additive float; a last dim
//!   shorter than `total` is padded with "masked";
//! - `is_causal`: query `i` attends to key `j` only when `j <= i + past` (past = past_key's length);
//! - `nonpad_kv_seqlen` (opset 24, `[batch]`): keys at and past it are masked;
//! - GQA: q head `h` reads kv head `h / (q_heads / kv_heads)`;
//! - `scores = scale·Q·Kᵀ` (scale defaults to `1/sqrt(head_size)`), then softcap (`c·tanh(s/c)`), then the bias, then
//!   softmax; `qk_matmul_output` is the scores after softcap (modes 0, 1), with the bias (2) or after softmax (3).
//!
//! A query whose keys are all masked gets zero weights (a zero output row), as onnxruntime's CPU kernel does; onnx's
//! reference yields NaN there. f16 inputs compute in f32, f64 in f64.

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_core::internal as core;
use tract_onnx::tract_hir::internal::*;

use crate::BuildResult;

fn present(names: &[String], ix: usize) -> bool {
    names.get(ix).is_some_and(|n| !n.is_empty())
}

pub fn build(_ctx: &ParsingContext, node: &NodeProto) -> BuildResult {
    let mode = node.get_attr_opt::<i64>("qk_matmul_output_mode")?.unwrap_or(0);
    ensure!((0..=3).contains(&mode), "Attention: qk_matmul_output_mode={mode} is not one of 0, 1, 2, 3");
    let heads = |name: &str| -> TractResult<Option<usize>> {
        match node.get_attr_opt::<i64>(name)? {
            None => Ok(None),
            Some(v) if v > 0 => Ok(Some(v as usize)),
            Some(v) => bail!("Attention: {name}={v} must be positive"),
        }
    };
    let softcap = node.get_attr_opt::<f32>("softcap")?.unwrap_or(0.0);
    ensure!(softcap >= 0.0 && softcap.is_finite(), "Attention: softcap={softcap} must be a finite value >= 0");
    let scale = node.get_attr_opt::<f32>("scale")?;
    if let Some(s) = scale {
        ensure!(s.is_finite(), "Attention: scale={s} is not finite");
    }
    ensure!(node.input.len() >= 3 && (0..3).all(|i| present(&node.input, i)), "Attention needs Q, K and V");
    ensure!(node.input.len() <= 7, "Attention takes at most 7 inputs, got {}", node.input.len());
    ensure!(present(&node.output, 0) || node.output.len() > 1, "Attention has no output");
    let config = AttentionConfig {
        q_num_heads: heads("q_num_heads")?,
        kv_num_heads: heads("kv_num_heads")?,
        is_causal: node.get_attr_opt::<i64>("is_causal")?.unwrap_or(0) != 0,
        scale,
        softcap,
        qk_mode: mode as u8,
        has_mask: present(&node.input, 3),
        has_past_key: present(&node.input, 4),
        has_past_value: present(&node.input, 5),
        has_nonpad: present(&node.input, 6),
        seqlens: false,
        window: None,
    };
    ensure!(config.has_past_key == config.has_past_value, "Attention: past_key and past_value must be given together");
    let outputs = [0, 1, 2, 3].map(|i| present(&node.output, i));
    Ok((expand(Attention { config, outputs }), vec![]))
}

/// What the node computes; shared by the inference-time expansion and the typed op.
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionConfig {
    pub q_num_heads: Option<usize>,
    pub kv_num_heads: Option<usize>,
    pub is_causal: bool,
    pub scale: Option<f32>,
    pub softcap: f32,
    pub qk_mode: u8,
    pub has_mask: bool,
    pub has_past_key: bool,
    pub has_past_value: bool,
    pub has_nonpad: bool,
    /// com.microsoft GroupQueryAttention's masking (kiln's GQA lowering): the `nonpad` input holds `seqlens_k`
    /// (each batch's total length − 1); batch `b`'s queries sit after `past_b = max(seqlens_k[b] + 1 − q_seq, 0)`
    /// keys and attend causally from there (`j <= past_b + i`, and `j <= seqlens_k[b]`), whatever `is_causal`
    /// says. Keys come from K / V only (no past inputs: K / V are the present ones).
    pub seqlens: bool,
    /// With `seqlens`: a query at `past_b + i` attends keys `j > past_b + i − window` only (the last `window`
    /// positions, its own included: onnxruntime's `local_window_size`).
    pub window: Option<usize>,
}

impl Eq for AttentionConfig {}

impl std::hash::Hash for AttentionConfig {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.q_num_heads.hash(state);
        self.kv_num_heads.hash(state);
        self.is_causal.hash(state);
        self.scale.map(f32::to_bits).hash(state);
        self.softcap.to_bits().hash(state);
        self.qk_mode.hash(state);
        (self.has_mask, self.has_past_key, self.has_past_value, self.has_nonpad).hash(state);
        (self.seqlens, self.window).hash(state);
    }
}

impl AttentionConfig {
    fn n_inputs(&self) -> usize {
        3 + self.has_mask as usize
            + self.has_past_key as usize
            + self.has_past_value as usize
            + self.has_nonpad as usize
    }
    /// Positions of the optional inputs among the inputs actually given (tract drops empty names).
    fn mask_ix(&self) -> Option<usize> {
        self.has_mask.then_some(3)
    }
    fn past_key_ix(&self) -> Option<usize> {
        self.has_past_key.then_some(3 + self.has_mask as usize)
    }
    fn past_value_ix(&self) -> Option<usize> {
        self.has_past_value.then_some(3 + self.has_mask as usize + self.has_past_key as usize)
    }
    fn nonpad_ix(&self) -> Option<usize> {
        self.has_nonpad
            .then_some(3 + self.has_mask as usize + self.has_past_key as usize + self.has_past_value as usize)
    }

    /// Output shapes `[Y, present_key, present_value, qk_matmul_output]` from the input shapes.
    fn output_shapes(&self, shapes: &[TVec<TDim>]) -> TractResult<[TVec<TDim>; 4]> {
        ensure!(
            shapes.len() == self.n_inputs(),
            "Attention: expected {} inputs, got {}",
            self.n_inputs(),
            shapes.len()
        );
        let (q, k, v) = (&shapes[0], &shapes[1], &shapes[2]);
        let rank = q.len();
        ensure!(rank == 3 || rank == 4, "Attention: Q must be 3D or 4D, got rank {rank}");
        ensure!(k.len() == 3 || k.len() == 4, "Attention: K must be 3D or 4D, got rank {}", k.len());
        ensure!(v.len() == k.len(), "Attention: K and V must have the same rank");
        let batch = q[0].clone();
        let (hq, s) = if rank == 4 {
            (q[1].clone(), q[2].clone())
        } else {
            let hq = self.q_num_heads.context("Attention: 3D inputs need the q_num_heads attribute")?;
            (hq.to_dim(), q[1].clone())
        };
        let (hkv, l, dk, dv): (TDim, TDim, TDim, TDim) = if k.len() == 4 {
            (k[1].clone(), k[2].clone(), k[3].clone(), v[3].clone())
        } else {
            let hkv = self.kv_num_heads.context("Attention: 3D inputs need the kv_num_heads attribute")?;
            (hkv.to_dim(), k[1].clone(), k[2].clone() / hkv as u64, v[2].clone() / hkv as u64)
        };
        let past = match self.past_key_ix() {
            Some(ix) => {
                let pk = &shapes[ix];
                ensure!(pk.len() == 4, "Attention: past_key must be 4D, got rank {}", pk.len());
                pk[2].clone()
            }
            None => 0.to_dim(),
        };
        let total = past + l;
        let y: TVec<TDim> = if rank == 4 {
            tvec![batch.clone(), hq.clone(), s.clone(), dv.clone()]
        } else {
            tvec![batch.clone(), s.clone(), hq.clone() * dv.clone()]
        };
        Ok([
            y,
            tvec![batch.clone(), hkv.clone(), total.clone(), dk],
            tvec![batch.clone(), hkv, total.clone(), dv],
            tvec![batch, hq, s, total],
        ])
    }
}

/// The ONNX node as tract's inference sees it; wires [`AttentionOp`] and returns the outputs the node names.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
pub struct Attention {
    pub config: AttentionConfig,
    /// Which of `[Y, present_key, present_value, qk_matmul_output]` the node names.
    pub outputs: [bool; 4],
}

impl Expansion for Attention {
    fn name(&self) -> StaticName {
        "Attention".into()
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
        check_input_arity(inputs, self.config.n_inputs())?;
        check_output_arity(outputs, self.nboutputs()?)?;
        // output slot of each of the 4 ONNX outputs
        let mut slots = [None; 4];
        let mut next = 0;
        for (i, o) in self.outputs.iter().enumerate() {
            if *o {
                slots[i] = Some(next);
                next += 1;
            }
        }
        for (i, slot) in slots.iter().enumerate() {
            if let Some(o) = slot {
                let src = if i == 1 || i == 2 { &inputs[1].datum_type } else { &inputs[0].datum_type };
                s.equals(&outputs[*o].datum_type, src)?;
                if i == 0 {
                    s.equals(&outputs[*o].rank, &inputs[0].rank)?;
                } else {
                    s.equals(&outputs[*o].rank, 4)?;
                }
            }
        }
        let n = self.config.n_inputs();
        s.given_all((0..n).map(|i| &inputs[i].shape), move |s, shapes| {
            let shapes: Vec<TVec<TDim>> = shapes.into_iter().map(|s| s.into_iter().collect()).collect();
            let computed = self.config.output_shapes(&shapes)?;
            for (i, slot) in slots.iter().enumerate() {
                if let Some(o) = slot {
                    s.equals(&outputs[*o].shape, ShapeFactoid::from(computed[i].clone()))?;
                }
            }
            Ok(())
        })
    }

    fn wire(&self, prefix: &str, model: &mut TypedModel, inputs: &[OutletId]) -> TractResult<TVec<OutletId>> {
        let all = model.wire_node(prefix, AttentionOp { config: self.config.clone() }, inputs)?;
        Ok(all.into_iter().zip(self.outputs).filter(|(_, keep)| *keep).map(|(o, _)| o).collect())
    }
}

/// The typed op: inputs as given (Q, K, V, then the optional ones present), outputs
/// `[Y, present_key, present_value, qk_matmul_output]`.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
pub struct AttentionOp {
    pub config: AttentionConfig,
}

impl Op for AttentionOp {
    fn name(&self) -> StaticName {
        "KilnAttention".into()
    }
    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("{:?}", self.config)])
    }
    core::op_as_typed_op!();
}

impl TypedOp for AttentionOp {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let shapes: Vec<TVec<TDim>> = inputs.iter().map(|f| f.shape.to_tvec()).collect();
        let q_dt = inputs[0].datum_type;
        let k_dt = inputs[1].datum_type;
        ensure!(
            matches!(q_dt, DatumType::F16 | DatumType::F32 | DatumType::F64),
            "Attention: Q must be float16, float or double, got {q_dt:?}"
        );
        ensure!(
            inputs[1].datum_type == q_dt && inputs[2].datum_type == q_dt,
            "Attention: Q, K and V must share an element type"
        );
        let [y, pk, pv, qk] = self.config.output_shapes(&shapes)?;
        Ok(tvec![q_dt.fact(y), k_dt.fact(pk), k_dt.fact(pv), q_dt.fact(qk)])
    }
    core::as_op!();
}

impl EvalOp for AttentionOp {
    core::op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let dt = inputs[0].datum_type();
        if dt == DatumType::F64 {
            self.eval_t::<f64>(&inputs)
        } else {
            self.eval_t::<f32>(&inputs)
        }
    }
}

/// The float type the kernel accumulates in.
trait Real: Datum + Copy + Default + PartialOrd + std::ops::Add<Output = Self> + std::ops::Mul<Output = Self> {
    const NEG_INF: Self;
    fn from_f32(v: f32) -> Self;
    fn from_f64(v: f64) -> Self;
    fn exp(self) -> Self;
    fn tanh(self) -> Self;
    fn sub(self, o: Self) -> Self;
    fn div(self, o: Self) -> Self;
}

impl Real for f32 {
    const NEG_INF: f32 = f32::NEG_INFINITY;
    fn from_f32(v: f32) -> f32 {
        v
    }
    fn from_f64(v: f64) -> f32 {
        v as f32
    }
    fn exp(self) -> f32 {
        f32::exp(self)
    }
    fn tanh(self) -> f32 {
        f32::tanh(self)
    }
    fn sub(self, o: f32) -> f32 {
        self - o
    }
    fn div(self, o: f32) -> f32 {
        self / o
    }
}

impl Real for f64 {
    const NEG_INF: f64 = f64::NEG_INFINITY;
    fn from_f32(v: f32) -> f64 {
        v as f64
    }
    fn from_f64(v: f64) -> f64 {
        v
    }
    fn exp(self) -> f64 {
        f64::exp(self)
    }
    fn tanh(self) -> f64 {
        f64::tanh(self)
    }
    fn sub(self, o: f64) -> f64 {
        self - o
    }
    fn div(self, o: f64) -> f64 {
        self / o
    }
}

/// Element strides of a `[batch, heads, seq, head]` view over a 3D or 4D tensor.
#[derive(Clone, Copy, Debug)]
struct View {
    batch: usize,
    heads: usize,
    seq: usize,
    head: usize,
    strides: [usize; 4],
}

impl View {
    fn new(shape: &[usize], heads_attr: Option<usize>, what: &str) -> TractResult<View> {
        match *shape {
            [b, h, s, d] => Ok(View { batch: b, heads: h, seq: s, head: d, strides: [h * s * d, s * d, d, 1] }),
            [b, s, hidden] => {
                let h = heads_attr.with_context(|| format!("Attention: 3D {what} needs its num_heads attribute"))?;
                ensure!(hidden % h == 0, "Attention: {what} hidden size {hidden} is not a multiple of {h} heads");
                let d = hidden / h;
                Ok(View { batch: b, heads: h, seq: s, head: d, strides: [s * hidden, d, hidden, 1] })
            }
            _ => bail!("Attention: {what} must be 3D or 4D, got shape {shape:?}"),
        }
    }
    fn at(&self, b: usize, h: usize, s: usize) -> usize {
        b * self.strides[0] + h * self.strides[1] + s * self.strides[2]
    }
}

fn to_real<F: Real>(t: &Tensor) -> TractResult<Vec<F>> {
    let c = t.cast_to_dt(F::datum_type())?;
    Ok(c.try_as_plain_ram()?.as_slice::<F>()?.to_vec())
}

/// K or V with its past prepended: contiguous `[batch, kv_heads, past + seq, head]`.
fn concat_past<F: Real>(past: Option<(&[F], &[usize])>, cur: &[F], view: &View) -> TractResult<(Vec<F>, usize)> {
    let p = match past {
        Some((_, shape)) => {
            ensure!(
                shape.len() == 4 && shape[0] == view.batch && shape[1] == view.heads && shape[3] == view.head,
                "Attention: past shape {shape:?} does not match [batch={}, kv_heads={}, past, head_size={}]",
                view.batch,
                view.heads,
                view.head
            );
            shape[2]
        }
        None => 0,
    };
    let t = p + view.seq;
    let mut out = Vec::with_capacity(view.batch * view.heads * t * view.head);
    for b in 0..view.batch {
        for h in 0..view.heads {
            if let Some((data, _)) = past {
                let start = (b * view.heads + h) * p * view.head;
                out.extend_from_slice(&data[start..start + p * view.head]);
            }
            for s in 0..view.seq {
                let at = view.at(b, h, s);
                out.extend_from_slice(&cur[at..at + view.head]);
            }
        }
    }
    Ok((out, t))
}

impl AttentionOp {
    fn eval_t<F: Real>(&self, inputs: &[TValue]) -> TractResult<TVec<TValue>> {
        let c = &self.config;
        ensure!(inputs.len() == c.n_inputs(), "Attention: expected {} inputs, got {}", c.n_inputs(), inputs.len());
        let (q_t, k_t, v_t) = (&inputs[0], &inputs[1], &inputs[2]);
        let (q_dt, k_dt) = (q_t.datum_type(), k_t.datum_type());
        let qv = View::new(q_t.shape(), c.q_num_heads, "Q")?;
        let kv = View::new(k_t.shape(), c.kv_num_heads, "K")?;
        let vv = View::new(v_t.shape(), c.kv_num_heads, "V")?;
        let rank = q_t.rank();
        // Q may be 3D with 4D K / V (kiln's com.microsoft lowerings); K and V agree
        ensure!(v_t.rank() == k_t.rank(), "Attention: K and V must have the same rank");
        ensure!(
            kv.batch == qv.batch && vv.batch == qv.batch,
            "Attention: batch sizes differ (Q {}, K {}, V {})",
            qv.batch,
            kv.batch,
            vv.batch
        );
        ensure!(kv.head == qv.head, "Attention: Q head size {} differs from K's {}", qv.head, kv.head);
        ensure!(
            kv.heads == vv.heads && kv.seq == vv.seq,
            "Attention: K [heads {}, seq {}] and V [heads {}, seq {}] disagree",
            kv.heads,
            kv.seq,
            vv.heads,
            vv.seq
        );
        ensure!(
            kv.heads > 0 && qv.heads % kv.heads == 0,
            "Attention: q_num_heads {} is not a multiple of kv_num_heads {}",
            qv.heads,
            kv.heads
        );
        let group = qv.heads / kv.heads;
        let (batch, hq, s_len, dk, dv) = (qv.batch, qv.heads, qv.seq, qv.head, vv.head);

        let q = to_real::<F>(q_t)?;
        let k = to_real::<F>(k_t)?;
        let v = to_real::<F>(v_t)?;
        let past_k = c.past_key_ix().map(|i| to_real::<F>(&inputs[i]).map(|d| (d, inputs[i].shape().to_vec())));
        let past_k = past_k.transpose()?;
        let past_v = c.past_value_ix().map(|i| to_real::<F>(&inputs[i]).map(|d| (d, inputs[i].shape().to_vec())));
        let past_v = past_v.transpose()?;
        let past_len = past_k.as_ref().map(|p| p.1.get(2).copied().unwrap_or(0)).unwrap_or(0);
        let (k_full, total) = concat_past(past_k.as_ref().map(|(d, s)| (d.as_slice(), s.as_slice())), &k, &kv)?;
        let (v_full, total_v) = concat_past(past_v.as_ref().map(|(d, s)| (d.as_slice(), s.as_slice())), &v, &vv)?;
        ensure!(total == total_v, "Attention: past_key and past_value lengths differ");

        // attention mask, broadcast to [batch, hq, s, total] through strides; masked = -inf
        let mask = match c.mask_ix() {
            Some(ix) => {
                let m = &inputs[ix];
                let shape = m.shape();
                ensure!(
                    (1..=4).contains(&shape.len()),
                    "Attention: attn_mask must have rank 1 to 4, got shape {shape:?}"
                );
                let values: Vec<F> = if m.datum_type() == DatumType::Bool {
                    let b = m.try_as_plain_ram()?;
                    b.as_slice::<bool>()?.iter().map(|x| if *x { F::default() } else { F::NEG_INF }).collect()
                } else {
                    ensure!(
                        m.datum_type().is_float(),
                        "Attention: attn_mask must be bool or float, got {:?}",
                        m.datum_type()
                    );
                    to_real::<F>(m)?
                };
                let mut dims = [1usize; 4];
                dims[4 - shape.len()..].copy_from_slice(shape);
                let target = [batch, hq, s_len, total];
                // the last dim is never broadcast: keys past its length are masked (onnx pads it with -inf)
                let mut strides = [0usize; 4];
                let mut acc = 1;
                for i in (0..4).rev() {
                    let ok = if i == 3 { dims[i] <= total } else { dims[i] == target[i] || dims[i] == 1 };
                    ensure!(
                        ok,
                        "Attention: attn_mask shape {shape:?} does not broadcast to [batch, q_heads, q_seq, total] = {target:?}"
                    );
                    strides[i] = if i < 3 && dims[i] == 1 { 0 } else { acc };
                    acc *= dims[i];
                }
                Some((values, strides, dims[3]))
            }
            None => None,
        };
        let nonpad: Option<Vec<i64>> = match c.nonpad_ix() {
            Some(ix) => {
                let t = inputs[ix].cast_to_dt(DatumType::I64)?;
                let n = t.try_as_plain_ram()?.as_slice::<i64>()?.to_vec();
                ensure!(n.len() == batch, "Attention: nonpad_kv_seqlen must have {batch} values, got {}", n.len());
                Some(n)
            }
            None => None,
        };

        let scale = F::from_f64(match c.scale {
            Some(s) => s as f64,
            None => 1.0 / (dk as f64).sqrt(),
        });
        let softcap = F::from_f32(c.softcap);
        let want_qk = true;

        let y_shape: Vec<usize> = if rank == 4 { vec![batch, hq, s_len, dv] } else { vec![batch, s_len, hq * dv] };
        let y_strides: [usize; 3] =
            if rank == 4 { [hq * s_len * dv, s_len * dv, dv] } else { [s_len * hq * dv, dv, hq * dv] };
        let mut y = vec![F::default(); batch * hq * s_len * dv];
        let mut qk = if want_qk { vec![F::default(); batch * hq * s_len * total] } else { vec![] };
        let mut scores = vec![F::default(); total];
        let mut acc = vec![F::default(); dv];
        for b in 0..batch {
            for h in 0..hq {
                let hk = h / group;
                let kbase = (b * kv.heads + hk) * total;
                for i in 0..s_len {
                    let qrow = &q[qv.at(b, h, i)..qv.at(b, h, i) + dk];
                    let qk_row = ((b * hq + h) * s_len + i) * total;
                    let mut max = F::NEG_INF;
                    for (j, score) in scores.iter_mut().enumerate() {
                        let krow = &k_full[(kbase + j) * dk..(kbase + j + 1) * dk];
                        let mut dot = F::default();
                        for d in 0..dk {
                            dot = dot + qrow[d] * krow[d];
                        }
                        let mut x = dot * scale;
                        if c.softcap > 0.0 {
                            x = softcap * x.div(softcap).tanh();
                        }
                        if want_qk && c.qk_mode <= 1 {
                            qk[qk_row + j] = x;
                        }
                        let mut bias = F::default();
                        if let Some((values, strides, len)) = &mask {
                            if j >= *len {
                                bias = F::NEG_INF;
                            } else {
                                bias = values[b * strides[0] + h * strides[1] + i * strides[2] + j * strides[3]];
                            }
                        }
                        if c.is_causal && j > i + past_len {
                            bias = F::NEG_INF;
                        }
                        if let Some(n) = &nonpad {
                            if c.seqlens {
                                // GroupQueryAttention: causal from past_b, within the window
                                let past_b = (n[b] + 1 - s_len as i64).max(0);
                                let at = past_b + i as i64;
                                let j = j as i64;
                                if j > at || j > n[b] || c.window.is_some_and(|w| at - j >= w as i64) {
                                    bias = F::NEG_INF;
                                }
                            } else if (j as i64) >= n[b] {
                                bias = F::NEG_INF;
                            }
                        }
                        x = x + bias;
                        if want_qk && c.qk_mode == 2 {
                            qk[qk_row + j] = x;
                        }
                        if x > max {
                            max = x;
                        }
                        *score = x;
                    }
                    if max == F::NEG_INF {
                        // every key masked: onnxruntime yields zeros (onnx's reference, NaN)
                        scores.iter_mut().for_each(|p| *p = F::default());
                    } else {
                        let mut sum = F::default();
                        for score in scores.iter_mut() {
                            *score = score.sub(max).exp();
                            sum = sum + *score;
                        }
                        for score in scores.iter_mut() {
                            *score = score.div(sum);
                        }
                    }
                    if want_qk && c.qk_mode == 3 {
                        qk[qk_row..qk_row + total].copy_from_slice(&scores);
                    }
                    acc.iter_mut().for_each(|a| *a = F::default());
                    for (j, p) in scores.iter().enumerate() {
                        let vrow = &v_full[(kbase + j) * dv..(kbase + j + 1) * dv];
                        for d in 0..dv {
                            acc[d] = acc[d] + *p * vrow[d];
                        }
                    }
                    let ybase = b * y_strides[0] + h * y_strides[1] + i * y_strides[2];
                    y[ybase..ybase + dv].copy_from_slice(&acc);
                }
            }
        }
        let out = |data: Vec<F>, shape: &[usize], dt: DatumType| -> TractResult<TValue> {
            let t = Tensor::from_shape::<F>(shape, &data)?;
            Ok(t.cast_to_dt(dt)?.into_owned().into_tvalue())
        };
        Ok(tvec![
            out(y, &y_shape, q_dt)?,
            out(k_full, &[batch, kv.heads, total, dk], k_dt)?,
            out(v_full, &[batch, kv.heads, total, dv], k_dt)?,
            out(qk, &[batch, hq, s_len, total], q_dt)?,
        ])
    }
}

/// Attention's Y alone (the other outputs unused or computed by other nodes): what kiln's GPU lowering places on
/// the GPU. Same inputs as [`AttentionOp`]; its CPU evaluation is [`AttentionOp`]'s first output.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
pub struct AttentionYOp {
    pub config: AttentionConfig,
}

impl Op for AttentionYOp {
    fn name(&self) -> StaticName {
        "KilnAttentionY".into()
    }
    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("{:?}", self.config)])
    }
    core::op_as_typed_op!();
}

impl TypedOp for AttentionYOp {
    /// As [`AttentionOp`]'s Y, except that with a float32 Q, K / V and past K / V may be float16 (a float16
    /// model's KV cache kept in float16 by kiln's GPU lowering): read as float32, exactly.
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let c = &self.config;
        let q_dt = inputs.first().map(|f| f.datum_type);
        let kv_slots = [Some(1), Some(2), c.past_key_ix(), c.past_value_ix()];
        let widened: Vec<TypedFact> = inputs
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let kv = kv_slots.contains(&Some(i));
                if kv && q_dt == Some(DatumType::F32) && f.datum_type == DatumType::F16 {
                    let mut w = (*f).clone();
                    w.datum_type = DatumType::F32;
                    w
                } else {
                    (*f).clone()
                }
            })
            .collect();
        let refs: Vec<&TypedFact> = widened.iter().collect();
        let all = AttentionOp { config: c.clone() }.output_facts(&refs)?;
        Ok(tvec![all[0].clone()])
    }
    core::as_op!();
}

impl EvalOp for AttentionYOp {
    core::op_out_of_plan!();

    fn eval(&self, ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let mut all = AttentionOp { config: self.config.clone() }.eval(ctx, inputs)?;
        Ok(tvec![all.swap_remove(0)])
    }
}
