//! Greedy decoding with a KV cache over a decoder-only LLM export (optimum, torch dynamo).
//!
//! Inputs are recognised by name: `input_ids`, `attention_mask` (optional), `position_ids` (optional),
//! `use_cache_branch` (optional, merged decoders) and the past key/value inputs (any name with `past` or `cache`).
//! Each past input is paired with the present output of the same layer and kind (`past_key_values.3.key` ↔
//! `present.3.key`, `past_key_values_3_key` ↔ `present_key_values_3_key`, ...) or, failing that, by position.

use std::path::Path;
use std::time::Instant;

use kiln_provider::blocking::Session;
use kiln_provider::{
    Dim, ElementType, Location, PreferredOutputLocation, RunOptions, Tensor, Value, ValueInfo, NEXT_TOKEN,
};

pub struct DecodeResult {
    pub tokens: Vec<i64>,
    pub prefill_ms: f64,
    pub decode_ms: Vec<f64>,
    /// The GPU placement report once warm (counters and profile so far): after the first decode step when more
    /// follow (it compiles the one-row kernels), else after the prefill; the later steps' share of the totals.
    pub warm: Option<kiln_provider::PlacementReport>,
}

#[derive(Debug, Clone)]
struct Past {
    input: String,
    element_type: ElementType,
    /// Shape of the empty cache (the sequence axis is 0).
    empty_dims: Vec<usize>,
    present: String,
}

#[derive(Debug)]
pub struct DecodePlan {
    input_ids: (String, ElementType),
    attention_mask: Option<(String, ElementType)>,
    position_ids: Option<(String, ElementType)>,
    use_cache_branch: Option<String>,
    pasts: Vec<Past>,
    logits: String,
    /// kiln's next-token output (the argmax on the device), when the session has it.
    next_token: Option<String>,
    /// The vocabulary size when the model or config.json gives it.
    vocab: Option<usize>,
    /// On the GPU, keep `present.*` on the GPU and feed it back as the next `past_key_values.*` (the KV Concat then
    /// appends in place); `false` reads every cache back and uploads it again.
    pub gpu_kv: bool,
    /// With the cache on the GPU and kiln's next-token output: the token also stays on the GPU and is fed back as
    /// the next `input_ids`, and step s's token is read back after step s + 1 is submitted, so the host records a
    /// step while the GPU runs the one before ([`DecodePlan::greedy`]). `false`: each step reads its token back
    /// before the next is recorded.
    pub pipeline: bool,
}

fn et(v: &ValueInfo) -> Result<ElementType, String> {
    v.element_type.ok_or_else(|| format!("`{}` has an element type kiln does not support", v.name))
}

/// The layer number and kind (`key`/`value`/other) written in a cache tensor's name.
fn kv_slot(name: &str) -> Option<(u64, &'static str)> {
    let lower = name.to_ascii_lowercase();
    let key = lower.rfind("key");
    let value = lower.rfind("value");
    let kind = match (key, value) {
        (Some(k), Some(v)) if k > v => "key",
        (Some(_), Some(_)) | (None, Some(_)) => "value",
        (Some(_), None) => "key",
        (None, None) => "kv",
    };
    // the last run of digits is the layer
    let digits: Vec<(usize, char)> = lower.char_indices().filter(|(_, c)| c.is_ascii_digit()).collect();
    let (last_ix, _) = *digits.last()?;
    let mut start = last_ix;
    while start > 0 && lower.as_bytes()[start - 1].is_ascii_digit() {
        start -= 1;
    }
    let layer = lower[start..=last_ix].parse().ok()?;
    Some((layer, kind))
}

/// Reads `config.json` beside the model or one level above (Hugging Face layout: `onnx/model.onnx`).
fn read_config(model: &Path) -> Option<serde_json::Value> {
    let dir = model.parent()?;
    for d in [Some(dir), dir.parent()].into_iter().flatten() {
        if let Ok(text) = std::fs::read_to_string(d.join("config.json")) {
            if let Ok(v) = serde_json::from_str(&text) {
                return Some(v);
            }
        }
    }
    None
}

fn config_usize(config: &serde_json::Value, keys: &[&str]) -> Option<usize> {
    keys.iter().find_map(|k| config.get(*k).and_then(|v| v.as_u64())).map(|v| v as usize)
}

/// kv heads and head size from config.json.
fn config_kv_dims(model: &Path) -> (Option<usize>, Option<usize>) {
    let Some(c) = read_config(model) else { return (None, None) };
    let heads = config_usize(&c, &["num_attention_heads", "n_head", "num_heads"]);
    let kv_heads = config_usize(&c, &["num_key_value_heads", "n_head_kv", "num_kv_heads"]).or(heads);
    let hidden = config_usize(&c, &["hidden_size", "n_embd", "d_model"]);
    let head_dim = config_usize(&c, &["head_dim"]).or(match (hidden, heads) {
        (Some(h), Some(n)) if n > 0 => Some(h / n),
        _ => None,
    });
    (kv_heads, head_dim)
}

fn is_seq_name(s: &str) -> bool {
    let s = s.to_ascii_lowercase();
    s.contains("past") || s.contains("seq") || s.contains("total") || s.contains("len")
}

/// The empty cache for a past input: batch 1, sequence 0, heads and head size from the declared shape or config.json.
fn empty_dims(info: &ValueInfo, model: &Path) -> Result<Vec<usize>, String> {
    let declared = info.shape.clone().unwrap_or_else(|| vec![Dim::Unknown; 4]);
    let rank = declared.len();
    if rank < 2 {
        return Err(format!("past input `{}` has rank {rank}; expected [batch, heads, past, head_dim]", info.name));
    }
    let seq_axis = declared.iter().position(|d| matches!(d, Dim::Symbolic(s) if is_seq_name(s))).unwrap_or(rank - 2);
    let (kv_heads, head_dim) = config_kv_dims(model);
    let mut dims = vec![];
    for (i, d) in declared.iter().enumerate() {
        let v = match d {
            _ if i == seq_axis => 0,
            Dim::Fixed(v) => *v,
            _ if i == 0 => 1,
            _ if i == rank - 1 => head_dim.ok_or_else(|| {
                format!(
                    "past input `{}` {}: the head size is not declared and no config.json beside the model gives it",
                    info.name,
                    info.shape_string()
                )
            })?,
            _ if i == 1 => kv_heads.ok_or_else(|| {
                format!(
                    "past input `{}` {}: the number of kv heads is not declared and no config.json gives it",
                    info.name,
                    info.shape_string()
                )
            })?,
            _ => 1,
        };
        dims.push(v);
    }
    Ok(dims)
}

impl DecodePlan {
    pub fn new(session: &Session, model: &Path) -> Result<DecodePlan, String> {
        let inputs = session.inputs();
        let outputs = session.outputs();
        let mut input_ids = None;
        let mut attention_mask = None;
        let mut position_ids = None;
        let mut use_cache_branch = None;
        let mut past_inputs = vec![];
        for i in inputs {
            let n = i.name.to_ascii_lowercase();
            if n.contains("input_ids") || n == "ids" || n == "tokens" {
                input_ids = Some((i.name.clone(), et(i)?));
            } else if n.contains("attention_mask") || n == "mask" {
                attention_mask = Some((i.name.clone(), et(i)?));
            } else if n.contains("position_ids") || n == "positions" {
                position_ids = Some((i.name.clone(), et(i)?));
            } else if n.contains("use_cache") {
                use_cache_branch = Some(i.name.clone());
            } else if n.contains("past") || n.contains("cache") {
                past_inputs.push(i);
            } else {
                return Err(format!(
                    "do not know how to feed input `{}` {} {} (known: input_ids, attention_mask, position_ids, \
                     past_key_values.*, use_cache_branch)",
                    i.name,
                    i.element_type.map(|t| t.name()).unwrap_or("?"),
                    i.shape_string()
                ));
            }
        }
        let input_ids = input_ids.ok_or_else(|| {
            format!(
                "the model has no `input_ids` input (inputs: {}); is it a decoder-only language model?",
                session.input_names().join(", ")
            )
        })?;
        let logits = outputs
            .iter()
            .find(|o| o.name == "logits")
            .or_else(|| outputs.iter().find(|o| o.name.to_ascii_lowercase().contains("logits")))
            .or_else(|| outputs.first())
            .map(|o| o.name.clone())
            .ok_or("the model has no outputs")?;
        let next_token = outputs.iter().find(|o| o.name == NEXT_TOKEN).map(|o| o.name.clone());
        let presents: Vec<&ValueInfo> = outputs.iter().filter(|o| o.name != logits && o.name != NEXT_TOKEN).collect();
        let present_names: Vec<&str> = presents.iter().map(|p| p.name.as_str()).collect();

        // pair past inputs with present outputs
        let mut pairs: Vec<Option<String>> = vec![None; past_inputs.len()];
        // 1. the usual renames
        for (k, p) in past_inputs.iter().enumerate() {
            for (from, to) in
                [("past_key_values", "present"), ("past_key_values", "present_key_values"), ("past", "present")]
            {
                let candidate = p.name.replacen(from, to, 1);
                if candidate != p.name && present_names.contains(&candidate.as_str()) {
                    pairs[k] = Some(candidate);
                    break;
                }
            }
        }
        // 2. same (layer, kind) in the name
        if pairs.iter().any(|p| p.is_none()) {
            let past_slots: Vec<_> = past_inputs.iter().map(|p| kv_slot(&p.name)).collect();
            let present_slots: Vec<_> = presents.iter().map(|p| kv_slot(&p.name)).collect();
            let unique = |v: &Vec<Option<(u64, &str)>>| {
                v.iter().all(|s| s.is_some()) && v.iter().collect::<std::collections::HashSet<_>>().len() == v.len()
            };
            if unique(&past_slots) && unique(&present_slots) {
                for (k, s) in past_slots.iter().enumerate() {
                    if pairs[k].is_none() {
                        pairs[k] = present_slots.iter().position(|p| p == s).map(|ix| presents[ix].name.clone());
                    }
                }
            }
        }
        // 3. by position
        if pairs.iter().any(|p| p.is_none()) {
            if presents.len() != past_inputs.len() {
                return Err(format!(
                    "cannot pair the past inputs ({}) with the present outputs ({})",
                    past_inputs.iter().map(|p| p.name.as_str()).collect::<Vec<_>>().join(", "),
                    present_names.join(", ")
                ));
            }
            pairs = presents.iter().map(|p| Some(p.name.clone())).collect();
        }
        let mut pasts = vec![];
        for (p, present) in past_inputs.iter().zip(pairs) {
            pasts.push(Past {
                input: p.name.clone(),
                element_type: et(p)?,
                empty_dims: empty_dims(p, model)?,
                present: present.unwrap_or_default(),
            });
        }
        let vocab = outputs
            .iter()
            .find(|o| o.name == logits)
            .and_then(|o| match o.shape.as_ref()?.last()? {
                Dim::Fixed(v) => Some(*v),
                _ => None,
            })
            .or_else(|| read_config(model).and_then(|c| config_usize(&c, &["vocab_size"])));
        Ok(DecodePlan {
            input_ids,
            attention_mask,
            position_ids,
            use_cache_branch,
            pasts,
            logits,
            next_token,
            vocab,
            gpu_kv: true,
            pipeline: true,
        })
    }

    /// Prefill with `prompt`, then `steps - 1` single-token steps; returns the `steps` generated ids. On the GPU the
    /// cache stays there between steps: every `present.*` is asked for as a GPU buffer and fed back as the next
    /// `past_key_values.*` (appended in place where kiln can), only the logits are read back — or, with kiln's
    /// next-token output, only the token: pipelined ([`DecodePlan::pipeline`]), step s + 1 takes step s's token
    /// on the GPU as its `input_ids` and is submitted before that token is read back. A token's time is the time
    /// since the one before it was known on the host.
    pub fn greedy(&self, session: &Session, prompt: &[i64], steps: usize) -> Result<DecodeResult, String> {
        if prompt.is_empty() {
            return Err("the prompt has no tokens".into());
        }
        if let Some(bad) = prompt.iter().find(|i| **i < 0 || self.vocab.is_some_and(|v| **i as u64 >= v as u64)) {
            return Err(format!(
                "token id {bad} is outside the vocabulary (0..{})",
                self.vocab.map(|v| v.to_string()).unwrap_or_else(|| "?".into())
            ));
        }
        let mut cache: Vec<Value> = self
            .pasts
            .iter()
            .map(|p| Tensor::from_bytes(p.element_type, &p.empty_dims, &[]).map(Value::Cpu))
            .collect::<Result<_, _>>()
            .map_err(|e| format!("building the empty cache: {e}"))?;
        let on_gpu = self.gpu_kv && session.gpu_placement().is_some();
        // pipelined: the token stays on the GPU too (read back one step later)
        let pipelined = self.next_token.as_ref().filter(|_| on_gpu && self.pipeline);
        let run_options = RunOptions {
            preferred_output_location: on_gpu.then(|| {
                PreferredOutputLocation::PerOutput(
                    self.pasts
                        .iter()
                        .map(|p| p.present.clone())
                        .chain(pipelined.cloned())
                        .map(|name| (name, Location::GpuBuffer))
                        .collect(),
                )
            }),
        };
        // pipelined: the previous step's token on the GPU (fed as this step's input_ids, then read back)
        let mut on_device: Option<kiln_provider::GpuTensor> = None;
        let mut past_len = 0usize;
        let mut feed: Vec<i64> = prompt.to_vec();
        let mut tokens = vec![];
        let mut prefill_ms = 0.0;
        let mut decode_ms = vec![];
        let mut warm = None;
        // a token's time: since the one before it was known on the host (the prefill's: since the start)
        let mut last_token_at = Instant::now();
        let mut known = |token: i64, tokens: &mut Vec<i64>| {
            let now = Instant::now();
            let ms = now.duration_since(last_token_at).as_secs_f64() * 1e3;
            last_token_at = now;
            if tokens.is_empty() {
                prefill_ms = ms;
            } else {
                decode_ms.push(ms);
            }
            tokens.push(token);
        };
        for step in 0..steps {
            let seq = if step == 0 { prompt.len() } else { 1 };
            let mut feeds: Vec<(String, Value)> = vec![];
            let ids: Value = match &on_device {
                Some(g) => g.clone().into(),
                None => int_tensor(self.input_ids.1, &[1, seq], feed.clone())?.into(),
            };
            feeds.push((self.input_ids.0.clone(), ids));
            if let Some((name, t)) = &self.attention_mask {
                feeds.push((name.clone(), int_tensor(*t, &[1, past_len + seq], vec![1; past_len + seq])?.into()));
            }
            if let Some((name, t)) = &self.position_ids {
                let pos = (past_len as i64..(past_len + seq) as i64).collect();
                feeds.push((name.clone(), int_tensor(*t, &[1, seq], pos)?.into()));
            }
            if let Some(name) = &self.use_cache_branch {
                let flag = Tensor::from_vec(&[1], vec![past_len > 0]).map_err(|e| e.to_string())?;
                feeds.push((name.clone(), flag.into()));
            }
            for (p, t) in self.pasts.iter().zip(cache.drain(..)) {
                feeds.push((p.input.clone(), t));
            }
            // with kiln's next-token output, the logits are not fetched (on the GPU: not read back)
            let mut wanted: Vec<&str> = vec![self.next_token.as_deref().unwrap_or(&self.logits)];
            wanted.extend(self.pasts.iter().map(|p| p.present.as_str()));
            // pipelined: the previous token's copy is queued before this step, and awaited once this step is
            // submitted (the GPU runs the two back to back while the host records)
            let previous = on_device.take().map(|g| g.download());
            let mut out = session
                .run_with(feeds, Some(&wanted), &run_options)
                .map_err(|e| format!("step {step} (past {past_len}, seq {seq}): {e}"))?;
            for p in &self.pasts {
                cache.push(out.take_value(&p.present).ok_or_else(|| format!("no output `{}`", p.present))?);
            }
            if let Some(name) = pipelined {
                match out.take_value(name) {
                    Some(Value::Gpu(g)) => on_device = Some(g),
                    _ => return Err(format!("step {step}: the next-token output is not on the GPU")),
                }
                if let Some(d) = previous {
                    let t = pollster::block_on(d).map_err(|e| format!("step {step}: reading a token back: {e}"))?;
                    known(first_token(&t)?, &mut tokens);
                }
            } else {
                let next = match &self.next_token {
                    Some(name) => first_token(&out.take(name).ok_or("no next-token output")?)?,
                    None => argmax_last(&out.take(&self.logits).ok_or("no logits output")?)?,
                };
                known(next, &mut tokens);
                feed = vec![next];
            }
            // the counters once warm: after the first decode step (it compiles the one-row kernels) when more follow
            if step == usize::from(steps > 2) {
                warm = session.gpu_placement();
            }
            past_len += seq;
        }
        if let Some(g) = on_device {
            let t = pollster::block_on(g.download()).map_err(|e| format!("reading the last token back: {e}"))?;
            known(first_token(&t)?, &mut tokens);
        }
        Ok(DecodeResult { tokens, prefill_ms, decode_ms, warm })
    }
}

fn int_tensor(t: ElementType, dims: &[usize], values: Vec<i64>) -> Result<Tensor, String> {
    let r = match t {
        ElementType::I64 => Tensor::from_vec(dims, values),
        ElementType::I32 => Tensor::from_vec(dims, values.into_iter().map(|v| v as i32).collect()),
        other => Tensor::from_vec(dims, values).and_then(|x| x.cast(other)),
    };
    r.map_err(|e| format!("building an input tensor: {e}"))
}

/// The token of a next-token output ([batch, 1]; batch 1).
fn first_token(t: &Tensor) -> Result<i64, String> {
    let ids = t.cast(ElementType::I64).map_err(|e| e.to_string())?;
    ids.as_slice::<i64>().map_err(|e| e.to_string())?.last().copied().ok_or_else(|| "an empty next-token output".into())
}

/// Index of the largest logit of the last position (the first one on ties, like numpy's argmax).
fn argmax_last(logits: &Tensor) -> Result<i64, String> {
    let vocab = *logits.dims().last().ok_or("logits is a scalar")?;
    if vocab == 0 || logits.is_empty() {
        return Err(format!("logits has shape {:?}", logits.dims()));
    }
    let f = if logits.element_type() == ElementType::F32 {
        logits.clone()
    } else {
        logits.cast(ElementType::F32).map_err(|e| e.to_string())?
    };
    let all = f.as_slice::<f32>().map_err(|e| e.to_string())?;
    let row = &all[all.len() - vocab..];
    let mut best = 0;
    for (i, v) in row.iter().enumerate() {
        if *v > row[best] || (row[best].is_nan() && !v.is_nan()) {
            best = i;
        }
    }
    Ok(best as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_slots() {
        assert_eq!(kv_slot("past_key_values.12.key"), Some((12, "key")));
        assert_eq!(kv_slot("past_key_values.3.value"), Some((3, "value")));
        assert_eq!(kv_slot("present.3.value"), Some((3, "value")));
        assert_eq!(kv_slot("present_key_values_7_key"), Some((7, "key")));
        assert_eq!(kv_slot("past_key_values"), None);
    }

    #[test]
    fn empty_cache_dims_from_declared_shape_or_config() {
        let sym = |s: &str| Dim::Symbolic(s.into());
        let info = |shape: Vec<Dim>| ValueInfo {
            name: "past_key_values.0.key".into(),
            element_type: Some(ElementType::F16),
            onnx_type: 10,
            shape: Some(shape),
        };
        let declared = info(vec![sym("batch_size"), Dim::Fixed(3), sym("past_sequence_length"), Dim::Fixed(64)]);
        assert_eq!(empty_dims(&declared, Path::new("/nonexistent/model.onnx")).unwrap(), vec![1, 3, 0, 64]);

        let dir = std::env::temp_dir().join(format!("kiln-decode-test-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("onnx")).unwrap();
        std::fs::write(
            dir.join("config.json"),
            r#"{"hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3}"#,
        )
        .unwrap();
        let symbolic = info(vec![sym("batch"), sym("kv_heads"), sym("past_len"), sym("head_dim")]);
        let model = dir.join("onnx/model.onnx");
        assert_eq!(empty_dims(&symbolic, &model).unwrap(), vec![1, 3, 0, 64]);
        assert!(empty_dims(&symbolic, Path::new("/nonexistent/model.onnx")).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn argmax_takes_last_row() {
        let t = Tensor::from_vec(&[1, 2, 3], vec![9.0f32, 0.0, 0.0, 1.0, 3.0, 3.0]).unwrap();
        assert_eq!(argmax_last(&t).unwrap(), 1);
    }
}
