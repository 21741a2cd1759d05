// optim.c: AdamW over the flat parameter buffer, LR schedule, distributed gradient norm.
#include "optim.h"

#include <math.h>
#include <stdlib.h>

#include "common.h"

void optim_create(struct optim *o, struct model *m, double weight_decay) {
    const struct backend_i *b = m->be.iface;
    size_t bytes = m->n_params_local * sizeof(float);
    o->m = b->alloc(m->be.ctx, bytes);
    o->v = b->alloc(m->be.ctx, bytes);
    o->acc = b->alloc(m->be.ctx, 2 * sizeof(float));
    o->n_segs = m->n_tensors;
    struct param_segment *host = tp_calloc((size_t)o->n_segs, sizeof *host);
    for (int i = 0; i < m->n_tensors; i++) {
        const struct param_tensor *t = &m->tensors[i];
        host[i] = (struct param_segment){
            .offset = t->offset,
            .numel = t->numel,
            .weight_decay = t->decay ? (float)weight_decay : 0.0f,
            .norm_group = t->spec.layout.kind == LAYOUT_SHARD ? 0 : 1,
        };
    }
    size_t seg_bytes = (size_t)o->n_segs * sizeof *host;
    o->segs = b->alloc(m->be.ctx, seg_bytes);
    b->copy_to_device(m->be.ctx, o->segs, host, seg_bytes);
    free(host);
    m->bytes_allocated += 2 * bytes + 2 * sizeof(float) + seg_bytes;
    o->t = 0;
}

void optim_destroy(struct optim *o, struct model *m) {
    const struct backend_i *b = m->be.iface;
    b->free(m->be.ctx, o->m);
    b->free(m->be.ctx, o->v);
    b->free(m->be.ctx, o->acc);
    b->free(m->be.ctx, o->segs);
}

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

void optim_grad_norm_enqueue(struct optim *o, struct model *m, struct comm *tp) {
    m->be.iface->segments_sumsq(m->be.ctx, o->acc, m->grads, o->segs, o->n_segs, m->n_params_local);
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
        b->sumsq_acc(m->be.ctx, o->acc, m->grads + t->offset, t->numel);
        if (t->spec.layout.kind == LAYOUT_SHARD) comm_all_reduce(tp, o->acc, 1, COMM_SUM);
        float h;
        b->copy_to_host(m->be.ctx, &h, o->acc, sizeof h);
        norms[i] = sqrt((double)h);
    }
}

void optim_step(struct optim *o, struct model *m, const struct tp_train_config *tc, float lr) {
    o->t++;
    struct adamw_step st = {
        .p = m->params,
        .p_compute = m->params_compute == (void *)m->params ? NULL : m->params_compute,
        .g = m->grads,
        .m = o->m,
        .v = o->v,
        .segs = o->segs,
        .n_segs = o->n_segs,
        .n = m->n_params_local,
        .lr = lr,
        .beta1 = (float)tc->beta1,
        .beta2 = (float)tc->beta2,
        .eps = (float)tc->eps,
        .grad_scale = 1.0f,
        .norm_sq = o->acc,
        .grad_clip = (float)tc->grad_clip,
        .t = o->t,
    };
    m->be.iface->adamw(m->be.ctx, &st);
}
