// eval.h: --eval mode: validation loss of a checkpoint, and text generation.
#pragma once

// --generate N takes at most this many tokens (the context and sampling buffers hold them all).
#define EVAL_MAX_GENERATE (1 << 20)

#include <stdbool.h>

#include "text.h"

struct eval_opts {
    const char *checkpoint;     // checkpoint directory (or a checkpoints dir: its `latest`)
    const char *data;           // validation shard glob (NULL = the one in the checkpoint's config)
    int batches;                // micro-batches to evaluate (0 = the config's eval.batches)
    int generate;               // tokens to sample (0 = evaluate only)
    double temperature;         // sampling temperature (default 1.0)
    int top_k;                  // 0 = full distribution
    unsigned long long seed;    // sampling seed
    bool seed_set;
    const char *prompt_tokens;  // file of whitespace-separated token ids (NULL = start from EOT)
    const char *prompt_text;    // --prompt: text to encode and start from (NULL = none)
    enum text_format format;    // how --generate prints: the text, token ids, or a JSON line
    const char *tokenizer;      // tokenizer file (NULL = TEXT_TOKENIZER_PATH)
    const char *export_llmc;    // write the weights as llm.c's model file here instead (NULL = no);
                                // bf16 (version 5) when the name ends in _bf16.bin, else fp32
    const char *const *sets;    // --set overrides applied to the checkpoint's config (e.g. parallel.tp)
    int n_sets;
};

// Runs under MPI (already initialised) on every rank; returns the exit code.
int eval_run(const struct eval_opts *o);
