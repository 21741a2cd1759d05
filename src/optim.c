// optim.c: AdamW over the flat parameter buffer, LR schedule, distributed gradient norm; the DP
// gradient buckets and the distributed optimizer's slices (see optim.h).
#include "optim.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

// ---- bucket layout

int optim_bucket_layout(size_t n, int dp, double bucket_mb, struct optim_bucket *out) {
    size_t unit = (size_t)dp * OPTIM_ALIGN;
    size_t body = n / unit * unit; // the part that splits evenly over dp in aligned slices
    size_t per = body;             // 0 MiB: one bucket
    if (bucket_mb > 0) {
        double elems = bucket_mb * (1024.0 * 1024.0 / sizeof(float));
        per = elems >= (double)body ? body : tp_round_up((size_t)elems, unit);
    }
    size_t fewest = tp_round_up((body + OPTIM_MAX_BUCKETS - 1) / OPTIM_MAX_BUCKETS, unit);
    if (per < fewest) per = fewest;
    if (per == 0) per = unit;
    int k = 0;
    size_t state = 0;
    for (size_t off = 0; off < body; off += per, k++) {
        size_t len = body - off < per ? body - off : per;
        if (out) out[k] = (struct optim_bucket){.offset = off, .numel = len, .shard = len / (size_t)dp,
                                                .state_offset = state};
        state += len / (size_t)dp;
    }
    if (body < n) {
        if (out) out[k] = (struct optim_bucket){.offset = body, .numel = n - body, .shard = OPTIM_ALIGN,
                                                .state_offset = state, .tail = true};
        k++;
    }
    return k;
}

size_t optim_bucket_slice(const struct optim_bucket *b, int r, size_t *lo) {
    size_t start = b->offset + (size_t)r * b->shard, end = b->offset + b->numel;
    *lo = start;
    if (start >= end) return 0;
    return end - start < b->shard ? end - start : b->shard;
}

// Elements of the sharded state: every rank holds `shard` per bucket, the tail's padded.
static size_t state_elems(const struct optim_bucket *b, int n) {
    return n ? b[n - 1].state_offset + b[n - 1].shard : 0;
}

static bool shards_state(int dp, const struct tp_parallel_config *pc) { return dp > 1 && pc->distributed_optimizer; }

struct optim_memory optim_memory_plan(size_t n_params_local, enum tp_dtype dtype, int dp,
                                      const struct tp_parallel_config *pc) {
    struct optim_memory mm = {0};
    size_t n = n_params_local;
    if (shards_state(dp, pc)) {
        int nb = optim_bucket_layout(n_params_local, dp, pc->dp_bucket_mb, NULL);
        struct optim_bucket *b = tp_calloc((size_t)nb, sizeof *b);
        optim_bucket_layout(n_params_local, dp, pc->dp_bucket_mb, b);
        n = state_elems(b, nb);
        free(b);
        if (dtype != TP_DTYPE_F32) mm.released_param_bytes = n_params_local * sizeof(float);
    }
    size_t arrays = dtype != TP_DTYPE_F32 && shards_state(dp, pc) ? 3 : 2; // m, v (+ master)
    mm.state_bytes = arrays * n * sizeof(float);
    return mm;
}

// ---- create and destroy

static void *alloc_counted(struct model *m, size_t bytes) {
    m->bytes_allocated += bytes;
    return m->be.iface->alloc(m->be.ctx, bytes);
}

static struct param_segment segment_of(const struct param_tensor *t, size_t offset, size_t numel, double weight_decay) {
    return (struct param_segment){
        .offset = offset,
        .numel = numel,
        .weight_decay = t->decay ? (float)weight_decay : 0.0f,
        .norm_group = t->spec.layout.kind == LAYOUT_SHARD ? 0 : 1,
    };
}

static struct param_segment *device_table(struct model *m, const struct param_segment *host, int n) {
    size_t bytes = (size_t)(n ? n : 1) * sizeof *host;
    struct param_segment *d = alloc_counted(m, bytes);
    if (n) m->be.iface->copy_to_device(m->be.ctx, d, host, (size_t)n * sizeof *host);
    return d;
}

static void grads_ready(void *arg, size_t from);

// This rank's slices cut at tensor boundaries, bucket by bucket.
static void build_shard_segments(struct optim *o, struct model *m, double weight_decay) {
    int r = o->dp->rank, cap = m->n_tensors + o->n_buckets, n = 0;
    struct param_segment *rel = tp_calloc((size_t)cap, sizeof *rel);
    o->norm_segs_host = tp_calloc((size_t)cap, sizeof *o->norm_segs_host);
    o->seg_tensor = tp_calloc((size_t)cap, sizeof *o->seg_tensor);
    int t = 0; // the first tensor that ends after the slice starts (slices come in buffer order)
    for (int k = 0; k < o->n_buckets; k++) {
        struct optim_bucket *b = &o->buckets[k];
        size_t lo, len = optim_bucket_slice(b, r, &lo), hi = lo + len;
        b->seg_first = n;
        while (t < m->n_tensors && m->tensors[t].offset + m->tensors[t].numel <= lo) t++;
        for (int u = t; len && u < m->n_tensors && m->tensors[u].offset < hi; u++) {
            const struct param_tensor *pt = &m->tensors[u];
            size_t a = pt->offset > lo ? pt->offset : lo, e = pt->offset + pt->numel < hi ? pt->offset + pt->numel : hi;
            if (n == cap) tp_die(TP_EXIT_RUNTIME, "optim: more slice segments than tensors and buckets");
            o->norm_segs_host[n] = segment_of(pt, a, e - a, weight_decay);
            rel[n] = segment_of(pt, a - lo, e - a, weight_decay);
            o->seg_tensor[n++] = u;
        }
        b->seg_count = n - b->seg_first;
    }
    o->n_shard_segs = n;
    o->shard_segs = device_table(m, rel, n);
    o->norm_segs = device_table(m, o->norm_segs_host, n);
    free(rel);
}

void optim_create_dp(struct optim *o, struct model *m, double weight_decay, struct comm *dp,
                     const struct tp_parallel_config *pc) {
    memset(o, 0, sizeof *o);
    o->model = m;
    o->n_segs = m->n_tensors;
    struct param_segment *host = tp_calloc((size_t)o->n_segs, sizeof *host);
    for (int i = 0; i < m->n_tensors; i++)
        host[i] = segment_of(&m->tensors[i], m->tensors[i].offset, m->tensors[i].numel, weight_decay);
    o->segs = device_table(m, host, o->n_segs);
    free(host);
    o->acc = alloc_counted(m, 2 * sizeof(float));

    size_t n_moment = m->n_params_local;
    if (dp && dp->size > 1) {
        o->dp = dp;
        o->distributed = pc->distributed_optimizer;
        o->n_buckets = optim_bucket_layout(m->n_params_local, dp->size, pc->dp_bucket_mb, NULL);
        o->buckets = tp_calloc((size_t)o->n_buckets, sizeof *o->buckets);
        optim_bucket_layout(m->n_params_local, dp->size, pc->dp_bucket_mb, o->buckets);
        o->next = -1;
        m->grad_hook = (struct model_grad_hook){grads_ready, o};
    }
    if (o->distributed) {
        if (m->params_lo)
            tp_die(TP_EXIT_RUNTIME, "optim: the distributed optimizer keeps fp32 master slices; build the model "
                                    "without split masters");
        o->n_state = n_moment = state_elems(o->buckets, o->n_buckets);
        build_shard_segments(o, m, weight_decay);
        o->stage = alloc_counted(m, (size_t)dp->size * OPTIM_ALIGN * sizeof(float));
        if (m->dtype != TP_DTYPE_F32) o->master = alloc_counted(m, o->n_state * sizeof(float));
    }
    o->m = alloc_counted(m, n_moment * sizeof(float));
    o->v = alloc_counted(m, n_moment * sizeof(float));
}

void optim_create(struct optim *o, struct model *m, double weight_decay) {
    optim_create_dp(o, m, weight_decay, NULL, NULL);
}

void optim_destroy(struct optim *o, struct model *m) {
    const struct backend_i *b = m->be.iface;
    b->free(m->be.ctx, o->m);
    b->free(m->be.ctx, o->v);
    b->free(m->be.ctx, o->acc);
    b->free(m->be.ctx, o->segs);
    if (o->master) b->free(m->be.ctx, o->master);
    if (o->stage) b->free(m->be.ctx, o->stage);
    if (o->shard_segs) b->free(m->be.ctx, o->shard_segs);
    if (o->norm_segs) b->free(m->be.ctx, o->norm_segs);
    if (m->grad_hook.arg == o) m->grad_hook = (struct model_grad_hook){0};
    free(o->buckets);
    free(o->norm_segs_host);
    free(o->seg_tensor);
}

void optim_adopt_weights(struct optim *o, struct model *m) {
    if (!o->master || !m->params) return;
    const struct backend_i *b = m->be.iface;
    for (int k = 0; k < o->n_buckets; k++) {
        size_t lo, len = optim_bucket_slice(&o->buckets[k], o->dp->rank, &lo);
        if (len) b->copy(m->be.ctx, o->master + o->buckets[k].state_offset, m->params + lo, len * sizeof(float));
    }
    b->free(m->be.ctx, m->params); // the compute copy serves the model; the slices are the masters
    m->params = NULL;
    m->bytes_allocated -= m->n_params_local * sizeof(float);
}

// ---- schedule

double optim_lr(const struct tp_train_config *tc, int step) {
    if (step < tc->warmup_steps) return tc->lr * (double)(step + 1) / (double)tc->warmup_steps;
    int decay_steps = tc->steps - tc->warmup_steps;
    double p = (double)(step - tc->warmup_steps) / (double)(decay_steps > 1 ? decay_steps : 1);
    if (p > 1.0) p = 1.0;
    switch (tc->schedule) {
    case TP_SCHED_COSINE: return tc->min_lr + 0.5 * (tc->lr - tc->min_lr) * (1.0 + cos(M_PI * p));
    case TP_SCHED_LINEAR: return tc->lr - (tc->lr - tc->min_lr) * p;
    case TP_SCHED_CONSTANT: break;
    }
    return tc->lr;
}

// ---- the DP reduction
//
// Buckets start from the end of the buffer (the last layers, whose gradients backward finishes
// first). Plain DP averages each bucket in place; the distributed optimizer reduce-scatters it so
// that this rank's slice receives the average (Megatron's in-place form). The tail goes through
// o->stage, zero-padded to dp equal slices, and its slice is copied back once it has arrived.

static void start_bucket(struct optim *o, int k) {
    struct model *m = o->model;
    const struct backend_i *b = m->be.iface;
    const struct optim_bucket *bk = &o->buckets[k];
    float *g = m->grads + bk->offset; // (numel)
    if (!o->distributed) {
        comm_all_reduce_start(o->dp, g, bk->numel, COMM_F32, COMM_AVG);
        return;
    }
    int dp = o->dp->size, r = o->dp->rank;
    if (!bk->tail) {
        comm_reduce_scatter_start(o->dp, g + (size_t)r * bk->shard, g, bk->shard, COMM_F32, COMM_AVG);
        return;
    }
    float *st = o->stage; // (dp * shard)
    b->copy(m->be.ctx, st, g, bk->numel * sizeof(float));
    b->zero(m->be.ctx, st + bk->numel, ((size_t)dp * bk->shard - bk->numel) * sizeof(float));
    comm_reduce_scatter_start(o->dp, st + (size_t)r * bk->shard, st, bk->shard, COMM_F32, COMM_AVG);
}

static void grads_ready(void *arg, size_t from) {
    struct optim *o = arg;
    if (!o->armed) return;
    while (o->next >= 0 && o->buckets[o->next].offset >= from) start_bucket(o, o->next--);
}

void optim_reduce_begin(struct optim *o) {
    if (!o->dp) return;
    o->armed = true;
    o->next = o->n_buckets - 1;
}

// The tail's slice, from the stage into the flat buffer at elem_size bytes per element.
static void tail_copy_back(struct optim *o, void *buf, size_t elem_size, bool whole) {
    const struct optim_bucket *bk = &o->buckets[o->n_buckets - 1];
    if (!o->distributed || !bk->tail) return;
    struct model *m = o->model;
    size_t lo, len = optim_bucket_slice(bk, o->dp->rank, &lo);
    char *dst = (char *)buf + (whole ? bk->offset : lo) * elem_size;
    const char *src = (const char *)o->stage + (whole ? 0 : (size_t)o->dp->rank * bk->shard) * elem_size;
    size_t n = whole ? bk->numel : len;
    if (n) m->be.iface->copy(m->be.ctx, dst, src, n * elem_size);
}

void optim_reduce_end(struct optim *o) {
    if (!o->dp) return;
    if (!o->armed) o->next = o->n_buckets - 1; // no backward announced: every bucket is final
    while (o->next >= 0) start_bucket(o, o->next--);
    o->armed = false;
    comm_wait(o->dp);
    tail_copy_back(o, o->model->grads, sizeof(float), false);
}

// ---- gradient norm

void optim_grad_norm_enqueue(struct optim *o, struct model *m, struct comm *tp) {
    if (o->distributed) {
        m->be.iface->segments_sumsq(m->be.ctx, o->acc, m->grads, o->norm_segs, o->n_shard_segs, m->n_params_local);
        comm_all_reduce(o->dp, o->acc, 2, COMM_SUM); // each rank's slices
    } else {
        m->be.iface->segments_sumsq(m->be.ctx, o->acc, m->grads, o->segs, o->n_segs, m->n_params_local);
    }
    comm_all_reduce(tp, o->acc, 1, COMM_SUM); // sharded group only; replicas would count P times
}

float optim_grad_norm_read(struct optim *o, struct model *m, struct comm *tp) {
    comm_synchronize(tp);
    float h[2];
    m->be.iface->copy_to_host(m->be.ctx, h, o->acc, sizeof h);
    return sqrtf(h[0] + h[1]);
}

float optim_grad_norm(struct optim *o, struct model *m, struct comm *tp) {
    optim_grad_norm_enqueue(o, m, tp);
    return optim_grad_norm_read(o, m, tp);
}

void optim_tensor_norms(struct optim *o, struct model *m, struct comm *tp, double *norms) {
    const struct backend_i *b = m->be.iface;
    for (int i = 0; i < m->n_tensors; i++) {
        const struct param_tensor *t = &m->tensors[i];
        b->zero(m->be.ctx, o->acc, sizeof(float));
        if (o->distributed) {
            for (int k = 0; k < o->n_shard_segs; k++)
                if (o->seg_tensor[k] == i)
                    b->sumsq_acc(m->be.ctx, o->acc, m->grads + o->norm_segs_host[k].offset, o->norm_segs_host[k].numel);
            comm_all_reduce(o->dp, o->acc, 1, COMM_SUM);
        } else {
            b->sumsq_acc(m->be.ctx, o->acc, m->grads + t->offset, t->numel);
        }
        if (t->spec.layout.kind == LAYOUT_SHARD) comm_all_reduce(tp, o->acc, 1, COMM_SUM);
        float h;
        b->copy_to_host(m->be.ctx, &h, o->acc, sizeof h);
        norms[i] = sqrt((double)h);
    }
}

// ---- update

static struct adamw_step adamw_args(struct optim *o, const struct tp_train_config *tc, float lr) {
    return (struct adamw_step){
        .lr = lr,
        .beta1 = (float)tc->beta1,
        .beta2 = (float)tc->beta2,
        .eps = (float)tc->eps,
        .grad_scale = 1.0f,
        .norm_sq = o->acc,
        .grad_clip = (float)tc->grad_clip,
        .t = o->t,
    };
}

// Bucket k's weights from every DP rank's slice, into the compute-type weights (in fp32 the
// master weights themselves).
static void gather_bucket(struct optim *o, int k) {
    struct model *m = o->model;
    const struct optim_bucket *bk = &o->buckets[k];
    size_t es = tp_dtype_size(m->dtype);
    enum comm_dtype dt = m->dtype == TP_DTYPE_BF16 ? COMM_BF16 : COMM_F32;
    char *w = (char *)m->params_compute + bk->offset * es; // (numel) compute type
    size_t mine = (size_t)o->dp->rank * bk->shard * es;
    if (!bk->tail) {
        comm_all_gather_start(o->dp, w, w + mine, bk->shard, dt);
        return;
    }
    size_t lo, len = optim_bucket_slice(bk, o->dp->rank, &lo);
    char *st = o->stage;
    if (len) m->be.iface->copy(m->be.ctx, st + mine, (char *)m->params_compute + lo * es, len * es);
    comm_all_gather_start(o->dp, st, st + mine, bk->shard, dt);
}

// The distributed optimizer's update: AdamW on each of this rank's slices, each followed by the
// all-gather of its bucket, then the tail back from the stage.
static void step_slices(struct optim *o, struct model *m, const struct tp_train_config *tc, float lr) {
    size_t es = tp_dtype_size(m->dtype);
    for (int k = o->n_buckets - 1; k >= 0; k--) {
        const struct optim_bucket *bk = &o->buckets[k];
        size_t lo, len = optim_bucket_slice(bk, o->dp->rank, &lo);
        if (len) {
            struct adamw_step st = adamw_args(o, tc, lr);
            st.p = o->master ? o->master + bk->state_offset : m->params + lo;
            st.p_compute = o->master ? (char *)m->params_compute + lo * es : NULL;
            st.g = m->grads + lo;
            st.m = o->m + bk->state_offset;
            st.v = o->v + bk->state_offset;
            st.segs = o->shard_segs + bk->seg_first;
            st.n_segs = bk->seg_count;
            st.n = len;
            m->be.iface->adamw(m->be.ctx, &st);
        }
        gather_bucket(o, k);
    }
    comm_wait(o->dp);
    tail_copy_back(o, m->params_compute, es, true);
}

void optim_step(struct optim *o, struct model *m, const struct tp_train_config *tc, float lr) {
    o->t++;
    if (o->distributed) {
        step_slices(o, m, tc, lr);
        return;
    }
    struct adamw_step st = adamw_args(o, tc, lr);
    st.p = m->params;
    st.p_compute = m->params_compute == (void *)m->params ? NULL : m->params_compute;
    st.p_lo = m->params_lo; // split masters: p is NULL
    st.g = m->grads;
    st.m = o->m;
    st.v = o->v;
    st.segs = o->segs;
    st.n_segs = o->n_segs;
    st.n = m->n_params_local;
    m->be.iface->adamw(m->be.ctx, &st);
}

// ---- sharded state and checkpoints
//
// Tensor i covers [t->offset, t->offset + t->numel) of the flat buffers; rank q holds its
// intersection with q's slice of every bucket, at the slice's place in the state.

// Calls fn for each piece of tensor i in rank q's slices: element `at` of the tensor is element
// `state` of the state, for n elements.
static void for_each_piece(const struct optim *o, const struct param_tensor *t, int q,
                           void (*fn)(void *arg, size_t at, size_t state, size_t n), void *arg) {
    size_t a = t->offset, e = t->offset + t->numel;
    for (int k = 0; k < o->n_buckets; k++) {
        const struct optim_bucket *bk = &o->buckets[k];
        if (bk->offset >= e || bk->offset + bk->numel <= a) continue;
        size_t lo, len = optim_bucket_slice(bk, q, &lo), hi = lo + len;
        size_t x = a > lo ? a : lo, y = e < hi ? e : hi;
        if (x < y) fn(arg, x - a, bk->state_offset + (x - lo), y - x);
    }
}

static void count_piece(void *arg, size_t at, size_t state, size_t n) {
    (void)at, (void)state;
    *(size_t *)arg += n;
}

// Rank q's share of tensor i, in elements.
static size_t share_of(const struct optim *o, const struct param_tensor *t, int q) {
    size_t n = 0;
    for_each_piece(o, t, q, count_piece, &n);
    return n;
}

struct piece_io {
    const struct model *m;
    float *host;          // packed pieces (gather: send, and master_part) or the whole tensor
    const float *state;   // backend memory
    float *state_out;
    size_t used;          // packed elements so far
};

static void pack_piece(void *arg, size_t at, size_t state, size_t n) {
    struct piece_io *p = arg;
    (void)at;
    p->m->be.iface->copy_to_host(p->m->be.ctx, p->host + p->used, p->state + state, n * sizeof(float));
    p->used += n;
}

static void unpack_piece(void *arg, size_t at, size_t state, size_t n) {
    struct piece_io *p = arg;
    (void)state;
    memcpy(p->host + at, p->state + p->used, n * sizeof(float)); // state: the received packed pieces
    p->used += n;
}

static void scatter_piece(void *arg, size_t at, size_t state, size_t n) {
    struct piece_io *p = arg;
    p->m->be.iface->copy_to_device(p->m->be.ctx, p->state_out + state, p->host + at, n * sizeof(float));
}

void optim_gather_tensor(const struct optim *o, const struct model *m, const float *state, int i, float *dst) {
    const struct param_tensor *t = &m->tensors[i];
    int dp = o->dp->size, r = o->dp->rank;
    size_t most = 0; // every rank's share is known everywhere: gather the largest from each
    for (int q = 0; q < dp; q++) {
        size_t s = share_of(o, t, q);
        if (s > most) most = s;
    }
    if (most > (size_t)INT32_MAX) tp_die(TP_EXIT_RUNTIME, "tensor %s: slice too large to gather", t->name);
    float *mine = tp_calloc(most ? most : 1, sizeof(float));
    struct piece_io p = {.m = m, .host = mine, .state = state};
    for_each_piece(o, t, r, pack_piece, &p);
    float *all = r == 0 ? tp_malloc((most ? most : 1) * (size_t)dp * sizeof(float)) : NULL; // (dp, most)
    comm_host_gather(o->dp, all, mine, most, COMM_F32, 0);
    if (r == 0)
        for (int q = 0; q < dp; q++) {
            struct piece_io u = {.m = m, .host = dst, .state = all + (size_t)q * most};
            for_each_piece(o, t, q, unpack_piece, &u);
        }
    free(all);
    free(mine);
}

void optim_scatter_tensor(const struct optim *o, const struct model *m, const float *src, int i, float *state) {
    struct piece_io p = {.m = m, .host = (float *)src, .state_out = state};
    for_each_piece(o, &m->tensors[i], o->dp->rank, scatter_piece, &p);
}

size_t optim_master_part(const struct optim *o, const struct model *m, int i, float *dst) {
    struct piece_io p = {.m = m, .host = dst, .state = o->master};
    for_each_piece(o, &m->tensors[i], o->dp->rank, pack_piece, &p);
    return p.used;
}
