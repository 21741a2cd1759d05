// cuda_internal.cuh: what the files of the CUDA backend share: the context, checked calls, the
// storage types and device helpers, launch geometry, and the declarations of the ops that
// backend_cuda.cu puts in the backend table.
#pragma once

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
#define EMB_BWD_SORT_MAX 512 // kept tokens of a tile sorted by row up to this many (quadratic)
#define EMB_BWD_UNROLL 8     // dout rows in flight per run
// vocab_embedding_bwd_sorted_kernel (TPTRAIN_EMB_BWD=sorted): groups (a power of two), the kept
// tokens sorted and walked at once (a power of two, at least 8 x the block), threads, dout rows
// per chunk of a run (two chunks in flight)
#define EMB_BWD2_GROUPS 1024
#define EMB_BWD2_CAP 2048
#define EMB_BWD2_THREADS 128
#define EMB_BWD2_UNROLL 16
#define LN_EPS 1e-5 // GPT-2; double, as the fp32 path's statistics are
// bf16 layernorm backward: blocks of the fused kernel (fixed for a given N, so dw/db sum in a
// fixed order), each leaving one (C) partial of dw and of db.
#define LN_BWD_MAX_BLOCKS 256
// layernorm_bwd_pipelined_kernel (TPTRAIN_LN_BWD=pipelined): threads per block, and the most
// blocks (a constant, so that the order of the column sums depends on the shape only)
#define LN_BWD2_THREADS 256
#define LN_BWD2_MAX_BLOCKS 264
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

// One live buffer from the backend's alloc: cudaFree does not tell the size it releases.
struct cuda_alloc_rec {
    void *ptr;
    size_t bytes;
};

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
    int overlap;               // collectives running beside the stream (backend_i.overlap)
    int overlap_sms;           // products leave this many multiprocessors to them (TPTRAIN_OVERLAP_SMS)
    int sm_count;              // the device's multiprocessors
    bool ln_bwd_pipelined;     // bf16 layernorm backward: layernorm_bwd_pipelined_kernel (TPTRAIN_LN_BWD)
    bool emb_bwd_sorted;       // token embedding backward: vocab_embedding_bwd_sorted_kernel (TPTRAIN_EMB_BWD)
    bool attn_bwd_sums;        // qkv's bias gradient summed in the Hopper attention backward (TPTRAIN_ATTN_BWD_SUMS)
    bool step_graphs;          // graph_begin records (TPTRAIN_STEP_GRAPH=1)
    bool capturing;            // between graph_begin and graph_end
    // memory_stats: what this backend cudaMalloc'd itself (alloc's buffers, scratch, workspaces)
    size_t mem_now, mem_peak;
    struct cuda_alloc_rec *allocs; // (n_allocs) live alloc buffers, capacity cap_allocs
    int n_allocs, cap_allocs;
};

static inline void ctx_mem_add(struct cuda_ctx *c, size_t bytes) {
    c->mem_now += bytes;
    if (c->mem_now > c->mem_peak) c->mem_peak = c->mem_now;
}

static inline void cublas_check(cublasStatus_t s, const char *call, const char *file, int line) {
    if (s == CUBLAS_STATUS_SUCCESS) return;
    tp_die(TP_EXIT_RUNTIME,
           "%s:%d: cuBLAS error %d (%s) in %s; check the matrix sizes in the caller, that the GPU "
           "has free memory (nvidia-smi), and rerun with CUDA_LAUNCH_BLOCKING=1",
           file, line, (int)s, cublasGetStatusString(s), call);
}
#define CUBLAS_CHECK(call) cublas_check((call), #call, __FILE__, __LINE__)

// A bf16 product that gemm.h refused for a reason other than its shape: nothing to fall back on.
static inline _Noreturn void die_gemm(struct cuda_ctx *c, int rc, const char *op, int N, int IC, int OC,
                               const char *file, int line) {
    tp_die(TP_EXIT_RUNTIME,
           "%s:%d: bf16 %s failed for N=%d IC=%d OC=%d (gemm code %d: %s); check the shapes and "
           "pointers in the caller, that the GPU has free memory (nvidia-smi), and rerun with "
           "CUDA_LAUNCH_BLOCKING=1",
           file, line, op, N, IC, OC, rc, c->gemm ? gemm_last_error(c->gemm) : "no gemm context");
}
#define GEMM_DIE(c, rc, op, N, IC, OC) die_gemm((c), (rc), (op), (N), (IC), (OC), __FILE__, __LINE__)

static inline void flash_check(int rc, const char *op, int B, int T, int NH, int HS, const char *file,
                        int line) {
    if (rc == FLASH_OK) return;
    tp_die(TP_EXIT_RUNTIME,
           "%s:%d: bf16 %s failed for B=%d T=%d NH=%d HS=%d (%s); the tensors must be 16-byte "
           "aligned device memory; rerun with CUDA_LAUNCH_BLOCKING=1 to locate a launch failure",
           file, line, op, B, T, NH, HS,
           rc == FLASH_EBADARG ? "unsupported shape, stride or alignment" : "launch failed");
}
#define FLASH_CHECK(rc, op, B, T, NH, HS) flash_check((rc), (op), (B), (T), (NH), (HS), __FILE__, __LINE__)

static inline struct cuda_ctx *ctx_of(void *ctx) {
    struct cuda_ctx *c = (struct cuda_ctx *)ctx;
    // Cheap when already current; keeps a process that holds backends on two devices correct.
    CUDA_CHECK(cudaSetDevice(c->device));
    return c;
}

static inline _Noreturn void die_out_of_memory(struct cuda_ctx *c, size_t bytes, cudaError_t e,
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
static inline void *ctx_scratch(struct cuda_ctx *c, size_t bytes) {
    if (bytes <= c->scratch_bytes) return c->scratch;
    if (c->capturing) // the steps before the recorded one sized it: an op asks for more than it did then
        tp_die(TP_EXIT_RUNTIME, "cuda backend: an op needed %zu bytes of scratch (it has %zu) while the step was "
               "recorded as a graph; rerun with TPTRAIN_STEP_GRAPH=0 and report it", bytes, c->scratch_bytes);
    CUDA_CHECK(cudaStreamSynchronize(c->stream));
    if (c->scratch) CUDA_CHECK(cudaFree(c->scratch));
    c->mem_now -= c->scratch_bytes;
    c->scratch = NULL;
    c->scratch_bytes = 0;
    size_t want = tp_round_up(bytes, (size_t)1 << 20);
    cudaError_t e = cudaMalloc(&c->scratch, want);
    if (e != cudaSuccess) die_out_of_memory(c, want, e, "reduction scratch");
    c->scratch_bytes = want;
    ctx_mem_add(c, want);
    return c->scratch;
}

static inline bool is_bf16(const struct cuda_ctx *c) { return c->dtype == TP_DTYPE_BF16; }

static inline bool aligned_to(const void *p, size_t bytes) { return ((uintptr_t)p % bytes) == 0; }

static inline size_t ceil_div(size_t a, size_t b) { return (a + b - 1) / b; }

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

static __device__ float block_sum_f(float v, float *sh) { return block_reduce(v, sh, sum_op(), 0.0f); }
static __device__ double block_sum_d(double v, double *sh) { return block_reduce(v, sh, sum_op(), 0.0); }
static __device__ float block_max_f(float v, float *sh) { return block_reduce(v, sh, max_op(), -INFINITY); }

#define GRID_STRIDE(i, n) \
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
         i += (size_t)gridDim.x * blockDim.x)
// ---- launch geometry

// Elementwise grids: enough blocks to fill the device, grid-stride beyond that.
static inline unsigned int ew_blocks(size_t n) {
    unsigned int b = tpc_blocks(n, TPC_BLOCK);
    return b > 65536u ? 65536u : b;
}

// Rows handled by one warp-per-row kernel block.
static inline unsigned int warp_row_blocks(size_t rows) {
    return tpc_blocks(rows, TPC_BLOCK / TPC_WARP);
}

// ---- the ops of the backend table, one block per family file

// casts.cu
void cuda_to_compute(void *ctx, void *dst, const float *src, size_t n);
void cuda_from_compute(void *ctx, float *dst, const void *src, size_t n);

// embedding.cu
void cuda_vocab_embedding_fwd(void *ctx, void *out, const int *tokens, const void *wte,
                              int N, int C, int vocab_start, int n_vocab);
void cuda_vocab_embedding_bwd(void *ctx, float *dwte, const void *dout, const int *tokens,
                              int N, int C, int vocab_start, int n_vocab);
void cuda_position_embedding_fwd(void *ctx, void *x, const void *wpe, int B, int T, int C);
void cuda_position_embedding_bwd(void *ctx, float *dwpe, const void *dout, int B, int T,
                                 int C);

// layernorm.cu
void cuda_layernorm_fwd(void *ctx, void *out, float *mean, float *rstd, const void *inp,
                        const void *w, const void *b, int N, int C);
void cuda_layernorm_bwd(void *ctx, void *dinp, float *dw, float *db, float *dsum, const void *dout,
                        const void *inp, const void *w, const float *mean, const float *rstd, int N,
                        int C);
void cuda_colsum_acc(struct cuda_ctx *c, float *out, const void *x, bool bf, int N, int C);
void cuda_bias_colsum(struct cuda_ctx *c, float *out, const void *x, int N, int C);
void cuda_residual_layernorm_fwd(void *ctx, void *out, void *ln, float *mean, float *rstd,
                                 const void *res, const void *x, const void *bias,
                                 const void *w, const void *b, int N, int C);

// matmul.cu
void cuda_matmul_fwd(void *ctx, void *out, void *pre_gelu, const void *inp, const void *w,
                     const void *bias, int N, int IC, int OC);
void cuda_matmul_bwd(void *ctx, void *dinp, float *dinp_sum, float *dw, float *dbias, const void *dout,
                     const void *inp, const void *w, const void *pre_gelu, int N, int IC,
                     int OC);

// residual_gelu.cu
void cuda_residual_fwd(void *ctx, void *out, const void *res, const void *x,
                       const void *bias, int N, int C);
void cuda_gelu_fwd(void *ctx, void *out, const void *inp, size_t n);
void cuda_gelu_bwd(void *ctx, void *dinp, const void *inp, const void *dout, size_t n);

// attention.cu
size_t cuda_attention_saved_floats(void *ctx, int B, int T, int NH, int HS);
size_t cuda_attention_scratch_floats(void *ctx, int B, int T, int NH, int HS);
void cuda_attention_fwd(void *ctx, void *out, float *saved, float *scratch,
                        const void *qkv, int B, int T, int NH, int HS);
void cuda_attention_bwd(void *ctx, void *dqkv, float *dqkv_sum, float *scratch, const void *dout,
                        const void *qkv, const void *out, const float *saved, int B,
                        int T, int NH, int HS);
const char *cuda_attention_path(void *ctx, int HS);
void cuda_attention_decode(void *ctx, void *out, float *scratch, const void *q,
                           const void *kcache, const void *vcache, int n_ctx, int NH,
                           int HS);

// cross_entropy.cu
void cuda_xent_stats(void *ctx, float *maxes, float *sums, const void *logits,
                     const int *targets, int N, int vocab_start, int n_vocab,
                     int vocab_size);
void cuda_xent_rescale(void *ctx, float *sums, const float *local_maxes, const float *maxes,
                       int N);
void cuda_xent_loss(void *ctx, float *losses, const float *maxes, const float *sums,
                    int N);
void cuda_xent_bwd(void *ctx, void *dlogits, const void *logits, const float *maxes,
                   const float *sums, const int *targets, float dloss, int N,
                   int vocab_start, int n_vocab, int vocab_size);
void cuda_xent_fused(void *ctx, float *losses, void *dlogits, const void *logits,
                     const int *targets, float dloss, int N, int n_vocab, int vocab_size);

// optim.cu
void cuda_sum(void *ctx, float *out, const float *x, size_t n);
void cuda_sumsq_acc(void *ctx, float *out, const float *x, size_t n);
void cuda_segments_sumsq(void *ctx, float *out, const float *x,
                         const struct param_segment *segs, int n_segs, size_t n);
void cuda_scale(void *ctx, float *x, float s, size_t n);
void cuda_adamw(void *ctx, const struct adamw_step *s);

// optim.cu: a kernel of this library (backend creation checks that its image exists).
const void *cuda_probe_kernel(void);
