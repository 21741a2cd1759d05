// layernorm.cu: layernorm forward and backward (any C, and bf16 rows kept in registers), and the fused
// residual + layernorm forward.
//
// Part of the CUDA backend: the kernels and their launchers; backend_cuda.cu puts the launchers in
// the backend table. Shared context, checks and device helpers: cuda_internal.cuh.

#include "cuda_internal.cuh"
#include "colsum.cuh"

// -- layernorm, any C: one warp per row, statistics in S (double on the fp32 path)

template <typename E, typename S>
__global__ void layernorm_fwd_kernel(E *out, float *mean, float *rstd, const E *inp, const E *w,
                                     const E *b, int N, int C) {
    int row = blockIdx.x * (blockDim.x / TPC_WARP) + threadIdx.x / TPC_WARP;
    int lane = threadIdx.x % TPC_WARP;
    if (row >= N) return; // the whole warp leaves together
    const E *x = inp + (size_t)row * C; // (C)
    E *y = out + (size_t)row * C;       // (C)
    // Two passes over the row (it stays in L1) rather than E[x^2] - m^2, which cancels badly.
    // In double on the fp32 path: cheap next to the memory traffic, and they set the accuracy of
    // everything downstream.
    S s = 0;
    for (int c = lane; c < C; c += TPC_WARP) s += (S)to_f(x[c]);
    float m = (float)(warp_reduce(s, sum_op()) / C);
    S v = 0;
    for (int c = lane; c < C; c += TPC_WARP) {
        S d = (S)to_f(x[c]) - (S)m;
        v += d * d;
    }
    float rs = (float)((S)1 / sqrt(warp_reduce(v, sum_op()) / C + (S)LN_EPS));
    for (int c = lane; c < C; c += TPC_WARP)
        y[c] = from_f<E>((to_f(x[c]) - m) * rs * to_f(w[c]) + to_f(b[c]));
    if (lane == 0) {
        if (mean) mean[row] = m;
        if (rstd) rstd[row] = rs;
    }
}

// dinp (N, C) += per row: (dnorm - mean(dnorm) - norm * mean(dnorm * norm)) * rstd
template <typename E>
__global__ void layernorm_bwd_dinp_kernel(E *dinp, const E *dout, const E *inp, const E *w,
                                          const float *mean, const float *rstd, int N, int C) {
    int row = blockIdx.x * (blockDim.x / TPC_WARP) + threadIdx.x / TPC_WARP;
    int lane = threadIdx.x % TPC_WARP;
    if (row >= N) return;
    const E *x = inp + (size_t)row * C;
    const E *dy = dout + (size_t)row * C;
    E *dx = dinp + (size_t)row * C;
    float m = mean[row], rs = rstd[row];
    float s1 = 0.0f, s2 = 0.0f;
    // dn is rounded on its own (__fmul_rn is never fused into an FMA): fused into dn - s1 it
    // would leave the product's rounding error where the reference cancels exactly (C = 1, or
    // rows whose dnorm is flat).
    for (int c = lane; c < C; c += TPC_WARP) {
        float n = (to_f(x[c]) - m) * rs;
        float dn = __fmul_rn(to_f(w[c]), to_f(dy[c]));
        s1 += dn;
        s2 += dn * n;
    }
    s1 = warp_sum_f(s1) / (float)C;
    s2 = warp_sum_f(s2) / (float)C;
    for (int c = lane; c < C; c += TPC_WARP) {
        float n = (to_f(x[c]) - m) * rs;
        float dn = __fmul_rn(to_f(w[c]), to_f(dy[c]));
        dx[c] = from_f<E>(to_f(dx[c]) + (dn - s1 - n * s2) * rs);
    }
}

// grid (ceil(N / COLSUM_ROWS), ceil(C / blockDim)): pw/pb (nchunks, C) = per-chunk column sums of
// dout * norm and dout, rows in order.
template <typename E>
__global__ void layernorm_bwd_partial_kernel(float *pw, float *pb, const E *dout, const E *inp,
                                             const float *mean, const float *rstd, int N, int C) {
    int c = blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= C) return;
    int r0 = blockIdx.x * COLSUM_ROWS;
    int r1 = min(N, r0 + COLSUM_ROWS);
    float sw = 0.0f, sb = 0.0f;
    for (int r = r0; r < r1; r++) {
        size_t at = (size_t)r * C + c;
        float dy = to_f(dout[at]);
        float n = (to_f(inp[at]) - mean[r]) * rstd[r];
        sw += dy * n;
        sb += dy;
    }
    pw[(size_t)blockIdx.x * C + c] = sw;
    pb[(size_t)blockIdx.x * C + c] = sb;
}

// -- layernorm, bf16 with C a multiple of 8 (C <= 8 * 32 * LN_MAX_VPL): one warp per row, the row
// in registers as VPL 16-byte vectors per lane (vector v = lane + 32 j), fp32 statistics.
// RESID: the row is first formed as inp + xadd (+ bias), rounded, stored to sum_out (which may
// alias inp or xadd: each element is read and written by the same lane) and normalised as stored.

template <int VPL, bool RESID>
__global__ void __launch_bounds__(TPC_BLOCK)
layernorm_fwd_bf16_kernel(bf16 *out, float *mean, float *rstd, const bf16 *inp, const bf16 *w,
                          const bf16 *b, int N, int C, bf16 *sum_out, const bf16 *xadd,
                          const bf16 *bias) {
    int row = blockIdx.x * (blockDim.x / TPC_WARP) + threadIdx.x / TPC_WARP;
    int lane = threadIdx.x % TPC_WARP;
    if (row >= N) return;
    const int nvec = C / 8;
    const bf16 *x = inp + (size_t)row * C; // (C)
    bf16 *y = out + (size_t)row * C;       // (C)
    float xv[VPL][8];
    float s = 0.0f;
#pragma unroll
    for (int j = 0; j < VPL; j++) {
        int v = lane + j * TPC_WARP;
        if (v < nvec) {
            vec_t<bf16, 8> p = ld_vec<bf16, 8>(x + (size_t)v * 8);
            if (RESID) {
                vec_t<bf16, 8> a = ld_vec<bf16, 8>(xadd + (size_t)row * C + (size_t)v * 8);
                vec_t<bf16, 8> bb = {};
                if (bias) bb = ld_vec<bf16, 8>(bias + (size_t)v * 8);
#pragma unroll
                for (int e = 0; e < 8; e++) {
                    float r = to_f(p.e[e]) + to_f(a.e[e]);
                    if (bias) r += to_f(bb.e[e]);
                    p.e[e] = from_f<bf16>(r);
                }
                st_vec<bf16, 8>(sum_out + (size_t)row * C + (size_t)v * 8, p);
            }
#pragma unroll
            for (int e = 0; e < 8; e++) {
                xv[j][e] = to_f(p.e[e]);
                s += xv[j][e];
            }
        }
    }
    float m = warp_sum_f(s) / (float)C;
    float var = 0.0f;
#pragma unroll
    for (int j = 0; j < VPL; j++) {
        if (lane + j * TPC_WARP < nvec) {
#pragma unroll
            for (int e = 0; e < 8; e++) {
                float d = xv[j][e] - m;
                var += d * d;
            }
        }
    }
    float rs = rsqrtf(warp_sum_f(var) / (float)C + (float)LN_EPS);
#pragma unroll
    for (int j = 0; j < VPL; j++) {
        int v = lane + j * TPC_WARP;
        if (v < nvec) {
            vec_t<bf16, 8> wv = ld_vec<bf16, 8>(w + (size_t)v * 8);
            vec_t<bf16, 8> bv = ld_vec<bf16, 8>(b + (size_t)v * 8);
            vec_t<bf16, 8> o;
#pragma unroll
            for (int e = 0; e < 8; e++)
                o.e[e] = from_f<bf16>((xv[j][e] - m) * rs * to_f(wv.e[e]) + to_f(bv.e[e]));
            st_vec<bf16, 8>(y + (size_t)v * 8, o);
        }
    }
    if (lane == 0) {
        if (mean) mean[row] = m;
        if (rstd) rstd[row] = rs;
    }
}

// The whole backward in one pass: warp w of block k takes rows k * nwarps + w, stepping by
// gridDim * nwarps (the grid depends on N only). dinp += as layernorm_bwd_dinp_kernel; each lane
// keeps running column sums of dout * norm and dout for its channels over its rows, the block adds
// its warps' sums in warp order (shared memory, 2 * C floats) and writes one partial row each of
// pdw, pdb (gridDim, C); colsum2_finish_kernel adds the partials in block order. The second pass
// over a row reloads x, dout and w (L1 hits) rather than holding them, which leaves the registers
// to the column sums; the dinp it adds to is loaded with them in the first pass, so that a row
// waits on memory once, not twice.
template <int VPL>
__global__ void __launch_bounds__(TPC_BLOCK, VPL <= 4 ? 2 : 1)
layernorm_bwd_bf16_kernel(bf16 *dinp, float *pdw, float *pdb, const bf16 *dout, const bf16 *inp,
                          const bf16 *w, const float *mean, const float *rstd, int N, int C) {
    extern __shared__ float ln_red[]; // (2, C)
    const int lane = threadIdx.x % TPC_WARP, warp = threadIdx.x / TPC_WARP;
    const int nwarps = blockDim.x / TPC_WARP;
    const int nvec = C / 8;
    float dw_acc[VPL][8], db_acc[VPL][8];
#pragma unroll
    for (int j = 0; j < VPL; j++)
#pragma unroll
        for (int e = 0; e < 8; e++) dw_acc[j][e] = db_acc[j][e] = 0.0f;

    for (int row = blockIdx.x * nwarps + warp; row < N; row += gridDim.x * nwarps) {
        const bf16 *x = inp + (size_t)row * C;  // (C)
        const bf16 *dy = dout + (size_t)row * C; // (C)
        bf16 *dx = dinp + (size_t)row * C;       // (C)
        float m = mean[row], rs = rstd[row];
        float s1 = 0.0f, s2 = 0.0f;
        vec_t<bf16, 8> gp[VPL];
#pragma unroll
        for (int j = 0; j < VPL; j++) {
            int v = lane + j * TPC_WARP;
            if (v < nvec) {
                vec_t<bf16, 8> xp = ld_vec<bf16, 8>(x + (size_t)v * 8);
                vec_t<bf16, 8> dp = ld_vec<bf16, 8>(dy + (size_t)v * 8);
                vec_t<bf16, 8> wp = ld_vec<bf16, 8>(w + (size_t)v * 8);
                gp[j] = ld_vec<bf16, 8>(dx + (size_t)v * 8);
#pragma unroll
                for (int e = 0; e < 8; e++) {
                    float n = (to_f(xp.e[e]) - m) * rs;
                    float d = to_f(dp.e[e]);
                    float dn = __fmul_rn(to_f(wp.e[e]), d);
                    s1 += dn;
                    s2 += dn * n;
                    dw_acc[j][e] += d * n;
                    db_acc[j][e] += d;
                }
            }
        }
        s1 = warp_sum_f(s1) / (float)C;
        s2 = warp_sum_f(s2) / (float)C;
#pragma unroll
        for (int j = 0; j < VPL; j++) {
            int v = lane + j * TPC_WARP;
            if (v < nvec) {
                vec_t<bf16, 8> xp = ld_vec<bf16, 8>(x + (size_t)v * 8);
                vec_t<bf16, 8> dp = ld_vec<bf16, 8>(dy + (size_t)v * 8);
                vec_t<bf16, 8> wp = ld_vec<bf16, 8>(w + (size_t)v * 8);
#pragma unroll
                for (int e = 0; e < 8; e++) {
                    float n = (to_f(xp.e[e]) - m) * rs;
                    float dn = __fmul_rn(to_f(wp.e[e]), to_f(dp.e[e]));
                    gp[j].e[e] = from_f<bf16>(to_f(gp[j].e[e]) + (dn - s1 - n * s2) * rs);
                }
                st_vec<bf16, 8>(dx + (size_t)v * 8, gp[j]);
            }
        }
    }

    // the block's column sums: warps add in order, one at a time
    for (int k = 0; k < nwarps; k++) {
        if (warp == k) {
#pragma unroll
            for (int j = 0; j < VPL; j++) {
                int v = lane + j * TPC_WARP;
                if (v < nvec) {
#pragma unroll
                    for (int e = 0; e < 8; e++) {
                        int c = v * 8 + e;
                        ln_red[c] = (k == 0 ? 0.0f : ln_red[c]) + dw_acc[j][e];
                        ln_red[C + c] = (k == 0 ? 0.0f : ln_red[C + c]) + db_acc[j][e];
                    }
                }
            }
        }
        __syncthreads();
    }
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        pdw[(size_t)blockIdx.x * C + c] = ln_red[c];
        pdb[(size_t)blockIdx.x * C + c] = ln_red[C + c];
    }
}

// The same backward with the next row in flight: warp w of block k takes rows k * nwarps + w,
// stepping by gridDim * nwarps, and issues the loads of its next row (x, dout, dinp, mean, rstd)
// before it works on the current one, so two rows per warp wait on memory at once. The running
// column sums (dw, db and, with NS = 3, dsum: the column sums of dinp as stored) live in shared
// memory, one set per warp, which leaves the registers to the two rows. Each warp's sums are laid
// out as NS x 2 x nvec float4s: the first and the second four of vector v's eight channels apart,
// so that a warp's 16-byte accesses are contiguous. At the end the warps' sums are added in warp
// order into one partial row per block and sum: part (NS, gridDim, C). dinp is computed as in
// layernorm_bwd_bf16_kernel, so it has the same bits; dw and db are summed in another order.
template <int VPL> struct ln_bwd_row {
    vec_t<bf16, 8> x[VPL], dy[VPL], g[VPL];
    float m, rs;
};

template <int VPL>
__device__ __forceinline__ void ln_bwd_row_load(ln_bwd_row<VPL> &r, int row, const bf16 *inp,
                                                const bf16 *dout, const bf16 *dinp,
                                                const float *mean, const float *rstd, int C,
                                                int lane) {
    const int nvec = C / 8;
    size_t base = (size_t)row * C;
    r.m = mean[row];
    r.rs = rstd[row];
#pragma unroll
    for (int j = 0; j < VPL; j++) {
        int v = lane + j * TPC_WARP;
        if (v < nvec) {
            r.x[j] = ld_vec<bf16, 8>(inp + base + (size_t)v * 8);
            r.dy[j] = ld_vec<bf16, 8>(dout + base + (size_t)v * 8);
            r.g[j] = ld_vec<bf16, 8>(dinp + base + (size_t)v * 8);
        }
    }
}

// Hides v's bits from the optimiser, so that what was computed from them before this point is
// recomputed after it rather than kept in registers across it.
template <int VPL> __device__ __forceinline__ void ln_opaque(vec_t<bf16, 8> (&v)[VPL]) {
#pragma unroll
    for (int j = 0; j < VPL; j++)
#pragma unroll
        for (int q = 0; q < 4; q++) asm volatile("" : "+r"(reinterpret_cast<uint32_t *>(&v[j])[q]));
}

// acc (2 * nvec float4s: the sum's channels 0-3 of each vector, then 4-7) += a's 8 channels of vector v
__device__ __forceinline__ void ln_acc_add(float4 *acc, int v, int nvec, const float (&a)[8]) {
    float4 lo = acc[v], hi = acc[nvec + v];
    lo.x += a[0];
    lo.y += a[1];
    lo.z += a[2];
    lo.w += a[3];
    hi.x += a[4];
    hi.y += a[5];
    hi.z += a[6];
    hi.w += a[7];
    acc[v] = lo;
    acc[nvec + v] = hi;
}

template <int VPL, int NS>
__global__ void __launch_bounds__(LN_BWD2_THREADS)
layernorm_bwd_pipelined_kernel(bf16 *dinp, float *part, const bf16 *dout, const bf16 *inp,
                               const bf16 *__restrict__ w, const float *mean, const float *rstd,
                               int N, int C) {
    extern __shared__ float4 ln_acc[]; // (nwarps, NS, 2 * nvec)
    const int lane = threadIdx.x % TPC_WARP, warp = threadIdx.x / TPC_WARP;
    const int nwarps = blockDim.x / TPC_WARP;
    const int nvec = C / 8;
    float4 *acc = ln_acc + (size_t)warp * NS * 2 * nvec;
    for (int i = lane; i < NS * 2 * nvec; i += TPC_WARP) acc[i] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    __syncwarp();

    const int stride = gridDim.x * nwarps;
    int row = blockIdx.x * nwarps + warp;
    ln_bwd_row<VPL> cur;
    if (row < N) ln_bwd_row_load<VPL>(cur, row, inp, dout, dinp, mean, rstd, C, lane);
    for (; row < N; row += stride) {
        ln_bwd_row<VPL> next;
        if (row + stride < N)
            ln_bwd_row_load<VPL>(next, row + stride, inp, dout, dinp, mean, rstd, C, lane);
        const float m = cur.m, rs = cur.rs;
        float s1 = 0.0f, s2 = 0.0f;
#pragma unroll
        for (int j = 0; j < VPL; j++) {
            int v = lane + j * TPC_WARP;
            if (v < nvec) {
                vec_t<bf16, 8> wp = ld_vec<bf16, 8>(w + (size_t)v * 8);
                float dwv[8], dbv[8];
#pragma unroll
                for (int e = 0; e < 8; e++) {
                    float n = (to_f(cur.x[j].e[e]) - m) * rs;
                    float d = to_f(cur.dy[j].e[e]);
                    float dn = __fmul_rn(to_f(wp.e[e]), d);
                    s1 += dn;
                    s2 += dn * n;
                    dwv[e] = d * n;
                    dbv[e] = d;
                }
                ln_acc_add(acc, v, nvec, dwv);
                ln_acc_add(acc + 2 * nvec, v, nvec, dbv);
            }
        }
        // the second pass recomputes norm and dnorm from the bf16 row (a few instructions) rather
        // than holding 16 floats per vector across the reductions
        ln_opaque<VPL>(cur.x);
        ln_opaque<VPL>(cur.dy);
        s1 = warp_sum_f(s1) / (float)C;
        s2 = warp_sum_f(s2) / (float)C;
        bf16 *dx = dinp + (size_t)row * C;
#pragma unroll
        for (int j = 0; j < VPL; j++) {
            int v = lane + j * TPC_WARP;
            if (v < nvec) {
                vec_t<bf16, 8> wp = ld_vec<bf16, 8>(w + (size_t)v * 8);
                vec_t<bf16, 8> gp = cur.g[j];
                float dsv[8];
#pragma unroll
                for (int e = 0; e < 8; e++) {
                    float n = (to_f(cur.x[j].e[e]) - m) * rs;
                    float dn = __fmul_rn(to_f(wp.e[e]), to_f(cur.dy[j].e[e]));
                    gp.e[e] = from_f<bf16>(to_f(gp.e[e]) + (dn - s1 - n * s2) * rs);
                    dsv[e] = to_f(gp.e[e]);
                }
                st_vec<bf16, 8>(dx + (size_t)v * 8, gp);
                if (NS == 3) ln_acc_add(acc + 4 * nvec, v, nvec, dsv);
            }
        }
        cur = next;
    }

    // the block's partial rows: the warps' sums added in warp order
    __syncthreads();
    for (int s = 0; s < NS; s++)
        for (int c = threadIdx.x; c < C; c += blockDim.x) {
            int v = c / 8, e = c % 8;
            int idx = s * 2 * nvec + (e < 4 ? v : nvec + v); // the float4 holding channel c
            float t = 0.0f;
            for (int k = 0; k < nwarps; k++) {
                const float *a = (const float *)(ln_acc + (size_t)k * NS * 2 * nvec + idx);
                t += a[e % 4];
            }
            part[((size_t)s * gridDim.x + blockIdx.x) * C + c] = t;
        }
}

// -- layernorm

// Vectors of 8 per lane a bf16 row of C needs in the register kernels; 0 if C does not suit them.
static int ln_vpl(int C) {
    if (C % 8 != 0 || C > 8 * TPC_WARP * LN_MAX_VPL) return 0;
    return (C / 8 + TPC_WARP - 1) / TPC_WARP;
}

template <int VPL, bool RESID>
static void ln_fwd_bf16_launch(struct cuda_ctx *c, bf16 *out, float *mean, float *rstd,
                               const bf16 *inp, const bf16 *w, const bf16 *b, int N, int C,
                               bf16 *sum_out, const bf16 *xadd, const bf16 *bias) {
    layernorm_fwd_bf16_kernel<VPL, RESID><<<warp_row_blocks((size_t)N), TPC_BLOCK, 0, c->stream>>>(
        out, mean, rstd, inp, w, b, N, C, sum_out, xadd, bias);
    CUDA_CHECK_LAUNCH("layernorm_fwd_bf16_kernel");
}

// The register kernel for this C; false (nothing launched) where C or an alignment does not
// suit it. With sum_out, the residual form (see layernorm_fwd_bf16_kernel).
template <bool RESID>
static bool ln_fwd_bf16_registers(struct cuda_ctx *c, bf16 *o, float *mean, float *rstd,
                                  const bf16 *x, const bf16 *wb, const bf16 *bb, int N, int C,
                                  bf16 *sum_out, const bf16 *xadd, const bf16 *bias) {
    int vpl = ln_vpl(C);
    if (!(aligned_to(o, 16) && aligned_to(x, 16) && aligned_to(wb, 16) && aligned_to(bb, 16) &&
          aligned_to(sum_out, 16) && aligned_to(xadd, 16) && aligned_to(bias, 16)))
        vpl = 0;
    switch (vpl) {
    case 1: ln_fwd_bf16_launch<1, RESID>(c, o, mean, rstd, x, wb, bb, N, C, sum_out, xadd, bias); break;
    case 2: ln_fwd_bf16_launch<2, RESID>(c, o, mean, rstd, x, wb, bb, N, C, sum_out, xadd, bias); break;
    case 3: ln_fwd_bf16_launch<3, RESID>(c, o, mean, rstd, x, wb, bb, N, C, sum_out, xadd, bias); break;
    case 4: ln_fwd_bf16_launch<4, RESID>(c, o, mean, rstd, x, wb, bb, N, C, sum_out, xadd, bias); break;
    case 5: ln_fwd_bf16_launch<5, RESID>(c, o, mean, rstd, x, wb, bb, N, C, sum_out, xadd, bias); break;
    case 6: ln_fwd_bf16_launch<6, RESID>(c, o, mean, rstd, x, wb, bb, N, C, sum_out, xadd, bias); break;
    case 7: ln_fwd_bf16_launch<7, RESID>(c, o, mean, rstd, x, wb, bb, N, C, sum_out, xadd, bias); break;
    case 8: ln_fwd_bf16_launch<8, RESID>(c, o, mean, rstd, x, wb, bb, N, C, sum_out, xadd, bias); break;
    default: return false;
    }
    return true;
}

void cuda_layernorm_fwd(void *ctx, void *out, float *mean, float *rstd, const void *inp,
                        const void *w, const void *b, int N, int C) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (N <= 0 || C <= 0) return;
    if (!is_bf16(c)) {
        layernorm_fwd_kernel<float, double><<<warp_row_blocks((size_t)N), TPC_BLOCK, 0, c->stream>>>(
            (float *)out, mean, rstd, (const float *)inp, (const float *)w, (const float *)b, N, C);
        CUDA_CHECK_LAUNCH("layernorm_fwd_kernel");
        return;
    }
    bf16 *o = (bf16 *)out;
    const bf16 *x = (const bf16 *)inp, *wb = (const bf16 *)w, *bb = (const bf16 *)b;
    if (!ln_fwd_bf16_registers<false>(c, o, mean, rstd, x, wb, bb, N, C, NULL, NULL, NULL)) {
        layernorm_fwd_kernel<bf16, float><<<warp_row_blocks((size_t)N), TPC_BLOCK, 0, c->stream>>>(
            o, mean, rstd, x, wb, bb, N, C);
        CUDA_CHECK_LAUNCH("layernorm_fwd_kernel (bf16)");
    }
}

// The row-parallel backward for any C and both types: dinp kernel, per-chunk partials, finish.
template <typename E>
static void ln_bwd_generic(struct cuda_ctx *c, E *dinp, float *dw, float *db, const E *dout,
                           const E *inp, const E *w, const float *mean, const float *rstd, int N,
                           int C) {
    layernorm_bwd_dinp_kernel<E><<<warp_row_blocks((size_t)N), TPC_BLOCK, 0, c->stream>>>(
        dinp, dout, inp, w, mean, rstd, N, C);
    CUDA_CHECK_LAUNCH("layernorm_bwd_dinp_kernel");

    unsigned int nchunks = tpc_blocks((size_t)N, COLSUM_ROWS);
    float *pw = (float *)ctx_scratch(c, 2 * (size_t)nchunks * C * sizeof(float)); // (nchunks, C)
    float *pb = pw + (size_t)nchunks * C;                                         // (nchunks, C)
    dim3 grid(nchunks, tpc_blocks((size_t)C, TPC_BLOCK));
    layernorm_bwd_partial_kernel<E><<<grid, TPC_BLOCK, 0, c->stream>>>(pw, pb, dout, inp, mean,
                                                                       rstd, N, C);
    CUDA_CHECK_LAUNCH("layernorm_bwd_partial_kernel");
    colsum_finish(c->stream, (int)nchunks, C, dw, pw, db, pb);
    CUDA_CHECK_LAUNCH("colsum2_finish_kernel (layernorm dw, db)");
}

template <int VPL>
static void ln_bwd_bf16_launch(struct cuda_ctx *c, bf16 *dinp, float *dw, float *db,
                               const bf16 *dout, const bf16 *inp, const bf16 *w, const float *mean,
                               const float *rstd, int N, int C) {
    unsigned int nblocks = tpc_blocks((size_t)N, TPC_BLOCK / TPC_WARP);
    if (nblocks > LN_BWD_MAX_BLOCKS) nblocks = LN_BWD_MAX_BLOCKS;
    float *pw = (float *)ctx_scratch(c, 2 * (size_t)nblocks * C * sizeof(float)); // (nblocks, C)
    float *pb = pw + (size_t)nblocks * C;                                         // (nblocks, C)
    size_t smem = 2 * (size_t)C * sizeof(float);
    layernorm_bwd_bf16_kernel<VPL><<<nblocks, TPC_BLOCK, smem, c->stream>>>(
        dinp, pw, pb, dout, inp, w, mean, rstd, N, C);
    CUDA_CHECK_LAUNCH("layernorm_bwd_bf16_kernel");
    colsum_finish(c->stream, (int)nblocks, C, dw, pw, db, pb);
    CUDA_CHECK_LAUNCH("colsum2_finish_kernel (layernorm dw, db)");
}

// layernorm_bwd_pipelined_kernel with NS sums (3: dsum too); dsum NULL when NS is 2.
template <int VPL, int NS>
static void ln_bwd_pipelined_launch(struct cuda_ctx *c, bf16 *dinp, float *dw, float *db, float *dsum,
                                    const bf16 *dout, const bf16 *inp, const bf16 *w,
                                    const float *mean, const float *rstd, int N, int C) {
    const int nwarps = LN_BWD2_THREADS / TPC_WARP;
    unsigned int nblocks = tpc_blocks((size_t)N, (size_t)nwarps);
    if (nblocks > LN_BWD2_MAX_BLOCKS) nblocks = LN_BWD2_MAX_BLOCKS;
    float *part = (float *)ctx_scratch(c, NS * (size_t)nblocks * C * sizeof(float)); // (NS, nblocks, C)
    size_t smem = (size_t)nwarps * NS * C * sizeof(float);
    static size_t smem_set; // the opt-in this instantiation has been given (one device per process)
    if (smem > smem_set) {
        CUDA_CHECK(cudaFuncSetAttribute(layernorm_bwd_pipelined_kernel<VPL, NS>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
        smem_set = smem;
    }
    layernorm_bwd_pipelined_kernel<VPL, NS><<<nblocks, LN_BWD2_THREADS, smem, c->stream>>>(
        dinp, part, dout, inp, w, mean, rstd, N, C);
    CUDA_CHECK_LAUNCH("layernorm_bwd_pipelined_kernel");
    size_t stride = (size_t)nblocks * C;
    colsum_finish(c->stream, (int)nblocks, C, dw, part, db, part + stride);
    CUDA_CHECK_LAUNCH("colsum2_finish_kernel (layernorm dw, db)");
    if (NS == 3) {
        colsum_finish(c->stream, (int)nblocks, C, dsum, part + 2 * stride);
        CUDA_CHECK_LAUNCH("colsum2_finish_kernel (layernorm dsum)");
    }
}

template <int VPL>
static void ln_bwd_pipelined(struct cuda_ctx *c, bf16 *dinp, float *dw, float *db, float *dsum,
                             const bf16 *dout, const bf16 *inp, const bf16 *w, const float *mean,
                             const float *rstd, int N, int C) {
    if (dsum) ln_bwd_pipelined_launch<VPL, 3>(c, dinp, dw, db, dsum, dout, inp, w, mean, rstd, N, C);
    else ln_bwd_pipelined_launch<VPL, 2>(c, dinp, dw, db, NULL, dout, inp, w, mean, rstd, N, C);
}

// The backward of the bf16 register kernels: the pipelined kernel, which sums dsum itself, or the
// one-row kernel, after which dsum is summed from dinp as a bias gradient is (cuda_bias_colsum).
// false where C or an alignment does not suit them.
static bool ln_bwd_bf16_registers(struct cuda_ctx *c, bf16 *dx, float *dw, float *db, float *dsum,
                                  const bf16 *dy, const bf16 *x, const bf16 *wb, const float *mean,
                                  const float *rstd, int N, int C) {
    int vpl = ln_vpl(C);
    if (!(aligned_to(dx, 16) && aligned_to(dy, 16) && aligned_to(x, 16) && aligned_to(wb, 16)))
        vpl = 0;
    if (vpl && c->ln_bwd_pipelined) {
        switch (vpl) {
        case 1: ln_bwd_pipelined<1>(c, dx, dw, db, dsum, dy, x, wb, mean, rstd, N, C); break;
        case 2: ln_bwd_pipelined<2>(c, dx, dw, db, dsum, dy, x, wb, mean, rstd, N, C); break;
        case 3: ln_bwd_pipelined<3>(c, dx, dw, db, dsum, dy, x, wb, mean, rstd, N, C); break;
        case 4: ln_bwd_pipelined<4>(c, dx, dw, db, dsum, dy, x, wb, mean, rstd, N, C); break;
        case 5: ln_bwd_pipelined<5>(c, dx, dw, db, dsum, dy, x, wb, mean, rstd, N, C); break;
        case 6: ln_bwd_pipelined<6>(c, dx, dw, db, dsum, dy, x, wb, mean, rstd, N, C); break;
        case 7: ln_bwd_pipelined<7>(c, dx, dw, db, dsum, dy, x, wb, mean, rstd, N, C); break;
        case 8: ln_bwd_pipelined<8>(c, dx, dw, db, dsum, dy, x, wb, mean, rstd, N, C); break;
        default: return false;
        }
        return true;
    }
    switch (vpl) {
    case 1: ln_bwd_bf16_launch<1>(c, dx, dw, db, dy, x, wb, mean, rstd, N, C); break;
    case 2: ln_bwd_bf16_launch<2>(c, dx, dw, db, dy, x, wb, mean, rstd, N, C); break;
    case 3: ln_bwd_bf16_launch<3>(c, dx, dw, db, dy, x, wb, mean, rstd, N, C); break;
    case 4: ln_bwd_bf16_launch<4>(c, dx, dw, db, dy, x, wb, mean, rstd, N, C); break;
    case 5: ln_bwd_bf16_launch<5>(c, dx, dw, db, dy, x, wb, mean, rstd, N, C); break;
    case 6: ln_bwd_bf16_launch<6>(c, dx, dw, db, dy, x, wb, mean, rstd, N, C); break;
    case 7: ln_bwd_bf16_launch<7>(c, dx, dw, db, dy, x, wb, mean, rstd, N, C); break;
    case 8: ln_bwd_bf16_launch<8>(c, dx, dw, db, dy, x, wb, mean, rstd, N, C); break;
    default: return false;
    }
    if (dsum) cuda_bias_colsum(c, dsum, dx, N, C);
    return true;
}

void cuda_layernorm_bwd(void *ctx, void *dinp, float *dw, float *db, float *dsum, const void *dout,
                        const void *inp, const void *w, const float *mean, const float *rstd, int N,
                        int C) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (N <= 0 || C <= 0) return;
    if (!is_bf16(c)) {
        ln_bwd_generic(c, (float *)dinp, dw, db, (const float *)dout, (const float *)inp,
                       (const float *)w, mean, rstd, N, C);
        if (dsum) cuda_bias_colsum(c, dsum, dinp, N, C);
        return;
    }
    bf16 *dx = (bf16 *)dinp;
    const bf16 *dy = (const bf16 *)dout, *x = (const bf16 *)inp, *wb = (const bf16 *)w;
    if (ln_bwd_bf16_registers(c, dx, dw, db, dsum, dy, x, wb, mean, rstd, N, C)) return;
    ln_bwd_generic(c, dx, dw, db, dy, x, wb, mean, rstd, N, C);
    if (dsum) cuda_bias_colsum(c, dsum, dx, N, C);
}


// One pass in bf16 where the register layernorm suits the shape; elsewhere (and in fp32, where it
// keeps the results bitwise those of the separate ops) the residual kernel, then the layernorm.
void cuda_residual_layernorm_fwd(void *ctx, void *out, void *ln, float *mean, float *rstd,
                                 const void *res, const void *x, const void *bias,
                                 const void *w, const void *b, int N, int C) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (N <= 0 || C <= 0) return;
    if (is_bf16(c) &&
        ln_fwd_bf16_registers<true>(c, (bf16 *)ln, mean, rstd, (const bf16 *)res, (const bf16 *)w,
                                    (const bf16 *)b, N, C, (bf16 *)out, (const bf16 *)x,
                                    (const bf16 *)bias))
        return;
    cuda_residual_fwd(ctx, out, res, x, bias, N, C);
    cuda_layernorm_fwd(ctx, ln, mean, rstd, out, w, b, N, C);
}
