// matmul.cu: the linear layers: fp32 through cuBLAS SGEMM, bf16 through gemm.h (cuBLASLt, fused
// epilogues) with a cuBLAS GemmEx fallback for the shapes it refuses.
//
// Part of the CUDA backend: the kernels and their launchers; backend_cuda.cu puts the launchers in
// the backend table. Shared context, checks and device helpers: cuda_internal.cuh.

#include "cuda_internal.cuh"
#include "colsum.cuh"
#include "gelu.cuh"

// -- linear layers and elementwise

// out (N, OC) += bias (OC) broadcast over rows (fp32 path, after SGEMM)
__global__ void add_bias_kernel(float *out, const float *bias, int N, int OC) {
    GRID_STRIDE(idx, (size_t)N * OC) out[idx] += bias[idx % OC];
}
// bf16 product fallback (shapes gemm.h refuses), after an fp32-output cuBLAS product acc:
// out (N, OC) = acc + bias, or with pre_gelu: pre_gelu = acc + bias, out = gelu(acc + bias)
__global__ void gemm_fallback_fwd_epilogue_kernel(bf16 *out, bf16 *pre_gelu, const float *acc,
                                                  const bf16 *bias, int N, int OC) {
    GRID_STRIDE(i, (size_t)N * OC) {
        float v = acc[i];
        if (bias) v += to_f(bias[i % OC]);
        if (pre_gelu) {
            pre_gelu[i] = from_f<bf16>(v);
            v = gelu_f(v);
        }
        out[i] = from_f<bf16>(v);
    }
}

// dinp (n) = acc, times gelu'(pre_gelu) when given
__global__ void gemm_fallback_bwd_epilogue_kernel(bf16 *dinp, const float *acc,
                                                  const bf16 *pre_gelu, size_t n) {
    GRID_STRIDE(i, n) {
        float v = acc[i];
        if (pre_gelu) v *= gelu_grad_f(to_f(pre_gelu[i]));
        dinp[i] = from_f<bf16>(v);
    }
}

// -- linear layers
//
// cuBLAS is column-major. A row-major (r, c) matrix with leading dimension c is, read column-major,
// its transpose (c, r) with the same leading dimension. So every row-major product X = A @ B is
// computed as the column-major product X^T = B^T A^T, and the operands' row-major storage already
// is the column-major transposes that product needs:
//
//   out (N, OC) = inp (N, IC) @ w^T        ->  out^T (OC, N) = w (OC, IC) . inp^T (IC, N)
//       w's storage read column-major is w^T (IC, OC), so op(A) = T;  inp's storage is inp^T (IC, N),
//       op(B) = N.   gemm(T, N, m=OC, n=N, k=IC, A=w lda=IC, B=inp ldb=IC, C=out ldc=OC)
//   dinp (N, IC) = dout (N, OC) @ w (OC, IC) ->  dinp^T (IC, N) = w^T (IC, OC) . dout^T (OC, N)
//       both storages already are those transposes.
//                                          gemm(N, N, m=IC, n=N, k=OC, A=w lda=IC, B=dout ldb=OC, C=dinp ldc=IC)
//   dw (OC, IC) += dout^T @ inp            ->  dw^T (IC, OC) = inp^T (IC, N) . dout (N, OC)
//       inp's storage is inp^T: op N; dout's storage is dout^T (OC, N): op T.
//                                          gemm(N, T, m=IC, n=OC, k=N, A=inp lda=IC, B=dout ldb=OC, C=dw ldc=IC, beta=1)
//
// The bf16 path goes through gemm.h (cuBLASLt, fused epilogues). Shapes it refuses (IC or OC not
// a multiple of 8, unaligned pointers) fall back to cuBLAS GemmEx with bf16 operands and an fp32
// result in scratch, followed by an epilogue kernel: slow, but every shape works.

static void gemm_fallback_note(struct cuda_ctx *c, const char *op, int N, int IC, int OC) {
    if (c->warned_gemm_fallback) return;
    c->warned_gemm_fallback = true;
    fprintf(stderr,
            "tptrain: note: bf16 %s N=%d IC=%d OC=%d is not supported by the fused cuBLASLt "
            "path (IC and OC must be multiples of 8, tensors 16-byte aligned); using the slower "
            "cuBLAS fallback for such products\n", op, N, IC, OC);
}

// out (C) += the column sums of x (N, C), bf16 (bf) or fp32: partials per COLSUM_ROWS rows in the
// context's scratch, added in chunk order.
void cuda_colsum_acc(struct cuda_ctx *c, float *out, const void *x, bool bf, int N, int C) {
    unsigned int nchunks = tpc_blocks((size_t)N, COLSUM_ROWS);
    float *part = (float *)ctx_scratch(c, (size_t)nchunks * C * sizeof(float)); // (nchunks, C)
    dim3 grid(nchunks, tpc_blocks((size_t)C, TPC_BLOCK));
    if (bf)
        colsum_partial_kernel<bf16><<<grid, TPC_BLOCK, 0, c->stream>>>(part, (const bf16 *)x, N, C);
    else
        colsum_partial_kernel<float><<<grid, TPC_BLOCK, 0, c->stream>>>(part, (const float *)x, N, C);
    CUDA_CHECK_LAUNCH("colsum_partial_kernel (dbias)");
    colsum_finish(c->stream, (int)nchunks, C, out, part);
    CUDA_CHECK_LAUNCH("colsum2_finish_kernel (dbias)");
}

// out (C) += the column sums of x (N, C) in the compute type, as a linear layer's bias gradient is
// summed: in bf16 by gemm.cu's column sums (gemm_bwd_weight's order, so the same bits as a bias
// gradient the product summed) where the shape suits them, else, and in fp32, cuda_colsum_acc.
void cuda_bias_colsum(struct cuda_ctx *c, float *out, const void *x, int N, int C) {
    if (is_bf16(c)) {
        int rc = gemm_colsum(c->gemm, out, x, N, C);
        if (rc == GEMM_OK) return;
        if (rc != GEMM_EBADARG) GEMM_DIE(c, rc, "gemm_colsum (a bias gradient)", N, C, C);
    }
    cuda_colsum_acc(c, out, x, is_bf16(c), N, C);
}

static void matmul_fwd_f32(struct cuda_ctx *c, float *out, float *pre_gelu, const float *inp,
                           const float *w, const float *bias, int N, int IC, int OC) {
    const float one = 1.0f, zero = 0.0f;
    float *dst = pre_gelu ? pre_gelu : out; // (N, OC)
    CUBLAS_CHECK(cublasSgemm(c->blas, CUBLAS_OP_T, CUBLAS_OP_N, OC, N, IC, &one, w, IC, inp, IC,
                             &zero, dst, OC));
    size_t n = (size_t)N * OC;
    if (bias) {
        add_bias_kernel<<<ew_blocks(n), TPC_BLOCK, 0, c->stream>>>(dst, bias, N, OC);
        CUDA_CHECK_LAUNCH("add_bias_kernel");
    }
    if (pre_gelu) {
        gelu_fwd_kernel<float, 1><<<ew_blocks(n), TPC_BLOCK, 0, c->stream>>>(out, pre_gelu, n);
        CUDA_CHECK_LAUNCH("gelu_fwd_kernel (matmul)");
    }
}

static void matmul_fwd_bf16(struct cuda_ctx *c, bf16 *out, bf16 *pre_gelu, const bf16 *inp,
                            const bf16 *w, const bf16 *bias, int N, int IC, int OC) {
    int rc = gemm_fwd(c->gemm, out, pre_gelu, inp, w, bias, N, IC, OC);
    if (rc == GEMM_OK) return;
    if (rc != GEMM_EBADARG) GEMM_DIE(c, rc, "gemm_fwd (matmul_fwd)", N, IC, OC);
    gemm_fallback_note(c, "matmul_fwd", N, IC, OC);
    const float one = 1.0f, zero = 0.0f;
    float *acc = (float *)ctx_scratch(c, (size_t)N * OC * sizeof(float)); // (N, OC)
    CUBLAS_CHECK(cublasGemmEx(c->blas, CUBLAS_OP_T, CUBLAS_OP_N, OC, N, IC, &one, w, CUDA_R_16BF,
                              IC, inp, CUDA_R_16BF, IC, &zero, acc, CUDA_R_32F, OC,
                              CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    gemm_fallback_fwd_epilogue_kernel<<<ew_blocks((size_t)N * OC), TPC_BLOCK, 0, c->stream>>>(
        out, pre_gelu, acc, bias, N, OC);
    CUDA_CHECK_LAUNCH("gemm_fallback_fwd_epilogue_kernel");
}

void cuda_matmul_fwd(void *ctx, void *out, void *pre_gelu, const void *inp, const void *w,
                     const void *bias, int N, int IC, int OC) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (N <= 0 || OC <= 0) return;
    if (is_bf16(c))
        matmul_fwd_bf16(c, (bf16 *)out, (bf16 *)pre_gelu, (const bf16 *)inp, (const bf16 *)w,
                        (const bf16 *)bias, N, IC, OC);
    else
        matmul_fwd_f32(c, (float *)out, (float *)pre_gelu, (const float *)inp, (const float *)w,
                       (const float *)bias, N, IC, OC);
}

static void matmul_bwd_f32(struct cuda_ctx *c, float *dinp, float *dinp_sum, float *dw, float *dbias,
                           const float *dout, const float *inp, const float *w,
                           const float *pre_gelu, int N, int IC, int OC) {
    const float one = 1.0f, zero = 0.0f;
    if (dinp) {
        CUBLAS_CHECK(cublasSgemm(c->blas, CUBLAS_OP_N, CUBLAS_OP_N, IC, N, OC, &one, w, IC, dout,
                                 OC, &zero, dinp, IC));
        if (pre_gelu) {
            size_t n = (size_t)N * IC;
            gelu_bwd_kernel<float, 1><<<ew_blocks(n), TPC_BLOCK, 0, c->stream>>>(dinp, pre_gelu,
                                                                                dinp, n);
            CUDA_CHECK_LAUNCH("gelu_bwd_kernel (matmul)");
        }
        if (dinp_sum) cuda_colsum_acc(c, dinp_sum, dinp, false, N, IC);
    }
    if (!dw) return;
    CUBLAS_CHECK(cublasSgemm(c->blas, CUBLAS_OP_N, CUBLAS_OP_T, IC, OC, N, &one, inp, IC, dout, OC,
                             &one, dw, IC));
    if (dbias) cuda_colsum_acc(c, dbias, dout, false, N, OC);
}

static void matmul_bwd_bf16(struct cuda_ctx *c, bf16 *dinp, float *dinp_sum, float *dw, float *dbias,
                            const bf16 *dout, const bf16 *inp, const bf16 *w,
                            const bf16 *pre_gelu, int N, int IC, int OC) {
    const float one = 1.0f, zero = 0.0f;
    if (dinp) {
        int rc = gemm_bwd_data(c->gemm, dinp, dout, w, pre_gelu, dinp_sum, N, IC, OC);
        if (rc == GEMM_EBADARG) {
            gemm_fallback_note(c, "matmul_bwd (input gradient)", N, IC, OC);
            float *acc = (float *)ctx_scratch(c, (size_t)N * IC * sizeof(float)); // (N, IC)
            CUBLAS_CHECK(cublasGemmEx(c->blas, CUBLAS_OP_N, CUBLAS_OP_N, IC, N, OC, &one, w,
                                      CUDA_R_16BF, IC, dout, CUDA_R_16BF, OC, &zero, acc,
                                      CUDA_R_32F, IC, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
            size_t n = (size_t)N * IC;
            gemm_fallback_bwd_epilogue_kernel<<<ew_blocks(n), TPC_BLOCK, 0, c->stream>>>(
                dinp, acc, pre_gelu, n);
            CUDA_CHECK_LAUNCH("gemm_fallback_bwd_epilogue_kernel");
            if (dinp_sum) cuda_colsum_acc(c, dinp_sum, dinp, true, N, IC);
        } else if (rc != GEMM_OK) {
            GEMM_DIE(c, rc, "gemm_bwd_data (matmul_bwd)", N, IC, OC);
        }
    }
    if (!dw) return;
    int rc = gemm_bwd_weight(c->gemm, dw, dbias, dout, inp, N, IC, OC);
    if (rc == GEMM_EBADARG) {
        gemm_fallback_note(c, "matmul_bwd (weight gradient)", N, IC, OC);
        CUBLAS_CHECK(cublasGemmEx(c->blas, CUBLAS_OP_N, CUBLAS_OP_T, IC, OC, N, &one, inp,
                                  CUDA_R_16BF, IC, dout, CUDA_R_16BF, OC, &one, dw, CUDA_R_32F,
                                  IC, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
        if (dbias) cuda_colsum_acc(c, dbias, dout, true, N, OC);
    } else if (rc != GEMM_OK) {
        GEMM_DIE(c, rc, "gemm_bwd_weight (matmul_bwd)", N, IC, OC);
    }
}

void cuda_matmul_bwd(void *ctx, void *dinp, float *dinp_sum, float *dw, float *dbias, const void *dout,
                     const void *inp, const void *w, const void *pre_gelu, int N, int IC,
                     int OC) {
    struct cuda_ctx *c = ctx_of(ctx);
    if (N <= 0 || OC <= 0 || IC <= 0) return;
    if (is_bf16(c))
        matmul_bwd_bf16(c, (bf16 *)dinp, dinp_sum, dw, dbias, (const bf16 *)dout, (const bf16 *)inp,
                        (const bf16 *)w, (const bf16 *)pre_gelu, N, IC, OC);
    else
        matmul_bwd_f32(c, (float *)dinp, dinp_sum, dw, dbias, (const float *)dout, (const float *)inp,
                       (const float *)w, (const float *)pre_gelu, N, IC, OC);
}
