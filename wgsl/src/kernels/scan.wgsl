// CumSum along one axis: one invocation per line (`len` elements `inner` apart, `rows` = outer × inner lines),
// summed in order like the CPU (f32 results match it bit for bit). p.flags: bit 0 exclusive, bit 1 reverse.
// {{TYPE}}: f32 or i32 (i64 lives on the GPU as i32; i32 adds wrap). Elements are stored as u32 bits.

struct Params {
    rows: u32,
    len: u32,
    inner: u32,
    groups_x: u32,
    flags: u32,
    _p0: u32,
    _p1: u32,
    _p2: u32,
};

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<u32>;

@compute @workgroup_size(WG)
fn cumsum_main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let line = flat_index(wid, lid, p.groups_x);
    if (line >= p.rows) {
        return;
    }
    let inner = max(p.inner, 1u);
    let base = (line / inner) * p.len * inner + line % inner;
    let exclusive = (p.flags & 1u) != 0u;
    let reverse = (p.flags & 2u) != 0u;
    var acc = {{TYPE}}(0);
    for (var t = 0u; t < p.len; t = t + 1u) {
        var j = t;
        if (reverse) {
            j = p.len - 1u - t;
        }
        let at = base + j * p.inner;
        let v = bitcast<{{TYPE}}>(x[at]);
        if (exclusive) {
            out[at] = bitcast<u32>(acc);
            acc = acc + v;
        } else {
            acc = acc + v;
            out[at] = bitcast<u32>(acc);
        }
    }
}
