//! Fused elementwise kernels: a tree of unary / binary / Where nodes (f32, bools as 0.0 / 1.0) computed in one
//! dispatch, each output element reading every external input once through its broadcast strides. The program is
//! the pipeline's specialisation; shapes and strides are uniforms, so a new length never recompiles.
//!
//! kiln-graph's fusion pass builds a [`FusedProgram`] from a group of lowered elementwise nodes and keeps the
//! replaced ops as a [`FusedChain`], the CPU reference (tract evaluates it like the nodes it replaced).

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;

use crate::context::{Context, PipelineKey};
use crate::exec::{Binding, GpuTensor, Recorder};
use crate::kernels::{
    broadcast_strides, collapse_n, u32_of, words, BinaryOp, UnaryOp, ELEMENTWISE_WGSL, MAX_RANK, PRELUDE_WGSL, WG,
};
use crate::{Error, Result};

/// External inputs a fused kernel may bind (with its output, within WebGPU's 8 storage buffers per stage).
pub const MAX_FUSED_INPUTS: usize = 6;
/// Steps a fused kernel may hold.
pub const MAX_FUSED_STEPS: usize = 32;

/// Where a step reads an operand: an external input (binding order) or an earlier step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Src {
    Input(u8),
    Step(u8),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Step {
    Unary(UnaryOp, Src),
    Binary(BinaryOp, Src, Src),
    /// cond ? a : b
    Where(Src, Src, Src),
}

/// The fused computation: `inputs` external tensors, `steps` in order, the last step is the output.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FusedProgram {
    pub inputs: usize,
    pub steps: Vec<Step>,
    /// The output element type (F32 or Bool).
    pub out_dt: DatumType,
    /// The pipeline's specialisation, written once here rather than on every run's encode.
    spec: String,
}

fn src(s: Src) -> String {
    match s {
        Src::Input(i) => format!("v{i}"),
        Src::Step(i) => format!("t{i}"),
    }
}

impl FusedProgram {
    pub fn new(inputs: usize, steps: Vec<Step>, out_dt: DatumType) -> FusedProgram {
        let spec = format!("{inputs}:{steps:?}:{out_dt:?}");
        FusedProgram { inputs, steps, out_dt, spec }
    }

    pub fn name(&self) -> String {
        let names: Vec<String> = self
            .steps
            .iter()
            .map(|s| match s {
                Step::Unary(op, _) => format!("{op:?}"),
                Step::Binary(op, _, _) => format!("{op:?}"),
                Step::Where(..) => "Where".into(),
            })
            .collect();
        format!("Fused({})", names.join(","))
    }

    /// Whether the program is well formed: sources in range, steps only read earlier steps, within the limits.
    pub fn check(&self) -> Result<()> {
        if self.inputs == 0 || self.inputs > MAX_FUSED_INPUTS || self.steps.is_empty() {
            return Err(Error::new(format!("webgpu: fused kernel with {} inputs", self.inputs)));
        }
        if self.steps.len() > MAX_FUSED_STEPS {
            return Err(Error::new(format!("webgpu: fused kernel with {} steps", self.steps.len())));
        }
        for (k, s) in self.steps.iter().enumerate() {
            let srcs: Vec<Src> = match *s {
                Step::Unary(_, a) => vec![a],
                Step::Binary(_, a, b) => vec![a, b],
                Step::Where(c, a, b) => vec![c, a, b],
            };
            for x in srcs {
                let ok = match x {
                    Src::Input(i) => (i as usize) < self.inputs,
                    Src::Step(i) => (i as usize) < k,
                };
                if !ok {
                    return Err(Error::new(format!("webgpu: fused step {k} reads {x:?}")));
                }
            }
        }
        Ok(())
    }

    /// The WGSL text: the elementwise family's helper functions, one function per step, the entry point.
    pub fn source(&self) -> String {
        let k = self.inputs;
        let mut s = String::new();
        s.push_str(&format!(
            "struct Params {{\n    n: u32,\n    rank: u32,\n    groups_x: u32,\n    _pad: u32,\n    \
             shape: array<vec4<u32>, 2>,\n    strides: array<vec4<u32>, {}>,\n}};\n\n",
            2 * k
        ));
        s.push_str("@group(0) @binding(0) var<uniform> p: Params;\n");
        for i in 0..k {
            s.push_str(&format!("@group(0) @binding({}) var<storage, read> in{i}: array<f32>;\n", i + 1));
        }
        s.push_str(&format!("@group(0) @binding({}) var<storage, read_write> out: array<f32>;\n\n", k + 1));
        s.push_str(&helpers());
        s.push('\n');
        for (n, step) in self.steps.iter().enumerate() {
            match step {
                Step::Unary(op, _) => {
                    s.push_str(&format!("fn step{n}(x: f32) -> f32 {{\n    return {};\n}}\n", op.expr()))
                }
                Step::Binary(op, _, _) => {
                    s.push_str(&format!("fn step{n}(x: f32, y: f32) -> f32 {{\n    return {};\n}}\n", op.expr()))
                }
                Step::Where(..) => {}
            }
        }
        s.push_str(&format!(
            "\n@compute @workgroup_size({WG})\nfn fused_main(@builtin(workgroup_id) wid: vec3<u32>, \
             @builtin(local_invocation_index) lid: u32) {{\n    let i = (wid.x + wid.y * p.groups_x) * {WG}u + lid;\n    \
             if (i >= p.n) {{\n        return;\n    }}\n    var rem = i;\n"
        ));
        for i in 0..k {
            s.push_str(&format!("    var o{i} = 0u;\n"));
        }
        s.push_str(
            "    for (var d = p.rank; d > 0u; d = d - 1u) {\n        let q = (d - 1u) / 4u;\n        \
             let r = (d - 1u) % 4u;\n        let dim = p.shape[q][r];\n        let c = rem % dim;\n        \
             rem = rem / dim;\n",
        );
        for i in 0..k {
            s.push_str(&format!("        o{i} = o{i} + c * p.strides[{}u + q][r];\n", 2 * i));
        }
        s.push_str("    }\n");
        for i in 0..k {
            s.push_str(&format!("    let v{i} = in{i}[o{i}];\n"));
        }
        for (n, step) in self.steps.iter().enumerate() {
            let e = match *step {
                Step::Unary(_, a) => format!("step{n}({})", src(a)),
                Step::Binary(_, a, b) => format!("step{n}({}, {})", src(a), src(b)),
                Step::Where(c, a, b) => format!("select({}, {}, {} != 0.0)", src(b), src(a), src(c)),
            };
            s.push_str(&format!("    let t{n} = {e};\n"));
        }
        s.push_str(&format!("    out[i] = t{};\n}}\n", self.steps.len() - 1));
        s
    }

    /// Records the fused kernel; the output has the broadcast shape of the inputs.
    pub fn encode(&self, ctx: &Context, rec: &mut Recorder, inputs: &[&GpuTensor]) -> Result<GpuTensor> {
        self.check()?;
        if inputs.len() != self.inputs {
            return Err(Error::new(format!(
                "webgpu: fused kernel expects {} inputs, got {}",
                self.inputs,
                inputs.len()
            )));
        }
        let mut out_shape: TVec<usize> = tvec![];
        for t in inputs {
            out_shape = crate::kernels::broadcast(&out_shape, &t.shape)?;
        }
        let out = rec.alloc(ctx, &out_shape, self.out_dt)?;
        if out.is_empty() {
            return Ok(out);
        }
        let strides: Vec<Vec<usize>> = inputs.iter().map(|t| broadcast_strides(&t.shape, &out_shape)).collect();
        let (shape, strides) = collapse_n(&out_shape, &strides);
        if shape.len() > MAX_RANK {
            return Err(Error::new(format!("webgpu: rank {} exceeds the fused kernel's {MAX_RANK}", shape.len())));
        }
        let n = out.len();
        let (gx, gy) = ctx.grid((n as u64).div_ceil(WG as u64))?;
        let key = PipelineKey { family: "fused", entry: "fused_main", spec: vec![("PROGRAM", self.spec.clone())] };
        let pipeline = ctx.pipeline(&key, || self.source())?;
        let mut u = vec![u32_of("length", n)?, shape.len() as u32, gx, 0];
        let mut block = [0u32; 8];
        for (i, x) in shape.iter().enumerate() {
            block[i] = u32_of("dim", *x)?;
        }
        u.extend(block);
        for st in &strides {
            let mut block = [0u32; 8];
            for (i, x) in st.iter().enumerate() {
                block[i] = u32_of("stride", *x)?;
            }
            u.extend(block);
        }
        let mut bindings: Vec<Binding> =
            inputs.iter().enumerate().map(|(i, t)| Binding { index: i as u32 + 1, buffer: t.buffer.clone() }).collect();
        bindings.push(Binding { index: self.inputs as u32 + 1, buffer: out.buffer.clone() });
        rec.dispatch(pipeline, words(&u), bindings, (gx, gy, 1), "fused_elementwise");
        Ok(out)
    }
}

/// The helper functions the step expressions use: the prelude (b2f, is_nan...) and the elementwise family's own
/// (erf_approx, tanh_safe, sigmoid_safe, pow_binary: elementwise.wgsl from `fn erf_approx` up to its op functions).
fn helpers() -> String {
    let start = ELEMENTWISE_WGSL.find("fn erf_approx").unwrap_or(0);
    let end = ELEMENTWISE_WGSL.find("fn op_unary").unwrap_or(ELEMENTWISE_WGSL.len());
    let own = ELEMENTWISE_WGSL.get(start..end.max(start)).unwrap_or("");
    format!("{}\n{own}", PRELUDE_WGSL.replace("{{WG}}", &WG.to_string()))
}

/// The CPU reference of a fused node: the replaced tract ops, evaluated in order; the node's outputs are the last
/// `outputs` steps' results.
#[derive(Debug, Clone)]
pub struct FusedChain {
    pub inputs: usize,
    /// Each replaced op with its operands.
    pub steps: Vec<(Box<dyn TypedOp>, Vec<Src>)>,
    pub outputs: usize,
}

impl PartialEq for FusedChain {
    fn eq(&self, other: &Self) -> bool {
        self.inputs == other.inputs
            && self.outputs == other.outputs
            && self.steps.len() == other.steps.len()
            && self.steps.iter().zip(&other.steps).all(|(a, b)| a.1 == b.1 && a.0.as_op() == b.0.as_op())
    }
}
impl Eq for FusedChain {}

impl Op for FusedChain {
    fn name(&self) -> StaticName {
        "FusedChain".into()
    }
    fn info(&self) -> TractResult<Vec<String>> {
        Ok(self.steps.iter().map(|(op, srcs)| format!("{} {srcs:?}", op.name())).collect())
    }
    op_as_typed_op!();
}

impl EvalOp for FusedChain {
    // like the GpuOp it sits in: never folded into a constant
    not_out_of_plan!();
    fn eval(&self, ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        ensure!(inputs.len() == self.inputs, "FusedChain expects {} inputs, got {}", self.inputs, inputs.len());
        let mut values: Vec<TValue> = vec![];
        for (op, srcs) in &self.steps {
            let mut args = tvec![];
            for s in srcs {
                args.push(
                    match *s {
                        Src::Input(i) => inputs.get(i as usize).cloned(),
                        Src::Step(i) => values.get(i as usize).cloned(),
                    }
                    .ok_or_else(|| format_err!("FusedChain: operand {s:?} out of range"))?,
                );
            }
            let mut out = op.eval(ctx, args)?;
            ensure!(!out.is_empty(), "FusedChain: {} gave no output", op.name());
            values.push(out.remove(0));
        }
        ensure!(
            (1..=values.len()).contains(&self.outputs),
            "FusedChain: {} outputs of {} steps",
            self.outputs,
            values.len()
        );
        Ok(values.split_off(values.len() - self.outputs).into())
    }
}

impl TypedOp for FusedChain {
    as_op!();
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let mut facts: Vec<TypedFact> = vec![];
        for (op, srcs) in &self.steps {
            let mut args: Vec<TypedFact> = vec![];
            for s in srcs {
                args.push(
                    match *s {
                        Src::Input(i) => inputs.get(i as usize).map(|f| (*f).clone()),
                        Src::Step(i) => facts.get(i as usize).cloned(),
                    }
                    .ok_or_else(|| format_err!("FusedChain: operand {s:?} out of range"))?,
                );
            }
            let refs: Vec<&TypedFact> = args.iter().collect();
            let mut out = op.output_facts(&refs)?;
            ensure!(!out.is_empty(), "FusedChain: {} gave no output fact", op.name());
            facts.push(out.remove(0));
        }
        ensure!(
            (1..=facts.len()).contains(&self.outputs),
            "FusedChain: {} outputs of {} steps",
            self.outputs,
            facts.len()
        );
        Ok(facts.split_off(facts.len() - self.outputs).into())
    }
}
