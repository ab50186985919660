//! com.microsoft MultiHeadAttention as kiln ops: the node expands into kiln's [`AttentionOp`] (CPU reference; the
//! fused attention kernel on the GPU) plus the few elementwise and layout nodes that bring its inputs to the
//! shapes that op reads.
//!
//! Semantics (onnxruntime's CPU kernel):
//! - query `[batch, seq, num_heads·head]`; key / value `[batch, kv_seq, num_heads·head]` (BSD) or `[batch,
//!   num_heads, kv_seq, head]` (BNSH, already projected); or packed QKV in query (`[batch, seq, num_heads, 3,
//!   head]`, key and value absent); or packed KV in key (`[batch, kv_seq, num_heads, 2, head]`, value absent);
//! - `bias` (`[3·hidden]`, BSD / packed inputs) is added to Q, K and V;
//! - `key_padding_mask`: `[batch, total]` (0 = masked: `mask_filter_value`, default −10000, is added to the
//!   score) or `[batch]` (the number of valid keys per batch; the keys after it take no weight);
//! - `attention_bias` (`[batch or 1, heads or 1, seq, total]`) is added to the scores;
//! - `past_key` / `past_value` (`[batch, heads, past, head]`) are prepended to K / V: `present_key` /
//!   `present_value`;
//! - `unidirectional`: query i attends keys `j <= past + i`;
//! - `scale` (default `1/sqrt(head)`).
//!
//! Rejected with an error: `past_sequence_length` and `cache_indirection` (the decoder-masked beam-search kernel),
//! other key_padding_mask shapes (checked at run time by the attention op), the qk output.

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_core::ops::array::Slice;
use tract_onnx::tract_core::ops::cast::cast;
use tract_onnx::tract_core::ops::math;
use tract_onnx::tract_hir::internal::*;

use crate::attention::{AttentionConfig, AttentionOp};
use crate::BuildResult;

fn given(names: &[String], ix: usize) -> bool {
    names.get(ix).is_some_and(|n| !n.is_empty())
}

pub fn build(ctx: &ParsingContext, node: &NodeProto) -> BuildResult {
    if node.domain != "com.microsoft" {
        return crate::tract_builder(ctx, node);
    }
    let heads = node.get_attr_opt::<i64>("num_heads")?.unwrap_or(0);
    ensure!(heads > 0, "MultiHeadAttention: num_heads={heads} must be positive");
    let scale = node.get_attr_opt::<f32>("scale")?.filter(|s| *s != 0.0);
    if let Some(s) = scale {
        ensure!(s.is_finite(), "MultiHeadAttention: scale={s} is not finite");
    }
    let mask_filter_value = node.get_attr_opt::<f32>("mask_filter_value")?.unwrap_or(-10000.0);
    ensure!(mask_filter_value.is_finite(), "MultiHeadAttention: mask_filter_value must be finite");
    let causal = node.get_attr_opt::<i64>("unidirectional")?.unwrap_or(0) != 0;
    ensure!(given(&node.input, 0), "MultiHeadAttention needs its query");
    for (i, name) in [(8, "past_sequence_length"), (9, "cache_indirection")] {
        ensure!(!given(&node.input, i), "MultiHeadAttention: unsupported input {name}");
    }
    ensure!(node.input.len() <= 10, "MultiHeadAttention: too many inputs");
    ensure!(!given(&node.output, 3), "MultiHeadAttention: unsupported output qk");
    ensure!(
        given(&node.input, 6) == given(&node.input, 7),
        "MultiHeadAttention: past_key and past_value must be given together"
    );
    let layout = match (given(&node.input, 1), given(&node.input, 2)) {
        (true, true) => Layout::Separate,
        (true, false) => Layout::PackedKv,
        (false, false) => Layout::PackedQkv,
        (false, true) => bail!("MultiHeadAttention: value without key"),
    };
    let mut slots = [None; 8];
    let mut next = 0;
    for (i, slot) in slots.iter_mut().enumerate() {
        if given(&node.input, i) {
            *slot = Some(next);
            next += 1;
        }
    }
    let outputs = [0, 1, 2].map(|i| given(&node.output, i));
    ensure!(outputs.iter().any(|o| *o), "MultiHeadAttention has no output");
    let mha = Mha { heads: heads as usize, scale, mask_filter_value, causal, layout, slots, n_inputs: next, outputs };
    Ok((expand(mha), vec![]))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Layout {
    Separate,
    PackedKv,
    PackedQkv,
}

#[derive(Debug, Clone)]
struct Mha {
    heads: usize,
    scale: Option<f32>,
    mask_filter_value: f32,
    causal: bool,
    layout: Layout,
    slots: [Option<usize>; 8],
    n_inputs: usize,
    outputs: [bool; 3],
}

impl Mha {
    fn wire_inner(&self, prefix: &str, model: &mut TypedModel, inputs: &[OutletId]) -> TractResult<[OutletId; 3]> {
        let input = |i: usize| self.slots[i].map(|s| inputs[s]);
        let n = self.heads;
        let q_in = input(0).context("MultiHeadAttention: no query")?;
        // packed [b, s, n, parts, h] → each part as [b, s, n·h]
        let unpack = |model: &mut TypedModel, x: OutletId, part: usize, name: &str| -> TractResult<OutletId> {
            let f = model.outlet_fact(x)?.clone();
            ensure!(f.rank() == 5, "MultiHeadAttention: packed input must be 5D, got {:?}", f.shape);
            let sl = Slice { axis: 3, start: part.to_dim(), end: (part + 1).to_dim() };
            let x = model.wire_node(format!("{prefix}.{name}"), sl, &[x])?[0];
            let (nh, h) = (f.shape[2].clone(), f.shape[4].clone());
            let merge = AxisOp::Reshape(2, tvec![nh.clone(), 1.to_dim(), h.clone()], tvec![nh * h]);
            Ok(model.wire_node(format!("{prefix}.{name}.merge"), merge, &[x])?[0])
        };
        let (mut q, mut k, mut v) = match self.layout {
            Layout::Separate => (
                q_in,
                input(1).context("MultiHeadAttention: no key")?,
                input(2).context("MultiHeadAttention: no value")?,
            ),
            Layout::PackedKv => {
                let kv = input(1).context("MultiHeadAttention: no key")?;
                (q_in, unpack(model, kv, 0, "k")?, unpack(model, kv, 1, "v")?)
            }
            Layout::PackedQkv => {
                (unpack(model, q_in, 0, "q")?, unpack(model, q_in, 1, "k")?, unpack(model, q_in, 2, "v")?)
            }
        };
        ensure!(model.outlet_fact(q)?.rank() == 3, "MultiHeadAttention: query must be 3D [batch, seq, hidden]");
        let k_rank = model.outlet_fact(k)?.rank();
        ensure!(
            (k_rank == 3 || k_rank == 4) && model.outlet_fact(v)?.rank() == k_rank,
            "MultiHeadAttention: key and value must both be 3D or both 4D"
        );
        if let Some(bias) = input(3) {
            ensure!(k_rank == 3, "MultiHeadAttention: bias with BNSH key / value");
            let hq = model.outlet_fact(q)?.shape[2].clone();
            let hk = model.outlet_fact(k)?.shape[2].clone();
            let hv = model.outlet_fact(v)?.shape[2].clone();
            let cuts =
                [(0.to_dim(), hq.clone()), (hq.clone(), hq.clone() + hk.clone()), (hq + hk.clone(), hk * 2 + hv)];
            for (x, (a, b), name) in
                [(&mut q, cuts[0].clone(), "q"), (&mut k, cuts[1].clone(), "k"), (&mut v, cuts[2].clone(), "v")]
            {
                let part =
                    model.wire_node(format!("{prefix}.bias_{name}"), Slice { axis: 0, start: a, end: b }, &[bias])?[0];
                let part = model.wire_node(format!("{prefix}.bias_{name}.b"), AxisOp::Add(0), &[part])?[0];
                let part = model.wire_node(format!("{prefix}.bias_{name}.s"), AxisOp::Add(0), &[part])?[0];
                *x = model.wire_node(format!("{prefix}.add_bias_{name}"), math::add(), &[*x, part])?[0];
            }
        }
        let dt = model.outlet_fact(q)?.datum_type;
        // the float mask: key_padding_mask [b, total] as 0 / mask_filter_value, plus attention_bias
        let mut mask: Option<OutletId> = None;
        let mut nonpad = None;
        if let Some(m) = input(4) {
            let mf = model.outlet_fact(m)?.clone();
            match mf.rank() {
                1 => nonpad = Some(m),
                2 => {
                    let b = model.wire_node(format!("{prefix}.mask_bool"), cast(DatumType::Bool), &[m])?[0];
                    let f = model.wire_node(format!("{prefix}.mask_f"), cast(dt), &[b])?[0];
                    let mfv = self.mask_filter_value;
                    let mul = model
                        .add_const(format!("{prefix}.mask_mul"), tensor2(&[[-mfv]]).cast_to_dt(dt)?.into_owned())?;
                    let add = model
                        .add_const(format!("{prefix}.mask_add"), tensor2(&[[mfv]]).cast_to_dt(dt)?.into_owned())?;
                    let x = model.wire_node(format!("{prefix}.mask_scale"), math::mul(), &[f, mul])?[0];
                    let x = model.wire_node(format!("{prefix}.mask_shift"), math::add(), &[x, add])?[0];
                    let x = model.wire_node(format!("{prefix}.mask_h"), AxisOp::Add(1), &[x])?[0];
                    mask = Some(model.wire_node(format!("{prefix}.mask_s"), AxisOp::Add(1), &[x])?[0]);
                }
                r => bail!("MultiHeadAttention: key_padding_mask of rank {r} (shape {:?}) is unsupported", mf.shape),
            }
        }
        if let Some(bias) = input(5) {
            let bf = model.outlet_fact(bias)?.clone();
            ensure!(bf.rank() == 4, "MultiHeadAttention: attention_bias must be 4D, got {:?}", bf.shape);
            mask = Some(match mask {
                Some(m) => model.wire_node(format!("{prefix}.mask_bias"), math::add(), &[m, bias])?[0],
                None => bias,
            });
        }
        let config = AttentionConfig {
            q_num_heads: Some(n),
            kv_num_heads: Some(n),
            is_causal: self.causal,
            scale: self.scale,
            softcap: 0.0,
            qk_mode: 0,
            has_mask: mask.is_some(),
            has_past_key: input(6).is_some(),
            has_past_value: input(7).is_some(),
            has_nonpad: nonpad.is_some(),
            seqlens: false,
            window: None,
        };
        let mut ins = tvec![q, k, v];
        ins.extend(mask);
        ins.extend(input(6));
        ins.extend(input(7));
        ins.extend(nonpad);
        let att = model.wire_node(format!("{prefix}.attention"), AttentionOp { config }, &ins)?;
        Ok([att[0], att[1], att[2]])
    }
}

impl Expansion for Mha {
    fn name(&self) -> StaticName {
        "MultiHeadAttention".into()
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
        let mut slot = 0;
        for (i, o) in self.outputs.iter().enumerate() {
            if *o {
                s.equals(&outputs[slot].datum_type, &inputs[0].datum_type)?;
                s.equals(&outputs[slot].rank, if i == 0 { 3 } else { 4 })?;
                slot += 1;
            }
        }
        Ok(())
    }

    fn wire(&self, prefix: &str, model: &mut TypedModel, inputs: &[OutletId]) -> TractResult<TVec<OutletId>> {
        let all = self.wire_inner(prefix, model, inputs)?;
        Ok(all.into_iter().zip(self.outputs).filter(|(_, keep)| *keep).map(|(o, _)| o).collect())
    }
}
