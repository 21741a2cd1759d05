// test_cuda_ops.c: the CUDA backend against the fp32 CPU reference, op by op, forward and
// backward, on both compute types; bitwise determinism of the CUDA ops; the NCCL comm on one rank.
//
// Every case draws fresh random inputs, uploads the same values to both backends, runs the op on
// each and compares. Outputs that accumulate ("+=") are pre-filled with random values, so an op
// that overwrote them would fail; outputs that are overwritten ("=") are pre-filled too, so an op
// that accumulated would fail. Shapes include sizes that are not multiples of any block or vector
// size (the element-wise fallbacks) and the real GPT-2 ones (the vectorised paths).
//
// Two suites. cuda_ops runs the fp32 CUDA backend against the fp32 CPU backend with the relative
// error ||gpu - cpu|| / ||cpu|| at 1e-5 (1e-4 for attention and the loss). cuda_bf16 runs the
// bf16 CUDA backend against the same fp32 CPU backend: compute-type inputs are rounded to bf16
// once on the host and the CPU gets exactly those values, so the comparison measures the GPU's
// own bf16 rounding (outputs stored in bf16, the products' and attention's internal roundings);
// the error there is max |gpu - cpu| / max |cpu| (max-abs-normalised), at about 1e-2, and any NaN
// or infinity where the reference is finite fails.
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
#include <float.h>
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
#include "tp.h"

// ---- helpers: random numbers, paired buffers, comparison

#define TOL 1e-5       // fp32: most ops
#define TOL_LOOSE 1e-4 // fp32: attention, softmax, loss: exp and long dot products
#define TOL_BF16 1e-2  // bf16: max-abs-normalised, outputs rounded to 8 significant bits
#define TOL_BF16_ATTN 2e-2 // bf16 attention: probabilities are also rounded for the tensor cores

struct pair {
    struct backend cpu, gpu; // cpu: fp32 reference; gpu: CUDA in dt
    enum tp_dtype dt;
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

static float bf16_round(float x) { return tp_bf16_to_f32(tp_bf16_from_f32(x)); }

static void require_gpu(void) {
    if (!backend_cuda_available() || backend_cuda_device_count() <= 0)
        cr_skip_test("no CUDA device: the CUDA backend cannot be exercised on this machine");
}

static void pair_open_dt(struct pair *p, uint64_t seed, enum tp_dtype dt) {
    require_gpu();
    char err[512] = "";
    cr_assert(backend_cuda_create(&p->gpu, 0, dt, err, sizeof err), "backend_cuda_create(%s): %s",
              tp_dtype_name(dt), err);
    cr_assert_str_eq(p->gpu.iface->name(p->gpu.ctx), "cuda");
    cr_assert_eq(p->gpu.iface->dtype(p->gpu.ctx), dt);
    p->cpu = backend_cpu_create(TP_DTYPE_F32);
    p->dt = dt;
    p->rng = seed;
}

static void pair_open(struct pair *p, uint64_t seed) { pair_open_dt(p, seed, TP_DTYPE_F32); }

static void pair_close(struct pair *p) {
    backend_destroy(&p->gpu);
    backend_destroy(&p->cpu);
}

static bool pair_bf16(const struct pair *p) { return p->dt == TP_DTYPE_BF16; }

// run on a pair whose GPU backend was created with var=value in the environment (the backend
// reads its kernel switches at creation; each test runs in a process of its own)
static void run_with(const char *var, const char *value, enum tp_dtype dt, uint64_t seed, void (*run)(struct pair *)) {
    cr_assert_eq(setenv(var, value, 1), 0);
    struct pair p;
    pair_open_dt(&p, seed, dt);
    run(&p);
    pair_close(&p);
}

// The tolerance of a comparison: the fp32 one given, or the bf16 one.
static double tol_for(const struct pair *p, double f32_tol) {
    return pair_bf16(p) ? TOL_BF16 : f32_tol;
}

// One tensor held three times: host staging (h), CPU-backend memory (c, fp32), GPU memory (g).
// A compute tensor (compute = true) lives on the GPU in the GPU backend's dtype; its host values
// are rounded to that type on every push, so both backends see the same numbers.
struct buf {
    size_t n;
    bool compute;
    float *h; // (n)
    float *c; // (n)
    void *g;  // (n) fp32 or bf16
};

struct ibuf {
    size_t n;
    int *h, *c, *g; // (n) each
};

static size_t buf_gpu_elem(const struct pair *p, const struct buf *b) {
    return b->compute ? tp_dtype_size(p->dt) : sizeof(float);
}

static struct buf buf_alloc(struct pair *p, size_t n, bool compute) {
    struct buf b = {.n = n, .compute = compute};
    b.h = tp_calloc(n ? n : 1, sizeof(float));
    b.c = p->cpu.iface->alloc(p->cpu.ctx, n * sizeof(float));
    b.g = p->gpu.iface->alloc(p->gpu.ctx, n * buf_gpu_elem(p, &b));
    return b;
}

// an fp32 tensor (float * in the op table)
static struct buf buf_new(struct pair *p, size_t n) { return buf_alloc(p, n, false); }
// a compute-type tensor (void * in the op table)
static struct buf cbuf_new(struct pair *p, size_t n) { return buf_alloc(p, n, true); }

// Rounds h to the GPU's storage (compute bf16 tensors), then uploads it to both backends.
static void buf_push(struct pair *p, struct buf *b) {
    if (b->compute && pair_bf16(p)) {
        uint16_t *s = tp_malloc((b->n ? b->n : 1) * sizeof(uint16_t));
        for (size_t i = 0; i < b->n; i++) {
            s[i] = tp_bf16_from_f32(b->h[i]);
            b->h[i] = tp_bf16_to_f32(s[i]);
        }
        p->gpu.iface->copy_to_device(p->gpu.ctx, b->g, s, b->n * sizeof(uint16_t));
        free(s);
    } else {
        p->gpu.iface->copy_to_device(p->gpu.ctx, b->g, b->h, b->n * sizeof(float));
    }
    p->cpu.iface->copy_to_device(p->cpu.ctx, b->c, b->h, b->n * sizeof(float));
}

// Downloads the GPU copy into h, widened to fp32.
static void buf_pull(struct pair *p, struct buf *b) {
    if (b->compute && pair_bf16(p)) {
        uint16_t *s = tp_malloc((b->n ? b->n : 1) * sizeof(uint16_t));
        p->gpu.iface->copy_to_host(p->gpu.ctx, s, b->g, b->n * sizeof(uint16_t));
        for (size_t i = 0; i < b->n; i++) b->h[i] = tp_bf16_to_f32(s[i]);
        free(s);
    } else {
        p->gpu.iface->copy_to_host(p->gpu.ctx, b->h, b->g, b->n * sizeof(float));
    }
}

static void buf_fill(struct pair *p, struct buf *b, float lo, float hi) {
    for (size_t i = 0; i < b->n; i++) b->h[i] = rng_uniform(&p->rng, lo, hi);
    buf_push(p, b);
}

static struct buf buf_rand(struct pair *p, size_t n, float lo, float hi) {
    struct buf b = buf_new(p, n);
    buf_fill(p, &b, lo, hi);
    return b;
}

static struct buf cbuf_rand(struct pair *p, size_t n, float lo, float hi) {
    struct buf b = cbuf_new(p, n);
    buf_fill(p, &b, lo, hi);
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

// max |a - b| / max |b| over n values, with rel_err's treatment of non-finite values.
static double max_err(const float *a, const float *b, size_t n) {
    double dm = 0.0, bm = 0.0;
    for (size_t i = 0; i < n; i++) {
        if (a[i] == b[i]) {
            if (isfinite(b[i])) bm = fmax(bm, fabs((double)b[i]));
            continue;
        }
        if (!isfinite(a[i]) || !isfinite(b[i])) return INFINITY;
        dm = fmax(dm, fabs((double)a[i] - (double)b[i]));
        bm = fmax(bm, fabs((double)b[i]));
    }
    return bm > 0.0 ? dm / bm : dm;
}

// Downloads the GPU copy into h and compares it with the CPU copy, by the pair's metric.
static double buf_err(struct pair *p, struct buf *b) {
    buf_pull(p, b);
    return pair_bf16(p) ? max_err(b->h, b->c, b->n) : rel_err(b->h, b->c, b->n);
}

static void expect_close(struct pair *p, struct buf *b, double tol, const char *what) {
    double r = buf_err(p, b);
    cr_log_info("[%s] %s: error %.3g", tp_dtype_name(p->dt), what, r); // --verbose: the margin
    cr_expect(r < tol, "[%s] %s: error %.3g exceeds %.1g", tp_dtype_name(p->dt), what, r, tol);
}

// A sum the GPU added into sum (C floats; start: its values before the op) must be the column sums
// of rows (n, C), both as downloaded into h: within float rounding of the sums in double.
static void expect_sums_of_stored(const struct pair *p, const struct buf *sum, const double *start,
                                  const struct buf *rows, size_t n, size_t C, const char *what) {
    double dm = 0.0, wm = 0.0;
    for (size_t c = 0; c < C; c++) {
        double want = start[c];
        for (size_t r = 0; r < n; r++) want += rows->h[r * C + c];
        dm = fmax(dm, fabs(sum->h[c] - want));
        wm = fmax(wm, fabs(want));
    }
    cr_expect(dm <= 1e-5 * wm, "[%s] %s: %.3g from the column sums of the stored rows", tp_dtype_name(p->dt), what,
              dm / wm);
}

// ---- memory, copies and conversions

static void run_alloc_copy_zero(struct pair *p) {
    const struct backend_i *g = p->gpu.iface;
    size_t sizes[] = {1, 7, 4096, ((size_t)1 << 20) + 3};
    for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++) {
        size_t n = sizes[s];
        float *h = tp_malloc(n * sizeof(float));
        float *d = g->alloc(p->gpu.ctx, n * sizeof(float));
        float *d2 = g->alloc(p->gpu.ctx, n * sizeof(float));
        for (size_t i = 0; i < n; i++) h[i] = 1.0f;
        g->copy_to_host(p->gpu.ctx, h, d, n * sizeof(float));
        size_t nonzero = 0;
        for (size_t i = 0; i < n; i++) nonzero += h[i] != 0.0f;
        cr_expect_eq(nonzero, 0, "alloc of %zu floats: %zu values not zero", n, nonzero);

        for (size_t i = 0; i < n; i++) h[i] = (float)i + 0.5f;
        g->copy_to_device(p->gpu.ctx, d, h, n * sizeof(float));
        g->copy(p->gpu.ctx, d2, d, n * sizeof(float));
        size_t half = n / 2;
        g->zero(p->gpu.ctx, d2, half * sizeof(float));
        memset(h, 0xff, n * sizeof(float));
        g->copy_to_host(p->gpu.ctx, h, d2, n * sizeof(float));
        size_t bad = 0;
        for (size_t i = 0; i < n; i++) bad += h[i] != (i < half ? 0.0f : (float)i + 0.5f);
        cr_expect_eq(bad, 0, "copy/zero round trip of %zu floats: %zu values wrong", n, bad);
        g->free(p->gpu.ctx, d);
        g->free(p->gpu.ctx, d2);
        free(h);
    }
    cr_expect_not_null(g->native_stream(p->gpu.ctx), "the CUDA backend must expose its stream");
    g->synchronize(p->gpu.ctx);
}

Test(cuda_ops, alloc_copy_zero) {
    struct pair p;
    pair_open(&p, 1);
    run_alloc_copy_zero(&p);
    pair_close(&p);
}

Test(cuda_bf16, alloc_copy_zero) {
    struct pair p;
    pair_open_dt(&p, 1, TP_DTYPE_BF16);
    run_alloc_copy_zero(&p);
    pair_close(&p);
}

Test(cuda_ops, create_rejects_bad_device) {
    struct backend be = {0};
    char err[512] = "";
    int count = backend_cuda_device_count();
    cr_expect(!backend_cuda_create(&be, count + 3, TP_DTYPE_F32, err, sizeof err),
              "device %d of %d must be rejected", count + 3, count);
    cr_expect(err[0] != '\0', "a rejected create must say why");
    cr_expect_null(be.iface);
    err[0] = '\0';
    cr_expect(!backend_cuda_create(&be, count + 3, TP_DTYPE_BF16, err, sizeof err));
    cr_expect(err[0] != '\0', "a rejected bf16 create must say why");
    cr_expect_null(be.iface);
}

// to_compute rounds to nearest even exactly as tp_bf16_from_f32 does (bf16), or copies (fp32);
// from_compute widens exactly. Sizes and offsets reach the vector and element-wise paths.
static void run_conversions(struct pair *p) {
    const struct backend_i *g = p->gpu.iface;
    size_t es = tp_dtype_size(p->dt);
    size_t sizes[] = {1, 7, 1000003};
    for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++) {
        for (size_t off = 0; off < 2; off++) { // off = 1: pointers not 16-byte aligned
            size_t n = sizes[s];
            float *h = tp_malloc((n + 1) * sizeof(float));
            for (size_t i = 0; i < n + 1; i++) {
                // a wide range of exponents, both signs, ties included (low bits 0x8000)
                float v = rng_uniform(&p->rng, -1.0f, 1.0f) * ldexpf(1.0f, rng_int(&p->rng, 60) - 30);
                if (i % 5 == 1) {
                    uint32_t u;
                    memcpy(&u, &v, sizeof u);
                    u = (u & 0xffff0000u) | 0x8000u; // exactly halfway between two bf16 values
                    memcpy(&v, &u, sizeof v);
                }
                h[i] = v;
            }
            float special[] = {0.0f, -0.0f, 1e-40f, -3e-39f, FLT_MAX, -FLT_MAX, INFINITY,
                               -INFINITY, 1.0f, 65504.0f};
            for (size_t k = 0; k < sizeof special / sizeof special[0] && k < n; k++) h[k + off] = special[k];
            if (n > 12) h[off + 11] = NAN;
            float *src = g->alloc(p->gpu.ctx, (n + 1) * sizeof(float));
            unsigned char *dst = g->alloc(p->gpu.ctx, (n + 1) * es);
            float *back = g->alloc(p->gpu.ctx, (n + 1) * sizeof(float));
            g->copy_to_device(p->gpu.ctx, src, h, (n + 1) * sizeof(float));
            g->to_compute(p->gpu.ctx, dst + off * es, src + off, n);
            g->from_compute(p->gpu.ctx, back + off, dst + off * es, n);
            unsigned char *ct = tp_malloc((n + 1) * es);
            float *wide = tp_malloc((n + 1) * sizeof(float));
            g->copy_to_host(p->gpu.ctx, ct, dst, (n + 1) * es);
            g->copy_to_host(p->gpu.ctx, wide, back, (n + 1) * sizeof(float));
            size_t bad = 0, first = n;
            for (size_t i = off; i < n + off; i++) {
                float want = pair_bf16(p) ? bf16_round(h[i]) : h[i];
                bool ok;
                if (isnan(h[i])) {
                    ok = isnan(wide[i]);
                } else if (pair_bf16(p)) {
                    uint16_t got;
                    memcpy(&got, ct + i * es, sizeof got);
                    ok = got == tp_bf16_from_f32(h[i]) && memcmp(&wide[i], &want, sizeof want) == 0;
                } else {
                    ok = memcmp(ct + i * es, &h[i], sizeof(float)) == 0 &&
                         memcmp(&wide[i], &h[i], sizeof(float)) == 0;
                }
                if (!ok && bad++ == 0) first = i;
            }
            cr_expect_eq(bad, 0, "[%s] to_compute/from_compute n=%zu offset %zu: %zu values wrong "
                         "(first at %zu: %.9g)", tp_dtype_name(p->dt), n, off, bad, first,
                         first < n + off ? (double)h[first] : 0.0);
            g->free(p->gpu.ctx, src);
            g->free(p->gpu.ctx, dst);
            g->free(p->gpu.ctx, back);
            free(h);
            free(ct);
            free(wide);
        }
    }
}

Test(cuda_ops, conversions) {
    struct pair p;
    pair_open(&p, 13);
    run_conversions(&p);
    pair_close(&p);
}

Test(cuda_bf16, conversions) {
    struct pair p;
    pair_open_dt(&p, 13, TP_DTYPE_BF16);
    run_conversions(&p);
    pair_close(&p);
}

// ---- embeddings

struct emb_shape {
    int N, C, vocab_start, n_vocab, token_range; // tokens drawn from [0, token_range)
};

static void run_vocab_embedding(struct pair *p) {
    struct emb_shape shapes[] = {
        {7, 13, 0, 32, 29},              // tiny, odd channel count
        {7, 13, 16, 16, 29},             // second shard of the same
        {256, 768, 0, 25152, 50257},     // GPT-2 vocab over 2 shards: first
        {256, 768, 25152, 25152, 50257}, // second, holding the 47 padding rows
        {1000, 77, 0, 50, 50},           // many repeated tokens
        {3000, 65, 100, 40, 300},        // most tokens outside the shard
        {2500, 64, 0, 600, 600},         // runs of one row across tiles of the backward
        {20000, 64, 0, 3, 3},            // thousands of tokens per row: several sorts per block
        {16384, 768, 0, 50304, 50304},   // GPT-2 scale, with frequent tokens (below)
    };
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        struct emb_shape e = shapes[s];
        char what[160];
        struct ibuf tok = ibuf_new(p, (size_t)e.N);
        for (int i = 0; i < e.N; i++) tok.h[i] = rng_int(&p->rng, e.token_range);
        if (s == 6) // long runs of one token, so consecutive rows repeat
            for (int i = 0; i < e.N; i++) tok.h[i] = (i / 37) % 2 ? tok.h[i] : 256 + 3;
        if (s == 8) // a few tokens a few per cent of the time each, as text has them
            for (int i = 0; i < e.N; i++) tok.h[i] = i % 7 == 0 ? 198 : i % 11 == 0 ? 11 : i % 13 == 0 ? 262 : tok.h[i];
        ibuf_push(p, &tok);
        struct buf wte = cbuf_rand(p, (size_t)e.n_vocab * e.C, -1.0f, 1.0f);
        struct buf out = cbuf_rand(p, (size_t)e.N * e.C, -5.0f, 5.0f); // "=": must be overwritten
        p->cpu.iface->vocab_embedding_fwd(p->cpu.ctx, out.c, tok.c, wte.c, e.N, e.C, e.vocab_start,
                                          e.n_vocab);
        p->gpu.iface->vocab_embedding_fwd(p->gpu.ctx, out.g, tok.g, wte.g, e.N, e.C, e.vocab_start,
                                          e.n_vocab);
        snprintf(what, sizeof what, "vocab_embedding_fwd N=%d C=%d start=%d n=%d", e.N, e.C,
                 e.vocab_start, e.n_vocab);
        expect_close(p, &out, tol_for(p, TOL), what);

        struct buf dout = cbuf_rand(p, (size_t)e.N * e.C, -1.0f, 1.0f);
        struct buf dwte = buf_rand(p, (size_t)e.n_vocab * e.C, -1.0f, 1.0f); // "+=": pre-filled
        p->cpu.iface->vocab_embedding_bwd(p->cpu.ctx, dwte.c, dout.c, tok.c, e.N, e.C,
                                          e.vocab_start, e.n_vocab);
        p->gpu.iface->vocab_embedding_bwd(p->gpu.ctx, dwte.g, dout.g, tok.g, e.N, e.C,
                                          e.vocab_start, e.n_vocab);
        snprintf(what, sizeof what, "vocab_embedding_bwd N=%d C=%d start=%d n=%d", e.N, e.C,
                 e.vocab_start, e.n_vocab);
        expect_close(p, &dwte, TOL, what);
        // fp32 sums of the same values, one token at a time in token order: the same bits
        cr_expect(memcmp(dwte.h, dwte.c, (size_t)e.n_vocab * e.C * sizeof(float)) == 0,
                  "[%s] %s: not the CPU's bits", tp_dtype_name(p->dt), what);
        buf_free(p, &dout);
        buf_free(p, &dwte);
        buf_free(p, &out);
        buf_free(p, &wte);
        ibuf_free(p, &tok);
    }
}

Test(cuda_ops, vocab_embedding) {
    struct pair p;
    pair_open(&p, 2);
    run_vocab_embedding(&p);
    pair_close(&p);
}

Test(cuda_bf16, vocab_embedding) {
    struct pair p;
    pair_open_dt(&p, 2, TP_DTYPE_BF16);
    run_vocab_embedding(&p);
    pair_close(&p);
}

// The backward's other kernel (TPTRAIN_EMB_BWD=sorted): the same bits
Test(cuda_ops, vocab_embedding_sorted) { run_with("TPTRAIN_EMB_BWD", "sorted", TP_DTYPE_F32, 2, run_vocab_embedding); }

Test(cuda_bf16, vocab_embedding_sorted) {
    run_with("TPTRAIN_EMB_BWD", "sorted", TP_DTYPE_BF16, 2, run_vocab_embedding);
}

static void run_position_embedding(struct pair *p) {
    int shapes[][3] = {{3, 7, 13}, {4, 64, 768}, {1, 1, 1}, {2, 1024, 768}, {3, 5, 2}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int B = shapes[s][0], T = shapes[s][1], C = shapes[s][2];
        char what[128];
        struct buf wpe = cbuf_rand(p, (size_t)T * C, -1.0f, 1.0f);
        struct buf x = cbuf_rand(p, (size_t)B * T * C, -1.0f, 1.0f); // "+="
        p->cpu.iface->position_embedding_fwd(p->cpu.ctx, x.c, wpe.c, B, T, C);
        p->gpu.iface->position_embedding_fwd(p->gpu.ctx, x.g, wpe.g, B, T, C);
        snprintf(what, sizeof what, "position_embedding_fwd B=%d T=%d C=%d", B, T, C);
        expect_close(p, &x, tol_for(p, TOL), what);

        struct buf dout = cbuf_rand(p, (size_t)B * T * C, -1.0f, 1.0f);
        struct buf dwpe = buf_rand(p, (size_t)T * C, -1.0f, 1.0f); // "+="
        p->cpu.iface->position_embedding_bwd(p->cpu.ctx, dwpe.c, dout.c, B, T, C);
        p->gpu.iface->position_embedding_bwd(p->gpu.ctx, dwpe.g, dout.g, B, T, C);
        snprintf(what, sizeof what, "position_embedding_bwd B=%d T=%d C=%d", B, T, C);
        expect_close(p, &dwpe, TOL, what);
        buf_free(p, &dout);
        buf_free(p, &dwpe);
        buf_free(p, &x);
        buf_free(p, &wpe);
    }
}

Test(cuda_ops, position_embedding) {
    struct pair p;
    pair_open(&p, 3);
    run_position_embedding(&p);
    pair_close(&p);
}

Test(cuda_bf16, position_embedding) {
    struct pair p;
    pair_open_dt(&p, 3, TP_DTYPE_BF16);
    run_position_embedding(&p);
    pair_close(&p);
}

// ---- layernorm

static void run_layernorm(struct pair *p) {
    // bf16: C % 8 == 0 up to 2048 takes the register kernels (one to eight vectors per lane),
    // the rest the element-wise ones; N = 4099 gives the fused backward several rows per warp.
    int shapes[][2] = {{7, 13},  {256, 768}, {33, 1600}, {3, 1},   {5, 31},
                       {4, 2},   {16, 8},    {9, 2048},  {4099, 768}, {6, 2056}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int N = shapes[s][0], C = shapes[s][1];
        char what[128];
        // rows with an offset and a spread, as residual streams have
        struct buf inp = cbuf_rand(p, (size_t)N * C, -2.0f, 3.0f);
        struct buf w = cbuf_rand(p, (size_t)C, 0.5f, 1.5f);
        struct buf b = cbuf_rand(p, (size_t)C, -0.5f, 0.5f);
        struct buf out = cbuf_rand(p, (size_t)N * C, -9.0f, 9.0f); // "="
        struct buf mean = buf_rand(p, (size_t)N, -9.0f, 9.0f);
        struct buf rstd = buf_rand(p, (size_t)N, -9.0f, 9.0f);
        p->cpu.iface->layernorm_fwd(p->cpu.ctx, out.c, mean.c, rstd.c, inp.c, w.c, b.c, N, C);
        p->gpu.iface->layernorm_fwd(p->gpu.ctx, out.g, mean.g, rstd.g, inp.g, w.g, b.g, N, C);
        snprintf(what, sizeof what, "layernorm_fwd out N=%d C=%d", N, C);
        expect_close(p, &out, tol_for(p, TOL), what);
        snprintf(what, sizeof what, "layernorm_fwd mean N=%d C=%d", N, C);
        expect_close(p, &mean, pair_bf16(p) ? 1e-4 : TOL, what);
        snprintf(what, sizeof what, "layernorm_fwd rstd N=%d C=%d", N, C);
        expect_close(p, &rstd, pair_bf16(p) ? 1e-4 : TOL, what); // bf16 path: fp32 statistics

        // the backward runs both backends on the CPU's statistics, so it is tested on its own
        p->gpu.iface->copy_to_device(p->gpu.ctx, mean.g, mean.c, (size_t)N * sizeof(float));
        p->gpu.iface->copy_to_device(p->gpu.ctx, rstd.g, rstd.c, (size_t)N * sizeof(float));
        struct buf dout = cbuf_rand(p, (size_t)N * C, -1.0f, 1.0f);
        struct buf dinp = cbuf_rand(p, (size_t)N * C, -1.0f, 1.0f); // "+="
        struct buf dw = buf_rand(p, (size_t)C, -1.0f, 1.0f);        // "+="
        struct buf db = buf_rand(p, (size_t)C, -1.0f, 1.0f);        // "+="
        struct buf dsum = buf_rand(p, (size_t)C, -1.0f, 1.0f);      // "+="
        double *want = tp_malloc((size_t)C * sizeof(double));
        for (int c = 0; c < C; c++) want[c] = dsum.h[c];
        p->cpu.iface->layernorm_bwd(p->cpu.ctx, dinp.c, dw.c, db.c, dsum.c, dout.c, inp.c, w.c,
                                    mean.c, rstd.c, N, C);
        p->gpu.iface->layernorm_bwd(p->gpu.ctx, dinp.g, dw.g, db.g, dsum.g, dout.g, inp.g, w.g,
                                    mean.g, rstd.g, N, C);
        snprintf(what, sizeof what, "layernorm_bwd dinp N=%d C=%d", N, C);
        expect_close(p, &dinp, tol_for(p, TOL), what);
        snprintf(what, sizeof what, "layernorm_bwd dw N=%d C=%d", N, C);
        expect_close(p, &dw, pair_bf16(p) ? 1e-4 : TOL, what);
        snprintf(what, sizeof what, "layernorm_bwd db N=%d C=%d", N, C);
        expect_close(p, &db, pair_bf16(p) ? 1e-4 : TOL, what);
        snprintf(what, sizeof what, "layernorm_bwd dsum N=%d C=%d", N, C);
        expect_close(p, &dsum, tol_for(p, TOL), what);
        // and it is the column sums of dinp as the GPU stored it (in bf16, rounded): both were
        // downloaded into h by the comparisons above
        expect_sums_of_stored(p, &dsum, want, &dinp, (size_t)N, (size_t)C, what);
        free(want);
        struct buf *all[] = {&inp, &w, &b, &out, &mean, &rstd, &dout, &dinp, &dw, &db, &dsum};
        for (size_t k = 0; k < sizeof all / sizeof all[0]; k++) buf_free(p, all[k]);
    }
}

Test(cuda_ops, layernorm) {
    struct pair p;
    pair_open(&p, 4);
    run_layernorm(&p);
    pair_close(&p);
}

Test(cuda_bf16, layernorm) {
    struct pair p;
    pair_open_dt(&p, 4, TP_DTYPE_BF16);
    run_layernorm(&p);
    pair_close(&p);
}

// The backward's other bf16 kernel (one row at a time per warp; the default is the pipelined one)
Test(cuda_bf16, layernorm_rows) { run_with("TPTRAIN_LN_BWD", "rows", TP_DTYPE_BF16, 4, run_layernorm); }

// ---- linear layers

// variant 0: bias, dinp and dbias; 1: no bias, dinp and dbias skipped; 2: fused GELU forward
// (pre_gelu kept) and a backward whose dinp is multiplied by gelu'(pre_gelu (N, IC)).
static void run_matmul(struct pair *p) {
    // bf16: IC, OC multiples of 8 take the cuBLASLt path, the others the cuBLAS fallback
    int shapes[][3] = {{7, 13, 29}, {256, 768, 2304}, {256, 3072, 768}, {64, 768, 1000},
                       {1, 1, 1},   {33, 65, 127},    {100, 768, 3072}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int N = shapes[s][0], IC = shapes[s][1], OC = shapes[s][2];
        for (int variant = 0; variant < 3; variant++) {
            bool with_bias = variant != 1, gelu = variant == 2;
            char what[160];
            struct buf inp = cbuf_rand(p, (size_t)N * IC, -1.0f, 1.0f);
            struct buf w = cbuf_rand(p, (size_t)OC * IC, -0.1f, 0.1f);
            struct buf bias = cbuf_rand(p, (size_t)OC, -1.0f, 1.0f);
            struct buf out = cbuf_rand(p, (size_t)N * OC, -9.0f, 9.0f); // "="
            struct buf pre = cbuf_rand(p, (size_t)N * OC, -9.0f, 9.0f); // "="
            p->cpu.iface->matmul_fwd(p->cpu.ctx, out.c, gelu ? pre.c : NULL, inp.c, w.c,
                                     with_bias ? bias.c : NULL, N, IC, OC);
            p->gpu.iface->matmul_fwd(p->gpu.ctx, out.g, gelu ? pre.g : NULL, inp.g, w.g,
                                     with_bias ? bias.g : NULL, N, IC, OC);
            snprintf(what, sizeof what, "matmul_fwd N=%d IC=%d OC=%d bias=%d gelu=%d", N, IC, OC,
                     with_bias, gelu);
            expect_close(p, &out, tol_for(p, TOL), what);
            if (gelu) {
                snprintf(what, sizeof what, "matmul_fwd pre_gelu N=%d IC=%d OC=%d", N, IC, OC);
                expect_close(p, &pre, tol_for(p, TOL), what);
            }

            struct buf dout = cbuf_rand(p, (size_t)N * OC, -1.0f, 1.0f);
            struct buf dinp = cbuf_rand(p, (size_t)N * IC, -9.0f, 9.0f); // "="
            struct buf dw = buf_rand(p, (size_t)OC * IC, -1.0f, 1.0f);   // "+="
            struct buf dbias = buf_rand(p, (size_t)OC, -1.0f, 1.0f);     // "+="
            // the earlier layer's pre-activation, wide enough to reach GELU's tails
            struct buf pre_in = cbuf_rand(p, (size_t)N * IC, -4.0f, 4.0f);
            p->cpu.iface->matmul_bwd(p->cpu.ctx, with_bias ? dinp.c : NULL, NULL, dw.c,
                                     with_bias ? dbias.c : NULL, dout.c, inp.c, w.c,
                                     gelu ? pre_in.c : NULL, N, IC, OC);
            p->gpu.iface->matmul_bwd(p->gpu.ctx, with_bias ? dinp.g : NULL, NULL, dw.g,
                                     with_bias ? dbias.g : NULL, dout.g, inp.g, w.g,
                                     gelu ? pre_in.g : NULL, N, IC, OC);
            snprintf(what, sizeof what, "matmul_bwd dinp N=%d IC=%d OC=%d (skipped=%d, dgelu=%d)",
                     N, IC, OC, !with_bias, gelu);
            expect_close(p, &dinp, tol_for(p, TOL), what); // when skipped, both keep the pre-fill
            snprintf(what, sizeof what, "matmul_bwd dw N=%d IC=%d OC=%d", N, IC, OC);
            expect_close(p, &dw, pair_bf16(p) ? 1e-4 : TOL, what);
            snprintf(what, sizeof what, "matmul_bwd dbias N=%d IC=%d OC=%d (skipped=%d)", N, IC,
                     OC, !with_bias);
            expect_close(p, &dbias, pair_bf16(p) ? 1e-4 : TOL, what);
            // dw NULL (sequence parallelism's split): the input gradient alone, inp unread,
            // dbias untouched
            struct buf dinp2 = cbuf_rand(p, (size_t)N * IC, -9.0f, 9.0f);
            p->cpu.iface->matmul_bwd(p->cpu.ctx, dinp2.c, NULL, NULL, dbias.c, dout.c, NULL, w.c,
                                     gelu ? pre_in.c : NULL, N, IC, OC);
            p->gpu.iface->matmul_bwd(p->gpu.ctx, dinp2.g, NULL, NULL, dbias.g, dout.g, NULL, w.g,
                                     gelu ? pre_in.g : NULL, N, IC, OC);
            snprintf(what, sizeof what, "matmul_bwd dinp alone N=%d IC=%d OC=%d (dgelu=%d)", N, IC, OC, gelu);
            expect_close(p, &dinp2, tol_for(p, TOL), what);
            snprintf(what, sizeof what, "matmul_bwd dbias untouched without dw N=%d IC=%d OC=%d", N, IC, OC);
            expect_close(p, &dbias, pair_bf16(p) ? 1e-4 : TOL, what);
            struct buf *all[] = {&inp, &w, &bias, &out, &pre, &dout, &dinp, &dw, &dbias, &pre_in, &dinp2};
            for (size_t k = 0; k < sizeof all / sizeof all[0]; k++) buf_free(p, all[k]);
        }
    }
}

Test(cuda_ops, matmul) {
    struct pair p;
    pair_open(&p, 5);
    run_matmul(&p);
    pair_close(&p);
}

Test(cuda_bf16, matmul) {
    struct pair p;
    pair_open_dt(&p, 5, TP_DTYPE_BF16);
    run_matmul(&p);
    pair_close(&p);
}

// residual_layernorm_fwd: against the CPU's residual + layernorm, and on the GPU bitwise against
// its own two separate ops (the fused pass normalises the stored, rounded sum as they do).
// Shapes: the register kernel (C = 768, 64) and the fallback (C = 13); out aliasing res.
static void run_residual_layernorm(struct pair *p) {
    int shapes[][2] = {{256, 768}, {33, 64}, {7, 13}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int N = shapes[s][0], C = shapes[s][1];
        size_t n = (size_t)N * C;
        for (int alias = 0; alias < 2; alias++) {
            char what[128];
            struct buf res = cbuf_rand(p, n, -2.0f, 3.0f);
            struct buf x = cbuf_rand(p, n, -1.0f, 1.0f);
            struct buf bias = cbuf_rand(p, (size_t)C, -0.5f, 0.5f);
            struct buf w = cbuf_rand(p, (size_t)C, 0.5f, 1.5f);
            struct buf b = cbuf_rand(p, (size_t)C, -0.5f, 0.5f);
            struct buf out = cbuf_rand(p, n, -9.0f, 9.0f);
            struct buf ln = cbuf_rand(p, n, -9.0f, 9.0f);
            struct buf mean = buf_rand(p, (size_t)N, -9.0f, 9.0f);
            struct buf rstd = buf_rand(p, (size_t)N, -9.0f, 9.0f);
            struct buf *dst = alias ? &res : &out;
            // the GPU's separate ops first, on copies of the inputs
            size_t es = tp_dtype_size(p->dt);
            void *r2 = p->gpu.iface->alloc(p->gpu.ctx, n * es), *l2 = p->gpu.iface->alloc(p->gpu.ctx, n * es);
            float *m2 = p->gpu.iface->alloc(p->gpu.ctx, (size_t)N * sizeof(float));
            float *s2 = p->gpu.iface->alloc(p->gpu.ctx, (size_t)N * sizeof(float));
            p->gpu.iface->residual_fwd(p->gpu.ctx, r2, res.g, x.g, bias.g, N, C);
            p->gpu.iface->layernorm_fwd(p->gpu.ctx, l2, m2, s2, r2, w.g, b.g, N, C);
            p->cpu.iface->residual_layernorm_fwd(p->cpu.ctx, dst->c, ln.c, mean.c, rstd.c, res.c, x.c, bias.c,
                                                 w.c, b.c, N, C);
            p->gpu.iface->residual_layernorm_fwd(p->gpu.ctx, dst->g, ln.g, mean.g, rstd.g, res.g, x.g, bias.g,
                                                 w.g, b.g, N, C);
            snprintf(what, sizeof what, "residual_layernorm_fwd out N=%d C=%d alias=%d", N, C, alias);
            expect_close(p, dst, tol_for(p, TOL), what);
            snprintf(what, sizeof what, "residual_layernorm_fwd ln N=%d C=%d alias=%d", N, C, alias);
            expect_close(p, &ln, tol_for(p, TOL), what);
            // in bf16 the statistics are those of the rounded sum, the CPU's of the exact one
            snprintf(what, sizeof what, "residual_layernorm_fwd rstd N=%d C=%d alias=%d", N, C, alias);
            expect_close(p, &rstd, tol_for(p, TOL), what);
            // bitwise against the separate ops on the GPU
            char *a = tp_malloc(n * es), *c = tp_malloc(n * es);
            const void *fused[] = {dst->g, ln.g, mean.g, rstd.g}, *apart[] = {r2, l2, m2, s2};
            size_t bytes[] = {n * es, n * es, (size_t)N * sizeof(float), (size_t)N * sizeof(float)};
            const char *names[] = {"sum", "layernorm", "mean", "rstd"};
            for (int k = 0; k < 4; k++) {
                p->gpu.iface->copy_to_host(p->gpu.ctx, a, fused[k], bytes[k]);
                p->gpu.iface->copy_to_host(p->gpu.ctx, c, apart[k], bytes[k]);
                cr_expect(memcmp(a, c, bytes[k]) == 0, "residual_layernorm_fwd N=%d C=%d alias=%d: the %s differs "
                          "from residual_fwd + layernorm_fwd", N, C, alias, names[k]);
            }
            free(a);
            free(c);
            void *extra[] = {r2, l2, m2, s2};
            for (int k = 0; k < 4; k++) p->gpu.iface->free(p->gpu.ctx, extra[k]);
            struct buf *all[] = {&res, &x, &bias, &w, &b, &out, &ln, &mean, &rstd};
            for (size_t k = 0; k < sizeof all / sizeof all[0]; k++) buf_free(p, all[k]);
        }
    }
}

Test(cuda_ops, residual_layernorm) {
    struct pair p;
    pair_open(&p, 16);
    run_residual_layernorm(&p);
    pair_close(&p);
}

Test(cuda_bf16, residual_layernorm) {
    struct pair p;
    pair_open_dt(&p, 16, TP_DTYPE_BF16);
    run_residual_layernorm(&p);
    pair_close(&p);
}

static void run_residual(struct pair *p) {
    int shapes[][2] = {{7, 13}, {256, 768}, {3, 4}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int N = shapes[s][0], C = shapes[s][1];
        size_t n = (size_t)N * C;
        // mode 0: separate out, bias; 1: out aliases res, no bias; 2: out aliases x, bias
        for (int mode = 0; mode < 3; mode++) {
            char what[128];
            struct buf res = cbuf_rand(p, n, -1.0f, 1.0f);
            struct buf x = cbuf_rand(p, n, -1.0f, 1.0f);
            struct buf bias = cbuf_rand(p, (size_t)C, -1.0f, 1.0f);
            struct buf out = cbuf_rand(p, n, -9.0f, 9.0f);
            struct buf *dst = mode == 0 ? &out : (mode == 1 ? &res : &x);
            p->cpu.iface->residual_fwd(p->cpu.ctx, dst->c, res.c, x.c, mode == 1 ? NULL : bias.c,
                                       N, C);
            p->gpu.iface->residual_fwd(p->gpu.ctx, dst->g, res.g, x.g, mode == 1 ? NULL : bias.g,
                                       N, C);
            snprintf(what, sizeof what, "residual_fwd N=%d C=%d mode=%d", N, C, mode);
            expect_close(p, dst, tol_for(p, TOL), what);
            buf_free(p, &res);
            buf_free(p, &x);
            buf_free(p, &bias);
            buf_free(p, &out);
        }
    }
}

Test(cuda_ops, residual) {
    struct pair p;
    pair_open(&p, 6);
    run_residual(&p);
    pair_close(&p);
}

Test(cuda_bf16, residual) {
    struct pair p;
    pair_open_dt(&p, 6, TP_DTYPE_BF16);
    run_residual(&p);
    pair_close(&p);
}

static void run_gelu(struct pair *p) {
    size_t sizes[] = {7, 1000003};
    for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++) {
        size_t n = sizes[s];
        char what[128];
        struct buf inp = cbuf_new(p, n);
        for (size_t i = 0; i < n; i++) inp.h[i] = rng_uniform(&p->rng, -6.0f, 6.0f);
        inp.h[0] = 20.0f; // saturated tails
        if (n > 1) inp.h[1] = -20.0f;
        buf_push(p, &inp);
        struct buf out = cbuf_rand(p, n, -9.0f, 9.0f);
        p->cpu.iface->gelu_fwd(p->cpu.ctx, out.c, inp.c, n);
        p->gpu.iface->gelu_fwd(p->gpu.ctx, out.g, inp.g, n);
        snprintf(what, sizeof what, "gelu_fwd n=%zu", n);
        expect_close(p, &out, tol_for(p, TOL), what);

        struct buf dout = cbuf_rand(p, n, -1.0f, 1.0f);
        struct buf dinp = cbuf_rand(p, n, -9.0f, 9.0f);
        p->cpu.iface->gelu_bwd(p->cpu.ctx, dinp.c, inp.c, dout.c, n);
        p->gpu.iface->gelu_bwd(p->gpu.ctx, dinp.g, inp.g, dout.g, n);
        snprintf(what, sizeof what, "gelu_bwd n=%zu", n);
        expect_close(p, &dinp, tol_for(p, TOL), what);
        // in place: dinp aliases dout
        p->cpu.iface->gelu_bwd(p->cpu.ctx, dout.c, inp.c, dout.c, n);
        p->gpu.iface->gelu_bwd(p->gpu.ctx, dout.g, inp.g, dout.g, n);
        snprintf(what, sizeof what, "gelu_bwd in place n=%zu", n);
        expect_close(p, &dout, tol_for(p, TOL), what);
        buf_free(p, &inp);
        buf_free(p, &out);
        buf_free(p, &dout);
        buf_free(p, &dinp);
    }
}

Test(cuda_ops, gelu) {
    struct pair p;
    pair_open(&p, 7);
    run_gelu(&p);
    pair_close(&p);
}

Test(cuda_bf16, gelu) {
    struct pair p;
    pair_open_dt(&p, 7, TP_DTYPE_BF16);
    run_gelu(&p);
    pair_close(&p);
}

// ---- attention

static void attention_case(struct pair *p, int B, int T, int NH, int HS) {
    size_t nqkv = (size_t)B * T * 3 * NH * HS, nout = (size_t)B * T * NH * HS;
    char what[128];
    double tol = pair_bf16(p) ? TOL_BF16_ATTN : TOL_LOOSE;
    const struct backend_i *ci = p->cpu.iface, *gi = p->gpu.iface;
    size_t c_saved = ci->attention_saved_floats(p->cpu.ctx, B, T, NH, HS);
    size_t c_scr = ci->attention_scratch_floats(p->cpu.ctx, B, T, NH, HS);
    size_t g_saved = gi->attention_saved_floats(p->gpu.ctx, B, T, NH, HS);
    size_t g_scr = gi->attention_scratch_floats(p->gpu.ctx, B, T, NH, HS);
    float *cs = ci->alloc(p->cpu.ctx, c_saved * sizeof(float));
    float *cx = ci->alloc(p->cpu.ctx, c_scr * sizeof(float));
    float *gs = gi->alloc(p->gpu.ctx, g_saved * sizeof(float));
    float *gx = gi->alloc(p->gpu.ctx, g_scr * sizeof(float));
    if (pair_bf16(p))
        cr_expect_eq(g_saved, (size_t)B * NH * T, "bf16 attention saves one log-sum-exp per row");

    // scores of a few units, so the softmax is neither flat nor one-hot
    struct buf qkv = cbuf_rand(p, nqkv, -1.5f, 1.5f);
    struct buf out = cbuf_rand(p, nout, -9.0f, 9.0f); // "="
    ci->attention_fwd(p->cpu.ctx, out.c, cs, cx, qkv.c, B, T, NH, HS);
    gi->attention_fwd(p->gpu.ctx, out.g, gs, gx, qkv.g, B, T, NH, HS);
    snprintf(what, sizeof what, "attention_fwd B=%d T=%d NH=%d HS=%d", B, T, NH, HS);
    expect_close(p, &out, tol, what);

    struct buf dout = cbuf_rand(p, nout, -1.0f, 1.0f);
    struct buf dqkv = cbuf_rand(p, nqkv, -9.0f, 9.0f); // "="
    size_t C3 = (size_t)3 * NH * HS;
    struct buf dsum = buf_rand(p, C3, -1.0f, 1.0f); // "+=": qkv's bias gradient
    double *want = tp_malloc(C3 * sizeof(double));
    for (size_t c = 0; c < C3; c++) want[c] = dsum.h[c];
    // the backward gets each backend's own forward output and saved state
    ci->attention_bwd(p->cpu.ctx, dqkv.c, dsum.c, cx, dout.c, qkv.c, out.c, cs, B, T, NH, HS);
    gi->attention_bwd(p->gpu.ctx, dqkv.g, dsum.g, gx, dout.g, qkv.g, out.g, gs, B, T, NH, HS);
    snprintf(what, sizeof what, "attention_bwd B=%d T=%d NH=%d HS=%d", B, T, NH, HS);
    expect_close(p, &dqkv, tol, what);
    snprintf(what, sizeof what, "attention_bwd dqkv_sum B=%d T=%d NH=%d HS=%d", B, T, NH, HS);
    expect_close(p, &dsum, tol, what);
    // and it is the column sums of dqkv as the GPU stored it (both downloaded into h above)
    expect_sums_of_stored(p, &dsum, want, &dqkv, (size_t)B * T, C3, what);
    free(want);
    buf_free(p, &dsum);

    ci->free(p->cpu.ctx, cs);
    ci->free(p->cpu.ctx, cx);
    gi->free(p->gpu.ctx, gs);
    gi->free(p->gpu.ctx, gx);
    buf_free(p, &qkv);
    buf_free(p, &out);
    buf_free(p, &dout);
    buf_free(p, &dqkv);
}

Test(cuda_ops, attention) {
    struct pair p;
    pair_open(&p, 8);
    int shapes[][4] = {{1, 7, 3, 13}, {2, 64, 4, 64}, {2, 100, 2, 16}, {1, 257, 2, 64},
                       {1, 1, 1, 1}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
        attention_case(&p, shapes[s][0], shapes[s][1], shapes[s][2], shapes[s][3]);
    pair_close(&p);
}

static void run_bf16_attention(struct pair *p) {
    // the fused kernels at their own widths (64, 128; T = 1000 has a partial last tile) and padded
    // (16, 80); bf16 has no other attention path
    int shapes[][4] = {{2, 64, 4, 64}, {1, 128, 2, 64},  {1, 1000, 2, 64}, {1, 1024, 2, 64},
                       {2, 1, 3, 64},  {2, 100, 2, 16}, {1, 7, 3, 80},    {1, 300, 2, 128}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
        attention_case(p, shapes[s][0], shapes[s][1], shapes[s][2], shapes[s][3]);
}

// qkv's bias gradient summed inside the Hopper backward (TPTRAIN_ATTN_BWD_SUMS=fused; where another
// kernel runs, after it)
Test(cuda_bf16, attention_sums_fused) {
    run_with("TPTRAIN_ATTN_BWD_SUMS", "fused", TP_DTYPE_BF16, 8, run_bf16_attention);
}

Test(cuda_bf16, attention) {
    struct pair p;
    pair_open_dt(&p, 8, TP_DTYPE_BF16);
    run_bf16_attention(&p);
    pair_close(&p);
}

static void run_attention_decode(struct pair *p) {
    int shapes[][3] = {{1, 1, 8}, {37, 3, 16}, {300, 12, 64}}; // n_ctx, NH, HS
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int n_ctx = shapes[s][0], NH = shapes[s][1], HS = shapes[s][2];
        size_t C = (size_t)NH * HS;
        char what[128];
        struct buf q = cbuf_rand(p, C, -1.5f, 1.5f);
        struct buf kc = cbuf_rand(p, (size_t)(n_ctx + 5) * C, -1.5f, 1.5f); // rows past n_ctx unused
        struct buf vc = cbuf_rand(p, (size_t)(n_ctx + 5) * C, -1.0f, 1.0f);
        struct buf out = cbuf_rand(p, C, -9.0f, 9.0f);
        struct buf scr = buf_new(p, (size_t)NH * n_ctx);
        p->cpu.iface->attention_decode(p->cpu.ctx, out.c, scr.c, q.c, kc.c, vc.c, n_ctx, NH, HS);
        p->gpu.iface->attention_decode(p->gpu.ctx, out.g, scr.g, q.g, kc.g, vc.g, n_ctx, NH, HS);
        snprintf(what, sizeof what, "attention_decode n_ctx=%d NH=%d HS=%d", n_ctx, NH, HS);
        expect_close(p, &out, pair_bf16(p) ? TOL_BF16 : TOL_LOOSE, what);
        struct buf *all[] = {&q, &kc, &vc, &out, &scr};
        for (size_t k = 0; k < sizeof all / sizeof all[0]; k++) buf_free(p, all[k]);
    }
}

Test(cuda_ops, attention_decode) {
    struct pair p;
    pair_open(&p, 14);
    run_attention_decode(&p);
    pair_close(&p);
}

Test(cuda_bf16, attention_decode) {
    struct pair p;
    pair_open_dt(&p, 14, TP_DTYPE_BF16);
    run_attention_decode(&p);
    pair_close(&p);
}

// ---- vocab-parallel cross-entropy

struct xent_shape {
    int N, V, Vp, P; // rows, real vocab, padded vocab, shards
};

// The loss of each row, the unsharded way: xent_stats over all Vp columns (on the GPU), then
// xent_loss, into a new host array of N floats.
static float *xent_gpu_unsharded(struct pair *p, struct buf *logit, const struct ibuf *tgt, int N,
                                 int Vp, int V) {
    struct buf mx = buf_new(p, (size_t)N), sm = buf_new(p, 2 * (size_t)N), ls = buf_new(p, (size_t)N);
    p->gpu.iface->xent_stats(p->gpu.ctx, mx.g, sm.g, logit->g, tgt->g, N, 0, Vp, V);
    p->gpu.iface->xent_loss(p->gpu.ctx, ls.g, mx.g, sm.g, N);
    float *out = tp_malloc((size_t)N * sizeof(float));
    p->gpu.iface->copy_to_host(p->gpu.ctx, out, ls.g, (size_t)N * sizeof(float));
    buf_free(p, &mx);
    buf_free(p, &sm);
    buf_free(p, &ls);
    return out;
}

// Runs the forward as model.c does on every shard (xent_stats, the MAX all-reduce on the host,
// xent_rescale, the SUM all-reduce on the host, xent_loss) and the backward, comparing each op
// with the CPU on identical inputs; checks the GPU loss against a direct double-precision
// log-softmax of the unsharded logits (as the GPU held them), and the GPU's own sharded pipeline
// against one unsharded GPU call.
static void xent_case(struct pair *p, struct xent_shape x) {
    int nv = x.Vp / x.P, N = x.N;
    char what[160];
    struct ibuf tgt = ibuf_new(p, (size_t)N);
    for (int i = 0; i < N; i++) tgt.h[i] = rng_int(&p->rng, x.V);
    tgt.h[0] = x.V - 1; // the last real column
    ibuf_push(p, &tgt);
    struct buf logit[8], maxes[8], sums[8];
    cr_assert(x.P <= 8);
    for (int r = 0; r < x.P; r++) {
        logit[r] = cbuf_new(p, (size_t)N * nv);
        // each row lifts one shard's logits, so the global max moves between shards and the
        // rescale has real work to do
        for (int i = 0; i < N; i++)
            for (int j = 0; j < nv; j++)
                logit[r].h[(size_t)i * nv + j] =
                    rng_uniform(&p->rng, -4.0f, 4.0f) + (i % x.P == r ? 3.0f : 0.0f);
        buf_push(p, &logit[r]);
        maxes[r] = buf_rand(p, (size_t)N, -9.0f, 9.0f); // "="
        sums[r] = buf_rand(p, 2 * (size_t)N, -9.0f, 9.0f);
    }
    // phase 1 per shard: this rank's statistics; then the MAX all-reduce (on the CPU results,
    // fed to both backends)
    struct buf gmax = buf_new(p, (size_t)N);
    for (int i = 0; i < N; i++) gmax.h[i] = -INFINITY;
    for (int r = 0; r < x.P; r++) {
        p->cpu.iface->xent_stats(p->cpu.ctx, maxes[r].c, sums[r].c, logit[r].c, tgt.c, N, r * nv,
                                 nv, x.V);
        p->gpu.iface->xent_stats(p->gpu.ctx, maxes[r].g, sums[r].g, logit[r].g, tgt.g, N, r * nv,
                                 nv, x.V);
        snprintf(what, sizeof what, "xent_stats maxes N=%d V=%d shard %d/%d", N, x.V, r, x.P);
        expect_close(p, &maxes[r], TOL, what); // a max of identical values: exact in practice
        snprintf(what, sizeof what, "xent_stats sums N=%d V=%d shard %d/%d", N, x.V, r, x.P);
        expect_close(p, &sums[r], TOL_LOOSE, what); // leaves the GPU results in .h
        size_t bad = 0;
        for (int i = 0; i < N; i++) {
            if (sums[r].h[(size_t)N + i] != sums[r].c[(size_t)N + i]) bad++; // a copied logit
            if (r * nv >= x.V && (maxes[r].h[i] != -INFINITY || sums[r].h[i] != 0.0f ||
                                  sums[r].h[(size_t)N + i] != 0.0f))
                bad++;
            gmax.h[i] = fmaxf(gmax.h[i], maxes[r].c[i]);
        }
        cr_expect_eq(bad, 0, "[%s] xent_stats shard %d/%d: %zu wrong target logits or "
                     "padding-only statistics (want max -inf, sums 0)", tp_dtype_name(p->dt), r,
                     x.P, bad);
    }
    buf_push(p, &gmax);
    // phase 2 per shard: onto the global max (same inputs on both), then the SUM all-reduce
    struct buf gsums = buf_new(p, 2 * (size_t)N);
    struct buf lmax = buf_new(p, (size_t)N), rs = buf_new(p, 2 * (size_t)N);
    for (int r = 0; r < x.P; r++) {
        memcpy(lmax.h, maxes[r].c, (size_t)N * sizeof(float));
        memcpy(rs.h, sums[r].c, 2 * (size_t)N * sizeof(float));
        buf_push(p, &lmax);
        buf_push(p, &rs);
        p->cpu.iface->xent_rescale(p->cpu.ctx, rs.c, lmax.c, gmax.c, N);
        p->gpu.iface->xent_rescale(p->gpu.ctx, rs.g, lmax.g, gmax.g, N);
        snprintf(what, sizeof what, "xent_rescale N=%d V=%d shard %d/%d", N, x.V, r, x.P);
        expect_close(p, &rs, TOL, what);
        size_t bad = 0;
        for (int i = 0; i < N; i++) {
            if (rs.h[(size_t)N + i] != sums[r].c[(size_t)N + i]) bad++; // target logits stay
            if (lmax.h[i] == -INFINITY && rs.h[i] != 0.0f) bad++;        // padding-only adds 0
        }
        cr_expect_eq(bad, 0, "[%s] xent_rescale shard %d/%d: %zu wrong values", tp_dtype_name(p->dt),
                     r, x.P, bad);
        for (size_t i = 0; i < 2 * (size_t)N; i++) gsums.h[i] += rs.c[i];
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
    cr_expect(worst < TOL_LOOSE, "[%s] xent loss N=%d V=%d P=%d differs from the direct "
              "log-softmax by %.3g", tp_dtype_name(p->dt), N, x.V, x.P, worst);
    // The GPU alone, as model.c runs it on P ranks, against one unsharded GPU call: the local
    // statistics are in maxes[r].g and sums[r].g, and their values in .h.
    if (x.P > 1) {
        struct buf full = cbuf_new(p, (size_t)N * x.Vp); // the shards side by side
        for (int i = 0; i < N; i++)
            for (int r = 0; r < x.P; r++)
                memcpy(full.h + (size_t)i * x.Vp + (size_t)r * nv, logit[r].h + (size_t)i * nv,
                       (size_t)nv * sizeof(float));
        buf_push(p, &full); // already in the storage type: pushed unchanged
        float *one = xent_gpu_unsharded(p, &full, &tgt, N, x.Vp, x.V);
        struct buf gm = buf_new(p, (size_t)N), gs = buf_new(p, 2 * (size_t)N);
        struct buf gl = buf_new(p, (size_t)N);
        for (int i = 0; i < N; i++) gm.h[i] = -INFINITY;
        for (int r = 0; r < x.P; r++)
            for (int i = 0; i < N; i++) gm.h[i] = fmaxf(gm.h[i], maxes[r].h[i]);
        buf_push(p, &gm);
        for (int r = 0; r < x.P; r++) {
            p->gpu.iface->xent_rescale(p->gpu.ctx, sums[r].g, maxes[r].g, gm.g, N);
            buf_pull(p, &sums[r]);
            for (size_t i = 0; i < 2 * (size_t)N; i++) gs.h[i] += sums[r].h[i];
        }
        buf_push(p, &gs);
        p->gpu.iface->xent_loss(p->gpu.ctx, gl.g, gm.g, gs.g, N);
        buf_pull(p, &gl);
        // fp32 arithmetic either way; bf16 logits use the hardware exp, whose error differs
        // with the shift, so it gets a little more room
        double tol = pair_bf16(p) ? 1e-5 : 1e-6, w = 0.0;
        for (int i = 0; i < N; i++) {
            double d = fabs((double)gl.h[i] - one[i]) / fmax(fabs((double)one[i]), 1e-30);
            if (!(d <= w)) w = d; // a NaN makes it fail
        }
        cr_log_info("[%s] xent N=%d V=%d P=%d: sharded vs unsharded GPU loss %.3g",
                    tp_dtype_name(p->dt), N, x.V, x.P, w);
        cr_expect(w <= tol, "[%s] xent N=%d V=%d P=%d: sharded GPU loss differs from the unsharded "
                  "call by %.3g (> %.0e)", tp_dtype_name(p->dt), N, x.V, x.P, w, tol);
        free(one);
        buf_free(p, &full);
        buf_free(p, &gm);
        buf_free(p, &gs);
        buf_free(p, &gl);
    }
    // backward; on shard 0 in place (dlogits aliases logits)
    float dloss = 1.0f / (float)N;
    for (int r = 0; r < x.P; r++) {
        struct buf dl = cbuf_rand(p, (size_t)N * nv, -9.0f, 9.0f);
        struct buf *dst = r == 0 ? &logit[r] : &dl;
        p->cpu.iface->xent_bwd(p->cpu.ctx, dst->c, logit[r].c, gmax.c, gsums.c, tgt.c, dloss, N,
                               r * nv, nv, x.V);
        p->gpu.iface->xent_bwd(p->gpu.ctx, dst->g, logit[r].g, gmax.g, gsums.g, tgt.g, dloss, N,
                               r * nv, nv, x.V);
        snprintf(what, sizeof what, "xent_bwd N=%d V=%d shard %d/%d%s", N, x.V, r, x.P,
                 r == 0 ? " in place" : "");
        expect_close(p, dst, pair_bf16(p) ? TOL_BF16 : TOL_LOOSE, what);
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
    buf_free(p, &lmax);
    buf_free(p, &rs);
    buf_free(p, &loss);
    ibuf_free(p, &tgt);
}

static void run_cross_entropy(struct pair *p) {
    struct xent_shape shapes[] = {
        {7, 29, 32, 2},        // tiny, padding in the last shard
        {7, 29, 64, 4},        // the last shard is all padding
        {64, 50257, 50304, 2}, // GPT-2 over 2 shards
        {16, 50257, 50304, 4}, // GPT-2 over 4 shards
        {5, 50257, 50304, 1},  // GPT-2 unsharded
        {5, 29, 33, 1},        // a row length that is no multiple of 4 (element-wise, both types)
        {5, 29, 36, 1},        // a multiple of 4, not of 8 (fp32: 16-byte loads; bf16: element-wise)
        {6, 2000, 4096, 4},    // the last two shards padding only, the second partly
    };
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) xent_case(p, shapes[s]);
}

Test(cuda_ops, cross_entropy) {
    struct pair p;
    pair_open(&p, 9);
    run_cross_entropy(&p);
    pair_close(&p);
}

Test(cuda_bf16, cross_entropy) {
    struct pair p;
    pair_open_dt(&p, 9, TP_DTYPE_BF16);
    run_cross_entropy(&p);
    pair_close(&p);
}

// ---- one rank's cross-entropy in one op, and the fused LM head

// xent_fused on the GPU against the GPU's own three ops (xent_stats, xent_loss, xent_bwd) bit for
// bit, and against the CPU's fused op at the pair's tolerance: with a gradient out of place, in
// place, into a misaligned buffer (the three-op fallback), and the loss alone (logits untouched).
static void xent_fused_case(struct pair *p, int N, int V, int Vp) {
    const struct backend_i *g = p->gpu.iface, *c = p->cpu.iface;
    char what[160];
    struct ibuf tgt = ibuf_new(p, (size_t)N);
    for (int i = 0; i < N; i++) tgt.h[i] = rng_int(&p->rng, V);
    tgt.h[0] = V - 1;
    ibuf_push(p, &tgt);
    size_t NV = (size_t)N * Vp, es = tp_dtype_size(p->dt);
    struct buf logit = cbuf_rand(p, NV, -6.0f, 6.0f);
    // the three ops on the GPU: the reference bits
    struct buf mx = buf_new(p, (size_t)N), sm = buf_new(p, 2 * (size_t)N), ref_loss = buf_new(p, (size_t)N);
    struct buf ref_d = cbuf_new(p, NV);
    float dloss = 1.0f / (float)N;
    g->xent_stats(p->gpu.ctx, mx.g, sm.g, logit.g, tgt.g, N, 0, Vp, V);
    g->xent_loss(p->gpu.ctx, ref_loss.g, mx.g, sm.g, N);
    g->xent_bwd(p->gpu.ctx, ref_d.g, logit.g, mx.g, sm.g, tgt.g, dloss, N, 0, Vp, V);
    buf_pull(p, &ref_loss);
    buf_pull(p, &ref_d);
    // out of place, against the three ops and the CPU
    struct buf loss = buf_rand(p, (size_t)N, -9.0f, 9.0f), d = cbuf_rand(p, NV, -9.0f, 9.0f); // "="
    c->xent_fused(p->cpu.ctx, loss.c, d.c, logit.c, tgt.c, dloss, N, Vp, V);
    g->xent_fused(p->gpu.ctx, loss.g, d.g, logit.g, tgt.g, dloss, N, Vp, V);
    snprintf(what, sizeof what, "xent_fused loss N=%d V=%d Vp=%d", N, V, Vp);
    expect_close(p, &loss, TOL_LOOSE, what);
    snprintf(what, sizeof what, "xent_fused dlogits N=%d V=%d Vp=%d", N, V, Vp);
    expect_close(p, &d, pair_bf16(p) ? TOL_BF16 : TOL_LOOSE, what);
    cr_expect(memcmp(loss.h, ref_loss.h, (size_t)N * sizeof(float)) == 0,
              "[%s] xent_fused N=%d Vp=%d: losses differ from xent_stats + xent_loss", tp_dtype_name(p->dt), N, Vp);
    cr_expect(memcmp(d.h, ref_d.h, NV * sizeof(float)) == 0,
              "[%s] xent_fused N=%d Vp=%d: dlogits differ from xent_bwd", tp_dtype_name(p->dt), N, Vp);
    // in place, as the fused head runs it
    struct buf inplace = cbuf_new(p, NV);
    memcpy(inplace.h, logit.h, NV * sizeof(float));
    buf_push(p, &inplace);
    g->xent_fused(p->gpu.ctx, loss.g, inplace.g, inplace.g, tgt.g, dloss, N, Vp, V);
    buf_pull(p, &inplace);
    buf_pull(p, &loss);
    cr_expect(memcmp(inplace.h, ref_d.h, NV * sizeof(float)) == 0 &&
                  memcmp(loss.h, ref_loss.h, (size_t)N * sizeof(float)) == 0,
              "[%s] xent_fused N=%d Vp=%d in place differs from the three ops", tp_dtype_name(p->dt), N, Vp);
    // dlogits one element past 16-byte alignment: the three-op fallback, the same bits
    void *odd = g->alloc(p->gpu.ctx, (NV + 1) * es);
    g->xent_fused(p->gpu.ctx, loss.g, (char *)odd + es, logit.g, tgt.g, dloss, N, Vp, V);
    buf_pull(p, &loss);
    float *back = tp_malloc(NV * sizeof(float));
    if (pair_bf16(p)) {
        uint16_t *h16 = tp_malloc(NV * sizeof(uint16_t));
        g->copy_to_host(p->gpu.ctx, h16, (char *)odd + es, NV * es);
        for (size_t i = 0; i < NV; i++) back[i] = tp_bf16_to_f32(h16[i]);
        free(h16);
    } else {
        g->copy_to_host(p->gpu.ctx, back, (char *)odd + es, NV * es);
    }
    cr_expect(memcmp(back, ref_d.h, NV * sizeof(float)) == 0 &&
                  memcmp(loss.h, ref_loss.h, (size_t)N * sizeof(float)) == 0,
              "[%s] xent_fused N=%d Vp=%d into a misaligned buffer differs", tp_dtype_name(p->dt), N, Vp);
    // the loss alone leaves the logits as they were
    g->xent_fused(p->gpu.ctx, loss.g, NULL, logit.g, tgt.g, dloss, N, Vp, V);
    buf_pull(p, &loss);
    float *keep = tp_malloc(NV * sizeof(float));
    memcpy(keep, logit.h, NV * sizeof(float));
    buf_pull(p, &logit);
    cr_expect(memcmp(loss.h, ref_loss.h, (size_t)N * sizeof(float)) == 0, "[%s] xent_fused loss only",
              tp_dtype_name(p->dt));
    cr_expect(memcmp(keep, logit.h, NV * sizeof(float)) == 0, "[%s] xent_fused without dlogits wrote the logits",
              tp_dtype_name(p->dt));
    free(keep);
    free(back);
    g->free(p->gpu.ctx, odd);
    struct buf *bufs[] = {&logit, &mx, &sm, &ref_loss, &ref_d, &loss, &d, &inplace};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) buf_free(p, bufs[i]);
    ibuf_free(p, &tgt);
}

static void run_xent_fused(struct pair *p) {
    xent_fused_case(p, 5, 50257, 50304); // GPT-2 at tp=1: the vector path
    xent_fused_case(p, 64, 50257, 50304);
    xent_fused_case(p, 7, 29, 32);       // padding inside the last vector
    xent_fused_case(p, 5, 29, 33);       // element-wise (no multiple of 4)
    xent_fused_case(p, 5, 29, 36);       // a multiple of 4, not of 8
}

Test(cuda_ops, xent_fused) {
    struct pair p;
    pair_open(&p, 19);
    run_xent_fused(&p);
    pair_close(&p);
}

Test(cuda_bf16, xent_fused) {
    struct pair p;
    pair_open_dt(&p, 19, TP_DTYPE_BF16);
    run_xent_fused(&p);
    pair_close(&p);
}

// A TP group of one: tp.h's layers issue no collective on it.
static const char *one_name(void *ctx) {
    (void)ctx;
    return "one";
}
static const struct comm_i one_iface = {.name = one_name};

// vocab_parallel_lm_head_cross_entropy on the GPU, in chunks of `rows` token rows (the products
// through the backend's matmul at the chunk's row count), against the unfused layers on the fp32
// CPU holding all N rows' logits: losses, the input gradient and the weight gradient's increment
// (dw starts from random values: it accumulates).
static void lm_head_case(struct pair *p, int N, int C, int V, int Vp, int rows) {
    struct comm one = {.iface = &one_iface, .ctx = NULL, .rank = 0, .size = 1};
    char what[160];
    struct ibuf tgt = ibuf_new(p, (size_t)N);
    for (int i = 0; i < N; i++) tgt.h[i] = rng_int(&p->rng, V);
    ibuf_push(p, &tgt);
    struct buf x = cbuf_rand(p, (size_t)N * C, -1.0f, 1.0f), w = cbuf_rand(p, (size_t)Vp * C, -0.3f, 0.3f);
    for (size_t i = (size_t)V * C; i < (size_t)Vp * C; i++) w.h[i] = 0.0f; // padding rows are zero
    buf_push(p, &w);
    struct buf loss = buf_rand(p, (size_t)N, -9.0f, 9.0f), din = cbuf_rand(p, (size_t)N * C, -9.0f, 9.0f);
    struct buf dw = buf_rand(p, (size_t)Vp * C, -1e-3f, 1e-3f);
    float *dw0 = tp_malloc((size_t)Vp * C * sizeof(float));
    memcpy(dw0, dw.h, (size_t)Vp * C * sizeof(float));
    float dloss = 1.0f / (float)N;
    // GPU: the fused head in chunks
    struct buf lg = cbuf_new(p, (size_t)rows * Vp), mx = buf_new(p, (size_t)rows), lmx = buf_new(p, (size_t)rows);
    struct buf sm = buf_new(p, 2 * (size_t)rows);
    struct vocab_parallel_head h = {.in = x.g, .w = w.g, .targets = tgt.g, .losses = loss.g, .din = din.g,
                                    .dw = dw.g, .dloss = dloss, .logits = lg.g, .maxes = mx.g,
                                    .local_maxes = lmx.g, .sums = sm.g, .N = N, .C = C, .Vl = Vp, .V = V,
                                    .rows = rows};
    vocab_parallel_lm_head_cross_entropy(p->gpu, &one, &h, NULL);
    // CPU: the unfused layers over all rows
    struct backend cpu = p->cpu;
    float *clg = cpu.iface->alloc(cpu.ctx, (size_t)N * Vp * sizeof(float));
    struct vocab_parallel_xent cx = {cpu.iface->alloc(cpu.ctx, (size_t)N * sizeof(float)),
                                     cpu.iface->alloc(cpu.ctx, 2 * (size_t)N * sizeof(float)),
                                     cpu.iface->alloc(cpu.ctx, (size_t)N * sizeof(float)), loss.c};
    column_parallel_linear_fwd(cpu, &one, clg, NULL, x.c, w.c, NULL, N, C, Vp, NULL);
    vocab_parallel_cross_entropy_fwd(cpu, &one, &cx, clg, tgt.c, N, Vp, V);
    vocab_parallel_cross_entropy_bwd(cpu, &one, clg, &cx, clg, tgt.c, dloss, N, Vp, V);
    column_parallel_linear_bwd(cpu, &one, din.c, dw.c, NULL, clg, x.c, w.c, N, C, Vp, NULL);
    snprintf(what, sizeof what, "lm head N=%d C=%d Vp=%d rows=%d: losses", N, C, Vp, rows);
    expect_close(p, &loss, pair_bf16(p) ? TOL_BF16 : TOL_LOOSE, what);
    snprintf(what, sizeof what, "lm head N=%d C=%d Vp=%d rows=%d: input gradient", N, C, Vp, rows);
    expect_close(p, &din, pair_bf16(p) ? TOL_BF16 : TOL_LOOSE, what);
    buf_pull(p, &dw); // the increments
    for (size_t i = 0; i < (size_t)Vp * C; i++) dw.h[i] -= dw0[i], dw.c[i] -= dw0[i];
    double e = pair_bf16(p) ? max_err(dw.h, dw.c, (size_t)Vp * C) : rel_err(dw.h, dw.c, (size_t)Vp * C);
    cr_log_info("[%s] lm head rows=%d: weight gradient error %.3g", tp_dtype_name(p->dt), rows, e);
    cr_expect(e < (pair_bf16(p) ? TOL_BF16 : TOL_LOOSE), "[%s] lm head N=%d Vp=%d rows=%d: weight gradient error %.3g",
              tp_dtype_name(p->dt), N, Vp, rows, e);
    size_t bad = 0; // padding rows of wte get no gradient
    for (size_t i = (size_t)V * C; i < (size_t)Vp * C; i++) bad += dw.h[i] != 0.0f;
    cr_expect_eq(bad, 0, "lm head: %zu padding weight gradients", bad);
    cpu.iface->free(cpu.ctx, clg);
    cpu.iface->free(cpu.ctx, cx.maxes);
    cpu.iface->free(cpu.ctx, cx.sums);
    cpu.iface->free(cpu.ctx, cx.local_maxes);
    free(dw0);
    struct buf *bufs[] = {&x, &w, &loss, &din, &dw, &lg, &mx, &lmx, &sm};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) buf_free(p, bufs[i]);
    ibuf_free(p, &tgt);
}

static void run_lm_head(struct pair *p) {
    lm_head_case(p, 64, 64, 50257, 50304, 64); // one chunk
    lm_head_case(p, 64, 64, 50257, 50304, 24); // chunks of 24, 24 and 16 rows
    lm_head_case(p, 40, 32, 1000, 1024, 16);   // chunks of 16, 16 and 8
}

Test(cuda_ops, lm_head_cross_entropy) {
    struct pair p;
    pair_open(&p, 20);
    run_lm_head(&p);
    pair_close(&p);
}

Test(cuda_bf16, lm_head_cross_entropy) {
    struct pair p;
    pair_open_dt(&p, 20, TP_DTYPE_BF16);
    run_lm_head(&p);
    pair_close(&p);
}

// ---- reductions, scale, optimiser (fp32 tensors on both backends)

static void run_reductions_and_scale(struct pair *p) {
    size_t sizes[] = {1, 7, 1000, ((size_t)1 << 20) + 17, ((size_t)3 << 22) + 5};
    struct buf out = buf_new(p, 1);
    for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++) {
        size_t n = sizes[s];
        char what[128];
        struct buf x = buf_rand(p, n, -0.75f, 1.25f); // biased so the sum is not near 0
        buf_fill(p, &out, -9.0f, 9.0f);              // sum: "="
        p->cpu.iface->sum(p->cpu.ctx, out.c, x.c, n);
        p->gpu.iface->sum(p->gpu.ctx, out.g, x.g, n);
        snprintf(what, sizeof what, "sum n=%zu", n);
        expect_close(p, &out, TOL, what);

        buf_fill(p, &out, 1.0f, 100.0f); // sumsq_acc: "+="
        p->cpu.iface->sumsq_acc(p->cpu.ctx, out.c, x.c, n);
        p->gpu.iface->sumsq_acc(p->gpu.ctx, out.g, x.g, n);
        snprintf(what, sizeof what, "sumsq_acc n=%zu", n);
        expect_close(p, &out, TOL, what);

        p->cpu.iface->scale(p->cpu.ctx, x.c, -0.37f, n);
        p->gpu.iface->scale(p->gpu.ctx, x.g, -0.37f, n);
        snprintf(what, sizeof what, "scale n=%zu", n);
        expect_close(p, &x, TOL, what);
        buf_free(p, &x);
    }
    buf_free(p, &out);
}

Test(cuda_ops, reductions_and_scale) {
    struct pair p;
    pair_open(&p, 10);
    run_reductions_and_scale(&p);
    pair_close(&p);
}

Test(cuda_bf16, reductions_and_scale) {
    struct pair p;
    pair_open_dt(&p, 10, TP_DTYPE_BF16);
    run_reductions_and_scale(&p);
    pair_close(&p);
}

// A segment table over a flat buffer: odd sizes, an empty segment, one that spans several
// blocks of the one-pass kernels, interleaved norm groups, listed out of offset order (the ops
// must not assume a sorted table). Returns the segment count; *n_out = elements covered.
#define SEG_MAX 8
static int seg_table(struct param_segment *segs, size_t *n_out) {
    size_t sizes[] = {5, 100003, 7, 0, 40000, 1, 2359296, 4096};
    int groups[] = {0, 1, 0, 1, 1, 0, 0, 1};
    float wds[] = {0.1f, 0.0f, 0.1f, 0.0f, 0.05f, 0.0f, 0.1f, 0.0f};
    int order[] = {3, 0, 6, 1, 7, 2, 5, 4}; // table position of each segment
    size_t n = 0;
    for (int i = 0; i < SEG_MAX; i++) {
        segs[order[i]] = (struct param_segment){
            .offset = n, .numel = sizes[i], .weight_decay = wds[i], .norm_group = groups[i]};
        n += sizes[i];
    }
    *n_out = n;
    return SEG_MAX;
}

static void run_segments_sumsq(struct pair *p) {
    struct param_segment segs[SEG_MAX];
    size_t n = 0;
    int ns = seg_table(segs, &n);
    struct param_segment *dsegs = p->gpu.iface->alloc(p->gpu.ctx, sizeof segs);
    p->gpu.iface->copy_to_device(p->gpu.ctx, dsegs, segs, sizeof segs);
    for (int off = 0; off < 2; off++) { // off = 1: x not 16-byte aligned (element-wise path)
        struct buf x = buf_rand(p, n + 1, -1.0f, 1.0f);
        struct buf out = buf_rand(p, 2, -5.0f, 5.0f); // "="
        p->cpu.iface->segments_sumsq(p->cpu.ctx, out.c, x.c + off, segs, ns, n);
        p->gpu.iface->segments_sumsq(p->gpu.ctx, out.g, (float *)x.g + off, dsegs, ns, n);
        char what[96];
        snprintf(what, sizeof what, "segments_sumsq n=%zu offset %d", n, off);
        expect_close(p, &out, TOL, what);
        double want[2] = {0.0, 0.0};
        for (int k = 0; k < ns; k++)
            for (size_t j = 0; j < segs[k].numel; j++) {
                double v = x.h[off + segs[k].offset + j];
                want[segs[k].norm_group] += v * v;
            }
        for (int g = 0; g < 2; g++)
            cr_expect(fabs(out.h[g] - want[g]) <= 1e-6 * want[g],
                      "[%s] segments_sumsq group %d: %.9g, float64 %.9g", tp_dtype_name(p->dt), g,
                      out.h[g], want[g]);
        // deterministic: a second call gives the same bits
        float again[2];
        p->gpu.iface->segments_sumsq(p->gpu.ctx, out.g, (float *)x.g + off, dsegs, ns, n);
        p->gpu.iface->copy_to_host(p->gpu.ctx, again, out.g, sizeof again);
        cr_expect(memcmp(again, out.h, sizeof again) == 0, "segments_sumsq is not deterministic");
        buf_free(p, &x);
        buf_free(p, &out);
    }
    p->gpu.iface->free(p->gpu.ctx, dsegs);
}

Test(cuda_ops, segments_sumsq) {
    struct pair p;
    pair_open(&p, 15);
    run_segments_sumsq(&p);
    pair_close(&p);
}

Test(cuda_bf16, segments_sumsq) {
    struct pair p;
    pair_open_dt(&p, 15, TP_DTYPE_BF16);
    run_segments_sumsq(&p);
    pair_close(&p);
}

// Three AdamW steps over the segment table, each backend from identical state: step 1 without
// clipping, steps 2 and 3 with the squared norms of the scaled gradient (from segments_sumsq)
// and a threshold below the norm, so clipping is active. bf16 also rewrites p_compute, which must
// be exactly p rounded to bf16.
static void run_adamw(struct pair *p) {
    struct param_segment segs[SEG_MAX];
    size_t n = 0;
    int ns = seg_table(segs, &n);
    struct param_segment *dsegs = p->gpu.iface->alloc(p->gpu.ctx, sizeof segs);
    p->gpu.iface->copy_to_device(p->gpu.ctx, dsegs, segs, sizeof segs);
    const float grad_scale = 0.5f;
    struct buf par = buf_rand(p, n, -1.0f, 1.0f);
    struct buf m = buf_new(p, n), v = buf_new(p, n);
    struct buf nsq = buf_new(p, 2);
    uint16_t *pc_g = NULL; // (n) bf16 copy on the GPU
    if (pair_bf16(p)) {
        pc_g = p->gpu.iface->alloc(p->gpu.ctx, n * sizeof(uint16_t));
        p->gpu.iface->zero(p->gpu.ctx, pc_g, n * sizeof(uint16_t));
    }
    for (int t = 1; t <= 3; t++) {
        char what[128];
        struct buf g = buf_rand(p, n, -0.01f, 0.01f);
        bool clip = t > 1;
        float grad_clip = 0.0f;
        if (clip) {
            p->cpu.iface->segments_sumsq(p->cpu.ctx, nsq.c, g.c, segs, ns, n);
            p->cpu.iface->scale(p->cpu.ctx, nsq.c, grad_scale * grad_scale, 2);
            p->gpu.iface->segments_sumsq(p->gpu.ctx, nsq.g, g.g, dsegs, ns, n);
            p->gpu.iface->scale(p->gpu.ctx, nsq.g, grad_scale * grad_scale, 2);
            grad_clip = 0.5f * sqrtf(nsq.c[0] + nsq.c[1]); // clips by about 1/2
        }
        struct adamw_step sc = {.p = par.c, .g = g.c, .m = m.c, .v = v.c, .segs = segs,
                                .n_segs = ns, .n = n, .lr = 6e-4f, .beta1 = 0.9f, .beta2 = 0.95f,
                                .eps = 1e-8f, .grad_scale = grad_scale,
                                .norm_sq = clip ? nsq.c : NULL, .grad_clip = grad_clip, .t = t};
        struct adamw_step sg = sc;
        sg.p = par.g;
        sg.g = g.g;
        sg.m = m.g;
        sg.v = v.g;
        sg.segs = dsegs;
        sg.norm_sq = clip ? nsq.g : NULL;
        sg.p_compute = pc_g;
        p->cpu.iface->adamw(p->cpu.ctx, &sc);
        p->gpu.iface->adamw(p->gpu.ctx, &sg);
        snprintf(what, sizeof what, "adamw p n=%zu t=%d clip=%d", n, t, clip);
        expect_close(p, &par, TOL, what);
        snprintf(what, sizeof what, "adamw m n=%zu t=%d", n, t);
        expect_close(p, &m, TOL, what);
        snprintf(what, sizeof what, "adamw v n=%zu t=%d", n, t);
        expect_close(p, &v, TOL, what);
        if (pc_g) { // par.h holds the GPU's p after expect_close
            uint16_t *pc = tp_malloc(n * sizeof(uint16_t));
            p->gpu.iface->copy_to_host(p->gpu.ctx, pc, pc_g, n * sizeof(uint16_t));
            size_t bad = 0;
            for (size_t i = 0; i < n; i++) bad += pc[i] != tp_bf16_from_f32(par.h[i]);
            cr_expect_eq(bad, 0, "adamw t=%d: %zu of %zu p_compute values are not p rounded to "
                         "bf16", t, bad, n);
            free(pc);
        }
        // continue both from identical state so errors do not compound
        p->gpu.iface->copy_to_device(p->gpu.ctx, m.g, m.c, n * sizeof(float));
        p->gpu.iface->copy_to_device(p->gpu.ctx, v.g, v.c, n * sizeof(float));
        p->gpu.iface->copy_to_device(p->gpu.ctx, par.g, par.c, n * sizeof(float));
        buf_free(p, &g);
    }
    if (pc_g) p->gpu.iface->free(p->gpu.ctx, pc_g);
    p->gpu.iface->free(p->gpu.ctx, dsegs);
    buf_free(p, &par);
    buf_free(p, &m);
    buf_free(p, &v);
    buf_free(p, &nsq);
}

Test(cuda_ops, adamw) {
    struct pair p;
    pair_open(&p, 11);
    run_adamw(&p);
    pair_close(&p);
}

Test(cuda_bf16, adamw) {
    struct pair p;
    pair_open_dt(&p, 11, TP_DTYPE_BF16);
    run_adamw(&p);
    pair_close(&p);
}

// The same AdamW step through the vector body (every buffer 16-byte aligned) and through the
// element-wise one (every buffer one element off): bitwise the same p, m, v and compute copy, with
// clipping active, at a size that spans many chunks of the one-wave launch (chunk edges inside
// segments). Each element is one expression whichever body, chunk or grouping computes it.
static void run_adamw_paths(struct pair *p) {
    const struct backend_i *g = p->gpu.iface;
    struct param_segment segs[SEG_MAX];
    size_t n = 0;
    int ns = seg_table(segs, &n);
    struct param_segment *dsegs = g->alloc(p->gpu.ctx, sizeof segs);
    g->copy_to_device(p->gpu.ctx, dsegs, segs, sizeof segs);
    float *h[4]; // p, g, m, v
    for (int k = 0; k < 4; k++) {
        h[k] = tp_malloc(n * sizeof(float));
        for (size_t i = 0; i < n; i++)
            h[k][i] = k == 1 ? rng_uniform(&p->rng, -0.01f, 0.01f) : k == 3 ? rng_uniform(&p->rng, 0.0f, 1e-4f)
                                                                           : rng_uniform(&p->rng, -1.0f, 1.0f);
    }
    size_t es = tp_dtype_size(p->dt);
    float *out[2][3];
    uint16_t *copy[2] = {NULL, NULL};
    float nsq_h[2] = {4.0f, 5.0f}; // norm 3: clipped to grad_clip 1
    float *nsq = g->alloc(p->gpu.ctx, sizeof nsq_h);
    g->copy_to_device(p->gpu.ctx, nsq, nsq_h, sizeof nsq_h);
    for (int off = 0; off < 2; off++) {
        float *d[4];
        for (int k = 0; k < 4; k++) {
            d[k] = g->alloc(p->gpu.ctx, (n + 1) * sizeof(float));
            g->copy_to_device(p->gpu.ctx, d[k] + off, h[k], n * sizeof(float));
        }
        void *pc = pair_bf16(p) ? g->alloc(p->gpu.ctx, (n + 1) * es) : NULL;
        struct adamw_step st = {.p = d[0] + off, .p_compute = pc ? (char *)pc + off * es : NULL, .g = d[1] + off,
                                .m = d[2] + off, .v = d[3] + off, .segs = dsegs, .n_segs = ns, .n = n, .lr = 6e-4f,
                                .beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f, .grad_scale = 0.5f, .norm_sq = nsq,
                                .grad_clip = 1.0f, .t = 3};
        g->adamw(p->gpu.ctx, &st);
        int slot[3] = {0, 2, 3};
        for (int k = 0; k < 3; k++) {
            out[off][k] = tp_malloc(n * sizeof(float));
            g->copy_to_host(p->gpu.ctx, out[off][k], d[slot[k]] + off, n * sizeof(float));
        }
        if (pc) {
            copy[off] = tp_malloc(n * sizeof(uint16_t));
            g->copy_to_host(p->gpu.ctx, copy[off], (char *)pc + off * es, n * sizeof(uint16_t));
            g->free(p->gpu.ctx, pc);
        }
        for (int k = 0; k < 4; k++) g->free(p->gpu.ctx, d[k]);
    }
    if (pair_bf16(p)) {
        // split masters (p NULL; high halves in p_compute, low halves in p_lo): the same update
        // bit for bit (adamw_elem rounds every operation as written, wherever it is inlined), the
        // high half the split of the joined master; through the vector body (halves 8-byte
        // aligned) and the element-wise one (one element off)
        size_t stride = (n + 3) / 4 * 4 + 4; // the low halves' distance from the high halves
        uint16_t *hl = tp_malloc(2 * n * sizeof(uint16_t)), *dh = g->alloc(p->gpu.ctx, 2 * stride * sizeof(uint16_t));
        float *mv = tp_malloc(n * sizeof(float));
        for (int off = 0; off < 2; off++) {
            for (size_t i = 0; i < n; i++) {
                uint32_t b;
                memcpy(&b, h[0] + i, sizeof b);
                hl[i] = tp_split_hi(b);
                hl[n + i] = tp_split_lo(b);
            }
            float *d[3];
            for (int k = 0; k < 3; k++) {
                d[k] = g->alloc(p->gpu.ctx, n * sizeof(float));
                g->copy_to_device(p->gpu.ctx, d[k], h[k + 1], n * sizeof(float));
            }
            g->copy_to_device(p->gpu.ctx, dh + off, hl, n * sizeof(uint16_t));
            g->copy_to_device(p->gpu.ctx, dh + off + stride, hl + n, n * sizeof(uint16_t));
            struct adamw_step st = {.p_compute = dh + off, .p_lo = dh + off + stride, .g = d[0], .m = d[1],
                                    .v = d[2], .segs = dsegs, .n_segs = ns, .n = n, .lr = 6e-4f, .beta1 = 0.9f,
                                    .beta2 = 0.95f, .eps = 1e-8f, .grad_scale = 0.5f, .norm_sq = nsq,
                                    .grad_clip = 1.0f, .t = 3};
            g->adamw(p->gpu.ctx, &st);
            g->copy_to_host(p->gpu.ctx, hl, dh + off, n * sizeof(uint16_t));
            g->copy_to_host(p->gpu.ctx, hl + n, dh + off + stride, n * sizeof(uint16_t));
            size_t differ = 0, off_half = 0;
            double worst = 0.0;
            for (size_t i = 0; i < n; i++) {
                uint32_t bits = tp_split_join(hl[i], hl[n + i]);
                float got;
                memcpy(&got, &bits, sizeof got);
                differ += got != out[0][0][i];
                off_half += hl[i] != tp_split_hi(bits);
                double e = fabs((double)got - out[0][0][i]) / (fabs((double)out[0][0][i]) + 1e-30);
                if (e > worst) worst = e;
            }
            const char *body = off ? "element-wise" : "vector";
            cr_expect(differ == 0 && off_half == 0, "adamw on split masters (%s body): %zu of %zu masters differ "
                      "from the fp32 masters' update (worst %.3g relative), %zu high halves not the split",
                      body, differ, n, worst, off_half);
            for (int k = 1; k < 3; k++) {
                g->copy_to_host(p->gpu.ctx, mv, d[k], n * sizeof(float));
                double wm = 0.0;
                for (size_t i = 0; i < n; i++) {
                    double e = fabs((double)mv[i] - out[0][k][i]) / (fabs((double)out[0][k][i]) + 1e-30);
                    if (e > wm) wm = e;
                }
                cr_expect(wm == 0.0, "adamw on split masters (%s body): moment %d differs by up to %.3g relative",
                          body, k, wm);
            }
            for (int k = 0; k < 3; k++) g->free(p->gpu.ctx, d[k]);
        }
        free(mv);
        g->free(p->gpu.ctx, dh);
        free(hl);
    }
    const char *names[3] = {"p", "m", "v"};
    for (int k = 0; k < 3; k++)
        cr_expect(memcmp(out[0][k], out[1][k], n * sizeof(float)) == 0,
                  "[%s] adamw %s: the vector and element-wise bodies differ", tp_dtype_name(p->dt), names[k]);
    if (copy[0])
        cr_expect(memcmp(copy[0], copy[1], n * sizeof(uint16_t)) == 0,
                  "[%s] adamw compute copy: the vector and element-wise bodies differ", tp_dtype_name(p->dt));
    for (int off = 0; off < 2; off++) {
        for (int k = 0; k < 3; k++) free(out[off][k]);
        free(copy[off]);
    }
    for (int k = 0; k < 4; k++) free(h[k]);
    g->free(p->gpu.ctx, nsq);
    g->free(p->gpu.ctx, dsegs);
}

Test(cuda_ops, adamw_vector_and_elementwise_agree) {
    struct pair p;
    pair_open(&p, 21);
    run_adamw_paths(&p);
    pair_close(&p);
}

Test(cuda_bf16, adamw_vector_and_elementwise_agree) {
    struct pair p;
    pair_open_dt(&p, 21, TP_DTYPE_BF16);
    run_adamw_paths(&p);
    pair_close(&p);
}

// ---- determinism: a layer's worth of ops, twice, must give bitwise equal results

// Runs the ops that reduce (where float order matters) on fixed inputs from seed, in the
// backend's own compute type, and returns every output's bytes, concatenated, in a new host
// array of *n_out bytes.
static unsigned char *det_run(struct backend be, uint64_t seed, size_t *n_out) {
    const struct backend_i *g = be.iface;
    void *cx = be.ctx;
    const size_t es = tp_dtype_size(g->dtype(cx));
    enum { B = 2, T = 128, NH = 12, HS = 64, C = NH * HS, NV = 5000, V = 4999 };
    const int N = B * T;
    uint64_t rng = seed;
    size_t total = 0;
    unsigned char *res = NULL;
// an fp32 device tensor of n floats with random values in [lo, hi)
#define DET_RAND(name, n, lo, hi)                                                         \
    float *name = g->alloc(cx, (size_t)(n) * sizeof(float));                              \
    {                                                                                     \
        float *h_ = tp_malloc((size_t)(n) * sizeof(float));                               \
        for (size_t i_ = 0; i_ < (size_t)(n); i_++) h_[i_] = rng_uniform(&rng, lo, hi);   \
        g->copy_to_device(cx, name, h_, (size_t)(n) * sizeof(float));                     \
        free(h_);                                                                         \
    }
// the same as a compute-type tensor, through to_compute
#define DET_CRAND(name, n, lo, hi)                                                        \
    void *name = g->alloc(cx, (size_t)(n) * es);                                          \
    {                                                                                     \
        DET_RAND(t_, n, lo, hi);                                                          \
        g->to_compute(cx, name, t_, (size_t)(n));                                         \
        g->free(cx, t_);                                                                  \
    }
// append n bytes of a device tensor to the result
#define DET_KEEP(ptr, nbytes)                                                              \
    {                                                                                      \
        res = realloc(res, total + (size_t)(nbytes));                                      \
        cr_assert_not_null(res);                                                           \
        g->copy_to_host(cx, res + total, ptr, (size_t)(nbytes));                           \
        total += (size_t)(nbytes);                                                         \
    }
    int *tok_h = tp_malloc((size_t)N * sizeof(int));
    for (int i = 0; i < N; i++) tok_h[i] = rng_int(&rng, 40); // heavy repeats
    int *tok = g->alloc(cx, (size_t)N * sizeof(int));
    g->copy_to_device(cx, tok, tok_h, (size_t)N * sizeof(int));

    DET_CRAND(wte, (size_t)NV * C, -1.0f, 1.0f);
    DET_CRAND(wpe, (size_t)T * C, -1.0f, 1.0f);
    DET_CRAND(lnw, C, 0.5f, 1.5f);
    DET_CRAND(lnb, C, -0.5f, 0.5f);
    DET_CRAND(wqkv, (size_t)3 * C * C, -0.05f, 0.05f);
    DET_CRAND(bqkv, 3 * C, -0.1f, 0.1f);
    DET_CRAND(wfc, (size_t)4 * C * C, -0.05f, 0.05f);
    DET_CRAND(bfc, 4 * C, -0.1f, 0.1f);
    DET_CRAND(wproj, (size_t)C * 4 * C, -0.05f, 0.05f);
    void *x = g->alloc(cx, (size_t)N * C * es);
    void *ln = g->alloc(cx, (size_t)N * C * es);
    float *mean = g->alloc(cx, (size_t)N * sizeof(float));
    float *rstd = g->alloc(cx, (size_t)N * sizeof(float));
    void *qkv = g->alloc(cx, (size_t)N * 3 * C * es);
    void *att = g->alloc(cx, (size_t)N * C * es);
    void *fch = g->alloc(cx, (size_t)N * 4 * C * es);
    void *fch_pre = g->alloc(cx, (size_t)N * 4 * C * es);
    size_t ns = g->attention_saved_floats(cx, B, T, NH, HS);
    size_t nx = g->attention_scratch_floats(cx, B, T, NH, HS);
    float *saved = g->alloc(cx, ns * sizeof(float));
    float *scratch = g->alloc(cx, nx * sizeof(float));

    g->vocab_embedding_fwd(cx, x, tok, wte, N, C, 0, NV);
    g->position_embedding_fwd(cx, x, wpe, B, T, C);
    g->layernorm_fwd(cx, ln, mean, rstd, x, lnw, lnb, N, C);
    g->matmul_fwd(cx, qkv, NULL, ln, wqkv, bqkv, N, C, 3 * C);
    g->attention_fwd(cx, att, saved, scratch, qkv, B, T, NH, HS);
    g->matmul_fwd(cx, fch, fch_pre, ln, wfc, bfc, N, C, 4 * C);
    DET_KEEP(ln, (size_t)N * C * es);
    DET_KEEP(mean, (size_t)N * sizeof(float));
    DET_KEEP(rstd, (size_t)N * sizeof(float));
    DET_KEEP(qkv, (size_t)N * 3 * C * es);
    DET_KEEP(att, (size_t)N * C * es);
    DET_KEEP(saved, ns * sizeof(float));
    DET_KEEP(fch, (size_t)N * 4 * C * es);
    DET_KEEP(fch_pre, (size_t)N * 4 * C * es);

    // one flat fp32 gradient buffer, as the model has: [dwqkv | dbqkv | dlnw | dlnb | dwproj]
    const size_t n_wqkv = (size_t)3 * C * C, n_wproj = (size_t)C * 4 * C;
    const size_t n_grad = n_wqkv + 3 * C + 2 * C + n_wproj;
    float *grads = g->alloc(cx, n_grad * sizeof(float));
    float *dwqkv = grads, *dbqkv = dwqkv + n_wqkv, *dlnw = dbqkv + 3 * C, *dlnb = dlnw + C;
    float *dwproj = dlnb + C;
    DET_CRAND(datt, (size_t)N * C, -1.0f, 1.0f);
    DET_CRAND(dy, (size_t)N * C, -1.0f, 1.0f);
    void *dqkv = g->alloc(cx, (size_t)N * 3 * C * es);
    void *dln = g->alloc(cx, (size_t)N * C * es);
    void *dx = g->alloc(cx, (size_t)N * C * es);
    void *dfch = g->alloc(cx, (size_t)N * 4 * C * es);
    float *dbproj = g->alloc(cx, (size_t)C * sizeof(float));
    float *dsum = g->alloc(cx, (size_t)C * sizeof(float));
    float *dwte = g->alloc(cx, (size_t)NV * C * sizeof(float));
    float *dwpe = g->alloc(cx, (size_t)T * C * sizeof(float));
    g->attention_bwd(cx, dqkv, NULL, scratch, datt, qkv, att, saved, B, T, NH, HS);
    g->matmul_bwd(cx, dln, NULL, dwqkv, dbqkv, dqkv, ln, wqkv, NULL, N, C, 3 * C);
    // the MLP projection's backward: its input was gelu(fch_pre), so dinp gets gelu'
    g->matmul_bwd(cx, dfch, NULL, dwproj, dbproj, dy, fch, wproj, fch_pre, N, 4 * C, C);
    g->layernorm_bwd(cx, dx, dlnw, dlnb, dsum, dln, x, lnw, mean, rstd, N, C);
    g->vocab_embedding_bwd(cx, dwte, dx, tok, N, C, 0, NV);
    g->position_embedding_bwd(cx, dwpe, dx, B, T, C);
    DET_KEEP(dqkv, (size_t)N * 3 * C * es);
    DET_KEEP(dfch, (size_t)N * 4 * C * es);
    DET_KEEP(grads, n_grad * sizeof(float));
    DET_KEEP(dbproj, (size_t)C * sizeof(float));
    DET_KEEP(dsum, (size_t)C * sizeof(float));
    DET_KEEP(dx, (size_t)N * C * es);
    DET_KEEP(dwte, (size_t)NV * C * sizeof(float));
    DET_KEEP(dwpe, (size_t)T * C * sizeof(float));

    // the LM head's loss on a vocabulary shard with padding
    void *logits = g->alloc(cx, (size_t)N * NV * es);
    g->matmul_fwd(cx, logits, NULL, ln, wte, NULL, N, C, NV);
    int *tgt = g->alloc(cx, (size_t)N * sizeof(int));
    g->copy_to_device(cx, tgt, tok_h, (size_t)N * sizeof(int));
    float *maxes = g->alloc(cx, (size_t)N * sizeof(float));
    float *sums = g->alloc(cx, 2 * (size_t)N * sizeof(float));
    float *losses = g->alloc(cx, (size_t)N * sizeof(float));
    g->xent_stats(cx, maxes, sums, logits, tgt, N, 0, NV, V);
    g->xent_loss(cx, losses, maxes, sums, N);
    g->xent_bwd(cx, logits, logits, maxes, sums, tgt, 1.0f / N, N, 0, NV, V);
    DET_KEEP(maxes, (size_t)N * sizeof(float));
    DET_KEEP(sums, 2 * (size_t)N * sizeof(float));
    DET_KEEP(losses, (size_t)N * sizeof(float));
    DET_KEEP(logits, (size_t)N * NV * es);

    // norms and the optimiser over the flat buffers
    float *acc = g->alloc(cx, 4 * sizeof(float));
    g->sum(cx, acc, dwqkv, n_wqkv);
    g->sumsq_acc(cx, acc + 1, dwte, (size_t)NV * C);
    struct param_segment segs[] = {
        {.offset = 0, .numel = n_wqkv, .weight_decay = 0.1f, .norm_group = 0},
        {.offset = n_wqkv, .numel = 3 * C, .weight_decay = 0.0f, .norm_group = 0},
        {.offset = n_wqkv + 3 * C, .numel = 2 * C, .weight_decay = 0.0f, .norm_group = 1},
        {.offset = n_wqkv + 5 * C, .numel = n_wproj, .weight_decay = 0.1f, .norm_group = 0},
    };
    struct param_segment *dsegs = g->alloc(cx, sizeof segs);
    g->copy_to_device(cx, dsegs, segs, sizeof segs);
    g->segments_sumsq(cx, acc + 2, grads, dsegs, 4, n_grad);
    DET_KEEP(acc, 4 * sizeof(float));
    DET_RAND(params, n_grad, -0.1f, 0.1f);
    float *m = g->alloc(cx, n_grad * sizeof(float));
    float *v = g->alloc(cx, n_grad * sizeof(float));
    void *pc = g->alloc(cx, n_grad * es);
    struct adamw_step st = {.p = params, .p_compute = pc, .g = grads, .m = m, .v = v,
                            .segs = dsegs, .n_segs = 4, .n = n_grad, .lr = 6e-4f, .beta1 = 0.9f,
                            .beta2 = 0.95f, .eps = 1e-8f, .grad_scale = 0.7f,
                            .norm_sq = acc + 2, .grad_clip = 1.0f, .t = 1};
    g->adamw(cx, &st);
    DET_KEEP(params, n_grad * sizeof(float));
    DET_KEEP(pc, n_grad * es);
    DET_KEEP(m, n_grad * sizeof(float));
    DET_KEEP(v, n_grad * sizeof(float));
#undef DET_RAND
#undef DET_CRAND
#undef DET_KEEP

    void *all[] = {tok, wte, wpe, lnw, lnb, wqkv, bqkv, wfc, bfc, wproj, x, ln, mean, rstd, qkv,
                   att, fch, fch_pre, saved, scratch, grads, datt, dy, dqkv, dln, dx, dfch,
                   dbproj, dwte, dwpe, logits, tgt, maxes, sums, losses, acc, dsegs, params, m,
                   v, pc};
    for (size_t k = 0; k < sizeof all / sizeof all[0]; k++) g->free(cx, all[k]);
    free(tok_h);
    *n_out = total;
    return res;
}

static void run_deterministic(struct pair *p) {
    size_t n1 = 0, n2 = 0;
    unsigned char *r1 = det_run(p->gpu, 777, &n1);
    unsigned char *r2 = det_run(p->gpu, 777, &n2);
    cr_assert_eq(n1, n2);
    size_t differ = 0, first = n1;
    for (size_t i = 0; i < n1; i++)
        if (r1[i] != r2[i]) {
            if (first == n1) first = i;
            differ++;
        }
    cr_expect_eq(differ, 0, "[%s] two identical runs differ in %zu of %zu bytes (first at %zu)",
                 tp_dtype_name(p->dt), differ, n1, first);
    // the same on a second, fresh backend instance
    struct backend other;
    char err[512];
    cr_assert(backend_cuda_create(&other, 0, p->dt, err, sizeof err), "%s", err);
    size_t n3 = 0;
    unsigned char *r3 = det_run(other, 777, &n3);
    cr_assert_eq(n1, n3);
    cr_expect(memcmp(r1, r3, n1) == 0, "[%s] a second backend instance gives different bits",
              tp_dtype_name(p->dt));
    // and a different seed must change them (the check above is not vacuous)
    size_t n4 = 0;
    unsigned char *r4 = det_run(p->gpu, 778, &n4);
    cr_expect(memcmp(r1, r4, n1) != 0, "different inputs gave identical outputs");
    backend_destroy(&other);
    free(r1);
    free(r2);
    free(r3);
    free(r4);
}

Test(cuda_ops, deterministic) {
    struct pair p;
    pair_open(&p, 12);
    run_deterministic(&p);
    pair_close(&p);
}

Test(cuda_bf16, deterministic) {
    struct pair p;
    pair_open_dt(&p, 12, TP_DTYPE_BF16);
    run_deterministic(&p);
    pair_close(&p);
}

Test(cuda_bf16, deterministic_new_kernels) {
    cr_assert_eq(setenv("TPTRAIN_EMB_BWD", "sorted", 1), 0);
    run_with("TPTRAIN_LN_BWD", "rows", TP_DTYPE_BF16, 12, run_deterministic);
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
    struct backend cpu = backend_cpu_create(TP_DTYPE_F32);
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
    cr_assert(backend_cuda_create(&be, 0, TP_DTYPE_F32, err, sizeof err),
              "backend_cuda_create: %s", err);
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
