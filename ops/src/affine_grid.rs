//! ONNX AffineGrid: sampling grids from affine matrices, 2-D (theta [N,2,3], size [N,C,H,W] → [N,H,W,2]) and 3-D
//! (theta [N,3,4], size [N,C,D,H,W] → [N,D,H,W,3]). `size` must be known at load.

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use crate::kernel::*;
use crate::BuildResult;

#[derive(Debug, Clone, PartialEq)]
pub struct AffineGrid {
    pub align_corners: bool,
}

pub fn build(_ctx: &ParsingContext, node: &NodeProto) -> BuildResult {
    let align_corners = node.get_attr_opt::<i64>("align_corners")?.unwrap_or(0) != 0;
    Ok((expand(KernelExpansion(AffineGrid { align_corners })), vec![]))
}

fn check_size(size: &[i64]) -> TractResult<Vec<usize>> {
    ensure!(size.len() == 4 || size.len() == 5, "AffineGrid: size must have 4 or 5 values, got {size:?}");
    ensure!(size.iter().all(|s| *s >= 0), "AffineGrid: negative size");
    Ok(size.iter().map(|s| *s as usize).collect())
}

impl AffineGrid {
    fn coord(&self, i: usize, len: usize) -> f64 {
        if self.align_corners {
            if len <= 1 {
                0.0
            } else {
                -1.0 + 2.0 * i as f64 / (len - 1) as f64
            }
        } else {
            (2 * i + 1) as f64 / len as f64 - 1.0
        }
    }
}

impl Kernel for AffineGrid {
    fn name(&self) -> &'static str {
        "AffineGrid"
    }
    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 2)?;
        s.equals(&outputs[0].datum_type, &inputs[0].datum_type)
    }
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 2, "AffineGrid: expects theta and size");
        let size = check_size(&const_i64s("AffineGrid", "size", inputs[1])?)?;
        let mut shape: TVec<usize> = tvec!(size[0]);
        shape.extend(size[2..].iter().copied());
        shape.push(size.len() - 2);
        Ok(tvec!(TypedFact::dt_shape(inputs[0].datum_type, &*shape)))
    }
    fn eval(&self, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let dt = inputs[0].datum_type();
        let theta = to_f64(&inputs[0])?;
        let size = check_size(&to_i64(&inputs[1])?.iter().copied().collect::<Vec<_>>())?;
        let d = size.len() - 2;
        let n = size[0];
        ensure!(
            theta.shape() == [n, d, d + 1],
            "AffineGrid: theta must be [{n}, {d}, {}], got {:?}",
            d + 1,
            theta.shape()
        );
        let spatial = &size[2..];
        let points: usize = spatial.iter().product();
        let mut out = Vec::with_capacity(n * points * d);
        let mut base = vec![0f64; d + 1];
        base[d] = 1.0;
        for b in 0..n {
            for p in 0..points {
                // spatial index (.., h, w) → base (x = w, y = h, z = d)
                let mut r = p;
                for (k, len) in spatial.iter().enumerate().rev() {
                    let i = r % len;
                    r /= len;
                    base[spatial.len() - 1 - k] = self.coord(i, *len);
                }
                for row in 0..d {
                    out.push((0..=d).map(|c| theta[[b, row, c]] * base[c]).sum());
                }
            }
        }
        let mut shape = vec![n];
        shape.extend(spatial);
        shape.push(d);
        Ok(tvec!(from_f64(tract_ndarray::ArrayD::from_shape_vec(shape, out)?, dt)?))
    }
}
