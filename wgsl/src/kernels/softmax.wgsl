// Softmax / LogSoftmax over one axis of any position: a row is `len` elements `inner` apart; one workgroup per row.
// WG: the workgroup size (prelude); {{LOG}}: `true` for LogSoftmax.

struct Params {
    rows: u32,
    len: u32,
    inner: u32,
    groups_x: u32,
    // zero at run time (`opq`)
    zero: u32,
    _p0: u32,
    _p1: u32,
    _p2: u32,
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

// MLAS's exp (MlasComputeExpF / MlasComputeSumExpF32Kernel: the reference is kiln-ops' softmax.rs `exp_mlas`):
// range reduction by log 2 in two parts, a degree-6 polynomial by fused multiply-adds, times 2^m.
fn exp_mlas(x: f32, z: u32) -> f32 {
    let v = select(bitcast<f32>(0xc2cff1b5u), x, x > bitcast<f32>(0xc2cff1b5u));
    let biased = fma_x(bitcast<f32>(0x3fb8aa3bu), v, 12582912.0, z);
    let m = opq(biased, z) - 12582912.0;
    var r = fma_x(m, bitcast<f32>(0xbf317200u), v, z);
    r = fma_x(m, bitcast<f32>(0xb5bfbe8eu), r, z);
    var q = bitcast<f32>(0x3ab4a000u);
    q = fma_x(q, r, bitcast<f32>(0x3c092f6eu), z);
    q = fma_x(q, r, bitcast<f32>(0x3d2aadadu), z);
    q = fma_x(q, r, bitcast<f32>(0x3e2aaa28u), z);
    q = fma_x(q, r, bitcast<f32>(0x3efffffbu), z);
    q = fma_x(q, r, 1.0, z);
    q = fma_x(q, r, 1.0, z);
    return ldexp(q, i32(m));
}

// Softmax with onnxruntime's CPU arithmetic (kiln-ops' OrtSoftmax, bit for bit where the adapter's f32 add and
// multiply round to nearest): WG = 16 lanes per row, lane j summing elements j, j + 16, ... in order as MLAS's
// sixteen accumulators do, reduced as its horizontal add; y = e · (1 / sum).
@compute @workgroup_size(WG)
fn ort_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = group_index(wid, p.groups_x);
    let valid = row < p.rows;
    let z = p.zero;
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
    var acc = 0.0;
    if (valid) {
        for (var j = lid; j < p.len; j = j + WG) {
            let e = exp_mlas(x[base + j * p.inner] + (-m), z);
            out[base + j * p.inner] = e;
            acc = acc + e;
        }
    }
    scratch[lid] = acc;
    workgroupBarrier();
    var t: array<f32, 8>;
    for (var i = 0u; i < 8u; i = i + 1u) {
        t[i] = scratch[i + 8u] + scratch[i];
    }
    let sum = ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
    let q = 1.0 / sum;
    let scale = q + fma_x(-q, sum, 1.0, z) / sum;
    if (valid) {
        for (var j = lid; j < p.len; j = j + WG) {
            out[base + j * p.inner] = out[base + j * p.inner] * scale;
        }
    }
}
