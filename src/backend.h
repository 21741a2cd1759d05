// backend.h: the op table that separates the model from the hardware.
//
// A backend is a struct of function pointers plus an opaque context (ggml's backend interface
// shape). The model, optimiser and training loop only ever call through this table, so the same
// code runs on the fp32 CPU reference backend (backend_cpu.c) and on CUDA (cuda/).
//
// Conventions for every op:
// - All tensor pointers are backend memory (host memory on the CPU backend, device memory on
//   CUDA), row-major, contiguous. Shapes are given in the comments; N = B*T rows.
// - Two element types. `void *` tensors hold the backend's compute type, dtype(ctx): fp32, or
//   bf16 on the mixed-precision path (activations, their gradients, and the compute copy of the
//   weights). `float *` tensors are always fp32: parameter gradients, master weights, optimiser
//   state, layernorm statistics, attention's saved log-sum-exp or probabilities, the loss.
//   Arithmetic is fp32 in every op whatever the storage (bf16 inputs are widened, accumulation
//   and reductions run in fp32, results are rounded to nearest even on store).
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
#include <stdint.h>
#include <string.h>

// Element type of a backend's compute tensors.
enum tp_dtype { TP_DTYPE_F32 = 0, TP_DTYPE_BF16 };

static inline size_t tp_dtype_size(enum tp_dtype t) { return t == TP_DTYPE_BF16 ? 2 : 4; }
static inline const char *tp_dtype_name(enum tp_dtype t) { return t == TP_DTYPE_BF16 ? "bf16" : "fp32"; }

// bf16 <-> fp32 on the host: bf16 is the upper half of an IEEE binary32; rounding is to nearest
// even, NaN stays NaN.
static inline uint16_t tp_bf16_from_f32(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
static inline float tp_bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

// Split master weights (bf16 training, model_options.split_master): an fp32 master is kept as two
// 16-bit halves, the high one being the bf16 compute copy itself, so the pair costs 4 bytes where
// an fp32 master beside a bf16 copy costs 6. The high half is the bit pattern rounded half up
// (round to nearest, ties away from zero: it differs from round-to-nearest-even only on exact
// ties), so it is the truncation plus one exactly when the low half is 0x8000 or more, and the
// fp32 pattern comes back exactly. On bit patterns; NaN and infinity are not rounded specially.
#if defined(__CUDACC__)
#define TP_HOST_DEVICE __host__ __device__
#else
#define TP_HOST_DEVICE
#endif
static inline TP_HOST_DEVICE uint16_t tp_split_hi(uint32_t bits) { return (uint16_t)((bits + 0x8000u) >> 16); }
static inline TP_HOST_DEVICE uint16_t tp_split_lo(uint32_t bits) { return (uint16_t)(bits & 0xffffu); }
static inline TP_HOST_DEVICE uint32_t tp_split_join(uint16_t hi, uint16_t lo) {
    return ((uint32_t)(uint16_t)(hi - (lo >= 0x8000u ? 1u : 0u)) << 16) | lo;
}

// One parameter tensor's span in the flat parameter, gradient and optimiser buffers, as the
// one-pass gradient norm and AdamW see it (a table of these lives in backend memory).
struct param_segment {
    size_t offset, numel;       // elements
    float weight_decay;         // AdamW's decoupled decay for this tensor (0 for biases, norms)
    int norm_group;             // which squared-norm accumulator it adds to (0 or 1)
};

// One AdamW step over every parameter (the backend's adamw op).
struct adamw_step {
    float *p;                   // (n) fp32 master weights, updated; NULL when they are split
    void *p_compute;            // (n) compute-type copy rewritten from p, or NULL when dtype is fp32
    uint16_t *p_lo;             // (n) with p NULL: the masters are split (tp_split_*), their high
                                // halves in p_compute (bf16), their low halves here; else NULL
    const float *g;             // (n) gradients
    float *m, *v;               // (n) first and second moments, updated
    const struct param_segment *segs; // (n_segs) backend memory, covering [0, n)
    int n_segs;
    size_t n;
    float lr, beta1, beta2, eps;
    float grad_scale;           // g is multiplied by this before use
    // Clipping on the device, so the step needs no host round trip: with norm_sq (2 floats,
    // backend memory: the two squared-norm groups of the scaled gradient) and grad_clip > 0,
    // g is further scaled by min(1, grad_clip / sqrt(norm_sq[0] + norm_sq[1])).
    const float *norm_sq;
    float grad_clip;
    int t;                      // 1-based step for bias correction
};

// What a backend's memory_stats reports.
struct backend_memory {
    size_t now, peak;           // bytes the backend itself holds (its allocations, scratch and
                                // workspaces, not yet freed): now, and the most since it was created
    size_t device_used;         // bytes in use on the whole device (every process and the runtime's
                                // own), or 0 where there is no device (the CPU backend)
    size_t device_total;        // the device's memory, or 0
};

struct backend_i {
    // ---- identity and memory
    const char *(*name)(void *ctx);                         // "cpu", "cuda"
    enum tp_dtype (*dtype)(void *ctx);                      // element type of the void * tensors
    bool host_accessible;                                   // pointers can be dereferenced by host code
    void *(*alloc)(void *ctx, size_t bytes);                // zero-filled; dies with a clear message on OOM
    void (*free)(void *ctx, void *ptr);
    void (*zero)(void *ctx, void *ptr, size_t bytes);       // ptr[0..bytes) = 0
    void (*copy_to_device)(void *ctx, void *dst, const void *host_src, size_t bytes);
    void (*copy_to_host)(void *ctx, void *host_dst, const void *src, size_t bytes); // waits
    void (*copy)(void *ctx, void *dst, const void *src, size_t bytes);              // device -> device
    // dst (n) compute type = src (n) fp32, rounded (a plain copy when dtype is fp32)
    void (*to_compute)(void *ctx, void *dst, const float *src, size_t n);
    // dst (n) fp32 = src (n) compute type
    void (*from_compute)(void *ctx, float *dst, const void *src, size_t n);
    void (*synchronize)(void *ctx);                          // waits for all queued work
    void *(*native_stream)(void *ctx);                       // (optional) cudaStream_t for NCCL; NULL on CPU
    void (*memory_stats)(void *ctx, struct backend_memory *out); // (optional) the memory it holds, see above
    // (optional) collectives running beside this backend's queue: +n when a comm starts n on a side
    // stream, -n when they are joined. While any run, the CUDA backend's products leave
    // multiprocessors to them (TPTRAIN_OVERLAP_SMS).
    void (*overlap)(void *ctx, int delta);
    // (optional) opens (on) or closes a profiler's capture range around the work queued between
    // (CUDA: cudaProfilerStart/Stop, for `ncu --profile-from-start off`); debug.profile_step.
    void (*profile)(void *ctx, bool on);
    // (optional) graphs: the ops queued between graph_begin and graph_end are recorded, not run,
    // into one graph that graph_launch queues as a whole (CUDA: a captured CUDA graph; one launch for
    // a training step's hundreds of kernels). graphs: whether the backend records them (CUDA: with
    // TPTRAIN_STEP_GRAPH=1); graph_begin returns false if recording could not start; graph_end
    // returns the graph, or NULL if recording failed (then none of the recorded ops ran, and the
    // caller runs them itself). A graph keeps the pointers and scalars it was recorded with, and no
    // op may grow its scratch or wait for the device while recording.
    bool (*graphs)(void *ctx);
    bool (*graph_begin)(void *ctx);
    void *(*graph_end)(void *ctx);
    void (*graph_launch)(void *ctx, void *graph);
    void (*graph_free)(void *ctx, void *graph);
    void (*destroy)(void *ctx);

    // ---- embeddings (vocab-parallel: this rank holds rows [vocab_start, vocab_start + n_vocab) of wte)
    // out (N, C) = wte[tok - vocab_start] for tokens in this rank's range, 0 otherwise
    void (*vocab_embedding_fwd)(void *ctx, void *out, const int *tokens, const void *wte,
                                int N, int C, int vocab_start, int n_vocab);
    // dwte (n_vocab, C) += sum of dout rows whose token falls in this rank's range
    void (*vocab_embedding_bwd)(void *ctx, float *dwte, const void *dout, const int *tokens,
                                int N, int C, int vocab_start, int n_vocab);
    // x (B, T, C) += wpe (T, C) broadcast over B
    void (*position_embedding_fwd)(void *ctx, void *x, const void *wpe, int B, int T, int C);
    // dwpe (T, C) += sum over B of dout (B, T, C)
    void (*position_embedding_bwd)(void *ctx, float *dwpe, const void *dout, int B, int T, int C);

    // ---- layernorm (eps 1e-5, biased variance, as GPT-2)
    // out (N, C) = (inp - mean) * rstd * w + b;  mean, rstd (N) = saved statistics
    void (*layernorm_fwd)(void *ctx, void *out, float *mean, float *rstd, const void *inp,
                          const void *w, const void *b, int N, int C);
    // dinp (N, C) +=, dw (C) +=, db (C) +=  (dinp accumulates: it is always the residual stream);
    // dsum (C) += the column sums of dinp as it is left (NULL: skipped). The residual gradient
    // leaving a layernorm's backward is the output gradient of the row-parallel layer before it,
    // so dsum is that layer's bias gradient, summed where the rows are at hand rather than read
    // again by the layer's backward.
    void (*layernorm_bwd)(void *ctx, void *dinp, float *dw, float *db, float *dsum,
                          const void *dout, const void *inp, const void *w, const float *mean,
                          const float *rstd, int N, int C);

    // ---- linear layers
    // out (N, OC) = inp (N, IC) @ w (OC, IC)^T + bias (OC); bias may be NULL.
    // With pre_gelu (N, OC) non-NULL: pre_gelu = that product, out = gelu(pre_gelu).
    void (*matmul_fwd)(void *ctx, void *out, void *pre_gelu, const void *inp, const void *w,
                       const void *bias, int N, int IC, int OC);
    // dinp (N, IC) = dout @ w  (skipped if dinp is NULL), times gelu'(pre_gelu (N, IC)) elementwise
    // when pre_gelu is non-NULL; dinp_sum (IC) += column sums of dinp as stored (NULL: skipped; with
    // the GELU, the bias gradient of the layer whose output it was); dw (OC, IC) += dout^T @ inp;
    // dbias (OC) += column sums of dout (skipped if dbias is NULL; both skipped, and inp unread, if
    // dw is NULL: a sequence-parallel layer runs the two halves apart, each beside a collective)
    void (*matmul_bwd)(void *ctx, void *dinp, float *dinp_sum, float *dw, float *dbias, const void *dout,
                       const void *inp, const void *w, const void *pre_gelu, int N, int IC, int OC);
    // out (N, C) = res (N, C) + x (N, C) + bias (C); bias may be NULL; out may alias res or x.
    // Row-parallel layers add their bias here, once, after the all-reduce.
    void (*residual_fwd)(void *ctx, void *out, const void *res, const void *x, const void *bias,
                         int N, int C);
    // The same residual followed by the next layernorm, in one pass: out (N, C) = res + x + bias
    // (stored, then read back as stored: in bf16 the layernorm normalises the rounded sum, as the
    // unfused pair would), ln (N, C) = layernorm(out) with w, b; mean, rstd (N) as layernorm_fwd.
    // out may alias res or x; ln aliases nothing.
    void (*residual_layernorm_fwd)(void *ctx, void *out, void *ln, float *mean, float *rstd,
                                   const void *res, const void *x, const void *bias, const void *w,
                                   const void *b, int N, int C);

    // ---- GELU, tanh approximation, standalone (the model, decode and the benches use the fused
    // matmul forms; these are the unfused reference the tests check those against)
    void (*gelu_fwd)(void *ctx, void *out, const void *inp, size_t n);              // out = gelu(inp)
    void (*gelu_bwd)(void *ctx, void *dinp, const void *inp, const void *dout, size_t n); // dinp = gelu'(inp) * dout; may alias dout

    // ---- causal self-attention over this rank's NH heads of size HS
    // qkv (B, T, 3*NH*HS) holds [q heads | k heads | v heads] per token; scale 1/sqrt(HS).
    // Floats the forward keeps for the backward, per layer (e.g. probabilities, or log-sum-exp).
    size_t (*attention_saved_floats)(void *ctx, int B, int T, int NH, int HS);
    // Floats of temporary space the forward/backward need (shared by all layers).
    size_t (*attention_scratch_floats)(void *ctx, int B, int T, int NH, int HS);
    // out (B, T, NH*HS) =
    void (*attention_fwd)(void *ctx, void *out, float *saved, float *scratch, const void *qkv,
                          int B, int T, int NH, int HS);
    // dqkv (B, T, 3*NH*HS) =
    // dqkv_sum (3*NH*HS) += the column sums of dqkv as stored (NULL: skipped): qkv's bias gradient,
    // summed where dqkv is written (CUDA: inside the Hopper kernels with TPTRAIN_ATTN_BWD_SUMS=fused)
    void (*attention_bwd)(void *ctx, void *dqkv, float *dqkv_sum, float *scratch, const void *dout,
                          const void *qkv, const void *out, const float *saved,
                          int B, int T, int NH, int HS);
    // Generation with a KV cache: one query token against the first n_ctx cached positions.
    // out (NH*HS) = per head softmax(q . k^T * scale) @ v over rows [0, n_ctx) of
    // kcache, vcache (>= n_ctx, NH*HS); q (NH*HS); scratch (NH * n_ctx) floats.
    void (*attention_decode)(void *ctx, void *out, float *scratch, const void *q,
                             const void *kcache, const void *vcache, int n_ctx, int NH, int HS);
    // (optional) which kernels attention_fwd/bwd run at head size HS, for benchmark tables
    const char *(*attention_path)(void *ctx, int HS);

    // ---- vocab-parallel cross-entropy. logits (N, n_vocab) are this rank's columns
    // [vocab_start, vocab_start + n_vocab) of the padded vocabulary; columns >= vocab_size (the real,
    // unpadded V) are padding and are excluded everywhere. The caller all-reduces between phases.
    // 1) one pass over the logits (online softmax statistics): maxes (N) = max over this rank's
    //    real columns (-INFINITY if it has none); sums (2, N): sums[0][i] = sum exp(logit -
    //    maxes[i]) over those columns (0 if none), sums[1][i] = logit of targets[i] if this rank
    //    holds it, else 0. With one rank these are final.
    void (*xent_stats)(void *ctx, float *maxes, float *sums, const void *logits, const int *targets,
                       int N, int vocab_start, int n_vocab, int vocab_size);
    // 2) (several ranks) the caller keeps this rank's maxes in local_maxes and all-reduces maxes
    //    with MAX; then sums[0][i] *= exp(local_maxes[i] - maxes[i]) (0 where local_maxes[i] is
    //    -INFINITY) puts every rank's sum on the global max; then the caller all-reduces sums SUM
    void (*xent_rescale)(void *ctx, float *sums, const float *local_maxes, const float *maxes, int N);
    // 3) losses (N) = log(sums[0]) + maxes - sums[1]   (identical on every TP rank)
    void (*xent_loss)(void *ctx, float *losses, const float *maxes, const float *sums, int N);
    // dlogits (N, n_vocab) = (softmax - onehot(target)) * dloss; padding columns 0.
    // dlogits may alias logits. No communication needed.
    void (*xent_bwd)(void *ctx, void *dlogits, const void *logits, const float *maxes,
                     const float *sums, const int *targets, float dloss, int N, int vocab_start,
                     int n_vocab, int vocab_size);
    // (optional) One rank holds the whole vocabulary (vocab_start 0), so no all-reduce separates
    // the phases: xent_stats, xent_loss and, with dlogits non-NULL, xent_bwd in one op whose
    // results equal theirs bit for bit, reading each row of logits from memory once.
    // losses (N) =; dlogits (N, n_vocab) = (may alias logits) or NULL for the loss only.
    void (*xent_fused)(void *ctx, float *losses, void *dlogits, const void *logits, const int *targets,
                       float dloss, int N, int n_vocab, int vocab_size);

    // ---- reductions and elementwise helpers (fp32)
    // *out (1 float, backend memory) = sum of x (n)
    void (*sum)(void *ctx, float *out, const float *x, size_t n);
    // *out (1 float, backend memory) += sum of x[i]^2 (accumulated in at least fp32 per call)
    void (*sumsq_acc)(void *ctx, float *out, const float *x, size_t n);
    // out (2) = sum of x[i]^2 over the segments of norm_group 0 and 1, in one pass over x; the
    // segments lie in [0, n), in order, and need not cover it (elements in none are skipped)
    void (*segments_sumsq)(void *ctx, float *out, const float *x, const struct param_segment *segs,
                           int n_segs, size_t n);
    // x (n) *= s
    void (*scale)(void *ctx, float *x, float s, size_t n);

    // ---- optimiser: AdamW with decoupled weight decay over all parameters in one pass
    void (*adamw)(void *ctx, const struct adamw_step *s);

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

// The CPU reference backend (src/backend_cpu.c). Uses OpenMP threads when built with it. With
// TP_DTYPE_BF16 it stores compute tensors in bf16, computes in fp32 and rounds every op's outputs
// to bf16, so the mixed-precision path of the model can be tested without a GPU.
struct backend backend_cpu_create(enum tp_dtype dtype);

// The CUDA backend (cuda/), present when built with -Dcuda=enabled/auto and the toolkit found.
// device: CUDA device ordinal. Returns false with a message in err when no usable GPU exists.
bool backend_cuda_available(void);
int backend_cuda_device_count(void);
// dtype: TP_DTYPE_F32 (the reference path: cuBLAS SGEMM, TF32 off) or TP_DTYPE_BF16 (the fast path:
// cuBLASLt bf16 products with fused epilogues, fused flash attention).
bool backend_cuda_create(struct backend *out, int device, enum tp_dtype dtype, char *err,
                         size_t errlen);

static inline void backend_destroy(struct backend *be) {
    if (be->iface && be->iface->destroy) be->iface->destroy(be->ctx);
    be->iface = NULL;
    be->ctx = NULL;
}
