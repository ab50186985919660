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

