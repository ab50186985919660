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
    // onnxruntime's MLAS erf (MlasComputeErf, faithfully rounded; kiln-ops' erf.rs, bit for bit):
    // a polynomial in x² below |x| = 0.921875, 1 - exp(-poly(|x|)) above, clamped at 3.925
    // fused multiply-adds emulated (fma_x: some adapters' fma() is a multiply and an add); p._pad is zero
    let z = p._pad;
    if (is_nan(x)) {
        return x;
    }
    let a = min(abs(x), bitcast<f32>(0x407b3333u));
    var r: f32;
    if (a >= 0.921875) {
        r = bitcast<f32>(0x37911480u);
        r = fma_x(r, a, bitcast<f32>(0xb9c8e966u), z);
        r = fma_x(r, a, bitcast<f32>(0x3b7e899bu), z);
        r = fma_x(r, a, bitcast<f32>(0xbcc6b180u), z);
        r = fma_x(r, a, bitcast<f32>(0x3ddaae58u), z);
        r = fma_x(r, a, bitcast<f32>(0x3f228550u), z);
        r = fma_x(r, a, bitcast<f32>(0x3e03ce86u), z);
        r = fma_x(r, a, a, z);
        let v = max(-r, bitcast<f32>(0xc2b0c0a5u));
        // MLAS rounds with fma(v, log2 e, 1.5·2^23) - 1.5·2^23 (opaque: compilers fold it away)
        let m = opq(fma_x(bitcast<f32>(0x3fb8aa3bu), v, 12582912.0, z), z) - 12582912.0;
        var f = fma_x(m, bitcast<f32>(0xbf317200u), v, z);
        f = fma_x(m, bitcast<f32>(0xb5bfbe8eu), f, z);
        var y = bitcast<f32>(0x3ab54c6du);
        y = fma_x(y, f, bitcast<f32>(0x3c093965u), z);
        y = fma_x(y, f, bitcast<f32>(0x3d2aad10u), z);
        y = fma_x(y, f, bitcast<f32>(0x3e2aaa17u), z);
        y = fma_x(y, f, bitcast<f32>(0x3efffffbu), z);
        y = fma_x(y, f, 1.0, z);
        y = fma_x(y, f, 1.0, z);
        let pow2 = bitcast<f32>(u32(i32(m) + 127) << 23u);
        r = 1.0 - opq(y * pow2, z);
    } else {
        let s = a * a;
        r = bitcast<f32>(0xba1d0d41u);
        r = fma_x(r, s, bitcast<f32>(0x3ba39fa4u), z);
        r = fma_x(r, s, bitcast<f32>(0xbcdb45e9u), z);
        r = fma_x(r, s, bitcast<f32>(0x3de70d23u), z);
        r = fma_x(r, s, bitcast<f32>(0xbec09370u), z);
        r = fma_x(r, s, bitcast<f32>(0x3e0375d3u), z);
        r = fma_x(r, a, a, z);
    }
    return bitcast<f32>(bitcast<u32>(r) | (bitcast<u32>(x) & 0x80000000u));
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
