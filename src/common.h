// common.h: error reporting, checked allocation and small helpers shared by every module.
// Exit codes are part of the CLI contract: 0 success, 2 usage/config/input error, 1 runtime failure.
#pragma once

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#define TP_VERSION "0.1.0"

enum tp_exit {
    TP_EXIT_OK = 0,
    TP_EXIT_RUNTIME = 1,
    TP_EXIT_USAGE = 2,
    TP_EXIT_PREEMPTED = 3, // SIGTERM / SIGUSR1: stopped at a step boundary, checkpoint saved
};

// Prints "tptrain: <message>" to stderr and exits with `code`. Under MPI, callers that may fail on
// one rank only use mesh_abort() instead so that no peer hangs in a collective.
_Noreturn void tp_die(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

// Formats one line into err (err may be NULL; line breaks from names are folded into spaces) and
// returns TP_EXIT_USAGE, so input checks can `return tp_errf(err, errlen, "...")`.
int tp_errf(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
// The same, returning `code` (e.g. TP_EXIT_RUNTIME for I/O failures).
int tp_errf_code(char *err, size_t errlen, int code, const char *fmt, ...) __attribute__((format(printf, 4, 5)));

// malloc/calloc that die with the size and call site on failure.
void *tp_malloc_impl(size_t bytes, const char *file, int line);
void *tp_calloc_impl(size_t n, size_t size, const char *file, int line);
#define tp_malloc(bytes) tp_malloc_impl((bytes), __FILE__, __LINE__)
#define tp_calloc(n, size) tp_calloc_impl((n), (size), __FILE__, __LINE__)

// Wall clock in seconds (CLOCK_MONOTONIC).
double tp_now(void);
// Seconds since this process was started (the loader and library start-up included; Linux's
// /proc/self/stat, 10 ms resolution), or -1 where that cannot be read.
double tp_process_age(void);

// splitmix64's finaliser: a well-mixed 64-bit hash of x (counter-based random numbers).
static inline uint64_t tp_splitmix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

// 64-bit FNV-1a of n bytes (names, replica fingerprints).
static inline uint64_t tp_fnv1a(const void *data, size_t n) {
    const unsigned char *c = (const unsigned char *)data; // cast: also included from CUDA C++
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) h = (h ^ c[i]) * 0x100000001b3ull;
    return h;
}

// Integer helpers.
static inline size_t tp_round_up(size_t x, size_t multiple) {
    return (x + multiple - 1) / multiple * multiple;
}
