//! ONNX StringSplit: splits each string by `delimiter` (Python's `str.split` semantics; no delimiter splits on
//! whitespace runs), at most `maxsplit` times. Y is X's shape plus the largest piece count (padded with ""), Z the
//! counts. The largest count depends on the data: a fresh symbol unless X is known.

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use crate::kernel::*;
use crate::BuildResult;

#[derive(Debug, Clone, PartialEq)]
pub struct StringSplit {
    pub delimiter: Option<String>,
    pub maxsplit: Option<usize>,
    pub count: Option<Symbol>,
}

pub fn build(_ctx: &ParsingContext, node: &NodeProto) -> BuildResult {
    let delimiter: Option<String> = node.get_attr_opt("delimiter")?;
    let maxsplit: Option<i64> = node.get_attr_opt("maxsplit")?;
    let op = StringSplit {
        delimiter: delimiter.filter(|d| !d.is_empty()),
        maxsplit: maxsplit.filter(|m| *m >= 0).map(|m| m as usize),
        count: None,
    };
    Ok((expand(KernelExpansion(op)), vec![]))
}

impl StringSplit {
    pub fn split(&self, s: &str) -> Vec<String> {
        match &self.delimiter {
            Some(d) => match self.maxsplit {
                Some(m) => s.splitn(m + 1, d.as_str()).map(String::from).collect(),
                None => s.split(d.as_str()).map(String::from).collect(),
            },
            None => {
                // Python's str.split(None, maxsplit)
                let mut out = vec![];
                let mut rest = s.trim_start();
                while !rest.is_empty() {
                    if self.maxsplit.is_some_and(|m| out.len() == m) {
                        out.push(rest.to_string());
                        break;
                    }
                    let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
                    out.push(rest[..end].to_string());
                    rest = rest[end..].trim_start();
                }
                out
            }
        }
    }
    fn pieces(&self, x: &Tensor) -> TractResult<Vec<Vec<String>>> {
        let v = x.to_plain_array_view::<String>()?;
        Ok(v.iter().map(|s| self.split(s)).collect())
    }
}

impl Kernel for StringSplit {
    fn name(&self) -> &'static str {
        "StringSplit"
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
        check_input_arity(inputs, 1)?;
        s.equals(&outputs[0].datum_type, DatumType::String)?;
        s.equals(&outputs[1].datum_type, DatumType::I64)?;
        s.equals(&outputs[1].shape, &inputs[0].shape)
    }
    fn with_symbols(&self, model: &mut TypedModel) -> Self {
        StringSplit { count: Some(model.symbols.new_with_prefix("pieces")), ..self.clone() }
    }
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs[0].datum_type == DatumType::String, "StringSplit: input must be strings");
        let max: TDim = match &inputs[0].konst {
            Some(k) => self.pieces(k)?.iter().map(|p| p.len()).max().unwrap_or(0).into(),
            None => self.count.clone().map(TDim::Sym).ok_or_else(|| format_err!("StringSplit: input must be known"))?,
        };
        let mut y = inputs[0].shape.to_tvec();
        y.push(max);
        Ok(tvec!(
            TypedFact::dt_shape(DatumType::String, y),
            TypedFact::dt_shape(DatumType::I64, inputs[0].shape.clone())
        ))
    }
    fn eval(&self, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let pieces = self.pieces(&inputs[0])?;
        let max = pieces.iter().map(|p| p.len()).max().unwrap_or(0);
        let mut y = Vec::with_capacity(pieces.len() * max);
        for p in &pieces {
            y.extend(p.iter().cloned());
            y.extend(std::iter::repeat_n(String::new(), max - p.len()));
        }
        let mut shape = inputs[0].shape().to_vec();
        let z: Vec<i64> = pieces.iter().map(|p| p.len() as i64).collect();
        let z = tract_ndarray::ArrayD::from_shape_vec(shape.clone(), z)?;
        shape.push(max);
        let y = tract_ndarray::ArrayD::from_shape_vec(shape, y)?;
        Ok(tvec!(Tensor::from(y).into_tvalue(), Tensor::from(z).into_tvalue()))
    }
}
