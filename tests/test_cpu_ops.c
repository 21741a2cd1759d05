// test_cpu_ops.c: the CPU reference backend against float64 references and finite differences,
// and its bf16 mode against its fp32 mode.
//
// Forward ops are checked against double-precision versions written here. Backward ops are checked
// against central differences of those double forwards, for the scalar L = sum(out * R) with a
// fixed random R that the backend receives as dout. Errors are relative norms over a tensor.
// The bf16 backend must compute exactly what the fp32 one does on the same bf16-representable
// inputs and round each compute-type output once, to nearest even.
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
#define BF16_TOL 1e-2 // bf16 result vs the fp32 one (bf16 keeps 8 significant bits)

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
    void *p[256];
    int n;
};

static void *arena_add(struct arena *a, void *p) {
    cr_assert(a->n < 256, "test arena full");
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

static uint32_t f32_bits(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return u;
}

static float bits_f32(uint32_t u) {
    float x;
    memcpy(&x, &u, sizeof x);
    return x;
}

// x rounded to the nearest bf16, ties to even, found independently of the backend's bit trick:
// the two bf16 neighbours of x and which one is nearer, compared exactly in double. inf and NaN
// pass through.
static float bf16_round_ref(float x) {
    uint32_t u = f32_bits(x);
    if ((u & 0x7f800000u) == 0x7f800000u) return x;
    uint32_t lo = u & 0xffff0000u; // the neighbour toward zero; lo + 0x10000 is the one away
    int e = (int)((u >> 23) & 0xffu);
    double step = ldexp(1.0, (e ? e : 1) - 127 - 7); // bf16 spacing at x (7 mantissa bits)
    double ax = fabs((double)x), dlo = fabs((double)bits_f32(lo));
    double below = ax - dlo, above = dlo + step - ax;
    bool up = above < below || (above == below && (lo & 0x10000u));
    return bits_f32(up ? lo + 0x10000u : lo); // may carry into the exponent, up to inf
}

// Uniform values already representable in bf16, so both backends see the same inputs.
static float *rand_bf16(struct arena *a, struct rng *r, size_t n, double scale) {
    float *x = rand_f(a, r, n, scale);
    for (size_t i = 0; i < n; i++) x[i] = bf16_round_ref(x[i]);
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
    struct backend bf = backend_cpu_create(TP_DTYPE_BF16);
    cr_assert_str_eq(OPS(bf)->name(bf.ctx), "cpu");
    cr_assert_eq(OPS(bf)->dtype(bf.ctx), TP_DTYPE_BF16);
    backend_destroy(&bf);
    struct backend be = backend_cpu_create(TP_DTYPE_F32);
    cr_assert_str_eq(OPS(be)->name(be.ctx), "cpu");
    cr_assert_eq(OPS(be)->dtype(be.ctx), TP_DTYPE_F32);
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
    struct backend be = backend_cpu_create(TP_DTYPE_F32);
    struct arena a = {0};
    struct rng r = {seed};
    float *inp = rand_f(&a, &r, (size_t)N * IC, 1.0), *w = rand_f(&a, &r, (size_t)OC * IC, 0.5);
    float *bias = with_bias ? rand_f(&a, &r, (size_t)OC, 1.0) : NULL;
    float *out = fill_f(&a, (size_t)N * OC, 1e3f);
    OPS(be)->matmul_fwd(be.ctx, out, NULL, inp, w, bias, N, IC, OC);
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
    struct backend be = backend_cpu_create(TP_DTYPE_F32);
    struct arena a = {0};
    struct rng r = {seed};
    size_t nI = (size_t)N * IC, nW = (size_t)OC * IC, nO = (size_t)N * OC;
    float *inp = rand_f(&a, &r, nI, 1.0), *w = rand_f(&a, &r, nW, 0.5);
    float *bias = rand_f(&a, &r, (size_t)OC, 1.0), *R = rand_f(&a, &r, nO, 1.0);
    float *dw0 = rand_f(&a, &r, nW, 0.3), *db0 = rand_f(&a, &r, (size_t)OC, 0.3);
    float *dinp = fill_f(&a, nI, 1e3f); // "=": the garbage must be overwritten
    float *dw = copy_f(&a, dw0, nW), *dbias = copy_f(&a, db0, (size_t)OC); // "+="
    OPS(be)->matmul_bwd(be.ctx, with_dinp ? dinp : NULL, NULL, dw, with_bias ? dbias : NULL, R, inp, w,
                        NULL, N, IC, OC);

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

// The two halves apart, as sequence-parallel layers run them: dw NULL gives the input gradient
// alone without reading inp (NULL here) or touching dbias; then dw and dbias alone. Together they
// equal the one call bit for bit.
Test(cpu_ops, matmul_bwd_halves_equal_the_whole) {
    int N = 9, IC = 35, OC = 33;
    struct backend be = backend_cpu_create(TP_DTYPE_F32);
    struct arena a = {0};
    struct rng r = {77};
    size_t nI = (size_t)N * IC, nW = (size_t)OC * IC, nO = (size_t)N * OC;
    float *inp = rand_f(&a, &r, nI, 1.0), *w = rand_f(&a, &r, nW, 0.5), *R = rand_f(&a, &r, nO, 1.0);
    float *pre = rand_f(&a, &r, nI, 2.0), *dw0 = rand_f(&a, &r, nW, 0.3), *db0 = rand_f(&a, &r, (size_t)OC, 0.3);
    float *dinp = fill_f(&a, nI, 0.0f), *dw = copy_f(&a, dw0, nW), *db = copy_f(&a, db0, (size_t)OC);
    float *dinp2 = fill_f(&a, nI, 5.0f), *dw2 = copy_f(&a, dw0, nW), *db2 = copy_f(&a, db0, (size_t)OC);
    OPS(be)->matmul_bwd(be.ctx, dinp, NULL, dw, db, R, inp, w, pre, N, IC, OC);
    OPS(be)->matmul_bwd(be.ctx, dinp2, NULL, NULL, db2, R, NULL, w, pre, N, IC, OC);
    cr_assert(memcmp(db2, db0, (size_t)OC * sizeof(float)) == 0, "dw NULL, yet dbias changed");
    cr_assert(memcmp(dinp2, dinp, nI * sizeof(float)) == 0, "the input gradient alone differs");
    OPS(be)->matmul_bwd(be.ctx, NULL, NULL, dw2, db2, R, inp, w, NULL, N, IC, OC);
    cr_assert(memcmp(dw2, dw, nW * sizeof(float)) == 0 && memcmp(db2, db, (size_t)OC * sizeof(float)) == 0,
              "the weight and bias gradients alone differ");
    arena_free(&a);
    backend_destroy(&be);
}

// Larger shapes against the analytic float64 gradients: OC = 600 spans two K chunks of dinp.
Test(cpu_ops, matmul_bwd_large_matches_float64) {
    int shapes[][3] = {{37, 70, 67}, {130, 64, 600}};
    for (size_t s = 0; s < 2; s++) {
        int N = shapes[s][0], IC = shapes[s][1], OC = shapes[s][2];
        struct backend be = backend_cpu_create(TP_DTYPE_F32);
        struct arena a = {0};
        struct rng r = {50 + s};
        size_t nI = (size_t)N * IC, nW = (size_t)OC * IC, nO = (size_t)N * OC;
        float *inp = rand_f(&a, &r, nI, 1.0), *w = rand_f(&a, &r, nW, 0.5), *R = rand_f(&a, &r, nO, 1.0);
        float *dw0 = rand_f(&a, &r, nW, 1.0), *db0 = rand_f(&a, &r, (size_t)OC, 1.0);
        float *dinp = fill_f(&a, nI, -7.0f), *dw = copy_f(&a, dw0, nW), *db = copy_f(&a, db0, (size_t)OC);
        OPS(be)->matmul_bwd(be.ctx, dinp, NULL, dw, db, R, inp, w, NULL, N, IC, OC);
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
    struct backend be = backend_cpu_create(TP_DTYPE_F32);
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
        struct backend be = backend_cpu_create(TP_DTYPE_F32);
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
        float *dsum0 = rand_f(&a, &r, (size_t)C, 1.0), *dsum = copy_f(&a, dsum0, (size_t)C);
        OPS(be)->layernorm_bwd(be.ctx, dinp, dw, db, dsum, R, inp, w, mean, rstd, N, C);
        for (int c = 0; c < C; c++) { // dsum += the column sums of dinp as it is left
            double s = dsum0[c];
            for (int n = 0; n < N; n++) s += dinp[(size_t)n * C + c];
            cr_assert(fabs(dsum[c] - s) <= 1e-5 * (1.0 + fabs(s)), "layernorm dsum C=%d col %d: %g, want %g", C, c,
                      (double)dsum[c], s);
        }
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

// sum (C) (started at 0) must be, bit for bit, the column sums of x (N, C) as stored, added row by
// row in order; before (optional): x's values before the op, which must have changed
static void expect_colsum_as_stored(struct backend be, struct arena *a, const float *sum, const void *x,
                                    const float *before, int N, int C, const char *what) {
    size_t n = (size_t)N * C;
    float *left = af(a, n);
    OPS(be)->from_compute(be.ctx, left, x, n);
    bool updated = false;
    for (int c = 0; c < C; c++) {
        float s = 0.0f; // the order matmul's bias gradient sums rows in: 0, 1, ...
        for (int i = 0; i < N; i++) s += left[(size_t)i * C + c];
        cr_assert_eq(f32_bits(sum[c]), f32_bits(s), "%s col %d: %.9g, want %.9g", what, c, (double)sum[c], (double)s);
        updated = updated || !before || f32_bits(left[c]) != f32_bits(before[c]);
    }
    cr_assert(updated, "%s: its output was not written", what);
}

// dsum is the column sums of dinp as the op leaves it: in bf16, the rounded values
Test(cpu_ops, layernorm_dsum_as_stored) {
    struct backend be = backend_cpu_create(TP_DTYPE_BF16);
    struct arena a = {0};
    struct rng r = {17};
    int N = 37, C = 24;
    size_t n = (size_t)N * C;
    float *xf = rand_bf16(&a, &r, n, 2.0), *wf = rand_bf16(&a, &r, (size_t)C, 1.0);
    float *df = rand_bf16(&a, &r, n, 1.0), *gf = rand_bf16(&a, &r, n, 1.0);
    size_t es = tp_dtype_size(TP_DTYPE_BF16);
    void *x = arena_add(&a, tp_malloc(n * es)), *w = arena_add(&a, tp_malloc((size_t)C * es));
    void *dout = arena_add(&a, tp_malloc(n * es)), *dinp = arena_add(&a, tp_malloc(n * es));
    OPS(be)->to_compute(be.ctx, x, xf, n);
    OPS(be)->to_compute(be.ctx, w, wf, (size_t)C);
    OPS(be)->to_compute(be.ctx, dout, df, n);
    OPS(be)->to_compute(be.ctx, dinp, gf, n);
    float *mean = af(&a, (size_t)N), *rstd = af(&a, (size_t)N);
    for (int i = 0; i < N; i++) {
        mean[i] = 0.1f * (float)(i % 5);
        rstd[i] = 1.0f + 0.05f * (float)(i % 7);
    }
    float *dw = af(&a, (size_t)C), *db = af(&a, (size_t)C), *dsum = af(&a, (size_t)C);
    OPS(be)->layernorm_bwd(be.ctx, dinp, dw, db, dsum, dout, x, w, mean, rstd, N, C);
    expect_colsum_as_stored(be, &a, dsum, dinp, gf, N, C, "layernorm_bwd");
    // matmul_bwd's dinp_sum likewise, with GELU' (fc_proj's input gradient: fc's bias gradient)
    float *ds2 = af(&a, (size_t)C);
    OPS(be)->matmul_bwd(be.ctx, dinp, ds2, NULL, NULL, dout, NULL, w, x, N, C, 1); // w as a (1, C) weight
    expect_colsum_as_stored(be, &a, ds2, dinp, NULL, N, C, "matmul_bwd");
    arena_free(&a);
    backend_destroy(&be);
}

// ---- GELU

static double gelu_ref(double x) {
    return 0.5 * x * (1.0 + tanh(sqrt(2.0 / M_PI) * (x + 0.044715 * x * x * x)));
}

Test(cpu_ops, gelu_fwd_bwd) {
    struct backend be = backend_cpu_create(TP_DTYPE_F32);
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
    struct backend be = backend_cpu_create(TP_DTYPE_F32);
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

    OPS(be)->attention_bwd(be.ctx, dqkv, NULL, scratch, R, qkv, out, saved, B, T, NH, HS);
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
    struct backend be = backend_cpu_create(TP_DTYPE_F32);
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
    struct backend be = backend_cpu_create(TP_DTYPE_F32);
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
    struct backend be = backend_cpu_create(TP_DTYPE_F32);
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

// Exact max over the real columns [lo, hi) of a row of the full vocabulary (-inf if none).
static float shard_max(const float *row, int lo, int hi) {
    float mx = -INFINITY;
    for (int j = lo; j < hi; j++) mx = fmaxf(mx, row[j]);
    return mx;
}

// Splits a padded vocabulary of ranks * shard columns (V real) over simulated ranks and runs the
// forward as model.c does: xent_stats per rank, the MAX all-reduce here, xent_rescale onto the
// global max, the SUM all-reduce here, xent_loss. Checks each rank's own statistics, the loss on
// every rank, and the gradient of every shard.
static void check_xent(int ranks, int shard, int V, uint64_t seed) {
    enum { N = 6, MAXR = 4 };
    int Vp = ranks * shard;
    struct backend be = backend_cpu_create(TP_DTYPE_F32);
    struct arena a = {0};
    struct rng r = {seed};
    float *full = af(&a, (size_t)N * Vp);
    for (int i = 0; i < N; i++)
        for (int j = 0; j < Vp; j++) {
            // Large padding logits would dominate the softmax if they leaked into it. Each row
            // lifts a different rank's columns, so the global max is not always on rank 0 and the
            // rescale has real work to do.
            float lift = (j / shard == i % ranks) ? 4.0f : 0.0f;
            full[(size_t)i * Vp + j] = j < V ? (float)(3.0 * rng_unif(&r)) + lift : 50.0f;
        }
    int targets[N];
    for (int i = 0; i < N; i++) targets[i] = (int)(rng_next(&r) % (uint64_t)V);
    targets[0] = V - 1; // the last real column

    float *logits[MAXR], *maxes[MAXR], *sums[MAXR], *losses[MAXR], *dlogits[MAXR];
    float *gmax = fill_f(&a, N, -INFINITY), *gsum = af(&a, 2 * N);
    for (int k = 0; k < ranks; k++) {
        int lo = k * shard, hi = lo + shard < V ? lo + shard : V; // this rank's real columns
        logits[k] = af(&a, (size_t)N * shard);
        for (int i = 0; i < N; i++)
            memcpy(logits[k] + (size_t)i * shard, full + (size_t)i * Vp + (size_t)k * shard,
                   (size_t)shard * sizeof(float));
        maxes[k] = fill_f(&a, N, 7.0f); // "=": stale values must not survive
        sums[k] = fill_f(&a, 2 * N, 7.0f);
        OPS(be)->xent_stats(be.ctx, maxes[k], sums[k], logits[k], targets, N, k * shard, shard, V);
        for (int i = 0; i < N; i++) {
            const float *row = full + (size_t)i * Vp;
            float lmax = shard_max(row, lo, hi);
            cr_assert(maxes[k][i] == lmax, "rank %d row %d: max %g, want %g", k, i, maxes[k][i], lmax);
            double want = 0.0; // the sum of exponentials on this rank's own max
            for (int j = lo; j < hi; j++) want += exp((double)row[j] - (double)lmax);
            cr_assert(fabs(sums[k][i] - want) <= 1e-6 * fmax(want, 1.0),
                      "rank %d row %d: sum %.9g, want %.9g", k, i, sums[k][i], want);
            float tl = targets[i] >= lo && targets[i] < hi ? row[targets[i]] : 0.0f;
            cr_assert(sums[k][N + i] == tl, "rank %d row %d: target logit %g, want %g", k, i,
                      sums[k][N + i], tl);
            if (lo >= V)
                cr_assert(maxes[k][i] == -INFINITY && sums[k][i] == 0.0f && sums[k][N + i] == 0.0f,
                          "padding-only rank %d row %d: max %g sum %g", k, i, maxes[k][i], sums[k][i]);
            gmax[i] = fmaxf(gmax[i], maxes[k][i]); // all-reduce MAX
        }
    }
    for (int k = 0; k < ranks; k++) {
        float *before = copy_f(&a, sums[k], 2 * (size_t)N);
        float *local = copy_f(&a, maxes[k], N);
        OPS(be)->xent_rescale(be.ctx, sums[k], local, gmax, N);
        for (int i = 0; i < N; i++) {
            cr_assert(sums[k][N + i] == before[N + i], "rescale moved a target logit");
            if (local[i] == gmax[i])
                cr_assert(sums[k][i] == before[i], "rank %d row %d: rescale on the global max "
                          "changed the sum", k, i);
            double want = local[i] == -INFINITY ? 0.0 : before[i] * exp((double)local[i] - gmax[i]);
            cr_assert(fabs(sums[k][i] - want) <= 1e-6 * fmax(want, 1e-30),
                      "rank %d row %d: rescaled sum %.9g, want %.9g", k, i, sums[k][i], want);
        }
        for (int i = 0; i < 2 * N; i++) {
            cr_assert(isfinite(sums[k][i]), "rank %d sums[%d] = %g", k, i, sums[k][i]);
            gsum[i] += sums[k][i]; // all-reduce SUM
        }
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
    if (ranks == 1) { // one rank: xent_fused is the three ops above bit for bit, in place or not
        float *fl = fill_f(&a, N, 7.0f), *fd = fill_f(&a, (size_t)N * shard, 3.0f);
        OPS(be)->xent_fused(be.ctx, fl, fd, logits[0], targets, dloss, N, shard, V);
        cr_assert(memcmp(fl, losses[0], (size_t)N * sizeof(float)) == 0, "xent_fused losses");
        cr_assert(memcmp(fd, dlogits[0], (size_t)N * shard * sizeof(float)) == 0, "xent_fused dlogits");
        float *inplace = copy_f(&a, logits[0], (size_t)N * shard), *fl2 = fill_f(&a, N, 7.0f);
        OPS(be)->xent_fused(be.ctx, fl2, inplace, inplace, targets, dloss, N, shard, V);
        cr_assert(memcmp(inplace, dlogits[0], (size_t)N * shard * sizeof(float)) == 0, "xent_fused in place");
        float *only = copy_f(&a, logits[0], (size_t)N * shard), *fl3 = fill_f(&a, N, 7.0f);
        OPS(be)->xent_fused(be.ctx, fl3, NULL, only, targets, dloss, N, shard, V); // the loss alone
        cr_assert(memcmp(fl3, losses[0], (size_t)N * sizeof(float)) == 0, "xent_fused loss only");
        cr_assert(memcmp(only, logits[0], (size_t)N * shard * sizeof(float)) == 0, "the loss alone wrote logits");
    }
    arena_free(&a);
    backend_destroy(&be);
}

Test(cpu_ops, xent_vocab_parallel_matches_log_softmax) {
    check_xent(1, 40, 37, 71); // one rank, 3 padding columns
    check_xent(2, 20, 37, 72); // padding in the last shard
    check_xent(3, 20, 37, 73); // the third rank holds only padding
    check_xent(3, 16, 48, 74); // no padding
    check_xent(2, 64, 100, 75); // rows longer than the vector lanes
    check_xent(4, 16, 40, 76); // four ranks, the last one padding only
}

// Losses of N rows over the padded vocabulary (Vp columns, V real) computed the way model.c does
// it on `ranks` shards, in dtype dt (logits in losses' compute type), into losses (N).
static void xent_sharded_losses(enum tp_dtype dt, float *losses, const float *full,
                                const int *targets, int N, int Vp, int V, int ranks) {
    struct backend be = backend_cpu_create(dt);
    struct arena a = {0};
    int shard = Vp / ranks;
    float *gmax = fill_f(&a, (size_t)N, -INFINITY), *gsum = af(&a, 2 * (size_t)N);
    float *maxes[4] = {0}, *sums[4] = {0};
    cr_assert(ranks <= 4 && shard * ranks == Vp);
    for (int k = 0; k < ranks; k++) {
        float *part = af(&a, (size_t)N * shard);
        for (int i = 0; i < N; i++)
            memcpy(part + (size_t)i * shard, full + (size_t)i * Vp + (size_t)k * shard,
                   (size_t)shard * sizeof(float));
        void *logits = arena_add(&a, tp_malloc((size_t)N * shard * tp_dtype_size(dt)));
        OPS(be)->to_compute(be.ctx, logits, part, (size_t)N * shard);
        maxes[k] = af(&a, (size_t)N);
        sums[k] = af(&a, 2 * (size_t)N);
        OPS(be)->xent_stats(be.ctx, maxes[k], sums[k], logits, targets, N, k * shard, shard, V);
        for (int i = 0; i < N; i++) gmax[i] = fmaxf(gmax[i], maxes[k][i]);
    }
    if (ranks > 1)
        for (int k = 0; k < ranks; k++) {
            OPS(be)->xent_rescale(be.ctx, sums[k], maxes[k], gmax, N);
            for (int i = 0; i < 2 * N; i++) gsum[i] += sums[k][i];
        }
    else
        memcpy(gsum, sums[0], 2 * (size_t)N * sizeof(float));
    OPS(be)->xent_loss(be.ctx, losses, gmax, gsum, N);
    arena_free(&a);
    backend_destroy(&be);
}

// The tensor-parallel combination (local statistics, rescaled onto the global max, summed) gives
// the loss of one unsharded call, for 2 and 4 shards, with and without padding-only shards.
// Arithmetic is fp32 in both dtypes and the logits here are bf16 values, so bf16 agrees with fp32
// exactly and both hold the fp32 bound.
Test(cpu_ops, xent_shards_match_unsharded) {
    enum { N = 9, VP = 1024 };
    int reals[] = {1024, 1000, 700}; // no padding; padding in the last shard; a padding-only shard
    struct arena a = {0};
    struct rng r = {81};
    float *full = rand_bf16(&a, &r, (size_t)N * VP, 6.0);
    for (size_t k = 0; k < (size_t)N * VP; k += 37) // spread the maxima over the shards
        full[k] = bf16_round_ref(full[k] + 8.0f);
    int targets[N];
    for (int x = 0; x < 3; x++) {
        int V = reals[x];
        for (int i = 0; i < N; i++) targets[i] = (int)(rng_next(&r) % (uint64_t)V);
        targets[N - 1] = V - 1;
        for (int d = 0; d < 2; d++) {
            enum tp_dtype dt = d ? TP_DTYPE_BF16 : TP_DTYPE_F32;
            float *one = af(&a, N), *got = af(&a, N);
            xent_sharded_losses(dt, one, full, targets, N, VP, V, 1);
            for (int ranks = 2; ranks <= 4; ranks *= 2) {
                xent_sharded_losses(dt, got, full, targets, N, VP, V, ranks);
                for (int i = 0; i < N; i++)
                    cr_assert(fabs(got[i] - one[i]) <= 1e-6 * fabs(one[i]),
                              "%s V=%d ranks=%d row %d: loss %.9g, unsharded %.9g",
                              tp_dtype_name(dt), V, ranks, i, got[i], one[i]);
                if (dt == TP_DTYPE_BF16) {
                    float *f = af(&a, N);
                    xent_sharded_losses(TP_DTYPE_F32, f, full, targets, N, VP, V, ranks);
                    cr_assert(memcmp(f, got, N * sizeof(float)) == 0,
                              "bf16 V=%d ranks=%d: losses differ from fp32 on the same logits", V,
                              ranks);
                }
            }
        }
    }
    arena_free(&a);
}

// ---- reductions and helpers

Test(cpu_ops, sum_sumsq_scale) {
    struct backend be = backend_cpu_create(TP_DTYPE_F32);
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
    struct backend be = backend_cpu_create(TP_DTYPE_F32);
    float p[4] = {0.5f, -1.0f, 0.25f, 2.0f}, m[4] = {0}, v[4] = {0};
    float g1[4] = {0.4f, -0.2f, 0.0f, 1.0f}, g2[4] = {-0.1f, 0.3f, 0.05f, 1.0f};
    float lr = 0.01f, b1 = 0.9f, b2 = 0.95f, eps = 1e-8f, wd = 0.1f, gs = 0.5f;
    struct param_segment seg = {.offset = 0, .numel = 4, .weight_decay = wd, .norm_group = 0};
    struct adamw_step st = {.p = p, .g = g1, .m = m, .v = v, .segs = &seg, .n_segs = 1, .n = 4,
                            .lr = lr, .beta1 = b1, .beta2 = b2, .eps = eps, .grad_scale = gs, .t = 1};
    OPS(be)->adamw(be.ctx, &st);
    // Step 1 by hand: mhat = g', vhat = g'^2, so p -= lr * (sign(g') + wd * p) (eps negligible):
    // 0.5 - 0.01 * (1 + 0.05) = 0.4895; with g = 0 only the decay acts: 0.25 - 0.01 * 0.025.
    cr_assert(fabsf(p[0] - 0.4895f) < 1e-6f, "p[0] after step 1: %.8f", p[0]);
    cr_assert(fabsf(p[2] - 0.24975f) < 1e-6f, "p[2] after step 1: %.8f", p[2]);
    st.g = g2;
    st.t = 2;
    OPS(be)->adamw(be.ctx, &st);
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

// The old per-tensor AdamW update, one tensor with one weight decay and one gradient scale, in the
// same float expression order: the one-pass op must reproduce it bit for bit on every segment.
static void adamw_per_tensor(float *p, const float *g, float *m, float *v, size_t n, float lr,
                             float beta1, float beta2, float eps, float weight_decay,
                             float grad_scale, int t) {
    float c1 = 1.0f - powf(beta1, (float)t), c2 = 1.0f - powf(beta2, (float)t);
    for (size_t i = 0; i < n; i++) {
        float gs = g[i] * grad_scale;
        m[i] = beta1 * m[i] + (1.0f - beta1) * gs;
        v[i] = beta2 * v[i] + (1.0f - beta2) * gs * gs;
        float update = (m[i] / c1) / (sqrtf(v[i] / c2) + eps);
        p[i] -= lr * (update + weight_decay * p[i]);
    }
}

// Three segments with different decay; the middle one is big enough for the threaded path.
#define AW_SEGS 3
static const struct param_segment aw_segs[AW_SEGS] = {
    {.offset = 0, .numel = 7, .weight_decay = 0.1f, .norm_group = 0},
    {.offset = 7, .numel = 40000, .weight_decay = 0.0f, .norm_group = 1},
    {.offset = 40007, .numel = 5, .weight_decay = 0.05f, .norm_group = 0},
};
#define AW_N ((size_t)40012)

struct aw_state {
    float *p, *m, *v; // (AW_N) each
};

static struct aw_state aw_state_new(struct arena *a, uint64_t seed) {
    struct rng r = {seed};
    struct aw_state s = {rand_f(a, &r, AW_N, 1.0), af(a, AW_N), af(a, AW_N)};
    return s;
}

// Two steps of the backend's adamw with the given scale and clipping; returns the final state.
static struct aw_state aw_run(struct backend be, struct arena *a, const float *const g[2],
                              float grad_scale, const float *norm_sq, float grad_clip,
                              void *p_compute) {
    struct aw_state s = aw_state_new(a, 301);
    struct adamw_step st = {.p = s.p, .p_compute = p_compute, .m = s.m, .v = s.v, .segs = aw_segs,
                            .n_segs = AW_SEGS, .n = AW_N, .lr = 0.01f, .beta1 = 0.9f,
                            .beta2 = 0.95f, .eps = 1e-8f, .grad_scale = grad_scale,
                            .norm_sq = norm_sq, .grad_clip = grad_clip};
    for (int t = 1; t <= 2; t++) {
        st.g = g[t - 1];
        st.t = t;
        OPS(be)->adamw(be.ctx, &st);
    }
    return s;
}

// The same two steps through the per-tensor formula, each segment with its own decay.
static struct aw_state aw_run_per_tensor(struct arena *a, const float *const g[2],
                                         float grad_scale) {
    struct aw_state s = aw_state_new(a, 301);
    for (int t = 1; t <= 2; t++)
        for (int k = 0; k < AW_SEGS; k++) {
            size_t o = aw_segs[k].offset;
            adamw_per_tensor(s.p + o, g[t - 1] + o, s.m + o, s.v + o, aw_segs[k].numel, 0.01f,
                             0.9f, 0.95f, 1e-8f, aw_segs[k].weight_decay, grad_scale, t);
        }
    return s;
}

static bool aw_equal(struct aw_state x, struct aw_state y) {
    size_t b = AW_N * sizeof(float);
    return memcmp(x.p, y.p, b) == 0 && memcmp(x.m, y.m, b) == 0 && memcmp(x.v, y.v, b) == 0;
}

Test(cpu_ops, adamw_segments_decay_scale_and_clip) {
    struct backend be = backend_cpu_create(TP_DTYPE_F32);
    struct arena a = {0};
    struct rng r = {311};
    const float *g[2] = {rand_f(&a, &r, AW_N, 1.0), rand_f(&a, &r, AW_N, 1.0)};
    float gs = 0.5f;

    struct aw_state want = aw_run_per_tensor(&a, g, gs);
    cr_assert(aw_equal(aw_run(be, &a, g, gs, NULL, 0.0f, NULL), want), "no clipping");
    // The decay differs per segment: with the middle segment's decay applied everywhere the
    // first segment would come out differently.
    struct aw_state one_decay = aw_state_new(&a, 301);
    for (int t = 1; t <= 2; t++)
        adamw_per_tensor(one_decay.p, g[t - 1], one_decay.m, one_decay.v, AW_N, 0.01f, 0.9f,
                         0.95f, 1e-8f, 0.0f, gs, t);
    cr_assert(memcmp(one_decay.p, want.p, 7 * sizeof(float)) != 0, "decay has no effect");

    // Clip active: norm 5 > 1 scales every gradient by 1/5 on top of grad_scale.
    float big[2] = {9.0f, 16.0f};
    struct aw_state clipped = aw_run(be, &a, g, gs, big, 1.0f, NULL);
    cr_assert(aw_equal(clipped, aw_run_per_tensor(&a, g, gs * (1.0f / 5.0f))), "clip active");
    cr_assert(!aw_equal(clipped, want), "clipping changed nothing");
    // Clip inactive: norm sqrt(0.75) < 1; and grad_clip 0 turns clipping off whatever the norm.
    float small[2] = {0.25f, 0.5f};
    cr_assert(aw_equal(aw_run(be, &a, g, gs, small, 1.0f, NULL), want), "clip inactive");
    cr_assert(aw_equal(aw_run(be, &a, g, gs, big, 0.0f, NULL), want), "grad_clip 0");

    // p_compute: a plain copy of p on the fp32 backend ...
    float *pc32 = fill_f(&a, AW_N, 9.0f);
    struct aw_state s32 = aw_run(be, &a, g, gs, big, 1.0f, pc32);
    cr_assert(aw_equal(s32, clipped), "p_compute changed the update");
    cr_assert(memcmp(pc32, s32.p, AW_N * sizeof(float)) == 0, "fp32 p_compute is not p");
    // ... and p rounded to bf16 on the bf16 backend, whose fp32 state matches the fp32 backend.
    struct backend bf = backend_cpu_create(TP_DTYPE_BF16);
    uint16_t *pc16 = arena_add(&a, tp_malloc(AW_N * sizeof(uint16_t)));
    memset(pc16, 0xff, AW_N * sizeof(uint16_t));
    struct aw_state s16 = aw_run(bf, &a, g, gs, big, 1.0f, pc16);
    cr_assert(aw_equal(s16, clipped), "bf16 backend: fp32 state differs");
    for (size_t i = 0; i < AW_N; i++)
        cr_assert_eq((uint32_t)pc16[i], f32_bits(bf16_round_ref(s16.p[i])) >> 16,
                     "p_compute[%zu]", i);
    backend_destroy(&bf);
    arena_free(&a);
    backend_destroy(&be);
}

// Split masters (backend.h): every fp32 pattern comes back from its two halves, ties and signs
// included; the high half is the pattern rounded half up, within one bf16 step of round-to-even.
Test(cpu_ops, split_master_halves_join_exactly) {
    uint32_t probe[] = {0x00000000u, 0x80000000u, 0x3f800000u, 0x3f808000u, 0x3f818000u, 0xbf808000u,
                        0x3f80ffffu, 0x3f807fffu, 0x7f7fffffu, 0x00008000u, 0x3fffffffu, 0xc0007fffu};
    for (size_t i = 0; i < sizeof probe / sizeof probe[0]; i++) {
        uint32_t b = probe[i];
        cr_assert_eq(tp_split_join(tp_split_hi(b), tp_split_lo(b)), b, "pattern %08x", b);
    }
    struct rng r = {919};
    for (int i = 0; i < 1000000; i++) {
        uint32_t b = (uint32_t)rng_next(&r);
        if ((b & 0x7f800000u) == 0x7f800000u) continue; // NaN, infinity
        cr_assert_eq(tp_split_join(tp_split_hi(b), tp_split_lo(b)), b, "pattern %08x", b);
        float f;
        memcpy(&f, &b, sizeof f);
        uint16_t even = tp_bf16_from_f32(f), hi = tp_split_hi(b);
        cr_assert(hi == even || (b & 0xffffu) == 0x8000u, "pattern %08x: %04x, not %04x", b, hi, even);
    }
}

// AdamW on split masters (p NULL, the halves in p_compute and p_lo) updates the master exactly as
// on fp32 masters: the joined result is bit for bit the fp32 one, its halves the split of it.
Test(cpu_ops, adamw_on_split_masters_equals_fp32_masters) {
    struct backend bf = backend_cpu_create(TP_DTYPE_BF16);
    struct arena a = {0};
    struct rng r = {313};
    const float *g[2] = {rand_f(&a, &r, AW_N, 1.0), rand_f(&a, &r, AW_N, 1.0)};
    float big[2] = {9.0f, 16.0f};
    struct aw_state want = aw_run(bf, &a, g, 0.5f, big, 1.0f, arena_add(&a, tp_malloc(AW_N * sizeof(uint16_t))));
    struct aw_state s = aw_state_new(&a, 301);
    uint16_t *hi = arena_add(&a, tp_malloc(AW_N * sizeof(uint16_t))), *lo = arena_add(&a, tp_malloc(AW_N * sizeof(uint16_t)));
    for (size_t i = 0; i < AW_N; i++) {
        uint32_t b = f32_bits(s.p[i]);
        hi[i] = tp_split_hi(b);
        lo[i] = tp_split_lo(b);
    }
    struct adamw_step st = {.p = NULL, .p_compute = hi, .p_lo = lo, .m = s.m, .v = s.v, .segs = aw_segs,
                            .n_segs = AW_SEGS, .n = AW_N, .lr = 0.01f, .beta1 = 0.9f, .beta2 = 0.95f,
                            .eps = 1e-8f, .grad_scale = 0.5f, .norm_sq = big, .grad_clip = 1.0f};
    for (int t = 1; t <= 2; t++) {
        st.g = g[t - 1];
        st.t = t;
        OPS(bf)->adamw(bf.ctx, &st);
    }
    cr_assert(memcmp(s.m, want.m, AW_N * sizeof(float)) == 0 && memcmp(s.v, want.v, AW_N * sizeof(float)) == 0,
              "moments differ");
    for (size_t i = 0; i < AW_N; i++) {
        uint32_t b = f32_bits(want.p[i]);
        cr_assert_eq(tp_split_join(hi[i], lo[i]), b, "master %zu", i);
        cr_assert_eq(hi[i], tp_split_hi(b), "high half %zu", i);
    }
    arena_free(&a);
    backend_destroy(&bf);
}

Test(cpu_ops, segments_sumsq_matches_per_tensor_sumsq_acc) {
    // Interleaved groups, an empty segment, and segments spanning several reduction chunks.
    size_t sizes[] = {5, 100003, 7, 0, 40000, 1, 33000};
    int groups[] = {0, 1, 0, 1, 1, 0, 0};
    enum { NS = 7 };
    struct param_segment segs[NS];
    size_t n = 0;
    for (int i = 0; i < NS; i++) {
        segs[i] = (struct param_segment){.offset = n, .numel = sizes[i], .norm_group = groups[i]};
        n += sizes[i];
    }
    struct arena a = {0};
    struct rng r = {321};
    float *x = rand_f(&a, &r, n, 1.0);
    double want[2] = {0.0, 0.0};
    for (int i = 0; i < NS; i++)
        for (size_t j = 0; j < sizes[i]; j++) {
            double xi = x[segs[i].offset + j];
            want[groups[i]] += xi * xi;
        }
    enum tp_dtype dts[] = {TP_DTYPE_F32, TP_DTYPE_BF16}; // fp32 tensors: the dtype plays no part
    for (int d = 0; d < 2; d++) {
        struct backend be = backend_cpu_create(dts[d]);
        float acc[2] = {0.0f, 0.0f};
        for (int i = 0; i < NS; i++)
            OPS(be)->sumsq_acc(be.ctx, &acc[groups[i]], x + segs[i].offset, sizes[i]);
        float out[2] = {-5.0f, -5.0f}; // "=": overwritten
        OPS(be)->segments_sumsq(be.ctx, out, x, segs, NS, n);
        for (int k = 0; k < 2; k++) {
            cr_assert(f32_bits(out[k]) == f32_bits(acc[k]), "group %d: %.9g vs per tensor %.9g", k,
                      out[k], acc[k]);
            cr_assert(fabs(out[k] - want[k]) <= 1e-6 * want[k], "group %d vs float64", k);
        }
        backend_destroy(&be);
    }
    arena_free(&a);
}

// ---- fused GELU in the linear layer (and the helpers the fused tests share)

// A compute-type copy of host values (the CPU backend's memory is host memory).
static void *to_ct(struct backend be, struct arena *a, const float *x, size_t n) {
    void *d = arena_add(a, tp_malloc(n * tp_dtype_size(OPS(be)->dtype(be.ctx))));
    OPS(be)->to_compute(be.ctx, d, x, n);
    return d;
}

static float *from_ct(struct backend be, struct arena *a, const void *d, size_t n) {
    float *x = af(a, n);
    OPS(be)->from_compute(be.ctx, x, d, n);
    return x;
}

static void check_fused_gelu(enum tp_dtype dt, int N, int IC, int OC, uint64_t seed) {
    struct backend be = backend_cpu_create(dt);
    struct arena a = {0};
    struct rng r = {seed};
    size_t nI = (size_t)N * IC, nW = (size_t)OC * IC, nO = (size_t)N * OC;
    size_t es = tp_dtype_size(dt);
    void *inp = to_ct(be, &a, rand_f(&a, &r, nI, 1.0), nI);
    void *w = to_ct(be, &a, rand_f(&a, &r, nW, 0.5), nW);
    void *bias = to_ct(be, &a, rand_f(&a, &r, (size_t)OC, 1.0), (size_t)OC);
    // Forward: the fused op against matmul then gelu_fwd.
    void *out = to_ct(be, &a, fill_f(&a, nO, 3.0f), nO);
    void *pre = to_ct(be, &a, fill_f(&a, nO, 3.0f), nO);
    void *prod = to_ct(be, &a, af(&a, nO), nO), *out2 = to_ct(be, &a, af(&a, nO), nO);
    OPS(be)->matmul_fwd(be.ctx, out, pre, inp, w, bias, N, IC, OC);
    OPS(be)->matmul_fwd(be.ctx, prod, NULL, inp, w, bias, N, IC, OC);
    OPS(be)->gelu_fwd(be.ctx, out2, prod, nO);
    cr_assert(memcmp(pre, prod, nO * es) == 0, "%s: pre_gelu is not the product", tp_dtype_name(dt));
    // Backward through a layer whose input was gelu(pre): pre_gelu (N, IC) is the earlier layer's.
    void *pre_in = to_ct(be, &a, rand_f(&a, &r, nI, 3.0), nI);
    void *dout = to_ct(be, &a, rand_f(&a, &r, nO, 1.0), nO);
    float *dw = af(&a, nW), *db = af(&a, (size_t)OC), *dw2 = af(&a, nW), *db2 = af(&a, (size_t)OC);
    void *dinp = to_ct(be, &a, fill_f(&a, nI, 3.0f), nI), *dinp2 = to_ct(be, &a, af(&a, nI), nI);
    OPS(be)->matmul_bwd(be.ctx, dinp, NULL, dw, db, dout, inp, w, pre_in, N, IC, OC);
    OPS(be)->matmul_bwd(be.ctx, dinp2, NULL, dw2, db2, dout, inp, w, NULL, N, IC, OC);
    OPS(be)->gelu_bwd(be.ctx, dinp2, pre_in, dinp2, nI);
    cr_assert(memcmp(dw, dw2, nW * sizeof(float)) == 0, "%s: pre_gelu changed dw", tp_dtype_name(dt));
    cr_assert(memcmp(db, db2, (size_t)OC * sizeof(float)) == 0, "%s: pre_gelu changed dbias",
              tp_dtype_name(dt));
    if (dt == TP_DTYPE_F32) {
        cr_assert(memcmp(out, out2, nO * es) == 0, "fp32: fused forward differs from matmul + gelu");
        cr_assert(memcmp(dinp, dinp2, nI * es) == 0, "fp32: fused dinp differs from unfused");
    } else {
        // bf16 rounds the unfused product once more before the GELU: equal up to that rounding.
        double e = rel_err(from_ct(be, &a, out, nO), to_d(&a, from_ct(be, &a, out2, nO), nO), nO);
        cr_assert(e < BF16_TOL, "bf16 fused forward: rel err %g", e);
        e = rel_err(from_ct(be, &a, dinp, nI), to_d(&a, from_ct(be, &a, dinp2, nI), nI), nI);
        cr_assert(e < BF16_TOL, "bf16 fused dinp: rel err %g", e);
    }
    arena_free(&a);
    backend_destroy(&be);
}

Test(cpu_ops, matmul_fused_gelu_matches_matmul_then_gelu) {
    enum tp_dtype dts[] = {TP_DTYPE_F32, TP_DTYPE_BF16};
    for (int d = 0; d < 2; d++) {
        check_fused_gelu(dts[d], 9, 35, 33, 401);
        check_fused_gelu(dts[d], 130, 64, 600, 402); // threaded, two K chunks of dinp
    }
}

// ---- bf16 compute type: conversions

Test(cpu_ops, compute_type_conversions) {
    struct backend f32 = backend_cpu_create(TP_DTYPE_F32), bf = backend_cpu_create(TP_DTYPE_BF16);
    struct arena a = {0};
    struct rng r = {501};
    // fp32: plain copies, bit for bit, NaN payloads included.
    uint32_t odd[] = {0x7f800001u, 0xffc01234u, 0x00000001u, 0x80000000u, 0x3f800001u};
    float src[5], dst[5], back[5];
    for (int i = 0; i < 5; i++) src[i] = bits_f32(odd[i]);
    OPS(f32)->to_compute(f32.ctx, dst, src, 5);
    OPS(f32)->from_compute(f32.ctx, back, dst, 5);
    cr_assert(memcmp(dst, src, sizeof src) == 0 && memcmp(back, src, sizeof src) == 0, "fp32 copies");

    // bf16: every non-NaN bf16 value survives from_compute then to_compute unchanged.
    size_t nh = 65536;
    uint16_t *h = arena_add(&a, tp_malloc(nh * sizeof(uint16_t)));
    uint16_t *h2 = arena_add(&a, tp_malloc(nh * sizeof(uint16_t)));
    for (size_t i = 0; i < nh; i++) h[i] = (uint16_t)i;
    float *wide = af(&a, nh);
    OPS(bf)->from_compute(bf.ctx, wide, h, nh);
    OPS(bf)->to_compute(bf.ctx, h2, wide, nh);
    for (size_t i = 0; i < nh; i++) {
        cr_assert_eq(f32_bits(wide[i]), (uint32_t)i << 16, "widening %04zx", i);
        if (isnan(wide[i]))
            cr_assert(isnan(tp_bf16_to_f32(h2[i])), "NaN %04zx lost", i);
        else
            cr_assert_eq((uint32_t)h2[i], (uint32_t)h[i], "round trip of %04zx gave %04x", i, h2[i]);
    }

    // Rounding to nearest, ties to even, against the reference rounding written here: named
    // cases, then random floats over the whole exponent range and random exact ties.
    struct {
        uint32_t in, want;
    } named[] = {
        {0x3f808000u, 0x3f80u}, // 1 + 2^-8: a tie, to the even 1.0
        {0x3f818000u, 0x3f82u}, // 1 + 3 * 2^-8: a tie, to the even 1 + 2^-6
        {0xbf808000u, 0xbf80u}, // the negative tie
        {0x3f808001u, 0x3f81u}, // just above the tie: up
        {0x3f807fffu, 0x3f80u}, // just below: down
        {0x7f7fffffu, 0x7f80u}, // FLT_MAX is past the largest bf16 by more than half a step: inf
        {0x7f7f8000u, 0x7f80u}, // the tie at the top goes to the even neighbour, which is inf
        {0x00008000u, 0x0000u}, // subnormal tie to even zero
        {0x00018000u, 0x0002u}, // subnormal tie up to even
        {0x80000000u, 0x8000u}, // -0 keeps its sign
        {0xff800000u, 0xff80u}, // -inf
    };
    size_t nn = sizeof named / sizeof named[0];
    size_t nr = 20000, n = nn + nr + 4;
    float *x = af(&a, n);
    for (size_t i = 0; i < nn; i++) x[i] = bits_f32(named[i].in);
    for (size_t i = nn; i < nn + nr; i++) {
        uint32_t u;
        do {
            u = (uint32_t)rng_next(&r);
            if (i % 2) u = (u & 0xffff0000u) | 0x8000u; // every other one an exact tie
        } while ((u & 0x7f800000u) == 0x7f800000u);     // finite only
        x[i] = bits_f32(u);
    }
    uint32_t nans[] = {0x7fc00000u, 0xffc00000u, 0x7f800001u, 0x7fff0000u}; // the third has only
    for (size_t i = 0; i < 4; i++) x[nn + nr + i] = bits_f32(nans[i]);    // low payload bits
    uint16_t *y = arena_add(&a, tp_malloc(n * sizeof(uint16_t)));
    OPS(bf)->to_compute(bf.ctx, y, x, n);
    for (size_t i = 0; i < nn; i++)
        cr_assert_eq((uint32_t)y[i], named[i].want, "%08x rounds to %04x, want %04x", named[i].in,
                     y[i], named[i].want);
    for (size_t i = 0; i < nn + nr; i++)
        cr_assert_eq((uint32_t)y[i] << 16, f32_bits(bf16_round_ref(x[i])), "%08x rounds to %04x",
                     f32_bits(x[i]), y[i]);
    for (size_t i = nn + nr; i < n; i++) {
        cr_assert(isnan(tp_bf16_to_f32(y[i])), "NaN %08x became %04x", f32_bits(x[i]), y[i]);
        cr_assert_eq((uint32_t)y[i] >> 15, f32_bits(x[i]) >> 31, "NaN sign");
    }
    arena_free(&a);
    backend_destroy(&bf);
    backend_destroy(&f32);
}

// ---- bf16 compute type: every op against the fp32 backend
//
// Each case runs an op (or a forward and its backward) on both backends from the same
// bf16-representable inputs. Arithmetic is fp32 in both, so: fp32 outputs agree bit for bit, each
// bf16 output is the fp32 backend's value rounded to nearest even (within BF16_TOL of it, and
// exactly representable), inputs are left alone, and no op writes past a bf16 tensor's end (it
// would if it stored fp32 there).

enum arg_role {
    ARG_NONE,    // a NULL pointer
    ARG_IN,      // compute-type input
    ARG_OUT,     // compute-type output ("=" or "+=")
    ARG_F32_OUT, // fp32 output (parameter gradients, statistics, saved probabilities, losses)
};
#define MAX_ARGS 12
#define CANARY 64 // bytes after each compute-type tensor that no op may touch

struct arg {
    enum arg_role role;
    size_t n;
    double scale; // initial values uniform in [-scale, scale), rounded to bf16
    int same_as;  // > 0: starts instead as a copy of argument same_as - 1 (ops run in place)
};

// Every size an op may need; each case reads the ones its op takes.
struct dims {
    int N, C, IC, OC, B, T, NH, HS;
    int vocab_start, n_vocab, vocab_size;
    const int *tokens; // (N) tokens or targets
};

typedef void (*case_fn)(struct backend be, void *const *t, const struct dims *d);

struct op_case {
    const char *name;
    case_fn run;
    struct dims d;
    int nargs;
    struct arg arg[MAX_ARGS];
};

static bool is_ct(enum arg_role r) { return r == ARG_IN || r == ARG_OUT; }

// Runs c on be from init (host values), returning every tensor's values afterwards in got.
static void run_case(struct backend be, struct arena *a, const struct op_case *c,
                     float *const *init, float **got) {
    size_t es = tp_dtype_size(OPS(be)->dtype(be.ctx));
    void *t[MAX_ARGS] = {0};
    for (int i = 0; i < c->nargs; i++) {
        const struct arg *g = &c->arg[i];
        if (g->role == ARG_NONE) continue;
        if (is_ct(g->role)) {
            unsigned char *p = arena_add(a, tp_malloc(g->n * es + CANARY));
            OPS(be)->to_compute(be.ctx, p, init[i], g->n);
            memset(p + g->n * es, 0xa5, CANARY);
            t[i] = p;
        } else {
            t[i] = copy_f(a, init[i], g->n);
        }
    }
    c->run(be, t, &c->d);
    for (int i = 0; i < c->nargs; i++) {
        const struct arg *g = &c->arg[i];
        got[i] = NULL;
        if (g->role == ARG_NONE) continue;
        got[i] = af(a, g->n);
        if (is_ct(g->role)) {
            OPS(be)->from_compute(be.ctx, got[i], t[i], g->n);
            const unsigned char *tail = (const unsigned char *)t[i] + g->n * es;
            for (size_t k = 0; k < CANARY; k++)
                cr_assert_eq(tail[k], 0xa5, "%s arg %d: written past its end", c->name, i);
        } else {
            memcpy(got[i], t[i], g->n * sizeof(float));
        }
    }
}

static void check_case(const struct op_case *c, uint64_t seed) {
    struct backend f32 = backend_cpu_create(TP_DTYPE_F32), bf = backend_cpu_create(TP_DTYPE_BF16);
    struct arena a = {0};
    struct rng r = {seed};
    float *init[MAX_ARGS] = {0}, *want[MAX_ARGS], *got[MAX_ARGS];
    for (int i = 0; i < c->nargs; i++) {
        const struct arg *g = &c->arg[i];
        if (g->same_as)
            init[i] = init[g->same_as - 1];
        else if (g->role != ARG_NONE)
            init[i] = rand_bf16(&a, &r, g->n, g->scale);
    }
    run_case(f32, &a, c, init, want);
    run_case(bf, &a, c, init, got);
    for (int i = 0; i < c->nargs; i++) {
        const struct arg *g = &c->arg[i];
        size_t bytes = g->n * sizeof(float);
        switch (g->role) {
        case ARG_NONE: break;
        case ARG_IN:
            cr_assert(memcmp(got[i], init[i], bytes) == 0 && memcmp(want[i], init[i], bytes) == 0,
                      "%s arg %d: input modified", c->name, i);
            break;
        case ARG_F32_OUT:
            cr_assert(memcmp(got[i], want[i], bytes) == 0, "%s arg %d: fp32 output differs",
                      c->name, i);
            break;
        case ARG_OUT: {
            for (size_t k = 0; k < g->n; k++) {
                uint32_t b = f32_bits(got[i][k]);
                cr_assert_eq(b & 0xffffu, 0, "%s arg %d[%zu]: not a bf16 value", c->name, i, k);
                cr_assert_eq(b, f32_bits(bf16_round_ref(want[i][k])),
                             "%s arg %d[%zu]: %.9g is not the rounding of %.9g", c->name, i, k,
                             got[i][k], want[i][k]);
            }
            double e = rel_err(got[i], to_d(&a, want[i], g->n), g->n);
            cr_assert(e < BF16_TOL, "%s arg %d: rel err %g", c->name, i, e);
            break;
        }
        }
    }
    arena_free(&a);
    backend_destroy(&bf);
    backend_destroy(&f32);
}

#define IN(cnt, s) {.role = ARG_IN, .n = (cnt), .scale = (s)}
#define OUT(cnt) {.role = ARG_OUT, .n = (cnt), .scale = 1.0}
#define OUT_AS(cnt, j) {.role = ARG_OUT, .n = (cnt), .same_as = (j) + 1}
#define F32_OUT(cnt) {.role = ARG_F32_OUT, .n = (cnt), .scale = 1.0}
#define NONE {.role = ARG_NONE}

static void run_embeddings(struct backend be, void *const *t, const struct dims *d) {
    // t: out (N, C), wte (n_vocab, C), dwte (n_vocab, C), dout (N, C),
    //    x (B, T, C), wpe (T, C), dwpe (T, C), dx (B, T, C)
    int N = d->N, C = d->C;
    OPS(be)->vocab_embedding_fwd(be.ctx, t[0], d->tokens, t[1], N, C, d->vocab_start, d->n_vocab);
    OPS(be)->vocab_embedding_bwd(be.ctx, t[2], t[3], d->tokens, N, C, d->vocab_start, d->n_vocab);
    OPS(be)->position_embedding_fwd(be.ctx, t[4], t[5], d->B, d->T, d->C);
    OPS(be)->position_embedding_bwd(be.ctx, t[6], t[7], d->B, d->T, d->C);
}

static void run_layernorm(struct backend be, void *const *t, const struct dims *d) {
    // t: out (N, C), mean (N), rstd (N), inp (N, C), w (C), b (C), dinp (N, C) +=, dw (C), db (C),
    //    dout (N, C), dsum (C) += or NULL (in bf16 it sums the rounded dinp, so it is not the fp32
    //    backend's bits: layernorm_dsum_as_stored checks it)
    OPS(be)->layernorm_fwd(be.ctx, t[0], t[1], t[2], t[3], t[4], t[5], d->N, d->C);
    OPS(be)->layernorm_bwd(be.ctx, t[6], t[7], t[8], t[10], t[9], t[3], t[4], t[1], t[2], d->N, d->C);
}

static void run_matmul(struct backend be, void *const *t, const struct dims *d) {
    // t: out (N, OC), pre_gelu (N, OC) or NULL, inp (N, IC), w (OC, IC), bias (OC) or NULL,
    //    dinp (N, IC) or NULL, dw (OC, IC), dbias (OC) or NULL, dout (N, OC),
    //    pre_gelu_in (N, IC) or NULL: the backward's GELU input
    OPS(be)->matmul_fwd(be.ctx, t[0], t[1], t[2], t[3], t[4], d->N, d->IC, d->OC);
    OPS(be)->matmul_bwd(be.ctx, t[5], NULL, t[6], t[7], t[8], t[2], t[3], t[9], d->N, d->IC, d->OC);
}

static void run_residual_gelu(struct backend be, void *const *t, const struct dims *d) {
    // t: out (N, C), res (N, C), x (N, C), bias (C) or NULL, acc (N, C) = out aliasing res,
    //    g (N*C) = gelu(x), dg (N*C) = gelu'(x) * dout, dout (N*C), dio (N*C) = dinp aliasing dout
    size_t n = (size_t)d->N * d->C;
    OPS(be)->residual_fwd(be.ctx, t[0], t[1], t[2], t[3], d->N, d->C);
    OPS(be)->residual_fwd(be.ctx, t[4], t[4], t[2], t[3], d->N, d->C);
    OPS(be)->gelu_fwd(be.ctx, t[5], t[2], n);
    OPS(be)->gelu_bwd(be.ctx, t[6], t[2], t[7], n);
    OPS(be)->gelu_bwd(be.ctx, t[8], t[2], t[8], n);
}

static void run_attention(struct backend be, void *const *t, const struct dims *d) {
    // t: out (B, T, NH*HS), saved, scratch, qkv (B, T, 3*NH*HS), dqkv (B, T, 3*NH*HS),
    //    dout (B, T, NH*HS), then decoding with n_ctx = N: dec_out (NH*HS), dec_scratch (NH, N),
    //    q (NH*HS), kcache and vcache (N + 2, NH*HS)
    OPS(be)->attention_fwd(be.ctx, t[0], t[1], t[2], t[3], d->B, d->T, d->NH, d->HS);
    OPS(be)->attention_bwd(be.ctx, t[4], NULL, t[2], t[5], t[3], t[0], t[1], d->B, d->T, d->NH, d->HS);
    OPS(be)->attention_decode(be.ctx, t[6], t[7], t[8], t[9], t[10], d->N, d->NH, d->HS);
}

static void run_xent(struct backend be, void *const *t, const struct dims *d) {
    // t: logits (N, n_vocab), maxes (N), sums (2, N), losses (N), dlogits (N, n_vocab),
    //    inplace (N, n_vocab) = the logits again, turned into their gradient in place
    OPS(be)->xent_stats(be.ctx, t[1], t[2], t[0], d->tokens, d->N, d->vocab_start, d->n_vocab,
                        d->vocab_size);
    OPS(be)->xent_loss(be.ctx, t[3], t[1], t[2], d->N);
    OPS(be)->xent_bwd(be.ctx, t[4], t[0], t[1], t[2], d->tokens, 0.25f, d->N, d->vocab_start,
                      d->n_vocab, d->vocab_size);
    OPS(be)->xent_bwd(be.ctx, t[5], t[5], t[1], t[2], d->tokens, 0.25f, d->N, d->vocab_start,
                      d->n_vocab, d->vocab_size);
}

Test(cpu_ops, bf16_embeddings_layernorm_residual_gelu) {
    int tokens[] = {3, 10, 17, 18, 12, 12, 25, 15, 0, 12};
    struct op_case emb = {"embeddings", run_embeddings,
                          {.N = 10, .C = 70, .B = 2, .T = 5, .vocab_start = 10, .n_vocab = 8,
                           .tokens = tokens},
                          8,
                          {OUT(700), IN(560, 1.0), F32_OUT(560), IN(700, 1.0), OUT(700), IN(350, 1.0),
                           F32_OUT(350), IN(700, 1.0)}};
    check_case(&emb, 601);
    int lnd[][2] = {{6, 19}, {256, 192}}; // the second takes the threaded paths
    for (int s = 0; s < 2; s++) {
        size_t N = (size_t)lnd[s][0], C = (size_t)lnd[s][1];
        struct op_case ln = {"layernorm", run_layernorm, {.N = (int)N, .C = (int)C}, 11,
                             {OUT(N * C), F32_OUT(N), F32_OUT(N), IN(N * C, 2.0), IN(C, 1.0),
                              IN(C, 1.0), OUT(N * C), F32_OUT(C), F32_OUT(C), IN(N * C, 1.0), NONE}};
        check_case(&ln, 611 + (uint64_t)s);
        for (int with_bias = 0; with_bias < 2; with_bias++) {
            struct arg bias = with_bias ? (struct arg)IN(C, 1.0) : (struct arg)NONE;
            struct op_case rg = {"residual and gelu", run_residual_gelu,
                                 {.N = (int)N, .C = (int)C}, 9,
                                 {OUT(N * C), IN(N * C, 1.0), IN(N * C, 4.0), bias, OUT_AS(N * C, 1),
                                  OUT(N * C), OUT(N * C), IN(N * C, 1.0), OUT_AS(N * C, 7)}};
            check_case(&rg, 621 + (uint64_t)(2 * s + with_bias));
        }
    }
}

Test(cpu_ops, bf16_matmul) {
    int shapes[][3] = {{7, 13, 29}, {9, 35, 33}, {130, 64, 600}};
    for (int s = 0; s < 3; s++)
        for (int v = 0; v < 4; v++) { // bit 0: bias and dbias; bit 1: fused GELU both ways
            size_t N = (size_t)shapes[s][0], IC = (size_t)shapes[s][1], OC = (size_t)shapes[s][2];
            bool bias = v & 1, gelu = v & 2;
            struct arg none = NONE, pre = OUT(N * OC), pre_in = IN(N * IC, 3.0);
            struct arg b = IN(OC, 1.0), db = F32_OUT(OC);
            struct op_case mm = {"matmul", run_matmul,
                                 {.N = (int)N, .IC = (int)IC, .OC = (int)OC}, 10,
                                 {OUT(N * OC), gelu ? pre : none, IN(N * IC, 1.0), IN(OC * IC, 0.5),
                                  bias ? b : none, OUT(N * IC), F32_OUT(OC * IC), bias ? db : none,
                                  IN(N * OC, 1.0), gelu ? pre_in : none}};
            check_case(&mm, 700 + (uint64_t)(4 * s + v));
        }
    // dinp NULL: only the weight gradients.
    struct op_case mm = {"matmul without dinp", run_matmul, {.N = 9, .IC = 35, .OC = 33}, 10,
                         {OUT(9 * 33), NONE, IN(9 * 35, 1.0), IN(33 * 35, 0.5), IN(33, 1.0), NONE,
                          F32_OUT(33 * 35), F32_OUT(33), IN(9 * 33, 1.0), IN(9 * 35, 3.0)}};
    check_case(&mm, 799);
}

Test(cpu_ops, bf16_attention_and_cross_entropy) {
    struct backend f32 = backend_cpu_create(TP_DTYPE_F32);
    int at[][4] = {{2, 5, 3, 4}, {2, 48, 4, 16}}; // B, T, NH, HS; the second is threaded
    for (int s = 0; s < 2; s++) {
        int B = at[s][0], T = at[s][1], NH = at[s][2], HS = at[s][3], nctx = T - 1;
        size_t C = (size_t)NH * HS, BTC = (size_t)B * T * C;
        size_t ns = OPS(f32)->attention_saved_floats(f32.ctx, B, T, NH, HS);
        size_t nsc = OPS(f32)->attention_scratch_floats(f32.ctx, B, T, NH, HS) + 1;
        struct op_case att = {"attention", run_attention,
                              {.B = B, .T = T, .NH = NH, .HS = HS, .N = nctx}, 11,
                              {OUT(BTC), F32_OUT(ns), F32_OUT(nsc), IN(3 * BTC, 1.5), OUT(3 * BTC),
                               IN(BTC, 1.0), OUT(C), F32_OUT((size_t)NH * nctx), IN(C, 1.5),
                               IN((size_t)(nctx + 2) * C, 1.5), IN((size_t)(nctx + 2) * C, 1.0)}};
        check_case(&att, 801 + (uint64_t)s);
    }
    backend_destroy(&f32);
    // One rank's shard of a padded vocabulary: [16, 48) of which columns >= 40 are padding.
    enum { N = 6, NV = 32 };
    int targets[N] = {16, 39, 20, 3, 47, 30}; // in range, last real, ..., another rank's, padding
    struct op_case xe = {"cross-entropy", run_xent,
                         {.N = N, .vocab_start = 16, .n_vocab = NV, .vocab_size = 40,
                          .tokens = targets},
                         6,
                         {IN(N * NV, 3.0), F32_OUT(N), F32_OUT(2 * N), F32_OUT(N), OUT(N * NV),
                          OUT_AS(N * NV, 0)}};
    check_case(&xe, 811);
    // Rows much longer than the vector lanes.
    int targets2[N] = {0, 5, 999, 500, 77, 998};
    struct op_case xe2 = {"cross-entropy, long rows", run_xent,
                          {.N = N, .vocab_start = 0, .n_vocab = 1000, .vocab_size = 999,
                           .tokens = targets2},
                          6,
                          {IN(N * 1000, 3.0), F32_OUT(N), F32_OUT(2 * N), F32_OUT(N), OUT(N * 1000),
                           OUT_AS(N * 1000, 0)}};
    check_case(&xe2, 812);
}

// ---- determinism

// Runs a set of ops big enough to take the threaded paths and returns all outputs in one buffer.
static float *run_det_ops(struct arena *a, size_t *count) {
    struct backend be = backend_cpu_create(TP_DTYPE_F32);
    struct rng r = {91};
    int N = 96, IC = 64, OC = 1000; // matmul; also N rows of OC logits for the loss
    int B = 2, T = 48, NH = 4, HS = 16; // attention
    int LN = 256, LC = 192;          // layernorm
    size_t nI = (size_t)N * IC, nW = (size_t)OC * IC, nO = (size_t)N * OC;
    size_t nqkv = (size_t)B * T * 3 * NH * HS, nat = (size_t)B * T * NH * HS, nln = (size_t)LN * LC;
    size_t total = nO + nI + nW + OC + nat + nqkv + nln * 2 + 3 * LC + N + nO + 1;
    float *res = af(a, total), *o = res;
    float *inp = rand_f(a, &r, nI, 1.0), *w = rand_f(a, &r, nW, 1.0), *bias = rand_f(a, &r, OC, 1.0);
    OPS(be)->matmul_fwd(be.ctx, o, NULL, inp, w, bias, N, IC, OC);
    const float *logits = o;
    OPS(be)->matmul_bwd(be.ctx, o + nO, NULL, o + nO + nI, o + nO + nI + nW, logits, inp, w, NULL, N, IC,
                        OC);
    o += nO + nI + nW + OC;
    float *qkv = rand_f(a, &r, nqkv, 1.0);
    float *saved = af(a, OPS(be)->attention_saved_floats(be.ctx, B, T, NH, HS));
    float *scratch = af(a, OPS(be)->attention_scratch_floats(be.ctx, B, T, NH, HS) + 1);
    OPS(be)->attention_fwd(be.ctx, o, saved, scratch, qkv, B, T, NH, HS);
    OPS(be)->attention_bwd(be.ctx, o + nat, NULL, scratch, o, qkv, o, saved, B, T, NH, HS);
    o += nat + nqkv;
    float *x = rand_f(a, &r, nln, 1.0), *lw = rand_f(a, &r, LC, 1.0), *lb = rand_f(a, &r, LC, 1.0);
    float *mean = af(a, LN), *rstd = af(a, LN);
    OPS(be)->layernorm_fwd(be.ctx, o, mean, rstd, x, lw, lb, LN, LC);
    OPS(be)->layernorm_bwd(be.ctx, o + nln, o + 2 * nln, o + 2 * nln + LC, o + 2 * nln + 2 * LC, o, x, lw, mean,
                           rstd, LN, LC);
    o += 2 * nln + 3 * LC;
    int targets[96];
    for (int i = 0; i < N; i++) targets[i] = (i * 37) % OC;
    float *mx = af(a, N), *sums = af(a, 2 * N);
    OPS(be)->xent_stats(be.ctx, mx, sums, logits, targets, N, 0, OC, OC - 5);
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

// ---- residual + layernorm in one op

// residual_layernorm_fwd is exactly residual_fwd then layernorm_fwd on the stored sum, in both
// dtypes, also when its sum output aliases the residual input.
Test(cpu_ops, residual_layernorm_is_residual_then_layernorm) {
    for (int dt = TP_DTYPE_F32; dt <= TP_DTYPE_BF16; dt++) {
        struct backend be = backend_cpu_create((enum tp_dtype)dt);
        struct arena a = {0};
        struct rng r = {31};
        int N = 6, C = 24;
        size_t n = (size_t)N * C, es = tp_dtype_size((enum tp_dtype)dt);
        void *res = to_ct(be, &a, rand_f(&a, &r, n, 2.0), n), *x = to_ct(be, &a, rand_f(&a, &r, n, 1.0), n);
        void *bias = to_ct(be, &a, rand_f(&a, &r, (size_t)C, 0.5), (size_t)C);
        void *w = to_ct(be, &a, rand_f(&a, &r, (size_t)C, 1.0), (size_t)C);
        void *b = to_ct(be, &a, rand_f(&a, &r, (size_t)C, 0.5), (size_t)C);
        void *sum = to_ct(be, &a, af(&a, n), n), *ln = to_ct(be, &a, af(&a, n), n);
        float *mean = af(&a, (size_t)N), *rstd = af(&a, (size_t)N);
        OPS(be)->residual_fwd(be.ctx, sum, res, x, bias, N, C);
        OPS(be)->layernorm_fwd(be.ctx, ln, mean, rstd, sum, w, b, N, C);
        void *sum2 = to_ct(be, &a, af(&a, n), n), *ln2 = to_ct(be, &a, af(&a, n), n);
        float *mean2 = af(&a, (size_t)N), *rstd2 = af(&a, (size_t)N);
        OPS(be)->residual_layernorm_fwd(be.ctx, sum2, ln2, mean2, rstd2, res, x, bias, w, b, N, C);
        cr_assert(memcmp(sum, sum2, n * es) == 0, "%s: sum", tp_dtype_name((enum tp_dtype)dt));
        cr_assert(memcmp(ln, ln2, n * es) == 0, "%s: layernorm", tp_dtype_name((enum tp_dtype)dt));
        cr_assert(memcmp(mean, mean2, (size_t)N * sizeof(float)) == 0 &&
                  memcmp(rstd, rstd2, (size_t)N * sizeof(float)) == 0, "%s: statistics",
                  tp_dtype_name((enum tp_dtype)dt));
        // the sum written over the residual input
        OPS(be)->residual_layernorm_fwd(be.ctx, res, ln2, mean2, rstd2, res, x, bias, w, b, N, C);
        cr_assert(memcmp(res, sum, n * es) == 0 && memcmp(ln, ln2, n * es) == 0, "%s: out aliasing res",
                  tp_dtype_name((enum tp_dtype)dt));
        arena_free(&a);
        backend_destroy(&be);
    }
}
