//! ONNX Unique: unique values (or slices along `axis`), sorted or in order of first occurrence, with first
//! indices, inverse indices and counts. Output sizes depend on the data: a fresh symbol unless the input is known.

use std::cmp::Ordering;

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use crate::compress::gather_axis;
use crate::kernel::*;
use crate::BuildResult;

#[derive(Debug, Clone, PartialEq)]
pub struct Unique {
    pub axis: Option<i64>,
    pub sorted: bool,
    pub outputs: usize,
    pub count: Option<Symbol>,
}

pub fn build(_ctx: &ParsingContext, node: &NodeProto) -> BuildResult {
    let outputs = node.output.len().clamp(1, 4);
    let op = Unique {
        axis: node.get_attr_opt("axis")?,
        sorted: node.get_attr_opt::<i64>("sorted")?.unwrap_or(1) != 0,
        outputs,
        count: None,
    };
    Ok((expand(KernelExpansion(op)), vec![]))
}

struct Found {
    /// first-occurrence index of each unique slice, in output order
    first: Vec<usize>,
    inverse: Vec<usize>,
    counts: Vec<usize>,
}

impl Unique {
    fn find(&self, x: &Tensor) -> TractResult<(Tensor, usize, Found)> {
        let (x, axis) = match self.axis {
            Some(a) => {
                let axis = resolve_axis("Unique", a, x.rank())?;
                (x.clone(), axis)
            }
            None => (x.clone().into_shape(&[x.len()])?, 0),
        };
        let n = x.shape()[axis];
        // one key per slice: its values in order
        let keys: Vec<Vec<Key>> = if x.datum_type() == DatumType::String {
            let v = x.to_plain_array_view::<String>()?;
            (0..n)
                .map(|i| v.index_axis(tract_ndarray::Axis(axis), i).iter().map(|s| Key::S(s.clone())).collect())
                .collect()
        } else {
            let v = to_f64(&x)?;
            (0..n).map(|i| v.index_axis(tract_ndarray::Axis(axis), i).iter().map(|f| Key::F(*f)).collect()).collect()
        };
        let mut first: Vec<usize> = vec![];
        let mut inverse = vec![0usize; n];
        let mut counts: Vec<usize> = vec![];
        for i in 0..n {
            match first.iter().position(|f| keys[*f] == keys[i]) {
                Some(u) => {
                    inverse[i] = u;
                    counts[u] += 1;
                }
                None => {
                    inverse[i] = first.len();
                    first.push(i);
                    counts.push(1);
                }
            }
        }
        if self.sorted {
            let mut order: Vec<usize> = (0..first.len()).collect();
            order.sort_by(|a, b| cmp_keys(&keys[first[*a]], &keys[first[*b]]));
            let mut rank = vec![0usize; order.len()];
            for (r, u) in order.iter().enumerate() {
                rank[*u] = r;
            }
            first = order.iter().map(|u| first[*u]).collect();
            counts = order.iter().map(|u| counts[*u]).collect();
            inverse.iter_mut().for_each(|i| *i = rank[*i]);
        }
        Ok((x, axis, Found { first, inverse, counts }))
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Key {
    F(f64),
    S(String),
}

fn cmp_keys(a: &[Key], b: &[Key]) -> Ordering {
    for (x, y) in a.iter().zip(b) {
        let o = match (x, y) {
            (Key::F(x), Key::F(y)) => x.partial_cmp(y).unwrap_or(Ordering::Equal),
            (Key::S(x), Key::S(y)) => x.cmp(y),
            _ => Ordering::Equal,
        };
        if o != Ordering::Equal {
            return o;
        }
    }
    Ordering::Equal
}

impl Kernel for Unique {
    fn name(&self) -> &'static str {
        "Unique"
    }
    fn nboutputs(&self) -> usize {
        self.outputs
    }
    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        s.equals(&outputs[0].datum_type, &inputs[0].datum_type)?;
        for o in &outputs[1..] {
            s.equals(&o.datum_type, DatumType::I64)?;
            s.equals(&o.rank, 1)?;
        }
        Ok(())
    }
    fn with_symbols(&self, model: &mut TypedModel) -> Self {
        Unique { count: Some(model.symbols.new_with_prefix("unique")), ..self.clone() }
    }
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let x = inputs[0];
        let rank = x.rank();
        let (u, len): (TDim, TDim) = {
            let len: TDim = match self.axis {
                Some(a) => x.shape[resolve_axis("Unique", a, rank)?].clone(),
                None => x.shape.iter().product(),
            };
            let u = match &x.konst {
                Some(k) => self.find(k)?.2.first.len().into(),
                None => self.count.clone().map(TDim::Sym).ok_or_else(|| format_err!("Unique: input must be known"))?,
            };
            (u, len)
        };
        let y = match self.axis {
            Some(a) => {
                let mut s = x.shape.to_tvec();
                s[resolve_axis("Unique", a, rank)?] = u.clone();
                s
            }
            None => tvec!(u.clone()),
        };
        let mut v = tvec!(TypedFact::dt_shape(x.datum_type, y));
        let more = [u.clone(), len, u];
        for d in more.iter().take(self.outputs - 1) {
            v.push(TypedFact::dt_shape(DatumType::I64, tvec!(d.clone())));
        }
        Ok(v)
    }
    fn eval(&self, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (x, axis, f) = self.find(&inputs[0])?;
        let first: Vec<i64> = f.first.iter().map(|i| *i as i64).collect();
        let y = gather_axis(&x, axis, &tensor1(&first))?;
        let mut v = tvec!(y.into_tvalue());
        let inverse: Vec<i64> = f.inverse.iter().map(|i| *i as i64).collect();
        let counts: Vec<i64> = f.counts.iter().map(|i| *i as i64).collect();
        for t in [first, inverse, counts].into_iter().take(self.outputs - 1) {
            v.push(tensor1(&t).into_tvalue());
        }
        Ok(v)
    }
}
