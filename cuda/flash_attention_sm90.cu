// flash_attention_sm90.cu: the Hopper kernels of the fused causal attention (sm_90a only; see
// flash_attention.h for the interface and flash_attention.cu for the portable kernels).
//
// A block owns 128 queries of one head: two warpgroups of 64 rows. Each walks the 128-key tiles up
// to the diagonal: S = Q K^T by warpgroup MMA (wgmma m64n128k16, Q and K both read from shared
// memory through matrix descriptors), the online softmax on the accumulators in registers, then
// O += P V by wgmma with P as the register A operand (the accumulator layout of S is the A
// fragment layout, as with mma.sync) and V read transposed from shared memory. Tiles are brought in
// by cp.async two deep; shared memory written that way is handed to the tensor cores' async proxy
// by fence.proxy.async before the barrier. Q, K and V tiles are stored in wgmma's 128-byte
// swizzled K-major layout: blocks of 64 columns, each a stack of 128-byte rows with 16-byte chunk c
// of row r at c ^ (r % 8), 1024-byte aligned.
//
// The backward has the same shape (see its section). By default one warp-specialised kernel per
// key block computes dk, dv and dq's partial sums, which one producer thread adds up in a fixed
// key-block order with bulk reduce copies (deterministic); two kernels (dq, then dk and dv) stay
// for comparison. The warp-specialised forward, and the backward at short sequences, are
// persistent: a block per multiprocessor walks its share of the work items.
//
// The warp-specialised forward's two consumers ping-pong at head size 128 (FlashAttention-3's
// inter-warpgroup overlap). Not yet here: the softmax of one tile overlapped with the next tile's
// products inside one warpgroup (tried, slower; docs/attention.md).
//
// Sections: constants, device helpers, wgmma wrappers, forward kernel, backward kernels, launchers.
#include <cuda.h> // CUtensorMap and its encoder's types; the encoder is reached through the runtime
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "colsum_finish.cuh"
#include "flash_attention_common.cuh"
#include "flash_attention_sm90.h"
#include "sm90_common.cuh"

// ---- constants

#define F9_ROWS 128 // queries per block: two warpgroups of 64
#define F9_KN 128   // keys per walked tile
#define F9_NT 256   // threads per block
#define F9_LOG2E 1.4426950408889634f
#define F9_LN2 0.6931471805599453f

// ---- device helpers

__device__ __forceinline__ static void f9_cp16(uint32_t dst, const void *src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                 "r"(valid ? 16 : 0)
                 : "memory");
}

__device__ __forceinline__ static void f9_cp_commit(void) {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}

__device__ __forceinline__ static void f9_cp_wait_all(void) {
    asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}

__device__ __forceinline__ static float f9_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// 2^x for x <= 0 (a scaled score less its row's maximum) without the multi-function unit, which
// computes 16 exponentials per cycle per multiprocessor: as many cycles per 128 x 128 tile at head
// size 64 as the tile's products take on the tensor cores. x = n + f with n = round(x) and |f| <=
// 1/2 (adding and removing 1.5 * 2^23 rounds to an integer, which then sits in t's low bits); 2^f
// by a degree-3 polynomial fitted for relative error (at most 7.5e-5, where P is rounded to bf16's
// 2^-9 for the products); 2^n added to its exponent field. About eight FMA-pipe and integer
// instructions. x is clamped to -126, so a masked score (-inf) gives at most 2^-126, not 0: its
// share of a row sum is below fp32's resolution.
__device__ __forceinline__ static float f9_exp2_poly(float x) {
    const float magic = 12582912.0f; // 1.5 * 2^23
    x = fmaxf(x, -126.0f);
    const float t = __fadd_rn(x, magic); // n in the low bits of t's mantissa
    const float f = __fsub_rn(x, __fsub_rn(t, magic));
    const float p = fmaf(fmaf(fmaf(0.0551716154f, f, 0.242611636f), f, 0.693261033f), f, 0.999928044f);
    return __int_as_float(__float_as_int(p) + (int)((unsigned)__float_as_int(t) << 23));
}

// Rows [row0, row0 + ROWS) of one head (rows stride elements apart) into the swizzled K-major
// layout at dst: column block kb (64 columns) at kb * ROWS * 128 bytes; rows at or past T and
// chunks at or past hc (the head's real 8-column chunks) zero-filled.
template <int D, int ROWS>
__device__ __forceinline__ static void f9_load_tile(uint32_t dst, const f9_bf16 *src, size_t stride,
                                                    int row0, int T, int hc) {
    constexpr int CH = D / 8; // chunks per row
    static_assert(ROWS * CH % F9_NT == 0, "tile chunks must divide evenly over the threads");
#pragma unroll
    for (int j = 0; j < ROWS * CH / F9_NT; j++) {
        int i = (int)threadIdx.x + j * F9_NT;
        int r = i / CH, c = i % CH;
        bool ok = row0 + r < T && c < hc;
        uint32_t d = dst + (uint32_t)((c >> 3) * (ROWS * 128) + r * 128 + (((c & 7) ^ (r & 7)) << 4));
        f9_cp16(d, ok ? src + (size_t)(row0 + r) * stride + c * 8 : src, ok);
    }
}

// 64 floats [row0, row0 + 64) of a (T) vector into shared dst; zero past T.
__device__ __forceinline__ static void f9_load_vec(uint32_t dst, const float *src, int row0, int T) {
    int i = (int)threadIdx.x;
    if (i < 64) {
        bool ok = row0 + i < T;
        asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst + 4u * (uint32_t)i),
                     "l"(ok ? src + row0 + i : src), "r"(ok ? 4 : 0)
                     : "memory");
    }
}

// A warpgroup's 64 x D accumulators (this thread's D / 2) times mul as bf16 to rows r0 + g and
// r0 + g + 8 of dst (r0: the warp's first row); rows at or past T, columns at or past HS skipped.
template <int D>
__device__ __forceinline__ static void f9_store_rows(f9_bf16 *dst, size_t stride,
                                                     const float (&acc)[D / 2], const float (&mul)[2],
                                                     int r0, int T, int HS, int lane) {
    int g = lane >> 2, tq = lane & 3;
#pragma unroll
    for (int hr = 0; hr < 2; hr++) {
        int row = r0 + g + 8 * hr;
        if (row >= T) continue;
        f9_bf16 *p = dst + (size_t)row * stride;
#pragma unroll
        for (int j = 0; j < D / 8; j++) {
            int col = 8 * j + 2 * tq;
            if (col < HS)
                *reinterpret_cast<uint32_t *>(p + col) =
                    f9_pack(acc[4 * j + 2 * hr] * mul[hr], acc[4 * j + 2 * hr + 1] * mul[hr]);
        }
    }
}

// f9_store_rows, and the column sums of the warp's 16 rows as stored (bf16), rows at or past T
// left out, into sum_row's HS floats (nothing where the warp has no row before T): each lane adds
// its two rows, the eight row groups then add theirs by shuffles, and the lanes of group 0 write.
template <int D>
__device__ __forceinline__ static void f9_store_rows_sum(f9_bf16 *dst, size_t stride, const float (&acc)[D / 2],
                                                         const float (&mul)[2], int r0, int T, int HS, int lane,
                                                         float *sum_row) {
    f9_store_rows<D>(dst, stride, acc, mul, r0, T, HS, lane);
    if (r0 >= T) return; // the whole warp
    int g = lane >> 2, tq = lane & 3;
    // one pair of columns (8 j + 2 tq, + 1) at a time, so that only two sums are live beside the
    // accumulators (a whole row of them made ptxas serialise the kernel's products at head size 128)
#pragma unroll
    for (int j = 0; j < D / 8; j++) {
        float s0 = 0.0f, s1 = 0.0f;
#pragma unroll
        for (int hr = 0; hr < 2; hr++)
            if (r0 + g + 8 * hr < T) {
                const uint32_t pk = f9_pack(acc[4 * j + 2 * hr] * mul[hr], acc[4 * j + 2 * hr + 1] * mul[hr]);
                const float2 v = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(&pk));
                s0 += v.x;
                s1 += v.y;
            }
#pragma unroll
        for (int x = 4; x < 32; x <<= 1) {
            s0 += __shfl_xor_sync(0xffffffffu, s0, x);
            s1 += __shfl_xor_sync(0xffffffffu, s1, x);
        }
        if (g == 0 && 8 * j + 2 * tq < HS) *reinterpret_cast<float2 *>(sum_row + 8 * j + 2 * tq) = make_float2(s0, s1);
    }
}

// Keeps the compiler from moving accesses of x across the asynchronous products.
template <int N> __device__ __forceinline__ static void f9_pin(float (&x)[N]) {
#pragma unroll
    for (int i = 0; i < N; i++) asm volatile("" : "+f"(x[i])::"memory");
}

// The bf16 A fragment of 16-column chunk kc of a 64-row accumulator (mma.sync's layout).
template <int N>
__device__ __forceinline__ static void f9_afrag16(uint32_t (&a)[4], const float (&x)[N], int kc) {
    a[0] = f9_pack(x[8 * kc + 0], x[8 * kc + 1]);
    a[1] = f9_pack(x[8 * kc + 2], x[8 * kc + 3]);
    a[2] = f9_pack(x[8 * kc + 4], x[8 * kc + 5]);
    a[3] = f9_pack(x[8 * kc + 6], x[8 * kc + 7]);
}

// ---- wgmma wrappers (accumulator operands: F9_ACC_* in sm90_common.cuh, where the
// shared-memory m64n128k16 product wg_ss_n128 is too)

// d (64 x 64 fp32, this thread's 32 values) = (scale_d ? d : 0) + A . B^T, A and B bf16 in
// shared memory (descriptors da, db), K-major, or MN-major where TA / TB is 1 (then d = A . B with
// A stored K x M and B stored K x N).
template <int TA = 0, int TB = 0>
__device__ __forceinline__ static void wg_ss_n64(float (&d)[32], uint64_t da, uint64_t db, int scale_d) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
                 F9_ACC_TEXT32
                 "}, %32, %33, p, 1, 1, %35, %36;\n}\n"
                 : F9_ACC_OUT32(d)
                 : "l"(da), "l"(db), "r"(scale_d), "n"(TA), "n"(TB));
}

// d (64 x 64 fp32) += A . B, A (64 x 16 bf16) in registers as four mma.sync-style fragments,
// B (16 x 64 bf16) MN-major in shared memory (descriptor db, transposed).
__device__ __forceinline__ static void wg_rs_n64(float (&d)[32], const uint32_t (&a)[4], uint64_t db) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
                 F9_ACC_TEXT32
                 "}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
                 : F9_ACC_OUT32(d)
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));
}

// d (64 x 128 fp32) += A . B, A (64 x 16 bf16) in registers as four mma.sync-style fragments,
// B (16 x 128 bf16) MN-major in shared memory (descriptor db, transposed).
__device__ __forceinline__ static void wg_rs_n128(float (&d)[64], const uint32_t (&a)[4], uint64_t db) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
                 F9_ACC_TEXT64
                 "}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
                 : F9_ACC_OUT64(d)
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));
}

template <int D> __device__ __forceinline__ static void f9_pv(float (&o)[D / 2], const uint32_t (&a)[4], uint64_t db);
template <> __device__ __forceinline__ void f9_pv<64>(float (&o)[32], const uint32_t (&a)[4], uint64_t db) {
    wg_rs_n64(o, a, db);
}
template <> __device__ __forceinline__ void f9_pv<128>(float (&o)[64], const uint32_t (&a)[4], uint64_t db) {
    wg_rs_n128(o, a, db);
}

// ---- pieces the kernel variants share (each inlined where it is called)

// The online softmax of one 64 x 128 score tile, in place: masked where a key follows its row
// (mask: the tile reaches past the warp's first query r0; k0: the tile's first key), scores become
// probabilities against the new running maxima m (raw scores; the exponent is prescaled by
// scale_log2); the output o and the row sums l are rescaled to the new maxima. MIXED: a quarter of
// the exponentials (columns 8 j .. 8 j + 7 for j % 4 == 3) by f9_exp2_poly on the FMA pipe, the
// rest by the multi-function unit (TPTRAIN_ATTN_EXP2=mixed).
template <int D, bool MIXED = false>
__device__ __forceinline__ static void f9_softmax(float (&s)[64], float (&o)[D / 2], float (&m)[2],
                                                  float (&l)[2], bool mask, int k0, int r0, int lane,
                                                  float scale_log2) {
    int g = lane >> 2, tq = lane & 3;
    if (mask) {
#pragma unroll
        for (int i = 0; i < 64; i++) {
            int key = k0 + 8 * (i >> 2) + 2 * tq + (i & 1), row = r0 + g + 8 * ((i >> 1) & 1);
            if (key > row) s[i] = -INFINITY;
        }
    }
#pragma unroll
    for (int hr = 0; hr < 2; hr++) {
        float mx = -INFINITY;
#pragma unroll
        for (int j = 0; j < 16; j++) mx = fmaxf(mx, fmaxf(s[4 * j + 2 * hr], s[4 * j + 2 * hr + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        float m_new = fmaxf(m[hr], mx);
        float m_use = m_new == -INFINITY ? 0.0f : m_new; // a row with no visible key yet
        float alpha = f9_exp2((m[hr] - m_use) * scale_log2);
        float ms = m_use * scale_log2;
        m[hr] = m_new;
        float sum = 0.0f;
#pragma unroll
        for (int j = 0; j < 16; j++) {
            const float x0 = fmaf(s[4 * j + 2 * hr], scale_log2, -ms);
            const float x1 = fmaf(s[4 * j + 2 * hr + 1], scale_log2, -ms);
            const bool poly = MIXED && (j & 3) == 3;
            float p0 = poly ? f9_exp2_poly(x0) : f9_exp2(x0);
            float p1 = poly ? f9_exp2_poly(x1) : f9_exp2(x1);
            s[4 * j + 2 * hr] = p0;
            s[4 * j + 2 * hr + 1] = p1;
            sum += p0 + p1;
        }
#pragma unroll
        for (int j = 0; j < D / 8; j++) {
            o[4 * j + 2 * hr] *= alpha;
            o[4 * j + 2 * hr + 1] *= alpha;
        }
        l[hr] = l[hr] * alpha + sum;
    }
}

// The forward's end: normalised output rows and their log-sum-exp (natural log) before T.
template <int D>
__device__ __forceinline__ static void f9_fwd_epilogue(f9_bf16 *out, size_t out_stride, float *lse_h,
                                                       const float (&o)[D / 2], const float (&m)[2],
                                                       const float (&l)[2], int r0, int T, int HS,
                                                       int lane, float scale_log2) {
    int g = lane >> 2, tq = lane & 3;
    float inv[2];
#pragma unroll
    for (int hr = 0; hr < 2; hr++) {
        float lt = l[hr];
        lt += __shfl_xor_sync(0xffffffffu, lt, 1);
        lt += __shfl_xor_sync(0xffffffffu, lt, 2);
        inv[hr] = lt > 0.0f ? 1.0f / lt : 0.0f;
        int row = r0 + g + 8 * hr;
        if (tq == 0 && row < T) lse_h[row] = (m[hr] * scale_log2 + __log2f(lt)) * F9_LN2;
    }
    f9_store_rows<D>(out, out_stride, o, inv, r0, T, HS, lane);
}

// Issues S (64 x 128) = Q K^T over the head's columns, 16 at a time (qdesc: the warpgroup's Q
// rows; sKs: the K stage).
template <int D>
__device__ __forceinline__ static void f9_scores(float (&s)[64], uint64_t qdesc, uint32_t sKs) {
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) {
        uint32_t off = (uint32_t)((kk >> 2) * (F9_ROWS * 128) + (kk & 3) * 32);
        wg_ss_n128(s, qdesc + (off >> 4), f9_desc(sKs + off, 16, 1024), kk > 0);
    }
}

// Issues O += P V, 16 keys at a time (pa: P's A fragments; sVs: the V stage, read transposed).
template <int D>
__device__ __forceinline__ static void f9_pv_tile(float (&o)[D / 2], const uint32_t (&pa)[F9_KN / 16][4],
                                                  uint32_t sVs) {
#pragma unroll
    for (int kc = 0; kc < F9_KN / 16; kc++)
        f9_pv<D>(o, pa[kc], f9_desc(sVs + (uint32_t)kc * 16 * 128, F9_ROWS * 128, 1024));
}

// ---- kernel

// grid (B*NH, ceil(T/128)), 256 threads. Accumulator element i of a thread: n-tile i / 4 (8
// columns), row g + 8 * ((i / 2) % 2) of the warp's 16, column 8 * (i / 4) + 2 * tq + i % 2.
template <int D>
static __global__ void __launch_bounds__(F9_NT, 1)
f9_fwd_kernel(f9_bf16 *out, float *lse, const f9_bf16 *q, const f9_bf16 *k, const f9_bf16 *v,
              int T, int NH, int HS, size_t qkv_stride, size_t out_stride, float scale_log2) {
    // out (B, T, NH, HS) row stride out_stride; lse (B, NH, T); q, k, v (B, T, NH, HS) row
    // stride qkv_stride
    constexpr int TILEB = F9_ROWS * D * 2; // bytes of one 128-row tile
    extern __shared__ __align__(1024) unsigned char f9_smem[];
    const uint32_t base = (f9_smem_u32(f9_smem) + 1023u) & ~1023u;
    const uint32_t sQ = base, sK = sQ + TILEB, sV = sK + 2 * TILEB; // K, V: two stages each

    int qt = (int)gridDim.y - 1 - (int)blockIdx.y;
    int bh = (int)blockIdx.x, b = bh / NH, h = bh % NH;
    int tid = (int)threadIdx.x, wg = tid >> 7, warp4 = (tid >> 5) & 3, lane = tid & 31;
    int hc = HS / 8;
    size_t head_off = (size_t)b * T * qkv_stride + (size_t)h * HS;
    const f9_bf16 *kh = k + head_off, *vh = v + head_off;
    int q0 = qt * F9_ROWS;
    int nkt = (min(q0 + F9_ROWS, T) - 1) / F9_KN + 1;
    int r0 = q0 + wg * 64 + warp4 * 16; // this warp's first query

    f9_load_tile<D, F9_ROWS>(sQ, q + head_off, qkv_stride, q0, T, hc);
    f9_load_tile<D, F9_ROWS>(sK, kh, qkv_stride, 0, T, hc);
    f9_load_tile<D, F9_ROWS>(sV, vh, qkv_stride, 0, T, hc);
    f9_cp_commit();

    float o[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; i++) o[i] = 0.0f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};

    for (int kt = 0; kt < nkt; kt++) {
        f9_cp_wait_all();
        f9_fence_async();
        __syncthreads(); // tile kt visible to every thread and to wgmma; tile kt - 1 released
        if (kt + 1 < nkt) {
            uint32_t nb = (uint32_t)((kt + 1) & 1) * TILEB;
            f9_load_tile<D, F9_ROWS>(sK + nb, kh, qkv_stride, (kt + 1) * F9_KN, T, hc);
            f9_load_tile<D, F9_ROWS>(sV + nb, vh, qkv_stride, (kt + 1) * F9_KN, T, hc);
            f9_cp_commit();
        }
        int k0 = kt * F9_KN;
        uint32_t cb = (uint32_t)(kt & 1) * TILEB;

        // S (64 x 128) = Q K^T over the head's columns, 16 at a time
        float s[64];
        f9_wg_fence();
        f9_scores<D>(s, f9_desc(sQ + (uint32_t)wg * 64 * 128, 16, 1024), sK + cb);
        f9_wg_commit_wait();
        f9_pin(s);

        // masked only where the tile reaches past this warp's first query
        f9_softmax<D>(s, o, m, l, k0 + F9_KN - 1 > r0, k0, r0, lane, scale_log2);

        // O += P V, 16 keys at a time; P's accumulator pairs are the A fragments
        uint32_t pa[F9_KN / 16][4]; // P as bf16 A fragments, all packed before the products
#pragma unroll
        for (int kc = 0; kc < F9_KN / 16; kc++) f9_afrag16(pa[kc], s, kc);
        f9_pin(o);
        f9_wg_fence();
        f9_pv_tile<D>(o, pa, sV + cb);
        f9_wg_commit_wait();
        f9_pin(o);
    }

    // normalise; out and the log-sum-exp (natural log) of the rows before T
    f9_fwd_epilogue<D>(out + (size_t)b * T * out_stride + (size_t)h * HS, out_stride, lse + (size_t)bh * T,
                       o, m, l, r0, T, HS, lane, scale_log2);
}


// ---- forward, warp-specialised (head sizes 64 and 128 exactly)
//
// Three warpgroups: the first is the producer (one thread issues the tensor-memory-accelerator
// copies of the Q tile and of each K and V tile, each completing on its own mbarrier with the
// bytes it carries), the other two are consumers of 64 queries each, as in f9_fwd_kernel but with
// no block-wide barrier: a consumer waits on the tile's "full" barrier and, once its products
// have read the tile, arrives on the stage's "empty" barrier, which the producer waits on before
// it refills the stage. The producer gives its registers to the consumers (setmaxnreg). Rows past
// T come in as zeros from the copy engine (the tensor map's row extent is T).

#define F9_WS_NT 384

// With PP (the default), the two consumers ping-pong, as FlashAttention-3 does: a consumer's turn
// issues the output product of its previous tile and the scores of its current one back to back,
// then hands the turn to the other consumer (named barriers 1 and 2) and runs its softmax while
// the other's products occupy the tensor cores. A tile's K is released once its scores are done
// and its V one turn later, so each has two turns to come in.
// The item a persistent block (one of G) takes in round k: rounds alternate direction (block j
// takes the j-th item of even rounds, the j-th from the end of odd ones), so that with items
// ordered longest first every block's total is close to the mean.
__device__ __forceinline__ static int f9_item(int k, int G) {
    return k * G + ((k & 1) ? G - 1 - (int)blockIdx.x : (int)blockIdx.x);
}

// The k-th item of this block (one of G) over BH heads of n tiles each, where tile n - 1 (LONG_HIGH)
// or tile 0 is the longest: 1 with its tile and head, 0 for a place to skip, -1 past the last.
// Without PAIRED: item w = f9_item's is tile (n - 1 -) w / BH of head w % BH, the longest first
// across heads, so the blocks running at once hold different heads and each reads its own operands.
// PAIRED: unit u = (k / 2) * G + block is pair p = u % P of head u / P (P = ceil(n / 2)): the p-th
// longest tile, then the p-th shortest (nothing for the middle one of an odd count), so every unit
// is as long as any other and the blocks running at once hold the pairs of a few heads, whose
// operands they read from L2 rather than each from memory. The forward walks query tiles (the last
// is the longest), the backward key blocks (the first is).
template <bool PAIRED, bool LONG_HIGH>
__device__ __forceinline__ static int f9_walk(int k, int G, int n, int BH, int items, int *tile, int *bh) {
    if constexpr (!PAIRED) {
        int w = f9_item(k, G);
        if (w >= items) return -1;
        *tile = LONG_HIGH ? n - 1 - w / BH : w / BH;
        *bh = w % BH;
        return 1;
    } else {
        int P = (n + 1) / 2, u = (k >> 1) * G + (int)blockIdx.x;
        if (u >= BH * P) return -1;
        int p = u % P, longer = LONG_HIGH ? n - 1 - p : p;
        *bh = u / P;
        *tile = (k & 1) ? n - 1 - longer : longer;
        return (k & 1) && p == n - 1 - p ? 0 : 1;
    }
}

// An operand a persistent block loads once per item, held in `stages` stages (1 or 2): item i's
// stage, and which fill of that stage it is (the phase its barriers are at).
__device__ __forceinline__ static int f9_item_stage(int i, int stages) { return stages == 2 ? i & 1 : 0; }
__device__ __forceinline__ static int f9_item_fill(int i, int stages) { return stages == 2 ? i >> 1 : i; }

// Whether this block has a forward item after its k-th (f9_walk).
template <bool PAIRS>
__device__ __forceinline__ static bool f9_fwd_more(int k, int G, int nqt, int BH, int items) {
    int qt, bh;
    for (int j = k + 1;; j++) {
        int r = f9_walk<PAIRS, true>(j, G, nqt, BH, items, &qt, &bh);
        if (r != 0) return r > 0;
    }
}

template <int D, bool PP, bool PAIRS, bool MIXED>
static __global__ void __launch_bounds__(F9_WS_NT, 1)
f9_fwd_ws_kernel(const __grid_constant__ CUtensorMap tmq, const __grid_constant__ CUtensorMap tmk,
                 const __grid_constant__ CUtensorMap tmv, f9_bf16 *out, float *lse, int T, int NH, int BH,
                 size_t out_stride, float scale_log2, int qstages) {
    constexpr int TILEB = F9_ROWS * D * 2; // a 128-row tile
    extern __shared__ __align__(1024) unsigned char f9_smem[];
    const uint32_t base = (f9_smem_u32(f9_smem) + 1023u) & ~1023u;
    const uint32_t sQ = base, sK = sQ + (uint32_t)qstages * TILEB, sV = sK + 2 * TILEB; // Q: qstages stages;
    const uint32_t bars = sV + 2 * TILEB; // K, V: two each; then 8-byte mbarriers, two of each:
    const uint32_t q_full = bars, k_full = bars + 16, v_full = bars + 32, k_empty = bars + 48,
                   v_empty = bars + 64, q_empty = bars + 80;

    int tid = (int)threadIdx.x, wg = tid >> 7;
    const int nqt = (T + F9_ROWS - 1) / F9_ROWS, items = BH * nqt; // (PAIRS: items is not the count)
    if (tid == 0) {
        for (int st = 0; st < 2; st++) {
            f9_mbar_init(q_full + 8 * st, 1);
            f9_mbar_init(q_empty + 8 * st, 2 * 128);
            f9_mbar_init(k_full + 8 * st, 1);
            f9_mbar_init(v_full + 8 * st, 1);
            f9_mbar_init(k_empty + 8 * st, 2 * 128);
            f9_mbar_init(v_empty + 8 * st, 2 * 128);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    // Persistent: a block per multiprocessor, taking the (head, query tile) items f9_walk gives
    // it. K and V stages are counted across items (g), so the producer brings in the next item's Q,
    // K and V while the consumers finish the current one. Q: one stage (qstages 1), refilled once
    // the item's last scores are done, or two (item i in stage i % 2), so that the next item's Q is
    // issued right after the current item's last K and V rather than under its last products.
    if (wg == 0) { // producer
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
        if (tid == 0) {
            int g = 0, i = 0;
            for (int k = 0;; k++, i += !PAIRS) { // i: the items taken (PAIRS: counted at the end, past the holes)
                int qt, bh, got = f9_walk<PAIRS, true>(k, (int)gridDim.x, nqt, BH, items, &qt, &bh);
                if (got < 0) break;
                if (got == 0) continue;
                int b = bh / NH, col = (bh % NH) * D;
                int q0 = qt * F9_ROWS, nkt = (min(q0 + F9_ROWS, T) - 1) / F9_KN + 1;
                const int qs = f9_item_stage(i, qstages), qn = f9_item_fill(i, qstages);
                const uint32_t qf = q_full + 8 * qs;
                if (qn >= 1) f9_mbar_wait(q_empty + 8 * qs, (uint32_t)(qn - 1) & 1u); // its last item's scores are done
                f9_mbar_expect_tx(qf, TILEB);
#pragma unroll
                for (int kb = 0; kb < D / 64; kb++)
                    f9_tma_load(sQ + qs * TILEB + kb * F9_ROWS * 128, &tmq, col + 64 * kb, q0, b, qf);
                for (int kt = 0; kt < nkt; kt++, g++) {
                    int st = g & 1;
                    uint32_t kf = k_full + 8 * st, vf = v_full + 8 * st;
                    if (g >= 2) f9_mbar_wait(k_empty + 8 * st, ((g >> 1) - 1) & 1);
                    f9_mbar_expect_tx(kf, TILEB);
#pragma unroll
                    for (int kb = 0; kb < D / 64; kb++)
                        f9_tma_load(sK + st * TILEB + kb * F9_ROWS * 128, &tmk, col + 64 * kb, kt * F9_KN, b, kf);
                    if (g >= 2) f9_mbar_wait(v_empty + 8 * st, ((g >> 1) - 1) & 1);
                    f9_mbar_expect_tx(vf, TILEB);
#pragma unroll
                    for (int kb = 0; kb < D / 64; kb++)
                        f9_tma_load(sV + st * TILEB + kb * F9_ROWS * 128, &tmv, col + 64 * kb, kt * F9_KN, b, vf);
                }
                if constexpr (PAIRS) i++;
            }
        }
        return;
    }

    // consumers
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
    int cw = wg - 1, warp4 = (tid >> 5) & 3, lane = tid & 31;
    const int mine = 1 + cw, other = 2 - cw; // the ping-pong's named barriers
    if (PP && cw == 1) f9_named_arrive(1, 256); // consumer 0 takes the first turn
    int g = 0, i = 0;
    for (int k = 0;; k++, i += !PAIRS) {
        int qt, bh, got = f9_walk<PAIRS, true>(k, (int)gridDim.x, nqt, BH, items, &qt, &bh);
        if (got < 0) break;
        if (got == 0) continue;
        int b = bh / NH, h = bh % NH;
        int q0 = qt * F9_ROWS, nkt = (min(q0 + F9_ROWS, T) - 1) / F9_KN + 1;
        bool more = f9_fwd_more<PAIRS>(k, (int)gridDim.x, nqt, BH, items);
        int r0 = q0 + cw * 64 + warp4 * 16; // this warp's first query
        float o[D / 2];
#pragma unroll
        for (int j = 0; j < D / 2; j++) o[j] = 0.0f;
        float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
        const int qs = f9_item_stage(i, qstages), qn = f9_item_fill(i, qstages);
        const uint32_t q_done = q_empty + 8 * qs; // arrived on once the item's last scores are done
        const uint64_t qdesc = f9_desc(sQ + (uint32_t)qs * TILEB + (uint32_t)cw * 64 * 128, 16, 1024);
        f9_mbar_wait(q_full + 8 * qs, (uint32_t)qn & 1u);

        if constexpr (PP) {
            // turns: scores of tile 0; then the product of tile kt - 1 with the scores of tile kt;
            // then the product of the last tile (the loop is peeled so that no product sits under a
            // branch). Consumer 1's last turn of an item hands the first turn of the next to consumer 0.
            uint32_t pa[F9_KN / 16][4]; // P of the previous tile as bf16 A fragments
            float s[64];
            f9_mbar_wait(k_full + 8 * (g & 1), (uint32_t)(g >> 1) & 1u);
            f9_named_sync(mine, 256);
            f9_wg_fence();
            f9_scores<D>(s, qdesc, sK + (uint32_t)(g & 1) * TILEB);
            asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
            f9_named_arrive(other, 256);
            asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
            f9_pin(s);
            f9_mbar_arrive(k_empty + 8 * (g & 1));
            if (nkt == 1) f9_mbar_arrive(q_done);
            f9_softmax<D, MIXED>(s, o, m, l, F9_KN - 1 > r0, 0, r0, lane, scale_log2);
#pragma unroll
            for (int kc = 0; kc < F9_KN / 16; kc++) f9_afrag16(pa[kc], s, kc);
            for (int kt = 1; kt < nkt; kt++) {
                int gt = g + kt, st = gt & 1, pst = st ^ 1;
                f9_mbar_wait(k_full + 8 * st, (uint32_t)(gt >> 1) & 1u);
                f9_mbar_wait(v_full + 8 * pst, (uint32_t)((gt - 1) >> 1) & 1u);
                f9_named_sync(mine, 256);
                f9_pin(o);
                f9_wg_fence();
                f9_pv_tile<D>(o, pa, sV + (uint32_t)pst * TILEB);
                f9_scores<D>(s, qdesc, sK + (uint32_t)st * TILEB);
                asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
                f9_named_arrive(other, 256);
                asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
                f9_pin(o);
                f9_pin(s);
                f9_mbar_arrive(v_empty + 8 * pst);
                f9_mbar_arrive(k_empty + 8 * st);
                if (kt == nkt - 1) f9_mbar_arrive(q_done);
                int k0 = kt * F9_KN;
                f9_softmax<D, MIXED>(s, o, m, l, k0 + F9_KN - 1 > r0, k0, r0, lane, scale_log2);
#pragma unroll
                for (int kc = 0; kc < F9_KN / 16; kc++) f9_afrag16(pa[kc], s, kc);
            }
            int gl = g + nkt - 1, pst = gl & 1;
            f9_mbar_wait(v_full + 8 * pst, (uint32_t)(gl >> 1) & 1u);
            f9_named_sync(mine, 256);
            f9_pin(o);
            f9_wg_fence();
            f9_pv_tile<D>(o, pa, sV + (uint32_t)pst * TILEB);
            asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
            if (cw == 0 || more) f9_named_arrive(other, 256); // the other consumer's next turn
            asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
            f9_pin(o);
            f9_mbar_arrive(v_empty + 8 * pst);
        } else {
            for (int kt = 0; kt < nkt; kt++) {
                int gt = g + kt, st = gt & 1;
                uint32_t ph = (uint32_t)(gt >> 1) & 1u, cb = (uint32_t)st * TILEB;
                int k0 = kt * F9_KN;
                f9_mbar_wait(k_full + 8 * st, ph);
                float s[64];
                f9_wg_fence();
                f9_scores<D>(s, qdesc, sK + cb);
                f9_wg_commit_wait();
                f9_pin(s);
                f9_mbar_arrive(k_empty + 8 * st);
                if (kt == nkt - 1) f9_mbar_arrive(q_done);
                f9_softmax<D, MIXED>(s, o, m, l, k0 + F9_KN - 1 > r0, k0, r0, lane, scale_log2);
                f9_mbar_wait(v_full + 8 * st, ph);
                uint32_t pa[F9_KN / 16][4]; // P as bf16 A fragments, all packed before the products
#pragma unroll
                for (int kc = 0; kc < F9_KN / 16; kc++) f9_afrag16(pa[kc], s, kc);
                f9_pin(o);
                f9_wg_fence();
                f9_pv_tile<D>(o, pa, sV + cb);
                f9_wg_commit_wait();
                f9_pin(o);
                f9_mbar_arrive(v_empty + 8 * st); // this thread's reads of stage st are done
            }
        }
        g += nkt;
        f9_fwd_epilogue<D>(out + (size_t)b * T * out_stride + (size_t)h * D, out_stride, lse + (size_t)bh * T,
                           o, m, l, r0, T, D, lane, scale_log2);
        if constexpr (PAIRS) i++;
    }
}

// ---- backward kernels
//
// Deterministic, as the portable backward: the dq kernel (a block per 128 queries walking 64-key
// tiles) also writes D = rowsum(dout * out); the dk/dv kernel (a block per 128 keys walking
// 64-query tiles) reads it. Both recompute P from q, k and the log-sum-exp. Per warpgroup of 64
// rows: two m64n64 products from shared memory (S and dP, or their transposes), the elementwise
// step on the accumulators, then the register-A products into the D-wide gradients.

#define F9_BT 64 // rows of the walked tiles in the backward

// Descriptors of a K-major operand at 16-column step kk of a [kb][ROWS][64] tile whose warpgroup
// rows start at byte row_off.
template <int ROWS>
__device__ __forceinline__ static uint64_t f9_kdesc(uint32_t tile, int kk, uint32_t row_off) {
    return f9_desc(tile + (uint32_t)((kk >> 2) * (ROWS * 128) + (kk & 3) * 32) + row_off, 16, 1024);
}

// Descriptor of an MN-major (transposed) operand: rows [16 kc, 16 kc + 16) of a [kb][ROWS][64]
// tile, all its columns.
template <int ROWS>
__device__ __forceinline__ static uint64_t f9_tdesc(uint32_t tile, int kc) {
    return f9_desc(tile + (uint32_t)kc * 16 * 128, ROWS * 128, 1024);
}

// One 64-key tile of dq for a warpgroup's 64 queries (its rows at byte ro of the 128-row Q and dO
// tiles): S = Q K^T and dP = dO V^T from shared memory, dS = P (dP - D) with P rebuilt from the
// log-sum-exp (lrow, log2 units) and masked past each row, then dQ += dS K.
template <int D>
__device__ __forceinline__ static void f9_dq_tile(float (&acc)[D / 2], uint32_t sQ, uint32_t sdO, uint32_t ro,
                                                  uint32_t kb, uint32_t vb, int k0, int r0, const float (&lrow)[2],
                                                  const float (&drow)[2], int lane, float scale_log2) {
    int g = lane >> 2, tq = lane & 3;
    float s[32], dp[32];
    f9_wg_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) {
        wg_ss_n64(s, f9_kdesc<F9_ROWS>(sQ, kk, ro), f9_kdesc<F9_BT>(kb, kk, 0), kk > 0);
        wg_ss_n64(dp, f9_kdesc<F9_ROWS>(sdO, kk, ro), f9_kdesc<F9_BT>(vb, kk, 0), kk > 0);
    }
    f9_wg_commit_wait();
    f9_pin(s);
    f9_pin(dp);
#pragma unroll
    for (int i = 0; i < 32; i++) {
        int hr = (i >> 1) & 1;
        int key = k0 + 8 * (i >> 2) + 2 * tq + (i & 1), row = r0 + g + 8 * hr;
        float p = f9_exp2(fmaf(s[i], scale_log2, -lrow[hr]));
        if (key > row) p = 0.0f;
        s[i] = p * (dp[i] - drow[hr]); // dS
    }
    uint32_t sa[F9_BT / 16][4];
#pragma unroll
    for (int kc = 0; kc < F9_BT / 16; kc++) f9_afrag16(sa[kc], s, kc);
    f9_pin(acc);
    f9_wg_fence();
#pragma unroll
    for (int kc = 0; kc < F9_BT / 16; kc++) f9_pv<D>(acc, sa[kc], f9_tdesc<F9_BT>(kb, kc));
    f9_wg_commit_wait();
    f9_pin(acc);
}

// This thread's words of a warpgroup's dS^T fragments f (bf16 pairs, f9_afrag16's layout) into
// the swizzled 128-key x 64-query tile at sS, the warpgroup's rows from byte ro (rk0: the warp's
// first key). Word w of chunk kc: key row g (+8 for w odd), queries 16 kc + 8 (w / 2) + 2 tq.
__device__ __forceinline__ static void f9_store_ds(uint32_t sS, uint32_t ro, int rk0, int lane,
                                                   const uint32_t (&f)[F9_BT / 16][4]) {
    int row = (int)(ro >> 7) + ((rk0 >> 4) & 3) * 16 + (lane >> 2), tq = lane & 3;
#pragma unroll
    for (int kc = 0; kc < F9_BT / 16; kc++)
#pragma unroll
        for (int w = 0; w < 4; w++) {
            int rr = row + 8 * (w & 1), chunk = 2 * kc + (w >> 1);
            uint32_t a = sS + (uint32_t)(rr * 128 + ((chunk ^ (rr & 7)) << 4) + 4 * tq);
            asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(a), "r"(f[kc][w]) : "memory");
        }
}

// One 64-query tile of dk, dv for a warpgroup's 64 keys (rows at byte ro of the 128-row K and V
// tiles; rk0: the warp's first key): S^T = K Q^T and dP^T = V dO^T, P^T from the tile's
// log-sum-exp Lt (natural log) masked where a query precedes its key or passes T, dS^T = P^T
// (dP^T - Dt), then dV += P^T dO and dK += dS^T Q. With DS (the one-kernel backward) dS^T is also
// stored as bf16 into the swizzled 128-key x 64-query tile at sS (this warpgroup's rows from byte
// ro), and the products are committed but not waited for.
template <int D, bool DS = false>
__device__ __forceinline__ static void f9_dkdv_tile(float (&dka)[D / 2], float (&dva)[D / 2], uint32_t sK,
                                                    uint32_t sV, uint32_t ro, uint32_t qb, uint32_t db,
                                                    const float *Lt, const float *Dt, int q0, int rk0, int T,
                                                    int lane, float scale_log2, uint32_t sS = 0) {
    int g = lane >> 2, tq = lane & 3;
    float st[32], dpt[32]; // S^T and dP^T: 64 keys x 64 queries
    f9_wg_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) {
        wg_ss_n64(st, f9_kdesc<F9_ROWS>(sK, kk, ro), f9_kdesc<F9_BT>(qb, kk, 0), kk > 0);
        wg_ss_n64(dpt, f9_kdesc<F9_ROWS>(sV, kk, ro), f9_kdesc<F9_BT>(db, kk, 0), kk > 0);
    }
    f9_wg_commit_wait();
    f9_pin(st);
    f9_pin(dpt);
#pragma unroll
    for (int i = 0; i < 32; i++) {
        int col = 8 * (i >> 2) + 2 * tq + (i & 1);
        int key = rk0 + g + 8 * ((i >> 1) & 1), query = q0 + col;
        float p = f9_exp2(fmaf(st[i], scale_log2, -Lt[col] * F9_LOG2E));
        if (query < key || query >= T) p = 0.0f;
        st[i] = p;
        dpt[i] = p * (dpt[i] - Dt[col]); // dS^T
    }
    // P^T's fragments, the dV products, then dS^T's fragments behind a second fence (fewer live
    // registers than packing both first) and the dK products, all in one group
    uint32_t fa[F9_BT / 16][4];
#pragma unroll
    for (int kc = 0; kc < F9_BT / 16; kc++) f9_afrag16(fa[kc], st, kc);
    f9_pin(dka);
    f9_pin(dva);
    f9_wg_fence();
#pragma unroll
    for (int kc = 0; kc < F9_BT / 16; kc++) f9_pv<D>(dva, fa[kc], f9_tdesc<F9_BT>(db, kc));
    uint32_t fb[F9_BT / 16][4];
#pragma unroll
    for (int kc = 0; kc < F9_BT / 16; kc++) f9_afrag16(fb[kc], dpt, kc);
    f9_wg_fence();
#pragma unroll
    for (int kc = 0; kc < F9_BT / 16; kc++) f9_pv<D>(dka, fb[kc], f9_tdesc<F9_BT>(qb, kc));
    if constexpr (DS) {
        asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
        f9_store_ds(sS, ro, rk0, lane, fb);
        return;
    }
    f9_wg_commit_wait();
    f9_pin(dka);
    f9_pin(dva);
}

// dq and D: grid (B*NH, ceil(T/128)), 256 threads.
template <int D>
static __global__ void __launch_bounds__(F9_NT, 1)
f9_bwd_dq_kernel(f9_bf16 *dq, float *Dv, const f9_bf16 *dout, const f9_bf16 *out,
                 const f9_bf16 *q, const f9_bf16 *k, const f9_bf16 *v, const float *lse, int T,
                 int NH, int HS, size_t qkv_stride, size_t out_stride, float scale,
                 float scale_log2) {
    // dq, q, k, v (B, T, NH, HS) row stride qkv_stride; dout, out row stride out_stride;
    // lse, Dv (B, NH, T)
    constexpr int QB = F9_ROWS * D * 2, KB = F9_BT * D * 2; // bytes of a query / key tile
    extern __shared__ __align__(1024) unsigned char f9_smem[];
    const uint32_t base = (f9_smem_u32(f9_smem) + 1023u) & ~1023u;
    const uint32_t sQ = base, sdO = sQ + QB, sK = sdO + QB, sV = sK + 2 * KB; // K, V: two stages

    int qt = (int)gridDim.y - 1 - (int)blockIdx.y;
    int bh = (int)blockIdx.x, b = bh / NH, h = bh % NH;
    int tid = (int)threadIdx.x, wg = tid >> 7, warp4 = (tid >> 5) & 3, lane = tid & 31;
    int hc = HS / 8;
    size_t head_off = (size_t)b * T * qkv_stride + (size_t)h * HS;
    size_t dout_off = (size_t)b * T * out_stride + (size_t)h * HS;
    const f9_bf16 *kh = k + head_off, *vh = v + head_off;
    int q0 = qt * F9_ROWS, wq0 = q0 + wg * 64; // block's and warpgroup's first query
    int nkt = (min(q0 + F9_ROWS, T) - 1) / F9_BT + 1;
    int r0 = wq0 + warp4 * 16;

    f9_load_tile<D, F9_ROWS>(sQ, q + head_off, qkv_stride, q0, T, hc);
    f9_load_tile<D, F9_ROWS>(sdO, dout + dout_off, out_stride, q0, T, hc);
    f9_load_tile<D, F9_BT>(sK, kh, qkv_stride, 0, T, hc);
    f9_load_tile<D, F9_BT>(sV, vh, qkv_stride, 0, T, hc);
    f9_cp_commit();

    // D of this warp's 16 rows while the tiles land
    float drow[2], lrow[2];
    fa_row_stats(dout, out, dout_off, out_stride, lse, Dv, true, bh, T, r0, hc, lane, F9_LOG2E, drow, lrow);

    float acc[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; i++) acc[i] = 0.0f;

    for (int kt = 0; kt < nkt; kt++) {
        f9_cp_wait_all();
        f9_fence_async();
        __syncthreads();
        if (kt + 1 < nkt) {
            uint32_t nb = (uint32_t)((kt + 1) & 1) * KB;
            f9_load_tile<D, F9_BT>(sK + nb, kh, qkv_stride, (kt + 1) * F9_BT, T, hc);
            f9_load_tile<D, F9_BT>(sV + nb, vh, qkv_stride, (kt + 1) * F9_BT, T, hc);
            f9_cp_commit();
        }
        int k0 = kt * F9_BT;
        if (k0 > wq0 + 63) continue; // every key follows every query of this warpgroup
        uint32_t cb = (uint32_t)(kt & 1) * KB;

        f9_dq_tile<D>(acc, sQ, sdO, (uint32_t)wg * 64 * 128, sK + cb, sV + cb, k0, r0, lrow, drow, lane,
                      scale_log2);
    }
    const float mul[2] = {scale, scale};
    f9_store_rows<D>(dq + head_off, qkv_stride, acc, mul, r0, T, HS, lane);
}

// dk, dv: grid (B*NH, ceil(T/128)), 256 threads; block y = 0 (the keys that see the most
// queries) first.
template <int D>
static __global__ void __launch_bounds__(F9_NT, 1)
f9_bwd_dkdv_kernel(f9_bf16 *dk, f9_bf16 *dv, const f9_bf16 *dout, const f9_bf16 *q,
                   const f9_bf16 *k, const f9_bf16 *v, const float *lse, const float *Dv, int T,
                   int NH, int HS, size_t qkv_stride, size_t out_stride, float scale,
                   float scale_log2) {
    constexpr int KB = F9_ROWS * D * 2, QB = F9_BT * D * 2; // bytes of a key / query tile
    extern __shared__ __align__(1024) unsigned char f9_smem[];
    unsigned char *aligned = f9_smem + (((f9_smem_u32(f9_smem) + 1023u) & ~1023u) - f9_smem_u32(f9_smem));
    const uint32_t base = f9_smem_u32(aligned);
    const uint32_t sK = base, sV = sK + KB, sQ = sV + KB, sdO = sQ + 2 * QB; // Q, dO: two stages
    const uint32_t sL = sdO + 2 * QB, sD = sL + 2 * 64 * 4; // lse, D of the query tile, two stages
    const float *Lf = reinterpret_cast<const float *>(aligned + (sL - base));
    const float *Df = reinterpret_cast<const float *>(aligned + (sD - base));

    int kt = (int)blockIdx.y;
    int bh = (int)blockIdx.x, b = bh / NH, h = bh % NH;
    int tid = (int)threadIdx.x, wg = tid >> 7, warp4 = (tid >> 5) & 3, lane = tid & 31;
    int hc = HS / 8;
    size_t head_off = (size_t)b * T * qkv_stride + (size_t)h * HS;
    size_t dout_off = (size_t)b * T * out_stride + (size_t)h * HS;
    const f9_bf16 *qh = q + head_off, *doh = dout + dout_off;
    const float *lse_h = lse + (size_t)bh * T, *D_h = Dv + (size_t)bh * T;
    int k0 = kt * F9_ROWS, wk0 = k0 + wg * 64; // block's and warpgroup's first key
    int rk0 = wk0 + warp4 * 16;                // this warp's first key
    int qt0 = k0 / F9_BT, nqt = (T + F9_BT - 1) / F9_BT;

    f9_load_tile<D, F9_ROWS>(sK, k + head_off, qkv_stride, k0, T, hc);
    f9_load_tile<D, F9_ROWS>(sV, v + head_off, qkv_stride, k0, T, hc);
    f9_load_tile<D, F9_BT>(sQ, qh, qkv_stride, qt0 * F9_BT, T, hc);
    f9_load_tile<D, F9_BT>(sdO, doh, out_stride, qt0 * F9_BT, T, hc);
    f9_load_vec(sL, lse_h, qt0 * F9_BT, T);
    f9_load_vec(sD, D_h, qt0 * F9_BT, T);
    f9_cp_commit();

    float dka[D / 2], dva[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; i++) dka[i] = dva[i] = 0.0f;

    for (int qt = qt0; qt < nqt; qt++) {
        int it = qt - qt0;
        f9_cp_wait_all();
        f9_fence_async();
        __syncthreads();
        if (qt + 1 < nqt) {
            uint32_t nb = (uint32_t)((it + 1) & 1);
            int row0 = (qt + 1) * F9_BT;
            f9_load_tile<D, F9_BT>(sQ + nb * QB, qh, qkv_stride, row0, T, hc);
            f9_load_tile<D, F9_BT>(sdO + nb * QB, doh, out_stride, row0, T, hc);
            f9_load_vec(sL + nb * 256, lse_h, row0, T);
            f9_load_vec(sD + nb * 256, D_h, row0, T);
            f9_cp_commit();
        }
        int q0 = qt * F9_BT;
        if (q0 + 63 < wk0 || wk0 >= T) continue; // every query precedes every key of this warpgroup
        uint32_t buf = (uint32_t)(it & 1);
        uint32_t qb = sQ + buf * QB, db = sdO + buf * QB;
        const float *Lt = Lf + buf * 64, *Dt = Df + buf * 64;

        f9_dkdv_tile<D>(dka, dva, sK, sV, (uint32_t)wg * 64 * 128, qb, db, Lt, Dt, q0, rk0, T, lane,
                        scale_log2);
    }
    const float one[2] = {1.0f, 1.0f}, sc[2] = {scale, scale};
    f9_store_rows<D>(dv + head_off, qkv_stride, dva, one, rk0, T, HS, lane);
    f9_store_rows<D>(dk + head_off, qkv_stride, dka, sc, rk0, T, HS, lane);
}

// ---- backward kernels, warp-specialised (head sizes 64 and 128 exactly)
//
// The same products as f9_bwd_dq_kernel and f9_bwd_dkdv_kernel, fed as the warp-specialised
// forward is: a producer warpgroup brings the walked 64-row tiles in through the copy engine (in
// the dk/dv kernel its threads 64..127 also stage the tile's log-sum-exp and D, then arrive on the
// same "full" barrier), two consumer warpgroups wait on it and release the stage on "empty".
// A consumer warpgroup with nothing to do on a tile still waits for it and releases it, so the
// barrier phases stay in step. Tiles are copied as 64 x 64 boxes.

#define F9_BOXB (64 * 64 * 2) // bytes of one 64-column x 64-row box

// Rows [row0, row0 + ROWS) of a head into a [kb][ROWS][64] tile by 64-row boxes, completing on bar.
template <int D, int ROWS>
__device__ __forceinline__ static void f9_tma_tile(uint32_t dst, const CUtensorMap *map, int col,
                                                   int row0, int b, uint32_t bar) {
#pragma unroll
    for (int kb = 0; kb < D / 64; kb++)
#pragma unroll
        for (int rb = 0; rb < ROWS / 64; rb++)
            f9_tma_load(dst + (uint32_t)(kb * ROWS * 128 + rb * 64 * 128), map, col + 64 * kb,
                        row0 + 64 * rb, b, bar);
}

// dq and D. grid (B*NH, ceil(T/128)), 384 threads.
template <int D>
static __global__ void __launch_bounds__(F9_WS_NT, 1)
f9_bwd_dq_ws_kernel(const __grid_constant__ CUtensorMap tmq, const __grid_constant__ CUtensorMap tmk,
                    const __grid_constant__ CUtensorMap tmv, const __grid_constant__ CUtensorMap tmdo,
                    f9_bf16 *dq, float *Dv, const f9_bf16 *dout, const f9_bf16 *out,
                    const float *lse, int T, int NH, size_t qkv_stride, size_t out_stride,
                    float scale, float scale_log2) {
    constexpr int QB = F9_ROWS * D * 2, KB = F9_BT * D * 2;
    extern __shared__ __align__(1024) unsigned char f9_smem[];
    const uint32_t base = (f9_smem_u32(f9_smem) + 1023u) & ~1023u;
    const uint32_t sQ = base, sdO = sQ + QB, sK = sdO + QB, sV = sK + 2 * KB;
    const uint32_t bars = sV + 2 * KB;
    const uint32_t q_full = bars, full = bars + 8, empty = bars + 24; // full, empty: two stages

    int qt = (int)gridDim.y - 1 - (int)blockIdx.y;
    int bh = (int)blockIdx.x, b = bh / NH, h = bh % NH;
    int tid = (int)threadIdx.x, wg = tid >> 7;
    int q0 = qt * F9_ROWS;
    int nkt = (min(q0 + F9_ROWS, T) - 1) / F9_BT + 1;
    if (tid == 0) {
        f9_mbar_init(q_full, 1);
        for (int st = 0; st < 2; st++) {
            f9_mbar_init(full + 8 * st, 1);
            f9_mbar_init(empty + 8 * st, 2 * 128);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    if (wg == 0) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
        if (tid == 0) {
            int col = h * D;
            f9_mbar_expect_tx(q_full, 2 * QB);
            f9_tma_tile<D, F9_ROWS>(sQ, &tmq, col, q0, b, q_full);
            f9_tma_tile<D, F9_ROWS>(sdO, &tmdo, col, q0, b, q_full);
            for (int kt = 0; kt < nkt; kt++) {
                int st = kt & 1;
                if (kt >= 2) f9_mbar_wait(empty + 8 * st, ((kt >> 1) - 1) & 1);
                uint32_t f = full + 8 * st;
                f9_mbar_expect_tx(f, 2 * KB);
                f9_tma_tile<D, F9_BT>(sK + st * KB, &tmk, col, kt * F9_BT, b, f);
                f9_tma_tile<D, F9_BT>(sV + st * KB, &tmv, col, kt * F9_BT, b, f);
            }
        }
        return;
    }

    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
    int cw = wg - 1, warp4 = (tid >> 5) & 3, lane = tid & 31;
    int wq0 = q0 + cw * 64, r0 = wq0 + warp4 * 16;
    size_t dout_off = (size_t)b * T * out_stride + (size_t)h * D;
    float drow[2], lrow[2];
    fa_row_stats(dout, out, dout_off, out_stride, lse, Dv, true, bh, T, r0, D / 8, lane, F9_LOG2E, drow,
                 lrow);
    float acc[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; i++) acc[i] = 0.0f;
    f9_mbar_wait(q_full, 0);

    for (int kt = 0; kt < nkt; kt++) {
        int st = kt & 1;
        uint32_t cb = (uint32_t)st * KB;
        int k0 = kt * F9_BT;
        f9_mbar_wait(full + 8 * st, (uint32_t)(kt >> 1) & 1u);
        if (k0 <= wq0 + 63) { // some key at or before some query of this warpgroup
            f9_dq_tile<D>(acc, sQ, sdO, (uint32_t)cw * 64 * 128, sK + cb, sV + cb, k0, r0, lrow, drow,
                          lane, scale_log2);
        }
        f9_mbar_arrive(empty + 8 * st);
    }
    const float mul[2] = {scale, scale};
    f9_store_rows<D>(dq + (size_t)b * T * qkv_stride + (size_t)h * D, qkv_stride, acc, mul, r0, T, D,
                     lane);
}

// The barriers of a key-block backward kernel: kv_full for the block's K and V, and per stage
// "full" (the copies' arrival and 64 vector stagers) and "empty" (both consumers).
__device__ __forceinline__ static void f9_bwd_kv_init(uint32_t kv_full, uint32_t full, uint32_t empty, int tid) {
    if (tid == 0) {
        f9_mbar_init(kv_full, 1);
        for (int st = 0; st < 2; st++) {
            f9_mbar_init(full + 8 * st, 1 + 64);
            f9_mbar_init(empty + 8 * st, 2 * 128);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();
}

// The producer warpgroup of a key-block backward kernel, for one key block (the block's item-th;
// its first query tile is the block's g0-th): thread 0 copies the block's K and V (128 rows) once
// the consumers are done with the last item's (kv_empty), then each 64-query tile's Q and dO into
// a stage (rev: from the last query tile down); threads 64..127 stage the tile's log-sum-exp and D
// (lse_h, D_h: the head's) into Lf, Df and arrive on the same "full" barrier. Threads 1..63 do not
// call this. The caller has lowered the warpgroup's registers.
template <int D>
__device__ __forceinline__ static void
f9_bwd_kv_producer(const CUtensorMap *tmq, const CUtensorMap *tmk, const CUtensorMap *tmv, const CUtensorMap *tmdo,
                   uint32_t sK, uint32_t sV, uint32_t sQ, uint32_t sdO, float *Lf, float *Df, uint32_t kv_full,
                   uint32_t kv_empty, uint32_t full, uint32_t empty, const float *lse_h, const float *D_h, int col,
                   int b, int k0, int qt0, int nqt, int T, int tid, int item, int g0, bool rev) {
    constexpr int KB = F9_ROWS * D * 2, QB = F9_BT * D * 2;
    if (tid == 0) {
        if (item > 0) f9_mbar_wait(kv_empty, (uint32_t)(item - 1) & 1u);
        f9_mbar_expect_tx(kv_full, 2 * KB);
        f9_tma_tile<D, F9_ROWS>(sK, tmk, col, k0, b, kv_full);
        f9_tma_tile<D, F9_ROWS>(sV, tmv, col, k0, b, kv_full);
    }
    for (int j = qt0; j < nqt; j++) {
        int qt = rev ? nqt - 1 - (j - qt0) : j, it = g0 + j - qt0, st = it & 1;
        if (it >= 2) f9_mbar_wait(empty + 8 * st, ((it >> 1) - 1) & 1);
        uint32_t f = full + 8 * st;
        if (tid == 0) {
            f9_mbar_expect_tx(f, 2 * QB);
            f9_tma_tile<D, F9_BT>(sQ + st * QB, tmq, col, qt * F9_BT, b, f);
            f9_tma_tile<D, F9_BT>(sdO + st * QB, tmdo, col, qt * F9_BT, b, f);
        } else {
            int i = tid - 64, row = qt * F9_BT + i;
            Lf[st * 64 + i] = row < T ? lse_h[row] : 0.0f;
            Df[st * 64 + i] = row < T ? D_h[row] : 0.0f;
            f9_mbar_arrive(f);
        }
    }
}

// dk, dv. grid (B*NH, ceil(T/128)), 384 threads; block y = 0 first.
template <int D>
static __global__ void __launch_bounds__(F9_WS_NT, 1)
f9_bwd_dkdv_ws_kernel(const __grid_constant__ CUtensorMap tmq, const __grid_constant__ CUtensorMap tmk,
                      const __grid_constant__ CUtensorMap tmv, const __grid_constant__ CUtensorMap tmdo,
                      f9_bf16 *dk, f9_bf16 *dv, const float *lse, const float *Dv, int T, int NH,
                      size_t qkv_stride, float scale, float scale_log2) {
    constexpr int KB = F9_ROWS * D * 2, QB = F9_BT * D * 2;
    extern __shared__ __align__(1024) unsigned char f9_smem[];
    unsigned char *aligned =
        f9_smem + (((f9_smem_u32(f9_smem) + 1023u) & ~1023u) - f9_smem_u32(f9_smem));
    const uint32_t base = f9_smem_u32(aligned);
    const uint32_t sK = base, sV = sK + KB, sQ = sV + KB, sdO = sQ + 2 * QB;
    const uint32_t sL = sdO + 2 * QB, sD = sL + 2 * 256; // 64 floats a stage each
    const uint32_t bars = sD + 2 * 256;
    const uint32_t kv_full = bars, full = bars + 8, empty = bars + 24;
    float *Lf = reinterpret_cast<float *>(aligned + (sL - base));
    float *Df = reinterpret_cast<float *>(aligned + (sD - base));

    int kt = (int)blockIdx.y;
    int bh = (int)blockIdx.x, b = bh / NH, h = bh % NH;
    int tid = (int)threadIdx.x, wg = tid >> 7;
    int k0 = kt * F9_ROWS;
    int qt0 = k0 / F9_BT, nqt = (T + F9_BT - 1) / F9_BT;
    f9_bwd_kv_init(kv_full, full, empty, tid);
    if (wg == 0) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
        if (tid == 0 || tid >= 64)
            f9_bwd_kv_producer<D>(&tmq, &tmk, &tmv, &tmdo, sK, sV, sQ, sdO, Lf, Df, kv_full, 0, full, empty,
                                  lse + (size_t)bh * T, Dv + (size_t)bh * T, h * D, b, k0, qt0, nqt, T, tid, 0, 0,
                                  false);
        return;
    }

    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
    int cw = wg - 1, warp4 = (tid >> 5) & 3, lane = tid & 31;
    int wk0 = k0 + cw * 64, rk0 = wk0 + warp4 * 16;
    float dka[D / 2], dva[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; i++) dka[i] = dva[i] = 0.0f;
    f9_mbar_wait(kv_full, 0);

    for (int qt = qt0; qt < nqt; qt++) {
        int it = qt - qt0, st = it & 1;
        int q0 = qt * F9_BT;
        uint32_t qb = sQ + (uint32_t)st * QB, db = sdO + (uint32_t)st * QB;
        const float *Lt = Lf + st * 64, *Dt = Df + st * 64;
        f9_mbar_wait(full + 8 * st, (uint32_t)(it >> 1) & 1u);
        if (q0 + 63 >= wk0 && wk0 < T) {
            f9_dkdv_tile<D>(dka, dva, sK, sV, (uint32_t)cw * 64 * 128, qb, db, Lt, Dt, q0, rk0, T, lane,
                            scale_log2);
        }
        f9_mbar_arrive(empty + 8 * st);
    }
    const float one[2] = {1.0f, 1.0f}, sc[2] = {scale, scale};
    size_t off = (size_t)b * T * qkv_stride + (size_t)h * D;
    f9_store_rows<D>(dv + off, qkv_stride, dva, one, rk0, T, D, lane);
    f9_store_rows<D>(dk + off, qkv_stride, dka, sc, rk0, T, D, lane);
}

// ---- backward in one warp-specialised kernel (head sizes 64 and 128 exactly)
//
// The dk/dv kernel above, with dq produced in the same pass instead of by a second kernel that
// recomputes S and dP: five products per tile instead of seven. Each consumer warpgroup also
// stores its dS^T (64 keys x 64 queries, bf16) into shared memory; once both halves are there,
// dQ_tile (64 queries x D) = dS K is one more product from shared memory (both operands read
// transposed). At D 128 each warpgroup takes 64 of the columns; at D 64 the warpgroups take the
// tiles in turn.
//
// A query tile's dq is the sum of the partial products of every key block at or before it. The
// consumers put their fp32 partial into a shared-memory tile (two stages) and go on; one
// thread of the producer warpgroup (the dq writer) adds it to an fp32 accumulator in global
// memory with one bulk reduce copy (cp.reduce.async.bulk), so neither the wait for the other
// blocks nor the additions stop a consumer. The additions happen in key-block order: a counter
// per query tile holds how many blocks have added theirs; the writer of block kb waits (acquire)
// until it reads kb, adds, waits for the copy to complete and bumps it (release), so every run
// adds in the same order and gives the same bits. Key block 0 stores instead of adding (every
// query sees key 0), so the accumulator is never cleared. A block waits only for the block of its
// head one key block earlier, which has the lower block index and so was dispatched first: the
// wait always ends.
//
// The accumulator keeps each 64-query tile in the order the consumers hold it (pair p of
// consumer thread t at float2 p * 128 + t, a 64 x 64 region per warpgroup), so the shared-memory
// stores are free of bank conflicts and one contiguous copy moves a tile; the post-pass turns it
// back into rows. Pre-pass: D = rowsum(dout * out) and the counters cleared; post-pass: dq =
// accumulator * scale in bf16.

#define F9_DQ_TILE(D) (F9_BT * (D)) // floats of one query tile of the accumulator

// D = rowsum(dout * out) of 128 rows; grid (B*NH, ceil(T/128)), 256 threads, each taking 16-byte
// chunks of rows (D / 8 neighbouring threads share a row; every load issued before the sums).
// Block y 0 clears the head's counters (nq64 of them). With acc (the unordered backward, which
// only adds), the block also clears the accumulator's two tiles of its rows.
template <int D>
static __global__ void __launch_bounds__(F9_NT)
f9_bwd_pre_kernel(float *Dv, unsigned *sem, float *acc, const f9_bf16 *dout, const f9_bf16 *out, int T,
                  int NH, size_t out_stride, int nq64) {
    constexpr int CH = D / 8, RPP = F9_NT / CH, PASSES = F9_ROWS / RPP; // rows per pass
    int bh = (int)blockIdx.x, b = bh / NH, h = bh % NH;
    int c = (int)threadIdx.x % CH, r = (int)threadIdx.x / CH;
    size_t off = (size_t)b * T * out_stride + (size_t)h * D + 8 * c;
    uint4 av[PASSES], ov[PASSES];
#pragma unroll
    for (int k = 0; k < PASSES; k++) {
        int row = (int)blockIdx.y * F9_ROWS + k * RPP + r;
        av[k] = ov[k] = make_uint4(0u, 0u, 0u, 0u);
        if (row < T) {
            av[k] = *reinterpret_cast<const uint4 *>(dout + off + (size_t)row * out_stride);
            ov[k] = *reinterpret_cast<const uint4 *>(out + off + (size_t)row * out_stride);
        }
    }
#pragma unroll
    for (int k = 0; k < PASSES; k++) {
        const __nv_bfloat162 *a2 = reinterpret_cast<const __nv_bfloat162 *>(&av[k]);
        const __nv_bfloat162 *o2 = reinterpret_cast<const __nv_bfloat162 *>(&ov[k]);
        float d = 0.0f;
#pragma unroll
        for (int e = 0; e < 4; e++) {
            float2 af = __bfloat1622float2(a2[e]), of = __bfloat1622float2(o2[e]);
            d = fmaf(af.x, of.x, d);
            d = fmaf(af.y, of.y, d);
        }
#pragma unroll
        for (int m = 1; m < CH; m <<= 1) d += __shfl_xor_sync(0xffffffffu, d, m);
        int row = (int)blockIdx.y * F9_ROWS + k * RPP + r;
        if (c == 0 && row < T) Dv[(size_t)bh * T + row] = d;
    }
    if (blockIdx.y == 0)
        for (int i = (int)threadIdx.x; i < nq64; i += F9_NT) sem[(size_t)bh * nq64 + i] = 0u;
    if (acc) {
        int t0 = 2 * (int)blockIdx.y, nt = min(2, nq64 - t0);
        float4 *z = reinterpret_cast<float4 *>(acc + ((size_t)bh * nq64 + t0) * F9_DQ_TILE(D));
        for (int i = (int)threadIdx.x; i < nt * F9_DQ_TILE(D) / 4; i += F9_NT) z[i] = make_float4(0.f, 0.f, 0.f, 0.f);
    }
}

// dq (B, T, NH, D) bf16, row stride qkv_stride = acc * scale, acc in tiles of F9_DQ_TILE(D)
// floats as the consumers held them (see above). A block per tile (grid: B*NH * ceil(T/64)), 256
// threads: the tile read in order into shared memory as bf16 rows (padded by 16 bytes, so the
// 8 rows of a warp's store fall in different banks), then written out 16 bytes a thread.
// SUMS: also the tile's column sums as stored, rows past T left out, into row b * nq64 + (query
// tile) of qsum (NH * D floats a row), at the head's columns.
template <int D, bool SUMS>
static __global__ void __launch_bounds__(F9_NT)
f9_bwd_post_kernel(f9_bf16 *dq, const float *acc, int T, int NH, int nq64, size_t qkv_stride, float scale,
                   float *qsum) {
    constexpr int RS = D * 2 + 16; // bytes of a row in shared memory
    __shared__ __align__(16) unsigned char rows[F9_BT * RS];
    size_t tile = blockIdx.x; // (bh, query tile)
    const float2 *src = reinterpret_cast<const float2 *>(acc + tile * F9_DQ_TILE(D));
#pragma unroll
    for (int k = 0; k < F9_DQ_TILE(D) / 2 / F9_NT; k++) {
        int w = (int)threadIdx.x + k * F9_NT;
        int region = w / 2048, p = (w / 128) % 16, t = w % 128; // region: 64 columns
        int lane = t & 31, g = lane >> 2, tq = lane & 3;
        int row = (t >> 5) * 16 + g + 8 * (p & 1), col = region * 64 + 8 * (p >> 1) + 2 * tq;
        float2 x = src[w];
        *reinterpret_cast<uint32_t *>(rows + row * RS + col * 2) = f9_pack(x.x * scale, x.y * scale);
    }
    __syncthreads();
    int bh = (int)(tile / (size_t)nq64), b = bh / NH, h = bh % NH;
    int q0 = (int)(tile % (size_t)nq64) * F9_BT;
    if constexpr (SUMS)
        for (int c = (int)threadIdx.x; c < D; c += F9_NT) {
            float s = 0.0f;
            for (int r = 0; r < F9_BT && q0 + r < T; r++)
                s += __bfloat162float(*reinterpret_cast<const __nv_bfloat16 *>(rows + r * RS + c * 2));
            qsum[((size_t)b * nq64 + tile % (size_t)nq64) * NH * D + (size_t)h * D + c] = s;
        }
    else
        (void)qsum;
#pragma unroll
    for (int k = 0; k < F9_BT * D / 8 / F9_NT; k++) {
        int c = (int)threadIdx.x + k * F9_NT, row = c / (D / 8), ch = c % (D / 8);
        if (q0 + row < T)
            *reinterpret_cast<uint4 *>(dq + ((size_t)b * T + q0 + row) * qkv_stride + (size_t)h * D + 8 * ch) =
                *reinterpret_cast<const uint4 *>(rows + row * RS + ch * 16);
    }
}

// The dq writer (one thread of the producer warpgroup): for each query tile of the block, waits
// for the consumers' partial in shared dqs (dq_full), for the blocks of earlier keys (the tile's
// counter), adds the partial to the tile of acc_h with one bulk copy (stores it, for key block 0),
// frees dqs (dq_empty) once the copy has read it, and bumps the counter once the copy is complete.
// rev: the tiles from the last one down, as the producer brings them.
template <int D>
__device__ __forceinline__ static void f9_bwd_dq_writer(float *acc_h, unsigned *sem_h, uint32_t dqs,
                                                        uint32_t dq_full, uint32_t dq_empty, int kb,
                                                        int qt0, int nqt, bool ordered, int g0, bool rev) {
    constexpr uint32_t bytes = F9_DQ_TILE(D) * 4;
    for (int j = qt0; j < nqt; j++) {
        int qt = rev ? nqt - 1 - (j - qt0) : j, it = g0 + j - qt0, st = it & 1; // it: the block's tile count
        uint32_t src = dqs + (uint32_t)st * bytes;
        f9_mbar_wait(dq_full + 8 * st, (uint32_t)(it >> 1) & 1u);
        float *dst = acc_h + (size_t)qt * F9_DQ_TILE(D);
        if (kb == 0 && ordered) {
            asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;\n" ::"l"(dst), "r"(src),
                         "r"(bytes)
                         : "memory");
        } else {
            unsigned v;
            if (ordered) do {
                    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(v) : "l"(sem_h + qt) : "memory");
                } while ((int)v != kb);
            asm volatile("fence.proxy.async.global;\n" ::: "memory"); // the earlier blocks' sums, to the copy
            asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(dst),
                         "r"(src), "r"(bytes)
                         : "memory");
        }
        f9_bulk_commit();
        f9_bulk_wait_read();
        f9_mbar_arrive(dq_empty + 8 * st);
        f9_bulk_wait();
        asm volatile("fence.proxy.async.global;\n" ::: "memory");
        asm volatile("st.release.gpu.global.u32 [%0], %1;\n" ::"l"(sem_h + qt), "r"(kb + 1) : "memory");
    }
}

// Items are (head, key block); with a block per item (grid: the items) block w takes item w;
// persistent (fewer blocks, one per multiprocessor) each walks the items f9_walk assigns it. 384
// threads.
//
// HEADS (persistent only, on a multiple of P blocks): the blocks of a round hold whole heads (the
// key blocks of a head in pairs), every block walking its query
// tiles from the last one down, so that the key blocks of a head, all running at once, reach each
// tile in key-block order one add apart (the dq order stays kb 0, 1, ...; dq's bits are the
// default walk's, dk's and dv's sums run in the other order). Every wait is on a key block of the
// same round that is either a lower first item or a higher pair's second item, whose own waits end
// at a first item: with every block resident the waits end.
template <int D, bool HEADS, bool SUMS>
static __global__ void __launch_bounds__(F9_WS_NT, 1)
f9_bwd_ws_kernel(const __grid_constant__ CUtensorMap tmq, const __grid_constant__ CUtensorMap tmk,
                 const __grid_constant__ CUtensorMap tmv, const __grid_constant__ CUtensorMap tmdo,
                 f9_bf16 *dk, f9_bf16 *dv, float *acc, unsigned *sem, const float *lse, const float *Dv,
                 int T, int NH, int BH, size_t qkv_stride, float scale, float scale_log2, int ordered,
                 int kvstages, float *kvsum) {
    // SUMS: kvsum (B * ceil(T / 16), 2 NH D): per 16 key rows of a sequence, dk's column sums then
    // dv's, as stored (f9_store_rows_sum)
    // acc (B*NH, ceil(T/64) tiles of F9_DQ_TILE(D)) fp32; sem (B*NH, ceil(T/64)) counters; ordered
    // 0 (measurements only): the partials added as they come, in no fixed order; kvstages: 1, the
    // next item's K and V come in once the current item's products are done, or 2, item i's in
    // stage i % 2, so they come in while the current item runs
    constexpr int KB = F9_ROWS * D * 2, QB = F9_BT * D * 2, SB = F9_ROWS * F9_BT * 2;
    extern __shared__ __align__(1024) unsigned char f9_smem[];
    unsigned char *aligned =
        f9_smem + (((f9_smem_u32(f9_smem) + 1023u) & ~1023u) - f9_smem_u32(f9_smem));
    const uint32_t base = f9_smem_u32(aligned);
    // K and V of stage s at base + 2 s KB (K) and + KB (V)
    const uint32_t sK = base, sV = sK + KB, sQ = base + (uint32_t)kvstages * 2 * KB, sdO = sQ + 2 * QB,
                   sS = sdO + 2 * QB;
    const uint32_t sL = sS + 2 * SB, sD = sL + 2 * 256; // 64 floats a stage each
    const uint32_t dqs = sD + 2 * 256; // the dq partials, two stages of F9_DQ_TILE(D) floats
    const uint32_t bars = dqs + 2 * F9_DQ_TILE(D) * 4;
    const uint32_t kv_full = bars, full = bars + 8, empty = bars + 24;
    const uint32_t dq_full = bars + 40, dq_empty = bars + 56, kv_empty = bars + 72; // two stages each, then one
    const uint32_t kv_full2 = bars + 80, kv_empty2 = bars + 88; // the second K and V stage's
    float *Lf = reinterpret_cast<float *>(aligned + (sL - base));
    float *Df = reinterpret_cast<float *>(aligned + (sD - base));

    int tid = (int)threadIdx.x, wg = tid >> 7;
    const int nqt = (T + F9_BT - 1) / F9_BT, nkb = (T + F9_ROWS - 1) / F9_ROWS, items = BH * nkb, G = (int)gridDim.x;
    if (tid == 0) {
        for (int st = 0; st < 2; st++) {
            f9_mbar_init(dq_full + 8 * st, 2 * 128);
            f9_mbar_init(dq_empty + 8 * st, 1);
        }
        f9_mbar_init(kv_empty, 2 * 128);
        f9_mbar_init(kv_full2, 1);
        f9_mbar_init(kv_empty2, 2 * 128);
    }
    f9_bwd_kv_init(kv_full, full, empty, tid); // its fence and block barrier cover the ones above
    // every role walks the same items; g counts the block's query tiles across them (stages, phases)
    if (wg == 0) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
        if (tid != 32 && tid != 0 && tid < 64) return;
        int g = 0, i = 0;
        for (int k = 0;; k++, i += !HEADS) { // i: the items taken (HEADS: counted at the end, past the holes)
            int kb, bh, got = f9_walk<HEADS, false>(k, G, nkb, BH, items, &kb, &bh);
            if (got < 0) break;
            if (got == 0) continue;
            int qt0 = kb * F9_ROWS / F9_BT;
            const int kvs = f9_item_stage(i, kvstages), kvn = f9_item_fill(i, kvstages);
            if (tid == 32)
                f9_bwd_dq_writer<D>(acc + (size_t)bh * nqt * F9_DQ_TILE(D), sem + (size_t)bh * nqt, dqs, dq_full,
                                    dq_empty, kb, qt0, nqt, ordered != 0, g, HEADS);
            else
                f9_bwd_kv_producer<D>(&tmq, &tmk, &tmv, &tmdo, sK + (uint32_t)kvs * 2 * KB, sV + (uint32_t)kvs * 2 * KB,
                                      sQ, sdO, Lf, Df, kvs ? kv_full2 : kv_full, kvs ? kv_empty2 : kv_empty, full,
                                      empty, lse + (size_t)bh * T, Dv + (size_t)bh * T, (bh % NH) * D, bh / NH,
                                      kb * F9_ROWS, qt0, nqt, T, tid, kvn, g, HEADS);
            g += nqt - qt0;
            if constexpr (HEADS) i++;
        }
        return;
    }

    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
    int cw = wg - 1, warp4 = (tid >> 5) & 3, lane = tid & 31, t = tid & 127;
    // the dq columns this warpgroup computes: at D 128 its half; at D 64 all, on every other tile
    const int nh = D == 128 ? cw : 0;
    const uint32_t my_dqs = dqs + (uint32_t)nh * 64 * 64 * 4 + (uint32_t)t * 8;
    int g = 0, i = 0;
    for (int k = 0;; k++, i += !HEADS) {
        int kb, bh, got = f9_walk<HEADS, false>(k, G, nkb, BH, items, &kb, &bh);
        if (got < 0) break;
        if (got == 0) continue;
        int b = bh / NH, h = bh % NH;
        int k0 = kb * F9_ROWS, qt0 = k0 / F9_BT;
        int wk0 = k0 + cw * 64, rk0 = wk0 + warp4 * 16;
        float dka[D / 2], dva[D / 2];
#pragma unroll
        for (int j = 0; j < D / 2; j++) dka[j] = dva[j] = 0.0f;
        const int kvs = f9_item_stage(i, kvstages), kvn = f9_item_fill(i, kvstages);
        const uint32_t sKi = sK + (uint32_t)kvs * 2 * KB, sVi = sV + (uint32_t)kvs * 2 * KB;
        f9_mbar_wait(kvs ? kv_full2 : kv_full, (uint32_t)kvn & 1u);

        for (int j = qt0; j < nqt; j++) {
            int qt = HEADS ? nqt - 1 - (j - qt0) : j, gt = g + j - qt0, st = gt & 1;
            int q0 = qt * F9_BT;
            uint32_t qb = sQ + (uint32_t)st * QB, db = sdO + (uint32_t)st * QB, sSb = sS + (uint32_t)st * SB;
            const float *Lt = Lf + st * 64, *Dt = Df + st * 64;
            f9_mbar_wait(full + 8 * st, (uint32_t)(gt >> 1) & 1u);
            // warpgroup 0 always has work here; warpgroup 1 not where all its keys follow the tile's
            // queries (the diagonal tile) or lie past T (its dS^T rows are zeros then)
            if (q0 + 63 >= wk0 && wk0 < T) {
                f9_dkdv_tile<D, true>(dka, dva, sKi, sVi, (uint32_t)cw * 64 * 128, qb, db, Lt, Dt, q0, rk0, T,
                                      lane, scale_log2, sSb);
            } else {
                const uint32_t zero[F9_BT / 16][4] = {};
                f9_store_ds(sSb, (uint32_t)cw * 64 * 128, rk0, lane, zero);
            }
            f9_fence_async(); // the dS^T stores, visible to the products below
            f9_named_sync(1, 256);
            bool mine = D == 128 || (gt & 1) == cw;
            float dqa[32];
            if (mine) {
                const uint32_t bK = sKi + (uint32_t)nh * F9_ROWS * 128;
                f9_wg_fence();
#pragma unroll
                for (int kc = 0; kc < 8; kc++)
                    wg_ss_n64<1, 1>(dqa, f9_desc(sSb + (uint32_t)kc * 16 * 128, F9_ROWS * 128, 1024),
                                        f9_tdesc<F9_ROWS>(bK, kc), kc > 0);
                asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
            }
            asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
            f9_pin(dka);
            f9_pin(dva);
            f9_mbar_arrive(empty + 8 * st); // the stage's Q and dO have been read
            // the writer has read this stage's last partial (two tiles ago)
            if (gt >= 2) f9_mbar_wait(dq_empty + 8 * st, (uint32_t)((gt >> 1) - 1) & 1u);
            if (mine) {
                f9_pin(dqa);
                const uint32_t dst = my_dqs + (uint32_t)st * F9_DQ_TILE(D) * 4;
#pragma unroll
                for (int p = 0; p < 16; p++)
                    asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(dst + (uint32_t)p * 128 * 8),
                                 "f"(dqa[2 * p]), "f"(dqa[2 * p + 1])
                                 : "memory");
            }
            f9_fence_async(); // the partial, visible to the writer's bulk copy
            f9_mbar_arrive(dq_full + 8 * st);
        }
        f9_mbar_arrive(kvs ? kv_empty2 : kv_empty); // every product of the item has read K and V
        g += nqt - qt0;
        const float one[2] = {1.0f, 1.0f}, sc[2] = {scale, scale};
        size_t off = (size_t)b * T * qkv_stride + (size_t)h * D;
        if constexpr (SUMS) {
            float *row = kvsum + ((size_t)b * ((T + 15) / 16) + (size_t)(rk0 / 16)) * 2 * NH * D + (size_t)h * D;
            f9_store_rows_sum<D>(dv + off, qkv_stride, dva, one, rk0, T, D, lane, row + (size_t)NH * D);
            f9_store_rows_sum<D>(dk + off, qkv_stride, dka, sc, rk0, T, D, lane, row);
        } else {
            (void)kvsum;
            f9_store_rows<D>(dv + off, qkv_stride, dva, one, rk0, T, D, lane);
            f9_store_rows<D>(dk + off, qkv_stride, dka, sc, rk0, T, D, lane);
        }
        if constexpr (HEADS) i++;
    }
}

// ---- warp-specialised launches (tensor maps and helpers: sm90_common.cuh)

template <int D, bool PP>
static int f9_ws_launch(cudaStream_t st, f9_bf16 *out, float *lse, const f9_bf16 *q, const f9_bf16 *k,
                        const f9_bf16 *v, int B, int T, int NH, int qkv_stride, int out_stride, int order,
                        int qstages, int mixed) {
    CUtensorMap mq, mk, mv;
    int cols = NH * D;
    if (!f9_tensor_map(&mq, q, cols, T, B, qkv_stride, F9_ROWS) ||
        !f9_tensor_map(&mk, k, cols, T, B, qkv_stride, F9_ROWS) ||
        !f9_tensor_map(&mv, v, cols, T, B, qkv_stride, F9_ROWS))
        return -1; // the caller falls back to the cp.async kernel
    qstages = qstages == 2 ? 2 : 1;
    size_t smem = (4 + qstages) * (size_t)F9_ROWS * D * 2 + 1024 + 128; // Q, two K and V tiles, slack, barriers
    auto kernel = order ? f9_fwd_ws_kernel<D, PP, true, false> : f9_fwd_ws_kernel<D, PP, false, false>;
    if constexpr (D == 64) // the exponentials bind at head size 64 only (half the products' cycles at 128)
        if (mixed) kernel = order ? f9_fwd_ws_kernel<D, PP, true, true> : f9_fwd_ws_kernel<D, PP, false, true>;
    if (cudaFuncSetAttribute((const void *)kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem) !=
        cudaSuccess) {
        (void)cudaGetLastError();
        return 2;
    }
    float scale_log2 = F9_LOG2E / sqrtf((float)D);
    // persistent: a block per multiprocessor, each walking its share of the (head, query tile) items
    // (order 1: of the pairs of query tiles)
    int nqt = (T + F9_ROWS - 1) / F9_ROWS, items = B * NH * (order ? (nqt + 1) / 2 : nqt);
    kernel<<<(unsigned)min(items, f9_sm_count()), F9_WS_NT, smem, st>>>(mq, mk, mv, out, lse, T, NH, B * NH,
                                                                        (size_t)out_stride, scale_log2, qstages);
    return cudaGetLastError() == cudaSuccess ? 0 : 2;
}

// ---- launcher

template <int D>
static int f9_launch(cudaStream_t st, f9_bf16 *out, float *lse, const f9_bf16 *q, const f9_bf16 *k,
                     const f9_bf16 *v, int B, int T, int NH, int HS, int qkv_stride, int out_stride) {
    size_t smem = 5 * (size_t)F9_ROWS * D * 2 + 1024; // Q, two K and two V tiles, alignment slack
    if (cudaFuncSetAttribute((const void *)f9_fwd_kernel<D>,
                             cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem) != cudaSuccess) {
        (void)cudaGetLastError();
        return 2;
    }
    float scale_log2 = F9_LOG2E / sqrtf((float)HS);
    dim3 grid((unsigned)(B * NH), (unsigned)((T + F9_ROWS - 1) / F9_ROWS));
    f9_fwd_kernel<D><<<grid, F9_NT, smem, st>>>(out, lse, q, k, v, T, NH, HS, (size_t)qkv_stride,
                                                 (size_t)out_stride, scale_log2);
    return cudaGetLastError() == cudaSuccess ? 0 : 2;
}

extern "C" int flash_attention_sm90_fwd(void *stream, void *out, float *lse, const void *q,
                                        const void *k, const void *v, int B, int T, int NH, int HS,
                                        int qkv_stride, int out_stride, int allow_ws, int order, int qstages,
                                        int exp2_mixed) {
    cudaStream_t st = (cudaStream_t)stream;
    f9_bf16 *o = (f9_bf16 *)out;
    const f9_bf16 *qq = (const f9_bf16 *)q, *kk = (const f9_bf16 *)k, *vv = (const f9_bf16 *)v;
    // the warp-specialised kernel where the head fills its tiles exactly and the copy engine's
    // alignment rules hold (16-byte aligned bases and strides); else the cp.async kernel
    bool ws = (HS == 64 || HS == 128) && allow_ws && ((size_t)q & 15) == 0 &&
              ((size_t)k & 15) == 0 && ((size_t)v & 15) == 0;
    int rc = -1;
    // ping-pong pays at head size 128 only (measured: at 64 the softmax is too short to cover the
    // other consumer's products, and the turns cost 7% at T 4096)
    bool pp = allow_ws == 1;
    if (ws && HS == 64)
        rc = f9_ws_launch<64, false>(st, o, lse, qq, kk, vv, B, T, NH, qkv_stride, out_stride, order, qstages,
                                     exp2_mixed);
    if (ws && HS == 128)
        rc = pp ? f9_ws_launch<128, true>(st, o, lse, qq, kk, vv, B, T, NH, qkv_stride, out_stride, order, qstages,
                                          exp2_mixed)
                : f9_ws_launch<128, false>(st, o, lse, qq, kk, vv, B, T, NH, qkv_stride, out_stride, order, qstages,
                                           exp2_mixed);
    if (rc >= 0) return rc;
    if (HS <= 64) return f9_launch<64>(st, o, lse, qq, kk, vv, B, T, NH, HS, qkv_stride, out_stride);
    return f9_launch<128>(st, o, lse, qq, kk, vv, B, T, NH, HS, qkv_stride, out_stride);
}

template <int D>
static int f9_bwd_launch(cudaStream_t st, f9_bf16 *dq, f9_bf16 *dk, f9_bf16 *dv, const f9_bf16 *dout,
                         const f9_bf16 *q, const f9_bf16 *k, const f9_bf16 *v, const f9_bf16 *out,
                         const float *lse, float *Dv, int B, int T, int NH, int HS, int qkv_stride,
                         int out_stride) {
    float scale = 1.0f / sqrtf((float)HS), scale_log2 = scale * F9_LOG2E;
    dim3 grid((unsigned)(B * NH), (unsigned)((T + F9_ROWS - 1) / F9_ROWS));
    size_t smem = 2 * (size_t)F9_ROWS * D * 2 + 4 * (size_t)F9_BT * D * 2 + 1024;
    if (cudaFuncSetAttribute((const void *)f9_bwd_dq_kernel<D>,
                             cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem) != cudaSuccess) {
        (void)cudaGetLastError();
        return 2;
    }
    f9_bwd_dq_kernel<D><<<grid, F9_NT, smem, st>>>(dq, Dv, dout, out, q, k, v, lse, T, NH, HS,
                                                    (size_t)qkv_stride, (size_t)out_stride, scale,
                                                    scale_log2);
    if (cudaGetLastError() != cudaSuccess) return 2;
    smem += 4 * 64 * sizeof(float);
    if (cudaFuncSetAttribute((const void *)f9_bwd_dkdv_kernel<D>,
                             cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem) != cudaSuccess) {
        (void)cudaGetLastError();
        return 2;
    }
    f9_bwd_dkdv_kernel<D><<<grid, F9_NT, smem, st>>>(dk, dv, dout, q, k, v, lse, Dv, T, NH, HS,
                                                      (size_t)qkv_stride, (size_t)out_stride, scale,
                                                      scale_log2);
    return cudaGetLastError() == cudaSuccess ? 0 : 2;
}

template <int D>
static int f9_bwd_ws_launch(cudaStream_t st, f9_bf16 *dq, f9_bf16 *dk, f9_bf16 *dv,
                            const f9_bf16 *dout, const f9_bf16 *q, const f9_bf16 *k,
                            const f9_bf16 *v, const f9_bf16 *out, const float *lse, float *Dv,
                            int B, int T, int NH, int qkv_stride, int out_stride) {
    CUtensorMap mq, mk, mv, mdo;
    int cols = NH * D;
    if (!f9_tensor_map(&mq, q, cols, T, B, qkv_stride, 64) ||
        !f9_tensor_map(&mk, k, cols, T, B, qkv_stride, 64) ||
        !f9_tensor_map(&mv, v, cols, T, B, qkv_stride, 64) ||
        !f9_tensor_map(&mdo, dout, cols, T, B, out_stride, 64))
        return -1;
    float scale = 1.0f / sqrtf((float)D), scale_log2 = scale * F9_LOG2E;
    dim3 grid((unsigned)(B * NH), (unsigned)((T + F9_ROWS - 1) / F9_ROWS));
    size_t smem = 2 * (size_t)F9_ROWS * D * 2 + 4 * (size_t)F9_BT * D * 2 + 1024 + 64;
    if (cudaFuncSetAttribute((const void *)f9_bwd_dq_ws_kernel<D>,
                             cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem) != cudaSuccess) {
        (void)cudaGetLastError();
        return 2;
    }
    f9_bwd_dq_ws_kernel<D><<<grid, F9_WS_NT, smem, st>>>(mq, mk, mv, mdo, dq, Dv, dout, out, lse, T,
                                                         NH, (size_t)qkv_stride,
                                                         (size_t)out_stride, scale, scale_log2);
    if (cudaGetLastError() != cudaSuccess) return 2;
    smem += 4 * 256;
    if (cudaFuncSetAttribute((const void *)f9_bwd_dkdv_ws_kernel<D>,
                             cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem) != cudaSuccess) {
        (void)cudaGetLastError();
        return 2;
    }
    f9_bwd_dkdv_ws_kernel<D><<<grid, F9_WS_NT, smem, st>>>(mq, mk, mv, mdo, dk, dv, lse, Dv, T, NH,
                                                           (size_t)qkv_stride, scale, scale_log2);
    return cudaGetLastError() == cudaSuccess ? 0 : 2;
}

// The one-kernel backward; scratch: D (B*NH*T), then (from a 64-float boundary) the dq
// accumulator (B*NH, ceil(T/64) tiles of 64 x D), then the counters (B*NH, ceil(T/64)).
template <int D>
static int f9_bwd_fused_launch(cudaStream_t st, f9_bf16 *dq, f9_bf16 *dk, f9_bf16 *dv,
                               const f9_bf16 *dout, const f9_bf16 *q, const f9_bf16 *k,
                               const f9_bf16 *v, const f9_bf16 *out, const float *lse, float *scratch,
                               int B, int T, int NH, int qkv_stride, int out_stride, int ordered,
                               int persist_mode, int heads, int kvstages, float *dsum, float *sums) {
    CUtensorMap mq, mk, mv, mdo;
    int cols = NH * D;
    if (!f9_tensor_map(&mq, q, cols, T, B, qkv_stride, 64) ||
        !f9_tensor_map(&mk, k, cols, T, B, qkv_stride, 64) ||
        !f9_tensor_map(&mv, v, cols, T, B, qkv_stride, 64) ||
        !f9_tensor_map(&mdo, dout, cols, T, B, out_stride, 64))
        return -1;
    size_t bnt = (size_t)B * NH * T;
    int nq64 = (T + F9_BT - 1) / F9_BT;
    size_t tiles = (size_t)B * NH * nq64;
    float *Dv = scratch, *acc = scratch + (bnt + 63) / 64 * 64;
    unsigned *sem = reinterpret_cast<unsigned *>(acc + tiles * F9_DQ_TILE(D));
    float scale = 1.0f / sqrtf((float)D), scale_log2 = scale * F9_LOG2E;
    dim3 grid((unsigned)(B * NH), (unsigned)((T + F9_ROWS - 1) / F9_ROWS));
    f9_bwd_pre_kernel<D><<<grid, F9_NT, 0, st>>>(Dv, sem, ordered ? NULL : acc, dout, out, T, NH,
                                                  (size_t)out_stride, nq64);
    if (cudaGetLastError() != cudaSuccess) return 2;
    // a second K and V stage fits beside the rest at head size 64 only (at 128 the kernel takes 226 KB
    // with one)
    kvstages = kvstages == 2 && D == 64 ? 2 : 1;
    size_t smem = 2 * (size_t)kvstages * F9_ROWS * D * 2 + 4 * (size_t)F9_BT * D * 2 + 2 * (size_t)F9_ROWS * F9_BT * 2 +
                  4 * 256 + 2 * (size_t)F9_DQ_TILE(D) * 4 + 128 + 1024; // bars: 96 bytes
    // persistent (a block per multiprocessor) for short sequences, where a block's fixed costs are a
    // large share of its work; a block per item beyond (measured: at T 2048 and 4096 the persistent blocks'
    // fixed order of items costs more in waits on the key-block order than it saves); persist_mode
    // 0 or 1 decides instead, for measuring. The heads walk is persistent always, on a multiple of
    // a head's P = ceil(nkb / 2) units of blocks (every block resident: its waits need that); where
    // one head's units outnumber the multiprocessors it falls back to the default walk.
    int nkb = (T + F9_ROWS - 1) / F9_ROWS, items = B * NH * nkb, P = (nkb + 1) / 2;
    int units = B * NH * P, grid_heads = min(units, f9_sm_count()) / P * P;
    if (grid_heads == 0) heads = 0;
    bool persist = heads || (persist_mode >= 0 ? persist_mode == 1 : T <= 1024);
    auto kernel = heads ? f9_bwd_ws_kernel<D, true, false> : f9_bwd_ws_kernel<D, false, false>;
    if (dsum) kernel = heads ? f9_bwd_ws_kernel<D, true, true> : f9_bwd_ws_kernel<D, false, true>;
    // with dsum: the column sums' partial rows, dk's and dv's per 16 key rows, then dq's per tile
    const int n16 = (T + 15) / 16, C = NH * D;
    float *kvsum = sums, *qsum = sums + (size_t)B * n16 * 2 * C;
    if (cudaFuncSetAttribute((const void *)kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem) !=
        cudaSuccess) {
        (void)cudaGetLastError();
        return 2;
    }
    int blocks = heads ? grid_heads : persist ? min(items, f9_sm_count()) : items;
    kernel<<<(unsigned)blocks, F9_WS_NT, smem, st>>>(mq, mk, mv, mdo, dk, dv, acc, sem, lse, Dv, T, NH, B * NH,
                                                     (size_t)qkv_stride, scale, scale_log2, ordered, kvstages,
                                                     kvsum);
    if (cudaGetLastError() != cudaSuccess) return 2;
    if (!dsum) {
        f9_bwd_post_kernel<D, false><<<(unsigned)tiles, F9_NT, 0, st>>>(dq, acc, T, NH, nq64, (size_t)qkv_stride,
                                                                         scale, NULL);
        return cudaGetLastError() == cudaSuccess ? 0 : 2;
    }
    f9_bwd_post_kernel<D, true><<<(unsigned)tiles, F9_NT, 0, st>>>(dq, acc, T, NH, nq64, (size_t)qkv_stride, scale,
                                                                    qsum);
    // dsum (q, then k and v; C each) += the partial rows, added in order
    colsum_finish(st, B * nq64, C, dsum, qsum);
    colsum_finish(st, B * n16, 2 * C, dsum + C, kvsum);
    return cudaGetLastError() == cudaSuccess ? 3 : 2;
}

extern "C" int flash_attention_sm90_bwd(void *stream, void *dq, void *dk, void *dv,
                                        const void *dout, const void *q, const void *k,
                                        const void *v, const void *out, const float *lse,
                                        float *scratch, int B, int T, int NH, int HS,
                                        int qkv_stride, int out_stride, int allow_ws, int persist,
                                        int heads, int kvstages, float *dsum, float *sums) {
    cudaStream_t st = (cudaStream_t)stream;
    f9_bf16 *a = (f9_bf16 *)dq, *b = (f9_bf16 *)dk, *c = (f9_bf16 *)dv;
    const f9_bf16 *g = (const f9_bf16 *)dout, *qq = (const f9_bf16 *)q, *kk = (const f9_bf16 *)k,
                  *vv = (const f9_bf16 *)v, *o = (const f9_bf16 *)out;
    bool ws = (HS == 64 || HS == 128) && allow_ws && ((size_t)q & 15) == 0 &&
              ((size_t)k & 15) == 0 && ((size_t)v & 15) == 0 && ((size_t)dout & 15) == 0;
    int rc = -1;
    bool fused = allow_ws == 1 || allow_ws == 3, ordered = allow_ws == 1;
    if (ws && fused && HS == 64)
        rc = f9_bwd_fused_launch<64>(st, a, b, c, g, qq, kk, vv, o, lse, scratch, B, T, NH, qkv_stride,
                                     out_stride, ordered, persist, heads, kvstages, dsum, sums);
    if (ws && fused && HS == 128)
        rc = f9_bwd_fused_launch<128>(st, a, b, c, g, qq, kk, vv, o, lse, scratch, B, T, NH, qkv_stride,
                                      out_stride, ordered, persist, heads, kvstages, dsum, sums);
    if (rc >= 0) return rc;
    if (ws && HS == 64)
        rc = f9_bwd_ws_launch<64>(st, a, b, c, g, qq, kk, vv, o, lse, scratch, B, T, NH, qkv_stride,
                                  out_stride);
    if (ws && HS == 128)
        rc = f9_bwd_ws_launch<128>(st, a, b, c, g, qq, kk, vv, o, lse, scratch, B, T, NH,
                                   qkv_stride, out_stride);
    if (rc >= 0) return rc;
    if (HS <= 64)
        return f9_bwd_launch<64>(st, a, b, c, g, qq, kk, vv, o, lse, scratch, B, T, NH, HS,
                                 qkv_stride, out_stride);
    return f9_bwd_launch<128>(st, a, b, c, g, qq, kk, vv, o, lse, scratch, B, T, NH, HS, qkv_stride,
                              out_stride);
}
