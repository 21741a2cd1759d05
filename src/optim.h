// optim.h: AdamW, the learning-rate schedule and gradient-norm clipping across the TP group.
#pragma once

#include "comm.h"
#include "config.h"
#include "model.h"

struct optim {
    float *m, *v;   // (n_params_local) AdamW moments, fp32, same layout as the parameters
    float *acc;     // (2) backend scratch: sum of squares of sharded / replicated gradients
    int t;          // optimizer steps taken (bias correction)
};

void optim_create(struct optim *o, struct model *m);
void optim_destroy(struct optim *o, struct model *m);

// Learning rate for 0-based step `step`: linear warmup to lr over warmup_steps, then cosine or
// linear decay to min_lr at the last step, or constant.
double optim_lr(const struct tp_train_config *tc, int step);

// Global L2 norm of all gradients: sharded tensors' squares are summed over the TP group, each
// replicated tensor is counted once (it is identical on every rank). Waits for the result.
float optim_grad_norm(struct optim *o, struct model *m, struct comm *tp);

// Per-tensor gradient L2 norms of the global tensors (norms[i] for m->tensors[i]). Waits.
void optim_tensor_norms(struct optim *o, struct model *m, struct comm *tp, double *norms);

// Multiplier that brings the norm down to grad_clip (1 when clipping is off or not needed).
float optim_clip_scale(float norm, double grad_clip);

// One AdamW update of every parameter with gradients multiplied by grad_scale.
void optim_step(struct optim *o, struct model *m, const struct tp_train_config *tc, float lr, float grad_scale);
