// tp_ranks.c: an MPI program that checks tp.h on the CPU backend with every rank of
// MPI_COMM_WORLD as one TP group. test_tp.c launches it under mpiexec with several rank counts
// (Criterion forks its tests, which MPI does not survive, so the ranks run here).
//
// The mappings are checked exactly: inputs are small integers, so every sum is exact in fp32.
// The layers are checked against the same layer on a group of one (MPI_COMM_SELF) holding the
// whole weights. Prints one "ok NAME" line per check on rank 0, or "FAIL NAME: ..." and exits 1.
#include <math.h>
#include <mpi.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "comm.h"
#include "tp.h"

static int rank, P, failures;
static struct backend be;

static float *dev(size_t n) { return be.iface->alloc(be.ctx, (n ? n : 1) * sizeof(float)); }
static void put(float *d, const float *h, size_t n) { be.iface->copy_to_device(be.ctx, d, h, n * sizeof(float)); }
static void get(float *h, const float *d, size_t n) { be.iface->copy_to_host(be.ctx, h, d, n * sizeof(float)); }

// Every rank reports its verdict; rank 0 prints one line for all.
static void verdict(const char *name, int bad, const char *detail) {
    int any = 0;
    MPI_Allreduce(&bad, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    if (any) failures++;
    if (bad) printf("FAIL %s (rank %d of %d): %s\n", name, rank, P, detail);
    else if (rank == 0 && !any) printf("ok %s\n", name);
    fflush(stdout);
}

// Compares n floats exactly (tol 0) or to a relative tolerance.
static int differ(const float *got, const float *want, size_t n, float tol, char *detail, size_t len) {
    for (size_t i = 0; i < n; i++) {
        float scale = fabsf(want[i]) > 1.0f ? fabsf(want[i]) : 1.0f;
        if (!(fabsf(got[i] - want[i]) <= tol * scale)) {
            snprintf(detail, len, "element %zu is %.9g, want %.9g", i, got[i], want[i]);
            return 1;
        }
    }
    return 0;
}

// Token row i, column j, on rank r: small integers (exact sums over any number of ranks).
static float val(size_t i, size_t j, int r) { return (float)((i * 7 + j * 3 + (size_t)r * 5) % 13) - 6.0f; }

// ---- mappings

static void check_mappings(struct comm *tp) {
    enum { ROWS_PER_RANK = 3, W = 5 };
    size_t N = (size_t)ROWS_PER_RANK * (size_t)P, n = N * W, shard = ROWS_PER_RANK * W;
    float *h = malloc(n * sizeof(float)), *want = malloc(n * sizeof(float)), *got = malloc(n * sizeof(float));
    float *full = dev(n);
    char detail[256] = "";

    // f and g: each rank's own (N, W) tensor
    for (size_t i = 0; i < N; i++)
        for (size_t j = 0; j < W; j++) {
            h[i * W + j] = val(i, j, rank);
            want[i * W + j] = 0;
            for (int r = 0; r < P; r++) want[i * W + j] += val(i, j, r);
        }
    put(full, h, n);
    copy_to_tp_region_fwd(be, tp, full, n);
    get(got, full, n);
    verdict("copy_to_tp_region forward is the identity", differ(got, h, n, 0, detail, sizeof detail), detail);
    copy_to_tp_region_bwd(be, tp, full, n);
    get(got, full, n);
    verdict("copy_to_tp_region backward sums over ranks", differ(got, want, n, 0, detail, sizeof detail), detail);
    put(full, h, n);
    reduce_from_tp_region_fwd(be, tp, full, n);
    get(got, full, n);
    verdict("reduce_from_tp_region forward sums over ranks", differ(got, want, n, 0, detail, sizeof detail), detail);
    put(full, h, n);
    reduce_from_tp_region_bwd(be, tp, full, n);
    get(got, full, n);
    verdict("reduce_from_tp_region backward is the identity", differ(got, h, n, 0, detail, sizeof detail), detail);

    // Sequence parallelism: the replicated tensor X (N, W) = val(i, j, 0); rank r's shard is rows
    // [r*N/P, (r+1)*N/P).
    float *x = malloc(n * sizeof(float));
    for (size_t i = 0; i < N; i++)
        for (size_t j = 0; j < W; j++) x[i * W + j] = val(i, j, 0);
    const float *mine = x + (size_t)rank * shard, *want_mine = want + (size_t)rank * shard;
    // Every sequence-parallel mapping maps (in, rows, width) to out: one table row each.
    const struct {
        const char *name;
        void (*fn)(struct backend be, struct comm *tp, void *out, const void *in, size_t rows, size_t width);
        const float *in, *want; // host
        size_t in_n, out_n;
    } cases[] = {
        {"gather_from_sequence_parallel_region forward assembles the rows in rank order",
         gather_from_sequence_parallel_region_fwd, mine, x, shard, n},
        // per-rank gradients: the backward sums them and keeps this rank's rows
        {"gather_from_sequence_parallel_region backward reduce-scatters", gather_from_sequence_parallel_region_bwd, h,
         want_mine, n, shard},
        {"scatter_to_sequence_parallel_region forward keeps this rank's rows", scatter_to_sequence_parallel_region_fwd,
         x, mine, n, shard},
        {"scatter_to_sequence_parallel_region backward all-gathers", scatter_to_sequence_parallel_region_bwd, mine, x,
         shard, n},
        {"reduce_scatter_to_sequence_parallel_region forward sums and keeps this rank's rows",
         reduce_scatter_to_sequence_parallel_region_fwd, h, want_mine, n, shard},
        {"reduce_scatter_to_sequence_parallel_region backward all-gathers",
         reduce_scatter_to_sequence_parallel_region_bwd, mine, x, shard, n},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        float *src = dev(cases[c].in_n), *dst = dev(cases[c].out_n);
        put(src, cases[c].in, cases[c].in_n);
        cases[c].fn(be, tp, dst, src, N, W);
        get(got, dst, cases[c].out_n);
        verdict(cases[c].name, differ(got, cases[c].want, cases[c].out_n, 0, detail, sizeof detail), detail);
        be.iface->free(be.ctx, src);
        be.iface->free(be.ctx, dst);
    }

    // Last-dim gather of (N, W) column blocks into (N, P*W), N > 1: rows are reassembled.
    float *cols = dev(N * W), *wide = dev(N * W * (size_t)P);
    float *hw = malloc(N * W * (size_t)P * sizeof(float)), *gw = malloc(N * W * (size_t)P * sizeof(float));
    for (size_t i = 0; i < N; i++)
        for (size_t j = 0; j < W; j++) {
            h[i * W + j] = val(i, j, rank);
            for (int r = 0; r < P; r++) hw[i * W * (size_t)P + (size_t)r * W + j] = val(i, j, r);
        }
    put(cols, h, N * W);
    gather_from_tp_region_fwd(be, tp, wide, cols, N, W);
    get(gw, wide, N * W * (size_t)P);
    verdict("gather_from_tp_region forward places each rank's columns", differ(gw, hw, N * W * (size_t)P, 0, detail,
                                                                              sizeof detail), detail);
    be.iface->free(be.ctx, cols);
    be.iface->free(be.ctx, wide);
    free(hw);
    free(gw);
    be.iface->free(be.ctx, full);
    free(x);
    free(h);
    free(want);
    free(got);
}

// ---- layers against one rank holding everything

static float *host_rand(size_t n, unsigned seed, float scale) {
    float *h = malloc((n ? n : 1) * sizeof(float));
    unsigned long long s = seed * 0x9E3779B97F4A7C15ull + 7;
    for (size_t i = 0; i < n; i++) {
        s ^= s << 13, s ^= s >> 7, s ^= s << 17;
        h[i] = scale * ((float)((s >> 11) % 2001) / 1000.0f - 1.0f);
    }
    return h;
}

static float *dev_copy(const float *h, size_t n) {
    float *d = dev(n);
    put(d, h, n);
    return d;
}

static float *host_of(const float *d, size_t n) {
    float *h = malloc((n ? n : 1) * sizeof(float));
    get(h, d, n);
    return h;
}

// Rows [r*rows/P, ...) of a (rows, cols) matrix, or columns [r*cols/P, ...) when by_cols.
static float *shard_of(const float *full, size_t rows, size_t cols, bool by_cols) {
    size_t lr = by_cols ? rows : rows / (size_t)P, lc = by_cols ? cols / (size_t)P : cols;
    float *s = malloc(lr * lc * sizeof(float));
    for (size_t i = 0; i < lr; i++)
        for (size_t j = 0; j < lc; j++)
            s[i * lc + j] = by_cols ? full[i * cols + (size_t)rank * lc + j] : full[((size_t)rank * lr + i) * cols + j];
    return s;
}

// The MLP block (column + GELU, row + bias + residual) and its backward, on one rank, on P ranks
// and on P ranks with sequence parallelism (the block's input, output and their gradients as
// each rank's M/P rows).
static void check_linear(struct comm *tp, struct comm *self) {
    enum { M = 12, K = 8, H = 24 }; // M divisible by 1 to 4 ranks
    char detail[256] = "";
    size_t Hl = H / (size_t)P, Ml = M / (size_t)P;
    float *x = host_rand(M * K, 1, 1.0f), *w1 = host_rand(H * K, 2, 0.3f), *b1 = host_rand(H, 3, 0.1f);
    float *w2 = host_rand(K * H, 4, 0.2f), *b2 = host_rand(K, 5, 0.1f), *dy = host_rand(M * K, 6, 1.0f);
    float *w1s = shard_of(w1, H, K, false), *b1s = shard_of(b1, H, 1, false), *w2s = shard_of(w2, K, H, true);
    float *xs = shard_of(x, M, K, false), *dys = shard_of(dy, M, K, false);
    float *res[3][6]; // [whole, parallel, sequence-parallel] x {out, dx, dw1, db1, dw2, db2}
    for (int par = 0; par < 3; par++) {
        struct comm *c = par ? tp : self;
        size_t hl = par ? Hl : H, rows = par == 2 ? Ml : M; // rows of the block's input and output
        struct tp_sequence_parallel seq = {dev(M * H), dev(M * K)};
        const struct tp_sequence_parallel *sp = par == 2 ? &seq : NULL;
        float *dx_ = dev_copy(par == 2 ? xs : x, rows * K), *dw1 = dev(hl * K), *dw2 = dev(K * hl), *db1 = dev(hl);
        float *db2 = dev(K), *W1 = dev_copy(par ? w1s : w1, hl * K), *B1 = dev_copy(par ? b1s : b1, hl);
        float *W2 = dev_copy(par ? w2s : w2, K * hl), *B2 = dev_copy(b2, K), *DY = dev_copy(par == 2 ? dys : dy, rows * K);
        float *h = dev(M * hl), *hg = dev(M * hl), *y = dev(M * K), *out = dev(rows * K), *dh = dev(M * hl);
        float *din = dev(rows * K);
        column_parallel_linear_fwd(be, c, hg, h, dx_, W1, B1, M, K, (int)hl, sp);
        struct row_parallel_out o = {.out = out, .res = dx_};
        row_parallel_linear_fwd(be, c, y, hg, W2, B2, M, (int)hl, K, &o, sp);
        row_parallel_linear_bwd(be, c, dh, NULL, dw2, db2, DY, hg, W2, h, M, (int)hl, K, sp);
        column_parallel_linear_bwd(be, c, din, dw1, db1, dh, dx_, W1, M, K, (int)hl, sp);
        res[par][0] = host_of(out, rows * K);
        res[par][1] = host_of(din, rows * K);
        res[par][2] = host_of(dw1, hl * K);
        res[par][3] = host_of(db1, hl);
        res[par][4] = host_of(dw2, K * hl);
        res[par][5] = host_of(db2, K);
        float *bufs[] = {dx_, dw1, dw2, db1, db2, W1, B1, W2, B2, DY, h, hg, y, out, dh, din, seq.rows, seq.drows};
        for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) be.iface->free(be.ctx, bufs[i]);
    }
    // The parallel gradients of sharded weights are shards of the whole ones.
    float *dw1s = shard_of(res[0][2], H, K, false), *db1s = shard_of(res[0][3], H, 1, false);
    float *dw2s = shard_of(res[0][4], K, H, true);
    float *outs = shard_of(res[0][0], M, K, false), *dins = shard_of(res[0][1], M, K, false);
    const float tol = 1e-5f;
    verdict("row_parallel_linear forward (bias once, after the all-reduce) equals one rank",
            differ(res[1][0], res[0][0], M * K, tol, detail, sizeof detail), detail);
    verdict("column_parallel_linear backward input gradient (all-reduced) equals one rank",
            differ(res[1][1], res[0][1], M * K, tol, detail, sizeof detail), detail);
    verdict("column_parallel_linear weight and bias gradients are shards of one rank's",
            differ(res[1][2], dw1s, Hl * K, tol, detail, sizeof detail) ||
            differ(res[1][3], db1s, Hl, tol, detail, sizeof detail), detail);
    verdict("row_parallel_linear weight gradient is a shard, bias gradient whole",
            differ(res[1][4], dw2s, K * Hl, tol, detail, sizeof detail) ||
            differ(res[1][5], res[0][5], K, tol, detail, sizeof detail), detail);
    verdict("sequence parallel: row_parallel_linear forward (reduce-scattered) gives this rank's rows of one rank's",
            differ(res[2][0], outs, Ml * K, tol, detail, sizeof detail), detail);
    verdict("sequence parallel: column_parallel_linear input gradient (reduce-scattered) is this rank's rows",
            differ(res[2][1], dins, Ml * K, tol, detail, sizeof detail), detail);
    verdict("sequence parallel: weight gradients are shards, the row-parallel bias gradient whole",
            differ(res[2][2], dw1s, Hl * K, tol, detail, sizeof detail) ||
            differ(res[2][3], db1s, Hl, tol, detail, sizeof detail) ||
            differ(res[2][4], dw2s, K * Hl, tol, detail, sizeof detail) ||
            differ(res[2][5], res[0][5], K, tol, detail, sizeof detail), detail);
    for (int par = 0; par < 3; par++)
        for (int i = 0; i < 6; i++) free(res[par][i]);
    float *hs[] = {x, w1, b1, w2, b2, dy, w1s, b1s, w2s, xs, dys, dw1s, db1s, dw2s, outs, dins};
    for (size_t i = 0; i < sizeof hs / sizeof hs[0]; i++) free(hs[i]);
}

// Embedding and cross-entropy over a vocabulary split into P blocks of Vl rows (the last block
// holds padding columns beyond V); the embedding also with sequence parallelism, where a rank's
// rows may start and end inside a sequence (T = 6 at 4 ranks: blocks of 3 rows).
static void check_vocab(struct comm *tp, struct comm *self) {
    enum { B = 2, T = 6, C = 4, VL = 5 };
    char detail[256] = "";
    int N = B * T, Vp = VL * P, V = Vp - 2, Nl = N / P; // two padding rows
    float *wte = host_rand((size_t)Vp * C, 11, 1.0f), *wpe = host_rand(T * C, 12, 1.0f);
    for (int j = V * C; j < Vp * C; j++) wte[j] = 0; // padding rows are zero, as in the model
    float *wtes = shard_of(wte, (size_t)Vp, C, false);
    int tokens[B * T], targets[B * T];
    for (int i = 0; i < N; i++) {
        tokens[i] = (i * 5 + 1) % V;
        targets[i] = (i * 3 + 2) % V;
    }
    float *emb[3], *loss[2], *dlog[2], *dwte[3], *dwpe[3];
    for (int par = 0; par < 3; par++) {
        struct comm *c = par ? tp : self;
        int vl = par ? VL : Vp, rows = par == 2 ? Nl : N;
        struct tp_sequence_parallel seq = {dev((size_t)N * C), NULL};
        const struct tp_sequence_parallel *sp = par == 2 ? &seq : NULL;
        int *tok = be.iface->alloc(be.ctx, sizeof tokens), *tgt = be.iface->alloc(be.ctx, sizeof targets);
        be.iface->copy_to_device(be.ctx, tok, tokens, sizeof tokens);
        be.iface->copy_to_device(be.ctx, tgt, targets, sizeof targets);
        float *WTE = dev_copy(par ? wtes : wte, (size_t)vl * C), *WPE = dev_copy(wpe, T * C);
        float *out = dev((size_t)rows * C), *dw = dev((size_t)vl * C), *dwp = dev(T * C);
        vocab_parallel_embedding_fwd(be, c, out, tok, WTE, WPE, B, T, C, vl, sp);
        emb[par] = host_of(out, (size_t)rows * C);
        vocab_parallel_embedding_bwd(be, c, dw, dwp, out, tok, B, T, C, vl, sp); // dout = the embeddings
        dwte[par] = host_of(dw, (size_t)vl * C);
        dwpe[par] = host_of(dwp, T * C);
        float *bufs[] = {WTE, WPE, out, dw, dwp, seq.rows};
        for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) be.iface->free(be.ctx, bufs[i]);
        if (par < 2) {
            // logits (N, vl): this rank's columns of a fixed (N, Vp) matrix
            float *lg = host_rand((size_t)N * Vp, 13, 3.0f), *lgs = par ? shard_of(lg, N, (size_t)Vp, true) : lg;
            float *LG = dev_copy(lgs, (size_t)N * vl);
            struct vocab_parallel_xent x = {dev(N), dev(2 * (size_t)N), dev(N), dev(N)};
            vocab_parallel_cross_entropy_fwd(be, c, &x, LG, tgt, N, vl, V);
            loss[par] = host_of(x.losses, N);
            vocab_parallel_cross_entropy_bwd(be, c, LG, &x, LG, tgt, 0.5f, N, vl, V);
            dlog[par] = host_of(LG, (size_t)N * vl);
            if (lgs != lg) free(lgs);
            free(lg);
            float *xb[] = {LG, x.maxes, x.sums, x.local_maxes, x.losses};
            for (size_t i = 0; i < sizeof xb / sizeof xb[0]; i++) be.iface->free(be.ctx, xb[i]);
        }
        be.iface->free(be.ctx, tok);
        be.iface->free(be.ctx, tgt);
    }
    float *dwtes = shard_of(dwte[0], (size_t)Vp, C, false), *dlogs = shard_of(dlog[0], N, (size_t)Vp, true);
    float *embs = shard_of(emb[0], N, C, false);
    verdict("vocab_parallel_embedding forward equals one rank (rows summed, positions added once)",
            differ(emb[1], emb[0], (size_t)N * C, 0, detail, sizeof detail), detail);
    verdict("vocab_parallel_embedding backward: each rank's wte gradient is its rows",
            differ(dwte[1], dwtes, (size_t)VL * C, 0, detail, sizeof detail), detail);
    verdict("sequence parallel: vocab_parallel_embedding forward (reduce-scattered, positions of the rank's rows) "
            "gives this rank's rows of one rank's",
            differ(emb[2], embs, (size_t)Nl * C, 0, detail, sizeof detail), detail);
    verdict("sequence parallel: vocab_parallel_embedding backward (all-gathered) gives the wte rows and the whole wpe "
            "gradient",
            differ(dwte[2], dwtes, (size_t)VL * C, 0, detail, sizeof detail) ||
            differ(dwpe[2], dwpe[0], (size_t)T * C, 0, detail, sizeof detail), detail);
    verdict("vocab_parallel_cross_entropy forward equals one rank",
            differ(loss[1], loss[0], N, 1e-5f, detail, sizeof detail), detail);
    verdict("vocab_parallel_cross_entropy backward: this rank's columns of one rank's gradient",
            differ(dlog[1], dlogs, (size_t)N * VL, 1e-5f, detail, sizeof detail), detail);
    for (int par = 0; par < 3; par++) free(emb[par]), free(dwte[par]), free(dwpe[par]);
    for (int par = 0; par < 2; par++) free(loss[par]), free(dlog[par]);
    free(wte), free(wpe), free(wtes), free(dwtes), free(dlogs), free(embs);
}

// The MPI comm sums bf16 in fp32: a bf16 reduce-scatter must not add the bit patterns.
static void check_bf16_reduce_scatter(void) {
    enum { ROWS_PER_RANK = 2, W = 3 };
    char detail[256] = "";
    struct backend b16 = backend_cpu_create(TP_DTYPE_BF16);
    MPI_Comm world = MPI_COMM_WORLD;
    struct comm c = comm_mpi_create(&world, b16);
    size_t N = (size_t)ROWS_PER_RANK * (size_t)P, n = N * W, shard = ROWS_PER_RANK * W;
    uint16_t *h = malloc(n * sizeof *h), *got = malloc(shard * sizeof *got);
    float *want = malloc(shard * sizeof *want), *gotf = malloc(shard * sizeof *gotf);
    for (size_t i = 0; i < n; i++) h[i] = tp_bf16_from_f32(val(i / W, i % W, rank)); // small integers: exact
    for (size_t i = 0; i < shard; i++) {
        size_t g = (size_t)rank * shard + i;
        want[i] = 0;
        for (int r = 0; r < P; r++) want[i] += val(g / W, g % W, r);
    }
    void *in = b16.iface->alloc(b16.ctx, n * 2), *out = b16.iface->alloc(b16.ctx, shard * 2);
    b16.iface->copy_to_device(b16.ctx, in, h, n * 2);
    reduce_scatter_to_sequence_parallel_region_fwd(b16, &c, out, in, N, W);
    b16.iface->copy_to_host(b16.ctx, got, out, shard * 2);
    for (size_t i = 0; i < shard; i++) gotf[i] = tp_bf16_to_f32(got[i]);
    verdict("reduce_scatter_to_sequence_parallel_region forward sums bf16 values",
            differ(gotf, want, shard, 0, detail, sizeof detail), detail);
    b16.iface->free(b16.ctx, in);
    b16.iface->free(b16.ctx, out);
    free(h), free(got), free(want), free(gotf);
    comm_destroy(&c);
    backend_destroy(&b16);
}

// The fused, chunked LM head + loss (vocab_parallel_lm_head_cross_entropy) on P ranks, against
// the unfused layers on one rank holding the whole vocabulary (column_parallel_linear and
// vocab_parallel_cross_entropy, forward and backward, all N rows at once), and against itself
// in one chunk on the same ranks: chunking changes no loss or input-gradient bit (each row is
// computed alone) and the weight gradient only by the order of its per-chunk sums. With sequence
// parallelism each rank passes its N/P rows of the input and gets its rows of the gradient.
struct head_result {
    float *loss, *din, *dw; // (N), (N, C) (with sp this rank's (N/P, C)), (vl, C)
};

static struct head_result run_head(struct comm *c, const float *x, const float *w, const int *targets, int N,
                                   int C, int vl, int V, int rows, bool fused, bool seq) {
    size_t S = seq ? (size_t)N / (size_t)P : (size_t)N; // rows of the input and its gradient
    int *tgt = be.iface->alloc(be.ctx, (size_t)N * sizeof(int));
    be.iface->copy_to_device(be.ctx, tgt, targets, (size_t)N * sizeof(int));
    float *X = dev_copy(x + (seq ? (size_t)rank * S * C : 0), S * C), *W = dev_copy(w, (size_t)vl * C);
    float *din = dev(S * C), *dw = dev((size_t)vl * C), *losses = dev((size_t)N);
    struct tp_sequence_parallel sp = {dev((size_t)N * C), dev((size_t)N * C)};
    float *logits = dev((size_t)(fused ? rows : N) * vl);
    int R = fused ? rows : N;
    struct vocab_parallel_xent xs = {dev((size_t)R), dev(2 * (size_t)R), dev((size_t)R), losses};
    const float dloss = 0.25f;
    if (fused) {
        struct vocab_parallel_head h = {.in = X, .w = W, .targets = tgt, .losses = losses, .din = din, .dw = dw,
                                        .dloss = dloss, .logits = logits, .maxes = xs.maxes,
                                        .local_maxes = xs.local_maxes, .sums = xs.sums, .N = N, .C = C,
                                        .Vl = vl, .V = V, .rows = rows};
        vocab_parallel_lm_head_cross_entropy(be, c, &h, seq ? &sp : NULL);
    } else {
        column_parallel_linear_fwd(be, c, logits, NULL, X, W, NULL, N, C, vl, NULL);
        vocab_parallel_cross_entropy_fwd(be, c, &xs, logits, tgt, N, vl, V);
        vocab_parallel_cross_entropy_bwd(be, c, logits, &xs, logits, tgt, dloss, N, vl, V);
        column_parallel_linear_bwd(be, c, din, dw, NULL, logits, X, W, N, C, vl, NULL);
    }
    struct head_result r = {host_of(losses, (size_t)N), host_of(din, S * C), host_of(dw, (size_t)vl * C)};
    float *bufs[] = {X, W, din, dw, losses, logits, xs.maxes, xs.sums, xs.local_maxes, sp.rows, sp.drows};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) be.iface->free(be.ctx, bufs[i]);
    be.iface->free(be.ctx, tgt);
    return r;
}

static void head_free(struct head_result *r) { free(r->loss), free(r->din), free(r->dw); }

// Relative L2 difference of two n-float vectors, as a pass (0) or a fail (1) against tol.
static int differ_l2(const float *got, const float *want, size_t n, double tol, char *detail, size_t len) {
    double d2 = 0, w2 = 0;
    for (size_t i = 0; i < n; i++) {
        d2 += ((double)got[i] - want[i]) * ((double)got[i] - want[i]);
        w2 += (double)want[i] * want[i];
    }
    double rel = sqrt(d2 / (w2 > 0 ? w2 : 1));
    if (rel <= tol) return 0;
    snprintf(detail, len, "relative L2 difference %.3g > %.1g", rel, tol);
    return 1;
}

static void check_head(struct comm *tp, struct comm *self) {
    enum { N = 12, C = 8, VL = 24, ROWS = 5 }; // chunks of 5, 5 and 2 rows; N divisible by 1 to 4 ranks
    char detail[256] = "";
    int Vp = VL * P, V = Vp - 3; // three padding columns
    float *x = host_rand((size_t)N * C, 21, 1.0f), *w = host_rand((size_t)Vp * C, 22, 1.0f);
    for (int j = V * C; j < Vp * C; j++) w[j] = 0; // padding rows are zero, as in the model
    float *ws = shard_of(w, (size_t)Vp, C, false);
    int targets[N];
    for (int i = 0; i < N; i++) targets[i] = (i * 7 + 3) % V;
    struct head_result one = run_head(self, x, w, targets, N, C, Vp, V, N, false, false);
    struct head_result chunked = run_head(tp, x, ws, targets, N, C, VL, V, ROWS, true, false);
    struct head_result whole = run_head(tp, x, ws, targets, N, C, VL, V, N, true, false);
    struct head_result seq = run_head(tp, x, ws, targets, N, C, VL, V, ROWS, true, true);
    float *dws = shard_of(one.dw, (size_t)Vp, C, false), *dins = shard_of(one.din, N, C, false);
    const float tol = 1e-5f;
    verdict("vocab_parallel_lm_head_cross_entropy in chunks equals the unfused layers on one rank",
            differ(chunked.loss, one.loss, N, tol, detail, sizeof detail) ||
                differ(chunked.din, one.din, (size_t)N * C, tol, detail, sizeof detail) ||
                differ(chunked.dw, dws, (size_t)VL * C, tol, detail, sizeof detail),
            detail);
    verdict("vocab_parallel_lm_head_cross_entropy: chunks change no loss or input gradient bit",
            differ(chunked.loss, whole.loss, N, 0, detail, sizeof detail) ||
                differ(chunked.din, whole.din, (size_t)N * C, 0, detail, sizeof detail),
            detail);
    verdict("vocab_parallel_lm_head_cross_entropy: chunks change the weight gradient by its sum order only",
            differ_l2(chunked.dw, whole.dw, (size_t)VL * C, 1e-6, detail, sizeof detail), detail);
    if (P == 1) // one chunk on one rank is the unfused arithmetic, op for op
        verdict("vocab_parallel_lm_head_cross_entropy in one chunk on one rank is the unfused layers bit for bit",
                differ(whole.loss, one.loss, N, 0, detail, sizeof detail) ||
                    differ(whole.din, one.din, (size_t)N * C, 0, detail, sizeof detail) ||
                    differ(whole.dw, one.dw, (size_t)VL * C, 0, detail, sizeof detail),
                detail);
    // the gathered rows are the same bits, so the losses and the weight gradient are those of the
    // chunked head exactly; the input gradient's sum over ranks may be ordered differently
    verdict("sequence parallel: vocab_parallel_lm_head_cross_entropy in chunks (input all-gathered, its gradient "
            "reduce-scattered) gives this rank's rows of one rank's",
            differ(seq.loss, chunked.loss, N, 0, detail, sizeof detail) ||
                differ(seq.dw, chunked.dw, (size_t)VL * C, 0, detail, sizeof detail) ||
                differ(seq.din, dins, (size_t)(N / P) * C, tol, detail, sizeof detail),
            detail);
    head_free(&one), head_free(&chunked), head_free(&whole), head_free(&seq);
    free(x), free(w), free(ws), free(dws), free(dins);
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &P);
    be = backend_cpu_create(TP_DTYPE_F32);
    MPI_Comm world = MPI_COMM_WORLD, selfc = MPI_COMM_SELF;
    struct comm tp = comm_mpi_create(&world, be), self = comm_mpi_create(&selfc, be);
    check_mappings(&tp);
    check_linear(&tp, &self);
    check_vocab(&tp, &self);
    check_head(&tp, &self);
    check_bf16_reduce_scatter();
    if (rank == 0) printf("%d checks failed on %d ranks\n", failures, P);
    comm_destroy(&tp);
    comm_destroy(&self);
    backend_destroy(&be);
    MPI_Finalize();
    return failures ? 1 : 0;
}
