//! Tokenizers as ONNX operators, in onnxruntime-extensions' domain `ai.onnx.contrib` and with its op names, computed by
//! HF's `tokenizers` crate (pure Rust; it builds for wasm32 too):
//!
//! - `HfJsonTokenizer` (attributes `tokenizer_vocab` = tokenizer.json, `tokenizer_config` = tokenizer_config.json):
//!   strings → `input_ids`, optional `attention_mask` and `offset_mapping`, right-padded when there are several strings.
//!   BPE (byte-level or SentencePiece-style), WordPiece and Unigram tokenizer.json files work with their normalizers,
//!   pre-tokenizers, added and special tokens, post-processors, truncation and padding, as the Python `tokenizers`
//!   package's `Tokenizer.encode(text)` does.
//! - `HfJsonDecoder` (kiln's; onnxruntime-extensions has no op for it): ids → strings with the same tokenizer.json,
//!   attribute `skip_special_tokens`.
//! - `GPT2Tokenizer` (attributes `vocab` = vocab.json, `merges` = merges.txt, `padding_length`) and `BpeDecoder`
//!   (attributes as onnxruntime-extensions': `id_vocab`, `byte_decoder`, `added_tokens`, `all_special_ids`,
//!   `skip_special_tokens`, `whitespace_token`, `unk_token`) in the `bpe` module.
//!
//! [`model_from_tokenizer_json`] and [`decoder_model_from_tokenizer_json`] write one-node ONNX models around them.

use std::sync::Arc;

use prost::Message;
use tract_onnx::model::ParsingContext;
use tract_onnx::pb;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use crate::kernel::*;
use crate::BuildResult;

pub use crate::bpe_tokenizer::{build_bpe_decoder, build_gpt2_tokenizer};

/// onnxruntime-extensions' domain.
pub const CONTRIB_DOMAIN: &str = "ai.onnx.contrib";

/// True for onnxruntime-extensions' domain.
pub fn is_contrib_domain(node: &NodeProto) -> bool {
    node.domain == CONTRIB_DOMAIN
}

/// How a node is named in errors: its name, else its first output, else its op type.
pub(crate) fn node_label(node: &NodeProto) -> String {
    if !node.name.is_empty() {
        node.name.clone()
    } else if let Some(o) = node.output.iter().find(|o| !o.is_empty()) {
        o.clone()
    } else {
        node.op_type.clone()
    }
}

/// A string attribute, or an error naming the node.
pub(crate) fn string_attr(node: &NodeProto, name: &str) -> TractResult<Option<String>> {
    match node.attribute.iter().find(|a| a.name == name) {
        None => Ok(None),
        Some(a) => String::from_utf8(a.s.clone()).map(Some).map_err(|_| {
            format_err!("{} node `{}`: attribute `{name}` is not valid UTF-8", node.op_type, node_label(node))
        }),
    }
}

/// An int attribute, or `default`.
pub(crate) fn int_attr(node: &NodeProto, name: &str, default: i64) -> i64 {
    node.attribute.iter().find(|a| a.name == name).map(|a| a.i).unwrap_or(default)
}

/// True when the node has output `ix` under a non-empty name.
pub(crate) fn has_output(node: &NodeProto, ix: usize) -> bool {
    node.output.get(ix).is_some_and(|o| !o.is_empty())
}

/// A loaded `tokenizers` tokenizer, shared by the op's clones (equality is identity).
#[derive(Clone)]
pub struct SharedTokenizer(pub Arc<tokenizers::Tokenizer>);

impl std::fmt::Debug for SharedTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokenizer(vocab: {})", self.0.get_vocab_size(true))
    }
}

impl PartialEq for SharedTokenizer {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

pub(crate) fn no_parallelism() {
    // wasm32 has no threads for rayon; tokenizers' parallel padding runs serially there.
    #[cfg(target_arch = "wasm32")]
    tokenizers::parallelism::set_parallelism(false);
}

/// Parses tokenizer.json text.
pub fn load_tokenizer_json(tokenizer_json: &str) -> TractResult<tokenizers::Tokenizer> {
    no_parallelism();
    tokenizer_json.parse::<tokenizers::Tokenizer>().map_err(|e| format_err!("not a valid tokenizer.json: {e}"))
}

/// The token that pads a batch: tokenizer.json's padding, else tokenizer_config.json's `pad_token`, else id 0.
pub fn pad_token_id(tok: &tokenizers::Tokenizer, config: &serde_json::Value) -> i64 {
    if let Some(p) = tok.get_padding() {
        return p.pad_id as i64;
    }
    let pad = match config.get("pad_token") {
        Some(serde_json::Value::String(s)) => Some(s.as_str()),
        Some(serde_json::Value::Object(o)) => o.get("content").and_then(|c| c.as_str()),
        _ => None,
    };
    pad.and_then(|p| tok.token_to_id(p)).map(|i| i as i64).unwrap_or(0)
}

fn parse_config(config: Option<&str>) -> TractResult<serde_json::Value> {
    match config.map(str::trim) {
        None | Some("") => Ok(serde_json::Value::Object(Default::default())),
        Some(c) => {
            let v: serde_json::Value =
                serde_json::from_str(c).map_err(|e| format_err!("not a valid tokenizer_config.json: {e}"))?;
            ensure!(v.is_object(), "tokenizer_config.json must hold a JSON object");
            Ok(v)
        }
    }
}

/// Encoding ops (`HfJsonTokenizer`, `GPT2Tokenizer`): strings of any shape S → ids S×L, mask S×L, offsets S×L×2.
#[derive(Debug, Clone, PartialEq)]
pub struct Encode {
    pub op: &'static str,
    pub node: String,
    pub tokenizer: SharedTokenizer,
    pub add_special_tokens: bool,
    pub pad_id: i64,
    /// GPT2Tokenizer's `padding_length`: truncate and pad every row to it.
    pub padding_length: Option<usize>,
    /// Which of the optional outputs the node has (tract drops outputs with empty names).
    pub mask: bool,
    pub offsets: bool,
    pub seq: Option<Symbol>,
}

/// Builds `HfJsonTokenizer` for `ai.onnx.contrib` nodes; other domains go to tract's builder.
pub fn build_hf_json_tokenizer(ctx: &ParsingContext, node: &NodeProto) -> BuildResult {
    if !is_contrib_domain(node) {
        return crate::tract_builder(ctx, node);
    }
    let label = node_label(node);
    let err = |what: String| format_err!("HfJsonTokenizer node `{label}`: {what}");
    let vocab = string_attr(node, "tokenizer_vocab")?
        .ok_or_else(|| err("attribute `tokenizer_vocab` (the contents of tokenizer.json) is missing".into()))?;
    let tok = load_tokenizer_json(&vocab).map_err(|e| err(format!("attribute `tokenizer_vocab` is {e}")))?;
    let config = parse_config(string_attr(node, "tokenizer_config")?.as_deref())
        .map_err(|e| err(format!("attribute `tokenizer_config` is {e}")))?;
    let encode = Encode {
        op: "HfJsonTokenizer",
        node: label.clone(),
        pad_id: pad_token_id(&tok, &config),
        tokenizer: SharedTokenizer(Arc::new(tok)),
        add_special_tokens: int_attr(node, "add_special_tokens", 1) != 0,
        padding_length: None,
        mask: has_output(node, 1),
        offsets: has_output(node, 2),
        seq: None,
    };
    Ok((expand(KernelExpansion(encode)), vec![]))
}

impl Kernel for Encode {
    fn name(&self) -> &'static str {
        self.op
    }
    fn nboutputs(&self) -> usize {
        1 + self.mask as usize + self.offsets as usize
    }
    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        for (ix, o) in outputs.iter().enumerate() {
            s.equals(&o.datum_type, DatumType::I64)?;
            let extra = if self.offsets && ix + 1 == outputs.len() { 2 } else { 1 };
            s.given(&inputs[0].rank, move |s, r| s.equals(&o.rank, r + extra))?;
        }
        Ok(())
    }
    fn with_symbols(&self, model: &mut TypedModel) -> Self {
        Encode { seq: Some(model.symbols.new_with_prefix("tokens")), ..self.clone() }
    }
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(
            inputs[0].datum_type == DatumType::String,
            "{} node `{}`: the input must be a string tensor, got {:?}",
            self.op,
            self.node,
            inputs[0].datum_type
        );
        let len: TDim = match (self.padding_length, &self.seq) {
            (Some(n), _) => n.into(),
            (None, Some(s)) => TDim::Sym(s.clone()),
            (None, None) => bail!("{}: the sequence length has no symbol", self.op),
        };
        let mut shape = inputs[0].shape.to_tvec();
        shape.push(len);
        let mut facts = tvec![TypedFact::dt_shape(DatumType::I64, shape.clone()); 1 + self.mask as usize];
        if self.offsets {
            shape.push(2.into());
            facts.push(TypedFact::dt_shape(DatumType::I64, shape));
        }
        Ok(facts)
    }
    fn eval(&self, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = &inputs[0];
        ensure!(
            input.datum_type() == DatumType::String,
            "{} node `{}`: the input must be a string tensor, got {:?}",
            self.op,
            self.node,
            input.datum_type()
        );
        let texts = input.to_plain_array_view::<String>()?;
        let mut rows = Vec::with_capacity(texts.len());
        for text in texts.iter() {
            let enc = self
                .tokenizer
                .0
                .encode_char_offsets(text.as_str(), self.add_special_tokens)
                .map_err(|e| format_err!("{} node `{}`: tokenizing a string: {e}", self.op, self.node))?;
            let mut ids: Vec<i64> = enc.get_ids().iter().map(|&i| i as i64).collect();
            let mut mask: Vec<i64> = enc.get_attention_mask().iter().map(|&m| m as i64).collect();
            let mut offsets: Vec<(usize, usize)> = if self.offsets { enc.get_offsets().to_vec() } else { Vec::new() };
            if let Some(n) = self.padding_length {
                ids.truncate(n);
                mask.truncate(n);
                offsets.truncate(n);
            }
            rows.push((ids, mask, offsets));
        }
        let len = self.padding_length.unwrap_or_else(|| rows.iter().map(|r| r.0.len()).max().unwrap_or(0));
        let n = rows.len();
        let mut ids = vec![self.pad_id; n * len];
        let mut mask = vec![0i64; n * len];
        let mut offsets = vec![0i64; if self.offsets { n * len * 2 } else { 0 }];
        for (r, (i, m, o)) in rows.iter().enumerate() {
            ids[r * len..][..i.len()].copy_from_slice(i);
            mask[r * len..][..m.len()].copy_from_slice(m);
            for (k, (a, b)) in o.iter().enumerate() {
                offsets[(r * len + k) * 2] = *a as i64;
                offsets[(r * len + k) * 2 + 1] = *b as i64;
            }
        }
        let mut shape: Vec<usize> = input.shape().to_vec();
        shape.push(len);
        let mut out = tvec![tensor_of(&shape, ids)?];
        if self.mask {
            out.push(tensor_of(&shape, mask)?);
        }
        if self.offsets {
            shape.push(2);
            out.push(tensor_of(&shape, offsets)?);
        }
        Ok(out)
    }
}

pub(crate) fn tensor_of<T: Datum>(shape: &[usize], data: Vec<T>) -> TractResult<TValue> {
    Ok(tract_ndarray::ArrayD::from_shape_vec(shape.to_vec(), data)?.into_tensor().into_tvalue())
}

/// `HfJsonDecoder`: ids S×L (int32/int64) → strings S (`[1]` for ids of rank 1), through tokenizer.json's decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct HfDecode {
    pub node: String,
    pub tokenizer: SharedTokenizer,
    pub skip_special_tokens: bool,
}

/// Builds `HfJsonDecoder` for `ai.onnx.contrib` nodes; other domains go to tract's builder.
pub fn build_hf_json_decoder(ctx: &ParsingContext, node: &NodeProto) -> BuildResult {
    if !is_contrib_domain(node) {
        return crate::tract_builder(ctx, node);
    }
    let label = node_label(node);
    let err = |what: String| format_err!("HfJsonDecoder node `{label}`: {what}");
    let vocab = string_attr(node, "tokenizer_vocab")?
        .ok_or_else(|| err("attribute `tokenizer_vocab` (the contents of tokenizer.json) is missing".into()))?;
    let tok = load_tokenizer_json(&vocab).map_err(|e| err(format!("attribute `tokenizer_vocab` is {e}")))?;
    parse_config(string_attr(node, "tokenizer_config")?.as_deref())
        .map_err(|e| err(format!("attribute `tokenizer_config` is {e}")))?;
    let op = HfDecode {
        node: label.clone(),
        tokenizer: SharedTokenizer(Arc::new(tok)),
        skip_special_tokens: int_attr(node, "skip_special_tokens", 0) != 0,
    };
    Ok((expand(KernelExpansion(op)), vec![]))
}

/// Output shape of a decoder: the ids' shape without its last axis; `[1]` for ids of rank 1.
pub(crate) fn decoded_shape<D: Clone + From<usize>>(op: &str, node: &str, ids: &[D]) -> TractResult<TVec<D>> {
    ensure!(!ids.is_empty(), "{op} node `{node}`: ids must have rank 1 or more");
    Ok(if ids.len() == 1 { tvec![1usize.into()] } else { ids[..ids.len() - 1].into() })
}

/// The ids as i64 rows of the last axis, or a run error naming the node.
pub(crate) fn id_rows(op: &str, node: &str, ids: &Tensor) -> TractResult<(Vec<usize>, Vec<i64>, usize)> {
    ensure!(
        matches!(ids.datum_type(), DatumType::I64 | DatumType::I32 | DatumType::U32 | DatumType::U64),
        "{op} node `{node}`: ids must be an integer tensor, got {:?}",
        ids.datum_type()
    );
    let shape = decoded_shape(op, node, ids.shape())?.to_vec();
    let seq = *ids.shape().last().unwrap_or(&0);
    Ok((shape, to_i64(ids)?.into_iter().collect(), seq))
}

impl Kernel for HfDecode {
    fn name(&self) -> &'static str {
        "HfJsonDecoder"
    }
    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        s.equals(&outputs[0].datum_type, DatumType::String)
    }
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let shape = decoded_shape("HfJsonDecoder", &self.node, &inputs[0].shape.to_tvec())?;
        Ok(tvec!(TypedFact::dt_shape(DatumType::String, shape)))
    }
    fn eval(&self, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (shape, ids, seq) = id_rows("HfJsonDecoder", &self.node, &inputs[0])?;
        let mut out = Vec::new();
        for row in ids.chunks(seq.max(1)).take(shape.iter().product()) {
            let row: Vec<u32> = row
                .iter()
                .map(|&i| {
                    u32::try_from(i)
                        .map_err(|_| format_err!("HfJsonDecoder node `{}`: id {i} is out of range", self.node))
                })
                .collect::<TractResult<_>>()?;
            let text = self
                .tokenizer
                .0
                .decode(&row, self.skip_special_tokens)
                .map_err(|e| format_err!("HfJsonDecoder node `{}`: decoding: {e}", self.node))?;
            out.push(text);
        }
        // Ids with an empty last axis decode to empty strings.
        out.resize(shape.iter().product(), String::new());
        Ok(tvec!(tensor_of(&shape, out)?))
    }
}

fn string_attribute(name: &str, value: &str) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::String as i32,
        s: value.as_bytes().to_vec(),
        ..Default::default()
    }
}

fn int_attribute(name: &str, value: i64) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Int as i32,
        i: value,
        ..Default::default()
    }
}

fn value_info(name: &str, elem_type: pb::tensor_proto::DataType, dims: &[&str]) -> pb::ValueInfoProto {
    use pb::tensor_shape_proto::{dimension::Value, Dimension};
    let dim = dims.iter().map(|d| Dimension { value: Some(Value::DimParam(d.to_string())), ..Default::default() });
    pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: elem_type as i32,
                shape: Some(pb::TensorShapeProto { dim: dim.collect() }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn one_node_model(node: NodeProto, inputs: Vec<pb::ValueInfoProto>, outputs: Vec<pb::ValueInfoProto>) -> Vec<u8> {
    let graph = pb::GraphProto {
        name: node.name.clone(),
        node: vec![node],
        input: inputs,
        output: outputs,
        ..Default::default()
    };
    let opset = |domain: &str, version| pb::OperatorSetIdProto { domain: domain.into(), version };
    pb::ModelProto {
        ir_version: 8,
        opset_import: vec![opset("", 17), opset(CONTRIB_DOMAIN, 1)],
        producer_name: "kiln".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        graph: Some(graph),
        ..Default::default()
    }
    .encode_to_vec()
}

/// An ONNX model that tokenizes: input `input_text` (string `[batch]`) → `input_ids` and `attention_mask` (int64
/// `[batch, sequence]`), one `HfJsonTokenizer` node holding both files. `tokenizer_config_json` may be empty.
/// The model also loads in onnxruntime with onnxruntime-extensions (for the BPE and Unigram tokenizers it knows).
pub fn model_from_tokenizer_json(tokenizer_json: &str, tokenizer_config_json: &str) -> TractResult<Vec<u8>> {
    load_tokenizer_json(tokenizer_json)?;
    parse_config(Some(tokenizer_config_json))?;
    let config = if tokenizer_config_json.trim().is_empty() { "{}" } else { tokenizer_config_json };
    let node = NodeProto {
        name: "tokenizer".into(),
        op_type: "HfJsonTokenizer".into(),
        domain: CONTRIB_DOMAIN.into(),
        input: vec!["input_text".into()],
        output: vec!["input_ids".into(), "attention_mask".into()],
        attribute: vec![
            string_attribute("tokenizer_config", config),
            string_attribute("tokenizer_vocab", tokenizer_json),
        ],
        ..Default::default()
    };
    use pb::tensor_proto::DataType;
    Ok(one_node_model(
        node,
        vec![value_info("input_text", DataType::String, &["batch"])],
        vec![
            value_info("input_ids", DataType::Int64, &["batch", "sequence"]),
            value_info("attention_mask", DataType::Int64, &["batch", "sequence"]),
        ],
    ))
}

/// The decoder counterpart: input `ids` (int64 `[batch, sequence]`) → `text` (string `[batch]`), one `HfJsonDecoder`
/// node (kiln's op) that skips special tokens when `skip_special_tokens`.
pub fn decoder_model_from_tokenizer_json(
    tokenizer_json: &str,
    tokenizer_config_json: &str,
    skip_special_tokens: bool,
) -> TractResult<Vec<u8>> {
    load_tokenizer_json(tokenizer_json)?;
    parse_config(Some(tokenizer_config_json))?;
    let config = if tokenizer_config_json.trim().is_empty() { "{}" } else { tokenizer_config_json };
    let node = NodeProto {
        name: "detokenizer".into(),
        op_type: "HfJsonDecoder".into(),
        domain: CONTRIB_DOMAIN.into(),
        input: vec!["ids".into()],
        output: vec!["text".into()],
        attribute: vec![
            string_attribute("tokenizer_config", config),
            string_attribute("tokenizer_vocab", tokenizer_json),
            int_attribute("skip_special_tokens", skip_special_tokens as i64),
        ],
        ..Default::default()
    };
    use pb::tensor_proto::DataType;
    Ok(one_node_model(
        node,
        vec![value_info("ids", DataType::Int64, &["batch", "sequence"])],
        vec![value_info("text", DataType::String, &["batch"])],
    ))
}
