// test_bench.c: --bench: FLOP counts and size parsing against hand values, then the real binary on
// the CPU backend (one rank and under mpiexec -np 2): every phase reported, the one-rank
// all-reduce costing nothing, complete multi-rank tables, JSON output and clear size errors.
#include <criterion/criterion.h>

#include <jansson.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bench.h"
#include "bench/bench_impl.h"
#include "model.h"
#include "testutil.h"
#include "tp.h"
#include "train.h"

#define OUT_CAP (1 << 16)
// Few iterations keep the CPU runs short; the numbers are not what these tests check.
#define FAST_ITERS "TPTRAIN_BENCH_ITERS=1+3"

// ---- the timing comm records every kind of collective

// A pretend group of two: collectives do nothing but are counted, so the timing comm around it
// can be checked without MPI.
static int fake_calls;
static void fake_all_reduce(void *ctx, void *buf, size_t count, enum comm_dtype dt, enum comm_op op) {
    (void)ctx, (void)buf, (void)count, (void)dt, (void)op;
    fake_calls++;
}
static void fake_all_gather(void *ctx, void *out, const void *in, size_t count, enum comm_dtype dt) {
    (void)ctx, (void)out, (void)in, (void)count, (void)dt;
    fake_calls++;
}
static void fake_reduce_scatter(void *ctx, void *out, const void *in, size_t count, enum comm_dtype dt,
                                enum comm_op op) {
    (void)ctx, (void)out, (void)in, (void)count, (void)dt, (void)op;
    fake_calls++;
}
static const struct comm_i fake_iface = {.all_reduce = fake_all_reduce, .all_gather = fake_all_gather,
                                         .reduce_scatter = fake_reduce_scatter};

Test(bench, timing_comm_brackets_every_collective) {
    struct bench *b = calloc(1, sizeof *b);
    b->be = backend_cpu_create(TP_DTYPE_F32);
    b->mesh.tp = (struct comm){.iface = &fake_iface, .size = 2, .rank = 0};
    struct bench_clock *c = &b->clock;
    c->be = b->be; // host clock
    struct bench_timing_comm t;
    struct comm tp = bench_timed_tp(b, &t, c);
    enum { N = 8, W = 3 }; // token rows, width: a shard is 4 x 3 floats
    float *full = b->be.iface->alloc(b->be.ctx, N * W * sizeof(float)), *part = b->be.iface->alloc(b->be.ctx, N * W * sizeof(float));
    reduce_from_tp_region_fwd(b->be, &tp, full, N * W);                        // all-reduce of 96 bytes
    gather_from_sequence_parallel_region_fwd(b->be, &tp, full, part, N, W);       // all-gather of 96
    reduce_scatter_to_sequence_parallel_region_fwd(b->be, &tp, part, full, N, W); // reduce-scatter of 96
    gather_from_sequence_parallel_region_bwd(b->be, &tp, part, full, N, W);       // reduce-scatter of 96
    cr_assert_eq(fake_calls, 4, "the inner comm ran %d collectives", fake_calls);
    cr_assert_eq(c->n, 8, "two marks per collective, got %d", c->n);
    cr_assert_eq(c->coll_count[BENCH_ALL_REDUCE], 1);
    cr_assert_eq(c->coll_count[BENCH_ALL_GATHER], 1);
    cr_assert_eq(c->coll_count[BENCH_REDUCE_SCATTER], 2);
    cr_assert_eq(c->coll_count[BENCH_BROADCAST], 0);
    cr_assert_float_eq(c->coll_bytes[BENCH_ALL_GATHER], 96.0, 0.0);
    cr_assert_float_eq(c->coll_bytes[BENCH_REDUCE_SCATTER], 192.0, 0.0);
    // bus bytes: all-reduce 2(P-1)/P = 1, the others (P-1)/P = 1/2, at P = 2
    cr_assert_float_eq(c->bus_bytes, 96.0 + 0.5 * (96.0 + 192.0), 1e-9);
    b->be.iface->free(b->be.ctx, full);
    b->be.iface->free(b->be.ctx, part);
    free(c->ev);
    free(c->host);
    backend_destroy(&b->be);
    free(b);
}

// ---- helpers

// Runs `tptrain --bench ARGS` on the CPU backend with np ranks (0: a plain process); output
// into out (OUT_CAP). Returns the exit status; a hang fails the test.
// env: more VAR=value assignments for the command ("" for none).
static int run_bench_env(char *out, int np, const char *env, const char *args) {
    char launcher[1024] = "";
    if (np > 0) snprintf(launcher, sizeof launcher, "'%s' %s -np %d", tu_mpiexec(), tu_mpiexec_flags(), np);
    int rc = tu_run(out, OUT_CAP, "cd '%s' && " FAST_ITERS " %s timeout 120 %s '%s' --bench %s --set parallel.device=cpu",
                    tu_source_root(), env, launcher, tu_tptrain(), args);
    cr_assert_neq(rc, 124, "--bench %s hung and was stopped:\n%s", args, out);
    return rc;
}

static int run_bench(char *out, int np, const char *args) { return run_bench_env(out, np, "", args); }

// The line of out that starts with prefix, the n-th such (0-based); copied into line.
static bool find_line(const char *out, const char *prefix, int nth, char *line, size_t len) {
    const char *p = out;
    while (p && *p) {
        const char *eol = strchr(p, '\n');
        size_t n = eol ? (size_t)(eol - p) : strlen(p);
        if (strncmp(p, prefix, strlen(prefix)) == 0 && nth-- == 0) {
            snprintf(line, len, "%.*s", (int)n, p);
            return true;
        }
        p = eol ? eol + 1 : NULL;
    }
    return false;
}

static char *read_text(const char *path) {
    FILE *f = fopen(path, "r");
    cr_assert_not_null(f, "cannot read %s", path);
    char *buf = calloc(1, OUT_CAP);
    cr_assert_not_null(buf);
    size_t n = fread(buf, 1, OUT_CAP - 1, f);
    buf[n] = '\0';
    fclose(f);
    return buf;
}

static bool have_python(void) {
    char out[256];
    return tu_run(out, sizeof out, "command -v python3") == 0;
}

// The file parses as JSON (when python3 is there to say so).
static void assert_json_parses(const char *path) {
    if (!have_python()) return;
    char out[4096];
    int rc = tu_run(out, sizeof out, "python3 -c 'import json,sys; json.load(open(sys.argv[1]))' '%s'", path);
    cr_assert_eq(rc, 0, "%s is not valid JSON:\n%s", path, out);
}

// Reads a --json file, asserts it holds every key fragment and parses; returns its text (free it).
static char *read_json_with(const char *path, const char *const *keys, size_t n_keys) {
    char *js = read_text(path);
    for (size_t i = 0; i < n_keys; i++) cr_assert(strstr(js, keys[i]), "JSON lacks %s:\n%s", keys[i], js);
    assert_json_parses(path);
    return js;
}

static const char *const layer_phases[] = {"column fwd", "column bwd", "row fwd", "row bwd", "mlp fwd", "mlp bwd"};
#define N_LAYER_PHASES 6

// Both tables (compute, then all-reduce) list every phase.
static void assert_every_layer_phase(const char *out) {
    char line[512];
    for (int i = 0; i < N_LAYER_PHASES; i++) {
        cr_assert(find_line(out, layer_phases[i], 0, line, sizeof line), "no '%s' row:\n%s", layer_phases[i], out);
        cr_assert(find_line(out, layer_phases[i], 1, line, sizeof line), "no '%s' all-reduce row:\n%s",
                  layer_phases[i], out);
    }
}

// ---- FLOP counts

Test(bench, layer_flops_match_hand_counts) {
    // M=64, K=32, N=128 over 2 ranks: one forward matmul is (64, 32) x (32, 64): 2*64*32*64 FLOPs.
    struct bench_layer_flops f = bench_layer_flops(64, 32, 128, 2);
    cr_assert_eq(f.column_fwd, 262144.0);
    cr_assert_eq(f.column_bwd, 524288.0);
    cr_assert_eq(f.row_fwd, 262144.0);
    cr_assert_eq(f.row_bwd, 524288.0);
    cr_assert_eq(f.mlp_fwd, 524288.0);
    cr_assert_eq(f.mlp_bwd, 1048576.0);
    // GPT-2 124M's MLP at 8 x 1024 tokens on one GPU: 2*8192*768*3072 = 38654705664 per matmul.
    f = bench_layer_flops(8192, 768, 3072, 1);
    cr_assert_eq(f.column_fwd, 38654705664.0);
    cr_assert_eq(f.mlp_bwd, 4 * 38654705664.0);
    // Splitting over 4 ranks quarters the work of each rank.
    struct bench_layer_flops q = bench_layer_flops(8192, 768, 3072, 4);
    cr_assert_eq(q.column_fwd, 9663676416.0);
    cr_assert_eq(q.row_bwd, 2 * 9663676416.0);
}

Test(bench, parse_size_takes_binary_suffixes) {
    size_t v = 0;
    cr_assert(bench_parse_size("4096", &v));
    cr_assert_eq(v, 4096);
    cr_assert(bench_parse_size("1K", &v));
    cr_assert_eq(v, 1024);
    cr_assert(bench_parse_size("8m", &v));
    cr_assert_eq(v, 8u << 20);
    cr_assert(bench_parse_size("2G", &v));
    cr_assert_eq(v, (size_t)2 << 30);
    const char *bad[] = {"0", "-5", "abc", "", "1.5K", "1KB", "K", " 8", "99999999999999999999", "17179869184G"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        cr_assert_not(bench_parse_size(bad[i], &v), "'%s' accepted as %zu", bad[i], v);
}

// ---- layer

Test(bench, layer_one_rank_reports_every_phase) {
    char *out = malloc(OUT_CAP);
    int rc = run_bench(out, 0, "layer 64 32 128");
    cr_assert_eq(rc, 0, "exit %d:\n%s", rc, out);
    assert_every_layer_phase(out);
    cr_assert(strstr(out, "cpu backend (timings are host wall clock)"), "the CPU backend must say so:\n%s", out);
    cr_assert(strstr(out, "1 warm-up + 3 timed"), "TPTRAIN_BENCH_ITERS not honoured:\n%s", out);
    // One rank communicates nothing: every all-reduce row shows 0 all-reduces and n/a bandwidths.
    char line[512];
    cr_assert(find_line(out, "column bwd", 1, line, sizeof line));
    cr_assert(strstr(line, "n/a"), "one rank must report no bandwidth: %s", line);
    cr_assert(strstr(out, "no communication cost"), "%s", out);
    free(out);
}

Test(bench, layer_two_ranks_times_the_all_reduces) {
    tu_require_mpiexec();
    char *out = malloc(OUT_CAP);
    int rc = run_bench(out, 2, "layer 64 32 128");
    cr_assert_eq(rc, 0, "exit %d:\n%s", rc, out);
    assert_every_layer_phase(out);
    cr_assert(strstr(out, "tp 2 (ranks)"), "%s", out);
    cr_assert(strstr(out, "N/P=64 per rank"), "%s", out);
    // Phases with an all-reduce show one of 64*32 floats and real bandwidths; the others none.
    const char *with[] = {"column bwd", "row fwd", "mlp fwd", "mlp bwd"};
    char line[512];
    for (int i = 0; i < 4; i++) {
        cr_assert(find_line(out, with[i], 1, line, sizeof line));
        int count = -1;
        unsigned long bytes = 0;
        cr_assert_eq(sscanf(line + strlen(with[i]), "%d %lu", &count, &bytes), 2, "%s", line);
        cr_assert_eq(count, 1, "%s", line);
        cr_assert_eq(bytes, 64ul * 32 * 4, "%s", line);
        cr_assert_null(strstr(line, "n/a"), "a timed all-reduce has a bandwidth: %s", line);
    }
    cr_assert(find_line(out, "column fwd", 1, line, sizeof line));
    int count = -1;
    cr_assert_eq(sscanf(line + strlen("column fwd"), "%d", &count), 1, "%s", line);
    cr_assert_eq(count, 0, "the column forward needs no collective: %s", line);
    free(out);
}

Test(bench, layer_json_holds_every_phase) {
    char dir[1024], path[1200], args[1400];
    tu_tmpdir(dir, sizeof dir, "bench");
    snprintf(path, sizeof path, "%s/layer.json", dir);
    snprintf(args, sizeof args, "layer 64 32 128 --json '%s'", path);
    char *out = malloc(OUT_CAP);
    int rc = run_bench(out, 0, args);
    cr_assert_eq(rc, 0, "exit %d:\n%s", rc, out);
    // one rank: the column forward is (64, 32) x (32, 128), 2*64*32*128 = 524288 FLOPs
    const char *keys[] = {"\"mode\":\"layer\"", "\"backend\":\"cpu\"", "\"timing\":\"host wall clock\"", "\"tp\":1",
                          "\"M\":64", "\"K\":32", "\"N\":128", "\"name\":\"column_fwd\"", "\"name\":\"column_bwd\"",
                          "\"name\":\"row_fwd\"", "\"name\":\"row_bwd\"", "\"name\":\"mlp_fwd\"",
                          "\"name\":\"mlp_bwd\"", "\"ms_median\":", "\"tflops\":", "\"busbw_gbs\":null",
                          "\"comm_share\":", "\"peak_share\":null", "\"flops\":524288,"};
    char *js = read_json_with(path, keys, sizeof keys / sizeof keys[0]);
    free(js);
    free(out);
    tu_rmtree(dir);
}

// ---- allreduce

Test(bench, allreduce_one_rank_costs_nothing) {
    char *out = malloc(OUT_CAP);
    int rc = run_bench(out, 0, "allreduce 1K 1M");
    cr_assert_eq(rc, 0, "exit %d:\n%s", rc, out);
    const char *rows[] = {"1024", "1048576"};
    char line[512];
    for (int i = 0; i < 2; i++) {
        char prefix[64];
        snprintf(prefix, sizeof prefix, "%13s", rows[i]);
        cr_assert(find_line(out, prefix, 0, line, sizeof line), "no %s row:\n%s", rows[i], out);
        cr_assert(strstr(line, "0.00"), "time must be 0 at one rank: %s", line);
        cr_assert(strstr(line, "n/a"), "bandwidth must be n/a at one rank: %s", line);
    }
    cr_assert(strstr(out, "no communication cost"), "%s", out);
    cr_assert(strstr(out, "Avg bus bandwidth    : n/a"), "%s", out);
    free(out);
}

Test(bench, allreduce_two_ranks_gives_a_complete_table) {
    tu_require_mpiexec();
    char dir[1024], path[1200], args[1400];
    tu_tmpdir(dir, sizeof dir, "bench");
    snprintf(path, sizeof path, "%s/ar.json", dir);
    snprintf(args, sizeof args, "allreduce 1K 1M --json '%s'", path);
    char *out = malloc(OUT_CAP);
    int rc = run_bench(out, 2, args);
    cr_assert_eq(rc, 0, "exit %d:\n%s", rc, out);
    const unsigned long sizes[] = {1024, 1048576};
    char line[512];
    for (int i = 0; i < 2; i++) {
        char prefix[64];
        snprintf(prefix, sizeof prefix, "%13lu", sizes[i]);
        cr_assert(find_line(out, prefix, 0, line, sizeof line), "no %lu row:\n%s", sizes[i], out);
        unsigned long bytes, count;
        char type[16], redop[16];
        double us, algbw, busbw;
        long wrong;
        cr_assert_eq(sscanf(line, "%lu %lu %15s %15s %lf %lf %lf %ld", &bytes, &count, type, redop, &us, &algbw,
                            &busbw, &wrong), 8, "incomplete row: %s", line);
        cr_assert_eq(count, sizes[i] / 4);
        cr_assert_str_eq(type, "float");
        cr_assert_str_eq(redop, "sum");
        cr_assert_gt(us, 0.0, "%s", line);
        // A slow small all-reduce on a loaded machine prints as 0.00 GB/s: the bandwidth's sign is
        // checked on the unrounded JSON values below.
        cr_assert_geq(algbw, 0.0, "%s", line);
        // nccl-tests: busbw = algbw * 2(P-1)/P, which is algbw itself at P = 2 (to print precision)
        cr_assert_leq(busbw - algbw, 0.011, "%s", line);
        cr_assert_geq(busbw - algbw, -0.011, "%s", line);
        cr_assert_eq(wrong, 0, "wrong sums: %s", line);
    }
    cr_assert(strstr(out, "Out of bounds values : 0 OK"), "%s", out);
    const char *keys[] = {"\"mode\":\"allreduce\"", "\"ranks\":2", "\"size\":1024", "\"size\":1048576",
                          "\"count\":262144", "\"time_us\":", "\"algbw_gbs\":", "\"busbw_gbs\":", "\"wrong\":0",
                          "\"avg_busbw_gbs\":"};
    char *js = read_json_with(path, keys, sizeof keys / sizeof keys[0]);
    const char *rows = strstr(js, "\"rows\":");
    cr_assert_not_null(rows, "%s", js);
    cr_assert_null(strstr(rows, "null"), "every value is measured at two ranks:\n%s", js);
    int n_algbw = 0;
    for (const char *a = strstr(rows, "\"algbw_gbs\":"); a; a = strstr(a + 1, "\"algbw_gbs\":"), n_algbw++)
        cr_assert_gt(strtod(a + strlen("\"algbw_gbs\":"), NULL), 0.0, "measured bandwidth must be positive:\n%s", js);
    cr_assert_eq(n_algbw, 2, "%s", js);
    free(js);
    free(out);
    tu_rmtree(dir);
}

Test(bench, allreduce_sweep_expands_min_max_factor) {
    char *out = malloc(OUT_CAP);
    int rc = run_bench(out, 0, "allreduce 1K:16K:4");
    cr_assert_eq(rc, 0, "exit %d:\n%s", rc, out);
    char line[512];
    cr_assert(find_line(out, "         1024", 0, line, sizeof line), "%s", out);
    cr_assert(find_line(out, "         4096", 0, line, sizeof line), "%s", out);
    cr_assert(find_line(out, "        16384", 0, line, sizeof line), "%s", out);
    cr_assert_not(find_line(out, "         2048", 0, line, sizeof line), "factor 4 skips 2K:\n%s", out);
    free(out);
}

// ---- model

Test(bench, model_breaks_a_step_into_phases) {
    char dir[1024], path[1200], args[2400];
    tu_tmpdir(dir, sizeof dir, "bench");
    snprintf(path, sizeof path, "%s/model.json", dir);
    snprintf(args, sizeof args, "model '%s/configs/tiny.yaml' --json '%s'", tu_source_root(), path);
    char *out = malloc(OUT_CAP);
    int rc = run_bench(out, 0, args);
    cr_assert_eq(rc, 0, "exit %d:\n%s", rc, out);
    const char *rows[] = {"embedding fwd", "attention fwd (x2)", "mlp fwd (x2)", "lm head + loss fwd+bwd",
                          "mlp bwd (x2)", "attention bwd (x2)", "embedding bwd",
                          "optimizer", "sum of phases", "  communication", "whole step (measured)"};
    char line[512];
    for (size_t i = 0; i < sizeof rows / sizeof rows[0]; i++)
        cr_assert(find_line(out, rows[i], 0, line, sizeof line), "no '%s' row:\n%s", rows[i], out);
    cr_assert(strstr(out, "tok/s"), "%s", out);
    cr_assert(strstr(out, "MFU n/a"), "no peak on the CPU backend, so no MFU:\n%s", out);
    cr_assert(strstr(out, "timed alone"), "the output must say how phases were timed:\n%s", out);
    const char *keys[] = {"\"mode\":\"model\"", "\"step\":{", "\"tok_per_s\":", "\"mfu\":null", "\"tokens\":128",
                          "\"name\":\"attention_fwd\"", "\"name\":\"optimizer\"", "\"communication_ms\":"};
    char *js = read_json_with(path, keys, sizeof keys / sizeof keys[0]);
    free(js);
    free(out);
    tu_rmtree(dir);
}

// ---- model: FLOPs, bytes and the ceilings

// What a micro-step's matrix products and attention must compute at one rank of P (dims d):
// 6 * N * (12 L C^2 + Vp C) / P + 6 L C T N / P, the MFU formula's 6N + 6LCT with the matrix
// parameters (padded vocabulary) for N.
static double step_flops(const struct model_dims *d) {
    double N = (double)d->N, L = d->L, C = d->C, T = d->T, P = d->P;
    return (6.0 * N * (12.0 * L * C * C + (double)d->Vp * C) + 6.0 * L * C * T * N) / P;
}

static struct tp_model_config tiny_model(void) {
    return (struct tp_model_config){.n_layer = 2, .n_head = 4, .n_embd = 64, .vocab_size = 50257, .seq_len = 32};
}

Test(bench, model_costs_add_up_to_the_step_flops) {
    struct backend be = backend_cpu_create(TP_DTYPE_F32);
    struct tp_model_config mc = tiny_model();
    struct tp_config cfg;
    config_defaults(&cfg);
    cfg.model = mc;
    for (int P = 1; P <= 4; P *= 2) {
        for (int rows = 128; rows >= 40; rows -= 88) { // the head in one chunk, and in 40, 40, 40, 8
            struct model_dims d = model_dims_make(&mc, 4, P, (struct model_options){0});
            d.head_rows = rows;
            struct bench_model_cost c[BENCH_MODEL_PHASES];
            bench_model_costs(&d, &be, 100.0, 1000.0, c);
            double flops = 0.0;
            for (int i = 0; i < BENCH_MODEL_PHASES; i++) {
                flops += c[i].flops;
                cr_assert_gt(c[i].bytes, 0.0, "%s moves no bytes", c[i].name);
                // the ideal is, op by op, the larger of the two times: between their max and their sum
                double m = c[i].matrix_ms > c[i].memory_ms ? c[i].matrix_ms : c[i].memory_ms;
                cr_assert(c[i].ideal_ms >= m * (1 - 1e-12) && c[i].ideal_ms <= (c[i].matrix_ms + c[i].memory_ms) * (1 + 1e-12),
                          "%s: ideal %g, matrix %g, memory %g", c[i].name, c[i].ideal_ms, c[i].matrix_ms, c[i].memory_ms);
                cr_assert_float_eq(c[i].matrix_ms, c[i].flops / 100e12 * 1e3, 1e-9 * (1 + c[i].matrix_ms));
                cr_assert_float_eq(c[i].memory_ms, c[i].bytes / 1000e9 * 1e3, 1e-9 * (1 + c[i].memory_ms));
            }
            cr_assert_eq(flops, step_flops(&d), "P=%d rows=%d: phases %.0f FLOPs, the step %.0f", P, rows, flops,
                         step_flops(&d));
            // the MFU formula counts biases, layernorms and wpe too, and the unpadded vocabulary
            double mfu = train_flops_per_token(&cfg) * (double)d.N / P;
            cr_assert(fabs(flops - mfu) < 0.01 * mfu, "P=%d: %.0f FLOPs against the MFU formula's %.0f", P, flops, mfu);
        }
    }
    // chunking the head reads the weight (fp32 here) twice and its gradient's accumulator once more
    // per extra chunk, and writes that once more: more bytes, the same FLOPs
    struct model_dims d1 = model_dims_make(&mc, 4, 1, (struct model_options){0}), d4 = d1;
    d1.head_rows = 128;
    d4.head_rows = 32;
    struct bench_model_cost c1[BENCH_MODEL_PHASES], c4[BENCH_MODEL_PHASES];
    bench_model_costs(&d1, &be, 0, 0, c1);
    bench_model_costs(&d4, &be, 0, 0, c4);
    cr_assert_str_eq(c1[3].name, "head_loss");
    cr_assert_eq(c1[3].flops, c4[3].flops);
    cr_assert_float_eq(c4[3].bytes - c1[3].bytes, 3.0 * (2 * 4.0 * 50304 * 64 + 8.0 * 50304 * 64), 1.0);
    backend_destroy(&be);
}

static json_t *load_json(const char *path) {
    json_error_t e;
    json_t *doc = json_load_file(path, 0, &e);
    cr_assert_not_null(doc, "%s: %s (line %d)", path, e.text, e.line);
    return doc;
}

static double jnum_of(const json_t *o, const char *key) {
    json_t *v = json_object_get(o, key);
    cr_assert(json_is_number(v), "no number '%s'", key);
    return json_number_value(v);
}

// The table's FLOPs per phase add up to the step's, the JSON carries every phase's FLOPs, bytes and
// ideal time, and the ceilings are measured, or given by TPTRAIN_BENCH_CEILINGS (bad values exit 2).
Test(bench, model_phases_against_the_ceilings) {
    char dir[1024], path[1200], args[2400];
    tu_tmpdir(dir, sizeof dir, "bench_ceil");
    snprintf(path, sizeof path, "%s/model.json", dir);
    snprintf(args, sizeof args, "model '%s/configs/tiny.yaml' --json '%s'", tu_source_root(), path);
    char *out = malloc(OUT_CAP);
    for (int given = 0; given < 2; given++) {
        int rc = run_bench_env(out, 0, given ? "TPTRAIN_BENCH_CEILINGS=790,4300" : "", args);
        cr_assert_eq(rc, 0, "exit %d:\n%s", rc, out);
        char line[512];
        cr_assert(find_line(out, "phase ", 0, line, sizeof line), "%s", out);
        cr_assert(strstr(line, "GFLOP") && strstr(line, "GB") && strstr(line, "ideal ms") && strstr(line, "x ideal"),
                  "%s", line);
        cr_assert(strstr(out, "ceilings per GPU: matrix"), "%s", out);
        json_t *doc = load_json(path);
        json_t *ceil = json_object_get(doc, "ceilings");
        cr_assert_not_null(ceil);
        double rate = jnum_of(ceil, "matrix_tflops"), bw = jnum_of(ceil, "memory_gbs");
        const char *source = json_string_value(json_object_get(ceil, "source"));
        if (given) {
            cr_assert_eq(rate, 790.0);
            cr_assert_eq(bw, 4300.0);
            cr_assert(source && strstr(source, "TPTRAIN_BENCH_CEILINGS"), "%s", source);
        } else {
            cr_assert_gt(rate, 0.0);
            cr_assert_gt(bw, 0.0);
            cr_assert(source && strstr(source, "measured"), "%s", source);
        }
        struct tp_model_config mc = tiny_model();
        struct model_dims d = model_dims_make(&mc, 4, 1, (struct model_options){0});
        json_t *phases = json_object_get(doc, "phases");
        cr_assert_eq(json_array_size(phases), BENCH_MODEL_PHASES);
        double flops = 0.0, ideal = 0.0;
        size_t i;
        json_t *p;
        json_array_foreach(phases, i, p) {
            flops += jnum_of(p, "flops");
            ideal += jnum_of(p, "ideal_ms");
            cr_assert_gt(jnum_of(p, "bytes"), 0.0);
            cr_assert_gt(jnum_of(p, "ideal_ms"), 0.0);
            cr_assert(json_is_string(json_object_get(p, "bound")));
            cr_assert(json_is_number(json_object_get(p, "x_ideal")));
            if (given)
                cr_assert_float_eq(jnum_of(p, "memory_ms"), jnum_of(p, "bytes") / 4300e6, 1e-6 * jnum_of(p, "memory_ms"));
        }
        cr_assert_eq(flops, step_flops(&d), "phases %.0f FLOPs, the step %.0f", flops, step_flops(&d));
        cr_assert_eq(jnum_of(doc, "flops_per_step"), flops);
        cr_assert_float_eq(jnum_of(doc, "ideal_ms"), ideal, 1e-6 * ideal);
        cr_assert_eq(jnum_of(doc, "head_rows"), (double)d.head_rows);
        json_decref(doc);
    }
    int rc = run_bench_env(out, 0, "TPTRAIN_BENCH_CEILINGS=fast", args);
    cr_assert_eq(rc, 2, "exit %d:\n%s", rc, out);
    cr_assert(strstr(out, "TPTRAIN_BENCH_CEILINGS='fast': expected TFLOPS,GBS"), "%s", out);
    free(out);
    tu_rmtree(dir);
}

// Two ranks: the collectives take time, and each rank's FLOPs are its half of the step's.
// ---- gemm: every product of a step, each shape alone

// Every product of tiny.yaml's step has its row and JSON entry; calls x FLOPs per call add up to the
// step's products (the step's FLOPs less attention's), at one rank and at two (each rank's shards);
// the head's products run on its chunks' rows; ms per step is calls x ms per call.
Test(bench, gemm_lists_every_product_of_a_step) {
    static const char *const names[] = {"qkv fwd", "qkv bwd data", "qkv bwd weight", "attn proj fwd",
                                        "attn proj bwd data", "attn proj bwd weight", "fc fwd", "fc bwd data",
                                        "fc bwd weight", "mlp proj fwd", "mlp proj bwd data", "mlp proj bwd weight",
                                        "lm head fwd", "lm head bwd data", "lm head bwd weight"};
    char dir[1024], path[1200], args[2400];
    tu_tmpdir(dir, sizeof dir, "bench_gemm");
    snprintf(path, sizeof path, "%s/gemm.json", dir);
    char *out = malloc(OUT_CAP);
    for (int P = 1; P <= 2; P++) {
        snprintf(args, sizeof args, "gemm '%s/configs/tiny.yaml' --json '%s'", tu_source_root(), path);
        int rc = run_bench_env(out, P == 1 ? 0 : P, "TPTRAIN_BENCH_CEILINGS=790,4300", args);
        cr_assert_eq(rc, 0, "exit %d:\n%s", rc, out);
        char line[512];
        for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
            cr_assert(find_line(out, names[i], 0, line, sizeof line), "no '%s' row:\n%s", names[i], out);
        cr_assert(find_line(out, "all products", 0, line, sizeof line), "%s", out);
        json_t *doc = load_json(path);
        json_t *ps = json_object_get(doc, "products");
        cr_assert_eq(json_array_size(ps), sizeof names / sizeof names[0]);
        struct tp_model_config mc = tiny_model();
        struct model_dims d = model_dims_make(&mc, 4, P, (struct model_options){0});
        double flops = 0.0, step_ms = 0.0;
        for (size_t i = 0; i < json_array_size(ps); i++) {
            json_t *p = json_array_get(ps, i);
            cr_assert_str_eq(json_string_value(json_object_get(p, "product")), names[i]);
            double N = jnum_of(p, "N"), IC = jnum_of(p, "IC"), OC = jnum_of(p, "OC"), calls = jnum_of(p, "calls_per_step");
            flops += 2.0 * N * IC * OC * calls;
            double ms = jnum_of(p, "ms_per_call"), per_step = jnum_of(p, "ms_per_step");
            cr_assert_float_eq(per_step, ms * calls, 1e-8 * per_step + 1e-12, "%s (the JSON keeps 9 digits)", names[i]);
            step_ms += per_step;
            if (i >= 12) cr_assert_eq(N, (double)d.head_rows, "the head's products run on its chunks' rows");
        }
        double attention = 6.0 * d.L * d.C * d.T * (double)d.N / P;
        cr_assert(fabs(flops - (step_flops(&d) - attention)) < 1e-6 * flops, "P=%d: products %.0f FLOPs, the step's %.0f",
                  P, flops, step_flops(&d) - attention);
        cr_assert_float_eq(jnum_of(doc, "products_ms_per_step"), step_ms, 1e-8 * step_ms + 1e-12);
        double ideal = flops / 790e12 * 1e3;
        cr_assert_float_eq(jnum_of(doc, "ceiling_ms_per_step"), ideal, 1e-8 * ideal);
        json_decref(doc);
    }
    free(out);
    tu_rmtree(dir);
}

Test(bench, model_two_ranks_times_communication) {
    tu_require_mpiexec();
    char dir[1024], path[1200], args[2400];
    tu_tmpdir(dir, sizeof dir, "bench_two");
    snprintf(path, sizeof path, "%s/model.json", dir);
    snprintf(args, sizeof args, "model '%s/configs/tiny.yaml' --json '%s'", tu_source_root(), path);
    char *out = malloc(OUT_CAP);
    int rc = run_bench(out, 2, args);
    cr_assert_eq(rc, 0, "exit %d:\n%s", rc, out);
    char line[512];
    cr_assert(find_line(out, "  communication", 0, line, sizeof line), "%s", out);
    double ms = -1;
    cr_assert_eq(sscanf(line, "  communication (all-reduce) %lf", &ms), 1, "%s", line);
    cr_assert_gt(ms, 0.0, "two ranks all-reduce, which takes time: %s", line);
    struct tp_model_config mc = tiny_model();
    struct model_dims d = model_dims_make(&mc, 4, 2, (struct model_options){0});
    json_t *doc = load_json(path);
    cr_assert_eq(jnum_of(doc, "flops_per_step"), step_flops(&d));
    json_decref(doc);
    free(out);
    tu_rmtree(dir);
}

static void expect_usage_error(int np, const char *args, const char *needle);

// Shapes after the config replace the step's products: each shape's three passes with the MLP's
// epilogues and its forward with the bias alone, one call each, in the order given; a bad shape
// exits 2 naming it.
Test(bench, gemm_times_the_shapes_given) {
    static const int shapes[2][3] = {{64, 32, 128}, {128, 64, 32}};
    static const char *const pass[4] = {"fwd", "fwd bias", "bwd data", "bwd weight"};
    static const char *const epilogue[4] = {"bias+gelu", "bias", "dgelu+dsum", "+dbias"};
    char dir[1024], path[1200], args[2400];
    tu_tmpdir(dir, sizeof dir, "bench_gemm_shapes");
    snprintf(path, sizeof path, "%s/gemm.json", dir);
    snprintf(args, sizeof args, "gemm '%s/configs/tiny.yaml' 64x32x128 128x64x32 --json '%s'", tu_source_root(),
             path);
    char *out = malloc(OUT_CAP);
    int rc = run_bench_env(out, 0, "TPTRAIN_BENCH_CEILINGS=790,4300", args);
    cr_assert_eq(rc, 0, "exit %d:\n%s", rc, out);
    cr_assert(strstr(out, "the shapes given"), "%s", out);
    cr_assert_null(strstr(out, "qkv fwd"), "the step's products are not timed when shapes are given:\n%s", out);
    json_t *doc = load_json(path);
    cr_assert_str_eq(json_string_value(json_object_get(doc, "products_of")), "shapes");
    json_t *ps = json_object_get(doc, "products");
    cr_assert_eq(json_array_size(ps), 8);
    double flops = 0.0;
    for (int i = 0; i < 8; i++) {
        const int *sh = shapes[i / 4];
        char name[64], line[512];
        snprintf(name, sizeof name, "%dx%dx%d %s", sh[0], sh[1], sh[2], pass[i % 4]);
        cr_assert(find_line(out, name, 0, line, sizeof line), "no '%s' row:\n%s", name, out);
        json_t *p = json_array_get(ps, (size_t)i);
        cr_assert_str_eq(json_string_value(json_object_get(p, "product")), name);
        cr_assert_str_eq(json_string_value(json_object_get(p, "epilogue")), epilogue[i % 4]);
        cr_assert_eq(jnum_of(p, "N"), sh[0]);
        cr_assert_eq(jnum_of(p, "IC"), sh[1]);
        cr_assert_eq(jnum_of(p, "OC"), sh[2]);
        cr_assert_eq(jnum_of(p, "calls_per_step"), 1.0);
        cr_assert_gt(jnum_of(p, "ms_per_call"), 0.0);
        flops += 2.0 * sh[0] * sh[1] * sh[2];
    }
    double ideal = flops / 790e12 * 1e3;
    cr_assert_float_eq(jnum_of(doc, "ceiling_ms_per_step"), ideal, 1e-8 * ideal);
    json_decref(doc);
    free(out);
    tu_rmtree(dir);
    snprintf(args, sizeof args, "gemm '%s/configs/tiny.yaml' 64x32", tu_source_root());
    expect_usage_error(0, args, "'64x32' is not a shape NxICxOC");
    snprintf(args, sizeof args, "gemm '%s/configs/tiny.yaml' 64x0x32", tu_source_root());
    expect_usage_error(0, args, "'64x0x32' is not a shape NxICxOC");
    snprintf(args, sizeof args, "gemm '%s/configs/tiny.yaml' 99999999999x2x2", tu_source_root());
    expect_usage_error(0, args, "'99999999999x2x2' is not a shape NxICxOC");
    snprintf(args, sizeof args, "gemm '%s/configs/tiny.yaml' 100000x100000x8", tu_source_root());
    expect_usage_error(0, args, "each matrix at most 2^30 elements");
}

// ---- errors

// Exit 2 and a message naming the offending value, on every rank count given.
static void expect_usage_error(int np, const char *args, const char *needle) {
    char *out = malloc(OUT_CAP);
    int rc = run_bench(out, np, args);
    cr_assert_eq(rc, 2, "--bench %s (np %d): exit %d, want 2:\n%s", args, np, rc, out);
    cr_assert(strstr(out, needle), "--bench %s: message lacks '%s':\n%s", args, needle, out);
    free(out);
}

Test(bench, bad_layer_sizes_exit_2) {
    expect_usage_error(0, "layer 0 32 128", "M='0' is not a positive integer");
    expect_usage_error(0, "layer 64 abc 128", "K='abc' is not a positive integer");
    expect_usage_error(0, "layer 64 32 1.5", "N='1.5' is not a positive integer");
    expect_usage_error(0, "layer 64 32 -5", "-5"); // taken for an option by the command line
    expect_usage_error(0, "layer 64 32", "three sizes");
    expect_usage_error(0, "allreduce 0", "'0' is not a size");
    expect_usage_error(0, "allreduce 8:4:2", "MIN:MAX:FACTOR");
    expect_usage_error(0, "warp 1 2 3", "unknown mode 'warp'");
}

Test(bench, n_not_divisible_by_ranks_exits_2_everywhere) {
    tu_require_mpiexec();
    expect_usage_error(2, "layer 64 32 3", "N=3 is not divisible by the 2 ranks");
}

// --bench attention on the CPU: shapes from arguments and from a config's tp 1, 2, 4, 8 local
// shapes, every row with its path and the JSON; bad shapes and several ranks exit 2.
Test(bench, attention_grid_from_shapes_and_configs) {
    char *out = malloc(OUT_CAP);
    char dir[256], json[512];
    tu_tmpdir(dir, sizeof dir, "bench_attention");
    snprintf(json, sizeof json, "%s/attention.json", dir);
    char args[1024];
    snprintf(args, sizeof args, "attention 2x2x16x32 1x1x64x17 configs/tiny.yaml --json '%s'", json);
    int rc = run_bench(out, 0, args);
    cr_assert_eq(rc, 0, "exit %d:\n%s", rc, out);
    char line[512];
    cr_assert(find_line(out, "   2    2   16     32", 0, line, sizeof line), "%s", out);
    cr_assert(strstr(line, "cpu (T,T)") && strstr(line, "argument"), "%s", line);
    cr_assert(find_line(out, "   1    1   64     17", 0, line, sizeof line), "%s", out);
    // tiny.yaml: 4 heads of 16, micro_batch 4, T 32: local heads 4, 2, 1 at tp 1, 2, 4 (8 does not divide)
    for (int tp = 1; tp <= 4; tp *= 2) {
        char want[64];
        snprintf(want, sizeof want, "tiny.yaml tp=%d", tp);
        cr_assert(strstr(out, want), "missing the row '%s':\n%s", want, out);
    }
    cr_assert(!strstr(out, "tiny.yaml tp=8"), "tp=8 does not divide 4 heads:\n%s", out);
    static const char *const keys[] = {"\"mode\": \"attention\"", "\"fwd_bwd_tflops\"", "\"path\"",
                                       "\"mem_gib\""};
    char *text = read_json_with(json, keys, sizeof keys / sizeof keys[0]);
    free(text);
    free(out);
    tu_rmtree(dir);
}

Test(bench, attention_bad_input_exits_2) {
    expect_usage_error(0, "attention 2x2x16", "neither a shape BxHxHSxT");
    expect_usage_error(0, "attention 2x2x16x99999999999", "neither a shape BxHxHSxT"); // overflows an int
    expect_usage_error(0, "attention 2x2x12x64", "head size 12 is not a multiple of 8");
    expect_usage_error(0, "attention configs/nonexistent.yaml", "nonexistent.yaml");
    tu_require_mpiexec();
    expect_usage_error(2, "attention 1x1x16x8", "runs as one process");
}

// A --json file that cannot be written (a full disk) fails the run instead of exiting 0 without it.
Test(bench, json_on_a_full_disk_exits_1) {
    char *out = malloc(OUT_CAP);
    int rc = run_bench(out, 0, "layer 64 32 128 --json /dev/full");
    cr_assert_eq(rc, 1, "exit %d, want 1:\n%s", rc, out);
    cr_assert(strstr(out, "--json: writing '/dev/full' failed"), "%s", out);
    rc = run_bench(out, 0, "attention 1x1x16x8 --json /dev/full");
    cr_assert_eq(rc, 1, "exit %d, want 1:\n%s", rc, out);
    cr_assert(strstr(out, "/dev/full: write failed"), "%s", out);
    free(out);
}

// A layer too large to hold is refused up front (exit 2), not left to fail an allocation (found by
// the fuzz driver: `layer 16 2147483647 64` exited 1 out of memory).
Test(bench, layer_too_large_to_hold_exits_2) {
    expect_usage_error(0, "layer 16 2147483647 64", "over the 1073741824 this mode allows");
}
