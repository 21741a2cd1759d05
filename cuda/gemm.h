// gemm.h: bf16 matrix products through cuBLASLt with fused epilogues, C interface.
//
// The three products of a linear layer (out = inp @ w^T + bias, its input gradient and its
// weight gradient), with bf16 operands, fp32 accumulation, and the elementwise work around them
// folded into cuBLASLt epilogues: bias, GELU (tanh approximation, keeping the pre-activation for
// the backward), GELU's derivative on the input gradient. Weight gradients are fp32 and
// accumulate (beta = 1), so gradient accumulation over micro-steps is free.
//
// Every row-major shape below is as the model sees it; the column-major mapping is internal.
// bf16 pointers are void * (C has no bf16 type) and point at __nv_bfloat16 device memory aligned
// to 16 bytes; IC and OC are multiples of 8.
//
// Algorithms: the first call for a (product, shape, epilogue) asks cuBLASLt's heuristic for its
// top candidates, times each on the real operands, and caches the fastest for the life of the
// context, so later calls cost one lookup. Candidates that may use atomics are excluded, so a
// cached choice gives bitwise equal results on every call.
//
// Calls are stream-ordered on the stream given at creation. Return values: GEMM_OK, GEMM_EBADARG
// (unsupported shape or alignment; nothing launched), GEMM_ECUBLAS (cuBLASLt refused or failed;
// gemm_last_error says why).
#pragma once

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

#define GEMM_OK 0
#define GEMM_EBADARG 1
#define GEMM_ECUBLAS 2

struct gemm_ctx;

// stream: a cudaStream_t. workspace_bytes of device memory are allocated for cuBLASLt.
// Returns NULL with a message in err on failure.
struct gemm_ctx *gemm_create(void *stream, size_t workspace_bytes, char *err, size_t errlen);
void gemm_destroy(struct gemm_ctx *g);

// The multiprocessors later products are tuned for and run on: 0 (the default) means all of them;
// n > 0 asks cuBLASLt for algorithms that use n (CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET), for when a
// collective on another stream holds the rest. Each target has its own tuned algorithms.
void gemm_set_sm_target(struct gemm_ctx *g, int sms);

// A one-line description of the last failure (empty when none).
const char *gemm_last_error(const struct gemm_ctx *g);

// What computed the last gemm_fwd / gemm_bwd_data: "cublaslt", or "sm90" for the Hopper kernels of
// gemm_sm90.cu, which a GELU forward and a GELU'-epilogue input gradient take instead of
// cuBLASLt's epilogues when the environment has TPTRAIN_GEMM_SM90=1 at gemm_create, or =auto and
// they were timed faster on the shape (compute capability 9.0, shapes they suit; off by
// default); "" before the first.
const char *gemm_last_fwd_path(const struct gemm_ctx *g);
const char *gemm_last_bwd_data_path(const struct gemm_ctx *g);

// out (N, OC) bf16 = inp (N, IC) bf16 @ w (OC, IC)^T bf16 + bias (OC) bf16 (bias NULL: none).
// With pre_gelu (N, OC) non-NULL: pre_gelu = that product (bias included), out = gelu(pre_gelu).
int gemm_fwd(struct gemm_ctx *g, void *out, void *pre_gelu, const void *inp, const void *w,
             const void *bias, int N, int IC, int OC);

// dinp (N, IC) bf16 = dout (N, OC) bf16 @ w (OC, IC) bf16; with pre_gelu (N, IC) non-NULL the
// result is multiplied elementwise by gelu'(pre_gelu). dsum (IC) fp32 += the column sums of dinp
// as stored (NULL: skipped): summed as gemm_colsum sums, or, where gemm_sm90.cu's kernel computes
// the GELU' product, in its epilogue (another order, fixed).
int gemm_bwd_data(struct gemm_ctx *g, void *dinp, const void *dout, const void *w,
                  const void *pre_gelu, float *dsum, int N, int IC, int OC);

// dw (OC, IC) fp32 += dout (N, OC)^T @ inp (N, IC); dbias (OC) fp32 += column sums of dout
// (dbias NULL: skipped).
int gemm_bwd_weight(struct gemm_ctx *g, float *dw, float *dbias, const void *dout,
                    const void *inp, int N, int IC, int OC);

// out (C) fp32 += the column sums of x (N, C) bf16, added in the order gemm_bwd_weight sums a
// bias gradient of that shape (so either gives the same bits); C a multiple of 8.
int gemm_colsum(struct gemm_ctx *g, float *out, const void *x, int N, int C);

#ifdef __cplusplus
}
#endif
