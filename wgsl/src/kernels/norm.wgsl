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

// ONNX LayerNormalization with onnxruntime's CPU arithmetic, bit for bit (kiln-ops' OrtLayerNorm; the reference is
// ops/src/layer_norm.rs): one workgroup per row; the serial parts run on invocation 0. Flags: 8 bias (beta), 32
// SkipLayerNormalization's arithmetic (Welford, no fused multiply-adds), else LayerNormalization's (an exact mean,
// the squared deviations by fused multiply-adds in eight lanes). `_p0` is zero at run time (see `opq`).

var<workgroup> ort_stats: array<f32, 2>;
var<workgroup> ort_lanes: array<f32, 8>;

// a / b rounded once, whatever the adapter's division rounding (one correction step on an exact remainder)
fn div_x(a: f32, b: f32, z: u32) -> f32 {
    let q = a / b;
    return q + fma_x(-q, b, a, z) / b;
}

@compute @workgroup_size(WG)
fn ort_ln_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = group_index(wid, p.groups_x);
    let valid = row < p.rows;
    let z = p._p0;
    let n = p.len;
    let nf = f32(n);
    let base = row * n;
    let skip_arith = (p.flags & 32u) != 0u;
    if (valid && lid == 0u) {
        if (skip_arith) {
            var mean = 0.0;
            var m2 = 0.0;
            for (var h = 0u; h < n; h = h + 1u) {
                let v = x[base + h];
                let delta = v - mean;
                mean = mean + div_x(delta, f32(h + 1u), z);
                m2 = m2 + opq((v - mean) * delta, z);
            }
            ort_stats[0] = mean;
            ort_stats[1] = sqrt(div_x(m2, nf, z) + p.eps);
        } else {
            // the row's exact sum (onnxruntime sums in float64) as hi + lo + lo2, then rounded once divided by n
            var hi = 0.0;
            var lo = 0.0;
            var lo2 = 0.0;
            for (var c = 0u; c < n; c = c + 1u) {
                let t = two_sum(hi, x[base + c], z);
                hi = t.x;
                let u = two_sum(lo, t.y, z);
                lo = u.x;
                lo2 = lo2 + u.y;
            }
            let s = two_sum(hi, lo + lo2, z);
            let q0 = s.x / nf;
            let rem = fma_x(-q0, nf, s.x, z) + s.y;
            ort_stats[0] = q0 + rem / nf;
        }
    }
    workgroupBarrier();
    let mean = ort_stats[0];
    let eights = n / 8u * 8u;
    if (!skip_arith) {
        if (valid && lid < 8u) {
            var acc = 0.0;
            for (var c = lid; c < eights; c = c + 8u) {
                let d = x[base + c] - mean;
                acc = fma_x(d, d, acc, z);
            }
            ort_lanes[lid] = acc;
        }
        workgroupBarrier();
        if (valid && lid == 0u) {
            var t: array<f32, 4>;
            for (var i = 0u; i < 4u; i = i + 1u) {
                t[i] = ort_lanes[i + 4u] + ort_lanes[i];
            }
            var acc = (t[0] + t[2]) + (t[1] + t[3]);
            var c = eights;
            if (n - c >= 4u) {
                for (var k = 0u; k < 4u; k = k + 1u) {
                    let d = x[base + c + k] - mean;
                    acc = acc + opq(d * d, z);
                }
                c = c + 4u;
            }
            for (; c < n; c = c + 1u) {
                let d = x[base + c] - mean;
                acc = fma_x(d, d, acc, z);
            }
            ort_stats[1] = div_x(1.0, sqrt(div_x(acc, nf, z) + p.eps), z);
        }
    }
    workgroupBarrier();
    let st = ort_stats[1];
    let has_bias = (p.flags & 8u) != 0u;
    if (valid) {
        for (var c = lid; c < n; c = c + WG) {
            let d = x[base + c] - mean;
            var v: f32;
            if (skip_arith) {
                v = opq(div_x(d, st, z) * gamma[c], z);
                if (has_bias) {
                    v = v + beta[c];
                }
            } else if (has_bias) {
                v = fma_x(d * st, gamma[c], beta[c], z);
            } else {
                v = (d * st) * gamma[c];
            }
            out[base + c] = v;
        }
    }
}
