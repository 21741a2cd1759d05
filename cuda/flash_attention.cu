// flash_attention.cu: fused causal attention in bf16 on tensor cores (see flash_attention.h).
//
// Every product is mma.sync m16n8k16 (bf16 operands, fp32 accumulators) on fragments that stay in
// registers: a warp owns 16 rows (queries in the forward and the dq kernel, keys in the dk/dv
// kernel), its scores come out of the tensor cores as accumulator fragments, the softmax works on
// them in place (a row's four owners exchange maxima and sums through quad shuffles), and the
// probabilities are repacked as bf16 A fragments for the next product without touching shared
// memory. Shared memory holds only the operand tiles, filled by cp.async two or three tiles deep
// and read with ldmatrix (.trans where the product needs the tile's transpose); rows of 64 bf16
// (128 bytes, 8 chunks of 16) are stored with chunk c of row r at c ^ (r % 8), so the 8 row
// addresses of every ldmatrix phase and of every cp.async quarter-warp fall in distinct banks.
//
// Causality: tiles entirely above the diagonal are never visited; inside a diagonal tile 16-wide
// chunks past a warp's last row are skipped and only the diagonal tiles are masked. Softmax
// arithmetic is fp32 in the exp2 domain (scores prescaled by log2(e) / sqrt(HS)).
//
// Backward without atomics: the dq kernel (one block per query tile, walking the key tiles) also
// produces D = rowsum(dout * out) for its rows; the dk/dv kernel (one block per key tile, walking
// the query tiles) then reads D. Both recompute P from q, k and the saved log-sum-exp, trading two
// recomputed products for determinism.
//
// Sections: constants and shared layout, device helpers, kernels, launchers.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>

#include "flash_attention.h"

typedef __nv_bfloat16 fa_bf16;

// ---- constants and shared layout

#define FA_HS 64       // head size the kernels are written for
#define FA_TILE 64     // rows of the tiles a block walks over (keys in fwd/dq, queries in dk/dv)
#define FA_ROWB 128    // bytes of one shared row: 64 bf16
#define FA_TILEB (FA_TILE * FA_ROWB) // bytes of one 64-row shared tile

// Warps per block (16 own rows each). A build may override these tuning constants to compare
// variants; the defaults are the fastest measured on an H200 at B = 16 and 32, NH = 12, T = 1024
// (4-warp blocks beat 8-warp ones everywhere; stages and reloading moved times by a few percent).
#ifndef FA_FWD_WARPS
#define FA_FWD_WARPS 4
#endif
#ifndef FA_DQ_WARPS
#define FA_DQ_WARPS 4
#endif
#ifndef FA_DKV_WARPS
#define FA_DKV_WARPS 4
#endif
// Shared-memory stages of the walked tiles (2: double buffering), the blocks per SM the register
// allocation must allow (__launch_bounds__'s second argument; 1 leaves it free), and whether a
// warp re-reads the fragments of its own rows (Q; Q and dO; K and V) from shared memory for every
// tile instead of holding them in registers (fewer registers, more ldmatrix).
#ifndef FA_FWD_STAGES
#define FA_FWD_STAGES 2
#endif
#ifndef FA_FWD_MINB
#define FA_FWD_MINB 4
#endif
#ifndef FA_DQ_STAGES
#define FA_DQ_STAGES 3
#endif
#ifndef FA_DQ_MINB
#define FA_DQ_MINB 3
#endif
#ifndef FA_DKV_STAGES
#define FA_DKV_STAGES 3
#endif
#ifndef FA_DKV_MINB
#define FA_DKV_MINB 3
#endif
#ifndef FA_FWD_RELOAD
#define FA_FWD_RELOAD true
#endif
#ifndef FA_DQ_RELOAD
#define FA_DQ_RELOAD false
#endif
#ifndef FA_DKV_RELOAD
#define FA_DKV_RELOAD true
#endif

#define FA_LOG2E 1.4426950408889634f
#define FA_LN2 0.6931471805599453f

// ---- device helpers

__device__ __forceinline__ static uint32_t fa_smem_u32(const void *p) {
    return (uint32_t)__cvta_generic_to_shared(p);
}

// Byte offset of chunk (8 bf16) `chunk` of row `row` in a swizzled shared tile.
__device__ __forceinline__ static uint32_t fa_sw(int row, int chunk) {
    return (uint32_t)(row * FA_ROWB + ((chunk ^ (row & 7)) << 4));
}

// 16 bytes global -> shared, bypassing L1; zero-filled when !valid (src is then not read).
__device__ __forceinline__ static void fa_cp16(uint32_t dst, const void *src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                 "r"(valid ? 16 : 0)
                 : "memory");
}

// 4 bytes global -> shared; zero-filled when !valid.
__device__ __forceinline__ static void fa_cp4(uint32_t dst, const void *src, bool valid) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src),
                 "r"(valid ? 4 : 0)
                 : "memory");
}

__device__ __forceinline__ static void fa_cp_commit(void) {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}

template <int N> __device__ __forceinline__ static void fa_cp_wait(void) {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Four 8x8 bf16 matrices from shared memory; lane i gives the row address of matrix i / 8.
__device__ __forceinline__ static void fa_ldsm(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// The same, each matrix transposed.
__device__ __forceinline__ static void fa_ldsm_t(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// c (16x8 fp32) += a (16x16 bf16, row-major fragment) . b (16x8 bf16, column fragment b0, b1)
__device__ __forceinline__ static void fa_mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                              uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ static float fa_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// Two floats as one bf16x2 register, lo in the low half (the lower column of a fragment pair).
__device__ __forceinline__ static uint32_t fa_pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t *>(&v);
}

// Lane address patterns for ldmatrix.x4 over a 16-row x 16-column block at (row0, chunk0) of a
// swizzled tile (row0 a multiple of 8, chunk0 even):
// - A pattern: matrices (rows 0-7, cols 0-7), (rows 8-15, cols 0-7), (rows 0-7, cols 8-15),
//   (rows 8-15, cols 8-15). Plain, it is an A fragment of the rows; transposed, the two column
//   fragments (b0 b1, b2 b3) of the n-tiles cols 0-7 and 8-15 of a row-major (k, n) operand.
// - B pattern: matrices (rows 0-7, cols 0-7), (rows 0-7, cols 8-15), (rows 8-15, cols 0-7),
//   (rows 8-15, cols 8-15). Plain, the column fragments of n-tiles rows 0-7 and rows 8-15 of a
//   product against the tile's transpose (scores: rows are keys, columns the head dimension).
__device__ __forceinline__ static uint32_t fa_addr_a(uint32_t base, int row0, int chunk0,
                                                     int lane) {
    return base + fa_sw(row0 + (lane & 7) + ((lane >> 3) & 1) * 8, chunk0 + (lane >> 4));
}

__device__ __forceinline__ static uint32_t fa_addr_b(uint32_t base, int row0, int chunk0,
                                                     int lane) {
    return base + fa_sw(row0 + (lane & 7) + (lane >> 4) * 8, chunk0 + ((lane >> 3) & 1));
}

// Rows [row0, row0 + ROWS) of one head (src points at its row 0, rows stride elements apart)
// into a swizzled (ROWS, 64) shared tile at dst; rows at or past T are zero-filled, so padded
// queries and keys give finite scores that the masks then drop. Thread i copies chunk i % 8 of
// rows i / 8 + j * NT / 8; NT / 8 is a multiple of 8, so every one of its rows has the same swizzle
// and its addresses differ by constants.
template <int ROWS, int NT>
__device__ __forceinline__ static void fa_load_tile(uint32_t dst, const fa_bf16 *src,
                                                    size_t stride, int row0, int T) {
    static_assert((ROWS * 8) % NT == 0 && (NT / 8) % 8 == 0, "tile rows must divide evenly");
    int r = (int)threadIdx.x >> 3, c = (int)threadIdx.x & 7;
    uint32_t so = dst + fa_sw(r, c);
    const fa_bf16 *p = src + (size_t)(row0 + r) * stride + c * 8;
    size_t step = (size_t)(NT / 8) * stride;
#pragma unroll
    for (int j = 0; j < ROWS * 8 / NT; j++) {
        bool ok = row0 + r + j * (NT / 8) < T;
        fa_cp16(so + j * (NT / 8) * FA_ROWB, ok ? p + j * step : src, ok);
    }
}

// 64 floats [row0, row0 + 64) of a (T) row into shared dst; zero past T.
template <int NT>
__device__ __forceinline__ static void fa_load_vec(uint32_t dst, const float *src, int row0,
                                                   int T) {
    for (int i = (int)threadIdx.x; i < FA_TILE; i += NT) {
        bool ok = row0 + i < T;
        fa_cp4(dst + 4u * (uint32_t)i, ok ? src + row0 + i : src, ok);
    }
}

// A warp's 16 x 64 fp32 accumulators acc (8 n-tiles), times mul, as bf16 to rows [row0, row0+16)
// of dst (row stride stride), rows at or past T skipped. Staged through the warp's own 16 rows of
// a swizzled shared tile (stage_row0 there) so the global stores are whole 16-byte chunks.
__device__ __forceinline__ static void fa_store_rows(fa_bf16 *dst, size_t stride,
                                                     const float (&acc)[8][4], float mul,
                                                     unsigned char *stage, int stage_row0,
                                                     int row0, int T, int lane) {
    int g = lane >> 2, tq = lane & 3;
#pragma unroll
    for (int j = 0; j < 8; j++) {
        int ra = stage_row0 + g, rb = ra + 8;
        *reinterpret_cast<uint32_t *>(stage + fa_sw(ra, j) + 4 * tq) =
            fa_pack(acc[j][0] * mul, acc[j][1] * mul);
        *reinterpret_cast<uint32_t *>(stage + fa_sw(rb, j) + 4 * tq) =
            fa_pack(acc[j][2] * mul, acc[j][3] * mul);
    }
    __syncwarp();
#pragma unroll
    for (int it = 0; it < 4; it++) {
        int c = lane + 32 * it, r = c >> 3, ch = c & 7;
        if (row0 + r < T)
            *reinterpret_cast<uint4 *>(dst + (size_t)(row0 + r) * stride + ch * 8) =
                *reinterpret_cast<const uint4 *>(stage + fa_sw(stage_row0 + r, ch));
    }
}

// 16 x 16 accumulator pairs (n-tiles 2c, 2c + 1) of a 16 x 64 tile as the bf16 A fragment of
// 16-column chunk c, for every c.
__device__ __forceinline__ static void fa_to_afrag(uint32_t (&f)[4][4], const float (&x)[8][4]) {
#pragma unroll
    for (int c = 0; c < 4; c++) {
        f[c][0] = fa_pack(x[2 * c][0], x[2 * c][1]);
        f[c][1] = fa_pack(x[2 * c][2], x[2 * c][3]);
        f[c][2] = fa_pack(x[2 * c + 1][0], x[2 * c + 1][1]);
        f[c][3] = fa_pack(x[2 * c + 1][2], x[2 * c + 1][3]);
    }
}

__device__ __forceinline__ static void fa_zero(float (&x)[8][4]) {
#pragma unroll
    for (int j = 0; j < 8; j++) x[j][0] = x[j][1] = x[j][2] = x[j][3] = 0.0f;
}

// ---- per-tile bodies
//
// Each handles one warp's 16 rows against one 64-row tile. The DIAG / EDGE instances serve the
// few tiles that cross the diagonal (or T): they skip 16-wide chunks with nothing visible and
// mask. The plain instances have no branches, and their products run the k-step loop outside the
// chunk loop, so consecutive mma instructions feed different accumulators and overlap.

// Forward: S = Q K^T, online softmax, O += P V. kb, vb: the K and V tiles; k0 the tile's first
// key, r0 the warp's first query; nkc: 16-key chunks holding a key <= the warp's last query.
// acc (16 x 64) += a (the warp's 16 rows x 64, as four 16-wide A fragments) . the 64 x 64 tile
// at tile (its rows read transposed by ldmatrix); with DIAG only the first nkc 16-row chunks.
template <bool DIAG>
__device__ __forceinline__ static void fa_mma_tile(float (&acc)[8][4], const uint32_t (&a)[4][4],
                                                   uint32_t tile, int nkc, int lane) {
#pragma unroll
    for (int kc = 0; kc < 4; kc++) {
        if (DIAG && kc >= nkc) continue;
#pragma unroll
        for (int nd = 0; nd < 4; nd++) {
            uint32_t b[4];
            fa_ldsm_t(b, fa_addr_a(tile, 16 * kc, 2 * nd, lane));
            fa_mma(acc[2 * nd], a[kc], b[0], b[1]);
            fa_mma(acc[2 * nd + 1], a[kc], b[2], b[3]);
        }
    }
}

template <bool DIAG>
__device__ __forceinline__ static void fa_fwd_tile(float (&o)[8][4], float (&m)[2], float (&l)[2],
                                                   const uint32_t (&qf)[4][4], uint32_t kb,
                                                   uint32_t vb, int k0, int r0, int nkc, int lane,
                                                   float scale_log2) {
    int g = lane >> 2, tq = lane & 3;
    float s[8][4];
    fa_zero(s);
#pragma unroll
    for (int kd = 0; kd < 4; kd++)
#pragma unroll
        for (int kc = 0; kc < 4; kc++) {
            if (DIAG && kc >= nkc) continue;
            uint32_t bf[4];
            fa_ldsm(bf, fa_addr_b(kb, 16 * kc, 2 * kd, lane));
            fa_mma(s[2 * kc], qf[kd], bf[0], bf[1]);
            fa_mma(s[2 * kc + 1], qf[kd], bf[2], bf[3]);
        }
    if (DIAG) { // keys past the row; this also covers the skipped chunks
#pragma unroll
        for (int j = 0; j < 8; j++)
#pragma unroll
            for (int e = 0; e < 4; e++)
                if (k0 + 8 * j + 2 * tq + (e & 1) > r0 + g + 8 * (e >> 1)) s[j][e] = -INFINITY;
    }
    // Every visited tile holds a visible key for each row (k0 <= r0), so maxima are finite; the
    // -inf guard only keeps -inf - -inf out should that ever change.
#pragma unroll
    for (int hr = 0; hr < 2; hr++) { // rows g and g + 8
        float mx = -INFINITY;
#pragma unroll
        for (int j = 0; j < 8; j++) mx = fmaxf(mx, fmaxf(s[j][2 * hr], s[j][2 * hr + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        float m_new = fmaxf(m[hr], mx);
        float m_use = m_new == -INFINITY ? 0.0f : m_new;
        float alpha = fa_exp2((m[hr] - m_use) * scale_log2); // 0 on the first tile
        float ms = m_use * scale_log2;
        m[hr] = m_new;
        float sum = 0.0f;
#pragma unroll
        for (int j = 0; j < 8; j++) {
            float p0 = fa_exp2(fmaf(s[j][2 * hr], scale_log2, -ms));
            float p1 = fa_exp2(fmaf(s[j][2 * hr + 1], scale_log2, -ms));
            s[j][2 * hr] = p0;
            s[j][2 * hr + 1] = p1;
            sum += p0 + p1;
            o[j][2 * hr] *= alpha;
            o[j][2 * hr + 1] *= alpha;
        }
        l[hr] = l[hr] * alpha + sum; // this lane's part; the quad's parts are summed at the end
    }
    uint32_t pf[4][4];
    fa_to_afrag(pf, s);
    fa_mma_tile<DIAG>(o, pf, vb, nkc, lane);
}

// dq kernel: S = Q K^T, dP = dO V^T, dS = P (dP - D), dQ += dS K. lrow, drow: lse (log2 units)
// and D of rows g and g + 8.
template <bool DIAG>
__device__ __forceinline__ static void fa_dq_tile(float (&acc)[8][4], const uint32_t (&qf)[4][4],
                                                  const uint32_t (&df)[4][4], uint32_t kb,
                                                  uint32_t vb, int k0, int r0, int nkc,
                                                  const float (&lrow)[2], const float (&drow)[2],
                                                  int lane, float scale_log2) {
    int g = lane >> 2, tq = lane & 3;
    float s[8][4], dp[8][4];
    fa_zero(s);
    fa_zero(dp);
#pragma unroll
    for (int kd = 0; kd < 4; kd++)
#pragma unroll
        for (int kc = 0; kc < 4; kc++) {
            if (DIAG && kc >= nkc) continue;
            uint32_t bk[4], bv[4];
            fa_ldsm(bk, fa_addr_b(kb, 16 * kc, 2 * kd, lane));
            fa_ldsm(bv, fa_addr_b(vb, 16 * kc, 2 * kd, lane));
            fa_mma(s[2 * kc], qf[kd], bk[0], bk[1]);
            fa_mma(s[2 * kc + 1], qf[kd], bk[2], bk[3]);
            fa_mma(dp[2 * kc], df[kd], bv[0], bv[1]);
            fa_mma(dp[2 * kc + 1], df[kd], bv[2], bv[3]);
        }
#pragma unroll
    for (int j = 0; j < 8; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            int hr = e >> 1;
            float p = fa_exp2(fmaf(s[j][e], scale_log2, -lrow[hr]));
            if (DIAG && k0 + 8 * j + 2 * tq + (e & 1) > r0 + g + 8 * hr) p = 0.0f;
            s[j][e] = p * (dp[j][e] - drow[hr]);
        }
    uint32_t sf[4][4];
    fa_to_afrag(sf, s);
    fa_mma_tile<DIAG>(acc, sf, kb, nkc, lane);
}

// dk/dv kernel, transposed (rows = the warp's 16 keys from k0, columns = the tile's 64 queries
// from q0): S^T = K Q^T, dP^T = V dO^T, P^T, dS^T = P^T (dP^T - D), dV += P^T dO, dK += dS^T Q.
// Lt, Dt: the tile's lse (natural log) and D in shared memory. EDGE: the tile crosses the
// diagonal or T; chunks before qc0 hold only queries that precede every key of the warp.
template <bool EDGE>
__device__ __forceinline__ static void fa_dkdv_tile(float (&dka)[8][4], float (&dva)[8][4],
                                                    const uint32_t (&kf)[4][4],
                                                    const uint32_t (&vf)[4][4], uint32_t qb,
                                                    uint32_t db, const float *Lt, const float *Dt,
                                                    int q0, int k0, int qc0, int T, int lane,
                                                    float scale_log2) {
    int g = lane >> 2, tq = lane & 3;
    float s[8][4], dp[8][4];
    fa_zero(s);
    fa_zero(dp);
#pragma unroll
    for (int kd = 0; kd < 4; kd++)
#pragma unroll
        for (int qc = 0; qc < 4; qc++) {
            if (EDGE && qc < qc0) continue;
            uint32_t bq[4], bd[4];
            fa_ldsm(bq, fa_addr_b(qb, 16 * qc, 2 * kd, lane));
            fa_ldsm(bd, fa_addr_b(db, 16 * qc, 2 * kd, lane));
            fa_mma(s[2 * qc], kf[kd], bq[0], bq[1]);
            fa_mma(s[2 * qc + 1], kf[kd], bq[2], bq[3]);
            fa_mma(dp[2 * qc], vf[kd], bd[0], bd[1]);
            fa_mma(dp[2 * qc + 1], vf[kd], bd[2], bd[3]);
        }
#pragma unroll
    for (int j = 0; j < 8; j++) {
        int c = 8 * j + 2 * tq; // this lane's column pair within the query tile
        float2 lv = *reinterpret_cast<const float2 *>(Lt + c);
        float2 dv2 = *reinterpret_cast<const float2 *>(Dt + c);
        float lq[2] = {lv.x * FA_LOG2E, lv.y * FA_LOG2E}, dq2[2] = {dv2.x, dv2.y};
#pragma unroll
        for (int e = 0; e < 4; e++) {
            float p = fa_exp2(fmaf(s[j][e], scale_log2, -lq[e & 1]));
            int qi = q0 + c + (e & 1), ki = k0 + g + 8 * (e >> 1);
            if (EDGE && (qi < ki || qi >= T)) p = 0.0f;
            s[j][e] = p;
            dp[j][e] = p * (dp[j][e] - dq2[e & 1]);
        }
    }
    uint32_t pf[4][4], sf[4][4];
    fa_to_afrag(pf, s);
    fa_to_afrag(sf, dp);
#pragma unroll
    for (int qc = 0; qc < 4; qc++) {
        if (EDGE && qc < qc0) continue;
#pragma unroll
        for (int nd = 0; nd < 4; nd++) {
            uint32_t bd[4], bq[4];
            fa_ldsm_t(bd, fa_addr_a(db, 16 * qc, 2 * nd, lane));
            fa_ldsm_t(bq, fa_addr_a(qb, 16 * qc, 2 * nd, lane));
            fa_mma(dva[2 * nd], pf[qc], bd[0], bd[1]);
            fa_mma(dva[2 * nd + 1], pf[qc], bd[2], bd[3]);
            fa_mma(dka[2 * nd], sf[qc], bq[0], bq[1]);
            fa_mma(dka[2 * nd + 1], sf[qc], bq[2], bq[3]);
        }
    }
}

// ---- kernels

// Forward. grid (B*NH, ceil(T/BM)), block NW warps, BM = NW*16 queries per block. Query tiles
// are taken heaviest (last) first so the long blocks start early and the short ones fill the
// tail. ST, MINB, RL: see the tuning constants at the top.
template <int NW, int ST, int MINB, bool RL>
static __global__ void __launch_bounds__(NW * 32, MINB)
fa_fwd_kernel(fa_bf16 *out, float *lse, const fa_bf16 *q, const fa_bf16 *k, const fa_bf16 *v,
              int T, int NH, size_t qkv_stride, size_t out_stride, float scale_log2) {
    // out (B, T, NH, HS) row stride out_stride; lse (B, NH, T); q, k, v (B, T, NH, HS) row
    // stride qkv_stride
    constexpr int NT = NW * 32, BM = NW * 16;
    extern __shared__ __align__(128) unsigned char fa_smem[];
    unsigned char *q_s = fa_smem;           // (BM, 64) swizzled; later the output staging
    const uint32_t sQ = fa_smem_u32(q_s);
    const uint32_t sK = sQ + BM * FA_ROWB;  // ST x (64, 64) swizzled
    const uint32_t sV = sK + ST * FA_TILEB; // ST x (64, 64) swizzled

    int qt = (int)gridDim.y - 1 - (int)blockIdx.y;
    int bh = (int)blockIdx.x, b = bh / NH, h = bh % NH;
    int warp = (int)threadIdx.x >> 5, lane = (int)threadIdx.x & 31;
    int g = lane >> 2, tq = lane & 3; // fragment row (and row + 8) and column pair of this lane
    size_t head_off = (size_t)b * T * qkv_stride + (size_t)h * FA_HS;
    const fa_bf16 *kh = k + head_off, *vh = v + head_off;
    int q0 = qt * BM;
    int nkt = (min(q0 + BM, T) - 1) / FA_TILE + 1; // key tiles holding a key <= a valid query

    // Q lands with key tile 0; one commit group per tile, empty ones included, so that the
    // wait in the loop always leaves exactly ST - 2 groups in flight.
    fa_load_tile<BM, NT>(sQ, q + head_off, qkv_stride, q0, T);
#pragma unroll
    for (int st = 0; st < ST - 1; st++) {
        if (st < nkt) {
            fa_load_tile<FA_TILE, NT>(sK + st * FA_TILEB, kh, qkv_stride, st * FA_TILE, T);
            fa_load_tile<FA_TILE, NT>(sV + st * FA_TILEB, vh, qkv_stride, st * FA_TILE, T);
        }
        fa_cp_commit();
    }

    int r0 = q0 + warp * 16; // this warp's first query
    float o[8][4];           // unnormalised output, 16 x 64
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f}; // running max (raw), partial sum
    fa_zero(o);
    uint32_t qf[4][4]; // Q A fragments, one per 16-column k-step

    for (int kt = 0; kt < nkt; kt++) {
        fa_cp_wait<ST - 2>();
        __syncthreads(); // tile kt has landed; every warp is done with tile kt - 1's buffer
        if (kt + ST - 1 < nkt) {
            uint32_t nb = (uint32_t)((kt + ST - 1) % ST) * FA_TILEB;
            fa_load_tile<FA_TILE, NT>(sK + nb, kh, qkv_stride, (kt + ST - 1) * FA_TILE, T);
            fa_load_tile<FA_TILE, NT>(sV + nb, vh, qkv_stride, (kt + ST - 1) * FA_TILE, T);
        }
        fa_cp_commit();
        int k0 = kt * FA_TILE;
        if (r0 >= T || k0 > r0) continue; // no valid query, or every key is in the future
        if (RL || kt == 0) { // every warp with a valid query visits tile 0
#pragma unroll
            for (int kd = 0; kd < 4; kd++) fa_ldsm(qf[kd], fa_addr_a(sQ, warp * 16, 2 * kd, lane));
        }
        uint32_t cb = (uint32_t)(kt % ST) * FA_TILEB;
        if (k0 + FA_TILE - 1 > r0)
            fa_fwd_tile<true>(o, m, l, qf, sK + cb, sV + cb, k0, r0,
                              min(4, (r0 + 15 - k0) / 16 + 1), lane, scale_log2);
        else
            fa_fwd_tile<false>(o, m, l, qf, sK + cb, sV + cb, k0, r0, 4, lane, scale_log2);
    }

    // normalise, write out (staged through this warp's own rows of the Q tile, read only into
    // registers above) and the log-sum-exp in natural-log units
    float *lse_h = lse + (size_t)bh * T;
    size_t out_off = (size_t)b * T * out_stride + (size_t)h * FA_HS;
    float inv[2];
#pragma unroll
    for (int hr = 0; hr < 2; hr++) {
        float lt = l[hr];
        lt += __shfl_xor_sync(0xffffffffu, lt, 1);
        lt += __shfl_xor_sync(0xffffffffu, lt, 2);
        inv[hr] = lt > 0.0f ? 1.0f / lt : 0.0f;
        int row = r0 + g + 8 * hr;
        if (tq == 0 && row < T) lse_h[row] = (m[hr] * scale_log2 + __log2f(lt)) * FA_LN2;
    }
#pragma unroll
    for (int j = 0; j < 8; j++) {
        o[j][0] *= inv[0];
        o[j][1] *= inv[0];
        o[j][2] *= inv[1];
        o[j][3] *= inv[1];
    }
    fa_store_rows(out + out_off, out_stride, o, 1.0f, q_s, warp * 16, r0, T, lane);
}

// dq for one query tile, and D = rowsum(dout * out) for its rows: grid (B*NH, ceil(T/BM)),
// block NW warps, BM = NW*16; each warp owns 16 queries and walks the key tiles up to the
// diagonal, accumulating dq in registers.
template <int NW, int ST, int MINB, bool RL>
static __global__ void __launch_bounds__(NW * 32, MINB)
fa_bwd_dq_kernel(fa_bf16 *dq, float *D, const fa_bf16 *dout, const fa_bf16 *out,
                 const fa_bf16 *q, const fa_bf16 *k, const fa_bf16 *v, const float *lse, int T,
                 int NH, size_t qkv_stride, size_t out_stride, float scale, float scale_log2) {
    // dq, q, k, v (B, T, NH, HS) row stride qkv_stride; dout, out (B, T, NH, HS) row stride
    // out_stride; D, lse (B, NH, T)
    constexpr int NT = NW * 32, BM = NW * 16;
    extern __shared__ __align__(128) unsigned char fa_smem[];
    unsigned char *q_s = fa_smem;           // (BM, 64) swizzled; later the dq staging
    const uint32_t sQ = fa_smem_u32(q_s);
    const uint32_t sdO = sQ + BM * FA_ROWB; // (BM, 64)
    const uint32_t sK = sdO + BM * FA_ROWB; // ST x (64, 64)
    const uint32_t sV = sK + ST * FA_TILEB; // ST x (64, 64)

    int qt = (int)gridDim.y - 1 - (int)blockIdx.y;
    int bh = (int)blockIdx.x, b = bh / NH, h = bh % NH;
    int warp = (int)threadIdx.x >> 5, lane = (int)threadIdx.x & 31;
    int g = lane >> 2;
    size_t head_off = (size_t)b * T * qkv_stride + (size_t)h * FA_HS;
    size_t dout_off = (size_t)b * T * out_stride + (size_t)h * FA_HS;
    const fa_bf16 *kh = k + head_off, *vh = v + head_off;
    int q0 = qt * BM;
    int nkt = (min(q0 + BM, T) - 1) / FA_TILE + 1;

    fa_load_tile<BM, NT>(sQ, q + head_off, qkv_stride, q0, T);
    fa_load_tile<BM, NT>(sdO, dout + dout_off, out_stride, q0, T);
#pragma unroll
    for (int st = 0; st < ST - 1; st++) { // as in the forward: one group per tile
        if (st < nkt) {
            fa_load_tile<FA_TILE, NT>(sK + st * FA_TILEB, kh, qkv_stride, st * FA_TILE, T);
            fa_load_tile<FA_TILE, NT>(sV + st * FA_TILEB, vh, qkv_stride, st * FA_TILE, T);
        }
        fa_cp_commit();
    }

    // D for this warp's 16 rows while the tiles land: lane = (row, half of the columns)
    int r0 = q0 + warp * 16;
    float drow[2], lrow[2]; // D and lse (log2 units) of rows g and g + 8
    {
        int rr = lane >> 1, c0 = (lane & 1) * 32, t = r0 + rr;
        float d = 0.0f;
        if (t < T) {
            size_t off = dout_off + (size_t)t * out_stride + c0;
            const uint4 *a = reinterpret_cast<const uint4 *>(dout + off);
            const uint4 *o = reinterpret_cast<const uint4 *>(out + off);
#pragma unroll
            for (int c = 0; c < 4; c++) {
                uint4 av = a[c], ov = o[c];
                const __nv_bfloat162 *a2 = reinterpret_cast<const __nv_bfloat162 *>(&av);
                const __nv_bfloat162 *o2 = reinterpret_cast<const __nv_bfloat162 *>(&ov);
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    float2 af = __bfloat1622float2(a2[e]), of = __bfloat1622float2(o2[e]);
                    d = fmaf(af.x, of.x, d);
                    d = fmaf(af.y, of.y, d);
                }
            }
        }
        d += __shfl_xor_sync(0xffffffffu, d, 1);
        if ((lane & 1) == 0 && t < T) D[(size_t)bh * T + t] = d;
        drow[0] = __shfl_sync(0xffffffffu, d, 2 * g);
        drow[1] = __shfl_sync(0xffffffffu, d, 2 * g + 16);
#pragma unroll
        for (int hr = 0; hr < 2; hr++) {
            int row = r0 + g + 8 * hr;
            lrow[hr] = row < T ? lse[(size_t)bh * T + row] * FA_LOG2E : 0.0f;
        }
    }

    float acc[8][4]; // dq (unscaled), 16 x 64
    fa_zero(acc);
    uint32_t qf[4][4], df[4][4]; // Q and dO A fragments

    for (int kt = 0; kt < nkt; kt++) {
        fa_cp_wait<ST - 2>();
        __syncthreads();
        if (kt + ST - 1 < nkt) {
            uint32_t nb = (uint32_t)((kt + ST - 1) % ST) * FA_TILEB;
            fa_load_tile<FA_TILE, NT>(sK + nb, kh, qkv_stride, (kt + ST - 1) * FA_TILE, T);
            fa_load_tile<FA_TILE, NT>(sV + nb, vh, qkv_stride, (kt + ST - 1) * FA_TILE, T);
        }
        fa_cp_commit();
        int k0 = kt * FA_TILE;
        if (r0 >= T || k0 > r0) continue; // no valid query, or every key is in the future
        if (RL || kt == 0) {
#pragma unroll
            for (int kd = 0; kd < 4; kd++) {
                fa_ldsm(qf[kd], fa_addr_a(sQ, warp * 16, 2 * kd, lane));
                fa_ldsm(df[kd], fa_addr_a(sdO, warp * 16, 2 * kd, lane));
            }
        }
        uint32_t cb = (uint32_t)(kt % ST) * FA_TILEB;
        if (k0 + FA_TILE - 1 > r0)
            fa_dq_tile<true>(acc, qf, df, sK + cb, sV + cb, k0, r0,
                             min(4, (r0 + 15 - k0) / 16 + 1), lrow, drow, lane, scale_log2);
        else
            fa_dq_tile<false>(acc, qf, df, sK + cb, sV + cb, k0, r0, 4, lrow, drow, lane,
                              scale_log2);
    }

    // the warp's own rows of the Q tile were read only into qf, at kt = 0
    fa_store_rows(dq + head_off, qkv_stride, acc, scale, q_s, warp * 16, r0, T, lane);
}

// dk, dv for one key tile: grid (B*NH, ceil(T/BN)), block NW warps, BN = NW*16; each warp owns 16
// keys and walks the 64-query tiles from the diagonal to the end. Block y = 0 is the key tile
// that sees the most queries, so the heaviest blocks start first.
template <int NW, int ST, int MINB, bool RL>
static __global__ void __launch_bounds__(NW * 32, MINB)
fa_bwd_dkdv_kernel(fa_bf16 *dk, fa_bf16 *dv, const fa_bf16 *dout, const fa_bf16 *q,
                   const fa_bf16 *k, const fa_bf16 *v, const float *lse, const float *D, int T,
                   int NH, size_t qkv_stride, size_t out_stride, float scale, float scale_log2) {
    // dk, dv, q, k, v (B, T, NH, HS) row stride qkv_stride; dout (B, T, NH, HS) row stride
    // out_stride; lse, D (B, NH, T)
    constexpr int NT = NW * 32, BN = NW * 16;
    extern __shared__ __align__(128) unsigned char fa_smem[];
    unsigned char *k_s = fa_smem, *v_s = fa_smem + BN * FA_ROWB; // (BN, 64) each; later staging
    const uint32_t sK = fa_smem_u32(k_s);
    const uint32_t sV = sK + BN * FA_ROWB;
    const uint32_t sQ = sV + BN * FA_ROWB;     // ST x (64, 64)
    const uint32_t sdO = sQ + ST * FA_TILEB;   // ST x (64, 64)
    const uint32_t sL = sdO + ST * FA_TILEB;   // ST x (64) lse of the query tile
    const uint32_t sD = sL + ST * FA_TILE * 4; // ST x (64) D of the query tile
    const float *Lf = reinterpret_cast<const float *>(fa_smem + (sL - sK));
    const float *Df = reinterpret_cast<const float *>(fa_smem + (sD - sK));

    int kt = (int)blockIdx.y;
    int bh = (int)blockIdx.x, b = bh / NH, h = bh % NH;
    int warp = (int)threadIdx.x >> 5, lane = (int)threadIdx.x & 31;
    size_t head_off = (size_t)b * T * qkv_stride + (size_t)h * FA_HS;
    size_t dout_off = (size_t)b * T * out_stride + (size_t)h * FA_HS;
    const fa_bf16 *qh = q + head_off, *doh = dout + dout_off;
    const float *lse_h = lse + (size_t)bh * T, *D_h = D + (size_t)bh * T;
    int k0 = kt * BN;
    int qt0 = k0 / FA_TILE, nqt = (T + FA_TILE - 1) / FA_TILE;

    fa_load_tile<BN, NT>(sK, k + head_off, qkv_stride, k0, T);
    fa_load_tile<BN, NT>(sV, v + head_off, qkv_stride, k0, T);
#pragma unroll
    for (int st = 0; st < ST - 1; st++) { // as in the forward: one group per tile
        if (qt0 + st < nqt) {
            int row0 = (qt0 + st) * FA_TILE;
            fa_load_tile<FA_TILE, NT>(sQ + st * FA_TILEB, qh, qkv_stride, row0, T);
            fa_load_tile<FA_TILE, NT>(sdO + st * FA_TILEB, doh, out_stride, row0, T);
            fa_load_vec<NT>(sL + st * FA_TILE * 4, lse_h, row0, T);
            fa_load_vec<NT>(sD + st * FA_TILE * 4, D_h, row0, T);
        }
        fa_cp_commit();
    }

    int wk0 = k0 + warp * 16; // this warp's first key
    float dka[8][4], dva[8][4]; // dk (unscaled), dv: 16 keys x 64
    fa_zero(dka);
    fa_zero(dva);
    uint32_t kf[4][4], vf[4][4]; // K and V A fragments of the warp's keys
    bool loaded = false;

    for (int qt = qt0; qt < nqt; qt++) {
        int it = qt - qt0;
        fa_cp_wait<ST - 2>();
        __syncthreads();
        if (qt + ST - 1 < nqt) {
            uint32_t nb = (uint32_t)((it + ST - 1) % ST);
            int row0 = (qt + ST - 1) * FA_TILE;
            fa_load_tile<FA_TILE, NT>(sQ + nb * FA_TILEB, qh, qkv_stride, row0, T);
            fa_load_tile<FA_TILE, NT>(sdO + nb * FA_TILEB, doh, out_stride, row0, T);
            fa_load_vec<NT>(sL + nb * FA_TILE * 4, lse_h, row0, T);
            fa_load_vec<NT>(sD + nb * FA_TILE * 4, D_h, row0, T);
        }
        fa_cp_commit();
        int q0 = qt * FA_TILE;
        if (wk0 >= T || q0 + FA_TILE - 1 < wk0) continue; // every query precedes every key
        if (RL || !loaded) { // a warp's first visited tile need not be the block's first
#pragma unroll
            for (int kd = 0; kd < 4; kd++) {
                fa_ldsm(kf[kd], fa_addr_a(sK, warp * 16, 2 * kd, lane));
                fa_ldsm(vf[kd], fa_addr_a(sV, warp * 16, 2 * kd, lane));
            }
            loaded = true;
        }
        uint32_t buf = (uint32_t)(it % ST);
        uint32_t qb = sQ + buf * FA_TILEB, db = sdO + buf * FA_TILEB;
        const float *Lt = Lf + buf * FA_TILE, *Dt = Df + buf * FA_TILE;
        if (q0 < wk0 + 15 || q0 + FA_TILE > T) // 16-query chunks before qc0 precede every key
            fa_dkdv_tile<true>(dka, dva, kf, vf, qb, db, Lt, Dt, q0, wk0, max(0, (wk0 - q0) / 16),
                               T, lane, scale_log2);
        else
            fa_dkdv_tile<false>(dka, dva, kf, vf, qb, db, Lt, Dt, q0, wk0, 0, T, lane,
                                scale_log2);
    }

    // the warp's own rows of the K and V tiles were read only into kf, vf on the first pass
    fa_store_rows(dv + head_off, qkv_stride, dva, 1.0f, v_s, warp * 16, wk0, T, lane);
    fa_store_rows(dk + head_off, qkv_stride, dka, scale, k_s, warp * 16, wk0, T, lane);
}

// ---- launchers

// Shapes, strides and alignment the kernels rely on: 16-byte row chunks need 16-byte aligned
// pointers and strides that are multiples of 8 bf16.
static bool fa_args_ok(int B, int T, int NH, int HS, int qkv_stride, int out_stride) {
    if (HS != FA_HS || B < 1 || T < 1 || NH < 1) return false;
    if (qkv_stride < NH * HS || out_stride < NH * HS) return false;
    if (qkv_stride % 8 != 0 || out_stride % 8 != 0) return false;
    if ((size_t)B * NH > (size_t)INT_MAX) return false;          // gridDim.x
    if ((T + FA_TILE - 1) / FA_TILE > 65535) return false;         // gridDim.y
    return true;
}

static bool fa_aligned(const void *p) { return ((size_t)p & 15u) == 0; }

static int fa_launch_status(void) {
    return cudaGetLastError() == cudaSuccess ? FLASH_OK : FLASH_ECUDA;
}

// Raises a kernel's dynamic shared memory limit when it needs more than the default 48 KB.
static bool fa_smem_attr(const void *kernel, size_t bytes) {
    if (bytes <= 48u * 1024u) return true;
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes) ==
        cudaSuccess)
        return true;
    (void)cudaGetLastError(); // consume it: the caller gets the code instead
    return false;
}

template <int NW, int ST, int MINB, bool RL>
static int fa_fwd_launch(cudaStream_t st, fa_bf16 *out, float *lse, const fa_bf16 *q,
                         const fa_bf16 *k, const fa_bf16 *v, int B, int T, int NH,
                         int qkv_stride, int out_stride) {
    constexpr int BM = NW * 16;
    size_t smem = (size_t)BM * FA_ROWB + 2 * ST * FA_TILEB;
    if (!fa_smem_attr((const void *)fa_fwd_kernel<NW, ST, MINB, RL>, smem)) return FLASH_ECUDA;
    float scale_log2 = FA_LOG2E / sqrtf((float)FA_HS);
    dim3 grid((unsigned)(B * NH), (unsigned)((T + BM - 1) / BM));
    fa_fwd_kernel<NW, ST, MINB, RL><<<grid, NW * 32, smem, st>>>(
        out, lse, q, k, v, T, NH, (size_t)qkv_stride, (size_t)out_stride, scale_log2);
    return fa_launch_status();
}

template <int NW, int ST, int MINB, bool RL>
static int fa_dq_launch(cudaStream_t st, fa_bf16 *dq, float *D, const fa_bf16 *dout,
                        const fa_bf16 *out, const fa_bf16 *q, const fa_bf16 *k, const fa_bf16 *v,
                        const float *lse, int B, int T, int NH, int qkv_stride, int out_stride) {
    constexpr int BM = NW * 16;
    size_t smem = 2 * (size_t)BM * FA_ROWB + 2 * ST * FA_TILEB;
    if (!fa_smem_attr((const void *)fa_bwd_dq_kernel<NW, ST, MINB, RL>, smem)) return FLASH_ECUDA;
    float scale = 1.0f / sqrtf((float)FA_HS), scale_log2 = scale * FA_LOG2E;
    dim3 grid((unsigned)(B * NH), (unsigned)((T + BM - 1) / BM));
    fa_bwd_dq_kernel<NW, ST, MINB, RL><<<grid, NW * 32, smem, st>>>(
        dq, D, dout, out, q, k, v, lse, T, NH, (size_t)qkv_stride, (size_t)out_stride, scale,
        scale_log2);
    return fa_launch_status();
}

template <int NW, int ST, int MINB, bool RL>
static int fa_dkdv_launch(cudaStream_t st, fa_bf16 *dk, fa_bf16 *dv, const fa_bf16 *dout,
                          const fa_bf16 *q, const fa_bf16 *k, const fa_bf16 *v, const float *lse,
                          const float *D, int B, int T, int NH, int qkv_stride, int out_stride) {
    constexpr int BN = NW * 16;
    size_t smem = 2 * (size_t)BN * FA_ROWB + ST * (2 * FA_TILEB + 2 * FA_TILE * sizeof(float));
    if (!fa_smem_attr((const void *)fa_bwd_dkdv_kernel<NW, ST, MINB, RL>, smem)) return FLASH_ECUDA;
    float scale = 1.0f / sqrtf((float)FA_HS), scale_log2 = scale * FA_LOG2E;
    dim3 grid((unsigned)(B * NH), (unsigned)((T + BN - 1) / BN));
    fa_bwd_dkdv_kernel<NW, ST, MINB, RL><<<grid, NW * 32, smem, st>>>(
        dk, dv, dout, q, k, v, lse, D, T, NH, (size_t)qkv_stride, (size_t)out_stride, scale,
        scale_log2);
    return fa_launch_status();
}

extern "C" int flash_attention_fwd(void *stream, void *out, float *lse, const void *q,
                                   const void *k, const void *v, int B, int T, int NH, int HS,
                                   int qkv_stride, int out_stride) {
    if (!fa_args_ok(B, T, NH, HS, qkv_stride, out_stride)) return FLASH_EBADARG;
    if (!fa_aligned(out) || !fa_aligned(q) || !fa_aligned(k) || !fa_aligned(v) || !lse)
        return FLASH_EBADARG;
    return fa_fwd_launch<FA_FWD_WARPS, FA_FWD_STAGES, FA_FWD_MINB, FA_FWD_RELOAD>(
        (cudaStream_t)stream, (fa_bf16 *)out, lse, (const fa_bf16 *)q, (const fa_bf16 *)k,
        (const fa_bf16 *)v, B, T, NH, qkv_stride, out_stride);
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
    float *D = scratch; // (B, NH, T), written by the dq kernel, read by the dk/dv kernel
    int rc = fa_dq_launch<FA_DQ_WARPS, FA_DQ_STAGES, FA_DQ_MINB, FA_DQ_RELOAD>(
        st, (fa_bf16 *)dq, D, (const fa_bf16 *)dout, (const fa_bf16 *)out, (const fa_bf16 *)q,
        (const fa_bf16 *)k, (const fa_bf16 *)v, lse, B, T, NH, qkv_stride, out_stride);
    if (rc != FLASH_OK) return rc;
    return fa_dkdv_launch<FA_DKV_WARPS, FA_DKV_STAGES, FA_DKV_MINB, FA_DKV_RELOAD>(
        st, (fa_bf16 *)dk, (fa_bf16 *)dv, (const fa_bf16 *)dout, (const fa_bf16 *)q,
        (const fa_bf16 *)k, (const fa_bf16 *)v, lse, D, B, T, NH, qkv_stride, out_stride);
}
