//! com.microsoft GatherBlockQuantized: `Gather` on a block-wise quantized table, dequantizing the gathered rows.
//!
//! Semantics (onnxruntime contrib op docs and its CPU kernel), for the form kiln supports:
//! - `data`: uint8, `bits` 4 (two values per byte, the low nibble first) or 8; the last axis packed.
//! - `indices`: int32 / int64, any shape; negative ones count from the end of axis 0.
//! - `scales`: float / float16, the data's unpacked shape with the last axis `ceil(dim / block_size)`.
//! - `zero_points` (optional): uint8 packed like the data (`bits` per block, `ceil(blocks · bits / 8)` bytes per
//!   line of blocks); absent: `2^(bits-1)`.
//! - attributes `gather_axis` (0), `quantize_axis` (the last axis), `block_size` (>= 16, a power of two), `bits`.
//! - output: scales' type, `indices.shape + data.shape[1..]` with the last axis unpacked;
//!   `y = (q - zero_point[block]) · scale[block]`.
//!
//! The typed model keeps the table packed ([`PackedGatherBlockQuantized`]: the data and zero points as u32 words,
//! the scales as f32), which the GPU lowering binds as is (kiln-wgsl's `quant`); no dequantized table exists.

use tract_onnx::model::{optional_inputs, ParsingContext};
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_core::ops::cast::cast;
use tract_onnx::tract_hir::internal::*;

use crate::matmul_nbits::{operand, Packing};
use crate::BuildResult;

pub const DOMAIN: &str = "com.microsoft";

pub fn build(ctx: &ParsingContext, node: &NodeProto) -> BuildResult {
    if node.domain != DOMAIN {
        return crate::tract_builder(ctx, node);
    }
    let label = if node.name.is_empty() { node.output.first().cloned().unwrap_or_default() } else { node.name.clone() };
    let gather_axis: i64 = node.get_attr_opt("gather_axis")?.unwrap_or(0);
    let quantize_axis: i64 = node.get_attr_opt("quantize_axis")?.unwrap_or(1);
    let block_size: i64 = node.get_attr_opt("block_size")?.unwrap_or(128);
    let bits: i64 = node.get_attr_opt("bits")?.unwrap_or(4);
    ensure!(matches!(bits, 4 | 8), "GatherBlockQuantized node `{label}`: bits={bits} (kiln supports 4 and 8)");
    ensure!(
        block_size >= 16 && (block_size as u64).is_power_of_two(),
        "GatherBlockQuantized node `{label}`: block_size {block_size} (a power of two from 16)"
    );
    ensure!(
        node.input.len() >= 3 && node.input[..3].iter().all(|i| !i.is_empty()),
        "GatherBlockQuantized node `{label}`: inputs data, indices and scales are required"
    );
    let zero_points = optional_inputs(node).nth(3).flatten();
    let op = GatherBlockQuantized {
        label,
        gather_axis,
        quantize_axis,
        block_size: block_size as usize,
        bits: bits as usize,
        zero_points,
    };
    Ok((expand(op), vec![]))
}

#[derive(Debug, Clone, Hash)]
pub struct GatherBlockQuantized {
    pub label: String,
    pub gather_axis: i64,
    pub quantize_axis: i64,
    pub block_size: usize,
    pub bits: usize,
    pub zero_points: Option<usize>,
}

impl Expansion for GatherBlockQuantized {
    fn name(&self) -> StaticName {
        "GatherBlockQuantized".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_output_arity(outputs, 1)?;
        s.equals(&outputs[0].datum_type, &inputs[2].datum_type)?;
        let per_byte = 8 / self.bits;
        s.given_2(&inputs[0].shape, &inputs[1].shape, move |s, data, indices| {
            ensure!(!data.is_empty(), "GatherBlockQuantized: data of rank 0");
            let mut out: TVec<TDim> = indices.clone();
            for (i, d) in data.iter().enumerate().skip(1) {
                out.push(if i + 1 == data.len() { d.clone() * per_byte } else { d.clone() });
            }
            s.equals(&outputs[0].shape, ShapeFactoid::from(out))
        })?;
        Ok(())
    }

    fn wire(&self, prefix: &str, model: &mut TypedModel, inputs: &[OutletId]) -> TractResult<TVec<OutletId>> {
        let label = &self.label;
        // constants, or weights streamed from external data (the same bytes read as words / float32)
        let who = format!("GatherBlockQuantized node `{label}`");
        let data = operand(model, inputs[0], &who, "data")?;
        let scales = operand(model, inputs[2], &who, "scales")?;
        ensure!(
            data.datum_type()? == u8::datum_type(),
            "GatherBlockQuantized node `{label}`: data must be uint8 (got {:?})",
            data.datum_type()?
        );
        let data_shape = data.shape();
        let rank = data_shape.len();
        ensure!(rank >= 1, "GatherBlockQuantized node `{label}`: data of rank 0");
        let norm = |a: i64| if a < 0 { a + rank as i64 } else { a };
        ensure!(
            norm(self.gather_axis) == 0,
            "GatherBlockQuantized node `{label}`: gather_axis {} (kiln supports 0)",
            self.gather_axis
        );
        ensure!(
            rank >= 2 && norm(self.quantize_axis) == rank as i64 - 1,
            "GatherBlockQuantized node `{label}`: quantize_axis {} (kiln supports the last axis)",
            self.quantize_axis
        );
        let dt = scales.datum_type()?;
        ensure!(dt.is_float(), "GatherBlockQuantized node `{label}`: scales must be float (got {dt:?})");
        let per_byte = 8 / self.bits;
        let mut row_shape: Vec<usize> = data_shape[1..].to_vec();
        if let Some(l) = row_shape.last_mut() {
            *l *= per_byte;
        }
        let rows = data_shape[0];
        let last = row_shape.last().copied().unwrap_or(1);
        let lines = rows * row_shape.iter().product::<usize>() / last.max(1);
        let blocks = last.div_ceil(self.block_size);
        ensure!(
            scales.len()? == lines * blocks,
            "GatherBlockQuantized node `{label}`: scales hold {} values, expected {lines}·{blocks}",
            scales.len()?
        );
        let zp = match self.zero_points {
            Some(slot) => {
                let z = operand(model, inputs[slot], &who, "zero_points")?;
                ensure!(
                    z.datum_type()? == u8::datum_type(),
                    "GatherBlockQuantized node `{label}`: zero_points must be uint8 (got {:?})",
                    z.datum_type()?
                );
                let per_line = (blocks * self.bits).div_ceil(8);
                ensure!(
                    z.len()? == lines * per_line,
                    "GatherBlockQuantized node `{label}`: zero_points hold {} bytes, expected {}",
                    z.len()?,
                    lines * per_line
                );
                Some(z)
            }
            None => None,
        };
        let op = PackedGatherBlockQuantized {
            label: label.clone(),
            bits: self.bits,
            block_size: self.block_size,
            rows,
            row_shape,
            zero_points: zp.is_some(),
        };
        let d = data.wire(model, &format!("{prefix}.data_packed"), Packing::Words)?;
        let s = scales.wire(model, &format!("{prefix}.scales"), Packing::F32(lines * blocks, label, "scales"))?;
        let mut wires = tvec![d, inputs[1], s];
        if let Some(z) = zp {
            wires.push(z.wire(model, &format!("{prefix}.zero_points"), Packing::Words)?);
        }
        let mut y = model.wire_node(format!("{prefix}.gather"), op, &wires)?[0];
        if dt != f32::datum_type() {
            y = model.wire_node(format!("{prefix}.cast_y"), cast(dt), &[y])?[0];
        }
        Ok(tvec!(y))
    }
}

/// GatherBlockQuantized on its packed table. Inputs: data (u32 words of the uint8 bytes), indices (i64 / i32),
/// scales (f32 `[lines · blocks]`), and with `zero_points` the packed zero points as u32 words. Output: f32
/// `indices.shape + row_shape`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PackedGatherBlockQuantized {
    pub label: String,
    pub bits: usize,
    pub block_size: usize,
    /// The data's axis 0.
    pub rows: usize,
    /// One row's unpacked shape (the last axis quantized in blocks).
    pub row_shape: Vec<usize>,
    pub zero_points: bool,
}

impl Op for PackedGatherBlockQuantized {
    fn name(&self) -> StaticName {
        "GatherBlockQuantized".into()
    }
    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "rows={} row={:?} bits={} block_size={} zero points {}",
            self.rows, self.row_shape, self.bits, self.block_size, self.zero_points
        )])
    }
    op_as_typed_op!();
}

impl EvalOp for PackedGatherBlockQuantized {
    op_out_of_plan!();
    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let label = &self.label;
        ensure!(inputs.len() == 3 + self.zero_points as usize, "GatherBlockQuantized node `{label}`: inputs");
        let indices = inputs[1].cast_to::<i64>()?;
        let idx_view = indices.try_as_plain_ram()?;
        let idx = idx_view.as_slice::<i64>()?;
        let d_view = inputs[0].try_as_plain_ram()?;
        let data = d_view.as_slice::<u32>()?;
        let s_view = inputs[2].try_as_plain_ram()?;
        let scales = s_view.as_slice::<f32>()?;
        let z_view = match inputs.get(3) {
            Some(z) => Some(z.try_as_plain_ram()?),
            None => None,
        };
        let zps = match &z_view {
            Some(v) => Some(v.as_slice::<u32>()?),
            None => None,
        };
        let row_len: usize = self.row_shape.iter().product();
        let last = self.row_shape.last().copied().unwrap_or(1).max(1);
        let blocks = last.div_ceil(self.block_size);
        let zp_line = (blocks * self.bits).div_ceil(8);
        let mask = (1u32 << self.bits) - 1;
        let bits_at = |words: &[u32], bit: usize| -> TractResult<u32> {
            let w =
                words.get(bit / 32).ok_or_else(|| format_err!("GatherBlockQuantized node `{label}`: short data"))?;
            Ok((w >> (bit % 32)) & mask)
        };
        let mut out = Vec::with_capacity(idx.len() * row_len);
        for &i in idx {
            let r = if i < 0 { i + self.rows as i64 } else { i };
            ensure!(
                (0..self.rows as i64).contains(&r),
                "GatherBlockQuantized node `{label}`: index {i} out of range for {} rows",
                self.rows
            );
            for e in 0..row_len {
                let flat = r as usize * row_len + e;
                let line = flat / last;
                let blk = (flat % last) / self.block_size;
                let scale = *scales
                    .get(line * blocks + blk)
                    .ok_or_else(|| format_err!("GatherBlockQuantized node `{label}`: short scales"))?;
                let zero = match zps {
                    Some(z) => bits_at(z, line * zp_line * 8 + blk * self.bits)? as f32,
                    None => (1u32 << (self.bits - 1)) as f32,
                };
                out.push((bits_at(data, flat * self.bits)? as f32 - zero) * scale);
            }
        }
        let mut shape: TVec<usize> = indices.shape().into();
        shape.extend(self.row_shape.iter().copied());
        Ok(tvec!(Tensor::from_shape(&shape, &out)?.into_tvalue()))
    }
}

impl TypedOp for PackedGatherBlockQuantized {
    as_op!();
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let mut shape: TVec<TDim> = inputs[1].shape.iter().cloned().collect();
        shape.extend(self.row_shape.iter().map(|d| d.to_dim()));
        Ok(tvec!(f32::fact(shape)))
    }
}
