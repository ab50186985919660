//! Quantized matmul on the GPU: com.microsoft MatMulNBits (kiln-ops' `PackedMatMulNBits`) with the weight kept
//! packed on the GPU and dequantized inside the kernel (`kernels/qmatmul.wgsl`), and accuracy_level 4's int8
//! quantize-dequantize of the activations (`QuantizeBlocksInt8`).
//!
//! Inputs as the typed model keeps them: A (f32 `[.., K]`), B (u32 words of the blob bytes), scales (f32, or u32
//! words of float16 pairs), zero points (u32 words of packed uint8, or f32; absent: `2^(bits-1)`).
//!
//! The same kernels run float matmuls with a constant weight ([`QMatMul::float_weights`], kiln-graph's
//! `float_matmuls_as_row_kernels`): B is the weight transposed, `[N, K]` f32 (32 bits) or float16 (16 bits, two
//! a word), with no scales or zero points — so an fp32 model's projections get the one-row decode kernel and every
//! fusion of this module (norm, joined q/k/v, gate/up, residual, rotation with KV appends).

use tract_onnx::prelude::*;

use crate::attention::RotarySpec;
use crate::context::Context;
use crate::exec::{GpuTensor, Recorder};
use crate::kernels::{dispatch_with, launch, pipeline_for, u32_of};
use crate::{Error, Result};

/// Rows of A up to which the matrix-vector kernel runs (one workgroup row per row of A); more take the tiled one.
const MV_MAX_ROWS: usize = 4;
/// The longest row of A the decode kernel quantizes to int8 in workgroup memory (8 KiB).
const MV_SHARED_K: usize = 2048;

/// How a [`QMatMul`] gets its zero points.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QZeroPoints {
    /// `2^(bits-1)`.
    Default,
    /// uint8, packed `bits` per block, `ceil(k_blocks · bits / 8)` bytes per column, in u32 words.
    Packed,
    /// f32, one per block.
    Float,
}

/// What a [`QMatMul`] does with its product before storing it (kiln-graph's matmul fusion,
/// `fuse_gpu::fuse_matmul_epilogues`): each saves the dispatches of the nodes it absorbs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum QEpilogue {
    /// `Y = A · Bᵀ`.
    #[default]
    None,
    /// `Y = A · Bᵀ + R`: the residual R (f32, Y's shape) is one more input, the last.
    Residual,
    /// `Y = silu(A · Bᵀ) · (A · Uᵀ)` (a gated MLP's gate and up projections and their SiLU · Mul): U's packed
    /// weight, scales [and zero points] follow B's, same specialisation.
    SiluMul,
    /// Two or three weights of one input side by side (the q, k and v projections), each with its own output:
    /// their columns (the third 0 for two); each weight's packed B, scales [and zero points] follow the first's,
    /// same specialisation but N. [`QMatMul::n`] is the sum.
    Split([usize; 3]),
}

/// The specialisation of a quantized matmul: `Y[.., N] = A[.., K] · dequant(B)ᵀ`, then its [`QEpilogue`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct QMatMul {
    pub k: usize,
    pub n: usize,
    pub bits: u32,
    pub block_size: u32,
    pub scales_f16: bool,
    pub zero_points: QZeroPoints,
    /// accuracy_level 4: A quantized to int8 per block first (in the decode kernel's workgroup memory when K fits,
    /// else by a first dispatch).
    pub int8_activations: bool,
    pub epilogue: QEpilogue,
    /// An RMS norm applied to A first (kiln-graph's matmul fusion).
    pub norm: Option<QNorm>,
    /// B holds float weights `[N, K]` (`bits` 32: f32; 16: float16 pairs), no scales or zero points; `block_size`
    /// is 16 and divides K.
    pub float_weights: bool,
    /// A float16 model's matmul (kiln-graph's lowering sets it): where the adapter has shader-f16 the kernels
    /// compute the products in float16 — A's values and the dequantized weights rounded to f16, multiplied and
    /// summed in f16 a packed word at a time (the one-row kernel) or a 16-wide K step at a time (the tiled one),
    /// those sums added up in f32 (f16 products, f32 accumulation, as tensor cores do; a whole K reduction in f16
    /// would lose the small terms of a long row). Without shader-f16 (Chrome's SwiftShader) it changes nothing.
    pub f16_math: bool,
}

/// The RMS norm a [`QMatMul`] applies to A: `a / sqrt(mean(a²) + eps) [· gamma]`, as kiln's NormOp does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct QNorm {
    /// The epsilon's bits.
    pub eps: u32,
    /// With gamma (f32, K values): the last input.
    pub gamma: bool,
}

impl QNorm {
    fn gamma_inputs(norm: Option<QNorm>) -> usize {
        norm.is_some_and(|n| n.gamma) as usize
    }
}

impl QMatMul {
    /// The specialisation for a kiln-ops MatMulNBits node, or why it has none.
    pub fn for_op(op: &kiln_ops::matmul_nbits::PackedMatMulNBits) -> std::result::Result<QMatMul, String> {
        use kiln_ops::matmul_nbits::ZeroPointKind;
        if !matches!(op.bits, 2 | 4 | 8) {
            return Err(format!("MatMulNBits with {} bits", op.bits));
        }
        if !op.block_size.is_power_of_two() || !(16..=4096).contains(&op.block_size) {
            return Err(format!("MatMulNBits block size {} (a power of two from 16)", op.block_size));
        }
        Ok(QMatMul {
            k: op.k,
            n: op.n,
            bits: op.bits as u32,
            block_size: op.block_size as u32,
            scales_f16: op.scales_f16,
            zero_points: match op.zero_points {
                ZeroPointKind::Default => QZeroPoints::Default,
                ZeroPointKind::Packed => QZeroPoints::Packed,
                ZeroPointKind::Float => QZeroPoints::Float,
            },
            int8_activations: op.int8_activations,
            epilogue: QEpilogue::None,
            norm: None,
            float_weights: false,
            f16_math: false,
        })
    }

    /// The specialisation for a float matmul `A[.., K] · W` with a constant weight given transposed (`[N, K]`,
    /// f32 or float16), or why it has none.
    pub fn for_float_weight(k: usize, n: usize, weight: DatumType) -> std::result::Result<QMatMul, String> {
        let bits = match weight {
            DatumType::F32 => 32,
            DatumType::F16 => 16,
            other => return Err(format!("a {other:?} weight")),
        };
        if k == 0 || n == 0 || !k.is_multiple_of(16) {
            return Err(format!("K={k}, N={n} (K a multiple of 16)"));
        }
        Ok(QMatMul {
            k,
            n,
            bits,
            block_size: 16,
            scales_f16: false,
            zero_points: QZeroPoints::Default,
            int8_activations: false,
            epilogue: QEpilogue::None,
            norm: None,
            float_weights: true,
            f16_math: false,
        })
    }

    /// Inputs of one weight: packed B, scales[, zero points]; float weights: B alone.
    fn weight_arity(&self) -> usize {
        if self.float_weights {
            1
        } else if self.zero_points == QZeroPoints::Default {
            2
        } else {
            3
        }
    }

    pub fn arity(&self) -> usize {
        1 + self.weight_arity()
            + match self.epilogue {
                QEpilogue::None => 0,
                QEpilogue::Residual => 1,
                QEpilogue::SiluMul => self.weight_arity(),
                QEpilogue::Split(ns) => (ns.iter().filter(|n| **n > 0).count() - 1) * self.weight_arity(),
            }
            + QNorm::gamma_inputs(self.norm)
    }

    fn k_blocks(&self) -> usize {
        self.k.div_ceil(self.block_size as usize)
    }

    /// Words (u32) each input of a weight of `n` columns must hold: B, scales, zero points.
    fn input_words_of(&self, n: usize) -> [usize; 3] {
        let kb = self.k_blocks();
        let blob_words = self.block_size as usize * self.bits as usize / 32;
        let scales = if self.float_weights {
            0
        } else if self.scales_f16 {
            (n * kb).div_ceil(2)
        } else {
            n * kb
        };
        let zp = match self.zero_points {
            _ if self.float_weights => 0,
            QZeroPoints::Default => 0,
            QZeroPoints::Packed => (n * (kb * self.bits as usize).div_ceil(8)).div_ceil(4),
            QZeroPoints::Float => n * kb,
        };
        [n * kb * blob_words, scales, zp]
    }

    pub fn output_shape(&self, inputs: &[&[usize]]) -> Result<TVec<usize>> {
        let a = inputs.first().ok_or_else(|| Error::new("webgpu: MatMulNBits without inputs"))?;
        if a.last() != Some(&self.k) {
            return Err(Error::new(format!("webgpu: MatMulNBits with K={} on A of shape {a:?}", self.k)));
        }
        if inputs.len() != self.arity() {
            return Err(Error::new(format!("webgpu: MatMulNBits expects {} inputs", self.arity())));
        }
        let wa = self.weight_arity();
        let ns: Vec<usize> = match self.epilogue {
            QEpilogue::SiluMul => vec![self.n, self.n],
            QEpilogue::Split(ns) => ns.iter().copied().filter(|n| *n > 0).collect(),
            _ => vec![self.n],
        };
        for (w, n) in ns.iter().enumerate() {
            let words = self.input_words_of(*n);
            for (i, (shape, want)) in inputs[1 + w * wa..1 + (w + 1) * wa].iter().zip(words).enumerate() {
                let have: usize = shape.iter().product();
                if have < want {
                    return Err(Error::new(format!(
                        "webgpu: MatMulNBits operand {} holds {have} words, needs {want}",
                        1 + w * wa + i
                    )));
                }
            }
        }
        let mut s: TVec<usize> = (*a).into();
        if let Some(l) = s.last_mut() {
            *l = self.n;
        }
        let residual = inputs.len() - 1 - QNorm::gamma_inputs(self.norm);
        if self.epilogue == QEpilogue::Residual && inputs.get(residual).is_none_or(|r| **r != *s) {
            return Err(Error::new(format!(
                "webgpu: MatMulNBits residual of shape {:?}, not {s:?}",
                inputs.get(residual)
            )));
        }
        if QNorm::gamma_inputs(self.norm) == 1 && inputs.last().is_none_or(|g| g.iter().product::<usize>() != self.k) {
            return Err(Error::new(format!(
                "webgpu: MatMulNBits norm gamma of shape {:?}, K {}",
                inputs.last(),
                self.k
            )));
        }
        Ok(s)
    }

    /// The specialisation's WGSL snippets, made when a pipeline is compiled (dispatches find theirs by the
    /// QMatMul itself: [`Context::memo_pipeline`]). The WGSL of the packed operands: B and scales always, zero
    /// points as the specialisation wants; the up projection's (`w_up` = 1: bindings 6–8, functions `*2`) with
    /// [`QEpilogue::SiluMul`], stubs otherwise; the residual (binding 9) with [`QEpilogue::Residual`].
    /// `f16`: the kernels' products in float16 ([`QMatMul::f16_math`] on an adapter with shader-f16).
    fn spec(&self, f16: bool) -> Vec<(&'static str, String)> {
        let parts = self.split_parts().len();
        let mut spec = self.spec_with_outputs([parts >= 2, parts >= 3]);
        if f16 {
            spec.retain(|(k, _)| !matches!(*k, "WDOT" | "TILE" | "TILE_STEP"));
            spec.extend([
                ("ENABLE", "enable f16;\n".to_string()),
                ("WDOT", WDOT_F16.to_string()),
                ("TILE", "f16".to_string()),
                ("TILE_STEP", tile_step(true)),
            ]);
        }
        spec
    }

    /// [`QMatMul::spec`] with the split's second and third outputs (bindings 13, 14) declared or stubbed as
    /// `outputs` says (the rotation epilogue stores k's only when asked, v's never).
    fn spec_with_outputs(&self, outputs: [bool; 2]) -> Vec<(&'static str, String)> {
        let weight = |sfx: &str, bb: u32, sb: u32, zb: u32| {
            let scale = if self.scales_f16 {
                format!("unpack2x16float(scales{sfx}[i / 2u])[i % 2u]")
            } else {
                format!("bitcast<f32>(scales{sfx}[i])")
            };
            let (zp_decl, zero) = match self.zero_points {
                QZeroPoints::Default => (String::new(), "f32(1u << (BITS - 1u))".to_string()),
                QZeroPoints::Packed => (
                    format!("@group(0) @binding({zb}) var<storage, read> zps{sfx}: array<u32>;"),
                    format!(
                        "f32((zps{sfx}[(col * p.zp_bytes + blk * BITS / 8u) / 4u] >> \
                         (((col * p.zp_bytes + blk * BITS / 8u) % 4u) * 8u + (blk * BITS) % 8u)) & MASK)"
                    ),
                ),
                QZeroPoints::Float => (
                    format!("@group(0) @binding({zb}) var<storage, read> zps{sfx}: array<u32>;"),
                    format!("bitcast<f32>(zps{sfx}[i])"),
                ),
            };
            if self.float_weights {
                // the weight's values themselves: scale 1, zero 0 (W_DECODE reads the word as floats)
                return format!(
                    "@group(0) @binding({bb}) var<storage, read> b{sfx}: array<u32>;\n\
                     fn b{sfx}_at(i: u32) -> u32 {{\n    return b{sfx}[i];\n}}\n\
                     fn scale{sfx}_at(i: u32) -> f32 {{\n    return 1.0;\n}}\n\
                     fn zero{sfx}_at(col: u32, blk: u32, i: u32) -> f32 {{\n    return 0.0;\n}}\n"
                );
            }
            format!(
                "@group(0) @binding({bb}) var<storage, read> b{sfx}: array<u32>;\n\
                 @group(0) @binding({sb}) var<storage, read> scales{sfx}: array<u32>;\n{zp_decl}\n\
                 fn b{sfx}_at(i: u32) -> u32 {{\n    return b{sfx}[i];\n}}\n\
                 fn scale{sfx}_at(i: u32) -> f32 {{\n    return {scale};\n}}\n\
                 fn zero{sfx}_at(col: u32, blk: u32, i: u32) -> f32 {{\n    return {zero};\n}}\n"
            )
        };
        let stub = |sfx: &str| {
            format!(
                "fn b{sfx}_at(i: u32) -> u32 {{\n    return 0u;\n}}\n\
                 fn scale{sfx}_at(i: u32) -> f32 {{\n    return 0.0;\n}}\n\
                 fn zero{sfx}_at(col: u32, blk: u32, i: u32) -> f32 {{\n    return 0.0;\n}}\n"
            )
        };
        let out = |sfx: &str, binding: u32| {
            format!(
                "@group(0) @binding({binding}) var<storage, read_write> y{sfx}: array<f32>;\n\
                 fn store{sfx}(i: u32, v: f32) {{\n    y{sfx}[i] = v;\n}}\n"
            )
        };
        let out_stub = |sfx: &str| format!("fn store{sfx}(i: u32, v: f32) {{\n}}\n");
        let parts = match self.epilogue {
            QEpilogue::Split(ns) => ns.iter().filter(|n| **n > 0).count(),
            _ => 1,
        };
        let mut fns = weight("", 2, 4, 5);
        fns += &if self.epilogue == QEpilogue::SiluMul || parts >= 2 { weight("2", 6, 7, 8) } else { stub("2") };
        fns += &if parts >= 3 { weight("3", 10, 11, 12) } else { stub("3") };
        fns += &if outputs[0] { out("2", 13) } else { out_stub("2") };
        fns += &if outputs[1] { out("3", 14) } else { out_stub("3") };
        fns += if self.epilogue == QEpilogue::Residual {
            "@group(0) @binding(9) var<storage, read> res: array<f32>;\n\
             fn res_at(i: u32) -> f32 {\n    return res[i];\n}\n"
        } else {
            "fn res_at(i: u32) -> f32 {\n    return 0.0;\n}\n"
        };
        fns += if QNorm::gamma_inputs(self.norm) == 1 {
            "@group(0) @binding(15) var<storage, read> gamma: array<f32>;\n\
             fn gamma_at(i: u32) -> f32 {\n    return gamma[i];\n}\n"
        } else {
            "fn gamma_at(i: u32) -> f32 {\n    return 1.0;\n}\n"
        };
        let epi = match self.epilogue {
            QEpilogue::None => 0,
            QEpilogue::Residual => 1,
            QEpilogue::SiluMul => 2,
            QEpilogue::Split(_) => 3,
        };
        // weight i of word q (zero point z) as f32
        let (mask, decode) = match (self.float_weights, self.bits) {
            (true, 32) => ("0xffffffffu".to_string(), "bitcast<f32>(q)"),
            (true, _) => ("0xffffu".to_string(), "unpack2x16float(q)[i]"),
            (false, bits) => (format!("{}u", (1u32 << bits) - 1), "f32((q >> (i * BITS)) & MASK) - z"),
        };
        vec![("BITS", self.bits.to_string()), ("BS", self.block_size.to_string()), ("QM_FNS", fns)]
            .into_iter()
            .chain([("MASK", mask), ("W_DECODE", decode.to_string())])
            .chain([("INT8_A", "false".to_string()), ("AQ_LEN", "1".to_string()), ("EPI", epi.to_string())])
            .chain([("PART2", if epi == 2 { "256" } else { "1" }.to_string())])
            .chain([("NORM", self.norm.is_some().to_string())])
            .chain([
                ("ROPE", "false".to_string()),
                ("KV16", "false".to_string()),
                ("ROPE_FNS", NO_ROPE_FNS.to_string()),
            ])
            .chain([("WDOT", WDOT_F32.to_string()), ("TILE", "f32".to_string()), ("TILE_STEP", tile_step(false))])
            .chain([
                ("SG_PARAMS", String::new()),
                ("NORM_SUM", TREE_NORM_SUM.into()),
                ("LANE_SUM", TREE_LANE_SUM.into()),
            ])
            .collect()
    }

    /// Storage buffers the kernel binds: A, the output(s), each weight's B, scales [and zero points], the residual.
    pub fn storage_buffers(&self) -> u32 {
        let weights = match self.epilogue {
            QEpilogue::SiluMul => 2,
            QEpilogue::Split(_) => self.split_parts().len(),
            _ => 1,
        };
        let outputs = if matches!(self.epilogue, QEpilogue::Split(_)) { weights } else { 1 };
        let residual = (self.epilogue == QEpilogue::Residual) as usize;
        (1 + outputs + weights * self.weight_arity() + residual + QNorm::gamma_inputs(self.norm)) as u32
    }

    /// The columns of each weight of a [`QEpilogue::Split`] (none otherwise).
    pub fn split_parts(&self) -> Vec<usize> {
        match self.epilogue {
            QEpilogue::Split(ns) => ns.iter().copied().filter(|n| *n > 0).collect(),
            _ => vec![],
        }
    }

    /// Records `out = A · dequant(B)ᵀ` (`out` allocated by the caller, `[.., N]`).
    pub(crate) fn encode(
        &self,
        ctx: &Context,
        rec: &mut Recorder,
        inputs: &[&GpuTensor],
        out: &GpuTensor,
    ) -> Result<()> {
        self.encode_into(ctx, rec, inputs, &[out])
    }

    /// Records a [`QEpilogue::Split`]: one output per weight (`[.., N_w]`), allocated from the recorder's pool.
    pub fn encode_split(&self, ctx: &Context, rec: &mut Recorder, inputs: &[&GpuTensor]) -> Result<Vec<GpuTensor>> {
        let parts = self.split_parts();
        let a = inputs.first().ok_or_else(|| Error::new("webgpu: MatMulNBits without inputs"))?;
        let shapes: Vec<&[usize]> = inputs.iter().map(|t| &*t.shape).collect();
        self.output_shape(&shapes)?;
        let mut outs = vec![];
        for n in parts {
            let mut shape: TVec<usize> = a.shape.clone();
            if let Some(l) = shape.last_mut() {
                *l = n;
            }
            outs.push(rec.alloc(ctx, &shape, DatumType::F32)?);
        }
        let refs: Vec<&GpuTensor> = outs.iter().collect();
        self.encode_into(ctx, rec, inputs, &refs)?;
        Ok(outs)
    }

    fn encode_into(&self, ctx: &Context, rec: &mut Recorder, inputs: &[&GpuTensor], outs: &[&GpuTensor]) -> Result<()> {
        self.encode_with(ctx, rec, inputs, outs, None)
    }

    /// Invocations per column of the one-row kernel for this K.
    fn mv_lanes(&self, ctx: &Context) -> usize {
        let words = self.k_blocks() * self.block_size as usize * self.bits as usize / 32;
        // CPU adapters: one invocation per column, no reduction across lanes (workgroup barriers are what a CPU
        // adapter pays for: SmolLM2 q4f16's decode step 7.1 → 1.3 s on Chromium's SwiftShader, 220 → 170 ms on
        // lavapipe, against 16 to 32 lanes); GPUs: about 2 words, up to 128 invocations (more workgroups in
        // flight: ~25% less time on an H200)
        if ctx.caps.cpu_adapter {
            1
        } else {
            words.div_ceil(2).next_power_of_two().clamp(4, 128)
        }
    }

    /// [`QMatMul::encode_into`]; with `rope` (a split of q, k and v, one-row kernel only), `outs` is q's output
    /// alone and the rotation and KV appends happen in the epilogue ([`QkvRope`]).
    fn encode_with(
        &self,
        ctx: &Context,
        rec: &mut Recorder,
        inputs: &[&GpuTensor],
        outs: &[&GpuTensor],
        rope: Option<&RopeArgs>,
    ) -> Result<()> {
        if inputs.len() != self.arity() {
            return Err(Error::new(format!("webgpu: MatMulNBits expects {} inputs", self.arity())));
        }
        let parts = self.split_parts();
        let want_outs = if rope.is_some() { 1 } else { parts.len().max(1) };
        if outs.len() != want_outs {
            return Err(Error::new(format!("webgpu: MatMulNBits with {} outputs", outs.len())));
        }
        let rows = inputs[0].len() / self.k.max(1);
        let in_kernel = self.int8_activations && rows <= MV_MAX_ROWS && self.k <= MV_SHARED_K;
        if rope.is_some() && (rows > MV_MAX_ROWS || parts.len() != 3 || (self.int8_activations && !in_kernel)) {
            return Err(Error::new("webgpu: MatMulNBits: a rotation epilogue needs the one-row kernel of a split"));
        }
        if let (Some(norm), true) = (self.norm, rows > MV_MAX_ROWS || (self.int8_activations && !in_kernel)) {
            // the tiled path: the norm as a dispatch of its own, then the matmul on its result
            let normed = rec.alloc(ctx, &inputs[0].shape, DatumType::F32)?;
            let op = crate::msft::NormOp {
                rms: true,
                eps: f32::from_bits(norm.eps),
                has_skip: false,
                has_bias: false,
                has_gamma: norm.gamma,
                has_beta: false,
            };
            let kept = inputs.len() - QNorm::gamma_inputs(self.norm);
            let norm_inputs = if norm.gamma { vec![inputs[0], inputs[kept]] } else { vec![inputs[0]] };
            crate::msft::NormSpec { op }.encode(ctx, rec, &norm_inputs, &normed)?;
            let plain = QMatMul { norm: None, ..self.clone() };
            let mut ins = inputs[..kept].to_vec();
            ins[0] = &normed;
            let r = plain.encode_into(ctx, rec, &ins, outs);
            rec.release(normed);
            return r;
        }
        if self.int8_activations && !in_kernel {
            // quantize A first (a dispatch of its own), then the plain kernel on the result
            let q = rec.alloc(ctx, &inputs[0].shape, inputs[0].dt)?;
            quantize_blocks(ctx, rec, self.block_size as usize, inputs[0], &q)?;
            let plain = QMatMul { int8_activations: false, ..self.clone() };
            let mut ins = inputs.to_vec();
            ins[0] = &q;
            let r = plain.encode_into(ctx, rec, &ins, outs);
            rec.release(q);
            return r;
        }
        let wa = self.weight_arity();
        if !parts.is_empty() && rows > MV_MAX_ROWS {
            // many rows: the tiled kernel, weight by weight
            for (w, n) in parts.iter().enumerate() {
                let one = QMatMul { n: *n, epilogue: QEpilogue::None, ..self.clone() };
                let mut ins = vec![inputs[0]];
                ins.extend_from_slice(&inputs[1 + w * wa..1 + (w + 1) * wa]);
                one.encode_into(ctx, rec, &ins, &outs[w..w + 1])?;
            }
            return Ok(());
        }
        let kb = self.k_blocks();
        let zp_bytes = (kb * self.bits as usize).div_ceil(8);
        // a weight's B, scales and zero points (`bindings`) from input `at`, as far as the weight has them
        let weight =
            |bindings: [u32; 3], at: usize| bindings.into_iter().zip(&inputs[at..at + wa]).map(|(b, t)| (b, *t));
        let mut b = vec![(1, inputs[0]), (3, outs[0])];
        b.extend(weight([2, 4, 5], 1));
        if QNorm::gamma_inputs(self.norm) == 1 {
            b.push((15, inputs[inputs.len() - 1]));
        }
        let mut split = [0u32; 2];
        match self.epilogue {
            QEpilogue::None => {}
            QEpilogue::Residual => b.push((9, inputs[1 + wa])),
            QEpilogue::SiluMul => b.extend(weight([6, 7, 8], 1 + wa)),
            QEpilogue::Split(ns) => {
                split = [u32_of("n", ns[0])?, u32_of("n", ns[1])?];
                for w in 1..parts.len() {
                    let base = if w == 1 { 6 } else { 10 };
                    b.extend(weight([base, base + 1, base + 2], 1 + w * wa));
                    if let Some(out) = outs.get(w) {
                        b.push((if w == 1 { 13 } else { 14 }, *out));
                    }
                }
                if let Some(r) = rope {
                    b.extend([(16, r.cos), (17, r.sin), (19, r.k_store), (20, r.v_store)]);
                    if let Some(pos) = r.pos {
                        b.push((18, pos));
                    }
                    if let Some(v_out) = r.v_out {
                        b.push((14, v_out));
                    }
                    if let Some(k_out) = r.k_out {
                        b.push((13, k_out));
                    }
                }
            }
        }
        let (entry, lanes, gx, gy, gz) = if rows <= MV_MAX_ROWS {
            let lanes = rope.map_or_else(|| self.mv_lanes(ctx), |r| r.lanes);
            let (gx, gy) = ctx.grid((self.n as u64).div_ceil((256 / lanes) as u64))?;
            ("mv_main", lanes, gx, gy, rows as u32)
        } else {
            let gx = u32_of("grid", self.n.div_ceil(64))?;
            let gy = u32_of("grid", rows.div_ceil(64))?;
            if gx > ctx.caps.max_workgroups_per_dim || gy > ctx.caps.max_workgroups_per_dim {
                return Err(Error::new(format!("webgpu: MatMulNBits {rows}x{} exceeds the adapter's grid", self.n)));
            }
            ("tiled_main", 32, gx, gy, 1)
        };
        // the pipeline by this kernel's parameters: the WGSL snippets are made on the first dispatch only
        let in_mv = in_kernel && entry == "mv_main";
        // with a rotation: whether the stores are float16, k's output made, positions read
        let rope_key =
            rope.map(|r| (r.k_store.dt == DatumType::F16, r.k_out.is_some(), r.v_out.is_some(), r.pos.is_some()));
        let pipeline = ctx.memo_pipeline(&(self.clone(), entry, lanes, in_mv, rope_key), || {
            let mut spec = self.spec(self.f16_math && ctx.caps.shader_f16);
            spec.push(("LANES", lanes.to_string()));
            if ctx.caps.subgroups {
                // the reductions through subgroup operations (native only: see Caps::subgroups)
                spec.retain(|(k, _)| !matches!(*k, "SG_PARAMS" | "NORM_SUM" | "LANE_SUM"));
                spec.push(("SG_PARAMS", ", @builtin(subgroup_size) sg_size: u32".into()));
                spec.push(("NORM_SUM", SUBGROUP_NORM_SUM.into()));
                spec.push(("LANE_SUM", SUBGROUP_LANE_SUM.into()));
            }
            if in_mv {
                spec.retain(|(k, _)| *k != "INT8_A" && *k != "AQ_LEN");
                spec.push(("INT8_A", "true".into()));
                spec.push(("AQ_LEN", MV_SHARED_K.to_string()));
            }
            if let Some((kv16, k_out, v_out, pos)) = rope_key {
                // the split's weights as they are, k's output (binding 13) only when wanted, no third output
                let qm = self.spec_with_outputs([k_out, v_out]).into_iter().find(|(k, _)| *k == "QM_FNS");
                spec.retain(|(k, _)| !matches!(*k, "ROPE" | "KV16" | "ROPE_FNS" | "QM_FNS"));
                spec.push(("QM_FNS", qm.map(|(_, v)| v).unwrap_or_default()));
                spec.push(("ROPE", "true".into()));
                spec.push(("KV16", kv16.to_string()));
                spec.push(("ROPE_FNS", rope_fns(kv16, pos)));
            }
            pipeline_for(ctx, "qmatmul", entry, spec)
        })?;
        let u = [u32_of("m", rows)?, u32_of("n", self.n)?, u32_of("k", self.k)?, u32_of("blocks", kb)?];
        let mut u =
            [&u[..], &[u32_of("bytes", zp_bytes)?, gx, split[0], split[1], self.norm.map_or(0, |n| n.eps), 0, 0, 0]]
                .concat();
        u.extend(rope.map_or([0; 8], |r| r.words));
        dispatch_with(rec, pipeline, entry, &u, &b, (gx, gy, gz));
        Ok(())
    }
}

/// Records accuracy_level 4's quantize-dequantize of `a` (int8 per block of `block_size` along the last axis).
pub(crate) fn quantize_blocks(
    ctx: &Context,
    rec: &mut Recorder,
    block_size: usize,
    a: &GpuTensor,
    out: &GpuTensor,
) -> Result<()> {
    let k = a.shape.last().copied().unwrap_or(1).max(1);
    if block_size == 0 {
        return Err(Error::new("webgpu: int8 quantization in blocks of 0"));
    }
    let rows = a.len() / k;
    let kb = k.div_ceil(block_size);
    let blocks = rows * kb;
    let (gx, gy) = ctx.grid((blocks as u64).div_ceil(256))?;
    let u = [
        u32_of("m", rows)?,
        0,
        u32_of("k", k)?,
        u32_of("blocks", kb)?,
        0,
        gx,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
    ];
    let mut spec = QMatMul {
        k,
        n: 0,
        bits: 8,
        block_size: u32_of("block size", block_size)?,
        scales_f16: false,
        zero_points: QZeroPoints::Default,
        int8_activations: false,
        epilogue: QEpilogue::None,
        norm: None,
        float_weights: false,
        f16_math: false,
    }
    .spec(false);
    spec.push(("LANES", "32".into()));
    launch(ctx, rec, "qmatmul", "quantize_main", spec, &u, &[(1, a), (3, out)], (gx, gy, 1))
}

/// The one-row kernel's word product in f32: [`word_dot`] times the block's scale.
const WDOT_F32: &str = "fn wdot(q: u32, z: f32, s: f32, a0: u32, kb: u32) -> f32 {
    return word_dot(q, z, a0, kb) * s;
}";

/// The same in float16 arithmetic ([`QMatMul::f16_math`]): each weight dequantized in f16 (`(q - z) · s`, the
/// scale applied before the product so that a large activation cannot overflow f16 through an unscaled code),
/// times A's value in f16, the word's products summed in f16.
const WDOT_F16: &str = "fn wdot(q: u32, z: f32, s: f32, a0: u32, kb: u32) -> f32 {
    let sh = f16(s);
    var t = f16(0.0);
    for (var i = 0u; i < PER_WORD; i = i + 1u) {
        if (kb + i < p.k) {
            t = t + (f16(w_decode(q, i, z)) * sh) * f16(a_row(a0, kb + i));
        }
    }
    return f32(t);
}";

/// tiled_main's K step of 16 over its tiles: in f32 straight into the accumulators; over f16 tiles
/// ([`QMatMul::f16_math`]) the step's 16 products per output summed in f16, then added to the f32 accumulators.
fn tile_step(f16: bool) -> String {
    let (t, sum) = if f16 { ("f16", "h") } else { ("f32", "acc") };
    let mut step = format!(
        "for (var kk = 0u; kk < 16u; kk = kk + 1u) {{
                let ar = kk * 64u + lid.y;
                let br = kk * 64u + lid.x;
                let bv = vec4<{t}>(Bs[br], Bs[br + 16u], Bs[br + 32u], Bs[br + 48u]);"
    );
    for r in 0..4 {
        let off = if r == 0 { String::new() } else { format!(" + {}u", 16 * r) };
        step += &format!("\n                {sum}{r} = {sum}{r} + As[ar{off}] * bv;");
    }
    step += "\n            }";
    if !f16 {
        return step;
    }
    let zero: String = (0..4).map(|r| format!("var h{r} = vec4<f16>(0.0);\n            ")).collect();
    let add: String = (0..4).map(|r| format!("\n            acc{r} = acc{r} + vec4<f32>(h{r});")).collect();
    format!("{zero}{step}{add}")
}

/// mv_main's sum of squares for NORM (`ss`: this invocation's share in, the row's total out) over workgroup memory.
const TREE_NORM_SUM: &str = "part[li] = ss;
        workgroupBarrier();
        for (var st = 128u; st > 0u; st = st / 2u) {
            if (li < st) {
                part[li] = part[li] + part[li + st];
            }
            workgroupBarrier();
        }
        ss = part[0];";

/// The same with subgroup sums: one barrier, the subgroups' totals added in order (a subgroup being a run of
/// consecutive invocations, as on the GPUs wgpu drives natively).
const SUBGROUP_NORM_SUM: &str = "part[li] = subgroupAdd(ss);
        workgroupBarrier();
        ss = 0.0;
        for (var i = 0u; i < 256u; i = i + sg_size) {
            ss = ss + part[i];
        }";

/// mv_main's sum of each column's LANES partial products (`acc`, `acc2`) into part / part2 at the column's lane 0:
/// a tree over workgroup memory.
const TREE_LANE_SUM: &str = "part[li] = acc;
    if (EPI == 2u) {
        part2[li] = acc2;
    }
    workgroupBarrier();
    for (var st = LANES / 2u; st > 0u; st = st / 2u) {
        if (lane < st) {
            part[li] = part[li] + part[li + st];
            if (EPI == 2u) {
                part2[li] = part2[li] + part2[li + st];
            }
        }
        workgroupBarrier();
    }";

/// The same by shuffles within runs of min(LANES, subgroup size) lanes, then those runs' sums through workgroup
/// memory: three barriers instead of log2(LANES) + 1.
const SUBGROUP_LANE_SUM: &str = "let run = min(LANES, sg_size);
    var v = acc;
    var v2 = acc2;
    for (var off = LANES / 2u; off > 0u; off = off / 2u) {
        let s = subgroupShuffleXor(v, off);
        if (off < run) {
            v = v + s;
        }
        // the second weight's sums only with one (EPI a constant: uniform control flow)
        if (EPI == 2u) {
            let s2 = subgroupShuffleXor(v2, off);
            if (off < run) {
                v2 = v2 + s2;
            }
        }
    }
    part[li] = v;
    if (EPI == 2u) {
        part2[li] = v2;
    }
    workgroupBarrier();
    if (lane == 0u) {
        for (var i = run; i < LANES; i = i + run) {
            v = v + part[li + i];
            if (EPI == 2u) {
                v2 = v2 + part2[li + i];
            }
        }
    }
    workgroupBarrier();
    if (lane == 0u) {
        part[li] = v;
        if (EPI == 2u) {
            part2[li] = v2;
        }
    }
    workgroupBarrier();";

/// The rotation epilogue's stubs (no rotation).
const NO_ROPE_FNS: &str = "fn rope_cs(row: u32, i: u32) -> vec2<f32> {\n    return vec2<f32>(1.0, 0.0);\n}\n\
fn kv_store(which: u32, at: u32, a: f32, b: f32) {\n}\n";

/// The rotation epilogue's bindings: cos / sin caches (16, 17: `[rows, half]`), positions (18, with
/// position_ids: the cache row of each row of A), the K and V stores (19, 20: f32, or float16 pairs as u32 words).
fn rope_fns(kv16: bool, positions: bool) -> String {
    let elem = if kv16 { "u32" } else { "f32" };
    let row = if positions { "u32(clamp(pos[row], 0, i32(p.rope.z) - 1))" } else { "row" };
    let pos = if positions { "@group(0) @binding(18) var<storage, read> pos: array<i32>;\n" } else { "" };
    let store = if kv16 {
        "let w = pack2x16float(vec2<f32>(a, b));\n    if (which == 0u) {\n        k_store[at / 2u] = w;\n    } else {\n        v_store[at / 2u] = w;\n    }"
    } else {
        "if (which == 0u) {\n        k_store[at] = a;\n    } else {\n        v_store[at] = a;\n    }"
    };
    format!(
        "@group(0) @binding(16) var<storage, read> cos_c: array<f32>;\n\
         @group(0) @binding(17) var<storage, read> sin_c: array<f32>;\n{pos}\
         @group(0) @binding(19) var<storage, read_write> k_store: array<{elem}>;\n\
         @group(0) @binding(20) var<storage, read_write> v_store: array<{elem}>;\n\
         fn rope_cs(row: u32, i: u32) -> vec2<f32> {{\n    let r = {row};\n    \
         return vec2<f32>(cos_c[r * p.rope.x + i], sin_c[r * p.rope.x + i]);\n}}\n\
         fn kv_store(which: u32, at: u32, a: f32, b: f32) {{\n    {store}\n}}\n"
    )
}

/// What [`QMatMul::encode_with`] binds and passes for a rotation epilogue.
struct RopeArgs<'a> {
    cos: &'a GpuTensor,
    sin: &'a GpuTensor,
    pos: Option<&'a GpuTensor>,
    k_store: &'a GpuTensor,
    v_store: &'a GpuTensor,
    k_out: Option<&'a GpuTensor>,
    /// v as `[batch, heads, seq, head]` (binding 14), where asked ([`QkvRope::v_out`]).
    v_out: Option<&'a GpuTensor>,
    /// Invocations per column: a workgroup's half of its columns (128 / lanes) divides half the head.
    lanes: usize,
    /// The uniform's last 8 words: half the head, seq, cache rows, -; K block, K kept, V block, V kept.
    words: [u32; 8],
}

/// A layer's q / k / v projections (a [`QEpilogue::Split`] of three) with the rotation and the KV appends after
/// them (a [`RotarySpec`] with `append`, on the projections seen as `[batch, heads, seq, head]`): kiln-graph's
/// `fuse_qkv_rotations`. Inputs: the split's, then the rotation's cos, sin[, positions], past K, past V; outputs
/// the rotation's (q rotated[, k rotated], present K, present V[, v as `[batch, heads, seq, head]`]). One dispatch
/// on a decode step (the pasts' new rows written in place into KV stores with room, else into presents with room
/// made first: [`QkvRope::encode_outputs`]); many rows (a prefill): the split, the transposes and the rotation as
/// nodes would run them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct QkvRope {
    pub q: QMatMul,
    pub rope: RotarySpec,
    /// The head size (the projections' heads: their columns over it).
    pub head: usize,
    /// v as `[batch, heads, seq, head]` is an output too, the last (a float16 model's cache form: its attention
    /// reads the new v itself, beside the float16 past).
    pub v_out: bool,
}

impl QkvRope {
    pub fn arity(&self) -> usize {
        self.q.arity() + 4 + self.rope.config.has_positions as usize
    }

    pub fn encode_outputs(
        &self,
        ctx: &Context,
        rec: &mut Recorder,
        inputs: &[&GpuTensor],
        make_store: [bool; 2],
        syms: &SymbolValues,
    ) -> Result<Vec<GpuTensor>> {
        let bad = |m: String| Error::new(format!("webgpu: q/k/v with rotation: {m}"));
        if inputs.len() != self.arity() || self.head == 0 {
            return Err(bad(format!("{} inputs, expects {}", inputs.len(), self.arity())));
        }
        let qa = self.q.arity();
        let (mm, rest) = inputs.split_at(qa);
        let p = self.rope.config.has_positions as usize;
        let (cos, sin, pos) = (rest[0], rest[1], (p == 1).then(|| rest[2]));
        let (past_k, past_v) = (rest[2 + p], rest[3 + p]);
        let a = mm[0];
        let [b, s] = match *a.shape {
            [b, s, _] => [b, s],
            _ => return Err(bad(format!("A of shape {:?}", a.shape))),
        };
        let parts = match self.q.epilogue {
            QEpilogue::Split(ns) if ns.iter().all(|n| *n > 0 && n.is_multiple_of(self.head)) => ns,
            e => return Err(bad(format!("{e:?} over heads of {}", self.head))),
        };
        let heads = parts.map(|n| n / self.head);
        let shape = |h: usize| -> TVec<usize> { tvec![b, h, s, self.head] };
        let (ks, vs) = (shape(heads[1]), shape(heads[2]));
        let half = self.head / 2;
        // the workgroup's columns: m of a head's first half and their partners, m a power of two dividing half
        // (float16 stores: even, a word's two halves in one workgroup)
        let kv16 = past_k.dt == DatumType::F16;
        let most = 1usize << half.trailing_zeros().min(6);
        let mut m = most.min(128 / self.q.mv_lanes(ctx));
        if kv16 && m < 2 {
            // float16 stores take pairs of columns (the GPU tuning of a long float16-weight row wants 128 lanes a
            // column: 64 then)
            m = most.min(2);
        }
        let lanes = 128 / m.max(1);
        // the caches: one row per (batch, seq) without positions, else a position per (batch, seq)
        let rows_ok = match pos {
            None => cos.len() == b * s * half,
            Some(p) => p.len() == b * s,
        };
        let fits = b * s <= MV_MAX_ROWS
            && rows_ok
            && half > 0
            && half.is_multiple_of(m)
            && (!kv16 || m.is_multiple_of(2))
            && self.head.is_multiple_of(2)
            && (!self.q.int8_activations || self.q.k <= MV_SHARED_K)
            && cos.shape.last() == Some(&half)
            && cos.shape == sin.shape
            && past_v.dt == past_k.dt;
        let stores = if fits { crate::kv::reserve_pair([past_k, past_v], [&ks, &vs]) } else { None };
        let in_place = stores.is_some();
        // no room in place (pasts read from the host, a store outgrown): presents with room, the past rows copied
        // (a new store each, or plain tensors), the same kernel writing the new rows — a loop that reads its caches
        // back computes what one that keeps them on the GPU does
        let stores = match stores {
            None if fits => {
                let k = crate::kv::present_with_room(ctx, rec, past_k, &ks, make_store[0])?;
                let v = crate::kv::present_with_room(ctx, rec, past_v, &vs, make_store[1])?;
                match (k, v) {
                    (Some(k), Some(v)) => Some([k, v]),
                    (k, v) => {
                        for t in k.into_iter().chain(v).filter(|t| t.kv.is_none()) {
                            rec.release(t);
                        }
                        None
                    }
                }
            }
            s => s,
        };
        if let Some([sk, sv]) = stores {
            let cache_rows = cos.len() / half;
            let block = |t: &GpuTensor| -> Result<[u32; 2]> {
                let cap = t.row_stride();
                Ok([u32_of("KV block", cap * self.head)?, u32_of("KV rows", (t.shape[2] - s) * self.head)?])
            };
            let ([kb, kp], [vb, vp]) = (block(&sk)?, block(&sv)?);
            let words = [u32_of("head", half)?, u32_of("seq", s)?, u32_of("rows", cache_rows)?, 0, kb, kp, vb, vp];
            let q_out = rec.alloc(ctx, &shape(heads[0]), DatumType::F32)?;
            let k_out = if self.rope.k_out { Some(rec.alloc(ctx, &ks, DatumType::F32)?) } else { None };
            let v_out = if self.v_out { Some(rec.alloc(ctx, &vs, DatumType::F32)?) } else { None };
            let (k_ref, v_ref) = (k_out.as_ref(), v_out.as_ref());
            let args = RopeArgs { cos, sin, pos, k_store: &sk, v_store: &sv, k_out: k_ref, v_out: v_ref, lanes, words };
            self.q.encode_with(ctx, rec, mm, &[&q_out], Some(&args))?;
            let es = crate::exec::gpu_size_of(past_k.dt);
            for n in [&ks, &vs] {
                rec.counters.kv_appends_in_place += in_place as usize;
                rec.counters.kv_appends_fused += 1;
                rec.counters.kv_append_bytes += (n.iter().product::<usize>() * es) as u64;
            }
            rec.counters.rotations_in_matmul += 1;
            return Ok(std::iter::once(q_out).chain(k_out).chain([sk, sv]).chain(v_out).collect());
        }
        // as the nodes would: the split, each output as [batch, heads, seq, head], the rotation and appends
        let outs = self.q.encode_split(ctx, rec, mm)?;
        let mut t4 = vec![];
        for (o, h) in outs.iter().zip(&heads) {
            let v = GpuTensor::new(o.buffer.clone(), &[b, s, *h, self.head], DatumType::F32);
            t4.push(crate::kernels::Kernel::MoveAxis { from: 1, to: 2 }.encode(ctx, rec, &[&v], syms)?);
        }
        let mut r: Vec<&GpuTensor> = vec![&t4[0], cos, sin];
        r.extend(pos);
        r.extend([&t4[1], past_k, &t4[2], past_v]);
        let mut result = self.rope.encode_append(ctx, rec, &r, make_store, syms)?;
        drop(r);
        let v4 = if self.v_out { t4.pop() } else { None };
        for t in t4.into_iter().chain(outs) {
            rec.release(t);
        }
        result.extend(v4);
        Ok(result)
    }
}
