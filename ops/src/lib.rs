//! kiln-ops: the operators kiln adds to or replaces in tract's ONNX importer.
//!
//! tract's op registry is keyed by op name only, so every kiln registration checks `node.domain` and hands nodes of
//! other domains back to tract's own builder.

pub mod affine_grid;
pub mod attention;
pub mod batch_norm_training;
pub mod binarizer;
pub mod bitcast;
pub mod bpe_tokenizer;
pub mod causal_conv_with_state;
pub mod center_crop_pad;
pub mod checked_gather;
pub mod col2im;
pub mod compress;
pub mod cumprod;
pub mod det;
pub mod dft;
pub mod dim_values;
pub mod div;
pub mod erf;
pub mod external_weight;
pub mod flatten;
pub mod gather_block_quantized;
pub mod gelu_div;
pub mod gemm;
pub mod group_query_attention;
pub mod host_op;
pub mod kernel;
pub mod label_encoder;
pub mod layer_norm;
pub mod linear_attention;
pub mod lp_pool;
pub mod matmul;
pub mod matmul_nbits;
pub mod max_unpool;
pub mod multi_head_attention;
pub mod negative_log_likelihood_loss;
pub mod pad;
pub mod prelu;
pub mod quantize_linear;
pub mod reverse_sequence;
pub mod roi_align;
pub mod rotary;
pub mod skip_norm;
pub mod slice_barrier;
pub mod softmax;
pub mod softmax_cross_entropy_loss;
pub mod string_concat;
pub mod string_normalizer;
pub mod string_split;
pub mod tensor_scatter;
pub mod tfidf_vectorizer;
pub mod tokenizer;
pub mod unique;
pub mod upsample;

use std::collections::HashMap;
use std::sync::OnceLock;

use tract_onnx::model::{OnnxOpRegister, ParsingContext};
use tract_onnx::pb::NodeProto;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::format_err;
use tract_onnx::tract_hir::internal::InferenceOp;

pub type BuildResult = TractResult<(Box<dyn InferenceOp>, Vec<String>)>;
type OpBuilder = fn(&ParsingContext, &NodeProto) -> BuildResult;

/// tract's own builders, captured before kiln overrides any of them.
fn tract_builders() -> &'static HashMap<String, OpBuilder> {
    static BUILDERS: OnceLock<HashMap<String, OpBuilder>> = OnceLock::new();
    BUILDERS.get_or_init(|| tract_onnx::onnx().op_register.0.clone())
}

/// Calls tract's builder for `node.op_type` (used when a kiln builder does not take the node).
pub fn tract_builder(ctx: &ParsingContext, node: &NodeProto) -> BuildResult {
    match tract_builders().get(&node.op_type) {
        Some(b) => b(ctx, node),
        None => Err(format_err!("operator `{}` (domain `{}`) is not supported", node.op_type, node.domain)),
    }
}

/// Wraps a builder for a default-domain op: nodes of other domains go to tract's builder.
#[macro_export]
macro_rules! onnx_domain_only {
    ($f:path) => {{
        fn wrapped(ctx: &ParsingContext, node: &NodeProto) -> BuildResult {
            if $crate::is_onnx_domain(node) {
                $f(ctx, node)
            } else {
                $crate::tract_builder(ctx, node)
            }
        }
        wrapped as OpBuilder
    }};
}

/// True for the default ONNX domain.
pub fn is_onnx_domain(node: &NodeProto) -> bool {
    node.domain.is_empty() || node.domain == "ai.onnx"
}

/// Registers kiln's operators into tract's ONNX op register.
pub fn register(reg: &mut OnnxOpRegister) {
    let _ = tract_builders();
    for (name, builder) in KILN_OPS {
        reg.0.insert(name.to_string(), *builder);
    }
}

/// Every op kiln registers: (op type, builder). Each builder checks the node's domain first.
pub const KILN_OPS: &[(&str, OpBuilder)] = &[
    ("Attention", onnx_domain_only!(attention::build)),
    ("RotaryEmbedding", rotary::build),
    ("GroupQueryAttention", group_query_attention::build),
    ("MultiHeadAttention", multi_head_attention::build),
    ("SkipSimplifiedLayerNormalization", skip_norm::build_skip_simplified),
    ("SkipLayerNormalization", skip_norm::build_skip),
    ("SimplifiedLayerNormalization", skip_norm::build_simplified),
    ("Flatten", onnx_domain_only!(flatten::build)),
    ("Pad", onnx_domain_only!(pad::build)),
    ("Gemm", onnx_domain_only!(gemm::build)),
    ("MatMulNBits", matmul_nbits::build),
    ("GatherBlockQuantized", gather_block_quantized::build),
    ("DequantizeLinear", onnx_domain_only!(quantize_linear::build_dequantize)),
    ("QuantizeLinear", onnx_domain_only!(quantize_linear::build_quantize)),
    ("NegativeLogLikelihoodLoss", onnx_domain_only!(negative_log_likelihood_loss::build)),
    ("SoftmaxCrossEntropyLoss", onnx_domain_only!(softmax_cross_entropy_loss::build)),
    ("BitCast", onnx_domain_only!(bitcast::build)),
    (slice_barrier::OP_TYPE, slice_barrier::build),
    ("CumProd", onnx_domain_only!(cumprod::build)),
    ("CenterCropPad", onnx_domain_only!(center_crop_pad::build)),
    ("StringConcat", onnx_domain_only!(string_concat::build)),
    ("MatMul", onnx_domain_only!(matmul::build)),
    ("LpPool", onnx_domain_only!(lp_pool::build)),
    ("CausalConvWithState", onnx_domain_only!(causal_conv_with_state::build)),
    ("Col2Im", onnx_domain_only!(col2im::build)),
    ("Compress", onnx_domain_only!(compress::build)),
    ("Unique", onnx_domain_only!(unique::build)),
    ("StringSplit", onnx_domain_only!(string_split::build)),
    ("StringNormalizer", onnx_domain_only!(string_normalizer::build)),
    ("AffineGrid", onnx_domain_only!(affine_grid::build)),
    ("Det", onnx_domain_only!(det::build)),
    ("ReverseSequence", onnx_domain_only!(reverse_sequence::build)),
    ("Upsample", onnx_domain_only!(upsample::build)),
    ("Binarizer", binarizer::build),
    ("TensorScatter", onnx_domain_only!(tensor_scatter::build)),
    ("TfIdfVectorizer", onnx_domain_only!(tfidf_vectorizer::build)),
    ("LinearAttention", onnx_domain_only!(linear_attention::build)),
    ("LabelEncoder", label_encoder::build),
    ("MaxUnpool", onnx_domain_only!(max_unpool::build)),
    ("BatchNormalization", onnx_domain_only!(batch_norm_training::build)),
    ("RoiAlign", onnx_domain_only!(roi_align::build)),
    ("PRelu", onnx_domain_only!(prelu::build)),
    ("DFT", onnx_domain_only!(dft::build)),
    ("Div", onnx_domain_only!(gelu_div::build)),
    ("Erf", onnx_domain_only!(erf::build)),
    ("LayerNormalization", onnx_domain_only!(layer_norm::build)),
    ("HfJsonTokenizer", tokenizer::build_hf_json_tokenizer),
    ("HfJsonDecoder", tokenizer::build_hf_json_decoder),
    ("GPT2Tokenizer", tokenizer::build_gpt2_tokenizer),
    ("BpeDecoder", tokenizer::build_bpe_decoder),
    (host_op::HOST_OP_TYPE, host_op::build_host_op),
    (external_weight::OP_TYPE, external_weight::build),
];
