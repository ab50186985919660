// Fused attention (ONNX Attention's Y): scores, mask, causal cut, softcap and softmax never leave registers — an
// online (flash-style) softmax over K/V tiles staged in workgroup memory, no S×T matrix anywhere.
//
// One workgroup per (batch, kv head, block of WG rows); a row is one (q head of the kv head's group, query)
// pair, so the q heads that share a kv head (GQA) share its K/V tiles and K/V are never repeated. Each invocation
// owns one row: its query and its accumulator in registers.
// Keys 0..past come from past_key / past_value ([batch, kv_heads, past, head]; ks.w / vs.w rows per (batch, head)
// when not 0: a KV store with spare rows), keys past.. from K / V
// (3D or 4D, through strides). Masked keys (bool mask false, float mask -inf, beyond the mask's last dim, causal
// j > i + past, j >= nonpad_kv_seqlen[b]) take no weight; a row with every key masked is zeros.
// GroupQueryAttention (flag 32): `nonpad` holds seqlens_k; batch b's queries sit after
// past_b = max(seqlens_k[b] + 1 - q_seq, 0) keys and see keys j <= past_b + i, j <= seqlens_k[b] (and, with flag 64,
// only those with past_b + i - j < window, sp.w).
//
// {{DMAX}}: head sizes up to DMAX (a power of two); tiles hold TILE / DMAX keys.
// K, V, past K and past V are f32, or f16 (a float16 model's KV cache kept in f16, read as f32 here): their element
// types (K_ELEM, ...) and loads (K_LOAD, ...) come from the specialisation — `array<f16>` with shader-f16,
// else u32 words of two halves each (`unpack2x16float`, exact). Indices are in elements either way.
// HT: the products' type — f32, or f16 for a float16 model on an adapter with shader-f16 (`AttentionSpec::f16_math`):
// then q · k and weight · v are multiplied in f16, q·k summed in f16 CHUNK products at a time (those sums and the
// value accumulators in f32), the tiles held in f16; the softmax stays f32 (loads as f32, then HT: exact). With f32,
// CHUNK never ends a sum and every conversion is the identity: the f32 kernel as it was.
alias HT = {{HT}};
const CHUNK: u32 = {{CHUNK}}u;
// f16 products: q is scaled before its rounding to f16 by the power of two at or below the scale (exact: the same
// f16 roundings, partial scores near the scores' magnitude rather than the raw q · k's, within f16's range), the
// dot product by the rest of it (in [1, 2)); f32: the score scaled after the dot product, as before
const PRESCALE: bool = {{PRESCALE}};

// (q's factor, the dot product's) for `scale`
fn scale_split(scale: f32) -> vec2<f32> {
    if (!PRESCALE || !(scale > 0.0)) {
        return vec2<f32>(1.0, scale);
    }
    let pre = bitcast<f32>(bitcast<u32>(scale) & 0x7f800000u);
    if (pre == 0.0) {
        return vec2<f32>(1.0, scale);
    }
    return vec2<f32>(pre, scale / pre);
}

const DMAX: u32 = {{DMAX}}u;
const TILE: u32 = 2048u;
const BK: u32 = TILE / DMAX;
const NEG_BIG: f32 = -3.40282346e38;

struct Params {
    // batch, q heads, q seq, kv heads
    d0: vec4<u32>,
    // new kv length, past length, total length, dk
    d1: vec4<u32>,
    // dv, group (q heads per kv head), row blocks per (batch, kv head), groups_x
    d2: vec4<u32>,
    // flags (1 causal, 2 mask, 4 bool mask, 8 nonpad, 16 softcap, 32 GQA seqlens, 64 GQA window), scale bits,
    // softcap bits, mask last-dim length
    misc: vec4<u32>,
    // element strides (batch, head, seq, -) of Q, K, V, Y; the mask's (batch, head, seq, key)
    qs: vec4<u32>,
    ks: vec4<u32>,
    vs: vec4<u32>,
    ys: vec4<u32>,
    ms: vec4<u32>,
    // KV splits (decode: the keys cut across workgroups, partial results combined by combine_main), keys per
    // split, rows over all (batch, kv head), GQA window
    sp: vec4<u32>,
};

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> k: array<{{K_ELEM}}>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<storage, read> v: array<{{V_ELEM}}>;
@group(0) @binding(5) var<storage, read> mask: array<f32>;
@group(0) @binding(6) var<storage, read> past_k: array<{{PK_ELEM}}>;
@group(0) @binding(7) var<storage, read> past_v: array<{{PV_ELEM}}>;
@group(0) @binding(8) var<storage, read> nonpad: array<i32>;

fn load_k(i: u32) -> f32 {
    return {{K_LOAD}};
}

fn load_v(i: u32) -> f32 {
    return {{V_LOAD}};
}

fn load_past_k(i: u32) -> f32 {
    return {{PK_LOAD}};
}

fn load_past_v(i: u32) -> f32 {
    return {{PV_LOAD}};
}

var<workgroup> ktile: array<HT, TILE>;
var<workgroup> vtile: array<HT, TILE>;

fn tanh_c(x: f32) -> f32 {
    if (abs(x) < 0.25) {
        let x2 = x * x;
        return x * (1.0 + x2 * (-0.33333333 + x2 * (0.13333333 + x2 * (-0.053968254 + x2 * 0.021869489))));
    }
    let e = exp(-2.0 * min(abs(x), 40.0));
    return sign(x) * (1.0 - e) / (1.0 + e);
}

// The float mask value is -inf (by its bits: comparisons with infinities may be folded away).
fn is_neg_inf(x: f32) -> bool {
    return bitcast<u32>(x) == 0xff800000u;
}

@compute @workgroup_size(WG)
fn attention_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let batch = p.d0.x;
    let hq = p.d0.y;
    let s_len = p.d0.z;
    let hkv = p.d0.w;
    let past = p.d1.y;
    let pk_rows = select(past, p.ks.w, p.ks.w != 0u);
    let pv_rows = select(past, p.vs.w, p.vs.w != 0u);
    let total = p.d1.z;
    let dk = p.d1.w;
    let dv = p.d2.x;
    let group = p.d2.y;
    let blocks = p.d2.z;
    let flags = p.misc.x;
    let scale = bitcast<f32>(p.misc.y);
    let cap = bitcast<f32>(p.misc.z);
    let mask_len = p.misc.w;

    let splits = max(p.sp.x, 1u);
    let gs = group_index(wid, p.d2.w);
    let split = gs % splits;
    let g = gs / splits;
    // uniform across the workgroup: every invocation takes part in the barriers
    let live = g < batch * hkv * blocks;
    let bh = g / max(blocks, 1u);
    let blk = g % max(blocks, 1u);
    let b = bh / max(hkv, 1u);
    let kh = bh % max(hkv, 1u);
    let rows = group * s_len;
    let r = blk * WG + lid;
    let on_row = live && r < rows;
    let h = kh * group + r / max(s_len, 1u);
    let i = r % max(s_len, 1u);

    var np = total;
    var pastb = past;
    let gqa = (flags & 32u) != 0u;
    if ((flags & 8u) != 0u && live) {
        if (gqa) {
            pastb = u32(max(nonpad[b] + 1 - i32(s_len), 0));
            np = u32(max(nonpad[b] + 1, 0));
        } else {
            np = u32(max(nonpad[b], 0));
        }
    }
    // the keys this block can see: a causal block stops at its last query's past + i
    var limit = total;
    if (((flags & 1u) != 0u || gqa) && live) {
        let r0 = blk * WG;
        let r1 = min(rows, r0 + WG) - 1u;
        var imax = s_len - 1u;
        if (r0 / s_len == r1 / s_len) {
            imax = r1 % s_len;
        }
        limit = min(total, pastb + imax + 1u);
    }
    if (!live) {
        limit = 0u;
    }
    var first_key = 0u;
    if (splits > 1u) {
        first_key = min(split * p.sp.y, limit);
        limit = min(limit, first_key + p.sp.y);
    }

    var qr: array<HT, DMAX>;
    var acc: array<f32, DMAX>;
    if (on_row) {
        let qb = b * p.qs.x + h * p.qs.y + i * p.qs.z;
        let qs = scale_split(scale).x;
        for (var d = 0u; d < dk; d = d + 1u) {
            qr[d] = HT(q[qb + d] * qs);
        }
    }
    for (var d = 0u; d < DMAX; d = d + 1u) {
        acc[d] = 0.0;
    }
    var m = NEG_BIG;
    var l = 0.0;

    for (var t0 = first_key; t0 < limit; t0 = t0 + BK) {
        // stage BK keys and values
        for (var e = lid; e < BK * dk; e = e + WG) {
            let jj = e / dk;
            let d = e % dk;
            let j = t0 + jj;
            var val = 0.0;
            if (j < total) {
                if (j < past) {
                    val = load_past_k(((b * hkv + kh) * pk_rows + j) * dk + d);
                } else {
                    val = load_k(b * p.ks.x + kh * p.ks.y + (j - past) * p.ks.z + d);
                }
            }
            ktile[jj * DMAX + d] = HT(val);
        }
        for (var e = lid; e < BK * dv; e = e + WG) {
            let jj = e / dv;
            let d = e % dv;
            let j = t0 + jj;
            var val = 0.0;
            if (j < total) {
                if (j < past) {
                    val = load_past_v(((b * hkv + kh) * pv_rows + j) * dv + d);
                } else {
                    val = load_v(b * p.vs.x + kh * p.vs.y + (j - past) * p.vs.z + d);
                }
            }
            vtile[jj * DMAX + d] = HT(val);
        }
        workgroupBarrier();
        if (on_row) {
            let n = min(BK, limit - t0);
            for (var jj = 0u; jj < n; jj = jj + 1u) {
                let j = t0 + jj;
                if ((flags & 1u) != 0u && j > i + past) {
                    continue;
                }
                if (j >= np) {
                    continue;
                }
                if (gqa && (j > i + pastb || ((flags & 64u) != 0u && i + pastb >= j + p.sp.w))) {
                    continue;
                }
                var bias = 0.0;
                if ((flags & 2u) != 0u) {
                    if (j >= mask_len) {
                        continue;
                    }
                    let mv = mask[b * p.ms.x + h * p.ms.y + i * p.ms.z + j * p.ms.w];
                    if ((flags & 4u) != 0u) {
                        if (mv == 0.0) {
                            continue;
                        }
                    } else {
                        if (is_neg_inf(mv)) {
                            continue;
                        }
                        bias = mv;
                    }
                }
                var dot = 0.0;
                for (var d0 = 0u; d0 < dk; d0 = d0 + CHUNK) {
                    var dh = HT(0.0);
                    for (var d = d0; d < min(dk, d0 + CHUNK); d = d + 1u) {
                        dh = dh + qr[d] * ktile[jj * DMAX + d];
                    }
                    dot = dot + f32(dh);
                }
                var x = dot * scale_split(scale).y;
                if ((flags & 16u) != 0u) {
                    x = cap * tanh_c(x / cap);
                }
                x = x + bias;
                if (x > m) {
                    let c = exp(m - x);
                    l = l * c;
                    for (var d = 0u; d < dv; d = d + 1u) {
                        acc[d] = acc[d] * c;
                    }
                    m = x;
                }
                let w = exp(x - m);
                l = l + w;
                for (var d = 0u; d < dv; d = d + 1u) {
                    acc[d] = acc[d] + f32(HT(w) * vtile[jj * DMAX + d]);
                }
            }
        }
        workgroupBarrier();
    }
    if (on_row && splits > 1u) {
        // partial result of this split: m, l, acc[0..dv]
        let at = ((bh * rows + r) * splits + split) * (dv + 2u);
        y[at] = m;
        y[at + 1u] = l;
        for (var d = 0u; d < dv; d = d + 1u) {
            y[at + 2u + d] = acc[d];
        }
        return;
    }
    if (on_row) {
        let yb = b * p.ys.x + h * p.ys.y + i * p.ys.z;
        var inv = 0.0;
        if (l > 0.0) {
            inv = 1.0 / l;
        }
        for (var d = 0u; d < dv; d = d + 1u) {
            y[yb + d] = acc[d] * inv;
        }
    }
}

// Combines the splits' partial results (binding 1, as attention_main wrote them to its output) into Y: one
// invocation per (row, channel).
@compute @workgroup_size(WG)
fn combine_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let dv = p.d2.x;
    let f = flat_index(wid, lid, p.d2.w);
    if (f >= p.sp.z * dv) {
        return;
    }
    let splits = max(p.sp.x, 1u);
    let row = f / dv;
    let d = f % dv;
    let s_len = max(p.d0.z, 1u);
    let hkv = max(p.d0.w, 1u);
    let rows = max(p.d2.y * s_len, 1u);
    let bh = row / rows;
    let r = row % rows;
    let b = bh / hkv;
    let h = (bh % hkv) * p.d2.y + r / s_len;
    let i = r % s_len;
    let base = row * splits * (dv + 2u);
    var mx = NEG_BIG;
    for (var t = 0u; t < splits; t = t + 1u) {
        let at = base + t * (dv + 2u);
        if (q[at + 1u] > 0.0) {
            mx = max(mx, q[at]);
        }
    }
    var l = 0.0;
    var acc = 0.0;
    for (var t = 0u; t < splits; t = t + 1u) {
        let at = base + t * (dv + 2u);
        if (q[at + 1u] > 0.0) {
            let c = exp(q[at] - mx);
            l = l + c * q[at + 1u];
            acc = acc + c * q[at + 2u + d];
        }
    }
    var v = 0.0;
    if (l > 0.0) {
        v = acc / l;
    }
    y[b * p.ys.x + h * p.ys.y + i * p.ys.z + d] = v;
}

// Decode (one query per row, q seq 1): one workgroup of DWG invocations per (batch, q head, key split), keys in
// tiles of TK = DWG / LANES. Scores: LANES invocations per key, each a strided quarter of the dot product, summed
// through workgroup memory; the tile's max and sum reduced together. Values: each invocation owns NA channels
// (channel lane lid % TK) for the keys of one residue (lid / TK) mod LANES of the tile; the LANES partial sums are
// added once at the end. Few dependent loads per invocation (dk / LANES for a score, TK / LANES for the values):
// the kernel is latency-bound on a GPU (a decode step has one workgroup per head). Same inputs, flags and
// partial-result layout (for combine_main) as attention_main.
const DWG: u32 = {{DWG}}u;
const LANES: u32 = 4u;
const TK: u32 = DWG / LANES;
const NA: u32 = (DMAX + TK - 1u) / TK;
var<workgroup> qv: array<HT, DMAX>;
var<workgroup> part: array<f32, DWG>;
var<workgroup> pw: array<f32, TK>;
var<workgroup> red: array<f32, TK>;

@compute @workgroup_size(DWG)
fn decode_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let batch = p.d0.x;
    let hq = p.d0.y;
    let hkv = max(p.d0.w, 1u);
    let past = p.d1.y;
    let pk_rows = select(past, p.ks.w, p.ks.w != 0u);
    let pv_rows = select(past, p.vs.w, p.vs.w != 0u);
    let total = p.d1.z;
    let dk = p.d1.w;
    let dv = p.d2.x;
    let group = max(p.d2.y, 1u);
    let flags = p.misc.x;
    let scale = bitcast<f32>(p.misc.y);
    let cap = bitcast<f32>(p.misc.z);
    let mask_len = p.misc.w;
    let splits = max(p.sp.x, 1u);
    let gs = group_index(wid, p.d2.w);
    let split = gs % splits;
    let g = gs / splits;
    let live = g < batch * hq;
    let b = g / max(hq, 1u);
    let h = g % max(hq, 1u);
    let kh = h / group;

    var np = total;
    var pastb = past;
    let gqa = (flags & 32u) != 0u;
    if ((flags & 8u) != 0u && live) {
        if (gqa) {
            pastb = u32(max(nonpad[b], 0));
            np = u32(max(nonpad[b] + 1, 0));
        } else {
            np = u32(max(nonpad[b], 0));
        }
    }
    var limit = total;
    if (((flags & 1u) != 0u || gqa) && live) {
        limit = min(total, pastb + 1u);
    }
    if (!live) {
        limit = 0u;
    }
    var first_key = 0u;
    if (splits > 1u) {
        first_key = min(split * p.sp.y, limit);
        limit = min(limit, first_key + p.sp.y);
    }
    if (live) {
        let qb = b * p.qs.x + h * p.qs.y;
        let qs = scale_split(scale).x;
        for (var d = lid; d < dk; d = d + DWG) {
            qv[d] = HT(q[qb + d] * qs);
        }
    }
    // scores: key kk of the tile, lane r of it; values: channel lane cl, key residue kr
    let kk = lid / LANES;
    let r = lid % LANES;
    let cl = lid % TK;
    let kr = lid / TK;
    var acc: array<f32, NA>;
    for (var a = 0u; a < NA; a = a + 1u) {
        acc[a] = 0.0;
    }
    var m = NEG_BIG;
    var l = 0.0;
    let kvb = b * hkv + kh;
    workgroupBarrier();
    for (var t0 = first_key; t0 < limit; t0 = t0 + TK) {
        let j = t0 + kk;
        var ok = j < limit && j < np;
        if ((flags & 1u) != 0u && j > past) {
            ok = false;
        }
        if (gqa && (j > pastb || ((flags & 64u) != 0u && pastb >= j + p.sp.w))) {
            ok = false;
        }
        var bias = 0.0;
        if (ok && (flags & 2u) != 0u) {
            if (j >= mask_len) {
                ok = false;
            } else {
                let mv = mask[b * p.ms.x + h * p.ms.y + j * p.ms.w];
                if ((flags & 4u) != 0u) {
                    ok = mv != 0.0;
                } else if (is_neg_inf(mv)) {
                    ok = false;
                } else {
                    bias = mv;
                }
            }
        }
        var dot = 0.0;
        if (ok) {
            // this lane's products, CHUNK at a time
            var dh = HT(0.0);
            var c = 0u;
            if (j < past) {
                let kb = (kvb * pk_rows + j) * dk;
                for (var d = r; d < dk; d = d + LANES) {
                    dh = dh + qv[d] * HT(load_past_k(kb + d));
                    c = c + 1u;
                    if (c == CHUNK) {
                        dot = dot + f32(dh);
                        dh = HT(0.0);
                        c = 0u;
                    }
                }
            } else {
                let kb = b * p.ks.x + kh * p.ks.y + (j - past) * p.ks.z;
                for (var d = r; d < dk; d = d + LANES) {
                    dh = dh + qv[d] * HT(load_k(kb + d));
                    c = c + 1u;
                    if (c == CHUNK) {
                        dot = dot + f32(dh);
                        dh = HT(0.0);
                        c = 0u;
                    }
                }
            }
            dot = dot + f32(dh);
        }
        part[lid] = dot;
        workgroupBarrier();
        var x = NEG_BIG;
        if (r == 0u) {
            if (ok) {
                var sum = 0.0;
                for (var i = 0u; i < LANES; i = i + 1u) {
                    sum = sum + part[lid + i];
                }
                x = sum * scale_split(scale).y;
                if ((flags & 16u) != 0u) {
                    x = cap * tanh_c(x / cap);
                }
                x = x + bias;
            }
            red[kk] = x;
        }
        // the tile's max
        for (var s = TK / 2u; s > 0u; s = s >> 1u) {
            workgroupBarrier();
            if (lid < s) {
                red[lid] = max(red[lid], red[lid + s]);
            }
        }
        workgroupBarrier();
        let m_new = max(m, red[0]);
        workgroupBarrier();
        if (r == 0u) {
            var w = 0.0;
            if (ok) {
                w = exp(x - m_new);
            }
            pw[kk] = w;
            red[kk] = w;
        }
        for (var s = TK / 2u; s > 0u; s = s >> 1u) {
            workgroupBarrier();
            if (lid < s) {
                red[lid] = red[lid] + red[lid + s];
            }
        }
        workgroupBarrier();
        let c = exp(m - m_new);
        l = l * c + red[0];
        m = m_new;
        let n = min(TK, limit - t0);
        for (var a = 0u; a < NA; a = a + 1u) {
            let d = cl + a * TK;
            var s = acc[a] * c;
            if (d < dv) {
                for (var jj = kr; jj < n; jj = jj + LANES) {
                    let wj = pw[jj];
                    let jv = t0 + jj;
                    var val = HT(0.0);
                    if (jv < past) {
                        val = HT(load_past_v((kvb * pv_rows + jv) * dv + d));
                    } else {
                        val = HT(load_v(b * p.vs.x + kh * p.vs.y + (jv - past) * p.vs.z + d));
                    }
                    // a masked key (weight 0) adds nothing, whatever its value holds
                    s = s + select(0.0, f32(HT(wj) * val), wj != 0.0);
                }
            }
            acc[a] = s;
        }
        workgroupBarrier();
    }
    // the LANES partial sums of each channel (kr = 0 adds the others')
    for (var a = 0u; a < NA; a = a + 1u) {
        part[lid] = acc[a];
        workgroupBarrier();
        if (kr == 0u) {
            var sum = 0.0;
            for (var i = 0u; i < LANES; i = i + 1u) {
                sum = sum + part[cl + i * TK];
            }
            acc[a] = sum;
        }
        workgroupBarrier();
    }
    if (!live || kr != 0u) {
        return;
    }
    if (splits > 1u) {
        let at = ((kvb * group + (h % group)) * splits + split) * (dv + 2u);
        if (lid == 0u) {
            y[at] = m;
            y[at + 1u] = l;
        }
        for (var a = 0u; a < NA; a = a + 1u) {
            let d = cl + a * TK;
            if (d < dv) {
                y[at + 2u + d] = acc[a];
            }
        }
        return;
    }
    let yb = b * p.ys.x + h * p.ys.y;
    var inv = 0.0;
    if (l > 0.0) {
        inv = 1.0 / l;
    }
    for (var a = 0u; a < NA; a = a + 1u) {
        let d = cl + a * TK;
        if (d < dv) {
            y[yb + d] = acc[a] * inv;
        }
    }
}
