// model.h: GPT-2 with Megatron tensor parallelism over the TP group.
//
// Parameter plan (P = tp size; see ARCHITECTURE.md):
//   wte             (Vp, C)     Shard(0)   vocab-parallel embedding, tied with the LM head
//   wpe             (T, C)      Replicate
//   ln_1/ln_2/ln_f  (C)         Replicate
//   attn.c_attn     (3, C, C)   Shard(1)   column-parallel by head: q, k, v rows of this rank's heads
//   attn.c_attn.bias (3, C)     Shard(1)
//   attn.c_proj     (C, C)      Shard(1)   row-parallel (input dim = this rank's heads)
//   mlp.c_fc        (4C, C)     Shard(0)   column-parallel, bias (4C) Shard(0)
//   mlp.c_proj      (C, 4C)     Shard(1)   row-parallel
//   row-parallel biases (C)     Replicate, added once after the all-reduce
// Weights are stored (out, in); checkpoints transpose to Hugging Face's Conv1D (in, out).
//
// Options (struct model_options): sequence parallelism keeps the layernorm, residual and
// embedding activations as this rank's S = N/P token rows (tp.h's layout) instead of all N;
// recomputation keeps fewer activations per layer and rebuilds the rest in backward
// (docs/memory.md has what each keeps, in bytes).
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>

#include "backend.h"
#include "comm.h"
#include "config.h"
#include "layout.h"
#include "tp.h"

enum param_init { PARAM_INIT_NORMAL = 0, PARAM_INIT_NORMAL_RESID, PARAM_INIT_ZEROS, PARAM_INIT_ONES };

struct param_tensor {
    char name[64];             // Hugging Face GPT-2 name, e.g. "h.3.attn.c_attn.weight"
    struct dtensor_spec spec;  // global shape (wte padded to Vp) and placement on the TP group
    size_t real_rows;          // rows that exist in checkpoints (wte: V; others: global_shape[0])
    bool transpose_hf;         // a 2-D Linear weight: HF stores it as (in, out)
    bool decay;                // AdamW weight decay applies (2-D weights only)
    enum param_init init;
    size_t offset;             // into the flat local buffers, in floats
    size_t numel;              // local elements
};

// Parameter views. In m->p they point into the compute-type copy (void *: fp32 or bf16, the
// backend's dtype); in m->g into the fp32 gradients.
struct layer_params {
    void *ln1w, *ln1b;          // (C), (C)
    void *qkvw, *qkvb;          // (3*Cl, C), (3*Cl)  Cl = C/P, this rank's heads
    void *attprojw, *attprojb;  // (C, Cl), (C)
    void *ln2w, *ln2b;          // (C), (C)
    void *fcw, *fcb;            // (Fl, C), (Fl)       Fl = 4C/P
    void *fcprojw, *fcprojb;    // (C, Fl), (C)
};

struct gpt2_params {
    void *wte;                  // (Vl, C)  Vl = Vp/P rows of the padded vocabulary
    void *wpe;                  // (T, C)
    struct layer_params *layers; // (L)
    void *lnfw, *lnfb;          // (C), (C)
};

// Activations: void * in the compute type, float * always fp32. S rows: the N token rows, or
// this rank's N/P of them with sequence parallelism. With recomputation the buffers a layer does
// not keep are one work set shared by all layers (layer 0's), rebuilt in backward.
struct layer_acts {
    void *ln1;                        // (S, C)                 full: shared
    float *ln1_mean, *ln1_rstd;       // (S), (S)               full: shared
    void *qkv;                        // (N, 3*Cl)              full: shared
    void *atty;                       // (N, Cl)                selective, full: shared
    float *att_saved;                 // attention_saved_floats selective, full: shared
    void *res2;                       // (S, C) residual after attention         full: shared
    void *ln2;                        // (S, C)                 full: shared
    float *ln2_mean, *ln2_rstd;       // (S), (S)               full: shared
    void *fch;                        // (N, Fl) before GELU    full: shared
    void *fch_gelu;                   // (N, Fl) after GELU     selective, full: shared
    void *res3;                       // (S, C) residual after the MLP = next layer's input, always kept
};

struct gpt2_acts {
    void *encoded;                    // (S, C) embeddings
    struct layer_acts *layers;        // (L)
    void *proj;                       // (N, C) row-parallel partial output, reduced in place; with
                                      //   sequence parallelism also a column-parallel input gradient
    void *rows;                       // (N, C) sequence-parallel scratch (tp_sequence_parallel.rows); NULL without
    void *lnf;                        // (S, C)
    float *lnf_mean, *lnf_rstd;       // (S), (S)
    void *logits;                     // (head_rows, Vl) one chunk of the fused LM head's logits
                                      // (this rank's vocab columns); its dlogits in place
    float *maxes, *sums;              // (head_rows), (2, head_rows) the chunk's statistics
    float *local_maxes;               // (head_rows) this rank's maxes before the all-reduce
    float *losses;                    // (N) per-token loss
    void *dres;                       // (S, C) gradient of the residual stream
    void *dln;                        // (S, C) gradient into a layernorm output
    void *dqkv;                       // (N, 3*Cl)
    void *datty;                      // (N, Cl)
    void *dfch;                       // (N, Fl) gradient into the MLP's pre-GELU (GELU fused)
    float *att_scratch;               // backend-defined, attention_scratch_floats
};

// Sizes that follow from the config and the TP size; computed identically for --dry-run. They
// are the same on every rank of a TP group: where a rank's place matters (its vocabulary rows,
// its shard of a weight) it comes from the TP comm.
struct model_dims {
    int L, C, NH, HS, T, B, V;  // global model shape, micro-batch B
    int P;                      // the TP size the local sizes below are for (the TP comm's size)
    int Vp, Vl;                 // padded vocab, rows per rank
    int NHl, Cl, Fl;            // local heads, local attention width, local MLP width
    size_t N;                   // B*T
    int head_rows;              // token rows per chunk of the fused LM head + loss (see model_head_rows);
                                // with sp the chunks run over all N rows, gathered
    bool sp;                    // sequence parallelism
    enum tp_recompute recompute;
    bool split_master;          // in bf16, the masters as the bf16 copy plus low halves (below)
    size_t S;                   // token rows of the residual stream on each rank: N/P with sp, else N
};

// The choices that shape memory: parallel.sequence_parallel and train.recompute (activations);
// split_master (bf16 only): the fp32 master weights kept as the bf16 compute copy plus the 16 low
// bits of each (backend.h's tp_split_*), 4 bytes per parameter instead of 6, so that a bf16 run
// holds 16 bytes per parameter with its gradients and AdamW moments, as PyTorch's AMP does.
// Training splits them unless the distributed optimizer is asked for (it keeps fp32 slices).
struct model_options {
    bool sequence_parallel;
    enum tp_recompute recompute;
    bool split_master;
};

static inline struct model_options model_options_of(const struct tp_config *cfg) {
    return (struct model_options){cfg->parallel.sequence_parallel, cfg->train.recompute,
                                  !cfg->parallel.distributed_optimizer};
}

// Whether a model of these dims on a backend of compute type dt keeps its masters split: only bf16
// has a compute copy to be the high halves. The allocation, the memory plan and the benchmark's
// byte counts all ask this.
static inline bool model_masters_split(const struct model_dims *d, enum tp_dtype dt) {
    return d->split_master && dt == TP_DTYPE_BF16;
}

// Activation buffers by kind (model_memory_plan). The first ACT_N_LAYER kinds are what each
// layer keeps from its forward for its backward (the same for every layer); the rest exist once.
enum model_act_kind {
    ACT_LN1,          // ln_1 output and its statistics
    ACT_QKV,          // qkv
    ACT_ATTN_OUT,     // attention output (proj's input)
    ACT_ATTN_SAVED,   // what attention keeps for its backward (softmax statistics or probabilities)
    ACT_RES_ATTN,     // residual after attention (ln_2's input)
    ACT_LN2,          // ln_2 output and its statistics
    ACT_FC_PRE,       // fc output before the GELU
    ACT_FC_GELU,      // GELU output (fc_proj's input)
    ACT_BLOCK_OUT,    // block output (the next block's input)
    ACT_N_LAYER,
    ACT_EMBED = ACT_N_LAYER, // embedding output (the first block's input)
    ACT_WORK,         // recomputation's work set: one layer's worth of what layers do not keep
    ACT_HEAD,         // ln_f, the fused head's one chunk of logits and its statistics, the losses
    ACT_BACKWARD,     // the backward's gradient buffers
    ACT_SCRATCH,      // row-parallel partial sums, gathered rows, attention scratch
    ACT_N_KINDS
};

struct model_memory {
    size_t param_floats;        // local parameters (= gradients = each AdamW moment)
    size_t param_bytes;         // fp32 master weights (split: their low halves, 2 bytes each)
    size_t grad_bytes;          // fp32 gradients (and, with sequence parallelism, the layernorm ones'
                                // all-reduce staging)
    size_t optim_bytes;         // AdamW's two fp32 moments
    size_t param_compute_bytes; // the compute-type copy of the parameters (0 in fp32: shared)
    bool split_master;          // param_bytes are the masters' low halves, the copy their high ones
    size_t act[ACT_N_KINDS];    // activation bytes by kind; per-layer kinds summed over the layers
    size_t act_layer_bytes;     // what one layer keeps (the per-layer kinds of act, divided by L)
    size_t act_bytes;           // activations, all layers, plus backward buffers (sum of act)
    size_t token_bytes;         // input and target ids
    size_t total_bytes;         // params + grads + m + v + compute copy + activations + tokens
};

// Called by model_backward as the layers finish, in reverse order: grads[from, n_params_local)
// has all of this backward's contributions (the buffer holds the blocks in forward order, so
// what is final is a suffix). The DP reduction starts its buckets from it. Optional: ready NULL.
struct model_grad_hook {
    void (*ready)(void *arg, size_t from);
    void *arg;
};

struct model {
    struct model_dims d;
    struct backend be;
    const struct comm *tp;        // the TP group the weights are sharded over: this rank's place in it
    struct param_tensor *tensors; // (n_tensors) in buffer order
    int n_tensors;
    size_t n_params_local;        // floats in each flat buffer
    size_t n_params_global;       // real parameters counted once (tied wte once, no padding)
    enum tp_dtype dtype;          // the backend's compute type
    float *params, *grads;        // (n_params_local) backend memory: fp32 master weights, gradients;
                                  // params is NULL in bf16 under the distributed optimizer, which
                                  // keeps the master weights sharded (optim.h), and with split
                                  // masters; read and write them through model_master_*_host
    uint16_t *params_lo;          // (n_params_local) split masters' low halves (the high halves are
                                  //   params_compute), or NULL
    float *ln_grads;              // (6L+2, C) with sequence parallelism the gradients summed over this
                                  //   rank's rows (layernorms', row-parallel biases') packed for their
                                  //   all-reduce; NULL without
    void *params_compute;         // (n_params_local) compute-type weights; == params in fp32
    struct gpt2_params p, g;      // views into params_compute / grads
    void *act_memory;             // one allocation for all activations
    struct gpt2_acts a;
    struct tp_sequence_parallel seq; // the parallel layers' scratch with sequence parallelism
    int *inputs, *targets;        // (N) backend memory
    size_t bytes_allocated;       // everything this model allocated on the backend
    struct model_grad_hook grad_hook;
    // model_forward_backward's ops recorded once as a backend graph and launched as one from then on
    // (TPTRAIN_STEP_GRAPH=1 on CUDA; see there for when)
    struct model_step_graph {
        void *graph;     // NULL until recorded
        float dloss;     // the loss weight it holds
        float *loss;     // (1) backend memory: its loss sum, copied to the caller's each step
        int eager_calls; // steps run op by op so far
        bool off;        // recording failed: op by op from now on
    } step_graph;
};

// Derives dims for a TP group of tp_size ranks (a run passes its TP comm's size; --dry-run the
// configured one). The config must already be validated (with sequence parallelism P divides T).
struct model_dims model_dims_make(const struct tp_model_config *mc, int micro_batch, int tp_size,
                                  struct model_options opt);

// The LM head and the loss run fused, a chunk of token rows at a time, so that only one chunk's
// logits (rows, Vl) are ever held: at most MODEL_HEAD_LOGITS_MAX elements (256 MiB in bf16, 512
// MiB in fp32). Chunks are equal where a divisor of N allows (one product shape), else all but the
// last. A run with fewer logits than that holds them all: one chunk, the unchunked arithmetic.
// (A build may set another budget, e.g. -DMODEL_HEAD_LOGITS_MAX=2097152 to chunk tiny models.)
#ifndef MODEL_HEAD_LOGITS_MAX
#define MODEL_HEAD_LOGITS_MAX ((size_t)1 << 27)
#endif
int model_head_rows(size_t N, int Vl);

// Parameter table for the given dims (n_tensors written to *count; caller frees).
struct param_tensor *model_param_table(const struct model_dims *d, int *count, size_t *n_local,
                                       size_t *n_global);

// Memory the run allocates on the backend per rank, from the same plan model_create uses.
struct model_memory model_memory_plan(const struct model_dims *d, struct backend be);
const char *model_act_kind_name(enum model_act_kind k);
// The plan as --dry-run prints it: a summary line ("# memory per rank (WHAT): ..."), then the
// activations by kind, per layer and in all.
void model_memory_print(FILE *f, const struct model_dims *d, const struct model_memory *mm, const char *what);

// Allocates parameters (zero), gradients and activations on be, for weights loaded afterwards.
// tp: the TP group (d->P ranks) whose shards this rank holds; it must outlive the model.
void model_alloc(struct model *m, const struct model_dims *d, struct backend be, const struct comm *tp);
// Initialises the weights TP-invariantly: every element is a pure function of seed, tensor name
// and global index, and each rank generates only its shard.
void model_init_params(struct model *m, unsigned long long seed);
// Refreshes params_compute from the fp32 master weights (after init, a checkpoint load, or any
// other write to m->params outside the optimiser, which refreshes it itself). No-op in fp32.
void model_sync_compute_params(struct model *m);
// Tensor i's fp32 master weights, this rank's shard (t->numel floats), from / to host memory,
// whichever form the model keeps them in (fp32 params, or split; with split masters writing one
// also writes its compute copy).
void model_master_from_host(struct model *m, int i, const float *host);
void model_master_to_host(const struct model *m, int i, float *host);
// model_alloc + model_init_params.
void model_create(struct model *m, const struct model_dims *d, struct backend be, const struct comm *tp,
                  unsigned long long seed);
void model_destroy(struct model *m);

// The init value of one global element (exposed for tests).
float model_init_value(unsigned long long seed, const struct param_tensor *t, size_t global_index, int n_layer);

// One training micro-step (host token ids, (N) each): forward, the fused LM head and loss with
// their gradients, backward. Leaves the sum of the N token losses in *loss_sum (1 float, backend
// memory); gradients accumulate into m->grads. dloss: the weight of each token's loss in the
// objective (1 / (N * grad_accum)). tp: the TP group's comm. After MODEL_GRAPH_WARMUP calls, where
// the backend records graphs (TPTRAIN_STEP_GRAPH=1), the TP group is one rank and no gradient hook
// is set, the ops are recorded once and replayed as one graph: the same ops on the same pointers,
// so the same bits.
void model_forward_backward(struct model *m, struct comm *tp, const int *inputs, const int *targets,
                            float *loss_sum, float dloss);
// The loss alone (evaluation): forward over one micro-batch, *loss_sum as above; no gradient.
void model_forward(struct model *m, struct comm *tp, const int *inputs, const int *targets,
                   float *loss_sum);
// Backward pass for the last model_forward; gradients accumulate into m->grads. The logits are
// not kept, so it first recomputes the LM head (one product more than model_forward_backward,
// whose gradients it gives bit for bit).
void model_backward(struct model *m, struct comm *tp, float dloss);
// With sequence parallelism each rank's layernorm weight and bias gradients cover only its own
// token rows: sums them over the TP group (one all-reduce), once per step after the last
// backward, so that replicas stay identical. Nothing to do without it.
void model_reduce_sequence_parallel_grads(struct model *m, struct comm *tp);

// The step's blocks, in the order model_forward_backward runs them (--bench model times
// them one by one). Activations and gradients flow through m->a; dres carries the residual
// gradient from block to block. Each forward block ends with the layernorm that the next one
// starts from (fused with its residual add), so a block's forward expects its first layernorm
// output to be in place already.
void model_set_batch(struct model *m, const int *inputs, const int *targets); // host (N) ids
void model_embedding_fwd(struct model *m, struct comm *tp);
void model_attention_block_fwd(struct model *m, struct comm *tp, int layer);
void model_mlp_block_fwd(struct model *m, struct comm *tp, int layer);
// The LM head + loss: loss only (evaluation), or fused with its backward (training), which
// starts the backward: a->dres becomes dL/d(output of the last block). loss_sum may be NULL.
void model_head_fwd(struct model *m, struct comm *tp, float *loss_sum);
void model_head_fwd_bwd(struct model *m, struct comm *tp, float *loss_sum, float dloss);
void model_mlp_block_bwd(struct model *m, struct comm *tp, int layer);
void model_attention_block_bwd(struct model *m, struct comm *tp, int layer);
void model_embedding_bwd(struct model *m, struct comm *tp);

// One block's forward for N tokens on any buffers: the training step runs it over the micro-batch
// (m->a), the KV-cache decoder over one token with attention reading its cache, so the block
// (and its collectives) is written once. Every buffer is compute type unless float *. S rows:
// N, or this rank's N/P with sp.
struct block_acts {
    int N;                              // tokens
    const struct tp_sequence_parallel *sp; // NULL: plain TP (the decoder); else the layers' scratch
    void *ln1;                          // (S, C) ln_1 of the block input, computed before
    void *qkv, *atty;                   // (N, 3*Cl), (N, Cl)
    void *proj;                         // (N, C) row-parallel partial sums, scratch
    const void *res1;                   // (S, C) block input
    void *res2;                         // (S, C) after attention; may alias res1
    void *ln2;                          // (S, C)
    float *ln2_mean, *ln2_rstd;         // (S)
    void *fch, *fch_gelu;               // (N, Fl)
    void *res3;                         // (S, C) block output; may alias res2
    void *ln_next;                      // (S, C) the next block's ln_1 (ln_f after the last)
    float *next_mean, *next_rstd;       // (S)
};
// The attention core between the qkv and proj layers: atty (N, Cl) from qkv (N, 3*Cl) of layer l.
struct block_attention {
    void (*fwd)(void *arg, int layer, void *atty, const void *qkv);
    void *arg;
};
// (ln1) -> f -> qkv -> attention -> proj -> g -> +bias -> +res1 = res2, fused with ln2
void model_block_attention_fwd(struct model *m, struct comm *tp, int layer, const struct block_acts *a,
                               const struct block_attention *att);
// (ln2) -> f -> fc + gelu -> fc_proj -> g -> +bias -> +res2 = res3, fused with the next layernorm
void model_block_mlp_fwd(struct model *m, struct comm *tp, int layer, const struct block_acts *a);

// Collectives issued per micro-batch by model_forward_backward (for logs and tests), of every
// kind (all-reduce, all-gather, reduce-scatter): forward counts the fused head's cross-entropy
// all-reduces (2 per chunk), backward its input gradient's; recomputation's are counted in
// backward. Sequence parallelism adds one all-reduce per step (model_reduce_sequence_parallel_grads),
// not counted.
void model_count_collectives(const struct model_dims *d, int *forward, int *backward);
