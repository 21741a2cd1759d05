// flash_attention.cu: fused causal attention in bf16 on tensor cores, the portable path (see
// flash_attention.h; sm_80 and newer).
//
// Every product is mma.sync m16n8k16 (bf16 operands, fp32 accumulators) on fragments that stay in
// registers: a warp owns 16 rows (queries in the forward and the dq kernel, keys in the dk/dv
// kernel), its scores come out of the tensor cores as accumulator fragments, the softmax works on
// them in place (a row's four owners exchange maxima and sums through quad shuffles), and the
// probabilities are repacked as bf16 A fragments for the next product without touching shared
// memory. Shared memory holds only the operand tiles, filled by cp.async two or three tiles deep
// and read with ldmatrix (.trans where the product needs the tile's transpose); rows of D bf16
// (D / 8 chunks of 16 bytes) are stored with chunk c of row r at c ^ (r % 8), so the 8 row
// addresses of every ldmatrix phase and of every cp.async quarter-warp fall in distinct banks.
//
// Head sizes: the kernels are instantiated for D = 64, 128 and 256 columns; a head size HS <= D
// (a multiple of 8) runs in the smallest D that holds it, its columns past HS zero-filled in
// shared memory (they add nothing to q . k, and the output columns they produce are not stored).
// Products skip the 16-column steps that hold only padding. Where a warp's accumulators for all
// D output columns would not fit in registers (D = 256; dk/dv at D = 128 and 256), the backward
// kernels split the output columns over NS blocks, each recomputing the scores.
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
// Sections: constants and shared layout, device helpers, per-tile bodies, kernels, launchers.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "flash_attention.h"
#include "flash_attention_common.cuh"
#include "flash_attention_sm90.h"

typedef __nv_bfloat16 fa_bf16;

// ---- constants and shared layout

#define FA_TILE 64 // rows of the tiles a block walks over (keys in fwd/dq, queries in dk/dv)
#define FA_WARPS 4 // warps per block, 16 own rows each (4-warp blocks beat 8-warp ones at D = 64)
#define FA_NT (FA_WARPS * 32)
#define FA_BM (FA_WARPS * 16) // rows a block owns

// Per padded head size D: shared-memory stages of the walked tiles (2: double buffering), the
// blocks per SM the register allocation must allow (__launch_bounds__'s second argument), and the
// output-column splits of the backward kernels. The D = 64 figures are the fastest measured on an
// H200 at B = 16 and 32, NH = 12, T = 1024; the others keep every kernel free of register spills
// (ptxas -v) with two blocks per SM where shared memory allows.
template <int D> struct fa_cfg;
template <> struct fa_cfg<64> {
    static constexpr int fwd_st = 2, fwd_minb = 4;
    static constexpr int dq_st = 3, dq_minb = 3, dq_ns = 1;
    static constexpr int dkv_st = 3, dkv_minb = 3, dkv_ns = 1;
};
template <> struct fa_cfg<128> {
    static constexpr int fwd_st = 2, fwd_minb = 2;
    static constexpr int dq_st = 2, dq_minb = 2, dq_ns = 1;
    static constexpr int dkv_st = 2, dkv_minb = 1, dkv_ns = 1;
};
template <> struct fa_cfg<256> {
    static constexpr int fwd_st = 2, fwd_minb = 1;
    static constexpr int dq_st = 2, dq_minb = 1, dq_ns = 2;
    static constexpr int dkv_st = 2, dkv_minb = 1, dkv_ns = 2;
};

#define FA_LOG2E 1.4426950408889634f
#define FA_LN2 0.6931471805599453f

// ---- device helpers

__device__ __forceinline__ static uint32_t fa_smem_u32(const void *p) {
    return (uint32_t)__cvta_generic_to_shared(p);
}

// Byte offset of chunk (8 bf16) `chunk` of row `row` in a swizzled shared tile of D columns.
template <int D> __device__ __forceinline__ static uint32_t fa_sw(int row, int chunk) {
    return (uint32_t)(row * (2 * D) + ((chunk ^ (row & 7)) << 4));
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
template <int D>
__device__ __forceinline__ static uint32_t fa_addr_a(uint32_t base, int row0, int chunk0,
                                                     int lane) {
    return base + fa_sw<D>(row0 + (lane & 7) + ((lane >> 3) & 1) * 8, chunk0 + (lane >> 4));
}

template <int D>
__device__ __forceinline__ static uint32_t fa_addr_b(uint32_t base, int row0, int chunk0,
                                                     int lane) {
    return base + fa_sw<D>(row0 + (lane & 7) + (lane >> 4) * 8, chunk0 + ((lane >> 3) & 1));
}

// Rows [row0, row0 + ROWS) of one head (src points at its row 0, rows stride elements apart)
// into a swizzled (ROWS, D) shared tile at dst. Rows at or past T, and chunks at or past hc (the
// head's real chunks), are zero-filled, so padded queries and keys give finite scores that the
// masks then drop, and padded columns add nothing. Thread i copies chunk i % (D / 8) of rows
// i / (D / 8) + j * (NT / (D / 8)).
template <int D, int ROWS>
__device__ __forceinline__ static void fa_load_tile(uint32_t dst, const fa_bf16 *src,
                                                    size_t stride, int row0, int T, int hc) {
    constexpr int CH = D / 8, RP = FA_NT / CH; // chunks per row, rows per pass
    static_assert(FA_NT % CH == 0 && ROWS % RP == 0, "tile rows must divide evenly");
    int r = (int)threadIdx.x / CH, c = (int)threadIdx.x % CH;
    bool cok = c < hc;
    const fa_bf16 *p = src + (size_t)(row0 + r) * stride + c * 8;
    size_t step = (size_t)RP * stride;
#pragma unroll
    for (int j = 0; j < ROWS / RP; j++) {
        bool ok = cok && row0 + r + j * RP < T;
        fa_cp16(dst + fa_sw<D>(r + j * RP, c), ok ? p + j * step : src, ok);
    }
}

// 64 floats [row0, row0 + 64) of a (T) row into shared dst; zero past T.
__device__ __forceinline__ static void fa_load_vec(uint32_t dst, const float *src, int row0, int T) {
    for (int i = (int)threadIdx.x; i < FA_TILE; i += FA_NT) {
        bool ok = row0 + i < T;
        fa_cp4(dst + 4u * (uint32_t)i, ok ? src + row0 + i : src, ok);
    }
}

// A warp's 16 x NO fp32 accumulators acc (NO / 8 n-tiles, head columns from chunk c0), times mul,
// as bf16 to rows [row0, row0+16) of dst (row stride stride); rows at or past T and chunks at or
// past hc skipped. Staged through the warp's own 16 rows of a swizzled (., D) shared tile
// (stage_row0 there) so the global stores are whole 16-byte chunks.
template <int D, int NO>
__device__ __forceinline__ static void fa_store_rows(fa_bf16 *dst, size_t stride,
                                                     const float (&acc)[NO / 8][4], float mul,
                                                     unsigned char *stage, int stage_row0,
                                                     int row0, int T, int c0, int hc, int lane) {
    int g = lane >> 2, tq = lane & 3;
#pragma unroll
    for (int j = 0; j < NO / 8; j++) {
        int ra = stage_row0 + g, rb = ra + 8;
        *reinterpret_cast<uint32_t *>(stage + fa_sw<D>(ra, c0 + j) + 4 * tq) =
            fa_pack(acc[j][0] * mul, acc[j][1] * mul);
        *reinterpret_cast<uint32_t *>(stage + fa_sw<D>(rb, c0 + j) + 4 * tq) =
            fa_pack(acc[j][2] * mul, acc[j][3] * mul);
    }
    __syncwarp();
    constexpr int CO = NO / 8; // chunks per row
#pragma unroll
    for (int it = 0; it < 16 * CO / 32; it++) {
        int c = lane + 32 * it, r = c / CO, ch = c0 + c % CO;
        if (row0 + r < T && ch < hc)
            *reinterpret_cast<uint4 *>(dst + (size_t)(row0 + r) * stride + ch * 8) =
                *reinterpret_cast<const uint4 *>(stage + fa_sw<D>(stage_row0 + r, ch));
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

template <int N> __device__ __forceinline__ static void fa_zero(float (&x)[N][4]) {
#pragma unroll
    for (int j = 0; j < N; j++) x[j][0] = x[j][1] = x[j][2] = x[j][3] = 0.0f;
}

// ---- per-tile bodies
//
// Each handles one warp's 16 rows against one 64-row tile. The DIAG / EDGE instances serve the
// few tiles that cross the diagonal (or T): they skip 16-wide chunks with nothing visible and
// mask. The plain instances have no branches beyond the padding checks (uniform across the warp),
// and their products run the k-step loop outside the chunk loop, so consecutive mma instructions
// feed different accumulators and overlap. A warp's own row fragments (Q; Q and dO; K and V) are
// re-read from shared memory one 16-column step at a time rather than held, which keeps the
// register count flat in D. hc: chunks of 8 columns that hold real head data (HS / 8).

// acc (16 x NO, head columns from chunk c0) += a (the warp's 16 rows x 64 tile rows, as four
// 16-wide A fragments) . the tile's rows (64 x D, read transposed by ldmatrix), columns c0...;
// with DIAG only the first nkc 16-row chunks.
template <bool DIAG, int D, int NO>
__device__ __forceinline__ static void fa_mma_tile(float (&acc)[NO / 8][4],
                                                   const uint32_t (&a)[4][4], uint32_t tile,
                                                   int nkc, int c0, int hc, int lane) {
#pragma unroll
    for (int kc = 0; kc < 4; kc++) {
        if (DIAG && kc >= nkc) continue;
#pragma unroll
        for (int nd = 0; nd < NO / 16; nd++) {
            if (c0 + 2 * nd >= hc) continue;
            uint32_t b[4];
            fa_ldsm_t(b, fa_addr_a<D>(tile, 16 * kc, c0 + 2 * nd, lane));
            fa_mma(acc[2 * nd], a[kc], b[0], b[1]);
            fa_mma(acc[2 * nd + 1], a[kc], b[2], b[3]);
        }
    }
}

// s (16 x 64) = rows (the warp's 16 rows at xrow0 of tile xb) . the 64 rows of tile yb, over all
// head columns; with a second pair (xb2, yb2) also s2 = rows of xb2 . rows of yb2 (the dP
// product beside the scores). With SKIP, 16-row chunks of yb below c_lo or at or past c_hi are
// not computed.
template <bool SKIP, bool TWO, int D>
__device__ __forceinline__ static void fa_scores(float (&s)[8][4], float (&s2)[8][4], uint32_t xb,
                                                 uint32_t xb2, int xrow0, uint32_t yb,
                                                 uint32_t yb2, int c_lo, int c_hi, int hc,
                                                 int lane) {
    fa_zero(s);
    if (TWO) fa_zero(s2);
#pragma unroll
    for (int kd = 0; kd < D / 16; kd++) {
        if (2 * kd >= hc) continue;
        uint32_t xf[4], xf2[4];
        fa_ldsm(xf, fa_addr_a<D>(xb, xrow0, 2 * kd, lane));
        if (TWO) fa_ldsm(xf2, fa_addr_a<D>(xb2, xrow0, 2 * kd, lane));
#pragma unroll
        for (int kc = 0; kc < 4; kc++) {
            if (SKIP && (kc < c_lo || kc >= c_hi)) continue;
            uint32_t by[4];
            fa_ldsm(by, fa_addr_b<D>(yb, 16 * kc, 2 * kd, lane));
            fa_mma(s[2 * kc], xf, by[0], by[1]);
            fa_mma(s[2 * kc + 1], xf, by[2], by[3]);
            if (TWO) {
                uint32_t by2[4];
                fa_ldsm(by2, fa_addr_b<D>(yb2, 16 * kc, 2 * kd, lane));
                fa_mma(s2[2 * kc], xf2, by2[0], by2[1]);
                fa_mma(s2[2 * kc + 1], xf2, by2[2], by2[3]);
            }
        }
    }
}

// Forward: S = Q K^T, online softmax, O += P V. qb: the Q tile (the warp's rows at wrow0); kb, vb:
// the K and V tiles; k0 the tile's first key, r0 the warp's first query; nkc: 16-key chunks
// holding a key <= the warp's last query.
template <bool DIAG, int D>
__device__ __forceinline__ static void fa_fwd_tile(float (&o)[D / 8][4], float (&m)[2],
                                                   float (&l)[2], uint32_t qb, int wrow0,
                                                   uint32_t kb, uint32_t vb, int k0, int r0,
                                                   int nkc, int hc, int lane, float scale_log2) {
    int g = lane >> 2, tq = lane & 3;
    float s[8][4];
    fa_scores<DIAG, false, D>(s, s, qb, qb, wrow0, kb, kb, 0, nkc, hc, lane);
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
        }
#pragma unroll
        for (int j = 0; j < D / 8; j++) {
            o[j][2 * hr] *= alpha;
            o[j][2 * hr + 1] *= alpha;
        }
        l[hr] = l[hr] * alpha + sum; // this lane's part; the quad's parts are summed at the end
    }
    uint32_t pf[4][4];
    fa_to_afrag(pf, s);
    fa_mma_tile<DIAG, D, D>(o, pf, vb, nkc, 0, hc, lane);
}

// dq kernel: S = Q K^T, dP = dO V^T, dS = P (dP - D), dQ[:, c0...] += dS K[:, c0...]. lrow,
// drow: lse (log2 units) and D of rows g and g + 8.
template <bool DIAG, int D, int NO>
__device__ __forceinline__ static void fa_dq_tile(float (&acc)[NO / 8][4], uint32_t qb,
                                                  uint32_t dob, int wrow0, uint32_t kb,
                                                  uint32_t vb, int k0, int r0, int nkc,
                                                  const float (&lrow)[2], const float (&drow)[2],
                                                  int c0, int hc, int lane, float scale_log2) {
    int g = lane >> 2, tq = lane & 3;
    float s[8][4], dp[8][4];
    fa_scores<DIAG, true, D>(s, dp, qb, dob, wrow0, kb, vb, 0, nkc, hc, lane);
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
    fa_mma_tile<DIAG, D, NO>(acc, sf, kb, nkc, c0, hc, lane);
}

// dk/dv kernel, transposed (rows = the warp's 16 keys from k0, columns = the tile's 64 queries
// from q0): S^T = K Q^T, dP^T = V dO^T, P^T, dS^T = P^T (dP^T - D), dV += P^T dO, dK += dS^T Q
// (output columns from chunk c0). Lt, Dt: the tile's lse (natural log) and D in shared memory.
// EDGE: the tile crosses the diagonal or T; chunks before qc0 hold only queries that precede
// every key of the warp.
template <bool EDGE, int D, int NO>
__device__ __forceinline__ static void fa_dkdv_tile(float (&dka)[NO / 8][4], float (&dva)[NO / 8][4],
                                                    uint32_t kb, uint32_t vb, int wrow0,
                                                    uint32_t qb, uint32_t db, const float *Lt,
                                                    const float *Dt, int q0, int k0, int qc0,
                                                    int T, int c0, int hc, int lane,
                                                    float scale_log2) {
    int g = lane >> 2, tq = lane & 3;
    float s[8][4], dp[8][4];
    fa_scores<EDGE, true, D>(s, dp, kb, vb, wrow0, qb, db, qc0, 4, hc, lane);
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
        for (int nd = 0; nd < NO / 16; nd++) {
            if (c0 + 2 * nd >= hc) continue;
            uint32_t bd[4], bq[4];
            fa_ldsm_t(bd, fa_addr_a<D>(db, 16 * qc, c0 + 2 * nd, lane));
            fa_ldsm_t(bq, fa_addr_a<D>(qb, 16 * qc, c0 + 2 * nd, lane));
            fa_mma(dva[2 * nd], pf[qc], bd[0], bd[1]);
            fa_mma(dva[2 * nd + 1], pf[qc], bd[2], bd[3]);
            fa_mma(dka[2 * nd], sf[qc], bq[0], bq[1]);
            fa_mma(dka[2 * nd + 1], sf[qc], bq[2], bq[3]);
        }
    }
}

// ---- kernels
//
// Blocks of FA_WARPS warps own FA_BM rows. Shared tiles have D columns (2 * D bytes a row). PAD:
// the head size is below D, so loads, products and stores check the real columns; without it
// those checks fold away at compile time.

// Forward. grid (B*NH, ceil(T/FA_BM)). Query tiles are taken heaviest (last) first so the long
// blocks start early and the short ones fill the tail.
template <int D, bool PAD>
static __global__ void __launch_bounds__(FA_NT, fa_cfg<D>::fwd_minb)
fa_fwd_kernel(fa_bf16 *out, float *lse, const fa_bf16 *q, const fa_bf16 *k, const fa_bf16 *v,
              int T, int NH, int HS, size_t qkv_stride, size_t out_stride, float scale_log2) {
    // out (B, T, NH, HS) row stride out_stride; lse (B, NH, T); q, k, v (B, T, NH, HS) row
    // stride qkv_stride
    constexpr int ST = fa_cfg<D>::fwd_st, ROWB = 2 * D, TILEB = FA_TILE * ROWB;
    extern __shared__ __align__(128) unsigned char fa_smem[];
    unsigned char *q_s = fa_smem;             // (FA_BM, D) swizzled; later the output staging
    const uint32_t sQ = fa_smem_u32(q_s);
    const uint32_t sK = sQ + FA_BM * ROWB;    // ST x (64, D) swizzled
    const uint32_t sV = sK + ST * TILEB;      // ST x (64, D) swizzled

    int qt = (int)gridDim.y - 1 - (int)blockIdx.y;
    int bh = (int)blockIdx.x, b = bh / NH, h = bh % NH;
    int warp = (int)threadIdx.x >> 5, lane = (int)threadIdx.x & 31;
    int g = lane >> 2, tq = lane & 3; // fragment row (and row + 8) and column pair of this lane
    const int hc = PAD ? HS / 8 : D / 8; // a constant unless padded: no padding checks
    size_t head_off = (size_t)b * T * qkv_stride + (size_t)h * HS;
    const fa_bf16 *kh = k + head_off, *vh = v + head_off;
    int q0 = qt * FA_BM;
    int nkt = (min(q0 + FA_BM, T) - 1) / FA_TILE + 1; // key tiles holding a key <= a valid query

    // Q lands with key tile 0; one commit group per tile, empty ones included, so that the
    // wait in the loop always leaves exactly ST - 2 groups in flight.
    fa_load_tile<D, FA_BM>(sQ, q + head_off, qkv_stride, q0, T, hc);
#pragma unroll
    for (int st = 0; st < ST - 1; st++) {
        if (st < nkt) {
            fa_load_tile<D, FA_TILE>(sK + st * TILEB, kh, qkv_stride, st * FA_TILE, T, hc);
            fa_load_tile<D, FA_TILE>(sV + st * TILEB, vh, qkv_stride, st * FA_TILE, T, hc);
        }
        fa_cp_commit();
    }

    int r0 = q0 + warp * 16; // this warp's first query
    float o[D / 8][4];       // unnormalised output, 16 x D
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f}; // running max (raw), partial sum
    fa_zero(o);

    for (int kt = 0; kt < nkt; kt++) {
        fa_cp_wait<ST - 2>();
        __syncthreads(); // tile kt has landed; every warp is done with tile kt - 1's buffer
        if (kt + ST - 1 < nkt) {
            uint32_t nb = (uint32_t)((kt + ST - 1) % ST) * TILEB;
            fa_load_tile<D, FA_TILE>(sK + nb, kh, qkv_stride, (kt + ST - 1) * FA_TILE, T, hc);
            fa_load_tile<D, FA_TILE>(sV + nb, vh, qkv_stride, (kt + ST - 1) * FA_TILE, T, hc);
        }
        fa_cp_commit();
        int k0 = kt * FA_TILE;
        if (r0 >= T || k0 > r0) continue; // no valid query, or every key is in the future
        uint32_t cb = (uint32_t)(kt % ST) * TILEB;
        if (k0 + FA_TILE - 1 > r0)
            fa_fwd_tile<true, D>(o, m, l, sQ, warp * 16, sK + cb, sV + cb, k0, r0,
                                 min(4, (r0 + 15 - k0) / 16 + 1), hc, lane, scale_log2);
        else
            fa_fwd_tile<false, D>(o, m, l, sQ, warp * 16, sK + cb, sV + cb, k0, r0, 4, hc, lane,
                                  scale_log2);
    }

    // normalise, write out (staged through this warp's own rows of the Q tile, which only this
    // warp reads) and the log-sum-exp in natural-log units
    float *lse_h = lse + (size_t)bh * T;
    size_t out_off = (size_t)b * T * out_stride + (size_t)h * HS;
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
    for (int j = 0; j < D / 8; j++) {
        o[j][0] *= inv[0];
        o[j][1] *= inv[0];
        o[j][2] *= inv[1];
        o[j][3] *= inv[1];
    }
    __syncwarp(); // the warp's last ldmatrix of its Q rows precedes the staging stores
    fa_store_rows<D, D>(out + out_off, out_stride, o, 1.0f, q_s, warp * 16, r0, T, 0, hc, lane);
}

// dq for one query tile (output columns split over gridDim.z blocks), and D = rowsum(dout * out)
// for its rows (written by split 0): grid (B*NH, ceil(T/FA_BM), NS); each warp owns 16 queries
// and walks the key tiles up to the diagonal.
template <int D, bool PAD>
static __global__ void __launch_bounds__(FA_NT, fa_cfg<D>::dq_minb)
fa_bwd_dq_kernel(fa_bf16 *dq, float *Dv, const fa_bf16 *dout, const fa_bf16 *out,
                 const fa_bf16 *q, const fa_bf16 *k, const fa_bf16 *v, const float *lse, int T,
                 int NH, int HS, size_t qkv_stride, size_t out_stride, float scale,
                 float scale_log2) {
    // dq, q, k, v (B, T, NH, HS) row stride qkv_stride; dout, out (B, T, NH, HS) row stride
    // out_stride; lse, Dv (B, NH, T)
    constexpr int ST = fa_cfg<D>::dq_st, NO = D / fa_cfg<D>::dq_ns;
    constexpr int ROWB = 2 * D, TILEB = FA_TILE * ROWB;
    extern __shared__ __align__(128) unsigned char fa_smem[];
    unsigned char *q_s = fa_smem; // (FA_BM, D); later the dq staging
    const uint32_t sQ = fa_smem_u32(q_s);
    const uint32_t sdO = sQ + FA_BM * ROWB; // (FA_BM, D)
    const uint32_t sK = sdO + FA_BM * ROWB; // ST x (64, D)
    const uint32_t sV = sK + ST * TILEB;    // ST x (64, D)

    int qt = (int)gridDim.y - 1 - (int)blockIdx.y;
    int bh = (int)blockIdx.x, b = bh / NH, h = bh % NH;
    int c0 = (int)blockIdx.z * (NO / 8); // first output chunk of this block
    int warp = (int)threadIdx.x >> 5, lane = (int)threadIdx.x & 31;
    const int hc = PAD ? HS / 8 : D / 8; // a constant unless padded: no padding checks
    size_t head_off = (size_t)b * T * qkv_stride + (size_t)h * HS;
    size_t dout_off = (size_t)b * T * out_stride + (size_t)h * HS;
    const fa_bf16 *kh = k + head_off, *vh = v + head_off;
    int q0 = qt * FA_BM;
    int nkt = (min(q0 + FA_BM, T) - 1) / FA_TILE + 1;

    fa_load_tile<D, FA_BM>(sQ, q + head_off, qkv_stride, q0, T, hc);
    fa_load_tile<D, FA_BM>(sdO, dout + dout_off, out_stride, q0, T, hc);
#pragma unroll
    for (int st = 0; st < ST - 1; st++) { // as in the forward: one group per tile
        if (st < nkt) {
            fa_load_tile<D, FA_TILE>(sK + st * TILEB, kh, qkv_stride, st * FA_TILE, T, hc);
            fa_load_tile<D, FA_TILE>(sV + st * TILEB, vh, qkv_stride, st * FA_TILE, T, hc);
        }
        fa_cp_commit();
    }

    // D for this warp's 16 rows while the tiles land
    int r0 = q0 + warp * 16;
    float drow[2], lrow[2]; // D and lse (log2 units) of rows g and g + 8 (split 0 stores D)
    fa_row_stats(dout, out, dout_off, out_stride, lse, Dv, blockIdx.z == 0, bh, T, r0, hc, lane, FA_LOG2E,
                 drow, lrow);

    float acc[NO / 8][4]; // dq (unscaled), 16 x NO
    fa_zero(acc);

    for (int kt = 0; kt < nkt; kt++) {
        fa_cp_wait<ST - 2>();
        __syncthreads();
        if (kt + ST - 1 < nkt) {
            uint32_t nb = (uint32_t)((kt + ST - 1) % ST) * TILEB;
            fa_load_tile<D, FA_TILE>(sK + nb, kh, qkv_stride, (kt + ST - 1) * FA_TILE, T, hc);
            fa_load_tile<D, FA_TILE>(sV + nb, vh, qkv_stride, (kt + ST - 1) * FA_TILE, T, hc);
        }
        fa_cp_commit();
        int k0 = kt * FA_TILE;
        if (r0 >= T || k0 > r0) continue; // no valid query, or every key is in the future
        uint32_t cb = (uint32_t)(kt % ST) * TILEB;
        if (k0 + FA_TILE - 1 > r0)
            fa_dq_tile<true, D, NO>(acc, sQ, sdO, warp * 16, sK + cb, sV + cb, k0, r0,
                                    min(4, (r0 + 15 - k0) / 16 + 1), lrow, drow, c0, hc, lane,
                                    scale_log2);
        else
            fa_dq_tile<false, D, NO>(acc, sQ, sdO, warp * 16, sK + cb, sV + cb, k0, r0, 4, lrow,
                                     drow, c0, hc, lane, scale_log2);
    }

    __syncwarp(); // the warp's own Q rows (only it reads them) become its staging rows
    fa_store_rows<D, NO>(dq + head_off, qkv_stride, acc, scale, q_s, warp * 16, r0, T, c0, hc,
                         lane);
}

// dk, dv for one key tile (output columns split over gridDim.z blocks): grid (B*NH,
// ceil(T/FA_BM), NS); each warp owns 16 keys and walks the 64-query tiles from the diagonal to
// the end. Block y = 0 is the key tile that sees the most queries, so the heaviest blocks start
// first.
template <int D, bool PAD>
static __global__ void __launch_bounds__(FA_NT, fa_cfg<D>::dkv_minb)
fa_bwd_dkdv_kernel(fa_bf16 *dk, fa_bf16 *dv, const fa_bf16 *dout, const fa_bf16 *q,
                   const fa_bf16 *k, const fa_bf16 *v, const float *lse, const float *Dv, int T,
                   int NH, int HS, size_t qkv_stride, size_t out_stride, float scale,
                   float scale_log2) {
    // dk, dv, q, k, v (B, T, NH, HS) row stride qkv_stride; dout (B, T, NH, HS) row stride
    // out_stride; lse, Dv (B, NH, T)
    constexpr int ST = fa_cfg<D>::dkv_st, NO = D / fa_cfg<D>::dkv_ns;
    constexpr int ROWB = 2 * D, TILEB = FA_TILE * ROWB;
    extern __shared__ __align__(128) unsigned char fa_smem[];
    unsigned char *k_s = fa_smem, *v_s = fa_smem + FA_BM * ROWB; // (FA_BM, D) each; later staging
    const uint32_t sK = fa_smem_u32(k_s);
    const uint32_t sV = sK + FA_BM * ROWB;
    const uint32_t sQ = sV + FA_BM * ROWB;     // ST x (64, D)
    const uint32_t sdO = sQ + ST * TILEB;      // ST x (64, D)
    const uint32_t sL = sdO + ST * TILEB;      // ST x (64) lse of the query tile
    const uint32_t sD = sL + ST * FA_TILE * 4; // ST x (64) D of the query tile
    const float *Lf = reinterpret_cast<const float *>(fa_smem + (sL - sK));
    const float *Df = reinterpret_cast<const float *>(fa_smem + (sD - sK));

    int kt = (int)blockIdx.y;
    int bh = (int)blockIdx.x, b = bh / NH, h = bh % NH;
    int c0 = (int)blockIdx.z * (NO / 8);
    int warp = (int)threadIdx.x >> 5, lane = (int)threadIdx.x & 31;
    const int hc = PAD ? HS / 8 : D / 8; // a constant unless padded: no padding checks
    size_t head_off = (size_t)b * T * qkv_stride + (size_t)h * HS;
    size_t dout_off = (size_t)b * T * out_stride + (size_t)h * HS;
    const fa_bf16 *qh = q + head_off, *doh = dout + dout_off;
    const float *lse_h = lse + (size_t)bh * T, *D_h = Dv + (size_t)bh * T;
    int k0 = kt * FA_BM;
    int qt0 = k0 / FA_TILE, nqt = (T + FA_TILE - 1) / FA_TILE;

    fa_load_tile<D, FA_BM>(sK, k + head_off, qkv_stride, k0, T, hc);
    fa_load_tile<D, FA_BM>(sV, v + head_off, qkv_stride, k0, T, hc);
#pragma unroll
    for (int st = 0; st < ST - 1; st++) { // as in the forward: one group per tile
        if (qt0 + st < nqt) {
            int row0 = (qt0 + st) * FA_TILE;
            fa_load_tile<D, FA_TILE>(sQ + st * TILEB, qh, qkv_stride, row0, T, hc);
            fa_load_tile<D, FA_TILE>(sdO + st * TILEB, doh, out_stride, row0, T, hc);
            fa_load_vec(sL + st * FA_TILE * 4, lse_h, row0, T);
            fa_load_vec(sD + st * FA_TILE * 4, D_h, row0, T);
        }
        fa_cp_commit();
    }

    int wk0 = k0 + warp * 16; // this warp's first key
    float dka[NO / 8][4], dva[NO / 8][4]; // dk (unscaled), dv: 16 keys x NO
    fa_zero(dka);
    fa_zero(dva);

    for (int qt = qt0; qt < nqt; qt++) {
        int it = qt - qt0;
        fa_cp_wait<ST - 2>();
        __syncthreads();
        if (qt + ST - 1 < nqt) {
            uint32_t nb = (uint32_t)((it + ST - 1) % ST);
            int row0 = (qt + ST - 1) * FA_TILE;
            fa_load_tile<D, FA_TILE>(sQ + nb * TILEB, qh, qkv_stride, row0, T, hc);
            fa_load_tile<D, FA_TILE>(sdO + nb * TILEB, doh, out_stride, row0, T, hc);
            fa_load_vec(sL + nb * FA_TILE * 4, lse_h, row0, T);
            fa_load_vec(sD + nb * FA_TILE * 4, D_h, row0, T);
        }
        fa_cp_commit();
        int q0 = qt * FA_TILE;
        if (wk0 >= T || q0 + FA_TILE - 1 < wk0) continue; // every query precedes every key
        uint32_t buf = (uint32_t)(it % ST);
        uint32_t qb = sQ + buf * TILEB, db = sdO + buf * TILEB;
        const float *Lt = Lf + buf * FA_TILE, *Dt = Df + buf * FA_TILE;
        if (q0 < wk0 + 15 || q0 + FA_TILE > T) // 16-query chunks before qc0 precede every key
            fa_dkdv_tile<true, D, NO>(dka, dva, sK, sV, warp * 16, qb, db, Lt, Dt, q0, wk0,
                                      max(0, (wk0 - q0) / 16), T, c0, hc, lane, scale_log2);
        else
            fa_dkdv_tile<false, D, NO>(dka, dva, sK, sV, warp * 16, qb, db, Lt, Dt, q0, wk0, 0,
                                       T, c0, hc, lane, scale_log2);
    }

    // the warp's own rows of the K and V tiles (only it reads them) become its staging rows
    __syncwarp();
    fa_store_rows<D, NO>(dv + head_off, qkv_stride, dva, 1.0f, v_s, warp * 16, wk0, T, c0, hc,
                         lane);
    fa_store_rows<D, NO>(dk + head_off, qkv_stride, dka, scale, k_s, warp * 16, wk0, T, c0, hc,
                         lane);
}

// ---- launchers

// The padded head size a head size runs in (0: unsupported).
static int fa_padded(int HS) {
    if (HS < 8 || HS % 8 != 0) return 0;
    return HS <= 64 ? 64 : HS <= 128 ? 128 : HS <= 256 ? 256 : 0;
}

// Shapes, strides and alignment the kernels rely on: 16-byte row chunks need 16-byte aligned
// pointers and strides that are multiples of 8 bf16.
static bool fa_args_ok(int B, int T, int NH, int HS, int qkv_stride, int out_stride) {
    if (fa_padded(HS) == 0 || B < 1 || T < 1 || NH < 1) return false;
    if ((long long)qkv_stride < (long long)NH * HS || (long long)out_stride < (long long)NH * HS)
        return false;
    if (qkv_stride % 8 != 0 || out_stride % 8 != 0) return false;
    if ((long long)B * NH > (long long)INT_MAX) return false; // gridDim.x
    if ((T + FA_BM - 1) / FA_BM > 65535) return false;        // gridDim.y
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

template <int D, bool PAD>
static int fa_fwd_launch(cudaStream_t st, fa_bf16 *out, float *lse, const fa_bf16 *q,
                         const fa_bf16 *k, const fa_bf16 *v, int B, int T, int NH, int HS,
                         int qkv_stride, int out_stride) {
    constexpr int ROWB = 2 * D;
    size_t smem = (size_t)FA_BM * ROWB + 2 * (size_t)fa_cfg<D>::fwd_st * FA_TILE * ROWB;
    if (!fa_smem_attr((const void *)fa_fwd_kernel<D, PAD>, smem)) return FLASH_ECUDA;
    float scale_log2 = FA_LOG2E / sqrtf((float)HS);
    dim3 grid((unsigned)(B * NH), (unsigned)((T + FA_BM - 1) / FA_BM));
    fa_fwd_kernel<D, PAD><<<grid, FA_NT, smem, st>>>(out, lse, q, k, v, T, NH, HS, (size_t)qkv_stride,
                                                (size_t)out_stride, scale_log2);
    return fa_launch_status();
}

template <int D, bool PAD>
static int fa_bwd_launch(cudaStream_t st, fa_bf16 *dq, fa_bf16 *dk, fa_bf16 *dv,
                         const fa_bf16 *dout, const fa_bf16 *q, const fa_bf16 *k,
                         const fa_bf16 *v, const fa_bf16 *out, const float *lse, float *Dv, int B,
                         int T, int NH, int HS, int qkv_stride, int out_stride) {
    constexpr int ROWB = 2 * D;
    typedef fa_cfg<D> cfg;
    float scale = 1.0f / sqrtf((float)HS), scale_log2 = scale * FA_LOG2E;
    unsigned tiles = (unsigned)((T + FA_BM - 1) / FA_BM);

    size_t smem = 2 * (size_t)FA_BM * ROWB + 2 * (size_t)cfg::dq_st * FA_TILE * ROWB;
    if (!fa_smem_attr((const void *)fa_bwd_dq_kernel<D, PAD>, smem)) return FLASH_ECUDA;
    fa_bwd_dq_kernel<D, PAD><<<dim3((unsigned)(B * NH), tiles, cfg::dq_ns), FA_NT, smem, st>>>(
        dq, Dv, dout, out, q, k, v, lse, T, NH, HS, (size_t)qkv_stride, (size_t)out_stride, scale,
        scale_log2);
    if (fa_launch_status() != FLASH_OK) return FLASH_ECUDA;

    smem = 2 * (size_t)FA_BM * ROWB +
           (size_t)cfg::dkv_st * (2 * FA_TILE * ROWB + 2 * FA_TILE * sizeof(float));
    if (!fa_smem_attr((const void *)fa_bwd_dkdv_kernel<D, PAD>, smem)) return FLASH_ECUDA;
    fa_bwd_dkdv_kernel<D, PAD><<<dim3((unsigned)(B * NH), tiles, cfg::dkv_ns), FA_NT, smem, st>>>(
        dk, dv, dout, q, k, v, lse, Dv, T, NH, HS, (size_t)qkv_stride, (size_t)out_stride, scale,
        scale_log2);
    return fa_launch_status();
}

extern "C" int flash_attention_supported(int HS) { return fa_padded(HS) != 0; }

// ---- the Hopper path
//
// The sm_90a kernels (flash_attention_sm90.cu) run where the build carries them (FA_HAVE_SM90, set by
// meson when it compiles that file for sm_90a), the current device has compute capability 9.0 and
// HS <= 128; flash_attention_force_portable(1) turns it off (tests compare the two paths).

static int fa_portable_forced;
static int fa_hopper_ws = -1;        // -1: not decided yet (TPTRAIN_ATTN_WS=0 in the environment: off)
static int fa_hopper_bwd_fused = -1; // -1: not decided yet (TPTRAIN_ATTN_BWD=split: off)
static int fa_hopper_pingpong = -1;  // -1: not decided yet (TPTRAIN_ATTN_PINGPONG=0: off)

extern "C" void flash_attention_force_portable(int on) { fa_portable_forced = on != 0; }

extern "C" void flash_attention_set_hopper_ws(int on) { fa_hopper_ws = on != 0; }

extern "C" void flash_attention_set_hopper_bwd_fused(int on) { fa_hopper_bwd_fused = on != 0; }

static int fa_ws_allowed(void) {
    if (fa_hopper_ws < 0) {
        const char *e = getenv("TPTRAIN_ATTN_WS");
        fa_hopper_ws = !(e && strcmp(e, "0") == 0);
    }
    return fa_hopper_ws;
}

extern "C" void flash_attention_set_hopper_pingpong(int on) { fa_hopper_pingpong = on != 0; }

// The walks over the work of the persistent Hopper kernels: -2 not read from the environment yet,
// -1 as measured best for the shape (the default), 0 or 1 one way at every shape.
static int fa_hopper_order = -2;     // TPTRAIN_ATTN_ORDER=pairs (1) or longest (0)
static int fa_hopper_bwd_order = -2; // TPTRAIN_ATTN_BWD_ORDER=heads (1) or longest (0)

extern "C" void flash_attention_set_hopper_order(int pairs) { fa_hopper_order = pairs < 0 ? -1 : pairs != 0; }

extern "C" void flash_attention_set_hopper_bwd_order(int heads) {
    fa_hopper_bwd_order = heads < 0 ? -1 : heads != 0;
}

// An order knob's setting from the environment: 1 for the value `on`, 0 for "longest", -1 unset.
static int fa_order_env(const char *name, const char *on) {
    const char *e = getenv(name);
    if (!e || !*e) return -1;
    if (strcmp(e, on) == 0) return 1;
    return strcmp(e, "longest") == 0 ? 0 : -1;
}

// The one-kernel Hopper backward's walk over the items, as flash_attention_sm90_bwd takes it.
// Measured on the H200 (PERF_NOTES, 2026-12-04): whole heads at once are 2-27% faster at head sizes
// 64 and 128 up to T 4096; beyond, 2-11% faster at head size 128 (T 8192 and 16384) and within 1%
// either way at 64, which keeps longest first there.
static int fa_bwd_order(int T, int HS) {
    if (fa_hopper_bwd_order == -2) fa_hopper_bwd_order = fa_order_env("TPTRAIN_ATTN_BWD_ORDER", "heads");
    return fa_hopper_bwd_order >= 0 ? fa_hopper_bwd_order : T <= 4096 || HS == 128;
}

// The persistent Hopper forward's walk over the items, as flash_attention_sm90_fwd takes it.
// Measured on the H200: pairs of one head are 2-21% faster at head size 128 (T 1024 to 8192) and
// 5-11% slower at head size 64, where K and V tiles are half the bytes.
static int fa_fwd_order(int HS) {
    if (fa_hopper_order == -2) fa_hopper_order = fa_order_env("TPTRAIN_ATTN_ORDER", "pairs");
    return fa_hopper_order >= 0 ? fa_hopper_order : HS == 128;
}

// The stages of the operand a persistent Hopper block loads once per item: the forward's Q tile
// (TPTRAIN_ATTN_Q_STAGES, flash_attention_set_hopper_q_stages) and the one-kernel backward's K and
// V tiles (TPTRAIN_ATTN_KV_STAGES, flash_attention_set_hopper_kv_stages): 1 or 2; -2 not read from
// the environment yet. One until measured on the GPU (docs/attention.md): the second stages are
// built and compiled, not yet run.
static int fa_hopper_q_stages = -2, fa_hopper_kv_stages = -2;

extern "C" void flash_attention_set_hopper_q_stages(int n) { fa_hopper_q_stages = n == 2 ? 2 : 1; }

extern "C" void flash_attention_set_hopper_kv_stages(int n) { fa_hopper_kv_stages = n == 2 ? 2 : 1; }

// The forward's exponentials at head size 64 (TPTRAIN_ATTN_EXP2, flash_attention_set_hopper_exp2):
// 1 mixed, 0 all by the multi-function unit, -2 not read from the environment yet. All by the
// multi-function unit until measured on the GPU (built and compiled, not yet run).
static int fa_hopper_exp2 = -2;

extern "C" void flash_attention_set_hopper_exp2(int mixed) { fa_hopper_exp2 = mixed != 0; }

static int fa_exp2_mixed(void) {
    if (fa_hopper_exp2 == -2) {
        const char *e = getenv("TPTRAIN_ATTN_EXP2");
        fa_hopper_exp2 = e && strcmp(e, "mixed") == 0;
    }
    return fa_hopper_exp2;
}

static int fa_stages(int *setting, const char *name) {
    if (*setting == -2) {
        const char *e = getenv(name);
        *setting = e && strcmp(e, "2") == 0 ? 2 : 1;
    }
    return *setting;
}

// The Hopper forward's kernel choice as flash_attention_sm90_fwd takes it.
static int fa_fwd_ws_mode(void) {
    if (!fa_ws_allowed()) return 0;
    if (fa_hopper_pingpong < 0) {
        const char *e = getenv("TPTRAIN_ATTN_PINGPONG");
        fa_hopper_pingpong = !(e && strcmp(e, "0") == 0);
    }
    return fa_hopper_pingpong ? 1 : 2;
}

// The Hopper backward's kernel choice as flash_attention_sm90_bwd takes it.
static int fa_bwd_ws_mode(void) {
    if (!fa_ws_allowed()) return 0;
    const char *e = getenv("TPTRAIN_ATTN_BWD");
    if (fa_hopper_bwd_fused < 0) fa_hopper_bwd_fused = !(e && strcmp(e, "split") == 0);
    if (!fa_hopper_bwd_fused) return 2;
    return e && strcmp(e, "unordered") == 0 ? 3 : 1; // unordered: measurements only
}

// Whether the one-kernel Hopper backward runs persistent blocks: -1 as measured best for T (the
// default), TPTRAIN_ATTN_BWD_PERSIST=0 or 1 one way at every T, for measuring.
static int fa_bwd_persist(void) {
    static int mode = -2;
    if (mode == -2) {
        const char *e = getenv("TPTRAIN_ATTN_BWD_PERSIST");
        mode = e && *e ? strcmp(e, "0") != 0 : -1;
    }
    return mode;
}

static bool fa_sm90(int HS) {
#ifdef FA_HAVE_SM90
    if (fa_portable_forced || HS > 128) return false;
    int dev = 0, major = 0, minor = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess) {
        (void)cudaGetLastError();
        return false;
    }
    return major == 9 && minor == 0;
#else
    (void)HS;
    return false;
#endif
}

extern "C" const char *flash_attention_path(int HS) {
    if (fa_sm90(HS)) {
        if (HS != 64 && HS != 128) return "wgmma sm_90a padded";
        if (!fa_ws_allowed()) return "wgmma sm_90a";
        if (HS == 128 && fa_fwd_ws_mode() == 2) return "wgmma sm_90a, TMA + ws, no ping-pong";
        int m = fa_bwd_ws_mode();
        if (HS == 64 && fa_exp2_mixed())
            return m == 1   ? "wgmma sm_90a, TMA + ws, exp2 mixed"
                   : m == 3 ? "wgmma sm_90a, TMA + ws, bwd unordered, exp2 mixed"
                            : "wgmma sm_90a, TMA + ws, bwd split, exp2 mixed";
        return m == 1 ? "wgmma sm_90a, TMA + ws" : m == 3 ? "wgmma sm_90a, TMA + ws, bwd unordered" : "wgmma sm_90a, TMA + ws, bwd split";
    }
    switch (fa_padded(HS)) {
    case 64: return HS == 64 ? "mma.sync D=64" : "mma.sync D=64 padded";
    case 128: return HS == 128 ? "mma.sync D=128" : "mma.sync D=128 padded";
    case 256: return HS == 256 ? "mma.sync D=256" : "mma.sync D=256 padded";
    default: return "unsupported";
    }
}

extern "C" int flash_attention_fwd(void *stream, void *out, float *lse, const void *q,
                                   const void *k, const void *v, int B, int T, int NH, int HS,
                                   int qkv_stride, int out_stride) {
    if (!fa_args_ok(B, T, NH, HS, qkv_stride, out_stride)) return FLASH_EBADARG;
    if (!fa_aligned(out) || !fa_aligned(q) || !fa_aligned(k) || !fa_aligned(v) || !lse)
        return FLASH_EBADARG;
    cudaStream_t st = (cudaStream_t)stream;
    if (fa_sm90(HS))
        return flash_attention_sm90_fwd(stream, out, lse, q, k, v, B, T, NH, HS, qkv_stride,
                                        out_stride, fa_fwd_ws_mode(), fa_fwd_order(HS),
                                        fa_stages(&fa_hopper_q_stages, "TPTRAIN_ATTN_Q_STAGES"),
                                        fa_exp2_mixed()) == 0
                   ? FLASH_OK
                   : FLASH_ECUDA;
    fa_bf16 *o = (fa_bf16 *)out;
    const fa_bf16 *qq = (const fa_bf16 *)q, *kk = (const fa_bf16 *)k, *vv = (const fa_bf16 *)v;
#define FA_FWD(D, PAD) \
    fa_fwd_launch<D, PAD>(st, o, lse, qq, kk, vv, B, T, NH, HS, qkv_stride, out_stride)
    int D = fa_padded(HS);
    bool pad = HS != D;
    if (D == 64) return pad ? FA_FWD(64, true) : FA_FWD(64, false);
    if (D == 128) return pad ? FA_FWD(128, true) : FA_FWD(128, false);
    return pad ? FA_FWD(256, true) : FA_FWD(256, false);
#undef FA_FWD
}


extern "C" size_t flash_attention_bwd_scratch_floats(int B, int T, int NH, int HS) {
    size_t bnt = (size_t)B * NH * T; // D
    if ((HS != 64 && HS != 128) || !fa_sm90(HS) || (fa_bwd_ws_mode() & 1) == 0) return bnt;
    // the Hopper one-kernel backward: D, the fp32 dq accumulator from a 64-float boundary (whole
    // tiles of 64 queries), and a counter per 64 queries of each head
    size_t tiles = (size_t)B * NH * ((T + 63) / 64);
    return (bnt + 63) / 64 * 64 + tiles * 64 * (size_t)HS + tiles;
}

extern "C" size_t flash_attention_bwd_sums_floats(int B, int T, int NH, int HS) {
    size_t C = (size_t)NH * (size_t)HS;
    return (size_t)B * (size_t)((T + 15) / 16) * 2 * C + (size_t)B * (size_t)((T + 63) / 64) * C;
}

extern "C" int flash_attention_bwd(void *stream, void *dq, void *dk, void *dv, const void *dout,
                                   const void *q, const void *k, const void *v, const void *out,
                                   const float *lse, float *scratch, int B, int T, int NH, int HS,
                                   int qkv_stride, int out_stride) {
    return flash_attention_bwd_summing(stream, dq, dk, dv, dout, q, k, v, out, lse, scratch, B, T, NH, HS,
                                       qkv_stride, out_stride, NULL, NULL, NULL);
}

extern "C" int flash_attention_bwd_summing(void *stream, void *dq, void *dk, void *dv, const void *dout,
                                           const void *q, const void *k, const void *v, const void *out,
                                           const float *lse, float *scratch, int B, int T, int NH, int HS,
                                           int qkv_stride, int out_stride, float *dsum, float *sums,
                                           int *summed) {
    if (summed) *summed = 0;
    if (!fa_args_ok(B, T, NH, HS, qkv_stride, out_stride)) return FLASH_EBADARG;
    if (!fa_aligned(dq) || !fa_aligned(dk) || !fa_aligned(dv) || !fa_aligned(dout) ||
        !fa_aligned(q) || !fa_aligned(k) || !fa_aligned(v) || !fa_aligned(out) || !lse || !scratch ||
        (dsum && (!sums || !summed)))
        return FLASH_EBADARG;
    cudaStream_t st = (cudaStream_t)stream;
    if (fa_sm90(HS)) {
        int rc = flash_attention_sm90_bwd(stream, dq, dk, dv, dout, q, k, v, out, lse, scratch, B, T, NH, HS,
                                          qkv_stride, out_stride, fa_bwd_ws_mode(), fa_bwd_persist(),
                                          fa_bwd_order(T, HS),
                                          fa_stages(&fa_hopper_kv_stages, "TPTRAIN_ATTN_KV_STAGES"), dsum, sums);
        if (rc == 3) *summed = 1;
        return rc == 0 || rc == 3 ? FLASH_OK : FLASH_ECUDA;
    }
    // D (B, NH, T), written by the dq kernel, read by the dk/dv kernel
    fa_bf16 *a = (fa_bf16 *)dq, *b = (fa_bf16 *)dk, *c = (fa_bf16 *)dv;
    const fa_bf16 *g = (const fa_bf16 *)dout, *qq = (const fa_bf16 *)q, *kk = (const fa_bf16 *)k,
                  *vv = (const fa_bf16 *)v, *o = (const fa_bf16 *)out;
#define FA_BWD(D, PAD) \
    fa_bwd_launch<D, PAD>(st, a, b, c, g, qq, kk, vv, o, lse, scratch, B, T, NH, HS, qkv_stride, \
                          out_stride)
    int D = fa_padded(HS);
    bool pad = HS != D;
    if (D == 64) return pad ? FA_BWD(64, true) : FA_BWD(64, false);
    if (D == 128) return pad ? FA_BWD(128, true) : FA_BWD(128, false);
    return pad ? FA_BWD(256, true) : FA_BWD(256, false);
#undef FA_BWD
}
