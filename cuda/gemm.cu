// gemm.cu: bf16 linear-layer products through cuBLASLt with fused epilogues (see gemm.h).
//
// Layout. cuBLASLt is column-major; a row-major (r, c) matrix with leading dimension c is, read
// column-major, its transpose (c, r). Every row-major product X = A @ B is therefore computed as
// X^T = B^T A^T, whose operands are the row-major storages as they are:
//
//   fwd          out^T (OC, N)  = op_T(w: (IC, OC), ld IC) . inp^T (IC, N), ld IC
//                m = OC, n = N, k = IC. The bias runs along m (one value per output feature),
//                which is what cuBLASLt's bias epilogue broadcasts; pre_gelu is (OC, N), ld OC.
//   bwd_data     dinp^T (IC, N) = w^T (IC, OC), ld IC . dout^T (OC, N), ld OC
//                m = IC, n = N, k = OC; pre_gelu (the aux input of DGELU) is (IC, N), ld IC.
//   bwd_weight   dw^T (IC, OC)  = inp^T (IC, N), ld IC . op_T(dout^T: (OC, N), ld OC)
//                m = IC, n = OC, k = N; C = D = dw (fp32), beta = 1. dbias is a sum over k of
//                B's columns, computed by our column-sum kernels after the product.
//
// Plans. Where the elementwise work can live in the cuBLASLt epilogue or in a kernel of ours
// after a plain product (GELU, its derivative), both are candidates: each
// cuBLASLt algorithm of each plan is timed on the first call of a key and the fastest pair is
// cached. A plan whose epilogue would compute a different function is never offered (see
// GEMM_LT_GELU_IS_TANH). On the H200 at GPT-2 shapes the GELU and GELU-derivative epilogues won
// (they cost 8% and 25% over a plain product, our kernels more), while for the bias gradient a
// plain product plus our column sums beat cuBLASLt's BGRADB epilogue by about 7%, and are the
// only plan offered (the result must not depend on which plan a rank's timing picked).
// TPTRAIN_GEMM_SM90 makes gemm_sm90.cu's Hopper kernel an "own" entry of the GELU and GELU'
// products: always (1), or where timed faster than the fastest of those (auto); with
// TPTRAIN_GEMM_SM90_PLAIN=1 also of the forwards with the bias or no epilogue.
//
// Determinism. With a fixed algorithm and our own workspace, cuBLASLt's products are bitwise
// reproducible on one GPU and one stream. The one place partial sums could be combined in a
// data-dependent order is split-K: candidates are restricted to no split, or to split-K reduced
// in a separate pass from a workspace in fp32 (CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE; for fp32
// outputs also OUTPUT_TYPE, which is then fp32 too). The in-place scheme, which adds partials
// into the output itself (bf16 for two of the products), is excluded. Our own kernels reduce in
// a fixed order and use no atomics.
//
// Sections: constants and context, elementwise and reduction kernels, plans and descriptors,
// tuning, entry points.
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "colsum_finish.cuh"
#include "gemm.h"
#ifdef FA_HAVE_SM90
#include "gemm_sm90.h"
#endif

// ---- constants and context

// cuBLASLt's GELU epilogues compute the tanh approximation 0.5 x (1 + tanh(sqrt(2/pi) (x +
// 0.044715 x^3))) that GPT-2 uses; checked on the H200 against both GELU forms at exactly
// representable pre-activations (tests/test_gemm.c keeps checking it). Were a library to compute
// the erf form, setting this to 0 leaves only the plans that run GELU in our own kernels.
#define GEMM_LT_GELU_IS_TANH 1

#define GEMM_ALIGN 16 // bytes every operand pointer must be aligned to
#define GEMM_MAX_CANDIDATES 8 // heuristic results timed per plan (16 measured no faster)
#define GEMM_TIME_REPS 5 // timed runs per candidate (median taken), after one warm-up
#define GEMM_BLOCK 256
// Column sums: a block sums 256 columns (32 lanes x 8 bf16) over a chunk of rows, one warp per
// row phase. The chunking depends only on (N, OC), never on the device, so the order of the
// additions, and thus every bit of the result, is fixed by the shape.
#define CS_COLS 256
#define CS_PHASES 8
#define CS_TARGET_BLOCKS 528

enum gemm_product { GP_FWD, GP_BWD_DATA, GP_BWD_WEIGHT };

// What the caller asked for (part of the cache key).
// GE_DGELU_DSUM: the GELU' input gradient and its column sums (gemm_bwd_data's dsum), one key, so
// that the own kernel, which sums in its epilogue, is timed against cuBLASLt plus our column sums.
enum gemm_epi { GE_NONE, GE_BIAS, GE_GELU, GE_GELU_BIAS, GE_DGELU, GE_DBIAS, GE_DGELU_DSUM };

struct gemm_key {
    int product; // enum gemm_product
    int N, IC, OC;
    int epi; // enum gemm_epi
    int sms; // multiprocessors targeted, 0 = all (gemm_set_sm_target)
};

// A tuned way to compute one key: descriptors, the algorithm, and whether the elementwise part
// runs in a kernel of ours after the product (split) or in cuBLASLt's epilogue; or (own) the whole
// product in gemm_sm90.cu's Hopper kernel (TPTRAIN_GEMM_SM90=1, or =auto where timed faster than
// the best cuBLASLt candidate; no descriptors then).
struct gemm_entry {
    struct gemm_key key;
    int split;
    bool own;
    cublasLtMatmulDesc_t desc;
    cublasLtMatrixLayout_t la, lb, ld; // A, B, and C = D (same layout)
    cublasLtMatmulAlgo_t algo;
    float ms; // median time measured when tuned (0 if untimed)
};

// Operands of one call, already in cuBLASLt's A/B order.
struct gemm_call {
    void *out;         // D (and C for the weight gradient)
    void *pre_gelu;    // fwd: written (aux output); bwd_data: read (aux input)
    const void *a, *b; // cuBLASLt's A and B
    const void *bias;  // fwd bias (OC) bf16
    float *dbias;      // bwd_weight: (OC) fp32 += dout's column sums; bwd_data (GE_DGELU_DSUM): (IC) += dinp's
};

struct gemm_ctx {
    cudaStream_t stream;
    cublasLtHandle_t lt;
    void *workspace; // (workspace_bytes) for cuBLASLt
    size_t workspace_bytes;
    float *scratch; // column-sum partials, tuning dbias
    size_t scratch_bytes;
    cudaEvent_t ev[GEMM_TIME_REPS + 1];
    struct gemm_entry *cache; // (ncache) tuned keys, linear search: a model has a few dozen
    int ncache, cache_cap;
    int sms; // the target new keys get (gemm_set_sm_target)
    int sm90_gelu;        // on a compute capability 9.0 device, whether gemm_sm90.cu's kernels take the GELU
                          // and GELU' epilogue products: 0 never, 1 always (TPTRAIN_GEMM_SM90=1), 2 where
                          // timed faster than cuBLASLt (auto)
    bool sm90_plain;      // and, the same way, the forwards with the bias or nothing (TPTRAIN_GEMM_SM90_PLAIN=1)
    bool untimed;         // TPTRAIN_GEMM_TUNE=0: cuBLASLt's first heuristic answer, the same in every process
    bool last_own;        // whether the last execute() ran an own entry
    const char *last_fwd; // what computed the last gemm_fwd (gemm_last_fwd_path)
    const char *last_bwd_data; // and the last gemm_bwd_data
    char err[320];
};

static const char *product_name(int p) {
    return p == GP_FWD ? "gemm_fwd" : p == GP_BWD_DATA ? "gemm_bwd_data" : "gemm_bwd_weight";
}

static const char *epi_name(int e) {
    static const char *names[] = {"none", "bias", "gelu", "gelu+bias", "dgelu", "dbias", "dgelu+dsum"};
    return names[e];
}

static void set_err(struct gemm_ctx *g, const struct gemm_key *k, const char *fmt, ...) {
    int n =
        snprintf(g->err, sizeof g->err, "%s(N=%d, IC=%d, OC=%d, %s): ", product_name(k->product),
                 k->N, k->IC, k->OC, epi_name(k->epi));
    if (n < 0 || (size_t)n >= sizeof g->err) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g->err + n, sizeof g->err - (size_t)n, fmt, ap);
    va_end(ap);
}

// ---- elementwise and reduction kernels

#define GELU_S 0.7978845608028654f // sqrt(2 / pi)
#define GELU_C 0.044715f

__device__ __forceinline__ static float gelu_tanh(float x) {
    float u = GELU_S * (x + GELU_C * x * x * x);
    return 0.5f * x * (1.0f + tanhf(u));
}

__device__ __forceinline__ static float gelu_tanh_grad(float x) {
    float x2 = x * x;
    float t = tanhf(GELU_S * x * (1.0f + GELU_C * x2));
    return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * GELU_S * (1.0f + 3.0f * GELU_C * x2);
}

union bf16x8 {
    uint4 v;
    __nv_bfloat162 h[4];
};

// out = gelu(pre); n8 groups of 8 elements (every row length is a multiple of 8).
__global__ static void gelu_fwd_kernel(__nv_bfloat16 *out, const __nv_bfloat16 *pre, size_t n8) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n8;
         i += (size_t)gridDim.x * blockDim.x) {
        union bf16x8 p, o;
        p.v = ((const uint4 *)pre)[i];
        for (int j = 0; j < 4; j++) {
            float2 f = __bfloat1622float2(p.h[j]);
            o.h[j] = __floats2bfloat162_rn(gelu_tanh(f.x), gelu_tanh(f.y));
        }
        ((uint4 *)out)[i] = o.v;
    }
}

// d *= gelu'(pre), in place; n8 groups of 8 elements.
__global__ static void dgelu_kernel(__nv_bfloat16 *d, const __nv_bfloat16 *pre, size_t n8) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n8;
         i += (size_t)gridDim.x * blockDim.x) {
        union bf16x8 p, x;
        p.v = ((const uint4 *)pre)[i];
        x.v = ((const uint4 *)d)[i];
        for (int j = 0; j < 4; j++) {
            float2 fp = __bfloat1622float2(p.h[j]);
            float2 fx = __bfloat1622float2(x.h[j]);
            x.h[j] =
                __floats2bfloat162_rn(fx.x * gelu_tanh_grad(fp.x), fx.y * gelu_tanh_grad(fp.y));
        }
        ((uint4 *)d)[i] = x.v;
    }
}

// partial[c, col] = sum of x[r, col] over the rows r of chunk c, in a fixed order: each warp
// (row phase) sums rows phase, phase + 8, ... of the chunk, then the 8 phase sums are added in
// phase order. Grid: (nchunks, ceil(OC / 256)).
__global__ static void colsum_partial_kernel(float *partial, const __nv_bfloat16 *x, int N, int OC,
                                             int rows_per_chunk) {
    __shared__ float s[CS_PHASES][CS_COLS];
    int lane = threadIdx.x & 31, phase = threadIdx.x >> 5;
    size_t col0 = (size_t)blockIdx.y * CS_COLS + (size_t)lane * 8;
    int r0 = blockIdx.x * rows_per_chunk;
    int r1 = min(N, r0 + rows_per_chunk);
    float acc[8];
    for (int j = 0; j < 8; j++) acc[j] = 0.0f;
    if (col0 < (size_t)OC) {
        for (int r = r0 + phase; r < r1; r += CS_PHASES) {
            union bf16x8 v;
            v.v = *(const uint4 *)(x + (size_t)r * OC + col0);
            for (int j = 0; j < 4; j++) {
                float2 f = __bfloat1622float2(v.h[j]);
                acc[2 * j] += f.x;
                acc[2 * j + 1] += f.y;
            }
        }
    }
    // column lane * 8 + j is stored at j * 32 + lane: conflict-free on both sides
    for (int j = 0; j < 8; j++) s[phase][j * 32 + lane] = acc[j];
    __syncthreads();
    int t = threadIdx.x;
    size_t col = (size_t)blockIdx.y * CS_COLS + t;
    float sum = 0.0f;
    for (int p = 0; p < CS_PHASES; p++) sum += s[p][(t & 7) * 32 + (t >> 3)];
    if (col < (size_t)OC) partial[(size_t)blockIdx.x * OC + col] = sum;
}

static unsigned int grid_for(size_t n, unsigned int per_block) {
    size_t b = (n + per_block - 1) / per_block;
    if (b == 0) b = 1;
    if (b > 65535u * 16u) b = 65535u * 16u; // grid-stride loops cover the rest
    return (unsigned int)b;
}

// Row chunking of the column sums for (N, OC): rows per chunk (a multiple of 8) and chunk count.
static void colsum_chunks(int N, int OC, int *rows_per_chunk, int *nchunks) {
    int col_blocks = (OC + CS_COLS - 1) / CS_COLS;
    int target = CS_TARGET_BLOCKS / col_blocks;
    if (target < 1) target = 1;
    int rows = (N + target - 1) / target;
    rows = (rows + 7) / 8 * 8;
    if (rows < 8) rows = 8;
    *rows_per_chunk = rows;
    *nchunks = (N + rows - 1) / rows;
}

// out (OC) += the column sums of x (N, OC) bf16: per-chunk partials into scratch (which must hold
// nchunks * OC floats), then added in chunk order. The order depends on (N, OC) only.
static void colsum_run(struct gemm_ctx *g, float *out, const __nv_bfloat16 *x, int N, int OC) {
    int rows, nchunks;
    colsum_chunks(N, OC, &rows, &nchunks);
    float *partial = g->scratch; // (nchunks, OC)
    dim3 grid((unsigned)nchunks, (unsigned)((OC + CS_COLS - 1) / CS_COLS));
    colsum_partial_kernel<<<grid, CS_COLS, 0, g->stream>>>(partial, x, N, OC, rows);
    // out += the chunks' sums, added in a fixed order 32 loads in flight per column
    colsum_finish(g->stream, nchunks, OC, out, partial);
}

// Scratch floats a key needs: column-sum partials (nchunks rows of the summed matrix's columns, or
// for the own GELU' kernel one row per 32 of N) and after them a sum to accumulate into while
// tuning (one row).
static size_t scratch_floats(const struct gemm_key *k) {
    if (k->epi != GE_DBIAS && k->epi != GE_DGELU_DSUM) return 0;
    int cols = k->epi == GE_DBIAS ? k->OC : k->IC, rows, nchunks;
    colsum_chunks(k->N, cols, &rows, &nchunks);
    size_t parts = (size_t)nchunks;
    if (k->epi == GE_DGELU_DSUM && (size_t)k->N / 32 + 1 > parts) parts = (size_t)k->N / 32 + 1;
    return (parts + 1) * (size_t)cols;
}

static int ensure_scratch(struct gemm_ctx *g, const struct gemm_key *k) {
    size_t bytes = scratch_floats(k) * sizeof(float);
    if (bytes <= g->scratch_bytes) return GEMM_OK;
    // kernels still queued may read the old buffer
    cudaError_t e = cudaStreamSynchronize(g->stream);
    if (e == cudaSuccess && g->scratch) e = cudaFree(g->scratch);
    g->scratch = NULL;
    g->scratch_bytes = 0;
    if (e == cudaSuccess) e = cudaMalloc((void **)&g->scratch, bytes);
    if (e != cudaSuccess) {
        set_err(g, k, "scratch of %zu bytes: %s", bytes, cudaGetErrorString(e));
        g->scratch = NULL;
        return GEMM_ECUBLAS;
    }
    g->scratch_bytes = bytes;
    return GEMM_OK;
}

// ---- plans and descriptors

// Plans a key can be computed by: 0 = everything in cuBLASLt's epilogue, 1 = product in
// cuBLASLt and the elementwise part in our kernels. Returns how many, in *first the first one.
static int plan_range(const struct gemm_key *k, int *first) {
    switch (k->epi) {
    case GE_GELU:
    case GE_GELU_BIAS:
    case GE_DGELU:
    case GE_DGELU_DSUM:
        *first = GEMM_LT_GELU_IS_TANH ? 0 : 1;
        return GEMM_LT_GELU_IS_TANH ? 2 : 1;
    case GE_DBIAS:
        // Only our column sums (plan 1), never cuBLASLt's BGRADB epilogue: a row-parallel bias
        // gradient must be bitwise equal on every TP rank (the bias is replicated), and each rank
        // tunes on its own, so the method may not depend on timing. (They also measured faster.)
        *first = 1;
        return 1;
    default:
        *first = 0;
        return 1;
    }
}

static cublasLtEpilogue_t plan_epilogue(const struct gemm_key *k, int split) {
    switch (k->epi) {
    case GE_BIAS:
        return CUBLASLT_EPILOGUE_BIAS;
    case GE_GELU:
        return split ? CUBLASLT_EPILOGUE_DEFAULT : CUBLASLT_EPILOGUE_GELU_AUX;
    case GE_GELU_BIAS:
        return split ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_GELU_AUX_BIAS;
    case GE_DGELU:
    case GE_DGELU_DSUM:
        return split ? CUBLASLT_EPILOGUE_DEFAULT : CUBLASLT_EPILOGUE_DGELU;
    default:
        return CUBLASLT_EPILOGUE_DEFAULT;
    }
}

static void entry_release(struct gemm_entry *e) {
    if (e->desc) cublasLtMatmulDescDestroy(e->desc);
    if (e->la) cublasLtMatrixLayoutDestroy(e->la);
    if (e->lb) cublasLtMatrixLayoutDestroy(e->lb);
    if (e->ld) cublasLtMatrixLayoutDestroy(e->ld);
    e->desc = NULL;
    e->la = e->lb = e->ld = NULL;
}

// Descriptors of (key, split), per the mapping at the top of this file. Pointers in the
// descriptor (bias, aux) are set per call; for the heuristic they hold a value aligned to exactly
// GEMM_ALIGN bytes, so a chosen algorithm never relies on more alignment than gemm.h promises.
static cublasStatus_t entry_init(struct gemm_entry *e, const struct gemm_key *k, int split) {
    memset(e, 0, sizeof *e);
    e->key = *k;
    e->split = split;
    uint64_t N = (uint64_t)k->N, IC = (uint64_t)k->IC, OC = (uint64_t)k->OC;
    cublasOperation_t ta = CUBLAS_OP_N, tb = CUBLAS_OP_N;
    cudaDataType_t dtype = CUDA_R_16BF;
    cublasStatus_t s;
    switch (k->product) {
    case GP_FWD:
        ta = CUBLAS_OP_T;
        s = cublasLtMatrixLayoutCreate(&e->la, CUDA_R_16BF, IC, OC, (int64_t)IC);
        if (s == CUBLAS_STATUS_SUCCESS)
            s = cublasLtMatrixLayoutCreate(&e->lb, CUDA_R_16BF, IC, N, (int64_t)IC);
        if (s == CUBLAS_STATUS_SUCCESS)
            s = cublasLtMatrixLayoutCreate(&e->ld, dtype, OC, N, (int64_t)OC);
        break;
    case GP_BWD_DATA:
        s = cublasLtMatrixLayoutCreate(&e->la, CUDA_R_16BF, IC, OC, (int64_t)IC);
        if (s == CUBLAS_STATUS_SUCCESS)
            s = cublasLtMatrixLayoutCreate(&e->lb, CUDA_R_16BF, OC, N, (int64_t)OC);
        if (s == CUBLAS_STATUS_SUCCESS)
            s = cublasLtMatrixLayoutCreate(&e->ld, dtype, IC, N, (int64_t)IC);
        break;
    default: // GP_BWD_WEIGHT
        tb = CUBLAS_OP_T;
        dtype = CUDA_R_32F;
        s = cublasLtMatrixLayoutCreate(&e->la, CUDA_R_16BF, IC, N, (int64_t)IC);
        if (s == CUBLAS_STATUS_SUCCESS)
            s = cublasLtMatrixLayoutCreate(&e->lb, CUDA_R_16BF, OC, N, (int64_t)OC);
        if (s == CUBLAS_STATUS_SUCCESS)
            s = cublasLtMatrixLayoutCreate(&e->ld, dtype, IC, OC, (int64_t)IC);
        break;
    }
    if (s == CUBLAS_STATUS_SUCCESS)
        s = cublasLtMatmulDescCreate(&e->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F);
    if (s == CUBLAS_STATUS_SUCCESS)
        s = cublasLtMatmulDescSetAttribute(e->desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta);
    if (s == CUBLAS_STATUS_SUCCESS)
        s = cublasLtMatmulDescSetAttribute(e->desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb);
    cublasLtEpilogue_t epi = plan_epilogue(k, split);
    if (s == CUBLAS_STATUS_SUCCESS)
        s = cublasLtMatmulDescSetAttribute(e->desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi,
                                           sizeof epi);
    void *placeholder = (void *)(uintptr_t)GEMM_ALIGN;
    bool has_bias = epi == CUBLASLT_EPILOGUE_BIAS || epi == CUBLASLT_EPILOGUE_GELU_AUX_BIAS;
    bool has_aux = epi == CUBLASLT_EPILOGUE_GELU_AUX || epi == CUBLASLT_EPILOGUE_GELU_AUX_BIAS ||
                   epi == CUBLASLT_EPILOGUE_DGELU;
    if (s == CUBLAS_STATUS_SUCCESS && has_bias)
        s = cublasLtMatmulDescSetAttribute(e->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &placeholder,
                                           sizeof placeholder);
    if (s == CUBLAS_STATUS_SUCCESS && has_aux) {
        int64_t aux_ld = k->product == GP_FWD ? (int64_t)OC : (int64_t)IC; // rows of D
        s = cublasLtMatmulDescSetAttribute(e->desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER,
                                           &placeholder, sizeof placeholder);
        if (s == CUBLAS_STATUS_SUCCESS)
            s = cublasLtMatmulDescSetAttribute(e->desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD,
                                               &aux_ld, sizeof aux_ld);
    }
    if (s == CUBLAS_STATUS_SUCCESS && k->sms > 0) {
        int32_t sms = k->sms;
        s = cublasLtMatmulDescSetAttribute(e->desc, CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET, &sms,
                                           sizeof sms);
    }
    if (s != CUBLAS_STATUS_SUCCESS) entry_release(e);
    return s;
}

// ---- running a plan

// One call of (entry, algo) on the operands: the product, then our part of the epilogue.
static cublasStatus_t entry_run(struct gemm_ctx *g, struct gemm_entry *e,
                                const cublasLtMatmulAlgo_t *algo, const struct gemm_call *c) {
    const struct gemm_key *k = &e->key;
#ifdef FA_HAVE_SM90
    if (e->own) { // the call's operands back in row-major order (gemm_call holds cuBLASLt's)
        const bool gelu = k->epi == GE_GELU || k->epi == GE_GELU_BIAS, dsum = k->epi == GE_DGELU_DSUM;
        const void *bias = k->epi == GE_BIAS || k->epi == GE_GELU_BIAS ? c->bias : NULL;
        int rows = 0;
        int rc = k->product != GP_FWD
                     ? gemm_sm90_bwd_dgelu(g->stream, c->out, c->b, c->a, c->pre_gelu, dsum ? g->scratch : NULL, &rows,
                                           k->N, k->IC, k->OC)
                 : gelu ? gemm_sm90_fwd_gelu(g->stream, c->out, c->pre_gelu, c->b, c->a, bias, k->N, k->IC, k->OC)
                        : gemm_sm90_fwd(g->stream, c->out, c->b, c->a, bias, k->N, k->IC, k->OC);
        if (rc == 0 && dsum) { // the kernel's partial rows added in order, or (a kind that does not sum) ours
            if (rows > 0)
                colsum_finish(g->stream, rows, k->IC, c->dbias, g->scratch);
            else
                colsum_run(g, c->dbias, (const __nv_bfloat16 *)c->out, k->N, k->IC);
            if (cudaGetLastError() != cudaSuccess) return CUBLAS_STATUS_EXECUTION_FAILED;
        }
        return rc == 0 ? CUBLAS_STATUS_SUCCESS : rc == 1 ? CUBLAS_STATUS_NOT_SUPPORTED : CUBLAS_STATUS_EXECUTION_FAILED;
    }
#endif
    cublasLtEpilogue_t epi = plan_epilogue(k, e->split);
    cublasStatus_t s = CUBLAS_STATUS_SUCCESS;
    if (epi == CUBLASLT_EPILOGUE_BIAS || epi == CUBLASLT_EPILOGUE_GELU_AUX_BIAS)
        s = cublasLtMatmulDescSetAttribute(e->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &c->bias,
                                           sizeof c->bias);
    if (s == CUBLAS_STATUS_SUCCESS &&
        (epi == CUBLASLT_EPILOGUE_GELU_AUX || epi == CUBLASLT_EPILOGUE_GELU_AUX_BIAS ||
         epi == CUBLASLT_EPILOGUE_DGELU))
        s = cublasLtMatmulDescSetAttribute(e->desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER,
                                           &c->pre_gelu, sizeof c->pre_gelu);
    if (s != CUBLAS_STATUS_SUCCESS) return s;

    // a split GELU forward writes the product to pre_gelu and GELU of it to out
    bool split_gelu_fwd = e->split && (k->epi == GE_GELU || k->epi == GE_GELU_BIAS);
    void *d = split_gelu_fwd ? c->pre_gelu : c->out;
    float alpha = 1.0f, beta = k->product == GP_BWD_WEIGHT ? 1.0f : 0.0f;
    s = cublasLtMatmul(g->lt, e->desc, &alpha, c->a, e->la, c->b, e->lb, &beta, d, e->ld, d, e->ld,
                       algo, g->workspace, g->workspace_bytes, g->stream);
    if (s != CUBLAS_STATUS_SUCCESS) return s;

    size_t n8;
    switch (k->epi) {
    case GE_GELU:
    case GE_GELU_BIAS:
        if (!e->split) break;
        n8 = (size_t)k->N * (size_t)k->OC / 8;
        gelu_fwd_kernel<<<grid_for(n8, GEMM_BLOCK), GEMM_BLOCK, 0, g->stream>>>(
            (__nv_bfloat16 *)c->out, (const __nv_bfloat16 *)c->pre_gelu, n8);
        break;
    case GE_DGELU:
    case GE_DGELU_DSUM:
        if (e->split) {
            n8 = (size_t)k->N * (size_t)k->IC / 8;
            dgelu_kernel<<<grid_for(n8, GEMM_BLOCK), GEMM_BLOCK, 0, g->stream>>>(
                (__nv_bfloat16 *)c->out, (const __nv_bfloat16 *)c->pre_gelu, n8);
        }
        if (k->epi == GE_DGELU_DSUM) colsum_run(g, c->dbias, (const __nv_bfloat16 *)c->out, k->N, k->IC);
        break;
    case GE_DBIAS:
        colsum_run(g, c->dbias, (const __nv_bfloat16 *)c->b, k->N, k->OC);
        break;
    default:
        break;
    }
    if (cudaGetLastError() != cudaSuccess) return CUBLAS_STATUS_EXECUTION_FAILED;
    return CUBLAS_STATUS_SUCCESS;
}

// ---- tuning

// Whether a heuristic candidate combines split-K partials at full precision in a fixed order: no
// split, or a separate reduction pass over a workspace in fp32. Judged by the scheme alone, since
// some candidates report a split count of -1 (chosen at run time) with a scheme.
static bool algo_acceptable(const cublasLtMatmulAlgo_t *algo, bool fp32_out) {
    uint32_t scheme = CUBLASLT_REDUCTION_SCHEME_NONE;
    size_t w = 0;
    if (cublasLtMatmulAlgoConfigGetAttribute(algo, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, &scheme,
                                             sizeof scheme, &w) != CUBLAS_STATUS_SUCCESS)
        return false;
    return scheme == CUBLASLT_REDUCTION_SCHEME_NONE ||
           scheme == CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE ||
           (fp32_out && scheme == CUBLASLT_REDUCTION_SCHEME_OUTPUT_TYPE);
}

static uint32_t reduction_mask(bool fp32_out) {
    return CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE |
           (fp32_out ? CUBLASLT_REDUCTION_SCHEME_OUTPUT_TYPE : 0);
}

static int float_cmp(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

// Median time of GEMM_TIME_REPS runs after one warm-up; negative if the candidate fails.
static float time_candidate(struct gemm_ctx *g, struct gemm_entry *e,
                            const cublasLtMatmulAlgo_t *algo, const struct gemm_call *c) {
    if (entry_run(g, e, algo, c) != CUBLAS_STATUS_SUCCESS) return -1.0f;
    if (cudaEventRecord(g->ev[0], g->stream) != cudaSuccess) return -1.0f;
    for (int r = 0; r < GEMM_TIME_REPS; r++) {
        if (entry_run(g, e, algo, c) != CUBLAS_STATUS_SUCCESS) return -1.0f;
        if (cudaEventRecord(g->ev[r + 1], g->stream) != cudaSuccess) return -1.0f;
    }
    if (cudaEventSynchronize(g->ev[GEMM_TIME_REPS]) != cudaSuccess) return -1.0f;
    float t[GEMM_TIME_REPS];
    for (int r = 0; r < GEMM_TIME_REPS; r++)
        if (cudaEventElapsedTime(&t[r], g->ev[r], g->ev[r + 1]) != cudaSuccess) return -1.0f;
    qsort(t, GEMM_TIME_REPS, sizeof t[0], float_cmp);
    return t[GEMM_TIME_REPS / 2];
}

// Finds the fastest (plan, algorithm) for the key of *c and fills *best. With timing off (no
// room to tune the weight gradient on a copy) the heuristic's first candidate of the first plan
// is taken untimed.
static int tune(struct gemm_ctx *g, const struct gemm_key *k, const struct gemm_call *c,
                bool timing, struct gemm_entry *best) {
    bool fp32_out = k->product == GP_BWD_WEIGHT;
    // two preferences: with the reduction-scheme mask, and without (a fallback, see below)
    cublasLtMatmulPreference_t pref = NULL, pref_open = NULL;
    cublasStatus_t s = cublasLtMatmulPreferenceCreate(&pref);
    if (s == CUBLAS_STATUS_SUCCESS) s = cublasLtMatmulPreferenceCreate(&pref_open);
    uint64_t ws = g->workspace_bytes;
    uint32_t align = GEMM_ALIGN, mask = reduction_mask(fp32_out);
    const cublasLtMatmulPreferenceAttributes_t aligns[4] = {
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
    cublasLtMatmulPreference_t both[2] = {pref, pref_open};
    for (int p = 0; p < 2 && s == CUBLAS_STATUS_SUCCESS; p++) {
        s = cublasLtMatmulPreferenceSetAttribute(both[p], CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                 &ws, sizeof ws);
        for (int i = 0; i < 4 && s == CUBLAS_STATUS_SUCCESS; i++)
            s = cublasLtMatmulPreferenceSetAttribute(both[p], aligns[i], &align, sizeof align);
    }
    if (s == CUBLAS_STATUS_SUCCESS)
        s = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK,
                                                 &mask, sizeof mask);
    if (s != CUBLAS_STATUS_SUCCESS) {
        if (pref) cublasLtMatmulPreferenceDestroy(pref);
        if (pref_open) cublasLtMatmulPreferenceDestroy(pref_open);
        set_err(g, k, "cublasLtMatmulPreference: %s", cublasLtGetStatusName(s));
        return GEMM_ECUBLAS;
    }

    // TPTRAIN_GEMM_SM90: the GELU and GELU' products in gemm_sm90.cu's Hopper kernel where it takes
    // the shape, always (1: chosen untimed, no cuBLASLt candidate tried) or where it is timed faster
    // than the fastest cuBLASLt candidate (auto, after the loop below)
    bool own_key = g->sm90_gelu && k->sms == 0 &&
                   (k->epi == GE_GELU || k->epi == GE_GELU_BIAS || k->epi == GE_DGELU || k->epi == GE_DGELU_DSUM ||
                    (g->sm90_plain && k->product == GP_FWD && (k->epi == GE_NONE || k->epi == GE_BIAS)));
    if (own_key && g->sm90_gelu == 1) {
        memset(best, 0, sizeof *best);
        best->key = *k;
        best->own = true;
        cublasStatus_t r = entry_run(g, best, &best->algo, c);
        if (r != CUBLAS_STATUS_NOT_SUPPORTED) { // else a shape it does not take: cuBLASLt's, below
            cublasLtMatmulPreferenceDestroy(pref);
            cublasLtMatmulPreferenceDestroy(pref_open);
            if (r == CUBLAS_STATUS_SUCCESS) return GEMM_OK;
            (void)cudaGetLastError();
            set_err(g, k, "the sm_90a kernel (epilogue %s) failed to launch", epi_name(k->epi));
            return GEMM_ECUBLAS;
        }
    }

    int first, nplans = plan_range(k, &first);
    float best_ms = INFINITY;
    bool found = false;
    cublasStatus_t last = CUBLAS_STATUS_NOT_SUPPORTED;
    for (int split = first; split < first + nplans && !(found && !timing); split++) {
        struct gemm_entry e;
        s = entry_init(&e, k, split);
        if (s != CUBLAS_STATUS_SUCCESS) {
            last = s;
            continue;
        }
        cublasLtMatmulHeuristicResult_t res[GEMM_MAX_CANDIDATES];
        int nres = 0;
        s = cublasLtMatmulAlgoGetHeuristic(g->lt, e.desc, e.la, e.lb, e.ld, e.ld, pref,
                                           GEMM_MAX_CANDIDATES, res, &nres);
        if (s != CUBLAS_STATUS_SUCCESS || nres == 0) {
            // the mask is a filter, not a requirement: without it, algo_acceptable still applies
            s = cublasLtMatmulAlgoGetHeuristic(g->lt, e.desc, e.la, e.lb, e.ld, e.ld, pref_open,
                                               GEMM_MAX_CANDIDATES, res, &nres);
            if (s != CUBLAS_STATUS_SUCCESS) nres = 0, last = s;
        }
        bool kept = false;
        for (int i = 0; i < nres; i++) {
            if (res[i].state != CUBLAS_STATUS_SUCCESS ||
                res[i].workspaceSize > g->workspace_bytes ||
                !algo_acceptable(&res[i].algo, fp32_out))
                continue;
            float ms = 0.0f;
            if (timing) {
                ms = time_candidate(g, &e, &res[i].algo, c);
                if (ms < 0.0f) {
                    cudaGetLastError(); // a refused candidate is not an error of the call
                    continue;
                }
            }
            if (ms < best_ms || !found) {
                if (found && best->desc != e.desc) entry_release(best);
                *best = e;
                best->algo = res[i].algo;
                best->ms = ms;
                best_ms = ms;
                found = kept = true;
            }
            if (!timing) break;
        }
        if (!kept) entry_release(&e);
    }
    cublasLtMatmulPreferenceDestroy(pref);
    cublasLtMatmulPreferenceDestroy(pref_open);
    if (!found) {
        set_err(g, k, "no usable cuBLASLt algorithm (%s)", cublasLtGetStatusName(last));
        return GEMM_ECUBLAS;
    }
    if (own_key && g->sm90_gelu == 2 && timing) {
        struct gemm_entry own = *best; // shares best's descriptors, which an own run does not touch
        own.own = true;
        float ms = time_candidate(g, &own, &own.algo, c);
        if (ms < 0.0f) cudaGetLastError(); // a shape the kernel does not take
        else if (ms < best_ms) best->own = true, best->ms = ms;
    }
    return GEMM_OK;
}

// ---- the process's choices
//
// The first context of a process to tune a key records its choice (plan and algorithm) here, and
// every later context of the process on the same device and workspace size takes it untimed: two
// backends in one process then compute every product with the same algorithm, so their results
// agree bit for bit (timing alone could pick differently). Processes still choose on their own.
// Backends are created and used from one host thread, as tptrain does; no lock.

struct gemm_choice {
    struct gemm_key key;
    int device;
    size_t workspace_bytes;
    int split;
    bool own;
    cublasLtMatmulAlgo_t algo;
    float ms;
};

static struct gemm_choice *g_choices;
static int g_nchoices, g_choices_cap;

static bool key_equal(const struct gemm_key *a, const struct gemm_key *b) {
    return a->product == b->product && a->N == b->N && a->IC == b->IC && a->OC == b->OC &&
           a->epi == b->epi && a->sms == b->sms;
}

static const struct gemm_choice *choice_find(const struct gemm_key *k, int device, size_t ws) {
    for (int i = 0; i < g_nchoices; i++)
        if (key_equal(&g_choices[i].key, k) && g_choices[i].device == device &&
            g_choices[i].workspace_bytes == ws)
            return &g_choices[i];
    return NULL;
}

// Records e's choice; a full table (out of host memory) only loses the sharing, not correctness.
static void choice_record(const struct gemm_entry *e, int device, size_t ws) {
    if (g_nchoices == g_choices_cap) {
        int cap = g_choices_cap ? 2 * g_choices_cap : 64;
        struct gemm_choice *p = (struct gemm_choice *)realloc(g_choices, (size_t)cap * sizeof *p);
        if (!p) return;
        g_choices = p;
        g_choices_cap = cap;
    }
    struct gemm_choice *c = &g_choices[g_nchoices++];
    c->key = e->key;
    c->device = device;
    c->workspace_bytes = ws;
    c->split = e->split;
    c->own = e->own;
    c->algo = e->algo;
    c->ms = e->ms;
}

// The cached entry for the key, tuning it first if new. For the weight gradient, tuning runs on
// a copy of dw (and a scratch dbias), so the caller's gradients are accumulated exactly once.
static int lookup(struct gemm_ctx *g, const struct gemm_key *k, const struct gemm_call *c,
                  struct gemm_entry **out) {
    for (int i = 0; i < g->ncache; i++) {
        if (key_equal(&g->cache[i].key, k)) {
            *out = &g->cache[i];
            return GEMM_OK;
        }
    }
    if (g->ncache == g->cache_cap) {
        int cap = g->cache_cap ? 2 * g->cache_cap : 32;
        struct gemm_entry *p = (struct gemm_entry *)realloc(g->cache, (size_t)cap * sizeof *p);
        if (!p) {
            set_err(g, k, "out of host memory for the algorithm cache");
            return GEMM_ECUBLAS;
        }
        g->cache = p;
        g->cache_cap = cap;
    }

    int device = 0;
    if (cudaGetDevice(&device) != cudaSuccess) cudaGetLastError();
    const struct gemm_choice *prior = choice_find(k, device, g->workspace_bytes);
    if (prior) { // another context of this process chose already: take its choice
        struct gemm_entry e;
        cublasStatus_t s = entry_init(&e, k, prior->split);
        if (s != CUBLAS_STATUS_SUCCESS) {
            set_err(g, k, "cublasLt descriptors: %s", cublasLtGetStatusName(s));
            return GEMM_ECUBLAS;
        }
        e.algo = prior->algo;
        e.own = prior->own;
        e.ms = prior->ms;
        g->cache[g->ncache] = e;
        *out = &g->cache[g->ncache++];
        return GEMM_OK;
    }

    struct gemm_call tc = *c;
    bool timing = !g->untimed;
    void *dw_copy = NULL;
    if (timing && k->product == GP_BWD_WEIGHT) {
        size_t bytes = (size_t)k->IC * (size_t)k->OC * sizeof(float);
        if (cudaMalloc(&dw_copy, bytes) != cudaSuccess ||
            cudaMemcpyAsync(dw_copy, c->out, bytes, cudaMemcpyDeviceToDevice, g->stream) !=
                cudaSuccess) {
            cudaGetLastError();
            if (dw_copy) cudaFree(dw_copy);
            dw_copy = NULL;
            timing = false;
        } else {
            tc.out = dw_copy;
            if (c->dbias) tc.dbias = g->scratch + (scratch_floats(k) - (size_t)k->OC);
        }
    }
    if (k->epi == GE_DGELU_DSUM) // the output is overwritten, but the sum accumulates: tune into scratch
        tc.dbias = g->scratch + (scratch_floats(k) - (size_t)k->IC);
    struct gemm_entry e;
    int rc = tune(g, k, &tc, timing, &e);
    if (dw_copy) {
        cudaStreamSynchronize(g->stream);
        cudaFree(dw_copy);
    }
    if (rc != GEMM_OK) return rc;
    choice_record(&e, device, g->workspace_bytes);
    g->cache[g->ncache] = e;
    *out = &g->cache[g->ncache++];
    return GEMM_OK;
}

// ---- entry points

static bool misaligned(const void *p) { return ((uintptr_t)p % GEMM_ALIGN) != 0; }

static int check_shape(struct gemm_ctx *g, const struct gemm_key *k) {
    if (k->N <= 0 || k->IC <= 0 || k->OC <= 0 || k->IC % 8 || k->OC % 8) {
        set_err(g, k, "N must be positive and IC, OC positive multiples of 8");
        return GEMM_EBADARG;
    }
    return GEMM_OK;
}

static int execute(struct gemm_ctx *g, const struct gemm_key *k, const struct gemm_call *c) {
    g->last_own = false;
    int rc = ensure_scratch(g, k);
    if (rc != GEMM_OK) return rc;
    struct gemm_entry *e;
    rc = lookup(g, k, c, &e);
    if (rc != GEMM_OK) return rc;
    g->last_own = e->own;
    cublasStatus_t s = entry_run(g, e, &e->algo, c);
    if (s != CUBLAS_STATUS_SUCCESS) {
        set_err(g, k, "cublasLtMatmul or epilogue kernel failed: %s", cublasLtGetStatusName(s));
        return GEMM_ECUBLAS;
    }
    return GEMM_OK;
}

extern "C" struct gemm_ctx *gemm_create(void *stream, size_t workspace_bytes, char *err,
                                        size_t errlen) {
    struct gemm_ctx *g = (struct gemm_ctx *)calloc(1, sizeof *g);
    if (!g) {
        snprintf(err, errlen, "gemm_create: out of host memory");
        return NULL;
    }
    g->stream = (cudaStream_t)stream;
    g->workspace_bytes = workspace_bytes;
    cublasStatus_t s = cublasLtCreate(&g->lt);
    if (s != CUBLAS_STATUS_SUCCESS) {
        snprintf(err, errlen, "gemm_create: cublasLtCreate: %s (is a CUDA device visible?)",
                 cublasLtGetStatusName(s));
        free(g);
        return NULL;
    }
    cudaError_t e = cudaSuccess;
    if (workspace_bytes) e = cudaMalloc(&g->workspace, workspace_bytes);
    for (int i = 0; i <= GEMM_TIME_REPS && e == cudaSuccess; i++) e = cudaEventCreate(&g->ev[i]);
    if (e != cudaSuccess) {
        snprintf(err, errlen, "gemm_create: %zu bytes of workspace and timing events: %s",
                 workspace_bytes, cudaGetErrorString(e));
        gemm_destroy(g);
        return NULL;
    }
    g->last_fwd = g->last_bwd_data = "";
    const char *tune_env = getenv("TPTRAIN_GEMM_TUNE");
    g->untimed = tune_env && strcmp(tune_env, "0") == 0;
#ifdef FA_HAVE_SM90
    const char *own = getenv("TPTRAIN_GEMM_SM90");
    int dev = 0, major = 0, minor = 0;
    int mode = !own ? 0 : strcmp(own, "1") == 0 ? 1 : strcmp(own, "auto") == 0 ? 2 : 0;
    if (mode && cudaGetDevice(&dev) == cudaSuccess &&
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) == cudaSuccess)
        g->sm90_gelu = major == 9 && minor == 0 ? mode : 0;
    const char *plain = getenv("TPTRAIN_GEMM_SM90_PLAIN");
    g->sm90_plain = plain && strcmp(plain, "1") == 0;
    (void)cudaGetLastError();
#endif
    return g;
}

extern "C" void gemm_destroy(struct gemm_ctx *g) {
    if (!g) return;
    if (g->lt) cudaStreamSynchronize(g->stream); // queued work may still use the buffers
    for (int i = 0; i < g->ncache; i++) entry_release(&g->cache[i]);
    free(g->cache);
    for (int i = 0; i <= GEMM_TIME_REPS; i++)
        if (g->ev[i]) cudaEventDestroy(g->ev[i]);
    if (g->workspace) cudaFree(g->workspace);
    if (g->scratch) cudaFree(g->scratch);
    if (g->lt) cublasLtDestroy(g->lt);
    free(g);
}

extern "C" const char *gemm_last_error(const struct gemm_ctx *g) { return g ? g->err : ""; }

extern "C" const char *gemm_last_fwd_path(const struct gemm_ctx *g) { return g ? g->last_fwd : ""; }

extern "C" const char *gemm_last_bwd_data_path(const struct gemm_ctx *g) { return g ? g->last_bwd_data : ""; }

extern "C" void gemm_set_sm_target(struct gemm_ctx *g, int sms) { g->sms = sms > 0 ? sms : 0; }

extern "C" int gemm_fwd(struct gemm_ctx *g, void *out, void *pre_gelu, const void *inp,
                        const void *w, const void *bias, int N, int IC, int OC) {
    struct gemm_key k = {GP_FWD, N, IC, OC,
                         pre_gelu ? (bias ? GE_GELU_BIAS : GE_GELU) : (bias ? GE_BIAS : GE_NONE), g->sms};
    int rc = check_shape(g, &k);
    if (rc != GEMM_OK) return rc;
    if (!out || !inp || !w || misaligned(out) || misaligned(pre_gelu) || misaligned(inp) ||
        misaligned(w) || misaligned(bias)) {
        set_err(g, &k, "out, inp, w must be non-NULL and every pointer %d-byte aligned",
                GEMM_ALIGN);
        return GEMM_EBADARG;
    }
    struct gemm_call c = {out, pre_gelu, w, inp, bias, NULL};
    rc = execute(g, &k, &c);
    g->last_fwd = g->last_own ? "sm90" : "cublaslt";
    return rc;
}

extern "C" int gemm_bwd_data(struct gemm_ctx *g, void *dinp, const void *dout, const void *w,
                             const void *pre_gelu, float *dsum, int N, int IC, int OC) {
    struct gemm_key k = {GP_BWD_DATA, N, IC, OC, pre_gelu ? (dsum ? GE_DGELU_DSUM : GE_DGELU) : GE_NONE, g->sms};
    int rc = check_shape(g, &k);
    if (rc != GEMM_OK) return rc;
    if (!dinp || !dout || !w || misaligned(dinp) || misaligned(dout) || misaligned(w) ||
        misaligned(pre_gelu)) {
        set_err(g, &k, "dinp, dout, w must be non-NULL and every pointer %d-byte aligned",
                GEMM_ALIGN);
        return GEMM_EBADARG;
    }
    if ((uintptr_t)dsum % sizeof(float)) {
        set_err(g, &k, "dsum must be 4-byte aligned");
        return GEMM_EBADARG;
    }
    struct gemm_call c = {dinp, (void *)pre_gelu, w, dout, NULL, dsum};
    rc = execute(g, &k, &c);
    g->last_bwd_data = g->last_own ? "sm90" : "cublaslt";
    if (rc == GEMM_OK && dsum && !pre_gelu) rc = gemm_colsum(g, dsum, dinp, N, IC);
    return rc;
}

extern "C" int gemm_colsum(struct gemm_ctx *g, float *out, const void *x, int N, int C) {
    // the scratch of a weight gradient with a bias gradient of this shape (IC plays no part)
    struct gemm_key k = {GP_BWD_WEIGHT, N, 8, C, GE_DBIAS, g->sms};
    int rc = check_shape(g, &k);
    if (rc != GEMM_OK) return rc;
    if (!out || !x || misaligned(x) || ((uintptr_t)out % sizeof(float))) {
        set_err(g, &k, "out, x must be non-NULL, x %d-byte aligned and out 4-byte", GEMM_ALIGN);
        return GEMM_EBADARG;
    }
    rc = ensure_scratch(g, &k);
    if (rc != GEMM_OK) return rc;
    colsum_run(g, out, (const __nv_bfloat16 *)x, N, C);
    if (cudaGetLastError() != cudaSuccess) {
        set_err(g, &k, "column-sum kernels failed to launch");
        return GEMM_ECUBLAS;
    }
    return GEMM_OK;
}

extern "C" int gemm_bwd_weight(struct gemm_ctx *g, float *dw, float *dbias, const void *dout,
                               const void *inp, int N, int IC, int OC) {
    struct gemm_key k = {GP_BWD_WEIGHT, N, IC, OC, dbias ? GE_DBIAS : GE_NONE, g->sms};
    int rc = check_shape(g, &k);
    if (rc != GEMM_OK) return rc;
    if (!dw || !dout || !inp || misaligned(dw) || misaligned(dout) || misaligned(inp) ||
        ((uintptr_t)dbias % sizeof(float))) {
        set_err(g, &k, "dw, dout, inp must be non-NULL and %d-byte aligned (dbias 4-byte)",
                GEMM_ALIGN);
        return GEMM_EBADARG;
    }
    struct gemm_call c = {dw, NULL, inp, dout, NULL, dbias};
    return execute(g, &k, &c);
}
