//! A small frame for kiln ops that compute in plain Rust: a [`Kernel`] gives the output facts and the evaluation;
//! [`KernelExpansion`] is its inference-time face (the builder's `expand(...)`), [`KernelOp`] the typed op it wires.
//! Kernels return errors, never panic, on bad input.

use tract_onnx::tract_hir::internal::*;

pub trait Kernel: std::fmt::Debug + Clone + PartialEq + Send + Sync + 'static {
    fn name(&self) -> &'static str;
    fn nboutputs(&self) -> usize {
        1
    }
    /// Inference rules: at least the output datum types (and ranks where known).
    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult;
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>>;
    /// Called once when wiring: kernels whose output sizes depend on input values take fresh symbols here.
    fn with_symbols(&self, _model: &mut TypedModel) -> Self {
        self.clone()
    }
    fn eval(&self, inputs: TVec<TValue>) -> TractResult<TVec<TValue>>;
}

#[derive(Debug, Clone, PartialEq)]
pub struct KernelOp<K: Kernel>(pub K);

// Kernels hold no floats that would make equality partial in practice; tract wants Eq for op dedup.
impl<K: Kernel> Eq for KernelOp<K> {}

impl<K: Kernel> Op for KernelOp<K> {
    fn name(&self) -> StaticName {
        self.0.name().into()
    }
    op_as_typed_op!();
}

impl<K: Kernel> EvalOp for KernelOp<K> {
    op_out_of_plan!();
    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let name = self.0.name();
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.0.eval(inputs))) {
            Ok(r) => r,
            Err(_) => bail!("{name}: internal error evaluating the op"),
        }
    }
}

impl<K: Kernel> TypedOp for KernelOp<K> {
    as_op!();
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let name = self.0.name();
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.0.output_facts(inputs))) {
            Ok(r) => r,
            Err(_) => bail!("{name}: internal error computing the output facts"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct KernelExpansion<K: Kernel>(pub K);

impl<K: Kernel> Expansion for KernelExpansion<K> {
    fn name(&self) -> StaticName {
        self.0.name().into()
    }
    fn nboutputs(&self) -> TractResult<usize> {
        Ok(self.0.nboutputs())
    }
    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_output_arity(outputs, self.0.nboutputs())?;
        self.0.rules(s, inputs, outputs)
    }
    fn wire(&self, prefix: &str, model: &mut TypedModel, inputs: &[OutletId]) -> TractResult<TVec<OutletId>> {
        let k = self.0.with_symbols(model);
        model.wire_node(prefix, KernelOp(k), inputs)
    }
}

/// The op's tensor as f64 values in a dynamic array.
pub fn to_f64(t: &Tensor) -> TractResult<tract_ndarray::ArrayD<f64>> {
    t.cast_to::<f64>()?.into_owned().into_plain_array::<f64>()
}

/// The op's tensor as i64 values in a dynamic array.
pub fn to_i64(t: &Tensor) -> TractResult<tract_ndarray::ArrayD<i64>> {
    t.cast_to::<i64>()?.into_owned().into_plain_array::<i64>()
}

/// f64 values back into a tensor of `dt`.
pub fn from_f64(a: tract_ndarray::ArrayD<f64>, dt: DatumType) -> TractResult<TValue> {
    Ok(Tensor::from(a).cast_to_dt(dt)?.into_owned().into_tvalue())
}

/// The concrete shape of a fact, or an error naming the op.
pub fn concrete_shape(op: &str, fact: &TypedFact) -> TractResult<TVec<usize>> {
    fact.shape
        .as_concrete()
        .map(|s| s.into())
        .ok_or_else(|| format_err!("{op}: input shape {:?} must be known", fact.shape))
}

/// An axis in `-rank..rank` made positive.
pub fn resolve_axis(op: &str, axis: i64, rank: usize) -> TractResult<usize> {
    let a = if axis < 0 { axis + rank as i64 } else { axis };
    ensure!(a >= 0 && (a as usize) < rank.max(1), "{op}: axis {axis} is out of range for rank {rank}");
    Ok(a as usize)
}

/// The tract datum type of an ONNX `TensorProto.DataType` code (the types kiln represents).
pub fn datum_type_of_onnx(op: &str, code: i64) -> TractResult<DatumType> {
    Ok(match code {
        1 => DatumType::F32,
        2 => DatumType::U8,
        3 => DatumType::I8,
        4 => DatumType::U16,
        5 => DatumType::I16,
        6 => DatumType::I32,
        7 => DatumType::I64,
        8 => DatumType::String,
        9 => DatumType::Bool,
        10 => DatumType::F16,
        11 => DatumType::F64,
        12 => DatumType::U32,
        13 => DatumType::U64,
        other => bail!("{op}: element type code {other} is not supported"),
    })
}

/// A constant input's values as i64 (shapes, axes), or an error saying it must be constant.
pub fn const_i64s(op: &str, what: &str, fact: &TypedFact) -> TractResult<Vec<i64>> {
    let k = fact.konst.as_ref().ok_or_else(|| format_err!("{op}: `{what}` must be a constant"))?;
    Ok(k.cast_to::<i64>()?.try_as_plain_ram()?.as_slice::<i64>()?.to_vec())
}
