// RotaryEmbedding (kiln's RotaryOp): one invocation per output element. The element's channel d of its head
// either passes through (d >= rotary dim) or is one half of a rotated pair (x1, x2): NeoX halves (i, i + half) or
// GPT-J interleaved pairs (2i, 2i + 1); x1' = cos·x1 − sin·x2, x2' = sin·x1 + cos·x2, cos / sin from the cache row
// of (b, s): position_ids[b, s], position_ids[0] + s (an offset), max(seqlens_k[b] + 1 - seq, 0) + s
// (GroupQueryAttention's seqlens_k), or b·seq + s (no position_ids).

struct Params {
    // elements, groups_x, batch, heads
    d0: vec4<u32>,
    // seq, head, rotary dim, cache columns
    d1: vec4<u32>,
    // strides (batch, head, seq) of the input, flags (1 interleaved, 2 positions, 4 offset, 8 seqlens_k)
    d2: vec4<u32>,
    // cache rows, -, -, -
    d3: vec4<u32>,
};

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> cos_c: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<storage, read> sin_c: array<f32>;
@group(0) @binding(5) var<storage, read> pos: array<i32>;

@compute @workgroup_size(WG)
fn rope_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let f = flat_index(wid, lid, p.d0.y);
    if (f >= p.d0.x) {
        return;
    }
    let heads = p.d0.w;
    let seq = p.d1.x;
    let head = p.d1.y;
    let rot = p.d1.z;
    let cols = p.d1.w;
    let flags = p.d2.w;
    // (b, h, s, d) of f through the strides (the input is contiguous: one of them is `head`)
    let d = f % head;
    let rest = f - d;
    let b = rest / p.d2.x;
    let h = (rest % p.d2.x) / p.d2.y % heads;
    let s = (rest % p.d2.x) / p.d2.z % seq;
    if (d >= rot) {
        out[f] = x[f];
        return;
    }
    let half = rot / 2u;
    var i = 0u;
    var first = true;
    var partner = 0u;
    if ((flags & 1u) != 0u) {
        i = d / 2u;
        first = d % 2u == 0u;
        partner = select(d - 1u, d + 1u, first);
    } else {
        first = d < half;
        i = select(d - half, d, first);
        partner = select(d - half, d + half, first);
    }
    var row = b * seq + s;
    if ((flags & 2u) != 0u) {
        var pv = 0;
        if ((flags & 8u) != 0u) {
            pv = max(pos[b] + 1 - i32(seq), 0) + i32(s);
        } else if ((flags & 4u) != 0u) {
            pv = pos[0] + i32(s);
        } else {
            pv = pos[b * seq + s];
        }
        // the CPU rejects a position outside the cache; never read outside it here
        row = u32(clamp(pv, 0, i32(p.d3.x) - 1));
    }
    let c = cos_c[row * cols + i];
    let sn = sin_c[row * cols + i];
    let xs = x[f];
    let xp = x[rest + partner];
    if (first) {
        out[f] = c * xs - sn * xp;
    } else {
        out[f] = sn * xp + c * xs;
    }
}
