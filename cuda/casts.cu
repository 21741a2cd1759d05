// casts.cu: the compute-dtype conversions: to_compute / from_compute (fp32 <-> the compute dtype).
//
// Part of the CUDA backend: the kernels and their launchers; backend_cuda.cu puts the launchers in
// the backend table. Shared context, checks and device helpers: cuda_internal.cuh.

#include "cuda_internal.cuh"

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

void cuda_to_compute(void *ctx, void *dst, const float *src, size_t n) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (n == 0) return;
    if (is_bf16(c)) launch_convert(c, (bf16 *)dst, src, n);
    else if (dst != src)
        CUDA_CHECK(cudaMemcpyAsync(dst, src, n * sizeof(float), cudaMemcpyDeviceToDevice, c->stream));
}

void cuda_from_compute(void *ctx, float *dst, const void *src, size_t n) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (n == 0) return;
    if (is_bf16(c)) launch_convert(c, dst, (const bf16 *)src, n);
    else if (dst != src)
        CUDA_CHECK(cudaMemcpyAsync(dst, src, n * sizeof(float), cudaMemcpyDeviceToDevice, c->stream));
}
