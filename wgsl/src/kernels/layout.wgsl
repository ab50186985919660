// Data movement on 4-byte elements (f32, bool as f32, i32 / i64-as-i32: copied as u32 bits, never through float
// arithmetic). One strided copy, out[o_off + sum(c_d * o_strides_d)] = a[a_off + sum(c_d * a_strides_d)] over the
// iteration `shape`: Transpose (MoveAxis), Expand (MultiBroadcastTo: stride 0), Slice (offset), Downsample (strided
// Slice: a negative step is a wrapping u32 stride) and each input of a Concat (output offset) are all this one
// kernel. Also Gather, GatherND, Pad / Tile (`remap_main`), Trilu and integer Range. Shapes, strides and offsets are uniforms (offsets3 etc.: the prelude).

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
    extra: array<vec4<u32>, 2>,
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

// Pad and Tile: each output coordinate maps to an input coordinate per axis, c_in = c - before (`extra`); outside
// [0, dim) the mode (p.a_off) decides: 0 constant (the value's bits in p.o_off), 1 reflect, 2 edge, 3 wrap (Tile).
// shape: the output's, a_strides: the input's strides, o_strides: the input's shape.
@compute @workgroup_size(WG)
fn remap_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, lid, p.groups_x);
    if (i >= p.n) {
        return;
    }
    var rem = i;
    var ia = 0u;
    var inside = true;
    for (var d = p.rank; d > 0u; d = d - 1u) {
        let dim_out = at8(p.shape, d - 1u);
        let dim = i32(at8(p.o_strides, d - 1u));
        let c = i32(rem % dim_out);
        rem = rem / dim_out;
        var ci = c - i32(at8(p.extra, d - 1u));
        if (ci < 0 || ci >= dim) {
            if (p.a_off == 1u) {
                if (ci < 0) {
                    ci = -ci;
                } else {
                    ci = 2 * (dim - 1) - ci;
                }
                ci = clamp(ci, 0, dim - 1);
            } else if (p.a_off == 2u) {
                ci = clamp(ci, 0, dim - 1);
            } else if (p.a_off == 3u) {
                ci = ((ci % dim) + dim) % dim;
            } else {
                inside = false;
                ci = 0;
            }
        }
        ia = ia + u32(ci) * at8(p.a_strides, d - 1u);
    }
    if (inside) {
        out[i] = a[ia];
    } else {
        out[i] = p.o_off;
    }
}

// Trilu over the last two axes (p.a_off rows, p.o_off columns): keeps col >= row + k (upper, p._p0 == 1) or
// col <= row + k (lower), zero elsewhere (zero bits: 0.0, false and 0 alike); k is the i32 at idx[0].
@compute @workgroup_size(WG)
fn trilu_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, lid, p.groups_x);
    if (i >= p.n) {
        return;
    }
    let cols = max(p.o_off, 1u);
    let col = i32(i % cols);
    let row = i32((i / cols) % max(p.a_off, 1u));
    // (a k past the matrix acts as the matrix's own extent: no i32 overflow in row + k)
    let extent = i32(min(cols + max(p.a_off, 1u), 0x3fffffffu));
    let k = clamp(idx[0], -extent, extent);
    var keep = col <= row + k;
    if (p._p0 == 1u) {
        keep = col >= row + k;
    }
    out[i] = select(0u, a[i], keep);
}

// GatherND: index tuple q (p.rank = its length n) of idx selects a slice of p.a_off elements; p.o_off tuples per
// batch, p._p0 the data's batch stride; shape / a_strides: the dims and strides of the n indexed axes. Negative
// indices count from the end; out of range is clamped (never read out of bounds).
@compute @workgroup_size(WG)
fn gather_nd_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, lid, p.groups_x);
    if (i >= p.n) {
        return;
    }
    let slice = max(p.a_off, 1u);
    let q = i / slice;
    let k = i % slice;
    var ia = (q / max(p.o_off, 1u)) * p._p0 + k;
    for (var t = 0u; t < p.rank; t = t + 1u) {
        let dim = i32(at8(p.shape, t));
        var at = idx[q * p.rank + t];
        if (at < 0) {
            at = at + dim;
        }
        ia = ia + u32(clamp(at, 0, max(dim - 1, 0))) * at8(p.a_strides, t);
    }
    out[i] = a[ia];
}

// Integer Range: out[i] = start + i * step, start = idx[0], step = a[0] (i32 bits; adds wrap like i32).
@compute @workgroup_size(WG)
fn range_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, lid, p.groups_x);
    if (i >= p.n) {
        return;
    }
    out[i] = bitcast<u32>(idx[0] + i32(i) * bitcast<i32>(a[0]));
}

// kiln's DimValues: out[i] = the i-th of up to 32 i32 values held in the uniform's shape..extra blocks.
@compute @workgroup_size(WG)
fn dim_values_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, lid, p.groups_x);
    if (i >= p.n) {
        return;
    }
    let b = i / 8u;
    let d = i % 8u;
    var v = at8(p.shape, d);
    if (b == 1u) {
        v = at8(p.a_strides, d);
    } else if (b == 2u) {
        v = at8(p.o_strides, d);
    } else if (b == 3u) {
        v = at8(p.extra, d);
    }
    out[i] = v;
}

// kiln's DimRange: out[i] = start + i * step (start = p.a_off, step = p.o_off, i32 bits; adds wrap like i32).
@compute @workgroup_size(WG)
fn dim_range_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, lid, p.groups_x);
    if (i >= p.n) {
        return;
    }
    out[i] = bitcast<u32>(bitcast<i32>(p.a_off) + i32(i) * bitcast<i32>(p.o_off));
}
