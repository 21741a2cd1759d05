// test_cuda_ops.c: the CUDA backend against the fp32 CPU reference, op by op, forward and
// backward; bitwise determinism of the CUDA ops; the NCCL comm on one rank.
//
// Every case draws fresh random inputs, uploads the same values to both backends, runs the op on
// each and compares with the relative error ||gpu - cpu|| / ||cpu||. Outputs that accumulate
// ("+=") are pre-filled with random values, so an op that overwrote them would fail; outputs that
// are overwritten ("=") are pre-filled too, so an op that accumulated would fail. Shapes include
// sizes that are not multiples of any block size and the real GPT-2 ones.
//
// Without a CUDA device every test that needs one skips visibly with "no CUDA device: ...", and
// the program exits 77 so that meson reports the suite as skipped (see main at the end).
//
// MPI for the NCCL case: Criterion runs each test in its own worker process, and MPI cannot be
// initialised in the runner and survive the fork. The NCCL suite therefore initialises MPI (as a
// singleton, no mpiexec needed) in its .init fixture, which runs inside the test's own worker, and
// finalises it in .fini. meson runs the suite with --jobs 1, so only one worker holds the GPU and
// MPI at a time.
#include <criterion/criterion.h>
#include <math.h>
#include <mpi.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "comm.h"
#include "common.h"
#include "testutil.h"

// ---- helpers: random numbers, paired buffers, comparison

#define TOL 1e-5       // most ops
#define TOL_LOOSE 1e-4 // attention, softmax, loss: exp and long dot products

struct pair {
    struct backend cpu, gpu;
    uint64_t rng; // splitmix64 state
};

static uint64_t rng_next(uint64_t *s) {
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// uniform in [lo, hi)
static float rng_uniform(uint64_t *s, float lo, float hi) {
    double u = (double)(rng_next(s) >> 11) * (1.0 / 9007199254740992.0);
    return (float)(lo + (hi - lo) * u);
}

static int rng_int(uint64_t *s, int n) { return (int)(rng_next(s) % (uint64_t)n); }

static void pair_open(struct pair *p, uint64_t seed) {
    if (!backend_cuda_available() || backend_cuda_device_count() <= 0)
        cr_skip_test("no CUDA device: the CUDA backend cannot be exercised on this machine");
    char err[512] = "";
    cr_assert(backend_cuda_create(&p->gpu, 0, err, sizeof err), "backend_cuda_create: %s", err);
    cr_assert_str_eq(p->gpu.iface->name(p->gpu.ctx), "cuda");
    p->cpu = backend_cpu_create();
    p->rng = seed;
}

static void pair_close(struct pair *p) {
    backend_destroy(&p->gpu);
    backend_destroy(&p->cpu);
}

// One tensor held three times: host staging (h), CPU-backend memory (c), GPU memory (g).
struct buf {
    size_t n;
    float *h; // (n)
    float *c; // (n)
    float *g; // (n)
};

struct ibuf {
    size_t n;
    int *h, *c, *g; // (n) each
};

static struct buf buf_new(struct pair *p, size_t n) {
    struct buf b = {.n = n};
    b.h = tp_calloc(n ? n : 1, sizeof(float));
    b.c = p->cpu.iface->alloc(p->cpu.ctx, n * sizeof(float));
    b.g = p->gpu.iface->alloc(p->gpu.ctx, n * sizeof(float));
    return b;
}

// Uploads h to both backends.
static void buf_push(struct pair *p, struct buf *b) {
    p->cpu.iface->copy_to_device(p->cpu.ctx, b->c, b->h, b->n * sizeof(float));
    p->gpu.iface->copy_to_device(p->gpu.ctx, b->g, b->h, b->n * sizeof(float));
}

static struct buf buf_rand(struct pair *p, size_t n, float lo, float hi) {
    struct buf b = buf_new(p, n);
    for (size_t i = 0; i < n; i++) b.h[i] = rng_uniform(&p->rng, lo, hi);
    buf_push(p, &b);
    return b;
}

static void buf_free(struct pair *p, struct buf *b) {
    p->cpu.iface->free(p->cpu.ctx, b->c);
    p->gpu.iface->free(p->gpu.ctx, b->g);
    free(b->h);
}

static struct ibuf ibuf_new(struct pair *p, size_t n) {
    struct ibuf b = {.n = n};
    b.h = tp_calloc(n ? n : 1, sizeof(int));
    b.c = p->cpu.iface->alloc(p->cpu.ctx, n * sizeof(int));
    b.g = p->gpu.iface->alloc(p->gpu.ctx, n * sizeof(int));
    return b;
}

static void ibuf_push(struct pair *p, struct ibuf *b) {
    p->cpu.iface->copy_to_device(p->cpu.ctx, b->c, b->h, b->n * sizeof(int));
    p->gpu.iface->copy_to_device(p->gpu.ctx, b->g, b->h, b->n * sizeof(int));
}

static void ibuf_free(struct pair *p, struct ibuf *b) {
    p->cpu.iface->free(p->cpu.ctx, b->c);
    p->gpu.iface->free(p->gpu.ctx, b->g);
    free(b->h);
}

// ||a - b|| / ||b|| over n values; equal values (infinities included) count as no difference,
// any other non-finite value makes the error infinite. Falls back to ||a - b|| when b is all 0.
static double rel_err(const float *a, const float *b, size_t n) {
    double d2 = 0.0, b2 = 0.0;
    for (size_t i = 0; i < n; i++) {
        if (a[i] == b[i]) {
            if (isfinite(b[i])) b2 += (double)b[i] * b[i];
            continue;
        }
        if (!isfinite(a[i]) || !isfinite(b[i])) return INFINITY;
        double d = (double)a[i] - (double)b[i];
        d2 += d * d;
        b2 += (double)b[i] * b[i];
    }
    return b2 > 0.0 ? sqrt(d2 / b2) : sqrt(d2);
}

// Downloads the GPU copy into h and compares it with the CPU copy.
static double buf_rel(struct pair *p, struct buf *b) {
    p->gpu.iface->copy_to_host(p->gpu.ctx, b->h, b->g, b->n * sizeof(float));
    return rel_err(b->h, b->c, b->n);
}

static void expect_close(struct pair *p, struct buf *b, double tol, const char *what) {
    double r = buf_rel(p, b);
    cr_log_info("%s: relative error %.3g", what, r); // shown with --verbose: the margin left
    cr_expect(r < tol, "%s: relative error %.3g exceeds %.1g", what, r, tol);
}

// Pre-fills an output with the same random values on both backends.
static void buf_refill(struct pair *p, struct buf *b, float lo, float hi) {
    for (size_t i = 0; i < b->n; i++) b->h[i] = rng_uniform(&p->rng, lo, hi);
    buf_push(p, b);
}

// ---- memory and copies

Test(cuda_ops, alloc_copy_zero) {
    struct pair p;
    pair_open(&p, 1);
    const struct backend_i *g = p.gpu.iface;
    size_t sizes[] = {1, 7, 4096, ((size_t)1 << 20) + 3};
    for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++) {
        size_t n = sizes[s];
        float *h = tp_malloc(n * sizeof(float));
        float *d = g->alloc(p.gpu.ctx, n * sizeof(float));
        float *d2 = g->alloc(p.gpu.ctx, n * sizeof(float));
        for (size_t i = 0; i < n; i++) h[i] = 1.0f;
        g->copy_to_host(p.gpu.ctx, h, d, n * sizeof(float));
        size_t nonzero = 0;
        for (size_t i = 0; i < n; i++) nonzero += h[i] != 0.0f;
        cr_expect_eq(nonzero, 0, "alloc of %zu floats: %zu values not zero", n, nonzero);

        for (size_t i = 0; i < n; i++) h[i] = (float)i + 0.5f;
        g->copy_to_device(p.gpu.ctx, d, h, n * sizeof(float));
        g->copy(p.gpu.ctx, d2, d, n * sizeof(float));
        size_t half = n / 2;
        g->zero(p.gpu.ctx, d2, half * sizeof(float));
        memset(h, 0xff, n * sizeof(float));
        g->copy_to_host(p.gpu.ctx, h, d2, n * sizeof(float));
        size_t bad = 0;
        for (size_t i = 0; i < n; i++) bad += h[i] != (i < half ? 0.0f : (float)i + 0.5f);
        cr_expect_eq(bad, 0, "copy/zero round trip of %zu floats: %zu values wrong", n, bad);
        g->free(p.gpu.ctx, d);
        g->free(p.gpu.ctx, d2);
        free(h);
    }
    cr_expect_not_null(g->native_stream(p.gpu.ctx), "the CUDA backend must expose its stream");
    g->synchronize(p.gpu.ctx);
    pair_close(&p);
}

Test(cuda_ops, create_rejects_bad_device) {
    struct backend be = {0};
    char err[512] = "";
    int count = backend_cuda_device_count();
    cr_expect(!backend_cuda_create(&be, count + 3, err, sizeof err),
              "device %d of %d must be rejected", count + 3, count);
    cr_expect(err[0] != '\0', "a rejected create must say why");
    cr_expect_null(be.iface);
}

// ---- embeddings

struct emb_shape {
    int N, C, vocab_start, n_vocab, token_range; // tokens drawn from [0, token_range)
};

Test(cuda_ops, vocab_embedding) {
    struct pair p;
    pair_open(&p, 2);
    struct emb_shape shapes[] = {
        {7, 13, 0, 32, 29},              // tiny, odd channel count
        {7, 13, 16, 16, 29},             // second shard of the same
        {256, 768, 0, 25152, 50257},     // GPT-2 vocab over 2 shards: first
        {256, 768, 25152, 25152, 50257}, // second, holding the 47 padding rows
        {1000, 77, 0, 50, 50},           // many repeated tokens
        {3000, 65, 100, 40, 300},        // most tokens outside the shard
    };
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        struct emb_shape e = shapes[s];
        char what[160];
        struct ibuf tok = ibuf_new(&p, (size_t)e.N);
        for (int i = 0; i < e.N; i++) tok.h[i] = rng_int(&p.rng, e.token_range);
        ibuf_push(&p, &tok);
        struct buf wte = buf_rand(&p, (size_t)e.n_vocab * e.C, -1.0f, 1.0f);
        struct buf out = buf_rand(&p, (size_t)e.N * e.C, -5.0f, 5.0f); // "=": must be overwritten
        p.cpu.iface->vocab_embedding_fwd(p.cpu.ctx, out.c, tok.c, wte.c, e.N, e.C, e.vocab_start,
                                         e.n_vocab);
        p.gpu.iface->vocab_embedding_fwd(p.gpu.ctx, out.g, tok.g, wte.g, e.N, e.C, e.vocab_start,
                                         e.n_vocab);
        snprintf(what, sizeof what, "vocab_embedding_fwd N=%d C=%d start=%d n=%d", e.N, e.C,
                 e.vocab_start, e.n_vocab);
        expect_close(&p, &out, TOL, what);

        struct buf dout = buf_rand(&p, (size_t)e.N * e.C, -1.0f, 1.0f);
        buf_refill(&p, &wte, -1.0f, 1.0f); // dwte "+=": pre-filled
        p.cpu.iface->vocab_embedding_bwd(p.cpu.ctx, wte.c, dout.c, tok.c, e.N, e.C, e.vocab_start,
                                         e.n_vocab);
        p.gpu.iface->vocab_embedding_bwd(p.gpu.ctx, wte.g, dout.g, tok.g, e.N, e.C, e.vocab_start,
                                         e.n_vocab);
        snprintf(what, sizeof what, "vocab_embedding_bwd N=%d C=%d start=%d n=%d", e.N, e.C,
                 e.vocab_start, e.n_vocab);
        expect_close(&p, &wte, TOL, what);
        buf_free(&p, &dout);
        buf_free(&p, &out);
        buf_free(&p, &wte);
        ibuf_free(&p, &tok);
    }
    pair_close(&p);
}

Test(cuda_ops, position_embedding) {
    struct pair p;
    pair_open(&p, 3);
    int shapes[][3] = {{3, 7, 13}, {4, 64, 768}, {1, 1, 1}, {2, 1024, 768}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int B = shapes[s][0], T = shapes[s][1], C = shapes[s][2];
        char what[128];
        struct buf wpe = buf_rand(&p, (size_t)T * C, -1.0f, 1.0f);
        struct buf x = buf_rand(&p, (size_t)B * T * C, -1.0f, 1.0f); // "+="
        p.cpu.iface->position_embedding_fwd(p.cpu.ctx, x.c, wpe.c, B, T, C);
        p.gpu.iface->position_embedding_fwd(p.gpu.ctx, x.g, wpe.g, B, T, C);
        snprintf(what, sizeof what, "position_embedding_fwd B=%d T=%d C=%d", B, T, C);
        expect_close(&p, &x, TOL, what);

        struct buf dout = buf_rand(&p, (size_t)B * T * C, -1.0f, 1.0f);
        buf_refill(&p, &wpe, -1.0f, 1.0f); // dwpe "+="
        p.cpu.iface->position_embedding_bwd(p.cpu.ctx, wpe.c, dout.c, B, T, C);
        p.gpu.iface->position_embedding_bwd(p.gpu.ctx, wpe.g, dout.g, B, T, C);
        snprintf(what, sizeof what, "position_embedding_bwd B=%d T=%d C=%d", B, T, C);
        expect_close(&p, &wpe, TOL, what);
        buf_free(&p, &dout);
        buf_free(&p, &x);
        buf_free(&p, &wpe);
    }
    pair_close(&p);
}

// ---- layernorm

Test(cuda_ops, layernorm) {
    struct pair p;
    pair_open(&p, 4);
    int shapes[][2] = {{7, 13}, {256, 768}, {33, 1600}, {3, 1}, {5, 31}, {4, 2}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int N = shapes[s][0], C = shapes[s][1];
        char what[128];
        // rows with an offset and a spread, as residual streams have
        struct buf inp = buf_rand(&p, (size_t)N * C, -2.0f, 3.0f);
        struct buf w = buf_rand(&p, (size_t)C, 0.5f, 1.5f);
        struct buf b = buf_rand(&p, (size_t)C, -0.5f, 0.5f);
        struct buf out = buf_rand(&p, (size_t)N * C, -9.0f, 9.0f); // "="
        struct buf mean = buf_rand(&p, (size_t)N, -9.0f, 9.0f);
        struct buf rstd = buf_rand(&p, (size_t)N, -9.0f, 9.0f);
        p.cpu.iface->layernorm_fwd(p.cpu.ctx, out.c, mean.c, rstd.c, inp.c, w.c, b.c, N, C);
        p.gpu.iface->layernorm_fwd(p.gpu.ctx, out.g, mean.g, rstd.g, inp.g, w.g, b.g, N, C);
        snprintf(what, sizeof what, "layernorm_fwd out N=%d C=%d", N, C);
        expect_close(&p, &out, TOL, what);
        snprintf(what, sizeof what, "layernorm_fwd mean N=%d C=%d", N, C);
        expect_close(&p, &mean, TOL, what);
        snprintf(what, sizeof what, "layernorm_fwd rstd N=%d C=%d", N, C);
        expect_close(&p, &rstd, TOL, what);

        // the backward runs both backends on the CPU's statistics, so it is tested on its own
        p.gpu.iface->copy_to_device(p.gpu.ctx, mean.g, mean.c, (size_t)N * sizeof(float));
        p.gpu.iface->copy_to_device(p.gpu.ctx, rstd.g, rstd.c, (size_t)N * sizeof(float));
        struct buf dout = buf_rand(&p, (size_t)N * C, -1.0f, 1.0f);
        struct buf dinp = buf_rand(&p, (size_t)N * C, -1.0f, 1.0f); // "+="
        struct buf dw = buf_rand(&p, (size_t)C, -1.0f, 1.0f);       // "+="
        struct buf db = buf_rand(&p, (size_t)C, -1.0f, 1.0f);       // "+="
        p.cpu.iface->layernorm_bwd(p.cpu.ctx, dinp.c, dw.c, db.c, dout.c, inp.c, w.c, mean.c,
                                   rstd.c, N, C);
        p.gpu.iface->layernorm_bwd(p.gpu.ctx, dinp.g, dw.g, db.g, dout.g, inp.g, w.g, mean.g,
                                   rstd.g, N, C);
        snprintf(what, sizeof what, "layernorm_bwd dinp N=%d C=%d", N, C);
        expect_close(&p, &dinp, TOL, what);
        snprintf(what, sizeof what, "layernorm_bwd dw N=%d C=%d", N, C);
        expect_close(&p, &dw, TOL, what);
        snprintf(what, sizeof what, "layernorm_bwd db N=%d C=%d", N, C);
        expect_close(&p, &db, TOL, what);
        struct buf *all[] = {&inp, &w, &b, &out, &mean, &rstd, &dout, &dinp, &dw, &db};
        for (size_t k = 0; k < sizeof all / sizeof all[0]; k++) buf_free(&p, all[k]);
    }
    pair_close(&p);
}

// ---- linear layers

Test(cuda_ops, matmul) {
    struct pair p;
    pair_open(&p, 5);
    int shapes[][3] = {{7, 13, 29}, {256, 768, 2304}, {256, 3072, 768}, {64, 768, 1000},
                       {1, 1, 1},   {33, 65, 127}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int N = shapes[s][0], IC = shapes[s][1], OC = shapes[s][2];
        for (int variant = 0; variant < 2; variant++) {
            bool with_bias = variant == 0; // also: the backward with and without dinp/dbias
            char what[160];
            struct buf inp = buf_rand(&p, (size_t)N * IC, -1.0f, 1.0f);
            struct buf w = buf_rand(&p, (size_t)OC * IC, -0.1f, 0.1f);
            struct buf bias = buf_rand(&p, (size_t)OC, -1.0f, 1.0f);
            struct buf out = buf_rand(&p, (size_t)N * OC, -9.0f, 9.0f); // "="
            p.cpu.iface->matmul_fwd(p.cpu.ctx, out.c, inp.c, w.c, with_bias ? bias.c : NULL, N,
                                    IC, OC);
            p.gpu.iface->matmul_fwd(p.gpu.ctx, out.g, inp.g, w.g, with_bias ? bias.g : NULL, N,
                                    IC, OC);
            snprintf(what, sizeof what, "matmul_fwd N=%d IC=%d OC=%d bias=%d", N, IC, OC,
                     with_bias);
            expect_close(&p, &out, TOL, what);

            struct buf dout = buf_rand(&p, (size_t)N * OC, -1.0f, 1.0f);
            struct buf dinp = buf_rand(&p, (size_t)N * IC, -9.0f, 9.0f); // "="
            struct buf dw = buf_rand(&p, (size_t)OC * IC, -1.0f, 1.0f);  // "+="
            struct buf dbias = buf_rand(&p, (size_t)OC, -1.0f, 1.0f);    // "+="
            p.cpu.iface->matmul_bwd(p.cpu.ctx, with_bias ? dinp.c : NULL, dw.c,
                                    with_bias ? dbias.c : NULL, dout.c, inp.c, w.c, N, IC, OC);
            p.gpu.iface->matmul_bwd(p.gpu.ctx, with_bias ? dinp.g : NULL, dw.g,
                                    with_bias ? dbias.g : NULL, dout.g, inp.g, w.g, N, IC, OC);
            snprintf(what, sizeof what, "matmul_bwd dinp N=%d IC=%d OC=%d (skipped=%d)", N, IC, OC,
                     !with_bias);
            expect_close(&p, &dinp, TOL, what); // when skipped, both keep the pre-fill
            snprintf(what, sizeof what, "matmul_bwd dw N=%d IC=%d OC=%d", N, IC, OC);
            expect_close(&p, &dw, TOL, what);
            snprintf(what, sizeof what, "matmul_bwd dbias N=%d IC=%d OC=%d (skipped=%d)", N, IC,
                     OC, !with_bias);
            expect_close(&p, &dbias, TOL, what);
            struct buf *all[] = {&inp, &w, &bias, &out, &dout, &dinp, &dw, &dbias};
            for (size_t k = 0; k < sizeof all / sizeof all[0]; k++) buf_free(&p, all[k]);
        }
    }
    pair_close(&p);
}

Test(cuda_ops, residual) {
    struct pair p;
    pair_open(&p, 6);
    int shapes[][2] = {{7, 13}, {256, 768}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int N = shapes[s][0], C = shapes[s][1];
        size_t n = (size_t)N * C;
        // mode 0: separate out, bias; 1: out aliases res, no bias; 2: out aliases x, bias
        for (int mode = 0; mode < 3; mode++) {
            char what[128];
            struct buf res = buf_rand(&p, n, -1.0f, 1.0f);
            struct buf x = buf_rand(&p, n, -1.0f, 1.0f);
            struct buf bias = buf_rand(&p, (size_t)C, -1.0f, 1.0f);
            struct buf out = buf_rand(&p, n, -9.0f, 9.0f);
            struct buf *dst = mode == 0 ? &out : (mode == 1 ? &res : &x);
            p.cpu.iface->residual_fwd(p.cpu.ctx, dst->c, res.c, x.c, mode == 1 ? NULL : bias.c, N,
                                      C);
            p.gpu.iface->residual_fwd(p.gpu.ctx, dst->g, res.g, x.g, mode == 1 ? NULL : bias.g, N,
                                      C);
            snprintf(what, sizeof what, "residual_fwd N=%d C=%d mode=%d", N, C, mode);
            expect_close(&p, dst, TOL, what);
            buf_free(&p, &res);
            buf_free(&p, &x);
            buf_free(&p, &bias);
            buf_free(&p, &out);
        }
    }
    pair_close(&p);
}

Test(cuda_ops, gelu) {
    struct pair p;
    pair_open(&p, 7);
    size_t sizes[] = {7, 1000003};
    for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++) {
        size_t n = sizes[s];
        char what[128];
        struct buf inp = buf_rand(&p, n, -6.0f, 6.0f);
        inp.h[0] = 20.0f; // saturated tails
        if (n > 1) inp.h[1] = -20.0f;
        buf_push(&p, &inp);
        struct buf out = buf_rand(&p, n, -9.0f, 9.0f);
        p.cpu.iface->gelu_fwd(p.cpu.ctx, out.c, inp.c, n);
        p.gpu.iface->gelu_fwd(p.gpu.ctx, out.g, inp.g, n);
        snprintf(what, sizeof what, "gelu_fwd n=%zu", n);
        expect_close(&p, &out, TOL, what);

        struct buf dout = buf_rand(&p, n, -1.0f, 1.0f);
        struct buf dinp = buf_rand(&p, n, -9.0f, 9.0f);
        p.cpu.iface->gelu_bwd(p.cpu.ctx, dinp.c, inp.c, dout.c, n);
        p.gpu.iface->gelu_bwd(p.gpu.ctx, dinp.g, inp.g, dout.g, n);
        snprintf(what, sizeof what, "gelu_bwd n=%zu", n);
        expect_close(&p, &dinp, TOL, what);
        // in place: dinp aliases dout
        p.cpu.iface->gelu_bwd(p.cpu.ctx, dout.c, inp.c, dout.c, n);
        p.gpu.iface->gelu_bwd(p.gpu.ctx, dout.g, inp.g, dout.g, n);
        snprintf(what, sizeof what, "gelu_bwd in place n=%zu", n);
        expect_close(&p, &dout, TOL, what);
        buf_free(&p, &inp);
        buf_free(&p, &out);
        buf_free(&p, &dout);
        buf_free(&p, &dinp);
    }
    pair_close(&p);
}

// ---- attention

Test(cuda_ops, attention) {
    struct pair p;
    pair_open(&p, 8);
    int shapes[][4] = {{1, 7, 3, 13}, {2, 64, 4, 64}, {2, 100, 2, 16}, {1, 257, 2, 64},
                       {1, 1, 1, 1}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int B = shapes[s][0], T = shapes[s][1], NH = shapes[s][2], HS = shapes[s][3];
        size_t nqkv = (size_t)B * T * 3 * NH * HS, nout = (size_t)B * T * NH * HS;
        char what[128];
        const struct backend_i *ci = p.cpu.iface, *gi = p.gpu.iface;
        size_t c_saved = ci->attention_saved_floats(p.cpu.ctx, B, T, NH, HS);
        size_t c_scr = ci->attention_scratch_floats(p.cpu.ctx, B, T, NH, HS);
        size_t g_saved = gi->attention_saved_floats(p.gpu.ctx, B, T, NH, HS);
        size_t g_scr = gi->attention_scratch_floats(p.gpu.ctx, B, T, NH, HS);
        float *cs = ci->alloc(p.cpu.ctx, c_saved * sizeof(float));
        float *cx = ci->alloc(p.cpu.ctx, c_scr * sizeof(float));
        float *gs = gi->alloc(p.gpu.ctx, g_saved * sizeof(float));
        float *gx = gi->alloc(p.gpu.ctx, g_scr * sizeof(float));

        // scores of a few units, so the softmax is neither flat nor one-hot
        struct buf qkv = buf_rand(&p, nqkv, -1.5f, 1.5f);
        struct buf out = buf_rand(&p, nout, -9.0f, 9.0f); // "="
        ci->attention_fwd(p.cpu.ctx, out.c, cs, cx, qkv.c, B, T, NH, HS);
        gi->attention_fwd(p.gpu.ctx, out.g, gs, gx, qkv.g, B, T, NH, HS);
        snprintf(what, sizeof what, "attention_fwd B=%d T=%d NH=%d HS=%d", B, T, NH, HS);
        expect_close(&p, &out, TOL_LOOSE, what);

        struct buf dout = buf_rand(&p, nout, -1.0f, 1.0f);
        struct buf dqkv = buf_rand(&p, nqkv, -9.0f, 9.0f); // "="
        // the backward gets each backend's own forward output and saved state
        ci->attention_bwd(p.cpu.ctx, dqkv.c, cx, dout.c, qkv.c, out.c, cs, B, T, NH, HS);
        gi->attention_bwd(p.gpu.ctx, dqkv.g, gx, dout.g, qkv.g, out.g, gs, B, T, NH, HS);
        snprintf(what, sizeof what, "attention_bwd B=%d T=%d NH=%d HS=%d", B, T, NH, HS);
        expect_close(&p, &dqkv, TOL_LOOSE, what);

        ci->free(p.cpu.ctx, cs);
        ci->free(p.cpu.ctx, cx);
        gi->free(p.gpu.ctx, gs);
        gi->free(p.gpu.ctx, gx);
        buf_free(&p, &qkv);
        buf_free(&p, &out);
        buf_free(&p, &dout);
        buf_free(&p, &dqkv);
    }
    pair_close(&p);
}

// ---- vocab-parallel cross-entropy

struct xent_shape {
    int N, V, Vp, P; // rows, real vocab, padded vocab, shards
};

// Runs the three forward phases and the backward on every shard with the all-reduces done on the
// host, comparing each phase; then checks the GPU loss against a direct double-precision
// log-softmax of the unsharded logits.
static void xent_case(struct pair *p, struct xent_shape x) {
    int nv = x.Vp / x.P, N = x.N;
    char what[160];
    struct ibuf tgt = ibuf_new(p, (size_t)N);
    for (int i = 0; i < N; i++) tgt.h[i] = rng_int(&p->rng, x.V);
    ibuf_push(p, &tgt);
    struct buf logit[8], maxes[8], sums[8];
    cr_assert(x.P <= 8);
    for (int r = 0; r < x.P; r++) {
        logit[r] = buf_rand(p, (size_t)N * nv, -4.0f, 4.0f);
        maxes[r] = buf_rand(p, (size_t)N, -9.0f, 9.0f); // "="
        sums[r] = buf_rand(p, 2 * (size_t)N, -9.0f, 9.0f);
    }
    // phase 1 per shard, then the MAX all-reduce (on the CPU results, fed to both backends)
    struct buf gmax = buf_new(p, (size_t)N);
    for (int i = 0; i < N; i++) gmax.h[i] = -INFINITY;
    for (int r = 0; r < x.P; r++) {
        p->cpu.iface->xent_max(p->cpu.ctx, maxes[r].c, logit[r].c, N, r * nv, nv, x.V);
        p->gpu.iface->xent_max(p->gpu.ctx, maxes[r].g, logit[r].g, N, r * nv, nv, x.V);
        snprintf(what, sizeof what, "xent_max N=%d V=%d shard %d/%d", N, x.V, r, x.P);
        expect_close(p, &maxes[r], TOL_LOOSE, what);
        for (int i = 0; i < N; i++) gmax.h[i] = fmaxf(gmax.h[i], maxes[r].c[i]);
    }
    buf_push(p, &gmax);
    // phase 2 per shard, then the SUM all-reduce
    struct buf gsums = buf_new(p, 2 * (size_t)N);
    for (int r = 0; r < x.P; r++) {
        p->cpu.iface->xent_sums(p->cpu.ctx, sums[r].c, logit[r].c, gmax.c, tgt.c, N, r * nv, nv,
                                x.V);
        p->gpu.iface->xent_sums(p->gpu.ctx, sums[r].g, logit[r].g, gmax.g, tgt.g, N, r * nv, nv,
                                x.V);
        snprintf(what, sizeof what, "xent_sums N=%d V=%d shard %d/%d", N, x.V, r, x.P);
        expect_close(p, &sums[r], TOL_LOOSE, what);
        for (size_t i = 0; i < 2 * (size_t)N; i++) gsums.h[i] += sums[r].c[i];
    }
    buf_push(p, &gsums);
    // phase 3
    struct buf loss = buf_rand(p, (size_t)N, -9.0f, 9.0f);
    p->cpu.iface->xent_loss(p->cpu.ctx, loss.c, gmax.c, gsums.c, N);
    p->gpu.iface->xent_loss(p->gpu.ctx, loss.g, gmax.g, gsums.g, N);
    snprintf(what, sizeof what, "xent_loss N=%d V=%d P=%d", N, x.V, x.P);
    expect_close(p, &loss, TOL_LOOSE, what); // leaves the GPU losses in loss.h
    // against the unsharded math, in double
    double worst = 0.0;
    for (int i = 0; i < N; i++) {
        double mx = -INFINITY, se = 0.0, lt = 0.0;
        for (int r = 0; r < x.P; r++)
            for (int j = 0; j < nv && r * nv + j < x.V; j++)
                mx = fmax(mx, logit[r].h[(size_t)i * nv + j]);
        for (int r = 0; r < x.P; r++)
            for (int j = 0; j < nv && r * nv + j < x.V; j++) {
                double l = logit[r].h[(size_t)i * nv + j];
                se += exp(l - mx);
                if (r * nv + j == tgt.h[i]) lt = l;
            }
        double ref = log(se) + mx - lt;
        double d = fabs(loss.h[i] - ref) / fmax(fabs(ref), 1.0);
        if (d > worst) worst = d;
    }
    cr_expect(worst < TOL_LOOSE, "xent loss N=%d V=%d P=%d differs from the direct log-softmax "
              "by %.3g", N, x.V, x.P, worst);
    // backward; on shard 0 in place (dlogits aliases logits)
    float dloss = 1.0f / (float)N;
    for (int r = 0; r < x.P; r++) {
        struct buf dl = buf_rand(p, (size_t)N * nv, -9.0f, 9.0f);
        struct buf *dst = r == 0 ? &logit[r] : &dl;
        p->cpu.iface->xent_bwd(p->cpu.ctx, dst->c, logit[r].c, gmax.c, gsums.c, tgt.c, dloss, N,
                               r * nv, nv, x.V);
        p->gpu.iface->xent_bwd(p->gpu.ctx, dst->g, logit[r].g, gmax.g, gsums.g, tgt.g, dloss, N,
                               r * nv, nv, x.V);
        snprintf(what, sizeof what, "xent_bwd N=%d V=%d shard %d/%d%s", N, x.V, r, x.P,
                 r == 0 ? " in place" : "");
        expect_close(p, dst, TOL_LOOSE, what);
        // padding columns must be exactly 0
        size_t bad = 0;
        for (int i = 0; i < N; i++)
            for (int j = 0; j < nv; j++)
                if (r * nv + j >= x.V && dst->h[(size_t)i * nv + j] != 0.0f) bad++;
        cr_expect_eq(bad, 0, "xent_bwd shard %d: %zu padding gradients not 0", r, bad);
        buf_free(p, &dl);
    }
    for (int r = 0; r < x.P; r++) {
        buf_free(p, &logit[r]);
        buf_free(p, &maxes[r]);
        buf_free(p, &sums[r]);
    }
    buf_free(p, &gmax);
    buf_free(p, &gsums);
    buf_free(p, &loss);
    ibuf_free(p, &tgt);
}

Test(cuda_ops, cross_entropy) {
    struct pair p;
    pair_open(&p, 9);
    struct xent_shape shapes[] = {
        {7, 29, 32, 2},        // tiny, padding in the last shard
        {7, 29, 64, 4},        // the last shard is all padding
        {64, 50257, 50304, 2}, // GPT-2 over 2 shards
        {5, 50257, 50304, 1},  // GPT-2 unsharded
    };
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) xent_case(&p, shapes[s]);
    pair_close(&p);
}

// ---- reductions, scale, optimiser

Test(cuda_ops, reductions_and_scale) {
    struct pair p;
    pair_open(&p, 10);
    size_t sizes[] = {1, 7, 1000, ((size_t)1 << 20) + 17, ((size_t)3 << 22) + 5};
    struct buf out = buf_new(&p, 1);
    for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++) {
        size_t n = sizes[s];
        char what[128];
        struct buf x = buf_rand(&p, n, -0.75f, 1.25f); // biased so the sum is not near 0
        buf_refill(&p, &out, -9.0f, 9.0f);            // sum: "="
        p.cpu.iface->sum(p.cpu.ctx, out.c, x.c, n);
        p.gpu.iface->sum(p.gpu.ctx, out.g, x.g, n);
        snprintf(what, sizeof what, "sum n=%zu", n);
        expect_close(&p, &out, TOL, what);

        buf_refill(&p, &out, 1.0f, 100.0f); // sumsq_acc: "+="
        p.cpu.iface->sumsq_acc(p.cpu.ctx, out.c, x.c, n);
        p.gpu.iface->sumsq_acc(p.gpu.ctx, out.g, x.g, n);
        snprintf(what, sizeof what, "sumsq_acc n=%zu", n);
        expect_close(&p, &out, TOL, what);

        p.cpu.iface->scale(p.cpu.ctx, x.c, -0.37f, n);
        p.gpu.iface->scale(p.gpu.ctx, x.g, -0.37f, n);
        snprintf(what, sizeof what, "scale n=%zu", n);
        expect_close(&p, &x, TOL, what);
        buf_free(&p, &x);
    }
    buf_free(&p, &out);
    pair_close(&p);
}

Test(cuda_ops, adamw) {
    struct pair p;
    pair_open(&p, 11);
    size_t sizes[] = {7, 100003};
    for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++) {
        size_t n = sizes[s];
        struct buf par = buf_rand(&p, n, -1.0f, 1.0f);
        struct buf m = buf_new(&p, n), v = buf_new(&p, n);
        for (int t = 1; t <= 3; t++) {
            char what[128];
            struct buf g = buf_rand(&p, n, -0.01f, 0.01f);
            p.cpu.iface->adamw(p.cpu.ctx, par.c, g.c, m.c, v.c, n, 6e-4f, 0.9f, 0.95f, 1e-8f, 0.1f,
                               0.5f, t);
            p.gpu.iface->adamw(p.gpu.ctx, par.g, g.g, m.g, v.g, n, 6e-4f, 0.9f, 0.95f, 1e-8f, 0.1f,
                               0.5f, t);
            snprintf(what, sizeof what, "adamw p n=%zu t=%d", n, t);
            expect_close(&p, &par, TOL, what);
            snprintf(what, sizeof what, "adamw m n=%zu t=%d", n, t);
            expect_close(&p, &m, TOL, what);
            snprintf(what, sizeof what, "adamw v n=%zu t=%d", n, t);
            expect_close(&p, &v, TOL, what);
            // continue both from identical state so errors do not compound
            p.gpu.iface->copy_to_device(p.gpu.ctx, m.g, m.c, n * sizeof(float));
            p.gpu.iface->copy_to_device(p.gpu.ctx, v.g, v.c, n * sizeof(float));
            p.gpu.iface->copy_to_device(p.gpu.ctx, par.g, par.c, n * sizeof(float));
            buf_free(&p, &g);
        }
        buf_free(&p, &par);
        buf_free(&p, &m);
        buf_free(&p, &v);
    }
    pair_close(&p);
}

// ---- determinism: a layer's worth of ops, twice, must give bitwise equal results

// Runs the ops that reduce (where float order matters) on fixed inputs from seed and returns
// every output, concatenated, in a new host array of *n floats.
static float *det_run(struct backend be, uint64_t seed, size_t *n_out) {
    const struct backend_i *g = be.iface;
    void *cx = be.ctx;
    enum { B = 2, T = 128, NH = 12, HS = 64, C = NH * HS, NV = 5000, V = 4999 };
    const int N = B * T;
    uint64_t rng = seed;
    size_t total = 0;
    float *res = NULL;
// allocate a device tensor of n floats with random values in [lo, hi)
#define DET_RAND(name, n, lo, hi)                                                         \
    float *name = g->alloc(cx, (size_t)(n) * sizeof(float));                              \
    {                                                                                     \
        float *h_ = tp_malloc((size_t)(n) * sizeof(float));                               \
        for (size_t i_ = 0; i_ < (size_t)(n); i_++) h_[i_] = rng_uniform(&rng, lo, hi);   \
        g->copy_to_device(cx, name, h_, (size_t)(n) * sizeof(float));                     \
        free(h_);                                                                         \
    }
// append a device tensor of n floats to the result
#define DET_KEEP(ptr, n)                                                                   \
    {                                                                                      \
        res = realloc(res, (total + (size_t)(n)) * sizeof(float));                         \
        cr_assert_not_null(res);                                                           \
        g->copy_to_host(cx, res + total, ptr, (size_t)(n) * sizeof(float));                \
        total += (size_t)(n);                                                              \
    }
    int *tok_h = tp_malloc((size_t)N * sizeof(int));
    for (int i = 0; i < N; i++) tok_h[i] = rng_int(&rng, 40); // heavy repeats
    int *tok = g->alloc(cx, (size_t)N * sizeof(int));
    g->copy_to_device(cx, tok, tok_h, (size_t)N * sizeof(int));

    DET_RAND(wte, (size_t)NV * C, -1.0f, 1.0f);
    DET_RAND(wpe, (size_t)T * C, -1.0f, 1.0f);
    DET_RAND(lnw, C, 0.5f, 1.5f);
    DET_RAND(lnb, C, -0.5f, 0.5f);
    DET_RAND(wqkv, (size_t)3 * C * C, -0.05f, 0.05f);
    DET_RAND(bqkv, 3 * C, -0.1f, 0.1f);
    float *x = g->alloc(cx, (size_t)N * C * sizeof(float));
    float *ln = g->alloc(cx, (size_t)N * C * sizeof(float));
    float *mean = g->alloc(cx, (size_t)N * sizeof(float));
    float *rstd = g->alloc(cx, (size_t)N * sizeof(float));
    float *qkv = g->alloc(cx, (size_t)N * 3 * C * sizeof(float));
    float *att = g->alloc(cx, (size_t)N * C * sizeof(float));
    size_t ns = g->attention_saved_floats(cx, B, T, NH, HS);
    size_t nx = g->attention_scratch_floats(cx, B, T, NH, HS);
    float *saved = g->alloc(cx, ns * sizeof(float));
    float *scratch = g->alloc(cx, nx * sizeof(float));

    g->vocab_embedding_fwd(cx, x, tok, wte, N, C, 0, NV);
    g->position_embedding_fwd(cx, x, wpe, B, T, C);
    g->layernorm_fwd(cx, ln, mean, rstd, x, lnw, lnb, N, C);
    g->matmul_fwd(cx, qkv, ln, wqkv, bqkv, N, C, 3 * C);
    g->attention_fwd(cx, att, saved, scratch, qkv, B, T, NH, HS);
    DET_KEEP(ln, (size_t)N * C);
    DET_KEEP(qkv, (size_t)N * 3 * C);
    DET_KEEP(att, (size_t)N * C);

    DET_RAND(datt, (size_t)N * C, -1.0f, 1.0f);
    float *dqkv = g->alloc(cx, (size_t)N * 3 * C * sizeof(float));
    float *dln = g->alloc(cx, (size_t)N * C * sizeof(float));
    float *dx = g->alloc(cx, (size_t)N * C * sizeof(float));
    float *dwqkv = g->alloc(cx, (size_t)3 * C * C * sizeof(float));
    float *dbqkv = g->alloc(cx, (size_t)3 * C * sizeof(float));
    float *dlnw = g->alloc(cx, (size_t)C * sizeof(float));
    float *dlnb = g->alloc(cx, (size_t)C * sizeof(float));
    float *dwte = g->alloc(cx, (size_t)NV * C * sizeof(float));
    float *dwpe = g->alloc(cx, (size_t)T * C * sizeof(float));
    g->attention_bwd(cx, dqkv, scratch, datt, qkv, att, saved, B, T, NH, HS);
    g->matmul_bwd(cx, dln, dwqkv, dbqkv, dqkv, ln, wqkv, N, C, 3 * C);
    g->layernorm_bwd(cx, dx, dlnw, dlnb, dln, x, lnw, mean, rstd, N, C);
    g->vocab_embedding_bwd(cx, dwte, dx, tok, N, C, 0, NV);
    g->position_embedding_bwd(cx, dwpe, dx, B, T, C);
    DET_KEEP(dqkv, (size_t)N * 3 * C);
    DET_KEEP(dwqkv, (size_t)3 * C * C);
    DET_KEEP(dbqkv, (size_t)3 * C);
    DET_KEEP(dx, (size_t)N * C);
    DET_KEEP(dlnw, C);
    DET_KEEP(dlnb, C);
    DET_KEEP(dwte, (size_t)NV * C);
    DET_KEEP(dwpe, (size_t)T * C);

    // the LM head's loss on a vocabulary shard with padding
    float *logits = g->alloc(cx, (size_t)N * NV * sizeof(float));
    g->matmul_fwd(cx, logits, ln, wte, NULL, N, C, NV);
    int *tgt = g->alloc(cx, (size_t)N * sizeof(int));
    g->copy_to_device(cx, tgt, tok_h, (size_t)N * sizeof(int));
    float *maxes = g->alloc(cx, (size_t)N * sizeof(float));
    float *sums = g->alloc(cx, 2 * (size_t)N * sizeof(float));
    float *losses = g->alloc(cx, (size_t)N * sizeof(float));
    g->xent_max(cx, maxes, logits, N, 0, NV, V);
    g->xent_sums(cx, sums, logits, maxes, tgt, N, 0, NV, V);
    g->xent_loss(cx, losses, maxes, sums, N);
    g->xent_bwd(cx, logits, logits, maxes, sums, tgt, 1.0f / N, N, 0, NV, V);
    DET_KEEP(sums, 2 * (size_t)N);
    DET_KEEP(losses, (size_t)N);
    DET_KEEP(logits, (size_t)N * NV);

    // norms and the optimiser
    float *acc = g->alloc(cx, 2 * sizeof(float));
    g->sum(cx, acc, dwqkv, (size_t)3 * C * C);
    g->sumsq_acc(cx, acc + 1, dwqkv, (size_t)3 * C * C);
    g->sumsq_acc(cx, acc + 1, dwte, (size_t)NV * C);
    DET_KEEP(acc, 2);
    float *m = g->alloc(cx, (size_t)3 * C * C * sizeof(float));
    float *v = g->alloc(cx, (size_t)3 * C * C * sizeof(float));
    g->adamw(cx, wqkv, dwqkv, m, v, (size_t)3 * C * C, 6e-4f, 0.9f, 0.95f, 1e-8f, 0.1f, 0.7f, 1);
    DET_KEEP(wqkv, (size_t)3 * C * C);
#undef DET_RAND
#undef DET_KEEP

    void *all[] = {tok, wte, wpe, lnw, lnb, wqkv, bqkv, x, ln, mean, rstd, qkv, att, saved,
                   scratch, datt, dqkv, dln, dx, dwqkv, dbqkv, dlnw, dlnb, dwte, dwpe, logits,
                   tgt, maxes, sums, losses, acc, m, v};
    for (size_t k = 0; k < sizeof all / sizeof all[0]; k++) g->free(cx, all[k]);
    free(tok_h);
    *n_out = total;
    return res;
}

Test(cuda_ops, deterministic) {
    struct pair p;
    pair_open(&p, 12);
    size_t n1 = 0, n2 = 0;
    float *r1 = det_run(p.gpu, 777, &n1);
    float *r2 = det_run(p.gpu, 777, &n2);
    cr_assert_eq(n1, n2);
    size_t differ = 0, first = n1;
    for (size_t i = 0; i < n1; i++)
        if (memcmp(&r1[i], &r2[i], sizeof(float)) != 0) {
            if (first == n1) first = i;
            differ++;
        }
    cr_expect_eq(differ, 0, "two identical runs differ in %zu of %zu values (first at %zu)",
                 differ, n1, first);
    // the same on a second, fresh backend instance
    struct backend other;
    char err[512];
    cr_assert(backend_cuda_create(&other, 0, err, sizeof err), "%s", err);
    size_t n3 = 0;
    float *r3 = det_run(other, 777, &n3);
    cr_assert_eq(n1, n3);
    cr_expect(memcmp(r1, r3, n1 * sizeof(float)) == 0,
              "a second backend instance gives different bits");
    // and a different seed must change them (the check above is not vacuous)
    size_t n4 = 0;
    float *r4 = det_run(p.gpu, 778, &n4);
    cr_expect(memcmp(r1, r4, n1 * sizeof(float)) != 0, "different inputs gave identical outputs");
    backend_destroy(&other);
    free(r1);
    free(r2);
    free(r3);
    free(r4);
    pair_close(&p);
}

// ---- NCCL on one rank

static void mpi_up(void) {
    int inited = 0;
    MPI_Initialized(&inited);
    if (!inited) {
        int provided = 0;
        MPI_Init_thread(NULL, NULL, MPI_THREAD_FUNNELED, &provided);
    }
}

static void mpi_down(void) {
    int inited = 0, finalized = 0;
    MPI_Initialized(&inited);
    MPI_Finalized(&finalized);
    if (inited && !finalized) MPI_Finalize();
}

TestSuite(cuda_nccl, .init = mpi_up, .fini = mpi_down, .timeout = 180);

Test(cuda_nccl, refuses_cpu_backend) {
    // needs no GPU: a CPU backend has no stream, so NCCL must say no (or the build has no NCCL)
    struct backend cpu = backend_cpu_create();
    struct comm c;
    char err[512] = "";
    MPI_Comm world = MPI_COMM_WORLD;
    cr_expect(!comm_nccl_create(&c, &world, cpu, err, sizeof err));
    cr_expect(err[0] != '\0', "a refused comm_nccl_create must say why");
    backend_destroy(&cpu);
}

Test(cuda_nccl, one_rank_collectives) {
    if (!backend_cuda_available() || backend_cuda_device_count() <= 0 || !comm_nccl_available())
        cr_skip_test("no CUDA device: NCCL cannot be exercised on this machine");
    struct backend be;
    char err[512] = "";
    cr_assert(backend_cuda_create(&be, 0, err, sizeof err), "backend_cuda_create: %s", err);
    struct comm c;
    MPI_Comm world = MPI_COMM_WORLD;
    cr_assert(comm_nccl_create(&c, &world, be, err, sizeof err), "comm_nccl_create: %s", err);
    cr_expect_eq(c.rank, 0);
    cr_expect_eq(c.size, 1);
    cr_expect_str_eq(c.iface->name(c.ctx), "nccl");

    const size_t n = 1037;
    float *h = tp_malloc(2 * n * sizeof(float)), *back = tp_malloc(2 * n * sizeof(float));
    uint64_t rng = 99;
    for (size_t i = 0; i < n; i++) h[i] = rng_uniform(&rng, -1.0f, 1.0f);
    float *d = be.iface->alloc(be.ctx, n * sizeof(float));
    float *d2 = be.iface->alloc(be.ctx, n * sizeof(float));
    be.iface->copy_to_device(be.ctx, d, h, n * sizeof(float));
    // on one rank every reduction is the identity, and the data must survive it bit for bit
    enum comm_op ops[] = {COMM_SUM, COMM_MAX, COMM_AVG};
    for (size_t k = 0; k < 3; k++) {
        c.iface->all_reduce(c.ctx, d, n, COMM_F32, ops[k]);
        c.iface->synchronize(c.ctx);
        be.iface->copy_to_host(be.ctx, back, d, n * sizeof(float));
        cr_expect(memcmp(back, h, n * sizeof(float)) == 0, "all_reduce op %d changed the data",
                  (int)ops[k]);
    }
    c.iface->all_gather(c.ctx, d2, d, n, COMM_F32);
    c.iface->synchronize(c.ctx);
    be.iface->copy_to_host(be.ctx, back, d2, n * sizeof(float));
    cr_expect(memcmp(back, h, n * sizeof(float)) == 0, "all_gather on one rank is a copy");

    be.iface->zero(be.ctx, d2, n * sizeof(float));
    c.iface->reduce_scatter(c.ctx, d2, d, n, COMM_F32, COMM_SUM);
    c.iface->broadcast(c.ctx, d2, n, COMM_F32, 0);
    c.iface->synchronize(c.ctx);
    be.iface->copy_to_host(be.ctx, back, d2, n * sizeof(float));
    cr_expect(memcmp(back, h, n * sizeof(float)) == 0, "reduce_scatter + broadcast on one rank");

    // integer data through the same path
    int *hi = tp_malloc(n * sizeof(int)), *bi = tp_malloc(n * sizeof(int));
    for (size_t i = 0; i < n; i++) hi[i] = (int)i * 7 - 300;
    int *di = be.iface->alloc(be.ctx, n * sizeof(int));
    be.iface->copy_to_device(be.ctx, di, hi, n * sizeof(int));
    c.iface->all_reduce(c.ctx, di, n, COMM_I32, COMM_SUM);
    c.iface->synchronize(c.ctx);
    be.iface->copy_to_host(be.ctx, bi, di, n * sizeof(int));
    cr_expect(memcmp(bi, hi, n * sizeof(int)) == 0, "int32 all_reduce on one rank");

    // collectives are ordered with the backend's kernels on its stream
    be.iface->scale(be.ctx, d, 2.0f, n);
    c.iface->all_reduce(c.ctx, d, n, COMM_F32, COMM_SUM);
    be.iface->scale(be.ctx, d, 0.5f, n);
    c.iface->synchronize(c.ctx);
    be.iface->copy_to_host(be.ctx, back, d, n * sizeof(float));
    cr_expect(memcmp(back, h, n * sizeof(float)) == 0, "kernel / collective / kernel ordering");

    be.iface->free(be.ctx, d);
    be.iface->free(be.ctx, d2);
    be.iface->free(be.ctx, di);
    free(h);
    free(back);
    free(hi);
    free(bi);
    comm_destroy(&c);
    backend_destroy(&be);
}

// ---- runner (exit 77 = SKIP without a CUDA device; see testutil.h)

int main(int argc, char *argv[]) { return tu_gpu_suite_main(argc, argv, "test_cuda_ops"); }
