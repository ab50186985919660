//! ONNX LpPool: `(Σ_window |x|^p)^(1/p)` over N-d windows, zero padding (explicit pads or auto_pad), strides,
//! dilations and ceil_mode, as onnx's test generator computes it.

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use crate::kernel::*;
use crate::BuildResult;

#[derive(Debug, Clone, PartialEq)]
pub struct LpPool {
    pub kernel: Vec<usize>,
    pub strides: Option<Vec<usize>>,
    pub dilations: Option<Vec<usize>>,
    pub pads: Option<Vec<usize>>,
    pub auto_pad: String,
    pub ceil_mode: bool,
    pub p: f64,
}

pub fn build(_ctx: &ParsingContext, node: &NodeProto) -> BuildResult {
    let kernel: Vec<i64> = node.get_attr_vec("kernel_shape")?;
    let pos = |v: Option<Vec<i64>>, what: &str| -> TractResult<Option<Vec<usize>>> {
        v.map(|v| {
            v.into_iter()
                .map(|x| {
                    ensure!(x >= 0, "LpPool: negative {what}");
                    Ok(x as usize)
                })
                .collect()
        })
        .transpose()
    };
    let op = LpPool {
        kernel: pos(Some(kernel), "kernel_shape")?.unwrap_or_default(),
        strides: pos(node.get_attr_opt_vec("strides")?, "strides")?,
        dilations: pos(node.get_attr_opt_vec("dilations")?, "dilations")?,
        pads: pos(node.get_attr_opt_vec("pads")?, "pads")?,
        auto_pad: node.get_attr_opt::<String>("auto_pad")?.unwrap_or_else(|| "NOTSET".into()),
        ceil_mode: node.get_attr_opt::<i64>("ceil_mode")?.unwrap_or(0) != 0,
        p: node.get_attr_opt::<i64>("p")?.unwrap_or(2) as f64,
    };
    ensure!(op.kernel.iter().all(|k| *k > 0), "LpPool: kernel_shape must be positive");
    ensure!(op.p > 0.0, "LpPool: p must be positive");
    Ok((expand(KernelExpansion(op)), vec![]))
}

struct Geometry {
    out: Vec<usize>,
    pad_begin: Vec<usize>,
    strides: Vec<usize>,
    dilations: Vec<usize>,
}

impl LpPool {
    fn geometry(&self, spatial: &[usize]) -> TractResult<Geometry> {
        let n = spatial.len();
        ensure!(self.kernel.len() == n, "LpPool: kernel_shape has {} values for {n} spatial axes", self.kernel.len());
        let strides = self.strides.clone().unwrap_or_else(|| vec![1; n]);
        let dilations = self.dilations.clone().unwrap_or_else(|| vec![1; n]);
        ensure!(strides.len() == n && dilations.len() == n, "LpPool: strides/dilations length");
        ensure!(strides.iter().chain(&dilations).all(|s| *s > 0), "LpPool: strides and dilations must be positive");
        let mut out = vec![];
        let mut pad_begin = vec![];
        for i in 0..n {
            let extent = (self.kernel[i] - 1) * dilations[i] + 1;
            let (o, pb) = match self.auto_pad.as_str() {
                "SAME_UPPER" | "SAME_LOWER" => {
                    let o = spatial[i].div_ceil(strides[i]);
                    let total = ((o.max(1) - 1) * strides[i] + extent).saturating_sub(spatial[i]);
                    let pb = if self.auto_pad == "SAME_UPPER" { total / 2 } else { total - total / 2 };
                    (o, pb)
                }
                "VALID" | "NOTSET" => {
                    let (pb, pe) = match (&self.pads, self.auto_pad.as_str()) {
                        (Some(p), "NOTSET") => {
                            ensure!(p.len() == 2 * n, "LpPool: pads must have {} values", 2 * n);
                            (p[i], p[i + n])
                        }
                        _ => (0, 0),
                    };
                    let span = spatial[i] + pb + pe;
                    ensure!(span >= extent, "LpPool: window {extent} larger than padded input {span}");
                    let o = if self.ceil_mode {
                        (span - extent).div_ceil(strides[i]) + 1
                    } else {
                        (span - extent) / strides[i] + 1
                    };
                    (o, pb)
                }
                other => bail!("LpPool: unknown auto_pad {other}"),
            };
            out.push(o);
            pad_begin.push(pb);
        }
        Ok(Geometry { out, pad_begin, strides, dilations })
    }
}

impl Kernel for LpPool {
    fn name(&self) -> &'static str {
        "LpPool"
    }
    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        s.equals(&outputs[0].datum_type, &inputs[0].datum_type)?;
        s.equals(&outputs[0].rank, &inputs[0].rank)
    }
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let shape = concrete_shape("LpPool", inputs[0])?;
        ensure!(shape.len() >= 3, "LpPool: input must be [N, C, spatial...]");
        ensure!(inputs[0].datum_type.is_float(), "LpPool: input must be float");
        let g = self.geometry(&shape[2..])?;
        let mut out: TVec<usize> = shape[..2].into();
        out.extend(g.out);
        Ok(tvec!(TypedFact::dt_shape(inputs[0].datum_type, &*out)))
    }
    fn eval(&self, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let dt = inputs[0].datum_type();
        let x = to_f64(&inputs[0])?;
        let shape = x.shape().to_vec();
        ensure!(shape.len() >= 3, "LpPool: input must be [N, C, spatial...]");
        let spatial = &shape[2..];
        let g = self.geometry(spatial)?;
        let nc = shape[0] * shape[1];
        let in_size: usize = spatial.iter().product();
        let out_size: usize = g.out.iter().product();
        let x = x.as_standard_layout();
        let data = x.as_slice().ok_or_else(|| format_err!("LpPool: non contiguous"))?;
        let mut out = vec![0f64; nc * out_size];
        let n = spatial.len();
        let kernel_count: usize = self.kernel.iter().product();
        let mut ocoord = vec![0usize; n];
        let mut kcoord = vec![0usize; n];
        for o in 0..out_size {
            // output coordinates
            let mut r = o;
            for i in (0..n).rev() {
                ocoord[i] = r % g.out[i];
                r /= g.out[i];
            }
            for plane in 0..nc {
                let base = plane * in_size;
                let mut sum = 0f64;
                for k in 0..kernel_count {
                    let mut r = k;
                    for i in (0..n).rev() {
                        kcoord[i] = r % self.kernel[i];
                        r /= self.kernel[i];
                    }
                    let mut ix = 0usize;
                    let mut inside = true;
                    for i in 0..n {
                        let pos =
                            (ocoord[i] * g.strides[i] + kcoord[i] * g.dilations[i]) as i64 - g.pad_begin[i] as i64;
                        if pos < 0 || pos >= spatial[i] as i64 {
                            inside = false;
                            break;
                        }
                        ix = ix * spatial[i] + pos as usize;
                    }
                    if inside {
                        sum += data[base + ix].abs().powf(self.p);
                    }
                }
                out[plane * out_size + o] = sum.powf(1.0 / self.p);
            }
        }
        let mut oshape = shape[..2].to_vec();
        oshape.extend(&g.out);
        from_f64(tract_ndarray::ArrayD::from_shape_vec(oshape, out)?, dt).map(|t| tvec!(t))
    }
}
