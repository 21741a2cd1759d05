// colsum_finish.cuh: the last step of the column sums, partial sums per chunk of rows added up per
// column in a fixed order; shared by colsum.cuh's users (layernorm.cu) and gemm.cu (the bias
// gradient). No dependencies, so gemm.cu stays apart from the backend's internals. Static: each
// including file gets its own copy.
#pragma once

#include <cuda_runtime.h>

// Two column sums at once (grid (ceil(C / 32), 2)), or one (grid (ceil(C / 32), 1): out1, p1
// unused), with more loads in flight: block (32, 32); blockIdx.y picks (out0, p0) or (out1, p1).
// Thread (x, y) sums chunks y, y + 32, ... of column 32 * blockIdx.x + x in order; the 32 lane
// sums are then added in y order, so the result depends on nchunks only. out (C) += sum of
// partial (nchunks, C).
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

// The launch of colsum2_finish_kernel on st for one column sum (out0 += the sum of p0's nchunks rows
// of C) or, with out1, two; the caller checks the launch.
static inline void colsum_finish(cudaStream_t st, int nchunks, int C, float *out0, const float *p0,
                                 float *out1 = NULL, const float *p1 = NULL) {
    dim3 grid((unsigned)((C + 31) / 32), out1 ? 2u : 1u);
    colsum2_finish_kernel<<<grid, dim3(32, 32), 0, st>>>(out0, p0, out1 ? out1 : out0, out1 ? p1 : p0, nchunks, C);
}
