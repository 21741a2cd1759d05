// test_tp_parity.c: tensor parallelism end to end. The real binary runs under mpiexec (Criterion
// forks every test, which MPI does not survive, so the ranks are child processes of the test) on
// tests/data/tp_parity.yaml and a shard written here; TP and TP x DP runs must reproduce the
// tp=1 losses step by step, bad meshes and bad data must end every rank with exit 2 and one
// message, and on a GPU machine the CUDA backend must reproduce the CPU backend.
#include <criterion/criterion.h>

#include <errno.h>
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "common.h"
#include "data.h"
#include "testutil.h"

#define STEPS 20                 // tp_parity.yaml's train.steps
#define SHARD_TOKENS 8192
#define VOCAB 512                // tp_parity.yaml's model.vocab_size
#define LOSS_RTOL 1e-5
// bf16 runs against each other or against fp32: activations carry 8 significant bits, and TP
// changes where partial sums are rounded, so losses agree to about 1e-3 over 20 steps.
#define BF16_LOSS_RTOL 2e-2
#define OUT_CAP (256 * 1024)     // captured output of one run

// ---- helpers

// A deterministic token stream with structure a small model learns within 20 steps: mostly a
// fixed successor function over 61 tokens, sometimes a random token below 64, rarely any token.
static void make_tokens(uint16_t *tok, size_t n) {
    uint64_t x = 0x2545F4914F6CDD1Dull;
    unsigned prev = 1;
    for (size_t i = 0; i < n; i++) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        uint64_t r = x >> 33;
        unsigned t;
        if (r % 8) t = (prev * 7 + 3) % 61;
        else if (r % 64 == 0) t = (unsigned)((r >> 6) % VOCAB);
        else t = (unsigned)((r >> 6) % 64);
        tok[i] = (uint16_t)t;
        prev = t;
    }
}

// Writes the shard into dir; bad_at >= 0 plants an out-of-range token there.
static void write_shard(char *path, size_t len, const char *dir, long bad_at) {
    uint16_t *tok = malloc(SHARD_TOKENS * sizeof *tok);
    cr_assert_not_null(tok);
    make_tokens(tok, SHARD_TOKENS);
    if (bad_at >= 0) tok[bad_at] = VOCAB + 88;
    snprintf(path, len, "%s/train.bin", dir);
    cr_assert_eq(data_write_shard(path, tok, SHARD_TOKENS), 0, "data_write_shard(%s): %s", path, strerror(errno));
    free(tok);
}

static const char *config_path(void) {
    static char path[2048];
    snprintf(path, sizeof path, "%s/tests/data/tp_parity.yaml", tu_source_root());
    return path;
}

// Runs tptrain on the test config with np ranks (np = 0: a plain process, no mpiexec) under
// `timeout limit_s`. extra: further --set options. Output into out (OUT_CAP); returns the status.
static int run_tptrain(char *out, int np, int limit_s, const char *shard, const char *jsonl, const char *extra) {
    char launcher[1024] = "";
    if (np > 0) snprintf(launcher, sizeof launcher, "'%s' %s -np %d", tu_mpiexec(), tu_mpiexec_flags(), np);
    char log_set[1200] = "";
    if (jsonl) snprintf(log_set, sizeof log_set, "--set log.jsonl=%s", jsonl);
    int rc = tu_run(out, OUT_CAP, "timeout %d %s '%s' '%s' --set data.train=%s %s %s", limit_s, launcher,
                    tu_tptrain(), config_path(), shard, log_set, extra ? extra : "");
    cr_assert_neq(rc, 124, "the run hung and was stopped after %d s:\n%s", limit_s, out);
    return rc;
}

// Reads a numeric field of every {"kind":"train"} record of a JSON-lines log, in order.
static int read_train_field(const char *path, const char *field, double *vals, int max) {
    FILE *f = fopen(path, "r");
    if (!f) return 0;
    char line[65536], key[64];
    snprintf(key, sizeof key, "\"%s\":", field);
    int n = 0;
    while (n < max && fgets(line, sizeof line, f)) {
        if (!strstr(line, "\"kind\":\"train\"")) continue;
        const char *p = strstr(line, key);
        if (p) vals[n++] = strtod(p + strlen(key), NULL);
    }
    fclose(f);
    return n;
}

static int count_occurrences(const char *hay, const char *needle) {
    int n = 0;
    for (const char *p = hay; (p = strstr(p, needle)); p += strlen(needle)) n++;
    return n;
}

// Compares the per-step losses (within loss_rtol) and grad norms (within norm_rtol) of two logs;
// returns the largest relative loss difference.
static double compare_logs_tol(const char *ref, const char *got, int steps, double loss_rtol, double norm_rtol,
                               const char *label) {
    double a[64], b[64], na[64], nb[64];
    int n1 = read_train_field(ref, "loss", a, 64), n2 = read_train_field(got, "loss", b, 64);
    cr_assert_eq(n1, steps, "%s: the reference logged %d steps, expected %d", label, n1, steps);
    cr_assert_eq(n2, steps, "%s: logged %d steps, expected %d", label, n2, steps);
    read_train_field(ref, "grad_norm", na, 64);
    read_train_field(got, "grad_norm", nb, 64);
    double worst = 0.0, worst_norm = 0.0;
    for (int i = 0; i < steps; i++) {
        cr_assert(isfinite(a[i]) && isfinite(b[i]), "%s: step %d loss %g vs %g", label, i + 1, a[i], b[i]);
        double r = tu_rel(a[i], b[i]);
        if (r > worst) worst = r;
        cr_expect(r <= loss_rtol, "%s: step %d loss %.9g vs reference %.9g (rel %.2e > %.0e)", label, i + 1,
                  b[i], a[i], r, loss_rtol);
        double rn = tu_rel(na[i], nb[i]);
        if (rn > worst_norm) worst_norm = rn;
        cr_expect(rn <= norm_rtol, "%s: step %d grad norm %.9g vs reference %.9g (rel %.2e)", label, i + 1,
                  nb[i], na[i], rn);
    }
    cr_log_info("%s: %d steps, max rel loss diff %.3e, grad norm %.3e", label, steps, worst, worst_norm);
    return worst;
}

static double compare_logs(const char *ref, const char *got, int steps, double norm_rtol, const char *label) {
    return compare_logs_tol(ref, got, steps, LOSS_RTOL, norm_rtol, label);
}

struct run_dir {
    char dir[512], shard[1024], ref[1024], out_log[1024];
    char *out; // (OUT_CAP)
};

static void run_dir_init(struct run_dir *r, const char *tag, long bad_at) {
    tu_tmpdir(r->dir, sizeof r->dir, tag);
    write_shard(r->shard, sizeof r->shard, r->dir, bad_at);
    snprintf(r->ref, sizeof r->ref, "%s/ref.jsonl", r->dir);
    snprintf(r->out_log, sizeof r->out_log, "%s/run.jsonl", r->dir);
    r->out = malloc(OUT_CAP);
    cr_assert_not_null(r->out);
}

static void run_dir_fini(struct run_dir *r) {
    tu_rmtree(r->dir);
    free(r->out);
}

// The tp=1 CPU reference: a plain process, no mpiexec. extra: e.g. grad_accum for the DP case.
static void run_reference(struct run_dir *r, const char *extra) {
    char sets[512];
    snprintf(sets, sizeof sets, "--set parallel.device=cpu %s", extra ? extra : "");
    int rc = run_tptrain(r->out, 0, 300, r->shard, r->ref, sets);
    cr_assert_eq(rc, 0, "tp=1 reference failed (%d):\n%s", rc, r->out);
    double l[STEPS];
    cr_assert_eq(read_train_field(r->ref, "loss", l, STEPS), STEPS);
    // the data has structure: the reference run must learn something, or parity proves little
    cr_assert(l[STEPS - 1] < l[0] - 0.5, "the reference loss went from %.4f to %.4f only", l[0], l[STEPS - 1]);
}

// ---- TP and TP x DP against tp=1 on the CPU backend

static void tp_case(int np, int tp, const char *ref_extra) {
    tu_require_mpiexec();
    struct run_dir r;
    char tag[32];
    snprintf(tag, sizeof tag, "tp%d-np%d", tp, np);
    run_dir_init(&r, tag, -1);
    run_reference(&r, ref_extra);
    char sets[256];
    snprintf(sets, sizeof sets, "--set parallel.device=cpu --set parallel.tp=%d --set debug.check_replicas=true", tp);
    int rc = run_tptrain(r.out, np, 600, r.shard, r.out_log, sets);
    // exit 0 with check_replicas on: every replicated tensor hashed the same on all TP ranks
    // after every step
    cr_assert_eq(rc, 0, "np=%d tp=%d failed (%d):\n%s", np, tp, rc, r.out);
    char want[64];
    snprintf(want, sizeof want, "dp=%d x tp=%d (%d ranks)", np / tp, tp, np);
    cr_assert(strstr(r.out, want), "the header does not say '%s':\n%s", want, r.out);
    compare_logs(r.ref, r.out_log, STEPS, 5e-4, tag);
    run_dir_fini(&r);
}

Test(tp_parity, tp2_matches_tp1) { tp_case(2, 2, NULL); }

Test(tp_parity, tp4_matches_tp1) { tp_case(4, 4, NULL); }

// tp=2 x dp=2 reads, per step, the micro-batches a single rank reads with grad_accum 2 (the same
// global batch), so its losses must match that run's.
Test(tp_parity, tp2_dp2_matches_tp1_with_accumulation) { tp_case(4, 2, "--set train.grad_accum=2"); }

// ---- bf16 (the CPU backend's emulation: bf16 storage, fp32 arithmetic)

// bf16 training follows the fp32 run, and tp=2 in bf16 follows tp=1 in bf16 (its all-reduces
// carry bf16 activations, summed in fp32 by the MPI comm).
Test(tp_parity, bf16_tracks_fp32_and_tp2_matches_tp1) {
    tu_require_mpiexec();
    struct run_dir r;
    run_dir_init(&r, "bf16", -1);
    run_reference(&r, NULL);
    char bf16_ref[1100];
    snprintf(bf16_ref, sizeof bf16_ref, "%s/bf16.jsonl", r.dir);
    int rc = run_tptrain(r.out, 0, 300, r.shard, bf16_ref, "--set parallel.device=cpu --set train.precision=bf16");
    cr_assert_eq(rc, 0, "bf16 tp=1 failed (%d):\n%s", rc, r.out);
    cr_assert(strstr(r.out, "bf16"), "the header does not name bf16:\n%s", r.out);
    compare_logs_tol(r.ref, bf16_ref, STEPS, BF16_LOSS_RTOL, 0.2, "bf16 vs fp32");
    rc = run_tptrain(r.out, 2, 600, r.shard, r.out_log,
                     "--set parallel.device=cpu --set train.precision=bf16 --set parallel.tp=2 "
                     "--set debug.check_replicas=true");
    cr_assert_eq(rc, 0, "bf16 tp=2 failed (%d):\n%s", rc, r.out);
    compare_logs_tol(bf16_ref, r.out_log, STEPS, BF16_LOSS_RTOL, 0.2, "bf16 tp=2 vs bf16 tp=1");
    run_dir_fini(&r);
}

// ---- sequence parallelism and recomputation against tp=1 without them

// Whether two files hold the same bytes.
static bool same_bytes(const char *a, const char *b) {
    FILE *fa = fopen(a, "rb"), *fb = fopen(b, "rb");
    cr_assert(fa && fb, "cannot open %s or %s", a, b);
    bool same = true;
    int ca, cb;
    do {
        ca = fgetc(fa);
        cb = fgetc(fb);
        if (ca != cb) same = false;
    } while (same && ca != EOF);
    fclose(fa);
    fclose(fb);
    return same;
}

// Trains on np ranks with `sets`, saving the final checkpoint to DIR/tag; logs into DIR/tag.jsonl.
static void run_saved(struct run_dir *r, int np, const char *tag, const char *sets, char *log, size_t loglen) {
    char all[1024];
    snprintf(log, loglen, "%s/%s.jsonl", r->dir, tag);
    snprintf(all, sizeof all, "--set parallel.device=cpu --set checkpoint.dir=%s/%s %s", r->dir, tag, sets);
    int rc = run_tptrain(r->out, np, 600, r->shard, log, all);
    cr_assert_eq(rc, 0, "%s (np=%d) failed (%d):\n%s", tag, np, rc, r->out);
}

// The final weights and AdamW moments of two runs saved after `steps` are the same bytes.
static void assert_same_checkpoint_at(const struct run_dir *r, const char *a, const char *b, int steps) {
    static const char *const files[] = {"model.safetensors", "optimizer.safetensors"};
    for (int i = 0; i < 2; i++) {
        char pa[1200], pb[1200];
        snprintf(pa, sizeof pa, "%s/%s/step_%08d/%s", r->dir, a, steps, files[i]);
        snprintf(pb, sizeof pb, "%s/%s/step_%08d/%s", r->dir, b, steps, files[i]);
        cr_assert(same_bytes(pa, pb), "%s: %s and %s differ after %d steps", files[i], a, b, steps);
    }
}

static void assert_same_checkpoint(const struct run_dir *r, const char *a, const char *b) {
    assert_same_checkpoint_at(r, a, b, STEPS);
}

// Sequence parallelism at tp=2 and tp=4 (and in bf16 at tp=2) follows tp=1 without it; the
// layernorm weights, whose gradients are summed over the group, stay identical on every rank.
Test(tp_parity, sequence_parallel_matches_tp1) {
    tu_require_mpiexec();
    struct run_dir r;
    run_dir_init(&r, "sp", -1);
    run_reference(&r, NULL);
    for (int tp = 2; tp <= 4; tp *= 2) {
        char sets[256], label[64];
        snprintf(sets, sizeof sets, "--set parallel.device=cpu --set parallel.tp=%d --set parallel.sequence_parallel=true "
                 "--set debug.check_replicas=true", tp);
        int rc = run_tptrain(r.out, tp, 600, r.shard, r.out_log, sets);
        cr_assert_eq(rc, 0, "sequence parallel tp=%d failed (%d):\n%s", tp, rc, r.out);
        snprintf(label, sizeof label, "sequence parallel tp=%d", tp);
        compare_logs(r.ref, r.out_log, STEPS, 5e-4, label);
        cr_assert(strstr(r.out, "memory after step 1: plan") && strstr(r.out, "measured peak"),
                  "no memory line after the first step:\n%s", r.out);
    }
    int rc = run_tptrain(r.out, 2, 600, r.shard, r.out_log,
                         "--set parallel.device=cpu --set parallel.tp=2 --set parallel.sequence_parallel=true "
                         "--set train.precision=bf16 --set debug.check_replicas=true");
    cr_assert_eq(rc, 0, "bf16 sequence parallel tp=2 failed (%d):\n%s", rc, r.out);
    compare_logs_tol(r.ref, r.out_log, STEPS, BF16_LOSS_RTOL, 0.2, "bf16 sequence parallel tp=2 vs fp32 tp=1");
    run_dir_fini(&r);
}

// tp=2 x dp=2 (4 ranks, sequence parallelism, the replica check) with `sets` against one rank
// accumulating the same global batch (grad_accum 2).
static void expect_sp_tp2_dp2_follows_tp1(const char *dir, const char *sets, const char *label) {
    struct run_dir r;
    run_dir_init(&r, dir, -1);
    run_reference(&r, "--set train.grad_accum=2");
    char extra[600];
    snprintf(extra, sizeof extra,
             "--set parallel.device=cpu --set parallel.tp=2 --set parallel.sequence_parallel=true %s"
             "--set debug.check_replicas=true", sets);
    int rc = run_tptrain(r.out, 4, 600, r.shard, r.out_log, extra);
    cr_assert_eq(rc, 0, "%s failed (%d):\n%s", label, rc, r.out);
    compare_logs(r.ref, r.out_log, STEPS, 5e-4, label);
    run_dir_fini(&r);
}

// With DP the layernorm gradients are summed over the TP group and averaged over DP: tp=2 x dp=2
// with sequence parallelism follows one rank accumulating the same global batch.
Test(tp_parity, sequence_parallel_tp2_dp2_matches_tp1_with_accumulation) {
    tu_require_mpiexec();
    expect_sp_tp2_dp2_follows_tp1("sp-dp", "", "sequence parallel tp=2 x dp=2");
}

// Every memory option at once (sequence parallelism, the distributed optimizer with small DP
// buckets, full recomputation) at tp=2 x dp=2 still follows one rank accumulating the same batch.
Test(tp_parity, all_memory_options_tp2_dp2_match_tp1) {
    tu_require_mpiexec();
    expect_sp_tp2_dp2_follows_tp1("all-options",
                                  "--set parallel.distributed_optimizer=true --set parallel.dp_bucket_mb=0.01 "
                                  "--set train.recompute=full ",
                                  "all memory options, tp=2 x dp=2");
}

// Recomputation rebuilds what it dropped from the same inputs with the same ops: the weights and
// AdamW moments after 20 steps are the same bytes as without it, at tp=1 and at tp=2 with
// sequence parallelism; full recomputation at tp=4 with sequence parallelism follows tp=1.
Test(tp_parity, recompute_is_bitwise_none) {
    tu_require_mpiexec();
    struct run_dir r;
    run_dir_init(&r, "recompute", -1);
    char ref[1100], log[1100];
    run_saved(&r, 0, "tp1-none", "", ref, sizeof ref);
    run_saved(&r, 0, "tp1-selective", "--set train.recompute=selective", log, sizeof log);
    assert_same_checkpoint(&r, "tp1-none", "tp1-selective");
    run_saved(&r, 0, "tp1-full", "--set train.recompute=full", log, sizeof log);
    assert_same_checkpoint(&r, "tp1-none", "tp1-full");
    const char *sp2 = "--set parallel.tp=2 --set parallel.sequence_parallel=true";
    char sets[512];
    run_saved(&r, 2, "tp2-sp-none", sp2, log, sizeof log);
    snprintf(sets, sizeof sets, "%s --set train.recompute=selective", sp2);
    run_saved(&r, 2, "tp2-sp-selective", sets, log, sizeof log);
    assert_same_checkpoint(&r, "tp2-sp-none", "tp2-sp-selective");
    snprintf(sets, sizeof sets, "%s --set train.recompute=full", sp2);
    run_saved(&r, 2, "tp2-sp-full", sets, log, sizeof log);
    assert_same_checkpoint(&r, "tp2-sp-none", "tp2-sp-full");
    compare_logs(ref, log, STEPS, 5e-4, "tp=2, sequence parallel, full recompute");
    run_saved(&r, 4, "tp4-sp-full", "--set parallel.tp=4 --set parallel.sequence_parallel=true "
              "--set train.recompute=full --set debug.check_replicas=true", log, sizeof log);
    compare_logs(ref, log, STEPS, 5e-4, "tp=4, sequence parallel, full recompute");
    run_dir_fini(&r);
}

// ---- bad meshes: exit 2, one message, no hang

static void bad_mesh_case(int np, const char *sets, const char *needle) {
    tu_require_mpiexec();
    struct run_dir r;
    run_dir_init(&r, "badmesh", -1);
    double t0 = tp_now();
    int rc = run_tptrain(r.out, np, 60, r.shard, NULL, sets);
    cr_assert_eq(rc, 2, "np=%d %s: exit %d, expected 2:\n%s", np, sets, rc, r.out);
    int n = count_occurrences(r.out, needle);
    cr_assert_eq(n, 1, "'%s' printed %d times (expected once, by rank 0):\n%s", needle, n, r.out);
    cr_log_info("np=%d %s: exit 2 after %.1f s", np, sets, tp_now() - t0);
    run_dir_fini(&r);
}

Test(tp_parity, world_not_divisible_by_tp) {
    bad_mesh_case(3, "--set parallel.tp=2", "world size 3 is not divisible by tp=2");
}

Test(tp_parity, heads_not_divisible_by_tp) {
    bad_mesh_case(3, "--set parallel.tp=3", "n_head=4 is not divisible by tp=3");
}

Test(tp_parity, sequence_parallel_needs_seq_len_divisible_by_tp) {
    bad_mesh_case(2, "--set parallel.tp=2 --set parallel.sequence_parallel=true --set model.seq_len=31",
                  "needs seq_len=31 divisible by tp=2");
}

// ---- bad data on one DP group only

// DP rank d reads micro-batch k from sequences (2k + d)*B .. (with D = 2, B = 2, T = 32), so a
// bad token at 350 sits in DP rank 1's third micro-batch (tokens 320..384) and nowhere that DP
// rank 0 reads in three steps. Ranks 2 and 3 fail at step 3 while ranks 0 and 1 are ready for
// step 3's collectives: every rank must still end, with exit 2, soon.
Test(tp_parity, bad_token_on_one_dp_rank_ends_all_ranks) {
    tu_require_mpiexec();
    struct run_dir r;
    run_dir_init(&r, "badtoken", 350);
    double t0 = tp_now();
    int rc = run_tptrain(r.out, 4, 60, r.shard, r.out_log, "--set parallel.device=cpu --set parallel.tp=2");
    double secs = tp_now() - t0;
    cr_assert_eq(rc, 2, "exit %d, expected 2:\n%s", rc, r.out);
    cr_assert(strstr(r.out, "out of range"), "no message about the token:\n%s", r.out);
    cr_assert(strstr(r.out, "byte offset 1724"), "the message does not locate the token (offset 1024 + 2*350):\n%s", r.out);
    double l[STEPS];
    int steps = read_train_field(r.out_log, "loss", l, STEPS);
    cr_assert_eq(steps, 2, "expected the two good steps before the failure, logged %d", steps);
    cr_log_info("bad token on dp rank 1: all ranks ended with exit 2 after %.1f s", secs);
    run_dir_fini(&r);
}

// ---- GPU variants

static bool have_gpu(void) {
    if (!backend_cuda_available() || backend_cuda_device_count() < 1) return false;
    char out[4096];
    return tu_run(out, sizeof out, "nvidia-smi -L") == 0 && strstr(out, "GPU 0");
}

static void require_gpu(void) {
    if (!have_gpu()) cr_skip_test("no CUDA build or no GPU here: GPU parity cases skipped");
}

#define GPU_STEPS 10

// One CUDA run of the test config; np = 0: a plain process.
static void run_cuda(struct run_dir *r, int np, const char *jsonl, const char *extra) {
    char sets[2048];
    snprintf(sets, sizeof sets, "--set train.steps=%d --set parallel.device=cuda %s", GPU_STEPS, extra);
    int rc = run_tptrain(r->out, np, 300, r->shard, jsonl, sets);
    cr_assert_eq(rc, 0, "CUDA run np=%d %s failed (%d):\n%s", np, extra, rc, r->out);
}

Test(tp_parity, cuda_fp32_matches_cpu) {
    require_gpu();
    struct run_dir r;
    run_dir_init(&r, "cuda-cpu", -1);
    char sets[64];
    snprintf(sets, sizeof sets, "--set train.steps=%d --set parallel.device=cpu", GPU_STEPS);
    int rc = run_tptrain(r.out, 0, 300, r.shard, r.ref, sets);
    cr_assert_eq(rc, 0, "CPU run failed:\n%s", r.out);
    run_cuda(&r, 0, r.out_log, "");
    cr_assert(strstr(r.out, "cuda backend"), "not on the CUDA backend:\n%s", r.out);
    compare_logs(r.ref, r.out_log, GPU_STEPS, 5e-4, "cuda fp32 vs cpu");
    run_dir_fini(&r);
}

// Several ranks on one GPU: NCCL refuses that, so the MPI comm stages through host memory.
static void cuda_tp_case(int np) {
    require_gpu();
    tu_require_mpiexec();
    struct run_dir r;
    run_dir_init(&r, "cuda-tp", -1);
    run_cuda(&r, 0, r.ref, "");
    char sets[128];
    snprintf(sets, sizeof sets, "--set parallel.tp=%d --set debug.check_replicas=true", np);
    run_cuda(&r, np, r.out_log, sets);
    char label[64];
    snprintf(label, sizeof label, "cuda tp=%d vs tp=1", np);
    compare_logs(r.ref, r.out_log, GPU_STEPS, 5e-4, label);
    run_dir_fini(&r);
}

Test(tp_parity, cuda_tp2_matches_cuda_tp1) { cuda_tp_case(2); }

Test(tp_parity, cuda_tp4_matches_cuda_tp1) { cuda_tp_case(4); }

// The bf16 fast path needs a head size of 64: the test model with two heads of 64.
#define GPU_BF16_SETS "--set train.precision=bf16 --set model.n_embd=128 --set model.n_head=2"

// CUDA bf16 against the CPU's fp32 on the same model, and tp=2 on one GPU (MPI comm) in bf16
// against tp=1 in bf16.
Test(tp_parity, cuda_bf16_tracks_fp32_and_tp2_matches_tp1) {
    require_gpu();
    tu_require_mpiexec();
    struct run_dir r;
    run_dir_init(&r, "cuda-bf16", -1);
    char sets[256];
    snprintf(sets, sizeof sets, "--set train.steps=%d --set parallel.device=cpu --set model.n_embd=128 "
             "--set model.n_head=2", GPU_STEPS);
    int rc = run_tptrain(r.out, 0, 300, r.shard, r.ref, sets);
    cr_assert_eq(rc, 0, "CPU fp32 run failed:\n%s", r.out);
    char bf16_ref[1100];
    snprintf(bf16_ref, sizeof bf16_ref, "%s/bf16.jsonl", r.dir);
    run_cuda(&r, 0, bf16_ref, GPU_BF16_SETS);
    compare_logs_tol(r.ref, bf16_ref, GPU_STEPS, BF16_LOSS_RTOL, 0.2, "cuda bf16 vs cpu fp32");
    run_cuda(&r, 2, r.out_log, GPU_BF16_SETS " --set parallel.tp=2 --set debug.check_replicas=true");
    compare_logs_tol(bf16_ref, r.out_log, GPU_STEPS, BF16_LOSS_RTOL, 0.2, "cuda bf16 tp=2 vs tp=1");
    run_dir_fini(&r);
}

// Sequence parallelism and recomputation on the GPU. fp32: recomputation is bitwise none (the
// same kernels on the same inputs), and tp=2 with sequence parallelism and full recomputation
// (two ranks on the GPU, MPI comm) follows tp=1. bf16: each recompute mode and tp=2 with
// sequence parallelism follow plain bf16 within bf16's tolerance (selective recomputes the GELU
// with the elementwise kernel, not cuBLASLt's epilogue, so it is not bitwise there).
Test(tp_parity, cuda_sequence_parallel_and_recompute) {
    require_gpu();
    tu_require_mpiexec();
    struct run_dir r;
    run_dir_init(&r, "cuda-sp", -1);
    static const char *const modes[] = {"none", "selective", "full"};
    char sets[1024], log[1100], ref[1100];
    for (int i = 0; i < 3; i++) {
        snprintf(sets, sizeof sets, "--set train.recompute=%s --set checkpoint.dir=%s/cuda-%s", modes[i], r.dir,
                 modes[i]);
        run_cuda(&r, 0, i ? r.out_log : r.ref, sets);
        if (i) assert_same_checkpoint_at(&r, "cuda-none", i == 1 ? "cuda-selective" : "cuda-full", GPU_STEPS);
    }
    run_cuda(&r, 2, r.out_log, "--set parallel.tp=2 --set parallel.sequence_parallel=true --set train.recompute=full "
             "--set debug.check_replicas=true");
    compare_logs(r.ref, r.out_log, GPU_STEPS, 5e-4, "cuda tp=2 sequence parallel + full recompute vs tp=1");
    snprintf(ref, sizeof ref, "%s/bf16-none.jsonl", r.dir);
    run_cuda(&r, 0, ref, GPU_BF16_SETS);
    for (int i = 1; i < 3; i++) {
        snprintf(sets, sizeof sets, GPU_BF16_SETS " --set train.recompute=%s", modes[i]);
        snprintf(log, sizeof log, "%s/bf16-%s.jsonl", r.dir, modes[i]);
        run_cuda(&r, 0, log, sets);
        compare_logs_tol(ref, log, GPU_STEPS, BF16_LOSS_RTOL, 0.2, modes[i]);
    }
    run_cuda(&r, 2, r.out_log, GPU_BF16_SETS " --set parallel.tp=2 --set parallel.sequence_parallel=true "
             "--set debug.check_replicas=true");
    compare_logs_tol(ref, r.out_log, GPU_STEPS, BF16_LOSS_RTOL, 0.2, "cuda bf16 tp=2 sequence parallel vs tp=1");
    run_dir_fini(&r);
}

// The step recorded as one CUDA graph and replayed (TPTRAIN_STEP_GRAPH=1) runs the same ops on the
// same buffers: the same weights and moments after every step, bf16 and fp32, and with gradient
// accumulation (the graph's loss sum is copied out per micro-step).
Test(tp_parity, cuda_step_graph_same_bits) {
    require_gpu();
    struct run_dir r;
    run_dir_init(&r, "cuda-graph", -1);
    static const char *const cases[] = {GPU_BF16_SETS, "", GPU_BF16_SETS " --set train.grad_accum=2"};
    char sets[1024];
    // products chosen untimed, so that both processes run the same algorithms
    cr_assert_eq(setenv("TPTRAIN_GEMM_TUNE", "0", 1), 0);
    for (int i = 0; i < 3; i++)
        for (int graph = 0; graph < 2; graph++) {
            cr_assert_eq(setenv("TPTRAIN_STEP_GRAPH", graph ? "1" : "0", 1), 0);
            snprintf(sets, sizeof sets, "%s --set checkpoint.dir=%s/c%d-g%d", cases[i], r.dir, i, graph);
            run_cuda(&r, 0, graph ? r.out_log : r.ref, sets);
            if (!graph) continue;
            cr_assert(strstr(r.out, "run as one CUDA graph"), "case %d: the graph was not recorded:\n%s", i, r.out);
            char a[32], b[32];
            snprintf(a, sizeof a, "c%d-g0", i);
            snprintf(b, sizeof b, "c%d-g1", i);
            assert_same_checkpoint_at(&r, a, b, GPU_STEPS);
            compare_logs_tol(r.ref, r.out_log, GPU_STEPS, 0.0, 0.0, "step graph against op by op");
        }
    unsetenv("TPTRAIN_STEP_GRAPH");
    unsetenv("TPTRAIN_GEMM_TUNE");
    run_dir_fini(&r);
}

Test(tp_parity, nccl_single_rank_runs) {
    require_gpu();
    struct run_dir r;
    run_dir_init(&r, "nccl", -1);
    run_cuda(&r, 0, r.ref, "--set parallel.comm=mpi");
    run_cuda(&r, 0, r.out_log, "--set parallel.comm=nccl");
    cr_assert(strstr(r.out, "comm nccl"), "the run did not use NCCL:\n%s", r.out);
    compare_logs(r.ref, r.out_log, GPU_STEPS, 1e-6, "nccl, 1 rank");
    run_dir_fini(&r);
}
