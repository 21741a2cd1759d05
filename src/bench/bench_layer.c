// bench_layer.c: --bench layer M K N: tp.h's column-parallel and row-parallel linears and the MLP
// block they make, forward and backward, on M tokens of width K with hidden width N (N/P per
// rank): the same functions training runs, so their time and their collectives are training's.
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "bench_impl.h"
#include "common.h"
#include "tp.h"

// Default iteration counts; TPTRAIN_BENCH_ITERS replaces them.
#define LAYER_WARMUP 5
#define LAYER_TARGET_MS 1000.0 // timed iterations are scaled to about this long per phase
#define LAYER_MIN_ITERS 10
#define LAYER_MAX_ITERS 2000

// ---- FLOPs

struct bench_layer_flops bench_layer_flops(long M, long K, long N, int P) {
    double mm = 2.0 * (double)M * (double)K * ((double)N / (double)P); // (M, K) x (K, N/P)
    return (struct bench_layer_flops){
        .column_fwd = mm, .column_bwd = 2 * mm,
        .row_fwd = mm, .row_bwd = 2 * mm,
        .mlp_fwd = 2 * mm, .mlp_bwd = 4 * mm,
    };
}


// ---- phases

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

// The layers are tp.h's, the ones training runs. Column forward: f is the identity, so no
// collective. With gelu, the GELU is fused into the product as the model runs it: h keeps the
// product, hg the activation.
static void column_fwd(struct layer_bench *lb, bool gelu, struct comm *tp) {
    column_parallel_linear_fwd(lb->b->be, tp, gelu ? lb->hg : lb->h, gelu ? lb->h : NULL, lb->x, lb->w1, lb->b1,
                               lb->M, lb->K, lb->Nl, NULL);
}

// Backward: each rank's dx covers its own shard; f's backward sums them (1 all-reduce).
static void column_bwd(struct layer_bench *lb, const void *dout, struct comm *tp) {
    column_parallel_linear_bwd(lb->b->be, tp, lb->dx, lb->dw1, lb->db1, dout, lb->x, lb->w1, lb->M, lb->K, lb->Nl,
                               NULL);
}

// Forward of the row-parallel linear: partial products, g's all-reduce, then the bias (once) and
// the residual.
static void row_fwd(struct layer_bench *lb, const void *inp, struct comm *tp) {
    struct row_parallel_out o = {.out = lb->out, .res = lb->x};
    row_parallel_linear_fwd(lb->b->be, tp, lb->y, inp, lb->w2, lb->b2, lb->M, lb->Nl, lb->K, &o, NULL);
}

// Backward: the output gradient is replicated, g's backward is the identity: no collective.
// pre_gelu non-NULL folds the GELU's derivative into dinp, as the model does.
static void row_bwd(struct layer_bench *lb, void *dinp, const void *inp, const void *pre_gelu, struct comm *tp) {
    row_parallel_linear_bwd(lb->b->be, tp, dinp, NULL, lb->dw2, lb->db2, lb->dy, inp, lb->w2, pre_gelu, lb->M,
                            lb->Nl, lb->K, NULL);
}

static void run_column_fwd(void *arg, struct bench_clock *c) {
    struct layer_bench *lb = arg;
    struct bench_timing_comm t;
    struct comm tp = bench_timed_tp(lb->b, &t, c);
    column_fwd(lb, false, &tp);
}

static void run_column_bwd(void *arg, struct bench_clock *c) {
    struct layer_bench *lb = arg;
    struct bench_timing_comm t;
    struct comm tp = bench_timed_tp(lb->b, &t, c);
    column_bwd(lb, lb->dh, &tp);
}

static void run_row_fwd(void *arg, struct bench_clock *c) {
    struct layer_bench *lb = arg;
    struct bench_timing_comm t;
    struct comm tp = bench_timed_tp(lb->b, &t, c);
    row_fwd(lb, lb->h, &tp);
}

static void run_row_bwd(void *arg, struct bench_clock *c) {
    struct layer_bench *lb = arg;
    struct bench_timing_comm t;
    struct comm tp = bench_timed_tp(lb->b, &t, c);
    row_bwd(lb, lb->dh, lb->h, NULL, &tp);
}

static void run_mlp_fwd(void *arg, struct bench_clock *c) {
    struct layer_bench *lb = arg;
    struct bench_timing_comm t;
    struct comm tp = bench_timed_tp(lb->b, &t, c);
    column_fwd(lb, true, &tp);
    row_fwd(lb, lb->hg, &tp);
}

static void run_mlp_bwd(void *arg, struct bench_clock *c) {
    struct layer_bench *lb = arg;
    struct bench_timing_comm t;
    struct comm tp = bench_timed_tp(lb->b, &t, c);
    row_bwd(lb, lb->dhg, lb->hg, lb->h, &tp);
    column_bwd(lb, lb->dhg, &tp);
}

struct layer_result {
    const struct bench_phase *spec;
    struct bench_phase_times t;
    double flops;           // matmul FLOPs per rank
    // derived
    double bytes_each;      // per collective, as measured by the timing comm
    double tflops, peak_share, comm_ms_each, algbw, busbw, comm_share;
};

static void layer_derive(const struct bench *b, struct layer_result *r) {
    double s = r->t.ms.median * 1e-3;
    r->tflops = s > 0 ? r->flops / s / 1e12 : NAN;
    r->peak_share = b->peak_tflops > 0 ? r->tflops / b->peak_tflops : NAN;
    r->comm_share = r->t.ms.median > 0 ? r->t.comm_ms / r->t.ms.median : 0.0;
    if (r->t.n_comm > 0) {
        double comm_s = r->t.comm_ms * 1e-3;
        r->bytes_each = r->t.coll_bytes / r->t.n_comm;
        r->comm_ms_each = r->t.comm_ms / r->t.n_comm;
        r->algbw = comm_s > 0 ? r->t.coll_bytes / comm_s / 1e9 : NAN;
        r->busbw = comm_s > 0 ? r->t.bus_bytes / comm_s / 1e9 : NAN;
    } else { // no collective ran: nothing was communicated, so there is no bandwidth to speak of
        r->bytes_each = r->comm_ms_each = 0.0;
        r->algbw = r->busbw = NAN;
    }
}

static void layer_print(const struct bench *b, int M, int K, int N, const struct layer_result *r, int n) {
    int P = b->mesh.tp.size;
    bench_print_setup(b, "layer");
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
               bench_fmt(a, sizeof a, "%.4f", r[i].tflops), bench_fmt(c, sizeof c, "%.1f%%", 100 * r[i].peak_share));
    printf("\n%-12s %11s %12s %11s %11s %12s %12s %10s\n", "phase", "collectives", "bytes each", "comm ms",
           "ms each", "algbw GB/s", "busbw GB/s", "comm share");
    for (int i = 0; i < n; i++)
        printf("%-12s %11d %12.0f %11.4f %11.4f %12s %12s %9.1f%%\n", r[i].spec->label, r[i].t.n_comm,
               r[i].bytes_each, r[i].t.comm_ms, r[i].comm_ms_each,
               bench_fmt(a, sizeof a, "%.3f", r[i].algbw), bench_fmt(c, sizeof c, "%.3f", r[i].busbw),
               100 * r[i].comm_share);
    if (P == 1)
        printf("# one rank: the TP all-reduces are no-ops, so there is no communication cost (0 ms, bandwidth n/a)\n");
    else
        printf("# collectives of %s over %d ranks (column and row layers all-reduce); algbw = bytes / time, busbw "
               "as nccl-tests (all-reduce 2(P-1)/P, all-gather and reduce-scatter (P-1)/P)\n",
               tp_dtype_name(b->be.iface->dtype(b->be.ctx)), P);
}

static void layer_json(const struct bench *b, int M, int K, int N, const struct layer_result *r, int n) {
    json_t *doc = bench_json_setup(b, "layer"), *phases = json_array();
    json_object_set_new(doc, "M", json_integer(M));
    json_object_set_new(doc, "K", json_integer(K));
    json_object_set_new(doc, "N", json_integer(N));
    for (int i = 0; i < n; i++) {
        json_t *p = json_pack("{s:s, s:i, s:i}", "name", r[i].spec->name, "warmup", r[i].t.warmup, "iters",
                              r[i].t.iters);
        bench_json_kv(p, "ms_median", r[i].t.ms.median);
        bench_json_kv(p, "ms_min", r[i].t.ms.min);
        bench_json_kv(p, "ms_max", r[i].t.ms.max);
        bench_json_kv(p, "ms_p10", r[i].t.ms.p10);
        bench_json_kv(p, "ms_p90", r[i].t.ms.p90);
        bench_json_kv(p, "flops", r[i].flops);
        bench_json_kv(p, "tflops", r[i].tflops);
        bench_json_kv(p, "peak_share", r[i].peak_share);
        // "allreduce" keeps its name from when all-reduce was the only collective timed: it now
        // covers every collective of the phase, "collectives" splits the count by kind.
        json_t *ar = json_pack("{s:i, s:I}", "count", r[i].t.n_comm, "bytes", (json_int_t)r[i].bytes_each);
        bench_json_kv(ar, "ms", r[i].t.comm_ms);
        bench_json_kv(ar, "ms_each", r[i].comm_ms_each);
        bench_json_kv(ar, "algbw_gbs", r[i].algbw);
        bench_json_kv(ar, "busbw_gbs", r[i].busbw);
        json_object_set_new(p, "allreduce", ar);
        json_object_set_new(p, "collectives", bench_json_collectives(&r[i].t));
        bench_json_kv(p, "comm_share", r[i].comm_share);
        json_array_append_new(phases, p);
    }
    json_object_set_new(doc, "phases", phases);
    bench_json_emit(b, doc);
}

static int layer_run(struct bench *b, void *args) {
    const int *dims = args;
    int M = dims[0], K = dims[1], N = dims[2];
    struct layer_bench lb = {.b = b, .M = M, .K = K, .Nl = N / b->mesh.tp.size};
    size_t MK = (size_t)M * K, MN = (size_t)M * lb.Nl, NK = (size_t)lb.Nl * K;
    void **bufs[] = {&lb.x, &lb.w1, &lb.b1, &lb.h, &lb.hg, &lb.w2, &lb.b2, &lb.y, &lb.out,
                     &lb.dx, &lb.dh, &lb.dhg, &lb.dy};
    size_t sizes[] = {MK, NK, (size_t)lb.Nl, MN, MN, NK, (size_t)K, MK, MK, MK, MN, MN, MK};
    float **gbufs[] = {&lb.dw1, &lb.db1, &lb.dw2, &lb.db2};
    size_t gsizes[] = {NK, (size_t)lb.Nl, NK, (size_t)K};
    int nbuf = (int)(sizeof sizes / sizeof sizes[0]), ngbuf = (int)(sizeof gsizes / sizeof gsizes[0]);
    for (int i = 0; i < nbuf; i++) *bufs[i] = bench_alloc_compute(b, sizes[i]);
    for (int i = 0; i < ngbuf; i++) *gbufs[i] = bench_alloc_floats(b, gsizes[i]);
    // The input and the output gradient are replicated (same seed everywhere); weights are shards.
    uint64_t seed = b->cfg.train.seed, rank = (uint64_t)b->mesh.tp.rank;
    bench_fill_uniform(b->be, lb.x, MK, 1.0f, seed);
    bench_fill_uniform(b->be, lb.dy, MK, 1.0f, seed + 1);
    bench_fill_uniform(b->be, lb.w1, NK, 1.0f / sqrtf((float)K), seed + 100 + rank);
    bench_fill_uniform(b->be, lb.b1, (size_t)lb.Nl, 0.1f, seed + 200 + rank);
    bench_fill_uniform(b->be, lb.w2, NK, 1.0f / sqrtf((float)N), seed + 300 + rank);
    bench_fill_uniform(b->be, lb.b2, (size_t)K, 0.1f, seed + 2);
    bench_fill_uniform(b->be, lb.dh, MN, 1.0f, seed + 400 + rank);
    bench_fill_uniform(b->be, lb.dhg, MN, 1.0f, seed + 500 + rank);
    column_fwd(&lb, true, &b->mesh.tp); // h and hg hold real activations before any backward runs

    static const struct bench_phase specs[] = {
        {"column_fwd", "column fwd", run_column_fwd, NULL},
        {"column_bwd", "column bwd", run_column_bwd, NULL},
        {"row_fwd", "row fwd", run_row_fwd, NULL},
        {"row_bwd", "row bwd", run_row_bwd, NULL},
        {"mlp_fwd", "mlp fwd", run_mlp_fwd, NULL},
        {"mlp_bwd", "mlp bwd", run_mlp_bwd, NULL},
    };
    enum { NPHASE = sizeof specs / sizeof specs[0] };
    struct bench_layer_flops fl = bench_layer_flops(M, K, N, b->mesh.tp.size);
    double flops[NPHASE] = {fl.column_fwd, fl.column_bwd, fl.row_fwd, fl.row_bwd, fl.mlp_fwd, fl.mlp_bwd};
    struct layer_result res[NPHASE];
    for (int i = 0; i < NPHASE; i++) {
        res[i] = (struct layer_result){.spec = &specs[i], .flops = flops[i]};
        if (b->iters_fixed)
            bench_time_phase(b, &specs[i], &lb, b->warmup, b->iters, 0.0, 0, 0, &res[i].t);
        else
            bench_time_phase(b, &specs[i], &lb, LAYER_WARMUP, LAYER_MIN_ITERS, LAYER_TARGET_MS, LAYER_MIN_ITERS,
                             LAYER_MAX_ITERS, &res[i].t);
        layer_derive(b, &res[i]);
    }
    for (int i = 0; i < nbuf; i++) b->be.iface->free(b->be.ctx, *bufs[i]);
    for (int i = 0; i < ngbuf; i++) b->be.iface->free(b->be.ctx, *gbufs[i]);
    if (b->root) layer_print(b, M, K, N, res, NPHASE);
    if (b->json) layer_json(b, M, K, N, res, NPHASE);
    return 0;
}

// ---- arguments

// The largest matrix a layer benchmark may hold per rank (elements): 2^30, 4 GiB in fp32.
#define LAYER_MAX_ELEMS (1LL << 30)

// Checks `layer M K N` against the TP size; every rank reaches the same verdict.
static int layer_parse(const struct bench_opts *o, bool root, int P, void **args) {
    int *dims = tp_calloc(3, sizeof *dims);
    *args = dims;
    static const char *names[3] = {"M", "K", "N"};
    if (o->argc != 4) {
        if (root) fprintf(stderr, "tptrain: --bench layer takes three sizes: M (tokens) K (width) N (hidden width), "
                                  "e.g. --bench layer 8192 4096 16384\n");
        return TP_EXIT_USAGE;
    }
    for (int i = 0; i < 3; i++) {
        if (!bench_parse_dim(o->argv[1 + i], &dims[i])) {
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
    // each of M x K, M x N/P and N/P x K is a buffer of its own (several of each): a bound that
    // refuses absurd sizes up front instead of failing an allocation
    long long M = dims[0], K = dims[1], Nl = dims[2] / P, most = M * K;
    if (M * Nl > most) most = M * Nl;
    if (Nl * K > most) most = Nl * K;
    if (most > LAYER_MAX_ELEMS) {
        if (root) fprintf(stderr, "tptrain: --bench layer: M=%d K=%d N=%d makes a %lld-element matrix per rank, over the "
                                  "%lld this mode allows; pick smaller sizes\n", dims[0], dims[1], dims[2], most,
                          (long long)LAYER_MAX_ELEMS);
        return TP_EXIT_USAGE;
    }
    return 0;
}


const struct bench_mode bench_mode_layer = {
    .name = "layer",
    .synopsis = "layer M K N",
    .parse = layer_parse,
    .run = layer_run,
};
