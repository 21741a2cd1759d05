// bench_impl.h: what the --bench driver (bench.c) shares with the mode files (bench_*.c).
//
// A mode is one file defining a `const struct bench_mode` and one line in bench.c's mode table.
// The driver parses the command line, builds the config, the mesh (one TP group of every rank,
// dp = 1), the backend, the clock and the JSON file, then calls the mode's run; modes time their
// work with bench_time_phase, report with the output helpers and never touch MPI.
#pragma once

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "backend.h"
#include "bench.h"
#include "comm.h"
#include "config.h"
#include "mesh.h"

// ---- modes

struct bench;

struct bench_mode {
    const char *name;       // the word after --bench
    const char *synopsis;   // its arguments, for the usage text ("layer M K N")
    // Checks o->argv[1..] on every rank (all reach the same verdict; rank 0 explains) and returns
    // what run needs in *args (freed by the driver). world: the number of ranks (the TP size).
    int (*parse)(const struct bench_opts *o, bool root, int world, void **args);
    // (optional) the config file the mode's model comes from; NULL: the built-in default
    const char *(*config_path)(const void *args);
    // Runs on the common setup; returns the exit code.
    int (*run)(struct bench *b, void *args);
    // (optional) runs the whole mode instead of parse and run, without the common setup
    int (*standalone)(const struct bench_opts *o, int world_rank, int world_size);
};

extern const struct bench_mode bench_mode_layer;      // bench_layer.c
extern const struct bench_mode bench_mode_allreduce;  // bench_allreduce.c
extern const struct bench_mode bench_mode_model;      // bench_model.c
extern const struct bench_mode bench_mode_attention;  // bench_attention.c
extern const struct bench_mode bench_mode_gemm;       // bench_gemm.c

// ---- clock

// Marks in time, in order: mark 0 starts an iteration, the last one ends it, and the pairs in
// between bracket collectives. Backend events where the backend has them (stream time, no host
// wait), else the host clock after synchronize.
struct bench_clock {
    struct backend be;
    bool events;
    void **ev;      // (cap) backend events, when events
    double *host;   // (cap) seconds, otherwise
    int n, cap;
    // the collectives bracketed since the iteration began, by kind
    int coll_count[4];      // indexed by enum bench_coll
    double coll_bytes[4];   // bytes as nccl-tests counts them
    double bus_bytes;       // sum of bytes * the kind's bus factor
};

// The collectives a timed phase may issue.
enum bench_coll { BENCH_ALL_REDUCE = 0, BENCH_ALL_GATHER, BENCH_REDUCE_SCATTER, BENCH_BROADCAST };
extern const char *const bench_coll_names[4]; // "all_reduce", ...

// Records a mark and returns its index; c may be NULL (an untimed run).
int bench_clock_mark(struct bench_clock *c);
double bench_clock_ms(const struct bench_clock *c, int from, int to);

// ---- statistics

struct bench_stats {
    double median, min, max, p10, p90; // ms
};
struct bench_stats bench_stats_of(const double *x, int n);

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

// Fills n compute-type elements of backend memory with uniform values in [-scale, scale), a pure
// function of seed (rounded to bf16 on the bf16 path).
void bench_fill_uniform(struct backend be, void *dst, size_t n, float scale, uint64_t seed);
float *bench_alloc_floats(struct bench *b, size_t n);
void *bench_alloc_compute(struct bench *b, size_t n); // n elements of the backend's compute type

// A positive int (the backend ops take int sizes).
bool bench_parse_dim(const char *s, int *out);

// n positive ints separated by 'x' ("16x12x64x1024"), each as bench_parse_dim takes it.
bool bench_parse_dims(const char *s, int n, int *out);

// For modes that take one config file ("model CONFIG.yaml"): checks there is exactly one, and
// keeps its path in *args (rank 0 explains a wrong count); bench_config_arg gives it back, as the
// mode's config_path.
int bench_parse_config_arg(const struct bench_opts *o, bool root, const char *mode, void **args);
const char *bench_config_arg(const void *args);

// ---- phase driver

// One timed phase: run() issues its ops once, its collectives through a bench_timed_tp comm;
// prepare() (optional) restores its inputs, untimed, before every iteration.
struct bench_phase {
    const char *name;   // JSON key, e.g. "column_fwd"
    const char *label;  // table row
    void (*run)(void *arg, struct bench_clock *c);
    void (*prepare)(void *arg);
};

struct bench_phase_times {
    int warmup, iters;
    struct bench_stats ms;  // the whole phase per iteration, slowest rank
    double comm_ms;         // median over iterations of its collectives' time, slowest rank
    int n_comm;             // collectives issued per iteration (0 at one rank: they are no-ops)
    int coll_count[4];      // of which each kind (enum bench_coll)
    double coll_bytes;      // bytes they move per iteration (nccl-tests' sizes)
    double bus_bytes;       // the same weighted by each kind's bus factor
};

// A TP comm that marks the clock around every collective, so that the phases' own code (the
// model's blocks, tp.h's layers) runs unchanged while communication is timed separately.
struct bench_timing_comm {
    struct comm *inner;
    struct bench_clock *clock;
};

// The TP comm for one timed phase. At one rank the collectives issue nothing, so nothing is
// marked and no communication cost is reported.
struct comm bench_timed_tp(struct bench *b, struct bench_timing_comm *t, struct bench_clock *c);
// Starts every rank together on an idle device so no rank's lateness counts as communication.
void bench_align_ranks(struct bench *b);
// Warm-up, then timed iterations: a fixed count, or (target_ms > 0) enough to run about
// target_ms (min_iters..max_iters), judged from the warm-up. Per iteration the slowest rank counts.
void bench_time_phase(struct bench *b, const struct bench_phase *ps, void *arg, int warmup, int iters,
                      double target_ms, int min_iters, int max_iters, struct bench_phase_times *out);

// ---- ceilings

// The matrix rate and memory bandwidth a report sets its phases against.
struct bench_ceilings {
    double matrix_tflops, memory_gbs;
    char how[160];          // what measured them, or where they came from
};

// TPTRAIN_BENCH_CEILINGS="TFLOPS,GBS" (e.g. "790,4300") when set, else measured: one large
// product through the backend's matmul and one large device copy, each timed as a phase. Call it
// before allocating the model, so the probes have the memory. Returns 0, or TP_EXIT_USAGE for a
// malformed variable (rank 0 says why).
int bench_ceilings(struct bench *b, struct bench_ceilings *k);

// ---- output

// Formats v with fmt, or "n/a" when v is not a number (NAN marks "not applicable").
const char *bench_fmt(char *buf, size_t len, const char *fmt, double v);
// obj[key] = number (null for n/a; whole numbers as integers).
void bench_json_kv(json_t *obj, const char *key, double v);
// {"all_reduce": n, ...}: the collectives of one phase by kind.
json_t *bench_json_collectives(const struct bench_phase_times *t);
// Writes the document (steals it) to the --json file, compact, one line.
void bench_json_emit(const struct bench *b, json_t *doc);
// The lines / fields every mode's report opens with.
void bench_print_setup(const struct bench *b, const char *mode);
json_t *bench_json_setup(const struct bench *b, const char *mode);
// nccl-tests' bus bandwidth factor of a ring all-reduce on P ranks, 2(P-1)/P.
double bench_bus_factor(int P);
