// gemm_sm90.cu: a Hopper (sm_90a) matrix product for a linear layer's forward with the bias + GELU
// epilogue: out (N, OC) = gelu(pre), pre (N, OC) = inp (N, IC) @ w (OC, IC)^T + bias (OC). gemm.cu
// runs it in place of cuBLASLt's GELU_AUX_BIAS epilogue where TPTRAIN_GEMM_SM90=1 (off by default:
// built to be measured against cuBLASLt, whose epilogue product takes 0.154 ms at GPT-2 124M's fc
// shape where the same product without the epilogue takes 0.107, cuda/PERF_NOTES.md).
//
// Both operands are K-major, the pattern of the attention's S = Q K^T, so the pieces are the
// attention kernels' (sm90_common.cuh). Persistent: a block per multiprocessor walks 128 x 128
// output tiles (tile t + k * blocks for block t, N tiles of a row of the output first, so the
// blocks running at once share inp's rows and all of w in L2). Three warpgroups: a producer whose
// one thread brings 128 x 64 tiles of inp and w by the copy engine into GS_STAGES stages, each
// completing on its "full" mbarrier; two consumers that take the block's tiles in turn (ping-pong,
// as CUTLASS's ping-pong kernel does): consumer c computes tiles j = c, c + 2, ... of its block
// with wgmma m64n128k16 (two per 16 columns of K, one per 64-row half), releasing each stage (its
// "empty" mbarrier) once the products reading it are done, and then runs the epilogue (bias, GELU,
// stores) while the other consumer's products run. The mainloops run in strict turn (named
// barriers 1 and 2), so the stages are consumed in the order the producer filled them and no
// consumer waits on a barrier phase two ahead of the one it means.
//
// Shapes: N and OC multiples of 128, IC of 64, operands 16-byte aligned (gemm.cu checks and falls
// back to cuBLASLt otherwise). fp32 accumulation; pre is the rounded sum, out GELU of the unrounded
// one, as cuBLASLt's epilogue computes them.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include "gemm_sm90.h"
#include "sm90_common.cuh"

#define GS_BM 128     // output rows of a tile (two 64-row halves)
#define GS_BN 128     // output columns of a tile (one wgmma's n)
#define GS_BK 64      // K columns of a stage (128 bytes: one swizzle row)
#define GS_STAGES 6   // 32 KB each: inp's 128 x 64 tile, then w's
#define GS_NT 384     // producer, two consumers
#define GS_STAGE_BYTES (2 * GS_BM * GS_BK * 2)
#define GS_GELU_SCALE 0.7978845608028654f // sqrt(2 / pi)

__device__ __forceinline__ static float gs_gelu(float x) {
    float cube = 0.044715f * x * x * x;
    return 0.5f * x * (1.0f + tanhf(GS_GELU_SCALE * (x + cube)));
}

// Keeps the compiler from moving accesses of x across the asynchronous products.
__device__ __forceinline__ static void gs_pin(float (&x)[64]) {
#pragma unroll
    for (int i = 0; i < 64; i++) asm volatile("" : "+f"(x[i])::"memory");
}

// A consumer's tile epilogue: rows m0 + 64 h + 16 warp + g (+ 8), columns n0 + 8 jj + 2 tq (+ 1) of
// pre and out (row stride OC), from the two halves' accumulators in wgmma's m64n128 layout.
template <bool BIAS>
__device__ __forceinline__ static void gs_epilogue(f9_bf16 *out, f9_bf16 *pre, const f9_bf16 *bias,
                                                   const float (&acc)[2][64], int m0, int n0, int OC,
                                                   int warp, int lane) {
    int g = lane >> 2, tq = lane & 3;
    float2 b[16];
#pragma unroll
    for (int jj = 0; jj < 16; jj++)
        b[jj] = BIAS ? __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(bias + n0 + 8 * jj + 2 * tq))
                     : make_float2(0.0f, 0.0f);
#pragma unroll
    for (int h = 0; h < 2; h++)
#pragma unroll
        for (int hr = 0; hr < 2; hr++) {
            size_t row = (size_t)(m0 + 64 * h + 16 * warp + g + 8 * hr);
            f9_bf16 *po = out + row * OC + n0 + 2 * tq, *pp = pre + row * OC + n0 + 2 * tq;
#pragma unroll
            for (int jj = 0; jj < 16; jj++) {
                float v0 = acc[h][4 * jj + 2 * hr] + b[jj].x, v1 = acc[h][4 * jj + 2 * hr + 1] + b[jj].y;
                *reinterpret_cast<uint32_t *>(pp + 8 * jj) = f9_pack(v0, v1);
                *reinterpret_cast<uint32_t *>(po + 8 * jj) = f9_pack(gs_gelu(v0), gs_gelu(v1));
            }
        }
}

template <bool BIAS>
static __global__ void __launch_bounds__(GS_NT, 1)
gs_fwd_gelu_kernel(const __grid_constant__ CUtensorMap ta, const __grid_constant__ CUtensorMap tb,
                   f9_bf16 *out, f9_bf16 *pre, const f9_bf16 *bias, int N, int IC, int OC) {
    extern __shared__ __align__(1024) unsigned char gs_smem[];
    const uint32_t base = (f9_smem_u32(gs_smem) + 1023u) & ~1023u; // stage s at base + s * 32 KB
    const uint32_t full = base + GS_STAGES * GS_STAGE_BYTES;       // GS_STAGES 8-byte mbarriers,
    const uint32_t empty = full + 8 * GS_STAGES;                   // then as many again
    const int tid = (int)threadIdx.x, wg = tid >> 7;
    const int tn = OC / GS_BN, tiles = (N / GS_BM) * tn, nk = IC / GS_BK, G = (int)gridDim.x;
    if (tid == 0) {
        for (int s = 0; s < GS_STAGES; s++) {
            f9_mbar_init(full + 8 * s, 1);
            f9_mbar_init(empty + 8 * s, 128);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    if (wg == 0) { // producer: one thread issues every copy, stage by stage, tile by tile
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
        if (tid == 0) {
            int it = 0;
            for (int t = (int)blockIdx.x; t < tiles; t += G) {
                int m0 = (t / tn) * GS_BM, n0 = (t % tn) * GS_BN;
                for (int kc = 0; kc < nk; kc++, it++) {
                    int s = it % GS_STAGES;
                    // the stage's previous fill (it - GS_STAGES) has been read by its consumer
                    if (it >= GS_STAGES) f9_mbar_wait(empty + 8 * s, (uint32_t)((it / GS_STAGES - 1) & 1));
                    uint32_t sa = base + (uint32_t)s * GS_STAGE_BYTES, sb = sa + GS_BM * GS_BK * 2;
                    f9_mbar_expect_tx(full + 8 * s, GS_STAGE_BYTES);
                    f9_tma_load(sa, &ta, kc * GS_BK, m0, 0, full + 8 * s);
                    f9_tma_load(sb, &tb, kc * GS_BK, n0, 0, full + 8 * s);
                }
            }
        }
        return;
    }

    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
    const int c = wg - 1, warp = (tid >> 5) & 3, lane = tid & 31;
    float acc[2][64];
    int j = 0; // the block's tiles so far
    for (int t = (int)blockIdx.x; t < tiles; t += G, j++) {
        if ((j & 1) != c) continue;
        // this consumer's turn at the tensor cores: the other consumer's mainloop of tile j - 1 is done
        if (j > 0) f9_named_sync(1 + c, 256);
        int it0 = j * nk;
        for (int kc = 0; kc < nk; kc++) {
            int it = it0 + kc, s = it % GS_STAGES;
            f9_mbar_wait(full + 8 * s, (uint32_t)((it / GS_STAGES) & 1));
            uint32_t sa = base + (uint32_t)s * GS_STAGE_BYTES, sb = sa + GS_BM * GS_BK * 2;
            f9_wg_fence();
#pragma unroll
            for (int h = 0; h < 2; h++)
#pragma unroll
                for (int kk = 0; kk < 4; kk++)
                    wg_ss_n128(acc[h], f9_desc(sa + (uint32_t)(h * 64 * 128 + kk * 32), 16, 1024),
                               f9_desc(sb + (uint32_t)(kk * 32), 16, 1024), kc > 0 || kk > 0);
            asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
            if (kc > 0) { // the previous stage's products are done: its consumer releases it
                asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
                f9_mbar_arrive(empty + 8 * ((it - 1) % GS_STAGES));
            }
        }
        asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
        gs_pin(acc[0]);
        gs_pin(acc[1]);
        f9_mbar_arrive(empty + 8 * ((it0 + nk - 1) % GS_STAGES));
        // the other consumer's turn, if the block has a next tile (it is that consumer's)
        if (t + G < tiles) f9_named_arrive(2 - c, 256);
        gs_epilogue<BIAS>(out, pre, bias, acc, (t / tn) * GS_BM, (t % tn) * GS_BN, OC, warp, lane);
    }
}

extern "C" int gemm_sm90_fwd_gelu(void *stream, void *out, void *pre, const void *inp, const void *w,
                                  const void *bias, int N, int IC, int OC) {
    if (N <= 0 || N % GS_BM || OC % GS_BN || IC <= 0 || IC % GS_BK || !out || !pre) return 1;
    const void *ptrs[5] = {out, pre, inp, w, bias};
    for (int i = 0; i < 5; i++)
        if (((uintptr_t)ptrs[i] & 15u) != 0) return 1;
    CUtensorMap ma, mb;
    if (!f9_tensor_map(&ma, inp, IC, N, 1, IC, GS_BM) || !f9_tensor_map(&mb, w, IC, OC, 1, IC, GS_BN)) return 1;
    size_t smem = (size_t)GS_STAGES * GS_STAGE_BYTES + 16 * GS_STAGES + 1024;
    auto kernel = bias ? gs_fwd_gelu_kernel<true> : gs_fwd_gelu_kernel<false>;
    if (cudaFuncSetAttribute((const void *)kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem) !=
        cudaSuccess) {
        (void)cudaGetLastError();
        return 2;
    }
    int tiles = (N / GS_BM) * (OC / GS_BN), blocks = tiles < f9_sm_count() ? tiles : f9_sm_count();
    kernel<<<(unsigned)blocks, GS_NT, smem, (cudaStream_t)stream>>>(
        ma, mb, (f9_bf16 *)out, (f9_bf16 *)pre, (const f9_bf16 *)bias, N, IC, OC);
    return cudaGetLastError() == cudaSuccess ? 0 : 2;
}
