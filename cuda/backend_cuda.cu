// backend_cuda.cu: the fp32 CUDA backend behind struct backend_i (src/backend.h).
//
// One context per backend: a device, a non-blocking stream, a cuBLAS handle bound to that stream
// (fp32 arithmetic, TF32 and emulation off) with its own workspace, and a scratch buffer for
// reduction partials. Every op is enqueued on the stream; only copy_to_host and synchronize wait.
//
// Determinism: no float atomics anywhere. Every reduction is split into per-block partials with a
// grid that depends only on the problem size, then summed in a fixed order, so identical inputs
// give bitwise identical outputs on every call (cuBLAS is deterministic for a fixed handle,
// workspace and stream with atomics disallowed, its default).
//
// Sections: context and checks, kernels, launchers, backend table, public entry points.
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "cuda_common.cuh"

extern "C" {
#include "backend.h"
}

// ---- context and checks

// Hopper wants a larger cuBLAS workspace than the 4 MiB default for its best kernels.
#define CUDA_BLAS_WORKSPACE_BYTES ((size_t)32 << 20)
// Rows summed by one block in a column-sum partial (layernorm dw/db, matmul dbias).
#define COLSUM_ROWS 32
// Blocks of a full reduction (sum, sumsq): fixed so the summation order depends on n only.
#define REDUCE_MAX_BLOCKS 1024
// Vocab rows are split into this many groups (row mod groups) for the embedding backward; a
// power of two so the group test is a mask.
#define EMB_BWD_GROUPS 64
#define EMB_BWD_TILE 1024
#define LN_EPS 1e-5 // GPT-2; double, as the statistics are

struct cuda_ctx {
    int device;
    cudaStream_t stream;       // every op of this backend runs here, NCCL too
    cublasHandle_t blas;       // bound to stream
    void *blas_ws;             // (CUDA_BLAS_WORKSPACE_BYTES) cuBLAS workspace
    void *scratch;             // (scratch_bytes) reduction partials; grows, never shrinks
    size_t scratch_bytes;
};

static void cublas_check(cublasStatus_t s, const char *call, const char *file, int line) {
    if (s == CUBLAS_STATUS_SUCCESS) return;
    tp_die(TP_EXIT_RUNTIME,
           "%s:%d: cuBLAS error %d (%s) in %s; check the matrix sizes in the caller, that the GPU "
           "has free memory (nvidia-smi), and rerun with CUDA_LAUNCH_BLOCKING=1",
           file, line, (int)s, cublasGetStatusString(s), call);
}
#define CUBLAS_CHECK(call) cublas_check((call), #call, __FILE__, __LINE__)

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

// Scratch for reduction partials: grown on demand (rarely: the first step sizes it). Growing
// waits for the stream so no queued kernel still reads the old buffer.
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
__device__ __forceinline__ double warp_sum_d(double v) { return warp_reduce(v, sum_op()); }
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

// -- embeddings

__global__ void vocab_embedding_fwd_kernel(float *out, const int *tokens, const float *wte,
                                           int N, int C, int vocab_start, int n_vocab) {
    GRID_STRIDE(idx, (size_t)N * C) {
        size_t i = idx / C, c = idx % C;
        int r = tokens[i] - vocab_start;
        out[idx] = (r >= 0 && r < n_vocab) ? wte[(size_t)r * C + c] : 0.0f;
    }
}

// grid (EMB_BWD_GROUPS, ceil(C / blockDim)). Block (g, cy) owns the channels of its y-slice of
// every vocab row r with r % EMB_BWD_GROUPS == g, and walks the tokens in order: each dwte element
// is updated by exactly one thread, in token order, so no atomics are needed and the result is
// the same sum, in the same order, as a sequential loop over tokens.
__global__ void vocab_embedding_bwd_kernel(float *dwte, const float *dout, const int *tokens,
                                           int N, int C, int vocab_start, int n_vocab) {
    __shared__ int rows[EMB_BWD_TILE];
    int g = blockIdx.x;
    int c = blockIdx.y * blockDim.x + threadIdx.x;
    for (int i0 = 0; i0 < N; i0 += EMB_BWD_TILE) {
        int cnt = min(EMB_BWD_TILE, N - i0);
        __syncthreads(); // the previous tile is no longer read
        for (int j = threadIdx.x; j < cnt; j += blockDim.x) {
            int r = tokens[i0 + j] - vocab_start;
            bool mine = r >= 0 && r < n_vocab && (r & (EMB_BWD_GROUPS - 1)) == g;
            rows[j] = mine ? r : -1;
        }
        __syncthreads();
        if (c < C) {
            for (int j = 0; j < cnt; j++) {
                int r = rows[j];
                if (r < 0) continue;
                dwte[(size_t)r * C + c] += dout[(size_t)(i0 + j) * C + c];
            }
        }
    }
}

__global__ void position_embedding_fwd_kernel(float *x, const float *wpe, int B, int T, int C) {
    GRID_STRIDE(idx, (size_t)B * T * C) {
        size_t tc = idx % ((size_t)T * C); // (t, c) offset into wpe
        x[idx] += wpe[tc];
    }
}

// One thread per (t, c), summing over b in order.
__global__ void position_embedding_bwd_kernel(float *dwpe, const float *dout, int B, int T, int C) {
    size_t TC = (size_t)T * C;
    GRID_STRIDE(tc, TC) {
        float acc = dwpe[tc];
        for (int b = 0; b < B; b++) acc += dout[(size_t)b * TC + tc];
        dwpe[tc] = acc;
    }
}

// -- layernorm: one warp per row

__global__ void layernorm_fwd_kernel(float *out, float *mean, float *rstd, const float *inp,
                                     const float *w, const float *b, int N, int C) {
    int row = blockIdx.x * (blockDim.x / TPC_WARP) + threadIdx.x / TPC_WARP;
    int lane = threadIdx.x % TPC_WARP;
    if (row >= N) return; // the whole warp leaves together
    const float *x = inp + (size_t)row * C;   // (C)
    float *y = out + (size_t)row * C;         // (C)
    // Statistics in double (cheap next to the memory traffic; they set the accuracy of everything
    // downstream), in two passes over the row (it stays in L1) rather than E[x^2] - m^2, which
    // cancels badly.
    double s = 0.0;
    for (int c = lane; c < C; c += TPC_WARP) s += (double)x[c];
    float m = (float)(warp_sum_d(s) / C);
    double v = 0.0;
    for (int c = lane; c < C; c += TPC_WARP) {
        double d = (double)x[c] - (double)m;
        v += d * d;
    }
    float rs = (float)(1.0 / sqrt(warp_sum_d(v) / C + LN_EPS));
    for (int c = lane; c < C; c += TPC_WARP) y[c] = (x[c] - m) * rs * w[c] + b[c];
    if (lane == 0) {
        if (mean) mean[row] = m;
        if (rstd) rstd[row] = rs;
    }
}

// dinp (N, C) += per row: (dnorm - mean(dnorm) - norm * mean(dnorm * norm)) * rstd
__global__ void layernorm_bwd_dinp_kernel(float *dinp, const float *dout, const float *inp,
                                          const float *w, const float *mean, const float *rstd,
                                          int N, int C) {
    int row = blockIdx.x * (blockDim.x / TPC_WARP) + threadIdx.x / TPC_WARP;
    int lane = threadIdx.x % TPC_WARP;
    if (row >= N) return;
    const float *x = inp + (size_t)row * C;
    const float *dy = dout + (size_t)row * C;
    float *dx = dinp + (size_t)row * C;
    float m = mean[row], rs = rstd[row];
    float s1 = 0.0f, s2 = 0.0f;
    // dn is rounded on its own (__fmul_rn is never fused into an FMA): fused into dn - s1 it
    // would leave the product's rounding error where the reference cancels exactly (C = 1, or
    // rows whose dnorm is flat).
    for (int c = lane; c < C; c += TPC_WARP) {
        float n = (x[c] - m) * rs;
        float dn = __fmul_rn(w[c], dy[c]);
        s1 += dn;
        s2 += dn * n;
    }
    s1 = warp_sum_f(s1) / (float)C;
    s2 = warp_sum_f(s2) / (float)C;
    for (int c = lane; c < C; c += TPC_WARP) {
        float n = (x[c] - m) * rs;
        float dn = __fmul_rn(w[c], dy[c]);
        dx[c] += (dn - s1 - n * s2) * rs;
    }
}

// grid (ceil(N / COLSUM_ROWS), ceil(C / blockDim)): pw/pb (nchunks, C) = per-chunk column sums of
// dout * norm and dout, rows in order.
__global__ void layernorm_bwd_partial_kernel(float *pw, float *pb, const float *dout,
                                             const float *inp, const float *mean,
                                             const float *rstd, int N, int C) {
    int c = blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= C) return;
    int r0 = blockIdx.x * COLSUM_ROWS;
    int r1 = min(N, r0 + COLSUM_ROWS);
    float sw = 0.0f, sb = 0.0f;
    for (int r = r0; r < r1; r++) {
        size_t at = (size_t)r * C + c;
        float n = (inp[at] - mean[r]) * rstd[r];
        sw += dout[at] * n;
        sb += dout[at];
    }
    pw[(size_t)blockIdx.x * C + c] = sw;
    pb[(size_t)blockIdx.x * C + c] = sb;
}

// grid (nchunks = ceil(N / COLSUM_ROWS), ceil(C / blockDim)): partial (nchunks, C) = per-chunk
// column sums of x (N, C), rows in order
__global__ void colsum_partial_kernel(float *partial, const float *x, int N, int C) {
    int c = blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= C) return;
    int r0 = blockIdx.x * COLSUM_ROWS;
    int r1 = min(N, r0 + COLSUM_ROWS);
    float s = 0.0f;
    for (int r = r0; r < r1; r++) s += x[(size_t)r * C + c];
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

// -- linear layers and elementwise

// out (N, OC) += bias (OC) broadcast over rows
__global__ void add_bias_kernel(float *out, const float *bias, int N, int OC) {
    GRID_STRIDE(idx, (size_t)N * OC) out[idx] += bias[idx % OC];
}

__global__ void residual_kernel(float *out, const float *res, const float *x, const float *bias,
                                int N, int C) {
    GRID_STRIDE(idx, (size_t)N * C) {
        float v = res[idx] + x[idx];
        if (bias) v += bias[idx % C];
        out[idx] = v;
    }
}

#define GELU_SCALE 0.7978845608028654f // sqrt(2 / pi)

__global__ void gelu_fwd_kernel(float *out, const float *inp, size_t n) {
    GRID_STRIDE(i, n) {
        float x = inp[i];
        float cube = 0.044715f * x * x * x;
        out[i] = 0.5f * x * (1.0f + tanhf(GELU_SCALE * (x + cube)));
    }
}

__global__ void gelu_bwd_kernel(float *dinp, const float *inp, const float *dout, size_t n) {
    GRID_STRIDE(i, n) {
        float x = inp[i];
        float cube = 0.044715f * x * x * x;
        float th = tanhf(GELU_SCALE * (x + cube));
        float sech2 = 1.0f - th * th; // 1/cosh^2 without cosh's overflow
        float grad = 0.5f * (1.0f + th) +
                     x * 0.5f * sech2 * GELU_SCALE * (1.0f + 3.0f * 0.044715f * x * x);
        dinp[i] = grad * dout[i];
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
__global__ void attn_decode_kernel(float *out, float *scores, const float *q, const float *kc,
                                   const float *vc, int n_ctx, int NH, int HS, float scale) {
    __shared__ float sh[TPC_WARP];
    int h = blockIdx.x;
    size_t C = (size_t)NH * HS;
    const float *qh = q + (size_t)h * HS;       // (HS)
    float *s = scores + (size_t)h * n_ctx;      // (n_ctx)
    float mx = -INFINITY;
    for (int j = threadIdx.x; j < n_ctx; j += blockDim.x) {
        const float *k = kc + (size_t)j * C + (size_t)h * HS;
        float acc = 0.0f;
        for (int d = 0; d < HS; d++) acc += qh[d] * k[d];
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
        for (int j = 0; j < n_ctx; j++) acc += s[j] * vc[(size_t)j * C + (size_t)h * HS + d];
        out[(size_t)h * HS + d] = acc * inv;
    }
}

// -- vocab-parallel cross-entropy: one block per row

__global__ void xent_max_kernel(float *maxes, const float *logits, int n_real, int n_vocab) {
    __shared__ float sh[TPC_WARP];
    const float *row = logits + (size_t)blockIdx.x * n_vocab; // (n_vocab)
    float m = -INFINITY;
    for (int j = threadIdx.x; j < n_real; j += blockDim.x) m = fmaxf(m, row[j]);
    m = block_max_f(m, sh);
    if (threadIdx.x == 0) maxes[blockIdx.x] = m;
}

// sums (2, N): [0][i] = sum exp(logit - max) over real columns, [1][i] = target logit or 0
__global__ void xent_sums_kernel(float *sums, const float *logits, const float *maxes,
                                 const int *targets, int N, int vocab_start, int n_real,
                                 int n_vocab) {
    __shared__ float sh[TPC_WARP];
    size_t i = blockIdx.x;
    const float *row = logits + i * n_vocab; // (n_vocab)
    float mx = maxes[i];
    // a -inf max means no real column anywhere; -inf - -inf would be NaN, so such a row adds 0
    int n_sum = mx == -INFINITY ? 0 : n_real;
    float s = 0.0f;
    for (int j = threadIdx.x; j < n_sum; j += blockDim.x) s += expf(row[j] - mx);
    s = block_sum_f(s, sh);
    if (threadIdx.x == 0) {
        int r = targets[i] - vocab_start;
        sums[i] = s;
        sums[(size_t)N + i] = (r >= 0 && r < n_real) ? row[r] : 0.0f;
    }
}

__global__ void xent_loss_kernel(float *losses, const float *maxes, const float *sums, int N) {
    GRID_STRIDE(i, (size_t)N) losses[i] = logf(sums[i]) + maxes[i] - sums[(size_t)N + i];
}

// dlogits (N, n_vocab) = (softmax - onehot) * dloss on real columns, 0 on padding; in place safe
__global__ void xent_bwd_kernel(float *dlogits, const float *logits, const float *maxes,
                                const float *sums, const int *targets, float dloss,
                                int vocab_start, int n_real, int n_vocab) {
    size_t i = blockIdx.x;
    const float *row = logits + i * n_vocab;
    float *drow = dlogits + i * n_vocab;
    float mx = maxes[i];
    float inv = 1.0f / sums[i];
    int r = targets[i] - vocab_start;
    for (int j = threadIdx.x; j < n_vocab; j += blockDim.x) {
        float d = 0.0f;
        if (j < n_real) {
            float p = expf(row[j] - mx) * inv;
            d = (p - (j == r ? 1.0f : 0.0f)) * dloss;
        }
        drow[j] = d;
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

// AdamW with decoupled weight decay; bc1, bc2 = 1 - beta^t (bias corrections)
__global__ void adamw_kernel(float *p, const float *g, float *m, float *v, size_t n, float lr,
                             float beta1, float beta2, float eps, float wd, float grad_scale,
                             float bc1, float bc2) {
    GRID_STRIDE(i, n) {
        float gi = g[i] * grad_scale;
        float mi = beta1 * m[i] + (1.0f - beta1) * gi;
        float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        float mhat = mi / bc1, vhat = vi / bc2;
        p[i] -= lr * (mhat / (sqrtf(vhat) + eps) + wd * p[i]);
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
    CUBLAS_CHECK(cublasDestroy(c->blas));
    if (c->blas_ws) CUDA_CHECK(cudaFree(c->blas_ws));
    if (c->scratch) CUDA_CHECK(cudaFree(c->scratch));
    CUDA_CHECK(cudaStreamDestroy(c->stream));
    free(c);
}

// -- embeddings

static void cuda_vocab_embedding_fwd(void *ctx, float *out, const int *tokens, const float *wte,
                                     int N, int C, int vocab_start, int n_vocab) {
    struct cuda_ctx *c = ctx_of(ctx);
    size_t n = (size_t)N * C;
    if (n == 0) return;
    vocab_embedding_fwd_kernel<<<ew_blocks(n), TPC_BLOCK, 0, c->stream>>>(
        out, tokens, wte, N, C, vocab_start, n_vocab);
    CUDA_CHECK_LAUNCH("vocab_embedding_fwd_kernel");
}

static void cuda_vocab_embedding_bwd(void *ctx, float *dwte, const float *dout, const int *tokens,
                                     int N, int C, int vocab_start, int n_vocab) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (N <= 0 || C <= 0 || n_vocab <= 0) return;
    const int threads = 128;
    dim3 grid(EMB_BWD_GROUPS, tpc_blocks((size_t)C, threads));
    vocab_embedding_bwd_kernel<<<grid, threads, 0, c->stream>>>(dwte, dout, tokens, N, C,
                                                                vocab_start, n_vocab);
    CUDA_CHECK_LAUNCH("vocab_embedding_bwd_kernel");
}

static void cuda_position_embedding_fwd(void *ctx, float *x, const float *wpe, int B, int T,
                                        int C) {
    struct cuda_ctx *c = ctx_of(ctx);
    size_t n = (size_t)B * T * C;
    if (n == 0) return;
    position_embedding_fwd_kernel<<<ew_blocks(n), TPC_BLOCK, 0, c->stream>>>(x, wpe, B, T, C);
    CUDA_CHECK_LAUNCH("position_embedding_fwd_kernel");
}

static void cuda_position_embedding_bwd(void *ctx, float *dwpe, const float *dout, int B, int T,
                                        int C) {
    struct cuda_ctx *c = ctx_of(ctx);
    size_t n = (size_t)T * C;
    if (n == 0 || B <= 0) return;
    position_embedding_bwd_kernel<<<ew_blocks(n), TPC_BLOCK, 0, c->stream>>>(dwpe, dout, B, T, C);
    CUDA_CHECK_LAUNCH("position_embedding_bwd_kernel");
}

// -- layernorm

static void cuda_layernorm_fwd(void *ctx, float *out, float *mean, float *rstd, const float *inp,
                               const float *w, const float *b, int N, int C) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (N <= 0 || C <= 0) return;
    layernorm_fwd_kernel<<<warp_row_blocks((size_t)N), TPC_BLOCK, 0, c->stream>>>(
        out, mean, rstd, inp, w, b, N, C);
    CUDA_CHECK_LAUNCH("layernorm_fwd_kernel");
}

static void cuda_layernorm_bwd(void *ctx, float *dinp, float *dw, float *db, const float *dout,
                               const float *inp, const float *w, const float *mean,
                               const float *rstd, int N, int C) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (N <= 0 || C <= 0) return;
    layernorm_bwd_dinp_kernel<<<warp_row_blocks((size_t)N), TPC_BLOCK, 0, c->stream>>>(
        dinp, dout, inp, w, mean, rstd, N, C);
    CUDA_CHECK_LAUNCH("layernorm_bwd_dinp_kernel");

    unsigned int nchunks = tpc_blocks((size_t)N, COLSUM_ROWS);
    float *pw = (float *)ctx_scratch(c, 2 * (size_t)nchunks * C * sizeof(float)); // (nchunks, C)
    float *pb = pw + (size_t)nchunks * C;                                         // (nchunks, C)
    dim3 grid(nchunks, tpc_blocks((size_t)C, TPC_BLOCK));
    layernorm_bwd_partial_kernel<<<grid, TPC_BLOCK, 0, c->stream>>>(pw, pb, dout, inp, mean, rstd,
                                                                    N, C);
    CUDA_CHECK_LAUNCH("layernorm_bwd_partial_kernel");
    unsigned int cb = tpc_blocks((size_t)C, TPC_BLOCK);
    colsum_finish_kernel<<<cb, TPC_BLOCK, 0, c->stream>>>(dw, pw, (int)nchunks, C);
    CUDA_CHECK_LAUNCH("colsum_finish_kernel (layernorm dw)");
    colsum_finish_kernel<<<cb, TPC_BLOCK, 0, c->stream>>>(db, pb, (int)nchunks, C);
    CUDA_CHECK_LAUNCH("colsum_finish_kernel (layernorm db)");
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

static void cuda_matmul_fwd(void *ctx, float *out, const float *inp, const float *w,
                            const float *bias, int N, int IC, int OC) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (N <= 0 || OC <= 0) return;
    const float one = 1.0f, zero = 0.0f;
    CUBLAS_CHECK(cublasSgemm(c->blas, CUBLAS_OP_T, CUBLAS_OP_N, OC, N, IC, &one, w, IC, inp, IC,
                             &zero, out, OC));
    if (bias) {
        size_t n = (size_t)N * OC;
        add_bias_kernel<<<ew_blocks(n), TPC_BLOCK, 0, c->stream>>>(out, bias, N, OC);
        CUDA_CHECK_LAUNCH("add_bias_kernel");
    }
}

static void cuda_matmul_bwd(void *ctx, float *dinp, float *dw, float *dbias, const float *dout,
                            const float *inp, const float *w, int N, int IC, int OC) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (N <= 0 || OC <= 0 || IC <= 0) return;
    const float one = 1.0f, zero = 0.0f;
    if (dinp) {
        CUBLAS_CHECK(cublasSgemm(c->blas, CUBLAS_OP_N, CUBLAS_OP_N, IC, N, OC, &one, w, IC, dout,
                                 OC, &zero, dinp, IC));
    }
    CUBLAS_CHECK(cublasSgemm(c->blas, CUBLAS_OP_N, CUBLAS_OP_T, IC, OC, N, &one, inp, IC, dout, OC,
                             &one, dw, IC));
    if (dbias) {
        unsigned int nchunks = tpc_blocks((size_t)N, COLSUM_ROWS);
        float *part = (float *)ctx_scratch(c, (size_t)nchunks * OC * sizeof(float)); // (nchunks, OC)
        dim3 grid(nchunks, tpc_blocks((size_t)OC, TPC_BLOCK));
        colsum_partial_kernel<<<grid, TPC_BLOCK, 0, c->stream>>>(part, dout, N, OC);
        CUDA_CHECK_LAUNCH("colsum_partial_kernel (dbias)");
        colsum_finish_kernel<<<tpc_blocks((size_t)OC, TPC_BLOCK), TPC_BLOCK, 0, c->stream>>>(
            dbias, part, (int)nchunks, OC);
        CUDA_CHECK_LAUNCH("colsum_finish_kernel (dbias)");
    }
}

static void cuda_residual_fwd(void *ctx, float *out, const float *res, const float *x,
                              const float *bias, int N, int C) {
    struct cuda_ctx *c = ctx_of(ctx);
    size_t n = (size_t)N * C;
    if (n == 0) return;
    residual_kernel<<<ew_blocks(n), TPC_BLOCK, 0, c->stream>>>(out, res, x, bias, N, C);
    CUDA_CHECK_LAUNCH("residual_kernel");
}

static void cuda_gelu_fwd(void *ctx, float *out, const float *inp, size_t n) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (n == 0) return;
    gelu_fwd_kernel<<<ew_blocks(n), TPC_BLOCK, 0, c->stream>>>(out, inp, n);
    CUDA_CHECK_LAUNCH("gelu_fwd_kernel");
}

static void cuda_gelu_bwd(void *ctx, float *dinp, const float *inp, const float *dout, size_t n) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (n == 0) return;
    gelu_bwd_kernel<<<ew_blocks(n), TPC_BLOCK, 0, c->stream>>>(dinp, inp, dout, n);
    CUDA_CHECK_LAUNCH("gelu_bwd_kernel");
}

// -- attention
//
// saved   (B, NH, T, T): the softmax probabilities (0 above the diagonal)
// scratch: q, k, v, y (B, NH, T, HS) each, then for the backward dq, dk, dv (B, NH, T, HS) and
//          datt (B, NH, T, T). y holds the forward's per-head output, and dy in the backward.

static size_t cuda_attention_saved_floats(void *ctx, int B, int T, int NH, int HS) {
    (void)ctx;
    (void)HS;
    return (size_t)B * NH * T * T;
}

static size_t cuda_attention_scratch_floats(void *ctx, int B, int T, int NH, int HS) {
    (void)ctx;
    size_t S = (size_t)B * NH * T * HS;
    return 7 * S + (size_t)B * NH * T * T;
}

static void cuda_attention_fwd(void *ctx, float *out, float *saved, float *scratch,
                               const float *qkv, int B, int T, int NH, int HS) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (B <= 0 || T <= 0 || NH <= 0 || HS <= 0) return;
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

static void cuda_attention_bwd(void *ctx, float *dqkv, float *scratch, const float *dout,
                               const float *qkv, const float *out, const float *saved, int B,
                               int T, int NH, int HS) {
    struct cuda_ctx *c = ctx_of(ctx);
    (void)out; // the probabilities are saved; the output itself is not needed
    if (B <= 0 || T <= 0 || NH <= 0 || HS <= 0) return;
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

static void cuda_attention_decode(void *ctx, float *out, float *scratch, const float *q,
                                  const float *kcache, const float *vcache, int n_ctx, int NH,
                                  int HS) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (n_ctx <= 0 || NH <= 0 || HS <= 0) return;
    attn_decode_kernel<<<NH, TPC_BLOCK, 0, c->stream>>>(out, scratch, q, kcache, vcache, n_ctx,
                                                        NH, HS, 1.0f / sqrtf((float)HS));
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

#define XENT_BLOCK 512

static void cuda_xent_max(void *ctx, float *maxes, const float *logits, int N, int vocab_start,
                          int n_vocab, int vocab_size) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (N <= 0) return;
    int n_real = xent_real_columns(vocab_start, n_vocab, vocab_size);
    xent_max_kernel<<<(unsigned int)N, XENT_BLOCK, 0, c->stream>>>(maxes, logits, n_real, n_vocab);
    CUDA_CHECK_LAUNCH("xent_max_kernel");
}

static void cuda_xent_sums(void *ctx, float *sums, const float *logits, const float *maxes,
                           const int *targets, int N, int vocab_start, int n_vocab,
                           int vocab_size) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (N <= 0) return;
    int n_real = xent_real_columns(vocab_start, n_vocab, vocab_size);
    xent_sums_kernel<<<(unsigned int)N, XENT_BLOCK, 0, c->stream>>>(
        sums, logits, maxes, targets, N, vocab_start, n_real, n_vocab);
    CUDA_CHECK_LAUNCH("xent_sums_kernel");
}

static void cuda_xent_loss(void *ctx, float *losses, const float *maxes, const float *sums,
                           int N) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (N <= 0) return;
    xent_loss_kernel<<<ew_blocks((size_t)N), TPC_BLOCK, 0, c->stream>>>(losses, maxes, sums, N);
    CUDA_CHECK_LAUNCH("xent_loss_kernel");
}

static void cuda_xent_bwd(void *ctx, float *dlogits, const float *logits, const float *maxes,
                          const float *sums, const int *targets, float dloss, int N,
                          int vocab_start, int n_vocab, int vocab_size) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (N <= 0 || n_vocab <= 0) return;
    int n_real = xent_real_columns(vocab_start, n_vocab, vocab_size);
    xent_bwd_kernel<<<(unsigned int)N, XENT_BLOCK, 0, c->stream>>>(
        dlogits, logits, maxes, sums, targets, dloss, vocab_start, n_real, n_vocab);
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

static void cuda_scale(void *ctx, float *x, float s, size_t n) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (n == 0) return;
    scale_kernel<<<ew_blocks(n), TPC_BLOCK, 0, c->stream>>>(x, s, n);
    CUDA_CHECK_LAUNCH("scale_kernel");
}

static void cuda_adamw(void *ctx, float *p, const float *g, float *m, float *v, size_t n, float lr,
                       float beta1, float beta2, float eps, float weight_decay, float grad_scale,
                       int t) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (n == 0) return;
    // bias corrections in double on the host: pow(beta, t) of a float loses digits at large t
    float bc1 = (float)(1.0 - pow((double)beta1, (double)t));
    float bc2 = (float)(1.0 - pow((double)beta2, (double)t));
    adamw_kernel<<<ew_blocks(n), TPC_BLOCK, 0, c->stream>>>(p, g, m, v, n, lr, beta1, beta2, eps,
                                                           weight_decay, grad_scale, bc1, bc2);
    CUDA_CHECK_LAUNCH("adamw_kernel");
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
    .host_accessible = false,
    .alloc = cuda_alloc,
    .free = cuda_free,
    .zero = cuda_zero,
    .copy_to_device = cuda_copy_to_device,
    .copy_to_host = cuda_copy_to_host,
    .copy = cuda_copy,
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
    .gelu_fwd = cuda_gelu_fwd,
    .gelu_bwd = cuda_gelu_bwd,
    .attention_saved_floats = cuda_attention_saved_floats,
    .attention_scratch_floats = cuda_attention_scratch_floats,
    .attention_fwd = cuda_attention_fwd,
    .attention_bwd = cuda_attention_bwd,
    .attention_decode = cuda_attention_decode,
    .xent_max = cuda_xent_max,
    .xent_sums = cuda_xent_sums,
    .xent_loss = cuda_xent_loss,
    .xent_bwd = cuda_xent_bwd,
    .sum = cuda_sum,
    .sumsq_acc = cuda_sumsq_acc,
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

extern "C" bool backend_cuda_create(struct backend *out, int device, char *err, size_t errlen) {
    out->iface = NULL;
    out->ctx = NULL;
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
