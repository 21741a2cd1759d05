// testutil.h: helpers shared by the Criterion suites: temp dirs, running the binary, reading logs.
#pragma once

#include <stdint.h>

#include <stddef.h>

// A fresh directory under $TMPDIR (or /tmp); removed by the caller with tu_rmtree if wanted.
void tu_tmpdir(char *out, size_t outlen, const char *tag);
void tu_rmtree(const char *path);
// Writes text to dir/name and returns the full path in out.
void tu_write_file(char *out, size_t outlen, const char *dir, const char *name, const char *text);
// Runs a shell command, captures stdout+stderr (truncated to outlen) and returns the exit status
// (or -1 if it could not run, 128+signal if killed).
int tu_run(char *out, size_t outlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
// Path of the built tptrain binary ($TPTRAIN), of the source root and of mpiexec ("" if none).
const char *tu_tptrain(void);
const char *tu_source_root(void);
const char *tu_mpiexec(void);
// Extra mpiexec flags: Open MPI refuses more ranks than cores unless told (--oversubscribe);
// MPICH needs nothing.
const char *tu_mpiexec_flags(void);
// Skips the calling Criterion test, visibly, when no mpiexec was found at configure time.
void tu_require_mpiexec(void);
// main() for the GPU suites: Criterion's own run, then exit 77 (meson: SKIP) when there is no CUDA
// device, so a CPU-only run never shows a GPU suite as a quiet pass. The device is queried only
// after every test has run: initialising CUDA in this parent process before the test workers are
// forked would break CUDA in the workers.
int tu_gpu_suite_main(int argc, char *argv[], const char *suite);
// Reads the "loss" field of every "train" record of a JSON-lines log, in order; returns count.
int tu_read_losses(const char *jsonl_path, double *losses, int max);
// Relative difference |a - b| / max(|a|, |b|, tiny).
double tu_rel(double a, double b);
// Counter-based random numbers for test inputs: the next 64 bits of the stream at *s (splitmix64),
// and a standard normal drawn from it (Box-Muller).
uint64_t tu_rng_next(uint64_t *s);
float tu_rng_normal(uint64_t *s);
