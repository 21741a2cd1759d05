// common.c: error reporting, checked allocation and timing.
#define _POSIX_C_SOURCE 200809L
#include "common.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

void tp_die(int code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("tptrain: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    fflush(stderr);
    exit(code);
}

static int verrf(char *err, size_t errlen, int code, const char *fmt, va_list ap) {
    if (err && errlen) {
        vsnprintf(err, errlen, fmt, ap);
        for (char *c = err; *c; c++)
            if (*c == '\n' || *c == '\r') *c = ' ';
    }
    return code;
}

int tp_errf(char *err, size_t errlen, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int code = verrf(err, errlen, TP_EXIT_USAGE, fmt, ap);
    va_end(ap);
    return code;
}

int tp_errf_code(char *err, size_t errlen, int code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    verrf(err, errlen, code, fmt, ap);
    va_end(ap);
    return code;
}

void *tp_malloc_impl(size_t bytes, const char *file, int line) {
    void *p = malloc(bytes ? bytes : 1);
    if (!p) tp_die(TP_EXIT_RUNTIME, "%s:%d: out of host memory allocating %zu bytes", file, line, bytes);
    return p;
}

void *tp_calloc_impl(size_t n, size_t size, const char *file, int line) {
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (!p) tp_die(TP_EXIT_RUNTIME, "%s:%d: out of host memory allocating %zu x %zu bytes", file, line, n, size);
    return p;
}

double tp_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

double tp_process_age(void) {
#ifdef CLOCK_BOOTTIME
    // field 22 of /proc/self/stat: the start time in clock ticks since boot; the fields count
    // from after the command name's closing parenthesis (the name may hold spaces)
    char buf[1024];
    FILE *f = fopen("/proc/self/stat", "r");
    if (!f) return -1.0;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    char *p = strrchr(buf, ')');
    unsigned long long start = 0;
    int field = 2;
    for (; p && *p && field < 22; p++)
        if (*p == ' ') field++;
    long hz = sysconf(_SC_CLK_TCK);
    struct timespec ts;
    if (!p || sscanf(p, "%llu", &start) != 1 || hz <= 0 || clock_gettime(CLOCK_BOOTTIME, &ts)) return -1.0;
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec - (double)start / (double)hz;
#else
    return -1.0;
#endif
}
