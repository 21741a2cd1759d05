// model.c: the tensor-parallel GPT-2 graph: parameter plan, TP-invariant init, forward, backward,
// recomputation.
//
// The graph is composed from tp.h's parallel layers, each of which names its collectives, so a
// reader counts them here: per layer column_parallel_linear (qkv, fc: 1 all-reduce backward each)
// and row_parallel_linear (proj, fc_proj: 1 all-reduce forward each), i.e. 2 forward and 2
// backward; plus vocab_parallel_embedding (1 forward) and the LM head fused with
// vocab_parallel_cross_entropy (2 per chunk of token rows, and 1 backward). With sequence
// parallelism the same layers swap f and g for all-gathers and reduce-scatters along the tokens
// (tp.h), and the gradients summed over this rank's rows only (the layernorms' weights and biases,
// the row-parallel layers' biases) get one all-reduce per step. No other collective is issued.
//
// The row-parallel layers' bias gradients are the column sums of their output gradient, which is
// the residual gradient a layernorm's backward leaves (ln_2's for the attention projection, the
// next block's ln_1 or ln_f for the MLP projection): that backward sums it while it writes it.
#include "model.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#include "common.h"
#include "tp.h"

// ---- dims and parameter table

struct model_dims model_dims_make(const struct tp_model_config *mc, int micro_batch, int tp,
                                  struct model_options opt) {
    struct model_dims d = {0};
    d.L = mc->n_layer;
    d.C = mc->n_embd;
    d.NH = mc->n_head;
    d.HS = mc->n_embd / mc->n_head;
    d.T = mc->seq_len;
    d.B = micro_batch;
    d.V = mc->vocab_size;
    d.P = tp;
    // Padding to a multiple of 128*P gives every rank an equal, aligned block; padded rows are
    // zero and masked out of the softmax, so the padded size changes nothing in the math.
    d.Vp = (int)tp_round_up((size_t)d.V, (size_t)128 * (size_t)tp);
    d.Vl = d.Vp / tp;
    d.NHl = d.NH / tp;
    d.Cl = d.C / tp;
    d.Fl = 4 * d.C / tp;
    d.N = (size_t)d.B * (size_t)d.T;
    d.head_rows = model_head_rows(d.N, d.Vl);
    d.sp = opt.sequence_parallel;
    d.recompute = opt.recompute;
    d.split_master = opt.split_master;
    d.S = d.sp ? d.N / (size_t)tp : d.N;
    return d;
}

int model_head_rows(size_t N, int Vl) {
    size_t per = MODEL_HEAD_LOGITS_MAX / (size_t)(Vl > 0 ? Vl : 1); // rows within the budget
    if (per < 1) per = 1;
    if (N <= per) return (int)N;
    size_t k_min = (N + per - 1) / per; // fewest chunks
    for (size_t k = k_min; k <= 2 * k_min && k <= N; k++)
        if (N % k == 0) return (int)(N / k);
    return (int)((N + k_min - 1) / k_min);
}

static void add_tensor(struct param_tensor *t, int *n, const char *name, int ndim, const size_t *shape,
                       struct layout layout, enum param_init init, bool decay, bool transpose_hf) {
    struct param_tensor *p = &t[(*n)++];
    memset(p, 0, sizeof *p);
    snprintf(p->name, sizeof p->name, "%s", name);
    p->spec.ndim = ndim;
    for (int i = 0; i < ndim; i++) p->spec.global_shape[i] = shape[i];
    p->spec.layout = layout;
    p->real_rows = shape[0];
    p->init = init;
    p->decay = decay;
    p->transpose_hf = transpose_hf;
}

struct param_tensor *model_param_table(const struct model_dims *d, int *count, size_t *n_local,
                                       size_t *n_global) {
    int cap = 12 * d->L + 4, n = 0;
    struct param_tensor *t = tp_calloc((size_t)cap, sizeof *t);
    size_t C = (size_t)d->C;
    char name[64];
    add_tensor(t, &n, "wte.weight", 2, (size_t[]){(size_t)d->Vp, C}, layout_shard(0), PARAM_INIT_NORMAL, true, false);
    t[0].real_rows = (size_t)d->V;
    add_tensor(t, &n, "wpe.weight", 2, (size_t[]){(size_t)d->T, C}, layout_replicate(), PARAM_INIT_NORMAL, true, false);
    for (int l = 0; l < d->L; l++) {
#define LAYER_NAME(suffix) (snprintf(name, sizeof name, "h.%d.%s", l, suffix), name)
        add_tensor(t, &n, LAYER_NAME("ln_1.weight"), 1, (size_t[]){C}, layout_replicate(), PARAM_INIT_ONES, false, false);
        add_tensor(t, &n, LAYER_NAME("ln_1.bias"), 1, (size_t[]){C}, layout_replicate(), PARAM_INIT_ZEROS, false, false);
        // (3, C, C) sharded on dim 1: each rank holds the q, k and v rows of its own heads.
        add_tensor(t, &n, LAYER_NAME("attn.c_attn.weight"), 3, (size_t[]){3, C, C}, layout_shard(1), PARAM_INIT_NORMAL, true, true);
        add_tensor(t, &n, LAYER_NAME("attn.c_attn.bias"), 2, (size_t[]){3, C}, layout_shard(1), PARAM_INIT_ZEROS, false, false);
        add_tensor(t, &n, LAYER_NAME("attn.c_proj.weight"), 2, (size_t[]){C, C}, layout_shard(1), PARAM_INIT_NORMAL_RESID, true, true);
        add_tensor(t, &n, LAYER_NAME("attn.c_proj.bias"), 1, (size_t[]){C}, layout_replicate(), PARAM_INIT_ZEROS, false, false);
        add_tensor(t, &n, LAYER_NAME("ln_2.weight"), 1, (size_t[]){C}, layout_replicate(), PARAM_INIT_ONES, false, false);
        add_tensor(t, &n, LAYER_NAME("ln_2.bias"), 1, (size_t[]){C}, layout_replicate(), PARAM_INIT_ZEROS, false, false);
        add_tensor(t, &n, LAYER_NAME("mlp.c_fc.weight"), 2, (size_t[]){4 * C, C}, layout_shard(0), PARAM_INIT_NORMAL, true, true);
        add_tensor(t, &n, LAYER_NAME("mlp.c_fc.bias"), 1, (size_t[]){4 * C}, layout_shard(0), PARAM_INIT_ZEROS, false, false);
        add_tensor(t, &n, LAYER_NAME("mlp.c_proj.weight"), 2, (size_t[]){C, 4 * C}, layout_shard(1), PARAM_INIT_NORMAL_RESID, true, true);
        add_tensor(t, &n, LAYER_NAME("mlp.c_proj.bias"), 1, (size_t[]){C}, layout_replicate(), PARAM_INIT_ZEROS, false, false);
#undef LAYER_NAME
    }
    add_tensor(t, &n, "ln_f.weight", 1, (size_t[]){C}, layout_replicate(), PARAM_INIT_ONES, false, false);
    add_tensor(t, &n, "ln_f.bias", 1, (size_t[]){C}, layout_replicate(), PARAM_INIT_ZEROS, false, false);
    size_t off = 0, global = 0;
    for (int i = 0; i < n; i++) {
        t[i].offset = off;
        t[i].numel = layout_local_numel(&t[i].spec, d->P);
        off += t[i].numel;
        global += layout_global_numel(&t[i].spec) / t[i].spec.global_shape[0] * t[i].real_rows;
    }
    *count = n;
    *n_local = off;
    *n_global = global;
    return t;
}

// ---- TP-invariant initialisation

// What every element of one tensor shares: its key (the seed hashed with the tensor's name), the
// elements of a global row, and the standard deviation.
struct init_stream {
    uint64_t key;
    size_t row_elems;
    double std;
};

static struct init_stream init_stream_of(unsigned long long seed, const struct param_tensor *t, int n_layer) {
    return (struct init_stream){
        .key = tp_splitmix64((uint64_t)seed ^ tp_fnv1a(t->name, strlen(t->name))),
        .row_elems = layout_global_numel(&t->spec) / t->spec.global_shape[0],
        .std = t->init == PARAM_INIT_NORMAL_RESID ? 0.02 / sqrt(2.0 * n_layer) : 0.02,
    };
}

static float init_value(const struct init_stream *s, const struct param_tensor *t, size_t global_index) {
    switch (t->init) {
    case PARAM_INIT_ZEROS: return 0.0f;
    case PARAM_INIT_ONES: return 1.0f;
    case PARAM_INIT_NORMAL:
    case PARAM_INIT_NORMAL_RESID: break;
    }
    if (global_index / s->row_elems >= t->real_rows) return 0.0f; // vocabulary padding
    // Counter-based: two hashed uniforms per element, then Box-Muller. No state, so any rank can
    // produce any element, and a shard's values do not depend on the TP size.
    uint64_t key = s->key;
    uint64_t a = tp_splitmix64(key ^ tp_splitmix64(2 * (uint64_t)global_index));
    uint64_t b = tp_splitmix64(key ^ tp_splitmix64(2 * (uint64_t)global_index + 1));
    double u1 = ((double)(a >> 11) + 1.0) * 0x1.0p-53; // (0, 1]
    double u2 = (double)(b >> 11) * 0x1.0p-53;         // [0, 1)
    double z = sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
    return (float)(z * s->std);
}

float model_init_value(unsigned long long seed, const struct param_tensor *t, size_t global_index, int n_layer) {
    struct init_stream s = init_stream_of(seed, t, n_layer);
    return init_value(&s, t, global_index);
}

static void init_params(struct model *m, unsigned long long seed) {
    size_t max_numel = 0;
    for (int i = 0; i < m->n_tensors; i++)
        if (m->tensors[i].numel > max_numel) max_numel = m->tensors[i].numel;
    float *host = tp_malloc(max_numel * sizeof(float));
    for (int i = 0; i < m->n_tensors; i++) {
        const struct param_tensor *t = &m->tensors[i];
        struct init_stream s = init_stream_of(seed, t, m->d.L);
#pragma omp parallel for schedule(static)
        for (size_t j = 0; j < t->numel; j++) {
            size_t g = layout_global_index(&t->spec, m->tp->rank, m->tp->size, j);
            host[j] = init_value(&s, t, g);
        }
        model_master_from_host(m, i, host);
    }
    free(host);
    model_sync_compute_params(m);
}

void model_master_from_host(struct model *m, int i, const float *host) {
    const struct param_tensor *t = &m->tensors[i];
    const struct backend_i *b = m->be.iface;
    if (m->params) {
        b->copy_to_device(m->be.ctx, m->params + t->offset, host, t->numel * sizeof(float));
        return;
    }
    if (!m->params_lo) tp_die(TP_EXIT_RUNTIME, "model: the master weights live in the optimizer's slices");
    uint16_t *hl = tp_malloc(2 * t->numel * sizeof(uint16_t)), *lo = hl + t->numel; // (numel) each
#pragma omp parallel for schedule(static)
    for (size_t j = 0; j < t->numel; j++) {
        uint32_t bits;
        memcpy(&bits, host + j, sizeof bits);
        hl[j] = tp_split_hi(bits);
        lo[j] = tp_split_lo(bits);
    }
    b->copy_to_device(m->be.ctx, (uint16_t *)m->params_compute + t->offset, hl, t->numel * sizeof(uint16_t));
    b->copy_to_device(m->be.ctx, m->params_lo + t->offset, lo, t->numel * sizeof(uint16_t));
    free(hl);
}

void model_master_to_host(const struct model *m, int i, float *host) {
    const struct param_tensor *t = &m->tensors[i];
    const struct backend_i *b = m->be.iface;
    if (m->params) {
        b->copy_to_host(m->be.ctx, host, m->params + t->offset, t->numel * sizeof(float));
        return;
    }
    if (!m->params_lo) tp_die(TP_EXIT_RUNTIME, "model: the master weights live in the optimizer's slices");
    uint16_t *hl = tp_malloc(2 * t->numel * sizeof(uint16_t)), *lo = hl + t->numel; // (numel) each
    b->copy_to_host(m->be.ctx, hl, (const uint16_t *)m->params_compute + t->offset, t->numel * sizeof(uint16_t));
    b->copy_to_host(m->be.ctx, lo, m->params_lo + t->offset, t->numel * sizeof(uint16_t));
#pragma omp parallel for schedule(static)
    for (size_t j = 0; j < t->numel; j++) {
        uint32_t bits = tp_split_join(hl[j], lo[j]);
        memcpy(host + j, &bits, sizeof bits);
    }
    free(hl);
}

// ---- views into the flat buffers

// es: bytes per element of the buffer at base (the compute type for params, 4 for gradients).
static void carve_params(struct gpt2_params *p, void *base, size_t es, const struct param_tensor *t, int L) {
    char *b = base;
    int i = 0;
    p->wte = b + t[i++].offset * es;
    p->wpe = b + t[i++].offset * es;
    for (int l = 0; l < L; l++) {
        struct layer_params *lp = &p->layers[l];
        void **slots[12] = {&lp->ln1w, &lp->ln1b, &lp->qkvw, &lp->qkvb, &lp->attprojw, &lp->attprojb,
                            &lp->ln2w, &lp->ln2b, &lp->fcw, &lp->fcb, &lp->fcprojw, &lp->fcprojb};
        for (int k = 0; k < 12; k++) *slots[k] = b + t[i++].offset * es;
    }
    p->lnfw = b + t[i++].offset * es;
    p->lnfb = b + t[i++].offset * es;
}

// With sequence parallelism, the gradients summed over this rank's rows packed for their
// all-reduce (struct model's ln_grads; sp_grad_count of C floats each): gradient memory, allocated
// beside the gradients.
static int sp_grad_count(const struct model_dims *d) { return 6 * d->L + 2; }

static size_t ln_grads_bytes(const struct model_dims *d) {
    return d->sp ? (size_t)sp_grad_count(d) * (size_t)d->C * sizeof(float) : 0;
}

// Walks the activation plan once: with base == NULL it only counts bytes, otherwise it also
// assigns pointers. Counting and carving share this code so the plan and the allocation agree.
// Compute-type tensors take es bytes per element, fp32 ones 4. by_kind (optional) gets each
// buffer's bytes added to its kind.
static size_t carve_acts(struct gpt2_acts *a, void *base, const struct model_dims *d, struct backend be,
                         size_t *by_kind) {
    size_t N = d->N, S = d->S, C = (size_t)d->C, Cl = (size_t)d->Cl, Fl = (size_t)d->Fl, Vl = (size_t)d->Vl;
    size_t R = (size_t)d->head_rows; // the fused head holds one chunk of logits
    size_t es = tp_dtype_size(be.iface->dtype(be.ctx)), f4 = sizeof(float);
    size_t saved = be.iface->attention_saved_floats(be.ctx, d->B, d->T, d->NHl, d->HS);
    size_t scratch = be.iface->attention_scratch_floats(be.ctx, d->B, d->T, d->NHl, d->HS);
    size_t off = 0;
#define TAKE(kind, ptr, n, elem)                                                  \
    do {                                                                          \
        size_t bytes_ = tp_round_up((n) * (elem), 256); /* aligned starts */      \
        if (base) (ptr) = (void *)((char *)base + off);                           \
        if (by_kind) by_kind[kind] += bytes_;                                     \
        off += bytes_;                                                            \
    } while (0)
// A per-layer buffer: its own when the layer keeps it, else layer 0's (the shared work set).
#define TAKE_LAYER(kind, field, n, elem, kept)                                    \
    do {                                                                          \
        if (kept) TAKE(kind, la->field, n, elem);                                 \
        else if (l == 0) TAKE(ACT_WORK, la->field, n, elem);                      \
        else if (base) la->field = a->layers[0].field;                            \
    } while (0)
    bool all = d->recompute == TP_RECOMPUTE_NONE, part = d->recompute != TP_RECOMPUTE_FULL;
    struct gpt2_acts tmpa, *aa = a && base ? a : &tmpa;
    TAKE(ACT_EMBED, aa->encoded, S * C, es);
    for (int l = 0; l < d->L; l++) {
        struct layer_acts tmp, *la = a && base ? &a->layers[l] : &tmp;
        TAKE_LAYER(ACT_LN1, ln1, S * C, es, part);
        TAKE_LAYER(ACT_LN1, ln1_mean, S, f4, part);
        TAKE_LAYER(ACT_LN1, ln1_rstd, S, f4, part);
        TAKE_LAYER(ACT_QKV, qkv, N * 3 * Cl, es, part);
        TAKE_LAYER(ACT_ATTN_OUT, atty, N * Cl, es, all);
        TAKE_LAYER(ACT_ATTN_SAVED, att_saved, saved, f4, all);
        TAKE_LAYER(ACT_RES_ATTN, res2, S * C, es, part);
        TAKE_LAYER(ACT_LN2, ln2, S * C, es, part);
        TAKE_LAYER(ACT_LN2, ln2_mean, S, f4, part);
        TAKE_LAYER(ACT_LN2, ln2_rstd, S, f4, part);
        TAKE_LAYER(ACT_FC_PRE, fch, N * Fl, es, part);
        TAKE_LAYER(ACT_FC_GELU, fch_gelu, N * Fl, es, all);
        TAKE(ACT_BLOCK_OUT, la->res3, S * C, es);
    }
#undef TAKE_LAYER
    TAKE(ACT_SCRATCH, aa->proj, N * C, es);
    if (d->sp) TAKE(ACT_SCRATCH, aa->rows, N * C, es);
    else if (base) aa->rows = NULL;
    TAKE(ACT_HEAD, aa->lnf, S * C, es);
    TAKE(ACT_HEAD, aa->lnf_mean, S, f4);
    TAKE(ACT_HEAD, aa->lnf_rstd, S, f4);
    TAKE(ACT_HEAD, aa->logits, R * Vl, es);
    TAKE(ACT_HEAD, aa->maxes, R, f4);
    TAKE(ACT_HEAD, aa->local_maxes, R, f4);
    TAKE(ACT_HEAD, aa->sums, 2 * R, f4);
    TAKE(ACT_HEAD, aa->losses, N, f4);
    TAKE(ACT_BACKWARD, aa->dres, S * C, es);
    TAKE(ACT_BACKWARD, aa->dln, S * C, es);
    TAKE(ACT_BACKWARD, aa->dqkv, N * 3 * Cl, es);
    TAKE(ACT_BACKWARD, aa->datty, N * Cl, es);
    TAKE(ACT_BACKWARD, aa->dfch, N * Fl, es);
    TAKE(ACT_SCRATCH, aa->att_scratch, scratch, f4);
#undef TAKE
    return off;
}

struct model_memory model_memory_plan(const struct model_dims *d, struct backend be) {
    struct model_memory mm = {0};
    int n;
    size_t global;
    free(model_param_table(d, &n, &mm.param_floats, &global));
    enum tp_dtype dt = be.iface->dtype(be.ctx);
    mm.split_master = model_masters_split(d, dt);
    mm.param_bytes = mm.param_floats * (mm.split_master ? sizeof(uint16_t) : sizeof(float));
    mm.grad_bytes = mm.param_floats * sizeof(float) + ln_grads_bytes(d);
    mm.optim_bytes = 2 * mm.param_floats * sizeof(float); // AdamW's m and v
    mm.param_compute_bytes = dt == TP_DTYPE_F32 ? 0 : mm.param_floats * tp_dtype_size(dt);
    mm.act_bytes = carve_acts(NULL, NULL, d, be, mm.act);
    for (int k = 0; k < ACT_N_LAYER; k++) mm.act_layer_bytes += mm.act[k] / (size_t)d->L;
    mm.token_bytes = 2 * d->N * sizeof(int);
    mm.total_bytes = mm.param_bytes + mm.grad_bytes + mm.optim_bytes + mm.param_compute_bytes + mm.act_bytes +
                     mm.token_bytes;
    return mm;
}

const char *model_act_kind_name(enum model_act_kind k) {
    static const char *const names[ACT_N_KINDS] = {
        [ACT_LN1] = "ln_1 output + statistics", [ACT_QKV] = "qkv", [ACT_ATTN_OUT] = "attention output",
        [ACT_ATTN_SAVED] = "attention saved for backward", [ACT_RES_ATTN] = "residual after attention",
        [ACT_LN2] = "ln_2 output + statistics", [ACT_FC_PRE] = "fc output (GELU input)",
        [ACT_FC_GELU] = "GELU output", [ACT_BLOCK_OUT] = "block output (next input)",
        [ACT_EMBED] = "embedding output", [ACT_WORK] = "recomputation work set (one layer)",
        [ACT_HEAD] = "ln_f, logits and loss statistics", [ACT_BACKWARD] = "backward gradient buffers",
        [ACT_SCRATCH] = "scratch (partial sums, gathered rows)",
    };
    return k >= 0 && k < ACT_N_KINDS ? names[k] : "?";
}

// "(S, C)"-style shape of each kind, for the plan's reader.
static const char *act_kind_shape(enum model_act_kind k, const struct model_dims *d) {
    switch (k) {
    case ACT_LN1:
    case ACT_LN2: return d->sp ? "(BT/tp, C) + 2 x (BT/tp) fp32" : "(BT, C) + 2 x (BT) fp32";
    case ACT_QKV: return "(BT, 3C/tp)";
    case ACT_ATTN_OUT: return "(BT, C/tp)";
    case ACT_ATTN_SAVED: return "backend's (per head)";
    case ACT_RES_ATTN:
    case ACT_BLOCK_OUT:
    case ACT_EMBED: return d->sp ? "(BT/tp, C)" : "(BT, C)";
    case ACT_FC_PRE:
    case ACT_FC_GELU: return "(BT, 4C/tp)";
    default: return "";
    }
}

void model_memory_print(FILE *f, const struct model_dims *d, const struct model_memory *mm, const char *what) {
    const double MiB = 1024.0 * 1024.0, GiB = MiB * 1024.0;
    fprintf(f, "# memory per rank (%s): parameters %.3f GiB (%s %.3f), gradients %.3f, AdamW %.3f, "
            "activations %.3f -> total %.3f GiB\n", what, (double)mm->param_bytes / GiB,
            mm->split_master ? "split masters: low halves, + the compute copy as high halves" : "+ compute copy",
            (double)mm->param_compute_bytes / GiB, (double)mm->grad_bytes / GiB, (double)mm->optim_bytes / GiB,
            (double)mm->act_bytes / GiB, (double)mm->total_bytes / GiB);
    fprintf(f, "# activations by kind (sequence_parallel %s, recompute %s; B=%d, T=%d, C=%d, tp=%d):\n",
            d->sp ? "on" : "off", config_recompute_name(d->recompute), d->B, d->T, d->C, d->P);
    fprintf(f, "#   %-38s %-30s %14s %14s\n", "kept per layer for backward", "shape", "MiB per layer", "MiB");
    for (int k = 0; k < ACT_N_KINDS; k++) {
        if (k == ACT_N_LAYER) {
            fprintf(f, "#   %-38s %-30s %14.3f %14.3f\n", "= one layer", "", (double)mm->act_layer_bytes / MiB,
                    (double)mm->act_layer_bytes * d->L / MiB);
            fprintf(f, "#   once\n");
        }
        if (!mm->act[k]) continue; // dropped by recomputation, or absent with these options
        char per[32] = "";
        if (k < ACT_N_LAYER) snprintf(per, sizeof per, "%.3f", (double)mm->act[k] / (double)d->L / MiB);
        fprintf(f, "#     %-36s %-30s %14s %14.3f\n", model_act_kind_name((enum model_act_kind)k),
                act_kind_shape((enum model_act_kind)k, d), per, (double)mm->act[k] / MiB);
    }
    fprintf(f, "#   %-38s %-30s %14s %14.3f\n", "= activations", "", "", (double)mm->act_bytes / MiB);
}

static void *be_alloc(struct model *m, size_t bytes) {
    m->bytes_allocated += bytes;
    return m->be.iface->alloc(m->be.ctx, bytes);
}

void model_alloc(struct model *m, const struct model_dims *d, struct backend be, const struct comm *tp) {
    if (tp->size != d->P)
        tp_die(TP_EXIT_RUNTIME, "model_alloc: dims made for tp=%d, but the TP group has %d ranks", d->P, tp->size);
    memset(m, 0, sizeof *m);
    m->d = *d;
    m->be = be;
    m->tp = tp;
    m->tensors = model_param_table(d, &m->n_tensors, &m->n_params_local, &m->n_params_global);
    m->dtype = be.iface->dtype(be.ctx);
    size_t es = tp_dtype_size(m->dtype);
    bool split = model_masters_split(d, m->dtype);
    if (split) m->params_lo = be_alloc(m, m->n_params_local * sizeof(uint16_t));
    else m->params = be_alloc(m, m->n_params_local * sizeof(float));
    m->grads = be_alloc(m, m->n_params_local * sizeof(float));
    m->ln_grads = d->sp ? be_alloc(m, ln_grads_bytes(d)) : NULL;
    // fp32 computes on the master weights directly; bf16 keeps a rounded copy for the products.
    m->params_compute = m->dtype == TP_DTYPE_F32 ? (void *)m->params : be_alloc(m, m->n_params_local * es);
    m->p.layers = tp_calloc((size_t)d->L, sizeof(struct layer_params));
    m->g.layers = tp_calloc((size_t)d->L, sizeof(struct layer_params));
    carve_params(&m->p, m->params_compute, es, m->tensors, d->L);
    carve_params(&m->g, m->grads, sizeof(float), m->tensors, d->L);
    m->a.layers = tp_calloc((size_t)d->L, sizeof(struct layer_acts));
    m->act_memory = be_alloc(m, carve_acts(NULL, NULL, d, be, NULL));
    carve_acts(&m->a, m->act_memory, d, be, NULL);
    m->seq = (struct tp_sequence_parallel){.rows = m->a.rows, .drows = m->a.proj};
    m->inputs = be_alloc(m, d->N * sizeof(int));
    m->targets = be_alloc(m, d->N * sizeof(int));
}

void model_init_params(struct model *m, unsigned long long seed) { init_params(m, seed); }

void model_sync_compute_params(struct model *m) {
    if (m->params && m->params_compute != (void *)m->params)
        m->be.iface->to_compute(m->be.ctx, m->params_compute, m->params, m->n_params_local);
}

void model_create(struct model *m, const struct model_dims *d, struct backend be, const struct comm *tp,
                  unsigned long long seed) {
    model_alloc(m, d, be, tp);
    model_init_params(m, seed);
}

void model_destroy(struct model *m) {
    const struct backend_i *b = m->be.iface;
    if (!b) return;
    if (m->params_compute != (void *)m->params) b->free(m->be.ctx, m->params_compute);
    b->free(m->be.ctx, m->params);
    if (m->params_lo) b->free(m->be.ctx, m->params_lo);
    b->free(m->be.ctx, m->grads);
    if (m->ln_grads) b->free(m->be.ctx, m->ln_grads);
    if (m->step_graph.graph) b->graph_free(m->be.ctx, m->step_graph.graph);
    if (m->step_graph.loss) b->free(m->be.ctx, m->step_graph.loss);
    b->free(m->be.ctx, m->act_memory);
    b->free(m->be.ctx, m->inputs);
    b->free(m->be.ctx, m->targets);
    free(m->p.layers);
    free(m->g.layers);
    free(m->a.layers);
    free(m->tensors);
    memset(m, 0, sizeof *m);
}

void model_count_collectives(const struct model_dims *d, int *forward, int *backward) {
    int L = d->L, chunks = vocab_parallel_head_chunks((int)d->N, d->head_rows);
    if (!d->sp) {
        // embedding, g per block twice, cross-entropy max and sums per chunk of the fused head
        *forward = 1 + 2 * L + 2 * chunks;
        *backward = 2 * L + 1; // f per block twice, LM head's f
    } else {
        // embedding reduce-scatter; per block an all-gather in front of qkv and fc and a
        // reduce-scatter after proj and fc_proj; the LM head's all-gather of ln_f's rows;
        // cross-entropy's two per chunk
        *forward = 1 + 4 * L + 1 + 2 * chunks;
        // the LM head reduce-scatters its input gradient (its input is still gathered: the head
        // runs forward and backward together); per block each row-parallel layer all-gathers its
        // output gradient and each column-parallel one gathers its input again and
        // reduce-scatters its input gradient; the embedding gathers its output gradient
        *backward = 1 + 6 * L + 1;
    }
    // full recomputation reruns each block's forward up to fc before its backward: the
    // attention half's collectives, and fc's all-gather with sequence parallelism
    if (d->recompute == TP_RECOMPUTE_FULL) *backward += L * (d->sp ? 3 : 1);
}

// The layernorm that reads a block's output: the next block's first one (ln_1 or ln_2), or ln_f
// after the last block. Row-parallel layers compute it in the same pass as their residual.
static struct row_parallel_out residual_then_ln(void *out, const void *res, void *ln, float *mean, float *rstd,
                                                const void *w, const void *b) {
    return (struct row_parallel_out){.out = out, .res = res, .ln = ln, .mean = mean, .rstd = rstd,
                                     .ln_w = w, .ln_b = b};
}

// The fused LM head + loss over the micro-batch: ln_f's output (its S rows, which the head gathers
// with sequence parallelism) against this rank's wte rows, one chunk of head_rows of the N tokens
// at a time; with dln non-NULL also the gradients.
static struct vocab_parallel_head head_args(struct model *m, void *dln, float dloss) {
    const struct model_dims *d = &m->d;
    struct gpt2_acts *a = &m->a;
    return (struct vocab_parallel_head){
        .in = a->lnf, .w = m->p.wte, .targets = m->targets, .losses = a->losses, .din = dln,
        .dw = dln ? m->g.wte : NULL, .dloss = dloss, .logits = a->logits, .maxes = a->maxes,
        .local_maxes = a->local_maxes, .sums = a->sums, .N = (int)d->N, .C = d->C, .Vl = d->Vl, .V = d->V,
        .rows = d->head_rows,
    };
}

// The sequence-parallel layers' scratch, or NULL for plain TP.
static const struct tp_sequence_parallel *seq_parallel(const struct model *m) { return m->d.sp ? &m->seq : NULL; }

// ---- the step's blocks, in order (model_forward_backward is these in sequence)

static const void *block_input(const struct model *m, int l) {
    return l ? m->a.layers[l - 1].res3 : m->a.encoded; // (S, C)
}

void model_set_batch(struct model *m, const int *inputs, const int *targets) {
    const struct backend_i *b = m->be.iface;
    b->copy_to_device(m->be.ctx, m->inputs, inputs, m->d.N * sizeof(int));
    b->copy_to_device(m->be.ctx, m->targets, targets, m->d.N * sizeof(int));
}

// embeddings -> ln_1 of the first block
void model_embedding_fwd(struct model *m, struct comm *tp) {
    const struct model_dims *d = &m->d;
    struct layer_acts *la = &m->a.layers[0];
    const struct layer_params *p = &m->p.layers[0];
    vocab_parallel_embedding_fwd(m->be, tp, m->a.encoded, m->inputs, m->p.wte, m->p.wpe, d->B, d->T, d->C, d->Vl,
                                 seq_parallel(m));
    m->be.iface->layernorm_fwd(m->be.ctx, la->ln1, la->ln1_mean, la->ln1_rstd, m->a.encoded, p->ln1w, p->ln1b,
                               (int)d->S, d->C);
}

// (ln1, computed by the step before) -> f -> qkv (local heads) -> attention -> proj -> g -> +bias
// -> +x, fused with ln2
void model_block_attention_fwd(struct model *m, struct comm *tp, int l, const struct block_acts *a,
                               const struct block_attention *att) {
    const struct model_dims *d = &m->d;
    const struct layer_params *p = &m->p.layers[l];
    column_parallel_linear_fwd(m->be, tp, a->qkv, NULL, a->ln1, p->qkvw, p->qkvb, a->N, d->C, 3 * d->Cl, a->sp);
    att->fwd(att->arg, l, a->atty, a->qkv);
    struct row_parallel_out o = residual_then_ln(a->res2, a->res1, a->ln2, a->ln2_mean, a->ln2_rstd, p->ln2w,
                                                 p->ln2b);
    row_parallel_linear_fwd(m->be, tp, a->proj, a->atty, p->attprojw, p->attprojb, a->N, d->Cl, d->C, &o, a->sp);
}

void model_block_mlp_fwd(struct model *m, struct comm *tp, int l, const struct block_acts *a) {
    const struct model_dims *d = &m->d;
    const struct layer_params *p = &m->p.layers[l];
    bool last = l + 1 == d->L;
    struct row_parallel_out o = residual_then_ln(a->res3, a->res2, a->ln_next, a->next_mean, a->next_rstd,
                                                 last ? m->p.lnfw : m->p.layers[l + 1].ln1w,
                                                 last ? m->p.lnfb : m->p.layers[l + 1].ln1b);
    column_parallel_linear_fwd(m->be, tp, a->fch_gelu, a->fch, a->ln2, p->fcw, p->fcb, a->N, d->C, d->Fl, a->sp);
    row_parallel_linear_fwd(m->be, tp, a->proj, a->fch_gelu, p->fcprojw, p->fcprojb, a->N, d->Fl, d->C, &o, a->sp);
}

// Layer l's block activations for the whole micro-batch, in m->a.
static struct block_acts training_acts(struct model *m, int l) {
    struct layer_acts *la = &m->a.layers[l];
    struct block_acts a = {
        .N = (int)m->d.N, .sp = seq_parallel(m), .ln1 = la->ln1, .qkv = la->qkv, .atty = la->atty,
        .proj = m->a.proj, .res1 = block_input(m, l), .res2 = la->res2, .ln2 = la->ln2, .ln2_mean = la->ln2_mean,
        .ln2_rstd = la->ln2_rstd, .fch = la->fch, .fch_gelu = la->fch_gelu, .res3 = la->res3,
        .ln_next = m->a.lnf, .next_mean = m->a.lnf_mean, .next_rstd = m->a.lnf_rstd,
    };
    if (l + 1 < m->d.L) {
        struct layer_acts *nx = &m->a.layers[l + 1];
        a.ln_next = nx->ln1;
        a.next_mean = nx->ln1_mean;
        a.next_rstd = nx->ln1_rstd;
    }
    return a;
}

// Causal attention over the whole sequence, keeping what the backward needs.
static void attend_sequence(void *arg, int l, void *atty, const void *qkv) {
    struct model *m = arg;
    const struct model_dims *d = &m->d;
    m->be.iface->attention_fwd(m->be.ctx, atty, m->a.layers[l].att_saved, m->a.att_scratch, qkv, d->B, d->T,
                               d->NHl, d->HS);
}

void model_attention_block_fwd(struct model *m, struct comm *tp, int l) {
    struct block_acts a = training_acts(m, l);
    struct block_attention att = {attend_sequence, m};
    model_block_attention_fwd(m, tp, l, &a, &att);
}

// (ln2) -> f -> fc + gelu (fused) -> fc_proj -> g -> +bias -> +res2, fused with the next block's
// ln1 (ln_f after the last block)
void model_mlp_block_fwd(struct model *m, struct comm *tp, int l) {
    struct block_acts a = training_acts(m, l);
    model_block_mlp_fwd(m, tp, l, &a);
}

// (ln_f, computed by the last block) -> f -> LM head tied with wte (column-parallel over the
// vocabulary) -> cross-entropy, a chunk of token rows at a time; the loss only
void model_head_fwd(struct model *m, struct comm *tp, float *loss_sum) {
    struct vocab_parallel_head h = head_args(m, NULL, 0.0f);
    vocab_parallel_lm_head_cross_entropy(m->be, tp, &h, seq_parallel(m));
    if (loss_sum) m->be.iface->sum(m->be.ctx, loss_sum, m->a.losses, m->d.N);
}

// The same with each chunk's gradient taken while its logits are at hand; then ln_f's backward
// starts the residual gradient: a->dres becomes dL/d(output of the last block).
void model_head_fwd_bwd(struct model *m, struct comm *tp, float *loss_sum, float dloss) {
    const struct backend_i *b = m->be.iface;
    void *ctx = m->be.ctx;
    const struct model_dims *d = &m->d;
    struct gpt2_acts *a = &m->a;
    int C = d->C;
    struct vocab_parallel_head h = head_args(m, a->dln, dloss);
    vocab_parallel_lm_head_cross_entropy(m->be, tp, &h, seq_parallel(m));
    if (loss_sum) b->sum(ctx, loss_sum, a->losses, d->N);
    b->zero(ctx, a->dres, d->S * (size_t)C * tp_dtype_size(m->dtype));
    b->layernorm_bwd(ctx, a->dres, m->g.lnfw, m->g.lnfb, m->g.layers[d->L - 1].fcprojb, a->dln,
                     block_input(m, d->L), m->p.lnfw, a->lnf_mean, a->lnf_rstd, (int)d->S, C);
}

// ---- recomputation

// Full: layer l kept only its input; rebuild what its backward reads, in the order forward made
// it (the same ops on the same inputs, so the same bits): ln_1, the attention block (with ln_2),
// and fc with its GELU. fc_proj's output is the kept input of layer l + 1, so it is not redone.
static void recompute_block(struct model *m, struct comm *tp, int l) {
    const struct model_dims *d = &m->d;
    const struct layer_params *p = &m->p.layers[l];
    struct layer_acts *la = &m->a.layers[l];
    m->be.iface->layernorm_fwd(m->be.ctx, la->ln1, la->ln1_mean, la->ln1_rstd, block_input(m, l), p->ln1w, p->ln1b,
                               (int)d->S, d->C);
    model_attention_block_fwd(m, tp, l);
    column_parallel_linear_fwd(m->be, tp, la->fch_gelu, la->fch, la->ln2, p->fcw, p->fcb, (int)d->N, d->C, d->Fl,
                               seq_parallel(m));
}

// Selective, MLP half: the GELU output, from its kept input.
static void recompute_gelu(struct model *m, int l) {
    struct layer_acts *la = &m->a.layers[l];
    m->be.iface->gelu_fwd(m->be.ctx, la->fch_gelu, la->fch, m->d.N * (size_t)m->d.Fl);
}

// Selective, attention half: the attention core (output and what its backward reads), from the
// kept qkv.
static void recompute_attention(struct model *m, int l) {
    attend_sequence(m, l, m->a.layers[l].atty, m->a.layers[l].qkv);
}

// ---- backward blocks

// a->dres holds dL/d(res3) on entry; res3 = res2 + fcproj + bias, so it is also part of
// dL/d(res2), which it holds on exit. The layer's backward starts here, so with recomputation
// this is where its forward is rebuilt. fc_proj's bias gradient is already summed (by the
// layernorm backward that left dL/d(res3)); fc's is summed by fc_proj's input gradient, which is
// fc's output gradient; ln_2's backward sums the attention projection's.
void model_mlp_block_bwd(struct model *m, struct comm *tp, int l) {
    const struct backend_i *b = m->be.iface;
    const struct model_dims *d = &m->d;
    struct gpt2_acts *a = &m->a;
    struct layer_params *p = &m->p.layers[l], *g = &m->g.layers[l];
    struct layer_acts *la = &a->layers[l];
    int N = (int)d->N;
    if (d->recompute == TP_RECOMPUTE_FULL) recompute_block(m, tp, l);
    else if (d->recompute == TP_RECOMPUTE_SELECTIVE) recompute_gelu(m, l);
    const struct tp_sequence_parallel *sp = seq_parallel(m);
    row_parallel_linear_bwd(m->be, tp, a->dfch, g->fcb, g->fcprojw, NULL, a->dres, la->fch_gelu, p->fcprojw, la->fch,
                            N, d->Fl, d->C, sp);
    column_parallel_linear_bwd(m->be, tp, a->dln, g->fcw, NULL, a->dfch, la->ln2, p->fcw, N, d->C, d->Fl, sp);
    b->layernorm_bwd(m->be.ctx, a->dres, g->ln2w, g->ln2b, g->attprojb, a->dln, la->res2, p->ln2w, la->ln2_mean,
                     la->ln2_rstd, (int)d->S, d->C);
}

// a->dres holds dL/d(res2) on entry and dL/d(block input) on exit, which is the previous block's
// dL/d(res3): ln_1's backward sums it into that block's fc_proj bias gradient.
void model_attention_block_bwd(struct model *m, struct comm *tp, int l) {
    const struct backend_i *b = m->be.iface;
    const struct model_dims *d = &m->d;
    struct gpt2_acts *a = &m->a;
    struct layer_params *p = &m->p.layers[l], *g = &m->g.layers[l];
    struct layer_acts *la = &a->layers[l];
    int N = (int)d->N;
    if (d->recompute == TP_RECOMPUTE_SELECTIVE) recompute_attention(m, l);
    const struct tp_sequence_parallel *sp = seq_parallel(m);
    row_parallel_linear_bwd(m->be, tp, a->datty, NULL, g->attprojw, NULL, a->dres, la->atty, p->attprojw, NULL, N,
                            d->Cl, d->C, sp);
    b->attention_bwd(m->be.ctx, a->dqkv, g->qkvb, a->att_scratch, a->datty, la->qkv, la->atty, la->att_saved, d->B,
                     d->T, d->NHl, d->HS);
    column_parallel_linear_bwd(m->be, tp, a->dln, g->qkvw, NULL, a->dqkv, la->ln1, p->qkvw, N, d->C, 3 * d->Cl, sp);
    float *prev_fcprojb = l > 0 ? m->g.layers[l - 1].fcprojb : NULL;
    b->layernorm_bwd(m->be.ctx, a->dres, g->ln1w, g->ln1b, prev_fcprojb, a->dln, block_input(m, l), p->ln1w,
                     la->ln1_mean, la->ln1_rstd, (int)d->S, d->C);
}

// The embedding's forward all-reduce summed disjoint partial rows: its backward is the identity.
void model_embedding_bwd(struct model *m, struct comm *tp) {
    const struct model_dims *d = &m->d;
    vocab_parallel_embedding_bwd(m->be, tp, m->g.wte, m->g.wpe, m->a.dres, m->inputs, d->B, d->T, d->C, d->Vl,
                                 seq_parallel(m));
}

// ---- forward and backward

static void forward_blocks(struct model *m, struct comm *tp) {
    model_embedding_fwd(m, tp);
    for (int l = 0; l < m->d.L; l++) {
        model_attention_block_fwd(m, tp, l);
        model_mlp_block_fwd(m, tp, l);
    }
}

// Gradients from `first` (a gradient view: the first tensor of a block) to the end are final.
static void grads_final_from(struct model *m, const void *first) {
    if (m->grad_hook.ready) m->grad_hook.ready(m->grad_hook.arg, (size_t)((const float *)first - m->grads));
}

// After the head: each block's gradients are final once its backward is done (the DP reduction
// starts on them through m->grad_hook); wte (offset 0) waits for the embedding.
static void backward_blocks(struct model *m, struct comm *tp) {
    grads_final_from(m, m->g.lnfw);
    for (int l = m->d.L - 1; l >= 0; l--) {
        model_mlp_block_bwd(m, tp, l);
        grads_final_from(m, m->g.layers[l].ln2w);
        model_attention_block_bwd(m, tp, l);
        grads_final_from(m, m->g.layers[l].ln1w);
    }
    model_embedding_bwd(m, tp);
    grads_final_from(m, m->grads);
}

static void forward_backward_on_batch(struct model *m, struct comm *tp, float *loss_sum, float dloss) {
    forward_blocks(m, tp);
    model_head_fwd_bwd(m, tp, loss_sum, dloss);
    backward_blocks(m, tp);
}

// The step as one graph (struct model_step_graph) where the backend records graphs and the step
// needs nothing from the host between its ops: one rank in the TP group (no collectives) and no
// gradient hook (the DP reduction's buckets start from the host as backward goes).
#define MODEL_GRAPH_WARMUP 2 // steps run op by op first: they tune the products and size the scratch

void model_forward_backward(struct model *m, struct comm *tp, const int *inputs, const int *targets,
                            float *loss_sum, float dloss) {
    const struct backend_i *b = m->be.iface;
    struct model_step_graph *g = &m->step_graph;
    model_set_batch(m, inputs, targets);
    if (g->off || !b->graphs || !b->graphs(m->be.ctx) || tp->size != 1 || m->grad_hook.ready ||
        g->eager_calls < MODEL_GRAPH_WARMUP) {
        g->eager_calls++;
        forward_backward_on_batch(m, tp, loss_sum, dloss);
        return;
    }
    if (g->graph && g->dloss != dloss) { // recorded for another loss weight (a scalar it holds)
        b->graph_free(m->be.ctx, g->graph);
        g->graph = NULL;
    }
    if (!g->graph) {
        if (!g->loss) g->loss = be_alloc(m, sizeof(float));
        bool recording = b->graph_begin(m->be.ctx);
        if (recording) {
            forward_backward_on_batch(m, tp, g->loss, dloss);
            g->graph = b->graph_end(m->be.ctx);
        }
        if (!g->graph) { // it failed: nothing ran, so op by op
            fprintf(stderr, "tptrain: note: recording the step as a CUDA graph failed; it runs op by op\n");
            g->off = true;
            forward_backward_on_batch(m, tp, loss_sum, dloss);
            return;
        }
        g->dloss = dloss;
        fprintf(stderr, "tptrain: note: the step's forward and backward run as one CUDA graph "
                        "(TPTRAIN_STEP_GRAPH=1)\n");
    }
    b->graph_launch(m->be.ctx, g->graph);
    if (loss_sum) b->copy(m->be.ctx, loss_sum, g->loss, sizeof(float));
}

void model_forward(struct model *m, struct comm *tp, const int *inputs, const int *targets, float *loss_sum) {
    model_set_batch(m, inputs, targets);
    forward_blocks(m, tp);
    model_head_fwd(m, tp, loss_sum);
}

void model_backward(struct model *m, struct comm *tp, float dloss) {
    model_head_fwd_bwd(m, tp, NULL, dloss);
    backward_blocks(m, tp);
}

// Gradient i of those summed over this rank's rows (C floats each): per layer ln_1's weight and
// bias, ln_2's, the attention projection's bias and fc_proj's; then ln_f's weight and bias.
static float *sp_grad(struct model *m, int i) {
    if (i >= 6 * m->d.L) return i % 2 ? m->g.lnfb : m->g.lnfw;
    const struct layer_params *g = &m->g.layers[i / 6];
    float *per_layer[6] = {g->ln1w, g->ln1b, g->ln2w, g->ln2b, g->attprojb, g->fcprojb};
    return per_layer[i % 6];
}

void model_reduce_sequence_parallel_grads(struct model *m, struct comm *tp) {
    if (!m->d.sp) return;
    const struct backend_i *b = m->be.iface;
    size_t C = (size_t)m->d.C, bytes = C * sizeof(float);
    int n = sp_grad_count(&m->d);
    // packed, so that the group pays one all-reduce's latency instead of n
    for (int i = 0; i < n; i++) b->copy(m->be.ctx, m->ln_grads + (size_t)i * C, sp_grad(m, i), bytes);
    comm_all_reduce(tp, m->ln_grads, (size_t)n * C, COMM_SUM);
    for (int i = 0; i < n; i++) b->copy(m->be.ctx, sp_grad(m, i), m->ln_grads + (size_t)i * C, bytes);
}
