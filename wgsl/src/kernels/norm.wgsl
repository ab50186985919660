// kiln's NormOp: one workgroup per row of the last axis. s = x (+ skip) (+ bias); RMS: y = s / sqrt(mean(s²) + eps),
// layer norm: y = (s − mean) / sqrt(mean((s − mean)²) + eps); then · gamma, + beta. The skip repeats every
// `skip_len` elements (shaped like x, or like its last axes).

struct Params {
    rows: u32,
    len: u32,
    groups_x: u32,
    eps: f32,
    // 1 skip, 2 bias, 4 gamma, 8 beta, 16 rms
    flags: u32,
    skip_len: u32,
    _p0: u32,
    _p1: u32,
};

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> skip: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<storage, read> bias: array<f32>;
@group(0) @binding(5) var<storage, read> gamma: array<f32>;
@group(0) @binding(6) var<storage, read> beta: array<f32>;

var<workgroup> scratch: array<f32, WG>;

fn wg_sum(lid: u32, v: f32) -> f32 {
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

fn s_at(row: u32, c: u32) -> f32 {
    let i = row * p.len + c;
    var v = x[i];
    if ((p.flags & 1u) != 0u) {
        v = v + skip[i % p.skip_len];
    }
    if ((p.flags & 2u) != 0u) {
        v = v + bias[c];
    }
    return v;
}

@compute @workgroup_size(WG)
fn norm_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = group_index(wid, p.groups_x);
    // every invocation takes part in the barriers: no early return on `row`
    let valid = row < p.rows;
    let n = f32(p.len);
    let rms = (p.flags & 16u) != 0u;
    var mean = 0.0;
    if (!rms) {
        var acc = 0.0;
        if (valid) {
            for (var c = lid; c < p.len; c = c + WG) {
                acc = acc + s_at(row, c);
            }
        }
        mean = wg_sum(lid, acc) / max(n, 1.0);
    }
    var acc2 = 0.0;
    if (valid) {
        for (var c = lid; c < p.len; c = c + WG) {
            let d = s_at(row, c) - mean;
            acc2 = acc2 + d * d;
        }
    }
    let inv = inverseSqrt(wg_sum(lid, acc2) / max(n, 1.0) + p.eps);
    if (valid) {
        for (var c = lid; c < p.len; c = c + WG) {
            var v = (s_at(row, c) - mean) * inv;
            if ((p.flags & 4u) != 0u) {
                v = v * gamma[c];
            }
            if ((p.flags & 8u) != 0u) {
                v = v + beta[c];
            }
            out[row * p.len + c] = v;
        }
    }
}
