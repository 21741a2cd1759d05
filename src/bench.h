// bench.h: --bench: the entry point and the helpers the tests reach. The driver and one file per
// mode live in src/bench/ (bench_impl.h is what they share).
#pragma once

#include <stdbool.h>
#include <stddef.h>

struct bench_opts {
    int argc;                   // the positional arguments after --bench: "layer M K N", ...
    char **argv;
    const char *json_path;      // --json FILE (NULL = none)
    const char *const *sets;    // --set overrides (e.g. train.precision, parallel.comm)
    int n_sets;
};

// Runs under MPI (already initialised) on every rank; returns the exit code.
// The environment variable TPTRAIN_BENCH_ITERS="N" or "W+N" fixes the timed iterations (N) and
// the warm-up ones (W) of every timed phase, in place of the per-mode defaults.
int bench_run(const struct bench_opts *o);

// Matmul FLOPs per rank of each `--bench layer M K N` phase over P ranks (M tokens, width K,
// hidden width N, N/P per rank). A forward (M, K) x (K, N/P) matmul costs 2*M*K*N/P; its backward
// twice that (input and weight gradients). Bias, GELU and all-reduce work is not counted.
struct bench_layer_flops {
    double column_fwd, column_bwd;  // K -> N/P
    double row_fwd, row_bwd;        // N/P -> K
    double mlp_fwd, mlp_bwd;        // column, GELU, row
};
struct bench_layer_flops bench_layer_flops(long M, long K, long N, int P);

// What one `--bench model` phase must do, per micro-step on one TP rank (the optimizer: per step):
// its model FLOPs and the bytes its ops must move at least (bench_model.c says how both are
// counted), and at given ceilings the time they take.
struct bench_model_cost {
    const char *name;              // the phase's JSON name, in the table's order
    double flops, bytes;
    double matrix_ms, memory_ms;   // FLOPs at the matrix rate, bytes at the bandwidth, each summed over its ops
    double ideal_ms;               // the sum over its ops of the larger of the two
};
#define BENCH_MODEL_PHASES 8
struct model_dims;
struct backend;
// Fills out[BENCH_MODEL_PHASES] for a model of dims d (d->P ranks) on backend be (its compute
// type, its attention's saved floats, whether it has xent_fused), at matrix_tflops and
// memory_gbs (0: FLOPs and bytes only, times 0).
void bench_model_costs(const struct model_dims *d, const struct backend *be, double matrix_tflops,
                       double memory_gbs, struct bench_model_cost *out);

// Parses a byte count as all_reduce_perf takes it: digits with an optional K, M or G suffix
// (binary multiples, either case). False for anything else, for 0 and on overflow.
bool bench_parse_size(const char *s, size_t *out);
