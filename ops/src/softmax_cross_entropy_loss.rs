//! ONNX SoftmaxCrossEntropyLoss: log-softmax over axis 1, then NegativeLogLikelihoodLoss (see
//! [`crate::negative_log_likelihood_loss`]); the optional second output is the log-probabilities.

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use crate::kernel::KernelExpansion;
use crate::negative_log_likelihood_loss::{LossKernel, Reduction};
use crate::BuildResult;

pub fn build(_ctx: &ParsingContext, node: &NodeProto) -> BuildResult {
    let inputs = node.input.iter().filter(|s| !s.is_empty()).count();
    ensure!(inputs >= 2, "SoftmaxCrossEntropyLoss needs scores and labels");
    let k = LossKernel {
        op: "SoftmaxCrossEntropyLoss",
        reduction: Reduction::parse(node)?,
        ignore_index: node.get_attr_opt("ignore_index")?,
        has_weight: node.input.get(2).is_some_and(|s| !s.is_empty()),
        softmax: true,
        log_prob_output: node.output.get(1).is_some_and(|s| !s.is_empty()),
    };
    Ok((expand(KernelExpansion(k)), vec![]))
}
