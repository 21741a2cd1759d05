// test_ckpt.c: checkpoints end to end through the tptrain binary: every tensor round-trips,
// resume is bitwise exact on the CPU backend, checkpoints reshard across TP and DP sizes, broken
// checkpoints fail with one line and exit 2, a SIGKILL during a save leaves `latest` loadable,
// --eval reproduces the logged validation loss, generation with the KV cache matches a PyTorch
// full-forward reference, and the files parse with independent readers.
//
// Runs use a 2-layer model over a 512-token vocabulary and shards generated here, so the suite
// takes a minute or two on 2 cores.
#include <criterion/criterion.h>

#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ckpt.h"
#include "common.h"
#include "data.h"
#include "safetensors.h"
#include "testutil.h"

// ---- fixture: shards, a config, helpers to run the binary

static char g_dir[1024];  // per-test scratch directory
static char g_cfg[1200];  // its config.yaml
static char g_out[65536]; // output of the last command

static const char *config_text =
    "model:\n  n_layer: 2\n  n_head: 4\n  n_embd: 32\n  vocab_size: 512\n  seq_len: 16\n"
    "train:\n  micro_batch: 2\n  grad_accum: 2\n  steps: 8\n  lr: 3e-3\n  warmup_steps: 2\n"
    "data:\n  train: %s/train.bin\n  val: %s/val.bin\n"
    "eval:\n  every: 4\n  batches: 2\n"
    "log:\n  every: 1\n"
    "checkpoint:\n  every: 4\n  keep: 0\n";

// A token stream with some structure (so training moves) and every id below 512.
static void write_tokens(const char *path, size_t n, uint32_t seed) {
    uint16_t *t = malloc(n * sizeof *t);
    uint32_t x = seed * 2654435761u + 1;
    for (size_t i = 0; i < n; i += 4) {
        x = x * 1664525u + 1013904223u;
        uint16_t a = (uint16_t)((x >> 8) % 512);
        uint16_t w[4] = {a, (uint16_t)(a * 7 % 512), (uint16_t)((a * 13 + 1) % 512), (uint16_t)((a + 5) % 512)};
        for (size_t k = 0; k < 4 && i + k < n; k++) t[i + k] = w[k];
    }
    cr_assert_eq(data_write_shard(path, t, n), 0, "cannot write %s", path);
    free(t);
}

static void setup(void) {
    tu_tmpdir(g_dir, sizeof g_dir, "ckpt");
    char p[1200], text[4096];
    snprintf(p, sizeof p, "%s/train.bin", g_dir);
    write_tokens(p, 20000, 1);
    snprintf(p, sizeof p, "%s/val.bin", g_dir);
    write_tokens(p, 4000, 2);
    snprintf(text, sizeof text, config_text, g_dir, g_dir);
    tu_write_file(g_cfg, sizeof g_cfg, g_dir, "cfg.yaml", text);
}

static void teardown(void) { tu_rmtree(g_dir); }

TestSuite(ckpt, .init = setup, .fini = teardown, .timeout = 300);

static bool have_mpiexec(void) { return tu_mpiexec()[0] != '\0'; }

// Runs tptrain on np ranks (np = 1: no launcher) with the given arguments; output in g_out.
__attribute__((format(printf, 2, 3))) static int tpt(int np, const char *fmt, ...) {
    char args[6000];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(args, sizeof args, fmt, ap);
    va_end(ap);
    if (np == 1) return tu_run(g_out, sizeof g_out, "cd '%s' && '%s' %s", tu_source_root(), tu_tptrain(), args);
    return tu_run(g_out, sizeof g_out, "cd '%s' && '%s' -np %d '%s' %s", tu_source_root(), tu_mpiexec(), np,
                  tu_tptrain(), args);
}

// Trains with the fixture config: checkpoints into DIR/<ck>, log into DIR/<ck>.jsonl.
__attribute__((format(printf, 3, 4))) static void train(int np, const char *ck, const char *fmt, ...) {
    char extra[4000];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(extra, sizeof extra, fmt, ap);
    va_end(ap);
    int rc = tpt(np, "'%s' --set checkpoint.dir=%s/%s --set log.jsonl=%s/%s.jsonl %s", g_cfg, g_dir, ck, g_dir, ck,
                 extra);
    cr_assert_eq(rc, 0, "training (%s, %d ranks) failed:\n%s", ck, np, g_out);
}

static void path_in(char *out, size_t len, const char *rel) { snprintf(out, len, "%s/%s", g_dir, rel); }

static int losses_of(const char *ck, double *losses, int max) {
    char p[1200];
    snprintf(p, sizeof p, "%s/%s.jsonl", g_dir, ck);
    return tu_read_losses(p, losses, max);
}

// Whole file contents (caller frees); *n bytes.
static unsigned char *slurp(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    cr_assert(f, "cannot open %s", path);
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *b = malloc((size_t)len + 1);
    cr_assert_eq(fread(b, 1, (size_t)len, f), (size_t)len);
    fclose(f);
    b[len] = 0;
    *n = (size_t)len;
    return b;
}

static void spit(const char *path, const void *data, size_t n) {
    FILE *f = fopen(path, "wb");
    cr_assert(f, "cannot create %s", path);
    cr_assert_eq(fwrite(data, 1, n, f), n);
    fclose(f);
}

static bool files_equal(const char *a, const char *b) {
    size_t na, nb;
    unsigned char *x = slurp(a, &na), *y = slurp(b, &nb);
    bool eq = na == nb && memcmp(x, y, na) == 0;
    free(x);
    free(y);
    return eq;
}

// Every tensor of file a is in b with the same dtype, shape and bytes, and vice versa.
static void assert_same_tensors(const char *a, const char *b) {
    struct st_file fa, fb;
    char err[512];
    cr_assert_eq(st_open(&fa, a, err, sizeof err), 0, "%s", err);
    cr_assert_eq(st_open(&fb, b, err, sizeof err), 0, "%s", err);
    cr_assert_eq(fa.n_tensors, fb.n_tensors, "%s has %d tensors, %s %d", a, fa.n_tensors, b, fb.n_tensors);
    for (int i = 0; i < fa.n_tensors; i++) {
        const struct st_tensor *x = &fa.tensors[i], *y = st_find(&fb, x->name);
        cr_assert(y, "tensor %s of %s missing in %s", x->name, a, b);
        cr_assert_eq(x->dtype, y->dtype, "%s dtype", x->name);
        cr_assert_eq(x->ndim, y->ndim, "%s ndim", x->name);
        for (int d = 0; d < x->ndim; d++) cr_assert_eq(x->shape[d], y->shape[d], "%s shape", x->name);
        cr_assert(memcmp(x->data, y->data, x->end - x->begin) == 0, "tensor %s differs between %s and %s", x->name,
                  a, b);
    }
    st_close(&fa);
    st_close(&fb);
}

// A listing of every file under dir with its checksum: equal listings = untouched directory.
static void dir_fingerprint(const char *dir, char *out, size_t len) {
    tu_run(out, len, "cd '%s' && find . -type f | LC_ALL=C sort | xargs cksum", dir);
}

// The failure contract: exit 2 and one line of error. With one rank nothing else may be printed;
// under mpiexec the launcher adds its own banner and a shared GPU a notice, so there the rule is
// exactly one "tptrain: " line that is not a notice.
static void assert_one_line_error_np(int rc, int np, const char *must1, const char *must2) {
    cr_assert_eq(rc, 2, "expected exit 2, got %d:\n%s", rc, g_out);
    size_t len = strlen(g_out);
    if (np == 1)
        cr_assert(len > 0 && g_out[len - 1] == '\n' && strchr(g_out, '\n') == g_out + len - 1,
                  "expected exactly one line of output, got:\n%s", g_out);
    int errors = 0;
    const char *line = NULL;
    for (const char *p = g_out; *p; p = strchr(p, '\n') ? strchr(p, '\n') + 1 : p + strlen(p))
        if (strncmp(p, "tptrain: ", 9) == 0 && strncmp(p, "tptrain: notice:", 16) != 0) {
            errors++;
            line = p;
        }
    cr_assert_eq(errors, 1, "expected one 'tptrain: ' error line, got %d:\n%s", errors, g_out);
    size_t ll = strcspn(line, "\n");
    char msg[4096];
    snprintf(msg, sizeof msg, "%.*s", (int)(ll < sizeof msg - 1 ? ll : sizeof msg - 1), line);
    if (must1) cr_assert(strstr(msg, must1), "message should name '%s': %s", must1, msg);
    if (must2) cr_assert(strstr(msg, must2), "message should name '%s': %s", must2, msg);
}

static void assert_one_line_error(int rc, const char *must1, const char *must2) {
    assert_one_line_error_np(rc, 1, must1, must2);
}

// ---- round trips

// Weights saved at one TP size and loaded at another come back bitwise: init.from a checkpoint,
// dumped again with debug.dump_init; and a resume that trains nothing re-saves identical files.
Test(ckpt, round_trip_every_tensor) {
    train(1, "a", "--set train.steps=4");
    char saved[1200], dump1[1200], dump2[1200];
    path_in(saved, sizeof saved, "a/step_00000004/model.safetensors");
    path_in(dump1, sizeof dump1, "dump1.safetensors");
    path_in(dump2, sizeof dump2, "dump2.safetensors");
    int rc = tpt(1, "'%s' --set init.from=%s/a/step_00000004 --set debug.dump_init=%s --set train.steps=1 --set train.warmup_steps=0 "
                 "--set data.val=", g_cfg, g_dir, dump1);
    cr_assert_eq(rc, 0, "%s", g_out);
    assert_same_tensors(saved, dump1);
    // every tensor of the file was compared: the model has 2 + 12 * 2 + 2 of them
    struct st_file f;
    char err[512];
    cr_assert_eq(st_open(&f, saved, err, sizeof err), 0, "%s", err);
    cr_assert_eq(f.n_tensors, 28);
    st_close(&f);
    if (!have_mpiexec()) return;
    rc = tpt(2, "'%s' --set parallel.tp=2 --set init.from=%s/a --set debug.dump_init=%s --set train.steps=1 --set train.warmup_steps=0 "
             "--set data.val=", g_cfg, g_dir, dump2);
    cr_assert_eq(rc, 0, "%s", g_out);
    assert_same_tensors(saved, dump2);
    // AdamW state too: resume at tp=2 with nothing left to train re-saves into a new directory.
    rc = tpt(2, "'%s' --set parallel.tp=2 --set train.steps=4 --set checkpoint.resume=%s/a/step_00000004 "
             "--set checkpoint.dir=%s/b", g_cfg, g_dir, g_dir);
    cr_assert_eq(rc, 0, "%s", g_out);
    char a[1200], b[1200];
    path_in(a, sizeof a, "a/step_00000004/optimizer.safetensors");
    path_in(b, sizeof b, "b/step_00000004/optimizer.safetensors");
    cr_assert(files_equal(a, b), "optimizer state changed in a tp=1 -> tp=2 round trip");
    path_in(b, sizeof b, "b/step_00000004/model.safetensors");
    cr_assert(files_equal(saved, b), "weights changed in a tp=1 -> tp=2 round trip");
}

// ---- exact resume

// 8 steps straight vs 4 steps then a resume for 4 more: identical losses and identical final
// weights and AdamW state, bit for bit (cosine schedule: both runs know train.steps = 8).
Test(ckpt, resume_is_bitwise_exact) {
    train(1, "a", "%s", "");
    int rc = tpt(1, "'%s' --set checkpoint.resume=%s/a/step_00000004 --set checkpoint.dir=%s/b "
                 "--set log.jsonl=%s/b.jsonl", g_cfg, g_dir, g_dir, g_dir);
    cr_assert_eq(rc, 0, "%s", g_out);
    cr_assert(strstr(g_out, "resumed from"), "%s", g_out);
    double la[16], lb[16];
    cr_assert_eq(losses_of("a", la, 16), 8);
    cr_assert_eq(losses_of("b", lb, 16), 4, "the resumed run should log steps 5..8 only");
    for (int i = 0; i < 4; i++) cr_assert_eq(la[4 + i], lb[i], "step %d: %.9g vs %.9g", 5 + i, la[4 + i], lb[i]);
    char x[1200], y[1200];
    const char *files[] = {"model.safetensors", "optimizer.safetensors", "state.json"};
    for (int k = 0; k < 3; k++) {
        snprintf(x, sizeof x, "%s/a/step_00000008/%s", g_dir, files[k]);
        snprintf(y, sizeof y, "%s/b/step_00000008/%s", g_dir, files[k]);
        cr_assert(files_equal(x, y), "%s of the resumed run differs from the uninterrupted run's", files[k]);
    }
}

// A run of N steps, then `resume: auto` in the same directory for N more (constant LR so that
// the first run's schedule does not depend on its length) equals one run of 2N: the appended log
// holds the same 2N losses.
Test(ckpt, resume_auto_n_plus_n) {
    const char *sched = "--set train.schedule=constant --set checkpoint.resume=auto";
    train(1, "full", "--set train.steps=8 %s", sched);
    train(1, "half", "--set train.steps=4 %s", sched);
    cr_assert(strstr(g_out, "starting fresh"), "%s", g_out);
    train(1, "half", "--set train.steps=8 %s", sched);
    cr_assert(strstr(g_out, "resumed from"), "%s", g_out);
    double a[16], b[16];
    cr_assert_eq(losses_of("full", a, 16), 8);
    cr_assert_eq(losses_of("half", b, 16), 8);
    for (int i = 0; i < 8; i++) cr_assert_eq(a[i], b[i], "step %d: %.9g vs %.9g", i + 1, a[i], b[i]);
    // the job is done: another auto resume trains nothing and exits 0
    train(1, "half", "--set train.steps=8 %s", sched);
    cr_assert(strstr(g_out, "nothing left to train"), "%s", g_out);
}

// Saved at tp=2, resumed at tp=1, tp=4 and at dp=2 (grad_accum halved: same data per step):
// the continued losses match the tp=2 run's.
Test(ckpt, reshard_tp2_to_tp1_tp4_dp2) {
    if (!have_mpiexec()) cr_skip_test("no mpiexec");
    train(2, "t2", "--set parallel.tp=2");
    double ref[16], got[16];
    cr_assert_eq(losses_of("t2", ref, 16), 8);
    const struct {
        int np;
        const char *name, *sets;
    } runs[] = {
        {1, "t1", "--set parallel.tp=1"},
        {4, "t4", "--set parallel.tp=4"},
        {2, "d2", "--set parallel.tp=1 --set train.grad_accum=1"},
    };
    for (size_t r = 0; r < sizeof runs / sizeof runs[0]; r++) {
        train(runs[r].np, runs[r].name, "%s --set checkpoint.resume=%s/t2/step_00000004", runs[r].sets, g_dir);
        cr_assert_eq(losses_of(runs[r].name, got, 16), 4);
        for (int i = 0; i < 4; i++)
            cr_assert(tu_rel(ref[4 + i], got[i]) < 1e-5, "%s step %d: %.9g vs tp=2 %.9g", runs[r].name, 5 + i, got[i],
                      ref[4 + i]);
    }
}

// ---- broken checkpoints: one line, exit 2, nothing touched

// Copies a fresh checkpoint to DIR/bad/step_00000004 for a test to damage.
static void make_damaged_copy(char *ckpt, size_t len) {
    train(1, "a", "--set train.steps=4");
    char cmd_out[256];
    cr_assert_eq(tu_run(cmd_out, sizeof cmd_out, "mkdir -p '%s/bad' && cp -r '%s/a/step_00000004' '%s/bad/'", g_dir,
                        g_dir, g_dir), 0);
    snprintf(ckpt, len, "%s/bad/step_00000004", g_dir);
}

// Resumes from a damaged checkpoint and checks the failure contract; the checkpoint directory
// and the run's own checkpoint.dir stay as they were.
static void resume_fails(const char *ckpt, int np, const char *must1, const char *must2) {
    char before[8192], after[8192], parent[1200];
    path_in(parent, sizeof parent, "bad");
    dir_fingerprint(parent, before, sizeof before);
    int rc = tpt(np, "'%s' --set parallel.tp=%d --set checkpoint.resume=%s --set checkpoint.dir=%s/bad", g_cfg, np,
                 ckpt, g_dir);
    assert_one_line_error_np(rc, np, must1, must2);
    dir_fingerprint(parent, after, sizeof after);
    cr_assert_str_eq(before, after, "the failed resume changed the checkpoint directory");
}

// Flips one byte in the middle of tensor `name`'s data in file `file`.
static void flip_byte(const char *file, const char *name) {
    struct st_file f;
    char err[512];
    cr_assert_eq(st_open(&f, file, err, sizeof err), 0, "%s", err);
    const struct st_tensor *t = st_find(&f, name);
    cr_assert(t);
    size_t at = (size_t)((const unsigned char *)t->data - (const unsigned char *)f.map) + (t->end - t->begin) / 2;
    st_close(&f);
    size_t n;
    unsigned char *b = slurp(file, &n);
    b[at] ^= 0x10;
    spit(file, b, n);
    free(b);
}

// Replaces the first occurrence of `from` with `to` (same length) in a file.
static void patch_file(const char *file, const char *from, const char *to) {
    cr_assert_eq(strlen(from), strlen(to));
    size_t n;
    unsigned char *b = slurp(file, &n);
    unsigned char *p = memmem(b, n, from, strlen(from));
    cr_assert(p, "'%s' not found in %s", from, file);
    memcpy(p, to, strlen(to));
    spit(file, b, n);
    free(b);
}

Test(ckpt, truncated_file) {
    char ck[1200], f[1300];
    make_damaged_copy(ck, sizeof ck);
    snprintf(f, sizeof f, "%s/model.safetensors", ck);
    cr_assert_eq(truncate(f, 100000), 0);
    resume_fails(ck, 1, "model.safetensors", "tensor '");
}

Test(ckpt, truncated_optimizer_file) {
    char ck[1200], f[1300];
    make_damaged_copy(ck, sizeof ck);
    snprintf(f, sizeof f, "%s/optimizer.safetensors", ck);
    struct stat sb;
    cr_assert_eq(stat(f, &sb), 0);
    cr_assert_eq(truncate(f, sb.st_size - 4), 0);
    resume_fails(ck, 1, "optimizer.safetensors", "exp_avg_sq.ln_f.bias");
}

Test(ckpt, flipped_byte_fails_checksum) {
    char ck[1200], f[1300];
    make_damaged_copy(ck, sizeof ck);
    snprintf(f, sizeof f, "%s/model.safetensors", ck);
    flip_byte(f, "h.1.mlp.c_fc.weight");
    resume_fails(ck, 1, "h.1.mlp.c_fc.weight", "checksum");
    // --eval verifies the same way
    int rc = tpt(1, "--eval %s", ck);
    assert_one_line_error(rc, "h.1.mlp.c_fc.weight", "corrupted");
}

Test(ckpt, flipped_byte_in_optimizer_state_on_two_ranks) {
    if (!have_mpiexec()) cr_skip_test("no mpiexec");
    char ck[1200], f[1300];
    make_damaged_copy(ck, sizeof ck);
    snprintf(f, sizeof f, "%s/optimizer.safetensors", ck);
    flip_byte(f, "exp_avg.wte.weight");
    resume_fails(ck, 2, "exp_avg.wte.weight", "checksum");
}

Test(ckpt, header_lies_about_offsets) {
    char ck[1200], f[1300];
    make_damaged_copy(ck, sizeof ck);
    snprintf(f, sizeof f, "%s/model.safetensors", ck);
    // wpe is (16, 32) F32 = 2048 bytes; claiming one byte more makes it overlap its successor
    struct st_file sf;
    char err[512], from[128], to[128];
    cr_assert_eq(st_open(&sf, f, err, sizeof err), 0, "%s", err);
    const struct st_tensor *t = st_find(&sf, "wpe.weight");
    snprintf(from, sizeof from, "\"data_offsets\":[%zu,%zu]", t->begin, t->end);
    snprintf(to, sizeof to, "\"data_offsets\":[%zu,%zu]", t->begin, t->end + 1);
    st_close(&sf);
    cr_assert_eq(strlen(from), strlen(to), "pick a tensor whose end offset keeps its digit count");
    patch_file(f, from, to);
    resume_fails(ck, 1, "model.safetensors", "wpe.weight");
}

Test(ckpt, header_lies_about_dtype) {
    char ck[1200], f[1300];
    make_damaged_copy(ck, sizeof ck);
    snprintf(f, sizeof f, "%s/model.safetensors", ck);
    // same element size: the file stays consistent, the dtype check must catch it
    patch_file(f, "\"wte.weight\":{\"dtype\":\"F32\"", "\"wte.weight\":{\"dtype\":\"I32\"");
    resume_fails(ck, 1, "wte.weight", "I32");
    // a smaller element size: the sizes no longer add up
    make_damaged_copy(ck, sizeof ck);
    patch_file(f, "\"wte.weight\":{\"dtype\":\"F32\"", "\"wte.weight\":{\"dtype\":\"F16\"");
    resume_fails(ck, 1, "wte.weight", "F16");
}

Test(ckpt, other_model_shape) {
    char ck[1200];
    make_damaged_copy(ck, sizeof ck);
    char before[8192], after[8192], parent[1200];
    path_in(parent, sizeof parent, "bad");
    dir_fingerprint(parent, before, sizeof before);
    int rc = tpt(1, "'%s' --set model.n_embd=64 --set checkpoint.resume=%s", g_cfg, ck);
    assert_one_line_error(rc, "wte.weight", "[512, 32]");
    cr_assert(strstr(g_out, "[512, 64]"), "both shapes should be named: %s", g_out);
    rc = tpt(1, "'%s' --set model.n_layer=3 --set checkpoint.resume=%s", g_cfg, ck);
    assert_one_line_error(rc, "h.2.", "2 layers");
    rc = tpt(1, "'%s' --set model.n_layer=1 --set checkpoint.resume=%s", g_cfg, ck);
    assert_one_line_error(rc, "h.1.", "not part of this model");
    dir_fingerprint(parent, after, sizeof after);
    cr_assert_str_eq(before, after);
}

Test(ckpt, missing_directory_and_files) {
    int rc = tpt(1, "'%s' --set checkpoint.resume=%s/nowhere", g_cfg, g_dir);
    assert_one_line_error(rc, "nowhere", "No such file");
    rc = tpt(1, "--eval %s/nowhere", g_dir);
    assert_one_line_error(rc, "nowhere", NULL);
    char ck[1200], f[1300];
    make_damaged_copy(ck, sizeof ck);
    snprintf(f, sizeof f, "%s/optimizer.safetensors", ck);
    cr_assert_eq(unlink(f), 0);
    resume_fails(ck, 1, "optimizer.safetensors", "cannot open");
    snprintf(f, sizeof f, "%s/state.json", ck);
    cr_assert_eq(unlink(f), 0);
    resume_fails(ck, 1, "step_00000004", "state.json");
}

// ---- atomic commit, keep, latest

Test(ckpt, keep_latest_and_leftovers) {
    char p[1300], out[512];
    // a leftover of an interrupted save must be cleaned up, and never be taken for a checkpoint
    snprintf(p, sizeof p, "%s/k/step_00000009.tmp", g_dir);
    cr_assert_eq(tu_run(out, sizeof out, "mkdir -p '%s' && echo junk > '%s/state.json'", p, p), 0);
    train(1, "k", "--set checkpoint.every=2 --set checkpoint.keep=2");
    path_in(p, sizeof p, "k");
    tu_run(out, sizeof out, "ls '%s' | tr '\\n' ' '", p);
    cr_assert_str_eq(out, "latest step_00000006 step_00000008 ", "directory holds: %s", out);
    path_in(p, sizeof p, "k/latest");
    size_t n;
    unsigned char *latest = slurp(p, &n);
    cr_assert_str_eq((char *)latest, "step_00000008\n");
    free(latest);
    // `latest` naming a checkpoint that is gone: the newest complete one is used instead
    tu_write_file(p, sizeof p, g_dir, "k/latest", "step_00000099\n");
    char resolved[1200], err[512];
    path_in(p, sizeof p, "k");
    cr_assert_eq(ckpt_resolve(p, resolved, sizeof resolved, err, sizeof err), 0, "%s", err);
    cr_assert(strstr(resolved, "step_00000008"), "%s", resolved);
    // an empty directory holds no checkpoint yet
    path_in(p, sizeof p, "empty");
    mkdir(p, 0755);
    cr_assert_eq(ckpt_resolve(p, resolved, sizeof resolved, err, sizeof err), 1);
}

// A run killed with SIGKILL at random moments (most of its time goes into saving) always leaves
// `latest` naming a complete checkpoint that loads, and resume: auto carries the run to the end.
Test(ckpt, sigkill_while_saving) {
    char cfg[1300], text[4096];
    snprintf(text, sizeof text,
             "model:\n  n_layer: 4\n  n_head: 4\n  n_embd: 128\n  vocab_size: 512\n  seq_len: 32\n"
             "train:\n  micro_batch: 1\n  steps: 60\n  lr: 1e-3\n"
             "data:\n  train: %s/train.bin\n  val: \"\"\n"
             "log:\n  every: 100\n"
             "checkpoint:\n  dir: %s/kill\n  every: 1\n  keep: 2\n  resume: auto\n",
             g_dir, g_dir);
    tu_write_file(cfg, sizeof cfg, g_dir, "kill.yaml", text);
    srand((unsigned)getpid());
    int kills_mid_save = 0;
    for (int round = 0; round < 5; round++) {
        int ms = 150 + rand() % 1200;
        char out[4096];
        tu_run(out, sizeof out, "cd '%s' && { '%s' '%s' > /dev/null 2>&1 & pid=$!; sleep %d.%03d; kill -9 $pid; "
               "wait $pid; } ; echo \"tmp=$(ls '%s/kill' 2>/dev/null | grep -c '\\.tmp$')\"", tu_source_root(), tu_tptrain(), cfg,
               ms / 1000, ms % 1000, g_dir);
        const char *tmp = strstr(out, "tmp=");
        if (tmp && atoi(tmp + 4) > 0) kills_mid_save++;
        char kd[1300];
        snprintf(kd, sizeof kd, "%s/kill", g_dir);
        struct stat sb;
        if (stat(kd, &sb) != 0) continue; // killed before the first save
        char resolved[1300], err[1024];
        int r = ckpt_resolve(kd, resolved, sizeof resolved, err, sizeof err);
        if (r == 1) continue;
        cr_assert_eq(r, 0, "%s", err);
        cr_assert(!strstr(resolved, ".tmp"), "a temporary directory was taken for a checkpoint: %s", resolved);
        // loading verifies every size and checksum
        int rc = tpt(1, "--eval %s --data %s/val.bin --batches 1", kd, g_dir);
        cr_assert_eq(rc, 0, "round %d (killed after %d ms): the latest checkpoint does not load:\n%s", round, ms, g_out);
    }
    cr_log_info("sigkill_while_saving: %d of 5 kills left a save half-written", kills_mid_save);
    int rc = tpt(1, "'%s'", cfg);
    cr_assert_eq(rc, 0, "the final resume failed:\n%s", g_out);
    char p[1300];
    snprintf(p, sizeof p, "%s/kill/step_00000060/state.json", g_dir);
    struct stat sb;
    cr_assert_eq(stat(p, &sb), 0, "the resumed run did not reach step 60");
}

// ---- --eval

static double number_after(const char *text, const char *key) {
    const char *p = strstr(text, key);
    cr_assert(p, "'%s' not in:\n%s", key, text);
    return strtod(p + strlen(key), NULL);
}

// Same val loss the training printed and logged, at the TP size it trained with and at others.
// The validation loss a run's JSON-lines log (ck.jsonl) holds for step 8, to full precision.
static double logged_val8(const char *ck) {
    char p[1300];
    snprintf(p, sizeof p, "%s/%s.jsonl", g_dir, ck);
    size_t n;
    char *log = (char *)slurp(p, &n);
    const char *val8 = strstr(log, "{\"kind\":\"val\",\"step\":8,");
    cr_assert(val8, "%s has no validation record for step 8", p);
    double v = number_after(val8, "\"loss\":");
    free(log);
    return v;
}

Test(ckpt, eval_matches_training_log) {
    train(1, "a", "%s", "");
    char train_out[65536];
    memcpy(train_out, g_out, sizeof train_out);
    const char *line = strstr(train_out, "val       8 | loss ");
    cr_assert(line, "%s", train_out);
    char logged[32];
    snprintf(logged, sizeof logged, "%.8s", line + strlen("val       8 | loss "));
    int rc = tpt(1, "--eval %s/a", g_dir);
    cr_assert_eq(rc, 0, "%s", g_out);
    char want[64];
    snprintf(want, sizeof want, "val loss %s | perplexity", logged);
    cr_assert(strstr(g_out, want), "eval should print '%s':\n%s", want, g_out);
    cr_assert(strstr(g_out, "| tokens 64"), "%s", g_out);
    // the JSONL figure, to full precision
    double jl = logged_val8("a");
    cr_assert(fabs(number_after(g_out, "val loss ") - jl) < 1e-6);
    if (!have_mpiexec()) return;
    rc = tpt(2, "--eval %s/a/step_00000008", g_dir);
    cr_assert_eq(rc, 0, "%s", g_out);
    cr_assert(strstr(g_out, "dp=1 x tp=2"), "%s", g_out);
    cr_assert(tu_rel(number_after(g_out, "val loss "), jl) < 1e-5, "tp=2 eval %s vs logged %.9g", g_out, jl);
    // dp=2 x tp=1 halves the micro-batches per rank and covers the same blocks
    rc = tpt(2, "--eval %s/a --set parallel.tp=1", g_dir);
    cr_assert_eq(rc, 0, "%s", g_out);
    cr_assert(strstr(g_out, "1 micro-batches"), "%s", g_out);
    cr_assert(tu_rel(number_after(g_out, "val loss "), jl) < 1e-5, "dp=2 eval %s vs logged %.9g", g_out, jl);
}

// The bf16 path (the CPU's emulation) resumes exactly too: the checkpoint holds the fp32 master
// weights and the compute copy is rebuilt from them on load; --eval of a bf16 checkpoint runs in
// bf16 and reproduces the training log's validation loss.
Test(ckpt, bf16_resume_is_exact_and_eval_matches) {
    train(1, "a", "%s", "--set train.precision=bf16");
    int rc = tpt(1, "'%s' --set train.precision=bf16 --set checkpoint.resume=%s/a/step_00000004 "
                 "--set checkpoint.dir=%s/b --set log.jsonl=%s/b.jsonl", g_cfg, g_dir, g_dir, g_dir);
    cr_assert_eq(rc, 0, "%s", g_out);
    double la[16], lb[16];
    cr_assert_eq(losses_of("a", la, 16), 8);
    cr_assert_eq(losses_of("b", lb, 16), 4);
    for (int i = 0; i < 4; i++) cr_assert_eq(la[4 + i], lb[i], "bf16 step %d: %.9g vs %.9g", 5 + i, la[4 + i], lb[i]);
    char x[1200], y[1200];
    path_in(x, sizeof x, "a/step_00000008/model.safetensors");
    path_in(y, sizeof y, "b/step_00000008/model.safetensors");
    cr_assert(files_equal(x, y), "bf16: the resumed run's weights differ from the uninterrupted run's");
    double jl = logged_val8("a");
    rc = tpt(1, "--eval %s/a", g_dir);
    cr_assert_eq(rc, 0, "%s", g_out);
    cr_assert(fabs(number_after(g_out, "val loss ") - jl) < 1e-6, "bf16 eval %s vs logged %.9g", g_out, jl);
}

// ---- generation

// Greedy generation (top-k 1) through the KV cache, with the context sliding past seq_len, gives
// the tokens a float64 PyTorch full forward over the same windows picks; at tp=2 as well.
static const char *greedy_py =
    "import sys, struct, torch\n"
    "sys.path.insert(0, sys.argv[1] + '/tools')\n"
    "import torch_reference as R\n"
    "arrays, _ = R.read_safetensors(sys.argv[2])\n"
    "P = {k: torch.tensor(v, dtype=torch.float64) for k, v in arrays.items()}\n"
    "L, H, C, T, n = 2, 4, 32, 16, int(sys.argv[4])\n"
    "prompt = [int(t) for t in open(sys.argv[3]).read().split()]\n"
    "def logits(w):\n"
    "    idx = torch.tensor([w]); B, Tw = idx.shape; hs = C // H\n"
    "    x = P['wte.weight'][idx] + P['wpe.weight'][:Tw]\n"
    "    causal = torch.ones(Tw, Tw, dtype=torch.bool).tril()\n"
    "    for l in range(L):\n"
    "        p = f'h.{l}.'\n"
    "        h = torch.nn.functional.layer_norm(x, (C,), P[p+'ln_1.weight'], P[p+'ln_1.bias'], 1e-5)\n"
    "        q, k, v = (h @ P[p+'attn.c_attn.weight'] + P[p+'attn.c_attn.bias']).split(C, dim=2)\n"
    "        q, k, v = [t.view(B, Tw, H, hs).transpose(1, 2) for t in (q, k, v)]\n"
    "        a = ((q @ k.transpose(-2, -1)) / hs ** 0.5).masked_fill(~causal, float('-inf')).softmax(-1)\n"
    "        y = (a @ v).transpose(1, 2).reshape(B, Tw, C)\n"
    "        x = x + y @ P[p+'attn.c_proj.weight'] + P[p+'attn.c_proj.bias']\n"
    "        h = torch.nn.functional.layer_norm(x, (C,), P[p+'ln_2.weight'], P[p+'ln_2.bias'], 1e-5)\n"
    "        x = x + R.gelu_tanh(h @ P[p+'mlp.c_fc.weight'] + P[p+'mlp.c_fc.bias']) @ P[p+'mlp.c_proj.weight'] + P[p+'mlp.c_proj.bias']\n"
    "    x = torch.nn.functional.layer_norm(x, (C,), P['ln_f.weight'], P['ln_f.bias'], 1e-5)\n"
    "    return (x @ P['wte.weight'].t())[0, -1]\n"
    "w = prompt[-(T // 2):] if len(prompt) > T else list(prompt)\n"
    "out = []\n"
    "for i in range(n):\n"
    "    t = int(torch.argmax(logits(w)))\n"
    "    out.append(t)\n"
    "    w = w + [t]\n"
    "    if len(w) > T: w = w[-(T // 2):]\n"
    "blob = open(sys.argv[5], 'rb').read()\n"
    "V = struct.unpack('<256I', blob[:1024])[2]\n"
    "pieces, off = [], 1024\n"
    "for _ in range(V):\n"
    "    ln = blob[off]; pieces.append(blob[off + 1:off + 1 + ln]); off += 1 + ln\n"
    "sys.stdout.buffer.write(b''.join(pieces[t] for t in prompt + out))\n";

// The generated text of a --generate run's output: after the header line, before the last newline.
static void generated_text(const char *out, char *text, size_t len) {
    const char *p = strstr(out, "generating ");
    cr_assert(p, "%s", out);
    p = strchr(p, '\n') + 1;
    const char *end = strstr(p, "\ngenerated ");
    cr_assert(end, "%s", out);
    snprintf(text, len, "%.*s", (int)(end - p), p);
}

// Writes DIR/rnd.safetensors: the tensors of `like` with large random values, so that every part
// of the network (attention included) moves the argmax and a decoding error shows up as other text.
static void write_random_weights(const char *like, const char *out) {
    struct st_file f;
    char err[512];
    cr_assert_eq(st_open(&f, like, err, sizeof err), 0, "%s", err);
    struct st_writer *w = st_writer_new(out);
    for (int i = 0; i < f.n_tensors; i++)
        cr_assert_eq(st_writer_add(w, f.tensors[i].name, ST_F32, f.tensors[i].ndim, f.tensors[i].shape, err, sizeof err), 0);
    cr_assert_eq(st_writer_begin(w, err, sizeof err), 0, "%s", err);
    uint32_t x = 12345;
    for (int i = 0; i < f.n_tensors; i++) {
        const struct st_tensor *t = &f.tensors[i];
        bool ln_weight = strstr(t->name, "ln_") && strstr(t->name, ".weight");
        float *v = malloc(t->numel * sizeof(float));
        for (size_t j = 0; j < t->numel; j++) {
            x = x * 1664525u + 1013904223u;
            float u = (float)(x >> 8) / 16777216.0f - 0.5f; // uniform [-0.5, 0.5)
            v[j] = ln_weight ? 1.0f + 0.2f * u : 1.2f * u;
        }
        cr_assert_eq(st_writer_write(w, NULL, v, t->numel * sizeof(float), err, sizeof err), 0, "%s", err);
        free(v);
    }
    cr_assert_eq(st_writer_finish(w, err, sizeof err), 0, "%s", err);
    st_writer_free(w);
    st_close(&f);
}

Test(ckpt, generation_matches_full_forward_reference) {
    char out[4096];
    const char *python = NULL;
    if (tu_run(out, sizeof out, "/usr/bin/python3 -c 'import torch, numpy'") == 0) python = "/usr/bin/python3";
    else if (tu_run(out, sizeof out, "python3 -c 'import torch, numpy'") == 0) python = "python3";
    if (!python) cr_skip_test("no Python with torch and numpy");
    train(1, "a", "--set train.steps=1 --set train.warmup_steps=0");
    char like[1300], rnd[1300];
    path_in(like, sizeof like, "a/step_00000001/model.safetensors");
    path_in(rnd, sizeof rnd, "rnd.safetensors");
    write_random_weights(like, rnd);
    train(1, "r", "--set init.from=%s --set train.steps=1 --set train.warmup_steps=0 --set train.lr=1e-9 --set train.min_lr=0", rnd);
    char prompt[1300], py[1300], ref[1300];
    tu_write_file(prompt, sizeof prompt, g_dir, "prompt.txt", "11 22 33 44 55 66 77 88 99 111 222 333\n");
    tu_write_file(py, sizeof py, g_dir, "greedy.py", greedy_py);
    path_in(ref, sizeof ref, "ref.txt");
    int rc = tu_run(out, sizeof out, "%s '%s' '%s' '%s/r/step_00000001/model.safetensors' '%s' 40 "
                    "'%s/data/gpt2_tokenizer.bin' > '%s'", python, py, tu_source_root(), g_dir, prompt, tu_source_root(), ref);
    cr_assert_eq(rc, 0, "reference failed: %s", out);
    size_t n;
    char *want = (char *)slurp(ref, &n);
    char got[8192];
    rc = tpt(1, "--eval %s/r --generate 40 --top-k 1 --prompt-tokens %s", g_dir, prompt);
    cr_assert_eq(rc, 0, "%s", g_out);
    generated_text(g_out, got, sizeof got);
    cr_assert(strcmp(got, want) == 0, "KV-cache greedy text differs from the reference:\n got  [%s]\n want [%s]", got,
              want);
    if (have_mpiexec()) {
        rc = tpt(2, "--eval %s/r --generate 40 --top-k 1 --prompt-tokens %s", g_dir, prompt);
        cr_assert_eq(rc, 0, "%s", g_out);
        generated_text(g_out, got, sizeof got);
        cr_assert(strcmp(got, want) == 0, "tp=2 greedy text differs:\n got  [%s]\n want [%s]", got, want);
    }
    free(want);
}

// Sampling is a function of the seed (not of the TP size); another seed gives another text.
Test(ckpt, sampling_is_seeded) {
    train(1, "a", "%s", "");
    char a[8192], b[8192];
    int rc = tpt(1, "--eval %s/a --generate 30 --seed 5 --temperature 0.9 --top-k 50", g_dir);
    cr_assert_eq(rc, 0, "%s", g_out);
    generated_text(g_out, a, sizeof a);
    rc = tpt(1, "--eval %s/a --generate 30 --seed 6 --temperature 0.9 --top-k 50", g_dir);
    cr_assert_eq(rc, 0, "%s", g_out);
    generated_text(g_out, b, sizeof b);
    cr_assert(strcmp(a, b) != 0, "seeds 5 and 6 gave the same text");
    if (have_mpiexec()) {
        rc = tpt(2, "--eval %s/a --generate 30 --seed 5 --temperature 0.9 --top-k 50", g_dir);
        cr_assert_eq(rc, 0, "%s", g_out);
        generated_text(g_out, b, sizeof b);
        cr_assert_str_eq(a, b, "tp=2 sampled another text with the same seed");
    }
    char bad[1300];
    tu_write_file(bad, sizeof bad, g_dir, "bad_prompt.txt", "1 2 600\n");
    rc = tpt(1, "--eval %s/a --generate 5 --prompt-tokens %s", g_dir, bad);
    assert_one_line_error(rc, "bad_prompt.txt", "600");
}

// ---- init.from Hugging Face-style files

static uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16); // round to nearest even
}

// A GPT-2 file as published: BF16, wpe with more positions than seq_len, attn.bias buffers. The
// loaded weights are the BF16 values (exact in fp32) and wpe's first seq_len rows.
Test(ckpt, init_from_bf16_file_with_extras) {
    train(1, "a", "--set train.steps=4");
    char src[1300], hf[1300], dump[1300], err[512];
    path_in(src, sizeof src, "a/step_00000004/model.safetensors");
    path_in(hf, sizeof hf, "hf.safetensors");
    path_in(dump, sizeof dump, "dump.safetensors");
    struct st_file f;
    cr_assert_eq(st_open(&f, src, err, sizeof err), 0, "%s", err);
    struct st_writer *w = st_writer_new(hf);
    for (int i = 0; i < f.n_tensors; i++) {
        const struct st_tensor *t = &f.tensors[i];
        int64_t shape[ST_MAX_DIMS];
        memcpy(shape, t->shape, sizeof shape);
        if (strcmp(t->name, "wpe.weight") == 0) shape[0] *= 4;
        cr_assert_eq(st_writer_add(w, t->name, ST_BF16, t->ndim, shape, err, sizeof err), 0, "%s", err);
    }
    int64_t bias_shape[4] = {1, 1, 16, 16};
    cr_assert_eq(st_writer_add(w, "h.0.attn.bias", ST_F32, 4, bias_shape, err, sizeof err), 0);
    cr_assert_eq(st_writer_add(w, "h.1.attn.masked_bias", ST_F32, 0, bias_shape, err, sizeof err), 0);
    cr_assert_eq(st_writer_begin(w, err, sizeof err), 0, "%s", err);
    for (int i = 0; i < f.n_tensors; i++) {
        const struct st_tensor *t = &f.tensors[i];
        size_t numel = t->numel * (strcmp(t->name, "wpe.weight") == 0 ? 4 : 1);
        float *x = calloc(numel, sizeof(float));
        uint16_t *h = malloc(numel * sizeof *h);
        cr_assert_eq(st_read_f32(&f, t, x, 0, t->numel, err, sizeof err), 0);
        for (size_t j = t->numel; j < numel; j++) x[j] = 1000.0f; // positions the model must not take
        for (size_t j = 0; j < numel; j++) h[j] = to_bf16(x[j]);
        cr_assert_eq(st_writer_write(w, NULL, h, numel * 2, err, sizeof err), 0, "%s", err);
        free(x);
        free(h);
    }
    float zeros[256] = {0};
    cr_assert_eq(st_writer_write(w, NULL, zeros, sizeof zeros, err, sizeof err), 0);
    cr_assert_eq(st_writer_write(w, NULL, zeros, 4, err, sizeof err), 0);
    cr_assert_eq(st_writer_finish(w, err, sizeof err), 0, "%s", err);
    st_writer_free(w);

    int rc = tpt(1, "'%s' --set init.from=%s --set debug.dump_init=%s --set train.steps=1 --set train.warmup_steps=0 --set data.val=", g_cfg, hf,
                 dump);
    cr_assert_eq(rc, 0, "%s", g_out);
    struct st_file d;
    cr_assert_eq(st_open(&d, dump, err, sizeof err), 0, "%s", err);
    for (int i = 0; i < f.n_tensors; i++) {
        const struct st_tensor *t = &f.tensors[i], *u = st_find(&d, t->name);
        cr_assert(u && u->numel == t->numel, "%s", t->name);
        float *x = malloc(t->numel * sizeof(float)), *y = malloc(t->numel * sizeof(float));
        st_read_f32(&f, t, x, 0, t->numel, err, sizeof err);
        st_read_f32(&d, u, y, 0, u->numel, err, sizeof err);
        for (size_t j = 0; j < t->numel; j++) {
            uint32_t b = (uint32_t)to_bf16(x[j]) << 16;
            float want;
            memcpy(&want, &b, 4);
            cr_assert_eq(y[j], want, "%s[%zu]: %g, want %g", t->name, j, y[j], want);
        }
        free(x);
        free(y);
    }
    st_close(&d);
    st_close(&f);
    // a file of another width names the tensor and both shapes
    rc = tpt(1, "'%s' --set model.n_embd=64 --set init.from=%s --set train.steps=1 --set train.warmup_steps=0", g_cfg, hf);
    assert_one_line_error(rc, "init.from", "wte.weight");
}

// ---- interop: independent readers

static const char *check_state_py =
    "import json, os, struct, sys\n"
    "d = sys.argv[1]\n"
    "st = json.load(open(os.path.join(d, 'state.json')))\n"
    "assert st['format'] == 'tptrain-checkpoint' and st['step'] == 8, st\n"
    "cfg = json.load(open(os.path.join(d, 'config.json')))\n"
    "assert cfg['model_type'] == 'gpt2' and cfg['n_embd'] == 32 and cfg['n_layer'] == 2, cfg\n"
    "assert cfg['activation_function'] == 'gelu_new' and cfg['tie_word_embeddings'] is True\n"
    "checked = 0\n"
    "for fname, entry in st['files'].items():\n"
    "    blob = open(os.path.join(d, fname), 'rb').read()\n"
    "    assert len(blob) == entry['bytes'], fname\n"
    "    n = struct.unpack('<Q', blob[:8])[0]\n"
    "    header = json.loads(blob[8:8 + n])\n"
    "    data = blob[8 + n:]\n"
    "    for name, want in entry['tensors'].items():\n"
    "        b, e = header[name]['data_offsets']\n"
    "        h = 0xcbf29ce484222325\n"
    "        for (w,) in struct.iter_unpack('<I', data[b:e]):\n"
    "            h = ((h ^ w) * 0x100000001b3) & 0xffffffffffffffff\n"
    "        assert '%016x' % h == want, (fname, name)\n"
    "        checked += 1\n"
    "print('checked', checked)\n";

Test(ckpt, files_parse_with_independent_readers) {
    train(1, "a", "%s", "");
    char out[8192], py[1300];
    int rc = tu_run(out, sizeof out, "python3 '%s/scripts/check_safetensors.py' '%s/a/step_00000008/model.safetensors' "
                    "'%s/a/step_00000008/optimizer.safetensors'", tu_source_root(), g_dir, g_dir);
    cr_assert_eq(rc, 0, "%s", out);
    cr_assert(strstr(out, "h.1.mlp.c_proj.weight F32 [128,32]"), "Conv1D weights are stored (in, out):\n%s", out);
    cr_assert(strstr(out, "exp_avg_sq.wte.weight F32 [512,32]"), "%s", out);
    tu_write_file(py, sizeof py, g_dir, "check_state.py", check_state_py);
    rc = tu_run(out, sizeof out, "python3 '%s' '%s/a/step_00000008'", py, g_dir);
    cr_assert_eq(rc, 0, "%s", out);
    cr_assert(strstr(out, "checked 84"), "28 weights + 56 moments: %s", out);
    // the checksum helper agrees with the Python formula on a known input
    uint32_t words[3] = {1, 2, 0xdeadbeef};
    uint64_t h = 0xcbf29ce484222325ull;
    for (int i = 0; i < 3; i++) h = (h ^ words[i]) * 0x100000001b3ull;
    cr_assert_eq(ckpt_checksum(words, sizeof words), h);
}

// ---- scripts/plot_loss.py

Test(ckpt, plot_loss_script) {
    train(1, "a", "%s", "");
    char out[4096];
    const char *py = NULL;
    if (tu_run(out, sizeof out, "python3 -c 'import matplotlib'") == 0) py = "python3";
    else if (tu_run(out, sizeof out, "/usr/bin/python3 -c 'import matplotlib'") == 0) py = "/usr/bin/python3";
    if (!py) {
        // without matplotlib: one clear line and exit 2
        int rc = tu_run(out, sizeof out, "python3 '%s/scripts/plot_loss.py' '%s/a.jsonl' -o '%s/x.png'",
                        tu_source_root(), g_dir, g_dir);
        cr_assert_eq(rc, 2, "%s", out);
        cr_assert(strstr(out, "matplotlib is not installed"), "%s", out);
        return;
    }
    int rc = tu_run(out, sizeof out, "%s '%s/scripts/plot_loss.py' '%s/a.jsonl' '%s/a.jsonl' -o '%s/x.png'", py,
                    tu_source_root(), g_dir, g_dir, g_dir);
    cr_assert_eq(rc, 0, "%s", out);
    char p[1300];
    path_in(p, sizeof p, "x.png");
    size_t n;
    unsigned char *png = slurp(p, &n);
    cr_assert(n > 1000 && memcmp(png, "\x89PNG", 4) == 0);
    free(png);
}
