// Reductions over one run of adjacent axes (`len` elements `inner` apart), one workgroup per output row:
// `reduce_main` (Sum, Prod, Max, Min, MeanOfSquares; dims kept, like tract's Reduce) and `rms_main`
// (RmsNorm: x * inverseSqrt(mean(x²) + eps)). WG: the workgroup size (prelude); {{INIT}}, {{MAP}} (of `v`),
// {{COMBINE}} (of `a`, `b`) and {{FINISH}} (of `acc` and the length `n`) specialise the reduction.

struct Params {
    rows: u32,
    len: u32,
    inner: u32,
    groups_x: u32,
    eps: f32,
    _p0: u32,
    _p1: u32,
    _p2: u32,
};

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

var<workgroup> scratch: array<f32, WG>;

fn map_one(v: f32) -> f32 {
    return {{MAP}};
}

fn combine(a: f32, b: f32) -> f32 {
    return {{COMBINE}};
}

fn finish(acc: f32, n: f32) -> f32 {
    return {{FINISH}};
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
            acc = combine(acc, map_one(x[base + j * p.inner]));
        }
    }
    return reduce_wg(lid, acc);
}

@compute @workgroup_size(WG)
fn reduce_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = group_index(wid, p.groups_x);
    // every invocation takes part in the barriers: no early return on `row`
    let valid = row < p.rows;
    let inner = max(p.inner, 1u);
    let base = (row / inner) * p.len * inner + row % inner;
    let acc = row_acc(lid, valid, base);
    if (valid && lid == 0u) {
        out[row] = finish(acc, f32(p.len));
    }
}

@compute @workgroup_size(WG)
fn rms_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = group_index(wid, p.groups_x);
    let valid = row < p.rows;
    let inner = max(p.inner, 1u);
    let base = (row / inner) * p.len * inner + row % inner;
    let acc = row_acc(lid, valid, base);
    if (valid) {
        let scale = inverseSqrt(acc / f32(p.len) + p.eps);
        for (var j = lid; j < p.len; j = j + WG) {
            out[base + j * p.inner] = x[base + j * p.inner] * scale;
        }
    }
}
