// test_gemm.c: the cuBLASLt linear-layer products (cuda/gemm.cu) against an fp32 host reference:
// every product and epilogue (none, bias, GELU with its pre-activation, GELU's derivative, weight
// gradient with and without bias gradient, accumulation onto nonzero gradients), the same
// products tuned for fewer multiprocessors (gemm_set_sm_target), a small odd shape, argument
// checks, bitwise repeatability, and that the GELU is the tanh approximation.
//
// Inputs are drawn ~N(0, 1) and rounded to bf16 once; the reference runs in double on exactly
// those values, so the comparison measures the products' own rounding (bf16 outputs: the
// tolerance is 1e-2 of the largest reference magnitude; fp32 gradients: 1e-4). Output buffers are
// poisoned with 0xFF bytes (NaN in bf16 and fp32) first, so an unwritten element or a NaN fails.
//
// Built only in CUDA builds. Without a device every case skips and main exits 77 (SKIP).
#include <criterion/criterion.h>
#include <cuda_runtime_api.h>
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "gemm.h"
#include "cudatest.h"
#include "flash_attention.h"
#include "testutil.h"

#define WS_BYTES ((size_t)32 << 20)
#define TOL_BF16 1e-2
#define TOL_FP32 1e-4

// ---- helpers: random numbers, bf16, device buffers

static double gelu_tanh(double x) {
    return 0.5 * x * (1.0 + tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)));
}

static double gelu_tanh_grad(double x) {
    double t = tanh(0.7978845608028654 * (x + 0.044715 * x * x * x));
    return 0.5 * (1.0 + t) +
           0.5 * x * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x * x);
}

static double gelu_erf(double x) { return 0.5 * x * (1.0 + erf(x / sqrt(2.0))); }

static double gelu_erf_grad(double x) {
    return 0.5 * (1.0 + erf(x / sqrt(2.0))) +
           0.3989422804014327 * x * exp(-0.5 * x * x); // 1 / sqrt(2 pi)
}

static void sync_ok(void) {
    cudaError_t e = cudaDeviceSynchronize();
    cr_assert_eq(e, cudaSuccess, "device error: %s", cudaGetErrorString(e));
}

// n random bf16 values (scale * N(0, 1)) on the host, uploaded; *host keeps them as floats.
static void *rand_bf16(size_t n, float scale, uint64_t *rng, float **host) {
    uint16_t *h = malloc(n * 2);
    float *f = malloc(n * 4);
    cr_assert(h && f);
    for (size_t i = 0; i < n; i++) {
        h[i] = tp_bf16_from_f32(scale * tu_rng_normal(rng));
        f[i] = tp_bf16_to_f32(h[i]);
    }
    void *d = ct_alloc(n * 2);
    ct_upload(d, h, n * 2);
    free(h);
    *host = f;
    return d;
}

static float *download_bf16(const void *d, size_t n) {
    uint16_t *h = malloc(n * 2);
    float *f = malloc(n * 4);
    cr_assert(h && f);
    ct_download(h, d, n * 2);
    for (size_t i = 0; i < n; i++) f[i] = tp_bf16_to_f32(h[i]);
    free(h);
    return f;
}

// max |a - ref| / max |ref|; fails on any non-finite a.
static double err_norm(const float *a, const double *ref, size_t n, const char *what) {
    double num = 0.0, den = 0.0;
    for (size_t i = 0; i < n; i++) {
        cr_assert(isfinite(a[i]), "%s: element %zu is not finite (unwritten or NaN)", what, i);
        num = fmax(num, fabs(a[i] - ref[i]));
        den = fmax(den, fabs(ref[i]));
    }
    return num / (den > 0.0 ? den : 1.0);
}

struct ctx {
    cudaStream_t stream;
    struct gemm_ctx *g;
};

// The multiprocessors the products of a test's contexts target (0: all); each test runs in a
// process of its own, so setting it affects that test only.
static int sm_target;

// When set, check_fwd and check_bwd_data also expect gemm_last_fwd_path / gemm_last_bwd_data_path
// to say this where the Hopper kernels exist.
static const char *expect_fwd_path;

// Whether this build and device run the sm_90a kernels (the attention's test says the same).
static bool hopper_kernels(void) { return strstr(flash_attention_path(64), "sm_90a") != NULL; }

static struct ctx ctx_open(void) {
    struct ctx c;
    cr_assert_eq(cudaStreamCreate(&c.stream), cudaSuccess);
    char err[256] = "";
    c.g = gemm_create(c.stream, WS_BYTES, err, sizeof err);
    cr_assert_not_null(c.g, "gemm_create failed: %s", err);
    cr_assert_str_empty(gemm_last_error(c.g));
    gemm_set_sm_target(c.g, sm_target);
    return c;
}

static void ctx_close(struct ctx *c) {
    gemm_destroy(c->g);
    cudaStreamDestroy(c->stream);
}

// ---- host references (double accumulation on the bf16-rounded values)

// pre (N, OC) = inp (N, IC) @ w (OC, IC)^T + bias (OC, or NULL)
static double *ref_fwd(const float *inp, const float *w, const float *bias, int N, int IC, int OC) {
    double *pre = malloc((size_t)N * OC * sizeof(double));
    cr_assert(pre);
    for (int n = 0; n < N; n++)
        for (int o = 0; o < OC; o++) {
            double s = bias ? bias[o] : 0.0;
            for (int i = 0; i < IC; i++)
                s += (double)inp[(size_t)n * IC + i] * w[(size_t)o * IC + i];
            pre[(size_t)n * OC + o] = s;
        }
    return pre;
}

// dinp (N, IC) = dout (N, OC) @ w (OC, IC), times gelu'(pre (N, IC)) when pre is given
static double *ref_bwd_data(const float *dout, const float *w, const float *pre, int N, int IC,
                            int OC) {
    double *d = calloc((size_t)N * IC, sizeof(double));
    cr_assert(d);
    for (int n = 0; n < N; n++)
        for (int o = 0; o < OC; o++) {
            double g = dout[(size_t)n * OC + o];
            for (int i = 0; i < IC; i++) d[(size_t)n * IC + i] += g * w[(size_t)o * IC + i];
        }
    if (pre)
        for (size_t j = 0; j < (size_t)N * IC; j++) d[j] *= gelu_tanh_grad(pre[j]);
    return d;
}

// dw (OC, IC) = dw0 + times * dout^T @ inp; dbias (OC) = db0 + times * column sums of dout
static void ref_bwd_weight(double *dw, double *db, const float *dw0, const float *db0,
                           const float *dout, const float *inp, int N, int IC, int OC, int times) {
    for (int o = 0; o < OC; o++) {
        double sb = 0.0;
        for (int n = 0; n < N; n++) sb += dout[(size_t)n * OC + o];
        db[o] = db0[o] + times * sb;
        for (int i = 0; i < IC; i++) {
            double s = 0.0;
            for (int n = 0; n < N; n++)
                s += (double)dout[(size_t)n * OC + o] * inp[(size_t)n * IC + i];
            dw[(size_t)o * IC + i] = dw0[(size_t)o * IC + i] + times * s;
        }
    }
}

// ---- cases

// out = inp @ w^T (+ bias) (GELU'd, pre_gelu kept, when gelu)
static void check_fwd(int N, int IC, int OC, bool with_bias, bool gelu, uint64_t seed) {
    ct_require_gpu("the cuBLASLt products");
    struct ctx c = ctx_open();
    uint64_t rng = seed;
    float *inp_h, *w_h, *b_h = NULL;
    void *inp = rand_bf16((size_t)N * IC, 1.0f, &rng, &inp_h);
    void *w = rand_bf16((size_t)OC * IC, 1.0f / sqrtf((float)IC), &rng, &w_h);
    void *bias = with_bias ? rand_bf16((size_t)OC, 0.5f, &rng, &b_h) : NULL;
    size_t nout = (size_t)N * OC;
    void *out = ct_alloc(nout * 2), *pre = gelu ? ct_alloc(nout * 2) : NULL;
    ct_poison(out, nout * 2);
    if (pre) ct_poison(pre, nout * 2);
    int rc = gemm_fwd(c.g, out, pre, inp, w, bias, N, IC, OC);
    cr_assert_eq(rc, GEMM_OK, "gemm_fwd: %d (%s)", rc, gemm_last_error(c.g));
    sync_ok();
    if (expect_fwd_path && hopper_kernels())
        cr_expect_str_eq(gemm_last_fwd_path(c.g), expect_fwd_path, "gemm_fwd N=%d IC=%d OC=%d took %s", N, IC,
                         OC, gemm_last_fwd_path(c.g));

    double *ref = ref_fwd(inp_h, w_h, b_h, N, IC, OC);
    float *out_h = download_bf16(out, nout);
    if (gelu) {
        float *pre_h = download_bf16(pre, nout);
        double e_pre = err_norm(pre_h, ref, nout, "pre_gelu");
        cr_expect_leq(e_pre, TOL_BF16, "pre_gelu error %.3g", e_pre);
        for (size_t i = 0; i < nout; i++) ref[i] = gelu_tanh(ref[i]);
        free(pre_h);
    }
    double e = err_norm(out_h, ref, nout, "out");
    cr_expect_leq(e, TOL_BF16, "out error %.3g (N=%d IC=%d OC=%d bias=%d gelu=%d)", e, N, IC, OC,
                  with_bias, gelu);
    free(ref);
    free(out_h);
    free(inp_h);
    free(w_h);
    free(b_h);
    cudaFree(inp);
    cudaFree(w);
    cudaFree(bias);
    cudaFree(out);
    cudaFree(pre);
    ctx_close(&c);
}

// With bwd_data_dsum, check_bwd_data also asks for dinp's column sums (into a nonzero start, two
// calls: the first also tunes, which must not touch them).
static bool bwd_data_dsum;

// dinp = dout @ w (times gelu'(pre_gelu) when dgelu)
static void check_bwd_data(int N, int IC, int OC, bool dgelu, uint64_t seed) {
    ct_require_gpu("the cuBLASLt products");
    struct ctx c = ctx_open();
    uint64_t rng = seed;
    float *dout_h, *w_h, *pre_h = NULL;
    void *dout = rand_bf16((size_t)N * OC, 1.0f, &rng, &dout_h);
    void *w = rand_bf16((size_t)OC * IC, 1.0f / sqrtf((float)OC), &rng, &w_h);
    void *pre = dgelu ? rand_bf16((size_t)N * IC, 1.5f, &rng, &pre_h) : NULL;
    size_t n = (size_t)N * IC;
    void *dinp = ct_alloc(n * 2);
    ct_poison(dinp, n * 2);
    float *ds0 = malloc((size_t)IC * 4), *ds = bwd_data_dsum ? ct_alloc((size_t)IC * 4) : NULL;
    cr_assert(ds0);
    for (int i = 0; i < IC; i++) ds0[i] = tu_rng_normal(&rng);
    if (ds) ct_upload(ds, ds0, (size_t)IC * 4);
    for (int t = 0; t < (ds ? 2 : 1); t++) {
        int rc = gemm_bwd_data(c.g, dinp, dout, w, pre, ds, N, IC, OC);
        cr_assert_eq(rc, GEMM_OK, "gemm_bwd_data: %d (%s)", rc, gemm_last_error(c.g));
    }
    sync_ok();
    if (expect_fwd_path && hopper_kernels())
        cr_expect_str_eq(gemm_last_bwd_data_path(c.g), expect_fwd_path, "gemm_bwd_data N=%d IC=%d OC=%d took %s", N,
                         IC, OC, gemm_last_bwd_data_path(c.g));
    double *ref = ref_bwd_data(dout_h, w_h, pre_h, N, IC, OC);
    float *dinp_h = download_bf16(dinp, n);
    double e = err_norm(dinp_h, ref, n, "dinp");
    cr_expect_leq(e, TOL_BF16, "dinp error %.3g (N=%d IC=%d OC=%d dgelu=%d)", e, N, IC, OC, dgelu);
    if (ds) { // twice the column sums of dinp as stored, added to the start
        double *want = malloc((size_t)IC * sizeof(double));
        float *got = malloc((size_t)IC * 4);
        cr_assert(want && got);
        for (int i = 0; i < IC; i++) want[i] = 0.0;
        for (size_t r = 0; r < (size_t)N; r++)
            for (int i = 0; i < IC; i++) want[i] += dinp_h[r * (size_t)IC + i];
        for (int i = 0; i < IC; i++) want[i] = ds0[i] + 2.0 * want[i];
        ct_download(got, ds, (size_t)IC * 4);
        double es = err_norm(got, want, (size_t)IC, "dsum");
        cr_expect_leq(es, TOL_FP32, "dsum error %.3g (N=%d IC=%d OC=%d dgelu=%d)", es, N, IC, OC, dgelu);
        free(want);
        free(got);
        cudaFree(ds);
    }
    free(ds0);
    free(ref);
    free(dinp_h);
    free(dout_h);
    free(w_h);
    free(pre_h);
    cudaFree(dout);
    cudaFree(w);
    cudaFree(pre);
    cudaFree(dinp);
    ctx_close(&c);
}

// dw, dbias start nonzero; `times` identical calls must add the product `times` times (the first
// call also tunes, which must not touch the caller's gradients).
static void check_bwd_weight(int N, int IC, int OC, bool with_dbias, int times, uint64_t seed) {
    ct_require_gpu("the cuBLASLt products");
    struct ctx c = ctx_open();
    uint64_t rng = seed;
    float *dout_h, *inp_h;
    void *dout = rand_bf16((size_t)N * OC, 1.0f, &rng, &dout_h);
    void *inp = rand_bf16((size_t)N * IC, 1.0f, &rng, &inp_h);
    size_t nw = (size_t)OC * IC;
    float *dw0 = malloc(nw * 4), *db0 = malloc((size_t)OC * 4);
    cr_assert(dw0 && db0);
    for (size_t i = 0; i < nw; i++) dw0[i] = tu_rng_normal(&rng);
    for (int o = 0; o < OC; o++) db0[o] = tu_rng_normal(&rng);
    float *dw = ct_alloc(nw * 4), *db = with_dbias ? ct_alloc((size_t)OC * 4) : NULL;
    ct_upload(dw, dw0, nw * 4);
    if (db) ct_upload(db, db0, (size_t)OC * 4);
    for (int t = 0; t < times; t++) {
        int rc = gemm_bwd_weight(c.g, dw, db, dout, inp, N, IC, OC);
        cr_assert_eq(rc, GEMM_OK, "gemm_bwd_weight: %d (%s)", rc, gemm_last_error(c.g));
    }
    sync_ok();
    double *rw = malloc(nw * sizeof(double)), *rb = malloc((size_t)OC * sizeof(double));
    cr_assert(rw && rb);
    ref_bwd_weight(rw, rb, dw0, db0, dout_h, inp_h, N, IC, OC, times);
    float *dw_h = malloc(nw * 4), *db_h = malloc((size_t)OC * 4);
    cr_assert(dw_h && db_h);
    ct_download(dw_h, dw, nw * 4);
    double e = err_norm(dw_h, rw, nw, "dw");
    cr_expect_leq(e, TOL_FP32, "dw error %.3g after %d calls (N=%d IC=%d OC=%d)", e, times, N, IC,
                  OC);
    if (db) {
        ct_download(db_h, db, (size_t)OC * 4);
        double eb = err_norm(db_h, rb, (size_t)OC, "dbias");
        cr_expect_leq(eb, TOL_FP32, "dbias error %.3g after %d calls", eb, times);
    }
    free(rw);
    free(rb);
    free(dw_h);
    free(db_h);
    free(dw0);
    free(db0);
    free(dout_h);
    free(inp_h);
    cudaFree(dout);
    cudaFree(inp);
    cudaFree(dw);
    cudaFree(db);
    ctx_close(&c);
}

Test(gemm, fwd_plain) { check_fwd(256, 192, 320, false, false, 1); }
Test(gemm, fwd_bias) { check_fwd(256, 192, 320, true, false, 2); }
Test(gemm, fwd_gelu_bias) { check_fwd(256, 192, 320, true, true, 3); }
Test(gemm, fwd_gelu_no_bias) { check_fwd(128, 64, 256, false, true, 4); }
Test(gemm, bwd_data_plain) { check_bwd_data(256, 192, 320, false, 5); }
Test(gemm, bwd_data_dgelu) { check_bwd_data(256, 320, 192, true, 6); }

// dinp's column sums with the input gradient (the bias gradient of fc, from fc_proj's backward):
// cuBLASLt's product and gemm_colsum, with and without GELU'
Test(gemm, bwd_data_dsum) {
    bwd_data_dsum = true;
    check_bwd_data(256, 320, 192, true, 7);
    check_bwd_data(256, 192, 320, false, 8);
    check_bwd_data(4096, 1152, 768, true, 9);
}

// The same with the Hopper kernel: summed in the staged epilogue (clusters, a block per tile, one
// tile), and after the product where the kernel does not sum (the register epilogue)
Test(gemm, bwd_data_dsum_sm90) {
    cr_assert_eq(setenv("TPTRAIN_GEMM_SM90", "1", 1), 0);
    bwd_data_dsum = true;
    expect_fwd_path = "sm90";
    check_bwd_data(4096, 1152, 768, true, 61);
    check_bwd_data(640, 256, 128, true, 62);
    check_bwd_data(128, 128, 64, true, 63);
    expect_fwd_path = "cublaslt";
    check_bwd_data(256, 320, 192, true, 64); // IC not a multiple of 128
    cr_assert_eq(setenv("TPTRAIN_GEMM_SM90_EPILOGUE", "registers", 1), 0);
    expect_fwd_path = "sm90";
    check_bwd_data(640, 256, 128, true, 65);
}
Test(gemm, bwd_weight_plain) { check_bwd_weight(256, 192, 320, false, 1, 7); }
Test(gemm, bwd_weight_dbias) { check_bwd_weight(256, 192, 320, true, 1, 8); }
Test(gemm, bwd_weight_accumulates) { check_bwd_weight(200, 64, 96, true, 3, 9); }

// What a product runs beside a collective with (TPTRAIN_OVERLAP_SMS): algorithms chosen for 32
// multiprocessors compute the same products.
Test(gemm, fewer_multiprocessors) {
    sm_target = 32;
    check_fwd(256, 192, 320, true, true, 11);
    check_bwd_data(256, 320, 192, true, 12);
    check_bwd_weight(256, 192, 320, true, 2, 13);
}

// The Hopper GELU forward and GELU'-epilogue input gradient of our own (TPTRAIN_GEMM_SM90=1, read
// at gemm_create), with the epilogue from registers (TPTRAIN_GEMM_SM90_EPILOGUE=registers), against
// the same double-precision references: more 128 x 128 tiles than multiprocessors (each block walks
// several, its two consumers in turn) and more 64-column K steps than the six stages hold, the
// forward with a bias and without; an even number of 128-row tile rows (blocks in clusters of two
// sharing B's tiles) and an odd one (a block per tile); shapes they do not take go to cuBLASLt.
Test(gemm, gelu_products_sm90) {
    cr_assert_eq(setenv("TPTRAIN_GEMM_SM90", "1", 1), 0);
    cr_assert_eq(setenv("TPTRAIN_GEMM_SM90_EPILOGUE", "registers", 1), 0);
    expect_fwd_path = "sm90";
    check_fwd(4096, 768, 1152, true, true, 14);  // 288 tiles, 12 K steps
    check_fwd(2048, 256, 640, false, true, 15);  // 80 tiles, 4 K steps, no bias
    check_fwd(128, 64, 128, true, true, 16);     // one tile, one K step
    check_bwd_data(4096, 1152, 768, true, 18);   // dinp 4096 x 1152: 288 tiles, 12 K steps
    check_bwd_data(128, 128, 64, true, 19);      // one tile, one K step
    check_fwd(384, 128, 384, true, true, 21);    // three tile rows: no clusters, 9 tiles
    check_bwd_data(640, 256, 128, true, 22);     // five tile rows: no clusters, 10 tiles
    expect_fwd_path = "cublaslt";
    check_fwd(256, 192, 320, true, true, 17);    // OC not a multiple of 128
    check_bwd_data(256, 320, 192, true, 20);     // IC not a multiple of 128
}

// The same products with the staged epilogue (the default, set here explicitly: the tile through
// shared memory by stmatrix, out by the copy engine; the backward's pre-activation in by it).
Test(gemm, gelu_products_sm90_staged) {
    cr_assert_eq(setenv("TPTRAIN_GEMM_SM90", "1", 1), 0);
    cr_assert_eq(setenv("TPTRAIN_GEMM_SM90_EPILOGUE", "tma", 1), 0);
    expect_fwd_path = "sm90";
    check_fwd(4096, 768, 1152, true, true, 23);  // clusters, 12 K steps, several tiles per consumer
    check_fwd(384, 128, 384, false, true, 24);   // a block per tile, no bias
    check_bwd_data(4096, 1152, 768, true, 25);   // clusters
    check_bwd_data(640, 256, 128, true, 26);     // a block per tile
    check_bwd_data(128, 128, 64, true, 27);      // one tile
}

// The wide tiles (TPTRAIN_GEMM_SM90_TILE=256: 128 x 256, both consumers on each, the epilogue in
// warps of its own): several tiles per block (clusters of two, and a block per tile), fewer K steps
// than stages, one tile; an output whose columns are not a multiple of 256 takes the 128 x 128 tiles.
Test(gemm, gelu_products_sm90_wide) {
    cr_assert_eq(setenv("TPTRAIN_GEMM_SM90", "1", 1), 0);
    cr_assert_eq(setenv("TPTRAIN_GEMM_SM90_TILE", "256", 1), 0);
    expect_fwd_path = "sm90";
    check_fwd(4096, 768, 1536, true, true, 36);  // clusters, 192 tiles, 12 K steps
    check_fwd(8192, 256, 2048, true, true, 37);  // clusters, 512 tiles (about four a block), 4 K steps
    check_fwd(384, 128, 512, false, true, 38);   // a block per tile, 6 tiles, 2 K steps, no bias
    check_fwd(128, 64, 256, true, true, 39);     // one tile, one K step
    check_bwd_data(4096, 1536, 768, true, 40);   // clusters, 192 tiles
    check_bwd_data(640, 256, 128, true, 41);     // a block per tile, 5 tiles
    check_fwd(4096, 768, 1152, true, true, 42);  // 1152 columns: the 128 x 128 tiles
}

// The same with four stages and the tile handed to the epilogue warps in two halves
// (TPTRAIN_GEMM_SM90_WIDE_STAGES=4).
Test(gemm, gelu_products_sm90_wide4) {
    cr_assert_eq(setenv("TPTRAIN_GEMM_SM90", "1", 1), 0);
    cr_assert_eq(setenv("TPTRAIN_GEMM_SM90_TILE", "256", 1), 0);
    cr_assert_eq(setenv("TPTRAIN_GEMM_SM90_WIDE_STAGES", "4", 1), 0);
    expect_fwd_path = "sm90";
    check_fwd(4096, 768, 1536, true, true, 43);  // clusters, 192 tiles, 12 K steps
    check_fwd(8192, 256, 2048, true, true, 44);  // clusters, 512 tiles, 4 K steps
    check_fwd(384, 128, 512, false, true, 45);   // a block per tile, 2 K steps, no bias
    check_bwd_data(4096, 1536, 768, true, 46);   // clusters
    check_bwd_data(640, 256, 128, true, 47);     // a block per tile
}

// The forwards with the bias or no epilogue in the staged 128 x 128 kernel (TPTRAIN_GEMM_SM90_PLAIN=1
// beside TPTRAIN_GEMM_SM90=1): clusters, a block per tile, one tile; the GELU products as before.
Test(gemm, plain_products_sm90) {
    cr_assert_eq(setenv("TPTRAIN_GEMM_SM90", "1", 1), 0);
    cr_assert_eq(setenv("TPTRAIN_GEMM_SM90_PLAIN", "1", 1), 0);
    expect_fwd_path = "sm90";
    check_fwd(4096, 768, 2304, true, false, 48);  // clusters, 576 tiles, 12 K steps, bias
    check_fwd(256, 768, 4096, false, false, 49);  // clusters, 64 tiles, no bias (an LM head's chunk)
    check_fwd(384, 128, 384, true, false, 50);    // a block per tile
    check_fwd(128, 64, 128, false, false, 51);    // one tile, one K step
    check_fwd(2048, 256, 640, true, true, 52);    // GELU, beside
    expect_fwd_path = "cublaslt";
    check_fwd(256, 192, 320, true, false, 53);    // OC not a multiple of 128
}

// Without TPTRAIN_GEMM_SM90_PLAIN the plain forwards stay cuBLASLt's.
Test(gemm, plain_products_sm90_off) {
    cr_assert_eq(setenv("TPTRAIN_GEMM_SM90", "1", 1), 0);
    expect_fwd_path = "cublaslt";
    check_fwd(384, 128, 384, true, false, 54);
}

// The consumers hand the tensor cores over once their products are issued
// (TPTRAIN_GEMM_SM90_TURN=issued): several tiles per consumer with clusters and without.
Test(gemm, sm90_turn_issued) {
    cr_assert_eq(setenv("TPTRAIN_GEMM_SM90", "1", 1), 0);
    cr_assert_eq(setenv("TPTRAIN_GEMM_SM90_PLAIN", "1", 1), 0);
    cr_assert_eq(setenv("TPTRAIN_GEMM_SM90_TURN", "issued", 1), 0);
    expect_fwd_path = "sm90";
    check_fwd(4096, 768, 1152, true, true, 55);   // clusters, GELU
    check_fwd(384, 128, 384, false, true, 56);    // a block per tile
    check_bwd_data(4096, 1152, 768, true, 57);    // clusters, GELU'
    check_bwd_data(640, 256, 128, true, 58);      // a block per tile
    check_fwd(4096, 768, 2304, true, false, 59);  // plain
}

// TPTRAIN_GEMM_SM90=auto: each shape timed against cuBLASLt's best when first seen, the faster
// kept; the products are right whichever won.
Test(gemm, gelu_products_sm90_auto) {
    cr_assert_eq(setenv("TPTRAIN_GEMM_SM90", "auto", 1), 0);
    check_fwd(4096, 768, 1152, true, true, 28);
    check_fwd(2048, 256, 640, false, true, 29);
    check_bwd_data(4096, 1152, 768, true, 30);
    check_fwd(256, 192, 320, true, true, 31);    // a shape the own kernel does not take
}

Test(gemm, odd_shape_N7_IC8_OC24) {
    check_fwd(7, 8, 24, false, false, 10);
    check_fwd(7, 8, 24, true, false, 11);
    check_fwd(7, 8, 24, true, true, 12);
    check_bwd_data(7, 8, 24, false, 13);
    check_bwd_data(7, 24, 8, true, 14);
    check_bwd_weight(7, 8, 24, false, 1, 15);
    check_bwd_weight(7, 8, 24, true, 2, 16);
}

Test(gemm, rejects_bad_args) {
    ct_require_gpu("the cuBLASLt products");
    struct ctx c = ctx_open();
    char *buf = ct_alloc(1 << 16);
    ct_poison(buf, 1 << 16);
    void *a = buf, *b = buf + 8192, *out = buf + 16384;
    cr_expect_eq(gemm_fwd(c.g, out, NULL, a, b, NULL, 8, 10, 24), GEMM_EBADARG, "IC = 10");
    cr_expect(strstr(gemm_last_error(c.g), "gemm_fwd") != NULL, "message names the call: '%s'",
              gemm_last_error(c.g));
    cr_expect(strstr(gemm_last_error(c.g), "IC=10") != NULL, "message names the shape: '%s'",
              gemm_last_error(c.g));
    cr_expect_eq(gemm_fwd(c.g, out, NULL, a, b, NULL, 0, 8, 24), GEMM_EBADARG, "N = 0");
    cr_expect_eq(gemm_bwd_data(c.g, out, a, b, NULL, NULL, 8, 8, 20), GEMM_EBADARG, "OC = 20");
    cr_expect_eq(gemm_bwd_weight(c.g, (float *)out, NULL, a, b, 8, -8, 24), GEMM_EBADARG, "IC < 0");
    cr_expect_eq(gemm_fwd(c.g, out, NULL, buf + 2, b, NULL, 8, 8, 24), GEMM_EBADARG,
                 "misaligned inp");
    cr_expect_eq(gemm_fwd(c.g, out, buf + 32770, a, b, NULL, 8, 8, 24), GEMM_EBADARG,
                 "misaligned pre_gelu");
    cr_expect_eq(gemm_fwd(c.g, NULL, NULL, a, b, NULL, 8, 8, 24), GEMM_EBADARG, "NULL out");
    sync_ok();
    // nothing was launched: the output region is still all 0xFF
    unsigned char *h = malloc(1 << 16);
    cr_assert(h);
    ct_download(h, buf, 1 << 16);
    for (size_t i = 0; i < (1 << 16); i++) cr_assert_eq(h[i], 0xFF, "byte %zu was written", i);
    free(h);
    cudaFree(buf);
    ctx_close(&c);
}

// Two identical calls give identical bits, for every product, at a size where split-K and
// multi-stage algorithms are candidates.
Test(gemm, bitwise_repeatable) {
    ct_require_gpu("the cuBLASLt products");
    struct ctx c = ctx_open();
    uint64_t rng = 21;
    const int N = 4096, IC = 768, OC = 1536;
    float *h1, *h2, *h3, *h4;
    void *inp = rand_bf16((size_t)N * IC, 1.0f, &rng, &h1);
    void *w = rand_bf16((size_t)OC * IC, 0.05f, &rng, &h2);
    void *bias = rand_bf16((size_t)OC, 0.5f, &rng, &h3);
    void *dout = rand_bf16((size_t)N * OC, 1.0f, &rng, &h4);
    size_t no = (size_t)N * OC, ni = (size_t)N * IC, nw = (size_t)OC * IC;
    void *out[2] = {ct_alloc(no * 2), ct_alloc(no * 2)},
         *pre[2] = {ct_alloc(no * 2), ct_alloc(no * 2)};
    void *dinp[2] = {ct_alloc(ni * 2), ct_alloc(ni * 2)};
    float *dw[2] = {ct_alloc(nw * 4), ct_alloc(nw * 4)},
          *db[2] = {ct_alloc(OC * 4), ct_alloc(OC * 4)};
    for (int r = 0; r < 2; r++) {
        cr_assert_eq(cudaMemset(dw[r], 0, nw * 4), cudaSuccess);
        cr_assert_eq(cudaMemset(db[r], 0, OC * 4), cudaSuccess);
        cr_assert_eq(gemm_fwd(c.g, out[r], pre[r], inp, w, bias, N, IC, OC), GEMM_OK, "%s",
                     gemm_last_error(c.g));
        // dgelu against the pre-activation of the forward, read as (N, IC) of the first rows
        cr_assert_eq(gemm_bwd_data(c.g, dinp[r], dout, w, pre[0], NULL, N, IC, OC), GEMM_OK, "%s",
                     gemm_last_error(c.g));
        cr_assert_eq(gemm_bwd_weight(c.g, dw[r], db[r], dout, inp, N, IC, OC), GEMM_OK, "%s",
                     gemm_last_error(c.g));
    }
    sync_ok();
    struct {
        void *a, *b;
        size_t bytes;
        const char *what;
    } pairs[] = {{out[0], out[1], no * 2, "out"},
                 {pre[0], pre[1], no * 2, "pre_gelu"},
                 {dinp[0], dinp[1], ni * 2, "dinp"},
                 {dw[0], dw[1], nw * 4, "dw"},
                 {db[0], db[1], (size_t)OC * 4, "dbias"}};
    for (size_t p = 0; p < sizeof pairs / sizeof pairs[0]; p++) {
        unsigned char *x = malloc(pairs[p].bytes), *y = malloc(pairs[p].bytes);
        cr_assert(x && y);
        ct_download(x, pairs[p].a, pairs[p].bytes);
        ct_download(y, pairs[p].b, pairs[p].bytes);
        cr_expect(memcmp(x, y, pairs[p].bytes) == 0, "%s differs between two identical calls",
                  pairs[p].what);
        free(x);
        free(y);
    }
    for (int r = 0; r < 2; r++) {
        cudaFree(out[r]);
        cudaFree(pre[r]);
        cudaFree(dinp[r]);
        cudaFree(dw[r]);
        cudaFree(db[r]);
    }
    cudaFree(inp);
    cudaFree(w);
    cudaFree(bias);
    cudaFree(dout);
    free(h1);
    free(h2);
    free(h3);
    free(h4);
    ctx_close(&c);
}

// GELU is the tanh approximation, not the erf form. The pre-activations are made exact (unit
// weight rows pick one input each) and lie in [-3.5, -2), where the forms differ systematically
// (the tanh form is less negative there, by up to 12%) while bf16 rounding, and any fast-tanh
// error, averages out: the mean signed distance to the tanh form must be far below that to the
// erf form. Likewise for the derivative in the backward (dout = 1 through unit weights).
Test(gemm, gelu_is_tanh_approximation) {
    ct_require_gpu("the cuBLASLt products");
    struct ctx c = ctx_open();
    const int N = 512, K = 8, M = 64; // fwd: IC = K, OC = M; bwd: OC = K, IC = M
    uint16_t *x_h = malloc((size_t)N * K * 2), *w_h = malloc((size_t)M * K * 2);
    uint16_t *one_h = malloc((size_t)N * K * 2);
    cr_assert(x_h && w_h && one_h);
    for (size_t i = 0; i < (size_t)N * K; i++) {
        x_h[i] = tp_bf16_from_f32(-3.5f + 1.5f * (float)i / (float)(N * K)); // [-3.5, -2)
        one_h[i] = tp_bf16_from_f32(1.0f);
    }
    for (int o = 0; o < M; o++)
        for (int i = 0; i < K; i++) w_h[o * K + i] = tp_bf16_from_f32(i == o % K ? 1.0f : 0.0f);
    void *x = ct_alloc((size_t)N * K * 2), *w = ct_alloc((size_t)M * K * 2);
    void *ones = ct_alloc((size_t)N * K * 2);
    void *out = ct_alloc((size_t)N * M * 2), *pre = ct_alloc((size_t)N * M * 2);
    void *dinp = ct_alloc((size_t)N * M * 2);
    ct_upload(x, x_h, (size_t)N * K * 2);
    ct_upload(w, w_h, (size_t)M * K * 2);
    ct_upload(ones, one_h, (size_t)N * K * 2);
    cr_assert_eq(gemm_fwd(c.g, out, pre, x, w, NULL, N, K, M), GEMM_OK, "%s", gemm_last_error(c.g));
    // w (M, K) read as (OC = M, IC = K) forward; backward needs w (OC = K, IC = M): its transpose,
    // which for unit rows is again "column i takes input i % K"
    uint16_t *wt_h = malloc((size_t)K * M * 2);
    cr_assert(wt_h);
    for (int o = 0; o < K; o++)
        for (int i = 0; i < M; i++) wt_h[o * M + i] = tp_bf16_from_f32(i % K == o ? 1.0f : 0.0f);
    void *wt = ct_alloc((size_t)K * M * 2);
    ct_upload(wt, wt_h, (size_t)K * M * 2);
    cr_assert_eq(gemm_bwd_data(c.g, dinp, ones, wt, pre, NULL, N, M, K), GEMM_OK, "%s",
                 gemm_last_error(c.g));
    sync_ok();
    float *out_f = download_bf16(out, (size_t)N * M), *pre_f = download_bf16(pre, (size_t)N * M);
    float *dinp_f = download_bf16(dinp, (size_t)N * M);
    double d_tanh = 0, d_erf = 0, g_tanh = 0, g_erf = 0;
    for (int n = 0; n < N; n++)
        for (int o = 0; o < M; o++) {
            size_t j = (size_t)n * M + o;
            double xv = tp_bf16_to_f32(x_h[(size_t)n * K + o % K]);
            cr_assert_eq(pre_f[j], (float)xv, "pre_gelu must be the exact pre-activation");
            d_tanh += out_f[j] - gelu_tanh(xv);
            d_erf += out_f[j] - gelu_erf(xv);
            g_tanh += dinp_f[j] - gelu_tanh_grad(xv);
            g_erf += dinp_f[j] - gelu_erf_grad(xv);
        }
    double cnt = (double)N * M;
    d_tanh /= cnt, d_erf /= cnt, g_tanh /= cnt, g_erf /= cnt;
    cr_log_info("GELU: mean signed distance to the tanh form %.3g, to the erf form %.3g; "
                "derivative %.3g vs %.3g",
                d_tanh, d_erf, g_tanh, g_erf);
    cr_expect_lt(fabs(d_tanh), 0.25 * fabs(d_erf),
                 "forward GELU is not the tanh form (%.4g vs erf %.4g)", d_tanh, d_erf);
    cr_expect_lt(fabs(g_tanh), 0.25 * fabs(g_erf),
                 "GELU derivative is not the tanh form's (%.4g vs erf %.4g)", g_tanh, g_erf);
    free(x_h);
    free(w_h);
    free(wt_h);
    free(one_h);
    free(out_f);
    free(pre_f);
    free(dinp_f);
    cudaFree(x);
    cudaFree(w);
    cudaFree(wt);
    cudaFree(ones);
    cudaFree(out);
    cudaFree(pre);
    cudaFree(dinp);
    ctx_close(&c);
}

int main(int argc, char *argv[]) { return tu_gpu_suite_main(argc, argv, "test_gemm"); }
