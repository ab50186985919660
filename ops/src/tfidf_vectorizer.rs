//! ONNX TfIdfVectorizer: counts the pool's n-grams (with skips) in each row of X (int or string), weighted as TF,
//! IDF or TFIDF, into float32 [max(ngram_indexes)+1] or [N, max(ngram_indexes)+1]. Follows onnxruntime's counting:
//! unigrams count once, longer n-grams once per skip distance 1..=max_skip_count+1.

use std::collections::HashMap;

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use crate::kernel::*;
use crate::BuildResult;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    I(i64),
    S(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct TfIdfVectorizer {
    mode: String,
    min_gram: usize,
    max_gram: usize,
    max_skip: usize,
    /// pool n-gram → output index
    pool: Vec<(Vec<Key>, usize)>,
    weights: Vec<f32>,
    output_size: usize,
}

pub fn build(_ctx: &ParsingContext, node: &NodeProto) -> BuildResult {
    let op = "TfIdfVectorizer";
    let mode: String = node.get_attr("mode")?;
    ensure!(matches!(mode.as_str(), "TF" | "IDF" | "TFIDF"), "{op}: unknown mode `{mode}`");
    let min_gram: i64 = node.get_attr("min_gram_length")?;
    let max_gram: i64 = node.get_attr("max_gram_length")?;
    let max_skip: i64 = node.get_attr("max_skip_count")?;
    ensure!(min_gram >= 1 && max_gram >= min_gram && max_skip >= 0, "{op}: bad gram lengths or skip count");
    let counts: Vec<i64> = node.get_attr_vec("ngram_counts")?;
    let indexes: Vec<i64> = node.get_attr_vec("ngram_indexes")?;
    let pool: Vec<Key> = match node.get_attr_opt_vec::<i64>("pool_int64s")? {
        Some(v) if !v.is_empty() => v.into_iter().map(Key::I).collect(),
        _ => node.get_attr_opt_vec::<String>("pool_strings")?.unwrap_or_default().into_iter().map(Key::S).collect(),
    };
    let weights: Vec<f32> = node.get_attr_opt_vec("weights")?.unwrap_or_default();
    ensure!(indexes.iter().all(|i| *i >= 0), "{op}: negative ngram index");
    let output_size = indexes.iter().max().map(|m| *m as usize + 1).unwrap_or(0);
    let mut grams = vec![];
    let mut id = 0usize;
    for (i, start) in counts.iter().enumerate() {
        let n = i + 1;
        let end = counts.get(i + 1).copied().unwrap_or(pool.len() as i64);
        ensure!(*start >= 0 && end >= *start && end as usize <= pool.len(), "{op}: bad ngram_counts");
        let items = &pool[*start as usize..end as usize];
        for g in items.chunks(n).filter(|c| c.len() == n) {
            let out = *indexes.get(id).ok_or_else(|| format_err!("{op}: ngram_indexes too short"))? as usize;
            if n as i64 >= min_gram && n as i64 <= max_gram {
                grams.push((g.to_vec(), out));
            }
            id += 1;
        }
    }
    let k = TfIdfVectorizer {
        mode,
        min_gram: min_gram as usize,
        max_gram: max_gram as usize,
        max_skip: max_skip as usize,
        pool: grams,
        weights,
        output_size,
    };
    Ok((expand(KernelExpansion(k)), vec![]))
}

impl Kernel for TfIdfVectorizer {
    fn name(&self) -> &'static str {
        "TfIdfVectorizer"
    }
    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        s.equals(&outputs[0].datum_type, DatumType::F32)
    }
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let x = inputs[0];
        let shape: TVec<TDim> = match x.rank() {
            0 | 1 => tvec!(self.output_size.into()),
            2 => tvec!(x.shape[0].clone(), self.output_size.into()),
            r => bail!("TfIdfVectorizer: input must have rank 1 or 2, got {r}"),
        };
        Ok(tvec!(TypedFact::dt_shape(DatumType::F32, shape)))
    }
    fn eval(&self, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = &inputs[0];
        let keys: Vec<Key> = if x.datum_type() == DatumType::String {
            x.to_plain_array_view::<String>()?.iter().map(|s| Key::S(s.clone())).collect()
        } else {
            to_i64(x)?.iter().map(|i| Key::I(*i)).collect()
        };
        let (rows, cols) = match x.rank() {
            0 => (1, 1),
            1 => (1, x.shape()[0]),
            2 => (x.shape()[0], x.shape()[1]),
            r => bail!("TfIdfVectorizer: input must have rank 1 or 2, got {r}"),
        };
        let lookup: HashMap<&[Key], usize> = self.pool.iter().map(|(g, o)| (g.as_slice(), *o)).collect();
        let mut freq = vec![0f32; rows * self.output_size];
        for r in 0..rows {
            let row = &keys[r * cols..(r + 1) * cols];
            let mut start_n = self.min_gram;
            for skip in 1..=self.max_skip + 1 {
                for start in 0..cols {
                    if start + skip * (start_n - 1) >= cols {
                        break;
                    }
                    let mut gram = vec![];
                    for n in 1..=self.max_gram {
                        let ix = start + (n - 1) * skip;
                        if ix >= cols {
                            break;
                        }
                        gram.push(row[ix].clone());
                        if n >= start_n {
                            if let Some(o) = lookup.get(gram.as_slice()) {
                                freq[r * self.output_size + o] += 1.0;
                            }
                        }
                    }
                }
                if start_n == 1 {
                    start_n = 2;
                    if start_n > self.max_gram {
                        break;
                    }
                }
            }
        }
        for r in 0..rows {
            for i in 0..self.output_size {
                let f = &mut freq[r * self.output_size + i];
                let w = self.weights.get(i).copied();
                *f = match (self.mode.as_str(), w) {
                    ("TF", _) => *f,
                    ("IDF", Some(w)) => {
                        if *f > 0.0 {
                            w
                        } else {
                            0.0
                        }
                    }
                    ("IDF", None) => {
                        if *f > 0.0 {
                            1.0
                        } else {
                            0.0
                        }
                    }
                    (_, Some(w)) => w * *f,
                    (_, None) => *f,
                };
            }
        }
        let shape = if x.rank() == 2 { vec![rows, self.output_size] } else { vec![self.output_size] };
        Ok(tvec!(Tensor::from(tract_ndarray::ArrayD::from_shape_vec(shape, freq)?).into_tvalue()))
    }
}
