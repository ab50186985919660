//! The kernel families: WGSL text (one file per family, specialised by substitution), runtime parameters as
//! uniforms, and the host side that records a dispatch.

use tract_onnx::prelude::*;

use crate::context::{Context, PipelineKey};
use crate::exec::{Binding, GpuTensor, Recorder};
use crate::{Error, Result};

pub const ELEMENTWISE_WGSL: &str = include_str!("kernels/elementwise.wgsl");
pub const MATMUL_WGSL: &str = include_str!("kernels/matmul.wgsl");
pub const SOFTMAX_WGSL: &str = include_str!("kernels/softmax.wgsl");
pub const LAYOUT_WGSL: &str = include_str!("kernels/layout.wgsl");
pub const REDUCE_WGSL: &str = include_str!("kernels/reduce.wgsl");

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
    fn expr(&self) -> String {
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
    fn expr(&self) -> String {
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
        _ => None,
    }
}

/// Whether [`UnaryOp::Cast`] has a kernel from `from` to `to`.
pub fn cast_supported(from: DatumType, to: DatumType) -> bool {
    gpu_repr(from).is_some() && gpu_repr(to).is_some()
}

fn cast_expr(from: DatumType, to: DatumType) -> &'static str {
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
    },
    /// Softmax over one axis (LogSoftmax when `log`).
    Softmax {
        axis: usize,
        log: bool,
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
}

/// The reductions of [`Kernel::Reduce`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    Sum,
    Prod,
    Max,
    Min,
    MeanOfSquares,
}

impl ReduceOp {
    /// (init, map of `v`, combine of `a` and `b`, finish of `acc` and `n`)
    fn exprs(&self) -> [&'static str; 4] {
        match self {
            ReduceOp::Sum => ["0.0", "v", "a + b", "acc"],
            ReduceOp::Prod => ["1.0", "v", "a * b", "acc"],
            ReduceOp::Max => ["-3.40282346e38", "v", "max(a, b)", "acc"],
            ReduceOp::Min => ["3.40282346e38", "v", "min(a, b)", "acc"],
            ReduceOp::MeanOfSquares => ["0.0", "v * v", "a + b", "acc / max(n, 1.0)"],
        }
    }
}

const WG: u32 = 256;

fn words(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|w| w.to_le_bytes()).collect()
}

fn u32_of(what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::new(format!("webgpu: {what} {v} exceeds 32-bit indexing")))
}

fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
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
fn broadcast_strides(shape: &[usize], out: &[usize]) -> Vec<usize> {
    let cs = contiguous_strides(shape);
    let pad = out.len() - shape.len();
    (0..out.len()).map(|i| if i < pad || shape[i - pad] == 1 { 0 } else { cs[i - pad] }).collect()
}

/// [`collapse`] for any number of operands.
fn collapse_n(shape: &[usize], strides: &[Vec<usize>]) -> (Vec<usize>, Vec<Vec<usize>>) {
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
        }
    }

    /// The output element type for inputs of `dts`, or `None` when the kernel does not take them. Bools live on
    /// the GPU as f32 0.0 / 1.0.
    pub fn output_dt(&self, dts: &[DatumType]) -> Option<DatumType> {
        use DatumType::{Bool, F32};
        let all = |dt: DatumType| dts.iter().all(|d| *d == dt);
        match self {
            Kernel::Unary(UnaryOp::IsNan) => all(F32).then_some(Bool),
            Kernel::Unary(UnaryOp::Not) => all(Bool).then_some(Bool),
            Kernel::Unary(UnaryOp::Cast { from, to }) => (all(*from) && cast_supported(*from, *to)).then_some(*to),
            Kernel::Binary(op) if op.is_comparison() => all(F32).then_some(Bool),
            Kernel::Binary(op) if op.is_logical() => all(Bool).then_some(Bool),
            Kernel::View(_)
            | Kernel::MoveAxis { .. }
            | Kernel::Broadcast { .. }
            | Kernel::Slice { .. }
            | Kernel::Concat { .. } => {
                let dt = *dts.first()?;
                (matches!(dt, F32 | Bool) && all(dt)).then_some(dt)
            }
            Kernel::Gather { .. } => match dts {
                [d, DatumType::I64 | DatumType::I32] if matches!(*d, F32 | Bool) => Some(*d),
                _ => None,
            },
            Kernel::Where => match dts {
                [Bool, t, f] if t == f && matches!(*t, F32 | Bool) => Some(*t),
                _ => None,
            },
            _ => all(F32).then_some(F32),
        }
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
            | Kernel::RmsNorm { .. } => 1,
            Kernel::Binary(_) | Kernel::MatMul { .. } | Kernel::Gather { .. } => 2,
            Kernel::Where => 3,
            Kernel::Concat { inputs, .. } => *inputs,
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
            Kernel::Unary(_) | Kernel::Softmax { .. } | Kernel::RmsNorm { .. } => Ok(inputs[0].into()),
            Kernel::View(v) => v.output_shape(inputs[0], syms),
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
            Kernel::Gather { axis } => {
                let (d, i) = (inputs[0], inputs[1]);
                if *axis >= d.len() {
                    return Err(Error::new(format!("webgpu: gather axis {axis} out of range for {d:?}")));
                }
                let mut s: TVec<usize> = d[..*axis].into();
                s.extend(i.iter().copied());
                s.extend(d[axis + 1..].iter().copied());
                Ok(s)
            }
            Kernel::MatMul { transpose_a, transpose_b, transpose_c } => {
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

    /// Records the kernel on `inputs`, allocating its output from the recorder's pool.
    pub fn encode(
        &self,
        ctx: &Context,
        rec: &mut Recorder,
        inputs: &[&GpuTensor],
        syms: &SymbolValues,
    ) -> Result<GpuTensor> {
        let shapes: Vec<&[usize]> = inputs.iter().map(|t| &*t.shape).collect();
        let out_shape = self.output_shape(&shapes, syms)?;
        let dts: Vec<DatumType> = inputs.iter().map(|t| t.dt).collect();
        let out_dt = self
            .output_dt(&dts)
            .ok_or_else(|| Error::new(format!("webgpu: {} does not run on {dts:?}", self.name())))?;
        if let Kernel::View(_) = self {
            return Ok(GpuTensor { buffer: inputs[0].buffer.clone(), shape: out_shape, dt: inputs[0].dt });
        }
        let out = rec.alloc(ctx, &out_shape, out_dt)?;
        if out.is_empty() {
            return Ok(out);
        }
        match self {
            Kernel::Unary(op) => {
                let n = out.len();
                let (gx, gy) = ctx.grid((n as u64).div_ceil(WG as u64))?;
                let key = PipelineKey { family: "elementwise", entry: "unary_main", spec: vec![("UNARY", op.expr())] };
                let pipeline = ctx.pipeline(&key, || elementwise_source(&op.expr(), "x"))?;
                let mut u = vec![u32_of("length", n)?, 1, gx, 0];
                u.extend([0u32; 32]);
                rec.dispatch(
                    pipeline,
                    words(&u),
                    vec![
                        Binding { index: 1, buffer: inputs[0].buffer.clone() },
                        Binding { index: 3, buffer: out.buffer.clone() },
                    ],
                    (gx, gy, 1),
                );
            }
            Kernel::Binary(op) => {
                let n = out.len();
                let sa = broadcast_strides(&inputs[0].shape, &out_shape);
                let sb = broadcast_strides(&inputs[1].shape, &out_shape);
                let (shape, sa, sb) = collapse(&out_shape, &sa, &sb);
                if shape.len() > MAX_RANK {
                    return Err(Error::new(format!(
                        "webgpu: rank {} exceeds the elementwise kernel's {MAX_RANK}",
                        shape.len()
                    )));
                }
                let (gx, gy) = ctx.grid((n as u64).div_ceil(WG as u64))?;
                let key =
                    PipelineKey { family: "elementwise", entry: "binary_main", spec: vec![("BINARY", op.expr())] };
                let pipeline = ctx.pipeline(&key, || elementwise_source("x", &op.expr()))?;
                let mut u = vec![u32_of("length", n)?, shape.len() as u32, gx, 0];
                for v in [&shape, &sa, &sb] {
                    let mut block = [0u32; 8];
                    for (i, x) in v.iter().enumerate() {
                        block[i] = u32_of("dim", *x)?;
                    }
                    u.extend(block);
                }
                u.extend([0u32; 8]);
                rec.dispatch(
                    pipeline,
                    words(&u),
                    vec![
                        Binding { index: 1, buffer: inputs[0].buffer.clone() },
                        Binding { index: 2, buffer: inputs[1].buffer.clone() },
                        Binding { index: 3, buffer: out.buffer.clone() },
                    ],
                    (gx, gy, 1),
                );
            }
            Kernel::Softmax { axis, log } => {
                let shape = &inputs[0].shape;
                if *axis >= shape.len() {
                    return Err(Error::new(format!("webgpu: softmax axis {axis} out of range for {shape:?}")));
                }
                let len = shape[*axis];
                let inner: usize = shape[axis + 1..].iter().product();
                let rows = out.len() / len.max(1);
                let (gx, gy) = ctx.grid(rows as u64)?;
                let wg = softmax_wg(ctx);
                let key = PipelineKey {
                    family: "softmax",
                    entry: "main",
                    spec: vec![("WG", wg.to_string()), ("LOG", log.to_string())],
                };
                let pipeline = ctx.pipeline(&key, || {
                    SOFTMAX_WGSL.replace("{{WG}}", &wg.to_string()).replace("{{LOG}}", &log.to_string())
                })?;
                let u = vec![u32_of("rows", rows)?, u32_of("length", len)?, u32_of("length", inner)?, gx];
                rec.dispatch(
                    pipeline,
                    words(&u),
                    vec![
                        Binding { index: 1, buffer: inputs[0].buffer.clone() },
                        Binding { index: 3, buffer: out.buffer.clone() },
                    ],
                    (gx, gy, 1),
                );
            }
            Kernel::View(_) => {}
            Kernel::Gather { axis } => {
                let d = &inputs[0].shape;
                let n = out.len();
                let inner: usize = d[axis + 1..].iter().product();
                let (gx, gy) = ctx.grid((n as u64).div_ceil(WG as u64))?;
                let key = PipelineKey { family: "layout", entry: "gather_main", spec: vec![] };
                let pipeline = ctx.pipeline(&key, || LAYOUT_WGSL.replace("{{WG}}", &WG.to_string()))?;
                let mut u = vec![
                    u32_of("length", n)?,
                    0,
                    gx,
                    u32_of("length", d[*axis])?,
                    u32_of("length", inner)?,
                    u32_of("length", inputs[1].len())?,
                    0,
                    0,
                ];
                u.extend([0u32; 24]);
                rec.dispatch(
                    pipeline,
                    words(&u),
                    vec![
                        Binding { index: 1, buffer: inputs[0].buffer.clone() },
                        Binding { index: 2, buffer: inputs[1].buffer.clone() },
                        Binding { index: 3, buffer: out.buffer.clone() },
                    ],
                    (gx, gy, 1),
                );
            }
            Kernel::Where => {
                let n = out.len();
                let strides: Vec<Vec<usize>> =
                    [inputs[1], inputs[2], inputs[0]].iter().map(|t| broadcast_strides(&t.shape, &out_shape)).collect();
                let (shape, strides) = collapse_n(&out_shape, &strides);
                if shape.len() > MAX_RANK {
                    return Err(Error::new(format!("webgpu: rank {} exceeds Where's {MAX_RANK}", shape.len())));
                }
                let (gx, gy) = ctx.grid((n as u64).div_ceil(WG as u64))?;
                let key = PipelineKey { family: "elementwise", entry: "where_main", spec: vec![] };
                let pipeline = ctx.pipeline(&key, || elementwise_source("x", "x"))?;
                let mut u = vec![u32_of("length", n)?, shape.len() as u32, gx, 0];
                for v in std::iter::once(&shape).chain(strides.iter()) {
                    let mut block = [0u32; 8];
                    for (i, x) in v.iter().enumerate() {
                        block[i] = u32_of("dim", *x)?;
                    }
                    u.extend(block);
                }
                rec.dispatch(
                    pipeline,
                    words(&u),
                    vec![
                        Binding { index: 1, buffer: inputs[1].buffer.clone() },
                        Binding { index: 2, buffer: inputs[2].buffer.clone() },
                        Binding { index: 3, buffer: out.buffer.clone() },
                        Binding { index: 4, buffer: inputs[0].buffer.clone() },
                    ],
                    (gx, gy, 1),
                );
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
                        strided_copy(
                            ctx,
                            rec,
                            t,
                            0,
                            &contiguous_strides(&t.shape),
                            &out,
                            at * so[*axis],
                            &so,
                            &t.shape,
                        )?;
                    }
                    at += t.shape[*axis];
                }
            }
            Kernel::Reduce { axes, op } => {
                let (rows, len, inner) = reduce_geometry(&inputs[0].shape, axes)?;
                let [init, map, combine, finish] = op.exprs();
                self.row_dispatch(
                    ctx,
                    rec,
                    inputs[0],
                    &out,
                    "reduce_main",
                    [init, map, combine, finish],
                    (rows, len, inner),
                    0,
                )?;
            }
            Kernel::RmsNorm { axis, eps } => {
                let (rows, len, inner) = reduce_geometry(&inputs[0].shape, &[*axis])?;
                let e = ["0.0", "v * v", "a + b", "acc"];
                self.row_dispatch(ctx, rec, inputs[0], &out, "rms_main", e, (rows, len, inner), *eps)?;
            }
            Kernel::MatMul { transpose_a, transpose_b, transpose_c } => {
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
                let (entry, gx, gy) = if m == 1 {
                    if b_sn == 1 {
                        let (gx, gy) = ctx.grid((n as u64).div_ceil(256))?;
                        ("mv_rows", gx, gy)
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
                let key = PipelineKey { family: "matmul", entry, spec: vec![] };
                let pipeline = ctx.pipeline(&key, || MATMUL_WGSL.to_string())?;
                let mut u = vec![
                    u32_of("m", m)?,
                    u32_of("n", n)?,
                    u32_of("k", k)?,
                    bshape.len() as u32,
                    u32_of("stride", a_sm)?,
                    u32_of("stride", a_sk)?,
                    u32_of("stride", b_sk)?,
                    u32_of("stride", b_sn)?,
                    u32_of("stride", c_sm)?,
                    u32_of("stride", c_sn)?,
                    gx,
                    0,
                ];
                for v in [&bshape, &abs, &bbs, &cbs] {
                    let mut block = [0u32; 4];
                    for (i, x) in v.iter().enumerate() {
                        block[i] = u32_of("batch", *x)?;
                    }
                    u.extend(block);
                }
                rec.dispatch(
                    pipeline,
                    words(&u),
                    vec![
                        Binding { index: 1, buffer: inputs[0].buffer.clone() },
                        Binding { index: 2, buffer: inputs[1].buffer.clone() },
                        Binding { index: 3, buffer: out.buffer.clone() },
                    ],
                    (gx, gy, batch.max(1) as u32),
                );
            }
        }
        Ok(out)
    }
}

impl Kernel {
    #[allow(clippy::too_many_arguments)]
    fn row_dispatch(
        &self,
        ctx: &Context,
        rec: &mut Recorder,
        x: &GpuTensor,
        out: &GpuTensor,
        entry: &'static str,
        exprs: [&str; 4],
        (rows, len, inner): (usize, usize, usize),
        eps: u32,
    ) -> Result<()> {
        let (gx, gy) = ctx.grid(rows as u64)?;
        let wg = softmax_wg(ctx);
        let [init, map, combine, finish] = exprs;
        let key = PipelineKey {
            family: "reduce",
            entry,
            spec: vec![
                ("WG", wg.to_string()),
                ("INIT", init.into()),
                ("MAP", map.into()),
                ("COMBINE", combine.into()),
                ("FINISH", finish.into()),
            ],
        };
        let pipeline = ctx.pipeline(&key, || {
            REDUCE_WGSL
                .replace("{{WG}}", &wg.to_string())
                .replace("{{INIT}}", init)
                .replace("{{MAP}}", map)
                .replace("{{COMBINE}}", combine)
                .replace("{{FINISH}}", finish)
        })?;
        let u = vec![u32_of("rows", rows)?, u32_of("length", len)?, u32_of("length", inner)?, gx, eps, 0, 0, 0];
        rec.dispatch(
            pipeline,
            words(&u),
            vec![Binding { index: 1, buffer: x.buffer.clone() }, Binding { index: 3, buffer: out.buffer.clone() }],
            (gx, gy, 1),
        );
        Ok(())
    }
}

/// (rows, len, inner) of a reduction over adjacent `axes` (size-1 axes in between are fine).
fn reduce_geometry(shape: &[usize], axes: &[usize]) -> Result<(usize, usize, usize)> {
    let (Some(lo), Some(hi)) = (axes.iter().min(), axes.iter().max()) else {
        return Err(Error::new("webgpu: a reduction over no axis"));
    };
    if *hi >= shape.len() || (*lo..=*hi).any(|a| !axes.contains(&a) && shape[a] != 1) {
        return Err(Error::new(format!("webgpu: reduction over axes {axes:?} of {shape:?}")));
    }
    let outer: usize = shape[..*lo].iter().product();
    let len: usize = shape[*lo..=*hi].iter().product();
    let inner: usize = shape[hi + 1..].iter().product();
    Ok((outer * inner, len, inner))
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

fn eval_dim(d: &TDim, syms: &SymbolValues) -> Result<usize> {
    d.eval_to_i64(syms)
        .ok()
        .and_then(|v| usize::try_from(v).ok())
        .ok_or_else(|| Error::new(format!("webgpu: dim {d} has no value in this run")))
}

/// Records `out[o_off + Σ c·so] = a[a_off + Σ c·sa]` over `shape` (4-byte elements).
#[allow(clippy::too_many_arguments)]
fn strided_copy(
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
    if shape.len() > MAX_RANK {
        return Err(Error::new(format!("webgpu: rank {} exceeds the copy kernel's {MAX_RANK}", shape.len())));
    }
    let (gx, gy) = ctx.grid((n as u64).div_ceil(WG as u64))?;
    let key = PipelineKey { family: "layout", entry: "copy_main", spec: vec![] };
    let pipeline = ctx.pipeline(&key, || LAYOUT_WGSL.replace("{{WG}}", &WG.to_string()))?;
    let mut u =
        vec![u32_of("length", n)?, shape.len() as u32, gx, u32_of("offset", a_off)?, u32_of("offset", o_off)?, 0, 0, 0];
    for v in [&shape, &sa, &so] {
        let mut block = [0u32; 8];
        for (i, x) in v.iter().enumerate() {
            block[i] = u32_of("dim", *x)?;
        }
        u.extend(block);
    }
    rec.dispatch(
        pipeline,
        words(&u),
        vec![Binding { index: 1, buffer: a.buffer.clone() }, Binding { index: 3, buffer: out.buffer.clone() }],
        (gx, gy, 1),
    );
    Ok(())
}

fn softmax_wg(ctx: &Context) -> u32 {
    let mut wg = 256u32;
    while wg > ctx.caps.max_invocations.max(1) {
        wg /= 2;
    }
    wg
}

fn elementwise_source(unary: &str, binary: &str) -> String {
    ELEMENTWISE_WGSL.replace("{{WG}}", &WG.to_string()).replace("{{UNARY}}", unary).replace("{{BINARY}}", binary)
}
