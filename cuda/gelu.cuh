// gelu.cuh: GELU (tanh approximation) and its kernels, shared by residual_gelu.cu (the gelu ops)
// and matmul.cu (the fp32 product with a GELU epilogue).
#pragma once

#include "cuda_internal.cuh"

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
