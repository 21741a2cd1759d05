// test_cpu_ops.c: the CPU reference backend against float64 references and finite differences.
//
// Forward ops are checked against double-precision versions written here. Backward ops are checked
// against central differences of those double forwards, for the scalar L = sum(out * R) with a
// fixed random R that the backend receives as dout. Errors are relative norms over a tensor.
#include <criterion/criterion.h>
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "backend.h"
#include "common.h"

#define FWD_TOL 1e-5 // fp32 forward vs float64
#define BWD_TOL 1e-4 // fp32 gradient vs central differences of the float64 forward
#define FD_STEP 1e-5

// ---- helpers

struct rng {
    uint64_t s;
};

static uint64_t rng_next(struct rng *r) { // splitmix64
    uint64_t z = (r->s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static double rng_unif(struct rng *r) { // [-1, 1)
    return (double)(rng_next(r) >> 11) * 0x1.0p-52 - 1.0;
}

// Every buffer of a test, freed together at its end.
struct arena {
    void *p[64];
    int n;
};

static void *arena_add(struct arena *a, void *p) {
    cr_assert(a->n < 64, "test arena full");
    a->p[a->n++] = p;
    return p;
}

static float *af(struct arena *a, size_t n) { return arena_add(a, tp_calloc(n, sizeof(float))); }
static double *ad(struct arena *a, size_t n) { return arena_add(a, tp_calloc(n, sizeof(double))); }

static void arena_free(struct arena *a) {
    for (int i = 0; i < a->n; i++) free(a->p[i]);
    a->n = 0;
}

static float *rand_f(struct arena *a, struct rng *r, size_t n, double scale) {
    float *x = af(a, n);
    for (size_t i = 0; i < n; i++) x[i] = (float)(scale * rng_unif(r));
    return x;
}

static float *fill_f(struct arena *a, size_t n, float v) {
    float *x = af(a, n);
    for (size_t i = 0; i < n; i++) x[i] = v;
    return x;
}

static float *copy_f(struct arena *a, const float *src, size_t n) {
    float *x = af(a, n);
    memcpy(x, src, n * sizeof(float));
    return x;
}

static double *to_d(struct arena *a, const float *x, size_t n) {
    double *d = ad(a, n);
    for (size_t i = 0; i < n; i++) d[i] = x[i];
    return d;
}

// ||got - want|| / ||want||
static double rel_err(const float *got, const double *want, size_t n) {
    double num = 0.0, den = 0.0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)got[i] - want[i];
        num += d * d;
        den += want[i] * want[i];
    }
    return sqrt(num) / fmax(sqrt(den), 1e-300);
}

// got - base, the part a "+=" op added
static double rel_err_added(const float *got, const float *base, const double *want, size_t n) {
    double num = 0.0, den = 0.0;
    for (size_t i = 0; i < n; i++) {
        double d = ((double)got[i] - (double)base[i]) - want[i];
        num += d * d;
        den += want[i] * want[i];
    }
    return sqrt(num) / fmax(sqrt(den), 1e-300);
}

static bool all_equal(const float *x, float v, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (x[i] != v) return false;
    return true;
}

typedef double (*objective_fn)(const void *problem);

// Central differences of f with respect to x (n), which f reads through `problem`.
static void fd_grad(objective_fn f, const void *problem, double *x, size_t n, double *grad) {
    for (size_t i = 0; i < n; i++) {
        double keep = x[i];
        x[i] = keep + FD_STEP;
        double lp = f(problem);
        x[i] = keep - FD_STEP;
        double lm = f(problem);
        x[i] = keep;
        grad[i] = (lp - lm) / (2.0 * FD_STEP);
    }
}

#define OPS(be) ((be).iface)

// ---- memory and identity

Test(cpu_ops, identity_and_memory) {
    struct backend be = backend_cpu_create();
    cr_assert_str_eq(OPS(be)->name(be.ctx), "cpu");
    cr_assert(OPS(be)->host_accessible);
    cr_assert_null(OPS(be)->native_stream(be.ctx));
    size_t sizes[] = {0, 1, 3, 64, 1000};
    for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++) {
        unsigned char *p = OPS(be)->alloc(be.ctx, sizes[s]);
        cr_assert_not_null(p);
        cr_assert_eq((uintptr_t)p % 64, 0, "alloc(%zu) not 64-byte aligned", sizes[s]);
        for (size_t i = 0; i < sizes[s]; i++) cr_assert_eq(p[i], 0, "alloc(%zu) not zeroed", sizes[s]);
        OPS(be)->free(be.ctx, p);
    }
    float src[5] = {1, 2, 3, 4, 5}, host[5] = {0};
    float *a = OPS(be)->alloc(be.ctx, sizeof src), *b = OPS(be)->alloc(be.ctx, sizeof src);
    OPS(be)->copy_to_device(be.ctx, a, src, sizeof src);
    OPS(be)->copy(be.ctx, b, a, sizeof src);
    OPS(be)->zero(be.ctx, a, 2 * sizeof(float));
    OPS(be)->synchronize(be.ctx);
    OPS(be)->copy_to_host(be.ctx, host, b, sizeof src);
    cr_assert(memcmp(host, src, sizeof src) == 0);
    cr_assert(a[0] == 0.0f && a[1] == 0.0f && a[2] == 3.0f);
    OPS(be)->free(be.ctx, a);
    OPS(be)->free(be.ctx, b);
    backend_destroy(&be);
    cr_assert_null(be.iface);
}

// ---- matmul

static void matmul_ref(double *out, const double *inp, const double *w, const double *bias, int N,
                       int IC, int OC) {
    for (int n = 0; n < N; n++)
        for (int o = 0; o < OC; o++) {
            double s = bias ? bias[o] : 0.0;
            for (int i = 0; i < IC; i++) s += inp[(size_t)n * IC + i] * w[(size_t)o * IC + i];
            out[(size_t)n * OC + o] = s;
        }
}

struct matmul_problem {
    int N, IC, OC;
    double *inp, *w, *bias, *R; // (N, IC), (OC, IC), (OC) or NULL, (N, OC)
};

static double matmul_objective(const void *pp) {
    const struct matmul_problem *p = pp;
    double L = 0.0;
    for (int n = 0; n < p->N; n++)
        for (int o = 0; o < p->OC; o++) {
            double s = p->bias ? p->bias[o] : 0.0;
            for (int i = 0; i < p->IC; i++)
                s += p->inp[(size_t)n * p->IC + i] * p->w[(size_t)o * p->IC + i];
            L += s * p->R[(size_t)n * p->OC + o];
        }
    return L;
}

static void check_matmul_fwd(int N, int IC, int OC, bool with_bias, uint64_t seed) {
    struct backend be = backend_cpu_create();
    struct arena a = {0};
    struct rng r = {seed};
    float *inp = rand_f(&a, &r, (size_t)N * IC, 1.0), *w = rand_f(&a, &r, (size_t)OC * IC, 0.5);
    float *bias = with_bias ? rand_f(&a, &r, (size_t)OC, 1.0) : NULL;
    float *out = fill_f(&a, (size_t)N * OC, 1e3f);
    OPS(be)->matmul_fwd(be.ctx, out, inp, w, bias, N, IC, OC);
    double *want = ad(&a, (size_t)N * OC);
    matmul_ref(want, to_d(&a, inp, (size_t)N * IC), to_d(&a, w, (size_t)OC * IC),
               bias ? to_d(&a, bias, (size_t)OC) : NULL, N, IC, OC);
    double e = rel_err(out, want, (size_t)N * OC);
    cr_assert(e < FWD_TOL, "matmul_fwd N=%d IC=%d OC=%d bias=%d: rel err %g", N, IC, OC, with_bias, e);
    arena_free(&a);
    backend_destroy(&be);
}

Test(cpu_ops, matmul_fwd_matches_float64) {
    // Odd shapes exercise the row and column tails of the register tiles; 130 x 600 the full ones.
    int shapes[][3] = {{7, 13, 29}, {1, 1, 1}, {9, 35, 33}, {37, 70, 67}, {130, 64, 600}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        check_matmul_fwd(shapes[s][0], shapes[s][1], shapes[s][2], true, 100 + s);
        check_matmul_fwd(shapes[s][0], shapes[s][1], shapes[s][2], false, 200 + s);
    }
}

static void check_matmul_bwd_fd(int N, int IC, int OC, bool with_bias, bool with_dinp, uint64_t seed) {
    struct backend be = backend_cpu_create();
    struct arena a = {0};
    struct rng r = {seed};
    size_t nI = (size_t)N * IC, nW = (size_t)OC * IC, nO = (size_t)N * OC;
    float *inp = rand_f(&a, &r, nI, 1.0), *w = rand_f(&a, &r, nW, 0.5);
    float *bias = rand_f(&a, &r, (size_t)OC, 1.0), *R = rand_f(&a, &r, nO, 1.0);
    float *dw0 = rand_f(&a, &r, nW, 0.3), *db0 = rand_f(&a, &r, (size_t)OC, 0.3);
    float *dinp = fill_f(&a, nI, 1e3f); // "=": the garbage must be overwritten
    float *dw = copy_f(&a, dw0, nW), *dbias = copy_f(&a, db0, (size_t)OC); // "+="
    OPS(be)->matmul_bwd(be.ctx, with_dinp ? dinp : NULL, dw, with_bias ? dbias : NULL, R, inp, w,
                        N, IC, OC);

    struct matmul_problem p = {N, IC, OC, to_d(&a, inp, nI), to_d(&a, w, nW),
                               with_bias ? to_d(&a, bias, (size_t)OC) : NULL, to_d(&a, R, nO)};
    double *g = ad(&a, nW > nI ? nW : nI);
    fd_grad(matmul_objective, &p, p.w, nW, g);
    double e = rel_err_added(dw, dw0, g, nW);
    cr_assert(e < BWD_TOL, "matmul dw N=%d IC=%d OC=%d: rel err %g", N, IC, OC, e);
    if (with_dinp) {
        fd_grad(matmul_objective, &p, p.inp, nI, g);
        e = rel_err(dinp, g, nI);
        cr_assert(e < BWD_TOL, "matmul dinp N=%d IC=%d OC=%d: rel err %g", N, IC, OC, e);
    } else {
        cr_assert(all_equal(dinp, 1e3f, nI), "dinp was NULL but something was written");
    }
    if (with_bias) {
        fd_grad(matmul_objective, &p, p.bias, (size_t)OC, g);
        e = rel_err_added(dbias, db0, g, (size_t)OC);
        cr_assert(e < BWD_TOL, "matmul dbias N=%d IC=%d OC=%d: rel err %g", N, IC, OC, e);
    } else {
        cr_assert(memcmp(dbias, db0, (size_t)OC * sizeof(float)) == 0, "dbias NULL but changed");
    }
    arena_free(&a);
    backend_destroy(&be);
}

Test(cpu_ops, matmul_bwd_matches_finite_differences) {
    check_matmul_bwd_fd(7, 13, 29, true, true, 1);
    check_matmul_bwd_fd(7, 13, 29, false, true, 2);
    check_matmul_bwd_fd(7, 13, 29, true, false, 3);
    check_matmul_bwd_fd(9, 35, 33, true, true, 4); // full 8x32 tiles plus tails
}

// Larger shapes against the analytic float64 gradients: OC = 600 spans two K chunks of dinp.
Test(cpu_ops, matmul_bwd_large_matches_float64) {
    int shapes[][3] = {{37, 70, 67}, {130, 64, 600}};
    for (size_t s = 0; s < 2; s++) {
        int N = shapes[s][0], IC = shapes[s][1], OC = shapes[s][2];
        struct backend be = backend_cpu_create();
        struct arena a = {0};
        struct rng r = {50 + s};
        size_t nI = (size_t)N * IC, nW = (size_t)OC * IC, nO = (size_t)N * OC;
        float *inp = rand_f(&a, &r, nI, 1.0), *w = rand_f(&a, &r, nW, 0.5), *R = rand_f(&a, &r, nO, 1.0);
        float *dw0 = rand_f(&a, &r, nW, 1.0), *db0 = rand_f(&a, &r, (size_t)OC, 1.0);
        float *dinp = fill_f(&a, nI, -7.0f), *dw = copy_f(&a, dw0, nW), *db = copy_f(&a, db0, (size_t)OC);
        OPS(be)->matmul_bwd(be.ctx, dinp, dw, db, R, inp, w, N, IC, OC);
        double *gi = ad(&a, nI), *gw = ad(&a, nW), *gb = ad(&a, (size_t)OC);
        for (int n = 0; n < N; n++)
            for (int o = 0; o < OC; o++) {
                double d = R[(size_t)n * OC + o];
                gb[o] += d;
                for (int i = 0; i < IC; i++) {
                    gi[(size_t)n * IC + i] += d * w[(size_t)o * IC + i];
                    gw[(size_t)o * IC + i] += d * inp[(size_t)n * IC + i];
                }
            }
        cr_assert(rel_err(dinp, gi, nI) < FWD_TOL, "dinp %dx%dx%d", N, IC, OC);
        cr_assert(rel_err_added(dw, dw0, gw, nW) < FWD_TOL, "dw %dx%dx%d", N, IC, OC);
        cr_assert(rel_err_added(db, db0, gb, (size_t)OC) < FWD_TOL, "dbias %dx%dx%d", N, IC, OC);
        arena_free(&a);
        backend_destroy(&be);
    }
}

// ---- residual

Test(cpu_ops, residual_fwd_allows_aliasing) {
    struct backend be = backend_cpu_create();
    struct arena a = {0};
    struct rng r = {7};
    int N = 5, C = 11;
    size_t n = (size_t)N * C;
    float *res = rand_f(&a, &r, n, 1.0), *x = rand_f(&a, &r, n, 1.0), *bias = rand_f(&a, &r, (size_t)C, 1.0);
    for (int with_bias = 0; with_bias < 2; with_bias++) {
        const float *bb = with_bias ? bias : NULL;
        float *want = af(&a, n);
        for (size_t i = 0; i < n; i++) want[i] = res[i] + x[i] + (bb ? bb[i % (size_t)C] : 0.0f);
        float *out = fill_f(&a, n, 9.0f);
        OPS(be)->residual_fwd(be.ctx, out, res, x, bb, N, C);
        cr_assert(memcmp(out, want, n * sizeof(float)) == 0, "separate output");
        float *r2 = copy_f(&a, res, n); // out aliases res
        OPS(be)->residual_fwd(be.ctx, r2, r2, x, bb, N, C);
        cr_assert(memcmp(r2, want, n * sizeof(float)) == 0, "out aliasing res");
        float *x2 = copy_f(&a, x, n); // out aliases x
        OPS(be)->residual_fwd(be.ctx, x2, res, x2, bb, N, C);
        cr_assert(memcmp(x2, want, n * sizeof(float)) == 0, "out aliasing x");
    }
    arena_free(&a);
    backend_destroy(&be);
}

// ---- layernorm

struct ln_problem {
    int N, C;
    double *inp, *w, *b, *R;
};

static void layernorm_ref(double *out, double *mean, double *rstd, const double *inp,
                          const double *w, const double *b, int N, int C) {
    for (int n = 0; n < N; n++) {
        const double *x = inp + (size_t)n * C;
        double m = 0.0, v = 0.0;
        for (int c = 0; c < C; c++) m += x[c];
        m /= C;
        for (int c = 0; c < C; c++) v += (x[c] - m) * (x[c] - m);
        double rs = 1.0 / sqrt(v / C + 1e-5);
        for (int c = 0; c < C; c++) out[(size_t)n * C + c] = (x[c] - m) * rs * w[c] + b[c];
        if (mean) mean[n] = m;
        if (rstd) rstd[n] = rs;
    }
}

static double ln_objective(const void *pp) {
    const struct ln_problem *p = pp;
    double *out = tp_malloc((size_t)p->N * p->C * sizeof(double));
    layernorm_ref(out, NULL, NULL, p->inp, p->w, p->b, p->N, p->C);
    double L = 0.0;
    for (size_t i = 0; i < (size_t)p->N * p->C; i++) L += out[i] * p->R[i];
    free(out);
    return L;
}

Test(cpu_ops, layernorm_fwd_bwd) {
    int shapes[][2] = {{6, 19}, {3, 64}};
    for (size_t s = 0; s < 2; s++) {
        int N = shapes[s][0], C = shapes[s][1];
        size_t n = (size_t)N * C;
        struct backend be = backend_cpu_create();
        struct arena a = {0};
        struct rng r = {11 + s};
        float *inp = rand_f(&a, &r, n, 2.0), *w = rand_f(&a, &r, (size_t)C, 1.0);
        float *b = rand_f(&a, &r, (size_t)C, 1.0), *R = rand_f(&a, &r, n, 1.0);
        for (size_t i = 0; i < n; i++) inp[i] += 0.5f; // a non-zero mean
        float *out = af(&a, n), *mean = af(&a, (size_t)N), *rstd = af(&a, (size_t)N);
        OPS(be)->layernorm_fwd(be.ctx, out, mean, rstd, inp, w, b, N, C);
        struct ln_problem p = {N, C, to_d(&a, inp, n), to_d(&a, w, (size_t)C), to_d(&a, b, (size_t)C),
                               to_d(&a, R, n)};
        double *want = ad(&a, n), *wm = ad(&a, (size_t)N), *wr = ad(&a, (size_t)N);
        layernorm_ref(want, wm, wr, p.inp, p.w, p.b, N, C);
        cr_assert(rel_err(out, want, n) < FWD_TOL, "layernorm out C=%d", C);
        cr_assert(rel_err(mean, wm, (size_t)N) < FWD_TOL, "layernorm mean C=%d", C);
        cr_assert(rel_err(rstd, wr, (size_t)N) < FWD_TOL, "layernorm rstd C=%d", C);

        float *di0 = rand_f(&a, &r, n, 1.0), *dw0 = rand_f(&a, &r, (size_t)C, 1.0);
        float *db0 = rand_f(&a, &r, (size_t)C, 1.0);
        float *dinp = copy_f(&a, di0, n), *dw = copy_f(&a, dw0, (size_t)C), *db = copy_f(&a, db0, (size_t)C);
        OPS(be)->layernorm_bwd(be.ctx, dinp, dw, db, R, inp, w, mean, rstd, N, C);
        double *g = ad(&a, n);
        fd_grad(ln_objective, &p, p.inp, n, g);
        double e = rel_err_added(dinp, di0, g, n);
        cr_assert(e < BWD_TOL, "layernorm dinp C=%d: rel err %g", C, e);
        fd_grad(ln_objective, &p, p.w, (size_t)C, g);
        e = rel_err_added(dw, dw0, g, (size_t)C);
        cr_assert(e < BWD_TOL, "layernorm dw C=%d: rel err %g", C, e);
        fd_grad(ln_objective, &p, p.b, (size_t)C, g);
        e = rel_err_added(db, db0, g, (size_t)C);
        cr_assert(e < BWD_TOL, "layernorm db C=%d: rel err %g", C, e);
        arena_free(&a);
        backend_destroy(&be);
    }
}

// ---- GELU

static double gelu_ref(double x) {
    return 0.5 * x * (1.0 + tanh(sqrt(2.0 / M_PI) * (x + 0.044715 * x * x * x)));
}

Test(cpu_ops, gelu_fwd_bwd) {
    struct backend be = backend_cpu_create();
    struct arena a = {0};
    struct rng r = {21};
    size_t n = 301;
    float *x = rand_f(&a, &r, n, 4.0), *dout = rand_f(&a, &r, n, 1.0);
    float *out = af(&a, n), *dinp = af(&a, n);
    OPS(be)->gelu_fwd(be.ctx, out, x, n);
    double *want = ad(&a, n), *g = ad(&a, n);
    for (size_t i = 0; i < n; i++) {
        want[i] = gelu_ref(x[i]);
        double h = FD_STEP;
        g[i] = (gelu_ref((double)x[i] + h) - gelu_ref((double)x[i] - h)) / (2 * h) * dout[i];
    }
    cr_assert(rel_err(out, want, n) < FWD_TOL);
    OPS(be)->gelu_bwd(be.ctx, dinp, x, dout, n);
    double e = rel_err(dinp, g, n);
    cr_assert(e < BWD_TOL, "gelu_bwd rel err %g", e);
    float *alias = copy_f(&a, dout, n); // dinp may alias dout
    OPS(be)->gelu_bwd(be.ctx, alias, x, alias, n);
    cr_assert(memcmp(alias, dinp, n * sizeof(float)) == 0, "gelu_bwd in place differs");
    arena_free(&a);
    backend_destroy(&be);
}

// ---- attention

struct attn_problem {
    int B, T, NH, HS;
    double *qkv, *R; // (B, T, 3*NH*HS), (B, T, NH*HS)
};

// out (B, T, NH*HS) and, if probs is not NULL, probs (B, NH, T, T)
static void attention_ref(double *out, double *probs, const double *qkv, int B, int T, int NH, int HS) {
    size_t C = (size_t)NH * HS, C3 = 3 * C;
    double scale = 1.0 / sqrt((double)HS);
    double *p = tp_malloc((size_t)T * sizeof(double));
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++)
            for (int t = 0; t < T; t++) {
                const double *q = qkv + ((size_t)b * T + t) * C3 + (size_t)h * HS;
                double mx = -INFINITY, sum = 0.0;
                for (int t2 = 0; t2 <= t; t2++) {
                    const double *k = qkv + ((size_t)b * T + t2) * C3 + C + (size_t)h * HS;
                    double s = 0.0;
                    for (int d = 0; d < HS; d++) s += q[d] * k[d];
                    p[t2] = s * scale;
                    mx = fmax(mx, p[t2]);
                }
                for (int t2 = 0; t2 <= t; t2++) sum += (p[t2] = exp(p[t2] - mx));
                double *o = out + ((size_t)b * T + t) * C + (size_t)h * HS;
                for (int d = 0; d < HS; d++) o[d] = 0.0;
                for (int t2 = 0; t2 < T; t2++) {
                    double pr = t2 <= t ? p[t2] / sum : 0.0;
                    if (probs) probs[(((size_t)b * NH + h) * T + t) * T + t2] = pr;
                    if (t2 > t) continue;
                    const double *v = qkv + ((size_t)b * T + t2) * C3 + 2 * C + (size_t)h * HS;
                    for (int d = 0; d < HS; d++) o[d] += pr * v[d];
                }
            }
    free(p);
}

static double attn_objective(const void *pp) {
    const struct attn_problem *p = pp;
    size_t n = (size_t)p->B * p->T * p->NH * p->HS;
    double *out = tp_malloc(n * sizeof(double));
    attention_ref(out, NULL, p->qkv, p->B, p->T, p->NH, p->HS);
    double L = 0.0;
    for (size_t i = 0; i < n; i++) L += out[i] * p->R[i];
    free(out);
    return L;
}

Test(cpu_ops, attention_fwd_bwd) {
    int B = 2, T = 5, NH = 3, HS = 4;
    size_t nqkv = (size_t)B * T * 3 * NH * HS, nout = (size_t)B * T * NH * HS;
    size_t nprob = (size_t)B * NH * T * T;
    struct backend be = backend_cpu_create();
    struct arena a = {0};
    struct rng r = {31};
    float *qkv = rand_f(&a, &r, nqkv, 1.5), *R = rand_f(&a, &r, nout, 1.0);
    size_t nsaved = OPS(be)->attention_saved_floats(be.ctx, B, T, NH, HS);
    size_t nscratch = OPS(be)->attention_scratch_floats(be.ctx, B, T, NH, HS);
    cr_assert(nsaved >= nprob, "saved must hold the probabilities");
    float *saved = fill_f(&a, nsaved, 5.0f), *scratch = fill_f(&a, nscratch + 1, 5.0f);
    float *out = fill_f(&a, nout, 5.0f), *dqkv = fill_f(&a, nqkv, 1e3f);
    OPS(be)->attention_fwd(be.ctx, out, saved, scratch, qkv, B, T, NH, HS);

    struct attn_problem p = {B, T, NH, HS, to_d(&a, qkv, nqkv), to_d(&a, R, nout)};
    double *want = ad(&a, nout), *wprob = ad(&a, nprob);
    attention_ref(want, wprob, p.qkv, B, T, NH, HS);
    cr_assert(rel_err(out, want, nout) < FWD_TOL, "attention out: %g", rel_err(out, want, nout));
    cr_assert(rel_err(saved, wprob, nprob) < FWD_TOL, "attention probabilities");
    for (size_t row = 0; row < (size_t)B * NH * T; row++)
        for (int t2 = (int)(row % (size_t)T) + 1; t2 < T; t2++)
            cr_assert(saved[row * T + (size_t)t2] == 0.0f, "probability above the diagonal");

    OPS(be)->attention_bwd(be.ctx, dqkv, scratch, R, qkv, out, saved, B, T, NH, HS);
    double *g = ad(&a, nqkv);
    fd_grad(attn_objective, &p, p.qkv, nqkv, g);
    double e = rel_err(dqkv, g, nqkv);
    cr_assert(e < BWD_TOL, "attention dqkv rel err %g", e);
    arena_free(&a);
    backend_destroy(&be);
}

Test(cpu_ops, attention_is_causal) {
    int B = 2, T = 6, NH = 2, HS = 3, tc = 3; // change token tc of batch 1
    size_t C = (size_t)NH * HS, nqkv = (size_t)B * T * 3 * C, nout = (size_t)B * T * C;
    struct backend be = backend_cpu_create();
    struct arena a = {0};
    struct rng r = {41};
    float *qkv = rand_f(&a, &r, nqkv, 1.0);
    float *saved = af(&a, OPS(be)->attention_saved_floats(be.ctx, B, T, NH, HS));
    float *scratch = af(&a, OPS(be)->attention_scratch_floats(be.ctx, B, T, NH, HS) + 1);
    float *out1 = af(&a, nout), *out2 = af(&a, nout);
    OPS(be)->attention_fwd(be.ctx, out1, saved, scratch, qkv, B, T, NH, HS);
    float *qkv2 = copy_f(&a, qkv, nqkv);
    for (size_t i = 0; i < 3 * C; i++) qkv2[((size_t)1 * T + tc) * 3 * C + i] += 0.75f;
    OPS(be)->attention_fwd(be.ctx, out2, saved, scratch, qkv2, B, T, NH, HS);
    // Batch 0 and the tokens before tc are untouched, bit for bit.
    cr_assert(memcmp(out1, out2, ((size_t)T + tc) * C * sizeof(float)) == 0, "past outputs changed");
    for (int t = tc; t < T; t++) {
        bool changed = memcmp(out1 + ((size_t)T + t) * C, out2 + ((size_t)T + t) * C, C * sizeof(float)) != 0;
        cr_assert(changed, "token %d does not see the changed token %d", t, tc);
    }
    arena_free(&a);
    backend_destroy(&be);
}

// ---- embeddings

struct emb_problem {
    int N, C, vocab_start, n_vocab;
    const int *tokens;
    double *wte, *R;
};

static double emb_objective(const void *pp) {
    const struct emb_problem *p = pp;
    double L = 0.0;
    for (int n = 0; n < p->N; n++) {
        int row = p->tokens[n] - p->vocab_start;
        if (row < 0 || row >= p->n_vocab) continue;
        for (int c = 0; c < p->C; c++)
            L += p->wte[(size_t)row * p->C + c] * p->R[(size_t)n * p->C + c];
    }
    return L;
}

Test(cpu_ops, vocab_embedding_range) {
    int tokens[] = {3, 10, 17, 18, 12, 12, 25, 15, 0, 12};
    int N = 10, C = 5, vs = 10, nv = 8; // this rank holds rows [10, 18)
    struct backend be = backend_cpu_create();
    struct arena a = {0};
    struct rng r = {51};
    float *wte = rand_f(&a, &r, (size_t)nv * C, 1.0), *R = rand_f(&a, &r, (size_t)N * C, 1.0);
    float *out = fill_f(&a, (size_t)N * C, 7.0f);
    OPS(be)->vocab_embedding_fwd(be.ctx, out, tokens, wte, N, C, vs, nv);
    for (int n = 0; n < N; n++) {
        int row = tokens[n] - vs;
        bool mine = row >= 0 && row < nv;
        for (int c = 0; c < C; c++) {
            float want = mine ? wte[(size_t)row * C + c] : 0.0f;
            cr_assert(out[(size_t)n * C + c] == want, "token %d col %d", tokens[n], c);
        }
    }
    float *dw0 = rand_f(&a, &r, (size_t)nv * C, 1.0), *dwte = copy_f(&a, dw0, (size_t)nv * C);
    OPS(be)->vocab_embedding_bwd(be.ctx, dwte, R, tokens, N, C, vs, nv);
    struct emb_problem p = {N, C, vs, nv, tokens, to_d(&a, wte, (size_t)nv * C),
                            to_d(&a, R, (size_t)N * C)};
    double *g = ad(&a, (size_t)nv * C);
    fd_grad(emb_objective, &p, p.wte, (size_t)nv * C, g);
    cr_assert(rel_err_added(dwte, dw0, g, (size_t)nv * C) < BWD_TOL, "vocab_embedding_bwd");
    // Rows no in-range token uses (global 11, 13, 14, 16) get no gradient at all.
    int unused[] = {11, 13, 14, 16};
    for (int u = 0; u < 4; u++) {
        size_t off = (size_t)(unused[u] - vs) * C;
        cr_assert(memcmp(dwte + off, dw0 + off, (size_t)C * sizeof(float)) == 0, "row %d", unused[u]);
    }
    arena_free(&a);
    backend_destroy(&be);
}

Test(cpu_ops, position_embedding) {
    int B = 3, T = 4, C = 6;
    size_t n = (size_t)B * T * C, nt = (size_t)T * C;
    struct backend be = backend_cpu_create();
    struct arena a = {0};
    struct rng r = {61};
    float *x = rand_f(&a, &r, n, 1.0), *wpe = rand_f(&a, &r, nt, 1.0), *R = rand_f(&a, &r, n, 1.0);
    float *x2 = copy_f(&a, x, n);
    OPS(be)->position_embedding_fwd(be.ctx, x2, wpe, B, T, C);
    for (size_t i = 0; i < n; i++) cr_assert(x2[i] == x[i] + wpe[i % nt]);
    float *dw0 = rand_f(&a, &r, nt, 1.0), *dwpe = copy_f(&a, dw0, nt);
    OPS(be)->position_embedding_bwd(be.ctx, dwpe, R, B, T, C);
    double *g = ad(&a, nt); // L = sum (x + wpe) * R  =>  dL/dwpe = sum over b of R
    for (size_t i = 0; i < n; i++) g[i % nt] += R[i];
    cr_assert(rel_err_added(dwpe, dw0, g, nt) < FWD_TOL);
    arena_free(&a);
    backend_destroy(&be);
}

// ---- vocab-parallel cross-entropy

struct xent_problem {
    int N, Vp, V; // rows, padded columns, real columns
    double *logits; // (N, Vp)
    const int *targets;
    double dloss;
};

static double xent_row_loss(const double *l, int V, int target) {
    double mx = -INFINITY, s = 0.0;
    for (int j = 0; j < V; j++) mx = fmax(mx, l[j]);
    for (int j = 0; j < V; j++) s += exp(l[j] - mx);
    return log(s) + mx - l[target];
}

static double xent_objective(const void *pp) {
    const struct xent_problem *p = pp;
    double L = 0.0;
    for (int i = 0; i < p->N; i++) L += p->dloss * xent_row_loss(p->logits + (size_t)i * p->Vp, p->V, p->targets[i]);
    return L;
}

// Splits a padded vocabulary of ranks * shard columns (V real) over simulated ranks, runs the three
// forward phases with the all-reduces done here, and checks loss and gradient on every rank.
static void check_xent(int ranks, int shard, int V, uint64_t seed) {
    enum { N = 6, MAXR = 4 };
    int Vp = ranks * shard;
    struct backend be = backend_cpu_create();
    struct arena a = {0};
    struct rng r = {seed};
    float *full = af(&a, (size_t)N * Vp);
    for (int i = 0; i < N; i++)
        for (int j = 0; j < Vp; j++)
            // Large padding logits would dominate the softmax if they leaked into it.
            full[(size_t)i * Vp + j] = j < V ? (float)(3.0 * rng_unif(&r)) : 50.0f;
    int targets[N];
    for (int i = 0; i < N; i++) targets[i] = (int)(rng_next(&r) % (uint64_t)V);
    targets[0] = V - 1; // the last real column

    float *logits[MAXR], *maxes[MAXR], *sums[MAXR], *losses[MAXR], *dlogits[MAXR];
    float *gmax = fill_f(&a, N, -INFINITY), *gsum = af(&a, 2 * N);
    for (int k = 0; k < ranks; k++) {
        logits[k] = af(&a, (size_t)N * shard);
        for (int i = 0; i < N; i++)
            memcpy(logits[k] + (size_t)i * shard, full + (size_t)i * Vp + (size_t)k * shard,
                   (size_t)shard * sizeof(float));
        maxes[k] = af(&a, N);
        OPS(be)->xent_max(be.ctx, maxes[k], logits[k], N, k * shard, shard, V);
        for (int i = 0; i < N; i++) {
            if (k * shard >= V) cr_assert(maxes[k][i] == -INFINITY, "padding-only rank max");
            gmax[i] = fmaxf(gmax[i], maxes[k][i]); // all-reduce MAX
        }
    }
    for (int k = 0; k < ranks; k++) {
        sums[k] = af(&a, 2 * N);
        OPS(be)->xent_sums(be.ctx, sums[k], logits[k], gmax, targets, N, k * shard, shard, V);
        for (int i = 0; i < 2 * N; i++) {
            cr_assert(isfinite(sums[k][i]), "rank %d sums[%d] = %g", k, i, sums[k][i]);
            gsum[i] += sums[k][i]; // all-reduce SUM
        }
        if (k * shard >= V)
            for (int i = 0; i < 2 * N; i++) cr_assert(sums[k][i] == 0.0f, "padding-only rank sums");
    }
    struct xent_problem p = {N, Vp, V, to_d(&a, full, (size_t)N * Vp), targets, 1.0 / N};
    for (int k = 0; k < ranks; k++) {
        losses[k] = af(&a, N);
        OPS(be)->xent_loss(be.ctx, losses[k], gmax, gsum, N);
        for (int i = 0; i < N; i++) {
            double want = xent_row_loss(p.logits + (size_t)i * Vp, V, targets[i]);
            cr_assert(fabs(losses[k][i] - want) < 1e-5 * fmax(1.0, fabs(want)),
                      "ranks=%d rank %d row %d: loss %.8g want %.8g", ranks, k, i, losses[k][i], want);
            cr_assert(losses[k][i] == losses[0][i], "loss differs between ranks");
        }
    }
    // Backward: every rank's shard against central differences of the whole float64 loss.
    float dloss = 1.0f / N;
    double *g = ad(&a, (size_t)N * Vp);
    fd_grad(xent_objective, &p, p.logits, (size_t)N * Vp, g);
    float *dfull = af(&a, (size_t)N * Vp);
    for (int k = 0; k < ranks; k++) {
        dlogits[k] = fill_f(&a, (size_t)N * shard, 3.0f);
        OPS(be)->xent_bwd(be.ctx, dlogits[k], logits[k], gmax, gsum, targets, dloss, N, k * shard,
                          shard, V);
        for (int i = 0; i < N; i++)
            for (int j = 0; j < shard; j++) {
                float d = dlogits[k][(size_t)i * shard + j];
                if (k * shard + j >= V) cr_assert(d == 0.0f, "padding column gradient %g", d);
                dfull[(size_t)i * Vp + (size_t)k * shard + j] = d;
            }
        float *inplace = copy_f(&a, logits[k], (size_t)N * shard); // dlogits may alias logits
        OPS(be)->xent_bwd(be.ctx, inplace, inplace, gmax, gsum, targets, dloss, N, k * shard, shard, V);
        cr_assert(memcmp(inplace, dlogits[k], (size_t)N * shard * sizeof(float)) == 0, "in place");
    }
    double e = rel_err(dfull, g, (size_t)N * Vp);
    cr_assert(e < BWD_TOL, "ranks=%d shard=%d V=%d: dlogits rel err %g", ranks, shard, V, e);
    arena_free(&a);
    backend_destroy(&be);
}

Test(cpu_ops, xent_vocab_parallel_matches_log_softmax) {
    check_xent(1, 40, 37, 71); // one rank, 3 padding columns
    check_xent(2, 20, 37, 72); // padding in the last shard
    check_xent(3, 20, 37, 73); // the third rank holds only padding
    check_xent(3, 16, 48, 74); // no padding
    check_xent(2, 64, 100, 75); // rows longer than the vector lanes
}

// ---- reductions and helpers

Test(cpu_ops, sum_sumsq_scale) {
    struct backend be = backend_cpu_create();
    struct arena a = {0};
    struct rng r = {81};
    size_t ns[] = {1, 7, 100003}; // 100003 spans several fixed chunks and a lane tail
    for (size_t s = 0; s < 3; s++) {
        size_t n = ns[s];
        float *x = rand_f(&a, &r, n, 1.0);
        double want = 0.0, want2 = 0.0;
        for (size_t i = 0; i < n; i++) {
            want += x[i];
            want2 += (double)x[i] * x[i];
        }
        float out = 123.0f;
        OPS(be)->sum(be.ctx, &out, x, n);
        cr_assert(fabs(out - want) <= 1e-6 * fmax(1.0, fabs(want)), "sum n=%zu: %g vs %g", n, out, want);
        float acc = 2.5f;
        OPS(be)->sumsq_acc(be.ctx, &acc, x, n);
        cr_assert(fabs(acc - (2.5 + want2)) <= 1e-6 * (2.5 + want2), "sumsq_acc n=%zu", n);
        float *y = copy_f(&a, x, n);
        OPS(be)->scale(be.ctx, y, -0.375f, n);
        for (size_t i = 0; i < n; i++) cr_assert(y[i] == x[i] * -0.375f);
    }
    arena_free(&a);
    backend_destroy(&be);
}

// ---- optimiser

Test(cpu_ops, adamw_two_steps) {
    struct backend be = backend_cpu_create();
    float p[4] = {0.5f, -1.0f, 0.25f, 2.0f}, m[4] = {0}, v[4] = {0};
    float g1[4] = {0.4f, -0.2f, 0.0f, 1.0f}, g2[4] = {-0.1f, 0.3f, 0.05f, 1.0f};
    float lr = 0.01f, b1 = 0.9f, b2 = 0.95f, eps = 1e-8f, wd = 0.1f, gs = 0.5f;
    OPS(be)->adamw(be.ctx, p, g1, m, v, 4, lr, b1, b2, eps, wd, gs, 1);
    // Step 1 by hand: mhat = g', vhat = g'^2, so p -= lr * (sign(g') + wd * p) (eps negligible):
    // 0.5 - 0.01 * (1 + 0.05) = 0.4895; with g = 0 only the decay acts: 0.25 - 0.01 * 0.025.
    cr_assert(fabsf(p[0] - 0.4895f) < 1e-6f, "p[0] after step 1: %.8f", p[0]);
    cr_assert(fabsf(p[2] - 0.24975f) < 1e-6f, "p[2] after step 1: %.8f", p[2]);
    OPS(be)->adamw(be.ctx, p, g2, m, v, 4, lr, b1, b2, eps, wd, gs, 2);
    // Both steps in float64 from the formula.
    double pd[4] = {0.5, -1.0, 0.25, 2.0}, md[4] = {0}, vd[4] = {0};
    const float *gg[2] = {g1, g2};
    for (int t = 1; t <= 2; t++)
        for (int i = 0; i < 4; i++) {
            double gi = (double)gg[t - 1][i] * gs;
            md[i] = b1 * md[i] + (1.0 - b1) * gi;
            vd[i] = b2 * vd[i] + (1.0 - b2) * gi * gi;
            double mh = md[i] / (1.0 - pow(b1, t)), vh = vd[i] / (1.0 - pow(b2, t));
            pd[i] -= lr * (mh / (sqrt(vh) + eps) + wd * pd[i]);
        }
    for (int i = 0; i < 4; i++) {
        cr_assert(fabs(p[i] - pd[i]) < 1e-6, "p[%d] = %.8f, want %.8f", i, p[i], pd[i]);
        cr_assert(fabs(m[i] - md[i]) < 1e-7 && fabs(v[i] - vd[i]) < 1e-7, "moments of %d", i);
    }
    backend_destroy(&be);
}

// ---- determinism

// Runs a set of ops big enough to take the threaded paths and returns all outputs in one buffer.
static float *run_det_ops(struct arena *a, size_t *count) {
    struct backend be = backend_cpu_create();
    struct rng r = {91};
    int N = 96, IC = 64, OC = 1000; // matmul; also N rows of OC logits for the loss
    int B = 2, T = 48, NH = 4, HS = 16; // attention
    int LN = 256, LC = 192;          // layernorm
    size_t nI = (size_t)N * IC, nW = (size_t)OC * IC, nO = (size_t)N * OC;
    size_t nqkv = (size_t)B * T * 3 * NH * HS, nat = (size_t)B * T * NH * HS, nln = (size_t)LN * LC;
    size_t total = nO + nI + nW + OC + nat + nqkv + nln * 2 + 2 * LC + N + nO + 1;
    float *res = af(a, total), *o = res;
    float *inp = rand_f(a, &r, nI, 1.0), *w = rand_f(a, &r, nW, 1.0), *bias = rand_f(a, &r, OC, 1.0);
    OPS(be)->matmul_fwd(be.ctx, o, inp, w, bias, N, IC, OC);
    const float *logits = o;
    OPS(be)->matmul_bwd(be.ctx, o + nO, o + nO + nI, o + nO + nI + nW, logits, inp, w, N, IC, OC);
    o += nO + nI + nW + OC;
    float *qkv = rand_f(a, &r, nqkv, 1.0);
    float *saved = af(a, OPS(be)->attention_saved_floats(be.ctx, B, T, NH, HS));
    float *scratch = af(a, OPS(be)->attention_scratch_floats(be.ctx, B, T, NH, HS) + 1);
    OPS(be)->attention_fwd(be.ctx, o, saved, scratch, qkv, B, T, NH, HS);
    OPS(be)->attention_bwd(be.ctx, o + nat, scratch, o, qkv, o, saved, B, T, NH, HS);
    o += nat + nqkv;
    float *x = rand_f(a, &r, nln, 1.0), *lw = rand_f(a, &r, LC, 1.0), *lb = rand_f(a, &r, LC, 1.0);
    float *mean = af(a, LN), *rstd = af(a, LN);
    OPS(be)->layernorm_fwd(be.ctx, o, mean, rstd, x, lw, lb, LN, LC);
    OPS(be)->layernorm_bwd(be.ctx, o + nln, o + 2 * nln, o + 2 * nln + LC, o, x, lw, mean, rstd, LN, LC);
    o += 2 * nln + 2 * LC;
    int targets[96];
    for (int i = 0; i < N; i++) targets[i] = (i * 37) % OC;
    float *mx = af(a, N), *sums = af(a, 2 * N);
    OPS(be)->xent_max(be.ctx, mx, logits, N, 0, OC, OC - 5);
    OPS(be)->xent_sums(be.ctx, sums, logits, mx, targets, N, 0, OC, OC - 5);
    OPS(be)->xent_loss(be.ctx, o, mx, sums, N);
    OPS(be)->xent_bwd(be.ctx, o + N, logits, mx, sums, targets, 0.01f, N, 0, OC, OC - 5);
    o += N + nO;
    OPS(be)->sumsq_acc(be.ctx, o, res, (size_t)(o - res)); // everything so far
    *count = total;
    backend_destroy(&be);
    return res;
}

Test(cpu_ops, deterministic_across_calls_and_threads) {
    struct arena a = {0};
    size_t n1, n2;
    float *r1 = run_det_ops(&a, &n1);
    float *r2 = run_det_ops(&a, &n2);
    cr_assert_eq(n1, n2);
    cr_assert(memcmp(r1, r2, n1 * sizeof(float)) == 0, "two calls differ");
#ifdef _OPENMP
    int threads[] = {1, 2, 3};
    for (int k = 0; k < 3; k++) {
        omp_set_num_threads(threads[k]);
        struct arena b = {0};
        size_t n3;
        float *r3 = run_det_ops(&b, &n3);
        cr_assert(memcmp(r1, r3, n1 * sizeof(float)) == 0, "result changes with %d threads", threads[k]);
        arena_free(&b);
    }
#endif
    arena_free(&a);
}
