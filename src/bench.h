// bench.h: --bench mode: column/row-parallel layer, all-reduce and whole-step benchmarks.
#pragma once

struct bench_opts {
    int argc;                   // the positional arguments after --bench: "layer M K N", ...
    char **argv;
    const char *json_path;      // --json FILE (NULL = none)
    const char *const *sets;    // --set overrides (e.g. train.precision, parallel.comm)
    int n_sets;
};

// Runs under MPI (already initialised) on every rank; returns the exit code.
int bench_run(const struct bench_opts *o);
