// test_torch_parity.c: tptrain against an independent float64 PyTorch implementation of the same
// model and optimiser. tests/data/torch_reference.json was made by tests/make_torch_reference.sh
// from tptrain's initial weights on tests/data/torch_parity.yaml; this test retrains from the
// same seed and compares the first step's loss, every tensor's gradient norm at step 1, and the
// losses, learning rates and global gradient norms of all steps.
#include <criterion/criterion.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"

#define MAX_STEPS 64
#define MAX_TENSORS 128

// ---- a few JSON reads (the files are small and written by known code; no JSON library)

static char *slurp(const char *path) {
    FILE *f = fopen(path, "rb");
    cr_assert_not_null(f, "cannot open %s", path);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *s = malloc((size_t)n + 1);
    cr_assert_not_null(s);
    cr_assert_eq(fread(s, 1, (size_t)n, f), (size_t)n);
    s[n] = '\0';
    fclose(f);
    return s;
}

// Position of the value of the first `"key":` whose value starts with `open` ('[', '{', or 0
// for any), searching from `from`; NULL if absent. ("lr" is both a scalar in "args" and an array.)
static const char *value_of(const char *from, const char *key, char open) {
    char pat[160];
    snprintf(pat, sizeof pat, "\"%.150s\":", key);
    for (const char *p = from; (p = strstr(p, pat)); ) {
        p += strlen(pat);
        while (*p == ' ' || *p == '\n') p++;
        if (!open || *p == open) return p;
    }
    return NULL;
}

static const char *after_key(const char *from, const char *key) { return value_of(from, key, 0); }

// Reads the array of numbers of `"key": [ ... ]`; returns its length.
static int read_array(const char *json, const char *key, double *out, int max) {
    const char *p = value_of(json, key, '[');
    cr_assert(p, "no array \"%s\" in the reference", key);
    p++;
    int n = 0;
    for (;;) {
        while (*p == ' ' || *p == '\n' || *p == ',') p++;
        if (*p == ']') break;
        char *end;
        double v = strtod(p, &end);
        cr_assert(end != p, "bad number in \"%s\" at '%.20s'", key, p);
        cr_assert_lt(n, max);
        out[n++] = v;
        p = end;
    }
    return n;
}

// Reads every `"name": number` pair of the flat object `"key": { ... }`.
struct named {
    char name[64];
    double value;
};
static int read_object(const char *json, const char *key, struct named *out, int max) {
    const char *p = value_of(json, key, '{');
    cr_assert(p, "no object \"%s\"", key);
    const char *end = strchr(p, '}');
    cr_assert_not_null(end);
    int n = 0;
    for (p++; p < end;) {
        const char *q = strchr(p, '"');
        if (!q || q > end) break;
        const char *qe = strchr(q + 1, '"');
        cr_assert(qe && qe < end);
        cr_assert_lt(n, max);
        snprintf(out[n].name, sizeof out[n].name, "%.*s", (int)(qe - q - 1), q + 1);
        const char *v = qe + 1;
        while (*v == ':' || *v == ' ') v++;
        char *ve;
        out[n].value = strtod(v, &ve);
        cr_assert(ve != v, "bad number for %s", out[n].name);
        n++;
        p = ve;
    }
    return n;
}

// A numeric field of every {"kind":"train"} record of tptrain's JSON-lines log.
static int read_log_field(const char *path, const char *field, double *out, int max) {
    FILE *f = fopen(path, "r");
    cr_assert_not_null(f, "no log %s", path);
    static char line[1 << 16];
    int n = 0;
    while (n < max && fgets(line, sizeof line, f)) {
        if (!strstr(line, "\"kind\":\"train\"")) continue;
        const char *p = after_key(line, field);
        cr_assert_not_null(p, "no %s in %s", field, line);
        out[n++] = strtod(p, NULL);
    }
    fclose(f);
    return n;
}

// The line of the log holding the step-1 per-tensor gradient norms.
static char *grad_norms_record(const char *path) {
    FILE *f = fopen(path, "r");
    cr_assert_not_null(f);
    static char line[1 << 16];
    char *found = NULL;
    while (!found && fgets(line, sizeof line, f))
        if (strstr(line, "\"kind\":\"grad_norms\"")) found = strdup(line);
    fclose(f);
    cr_assert_not_null(found, "no grad_norms record in %s (debug.grad_norms=true)", path);
    return found;
}

// Asserts |a - b| <= tol * |ref| and returns the relative difference.
static double check_rel(double got, double ref, double tol, const char *what, int index) {
    double r = tu_rel(got, ref);
    cr_expect(r <= tol, "%s[%d]: tptrain %.10g, reference %.10g (rel %.2e > %.0e)", what, index, got, ref, r, tol);
    return r;
}

// ---- the test

Test(torch_parity, matches_float64_reference) {
    char path[2048], dir[512], log[1024];
    snprintf(path, sizeof path, "%s/tests/data/torch_reference.json", tu_source_root());
    char *ref = slurp(path);
    tu_tmpdir(dir, sizeof dir, "torch");
    snprintf(log, sizeof log, "%s/log.jsonl", dir);

    char *out = malloc(1 << 16);
    int rc = tu_run(out, 1 << 16,
                    "cd '%s' && timeout 300 '%s' tests/data/torch_parity.yaml --set parallel.device=cpu "
                    "--set debug.grad_norms=true --set log.jsonl='%s'",
                    tu_source_root(), tu_tptrain(), log);
    cr_assert_eq(rc, 0, "tptrain failed (%d):\n%s", rc, out);

    double ref_loss[MAX_STEPS], ref_norm[MAX_STEPS], ref_lr[MAX_STEPS];
    int steps = read_array(ref, "losses", ref_loss, MAX_STEPS);
    cr_assert_eq(read_array(ref, "grad_norm", ref_norm, MAX_STEPS), steps);
    cr_assert_eq(read_array(ref, "lr", ref_lr, MAX_STEPS), steps);
    cr_assert_eq(steps, 10, "the reference holds %d steps; torch_parity.yaml trains 10", steps);

    double loss[MAX_STEPS], norm[MAX_STEPS], lr[MAX_STEPS];
    cr_assert_eq(read_log_field(log, "loss", loss, MAX_STEPS), steps);
    cr_assert_eq(read_log_field(log, "grad_norm", norm, MAX_STEPS), steps);
    cr_assert_eq(read_log_field(log, "lr", lr, MAX_STEPS), steps);

    // step 1's loss is the loss of the initial weights: same weights, same data, same math
    double r0 = check_rel(loss[0], ref_loss[0], 1e-5, "step-1 loss", 0);

    // per-tensor gradient norms of step 1, every tensor of the model, same names
    struct named rn[MAX_TENSORS];
    int nt = read_object(ref, "grad_norms_step0", rn, MAX_TENSORS);
    char *rec = grad_norms_record(log);
    struct named gn[MAX_TENSORS];
    int ng = read_object(rec, "norms", gn, MAX_TENSORS);
    cr_assert_eq(ng, nt, "tptrain logged %d tensors, the reference %d", ng, nt);
    cr_assert_eq(nt, 2 + 12 * 2 + 2, "a 2-layer GPT-2 has 28 tensors, the reference lists %d", nt);
    double worst_tensor = 0.0;
    const char *worst_name = "";
    for (int i = 0; i < nt; i++) {
        const char *p = after_key(rec, rn[i].name);
        cr_assert_not_null(p, "tptrain logged no gradient norm for %s", rn[i].name);
        double r = check_rel(strtod(p, NULL), rn[i].value, 1e-4, rn[i].name, 1);
        if (r > worst_tensor) {
            worst_tensor = r;
            worst_name = rn[i].name;
        }
    }

    // the whole run: losses, the schedule, and the global norm that clipping used
    double worst_loss = 0.0, worst_norm = 0.0, worst_lr = 0.0;
    for (int i = 0; i < steps; i++) {
        worst_loss = fmax(worst_loss, check_rel(loss[i], ref_loss[i], 1e-4, "loss", i + 1));
        worst_norm = fmax(worst_norm, check_rel(norm[i], ref_norm[i], 1e-3, "grad_norm", i + 1));
        worst_lr = fmax(worst_lr, check_rel(lr[i], ref_lr[i], 1e-6, "lr", i + 1));
    }
    // the reference must have trained: otherwise matching it proves little
    cr_assert(ref_loss[steps - 1] < ref_loss[0] - 0.5, "reference losses %.4f -> %.4f", ref_loss[0], ref_loss[steps - 1]);
    cr_assert(ref_norm[0] > 1.0, "step 1's norm %.3f does not reach grad_clip=1: clipping goes untested", ref_norm[0]);
    cr_log_info("max relative differences vs float64 PyTorch: step-1 loss %.2e, per-tensor grad norm %.2e (%s), "
                "losses %.2e, global grad norms %.2e, lr %.2e",
                r0, worst_tensor, worst_name, worst_loss, worst_norm, worst_lr);

    free(rec);
    free(out);
    free(ref);
    tu_rmtree(dir);
}
