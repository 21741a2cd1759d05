// ckpt.h: global tensors in and out of the sharded model (safetensors, Hugging Face GPT-2 names).
//
// Tensors are gathered one at a time onto TP rank 0 and written in Hugging Face's layout
// (Conv1D weights as (in, out), vocabulary padding dropped), so a file loads in PyTorch and
// transformers directly and at any TP size here.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "mesh.h"
#include "model.h"

// Shape of tensor t as stored in files (HF layout). Returns ndim.
int ckpt_hf_shape(const struct param_tensor *t, int64_t shape[LAYOUT_MAX_DIMS]);
// Elements of tensor t as stored in files (real rows only).
size_t ckpt_hf_numel(const struct param_tensor *t);

// Collective over the TP group: gathers local buffer `src` (backend memory laid out like the
// parameters, e.g. m->params, m->grads or an AdamW moment) of tensor i into `dst` (host,
// ckpt_hf_numel floats) on TP rank 0. Other ranks may pass dst = NULL.
void ckpt_gather_tensor(const struct model *m, const struct mesh *mesh, const float *src, int i, float *dst);

// Inverse: every rank takes its shard of tensor i from the global HF-layout host array `src`
// (all ranks pass it) and writes it into backend buffer `dst` (laid out like the parameters).
// Padding rows are zeroed.
void ckpt_scatter_tensor(const struct model *m, const float *src, int i, float *dst);

// Collective over the TP group: writes buffer `src` (laid out like the parameters) as a
// safetensors file with HF names on TP rank 0 of DP rank 0. Returns 0, or 1 with err set
// (agreed across the mesh).
int ckpt_export_safetensors(const struct model *m, const struct mesh *mesh, const float *src,
                            const char *path, char *err, size_t errlen);
