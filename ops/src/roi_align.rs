//! ONNX RoiAlign: bilinear-sampled average (or max) pooling of each region of interest into [oh, ow] bins, following
//! onnx's reference (and onnxruntime): half_pixel or output_half_pixel coordinates, adaptive or fixed sampling.

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use crate::kernel::*;
use crate::BuildResult;

#[derive(Debug, Clone, PartialEq)]
pub struct RoiAlign {
    pub half_pixel: bool,
    pub max: bool,
    pub oh: usize,
    pub ow: usize,
    pub sampling_ratio: i64,
    pub spatial_scale: f32,
}

pub fn build(ctx: &ParsingContext, node: &NodeProto) -> BuildResult {
    let op = "RoiAlign";
    let ctm = node.get_attr_opt::<String>("coordinate_transformation_mode")?;
    let half_pixel = match ctm.as_deref() {
        Some("half_pixel") => true,
        Some("output_half_pixel") => false,
        None => ctx.onnx_operator_set_version >= 16,
        Some(other) => bail!("{op}: unknown coordinate_transformation_mode `{other}`"),
    };
    let max = match node.get_attr_opt::<String>("mode")?.as_deref().unwrap_or("avg") {
        "avg" => false,
        "max" => true,
        other => bail!("{op}: unknown mode `{other}`"),
    };
    let oh = node.get_attr_opt::<i64>("output_height")?.unwrap_or(1);
    let ow = node.get_attr_opt::<i64>("output_width")?.unwrap_or(1);
    ensure!(oh > 0 && ow > 0, "{op}: output sizes must be positive");
    let k = RoiAlign {
        half_pixel,
        max,
        oh: oh as usize,
        ow: ow as usize,
        sampling_ratio: node.get_attr_opt("sampling_ratio")?.unwrap_or(0),
        spatial_scale: node.get_attr_opt("spatial_scale")?.unwrap_or(1.0),
    };
    Ok((expand(KernelExpansion(k)), vec![]))
}

impl Kernel for RoiAlign {
    fn name(&self) -> &'static str {
        "RoiAlign"
    }
    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 3)?;
        s.equals(&outputs[0].datum_type, &inputs[0].datum_type)?;
        s.equals(&outputs[0].rank, 4)
    }
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 3, "RoiAlign: expects X, rois, batch_indices");
        ensure!(inputs[0].rank() == 4 && inputs[1].rank() == 2, "RoiAlign: X must be rank 4 and rois rank 2");
        let shape = tvec!(inputs[1].shape[0].clone(), inputs[0].shape[1].clone(), self.oh.into(), self.ow.into());
        Ok(tvec!(TypedFact::dt_shape(inputs[0].datum_type, shape)))
    }
    fn eval(&self, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let op = "RoiAlign";
        let dt = inputs[0].datum_type();
        let x = to_f64(&inputs[0])?;
        let rois = to_f64(&inputs[1])?;
        let bi = to_i64(&inputs[2])?;
        ensure!(x.ndim() == 4 && rois.ndim() == 2 && rois.shape()[1] == 4, "{op}: X [N,C,H,W] and rois [R,4] expected");
        let (n, c, h, w) = (x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]);
        let r = rois.shape()[0];
        ensure!(bi.len() == r, "{op}: batch_indices must have {r} values");
        let (oh, ow) = (self.oh, self.ow);
        let mut out = tract_ndarray::Array4::<f64>::zeros((r, c, oh, ow));
        let scale = self.spatial_scale as f64;
        let offset = if self.half_pixel { 0.5 } else { 0.0 };
        for ri in 0..r {
            let b = bi.as_slice().map(|s| s[ri]).unwrap_or(0);
            ensure!(b >= 0 && (b as usize) < n, "{op}: batch index {b} out of range");
            let b = b as usize;
            let sw = rois[[ri, 0]] * scale - offset;
            let sh = rois[[ri, 1]] * scale - offset;
            let mut rw = rois[[ri, 2]] * scale - offset - sw;
            let mut rh = rois[[ri, 3]] * scale - offset - sh;
            if !self.half_pixel {
                rw = rw.max(1.0);
                rh = rh.max(1.0);
            }
            let (bh, bw) = (rh / oh as f64, rw / ow as f64);
            let gh = if self.sampling_ratio > 0 {
                self.sampling_ratio as usize
            } else {
                (rh / oh as f64).ceil().max(0.0) as usize
            };
            let gw = if self.sampling_ratio > 0 {
                self.sampling_ratio as usize
            } else {
                (rw / ow as f64).ceil().max(0.0) as usize
            };
            let count = (gh * gw).max(1) as f64;
            for ph in 0..oh {
                for pw in 0..ow {
                    // the samples' (positions, weights), shared by every channel
                    let mut samples = vec![];
                    for iy in 0..gh {
                        let y = sh + ph as f64 * bh + (iy as f64 + 0.5) * bh / gh as f64;
                        for ix in 0..gw {
                            let xx = sw + pw as f64 * bw + (ix as f64 + 0.5) * bw / gw as f64;
                            samples.push(bilinear(y, xx, h, w));
                        }
                    }
                    for ch in 0..c {
                        let plane = x.slice(tract_ndarray::s![b, ch, .., ..]);
                        let val = |p: (usize, usize)| plane[[p.0, p.1]];
                        let v = if self.max {
                            samples
                                .iter()
                                .map(|s| s.iter().map(|(p, wt)| wt * val(*p)).fold(f64::NEG_INFINITY, f64::max))
                                .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))))
                                .unwrap_or(0.0)
                        } else {
                            samples.iter().map(|s| s.iter().map(|(p, wt)| wt * val(*p)).sum::<f64>()).sum::<f64>()
                                / count
                        };
                        out[[ri, ch, ph, pw]] = v;
                    }
                }
            }
        }
        Ok(tvec!(from_f64(out.into_dyn(), dt)?))
    }
}

/// The four (position, weight) pairs of a bilinear sample, onnxruntime style (outside → zero weights).
fn bilinear(y: f64, x: f64, h: usize, w: usize) -> [((usize, usize), f64); 4] {
    if y < -1.0 || y > h as f64 || x < -1.0 || x > w as f64 || h == 0 || w == 0 {
        return [((0, 0), 0.0); 4];
    }
    let (mut y, mut x) = (y.max(0.0), x.max(0.0));
    let mut yl = y as usize;
    let yh = if yl >= h - 1 {
        yl = h - 1;
        y = yl as f64;
        h - 1
    } else {
        yl + 1
    };
    let mut xl = x as usize;
    let xh = if xl >= w - 1 {
        xl = w - 1;
        x = xl as f64;
        w - 1
    } else {
        xl + 1
    };
    let (ly, lx) = (y - yl as f64, x - xl as f64);
    let (hy, hx) = (1.0 - ly, 1.0 - lx);
    [((yl, xl), hy * hx), ((yl, xh), hy * lx), ((yh, xl), ly * hx), ((yh, xh), ly * lx)]
}
