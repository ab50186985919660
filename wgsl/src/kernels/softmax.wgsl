// Softmax / LogSoftmax over one axis of any position: a row is `len` elements `inner` apart; one workgroup per row.
// WG: the workgroup size (prelude); {{LOG}}: `true` for LogSoftmax.

struct Params {
    rows: u32,
    len: u32,
    inner: u32,
    groups_x: u32,
};

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

var<workgroup> scratch: array<f32, WG>;

fn reduce_max(lid: u32, v: f32) -> f32 {
    scratch[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s / 2u) {
        if (lid < s) {
            scratch[lid] = max(scratch[lid], scratch[lid + s]);
        }
        workgroupBarrier();
    }
    let r = scratch[0];
    workgroupBarrier();
    return r;
}

fn reduce_sum(lid: u32, v: f32) -> f32 {
    scratch[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s / 2u) {
        if (lid < s) {
            scratch[lid] = scratch[lid] + scratch[lid + s];
        }
        workgroupBarrier();
    }
    let r = scratch[0];
    workgroupBarrier();
    return r;
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = group_index(wid, p.groups_x);
    // every invocation of the workgroup takes part in the barriers, so no early return on `row`.
    let valid = row < p.rows;
    let outer = row / max(p.inner, 1u);
    let inner = row % max(p.inner, 1u);
    let base = outer * p.len * p.inner + inner;
    var m = -3.40282346e38;
    if (valid) {
        for (var j = lid; j < p.len; j = j + WG) {
            m = max(m, x[base + j * p.inner]);
        }
    }
    m = reduce_max(lid, m);
    var s = 0.0;
    if (valid) {
        for (var j = lid; j < p.len; j = j + WG) {
            s = s + exp(x[base + j * p.inner] - m);
        }
    }
    s = reduce_sum(lid, s);
    if (valid) {
        let ls = log(s);
        for (var j = lid; j < p.len; j = j + WG) {
            let v = x[base + j * p.inner] - m;
            if ({{LOG}}) {
                out[base + j * p.inner] = v - ls;
            } else {
                out[base + j * p.inner] = exp(v) / s;
            }
        }
    }
}
