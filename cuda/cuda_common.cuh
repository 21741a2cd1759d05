// cuda_common.cuh: checked-call macros and small launch helpers shared by the .cu files.
//
// Every CUDA, cuBLAS and NCCL call goes through a macro that carries __FILE__/__LINE__ and, on
// failure, ends the process through tp_die with the failing call and a hint at what to do next.
// The backend has no way to report an error to its caller (the ops return void), and a GPU error
// leaves the context unusable anyway, so dying loudly is the only honest option.
#pragma once

#include <cuda_runtime.h>

// common.h is shared with the C11 host code; _Noreturn is a C11 keyword that C++ lacks.
#ifdef __cplusplus
#ifndef _Noreturn
#define _Noreturn __attribute__((noreturn))
#endif
extern "C" {
#endif
#include "common.h"
#ifdef __cplusplus
}
#endif

// Kernel launch geometry: sizes are size_t, grids must fit in unsigned int.
#define TPC_BLOCK 256
#define TPC_WARP 32

static inline unsigned int tpc_blocks(size_t n, size_t per_block) {
    size_t b = (n + per_block - 1) / per_block;
    if (b == 0) b = 1;
    // gridDim.x is limited to 2^31-1; elementwise kernels loop with a grid stride beyond this.
    if (b > 0x7fffffffu) b = 0x7fffffffu;
    return (unsigned int)b;
}

static inline void tpc_cuda_check(cudaError_t e, const char *call, const char *file, int line) {
    if (e == cudaSuccess) return;
    tp_die(TP_EXIT_RUNTIME,
           "%s:%d: CUDA error %d (%s: %s) in %s; the GPU context is unusable. Check nvidia-smi for "
           "a busy, failed or missing device, rerun with CUDA_LAUNCH_BLOCKING=1 (and under "
           "compute-sanitizer) to locate the failing kernel",
           file, line, (int)e, cudaGetErrorName(e), cudaGetErrorString(e), call);
}
#define CUDA_CHECK(call) tpc_cuda_check((call), #call, __FILE__, __LINE__)
// After every kernel launch: catches bad launch configurations at once; faults inside the kernel
// surface at the next synchronising call.
#define CUDA_CHECK_LAUNCH(name) tpc_cuda_check(cudaGetLastError(), "launch of " name, __FILE__, __LINE__)
