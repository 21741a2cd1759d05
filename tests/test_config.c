// test_config.c: the config module: defaults, YAML loading and its error messages (position, key,
// reason, exit code), --set overrides, cross-field validation, printing round trips, the shipped
// configs and the embedded default.
#include <criterion/criterion.h>

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common.h"
#include "config.h"
#include "testutil.h"

// ---- helpers

// Writes text to a fresh temp file and loads it on top of cfg; path receives the file's path
// (the prefix every message must start with).
static int load_text(struct tp_config *cfg, const char *text, char *path, size_t pathlen,
                     char *err, size_t errlen) {
    char dir[512];
    tu_tmpdir(dir, sizeof dir, "cfg");
    tu_write_file(path, pathlen, dir, "run.yaml", text);
    int rc = config_load_file(cfg, path, err, errlen);
    tu_rmtree(dir);
    return rc;
}

static void load_ok(struct tp_config *cfg, const char *text) {
    char path[1024], err[1024] = "";
    int rc = load_text(cfg, text, path, sizeof path, err, sizeof err);
    cr_assert_eq(rc, 0, "load failed (%d): %s\n--- yaml:\n%s", rc, err, text);
}

// Loads text over the defaults, expects exit code 2 and a one-line message that starts with
// "PATH:where: key: " and contains `reason`. `where` is "LINE:COL", or NULL for messages that
// carry no position (empty file).
static void expect_load_error(const char *text, const char *where, const char *key,
                              const char *reason) {
    struct tp_config cfg;
    config_defaults(&cfg);
    char path[1024], err[1024] = "";
    int rc = load_text(&cfg, text, path, sizeof path, err, sizeof err);
    cr_assert_eq(rc, TP_EXIT_USAGE, "rc %d (want 2) for:\n%s\nerr: %s", rc, text, err);
    cr_assert_null(strchr(err, '\n'), "message must be one line: %s", err);
    char prefix[1200];
    if (where && key) snprintf(prefix, sizeof prefix, "%s:%s: %s: ", path, where, key);
    else if (where) snprintf(prefix, sizeof prefix, "%s:%s: ", path, where);
    else snprintf(prefix, sizeof prefix, "%s: ", path);
    cr_assert(strncmp(err, prefix, strlen(prefix)) == 0, "message '%s' does not start with '%s'",
              err, prefix);
    cr_assert(strstr(err, reason), "message '%s' lacks '%s'", err, reason);
}

static void expect_set_error(const char *assignment, const char *reason) {
    struct tp_config cfg;
    config_defaults(&cfg);
    struct tp_config before = cfg;
    char err[1024] = "";
    int rc = config_apply_set(&cfg, assignment, err, sizeof err);
    cr_assert_eq(rc, TP_EXIT_USAGE, "rc %d for --set %s (err: %s)", rc, assignment, err);
    char prefix[512];
    snprintf(prefix, sizeof prefix, "--set %s: ", assignment);
    cr_assert(strncmp(err, prefix, strlen(prefix)) == 0, "message '%s' does not start with '%s'",
              err, prefix);
    cr_assert(strstr(err, reason), "message '%s' lacks '%s'", err, reason);
    cr_assert_eq(memcmp(&cfg, &before, sizeof cfg), 0, "a rejected --set must change nothing");
}

static void set_ok(struct tp_config *cfg, const char *assignment) {
    char err[1024] = "";
    int rc = config_apply_set(cfg, assignment, err, sizeof err);
    cr_assert_eq(rc, 0, "--set %s failed: %s", assignment, err);
}

// Every field, one by one (strings compared as strings: bytes after the NUL may differ).
static void assert_same_config(const struct tp_config *a, const struct tp_config *b) {
    cr_assert_eq(a->model.n_layer, b->model.n_layer);
    cr_assert_eq(a->model.n_head, b->model.n_head);
    cr_assert_eq(a->model.n_embd, b->model.n_embd);
    cr_assert_eq(a->model.vocab_size, b->model.vocab_size);
    cr_assert_eq(a->model.seq_len, b->model.seq_len);
    cr_assert_eq(a->parallel.tp, b->parallel.tp);
    cr_assert_eq(a->parallel.dp, b->parallel.dp);
    cr_assert_eq(a->parallel.comm, b->parallel.comm);
    cr_assert_eq(a->parallel.device, b->parallel.device);
    cr_assert_eq(a->train.micro_batch, b->train.micro_batch);
    cr_assert_eq(a->train.global_batch, b->train.global_batch);
    cr_assert_eq(a->train.grad_accum, b->train.grad_accum);
    cr_assert_eq(a->train.steps, b->train.steps);
    cr_assert_eq(a->train.lr, b->train.lr, "lr %.17g vs %.17g", a->train.lr, b->train.lr);
    cr_assert_eq(a->train.min_lr, b->train.min_lr);
    cr_assert_eq(a->train.warmup_steps, b->train.warmup_steps);
    cr_assert_eq(a->train.schedule, b->train.schedule);
    cr_assert_eq(a->train.weight_decay, b->train.weight_decay);
    cr_assert_eq(a->train.beta1, b->train.beta1);
    cr_assert_eq(a->train.beta2, b->train.beta2);
    cr_assert_eq(a->train.eps, b->train.eps);
    cr_assert_eq(a->train.grad_clip, b->train.grad_clip);
    cr_assert_eq(a->train.seed, b->train.seed);
    cr_assert_eq(a->train.precision, b->train.precision);
    cr_assert_eq(a->train.recompute, b->train.recompute);
    cr_assert_eq(a->parallel.sequence_parallel, b->parallel.sequence_parallel);
    cr_assert_str_eq(a->data.train, b->data.train);
    cr_assert_str_eq(a->data.val, b->data.val);
    cr_assert_eq(a->eval.every, b->eval.every);
    cr_assert_eq(a->eval.batches, b->eval.batches);
    cr_assert_str_eq(a->checkpoint.dir, b->checkpoint.dir);
    cr_assert_eq(a->checkpoint.every, b->checkpoint.every);
    cr_assert_eq(a->checkpoint.keep, b->checkpoint.keep);
    cr_assert_str_eq(a->checkpoint.resume, b->checkpoint.resume);
    cr_assert_eq(a->log.every, b->log.every);
    cr_assert_str_eq(a->log.jsonl, b->log.jsonl);
    cr_assert_eq(a->log.peak_tflops, b->log.peak_tflops);
    cr_assert_str_eq(a->init.from, b->init.from);
    cr_assert_eq(a->debug.check_replicas, b->debug.check_replicas);
    cr_assert_str_eq(a->debug.dump_init, b->debug.dump_init);
    cr_assert_eq(a->debug.grad_norms, b->debug.grad_norms);
    cr_assert_eq(a->debug.profile_step, b->debug.profile_step);
}

// config_print's output as a string (caller frees).
static char *print_to_string(const struct tp_config *cfg, size_t *len) {
    char *buf = NULL;
    FILE *f = open_memstream(&buf, len);
    cr_assert_not_null(f);
    config_print(cfg, f);
    fclose(f);
    return buf;
}

// Prints cfg, loads the text over fresh defaults and checks every field came back.
static void assert_round_trip(const struct tp_config *cfg) {
    size_t len;
    char *text = print_to_string(cfg, &len);
    struct tp_config back;
    config_defaults(&back);
    char err[1024] = "";
    int rc = config_load_string(&back, text, len, "printed", err, sizeof err);
    cr_assert_eq(rc, 0, "printed config does not load: %s\n%s", err, text);
    assert_same_config(cfg, &back);
    free(text);
}

// A config whose every key differs from its default; paths point into dir.
static void write_full_config(char *text, size_t len, const char *dir) {
    snprintf(text, len,
             "# every key, none at its default\n"
             "model:\n"
             "  n_layer: 3\n"
             "  n_head: 6\n"
             "  n_embd: 96\n"
             "  vocab_size: 1000\n"
             "  seq_len: 48\n"
             "parallel:\n"
             "  tp: 2\n"
             "  dp: 3\n"
             "  comm: mpi\n"
             "  device: cpu\n"
             "  sequence_parallel: true\n"
             "train:\n"
             "  micro_batch: 2\n"
             "  global_batch: 576\n"
             "  grad_accum: 2\n"
             "  steps: 7\n"
             "  lr: 6e-4\n"
             "  min_lr: 1.5e-5\n"
             "  warmup_steps: 2\n"
             "  schedule: linear\n"
             "  weight_decay: 0.01\n"
             "  beta1: 0.8\n"
             "  beta2: 0.999\n"
             "  eps: 1e-6\n"
             "  grad_clip: 0.5\n"
             "  seed: 18446744073709551615\n"
             "  precision: bf16\n"
             "  recompute: selective\n"
             "data:\n"
             "  train: \"%s/tr*.bin\"\n"
             "  val: '%s/va*.bin'\n"
             "eval:\n"
             "  every: 5\n"
             "  batches: 2\n"
             "checkpoint:\n"
             "  dir: %s/ckpt\n"
             "  every: 4\n"
             "  keep: 0\n"
             "  resume: auto\n"
             "log:\n"
             "  every: 3\n"
             "  jsonl: \"%s/log \\\"q\\\" #1.jsonl\"\n"
             "  peak_tflops: 989.5\n"
             "init:\n"
             "  from: %s/init.safetensors\n"
             "debug:\n"
             "  check_replicas: yes\n"
             "  dump_init: %s/dump.safetensors\n"
             "  grad_norms: on\n",
             dir, dir, dir, dir, dir, dir);
}

// ---- defaults

Test(config, defaults_match_the_documented_values) {
    struct tp_config c;
    config_defaults(&c);
    cr_assert_eq(c.model.n_layer, 12);
    cr_assert_eq(c.model.n_head, 12);
    cr_assert_eq(c.model.n_embd, 768);
    cr_assert_eq(c.model.vocab_size, 50257);
    cr_assert_eq(c.model.seq_len, 1024);
    cr_assert_eq(c.parallel.tp, 1);
    cr_assert_eq(c.parallel.dp, 0);
    cr_assert_eq(c.parallel.comm, TP_COMM_AUTO);
    cr_assert_eq(c.parallel.device, TP_DEVICE_AUTO);
    cr_assert_eq(c.parallel.sequence_parallel, false);
    cr_assert_eq(c.train.micro_batch, 4);
    cr_assert_eq(c.train.global_batch, 0);
    cr_assert_eq(c.train.grad_accum, 0);
    cr_assert_eq(c.train.steps, 100);
    cr_assert_eq(c.train.lr, 6e-4);
    cr_assert_eq(c.train.min_lr, 6e-5);
    cr_assert_eq(c.train.warmup_steps, 0);
    cr_assert_eq(c.train.schedule, TP_SCHED_COSINE);
    cr_assert_eq(c.train.weight_decay, 0.1);
    cr_assert_eq(c.train.beta1, 0.9);
    cr_assert_eq(c.train.beta2, 0.95);
    cr_assert_eq(c.train.eps, 1e-8);
    cr_assert_eq(c.train.grad_clip, 1.0);
    cr_assert_eq(c.train.seed, 1337ULL);
    cr_assert_eq(c.train.precision, TP_PREC_FP32);
    cr_assert_eq(c.train.recompute, TP_RECOMPUTE_NONE);
    cr_assert_str_eq(c.data.train, "data/tinyshakespeare_train.bin");
    cr_assert_str_eq(c.data.val, "data/tinyshakespeare_val.bin");
    cr_assert_eq(c.eval.every, 0);
    cr_assert_eq(c.eval.batches, 8);
    cr_assert_str_eq(c.checkpoint.dir, "");
    cr_assert_eq(c.checkpoint.every, 0);
    cr_assert_eq(c.checkpoint.keep, 3);
    cr_assert_str_eq(c.checkpoint.resume, "");
    cr_assert_eq(c.log.every, 1);
    cr_assert_str_eq(c.log.jsonl, "");
    cr_assert_eq(c.log.peak_tflops, 0.0);
    cr_assert_str_eq(c.init.from, "");
    cr_assert_eq(c.debug.check_replicas, false);
    cr_assert_str_eq(c.debug.dump_init, "");
    cr_assert_eq(c.debug.grad_norms, false);
    cr_assert_eq(c.debug.profile_step, 0);
}

Test(config, enum_names) {
    cr_assert_str_eq(config_comm_name(TP_COMM_AUTO), "auto");
    cr_assert_str_eq(config_comm_name(TP_COMM_NCCL), "nccl");
    cr_assert_str_eq(config_comm_name(TP_COMM_MPI), "mpi");
    cr_assert_str_eq(config_schedule_name(TP_SCHED_COSINE), "cosine");
    cr_assert_str_eq(config_schedule_name(TP_SCHED_LINEAR), "linear");
    cr_assert_str_eq(config_schedule_name(TP_SCHED_CONSTANT), "constant");
    cr_assert_str_eq(config_precision_name(TP_PREC_FP32), "fp32");
    cr_assert_str_eq(config_precision_name(TP_PREC_BF16), "bf16");
    cr_assert_str_eq(config_device_name(TP_DEVICE_AUTO), "auto");
    cr_assert_str_eq(config_device_name(TP_DEVICE_CPU), "cpu");
    cr_assert_str_eq(config_device_name(TP_DEVICE_CUDA), "cuda");
    cr_assert_str_eq(config_recompute_name(TP_RECOMPUTE_NONE), "none");
    cr_assert_str_eq(config_recompute_name(TP_RECOMPUTE_SELECTIVE), "selective");
    cr_assert_str_eq(config_recompute_name(TP_RECOMPUTE_FULL), "full");
    cr_assert_str_eq(config_comm_name((enum tp_comm_kind)7), "?");
}

// ---- loading and round trips

Test(config, full_file_loads_every_field) {
    char dir[512], text[8192];
    tu_tmpdir(dir, sizeof dir, "cfgfull");
    write_full_config(text, sizeof text, dir);
    struct tp_config c;
    config_defaults(&c);
    load_ok(&c, text);

    cr_assert_eq(c.model.n_layer, 3);
    cr_assert_eq(c.model.n_head, 6);
    cr_assert_eq(c.model.n_embd, 96);
    cr_assert_eq(c.model.vocab_size, 1000);
    cr_assert_eq(c.model.seq_len, 48);
    cr_assert_eq(c.parallel.tp, 2);
    cr_assert_eq(c.parallel.dp, 3);
    cr_assert_eq(c.parallel.comm, TP_COMM_MPI);
    cr_assert_eq(c.parallel.device, TP_DEVICE_CPU);
    cr_assert_eq(c.parallel.sequence_parallel, true);
    cr_assert_eq(c.train.micro_batch, 2);
    cr_assert_eq(c.train.global_batch, 576);
    cr_assert_eq(c.train.grad_accum, 2);
    cr_assert_eq(c.train.steps, 7);
    cr_assert_eq(c.train.lr, 6e-4);
    cr_assert_eq(c.train.min_lr, 1.5e-5);
    cr_assert_eq(c.train.warmup_steps, 2);
    cr_assert_eq(c.train.schedule, TP_SCHED_LINEAR);
    cr_assert_eq(c.train.weight_decay, 0.01);
    cr_assert_eq(c.train.beta1, 0.8);
    cr_assert_eq(c.train.beta2, 0.999);
    cr_assert_eq(c.train.eps, 1e-6);
    cr_assert_eq(c.train.grad_clip, 0.5);
    cr_assert_eq(c.train.seed, 18446744073709551615ULL);
    cr_assert_eq(c.train.precision, TP_PREC_BF16);
    cr_assert_eq(c.train.recompute, TP_RECOMPUTE_SELECTIVE);
    char want[1200];
    snprintf(want, sizeof want, "%s/tr*.bin", dir);
    cr_assert_str_eq(c.data.train, want);
    snprintf(want, sizeof want, "%s/va*.bin", dir);
    cr_assert_str_eq(c.data.val, want);
    cr_assert_eq(c.eval.every, 5);
    cr_assert_eq(c.eval.batches, 2);
    snprintf(want, sizeof want, "%s/ckpt", dir);
    cr_assert_str_eq(c.checkpoint.dir, want);
    cr_assert_eq(c.checkpoint.every, 4);
    cr_assert_eq(c.checkpoint.keep, 0);
    cr_assert_str_eq(c.checkpoint.resume, "auto");
    cr_assert_eq(c.log.every, 3);
    snprintf(want, sizeof want, "%s/log \"q\" #1.jsonl", dir);
    cr_assert_str_eq(c.log.jsonl, want);
    cr_assert_eq(c.log.peak_tflops, 989.5);
    snprintf(want, sizeof want, "%s/init.safetensors", dir);
    cr_assert_str_eq(c.init.from, want);
    cr_assert_eq(c.debug.check_replicas, true);
    snprintf(want, sizeof want, "%s/dump.safetensors", dir);
    cr_assert_str_eq(c.debug.dump_init, want);
    cr_assert_eq(c.debug.grad_norms, true);
    tu_rmtree(dir);
}

Test(config, printed_config_round_trips) {
    char dir[512], text[8192];
    tu_tmpdir(dir, sizeof dir, "cfgrt");
    write_full_config(text, sizeof text, dir);
    struct tp_config c;
    config_defaults(&c);
    load_ok(&c, text);
    assert_round_trip(&c);
    tu_rmtree(dir);

    // The defaults, and strings YAML would misread if printed bare.
    config_defaults(&c);
    assert_round_trip(&c);
    snprintf(c.checkpoint.dir, sizeof c.checkpoint.dir, "a: b # c\\d\t'e'\"f\"");
    snprintf(c.data.val, sizeof c.data.val, "~");
    snprintf(c.log.jsonl, sizeof c.log.jsonl, "yes");
    c.train.lr = 0.1 + 0.2; // needs all 17 digits
    c.train.eps = 1e-300;
    assert_round_trip(&c);
}

Test(config, print_writes_every_section_and_key) {
    struct tp_config c;
    config_defaults(&c);
    size_t len;
    char *text = print_to_string(&c, &len);
    const char *expect[] = {"\nmodel:\n",
                            "\nparallel:\n",
                            "\ntrain:\n",
                            "\ndata:\n",
                            "\neval:\n",
                            "\ncheckpoint:\n",
                            "\nlog:\n",
                            "\ninit:\n",
                            "\ndebug:\n",
                            "  n_layer: 12\n",
                            "  lr: 0.0006\n",
                            "  comm: auto\n",
                            "  schedule: cosine\n",
                            "  precision: fp32\n",
                            "  seed: 1337\n",
                            "  check_replicas: false\n",
                            "  dump_init: \"\"\n",
                            "  grad_norms: false\n",
                            "  train: \"data/tinyshakespeare_train.bin\"\n"};
    for (size_t i = 0; i < sizeof expect / sizeof expect[0]; i++)
        cr_assert(strstr(text, expect[i]), "printed config lacks '%s':\n%s", expect[i], text);
    free(text);
}

Test(config, partial_file_keeps_other_defaults_and_accepts_yaml_spellings) {
    struct tp_config c;
    config_defaults(&c);
    load_ok(&c, "model:\n"
                "  n_layer: +4      # comment after a value\n"
                "train: {lr: 3e-4, schedule: CONSTANT, seed: 7}\n"
                "debug:\n"
                "  check_replicas: On\n"
                "checkpoint:\n"
                "  dir: ~\n"
                "log:\n"
                "eval:\n"
                "  batches: 3\n");
    cr_assert_eq(c.model.n_layer, 4);
    cr_assert_eq(c.model.n_head, 12, "keys not in the file keep their value");
    cr_assert_eq(c.train.lr, 3e-4);
    cr_assert_eq(c.train.schedule, TP_SCHED_CONSTANT);
    cr_assert_eq(c.train.seed, 7ULL);
    cr_assert_eq(c.debug.check_replicas, true);
    cr_assert_str_eq(c.checkpoint.dir, "");
    cr_assert_eq(c.eval.batches, 3);
    cr_assert_eq(c.log.every, 1);
}

Test(config, booleans_accept_every_yaml_spelling) {
    const char *yes[] = {"true", "True", "yes", "YES", "on"},
               *no[] = {"false", "FALSE", "no", "off"};
    char text[128];
    for (size_t i = 0; i < 5; i++) {
        struct tp_config c;
        config_defaults(&c);
        snprintf(text, sizeof text, "debug:\n  grad_norms: %s\n", yes[i]);
        load_ok(&c, text);
        cr_assert_eq(c.debug.grad_norms, true, "%s", yes[i]);
    }
    for (size_t i = 0; i < 4; i++) {
        struct tp_config c;
        config_defaults(&c);
        c.debug.grad_norms = true;
        snprintf(text, sizeof text, "debug:\n  grad_norms: %s\n", no[i]);
        load_ok(&c, text);
        cr_assert_eq(c.debug.grad_norms, false, "%s", no[i]);
    }
}

Test(config, failed_load_leaves_config_unchanged) {
    struct tp_config c;
    config_defaults(&c);
    struct tp_config before = c;
    char path[1024], err[1024];
    int rc =
        load_text(&c, "model:\n  n_layer: 2\n  n_head: x\n", path, sizeof path, err, sizeof err);
    cr_assert_eq(rc, TP_EXIT_USAGE);
    cr_assert_eq(memcmp(&c, &before, sizeof c), 0, "n_layer must not stick after a failed load");
}

Test(config, source_names_the_file) {
    struct tp_config c;
    config_defaults(&c);
    char path[1024], err[1024];
    cr_assert_eq(load_text(&c, "model:\n  n_layer: 2\n", path, sizeof path, err, sizeof err), 0);
    cr_assert_str_eq(c.source, path);
    const char *yaml = "model:\n  n_layer: 3\n";
    cr_assert_eq(config_load_string(&c, yaml, strlen(yaml), "<default>", err, sizeof err), 0);
    cr_assert_str_eq(c.source, "<default>");
}

// ---- load errors: each names the position, the key and the reason, and returns 2

Test(config, unknown_key_suggests_the_nearest) {
    expect_load_error("model:\n  n_layer: 2\n  n_embed: 64\n", "3:3", "model.n_embed",
                      "unknown key 'model.n_embed'; did you mean 'model.n_embd'?");
    expect_load_error("model:\n  lr: 1e-3\n", "2:3", "model.lr", "did you mean 'train.lr'?");
    expect_load_error("train:\n  warmup: 5\n", "2:3", "train.warmup",
                      "did you mean 'train.warmup_steps'?");
    // Nothing close: list what the section takes instead.
    expect_load_error("model:\n  depth: 2\n", "2:3", "model.depth",
                      "model takes n_layer, n_head, n_embd, vocab_size, seq_len");
}

Test(config, unknown_section) {
    expect_load_error("modle:\n  n_layer: 2\n", "1:1", "modle", "did you mean 'model'?");
    expect_load_error("model:\n  n_layer: 2\nxyz:\n  a: 1\n", "3:1", "xyz",
                      "sections are model, parallel, train");
    expect_load_error("n_layer: 2\n", "1:1", "n_layer", "'model.n_layer'");
}

Test(config, wrong_types) {
    expect_load_error("model:\n  n_layer: abc\n", "2:12", "model.n_layer",
                      "expected an integer, got 'abc'");
    expect_load_error("model:\n  n_layer: 1.5\n", "2:12", "model.n_layer",
                      "expected an integer, got '1.5'");
    expect_load_error("model:\n  n_layer: 99999999999\n", "2:12", "model.n_layer", "out of range");
    expect_load_error("train:\n  global_batch: 99999999999999999999\n", "2:17",
                      "train.global_batch", "out of range");
    expect_load_error("train:\n  seed: -1\n", "2:9", "train.seed", "non-negative integer");
    expect_load_error("train:\n  lr: fast\n", "2:7", "train.lr", "expected a number, got 'fast'");
    expect_load_error("train:\n  lr: .nan\n", "2:7", "train.lr", "expected a number");
    expect_load_error("train:\n  lr: 1e999\n", "2:7", "train.lr", "out of range");
    expect_load_error("debug:\n  check_replicas: maybe\n", "2:19", "debug.check_replicas",
                      "expected a boolean (true/false, yes/no, on/off), got 'maybe'");
    expect_load_error("parallel:\n  comm: gloo\n", "2:9", "parallel.comm",
                      "expected one of auto, nccl, mpi; got 'gloo'");
    expect_load_error("train:\n  precision: fp16\n", "2:14", "train.precision", "fp32, bf16");
    expect_load_error("train:\n  schedule: step\n", "2:13", "train.schedule",
                      "cosine, linear, constant");
    expect_load_error("model:\n  n_layer: [1, 2]\n", "2:12", "model.n_layer",
                      "expected a single value, got a sequence");
    expect_load_error("model: 12\n", "1:8", "model", "expected a mapping of keys");
}

Test(config, out_of_range_values) {
    expect_load_error("model:\n  n_layer: 0\n", "2:12", "model.n_layer", "must be >= 1, got 0");
    expect_load_error("model:\n  n_head: -2\n", "2:11", "model.n_head", "must be >= 1");
    expect_load_error("parallel:\n  tp: 0\n", "2:7", "parallel.tp", "must be >= 1");
    expect_load_error("parallel:\n  dp: -1\n", "2:7", "parallel.dp", "must be >= 0");
    expect_load_error("train:\n  micro_batch: 0\n", "2:16", "train.micro_batch", "must be >= 1");
    expect_load_error("train:\n  steps: -1\n", "2:10", "train.steps", "must be >= 0");
    expect_load_error("train:\n  lr: 0\n", "2:7", "train.lr", "must be > 0, got 0");
    expect_load_error("train:\n  beta1: 1\n", "2:10", "train.beta1", "must be in [0, 1), got 1");
    expect_load_error("train:\n  beta2: -0.1\n", "2:10", "train.beta2", "must be in [0, 1)");
    expect_load_error("train:\n  eps: 0\n", "2:8", "train.eps", "must be > 0");
    expect_load_error("train:\n  grad_clip: -1\n", "2:14", "train.grad_clip", "must be >= 0");
    expect_load_error("eval:\n  batches: 0\n", "2:12", "eval.batches", "data.val");
    expect_load_error("log:\n  every: 0\n", "2:10", "log.every", "must be >= 1");
}

Test(config, malformed_yaml_reports_libyaml_position) {
    // A key indented less than its siblings: libyaml notices at the stray key.
    expect_load_error("model:\n  n_layer: 2\n n_head: 4\n", "3:2", NULL,
                      "invalid YAML: did not find expected key");
    expect_load_error("model: {n_layer: 2\n", "2:1", NULL, "invalid YAML");
    expect_load_error("model:\n\tn_layer: 2\n", "2:1", NULL, "tab");
}

Test(config, empty_file_and_non_mapping_top_level) {
    expect_load_error("", NULL, NULL,
                      "empty config; expected a mapping with sections model, parallel, train, "
                      "data, eval, checkpoint, log, init, debug");
    expect_load_error("# only a comment\n", NULL, NULL, "empty config");
    expect_load_error("- model\n- train\n", "1:1", "(top level)",
                      "expected a mapping with sections model, parallel");
    expect_load_error("\n\nhello\n", "3:1", "(top level)", "got a scalar");
    expect_load_error("model:\n  n_layer: 2\n---\nmodel:\n  n_layer: 3\n", "3:1", "(top level)",
                      "a second YAML document");
}

Test(config, duplicate_keys) {
    expect_load_error("model:\n  n_layer: 2\n  n_head: 4\n  n_layer: 3\n", "4:3", "model.n_layer",
                      "duplicate key 'model.n_layer' (first set at line 2, column 3)");
    expect_load_error("model:\n  n_layer: 2\ntrain:\n  lr: 1e-3\nmodel:\n  n_head: 4\n", "5:1",
                      "model", "duplicate section 'model' (first at line 1, column 1)");
}

Test(config, missing_file) {
    struct tp_config c;
    config_defaults(&c);
    char err[1024];
    int rc = config_load_file(&c, "/nonexistent/dir/run.yaml", err, sizeof err);
    cr_assert_eq(rc, TP_EXIT_USAGE);
    cr_assert_str_eq(err, "/nonexistent/dir/run.yaml: cannot open: No such file or directory");
}

// ---- --set overrides

Test(config, set_overrides_keys_with_file_semantics) {
    struct tp_config c;
    config_defaults(&c);
    load_ok(&c, "model:\n  n_layer: 2\ndata:\n  val: v.bin\n");
    set_ok(&c, "model.n_layer=4");
    set_ok(&c, "train.lr=1e-3");
    set_ok(&c, "parallel.comm=mpi");
    set_ok(&c, "debug.grad_norms=yes");
    set_ok(&c, "train.seed=42");
    set_ok(&c, "data.val=");
    set_ok(&c, " checkpoint.dir = runs/a b ");
    set_ok(&c, "log.jsonl='null'");
    set_ok(&c, "debug.dump_init=x=y.safetensors");
    set_ok(&c, "debug.profile_step=3");
    cr_assert_eq(c.model.n_layer, 4);
    cr_assert_eq(c.train.lr, 1e-3);
    cr_assert_eq(c.parallel.comm, TP_COMM_MPI);
    cr_assert_eq(c.debug.grad_norms, true);
    cr_assert_eq(c.debug.profile_step, 3);
    cr_assert_eq(c.train.seed, 42ULL);
    cr_assert_str_eq(c.data.val, "", "an empty value clears a path");
    cr_assert_str_eq(c.checkpoint.dir, "runs/a b");
    cr_assert_str_eq(c.log.jsonl, "null", "quotes make a string literal");
    cr_assert_str_eq(c.debug.dump_init, "x=y.safetensors", "only the first '=' splits");
}

Test(config, bad_set_values) {
    expect_set_error("model.n_layer=abc", "expected an integer, got 'abc'");
    expect_set_error("model.n_layer=0", "must be >= 1");
    expect_set_error("train.lr=0", "must be > 0");
    expect_set_error("debug.profile_step=-1", "must be >= 0");
    expect_set_error("parallel.comm=gloo", "expected one of auto, nccl, mpi");
    expect_set_error("model.n_layer", "expected key.path=value");
    expect_set_error("model.n_embed=64",
                     "unknown key 'model.n_embed'; did you mean 'model.n_embd'?");
    expect_set_error("n_layer=4", "did you mean 'model.n_layer'?");
    expect_set_error("=4", "unknown key");

    struct tp_config c;
    config_defaults(&c);
    char err[1024];
    cr_assert_eq(config_apply_set(&c, "model.n_layer=abc", err, sizeof err), TP_EXIT_USAGE);
    cr_assert_str_eq(err, "--set model.n_layer=abc: expected an integer, got 'abc'");
}

// ---- validation

// A temp dir holding train and val shard files (validation only checks that they exist).
struct data_dir {
    char dir[512];
    char train[TP_PATH_MAX], val[TP_PATH_MAX];
};

static void make_data_dir(struct data_dir *d) {
    char path[1100];
    tu_tmpdir(d->dir, sizeof d->dir, "cfgdata");
    tu_write_file(path, sizeof path, d->dir, "tr_000.bin", "x");
    tu_write_file(path, sizeof path, d->dir, "tr_001.bin", "x");
    tu_write_file(path, sizeof path, d->dir, "va_000.bin", "x");
    snprintf(d->train, sizeof d->train, "%s/tr_*.bin", d->dir);
    snprintf(d->val, sizeof d->val, "%s/va_*.bin", d->dir);
}

// Defaults with data pointing at existing files, so that validation reaches the check under test.
static void valid_config(struct tp_config *c, const struct data_dir *d) {
    config_defaults(c);
    snprintf(c->data.train, sizeof c->data.train, "%s", d->train);
    snprintf(c->data.val, sizeof c->data.val, "%s", d->val);
}

static void expect_invalid(struct tp_config *c, int world_size, const char *prefix,
                           const char *needle1, const char *needle2) {
    char err[1024] = "";
    int rc = config_validate(c, world_size, err, sizeof err);
    cr_assert_eq(rc, TP_EXIT_USAGE, "rc %d, err: %s", rc, err);
    cr_assert_null(strchr(err, '\n'), "message must be one line: %s", err);
    if (prefix)
        cr_assert(strncmp(err, prefix, strlen(prefix)) == 0,
                  "message '%s' does not start with '%s'", err, prefix);
    cr_assert(strstr(err, needle1), "message '%s' lacks '%s'", err, needle1);
    if (needle2) cr_assert(strstr(err, needle2), "message '%s' lacks '%s'", err, needle2);
}

static void expect_valid(struct tp_config *c, int world_size) {
    char err[1024] = "";
    int rc = config_validate(c, world_size, err, sizeof err);
    cr_assert_eq(rc, 0, "validate failed: %s", err);
}

Test(config, tp_must_divide_heads_and_names_both_numbers) {
    struct data_dir d;
    make_data_dir(&d);
    struct tp_config c;
    valid_config(&c, &d);
    char text[4096], path[1024], err[1024];
    snprintf(text, sizeof text, "model:\n  n_head: 12\nparallel:\n  tp: 5\ndata:\n  train: %s\n",
             d.train);
    cr_assert_eq(load_text(&c, text, path, sizeof path, err, sizeof err), 0, "%s", err);
    char prefix[1200];
    snprintf(prefix, sizeof prefix, "%s:4:7: parallel.tp: ", path);
    expect_invalid(&c, 0, prefix, "n_head=12 is not divisible by tp=5",
                   "choose tp in {1, 2, 3, 4, 6, 12}");

    // The same through --set cites the override; a known world size narrows the choices.
    valid_config(&c, &d);
    set_ok(&c, "parallel.tp=5");
    expect_invalid(&c, 8, "--set parallel.tp=5: ", "n_head=12", "{1, 2, 4}");
    tu_rmtree(d.dir);
}

// Sequence parallelism splits every sequence's tokens over the tp ranks: seq_len % tp is refused
// naming both numbers and the way out, cited at the option (from the file or from --set).
Test(config, sequence_parallel_needs_seq_len_divisible_by_tp) {
    struct data_dir d;
    make_data_dir(&d);
    struct tp_config c;
    valid_config(&c, &d);
    char text[4096], path[1024], err[1024];
    snprintf(text, sizeof text, "model:\n  n_head: 12\n  seq_len: 30\nparallel:\n  tp: 4\n  sequence_parallel: on\n"
             "data:\n  train: %s\n", d.train);
    cr_assert_eq(load_text(&c, text, path, sizeof path, err, sizeof err), 0, "%s", err);
    char prefix[1200];
    snprintf(prefix, sizeof prefix, "%s:6:22: parallel.sequence_parallel: ", path);
    expect_invalid(&c, 0, prefix, "seq_len=30 divisible by tp=4", "parallel.sequence_parallel: false");
    valid_config(&c, &d);
    set_ok(&c, "model.seq_len=30");
    set_ok(&c, "parallel.tp=4");
    set_ok(&c, "parallel.sequence_parallel=true");
    expect_invalid(&c, 4, "--set parallel.sequence_parallel=true: ", "seq_len=30", "tp=4");
    // without the option, or with a seq_len that splits, the same shape is fine
    valid_config(&c, &d);
    set_ok(&c, "model.seq_len=30");
    set_ok(&c, "parallel.tp=4");
    expect_valid(&c, 4);
    valid_config(&c, &d);
    set_ok(&c, "model.seq_len=32");
    set_ok(&c, "parallel.tp=4");
    set_ok(&c, "parallel.sequence_parallel=true");
    expect_valid(&c, 4);
    tu_rmtree(d.dir);
}

Test(config, width_must_divide_by_heads) {
    struct data_dir d;
    make_data_dir(&d);
    struct tp_config c;
    valid_config(&c, &d);
    set_ok(&c, "model.n_embd=100");
    expect_invalid(&c, 0, "--set model.n_embd=100: ", "n_embd=100", "n_head=12");
    tu_rmtree(d.dir);
}

Test(config, world_size_must_divide_by_tp) {
    struct data_dir d;
    make_data_dir(&d);
    struct tp_config c;
    valid_config(&c, &d);
    set_ok(&c, "parallel.tp=4");
    expect_invalid(&c, 6, "--set parallel.tp=4: ", "world size 6", "tp=4");
    tu_rmtree(d.dir);
}

Test(config, dp_is_checked_and_derived) {
    struct data_dir d;
    make_data_dir(&d);
    struct tp_config c;
    valid_config(&c, &d);
    set_ok(&c, "parallel.tp=2");
    set_ok(&c, "parallel.dp=3");
    expect_invalid(&c, 4, "--set parallel.dp=3: ", "world size 4", "set parallel.dp to 2");

    valid_config(&c, &d);
    set_ok(&c, "parallel.tp=2");
    expect_valid(&c, 8);
    cr_assert_eq(c.parallel.dp, 4);

    valid_config(&c, &d);
    expect_valid(&c, 0);
    cr_assert_eq(c.parallel.dp, 1, "no world size and no dp means one replica");

    valid_config(&c, &d);
    set_ok(&c, "parallel.dp=3");
    expect_valid(&c, 0);
    cr_assert_eq(c.parallel.dp, 3, "without a world size, a given dp stands");
    tu_rmtree(d.dir);
}

Test(config, batch_arithmetic) {
    struct data_dir d;
    make_data_dir(&d);
    struct tp_config c;
    // micro_batch 4 * seq_len 32 * dp 2 = 256 tokens per micro-step.
    valid_config(&c, &d);
    set_ok(&c, "model.seq_len=32");
    set_ok(&c, "train.global_batch=1024");
    expect_valid(&c, 2);
    cr_assert_eq(c.train.grad_accum, 4);
    cr_assert_eq(c.train.global_batch, 1024);
    expect_valid(&c, 2); // validating again (both now set, and agreeing) changes nothing
    cr_assert_eq(c.train.grad_accum, 4);
    cr_assert_eq(c.train.global_batch, 1024);

    valid_config(&c, &d);
    set_ok(&c, "model.seq_len=32");
    set_ok(&c, "train.global_batch=1000");
    expect_invalid(&c, 2, "--set train.global_batch=1000: ", "global_batch=1000",
                   "4*32*2 = 256; use a multiple such as 1024");

    valid_config(&c, &d);
    set_ok(&c, "model.seq_len=32");
    set_ok(&c, "train.global_batch=1024");
    set_ok(&c, "train.grad_accum=3");
    expect_invalid(&c, 2, NULL, "grad_accum=3", "grad_accum=4");

    valid_config(&c, &d);
    set_ok(&c, "model.seq_len=32");
    set_ok(&c, "train.grad_accum=3");
    expect_valid(&c, 2);
    cr_assert_eq(c.train.global_batch, 3 * 256);

    valid_config(&c, &d);
    set_ok(&c, "model.seq_len=32");
    expect_valid(&c, 0);
    cr_assert_eq(c.train.grad_accum, 1, "neither set: one micro-step per step");
    cr_assert_eq(c.train.global_batch, 128);
    tu_rmtree(d.dir);
}

Test(config, schedule_bounds) {
    struct data_dir d;
    make_data_dir(&d);
    struct tp_config c;
    valid_config(&c, &d);
    set_ok(&c, "train.min_lr=1e-3");
    expect_invalid(&c, 0, "--set train.min_lr=0.001: ", "min_lr=0.001 is above lr=0.0006", NULL);

    valid_config(&c, &d);
    set_ok(&c, "train.warmup_steps=200");
    expect_invalid(&c, 0, "--set train.warmup_steps=200: ", "warmup_steps=200", "steps=100");
    tu_rmtree(d.dir);
}

Test(config, data_files_must_exist) {
    struct data_dir d;
    make_data_dir(&d);
    struct tp_config c;
    valid_config(&c, &d);
    set_ok(&c, "data.train=nowhere/x*.bin");
    expect_invalid(&c, 0, "--set data.train=nowhere/x*.bin: ", "no file matches 'nowhere/x*.bin'",
                   "run scripts/prepare_data.py or fix data.train");

    valid_config(&c, &d);
    char text[4096], path[1024], err[1024];
    snprintf(text, sizeof text, "data:\n  train: %s\n  val: %s/nothing_*.bin\n", d.train, d.dir);
    cr_assert_eq(load_text(&c, text, path, sizeof path, err, sizeof err), 0, "%s", err);
    char prefix[1200];
    snprintf(prefix, sizeof prefix, "%s:3:8: data.val: ", path);
    expect_invalid(&c, 0, prefix, "nothing_*.bin", "fix data.val");

    // No validation set is fine; a directory is not a shard.
    valid_config(&c, &d);
    set_ok(&c, "data.val=");
    expect_valid(&c, 0);
    snprintf(c.data.train, sizeof c.data.train, "%s", d.dir);
    expect_invalid(&c, 0, NULL, "no file matches", NULL);

    // Defaults are cited as such.
    config_defaults(&c);
    cr_assert_eq(chdir(d.dir), 0);
    expect_invalid(&c, 0, "(default): data.train: ", "data/tinyshakespeare_train.bin", NULL);
    tu_rmtree(d.dir);
}

Test(config, init_and_resume_need_their_targets) {
    struct data_dir d;
    make_data_dir(&d);
    struct tp_config c;
    valid_config(&c, &d);
    set_ok(&c, "init.from=/nonexistent/model.safetensors");
    expect_invalid(&c, 0, "--set init.from=/nonexistent/model.safetensors: ", "init.from",
                   "No such file or directory");
    snprintf(c.init.from, sizeof c.init.from, "%s", d.dir);
    expect_valid(&c, 0);

    set_ok(&c, "checkpoint.resume=auto");
    expect_invalid(&c, 0, "--set checkpoint.resume=auto: ", "checkpoint.dir", NULL);
    set_ok(&c, "checkpoint.dir=runs/x");
    expect_valid(&c, 0);
    tu_rmtree(d.dir);
}

// ---- shipped configs and the embedded default

static char *read_source_file(const char *rel) {
    char path[2048];
    snprintf(path, sizeof path, "%s/%s", tu_source_root(), rel);
    FILE *f = fopen(path, "rb");
    cr_assert_not_null(f, "%s: %s", path, strerror(errno));
    static const size_t cap = 1 << 20;
    char *buf = malloc(cap);
    size_t n = fread(buf, 1, cap - 1, f);
    buf[n] = '\0';
    fclose(f);
    return buf;
}

Test(config, embedded_default_is_tiny_yaml) {
    char *tiny = read_source_file("configs/tiny.yaml");
    cr_assert_str_eq(config_default_yaml, tiny,
                     "the embedded default drifted from configs/tiny.yaml");
    free(tiny);

    struct tp_config c;
    config_defaults(&c);
    char err[1024];
    int rc = config_load_string(&c, config_default_yaml, strlen(config_default_yaml), "<default>",
                                err, sizeof err);
    cr_assert_eq(rc, 0, "%s", err);
    cr_assert_eq(c.model.n_layer, 2);
    cr_assert_eq(c.model.n_head, 4);
    cr_assert_eq(c.model.n_embd, 64);
    cr_assert_eq(c.model.vocab_size, 50257);
    cr_assert_eq(c.model.seq_len, 32);
    cr_assert_eq(c.train.micro_batch, 4);
    cr_assert_eq(c.train.grad_accum, 1);
    cr_assert_eq(c.train.steps, 50);
    cr_assert_eq(c.train.lr, 1e-3);
    cr_assert_eq(c.train.warmup_steps, 5);
    cr_assert_eq(c.eval.every, 25);
    cr_assert_eq(c.eval.batches, 4);
    cr_assert_eq(c.log.every, 10);
    cr_assert_str_eq(c.data.train, "data/tinyshakespeare_train.bin");
    cr_assert_str_eq(c.data.val, "data/tinyshakespeare_val.bin");

    // Same result as loading the file itself.
    struct tp_config f;
    config_defaults(&f);
    char path[2048];
    snprintf(path, sizeof path, "%s/configs/tiny.yaml", tu_source_root());
    cr_assert_eq(config_load_file(&f, path, err, sizeof err), 0, "%s", err);
    assert_same_config(&c, &f);
}

Test(config, shipped_configs_load_and_validate) {
    const char *names[] = {"tiny", "shakespeare", "gpt2-124m", "gpt2-350m", "gpt2-774m",
                           "gpt2-1558m", "bench"};
    // Relative data paths resolve from the current directory: run from the repository root.
    cr_assert_eq(chdir(tu_source_root()), 0);
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        char path[512], err[1024];
        snprintf(path, sizeof path, "configs/%s.yaml", names[i]);
        struct tp_config c;
        config_defaults(&c);
        cr_assert_eq(config_load_file(&c, path, err, sizeof err), 0, "%s", err);
        cr_assert_eq(config_validate(&c, 1, err, sizeof err), 0, "%s", err);
        assert_round_trip(&c);
    }

    struct tp_config c;
    config_defaults(&c);
    char err[1024];
    cr_assert_eq(config_load_file(&c, "configs/gpt2-124m.yaml", err, sizeof err), 0, "%s", err);
    cr_assert_eq(c.model.n_layer, 12);
    cr_assert_eq(c.model.n_embd, 768);
    cr_assert_eq(c.train.micro_batch, 16);
    cr_assert_eq(config_validate(&c, 1, err, sizeof err), 0, "%s", err);
    cr_assert_eq(c.train.global_batch, 16 * 1024);
    cr_assert_eq(c.train.grad_accum, 1);

    config_defaults(&c);
    cr_assert_eq(config_load_file(&c, "configs/gpt2-1558m.yaml", err, sizeof err), 0, "%s", err);
    cr_assert_eq(c.model.n_layer, 48);
    cr_assert_eq(c.model.n_head, 25);
    cr_assert_eq(c.model.n_embd, 1600);
}

Test(config, bf16_is_accepted) {
    struct data_dir d;
    make_data_dir(&d);
    struct tp_config c;
    valid_config(&c, &d);
    set_ok(&c, "train.precision=bf16");
    char err[256] = "";
    cr_assert_eq(config_validate(&c, 1, err, sizeof err), 0, "%s", err);
    cr_assert_eq(c.train.precision, TP_PREC_BF16);
    tu_rmtree(d.dir);
}

// bf16 attention has no (T, T) fallback: head sizes the fused kernels do not take are refused up
// front, naming n_head, the head size and the way out.
Test(config, bf16_head_size_must_suit_the_fused_attention) {
    struct data_dir d;
    make_data_dir(&d);
    struct tp_config c;
    valid_config(&c, &d);
    set_ok(&c, "train.precision=bf16");
    set_ok(&c, "model.n_embd=96");
    set_ok(&c, "model.n_head=8"); // head size 12
    expect_invalid(&c, 1, "--set model.n_head=8", "head size n_embd/n_head=12 is not a multiple of 8", NULL);
    valid_config(&c, &d);
    set_ok(&c, "train.precision=bf16");
    set_ok(&c, "model.n_embd=528");
    set_ok(&c, "model.n_head=1"); // head size 528
    expect_invalid(&c, 1, "--set model.n_head=1", "528 is not a multiple of 8 in [8, 256]", NULL);
    valid_config(&c, &d);
    set_ok(&c, "model.n_embd=96");
    set_ok(&c, "model.n_head=8"); // fp32 takes any head size
    expect_valid(&c, 1);
    tu_rmtree(d.dir);
}

// A printed config reads the same in a YAML 1.1 reader (PyYAML): every float key is a float there
// (6e-05 without a decimal point is a string to it, 1 an int), every int an int.
Test(config, printed_floats_are_floats_in_yaml_1_1) {
    char out[4096];
    if (tu_run(out, sizeof out, "python3 -c 'import yaml'") != 0)
        cr_skip_test("PyYAML (python3-yaml) is not installed: sh scripts/setup_debian.sh installs it");
    struct tp_config c;
    config_defaults(&c);
    c.train.lr = 6e-4;
    c.train.min_lr = 6e-5;
    c.train.eps = 1e-8;
    c.train.grad_clip = 1.0;
    c.train.weight_decay = 0.0;
    c.log.peak_tflops = 989;
    size_t len;
    char *text = print_to_string(&c, &len);
    char dir[512], path[600];
    tu_tmpdir(dir, sizeof dir, "yaml11");
    tu_write_file(path, sizeof path, dir, "config.yaml", text);
    int rc = tu_run(out, sizeof out,
                    "python3 -c 'import sys, yaml\n"
                    "d = yaml.safe_load(open(sys.argv[1]))\n"
                    "t = d[\"train\"]\n"
                    "keys = [\"lr\", \"min_lr\", \"eps\", \"grad_clip\", \"weight_decay\", \"beta1\", \"beta2\"]\n"
                    "bad = [k for k in keys if not isinstance(t[k], float)]\n"
                    "bad += [] if isinstance(d[\"log\"][\"peak_tflops\"], float) else [\"peak_tflops\"]\n"
                    "bad += [] if isinstance(t[\"steps\"], int) else [\"steps\"]\n"
                    "print(bad, t[\"min_lr\"], t[\"eps\"]); sys.exit(1 if bad else 0)' '%s'",
                    path);
    cr_assert_eq(rc, 0, "keys PyYAML does not read as floats (or ints): %s\n%s", out, text);
    cr_assert(strstr(out, "6e-05") && strstr(out, "1e-08"), "values changed: %s", out);
    free(text);
    tu_rmtree(dir);
}
