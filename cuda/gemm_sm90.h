// gemm_sm90.h: the Hopper (sm_90a) products behind gemm.h's GELU forward and GELU'-epilogue input
// gradient, and its plain forward; internal to cuda/ (gemm.cu calls them on compute capability 9.0
// devices when TPTRAIN_GEMM_SM90=1 or auto; the plain forward also needs TPTRAIN_GEMM_SM90_PLAIN=1).
#pragma once

#ifdef __cplusplus
extern "C" {
#endif

// out (N, OC) = gelu(pre), pre (N, OC) = inp (N, IC) @ w (OC, IC)^T + bias (OC, or NULL), bf16,
// on stream (a cudaStream_t). Returns 0 when launched; 1 when the shape or alignment does not suit
// the kernel (N and OC multiples of 128, IC of 64, every pointer 16-byte aligned; nothing launched);
// 2 when the launch failed.
int gemm_sm90_fwd_gelu(void *stream, void *out, void *pre, const void *inp, const void *w, const void *bias,
                       int N, int IC, int OC);

// out (N, OC) = inp (N, IC) @ w (OC, IC)^T + bias (OC, or NULL), bf16: the forward with no
// epilogue but the bias (TPTRAIN_GEMM_SM90_PLAIN=1). The same returns and shapes as above.
int gemm_sm90_fwd(void *stream, void *out, const void *inp, const void *w, const void *bias, int N, int IC,
                  int OC);

// dinp (N, IC) = (dout (N, OC) @ w (OC, IC)) * gelu'(pre (N, IC)), bf16. The same returns; N and IC
// multiples of 128, OC of 64. colsum (NULL: none; else N / 32 x IC floats): the kernel with the
// staged epilogue (the default kind) also writes the column sums of dinp as stored, each of colsum's
// rows summing 32 of dinp's rows (a fixed set, in a fixed order: those of one warp of a tile), and
// sets *colsum_rows to N / 32; the other kinds set it to 0 and sum nothing.
int gemm_sm90_bwd_dgelu(void *stream, void *dinp, const void *dout, const void *w, const void *pre, float *colsum,
                        int *colsum_rows, int N, int IC, int OC);

#ifdef __cplusplus
}
#endif
