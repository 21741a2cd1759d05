// bench_model.c: --bench model CONFIG.yaml: one training step of the config's model, whole (as
// training runs it) and broken down into the model's own blocks (model.c), each timed alone with
// its collectives timed separately. Synthetic tokens, random weights.
//
// Each phase is also set against what it must do: its FLOPs and the bytes its ops must move, and
// the time those take at two ceilings measured in the same run (the matrix rate of one large
// product through the backend's matmul, the memory bandwidth of one large device copy), so that
// the ratio measured / ideal shows where the remaining time is.
//
// Sections: phases, cost model, report, entry point (the ceilings: bench.c).
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
    void *dres_seed;    // (S, C) compute type: the residual-stream gradient each backward phase starts from
    int *inputs;        // (N) host token ids, the same on every TP rank
    int *targets;       // (N)
};

static const struct backend_i *mb_ops(const struct model_bench *mb) { return mb->b->be.iface; }

// The step as training runs it: model_forward_backward per micro-step, then the grad norm
// and AdamW (the DP all-reduce is absent: dp = 1), over the TP comm tp.
static void step_over(struct model_bench *mb, struct comm *tp) {
    struct model *m = &mb->m;
    const struct tp_train_config *tc = &mb->b->cfg.train;
    mb_ops(mb)->zero(m->be.ctx, m->grads, m->n_params_local * sizeof(float));
    float dloss = 1.0f / ((float)m->d.N * (float)tc->grad_accum);
    for (int micro = 0; micro < tc->grad_accum; micro++)
        model_forward_backward(m, tp, mb->inputs, mb->targets, mb->loss_sum, dloss);
    model_reduce_sequence_parallel_grads(m, tp);
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

// The LM head and the loss as training runs them: fused with their backward, a chunk of token
// rows at a time. Nothing it reads is overwritten, and what it writes (dln, dres) it first sets.
static void run_head(void *arg, struct bench_clock *c) {
    struct model_bench *mb = arg;
    float dloss = 1.0f / ((float)mb->m.d.N * (float)mb->b->cfg.train.grad_accum);
    struct bench_timing_comm t;
    struct comm tp = bench_timed_tp(mb->b, &t, c);
    model_head_fwd_bwd(&mb->m, &tp, mb->loss_sum, dloss);
}

// Layernorm backward accumulates into the residual gradient: start every iteration from the
// same one, so repeated runs neither grow it nor depend on the previous phase.
static void prepare_residual_grad(void *arg) {
    struct model_bench *mb = arg;
    mb_ops(mb)->copy(mb->m.be.ctx, mb->m.a.dres, mb->dres_seed,
                     mb->m.d.S * (size_t)mb->m.d.C * tp_dtype_size(mb->m.dtype));
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

// ---- cost model: the FLOPs and bytes of each phase, per micro-step on one rank
//
// FLOPs are model FLOPs: 2*M*N*K per matrix product, attention counted causal (forward 2*B*H*T*T*HS,
// the backward twice that, as the MFU formula counts it; the flash backward's recomputation of the
// scores is not counted), elementwise work not counted. At one rank a step's FLOPs are then
// 6 * tokens * (12*L*C^2 + Vp*C) + 6 * L * C * T * tokens, the MFU formula's 6N + 6LCT with N the
// matrix parameters (padding included, biases, layernorms and wpe excluded).
// Bytes are what each op must read and write at least: its inputs once and its outputs once (twice
// for "+=" outputs), compute-type tensors at the compute type's size and fp32 ones at 4, token ids
// at 4, reductions' partials and other scratch not counted. Recomputation's rerun forward work
// (train.recompute) is not counted either: like the MFU formula, this counts the model's work.
// The ideal time of an op is the larger of flops / matrix rate and bytes / bandwidth; a phase's
// is the sum over its ops.

struct cost_shape {
    struct model_dims d;
    double es;            // bytes per compute-type element
    bool xent_fused;      // one rank and a backend with xent_fused: the loss and gradient in one pass
    double att_saved;     // floats the attention keeps per layer (backend-defined)
    double params;        // local parameters (the optimizer's n)
    double opt_copy;      // bytes per parameter of the compute copy AdamW rewrites (0 in fp32 and
                          // with split masters)
};

struct cost_acc {
    double rate, bw;      // FLOP/s and bytes/s; 0: count only
    struct bench_model_cost c;
};

static void op(struct cost_acc *a, double flops, double bytes) {
    a->c.flops += flops;
    a->c.bytes += bytes;
    double tm = a->rate > 0 ? flops / a->rate : 0.0, tb = a->bw > 0 ? bytes / a->bw : 0.0;
    a->c.matrix_ms += 1e3 * tm;
    a->c.memory_ms += 1e3 * tb;
    a->c.ideal_ms += 1e3 * (tm > tb ? tm : tb);
}

// out (N, OC) = inp (N, IC) @ w^T (+ bias); with gelu the pre-activation is written as well
static void op_matmul_fwd(struct cost_acc *a, const struct cost_shape *s, double N, double IC, double OC, bool bias,
                          bool gelu) {
    op(a, 2 * N * IC * OC, s->es * (N * IC + OC * IC + (bias ? OC : 0) + N * OC * (gelu ? 2 : 1)));
}

// dinp (N, IC) = dout @ w (times gelu'(pre_gelu) read); dw (OC, IC) fp32 += dout^T @ inp;
// dbias (OC) fp32 += column sums of dout (its own pass over dout)
static void op_matmul_bwd(struct cost_acc *a, const struct cost_shape *s, double N, double IC, double OC, bool dbias,
                          bool gelu) {
    op(a, 2 * N * IC * OC, s->es * (N * OC + OC * IC + N * IC * (gelu ? 2 : 1)));
    op(a, 2 * N * IC * OC, s->es * (N * OC + N * IC) + 8 * OC * IC);
    if (dbias) op(a, 0, s->es * N * OC + 8 * OC);
}

// The residual stream's ops run on S rows: N, or this rank's N/P with sequence parallelism.
static void op_layernorm_fwd(struct cost_acc *a, const struct cost_shape *s) {
    double N = (double)s->d.S, C = s->d.C;
    op(a, 0, s->es * (2 * N * C + 2 * C) + 8 * N);
}

// out = res + x + bias, then ln = layernorm(out)
static void op_residual_layernorm_fwd(struct cost_acc *a, const struct cost_shape *s) {
    double N = (double)s->d.S, C = s->d.C;
    op(a, 0, s->es * (4 * N * C + 3 * C) + 8 * N);
}

// dinp += ..., dw, db += ... from dout, inp and the saved statistics; with dsum, the row-parallel
// layer before it gets its bias gradient (dinp's column sums) from the same pass
static void op_layernorm_bwd(struct cost_acc *a, const struct cost_shape *s, bool dsum) {
    double N = (double)s->d.S, C = s->d.C;
    op(a, 0, s->es * (4 * N * C + C) + 8 * N + (dsum ? 24 : 16) * C);
}

static void cost_embedding_fwd(struct cost_acc *a, const struct cost_shape *s) {
    double N = (double)s->d.N, S = (double)s->d.S, C = s->d.C, T = s->d.T;
    op(a, 0, 4 * N + s->es * 2 * N * C);          // vocab lookup: ids, wte rows, out
    op(a, 0, s->es * (2 * S * C + T * C));        // + wpe, on this rank's rows
    op_layernorm_fwd(a, s);                       // the first block's ln_1
}

static void cost_attention_fwd(struct cost_acc *a, const struct cost_shape *s) {
    const struct model_dims *d = &s->d;
    double N = (double)d->N, C = d->C, Cl = d->Cl, T = d->T;
    for (int l = 0; l < d->L; l++) {
        op_matmul_fwd(a, s, N, C, 3 * Cl, true, false);
        op(a, 2 * N * T * Cl, s->es * (3 * N * Cl + N * Cl) + 4 * s->att_saved);
        op_matmul_fwd(a, s, N, Cl, C, false, false);
        op_residual_layernorm_fwd(a, s);
    }
}

static void cost_mlp_fwd(struct cost_acc *a, const struct cost_shape *s) {
    const struct model_dims *d = &s->d;
    double N = (double)d->N, C = d->C, Fl = d->Fl;
    for (int l = 0; l < d->L; l++) {
        op_matmul_fwd(a, s, N, C, Fl, true, true);
        op_matmul_fwd(a, s, N, Fl, C, false, false);
        op_residual_layernorm_fwd(a, s);
    }
}

// The fused head: per chunk its logits, the cross-entropy (one pass that reads and writes them
// where xent_fused runs, else statistics then gradient: two reads and a write), the input and
// weight gradients; the weight is read, and its gradient read and written, once per chunk.
static void cost_head(struct cost_acc *a, const struct cost_shape *s) {
    const struct model_dims *d = &s->d;
    double C = d->C, Vl = d->Vl;
    for (size_t r0 = 0; r0 < d->N; r0 += (size_t)d->head_rows) {
        double n = (double)(d->N - r0 < (size_t)d->head_rows ? d->N - r0 : (size_t)d->head_rows);
        op_matmul_fwd(a, s, n, C, Vl, false, false);
        op(a, 0, s->es * (s->xent_fused ? 2 : 3) * n * Vl + 8 * n);
        op_matmul_bwd(a, s, n, C, Vl, false, false);
    }
    double N = (double)d->N;
    op(a, 0, 4 * N);              // the loss sum
    op(a, 0, s->es * (double)d->S * C); // zeroing the residual gradient
    op_layernorm_bwd(a, s, true); // ln_f, and the last fc_proj's bias gradient
}

static void cost_mlp_bwd(struct cost_acc *a, const struct cost_shape *s) {
    const struct model_dims *d = &s->d;
    double N = (double)d->N, C = d->C, Fl = d->Fl;
    for (int l = 0; l < d->L; l++) {
        op_matmul_bwd(a, s, N, Fl, C, false, true); // fc_proj (its bias gradient came with ln_f's or
                                                    // the next ln_1's backward), GELU' on dinp
        op_matmul_bwd(a, s, N, C, Fl, true, false); // fc; its bias gradient's read of dfch is counted
                                                    // here, though fc_proj's input gradient sums it
        op_layernorm_bwd(a, s, true); // ln_2, and the attention projection's bias gradient
    }
}

static void cost_attention_bwd(struct cost_acc *a, const struct cost_shape *s) {
    const struct model_dims *d = &s->d;
    double N = (double)d->N, C = d->C, Cl = d->Cl, T = d->T;
    for (int l = 0; l < d->L; l++) {
        op_matmul_bwd(a, s, N, Cl, C, false, false); // its bias gradient came with ln_2's backward
        op(a, 4 * N * T * Cl, s->es * (3 * N * Cl + 2 * N * Cl + 3 * N * Cl) + 4 * s->att_saved);
        op_matmul_bwd(a, s, N, C, 3 * Cl, true, false); // qkv; its bias gradient's read of dqkv is
                                                        // counted here, though the attention backward sums it
        op_layernorm_bwd(a, s, l > 0); // ln_1, and the previous layer's fc_proj bias gradient
    }
}

static void cost_embedding_bwd(struct cost_acc *a, const struct cost_shape *s) {
    const struct model_dims *d = &s->d;
    double N = (double)d->N, C = d->C, T = d->T;
    double rows = N < d->Vl ? N : d->Vl; // wte rows the tokens can touch, at most
    op(a, 0, s->es * N * C + 8 * T * C);
    op(a, 0, 4 * N + s->es * N * C + 8 * rows * C);
}

// Gradient norm (one read of the gradients), then AdamW: p, g, m, v read, p, m, v written, and the
// compute copy of p written (bf16).
static void cost_optimizer(struct cost_acc *a, const struct cost_shape *s) {
    op(a, 0, 4 * s->params);
    op(a, 0, (16 + 12 + s->opt_copy) * s->params);
}

enum phase_kind { PH_FWD, PH_BWD, PH_OPT, PH_FWD_BWD };

struct model_phase {
    struct bench_phase spec;
    enum phase_kind kind;
    bool per_layer;         // repeated over the L blocks (label says so)
    void (*cost)(struct cost_acc *a, const struct cost_shape *s); // per micro-step (optimizer: per step)
};

static const struct model_phase model_phases[] = {
    {{"embedding_fwd", "embedding fwd", run_embedding_fwd, NULL}, PH_FWD, false, cost_embedding_fwd},
    {{"attention_fwd", "attention fwd", run_attention_fwd, NULL}, PH_FWD, true, cost_attention_fwd},
    {{"mlp_fwd", "mlp fwd", run_mlp_fwd_model, NULL}, PH_FWD, true, cost_mlp_fwd},
    {{"head_loss", "lm head + loss fwd+bwd", run_head, NULL}, PH_FWD_BWD, false, cost_head},
    {{"mlp_bwd", "mlp bwd", run_mlp_bwd_model, prepare_residual_grad}, PH_BWD, true, cost_mlp_bwd},
    {{"attention_bwd", "attention bwd", run_attention_bwd, prepare_residual_grad}, PH_BWD, true, cost_attention_bwd},
    {{"embedding_bwd", "embedding bwd", run_embedding_bwd, prepare_residual_grad}, PH_BWD, false, cost_embedding_bwd},
    {{"optimizer", "optimizer (norm+adamw)", run_optimizer, NULL}, PH_OPT, false, cost_optimizer},
};
enum { N_MODEL_PHASES = sizeof model_phases / sizeof model_phases[0] };
_Static_assert(N_MODEL_PHASES == BENCH_MODEL_PHASES, "bench.h's BENCH_MODEL_PHASES counts the phases");

void bench_model_costs(const struct model_dims *d, const struct backend *be, double matrix_tflops,
                       double memory_gbs, struct bench_model_cost *out) {
    int n_tensors;
    size_t n_local, n_global;
    free(model_param_table(d, &n_tensors, &n_local, &n_global));
    enum tp_dtype dt = be->iface->dtype(be->ctx);
    struct cost_shape s = {
        .d = *d,
        .es = (double)tp_dtype_size(dt),
        .xent_fused = d->P == 1 && be->iface->xent_fused,
        .att_saved = (double)be->iface->attention_saved_floats(be->ctx, d->B, d->T, d->NHl, d->HS),
        .params = (double)n_local,
        // split masters: the halves read and written in place of the fp32 master, no copy besides
        .opt_copy = dt == TP_DTYPE_F32 || model_masters_split(d, dt) ? 0.0 : (double)tp_dtype_size(dt),
    };
    for (int i = 0; i < N_MODEL_PHASES; i++) {
        struct cost_acc a = {.rate = matrix_tflops * 1e12, .bw = memory_gbs * 1e9};
        model_phases[i].cost(&a, &s);
        out[i] = a.c;
        out[i].name = model_phases[i].spec.name;
    }
}

// ---- report

struct model_report {
    const char *config;
    struct bench_ceilings ceil;
    struct bench_phase_times step, silent; // the whole step, and the same with no communication
    double exposed_comm_ms;                // step - silent: communication not hidden (n/a at one rank)
    double tokens, tok_s, tflops, mfu;
    struct bench_phase_times ph[N_MODEL_PHASES];
    double ph_ms[N_MODEL_PHASES], ph_comm[N_MODEL_PHASES]; // per step: fwd/bwd x grad_accum
    struct bench_model_cost cost[N_MODEL_PHASES];           // per step, likewise
    double x_ideal[N_MODEL_PHASES];                         // (ms - comm ms) / ideal ms
    double sum_ms, fwd_ms, head_ms, bwd_ms, opt_ms, comm_ms;
    double flops, bytes, ideal_ms;                          // the phases' sums, per step
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

static const char *bound_of(const struct bench_model_cost *c) {
    return c->matrix_ms >= c->memory_ms ? "matrix" : "memory";
}

static void model_print(const struct bench *b, const struct model_bench *mb, const struct model_report *r) {
    const struct tp_config *cfg = &b->cfg;
    const struct model_dims *d = &mb->m.d;
    char mfu[32], tf[32];
    bench_print_setup(b, "model");
    printf("config %s: %d layers, %d heads, width %d, vocab %d, seq %d | batch %d x %d tokens x grad_accum %d "
           "= %.0f tokens per step (synthetic tokens)\n", r->config, d->L, d->NH, d->C, d->V, d->T, d->B, d->T,
           cfg->train.grad_accum, r->tokens);
    printf("\nwhole step (model_forward_backward + grad norm + AdamW, as training runs it), %d warm-up + %d "
           "timed:\n", r->step.warmup, r->step.iters);
    printf("  median %.3f ms (min %.3f, max %.3f, p10 %.3f, p90 %.3f) | %.0f tok/s | %s TFLOP/s per GPU | MFU %s\n",
           r->step.ms.median, r->step.ms.min, r->step.ms.max, r->step.ms.p10, r->step.ms.p90, r->tok_s,
           bench_fmt(tf, sizeof tf, "%.3f", r->tflops), bench_fmt(mfu, sizeof mfu, "%.1f%%", 100 * r->mfu));
    printf("\nceilings per GPU: matrix %.4g TFLOP/s, memory %.4g GB/s (%s)\n", r->ceil.matrix_tflops,
           r->ceil.memory_gbs, r->ceil.how);
    printf("\nphases, each timed alone (%d warm-up + %d timed) by calling the model's own block functions "
           "(model.c);\nforward and backward rows are per step (x grad_accum %d), collectives timed separately;\n"
           "GFLOP (matrix products and causal attention) and GB (what the ops must read and write) per GPU,\n"
           "ideal ms = each op at the ceiling it is bound by, x ideal = (ms - comm ms) / ideal ms:\n",
           r->ph[0].warmup, r->ph[0].iters, cfg->train.grad_accum);
    printf("%-28s %12s %8s %16s %10s %9s %9s %8s  %s\n", "phase", "ms per step", "share", "comm ms", "GFLOP", "GB",
           "ideal ms", "x ideal", "bound");
    for (int i = 0; i < N_MODEL_PHASES; i++) {
        char label[64];
        if (model_phases[i].per_layer) snprintf(label, sizeof label, "%s (x%d)", model_phases[i].spec.label, d->L);
        else snprintf(label, sizeof label, "%s", model_phases[i].spec.label);
        char cm[32], xi[32];
        const struct bench_model_cost *c = &r->cost[i];
        printf("%-28s %12.3f %7.1f%% %16s %10.3f %9.3f %9.3f %8s  %s\n", label, r->ph_ms[i],
               100 * r->ph_ms[i] / r->sum_ms,
               model_phases[i].kind == PH_OPT ? "(in phase)" : bench_fmt(cm, sizeof cm, "%.3f", r->ph_comm[i]),
               c->flops / 1e9, c->bytes / 1e9, c->ideal_ms, bench_fmt(xi, sizeof xi, "%.2f", r->x_ideal[i]),
               bound_of(c));
    }
    char xs[32], xw[32];
    printf("%-28s %12.3f %7.1f%% %16s %10.3f %9.3f %9.3f %8s\n", "sum of phases", r->sum_ms, 100.0, "",
           r->flops / 1e9, r->bytes / 1e9, r->ideal_ms,
           bench_fmt(xs, sizeof xs, "%.2f", (r->sum_ms - r->comm_ms) / r->ideal_ms));
    printf("  %-26s %12.3f %7.1f%%\n", "forward", r->fwd_ms, 100 * r->fwd_ms / r->sum_ms);
    printf("  %-26s %12.3f %7.1f%%\n", "lm head + loss fwd+bwd", r->head_ms, 100 * r->head_ms / r->sum_ms);
    printf("  %-26s %12.3f %7.1f%%\n", "backward", r->bwd_ms, 100 * r->bwd_ms / r->sum_ms);
    char comm_label[96];
    comm_kinds(r, comm_label, sizeof comm_label);
    printf("  %-26s %12.3f %7.1f%%\n", comm_label, r->comm_ms, 100 * r->comm_ms / r->sum_ms);
    printf("  %-26s %12.3f %7.1f%%\n", "optimizer", r->opt_ms, 100 * r->opt_ms / r->sum_ms);
    printf("%-28s %12.3f   (differs from the sum by launch gaps, grad zeroing and token upload); %s x the "
           "phases' ideal\n", "whole step (measured)", r->step.ms.median,
           bench_fmt(xw, sizeof xw, "%.2f", r->step.ms.median / r->ideal_ms));
    char ex[32];
    printf("%-28s %12s   (the whole step minus the same step with every collective skipped, %.3f ms)\n",
           "communication not hidden", bench_fmt(ex, sizeof ex, "%.3f", r->exposed_comm_ms), r->silent.ms.median);
    if (b->mesh.tp.size == 1) printf("# one rank: the TP all-reduces are no-ops, so communication costs 0 ms\n");
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
    json_t *ceil = json_pack("{s:s}", "source", r->ceil.how);
    bench_json_kv(ceil, "matrix_tflops", r->ceil.matrix_tflops);
    bench_json_kv(ceil, "memory_gbs", r->ceil.memory_gbs);
    json_object_set_new(doc, "ceilings", ceil);
    json_object_set_new(doc, "head_rows", json_integer(d->head_rows));
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
    bench_json_kv(step, "x_ideal", r->step.ms.median / r->ideal_ms);
    json_object_set_new(doc, "step", step);
    json_t *phases = json_array();
    for (int i = 0; i < N_MODEL_PHASES; i++) {
        static const char *kinds[] = {"forward", "backward", "optimizer", "forward+backward"};
        const struct bench_model_cost *c = &r->cost[i];
        json_t *p = json_pack("{s:s, s:s, s:i, s:i, s:s}", "name", model_phases[i].spec.name, "kind",
                              kinds[model_phases[i].kind], "warmup", r->ph[i].warmup, "iters", r->ph[i].iters,
                              "bound", bound_of(c));
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
        // per step on this GPU, as ms_per_step
        bench_json_kv(p, "flops", c->flops);
        bench_json_kv(p, "bytes", c->bytes);
        bench_json_kv(p, "matrix_ms", c->matrix_ms);
        bench_json_kv(p, "memory_ms", c->memory_ms);
        bench_json_kv(p, "ideal_ms", c->ideal_ms);
        bench_json_kv(p, "x_ideal", r->x_ideal[i]);
        json_array_append_new(phases, p);
    }
    json_object_set_new(doc, "phases", phases);
    bench_json_kv(doc, "sum_ms", r->sum_ms);
    bench_json_kv(doc, "forward_ms", r->fwd_ms);
    bench_json_kv(doc, "backward_ms", r->bwd_ms);
    bench_json_kv(doc, "head_loss_ms", r->head_ms); // the fused head, in neither of the two above
    bench_json_kv(doc, "communication_ms", r->comm_ms);
    bench_json_kv(doc, "step_without_comm_ms", r->silent.ms.median);
    bench_json_kv(doc, "exposed_comm_ms", r->exposed_comm_ms);
    bench_json_kv(doc, "optimizer_ms", r->opt_ms);
    bench_json_kv(doc, "flops_per_step", r->flops);
    bench_json_kv(doc, "bytes_per_step", r->bytes);
    bench_json_kv(doc, "ideal_ms", r->ideal_ms);
    bench_json_emit(b, doc);
}

// ---- entry point

static int model_run(struct bench *b, void *args) {
    const char *config_path = args;
    const struct tp_config *cfg = &b->cfg;
    struct model_report r = {.config = config_path};
    int st = bench_ceilings(b, &r.ceil); // before the model, so its memory is all the product's and copy's
    if (st) return st;
    struct model_bench *mb = tp_calloc(1, sizeof *mb);
    mb->b = b;
    struct model_dims d = model_dims_make(&cfg->model, cfg->train.micro_batch, b->mesh.tp.size, model_options_of(cfg));
    model_create(&mb->m, &d, b->be, &b->mesh.tp, cfg->train.seed);
    optim_create(&mb->opt, &mb->m, cfg->train.weight_decay);
    mb->loss_sum = bench_alloc_floats(b, 1);
    mb->dres_seed = bench_alloc_compute(b, d.S * (size_t)d.C);
    bench_fill_uniform(b->be, mb->dres_seed, d.S * (size_t)d.C, 1.0f / (float)d.N, cfg->train.seed + 7);
    mb->inputs = tp_malloc(2 * d.N * sizeof(int));
    mb->targets = mb->inputs + d.N;
    uint64_t x = cfg->train.seed * 0x9E3779B97F4A7C15ull + 3;
    for (size_t i = 0; i < 2 * d.N; i++) { // a stream every rank reproduces: TP ranks share tokens
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        mb->inputs[i] = (int)(x % (uint64_t)d.V);
    }

    int warmup = b->iters_fixed ? b->warmup : MODEL_WARMUP;
    int iters = b->iters_fixed ? b->iters : cfg->train.steps;
    static const struct bench_phase step_spec = {"step", "whole step", run_step, NULL};
    bench_time_phase(b, &step_spec, mb, warmup, iters, 0.0, 0, 0, &r.step);
    // The step leaves valid activations for the last micro-batch: the phases below reuse them.
    int accum = cfg->train.grad_accum;
    bench_model_costs(&d, &b->be, r.ceil.matrix_tflops, r.ceil.memory_gbs, r.cost);
    for (int i = 0; i < N_MODEL_PHASES; i++) {
        const struct model_phase *mp = &model_phases[i];
        bench_time_phase(b, &mp->spec, mb, warmup, iters, 0.0, 0, 0, &r.ph[i]);
        double times = mp->kind == PH_OPT ? 1.0 : (double)accum;
        r.ph_ms[i] = r.ph[i].ms.median * times;
        r.ph_comm[i] = r.ph[i].comm_ms * times;
        struct bench_model_cost *c = &r.cost[i];
        c->flops *= times, c->bytes *= times, c->matrix_ms *= times, c->memory_ms *= times, c->ideal_ms *= times;
        r.x_ideal[i] = (r.ph_ms[i] - (mp->kind == PH_OPT ? 0.0 : r.ph_comm[i])) / c->ideal_ms;
        r.flops += c->flops;
        r.bytes += c->bytes;
        r.ideal_ms += c->ideal_ms;
        r.sum_ms += r.ph_ms[i];
        r.comm_ms += mp->kind == PH_OPT ? 0.0 : r.ph_comm[i];
        if (mp->kind == PH_FWD) r.fwd_ms += r.ph_ms[i];
        else if (mp->kind == PH_BWD) r.bwd_ms += r.ph_ms[i];
        else if (mp->kind == PH_FWD_BWD) r.head_ms += r.ph_ms[i];
        else r.opt_ms += r.ph_ms[i];
    }
    // Last, since its updates are wrong (harmless to a timing, but not to the phases above).
    static const struct bench_phase silent_spec = {"step_without_comm", "whole step, collectives skipped",
                                                   run_step_silent, NULL};
    bench_time_phase(b, &silent_spec, mb, warmup, iters, 0.0, 0, 0, &r.silent);
    r.exposed_comm_ms = b->mesh.tp.size > 1 ? r.step.ms.median - r.silent.ms.median : NAN;
    r.tokens = (double)d.N * accum;
    r.tok_s = r.step.ms.median > 0 ? r.tokens / (r.step.ms.median * 1e-3) : NAN;
    r.tflops = r.tok_s * train_flops_per_token(cfg) / b->mesh.tp.size / 1e12;
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
    return bench_parse_config_arg(o, root, "model", args);
}

const struct bench_mode bench_mode_model = {
    .name = "model",
    .synopsis = "model CONFIG.yaml",
    .parse = model_parse,
    .config_path = bench_config_arg,
    .run = model_run,
};
