// backend.h: the op table that separates the model from the hardware.
//
// A backend is a struct of function pointers plus an opaque context (ggml's backend interface
// shape). The model, optimiser and training loop only ever call through this table, so the same
// code runs on the fp32 CPU reference backend (backend_cpu.c) and on CUDA (cuda/).
//
// Conventions for every op:
// - All tensor pointers are backend memory (host memory on the CPU backend, device memory on
//   CUDA), fp32, row-major, contiguous. Shapes are given in the comments; N = B*T rows.
// - "=" means the op overwrites its output; "+=" means it accumulates (parameter gradients always
//   accumulate so that gradient accumulation over micro-steps is free).
// - Ops are stream-ordered: they may return before the work is done. copy_to_host and
//   synchronize are the only ops that wait.
// - Results must be deterministic: the same inputs give bitwise the same outputs on every call
//   (no float atomics), so that resumed runs reproduce uninterrupted ones exactly.
// - Weights follow the (out, in) convention: a linear layer computes out = inp @ w^T + bias.
#pragma once

#include <stdbool.h>
#include <stddef.h>

struct backend_i {
    // ---- identity and memory
    const char *(*name)(void *ctx);                         // "cpu", "cuda"
    bool host_accessible;                                   // pointers can be dereferenced by host code
    void *(*alloc)(void *ctx, size_t bytes);                // zero-filled; dies with a clear message on OOM
    void (*free)(void *ctx, void *ptr);
    void (*zero)(void *ctx, void *ptr, size_t bytes);       // ptr[0..bytes) = 0
    void (*copy_to_device)(void *ctx, void *dst, const void *host_src, size_t bytes);
    void (*copy_to_host)(void *ctx, void *host_dst, const void *src, size_t bytes); // waits
    void (*copy)(void *ctx, void *dst, const void *src, size_t bytes);              // device -> device
    void (*synchronize)(void *ctx);                          // waits for all queued work
    void *(*native_stream)(void *ctx);                       // (optional) cudaStream_t for NCCL; NULL on CPU
    void (*destroy)(void *ctx);

    // ---- embeddings (vocab-parallel: this rank holds rows [vocab_start, vocab_start + n_vocab) of wte)
    // out (N, C) = wte[tok - vocab_start] for tokens in this rank's range, 0 otherwise
    void (*vocab_embedding_fwd)(void *ctx, float *out, const int *tokens, const float *wte,
                                int N, int C, int vocab_start, int n_vocab);
    // dwte (n_vocab, C) += sum of dout rows whose token falls in this rank's range
    void (*vocab_embedding_bwd)(void *ctx, float *dwte, const float *dout, const int *tokens,
                                int N, int C, int vocab_start, int n_vocab);
    // x (B, T, C) += wpe (T, C) broadcast over B
    void (*position_embedding_fwd)(void *ctx, float *x, const float *wpe, int B, int T, int C);
    // dwpe (T, C) += sum over B of dout (B, T, C)
    void (*position_embedding_bwd)(void *ctx, float *dwpe, const float *dout, int B, int T, int C);

    // ---- layernorm (eps 1e-5, biased variance, as GPT-2)
    // out (N, C) = (inp - mean) * rstd * w + b;  mean, rstd (N) = saved statistics
    void (*layernorm_fwd)(void *ctx, float *out, float *mean, float *rstd, const float *inp,
                          const float *w, const float *b, int N, int C);
    // dinp (N, C) +=, dw (C) +=, db (C) +=  (dinp accumulates: it is always the residual stream)
    void (*layernorm_bwd)(void *ctx, float *dinp, float *dw, float *db, const float *dout,
                          const float *inp, const float *w, const float *mean, const float *rstd,
                          int N, int C);

    // ---- linear layers
    // out (N, OC) = inp (N, IC) @ w (OC, IC)^T + bias (OC); bias may be NULL
    void (*matmul_fwd)(void *ctx, float *out, const float *inp, const float *w, const float *bias,
                       int N, int IC, int OC);
    // dinp (N, IC) = dout @ w  (skipped if dinp is NULL); dw (OC, IC) += dout^T @ inp;
    // dbias (OC) += column sums of dout (skipped if dbias is NULL)
    void (*matmul_bwd)(void *ctx, float *dinp, float *dw, float *dbias, const float *dout,
                       const float *inp, const float *w, int N, int IC, int OC);
    // out (N, C) = res (N, C) + x (N, C) + bias (C); bias may be NULL; out may alias res or x.
    // Row-parallel layers add their bias here, once, after the all-reduce.
    void (*residual_fwd)(void *ctx, float *out, const float *res, const float *x, const float *bias,
                         int N, int C);

    // ---- GELU, tanh approximation
    void (*gelu_fwd)(void *ctx, float *out, const float *inp, size_t n);              // out = gelu(inp)
    void (*gelu_bwd)(void *ctx, float *dinp, const float *inp, const float *dout, size_t n); // dinp = gelu'(inp) * dout; may alias dout

    // ---- causal self-attention over this rank's NH heads of size HS
    // qkv (B, T, 3*NH*HS) holds [q heads | k heads | v heads] per token; scale 1/sqrt(HS).
    // Floats the forward keeps for the backward, per layer (e.g. probabilities, or log-sum-exp).
    size_t (*attention_saved_floats)(void *ctx, int B, int T, int NH, int HS);
    // Floats of temporary space the forward/backward need (shared by all layers).
    size_t (*attention_scratch_floats)(void *ctx, int B, int T, int NH, int HS);
    // out (B, T, NH*HS) =
    void (*attention_fwd)(void *ctx, float *out, float *saved, float *scratch, const float *qkv,
                          int B, int T, int NH, int HS);
    // dqkv (B, T, 3*NH*HS) =
    void (*attention_bwd)(void *ctx, float *dqkv, float *scratch, const float *dout,
                          const float *qkv, const float *out, const float *saved,
                          int B, int T, int NH, int HS);
    // Generation with a KV cache: one query token against the first n_ctx cached positions.
    // out (NH*HS) = per head softmax(q . k^T * scale) @ v over rows [0, n_ctx) of
    // kcache, vcache (>= n_ctx, NH*HS); q (NH*HS); scratch (NH * n_ctx) floats.
    void (*attention_decode)(void *ctx, float *out, float *scratch, const float *q,
                             const float *kcache, const float *vcache, int n_ctx, int NH, int HS);

    // ---- vocab-parallel cross-entropy. logits (N, n_vocab) are this rank's columns
    // [vocab_start, vocab_start + n_vocab) of the padded vocabulary; columns >= vocab_size (the real,
    // unpadded V) are padding and are excluded everywhere. The caller all-reduces between phases.
    // 1) maxes (N) = max over this rank's real columns (-INFINITY if it has none); then all-reduce MAX
    void (*xent_max)(void *ctx, float *maxes, const float *logits, int N, int vocab_start,
                     int n_vocab, int vocab_size);
    // 2) sums (2, N): sums[0][i] = sum exp(logit - maxes[i]) over real columns,
    //    sums[1][i] = logit of targets[i] if this rank holds it, else 0; then all-reduce SUM
    void (*xent_sums)(void *ctx, float *sums, const float *logits, const float *maxes,
                      const int *targets, int N, int vocab_start, int n_vocab, int vocab_size);
    // 3) losses (N) = log(sums[0]) + maxes - sums[1]   (identical on every TP rank)
    void (*xent_loss)(void *ctx, float *losses, const float *maxes, const float *sums, int N);
    // dlogits (N, n_vocab) = (softmax - onehot(target)) * dloss; padding columns 0.
    // dlogits may alias logits. No communication needed.
    void (*xent_bwd)(void *ctx, float *dlogits, const float *logits, const float *maxes,
                     const float *sums, const int *targets, float dloss, int N, int vocab_start,
                     int n_vocab, int vocab_size);

    // ---- reductions and elementwise helpers
    // *out (1 float, backend memory) = sum of x (n)
    void (*sum)(void *ctx, float *out, const float *x, size_t n);
    // *out (1 float, backend memory) += sum of x[i]^2 (accumulated in at least fp32 per call)
    void (*sumsq_acc)(void *ctx, float *out, const float *x, size_t n);
    // x (n) *= s
    void (*scale)(void *ctx, float *x, float s, size_t n);

    // ---- optimiser: AdamW with decoupled weight decay, bias correction at step t (1-based).
    // g is multiplied by grad_scale (clipping, averaging) before use; m, v, p updated in place.
    void (*adamw)(void *ctx, float *p, const float *g, float *m, float *v, size_t n, float lr,
                  float beta1, float beta2, float eps, float weight_decay, float grad_scale, int t);

    // ---- timing events (all optional; NULL on a backend whose ops run synchronously on the
    // host, where callers time with synchronize + the host clock instead)
    void *(*event_create)(void *ctx);                   // (optional) a reusable marker in the op queue
    void (*event_record)(void *ctx, void *ev);          // (optional) ev completes after every op issued so far
    float (*event_elapsed_ms)(void *ctx, void *start, void *end); // (optional) waits for end; ms from start to end
    void (*event_destroy)(void *ctx, void *ev);         // (optional)
};

struct backend {
    const struct backend_i *iface;
    void *ctx;
};

// The fp32 CPU reference backend (src/backend_cpu.c). Uses OpenMP threads when built with it.
struct backend backend_cpu_create(void);

// The CUDA backend (cuda/), present when built with -Dcuda=enabled/auto and the toolkit found.
// device: CUDA device ordinal. Returns false with a message in err when no usable GPU exists.
bool backend_cuda_available(void);
int backend_cuda_device_count(void);
bool backend_cuda_create(struct backend *out, int device, char *err, size_t errlen);

static inline void backend_destroy(struct backend *be) {
    if (be->iface && be->iface->destroy) be->iface->destroy(be->ctx);
    be->iface = NULL;
    be->ctx = NULL;
}
