// optim.h: AdamW, the learning-rate schedule and gradient-norm clipping across the TP group.
//
// The update runs without a host round trip: the gradient norm is reduced on the device
// (optim_grad_norm_enqueue), AdamW reads it there to clip (optim_step), and the host reads the
// norm for its log afterwards (optim_grad_norm_read), at the step's one synchronisation point.
#pragma once

#include "comm.h"
#include "config.h"
#include "model.h"

struct optim {
    float *m, *v;   // (n_params_local) AdamW moments, fp32, same layout as the parameters
    float *acc;     // (2) backend scratch: sum of squares of sharded / replicated gradients
    struct param_segment *segs; // (n_segs) backend memory: one per parameter tensor
    int n_segs;
    int t;          // optimizer steps taken (bias correction)
};

// weight_decay: the config's decay for 2-D weights (biases and norms get none).
void optim_create(struct optim *o, struct model *m, double weight_decay);
void optim_destroy(struct optim *o, struct model *m);

// Learning rate for 0-based step `step`: linear warmup to lr over warmup_steps, then cosine or
// linear decay to min_lr at the last step, or constant.
double optim_lr(const struct tp_train_config *tc, int step);

// Queues the global squared L2 norm of all gradients into o->acc, in one pass: sharded tensors'
// squares are summed over the TP group, each replicated tensor is counted once (it is identical
// on every rank). Does not wait.
void optim_grad_norm_enqueue(struct optim *o, struct model *m, struct comm *tp);
// The norm queued last (waits for it).
float optim_grad_norm_read(struct optim *o, struct model *m, struct comm *tp);
// optim_grad_norm_enqueue + optim_grad_norm_read.
float optim_grad_norm(struct optim *o, struct model *m, struct comm *tp);

// Per-tensor gradient L2 norms of the global tensors (norms[i] for m->tensors[i]). Waits.
void optim_tensor_norms(struct optim *o, struct model *m, struct comm *tp, double *norms);

// One AdamW update of every parameter (one backend call), gradients clipped to tc->grad_clip
// using the norm last queued by optim_grad_norm_enqueue. Refreshes the compute-type weights.
void optim_step(struct optim *o, struct model *m, const struct tp_train_config *tc, float lr);
