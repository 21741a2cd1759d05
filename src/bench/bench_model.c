// bench_model.c: --bench model CONFIG.yaml: one training step of the config's model, whole (as
// training runs it) and broken down into the model's own blocks (model.c), each timed alone with
// its collectives timed separately. Synthetic tokens, random weights.
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "bench_impl.h"
#include "common.h"
#include "model.h"
#include "optim.h"
#include "train.h"

#define MODEL_WARMUP 2         // timed steps (train.steps) follow these


struct model_bench {
    struct bench *b;
    struct model m;
    struct optim opt;
    float *loss_sum;    // (1) backend memory
    void *dres_seed;    // (N, C) compute type: the residual-stream gradient each backward phase starts from
    int *inputs;        // (N) host token ids, the same on every TP rank
    int *targets;       // (N)
};

static const struct backend_i *mb_ops(const struct model_bench *mb) { return mb->b->be.iface; }

// The step as training runs it: model_forward, model_backward per micro-step, then the grad norm
// and AdamW (the DP all-reduce is absent: dp = 1), over the TP comm tp.
static void step_over(struct model_bench *mb, struct comm *tp) {
    struct model *m = &mb->m;
    const struct tp_train_config *tc = &mb->b->cfg.train;
    mb_ops(mb)->zero(m->be.ctx, m->grads, m->n_params_local * sizeof(float));
    float dloss = 1.0f / ((float)m->d.N * (float)tc->grad_accum);
    for (int micro = 0; micro < tc->grad_accum; micro++) {
        model_forward(m, tp, mb->inputs, mb->targets, mb->loss_sum);
        model_backward(m, tp, dloss);
    }
    optim_grad_norm_enqueue(&mb->opt, m, tp);
    optim_step(&mb->opt, m, tc, (float)tc->lr);
}

static void run_step(void *arg, struct bench_clock *c) {
    struct model_bench *mb = arg;
    (void)c;
    step_over(mb, &mb->b->mesh.tp);
}

// A comm whose device collectives do nothing (their results are wrong, their cost is gone): the
// step over it, against the real one, gives the communication time the step does not hide.
static const char *silent_name(void *ctx) {
    (void)ctx;
    return "silent";
}
static void silent_all_reduce(void *ctx, void *buf, size_t count, enum comm_dtype dt, enum comm_op op) {
    (void)ctx, (void)buf, (void)count, (void)dt, (void)op;
}
static void silent_all_gather(void *ctx, void *out, const void *in, size_t count, enum comm_dtype dt) {
    (void)ctx, (void)out, (void)in, (void)count, (void)dt;
}
static void silent_reduce_scatter(void *ctx, void *out, const void *in, size_t count, enum comm_dtype dt,
                                  enum comm_op op) {
    (void)ctx, (void)out, (void)in, (void)count, (void)dt, (void)op;
}
static void silent_broadcast(void *ctx, void *buf, size_t count, enum comm_dtype dt, int root) {
    (void)ctx, (void)buf, (void)count, (void)dt, (void)root;
}
static void silent_synchronize(void *ctx) { (void)ctx; }

static const struct comm_i silent_iface = {
    .name = silent_name,
    .all_reduce = silent_all_reduce,
    .all_gather = silent_all_gather,
    .reduce_scatter = silent_reduce_scatter,
    .broadcast = silent_broadcast,
    .synchronize = silent_synchronize,
};

static void run_step_silent(void *arg, struct bench_clock *c) {
    struct model_bench *mb = arg;
    (void)c;
    struct comm tp = mb->b->mesh.tp;
    tp.iface = &silent_iface;
    step_over(mb, &tp);
}

// ---- phases: the model's own blocks (model.c), with the timing TP comm

static void run_embedding_fwd(void *arg, struct bench_clock *c) {
    struct model_bench *mb = arg;
    struct bench_timing_comm t;
    struct comm tp = bench_timed_tp(mb->b, &t, c);
    model_embedding_fwd(&mb->m, &tp);
}

static void run_attention_fwd(void *arg, struct bench_clock *c) {
    struct model_bench *mb = arg;
    struct bench_timing_comm t;
    struct comm tp = bench_timed_tp(mb->b, &t, c);
    for (int l = 0; l < mb->m.d.L; l++) model_attention_block_fwd(&mb->m, &tp, l);
}

static void run_mlp_fwd_model(void *arg, struct bench_clock *c) {
    struct model_bench *mb = arg;
    struct bench_timing_comm t;
    struct comm tp = bench_timed_tp(mb->b, &t, c);
    for (int l = 0; l < mb->m.d.L; l++) model_mlp_block_fwd(&mb->m, &tp, l);
}

static void run_head_fwd(void *arg, struct bench_clock *c) {
    struct model_bench *mb = arg;
    struct bench_timing_comm t;
    struct comm tp = bench_timed_tp(mb->b, &t, c);
    model_head_fwd(&mb->m, &tp, mb->loss_sum);
}

// The head's backward turns the logits into their gradient in place: recompute them first.
static void prepare_head_bwd(void *arg) { run_head_fwd(arg, NULL); }

static void run_head_bwd(void *arg, struct bench_clock *c) {
    struct model_bench *mb = arg;
    float dloss = 1.0f / ((float)mb->m.d.N * (float)mb->b->cfg.train.grad_accum);
    struct bench_timing_comm t;
    struct comm tp = bench_timed_tp(mb->b, &t, c);
    model_head_bwd(&mb->m, &tp, dloss);
}

// Layernorm backward accumulates into the residual gradient: start every iteration from the
// same one, so repeated runs neither grow it nor depend on the previous phase.
static void prepare_residual_grad(void *arg) {
    struct model_bench *mb = arg;
    mb_ops(mb)->copy(mb->m.be.ctx, mb->m.a.dres, mb->dres_seed,
                     mb->m.d.N * (size_t)mb->m.d.C * tp_dtype_size(mb->m.dtype));
}

static void run_mlp_bwd_model(void *arg, struct bench_clock *c) {
    struct model_bench *mb = arg;
    struct bench_timing_comm t;
    struct comm tp = bench_timed_tp(mb->b, &t, c);
    for (int l = mb->m.d.L - 1; l >= 0; l--) model_mlp_block_bwd(&mb->m, &tp, l);
}

static void run_attention_bwd(void *arg, struct bench_clock *c) {
    struct model_bench *mb = arg;
    struct bench_timing_comm t;
    struct comm tp = bench_timed_tp(mb->b, &t, c);
    for (int l = mb->m.d.L - 1; l >= 0; l--) model_attention_block_bwd(&mb->m, &tp, l);
}

static void run_embedding_bwd(void *arg, struct bench_clock *c) {
    struct model_bench *mb = arg;
    struct bench_timing_comm t;
    struct comm tp = bench_timed_tp(mb->b, &t, c); // the forward all-reduce summed disjoint rows: none here
    model_embedding_bwd(&mb->m, &tp);
}

// Gradient norm (with its own small all-reduce, not split out) and AdamW.
static void run_optimizer(void *arg, struct bench_clock *c) {
    struct model_bench *mb = arg;
    const struct tp_train_config *tc = &mb->b->cfg.train;
    (void)c;
    optim_grad_norm_enqueue(&mb->opt, &mb->m, &mb->b->mesh.tp);
    optim_step(&mb->opt, &mb->m, tc, (float)tc->lr);
}

enum phase_kind { PH_FWD, PH_BWD, PH_OPT };

struct model_phase {
    struct bench_phase spec;
    enum phase_kind kind;
    bool per_layer;         // repeated over the L blocks (label says so)
};

static const struct model_phase model_phases[] = {
    {{"embedding_fwd", "embedding fwd", run_embedding_fwd, NULL}, PH_FWD, false},
    {{"attention_fwd", "attention fwd", run_attention_fwd, NULL}, PH_FWD, true},
    {{"mlp_fwd", "mlp fwd", run_mlp_fwd_model, NULL}, PH_FWD, true},
    {{"head_loss_fwd", "lm head + loss fwd", run_head_fwd, NULL}, PH_FWD, false},
    {{"head_loss_bwd", "lm head + loss bwd", run_head_bwd, prepare_head_bwd}, PH_BWD, false},
    {{"mlp_bwd", "mlp bwd", run_mlp_bwd_model, prepare_residual_grad}, PH_BWD, true},
    {{"attention_bwd", "attention bwd", run_attention_bwd, prepare_residual_grad}, PH_BWD, true},
    {{"embedding_bwd", "embedding bwd", run_embedding_bwd, prepare_residual_grad}, PH_BWD, false},
    {{"optimizer", "optimizer (norm+adamw)", run_optimizer, NULL}, PH_OPT, false},
};
enum { N_MODEL_PHASES = sizeof model_phases / sizeof model_phases[0] };

struct model_report {
    const char *config;
    struct bench_phase_times step, silent; // the whole step, and the same with no communication
    double exposed_comm_ms;                // step - silent: communication not hidden (n/a at one rank)
    double tokens, tok_s, tflops, mfu;
    struct bench_phase_times ph[N_MODEL_PHASES];
    double ph_ms[N_MODEL_PHASES], ph_comm[N_MODEL_PHASES]; // per step: fwd/bwd x grad_accum
    double sum_ms, fwd_ms, bwd_ms, opt_ms, comm_ms;
};

// "communication (all-reduce, all-gather)": the kinds of collective the step's phases issued.
static void comm_kinds(const struct model_report *r, char *out, size_t len) {
    static const char *const words[4] = {"all-reduce", "all-gather", "reduce-scatter", "broadcast"};
    size_t used = (size_t)snprintf(out, len, "communication (");
    bool any = false;
    for (int k = 0; k < 4; k++) {
        bool seen = false;
        for (int i = 0; i < N_MODEL_PHASES; i++) seen |= r->ph[i].coll_count[k] > 0;
        if (!seen || used >= len) continue;
        used += (size_t)snprintf(out + used, len - used, "%s%s", any ? ", " : "", words[k]);
        any = true;
    }
    // one rank issues none; the plain TP plan's are all all-reduces
    if (used < len) snprintf(out + used, len - used, "%s)", any ? "" : words[0]);
}

static void model_print(const struct bench *b, const struct model_bench *mb, const struct model_report *r) {
    const struct tp_config *cfg = &b->cfg;
    const struct model_dims *d = &mb->m.d;
    char mfu[32], tf[32];
    bench_print_setup(b, "model");
    printf("config %s: %d layers, %d heads, width %d, vocab %d, seq %d | batch %d x %d tokens x grad_accum %d "
           "= %.0f tokens per step (synthetic tokens)\n", r->config, d->L, d->NH, d->C, d->V, d->T, d->B, d->T,
           cfg->train.grad_accum, r->tokens);
    printf("\nwhole step (model_forward + model_backward + grad norm + AdamW, as training runs it), %d warm-up + %d "
           "timed:\n", r->step.warmup, r->step.iters);
    printf("  median %.3f ms (min %.3f, max %.3f, p10 %.3f, p90 %.3f) | %.0f tok/s | %s TFLOP/s per GPU | MFU %s\n",
           r->step.ms.median, r->step.ms.min, r->step.ms.max, r->step.ms.p10, r->step.ms.p90, r->tok_s,
           bench_fmt(tf, sizeof tf, "%.3f", r->tflops), bench_fmt(mfu, sizeof mfu, "%.1f%%", 100 * r->mfu));
    printf("\nphases, each timed alone (%d warm-up + %d timed) by calling the model's own block functions "
           "(model.c);\nforward and backward rows are per step (x grad_accum %d), collectives timed separately:\n",
           r->ph[0].warmup, r->ph[0].iters, cfg->train.grad_accum);
    printf("%-28s %12s %8s %16s\n", "phase", "ms per step", "share", "comm ms");
    for (int i = 0; i < N_MODEL_PHASES; i++) {
        char label[64];
        if (model_phases[i].per_layer) snprintf(label, sizeof label, "%s (x%d)", model_phases[i].spec.label, d->L);
        else snprintf(label, sizeof label, "%s", model_phases[i].spec.label);
        char cm[32];
        printf("%-28s %12.3f %7.1f%% %16s\n", label, r->ph_ms[i], 100 * r->ph_ms[i] / r->sum_ms,
               model_phases[i].kind == PH_OPT ? "(in phase)" : bench_fmt(cm, sizeof cm, "%.3f", r->ph_comm[i]));
    }
    printf("%-28s %12.3f %7.1f%%\n", "sum of phases", r->sum_ms, 100.0);
    printf("  %-26s %12.3f %7.1f%%\n", "forward", r->fwd_ms, 100 * r->fwd_ms / r->sum_ms);
    printf("  %-26s %12.3f %7.1f%%\n", "backward", r->bwd_ms, 100 * r->bwd_ms / r->sum_ms);
    char comm_label[96];
    comm_kinds(r, comm_label, sizeof comm_label);
    printf("  %-26s %12.3f %7.1f%%\n", comm_label, r->comm_ms, 100 * r->comm_ms / r->sum_ms);
    printf("  %-26s %12.3f %7.1f%%\n", "optimizer", r->opt_ms, 100 * r->opt_ms / r->sum_ms);
    printf("%-28s %12.3f   (differs from the sum by launch gaps, grad zeroing and token upload)\n",
           "whole step (measured)", r->step.ms.median);
    char ex[32];
    printf("%-28s %12s   (the whole step minus the same step with every collective skipped, %.3f ms)\n",
           "communication not hidden", bench_fmt(ex, sizeof ex, "%.3f", r->exposed_comm_ms), r->silent.ms.median);
    if (b->mesh.tp_size == 1) printf("# one rank: the TP all-reduces are no-ops, so communication costs 0 ms\n");
}

static void model_json(const struct bench *b, const struct model_bench *mb, const struct model_report *r) {
    const struct model_dims *d = &mb->m.d;
    json_t *doc = bench_json_setup(b, "model");
    json_object_set_new(doc, "config", json_string(r->config));
    json_t *shape = json_pack("{s:i, s:i, s:i, s:i, s:i, s:i, s:i}", "n_layer", d->L, "n_head", d->NH, "n_embd",
                              d->C, "vocab_size", d->V, "seq_len", d->T, "micro_batch", d->B, "grad_accum",
                              b->cfg.train.grad_accum);
    json_object_update(doc, shape);
    json_decref(shape);
    json_t *step = json_pack("{s:i, s:i}", "warmup", r->step.warmup, "iters", r->step.iters);
    bench_json_kv(step, "ms_median", r->step.ms.median);
    bench_json_kv(step, "ms_min", r->step.ms.min);
    bench_json_kv(step, "ms_max", r->step.ms.max);
    bench_json_kv(step, "ms_p10", r->step.ms.p10);
    bench_json_kv(step, "ms_p90", r->step.ms.p90);
    bench_json_kv(step, "tokens", r->tokens);
    bench_json_kv(step, "tok_per_s", r->tok_s);
    bench_json_kv(step, "tflops_per_gpu", r->tflops);
    bench_json_kv(step, "mfu", r->mfu);
    json_object_set_new(doc, "step", step);
    json_t *phases = json_array();
    for (int i = 0; i < N_MODEL_PHASES; i++) {
        static const char *kinds[] = {"forward", "backward", "optimizer"};
        json_t *p = json_pack("{s:s, s:s, s:i, s:i}", "name", model_phases[i].spec.name, "kind",
                              kinds[model_phases[i].kind], "warmup", r->ph[i].warmup, "iters", r->ph[i].iters);
        bench_json_kv(p, "ms_per_step", r->ph_ms[i]);
        bench_json_kv(p, "ms_median", r->ph[i].ms.median);
        bench_json_kv(p, "ms_min", r->ph[i].ms.min);
        bench_json_kv(p, "ms_max", r->ph[i].ms.max);
        bench_json_kv(p, "allreduce_ms_per_step", model_phases[i].kind == PH_OPT ? NAN : r->ph_comm[i]);
        // "allreduce_ms_per_step" and "allreduces" cover every collective of the phase (the names
        // date from when all-reduce was the only one timed); "collectives" splits them by kind.
        json_object_set_new(p, "allreduces", json_integer(r->ph[i].n_comm));
        json_object_set_new(p, "collectives", bench_json_collectives(&r->ph[i]));
        bench_json_kv(p, "share", r->ph_ms[i] / r->sum_ms);
        json_array_append_new(phases, p);
    }
    json_object_set_new(doc, "phases", phases);
    bench_json_kv(doc, "sum_ms", r->sum_ms);
    bench_json_kv(doc, "forward_ms", r->fwd_ms);
    bench_json_kv(doc, "backward_ms", r->bwd_ms);
    bench_json_kv(doc, "communication_ms", r->comm_ms);
    bench_json_kv(doc, "step_without_comm_ms", r->silent.ms.median);
    bench_json_kv(doc, "exposed_comm_ms", r->exposed_comm_ms);
    bench_json_kv(doc, "optimizer_ms", r->opt_ms);
    bench_json_emit(b, doc);
}

static int model_run(struct bench *b, void *args) {
    const char *config_path = args;
    const struct tp_config *cfg = &b->cfg;
    struct model_bench *mb = tp_calloc(1, sizeof *mb);
    mb->b = b;
    struct model_dims d = model_dims_make(&cfg->model, cfg->train.micro_batch, b->mesh.tp_size, b->mesh.tp_rank);
    model_create(&mb->m, &d, b->be, cfg->train.seed);
    optim_create(&mb->opt, &mb->m, cfg->train.weight_decay);
    mb->loss_sum = bench_alloc_floats(b, 1);
    mb->dres_seed = bench_alloc_compute(b, d.N * (size_t)d.C);
    bench_fill_uniform(b->be, mb->dres_seed, d.N * (size_t)d.C, 1.0f / (float)d.N, cfg->train.seed + 7);
    mb->inputs = tp_malloc(2 * d.N * sizeof(int));
    mb->targets = mb->inputs + d.N;
    uint64_t x = cfg->train.seed * 0x9E3779B97F4A7C15ull + 3;
    for (size_t i = 0; i < 2 * d.N; i++) { // a stream every rank reproduces: TP ranks share tokens
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        mb->inputs[i] = (int)(x % (uint64_t)d.V);
    }

    struct model_report r = {.config = config_path};
    int warmup = b->iters_fixed ? b->warmup : MODEL_WARMUP;
    int iters = b->iters_fixed ? b->iters : cfg->train.steps;
    static const struct bench_phase step_spec = {"step", "whole step", run_step, NULL};
    bench_time_phase(b, &step_spec, mb, warmup, iters, 0.0, 0, 0, &r.step);
    // The step leaves valid activations for the last micro-batch: the phases below reuse them.
    int accum = cfg->train.grad_accum;
    for (int i = 0; i < N_MODEL_PHASES; i++) {
        const struct model_phase *mp = &model_phases[i];
        bench_time_phase(b, &mp->spec, mb, warmup, iters, 0.0, 0, 0, &r.ph[i]);
        double times = mp->kind == PH_OPT ? 1.0 : (double)accum;
        r.ph_ms[i] = r.ph[i].ms.median * times;
        r.ph_comm[i] = r.ph[i].comm_ms * times;
        r.sum_ms += r.ph_ms[i];
        r.comm_ms += mp->kind == PH_OPT ? 0.0 : r.ph_comm[i];
        if (mp->kind == PH_FWD) r.fwd_ms += r.ph_ms[i];
        else if (mp->kind == PH_BWD) r.bwd_ms += r.ph_ms[i];
        else r.opt_ms += r.ph_ms[i];
    }
    // Last, since its updates are wrong (harmless to a timing, but not to the phases above).
    static const struct bench_phase silent_spec = {"step_without_comm", "whole step, collectives skipped",
                                                   run_step_silent, NULL};
    bench_time_phase(b, &silent_spec, mb, warmup, iters, 0.0, 0, 0, &r.silent);
    r.exposed_comm_ms = b->mesh.tp_size > 1 ? r.step.ms.median - r.silent.ms.median : NAN;
    r.tokens = (double)d.N * accum;
    r.tok_s = r.step.ms.median > 0 ? r.tokens / (r.step.ms.median * 1e-3) : NAN;
    r.tflops = r.tok_s * train_flops_per_token(cfg) / b->mesh.tp_size / 1e12;
    r.mfu = b->peak_tflops > 0 ? r.tflops / b->peak_tflops : NAN;
    if (b->root) model_print(b, mb, &r);
    if (b->json) model_json(b, mb, &r);

    free(mb->inputs);
    b->be.iface->free(b->be.ctx, mb->dres_seed);
    b->be.iface->free(b->be.ctx, mb->loss_sum);
    optim_destroy(&mb->opt, &mb->m);
    model_destroy(&mb->m);
    free(mb);
    return 0;
}


static int model_parse(const struct bench_opts *o, bool root, int world, void **args) {
    (void)world;
    if (o->argc != 2) {
        if (root) fprintf(stderr, "tptrain: --bench model takes one config file, e.g. --bench model configs/bench.yaml\n");
        return TP_EXIT_USAGE;
    }
    size_t n = strlen(o->argv[1]) + 1;
    *args = memcpy(tp_malloc(n), o->argv[1], n);
    return 0;
}

static const char *model_config_path(const void *args) { return args; }

const struct bench_mode bench_mode_model = {
    .name = "model",
    .synopsis = "model CONFIG.yaml",
    .parse = model_parse,
    .config_path = model_config_path,
    .run = model_run,
};
