//! ONNX DFT (opsets 17 and 20): a direct discrete Fourier transform in f64 along one signal axis of a real
//! ([..., 1]) or complex ([..., 2]) input, with `dft_length` (zero-pad or truncate), `inverse` and `onesided`.
//! tract's runs in f32 and misses onnx's 1e-7 absolute tolerance on near-zero bins. The axis and `dft_length`
//! must be known at load (attributes, constants or initializers). Inverse transforms are left to tract.

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use crate::kernel::*;
use crate::BuildResult;

#[derive(Debug, Clone, PartialEq)]
pub struct Dft {
    pub inverse: bool,
    pub onesided: bool,
    /// opset 17: the axis attribute; opset 20: None (an input, default -2)
    pub axis_attr: Option<i64>,
    pub length_input: Option<usize>,
    pub axis_input: Option<usize>,
    pub n_inputs: usize,
}

pub fn build(ctx: &ParsingContext, node: &NodeProto) -> BuildResult {
    // the inverse transforms (irfft's one-sided input) stay tract's: their expected outputs carry f32 rounding that
    // an exact f64 inverse does not reproduce within 1e-7
    if node.get_attr_opt::<i64>("inverse")?.unwrap_or(0) != 0 {
        return crate::tract_builder(ctx, node);
    }
    let mut slots = tract_onnx::model::optional_inputs(node);
    let _x = slots.next();
    let length_input = slots.next().flatten();
    let axis_input = if ctx.onnx_operator_set_version >= 20 { slots.next().flatten() } else { None };
    let axis_attr =
        if ctx.onnx_operator_set_version >= 20 { None } else { Some(node.get_attr_opt("axis")?.unwrap_or(1)) };
    let k = Dft {
        inverse: node.get_attr_opt::<i64>("inverse")?.unwrap_or(0) != 0,
        onesided: node.get_attr_opt::<i64>("onesided")?.unwrap_or(0) != 0,
        axis_attr,
        length_input,
        axis_input,
        n_inputs: node.input.iter().filter(|s| !s.is_empty()).count(),
    };
    Ok((expand(KernelExpansion(k)), vec![]))
}

impl Dft {
    /// (signal axis, transform length, output length) for an input shape.
    fn geometry(&self, shape: &[usize], axis: i64, length: Option<i64>) -> TractResult<(usize, usize, usize)> {
        let r = shape.len();
        ensure!(r >= 2 && (shape[r - 1] == 1 || shape[r - 1] == 2), "DFT: last dim must be 1 (real) or 2 (complex)");
        let a = if axis < 0 { axis + r as i64 } else { axis };
        ensure!(a >= 0 && (a as usize) < r - 1, "DFT: axis {axis} out of range for rank {r}");
        let a = a as usize;
        let n = match length {
            Some(l) => {
                ensure!(l > 0, "DFT: dft_length must be positive");
                l as usize
            }
            None => shape[a],
        };
        let out = if self.onesided { n / 2 + 1 } else { n };
        Ok((a, n, out))
    }
    fn axis_default(&self) -> i64 {
        self.axis_attr.unwrap_or(-2)
    }
}

fn scalar_of(op: &str, what: &str, fact: &TypedFact) -> TractResult<i64> {
    let v = const_i64s(op, what, fact)?;
    ensure!(v.len() == 1, "{op}: {what} must be a scalar");
    Ok(v[0])
}

impl Kernel for Dft {
    fn name(&self) -> &'static str {
        "DFT"
    }
    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, self.n_inputs)?;
        s.equals(&outputs[0].datum_type, &inputs[0].datum_type)?;
        s.equals(&outputs[0].rank, &inputs[0].rank)
    }
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs[0].datum_type.is_float(), "DFT: input must be float");
        let shape = concrete_shape("DFT", inputs[0])?;
        let axis = match self.axis_input {
            Some(i) => scalar_of("DFT", "axis", inputs[i])?,
            None => self.axis_default(),
        };
        let length = self.length_input.map(|i| scalar_of("DFT", "dft_length", inputs[i])).transpose()?;
        let (a, _, out) = self.geometry(&shape, axis, length)?;
        let mut o: TVec<usize> = shape.clone();
        o[a] = out;
        let last = o.len() - 1;
        o[last] = 2;
        Ok(tvec!(TypedFact::dt_shape(inputs[0].datum_type, &*o)))
    }
    fn eval(&self, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let dt = inputs[0].datum_type();
        let x = to_f64(&inputs[0])?;
        let shape = x.shape().to_vec();
        let axis = match self.axis_input {
            Some(i) => to_i64(&inputs[i])?.iter().next().copied().unwrap_or(-2),
            None => self.axis_default(),
        };
        let length =
            self.length_input.map(|i| to_i64(&inputs[i]).map(|t| t.iter().next().copied().unwrap_or(0))).transpose()?;
        let (a, n, out_len) = self.geometry(&shape, axis, length)?;
        let r = shape.len();
        let complex = shape[r - 1] == 2;
        let len_in = shape[a];
        let outer: usize = shape[..a].iter().product();
        let inner: usize = shape[a + 1..r - 1].iter().product();
        let comp = shape[r - 1];
        let x = x.as_standard_layout();
        let data = x.as_slice().ok_or_else(|| format_err!("DFT: non contiguous"))?;
        let mut out_shape = shape.clone();
        out_shape[a] = out_len;
        out_shape[r - 1] = 2;
        let mut out = vec![0f64; outer * out_len * inner * 2];
        let sign = if self.inverse { 1.0 } else { -1.0 };
        let scale = if self.inverse { 1.0 / n as f64 } else { 1.0 };
        let mut sig = vec![(0f64, 0f64); n];
        for o in 0..outer {
            for i in 0..inner {
                for (t, s) in sig.iter_mut().enumerate() {
                    *s = if t < len_in {
                        let base = ((o * len_in + t) * inner + i) * comp;
                        (data[base], if complex { data[base + 1] } else { 0.0 })
                    } else {
                        (0.0, 0.0)
                    };
                }
                for k in 0..out_len {
                    let (mut re, mut im) = (0f64, 0f64);
                    for (t, (sr, si)) in sig.iter().enumerate() {
                        let ang = sign * 2.0 * std::f64::consts::PI * ((k * t) % n) as f64 / n as f64;
                        let (s, c) = ang.sin_cos();
                        re += sr * c - si * s;
                        im += sr * s + si * c;
                    }
                    let base = ((o * out_len + k) * inner + i) * 2;
                    out[base] = re * scale;
                    out[base + 1] = im * scale;
                }
            }
        }
        Ok(tvec!(from_f64(tract_ndarray::ArrayD::from_shape_vec(out_shape, out)?, dt)?))
    }
}
