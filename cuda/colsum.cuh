// colsum.cuh: the column-sum kernel shared by layernorm.cu (dw, db) and matmul.cu (dbias); the
// finish (32 loads in flight per column, a fixed order) is colsum_finish.cuh's, which gemm.cu uses too.
// Static: each including file gets its own copy, as kernels cannot be launched across files.
#pragma once

#include "colsum_finish.cuh"
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
