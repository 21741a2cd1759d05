// colsum.cuh: the column-sum kernels shared by layernorm.cu (dw, db) and matmul.cu (dbias).
// Static: each including file gets its own copy, as kernels cannot be launched across files.
#pragma once

#include "cuda_internal.cuh"

// -- column sums

// grid (nchunks = ceil(N / COLSUM_ROWS), ceil(C / blockDim)): partial (nchunks, C) = per-chunk
// column sums of x (N, C), rows in order
template <typename E>
static __global__ void colsum_partial_kernel(float *partial, const E *x, int N, int C) {
    int c = blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= C) return;
    int r0 = blockIdx.x * COLSUM_ROWS;
    int r1 = min(N, r0 + COLSUM_ROWS);
    float s = 0.0f;
    for (int r = r0; r < r1; r++) s += to_f(x[(size_t)r * C + c]);
    partial[(size_t)blockIdx.x * C + c] = s;
}

// out (C) += sum over chunks of partial (nchunks, C), chunks in order
static __global__ void colsum_finish_kernel(float *out, const float *partial, int nchunks, int C) {
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
static __global__ void colsum2_finish_kernel(float *out0, const float *p0, float *out1, const float *p1,
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
