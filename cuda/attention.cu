// attention.cu: the attention ops: dispatch between the fused kernels of flash_attention.h (bf16) and the
// fp32 reference path (naive, through (T, T) score matrices), and KV-cache decoding.
//
// Part of the CUDA backend: the kernels and their launchers; backend_cuda.cu puts the launchers in
// the backend table. Shared context, checks and device helpers: cuda_internal.cuh.

#include "cuda_internal.cuh"

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

size_t cuda_attention_saved_floats(void *ctx, int B, int T, int NH, int HS) {
    struct cuda_ctx *c = (struct cuda_ctx *)ctx;
    if (attn_flash(c, HS)) return (size_t)B * NH * T;
    return (size_t)B * NH * T * T;
}

size_t cuda_attention_scratch_floats(void *ctx, int B, int T, int NH, int HS) {
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

void cuda_attention_fwd(void *ctx, void *out, float *saved, float *scratch,
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

// dqkv_sum: by the Hopper kernels as they write dqkv (TPTRAIN_ATTN_BWD_SUMS=fused, where they run),
// else over dqkv afterwards as a bias gradient is (cuda_bias_colsum: the same bits qkv's weight
// gradient gave it before the sums moved here).
void cuda_attention_bwd(void *ctx, void *dqkv, float *dqkv_sum, float *scratch, const void *dout,
                        const void *qkv, const void *out, const float *saved, int B,
                        int T, int NH, int HS) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (B <= 0 || T <= 0 || NH <= 0 || HS <= 0) return;
    int C = NH * HS, N = B * T;
    if (!is_bf16(c)) {
        // the probabilities are saved; the output itself is not needed
        attn_naive_bwd(c, (float *)dqkv, scratch, (const float *)dout, (const float *)qkv, saved,
                       B, T, NH, HS);
        if (dqkv_sum) cuda_bias_colsum(c, dqkv_sum, dqkv, N, 3 * C);
        return;
    }
    const bf16 *x = (const bf16 *)qkv; // (B, T, 3 * NH * HS)
    bf16 *dx = (bf16 *)dqkv;           // (B, T, 3 * NH * HS)
    if (!attn_flash(c, HS)) attn_bf16_unsupported(HS);
    int summed = 0;
    float *sums = dqkv_sum && c->attn_bwd_sums
                      ? (float *)ctx_scratch(c, flash_attention_bwd_sums_floats(B, T, NH, HS) * sizeof(float))
                      : NULL;
    int rc = flash_attention_bwd_summing(c->stream, dx, dx + C, dx + 2 * (size_t)C, dout, x, x + C, x + 2 * (size_t)C,
                                         out, saved, scratch, B, T, NH, HS, 3 * C, C, sums ? dqkv_sum : NULL, sums,
                                         &summed);
    FLASH_CHECK(rc, "flash_attention_bwd (attention_bwd)", B, T, NH, HS);
    if (dqkv_sum && !summed) cuda_bias_colsum(c, dqkv_sum, dx, N, 3 * C);
}

const char *cuda_attention_path(void *ctx, int HS) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (!is_bf16(c)) return "cuda (T,T) fp32 cuBLAS";
    return flash_attention_path(HS);
}

void cuda_attention_decode(void *ctx, void *out, float *scratch, const void *q,
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
