// flash_attention.cu: fused causal attention in bf16 on tensor cores (see flash_attention.h).
//
// Geometry shared by all kernels: a block of 4 warps holds a tile of 64 rows (queries in the
// forward and the dq kernel, keys in the dk/dv kernel); each warp owns 16 of those rows and walks
// the tiles of the other side (64 at a time) through shared memory. Products are WMMA bf16
// 16x16x16 with fp32 accumulators; softmax arithmetic is fp32 in the exp2 domain.
//
// Backward without atomics: one kernel per key tile produces dk and dv, walking the query tiles
// at or below the diagonal; another per query tile produces dq, walking the key tiles. Both
// recompute P from q, k and the saved log-sum-exp, trading recomputation for determinism.
//
// Sections: constants and shared layout, device helpers, kernels, launchers.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <mma.h>

#include "flash_attention.h"

using namespace nvcuda;

// ---- constants and shared layout

#define FA_HS 64            // head size the kernels are written for
#define FA_TILE 64          // rows of a tile (queries or keys)
#define FA_WARPS 4          // warps per block, 16 rows each
#define FA_THREADS (FA_WARPS * 32)
#define FA_WROWS 16         // rows per warp
// Padded leading dimensions (elements): rows shift by 16 bytes (bf16) or 16 bytes (fp32) so
// fragment loads do not all hit the same banks; WMMA needs ldm % 8 (bf16) and % 4 (fp32) and
// 32-byte aligned fragment starts, which 16-row and 16-column offsets keep.
#define FA_LDH (FA_HS + 8)  // bf16 tiles (64 x 72)
#define FA_LDF (FA_TILE + 4) // fp32 per-warp tiles (16 x 68)

#define FA_TILE_BYTES (FA_TILE * FA_LDH * 2)            // one bf16 64-row tile
#define FA_WF_BYTES (FA_WARPS * FA_WROWS * FA_LDF * 4)  // one fp32 16x64 tile per warp
#define FA_WH_BYTES (FA_WARPS * FA_WROWS * FA_LDH * 2)  // one bf16 16x64 tile per warp

// forward: Q, K, V tiles; S and O (fp32) and P (bf16) per warp
#define FA_FWD_SMEM (3 * FA_TILE_BYTES + 2 * FA_WF_BYTES + FA_WH_BYTES)
// backward kernels: four bf16 tiles; S/dP (fp32) and P/dS (bf16) per warp; two rows of 64 floats
#define FA_BWD_SMEM (4 * FA_TILE_BYTES + FA_WF_BYTES + FA_WH_BYTES + 2 * FA_TILE * 4)

#define FA_LOG2E 1.4426950408889634f
#define FA_LN2 0.6931471805599453f

typedef wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> frag_a;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> frag_b_row;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> frag_b_col;
typedef wmma::fragment<wmma::accumulator, 16, 16, 16, float> frag_acc;

// ---- device helpers

// Sw[:, 16j .. 16j+16) = A . B[16j .. 16j+16, :]^T for j0 <= j <= j1: A is a warp's 16 x HS
// operand in register fragments, B a shared tile of rows stored (row, d) at B[row * LDH + d], read
// as its transpose (col-major), and Sw the warp's (16, LDF) fp32 scratch. Every score and
// gradient-of-score product of the kernels below has this shape.
__device__ __forceinline__ static void fa_mul_tile_t(float *Sw, const frag_a *a, const __nv_bfloat16 *B, int j0, int j1) {
    for (int j = j0; j <= j1; j++) {
        frag_acc acc;
        wmma::fill_fragment(acc, 0.0f);
#pragma unroll
        for (int kk = 0; kk < FA_HS / 16; kk++) {
            frag_b_col bt;
            wmma::load_matrix_sync(bt, B + j * 16 * FA_LDH + kk * 16, FA_LDH);
            wmma::mma_sync(acc, a[kk], bt, acc);
        }
        wmma::store_matrix_sync(Sw + j * 16, acc, FA_LDF, wmma::mem_row_major);
    }
}

// dst (64 x FA_LDH) = rows [row0, row0 + 64) of one head: src points at row 0 of that head, rows
// stride elements apart. Rows at or past T are zero, so padded queries and keys give finite
// scores and contribute nothing once masked.
__device__ static void fa_load_tile(__nv_bfloat16 *dst, const __nv_bfloat16 *src, size_t stride,
                                    int row0, int T) {
    // 64 rows x 8 chunks of 16 bytes
    for (int i = threadIdx.x; i < FA_TILE * 8; i += FA_THREADS) {
        int r = i >> 3, c = (i & 7) * 8;
        int t = row0 + r;
        uint4 val = make_uint4(0u, 0u, 0u, 0u);
        if (t < T) val = *reinterpret_cast<const uint4 *>(src + (size_t)t * stride + c);
        *reinterpret_cast<uint4 *>(dst + r * FA_LDH + c) = val;
    }
}

// Writes a warp's 16 x 64 fp32 tile (ld FA_LDF), times mul, as bf16 to rows [row0, row0 + 16) of
// dst (row stride stride), skipping rows at or past T. Lane = (row, half of the columns).
__device__ static void fa_store_rows(__nv_bfloat16 *dst, size_t stride, const float *tile,
                                     int row0, int T, float mul) {
    int lane = threadIdx.x & 31, r = lane >> 1, c0 = (lane & 1) * 32;
    int t = row0 + r;
    if (t >= T) return;
    __nv_bfloat162 *o = reinterpret_cast<__nv_bfloat162 *>(dst + (size_t)t * stride + c0);
    const float *s = tile + r * FA_LDF + c0;
#pragma unroll
    for (int c = 0; c < 32; c += 2) o[c / 2] = __floats2bfloat162_rn(s[c] * mul, s[c + 1] * mul);
}

// ---- kernels

// grid (ceil(T/64), B*NH), block 128. Query tiles are taken heaviest (last) first so the long
// blocks start early and the short ones fill the tail.
static __global__ void __launch_bounds__(FA_THREADS)
fa_fwd_kernel(__nv_bfloat16 *out, float *lse, const __nv_bfloat16 *q, const __nv_bfloat16 *k,
              const __nv_bfloat16 *v, int T, int NH, size_t qkv_stride, size_t out_stride,
              float scale_log2) {
    // out (B, T, NH, HS), lse (B, NH, T), q/k/v (B, T, NH, HS) with row stride qkv_stride
    extern __shared__ __align__(128) unsigned char fa_smem[];
    __nv_bfloat16 *Qs = reinterpret_cast<__nv_bfloat16 *>(fa_smem);                 // (64, LDH)
    __nv_bfloat16 *Ks = Qs + FA_TILE * FA_LDH;                                        // (64, LDH)
    __nv_bfloat16 *Vs = Ks + FA_TILE * FA_LDH;                                        // (64, LDH)
    float *Sall = reinterpret_cast<float *>(fa_smem + 3 * FA_TILE_BYTES);            // (4, 16, LDF)
    float *Oall = reinterpret_cast<float *>(fa_smem + 3 * FA_TILE_BYTES + FA_WF_BYTES);
    __nv_bfloat16 *Pall =
        reinterpret_cast<__nv_bfloat16 *>(fa_smem + 3 * FA_TILE_BYTES + 2 * FA_WF_BYTES);

    int nqt = (int)gridDim.x;
    int qt = nqt - 1 - (int)blockIdx.x;
    int bh = (int)blockIdx.y, b = bh / NH, h = bh % NH;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float *Sw = Sall + warp * FA_WROWS * FA_LDF;         // (16, LDF) scores of this warp's rows
    float *Ow = Oall + warp * FA_WROWS * FA_LDF;         // (16, LDF) unnormalised output
    __nv_bfloat16 *Pw = Pall + warp * FA_WROWS * FA_LDH; // (16, LDH) probabilities

    size_t head_off = (size_t)b * T * qkv_stride + (size_t)h * FA_HS;
    fa_load_tile(Qs, q + head_off, qkv_stride, qt * FA_TILE, T);
    // Lane = (row r, every other column from hf) for the row-wise softmax work: interleaved
    // columns halve the shared-memory bank conflicts of contiguous halves.
    int r = lane >> 1, hf = lane & 1;
    int qrow0 = qt * FA_TILE + warp * FA_WROWS; // first query of this warp
    int qi = qrow0 + r;                          // this lane's query
    for (int c = 0; c < 32; c++) Ow[r * FA_LDF + 2 * c + hf] = 0.0f;
    __syncthreads();

    frag_a qf[FA_HS / 16];
#pragma unroll
    for (int kk = 0; kk < FA_HS / 16; kk++)
        wmma::load_matrix_sync(qf[kk], Qs + warp * FA_WROWS * FA_LDH + kk * 16, FA_LDH);

    float m = -INFINITY, l = 0.0f; // running max (log2 units) and sum of this lane's row
    for (int kt = 0; kt <= qt; kt++) {
        __syncthreads(); // every warp is done with the previous K, V
        fa_load_tile(Ks, k + head_off, qkv_stride, kt * FA_TILE, T);
        fa_load_tile(Vs, v + head_off, qkv_stride, kt * FA_TILE, T);
        __syncthreads();
        // On the diagonal tile, key sub-tiles past this warp's last query are fully masked.
        int jmax = (kt == qt) ? warp : FA_TILE / 16 - 1;

        // S (16 x 64) = Q_w K^T
        fa_mul_tile_t(Sw, qf, Ks, 0, jmax);
        __syncwarp();

        // Online softmax on this lane's half row. Every processed tile holds at least one
        // visible key for every row (key kt*64 <= qi), so the new max is finite.
        float s[32];
        float mx = -INFINITY;
        int key0 = kt * FA_TILE + hf;
#pragma unroll
        for (int c = 0; c < 32; c++) {
            s[c] = (key0 + 2 * c <= qi) ? Sw[r * FA_LDF + 2 * c + hf] * scale_log2 : -INFINITY;
            mx = fmaxf(mx, s[c]);
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        float m_new = fmaxf(m, mx);
        float alpha = exp2f(m - m_new); // 0 on the first tile (m = -inf)
        float sum = 0.0f;
#pragma unroll
        for (int c = 0; c < 32; c++) {
            float p = exp2f(s[c] - m_new);
            sum += p;
            Pw[r * FA_LDH + 2 * c + hf] = __float2bfloat16_rn(p);
        }
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        l = l * alpha + sum;
        m = m_new;
#pragma unroll
        for (int c = 0; c < 32; c++) Ow[r * FA_LDF + 2 * c + hf] *= alpha;
        __syncwarp();

        // O (16 x 64) += P V; P is zero in the masked sub-tiles past jmax.
#pragma unroll
        for (int j = 0; j < FA_HS / 16; j++) {
            frag_acc acc;
            wmma::load_matrix_sync(acc, Ow + j * 16, FA_LDF, wmma::mem_row_major);
            for (int kk = 0; kk <= jmax; kk++) {
                frag_a pf;
                frag_b_row vf;
                wmma::load_matrix_sync(pf, Pw + kk * 16, FA_LDH);
                wmma::load_matrix_sync(vf, Vs + kk * 16 * FA_LDH + j * 16, FA_LDH);
                wmma::mma_sync(acc, pf, vf, acc);
            }
            wmma::store_matrix_sync(Ow + j * 16, acc, FA_LDF, wmma::mem_row_major);
        }
        __syncwarp();
    }

    size_t out_off = (size_t)b * T * out_stride + (size_t)h * FA_HS;
    fa_store_rows(out + out_off, out_stride, Ow, qrow0, T, 1.0f / l);
    if ((lane & 1) == 0 && qi < T) lse[(size_t)bh * T + qi] = (m + log2f(l)) * FA_LN2;
}

// D (B, NH, T) = rowsum(dout * out) per head: one warp per (b, t, h), two elements per lane.
static __global__ void fa_bwd_rowdot_kernel(float *D, const __nv_bfloat16 *dout,
                                            const __nv_bfloat16 *out, int B, int T, int NH,
                                            size_t out_stride) {
    size_t row = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (row >= (size_t)B * T * NH) return;
    int h = (int)(row % NH);
    size_t bt = row / NH; // b * T + t
    size_t off = bt * out_stride + (size_t)h * FA_HS + 2 * lane;
    float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(dout + off));
    float2 o = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(out + off));
    float s = a.x * o.x + a.y * o.y;
#pragma unroll
    for (int d = 16; d > 0; d >>= 1) s += __shfl_xor_sync(0xffffffffu, s, d);
    if (lane == 0) {
        size_t b = bt / T, t = bt % T;
        D[(b * NH + h) * T + t] = s;
    }
}

// dk, dv for one key tile: grid (ceil(T/64), B*NH), block 128; each warp owns 16 keys and walks
// the query tiles from the diagonal to the end. In this kernel the per-warp tiles are transposed
// (rows = keys, columns = queries): S^T = K Q^T, P^T, dP^T = V dO^T, dS^T.
static __global__ void __launch_bounds__(FA_THREADS)
fa_bwd_dkdv_kernel(__nv_bfloat16 *dk, __nv_bfloat16 *dv, const __nv_bfloat16 *dout,
                   const __nv_bfloat16 *q, const __nv_bfloat16 *k, const __nv_bfloat16 *v,
                   const float *lse, const float *D, int T, int NH, size_t qkv_stride,
                   size_t out_stride, float scale, float scale_log2) {
    // dk, dv, q, k, v (B, T, NH, HS) row stride qkv_stride; dout (B, T, NH, HS) row stride
    // out_stride; lse, D (B, NH, T)
    extern __shared__ __align__(128) unsigned char fa_smem[];
    __nv_bfloat16 *Ks = reinterpret_cast<__nv_bfloat16 *>(fa_smem); // (64, LDH)
    __nv_bfloat16 *Vs = Ks + FA_TILE * FA_LDH;                        // (64, LDH)
    __nv_bfloat16 *Qs = Vs + FA_TILE * FA_LDH;                        // (64, LDH)
    __nv_bfloat16 *dOs = Qs + FA_TILE * FA_LDH;                       // (64, LDH)
    float *Sall = reinterpret_cast<float *>(fa_smem + 4 * FA_TILE_BYTES);
    __nv_bfloat16 *Pall =
        reinterpret_cast<__nv_bfloat16 *>(fa_smem + 4 * FA_TILE_BYTES + FA_WF_BYTES);
    float *Ls = reinterpret_cast<float *>(fa_smem + 4 * FA_TILE_BYTES + FA_WF_BYTES + FA_WH_BYTES);
    float *Ds = Ls + FA_TILE; // (64) lse (log2 units) and D of the current query tile

    int nt = (int)gridDim.x;
    int kt = nt - 1 - (int)blockIdx.x; // early key tiles see the most queries: start them first
    int bh = (int)blockIdx.y, b = bh / NH, h = bh % NH;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float *Sw = Sall + warp * FA_WROWS * FA_LDF;         // (16 keys, LDF) S^T then dP^T
    __nv_bfloat16 *Pw = Pall + warp * FA_WROWS * FA_LDH; // (16 keys, LDH) P^T then dS^T
    int r = lane >> 1, hf = lane & 1;
    int krow0 = kt * FA_TILE + warp * FA_WROWS;
    int ki = krow0 + r; // this lane's key

    size_t head_off = (size_t)b * T * qkv_stride + (size_t)h * FA_HS;
    size_t dout_off = (size_t)b * T * out_stride + (size_t)h * FA_HS;
    const float *lse_h = lse + (size_t)bh * T, *D_h = D + (size_t)bh * T;
    fa_load_tile(Ks, k + head_off, qkv_stride, kt * FA_TILE, T);
    fa_load_tile(Vs, v + head_off, qkv_stride, kt * FA_TILE, T);
    __syncthreads();
    frag_a kf[FA_HS / 16], vf[FA_HS / 16];
#pragma unroll
    for (int kk = 0; kk < FA_HS / 16; kk++) {
        wmma::load_matrix_sync(kf[kk], Ks + warp * FA_WROWS * FA_LDH + kk * 16, FA_LDH);
        wmma::load_matrix_sync(vf[kk], Vs + warp * FA_WROWS * FA_LDH + kk * 16, FA_LDH);
    }
    frag_acc dkacc[FA_HS / 16], dvacc[FA_HS / 16];
#pragma unroll
    for (int j = 0; j < FA_HS / 16; j++) {
        wmma::fill_fragment(dkacc[j], 0.0f);
        wmma::fill_fragment(dvacc[j], 0.0f);
    }

    for (int qt = kt; qt < nt; qt++) {
        __syncthreads(); // every warp is done with the previous Q, dO, lse, D
        fa_load_tile(Qs, q + head_off, qkv_stride, qt * FA_TILE, T);
        fa_load_tile(dOs, dout + dout_off, out_stride, qt * FA_TILE, T);
        if (threadIdx.x < FA_TILE) {
            int t = qt * FA_TILE + (int)threadIdx.x;
            // Padded queries: lse = +inf makes their P exactly 0.
            Ls[threadIdx.x] = t < T ? lse_h[t] * FA_LOG2E : INFINITY;
            Ds[threadIdx.x] = t < T ? D_h[t] : 0.0f;
        }
        __syncthreads();
        // On the diagonal tile, query sub-tiles before this warp's first key are fully masked.
        int jmin = (qt == kt) ? warp : 0;

        // S^T (16 keys x 64 queries) = K_w Q^T
        fa_mul_tile_t(Sw, kf, Qs, jmin, FA_TILE / 16 - 1);
        __syncwarp();
        float p[32];
        int q0 = qt * FA_TILE + hf;
#pragma unroll
        for (int c = 0; c < 32; c++) {
            bool on = (q0 + 2 * c >= ki) && (q0 + 2 * c < T);
            float sv = Sw[r * FA_LDF + 2 * c + hf];
            p[c] = on ? exp2f(sv * scale_log2 - Ls[2 * c + hf]) : 0.0f;
            Pw[r * FA_LDH + 2 * c + hf] = __float2bfloat16_rn(p[c]);
        }
        __syncwarp();

        // dV_w += P^T dO, and dP^T (16 x 64) = V_w dO^T into Sw
#pragma unroll
        for (int j = 0; j < FA_HS / 16; j++) {
            for (int kk = jmin; kk < FA_TILE / 16; kk++) {
                frag_a pf;
                frag_b_row df;
                wmma::load_matrix_sync(pf, Pw + kk * 16, FA_LDH);
                wmma::load_matrix_sync(df, dOs + kk * 16 * FA_LDH + j * 16, FA_LDH);
                wmma::mma_sync(dvacc[j], pf, df, dvacc[j]);
            }
        }
        fa_mul_tile_t(Sw, vf, dOs, jmin, FA_TILE / 16 - 1);
        __syncwarp();
        // dS^T = P^T * (dP^T - D) (the scale is applied once at the end); masked entries are
        // selected to 0 so stale shared memory in skipped sub-tiles never reaches the sum.
#pragma unroll
        for (int c = 0; c < 32; c++) {
            float dp = Sw[r * FA_LDF + 2 * c + hf];
            float ds = p[c] != 0.0f ? p[c] * (dp - Ds[2 * c + hf]) : 0.0f;
            Pw[r * FA_LDH + 2 * c + hf] = __float2bfloat16_rn(ds);
        }
        __syncwarp();
        // dK_w += dS^T Q
#pragma unroll
        for (int j = 0; j < FA_HS / 16; j++) {
            for (int kk = jmin; kk < FA_TILE / 16; kk++) {
                frag_a sf;
                frag_b_row qf;
                wmma::load_matrix_sync(sf, Pw + kk * 16, FA_LDH);
                wmma::load_matrix_sync(qf, Qs + kk * 16 * FA_LDH + j * 16, FA_LDH);
                wmma::mma_sync(dkacc[j], sf, qf, dkacc[j]);
            }
        }
        __syncwarp();
    }

#pragma unroll
    for (int j = 0; j < FA_HS / 16; j++)
        wmma::store_matrix_sync(Sw + j * 16, dvacc[j], FA_LDF, wmma::mem_row_major);
    __syncwarp();
    fa_store_rows(dv + head_off, qkv_stride, Sw, krow0, T, 1.0f);
    __syncwarp();
#pragma unroll
    for (int j = 0; j < FA_HS / 16; j++)
        wmma::store_matrix_sync(Sw + j * 16, dkacc[j], FA_LDF, wmma::mem_row_major);
    __syncwarp();
    fa_store_rows(dk + head_off, qkv_stride, Sw, krow0, T, scale);
}

// dq for one query tile: grid (ceil(T/64), B*NH), block 128; each warp owns 16 queries and walks
// the key tiles up to the diagonal, accumulating dq in registers.
static __global__ void __launch_bounds__(FA_THREADS)
fa_bwd_dq_kernel(__nv_bfloat16 *dq, const __nv_bfloat16 *dout, const __nv_bfloat16 *q,
                 const __nv_bfloat16 *k, const __nv_bfloat16 *v, const float *lse, const float *D,
                 int T, int NH, size_t qkv_stride, size_t out_stride, float scale,
                 float scale_log2) {
    // dq, q, k, v (B, T, NH, HS) row stride qkv_stride; dout (B, T, NH, HS) row stride
    // out_stride; lse, D (B, NH, T)
    extern __shared__ __align__(128) unsigned char fa_smem[];
    __nv_bfloat16 *Qs = reinterpret_cast<__nv_bfloat16 *>(fa_smem); // (64, LDH)
    __nv_bfloat16 *dOs = Qs + FA_TILE * FA_LDH;                       // (64, LDH)
    __nv_bfloat16 *Ks = dOs + FA_TILE * FA_LDH;                       // (64, LDH)
    __nv_bfloat16 *Vs = Ks + FA_TILE * FA_LDH;                        // (64, LDH)
    float *Sall = reinterpret_cast<float *>(fa_smem + 4 * FA_TILE_BYTES);
    __nv_bfloat16 *Pall =
        reinterpret_cast<__nv_bfloat16 *>(fa_smem + 4 * FA_TILE_BYTES + FA_WF_BYTES);
    float *Ls = reinterpret_cast<float *>(fa_smem + 4 * FA_TILE_BYTES + FA_WF_BYTES + FA_WH_BYTES);
    float *Ds = Ls + FA_TILE; // (64) lse (log2 units) and D of this query tile

    int nt = (int)gridDim.x;
    int qt = nt - 1 - (int)blockIdx.x;
    int bh = (int)blockIdx.y, b = bh / NH, h = bh % NH;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float *Sw = Sall + warp * FA_WROWS * FA_LDF;         // (16 queries, LDF) S then dP
    __nv_bfloat16 *Pw = Pall + warp * FA_WROWS * FA_LDH; // (16 queries, LDH) dS
    int r = lane >> 1, hf = lane & 1;
    int qrow0 = qt * FA_TILE + warp * FA_WROWS;
    int qi = qrow0 + r; // this lane's query

    size_t head_off = (size_t)b * T * qkv_stride + (size_t)h * FA_HS;
    size_t dout_off = (size_t)b * T * out_stride + (size_t)h * FA_HS;
    fa_load_tile(Qs, q + head_off, qkv_stride, qt * FA_TILE, T);
    fa_load_tile(dOs, dout + dout_off, out_stride, qt * FA_TILE, T);
    if (threadIdx.x < FA_TILE) {
        int t = qt * FA_TILE + (int)threadIdx.x;
        Ls[threadIdx.x] = t < T ? lse[(size_t)bh * T + t] * FA_LOG2E : INFINITY;
        Ds[threadIdx.x] = t < T ? D[(size_t)bh * T + t] : 0.0f;
    }
    __syncthreads();
    frag_a qf[FA_HS / 16], df[FA_HS / 16];
#pragma unroll
    for (int kk = 0; kk < FA_HS / 16; kk++) {
        wmma::load_matrix_sync(qf[kk], Qs + warp * FA_WROWS * FA_LDH + kk * 16, FA_LDH);
        wmma::load_matrix_sync(df[kk], dOs + warp * FA_WROWS * FA_LDH + kk * 16, FA_LDH);
    }
    frag_acc dqacc[FA_HS / 16];
#pragma unroll
    for (int j = 0; j < FA_HS / 16; j++) wmma::fill_fragment(dqacc[j], 0.0f);
    float lrow = Ls[warp * FA_WROWS + r], drow = Ds[warp * FA_WROWS + r];

    for (int kt = 0; kt <= qt; kt++) {
        __syncthreads(); // every warp is done with the previous K, V
        fa_load_tile(Ks, k + head_off, qkv_stride, kt * FA_TILE, T);
        fa_load_tile(Vs, v + head_off, qkv_stride, kt * FA_TILE, T);
        __syncthreads();
        int jmax = (kt == qt) ? warp : FA_TILE / 16 - 1;

        // S (16 x 64) = Q_w K^T
        fa_mul_tile_t(Sw, qf, Ks, 0, jmax);
        __syncwarp();
        float p[32];
        int key0 = kt * FA_TILE + hf;
#pragma unroll
        for (int c = 0; c < 32; c++) {
            float sv = Sw[r * FA_LDF + 2 * c + hf];
            p[c] = (key0 + 2 * c <= qi) ? exp2f(sv * scale_log2 - lrow) : 0.0f;
        }
        __syncwarp();

        // dP (16 x 64) = dO_w V^T
        fa_mul_tile_t(Sw, df, Vs, 0, jmax);
        __syncwarp();
#pragma unroll
        for (int c = 0; c < 32; c++) {
            float ds = p[c] != 0.0f ? p[c] * (Sw[r * FA_LDF + 2 * c + hf] - drow) : 0.0f;
            Pw[r * FA_LDH + 2 * c + hf] = __float2bfloat16_rn(ds);
        }
        __syncwarp();
        // dQ_w += dS K
#pragma unroll
        for (int j = 0; j < FA_HS / 16; j++) {
            for (int kk = 0; kk <= jmax; kk++) {
                frag_a sf;
                frag_b_row kb;
                wmma::load_matrix_sync(sf, Pw + kk * 16, FA_LDH);
                wmma::load_matrix_sync(kb, Ks + kk * 16 * FA_LDH + j * 16, FA_LDH);
                wmma::mma_sync(dqacc[j], sf, kb, dqacc[j]);
            }
        }
        __syncwarp();
    }

#pragma unroll
    for (int j = 0; j < FA_HS / 16; j++)
        wmma::store_matrix_sync(Sw + j * 16, dqacc[j], FA_LDF, wmma::mem_row_major);
    __syncwarp();
    fa_store_rows(dq + head_off, qkv_stride, Sw, qrow0, T, scale);
}

// ---- launchers

// Shapes, strides and alignment the kernels rely on: 16-byte row chunks need 16-byte aligned
// pointers and strides that are multiples of 8 bf16.
static bool fa_args_ok(int B, int T, int NH, int HS, int qkv_stride, int out_stride) {
    if (HS != FA_HS || B < 1 || T < 1 || NH < 1) return false;
    if (qkv_stride < NH * HS || out_stride < NH * HS) return false;
    if (qkv_stride % 8 != 0 || out_stride % 8 != 0) return false;
    if ((size_t)B * NH > 65535u) return false; // gridDim.y
    return true;
}

static bool fa_aligned(const void *p) { return ((size_t)p & 15u) == 0; }

static int fa_launch_status(void) {
    return cudaGetLastError() == cudaSuccess ? FLASH_OK : FLASH_ECUDA;
}

extern "C" int flash_attention_fwd(void *stream, void *out, float *lse, const void *q,
                                   const void *k, const void *v, int B, int T, int NH, int HS,
                                   int qkv_stride, int out_stride) {
    if (!fa_args_ok(B, T, NH, HS, qkv_stride, out_stride)) return FLASH_EBADARG;
    if (!fa_aligned(out) || !fa_aligned(q) || !fa_aligned(k) || !fa_aligned(v) || !lse)
        return FLASH_EBADARG;
    if (cudaFuncSetAttribute(fa_fwd_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             FA_FWD_SMEM) != cudaSuccess) {
        (void)cudaGetLastError(); // consume it: the caller gets the code instead
        return FLASH_ECUDA;
    }
    float scale_log2 = FA_LOG2E / sqrtf((float)HS);
    dim3 grid((unsigned)((T + FA_TILE - 1) / FA_TILE), (unsigned)(B * NH));
    fa_fwd_kernel<<<grid, FA_THREADS, FA_FWD_SMEM, (cudaStream_t)stream>>>(
        (__nv_bfloat16 *)out, lse, (const __nv_bfloat16 *)q, (const __nv_bfloat16 *)k,
        (const __nv_bfloat16 *)v, T, NH, (size_t)qkv_stride, (size_t)out_stride, scale_log2);
    return fa_launch_status();
}

extern "C" size_t flash_attention_bwd_scratch_floats(int B, int T, int NH, int HS) {
    (void)HS;
    return (size_t)B * NH * T; // D
}

extern "C" int flash_attention_bwd(void *stream, void *dq, void *dk, void *dv, const void *dout,
                                   const void *q, const void *k, const void *v, const void *out,
                                   const float *lse, float *scratch, int B, int T, int NH, int HS,
                                   int qkv_stride, int out_stride) {
    if (!fa_args_ok(B, T, NH, HS, qkv_stride, out_stride)) return FLASH_EBADARG;
    if (!fa_aligned(dq) || !fa_aligned(dk) || !fa_aligned(dv) || !fa_aligned(dout) ||
        !fa_aligned(q) || !fa_aligned(k) || !fa_aligned(v) || !fa_aligned(out) || !lse || !scratch)
        return FLASH_EBADARG;
    cudaStream_t st = (cudaStream_t)stream;
    float scale = 1.0f / sqrtf((float)HS), scale_log2 = scale * FA_LOG2E;
    float *D = scratch; // (B, NH, T)

    size_t rows = (size_t)B * T * NH;
    unsigned rd_blocks = (unsigned)((rows * 32 + 255) / 256);
    fa_bwd_rowdot_kernel<<<rd_blocks, 256, 0, st>>>(D, (const __nv_bfloat16 *)dout,
                                                    (const __nv_bfloat16 *)out, B, T, NH,
                                                    (size_t)out_stride);
    if (fa_launch_status() != FLASH_OK) return FLASH_ECUDA;

    if (cudaFuncSetAttribute(fa_bwd_dkdv_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             FA_BWD_SMEM) != cudaSuccess ||
        cudaFuncSetAttribute(fa_bwd_dq_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             FA_BWD_SMEM) != cudaSuccess) {
        (void)cudaGetLastError();
        return FLASH_ECUDA;
    }
    dim3 grid((unsigned)((T + FA_TILE - 1) / FA_TILE), (unsigned)(B * NH));
    fa_bwd_dkdv_kernel<<<grid, FA_THREADS, FA_BWD_SMEM, st>>>(
        (__nv_bfloat16 *)dk, (__nv_bfloat16 *)dv, (const __nv_bfloat16 *)dout,
        (const __nv_bfloat16 *)q, (const __nv_bfloat16 *)k, (const __nv_bfloat16 *)v, lse, D, T,
        NH, (size_t)qkv_stride, (size_t)out_stride, scale, scale_log2);
    if (fa_launch_status() != FLASH_OK) return FLASH_ECUDA;
    fa_bwd_dq_kernel<<<grid, FA_THREADS, FA_BWD_SMEM, st>>>(
        (__nv_bfloat16 *)dq, (const __nv_bfloat16 *)dout, (const __nv_bfloat16 *)q,
        (const __nv_bfloat16 *)k, (const __nv_bfloat16 *)v, lse, D, T, NH, (size_t)qkv_stride,
        (size_t)out_stride, scale, scale_log2);
    return fa_launch_status();
}
