//! com.microsoft MatMulNBits: `Y = A · dequant(B)ᵀ (+ bias)` with block-wise quantized weights.
//!
//! tract 0.23.9's own implementation maps block size 32 onto its Q4_0 packed format and is wrong in some layers (max
//! logit diff 3.7 on an int4 export). kiln's typed model keeps the weight packed ([`PackedMatMulNBits`]: B and packed
//! zero points as u32 words, float16 scales as pairs of halves), which the GPU lowering binds as is and dequantizes in
//! its kernel (kiln-wgsl's `qmatmul`): no f32 copy of a GPU-placed weight exists anywhere. On the CPU, tract's codegen
//! (the optimised plan) dequantizes the constant weight once into a plain f32 `[K, N]` constant and the node becomes
//! an ordinary matmul, which tract packs and runs with its f32 kernels; an unoptimised plan dequantizes at each run.
//!
//! Semantics (onnxruntime contrib op docs):
//! - `A`: T1 `[..., K]` (float or float16); `Y` has A's type and shape `[..., N]`.
//! - `B`: uint8 `[N, k_blocks, blob_size]`, `k_blocks = ceil(K / block_size)`, `blob_size = block_size · bits / 8`;
//!   weight `k` of a block sits at bit `k · bits` of its blob, least significant bits first.
//! - `scales`: T1 `[N · k_blocks]` (any shape of that size).
//! - `zero_points` (optional): uint8 packed like B, `ceil(k_blocks · bits / 8)` bytes per column, or T1 `[N · k_blocks]`
//!   (the same type as the scales). Absent: `2^(bits-1)`.
//! - `g_idx` (optional, act-order): not supported; the node is refused with an error.
//! - `bias` (optional): T1 `[N]`.
//!
//! `W[n, k] = (q[n, k] - zero_point[n, k / block_size]) · scale[n, k / block_size]`.
//!
//! `accuracy_level` 4 lets onnxruntime compute with int8 activations, and its CPU kernels (MLAS `CompInt8`) do: each
//! row of A is quantized per block of `block_size` along K, symmetric, `scale = max|a| / 127`,
//! `q = round_half_even(a · 127 / max|a|)`, and the block dot products are taken in integers. That changes outputs by
//! ~1% of their range against the exact product, so kiln reproduces it: at accuracy level 4 A goes through
//! [`QuantizeBlocksInt8`] (quantize then dequantize, exact in f32) before the f32 matmul, which equals MLAS' integer
//! arithmetic up to f32 summation order. Other levels, and float zero points (which onnxruntime never runs in int8),
//! compute the exact f32 product.

use tract_onnx::model::{optional_inputs, ParsingContext};
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_core::ops::cast::cast;
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_hir::internal::*;
use tract_onnx::tract_hir::ops::logic::wire_with_rank_broadcast;

use crate::external_weight::{ExternalWeight, Layout};
use crate::BuildResult;

/// The domain this op belongs to; nodes of any other domain go to tract's builder.
pub const DOMAIN: &str = "com.microsoft";

pub fn build(ctx: &ParsingContext, node: &NodeProto) -> BuildResult {
    if node.domain != DOMAIN {
        return crate::tract_builder(ctx, node);
    }
    let label = if node.name.is_empty() { node.output.first().cloned().unwrap_or_default() } else { node.name.clone() };
    let k: i64 = node.get_attr("K")?;
    let n: i64 = node.get_attr("N")?;
    let bits: i64 = node.get_attr_opt("bits")?.unwrap_or(4);
    let block_size: i64 = node.get_attr("block_size")?;
    ensure!(k > 0 && n > 0, "MatMulNBits node `{label}`: K ({k}) and N ({n}) must be positive");
    ensure!(
        matches!(bits, 2 | 4 | 8),
        "MatMulNBits node `{label}`: bits={bits} is not supported (kiln supports 2, 4 and 8)"
    );
    ensure!(block_size > 0, "MatMulNBits node `{label}`: block_size must be positive (got {block_size})");
    ensure!(
        (block_size * bits) % 8 == 0,
        "MatMulNBits node `{label}`: block_size {block_size} × bits {bits} is not a whole number of bytes"
    );
    let mut opt = optional_inputs(node).skip(3);
    let zero_points = opt.next().flatten();
    let g_idx = opt.next().flatten();
    let bias = opt.next().flatten();
    if g_idx.is_some() {
        bail!("MatMulNBits node `{label}`: g_idx (act-order quantization) is not supported by kiln");
    }
    ensure!(
        node.input.len() >= 3 && node.input[..3].iter().all(|i| !i.is_empty()),
        "MatMulNBits node `{label}`: inputs A, B and scales are required"
    );
    let accuracy_level: i64 = node.get_attr_opt("accuracy_level")?.unwrap_or(0);
    let op = MatMulNBits {
        label,
        int8_activations: accuracy_level == 4,
        k: k as usize,
        n: n as usize,
        bits: bits as usize,
        block_size: block_size as usize,
        zero_points,
        bias,
    };
    Ok((expand(op), vec![]))
}

#[derive(Debug, Clone, Hash)]
pub struct MatMulNBits {
    /// The node's name, for messages.
    pub label: String,
    pub k: usize,
    pub n: usize,
    pub bits: usize,
    pub block_size: usize,
    /// accuracy_level 4: emulate onnxruntime's int8 block quantization of A.
    pub int8_activations: bool,
    /// Input slot of `zero_points`, if present.
    pub zero_points: Option<usize>,
    /// Input slot of `bias`, if present.
    pub bias: Option<usize>,
}

/// Zero points as the node gives them.
pub enum ZeroPoints<'a> {
    /// `2^(bits-1)` for every block.
    Default,
    /// uint8, packed `bits` per block, `ceil(k_blocks · bits / 8)` bytes per column.
    Packed(&'a [u8]),
    /// One float per block, `[N · k_blocks]`.
    Float(&'a [f32]),
}

impl MatMulNBits {
    pub fn k_blocks(&self) -> usize {
        self.k.div_ceil(self.block_size)
    }
    pub fn blob_size(&self) -> usize {
        self.block_size * self.bits / 8
    }

    /// Dequantizes B into a row-major f32 `[K, N]` weight (the transpose of ONNX's `[N, K]`, ready for `A · W`).
    pub fn dequantize_kn(&self, b: &[u8], scales: &[f32], zero_points: ZeroPoints) -> TractResult<Vec<f32>> {
        let (k, n, bits, bs) = (self.k, self.n, self.bits, self.block_size);
        let (k_blocks, blob) = (self.k_blocks(), self.blob_size());
        let label = &self.label;
        ensure!(
            b.len() == n * k_blocks * blob,
            "MatMulNBits node `{label}`: B holds {} bytes, expected N·k_blocks·blob_size = {n}·{k_blocks}·{blob} = {}",
            b.len(),
            n * k_blocks * blob
        );
        ensure!(
            scales.len() == n * k_blocks,
            "MatMulNBits node `{label}`: scales hold {} values, expected N·k_blocks = {}",
            scales.len(),
            n * k_blocks
        );
        let zp_bytes_per_col = (k_blocks * bits).div_ceil(8);
        match zero_points {
            ZeroPoints::Packed(z) => ensure!(
                z.len() == n * zp_bytes_per_col,
                "MatMulNBits node `{label}`: packed zero_points hold {} bytes, expected {}",
                z.len(),
                n * zp_bytes_per_col
            ),
            ZeroPoints::Float(z) => ensure!(
                z.len() == n * k_blocks,
                "MatMulNBits node `{label}`: zero_points hold {} values, expected N·k_blocks = {}",
                z.len(),
                n * k_blocks
            ),
            ZeroPoints::Default => {}
        }
        let mask = ((1u32 << bits) - 1) as u8;
        let default_zero = (1u32 << (bits - 1)) as f32;
        let mut w = vec![0f32; k * n];
        for col in 0..n {
            for blk in 0..k_blocks {
                let scale = scales[col * k_blocks + blk];
                let zero = match zero_points {
                    ZeroPoints::Default => default_zero,
                    ZeroPoints::Packed(z) => {
                        let bit = blk * bits;
                        ((z[col * zp_bytes_per_col + bit / 8] >> (bit % 8)) & mask) as f32
                    }
                    ZeroPoints::Float(z) => z[col * k_blocks + blk],
                };
                let blob_start = (col * k_blocks + blk) * blob;
                for i in 0..bs {
                    let kk = blk * bs + i;
                    if kk >= k {
                        break;
                    }
                    let bit = i * bits;
                    let q = (b[blob_start + bit / 8] >> (bit % 8)) & mask;
                    w[kk * n + col] = (q as f32 - zero) * scale;
                }
            }
        }
        Ok(w)
    }

    /// A constant operand, or a weight streamed from external data (kiln_ops::external_weight).
    fn operand(&self, model: &TypedModel, wire: OutletId, what: &str) -> TractResult<Operand> {
        operand(model, wire, &format!("MatMulNBits node `{}`", self.label), what)
    }
}

/// A constant operand, or a weight streamed from external data (kiln_ops::external_weight); `who` for messages.
pub(crate) fn operand(model: &TypedModel, wire: OutletId, who: &str, what: &str) -> TractResult<Operand> {
    if let Some(k) = model.outlet_fact(wire)?.konst.clone() {
        return Ok(Operand::Const(k));
    }
    if let Some(w) = model.node(wire.node).op_as::<ExternalWeight>() {
        if w.layout == Layout::Plain && w.slice.is_none() {
            return Ok(Operand::External(w.clone()));
        }
    }
    bail!("{who}: {what} must be a constant (an initializer)")
}

/// An operand the typed model repacks (MatMulNBits, GatherBlockQuantized): a constant, or a streamed weight (the
/// same bytes read through another layout, so the repacking needs no read).
pub(crate) enum Operand {
    Const(Arc<Tensor>),
    External(ExternalWeight),
}

/// How an operand is kept: its bytes as u32 words, or float32 of `len` values (the label and operand for messages).
pub(crate) enum Packing<'a> {
    Words,
    F32(usize, &'a str, &'a str),
}

impl Operand {
    pub(crate) fn datum_type(&self) -> TractResult<DatumType> {
        match self {
            Operand::Const(t) => Ok(t.datum_type()),
            Operand::External(w) => w.stored_datum_type(),
        }
    }
    pub(crate) fn len(&self) -> TractResult<usize> {
        match self {
            Operand::Const(t) => Ok(t.len()),
            Operand::External(w) => Ok(w.dims.iter().product()),
        }
    }
    pub(crate) fn shape(&self) -> TVec<usize> {
        match self {
            Operand::Const(t) => t.shape().into(),
            Operand::External(w) => w.dims.clone(),
        }
    }
    pub(crate) fn wire(&self, model: &mut TypedModel, name: &str, packing: Packing) -> TractResult<OutletId> {
        match (self, packing) {
            (Operand::Const(t), Packing::Words) => {
                let words = if t.datum_type() == f16::datum_type() {
                    let view = t.try_as_plain_ram()?;
                    let halves: Vec<u16> = view.as_slice::<f16>()?.iter().map(|h| h.to_bits()).collect();
                    pack_halves(&halves)
                } else {
                    words_of(t.try_as_plain_ram()?.as_slice::<u8>()?)
                };
                model.add_const(name, Tensor::from_shape(&[words.len()], &words)?)
            }
            (Operand::Const(t), Packing::F32(len, label, what)) => {
                model.add_const(name, as_f32(t, label, what)?.into_shape(&[len])?)
            }
            (Operand::External(w), Packing::Words) => Ok(model.wire_node(name, w.with_layout(Layout::Words), &[])?[0]),
            (Operand::External(w), Packing::F32(len, label, what)) => {
                let layout = match w.stored_datum_type()? {
                    DatumType::F32 => Layout::Plain,
                    DatumType::F16 => Layout::F16ToF32,
                    other => bail!("MatMulNBits node `{label}`: streamed {what} of {other:?} (float or float16 only)"),
                };
                let op = ExternalWeight { dims: tvec![len], layout, ..w.clone() };
                Ok(model.wire_node(name, op, &[])?[0])
            }
        }
    }
}

fn as_f32(t: &Tensor, label: &str, what: &str) -> TractResult<Tensor> {
    ensure!(
        t.datum_type().is_float(),
        "MatMulNBits node `{label}`: {what} must be float or float16 (got {:?})",
        t.datum_type()
    );
    Ok(t.cast_to::<f32>()?.into_owned())
}

impl Expansion for MatMulNBits {
    fn name(&self) -> StaticName {
        "MatMulNBits".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_output_arity(outputs, 1)?;
        s.equals(&outputs[0].datum_type, &inputs[0].datum_type)?;
        s.equals(&inputs[0].rank, &outputs[0].rank)?;
        let (k, n) = (self.k.to_dim(), self.n.to_dim());
        s.given(&inputs[0].rank, move |s, rank| {
            ensure!(rank >= 1, "MatMulNBits: A must have rank 1 or more");
            let rank = rank as usize;
            for ax in 0..rank - 1 {
                s.equals(&outputs[0].shape[ax], &inputs[0].shape[ax])?;
            }
            s.equals(&inputs[0].shape[rank - 1], k.clone())?;
            s.equals(&outputs[0].shape[rank - 1], n.clone())
        })?;
        Ok(())
    }

    fn wire(&self, prefix: &str, model: &mut TypedModel, inputs: &[OutletId]) -> TractResult<TVec<OutletId>> {
        let label = &self.label;
        let dt = model.outlet_fact(inputs[0])?.datum_type;
        ensure!(
            dt == f32::datum_type() || dt == f16::datum_type(),
            "MatMulNBits node `{label}`: A must be float or float16 (got {dt:?})"
        );
        let rank = model.outlet_fact(inputs[0])?.rank();
        ensure!((1..=8).contains(&rank), "MatMulNBits node `{label}`: A has rank {rank} (kiln supports 1 to 8)");

        let b = self.operand(model, inputs[1], "B")?;
        ensure!(
            b.datum_type()? == u8::datum_type(),
            "MatMulNBits node `{label}`: B must be uint8 (got {:?})",
            b.datum_type()?
        );
        let scales = self.operand(model, inputs[2], "scales")?;
        ensure!(
            scales.datum_type()?.is_float(),
            "MatMulNBits node `{label}`: scales must be float or float16 (got {:?})",
            scales.datum_type()?
        );
        let zp_tensor = match self.zero_points {
            Some(slot) => Some(self.operand(model, inputs[slot], "zero_points")?),
            None => None,
        };
        let (k_blocks, blob) = (self.k_blocks(), self.blob_size());
        let (n, bits) = (self.n, self.bits);
        ensure!(
            b.len()? == n * k_blocks * blob,
            "MatMulNBits node `{label}`: B holds {} bytes, expected N·k_blocks·blob_size = {n}·{k_blocks}·{blob} = {}",
            b.len()?,
            n * k_blocks * blob
        );
        ensure!(
            scales.len()? == n * k_blocks,
            "MatMulNBits node `{label}`: scales hold {} values, expected N·k_blocks = {}",
            scales.len()?,
            n * k_blocks
        );
        // The packed form the typed model keeps (the GPU binds it as is; the CPU dequantizes it at codegen): B and
        // packed zero points as little-endian u32 words, float16 scales as pairs of halves in u32 words. A streamed
        // operand (kiln_ops::external_weight) is the same bytes read through another layout.
        let b_k = b.wire(model, &format!("{prefix}.b_packed"), Packing::Words)?;
        let scales_f16 = scales.datum_type()? == f16::datum_type();
        let s_k = if scales_f16 {
            scales.wire(model, &format!("{prefix}.scales"), Packing::Words)?
        } else {
            scales.wire(model, &format!("{prefix}.scales"), Packing::F32(n * k_blocks, label, "scales"))?
        };
        let (zp_kind, zp_w) = match &zp_tensor {
            None => (ZeroPointKind::Default, None),
            Some(t) if t.datum_type()? == u8::datum_type() => {
                let per_col = (k_blocks * bits).div_ceil(8);
                ensure!(
                    t.len()? == n * per_col,
                    "MatMulNBits node `{label}`: packed zero_points hold {} bytes, expected {}",
                    t.len()?,
                    n * per_col
                );
                (ZeroPointKind::Packed, Some(t.wire(model, &format!("{prefix}.zero_points"), Packing::Words)?))
            }
            Some(t) => {
                ensure!(
                    t.len()? == n * k_blocks,
                    "MatMulNBits node `{label}`: zero_points hold {} values, expected N·k_blocks = {}",
                    t.len()?,
                    n * k_blocks
                );
                let packing = Packing::F32(n * k_blocks, label, "zero_points");
                (ZeroPointKind::Float, Some(t.wire(model, &format!("{prefix}.zero_points"), packing)?))
            }
        };
        let packed = PackedMatMulNBits {
            label: label.clone(),
            k: self.k,
            n,
            bits,
            block_size: self.block_size,
            scales_f16,
            zero_points: zp_kind,
            // onnxruntime keeps float activations when the zero points are floats (no integer form of the weight)
            int8_activations: self.int8_activations && zp_kind != ZeroPointKind::Float,
        };
        let mut a = inputs[0];
        if dt != f32::datum_type() {
            a = model.wire_node(format!("{prefix}.cast_a"), cast(f32::datum_type()), &[a])?[0];
        }
        // onnxruntime keeps float activations when the zero points are floats (no integer form of the weight)
        let mut wires = tvec![a, b_k, s_k];
        if let Some(z) = zp_w {
            wires.push(z);
        }
        let mut y = model.wire_node(format!("{prefix}.matmul"), packed, &wires)?[0];
        if let Some(slot) = self.bias {
            let mut bias = inputs[slot];
            let bias_fact = model.outlet_fact(bias)?.clone();
            ensure!(
                bias_fact.shape.volume() == self.n.to_dim(),
                "MatMulNBits node `{label}`: bias has shape {:?}, expected [{}]",
                bias_fact.shape,
                self.n
            );
            if bias_fact.datum_type != f32::datum_type() {
                bias = model.wire_node(format!("{prefix}.cast_bias"), cast(f32::datum_type()), &[bias])?[0];
            }
            y = wire_with_rank_broadcast(format!("{prefix}.bias"), model, add(), &[y, bias])?[0];
        }
        if dt != f32::datum_type() {
            y = model.wire_node(format!("{prefix}.cast_y"), cast(dt), &[y])?[0];
        }
        Ok(tvec!(y))
    }
}

/// Bytes as little-endian u32 words (the last one zero-padded).
pub fn words_of(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks(4)
        .map(|c| {
            let mut w = [0u8; 4];
            w[..c.len()].copy_from_slice(c);
            u32::from_le_bytes(w)
        })
        .collect()
}

/// The bytes of little-endian u32 words, `len` of them.
pub fn bytes_of(words: &[u32], len: usize) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).take(len).collect()
}

/// float16 bit patterns two per u32 word, the even one in the low half (WGSL's `unpack2x16float` order).
pub fn pack_halves(halves: &[u16]) -> Vec<u32> {
    halves.chunks(2).map(|c| c[0] as u32 | (c.get(1).copied().unwrap_or(0) as u32) << 16).collect()
}

/// What the zero points of a [`PackedMatMulNBits`] are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ZeroPointKind {
    /// None given: `2^(bits-1)`.
    Default,
    /// uint8 packed `bits` per block, `ceil(k_blocks · bits / 8)` bytes per column, as u32 words.
    Packed,
    /// f32, one per block.
    Float,
}

/// MatMulNBits as the typed model keeps it: `Y[.., n] = Σ_k A[.., k] · W[n, k]` with W still quantized.
/// Inputs: A (f32 `[.., K]`), B (u32 words of the ONNX uint8 blob bytes, `[N · k_blocks · blob_size / 4]`), scales
/// (f32 `[N · k_blocks]`, or u32 `[ceil(N · k_blocks / 2)]` of float16 pairs when `scales_f16`), and, unless
/// `zero_points` is `Default`, the zero points (u32 words of the packed bytes, or f32 `[N · k_blocks]`). With
/// `int8_activations`, A is quantized to int8 per block first (accuracy_level 4, [`QuantizeBlocksInt8`]).
///
/// The GPU lowering binds these as they are and dequantizes in its kernel. On the CPU, tract's codegen (the
/// optimised plan) replaces the node with a dequantized f32 `[K, N]` constant and an EinSum, which tract packs and
/// runs with its f32 kernels; an unoptimised plan evaluates the node directly.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PackedMatMulNBits {
    pub label: String,
    pub k: usize,
    pub n: usize,
    pub bits: usize,
    pub block_size: usize,
    pub scales_f16: bool,
    pub zero_points: ZeroPointKind,
    /// accuracy_level 4: A goes through [`QuantizeBlocksInt8`] (per block of `block_size`) first.
    pub int8_activations: bool,
}

impl PackedMatMulNBits {
    fn reference(&self) -> MatMulNBits {
        MatMulNBits {
            label: self.label.clone(),
            k: self.k,
            n: self.n,
            bits: self.bits,
            block_size: self.block_size,
            int8_activations: false,
            zero_points: None,
            bias: None,
        }
    }

    /// The dequantized `[K, N]` weight from the node's constant inputs (B, scales, zero points).
    pub fn dequantize(&self, b: &Tensor, scales: &Tensor, zp: Option<&Tensor>) -> TractResult<Tensor> {
        let op = self.reference();
        let (k_blocks, blob) = (op.k_blocks(), op.blob_size());
        let b_bytes = bytes_of(b.try_as_plain_ram()?.as_slice::<u32>()?, self.n * k_blocks * blob);
        let count = self.n * k_blocks;
        let scales: Vec<f32> = if self.scales_f16 {
            let view = scales.try_as_plain_ram()?;
            let words = view.as_slice::<u32>()?;
            (0..count)
                .map(|i| f16::from_bits((words.get(i / 2).copied().unwrap_or(0) >> (16 * (i % 2))) as u16).to_f32())
                .collect()
        } else {
            scales.try_as_plain_ram()?.as_slice::<f32>()?.to_vec()
        };
        let zp_bytes;
        let zp_view;
        let zero_points = match (self.zero_points, zp) {
            (ZeroPointKind::Default, _) => ZeroPoints::Default,
            (ZeroPointKind::Packed, Some(z)) => {
                let per_col = (k_blocks * self.bits).div_ceil(8);
                zp_bytes = bytes_of(z.try_as_plain_ram()?.as_slice::<u32>()?, self.n * per_col);
                ZeroPoints::Packed(&zp_bytes)
            }
            (ZeroPointKind::Float, Some(z)) => {
                zp_view = z.try_as_plain_ram()?;
                ZeroPoints::Float(zp_view.as_slice::<f32>()?)
            }
            _ => bail!("MatMulNBits node `{}`: zero points missing", self.label),
        };
        let w = op.dequantize_kn(&b_bytes, &scales, zero_points)?;
        Tensor::from_shape(&[self.k, self.n], &w)
    }

    fn einsum(&self, rank: usize) -> TractResult<EinSum> {
        let lead: String = "abcdefgh".chars().take(rank - 1).collect();
        let axes = AxesMapping::from_strs(&[format!("{lead}k"), "kn".to_string()], &[format!("{lead}n")])?;
        Ok(EinSum::new(axes, f32::datum_type()))
    }
}

impl Op for PackedMatMulNBits {
    fn name(&self) -> StaticName {
        "MatMulNBits".into()
    }
    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "K={} N={} bits={} block_size={} scales {} zero points {:?} int8 activations {}",
            self.k,
            self.n,
            self.bits,
            self.block_size,
            if self.scales_f16 { "f16" } else { "f32" },
            self.zero_points,
            self.int8_activations
        )])
    }
    op_as_typed_op!();
}

impl EvalOp for PackedMatMulNBits {
    fn eval_out_of_plan(&self, inputs: TVec<TValue>) -> TractResult<Option<TVec<TValue>>> {
        Ok(Some(self.eval(&EvalContext::out_of_plan(), inputs)?))
    }
    /// An unoptimised plan (tract's codegen never ran): one column of the weight dequantized at a time, never the
    /// whole weight (a node left on the CPU beside the GPU, too big for a GPU binding, must not cost a copy of it).
    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let label = &self.label;
        let want = if self.zero_points == ZeroPointKind::Default { 3 } else { 4 };
        ensure!(inputs.len() == want, "MatMulNBits node `{label}`: expected {want} inputs");
        let (k, n, bits, bs) = (self.k, self.n, self.bits, self.block_size);
        let reference = self.reference();
        let (k_blocks, blob) = (reference.k_blocks(), reference.blob_size());
        let a_shape = inputs[0].shape();
        let mut a_t = inputs[0].clone().into_tensor();
        if self.int8_activations {
            let mut view = a_t.try_as_plain_ram_mut()?;
            QuantizeBlocksInt8 { block_size: bs }.apply(view.as_slice_mut::<f32>()?, k);
        }
        let a_view = a_t.try_as_plain_ram()?;
        let a = a_view.as_slice::<f32>()?;
        ensure!(a_shape.last() == Some(&k), "MatMulNBits node `{label}`: A of shape {a_shape:?}, K={k}");
        let b_view = inputs[1].try_as_plain_ram()?;
        let b = b_view.as_slice::<u32>()?;
        let s_view = inputs[2].try_as_plain_ram()?;
        let z_view = match inputs.get(3) {
            Some(z) => Some(z.try_as_plain_ram()?),
            None => None,
        };
        let byte = |words: &[u32], i: usize| (words[i / 4] >> (8 * (i % 4))) as u8;
        ensure!(b.len() * 4 >= n * k_blocks * blob, "MatMulNBits node `{label}`: B too short");
        let scale_at: Box<dyn Fn(usize) -> f32> = if self.scales_f16 {
            let w = s_view.as_slice::<u32>()?;
            ensure!(w.len() * 2 >= n * k_blocks, "MatMulNBits node `{label}`: scales too short");
            Box::new(move |i| f16::from_bits((w[i / 2] >> (16 * (i % 2))) as u16).to_f32())
        } else {
            let w = s_view.as_slice::<f32>()?;
            ensure!(w.len() >= n * k_blocks, "MatMulNBits node `{label}`: scales too short");
            Box::new(move |i| w[i])
        };
        let mask = ((1u32 << bits) - 1) as u8;
        let per_col = (k_blocks * bits).div_ceil(8);
        let zero_at: Box<dyn Fn(usize, usize) -> f32> = match (self.zero_points, &z_view) {
            (ZeroPointKind::Default, _) => Box::new(move |_, _| (1u32 << (bits - 1)) as f32),
            (ZeroPointKind::Packed, Some(z)) => {
                let w = z.as_slice::<u32>()?;
                ensure!(w.len() * 4 >= n * per_col, "MatMulNBits node `{label}`: zero points too short");
                Box::new(move |col, blk| {
                    let bit = blk * bits;
                    ((byte(w, col * per_col + bit / 8) >> (bit % 8)) & mask) as f32
                })
            }
            (ZeroPointKind::Float, Some(z)) => {
                let w = z.as_slice::<f32>()?;
                ensure!(w.len() >= n * k_blocks, "MatMulNBits node `{label}`: zero points too short");
                Box::new(move |col, blk| w[col * k_blocks + blk])
            }
            _ => bail!("MatMulNBits node `{label}`: zero points missing"),
        };
        let rows = a.len() / k.max(1);
        let mut y = vec![0f32; rows * n];
        let mut column = vec![0f32; k];
        for col in 0..n {
            for (kk, w) in column.iter_mut().enumerate() {
                let blk = kk / bs;
                let bit = (kk % bs) * bits;
                let q = (byte(b, (col * k_blocks + blk) * blob + bit / 8) >> (bit % 8)) & mask;
                *w = (q as f32 - zero_at(col, blk)) * scale_at(col * k_blocks + blk);
            }
            for r in 0..rows {
                y[r * n + col] = a[r * k..][..k].iter().zip(&column).map(|(x, w)| x * w).sum();
            }
        }
        let mut shape: TVec<usize> = a_shape.into();
        if let Some(l) = shape.last_mut() {
            *l = n;
        }
        Ok(tvec!(Tensor::from_shape(&shape, &y)?.into_tvalue()))
    }
}

impl TypedOp for PackedMatMulNBits {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let want = if self.zero_points == ZeroPointKind::Default { 3 } else { 4 };
        ensure!(inputs.len() == want, "MatMulNBits node `{}`: expected {want} inputs", self.label);
        let a = inputs[0];
        ensure!(a.datum_type == f32::datum_type(), "MatMulNBits node `{}`: A must be f32 here", self.label);
        ensure!(a.rank() >= 1, "MatMulNBits node `{}`: A must have rank 1 or more", self.label);
        let mut shape: TVec<TDim> = a.shape.iter().cloned().collect();
        if let Some(last) = shape.last_mut() {
            *last = self.n.to_dim();
        }
        Ok(tvec!(f32::fact(shape)))
    }

    fn axes_mapping(&self, inputs: &[&TypedFact], outputs: &[&TypedFact]) -> TractResult<AxesMapping> {
        // the leading axes of A map to the output's; K, N and the packed operands do not map
        let rank = inputs[0].rank();
        let mut axes = AxesMapping::disconnected(inputs, outputs)?;
        for ax in 0..rank.saturating_sub(1) {
            axes = axes.linking((InOut::In(0), ax), (InOut::Out(0), ax))?;
        }
        Ok(axes)
    }

    fn codegen(&self, model: &TypedModel, node: &TypedNode) -> TractResult<Option<TypedModelPatch>> {
        // the CPU's optimised plan: a dequantized f32 constant and a plain matmul, which tract packs
        let konst = |slot: usize| model.outlet_fact(node.inputs[slot]).ok().and_then(|f| f.konst.clone());
        let (Some(b), Some(s)) = (konst(1), konst(2)) else { return Ok(None) };
        let zp = match node.inputs.len() {
            4 => match konst(3) {
                Some(z) => Some(z),
                None => return Ok(None),
            },
            _ => None,
        };
        let w = self.dequantize(&b, &s, zp.as_deref())?;
        let rank = model.outlet_fact(node.inputs[0])?.rank();
        let mut patch = TypedModelPatch::new(format!("dequantize {}", node.name));
        let mut a = patch.tap_model(model, node.inputs[0])?;
        if self.int8_activations {
            let op = QuantizeBlocksInt8 { block_size: self.block_size };
            a = patch.wire_node(format!("{}.quantize_a", node.name), op, &[a])?[0];
        }
        let w = patch.add_const(format!("{}.weight_kn", node.name), w)?;
        let y = patch.wire_node(&node.name, self.einsum(rank)?, &[a, w])?[0];
        patch.shunt_outside(model, node.id.into(), y)?;
        Ok(Some(patch))
    }
}

fn add() -> tract_onnx::tract_core::ops::binary::TypedBinOp {
    tract_onnx::tract_core::ops::math::add()
}

/// Quantize-dequantize of f32 values to int8 per block of `block_size` along the last axis, as onnxruntime's MLAS
/// quantizes MatMulNBits activations at accuracy level 4: `scale = max|x| / 127`, `q = round_half_even(x · 127 /
/// max|x|)`, output `q · scale` (0 for an all-zero block).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct QuantizeBlocksInt8 {
    pub block_size: usize,
}

impl QuantizeBlocksInt8 {
    /// Quantizes `x` in place, rows of `row_len` split in blocks of `block_size` (the last one possibly shorter).
    pub fn apply(&self, x: &mut [f32], row_len: usize) {
        if row_len == 0 || self.block_size == 0 {
            return;
        }
        for row in x.chunks_mut(row_len) {
            for block in row.chunks_mut(self.block_size) {
                let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                let scale = amax / 127.0;
                let inverse = if amax != 0.0 { 127.0 / amax } else { 0.0 };
                for v in block.iter_mut() {
                    *v = (*v * inverse).round_ties_even().clamp(-127.0, 127.0) * scale;
                }
            }
        }
    }
}

impl Op for QuantizeBlocksInt8 {
    fn name(&self) -> StaticName {
        "MatMulNBitsQuantizeA".into()
    }
    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("int8 per {} along the last axis", self.block_size)])
    }
    op_as_typed_op!();
}

impl EvalOp for QuantizeBlocksInt8 {
    fn eval(&self, _ctx: &EvalContext, mut inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        ensure!(inputs.len() == 1, "MatMulNBitsQuantizeA takes one input");
        let mut t = inputs.remove(0).into_tensor();
        ensure!(t.datum_type() == f32::datum_type(), "MatMulNBitsQuantizeA expects f32, got {:?}", t.datum_type());
        let row_len = t.shape().last().copied().unwrap_or(1);
        let mut view = t.try_as_plain_ram_mut()?;
        self.apply(view.as_slice_mut::<f32>()?, row_len);
        Ok(tvec!(t.into_tvalue()))
    }
    fn eval_out_of_plan(&self, inputs: TVec<TValue>) -> TractResult<Option<TVec<TValue>>> {
        Ok(Some(self.eval(&EvalContext::out_of_plan(), inputs)?))
    }
}

impl TypedOp for QuantizeBlocksInt8 {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 1, "MatMulNBitsQuantizeA takes one input");
        ensure!(inputs[0].rank() >= 1, "MatMulNBitsQuantizeA needs rank 1 or more");
        Ok(tvec!(inputs[0].datum_type.fact(inputs[0].shape.clone())))
    }

    fn axes_mapping(&self, inputs: &[&TypedFact], outputs: &[&TypedFact]) -> TractResult<AxesMapping> {
        // every axis but the last (the quantization blocks) maps through
        let rank = inputs[0].rank();
        let mut axes = AxesMapping::disconnected(inputs, outputs)?;
        for ax in 0..rank.saturating_sub(1) {
            axes = axes.linking((InOut::In(0), ax), (InOut::Out(0), ax))?;
        }
        Ok(axes)
    }
}
