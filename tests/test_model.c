// test_model.c: the GPT-2 graph in one process on the CPU backend: the loss at init, gradients
// against finite differences of the loss, gradient accumulation, the collectives each pass
// issues, and the memory plan against what model_create and optim_create allocate.
#include <criterion/criterion.h>

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "comm.h"
#include "common.h"
#include "config.h"
#include "model.h"
#include "optim.h"

// ---- a group of one, and a counting group

// A TP group of size 1 never communicates (comm_all_reduce skips it); any call is a bug.
static const char *self_name(void *ctx) {
    (void)ctx;
    return "self";
}
static void self_all_reduce(void *ctx, void *buf, size_t count, enum comm_dtype dt, enum comm_op op) {
    (void)ctx, (void)buf, (void)count, (void)dt, (void)op;
    cr_assert_fail("a group of one must not all-reduce");
}
static void self_sync(void *ctx) { (void)ctx; }
static const struct comm_i self_iface = {.name = self_name, .all_reduce = self_all_reduce,
                                         .synchronize = self_sync};

static struct comm self_comm(void) { return (struct comm){.iface = &self_iface, .ctx = NULL, .rank = 0, .size = 1}; }

// Pretends to be a group of two and counts the all-reduces (and the floats they carry) instead
// of doing them: the numbers it leaves behind are meaningless, the counts are what the test reads.
struct counter {
    int calls;
    size_t floats;
    int size; // the group size it pretends to have
};
static void count_all_reduce(void *ctx, void *buf, size_t count, enum comm_dtype dt, enum comm_op op) {
    (void)buf, (void)op;
    struct counter *c = ctx;
    cr_assert_eq(dt, COMM_F32);
    c->calls++;
    c->floats += count;
}
// The sequence-parallel collectives, counted the same way; floats is the whole tensor (count per
// rank times the group size), comparable with an all-reduce of it.
static void count_all_gather(void *ctx, void *out, const void *in, size_t count, enum comm_dtype dt) {
    (void)out, (void)in;
    struct counter *c = ctx;
    cr_assert_eq(dt, COMM_F32);
    c->calls++;
    c->floats += count * (size_t)c->size;
}
static void count_reduce_scatter(void *ctx, void *out, const void *in, size_t count, enum comm_dtype dt,
                                 enum comm_op op) {
    (void)out, (void)in, (void)op;
    struct counter *c = ctx;
    cr_assert_eq(dt, COMM_F32);
    c->calls++;
    c->floats += count * (size_t)c->size;
}
static const struct comm_i count_iface = {.name = self_name, .all_reduce = count_all_reduce,
                                          .all_gather = count_all_gather, .reduce_scatter = count_reduce_scatter,
                                          .synchronize = self_sync};

// ---- fixture: a tiny model and a fixed batch

#define VOCAB 300

static struct tp_model_config tiny_config(int n_layer) {
    return (struct tp_model_config){.n_layer = n_layer, .n_head = 4, .n_embd = 32,
                                    .vocab_size = VOCAB, .seq_len = 16};
}

// Deterministic tokens with some structure (so gradients are not those of pure noise).
static void make_batch(int *inputs, int *targets, size_t N, uint64_t seed) {
    uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
    int prev = 1;
    for (size_t i = 0; i <= N; i++) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        int tok = (x >> 33) % 3 ? (prev * 7 + 3) % 97 : (int)((x >> 40) % VOCAB);
        if (i < N) inputs[i] = tok;
        if (i > 0) targets[i - 1] = tok;
        prev = tok;
    }
}

struct fixture {
    struct backend be;
    struct model m;
    struct comm tp;
    int *inputs, *targets; // (N)
    float *loss_sum;       // (1) backend memory
};

// head_rows: the fused head's chunk, or 0 for the budget's
static void fixture_init_head(struct fixture *f, int n_layer, int B, enum tp_dtype dt, struct model_options o,
                              int head_rows) {
    f->be = backend_cpu_create(dt);
    cr_assert(f->be.iface->host_accessible, "the CPU backend's memory is host memory");
    struct tp_model_config mc = tiny_config(n_layer);
    struct model_dims d = model_dims_make(&mc, B, 1, o);
    if (head_rows) d.head_rows = head_rows;
    f->tp = self_comm();
    model_create(&f->m, &d, f->be, &f->tp, 1234);
    f->inputs = malloc(d.N * sizeof(int));
    f->targets = malloc(d.N * sizeof(int));
    make_batch(f->inputs, f->targets, d.N, 5);
    f->loss_sum = f->be.iface->alloc(f->be.ctx, sizeof(float));
}

static void fixture_init_opts(struct fixture *f, int n_layer, int B, enum tp_dtype dt, struct model_options o) {
    fixture_init_head(f, n_layer, B, dt, o, 0);
}

static void fixture_init_dtype(struct fixture *f, int n_layer, int B, enum tp_dtype dt) {
    fixture_init_opts(f, n_layer, B, dt, (struct model_options){0});
}

static void fixture_init(struct fixture *f, int n_layer, int B) { fixture_init_dtype(f, n_layer, B, TP_DTYPE_F32); }

static void fixture_fini(struct fixture *f) {
    f->be.iface->free(f->be.ctx, f->loss_sum);
    model_destroy(&f->m);
    free(f->inputs);
    free(f->targets);
    backend_destroy(&f->be);
}

// Mean token loss of the current parameters, summed in double from the per-token losses so that
// the finite differences below see as little rounding as fp32 activations allow.
static double loss_of(struct fixture *f) {
    model_forward(&f->m, &f->tp, f->inputs, f->targets, f->loss_sum);
    double s = 0.0;
    for (size_t i = 0; i < f->m.d.N; i++) s += f->m.a.losses[i];
    double mean = s / (double)f->m.d.N;
    cr_assert(fabs(*f->loss_sum / (double)f->m.d.N - mean) < 1e-5 * mean, "loss_sum %g vs losses %g",
              *f->loss_sum / (double)f->m.d.N, mean);
    return mean;
}

// Gradients of the mean loss at the current parameters, into a fresh host copy (n_params_local).
static float *gradient_of(struct fixture *f) {
    struct model *m = &f->m;
    f->be.iface->zero(f->be.ctx, m->grads, m->n_params_local * sizeof(float));
    loss_of(f);
    model_backward(m, &f->tp, 1.0f / (float)m->d.N);
    float *g = malloc(m->n_params_local * sizeof(float));
    memcpy(g, m->grads, m->n_params_local * sizeof(float));
    return g;
}

static double sumsq(const float *x, size_t n) {
    double s = 0.0;
    for (size_t i = 0; i < n; i++) s += (double)x[i] * x[i];
    return s;
}

// params[off..off+n) += s * dir[off..off+n)
static void axpy(float *params, const float *dir, size_t off, size_t n, double s) {
    for (size_t i = off; i < off + n; i++) params[i] = (float)(params[i] + s * dir[i]);
}

// ---- the loss at initialisation

Test(model, loss_at_init_is_ln_vocab) {
    struct fixture f;
    fixture_init(&f, 2, 16);
    double loss = loss_of(&f);
    // Logits are ~N(0, s^2), s = 0.02 * sqrt(C) ~ 0.11, at init: the softmax is nearly uniform and
    // the expected loss is ln(V) + s^2/2, with a sampling spread of s/sqrt(N) over N = 256 tokens.
    cr_assert(fabs(loss - log((double)VOCAB)) < 0.03, "loss %.6f, ln(%d) = %.6f", loss, VOCAB, log((double)VOCAB));
    for (size_t i = 0; i < f.m.d.N; i++)
        cr_assert(fabs(f.m.a.losses[i] - log((double)VOCAB)) < 0.5, "token %zu loss %g", i, f.m.a.losses[i]);
    fixture_fini(&f);
}

// Padding rows of wte must not leak into the softmax: with V = 300 padded to 384, a model whose
// real logits are all equal must give exactly ln(300), not ln(384).
Test(model, padding_is_masked_out_of_the_loss) {
    struct fixture f;
    fixture_init(&f, 1, 1);
    struct model *m = &f.m;
    cr_assert_eq(m->d.Vp, 384);
    size_t C = (size_t)m->d.C;
    // All real wte rows equal: every real logit is the same number.
    float *wte = m->params + m->tensors[0].offset;
    for (size_t v = 1; v < VOCAB; v++) memcpy(wte + v * C, wte, C * sizeof(float));
    model_sync_compute_params(m);
    double loss = loss_of(&f);
    cr_assert(fabs(loss - log((double)VOCAB)) < 1e-5, "loss %.7f, expected ln(300) = %.7f", loss, log(300.0));
    fixture_fini(&f);
}

// ---- gradients against finite differences

// The directional derivative of the loss along the gradient, restricted to one tensor, is
// |g_tensor|^2. Central differences along g with a step that moves the loss by ~1e-2 keep the
// fp32 rounding (~1e-6) and the curvature error well below the 2% tolerance.
Test(model, gradients_match_finite_differences_per_tensor) {
    struct fixture f;
    fixture_init(&f, 2, 2);
    struct model *m = &f.m;
    float *g = gradient_of(&f);
    float *p0 = malloc(m->n_params_local * sizeof(float));
    memcpy(p0, m->params, m->n_params_local * sizeof(float));
    int checked = 0;
    for (int i = 0; i < m->n_tensors; i++) {
        const struct param_tensor *t = &m->tensors[i];
        double g2 = sumsq(g + t->offset, t->numel);
        if (g2 < 1e-8) continue; // e.g. biases that the loss barely sees at init
        double eps = 1e-2 / g2;  // predicted change of the loss: eps * g2 = 1e-2
        if (eps * sqrt(g2) > 0.05) eps = 0.05 / sqrt(g2); // keep the step in parameter space small
        axpy(m->params, g, t->offset, t->numel, eps);
        double up = loss_of(&f);
        memcpy(m->params, p0, m->n_params_local * sizeof(float));
        axpy(m->params, g, t->offset, t->numel, -eps);
        double down = loss_of(&f);
        memcpy(m->params, p0, m->n_params_local * sizeof(float));
        double fd = (up - down) / (2 * eps);
        cr_log_info("%-26s |g|^2 %.6e  finite difference %.6e  rel %.2e", t->name, g2, fd, fabs(fd - g2) / g2);
        cr_expect(fabs(fd - g2) <= 2e-2 * g2, "%s: |g|^2 = %.6e but the loss changes at %.6e", t->name, g2, fd);
        checked++;
    }
    cr_assert_geq(checked, m->n_tensors - 6, "only %d of %d tensors had a gradient to check", checked, m->n_tensors);
    free(p0);
    free(g);
    fixture_fini(&f);
}

// Single elements: the largest-gradient element of a few tensors against central differences.
Test(model, gradients_match_finite_differences_per_element) {
    struct fixture f;
    fixture_init(&f, 2, 2);
    struct model *m = &f.m;
    float *g = gradient_of(&f);
    const char *names[] = {"wte.weight", "wpe.weight", "h.0.attn.c_attn.weight", "h.1.attn.c_proj.weight",
                           "h.0.mlp.c_fc.weight", "h.1.mlp.c_proj.bias", "h.0.ln_1.weight", "ln_f.bias"};
    for (size_t k = 0; k < sizeof names / sizeof names[0]; k++) {
        const struct param_tensor *t = NULL;
        for (int i = 0; i < m->n_tensors; i++)
            if (strcmp(m->tensors[i].name, names[k]) == 0) t = &m->tensors[i];
        cr_assert_not_null(t, "%s", names[k]);
        size_t best = t->offset;
        for (size_t j = t->offset; j < t->offset + t->numel; j++)
            if (fabsf(g[j]) > fabsf(g[best])) best = j;
        float keep = m->params[best];
        double h = 2e-3 / fabs(g[best]); // moves the loss by ~2e-3 each way
        if (h > 0.05) h = 0.05;
        m->params[best] = (float)(keep + h);
        double hp = m->params[best] - keep; // the step fp32 actually took
        double up = loss_of(&f);
        m->params[best] = (float)(keep - h);
        double hm = keep - m->params[best];
        double down = loss_of(&f);
        m->params[best] = keep;
        double fd = (up - down) / (hp + hm);
        cr_log_info("%-26s elem %zu grad %.6e  finite difference %.6e", names[k], best - t->offset, g[best], fd);
        cr_expect(fabs(fd - g[best]) <= 3e-2 * fabs(g[best]), "%s[%zu]: grad %.6e, finite difference %.6e",
                  names[k], best - t->offset, g[best], fd);
    }
    free(g);
    fixture_fini(&f);
}

// A small step along -grad lowers the loss by about lr * |g|^2.
Test(model, step_along_negative_gradient_lowers_loss) {
    struct fixture f;
    fixture_init(&f, 2, 4);
    struct model *m = &f.m;
    float *g = gradient_of(&f);
    double l0 = loss_of(&f), g2 = sumsq(g, m->n_params_local);
    double lr = 1e-2 / g2;
    axpy(m->params, g, 0, m->n_params_local, -lr);
    double l1 = loss_of(&f);
    double predicted = lr * g2;
    cr_assert(l1 < l0, "loss went from %.7f to %.7f", l0, l1);
    cr_assert(fabs((l0 - l1) - predicted) < 0.05 * predicted, "loss fell by %.6e, expected about %.6e",
              l0 - l1, predicted);
    free(g);
    fixture_fini(&f);
}

// AdamW on the same batch lowers the loss step after step (optimizer wiring, one rank).
Test(model, adamw_steps_lower_the_loss) {
    struct fixture f;
    fixture_init(&f, 2, 2);
    struct model *m = &f.m;
    struct optim o;
    struct tp_train_config tc = {.micro_batch = 2, .grad_accum = 1, .steps = 10, .lr = 1e-3, .min_lr = 1e-3,
                                 .warmup_steps = 0, .schedule = TP_SCHED_CONSTANT, .weight_decay = 0.0,
                                 .beta1 = 0.9, .beta2 = 0.95, .eps = 1e-8, .grad_clip = 1.0};
    optim_create(&o, m, tc.weight_decay);
    double first = 0, prev = INFINITY;
    for (int s = 0; s < 10; s++) {
        f.be.iface->zero(f.be.ctx, m->grads, m->n_params_local * sizeof(float));
        double l = loss_of(&f);
        model_backward(m, &f.tp, 1.0f / (float)m->d.N);
        if (s == 0) first = l;
        cr_assert(l < prev + 1e-6, "step %d: loss %.6f rose from %.6f", s, l, prev);
        prev = l;
        float norm = optim_grad_norm(&o, m, &f.tp);
        cr_assert(fabs(norm - sqrt(sumsq(m->grads, m->n_params_local))) < 1e-4 * norm);
        optim_step(&o, m, &tc, (float)optim_lr(&tc, s));
    }
    cr_assert(prev < first - 0.1, "10 AdamW steps on one batch: %.4f -> %.4f", first, prev);
    optim_destroy(&o, m);
    fixture_fini(&f);
}

// ---- determinism and accumulation

Test(model, forward_is_deterministic_and_gradients_accumulate) {
    struct fixture f;
    fixture_init(&f, 2, 2);
    struct model *m = &f.m;
    float *g1 = gradient_of(&f);
    float l1 = *f.loss_sum;
    // a second forward + backward without zeroing adds the same gradient again
    loss_of(&f);
    cr_assert(memcmp(&l1, f.loss_sum, sizeof l1) == 0, "loss %.9g then %.9g", l1, *f.loss_sum);
    model_backward(m, &f.tp, 1.0f / (float)m->d.N);
    for (size_t i = 0; i < m->n_params_local; i++)
        cr_assert(fabsf(m->grads[i] - 2 * g1[i]) <= 1e-5f * fabsf(2 * g1[i]) + 1e-12f, "grad %zu: %g, expected %g",
                  i, m->grads[i], 2 * g1[i]);
    float *g2 = gradient_of(&f);
    cr_assert(memcmp(g1, g2, m->n_params_local * sizeof(float)) == 0, "gradients differ between identical passes");
    // dloss scales the gradient linearly
    f.be.iface->zero(f.be.ctx, m->grads, m->n_params_local * sizeof(float));
    loss_of(&f);
    model_backward(m, &f.tp, 0.5f / (float)m->d.N);
    for (size_t i = 0; i < m->n_params_local; i++)
        cr_assert(fabsf(m->grads[i] - 0.5f * g1[i]) <= 1e-6f * fabsf(g1[i]) + 1e-12f);
    // padding rows of wte get no gradient
    size_t C = (size_t)m->d.C;
    for (size_t i = (size_t)VOCAB * C; i < (size_t)m->d.Vp * C; i++)
        cr_assert_eq(g1[m->tensors[0].offset + i], 0.0f, "padding row %zu has a gradient", i / C);
    free(g1);
    free(g2);
    fixture_fini(&f);
}

// ---- collectives

// Forward: embedding 1 + 2 per block + cross-entropy 2 per chunk of the fused head; backward: 2 per
// block + LM head 1. The counting group checks that a training micro-step (model_forward_backward)
// and the loss alone (model_forward) issue exactly what model_count_collectives says, with N*C
// floats per activation reduction and n + 2n per chunk of n rows for the loss, in one chunk and in
// three (of 11, 11 and 10 rows); model_backward after model_forward recomputes the head, so it
// repeats the cross-entropy's collectives.
Test(model, collectives_per_pass) {
    for (int L = 1; L <= 3; L++) {
        struct tp_model_config mc = tiny_config(L);
        for (int P = 2; P <= 4; P *= 2) {
            for (int rows = 32; rows >= 11; rows -= 21) {
                struct model_dims d = model_dims_make(&mc, 2, P, (struct model_options){0});
                cr_assert_eq(d.head_rows, 32, "a tiny model's logits fit in one chunk");
                d.head_rows = rows;
                int chunks = rows == 32 ? 1 : 3;
                int fwd, bwd;
                model_count_collectives(&d, &fwd, &bwd);
                cr_assert_eq(fwd, 2 * L + 1 + 2 * chunks, "L=%d: forward %d", L, fwd);
                cr_assert_eq(bwd, 2 * L + 1, "L=%d: backward %d", L, bwd);

                struct backend be = backend_cpu_create(TP_DTYPE_F32);
                struct model m;
                struct counter cnt = {.size = P};
                struct comm tp = {.iface = &count_iface, .ctx = &cnt, .rank = P - 1, .size = P};
                model_create(&m, &d, be, &tp, 1);
                int *in = malloc(d.N * sizeof(int)), *tg = malloc(d.N * sizeof(int));
                make_batch(in, tg, d.N, 3);
                float *loss = be.iface->alloc(be.ctx, sizeof(float));
                size_t NC = d.N * (size_t)d.C;
                model_forward_backward(&m, &tp, in, tg, loss, 1.0f / (float)d.N);
                cr_assert_eq(cnt.calls, fwd + bwd, "L=%d P=%d rows=%d: a micro-step issued %d all-reduces, plan says %d",
                             L, P, rows, cnt.calls, fwd + bwd);
                cr_assert_eq(cnt.floats, (size_t)(4 * L + 2) * NC + 3 * d.N, "micro-step volume %zu floats", cnt.floats);
                cnt = (struct counter){.size = P};
                model_forward(&m, &tp, in, tg, loss);
                cr_assert_eq(cnt.calls, fwd, "L=%d P=%d: forward issued %d all-reduces, plan says %d", L, P, cnt.calls, fwd);
                cr_assert_eq(cnt.floats, (size_t)(2 * L + 1) * NC + 3 * d.N, "forward volume %zu floats", cnt.floats);
                cnt = (struct counter){.size = P};
                model_backward(&m, &tp, 1.0f / (float)d.N);
                cr_assert_eq(cnt.calls, bwd + 2 * chunks, "L=%d P=%d: backward issued %d all-reduces", L, P, cnt.calls);
                cr_assert_eq(cnt.floats, (size_t)(2 * L + 1) * NC + 3 * d.N, "backward volume %zu floats", cnt.floats);
                be.iface->free(be.ctx, loss);
                free(in);
                free(tg);
                model_destroy(&m);
                backend_destroy(&be);
            }
        }
    }
}

// Sequence parallelism: the same layers with all-gathers and reduce-scatters along the tokens
// (each over N*C floats, the all-reduce's tensor), as model_count_collectives says; the backward
// gathers each column-parallel input again. The fused head gathers ln_f's rows once before its
// chunks and reduce-scatters its input gradient after them; model_backward after model_forward
// recomputes the head, so it gathers again and repeats the cross-entropy's collectives. Full
// recomputation reruns each block up to fc in its backward: 3 more per block. The layernorm
// gradients then take one all-reduce per step. In one chunk and in three (of 11, 11 and 10 rows).
Test(model, collectives_with_sequence_parallelism) {
    for (int L = 1; L <= 3; L++) {
        struct tp_model_config mc = tiny_config(L);
        for (int P = 2; P <= 4; P *= 2) {
            for (int rc = TP_RECOMPUTE_NONE; rc <= TP_RECOMPUTE_FULL; rc++) {
                for (int rows = 32; rows >= 11; rows -= 21) {
                    struct model_options o = {.sequence_parallel = true, .recompute = (enum tp_recompute)rc};
                    struct model_dims d = model_dims_make(&mc, 2, P, o);
                    cr_assert_eq(d.S * (size_t)P, d.N);
                    cr_assert_eq(d.head_rows, 32, "a tiny model's logits fit in one chunk");
                    d.head_rows = rows;
                    int chunks = rows == 32 ? 1 : 3;
                    int fwd, bwd;
                    model_count_collectives(&d, &fwd, &bwd);
                    int extra = rc == TP_RECOMPUTE_FULL ? 3 * L : 0;
                    cr_assert_eq(fwd, 4 * L + 2 + 2 * chunks, "L=%d: forward %d", L, fwd);
                    cr_assert_eq(bwd, 6 * L + 2 + extra, "L=%d: backward %d", L, bwd);

                    struct backend be = backend_cpu_create(TP_DTYPE_F32);
                    struct model m;
                    struct counter cnt = {.size = P};
                    struct comm tp = {.iface = &count_iface, .ctx = &cnt, .rank = P - 1, .size = P};
                    model_create(&m, &d, be, &tp, 1);
                    int *in = malloc(d.N * sizeof(int)), *tg = malloc(d.N * sizeof(int));
                    make_batch(in, tg, d.N, 3);
                    float *loss = be.iface->alloc(be.ctx, sizeof(float));
                    size_t NC = d.N * (size_t)d.C;
                    model_forward_backward(&m, &tp, in, tg, loss, 1.0f / (float)d.N);
                    cr_assert_eq(cnt.calls, fwd + bwd, "L=%d P=%d rows=%d: a micro-step issued %d collectives, plan "
                                 "says %d", L, P, rows, cnt.calls, fwd + bwd);
                    cr_assert_eq(cnt.floats, (size_t)(10 * L + 4 + extra) * NC + 3 * d.N,
                                 "micro-step volume %zu floats", cnt.floats);
                    cnt = (struct counter){.size = P};
                    model_forward(&m, &tp, in, tg, loss);
                    cr_assert_eq(cnt.calls, fwd, "L=%d P=%d: forward issued %d collectives, plan says %d", L, P,
                                 cnt.calls, fwd);
                    cr_assert_eq(cnt.floats, (size_t)(4 * L + 2) * NC + 3 * d.N, "forward volume %zu floats",
                                 cnt.floats);
                    cnt = (struct counter){.size = P};
                    model_backward(&m, &tp, 1.0f / (float)d.N);
                    cr_assert_eq(cnt.calls, bwd + 1 + 2 * chunks, "L=%d P=%d: backward issued %d collectives", L, P,
                                 cnt.calls);
                    cr_assert_eq(cnt.floats, (size_t)(6 * L + 3 + extra) * NC + 3 * d.N,
                                 "backward volume %zu floats", cnt.floats);
                    cnt = (struct counter){.size = P};
                    model_reduce_sequence_parallel_grads(&m, &tp);
                    cr_assert_eq(cnt.calls, 1);
                    // per layer ln_1's and ln_2's weight and bias and the two row-parallel biases,
                    // then ln_f's weight and bias
                    cr_assert_eq(cnt.floats, (size_t)(6 * L + 2) * (size_t)d.C);
                    be.iface->free(be.ctx, loss);
                    free(in);
                    free(tg);
                    model_destroy(&m);
                    backend_destroy(&be);
                }
            }
        }
    }
}

// ---- the fused LM head + loss, in chunks

// The head's chunk size follows the logits budget: one chunk while the logits fit, else equal
// chunks of a divisor of N, else equal chunks but the last; always within the budget.
Test(model, head_rows_follow_the_logits_budget) {
    const size_t Ns[] = {1, 128, 4096, 16384, 16411, 65536};
    const int Vls[] = {384, 12672, 25152, 50304};
    for (size_t i = 0; i < sizeof Ns / sizeof Ns[0]; i++)
        for (size_t j = 0; j < sizeof Vls / sizeof Vls[0]; j++) {
            size_t N = Ns[i];
            int rows = model_head_rows(N, Vls[j]);
            cr_assert(rows >= 1 && (size_t)rows <= N);
            cr_assert(rows == 1 || (size_t)rows * (size_t)Vls[j] <= MODEL_HEAD_LOGITS_MAX, "N=%zu Vl=%d: %d rows",
                      N, Vls[j], rows);
            if (N * (size_t)Vls[j] <= MODEL_HEAD_LOGITS_MAX) cr_assert_eq((size_t)rows, N, "fits: one chunk");
            size_t chunks = (N + (size_t)rows - 1) / (size_t)rows, fewest = (N * (size_t)Vls[j] + MODEL_HEAD_LOGITS_MAX - 1) / MODEL_HEAD_LOGITS_MAX;
            cr_assert(chunks <= 2 * fewest + 1, "N=%zu Vl=%d: %zu chunks where %zu would do", N, Vls[j], chunks, fewest);
        }
    if (MODEL_HEAD_LOGITS_MAX != (size_t)1 << 27) return; // a build with another budget
    cr_assert_eq(model_head_rows(16384, 50304), 2048, "GPT-2 124M at micro_batch 16: 8 chunks of 2048");
    cr_assert_eq(model_head_rows(16384, 25152), 4096, "tp=2 halves the vocabulary, so the chunks double");
    cr_assert_eq(model_head_rows(16411, 50304), 2345, "no divisor: ceil(16411 / 7), the last chunk shorter");
    struct tp_model_config mc = {.n_layer = 12, .n_head = 12, .n_embd = 768, .vocab_size = 50257, .seq_len = 1024};
    struct model_dims d = model_dims_make(&mc, 16, 1, (struct model_options){0});
    cr_assert_eq(d.head_rows, 2048);
}

// One micro-step with the head in one chunk and in chunks of 5 rows (the last of 2): the loss and
// every gradient but wte's are bitwise equal (each token row is computed alone), and wte's
// differs only by the order of its per-chunk sums. model_forward + model_backward gives
// model_forward_backward's gradients bit for bit.
static void check_chunked_head(enum tp_dtype dt) {
    struct fixture a, c;
    fixture_init_dtype(&a, 2, 2, dt); // N = 32
    c.be = backend_cpu_create(dt);
    struct tp_model_config mc = tiny_config(2);
    struct model_dims d = model_dims_make(&mc, 2, 1, (struct model_options){0});
    d.head_rows = 5;
    c.tp = self_comm();
    model_create(&c.m, &d, c.be, &c.tp, 1234);
    c.inputs = a.inputs, c.targets = a.targets;
    c.loss_sum = c.be.iface->alloc(c.be.ctx, sizeof(float));
    struct fixture *f[2] = {&a, &c};
    float *g[2];
    size_t n = a.m.n_params_local;
    for (int k = 0; k < 2; k++) {
        model_forward_backward(&f[k]->m, &f[k]->tp, a.inputs, a.targets, f[k]->loss_sum, 1.0f / (float)d.N);
        g[k] = malloc(n * sizeof(float));
        memcpy(g[k], f[k]->m.grads, n * sizeof(float));
    }
    cr_assert(memcmp(a.loss_sum, c.loss_sum, sizeof(float)) == 0, "loss %.9g in one chunk, %.9g in chunks",
              *a.loss_sum, *c.loss_sum);
    cr_assert(memcmp(a.m.a.losses, c.m.a.losses, d.N * sizeof(float)) == 0, "per-token losses differ");
    const struct param_tensor *wte = &a.m.tensors[0];
    for (int i = 1; i < a.m.n_tensors; i++) {
        const struct param_tensor *t = &a.m.tensors[i];
        cr_assert(memcmp(g[0] + t->offset, g[1] + t->offset, t->numel * sizeof(float)) == 0,
                  "%s: the gradient depends on the head's chunks", t->name);
    }
    double d2 = 0, n2 = 0;
    for (size_t j = wte->offset; j < wte->offset + wte->numel; j++) {
        d2 += ((double)g[1][j] - g[0][j]) * ((double)g[1][j] - g[0][j]);
        n2 += (double)g[0][j] * g[0][j];
    }
    cr_assert(sqrt(d2 / n2) < 1e-6, "wte gradient in chunks differs by %.3g relative", sqrt(d2 / n2));
    // the loss alone, then the backward (which recomputes the head): the same gradients
    c.be.iface->zero(c.be.ctx, c.m.grads, n * sizeof(float));
    model_forward(&c.m, &c.tp, a.inputs, a.targets, c.loss_sum);
    model_backward(&c.m, &c.tp, 1.0f / (float)d.N);
    cr_assert(memcmp(c.m.grads, g[1], n * sizeof(float)) == 0, "model_forward + model_backward differs from "
              "model_forward_backward");
    free(g[0]);
    free(g[1]);
    c.be.iface->free(c.be.ctx, c.loss_sum);
    model_destroy(&c.m);
    backend_destroy(&c.be);
    fixture_fini(&a);
}

Test(model, fused_head_in_chunks_matches_one_chunk) { check_chunked_head(TP_DTYPE_F32); }
Test(model, fused_head_in_chunks_matches_one_chunk_bf16) { check_chunked_head(TP_DTYPE_BF16); }

// ---- recomputation (and sequence parallelism on a group of one)

// Recomputation rebuilds what it dropped with the same ops on the same inputs, so the loss and
// every gradient are bitwise those of keeping everything (fp32). Sequence parallelism on a group
// of one (its mappings are copies) changes no bit either. Both with the fused head in one chunk
// and in chunks of 5 rows (against none in the same chunks), through model_forward +
// model_backward and through model_forward_backward, as training runs it.
static float *gradient_fused(struct fixture *f) {
    struct model *m = &f->m;
    f->be.iface->zero(f->be.ctx, m->grads, m->n_params_local * sizeof(float));
    model_forward_backward(m, &f->tp, f->inputs, f->targets, f->loss_sum, 1.0f / (float)m->d.N);
    float *g = malloc(m->n_params_local * sizeof(float));
    memcpy(g, m->grads, m->n_params_local * sizeof(float));
    return g;
}

Test(model, recompute_and_sequence_parallel_are_bitwise_none) {
    for (int rows = 0; rows <= 5; rows += 5) {
        struct fixture ref;
        fixture_init_head(&ref, 3, 2, TP_DTYPE_F32, (struct model_options){0}, rows);
        float *g_ref = gradient_of(&ref);
        float l_ref = *ref.loss_sum;
        for (int sp = 0; sp <= 1; sp++) {
            for (int rc = TP_RECOMPUTE_NONE; rc <= TP_RECOMPUTE_FULL; rc++) {
                const char *rcn = config_recompute_name((enum tp_recompute)rc);
                struct fixture f;
                fixture_init_head(&f, 3, 2, TP_DTYPE_F32, (struct model_options){.sequence_parallel = (bool)sp, .recompute = (enum tp_recompute)rc},
                                  rows);
                for (int fused = 0; fused <= 1; fused++) {
                    if (!sp && rc == TP_RECOMPUTE_NONE && !fused) continue; // the reference itself
                    float *g = fused ? gradient_fused(&f) : gradient_of(&f);
                    cr_assert(memcmp(&l_ref, f.loss_sum, sizeof l_ref) == 0,
                              "rows=%d sp=%d recompute=%s fused=%d: loss %.9g, none %.9g", rows, sp, rcn, fused,
                              *f.loss_sum, l_ref);
                    for (int i = 0; i < f.m.n_tensors; i++) {
                        const struct param_tensor *t = &f.m.tensors[i];
                        cr_assert(memcmp(g + t->offset, g_ref + t->offset, t->numel * sizeof(float)) == 0,
                                  "rows=%d sp=%d recompute=%s fused=%d: the gradient of %s differs", rows, sp, rcn,
                                  fused, t->name);
                    }
                    // a second step on the same model: the work buffers hold nothing stale that matters
                    float *g2 = fused ? gradient_fused(&f) : gradient_of(&f);
                    cr_assert(memcmp(g, g2, f.m.n_params_local * sizeof(float)) == 0, "second pass differs");
                    free(g);
                    free(g2);
                }
                fixture_fini(&f);
            }
        }
        free(g_ref);
        fixture_fini(&ref);
    }
}

// ---- memory plan

// model_memory_plan counts params, grads, both AdamW moments, the compute-type copy (bf16 only),
// activations and the token buffers; model_create allocates all but the moments, and
// optim_create adds the moments plus its two-float norm scratch and its segment table.
Test(model, memory_plan_matches_allocations) {
    for (int dt = TP_DTYPE_F32; dt <= TP_DTYPE_BF16; dt++) {
        for (int P = 1; P <= 4; P *= 2) {
            struct tp_model_config mc = tiny_config(2);
            struct model_dims d = model_dims_make(&mc, 3, P, (struct model_options){0});
            struct backend be = backend_cpu_create((enum tp_dtype)dt);
            struct model_memory mm = model_memory_plan(&d, be);
            struct model m;
            struct comm rank0 = {.rank = 0, .size = P}; // places the rank only: no collective is issued
            model_create(&m, &d, be, &rank0, 1);
            cr_assert_eq(mm.param_floats, m.n_params_local);
            cr_assert_eq(mm.param_compute_bytes, dt == TP_DTYPE_F32 ? 0 : 2 * m.n_params_local);
            size_t moments = 2 * m.n_params_local * sizeof(float);
            cr_assert_eq(m.bytes_allocated, mm.total_bytes - moments, "tp=%d: model allocated %zu, plan %zu - %zu",
                         P, m.bytes_allocated, mm.total_bytes, moments);
            cr_assert_eq(mm.total_bytes, 4 * mm.param_floats * sizeof(float) + mm.param_compute_bytes +
                                             mm.act_bytes + 2 * d.N * sizeof(int));
            // activations at least hold every per-layer buffer the struct names
            size_t N = d.N, C = (size_t)d.C, es = tp_dtype_size((enum tp_dtype)dt);
            size_t per_layer = (4 * N * C + N * 3 * (size_t)d.Cl + N * (size_t)d.Cl + 2 * N * (size_t)d.Fl) * es +
                               4 * N * sizeof(float);
            // the fused head holds one chunk of logits, not all N rows
            cr_assert_geq(mm.act_bytes, (size_t)d.L * per_layer + (size_t)d.head_rows * (size_t)d.Vl * es);
            struct model_dims dc = d;
            dc.head_rows = 5;
            cr_assert_eq(model_memory_plan(&d, be).act_bytes - model_memory_plan(&dc, be).act_bytes,
                         tp_round_up(N * (size_t)d.Vl * es, 256) - tp_round_up(5 * (size_t)d.Vl * es, 256) +
                             2 * (tp_round_up(N * 4, 256) - tp_round_up(5 * 4, 256)) +
                             tp_round_up(2 * N * 4, 256) - tp_round_up(2 * 5 * 4, 256),
                         "the head's chunk sizes its logits and statistics");
            struct optim o;
            optim_create(&o, &m, 0.1);
            cr_assert_eq(m.bytes_allocated,
                         mm.total_bytes + 2 * sizeof(float) + (size_t)m.n_tensors * sizeof(struct param_segment));
            optim_destroy(&o, &m);
            model_destroy(&m);
            backend_destroy(&be);
        }
    }
}

// The head's kind holds ln_f's rows (this rank's S with sequence parallelism), one chunk of
// logits with its statistics, and the N per-token losses; sequence parallelism adds the gathered
// rows to the scratch, which the head's gather reuses.
Test(model, head_plan_holds_one_chunk_with_sequence_parallelism) {
    struct tp_model_config mc = tiny_config(2);
    struct backend be = backend_cpu_create(TP_DTYPE_F32);
    for (int sp = 0; sp <= 1; sp++)
        for (int rows = 32; rows >= 11; rows -= 21) {
            struct model_dims d = model_dims_make(&mc, 2, 4, (struct model_options){.sequence_parallel = sp});
            d.head_rows = rows;
            struct model_memory mm = model_memory_plan(&d, be);
            size_t S = d.S, N = d.N, C = (size_t)d.C, R = (size_t)rows, Vl = (size_t)d.Vl;
            cr_assert_eq(S, sp ? N / 4 : N);
            size_t head = tp_round_up(S * C * 4, 256) + 2 * tp_round_up(S * 4, 256) + tp_round_up(R * Vl * 4, 256) +
                          2 * tp_round_up(R * 4, 256) + tp_round_up(2 * R * 4, 256) + tp_round_up(N * 4, 256);
            cr_assert_eq(mm.act[ACT_HEAD], head, "sp=%d rows=%d: head %zu bytes, expected %zu", sp, rows,
                         mm.act[ACT_HEAD], head);
        }
    backend_destroy(&be);
}

// ---- activation accounting (docs/memory.md) against what the backend allocates

// Bytes one layer keeps, as docs/memory.md writes them for the CPU backend in fp32 (e = 4; its
// attention keeps the (T, T) probabilities of its heads): s*b tokens, R of them per rank in the
// sequence-parallel regions.
static double layer_formula(const struct model_dims *d, enum tp_recompute rc) {
    double e = 4, sb = (double)d->N, h = d->C, t = d->P, R = d->sp ? sb / t : sb;
    double ln = R * h * e + 2 * 4 * R, res = R * h * e, qkv = 3 * sb * h / t * e, atty = sb * h / t * e;
    double fc = 4 * sb * h / t * e, saved = 4.0 * d->B * (d->NH / t) * (double)d->T * d->T;
    if (rc == TP_RECOMPUTE_FULL) return res;
    if (rc == TP_RECOMPUTE_SELECTIVE) return 2 * ln + qkv + 2 * res + fc;
    return 2 * ln + qkv + atty + saved + 2 * res + 2 * fc;
}

// The activation bytes the backend measured (what it allocated, less parameters, gradients, AdamW
// state, tokens and the optimizer's own small buffers) after model_create and optim_create; they
// must be the plan's. *plan gets the plan.
static double measured_acts(struct tp_model_config mc, int B, int P, struct model_options o, struct model_memory *plan) {
    struct backend be = backend_cpu_create(TP_DTYPE_F32);
    struct model_dims d = model_dims_make(&mc, B, P, o);
    *plan = model_memory_plan(&d, be);
    struct comm rank0 = {.rank = 0, .size = P}; // places the rank only: no collective is issued
    struct model m;
    model_create(&m, &d, be, &rank0, 1);
    struct optim opt;
    optim_create(&opt, &m, 0.1);
    struct backend_memory bm;
    be.iface->memory_stats(be.ctx, &bm);
    cr_assert_eq(bm.now, m.bytes_allocated, "the backend counted %zu bytes, the model and optimizer allocated %zu",
                 bm.now, m.bytes_allocated);
    cr_assert_eq(bm.peak, bm.now);
    size_t optim_extra = 2 * sizeof(float) + (size_t)m.n_tensors * sizeof(struct param_segment);
    double acts = (double)bm.peak - (double)(plan->total_bytes - plan->act_bytes) - (double)optim_extra;
    cr_assert_eq(acts, (double)plan->act_bytes, "measured %.0f activation bytes, planned %zu", acts, plan->act_bytes);
    optim_destroy(&opt, &m);
    model_destroy(&m);
    be.iface->memory_stats(be.ctx, &bm);
    cr_assert_eq(bm.now, 0, "%zu bytes still counted after everything was freed", bm.now);
    backend_destroy(&be);
    return acts;
}

// Per layer, measured (the difference between 3 and 2 layers) against docs/memory.md's formula,
// at tp 1, 2, 4 with and without sequence parallelism, for each recompute mode; with sequence
// parallelism a rank's per-layer bytes at tp=4 are at most 0.3 of tp=1's.
Test(model, activations_per_layer_follow_the_accounting) {
    struct tp_model_config mc = {.n_layer = 2, .n_head = 4, .n_embd = 128, .vocab_size = VOCAB, .seq_len = 64};
    const int B = 2;
    for (int rc = TP_RECOMPUTE_NONE; rc <= TP_RECOMPUTE_FULL; rc++) {
        double at_tp1 = 0;
        for (int sp = 0; sp <= 1; sp++) {
            for (int P = 1; P <= 4; P *= 2) {
                struct model_options o = {.sequence_parallel = (bool)sp, .recompute = (enum tp_recompute)rc};
                struct model_memory p2, p3;
                mc.n_layer = 2;
                double a2 = measured_acts(mc, B, P, o, &p2);
                mc.n_layer = 3;
                double a3 = measured_acts(mc, B, P, o, &p3);
                struct model_dims d = model_dims_make(&mc, B, P, o);
                double measured = a3 - a2, formula = layer_formula(&d, (enum tp_recompute)rc);
                cr_log_info("recompute %-9s sp %d tp %d: per layer measured %.0f, formula %.0f bytes (%+.2f%%)",
                            config_recompute_name((enum tp_recompute)rc), sp, P, measured, formula,
                            100 * (measured - formula) / formula);
                cr_expect(fabs(measured - formula) <= 0.02 * formula, "recompute %s sp %d tp %d: measured %.0f, "
                          "formula %.0f", config_recompute_name((enum tp_recompute)rc), sp, P, measured, formula);
                cr_expect_eq((size_t)measured, p3.act_layer_bytes, "the plan's per-layer figure");
                if (P == 1 && !sp) at_tp1 = measured;
                if (P == 4 && sp)
                    cr_expect(measured <= 0.3 * at_tp1, "recompute %s: tp=4 with sequence parallelism keeps %.0f "
                              "bytes per layer, %.2f of tp=1's %.0f", config_recompute_name((enum tp_recompute)rc),
                              measured, measured / at_tp1, at_tp1);
            }
        }
    }
}

// Recomputation drops exactly the kinds docs/memory.md names and keeps one layer's worth of them
// as its work set.
Test(model, recompute_plan_drops_its_kinds) {
    struct tp_model_config mc = tiny_config(3);
    struct backend be = backend_cpu_create(TP_DTYPE_F32);
    struct model_dims d0 = model_dims_make(&mc, 2, 2, (struct model_options){0});
    struct model_memory none = model_memory_plan(&d0, be);
    cr_assert_eq(none.act[ACT_WORK], 0);
    size_t sum = 0;
    for (int k = 0; k < ACT_N_KINDS; k++) sum += none.act[k];
    cr_assert_eq(sum, none.act_bytes);
    for (int rc = TP_RECOMPUTE_SELECTIVE; rc <= TP_RECOMPUTE_FULL; rc++) {
        struct model_dims d = model_dims_make(&mc, 2, 2, (struct model_options){.recompute = (enum tp_recompute)rc});
        struct model_memory mm = model_memory_plan(&d, be);
        size_t dropped = 0;
        for (int k = 0; k < ACT_N_LAYER; k++) {
            bool kept = k == ACT_BLOCK_OUT ||
                        (rc == TP_RECOMPUTE_SELECTIVE && k != ACT_ATTN_OUT && k != ACT_ATTN_SAVED && k != ACT_FC_GELU);
            cr_assert_eq(mm.act[k], kept ? none.act[k] : 0, "recompute %s, %s", config_recompute_name(d.recompute),
                         model_act_kind_name((enum model_act_kind)k));
            if (!kept) dropped += none.act[k] / (size_t)d.L;
        }
        cr_assert_eq(mm.act[ACT_WORK], dropped, "the work set is one layer of what is dropped");
        for (int k = ACT_N_LAYER; k < ACT_N_KINDS; k++)
            if (k != ACT_WORK) cr_assert_eq(mm.act[k], none.act[k]);
        cr_assert_lt(mm.act_bytes, none.act_bytes);
    }
    backend_destroy(&be);
}

// ---- the bf16 path (CPU emulation: bf16 storage, fp32 arithmetic)

static void bf16_to_floats(float *out, const void *in, size_t n) {
    const uint16_t *h = in;
    for (size_t i = 0; i < n; i++) out[i] = tp_bf16_to_f32(h[i]);
}

// Same weights (fp32 masters from the same seed), same batch: the bf16 loss and gradients stay
// within bf16 rounding of the fp32 ones, and the compute copy is the rounding of the masters.
Test(model, bf16_tracks_fp32) {
    struct fixture f32, f16;
    fixture_init(&f32, 2, 4);
    fixture_init_dtype(&f16, 2, 4, TP_DTYPE_BF16);
    struct model *m = &f16.m;
    cr_assert_eq(m->dtype, TP_DTYPE_BF16);
    cr_assert(m->params_compute != (void *)m->params);
    float *wide = malloc(m->n_params_local * sizeof(float));
    bf16_to_floats(wide, m->params_compute, m->n_params_local);
    for (size_t i = 0; i < m->n_params_local; i++)
        cr_assert_eq(wide[i], tp_bf16_to_f32(tp_bf16_from_f32(m->params[i])), "compute copy %zu", i);
    float *g32 = gradient_of(&f32), *g16 = gradient_of(&f16);
    double l32 = loss_of(&f32), l16 = loss_of(&f16);
    cr_assert(fabs(l16 - l32) < 1e-2 * l32, "bf16 loss %.6f, fp32 %.6f", l16, l32);
    for (int i = 0; i < m->n_tensors; i++) {
        const struct param_tensor *t = &m->tensors[i];
        double d2 = 0, n2 = 0;
        for (size_t j = t->offset; j < t->offset + t->numel; j++) {
            d2 += ((double)g16[j] - g32[j]) * ((double)g16[j] - g32[j]);
            n2 += (double)g32[j] * g32[j];
        }
        if (n2 < 1e-12) continue;
        cr_expect(sqrt(d2 / n2) < 0.1, "%s: bf16 gradient differs by %.3g relative", t->name, sqrt(d2 / n2));
    }
    free(wide);
    free(g32);
    free(g16);
    fixture_fini(&f32);
    fixture_fini(&f16);
}

// Split masters (model_options.split_master, bf16): the model holds 2 bytes per parameter less;
// the masters read back are the fp32 masters an unsplit model initialises from the same seed, bit
// for bit, and the compute copy is their high halves; through 10 AdamW steps on one batch both
// models follow each other (their compute copies differ where a master's low half is exactly
// 0x8000: half up against half to even), the copy staying the masters' high halves.
Test(model, bf16_split_masters_match_fp32_masters) {
    struct fixture plain, split;
    fixture_init_dtype(&plain, 2, 2, TP_DTYPE_BF16);
    fixture_init_opts(&split, 2, 2, TP_DTYPE_BF16, (struct model_options){.split_master = true});
    struct model *a = &plain.m, *b = &split.m;
    cr_assert(b->params == NULL && b->params_lo != NULL && a->params_lo == NULL);
    cr_assert_eq(a->bytes_allocated - b->bytes_allocated, 2 * a->n_params_local, "split saves %zu bytes, not %zu",
                 a->bytes_allocated - b->bytes_allocated, 2 * a->n_params_local);
    struct model_memory mm = model_memory_plan(&b->d, split.be);
    cr_assert(mm.split_master && mm.param_bytes == 2 * b->n_params_local);
    struct tp_train_config tc = {.micro_batch = 2, .grad_accum = 1, .steps = 10, .lr = 1e-3, .min_lr = 1e-3,
                                 .schedule = TP_SCHED_CONSTANT, .weight_decay = 0.1, .beta1 = 0.9, .beta2 = 0.95,
                                 .eps = 1e-8, .grad_clip = 1.0};
    struct optim oa, ob;
    optim_create(&oa, a, tc.weight_decay);
    optim_create(&ob, b, tc.weight_decay);
    for (int s = 0; s <= 10; s++) {
        size_t most = 0;
        for (int i = 0; i < a->n_tensors; i++)
            if (a->tensors[i].numel > most) most = a->tensors[i].numel;
        float *x = malloc(most * sizeof(float)), *y = malloc(most * sizeof(float));
        const uint16_t *hi = b->params_compute;
        for (int i = 0; i < a->n_tensors; i++) {
            const struct param_tensor *t = &a->tensors[i];
            model_master_to_host(a, i, x);
            model_master_to_host(b, i, y);
            if (s == 0) cr_assert(memcmp(x, y, t->numel * sizeof(float)) == 0, "%s's masters differ", t->name);
            // AdamW's normalised steps (about lr each) amplify small gradient differences where
            // gradients are near zero: the masters stay within a few steps of each other
            for (size_t j = 0; j < t->numel; j++)
                cr_assert(fabsf(x[j] - y[j]) <= 3.0f * (float)tc.lr * (float)s, "step %d: %s[%zu] %.8g vs %.8g", s,
                          t->name, j, x[j], y[j]);
            for (size_t j = 0; j < t->numel; j++) {
                uint32_t bits;
                memcpy(&bits, y + j, sizeof bits);
                cr_assert_eq(hi[t->offset + j], tp_split_hi(bits), "step %d: %s compute copy %zu", s, t->name, j);
            }
        }
        free(x);
        free(y);
        if (s == 10) break;
        struct fixture *fs[2] = {&plain, &split};
        struct optim *os[2] = {&oa, &ob};
        double loss[2];
        for (int k = 0; k < 2; k++) {
            struct model *m = &fs[k]->m;
            fs[k]->be.iface->zero(fs[k]->be.ctx, m->grads, m->n_params_local * sizeof(float));
            loss[k] = loss_of(fs[k]);
            model_backward(m, &fs[k]->tp, 1.0f / (float)m->d.N);
            optim_grad_norm_enqueue(os[k], m, &fs[k]->tp);
            optim_step(os[k], m, &tc, (float)tc.lr);
        }
        // the compute copies differ on exact ties only (half up against half to even)
        cr_assert(fabs(loss[0] - loss[1]) <= 1e-3 * loss[0], "step %d: losses %.6f and %.6f", s, loss[0], loss[1]);
    }
    optim_destroy(&oa, a);
    optim_destroy(&ob, b);
    fixture_fini(&plain);
    fixture_fini(&split);
}

// AdamW on the bf16 path lowers the loss, keeps fp32 masters, and rewrites the bf16 copy from
// them after every step.
Test(model, bf16_adamw_steps_lower_the_loss) {
    struct fixture f;
    fixture_init_dtype(&f, 2, 2, TP_DTYPE_BF16);
    struct model *m = &f.m;
    struct optim o;
    struct tp_train_config tc = {.micro_batch = 2, .grad_accum = 1, .steps = 10, .lr = 1e-3, .min_lr = 1e-3,
                                 .warmup_steps = 0, .schedule = TP_SCHED_CONSTANT, .weight_decay = 0.1,
                                 .beta1 = 0.9, .beta2 = 0.95, .eps = 1e-8, .grad_clip = 1.0};
    optim_create(&o, m, tc.weight_decay);
    double first = 0, last = 0;
    for (int s = 0; s < 10; s++) {
        f.be.iface->zero(f.be.ctx, m->grads, m->n_params_local * sizeof(float));
        last = loss_of(&f);
        if (s == 0) first = last;
        model_backward(m, &f.tp, 1.0f / (float)m->d.N);
        optim_grad_norm_enqueue(&o, m, &f.tp);
        optim_step(&o, m, &tc, (float)tc.lr);
    }
    cr_assert(last < first - 0.1, "10 bf16 AdamW steps on one batch: %.4f -> %.4f", first, last);
    float *wide = malloc(m->n_params_local * sizeof(float));
    bf16_to_floats(wide, m->params_compute, m->n_params_local);
    for (size_t i = 0; i < m->n_params_local; i++)
        cr_assert_eq(wide[i], tp_bf16_to_f32(tp_bf16_from_f32(m->params[i])), "compute copy %zu after steps", i);
    free(wide);
    optim_destroy(&o, m);
    fixture_fini(&f);
}
