// tp.h: the tensor-parallel vocabulary, Megatron's tensor_parallel package in C.
//
// Three layers, each built only on the one below, so a reader counts the collectives of a layer
// by reading it:
//   mappings       the only places a TP collective is issued (forward and backward of each)
//   layers         column_parallel_linear, row_parallel_linear, vocab_parallel_embedding
//   cross-entropy  vocab_parallel_cross_entropy, and the LM head fused with it
//                  (vocab_parallel_lm_head_cross_entropy)
// The model (model.c), the KV-cache decoder (eval.c) and `--bench layer` all call these; no one
// else issues a TP collective. The group's size and this rank's place in it are tp->size and
// tp->rank (the comm), nowhere else.
//
// Every tensor is backend memory in the backend's compute type (fp32 or bf16) unless it is a
// float *, which is fp32. Row counts N are tokens (B*T flattened).
//
// Sequence-parallel layout. Between TP regions, sequence parallelism shards the activations
// (N, C), N = B*T, along the flattened token rows: rank r holds rows [r*N/P, (r+1)*N/P), one
// contiguous block. With B = 1 that is exactly a shard of T; with B > 1 it is a shard of (B*T)
// rather than of T inside each sequence. Everything run on the shard between the regions
// (layernorm, residual, bias, dropout) is per token, so it does not care which tokens a rank
// holds, and a plain all-gather / reduce-scatter of contiguous blocks is the whole collective:
// no permutation, no staging copy. (A shard of T per sequence would interleave B blocks per rank
// and need a permute around each collective.) P must divide N.
#pragma once

#include <stdbool.h>
#include <stddef.h>

#include "backend.h"
#include "comm.h"

// ---- mappings
// f: identity forward, all-reduce of the input gradient backward (replicated input entering a
// column-parallel region)
void copy_to_tp_region_fwd(struct backend be, struct comm *tp, void *x, size_t n);
void copy_to_tp_region_bwd(struct backend be, struct comm *tp, void *dx, size_t n);
// g: all-reduce forward (partial sums leaving a row-parallel region), identity backward
void reduce_from_tp_region_fwd(struct backend be, struct comm *tp, void *x, size_t n);
void reduce_from_tp_region_bwd(struct backend be, struct comm *tp, void *dx, size_t n);
// Gathers the last dim: out (N, P*cols) from every rank's in (N, cols), rank r's columns at
// [r*cols, (r+1)*cols). Forward only (the decoder's logits); N = 1 needs no reordering.
void gather_from_tp_region_fwd(struct backend be, struct comm *tp, void *out, const void *in, size_t N,
                               size_t cols);
// Sequence parallelism (layout above): rows = N, width = C; a shard is (N/P, C).
// all-gather forward: out (N, C) from every rank's in (N/P, C); backward: reduce-scatter
void gather_from_sequence_parallel_region_fwd(struct backend be, struct comm *tp, void *out, const void *in,
                                              size_t rows, size_t width);
void gather_from_sequence_parallel_region_bwd(struct backend be, struct comm *tp, void *din, const void *dout,
                                              size_t rows, size_t width);
// this rank's block forward: out (N/P, C) = rows [r*N/P, (r+1)*N/P) of in (N, C); backward: all-gather
void scatter_to_sequence_parallel_region_fwd(struct backend be, struct comm *tp, void *out, const void *in,
                                             size_t rows, size_t width);
void scatter_to_sequence_parallel_region_bwd(struct backend be, struct comm *tp, void *din, const void *dout,
                                             size_t rows, size_t width);
// reduce-scatter forward: out (N/P, C) = this rank's block of the sum over ranks of in (N, C);
// backward: all-gather
void reduce_scatter_to_sequence_parallel_region_fwd(struct backend be, struct comm *tp, void *out,
                                                    const void *in, size_t rows, size_t width);
void reduce_scatter_to_sequence_parallel_region_bwd(struct backend be, struct comm *tp, void *din,
                                                    const void *dout, size_t rows, size_t width);

// ---- layers

// Sequence parallelism of a layer (Megatron's sequence_parallel flag; layout at the top). A layer
// called with NULL is plain TP. Otherwise the replicated side of the layer is sharded along the
// token rows, so the mappings change and the bytes on the wire stay those of f and g:
//   column-parallel: the input arrives as this rank's (N/P, IC) rows and is all-gathered (in
//     place of f forward); backward all-gathers it again (the shard is all that was kept) and
//     reduce-scatters the input gradient back to (N/P, IC) (in place of f backward);
//   row-parallel: the output is reduce-scattered to (N/P, OC) rows (in place of g forward) and
//     their gradient all-gathered (backward).
// Only scratch lives here; every layer leaves it free for the next.
struct tp_sequence_parallel {
    void *rows;   // (N, max(IC, OC)) all-gathered rows, or a row-parallel output's reduced block
    void *drows;  // (N, IC) a column-parallel input gradient over all rows, before its reduce-scatter
};

// Column-parallel linear: replicated input, output sharded along features; f in front of it.
// out (N, OCl) = in (N, IC) @ w (OCl, IC)^T + bias (OCl, or NULL). With pre_gelu (N, OCl)
// non-NULL the GELU is fused: pre_gelu keeps the product, out = gelu(pre_gelu).
// With sp, in is this rank's (N/P, IC) rows. Collectives: none forward; with sp 1 all-gather of
// N*IC, started before this rank's own rows go through the product and waited for before the
// other rows do.
void column_parallel_linear_fwd(struct backend be, struct comm *tp, void *out, void *pre_gelu, void *in,
                                const void *w, const void *bias, int N, int IC, int OCl,
                                const struct tp_sequence_parallel *sp);
// din (N, IC) = sum over ranks of dout @ w; dw (OCl, IC) +=, dbias (OCl, or NULL) +=.
// With sp, in and din are this rank's (N/P, IC) rows.
// Collectives: 1 all-reduce (f backward) of N*IC; with sp 1 all-gather (the input again) and
// 1 reduce-scatter (din) of N*IC, the first overlapped with the product for din, the second with
// the one for dw (Megatron-LM's order).
void column_parallel_linear_bwd(struct backend be, struct comm *tp, void *din, float *dw, float *dbias,
                                const void *dout, const void *in, const void *w, int N, int IC, int OCl,
                                const struct tp_sequence_parallel *sp);

// What follows the reduction of a row-parallel linear, fused into one pass: the bias, added
// once (before the reduction it would count P times), the residual, and optionally the next
// layernorm (ln non-NULL). R rows: N, or this rank's N/P with sequence parallelism.
struct row_parallel_out {
    void *out;                  // (R, OC) = res + sum over ranks of the partial products + bias
    const void *res;            // (R, OC) residual stream; may alias out
    void *ln;                   // (R, OC) layernorm(out), or NULL for none
    float *mean, *rstd;         // (R) its statistics
    const void *ln_w, *ln_b;    // (OC)
};

// Row-parallel linear: input sharded along features (this rank's ICl), g after the product.
// partial (N, OC) = in (N, ICl) @ w (OC, ICl)^T, reduced in place (with sp: reduce-scattered into
// sp->rows), then *o as above.
// Collectives: 1 all-reduce (g forward) of N*OC; with sp 1 reduce-scatter of N*OC instead.
void row_parallel_linear_fwd(struct backend be, struct comm *tp, void *partial, const void *in, const void *w,
                             const void *bias, int N, int ICl, int OC, const struct row_parallel_out *o,
                             const struct tp_sequence_parallel *sp);
// dout (N, OC) is replicated (g backward is the identity); with sp it is this rank's (N/P, OC)
// rows, all-gathered first. Either way the product sees every row, so the bias gradient is
// identical on every rank. din (N, ICl) = dout @ w, times gelu'(pre_gelu) when pre_gelu is
// non-NULL (the GELU in front of the layer is local to the shard); din_sum (ICl) += din's column
// sums as stored (NULL: skipped), which with the GELU in front is the bias gradient of the
// column-parallel layer before it (its shard), summed where din is made; dw (OC, ICl) +=, dbias (OC) +=.
// Collectives: none; with sp 1 all-gather of N*OC, overlapped with this rank's own rows of din.
void row_parallel_linear_bwd(struct backend be, struct comm *tp, void *din, float *din_sum, float *dw, float *dbias,
                             void *dout, const void *in, const void *w, const void *pre_gelu, int N, int ICl,
                             int OC, const struct tp_sequence_parallel *sp);

// Vocab-parallel embedding: this rank holds rows [tp->rank*Vl, (tp->rank+1)*Vl) of wte (Vl, C).
// out (B*T, C) = wte[tokens] (each rank contributes its rows, zeros elsewhere, summed by g) +
// wpe (T, C) added once, after the reduction. With sp the lookup lands in sp->rows, the sum is
// reduce-scattered and out is this rank's (B*T/P, C) rows, positions added to those rows.
// Collectives: 1 all-reduce (g forward) of B*T*C; with sp 1 reduce-scatter instead.
void vocab_parallel_embedding_fwd(struct backend be, struct comm *tp, void *out, const int *tokens,
                                  const void *wte, const void *wpe, int B, int T, int C, int Vl,
                                  const struct tp_sequence_parallel *sp);
// dwte (Vl, C) += rows of dout whose token is this rank's; dwpe (T, C) +=. The forward summed
// disjoint rows, so its backward is the identity. With sp, dout is this rank's (B*T/P, C) rows,
// all-gathered into sp->rows first: both gradients then see every token, and dwpe is the same
// on every rank. Collectives: none; with sp 1 all-gather of B*T*C.
void vocab_parallel_embedding_bwd(struct backend be, struct comm *tp, float *dwte, float *dwpe, const void *dout,
                                  const int *tokens, int B, int T, int C, int Vl,
                                  const struct tp_sequence_parallel *sp);

// ---- cross-entropy

// Statistics of vocab_parallel_cross_entropy, fp32 backend memory.
struct vocab_parallel_xent {
    float *maxes;               // (N) max logit per token over the whole vocabulary
    float *sums;                // (2, N) sum of exp(logit - max), target logit
    float *local_maxes;         // (N) this rank's maxes before the all-reduce
    float *losses;              // (N) per-token loss, identical on every rank
};

// logits (N, Vl) are this rank's vocabulary columns; V is the real (unpadded) vocabulary, the
// padding columns are excluded. Each rank reads its logits once (online softmax statistics),
// then its sums are moved onto the global max.
// Collectives: 2 all-reduces, MAX of N and SUM of 2N (sum-exp and target logit packed).
void vocab_parallel_cross_entropy_fwd(struct backend be, struct comm *tp, const struct vocab_parallel_xent *x,
                                      const void *logits, const int *targets, int N, int Vl, int V);
// dlogits (N, Vl) = (softmax - onehot) * dloss on the local columns; may alias logits.
// Collectives: none.
void vocab_parallel_cross_entropy_bwd(struct backend be, struct comm *tp, void *dlogits,
                                      const struct vocab_parallel_xent *x, const void *logits,
                                      const int *targets, float dloss, int N, int Vl, int V);
// The forward, then with dlogits non-NULL the backward, in one call. At one rank, with the
// backend's xent_fused, that is one op that reads the logits once, with the same results bit for
// bit (x's statistics are then not written; the losses are). Collectives: as the forward.
void vocab_parallel_cross_entropy_fwd_bwd(struct backend be, struct comm *tp, const struct vocab_parallel_xent *x,
                                          void *dlogits, const void *logits, const int *targets, float dloss,
                                          int N, int Vl, int V);

// ---- the LM head fused with the cross-entropy

// The LM head (a column-parallel linear over the vocabulary whose weight is this rank's rows of the
// tied embedding) and vocab_parallel_cross_entropy, chunked over the token rows so that the (N, Vl)
// logits never exist at once. Per chunk of at most `rows` tokens: logits (rows, Vl) = in @ w^T,
// the cross-entropy's statistics and the chunk's losses, and with a gradient the chunk's dlogits
// (in place), its rows of din = dlogits @ w and dw += dlogits^T @ in. The chunks' input
// gradients are summed over the group once, after the last chunk (f backward).
// With sp, in and din are this rank's (N/P, C) rows: in is all-gathered into sp->rows once, before
// the first chunk, the chunks run over all N gathered rows with their input gradient in
// sp->drows, and that is reduce-scattered into din after the last one (in place of f backward).
// Per token row the results are those of the unchunked layers bit for bit (losses, din); dw adds
// one partial product per chunk, so with more than one chunk its summation order differs.
struct vocab_parallel_head {
    const void *in;             // (N, C) replicated input (ln_f's output); with sp (N/P, C)
    const void *w;              // (Vl, C) this rank's vocabulary rows of wte
    const int *targets;         // (N)
    float *losses;              // (N) = per-token loss, identical on every rank
    void *din;                  // (N, C) = input gradient, or NULL: the loss only; with sp (N/P, C)
    float *dw;                  // (Vl, C) += weight gradient (with din)
    float dloss;                // weight of each token's loss in the objective (with din)
    void *logits;               // (rows, Vl) scratch: a chunk's logits, then its dlogits
    float *maxes, *local_maxes; // (rows), (rows) scratch: a chunk's statistics
    float *sums;                // (2, rows) scratch
    int N, C, Vl, V, rows;
};
// Collectives: the cross-entropy's 2 all-reduces per chunk, on the chunk's rows (MAX of n, SUM of
// 2n): 2 * vocab_parallel_head_chunks(N, rows) in all, more and smaller ones than the unchunked
// head's 2 (of N and 2N); with the gradient 1 more, of N*C (f backward). With sp 1 all-gather of
// N*C first, and the gradient's reduce-scatter of N*C in place of f backward.
void vocab_parallel_lm_head_cross_entropy(struct backend be, struct comm *tp, const struct vocab_parallel_head *h,
                                          const struct tp_sequence_parallel *sp);
// Chunks of the fused head over N token rows: ceil(N / rows).
int vocab_parallel_head_chunks(int N, int rows);
