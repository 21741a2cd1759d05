// llmc.h: llm.c's GPT-2 model file (gpt2_124M.bin, gpt2_124M_bf16.bin) read into and written from
// a model.
//
// Format: 256 int32 header [magic 20240326, version (3: fp32, 5: bf16), max_seq_len, vocab_size,
// n_layer, n_head, n_embd, padded_vocab_size, ...], then every parameter in this order, fp32 or
// bf16, little-endian: wte (Vp, C) with zero padding rows, wpe (maxT, C), and per kind for all
// layers at once ln1w (L, C), ln1b (L, C), qkvw (L, 3C, C), qkvb (L, 3C), attprojw (L, C, C),
// attprojb (L, C), ln2w, ln2b (L, C), fcw (L, 4C, C), fcb (L, 4C), fcprojw (L, C, 4C), fcprojb
// (L, C), then lnfw (C), lnfb (C). Weight matrices are (out, in), torch.nn.Linear's layout: the
// transpose of the Hugging Face Conv1D layout tptrain's checkpoints use.
#pragma once

#include <stdbool.h>
#include <stddef.h>

#include "mesh.h"
#include "model.h"

#define LLMC_MAGIC 20240326

// True when path is a file that starts with llm.c's model magic (init.from picks the reader).
bool llmc_is_model_file(const char *path);

// Collective over the mesh: every rank reads path and keeps its shards. The model's n_layer,
// n_head, n_embd and vocab_size must match the header and seq_len must not exceed its
// max_seq_len (a longer wpe gives its first rows). Returns 0 or TP_EXIT_USAGE with err naming the
// file and the field.
int llmc_load(struct model *m, const struct mesh *mesh, const char *path, char *err, size_t errlen);

// Collective over the TP group of DP rank 0: writes the parameters to path (fp32, version 3; bf16,
// version 5), padded vocabulary Vp = vocab rounded up to a multiple of 128 as llm.c pads it,
// through path.tmp and a rename. World rank 0 writes. Returns 0 or TP_EXIT_RUNTIME.
int llmc_save(const struct model *m, const struct mesh *mesh, const char *path, bool bf16, char *err,
              size_t errlen);
