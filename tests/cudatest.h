// cudatest.h: device-memory helpers for the suites that call CUDA directly (gemm,
// flash_attention; CUDA builds only). Each fails the calling Criterion test on a CUDA error.
#pragma once

#include <criterion/criterion.h>
#include <cuda_runtime_api.h>
#include <stddef.h>

#include "backend.h"

// Skips the calling test, visibly, when no CUDA device is present; what names the skipped work.
static inline void ct_require_gpu(const char *what) {
    if (!backend_cuda_available() || backend_cuda_device_count() <= 0)
        cr_skip_test("no CUDA device: %s cannot be exercised here", what);
}

static inline void *ct_alloc(size_t bytes) {
    void *p = NULL;
    cr_assert_eq(cudaMalloc(&p, bytes), cudaSuccess, "cudaMalloc(%zu) failed", bytes);
    return p;
}

static inline void ct_upload(void *dst, const void *src, size_t bytes) {
    cr_assert_eq(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice), cudaSuccess);
}

static inline void ct_download(void *dst, const void *src, size_t bytes) {
    cr_assert_eq(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost), cudaSuccess);
}

// 0xFF bytes: NaN in bf16 and fp32, so an element a kernel leaves unwritten shows up.
static inline void ct_poison(void *p, size_t bytes) {
    cr_assert_eq(cudaMemset(p, 0xFF, bytes), cudaSuccess);
}
