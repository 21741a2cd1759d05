// bench_gemm.c: --bench gemm CONFIG.yaml [NxICxOC ...]: every matrix product of one training step of
// the config's model, each shape timed alone through the backend's matmul (the library and algorithm
// choice the model's products get), against the matrix ceiling measured in the same run. With
// shapes after the config, those instead: each one's three passes with the MLP's epilogues
// (forward with bias + GELU, input gradient with GELU's derivative and its column sums, weight
// gradient with the bias gradient) and the forward with the bias alone, once per call, so that a
// product can be followed across sizes (say, K = IC swept at fixed N and OC) on the config's
// backend, device and precision, and what the GELU epilogue adds seen beside it.
//
// A step's products are, per layer and micro-step, the forward, input-gradient and weight-gradient
// products of qkv (column-parallel, bias), attention's output projection (row-parallel), fc
// (column-parallel, bias and GELU) and the MLP's output projection (row-parallel, GELU's derivative
// on its input gradient, whose column sums are fc's bias gradient), and per chunk of the fused LM
// head the logits, their input gradient and the tied weight's gradient. (qkv's bias gradient is
// summed by the attention backward, the projections' by the layernorm backward.) Each row of the
// report is one shape with its epilogue: ms per call, TFLOP/s, the share of the ceiling, and ms
// per step (calls x ms), so that the rows say which shapes hold the step back and by how much.
//
// Sections: products, timing, report, entry point.
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "bench_impl.h"
#include "common.h"
#include "model.h"

// ---- products

enum gemm_pass { GEMM_FWD, GEMM_BWD_DATA, GEMM_BWD_WEIGHT };

struct gemm_product {
    const char *name;   // JSON key and table row, e.g. "qkv fwd"
    enum gemm_pass pass;
    int N, IC, OC;      // rows, input width, output width (the model's row-major view)
    bool bias;          // fwd: + bias; bwd_data: + dinp's column sums; bwd_weight: + the bias gradient
    bool gelu;          // fwd: GELU with its pre-activation kept; bwd_data: times GELU's derivative
    double calls;       // per step
};

#define GEMM_MAX_SHAPES 16
#define GEMM_PASSES_PER_SHAPE 4
#define GEMM_MAX_PRODUCTS (GEMM_PASSES_PER_SHAPE * GEMM_MAX_SHAPES) // at least a step's 15

// What --bench gemm was given: the shapes (none: the config's step) and the config, in one
// allocation (the driver frees it whole).
struct gemm_args {
    int nshapes;
    int shape[GEMM_MAX_SHAPES][3];       // N, IC, OC
    char names[GEMM_MAX_SHAPES][GEMM_PASSES_PER_SHAPE][48]; // "NxICxOC fwd", ...
    char config[];
};

// The step's products for dims d: 4 layers' worth of 3 passes, then the LM head's 3, with the
// number of calls per step: L x grad_accum for the layers; for the head, whose chunks take
// head_rows rows each, N / head_rows x grad_accum (a short last chunk counts as its share of a
// full one), so that calls x FLOPs per call is the step's exactly.
static int gemm_products(const struct model_dims *d, int accum, struct gemm_product *out) {
    int N = (int)d->N, C = d->C, Cl = d->Cl, Fl = d->Fl;
    double per_layer = (double)d->L * accum;
    int rows = d->head_rows < N ? d->head_rows : N;
    double chunks = (double)N / rows * accum;
    struct {
        const char *prefix;
        int IC, OC;
        bool fwd_bias, fwd_gelu, dgelu, dsum, dbias;
        double calls;
    } lin[5] = {
        // row-parallel products add their bias after the reduction, not in the product
        {"qkv", C, 3 * Cl, true, false, false, false, false, per_layer},
        {"attn proj", Cl, C, false, false, false, false, false, per_layer},
        {"fc", C, Fl, true, true, false, false, false, per_layer},
        {"mlp proj", Fl, C, false, false, true, true, false, per_layer},
        {"lm head", C, d->Vl, false, false, false, false, false, chunks},
    };
    static const char *names[5][3] = {
        {"qkv fwd", "qkv bwd data", "qkv bwd weight"},
        {"attn proj fwd", "attn proj bwd data", "attn proj bwd weight"},
        {"fc fwd", "fc bwd data", "fc bwd weight"},
        {"mlp proj fwd", "mlp proj bwd data", "mlp proj bwd weight"},
        {"lm head fwd", "lm head bwd data", "lm head bwd weight"},
    };
    int n = 0;
    for (int i = 0; i < 5; i++) {
        int R = i == 4 ? rows : N;
        out[n++] = (struct gemm_product){names[i][0], GEMM_FWD, R, lin[i].IC, lin[i].OC, lin[i].fwd_bias,
                                         lin[i].fwd_gelu, lin[i].calls};
        out[n++] = (struct gemm_product){names[i][1], GEMM_BWD_DATA, R, lin[i].IC, lin[i].OC, lin[i].dsum, lin[i].dgelu,
                                         lin[i].calls};
        out[n++] = (struct gemm_product){names[i][2], GEMM_BWD_WEIGHT, R, lin[i].IC, lin[i].OC, lin[i].dbias, false,
                                         lin[i].calls};
    }
    return n;
}

// Each shape's three passes with the MLP's epilogues (as the step's fc forward and MLP projection
// input gradient; the weight gradient with a bias gradient, as a linear layer's backward offers),
// and its forward with the bias alone; one call each.
static const char *const shape_passes[GEMM_PASSES_PER_SHAPE] = {"fwd", "fwd bias", "bwd data", "bwd weight"};

static int shape_products(const struct gemm_args *a, struct gemm_product *out) {
    int n = 0;
    for (int i = 0; i < a->nshapes; i++) {
        const int N = a->shape[i][0], IC = a->shape[i][1], OC = a->shape[i][2];
        out[n++] = (struct gemm_product){a->names[i][0], GEMM_FWD, N, IC, OC, true, true, 1.0};
        out[n++] = (struct gemm_product){a->names[i][1], GEMM_FWD, N, IC, OC, true, false, 1.0};
        out[n++] = (struct gemm_product){a->names[i][2], GEMM_BWD_DATA, N, IC, OC, true, true, 1.0};
        out[n++] = (struct gemm_product){a->names[i][3], GEMM_BWD_WEIGHT, N, IC, OC, true, false, 1.0};
    }
    return n;
}

// ---- timing

struct gemm_run {
    struct backend be;
    const struct gemm_product *p;
    void *inp, *w, *bias, *out, *pre; // compute type: (N, IC), (OC, IC), (OC), (N, OC), (N, OC) or (N, IC)
    void *dout, *dinp;                // (N, OC), (N, IC)
    float *dw, *dbias;                // (OC, IC), (OC) fp32
};

static void run_product(void *arg, struct bench_clock *c) {
    struct gemm_run *r = arg;
    const struct gemm_product *p = r->p;
    const struct backend_i *b = r->be.iface;
    (void)c;
    switch (p->pass) {
    case GEMM_FWD:
        b->matmul_fwd(r->be.ctx, r->out, p->gelu ? r->pre : NULL, r->inp, r->w, p->bias ? r->bias : NULL, p->N,
                      p->IC, p->OC);
        break;
    case GEMM_BWD_DATA:
        b->matmul_bwd(r->be.ctx, r->dinp, p->bias ? r->dbias : NULL, NULL, NULL, r->dout, NULL, r->w,
                      p->gelu ? r->pre : NULL, p->N, p->IC, p->OC);
        break;
    case GEMM_BWD_WEIGHT:
        b->matmul_bwd(r->be.ctx, NULL, NULL, r->dw, p->bias ? r->dbias : NULL, r->dout, r->inp, r->w, NULL, p->N,
                      p->IC, p->OC);
        break;
    }
}

// Times one product on operands of its shape (freed after), returns the median ms per call.
static double time_product(struct bench *b, const struct gemm_product *p, int warmup, int iters, uint64_t seed) {
    size_t N = (size_t)p->N, IC = (size_t)p->IC, OC = (size_t)p->OC;
    struct gemm_run r = {.be = b->be, .p = p};
    r.inp = bench_alloc_compute(b, N * IC);
    r.w = bench_alloc_compute(b, OC * IC);
    bench_fill_uniform(b->be, r.inp, N * IC, 1.0f, seed);
    bench_fill_uniform(b->be, r.w, OC * IC, 1.0f / sqrtf((float)IC), seed + 1);
    if (p->pass == GEMM_FWD) {
        r.out = bench_alloc_compute(b, N * OC);
        if (p->gelu) r.pre = bench_alloc_compute(b, N * OC);
        if (p->bias) {
            r.bias = bench_alloc_compute(b, OC);
            bench_fill_uniform(b->be, r.bias, OC, 0.1f, seed + 2);
        }
    } else {
        r.dout = bench_alloc_compute(b, N * OC);
        bench_fill_uniform(b->be, r.dout, N * OC, 1.0f, seed + 3);
        if (p->pass == GEMM_BWD_DATA) {
            r.dinp = bench_alloc_compute(b, N * IC);
            if (p->bias) r.dbias = bench_alloc_floats(b, IC);
            if (p->gelu) {
                r.pre = bench_alloc_compute(b, N * IC);
                bench_fill_uniform(b->be, r.pre, N * IC, 2.0f, seed + 4);
            }
        } else {
            r.dw = bench_alloc_floats(b, OC * IC);
            if (p->bias) r.dbias = bench_alloc_floats(b, OC);
        }
    }
    struct bench_phase spec = {p->name, p->name, run_product, NULL};
    struct bench_phase_times t;
    bench_time_phase(b, &spec, &r, warmup, iters, 0.0, 0, 0, &t);
    void *bufs[] = {r.inp, r.w, r.bias, r.out, r.pre, r.dout, r.dinp, r.dw, r.dbias};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        if (bufs[i]) b->be.iface->free(b->be.ctx, bufs[i]);
    return t.ms.median;
}

// ---- report

struct gemm_row {
    struct gemm_product p;
    double ms, tflops, share, step_ms;
};

static const char *epilogue_of(const struct gemm_product *p) {
    switch (p->pass) {
    case GEMM_FWD: return p->gelu ? "bias+gelu" : p->bias ? "bias" : "-";
    case GEMM_BWD_DATA: return p->gelu ? (p->bias ? "dgelu+dsum" : "dgelu") : p->bias ? "dsum" : "-";
    case GEMM_BWD_WEIGHT: return p->bias ? "+dbias" : "-";
    }
    return "-";
}

static void gemm_print(const struct bench *b, const char *config, bool given, const struct bench_ceilings *k,
                       const struct gemm_row *rows, int n, double sum_ms, double ideal_ms) {
    bench_print_setup(b, "gemm");
    if (given)
        printf("config %s: the shapes given, each pass timed alone, one call each (N rows x IC in -> OC out)\n",
               config);
    else
        printf("config %s: products of one step, each shape timed alone (N rows x IC in -> OC out, this rank's)\n",
               config);
    printf("ceiling per GPU: matrix %.4g TFLOP/s (%s)\n\n", k->matrix_tflops, k->how);
    printf("%-22s %7s %6s %6s  %-9s %7s %10s %9s %7s %10s\n", "product", "N", "IC", "OC", "epilogue", "calls",
           "ms/call", "TFLOP/s", "of ceil", "ms/step");
    for (int i = 0; i < n; i++) {
        const struct gemm_row *r = &rows[i];
        printf("%-22s %7d %6d %6d  %-9s %7.4g %10.4f %9.4g %6.1f%% %10.3f\n", r->p.name, r->p.N, r->p.IC, r->p.OC,
               epilogue_of(&r->p), r->p.calls, r->ms, r->tflops, 100.0 * r->share, r->step_ms);
    }
    printf("%-22s %66s %10.3f\n", "all products", "", sum_ms);
    printf("%-22s %66s %10.3f   (%.2f x the ceiling's time)\n", "at the ceiling", "", ideal_ms,
           ideal_ms > 0 ? sum_ms / ideal_ms : NAN);
}

static void gemm_json(const struct bench *b, const char *config, bool given, const struct bench_ceilings *k,
                      const struct gemm_row *rows, int n, double sum_ms, double ideal_ms) {
    json_t *doc = bench_json_setup(b, "gemm");
    json_object_set_new(doc, "config", json_string(config));
    json_object_set_new(doc, "products_of", json_string(given ? "shapes" : "step"));
    json_t *ceil = json_pack("{s:s}", "source", k->how);
    bench_json_kv(ceil, "matrix_tflops", k->matrix_tflops);
    json_object_set_new(doc, "ceilings", ceil);
    json_t *arr = json_array();
    for (int i = 0; i < n; i++) {
        const struct gemm_row *r = &rows[i];
        json_t *o = json_pack("{s:s,s:s,s:i,s:i,s:i}", "product", r->p.name, "epilogue", epilogue_of(&r->p), "N",
                              r->p.N, "IC", r->p.IC, "OC", r->p.OC);
        bench_json_kv(o, "calls_per_step", r->p.calls);
        bench_json_kv(o, "ms_per_call", r->ms);
        bench_json_kv(o, "tflops", r->tflops);
        bench_json_kv(o, "share_of_ceiling", r->share);
        bench_json_kv(o, "ms_per_step", r->step_ms);
        json_array_append_new(arr, o);
    }
    json_object_set_new(doc, "products", arr);
    bench_json_kv(doc, "products_ms_per_step", sum_ms);
    bench_json_kv(doc, "ceiling_ms_per_step", ideal_ms);
    bench_json_emit(b, doc);
}

// ---- entry point

static int gemm_run(struct bench *b, void *args) {
    const struct gemm_args *a = args;
    const char *config = a->config;
    const struct tp_config *cfg = &b->cfg;
    struct bench_ceilings k;
    int st = bench_ceilings(b, &k);
    if (st) return st;
    struct model_dims d = model_dims_make(&cfg->model, cfg->train.micro_batch, b->mesh.tp.size, model_options_of(cfg));
    struct gemm_product ps[GEMM_MAX_PRODUCTS];
    int n = a->nshapes ? shape_products(a, ps) : gemm_products(&d, cfg->train.grad_accum, ps);
    struct gemm_row rows[GEMM_MAX_PRODUCTS];
    int warmup = b->iters_fixed ? b->warmup : 2, iters = b->iters_fixed ? b->iters : 10;
    if (warmup < 1) warmup = 1; // the first call chooses the algorithm
    double sum_ms = 0.0, ideal_ms = 0.0;
    for (int i = 0; i < n; i++) {
        struct gemm_row *r = &rows[i];
        r->p = ps[i];
        r->ms = time_product(b, &ps[i], warmup, iters, cfg->train.seed + 10 * (uint64_t)i);
        double flops = 2.0 * ps[i].N * (double)ps[i].IC * ps[i].OC;
        r->tflops = r->ms > 0 ? flops / (r->ms * 1e-3) / 1e12 : NAN;
        r->share = r->tflops / k.matrix_tflops;
        r->step_ms = r->ms * ps[i].calls;
        sum_ms += r->step_ms;
        ideal_ms += flops * ps[i].calls / (k.matrix_tflops * 1e12) * 1e3;
    }
    if (b->root) gemm_print(b, config, a->nshapes > 0, &k, rows, n, sum_ms, ideal_ms);
    if (b->json) gemm_json(b, config, a->nshapes > 0, &k, rows, n, sum_ms, ideal_ms);
    return 0;
}

#define GEMM_MAX_ELEMS (1LL << 30) // per operand or result: absurd shapes are refused up front

// "NxICxOC" -> three positive ints, no matrix of the products over GEMM_MAX_ELEMS; false otherwise.
static bool parse_gemm_shape(const char *s, int (*out)[3]) {
    if (!bench_parse_dims(s, 3, *out)) return false;
    const long long N = (*out)[0], IC = (*out)[1], OC = (*out)[2];
    return N * IC <= GEMM_MAX_ELEMS && N * OC <= GEMM_MAX_ELEMS && IC * OC <= GEMM_MAX_ELEMS;
}

static int gemm_parse(const struct bench_opts *o, bool root, int world, void **args) {
    (void)world;
    if (o->argc < 2) {
        if (root)
            fprintf(stderr, "tptrain: --bench gemm takes a config file and optionally shapes NxICxOC, e.g. "
                            "--bench gemm configs/gpt2-124m.yaml 16384x768x3072\n");
        return TP_EXIT_USAGE;
    }
    size_t len = strlen(o->argv[1]) + 1;
    struct gemm_args *a = tp_calloc(1, sizeof *a + len);
    memcpy(a->config, o->argv[1], len);
    for (int i = 2; i < o->argc; i++) {
        int (*sh)[3] = &a->shape[a->nshapes];
        if (a->nshapes == GEMM_MAX_SHAPES || !parse_gemm_shape(o->argv[i], sh)) {
            if (root)
                fprintf(stderr, "tptrain: --bench gemm: '%s' is not a shape NxICxOC (rows x input width x output "
                                "width, positive, each matrix at most 2^30 elements, e.g. 16384x768x3072)%s\n",
                        o->argv[i], a->nshapes == GEMM_MAX_SHAPES ? ", or one too many (at most 16)" : "");
            free(a);
            return TP_EXIT_USAGE;
        }
        for (int p = 0; p < GEMM_PASSES_PER_SHAPE; p++)
            snprintf(a->names[a->nshapes][p], sizeof a->names[0][p], "%dx%dx%d %s", (*sh)[0], (*sh)[1], (*sh)[2],
                     shape_passes[p]);
        a->nshapes++;
    }
    *args = a;
    return 0;
}

static const char *gemm_config(const void *args) { return ((const struct gemm_args *)args)->config; }

const struct bench_mode bench_mode_gemm = {
    .name = "gemm",
    .synopsis = "gemm CONFIG.yaml [NxICxOC ...]",
    .parse = gemm_parse,
    .config_path = gemm_config,
    .run = gemm_run,
};
