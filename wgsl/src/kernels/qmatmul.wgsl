// Quantized matmul (com.microsoft MatMulNBits), dequantizing in the kernel — no dequantized copy of the weight:
//   Y[r, n] = sum_k A[r, k] * W[n, k],  W[n, k] = (q[n, k] - zero[n, k / BS]) * scale[n, k / BS].
// B: the ONNX uint8 blob [N, k_blocks, BS * BITS / 8] as little-endian u32 words; weight k of a block sits at bit
// k * BITS of its blob, least significant first, so weight i of a word is (word >> (i * BITS)) & MASK. A block is a
// whole number of words (BS >= 16, a power of two). Float weights (W_DECODE): B is the weight [N, K] as f32 words
// (BITS 32) or float16 pairs (BITS 16), scale 1 and zero 0. Scales: f32 bits, or f16 pairs (SCALES_F16, unpack2x16float).
// Zero points (ZP_FNS): none (2^(BITS-1)), packed uint8 (ceil(k_blocks * BITS / 8) bytes per column, as u32 words)
// or f32, one per block.
//   mv_main:       few rows (decode): a workgroup per MV_COLS columns of one row, LANES invocations per column
//                  splitting K word by word, summed in workgroup memory.
//   tiled_main:    many rows: a 64x64 output tile per 16x16 workgroup (4x4 per invocation), K in steps of 16 (one
//                  block per step and column), the B tile dequantized into workgroup memory.
//   quantize_main: accuracy_level 4's int8 quantize-dequantize of A per block of BS along K (onnxruntime's MLAS).
// EPI, what mv_main / tiled_main store (QEpilogue): 0: the product; 1: the product + res (a residual of Y's shape);
// 2: silu(the product) * the product with the second weight (b2, scales2, zps2: a gated MLP's up projection);
// 3 (mv_main only): two or three weights side by side (b / b2 / b3: the q, k and v projections of one input), column
// `col` of the n = n_first + n_second + n_third belonging to one of them, each weight's product stored to its own
// output (y / y2 / y3).

struct Params {
    m: u32,
    n: u32,
    k: u32,
    k_blocks: u32,
    zp_bytes: u32,
    groups_x: u32,
    // EPI 3: the columns of the first and second weights (the third's: n - n_first - n_second)
    n_first: u32,
    n_second: u32,
    // NORM: the RMS norm's epsilon
    eps: f32,
    _p0: u32,
    _p1: u32,
    _p2: u32,
    // ROPE: half the head size, the sequence length, the cos / sin caches' rows, -
    rope: vec4<u32>,
    // ROPE: the K store's block (cap · head) and kept rows (past · head), the V store's
    kv: vec4<u32>,
};

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

const BITS: u32 = {{BITS}}u;
const BS: u32 = {{BS}}u;
const PER_WORD: u32 = 32u / BITS;
const MASK: u32 = {{MASK}};
const BLOB_WORDS: u32 = BS * BITS / 32u;
// words per column in one 16-wide K step
const TW: u32 = 16u / PER_WORD;
// mv_main: LANES invocations per column (a power of two <= 32, more for longer columns), MV_COLS columns
const LANES: u32 = {{LANES}}u;
const MV_COLS: u32 = 256u / LANES;
const EPI: u32 = {{EPI}}u;

fn silu(x: f32) -> f32 {
    // as the elementwise kernels' x * sigmoid_safe(x)
    if (x >= 0.0) {
        return x * (1.0 / (1.0 + exp(-x)));
    }
    let e = exp(x);
    return x * (e / (1.0 + e));
}

// The stored value of Y[i] from the product `v` (and the second weight's product `u`).
fn epilogue(i: u32, v: f32, u: f32) -> f32 {
    if (EPI == 1u) {
        return v + res_at(i);
    }
    if (EPI == 2u) {
        return silu(v) * u;
    }
    return v;
}

// Weight i of packed word q less the zero point z (float weights: the word's f32, or its i-th float16).
fn w_decode(q: u32, i: u32, z: f32) -> f32 {
    return {{W_DECODE}};
}

// One packed word's dot product with A: PER_WORD weights from K index kb, zero point z.
fn word_dot(q: u32, z: f32, a0: u32, kb: u32) -> f32 {
    var s = 0.0;
    if (kb + PER_WORD <= p.k) {
        for (var i = 0u; i < PER_WORD; i = i + 1u) {
            s = s + w_decode(q, i, z) * a_row(a0, kb + i);
        }
    } else {
        for (var i = 0u; i < PER_WORD; i = i + 1u) {
            if (kb + i < p.k) {
                s = s + w_decode(q, i, z) * a_row(a0, kb + i);
            }
        }
    }
    return s;
}

// One packed word's dot product with A scaled by s (a block's scale): WDOT, f32 (word_dot · s) or, for a float16
// model on an adapter with shader-f16 (F16_MATH), float16 arithmetic — the word's weights dequantized and
// multiplied with A's values in f16, their sum in f16 — returned as f32 (the words' sums add up in f32).
{{WDOT}}

{{QM_FNS}}

var<workgroup> part: array<f32, 256>;
// the second weight's partial sums (EPI 2)
var<workgroup> part2: array<f32, {{PART2}}>;
// INT8_A: the row of A quantized to int8 per block (accuracy_level 4), AQ_LEN >= K
const INT8_A: bool = {{INT8_A}};
var<workgroup> aq: array<f32, {{AQ_LEN}}>;

// NORM (mv_main only): A is the input of an RMS norm with gamma (binding 15) the kernel applies first, as
// kernels/norm.wgsl does: a · 1/sqrt(mean(a²) + eps) · gamma, the mean over the row in the same order.
const NORM: bool = {{NORM}};
var<private> inv_rms: f32 = 1.0;

// Element k of the row at a0 of the matmul's A (normalised with NORM).
fn a_in(a0: u32, k: u32) -> f32 {
    if (NORM) {
        return (a[a0 + k] * inv_rms) * gamma_at(k);
    }
    return a[a0 + k];
}

fn a_row(a0: u32, k: u32) -> f32 {
    if (INT8_A) {
        return aq[k];
    }
    return a_in(a0, k);
}

// ROPE (mv_main with EPI 3: the q, k and v projections): q and k rotated (rotate_half over whole heads), q to its
// output as [batch, heads, seq, head], k (rotated) and v into the rows of two KV stores after their past rows
// (ROPE_FNS: the caches, positions and stores; KV16: float16 stores, two values a word). A workgroup's columns are
// rotation partners: slot s < MV_COLS / 2 takes column jb + s of a head, slot s + MV_COLS / 2 its partner
// jb + s + half.
const ROPE: bool = {{ROPE}};
const KV16: bool = {{KV16}};
var<workgroup> rot: array<f32, 64>;

{{ROPE_FNS}}

@compute @workgroup_size(256)
fn mv_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32{{SG_PARAMS}}) {
    var col = group_index(wid, p.groups_x) * MV_COLS + li / LANES;
    if (ROPE) {
        let half = p.rope.x;
        let m = MV_COLS / 2u;
        let g = group_index(wid, p.groups_x);
        let slot = li / LANES;
        let per_head = half / m;
        col = (g / per_head) * 2u * half + (g % per_head) * m + slot % m + select(0u, half, slot >= m);
    }
    let lane = li % LANES;
    let row = wid.z;
    if (NORM) {
        var ss = 0.0;
        for (var j = li; j < p.k; j = j + 256u) {
            let v = a[row * p.k + j];
            ss = ss + v * v;
        }
        {{NORM_SUM}}
        inv_rms = inverseSqrt(ss / max(f32(p.k), 1.0) + p.eps);
        workgroupBarrier();
    }
    if (INT8_A) {
        // onnxruntime's MLAS at accuracy_level 4: scale = max|a| / 127 per block, q = round_half_even(a / scale)
        for (var blk = li; blk < p.k_blocks; blk = blk + 256u) {
            let start = blk * BS;
            let end = min(start + BS, p.k);
            var amax = 0.0;
            for (var j = start; j < end; j = j + 1u) {
                amax = max(amax, abs(a_in(row * p.k, j)));
            }
            let scale = amax / 127.0;
            var inverse = 0.0;
            if (amax != 0.0) {
                inverse = 127.0 / amax;
            }
            for (var j = start; j < end; j = j + 1u) {
                aq[j] = clamp(round(a_in(row * p.k, j) * inverse), -127.0, 127.0) * scale;
            }
        }
        workgroupBarrier();
    }
    var acc = 0.0;
    var acc2 = 0.0;
    // EPI 3: the weight column `col` belongs to (wsel) and its column in that weight (lc)
    var wsel = 0u;
    var lc = col;
    if (EPI == 3u && col >= p.n_first) {
        wsel = 1u;
        lc = col - p.n_first;
        if (lc >= p.n_second) {
            wsel = 2u;
            lc = lc - p.n_second;
        }
    }
    if (col < p.n) {
        let words = p.k_blocks * BLOB_WORDS;
        let a0 = row * p.k;
        let b0 = lc * words;
        for (var w = lane; w < words; w = w + LANES) {
            let blk = w / BLOB_WORDS;
            let kb = blk * BS + (w % BLOB_WORDS) * PER_WORD;
            let si = lc * p.k_blocks + blk;
            if (wsel == 0u) {
                acc = acc + wdot(b_at(b0 + w), zero_at(lc, blk, si), scale_at(si), a0, kb);
            } else if (wsel == 1u) {
                acc = acc + wdot(b2_at(b0 + w), zero2_at(lc, blk, si), scale2_at(si), a0, kb);
            } else {
                acc = acc + wdot(b3_at(b0 + w), zero3_at(lc, blk, si), scale3_at(si), a0, kb);
            }
            if (EPI == 2u) {
                acc2 = acc2 + wdot(b2_at(b0 + w), zero2_at(lc, blk, si), scale2_at(si), a0, kb);
            }
        }
    }
    // each column's LANES partial sums added up, the total at part[li] (part2) of its lane 0
    {{LANE_SUM}}
    if (ROPE) {
        // every column's product sits at part[slot · LANES]: rotate q's and k's with their partners'
        let half = p.rope.x;
        let m = MV_COLS / 2u;
        let slot = li / LANES;
        let d = lc % (2u * half);
        if (lane == 0u && col < p.n) {
            var v = part[li];
            if (wsel < 2u) {
                let partner = part[select(slot + m, slot - m, slot >= m) * LANES];
                let cs = rope_cs(row, d % half);
                v = select(cs.y * partner + cs.x * v, cs.x * v - cs.y * partner, d < half);
            }
            rot[slot] = v;
        }
        workgroupBarrier();
        if (lane == 0u && col < p.n) {
            let v = rot[slot];
            let s = row % p.rope.y;
            let b = row / p.rope.y;
            let h = lc / (2u * half);
            if (wsel == 0u) {
                let heads = p.n_first / (2u * half);
                y[((b * heads + h) * p.rope.y + s) * 2u * half + d] = v;
            } else {
                let heads = select(p.n - p.n_first - p.n_second, p.n_second, wsel == 1u) / (2u * half);
                let blk = select(p.kv.zw, p.kv.xy, wsel == 1u);
                let at = (b * heads + h) * blk.x + blk.y + s * 2u * half + d;
                if (wsel == 1u) {
                    store2(((b * heads + h) * p.rope.y + s) * 2u * half + d, v);
                }
                // v as [batch, heads, seq, head] where asked (a float16 cache's attention reads it)
                if (wsel == 2u) {
                    store3(((b * heads + h) * p.rope.y + s) * 2u * half + d, v);
                }
                // float16: the even channel writes the word of both
                if (!KV16 || d % 2u == 0u) {
                    kv_store(wsel - 1u, at, v, rot[min(slot + 1u, 63u)]);
                }
            }
        }
        return;
    }
    if (lane == 0u && col < p.n) {
        if (EPI == 3u) {
            if (wsel == 0u) {
                y[row * p.n_first + lc] = part[li];
            } else if (wsel == 1u) {
                store2(row * p.n_second + lc, part[li]);
            } else {
                store3(row * (p.n - p.n_first - p.n_second) + lc, part[li]);
            }
            return;
        }
        let i = row * p.n + col;
        var u = 0.0;
        if (EPI == 2u) {
            u = part2[li];
        }
        y[i] = epilogue(i, part[li], u);
    }
}

// tiled_main's tiles: f32, or f16 with F16_MATH (TILE: the element type)
var<workgroup> As: array<{{TILE}}, 1024>;
var<workgroup> Bs: array<{{TILE}}, 1024>;

@compute @workgroup_size(16, 16)
fn tiled_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
              @builtin(local_invocation_index) li: u32) {
    let m0 = wid.y * 64u;
    let n0 = wid.x * 64u;
    let words = p.k_blocks * BLOB_WORDS;
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    // EPI 2: the first weight's tile kept here while the second's accumulates
    var g0 = vec4<f32>(0.0);
    var g1 = vec4<f32>(0.0);
    var g2 = vec4<f32>(0.0);
    var g3 = vec4<f32>(0.0);
    var passes = 1u;
    if (EPI == 2u) {
        passes = 2u;
    }
    for (var ps = 0u; ps < passes; ps = ps + 1u) {
        if (ps == 1u) {
            g0 = acc0;
            g1 = acc1;
            g2 = acc2;
            g3 = acc3;
            acc0 = vec4<f32>(0.0);
            acc1 = vec4<f32>(0.0);
            acc2 = vec4<f32>(0.0);
            acc3 = vec4<f32>(0.0);
        }
        for (var k0 = 0u; k0 < p.k; k0 = k0 + 16u) {
            for (var t = 0u; t < 4u; t = t + 1u) {
                let e = li + t * 256u;
                let kk = e / 64u;
                let xx = e % 64u;
                let gk = k0 + kk;
                var va = 0.0;
                if (m0 + xx < p.m && gk < p.k) {
                    va = a[(m0 + xx) * p.k + gk];
                }
                As[e] = {{TILE}}(va);
            }
            let blk = k0 / BS;
            for (var j = li; j < 64u * TW; j = j + 256u) {
                let nn = j / TW;
                let jw = j % TW;
                let col = n0 + nn;
                let kb = k0 + jw * PER_WORD;
                if (col < p.n) {
                    let wi = col * words + blk * BLOB_WORDS + (k0 % BS) / PER_WORD + jw;
                    let si = col * p.k_blocks + blk;
                    var q = 0u;
                    var s = 0.0;
                    var z = 0.0;
                    if (ps == 0u) {
                        q = b_at(wi);
                        s = scale_at(si);
                        z = zero_at(col, blk, si);
                    } else {
                        q = b2_at(wi);
                        s = scale2_at(si);
                        z = zero2_at(col, blk, si);
                    }
                    for (var i = 0u; i < PER_WORD; i = i + 1u) {
                        var v = 0.0;
                        if (kb + i < p.k) {
                            v = w_decode(q, i, z) * s;
                        }
                        Bs[(jw * PER_WORD + i) * 64u + nn] = {{TILE}}(v);
                    }
                } else {
                    for (var i = 0u; i < PER_WORD; i = i + 1u) {
                        Bs[(jw * PER_WORD + i) * 64u + nn] = {{TILE}}(0.0);
                    }
                }
            }
            workgroupBarrier();
            // four rows of accumulators as vec4 (columns lid.x + 16 j): registers, no indexed local array
            {{TILE_STEP}}
            workgroupBarrier();
        }
    }
    store_row(m0 + lid.y, n0 + lid.x, acc0, g0);
    store_row(m0 + lid.y + 16u, n0 + lid.x, acc1, g1);
    store_row(m0 + lid.y + 32u, n0 + lid.x, acc2, g2);
    store_row(m0 + lid.y + 48u, n0 + lid.x, acc3, g3);
}

// Stores four columns (gn + 16 j) of row gm: `v` the last pass's products, `g` the first's (EPI 2).
fn store_row(gm: u32, gn: u32, v: vec4<f32>, g: vec4<f32>) {
    if (gm >= p.m) {
        return;
    }
    for (var j = 0u; j < 4u; j = j + 1u) {
        if (gn + 16u * j < p.n) {
            let i = gm * p.n + gn + 16u * j;
            if (EPI == 2u) {
                y[i] = epilogue(i, g[j], v[j]);
            } else {
                y[i] = epilogue(i, v[j], 0.0);
            }
        }
    }
}

@compute @workgroup_size(256)
fn quantize_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let i = flat_index(wid, li, p.groups_x);
    if (i >= p.m * p.k_blocks) {
        return;
    }
    let row = i / p.k_blocks;
    let blk = i % p.k_blocks;
    let start = row * p.k + blk * BS;
    let end = min(start + BS, row * p.k + p.k);
    var amax = 0.0;
    for (var j = start; j < end; j = j + 1u) {
        amax = max(amax, abs(a[j]));
    }
    let scale = amax / 127.0;
    var inverse = 0.0;
    if (amax != 0.0) {
        inverse = 127.0 / amax;
    }
    for (var j = start; j < end; j = j + 1u) {
        y[j] = clamp(round(a[j] * inverse), -127.0, 127.0) * scale;
    }
}
