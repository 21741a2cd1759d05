// residual_gelu.cu: the elementwise ops of a block: the residual add (with bias) and GELU forward and backward.
//
// Part of the CUDA backend: the kernels and their launchers; backend_cuda.cu puts the launchers in
// the backend table. Shared context, checks and device helpers: cuda_internal.cuh.

#include "cuda_internal.cuh"
#include "gelu.cuh"

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

void cuda_residual_fwd(void *ctx, void *out, const void *res, const void *x,
                       const void *bias, int N, int C) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (N <= 0 || C <= 0) return;
    if (is_bf16(c))
        residual_impl(c, (bf16 *)out, (const bf16 *)res, (const bf16 *)x, (const bf16 *)bias, N, C);
    else
        residual_impl(c, (float *)out, (const float *)res, (const float *)x, (const float *)bias, N, C);
}

template <typename E> static void gelu_fwd_impl(struct cuda_ctx *c, E *out, const E *inp, size_t n) {
    const int V = vec16<E>::n;
    if (aligned_to(out, 16) && aligned_to(inp, 16))
        gelu_fwd_kernel<E, V><<<ew_blocks(ceil_div(n, V)), TPC_BLOCK, 0, c->stream>>>(out, inp, n);
    else
        gelu_fwd_kernel<E, 1><<<ew_blocks(n), TPC_BLOCK, 0, c->stream>>>(out, inp, n);
    CUDA_CHECK_LAUNCH("gelu_fwd_kernel");
}

void cuda_gelu_fwd(void *ctx, void *out, const void *inp, size_t n) {
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

void cuda_gelu_bwd(void *ctx, void *dinp, const void *inp, const void *dout, size_t n) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (n == 0) return;
    if (is_bf16(c)) gelu_bwd_impl(c, (bf16 *)dinp, (const bf16 *)inp, (const bf16 *)dout, n);
    else gelu_bwd_impl(c, (float *)dinp, (const float *)inp, (const float *)dout, n);
}
