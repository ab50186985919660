// Batched MatMul on f32, C[b, m, n] = sum_k A[b, m, k] * B[b, k, n], every operand addressed through strides, so
// transposed operands and broadcast batch dims (stride 0) need no copy. Sizes and strides are uniforms.
//   tiled:   M > 1, a 64x64 output tile per 16x16 workgroup (4x4 per invocation), K in steps of 16 through
//            workgroup memory.
//   mv_split: M = 1, B contiguous along n: 16 columns per workgroup, 16 lanes along k each (see below).
//   mv_dot:  M = 1, one 64-wide workgroup per output column reducing along k (B contiguous along k).

struct Params {
    m: u32,
    n: u32,
    k: u32,
    batch_rank: u32,
    a_sm: u32,
    a_sk: u32,
    b_sk: u32,
    b_sn: u32,
    c_sm: u32,
    c_sn: u32,
    groups_x: u32,
    _pad: u32,
    bshape: vec4<u32>,
    a_bs: vec4<u32>,
    b_bs: vec4<u32>,
    c_bs: vec4<u32>,
};

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
// B: f32, or float16 pairs in u32 words (a float16 weight kept float16 on the GPU: half the bytes to read)
@group(0) @binding(2) var<storage, read> b: array<{{B_ELEM}}>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;

fn b_at(i: u32) -> f32 {
    return {{B_LOAD}};
}

fn batch_offsets(z: u32) -> vec3<u32> {
    var rem = z;
    var off = vec3<u32>(0u, 0u, 0u);
    for (var d = p.batch_rank; d > 0u; d = d - 1u) {
        let dim = p.bshape[d - 1u];
        let i = rem % dim;
        rem = rem / dim;
        off = off + i * vec3<u32>(p.a_bs[d - 1u], p.b_bs[d - 1u], p.c_bs[d - 1u]);
    }
    return off;
}

var<workgroup> As: array<f32, 1024>;
var<workgroup> Bs: array<f32, 1024>;

@compute @workgroup_size(16, 16)
fn tiled(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
         @builtin(local_invocation_index) li: u32) {
    let off = batch_offsets(wid.z);
    let m0 = wid.y * 64u;
    let n0 = wid.x * 64u;
    var acc: array<f32, 16>;
    for (var k0 = 0u; k0 < p.k; k0 = k0 + 16u) {
        for (var t = 0u; t < 4u; t = t + 1u) {
            let e = li + t * 256u;
            let kk = e / 64u;
            let xx = e % 64u;
            let gk = k0 + kk;
            var va = 0.0;
            if (m0 + xx < p.m && gk < p.k) {
                va = a[off.x + (m0 + xx) * p.a_sm + gk * p.a_sk];
            }
            As[e] = va;
            var vb = 0.0;
            if (n0 + xx < p.n && gk < p.k) {
                vb = b_at(off.y + gk * p.b_sk + (n0 + xx) * p.b_sn);
            }
            Bs[e] = vb;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < 16u; kk = kk + 1u) {
            var av: array<f32, 4>;
            var bv: array<f32, 4>;
            for (var i = 0u; i < 4u; i = i + 1u) {
                av[i] = As[kk * 64u + lid.y + 16u * i];
                bv[i] = Bs[kk * 64u + lid.x + 16u * i];
            }
            for (var i = 0u; i < 4u; i = i + 1u) {
                for (var j = 0u; j < 4u; j = j + 1u) {
                    acc[i * 4u + j] = acc[i * 4u + j] + av[i] * bv[j];
                }
            }
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < 4u; i = i + 1u) {
        let gm = m0 + lid.y + 16u * i;
        for (var j = 0u; j < 4u; j = j + 1u) {
            let gn = n0 + lid.x + 16u * j;
            if (gm < p.m && gn < p.n) {
                c[off.z + gm * p.c_sm + gn * p.c_sn] = acc[i * 4u + j];
            }
        }
    }
}

var<workgroup> red: array<f32, 64>;

@compute @workgroup_size(64)
fn mv_dot(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let n = group_index(wid, p.groups_x);
    let off = batch_offsets(wid.z);
    var acc = 0.0;
    if (n < p.n) {
        for (var k = li; k < p.k; k = k + 64u) {
            acc = acc + a[off.x + k * p.a_sk] * b_at(off.y + k * p.b_sk + n * p.b_sn);
        }
    }
    red[li] = acc;
    workgroupBarrier();
    for (var s = 32u; s > 0u; s = s / 2u) {
        if (li < s) {
            red[li] = red[li] + red[li + s];
        }
        workgroupBarrier();
    }
    if (li == 0u && n < p.n) {
        c[off.z + n * p.c_sn] = red[0];
    }
}

// mv_split: M = 1, B contiguous along n (the decode shape of every projection). A workgroup covers 16 output
// columns with 16 lanes along k each (neighbouring invocations read neighbouring columns: 64-byte segments), four
// independent loads in flight per lane; the 16 partial sums of a column meet in workgroup memory. mv_rows' one
// invocation per column (the kernel before it) walked all of k alone: a few workgroups for N = 576, each a chain of dependent loads.
var<workgroup> part: array<f32, 256>;

@compute @workgroup_size(256)
fn mv_split(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let col = li % 16u;
    let lane = li / 16u;
    let n = group_index(wid, p.groups_x) * 16u + col;
    let off = batch_offsets(wid.z);
    var acc = vec4<f32>(0.0);
    if (n < p.n) {
        let bn = off.y + n * p.b_sn;
        var k = lane;
        for (; k + 48u < p.k; k = k + 64u) {
            let x = vec4<f32>(a[off.x + k * p.a_sk], a[off.x + (k + 16u) * p.a_sk], a[off.x + (k + 32u) * p.a_sk],
                              a[off.x + (k + 48u) * p.a_sk]);
            let w = vec4<f32>(b_at(bn + k * p.b_sk), b_at(bn + (k + 16u) * p.b_sk), b_at(bn + (k + 32u) * p.b_sk),
                              b_at(bn + (k + 48u) * p.b_sk));
            acc = acc + x * w;
        }
        for (; k < p.k; k = k + 16u) {
            acc.x = acc.x + a[off.x + k * p.a_sk] * b_at(bn + k * p.b_sk);
        }
    }
    part[li] = (acc.x + acc.y) + (acc.z + acc.w);
    workgroupBarrier();
    for (var s = 8u; s > 0u; s = s / 2u) {
        if (lane < s) {
            part[li] = part[li] + part[li + s * 16u];
        }
        workgroupBarrier();
    }
    if (lane == 0u && n < p.n) {
        c[off.z + n * p.c_sn] = part[li];
    }
}

// onnxruntime's CPU rounding (MLAS's SGEMM, and tract's CPU kernels: one fused multiply-add per k, in order, from
// zero): one invocation per output element, batch along z. `_pad` is zero at run time (`opq`).
@compute @workgroup_size(64)
fn mm_exact(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let i = group_index(wid, p.groups_x) * 64u + li;
    if (i >= p.m * p.n) {
        return;
    }
    let off = batch_offsets(wid.z);
    let m = i / p.n;
    let n = i % p.n;
    var acc = 0.0;
    for (var k = 0u; k < p.k; k = k + 1u) {
        acc = fma_x(a[off.x + m * p.a_sm + k * p.a_sk], b_at(off.y + k * p.b_sk + n * p.b_sn), acc, p._pad);
    }
    c[off.z + m * p.c_sm + n * p.c_sn] = acc;
}
