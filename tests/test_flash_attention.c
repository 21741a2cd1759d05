// test_flash_attention.c: the bf16 flash-attention kernels (cuda/flash_attention.cu) against the
// fp32 CPU reference attention, forward and backward; log-sum-exp against double precision;
// bitwise determinism; argument checks; a timing at the GPT-2 124M shape (logged, not asserted).
//
// Inputs are drawn ~N(0, 1) and rounded to bf16 once; the CPU reference runs on exactly those
// rounded values, so the comparison measures the kernel's own bf16 arithmetic (P and dS rounded
// for the tensor cores, bf16 outputs), hence the 2e-2 relative tolerance. Every output buffer is
// poisoned with 0xFF bytes (NaN in bf16 and fp32) before a run, so an element left unwritten, or a
// NaN produced, fails the finiteness check.
//
// Built only in CUDA builds. Without a device every GPU case skips and main exits 77 (SKIP).
#include <criterion/criterion.h>
#include <criterion/logging.h>
#include <cuda_runtime_api.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "flash_attention.h"
#include "cudatest.h"
#include "testutil.h"

#define TOL 2e-2

// ---- helpers: random numbers, bf16, device buffers

// ||a - b|| / ||b|| over n elements of a (bf16, strided rows) against b (fp32, strided rows):
// rows rows of width w, strides sa and sb. Fails on any non-finite a.
static double rel_err_bf16(const uint16_t *a, size_t sa, const float *b, size_t sb, size_t rows,
                           size_t w, const char *what) {
    double num = 0.0, den = 0.0;
    for (size_t i = 0; i < rows; i++)
        for (size_t j = 0; j < w; j++) {
            double x = tp_bf16_to_f32(a[i * sa + j]), y = b[i * sb + j];
            cr_assert(isfinite(x), "%s: element (%zu, %zu) is not finite (unwritten or NaN)", what,
                      i, j);
            num += (x - y) * (x - y);
            den += y * y;
        }
    return sqrt(num) / (den > 0.0 ? sqrt(den) : 1.0);
}

// ---- one case: fwd + bwd against the CPU reference

struct fa_bufs {
    uint16_t *qkv, *out, *dout, *dqkv; // device bf16: (B, T, 3C), (B, T, C), (B, T, C), (B, T, 3C)
    float *lse, *scratch;              // device: (B, NH, T), bwd scratch
};

// Device buffers for one (B, T, NH) problem, and their release.
static struct fa_bufs fa_bufs_alloc(int B, int T, int NH, int HS) {
    size_t BT = (size_t)B * T, C = (size_t)NH * HS;
    struct fa_bufs d;
    d.qkv = ct_alloc(BT * 3 * C * 2);
    d.out = ct_alloc(BT * C * 2);
    d.dout = ct_alloc(BT * C * 2);
    d.dqkv = ct_alloc(BT * 3 * C * 2);
    d.lse = ct_alloc((size_t)B * NH * T * 4);
    d.scratch = ct_alloc(flash_attention_bwd_scratch_floats(B, T, NH, HS) * 4);
    return d;
}

static void fa_bufs_free(struct fa_bufs *d) {
    void *all[] = {d->qkv, d->out, d->dout, d->dqkv, d->lse, d->scratch};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) cudaFree(all[i]);
}

static void run_gpu(const struct fa_bufs *d, int B, int T, int NH, int HS) {
    int C = NH * HS;
    size_t BT = (size_t)B * T;
    ct_poison(d->out, BT * C * 2);
    ct_poison(d->lse, (size_t)B * NH * T * 4);
    ct_poison(d->dqkv, BT * 3 * C * 2);
    int rc = flash_attention_fwd(NULL, d->out, d->lse, d->qkv, d->qkv + C, d->qkv + 2 * C, B, T, NH,
                                 HS, 3 * C, C);
    cr_assert_eq(rc, FLASH_OK, "flash_attention_fwd returned %d", rc);
    rc = flash_attention_bwd(NULL, d->dqkv, d->dqkv + C, d->dqkv + 2 * C, d->dout, d->qkv,
                             d->qkv + C, d->qkv + 2 * C, d->out, d->lse, d->scratch, B, T, NH, HS,
                             3 * C, C);
    cr_assert_eq(rc, FLASH_OK, "flash_attention_bwd returned %d", rc);
    cudaError_t e = cudaDeviceSynchronize();
    cr_assert_eq(e, cudaSuccess, "kernel failed: %s", cudaGetErrorString(e));
}

static void check_case(int B, int NH, int T, int HS, uint64_t seed) {
    ct_require_gpu("the flash-attention kernels");
    int C = NH * HS;
    size_t BT = (size_t)B * T, nqkv = BT * 3 * C, nout = BT * C, nlse = (size_t)B * NH * T;
    uint64_t rng = seed;

    // host inputs, rounded to bf16 once
    uint16_t *qkv_h = malloc(nqkv * 2), *dout_h = malloc(nout * 2); // (B, T, 3C), (B, T, C)
    float *qkv_f = malloc(nqkv * 4), *dout_f = malloc(nout * 4);    // same values in fp32
    cr_assert(qkv_h && dout_h && qkv_f && dout_f);
    for (size_t i = 0; i < nqkv; i++) {
        qkv_h[i] = tp_bf16_from_f32(tu_rng_normal(&rng));
        qkv_f[i] = tp_bf16_to_f32(qkv_h[i]);
    }
    for (size_t i = 0; i < nout; i++) {
        dout_h[i] = tp_bf16_from_f32(tu_rng_normal(&rng));
        dout_f[i] = tp_bf16_to_f32(dout_h[i]);
    }

    // CPU reference
    struct backend cpu = backend_cpu_create(TP_DTYPE_F32);
    const struct backend_i *ci = cpu.iface;
    size_t nsaved = ci->attention_saved_floats(cpu.ctx, B, T, NH, HS);
    size_t nscr = ci->attention_scratch_floats(cpu.ctx, B, T, NH, HS);
    float *c_qkv = ci->alloc(cpu.ctx, nqkv * 4), *c_out = ci->alloc(cpu.ctx, nout * 4);
    float *c_saved = ci->alloc(cpu.ctx, nsaved * 4), *c_scr = ci->alloc(cpu.ctx, (nscr + 1) * 4);
    float *c_dout = ci->alloc(cpu.ctx, nout * 4), *c_dqkv = ci->alloc(cpu.ctx, nqkv * 4);
    ci->copy_to_device(cpu.ctx, c_qkv, qkv_f, nqkv * 4);
    ci->copy_to_device(cpu.ctx, c_dout, dout_f, nout * 4);
    ci->attention_fwd(cpu.ctx, c_out, c_saved, c_scr, c_qkv, B, T, NH, HS);
    ci->attention_bwd(cpu.ctx, c_dqkv, NULL, c_scr, c_dout, c_qkv, c_out, c_saved, B, T, NH, HS);
    float *ref_out = malloc(nout * 4), *ref_dqkv = malloc(nqkv * 4);
    cr_assert(ref_out && ref_dqkv);
    ci->copy_to_host(cpu.ctx, ref_out, c_out, nout * 4);
    ci->copy_to_host(cpu.ctx, ref_dqkv, c_dqkv, nqkv * 4);

    // GPU
    struct fa_bufs d = fa_bufs_alloc(B, T, NH, HS);
    cr_assert_geq(flash_attention_bwd_scratch_floats(B, T, NH, HS), nlse,
                  "scratch must at least hold D (B, NH, T)");
    ct_upload(d.qkv, qkv_h, nqkv * 2);
    ct_upload(d.dout, dout_h, nout * 2);
    run_gpu(&d, B, T, NH, HS);

    uint16_t *g_out = malloc(nout * 2), *g_dqkv = malloc(nqkv * 2);
    float *g_lse = malloc(nlse * 4);
    cr_assert(g_out && g_dqkv && g_lse);
    ct_download(g_out, d.out, nout * 2);
    ct_download(g_dqkv, d.dqkv, nqkv * 2);
    ct_download(g_lse, d.lse, nlse * 4);

    double e_out = rel_err_bf16(g_out, C, ref_out, C, BT, C, "out");
    double e_dq = rel_err_bf16(g_dqkv, 3 * C, ref_dqkv, 3 * C, BT, C, "dq");
    double e_dk = rel_err_bf16(g_dqkv + C, 3 * C, ref_dqkv + C, 3 * C, BT, C, "dk");
    double e_dv = rel_err_bf16(g_dqkv + 2 * C, 3 * C, ref_dqkv + 2 * C, 3 * C, BT, C, "dv");
    cr_log_info("B=%d NH=%d T=%d HS=%d: rel err out %.3g dq %.3g dk %.3g dv %.3g", B, NH, T, HS,
                e_out, e_dq, e_dk, e_dv);
    cr_expect_lt(e_out, TOL, "out: relative error %g", e_out);
    cr_expect_lt(e_dq, TOL, "dq: relative error %g", e_dq);
    cr_expect_lt(e_dk, TOL, "dk: relative error %g", e_dk);
    cr_expect_lt(e_dv, TOL, "dv: relative error %g", e_dv);

    // lse (B, NH, T) = log sum_{t2 <= t} exp(q . k * scale), in double from the bf16 inputs
    double scale = 1.0 / sqrt((double)HS), worst = 0.0;
    double *srow = malloc((size_t)T * sizeof(double));
    cr_assert(srow);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++)
            for (int t = 0; t < T; t++) {
                const float *qr = qkv_f + ((size_t)b * T + t) * 3 * C + (size_t)h * HS;
                double mx = -INFINITY;
                for (int t2 = 0; t2 <= t; t2++) {
                    const float *kr = qkv_f + ((size_t)b * T + t2) * 3 * C + C + (size_t)h * HS;
                    double s = 0.0;
                    for (int i = 0; i < HS; i++) s += (double)qr[i] * kr[i];
                    srow[t2] = s * scale;
                    if (srow[t2] > mx) mx = srow[t2];
                }
                double sum = 0.0;
                for (int t2 = 0; t2 <= t; t2++) sum += exp(srow[t2] - mx);
                double want = mx + log(sum);
                double got = g_lse[((size_t)b * NH + h) * T + t];
                cr_assert(isfinite(got), "lse (%d, %d, %d) not finite (unwritten or NaN)", b, h, t);
                double err = fabs(got - want) / fmax(1.0, fabs(want));
                if (err > worst) worst = err;
            }
    cr_log_info("B=%d NH=%d T=%d HS=%d: lse worst relative error %.3g", B, NH, T, HS, worst);
    cr_expect_lt(worst, 1e-3, "lse: worst relative error %g", worst);

    // determinism: a second run (after fresh poisoning) is bitwise equal
    uint16_t *g_out2 = malloc(nout * 2), *g_dqkv2 = malloc(nqkv * 2);
    float *g_lse2 = malloc(nlse * 4);
    cr_assert(g_out2 && g_dqkv2 && g_lse2);
    run_gpu(&d, B, T, NH, HS);
    ct_download(g_out2, d.out, nout * 2);
    ct_download(g_dqkv2, d.dqkv, nqkv * 2);
    ct_download(g_lse2, d.lse, nlse * 4);
    cr_expect(memcmp(g_out, g_out2, nout * 2) == 0, "out differs between two runs");
    cr_expect(memcmp(g_lse, g_lse2, nlse * 4) == 0, "lse differs between two runs");
    cr_expect(memcmp(g_dqkv, g_dqkv2, nqkv * 2) == 0, "dq/dk/dv differ between two runs");

    free(srow);
    free(g_out2);
    free(g_dqkv2);
    free(g_lse2);
    free(g_out);
    free(g_dqkv);
    free(g_lse);
    fa_bufs_free(&d);
    free(ref_out);
    free(ref_dqkv);
    ci->free(cpu.ctx, c_qkv);
    ci->free(cpu.ctx, c_out);
    ci->free(cpu.ctx, c_saved);
    ci->free(cpu.ctx, c_scr);
    ci->free(cpu.ctx, c_dout);
    ci->free(cpu.ctx, c_dqkv);
    backend_destroy(&cpu);
    free(qkv_h);
    free(dout_h);
    free(qkv_f);
    free(dout_f);
}

// ---- cases
//
// Head sizes 64, 128 and 256 are the kernels' own widths; 32, 80 and 96 run padded inside them.
// T covers one row, ragged tails (17, 1000), exact tiles and a long sequence.

Test(flash_attention, hs64_one_tile) { check_case(1, 1, 64, 64, 11); }
Test(flash_attention, hs64_two_tiles) { check_case(2, 3, 128, 64, 12); }
Test(flash_attention, hs64_ragged_T1000) { check_case(1, 2, 1000, 64, 13); }
Test(flash_attention, hs64_T1024) { check_case(2, 2, 1024, 64, 14); }
Test(flash_attention, hs64_T1_and_T17) {
    check_case(1, 1, 1, 64, 15);
    check_case(2, 1, 17, 64, 16);
}
Test(flash_attention, hs64_T4096) { check_case(1, 1, 4096, 64, 17); }
// a quarter of the forward's exponentials by a polynomial (TPTRAIN_ATTN_EXP2=mixed), against the
// reference; the backward then recomputes the probabilities by the multi-function unit
Test(flash_attention, hs64_exp2_mixed) {
    flash_attention_set_hopper_exp2(1);
    check_case(2, 2, 1024, 64, 18);
    check_case(1, 3, 1000, 64, 19);
    check_case(1, 1, 17, 64, 20);
    flash_attention_set_hopper_exp2(0);
}
Test(flash_attention, hs32) {
    check_case(1, 1, 1, 32, 21);
    check_case(2, 3, 17, 32, 22);
    check_case(2, 2, 64, 32, 23);
    check_case(1, 2, 1000, 32, 24);
}
Test(flash_attention, hs80) {
    check_case(1, 1, 1, 80, 31);
    check_case(2, 2, 17, 80, 32);
    check_case(1, 2, 1000, 80, 33);
    check_case(1, 1, 1024, 80, 34);
}
Test(flash_attention, hs96) { check_case(2, 2, 200, 96, 41); }
Test(flash_attention, hs128) {
    check_case(1, 1, 1, 128, 51);
    check_case(2, 3, 17, 128, 52);
    check_case(2, 2, 64, 128, 53);
    check_case(1, 2, 1000, 128, 54);
    check_case(2, 2, 1024, 128, 55);
}
Test(flash_attention, hs128_T4096) { check_case(1, 1, 4096, 128, 56); }
// More (head, tile) items than an H200 has multiprocessors, so each persistent Hopper block walks
// several (forward: 256 and 320 items; backward at T 1024: as many key blocks).
Test(flash_attention, many_items_per_block) {
    check_case(8, 4, 1024, 64, 57);
    check_case(4, 10, 1024, 128, 58);
}
Test(flash_attention, hs256) {
    check_case(1, 1, 1, 256, 61);
    check_case(2, 2, 17, 256, 62);
    check_case(1, 2, 1000, 256, 63);
    check_case(1, 1, 1024, 256, 64);
}

// The Hopper kernels (where this device runs them) and the portable ones compute the same function:
// outputs and gradients within bf16 rounding of each other, log-sum-exp within fp32 rounding.
static void compare_paths(int B, int NH, int T, int HS, uint64_t seed) {
    ct_require_gpu("the flash-attention kernels");
    int C = NH * HS;
    size_t BT = (size_t)B * T, nqkv = BT * 3 * C, nout = BT * C, nlse = (size_t)B * NH * T;
    uint64_t rng = seed;
    uint16_t *h = malloc(nqkv * 2), *o1 = malloc(nout * 2), *o2 = malloc(nout * 2);
    uint16_t *g1 = malloc(nqkv * 2), *g2 = malloc(nqkv * 2), *o3 = malloc(nout * 2);
    float *l1 = malloc(nlse * 4), *l2 = malloc(nlse * 4), *o2f = malloc(nout * 4);
    float *g2f = malloc(nqkv * 4);
    cr_assert(h && o1 && o2 && o3 && g1 && g2 && l1 && l2 && o2f && g2f);
    for (size_t i = 0; i < nqkv; i++) h[i] = tp_bf16_from_f32(tu_rng_normal(&rng));
    flash_attention_set_hopper_bwd_fused(1); // scratch sized for every pass (the default's is largest)
    struct fa_bufs d = fa_bufs_alloc(B, T, NH, HS);
    ct_upload(d.qkv, h, nqkv * 2);
    ct_upload(d.dout, h + nqkv - nout, nout * 2); // any bf16 values serve as dout
    // pass 0: the default path; 1: portable; 2: on Hopper, the cp.async kernels instead of the
    // warp-specialised ones; 3: the warp-specialised backward in two kernels instead of one (passes
    // 2 and 3 must equal pass 0 within rounding too)
    uint16_t *g3 = malloc(nqkv * 2), *g4 = malloc(nqkv * 2);
    cr_assert(g3 && g4);
    for (int pass = 0; pass < 4; pass++) {
        flash_attention_force_portable(pass == 1);
        flash_attention_set_hopper_ws(pass != 2);
        flash_attention_set_hopper_bwd_fused(pass != 3);
        run_gpu(&d, B, T, NH, HS);
        if (pass < 3) ct_download(pass == 1 ? o2 : pass == 0 ? o1 : o3, d.out, nout * 2);
        if (pass < 2) ct_download(pass ? l2 : l1, d.lse, nlse * 4);
        if (pass < 2) ct_download(pass ? g2 : g1, d.dqkv, nqkv * 2);
        if (pass >= 2) {
            ct_download(g3, d.dqkv, nqkv * 2);
            for (size_t i = 0; i < nqkv; i++) g2f[i] = tp_bf16_to_f32(g3[i]);
            double e = rel_err_bf16(g1, 3 * C, g2f, 3 * C, BT, 3 * C,
                                    pass == 2 ? "dqkv (cp.async backward)" : "dqkv (two-kernel backward)");
            cr_expect_lt(e, 1e-2, "dqkv: pass %d and the default path differ by %g", pass, e);
        }
        if (pass == 0) { // the default backward (on Hopper the key-block-ordered dq sums): same bits again
            run_gpu(&d, B, T, NH, HS);
            ct_download(g4, d.dqkv, nqkv * 2);
            cr_expect(memcmp(g4, g1, nqkv * 2) == 0, "the default backward differs between two runs");
        }
        if (pass == 0) cr_log_info("HS=%d path: %s", HS, flash_attention_path(HS));
    }
    flash_attention_force_portable(0);
    flash_attention_set_hopper_ws(1);
    flash_attention_set_hopper_bwd_fused(1);
    free(g3);
    free(g4);
    for (size_t i = 0; i < nout; i++) o2f[i] = tp_bf16_to_f32(o3[i]);
    double e3 = rel_err_bf16(o1, C, o2f, C, BT, C, "out (cp.async forward)");
    cr_expect_lt(e3, 1e-2, "out: the two Hopper forwards differ by %g", e3);
    // the warp-specialised forward without ping-pong does the same arithmetic in the same order
    flash_attention_set_hopper_pingpong(0);
    run_gpu(&d, B, T, NH, HS);
    flash_attention_set_hopper_pingpong(1);
    ct_download(o3, d.out, nout * 2);
    cr_expect(memcmp(o1, o3, nout * 2) == 0, "the forward with and without ping-pong differ");
    // each forward walk forced (pairs of one head; longest first across heads), with one stage of
    // Q tiles and with two: every item's arithmetic is the same, so the default's bits every way
    float *l3 = malloc(nlse * 4);
    cr_assert(l3);
    for (int order = 0; order < 2; order++)
        for (int qs = 1; qs <= 2; qs++) {
            flash_attention_set_hopper_order(order);
            flash_attention_set_hopper_q_stages(qs);
            run_gpu(&d, B, T, NH, HS);
            ct_download(o3, d.out, nout * 2);
            ct_download(l3, d.lse, nlse * 4);
            cr_expect(memcmp(o1, o3, nout * 2) == 0,
                      "the forward walking %s with %d Q stage(s) differs from the default",
                      order ? "pairs" : "longest first", qs);
            cr_expect(memcmp(l1, l3, nlse * 4) == 0,
                      "the log-sum-exp walking %s with %d Q stage(s) differs from the default",
                      order ? "pairs" : "longest first", qs);
        }
    flash_attention_set_hopper_order(-1);
    flash_attention_set_hopper_q_stages(1);
    // a quarter of the forward's exponentials by the polynomial: at head size 64 on the
    // warp-specialised kernel other bits within rounding of the default; elsewhere the same bits
    flash_attention_set_hopper_exp2(1);
    bool mixed = strstr(flash_attention_path(HS), "exp2 mixed") != NULL;
    run_gpu(&d, B, T, NH, HS);
    flash_attention_set_hopper_exp2(0);
    ct_download(o3, d.out, nout * 2);
    ct_download(l3, d.lse, nlse * 4);
    if (mixed) {
        for (size_t i = 0; i < nout; i++) o2f[i] = tp_bf16_to_f32(o1[i]);
        double em = rel_err_bf16(o3, C, o2f, C, BT, C, "out (exp2 mixed)");
        double lm = 0.0;
        for (size_t i = 0; i < nlse; i++) lm = fmax(lm, fabs((double)l3[i] - l1[i]) / fmax(1.0, fabs((double)l1[i])));
        cr_log_info("HS=%d exp2 mixed against the default: out %.3g, lse %.3g", HS, em, lm);
        cr_expect_lt(em, 1e-2, "out: exp2 mixed differs from the default by %g", em);
        cr_expect_lt(lm, 2e-4, "lse: exp2 mixed differs from the default by %g", lm);
        cr_expect(memcmp(o1, o3, nout * 2) != 0, "exp2 mixed gave the default's bits: the polynomial did not run");
    } else {
        cr_expect(memcmp(o1, o3, nout * 2) == 0 && memcmp(l1, l3, nlse * 4) == 0,
                  "exp2 mixed changed the forward where it does not apply (HS %d: %s)", HS, flash_attention_path(HS));
    }
    free(l3);
    // each backward walk forced: whole heads (tiles from the last one down) twice, then longest
    // first. dq's partials are added in the same key-block order, so dq has the same bits in both;
    // dk and dv sum their tiles in another order (within rounding), the same bits run after run;
    // the default is one of the two, bit for bit
    uint16_t *h1 = malloc(nqkv * 2), *h2 = malloc(nqkv * 2);
    cr_assert(h1 && h2);
    flash_attention_set_hopper_bwd_order(1);
    run_gpu(&d, B, T, NH, HS);
    ct_download(h1, d.dqkv, nqkv * 2);
    run_gpu(&d, B, T, NH, HS);
    ct_download(h2, d.dqkv, nqkv * 2);
    cr_expect(memcmp(h1, h2, nqkv * 2) == 0, "the heads-walk backward differs between two runs");
    // a second stage of K and V tiles (head size 64; one stage elsewhere) changes no arithmetic:
    // the same bits, both walks
    uint16_t *h3 = malloc(nqkv * 2);
    cr_assert(h3);
    flash_attention_set_hopper_kv_stages(2);
    run_gpu(&d, B, T, NH, HS);
    ct_download(h3, d.dqkv, nqkv * 2);
    cr_expect(memcmp(h1, h3, nqkv * 2) == 0, "the heads-walk backward with two K/V stages differs from one");
    flash_attention_set_hopper_bwd_order(0);
    run_gpu(&d, B, T, NH, HS);
    ct_download(h3, d.dqkv, nqkv * 2);
    flash_attention_set_hopper_kv_stages(1);
    run_gpu(&d, B, T, NH, HS);
    ct_download(h2, d.dqkv, nqkv * 2);
    cr_expect(memcmp(h2, h3, nqkv * 2) == 0, "the longest-first backward with two K/V stages differs from one");
    free(h3);
    flash_attention_set_hopper_bwd_order(-1);
    cr_expect(memcmp(h1, g1, nqkv * 2) == 0 || memcmp(h2, g1, nqkv * 2) == 0,
              "the default backward is neither forced walk, bit for bit");
    for (size_t r = 0; r < BT; r++)
        if (memcmp(h1 + r * 3 * C, h2 + r * 3 * C, (size_t)C * 2) != 0) {
            cr_expect(false, "dq of row %zu differs between the heads walk and the longest-first walk", r);
            break;
        }
    for (size_t i = 0; i < nqkv; i++) g2f[i] = tp_bf16_to_f32(h1[i]);
    double eh = rel_err_bf16(h2, 3 * C, g2f, 3 * C, BT, 3 * C, "dqkv (heads walk against longest first)");
    cr_expect_lt(eh, 1e-2, "dqkv: the two backward walks differ by %g", eh);
    free(h1);
    free(h2);
    for (size_t i = 0; i < nout; i++) o2f[i] = tp_bf16_to_f32(o2[i]);
    for (size_t i = 0; i < nqkv; i++) g2f[i] = tp_bf16_to_f32(g2[i]);
    double e = rel_err_bf16(o1, C, o2f, C, BT, C, "out (default path)");
    double eg = rel_err_bf16(g1, 3 * C, g2f, 3 * C, BT, 3 * C, "dqkv (default path)");
    double worst = 0.0;
    for (size_t i = 0; i < nlse; i++) {
        cr_assert(isfinite(l1[i]), "lse %zu not finite", i);
        double r = fabs((double)l1[i] - l2[i]) / fmax(1.0, fabs((double)l2[i]));
        if (r > worst) worst = r;
    }
    cr_log_info("B=%d NH=%d T=%d HS=%d: default vs portable path: out %.3g, lse %.3g, dqkv %.3g",
                B, NH, T, HS, e, worst, eg);
    cr_expect_lt(e, 1e-2, "out: default and portable paths differ by %g", e);
    cr_expect_lt(eg, 1e-2, "dqkv: default and portable paths differ by %g", eg);
    cr_expect_lt(worst, 1e-5, "lse: default and portable paths differ by %g", worst);
    fa_bufs_free(&d);
    free(h);
    free(o1);
    free(o2);
    free(l1);
    free(l2);
    free(o2f);
    free(g1);
    free(g2);
    free(g2f);
    free(o3);
}

Test(flash_attention, hopper_matches_portable) {
    compare_paths(2, 3, 1000, 64, 71);
    compare_paths(2, 2, 1024, 128, 72);
    compare_paths(1, 6, 2000, 128, 75); // a partial last tile, several key blocks per head
    compare_paths(8, 20, 1100, 64, 76);  // 9 query tiles (the middle one unpaired), > 132 blocks' work
    compare_paths(2, 40, 1100, 128, 77); // the same at head size 128 (ping-pong)
    compare_paths(1, 2, 4200, 128, 78);  // beyond T 4096: the default backward walks longest first
    compare_paths(1, 2, 300, 80, 73);
    compare_paths(1, 1, 17, 32, 74);
}

// flash_attention_bwd_summing: where the one-kernel Hopper backward runs it adds the column sums of
// dq, dk and dv as stored to dsum (and says so); elsewhere it leaves dsum alone. Checked against
// the sums of the downloaded gradients, with each backward walk and both K/V stage counts, twice
// (the same bits: a fixed order).
static void check_sums(int B, int NH, int T, int HS, uint64_t seed) {
    ct_require_gpu("the flash-attention kernels");
    int C = NH * HS;
    size_t BT = (size_t)B * T, nqkv = BT * 3 * C;
    uint64_t rng = seed;
    uint16_t *h = malloc(nqkv * 2), *g = malloc(nqkv * 2);
    float *s0 = malloc((size_t)3 * C * 4), *s1 = malloc((size_t)3 * C * 4), *s2 = malloc((size_t)3 * C * 4);
    double *want = malloc((size_t)3 * C * sizeof(double));
    cr_assert(h && g && s0 && s1 && s2 && want);
    for (size_t i = 0; i < nqkv; i++) h[i] = tp_bf16_from_f32(tu_rng_normal(&rng));
    for (int c = 0; c < 3 * C; c++) s0[c] = (float)tu_rng_normal(&rng);
    struct fa_bufs d = fa_bufs_alloc(B, T, NH, HS);
    float *sums = ct_alloc(flash_attention_bwd_sums_floats(B, T, NH, HS) * 4), *dsum = ct_alloc((size_t)3 * C * 4);
    ct_upload(d.qkv, h, nqkv * 2);
    ct_upload(d.dout, h + nqkv - BT * C, BT * C * 2);
    bool hopper = strstr(flash_attention_path(HS), "TMA + ws") && !strstr(flash_attention_path(HS), "bwd split");
    for (int walk = 0; walk < 2; walk++)
        for (int kvs = 1; kvs <= 2; kvs++) {
            flash_attention_set_hopper_bwd_order(walk);
            flash_attention_set_hopper_kv_stages(kvs);
            for (int rep = 0; rep < 2; rep++) {
                run_gpu(&d, B, T, NH, HS); // the forward's lse and out, and a backward
                ct_upload(dsum, s0, (size_t)3 * C * 4);
                int summed = -1;
                int rc = flash_attention_bwd_summing(NULL, d.dqkv, d.dqkv + C, d.dqkv + 2 * C, d.dout, d.qkv,
                                                     d.qkv + C, d.qkv + 2 * C, d.out, d.lse, d.scratch, B, T, NH,
                                                     HS, 3 * C, C, dsum, sums, &summed);
                cr_assert_eq(rc, FLASH_OK, "flash_attention_bwd_summing returned %d", rc);
                cr_assert_eq(cudaDeviceSynchronize(), cudaSuccess);
                cr_expect_eq(summed, hopper, "HS %d (%s): summed %d", HS, flash_attention_path(HS), summed);
                ct_download(g, d.dqkv, nqkv * 2);
                ct_download(rep ? s2 : s1, dsum, (size_t)3 * C * 4);
            }
            cr_expect(memcmp(s1, s2, (size_t)3 * C * 4) == 0, "the sums differ between two runs (walk %d, %d "
                      "K/V stages)", walk, kvs);
            double dm = 0.0, wm = 0.0;
            for (int c = 0; c < 3 * C; c++) want[c] = s0[c]; // untouched where nothing was summed
            for (size_t r = 0; hopper && r < BT; r++)
                for (int c = 0; c < 3 * C; c++) want[c] += tp_bf16_to_f32(g[r * 3 * C + c]);
            for (int c = 0; c < 3 * C; c++) {
                dm = fmax(dm, fabs(s1[c] - want[c]));
                wm = fmax(wm, fabs(want[c]));
            }
            cr_expect(dm <= 1e-5 * wm, "B=%d NH=%d T=%d HS=%d walk %d, %d K/V stages: sums off by %.3g", B, NH, T,
                      HS, walk, kvs, dm / wm);
        }
    flash_attention_set_hopper_bwd_order(-1);
    flash_attention_set_hopper_kv_stages(1);
    fa_bufs_free(&d);
    cudaFree(sums);
    cudaFree(dsum);
    free(h);
    free(g);
    free(s0);
    free(s1);
    free(s2);
    free(want);
}

Test(flash_attention, bwd_sums) {
    check_sums(2, 3, 1000, 64, 91);  // a partial last tile and 16-row group
    check_sums(1, 2, 1100, 128, 92);
    check_sums(8, 20, 1100, 64, 93); // more items than multiprocessors
    check_sums(1, 1, 17, 64, 94);
    check_sums(1, 2, 300, 80, 95);   // padded: no sums inside, dsum untouched
}

// Rejected arguments return FLASH_EBADARG before anything is launched, so no device is needed.
Test(flash_attention, rejects_bad_args) {
    _Alignas(16) static uint16_t buf[64 * 3 * 512];
    float lse[64], scratch[64];
    cr_expect_eq(flash_attention_fwd(NULL, buf, lse, buf, buf, buf, 1, 8, 1, 36, 108, 36),
                 FLASH_EBADARG, "HS = 36 (not a multiple of 8) must be refused");
    cr_expect_eq(flash_attention_fwd(NULL, buf, lse, buf, buf, buf, 1, 8, 1, 264, 792, 264),
                 FLASH_EBADARG, "HS = 264 (over 256) must be refused");
    cr_expect_eq(flash_attention_fwd(NULL, buf, lse, buf, buf, buf, 1, 0, 1, 64, 192, 64),
                 FLASH_EBADARG, "T = 0 must be refused");
    cr_expect_eq(flash_attention_fwd(NULL, buf, lse, buf + 1, buf, buf, 1, 8, 1, 64, 192, 64),
                 FLASH_EBADARG, "a misaligned q must be refused");
    cr_expect_eq(flash_attention_bwd(NULL, buf, buf, buf, buf, buf, buf, buf, buf, lse, scratch, 1,
                                     8, 1, 4, 12, 4),
                 FLASH_EBADARG, "HS = 4 must be refused");
    cr_expect(flash_attention_supported(32) && flash_attention_supported(80) &&
              flash_attention_supported(128) && flash_attention_supported(256));
    cr_expect(!flash_attention_supported(0) && !flash_attention_supported(12) &&
              !flash_attention_supported(512));
}

// forward + backward at B=16, NH=12, T=1024 (GPT-2 124M, one rank): median of 20 after 3 warm-ups
Test(flash_attention, timing_gpt2) {
    ct_require_gpu("the flash-attention kernels");
    int B = 16, NH = 12, T = 1024, HS = 64, C = NH * HS;
    size_t BT = (size_t)B * T, nqkv = BT * 3 * C, nout = BT * C;
    uint64_t rng = 99;
    uint16_t *h = malloc(nqkv * 2);
    cr_assert(h);
    for (size_t i = 0; i < nqkv; i++) h[i] = tp_bf16_from_f32(tu_rng_normal(&rng));
    struct fa_bufs d = fa_bufs_alloc(B, T, NH, HS);
    ct_upload(d.qkv, h, nqkv * 2);
    ct_upload(d.dout, h, nout * 2); // any finite values serve as dout
    cudaEvent_t e0, e1, e2;
    cr_assert_eq(cudaEventCreate(&e0), cudaSuccess);
    cr_assert_eq(cudaEventCreate(&e1), cudaSuccess);
    cr_assert_eq(cudaEventCreate(&e2), cudaSuccess);
    float fwd_ms[20], tot_ms[20];
    for (int it = 0; it < 23; it++) {
        cudaEventRecord(e0, NULL);
        int rc = flash_attention_fwd(NULL, d.out, d.lse, d.qkv, d.qkv + C, d.qkv + 2 * C, B, T, NH,
                                     HS, 3 * C, C);
        cudaEventRecord(e1, NULL);
        int rc2 = flash_attention_bwd(NULL, d.dqkv, d.dqkv + C, d.dqkv + 2 * C, d.dout, d.qkv,
                                      d.qkv + C, d.qkv + 2 * C, d.out, d.lse, d.scratch, B, T, NH,
                                      HS, 3 * C, C);
        cudaEventRecord(e2, NULL);
        cr_assert(rc == FLASH_OK && rc2 == FLASH_OK, "launch failed: %d %d", rc, rc2);
        cr_assert_eq(cudaEventSynchronize(e2), cudaSuccess);
        if (it >= 3) {
            cudaEventElapsedTime(&fwd_ms[it - 3], e0, e1);
            cudaEventElapsedTime(&tot_ms[it - 3], e0, e2);
        }
    }
    // insertion sort, then the median
    for (int i = 1; i < 20; i++)
        for (int j = i; j > 0 && tot_ms[j] < tot_ms[j - 1]; j--) {
            float t = tot_ms[j];
            tot_ms[j] = tot_ms[j - 1];
            tot_ms[j - 1] = t;
        }
    for (int i = 1; i < 20; i++)
        for (int j = i; j > 0 && fwd_ms[j] < fwd_ms[j - 1]; j--) {
            float t = fwd_ms[j];
            fwd_ms[j] = fwd_ms[j - 1];
            fwd_ms[j - 1] = t;
        }
    float fwd = 0.5f * (fwd_ms[9] + fwd_ms[10]), tot = 0.5f * (tot_ms[9] + tot_ms[10]);
    // causal attention: 4 * B * NH * T^2/2 * HS flops forward, 2.5x that backward
    double fl_fwd = 2.0 * B * NH * (double)T * T * HS;
    cr_log_info("flash attention B=16 NH=12 T=1024 HS=64: fwd %.3f ms (%.1f TFLOP/s), fwd+bwd "
                "%.3f ms, bwd %.3f ms",
                fwd, fl_fwd / (fwd * 1e9), tot, tot - fwd);
    fprintf(stderr,
            "flash attention B=16 NH=12 T=1024: fwd %.3f ms, fwd+bwd %.3f ms (median of 20)\n",
            fwd, tot);
    cr_expect(tot > 0.0f);
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    cudaEventDestroy(e2);
    fa_bufs_free(&d);
    free(h);
}

int main(int argc, char *argv[]) { return tu_gpu_suite_main(argc, argv, "test_flash_attention"); }
