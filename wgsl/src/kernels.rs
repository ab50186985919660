//! The kernel families: WGSL text (one file per family, specialised by substitution), runtime parameters as
//! uniforms, and the host side that records a dispatch.

use tract_onnx::prelude::*;

use crate::context::{Context, PipelineKey};
use crate::exec::{Binding, GpuTensor, Recorder};
use crate::fused::FusedProgram;
use crate::{Error, Result};

/// Shared helpers (index arithmetic, bool encoding), prepended to every family.
pub const PRELUDE_WGSL: &str = include_str!("kernels/prelude.wgsl");
pub const ELEMENTWISE_WGSL: &str = include_str!("kernels/elementwise.wgsl");
pub const MATMUL_WGSL: &str = include_str!("kernels/matmul.wgsl");
pub const SOFTMAX_WGSL: &str = include_str!("kernels/softmax.wgsl");
pub const LAYOUT_WGSL: &str = include_str!("kernels/layout.wgsl");
pub const REDUCE_WGSL: &str = include_str!("kernels/reduce.wgsl");
pub const SCAN_WGSL: &str = include_str!("kernels/scan.wgsl");
pub const QMATMUL_WGSL: &str = include_str!("kernels/qmatmul.wgsl");
pub const ATTENTION_WGSL: &str = include_str!("kernels/attention.wgsl");
pub const ROPE_WGSL: &str = include_str!("kernels/rope.wgsl");
pub const QUANT_WGSL: &str = include_str!("kernels/quant.wgsl");
pub const MSFT_WGSL: &str = include_str!("kernels/msft.wgsl");
pub const NORM_WGSL: &str = include_str!("kernels/norm.wgsl");

/// Ranks the elementwise and matmul uniforms have room for.
pub const MAX_RANK: usize = 8;
pub const MAX_BATCH_RANK: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UnaryOp {
    Neg,
    Abs,
    Exp,
    Log,
    Sqrt,
    Rsqrt,
    Reciprocal,
    Tanh,
    Sigmoid,
    Relu,
    Erf,
    Sin,
    Cos,
    Square,
    Silu,
    /// x^c for a constant exponent (the f32's bits).
    PowConst(u32),
    /// f32 → bool
    IsNan,
    /// bool → bool
    Not,
    /// 0.5·x·(1 + erf(x/√2))
    GeluExact,
    /// 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x^p))), p = 2 when `fast` (tract's fast_impl), else 3
    GeluApprox {
        fast: bool,
    },
    /// Between f32, bool (f32 0/1 on the GPU) and i32 / i64 (i32 bits on the GPU).
    Cast {
        from: DatumType,
        to: DatumType,
    },
}

impl UnaryOp {
    pub const ALL: [UnaryOp; 17] = [
        UnaryOp::Neg,
        UnaryOp::Abs,
        UnaryOp::Exp,
        UnaryOp::Log,
        UnaryOp::Sqrt,
        UnaryOp::Rsqrt,
        UnaryOp::Reciprocal,
        UnaryOp::Tanh,
        UnaryOp::Sigmoid,
        UnaryOp::Relu,
        UnaryOp::Erf,
        UnaryOp::Sin,
        UnaryOp::Cos,
        UnaryOp::Square,
        UnaryOp::Silu,
        UnaryOp::IsNan,
        UnaryOp::Not,
    ];
    /// The op for tract's elementwise mini-op name.
    pub fn from_tract(name: &str) -> Option<UnaryOp> {
        Some(match name {
            "Neg" => UnaryOp::Neg,
            "Abs" => UnaryOp::Abs,
            "Exp" => UnaryOp::Exp,
            "Ln" => UnaryOp::Log,
            "Sqrt" => UnaryOp::Sqrt,
            "Rsqrt" => UnaryOp::Rsqrt,
            "Recip" => UnaryOp::Reciprocal,
            "Tanh" => UnaryOp::Tanh,
            "Sigmoid" => UnaryOp::Sigmoid,
            "Erf" => UnaryOp::Erf,
            "Sin" => UnaryOp::Sin,
            "Cos" => UnaryOp::Cos,
            "Square" => UnaryOp::Square,
            "Silu" => UnaryOp::Silu,
            "IsNan" => UnaryOp::IsNan,
            "Not" => UnaryOp::Not,
            _ => return None,
        })
    }
    pub(crate) fn expr(&self) -> String {
        if let UnaryOp::PowConst(bits) = self {
            return format!("pow_binary(x, bitcast<f32>({bits}u))");
        }
        match self {
            UnaryOp::Neg => "-x",
            UnaryOp::Abs => "abs(x)",
            UnaryOp::Exp => "exp(x)",
            UnaryOp::Log => "log(x)",
            UnaryOp::Sqrt => "sqrt(x)",
            UnaryOp::Rsqrt => "inverseSqrt(x)",
            UnaryOp::Reciprocal => "1.0 / x",
            UnaryOp::Tanh => "tanh_safe(x)",
            UnaryOp::Sigmoid => "sigmoid_safe(x)",
            UnaryOp::Relu => "max(x, 0.0)",
            UnaryOp::Erf => "erf_approx(x)",
            UnaryOp::Sin => "sin(x)",
            UnaryOp::Cos => "cos(x)",
            UnaryOp::Square => "x * x",
            UnaryOp::Silu => "x * sigmoid_safe(x)",
            UnaryOp::PowConst(_) => "x",
            UnaryOp::IsNan => "b2f(is_nan(x))",
            UnaryOp::Not => "b2f(x == 0.0)",
            UnaryOp::GeluExact => "0.5 * x * (1.0 + erf_approx(x * 0.70710678118654752))",
            UnaryOp::GeluApprox { fast: true } => {
                "0.5 * x * (1.0 + tanh_safe(0.79788456080286536 * (x + 0.044715 * x * x)))"
            }
            UnaryOp::GeluApprox { fast: false } => {
                "0.5 * x * (1.0 + tanh_safe(0.79788456080286536 * (x + 0.044715 * x * x * x)))"
            }
            UnaryOp::Cast { from, to } => cast_expr(*from, *to),
        }
        .into()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BinaryOp {
    Add,
    Sub,
    /// tract's `SubF`: b - a.
    SubF,
    Mul,
    Div,
    Max,
    Min,
    Pow,
    /// Comparisons: f32 × f32 → bool.
    Eq,
    Ne,
    Lt,
    Gt,
    Lte,
    Gte,
    /// bool × bool → bool.
    And,
    Or,
}

impl BinaryOp {
    pub const ALL: [BinaryOp; 16] = [
        BinaryOp::Add,
        BinaryOp::Sub,
        BinaryOp::SubF,
        BinaryOp::Mul,
        BinaryOp::Div,
        BinaryOp::Max,
        BinaryOp::Min,
        BinaryOp::Pow,
        BinaryOp::Eq,
        BinaryOp::Ne,
        BinaryOp::Lt,
        BinaryOp::Gt,
        BinaryOp::Lte,
        BinaryOp::Gte,
        BinaryOp::And,
        BinaryOp::Or,
    ];
    /// A comparison (f32 inputs, bool output).
    pub fn is_comparison(&self) -> bool {
        matches!(self, BinaryOp::Eq | BinaryOp::Ne | BinaryOp::Lt | BinaryOp::Gt | BinaryOp::Lte | BinaryOp::Gte)
    }
    /// A logical op (bool inputs and output).
    pub fn is_logical(&self) -> bool {
        matches!(self, BinaryOp::And | BinaryOp::Or)
    }
    pub fn from_tract(name: &str) -> Option<BinaryOp> {
        Some(match name {
            "Add" => BinaryOp::Add,
            "Sub" => BinaryOp::Sub,
            "SubF" => BinaryOp::SubF,
            "Mul" => BinaryOp::Mul,
            "Div" => BinaryOp::Div,
            "Max" => BinaryOp::Max,
            "Min" => BinaryOp::Min,
            "Pow" => BinaryOp::Pow,
            "Eq" => BinaryOp::Eq,
            "NE" => BinaryOp::Ne,
            "LT" => BinaryOp::Lt,
            "GT" => BinaryOp::Gt,
            "LTE" => BinaryOp::Lte,
            "GTE" => BinaryOp::Gte,
            "And" => BinaryOp::And,
            "Or" => BinaryOp::Or,
            _ => return None,
        })
    }
    /// The expression on i32 operands (`None`: no integer kernel).
    pub fn int_expr(&self) -> Option<&'static str> {
        Some(match self {
            BinaryOp::Add => "bitcast<f32>(x + y)",
            BinaryOp::Sub => "bitcast<f32>(x - y)",
            BinaryOp::SubF => "bitcast<f32>(y - x)",
            BinaryOp::Mul => "bitcast<f32>(x * y)",
            // truncating, like Rust's (and the CPU's) integer division
            BinaryOp::Div => "bitcast<f32>(x / y)",
            BinaryOp::Max => "bitcast<f32>(max(x, y))",
            BinaryOp::Min => "bitcast<f32>(min(x, y))",
            BinaryOp::Eq => "b2f(x == y)",
            BinaryOp::Ne => "b2f(x != y)",
            BinaryOp::Lt => "b2f(x < y)",
            BinaryOp::Gt => "b2f(x > y)",
            BinaryOp::Lte => "b2f(x <= y)",
            BinaryOp::Gte => "b2f(x >= y)",
            BinaryOp::Pow | BinaryOp::And | BinaryOp::Or => return None,
        })
    }
    pub(crate) fn expr(&self) -> String {
        match self {
            BinaryOp::Add => "x + y",
            BinaryOp::Sub => "x - y",
            BinaryOp::SubF => "y - x",
            BinaryOp::Mul => "x * y",
            BinaryOp::Div => "x / y",
            BinaryOp::Max => "max(x, y)",
            BinaryOp::Min => "min(x, y)",
            // WGSL's pow is undefined for x < 0; integer exponents keep their sign like the CPU's powf.
            BinaryOp::Pow => "pow_binary(x, y)",
            BinaryOp::Eq => "b2f(x == y)",
            BinaryOp::Ne => "b2f(x != y)",
            BinaryOp::Lt => "b2f(x < y)",
            BinaryOp::Gt => "b2f(x > y)",
            BinaryOp::Lte => "b2f(x <= y)",
            BinaryOp::Gte => "b2f(x >= y)",
            BinaryOp::And => "b2f(x != 0.0 && y != 0.0)",
            BinaryOp::Or => "b2f(x != 0.0 || y != 0.0)",
        }
        .into()
    }
}

/// Which GPU representation an element type has: 0 f32, 1 bool (f32 0/1), 2 integer (i32 bits).
fn gpu_repr(dt: DatumType) -> Option<u8> {
    match dt {
        DatumType::F32 => Some(0),
        DatumType::Bool => Some(1),
        DatumType::I32 | DatumType::I64 => Some(2),
        // u8 / i8 / u16 / i16: one i32 word each (crate::quant)
        d if crate::quant::is_narrow(d) => Some(3),
        _ => None,
    }
}

/// Whether [`UnaryOp::Cast`] has a kernel from `from` to `to` (with f16 on a side: crate::f16).
pub fn cast_supported(from: DatumType, to: DatumType) -> bool {
    if crate::quant::is_narrow(from) || crate::quant::is_narrow(to) {
        return crate::quant::narrow_cast_expr(from, to).is_some();
    }
    (gpu_repr(from).is_some() && gpu_repr(to).is_some()) || crate::f16::cast_supported(from, to)
}

fn cast_expr(from: DatumType, to: DatumType) -> &'static str {
    if let Some(e) = crate::quant::narrow_cast_expr(from, to) {
        return e;
    }
    match (gpu_repr(from), gpu_repr(to)) {
        (Some(0), Some(1)) => "b2f(x != 0.0)",
        (Some(0), Some(2)) => "bitcast<f32>(i32(x))",
        (Some(1), Some(2)) => "bitcast<f32>(i32(x))",
        (Some(2), Some(0)) => "f32(bitcast<i32>(x))",
        (Some(2), Some(1)) => "b2f(bitcast<i32>(x) != 0)",
        // same representation, or bool → f32 (already 0.0 / 1.0)
        _ => "x",
    }
}

/// A shape-only change of a contiguous tensor: no kernel, the output shares the input's buffer.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum View {
    AddAxis(usize),
    RmAxis(usize),
    /// `from_len` dims at `at` become `to` (symbolic dims take the run's values; one left unknown is inferred from
    /// the element count).
    Reshape {
        at: usize,
        from_len: usize,
        to: Vec<TDim>,
    },
}

impl View {
    pub fn output_shape(&self, input: &[usize], syms: &SymbolValues) -> Result<TVec<usize>> {
        let bad = || Error::new(format!("webgpu: view {self:?} does not apply to shape {input:?}"));
        let mut s: TVec<usize> = input.into();
        match self {
            View::AddAxis(a) if *a <= s.len() => s.insert(*a, 1),
            View::RmAxis(a) if *a < s.len() && s[*a] == 1 => {
                s.remove(*a);
            }
            View::Reshape { at, from_len, to } if at + from_len <= s.len() => {
                let to: Vec<Option<usize>> =
                    to.iter().map(|d| d.eval_to_i64(syms).ok().and_then(|v| usize::try_from(v).ok())).collect();
                let count: usize = s[*at..at + from_len].iter().product();
                let known: usize = to.iter().flatten().product();
                let unknown = to.iter().filter(|d| d.is_none()).count();
                let fill = match unknown {
                    0 if known == count => 0,
                    1 if known > 0 && count.is_multiple_of(known) => count / known,
                    1 if known == 0 && count == 0 => 0,
                    _ => return Err(bad()),
                };
                let new: Vec<usize> = to.iter().map(|d| d.unwrap_or(fill)).collect();
                let tail: Vec<usize> = s[at + from_len..].to_vec();
                s.truncate(*at);
                s.extend(new);
                s.extend(tail);
            }
            _ => return Err(bad()),
        }
        Ok(s)
    }
}

/// One GPU kernel with its specialisation (what selects a pipeline); sizes come at run time.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// No dispatch: the output is the input's buffer under another shape.
    View(View),
    Unary(UnaryOp),
    Binary(BinaryOp),
    /// tract's PrefixMatMul: same-rank operands, batch dims broadcast, optional transposes.
    MatMul {
        transpose_a: bool,
        transpose_b: bool,
        transpose_c: bool,
        /// onnxruntime's CPU rounding (one fused multiply-add per k, in order; [`Kernel::exact_arithmetic`]).
        exact: bool,
    },
    /// Softmax over one axis (LogSoftmax when `log`).
    Softmax {
        axis: usize,
        log: bool,
        /// onnxruntime's CPU arithmetic (MLAS's exp and summation order; [`Kernel::exact_arithmetic`]).
        exact: bool,
    },
    /// tract's MoveAxis: axis `from` moved to position `to` (a transpose).
    MoveAxis {
        from: usize,
        to: usize,
    },
    /// Expand (tract's MultiBroadcastTo) to `shape` (symbolic dims take the run's values).
    Broadcast {
        shape: Vec<TDim>,
    },
    /// Elements `start..end` of `axis` (step 1, tract's Slice).
    Slice {
        axis: usize,
        start: TDim,
        end: TDim,
    },
    /// `inputs` tensors concatenated along `axis`.
    Concat {
        axis: usize,
        inputs: usize,
    },
    /// tract's Reduce over adjacent `axes` (dims kept).
    Reduce {
        axes: Vec<usize>,
        op: ReduceOp,
    },
    /// x * rsqrt(mean(x², axis) + eps); `eps` is the f32's bits.
    RmsNorm {
        axis: usize,
        eps: u32,
    },
    /// tract's Iff (ONNX Where): inputs (condition, then, else), broadcast.
    Where,
    /// Gather along `axis`: inputs (data, indices: i64 or i32, stored as i32).
    Gather {
        axis: usize,
    },
    /// A Gather of a float16 table along `axis` whose rows are cast to `to` as they are copied (an embedding lookup
    /// and the Cast after it, one dispatch): inputs (data, indices).
    GatherCast {
        axis: usize,
        to: DatumType,
    },
    /// tract's GatherNd (ONNX GatherND): inputs (data, indices), the first `batch_dims` axes shared.
    GatherNd {
        batch_dims: usize,
    },
    /// tract's Downsample (what a Slice with a step becomes): every `stride`-th element of `axis` from `modulo`;
    /// a negative stride walks from the end.
    Downsample {
        axis: usize,
        stride: isize,
        modulo: usize,
    },
    /// tract's Pad: (before, after) per axis.
    Pad {
        pads: Vec<(usize, usize)>,
        mode: PadKind,
    },
    /// tract's Tile: each axis repeated (symbolic multipliers take the run's values).
    Tile {
        multipliers: Vec<TDim>,
    },
    /// tract's Trilu over the last two axes: inputs (x, k: a scalar i64).
    Trilu {
        upper: bool,
    },
    /// tract's Range on integers: inputs (start, limit, step) as scalars on the GPU, `len` elements (a dim the run's
    /// symbols give: never one only the CPU's evaluation could tell).
    Range {
        len: TDim,
    },
    /// kiln's DimValues: at most [`MAX_DIM_VALUES`] i64 values of the run's symbols (no input).
    DimValues {
        shape: Vec<usize>,
        values: Vec<TDim>,
    },
    /// kiln's DimRange: `len` i64 values `start + i · step`, dims of the run's symbols (no input).
    DimRange {
        start: TDim,
        step: TDim,
        len: TDim,
    },
    /// tract's CumSum along `axis`.
    CumSum {
        axis: usize,
        exclusive: bool,
        reverse: bool,
    },
    /// A group of elementwise nodes in one dispatch (kiln-graph's fusion pass).
    Fused(Box<FusedProgram>),
    /// com.microsoft MatMulNBits, dequantizing in the kernel: inputs (A, packed B, scales[, zero points]).
    QMatMul(crate::qmatmul::QMatMul),
    /// ONNX Attention's Y, fused (crate::attention).
    Attention(Box<crate::attention::AttentionSpec>),
    /// RotaryEmbedding (crate::attention).
    Rotary(crate::attention::RotarySpec),
    /// A layer's q / k / v projections with their rotation and KV appends (crate::qmatmul): several outputs.
    QkvRope(Box<crate::qmatmul::QkvRope>),
    /// Quantization kernels (crate::quant).
    Quant(crate::quant::QuantKernel),
    /// GroupQueryAttention's present key / value (crate::msft).
    GqaKv(crate::msft::GqaKvSpec),
    /// kiln's NormOp: (skip +) RMS / layer norm (· gamma + beta) in one dispatch (crate::msft).
    Norm(crate::msft::NormSpec),
    /// ONNX LayerNormalization with onnxruntime's CPU arithmetic (crate::msft).
    OrtLayerNorm(crate::msft::OrtLayerNormSpec),
}

/// How [`Kernel::Pad`] fills the border.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PadKind {
    /// A constant: its bits as the GPU stores the element type.
    Constant(u32),
    Reflect,
    Edge,
}

/// The reductions of [`Kernel::Reduce`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    Sum,
    Prod,
    Max,
    Min,
    MeanOfSquares,
    /// The index of the largest / smallest element (i64; the last one among ties when `last`).
    ArgMax {
        last: bool,
    },
    ArgMin {
        last: bool,
    },
}

impl ReduceOp {
    /// (init, map of `v`, combine of `a` and `b`, finish of `acc` and `n`)
    fn is_arg(&self) -> bool {
        matches!(self, ReduceOp::ArgMax { .. } | ReduceOp::ArgMin { .. })
    }
    fn exprs(&self) -> [&'static str; 4] {
        match self {
            ReduceOp::Sum => ["0.0", "v", "a + b", "acc"],
            ReduceOp::Prod => ["1.0", "v", "a * b", "acc"],
            ReduceOp::Max => ["-3.40282346e38", "v", "max(a, b)", "acc"],
            ReduceOp::Min => ["3.40282346e38", "v", "min(a, b)", "acc"],
            ReduceOp::MeanOfSquares => ["0.0", "v * v", "a + b", "acc / max(n, 1.0)"],
            ReduceOp::ArgMax { .. } => ["-3.4028235e38", "v", "a", "acc"],
            ReduceOp::ArgMin { .. } => ["3.4028235e38", "v", "a", "acc"],
        }
    }
}

pub(crate) const WG: u32 = 256;

pub(crate) fn words(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|w| w.to_le_bytes()).collect()
}

pub(crate) fn u32_of(what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::new(format!("webgpu: {what} {v} exceeds 32-bit indexing")))
}

/// The specialised WGSL of a family: the prelude, then the family's text, with every `{{NAME}}` of `spec` replaced
/// (`WG` defaults to 256).
fn shader_source(family: &str, spec: &[(&'static str, String)]) -> Result<String> {
    let body = match family {
        "elementwise" => ELEMENTWISE_WGSL,
        "matmul" => MATMUL_WGSL,
        "softmax" => SOFTMAX_WGSL,
        "layout" => LAYOUT_WGSL,
        "reduce" => REDUCE_WGSL,
        "scan" => SCAN_WGSL,
        "qmatmul" => QMATMUL_WGSL,
        "attention" => ATTENTION_WGSL,
        "rope" => ROPE_WGSL,
        "quant" => QUANT_WGSL,
        "msft" => MSFT_WGSL,
        "norm" => NORM_WGSL,
        other => return Err(Error::new(format!("webgpu: no kernel family {other}"))),
    };
    // {{ENABLE}}: extensions a specialisation turns on (`enable f16;`), which must come first
    let mut text = format!("{{{{ENABLE}}}}{PRELUDE_WGSL}\n{body}");
    for (k, v) in spec {
        text = text.replace(&format!("{{{{{k}}}}}"), v);
    }
    // what a specialisation leaves out (the placeholders of the family's other entries)
    for (k, v) in SPEC_DEFAULTS {
        text = text.replace(&format!("{{{{{k}}}}}"), v);
    }
    if let Some(at) = text.find("{{") {
        let name: String = text[at..].chars().take(24).collect();
        return Err(Error::new(format!("webgpu: {family} left unspecialised at {name}")));
    }
    Ok(text)
}

/// Values of the placeholders a specialisation does not set.
const SPEC_DEFAULTS: [(&str, &str); 18] = [
    ("ENABLE", ""),
    ("TYPE", "f32"),
    ("WG", "256"),
    ("UNARY", "x"),
    ("BINARY", "x"),
    ("BINARY_INT", "bitcast<f32>(x)"),
    ("LOG", "false"),
    ("INIT", "0.0"),
    ("MAP", "v"),
    ("COMBINE", "a + b"),
    ("FINISH", "acc"),
    ("ARG_CMP", "false"),
    ("ARG_TIE", "false"),
    ("POS_AT", "return pos[i];"),
    ("STORE_T", "f32"),
    ("PAIR", "1"),
    ("STORE_VAL", "return a;"),
    ("K_OUT", ""),
];

/// One dispatch of `family::entry` specialised by `spec`: the uniform block at binding 0, `bindings` (binding
/// index, tensor) for the storage buffers, `groups` workgroups.
#[allow(clippy::too_many_arguments)]
pub(crate) fn launch(
    ctx: &Context,
    rec: &mut Recorder,
    family: &'static str,
    entry: &'static str,
    spec: Vec<(&'static str, String)>,
    uniform: &[u32],
    bindings: &[(u32, &GpuTensor)],
    groups: (u32, u32, u32),
) -> Result<()> {
    let pipeline = pipeline_for(ctx, family, entry, spec)?;
    dispatch_with(rec, pipeline, entry, uniform, bindings, groups);
    Ok(())
}

/// The pipeline of `family::entry` specialised by `spec` (compiled on first use).
pub(crate) fn pipeline_for(
    ctx: &Context,
    family: &'static str,
    entry: &'static str,
    spec: Vec<(&'static str, String)>,
) -> Result<Arc<wgpu::ComputePipeline>> {
    let key = PipelineKey { family, entry, spec };
    let mut failed = None;
    let pipeline = ctx.pipeline(&key, || {
        shader_source(family, &key.spec).unwrap_or_else(|e| {
            failed = Some(e);
            String::new()
        })
    });
    if let Some(e) = failed {
        return Err(e);
    }
    pipeline
}

/// [`launch`] with the pipeline already at hand (`entry`: its label in profiles).
pub(crate) fn dispatch_with(
    rec: &mut Recorder,
    pipeline: Arc<wgpu::ComputePipeline>,
    entry: &'static str,
    uniform: &[u32],
    bindings: &[(u32, &GpuTensor)],
    groups: (u32, u32, u32),
) {
    let bindings = bindings.iter().map(|(index, t)| Binding { index: *index, buffer: t.buffer.clone() }).collect();
    rec.dispatch(pipeline, words(uniform), bindings, groups, entry);
}

/// Appends `v` to a uniform as a block of `len` words (zero-filled), each checked to fit a u32.
fn push_block(u: &mut Vec<u32>, v: &[usize], len: usize) -> Result<()> {
    if v.len() > len {
        return Err(Error::new(format!("webgpu: {} dims exceed the kernel's {len}", v.len())));
    }
    for x in v {
        u.push(u32_of("dim", *x)?);
    }
    u.extend(std::iter::repeat_n(0, len - v.len()));
    Ok(())
}

/// (x, y) workgroups for `n` invocations of `WG` each.
fn grid_for(ctx: &Context, n: usize) -> Result<(u32, u32)> {
    ctx.grid((n as u64).div_ceil(WG as u64))
}

pub(crate) fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// numpy broadcasting of two shapes.
pub fn broadcast(a: &[usize], b: &[usize]) -> Result<TVec<usize>> {
    let rank = a.len().max(b.len());
    let mut out = tvec![0; rank];
    for (i, o) in out.iter_mut().enumerate() {
        let da = if i + a.len() >= rank { a[i + a.len() - rank] } else { 1 };
        let db = if i + b.len() >= rank { b[i + b.len() - rank] } else { 1 };
        *o = if da == db || db == 1 {
            da
        } else if da == 1 {
            db
        } else {
            return Err(Error::new(format!("webgpu: shapes {a:?} and {b:?} do not broadcast")));
        };
    }
    Ok(out)
}

/// Broadcast strides of `shape` (left-padded) against `out`: 0 where broadcast.
pub(crate) fn broadcast_strides(shape: &[usize], out: &[usize]) -> Vec<usize> {
    let cs = contiguous_strides(shape);
    let pad = out.len() - shape.len();
    (0..out.len()).map(|i| if i < pad || shape[i - pad] == 1 { 0 } else { cs[i - pad] }).collect()
}

/// [`collapse`] for any number of operands.
pub(crate) fn collapse_n(shape: &[usize], strides: &[Vec<usize>]) -> (Vec<usize>, Vec<Vec<usize>>) {
    let mut s: Vec<usize> = vec![];
    let mut out: Vec<Vec<usize>> = vec![vec![]; strides.len()];
    for i in 0..shape.len() {
        if shape[i] == 1 {
            continue;
        }
        let merge =
            !s.is_empty() && strides.iter().zip(&out).all(|(st, o)| o.last().is_some_and(|l| *l == st[i] * shape[i]));
        if merge {
            if let Some(l) = s.last_mut() {
                *l *= shape[i];
            }
            for (st, o) in strides.iter().zip(out.iter_mut()) {
                if let Some(l) = o.last_mut() {
                    *l = st[i];
                }
            }
        } else {
            s.push(shape[i]);
            for (st, o) in strides.iter().zip(out.iter_mut()) {
                o.push(st[i]);
            }
        }
    }
    (s, out)
}

/// Merges adjacent dims that both operands traverse contiguously (fewer index steps per element).
fn collapse(shape: &[usize], sa: &[usize], sb: &[usize]) -> (Vec<usize>, Vec<usize>, Vec<usize>) {
    let (mut s, mut a, mut b): (Vec<usize>, Vec<usize>, Vec<usize>) = (vec![], vec![], vec![]);
    for i in 0..shape.len() {
        if shape[i] == 1 {
            continue;
        }
        if let (Some(ls), Some(la), Some(lb)) = (s.last_mut(), a.last_mut(), b.last_mut()) {
            if *la == sa[i] * shape[i] && *lb == sb[i] * shape[i] {
                *ls *= shape[i];
                *la = sa[i];
                *lb = sb[i];
                continue;
            }
        }
        s.push(shape[i]);
        a.push(sa[i]);
        b.push(sb[i]);
    }
    (s, a, b)
}

impl Kernel {
    /// This kernel computing as onnxruntime's CPU kernels round (bit for bit where the CPU provider is), at some cost:
    /// what int8 models with per-tensor dynamic quantization need, whose uint8 codes flip on an ulp. `None`: the
    /// kernel has no such variant (or always computes that way).
    pub fn exact_arithmetic(&self) -> Option<Kernel> {
        match self {
            Kernel::MatMul { transpose_a, transpose_b, transpose_c, .. } => Some(Kernel::MatMul {
                transpose_a: *transpose_a,
                transpose_b: *transpose_b,
                transpose_c: *transpose_c,
                exact: true,
            }),
            Kernel::Softmax { axis, log: false, .. } => Some(Kernel::Softmax { axis: *axis, log: false, exact: true }),
            Kernel::OrtLayerNorm(n) => {
                Some(Kernel::OrtLayerNorm(crate::msft::OrtLayerNormSpec { exact: true, ..n.clone() }))
            }
            _ => None,
        }
    }

    pub fn name(&self) -> String {
        match self {
            Kernel::Unary(op) => format!("{op:?}"),
            Kernel::Binary(op) => format!("{op:?}"),
            Kernel::MatMul { .. } => "MatMul".into(),
            Kernel::Softmax { log: false, .. } => "Softmax".into(),
            Kernel::Softmax { log: true, .. } => "LogSoftmax".into(),
            Kernel::View(_) => "View".into(),
            Kernel::MoveAxis { .. } => "Transpose".into(),
            Kernel::Broadcast { .. } => "Expand".into(),
            Kernel::Slice { .. } => "Slice".into(),
            Kernel::Concat { .. } => "Concat".into(),
            Kernel::Reduce { op, .. } => format!("Reduce{op:?}"),
            Kernel::RmsNorm { .. } => "RmsNorm".into(),
            Kernel::Where => "Where".into(),
            Kernel::Gather { .. } => "Gather".into(),
            Kernel::GatherCast { .. } => "GatherCast".into(),
            Kernel::GatherNd { .. } => "GatherNd".into(),
            Kernel::Downsample { .. } => "Downsample".into(),
            Kernel::Pad { .. } => "Pad".into(),
            Kernel::Tile { .. } => "Tile".into(),
            Kernel::Trilu { .. } => "Trilu".into(),
            Kernel::CumSum { .. } => "CumSum".into(),
            Kernel::Range { .. } => "Range".into(),
            Kernel::DimValues { .. } => "DimValues".into(),
            Kernel::DimRange { .. } => "DimRange".into(),
            Kernel::Fused(p) => p.name(),
            Kernel::QMatMul(q) => match q.epilogue {
                crate::qmatmul::QEpilogue::None => "MatMulNBits".into(),
                crate::qmatmul::QEpilogue::Residual => "MatMulNBits+Add".into(),
                crate::qmatmul::QEpilogue::SiluMul => "MatMulNBits(gate,up)+SiluMul".into(),
                crate::qmatmul::QEpilogue::Split(_) => "MatMulNBits(split)".into(),
            },
            Kernel::Attention(_) => "Attention".into(),
            Kernel::Rotary(_) => "RotaryEmbedding".into(),
            Kernel::QkvRope(_) => "MatMulNBits(q,k,v)+RotaryEmbedding+KV".into(),
            Kernel::Quant(q) => q.name(),
            Kernel::GqaKv(_) => "GqaPresent".into(),
            Kernel::Norm(n) if n.op.rms => "FusedRmsNorm".into(),
            Kernel::Norm(_) => "FusedLayerNorm".into(),
            Kernel::OrtLayerNorm(_) => "LayerNorm".into(),
        }
    }

    /// The output element type for inputs of `dts`, or `None` when the kernel does not take them. Bools live on
    /// the GPU as f32 0.0 / 1.0, i64 as i32 (range-checked at upload); data movement takes any of f32, bool, i32
    /// and i64 (4-byte elements moved as bits).
    pub fn output_dt(&self, dts: &[DatumType]) -> Option<DatumType> {
        use DatumType::{Bool, F32, I32, I64};
        let all = |dt: DatumType| dts.iter().all(|d| *d == dt);
        let first = dts.first().copied();
        let int = first.filter(|d| matches!(d, I32 | I64) && all(*d));
        let moved = first.filter(|d| gpu_repr(*d).is_some() && all(*d));
        // f16 (crate::f16): views and the strided copies
        let moved16 = first.filter(|d| (gpu_repr(*d).is_some() || *d == DatumType::F16) && all(*d));
        match self {
            Kernel::Unary(UnaryOp::IsNan) => all(F32).then_some(Bool),
            Kernel::Unary(UnaryOp::Not) => all(Bool).then_some(Bool),
            Kernel::Unary(UnaryOp::Cast { from, to }) => (all(*from) && cast_supported(*from, *to)).then_some(*to),
            Kernel::Binary(BinaryOp::Eq | BinaryOp::Ne) if all(Bool) => Some(Bool),
            Kernel::Binary(op) if op.is_comparison() => (all(F32) || int.is_some()).then_some(Bool),
            Kernel::Binary(op) if op.is_logical() => all(Bool).then_some(Bool),
            Kernel::Binary(op) if int.is_some() => op.int_expr().and(int),
            Kernel::View(_)
            | Kernel::MoveAxis { .. }
            | Kernel::Broadcast { .. }
            | Kernel::Slice { .. }
            | Kernel::Concat { .. }
            | Kernel::Downsample { .. } => moved16,
            Kernel::Pad { .. } | Kernel::Tile { .. } => moved,
            Kernel::Gather { .. } => match dts {
                [d, I64 | I32] if gpu_repr(*d).is_some() || *d == DatumType::F16 => Some(*d),
                _ => None,
            },
            Kernel::GatherCast { to, .. } => match dts {
                [DatumType::F16, I64 | I32] if cast_supported(DatumType::F16, *to) && *to != DatumType::F16 => {
                    Some(*to)
                }
                _ => None,
            },
            Kernel::GatherNd { .. } => match dts {
                [d, I64 | I32] if gpu_repr(*d).is_some() => Some(*d),
                _ => None,
            },
            Kernel::Trilu { .. } => match dts {
                [d, I64] if gpu_repr(*d).is_some() => Some(*d),
                _ => None,
            },
            Kernel::Where => match dts {
                [Bool, t, f] if t == f && gpu_repr(*t).is_some() => Some(*t),
                _ => None,
            },
            Kernel::CumSum { .. } => (all(F32) || int.is_some()).then_some(first?),
            Kernel::Range { .. } => int,
            Kernel::DimValues { .. } | Kernel::DimRange { .. } => dts.is_empty().then_some(I64),
            Kernel::Reduce { op, .. } if op.is_arg() => all(F32).then_some(I64),
            Kernel::Fused(p) => dts.iter().all(|d| crate::fused::is_word(*d)).then_some(p.out_dt),
            Kernel::QMatMul(q) => (first == Some(F32)
                && (q.epilogue != crate::qmatmul::QEpilogue::Residual || dts.last() == Some(&F32)))
            .then_some(F32),
            Kernel::Attention(a) => a.output_dt(dts),
            Kernel::Rotary(r) => r.output_dt(dts),
            Kernel::QkvRope(_) => Some(DatumType::F32),
            Kernel::Quant(q) => q.output_dt(dts),
            Kernel::GqaKv(g) => g.output_dt(dts),
            Kernel::Norm(n) => n.output_dt(dts),
            Kernel::OrtLayerNorm(n) => n.output_dt(dts),
            // B may be a float16 weight (read as f32)
            Kernel::MatMul { exact: false, .. } => matches!(dts, [F32, F32 | DatumType::F16]).then_some(F32),
            _ => all(F32).then_some(F32),
        }
    }

    /// Whether the kernel multiplies in float16 where the adapter has shader-f16 (a float16 model's matmuls and
    /// attention: [`crate::qmatmul::QMatMul::f16_math`], [`crate::attention::AttentionSpec::f16_math`]).
    pub fn f16_math(&self) -> bool {
        match self {
            Kernel::QMatMul(q) => q.f16_math,
            Kernel::QkvRope(r) => r.q.f16_math,
            Kernel::Attention(a) => a.f16_math,
            _ => false,
        }
    }

    /// The kernel with float16 products, where it has that form: matmuls and attention, but not MatMulNBits with
    /// accuracy_level 4, whose arithmetic is onnxruntime's int8 scheme.
    pub fn with_f16_math(&self) -> Option<Kernel> {
        Some(match self {
            Kernel::QMatMul(q) if !q.int8_activations => {
                Kernel::QMatMul(crate::qmatmul::QMatMul { f16_math: true, ..q.clone() })
            }
            Kernel::QkvRope(r) if !r.q.int8_activations => {
                let q = crate::qmatmul::QMatMul { f16_math: true, ..r.q.clone() };
                Kernel::QkvRope(Box::new(crate::qmatmul::QkvRope { q, ..(**r).clone() }))
            }
            Kernel::Attention(a) => {
                Kernel::Attention(Box::new(crate::attention::AttentionSpec { f16_math: true, ..(**a).clone() }))
            }
            _ => return None,
        })
    }

    pub fn arity(&self) -> usize {
        match self {
            Kernel::Unary(_)
            | Kernel::Softmax { .. }
            | Kernel::View(_)
            | Kernel::MoveAxis { .. }
            | Kernel::Broadcast { .. }
            | Kernel::Slice { .. }
            | Kernel::Reduce { .. }
            | Kernel::RmsNorm { .. }
            | Kernel::Downsample { .. }
            | Kernel::Pad { .. }
            | Kernel::Tile { .. }
            | Kernel::CumSum { .. } => 1,
            Kernel::Binary(_)
            | Kernel::MatMul { .. }
            | Kernel::Gather { .. }
            | Kernel::GatherCast { .. }
            | Kernel::GatherNd { .. }
            | Kernel::Trilu { .. } => 2,
            Kernel::Range { .. } => 3,
            Kernel::DimValues { .. } | Kernel::DimRange { .. } => 0,
            Kernel::Where => 3,
            Kernel::Concat { inputs, .. } => *inputs,
            Kernel::Fused(p) => p.inputs,
            Kernel::QMatMul(q) => q.arity(),
            Kernel::Attention(a) => a.arity(),
            Kernel::Rotary(r) => r.arity(),
            Kernel::QkvRope(r) => r.arity(),
            Kernel::Quant(q) => q.arity(),
            Kernel::GqaKv(g) => g.arity(),
            Kernel::Norm(n) => n.arity(),
            Kernel::OrtLayerNorm(n) => n.arity(),
        }
    }

    /// The output shape for concrete input shapes (`syms`: the run's symbol values).
    pub fn output_shape(&self, inputs: &[&[usize]], syms: &SymbolValues) -> Result<TVec<usize>> {
        if inputs.len() != self.arity() {
            return Err(Error::new(format!(
                "webgpu: {} expects {} inputs, got {}",
                self.name(),
                self.arity(),
                inputs.len()
            )));
        }
        match self {
            Kernel::Unary(_) | Kernel::Softmax { .. } | Kernel::RmsNorm { .. } | Kernel::CumSum { .. } => {
                Ok(inputs[0].into())
            }
            Kernel::QMatMul(q) => q.output_shape(inputs),
            Kernel::Quant(q) => q.output_shape(inputs),
            Kernel::Range { len } => {
                if inputs.iter().any(|i| i.iter().product::<usize>() != 1) {
                    return Err(Error::new(format!("webgpu: Range of non-scalars {inputs:?}")));
                }
                // a limit short of the start: no element (like the CPU)
                let n = len.eval_to_i64(syms).map_err(|_| Error::new(format!("webgpu: dim {len} has no value")))?;
                Ok(tvec![n.max(0) as usize])
            }
            Kernel::DimValues { shape, .. } => Ok(shape.iter().copied().collect()),
            Kernel::DimRange { len, .. } => Ok(tvec![dim_i64(len, syms)?.max(0) as usize]),
            Kernel::Trilu { .. } => {
                if inputs[0].len() < 2 || inputs[1].iter().product::<usize>() != 1 {
                    return Err(Error::new(format!("webgpu: Trilu of {:?} with k of {:?}", inputs[0], inputs[1])));
                }
                Ok(inputs[0].into())
            }
            Kernel::Downsample { axis, stride, modulo } => {
                let mut s: TVec<usize> = inputs[0].into();
                let step = stride.unsigned_abs();
                match s.get_mut(*axis) {
                    Some(d) if step > 0 => *d = d.saturating_sub(*modulo).div_ceil(step),
                    _ => return Err(Error::new(format!("webgpu: downsample {self:?} of {:?}", inputs[0]))),
                }
                Ok(s)
            }
            Kernel::Pad { pads, .. } => {
                if pads.len() != inputs[0].len() {
                    return Err(Error::new(format!("webgpu: pads {pads:?} for shape {:?}", inputs[0])));
                }
                Ok(inputs[0].iter().zip(pads).map(|(d, (a, b))| d + a + b).collect())
            }
            Kernel::Tile { multipliers } => {
                if multipliers.len() != inputs[0].len() {
                    return Err(Error::new(format!("webgpu: tile {multipliers:?} of shape {:?}", inputs[0])));
                }
                let mut s = tvec![];
                for (d, m) in inputs[0].iter().zip(multipliers) {
                    s.push(d * eval_dim(m, syms)?);
                }
                Ok(s)
            }
            Kernel::GatherNd { batch_dims } => {
                let (d, i) = (inputs[0], inputs[1]);
                let n = i.last().copied().unwrap_or(0);
                if i.is_empty() || n == 0 || batch_dims + n > d.len() || i.len() <= *batch_dims {
                    return Err(Error::new(format!("webgpu: GatherND of {d:?} with indices {i:?}")));
                }
                if d[..*batch_dims] != i[..*batch_dims] {
                    return Err(Error::new(format!("webgpu: GatherND batch dims of {d:?} and {i:?} differ")));
                }
                let mut s: TVec<usize> = i[..i.len() - 1].into();
                s.extend(d[batch_dims + n..].iter().copied());
                Ok(s)
            }
            Kernel::View(v) => v.output_shape(inputs[0], syms),
            Kernel::Attention(a) => a.output_shape(inputs),
            Kernel::Rotary(_) => Ok(inputs[0].into()),
            Kernel::QkvRope(_) => Err(Error::new("webgpu: q/k/v with rotation has several outputs")),
            Kernel::GqaKv(g) => g.output_shape(inputs),
            Kernel::Norm(_) | Kernel::OrtLayerNorm(_) => Ok(inputs[0].into()),
            Kernel::MoveAxis { from, to } => {
                let perm = move_axis_perm(inputs[0].len(), *from, *to)?;
                Ok(perm.iter().map(|p| inputs[0][*p]).collect())
            }
            Kernel::Broadcast { shape } => {
                let mut target: TVec<usize> = tvec![];
                for d in shape {
                    target.push(eval_dim(d, syms)?);
                }
                let out = broadcast(inputs[0], &target)?;
                Ok(out)
            }
            Kernel::Slice { axis, start, end } => {
                let (start, end) = (eval_dim(start, syms)?, eval_dim(end, syms)?);
                let mut s: TVec<usize> = inputs[0].into();
                match s.get_mut(*axis) {
                    Some(d) if start <= end && end <= *d => *d = end - start,
                    _ => {
                        return Err(Error::new(format!(
                            "webgpu: slice {start}..{end} of axis {axis} out of range for {:?}",
                            inputs[0]
                        )))
                    }
                }
                Ok(s)
            }
            Kernel::Concat { axis, .. } => {
                let mut s: TVec<usize> = inputs[0].into();
                if *axis >= s.len() {
                    return Err(Error::new(format!("webgpu: concat axis {axis} out of range for {s:?}")));
                }
                s[*axis] = 0;
                for i in inputs {
                    let same = i.len() == s.len() && (0..s.len()).all(|d| d == *axis || i[d] == s[d]);
                    if !same {
                        return Err(Error::new(format!("webgpu: concat of {inputs:?} along axis {axis}")));
                    }
                    s[*axis] += i[*axis];
                }
                Ok(s)
            }
            Kernel::Reduce { axes, .. } => {
                let mut s: TVec<usize> = inputs[0].into();
                for a in axes {
                    match s.get_mut(*a) {
                        Some(d) => *d = 1,
                        None => return Err(Error::new(format!("webgpu: reduce axis {a} out of range for {s:?}"))),
                    }
                }
                Ok(s)
            }
            Kernel::Binary(_) => broadcast(inputs[0], inputs[1]),
            Kernel::Where => broadcast(&broadcast(inputs[0], inputs[1])?, inputs[2]),
            Kernel::Fused(p) => p.output_shape(inputs, syms),
            Kernel::Gather { axis } | Kernel::GatherCast { axis, .. } => {
                let (d, i) = (inputs[0], inputs[1]);
                if *axis >= d.len() {
                    return Err(Error::new(format!("webgpu: gather axis {axis} out of range for {d:?}")));
                }
                let mut s: TVec<usize> = d[..*axis].into();
                s.extend(i.iter().copied());
                s.extend(d[axis + 1..].iter().copied());
                Ok(s)
            }
            Kernel::MatMul { transpose_a, transpose_b, transpose_c, .. } => {
                let (a, b) = (inputs[0], inputs[1]);
                if a.len() != b.len() || a.len() < 2 {
                    return Err(Error::new(format!("webgpu: MatMul operands {a:?} and {b:?} need the same rank >= 2")));
                }
                let r = a.len();
                let mut out: TVec<usize> = tvec![];
                for i in 0..r - 2 {
                    if a[i] != b[i] && a[i] != 1 && b[i] != 1 {
                        return Err(Error::new(format!("webgpu: MatMul batch dims {a:?} and {b:?} do not broadcast")));
                    }
                    out.push(if a[i] == 1 { b[i] } else { a[i] });
                }
                let (m, ka) = if *transpose_a { (a[r - 1], a[r - 2]) } else { (a[r - 2], a[r - 1]) };
                let (kb, n) = if *transpose_b { (b[r - 1], b[r - 2]) } else { (b[r - 2], b[r - 1]) };
                if ka != kb {
                    return Err(Error::new(format!("webgpu: MatMul inner dims differ: {a:?} x {b:?}")));
                }
                if *transpose_c {
                    out.push(n);
                    out.push(m);
                } else {
                    out.push(m);
                    out.push(n);
                }
                Ok(out)
            }
        }
    }

    /// Records the kernel on `inputs`, allocating its outputs from the recorder's pool: one, or one per part of a
    /// split matmul / paired rotary embedding (a node with several outputs). `stores(slot)`: that output leaves the
    /// run on the GPU, so a KV append makes it a KV store ([`crate::kv::append`]); the KV appends (a Concat along
    /// axis 2, a rotation with its appends) take their pasts as KV stores ([`crate::kv::reads_kv_layout`]).
    pub fn encode_outputs(
        &self,
        ctx: &Context,
        rec: &mut Recorder,
        inputs: &[&GpuTensor],
        syms: &SymbolValues,
        stores: &dyn Fn(usize) -> bool,
    ) -> Result<Vec<GpuTensor>> {
        match self {
            Kernel::Concat { axis: 2, inputs: 2 } if inputs.len() == 2 => {
                crate::kv::append_or_concat(ctx, rec, inputs[0], inputs[1], stores(0), syms).map(|t| vec![t])
            }
            Kernel::QMatMul(q) if matches!(q.epilogue, crate::qmatmul::QEpilogue::Split(_)) => {
                q.encode_split(ctx, rec, inputs)
            }
            Kernel::Rotary(r) if r.append => {
                let first = 1 + r.k_out as usize;
                r.encode_append(ctx, rec, inputs, [stores(first), stores(first + 1)], syms)
            }
            Kernel::QkvRope(q) => {
                let first = 1 + q.rope.k_out as usize;
                q.encode_outputs(ctx, rec, inputs, [stores(first), stores(first + 1)], syms)
            }
            Kernel::Rotary(r) if r.second.is_some() => r.encode_pair(ctx, rec, inputs),
            Kernel::Fused(p) if !p.more.is_empty() => p.encode_all(ctx, rec, inputs, syms),
            k => k.encode(ctx, rec, inputs, syms).map(|o| vec![o]),
        }
    }

    /// Records the kernel on `inputs`, allocating its output from the recorder's pool.
    pub fn encode(
        &self,
        ctx: &Context,
        rec: &mut Recorder,
        inputs: &[&GpuTensor],
        syms: &SymbolValues,
    ) -> Result<GpuTensor> {
        let dts: Vec<DatumType> = inputs.iter().map(|t| t.dt).collect();
        let out_dt = self
            .output_dt(&dts)
            .ok_or_else(|| Error::new(format!("webgpu: {} does not run on {dts:?}", self.name())))?;
        // (its shape from the run's symbols once, in its own encode)
        if let Kernel::Fused(p) = self {
            return p.encode(ctx, rec, inputs, syms);
        }
        let shapes: Vec<&[usize]> = inputs.iter().map(|t| &*t.shape).collect();
        let out_shape = self.output_shape(&shapes, syms)?;
        if let Kernel::View(_) = self {
            return Ok(GpuTensor::new(inputs[0].buffer.clone(), &out_shape, inputs[0].dt));
        }
        if let Some(t) = if let Kernel::Quant(q) = self { q.alias(inputs, &out_shape, out_dt) } else { None } {
            return Ok(t);
        }
        if let Kernel::MoveAxis { from, to } = self {
            // an axis moved past unit axes only ([1, 1, H, D] → [1, H, 1, D] in a decode step): same bytes, same
            // order, no dispatch
            let shape = &inputs[0].shape;
            let perm = move_axis_perm(shape.len(), *from, *to)?;
            let kept: Vec<usize> = perm.iter().copied().filter(|p| shape[*p] != 1).collect();
            if inputs[0].kv.is_none() && kept.windows(2).all(|w| w[0] < w[1]) {
                return Ok(GpuTensor::new(inputs[0].buffer.clone(), &out_shape, inputs[0].dt));
            }
        }
        if let Kernel::Slice { axis, start, .. } = self {
            // a slice from 0 whose outer axes are all 1 (a decode step's last position of one row, or the whole
            // axis): the input's first elements, in order: no dispatch
            let shape = &inputs[0].shape;
            if inputs[0].kv.is_none() && eval_dim(start, syms)? == 0 && shape.iter().take(*axis).all(|d| *d == 1) {
                return Ok(GpuTensor::new(inputs[0].buffer.clone(), &out_shape, inputs[0].dt));
            }
        }
        let out = rec.alloc(ctx, &out_shape, out_dt)?;
        if out.is_empty() {
            return Ok(out);
        }
        let n = out.len();
        let (gx, gy) = grid_for(ctx, n)?;
        match self {
            Kernel::View(_) | Kernel::Fused(_) => {}
            Kernel::QkvRope(_) => return Err(Error::new("webgpu: q/k/v with rotation has several outputs")),
            Kernel::QMatMul(q) => q.encode(ctx, rec, inputs, &out)?,
            Kernel::Attention(a) => a.encode(ctx, rec, inputs, &out)?,
            Kernel::Rotary(r) => r.encode(ctx, rec, inputs, &out)?,
            Kernel::Unary(UnaryOp::Cast { from, to }) if crate::f16::cast_supported(*from, *to) => {
                crate::f16::cast(ctx, rec, *from, *to, inputs[0], &out)?;
            }
            Kernel::Quant(q) => q.encode(ctx, rec, inputs, &out)?,
            Kernel::GqaKv(g) => g.encode(ctx, rec, inputs, &out)?,
            Kernel::Norm(n) => n.encode(ctx, rec, inputs, &out)?,
            Kernel::OrtLayerNorm(n) => n.encode(ctx, rec, inputs, &out)?,
            Kernel::Unary(op) => {
                let mut u = vec![u32_of("length", n)?, 1, gx, 0];
                u.extend([0u32; 32]);
                let spec = vec![("UNARY", op.expr())];
                let b = [(1, inputs[0]), (3, &out)];
                launch(ctx, rec, "elementwise", "unary_main", spec, &u, &b, (gx, gy, 1))?;
            }
            Kernel::Binary(op) => {
                let sa = broadcast_strides(&inputs[0].shape, &out_shape);
                let sb = broadcast_strides(&inputs[1].shape, &out_shape);
                let (shape, sa, sb) = collapse(&out_shape, &sa, &sb);
                let mut u = vec![u32_of("length", n)?, shape.len() as u32, gx, 0];
                for v in [&shape, &sa, &sb, &vec![]] {
                    push_block(&mut u, v, MAX_RANK)?;
                }
                let b = [(1, inputs[0]), (2, inputs[1]), (3, &out)];
                if gpu_repr(inputs[0].dt) == Some(2) {
                    let expr = op.int_expr().ok_or_else(|| Error::new(format!("webgpu: no integer {op:?}")))?;
                    let spec = vec![("BINARY_INT", expr.to_string())];
                    launch(ctx, rec, "elementwise", "binary_int_main", spec, &u, &b, (gx, gy, 1))?;
                } else {
                    let spec = vec![("BINARY", op.expr())];
                    launch(ctx, rec, "elementwise", "binary_main", spec, &u, &b, (gx, gy, 1))?;
                }
            }
            Kernel::Where => {
                let strides: Vec<Vec<usize>> =
                    [inputs[1], inputs[2], inputs[0]].iter().map(|t| broadcast_strides(&t.shape, &out_shape)).collect();
                let (shape, strides) = collapse_n(&out_shape, &strides);
                let mut u = vec![u32_of("length", n)?, shape.len() as u32, gx, 0];
                for v in std::iter::once(&shape).chain(strides.iter()) {
                    push_block(&mut u, v, MAX_RANK)?;
                }
                let b = [(1, inputs[1]), (2, inputs[2]), (3, &out), (4, inputs[0])];
                launch(ctx, rec, "elementwise", "where_main", vec![], &u, &b, (gx, gy, 1))?;
            }
            Kernel::Softmax { axis, log, exact } => {
                let shape = &inputs[0].shape;
                if *axis >= shape.len() {
                    return Err(Error::new(format!("webgpu: softmax axis {axis} out of range for {shape:?}")));
                }
                let len = shape[*axis];
                let inner: usize = shape[axis + 1..].iter().product();
                let rows = n / len.max(1);
                let (gx, gy) = ctx.grid(rows as u64)?;
                let u = [u32_of("rows", rows)?, u32_of("length", len)?, u32_of("length", inner)?, gx, 0, 0, 0, 0];
                if *exact && !*log {
                    let spec = vec![("WG", "16".to_string()), ("LOG", "false".to_string())];
                    launch(ctx, rec, "softmax", "ort_main", spec, &u, &[(1, inputs[0]), (3, &out)], (gx, gy, 1))?;
                } else {
                    let spec = vec![("WG", softmax_wg(ctx).to_string()), ("LOG", log.to_string())];
                    launch(ctx, rec, "softmax", "main", spec, &u, &[(1, inputs[0]), (3, &out)], (gx, gy, 1))?;
                }
            }
            // (GatherCast's output is of its `to`: the gather converts as it copies; output_dt took f16 data only)
            Kernel::GatherCast { axis, .. } | Kernel::Gather { axis } if inputs[0].dt == DatumType::F16 => {
                let d = &inputs[0].shape;
                let inner: usize = d[axis + 1..].iter().product();
                crate::f16::gather(ctx, rec, inputs[0], inputs[1], &out, d[*axis], inner)?;
            }
            Kernel::GatherCast { .. } => return Err(Error::new("webgpu: GatherCast of a table that is not float16")),
            Kernel::Gather { axis } => {
                let d = &inputs[0].shape;
                let inner: usize = d[axis + 1..].iter().product();
                let mut u = vec![u32_of("length", n)?, 0, gx];
                u.extend([u32_of("length", d[*axis])?, u32_of("length", inner)?, u32_of("length", inputs[1].len())?]);
                u.extend([0u32; 34]);
                let b = [(1, inputs[0]), (2, inputs[1]), (3, &out)];
                launch(ctx, rec, "layout", "gather_main", vec![], &u, &b, (gx, gy, 1))?;
            }
            Kernel::MoveAxis { from, to } => {
                let a = &inputs[0].shape;
                let perm = move_axis_perm(a.len(), *from, *to)?;
                let sa = contiguous_strides(a);
                let a_strides: Vec<usize> = perm.iter().map(|p| sa[*p]).collect();
                strided_copy(ctx, rec, inputs[0], 0, &a_strides, &out, 0, &contiguous_strides(&out_shape), &out_shape)?;
            }
            Kernel::Broadcast { .. } => {
                let a_strides = broadcast_strides(&inputs[0].shape, &out_shape);
                strided_copy(ctx, rec, inputs[0], 0, &a_strides, &out, 0, &contiguous_strides(&out_shape), &out_shape)?;
            }
            Kernel::Slice { axis, start, .. } => {
                let sa = contiguous_strides(&inputs[0].shape);
                let off = eval_dim(start, syms)? * sa[*axis];
                strided_copy(ctx, rec, inputs[0], off, &sa, &out, 0, &contiguous_strides(&out_shape), &out_shape)?;
            }
            Kernel::Concat { axis, .. } => {
                let so = contiguous_strides(&out_shape);
                let mut at = 0;
                for t in inputs {
                    if !t.is_empty() {
                        let st = contiguous_strides(&t.shape);
                        strided_copy(ctx, rec, t, 0, &st, &out, at * so[*axis], &so, &t.shape)?;
                    }
                    at += t.shape[*axis];
                }
            }
            Kernel::Reduce { axes, op } => {
                let layout = reduce_layout(&inputs[0].shape, axes)?;
                let [init, map, combine, finish] = op.exprs();
                let spec = match op {
                    ReduceOp::ArgMax { last } | ReduceOp::ArgMin { last } => {
                        let cmp = if matches!(op, ReduceOp::ArgMax { .. }) { "v > w" } else { "v < w" };
                        let tie = if *last { "j > k" } else { "j < k" };
                        vec![("INIT", init.into()), ("ARG_CMP", cmp.into()), ("ARG_TIE", tie.into())]
                    }
                    _ => vec![
                        ("INIT", init.into()),
                        ("MAP", map.into()),
                        ("COMBINE", combine.into()),
                        ("FINISH", finish.into()),
                    ],
                };
                let entry = if op.is_arg() { "arg_main" } else { "reduce_main" };
                row_dispatch(ctx, rec, inputs[0], &out, entry, spec, &layout, 0)?;
            }
            Kernel::RmsNorm { axis, eps } => {
                let layout = reduce_layout(&inputs[0].shape, &[*axis])?;
                let spec = vec![("MAP", "v * v".into())];
                row_dispatch(ctx, rec, inputs[0], &out, "rms_main", spec, &layout, *eps)?;
            }
            Kernel::Downsample { axis, stride, modulo } => {
                let a = &inputs[0].shape;
                let sa = contiguous_strides(a);
                let mut strides: Vec<i64> = sa.iter().map(|s| *s as i64).collect();
                let (off, step) = if *stride > 0 {
                    (modulo * sa[*axis], *stride as i64)
                } else {
                    (a[*axis].saturating_sub(1) * sa[*axis], *stride as i64)
                };
                strides[*axis] = step * sa[*axis] as i64;
                strided_copy_signed(ctx, rec, inputs[0], off, &strides, &out)?;
            }
            Kernel::Pad { pads, mode } => {
                let (code, value) = match mode {
                    PadKind::Constant(bits) => (0, *bits),
                    PadKind::Reflect => (1, 0),
                    PadKind::Edge => (2, 0),
                };
                if code != 0 && inputs[0].is_empty() {
                    return Err(Error::new(format!("webgpu: {mode:?} padding of an empty tensor")));
                }
                let before: Vec<usize> = pads.iter().map(|p| p.0).collect();
                remap(ctx, rec, inputs[0], &out, code, value, &before)?;
            }
            Kernel::Tile { .. } => {
                remap(ctx, rec, inputs[0], &out, 3, 0, &vec![0; out_shape.len()])?;
            }
            Kernel::Trilu { upper } => {
                let r = out_shape.len();
                let mut u = vec![u32_of("length", n)?, 0, gx, u32_of("rows", out_shape[r - 2])?];
                u.extend([u32_of("columns", out_shape[r - 1])?, *upper as u32, 0, 0]);
                u.extend([0u32; 32]);
                let b = [(1, inputs[0]), (2, inputs[1]), (3, &out)];
                launch(ctx, rec, "layout", "trilu_main", vec![], &u, &b, (gx, gy, 1))?;
            }
            Kernel::GatherNd { batch_dims } => {
                let (d, i) = (&inputs[0].shape, &inputs[1].shape);
                let bd = *batch_dims;
                let k = i[i.len() - 1];
                let slice: usize = d[bd + k..].iter().product();
                let remaining: usize = i[bd..i.len() - 1].iter().product();
                let batch_stride: usize = d[bd..].iter().product();
                let sd = contiguous_strides(d);
                let mut u = vec![u32_of("length", n)?, u32_of("rank", k)?, gx, u32_of("length", slice)?];
                u.extend([u32_of("length", remaining)?, u32_of("length", batch_stride)?, 0, 0]);
                push_block(&mut u, &d[bd..bd + k], MAX_RANK)?;
                push_block(&mut u, &sd[bd..bd + k], MAX_RANK)?;
                u.extend([0u32; 16]);
                let b = [(1, inputs[0]), (2, inputs[1]), (3, &out)];
                launch(ctx, rec, "layout", "gather_nd_main", vec![], &u, &b, (gx, gy, 1))?;
            }
            Kernel::Range { .. } => {
                let mut u = vec![u32_of("length", n)?, 0, gx];
                u.extend([0u32; 37]);
                // binding 2 (i32): start, binding 1: step
                let b = [(1, inputs[2]), (2, inputs[0]), (3, &out)];
                launch(ctx, rec, "layout", "range_main", vec![], &u, &b, (gx, gy, 1))?;
            }
            Kernel::DimValues { values, .. } => {
                if values.len() > MAX_DIM_VALUES {
                    return Err(Error::new(format!("webgpu: {} dim values exceed {MAX_DIM_VALUES}", values.len())));
                }
                let mut u = vec![u32_of("length", n)?, 0, gx, 0, 0, 0, 0, 0];
                for d in values {
                    u.push(dim_i64(d, syms)? as i32 as u32);
                }
                u.resize(40, 0);
                launch(ctx, rec, "layout", "dim_values_main", vec![], &u, &[(3, &out)], (gx, gy, 1))?;
            }
            Kernel::DimRange { start, step, .. } => {
                let (start, step) = (dim_i64(start, syms)? as i32 as u32, dim_i64(step, syms)? as i32 as u32);
                let mut u = vec![u32_of("length", n)?, 0, gx, start, step];
                u.resize(40, 0);
                launch(ctx, rec, "layout", "dim_range_main", vec![], &u, &[(3, &out)], (gx, gy, 1))?;
            }
            Kernel::CumSum { axis, exclusive, reverse } => {
                let shape = &inputs[0].shape;
                if *axis >= shape.len() {
                    return Err(Error::new(format!("webgpu: cumsum axis {axis} out of range for {shape:?}")));
                }
                let len = shape[*axis];
                let inner: usize = shape[axis + 1..].iter().product();
                let lines = n / len.max(1);
                let (gx, gy) = grid_for(ctx, lines)?;
                let flags = *exclusive as u32 | (*reverse as u32) << 1;
                let u = [u32_of("rows", lines)?, u32_of("length", len)?, u32_of("length", inner)?, gx, flags, 0, 0, 0];
                let ty = if gpu_repr(inputs[0].dt) == Some(2) { "i32" } else { "f32" };
                let spec = vec![("TYPE", ty.to_string())];
                launch(ctx, rec, "scan", "cumsum_main", spec, &u, &[(1, inputs[0]), (3, &out)], (gx, gy, 1))?;
            }
            Kernel::MatMul { transpose_a, transpose_b, transpose_c, exact } => {
                let (a, b) = (&inputs[0].shape, &inputs[1].shape);
                let r = a.len();
                let (m, k) = if *transpose_a { (a[r - 1], a[r - 2]) } else { (a[r - 2], a[r - 1]) };
                let n = if *transpose_b { b[r - 2] } else { b[r - 1] };
                let (sa, sb, sc) = (contiguous_strides(a), contiguous_strides(b), contiguous_strides(&out_shape));
                let (a_sm, a_sk) = if *transpose_a { (sa[r - 1], sa[r - 2]) } else { (sa[r - 2], sa[r - 1]) };
                let (b_sk, b_sn) = if *transpose_b { (sb[r - 1], sb[r - 2]) } else { (sb[r - 2], sb[r - 1]) };
                let (c_sm, c_sn) = if *transpose_c { (sc[r - 1], sc[r - 2]) } else { (sc[r - 2], sc[r - 1]) };
                // batch dims (size-1 dims dropped; broadcast operands get stride 0)
                let mut bshape = vec![];
                let (mut abs, mut bbs, mut cbs) = (vec![], vec![], vec![]);
                for i in 0..r - 2 {
                    if out_shape[i] == 1 {
                        continue;
                    }
                    bshape.push(out_shape[i]);
                    abs.push(if a[i] == 1 { 0 } else { sa[i] });
                    bbs.push(if b[i] == 1 { 0 } else { sb[i] });
                    cbs.push(sc[i]);
                }
                if bshape.len() > MAX_BATCH_RANK {
                    return Err(Error::new(format!("webgpu: MatMul with {} batch dims", bshape.len())));
                }
                let batch: usize = bshape.iter().product();
                if batch as u64 > ctx.caps.max_workgroups_per_dim as u64 {
                    return Err(Error::new(format!("webgpu: MatMul batch {batch} exceeds the adapter's grid")));
                }
                let (entry, gx, gy) = if *exact {
                    let (gx, gy) = ctx.grid(((m * n) as u64).div_ceil(64))?;
                    ("mm_exact", gx, gy)
                } else if m == 1 {
                    if b_sn == 1 {
                        let (gx, gy) = ctx.grid((n as u64).div_ceil(16))?;
                        ("mv_split", gx, gy)
                    } else {
                        let (gx, gy) = ctx.grid(n as u64)?;
                        ("mv_dot", gx, gy)
                    }
                } else {
                    let gx = u32_of("grid", n.div_ceil(64))?;
                    let gy = u32_of("grid", m.div_ceil(64))?;
                    if gx > ctx.caps.max_workgroups_per_dim || gy > ctx.caps.max_workgroups_per_dim {
                        return Err(Error::new(format!("webgpu: MatMul {m}x{n} exceeds the adapter's grid")));
                    }
                    ("tiled", gx, gy)
                };
                let mut u = vec![u32_of("m", m)?, u32_of("n", n)?, u32_of("k", k)?, bshape.len() as u32];
                for s in [a_sm, a_sk, b_sk, b_sn, c_sm, c_sn] {
                    u.push(u32_of("stride", s)?);
                }
                u.extend([gx, 0]);
                for v in [&bshape, &abs, &bbs, &cbs] {
                    push_block(&mut u, v, MAX_BATCH_RANK)?;
                }
                let b = [(1, inputs[0]), (2, inputs[1]), (3, &out)];
                // a float16 B (a weight kept float16: kiln-graph's `matmul_weights_in_f16`) read as u32 pairs
                let spec = if inputs[1].dt == DatumType::F16 {
                    vec![("B_ELEM", "u32".to_string()), ("B_LOAD", "unpack2x16float(b[i / 2u])[i % 2u]".to_string())]
                } else {
                    vec![("B_ELEM", "f32".to_string()), ("B_LOAD", "b[i]".to_string())]
                };
                launch(ctx, rec, "matmul", entry, spec, &u, &b, (gx, gy, batch.max(1) as u32))?;
            }
        }
        Ok(out)
    }
}

/// One workgroup per output row of a reduction family entry (`reduce_main`, `arg_main`, `rms_main`).
#[allow(clippy::too_many_arguments)]
fn row_dispatch(
    ctx: &Context,
    rec: &mut Recorder,
    x: &GpuTensor,
    out: &GpuTensor,
    entry: &'static str,
    mut spec: Vec<(&'static str, String)>,
    [kept, reduced]: &[(Vec<usize>, Vec<usize>); 2],
    eps: u32,
) -> Result<()> {
    let rows: usize = kept.0.iter().product();
    let len: usize = reduced.0.iter().product();
    let (gx, gy) = ctx.grid(rows as u64)?;
    spec.insert(0, ("WG", softmax_wg(ctx).to_string()));
    let mut u = vec![u32_of("rows", rows)?, u32_of("length", len)?, gx, eps];
    u.extend([kept.0.len() as u32, reduced.0.len() as u32, 0, 0]);
    for v in [&kept.0, &kept.1, &reduced.0, &reduced.1] {
        push_block(&mut u, v, MAX_RANK)?;
    }
    launch(ctx, rec, "reduce", entry, spec, &u, &[(1, x), (3, out)], (gx, gy, 1))
}

/// The kept and the reduced axes of a reduction over `axes` (any set) of a contiguous tensor of `shape`, each as
/// (dims, strides) with size-1 axes dropped and neighbours contiguous in memory merged. The kept axes, in order,
/// number the output rows.
fn reduce_layout(shape: &[usize], axes: &[usize]) -> Result<[(Vec<usize>, Vec<usize>); 2]> {
    if axes.is_empty() || axes.iter().any(|a| *a >= shape.len()) {
        return Err(Error::new(format!("webgpu: reduction over axes {axes:?} of {shape:?}")));
    }
    let st = contiguous_strides(shape);
    let mut groups: [(Vec<usize>, Vec<usize>); 2] = Default::default();
    for i in 0..shape.len() {
        if shape[i] == 1 {
            continue;
        }
        let g = &mut groups[axes.contains(&i) as usize];
        if let (Some(ls), Some(lt)) = (g.0.last_mut(), g.1.last_mut()) {
            if *lt == st[i] * shape[i] {
                *ls *= shape[i];
                *lt = st[i];
                continue;
            }
        }
        g.0.push(shape[i]);
        g.1.push(st[i]);
    }
    Ok(groups)
}

/// Records Pad / Tile: every output element from its input coordinates, `mode` (0 constant `value`, 1 reflect,
/// 2 edge, 3 wrap) outside the input, `before` the leading pad per axis.
fn remap(
    ctx: &Context,
    rec: &mut Recorder,
    a: &GpuTensor,
    out: &GpuTensor,
    mode: u32,
    value: u32,
    before: &[usize],
) -> Result<()> {
    let n = out.len();
    let (gx, gy) = grid_for(ctx, n)?;
    let mut u = vec![u32_of("length", n)?, out.shape.len() as u32, gx, mode, value, 0, 0, 0];
    for v in [&out.shape[..], &contiguous_strides(&a.shape), &a.shape[..], before] {
        push_block(&mut u, v, MAX_RANK)?;
    }
    launch(ctx, rec, "layout", "remap_main", vec![], &u, &[(1, a), (3, out)], (gx, gy, 1))
}

/// Records `out[c] = a[a_off + Σ c·sa]` over `out`'s shape (contiguous) with signed input strides (a negative
/// one walks backwards: u32 arithmetic wraps, and every address it reaches is in range).
fn strided_copy_signed(
    ctx: &Context,
    rec: &mut Recorder,
    a: &GpuTensor,
    a_off: usize,
    sa: &[i64],
    out: &GpuTensor,
) -> Result<()> {
    let n = out.len();
    if n == 0 {
        return Ok(());
    }
    let keep: Vec<usize> = (0..out.shape.len()).filter(|i| out.shape[*i] != 1).collect();
    let shape: Vec<usize> = keep.iter().map(|i| out.shape[*i]).collect();
    let so = contiguous_strides(&shape);
    let (gx, gy) = grid_for(ctx, n)?;
    let mut u = vec![u32_of("length", n)?, shape.len() as u32, gx, u32_of("offset", a_off)?, 0, 0, 0, 0];
    push_block(&mut u, &shape, MAX_RANK)?;
    let mut block = [0u32; MAX_RANK];
    for (b, i) in block.iter_mut().zip(&keep) {
        let s = sa[*i];
        if s.unsigned_abs() > u32::MAX as u64 {
            return Err(Error::new(format!("webgpu: stride {s} exceeds 32-bit indexing")));
        }
        *b = s as u32;
    }
    if a.dt == DatumType::F16 {
        let sa: Vec<i64> = keep.iter().map(|i| sa[*i]).collect();
        return crate::f16::strided_copy(ctx, rec, a, a_off, &sa, out, 0, &so, &shape);
    }
    u.extend(block);
    push_block(&mut u, &so, MAX_RANK)?;
    u.extend([0u32; 8]);
    launch(ctx, rec, "layout", "copy_main", vec![], &u, &[(1, a), (3, out)], (gx, gy, 1))
}

/// Output axis j takes input axis `perm[j]` when axis `from` moves to `to`.
fn move_axis_perm(rank: usize, from: usize, to: usize) -> Result<Vec<usize>> {
    if from >= rank || to >= rank {
        return Err(Error::new(format!("webgpu: moving axis {from} to {to} in rank {rank}")));
    }
    let mut perm: Vec<usize> = (0..rank).collect();
    let a = perm.remove(from);
    perm.insert(to, a);
    Ok(perm)
}

/// Values a [`Kernel::DimValues`] holds (its uniform's 32 spare words).
pub const MAX_DIM_VALUES: usize = 32;

/// A dim's i64 value in this run (i32 on the GPU, like every i64).
pub(crate) fn dim_i64(d: &TDim, syms: &SymbolValues) -> Result<i64> {
    let v = d.eval_to_i64(syms).map_err(|_| Error::new(format!("webgpu: dim {d} has no value")))?;
    i32::try_from(v).map_err(|_| Error::new(format!("webgpu: dim {d} = {v} does not fit the GPU's i32")))?;
    Ok(v)
}

pub(crate) fn eval_dim(d: &TDim, syms: &SymbolValues) -> Result<usize> {
    d.eval_to_i64(syms)
        .ok()
        .and_then(|v| usize::try_from(v).ok())
        .ok_or_else(|| Error::new(format!("webgpu: dim {d} has no value in this run")))
}

/// Records `out[o_off + Σ c·so] = a[a_off + Σ c·sa]` over `shape` (4-byte elements; f16: crate::f16).
#[allow(clippy::too_many_arguments)]
pub(crate) fn strided_copy(
    ctx: &Context,
    rec: &mut Recorder,
    a: &GpuTensor,
    a_off: usize,
    sa: &[usize],
    out: &GpuTensor,
    o_off: usize,
    so: &[usize],
    shape: &[usize],
) -> Result<()> {
    let n: usize = shape.iter().product();
    if n == 0 {
        return Ok(());
    }
    let (shape, sa, so) = collapse(shape, sa, so);
    if a.dt == DatumType::F16 {
        let sa: Vec<i64> = sa.iter().map(|s| *s as i64).collect();
        return crate::f16::strided_copy(ctx, rec, a, a_off, &sa, out, o_off, &so, &shape);
    }
    let (gx, gy) = grid_for(ctx, n)?;
    let mut u = vec![u32_of("length", n)?, shape.len() as u32, gx, u32_of("offset", a_off)?, u32_of("offset", o_off)?];
    u.extend([0, 0, 0]);
    for v in [&shape, &sa, &so, &vec![]] {
        push_block(&mut u, v, MAX_RANK)?;
    }
    launch(ctx, rec, "layout", "copy_main", vec![], &u, &[(1, a), (3, out)], (gx, gy, 1))
}

/// Copies `src`, `rows` rows of `cols` 4-byte words (contiguous), into `dst` at word `dst_off`, row `r` at
/// `dst_off + r·dst_stride`: one dispatch, submitted. (The streamed upload of a transposed weight: a block of the
/// transposed matrix, written once to a scratch buffer, lands in its columns; float16 halves go as word pairs.)
pub fn copy_rows_of_words(
    ctx: &Context,
    src: Arc<wgpu::Buffer>,
    dst: Arc<wgpu::Buffer>,
    rows: usize,
    cols: usize,
    dst_stride: usize,
    dst_off: usize,
) -> Result<()> {
    let words = (dst.size() / 4) as usize;
    let last = dst_off + rows.saturating_sub(1) * dst_stride + cols;
    if rows * cols == 0 || last > words || ((rows * cols * 4) as u64) > src.size() {
        return Err(Error::new(format!(
            "webgpu: copying {rows} rows of {cols} words to word {dst_off} (stride {dst_stride}) of {words}"
        )));
    }
    let mut rec = Recorder::default();
    let a = GpuTensor::new(src, &[rows, cols], DatumType::U32);
    let out = GpuTensor::new(dst, &[words], DatumType::U32);
    strided_copy(ctx, &mut rec, &a, 0, &[cols, 1], &out, dst_off, &[dst_stride, 1], &[rows, cols])?;
    // (no readback: the queue runs it before anything submitted later)
    let _ = rec.submit(ctx)?;
    Ok(())
}

fn softmax_wg(ctx: &Context) -> u32 {
    let mut wg = 256u32;
    while wg > ctx.caps.max_invocations.max(1) {
        wg /= 2;
    }
    wg
}
