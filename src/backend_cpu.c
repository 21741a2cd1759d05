// backend_cpu.c: the CPU reference backend, the numerical yardstick for every other backend.
//
// Every op is deterministic and independent of the thread count: work is split over output
// elements (rows, columns, tiles) only, and each output element is produced by the same fixed
// sequence of float operations whichever thread computes it. Reductions that span many elements
// (sum, sumsq_acc, segments_sumsq) use fixed-size chunks whose partial sums are combined in
// chunk order. OpenMP is used when the build provides it; without it the pragmas are ignored and
// the code runs serially with identical results.
//
// The ops are written once, in fp32 (the *_f32 functions). With TP_DTYPE_BF16 the table's entry
// points widen their bf16 inputs into fp32 temporaries, run the same fp32 code and round the
// outputs back to bf16 (nearest even), so the bf16 backend computes exactly what the fp32 one
// would on the same (bf16-representable) inputs, up to that one rounding per output element.
// Speed is not a goal on that path; it exists to test the model's mixed-precision plumbing.
#include <math.h>
#include <stdint.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "backend.h"
#include "common.h"

// OpenMP pragmas that vanish (without an unknown-pragma warning) in a build without OpenMP.
#ifdef _OPENMP
#define CPU_OMP(directive) _Pragma(#directive)
#else
#define CPU_OMP(directive)
#endif

// Below this much work (in floats touched) an op runs on one thread: spawning costs more.
#define CPU_PAR_MIN 32768

struct cpu_ctx {
    enum tp_dtype dtype; // element type of the compute (void *) tensors
    size_t mem_now, mem_peak; // bytes allocated through alloc and not freed: now, at most
};

// ---- identity and memory

static const char *cpu_name(void *ctx) {
    (void)ctx;
    return "cpu";
}

// Every block starts with a header of CPU_ALLOC_HEADER bytes that records the size asked for
// (memory_stats counts exactly those), so the pointer handed out keeps the 64-byte alignment.
#define CPU_ALLOC_HEADER 64

static void *cpu_alloc(void *ctx, size_t bytes) {
    struct cpu_ctx *c = ctx;
    // aligned_alloc wants a size that is a multiple of the alignment, and a non-zero one.
    size_t padded = tp_round_up(bytes ? bytes : 1, 64);
    char *block = aligned_alloc(64, CPU_ALLOC_HEADER + padded);
    if (!block)
        tp_die(TP_EXIT_RUNTIME,
               "cpu backend: out of host memory allocating %zu bytes (reduce batch size, "
               "sequence length or model size)",
               bytes);
    memcpy(block, &bytes, sizeof bytes);
    memset(block + CPU_ALLOC_HEADER, 0, padded);
    c->mem_now += bytes;
    if (c->mem_now > c->mem_peak) c->mem_peak = c->mem_now;
    return block + CPU_ALLOC_HEADER;
}

static void cpu_free(void *ctx, void *ptr) {
    struct cpu_ctx *c = ctx;
    if (!ptr) return;
    char *block = (char *)ptr - CPU_ALLOC_HEADER;
    size_t bytes;
    memcpy(&bytes, block, sizeof bytes);
    c->mem_now -= bytes;
    free(block);
}

static void cpu_memory_stats(void *ctx, struct backend_memory *out) {
    const struct cpu_ctx *c = ctx;
    *out = (struct backend_memory){.now = c->mem_now, .peak = c->mem_peak};
}

static void cpu_zero(void *ctx, void *ptr, size_t bytes) {
    (void)ctx;
    if (bytes) memset(ptr, 0, bytes);
}

static void cpu_copy(void *ctx, void *dst, const void *src, size_t bytes) {
    (void)ctx;
    if (bytes && dst != src) memmove(dst, src, bytes);
}

static void cpu_synchronize(void *ctx) { (void)ctx; } // every op has finished when it returns

static void *cpu_native_stream(void *ctx) {
    (void)ctx;
    return NULL;
}

static void cpu_destroy(void *ctx) { free(ctx); }

// ---- compute type: conversions and fp32 staging

static enum tp_dtype cpu_dtype(void *ctx) { return ((struct cpu_ctx *)ctx)->dtype; }

static void bf16_widen(float *dst, const uint16_t *src, size_t n) {
    // dst (n), src (n)
    CPU_OMP(omp parallel for schedule(static) if (n >= CPU_PAR_MIN))
    for (size_t i = 0; i < n; i++) dst[i] = tp_bf16_to_f32(src[i]);
}

static void bf16_narrow(uint16_t *dst, const float *src, size_t n) {
    // dst (n), src (n)
    CPU_OMP(omp parallel for schedule(static) if (n >= CPU_PAR_MIN))
    for (size_t i = 0; i < n; i++) dst[i] = tp_bf16_from_f32(src[i]);
}

static void cpu_to_compute(void *ctx, void *dst, const float *src, size_t n) {
    // dst (n) compute type, src (n)
    if (cpu_dtype(ctx) == TP_DTYPE_BF16)
        bf16_narrow(dst, src, n);
    else
        cpu_copy(ctx, dst, src, n * sizeof(float));
}

static void cpu_from_compute(void *ctx, float *dst, const void *src, size_t n) {
    // dst (n), src (n) compute type
    if (cpu_dtype(ctx) == TP_DTYPE_BF16)
        bf16_widen(dst, src, n);
    else
        cpu_copy(ctx, dst, src, n * sizeof(float));
}

// A stage gives an op fp32 views of its compute-type tensors. With fp32 compute tensors the views
// are the tensors themselves, so the fp32 path runs on them directly, bit for bit as written.
// With bf16 each view is a widened temporary; stage_end rounds the output views back into their
// tensors and frees everything. Outputs are written back only at the end, and inputs were widened
// before the op ran, so an output that aliases an input behaves as it does in fp32.
#define STAGE_MAX 8

struct stage {
    enum tp_dtype dtype;
    int n;
    struct {
        float *view; // (numel) fp32 temporary
        void *dst;   // (numel) bf16 tensor it is rounded into at the end, NULL for an input
        size_t numel;
    } t[STAGE_MAX];
};

static struct stage stage_begin(void *ctx) { return (struct stage){.dtype = cpu_dtype(ctx)}; }

static float *stage_push(struct stage *s, const void *src, void *dst, size_t numel) {
    if (s->n == STAGE_MAX)
        tp_die(TP_EXIT_RUNTIME, "cpu backend: an op staged more than %d tensors", STAGE_MAX);
    float *view = tp_malloc(numel * sizeof(float));
    bf16_widen(view, src, numel);
    s->t[s->n].view = view;
    s->t[s->n].dst = dst;
    s->t[s->n].numel = numel;
    s->n++;
    return view;
}

// fp32 view of an input of numel elements (NULL stays NULL).
static const float *stage_in(struct stage *s, const void *src, size_t numel) {
    if (!src || s->dtype == TP_DTYPE_F32) return src;
    return stage_push(s, src, NULL, numel);
}

// fp32 view of an output of numel elements (NULL stays NULL). The view starts from the tensor's
// values, so accumulating ("+=") ops read the stored bf16 value, add in fp32 and round once.
static float *stage_out(struct stage *s, void *dst, size_t numel) {
    if (!dst || s->dtype == TP_DTYPE_F32) return dst;
    return stage_push(s, dst, dst, numel);
}

static void stage_end(struct stage *s) {
    for (int i = 0; i < s->n; i++) {
        if (s->t[i].dst) bf16_narrow(s->t[i].dst, s->t[i].view, s->t[i].numel);
        free(s->t[i].view);
    }
    s->n = 0;
}

// ---- embeddings

static void cpu_vocab_embedding_fwd(void *ctx, void *out, const int *tokens, const void *wte,
                                    int N, int C, int vocab_start, int n_vocab) {
    // out (N, C), tokens (N), wte (n_vocab, C): compute type
    // A row gather moves elements without arithmetic, so it runs on the stored type directly.
    size_t row_bytes = (size_t)C * tp_dtype_size(cpu_dtype(ctx));
    CPU_OMP(omp parallel for schedule(static) if ((size_t)N * C >= CPU_PAR_MIN))
    for (int n = 0; n < N; n++) {
        char *o = (char *)out + (size_t)n * row_bytes;
        int row = tokens[n] - vocab_start;
        if (row >= 0 && row < n_vocab)
            memcpy(o, (const char *)wte + (size_t)row * row_bytes, row_bytes);
        else
            memset(o, 0, row_bytes);
    }
}

static void vocab_embedding_bwd_f32(float *dwte, const float *dout, const int *tokens, int N,
                                    int C, int vocab_start, int n_vocab) {
    // dwte (n_vocab, C), dout (N, C), tokens (N)
    // Repeated tokens hit the same row, so split over columns: each column block sees the rows
    // in token order, whichever thread owns it.
    enum { CB = 64 };
    size_t Cs = (size_t)C;
    int nblocks = (C + CB - 1) / CB;
    CPU_OMP(omp parallel for schedule(static) if ((size_t)N * Cs >= CPU_PAR_MIN))
    for (int cb = 0; cb < nblocks; cb++) {
        size_t c0 = (size_t)cb * CB;
        size_t c1 = c0 + CB < Cs ? c0 + CB : Cs;
        for (int n = 0; n < N; n++) {
            int row = tokens[n] - vocab_start;
            if (row < 0 || row >= n_vocab) continue;
            float *dw = dwte + (size_t)row * Cs;
            const float *d = dout + (size_t)n * Cs;
            for (size_t c = c0; c < c1; c++) dw[c] += d[c];
        }
    }
}

static void position_embedding_fwd_f32(float *x, const float *wpe, int B, int T, int C) {
    // x (B, T, C), wpe (T, C)
    size_t TC = (size_t)T * C;
    CPU_OMP(omp parallel for schedule(static) if ((size_t)B * TC >= CPU_PAR_MIN))
    for (int b = 0; b < B; b++) {
        float *xb = x + (size_t)b * TC;
        for (size_t i = 0; i < TC; i++) xb[i] += wpe[i];
    }
}

static void position_embedding_bwd_f32(float *dwpe, const float *dout, int B, int T, int C) {
    // dwpe (T, C), dout (B, T, C)
    size_t Cs = (size_t)C, TC = (size_t)T * Cs;
    CPU_OMP(omp parallel for schedule(static) if ((size_t)B * TC >= CPU_PAR_MIN))
    for (int t = 0; t < T; t++) {
        float *dw = dwpe + (size_t)t * Cs;
        for (size_t c = 0; c < Cs; c++) {
            float acc = 0.0f;
            for (int b = 0; b < B; b++) acc += dout[(size_t)b * TC + (size_t)t * Cs + c];
            dw[c] += acc;
        }
    }
}

// ---- layernorm

static void layernorm_fwd_f32(float *out, float *mean, float *rstd, const float *inp,
                              const float *w, const float *b, int N, int C) {
    // out (N, C), mean (N), rstd (N), inp (N, C), w (C), b (C)
    size_t Cs = (size_t)C;
    CPU_OMP(omp parallel for schedule(static) if ((size_t)N * Cs >= CPU_PAR_MIN))
    for (int n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * Cs;
        float *o = out + (size_t)n * Cs;
        // Statistics in double: they are cheap and set the accuracy of everything downstream.
        double s = 0.0;
        for (size_t c = 0; c < Cs; c++) s += x[c];
        float m = (float)(s / C);
        double v = 0.0;
        for (size_t c = 0; c < Cs; c++) {
            double d = (double)x[c] - m;
            v += d * d;
        }
        float r = (float)(1.0 / sqrt(v / C + 1e-5));
        for (size_t c = 0; c < Cs; c++) o[c] = (x[c] - m) * r * w[c] + b[c];
        mean[n] = m;
        rstd[n] = r;
    }
}

static void layernorm_bwd_f32(float *dinp, float *dw, float *db, const float *dout,
                              const float *inp, const float *w, const float *mean,
                              const float *rstd, int N, int C) {
    // dinp (N, C), dw (C), db (C), dout (N, C), inp (N, C), w (C), mean (N), rstd (N)
    size_t Cs = (size_t)C;
    int par = (size_t)N * Cs >= CPU_PAR_MIN;
    (void)par; // only read by OpenMP
    // dinp: rows are independent.
    CPU_OMP(omp parallel for schedule(static) if (par))
    for (int n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * Cs;
        const float *d = dout + (size_t)n * Cs;
        float *di = dinp + (size_t)n * Cs;
        float m = mean[n], r = rstd[n];
        float dnorm_mean = 0.0f, dnorm_norm_mean = 0.0f;
        for (size_t c = 0; c < Cs; c++) {
            float norm = (x[c] - m) * r;
            float dnorm = w[c] * d[c];
            dnorm_mean += dnorm;
            dnorm_norm_mean += dnorm * norm;
        }
        dnorm_mean /= (float)C;
        dnorm_norm_mean /= (float)C;
        for (size_t c = 0; c < Cs; c++) {
            float norm = (x[c] - m) * r;
            float dnorm = w[c] * d[c];
            di[c] += (dnorm - dnorm_mean - norm * dnorm_norm_mean) * r;
        }
    }
    // dw, db: reductions over rows, so split over column blocks and walk rows in order.
    enum { CB = 16 };
    int nblocks = (C + CB - 1) / CB;
    CPU_OMP(omp parallel for schedule(static) if (par))
    for (int cb = 0; cb < nblocks; cb++) {
        size_t c0 = (size_t)cb * CB;
        size_t nc = c0 + CB <= Cs ? CB : Cs - c0;
        float accw[CB] = {0}, accb[CB] = {0};
        for (int n = 0; n < N; n++) {
            const float *x = inp + (size_t)n * Cs + c0;
            const float *d = dout + (size_t)n * Cs + c0;
            float m = mean[n], r = rstd[n];
            for (size_t j = 0; j < nc; j++) {
                accw[j] += d[j] * ((x[j] - m) * r);
                accb[j] += d[j];
            }
        }
        for (size_t j = 0; j < nc; j++) {
            dw[c0 + j] += accw[j];
            db[c0 + j] += accb[j];
        }
    }
}

// ---- GELU (tanh approximation; the linear layer's fused GELU uses these too)

#define GELU_K 0.7978845608028654f // sqrt(2 / pi)
#define GELU_A 0.044715f

static void gelu_fwd_f32(float *out, const float *inp, size_t n) {
    CPU_OMP(omp parallel for schedule(static) if (n >= CPU_PAR_MIN))
    for (size_t i = 0; i < n; i++) {
        float x = inp[i];
        float t = tanhf(GELU_K * (x + GELU_A * x * x * x));
        out[i] = 0.5f * x * (1.0f + t);
    }
}

static void gelu_bwd_f32(float *dinp, const float *inp, const float *dout, size_t n) {
    CPU_OMP(omp parallel for schedule(static) if (n >= CPU_PAR_MIN))
    for (size_t i = 0; i < n; i++) {
        float x = inp[i];
        float t = tanhf(GELU_K * (x + GELU_A * x * x * x));
        float dt = (1.0f - t * t) * GELU_K * (1.0f + 3.0f * GELU_A * x * x);
        float g = 0.5f * (1.0f + t) + 0.5f * x * dt;
        dinp[i] = g * dout[i];
    }
}

// ---- matmul kernels
//
// All three products of a linear layer are one register-tiled kernel:
//   c (MR x NR tile) = sum over k of a(r, k) * b(k, j),  a(r, k) = a[r*ars + k*aks],
//                                                         b(k, j) = b[k*bks + j]  (j contiguous)
// Each output element is acc = 0; acc = fmaf(a, b, acc) for k = 0, 1, ... in order, so the result
// does not depend on the tiling, on the K chunking (partial sums are exact float values stored
// in place) or on which thread computes a tile. The inner loop broadcasts one a value per row and
// streams NR contiguous b values; GCC turns it into NR/16 zmm (or NR/8 ymm) FMAs per row.
#if defined(__AVX512F__)
#define MM_MR 8
#define MM_NR 32
#else
#define MM_MR 6
#define MM_NR 16
#endif
// K chunk of dinp = dout @ w: keeps a (dout) and b (w) chunks resident in L2 across all tiles.
#define MM_KC 512

enum mm_mode {
    MM_SET,      // c = acc (+ bias)
    MM_CONTINUE, // acc starts from c (a later K chunk), c = acc
    MM_ADD,      // c += acc
};

// Full-width tile (NR columns of b readable). Rows beyond mr reuse the last valid row of a and
// are not stored, so the kernel needs no row tail of its own; columns beyond nc are not stored.
static inline void mm_tile(float *restrict c, size_t crs, int mr, int nc, enum mm_mode mode,
                           const float *restrict bias, const float *restrict a, size_t ars,
                           size_t aks, const float *restrict b, size_t bks, size_t K) {
    float acc[MM_MR][MM_NR];
    if (mode == MM_CONTINUE) {
        for (int r = 0; r < MM_MR; r++) {
            const float *cr = c + (size_t)(r < mr ? r : mr - 1) * crs;
            for (int j = 0; j < MM_NR; j++) acc[r][j] = j < nc ? cr[j] : 0.0f;
        }
    } else {
        for (int r = 0; r < MM_MR; r++)
            for (int j = 0; j < MM_NR; j++) acc[r][j] = 0.0f;
    }
    size_t aoff[MM_MR];
    for (int r = 0; r < MM_MR; r++) aoff[r] = (size_t)(r < mr ? r : mr - 1) * ars;
    for (size_t k = 0; k < K; k++) {
        const float *ak = a + k * aks;
        const float *bk = b + k * bks;
        for (int r = 0; r < MM_MR; r++) {
            float av = ak[aoff[r]];
            for (int j = 0; j < MM_NR; j++) acc[r][j] = fmaf(av, bk[j], acc[r][j]);
        }
    }
    for (int r = 0; r < mr; r++) {
        float *cr = c + (size_t)r * crs;
        if (mode == MM_ADD) {
            for (int j = 0; j < nc; j++) cr[j] += acc[r][j];
        } else if (bias) {
            for (int j = 0; j < nc; j++) cr[j] = acc[r][j] + bias[j];
        } else {
            for (int j = 0; j < nc; j++) cr[j] = acc[r][j];
        }
    }
}

// Narrow tile (fewer than NR columns of b exist; backward only, the forward pads its packed panel):
// the same per-element arithmetic, one row at a time with a runtime column count.
static void mm_tile_narrow(float *restrict c, size_t crs, int mr, int nc, enum mm_mode mode,
                           const float *restrict a, size_t ars, size_t aks,
                           const float *restrict b, size_t bks, size_t K) {
    for (int r = 0; r < mr; r++) {
        const float *ar = a + (size_t)r * ars;
        float *cr = c + (size_t)r * crs;
        float acc[MM_NR];
        for (int j = 0; j < nc; j++) acc[j] = mode == MM_CONTINUE ? cr[j] : 0.0f;
        for (size_t k = 0; k < K; k++) {
            float av = ar[k * aks];
            const float *bk = b + k * bks;
            for (int j = 0; j < nc; j++) acc[j] = fmaf(av, bk[j], acc[j]);
        }
        for (int j = 0; j < nc; j++) cr[j] = mode == MM_ADD ? cr[j] + acc[j] : acc[j];
    }
}

static void matmul_fwd_f32(float *out, float *pre_gelu, const float *inp, const float *w,
                           const float *bias, int N, int IC, int OC) {
    // out (N, OC), pre_gelu (N, OC) or NULL, inp (N, IC), w (OC, IC), bias (OC) or NULL
    // b(k, j) = w[j, k] is strided, so each thread packs one (IC, NR) panel of w^T at a time
    // (zero-padded past OC) and sweeps every row tile of inp with it. The fused GELU is a second
    // pass over the product, so the result is bitwise matmul then gelu_fwd.
    float *prod = pre_gelu ? pre_gelu : out; // (N, OC) where the product lands
    size_t Ks = (size_t)IC, OCs = (size_t)OC;
    size_t n_oblocks = (OCs + MM_NR - 1) / MM_NR;
    int par = (double)N * IC * OC >= 4.0 * CPU_PAR_MIN;
    (void)par; // only read by OpenMP
    CPU_OMP(omp parallel if (par))
    {
        float *panel = tp_malloc(Ks * MM_NR * sizeof(float)); // (IC, NR)
        CPU_OMP(omp for schedule(static))
        for (size_t ob = 0; ob < n_oblocks; ob++) {
            size_t o0 = ob * MM_NR;
            int nc = (int)(OCs - o0 < MM_NR ? OCs - o0 : MM_NR);
            for (int j = 0; j < MM_NR; j++) {
                const float *wr = w + (o0 + (size_t)(j < nc ? j : 0)) * Ks;
                float keep = j < nc ? 1.0f : 0.0f; // padding columns become exact zeros
                for (size_t k = 0; k < Ks; k++) panel[k * MM_NR + (size_t)j] = wr[k] * keep;
            }
            for (int n0 = 0; n0 < N; n0 += MM_MR) {
                int mr = N - n0 < MM_MR ? N - n0 : MM_MR;
                mm_tile(prod + (size_t)n0 * OCs + o0, OCs, mr, nc, MM_SET, bias ? bias + o0 : NULL,
                        inp + (size_t)n0 * Ks, Ks, 1, panel, MM_NR, Ks);
            }
        }
        free(panel);
    }
    if (pre_gelu) gelu_fwd_f32(out, pre_gelu, (size_t)N * OCs);
}

// dinp (N, IC) = dout (N, OC) @ w (OC, IC): K = OC can be the whole vocabulary, so K is chunked
// and every tile keeps its partial sum in dinp between chunks.
static void matmul_bwd_dinp(float *dinp, const float *dout, const float *w, int N, int IC, int OC,
                            int par) {
    (void)par; // only read by OpenMP
    size_t ICs = (size_t)IC, OCs = (size_t)OC;
    size_t n_rt = ((size_t)N + MM_MR - 1) / MM_MR, n_ct = (ICs + MM_NR - 1) / MM_NR;
    size_t n_tiles = n_rt * n_ct;
    if (OCs == 0) { // no chunk would run, but "=" still owes zeros
        memset(dinp, 0, (size_t)N * ICs * sizeof(float));
        return;
    }
    CPU_OMP(omp parallel if (par))
    for (size_t k0 = 0; k0 < OCs; k0 += MM_KC) {
        size_t kc = OCs - k0 < MM_KC ? OCs - k0 : MM_KC;
        enum mm_mode mode = k0 == 0 ? MM_SET : MM_CONTINUE;
        // A static schedule over the same iteration count maps each tile to the same thread in
        // every chunk, so no barrier is needed between chunks.
        CPU_OMP(omp for schedule(static) nowait)
        for (size_t t = 0; t < n_tiles; t++) {
            size_t n0 = (t / n_ct) * MM_MR, i0 = (t % n_ct) * MM_NR;
            int mr = (int)((size_t)N - n0 < MM_MR ? (size_t)N - n0 : MM_MR);
            int nc = (int)(ICs - i0 < MM_NR ? ICs - i0 : MM_NR);
            float *c = dinp + n0 * ICs + i0;
            const float *a = dout + n0 * OCs + k0;
            const float *b = w + k0 * ICs + i0;
            if (nc == MM_NR)
                mm_tile(c, ICs, mr, nc, mode, NULL, a, OCs, 1, b, ICs, kc);
            else
                mm_tile_narrow(c, ICs, mr, nc, mode, a, OCs, 1, b, ICs, kc);
        }
    }
}

// dw (OC, IC) += dout^T (OC, N) @ inp (N, IC): tiles over (OC, IC), K = N rows in full.
static void matmul_bwd_dw(float *dw, const float *dout, const float *inp, int N, int IC, int OC,
                          int par) {
    (void)par; // only read by OpenMP
    size_t ICs = (size_t)IC, OCs = (size_t)OC;
    size_t n_rt = (OCs + MM_MR - 1) / MM_MR, n_ct = (ICs + MM_NR - 1) / MM_NR;
    size_t n_tiles = n_rt * n_ct;
    // Column tiles of one row block are neighbours, so they share the dout lines they read.
    CPU_OMP(omp parallel for schedule(static) if (par))
    for (size_t t = 0; t < n_tiles; t++) {
        size_t o0 = (t / n_ct) * MM_MR, i0 = (t % n_ct) * MM_NR;
        int mr = (int)(OCs - o0 < MM_MR ? OCs - o0 : MM_MR);
        int nc = (int)(ICs - i0 < MM_NR ? ICs - i0 : MM_NR);
        float *c = dw + o0 * ICs + i0;
        const float *a = dout + o0;
        const float *b = inp + i0;
        if (nc == MM_NR)
            mm_tile(c, ICs, mr, nc, MM_ADD, NULL, a, 1, OCs, b, ICs, (size_t)N);
        else
            mm_tile_narrow(c, ICs, mr, nc, MM_ADD, a, 1, OCs, b, ICs, (size_t)N);
    }
}

// dbias (OC) += column sums of dout (N, OC), split over column blocks.
static void matmul_bwd_dbias(float *dbias, const float *dout, int N, int OC, int par) {
    (void)par; // only read by OpenMP
    enum { CB = 64 };
    size_t OCs = (size_t)OC;
    size_t nblocks = (OCs + CB - 1) / CB;
    CPU_OMP(omp parallel for schedule(static) if (par))
    for (size_t cb = 0; cb < nblocks; cb++) {
        size_t o0 = cb * CB;
        size_t nc = OCs - o0 < CB ? OCs - o0 : CB;
        float acc[CB] = {0};
        for (int n = 0; n < N; n++) {
            const float *d = dout + (size_t)n * OCs + o0;
            for (size_t j = 0; j < nc; j++) acc[j] += d[j];
        }
        for (size_t j = 0; j < nc; j++) dbias[o0 + j] += acc[j];
    }
}

static void matmul_bwd_f32(float *dinp, float *dw, float *dbias, const float *dout,
                           const float *inp, const float *w, const float *pre_gelu, int N, int IC,
                           int OC) {
    // dinp (N, IC) or NULL, dw (OC, IC) or NULL, dbias (OC) or NULL, dout (N, OC), inp (N, IC), w (OC, IC),
    // pre_gelu (N, IC) or NULL; the GELU derivative is applied in place, as gelu_bwd would
    int par = (double)N * IC * OC >= 4.0 * CPU_PAR_MIN;
    if (dinp) {
        matmul_bwd_dinp(dinp, dout, w, N, IC, OC, par);
        if (pre_gelu) gelu_bwd_f32(dinp, pre_gelu, dinp, (size_t)N * IC);
    }
    if (!dw) return;
    matmul_bwd_dw(dw, dout, inp, N, IC, OC, par);
    if (dbias) matmul_bwd_dbias(dbias, dout, N, OC, (size_t)N * OC >= CPU_PAR_MIN);
}

static void residual_fwd_f32(float *out, const float *res, const float *x, const float *bias,
                             int N, int C) {
    // out (N, C) may alias res (N, C) or x (N, C); bias (C) or NULL
    size_t Cs = (size_t)C;
    CPU_OMP(omp parallel for schedule(static) if ((size_t)N * Cs >= CPU_PAR_MIN))
    for (int n = 0; n < N; n++) {
        size_t off = (size_t)n * Cs;
        if (bias)
            for (size_t c = 0; c < Cs; c++) out[off + c] = res[off + c] + x[off + c] + bias[c];
        else
            for (size_t c = 0; c < Cs; c++) out[off + c] = res[off + c] + x[off + c];
    }
}

// ---- causal self-attention
//
// saved (B, NH, T, T) holds the softmax probabilities (zero above the diagonal); scratch holds one
// row of dP per (b, h) for the backward.

static size_t cpu_attention_saved_floats(void *ctx, int B, int T, int NH, int HS) {
    (void)ctx;
    (void)HS;
    return (size_t)B * NH * T * T;
}

static size_t cpu_attention_scratch_floats(void *ctx, int B, int T, int NH, int HS) {
    (void)ctx;
    (void)HS;
    return (size_t)B * NH * T;
}

static void attention_fwd_f32(float *out, float *saved, const float *qkv, int B, int T, int NH,
                              int HS) {
    // out (B, T, NH*HS), saved (B, NH, T, T), qkv (B, T, 3*NH*HS)
    size_t C = (size_t)NH * HS, C3 = 3 * C, Ts = (size_t)T, HSs = (size_t)HS;
    float scale = 1.0f / sqrtf((float)HS);
    size_t rows = (size_t)B * NH * Ts;
    CPU_OMP(omp parallel for schedule(static) if (rows * Ts * HSs >= CPU_PAR_MIN))
    for (size_t idx = 0; idx < rows; idx++) {
        size_t t = idx % Ts, h = (idx / Ts) % (size_t)NH, b = idx / (Ts * NH);
        const float *q = qkv + (b * Ts + t) * C3 + h * HSs;
        float *p = saved + idx * Ts; // (T) row t of head (b, h)
        float mx = -INFINITY;
        for (size_t t2 = 0; t2 <= t; t2++) {
            const float *k = qkv + (b * Ts + t2) * C3 + C + h * HSs;
            float s = 0.0f;
            for (size_t d = 0; d < HSs; d++) s += q[d] * k[d];
            s *= scale;
            p[t2] = s;
            if (s > mx) mx = s;
        }
        float sum = 0.0f;
        for (size_t t2 = 0; t2 <= t; t2++) {
            p[t2] = expf(p[t2] - mx);
            sum += p[t2];
        }
        float inv = 1.0f / sum;
        for (size_t t2 = 0; t2 <= t; t2++) p[t2] *= inv;
        for (size_t t2 = t + 1; t2 < Ts; t2++) p[t2] = 0.0f;
        float *o = out + (b * Ts + t) * C + h * HSs;
        for (size_t d = 0; d < HSs; d++) o[d] = 0.0f;
        for (size_t t2 = 0; t2 <= t; t2++) {
            const float *v = qkv + (b * Ts + t2) * C3 + 2 * C + h * HSs;
            for (size_t d = 0; d < HSs; d++) o[d] += p[t2] * v[d];
        }
    }
}

static void attention_bwd_f32(float *dqkv, float *scratch, const float *dout, const float *qkv,
                              const float *saved, int B, int T, int NH, int HS) {
    // dqkv (B, T, 3*NH*HS), scratch (B, NH, T), dout (B, T, NH*HS), qkv (B, T, 3*NH*HS),
    // saved (B, NH, T, T)
    // One (b, h) per task: dk and dv rows collect from every later query, so they must not be
    // split across threads.
    size_t C = (size_t)NH * HS, C3 = 3 * C, Ts = (size_t)T, HSs = (size_t)HS;
    float scale = 1.0f / sqrtf((float)HS);
    size_t heads = (size_t)B * NH;
    CPU_OMP(omp parallel for schedule(static) if (heads * Ts * Ts * HSs >= CPU_PAR_MIN))
    for (size_t bh = 0; bh < heads; bh++) {
        size_t h = bh % (size_t)NH, b = bh / (size_t)NH;
        float *dp = scratch + bh * Ts; // (T) dP of the current query row
        for (size_t t = 0; t < Ts; t++) {
            float *row = dqkv + (b * Ts + t) * C3 + h * HSs;
            for (size_t d = 0; d < HSs; d++) row[d] = row[C + d] = row[2 * C + d] = 0.0f;
        }
        for (size_t t = 0; t < Ts; t++) {
            const float *p = saved + (bh * Ts + t) * Ts;
            const float *q = qkv + (b * Ts + t) * C3 + h * HSs;
            const float *dout_t = dout + (b * Ts + t) * C + h * HSs;
            float *dq = dqkv + (b * Ts + t) * C3 + h * HSs;
            float pdp = 0.0f; // sum over t2 of P * dP
            for (size_t t2 = 0; t2 <= t; t2++) {
                const float *v = qkv + (b * Ts + t2) * C3 + 2 * C + h * HSs;
                float *dv = dqkv + (b * Ts + t2) * C3 + 2 * C + h * HSs;
                float s = 0.0f;
                for (size_t d = 0; d < HSs; d++) {
                    s += dout_t[d] * v[d];
                    dv[d] += p[t2] * dout_t[d];
                }
                dp[t2] = s;
                pdp += p[t2] * s;
            }
            for (size_t t2 = 0; t2 <= t; t2++) {
                const float *k = qkv + (b * Ts + t2) * C3 + C + h * HSs;
                float *dk = dqkv + (b * Ts + t2) * C3 + C + h * HSs;
                float ds = p[t2] * (dp[t2] - pdp) * scale; // through softmax and the scale
                for (size_t d = 0; d < HSs; d++) {
                    dq[d] += ds * k[d];
                    dk[d] += ds * q[d];
                }
            }
        }
    }
}

// One query row against a KV cache (generation): heads are independent, so one task per head.
static void attention_decode_f32(float *out, float *scratch, const float *q, const float *kcache,
                                 const float *vcache, int n_ctx, int NH, int HS) {
    // out (NH*HS), scratch (NH, n_ctx), q (NH*HS), kcache/vcache (>= n_ctx, NH*HS)
    size_t C = (size_t)NH * HS, HSs = (size_t)HS, n = (size_t)n_ctx;
    float scale = 1.0f / sqrtf((float)HS);
    CPU_OMP(omp parallel for schedule(static) if (C * n >= CPU_PAR_MIN))
    for (int h = 0; h < NH; h++) {
        const float *qh = q + (size_t)h * HSs;
        float *p = scratch + (size_t)h * n; // (n_ctx)
        float mx = -INFINITY;
        for (size_t j = 0; j < n; j++) {
            const float *k = kcache + j * C + (size_t)h * HSs;
            float s = 0.0f;
            for (size_t d = 0; d < HSs; d++) s += qh[d] * k[d];
            p[j] = s * scale;
            if (p[j] > mx) mx = p[j];
        }
        float sum = 0.0f;
        for (size_t j = 0; j < n; j++) {
            p[j] = expf(p[j] - mx);
            sum += p[j];
        }
        float inv = 1.0f / sum;
        float *o = out + (size_t)h * HSs;
        for (size_t d = 0; d < HSs; d++) o[d] = 0.0f;
        for (size_t j = 0; j < n; j++) {
            const float *v = vcache + j * C + (size_t)h * HSs;
            float w = p[j] * inv;
            for (size_t d = 0; d < HSs; d++) o[d] += w * v[d];
        }
    }
}

// ---- vocab-parallel cross-entropy
//
// The LM head's softmax touches N * V logits twice per step, so exp is a vectorisable polynomial
// instead of libm's scalar expf: Cody-Waite reduction to r in [-ln2/2, ln2/2] and a degree-7
// Taylor polynomial, within 2 ulp of exp over the range used here (x <= 0 after the max shift).
static inline float cpu_expf(float x) {
    const float magic = 12582912.0f; // 1.5 * 2^23: adding and subtracting it rounds to an integer
    float xc = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float n = (xc * 1.44269504088896341f + magic) - magic;
    float r = fmaf(n, -0.693145751953125f, xc); // ln2 split in a high part exact in float ...
    r = fmaf(n, -1.428606765330187045e-06f, r); // ... and the remainder
    float p = 1.0f / 5040.0f;
    p = fmaf(p, r, 1.0f / 720.0f);
    p = fmaf(p, r, 1.0f / 120.0f);
    p = fmaf(p, r, 1.0f / 24.0f);
    p = fmaf(p, r, 1.0f / 6.0f);
    p = fmaf(p, r, 0.5f);
    p = fmaf(p, r, 1.0f);
    p = fmaf(p, r, 1.0f);
    uint32_t bits = (uint32_t)((int32_t)n + 127) << 23;
    float s;
    memcpy(&s, &bits, sizeof s);
    // exp(-87) is still a normal float; below it (and for -inf) the true value is negligible.
    return x < -87.0f ? 0.0f : p * s;
}

// Real (unpadded) columns held by a rank: global index vocab_start + j < vocab_size.
static inline int xent_real_cols(int vocab_start, int n_vocab, int vocab_size) {
    int r = vocab_size - vocab_start;
    return r < 0 ? 0 : (r > n_vocab ? n_vocab : r);
}

// Independent lanes let the compiler vectorise the sum of exponentials without reassociating it;
// the lanes are combined in a fixed order.
#define XENT_LANES 16

// One rank's statistics of one row over its nr real columns: a max pass, then the sum of
// exponentials shifted by that max, then the target logit (column tj, 0 when not held here). The
// row is read twice, but from cache; keeping the two passes makes the one-rank results the exact
// values of a two-phase softmax.
static inline void xent_row_stats(const float *l, size_t nr, int tj, float *max_out, float *sum_out,
                                  float *target_out) {
    float mx = -INFINITY;
    // max is exact in any order, so letting OpenMP reorder it keeps results deterministic.
    CPU_OMP(omp simd reduction(max : mx))
    for (size_t j = 0; j < nr; j++) mx = l[j] > mx ? l[j] : mx;
    float s = 0.0f;
    // A -inf max means no real column here (or only -inf logits); -inf - -inf would be NaN,
    // and such a row contributes nothing anyway.
    if (mx != -INFINITY) {
        float lane[XENT_LANES] = {0};
        size_t j = 0;
        for (; j + XENT_LANES <= nr; j += XENT_LANES)
            for (int k = 0; k < XENT_LANES; k++) lane[k] += cpu_expf(l[j + k] - mx);
        for (; j < nr; j++) s += cpu_expf(l[j] - mx);
        for (int k = 0; k < XENT_LANES; k++) s += lane[k];
    }
    *max_out = mx;
    *sum_out = s;
    *target_out = tj >= 0 && (size_t)tj < nr ? l[tj] : 0.0f;
}

// One row's logits gradient from its final statistics: (softmax - onehot(tj)) * dloss on the nr
// real columns, 0 on the rest of the V; dl may alias l.
static inline void xent_row_grad(float *dl, const float *l, size_t nr, size_t V, int tj, float mx,
                                 float sum, float dloss) {
    float scale = dloss / sum; // softmax = exp(l - max) / sum
    for (size_t j = 0; j < nr; j++) dl[j] = cpu_expf(l[j] - mx) * scale;
    for (size_t j = nr; j < V; j++) dl[j] = 0.0f;
    if (tj >= 0 && (size_t)tj < nr) dl[tj] -= dloss;
}

static inline float xent_row_loss(float mx, float sum, float target_logit) {
    return logf(sum) + mx - target_logit;
}

static void xent_stats_f32(float *maxes, float *sums, const float *logits, const int *targets,
                           int N, int vocab_start, int n_vocab, int vocab_size) {
    // maxes (N), sums (2, N), logits (N, n_vocab), targets (N)
    size_t V = (size_t)n_vocab, nr = (size_t)xent_real_cols(vocab_start, n_vocab, vocab_size);
    CPU_OMP(omp parallel for schedule(static) if ((size_t)N * nr >= CPU_PAR_MIN))
    for (int i = 0; i < N; i++)
        xent_row_stats(logits + (size_t)i * V, nr, targets[i] - vocab_start, &maxes[i], &sums[i],
                       &sums[(size_t)N + (size_t)i]);
}

static void cpu_xent_rescale(void *ctx, float *sums, const float *local_maxes, const float *maxes,
                             int N) {
    // sums (2, N): only row 0 moves; local_maxes (N), maxes (N)
    (void)ctx;
    for (int i = 0; i < N; i++)
        sums[i] *= local_maxes[i] == -INFINITY ? 0.0f : expf(local_maxes[i] - maxes[i]);
}

static void cpu_xent_loss(void *ctx, float *losses, const float *maxes, const float *sums, int N) {
    // losses (N), maxes (N), sums (2, N)
    (void)ctx;
    for (int i = 0; i < N; i++) losses[i] = xent_row_loss(maxes[i], sums[i], sums[(size_t)N + (size_t)i]);
}

static void xent_bwd_f32(float *dlogits, const float *logits, const float *maxes,
                         const float *sums, const int *targets, float dloss, int N, int vocab_start,
                         int n_vocab, int vocab_size) {
    // dlogits (N, n_vocab) may alias logits (N, n_vocab); maxes (N), sums (2, N), targets (N)
    size_t V = (size_t)n_vocab, nr = (size_t)xent_real_cols(vocab_start, n_vocab, vocab_size);
    CPU_OMP(omp parallel for schedule(static) if ((size_t)N * V >= CPU_PAR_MIN))
    for (int i = 0; i < N; i++)
        xent_row_grad(dlogits + (size_t)i * V, logits + (size_t)i * V, nr, V, targets[i] - vocab_start,
                      maxes[i], sums[i], dloss);
}

// One rank holds every column: statistics, loss and (dlogits non-NULL) gradient of each row while
// it is in cache, by the same per-row code as the three separate ops, so the results are theirs
// bit for bit.
static void xent_fused_f32(float *losses, float *dlogits, const float *logits, const int *targets,
                           float dloss, int N, int n_vocab, int vocab_size) {
    // losses (N), dlogits (N, n_vocab) or NULL, may alias logits (N, n_vocab); targets (N)
    size_t V = (size_t)n_vocab, nr = (size_t)xent_real_cols(0, n_vocab, vocab_size);
    CPU_OMP(omp parallel for schedule(static) if ((size_t)N * V >= CPU_PAR_MIN))
    for (int i = 0; i < N; i++) {
        const float *l = logits + (size_t)i * V;
        float mx, sum, tl;
        xent_row_stats(l, nr, targets[i], &mx, &sum, &tl);
        losses[i] = xent_row_loss(mx, sum, tl);
        if (dlogits) xent_row_grad(dlogits + (size_t)i * V, l, nr, V, targets[i], mx, sum, dloss);
    }
}

// ---- reductions and elementwise helpers
//
// sum and sumsq_acc accumulate in double over chunks whose size depends only on n, and add the
// chunk partials in order: the result is the same for any thread count. These ops see only fp32
// tensors, so they are the table's entries directly.
#define RED_MAX_CHUNKS 256
#define RED_MIN_CHUNK 16384
#define RED_LANES 8

static size_t red_chunk_size(size_t n) {
    size_t per = (n + RED_MAX_CHUNKS - 1) / RED_MAX_CHUNKS;
    return per < RED_MIN_CHUNK ? RED_MIN_CHUNK : tp_round_up(per, RED_LANES);
}

static double red_chunk(const float *x, size_t n, int squares) {
    double lane[RED_LANES] = {0};
    size_t i = 0;
    if (squares) {
        for (; i + RED_LANES <= n; i += RED_LANES)
            for (int k = 0; k < RED_LANES; k++) lane[k] += (double)x[i + k] * (double)x[i + k];
    } else {
        for (; i + RED_LANES <= n; i += RED_LANES)
            for (int k = 0; k < RED_LANES; k++) lane[k] += (double)x[i + k];
    }
    double s = 0.0;
    for (; i < n; i++) s += squares ? (double)x[i] * (double)x[i] : (double)x[i];
    for (int k = 0; k < RED_LANES; k++) s += lane[k];
    return s;
}

static double red_total(const float *x, size_t n, int squares) {
    size_t chunk = red_chunk_size(n);
    size_t nchunks = (n + chunk - 1) / chunk;
    double part[RED_MAX_CHUNKS];
    CPU_OMP(omp parallel for schedule(static) if (nchunks > 1))
    for (size_t c = 0; c < nchunks; c++) {
        size_t i0 = c * chunk;
        part[c] = red_chunk(x + i0, n - i0 < chunk ? n - i0 : chunk, squares);
    }
    double s = 0.0;
    for (size_t c = 0; c < nchunks; c++) s += part[c];
    return s;
}

static void cpu_sum(void *ctx, float *out, const float *x, size_t n) {
    (void)ctx;
    *out = (float)red_total(x, n, 0);
}

static void cpu_sumsq_acc(void *ctx, float *out, const float *x, size_t n) {
    (void)ctx;
    *out = (float)((double)*out + red_total(x, n, 1));
}

static void cpu_segments_sumsq(void *ctx, float *out, const float *x,
                               const struct param_segment *segs, int n_segs, size_t n) {
    // out (2), x (n), segs (n_segs) within [0, n)
    // Segment by segment into its group's float, exactly as one sumsq_acc per tensor would: the
    // gradient norm (and so clipping) is bitwise the one of the per-tensor loop it replaces.
    (void)n;
    float acc[2] = {0.0f, 0.0f};
    for (int i = 0; i < n_segs; i++) {
        int grp = segs[i].norm_group;
        if (grp != 0 && grp != 1)
            tp_die(TP_EXIT_RUNTIME, "cpu backend: segment %d has norm_group %d (must be 0 or 1)",
                   i, grp);
        cpu_sumsq_acc(ctx, &acc[grp], x + segs[i].offset, segs[i].numel);
    }
    out[0] = acc[0];
    out[1] = acc[1];
}

static void cpu_scale(void *ctx, float *x, float s, size_t n) {
    (void)ctx;
    CPU_OMP(omp parallel for schedule(static) if (n >= CPU_PAR_MIN))
    for (size_t i = 0; i < n; i++) x[i] *= s;
}

// ---- optimiser

// AdamW on one segment [off, off + numel) of the flat buffers with its own weight decay; gscale
// is the whole gradient factor, bc1 and bc2 the bias corrections.
// With split masters (s->p NULL) each master is joined from its halves, updated and split again.
static void adamw_segment(const struct adamw_step *s, size_t off, size_t numel, float weight_decay,
                          float gscale, float bc1, float bc2) {
    float *m = s->m + off, *v = s->v + off; // (numel) each
    const float *g = s->g + off;            // (numel)
    float *p = s->p ? s->p + off : NULL;    // (numel), or the split halves:
    uint16_t *hi = s->p ? NULL : (uint16_t *)s->p_compute + off, *lo = s->p ? NULL : s->p_lo + off;
    float lr = s->lr, beta1 = s->beta1, beta2 = s->beta2, eps = s->eps;
    CPU_OMP(omp parallel for schedule(static) if (numel >= CPU_PAR_MIN))
    for (size_t i = 0; i < numel; i++) {
        float gi = g[i] * gscale;
        float mi = beta1 * m[i] + (1.0f - beta1) * gi;
        float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        float mhat = mi / bc1, vhat = vi / bc2, pi;
        if (p) {
            pi = p[i];
        } else {
            uint32_t bits = tp_split_join(hi[i], lo[i]);
            memcpy(&pi, &bits, sizeof pi);
        }
        pi -= lr * (mhat / (sqrtf(vhat) + eps) + weight_decay * pi);
        if (p) {
            p[i] = pi;
        } else {
            uint32_t bits;
            memcpy(&bits, &pi, sizeof bits);
            hi[i] = tp_split_hi(bits);
            lo[i] = tp_split_lo(bits);
        }
    }
}

static void cpu_adamw(void *ctx, const struct adamw_step *s) {
    // s->p, s->g, s->m, s->v (n); s->p_compute (n) compute type or NULL; s->segs (n_segs)
    // grad_scale and the clip factor are folded into one float before use, so when either is 1
    // every update is bitwise the per-tensor step that took the other as its gradient scale.
    float gscale = s->grad_scale;
    if (s->norm_sq && s->grad_clip > 0.0f) {
        float norm = sqrtf(s->norm_sq[0] + s->norm_sq[1]);
        if (norm > s->grad_clip) gscale *= s->grad_clip / norm; // false for a NaN norm: no clip
    }
    float bc1 = 1.0f - powf(s->beta1, (float)s->t), bc2 = 1.0f - powf(s->beta2, (float)s->t);
    for (int k = 0; k < s->n_segs; k++)
        adamw_segment(s, s->segs[k].offset, s->segs[k].numel, s->segs[k].weight_decay, gscale,
                      bc1, bc2);
    if (s->p && s->p_compute) cpu_to_compute(ctx, s->p_compute, s->p, s->n);
}

// ---- the ops on compute-type tensors: each stages its tensors and runs the fp32 code

static void cpu_vocab_embedding_bwd(void *ctx, float *dwte, const void *dout, const int *tokens,
                                    int N, int C, int vocab_start, int n_vocab) {
    struct stage s = stage_begin(ctx);
    const float *d = stage_in(&s, dout, (size_t)N * C); // (N, C)
    vocab_embedding_bwd_f32(dwte, d, tokens, N, C, vocab_start, n_vocab);
    stage_end(&s);
}

static void cpu_position_embedding_fwd(void *ctx, void *x, const void *wpe, int B, int T, int C) {
    struct stage s = stage_begin(ctx);
    size_t TC = (size_t)T * C;
    float *xf = stage_out(&s, x, (size_t)B * TC); // (B, T, C)
    const float *wf = stage_in(&s, wpe, TC);      // (T, C)
    position_embedding_fwd_f32(xf, wf, B, T, C);
    stage_end(&s);
}

static void cpu_position_embedding_bwd(void *ctx, float *dwpe, const void *dout, int B, int T,
                                       int C) {
    struct stage s = stage_begin(ctx);
    const float *d = stage_in(&s, dout, (size_t)B * T * C); // (B, T, C)
    position_embedding_bwd_f32(dwpe, d, B, T, C);
    stage_end(&s);
}

static void cpu_layernorm_fwd(void *ctx, void *out, float *mean, float *rstd, const void *inp,
                              const void *w, const void *b, int N, int C) {
    struct stage s = stage_begin(ctx);
    size_t NC = (size_t)N * C;
    float *of = stage_out(&s, out, NC);           // (N, C)
    const float *xf = stage_in(&s, inp, NC);      // (N, C)
    const float *wf = stage_in(&s, w, (size_t)C); // (C)
    const float *bf = stage_in(&s, b, (size_t)C); // (C)
    layernorm_fwd_f32(of, mean, rstd, xf, wf, bf, N, C);
    stage_end(&s);
}

// out (C) += the column sums of x (N, C) in the compute type as stored (in bf16, the rounded
// values), in the order a linear layer's bias gradient sums them: where an op's output is the next
// layer's output gradient, its sum is that layer's bias gradient, with the same bits.
static void colsum_as_stored(void *ctx, float *out, const void *x, int N, int C) {
    struct stage s = stage_begin(ctx);
    size_t NC = (size_t)N * C;
    matmul_bwd_dbias(out, stage_in(&s, x, NC), N, C, NC >= CPU_PAR_MIN);
    stage_end(&s);
}

static void cpu_layernorm_bwd(void *ctx, void *dinp, float *dw, float *db, float *dsum,
                              const void *dout, const void *inp, const void *w, const float *mean,
                              const float *rstd, int N, int C) {
    struct stage s = stage_begin(ctx);
    size_t NC = (size_t)N * C;
    float *dif = stage_out(&s, dinp, NC);         // (N, C), accumulated into
    const float *df = stage_in(&s, dout, NC);     // (N, C)
    const float *xf = stage_in(&s, inp, NC);      // (N, C)
    const float *wf = stage_in(&s, w, (size_t)C); // (C)
    layernorm_bwd_f32(dif, dw, db, df, xf, wf, mean, rstd, N, C);
    stage_end(&s);
    if (dsum) colsum_as_stored(ctx, dsum, dinp, N, C);
}

static void cpu_matmul_fwd(void *ctx, void *out, void *pre_gelu, const void *inp, const void *w,
                           const void *bias, int N, int IC, int OC) {
    struct stage s = stage_begin(ctx);
    size_t NO = (size_t)N * OC;
    // With bf16 the GELU reads the fp32 product and both are rounded once, as a GEMM epilogue does.
    float *of = stage_out(&s, out, NO);                  // (N, OC)
    float *pf = stage_out(&s, pre_gelu, NO);             // (N, OC) or NULL
    const float *xf = stage_in(&s, inp, (size_t)N * IC); // (N, IC)
    const float *wf = stage_in(&s, w, (size_t)OC * IC);  // (OC, IC)
    const float *bf = stage_in(&s, bias, (size_t)OC);    // (OC) or NULL
    matmul_fwd_f32(of, pf, xf, wf, bf, N, IC, OC);
    stage_end(&s);
}

static void cpu_matmul_bwd(void *ctx, void *dinp, float *dinp_sum, float *dw, float *dbias,
                           const void *dout, const void *inp, const void *w, const void *pre_gelu, int N,
                           int IC, int OC) {
    struct stage s = stage_begin(ctx);
    size_t NI = (size_t)N * IC;
    float *dif = stage_out(&s, dinp, NI);                 // (N, IC) or NULL
    const float *df = stage_in(&s, dout, (size_t)N * OC); // (N, OC)
    const float *xf = stage_in(&s, inp, NI);              // (N, IC)
    const float *wf = stage_in(&s, w, (size_t)OC * IC);   // (OC, IC)
    const float *pf = stage_in(&s, pre_gelu, NI);         // (N, IC) or NULL
    matmul_bwd_f32(dif, dw, dbias, df, xf, wf, pf, N, IC, OC);
    stage_end(&s);
    if (dinp && dinp_sum) colsum_as_stored(ctx, dinp_sum, dinp, N, IC);
}

static void cpu_residual_fwd(void *ctx, void *out, const void *res, const void *x,
                             const void *bias, int N, int C) {
    struct stage s = stage_begin(ctx);
    size_t NC = (size_t)N * C;
    float *of = stage_out(&s, out, NC);              // (N, C)
    const float *rf = stage_in(&s, res, NC);         // (N, C)
    const float *xf = stage_in(&s, x, NC);           // (N, C)
    const float *bf = stage_in(&s, bias, (size_t)C); // (C) or NULL
    residual_fwd_f32(of, rf, xf, bf, N, C);
    stage_end(&s);
}

// The residual, then the layernorm of the stored sum: exactly the two ops in sequence (the GPU
// fuses them into one pass with the same result up to rounding).
static void cpu_residual_layernorm_fwd(void *ctx, void *out, void *ln, float *mean, float *rstd,
                                       const void *res, const void *x, const void *bias, const void *w,
                                       const void *b, int N, int C) {
    cpu_residual_fwd(ctx, out, res, x, bias, N, C);
    cpu_layernorm_fwd(ctx, ln, mean, rstd, out, w, b, N, C);
}

static void cpu_gelu_fwd(void *ctx, void *out, const void *inp, size_t n) {
    struct stage s = stage_begin(ctx);
    float *of = stage_out(&s, out, n);      // (n)
    const float *xf = stage_in(&s, inp, n); // (n)
    gelu_fwd_f32(of, xf, n);
    stage_end(&s);
}

static void cpu_gelu_bwd(void *ctx, void *dinp, const void *inp, const void *dout, size_t n) {
    struct stage s = stage_begin(ctx);
    float *dif = stage_out(&s, dinp, n);     // (n)
    const float *xf = stage_in(&s, inp, n);  // (n)
    const float *df = stage_in(&s, dout, n); // (n)
    gelu_bwd_f32(dif, xf, df, n);
    stage_end(&s);
}

static void cpu_attention_fwd(void *ctx, void *out, float *saved, float *scratch, const void *qkv,
                              int B, int T, int NH, int HS) {
    (void)scratch; // the probabilities are computed in place in saved
    struct stage s = stage_begin(ctx);
    size_t BTC = (size_t)B * T * NH * HS;
    float *of = stage_out(&s, out, BTC);          // (B, T, NH*HS)
    const float *qf = stage_in(&s, qkv, 3 * BTC); // (B, T, 3*NH*HS)
    attention_fwd_f32(of, saved, qf, B, T, NH, HS);
    stage_end(&s);
}

static void cpu_attention_bwd(void *ctx, void *dqkv, float *dqkv_sum, float *scratch, const void *dout,
                              const void *qkv, const void *out, const float *saved, int B, int T,
                              int NH, int HS) {
    (void)out; // the saved probabilities carry everything the backward needs
    struct stage s = stage_begin(ctx);
    size_t BTC = (size_t)B * T * NH * HS;
    float *dqf = stage_out(&s, dqkv, 3 * BTC);    // (B, T, 3*NH*HS)
    const float *df = stage_in(&s, dout, BTC);    // (B, T, NH*HS)
    const float *qf = stage_in(&s, qkv, 3 * BTC); // (B, T, 3*NH*HS)
    attention_bwd_f32(dqf, scratch, df, qf, saved, B, T, NH, HS);
    stage_end(&s);
    if (dqkv_sum) colsum_as_stored(ctx, dqkv_sum, dqkv, B * T, 3 * NH * HS);
}

static const char *cpu_attention_path(void *ctx, int HS) {
    (void)HS;
    return cpu_dtype(ctx) == TP_DTYPE_BF16 ? "cpu (T,T) bf16-emulated" : "cpu (T,T) fp32";
}

static void cpu_attention_decode(void *ctx, void *out, float *scratch, const void *q,
                                 const void *kcache, const void *vcache, int n_ctx, int NH,
                                 int HS) {
    struct stage s = stage_begin(ctx);
    size_t C = (size_t)NH * HS, nkv = (size_t)n_ctx * C; // only the first n_ctx cache rows are read
    float *of = stage_out(&s, out, C);           // (NH*HS)
    const float *qf = stage_in(&s, q, C);        // (NH*HS)
    const float *kf = stage_in(&s, kcache, nkv); // (n_ctx, NH*HS)
    const float *vf = stage_in(&s, vcache, nkv); // (n_ctx, NH*HS)
    attention_decode_f32(of, scratch, qf, kf, vf, n_ctx, NH, HS);
    stage_end(&s);
}

static void cpu_xent_stats(void *ctx, float *maxes, float *sums, const void *logits,
                           const int *targets, int N, int vocab_start, int n_vocab, int vocab_size) {
    struct stage s = stage_begin(ctx);
    const float *lf = stage_in(&s, logits, (size_t)N * n_vocab); // (N, n_vocab)
    xent_stats_f32(maxes, sums, lf, targets, N, vocab_start, n_vocab, vocab_size);
    stage_end(&s);
}

static void cpu_xent_fused(void *ctx, float *losses, void *dlogits, const void *logits,
                           const int *targets, float dloss, int N, int n_vocab, int vocab_size) {
    struct stage s = stage_begin(ctx);
    size_t NV = (size_t)N * n_vocab;
    float *df = stage_out(&s, dlogits, NV);     // (N, n_vocab) or NULL
    const float *lf = stage_in(&s, logits, NV); // (N, n_vocab)
    xent_fused_f32(losses, df, lf, targets, dloss, N, n_vocab, vocab_size);
    stage_end(&s);
}

static void cpu_xent_bwd(void *ctx, void *dlogits, const void *logits, const float *maxes,
                         const float *sums, const int *targets, float dloss, int N, int vocab_start,
                         int n_vocab, int vocab_size) {
    struct stage s = stage_begin(ctx);
    size_t NV = (size_t)N * n_vocab;
    float *df = stage_out(&s, dlogits, NV);     // (N, n_vocab)
    const float *lf = stage_in(&s, logits, NV); // (N, n_vocab)
    xent_bwd_f32(df, lf, maxes, sums, targets, dloss, N, vocab_start, n_vocab, vocab_size);
    stage_end(&s);
}

// ---- the table

static const struct backend_i cpu_iface = {
    .name = cpu_name,
    .dtype = cpu_dtype,
    .host_accessible = true,
    .alloc = cpu_alloc,
    .free = cpu_free,
    .zero = cpu_zero,
    .copy_to_device = cpu_copy,
    .copy_to_host = cpu_copy,
    .copy = cpu_copy,
    .to_compute = cpu_to_compute,
    .from_compute = cpu_from_compute,
    .synchronize = cpu_synchronize,
    .native_stream = cpu_native_stream,
    .memory_stats = cpu_memory_stats,
    .destroy = cpu_destroy,
    .vocab_embedding_fwd = cpu_vocab_embedding_fwd,
    .vocab_embedding_bwd = cpu_vocab_embedding_bwd,
    .position_embedding_fwd = cpu_position_embedding_fwd,
    .position_embedding_bwd = cpu_position_embedding_bwd,
    .layernorm_fwd = cpu_layernorm_fwd,
    .layernorm_bwd = cpu_layernorm_bwd,
    .matmul_fwd = cpu_matmul_fwd,
    .matmul_bwd = cpu_matmul_bwd,
    .residual_fwd = cpu_residual_fwd,
    .residual_layernorm_fwd = cpu_residual_layernorm_fwd,
    .gelu_fwd = cpu_gelu_fwd,
    .gelu_bwd = cpu_gelu_bwd,
    .attention_saved_floats = cpu_attention_saved_floats,
    .attention_scratch_floats = cpu_attention_scratch_floats,
    .attention_fwd = cpu_attention_fwd,
    .attention_bwd = cpu_attention_bwd,
    .attention_decode = cpu_attention_decode,
    .attention_path = cpu_attention_path,
    .xent_stats = cpu_xent_stats,
    .xent_rescale = cpu_xent_rescale,
    .xent_loss = cpu_xent_loss,
    .xent_bwd = cpu_xent_bwd,
    .xent_fused = cpu_xent_fused,
    .sum = cpu_sum,
    .sumsq_acc = cpu_sumsq_acc,
    .segments_sumsq = cpu_segments_sumsq,
    .scale = cpu_scale,
    .adamw = cpu_adamw,
};

struct backend backend_cpu_create(enum tp_dtype dtype) {
    struct cpu_ctx *ctx = tp_calloc(1, sizeof *ctx);
    ctx->dtype = dtype;
    return (struct backend){.iface = &cpu_iface, .ctx = ctx};
}
