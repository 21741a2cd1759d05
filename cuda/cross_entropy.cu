// cross_entropy.cu: the vocab-parallel cross-entropy: per-row statistics, their rescale across ranks, the loss and
// the logits gradient.
//
// Part of the CUDA backend: the kernels and their launchers; backend_cuda.cu puts the launchers in
// the backend table. Shared context, checks and device helpers: cuda_internal.cuh.

#include "cuda_internal.cuh"

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

// One row's statistics, by the whole block: each thread folds its columns into (m, s) a group of
// XENT_UNROLL vectors at a time (xent_fold), then the block takes the max of the threads' m and sums
// their s rescaled onto it, both in a fixed order. Returns the row's max (to every thread), its sum
// in *sum; the thread holding column r writes that logit to *target_out. sh: TPC_WARP floats.
template <typename E, int V>
__device__ __forceinline__ float xent_row_stats(float *sum, float *target_out, const E *row, int r, int n_real,
                                                float *sh) {
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
    *sum = block_sum_f(s, sh);
    return bm;
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
    float s, bm = xent_row_stats<E, V>(&s, target_out, row, r, n_real, sh);
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

// One vector of a row's gradient: (softmax - onehot) * dloss on real columns (j < n_real), 0 on
// padding. Written once for xent_bwd_kernel and xent_fused_kernel, so both compute every element
// by the same expression.
template <typename E, int V>
__device__ __forceinline__ vec_t<E, V> xent_grad_vec(const vec_t<E, V> &x, int j0, float mx, float inv,
                                                     int r, float dloss, int n_real) {
    vec_t<E, V> o;
#pragma unroll
    for (int e = 0; e < V; e++) {
        int j = j0 + e;
        float d = 0.0f;
        if (j < n_real) {
            float p = xent_exp<E>(to_f(x.e[e]) - mx) * inv;
            d = (p - (j == r ? 1.0f : 0.0f)) * dloss;
        }
        o.e[e] = from_f<E>(d);
    }
    return o;
}

// Writes a row's gradient drow (n_vocab) from its logits row, XENT_UNROLL vectors in flight per
// thread. A thread loads its group before it stores any: with drow possibly aliasing row the
// compiler may not move a load above an earlier store, so without the explicit grouping only one
// load would be in flight. REVERSE walks the groups from the row's end: a row just read is then
// re-read newest part first, the part most likely still in L2. Every element is computed alone,
// so the order changes no result.
template <typename E, int V, bool REVERSE>
__device__ __forceinline__ void xent_grad_row(E *drow, const E *row, float mx, float inv, int r,
                                              float dloss, int n_real, int n_vocab) {
    int nv = n_vocab / V, bs = (int)blockDim.x, step = XENT_UNROLL * bs;
    int ng = (nv + step - 1) / step; // groups of XENT_UNROLL vectors per thread
    for (int gi = 0; gi < ng; gi++) {
        int k0 = threadIdx.x + (REVERSE ? ng - 1 - gi : gi) * step;
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
            st_vec<E, V>(drow + (size_t)k * V, xent_grad_vec<E, V>(x[u], k * V, mx, inv, r, dloss, n_real));
        }
    }
}

// dlogits (N, n_vocab) = (softmax - onehot) * dloss on real columns, 0 on padding; in place safe
// (each element is read and written by the same thread).
template <typename E, int V>
__global__ void xent_bwd_kernel(E *dlogits, const E *logits, const float *maxes, const float *sums,
                                const int *targets, float dloss, int vocab_start, int n_real,
                                int n_vocab) {
    size_t i = blockIdx.x;
    xent_grad_row<E, V, false>(dlogits + i * n_vocab, logits + i * n_vocab, maxes[i], 1.0f / sums[i],
                        targets[i] - vocab_start, dloss, n_real, n_vocab);
}

// One rank holds every column (vocab_start 0): per row, xent_stats_kernel's pass (the same fold,
// block size and vector width, so the same max and sum bit for bit), the loss as xent_loss_kernel
// computes it, then with dlogits the row's gradient as xent_bwd_kernel computes it. The second
// pass re-reads the row this block has just read, newest part first: a row is n_vocab * sizeof(E)
// bytes (100 KB of bf16 at GPT-2's vocabulary) and the rows of the resident blocks (up to 4 per
// SM, 53 MB on an H200's 132 SMs) about fill its 50 MB L2, so most of the re-read comes from L2
// (measured at GPT-2 124M, B 16: 4.07 GB of DRAM traffic for 3.3 GB of logits read and gradients
// written; a variant holding the row in shared memory was 1% faster and was not kept); against
// the unfused path there are also no statistics to write and read back, and two launches fewer.
template <typename E, int V>
__global__ void __launch_bounds__(XENT_STATS_BLOCK, XENT_STATS_MIN_BLOCKS)
xent_fused_kernel(float *losses, E *dlogits, const E *logits, const int *targets, float dloss,
                  int n_real, int n_vocab) {
    __shared__ float sh[TPC_WARP];
    __shared__ float target_logit; // written by the thread that holds the target column
    size_t i = blockIdx.x;
    const E *row = logits + i * n_vocab; // (n_vocab)
    int r = targets[i];
    if (threadIdx.x == 0) target_logit = 0.0f; // a target outside the real columns: 0, as xent_stats
    __syncthreads();
    // every thread gets the row's max and its sum; the sum's barriers also publish target_logit
    float s, bm = xent_row_stats<E, V>(&s, &target_logit, row, r, n_real, sh);
    if (threadIdx.x == 0) losses[i] = logf(s) + bm - target_logit;
    if (dlogits) xent_grad_row<E, V, true>(dlogits + i * n_vocab, row, bm, 1.0f / s, r, dloss, n_real, n_vocab);
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

void cuda_xent_stats(void *ctx, float *maxes, float *sums, const void *logits,
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

void cuda_xent_rescale(void *ctx, float *sums, const float *local_maxes, const float *maxes,
                       int N) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (N <= 0) return;
    xent_rescale_kernel<<<ew_blocks((size_t)N), TPC_BLOCK, 0, c->stream>>>(sums, local_maxes,
                                                                            maxes, N);
    CUDA_CHECK_LAUNCH("xent_rescale_kernel");
}

void cuda_xent_loss(void *ctx, float *losses, const float *maxes, const float *sums,
                    int N) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (N <= 0) return;
    xent_loss_kernel<<<ew_blocks((size_t)N), TPC_BLOCK, 0, c->stream>>>(losses, maxes, sums, N);
    CUDA_CHECK_LAUNCH("xent_loss_kernel");
}

void cuda_xent_bwd(void *ctx, void *dlogits, const void *logits, const float *maxes,
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

template <typename E, int V>
static void xent_fused_launch(struct cuda_ctx *c, float *losses, void *dlogits, const void *logits,
                              const int *targets, float dloss, int N, int n_real, int n_vocab) {
    xent_fused_kernel<E, V><<<(unsigned int)N, XENT_STATS_BLOCK, 0, c->stream>>>(
        losses, (E *)dlogits, (const E *)logits, targets, dloss, n_real, n_vocab);
    CUDA_CHECK_LAUNCH("xent_fused_kernel");
}

void cuda_xent_fused(void *ctx, float *losses, void *dlogits, const void *logits,
                     const int *targets, float dloss, int N, int n_vocab, int vocab_size) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (N <= 0 || n_vocab <= 0) return;
    int n_real = xent_real_columns(0, n_vocab, vocab_size);
    // The vector width xent_stats would choose (its fold order depends on it); the gradient pass
    // stores with the same width, so dlogits must then be aligned as the logits are. Where it is
    // not, the three ops run instead: the same results, in three passes.
    bool vec = aligned_to(logits, 16);
    int width = is_bf16(c) ? (vec && n_vocab % 8 == 0 ? 8 : 1) : (vec && n_vocab % 4 == 0 ? 4 : 1);
    if (dlogits && width > 1 && !aligned_to(dlogits, 16)) {
        float *stats = (float *)ctx_scratch(c, 3 * (size_t)N * sizeof(float)); // maxes (N), sums (2, N)
        cuda_xent_stats(ctx, stats, stats + N, logits, targets, N, 0, n_vocab, vocab_size);
        cuda_xent_loss(ctx, losses, stats, stats + N, N);
        cuda_xent_bwd(ctx, dlogits, logits, stats, stats + N, targets, dloss, N, 0, n_vocab, vocab_size);
        return;
    }
    if (is_bf16(c) && width == 8)
        xent_fused_launch<bf16, 8>(c, losses, dlogits, logits, targets, dloss, N, n_real, n_vocab);
    else if (is_bf16(c))
        xent_fused_launch<bf16, 1>(c, losses, dlogits, logits, targets, dloss, N, n_real, n_vocab);
    else if (width == 4)
        xent_fused_launch<float, 4>(c, losses, dlogits, logits, targets, dloss, N, n_real, n_vocab);
    else
        xent_fused_launch<float, 1>(c, losses, dlogits, logits, targets, dloss, N, n_real, n_vocab);
}
