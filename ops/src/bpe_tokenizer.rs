//! onnxruntime-extensions' `GPT2Tokenizer` (byte-level BPE from vocab.json and merges.txt, through the `tokenizers`
//! crate) and `BpeDecoder` (ids → text through an id-ordered vocabulary and a byte decoder), domain `ai.onnx.contrib`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::AddedToken;
use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use crate::kernel::*;
use crate::tokenizer::{
    has_output, id_rows, int_attr, is_contrib_domain, no_parallelism, node_label, string_attr, tensor_of, Encode,
    SharedTokenizer,
};
use crate::BuildResult;

/// A byte-level BPE tokenizer as GPT-2's: vocab.json, merges.txt, `<|endoftext|>` special when in the vocabulary.
pub fn gpt2_tokenizer(vocab_json: &str, merges_txt: &str) -> TractResult<tokenizers::Tokenizer> {
    no_parallelism();
    let vocab: HashMap<String, u32> =
        serde_json::from_str(vocab_json).map_err(|e| format_err!("`vocab` is not a vocab.json object: {e}"))?;
    let vocab: Vocab = vocab.into_iter().collect();
    let mut merges = Vec::new();
    for (ix, line) in merges_txt.lines().enumerate() {
        if line.trim().is_empty() || (ix == 0 && line.starts_with("#version")) {
            continue;
        }
        let (a, b) = line
            .split_once(' ')
            .ok_or_else(|| format_err!("`merges` line {} is not two space-separated tokens: {line:?}", ix + 1))?;
        merges.push((a.to_string(), b.to_string()));
    }
    let special = vocab.contains_key("<|endoftext|>");
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| format_err!("`vocab` and `merges` do not make a BPE model: {e}"))?;
    let mut tok = tokenizers::Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tok.with_post_processor(Some(ByteLevel::new(false, true, true)));
    tok.with_decoder(Some(ByteLevelDecoder::default()));
    if special {
        tok.add_special_tokens(&[AddedToken::from("<|endoftext|>", true)]);
    }
    Ok(tok)
}

/// Builds `GPT2Tokenizer` for `ai.onnx.contrib` nodes; other domains go to tract's builder.
pub fn build_gpt2_tokenizer(ctx: &ParsingContext, node: &NodeProto) -> BuildResult {
    if !is_contrib_domain(node) {
        return crate::tract_builder(ctx, node);
    }
    let label = node_label(node);
    let err = |what: String| format_err!("GPT2Tokenizer node `{label}`: {what}");
    let vocab = string_attr(node, "vocab")?.ok_or_else(|| err("attribute `vocab` is missing".into()))?;
    let merges = string_attr(node, "merges")?.ok_or_else(|| err("attribute `merges` is missing".into()))?;
    let padding_length = int_attr(node, "padding_length", -1);
    if padding_length != -1 && padding_length <= 0 {
        return Err(err(format!("padding_length {padding_length} must be more than 0 or -1")));
    }
    let tok = gpt2_tokenizer(&vocab, &merges).map_err(|e| err(e.to_string()))?;
    let encode = Encode {
        op: "GPT2Tokenizer",
        node: label.clone(),
        tokenizer: SharedTokenizer(Arc::new(tok)),
        add_special_tokens: true,
        pad_id: 0,
        padding_length: (padding_length > 0).then_some(padding_length as usize),
        mask: has_output(node, 1),
        offsets: has_output(node, 2),
        seq: None,
    };
    Ok((expand(KernelExpansion(encode)), vec![]))
}

/// `BpeDecoder`: ids S×L → strings S (`[1]` for ids of rank 1), as onnxruntime-extensions decodes.
#[derive(Debug, Clone, PartialEq)]
pub struct BpeDecoder {
    pub node: String,
    pub tables: Arc<BpeTables>,
}

#[derive(Debug, PartialEq)]
pub struct BpeTables {
    /// Tokens by id (`id_vocab`, one per line).
    pub vocab: Vec<String>,
    /// Vocabulary characters → bytes (`byte_decoder`, `codepoint\tbyte` lines).
    pub byte_decoder: HashMap<char, u8>,
    /// Ids decoded verbatim (`added_tokens`, `id\ttext` lines).
    pub added_tokens: HashMap<i64, String>,
    /// `all_special_ids`, one per line.
    pub special_ids: HashSet<i64>,
    pub skip_special_tokens: bool,
    /// Spaces around special tokens.
    pub whitespace_token: bool,
    pub unk_token: String,
}

fn id_lines(what: &str, text: &str) -> TractResult<Vec<(i64, String)>> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let (id, rest) = match line.split_once('\t') {
            Some((id, rest)) => (id, rest.to_string()),
            None => (line, String::new()),
        };
        let id =
            id.trim().parse::<i64>().map_err(|_| format_err!("`{what}` line {line:?} does not start with an id"))?;
        out.push((id, rest));
    }
    Ok(out)
}

/// Builds `BpeDecoder` for `ai.onnx.contrib` nodes; other domains go to tract's builder.
pub fn build_bpe_decoder(ctx: &ParsingContext, node: &NodeProto) -> BuildResult {
    if !is_contrib_domain(node) {
        return crate::tract_builder(ctx, node);
    }
    let label = node_label(node);
    let err = |what: String| format_err!("BpeDecoder node `{label}`: {what}");
    let id_vocab = string_attr(node, "id_vocab")?.unwrap_or_default();
    if id_vocab.is_empty() {
        return Err(err("attribute `id_vocab` must not be empty".into()));
    }
    let byte_decoder = string_attr(node, "byte_decoder")?.unwrap_or_default();
    if byte_decoder.is_empty() {
        return Err(err("attribute `byte_decoder` must not be empty".into()));
    }
    let mut bytes = HashMap::new();
    for (cp, b) in id_lines("byte_decoder", &byte_decoder).map_err(|e| err(e.to_string()))? {
        let c = u32::try_from(cp).ok().and_then(char::from_u32);
        let b = b.trim().parse::<u8>().ok();
        match (c, b) {
            (Some(c), Some(b)) => bytes.insert(c, b),
            _ => return Err(err(format!("`byte_decoder` entry {cp}\t{b:?} is not a code point and a byte"))),
        };
    }
    let added = string_attr(node, "added_tokens")?.unwrap_or_default();
    let special = string_attr(node, "all_special_ids")?.unwrap_or_default();
    let tables = BpeTables {
        vocab: id_vocab.split('\n').map(|s| s.to_string()).collect(),
        byte_decoder: bytes,
        added_tokens: id_lines("added_tokens", &added).map_err(|e| err(e.to_string()))?.into_iter().collect(),
        special_ids: id_lines("all_special_ids", &special)
            .map_err(|e| err(e.to_string()))?
            .into_iter()
            .map(|p| p.0)
            .collect(),
        skip_special_tokens: int_attr(node, "skip_special_tokens", 0) != 0,
        whitespace_token: int_attr(node, "whitespace_token", 0) != 0,
        unk_token: string_attr(node, "unk_token")?.unwrap_or_else(|| "<|endoftext|>".into()),
    };
    Ok((expand(KernelExpansion(BpeDecoder { node: label, tables: Arc::new(tables) })), vec![]))
}

impl BpeTables {
    /// One row of ids to text (invalid UTF-8 becomes U+FFFD).
    pub fn decode(&self, ids: &[i64]) -> String {
        let mut text: Vec<u8> = Vec::new();
        let mut special_last = false;
        let count = ids.len();
        for (ix, &id) in ids.iter().enumerate() {
            let special = self.special_ids.contains(&id);
            if self.skip_special_tokens && special {
                special_last = true;
                continue;
            }
            let mut piece = Vec::new();
            if let Some(t) = self.added_tokens.get(&id) {
                piece.extend_from_slice(t.as_bytes());
            } else if let Some(t) = usize::try_from(id).ok().and_then(|i| self.vocab.get(i)) {
                for c in t.chars() {
                    match self.byte_decoder.get(&c) {
                        Some(b) => piece.push(*b),
                        None => piece.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
                    }
                }
            } else if self.skip_special_tokens {
                continue;
            } else {
                piece.extend_from_slice(self.unk_token.as_bytes());
            }
            if self.whitespace_token && special && ix > 0 && !special_last {
                text.push(b' ');
            }
            text.extend_from_slice(&piece);
            if self.whitespace_token && special && ix + 1 != count {
                text.push(b' ');
            }
            special_last = special;
        }
        String::from_utf8_lossy(&text).into_owned()
    }
}

impl Kernel for BpeDecoder {
    fn name(&self) -> &'static str {
        "BpeDecoder"
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
        let shape = crate::tokenizer::decoded_shape("BpeDecoder", &self.node, &inputs[0].shape.to_tvec())?;
        Ok(tvec!(TypedFact::dt_shape(DatumType::String, shape)))
    }
    fn eval(&self, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (shape, ids, seq) = id_rows("BpeDecoder", &self.node, &inputs[0])?;
        let n: usize = shape.iter().product();
        let mut out: Vec<String> = ids.chunks(seq.max(1)).take(n).map(|row| self.tables.decode(row)).collect();
        out.resize(n, String::new());
        Ok(tvec!(tensor_of(&shape, out)?))
    }
}
