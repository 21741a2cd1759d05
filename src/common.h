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
};

// Prints "tptrain: <message>" to stderr and exits with `code`. Under MPI, callers that may fail on
// one rank only use mesh_abort() instead so that no peer hangs in a collective.
_Noreturn void tp_die(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

// Formats one line into err (err may be NULL) and returns TP_EXIT_USAGE, so input checks can
// `return tp_errf(err, errlen, "...")`.
int tp_errf(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

// malloc/calloc that die with the size and call site on failure.
void *tp_malloc_impl(size_t bytes, const char *file, int line);
void *tp_calloc_impl(size_t n, size_t size, const char *file, int line);
#define tp_malloc(bytes) tp_malloc_impl((bytes), __FILE__, __LINE__)
#define tp_calloc(n, size) tp_calloc_impl((n), (size), __FILE__, __LINE__)

// Wall clock in seconds (CLOCK_MONOTONIC).
double tp_now(void);

// Integer helpers.
static inline size_t tp_round_up(size_t x, size_t multiple) {
    return (x + multiple - 1) / multiple * multiple;
}
