// backend_cuda.cu: the CUDA backend behind struct backend_i (src/backend.h), fp32 and bf16.
//
// One context per backend: a device, a compute dtype, a non-blocking stream, a cuBLAS handle bound
// to that stream (pedantic math: TF32 and emulation off) with its own workspace, a scratch buffer
// for reduction partials, and on the bf16 path a cuBLASLt product context (gemm.h). Every op is
// enqueued on the stream; only copy_to_host and synchronize wait.
//
// Two paths. TP_DTYPE_F32 is the reference: cuBLAS SGEMM, the naive attention through (T, T)
// score matrices, statistics in double; its numerics are fixed (tests compare it to the CPU at
// 1e-5). TP_DTYPE_BF16 is the fast path: compute tensors (activations, their gradients, the
// compute copy of the weights) are bf16, every op computes in fp32 and rounds on store; products
// run through gemm.h (bf16 tensor cores, fused bias / GELU / DGELU epilogues) and attention through
// flash_attention.h. Elementwise and normalisation kernels are templated on the storage type E
// (float or bf16) and move 16 bytes per access where the shape and alignment allow, with an
// element-wise fallback otherwise; for fp32 the vector forms do the same arithmetic per element
// as the scalar ones, so vectorising changed no fp32 bit.
//
// Determinism: no float atomics anywhere. Every reduction is split into per-block partials with a
// grid that depends only on the problem size, then summed in a fixed order, so identical inputs
// give bitwise identical outputs on every call (cuBLAS and the cached cuBLASLt algorithms are
// deterministic for a fixed handle, workspace and stream).
//
// Sections: context and checks, storage types, kernels, launchers, backend table, entry points.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "cuda_common.cuh"
#include "flash_attention.h"
#include "gemm.h"

extern "C" {
#include "backend.h"
}

// ---- context and checks

// Hopper wants a larger cuBLAS workspace than the 4 MiB default for its best kernels; the bf16
// product context gets the same.
#define CUDA_BLAS_WORKSPACE_BYTES ((size_t)32 << 20)
#define CUDA_GEMM_WORKSPACE_BYTES ((size_t)32 << 20)
// Rows summed by one block in a column-sum partial (layernorm dw/db, matmul dbias).
#define COLSUM_ROWS 32
// Blocks of a full reduction (sum, sumsq): fixed so the summation order depends on n only.
#define REDUCE_MAX_BLOCKS 1024
// Vocab rows are split into this many groups (row mod groups) for the embedding backward; a
// power of two so the group test is a mask. Each block scans all tokens, keeps its group's in
// token order (EMB_BWD_TILE at a time), then walks only those.
#define EMB_BWD_GROUPS 256
#define EMB_BWD_TILE 1024
#define EMB_BWD_THREADS 128
#define LN_EPS 1e-5 // GPT-2; double, as the fp32 path's statistics are
// bf16 layernorm backward: blocks of the fused kernel (fixed for a given N, so dw/db sum in a
// fixed order), each leaving one (C) partial of dw and of db.
#define LN_BWD_MAX_BLOCKS 256
// bf16 layernorm keeps a row in registers: up to LN_MAX_VPL vectors of 8 per lane (C <= 2048).
#define LN_MAX_VPL 8
// segments_sumsq and adamw: the flat buffer is cut into at most SEG_MAX_BLOCKS chunks of at least
// SEG_MIN_CHUNK elements (a multiple of 8), one block each; SEG_TILE table entries at a time in
// shared memory.
#define SEG_MAX_BLOCKS 2048
#define SEG_MIN_CHUNK 16384
#define SEG_TILE 128
#define XENT_BLOCK 512
// xent_stats: one row per block of XENT_STATS_BLOCK threads, four resident per SM so one block's
// final reduction hides behind the others' loads; each thread keeps XENT_UNROLL 16-byte loads in
// flight before it folds them in.
#define XENT_STATS_BLOCK 256
#define XENT_STATS_MIN_BLOCKS 4
#define XENT_UNROLL 4

struct cuda_ctx {
    int device;
    enum tp_dtype dtype;       // element type of the compute (void *) tensors
    cudaStream_t stream;       // every op of this backend runs here, NCCL too
    cublasHandle_t blas;       // bound to stream
    void *blas_ws;             // (CUDA_BLAS_WORKSPACE_BYTES) cuBLAS workspace
    struct gemm_ctx *gemm;     // bf16 products on stream; NULL on the fp32 path
    void *scratch;             // (scratch_bytes) reduction partials; grows, never shrinks
    size_t scratch_bytes;
    bool warned_gemm_fallback; // the bf16 product fallback has been reported once
};

static void cublas_check(cublasStatus_t s, const char *call, const char *file, int line) {
    if (s == CUBLAS_STATUS_SUCCESS) return;
    tp_die(TP_EXIT_RUNTIME,
           "%s:%d: cuBLAS error %d (%s) in %s; check the matrix sizes in the caller, that the GPU "
           "has free memory (nvidia-smi), and rerun with CUDA_LAUNCH_BLOCKING=1",
           file, line, (int)s, cublasGetStatusString(s), call);
}
#define CUBLAS_CHECK(call) cublas_check((call), #call, __FILE__, __LINE__)

// A bf16 product that gemm.h refused for a reason other than its shape: nothing to fall back on.
static _Noreturn void die_gemm(struct cuda_ctx *c, int rc, const char *op, int N, int IC, int OC,
                               const char *file, int line) {
    tp_die(TP_EXIT_RUNTIME,
           "%s:%d: bf16 %s failed for N=%d IC=%d OC=%d (gemm code %d: %s); check the shapes and "
           "pointers in the caller, that the GPU has free memory (nvidia-smi), and rerun with "
           "CUDA_LAUNCH_BLOCKING=1",
           file, line, op, N, IC, OC, rc, c->gemm ? gemm_last_error(c->gemm) : "no gemm context");
}
#define GEMM_DIE(c, rc, op, N, IC, OC) die_gemm((c), (rc), (op), (N), (IC), (OC), __FILE__, __LINE__)

static void flash_check(int rc, const char *op, int B, int T, int NH, int HS, const char *file,
                        int line) {
    if (rc == FLASH_OK) return;
    tp_die(TP_EXIT_RUNTIME,
           "%s:%d: bf16 %s failed for B=%d T=%d NH=%d HS=%d (%s); the tensors must be 16-byte "
           "aligned device memory; rerun with CUDA_LAUNCH_BLOCKING=1 to locate a launch failure",
           file, line, op, B, T, NH, HS,
           rc == FLASH_EBADARG ? "unsupported shape, stride or alignment" : "launch failed");
}
#define FLASH_CHECK(rc, op, B, T, NH, HS) flash_check((rc), (op), (B), (T), (NH), (HS), __FILE__, __LINE__)

static struct cuda_ctx *ctx_of(void *ctx) {
    struct cuda_ctx *c = (struct cuda_ctx *)ctx;
    // Cheap when already current; keeps a process that holds backends on two devices correct.
    CUDA_CHECK(cudaSetDevice(c->device));
    return c;
}

static _Noreturn void die_out_of_memory(struct cuda_ctx *c, size_t bytes, cudaError_t e,
                                        const char *what) {
    (void)cudaGetLastError(); // clear the (non-sticky) allocation error before querying
    size_t free_b = 0, total_b = 0;
    cudaMemGetInfo(&free_b, &total_b);
    tp_die(TP_EXIT_RUNTIME,
           "cuda backend: cannot allocate %zu bytes (%.3f GiB) for %s on device %d (%s); the device "
           "has %.3f GiB free of %.3f GiB. Reduce the batch size or sequence length, raise the "
           "tensor-parallel size, or free the GPU from other processes",
           bytes, (double)bytes / 1073741824.0, what, c->device, cudaGetErrorString(e),
           (double)free_b / 1073741824.0, (double)total_b / 1073741824.0);
}

// Scratch for reduction partials and fallback staging: grown on demand (rarely: the first step
// sizes it). Growing waits for the stream so no queued kernel still reads the old buffer; a
// pointer from an earlier call is therefore invalid after a call that asks for more.
static void *ctx_scratch(struct cuda_ctx *c, size_t bytes) {
    if (bytes <= c->scratch_bytes) return c->scratch;
    CUDA_CHECK(cudaStreamSynchronize(c->stream));
    if (c->scratch) CUDA_CHECK(cudaFree(c->scratch));
    c->scratch = NULL;
    c->scratch_bytes = 0;
    size_t want = tp_round_up(bytes, (size_t)1 << 20);
    cudaError_t e = cudaMalloc(&c->scratch, want);
    if (e != cudaSuccess) die_out_of_memory(c, want, e, "reduction scratch");
    c->scratch_bytes = want;
    return c->scratch;
}

static bool is_bf16(const struct cuda_ctx *c) { return c->dtype == TP_DTYPE_BF16; }

static bool aligned_to(const void *p, size_t bytes) { return ((uintptr_t)p % bytes) == 0; }

static size_t ceil_div(size_t a, size_t b) { return (a + b - 1) / b; }

// ---- storage types
//
// E is the storage type of a compute tensor: float, or bf16 (fp32's upper half, rounded to nearest
// even on store). Arithmetic is always fp32: to_f widens, from_f<E> rounds. vec_t<E, V> is V
// consecutive elements moved as one access (16 bytes on the fast paths: 4 floats or 8 bf16); its
// pointer must be aligned to the access, which the launchers check before choosing V > 1.

typedef __nv_bfloat16 bf16;

// Elements in one 16-byte access.
template <typename E> struct vec16 { static constexpr int n = 16 / (int)sizeof(E); };

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(bf16 x) { return __bfloat162float(x); }
template <typename E> __device__ __forceinline__ E from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_f<bf16>(float x) { return __float2bfloat16_rn(x); }

template <typename E, int V> struct alignas(sizeof(E) * V) vec_t {
    E e[V];
};

template <typename E, int V> __device__ __forceinline__ vec_t<E, V> ld_vec(const E *p) {
    vec_t<E, V> r;
    constexpr int bytes = (int)sizeof(E) * V;
    if constexpr (bytes % 16 == 0) {
#pragma unroll
        for (int q = 0; q < bytes / 16; q++)
            reinterpret_cast<int4 *>(&r)[q] = reinterpret_cast<const int4 *>(p)[q];
    } else if constexpr (bytes == 8) {
        *reinterpret_cast<int2 *>(&r) = *reinterpret_cast<const int2 *>(p);
    } else if constexpr (bytes == 4) {
        *reinterpret_cast<int *>(&r) = *reinterpret_cast<const int *>(p);
    } else {
#pragma unroll
        for (int k = 0; k < V; k++) r.e[k] = p[k];
    }
    return r;
}

template <typename E, int V> __device__ __forceinline__ void st_vec(E *p, const vec_t<E, V> &v) {
    constexpr int bytes = (int)sizeof(E) * V;
    if constexpr (bytes % 16 == 0) {
#pragma unroll
        for (int q = 0; q < bytes / 16; q++)
            reinterpret_cast<int4 *>(p)[q] = reinterpret_cast<const int4 *>(&v)[q];
    } else if constexpr (bytes == 8) {
        *reinterpret_cast<int2 *>(p) = *reinterpret_cast<const int2 *>(&v);
    } else if constexpr (bytes == 4) {
        *reinterpret_cast<int *>(p) = *reinterpret_cast<const int *>(&v);
    } else {
#pragma unroll
        for (int k = 0; k < V; k++) p[k] = v.e[k];
    }
}

// ---- kernels

struct sum_op {
    template <typename T> __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};
struct max_op {
    template <typename T> __device__ __forceinline__ T operator()(T a, T b) const { return fmax(a, b); }
};

// Butterfly reduction over a warp: every lane ends with the same value, combined in a fixed order.
template <typename T, typename Op> __device__ __forceinline__ T warp_reduce(T v, Op op) {
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ float warp_sum_f(float v) { return warp_reduce(v, sum_op()); }
__device__ __forceinline__ float warp_max_f(float v) { return warp_reduce(v, max_op()); }

// Block-wide reductions in a fixed order. Every thread of the block must call them; blockDim.x
// is a multiple of 32. sh holds at least 32 elements. All threads get the result; `identity`
// fills the lanes past the last warp.
template <typename T, typename Op> __device__ T block_reduce(T v, T *sh, Op op, T identity) {
    int lane = threadIdx.x % TPC_WARP, warp = threadIdx.x / TPC_WARP;
    int nwarps = blockDim.x / TPC_WARP;
    v = warp_reduce(v, op);
    __syncthreads(); // sh may still be read by a previous call
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    v = lane < nwarps ? sh[lane] : identity;
    return warp_reduce(v, op);
}

__device__ float block_sum_f(float v, float *sh) { return block_reduce(v, sh, sum_op(), 0.0f); }
__device__ double block_sum_d(double v, double *sh) { return block_reduce(v, sh, sum_op(), 0.0); }
__device__ float block_max_f(float v, float *sh) { return block_reduce(v, sh, max_op(), -INFINITY); }

#define GRID_STRIDE(i, n) \
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
         i += (size_t)gridDim.x * blockDim.x)

// -- conversions: dst (n) = src (n), widened or rounded; V elements per step, the last step may
// be partial

template <typename D, typename S, int V> __global__ void convert_kernel(D *dst, const S *src, size_t n) {
    GRID_STRIDE(k, (n + V - 1) / V) {
        size_t i = k * V;
        if (i + V <= n) {
            vec_t<S, V> a = ld_vec<S, V>(src + i);
            vec_t<D, V> b;
#pragma unroll
            for (int e = 0; e < V; e++) b.e[e] = from_f<D>(to_f(a.e[e]));
            st_vec<D, V>(dst + i, b);
        } else {
            for (size_t j = i; j < n; j++) dst[j] = from_f<D>(to_f(src[j]));
        }
    }
}

// -- embeddings

// out (N, C) = wte rows of the tokens in this shard, 0 for the others; V divides C
template <typename E, int V>
__global__ void vocab_embedding_fwd_kernel(E *out, const int *tokens, const E *wte, int N, int C,
                                           int vocab_start, int n_vocab) {
    size_t cv = (size_t)C / V; // vectors per row
    GRID_STRIDE(k, (size_t)N * cv) {
        size_t i = k / cv, c = (k % cv) * V;
        int r = tokens[i] - vocab_start;
        vec_t<E, V> v;
        if (r >= 0 && r < n_vocab) {
            v = ld_vec<E, V>(wte + (size_t)r * C + c);
        } else {
#pragma unroll
            for (int e = 0; e < V; e++) v.e[e] = from_f<E>(0.0f);
        }
        st_vec<E, V>(out + i * C + c, v);
    }
}

// grid (EMB_BWD_GROUPS, ceil(C / (blockDim * V))). Block (g, cy) owns V channels per thread of
// every vocab row r with r % EMB_BWD_GROUPS == g. Per tile of tokens it first lists, in token
// order, the tokens whose row is in its group (an ordered compaction: ballot per warp, prefix over
// warps), then walks only that list. Each dwte element is updated by exactly one thread, in token
// order, so no atomics are needed and the result is the same sum, in the same order, as a
// sequential loop over tokens; consecutive tokens of one row add up in registers, in that order,
// with one load and one store of dwte per run.
template <typename E, int V>
__global__ void __launch_bounds__(EMB_BWD_THREADS)
vocab_embedding_bwd_kernel(float *dwte, const E *__restrict__ dout, const int *tokens, int N, int C,
                           int vocab_start, int n_vocab) {
    __shared__ int rows[EMB_BWD_TILE]; // vocab row of each kept token, in token order
    __shared__ int toks[EMB_BWD_TILE]; // its position (row of dout)
    __shared__ int warp_n[EMB_BWD_THREADS / TPC_WARP];
    const int g = blockIdx.x;
    const int lane = threadIdx.x % TPC_WARP, warp = threadIdx.x / TPC_WARP;
    const int nwarps = blockDim.x / TPC_WARP;
    const int c = (blockIdx.y * blockDim.x + threadIdx.x) * V; // first channel of this thread
    for (int i0 = 0; i0 < N; i0 += EMB_BWD_TILE) {
        int cnt = min(EMB_BWD_TILE, N - i0);
        int kept = 0; // block-uniform
        for (int j0 = 0; j0 < cnt; j0 += blockDim.x) {
            int j = j0 + threadIdx.x;
            int r = j < cnt ? tokens[i0 + j] - vocab_start : -1;
            bool mine = r >= 0 && r < n_vocab && (r & (EMB_BWD_GROUPS - 1)) == g;
            unsigned int bal = __ballot_sync(0xffffffffu, mine);
            if (lane == 0) warp_n[warp] = __popc(bal);
            __syncthreads();
            int pos = kept, total = kept;
            for (int w = 0; w < nwarps; w++) {
                if (w < warp) pos += warp_n[w];
                total += warp_n[w];
            }
            if (mine) {
                pos += __popc(bal & ((1u << lane) - 1u));
                rows[pos] = r;
                toks[pos] = i0 + j;
            }
            kept = total;
            __syncthreads(); // warp_n is rewritten next round; the list is complete after the last
        }
        if (c < C && kept > 0) {
            int k = 0, r = rows[0];
            vec_t<float, V> acc = ld_vec<float, V>(dwte + (size_t)r * C + c);
            while (k < kept) {
                int end = k + 1; // the run of row r is [k, end)
                while (end < kept && rows[end] == r) end++;
                // The next run's row differs from r, and any earlier store to it has been
                // issued: its load can be in flight while this run adds up.
                int rn = end < kept ? rows[end] : -1;
                vec_t<float, V> next = {};
                if (rn >= 0) next = ld_vec<float, V>(dwte + (size_t)rn * C + c);
                for (; k < end; k++) {
                    vec_t<E, V> d = ld_vec<E, V>(dout + (size_t)toks[k] * C + c);
#pragma unroll
                    for (int e = 0; e < V; e++) acc.e[e] += to_f(d.e[e]);
                }
                st_vec<float, V>(dwte + (size_t)r * C + c, acc);
                r = rn;
                acc = next;
            }
        }
        __syncthreads(); // the list is rewritten by the next tile
    }
}

// x (B, T, C) += wpe (T, C) broadcast over B; V divides T*C
template <typename E, int V>
__global__ void position_embedding_fwd_kernel(E *x, const E *wpe, int B, int T, int C) {
    size_t TC = (size_t)T * C;
    GRID_STRIDE(k, (size_t)B * TC / V) {
        size_t i = k * V;
        vec_t<E, V> a = ld_vec<E, V>(x + i);
        vec_t<E, V> p = ld_vec<E, V>(wpe + i % TC);
#pragma unroll
        for (int e = 0; e < V; e++) a.e[e] = from_f<E>(to_f(a.e[e]) + to_f(p.e[e]));
        st_vec<E, V>(x + i, a);
    }
}

// One thread per V consecutive (t, c), summing over b in order; V divides T*C.
template <typename E, int V>
__global__ void position_embedding_bwd_kernel(float *dwpe, const E *dout, int B, int T, int C) {
    size_t TC = (size_t)T * C;
    GRID_STRIDE(k, TC / V) {
        size_t tc = k * V;
        vec_t<float, V> acc = ld_vec<float, V>(dwpe + tc);
        for (int b = 0; b < B; b++) {
            vec_t<E, V> d = ld_vec<E, V>(dout + (size_t)b * TC + tc);
#pragma unroll
            for (int e = 0; e < V; e++) acc.e[e] += to_f(d.e[e]);
        }
        st_vec<float, V>(dwpe + tc, acc);
    }
}

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
// over a row reloads it (an L1 hit) rather than holding it, which leaves the registers to the
// column sums.
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
                vec_t<bf16, 8> gp = ld_vec<bf16, 8>(dx + (size_t)v * 8);
#pragma unroll
                for (int e = 0; e < 8; e++) {
                    float n = (to_f(xp.e[e]) - m) * rs;
                    float dn = __fmul_rn(to_f(wp.e[e]), to_f(dp.e[e]));
                    gp.e[e] = from_f<bf16>(to_f(gp.e[e]) + (dn - s1 - n * s2) * rs);
                }
                st_vec<bf16, 8>(dx + (size_t)v * 8, gp);
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

// -- column sums

// grid (nchunks = ceil(N / COLSUM_ROWS), ceil(C / blockDim)): partial (nchunks, C) = per-chunk
// column sums of x (N, C), rows in order
template <typename E>
__global__ void colsum_partial_kernel(float *partial, const E *x, int N, int C) {
    int c = blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= C) return;
    int r0 = blockIdx.x * COLSUM_ROWS;
    int r1 = min(N, r0 + COLSUM_ROWS);
    float s = 0.0f;
    for (int r = r0; r < r1; r++) s += to_f(x[(size_t)r * C + c]);
    partial[(size_t)blockIdx.x * C + c] = s;
}

// out (C) += sum over chunks of partial (nchunks, C), chunks in order
__global__ void colsum_finish_kernel(float *out, const float *partial, int nchunks, int C) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float s = 0.0f;
    for (int k = 0; k < nchunks; k++) s += partial[(size_t)k * C + c];
    out[c] += s;
}

// Two column sums at once with more loads in flight: grid (ceil(C / 32), 2), block (32, 32);
// blockIdx.y picks (out0, p0) or (out1, p1). Thread (x, y) sums chunks y, y + 32, ... of column
// 32 * blockIdx.x + x in order; the 32 lane sums are then added in y order, so the result depends
// on nchunks only. out (C) += sum of partial (nchunks, C).
__global__ void colsum2_finish_kernel(float *out0, const float *p0, float *out1, const float *p1,
                                      int nchunks, int C) {
    __shared__ float sh[32][33];
    float *out = blockIdx.y ? out1 : out0;
    const float *p = blockIdx.y ? p1 : p0;
    int c = blockIdx.x * 32 + threadIdx.x;
    float s = 0.0f;
    if (c < C)
        for (int k = threadIdx.y; k < nchunks; k += 32) s += p[(size_t)k * C + c];
    sh[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && c < C) {
        float t = 0.0f;
        for (int y = 0; y < 32; y++) t += sh[y][threadIdx.x];
        out[c] += t;
    }
}

// -- linear layers and elementwise

// out (N, OC) += bias (OC) broadcast over rows (fp32 path, after SGEMM)
__global__ void add_bias_kernel(float *out, const float *bias, int N, int OC) {
    GRID_STRIDE(idx, (size_t)N * OC) out[idx] += bias[idx % OC];
}

// out (N, C) = res + x (+ bias); V divides C; out may alias res or x (each element is read and
// written by the same thread)
template <typename E, int V>
__global__ void residual_kernel(E *out, const E *res, const E *x, const E *bias, int N, int C) {
    GRID_STRIDE(k, (size_t)N * C / V) {
        size_t i = k * V;
        vec_t<E, V> a = ld_vec<E, V>(res + i), b = ld_vec<E, V>(x + i), o;
        vec_t<E, V> bb = {};
        if (bias) bb = ld_vec<E, V>(bias + i % C);
#pragma unroll
        for (int e = 0; e < V; e++) {
            float v = to_f(a.e[e]) + to_f(b.e[e]);
            if (bias) v += to_f(bb.e[e]);
            o.e[e] = from_f<E>(v);
        }
        st_vec<E, V>(out + i, o);
    }
}

#define GELU_SCALE 0.7978845608028654f // sqrt(2 / pi)

__device__ __forceinline__ float gelu_f(float x) {
    float cube = 0.044715f * x * x * x;
    return 0.5f * x * (1.0f + tanhf(GELU_SCALE * (x + cube)));
}

__device__ __forceinline__ float gelu_grad_f(float x) {
    float cube = 0.044715f * x * x * x;
    float th = tanhf(GELU_SCALE * (x + cube));
    float sech2 = 1.0f - th * th; // 1/cosh^2 without cosh's overflow
    return 0.5f * (1.0f + th) + x * 0.5f * sech2 * GELU_SCALE * (1.0f + 3.0f * 0.044715f * x * x);
}

template <typename E, int V> __global__ void gelu_fwd_kernel(E *out, const E *inp, size_t n) {
    GRID_STRIDE(k, (n + V - 1) / V) {
        size_t i = k * V;
        if (i + V <= n) {
            vec_t<E, V> a = ld_vec<E, V>(inp + i), o;
#pragma unroll
            for (int e = 0; e < V; e++) o.e[e] = from_f<E>(gelu_f(to_f(a.e[e])));
            st_vec<E, V>(out + i, o);
        } else {
            for (size_t j = i; j < n; j++) out[j] = from_f<E>(gelu_f(to_f(inp[j])));
        }
    }
}

// dinp = gelu'(inp) * dout; dinp may alias dout
template <typename E, int V>
__global__ void gelu_bwd_kernel(E *dinp, const E *inp, const E *dout, size_t n) {
    GRID_STRIDE(k, (n + V - 1) / V) {
        size_t i = k * V;
        if (i + V <= n) {
            vec_t<E, V> a = ld_vec<E, V>(inp + i), d = ld_vec<E, V>(dout + i), o;
#pragma unroll
            for (int e = 0; e < V; e++) o.e[e] = from_f<E>(gelu_grad_f(to_f(a.e[e])) * to_f(d.e[e]));
            st_vec<E, V>(dinp + i, o);
        } else {
            for (size_t j = i; j < n; j++)
                dinp[j] = from_f<E>(gelu_grad_f(to_f(inp[j])) * to_f(dout[j]));
        }
    }
}

// bf16 product fallback (shapes gemm.h refuses), after an fp32-output cuBLAS product acc:
// out (N, OC) = acc + bias, or with pre_gelu: pre_gelu = acc + bias, out = gelu(acc + bias)
__global__ void gemm_fallback_fwd_epilogue_kernel(bf16 *out, bf16 *pre_gelu, const float *acc,
                                                  const bf16 *bias, int N, int OC) {
    GRID_STRIDE(i, (size_t)N * OC) {
        float v = acc[i];
        if (bias) v += to_f(bias[i % OC]);
        if (pre_gelu) {
            pre_gelu[i] = from_f<bf16>(v);
            v = gelu_f(v);
        }
        out[i] = from_f<bf16>(v);
    }
}

// dinp (n) = acc, times gelu'(pre_gelu) when given
__global__ void gemm_fallback_bwd_epilogue_kernel(bf16 *dinp, const float *acc,
                                                  const bf16 *pre_gelu, size_t n) {
    GRID_STRIDE(i, n) {
        float v = acc[i];
        if (pre_gelu) v *= gelu_grad_f(to_f(pre_gelu[i]));
        dinp[i] = from_f<bf16>(v);
    }
}

// -- attention (fp32 reference path)

// Offset, in a token-major tensor whose rows (b, t) are row_stride floats apart and hold the
// heads side by side, of element idx of the head-major (B, NH, T, HS) layout.
__device__ __forceinline__ size_t attn_head_major_to_row(size_t idx, int T, int NH, int HS, size_t row_stride) {
    size_t d = idx % HS;
    size_t t = (idx / HS) % T;
    size_t h = (idx / ((size_t)HS * T)) % NH;
    size_t b = idx / ((size_t)HS * T * NH);
    return (b * T + t) * row_stride + h * HS + d;
}

// q, k, v (B, NH, T, HS) = the three parts of qkv (B, T, 3 * NH * HS)
__global__ void attn_permute_qkv_kernel(float *q, float *k, float *v, const float *qkv, int B,
                                        int T, int NH, int HS) {
    size_t C = (size_t)NH * HS;
    GRID_STRIDE(idx, (size_t)B * NH * T * HS) {
        size_t src = attn_head_major_to_row(idx, T, NH, HS, 3 * C);
        q[idx] = qkv[src];
        k[idx] = qkv[src + C];
        v[idx] = qkv[src + 2 * C];
    }
}

// dqkv (B, T, 3 * NH * HS) = [dq | dk | dv], each (B, NH, T, HS); indexed by the output so writes
// are coalesced
__global__ void attn_unpermute_qkv_kernel(float *dqkv, const float *dq, const float *dk,
                                          const float *dv, int B, int T, int NH, int HS) {
    size_t C = (size_t)NH * HS;
    GRID_STRIDE(idx, (size_t)B * T * 3 * C) {
        size_t col = idx % (3 * C);
        size_t bt = idx / (3 * C);
        size_t t = bt % T, b = bt / T;
        size_t part = col / C, h = (col % C) / HS, d = col % HS;
        size_t src = ((b * NH + h) * T + t) * HS + d;
        const float *from = part == 0 ? dq : (part == 1 ? dk : dv);
        dqkv[idx] = from[src];
    }
}

// out (B, T, NH * HS) = y (B, NH, T, HS)
__global__ void attn_unpermute_kernel(float *out, const float *y, int B, int T, int NH, int HS) {
    size_t C = (size_t)NH * HS;
    GRID_STRIDE(idx, (size_t)B * T * C) {
        size_t col = idx % C, bt = idx / C;
        size_t t = bt % T, b = bt / T;
        size_t h = col / HS, d = col % HS;
        out[idx] = y[((b * NH + h) * T + t) * HS + d];
    }
}

// dy (B, NH, T, HS) = dout (B, T, NH * HS)
__global__ void attn_permute_kernel(float *dy, const float *dout, int B, int T, int NH, int HS) {
    size_t C = (size_t)NH * HS;
    GRID_STRIDE(idx, (size_t)B * NH * T * HS) dy[idx] = dout[attn_head_major_to_row(idx, T, NH, HS, C)];
}

// att (BNH, T, T): each row t, already scaled, becomes its causal softmax over [0, t]; the
// masked part [t+1, T) is written as 0 so later full matrix products can ignore the mask.
// One warp per row.
__global__ void attn_softmax_fwd_kernel(float *att, int BNH, int T) {
    size_t row = (size_t)blockIdx.x * (blockDim.x / TPC_WARP) + threadIdx.x / TPC_WARP;
    int lane = threadIdx.x % TPC_WARP;
    if (row >= (size_t)BNH * T) return;
    int t = (int)(row % T);
    float *a = att + row * T; // (T)
    float mx = -INFINITY;
    for (int j = lane; j <= t; j += TPC_WARP) mx = fmaxf(mx, a[j]);
    mx = warp_max_f(mx);
    float s = 0.0f;
    for (int j = lane; j <= t; j += TPC_WARP) {
        float e = expf(a[j] - mx);
        a[j] = e;
        s += e;
    }
    s = warp_sum_f(s);
    float inv = 1.0f / s;
    for (int j = lane; j < T; j += TPC_WARP) a[j] = j <= t ? a[j] * inv : 0.0f;
}

// datt (BNH, T, T) in place becomes dpreatt = att * (datt - sum_j att * datt) * scale on the
// causal part, 0 above the diagonal. One warp per row.
__global__ void attn_softmax_bwd_kernel(float *datt, const float *att, int BNH, int T,
                                        float scale) {
    size_t row = (size_t)blockIdx.x * (blockDim.x / TPC_WARP) + threadIdx.x / TPC_WARP;
    int lane = threadIdx.x % TPC_WARP;
    if (row >= (size_t)BNH * T) return;
    int t = (int)(row % T);
    float *da = datt + row * T;     // (T)
    const float *a = att + row * T; // (T)
    float s = 0.0f;
    for (int j = lane; j <= t; j += TPC_WARP) s += a[j] * da[j];
    s = warp_sum_f(s);
    for (int j = lane; j < T; j += TPC_WARP) da[j] = j <= t ? a[j] * (da[j] - s) * scale : 0.0f;
}

// One query row against a KV cache (generation): one block per head. scores (NH, n_ctx) in
// global memory, so the context length is not bounded by shared memory.
template <typename E>
__global__ void attn_decode_kernel(E *out, float *scores, const E *q, const E *kc, const E *vc,
                                   int n_ctx, int NH, int HS, float scale) {
    __shared__ float sh[TPC_WARP];
    int h = blockIdx.x;
    size_t C = (size_t)NH * HS;
    const E *qh = q + (size_t)h * HS;      // (HS)
    float *s = scores + (size_t)h * n_ctx; // (n_ctx)
    float mx = -INFINITY;
    for (int j = threadIdx.x; j < n_ctx; j += blockDim.x) {
        const E *k = kc + (size_t)j * C + (size_t)h * HS;
        float acc = 0.0f;
        for (int d = 0; d < HS; d++) acc += to_f(qh[d]) * to_f(k[d]);
        acc *= scale;
        s[j] = acc;
        mx = fmaxf(mx, acc);
    }
    mx = block_max_f(mx, sh);
    float sum = 0.0f;
    for (int j = threadIdx.x; j < n_ctx; j += blockDim.x) {
        float e = expf(s[j] - mx);
        s[j] = e;
        sum += e;
    }
    sum = block_sum_f(sum, sh); // its barriers also publish s[] to the whole block
    float inv = 1.0f / sum;
    for (int d = threadIdx.x; d < HS; d += blockDim.x) {
        float acc = 0.0f;
        for (int j = 0; j < n_ctx; j++) acc += s[j] * to_f(vc[(size_t)j * C + (size_t)h * HS + d]);
        out[(size_t)h * HS + d] = from_f<E>(acc * inv);
    }
}

// -- vocab-parallel cross-entropy: one block per row; V columns per access (V divides n_vocab),
// the vector that straddles n_real masked element-wise. The statistics read the logits once, in
// 16-byte accesses for both storage types where the rows allow; the backward keeps one column per
// access on the fp32 path.

// exp(x) for x <= 0: the fp32 path keeps expf; bf16 logits carry 8 significant bits, so the
// hardware exp2 (relative error about 2^-21) is exact enough and saves the instructions that
// would otherwise compete with the memory stream.
template <typename E> __device__ __forceinline__ float xent_exp(float x);
template <> __device__ __forceinline__ float xent_exp<float>(float x) { return expf(x); }
template <> __device__ __forceinline__ float xent_exp<bf16>(float x) { return __expf(x); }

// One pass over each row (online softmax). Every thread folds its columns into a running
// (max m, sum s of exp(x - m)), a group of XENT_UNROLL vectors at a time: the group's max first,
// then s is moved onto the new max once and the group's exponentials are added. The block then
// takes the max of the threads' m and sums their s rescaled onto it, both in a fixed order. The
// target logit is taken from registers by the thread whose vector holds it.

// Folds one group into (m, s): x[u] holds columns [j0 + u * js, + V). With MASK, columns at or
// past n_real (padding, or vectors past the row) are left out; without, all are real (every group
// but a row's last).
template <typename E, int V, bool MASK>
__device__ __forceinline__ void xent_fold(float &m, float &s, float *target_out,
                                          const vec_t<E, V> (&x)[XENT_UNROLL], int j0, int js,
                                          int n_real, int r) {
    float gm = -INFINITY;
#pragma unroll
    for (int u = 0; u < XENT_UNROLL; u++) {
        int ju = j0 + u * js;
#pragma unroll
        for (int e = 0; e < V; e++)
            if (!MASK || ju + e < n_real) gm = fmaxf(gm, to_f(x[u].e[e]));
        if ((unsigned)(r - ju) < (unsigned)V && (!MASK || r < n_real)) {
#pragma unroll
            for (int e = 0; e < V; e++)
                if (ju + e == r) *target_out = to_f(x[u].e[e]);
        }
    }
    if (gm > m) {
        s *= xent_exp<E>(m - gm); // exp(-inf) = 0 on the first group
        m = gm;
    }
    // with m still -inf every value seen is -inf and adds 0; shift by 0 to avoid -inf - -inf
    float mu = m == -INFINITY ? 0.0f : m;
#pragma unroll
    for (int u = 0; u < XENT_UNROLL; u++) {
        int ju = j0 + u * js;
#pragma unroll
        for (int e = 0; e < V; e++)
            if (!MASK || ju + e < n_real) s += xent_exp<E>(to_f(x[u].e[e]) - mu);
    }
}

// maxes (N), sums (2, N): [0][i] = sum exp(logit - max) over real columns, [1][i] = target logit
// or 0; a row without real columns gets max -inf and sum 0.
template <typename E, int V>
__global__ void __launch_bounds__(XENT_STATS_BLOCK, XENT_STATS_MIN_BLOCKS)
xent_stats_kernel(float *maxes, float *sums, const E *logits, const int *targets, int N,
                  int vocab_start, int n_real, int n_vocab) {
    __shared__ float sh[TPC_WARP];
    size_t i = blockIdx.x;
    const E *row = logits + i * n_vocab; // (n_vocab)
    float *target_out = sums + (size_t)N + i;
    int r = targets[i] - vocab_start; // the target's column here, if in [0, n_real)
    int nv = (n_real + V - 1) / V, bs = (int)blockDim.x;
    float m = -INFINITY, s = 0.0f;
    for (int k0 = threadIdx.x; k0 < nv; k0 += XENT_UNROLL * bs) {
        vec_t<E, V> x[XENT_UNROLL];
#pragma unroll
        for (int u = 0; u < XENT_UNROLL; u++) {
            int k = k0 + u * bs;
            if (k < nv)
                x[u] = ld_vec<E, V>(row + (size_t)k * V);
            else
                x[u] = vec_t<E, V>{}; // masked in the fold; defined all the same
        }
        if ((k0 + (XENT_UNROLL - 1) * bs + 1) * V <= n_real)
            xent_fold<E, V, false>(m, s, target_out, x, k0 * V, bs * V, n_real, r);
        else
            xent_fold<E, V, true>(m, s, target_out, x, k0 * V, bs * V, n_real, r);
    }
    float bm = block_max_f(m, sh);
    s = m == -INFINITY ? 0.0f : s * xent_exp<E>(m - bm);
    s = block_sum_f(s, sh);
    if (threadIdx.x == 0) {
        maxes[i] = bm;
        sums[i] = s;
        if (r < 0 || r >= n_real) *target_out = 0.0f;
    }
}

// sums[0] (N) *= exp(local_max - max): this rank's sums onto the global max; a rank without real
// columns (local max -inf) contributes 0
__global__ void xent_rescale_kernel(float *sums, const float *local_maxes, const float *maxes,
                                    int N) {
    GRID_STRIDE(i, (size_t)N) {
        float lm = local_maxes[i];
        sums[i] *= lm == -INFINITY ? 0.0f : expf(lm - maxes[i]);
    }
}

__global__ void xent_loss_kernel(float *losses, const float *maxes, const float *sums, int N) {
    GRID_STRIDE(i, (size_t)N) losses[i] = logf(sums[i]) + maxes[i] - sums[(size_t)N + i];
}

// dlogits (N, n_vocab) = (softmax - onehot) * dloss on real columns, 0 on padding; in place safe
// (each element is read and written by the same thread). A thread loads XENT_UNROLL vectors
// before it stores any: with dlogits possibly aliasing logits the compiler may not move a load
// above an earlier store, so without the explicit grouping only one load would be in flight.
template <typename E, int V>
__global__ void xent_bwd_kernel(E *dlogits, const E *logits, const float *maxes, const float *sums,
                                const int *targets, float dloss, int vocab_start, int n_real,
                                int n_vocab) {
    size_t i = blockIdx.x;
    const E *row = logits + i * n_vocab;
    E *drow = dlogits + i * n_vocab;
    float mx = maxes[i];
    float inv = 1.0f / sums[i];
    int r = targets[i] - vocab_start;
    int nv = n_vocab / V, bs = (int)blockDim.x;
    for (int k0 = threadIdx.x; k0 < nv; k0 += XENT_UNROLL * bs) {
        vec_t<E, V> x[XENT_UNROLL];
#pragma unroll
        for (int u = 0; u < XENT_UNROLL; u++) {
            int k = k0 + u * bs;
            if (k < nv)
                x[u] = ld_vec<E, V>(row + (size_t)k * V);
            else
                x[u] = vec_t<E, V>{}; // not stored; defined all the same
        }
#pragma unroll
        for (int u = 0; u < XENT_UNROLL; u++) {
            int k = k0 + u * bs;
            if (k >= nv) break;
            vec_t<E, V> o;
#pragma unroll
            for (int e = 0; e < V; e++) {
                int j = k * V + e;
                float d = 0.0f;
                if (j < n_real) {
                    float p = xent_exp<E>(to_f(x[u].e[e]) - mx) * inv;
                    d = (p - (j == r ? 1.0f : 0.0f)) * dloss;
                }
                o.e[e] = from_f<E>(d);
            }
            st_vec<E, V>(drow + (size_t)k * V, o);
        }
    }
}

// -- reductions and optimiser

// partial (gridDim.x) = per-block sums (of squares if squared) in double, grid-stride order
__global__ void reduce_partial_kernel(double *partial, const float *x, size_t n, int squared) {
    __shared__ double sh[TPC_WARP];
    double s = 0.0;
    GRID_STRIDE(i, n) {
        double v = (double)x[i];
        s += squared ? v * v : v;
    }
    s = block_sum_d(s, sh);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

// *out = (accumulate ? *out : 0) + sum of partial (nparts); one block
__global__ void reduce_finish_kernel(float *out, const double *partial, int nparts,
                                     int accumulate) {
    __shared__ double sh[TPC_WARP];
    double s = 0.0;
    for (int k = threadIdx.x; k < nparts; k += blockDim.x) s += partial[k];
    s = block_sum_d(s, sh);
    if (threadIdx.x == 0) *out = (float)(accumulate ? (double)*out + s : s);
}

__global__ void scale_kernel(float *x, float s, size_t n) {
    GRID_STRIDE(i, n) x[i] *= s;
}

// Segment-table walks (segments_sumsq, adamw): block b owns elements [b * chunk, (b + 1) * chunk)
// of the flat buffer and visits, in table order, every segment that overlaps them; the table
// passes through shared memory SEG_TILE entries at a time, and every thread takes part in the
// walk (it is block-uniform). An overlap [lo, hi) is cut into a scalar head up to the next
// multiple of 4, 4-element vectors, and a scalar tail, so each element is touched by exactly one
// thread and vector accesses stay aligned when the buffers are.

// The overlap [lo, hi) of segment s with [c0, c1); false if empty.
__device__ __forceinline__ bool seg_overlap(const struct param_segment &s, size_t c0, size_t c1,
                                            size_t *lo, size_t *hi) {
    size_t a = s.offset > c0 ? s.offset : c0;
    size_t e = s.offset + s.numel;
    size_t b = e < c1 ? e : c1;
    *lo = a;
    *hi = b;
    return a < b;
}

// partial (gridDim.x, 2) = per-block sums of x^2 in double, by norm group
template <bool VEC>
__global__ void segments_sumsq_partial_kernel(double *partial, const float *x,
                                              const struct param_segment *segs, int n_segs,
                                              size_t n, size_t chunk) {
    __shared__ struct param_segment tab[SEG_TILE];
    __shared__ double sh[TPC_WARP];
    size_t c0 = (size_t)blockIdx.x * chunk;
    size_t c1 = c0 + chunk < n ? c0 + chunk : n;
    double acc0 = 0.0, acc1 = 0.0; // norm groups 0 and 1
    for (int s0 = 0; s0 < n_segs; s0 += SEG_TILE) {
        int cnt = min(SEG_TILE, n_segs - s0);
        __syncthreads(); // the previous tile is no longer read
        for (int j = threadIdx.x; j < cnt; j += blockDim.x) tab[j] = segs[s0 + j];
        __syncthreads();
        for (int j = 0; j < cnt; j++) {
            size_t lo, hi;
            if (!seg_overlap(tab[j], c0, c1, &lo, &hi)) continue;
            double s = 0.0;
            size_t body = lo, nb = 0;
            if (VEC) {
                body = (lo + 3) & ~(size_t)3;
                if (body > hi) body = hi;
                nb = (hi - body) / 4;
            }
            for (size_t i = lo + threadIdx.x; i < body; i += blockDim.x) {
                double v = x[i];
                s += v * v;
            }
            const float4 *x4 = reinterpret_cast<const float4 *>(x + body);
            for (size_t q = threadIdx.x; q < nb; q += blockDim.x) {
                float4 v = x4[q];
                s += (double)v.x * v.x + (double)v.y * v.y + (double)v.z * v.z + (double)v.w * v.w;
            }
            for (size_t i = body + nb * 4 + threadIdx.x; i < hi; i += blockDim.x) {
                double v = x[i];
                s += v * v;
            }
            if (tab[j].norm_group == 1) acc1 += s;
            else acc0 += s;
        }
    }
    double g0 = block_sum_d(acc0, sh);
    double g1 = block_sum_d(acc1, sh);
    if (threadIdx.x == 0) {
        partial[2 * (size_t)blockIdx.x] = g0;
        partial[2 * (size_t)blockIdx.x + 1] = g1;
    }
}

// out (2) = sums of partial (nparts, 2) by group, parts in a fixed order; one block
__global__ void segments_sumsq_finish_kernel(float *out, const double *partial, int nparts) {
    __shared__ double sh[TPC_WARP];
    for (int g = 0; g < 2; g++) {
        double s = 0.0;
        for (int k = threadIdx.x; k < nparts; k += blockDim.x) s += partial[2 * (size_t)k + g];
        s = block_sum_d(s, sh);
        if (threadIdx.x == 0) out[g] = (float)s;
    }
}

struct adamw_args {
    float lr, beta1, beta2, eps, grad_scale, grad_clip, bc1, bc2; // bc = 1 - beta^t
    const float *norm_sq;                                         // (2) or NULL
};

// One AdamW element, decoupled weight decay; the fp32 expression of the reference.
__device__ __forceinline__ float adamw_elem(float *p, float *m, float *v, float g, float wd,
                                            const struct adamw_args &a) {
    float mi = a.beta1 * *m + (1.0f - a.beta1) * g;
    float vi = a.beta2 * *v + (1.0f - a.beta2) * g * g;
    *m = mi;
    *v = vi;
    float mhat = mi / a.bc1, vhat = vi / a.bc2;
    *p -= a.lr * (mhat / (sqrtf(vhat) + a.eps) + wd * *p);
    return *p;
}

// p, g, m, v (n) fp32, pc (n) E or NULL; one launch over every segment (see the walk above).
// g is scaled by grad_scale, times min(1, grad_clip / ||g * grad_scale||) when norm_sq is given.
template <typename E, bool VEC>
__global__ void adamw_kernel(float *p, E *pc, const float *g, float *m, float *v,
                             const struct param_segment *segs, int n_segs, size_t n, size_t chunk,
                             struct adamw_args a) {
    __shared__ struct param_segment tab[SEG_TILE];
    float gs = a.grad_scale;
    if (a.norm_sq && a.grad_clip > 0.0f) {
        float norm = sqrtf(a.norm_sq[0] + a.norm_sq[1]);
        if (norm > a.grad_clip) gs = a.grad_scale * (a.grad_clip / norm);
    }
    size_t c0 = (size_t)blockIdx.x * chunk;
    size_t c1 = c0 + chunk < n ? c0 + chunk : n;
    for (int s0 = 0; s0 < n_segs; s0 += SEG_TILE) {
        int cnt = min(SEG_TILE, n_segs - s0);
        __syncthreads();
        for (int j = threadIdx.x; j < cnt; j += blockDim.x) tab[j] = segs[s0 + j];
        __syncthreads();
        for (int j = 0; j < cnt; j++) {
            size_t lo, hi;
            if (!seg_overlap(tab[j], c0, c1, &lo, &hi)) continue;
            float wd = tab[j].weight_decay;
            size_t body = lo, nb = 0;
            if (VEC) {
                body = (lo + 3) & ~(size_t)3;
                if (body > hi) body = hi;
                nb = (hi - body) / 4;
            }
            for (size_t i = lo + threadIdx.x; i < body; i += blockDim.x) {
                float pi = adamw_elem(p + i, m + i, v + i, g[i] * gs, wd, a);
                if (pc) pc[i] = from_f<E>(pi);
            }
            for (size_t q = threadIdx.x; q < nb; q += blockDim.x) {
                size_t i = body + 4 * q;
                vec_t<float, 4> pv = ld_vec<float, 4>(p + i), gv = ld_vec<float, 4>(g + i);
                vec_t<float, 4> mv = ld_vec<float, 4>(m + i), vv = ld_vec<float, 4>(v + i);
                vec_t<E, 4> cv;
#pragma unroll
                for (int e = 0; e < 4; e++)
                    cv.e[e] = from_f<E>(adamw_elem(&pv.e[e], &mv.e[e], &vv.e[e], gv.e[e] * gs, wd, a));
                st_vec<float, 4>(p + i, pv);
                st_vec<float, 4>(m + i, mv);
                st_vec<float, 4>(v + i, vv);
                if (pc) st_vec<E, 4>(pc + i, cv);
            }
            for (size_t i = body + nb * 4 + threadIdx.x; i < hi; i += blockDim.x) {
                float pi = adamw_elem(p + i, m + i, v + i, g[i] * gs, wd, a);
                if (pc) pc[i] = from_f<E>(pi);
            }
        }
    }
}

// ---- launchers

// Elementwise grids: enough blocks to fill the device, grid-stride beyond that.
static unsigned int ew_blocks(size_t n) {
    unsigned int b = tpc_blocks(n, TPC_BLOCK);
    return b > 65536u ? 65536u : b;
}

// Rows handled by one warp-per-row kernel block.
static unsigned int warp_row_blocks(size_t rows) {
    return tpc_blocks(rows, TPC_BLOCK / TPC_WARP);
}

static const char *cuda_name(void *ctx) {
    (void)ctx;
    return "cuda";
}

static enum tp_dtype cuda_dtype(void *ctx) { return ((struct cuda_ctx *)ctx)->dtype; }

static void *cuda_alloc(void *ctx, size_t bytes) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (bytes == 0) bytes = 1; // a valid, distinct pointer, as calloc(0) may give
    void *p = NULL;
    cudaError_t e = cudaMalloc(&p, bytes);
    if (e != cudaSuccess) die_out_of_memory(c, bytes, e, "a backend buffer");
    CUDA_CHECK(cudaMemsetAsync(p, 0, bytes, c->stream));
    return p;
}

static void cuda_free(void *ctx, void *ptr) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (!ptr) return;
    // queued work may still use ptr; cudaFree alone does not order against a non-blocking stream
    CUDA_CHECK(cudaStreamSynchronize(c->stream));
    CUDA_CHECK(cudaFree(ptr));
}

static void cuda_zero(void *ctx, void *ptr, size_t bytes) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (bytes == 0) return;
    CUDA_CHECK(cudaMemsetAsync(ptr, 0, bytes, c->stream));
}

static void cuda_copy_to_device(void *ctx, void *dst, const void *host_src, size_t bytes) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (bytes == 0) return;
    CUDA_CHECK(cudaMemcpyAsync(dst, host_src, bytes, cudaMemcpyHostToDevice, c->stream));
    // From pageable memory the call returns once the source is staged, so the caller may reuse
    // it. From pinned memory the copy is truly asynchronous: wait, so callers never need to know.
    cudaPointerAttributes attr;
    if (cudaPointerGetAttributes(&attr, host_src) != cudaSuccess) {
        (void)cudaGetLastError();
        CUDA_CHECK(cudaStreamSynchronize(c->stream));
    } else if (attr.type == cudaMemoryTypeHost) {
        CUDA_CHECK(cudaStreamSynchronize(c->stream));
    }
}

static void cuda_copy_to_host(void *ctx, void *host_dst, const void *src, size_t bytes) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (bytes == 0) return;
    CUDA_CHECK(cudaMemcpyAsync(host_dst, src, bytes, cudaMemcpyDeviceToHost, c->stream));
    CUDA_CHECK(cudaStreamSynchronize(c->stream));
}

static void cuda_copy(void *ctx, void *dst, const void *src, size_t bytes) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (bytes == 0 || dst == src) return;
    CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, c->stream));
}

// dst (n) D = src (n) S, 8 elements per access when both are 16-byte aligned
template <typename D, typename S>
static void launch_convert(struct cuda_ctx *c, D *dst, const S *src, size_t n) {
    if (n == 0) return;
    if (aligned_to(dst, 16) && aligned_to(src, 16))
        convert_kernel<D, S, 8><<<ew_blocks(ceil_div(n, 8)), TPC_BLOCK, 0, c->stream>>>(dst, src, n);
    else
        convert_kernel<D, S, 1><<<ew_blocks(n), TPC_BLOCK, 0, c->stream>>>(dst, src, n);
    CUDA_CHECK_LAUNCH("convert_kernel");
}

static void cuda_to_compute(void *ctx, void *dst, const float *src, size_t n) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (n == 0) return;
    if (is_bf16(c)) launch_convert(c, (bf16 *)dst, src, n);
    else if (dst != src)
        CUDA_CHECK(cudaMemcpyAsync(dst, src, n * sizeof(float), cudaMemcpyDeviceToDevice, c->stream));
}

static void cuda_from_compute(void *ctx, float *dst, const void *src, size_t n) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (n == 0) return;
    if (is_bf16(c)) launch_convert(c, dst, (const bf16 *)src, n);
    else if (dst != src)
        CUDA_CHECK(cudaMemcpyAsync(dst, src, n * sizeof(float), cudaMemcpyDeviceToDevice, c->stream));
}

static void cuda_synchronize(void *ctx) {
    struct cuda_ctx *c = ctx_of(ctx);
    CUDA_CHECK(cudaStreamSynchronize(c->stream));
}

static void *cuda_native_stream(void *ctx) {
    return (void *)((struct cuda_ctx *)ctx)->stream;
}

static void cuda_destroy(void *ctx) {
    struct cuda_ctx *c = ctx_of(ctx);
    CUDA_CHECK(cudaStreamSynchronize(c->stream));
    if (c->gemm) gemm_destroy(c->gemm);
    CUBLAS_CHECK(cublasDestroy(c->blas));
    if (c->blas_ws) CUDA_CHECK(cudaFree(c->blas_ws));
    if (c->scratch) CUDA_CHECK(cudaFree(c->scratch));
    CUDA_CHECK(cudaStreamDestroy(c->stream));
    free(c);
}

// -- embeddings

template <typename E>
static void vocab_embedding_fwd_impl(struct cuda_ctx *c, E *out, const int *tokens, const E *wte,
                                     int N, int C, int vocab_start, int n_vocab) {
    const int V = vec16<E>::n;
    size_t n = (size_t)N * C;
    if (C % V == 0 && aligned_to(out, 16) && aligned_to(wte, 16))
        vocab_embedding_fwd_kernel<E, V><<<ew_blocks(n / V), TPC_BLOCK, 0, c->stream>>>(
            out, tokens, wte, N, C, vocab_start, n_vocab);
    else
        vocab_embedding_fwd_kernel<E, 1><<<ew_blocks(n), TPC_BLOCK, 0, c->stream>>>(
            out, tokens, wte, N, C, vocab_start, n_vocab);
    CUDA_CHECK_LAUNCH("vocab_embedding_fwd_kernel");
}

static void cuda_vocab_embedding_fwd(void *ctx, void *out, const int *tokens, const void *wte,
                                     int N, int C, int vocab_start, int n_vocab) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (N <= 0 || C <= 0) return;
    if (is_bf16(c))
        vocab_embedding_fwd_impl(c, (bf16 *)out, tokens, (const bf16 *)wte, N, C, vocab_start, n_vocab);
    else
        vocab_embedding_fwd_impl(c, (float *)out, tokens, (const float *)wte, N, C, vocab_start, n_vocab);
}

template <typename E>
static void vocab_embedding_bwd_impl(struct cuda_ctx *c, float *dwte, const E *dout,
                                     const int *tokens, int N, int C, int vocab_start,
                                     int n_vocab) {
    // 4 channels per thread: one 16-byte dwte access, 8 or 16 bytes of dout
    const int V = 4;
    bool vec = C % V == 0 && aligned_to(dwte, 16) && aligned_to(dout, V * sizeof(E));
    int per_block = EMB_BWD_THREADS * (vec ? V : 1);
    dim3 grid(EMB_BWD_GROUPS, tpc_blocks((size_t)C, (size_t)per_block));
    if (vec)
        vocab_embedding_bwd_kernel<E, V><<<grid, EMB_BWD_THREADS, 0, c->stream>>>(
            dwte, dout, tokens, N, C, vocab_start, n_vocab);
    else
        vocab_embedding_bwd_kernel<E, 1><<<grid, EMB_BWD_THREADS, 0, c->stream>>>(
            dwte, dout, tokens, N, C, vocab_start, n_vocab);
    CUDA_CHECK_LAUNCH("vocab_embedding_bwd_kernel");
}

static void cuda_vocab_embedding_bwd(void *ctx, float *dwte, const void *dout, const int *tokens,
                                     int N, int C, int vocab_start, int n_vocab) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (N <= 0 || C <= 0 || n_vocab <= 0) return;
    if (is_bf16(c))
        vocab_embedding_bwd_impl(c, dwte, (const bf16 *)dout, tokens, N, C, vocab_start, n_vocab);
    else
        vocab_embedding_bwd_impl(c, dwte, (const float *)dout, tokens, N, C, vocab_start, n_vocab);
}

template <typename E>
static void position_embedding_fwd_impl(struct cuda_ctx *c, E *x, const E *wpe, int B, int T,
                                        int C) {
    const int V = vec16<E>::n;
    size_t n = (size_t)B * T * C;
    if (((size_t)T * C) % V == 0 && aligned_to(x, 16) && aligned_to(wpe, 16))
        position_embedding_fwd_kernel<E, V><<<ew_blocks(n / V), TPC_BLOCK, 0, c->stream>>>(x, wpe, B, T, C);
    else
        position_embedding_fwd_kernel<E, 1><<<ew_blocks(n), TPC_BLOCK, 0, c->stream>>>(x, wpe, B, T, C);
    CUDA_CHECK_LAUNCH("position_embedding_fwd_kernel");
}

static void cuda_position_embedding_fwd(void *ctx, void *x, const void *wpe, int B, int T, int C) {
    struct cuda_ctx *c = ctx_of(ctx);
    if ((size_t)B * T * C == 0 || B <= 0) return;
    if (is_bf16(c)) position_embedding_fwd_impl(c, (bf16 *)x, (const bf16 *)wpe, B, T, C);
    else position_embedding_fwd_impl(c, (float *)x, (const float *)wpe, B, T, C);
}

template <typename E>
static void position_embedding_bwd_impl(struct cuda_ctx *c, float *dwpe, const E *dout, int B,
                                        int T, int C) {
    const int V = 4; // one 16-byte dwpe access; 8 or 16 bytes of dout
    size_t n = (size_t)T * C;
    if (n % V == 0 && aligned_to(dwpe, 16) && aligned_to(dout, V * sizeof(E)))
        position_embedding_bwd_kernel<E, V><<<ew_blocks(n / V), TPC_BLOCK, 0, c->stream>>>(dwpe, dout, B, T, C);
    else
        position_embedding_bwd_kernel<E, 1><<<ew_blocks(n), TPC_BLOCK, 0, c->stream>>>(dwpe, dout, B, T, C);
    CUDA_CHECK_LAUNCH("position_embedding_bwd_kernel");
}

static void cuda_position_embedding_bwd(void *ctx, float *dwpe, const void *dout, int B, int T,
                                        int C) {
    struct cuda_ctx *c = ctx_of(ctx);
    if ((size_t)T * C == 0 || B <= 0) return;
    if (is_bf16(c)) position_embedding_bwd_impl(c, dwpe, (const bf16 *)dout, B, T, C);
    else position_embedding_bwd_impl(c, dwpe, (const float *)dout, B, T, C);
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

static void cuda_layernorm_fwd(void *ctx, void *out, float *mean, float *rstd, const void *inp,
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
    unsigned int cb = tpc_blocks((size_t)C, TPC_BLOCK);
    colsum_finish_kernel<<<cb, TPC_BLOCK, 0, c->stream>>>(dw, pw, (int)nchunks, C);
    CUDA_CHECK_LAUNCH("colsum_finish_kernel (layernorm dw)");
    colsum_finish_kernel<<<cb, TPC_BLOCK, 0, c->stream>>>(db, pb, (int)nchunks, C);
    CUDA_CHECK_LAUNCH("colsum_finish_kernel (layernorm db)");
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
    dim3 grid(tpc_blocks((size_t)C, 32), 2);
    colsum2_finish_kernel<<<grid, dim3(32, 32), 0, c->stream>>>(dw, pw, db, pb, (int)nblocks, C);
    CUDA_CHECK_LAUNCH("colsum2_finish_kernel (layernorm dw, db)");
}

static void cuda_layernorm_bwd(void *ctx, void *dinp, float *dw, float *db, const void *dout,
                               const void *inp, const void *w, const float *mean,
                               const float *rstd, int N, int C) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (N <= 0 || C <= 0) return;
    if (!is_bf16(c)) {
        ln_bwd_generic(c, (float *)dinp, dw, db, (const float *)dout, (const float *)inp,
                       (const float *)w, mean, rstd, N, C);
        return;
    }
    bf16 *dx = (bf16 *)dinp;
    const bf16 *dy = (const bf16 *)dout, *x = (const bf16 *)inp, *wb = (const bf16 *)w;
    int vpl = ln_vpl(C);
    if (!(aligned_to(dx, 16) && aligned_to(dy, 16) && aligned_to(x, 16) && aligned_to(wb, 16)))
        vpl = 0;
    switch (vpl) {
    case 1: ln_bwd_bf16_launch<1>(c, dx, dw, db, dy, x, wb, mean, rstd, N, C); break;
    case 2: ln_bwd_bf16_launch<2>(c, dx, dw, db, dy, x, wb, mean, rstd, N, C); break;
    case 3: ln_bwd_bf16_launch<3>(c, dx, dw, db, dy, x, wb, mean, rstd, N, C); break;
    case 4: ln_bwd_bf16_launch<4>(c, dx, dw, db, dy, x, wb, mean, rstd, N, C); break;
    case 5: ln_bwd_bf16_launch<5>(c, dx, dw, db, dy, x, wb, mean, rstd, N, C); break;
    case 6: ln_bwd_bf16_launch<6>(c, dx, dw, db, dy, x, wb, mean, rstd, N, C); break;
    case 7: ln_bwd_bf16_launch<7>(c, dx, dw, db, dy, x, wb, mean, rstd, N, C); break;
    case 8: ln_bwd_bf16_launch<8>(c, dx, dw, db, dy, x, wb, mean, rstd, N, C); break;
    default: ln_bwd_generic(c, dx, dw, db, dy, x, wb, mean, rstd, N, C);
    }
}

// -- linear layers
//
// cuBLAS is column-major. A row-major (r, c) matrix with leading dimension c is, read column-major,
// its transpose (c, r) with the same leading dimension. So every row-major product X = A @ B is
// computed as the column-major product X^T = B^T A^T, and the operands' row-major storage already
// is the column-major transposes that product needs:
//
//   out (N, OC) = inp (N, IC) @ w^T        ->  out^T (OC, N) = w (OC, IC) . inp^T (IC, N)
//       w's storage read column-major is w^T (IC, OC), so op(A) = T;  inp's storage is inp^T (IC, N),
//       op(B) = N.   gemm(T, N, m=OC, n=N, k=IC, A=w lda=IC, B=inp ldb=IC, C=out ldc=OC)
//   dinp (N, IC) = dout (N, OC) @ w (OC, IC) ->  dinp^T (IC, N) = w^T (IC, OC) . dout^T (OC, N)
//       both storages already are those transposes.
//                                          gemm(N, N, m=IC, n=N, k=OC, A=w lda=IC, B=dout ldb=OC, C=dinp ldc=IC)
//   dw (OC, IC) += dout^T @ inp            ->  dw^T (IC, OC) = inp^T (IC, N) . dout (N, OC)
//       inp's storage is inp^T: op N; dout's storage is dout^T (OC, N): op T.
//                                          gemm(N, T, m=IC, n=OC, k=N, A=inp lda=IC, B=dout ldb=OC, C=dw ldc=IC, beta=1)
//
// The bf16 path goes through gemm.h (cuBLASLt, fused epilogues). Shapes it refuses (IC or OC not
// a multiple of 8, unaligned pointers) fall back to cuBLAS GemmEx with bf16 operands and an fp32
// result in scratch, followed by an epilogue kernel: slow, but every shape works.

static void gemm_fallback_note(struct cuda_ctx *c, const char *op, int N, int IC, int OC) {
    if (c->warned_gemm_fallback) return;
    c->warned_gemm_fallback = true;
    fprintf(stderr,
            "tptrain: note: bf16 %s N=%d IC=%d OC=%d is not supported by the fused cuBLASLt "
            "path (IC and OC must be multiples of 8, tensors 16-byte aligned); using the slower "
            "cuBLAS fallback for such products\n", op, N, IC, OC);
}

static void colsum_acc(struct cuda_ctx *c, float *out, const void *x, bool bf, int N, int C) {
    unsigned int nchunks = tpc_blocks((size_t)N, COLSUM_ROWS);
    float *part = (float *)ctx_scratch(c, (size_t)nchunks * C * sizeof(float)); // (nchunks, C)
    dim3 grid(nchunks, tpc_blocks((size_t)C, TPC_BLOCK));
    if (bf)
        colsum_partial_kernel<bf16><<<grid, TPC_BLOCK, 0, c->stream>>>(part, (const bf16 *)x, N, C);
    else
        colsum_partial_kernel<float><<<grid, TPC_BLOCK, 0, c->stream>>>(part, (const float *)x, N, C);
    CUDA_CHECK_LAUNCH("colsum_partial_kernel (dbias)");
    colsum_finish_kernel<<<tpc_blocks((size_t)C, TPC_BLOCK), TPC_BLOCK, 0, c->stream>>>(
        out, part, (int)nchunks, C);
    CUDA_CHECK_LAUNCH("colsum_finish_kernel (dbias)");
}

static void matmul_fwd_f32(struct cuda_ctx *c, float *out, float *pre_gelu, const float *inp,
                           const float *w, const float *bias, int N, int IC, int OC) {
    const float one = 1.0f, zero = 0.0f;
    float *dst = pre_gelu ? pre_gelu : out; // (N, OC)
    CUBLAS_CHECK(cublasSgemm(c->blas, CUBLAS_OP_T, CUBLAS_OP_N, OC, N, IC, &one, w, IC, inp, IC,
                             &zero, dst, OC));
    size_t n = (size_t)N * OC;
    if (bias) {
        add_bias_kernel<<<ew_blocks(n), TPC_BLOCK, 0, c->stream>>>(dst, bias, N, OC);
        CUDA_CHECK_LAUNCH("add_bias_kernel");
    }
    if (pre_gelu) {
        gelu_fwd_kernel<float, 1><<<ew_blocks(n), TPC_BLOCK, 0, c->stream>>>(out, pre_gelu, n);
        CUDA_CHECK_LAUNCH("gelu_fwd_kernel (matmul)");
    }
}

static void matmul_fwd_bf16(struct cuda_ctx *c, bf16 *out, bf16 *pre_gelu, const bf16 *inp,
                            const bf16 *w, const bf16 *bias, int N, int IC, int OC) {
    int rc = gemm_fwd(c->gemm, out, pre_gelu, inp, w, bias, N, IC, OC);
    if (rc == GEMM_OK) return;
    if (rc != GEMM_EBADARG) GEMM_DIE(c, rc, "gemm_fwd (matmul_fwd)", N, IC, OC);
    gemm_fallback_note(c, "matmul_fwd", N, IC, OC);
    const float one = 1.0f, zero = 0.0f;
    float *acc = (float *)ctx_scratch(c, (size_t)N * OC * sizeof(float)); // (N, OC)
    CUBLAS_CHECK(cublasGemmEx(c->blas, CUBLAS_OP_T, CUBLAS_OP_N, OC, N, IC, &one, w, CUDA_R_16BF,
                              IC, inp, CUDA_R_16BF, IC, &zero, acc, CUDA_R_32F, OC,
                              CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    gemm_fallback_fwd_epilogue_kernel<<<ew_blocks((size_t)N * OC), TPC_BLOCK, 0, c->stream>>>(
        out, pre_gelu, acc, bias, N, OC);
    CUDA_CHECK_LAUNCH("gemm_fallback_fwd_epilogue_kernel");
}

static void cuda_matmul_fwd(void *ctx, void *out, void *pre_gelu, const void *inp, const void *w,
                            const void *bias, int N, int IC, int OC) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (N <= 0 || OC <= 0) return;
    if (is_bf16(c))
        matmul_fwd_bf16(c, (bf16 *)out, (bf16 *)pre_gelu, (const bf16 *)inp, (const bf16 *)w,
                        (const bf16 *)bias, N, IC, OC);
    else
        matmul_fwd_f32(c, (float *)out, (float *)pre_gelu, (const float *)inp, (const float *)w,
                       (const float *)bias, N, IC, OC);
}

static void matmul_bwd_f32(struct cuda_ctx *c, float *dinp, float *dw, float *dbias,
                           const float *dout, const float *inp, const float *w,
                           const float *pre_gelu, int N, int IC, int OC) {
    const float one = 1.0f, zero = 0.0f;
    if (dinp) {
        CUBLAS_CHECK(cublasSgemm(c->blas, CUBLAS_OP_N, CUBLAS_OP_N, IC, N, OC, &one, w, IC, dout,
                                 OC, &zero, dinp, IC));
        if (pre_gelu) {
            size_t n = (size_t)N * IC;
            gelu_bwd_kernel<float, 1><<<ew_blocks(n), TPC_BLOCK, 0, c->stream>>>(dinp, pre_gelu,
                                                                                dinp, n);
            CUDA_CHECK_LAUNCH("gelu_bwd_kernel (matmul)");
        }
    }
    CUBLAS_CHECK(cublasSgemm(c->blas, CUBLAS_OP_N, CUBLAS_OP_T, IC, OC, N, &one, inp, IC, dout, OC,
                             &one, dw, IC));
    if (dbias) colsum_acc(c, dbias, dout, false, N, OC);
}

static void matmul_bwd_bf16(struct cuda_ctx *c, bf16 *dinp, float *dw, float *dbias,
                            const bf16 *dout, const bf16 *inp, const bf16 *w,
                            const bf16 *pre_gelu, int N, int IC, int OC) {
    const float one = 1.0f, zero = 0.0f;
    if (dinp) {
        int rc = gemm_bwd_data(c->gemm, dinp, dout, w, pre_gelu, N, IC, OC);
        if (rc == GEMM_EBADARG) {
            gemm_fallback_note(c, "matmul_bwd (input gradient)", N, IC, OC);
            float *acc = (float *)ctx_scratch(c, (size_t)N * IC * sizeof(float)); // (N, IC)
            CUBLAS_CHECK(cublasGemmEx(c->blas, CUBLAS_OP_N, CUBLAS_OP_N, IC, N, OC, &one, w,
                                      CUDA_R_16BF, IC, dout, CUDA_R_16BF, OC, &zero, acc,
                                      CUDA_R_32F, IC, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
            size_t n = (size_t)N * IC;
            gemm_fallback_bwd_epilogue_kernel<<<ew_blocks(n), TPC_BLOCK, 0, c->stream>>>(
                dinp, acc, pre_gelu, n);
            CUDA_CHECK_LAUNCH("gemm_fallback_bwd_epilogue_kernel");
        } else if (rc != GEMM_OK) {
            GEMM_DIE(c, rc, "gemm_bwd_data (matmul_bwd)", N, IC, OC);
        }
    }
    int rc = gemm_bwd_weight(c->gemm, dw, dbias, dout, inp, N, IC, OC);
    if (rc == GEMM_EBADARG) {
        gemm_fallback_note(c, "matmul_bwd (weight gradient)", N, IC, OC);
        CUBLAS_CHECK(cublasGemmEx(c->blas, CUBLAS_OP_N, CUBLAS_OP_T, IC, OC, N, &one, inp,
                                  CUDA_R_16BF, IC, dout, CUDA_R_16BF, OC, &one, dw, CUDA_R_32F,
                                  IC, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
        if (dbias) colsum_acc(c, dbias, dout, true, N, OC);
    } else if (rc != GEMM_OK) {
        GEMM_DIE(c, rc, "gemm_bwd_weight (matmul_bwd)", N, IC, OC);
    }
}

static void cuda_matmul_bwd(void *ctx, void *dinp, float *dw, float *dbias, const void *dout,
                            const void *inp, const void *w, const void *pre_gelu, int N, int IC,
                            int OC) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (N <= 0 || OC <= 0 || IC <= 0) return;
    if (is_bf16(c))
        matmul_bwd_bf16(c, (bf16 *)dinp, dw, dbias, (const bf16 *)dout, (const bf16 *)inp,
                        (const bf16 *)w, (const bf16 *)pre_gelu, N, IC, OC);
    else
        matmul_bwd_f32(c, (float *)dinp, dw, dbias, (const float *)dout, (const float *)inp,
                       (const float *)w, (const float *)pre_gelu, N, IC, OC);
}

template <typename E>
static void residual_impl(struct cuda_ctx *c, E *out, const E *res, const E *x, const E *bias,
                          int N, int C) {
    const int V = vec16<E>::n;
    size_t n = (size_t)N * C;
    if (C % V == 0 && aligned_to(out, 16) && aligned_to(res, 16) && aligned_to(x, 16) &&
        aligned_to(bias, 16))
        residual_kernel<E, V><<<ew_blocks(n / V), TPC_BLOCK, 0, c->stream>>>(out, res, x, bias, N, C);
    else
        residual_kernel<E, 1><<<ew_blocks(n), TPC_BLOCK, 0, c->stream>>>(out, res, x, bias, N, C);
    CUDA_CHECK_LAUNCH("residual_kernel");
}

static void cuda_residual_fwd(void *ctx, void *out, const void *res, const void *x,
                              const void *bias, int N, int C) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (N <= 0 || C <= 0) return;
    if (is_bf16(c))
        residual_impl(c, (bf16 *)out, (const bf16 *)res, (const bf16 *)x, (const bf16 *)bias, N, C);
    else
        residual_impl(c, (float *)out, (const float *)res, (const float *)x, (const float *)bias, N, C);
}

// One pass in bf16 where the register layernorm suits the shape; elsewhere (and in fp32, where it
// keeps the results bitwise those of the separate ops) the residual kernel, then the layernorm.
static void cuda_residual_layernorm_fwd(void *ctx, void *out, void *ln, float *mean, float *rstd,
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

template <typename E> static void gelu_fwd_impl(struct cuda_ctx *c, E *out, const E *inp, size_t n) {
    const int V = vec16<E>::n;
    if (aligned_to(out, 16) && aligned_to(inp, 16))
        gelu_fwd_kernel<E, V><<<ew_blocks(ceil_div(n, V)), TPC_BLOCK, 0, c->stream>>>(out, inp, n);
    else
        gelu_fwd_kernel<E, 1><<<ew_blocks(n), TPC_BLOCK, 0, c->stream>>>(out, inp, n);
    CUDA_CHECK_LAUNCH("gelu_fwd_kernel");
}

static void cuda_gelu_fwd(void *ctx, void *out, const void *inp, size_t n) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (n == 0) return;
    if (is_bf16(c)) gelu_fwd_impl(c, (bf16 *)out, (const bf16 *)inp, n);
    else gelu_fwd_impl(c, (float *)out, (const float *)inp, n);
}

template <typename E>
static void gelu_bwd_impl(struct cuda_ctx *c, E *dinp, const E *inp, const E *dout, size_t n) {
    const int V = vec16<E>::n;
    if (aligned_to(dinp, 16) && aligned_to(inp, 16) && aligned_to(dout, 16))
        gelu_bwd_kernel<E, V><<<ew_blocks(ceil_div(n, V)), TPC_BLOCK, 0, c->stream>>>(dinp, inp, dout, n);
    else
        gelu_bwd_kernel<E, 1><<<ew_blocks(n), TPC_BLOCK, 0, c->stream>>>(dinp, inp, dout, n);
    CUDA_CHECK_LAUNCH("gelu_bwd_kernel");
}

static void cuda_gelu_bwd(void *ctx, void *dinp, const void *inp, const void *dout, size_t n) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (n == 0) return;
    if (is_bf16(c)) gelu_bwd_impl(c, (bf16 *)dinp, (const bf16 *)inp, (const bf16 *)dout, n);
    else gelu_bwd_impl(c, (float *)dinp, (const float *)inp, (const float *)dout, n);
}

// -- attention
//
// bf16: the fused kernels of flash_attention.h, every head size they take (config validation
// refuses the others). saved (B, NH, T) = log-sum-exp of each query row; scratch = what
// flash_attention_bwd asks for. q, k, v are the slices of qkv with the row stride 3 * NH * HS;
// dq, dk, dv the same slices of dqkv. Memory O(B * NH * T): no (T, T) matrix.
//
// fp32, the reference: the naive path.
// saved   (B, NH, T, T): the softmax probabilities (0 above the diagonal)
// scratch: q, k, v, y (B, NH, T, HS) each, then for the backward dq, dk, dv (B, NH, T, HS) and
//          datt (B, NH, T, T). y holds the forward's per-head output, and dy in the backward.

static bool attn_flash(const struct cuda_ctx *c, int HS) {
    return is_bf16(c) && flash_attention_supported(HS);
}

static size_t attn_naive_scratch(int B, int T, int NH, int HS) {
    size_t S = (size_t)B * NH * T * HS;
    return 7 * S + (size_t)B * NH * T * T;
}

static size_t cuda_attention_saved_floats(void *ctx, int B, int T, int NH, int HS) {
    struct cuda_ctx *c = (struct cuda_ctx *)ctx;
    if (attn_flash(c, HS)) return (size_t)B * NH * T;
    return (size_t)B * NH * T * T;
}

static size_t cuda_attention_scratch_floats(void *ctx, int B, int T, int NH, int HS) {
    struct cuda_ctx *c = (struct cuda_ctx *)ctx;
    if (attn_flash(c, HS)) return flash_attention_bwd_scratch_floats(B, T, NH, HS);
    return attn_naive_scratch(B, T, NH, HS);
}

// bf16 with a head size the fused kernels do not take: config validation refuses such models,
// so reaching this is a caller's bug.
static void attn_bf16_unsupported(int HS) {
    fprintf(stderr, "tptrain: bf16 attention needs a head size that is a multiple of 8 in "
                    "[8, 256], got %d; use precision: fp32\n", HS);
    exit(1);
}

static void attn_naive_fwd(struct cuda_ctx *c, float *out, float *saved, float *scratch,
                           const float *qkv, int B, int T, int NH, int HS) {
    size_t S = (size_t)B * NH * T * HS;
    int BNH = B * NH;
    float *q = scratch, *k = q + S, *v = k + S, *y = v + S; // (B, NH, T, HS) each
    float *att = saved;                                     // (B, NH, T, T)
    attn_permute_qkv_kernel<<<ew_blocks(S), TPC_BLOCK, 0, c->stream>>>(q, k, v, qkv, B, T, NH, HS);
    CUDA_CHECK_LAUNCH("attn_permute_qkv_kernel");

    // att (T, T) = scale * q (T, HS) @ k^T per (b, h): the matmul_fwd mapping with w = k
    const float scale = 1.0f / sqrtf((float)HS), one = 1.0f, zero = 0.0f;
    const long long sHS = (long long)T * HS, sTT = (long long)T * T;
    CUBLAS_CHECK(cublasSgemmStridedBatched(c->blas, CUBLAS_OP_T, CUBLAS_OP_N, T, T, HS, &scale, k,
                                           HS, sHS, q, HS, sHS, &zero, att, T, sTT, BNH));
    attn_softmax_fwd_kernel<<<warp_row_blocks((size_t)BNH * T), TPC_BLOCK, 0, c->stream>>>(att,
                                                                                         BNH, T);
    CUDA_CHECK_LAUNCH("attn_softmax_fwd_kernel");

    // y (T, HS) = att (T, T) @ v (T, HS)  ->  y^T (HS, T) = v^T (HS, T) . att^T (T, T); both
    // storages already are those column-major transposes
    CUBLAS_CHECK(cublasSgemmStridedBatched(c->blas, CUBLAS_OP_N, CUBLAS_OP_N, HS, T, T, &one, v, HS,
                                           sHS, att, T, sTT, &zero, y, HS, sHS, BNH));
    size_t n = (size_t)B * T * NH * HS;
    attn_unpermute_kernel<<<ew_blocks(n), TPC_BLOCK, 0, c->stream>>>(out, y, B, T, NH, HS);
    CUDA_CHECK_LAUNCH("attn_unpermute_kernel");
}

static void attn_naive_bwd(struct cuda_ctx *c, float *dqkv, float *scratch, const float *dout,
                           const float *qkv, const float *saved, int B, int T, int NH, int HS) {
    size_t S = (size_t)B * NH * T * HS;
    int BNH = B * NH;
    float *q = scratch, *k = q + S, *v = k + S, *dy = v + S; // (B, NH, T, HS) each
    float *dq = dy + S, *dk = dq + S, *dv = dk + S;          // (B, NH, T, HS) each
    float *datt = dv + S;                                    // (B, NH, T, T)
    const float *att = saved;                                // (B, NH, T, T)

    // scratch is shared by all layers: q, k, v are rebuilt from this layer's qkv
    attn_permute_qkv_kernel<<<ew_blocks(S), TPC_BLOCK, 0, c->stream>>>(q, k, v, qkv, B, T, NH, HS);
    CUDA_CHECK_LAUNCH("attn_permute_qkv_kernel");
    attn_permute_kernel<<<ew_blocks(S), TPC_BLOCK, 0, c->stream>>>(dy, dout, B, T, NH, HS);
    CUDA_CHECK_LAUNCH("attn_permute_kernel");

    const float scale = 1.0f / sqrtf((float)HS), one = 1.0f, zero = 0.0f;
    const long long sHS = (long long)T * HS, sTT = (long long)T * T;
    // datt (T, T) = dy (T, HS) @ v^T: the same mapping as the forward's q @ k^T
    CUBLAS_CHECK(cublasSgemmStridedBatched(c->blas, CUBLAS_OP_T, CUBLAS_OP_N, T, T, HS, &one, v, HS,
                                           sHS, dy, HS, sHS, &zero, datt, T, sTT, BNH));
    // dv (T, HS) = att^T (T, T) @ dy (T, HS)  ->  dv^T (HS, T) = dy^T (HS, T) . att (T, T);
    // att's storage read column-major is att^T, so op T
    CUBLAS_CHECK(cublasSgemmStridedBatched(c->blas, CUBLAS_OP_N, CUBLAS_OP_T, HS, T, T, &one, dy,
                                           HS, sHS, att, T, sTT, &zero, dv, HS, sHS, BNH));
    // datt becomes dpreatt, with the 1/sqrt(HS) of the forward folded in
    attn_softmax_bwd_kernel<<<warp_row_blocks((size_t)BNH * T), TPC_BLOCK, 0, c->stream>>>(
        datt, att, BNH, T, scale);
    CUDA_CHECK_LAUNCH("attn_softmax_bwd_kernel");
    // dq (T, HS) = dpre (T, T) @ k (T, HS)    ->  dq^T = k^T . dpre^T: both storages as they are
    CUBLAS_CHECK(cublasSgemmStridedBatched(c->blas, CUBLAS_OP_N, CUBLAS_OP_N, HS, T, T, &one, k, HS,
                                           sHS, datt, T, sTT, &zero, dq, HS, sHS, BNH));
    // dk (T, HS) = dpre^T (T, T) @ q (T, HS)  ->  dk^T = q^T . dpre: op T on dpre's storage
    CUBLAS_CHECK(cublasSgemmStridedBatched(c->blas, CUBLAS_OP_N, CUBLAS_OP_T, HS, T, T, &one, q, HS,
                                           sHS, datt, T, sTT, &zero, dk, HS, sHS, BNH));
    size_t n = (size_t)B * T * 3 * NH * HS;
    attn_unpermute_qkv_kernel<<<ew_blocks(n), TPC_BLOCK, 0, c->stream>>>(dqkv, dq, dk, dv, B, T,
                                                                         NH, HS);
    CUDA_CHECK_LAUNCH("attn_unpermute_qkv_kernel");
}

static void cuda_attention_fwd(void *ctx, void *out, float *saved, float *scratch,
                               const void *qkv, int B, int T, int NH, int HS) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (B <= 0 || T <= 0 || NH <= 0 || HS <= 0) return;
    if (!is_bf16(c)) {
        attn_naive_fwd(c, (float *)out, saved, scratch, (const float *)qkv, B, T, NH, HS);
        return;
    }
    const bf16 *x = (const bf16 *)qkv; // (B, T, 3 * NH * HS)
    int C = NH * HS;
    if (attn_flash(c, HS)) {
        int rc = flash_attention_fwd(c->stream, out, saved, x, x + C, x + 2 * (size_t)C, B, T, NH,
                                     HS, 3 * C, C);
        FLASH_CHECK(rc, "flash_attention_fwd (attention_fwd)", B, T, NH, HS);
        return;
    }
    attn_bf16_unsupported(HS);
}

static void cuda_attention_bwd(void *ctx, void *dqkv, float *scratch, const void *dout,
                               const void *qkv, const void *out, const float *saved, int B,
                               int T, int NH, int HS) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (B <= 0 || T <= 0 || NH <= 0 || HS <= 0) return;
    if (!is_bf16(c)) {
        // the probabilities are saved; the output itself is not needed
        attn_naive_bwd(c, (float *)dqkv, scratch, (const float *)dout, (const float *)qkv, saved,
                       B, T, NH, HS);
        return;
    }
    const bf16 *x = (const bf16 *)qkv; // (B, T, 3 * NH * HS)
    bf16 *dx = (bf16 *)dqkv;           // (B, T, 3 * NH * HS)
    int C = NH * HS;
    if (attn_flash(c, HS)) {
        int rc = flash_attention_bwd(c->stream, dx, dx + C, dx + 2 * (size_t)C, dout, x, x + C,
                                     x + 2 * (size_t)C, out, saved, scratch, B, T, NH, HS, 3 * C, C);
        FLASH_CHECK(rc, "flash_attention_bwd (attention_bwd)", B, T, NH, HS);
        return;
    }
    attn_bf16_unsupported(HS);
}

static const char *cuda_attention_path(void *ctx, int HS) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (!is_bf16(c)) return "cuda (T,T) fp32 cuBLAS";
    return flash_attention_path(HS);
}

static void cuda_attention_decode(void *ctx, void *out, float *scratch, const void *q,
                                  const void *kcache, const void *vcache, int n_ctx, int NH,
                                  int HS) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (n_ctx <= 0 || NH <= 0 || HS <= 0) return;
    float scale = 1.0f / sqrtf((float)HS);
    if (is_bf16(c))
        attn_decode_kernel<bf16><<<NH, TPC_BLOCK, 0, c->stream>>>(
            (bf16 *)out, scratch, (const bf16 *)q, (const bf16 *)kcache, (const bf16 *)vcache,
            n_ctx, NH, HS, scale);
    else
        attn_decode_kernel<float><<<NH, TPC_BLOCK, 0, c->stream>>>(
            (float *)out, scratch, (const float *)q, (const float *)kcache, (const float *)vcache,
            n_ctx, NH, HS, scale);
    CUDA_CHECK_LAUNCH("attn_decode_kernel");
}

// -- vocab-parallel cross-entropy

// Columns of this rank that are real vocabulary (not padding): [0, n_real).
static int xent_real_columns(int vocab_start, int n_vocab, int vocab_size) {
    long long r = (long long)vocab_size - vocab_start;
    if (r < 0) r = 0;
    if (r > n_vocab) r = n_vocab;
    return (int)r;
}

// bf16 rows move 8 columns per access when n_vocab allows; fp32 keeps its one-column loops.
static bool xent_vec(const struct cuda_ctx *c, const void *a, const void *b, int n_vocab) {
    return is_bf16(c) && n_vocab % 8 == 0 && aligned_to(a, 16) && aligned_to(b, 16);
}

template <typename E, int V>
static void xent_stats_launch(struct cuda_ctx *c, float *maxes, float *sums, const void *logits,
                              const int *targets, int N, int vocab_start, int n_real, int n_vocab) {
    xent_stats_kernel<E, V><<<(unsigned int)N, XENT_STATS_BLOCK, 0, c->stream>>>(
        maxes, sums, (const E *)logits, targets, N, vocab_start, n_real, n_vocab);
    CUDA_CHECK_LAUNCH("xent_stats_kernel");
}

static void cuda_xent_stats(void *ctx, float *maxes, float *sums, const void *logits,
                            const int *targets, int N, int vocab_start, int n_vocab,
                            int vocab_size) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (N <= 0) return;
    int n_real = xent_real_columns(vocab_start, n_vocab, vocab_size);
    // 16-byte accesses for both storage types when the rows allow them
    bool vec = aligned_to(logits, 16);
    if (is_bf16(c) && vec && n_vocab % 8 == 0)
        xent_stats_launch<bf16, 8>(c, maxes, sums, logits, targets, N, vocab_start, n_real, n_vocab);
    else if (is_bf16(c))
        xent_stats_launch<bf16, 1>(c, maxes, sums, logits, targets, N, vocab_start, n_real, n_vocab);
    else if (vec && n_vocab % 4 == 0)
        xent_stats_launch<float, 4>(c, maxes, sums, logits, targets, N, vocab_start, n_real, n_vocab);
    else
        xent_stats_launch<float, 1>(c, maxes, sums, logits, targets, N, vocab_start, n_real, n_vocab);
}

static void cuda_xent_rescale(void *ctx, float *sums, const float *local_maxes, const float *maxes,
                              int N) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (N <= 0) return;
    xent_rescale_kernel<<<ew_blocks((size_t)N), TPC_BLOCK, 0, c->stream>>>(sums, local_maxes,
                                                                            maxes, N);
    CUDA_CHECK_LAUNCH("xent_rescale_kernel");
}

static void cuda_xent_loss(void *ctx, float *losses, const float *maxes, const float *sums,
                           int N) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (N <= 0) return;
    xent_loss_kernel<<<ew_blocks((size_t)N), TPC_BLOCK, 0, c->stream>>>(losses, maxes, sums, N);
    CUDA_CHECK_LAUNCH("xent_loss_kernel");
}

static void cuda_xent_bwd(void *ctx, void *dlogits, const void *logits, const float *maxes,
                          const float *sums, const int *targets, float dloss, int N,
                          int vocab_start, int n_vocab, int vocab_size) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (N <= 0 || n_vocab <= 0) return;
    int n_real = xent_real_columns(vocab_start, n_vocab, vocab_size);
    unsigned int nb = (unsigned int)N;
    if (xent_vec(c, dlogits, logits, n_vocab))
        xent_bwd_kernel<bf16, 8><<<nb, XENT_BLOCK, 0, c->stream>>>(
            (bf16 *)dlogits, (const bf16 *)logits, maxes, sums, targets, dloss, vocab_start,
            n_real, n_vocab);
    else if (is_bf16(c))
        xent_bwd_kernel<bf16, 1><<<nb, XENT_BLOCK, 0, c->stream>>>(
            (bf16 *)dlogits, (const bf16 *)logits, maxes, sums, targets, dloss, vocab_start,
            n_real, n_vocab);
    else
        xent_bwd_kernel<float, 1><<<nb, XENT_BLOCK, 0, c->stream>>>(
            (float *)dlogits, (const float *)logits, maxes, sums, targets, dloss, vocab_start,
            n_real, n_vocab);
    CUDA_CHECK_LAUNCH("xent_bwd_kernel");
}

// -- reductions and elementwise helpers

static void reduce_launch(struct cuda_ctx *c, float *out, const float *x, size_t n, int squared,
                          int accumulate) {
    unsigned int nb = tpc_blocks(n, (size_t)TPC_BLOCK * 4);
    if (nb > REDUCE_MAX_BLOCKS) nb = REDUCE_MAX_BLOCKS;
    double *part = (double *)ctx_scratch(c, (size_t)nb * sizeof(double)); // (nb)
    reduce_partial_kernel<<<nb, TPC_BLOCK, 0, c->stream>>>(part, x, n, squared);
    CUDA_CHECK_LAUNCH("reduce_partial_kernel");
    reduce_finish_kernel<<<1, TPC_BLOCK, 0, c->stream>>>(out, part, (int)nb, accumulate);
    CUDA_CHECK_LAUNCH("reduce_finish_kernel");
}

static void cuda_sum(void *ctx, float *out, const float *x, size_t n) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (n == 0) {
        CUDA_CHECK(cudaMemsetAsync(out, 0, sizeof(float), c->stream));
        return;
    }
    reduce_launch(c, out, x, n, 0, 0);
}

static void cuda_sumsq_acc(void *ctx, float *out, const float *x, size_t n) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (n == 0) return;
    reduce_launch(c, out, x, n, 1, 1);
}

// Chunk of the flat buffer per block in the segment walks: a multiple of 8, so chunk boundaries
// keep 16-byte alignment for fp32 and bf16 alike; depends on n only.
static size_t seg_chunk(size_t n) {
    size_t per = ceil_div(n, SEG_MAX_BLOCKS);
    if (per < SEG_MIN_CHUNK) per = SEG_MIN_CHUNK;
    return tp_round_up(per, 8);
}

static void cuda_segments_sumsq(void *ctx, float *out, const float *x,
                                const struct param_segment *segs, int n_segs, size_t n) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (n == 0 || n_segs <= 0) {
        CUDA_CHECK(cudaMemsetAsync(out, 0, 2 * sizeof(float), c->stream));
        return;
    }
    size_t chunk = seg_chunk(n);
    unsigned int nb = (unsigned int)ceil_div(n, chunk);
    double *part = (double *)ctx_scratch(c, 2 * (size_t)nb * sizeof(double)); // (nb, 2)
    if (aligned_to(x, 16))
        segments_sumsq_partial_kernel<true><<<nb, TPC_BLOCK, 0, c->stream>>>(part, x, segs, n_segs,
                                                                             n, chunk);
    else
        segments_sumsq_partial_kernel<false><<<nb, TPC_BLOCK, 0, c->stream>>>(part, x, segs,
                                                                              n_segs, n, chunk);
    CUDA_CHECK_LAUNCH("segments_sumsq_partial_kernel");
    segments_sumsq_finish_kernel<<<1, TPC_BLOCK, 0, c->stream>>>(out, part, (int)nb);
    CUDA_CHECK_LAUNCH("segments_sumsq_finish_kernel");
}

static void cuda_scale(void *ctx, float *x, float s, size_t n) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (n == 0) return;
    scale_kernel<<<ew_blocks(n), TPC_BLOCK, 0, c->stream>>>(x, s, n);
    CUDA_CHECK_LAUNCH("scale_kernel");
}

template <typename E>
static void adamw_launch(struct cuda_ctx *c, const struct adamw_step *s, E *pc,
                         const struct adamw_args &a) {
    size_t chunk = seg_chunk(s->n);
    unsigned int nb = (unsigned int)ceil_div(s->n, chunk);
    bool vec = aligned_to(s->p, 16) && aligned_to(s->g, 16) && aligned_to(s->m, 16) &&
               aligned_to(s->v, 16) && aligned_to(pc, 4 * sizeof(E));
    if (vec)
        adamw_kernel<E, true><<<nb, TPC_BLOCK, 0, c->stream>>>(s->p, pc, s->g, s->m, s->v, s->segs,
                                                               s->n_segs, s->n, chunk, a);
    else
        adamw_kernel<E, false><<<nb, TPC_BLOCK, 0, c->stream>>>(s->p, pc, s->g, s->m, s->v, s->segs,
                                                                s->n_segs, s->n, chunk, a);
    CUDA_CHECK_LAUNCH("adamw_kernel");
}

static void cuda_adamw(void *ctx, const struct adamw_step *s) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (s->n == 0 || s->n_segs <= 0) return;
    struct adamw_args a;
    a.lr = s->lr;
    a.beta1 = s->beta1;
    a.beta2 = s->beta2;
    a.eps = s->eps;
    a.grad_scale = s->grad_scale;
    a.grad_clip = s->grad_clip;
    a.norm_sq = s->norm_sq;
    // bias corrections in double on the host: pow(beta, t) of a float loses digits at large t
    a.bc1 = (float)(1.0 - pow((double)s->beta1, (double)s->t));
    a.bc2 = (float)(1.0 - pow((double)s->beta2, (double)s->t));
    if (is_bf16(c)) adamw_launch(c, s, (bf16 *)s->p_compute, a);
    else adamw_launch(c, s, (float *)s->p_compute, a);
}

// ---- timing events

// Events time the stream, not the host: what lies between two records is the GPU work queued
// between them, including any idle gap while the host waits (e.g. an MPI collective staged
// through host memory). Created with timing on; reused across records.
static void *cuda_event_create(void *ctx) {
    (void)ctx_of(ctx);
    cudaEvent_t ev;
    CUDA_CHECK(cudaEventCreate(&ev));
    return (void *)ev;
}

static void cuda_event_record(void *ctx, void *ev) {
    struct cuda_ctx *c = ctx_of(ctx);
    CUDA_CHECK(cudaEventRecord((cudaEvent_t)ev, c->stream));
}

static float cuda_event_elapsed_ms(void *ctx, void *start, void *end) {
    (void)ctx_of(ctx);
    CUDA_CHECK(cudaEventSynchronize((cudaEvent_t)end));
    float ms = 0.0f;
    CUDA_CHECK(cudaEventElapsedTime(&ms, (cudaEvent_t)start, (cudaEvent_t)end));
    return ms;
}

static void cuda_event_destroy(void *ctx, void *ev) {
    (void)ctx_of(ctx);
    CUDA_CHECK(cudaEventDestroy((cudaEvent_t)ev));
}

// ---- backend table

static const struct backend_i cuda_iface = {
    .name = cuda_name,
    .dtype = cuda_dtype,
    .host_accessible = false,
    .alloc = cuda_alloc,
    .free = cuda_free,
    .zero = cuda_zero,
    .copy_to_device = cuda_copy_to_device,
    .copy_to_host = cuda_copy_to_host,
    .copy = cuda_copy,
    .to_compute = cuda_to_compute,
    .from_compute = cuda_from_compute,
    .synchronize = cuda_synchronize,
    .native_stream = cuda_native_stream,
    .destroy = cuda_destroy,
    .vocab_embedding_fwd = cuda_vocab_embedding_fwd,
    .vocab_embedding_bwd = cuda_vocab_embedding_bwd,
    .position_embedding_fwd = cuda_position_embedding_fwd,
    .position_embedding_bwd = cuda_position_embedding_bwd,
    .layernorm_fwd = cuda_layernorm_fwd,
    .layernorm_bwd = cuda_layernorm_bwd,
    .matmul_fwd = cuda_matmul_fwd,
    .matmul_bwd = cuda_matmul_bwd,
    .residual_fwd = cuda_residual_fwd,
    .residual_layernorm_fwd = cuda_residual_layernorm_fwd,
    .gelu_fwd = cuda_gelu_fwd,
    .gelu_bwd = cuda_gelu_bwd,
    .attention_saved_floats = cuda_attention_saved_floats,
    .attention_scratch_floats = cuda_attention_scratch_floats,
    .attention_fwd = cuda_attention_fwd,
    .attention_bwd = cuda_attention_bwd,
    .attention_decode = cuda_attention_decode,
    .attention_path = cuda_attention_path,
    .xent_stats = cuda_xent_stats,
    .xent_rescale = cuda_xent_rescale,
    .xent_loss = cuda_xent_loss,
    .xent_bwd = cuda_xent_bwd,
    .sum = cuda_sum,
    .sumsq_acc = cuda_sumsq_acc,
    .segments_sumsq = cuda_segments_sumsq,
    .scale = cuda_scale,
    .adamw = cuda_adamw,
    .event_create = cuda_event_create,
    .event_record = cuda_event_record,
    .event_elapsed_ms = cuda_event_elapsed_ms,
    .event_destroy = cuda_event_destroy,
};

// ---- public entry points

extern "C" int backend_cuda_device_count(void) {
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
        (void)cudaGetLastError(); // no driver or no device: not an error for the caller
        return 0;
    }
    return n;
}

extern "C" bool backend_cuda_available(void) { return backend_cuda_device_count() > 0; }

extern "C" bool backend_cuda_create(struct backend *out, int device, enum tp_dtype dtype,
                                    char *err, size_t errlen) {
    out->iface = NULL;
    out->ctx = NULL;
    if (dtype != TP_DTYPE_F32 && dtype != TP_DTYPE_BF16) {
        snprintf(err, errlen, "cuda backend: unknown compute dtype %d", (int)dtype);
        return false;
    }
    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess || count <= 0) {
        (void)cudaGetLastError();
        snprintf(err, errlen, "no usable CUDA device (%s); check the driver with nvidia-smi and "
                 "CUDA_VISIBLE_DEVICES", e != cudaSuccess ? cudaGetErrorString(e) : "none visible");
        return false;
    }
    if (device < 0 || device >= count) {
        snprintf(err, errlen, "CUDA device %d does not exist (%d visible)", device, count);
        return false;
    }
    struct cuda_ctx *c = (struct cuda_ctx *)tp_calloc(1, sizeof *c);
    c->device = device;
    c->dtype = dtype;
    const char *step = "cudaSetDevice";
    cublasStatus_t bs = CUBLAS_STATUS_SUCCESS;
    bool have_stream = false, have_blas = false;
    if ((e = cudaSetDevice(device)) != cudaSuccess) goto cuda_fail;
    {
        // A kernel image for this device must exist; catch an arch mismatch here, not mid-run.
        struct cudaFuncAttributes fa;
        step = "kernel image lookup";
        if ((e = cudaFuncGetAttributes(&fa, scale_kernel)) != cudaSuccess) {
            struct cudaDeviceProp prop;
            int major = 0, minor = 0;
            if (cudaGetDeviceProperties(&prop, device) == cudaSuccess) {
                major = prop.major;
                minor = prop.minor;
            }
            (void)cudaGetLastError();
            snprintf(err, errlen, "CUDA device %d (sm_%d%d) cannot run this build's kernels (%s); "
                     "reconfigure with -Dgpu_arch=%d%d", device, major, minor,
                     cudaGetErrorString(e), major, minor);
            free(c);
            return false;
        }
    }
    step = "cudaStreamCreateWithFlags";
    if ((e = cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking)) != cudaSuccess)
        goto cuda_fail;
    have_stream = true;
    step = "cudaMalloc (cuBLAS workspace)";
    if ((e = cudaMalloc(&c->blas_ws, CUDA_BLAS_WORKSPACE_BYTES)) != cudaSuccess) goto cuda_fail;
    step = "cublasCreate";
    if ((bs = cublasCreate(&c->blas)) != CUBLAS_STATUS_SUCCESS) goto blas_fail;
    have_blas = true;
    step = "cublasSetStream";
    if ((bs = cublasSetStream(c->blas, c->stream)) != CUBLAS_STATUS_SUCCESS) goto blas_fail;
    step = "cublasSetWorkspace";
    if ((bs = cublasSetWorkspace(c->blas, c->blas_ws, CUDA_BLAS_WORKSPACE_BYTES)) !=
        CUBLAS_STATUS_SUCCESS)
        goto blas_fail;
    // fp32 reference arithmetic: pedantic math keeps TF32 and BF16x9 emulation off even when
    // environment variables (NVIDIA_TF32_OVERRIDE, CUBLAS_EMULATE_SINGLE_PRECISION) ask for them.
    step = "cublasSetMathMode";
    if ((bs = cublasSetMathMode(c->blas, CUBLAS_PEDANTIC_MATH)) != CUBLAS_STATUS_SUCCESS)
        goto blas_fail;
    if (dtype == TP_DTYPE_BF16) {
        char gerr[256] = "";
        c->gemm = gemm_create((void *)c->stream, CUDA_GEMM_WORKSPACE_BYTES, gerr, sizeof gerr);
        if (!c->gemm) {
            snprintf(err, errlen, "CUDA device %d: gemm_create (bf16 products) failed: %s", device,
                     gerr);
            goto cleanup;
        }
    }
    out->iface = &cuda_iface;
    out->ctx = c;
    return true;

cuda_fail:
    (void)cudaGetLastError();
    snprintf(err, errlen, "CUDA device %d: %s failed: %s", device, step, cudaGetErrorString(e));
    goto cleanup;
blas_fail:
    snprintf(err, errlen, "CUDA device %d: %s failed: %s", device, step,
             cublasGetStatusString(bs));
cleanup:
    if (have_blas) cublasDestroy(c->blas);
    if (c->blas_ws) cudaFree(c->blas_ws);
    if (have_stream) cudaStreamDestroy(c->stream);
    free(c);
    return false;
}
