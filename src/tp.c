// tp.c: the tensor-parallel vocabulary (tp.h): mappings, parallel layers, cross-entropy.
//
// Sections: helpers, mappings, layers, cross-entropy, the LM head fused with it. Collectives are
// issued by the mappings and by the cross-entropy (its two all-reduces of per-token statistics),
// nowhere else.
#include "tp.h"

#include <stdlib.h>

#include "common.h"

// ---- helpers

static enum tp_dtype compute_dtype(struct backend be) { return be.iface->dtype(be.ctx); }

static enum comm_dtype comm_dtype_of(struct backend be) {
    return compute_dtype(be) == TP_DTYPE_BF16 ? COMM_BF16 : COMM_F32;
}

static size_t elem_size(struct backend be) { return tp_dtype_size(compute_dtype(be)); }

// out (P * n) = every rank's in (n), rank order; a group of one copies.
static void all_gather(struct backend be, struct comm *tp, void *out, const void *in, size_t n) {
    if (tp->size > 1) tp->iface->all_gather(tp->ctx, out, in, n, comm_dtype_of(be));
    else if (out != in) be.iface->copy(be.ctx, out, in, n * elem_size(be));
}

// out (n) = this rank's block of the sum over ranks of in (P * n); a group of one copies.
static void reduce_scatter(struct backend be, struct comm *tp, void *out, const void *in, size_t n) {
    if (tp->size > 1) tp->iface->reduce_scatter(tp->ctx, out, in, n, comm_dtype_of(be), COMM_SUM);
    else if (out != in) be.iface->copy(be.ctx, out, in, n * elem_size(be));
}

static size_t shard_rows(const struct comm *tp, size_t rows) {
    if (rows % (size_t)tp->size)
        tp_die(TP_EXIT_RUNTIME, "sequence parallelism: %zu token rows do not split over %d ranks", rows, tp->size);
    return rows / (size_t)tp->size;
}

// The nonblocking forms of all_gather and reduce_scatter: the buffers are the comm's until
// comm_wait(tp); a group of one copies at once.
static void all_gather_start(struct backend be, struct comm *tp, void *out, const void *in, size_t n) {
    if (tp->size > 1) comm_all_gather_start(tp, out, in, n, comm_dtype_of(be));
    else if (out != in) be.iface->copy(be.ctx, out, in, n * elem_size(be));
}

static void reduce_scatter_start(struct backend be, struct comm *tp, void *out, const void *in, size_t n) {
    if (tp->size > 1) comm_reduce_scatter_start(tp, out, in, n, comm_dtype_of(be), COMM_SUM);
    else if (out != in) be.iface->copy(be.ctx, out, in, n * elem_size(be));
}

// Sequence parallelism splits N token rows into P blocks of S, block r on rank r. While the other
// blocks are being gathered, a product that works row by row can already run on this rank's own
// block; the others follow in at most two runs of rows, [0, r*S) and [(r+1)*S, N).
struct row_runs {
    size_t first[3], count[3]; // [0]: this rank's block; [1], [2]: the rows before and after it
};

static struct row_runs row_runs_of(const struct comm *tp, size_t N) {
    size_t S = shard_rows(tp, N), r = (size_t)tp->rank;
    return (struct row_runs){.first = {r * S, 0, (r + 1) * S}, .count = {S, r * S, N - (r + 1) * S}};
}

static void *rows_at(struct backend be, const void *base, size_t row, size_t width) {
    return base ? (char *)base + row * width * elem_size(be) : NULL;
}

// ---- mappings

// f forward: the input is already replicated on every rank of the group.
void copy_to_tp_region_fwd(struct backend be, struct comm *tp, void *x, size_t n) {
    (void)be, (void)tp, (void)x, (void)n;
}

// f backward: each rank holds the gradient through its own shard only; sum them.
void copy_to_tp_region_bwd(struct backend be, struct comm *tp, void *dx, size_t n) {
    comm_all_reduce_compute(tp, dx, n, compute_dtype(be), COMM_SUM);
}

// g forward: row-parallel partial products are summed across the group.
void reduce_from_tp_region_fwd(struct backend be, struct comm *tp, void *x, size_t n) {
    comm_all_reduce_compute(tp, x, n, compute_dtype(be), COMM_SUM);
}

// g backward: the output gradient is replicated, so every shard's input gets it unchanged.
void reduce_from_tp_region_bwd(struct backend be, struct comm *tp, void *dx, size_t n) {
    (void)be, (void)tp, (void)dx, (void)n;
}

void gather_from_tp_region_fwd(struct backend be, struct comm *tp, void *out, const void *in, size_t N,
                               size_t cols) {
    if (N == 1 || tp->size == 1) { // rank blocks are already the column blocks
        all_gather(be, tp, out, in, N * cols);
        return;
    }
    // The all-gather stacks (P, N, cols); each row takes its P column blocks from it.
    size_t es = elem_size(be), P = (size_t)tp->size, block = cols * es;
    char *stacked = be.iface->alloc(be.ctx, P * N * block);
    all_gather(be, tp, stacked, in, N * cols);
    for (size_t q = 0; q < P; q++)
        for (size_t i = 0; i < N; i++)
            be.iface->copy(be.ctx, (char *)out + (i * P + q) * block, stacked + (q * N + i) * block, block);
    be.iface->free(be.ctx, stacked);
}

void gather_from_sequence_parallel_region_fwd(struct backend be, struct comm *tp, void *out, const void *in,
                                              size_t rows, size_t width) {
    all_gather(be, tp, out, in, shard_rows(tp, rows) * width);
}

void gather_from_sequence_parallel_region_bwd(struct backend be, struct comm *tp, void *din, const void *dout,
                                              size_t rows, size_t width) {
    reduce_scatter(be, tp, din, dout, shard_rows(tp, rows) * width);
}

void scatter_to_sequence_parallel_region_fwd(struct backend be, struct comm *tp, void *out, const void *in,
                                             size_t rows, size_t width) {
    size_t bytes = shard_rows(tp, rows) * width * elem_size(be);
    be.iface->copy(be.ctx, out, (const char *)in + (size_t)tp->rank * bytes, bytes);
}

void scatter_to_sequence_parallel_region_bwd(struct backend be, struct comm *tp, void *din, const void *dout,
                                             size_t rows, size_t width) {
    all_gather(be, tp, din, dout, shard_rows(tp, rows) * width);
}

void reduce_scatter_to_sequence_parallel_region_fwd(struct backend be, struct comm *tp, void *out,
                                                    const void *in, size_t rows, size_t width) {
    reduce_scatter(be, tp, out, in, shard_rows(tp, rows) * width);
}

void reduce_scatter_to_sequence_parallel_region_bwd(struct backend be, struct comm *tp, void *din,
                                                    const void *dout, size_t rows, size_t width) {
    all_gather(be, tp, din, dout, shard_rows(tp, rows) * width);
}

// ---- layers

void column_parallel_linear_fwd(struct backend be, struct comm *tp, void *out, void *pre_gelu, void *in,
                                const void *w, const void *bias, int N, int IC, int OCl,
                                const struct tp_sequence_parallel *sp) {
    const struct backend_i *b = be.iface;
    if (!sp) {
        copy_to_tp_region_fwd(be, tp, in, (size_t)N * (size_t)IC);
        b->matmul_fwd(be.ctx, out, pre_gelu, in, w, bias, N, IC, OCl);
        return;
    }
    // The all-gather of the input rows runs while this rank's own rows go through the product.
    struct row_runs rr = row_runs_of(tp, (size_t)N);
    all_gather_start(be, tp, sp->rows, in, rr.count[0] * (size_t)IC);
    for (int i = 0; i < 3; i++) {
        if (i == 1) comm_wait(tp);
        if (rr.count[i] == 0) continue;
        const void *x = i == 0 ? in : rows_at(be, sp->rows, rr.first[i], (size_t)IC);
        b->matmul_fwd(be.ctx, rows_at(be, out, rr.first[i], (size_t)OCl), rows_at(be, pre_gelu, rr.first[i], (size_t)OCl),
                      x, w, bias, (int)rr.count[i], IC, OCl);
    }
}

void column_parallel_linear_bwd(struct backend be, struct comm *tp, void *din, float *dw, float *dbias,
                                const void *dout, const void *in, const void *w, int N, int IC, int OCl,
                                const struct tp_sequence_parallel *sp) {
    if (!sp) {
        be.iface->matmul_bwd(be.ctx, din, NULL, dw, dbias, dout, in, w, NULL, N, IC, OCl);
        copy_to_tp_region_bwd(be, tp, din, (size_t)N * (size_t)IC);
        return;
    }
    // The forward kept only this rank's rows of the input: they are gathered again for dw while
    // the input gradient (dout and w only) is computed, and that gradient is reduce-scattered
    // while dw is.
    size_t shard = shard_rows(tp, (size_t)N) * (size_t)IC;
    all_gather_start(be, tp, sp->rows, in, shard);
    if (din) be.iface->matmul_bwd(be.ctx, sp->drows, NULL, NULL, NULL, dout, NULL, w, NULL, N, IC, OCl);
    comm_wait(tp);
    if (din) reduce_scatter_start(be, tp, din, sp->drows, shard);
    be.iface->matmul_bwd(be.ctx, NULL, NULL, dw, dbias, dout, sp->rows, w, NULL, N, IC, OCl);
    comm_wait(tp);
}

void row_parallel_linear_fwd(struct backend be, struct comm *tp, void *partial, const void *in, const void *w,
                             const void *bias, int N, int ICl, int OC, const struct row_parallel_out *o,
                             const struct tp_sequence_parallel *sp) {
    const struct backend_i *b = be.iface;
    b->matmul_fwd(be.ctx, partial, NULL, in, w, NULL, N, ICl, OC);
    const void *sum = partial; // (R, OC) the reduced rows this rank goes on with
    int R = N;
    if (sp) {
        reduce_scatter_to_sequence_parallel_region_fwd(be, tp, sp->rows, partial, (size_t)N, (size_t)OC);
        sum = sp->rows;
        R = N / tp->size;
    } else {
        reduce_from_tp_region_fwd(be, tp, partial, (size_t)N * (size_t)OC);
    }
    if (o->ln)
        b->residual_layernorm_fwd(be.ctx, o->out, o->ln, o->mean, o->rstd, o->res, sum, bias, o->ln_w, o->ln_b,
                                  R, OC);
    else
        b->residual_fwd(be.ctx, o->out, o->res, sum, bias, R, OC);
}

void row_parallel_linear_bwd(struct backend be, struct comm *tp, void *din, float *din_sum, float *dw, float *dbias,
                             void *dout, const void *in, const void *w, const void *pre_gelu, int N, int ICl,
                             int OC, const struct tp_sequence_parallel *sp) {
    const struct backend_i *b = be.iface;
    if (!sp) {
        reduce_from_tp_region_bwd(be, tp, dout, (size_t)N * (size_t)OC);
        b->matmul_bwd(be.ctx, din, din_sum, dw, dbias, dout, in, w, pre_gelu, N, ICl, OC);
        return;
    }
    // The all-gather of the output gradient runs while this rank's own rows of the input gradient
    // are computed from its own rows of dout; the weight gradient needs every row.
    struct row_runs rr = row_runs_of(tp, (size_t)N);
    all_gather_start(be, tp, sp->rows, dout, rr.count[0] * (size_t)OC);
    for (int i = 0; din && i < 3; i++) {
        if (i == 1) comm_wait(tp);
        if (rr.count[i] == 0) continue;
        const void *d = i == 0 ? dout : rows_at(be, sp->rows, rr.first[i], (size_t)OC);
        b->matmul_bwd(be.ctx, rows_at(be, din, rr.first[i], (size_t)ICl), din_sum, NULL, NULL, d, NULL, w,
                      rows_at(be, pre_gelu, rr.first[i], (size_t)ICl), (int)rr.count[i], ICl, OC);
    }
    comm_wait(tp);
    b->matmul_bwd(be.ctx, NULL, NULL, dw, dbias, sp->rows, in, w, NULL, N, ICl, OC);
}

// x (rows, C) += the position embeddings of token rows [first, first + rows) of the flattened
// (B, T) batch, i.e. of positions (first + i) mod T: a sequence-parallel block may start and end
// inside a sequence, so it is added as a head, whole sequences and a tail.
static void add_positions(struct backend be, void *x, const void *wpe, size_t first, size_t rows, int T, int C) {
    size_t es = elem_size(be), row = (size_t)C * es, Ts = (size_t)T;
    char *xp = x;
    const char *wp = wpe;
    while (rows > 0) {
        size_t pos = first % Ts, n;
        if (pos == 0 && rows >= Ts) {
            size_t seqs = rows / Ts;
            be.iface->position_embedding_fwd(be.ctx, xp, wpe, (int)seqs, T, C);
            n = seqs * Ts;
        } else {
            n = Ts - pos < rows ? Ts - pos : rows;
            be.iface->position_embedding_fwd(be.ctx, xp, wp + pos * row, 1, (int)n, C);
        }
        xp += n * row;
        first += n;
        rows -= n;
    }
}

void vocab_parallel_embedding_fwd(struct backend be, struct comm *tp, void *out, const int *tokens,
                                  const void *wte, const void *wpe, int B, int T, int C, int Vl,
                                  const struct tp_sequence_parallel *sp) {
    size_t N = (size_t)B * (size_t)T;
    if (!sp) {
        be.iface->vocab_embedding_fwd(be.ctx, out, tokens, wte, (int)N, C, tp->rank * Vl, Vl);
        reduce_from_tp_region_fwd(be, tp, out, N * (size_t)C);
        be.iface->position_embedding_fwd(be.ctx, out, wpe, B, T, C);
        return;
    }
    be.iface->vocab_embedding_fwd(be.ctx, sp->rows, tokens, wte, (int)N, C, tp->rank * Vl, Vl);
    reduce_scatter_to_sequence_parallel_region_fwd(be, tp, out, sp->rows, N, (size_t)C);
    size_t rows = shard_rows(tp, N);
    add_positions(be, out, wpe, (size_t)tp->rank * rows, rows, T, C);
}

void vocab_parallel_embedding_bwd(struct backend be, struct comm *tp, float *dwte, float *dwpe, const void *dout,
                                  const int *tokens, int B, int T, int C, int Vl,
                                  const struct tp_sequence_parallel *sp) {
    const void *d = dout; // (B*T, C) every token row's gradient
    if (sp) {
        reduce_scatter_to_sequence_parallel_region_bwd(be, tp, sp->rows, dout, (size_t)B * (size_t)T, (size_t)C);
        d = sp->rows;
    }
    be.iface->position_embedding_bwd(be.ctx, dwpe, d, B, T, C);
    be.iface->vocab_embedding_bwd(be.ctx, dwte, d, tokens, B * T, C, tp->rank * Vl, Vl);
}

// ---- cross-entropy

void vocab_parallel_cross_entropy_fwd(struct backend be, struct comm *tp, const struct vocab_parallel_xent *x,
                                      const void *logits, const int *targets, int N, int Vl, int V) {
    const struct backend_i *b = be.iface;
    b->xent_stats(be.ctx, x->maxes, x->sums, logits, targets, N, tp->rank * Vl, Vl, V);
    if (tp->size > 1) {
        b->copy(be.ctx, x->local_maxes, x->maxes, (size_t)N * sizeof(float));
        comm_all_reduce(tp, x->maxes, (size_t)N, COMM_MAX);
        b->xent_rescale(be.ctx, x->sums, x->local_maxes, x->maxes, N);
        comm_all_reduce(tp, x->sums, 2 * (size_t)N, COMM_SUM);
    }
    b->xent_loss(be.ctx, x->losses, x->maxes, x->sums, N);
}

void vocab_parallel_cross_entropy_bwd(struct backend be, struct comm *tp, void *dlogits,
                                      const struct vocab_parallel_xent *x, const void *logits,
                                      const int *targets, float dloss, int N, int Vl, int V) {
    be.iface->xent_bwd(be.ctx, dlogits, logits, x->maxes, x->sums, targets, dloss, N, tp->rank * Vl, Vl, V);
}

void vocab_parallel_cross_entropy_fwd_bwd(struct backend be, struct comm *tp, const struct vocab_parallel_xent *x,
                                          void *dlogits, const void *logits, const int *targets, float dloss,
                                          int N, int Vl, int V) {
    if (tp->size == 1 && be.iface->xent_fused) { // no all-reduce between the phases: one pass
        be.iface->xent_fused(be.ctx, x->losses, dlogits, logits, targets, dloss, N, Vl, V);
        return;
    }
    vocab_parallel_cross_entropy_fwd(be, tp, x, logits, targets, N, Vl, V);
    if (dlogits) vocab_parallel_cross_entropy_bwd(be, tp, dlogits, x, logits, targets, dloss, N, Vl, V);
}

// ---- the LM head fused with the cross-entropy

int vocab_parallel_head_chunks(int N, int rows) { return rows > 0 ? (N + rows - 1) / rows : 0; }

void vocab_parallel_lm_head_cross_entropy(struct backend be, struct comm *tp, const struct vocab_parallel_head *h,
                                          const struct tp_sequence_parallel *sp) {
    size_t es = elem_size(be), C = (size_t)h->C, N = (size_t)h->N;
    bool grad = h->din != NULL;
    if (h->rows <= 0) tp_die(TP_EXIT_RUNTIME, "LM head: %d token rows per chunk (must be positive)", h->rows);
    const void *x = h->in; // (N, C) every token row
    void *dx = h->din;     // (N, C) their gradient
    if (sp) {              // gathered once for all chunks, forward and backward alike
        gather_from_sequence_parallel_region_fwd(be, tp, sp->rows, h->in, N, C);
        x = sp->rows;
        dx = sp->drows;
    }
    for (int r0 = 0; r0 < h->N; r0 += h->rows) {
        int n = h->N - r0 < h->rows ? h->N - r0 : h->rows;
        void *in = (char *)x + (size_t)r0 * C * es; // (n, C) this chunk's rows
        struct vocab_parallel_xent xs = {.maxes = h->maxes, .sums = h->sums, .local_maxes = h->local_maxes,
                                         .losses = h->losses + r0};
        // the input is already every rank's (f's forward is the identity): no scratch needed
        column_parallel_linear_fwd(be, tp, h->logits, NULL, in, h->w, NULL, n, h->C, h->Vl, NULL);
        vocab_parallel_cross_entropy_fwd_bwd(be, tp, &xs, grad ? h->logits : NULL, h->logits, h->targets + r0,
                                             h->dloss, n, h->Vl, h->V);
        // column_parallel_linear_bwd without its f: every chunk's rows are reduced together below
        if (grad)
            be.iface->matmul_bwd(be.ctx, (char *)dx + (size_t)r0 * C * es, NULL, h->dw, NULL, h->logits, in, h->w,
                                 NULL, n, h->C, h->Vl);
    }
    if (!grad) return;
    if (sp) gather_from_sequence_parallel_region_bwd(be, tp, h->din, dx, N, C);
    else copy_to_tp_region_bwd(be, tp, h->din, N * C);
}
