// Quantization kernels (crate::quant). Narrow integers (u8, i8, u16, i16) are one i32 word per element.
//   dequant_main:    y = f32(x - zero_point) * scale                       (tract's DequantizeLinearF32)
//   quant_main:      y = clamp(round_half_even(x * scale) + zero_point)    (tract's QuantizeLinearU8 / I8)
//   round_main:      y = round_half_even(x)
//   dyn_params_main: one workgroup: min / max of x (with 0), then [scale, zero point] (DynamicQuantizeLinear)
//   dyn_apply_main:  y = clamp(round_half_even(x / scale) + zero point, 0, 255)
//   dyn_pick_main:   the scale (f32) or the zero point (i32 word)
//   mmi_main:        MatMulInteger: C[m, n] = sum_k (A[m, k] - a0) * (B[k, n] - b0) in i32, 16x16 tiles
//   gbq_main:        GatherBlockQuantized: rows of a packed table, dequantized per block of the last axis
// WGSL's round() rounds half to even.

struct Params {
    w: array<vec4<u32>, 8>,
};

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<u32>;
@group(0) @binding(2) var<storage, read> x2: array<u32>;
@group(0) @binding(3) var<storage, read_write> y: array<u32>;
@group(0) @binding(4) var<storage, read> x4: array<u32>;
@group(0) @binding(5) var<storage, read> x5: array<u32>;

fn pw(i: u32) -> u32 {
    return p.w[i / 4u][i % 4u];
}

fn elem(wid: vec3<u32>, li: u32) -> u32 {
    return (wid.x + wid.y * pw(1u)) * 256u + li;
}

@compute @workgroup_size(256)
fn dequant_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let i = elem(wid, li);
    if (i >= pw(0u)) {
        return;
    }
    let scale = bitcast<f32>(pw(2u));
    let zp = bitcast<i32>(pw(3u));
    y[i] = bitcast<u32>(f32(bitcast<i32>(x[i]) - zp) * scale);
}

@compute @workgroup_size(256)
fn quant_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let i = elem(wid, li);
    if (i >= pw(0u)) {
        return;
    }
    let scale = bitcast<f32>(pw(2u));
    let zp = bitcast<i32>(pw(3u));
    let lo = f32(bitcast<i32>(pw(4u)));
    let hi = f32(bitcast<i32>(pw(5u)));
    var v = bitcast<f32>(x[i]);
    if (pw(6u) != 0u) {
        v = f32(bitcast<i32>(x[i]));
    }
    var r = round(v * scale);
    if (is_nan(r)) {
        r = 0.0;
    }
    y[i] = bitcast<u32>(i32(clamp(r + f32(zp), lo, hi)));
}

@compute @workgroup_size(256)
fn round_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let i = elem(wid, li);
    if (i >= pw(0u)) {
        return;
    }
    y[i] = bitcast<u32>(round(bitcast<f32>(x[i])));
}

var<workgroup> lo_part: array<f32, 256>;
var<workgroup> hi_part: array<f32, 256>;

@compute @workgroup_size(256)
fn dyn_params_main(@builtin(local_invocation_index) li: u32) {
    let n = pw(0u);
    // comparisons (not min / max): NaN never wins, like the CPU's fold
    var mn = 0.0;
    var mx = 0.0;
    for (var i = li; i < n; i = i + 256u) {
        let v = bitcast<f32>(x[i]);
        if (v < mn) {
            mn = v;
        }
        if (v > mx) {
            mx = v;
        }
    }
    lo_part[li] = mn;
    hi_part[li] = mx;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s = s / 2u) {
        if (li < s) {
            if (lo_part[li + s] < lo_part[li]) {
                lo_part[li] = lo_part[li + s];
            }
            if (hi_part[li + s] > hi_part[li]) {
                hi_part[li] = hi_part[li + s];
            }
        }
        workgroupBarrier();
    }
    if (li == 0u) {
        let scale = (hi_part[0] - lo_part[0]) / 255.0;
        var zp = 0.0;
        if (scale != 0.0) {
            zp = clamp(round(-lo_part[0] / scale), 0.0, 255.0);
        }
        y[0] = bitcast<u32>(scale);
        y[1] = bitcast<u32>(zp);
    }
}

@compute @workgroup_size(256)
fn dyn_apply_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let i = elem(wid, li);
    if (i >= pw(0u)) {
        return;
    }
    let scale = bitcast<f32>(x2[0]);
    let zp = bitcast<f32>(x2[1]);
    var r = round(bitcast<f32>(x[i]) / scale);
    if (is_nan(r)) {
        r = 0.0;
    }
    y[i] = bitcast<u32>(i32(clamp(r + zp, 0.0, 255.0)));
}

@compute @workgroup_size(1)
fn dyn_pick_main() {
    if (pw(2u) != 0u) {
        y[0] = bitcast<u32>(i32(bitcast<f32>(x[1])));
    } else {
        y[0] = x[0];
    }
}

// B_PACKED: 0 one word per element, 1 uint8 / 2 int8 four per word
const B_PACKED: u32 = {{B_PACKED}}u;

fn b_at(i: u32) -> i32 {
    if (B_PACKED == 0u) {
        return bitcast<i32>(x2[i]);
    }
    let v = (x2[i / 4u] >> ((i % 4u) * 8u)) & 255u;
    if (B_PACKED == 2u) {
        return (bitcast<i32>(v) << 24u) >> 24u;
    }
    return bitcast<i32>(v);
}

var<workgroup> ta: array<i32, 256>;
var<workgroup> tb: array<i32, 256>;

// uniform words: m n k batch_rank | a_sm a_sk b_sk b_sn | c_sm c_sn a0_step b0_step | bshape[4] | a_bs[4] | b_bs[4]
// | c_bs[4]
@compute @workgroup_size(16, 16)
fn mmi_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let m = pw(0u);
    let n = pw(1u);
    let k = pw(2u);
    var a_off = 0u;
    var b_off = 0u;
    var c_off = 0u;
    var rem = wid.z;
    for (var d = pw(3u); d > 0u; d = d - 1u) {
        let dim = pw(12u + d - 1u);
        let c = rem % dim;
        rem = rem / dim;
        a_off = a_off + c * pw(16u + d - 1u);
        b_off = b_off + c * pw(20u + d - 1u);
        c_off = c_off + c * pw(24u + d - 1u);
    }
    let row = wid.y * 16u + lid.y;
    let col = wid.x * 16u + lid.x;
    let a_row = min(row, m - 1u);
    let b_col = min(col, n - 1u);
    let a0 = bitcast<i32>(x4[a_row * pw(10u)]);
    let b0 = bitcast<i32>(x5[b_col * pw(11u)]);
    // the B value loaded by this invocation is column wid.x * 16 + lid.x, row k0 + lid.y
    var acc = 0i;
    for (var k0 = 0u; k0 < k; k0 = k0 + 16u) {
        let ka = k0 + lid.x;
        var va = 0i;
        if (row < m && ka < k) {
            va = bitcast<i32>(x[a_off + row * pw(4u) + ka * pw(5u)]) - a0;
        }
        ta[lid.y * 16u + lid.x] = va;
        let kb = k0 + lid.y;
        var vb = 0i;
        if (col < n && kb < k) {
            vb = b_at(b_off + kb * pw(6u) + col * pw(7u)) - b0;
        }
        tb[lid.y * 16u + lid.x] = vb;
        workgroupBarrier();
        for (var kk = 0u; kk < 16u; kk = kk + 1u) {
            acc = acc + ta[lid.y * 16u + kk] * tb[kk * 16u + lid.x];
        }
        workgroupBarrier();
    }
    if (row < m && col < n) {
        y[c_off + row * pw(8u) + col * pw(9u)] = bitcast<u32>(acc);
    }
}

// GatherBlockQuantized, gather axis 0, blocks along the last axis. uniform words: n groups_x _ _ | rows row_len
// last blocks | zp_row_bytes. x: the packed table as u32 words (BITS per element, least significant first), x2:
// indices (i32), x4: scales (f32, [rows * row_len / last, blocks]), x5: packed zero points (u32 words, zp_row_bytes
// per line of blocks; absent: 2^(BITS-1)).
const BITS: u32 = {{BITS}}u;
const BS: u32 = {{BS}}u;

fn gbq_at(i: u32) -> vec2<u32> {
    // (line of blocks, element) of output element i
    let row_len = pw(5u);
    let last = pw(6u);
    let rows = pw(4u);
    let which = i / row_len;
    let e = i % row_len;
    var r = bitcast<i32>(x2[which]);
    if (r < 0) {
        r = r + i32(rows);
    }
    let row = u32(clamp(r, 0, i32(rows) - 1));
    let flat = row * row_len + e;
    return vec2<u32>(flat / last, flat);
}

fn gbq_value(flat: u32) -> f32 {
    let bit = flat * BITS;
    return f32((x[bit / 32u] >> (bit % 32u)) & ((1u << BITS) - 1u));
}

@compute @workgroup_size(256)
fn gbq_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let i = elem(wid, li);
    if (i >= pw(0u)) {
        return;
    }
    let at = gbq_at(i);
    let blk = (at.y % pw(6u)) / BS;
    let scale = bitcast<f32>(x4[at.x * pw(7u) + blk]);
    let zero = f32(1u << (BITS - 1u));
    y[i] = bitcast<u32>((gbq_value(at.y) - zero) * scale);
}

@compute @workgroup_size(256)
fn gbq_zp_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let i = elem(wid, li);
    if (i >= pw(0u)) {
        return;
    }
    let at = gbq_at(i);
    let blk = (at.y % pw(6u)) / BS;
    let scale = bitcast<f32>(x4[at.x * pw(7u) + blk]);
    let zbit = (at.x * pw(8u)) * 8u + blk * BITS;
    let zero = f32((x5[zbit / 32u] >> (zbit % 32u)) & ((1u << BITS) - 1u));
    y[i] = bitcast<u32>((gbq_value(at.y) - zero) * scale);
}
