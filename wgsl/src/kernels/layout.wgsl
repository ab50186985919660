// Data movement on 4-byte elements (f32 bit patterns, copied as u32): one strided copy,
// out[o_off + sum(c_d * o_strides_d)] = a[a_off + sum(c_d * a_strides_d)] over the iteration `shape`.
// Transpose (MoveAxis), Expand (MultiBroadcastTo: stride 0), Slice (offset) and each input of a Concat (output
// offset) are all this one kernel. Shapes, strides and offsets are uniforms (offsets3 etc.: the prelude).

struct Params {
    n: u32,
    rank: u32,
    groups_x: u32,
    a_off: u32,
    o_off: u32,
    _p0: u32,
    _p1: u32,
    _p2: u32,
    shape: array<vec4<u32>, 2>,
    a_strides: array<vec4<u32>, 2>,
    o_strides: array<vec4<u32>, 2>,
};

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<u32>;

@compute @workgroup_size(WG)
fn copy_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, lid, p.groups_x);
    if (i >= p.n) {
        return;
    }
    let o = offsets3(i, p.rank, p.shape, p.a_strides, p.o_strides, p.o_strides);
    out[p.o_off + o.y] = a[p.a_off + o.x];
}

// Gather along one axis: out[o, j, k] = a[o, idx[j], k] with `inner` = p.o_off elements per row, p.a_off the
// axis length, p._p0 the number of indices; negative indices count from the end (i64 indices live on the GPU as
// i32). An index out of range is clamped (the CPU reference reports an error; the GPU never reads out of bounds).
@group(0) @binding(2) var<storage, read> idx: array<i32>;

@compute @workgroup_size(WG)
fn gather_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, lid, p.groups_x);
    if (i >= p.n) {
        return;
    }
    let inner = max(p.o_off, 1u);
    let count = max(p._p0, 1u);
    let k = i % inner;
    let j = (i / inner) % count;
    let o = i / (inner * count);
    var at = idx[j];
    if (at < 0) {
        at = at + i32(p.a_off);
    }
    let row = u32(clamp(at, 0, max(i32(p.a_off) - 1, 0)));
    out[i] = a[(o * p.a_off + row) * inner + k];
}
