// optim.c: AdamW over the flat parameter buffer, LR schedule, distributed gradient norm.
#include "optim.h"

#include <math.h>

void optim_create(struct optim *o, struct model *m) {
    const struct backend_i *b = m->be.iface;
    size_t bytes = m->n_params_local * sizeof(float);
    o->m = b->alloc(m->be.ctx, bytes);
    o->v = b->alloc(m->be.ctx, bytes);
    o->acc = b->alloc(m->be.ctx, 2 * sizeof(float));
    m->bytes_allocated += 2 * bytes + 2 * sizeof(float);
    o->t = 0;
}

void optim_destroy(struct optim *o, struct model *m) {
    const struct backend_i *b = m->be.iface;
    b->free(m->be.ctx, o->m);
    b->free(m->be.ctx, o->v);
    b->free(m->be.ctx, o->acc);
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

float optim_grad_norm(struct optim *o, struct model *m, struct comm *tp) {
    const struct backend_i *b = m->be.iface;
    b->zero(m->be.ctx, o->acc, 2 * sizeof(float));
    for (int i = 0; i < m->n_tensors; i++) {
        const struct param_tensor *t = &m->tensors[i];
        bool sharded = t->spec.layout.kind == LAYOUT_SHARD;
        b->sumsq_acc(m->be.ctx, o->acc + (sharded ? 0 : 1), m->grads + t->offset, t->numel);
    }
    comm_all_reduce(tp, o->acc, 1, COMM_SUM); // sharded part only; replicas would count P times
    comm_synchronize(tp);
    float h[2];
    b->copy_to_host(m->be.ctx, h, o->acc, sizeof h);
    return sqrtf(h[0] + h[1]);
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

float optim_clip_scale(float norm, double grad_clip) {
    if (grad_clip > 0.0 && norm > grad_clip) return (float)(grad_clip / norm);
    return 1.0f;
}

void optim_step(struct optim *o, struct model *m, const struct tp_train_config *tc, float lr, float grad_scale) {
    const struct backend_i *b = m->be.iface;
    o->t++;
    for (int i = 0; i < m->n_tensors; i++) {
        const struct param_tensor *t = &m->tensors[i];
        float wd = t->decay ? (float)tc->weight_decay : 0.0f;
        b->adamw(m->be.ctx, m->params + t->offset, m->grads + t->offset, o->m + t->offset, o->v + t->offset,
                 t->numel, lr, (float)tc->beta1, (float)tc->beta2, (float)tc->eps, wd, grad_scale, o->t);
    }
}
