//! The kernel families: WGSL text (one file per family, specialised by substitution), runtime parameters as
//! uniforms, and the host side that records a dispatch.

use tract_onnx::prelude::*;

use crate::context::{Context, PipelineKey};
use crate::exec::{Binding, GpuTensor, Recorder};
use crate::{Error, Result};

pub const ELEMENTWISE_WGSL: &str = include_str!("kernels/elementwise.wgsl");
pub const MATMUL_WGSL: &str = include_str!("kernels/matmul.wgsl");
pub const SOFTMAX_WGSL: &str = include_str!("kernels/softmax.wgsl");

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
}

impl UnaryOp {
    pub const ALL: [UnaryOp; 14] = [
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
            _ => return None,
        })
    }
    fn expr(&self) -> &'static str {
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
        }
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
}

impl BinaryOp {
    pub const ALL: [BinaryOp; 8] = [
        BinaryOp::Add,
        BinaryOp::Sub,
        BinaryOp::SubF,
        BinaryOp::Mul,
        BinaryOp::Div,
        BinaryOp::Max,
        BinaryOp::Min,
        BinaryOp::Pow,
    ];
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
            _ => return None,
        })
    }
    fn expr(&self) -> &'static str {
        match self {
            BinaryOp::Add => "x + y",
            BinaryOp::Sub => "x - y",
            BinaryOp::SubF => "y - x",
            BinaryOp::Mul => "x * y",
            BinaryOp::Div => "x / y",
            BinaryOp::Max => "max(x, y)",
            BinaryOp::Min => "min(x, y)",
            // WGSL's pow is undefined for x < 0; integer exponents keep their sign like the CPU's powf.
            BinaryOp::Pow => {
                "select(pow(abs(x), y) * select(1.0, -1.0, x < 0.0 && fract(y * 0.5) != 0.0), pow(x, y), x >= 0.0 || fract(y) != 0.0)"
            }
        }
    }
}

/// A shape-only change of a contiguous tensor: no kernel, the output shares the input's buffer.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum View {
    AddAxis(usize),
    RmAxis(usize),
    /// `from_len` dims at `at` become `to` (a `None`: the one dim inferred from the element count).
    Reshape {
        at: usize,
        from_len: usize,
        to: Vec<Option<usize>>,
    },
}

impl View {
    pub fn output_shape(&self, input: &[usize]) -> Result<TVec<usize>> {
        let bad = || Error::new(format!("webgpu: view {self:?} does not apply to shape {input:?}"));
        let mut s: TVec<usize> = input.into();
        match self {
            View::AddAxis(a) if *a <= s.len() => s.insert(*a, 1),
            View::RmAxis(a) if *a < s.len() && s[*a] == 1 => {
                s.remove(*a);
            }
            View::Reshape { at, from_len, to } if at + from_len <= s.len() => {
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
        }
    }

    pub fn arity(&self) -> usize {
        match self {
            Kernel::Unary(_) | Kernel::Softmax { .. } | Kernel::View(_) => 1,
            Kernel::Binary(_) | Kernel::MatMul { .. } => 2,
        }
    }

    /// The output shape for concrete input shapes.
    pub fn output_shape(&self, inputs: &[&[usize]]) -> Result<TVec<usize>> {
        if inputs.len() != self.arity() {
            return Err(Error::new(format!(
                "webgpu: {} expects {} inputs, got {}",
                self.name(),
                self.arity(),
                inputs.len()
            )));
        }
        match self {
            Kernel::Unary(_) | Kernel::Softmax { .. } => Ok(inputs[0].into()),
            Kernel::View(v) => v.output_shape(inputs[0]),
            Kernel::Binary(_) => broadcast(inputs[0], inputs[1]),
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
    pub fn encode(&self, ctx: &Context, rec: &mut Recorder, inputs: &[&GpuTensor]) -> Result<GpuTensor> {
        let shapes: Vec<&[usize]> = inputs.iter().map(|t| &*t.shape).collect();
        let out_shape = self.output_shape(&shapes)?;
        for t in inputs {
            if t.dt != DatumType::F32 {
                return Err(Error::new(format!("webgpu: {} runs on f32, got {:?}", self.name(), t.dt)));
            }
        }
        if let Kernel::View(_) = self {
            return Ok(GpuTensor { buffer: inputs[0].buffer.clone(), shape: out_shape, dt: inputs[0].dt });
        }
        let out = rec.alloc(ctx, &out_shape, DatumType::F32)?;
        if out.is_empty() {
            return Ok(out);
        }
        match self {
            Kernel::Unary(op) => {
                let n = out.len();
                let (gx, gy) = ctx.grid((n as u64).div_ceil(WG as u64))?;
                let key =
                    PipelineKey { family: "elementwise", entry: "unary_main", spec: vec![("UNARY", op.expr().into())] };
                let pipeline = ctx.pipeline(&key, || elementwise_source(op.expr(), "x"))?;
                let mut u = vec![u32_of("length", n)?, 1, gx, 0];
                u.extend([0u32; 24]);
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
                let key = PipelineKey {
                    family: "elementwise",
                    entry: "binary_main",
                    spec: vec![("BINARY", op.expr().into())],
                };
                let pipeline = ctx.pipeline(&key, || elementwise_source("x", op.expr()))?;
                let mut u = vec![u32_of("length", n)?, shape.len() as u32, gx, 0];
                for v in [&shape, &sa, &sb] {
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
