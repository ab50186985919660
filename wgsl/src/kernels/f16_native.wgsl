// float16 tensors with shader-f16 (`enable f16;`, prepended by the host): f16 storage as array<f16>, one element per
// invocation, the hardware's conversions.
//   cast_main:   between f16 and the other types ({{A_ELEM}} / {{O_ELEM}}: f16, or u32 for 4-byte elements).
//   gather_main: Gather of an f16 table; gather_cast_main: converting each element like cast_main.
//   copy_main:   the strided copy of Transpose / Expand / Slice / Downsample / each input of a Concat.
// {{IN_VALUE}}: input element i's value as f32; {{STORE}}: an f32 value `x` as the output element; {{MOVE}}: the copy
// of element `src` of `a` to element `dst` of `out` (the movement entries; every entry of a module must type-check
// whatever the element types, so each specialisation fills only its own).

struct Params {
    n: u32,
    groups_x: u32,
    rank: u32,
    a_off: u32,
    o_off: u32,
    first: u32,
    axis_len: u32,
    inner: u32,
    count: u32,
    _p0: u32,
    _p1: u32,
    _p2: u32,
    shape: array<vec4<u32>, 2>,
    a_strides: array<vec4<u32>, 2>,
    o_strides: array<vec4<u32>, 2>,
};

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<{{A_ELEM}}>;
@group(0) @binding(2) var<storage, read> idx: array<i32>;
@group(0) @binding(3) var<storage, read_write> out: array<{{O_ELEM}}>;

fn in_value(i: u32) -> f32 {
    return {{IN_VALUE}};
}

fn store(i: u32, x: f32) {
    out[i] = {{STORE}};
}

fn move_elem(dst: u32, src: u32) {
    {{MOVE}}
}

@compute @workgroup_size(WG)
fn cast_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, lid, p.groups_x);
    if (i >= p.n) {
        return;
    }
    store(i, in_value(i));
}

// The table element output element i reads: out[o, j, k] = a[o, idx[j], k] (`inner` elements a row, `count`
// indices, `axis_len` rows); negative indices count from the end, out of range is clamped (never read out of bounds).
fn gather_src(i: u32) -> u32 {
    let inner = max(p.inner, 1u);
    let count = max(p.count, 1u);
    let k = i % inner;
    let j = (i / inner) % count;
    let o = i / (inner * count);
    var at = idx[j];
    if (at < 0) {
        at = at + i32(p.axis_len);
    }
    let row = u32(clamp(at, 0, max(i32(p.axis_len) - 1, 0)));
    return (o * p.axis_len + row) * inner + k;
}

@compute @workgroup_size(WG)
fn gather_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, lid, p.groups_x);
    if (i >= p.n) {
        return;
    }
    move_elem(i, gather_src(i));
}

// Gather with a cast: the table's element converted like cast_main's (an embedding lookup and its Cast).
@compute @workgroup_size(WG)
fn gather_cast_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, lid, p.groups_x);
    if (i >= p.n) {
        return;
    }
    store(i, in_value(gather_src(i)));
}

@compute @workgroup_size(WG)
fn copy_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, lid, p.groups_x);
    if (i >= p.n) {
        return;
    }
    let o = offsets3(i, p.rank, p.shape, p.a_strides, p.o_strides, p.o_strides);
    move_elem(p.o_off + o.y, p.a_off + o.x);
}
