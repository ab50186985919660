// Elementwise kernels on f32 (bools as 0.0 / 1.0): unary (`unary_main`), binary with numpy broadcasting
// (`binary_main`; `binary_int_main` on i32 bits) and Where (`where_main`: c ? a : b, broadcast, with the condition
// at binding 4). The host substitutes {{UNARY}}, {{BINARY}} and {{BINARY_INT}} (one expression each, per
// specialisation); WG, b2f, is_nan and offsets3 come from the prelude.
// Shapes and strides are uniforms: a new length never recompiles.

struct Params {
    n: u32,
    rank: u32,
    groups_x: u32,
    _pad: u32,
    shape: array<vec4<u32>, 2>,
    a_strides: array<vec4<u32>, 2>,
    b_strides: array<vec4<u32>, 2>,
    c_strides: array<vec4<u32>, 2>,
};

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<storage, read> c: array<f32>;

fn erf_approx(x: f32) -> f32 {
    // Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7).
    let s = sign(x);
    let ax = abs(x);
    let t = 1.0 / (1.0 + 0.3275911 * ax);
    let y = 1.0 - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t + 0.254829592) * t * exp(-ax * ax);
    return s * y;
}

fn tanh_safe(x: f32) -> f32 {
    // near zero 1 - exp(-2|x|) cancels: the odd series instead (|error| < 1e-8 relative below 0.25)
    if (abs(x) < 0.25) {
        let x2 = x * x;
        return x * (1.0 + x2 * (-0.33333333 + x2 * (0.13333333 + x2 * (-0.053968254 + x2 * 0.021869489))));
    }
    let e = exp(-2.0 * abs(x));
    return sign(x) * (1.0 - e) / (1.0 + e);
}

fn sigmoid_safe(x: f32) -> f32 {
    if (x >= 0.0) {
        return 1.0 / (1.0 + exp(-x));
    }
    let e = exp(x);
    return e / (1.0 + e);
}

// WGSL's pow is undefined for x < 0; integer exponents keep their sign like the CPU's powf.
fn pow_binary(x: f32, y: f32) -> f32 {
    if (y == 2.0) {
        return x * x;
    }
    if (x >= 0.0 || fract(y) != 0.0) {
        return pow(x, y);
    }
    return pow(abs(x), y) * select(1.0, -1.0, fract(y * 0.5) != 0.0);
}

fn op_unary(x: f32) -> f32 {
    return {{UNARY}};
}

fn op_binary(x: f32, y: f32) -> f32 {
    return {{BINARY}};
}

// Integer operands (i32 bits; i64 lives on the GPU as i32): the result as stored (an i32's bits, or a bool).
fn op_binary_int(x: i32, y: i32) -> f32 {
    return {{BINARY_INT}};
}

// The operands' offsets of output element `i`: one multiply when the shape collapsed to one dim (same shapes, or a
// scalar operand: the common case, and the cheap one on CPU adapters, where offsets3's by-value uniform arrays are
// slow), else the general strided walk.
fn offsets(i: u32) -> vec3<u32> {
    if (p.rank <= 1u) {
        return i * vec3<u32>(p.a_strides[0].x, p.b_strides[0].x, p.c_strides[0].x);
    }
    return offsets3(i, p.rank, p.shape, p.a_strides, p.b_strides, p.c_strides);
}

@compute @workgroup_size(WG)
fn unary_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, lid, p.groups_x);
    if (i >= p.n) {
        return;
    }
    out[i] = op_unary(a[i]);
}

@compute @workgroup_size(WG)
fn binary_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, lid, p.groups_x);
    if (i >= p.n) {
        return;
    }
    let o = offsets(i);
    out[i] = op_binary(a[o.x], b[o.y]);
}

@compute @workgroup_size(WG)
fn binary_int_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, lid, p.groups_x);
    if (i >= p.n) {
        return;
    }
    let o = offsets(i);
    out[i] = op_binary_int(bitcast<i32>(a[o.x]), bitcast<i32>(b[o.y]));
}

@compute @workgroup_size(WG)
fn where_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, lid, p.groups_x);
    if (i >= p.n) {
        return;
    }
    let o = offsets(i);
    // on the bits: integers (i32 bits) pass through unchanged
    out[i] = bitcast<f32>(select(bitcast<u32>(b[o.y]), bitcast<u32>(a[o.x]), c[o.z] != 0.0));
}
