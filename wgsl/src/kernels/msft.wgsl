// com.microsoft ops' helper kernels.
//
// gqa_kv_main (GroupQueryAttention's present_key / present_value): one invocation per output element
// [batch, kv_heads, past + seq, head]; for batch b with past_b = max(seqlens_k[b] + 1 - seq, 0), rows < past_b come
// from past ([batch, kv_heads, past, head]), rows past_b .. past_b + seq from the new keys ([batch, seq,
// kv_heads·head]), the rest are zeros.

struct Params {
    // elements, groups_x, batch, kv heads
    d0: vec4<u32>,
    // seq, head, past, present length
    d1: vec4<u32>,
};

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> seqlens: array<i32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<storage, read> past: array<f32>;

@compute @workgroup_size(WG)
fn gqa_kv_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let f = flat_index(wid, lid, p.d0.y);
    if (f >= p.d0.x) {
        return;
    }
    let heads = p.d0.w;
    let seq = p.d1.x;
    let head = p.d1.y;
    let np = p.d1.z;
    let t = p.d1.w;
    let d = f % head;
    let r = (f / head) % t;
    let h = (f / (head * t)) % heads;
    let b = f / (head * t * heads);
    let pb = u32(max(seqlens[b] + 1 - i32(seq), 0));
    var val = 0.0;
    if (r >= pb && r < pb + seq) {
        val = x[(b * seq + (r - pb)) * heads * head + h * head + d];
    } else if (r < pb && r < np) {
        val = past[((b * heads + h) * np + r) * head + d];
    }
    out[f] = val;
}
