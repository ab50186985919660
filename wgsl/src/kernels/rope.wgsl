// RotaryEmbedding (kiln's RotaryOp): one invocation per output element. The element's channel d of its head
// either passes through (d >= rotary dim) or is one half of a rotated pair (x1, x2): NeoX halves (i, i + half) or
// GPT-J interleaved pairs (2i, 2i + 1); x1' = cos·x1 − sin·x2, x2' = sin·x1 + cos·x2, cos / sin from the cache row
// of (b, s): position_ids[b, s], position_ids[0] + s (an offset), max(seqlens_k[b] + 1 - seq, 0) + s
// (GroupQueryAttention's seqlens_k), or b·seq + s (no position_ids).
// rope2_main: two tensors (a layer's q and k) with the same caches and positions in one dispatch; elements
// 0..n1 are the first's, the rest the second's (its own head count and strides, d4).
// rope_kv_main: rope2_main whose second tensor (k, [batch, heads, seq, head]) goes rotated into the rows of a KV
// store after its past rows (and to an output of its own with K_OUT), and a third (v, the same layout) is copied
// into another store likewise: a decode step's rotations and KV appends in one dispatch. Element g of a
// [b, h, s, d] tensor is block g / (s·d), row offset g % (s·d); in the store: block · cap·d + past·d + that offset.
// The stores hold f32 (STORE_T f32, PAIR 1) or float16 as u32 words of two (STORE_T u32, PAIR 2: an invocation
// makes both halves of a word). POS_AT: how rotation() reads a position (no binding 5 without position_ids).

struct Params {
    // elements, groups_x, batch, heads
    d0: vec4<u32>,
    // seq, head, rotary dim, cache columns
    d1: vec4<u32>,
    // strides (batch, head, seq) of the input, flags (1 interleaved, 2 positions, 4 offset, 8 seqlens_k)
    d2: vec4<u32>,
    // cache rows, elements of the first tensor (rope2_main), -, -
    d3: vec4<u32>,
    // the second tensor (rope2_main): heads, strides (batch, head, seq)
    d4: vec4<u32>,
    // rope_kv_main, k then v: elements, seq·head, cap·head (the store's block), past·head (the rows kept)
    d5: vec4<u32>,
    d6: vec4<u32>,
};

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> cos_c: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<storage, read> sin_c: array<f32>;
@group(0) @binding(5) var<storage, read> pos: array<i32>;
@group(0) @binding(6) var<storage, read> x2: array<f32>;
@group(0) @binding(7) var<storage, read_write> out2: array<f32>;
@group(0) @binding(8) var<storage, read> v_in: array<f32>;
@group(0) @binding(9) var<storage, read_write> v_store: array<{{STORE_T}}>;
@group(0) @binding(10) var<storage, read_write> k_store: array<{{STORE_T}}>;

const PAIR: u32 = {{PAIR}}u;

fn pos_at(i: u32) -> i32 {
    {{POS_AT}}
}

// A store element of values a (and b, PAIR 2).
fn store_val(a: f32, b: f32) -> {{STORE_T}} {
    {{STORE_VAL}}
}

// Where element f (of a tensor with `heads` heads and strides st) takes its value from: `keep` (a channel past
// the rotary dim: partner is f itself), else the index of its partner, the cache's cos / sin and which half of the
// pair it is.
struct Rot {
    keep: bool,
    partner: u32,
    c: f32,
    sn: f32,
    first: bool,
};

fn rotation(f: u32, heads: u32, st: vec3<u32>) -> Rot {
    var r: Rot;
    let seq = p.d1.x;
    let head = p.d1.y;
    let rot = p.d1.z;
    let cols = p.d1.w;
    let flags = p.d2.w;
    // (b, h, s, d) of f through the strides (the input is contiguous: one of them is `head`)
    let d = f % head;
    let rest = f - d;
    let b = rest / st.x;
    let h = (rest % st.x) / st.y % heads;
    let s = (rest % st.x) / st.z % seq;
    r.keep = d >= rot;
    if (r.keep) {
        r.partner = f;
        return r;
    }
    let half = rot / 2u;
    var i = 0u;
    var partner = 0u;
    if ((flags & 1u) != 0u) {
        i = d / 2u;
        r.first = d % 2u == 0u;
        partner = select(d - 1u, d + 1u, r.first);
    } else {
        r.first = d < half;
        i = select(d - half, d, r.first);
        partner = select(d - half, d + half, r.first);
    }
    r.partner = rest + partner;
    var row = b * seq + s;
    if ((flags & 2u) != 0u) {
        var pv = 0;
        if ((flags & 8u) != 0u) {
            pv = max(pos_at(b) + 1 - i32(seq), 0) + i32(s);
        } else if ((flags & 4u) != 0u) {
            pv = pos_at(0u) + i32(s);
        } else {
            pv = pos_at(b * seq + s);
        }
        // the CPU rejects a position outside the cache; never read outside it here
        row = u32(clamp(pv, 0, i32(p.d3.x) - 1));
    }
    r.c = cos_c[row * cols + i];
    r.sn = sin_c[row * cols + i];
    return r;
}

// The output of an element: itself past the rotary dim, else its half of the rotated pair.
fn rotated(r: Rot, xs: f32, xp: f32) -> f32 {
    if (r.keep) {
        return xs;
    }
    if (r.first) {
        return r.c * xs - r.sn * xp;
    }
    return r.sn * xp + r.c * xs;
}

@compute @workgroup_size(WG)
fn rope_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let f = flat_index(wid, lid, p.d0.y);
    if (f >= p.d0.x) {
        return;
    }
    let r = rotation(f, p.d0.w, p.d2.xyz);
    out[f] = rotated(r, x[f], x[r.partner]);
}

@compute @workgroup_size(WG)
fn rope2_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let f = flat_index(wid, lid, p.d0.y);
    if (f >= p.d0.x) {
        return;
    }
    let n1 = p.d3.y;
    if (f < n1) {
        let r = rotation(f, p.d0.w, p.d2.xyz);
        out[f] = rotated(r, x[f], x[r.partner]);
    } else {
        let g = f - n1;
        let r = rotation(g, p.d4.x, p.d4.yzw);
        out2[g] = rotated(r, x2[g], x2[r.partner]);
    }
}

// The index in a KV store (block stride b.z, rows kept b.w) of element g of a contiguous [b, h, s, d] tensor
// (s·d = b.y).
fn store_index(g: u32, b: vec4<u32>) -> u32 {
    return (g / b.y) * b.z + b.w + g % b.y;
}

// Element g of the second tensor (k), rotated.
fn k_rotated(g: u32) -> f32 {
    let r = rotation(g, p.d4.x, p.d4.yzw);
    return rotated(r, x2[g], x2[r.partner]);
}

@compute @workgroup_size(WG)
fn rope_kv_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let f = flat_index(wid, lid, p.d0.y);
    if (f >= p.d0.x) {
        return;
    }
    let n1 = p.d3.y;
    let n2 = p.d5.x / PAIR;
    if (f < n1) {
        let r = rotation(f, p.d0.w, p.d2.xyz);
        out[f] = rotated(r, x[f], x[r.partner]);
    } else if (f < n1 + n2) {
        let g = (f - n1) * PAIR;
        let r0 = k_rotated(g);
        var r1 = r0;
        if (PAIR == 2u) {
            r1 = k_rotated(g + 1u);
        }
        {{K_OUT}}
        k_store[store_index(g, p.d5) / PAIR] = store_val(r0, r1);
    } else {
        let g = (f - n1 - n2) * PAIR;
        let a = v_in[g];
        var b = a;
        if (PAIR == 2u) {
            b = v_in[g + 1u];
        }
        v_store[store_index(g, p.d6) / PAIR] = store_val(a, b);
    }
}
