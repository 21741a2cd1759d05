// test_cli.c: the command line as a user meets it: --help and --version, usage errors with
// exit 2 and a message that names the culprit, --dry-run's per-rank plan, and config errors
// that point at FILE:LINE:COL.
#include <criterion/criterion.h>

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "model.h"
#include "testutil.h"

#define OUT_CAP (64 * 1024)

// Runs tptrain with the given arguments from the source root (configs name data/ relatively).
static int tptrain(char *out, const char *args) {
    return tu_run(out, OUT_CAP, "cd '%s' && timeout 60 '%s' %s", tu_source_root(), tu_tptrain(), args);
}

// Runs and checks the exit status, with the output in the failure message.
static char *expect_exit(int want, const char *args) {
    char *out = malloc(OUT_CAP);
    cr_assert_not_null(out);
    int rc = tptrain(out, args);
    cr_assert_eq(rc, want, "tptrain %s: exit %d, expected %d; output:\n%s", args, rc, want, out);
    return out;
}

static void expect_has(const char *out, const char *needle, const char *what) {
    cr_assert(strstr(out, needle), "%s: '%s' missing from:\n%s", what, needle, out);
}

static int count_lines(const char *s) {
    int n = 0;
    for (; *s; s++) n += *s == '\n';
    return n;
}

// The line of `out` that contains `needle` (copied into line), or "" if none.
static void line_with(const char *out, const char *needle, char *line, size_t len) {
    line[0] = '\0';
    const char *p = strstr(out, needle);
    if (!p) return;
    const char *b = p, *e = p;
    while (b > out && b[-1] != '\n') b--;
    while (*e && *e != '\n') e++;
    snprintf(line, len, "%.*s", (int)(e - b), b);
}

// ---- help and version

// Every long option in main.c's getopt table must appear in --help, so that the usage text
// cannot drift from the parser.
Test(cli, help_lists_every_option_of_the_parser) {
    char *out = expect_exit(0, "--help");
    const char *modes[] = {"--dry-run", "--eval", "--bench", "--set", "layer", "allreduce", "model",
                           "exit codes", "3 preempted"};
    for (size_t i = 0; i < sizeof modes / sizeof modes[0]; i++) expect_has(out, modes[i], "--help");

    char path[2048];
    snprintf(path, sizeof path, "%s/src/main.c", tu_source_root());
    FILE *f = fopen(path, "r");
    cr_assert_not_null(f, "cannot read %s", path);
    static char src[1 << 17];
    size_t n = fread(src, 1, sizeof src - 1, f);
    src[n] = '\0';
    fclose(f);
    int options = 0;
    for (const char *p = src; (p = strstr(p, "{\"")); p += 2) {
        const char *q = strchr(p + 2, '"');
        const char *close = strchr(p, '}');
        const char *arg = strstr(p, "_argument");
        if (!q || !close || !arg || arg > close) continue; // not an option-table entry
        char opt[64];
        snprintf(opt, sizeof opt, "--%.*s", (int)(q - p - 2), p + 2);
        expect_has(out, opt, "--help (an option main.c parses)");
        options++;
    }
    cr_assert_geq(options, 14, "found only %d options in %s's table", options, path);
    cr_assert_gt(count_lines(out), 20, "--help is suspiciously short:\n%s", out);
    free(out);

    out = expect_exit(0, "-h");
    expect_has(out, "--dry-run", "-h");
    free(out);
}

Test(cli, version) {
    char *out = expect_exit(0, "--version");
    char want[64];
    snprintf(want, sizeof want, "tptrain %s", TP_VERSION);
    expect_has(out, want, "--version");
    cr_assert_eq(count_lines(out), 1, "--version prints one line:\n%s", out);
    free(out);
    out = expect_exit(0, "-V");
    expect_has(out, want, "-V");
    free(out);
}

// ---- usage errors

Test(cli, unknown_option) {
    char *out = expect_exit(2, "--frobnicate");
    expect_has(out, "--frobnicate", "unknown option");
    expect_has(out, "--help", "unknown option (points at --help)");
    free(out);
}

Test(cli, two_config_files) {
    char *out = expect_exit(2, "configs/tiny.yaml configs/gpt2-124m.yaml");
    expect_has(out, "configs/gpt2-124m.yaml", "two configs");
    free(out);
}

Test(cli, bad_set_names_the_key) {
    char *out = expect_exit(2, "configs/tiny.yaml --set train.lrr=1 --dry-run");
    expect_has(out, "train.lrr", "unknown key");
    expect_has(out, "train.lr'", "unknown key (suggests the near miss)");
    free(out);
    out = expect_exit(2, "configs/tiny.yaml --set train.steps=abc --dry-run");
    expect_has(out, "train.steps", "bad value");
    expect_has(out, "abc", "bad value");
    free(out);
    out = expect_exit(2, "configs/tiny.yaml --set trainsteps --dry-run");
    expect_has(out, "trainsteps", "no '='");
    free(out);
    out = expect_exit(2, "configs/tiny.yaml --dry-run --set"); // --set without its argument
    expect_has(out, "--help", "missing argument");
    free(out);
}

// ---- --dry-run

Test(cli, dry_run_prints_per_rank_shapes) {
    char *out = expect_exit(0, "--dry-run configs/gpt2-124m.yaml --set parallel.tp=4");
    char line[512];
    line_with(out, "c_attn.weight", line, sizeof line);
    cr_assert(line[0], "no c_attn.weight line:\n%s", out);
    cr_assert(strstr(line, "(3, 768, 768)") && strstr(line, "Shard(1)") && strstr(line, "(3, 192, 768)"),
              "c_attn.weight: %s", line);
    line_with(out, "wte.weight", line, sizeof line);
    cr_assert(strstr(line, "(50688, 768)") && strstr(line, "(12672, 768)"), "wte.weight: %s", line);
    line_with(out, "mlp.c_proj.weight", line, sizeof line);
    cr_assert(strstr(line, "(768, 3072)") && strstr(line, "(768, 768)"), "mlp.c_proj.weight: %s", line);
    line_with(out, "wpe.weight", line, sizeof line);
    cr_assert(strstr(line, "Replicate") && strstr(line, "(1024, 768)"), "wpe.weight: %s", line);
    expect_has(out, "rank 3 -> (dp 0, tp 3)", "mesh");
    expect_has(out, "124.44M", "parameter count");
    // 2L+1 and 2 per chunk of the fused LM head (16384 tokens x 12672 vocabulary columns: 2 chunks
    // of 8192 rows), and 2L+1, for 12 layers: 29 and 25
    struct tp_model_config mc = {.n_layer = 12, .n_head = 12, .n_embd = 768, .vocab_size = 50257, .seq_len = 1024};
    struct model_dims d = model_dims_make(&mc, 16, 4, (struct model_options){0});
    int fwd, bwd;
    model_count_collectives(&d, &fwd, &bwd);
    char want[64];
    snprintf(want, sizeof want, "%d forward, %d backward", fwd, bwd);
    expect_has(out, want, "collectives");
    expect_has(out, "memory per rank", "memory estimate");
    expect_has(out, "kept per layer for backward", "activations by kind");
    expect_has(out, "= one layer", "activations per layer");
    free(out);
}

// The plan follows the options: sequence parallelism shards the layernorm and residual rows and
// changes the collectives (4L+2 and 2 per chunk of the fused head forward, 6L+2 backward; 2 chunks
// here: 54 forward); full recomputation adds 3L backward (110 in all) and keeps only each block's
// output per layer, with a work set once.
Test(cli, dry_run_plans_for_the_memory_options) {
    char *out = expect_exit(0, "--dry-run configs/gpt2-124m.yaml --set parallel.tp=4 --set parallel.sequence_parallel=true "
                               "--set train.recompute=full");
    expect_has(out, "sequence_parallel on, recompute full", "the options");
    expect_has(out, "(BT/tp, C)", "sharded rows");
    expect_has(out, "recomputation work set (one layer)", "the work set");
    struct tp_model_config mc = {.n_layer = 12, .n_head = 12, .n_embd = 768, .vocab_size = 50257, .seq_len = 1024};
    struct model_dims d = model_dims_make(&mc, 16, 4, (struct model_options){.sequence_parallel = true, .recompute = TP_RECOMPUTE_FULL});
    int fwd, bwd;
    model_count_collectives(&d, &fwd, &bwd);
    cr_assert_eq(bwd, 9 * 12 + 2, "6L+2 + 3L for 12 layers");
    char want[64];
    snprintf(want, sizeof want, "%d forward, %d backward", fwd, bwd);
    expect_has(out, want, "collectives");
    char line[512];
    line_with(out, "qkv ", line, sizeof line);
    cr_assert(!line[0], "full recomputation keeps no qkv per layer: %s", line);
    free(out);
}

// The resolved config the dry run prints is YAML that loads again to the same config.
Test(cli, dry_run_output_loads_again) {
    char dir[512], path[1024];
    tu_tmpdir(dir, sizeof dir, "cli");
    snprintf(path, sizeof path, "%s/resolved.yaml", dir);
    char args[2048];
    snprintf(args, sizeof args, "--dry-run configs/tiny.yaml --set train.lr=2.5e-4 --set model.n_layer=3 > '%s'", path);
    free(expect_exit(0, args));
    snprintf(args, sizeof args, "--dry-run '%s'", path);
    char *again = expect_exit(0, args);
    char *first = malloc(OUT_CAP);
    FILE *f = fopen(path, "r");
    cr_assert_not_null(f);
    size_t n = fread(first, 1, OUT_CAP - 1, f);
    first[n] = '\0';
    fclose(f);
    expect_has(first, "lr: 0.00025", "the --set value");
    expect_has(first, "n_layer: 3", "the --set value");
    // identical from the first line on (the banner line names the source file)
    const char *a = strchr(first, '\n'), *b = strchr(again, '\n');
    cr_assert(a && b);
    cr_assert_str_eq(a, b, "the reloaded config differs");
    free(first);
    free(again);
    tu_rmtree(dir);
}

Test(cli, tp_not_dividing_heads) {
    char *out = expect_exit(2, "--dry-run configs/gpt2-124m.yaml --set parallel.tp=5");
    expect_has(out, "n_head=12", "tp=5");
    expect_has(out, "tp=5", "tp=5");
    cr_assert_eq(count_lines(out), 1, "one line of error:\n%s", out);
    free(out);
}

// A malformed backend variable (TPTRAIN_OVERLAP_SMS, TPTRAIN_GEMM_SM90, the TPTRAIN_ATTN_* switches)
// stops the run before anything is built, on any backend, with one line naming it.
static void expect_bad_variable(const char *assignment) {
    char *out = malloc(OUT_CAP);
    cr_assert_not_null(out);
    int rc = tu_run(out, OUT_CAP, "cd '%s' && %s timeout 60 '%s' configs/tiny.yaml "
                    "--set train.steps=1 --set train.warmup_steps=0 --set eval.every=0 --set checkpoint.dir=",
                    tu_source_root(), assignment, tu_tptrain());
    cr_assert_eq(rc, 2, "%s: exit %d:\n%s", assignment, rc, out);
    expect_has(out, assignment, "the variable and its value");
    cr_assert_eq(count_lines(out), 1, "one line of error:\n%s", out);
    free(out);
}

Test(cli, bad_backend_variables) {
    expect_bad_variable("TPTRAIN_OVERLAP_SMS=12x");
    expect_bad_variable("TPTRAIN_GEMM_SM90=yes");
    expect_bad_variable("TPTRAIN_GEMM_SM90_TILE=192");
    expect_bad_variable("TPTRAIN_ATTN_ORDER=pair");
    expect_bad_variable("TPTRAIN_ATTN_BWD=splt");
    expect_bad_variable("TPTRAIN_ATTN_Q_STAGES=3");
    expect_bad_variable("TPTRAIN_ATTN_KV_STAGES=two");
    expect_bad_variable("TPTRAIN_GEMM_SM90_PLAIN=yes");
    expect_bad_variable("TPTRAIN_GEMM_SM90_TURN=early");
    expect_bad_variable("TPTRAIN_LN_BWD=pipeline");
    expect_bad_variable("TPTRAIN_ATTN_EXP2=poly");
    expect_bad_variable("TPTRAIN_EMB_BWD=sort");
    expect_bad_variable("TPTRAIN_STEP_GRAPH=yes");
    expect_bad_variable("TPTRAIN_GEMM_TUNE=off");
    expect_bad_variable("TPTRAIN_ATTN_BWD_SUMS=inside");
}

// ---- config file errors

// Writes a config into a fresh temp dir; returns its path in path.
static void write_config(char *dir, size_t dlen, char *path, size_t plen, const char *text) {
    tu_tmpdir(dir, dlen, "cli");
    tu_write_file(path, plen, dir, "cfg.yaml", text);
}

Test(cli, missing_data_file) {
    char dir[512], path[1024], args[2048];
    write_config(dir, sizeof dir, path, sizeof path,
                 "model:\n  n_layer: 1\ndata:\n  train: /nonexistent/tptrain-test/train_*.bin\n");
    snprintf(args, sizeof args, "'%s'", path);
    char *out = expect_exit(2, args);
    expect_has(out, "/nonexistent/tptrain-test/train_*.bin", "missing data");
    expect_has(out, "data.train", "missing data");
    char where[1100];
    snprintf(where, sizeof where, "%s:4:", path);
    expect_has(out, where, "missing data (points at the line)");
    free(out);
    // the same for validation data, given on the command line
    snprintf(args, sizeof args, "configs/tiny.yaml --set data.val=/nonexistent/val.bin");
    out = expect_exit(2, args);
    expect_has(out, "/nonexistent/val.bin", "missing val data");
    free(out);
    tu_rmtree(dir);
}

// Finds "path:LINE:COL:" in out and returns LINE and COL.
static bool find_position(const char *out, const char *path, int *line, int *col) {
    const char *p = strstr(out, path);
    if (!p) return false;
    p += strlen(path);
    return sscanf(p, ":%d:%d:", line, col) == 2;
}

Test(cli, malformed_yaml_gives_line_and_column) {
    char dir[512], path[1024], args[2048];
    write_config(dir, sizeof dir, path, sizeof path, "model:\n  n_layer: 2\n  n_head: [4\ntrain:\n  steps: 3\n");
    snprintf(args, sizeof args, "'%s'", path);
    char *out = expect_exit(2, args);
    int line = 0, col = 0;
    cr_assert(find_position(out, path, &line, &col), "no %s:LINE:COL in:\n%s", path, out);
    cr_assert(line >= 3 && line <= 5 && col >= 1, "position %d:%d for an unclosed '[' on line 3:\n%s", line, col, out);
    free(out);
    tu_rmtree(dir);

    // a tab in the indentation
    write_config(dir, sizeof dir, path, sizeof path, "model:\n  n_layer: 2\n\tn_head: 4\n");
    snprintf(args, sizeof args, "'%s'", path);
    out = expect_exit(2, args);
    cr_assert(find_position(out, path, &line, &col), "no %s:LINE:COL in:\n%s", path, out);
    cr_assert_eq(line, 3, "the tab is on line 3:\n%s", out);
    free(out);
    tu_rmtree(dir);

    // well-formed YAML, wrong type: the position of the value and the key
    write_config(dir, sizeof dir, path, sizeof path, "model:\n  n_layer: two\n");
    snprintf(args, sizeof args, "'%s'", path);
    out = expect_exit(2, args);
    cr_assert(find_position(out, path, &line, &col), "no %s:LINE:COL in:\n%s", path, out);
    cr_assert(line == 2 && col == 12, "position %d:%d, expected 2:12:\n%s", line, col, out);
    expect_has(out, "model.n_layer", "type error");
    free(out);
    tu_rmtree(dir);
}

Test(cli, missing_config_file) {
    char *out = expect_exit(2, "/nonexistent/tptrain.yaml");
    expect_has(out, "/nonexistent/tptrain.yaml", "missing config");
    free(out);
}

// ---- hostile input (each case crashed, overflowed, ran for minutes or printed without end)

Test(cli, huge_sizes_are_refused_with_their_limit) {
    // n_head = n_embd = INT_MAX with tp 2 divided by zero in the tp suggestion loop
    char *out = expect_exit(2, "--dry-run configs/tiny.yaml --set model.n_head=2147483647 "
                               "--set model.n_embd=2147483647 --set parallel.tp=2");
    expect_has(out, "model.n_head=2147483647: must be <= 65536", "head bound");
    free(out);
    out = expect_exit(2, "--dry-run configs/tiny.yaml --set model.vocab_size=2147483647");
    expect_has(out, "must be <= 16777216", "vocabulary bound");
    free(out);
    out = expect_exit(2, "--dry-run configs/tiny.yaml --set train.micro_batch=1048576 --set model.seq_len=16777216");
    expect_has(out, "tokens in one micro-step exceeds", "micro-step tokens");
    free(out);
    out = expect_exit(2, "--dry-run configs/tiny.yaml --set parallel.dp=2147483647");
    expect_has(out, "parallel.dp=2147483647: must be <= 65536", "dp bound");
    free(out);
}

Test(cli, dry_run_of_a_large_mesh_stays_short) {
    char *out = expect_exit(0, "--dry-run configs/tiny.yaml --set parallel.dp=65536");
    expect_has(out, "#   ... (65520 ranks more)", "elided ranks");
    expect_has(out, "#   rank 65535 -> (dp 65535, tp 0)", "last rank");
    cr_assert_lt(count_lines(out), 400, "a dry run of 65536 ranks printed %d lines", count_lines(out));
    free(out);
}

Test(cli, endless_or_deep_config_is_refused_fast) {
    char *out = expect_exit(2, "--dry-run /dev/zero");
    expect_has(out, "/dev/zero: larger than 1048576 bytes", "size cap");
    free(out);
    char dir[256], path[512];
    tu_tmpdir(dir, sizeof dir, "deep");
    snprintf(path, sizeof path, "%s/deep.yaml", dir);
    FILE *f = fopen(path, "w");
    cr_assert_not_null(f);
    fputs("model:\n  n_layer: ", f);
    for (int i = 0; i < 200000; i++) fputc('[', f);
    fclose(f);
    char args[600];
    snprintf(args, sizeof args, "--dry-run '%s'", path);
    double t0 = tp_now();
    out = expect_exit(2, args);
    double s = tp_now() - t0;
    expect_has(out, ":2: [ and { nest 200000 deep; a config needs at most 16", "depth cap");
    cr_expect_lt(s, 5.0, "refusing 200000 '[' took %.1f s", s);
    free(out);
    // quotes and comments do not count
    tu_write_file(path, sizeof path, dir, "ok.yaml",
                  "model:\n  n_layer: 2 # [[[[[[[[[[[[[[[[[[[[[[[[\ndata:\n  train: \"data/[[[[[[[[[[[[[[[[[[[[*.bin\"\n");
    snprintf(args, sizeof args, "--dry-run '%s'", path);
    out = malloc(OUT_CAP);
    tptrain(out, args);
    cr_assert(!strstr(out, "nest"), "brackets in comments and quotes were counted:\n%s", out);
    free(out);
    tu_rmtree(dir);
}

// Standard output is the result of --dry-run, --help and --generate: a full disk there is a failed
// run (exit 1 and one line on stderr), not a silent exit 0.
Test(cli, full_stdout_fails_the_run) {
    char out[OUT_CAP];
    int rc = tu_run(out, sizeof out, "cd '%s' && timeout 60 '%s' --dry-run configs/tiny.yaml > /dev/full",
                    tu_source_root(), tu_tptrain());
    cr_assert_eq(rc, 1, "--dry-run > /dev/full: exit %d, want 1:\n%s", rc, out);
    expect_has(out, "tptrain: standard output: ", "stdout error");
    expect_has(out, "the output is incomplete", "stdout error");
    cr_assert_eq(count_lines(out), 1, "one line of error:\n%s", out);
    rc = tu_run(out, sizeof out, "timeout 60 '%s' --help > /dev/full", tu_tptrain());
    cr_assert_eq(rc, 1, "--help > /dev/full: exit %d, want 1:\n%s", rc, out);
}

// --eval options that would run away or do nothing useful are refused up front.
Test(cli, eval_options_have_bounds) {
    char *out = expect_exit(2, "--eval /nonexistent --generate 5 --temperature inf");
    expect_has(out, "--temperature inf: expected a positive finite number", "temperature");
    free(out);
    out = expect_exit(2, "--eval /nonexistent --generate 2147483647");
    expect_has(out, "--generate 2147483647: at most 1048576 tokens", "generate bound");
    free(out);
}
