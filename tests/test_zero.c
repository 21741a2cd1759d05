// test_zero.c: data parallelism's reduction and the distributed optimizer (ZeRO stage 1).
//
// In process: the bucket layout (aligned slices that partition the buffer over the DP ranks, a
// short tail), the slices' segment tables, and the optimizer's memory against its plan, falling
// as 1/dp. End to end, the real binary under mpiexec on configs/tiny.yaml: dp in {1, 2} x tp in
// {1, 2} (and tp 4), the distributed optimizer on and off, against one process with the same
// global batch; checkpoints saved with the distributed optimizer resume exactly, and at another
// mesh without it (and the reverse).
#include <criterion/criterion.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "common.h"
#include "model.h"
#include "optim.h"
#include "testutil.h"

#define STEPS 20
#define LOSS_RTOL 1e-5
#define OUT_CAP (256 * 1024)

// ---- bucket layout

// Every rank's slices, over every bucket, cover [0, n) exactly once, in order.
static void check_layout(size_t n, int dp, double mb) {
    int nb = optim_bucket_layout(n, dp, mb, NULL);
    cr_assert(nb >= 1 && nb <= OPTIM_MAX_BUCKETS + 1, "n=%zu dp=%d mb=%g: %d buckets", n, dp, mb, nb);
    struct optim_bucket *b = calloc((size_t)nb, sizeof *b);
    cr_assert_eq(optim_bucket_layout(n, dp, mb, b), nb);
    size_t at = 0, state = 0, unit = (size_t)dp * OPTIM_ALIGN;
    for (int k = 0; k < nb; k++) {
        cr_assert_eq(b[k].offset, at, "n=%zu dp=%d mb=%g: bucket %d starts at %zu, not %zu", n, dp, mb, k,
                     b[k].offset, at);
        cr_assert_eq(b[k].state_offset, state);
        cr_assert_eq(b[k].offset % OPTIM_ALIGN, 0, "bucket %d is not aligned", k);
        if (b[k].tail) {
            cr_assert_eq(k, nb - 1, "only the last bucket may be the tail");
            cr_assert(b[k].numel > 0 && b[k].numel < unit, "tail of %zu elements", b[k].numel);
            cr_assert_eq(b[k].shard, OPTIM_ALIGN);
        } else {
            cr_assert_eq(b[k].numel % unit, 0, "bucket %d of %zu elements does not split into aligned slices", k,
                         b[k].numel);
            cr_assert_eq(b[k].shard * (size_t)dp, b[k].numel);
        }
        size_t covered = b[k].offset;
        for (int r = 0; r < dp; r++) {
            size_t lo, len = optim_bucket_slice(&b[k], r, &lo);
            if (!len) continue;
            cr_assert_eq(lo, covered, "bucket %d: rank %d's slice starts at %zu, not %zu", k, r, lo, covered);
            cr_assert_eq(lo % OPTIM_ALIGN, 0);
            cr_assert(len <= b[k].shard);
            covered += len;
        }
        cr_assert_eq(covered, b[k].offset + b[k].numel, "bucket %d: the slices miss elements", k);
        at += b[k].numel;
        state += b[k].shard;
    }
    cr_assert_eq(at, n, "n=%zu dp=%d mb=%g: buckets cover %zu", n, dp, mb, at);
    if (mb == 0) cr_assert(nb <= 2, "one bucket (and a tail) for dp_bucket_mb 0, got %d", nb);
    free(b);
}

Test(zero, bucket_layout_partitions_the_buffer) {
    const size_t sizes[] = {1, 63, 64, 127, 128, 129, 1000, 4096, 100003, 3321600, 1666368, 838752};
    const int dps[] = {2, 3, 4, 8};
    const double mbs[] = {0, 0.001, 0.05, 0.3, 25};
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++)
        for (size_t j = 0; j < sizeof dps / sizeof dps[0]; j++)
            for (size_t k = 0; k < sizeof mbs / sizeof mbs[0]; k++) check_layout(sizes[i], dps[j], mbs[k]);
}

Test(zero, bucket_size_follows_the_key) {
    // 1 MiB of fp32 is 262144 elements, a multiple of 2 * 64: buckets of exactly that
    struct optim_bucket b[8];
    int nb = optim_bucket_layout(4 * 262144 + 100, 2, 1.0, b);
    cr_assert_eq(nb, 5);
    for (int k = 0; k < 4; k++) cr_assert_eq(b[k].numel, 262144);
    cr_assert(b[4].tail && b[4].numel == 100);
    // far too small a size is raised to keep the count bounded
    cr_assert_leq(optim_bucket_layout((size_t)1 << 30, 2, 1e-9, NULL), OPTIM_MAX_BUCKETS + 1);
}

// ---- the optimizer in process (no collective is issued while it is created)

static const struct comm_i no_collectives; // a DP group of the given size that must not be used

static struct comm fake_dp(int size, int rank) {
    return (struct comm){.iface = &no_collectives, .ctx = NULL, .rank = rank, .size = size};
}

// A TP group of one (model_alloc reads its size and rank; it never communicates here).
static const struct comm one_tp = {.iface = &no_collectives, .ctx = NULL, .rank = 0, .size = 1};

static struct tp_model_config tiny_model(void) {
    return (struct tp_model_config){.n_layer = 2, .n_head = 4, .n_embd = 48, .vocab_size = 500, .seq_len = 35};
}

// Each rank's norm segments are its slices cut at tensor boundaries: together they cover every
// element once, each with its own tensor's weight decay and norm group.
Test(zero, slice_segments_cover_the_buffer_once) {
    struct tp_model_config mc = tiny_model();
    struct model_dims d = model_dims_make(&mc, 1, 1, (struct model_options){0});
    struct backend be = backend_cpu_create(TP_DTYPE_F32);
    struct model m;
    model_alloc(&m, &d, be, &one_tp);
    struct tp_parallel_config pc = {.distributed_optimizer = true, .dp_bucket_mb = 0.05};
    for (int dp = 2; dp <= 4; dp++) {
        unsigned char *seen = calloc(m.n_params_local, 1);
        for (int r = 0; r < dp; r++) {
            struct comm c = fake_dp(dp, r);
            struct optim o;
            optim_create_dp(&o, &m, 0.1, &c, &pc);
            cr_assert(o.n_buckets > 2, "dp=%d: only %d buckets", dp, o.n_buckets);
            for (int k = 0; k < o.n_shard_segs; k++) {
                const struct param_segment *s = &o.norm_segs_host[k];
                const struct param_tensor *t = &m.tensors[o.seg_tensor[k]];
                cr_assert(s->offset >= t->offset && s->offset + s->numel <= t->offset + t->numel);
                cr_assert_eq(s->weight_decay, t->decay ? 0.1f : 0.0f);
                cr_assert_eq(s->norm_group, t->spec.layout.kind == LAYOUT_SHARD ? 0 : 1);
                for (size_t e = s->offset; e < s->offset + s->numel; e++) seen[e]++;
            }
            optim_destroy(&o, &m);
        }
        for (size_t e = 0; e < m.n_params_local; e++)
            cr_assert_eq(seen[e], 1, "dp=%d: element %zu is in %d slices", dp, e, seen[e]);
        free(seen);
    }
    model_destroy(&m);
    backend_destroy(&be);
}

// What the optimizer allocates matches optim_memory_plan, and its state per rank falls as 1/dp
// (up to the alignment of the slices): the AdamW moments in fp32, and in bf16 the fp32 master
// weights as well (at dp = 1 the model's params; sharded, the model's full fp32 copy is released).
Test(zero, optimizer_state_falls_as_one_over_dp) {
    for (int dt = TP_DTYPE_F32; dt <= TP_DTYPE_BF16; dt++) {
        struct tp_model_config mc = tiny_model();
        struct model_dims d = model_dims_make(&mc, 1, 1, (struct model_options){0});
        struct backend be = backend_cpu_create((enum tp_dtype)dt);
        size_t one = 0;
        for (int dp = 1; dp <= 4; dp *= 2) {
            struct model m;
            model_alloc(&m, &d, be, &one_tp);
            struct tp_parallel_config pc = {.distributed_optimizer = true, .dp_bucket_mb = 0.05};
            struct comm c = fake_dp(dp, dp - 1);
            struct optim o;
            optim_create_dp(&o, &m, 0.1, &c, &pc);
            optim_adopt_weights(&o, &m);
            size_t elems = dp > 1 ? o.n_state : m.n_params_local;
            size_t held = 2 * elems * sizeof(float) + (o.master ? elems * sizeof(float) : 0);
            struct optim_memory mm = optim_memory_plan(m.n_params_local, (enum tp_dtype)dt, dp, &pc);
            cr_assert_eq(mm.state_bytes, held, "dt=%d dp=%d: plan %zu, held %zu", dt, dp, mm.state_bytes, held);
            bool released = dt == TP_DTYPE_BF16 && dp > 1;
            cr_assert_eq(m.params == NULL, released);
            cr_assert_eq(mm.released_param_bytes, released ? m.n_params_local * sizeof(float) : 0);
            // at dp = 1 a bf16 run's master weights are the model's fp32 params: count them too
            if (dp == 1) one = mm.state_bytes + (dt == TP_DTYPE_BF16 ? m.n_params_local * sizeof(float) : 0);
            double ideal = (double)one / dp, got = (double)mm.state_bytes;
            cr_assert(dp == 1 || (got >= ideal && got <= ideal + 3.0 * sizeof(float) * OPTIM_ALIGN * (o.n_buckets + 1)),
                      "dt=%d dp=%d: %zu bytes of state, 1/dp of dp=1's is %.0f", dt, dp, mm.state_bytes, ideal);
            cr_log_info("%s dp=%d: optimizer state %zu bytes per rank (%.3f of dp=1)", dt ? "bf16" : "fp32", dp,
                        mm.state_bytes, got / (double)one);
            optim_destroy(&o, &m);
            model_destroy(&m);
        }
        backend_destroy(&be);
    }
}

// The figures for GPT-2 124M at tp=1 and the default bucket size, from the plan.
Test(zero, gpt2_124m_state_per_rank) {
    struct tp_model_config mc = {.n_layer = 12, .n_head = 12, .n_embd = 768, .vocab_size = 50257, .seq_len = 1024};
    struct model_dims d = model_dims_make(&mc, 1, 1, (struct model_options){0});
    int n;
    size_t local, global;
    free(model_param_table(&d, &n, &local, &global));
    struct tp_parallel_config pc = {.distributed_optimizer = true, .dp_bucket_mb = 25};
    for (int dt = TP_DTYPE_F32; dt <= TP_DTYPE_BF16; dt++) {
        double first = 0;
        for (int dp = 1; dp <= 8; dp *= 2) {
            struct optim_memory mm = optim_memory_plan(local, (enum tp_dtype)dt, dp, &pc);
            if (dp == 1) first = (double)mm.state_bytes + (dt == TP_DTYPE_BF16 ? local * sizeof(float) : 0);
            if (dp > 1) cr_assert_leq(fabs(mm.state_bytes - first / dp), 0.001 * first / dp, "dp=%d", dp);
            cr_log_info("gpt2-124m %s dp=%d: %.1f MiB of optimizer state per rank", dt ? "bf16" : "fp32", dp,
                        mm.state_bytes / 1048576.0);
        }
    }
}

// ---- end to end

static char g_out[OUT_CAP];
static const char *g_device = "cpu"; // parallel.device of the runs

// Runs tptrain on configs/tiny.yaml (from the source root, where its data paths point) for STEPS
// steps without validation: np = 0 is a plain process. Returns the exit status.
static int tiny(int np, const char *jsonl, const char *sets) {
    char launcher[1024] = "";
    if (np > 0) snprintf(launcher, sizeof launcher, "'%s' %s -np %d", tu_mpiexec(), tu_mpiexec_flags(), np);
    int rc = tu_run(g_out, sizeof g_out,
                    "cd '%s' && timeout 600 %s '%s' configs/tiny.yaml --set train.steps=%d --set data.val= "
                    "--set parallel.device=%s --set log.jsonl=%s %s",
                    tu_source_root(), launcher, tu_tptrain(), STEPS, g_device, jsonl, sets);
    cr_assert_neq(rc, 124, "the run hung:\n%s", g_out);
    return rc;
}

static void tiny_ok(int np, const char *jsonl, const char *sets) {
    int rc = tiny(np, jsonl, sets);
    cr_assert_eq(rc, 0, "np=%d %s: exit %d:\n%s", np, sets, rc, g_out);
}

// The train records of a log by step (loss and grad norm); returns how many steps it holds.
static int read_steps(const char *path, double *loss, double *norm) {
    for (int i = 0; i <= STEPS; i++) loss[i] = norm[i] = NAN;
    FILE *f = fopen(path, "r");
    cr_assert_not_null(f, "%s is missing", path);
    char line[8192];
    int n = 0;
    while (fgets(line, sizeof line, f)) {
        const char *s = strstr(line, "\"step\":");
        if (!strstr(line, "\"kind\":\"train\"") || !s) continue;
        int step = atoi(s + 7);
        if (step < 1 || step > STEPS) continue;
        loss[step] = strtod(strstr(line, "\"loss\":") + 7, NULL);
        norm[step] = strtod(strstr(line, "\"grad_norm\":") + 12, NULL);
        n++;
    }
    fclose(f);
    return n;
}

// Steps from..STEPS of two logs: losses within rtol (0: equal as logged); returns the worst.
static double compare(const char *ref, const char *got, int from, double rtol, const char *label) {
    double la[STEPS + 1], na[STEPS + 1], lb[STEPS + 1], nb[STEPS + 1];
    read_steps(ref, la, na);
    read_steps(got, lb, nb);
    double worst = 0;
    for (int s = from; s <= STEPS; s++) {
        cr_assert(isfinite(la[s]) && isfinite(lb[s]), "%s: step %d missing (%g, %g)", label, s, la[s], lb[s]);
        double r = tu_rel(la[s], lb[s]);
        if (r > worst) worst = r;
        cr_expect(rtol > 0 ? r <= rtol : la[s] == lb[s], "%s: step %d loss %.9g, reference %.9g (rel %.2e)", label, s,
                  lb[s], la[s], r);
        cr_expect(rtol > 0 ? tu_rel(na[s], nb[s]) <= 10 * rtol : na[s] == nb[s], "%s: step %d grad norm %.9g, "
                  "reference %.9g", label, s, nb[s], na[s]);
    }
    cr_log_info("%s: steps %d-%d, largest relative loss difference %.2e", label, from, STEPS, worst);
    return worst;
}

struct dir {
    char path[512];
};

static void file_in(char *out, size_t len, const struct dir *d, const char *name) {
    snprintf(out, len, "%s/%s", d->path, name);
}

#define ZERO "--set parallel.distributed_optimizer=true"
// several buckets of the tiny model's 3.3M parameters (13 MB), so that buckets start during backward
#define BUCKETS "--set parallel.dp_bucket_mb=0.7"

// Meshes against the single-process reference of the same global batch (grad_accum = dp): each
// case is a tp size and its settings; model: settings every run takes, the reference included.
struct mesh_run {
    int tp;
    const char *sets;
    double rtol; // 0: LOSS_RTOL
};

static void mesh_cases(int dp, const char *model, const struct mesh_run *runs, int n) {
    struct dir d;
    tu_tmpdir(d.path, sizeof d.path, "zero");
    char ref[600], got[600], all[512], label[640];
    file_in(ref, sizeof ref, &d, "ref.jsonl");
    file_in(got, sizeof got, &d, "run.jsonl");
    snprintf(all, sizeof all, "--set train.grad_accum=%d %s", dp, model);
    tiny_ok(0, ref, all);
    for (int i = 0; i < n; i++) {
        int tp = runs[i].tp, np = tp * dp;
        if (np > 1) tu_require_mpiexec();
        snprintf(all, sizeof all, "--set parallel.tp=%d --set debug.check_replicas=true %s %s", tp, model,
                 runs[i].sets);
        tiny_ok(np > 1 ? np : 0, got, all);
        char want[64];
        snprintf(want, sizeof want, "dp=%d x tp=%d", dp, tp);
        cr_assert(strstr(g_out, want), "the header does not say %s:\n%s", want, g_out);
        snprintf(label, sizeof label, "tp=%d dp=%d %s", tp, dp, runs[i].sets);
        compare(ref, got, 1, runs[i].rtol > 0 ? runs[i].rtol : LOSS_RTOL, label);
    }
    tu_rmtree(d.path);
}

#define N_RUNS(a) ((int)(sizeof(a) / sizeof(a)[0]))

// dp = 1: the distributed optimizer has nothing to shard and changes nothing.
Test(zero, dp1_meshes) {
    static const struct mesh_run runs[] = {{1, ZERO, 0}, {2, "", 0}, {2, ZERO, 0}, {4, ZERO, 0}};
    mesh_cases(1, "", runs, N_RUNS(runs));
}

// dp = 2: buckets all-reduced during backward, or reduce-scattered into the slices.
Test(zero, dp2_meshes) {
    static const struct mesh_run runs[] = {
        {1, BUCKETS, 0}, {1, ZERO " " BUCKETS, 0}, {1, ZERO " --set parallel.dp_bucket_mb=0", 0},
        {2, BUCKETS, 0}, {2, ZERO " " BUCKETS, 0},
    };
    mesh_cases(2, "", runs, N_RUNS(runs));
}

// dp=2 with a buffer whose size is no multiple of 2 * 64 (width 48, 35 positions): the tail
// bucket gives the two ranks slices of different lengths.
Test(zero, dp2_uneven_tail) {
    static const struct mesh_run runs[] = {{1, ZERO " " BUCKETS, 0}};
    mesh_cases(2, "--set model.n_embd=48 --set model.seq_len=35", runs, N_RUNS(runs));
}

// Per-tensor gradient norms (debug.grad_norms) add up each rank's slices.
Test(zero, per_tensor_norms_from_slices) {
    tu_require_mpiexec();
    struct dir d;
    tu_tmpdir(d.path, sizeof d.path, "zero-norms");
    char a[600], b[600];
    file_in(a, sizeof a, &d, "plain.jsonl");
    file_in(b, sizeof b, &d, "zero.jsonl");
    tiny_ok(2, a, "--set debug.grad_norms=true " BUCKETS);
    tiny_ok(2, b, "--set debug.grad_norms=true " ZERO " " BUCKETS);
    char cmd[2000];
    snprintf(cmd, sizeof cmd,
             "python3 -c \"import json,sys\n"
             "g=lambda p:[json.loads(l)['norms'] for l in open(p) if 'grad_norms' in l][0]\n"
             "a,b=g('%s'),g('%s')\n"
             "assert a.keys()==b.keys() and len(a)>10\n"
             "w=max(abs(a[k]-b[k])/max(abs(a[k]),1e-30) for k in a)\n"
             "print(len(a),w); sys.exit(w>1e-5)\"", a, b);
    int rc = tu_run(g_out, sizeof g_out, "%s", cmd);
    cr_assert_eq(rc, 0, "per-tensor norms differ:\n%s", g_out);
    cr_log_info("per-tensor norms (tensors, largest relative difference): %s", g_out);
    tu_rmtree(d.path);
}

// ---- resume

// The run of `sets` on np ranks, saving at step 10 and 20 into dir/name.
static void save_run(const struct dir *d, const char *name, int np, const char *sets) {
    char log[600], all[1400];
    snprintf(log, sizeof log, "%s/%s.jsonl", d->path, name);
    snprintf(all, sizeof all, "--set checkpoint.dir=%s/%s --set checkpoint.every=10 --set checkpoint.keep=0 %s",
             d->path, name, sets);
    tiny_ok(np, log, all);
}

// Continues dir/from's step-10 checkpoint on np ranks with `sets`, logging to dir/name.jsonl and
// saving into dir/name.
static void resume_run(const struct dir *d, const char *from, const char *name, int np, const char *sets) {
    char log[600], all[1600];
    snprintf(log, sizeof log, "%s/%s.jsonl", d->path, name);
    snprintf(all, sizeof all, "--set checkpoint.resume=%s/%s/step_00000010 --set checkpoint.dir=%s/%s %s", d->path,
             from, d->path, name, sets);
    tiny_ok(np, log, all);
    cr_assert(strstr(g_out, "resumed from"), "no resume:\n%s", g_out);
}

// The losses run dir/resumed logged after its resume (steps 11 on) against those run dir/from logged.
static void compare_resumed(const struct dir *d, const char *from, const char *resumed, double rtol,
                            const char *label) {
    char la[600], lb[600];
    snprintf(la, sizeof la, "%s/%s.jsonl", d->path, from);
    snprintf(lb, sizeof lb, "%s/%s.jsonl", d->path, resumed);
    compare(la, lb, 11, rtol, label);
}

static bool same_file(const char *a, const char *b) {
    char out[256];
    return tu_run(out, sizeof out, "cmp -s '%s' '%s'", a, b) == 0;
}

#define TP2_DP2_ZERO "--set parallel.tp=2 " ZERO " " BUCKETS
#define TP1_ACC2 "--set train.grad_accum=2"

// Saved with the distributed optimizer at tp=2 x dp=2: resumed the same way it continues bit for
// bit (the gathered slices are the state); resumed at tp=1, dp=1 without it (grad_accum 2: the
// same global batch), it continues the uninterrupted run.
Test(zero, resume_distributed_exactly_and_on_one_rank) {
    tu_require_mpiexec();
    struct dir d;
    tu_tmpdir(d.path, sizeof d.path, "zero-resume");
    save_run(&d, "a", 4, TP2_DP2_ZERO);
    resume_run(&d, "a", "b", 4, TP2_DP2_ZERO);
    char fa[600], fb[600];
    compare_resumed(&d, "a", "b", 0, "distributed tp=2 x dp=2 resumed the same way");
    static const char *const files[] = {"model.safetensors", "optimizer.safetensors"};
    for (int i = 0; i < 2; i++) {
        snprintf(fa, sizeof fa, "%s/a/step_00000020/%s", d.path, files[i]);
        snprintf(fb, sizeof fb, "%s/b/step_00000020/%s", d.path, files[i]);
        cr_assert(same_file(fa, fb), "%s of the resumed run differs from the uninterrupted run's", files[i]);
    }
    resume_run(&d, "a", "c", 0, TP1_ACC2);
    compare_resumed(&d, "a", "c", LOSS_RTOL, "distributed tp=2 x dp=2 resumed at tp=1 without it");
    tu_rmtree(d.path);
}

// Every memory option on the saving side (sequence parallelism, the distributed optimizer, full
// recomputation, tp=2 x dp=2); resumed by one process with none of them, the run continues the
// uninterrupted one: the checkpoint does not depend on how the state was spread.
Test(zero, resume_all_options_on_one_rank) {
    tu_require_mpiexec();
    struct dir d;
    tu_tmpdir(d.path, sizeof d.path, "zero-resume-all");
    save_run(&d, "a", 4, TP2_DP2_ZERO " --set parallel.sequence_parallel=true --set train.recompute=full");
    resume_run(&d, "a", "c", 0, TP1_ACC2);
    compare_resumed(&d, "a", "c", LOSS_RTOL, "all options at tp=2 x dp=2 resumed at tp=1 without them");
    tu_rmtree(d.path);
}

// The reverse: saved by one plain process, resumed with the distributed optimizer at tp=2 x dp=2.
Test(zero, resume_plain_into_distributed) {
    tu_require_mpiexec();
    struct dir d;
    tu_tmpdir(d.path, sizeof d.path, "zero-reverse");
    save_run(&d, "a", 0, TP1_ACC2);
    resume_run(&d, "a", "b", 4, TP2_DP2_ZERO);
    compare_resumed(&d, "a", "b", LOSS_RTOL, "tp=1 resumed distributed at tp=2 x dp=2");
    tu_rmtree(d.path);
}

// bf16 (the CPU's emulation): the master weights live only in the slices; a resume is exact.
Test(zero, resume_distributed_bf16_exactly) {
    tu_require_mpiexec();
    struct dir d;
    tu_tmpdir(d.path, sizeof d.path, "zero-bf16");
    const char *sets = "--set train.precision=bf16 " ZERO " " BUCKETS;
    save_run(&d, "a", 2, sets);
    resume_run(&d, "a", "b", 2, sets);
    char fa[600], fb[600];
    compare_resumed(&d, "a", "b", 0, "bf16 distributed dp=2 resumed");
    snprintf(fa, sizeof fa, "%s/a/step_00000020/model.safetensors", d.path);
    snprintf(fb, sizeof fb, "%s/b/step_00000020/model.safetensors", d.path);
    cr_assert(same_file(fa, fb), "the resumed bf16 run's master weights differ");
    tu_rmtree(d.path);
}

// ---- config errors

static void bad_key(const char *set, const char *needle) {
    int rc = tu_run(g_out, sizeof g_out, "cd '%s' && '%s' --dry-run configs/tiny.yaml --set %s", tu_source_root(),
                    tu_tptrain(), set);
    cr_assert_eq(rc, 2, "--set %s: exit %d, expected 2:\n%s", set, rc, g_out);
    cr_assert(strstr(g_out, needle), "--set %s: the message does not name %s:\n%s", set, needle, g_out);
    cr_assert_eq(strchr(g_out, '\n'), g_out + strlen(g_out) - 1, "not one line:\n%s", g_out);
}

Test(zero, bad_values_exit_2_naming_the_key) {
    bad_key("parallel.dp_bucket_mb=-1", "parallel.dp_bucket_mb");
    bad_key("parallel.dp_bucket_mb=lots", "parallel.dp_bucket_mb");
    bad_key("parallel.distributed_optimizer=maybe", "parallel.distributed_optimizer");
}

// ---- on a GPU

static bool have_gpu(void) {
    if (!backend_cuda_available() || backend_cuda_device_count() < 1) return false;
    char out[4096];
    return tu_run(out, sizeof out, "nvidia-smi -L") == 0 && strstr(out, "GPU 0");
}

// Two ranks on the GPU(s) here: on one GPU the MPI comm stages the buckets through host memory,
// on two NCCL runs them on its own stream. fp32 against one CUDA process; bf16 (its own kernels,
// rounding where TP and DP split the sums) within bf16's tolerance of that fp32 reference.
Test(zero, cuda_dp2_distributed) {
    if (!have_gpu()) cr_skip_test("no CUDA build or no GPU here");
    tu_require_mpiexec();
    g_device = "cuda";
    static const struct mesh_run runs[] = {
        {1, BUCKETS, 0},
        {1, ZERO " " BUCKETS, 0},
        {1, ZERO " " BUCKETS " --set train.precision=bf16", 2e-2},
    };
    mesh_cases(2, "", runs, N_RUNS(runs));
}
