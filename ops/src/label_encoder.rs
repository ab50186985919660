//! ai.onnx.ml LabelEncoder: maps each element through parallel key/value lists (`keys_*`/`values_*` attributes,
//! lists or tensors), unknown keys to the default. NaN keys match any NaN.

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::{NodeProto, TensorProto};
use tract_onnx::tract_hir::internal::*;

use crate::kernel::*;
use crate::BuildResult;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    S(String),
    I(i64),
    /// canonical bits (every NaN the same)
    F(u64),
}

fn fkey(f: f64) -> Key {
    Key::F(if f.is_nan() { f64::NAN.to_bits() } else { (f + 0.0).to_bits() })
}

fn keys_of(t: &Tensor) -> TractResult<Vec<Key>> {
    Ok(if t.datum_type() == DatumType::String {
        t.to_plain_array_view::<String>()?.iter().map(|s| Key::S(s.clone())).collect()
    } else if t.datum_type().is_float() {
        to_f64(t)?.iter().map(|f| fkey(*f)).collect()
    } else {
        to_i64(t)?.iter().map(|i| Key::I(*i)).collect()
    })
}

#[derive(Debug, Clone, PartialEq)]
pub struct LabelEncoder {
    keys: Vec<Key>,
    key_type: DatumType,
    /// 1-D values, the output's type
    values: Tensor,
    /// one element of the values' type
    default: Tensor,
}

fn tensor_attr(node: &NodeProto, name: &str) -> TractResult<Option<Tensor>> {
    match node.get_attr_opt::<&TensorProto>(name)? {
        Some(p) => Ok(Some(tract_onnx::tensor::load_tensor(&tract_onnx::data_resolver::FopenDataResolver, p, None)?)),
        None => Ok(None),
    }
}

pub fn build(_ctx: &ParsingContext, node: &NodeProto) -> BuildResult {
    let op = "LabelEncoder";
    let keys: Tensor = if let Some(t) = tensor_attr(node, "keys_tensor")? {
        t
    } else if let Some(v) = node.get_attr_opt_vec::<String>("keys_strings")? {
        tensor1(&v)
    } else if let Some(v) = node.get_attr_opt_vec::<i64>("keys_int64s")? {
        tensor1(&v)
    } else if let Some(v) = node.get_attr_opt_vec::<f32>("keys_floats")? {
        tensor1(&v)
    } else {
        bail!("{op}: no keys_* attribute")
    };
    let (values, default): (Tensor, Tensor) = if let Some(t) = tensor_attr(node, "values_tensor")? {
        let d = match tensor_attr(node, "default_tensor")? {
            Some(d) => d.cast_to_dt(t.datum_type())?.into_owned(),
            None if t.datum_type() == DatumType::String => tensor0("_Unused".to_string()),
            None => Tensor::zero_dt(t.datum_type(), &[])?,
        };
        (t, d)
    } else if let Some(v) = node.get_attr_opt_vec::<String>("values_strings")? {
        (tensor1(&v), tensor0(node.get_attr_opt::<String>("default_string")?.unwrap_or_else(|| "_Unused".into())))
    } else if let Some(v) = node.get_attr_opt_vec::<i64>("values_int64s")? {
        (tensor1(&v), tensor0(node.get_attr_opt::<i64>("default_int64")?.unwrap_or(-1)))
    } else if let Some(v) = node.get_attr_opt_vec::<f32>("values_floats")? {
        (tensor1(&v), tensor0(node.get_attr_opt::<f32>("default_float")?.unwrap_or(-0.0)))
    } else {
        bail!("{op}: no values_* attribute")
    };
    ensure!(keys.len() == values.len(), "{op}: {} keys for {} values", keys.len(), values.len());
    ensure!(default.len() >= 1, "{op}: empty default");
    let values = values.into_shape(&[keys.len()])?;
    let n = default.len();
    let default = default.into_shape(&[n])?.slice(0, 0, 1)?.into_shape(&[])?;
    let k = LabelEncoder { keys: keys_of(&keys)?, key_type: keys.datum_type(), values, default };
    Ok((expand(KernelExpansion(k)), vec![]))
}

impl Kernel for LabelEncoder {
    fn name(&self) -> &'static str {
        "LabelEncoder"
    }
    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        s.equals(&outputs[0].datum_type, self.values.datum_type())?;
        s.equals(&outputs[0].shape, &inputs[0].shape)
    }
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let it = inputs[0].datum_type;
        ensure!(
            (it == DatumType::String) == (self.key_type == DatumType::String),
            "LabelEncoder: input {it:?} does not match keys {:?}",
            self.key_type
        );
        Ok(tvec!(TypedFact::dt_shape(self.values.datum_type(), inputs[0].shape.clone())))
    }
    fn eval(&self, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = &inputs[0];
        let xk = keys_of(x)?;
        let map: std::collections::HashMap<&Key, usize> = self.keys.iter().enumerate().map(|(i, k)| (k, i)).collect();
        // gather from values ++ [default]
        let table = Tensor::stack_tensors(0, &[self.values.clone(), self.default.clone().into_shape(&[1])?])?;
        let idx: Vec<i64> = xk.iter().map(|k| map.get(k).copied().unwrap_or(self.keys.len()) as i64).collect();
        let out = crate::compress::gather_axis(&table, 0, &tensor1(&idx))?;
        Ok(tvec!(out.into_shape(x.shape())?.into_tvalue()))
    }
}
