// bench.c: --bench: what tensor parallelism costs on this machine, timed as training runs it.
//
// The common driver; each mode lives in its own file (bench_layer.c, bench_allreduce.c,
// bench_model.c, bench_attention.c) and is one line of the mode table below.
// Launched like training, one process per GPU, and the ranks form one TP group (dp = 1).
// Times come from backend events (stream time) where the backend has them, else from the host
// clock after a synchronize. Ranks start every iteration together (a barrier) and an iteration
// lasts as long as its slowest rank. Each collective (all-reduce, all-gather, reduce-scatter,
// broadcast) is bracketed by its own pair of marks, which splits communication from compute.
// Rank 0 prints; --json writes the same numbers.
//
// Sections: mode table, argument helpers, clock, statistics, setup, phase driver, ceilings,
// output helpers, entry point.
#include "bench_impl.h"

#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

// ---- mode table: adding a mode is its file and one line here

static const struct bench_mode *const modes[] = {
    &bench_mode_layer,
    &bench_mode_allreduce,
    &bench_mode_model,
    &bench_mode_attention,
    &bench_mode_gemm,
};
enum { N_MODES = sizeof modes / sizeof modes[0] };

// "layer M K N | allreduce SIZES... | ..." for the usage messages.
static const char *modes_text(void) {
    static char text[512];
    if (!text[0])
        for (int i = 0; i < N_MODES; i++)
            snprintf(text + strlen(text), sizeof text - strlen(text), "%s%s", i ? " | " : "", modes[i]->synopsis);
    return text;
}

// ---- argument helpers

bool bench_parse_dim(const char *s, int *out) {
    if (!s || !isdigit((unsigned char)s[0])) return false;
    errno = 0;
    char *end;
    long v = strtol(s, &end, 10);
    if (errno || *end || v <= 0 || v > INT_MAX) return false;
    *out = (int)v;
    return true;
}

bool bench_parse_dims(const char *s, int n, int *out) {
    for (int i = 0; i < n; i++) {
        const char *x = i + 1 < n ? strchr(s, 'x') : s + strlen(s);
        char part[24];
        if (!x || x - s >= (long)sizeof part) return false;
        memcpy(part, s, (size_t)(x - s));
        part[x - s] = '\0';
        if (!bench_parse_dim(part, &out[i])) return false;
        s = x + 1;
    }
    return true;
}


int bench_parse_config_arg(const struct bench_opts *o, bool root, const char *mode, void **args) {
    if (o->argc != 2) {
        if (root)
            fprintf(stderr, "tptrain: --bench %s takes one config file, e.g. --bench %s configs/gpt2-124m.yaml\n",
                    mode, mode);
        return TP_EXIT_USAGE;
    }
    size_t n = strlen(o->argv[1]) + 1;
    *args = memcpy(tp_malloc(n), o->argv[1], n);
    return 0;
}

const char *bench_config_arg(const void *args) { return args; }

// ---- clock


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
int bench_clock_mark(struct bench_clock *c) {
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

double bench_clock_ms(const struct bench_clock *c, int from, int to) {
    if (c->events) return (double)c->be.iface->event_elapsed_ms(c->be.ctx, c->ev[from], c->ev[to]);
    return 1e3 * (c->host[to] - c->host[from]);
}

// ---- statistics


static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

struct bench_stats bench_stats_of(const double *x, int n) {
    double *s = tp_malloc((size_t)n * sizeof *s);
    memcpy(s, x, (size_t)n * sizeof *s);
    qsort(s, (size_t)n, sizeof *s, cmp_double);
    struct bench_stats st = {
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
void bench_fill_uniform(struct backend be, void *dst, size_t n, float scale, uint64_t seed) {
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

float *bench_alloc_floats(struct bench *b, size_t n) {
    return b->be.iface->alloc(b->be.ctx, (n ? n : 1) * sizeof(float));
}

// n elements of the backend's compute type.
void *bench_alloc_compute(struct bench *b, size_t n) {
    return b->be.iface->alloc(b->be.ctx, (n ? n : 1) * tp_dtype_size(b->be.iface->dtype(b->be.ctx)));
}

// ---- phase driver




static const char *tcomm_name(void *ctx) {
    struct bench_timing_comm *t = ctx;
    return t->inner->iface->name(t->inner->ctx);
}

const char *const bench_coll_names[4] = {"all_reduce", "all_gather", "reduce_scatter", "broadcast"};

// Brackets one collective with a pair of marks and counts it: bytes as nccl-tests sizes them
// (the buffer for all-reduce and broadcast, the gathered or scattered whole for the others) and
// its bus traffic (all-reduce 2(P-1)/P of that, all-gather and reduce-scatter (P-1)/P, broadcast 1).
static void tcomm_begin(struct bench_timing_comm *t) { bench_clock_mark(t->clock); }

static void tcomm_end(struct bench_timing_comm *t, enum bench_coll kind, size_t bytes) {
    bench_clock_mark(t->clock);
    struct bench_clock *c = t->clock;
    if (!c) return;
    double P = t->inner->size, factor = kind == BENCH_ALL_REDUCE ? 2.0 * (P - 1) / P
                                      : kind == BENCH_BROADCAST  ? 1.0
                                                                 : (P - 1) / P;
    c->coll_count[kind]++;
    c->coll_bytes[kind] += (double)bytes;
    c->bus_bytes += (double)bytes * factor;
}

static void tcomm_all_reduce(void *ctx, void *buf, size_t count, enum comm_dtype dt, enum comm_op op) {
    struct bench_timing_comm *t = ctx;
    tcomm_begin(t);
    t->inner->iface->all_reduce(t->inner->ctx, buf, count, dt, op);
    tcomm_end(t, BENCH_ALL_REDUCE, count * comm_dtype_size(dt));
}

static void tcomm_all_gather(void *ctx, void *out, const void *in, size_t count, enum comm_dtype dt) {
    struct bench_timing_comm *t = ctx;
    tcomm_begin(t);
    t->inner->iface->all_gather(t->inner->ctx, out, in, count, dt);
    tcomm_end(t, BENCH_ALL_GATHER, count * comm_dtype_size(dt) * (size_t)t->inner->size);
}

static void tcomm_reduce_scatter(void *ctx, void *out, const void *in, size_t count, enum comm_dtype dt,
                                 enum comm_op op) {
    struct bench_timing_comm *t = ctx;
    tcomm_begin(t);
    t->inner->iface->reduce_scatter(t->inner->ctx, out, in, count, dt, op);
    tcomm_end(t, BENCH_REDUCE_SCATTER, count * comm_dtype_size(dt) * (size_t)t->inner->size);
}

static void tcomm_broadcast(void *ctx, void *buf, size_t count, enum comm_dtype dt, int root) {
    struct bench_timing_comm *t = ctx;
    tcomm_begin(t);
    t->inner->iface->broadcast(t->inner->ctx, buf, count, dt, root);
    tcomm_end(t, BENCH_BROADCAST, count * comm_dtype_size(dt));
}

static void tcomm_synchronize(void *ctx) {
    struct bench_timing_comm *t = ctx;
    t->inner->iface->synchronize(t->inner->ctx);
}

// Host collectives carry the benchmark's own bookkeeping, not the phase's traffic: untimed.
static void tcomm_host_all_reduce(void *ctx, void *buf, size_t count, enum comm_dtype dt, enum comm_op op) {
    struct bench_timing_comm *t = ctx;
    comm_host_all_reduce(t->inner, buf, count, dt, op);
}

static void tcomm_host_all_gather(void *ctx, void *out, const void *in, size_t count, enum comm_dtype dt) {
    struct bench_timing_comm *t = ctx;
    comm_host_all_gather(t->inner, out, in, count, dt);
}

static void tcomm_host_gather(void *ctx, void *out, const void *in, size_t count, enum comm_dtype dt, int root) {
    struct bench_timing_comm *t = ctx;
    comm_host_gather(t->inner, out, in, count, dt, root);
}

static void tcomm_host_broadcast(void *ctx, void *buf, size_t count, enum comm_dtype dt, int root) {
    struct bench_timing_comm *t = ctx;
    comm_host_broadcast(t->inner, buf, count, dt, root);
}

static void tcomm_barrier(void *ctx) {
    struct bench_timing_comm *t = ctx;
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

struct comm bench_timed_tp(struct bench *b, struct bench_timing_comm *t, struct bench_clock *c) {
    t->inner = &b->mesh.tp;
    t->clock = c;
    return (struct comm){.iface = &timing_comm_iface, .ctx = t, .rank = t->inner->rank, .size = t->inner->size};
}

void bench_align_ranks(struct bench *b) {
    b->be.iface->synchronize(b->be.ctx);
    comm_barrier(&b->mesh.tp);
}

// One iteration; the phase's collectives are the mark pairs between the first and the last mark.
static void run_iteration(struct bench *b, const struct bench_phase *ps, void *arg, double *total,
                          double *comm, struct bench_phase_times *out) {
    struct bench_clock *c = &b->clock;
    if (ps->prepare) ps->prepare(arg);
    bench_align_ranks(b);
    c->n = 0;
    memset(c->coll_count, 0, sizeof c->coll_count);
    memset(c->coll_bytes, 0, sizeof c->coll_bytes);
    c->bus_bytes = 0.0;
    bench_clock_mark(c);
    ps->run(arg, c);
    int end = bench_clock_mark(c);
    *total = bench_clock_ms(c, 0, end);
    *comm = 0.0;
    for (int i = 1; i + 1 < end; i += 2) *comm += bench_clock_ms(c, i, i + 1);
    out->n_comm = (end - 1) / 2;
    out->coll_bytes = 0.0;
    for (int k = 0; k < 4; k++) {
        out->coll_count[k] = c->coll_count[k];
        out->coll_bytes += c->coll_bytes[k];
    }
    out->bus_bytes = c->bus_bytes;
}

// Every rank gets the same numbers (slowest rank per iteration), so the iteration count is agreed
// without another message.
void bench_time_phase(struct bench *b, const struct bench_phase *ps, void *arg, int warmup, int iters,
                      double target_ms, int min_iters, int max_iters, struct bench_phase_times *out) {
    memset(out, 0, sizeof *out);
    int cap = warmup > iters ? warmup : iters;
    if (target_ms > 0 && cap < max_iters) cap = max_iters;
    double *total = tp_malloc((size_t)cap * sizeof(double)), *comm = tp_malloc((size_t)cap * sizeof(double));
    for (int i = 0; i < warmup; i++) run_iteration(b, ps, arg, &total[i], &comm[i], out);
    if (target_ms > 0 && warmup > 0) {
        comm_host_all_reduce(&b->mesh.tp, total, (size_t)warmup, COMM_F64, COMM_MAX);
        double t = bench_stats_of(total, warmup).median;
        double want = t > 0 ? ceil(target_ms / t) : max_iters;
        iters = want < min_iters ? min_iters : want > max_iters ? max_iters : (int)want;
    }
    for (int i = 0; i < iters; i++) run_iteration(b, ps, arg, &total[i], &comm[i], out);
    comm_host_all_reduce(&b->mesh.tp, total, (size_t)iters, COMM_F64, COMM_MAX);
    comm_host_all_reduce(&b->mesh.tp, comm, (size_t)iters, COMM_F64, COMM_MAX);
    out->warmup = warmup;
    out->iters = iters;
    out->ms = bench_stats_of(total, iters);
    out->comm_ms = bench_stats_of(comm, iters).median;
    free(total);
    free(comm);
}

// ---- ceilings: the matrix rate and memory bandwidth this run measures (or is given)

struct probe {
    struct backend be;
    void *a, *b, *out;      // (n, n) compute type each: out = a @ b^T
    int n;
    void *src, *dst;        // (bytes) each
    size_t bytes;
};

static void run_matrix_probe(void *arg, struct bench_clock *c) {
    struct probe *p = arg;
    (void)c;
    p->be.iface->matmul_fwd(p->be.ctx, p->out, NULL, p->a, p->b, NULL, p->n, p->n, p->n);
}

static void run_copy_probe(void *arg, struct bench_clock *c) {
    struct probe *p = arg;
    (void)c;
    p->be.iface->copy(p->be.ctx, p->dst, p->src, p->bytes);
}

// TPTRAIN_BENCH_CEILINGS="TFLOPS,GBS" (e.g. "790,4300") gives the ceilings instead of measuring
// them. Returns 1 when set and valid, 0 when unset, TP_EXIT_USAGE (rank 0 says why) otherwise.
static int ceilings_from_env(const struct bench *b, struct bench_ceilings *k) {
    const char *s = getenv("TPTRAIN_BENCH_CEILINGS");
    if (!s || !*s) return 0;
    char *end;
    double t = strtod(s, &end), g = 0.0;
    bool ok = end != s && *end == ',';
    if (ok) {
        const char *q = end + 1;
        g = strtod(q, &end);
        ok = end != q && *end == '\0';
    }
    if (!ok || !(t > 0.0) || !(g > 0.0) || !isfinite(t) || !isfinite(g)) {
        if (b->root)
            fprintf(stderr, "tptrain: TPTRAIN_BENCH_CEILINGS='%s': expected TFLOPS,GBS (the matrix rate in "
                            "TFLOP/s and the memory bandwidth in GB/s, both positive, e.g. 790,4300)\n", s);
        return TP_EXIT_USAGE;
    }
    k->matrix_tflops = t;
    k->memory_gbs = g;
    snprintf(k->how, sizeof k->how, "given by TPTRAIN_BENCH_CEILINGS");
    return 1;
}

// One (n, n, n) product through the backend's matmul (the library the model's products use) and
// one device-to-device copy, each timed as a phase (slowest rank). A GPU gets a product large
// enough to reach its rate (8192) and a copy well past its caches (1 GiB); a CPU smaller ones.
static void measure_ceilings(struct bench *b, struct bench_ceilings *k) {
    bool host = b->be.iface->host_accessible;
    struct probe p = {.be = b->be, .n = host ? 512 : 8192, .bytes = host ? (size_t)64 << 20 : (size_t)1 << 30};
    size_t nn = (size_t)p.n * (size_t)p.n;
    p.a = bench_alloc_compute(b, nn);
    p.b = bench_alloc_compute(b, nn);
    p.out = bench_alloc_compute(b, nn);
    bench_fill_uniform(b->be, p.a, nn, 1.0f, 101);
    bench_fill_uniform(b->be, p.b, nn, 1.0f, 102);
    int warmup = b->iters_fixed ? b->warmup : 2, iters = b->iters_fixed ? b->iters : 10;
    struct bench_phase_times t;
    static const struct bench_phase mat = {"matrix_ceiling", "matrix ceiling", run_matrix_probe, NULL};
    bench_time_phase(b, &mat, &p, warmup < 1 ? 1 : warmup, iters, 0.0, 0, 0, &t); // warm-up tunes the product
    k->matrix_tflops = 2.0 * (double)nn * p.n / (t.ms.median * 1e-3) / 1e12;
    b->be.iface->free(b->be.ctx, p.a);
    b->be.iface->free(b->be.ctx, p.b);
    b->be.iface->free(b->be.ctx, p.out);
    p.src = b->be.iface->alloc(b->be.ctx, p.bytes);
    p.dst = b->be.iface->alloc(b->be.ctx, p.bytes);
    static const struct bench_phase cpy = {"memory_ceiling", "memory ceiling", run_copy_probe, NULL};
    bench_time_phase(b, &cpy, &p, warmup, iters, 0.0, 0, 0, &t);
    k->memory_gbs = 2.0 * (double)p.bytes / (t.ms.median * 1e-3) / 1e9; // read + write
    b->be.iface->free(b->be.ctx, p.src);
    b->be.iface->free(b->be.ctx, p.dst);
    snprintf(k->how, sizeof k->how, "measured: one %s %dx%dx%d product, one %zu MiB copy (read + write)",
             tp_dtype_name(b->be.iface->dtype(b->be.ctx)), p.n, p.n, p.n, p.bytes >> 20);
}

int bench_ceilings(struct bench *b, struct bench_ceilings *k) {
    int st = ceilings_from_env(b, k);
    if (st == TP_EXIT_USAGE) return st;
    if (!st) measure_ceilings(b, k);
    return 0;
}

// ---- output helpers

const char *bench_fmt(char *buf, size_t len, const char *fmt, double v) {
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

void bench_json_kv(json_t *obj, const char *key, double v) { json_object_set_new(obj, key, jnum(v)); }

json_t *bench_json_collectives(const struct bench_phase_times *t) {
    json_t *o = json_object();
    for (int k = 0; k < 4; k++) json_object_set_new(o, bench_coll_names[k], json_integer(t->coll_count[k]));
    return o;
}

// Writes the document (steals it) compact, reals to 9 significant digits, one line; a failed
// write shows up in bench_finish's check of the stream.
void bench_json_emit(const struct bench *b, json_t *doc) {
    if (json_dumpf(doc, b->json, JSON_COMPACT | JSON_REAL_PRECISION(9)) == 0) fputc('\n', b->json);
    json_decref(doc);
}

static const char *timing_name(const struct bench *b) {
    return b->events ? "backend events" : "host wall clock";
}

void bench_print_setup(const struct bench *b, const char *mode) {
    const char *be = b->be.iface->name(b->be.ctx);
    char peak[32];
    printf("tptrain %s --bench %s\n", TP_VERSION, mode);
    printf("%s backend (timings are %s) | comm %s | tp %d (ranks), dp 1 | precision %s | peak %s TFLOP/s per GPU\n",
           be, b->events ? "device events" : "host wall clock", b->mesh.tp.iface->name(b->mesh.tp.ctx),
           b->mesh.tp.size, config_precision_name(b->cfg.train.precision),
           bench_fmt(peak, sizeof peak, "%.0f", b->peak_tflops > 0 ? b->peak_tflops : NAN));
}

// The fields every mode's document opens with.
json_t *bench_json_setup(const struct bench *b, const char *mode) {
    json_t *o = json_pack("{s:s, s:s, s:s, s:s, s:s, s:i, s:s}", "mode", mode, "version", TP_VERSION, "backend",
                          b->be.iface->name(b->be.ctx), "timing", timing_name(b), "comm",
                          b->mesh.tp.iface->name(b->mesh.tp.ctx), "tp", b->mesh.tp.size, "precision",
                          config_precision_name(b->cfg.train.precision));
    bench_json_kv(o, "peak_tflops", b->peak_tflops > 0 ? b->peak_tflops : NAN);
    return o;
}

// nccl-tests' bus bandwidth: what each link carries in a ring all-reduce, 2(P-1)/P of the data.
double bench_bus_factor(int P) { return 2.0 * (P - 1) / P; }

// ---- entry point

int bench_run(const struct bench_opts *o) {
    int rank, world;
    mesh_world(&rank, &world);
    bool root = rank == 0;
    if (o->argc < 1) {
        if (root) fprintf(stderr, "tptrain: --bench needs a mode: %s; see tptrain --help\n", modes_text());
        return TP_EXIT_USAGE;
    }
    const struct bench_mode *mode = NULL;
    for (int i = 0; i < N_MODES; i++)
        if (strcmp(o->argv[0], modes[i]->name) == 0) mode = modes[i];
    if (mode && mode->standalone) return mode->standalone(o, rank, world);
    struct bench *b = tp_calloc(1, sizeof *b);
    b->root = root;
    void *args = NULL;
    int st = iters_from_env(b);
    if (!st && !mode) {
        if (root) fprintf(stderr, "tptrain: --bench: unknown mode '%s'; give one of: %s\n", o->argv[0], modes_text());
        st = TP_EXIT_USAGE;
    }
    if (!st) st = mode->parse(o, root, world, &args);
    if (!st) st = bench_config(b, o, mode->config_path ? mode->config_path(args) : NULL);
    if (!st) st = bench_start(b, o->json_path);
    if (!st) st = mode->run(b, args);
    if (b->root) fflush(stdout);
    int fin = bench_finish(b, o->json_path);
    if (!st) st = fin;
    free(args);
    free(b);
    return st;
}
