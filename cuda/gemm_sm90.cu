// gemm_sm90.cu: a Hopper (sm_90a) matrix product for a linear layer's forward with the bias + GELU
// epilogue: out (N, OC) = gelu(pre), pre (N, OC) = inp (N, IC) @ w (OC, IC)^T + bias (OC), and in a
// second mode the input gradient with GELU's derivative. gemm.cu runs them in place of cuBLASLt's
// GELU_AUX_BIAS and DGELU epilogues where TPTRAIN_GEMM_SM90=1 (or =auto, where timed faster). Off
// by default: on one H200, with the staged epilogue, the forward is 2-7% faster than cuBLASLt at
// GPT-2 124M's fc shape, the input gradient 2-7% slower, and both 10-12% slower at 1558M's
// (cuda/PERF_NOTES.md has the tables, what was found and the next steps).
//
// Both operands of the forward are K-major, the pattern of the attention's S = Q K^T, so the
// pieces are the attention kernels' (sm90_common.cuh). Persistent: blocks walk 128 x 128 output
// tiles, N tiles of a row of the output first, so the blocks running at once share inp's rows and
// all of w in L2. Three warpgroups: a producer whose one thread brings 128 x 64 tiles of inp and w
// by the copy engine into GS_STAGES stages, each completing on its "full" mbarrier; two consumers
// that take the block's tiles in turn (ping-pong, as CUTLASS's ping-pong kernel does): consumer c
// computes tiles j = c, c + 2, ... of its block with wgmma m64n128k16 (two per 16 columns of K, one
// per 64-row half), releasing each stage (its "empty" mbarrier) once the products reading it are
// done, and then runs the epilogue (bias, GELU, 16-byte stores after a shuffle within each quad of
// lanes) while the other consumer's products run. The mainloops run in strict turn (named barriers
// 1 and 2), so the stages are consumed in the order the producer filled them and no consumer waits
// on a barrier phase two ahead of the one it means. Where the output has an even number of 128-row
// tile rows the blocks run in clusters of two that share w's tiles (gs_kernel's comment).
//
// gw_kernel, further down, computes the same products in 128 x 256 tiles (TPTRAIN_GEMM_SM90_TILE=256).
// gemm_sm90_fwd runs gs_kernel with the staged epilogue on a forward with no GELU (the bias or
// nothing), so that its mainloop can be timed against cuBLASLt's on products whose epilogue costs
// next to nothing (TPTRAIN_GEMM_SM90_PLAIN=1; not yet run on a GPU).
//
// Shapes: N and OC multiples of 128, IC of 64, operands 16-byte aligned (gemm.cu checks and falls
// back to cuBLASLt otherwise). fp32 accumulation; pre is the rounded sum, out GELU of the unrounded
// one, as cuBLASLt's epilogue computes them; tanh by tanh.approx.f32.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "gemm_sm90.h"
#include "sm90_common.cuh"

#define GS_BM 128     // output rows of a tile (two 64-row halves)
#define GS_BN 128     // output columns of a tile (one wgmma's n)
#define GS_BK 64      // K columns of a stage (128 bytes: one swizzle row)
#define GS_STAGES_MAX 6 // 32 KB each: inp's 128 x 64 tile, then w's (6 with the register epilogue,
                        // 5 with the staged one, whose two 32 KB output tiles take the sixth's room)
#define GS_OUT_BYTES (GS_BM * GS_BN * 2) // a consumer's staged output tile: two 64-column halves of 16 KB
#define GS_NT 384     // producer, two consumers
#define GS_STAGE_BYTES (2 * GS_BM * GS_BK * 2)
#define GS_GELU_SCALE 0.7978845608028654f // sqrt(2 / pi)

// What a kernel computes: the forward with the bias + GELU epilogue, the input gradient with
// GELU's derivative, or (staged epilogue only) the forward with the bias or nothing after it.
enum { GS_FWD_GELU = 0, GS_BWD_DGELU = 1, GS_FWD_PLAIN = 2 };

// tanh by the multi-function unit (one instruction; about 2^-11 relative error, below bf16's 2^-8)
__device__ __forceinline__ static float gs_tanh(float x) {
    float y;
    asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ static float gs_gelu(float x) {
    float cube = 0.044715f * x * x * x;
    return 0.5f * x * (1.0f + gs_tanh(GS_GELU_SCALE * (x + cube)));
}

// gelu'(x), as gelu.cuh's gelu_grad_f
__device__ __forceinline__ static float gs_gelu_grad(float x) {
    float cube = 0.044715f * x * x * x;
    float th = gs_tanh(GS_GELU_SCALE * (x + cube));
    float sech2 = 1.0f - th * th;
    return 0.5f * (1.0f + th) + x * 0.5f * sech2 * GS_GELU_SCALE * (1.0f + 3.0f * 0.044715f * x * x);
}

// Keeps the compiler from moving accesses of x across the asynchronous products.
__device__ __forceinline__ static void gs_pin(float (&x)[64]) {
#pragma unroll
    for (int i = 0; i < 64; i++) asm volatile("" : "+f"(x[i])::"memory");
}

__device__ __forceinline__ static float2 gs_pick(const float2 (&v)[4], int i) {
    float2 lo = (i & 1) ? v[1] : v[0], hi = (i & 1) ? v[3] : v[2];
    return (i & 2) ? hi : lo;
}

// The four lanes of a quad (tq 0..3) each hold v[u], u = 0..3: a pair of one row's columns
// 8 u + 2 tq, + 1. Afterwards lane tq holds the row's columns 8 tq .. 8 tq + 7 in order (w[s] came
// from lane s), so that each lane writes 16 contiguous bytes: three exchanges, lane tq sending
// v[tq ^ m] to lane tq ^ m.
__device__ __forceinline__ static void gs_quad_transpose(const float2 (&v)[4], float2 (&w)[4], int tq) {
#pragma unroll
    for (int u = 0; u < 4; u++) w[u] = v[u]; // w[tq] = v[tq] stays; the rest are replaced
#pragma unroll
    for (int m = 1; m < 4; m++) {
        float2 send = gs_pick(v, tq ^ m);
        float2 got = make_float2(__shfl_xor_sync(0xffffffffu, send.x, m), __shfl_xor_sync(0xffffffffu, send.y, m));
#pragma unroll
        for (int u = 0; u < 4; u++)
            if (u == (tq ^ m)) w[u] = got;
    }
}

__device__ __forceinline__ static void gs_unpack8(uint4 p, float (&x)[8]) {
    const uint32_t q[4] = {p.x, p.y, p.z, p.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(&q[i]));
        x[2 * i] = f.x;
        x[2 * i + 1] = f.y;
    }
}

// A consumer's tile epilogue for rows m0 + 64 h + 16 warp + g (+ 8) from the two halves'
// accumulators in wgmma's m64n128 layout (lane g * 4 + tq holds columns 8 jj + 2 tq, + 1). Each
// group of 32 columns is first passed around the quad (gs_quad_transpose) so that every lane reads
// and writes 16 contiguous bytes (columns n0 + 32 q + 8 tq .. + 7; row stride ldo): a warp's access
// covers 8 rows x 64 bytes, four times fewer instructions than the accumulator layout's 4-byte
// ones. GS_FWD_GELU: aux = the sum plus bias (the pre-activation, stored), out = GELU of it;
// GS_BWD_DGELU: out = the sum times gelu'(aux) (aux read, a row's four loads issued together).
template <int MODE, bool BIAS>
__device__ __forceinline__ static void gs_epilogue(f9_bf16 *__restrict__ out, f9_bf16 *__restrict__ aux,
                                                   const f9_bf16 *__restrict__ bias, const float (&acc)[2][64],
                                                   int m0, int n0, int ldo, int warp, int lane) {
    const int g = lane >> 2, tq = lane & 3;
#pragma unroll
    for (int h = 0; h < 2; h++)
#pragma unroll
        for (int hr = 0; hr < 2; hr++) {
            const size_t row = (size_t)(m0 + 64 * h + 16 * warp + g + 8 * hr);
            f9_bf16 *po = out + row * ldo + n0 + 8 * tq, *pa = aux + row * ldo + n0 + 8 * tq;
            uint4 pre[4];
            if constexpr (MODE == GS_BWD_DGELU) {
#pragma unroll
                for (int q = 0; q < 4; q++) pre[q] = __ldg(reinterpret_cast<const uint4 *>(pa + 32 * q));
            }
#pragma unroll
            for (int q = 0; q < 4; q++) {
                float2 v[4], w[4];
#pragma unroll
                for (int u = 0; u < 4; u++)
                    v[u] = make_float2(acc[h][4 * (4 * q + u) + 2 * hr], acc[h][4 * (4 * q + u) + 2 * hr + 1]);
                gs_quad_transpose(v, w, tq);
                float x[8] = {w[0].x, w[0].y, w[1].x, w[1].y, w[2].x, w[2].y, w[3].x, w[3].y}, y[8];
                if constexpr (MODE == GS_FWD_GELU) {
                    if constexpr (BIAS) {
                        float b[8];
                        gs_unpack8(__ldg(reinterpret_cast<const uint4 *>(bias + n0 + 32 * q + 8 * tq)), b);
#pragma unroll
                        for (int i = 0; i < 8; i++) x[i] += b[i];
                    }
#pragma unroll
                    for (int i = 0; i < 8; i++) y[i] = gs_gelu(x[i]);
                    *reinterpret_cast<uint4 *>(pa + 32 * q) =
                        make_uint4(f9_pack(x[0], x[1]), f9_pack(x[2], x[3]), f9_pack(x[4], x[5]), f9_pack(x[6], x[7]));
                } else {
                    float p[8];
                    gs_unpack8(pre[q], p);
#pragma unroll
                    for (int i = 0; i < 8; i++) y[i] = x[i] * gs_gelu_grad(p[i]);
                }
                *reinterpret_cast<uint4 *>(po + 32 * q) =
                    make_uint4(f9_pack(y[0], y[1]), f9_pack(y[2], y[3]), f9_pack(y[4], y[5]), f9_pack(y[6], y[7]));
            }
        }
}

// ---- the staged epilogue (TE): the tile through shared memory and out by the copy engine

__device__ __forceinline__ static void gs_stmatrix4(uint32_t addr, uint32_t r0, uint32_t r1, uint32_t r2, uint32_t r3) {
    asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(r0), "r"(r1),
                 "r"(r2), "r"(r3)
                 : "memory");
}

__device__ __forceinline__ static void gs_ldmatrix4(uint32_t addr, uint32_t (&r)[4]) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}

// A 64-column x 128-row box of shared src (128-byte swizzled, as the copy engine reads it) to the
// tensor at (x, y); completes in the thread's bulk group.
__device__ __forceinline__ static void gs_tma_store(const CUtensorMap *map, uint32_t src, int x, int y) {
    asm volatile("cp.async.bulk.tensor.3d.global.shared::cta.bulk_group [%0, {%1, %2, %3}], [%4];\n" ::"l"(map),
                 "r"(x), "r"(y), "r"(0), "r"(src)
                 : "memory");
}

// Where lane `lane` of warp `warp` points ldmatrix/stmatrix .x4 for the 16 x 16 block of rows
// 64 h + 16 warp .. + 15 and columns 16 p .. + 15 of the staged tile: matrix lane / 8 is rows + 8
// (lane / 8 odd) of column block 2 p + lane / 16, the tile's two 64-column halves 16 KB apart, each
// row 128 bytes with its 16-byte chunks swizzled by the row (the copy engine's 128-byte swizzle).
// The four matrices' registers are then the accumulator's (4 jj .. 4 jj + 3 for jj = 2 p, 2 p + 1)
// in wgmma's layout, rows g and g + 8 of each 8-column block.
__device__ __forceinline__ static uint32_t gs_stage_addr(uint32_t buf, int h, int p, int warp, int lane) {
    const int mi = lane >> 3, r = lane & 7;
    const int row = 64 * h + 16 * warp + 8 * (mi & 1) + r, cb = 2 * p + (mi >> 1);
    return buf + (uint32_t)((cb >> 3) * 16384 + row * 128 + (((cb & 7) ^ r) << 4));
}

// Writes the consumer's 128 x 128 values (the two halves' accumulators, bf16) into its staged tile.
__device__ __forceinline__ static void gs_stage_tile(uint32_t buf, const float (&acc)[2][64], int warp, int lane) {
#pragma unroll
    for (int h = 0; h < 2; h++)
#pragma unroll
        for (int p = 0; p < 8; p++) {
            const float *a = &acc[h][8 * p];
            gs_stmatrix4(gs_stage_addr(buf, h, p, warp, lane), f9_pack(a[0], a[1]), f9_pack(a[2], a[3]),
                         f9_pack(a[4], a[5]), f9_pack(a[6], a[7]));
        }
}

// The staged tile to the tensor at rows m0.., columns n0.. by one thread (wt == 0) once every thread
// of the consumer has written its part (fence.proxy.async: ordinary stores, then the copy engine's
// reads; named barrier bar of the warpgroup's 128 threads).
__device__ __forceinline__ static void gs_store_staged(const CUtensorMap *map, uint32_t buf, int m0, int n0, int bar,
                                                       int wt) {
    f9_fence_async();
    f9_named_sync(bar, 128);
    if (wt == 0) {
        gs_tma_store(map, buf, n0, m0);
        gs_tma_store(map, buf + 16384, n0 + 64, m0);
        f9_bulk_commit();
    }
}

// The staged epilogue. GS_FWD_GELU: aux = the sum plus bias (stored first, from the staged tile),
// then out = GELU of the unrounded sum through the same tile once the copy engine has read it
// (computed meanwhile). GS_FWD_PLAIN: out = the sum plus bias (if any), stored alone. GS_BWD_DGELU:
// the producer brought the tile's pre-activation into the staged tile (pre_full); each lane reads
// its values with ldmatrix in the accumulator's layout and writes out = sum * gelu'(pre) back in
// place with stmatrix (the same addresses, so no other warp's data moves), the tile goes out, and
// once read the buffer is the producer's again (pre_empty). Thread wt == 0 of the warpgroup issues
// the copies. With colsum (GS_BWD_DGELU), the column sums of the tile as stored (bf16) over each
// warp's 32 rows go to row 4 (m0 / 128) + warp of colsum (ldc columns): each lane adds its four
// rows of a 16-column block, the eight lanes of a column add theirs by shuffles, and lane group
// g == p writes block p.
template <int MODE, bool BIAS>
__device__ __forceinline__ static void gs_epilogue_staged(const CUtensorMap *map_out, const CUtensorMap *map_aux,
                                                          const f9_bf16 *__restrict__ bias, float (&acc)[2][64],
                                                          uint32_t buf, uint32_t pre_full, uint32_t pre_empty,
                                                          uint32_t use, int m0, int n0, int bar, int warp,
                                                          int lane, float *colsum, int ldc) {
    const int wt = 32 * warp + lane, tq = lane & 3;
    if constexpr (MODE != GS_BWD_DGELU) {
        if (BIAS) {
#pragma unroll
            for (int jj = 0; jj < 16; jj++) {
                const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(bias + n0 + 8 * jj + 2 * tq));
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    acc[h][4 * jj] += b.x;
                    acc[h][4 * jj + 1] += b.y;
                    acc[h][4 * jj + 2] += b.x;
                    acc[h][4 * jj + 3] += b.y;
                }
            }
        }
        if (wt == 0) f9_bulk_wait_read(); // the tile's previous stores have read the buffer
        f9_named_sync(bar, 128);
        gs_stage_tile(buf, acc, warp, lane);
        gs_store_staged(MODE == GS_FWD_GELU ? map_aux : map_out, buf, m0, n0, bar, wt);
        if constexpr (MODE == GS_FWD_GELU) {
#pragma unroll
            for (int h = 0; h < 2; h++)
#pragma unroll
                for (int i = 0; i < 64; i++) acc[h][i] = gs_gelu(acc[h][i]);
            if (wt == 0) f9_bulk_wait_read();
            f9_named_sync(bar, 128);
            gs_stage_tile(buf, acc, warp, lane);
            gs_store_staged(map_out, buf, m0, n0, bar, wt);
        }
    } else {
        (void)bias;
        (void)map_aux;
        f9_mbar_wait(pre_full, use & 1u);
        float *crow = colsum ? colsum + ((size_t)(m0 / GS_BM) * 4 + (size_t)warp) * (size_t)ldc + n0 : NULL;
#pragma unroll
        for (int p = 0; p < 8; p++) {
            float cs[4] = {0.0f, 0.0f, 0.0f, 0.0f}; // columns 16 p + 2 tq (+ 1), 16 p + 8 + 2 tq (+ 1)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const uint32_t addr = gs_stage_addr(buf, h, p, warp, lane);
                uint32_t pre[4];
                gs_ldmatrix4(addr, pre);
                float *a = &acc[h][8 * p];
                uint32_t o[4];
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    const float2 x = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(&pre[i]));
                    o[i] = f9_pack(a[2 * i] * gs_gelu_grad(x.x), a[2 * i + 1] * gs_gelu_grad(x.y));
                }
                gs_stmatrix4(addr, o[0], o[1], o[2], o[3]);
                if (crow) { // o[0], o[1]: rows g and g + 8 of one column pair; o[2], o[3] of the next
                    float2 v[4];
#pragma unroll
                    for (int i = 0; i < 4; i++)
                        v[i] = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(&o[i]));
                    cs[0] += v[0].x + v[1].x;
                    cs[1] += v[0].y + v[1].y;
                    cs[2] += v[2].x + v[3].x;
                    cs[3] += v[2].y + v[3].y;
                }
            }
            if (crow) {
#pragma unroll
                for (int i = 0; i < 4; i++) // over the eight row groups g (lane bits 2-4)
#pragma unroll
                    for (int x = 4; x < 32; x <<= 1) cs[i] += __shfl_xor_sync(0xffffffffu, cs[i], x);
                if ((lane >> 2) == p) {
                    *reinterpret_cast<float2 *>(crow + 16 * p + 2 * tq) = make_float2(cs[0], cs[1]);
                    *reinterpret_cast<float2 *>(crow + 16 * p + 8 + 2 * tq) = make_float2(cs[2], cs[3]);
                }
            }
        }
        gs_store_staged(map_out, buf, m0, n0, bar, wt);
        if (wt == 0) {
            f9_bulk_wait_read();
            f9_mbar_arrive(pre_empty);
        }
    }
}

// ---- cluster pieces (a pair of blocks on neighbouring multiprocessors sharing B's tile by multicast)

// Arrives on the barrier at the same offset in block `rank` of the cluster, with the default
// (CTA-scope) release: with a cluster-scope one (.release.cluster) the products ran at half speed,
// most likely because each arrival then waited for the consumer's epilogue stores of its previous
// tile to reach L2.
__device__ __forceinline__ static void gs_mbar_arrive_remote(uint32_t bar, uint32_t rank) {
    uint32_t remote;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote) : "r"(bar), "r"(rank));
    asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];\n" ::"r"(remote) : "memory");
}

// A box of a tensor into dst and the same offset of every block in mask, each block's barrier at
// bar's offset counting the bytes.
__device__ __forceinline__ static void gs_tma_load_multicast(uint32_t dst, const CUtensorMap *map, int x, int y,
                                                             uint32_t bar, uint16_t mask) {
    asm volatile("cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster"
                 " [%0], [%1, {%2, %3, %4}], [%5], %6;\n" ::"r"(dst),
                 "l"(map), "r"(x), "r"(y), "r"(0), "r"(bar), "h"(mask)
                 : "memory");
}

__device__ __forceinline__ static uint32_t gs_cluster_rank(void) {
    uint32_t r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
    return r;
}

// ---- the pipeline's pieces, shared by gs_kernel and gw_kernel

// The walk over an (M, NN) output in tiles of GS_BM x BN: units of CL tiles stacked in M (a
// cluster's blocks take rank 0, 1, ... of a unit), N tiles of a row first; a cluster takes units
// cl, cl + clusters, ...
template <int CL, int BN>
struct gs_walk {
    int tn, units; // tiles across N, units in all
    __host__ __device__ gs_walk(int M, int NN) : tn(NN / BN), units(M / (GS_BM * CL) * (NN / BN)) {}
    // the first row and column of block `rank`'s tile of unit u
    __device__ int m0(int u, uint32_t rank) const { return ((u / tn) * CL + (int)rank) * GS_BM; }
    __device__ int n0(int u) const { return (u % tn) * BN; }
};

// After thread 0 has initialised the block's mbarriers: in clusters, both blocks' barriers exist
// before either copies into or arrives on the other's; else the block's threads see them.
template <int CL>
__device__ __forceinline__ static void gs_barriers_ready(void) {
    if constexpr (CL > 1)
        asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
    else
        __syncthreads();
}

// The producer's fill number `it` of the STAGES stages, k columns kc * 64.. of the tile at (m0,
// n0): once the stage's previous fill (it - STAGES) has been released by every consumer of it,
// A's 128 x 64 box and B's NB 64 x 64 boxes (8 KB apart: for the forwards rows n0 + 64 q of B, for
// GS_BWD_DGELU its columns n0 + 64 q), in clusters this block's share of B's boxes multicast to
// both blocks; the stage's "full" barrier counts the bytes.
template <int MODE, int CL, int STAGES, int NB>
__device__ __forceinline__ static void gs_fill(const CUtensorMap *ta, const CUtensorMap *tb, uint32_t base,
                                               uint32_t full, uint32_t empty, int it, int kc, int m0, int n0,
                                               uint32_t rank) {
    constexpr uint32_t bytes = (GS_BM + 64 * NB) * GS_BK * 2;
    const int s = it % STAGES;
    if (it >= STAGES) f9_mbar_wait(empty + 8 * s, (uint32_t)((it / STAGES - 1) & 1));
    const uint32_t sa = base + (uint32_t)s * bytes, sb = sa + GS_BM * GS_BK * 2;
    f9_mbar_expect_tx(full + 8 * s, bytes);
    f9_tma_load(sa, ta, kc * GS_BK, m0, 0, full + 8 * s);
    for (int q = CL > 1 ? (int)rank : 0; q < NB; q += CL) {
        const int x = MODE != GS_BWD_DGELU ? kc * GS_BK : n0 + 64 * q;
        const int y = MODE != GS_BWD_DGELU ? n0 + 64 * q : kc * GS_BK;
        const uint32_t dst = sb + (uint32_t)q * 64 * 128;
        if constexpr (CL > 1) gs_tma_load_multicast(dst, tb, x, y, full + 8 * s, (uint16_t)3);
        else f9_tma_load(dst, tb, x, y, 0, full + 8 * s);
    }
}

// The producer, before its block exits: the release of each stage's last fill (of `it` in all),
// after which no consumer of either block touches this block.
template <int STAGES>
__device__ __forceinline__ static void gs_drain(uint32_t empty, int it) {
    for (int last = it - STAGES < 0 ? 0 : it - STAGES; last < it; last++)
        f9_mbar_wait(empty + 8 * (last % STAGES), (uint32_t)((last / STAGES) & 1));
}

// A consumer warp's release of a stage whose products are done: lane 0 arrives on the stage's
// "empty" barrier here and, in clusters, on the peer block's.
template <int CL>
__device__ __forceinline__ static void gs_release(uint32_t bar, uint32_t rank, int lane) {
    if (lane == 0) {
        f9_mbar_arrive(bar);
        if constexpr (CL > 1) gs_mbar_arrive_remote(bar, rank ^ 1u);
    }
}

// out (M, NN) from A (M, K) K-major (tensor map ta, 128-row boxes) and B: the forwards (GELU or
// plain), B (NN, K) K-major, d = A B^T; GS_BWD_DGELU, B (K, NN) MN-major, d = A B; tb's boxes are
// 64 x 64 either way, two per stage (the tile's two 64-row halves of B for the forward, its two
// 64-column halves for the backward, 8 KB apart, which is the layout one 128-row box would give).
//
// CL = 2: the blocks run in clusters of two; a cluster takes units of two vertically adjacent
// tiles (rows m0 and m0 + 128 of the same columns), each block one, and B's tile is the same for
// both: block r loads its half r once and the copy engine writes it into both blocks' stage (TMA
// multicast), so each block reads 24 KB per stage from L2 instead of 32 (85 FLOP per byte instead
// of 64). A stage may be refilled only when both blocks' consumers are done with it, so each
// consumer warp releases it on both blocks' "empty" barriers (8 arrivals per phase), and a block's
// producer, before the block exits, waits for the release of every stage it filled, after which no
// arrival from the other block can still come. CL = 1: one block per tile, the same code without
// the peer.
//
// TE: the staged epilogue (gs_epilogue_staged, five stages, the consumers' output tiles after them,
// tensor maps to for out and tx for aux); else the register one (gs_epilogue, six stages).
template <int MODE, bool BIAS, int CL, bool TE>
static __global__ void __launch_bounds__(GS_NT, 1)
gs_kernel(const __grid_constant__ CUtensorMap ta, const __grid_constant__ CUtensorMap tb,
          const __grid_constant__ CUtensorMap to, const __grid_constant__ CUtensorMap tx, f9_bf16 *out,
          f9_bf16 *aux, const f9_bf16 *bias, int M, int K, int NN, int early, float *colsum) {
    constexpr int GS_STAGES = TE ? GS_STAGES_MAX - 1 : GS_STAGES_MAX;
    extern __shared__ __align__(1024) unsigned char gs_smem[];
    const uint32_t base = (f9_smem_u32(gs_smem) + 1023u) & ~1023u; // stage s at base + s * 32 KB
    const uint32_t staged = base + GS_STAGES * GS_STAGE_BYTES;     // TE: consumer c's tile at + c * 32 KB
    const uint32_t full = staged + (TE ? 2 * GS_OUT_BYTES : 0);    // GS_STAGES 8-byte mbarriers,
    const uint32_t empty = full + 8 * GS_STAGES;                   // then as many again, then (TE,
    const uint32_t pre_full = empty + 8 * GS_STAGES;               // backward) the staged tiles' two
    const uint32_t pre_empty = pre_full + 16;                      // and two
    const int tid = (int)threadIdx.x, wg = tid >> 7;
    const uint32_t rank = CL > 1 ? gs_cluster_rank() : 0u;
    const gs_walk<CL, GS_BN> walk(M, NN);
    const int units = walk.units, nk = K / GS_BK;
    const int cl = (int)blockIdx.x / CL, clusters = (int)gridDim.x / CL;
    if (tid == 0) {
        for (int s = 0; s < GS_STAGES; s++) {
            f9_mbar_init(full + 8 * s, 1);
            f9_mbar_init(empty + 8 * s, 4 * CL);
        }
        for (int c = 0; c < 2; c++) {
            f9_mbar_init(pre_full + 8 * c, 1);
            f9_mbar_init(pre_empty + 8 * c, 1);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    gs_barriers_ready<CL>();

    if (wg == 0) { // producer: one thread issues every copy, stage by stage, tile by tile
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
        if (tid == 0) {
            int it = 0, j = 0;
            for (int u = cl; u < units; u += clusters, j++) {
                const int m0 = walk.m0(u, rank), n0 = walk.n0(u);
                if constexpr (TE && MODE == GS_BWD_DGELU) {
                    // the tile's pre-activation into its consumer's staged tile, once that consumer's
                    // store of tile j - 2 has read it
                    const int c = j & 1;
                    if (j >= 2) f9_mbar_wait(pre_empty + 8 * c, (uint32_t)(((j >> 1) - 1) & 1));
                    const uint32_t dst = staged + (uint32_t)c * GS_OUT_BYTES;
                    f9_mbar_expect_tx(pre_full + 8 * c, GS_OUT_BYTES);
                    f9_tma_load(dst, &tx, n0, m0, 0, pre_full + 8 * c);
                    f9_tma_load(dst + 16384, &tx, n0 + 64, m0, 0, pre_full + 8 * c);
                }
                for (int kc = 0; kc < nk; kc++, it++)
                    gs_fill<MODE, CL, GS_STAGES, 2>(&ta, &tb, base, full, empty, it, kc, m0, n0, rank);
            }
            gs_drain<GS_STAGES>(empty, it);
        }
        return;
    }

    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
    const int c = wg - 1, warp = (tid >> 5) & 3, lane = tid & 31;
    float acc[2][64];
    int j = 0; // the block's tiles so far
    for (int u = cl; u < units; u += clusters, j++) {
        if ((j & 1) != c) continue;
        const int m0 = walk.m0(u, rank), n0 = walk.n0(u);
        if constexpr (MODE == GS_BWD_DGELU && !TE) { // the epilogue's pre-activation rows into L2 meanwhile
            const f9_bf16 *row = aux + (size_t)(m0 + (tid & 127)) * NN + n0;
            asm volatile("prefetch.global.L2 [%0];\n" ::"l"(row));
            asm volatile("prefetch.global.L2 [%0];\n" ::"l"(row + 64));
        }
        // this consumer's turn at the tensor cores: the other consumer's mainloop of tile j - 1 is done
        if (j > 0) f9_named_sync(1 + c, 256);
        const int it0 = j * nk;
        for (int kc = 0; kc < nk; kc++) {
            const int it = it0 + kc, s = it % GS_STAGES;
            f9_mbar_wait(full + 8 * s, (uint32_t)((it / GS_STAGES) & 1));
            const uint32_t sa = base + (uint32_t)s * GS_STAGE_BYTES, sb = sa + GS_BM * GS_BK * 2;
            f9_wg_fence();
#pragma unroll
            for (int h = 0; h < 2; h++)
#pragma unroll
                for (int kk = 0; kk < 4; kk++) {
                    uint64_t da = f9_desc(sa + (uint32_t)(h * 64 * 128 + kk * 32), 16, 1024);
                    if constexpr (MODE != GS_BWD_DGELU)
                        wg_ss_n128<0>(acc[h], da, f9_desc(sb + (uint32_t)(kk * 32), 16, 1024), kc > 0 || kk > 0);
                    else // rows 16 kk of the K x 128 tile, its two 64-column halves 8 KB apart
                        wg_ss_n128<1>(acc[h], da, f9_desc(sb + (uint32_t)(kk * 16 * 128), 64 * 128, 1024),
                                      kc > 0 || kk > 0);
                }
            asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
            if (kc > 0) { // the previous stage's products are done: each warp releases it
                asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
                gs_release<CL>(empty + 8 * ((it - 1) % GS_STAGES), rank, lane);
            }
        }
        // the other consumer's turn, if the block has a next tile (it is that consumer's): with
        // `early`, once this tile's products are issued, so that the other's queue behind them with
        // no gap at the tensor cores (CUTLASS's ping-pong hands over there); else once they are done
        const bool next = u + clusters < units;
        if (early && next) f9_named_arrive(2 - c, 256);
        asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
        gs_pin(acc[0]);
        gs_pin(acc[1]);
        gs_release<CL>(empty + 8 * ((it0 + nk - 1) % GS_STAGES), rank, lane);
        if (!early && next) f9_named_arrive(2 - c, 256);
        if constexpr (TE)
            gs_epilogue_staged<MODE, BIAS>(&to, &tx, bias, acc, staged + (uint32_t)c * GS_OUT_BYTES, pre_full + 8 * c,
                                           pre_empty + 8 * c, (uint32_t)(j >> 1), m0, n0, 3 + c, warp, lane, colsum,
                                           NN);
        else
            gs_epilogue<MODE, BIAS>(out, aux, bias, acc, m0, n0, NN, warp, lane);
    }
    // the copy engine has finished the consumer's stores before the block's shared memory goes
    if (TE && (tid & 127) == 0) f9_bulk_wait();
}

// ---- the wide tile (TPTRAIN_GEMM_SM90_TILE=256): 128 x 256 output tiles, both consumers on each
//
// With 128 x 128 tiles a consumer's products are two m64n128 per 16 columns of K, each reading w's
// tile from shared memory, and the copy engine writes 32 KB per 64 columns of K into it: at the
// tensor cores' full rate about 150 bytes per cycle of shared-memory traffic, more than the
// multiprocessor's 128, which suggested that gs_kernel cannot pass about 85% of that rate.
// cuBLASLt's kernels for these shapes take 128 x 256 tiles that both consumer warpgroups compute
// together, each one m64n256 product per 16 columns (about 120 bytes per cycle at full rate). So
// does gw_kernel (the first measurement below did not show the gain: both kernels ran at about 55%
// of the rate, so something else holds them first). Its two consumers finish a tile together, so the
// tile's epilogue cannot hide under the other consumer's products as in gs_kernel; instead the
// consumers only add the bias (which the epilogue warps put into shared memory), put the tile into
// shared memory in bf16 and go on to the next one, and the epilogue warps (the producer's
// warpgroup but the producer) do the rest under their products: GS_FWD_GELU stores the
// pre-activation by the copy engine, overwrites each 64-column chunk with GELU of it once the copy
// has read the chunk, and stores that; GS_BWD_DGELU multiplies each value by gelu' of the
// pre-activation (read from memory, a chunk's loads all in flight, the next chunk's issued before
// the current one is computed and the first chunk's before the tile arrives) and stores the
// result. Both round twice where gs_kernel rounds once (GELU of the stored pre-activation; the
// product rounded to bf16 before the GELU' factor), well inside bf16's tolerances (the gemm suite
// compares against double references).
//
// Shared memory: three stages of 48 KB (inp's 128 x 64 tile, then w's four 64 x 64 boxes) and the
// 64 KB tile in four 64-column chunks of 128 rows (128-byte swizzled, as the copy engine reads
// them), or (TPTRAIN_GEMM_SM90_WIDE_STAGES=4) four stages and the tile handed over in two halves
// through 32 KB; then the barriers and the tile's bias. Three warpgroups, as gs_kernel (with four, ptxas has 128
// registers per thread for the consumers' 128 accumulators and cannot compile the m64n256
// product): warp 0 of the first is the producer, its warps 1-3 the epilogue (152 registers), the
// other two the consumers (176; ptxas compiles their code within the launch's 168).
//
// First measurement (one H200, `--bench gemm`, the version before the bias in shared memory and the
// backward's loads in flight): correct on the gemm suite's shapes; fc forward at 124M 0.152 ms
// (the 128 x 128 kernel 0.151, cuBLASLt 0.157), the input gradient 0.282 (0.163, 0.159), where
// Nsight showed the epilogue warps waiting on their loads of the pre-activation (7.8 cycles of
// long-scoreboard stall per instruction issued).

#define GW_BN 256
// Stages: three beside a 64 KB hand-over buffer (H = 1), four beside a 32 KB one (H = 2).
__host__ __device__ constexpr int gw_stages(int H) { return H == 2 ? 4 : 3; }
#define GW_STAGE_BYTES (GS_BM * GS_BK * 2 + GW_BN * GS_BK * 2)
#define GW_TILE_BYTES (GS_BM * GW_BN * 2)
#define GW_NT 384
#define GW_EPI_THREADS 96 // warps 1-3 of the producer's warpgroup
#define GW_CHUNK_PIECES (GS_BM * 8) // 16-byte pieces of a 64-column chunk
#define GW_PER ((GW_CHUNK_PIECES + GW_EPI_THREADS - 1) / GW_EPI_THREADS) // pieces an epilogue thread takes

#define GW_ACC_TEXT128 \
    F9_ACC_TEXT64 ", " \
    "%64, %65, %66, %67, %68, %69, %70, %71, " \
    "%72, %73, %74, %75, %76, %77, %78, %79, " \
    "%80, %81, %82, %83, %84, %85, %86, %87, " \
    "%88, %89, %90, %91, %92, %93, %94, %95, " \
    "%96, %97, %98, %99, %100, %101, %102, %103, " \
    "%104, %105, %106, %107, %108, %109, %110, %111, " \
    "%112, %113, %114, %115, %116, %117, %118, %119, " \
    "%120, %121, %122, %123, %124, %125, %126, %127"

// d (64 x 256 fp32, this thread's 128 values) = (scale_d ? d : 0) + A . B^T, A and B K-major; with
// TB = 1, B MN-major (d = A . B).
template <int TB>
__device__ __forceinline__ static void wg_ss_n256(float (&d)[128], uint64_t da, uint64_t db, int scale_d) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {" GW_ACC_TEXT128 "}, %128, %129, p, 1, 1, 0, %131;\n}\n"
                 : F9_ACC_OUT64(d), F9_ACC_OUT64((&d[64]))
                 : "l"(da), "l"(db), "r"(scale_d), "n"(TB));
}

__device__ __forceinline__ static uint4 gw_lds(uint32_t addr) {
    uint4 v;
    asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(addr) : "memory");
    return v;
}

__device__ __forceinline__ static void gw_sts(uint32_t addr, uint4 v) {
    asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w) : "memory");
}

// Eight bf16 values: y = GELU(x) (GS_FWD_GELU) or x * gelu'(pre) (GS_BWD_DGELU).
template <int MODE>
__device__ __forceinline__ static uint4 gw_apply(uint4 v, uint4 pre) {
    float x[8], p[8];
    gs_unpack8(v, x);
    if constexpr (MODE == GS_FWD_GELU) {
        (void)pre;
        return make_uint4(f9_pack(gs_gelu(x[0]), gs_gelu(x[1])), f9_pack(gs_gelu(x[2]), gs_gelu(x[3])),
                          f9_pack(gs_gelu(x[4]), gs_gelu(x[5])), f9_pack(gs_gelu(x[6]), gs_gelu(x[7])));
    } else {
        gs_unpack8(pre, p);
        return make_uint4(f9_pack(x[0] * gs_gelu_grad(p[0]), x[1] * gs_gelu_grad(p[1])),
                          f9_pack(x[2] * gs_gelu_grad(p[2]), x[3] * gs_gelu_grad(p[3])),
                          f9_pack(x[4] * gs_gelu_grad(p[4]), x[5] * gs_gelu_grad(p[5])),
                          f9_pack(x[6] * gs_gelu_grad(p[6]), x[7] * gs_gelu_grad(p[7])));
    }
}

// GS_BWD_DGELU: this thread's pieces of chunk q of the tile's pre-activation, all loads in flight.
__device__ __forceinline__ static void gw_load_pre(uint4 (&pv)[GW_PER], const f9_bf16 *__restrict__ pre, int m0,
                                                   int n0, int q, int NN, int et) {
#pragma unroll
    for (int k = 0; k < GW_PER; k++) {
        const int i = et + GW_EPI_THREADS * k, r = i >> 3;
        if (i < GW_CHUNK_PIECES)
            pv[k] = __ldg(reinterpret_cast<const uint4 *>(pre + (size_t)(m0 + r) * NN + n0 + 64 * q + 8 * (i & 7)));
    }
}

// The epilogue warps' part of a tile at (m0, n0), held in shared memory at `tile`: the 96 threads
// (et 0..95) take the 16-byte pieces of each 64-column chunk in turn, eight consecutive threads a
// row (conflict-free under the swizzle, and 128 contiguous bytes of the pre-activation in memory).
// Thread 0 (et == 0) issues and commits the copy engine's stores. With the tile handed over in
// halves (four stages), a call takes the NQ = 2 chunks q0, q0 + 1 the buffer holds. GS_BWD_DGELU:
// pv holds chunk q0's pre-activation (chunk 0's loaded before the tile arrived); each piece's
// register takes the next chunk's load as soon as it has been used, so the loads stay in flight.
template <int MODE, int NQ>
__device__ __forceinline__ static void gw_epilogue(const CUtensorMap *map_out, const CUtensorMap *map_aux,
                                                   const f9_bf16 *__restrict__ pre, uint4 (&pv)[GW_PER],
                                                   uint32_t tile, int q0, int m0, int n0, int NN, int et) {
    constexpr int PER = GW_PER;
#pragma unroll 1
    for (int q = q0; q < q0 + NQ; q++) { // the tile's chunks q0.., held at tile + (q - q0) * 16 KB
        const uint32_t chunk = tile + (uint32_t)(q - q0) * 16384;
        if constexpr (MODE == GS_FWD_GELU) {
            (void)pre;
            if (et == 0) { // the pre-activation out first, from the chunk as the consumers wrote it
                gs_tma_store(map_aux, chunk, n0 + 64 * q, m0);
                f9_bulk_commit();
            }
            uint4 v[PER];
#pragma unroll
            for (int k = 0; k < PER; k++) {
                const int i = et + GW_EPI_THREADS * k, r = i >> 3;
                if (i < GW_CHUNK_PIECES)
                    v[k] = gw_apply<MODE>(gw_lds(chunk + (uint32_t)(r * 128 + (((i & 7) ^ (r & 7)) << 4))),
                                          make_uint4(0, 0, 0, 0));
            }
            if (et == 0) f9_bulk_wait_read(); // the copy has read the chunk: it may be overwritten
            f9_named_sync(1, GW_EPI_THREADS);
#pragma unroll
            for (int k = 0; k < PER; k++) {
                const int i = et + GW_EPI_THREADS * k, r = i >> 3;
                if (i < GW_CHUNK_PIECES) gw_sts(chunk + (uint32_t)(r * 128 + (((i & 7) ^ (r & 7)) << 4)), v[k]);
            }
        } else {
            (void)map_aux;
#pragma unroll
            for (int k = 0; k < PER; k++) { // each piece's register takes the next chunk's load once used
                const int i = et + GW_EPI_THREADS * k, r = i >> 3;
                if (i < GW_CHUNK_PIECES) {
                    const uint32_t at = chunk + (uint32_t)(r * 128 + (((i & 7) ^ (r & 7)) << 4));
                    const uint4 y = gw_apply<MODE>(gw_lds(at), pv[k]);
                    if (q < 3)
                        pv[k] = __ldg(reinterpret_cast<const uint4 *>(pre + (size_t)(m0 + r) * NN + n0 + 64 * (q + 1) +
                                                                      8 * (i & 7)));
                    gw_sts(at, y);
                }
            }
        }
        f9_fence_async();
        f9_named_sync(1, GW_EPI_THREADS);
        if (et == 0) {
            gs_tma_store(map_out, chunk, n0 + 64 * q, m0);
            f9_bulk_commit();
        }
    }
}

// The same products as gs_kernel (the operands and CL as there) with 128 x 256 tiles: warp 0 the
// producer, warps 1-3 the epilogue, warpgroups 1 and 2 the consumers (rows 0-63 and 64-127 of
// every tile). H = 1: the tile handed over whole (64 KB), three stages; H = 2: in two halves of
// 128 columns through 32 KB (the consumers wait for the first half's epilogue before writing the
// second), four stages.
template <int MODE, bool BIAS, int CL, int H>
static __global__ void __launch_bounds__(GW_NT, 1)
gw_kernel(const __grid_constant__ CUtensorMap ta, const __grid_constant__ CUtensorMap tb,
          const __grid_constant__ CUtensorMap to, const __grid_constant__ CUtensorMap tx, f9_bf16 *out,
          f9_bf16 *aux, const f9_bf16 *bias, int M, int K, int NN, int early) {
    (void)out;
    (void)early; // both consumers work on every tile: no turns
    constexpr int stages = gw_stages(H), NQ = 4 / H; // NQ 64-column chunks a hand-over
    extern __shared__ __align__(1024) unsigned char gs_smem[];
    const uint32_t base = (f9_smem_u32(gs_smem) + 1023u) & ~1023u; // stage s at base + s * 48 KB
    const uint32_t tile = base + stages * GW_STAGE_BYTES;         // the hand-over buffer
    const uint32_t full = tile + GW_TILE_BYTES / H, empty = full + 8 * stages; // stages mbarriers each,
    const uint32_t tile_full = empty + 8 * stages, tile_free = tile_full + 8; // then one each,
    const uint32_t tile_bias = tile_free + 8;                                      // then the tile's bias
    const int tid = (int)threadIdx.x, wg = tid >> 7;
    const uint32_t rank = CL > 1 ? gs_cluster_rank() : 0u;
    const gs_walk<CL, GW_BN> walk(M, NN);
    const int units = walk.units, nk = K / GS_BK;
    const int cl = (int)blockIdx.x / CL, clusters = (int)gridDim.x / CL;
    if (tid == 0) {
        for (int s = 0; s < stages; s++) {
            f9_mbar_init(full + 8 * s, 1);
            f9_mbar_init(empty + 8 * s, 8 * CL); // every consumer warp of both blocks
        }
        f9_mbar_init(tile_full, 8);
        f9_mbar_init(tile_free, 1);
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    gs_barriers_ready<CL>();

    if (wg == 0) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 152;\n");
        if (tid >= 32) { // the epilogue
            const int et = tid - 32;
            int j = 0;
            for (int u = cl; u < units; u += clusters, j++) {
                const int m0 = walk.m0(u, rank), n0 = walk.n0(u);
                uint4 pv[GW_PER];
                if constexpr (MODE == GS_BWD_DGELU) { // the tile's pre-activation into L2, chunk 0's into registers
                    for (int i = et; i < GS_BM * 4; i += GW_EPI_THREADS)
                        asm volatile("prefetch.global.L2 [%0];\n" ::"l"(aux + (size_t)(m0 + (i >> 2)) * NN + n0 + 64 * (i & 3)));
                    gw_load_pre(pv, aux, m0, n0, 0, NN, et);
                }
                if constexpr (BIAS) // the tile's bias, for the consumers to add (they read the previous
                    if (et < GW_BN / 8) // one before handing that tile over)
                        gw_sts(tile_bias + (uint32_t)et * 16, __ldg(reinterpret_cast<const uint4 *>(bias + n0) + et));
                f9_named_sync(1, GW_EPI_THREADS); // the bias is written, the previous tile's epilogue done
                if (et == 0) { // once the copies have read the previous tile, the consumers may write this one
                    if (j > 0) f9_bulk_wait_read();
                    f9_mbar_arrive(tile_free);
                }
                for (int h = 0; h < H; h++) { // hand-over j * H + h
                    f9_mbar_wait(tile_full, (uint32_t)((j * H + h) & 1));
                    gw_epilogue<MODE, NQ>(&to, &tx, aux, pv, tile, h * NQ, m0, n0, NN, et);
                    if (h + 1 < H && et == 0) { // the copies have read the half: the consumers may write the next
                        f9_bulk_wait_read();
                        f9_mbar_arrive(tile_free);
                    }
                }
            }
            if (et == 0) f9_bulk_wait();
        } else if (tid == 0) { // the producer
            int it = 0;
            for (int u = cl; u < units; u += clusters) {
                const int m0 = walk.m0(u, rank), n0 = walk.n0(u);
                for (int kc = 0; kc < nk; kc++, it++)
                    gs_fill<MODE, CL, stages, 4>(&ta, &tb, base, full, empty, it, kc, m0, n0, rank);
            }
            gs_drain<stages>(empty, it);
        }
        return;
    }

    asm volatile("setmaxnreg.inc.sync.aligned.u32 176;\n");
    const int c = wg - 1, warp = (tid >> 5) & 3, lane = tid & 31, tq = lane & 3;
    float acc[128];
    int j = 0;
    for (int u = cl; u < units; u += clusters, j++) {
        const int it0 = j * nk;
        for (int kc = 0; kc < nk; kc++) {
            const int it = it0 + kc, s = it % stages;
            f9_mbar_wait(full + 8 * s, (uint32_t)((it / stages) & 1));
            const uint32_t sa = base + (uint32_t)s * GW_STAGE_BYTES, sb = sa + GS_BM * GS_BK * 2;
            f9_wg_fence();
#pragma unroll
            for (int kk = 0; kk < 4; kk++) {
                const uint64_t da = f9_desc(sa + (uint32_t)(c * 64 * 128 + kk * 32), 16, 1024);
                if constexpr (MODE == GS_FWD_GELU)
                    wg_ss_n256<0>(acc, da, f9_desc(sb + (uint32_t)(kk * 32), 16, 1024), kc > 0 || kk > 0);
                else // rows 16 kk of the K x 256 tile, its four 64-column chunks 8 KB apart
                    wg_ss_n256<1>(acc, da, f9_desc(sb + (uint32_t)(kk * 16 * 128), 64 * 128, 1024), kc > 0 || kk > 0);
            }
            asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
            if (kc > 0) {
                asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
                gs_release<CL>(empty + 8 * ((it - 1) % stages), rank, lane);
            }
        }
        asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
#pragma unroll
        for (int i = 0; i < 128; i++) asm volatile("" : "+f"(acc[i])::"memory");
        gs_release<CL>(empty + 8 * ((it0 + nk - 1) % stages), rank, lane);
        // the tile to the epilogue warps, once they are done with the previous one and have put this
        // one's bias into shared memory
        f9_mbar_wait(tile_free, (uint32_t)((j * H) & 1));
        if constexpr (BIAS) {
#pragma unroll
            for (int jj = 0; jj < 32; jj++) {
                uint32_t bb;
                asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(bb) : "r"(tile_bias + (uint32_t)(16 * jj + 4 * tq)) : "memory");
                const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(&bb));
                acc[4 * jj] += b.x;
                acc[4 * jj + 1] += b.y;
                acc[4 * jj + 2] += b.x;
                acc[4 * jj + 3] += b.y;
            }
        }
#pragma unroll
        for (int h = 0; h < H; h++) { // columns 256 h / H.. of the tile: 16 x 16 blocks p of 16 / H
            if (h > 0) f9_mbar_wait(tile_free, (uint32_t)((j * H + h) & 1));
#pragma unroll
            for (int p = h * (16 / H); p < (h + 1) * (16 / H); p++) {
                const float *a = &acc[8 * p];
                gs_stmatrix4(gs_stage_addr(tile, c, p - h * (16 / H), warp, lane), f9_pack(a[0], a[1]),
                             f9_pack(a[2], a[3]), f9_pack(a[4], a[5]), f9_pack(a[6], a[7]));
            }
            f9_fence_async();
            __syncwarp();
            if (lane == 0) f9_mbar_arrive(tile_full);
        }
    }
}

// The kernels' tensor maps: the operands, and (the staged epilogue) out and aux as 64-column x
// 128-row boxes.
struct gs_maps {
    CUtensorMap a, b, out, aux;
};

// Which kernel: gs_kernel with the epilogue from registers or staged, or gw_kernel with three
// stages or four.
enum { GS_REGISTERS = 0, GS_STAGED = 1, GS_WIDE = 2, GS_WIDE4 = 3 };

// gs_kernel's consumers hand the turn at the tensor cores over once their tile's products are
// issued (TPTRAIN_GEMM_SM90_TURN=issued) or once they are done (=done, the default until measured:
// built and compiled, not yet run on a GPU).
static int gs_early_turn(void) {
    static int early = -1;
    if (early < 0) {
        const char *e = getenv("TPTRAIN_GEMM_SM90_TURN");
        early = e && strcmp(e, "issued") == 0;
    }
    return early;
}

// The KIND kernel for MODE (only the kernel asked for is instantiated: the plain forward exists in
// gs_kernel's staged form alone).
template <int MODE, bool BIAS, int CL, int KIND>
static auto gs_kernel_of(void) {
    if constexpr (KIND == GS_WIDE || KIND == GS_WIDE4)
        return gw_kernel<MODE, BIAS, CL, KIND == GS_WIDE4 ? 2 : 1>;
    else
        return gs_kernel<MODE, BIAS, CL, KIND == GS_STAGED>;
}

// Launches the KIND kernel over an (M, NN) output; 0, or 2 when the launch failed. colsum (the
// staged GS_BWD_DGELU only; else NULL): the output's column sums per 32 rows, as gs_epilogue_staged
// writes them.
template <int MODE, bool BIAS, int CL, int KIND>
static int gs_launch_cl(cudaStream_t st, const gs_maps &m, void *out, void *aux, const void *bias, int M, int K,
                        int NN, float *colsum) {
    constexpr bool wide = KIND == GS_WIDE || KIND == GS_WIDE4;
    constexpr int H = KIND == GS_WIDE4 ? 2 : 1;
    constexpr int stages = wide ? gw_stages(H) : KIND == GS_STAGED ? GS_STAGES_MAX - 1 : GS_STAGES_MAX;
    const size_t smem = wide ? (size_t)stages * GW_STAGE_BYTES + GW_TILE_BYTES / H + 8 * (2 * stages + 2) + GW_BN * 2 + 1024
                             : (size_t)stages * GS_STAGE_BYTES + (KIND == GS_STAGED ? 2 * GS_OUT_BYTES : 0) +
                                   8 * (2 * stages + 4) + 1024;
    auto kernel = gs_kernel_of<MODE, BIAS, CL, KIND>();
    if (cudaFuncSetAttribute((const void *)kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem) !=
        cudaSuccess) {
        (void)cudaGetLastError();
        return 2;
    }
    cudaLaunchAttribute at[1];
    at[0].id = cudaLaunchAttributeClusterDimension;
    at[0].val.clusterDim.x = CL;
    at[0].val.clusterDim.y = 1;
    at[0].val.clusterDim.z = 1;
    cudaLaunchConfig_t cfg = {};
    cfg.blockDim = dim3(wide ? GW_NT : GS_NT);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = st;
    cfg.attrs = at;
    cfg.numAttrs = 1;
    // as many clusters as can run at once (a multiprocessor left over in a GPC of odd count idles)
    static int clusters;
    if (clusters <= 0) {
        cfg.gridDim = dim3((unsigned)(f9_sm_count() / CL * CL));
        if (CL == 1 || cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg) != cudaSuccess || clusters <= 0) {
            (void)cudaGetLastError();
            clusters = f9_sm_count() / CL;
        }
    }
    int units = gs_walk<CL, wide ? GW_BN : GS_BN>(M, NN).units, n = units < clusters ? units : clusters;
    cfg.gridDim = dim3((unsigned)(n * CL));
    cudaError_t e;
    if constexpr (wide)
        e = cudaLaunchKernelEx(&cfg, kernel, m.a, m.b, m.out, m.aux, (f9_bf16 *)out, (f9_bf16 *)aux,
                               (const f9_bf16 *)bias, M, K, NN, gs_early_turn());
    else
        e = cudaLaunchKernelEx(&cfg, kernel, m.a, m.b, m.out, m.aux, (f9_bf16 *)out, (f9_bf16 *)aux,
                               (const f9_bf16 *)bias, M, K, NN, gs_early_turn(), colsum);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        return 2;
    }
    return 0;
}

// The kernel: gw_kernel where TPTRAIN_GEMM_SM90_TILE=256 and the output's columns are a multiple
// of 256 (mesh.c checks the value: 128 or 256), else gs_kernel with its epilogue staged through
// shared memory and stored by the copy engine (the default, and TPTRAIN_GEMM_SM90_EPILOGUE=tma) or
// from registers (=registers). The staged one measured 2-12% faster on every shape
// (cuda/PERF_NOTES.md, "The staged epilogue"); gw_kernel's first version ran as fast as it in the
// forward and slower in the input gradient (PERF_NOTES, "The wide tile").
static int gs_kind(int NN) {
    static int staged = -1, wide = -1;
    if (staged < 0) {
        const char *e = getenv("TPTRAIN_GEMM_SM90_EPILOGUE"), *t = getenv("TPTRAIN_GEMM_SM90_TILE"),
                   *w = getenv("TPTRAIN_GEMM_SM90_WIDE_STAGES");
        staged = !(e && strcmp(e, "registers") == 0);
        wide = !(t && strcmp(t, "256") == 0) ? 0 : w && strcmp(w, "4") == 0 ? GS_WIDE4 : GS_WIDE;
    }
    return wide && NN % GW_BN == 0 ? wide : staged ? GS_STAGED : GS_REGISTERS;
}

// Clusters of two where M holds an even number of 128-row tiles, else a block per tile;
// TPTRAIN_GEMM_SM90_CLUSTER=0 (mesh.c checks the value: 0 or 1) always a block per tile, for
// measuring.
template <int MODE, bool BIAS, int KIND>
static int gs_launch_kind(cudaStream_t st, const gs_maps &m, void *out, void *aux, const void *bias, int M, int K,
                          int NN, float *colsum = NULL) {
    static int allowed = -1;
    if (allowed < 0) {
        const char *e = getenv("TPTRAIN_GEMM_SM90_CLUSTER");
        allowed = !(e && strcmp(e, "0") == 0);
    }
    if (allowed && (M / GS_BM) % 2 == 0)
        return gs_launch_cl<MODE, BIAS, 2, KIND>(st, m, out, aux, bias, M, K, NN, colsum);
    return gs_launch_cl<MODE, BIAS, 1, KIND>(st, m, out, aux, bias, M, K, NN, colsum);
}

// colsum: asked of the staged GS_BWD_DGELU kernel; *colsum_rows gets the partial rows it wrote (0
// from the other kinds, which do not sum).
template <int MODE, bool BIAS>
static int gs_launch(cudaStream_t st, const gs_maps &m, void *out, void *aux, const void *bias, int M, int K, int NN,
                     float *colsum = NULL, int *colsum_rows = NULL) {
    if (colsum_rows) *colsum_rows = 0;
    switch (gs_kind(NN)) {
    case GS_WIDE:
        return gs_launch_kind<MODE, BIAS, GS_WIDE>(st, m, out, aux, bias, M, K, NN);
    case GS_WIDE4:
        return gs_launch_kind<MODE, BIAS, GS_WIDE4>(st, m, out, aux, bias, M, K, NN);
    case GS_STAGED:
        if (colsum && colsum_rows) *colsum_rows = M / GS_BM * 4;
        return gs_launch_kind<MODE, BIAS, GS_STAGED>(st, m, out, aux, bias, M, K, NN, colsum_rows ? colsum : NULL);
    default:
        return gs_launch_kind<MODE, BIAS, GS_REGISTERS>(st, m, out, aux, bias, M, K, NN);
    }
}

static bool gs_aligned(const void *const *p, int n) {
    for (int i = 0; i < n; i++)
        if (((uintptr_t)p[i] & 15u) != 0) return false;
    return true;
}

// The two forwards' checks and tensor maps: with pre, the GELU forward (any kind); without, the
// plain one (the staged kernel only).
static int gs_forward(void *stream, void *out, void *pre, const void *inp, const void *w, const void *bias, int N,
                      int IC, int OC) {
    const void *ptrs[5] = {out, pre, inp, w, bias};
    if (N <= 0 || N % GS_BM || OC <= 0 || OC % GS_BN || IC <= 0 || IC % GS_BK || !out || !inp || !w ||
        !gs_aligned(ptrs, 5))
        return 1;
    gs_maps m;
    if (!f9_tensor_map(&m.a, inp, IC, N, 1, IC, GS_BM) || !f9_tensor_map(&m.b, w, IC, OC, 1, IC, 64) ||
        !f9_tensor_map(&m.out, out, OC, N, 1, OC, GS_BM) ||
        (pre && !f9_tensor_map(&m.aux, pre, OC, N, 1, OC, GS_BM)))
        return 1;
    cudaStream_t st = (cudaStream_t)stream;
    if (pre)
        return bias ? gs_launch<GS_FWD_GELU, true>(st, m, out, pre, bias, N, IC, OC)
                    : gs_launch<GS_FWD_GELU, false>(st, m, out, pre, bias, N, IC, OC);
    m.aux = m.out; // not read
    return bias ? gs_launch_kind<GS_FWD_PLAIN, true, GS_STAGED>(st, m, out, NULL, bias, N, IC, OC)
                : gs_launch_kind<GS_FWD_PLAIN, false, GS_STAGED>(st, m, out, NULL, bias, N, IC, OC);
}

extern "C" int gemm_sm90_fwd_gelu(void *stream, void *out, void *pre, const void *inp, const void *w,
                                  const void *bias, int N, int IC, int OC) {
    return pre ? gs_forward(stream, out, pre, inp, w, bias, N, IC, OC) : 1;
}

extern "C" int gemm_sm90_fwd(void *stream, void *out, const void *inp, const void *w, const void *bias, int N,
                             int IC, int OC) {
    return gs_forward(stream, out, NULL, inp, w, bias, N, IC, OC);
}

extern "C" int gemm_sm90_bwd_dgelu(void *stream, void *dinp, const void *dout, const void *w, const void *pre,
                                   float *colsum, int *colsum_rows, int N, int IC, int OC) {
    if (colsum_rows) *colsum_rows = 0;
    const void *ptrs[4] = {dinp, dout, w, pre};
    if (N <= 0 || N % GS_BM || IC <= 0 || IC % GS_BN || OC <= 0 || OC % GS_BK || !dinp || !dout || !w || !pre ||
        !gs_aligned(ptrs, 4))
        return 1;
    gs_maps m;
    if (!f9_tensor_map(&m.a, dout, OC, N, 1, OC, GS_BM) || !f9_tensor_map(&m.b, w, IC, OC, 1, IC, GS_BK) ||
        !f9_tensor_map(&m.out, dinp, IC, N, 1, IC, GS_BM) || !f9_tensor_map(&m.aux, pre, IC, N, 1, IC, GS_BM))
        return 1;
    return gs_launch<GS_BWD_DGELU, false>((cudaStream_t)stream, m, dinp, (void *)pre, NULL, N, OC, IC, colsum,
                                          colsum_rows);
}
