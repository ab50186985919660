// Reductions over any set of axes, one workgroup per output row: the kept axes (`kshape`, `kstride`) address a
// row, the reduced axes (`rshape`, `rstride`) its `len` elements (both collapsed on the host; one reduced run is
// the fast path). `reduce_main` (Sum, Prod, Max, Min, MeanOfSquares; dims kept, like tract's Reduce),
// `arg_main` (ArgMax / ArgMin: the index of the best element, first or last among ties, as an i32) and `rms_main`
// (RmsNorm: x * inverseSqrt(mean(x²) + eps), the output shaped like the input).
// WG: the workgroup size (prelude); {{INIT}}, {{MAP}} (of `v`), {{COMBINE}} (of `a`, `b`) and {{FINISH}} (of `acc`
// and the length `n`) specialise the reduction; {{ARG_CMP}} (of `v`, `w`) and {{ARG_TIE}} (of `j`, `k`) the arg
// reductions.

struct Params {
    rows: u32,
    len: u32,
    groups_x: u32,
    eps: f32,
    krank: u32,
    rrank: u32,
    _p0: u32,
    _p1: u32,
    kshape: array<vec4<u32>, 2>,
    kstride: array<vec4<u32>, 2>,
    rshape: array<vec4<u32>, 2>,
    rstride: array<vec4<u32>, 2>,
};

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

var<workgroup> scratch: array<f32, WG>;
var<workgroup> scratch_i: array<u32, WG>;

fn map_one(v: f32) -> f32 {
    return {{MAP}};
}

fn combine(a: f32, b: f32) -> f32 {
    return {{COMBINE}};
}

fn finish(acc: f32, n: f32) -> f32 {
    return {{FINISH}};
}

// The input offset of output row `row` (its first element).
fn row_base(row: u32) -> u32 {
    return offsets3(row, p.krank, p.kshape, p.kstride, p.kstride, p.kstride).x;
}

// The offset of the row's element `j` from the row's base.
fn elem_off(j: u32) -> u32 {
    if (p.rrank == 1u) {
        return j * p.rstride[0][0];
    }
    return offsets3(j, p.rrank, p.rshape, p.rstride, p.rstride, p.rstride).x;
}

fn reduce_wg(lid: u32, v: f32) -> f32 {
    scratch[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s / 2u) {
        if (lid < s) {
            scratch[lid] = combine(scratch[lid], scratch[lid + s]);
        }
        workgroupBarrier();
    }
    let r = scratch[0];
    workgroupBarrier();
    return r;
}

fn row_acc(lid: u32, valid: bool, base: u32) -> f32 {
    var acc = {{INIT}};
    if (valid) {
        for (var j = lid; j < p.len; j = j + WG) {
            acc = combine(acc, map_one(x[base + elem_off(j)]));
        }
    }
    return reduce_wg(lid, acc);
}

@compute @workgroup_size(WG)
fn reduce_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = group_index(wid, p.groups_x);
    // every invocation takes part in the barriers: no early return on `row`
    let valid = row < p.rows;
    let acc = row_acc(lid, valid, row_base(row));
    if (valid && lid == 0u) {
        out[row] = finish(acc, f32(p.len));
    }
}

@compute @workgroup_size(WG)
fn rms_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = group_index(wid, p.groups_x);
    let valid = row < p.rows;
    let base = row_base(row);
    let acc = row_acc(lid, valid, base);
    if (valid) {
        let scale = inverseSqrt(acc / f32(p.len) + p.eps);
        for (var j = lid; j < p.len; j = j + WG) {
            let at = base + elem_off(j);
            out[at] = x[at] * scale;
        }
    }
}

// Whether element (v, j) beats the best so far (w, k). NaN never wins (tract's ArgMax skips it); each
// invocation starts from a virtual element ({{INIT}}, 0), like tract's fold.
fn arg_better(v: f32, j: u32, w: f32, k: u32) -> bool {
    return ({{ARG_CMP}}) || (v == w && ({{ARG_TIE}}));
}

@compute @workgroup_size(WG)
fn arg_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = group_index(wid, p.groups_x);
    let valid = row < p.rows;
    var bv = {{INIT}};
    var bi = 0u;
    if (valid) {
        let base = row_base(row);
        for (var j = lid; j < p.len; j = j + WG) {
            let v = x[base + elem_off(j)];
            if (arg_better(v, j, bv, bi)) {
                bv = v;
                bi = j;
            }
        }
    }
    scratch[lid] = bv;
    scratch_i[lid] = bi;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s / 2u) {
        if (lid < s && arg_better(scratch[lid + s], scratch_i[lid + s], scratch[lid], scratch_i[lid])) {
            scratch[lid] = scratch[lid + s];
            scratch_i[lid] = scratch_i[lid + s];
        }
        workgroupBarrier();
    }
    if (valid && lid == 0u) {
        out[row] = bitcast<f32>(i32(scratch_i[0]));
    }
}
