// ckpt.h: checkpoints: global tensors in and out of the sharded model (safetensors, Hugging Face
// GPT-2 names), the per-step checkpoint directory, resume and init-from-weights.
//
// Tensors are gathered one at a time onto TP rank 0 and written in Hugging Face's layout
// (Conv1D weights as (in, out), vocabulary padding dropped), so a file loads in PyTorch and
// transformers directly and at any TP size here.
//
// A checkpoint is a directory DIR/step_NNNNNNNN/ holding
//   model.safetensors      the parameters (fp32 master weights), HF names
//   optimizer.safetensors  AdamW moments "exp_avg.NAME" and "exp_avg_sq.NAME", fp32, global
//   state.json             step, data position, seed, val loss, tptrain version, and per file its
//                          size and one checksum per tensor (FNV-1a 64 over 32-bit words)
//   config.yaml            the resolved run config (loadable by config_load_file)
//   config.json            a transformers GPT2Config, so GPT2LMHeadModel.from_pretrained(dir) works
// It is written as step_NNNNNNNN.tmp/, fsynced, renamed, and only then named by DIR/latest (a text
// file holding the directory name, replaced by rename), so a crash at any moment leaves `latest`
// naming a complete checkpoint.
//
// Collective functions below return the same status on every rank; when it is not 0, exactly one
// rank (the lowest that failed) has the one-line message in err and should print it.
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "config.h"
#include "mesh.h"
#include "model.h"
#include "optim.h"

#define CKPT_FORMAT_VERSION 1

// ---- global tensors

// Shape of tensor t as stored in files (HF layout). Returns ndim.
int ckpt_hf_shape(const struct param_tensor *t, int64_t shape[LAYOUT_MAX_DIMS]);
// Elements of tensor t as stored in files (real rows only).
size_t ckpt_hf_numel(const struct param_tensor *t);

// Collective over the TP group: gathers local buffer `src` (backend memory laid out like the
// parameters, e.g. m->grads or an AdamW moment; NULL for the model's master weights, whichever form
// they are in) of tensor i into `dst` (host, ckpt_hf_numel floats) on TP rank 0. Other ranks may
// pass dst = NULL.
void ckpt_gather_tensor(const struct model *m, const struct mesh *mesh, const float *src, int i, float *dst);

// Inverse: every rank takes its shard of tensor i from the global HF-layout host array `src`
// (all ranks pass it) and writes it into backend buffer `dst` (laid out like the parameters; NULL:
// the model's master weights, whichever form they are in). Padding rows are zeroed.
void ckpt_scatter_tensor(const struct model *m, const float *src, int i, float *dst);

// Collective over the TP group: writes buffer `src` (laid out like the parameters) as a
// safetensors file with HF names on TP rank 0 of DP rank 0. Returns 0, or 1 with err set
// (agreed across the mesh).
int ckpt_export_safetensors(const struct model *m, const struct mesh *mesh, const float *src,
                            const char *path, char *err, size_t errlen);

// The checksum state.json records per tensor: FNV-1a 64 over the little-endian 32-bit words of
// the tensor's bytes (bytes must be a multiple of 4). Exposed for tests.
uint64_t ckpt_checksum(const void *data, size_t bytes);

// ---- checkpoint directories

// What a checkpoint carries besides its tensors.
struct ckpt_state {
    int step;                 // optimizer steps completed
    size_t data_position;     // train loader position: micro-batches read by each DP rank
    int dp_size, micro_batch; // the DP size and micro-batch the position counts in
    int optim_t;              // AdamW step counter (bias correction)
    unsigned long long seed;  // train.seed; the run has no other random state
    bool has_val;             // val_loss was computed at this step
    double val_loss;
    struct tp_model_config model; // the shape the checkpoint was trained with
};

// Checks the model shape of a run against the one the checkpoint in dir was trained with: every
// key must agree (n_head changes no tensor shape, so the tensors alone cannot catch it). Returns
// 0, or TP_EXIT_USAGE with err naming the first differing model.* key. Local.
int ckpt_check_model(const struct ckpt_state *cs, const struct tp_model_config *mc, const char *dir,
                     char *err, size_t errlen);

// Collective: writes checkpoint cfg->checkpoint.dir/step_NNNNNNNN for st->step (atomically, see
// above), points `latest` at it and removes the oldest beyond checkpoint.keep. World rank 0
// writes; the TP group of DP rank 0 gathers, after the DP groups have gathered what the
// distributed optimizer shards (its moments, and in bf16 its master weights). The path written
// goes to `written` (may be NULL).
int ckpt_save(const struct model *m, const struct optim *o, const struct mesh *mesh,
              const struct tp_config *cfg, const struct ckpt_state *st, char *written,
              size_t writtenlen, char *err, size_t errlen);

// Finds the checkpoint a reference names: a checkpoint directory (it has state.json), or a
// directory of checkpoints (its `latest`, or failing that its newest complete step_* directory).
// Returns 0 with the directory in out; 1 when ref is a directory of checkpoints that holds none
// yet; TP_EXIT_USAGE with err set otherwise. Local (no collectives).
int ckpt_resolve(const char *ref, char *out, size_t outlen, char *err, size_t errlen);

// Before training: creates checkpoint.dir (and its parents) if needed and proves it writable by
// creating and removing a probe file, so a bad directory is found before step 1, not at the
// first save. Returns 0, or TP_EXIT_USAGE with err naming checkpoint.dir. Local (no collectives).
int ckpt_check_dir(const char *dir, char *err, size_t errlen);

// Reads DIR/state.json. Local. Returns 0 or TP_EXIT_USAGE with err naming the file and field.
int ckpt_read_state(const char *dir, struct ckpt_state *st, char *err, size_t errlen);

enum ckpt_load_mode {
    // A checkpoint of this very model: every tensor present, F32, shapes equal, checksums verified.
    CKPT_LOAD_EXACT = 0,
    // init.from: GPT-2 names (a "transformer." prefix is accepted), F32, BF16 or F16; a wpe with
    // more positions than seq_len gives its first seq_len rows; the attn.bias / attn.masked_bias
    // buffers and lm_head.weight (tied) of Hugging Face files are ignored. Checksums are verified
    // when the file sits in a checkpoint directory.
    CKPT_LOAD_INIT,
};

// Collective: loads the parameters from a checkpoint directory (its model.safetensors) or, in
// CKPT_LOAD_INIT mode, also from a .safetensors file. Any TP size. Returns 0 or TP_EXIT_USAGE.
// Writes m->params: before optim_adopt_weights, which may release them.
int ckpt_load_params(struct model *m, const struct mesh *mesh, const char *path,
                     enum ckpt_load_mode mode, char *err, size_t errlen);

// Collective: loads the AdamW moments and step counter of checkpoint directory `dir` (into this
// rank's slices under the distributed optimizer).
int ckpt_load_optim(struct model *m, struct optim *o, const struct mesh *mesh, const char *dir,
                    char *err, size_t errlen);
