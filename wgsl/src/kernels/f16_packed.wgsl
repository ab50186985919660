// float16 tensors without shader-f16 (Chrome's SwiftShader; or KILN_GPU_NO_F16=1): f16 storage as u32 words, two
// elements a word (element i in bits 16 * (i % 2) of word i / 2: the host's little-endian bytes), and every
// conversion done in integer / f32 arithmetic — exact, with round-to-nearest-even, like the CPU's (half's) casts,
// on any adapter. An invocation owns whole output words, so no two invocations write the same word.
//   cast_to_half_main:   any type -> f16, one output word (two elements) per invocation.
//   cast_from_half_main: f16 -> any type, one element per invocation.
//   gather_main:         Gather of an f16 table, one output word per invocation.
//   gather_cast_main:    Gather of an f16 table cast to a 4-byte type, one element per invocation.
//   copy_main:           the strided copy of Transpose / Expand / Slice / Downsample / each input of a Concat: one
//                        word of the output range the copy writes per invocation (halves outside it kept).
// {{IN_VALUE}}: input element i's value as f32; {{OUT_WORD}}: an f32 value `x` as the output type's stored word.

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
@group(0) @binding(1) var<storage, read> a: array<u32>;
@group(0) @binding(2) var<storage, read> idx: array<i32>;
@group(0) @binding(3) var<storage, read_write> out: array<u32>;

// f16 bits (low 16 bits) -> f32, exact (subnormals included).
fn f16_bits_to_f32(h: u32) -> f32 {
    let sign = (h & 0x8000u) << 16u;
    let e = (h >> 10u) & 0x1fu;
    let m = h & 0x3ffu;
    if (e == 0u) {
        // zero or subnormal: m * 2^-24 (a normal f32)
        return bitcast<f32>(sign | bitcast<u32>(f32(m) * 5.9604644775390625e-8));
    }
    if (e == 31u) {
        return bitcast<f32>(sign | 0x7f800000u | (m << 13u));
    }
    return bitcast<f32>(sign | ((e + 112u) << 23u) | (m << 13u));
}

// f32 -> f16 bits, rounding to nearest even (overflow to infinity, NaN kept quiet with its top payload bits).
fn f32_to_f16_bits(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    let sign = (b >> 16u) & 0x8000u;
    let e = (b >> 23u) & 0xffu;
    let m = b & 0x7fffffu;
    if (e == 0xffu) {
        if (m != 0u) {
            return sign | 0x7e00u | (m >> 13u);
        }
        return sign | 0x7c00u;
    }
    let ue = i32(e) - 127;
    if (ue > 15) {
        return sign | 0x7c00u;
    }
    if (ue >= -14) {
        // a carry out of the mantissa bumps the exponent (to infinity at the top): still the right result
        var h = (u32(ue + 15) << 10u) | (m >> 13u);
        let rest = m & 0x1fffu;
        if (rest > 0x1000u || (rest == 0x1000u && (h & 1u) == 1u)) {
            h = h + 1u;
        }
        return sign | h;
    }
    if (ue < -25) {
        return sign;
    }
    // subnormal: (1.m * 2^ue) / 2^-24 = full >> (-ue - 1), shift 14..24
    let full = m | 0x800000u;
    let shift = u32(-ue - 1);
    var h = full >> shift;
    let rest = full & ((1u << shift) - 1u);
    let mid = 1u << (shift - 1u);
    if (rest > mid || (rest == mid && (h & 1u) == 1u)) {
        h = h + 1u;
    }
    return sign | h;
}

// The bits of f16 element i of `a`.
fn half_at(i: u32) -> u32 {
    return (a[i >> 1u] >> ((i & 1u) * 16u)) & 0xffffu;
}

fn in_value(i: u32) -> f32 {
    return {{IN_VALUE}};
}

fn out_word(x: f32) -> u32 {
    return {{OUT_WORD}};
}

@compute @workgroup_size(WG)
fn cast_to_half_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let w = flat_index(wid, lid, p.groups_x);
    let i = 2u * w;
    if (i >= p.n) {
        return;
    }
    var word = f32_to_f16_bits(in_value(i));
    if (i + 1u < p.n) {
        word = word | (f32_to_f16_bits(in_value(i + 1u)) << 16u);
    }
    out[w] = word;
}

@compute @workgroup_size(WG)
fn cast_from_half_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, lid, p.groups_x);
    if (i >= p.n) {
        return;
    }
    out[i] = out_word(in_value(i));
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
    let w = flat_index(wid, lid, p.groups_x);
    let i = 2u * w;
    if (i >= p.n) {
        return;
    }
    var word = half_at(gather_src(i));
    if (i + 1u < p.n) {
        word = word | (half_at(gather_src(i + 1u)) << 16u);
    }
    out[w] = word;
}

// Gather with a cast from f16 to a 4-byte type: one output element per invocation, converted like
// cast_from_half_main (an embedding lookup and its Cast).
@compute @workgroup_size(WG)
fn gather_cast_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wid, lid, p.groups_x);
    if (i >= p.n) {
        return;
    }
    out[i] = out_word(in_value(gather_src(i)));
}

// out[o_off + sum(c_d * o_strides_d)] = a[a_off + sum(c_d * a_strides_d)] for c over `shape` (o_strides: a box of a
// row-major output, each > 0). p.n words from word p.first; each half of a word finds its c by dividing its offset
// from o_off by the output strides, and keeps its old value when it lies outside the box.
@compute @workgroup_size(WG)
fn copy_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let w = flat_index(wid, lid, p.groups_x);
    if (w >= p.n) {
        return;
    }
    let word = p.first + w;
    var res = out[word];
    for (var h = 0u; h < 2u; h = h + 1u) {
        let pos = word * 2u + h;
        if (pos < p.o_off) {
            continue;
        }
        var rel = pos - p.o_off;
        var src = p.a_off;
        var inside = true;
        for (var d = 0u; d < p.rank; d = d + 1u) {
            let st = max(at8(p.o_strides, d), 1u);
            let c = rel / st;
            rel = rel - c * st;
            if (c >= at8(p.shape, d)) {
                inside = false;
                break;
            }
            src = src + c * at8(p.a_strides, d);
        }
        if (inside && rel == 0u) {
            let shift = 16u * h;
            res = (res & ~(0xffffu << shift)) | (half_at(src) << shift);
        }
    }
    out[word] = res;
}
