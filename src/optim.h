// optim.h: AdamW, the learning-rate schedule, gradient-norm clipping across the TP group, and the
// data-parallel half of the step: gradients reduced over the DP group in buckets while backward
// runs, and optionally the distributed optimizer (ZeRO stage 1), which shards AdamW over DP.
//
// The update runs without a host round trip: the gradient norm is reduced on the device
// (optim_grad_norm_enqueue), AdamW reads it there to clip (optim_step), and the host reads the
// norm for its log afterwards (optim_grad_norm_read), at the step's one synchronisation point.
//
// DP (dp > 1). The flat gradient buffer is cut into buckets of parallel.dp_bucket_mb. Backward
// finishes the layers in reverse order and tells the model's grad hook how far it got; during the
// step's last micro-step each bucket's collective starts as soon as its gradients are final
// (NCCL: on the DP comm's own stream, overlapping the rest of backward) and optim_reduce_end
// waits for them. Plain DP all-reduces (averages) every bucket.
//
// The distributed optimizer (parallel.distributed_optimizer) reduce-scatters the buckets
// instead: DP rank r owns the r-th contiguous 1/dp slice of every bucket (with one bucket, of the
// whole buffer) and keeps AdamW's moments, and in bf16 the fp32 master weights, for its slices
// only. It clips with the exact global norm (its slices' squares summed over DP, and over TP for
// TP-sharded tensors), updates its slices, and all-gathers the new weights into every rank's
// buffer (the compute copy in bf16). Slices start on OPTIM_ALIGN-element boundaries: every bucket
// but the last holds a multiple of dp * OPTIM_ALIGN elements, and the remainder (the tail, fewer
// than dp * OPTIM_ALIGN) is reduced through a small zero-padded copy.
#pragma once

#include <stdbool.h>

#include "comm.h"
#include "config.h"
#include "model.h"

#define OPTIM_ALIGN 64      // elements: bucket and slice starts (256 bytes of fp32)
#define OPTIM_MAX_BUCKETS 4096 // smaller dp_bucket_mb values are raised to keep to this many

// A range of the flat buffers reduced over DP by one collective.
struct optim_bucket {
    size_t offset, numel;     // [offset, offset + numel) of the flat buffers
    size_t shard;             // elements per DP rank's slice: numel / dp (the tail: OPTIM_ALIGN)
    size_t state_offset;      // where this bucket's slice starts in the sharded state
    bool tail;                // numel is not a multiple of dp * OPTIM_ALIGN: reduced through o->stage
    int seg_first, seg_count; // this rank's slice in the shard segment tables
};

struct optim {
    float *m, *v;   // AdamW moments, fp32: (n_params_local), laid out like the parameters, or
                    // (n_state) this rank's slices, bucket by bucket, with the distributed optimizer
    float *master;  // (n_state) fp32 master slices in bf16 under the distributed optimizer, else
                    // NULL (the master weights are the model's params)
    float *acc;     // (2) backend scratch: sum of squares of sharded / replicated gradients
    struct param_segment *segs; // (n_segs) backend memory: one per parameter tensor
    int n_segs;
    int t;          // optimizer steps taken (bias correction)

    // ---- DP (all empty at dp = 1)
    struct model *model;
    struct comm *dp;              // the DP group; NULL when there is none to reduce over
    bool distributed;             // the state is sharded over dp
    struct optim_bucket *buckets; // (n_buckets) host, in buffer order
    int n_buckets;
    size_t n_state;               // elements of this rank's slices (the tail's padded)
    // this rank's slices cut at tensor boundaries (n_shard_segs): shard_segs are backend memory
    // with offsets from each slice's start (AdamW, one call per bucket), norm_segs the same at
    // buffer offsets (the gradient norm, one call); the host keeps norm_segs and each one's tensor
    struct param_segment *shard_segs, *norm_segs, *norm_segs_host;
    int *seg_tensor;
    int n_shard_segs;
    void *stage;                  // (dp * OPTIM_ALIGN) fp32 backend memory: the tail, zero-padded
    int next;                     // the next bucket to start: the last first
    bool armed;                   // the running backward is the step's last
};

// weight_decay: the config's decay for 2-D weights (biases and norms get none).
void optim_create(struct optim *o, struct model *m, double weight_decay);
// With the DP group: dp (its comm, kept) and pc (distributed_optimizer, dp_bucket_mb). A group of
// one makes it optim_create. Sets the model's grad hook.
void optim_create_dp(struct optim *o, struct model *m, double weight_decay, struct comm *dp,
                     const struct tp_parallel_config *pc);
void optim_destroy(struct optim *o, struct model *m);

// Once the weights are in m->params (initialised or loaded) and before the first step: the
// distributed optimizer in bf16 copies its master slices and releases m->params. Otherwise nothing.
void optim_adopt_weights(struct optim *o, struct model *m);

// Buckets for a flat buffer of n floats over dp ranks, about bucket_mb MiB of fp32 each (0: one
// bucket), in buffer order, into out (NULL: only count). Returns the count. Every rank of a DP
// group computes the same layout; rank r's slice of bucket b is [b.offset + r * b.shard,
// min(b.offset + (r + 1) * b.shard, b.offset + b.numel)).
int optim_bucket_layout(size_t n, int dp, double bucket_mb, struct optim_bucket *out);
// Rank r's slice of b: its length (0 when the tail is too short to reach it), its start in *lo.
size_t optim_bucket_slice(const struct optim_bucket *b, int r, size_t *lo);

// What the optimizer holds per rank, from the plan alone (for --dry-run's memory plan):
struct optim_memory {
    size_t state_bytes;         // AdamW moments, plus the fp32 master slices when it shards them
    size_t released_param_bytes; // the model's fp32 params it releases (bf16, distributed)
};
struct optim_memory optim_memory_plan(size_t n_params_local, enum tp_dtype dtype, int dp,
                                      const struct tp_parallel_config *pc);

// Learning rate for 0-based step `step`: linear warmup to lr over warmup_steps, then cosine or
// linear decay to min_lr at the last step, or constant.
double optim_lr(const struct tp_train_config *tc, int step);

// ---- the DP reduction of one step
// Call before the step's last backward: from then on the model's grad hook starts each bucket as
// soon as its gradients are final.
void optim_reduce_begin(struct optim *o);
// After that backward: starts the buckets not started yet and orders the backend's later work
// after all of them (NCCL: no host wait). Gradients are then averaged over DP: all of them, or
// under the distributed optimizer this rank's slices.
void optim_reduce_end(struct optim *o);

// Queues the global squared L2 norm of all gradients into o->acc, in one pass: sharded tensors'
// squares are summed over the TP group, each replicated tensor is counted once (it is identical
// on every rank); under the distributed optimizer each rank adds its slices and the DP group sums
// them. Does not wait.
void optim_grad_norm_enqueue(struct optim *o, struct model *m, struct comm *tp);
// The norm queued last (waits for it).
float optim_grad_norm_read(struct optim *o, struct model *m, struct comm *tp);
// optim_grad_norm_enqueue + optim_grad_norm_read.
float optim_grad_norm(struct optim *o, struct model *m, struct comm *tp);

// Per-tensor gradient L2 norms of the global tensors (norms[i] for m->tensors[i]). Waits.
void optim_tensor_norms(struct optim *o, struct model *m, struct comm *tp, double *norms);

// One AdamW update of every parameter, gradients clipped to tc->grad_clip using the norm last
// queued by optim_grad_norm_enqueue. Refreshes the compute-type weights; under the distributed
// optimizer each rank updates its slices and all-gathers the weights over DP.
void optim_step(struct optim *o, struct model *m, const struct tp_train_config *tc, float lr);

// ---- sharded state and checkpoints (the distributed optimizer)
// Collective over the DP group: the TP-local tensor i (t->numel floats) of a sharded state buffer
// (o->m, o->v or o->master) into host dst on DP rank 0 (dst unused elsewhere).
void optim_gather_tensor(const struct optim *o, const struct model *m, const float *state, int i, float *dst);
// Local: this rank's slices of TP-local tensor i from host src (t->numel floats) into a sharded
// state buffer.
void optim_scatter_tensor(const struct optim *o, const struct model *m, const float *src, int i, float *state);
// Local: the values of tensor i that this rank's master slices hold, into host dst (at most
// t->numel floats); returns their count. The same elements on every TP rank of a DP rank.
size_t optim_master_part(const struct optim *o, const struct model *m, int i, float *dst);
