//! ONNX Col2Im: rearranges column blocks [N, C·∏block, L] into an image [N, C, *image_shape], summing overlaps.
//! `image_shape` and `block_shape` must be known at load (constants or initializers).

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use crate::kernel::*;
use crate::BuildResult;

#[derive(Debug, Clone, PartialEq)]
pub struct Col2Im {
    pub dilations: Option<Vec<i64>>,
    pub pads: Option<Vec<i64>>,
    pub strides: Option<Vec<i64>>,
}

pub fn build(_ctx: &ParsingContext, node: &NodeProto) -> BuildResult {
    let op = Col2Im {
        dilations: node.get_attr_opt_vec("dilations")?,
        pads: node.get_attr_opt_vec("pads")?,
        strides: node.get_attr_opt_vec("strides")?,
    };
    Ok((expand(KernelExpansion(op)), vec![]))
}

struct Geo {
    image: Vec<usize>,
    block: Vec<usize>,
    dil: Vec<usize>,
    pad_begin: Vec<usize>,
    strides: Vec<usize>,
    blocks: Vec<usize>,
}

impl Col2Im {
    fn geo(&self, image: &[i64], block: &[i64]) -> TractResult<Geo> {
        let n = image.len();
        ensure!(block.len() == n && n > 0, "Col2Im: image_shape and block_shape must have the same non-zero length");
        let get = |v: &Option<Vec<i64>>, len: usize, def: i64, what: &str| -> TractResult<Vec<usize>> {
            let v = v.clone().unwrap_or_else(|| vec![def; len]);
            ensure!(v.len() == len, "Col2Im: {what} must have {len} values");
            v.into_iter()
                .map(|x| {
                    ensure!(x >= 0, "Col2Im: negative {what}");
                    Ok(x as usize)
                })
                .collect()
        };
        let dil = get(&self.dilations, n, 1, "dilations")?;
        let strides = get(&self.strides, n, 1, "strides")?;
        let pads = get(&self.pads, 2 * n, 0, "pads")?;
        ensure!(dil.iter().chain(&strides).all(|x| *x > 0), "Col2Im: dilations and strides must be positive");
        let image: Vec<usize> = image.iter().map(|x| (*x).max(0) as usize).collect();
        let block: Vec<usize> = block.iter().map(|x| (*x).max(0) as usize).collect();
        let mut blocks = vec![];
        for i in 0..n {
            let extent = dil[i] * (block[i].max(1) - 1) + 1;
            let span = image[i] + pads[i] + pads[i + n];
            ensure!(span >= extent && block[i] > 0, "Col2Im: block larger than the padded image");
            blocks.push((span - extent) / strides[i] + 1);
        }
        Ok(Geo { image, block, dil, pad_begin: pads[..n].to_vec(), strides, blocks })
    }
}

impl Kernel for Col2Im {
    fn name(&self) -> &'static str {
        "Col2Im"
    }
    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 3)?;
        s.equals(&outputs[0].datum_type, &inputs[0].datum_type)
    }
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 3, "Col2Im: expects input, image_shape, block_shape");
        let image = const_i64s("Col2Im", "image_shape", inputs[1])?;
        let block = const_i64s("Col2Im", "block_shape", inputs[2])?;
        let shape = concrete_shape("Col2Im", inputs[0])?;
        ensure!(shape.len() == 3, "Col2Im: input must be [N, C*prod(block), L]");
        let g = self.geo(&image, &block)?;
        let bsize: usize = g.block.iter().product();
        ensure!(shape[1] % bsize == 0, "Col2Im: {} channels do not divide by block size {bsize}", shape[1]);
        let mut out: TVec<usize> = tvec!(shape[0], shape[1] / bsize);
        out.extend(g.image.iter().copied());
        Ok(tvec!(TypedFact::dt_shape(inputs[0].datum_type, &*out)))
    }
    fn eval(&self, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let dt = inputs[0].datum_type();
        let x = to_f64(&inputs[0])?;
        let image: Vec<i64> = to_i64(&inputs[1])?.iter().copied().collect();
        let block: Vec<i64> = to_i64(&inputs[2])?.iter().copied().collect();
        let g = self.geo(&image, &block)?;
        ensure!(x.ndim() == 3, "Col2Im: input must be rank 3");
        let (n, cb, l) = (x.shape()[0], x.shape()[1], x.shape()[2]);
        let bsize: usize = g.block.iter().product();
        let nblocks: usize = g.blocks.iter().product();
        ensure!(cb % bsize == 0, "Col2Im: channels do not divide by block size");
        ensure!(l == nblocks, "Col2Im: input has {l} columns, the geometry gives {nblocks}");
        let c = cb / bsize;
        let img: usize = g.image.iter().product();
        let d = g.image.len();
        let mut out = vec![0f64; n * c * img];
        let mut bcoord = vec![0usize; d];
        let mut lcoord = vec![0usize; d];
        for b in 0..bsize {
            let mut r = b;
            for i in (0..d).rev() {
                bcoord[i] = r % g.block[i];
                r /= g.block[i];
            }
            for col in 0..l {
                let mut r = col;
                for i in (0..d).rev() {
                    lcoord[i] = r % g.blocks[i];
                    r /= g.blocks[i];
                }
                let mut pix = 0usize;
                let mut inside = true;
                for i in 0..d {
                    let p = (lcoord[i] * g.strides[i] + bcoord[i] * g.dil[i]) as i64 - g.pad_begin[i] as i64;
                    if p < 0 || p >= g.image[i] as i64 {
                        inside = false;
                        break;
                    }
                    pix = pix * g.image[i] + p as usize;
                }
                if !inside {
                    continue;
                }
                for bn in 0..n {
                    for ch in 0..c {
                        out[(bn * c + ch) * img + pix] += x[[bn, ch * bsize + b, col]];
                    }
                }
            }
        }
        let mut shape = vec![n, c];
        shape.extend(&g.image);
        Ok(tvec!(from_f64(tract_ndarray::ArrayD::from_shape_vec(shape, out)?, dt)?))
    }
}
