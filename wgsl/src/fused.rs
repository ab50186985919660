//! Fused elementwise kernels: a tree of unary / binary / Where nodes computed in one dispatch, each output element
//! reading every external input once through its broadcast strides. Values are 4-byte words as the GPU stores them
//! (f32; bools as 0.0 / 1.0; i64 and i32 as i32 bits): float ops compute on f32, integer ops ([`Step::BinaryInt`])
//! on the i32 bits, casts and Where move words. Besides the external inputs a program reads:
//! - leaves ([`Leaf`]): kiln's DimRange / DimValues seen through views — `start + step · offset` at the element's
//!   offset in the leaf's own (contiguous) shape, start and step from the run's symbols (no buffer, no dispatch);
//! - gathers ([`Step::Gather`]): an input with one non-unit axis read at an index another step computes (an
//!   attention mask's padding looked up per key position), then unary steps on the word read.
//!
//! The program is the pipeline's specialisation; shapes, strides and leaf values are uniforms, so a new length never
//! recompiles.
//!
//! kiln-graph's fusion pass builds a [`FusedProgram`] from a group of lowered elementwise nodes and keeps the
//! replaced ops as a [`FusedChain`], the CPU reference (tract evaluates it like the nodes it replaced).

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;

use crate::context::{Context, PipelineKey};
use crate::exec::{Binding, GpuTensor, Recorder};
use crate::kernels::{
    broadcast, broadcast_strides, collapse_n, dim_i64, eval_dim, u32_of, words, BinaryOp, UnaryOp, ELEMENTWISE_WGSL,
    MAX_RANK, PRELUDE_WGSL, WG,
};
use crate::{Error, Result};

/// External inputs a fused kernel may bind (with its output, within WebGPU's 8 storage buffers per stage).
pub const MAX_FUSED_INPUTS: usize = 6;
/// Steps a fused kernel may hold.
pub const MAX_FUSED_STEPS: usize = 32;
/// Leaves a fused kernel may hold.
pub const MAX_FUSED_LEAVES: usize = 8;

/// Where a step reads an operand: an external input (binding order), an earlier step, or a leaf (GPU programs only:
/// a [`FusedChain`] reads leaves as steps).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Src {
    Input(u8),
    Step(u8),
    Leaf(u8),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Step {
    /// On the f32 value (casts: on the word, any of the four representations).
    Unary(UnaryOp, Src),
    /// On f32 values (floats and bools).
    Binary(BinaryOp, Src, Src),
    /// On i32 values (i64 / i32 words; comparisons give bools).
    BinaryInt(BinaryOp, Src, Src),
    /// cond ? a : b, on the words
    Where(Src, Src, Src),
    /// The word of input `.0` (one non-unit axis, read flat) at the index `.1` holds (i32 bits; negative counts from
    /// the end, out of range is clamped like the Gather kernel).
    Gather(u8, Src),
}

/// A value computed from the element's offset `o` in the leaf's shape: `start + step · o`, as an i32 word (i64 on
/// the host). kiln's DimRange (`len` values) and DimValues (one value, `step` 0) through views.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Leaf {
    pub start: TDim,
    pub step: TDim,
    /// The shape the program reads it in (the last view's), dims of the run's symbols.
    pub shape: Vec<TDim>,
}

/// An input read at indices that are affine in the element's position (a GatherND whose index tuples are ranges
/// of the run's dims: dynamo's attention-mask padding lookup): component `i` of the index is the leaf `comps[i]`
/// (read in the program's frame), so the read is a strided one, `base + Σ c_a · stride_a`, with strides and base
/// from the input's shape and the leaves' starts and steps (checked in range each run).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Indexed {
    pub input: u8,
    pub comps: Vec<Leaf>,
}

/// The fused computation: `inputs` external tensors, `leaves`, `steps` in order, the last step is the output.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FusedProgram {
    pub inputs: usize,
    pub leaves: Vec<Leaf>,
    /// Inputs read at affine indices (their strides and base made from the leaves), at most one entry an input.
    pub indexed: Vec<Indexed>,
    pub steps: Vec<Step>,
    /// The output element type (F32, Bool, I64 or I32).
    pub out_dt: DatumType,
    /// Outputs besides the last step (siblings reading one value: a rotary's cos and sin of the same angles),
    /// each a step and its element type, written in the same frame; bound after the first output.
    pub more: Vec<(u8, DatumType)>,
    /// The pipeline's specialisation, written once here rather than on every run's encode.
    spec: String,
}

fn src(s: Src) -> String {
    match s {
        Src::Input(i) => format!("v{i}"),
        Src::Step(i) => format!("t{i}"),
        Src::Leaf(i) => format!("l{i}"),
    }
}

/// A shape in a run.
type Shape = TVec<usize>;

/// Whether `dt` is stored as one 4-byte word a fused kernel computes on.
pub fn is_word(dt: DatumType) -> bool {
    matches!(dt, DatumType::F32 | DatumType::Bool | DatumType::I64 | DatumType::I32)
}

impl FusedProgram {
    pub fn new(inputs: usize, steps: Vec<Step>, out_dt: DatumType) -> FusedProgram {
        FusedProgram::with_leaves(inputs, vec![], vec![], steps, out_dt)
    }

    pub fn with_leaves(
        inputs: usize,
        leaves: Vec<Leaf>,
        indexed: Vec<Indexed>,
        steps: Vec<Step>,
        out_dt: DatumType,
    ) -> FusedProgram {
        // the leaves' values and shapes are uniforms: only their count (and which inputs are read at indices)
        // selects the pipeline
        let at: Vec<u8> = indexed.iter().map(|x| x.input).collect();
        let spec = format!("{inputs}:{}:{at:?}:{steps:?}:{out_dt:?}", leaves.len());
        FusedProgram { inputs, leaves, indexed, steps, out_dt, more: vec![], spec }
    }

    /// The program with outputs besides its last step's (see [`FusedProgram::more`]).
    pub fn with_more_outputs(mut self, more: Vec<(u8, DatumType)>) -> FusedProgram {
        self.spec = format!("{}:{more:?}", self.spec);
        self.more = more;
        self
    }

    /// The number of outputs.
    pub fn outputs(&self) -> usize {
        1 + self.more.len()
    }

    pub fn name(&self) -> String {
        let names: Vec<String> = self
            .steps
            .iter()
            .map(|s| match s {
                Step::Unary(op, _) => format!("{op:?}"),
                Step::Binary(op, _, _) | Step::BinaryInt(op, _, _) => format!("{op:?}"),
                Step::Where(..) => "Where".into(),
                Step::Gather(..) => "Gather".into(),
            })
            .collect();
        format!("Fused({})", names.join(","))
    }

    /// The inputs only gathers read (no broadcast strides: read at computed indices).
    fn gathered(&self) -> Vec<bool> {
        let mut g = vec![false; self.inputs];
        for s in &self.steps {
            if let Step::Gather(i, _) = s {
                if let Some(x) = g.get_mut(*i as usize) {
                    *x = true;
                }
            }
        }
        g
    }

    /// Whether the program is well formed: sources in range, steps only read earlier steps, within the limits.
    pub fn check(&self) -> Result<()> {
        if self.inputs > MAX_FUSED_INPUTS || self.leaves.len() > MAX_FUSED_LEAVES || self.steps.is_empty() {
            return Err(Error::new(format!(
                "webgpu: fused kernel with {} inputs and {} leaves",
                self.inputs,
                self.leaves.len()
            )));
        }
        if self.inputs + self.leaves.len() == 0 {
            return Err(Error::new("webgpu: fused kernel without inputs"));
        }
        if self.inputs + self.outputs() > MAX_FUSED_INPUTS + 1
            || self.more.iter().any(|(k, _)| *k as usize >= self.steps.len())
        {
            return Err(Error::new(format!("webgpu: fused kernel with outputs {:?}", self.more)));
        }
        if self.steps.len() > MAX_FUSED_STEPS {
            return Err(Error::new(format!("webgpu: fused kernel with {} steps", self.steps.len())));
        }
        let gathered = self.gathered();
        for (j, x) in self.indexed.iter().enumerate() {
            let i = x.input as usize;
            let twice = self.indexed[..j].iter().any(|y| y.input == x.input);
            if i >= self.inputs || gathered[i] || twice || x.comps.is_empty() {
                return Err(Error::new(format!("webgpu: fused kernel reads input {i} at indices")));
            }
        }
        for (k, s) in self.steps.iter().enumerate() {
            let srcs: Vec<Src> = match *s {
                Step::Unary(_, a) => vec![a],
                Step::Binary(_, a, b) | Step::BinaryInt(_, a, b) => vec![a, b],
                Step::Where(c, a, b) => vec![c, a, b],
                Step::Gather(i, x) => {
                    if i as usize >= self.inputs {
                        return Err(Error::new(format!("webgpu: fused step {k} gathers input {i}")));
                    }
                    vec![x]
                }
            };
            if let Step::BinaryInt(op, ..) = s {
                if op.int_expr().is_none() {
                    return Err(Error::new(format!("webgpu: fused step {k}: no integer {op:?}")));
                }
            }
            for x in srcs {
                let ok = match x {
                    // a gathered input is read at indices only
                    Src::Input(i) => (i as usize) < self.inputs && !gathered[i as usize],
                    Src::Step(i) => (i as usize) < k,
                    Src::Leaf(i) => (i as usize) < self.leaves.len(),
                };
                if !ok {
                    return Err(Error::new(format!("webgpu: fused step {k} reads {x:?}")));
                }
            }
        }
        Ok(())
    }

    /// Words of uniforms after the shape block: broadcast strides of the inputs, then of the leaves.
    fn stride_blocks(&self) -> usize {
        self.inputs + self.leaves.len()
    }

    /// The WGSL text: the elementwise family's helper functions, one function per step, the entry point.
    pub fn source(&self) -> String {
        let k = self.inputs;
        let nl = self.leaves.len();
        let gathered = self.gathered();
        let gathers = self.steps.iter().filter(|s| matches!(s, Step::Gather(..))).count();
        let extras = (nl + gathers + self.indexed.len()).max(1);
        let mut s = String::new();
        s.push_str(&format!(
            "struct Params {{\n    n: u32,\n    rank: u32,\n    groups_x: u32,\n    _pad: u32,\n    \
             shape: array<vec4<u32>, 2>,\n    strides: array<vec4<u32>, {}>,\n    extra: array<vec4<i32>, {extras}>,\n}};\n\n",
            2 * self.stride_blocks().max(1)
        ));
        s.push_str("@group(0) @binding(0) var<uniform> p: Params;\n");
        for i in 0..k {
            s.push_str(&format!("@group(0) @binding({}) var<storage, read> in{i}: array<f32>;\n", i + 1));
        }
        s.push_str(&format!("@group(0) @binding({}) var<storage, read_write> out: array<f32>;\n", k + 1));
        for j in 0..self.more.len() {
            s.push_str(&format!("@group(0) @binding({}) var<storage, read_write> out{j}: array<f32>;\n", k + 2 + j));
        }
        s.push('\n');
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
                Step::BinaryInt(op, _, _) => s.push_str(&format!(
                    "fn step{n}(x: i32, y: i32) -> f32 {{\n    return {};\n}}\n",
                    op.int_expr().unwrap_or("0.0")
                )),
                Step::Where(..) | Step::Gather(..) => {}
            }
        }
        s.push_str(&format!(
            "\n@compute @workgroup_size({WG})\nfn fused_main(@builtin(workgroup_id) wid: vec3<u32>, \
             @builtin(local_invocation_index) lid: u32) {{\n    let i = (wid.x + wid.y * p.groups_x) * {WG}u + lid;\n    \
             if (i >= p.n) {{\n        return;\n    }}\n    var rem = i;\n"
        ));
        // offsets of the broadcast inputs (o{i}) and of the leaves (ol{j})
        let offsets: Vec<(String, usize)> = (0..k)
            .filter(|i| !gathered[*i])
            .map(|i| (format!("o{i}"), i))
            .chain((0..nl).map(|j| (format!("ol{j}"), k + j)))
            .collect();
        for (o, _) in &offsets {
            s.push_str(&format!("    var {o} = 0u;\n"));
        }
        s.push_str(
            "    for (var d = p.rank; d > 0u; d = d - 1u) {\n        let q = (d - 1u) / 4u;\n        \
             let r = (d - 1u) % 4u;\n        let dim = p.shape[q][r];\n        let c = rem % dim;\n        \
             rem = rem / dim;\n",
        );
        for (o, block) in &offsets {
            s.push_str(&format!("        {o} = {o} + c * p.strides[{}u + q][r];\n", 2 * block));
        }
        s.push_str("    }\n");
        for i in (0..k).filter(|i| !gathered[*i]) {
            match self.indexed.iter().position(|x| x.input as usize == i) {
                // read at affine indices: the base in p.extra (after the leaves and gathers), the strides as usual
                Some(j) => s.push_str(&format!("    let v{i} = in{i}[u32(p.extra[{}].x) + o{i}];\n", nl + gathers + j)),
                None => s.push_str(&format!("    let v{i} = in{i}[o{i}];\n")),
            }
        }
        for j in 0..nl {
            s.push_str(&format!("    let l{j} = bitcast<f32>(p.extra[{j}].x + p.extra[{j}].y * i32(ol{j}));\n"));
        }
        let mut g = nl;
        for (n, step) in self.steps.iter().enumerate() {
            let e = match *step {
                Step::Unary(_, a) => format!("step{n}({})", src(a)),
                Step::Binary(_, a, b) => format!("step{n}({}, {})", src(a), src(b)),
                Step::BinaryInt(_, a, b) => format!("step{n}(bitcast<i32>({}), bitcast<i32>({}))", src(a), src(b)),
                Step::Where(c, a, b) => format!(
                    "bitcast<f32>(select(bitcast<u32>({}), bitcast<u32>({}), {} != 0.0))",
                    src(b),
                    src(a),
                    src(c)
                ),
                Step::Gather(input, x) => {
                    // p.extra[g].x: the input's length
                    s.push_str(&format!(
                        "    var g{n} = bitcast<i32>({});\n    if (g{n} < 0) {{\n        g{n} = g{n} + p.extra[{g}].x;\n    \
                         }}\n",
                        src(x)
                    ));
                    let e = format!("in{input}[u32(clamp(g{n}, 0, max(p.extra[{g}].x - 1, 0)))]");
                    g += 1;
                    e
                }
            };
            s.push_str(&format!("    let t{n} = {e};\n"));
        }
        for (j, (k, _)) in self.more.iter().enumerate() {
            s.push_str(&format!("    out{j}[i] = t{k};\n"));
        }
        s.push_str(&format!("    out[i] = t{};\n}}\n", self.steps.len() - 1));
        s
    }

    /// The run's shapes of the leaves, and of the index components of the inputs read at indices (in `indexed`
    /// order).
    fn run_shapes(&self, syms: &SymbolValues) -> Result<(Vec<Shape>, Vec<Vec<Shape>>)> {
        let eval = |l: &Leaf| l.shape.iter().map(|d| eval_dim(d, syms)).collect::<Result<Shape>>();
        let leaves = self.leaves.iter().map(eval).collect::<Result<_>>()?;
        let comps = self.indexed.iter().map(|x| x.comps.iter().map(eval).collect()).collect::<Result<_>>()?;
        Ok((leaves, comps))
    }

    /// The output shape: the broadcast of the inputs read per element, the leaves and the index components.
    fn frame(&self, inputs: &[&[usize]], leaves: &[TVec<usize>], comps: &[Vec<TVec<usize>>]) -> Result<TVec<usize>> {
        let gathered = self.gathered();
        let mut out: TVec<usize> = tvec![];
        for (i, t) in inputs.iter().enumerate() {
            let read_by_index = self.indexed.iter().any(|x| x.input as usize == i);
            if !gathered.get(i).copied().unwrap_or(false) && !read_by_index {
                out = broadcast(&out, t)?;
            }
        }
        for l in leaves.iter().chain(comps.iter().flatten()) {
            out = broadcast(&out, l)?;
        }
        Ok(out)
    }

    /// The output shape in a run.
    pub fn output_shape(&self, inputs: &[&[usize]], syms: &SymbolValues) -> Result<TVec<usize>> {
        let (leaves, comps) = self.run_shapes(syms)?;
        self.frame(inputs, &leaves, &comps)
    }

    /// The strides (over `out_shape`) and base of an input read at affine indices (components `x`, of the run's
    /// `shapes`), checked in range for `data`'s shape.
    fn indexed_strides(
        x: &Indexed,
        shapes: &[TVec<usize>],
        data: &[usize],
        out_shape: &[usize],
        syms: &SymbolValues,
    ) -> Result<(Vec<usize>, u32)> {
        if x.comps.len() != data.len() || shapes.len() != data.len() {
            return Err(Error::new(format!("webgpu: {}-tuple indices into {data:?}", x.comps.len())));
        }
        let ds = crate::kernels::contiguous_strides(data);
        let mut strides = vec![0usize; out_shape.len()];
        let mut base = 0usize;
        for (i, (c, shape)) in x.comps.iter().zip(shapes).enumerate() {
            let (start, step) = (dim_i64(&c.start, syms)?, dim_i64(&c.step, syms)?);
            let len = shape.iter().product::<usize>() as i64;
            let last = start + step * (len - 1).max(0);
            if step < 0 || start < 0 || (len > 0 && last >= data[i] as i64) || shape.len() > out_shape.len() {
                return Err(Error::new(format!(
                    "webgpu: index {start}..={last} out of range for axis {i} of {data:?}"
                )));
            }
            for (a, l) in broadcast_strides(shape, out_shape).into_iter().enumerate() {
                strides[a] += l * step as usize * ds[i];
            }
            base += start as usize * ds[i];
        }
        Ok((strides, u32_of("index", base)?))
    }

    /// Records the fused kernel with one output (the last step).
    pub fn encode(
        &self,
        ctx: &Context,
        rec: &mut Recorder,
        inputs: &[&GpuTensor],
        syms: &SymbolValues,
    ) -> Result<GpuTensor> {
        if !self.more.is_empty() {
            return Err(Error::new("webgpu: a fused kernel with several outputs"));
        }
        self.encode_all(ctx, rec, inputs, syms)?.pop().ok_or_else(|| Error::new("webgpu: fused kernel output"))
    }

    /// Records the fused kernel; its outputs (the last step, then [`FusedProgram::more`]) have the broadcast shape
    /// of the inputs and leaves.
    pub fn encode_all(
        &self,
        ctx: &Context,
        rec: &mut Recorder,
        inputs: &[&GpuTensor],
        syms: &SymbolValues,
    ) -> Result<Vec<GpuTensor>> {
        self.check()?;
        if inputs.len() != self.inputs {
            return Err(Error::new(format!(
                "webgpu: fused kernel expects {} inputs, got {}",
                self.inputs,
                inputs.len()
            )));
        }
        let shapes: Vec<&[usize]> = inputs.iter().map(|t| &*t.shape).collect();
        let (leaf_shapes, comp_shapes) = self.run_shapes(syms)?;
        let out_shape = self.frame(&shapes, &leaf_shapes, &comp_shapes)?;
        let out = rec.alloc(ctx, &out_shape, self.out_dt)?;
        let mut more = vec![];
        for (_, dt) in &self.more {
            more.push(rec.alloc(ctx, &out_shape, *dt)?);
        }
        if out.is_empty() {
            return Ok(std::iter::once(out).chain(more).collect());
        }
        // inputs read at affine indices: their strides and base, once
        let mut indexed = vec![];
        for (x, c) in self.indexed.iter().zip(&comp_shapes) {
            let t = inputs.get(x.input as usize).ok_or_else(|| Error::new("webgpu: fused kernel's indexed input"))?;
            indexed.push(FusedProgram::indexed_strides(x, c, &t.shape, &out_shape, syms)?);
        }
        // gathered inputs are read at indices: zero strides (their shape need not broadcast)
        let gathered = self.gathered();
        let strides: Vec<Vec<usize>> = inputs
            .iter()
            .enumerate()
            .map(|(i, t)| {
                if gathered[i] {
                    Ok(vec![0; out_shape.len()])
                } else if let Some(j) = self.indexed.iter().position(|x| x.input as usize == i) {
                    Ok(indexed[j].0.clone())
                } else {
                    Ok(broadcast_strides(&t.shape, &out_shape))
                }
            })
            .chain(leaf_shapes.iter().map(|s| Ok(broadcast_strides(s, &out_shape))))
            .collect::<Result<_>>()?;
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
        if strides.is_empty() {
            u.extend([0u32; 8]);
        }
        // extras: each leaf's (start, step), then each gather's input length
        let mut extras = 0;
        for l in &self.leaves {
            // i32 words on the GPU (checked: out of range is an error, not a wrap)
            let (start, step) = (dim_i64(&l.start, syms)? as i32, dim_i64(&l.step, syms)? as i32);
            u.extend([start as u32, step as u32, 0, 0]);
            extras += 1;
        }
        for s in &self.steps {
            if let Step::Gather(i, _) = s {
                let len = inputs.get(*i as usize).map(|t| t.len()).unwrap_or(0);
                u.extend([u32_of("length", len)?, 0, 0, 0]);
                extras += 1;
            }
        }
        for (_, base) in &indexed {
            u.extend([*base, 0, 0, 0]);
            extras += 1;
        }
        if extras == 0 {
            u.extend([0u32; 4]);
        }
        let mut bindings: Vec<Binding> =
            inputs.iter().enumerate().map(|(i, t)| Binding { index: i as u32 + 1, buffer: t.buffer.clone() }).collect();
        bindings.push(Binding { index: self.inputs as u32 + 1, buffer: out.buffer.clone() });
        for (j, t) in more.iter().enumerate() {
            bindings.push(Binding { index: (self.inputs + 2 + j) as u32, buffer: t.buffer.clone() });
        }
        rec.dispatch(pipeline, words(&u), bindings, (gx, gy, 1), "fused_elementwise");
        Ok(std::iter::once(out).chain(more).collect())
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

/// The CPU reference of a fused node: the replaced tract ops, evaluated in order (a step's operand: an input, or
/// another step's first output); the node's outputs are the last `outputs` of all the steps' outputs.
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
        // every step's outputs, in order; a step's operand is another step's first output
        let mut values: Vec<TValue> = vec![];
        let mut firsts: Vec<usize> = vec![];
        for (op, srcs) in &self.steps {
            let mut args = tvec![];
            for s in srcs {
                args.push(
                    match *s {
                        Src::Input(i) => inputs.get(i as usize).cloned(),
                        Src::Step(i) => firsts.get(i as usize).and_then(|f| values.get(*f)).cloned(),
                        Src::Leaf(_) => None,
                    }
                    .ok_or_else(|| format_err!("FusedChain: operand {s:?} out of range"))?,
                );
            }
            let out = op.eval(ctx, args)?;
            ensure!(!out.is_empty(), "FusedChain: {} gave no output", op.name());
            firsts.push(values.len());
            values.extend(out);
        }
        ensure!(
            (1..=values.len()).contains(&self.outputs),
            "FusedChain: {} outputs of {} values",
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
        let mut firsts: Vec<usize> = vec![];
        for (op, srcs) in &self.steps {
            let mut args: Vec<TypedFact> = vec![];
            for s in srcs {
                args.push(
                    match *s {
                        Src::Input(i) => inputs.get(i as usize).map(|f| (*f).clone()),
                        Src::Step(i) => firsts.get(i as usize).and_then(|f| facts.get(*f)).cloned(),
                        Src::Leaf(_) => None,
                    }
                    .ok_or_else(|| format_err!("FusedChain: operand {s:?} out of range"))?,
                );
            }
            let refs: Vec<&TypedFact> = args.iter().collect();
            let out = op.output_facts(&refs)?;
            ensure!(!out.is_empty(), "FusedChain: {} gave no output fact", op.name());
            firsts.push(facts.len());
            facts.extend(out);
        }
        ensure!(
            (1..=facts.len()).contains(&self.outputs),
            "FusedChain: {} outputs of {} values",
            self.outputs,
            facts.len()
        );
        Ok(facts.split_off(facts.len() - self.outputs).into())
    }
}
