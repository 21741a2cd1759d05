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
#pragma once

#include <stdbool.h>
#include <stddef.h>

#include "backend.h"
#include "comm.h"
#include "config.h"
#include "layout.h"

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

// Activations: void * in the compute type, float * always fp32.
struct layer_acts {
    void *ln1;                        // (N, C)
    float *ln1_mean, *ln1_rstd;       // (N), (N)
    void *qkv;                        // (N, 3*Cl)
    void *atty;                       // (N, Cl)
    float *att_saved;                 // backend-defined, attention_saved_floats
    void *res2;                       // (N, C) residual after attention
    void *ln2;                        // (N, C)
    float *ln2_mean, *ln2_rstd;       // (N), (N)
    void *fch, *fch_gelu;             // (N, Fl) before and after GELU
    void *res3;                       // (N, C) residual after the MLP = next layer's input
};

struct gpt2_acts {
    void *encoded;                    // (N, C) embeddings
    struct layer_acts *layers;        // (L)
    void *proj;                       // (N, C) row-parallel partial output, reduced in place
    void *lnf;                        // (N, C)
    float *lnf_mean, *lnf_rstd;       // (N), (N)
    void *logits;                     // (N, Vl) this rank's vocab columns; dlogits in place
    float *maxes, *sums, *losses;     // (N), (2, N), (N)
    float *local_maxes;               // (N) this rank's maxes before the all-reduce
    void *dres;                       // (N, C) gradient of the residual stream
    void *dln;                        // (N, C) gradient into a layernorm output
    void *dqkv;                       // (N, 3*Cl)
    void *datty;                      // (N, Cl)
    void *dfch;                       // (N, Fl) gradient into the MLP's pre-GELU (GELU fused)
    float *att_scratch;               // backend-defined, attention_scratch_floats
};

// Sizes that follow from the config and the TP size; computed identically for --dry-run.
struct model_dims {
    int L, C, NH, HS, T, B, V;  // global model shape, micro-batch B
    int P, tp_rank;             // TP group size and this rank's place in it
    int Vp, Vl, vocab_start;    // padded vocab, rows per rank, first row of this rank
    int NHl, Cl, Fl;            // local heads, local attention width, local MLP width
    size_t N;                   // B*T
};

struct model_memory {
    size_t param_floats;        // local parameters (= gradients = each AdamW moment)
    size_t param_compute_bytes; // the compute-type copy of the parameters (0 in fp32: shared)
    size_t act_bytes;           // activations, all layers, plus backward buffers
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
    struct param_tensor *tensors; // (n_tensors) in buffer order
    int n_tensors;
    size_t n_params_local;        // floats in each flat buffer
    size_t n_params_global;       // real parameters counted once (tied wte once, no padding)
    enum tp_dtype dtype;          // the backend's compute type
    float *params, *grads;        // (n_params_local) backend memory: fp32 master weights, gradients;
                                  // params is NULL in bf16 under the distributed optimizer, which
                                  // keeps the master weights sharded (optim.h)
    void *params_compute;         // (n_params_local) compute-type weights; == params in fp32
    struct gpt2_params p, g;      // views into params_compute / grads
    void *act_memory;             // one allocation for all activations
    struct gpt2_acts a;
    int *inputs, *targets;        // (N) backend memory
    size_t bytes_allocated;       // everything this model allocated on the backend
    struct model_grad_hook grad_hook;
};

// Derives dims for TP rank `tp_rank` of `tp`. The config must already be validated.
struct model_dims model_dims_make(const struct tp_model_config *mc, int micro_batch, int tp, int tp_rank);

// Parameter table for the given dims (n_tensors written to *count; caller frees).
struct param_tensor *model_param_table(const struct model_dims *d, int *count, size_t *n_local,
                                       size_t *n_global);

// Memory the run allocates on the backend per rank, from the same plan model_create uses.
struct model_memory model_memory_plan(const struct model_dims *d, struct backend be);

// Allocates parameters (zero), gradients and activations on be, for weights loaded afterwards.
void model_alloc(struct model *m, const struct model_dims *d, struct backend be);
// Initialises the weights TP-invariantly: every element is a pure function of seed, tensor name
// and global index, and each rank generates only its shard.
void model_init_params(struct model *m, unsigned long long seed);
// Refreshes params_compute from the fp32 master weights (after init, a checkpoint load, or any
// other write to m->params outside the optimiser, which refreshes it itself). No-op in fp32.
void model_sync_compute_params(struct model *m);
// model_alloc + model_init_params.
void model_create(struct model *m, const struct model_dims *d, struct backend be, unsigned long long seed);
void model_destroy(struct model *m);

// The init value of one global element (exposed for tests).
float model_init_value(unsigned long long seed, const struct param_tensor *t, size_t global_index, int n_layer);

// Forward pass over one micro-batch (host token ids, (N) each), loss included. Leaves the sum of
// the N token losses in *loss_sum (1 float, backend memory). tp: the TP group's comm.
void model_forward(struct model *m, struct comm *tp, const int *inputs, const int *targets,
                   float *loss_sum);
// Backward pass for the last forward; gradients accumulate into m->grads. dloss: the weight of
// each token's loss in the objective (1 / (N * grad_accum)).
void model_backward(struct model *m, struct comm *tp, float dloss);

// The step's blocks, in the order model_forward and model_backward run them (--bench model times
// them one by one). Activations and gradients flow through m->a; dres carries the residual
// gradient from block to block. Each forward block ends with the layernorm that the next one
// starts from (fused with its residual add), so a block's forward expects its first layernorm
// output to be in place already.
void model_set_batch(struct model *m, const int *inputs, const int *targets); // host (N) ids
void model_embedding_fwd(struct model *m, struct comm *tp);
void model_attention_block_fwd(struct model *m, struct comm *tp, int layer);
void model_mlp_block_fwd(struct model *m, struct comm *tp, int layer);
void model_head_fwd(struct model *m, struct comm *tp, float *loss_sum);
void model_head_bwd(struct model *m, struct comm *tp, float dloss);
void model_mlp_block_bwd(struct model *m, struct comm *tp, int layer);
void model_attention_block_bwd(struct model *m, struct comm *tp, int layer);
void model_embedding_bwd(struct model *m, struct comm *tp);

// One block's forward for N tokens on any buffers: the training step runs it over the micro-batch
// (m->a), the KV-cache decoder over one token with attention reading its cache, so the block
// (and its collectives) is written once. Every buffer is compute type unless float *.
struct block_acts {
    int N;                              // tokens
    void *ln1;                          // (N, C) ln_1 of the block input, computed before
    void *qkv, *atty;                   // (N, 3*Cl), (N, Cl)
    void *proj;                         // (N, C) row-parallel partial sums, scratch
    const void *res1;                   // (N, C) block input
    void *res2;                         // (N, C) after attention; may alias res1
    void *ln2;                          // (N, C)
    float *ln2_mean, *ln2_rstd;         // (N)
    void *fch, *fch_gelu;               // (N, Fl)
    void *res3;                         // (N, C) block output; may alias res2
    void *ln_next;                      // (N, C) the next block's ln_1 (ln_f after the last)
    float *next_mean, *next_rstd;       // (N)
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

// Collectives issued per micro-batch by forward and backward (for logs and tests).
void model_count_collectives(const struct model_dims *d, int *forward, int *backward);
