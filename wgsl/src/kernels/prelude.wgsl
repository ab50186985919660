// kiln's WGSL prelude, prepended to every kernel family (one copy of the shared helpers).
// WG: the family's workgroup size ({{WG}}, a power of two <= 256; 256 unless the family specialises it).

const WG: u32 = {{WG}}u;

// bools are stored as f32 0.0 / 1.0
fn b2f(v: bool) -> f32 {
    return select(0.0, 1.0, v);
}

// NaN by its bits (a float comparison may be folded away)
fn is_nan(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7fffffffu) > 0x7f800000u;
}

// The workgroup's flat index in a grid laid out `groups_x` workgroups per row (grids past 65535 use y).
fn group_index(wid: vec3<u32>, groups_x: u32) -> u32 {
    return wid.x + wid.y * groups_x;
}

// The invocation's flat index (one element per invocation).
fn flat_index(wid: vec3<u32>, lid: u32, groups_x: u32) -> u32 {
    return group_index(wid, groups_x) * WG + lid;
}

// Dim `d` of a rank-8 vector held as two vec4 (the uniform layout of shapes and strides).
fn at8(v: array<vec4<u32>, 2>, d: u32) -> u32 {
    var c = v;
    return c[d / 4u][d % 4u];
}

// The offsets of flat index `i` (row-major over `shape`, `rank` dims) through three stride vectors.
fn offsets3(i: u32, rank: u32, shape: array<vec4<u32>, 2>, s0: array<vec4<u32>, 2>, s1: array<vec4<u32>, 2>,
            s2: array<vec4<u32>, 2>) -> vec3<u32> {
    var sh = shape;
    var a = s0;
    var b = s1;
    var c = s2;
    var rem = i;
    var off = vec3<u32>(0u, 0u, 0u);
    for (var d = rank; d > 0u; d = d - 1u) {
        let q = (d - 1u) / 4u;
        let r = (d - 1u) % 4u;
        let dim = sh[q][r];
        let k = rem % dim;
        rem = rem / dim;
        off = off + k * vec3<u32>(a[q][r], b[q][r], c[q][r]);
    }
    return off;
}


// Exact arithmetic where onnxruntime's CPU kernels round differently from plain WGSL: shader compilers lower fma()
// to a multiply and an add on some adapters (lavapipe) and fold `(a + b) - a` to `b`, so the error-free
// transformations below read their cancelling operands through `opq(x, z)` (`z` a uniform word that is zero at run
// time: the compiler cannot see through it).
fn opq(x: f32, z: u32) -> f32 {
    return bitcast<f32>(bitcast<u32>(x) ^ z);
}

// a + b = s + e exactly (Knuth's TwoSum). Operands and results are opaque too: compilers reassociate constant
// operands out of chains of adds (`(c + x) + y` → `(x + y) + c`).
fn two_sum(a0: f32, b0: f32, z: u32) -> vec2<f32> {
    let a = opq(a0, z);
    let b = opq(b0, z);
    let s = a + b;
    let bb = s - opq(a, z);
    let av = opq(s, z) - bb;
    return vec2<f32>(opq(s, z), (a - av) + (b - bb));
}

// a · b = p + e exactly (Dekker's product with Veltkamp's split; no overflow).
fn two_prod(a0: f32, b0: f32, z: u32) -> vec2<f32> {
    let a = opq(a0, z);
    let b = opq(b0, z);
    let p = a * b;
    let ta = 4097.0 * a;
    let ah = ta - (opq(ta, z) - a);
    let al = a - ah;
    let tb = 4097.0 * b;
    let bh = tb - (opq(tb, z) - b);
    let bl = b - bh;
    let e = (((ah * bh - p) + ah * bl) + al * bh) + al * bl;
    return vec2<f32>(opq(p, z), e);
}

// a + b rounded to odd (the last bit set where the sum was inexact).
fn add_odd(a: f32, b: f32, z: u32) -> f32 {
    let t = two_sum(a, b, z);
    var v = bitcast<u32>(t.x);
    if (t.y != 0.0 && (v & 1u) == 0u) {
        v = select(v - 1u, v + 1u, (t.y > 0.0) == (t.x > 0.0));
    }
    return bitcast<f32>(v);
}

// fma(a, b, c) rounded once, as a fused multiply-add (Boldo & Melquiond's emulation through rounding to odd).
fn fma_x(a: f32, b: f32, c: f32, z: u32) -> f32 {
    let p = two_prod(a, b, z);
    let u = two_sum(c, p.x, z);
    return u.x + add_odd(u.y, p.y, z);
}
