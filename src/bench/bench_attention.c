// bench_attention.c: --bench attention: the backend's causal attention op, forward and forward +
// backward, over a grid of (B, H, HS, T) shapes.
//
//   tptrain --bench attention [BxHxHSxT | CONFIG.yaml]...
//
// A shape is B x H x HS x T (batch, heads, head size, sequence), e.g. 16x12x64x1024. A config
// adds the local shape of every rank at tp = 1, 2, 4 and 8 (where tp divides n_head): B =
// train.micro_batch, H = n_head / tp, HS = n_embd / n_head, T = model.seq_len. Attention has no
// collective, so under TP each rank runs exactly that shape: nothing in the op knows about TP.
// With no argument the grid is the reference shapes below. The op is timed as training calls it
// (attention_fwd, attention_bwd on the qkv layout), in bf16 unless --set train.precision=fp32.
//
// FLOPs are counted causal, as FlashAttention's benchmarks count them: forward 2*B*H*T*T*HS (half
// of the two T x T x HS products), backward 2.5 times that. Memory is what the op needs beside
// nothing else: qkv, out, dout, dqkv, the saved statistics and the scratch.
//
// Sections: shapes, timing, entry point.
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bench_impl.h"
#include "common.h"
#include "config.h"
#include "mesh.h"

// ---- shapes

struct attn_shape {
    int B, H, HS, T;
    char from[64]; // where the shape came from: "reference", "gpt2-124m.yaml tp=2"
};

// The reference grid: shapes where PyTorch's fused attention back ends were measured on an H200
// (GPT-2 small's heads, and 128-wide heads at long sequences).
static const struct attn_shape default_shapes[] = {
    {16, 12, 64, 1024, "reference"}, {4, 12, 64, 4096, "reference"},
    {16, 16, 128, 1024, "reference"}, {4, 16, 128, 4096, "reference"},
    {2, 16, 128, 8192, "reference"},
};

#define MAX_SHAPES 128

// "BxHxHSxT" -> shape; false unless four positive ints separated by 'x'.
static bool parse_shape(const char *s, struct attn_shape *out) {
    int v[4];
    if (!bench_parse_dims(s, 4, v)) return false;
    *out = (struct attn_shape){.B = v[0], .H = v[1], .HS = v[2], .T = v[3]};
    snprintf(out->from, sizeof out->from, "argument");
    return true;
}

static const char *base_name(const char *path) {
    const char *s = strrchr(path, '/');
    return s ? s + 1 : path;
}

// The local shapes of a config at tp = 1, 2, 4, 8; returns the count added or -1 on a bad file.
static int config_shapes(const char *path, struct attn_shape *out, int room, bool root) {
    struct tp_config cfg;
    char err[2048] = "";
    config_defaults(&cfg);
    if (config_load_file(&cfg, path, err, sizeof err)) {
        if (root) fprintf(stderr, "tptrain: %s\n", err);
        return -1;
    }
    const struct tp_model_config *m = &cfg.model;
    if (m->n_head < 1 || m->n_embd % m->n_head) {
        if (root)
            fprintf(stderr, "tptrain: --bench attention: %s: n_embd=%d is not divisible by "
                            "n_head=%d\n", path, m->n_embd, m->n_head);
        return -1;
    }
    int n = 0;
    for (int tp = 1; tp <= 8 && n < room; tp *= 2) {
        if (m->n_head % tp) continue;
        out[n] = (struct attn_shape){.B = cfg.train.micro_batch, .H = m->n_head / tp,
                                     .HS = m->n_embd / m->n_head, .T = m->seq_len};
        snprintf(out[n].from, sizeof out[n].from, "%.48s tp=%d", base_name(path), tp);
        n++;
    }
    return n;
}

// The grid from the arguments (argv[1..]), or the reference grid; returns the count or -1.
static int collect_shapes(const struct bench_opts *o, struct attn_shape *shapes, bool root) {
    int n = 0;
    if (o->argc <= 1) {
        n = (int)(sizeof default_shapes / sizeof default_shapes[0]);
        memcpy(shapes, default_shapes, sizeof default_shapes);
        return n;
    }
    for (int i = 1; i < o->argc; i++) {
        const char *a = o->argv[i];
        size_t len = strlen(a);
        if (len > 5 && (strcmp(a + len - 5, ".yaml") == 0 || strcmp(a + len - 4, ".yml") == 0)) {
            int k = config_shapes(a, shapes + n, MAX_SHAPES - n, root);
            if (k < 0) return -1;
            n += k;
        } else if (n < MAX_SHAPES && parse_shape(a, &shapes[n])) {
            n++;
        } else {
            if (root)
                fprintf(stderr, "tptrain: --bench attention: '%s' is neither a shape BxHxHSxT (e.g. "
                                "16x12x64x1024) nor a config file (.yaml)%s\n",
                        a, n >= MAX_SHAPES ? " (or the grid is full: at most 128 shapes)" : "");
            return -1;
        }
    }
    return n;
}

// ---- timing

struct attn_result {
    double fwd_ms, total_ms;  // means over back-to-back calls
    double fwd_tflops, total_tflops;
    double mem_gib;           // bytes the op needs, GiB
    double extra_mib;         // of which saved statistics and scratch, MiB
    const char *path;         // the kernel path the backend takes
};

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
}

// Fills n compute-type elements with N(0, 1)-ish values (a sum of uniforms), seeded.
static void fill_random(struct backend be, void *dst, size_t n, uint64_t seed) {
    float *h = tp_malloc(n * sizeof *h);
    for (size_t i = 0; i < n; i++) {
        uint64_t r = tp_splitmix64(seed + i);
        float u = (float)((r >> 40) & 0xFFFFFF) / 16777216.0f, w = (float)(r & 0xFFFFFF) / 16777216.0f;
        h[i] = 1.7320508f * (u + w - 1.0f) * 1.4142135f;
    }
    float *tmp = be.iface->alloc(be.ctx, n * sizeof(float));
    be.iface->copy_to_device(be.ctx, tmp, h, n * sizeof(float));
    be.iface->to_compute(be.ctx, dst, tmp, n);
    be.iface->free(be.ctx, tmp);
    free(h);
}

// Times one shape: warm-up, then iters runs of forward alone and of forward + backward.
static void time_shape(struct backend be, const struct attn_shape *s, int warmup, int iters,
                       struct attn_result *r) {
    const struct backend_i *bi = be.iface;
    int B = s->B, H = s->H, HS = s->HS, T = s->T, C = H * HS;
    size_t BT = (size_t)B * T, es = tp_dtype_size(bi->dtype(be.ctx));
    size_t nsaved = bi->attention_saved_floats(be.ctx, B, T, H, HS);
    size_t nscr = bi->attention_scratch_floats(be.ctx, B, T, H, HS);
    void *qkv = bi->alloc(be.ctx, BT * 3 * C * es);   // (B, T, 3C)
    void *out = bi->alloc(be.ctx, BT * C * es);       // (B, T, C)
    void *dout = bi->alloc(be.ctx, BT * C * es);      // (B, T, C)
    void *dqkv = bi->alloc(be.ctx, BT * 3 * C * es);  // (B, T, 3C)
    float *saved = bi->alloc(be.ctx, (nsaved + 1) * sizeof(float));
    float *scratch = bi->alloc(be.ctx, (nscr + 1) * sizeof(float));
    fill_random(be, qkv, BT * 3 * C, 1000 + (uint64_t)T);
    fill_random(be, dout, BT * C, 2000 + (uint64_t)T);

    // Back-to-back calls between two marks, as a training step issues them: no host wait between
    // iterations, so launch overhead hides behind the device work (the mean per call is reported).
    bool events = bi->event_create != NULL;
    void *ev[2] = {NULL, NULL};
    if (events)
        for (int i = 0; i < 2; i++) ev[i] = bi->event_create(be.ctx);
    double ms[2];
    for (int pass = 0; pass < 2; pass++) { // 0: forward alone, 1: forward + backward
        double h0 = 0.0;
        for (int it = -warmup; it < iters; it++) {
            if (it == 0) {
                if (events) bi->event_record(be.ctx, ev[0]);
                else bi->synchronize(be.ctx), h0 = now_ms();
            }
            bi->attention_fwd(be.ctx, out, saved, scratch, qkv, B, T, H, HS);
            if (pass) bi->attention_bwd(be.ctx, dqkv, NULL, scratch, dout, qkv, out, saved, B, T, H, HS);
        }
        if (events) {
            bi->event_record(be.ctx, ev[1]);
            ms[pass] = bi->event_elapsed_ms(be.ctx, ev[0], ev[1]) / iters;
        } else {
            bi->synchronize(be.ctx);
            ms[pass] = (now_ms() - h0) / iters;
        }
    }
    bi->synchronize(be.ctx);
    double fl = 2.0 * B * H * (double)T * T * HS; // causal forward
    r->fwd_ms = ms[0];
    r->total_ms = ms[1];
    r->fwd_tflops = fl / (r->fwd_ms * 1e9);
    r->total_tflops = 3.5 * fl / (r->total_ms * 1e9);
    double extra = (double)(nsaved + nscr) * sizeof(float);
    r->mem_gib = ((double)BT * 8 * C * es + extra) / (1024.0 * 1024.0 * 1024.0);
    r->extra_mib = extra / (1024.0 * 1024.0);
    r->path = bi->attention_path ? bi->attention_path(be.ctx, HS) : bi->name(be.ctx);
    if (events)
        for (int i = 0; i < 2; i++) bi->event_destroy(be.ctx, ev[i]);
    void *bufs[] = {qkv, out, dout, dqkv, saved, scratch};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) bi->free(be.ctx, bufs[i]);
}

// ---- entry point

// Iterations: TPTRAIN_BENCH_ITERS ("N" or "W+N") when set, else 20 after 3 warm-ups (fewer for
// the CPU, where a shape takes seconds).
static void attn_iters(bool gpu, int *warmup, int *iters) {
    *warmup = gpu ? 3 : 1;
    *iters = gpu ? 20 : 3;
    const char *e = getenv("TPTRAIN_BENCH_ITERS");
    int w, n;
    if (!e) return;
    if (sscanf(e, "%d+%d", &w, &n) == 2 && w >= 0 && n >= 1) *warmup = w, *iters = n;
    else if (sscanf(e, "%d", &n) == 1 && n >= 1) *iters = n;
}

static int attention_standalone(const struct bench_opts *o, int world_rank, int world_size) {
    bool root = world_rank == 0;
    if (world_size != 1) {
        if (root)
            fprintf(stderr, "tptrain: --bench attention runs as one process: attention has no "
                            "collective, each TP rank runs its own heads (give a config to get "
                            "the local shapes at tp 1, 2, 4, 8)\n");
        return TP_EXIT_USAGE;
    }
    struct attn_shape *shapes = tp_calloc(MAX_SHAPES, sizeof *shapes);
    int n = collect_shapes(o, shapes, root);
    struct tp_config cfg;
    char err[2048] = "";
    config_defaults(&cfg);
    cfg.train.precision = TP_PREC_BF16; // the fused kernels are what this mode is for
    int st = n < 0 ? TP_EXIT_USAGE : 0;
    for (int i = 0; !st && i < o->n_sets; i++) st = config_apply_set(&cfg, o->sets[i], err, sizeof err);
    if (st && err[0]) fprintf(stderr, "tptrain: %s\n", err);
    for (int i = 0; !st && i < n; i++) {
        const struct attn_shape *s = &shapes[i];
        if (cfg.train.precision == TP_PREC_BF16 && (s->HS % 8 || s->HS > 256)) {
            fprintf(stderr, "tptrain: --bench attention: head size %d is not a multiple of 8 in "
                            "[8, 256], which bf16 needs; add --set train.precision=fp32\n", s->HS);
            st = TP_EXIT_USAGE;
        }
    }
    struct mesh mesh = {0};
    bool have_mesh = false;
    struct backend be = {0};
    if (!st) {
        mesh_init(&mesh, &cfg);
        have_mesh = true;
        st = mesh_create_backend(&mesh, &cfg, &be, err, sizeof err);
        if (st) fprintf(stderr, "tptrain: %s\n", err);
    }
    FILE *jf = NULL;
    if (!st && o->json_path && !(jf = fopen(o->json_path, "w"))) {
        fprintf(stderr, "tptrain: --json %s: cannot open for writing: %s\n", o->json_path,
                strerror(errno));
        st = TP_EXIT_USAGE;
    }
    if (st) {
        if (be.iface) backend_destroy(&be);
        if (have_mesh) mesh_destroy(&mesh);
        free(shapes);
        return st;
    }

    int warmup, iters;
    attn_iters(mesh.device >= 0, &warmup, &iters);
    printf("# tptrain --bench attention: backend %s, %s, causal, mean of %d back-to-back calls after %d "
           "warm-up\n",
           be.iface->name(be.ctx), config_precision_name(cfg.train.precision), iters, warmup);
    printf("# TFLOP/s counted causal: forward 2*B*H*T*T*HS, backward 2.5x that\n");
    printf("%4s %4s %4s %6s  %-26s %9s %8s %10s %8s %9s %9s  %s\n", "B", "H", "HS", "T", "path",
           "fwd_ms", "fwd_TF", "fwdbwd_ms", "fb_TF", "mem_GiB", "extra_MiB", "from");
    json_t *rows = json_array();
    for (int i = 0; i < n; i++) {
        const struct attn_shape *s = &shapes[i];
        struct attn_result r;
        time_shape(be, s, warmup, iters, &r);
        printf("%4d %4d %4d %6d  %-26s %9.3f %8.1f %10.3f %8.1f %9.3f %9.2f  %s\n", s->B, s->H,
               s->HS, s->T, r.path, r.fwd_ms, r.fwd_tflops, r.total_ms, r.total_tflops, r.mem_gib,
               r.extra_mib, s->from);
        fflush(stdout);
        json_array_append_new(
            rows, json_pack("{s:i, s:i, s:i, s:i, s:s, s:s, s:f, s:f, s:f, s:f, s:f, s:f}", "B",
                            s->B, "H", s->H, "HS", s->HS, "T", s->T, "path", r.path, "from",
                            s->from, "fwd_ms", r.fwd_ms, "fwd_tflops", r.fwd_tflops,
                            "fwd_bwd_ms", r.total_ms, "fwd_bwd_tflops", r.total_tflops,
                            "mem_gib", r.mem_gib, "extra_mib", r.extra_mib));
    }
    if (jf) {
        json_t *doc = json_pack("{s:s, s:s, s:s, s:i, s:i, s:o}", "mode", "attention", "backend",
                                be.iface->name(be.ctx), "precision",
                                config_precision_name(cfg.train.precision), "iters", iters,
                                "warmup", warmup, "rows", rows);
        rows = NULL;
        int bad = json_dumpf(doc, jf, JSON_INDENT(1)) != 0;
        bad |= fputc('\n', jf) == EOF;
        bad |= fclose(jf) != 0;
        json_decref(doc);
        if (bad) {
            fprintf(stderr, "tptrain: --json %s: write failed: %s\n", o->json_path, strerror(errno));
            st = TP_EXIT_RUNTIME;
        }
    }
    json_decref(rows);
    backend_destroy(&be);
    mesh_destroy(&mesh);
    free(shapes);
    return st;
}

const struct bench_mode bench_mode_attention = {
    .name = "attention",
    .synopsis = "attention [BxHxHSxT | CONFIG.yaml]...",
    .standalone = attention_standalone, // one process, its own timing: no mesh or phase driver
};
