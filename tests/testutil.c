// testutil.c: see testutil.h.
#include "testutil.h"

#include <criterion/criterion.h>

#include "backend.h"
#include "common.h"

#include <math.h>
#include <stdbool.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

void tu_tmpdir(char *out, size_t outlen, const char *tag) {
    const char *base = getenv("TMPDIR");
    if (!base || !*base) base = "/tmp";
    snprintf(out, outlen, "%s/tptrain-%s-XXXXXX", base, tag);
    if (!mkdtemp(out)) {
        perror("mkdtemp");
        abort();
    }
}

void tu_rmtree(const char *path) {
    char cmd[2048];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", path);
    if (system(cmd) != 0) fprintf(stderr, "warning: could not remove %s\n", path);
}

void tu_write_file(char *out, size_t outlen, const char *dir, const char *name, const char *text) {
    snprintf(out, outlen, "%s/%s", dir, name);
    FILE *f = fopen(out, "w");
    if (!f) {
        perror(out);
        abort();
    }
    fputs(text, f);
    fclose(f);
}

int tu_run(char *out, size_t outlen, const char *fmt, ...) {
    char cmd[8192];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    char full[8300];
    snprintf(full, sizeof full, "(%s) 2>&1", cmd);
    FILE *p = popen(full, "r");
    if (!p) return -1;
    size_t used = 0;
    if (out && outlen) out[0] = '\0';
    char buf[4096];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, p)) > 0) {
        if (out && used + 1 < outlen) {
            size_t take = n < outlen - 1 - used ? n : outlen - 1 - used;
            memcpy(out + used, buf, take);
            used += take;
            out[used] = '\0';
        }
    }
    int st = pclose(p);
    if (st == -1) return -1;
    if (WIFEXITED(st)) return WEXITSTATUS(st);
    if (WIFSIGNALED(st)) return 128 + WTERMSIG(st);
    return -1;
}

static const char *env_or(const char *name, const char *fallback) {
    const char *v = getenv(name);
    return v && *v ? v : fallback;
}

const char *tu_tptrain(void) { return env_or("TPTRAIN", "./tptrain"); }
const char *tu_source_root(void) { return env_or("TP_SOURCE_ROOT", "."); }
const char *tu_mpiexec(void) { return env_or("TP_MPIEXEC", ""); }

const char *tu_mpiexec_flags(void) {
    static char flags[64];
    static bool known = false;
    if (!known) {
        char out[4096];
        tu_run(out, sizeof out, "'%s' --version", tu_mpiexec());
        snprintf(flags, sizeof flags, "%s", strstr(out, "Open MPI") || strstr(out, "OpenRTE") ? "--oversubscribe" : "");
        known = true;
    }
    return flags;
}

void tu_require_mpiexec(void) {
    if (!tu_mpiexec()[0]) cr_skip_test("no mpiexec was found at configure time: multi-rank cases skipped");
}

int tu_gpu_suite_main(int argc, char *argv[], const char *suite) {
    struct criterion_test_set *tests = criterion_initialize();
    int result = 0;
    if (criterion_handle_args(argc, argv, true)) result = !criterion_run_all_tests(tests);
    criterion_finalize(tests);
    if (result == 0 && backend_cuda_device_count() <= 0) {
        fprintf(stderr, "%s: no CUDA device: GPU cases skipped, reporting SKIP (77)\n", suite);
        return 77;
    }
    return result;
}

int tu_read_losses(const char *jsonl_path, double *losses, int max) {
    FILE *f = fopen(jsonl_path, "r");
    if (!f) return 0;
    char line[4096];
    int n = 0;
    while (n < max && fgets(line, sizeof line, f)) {
        if (!strstr(line, "\"kind\":\"train\"")) continue;
        const char *p = strstr(line, "\"loss\":");
        if (!p) continue;
        losses[n++] = strtod(p + 7, NULL);
    }
    fclose(f);
    return n;
}

double tu_rel(double a, double b) {
    double d = fabs(a - b);
    double s = fmax(fmax(fabs(a), fabs(b)), 1e-30);
    return d / s;
}

uint64_t tu_rng_next(uint64_t *s) {
    uint64_t x = *s;
    *s += 0x9e3779b97f4a7c15ull;
    return tp_splitmix64(x); // mixes x + the same constant: the splitmix64 stream
}

float tu_rng_normal(uint64_t *s) {
    double u1 = ((double)(tu_rng_next(s) >> 11) + 0.5) * 0x1.0p-53; // (0, 1)
    double u2 = (double)(tu_rng_next(s) >> 11) * 0x1.0p-53;         // [0, 1)
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}
