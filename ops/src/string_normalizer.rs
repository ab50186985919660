//! ONNX StringNormalizer: drops the elements listed in `stopwords` (case-insensitively unless
//! `is_case_sensitive`), then lower- or upper-cases. Input [C] or [1, C]; when everything is dropped the output is
//! one empty string. The output length depends on the data: a fresh symbol unless X is known.

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use crate::kernel::*;
use crate::BuildResult;

#[derive(Debug, Clone, PartialEq)]
pub struct StringNormalizer {
    pub stopwords: Vec<String>,
    pub case_sensitive: bool,
    /// "LOWER", "UPPER" or "NONE"
    pub case_change: String,
    pub count: Option<Symbol>,
}

pub fn build(_ctx: &ParsingContext, node: &NodeProto) -> BuildResult {
    let stopwords: Vec<String> = node.get_attr_opt_vec("stopwords")?.unwrap_or_default();
    let case_change = node.get_attr_opt::<String>("case_change_action")?.unwrap_or_else(|| "NONE".into());
    ensure!(
        matches!(case_change.as_str(), "LOWER" | "UPPER" | "NONE"),
        "StringNormalizer: unknown case_change_action `{case_change}`"
    );
    let op = StringNormalizer {
        stopwords,
        case_sensitive: node.get_attr_opt::<i64>("is_case_sensitive")?.unwrap_or(0) != 0,
        case_change,
        count: None,
    };
    Ok((expand(KernelExpansion(op)), vec![]))
}

impl StringNormalizer {
    fn normalize(&self, x: &Tensor) -> TractResult<Vec<String>> {
        ensure!(
            x.rank() == 1 || (x.rank() == 2 && x.shape()[0] == 1),
            "StringNormalizer: input must be [C] or [1, C], got {:?}",
            x.shape()
        );
        let v = x.to_plain_array_view::<String>()?;
        let stops: Vec<String> = if self.case_sensitive {
            self.stopwords.clone()
        } else {
            self.stopwords.iter().map(|s| s.to_lowercase()).collect()
        };
        let mut out: Vec<String> = v
            .iter()
            .filter(|s| {
                let k = if self.case_sensitive { s.to_string() } else { s.to_lowercase() };
                !stops.contains(&k)
            })
            .map(|s| match self.case_change.as_str() {
                "LOWER" => s.to_lowercase(),
                "UPPER" => s.to_uppercase(),
                _ => s.clone(),
            })
            .collect();
        if out.is_empty() {
            out.push(String::new());
        }
        Ok(out)
    }
}

impl Kernel for StringNormalizer {
    fn name(&self) -> &'static str {
        "StringNormalizer"
    }
    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        s.equals(&outputs[0].datum_type, DatumType::String)?;
        s.equals(&outputs[0].rank, &inputs[0].rank)
    }
    fn with_symbols(&self, model: &mut TypedModel) -> Self {
        StringNormalizer { count: Some(model.symbols.new_with_prefix("words")), ..self.clone() }
    }
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs[0].datum_type == DatumType::String, "StringNormalizer: input must be strings");
        let n: TDim = match &inputs[0].konst {
            Some(k) => self.normalize(k)?.len().into(),
            None if self.stopwords.is_empty() => inputs[0].shape[inputs[0].rank().max(1) - 1].clone(),
            None => {
                self.count.clone().map(TDim::Sym).ok_or_else(|| format_err!("StringNormalizer: input must be known"))?
            }
        };
        let shape: TVec<TDim> = if inputs[0].rank() == 2 { tvec!(1.into(), n) } else { tvec!(n) };
        Ok(tvec!(TypedFact::dt_shape(DatumType::String, shape)))
    }
    fn eval(&self, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let out = self.normalize(&inputs[0])?;
        let n = out.len();
        let shape = if inputs[0].rank() == 2 { vec![1, n] } else { vec![n] };
        Ok(tvec!(Tensor::from(tract_ndarray::ArrayD::from_shape_vec(shape, out)?).into_tvalue()))
    }
}
