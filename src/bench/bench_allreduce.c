// bench_allreduce.c: --bench allreduce SIZES... | MIN:MAX:FACTOR: nccl-tests' all_reduce_perf
// table (size, count, type, redop, time, algbw, busbw, #wrong) for the TP group's comm.
#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "bench_impl.h"
#include "common.h"

#define ALLREDUCE_WARMUP 5     // all_reduce_perf's defaults, so figures compare
#define ALLREDUCE_ITERS 20
#define MAX_SIZES 64           // sizes in one run

struct allreduce_args {
    size_t sizes[MAX_SIZES];   // bytes, whole fp32 elements
    int n;
};

// ---- arguments

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



// Expands SIZES... and MIN:MAX:FACTOR into byte counts; rank 0 explains a bad one.
static int allreduce_parse_sizes(const struct bench_opts *o, bool root, size_t *sizes, int *n) {
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
                ok = bench_parse_size(buf, &lo) && bench_parse_size(f1 + 1, &hi) && bench_parse_dim(f2 + 1, &factor) &&
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

// ---- timing and check

struct allreduce_row {
    size_t bytes, count;
    double time_us, algbw, busbw;  // NAN bandwidth: one rank, nothing moves
    long long wrong;               // -1 = not checked (one rank)
};

// After timing, every rank contributes a known pattern and the sum is checked exactly: element i
// of rank r holds (i mod 61) + r + 1, small integers whose sum over ranks fp32 holds exactly.
static long long allreduce_check(struct bench *b, float *buf /* (count) */, size_t count) {
    enum { CHUNK = 1 << 20 };
    int P = b->mesh.tp.size, r = b->mesh.tp.rank;
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
    int P = b->mesh.tp.size;
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
    bench_align_ranks(b);
    c->n = 0;
    int start = bench_clock_mark(c);
    for (int i = 0; i < iters; i++) comm_all_reduce(&b->mesh.tp, buf, count, COMM_SUM);
    int end = bench_clock_mark(c);
    double us = 1e3 * bench_clock_ms(c, start, end) / iters;
    comm_host_all_reduce(&b->mesh.tp, &us, 1, COMM_F64, COMM_SUM);
    row->time_us = us / P;
    row->algbw = row->time_us > 0 ? (double)row->bytes / (row->time_us * 1e-6) / 1e9 : NAN;
    row->busbw = row->algbw * bench_bus_factor(P);
    row->wrong = allreduce_check(b, buf, count);
}

static void allreduce_print(const struct bench *b, const struct allreduce_row *rows, int n, int warmup,
                            int iters, double avg_busbw) {
    int P = b->mesh.tp.size;
    bench_print_setup(b, "allreduce");
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
               bench_fmt(t, sizeof t, "%.2f", rows[i].time_us), bench_fmt(a, sizeof a, "%.2f", rows[i].algbw),
               bench_fmt(u, sizeof u, "%.2f", rows[i].busbw), w);
    }
    char avg[32];
    if (P == 1) {
        printf("# one rank: an all-reduce over one rank communicates nothing; no communication cost "
               "(time 0, bandwidth n/a)\n");
    } else {
        printf("# Out of bounds values : %lld %s\n", wrong, wrong ? "FAILED" : "OK");
    }
    printf("# Avg bus bandwidth    : %s\n", bench_fmt(avg, sizeof avg, "%.3f", avg_busbw));
}

static void allreduce_json(const struct bench *b, const struct allreduce_row *rows, int n, int warmup,
                           int iters, double avg_busbw) {
    json_t *doc = bench_json_setup(b, "allreduce"), *arr = json_array();
    json_object_set_new(doc, "ranks", json_integer(b->mesh.tp.size));
    json_object_set_new(doc, "warmup", json_integer(warmup));
    json_object_set_new(doc, "iters", json_integer(iters));
    for (int i = 0; i < n; i++) {
        json_t *row = json_pack("{s:I, s:I, s:s, s:s}", "size", (json_int_t)rows[i].bytes, "count",
                                (json_int_t)rows[i].count, "type", "float", "redop", "sum");
        bench_json_kv(row, "time_us", rows[i].time_us);
        bench_json_kv(row, "algbw_gbs", rows[i].algbw);
        bench_json_kv(row, "busbw_gbs", rows[i].busbw);
        bench_json_kv(row, "wrong", rows[i].wrong >= 0 ? (double)rows[i].wrong : NAN);
        json_array_append_new(arr, row);
    }
    json_object_set_new(doc, "rows", arr);
    bench_json_kv(doc, "avg_busbw_gbs", avg_busbw);
    bench_json_emit(b, doc);
}

static int allreduce_run(struct bench *b, void *args) {
    const struct allreduce_args *a = args;
    const size_t *sizes = a->sizes;
    int n = a->n;
    int warmup = b->iters_fixed ? b->warmup : ALLREDUCE_WARMUP;
    int iters = b->iters_fixed ? b->iters : ALLREDUCE_ITERS;
    size_t max_count = 0;
    for (int i = 0; i < n; i++)
        if (sizes[i] / sizeof(float) > max_count) max_count = sizes[i] / sizeof(float);
    float *buf = b->mesh.tp.size > 1 ? bench_alloc_floats(b, max_count) : NULL; // (max_count)
    struct allreduce_row rows[MAX_SIZES];
    double busbw_sum = 0.0;
    for (int i = 0; i < n; i++) {
        allreduce_time(b, buf, sizes[i] / sizeof(float), warmup, iters, &rows[i]);
        busbw_sum += rows[i].busbw;
    }
    if (buf) b->be.iface->free(b->be.ctx, buf);
    double avg_busbw = b->mesh.tp.size > 1 ? busbw_sum / n : NAN;
    int wrong = 0;
    for (int i = 0; i < n; i++) wrong |= rows[i].wrong > 0;
    if (b->root) allreduce_print(b, rows, n, warmup, iters, avg_busbw);
    if (b->json) allreduce_json(b, rows, n, warmup, iters, avg_busbw);
    if (wrong && b->root) fprintf(stderr, "tptrain: --bench allreduce: the all-reduce returned wrong sums; the comm is broken\n");
    return wrong ? TP_EXIT_RUNTIME : 0;
}


static int allreduce_parse(const struct bench_opts *o, bool root, int world, void **args) {
    (void)world;
    struct allreduce_args *a = tp_calloc(1, sizeof *a);
    *args = a;
    return allreduce_parse_sizes(o, root, a->sizes, &a->n);
}

const struct bench_mode bench_mode_allreduce = {
    .name = "allreduce",
    .synopsis = "allreduce SIZES... | allreduce MIN:MAX:FACTOR",
    .parse = allreduce_parse,
    .run = allreduce_run,
};
