// bench.c: --bench: what tensor parallelism costs on this machine, timed as training runs it.
//
// Launched like training, one process per GPU, and the ranks form one TP group (dp = 1):
//   layer M K N          column-parallel, row-parallel and MLP-block linears, forward and backward
//   allreduce SIZES...   all-reduce latency and bandwidth on the TP group, nccl-tests' table
//   model CONFIG.yaml    one training step, whole and broken down by phase
// Times come from backend events (stream time) where the backend has them, else from the host
// clock after a synchronize. Ranks start every iteration together (a barrier) and an iteration
// lasts as long as its slowest rank. Each all-reduce is bracketed by its own pair of marks, which
// splits communication from compute. Rank 0 prints; --json writes the same numbers.
//
// Sections: sizes and FLOPs, clock, statistics, setup, phase driver, output helpers, layer,
// allreduce, model, entry point.
#include "bench.h"

#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <jansson.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "config.h"
#include "mesh.h"
#include "model.h"
#include "optim.h"
#include "tp.h"
#include "train.h"

// Default iteration counts; TPTRAIN_BENCH_ITERS replaces them all.
#define LAYER_WARMUP 5
#define LAYER_TARGET_MS 1000.0 // timed iterations are scaled to about this long per phase
#define LAYER_MIN_ITERS 10
#define LAYER_MAX_ITERS 2000
#define ALLREDUCE_WARMUP 5     // all_reduce_perf's defaults, so figures compare
#define ALLREDUCE_ITERS 20
#define MODEL_WARMUP 2         // model mode times train.steps steps after these
#define MAX_SIZES 64           // all-reduce sizes in one run

// ---- sizes and FLOPs

struct bench_layer_flops bench_layer_flops(long M, long K, long N, int P) {
    double mm = 2.0 * (double)M * (double)K * ((double)N / (double)P); // (M, K) x (K, N/P)
    return (struct bench_layer_flops){
        .column_fwd = mm, .column_bwd = 2 * mm,
        .row_fwd = mm, .row_bwd = 2 * mm,
        .mlp_fwd = 2 * mm, .mlp_bwd = 4 * mm,
    };
}

bool bench_parse_size(const char *s, size_t *out) {
    if (!s || !isdigit((unsigned char)s[0])) return false; // no sign, no blank
    errno = 0;
    char *end;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno) return false;
    unsigned long long mult = 1;
    switch (toupper((unsigned char)*end)) {
    case 'K': mult = 1ull << 10; end++; break;
    case 'M': mult = 1ull << 20; end++; break;
    case 'G': mult = 1ull << 30; end++; break;
    default: break;
    }
    if (*end || v == 0 || v > SIZE_MAX / mult) return false;
    *out = (size_t)(v * mult);
    return true;
}

// A layer dimension: a positive int (the backend ops take int sizes).
static bool parse_dim(const char *s, int *out) {
    if (!s || !isdigit((unsigned char)s[0])) return false;
    errno = 0;
    char *end;
    long v = strtol(s, &end, 10);
    if (errno || *end || v <= 0 || v > INT_MAX) return false;
    *out = (int)v;
    return true;
}

// ---- clock

// Marks in time, in order: mark 0 starts an iteration, the last one ends it, and the pairs in
// between bracket all-reduces. Backend events where the backend has them (stream time, no host
// wait), else the host clock after synchronize.
struct bench_clock {
    struct backend be;
    bool events;
    void **ev;      // (cap) backend events, when events
    double *host;   // (cap) seconds, otherwise
    int n, cap;
};

static void clock_init(struct bench_clock *c, struct backend be, bool events) {
    memset(c, 0, sizeof *c);
    c->be = be;
    c->events = events;
}

static void clock_destroy(struct bench_clock *c) {
    for (int i = 0; c->events && i < c->cap; i++) c->be.iface->event_destroy(c->be.ctx, c->ev[i]);
    free(c->ev);
    free(c->host);
    memset(c, 0, sizeof *c);
}

// Records a mark and returns its index; c may be NULL (an untimed run).
static int clock_mark(struct bench_clock *c) {
    if (!c) return -1;
    if (c->n == c->cap) { // grows during the first iteration only: the marks per iteration repeat
        int cap = c->cap ? 2 * c->cap : 16;
        c->ev = realloc(c->ev, (size_t)cap * sizeof *c->ev);
        c->host = realloc(c->host, (size_t)cap * sizeof *c->host);
        if (!c->ev || !c->host) tp_die(TP_EXIT_RUNTIME, "bench: out of host memory for %d timing marks", cap);
        for (int i = c->cap; i < cap; i++) c->ev[i] = c->events ? c->be.iface->event_create(c->be.ctx) : NULL;
        c->cap = cap;
    }
    int i = c->n++;
    if (c->events) {
        c->be.iface->event_record(c->be.ctx, c->ev[i]);
    } else {
        c->be.iface->synchronize(c->be.ctx);
        c->host[i] = tp_now();
    }
    return i;
}

static double clock_ms(const struct bench_clock *c, int from, int to) {
    if (c->events) return (double)c->be.iface->event_elapsed_ms(c->be.ctx, c->ev[from], c->ev[to]);
    return 1e3 * (c->host[to] - c->host[from]);
}

// ---- statistics

struct stats {
    double median, min, max, p10, p90; // ms
};

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static struct stats stats_of(const double *x, int n) {
    double *s = tp_malloc((size_t)n * sizeof *s);
    memcpy(s, x, (size_t)n * sizeof *s);
    qsort(s, (size_t)n, sizeof *s, cmp_double);
    struct stats st = {
        .median = n % 2 ? s[n / 2] : 0.5 * (s[n / 2 - 1] + s[n / 2]),
        .min = s[0],
        .max = s[n - 1],
        .p10 = s[(int)(0.1 * (n - 1) + 0.5)], // nearest rank
        .p90 = s[(int)(0.9 * (n - 1) + 0.5)],
    };
    free(s);
    return st;
}

// ---- setup

struct bench {
    struct tp_config cfg;
    struct mesh mesh;
    bool have_mesh;
    struct backend be;
    bool root;              // world rank 0 prints and writes the JSON
    bool events;            // the backend times with events
    int warmup, iters;      // from TPTRAIN_BENCH_ITERS when iters_fixed
    bool iters_fixed;
    double peak_tflops;     // per GPU; 0 = unknown (CPU backend without log.peak_tflops)
    FILE *json;             // rank 0 with --json
    struct bench_clock clock;
};

// TPTRAIN_BENCH_ITERS = "N" or "W+N": N timed iterations after W warm-up ones (W default min(5, N)).
static int iters_from_env(struct bench *b) {
    const char *s = getenv("TPTRAIN_BENCH_ITERS");
    if (!s || !*s) return 0;
    long w = -1, n;
    char *end;
    errno = 0;
    long first = strtol(s, &end, 10);
    bool ok = isdigit((unsigned char)s[0]) && !errno;
    if (ok && *end == '+') {
        w = first;
        const char *t = end + 1;
        n = strtol(t, &end, 10);
        ok = isdigit((unsigned char)t[0]) && !errno;
    } else {
        n = first;
    }
    if (!ok || *end || n < 1 || n > 1000000 || w > 1000000) {
        if (b->root)
            fprintf(stderr, "tptrain: TPTRAIN_BENCH_ITERS='%s': expected N or W+N (N >= 1 timed "
                            "iterations after W warm-up ones)\n", s);
        return TP_EXIT_USAGE;
    }
    b->iters = (int)n;
    b->warmup = w >= 0 ? (int)w : (n < 5 ? (int)n : 5);
    b->iters_fixed = true;
    return 0;
}

// The default config (or CONFIG.yaml in model mode) with the --set overrides, sized for one TP
// group of all the ranks. Every rank reads the same input and fails alike: rank 0 reports.
static int bench_config(struct bench *b, const struct bench_opts *o, const char *model_path) {
    struct tp_config *cfg = &b->cfg;
    char err[2048] = "";
    int world;
    mesh_world(NULL, &world);
    config_defaults(cfg);
    int st = model_path ? config_load_file(cfg, model_path, err, sizeof err) : 0;
    for (int i = 0; !st && i < o->n_sets; i++) st = config_apply_set(cfg, o->sets[i], err, sizeof err);
    if (!st && cfg->parallel.tp != world && cfg->parallel.tp != 1 && b->root)
        fprintf(stderr, "tptrain: notice: --bench times one TP group of all %d ranks; parallel.tp=%d "
                        "is replaced by %d\n", world, cfg->parallel.tp, world);
    cfg->parallel.tp = world;
    cfg->parallel.dp = 0; // derived: 1
    // The benchmark feeds synthetic tokens and starts from random weights, so the data, init and
    // checkpoint keys play no part: only the model and batch checks apply.
    if (!st && model_path) st = config_validate_model(cfg, world, err, sizeof err);
    cfg->parallel.dp = 1;
    if (st && b->root) fprintf(stderr, "tptrain: %s\n", err);
    return st;
}

static double peak_tflops(const struct bench *b) {
    if (b->cfg.log.peak_tflops > 0) return b->cfg.log.peak_tflops;
    if (b->mesh.device < 0) return 0.0; // no meaningful peak for the CPU backend
    // H100/H200 SXM dense: bf16 989 TFLOP/s, plain fp32 67 (TF32 is off in fp32 mode)
    return b->cfg.train.precision == TP_PREC_BF16 ? 989.0 : 67.0;
}

// Mesh, backend, comms and the JSON file; every step agreed across ranks.
static int bench_start(struct bench *b, const char *json_path) {
    char err[2048] = "";
    mesh_init(&b->mesh, &b->cfg);
    b->have_mesh = true;
    int st = mesh_create_backend(&b->mesh, &b->cfg, &b->be, err, sizeof err);
    if (!st) st = mesh_create_comms(&b->mesh, &b->cfg, b->be, err, sizeof err);
    if (st) {
        if (b->root) fprintf(stderr, "tptrain: %s\n", err);
        return st;
    }
    const struct backend_i *bi = b->be.iface;
    b->events = bi->event_create && bi->event_record && bi->event_elapsed_ms && bi->event_destroy;
    clock_init(&b->clock, b->be, b->events);
    b->peak_tflops = peak_tflops(b);
    if (b->root && json_path) {
        b->json = fopen(json_path, "w");
        if (!b->json) {
            fprintf(stderr, "tptrain: --json: cannot create '%s': %s\n", json_path, strerror(errno));
            st = TP_EXIT_USAGE;
        }
    }
    return mesh_agree(&b->mesh, st);
}

// Closes the JSON file (rank 0); every rank learns whether its last bytes reached the disk, so
// a full disk is an error (exit 1), not a missing file found later.
static int bench_finish(struct bench *b, const char *json_path) {
    int st = 0;
    if (b->json) {
        bool bad = ferror(b->json) || fflush(b->json) != 0;
        bad |= fclose(b->json) != 0;
        b->json = NULL;
        if (bad) {
            fprintf(stderr, "tptrain: --json: writing '%s' failed: %s\n", json_path, strerror(errno));
            st = TP_EXIT_RUNTIME;
        }
    }
    if (b->have_mesh) st = mesh_agree(&b->mesh, st);
    if (b->clock.be.iface) clock_destroy(&b->clock);
    if (b->have_mesh) mesh_destroy(&b->mesh);
    backend_destroy(&b->be);
    return st;
}

// Fills n compute-type elements of backend memory with uniform values in [-scale, scale), a pure
// function of seed (rounded to bf16 on the bf16 path).
static void fill_uniform(struct backend be, void *dst, size_t n, float scale, uint64_t seed) {
    enum { CHUNK = 1 << 20 };
    enum tp_dtype dt = be.iface->dtype(be.ctx);
    size_t es = tp_dtype_size(dt);
    float *h = tp_malloc((n < CHUNK ? n : CHUNK) * sizeof(float));
    uint16_t *h16 = dt == TP_DTYPE_BF16 ? tp_malloc((n < CHUNK ? n : CHUNK) * sizeof(uint16_t)) : NULL;
    uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
    for (size_t off = 0; off < n; off += CHUNK) {
        size_t k = n - off < CHUNK ? n - off : CHUNK;
        for (size_t i = 0; i < k; i++) {
            x ^= x << 13, x ^= x >> 7, x ^= x << 17; // xorshift64
            h[i] = scale * (2.0f * (float)((double)(x >> 11) * 0x1.0p-53) - 1.0f);
            if (h16) h16[i] = tp_bf16_from_f32(h[i]);
        }
        be.iface->copy_to_device(be.ctx, (char *)dst + off * es, h16 ? (void *)h16 : (void *)h, k * es);
    }
    free(h);
    free(h16);
}

static float *alloc_floats(struct bench *b, size_t n) {
    return b->be.iface->alloc(b->be.ctx, (n ? n : 1) * sizeof(float));
}

// n elements of the backend's compute type.
static void *alloc_compute(struct bench *b, size_t n) {
    return b->be.iface->alloc(b->be.ctx, (n ? n : 1) * tp_dtype_size(b->be.iface->dtype(b->be.ctx)));
}

// ---- phase driver

// One timed phase: run() issues its ops once, its all-reduces through a timed_tp comm;
// prepare() (optional) restores its inputs, untimed, before every iteration.
struct phase_spec {
    const char *name;   // JSON key, e.g. "column_fwd"
    const char *label;  // table row
    void (*run)(void *arg, struct bench_clock *c);
    void (*prepare)(void *arg);
};

struct phase_times {
    int warmup, iters;
    struct stats ms;    // the whole phase per iteration, slowest rank
    double comm_ms;     // median over iterations of its all-reduce time, slowest rank
    int n_comm;         // all-reduces issued per iteration (0 at one rank: they are no-ops)
};

// A TP comm that marks the clock around every all-reduce, so that the phases' own code (the
// model's blocks, the layers below) runs unchanged while communication is timed separately.
struct timing_comm {
    struct comm *inner;
    struct bench_clock *clock;
};

static const char *tcomm_name(void *ctx) {
    struct timing_comm *t = ctx;
    return t->inner->iface->name(t->inner->ctx);
}

static void tcomm_all_reduce(void *ctx, void *buf, size_t count, enum comm_dtype dt, enum comm_op op) {
    struct timing_comm *t = ctx;
    clock_mark(t->clock);
    t->inner->iface->all_reduce(t->inner->ctx, buf, count, dt, op);
    clock_mark(t->clock);
}

static void tcomm_all_gather(void *ctx, void *out, const void *in, size_t count, enum comm_dtype dt) {
    struct timing_comm *t = ctx;
    t->inner->iface->all_gather(t->inner->ctx, out, in, count, dt);
}

static void tcomm_reduce_scatter(void *ctx, void *out, const void *in, size_t count, enum comm_dtype dt,
                                 enum comm_op op) {
    struct timing_comm *t = ctx;
    t->inner->iface->reduce_scatter(t->inner->ctx, out, in, count, dt, op);
}

static void tcomm_broadcast(void *ctx, void *buf, size_t count, enum comm_dtype dt, int root) {
    struct timing_comm *t = ctx;
    t->inner->iface->broadcast(t->inner->ctx, buf, count, dt, root);
}

static void tcomm_synchronize(void *ctx) {
    struct timing_comm *t = ctx;
    t->inner->iface->synchronize(t->inner->ctx);
}

// Host collectives carry the benchmark's own bookkeeping, not the phase's traffic: untimed.
static void tcomm_host_all_reduce(void *ctx, void *buf, size_t count, enum comm_dtype dt, enum comm_op op) {
    struct timing_comm *t = ctx;
    comm_host_all_reduce(t->inner, buf, count, dt, op);
}

static void tcomm_host_all_gather(void *ctx, void *out, const void *in, size_t count, enum comm_dtype dt) {
    struct timing_comm *t = ctx;
    comm_host_all_gather(t->inner, out, in, count, dt);
}

static void tcomm_host_gather(void *ctx, void *out, const void *in, size_t count, enum comm_dtype dt, int root) {
    struct timing_comm *t = ctx;
    comm_host_gather(t->inner, out, in, count, dt, root);
}

static void tcomm_host_broadcast(void *ctx, void *buf, size_t count, enum comm_dtype dt, int root) {
    struct timing_comm *t = ctx;
    comm_host_broadcast(t->inner, buf, count, dt, root);
}

static void tcomm_barrier(void *ctx) {
    struct timing_comm *t = ctx;
    comm_barrier(t->inner);
}

static void tcomm_destroy(void *ctx) { (void)ctx; } // borrows the inner comm

static const struct comm_i timing_comm_iface = {
    .name = tcomm_name,
    .all_reduce = tcomm_all_reduce,
    .all_gather = tcomm_all_gather,
    .reduce_scatter = tcomm_reduce_scatter,
    .broadcast = tcomm_broadcast,
    .synchronize = tcomm_synchronize,
    .host_all_reduce = tcomm_host_all_reduce,
    .host_all_gather = tcomm_host_all_gather,
    .host_gather = tcomm_host_gather,
    .host_broadcast = tcomm_host_broadcast,
    .barrier = tcomm_barrier,
    .destroy = tcomm_destroy,
};

// The TP comm for one timed phase. At one rank comm_all_reduce issues nothing, so nothing is
// marked and no communication cost is reported.
static struct comm timed_tp(struct bench *b, struct timing_comm *t, struct bench_clock *c) {
    t->inner = &b->mesh.tp;
    t->clock = c;
    return (struct comm){.iface = &timing_comm_iface, .ctx = t, .rank = t->inner->rank, .size = t->inner->size};
}

// Starts every rank together on an idle device so no rank's lateness counts as communication.
static void align_ranks(struct bench *b) {
    b->be.iface->synchronize(b->be.ctx);
    comm_barrier(&b->mesh.tp);
}

static void run_iteration(struct bench *b, const struct phase_spec *ps, void *arg, double *total,
                          double *comm, int *n_comm) {
    struct bench_clock *c = &b->clock;
    if (ps->prepare) ps->prepare(arg);
    align_ranks(b);
    c->n = 0;
    clock_mark(c);
    ps->run(arg, c);
    int end = clock_mark(c);
    *total = clock_ms(c, 0, end);
    *comm = 0.0;
    for (int i = 1; i + 1 < end; i += 2) *comm += clock_ms(c, i, i + 1);
    *n_comm = (end - 1) / 2;
}

// Warm-up, then timed iterations: a fixed count, or (target_ms > 0) enough to run about
// target_ms, judged from the warm-up. Per iteration the slowest rank counts; every rank gets the
// same numbers, so the iteration count is agreed without another message.
static void time_phase(struct bench *b, const struct phase_spec *ps, void *arg, int warmup, int iters,
                       double target_ms, struct phase_times *out) {
    memset(out, 0, sizeof *out);
    int cap = warmup > iters ? warmup : iters;
    if (target_ms > 0 && cap < LAYER_MAX_ITERS) cap = LAYER_MAX_ITERS;
    double *total = tp_malloc((size_t)cap * sizeof(double)), *comm = tp_malloc((size_t)cap * sizeof(double));
    for (int i = 0; i < warmup; i++) run_iteration(b, ps, arg, &total[i], &comm[i], &out->n_comm);
    if (target_ms > 0 && warmup > 0) {
        comm_host_all_reduce(&b->mesh.tp, total, (size_t)warmup, COMM_F64, COMM_MAX);
        double t = stats_of(total, warmup).median;
        double want = t > 0 ? ceil(target_ms / t) : LAYER_MAX_ITERS;
        iters = want < LAYER_MIN_ITERS ? LAYER_MIN_ITERS : want > LAYER_MAX_ITERS ? LAYER_MAX_ITERS : (int)want;
    }
    for (int i = 0; i < iters; i++) run_iteration(b, ps, arg, &total[i], &comm[i], &out->n_comm);
    comm_host_all_reduce(&b->mesh.tp, total, (size_t)iters, COMM_F64, COMM_MAX);
    comm_host_all_reduce(&b->mesh.tp, comm, (size_t)iters, COMM_F64, COMM_MAX);
    out->warmup = warmup;
    out->iters = iters;
    out->ms = stats_of(total, iters);
    out->comm_ms = stats_of(comm, iters).median;
    free(total);
    free(comm);
}

// ---- output helpers

// Formats v with fmt, or "n/a" when v is not a number (NAN marks "not applicable").
static const char *fmt_or_na(char *buf, size_t len, const char *fmt, double v) {
    if (!isfinite(v)) snprintf(buf, len, "n/a");
    else snprintf(buf, len, fmt, v);
    return buf;
}

// A number for the JSON (null for n/a: NAN marks "not applicable", and JSON has no NaN); whole
// numbers (counts, FLOPs) as integers.
static json_t *jnum(double v) {
    if (!isfinite(v)) return json_null();
    if (v == floor(v) && fabs(v) < 1e15) return json_integer((json_int_t)v);
    return json_real(v);
}

// obj[key] = number (null for n/a).
static void json_kv(json_t *obj, const char *key, double v) { json_object_set_new(obj, key, jnum(v)); }

// Writes the document (steals it) compact, reals to 9 significant digits, one line; a failed
// write shows up in bench_finish's check of the stream.
static void json_emit(const struct bench *b, json_t *doc) {
    if (json_dumpf(doc, b->json, JSON_COMPACT | JSON_REAL_PRECISION(9)) == 0) fputc('\n', b->json);
    json_decref(doc);
}

static const char *timing_name(const struct bench *b) {
    return b->events ? "backend events" : "host wall clock";
}

static void print_setup(const struct bench *b, const char *mode) {
    const char *be = b->be.iface->name(b->be.ctx);
    char peak[32];
    printf("tptrain %s --bench %s\n", TP_VERSION, mode);
    printf("%s backend (timings are %s) | comm %s | tp %d (ranks), dp 1 | precision %s | peak %s TFLOP/s per GPU\n",
           be, b->events ? "device events" : "host wall clock", b->mesh.tp.iface->name(b->mesh.tp.ctx),
           b->mesh.tp_size, config_precision_name(b->cfg.train.precision),
           fmt_or_na(peak, sizeof peak, "%.0f", b->peak_tflops > 0 ? b->peak_tflops : NAN));
}

// The fields every mode's document opens with.
static json_t *json_setup(const struct bench *b, const char *mode) {
    json_t *o = json_pack("{s:s, s:s, s:s, s:s, s:s, s:i, s:s}", "mode", mode, "version", TP_VERSION, "backend",
                          b->be.iface->name(b->be.ctx), "timing", timing_name(b), "comm",
                          b->mesh.tp.iface->name(b->mesh.tp.ctx), "tp", b->mesh.tp_size, "precision",
                          config_precision_name(b->cfg.train.precision));
    json_kv(o, "peak_tflops", b->peak_tflops > 0 ? b->peak_tflops : NAN);
    return o;
}

// nccl-tests' bus bandwidth: what each link carries in a ring all-reduce, 2(P-1)/P of the data.
static double bus_factor(int P) { return 2.0 * (P - 1) / P; }

// ---- layer: column-parallel, row-parallel and the MLP block

struct layer_bench {
    struct bench *b;
    int M, K, Nl;                   // tokens, width, this rank's hidden width N/P
    // compute type (fp32 or bf16):
    void *x;                        // (M, K) input, replicated
    void *w1, *b1;                  // (Nl, K), (Nl) column-parallel weight and bias
    void *h, *hg;                   // (M, Nl), (M, Nl) column output (before GELU), after GELU
    void *w2, *b2;                  // (K, Nl), (K) row-parallel weight, bias (replicated)
    void *y, *out;                  // (M, K), (M, K) row partial sums (reduced in place), output
    void *dx, *dh, *dhg, *dy;       // (M, K), (M, Nl), (M, Nl), (M, K) activation gradients
    // fp32:
    float *dw1, *db1, *dw2, *db2;   // (Nl, K), (Nl), (K, Nl), (K) parameter gradients
};

static enum tp_dtype lb_dtype(const struct layer_bench *lb) {
    return lb->b->be.iface->dtype(lb->b->be.ctx);
}

// The layers are tp.h's, the ones training runs. Column forward: f is the identity, so no
// collective. With gelu, the GELU is fused into the product as the model runs it: h keeps the
// product, hg the activation.
static void column_fwd(struct layer_bench *lb, bool gelu, struct comm *tp) {
    column_parallel_linear_fwd(lb->b->be, tp, gelu ? lb->hg : lb->h, gelu ? lb->h : NULL, lb->x, lb->w1, lb->b1,
                               lb->M, lb->K, lb->Nl);
}

// Backward: each rank's dx covers its own shard; f's backward sums them (1 all-reduce).
static void column_bwd(struct layer_bench *lb, const void *dout, struct comm *tp) {
    column_parallel_linear_bwd(lb->b->be, tp, lb->dx, lb->dw1, lb->db1, dout, lb->x, lb->w1, lb->M, lb->K, lb->Nl);
}

// Forward of the row-parallel linear: partial products, g's all-reduce, then the bias (once) and
// the residual.
static void row_fwd(struct layer_bench *lb, const void *inp, struct comm *tp) {
    struct row_parallel_out o = {.out = lb->out, .res = lb->x};
    row_parallel_linear_fwd(lb->b->be, tp, lb->y, inp, lb->w2, lb->b2, lb->M, lb->Nl, lb->K, &o);
}

// Backward: the output gradient is replicated, g's backward is the identity: no collective.
// pre_gelu non-NULL folds the GELU's derivative into dinp, as the model does.
static void row_bwd(struct layer_bench *lb, void *dinp, const void *inp, const void *pre_gelu, struct comm *tp) {
    row_parallel_linear_bwd(lb->b->be, tp, dinp, lb->dw2, lb->db2, lb->dy, inp, lb->w2, pre_gelu, lb->M, lb->Nl,
                            lb->K);
}

static void run_column_fwd(void *arg, struct bench_clock *c) {
    struct layer_bench *lb = arg;
    struct timing_comm t;
    struct comm tp = timed_tp(lb->b, &t, c);
    column_fwd(lb, false, &tp);
}

static void run_column_bwd(void *arg, struct bench_clock *c) {
    struct layer_bench *lb = arg;
    struct timing_comm t;
    struct comm tp = timed_tp(lb->b, &t, c);
    column_bwd(lb, lb->dh, &tp);
}

static void run_row_fwd(void *arg, struct bench_clock *c) {
    struct layer_bench *lb = arg;
    struct timing_comm t;
    struct comm tp = timed_tp(lb->b, &t, c);
    row_fwd(lb, lb->h, &tp);
}

static void run_row_bwd(void *arg, struct bench_clock *c) {
    struct layer_bench *lb = arg;
    struct timing_comm t;
    struct comm tp = timed_tp(lb->b, &t, c);
    row_bwd(lb, lb->dh, lb->h, NULL, &tp);
}

static void run_mlp_fwd(void *arg, struct bench_clock *c) {
    struct layer_bench *lb = arg;
    struct timing_comm t;
    struct comm tp = timed_tp(lb->b, &t, c);
    column_fwd(lb, true, &tp);
    row_fwd(lb, lb->hg, &tp);
}

static void run_mlp_bwd(void *arg, struct bench_clock *c) {
    struct layer_bench *lb = arg;
    struct timing_comm t;
    struct comm tp = timed_tp(lb->b, &t, c);
    row_bwd(lb, lb->dhg, lb->hg, lb->h, &tp);
    column_bwd(lb, lb->dhg, &tp);
}

struct layer_result {
    const struct phase_spec *spec;
    struct phase_times t;
    double flops;           // matmul FLOPs per rank
    size_t bytes;           // per all-reduce
    // derived
    double tflops, peak_share, comm_ms_each, algbw, busbw, comm_share;
};

static void layer_derive(const struct bench *b, struct layer_result *r) {
    double s = r->t.ms.median * 1e-3;
    int P = b->mesh.tp_size;
    r->tflops = s > 0 ? r->flops / s / 1e12 : NAN;
    r->peak_share = b->peak_tflops > 0 ? r->tflops / b->peak_tflops : NAN;
    r->comm_share = r->t.ms.median > 0 ? r->t.comm_ms / r->t.ms.median : 0.0;
    if (r->t.n_comm > 0) {
        r->comm_ms_each = r->t.comm_ms / r->t.n_comm;
        r->algbw = r->comm_ms_each > 0 ? (double)r->bytes / (r->comm_ms_each * 1e-3) / 1e9 : NAN;
        r->busbw = r->algbw * bus_factor(P);
    } else { // no all-reduce ran: nothing was communicated, so there is no bandwidth to speak of
        r->comm_ms_each = 0.0;
        r->algbw = r->busbw = NAN;
    }
}

static void layer_print(const struct bench *b, int M, int K, int N, const struct layer_result *r, int n) {
    int P = b->mesh.tp_size;
    print_setup(b, "layer");
    printf("shapes: M=%d tokens, K=%d, N=%d (N/P=%d per rank) | column K->N/P, row N/P->K + all-reduce, "
           "mlp column+gelu (fused) -> row\n", M, K, N, N / P);
    printf("times: ms per iteration of the slowest rank; FLOPs: matmuls only, 2*M*K*N/P per forward "
           "matmul, twice that backward\n");
    if (b->iters_fixed) printf("iterations: %d warm-up + %d timed per phase (TPTRAIN_BENCH_ITERS)\n", b->warmup, b->iters);
    else printf("iterations: %d warm-up + enough timed ones for ~%.0f s per phase (%d..%d)\n", LAYER_WARMUP,
                LAYER_TARGET_MS / 1e3, LAYER_MIN_ITERS, LAYER_MAX_ITERS);
    printf("\n%-12s %6s %11s %11s %11s %11s %11s %10s %8s\n", "phase", "iters", "median ms", "min ms",
           "max ms", "p10 ms", "p90 ms", "TFLOP/s", "of peak");
    char a[32], c[32];
    for (int i = 0; i < n; i++)
        printf("%-12s %6d %11.4f %11.4f %11.4f %11.4f %11.4f %10s %8s\n", r[i].spec->label, r[i].t.iters,
               r[i].t.ms.median, r[i].t.ms.min, r[i].t.ms.max, r[i].t.ms.p10, r[i].t.ms.p90,
               fmt_or_na(a, sizeof a, "%.4f", r[i].tflops), fmt_or_na(c, sizeof c, "%.1f%%", 100 * r[i].peak_share));
    printf("\n%-12s %11s %12s %11s %11s %12s %12s %10s\n", "phase", "all-reduces", "bytes each", "comm ms",
           "ms each", "algbw GB/s", "busbw GB/s", "comm share");
    for (int i = 0; i < n; i++)
        printf("%-12s %11d %12zu %11.4f %11.4f %12s %12s %9.1f%%\n", r[i].spec->label, r[i].t.n_comm,
               r[i].t.n_comm ? r[i].bytes : 0, r[i].t.comm_ms, r[i].comm_ms_each,
               fmt_or_na(a, sizeof a, "%.3f", r[i].algbw), fmt_or_na(c, sizeof c, "%.3f", r[i].busbw),
               100 * r[i].comm_share);
    if (P == 1)
        printf("# one rank: the TP all-reduces are no-ops, so there is no communication cost (0 ms, bandwidth n/a)\n");
    else
        printf("# all-reduce: sum of %s over %d ranks; algbw = bytes / time, busbw = algbw * 2(P-1)/P "
               "(nccl-tests)\n", tp_dtype_name(b->be.iface->dtype(b->be.ctx)), P);
}

static void layer_json(const struct bench *b, int M, int K, int N, const struct layer_result *r, int n) {
    json_t *doc = json_setup(b, "layer"), *phases = json_array();
    json_object_set_new(doc, "M", json_integer(M));
    json_object_set_new(doc, "K", json_integer(K));
    json_object_set_new(doc, "N", json_integer(N));
    for (int i = 0; i < n; i++) {
        json_t *p = json_pack("{s:s, s:i, s:i}", "name", r[i].spec->name, "warmup", r[i].t.warmup, "iters",
                              r[i].t.iters);
        json_kv(p, "ms_median", r[i].t.ms.median);
        json_kv(p, "ms_min", r[i].t.ms.min);
        json_kv(p, "ms_max", r[i].t.ms.max);
        json_kv(p, "ms_p10", r[i].t.ms.p10);
        json_kv(p, "ms_p90", r[i].t.ms.p90);
        json_kv(p, "flops", r[i].flops);
        json_kv(p, "tflops", r[i].tflops);
        json_kv(p, "peak_share", r[i].peak_share);
        json_t *ar = json_pack("{s:i, s:I}", "count", r[i].t.n_comm, "bytes",
                               (json_int_t)(r[i].t.n_comm ? r[i].bytes : 0));
        json_kv(ar, "ms", r[i].t.comm_ms);
        json_kv(ar, "ms_each", r[i].comm_ms_each);
        json_kv(ar, "algbw_gbs", r[i].algbw);
        json_kv(ar, "busbw_gbs", r[i].busbw);
        json_object_set_new(p, "allreduce", ar);
        json_kv(p, "comm_share", r[i].comm_share);
        json_array_append_new(phases, p);
    }
    json_object_set_new(doc, "phases", phases);
    json_emit(b, doc);
}

static int bench_layer(struct bench *b, int M, int K, int N) {
    struct layer_bench lb = {.b = b, .M = M, .K = K, .Nl = N / b->mesh.tp_size};
    size_t MK = (size_t)M * K, MN = (size_t)M * lb.Nl, NK = (size_t)lb.Nl * K;
    void **bufs[] = {&lb.x, &lb.w1, &lb.b1, &lb.h, &lb.hg, &lb.w2, &lb.b2, &lb.y, &lb.out,
                     &lb.dx, &lb.dh, &lb.dhg, &lb.dy};
    size_t sizes[] = {MK, NK, (size_t)lb.Nl, MN, MN, NK, (size_t)K, MK, MK, MK, MN, MN, MK};
    float **gbufs[] = {&lb.dw1, &lb.db1, &lb.dw2, &lb.db2};
    size_t gsizes[] = {NK, (size_t)lb.Nl, NK, (size_t)K};
    int nbuf = (int)(sizeof sizes / sizeof sizes[0]), ngbuf = (int)(sizeof gsizes / sizeof gsizes[0]);
    for (int i = 0; i < nbuf; i++) *bufs[i] = alloc_compute(b, sizes[i]);
    for (int i = 0; i < ngbuf; i++) *gbufs[i] = alloc_floats(b, gsizes[i]);
    // The input and the output gradient are replicated (same seed everywhere); weights are shards.
    uint64_t seed = b->cfg.train.seed, rank = (uint64_t)b->mesh.tp_rank;
    fill_uniform(b->be, lb.x, MK, 1.0f, seed);
    fill_uniform(b->be, lb.dy, MK, 1.0f, seed + 1);
    fill_uniform(b->be, lb.w1, NK, 1.0f / sqrtf((float)K), seed + 100 + rank);
    fill_uniform(b->be, lb.b1, (size_t)lb.Nl, 0.1f, seed + 200 + rank);
    fill_uniform(b->be, lb.w2, NK, 1.0f / sqrtf((float)N), seed + 300 + rank);
    fill_uniform(b->be, lb.b2, (size_t)K, 0.1f, seed + 2);
    fill_uniform(b->be, lb.dh, MN, 1.0f, seed + 400 + rank);
    fill_uniform(b->be, lb.dhg, MN, 1.0f, seed + 500 + rank);
    column_fwd(&lb, true, &b->mesh.tp); // h and hg hold real activations before any backward runs

    static const struct phase_spec specs[] = {
        {"column_fwd", "column fwd", run_column_fwd, NULL},
        {"column_bwd", "column bwd", run_column_bwd, NULL},
        {"row_fwd", "row fwd", run_row_fwd, NULL},
        {"row_bwd", "row bwd", run_row_bwd, NULL},
        {"mlp_fwd", "mlp fwd", run_mlp_fwd, NULL},
        {"mlp_bwd", "mlp bwd", run_mlp_bwd, NULL},
    };
    enum { NPHASE = sizeof specs / sizeof specs[0] };
    struct bench_layer_flops fl = bench_layer_flops(M, K, N, b->mesh.tp_size);
    double flops[NPHASE] = {fl.column_fwd, fl.column_bwd, fl.row_fwd, fl.row_bwd, fl.mlp_fwd, fl.mlp_bwd};
    struct layer_result res[NPHASE];
    for (int i = 0; i < NPHASE; i++) {
        res[i] = (struct layer_result){.spec = &specs[i], .flops = flops[i],
                                       .bytes = MK * tp_dtype_size(lb_dtype(&lb))};
        if (b->iters_fixed) time_phase(b, &specs[i], &lb, b->warmup, b->iters, 0.0, &res[i].t);
        else time_phase(b, &specs[i], &lb, LAYER_WARMUP, LAYER_MIN_ITERS, LAYER_TARGET_MS, &res[i].t);
        layer_derive(b, &res[i]);
    }
    for (int i = 0; i < nbuf; i++) b->be.iface->free(b->be.ctx, *bufs[i]);
    for (int i = 0; i < ngbuf; i++) b->be.iface->free(b->be.ctx, *gbufs[i]);
    if (b->root) layer_print(b, M, K, N, res, NPHASE);
    if (b->json) layer_json(b, M, K, N, res, NPHASE);
    return 0;
}

// ---- allreduce: nccl-tests' all_reduce_perf table on the TP group

// Expands SIZES... and MIN:MAX:FACTOR into byte counts; rank 0 explains a bad one.
static int parse_sizes(const struct bench_opts *o, bool root, size_t *sizes, int *n) {
    *n = 0;
    for (int a = 1; a < o->argc; a++) {
        const char *s = o->argv[a];
        if (strchr(s, ':')) {
            char buf[128];
            snprintf(buf, sizeof buf, "%s", s);
            char *f1 = strchr(buf, ':'), *f2 = f1 ? strchr(f1 + 1, ':') : NULL;
            size_t lo, hi;
            int factor = 0;
            bool ok = f2 && !strchr(f2 + 1, ':');
            if (ok) {
                *f1 = *f2 = '\0';
                ok = bench_parse_size(buf, &lo) && bench_parse_size(f1 + 1, &hi) && parse_dim(f2 + 1, &factor) &&
                     factor >= 2 && lo <= hi;
            }
            if (!ok) {
                if (root)
                    fprintf(stderr, "tptrain: --bench allreduce: '%s': expected MIN:MAX:FACTOR with byte "
                                    "sizes MIN <= MAX (K/M/G suffixes) and an integer FACTOR >= 2, "
                                    "e.g. 8:1G:2\n", s);
                return TP_EXIT_USAGE;
            }
            for (size_t v = lo; v <= hi && *n < MAX_SIZES + 1; v *= (size_t)factor) {
                if (*n < MAX_SIZES) sizes[*n] = v;
                (*n)++;
                if (v > SIZE_MAX / (size_t)factor) break;
            }
        } else {
            size_t v;
            if (!bench_parse_size(s, &v)) {
                if (root)
                    fprintf(stderr, "tptrain: --bench allreduce: '%s' is not a size in bytes; give a "
                                    "positive integer with an optional K, M or G suffix (e.g. 4K, 64M)\n", s);
                return TP_EXIT_USAGE;
            }
            if (*n < MAX_SIZES) sizes[*n] = v;
            (*n)++;
        }
        if (*n > MAX_SIZES) {
            if (root) fprintf(stderr, "tptrain: --bench allreduce: more than %d sizes; use a larger FACTOR or "
                                      "fewer sizes\n", MAX_SIZES);
            return TP_EXIT_USAGE;
        }
    }
    if (*n == 0) {
        if (root)
            fprintf(stderr, "tptrain: --bench allreduce needs sizes: SIZES... or MIN:MAX:FACTOR "
                            "(e.g. --bench allreduce 1K 1M, or 8:128M:2)\n");
        return TP_EXIT_USAGE;
    }
    for (int i = 0; i < *n; i++) {
        if (sizes[i] < sizeof(float)) {
            if (root)
                fprintf(stderr, "tptrain: --bench allreduce: %zu bytes is less than one fp32 element "
                                "(4 bytes)\n", sizes[i]);
            return TP_EXIT_USAGE;
        }
        sizes[i] -= sizes[i] % sizeof(float); // whole elements, as all_reduce_perf rounds
    }
    return 0;
}

struct allreduce_row {
    size_t bytes, count;
    double time_us, algbw, busbw;  // NAN bandwidth: one rank, nothing moves
    long long wrong;               // -1 = not checked (one rank)
};

// After timing, every rank contributes a known pattern and the sum is checked exactly: element i
// of rank r holds (i mod 61) + r + 1, small integers whose sum over ranks fp32 holds exactly.
static long long allreduce_check(struct bench *b, float *buf /* (count) */, size_t count) {
    enum { CHUNK = 1 << 20 };
    int P = b->mesh.tp_size, r = b->mesh.tp_rank;
    float *h = tp_malloc((count < CHUNK ? count : CHUNK) * sizeof(float));
    for (size_t off = 0; off < count; off += CHUNK) {
        size_t k = count - off < CHUNK ? count - off : CHUNK;
        for (size_t i = 0; i < k; i++) h[i] = (float)((off + i) % 61 + (size_t)r + 1);
        b->be.iface->copy_to_device(b->be.ctx, buf + off, h, k * sizeof(float));
    }
    comm_all_reduce(&b->mesh.tp, buf, count, COMM_SUM);
    long long wrong = 0;
    for (size_t off = 0; off < count; off += CHUNK) {
        size_t k = count - off < CHUNK ? count - off : CHUNK;
        b->be.iface->copy_to_host(b->be.ctx, h, buf + off, k * sizeof(float));
        for (size_t i = 0; i < k; i++) {
            float want = (float)((double)P * (double)((off + i) % 61) + (double)P * (P + 1) / 2);
            wrong += h[i] != want;
        }
    }
    free(h);
    int64_t all_wrong = wrong;
    comm_host_all_reduce(&b->mesh.tp, &all_wrong, 1, COMM_I64, COMM_SUM);
    wrong = (long long)all_wrong;
    return wrong;
}

// Like all_reduce_perf: warm-up, then `iters` back-to-back in-place all-reduces timed as one span;
// the time is the mean per operation, averaged over ranks.
static void allreduce_time(struct bench *b, float *buf, size_t count, int warmup, int iters,
                           struct allreduce_row *row) {
    int P = b->mesh.tp_size;
    row->count = count;
    row->bytes = count * sizeof(float);
    if (P == 1) { // an all-reduce over one rank moves nothing: report no cost rather than a no-op's time
        row->time_us = 0.0;
        row->algbw = row->busbw = NAN;
        row->wrong = -1;
        return;
    }
    struct bench_clock *c = &b->clock;
    b->be.iface->zero(b->be.ctx, buf, row->bytes); // sums of zeros stay finite however many iterations
    for (int i = 0; i < warmup; i++) comm_all_reduce(&b->mesh.tp, buf, count, COMM_SUM);
    align_ranks(b);
    c->n = 0;
    int start = clock_mark(c);
    for (int i = 0; i < iters; i++) comm_all_reduce(&b->mesh.tp, buf, count, COMM_SUM);
    int end = clock_mark(c);
    double us = 1e3 * clock_ms(c, start, end) / iters;
    comm_host_all_reduce(&b->mesh.tp, &us, 1, COMM_F64, COMM_SUM);
    row->time_us = us / P;
    row->algbw = row->time_us > 0 ? (double)row->bytes / (row->time_us * 1e-6) / 1e9 : NAN;
    row->busbw = row->algbw * bus_factor(P);
    row->wrong = allreduce_check(b, buf, count);
}

static void allreduce_print(const struct bench *b, const struct allreduce_row *rows, int n, int warmup,
                            int iters, double avg_busbw) {
    int P = b->mesh.tp_size;
    print_setup(b, "allreduce");
    printf("# all-reduce on the TP group: %d ranks | warm-up iters: %d iters: %d | in place | "
           "time: mean per operation, averaged over ranks\n", P, warmup, iters);
    printf("#\n#%12s %14s %8s %7s %10s %9s %9s %8s\n", "size", "count", "type", "redop", "time", "algbw",
           "busbw", "#wrong");
    printf("#%12s %14s %8s %7s %10s %9s %9s %8s\n", "(B)", "(elements)", "", "", "(us)", "(GB/s)", "(GB/s)", "");
    long long wrong = 0;
    for (int i = 0; i < n; i++) {
        char t[32], a[32], u[32], w[32];
        if (rows[i].wrong >= 0) {
            snprintf(w, sizeof w, "%lld", rows[i].wrong);
            wrong += rows[i].wrong;
        } else {
            snprintf(w, sizeof w, "n/a");
        }
        printf(" %12zu %14zu %8s %7s %10s %9s %9s %8s\n", rows[i].bytes, rows[i].count, "float", "sum",
               fmt_or_na(t, sizeof t, "%.2f", rows[i].time_us), fmt_or_na(a, sizeof a, "%.2f", rows[i].algbw),
               fmt_or_na(u, sizeof u, "%.2f", rows[i].busbw), w);
    }
    char avg[32];
    if (P == 1) {
        printf("# one rank: an all-reduce over one rank communicates nothing; no communication cost "
               "(time 0, bandwidth n/a)\n");
    } else {
        printf("# Out of bounds values : %lld %s\n", wrong, wrong ? "FAILED" : "OK");
    }
    printf("# Avg bus bandwidth    : %s\n", fmt_or_na(avg, sizeof avg, "%.3f", avg_busbw));
}

static void allreduce_json(const struct bench *b, const struct allreduce_row *rows, int n, int warmup,
                           int iters, double avg_busbw) {
    json_t *doc = json_setup(b, "allreduce"), *arr = json_array();
    json_object_set_new(doc, "ranks", json_integer(b->mesh.tp_size));
    json_object_set_new(doc, "warmup", json_integer(warmup));
    json_object_set_new(doc, "iters", json_integer(iters));
    for (int i = 0; i < n; i++) {
        json_t *row = json_pack("{s:I, s:I, s:s, s:s}", "size", (json_int_t)rows[i].bytes, "count",
                                (json_int_t)rows[i].count, "type", "float", "redop", "sum");
        json_kv(row, "time_us", rows[i].time_us);
        json_kv(row, "algbw_gbs", rows[i].algbw);
        json_kv(row, "busbw_gbs", rows[i].busbw);
        json_kv(row, "wrong", rows[i].wrong >= 0 ? (double)rows[i].wrong : NAN);
        json_array_append_new(arr, row);
    }
    json_object_set_new(doc, "rows", arr);
    json_kv(doc, "avg_busbw_gbs", avg_busbw);
    json_emit(b, doc);
}

static int bench_allreduce(struct bench *b, const size_t *sizes, int n) {
    int warmup = b->iters_fixed ? b->warmup : ALLREDUCE_WARMUP;
    int iters = b->iters_fixed ? b->iters : ALLREDUCE_ITERS;
    size_t max_count = 0;
    for (int i = 0; i < n; i++)
        if (sizes[i] / sizeof(float) > max_count) max_count = sizes[i] / sizeof(float);
    float *buf = b->mesh.tp_size > 1 ? alloc_floats(b, max_count) : NULL; // (max_count)
    struct allreduce_row rows[MAX_SIZES];
    double busbw_sum = 0.0;
    for (int i = 0; i < n; i++) {
        allreduce_time(b, buf, sizes[i] / sizeof(float), warmup, iters, &rows[i]);
        busbw_sum += rows[i].busbw;
    }
    if (buf) b->be.iface->free(b->be.ctx, buf);
    double avg_busbw = b->mesh.tp_size > 1 ? busbw_sum / n : NAN;
    int wrong = 0;
    for (int i = 0; i < n; i++) wrong |= rows[i].wrong > 0;
    if (b->root) allreduce_print(b, rows, n, warmup, iters, avg_busbw);
    if (b->json) allreduce_json(b, rows, n, warmup, iters, avg_busbw);
    if (wrong && b->root) fprintf(stderr, "tptrain: --bench allreduce: the all-reduce returned wrong sums; the comm is broken\n");
    return wrong ? TP_EXIT_RUNTIME : 0;
}

// ---- model: one training step, whole and by phase

struct model_bench {
    struct bench *b;
    struct model m;
    struct optim opt;
    float *loss_sum;    // (1) backend memory
    void *dres_seed;    // (N, C) compute type: the residual-stream gradient each backward phase starts from
    int *inputs;        // (N) host token ids, the same on every TP rank
    int *targets;       // (N)
};

static const struct backend_i *mb_ops(const struct model_bench *mb) { return mb->b->be.iface; }

// The step as training runs it: model_forward, model_backward per micro-step, then the grad norm
// and AdamW (the DP all-reduce is absent: dp = 1).
static void run_step(void *arg, struct bench_clock *c) {
    struct model_bench *mb = arg;
    struct model *m = &mb->m;
    const struct tp_train_config *tc = &mb->b->cfg.train;
    struct comm *tp = &mb->b->mesh.tp;
    (void)c;
    mb_ops(mb)->zero(m->be.ctx, m->grads, m->n_params_local * sizeof(float));
    float dloss = 1.0f / ((float)m->d.N * (float)tc->grad_accum);
    for (int micro = 0; micro < tc->grad_accum; micro++) {
        model_forward(m, tp, mb->inputs, mb->targets, mb->loss_sum);
        model_backward(m, tp, dloss);
    }
    optim_grad_norm_enqueue(&mb->opt, m, tp);
    optim_step(&mb->opt, m, tc, (float)tc->lr);
}

// ---- phases: the model's own blocks (model.c), with the timing TP comm

static void run_embedding_fwd(void *arg, struct bench_clock *c) {
    struct model_bench *mb = arg;
    struct timing_comm t;
    struct comm tp = timed_tp(mb->b, &t, c);
    model_embedding_fwd(&mb->m, &tp);
}

static void run_attention_fwd(void *arg, struct bench_clock *c) {
    struct model_bench *mb = arg;
    struct timing_comm t;
    struct comm tp = timed_tp(mb->b, &t, c);
    for (int l = 0; l < mb->m.d.L; l++) model_attention_block_fwd(&mb->m, &tp, l);
}

static void run_mlp_fwd_model(void *arg, struct bench_clock *c) {
    struct model_bench *mb = arg;
    struct timing_comm t;
    struct comm tp = timed_tp(mb->b, &t, c);
    for (int l = 0; l < mb->m.d.L; l++) model_mlp_block_fwd(&mb->m, &tp, l);
}

static void run_head_fwd(void *arg, struct bench_clock *c) {
    struct model_bench *mb = arg;
    struct timing_comm t;
    struct comm tp = timed_tp(mb->b, &t, c);
    model_head_fwd(&mb->m, &tp, mb->loss_sum);
}

// The head's backward turns the logits into their gradient in place: recompute them first.
static void prepare_head_bwd(void *arg) { run_head_fwd(arg, NULL); }

static void run_head_bwd(void *arg, struct bench_clock *c) {
    struct model_bench *mb = arg;
    float dloss = 1.0f / ((float)mb->m.d.N * (float)mb->b->cfg.train.grad_accum);
    struct timing_comm t;
    struct comm tp = timed_tp(mb->b, &t, c);
    model_head_bwd(&mb->m, &tp, dloss);
}

// Layernorm backward accumulates into the residual gradient: start every iteration from the
// same one, so repeated runs neither grow it nor depend on the previous phase.
static void prepare_residual_grad(void *arg) {
    struct model_bench *mb = arg;
    mb_ops(mb)->copy(mb->m.be.ctx, mb->m.a.dres, mb->dres_seed,
                     mb->m.d.N * (size_t)mb->m.d.C * tp_dtype_size(mb->m.dtype));
}

static void run_mlp_bwd_model(void *arg, struct bench_clock *c) {
    struct model_bench *mb = arg;
    struct timing_comm t;
    struct comm tp = timed_tp(mb->b, &t, c);
    for (int l = mb->m.d.L - 1; l >= 0; l--) model_mlp_block_bwd(&mb->m, &tp, l);
}

static void run_attention_bwd(void *arg, struct bench_clock *c) {
    struct model_bench *mb = arg;
    struct timing_comm t;
    struct comm tp = timed_tp(mb->b, &t, c);
    for (int l = mb->m.d.L - 1; l >= 0; l--) model_attention_block_bwd(&mb->m, &tp, l);
}

static void run_embedding_bwd(void *arg, struct bench_clock *c) {
    struct model_bench *mb = arg;
    struct timing_comm t;
    struct comm tp = timed_tp(mb->b, &t, c); // the forward all-reduce summed disjoint rows: none here
    model_embedding_bwd(&mb->m, &tp);
}

// Gradient norm (with its own small all-reduce, not split out) and AdamW.
static void run_optimizer(void *arg, struct bench_clock *c) {
    struct model_bench *mb = arg;
    const struct tp_train_config *tc = &mb->b->cfg.train;
    (void)c;
    optim_grad_norm_enqueue(&mb->opt, &mb->m, &mb->b->mesh.tp);
    optim_step(&mb->opt, &mb->m, tc, (float)tc->lr);
}

enum phase_kind { PH_FWD, PH_BWD, PH_OPT };

struct model_phase {
    struct phase_spec spec;
    enum phase_kind kind;
    bool per_layer;         // repeated over the L blocks (label says so)
};

static const struct model_phase model_phases[] = {
    {{"embedding_fwd", "embedding fwd", run_embedding_fwd, NULL}, PH_FWD, false},
    {{"attention_fwd", "attention fwd", run_attention_fwd, NULL}, PH_FWD, true},
    {{"mlp_fwd", "mlp fwd", run_mlp_fwd_model, NULL}, PH_FWD, true},
    {{"head_loss_fwd", "lm head + loss fwd", run_head_fwd, NULL}, PH_FWD, false},
    {{"head_loss_bwd", "lm head + loss bwd", run_head_bwd, prepare_head_bwd}, PH_BWD, false},
    {{"mlp_bwd", "mlp bwd", run_mlp_bwd_model, prepare_residual_grad}, PH_BWD, true},
    {{"attention_bwd", "attention bwd", run_attention_bwd, prepare_residual_grad}, PH_BWD, true},
    {{"embedding_bwd", "embedding bwd", run_embedding_bwd, prepare_residual_grad}, PH_BWD, false},
    {{"optimizer", "optimizer (norm+adamw)", run_optimizer, NULL}, PH_OPT, false},
};
enum { N_MODEL_PHASES = sizeof model_phases / sizeof model_phases[0] };

struct model_report {
    const char *config;
    struct phase_times step;
    double tokens, tok_s, tflops, mfu;
    struct phase_times ph[N_MODEL_PHASES];
    double ph_ms[N_MODEL_PHASES], ph_comm[N_MODEL_PHASES]; // per step: fwd/bwd x grad_accum
    double sum_ms, fwd_ms, bwd_ms, opt_ms, comm_ms;
};

static void model_print(const struct bench *b, const struct model_bench *mb, const struct model_report *r) {
    const struct tp_config *cfg = &b->cfg;
    const struct model_dims *d = &mb->m.d;
    char mfu[32], tf[32];
    print_setup(b, "model");
    printf("config %s: %d layers, %d heads, width %d, vocab %d, seq %d | batch %d x %d tokens x grad_accum %d "
           "= %.0f tokens per step (synthetic tokens)\n", r->config, d->L, d->NH, d->C, d->V, d->T, d->B, d->T,
           cfg->train.grad_accum, r->tokens);
    printf("\nwhole step (model_forward + model_backward + grad norm + AdamW, as training runs it), %d warm-up + %d "
           "timed:\n", r->step.warmup, r->step.iters);
    printf("  median %.3f ms (min %.3f, max %.3f, p10 %.3f, p90 %.3f) | %.0f tok/s | %s TFLOP/s per GPU | MFU %s\n",
           r->step.ms.median, r->step.ms.min, r->step.ms.max, r->step.ms.p10, r->step.ms.p90, r->tok_s,
           fmt_or_na(tf, sizeof tf, "%.3f", r->tflops), fmt_or_na(mfu, sizeof mfu, "%.1f%%", 100 * r->mfu));
    printf("\nphases, each timed alone (%d warm-up + %d timed) by calling the model's own block functions "
           "(model.c);\nforward and backward rows are per step (x grad_accum %d), all-reduces timed separately:\n",
           r->ph[0].warmup, r->ph[0].iters, cfg->train.grad_accum);
    printf("%-28s %12s %8s %16s\n", "phase", "ms per step", "share", "all-reduce ms");
    for (int i = 0; i < N_MODEL_PHASES; i++) {
        char label[64];
        if (model_phases[i].per_layer) snprintf(label, sizeof label, "%s (x%d)", model_phases[i].spec.label, d->L);
        else snprintf(label, sizeof label, "%s", model_phases[i].spec.label);
        char cm[32];
        printf("%-28s %12.3f %7.1f%% %16s\n", label, r->ph_ms[i], 100 * r->ph_ms[i] / r->sum_ms,
               model_phases[i].kind == PH_OPT ? "(in phase)" : fmt_or_na(cm, sizeof cm, "%.3f", r->ph_comm[i]));
    }
    printf("%-28s %12.3f %7.1f%%\n", "sum of phases", r->sum_ms, 100.0);
    printf("  %-26s %12.3f %7.1f%%\n", "forward", r->fwd_ms, 100 * r->fwd_ms / r->sum_ms);
    printf("  %-26s %12.3f %7.1f%%\n", "backward", r->bwd_ms, 100 * r->bwd_ms / r->sum_ms);
    printf("  %-26s %12.3f %7.1f%%\n", "communication (all-reduce)", r->comm_ms, 100 * r->comm_ms / r->sum_ms);
    printf("  %-26s %12.3f %7.1f%%\n", "optimizer", r->opt_ms, 100 * r->opt_ms / r->sum_ms);
    printf("%-28s %12.3f   (differs from the sum by launch gaps, grad zeroing and token upload)\n",
           "whole step (measured)", r->step.ms.median);
    if (b->mesh.tp_size == 1) printf("# one rank: the TP all-reduces are no-ops, so communication costs 0 ms\n");
}

static void model_json(const struct bench *b, const struct model_bench *mb, const struct model_report *r) {
    const struct model_dims *d = &mb->m.d;
    json_t *doc = json_setup(b, "model");
    json_object_set_new(doc, "config", json_string(r->config));
    json_t *shape = json_pack("{s:i, s:i, s:i, s:i, s:i, s:i, s:i}", "n_layer", d->L, "n_head", d->NH, "n_embd",
                              d->C, "vocab_size", d->V, "seq_len", d->T, "micro_batch", d->B, "grad_accum",
                              b->cfg.train.grad_accum);
    json_object_update(doc, shape);
    json_decref(shape);
    json_t *step = json_pack("{s:i, s:i}", "warmup", r->step.warmup, "iters", r->step.iters);
    json_kv(step, "ms_median", r->step.ms.median);
    json_kv(step, "ms_min", r->step.ms.min);
    json_kv(step, "ms_max", r->step.ms.max);
    json_kv(step, "ms_p10", r->step.ms.p10);
    json_kv(step, "ms_p90", r->step.ms.p90);
    json_kv(step, "tokens", r->tokens);
    json_kv(step, "tok_per_s", r->tok_s);
    json_kv(step, "tflops_per_gpu", r->tflops);
    json_kv(step, "mfu", r->mfu);
    json_object_set_new(doc, "step", step);
    json_t *phases = json_array();
    for (int i = 0; i < N_MODEL_PHASES; i++) {
        static const char *kinds[] = {"forward", "backward", "optimizer"};
        json_t *p = json_pack("{s:s, s:s, s:i, s:i}", "name", model_phases[i].spec.name, "kind",
                              kinds[model_phases[i].kind], "warmup", r->ph[i].warmup, "iters", r->ph[i].iters);
        json_kv(p, "ms_per_step", r->ph_ms[i]);
        json_kv(p, "ms_median", r->ph[i].ms.median);
        json_kv(p, "ms_min", r->ph[i].ms.min);
        json_kv(p, "ms_max", r->ph[i].ms.max);
        json_kv(p, "allreduce_ms_per_step", model_phases[i].kind == PH_OPT ? NAN : r->ph_comm[i]);
        json_object_set_new(p, "allreduces", json_integer(r->ph[i].n_comm));
        json_kv(p, "share", r->ph_ms[i] / r->sum_ms);
        json_array_append_new(phases, p);
    }
    json_object_set_new(doc, "phases", phases);
    json_kv(doc, "sum_ms", r->sum_ms);
    json_kv(doc, "forward_ms", r->fwd_ms);
    json_kv(doc, "backward_ms", r->bwd_ms);
    json_kv(doc, "communication_ms", r->comm_ms);
    json_kv(doc, "optimizer_ms", r->opt_ms);
    json_emit(b, doc);
}

static int bench_model(struct bench *b, const char *config_path) {
    const struct tp_config *cfg = &b->cfg;
    struct model_bench *mb = tp_calloc(1, sizeof *mb);
    mb->b = b;
    struct model_dims d = model_dims_make(&cfg->model, cfg->train.micro_batch, b->mesh.tp_size, b->mesh.tp_rank);
    model_create(&mb->m, &d, b->be, cfg->train.seed);
    optim_create(&mb->opt, &mb->m, cfg->train.weight_decay);
    mb->loss_sum = alloc_floats(b, 1);
    mb->dres_seed = alloc_compute(b, d.N * (size_t)d.C);
    fill_uniform(b->be, mb->dres_seed, d.N * (size_t)d.C, 1.0f / (float)d.N, cfg->train.seed + 7);
    mb->inputs = tp_malloc(2 * d.N * sizeof(int));
    mb->targets = mb->inputs + d.N;
    uint64_t x = cfg->train.seed * 0x9E3779B97F4A7C15ull + 3;
    for (size_t i = 0; i < 2 * d.N; i++) { // a stream every rank reproduces: TP ranks share tokens
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        mb->inputs[i] = (int)(x % (uint64_t)d.V);
    }

    struct model_report r = {.config = config_path};
    int warmup = b->iters_fixed ? b->warmup : MODEL_WARMUP;
    int iters = b->iters_fixed ? b->iters : cfg->train.steps;
    static const struct phase_spec step_spec = {"step", "whole step", run_step, NULL};
    time_phase(b, &step_spec, mb, warmup, iters, 0.0, &r.step);
    // The step leaves valid activations for the last micro-batch: the phases below reuse them.
    int accum = cfg->train.grad_accum;
    for (int i = 0; i < N_MODEL_PHASES; i++) {
        const struct model_phase *mp = &model_phases[i];
        time_phase(b, &mp->spec, mb, warmup, iters, 0.0, &r.ph[i]);
        double times = mp->kind == PH_OPT ? 1.0 : (double)accum;
        r.ph_ms[i] = r.ph[i].ms.median * times;
        r.ph_comm[i] = r.ph[i].comm_ms * times;
        r.sum_ms += r.ph_ms[i];
        r.comm_ms += mp->kind == PH_OPT ? 0.0 : r.ph_comm[i];
        if (mp->kind == PH_FWD) r.fwd_ms += r.ph_ms[i];
        else if (mp->kind == PH_BWD) r.bwd_ms += r.ph_ms[i];
        else r.opt_ms += r.ph_ms[i];
    }
    r.tokens = (double)d.N * accum;
    r.tok_s = r.step.ms.median > 0 ? r.tokens / (r.step.ms.median * 1e-3) : NAN;
    r.tflops = r.tok_s * train_flops_per_token(cfg) / b->mesh.tp_size / 1e12;
    r.mfu = b->peak_tflops > 0 ? r.tflops / b->peak_tflops : NAN;
    if (b->root) model_print(b, mb, &r);
    if (b->json) model_json(b, mb, &r);

    free(mb->inputs);
    b->be.iface->free(b->be.ctx, mb->dres_seed);
    b->be.iface->free(b->be.ctx, mb->loss_sum);
    optim_destroy(&mb->opt, &mb->m);
    model_destroy(&mb->m);
    free(mb);
    return 0;
}

// ---- entry point

static const char modes_text[] = "layer M K N | allreduce SIZES... | allreduce MIN:MAX:FACTOR | model CONFIG.yaml | "
                                 "attention [BxHxHSxT | CONFIG.yaml]...";

// Checks `layer M K N` against the TP size; every rank reaches the same verdict.
static int parse_layer(const struct bench_opts *o, bool root, int P, int dims[3]) {
    static const char *names[3] = {"M", "K", "N"};
    if (o->argc != 4) {
        if (root) fprintf(stderr, "tptrain: --bench layer takes three sizes: M (tokens) K (width) N (hidden width), "
                                  "e.g. --bench layer 8192 4096 16384\n");
        return TP_EXIT_USAGE;
    }
    for (int i = 0; i < 3; i++) {
        if (!parse_dim(o->argv[1 + i], &dims[i])) {
            if (root) fprintf(stderr, "tptrain: --bench layer: %s='%s' is not a positive integer (1..%d)\n", names[i],
                              o->argv[1 + i], INT_MAX);
            return TP_EXIT_USAGE;
        }
    }
    if (dims[2] % P) {
        if (root) fprintf(stderr, "tptrain: --bench layer: N=%d is not divisible by the %d ranks (the TP size); "
                                  "each rank holds N/P columns, so pick N a multiple of %d\n", dims[2], P, P);
        return TP_EXIT_USAGE;
    }
    return 0;
}

int bench_run(const struct bench_opts *o) {
    int rank, world;
    mesh_world(&rank, &world);
    bool root = rank == 0;
    if (o->argc < 1) {
        if (root) fprintf(stderr, "tptrain: --bench needs a mode: %s; see tptrain --help\n", modes_text);
        return TP_EXIT_USAGE;
    }
    const char *mode = o->argv[0];
    if (strcmp(mode, "attention") == 0) return bench_attention(o, rank, world);
    struct bench *b = tp_calloc(1, sizeof *b);
    b->root = root;
    int st = iters_from_env(b);
    int dims[3] = {0};
    size_t sizes[MAX_SIZES];
    int n_sizes = 0;
    const char *model_path = NULL;
    if (!st) {
        if (strcmp(mode, "layer") == 0) {
            st = parse_layer(o, root, world, dims);
        } else if (strcmp(mode, "allreduce") == 0) {
            st = parse_sizes(o, root, sizes, &n_sizes);
        } else if (strcmp(mode, "model") == 0) {
            if (o->argc != 2) {
                if (root) fprintf(stderr, "tptrain: --bench model takes one config file, e.g. --bench model configs/bench.yaml\n");
                st = TP_EXIT_USAGE;
            }
            model_path = st ? NULL : o->argv[1];
        } else {
            if (root) fprintf(stderr, "tptrain: --bench: unknown mode '%s'; give one of: %s\n", mode, modes_text);
            st = TP_EXIT_USAGE;
        }
    }
    if (!st) st = bench_config(b, o, model_path);
    if (!st) st = bench_start(b, o->json_path);
    if (!st) {
        if (model_path) st = bench_model(b, model_path);
        else if (n_sizes) st = bench_allreduce(b, sizes, n_sizes);
        else st = bench_layer(b, dims[0], dims[1], dims[2]);
    }
    if (b->root) fflush(stdout);
    int fin = bench_finish(b, o->json_path);
    if (!st) st = fin;
    free(b);
    return st;
}
