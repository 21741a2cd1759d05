// eval.c: --eval: the validation loss of a checkpoint at any TP size, and text generation with a
// KV cache across the TP group.
//
// The run is rebuilt from the checkpoint's config.yaml with --set overrides on top; by default
// every rank joins one TP group (parallel.tp = world size). Mesh, backend, model and the loss
// figure come from the same code the training loop uses (train.h), so the printed validation
// loss is the one training logged for that step when the data, batches and DP size agree.
#include "eval.h"

#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "ckpt.h"
#include "llmc.h"
#include "common.h"
#include "config.h"
#include "data.h"
#include "text.h"
#include "tokenizer.h"
#include "mesh.h"
#include "model.h"
#include "tp.h"
#include "train.h"

#define EVAL_EOT 50256

// ---- config

// Builds the run config from the checkpoint's config.yaml. Keys that only training uses are
// cleared so that their files need not exist here; the derived batch keys are recomputed for
// this world size. Returns 0 or TP_EXIT_USAGE with err set (identical on every rank).
// The defaults with the shape of a Hugging Face model directory's config.json (its other fields
// are checked when the weights load).
static int hf_base_config(struct tp_config *cfg, const char *path, char *err, size_t errlen) {
    config_defaults(cfg);
    json_error_t e;
    json_t *c = json_load_file(path, JSON_REJECT_DUPLICATES, &e);
    if (!c) return tp_errf(err, errlen, "%s: cannot read as JSON (%s)", path, e.text);
    static const char *const keys[5] = {"n_layer", "n_head", "n_embd", "vocab_size", "n_positions"};
    int *dst[5] = {&cfg->model.n_layer, &cfg->model.n_head, &cfg->model.n_embd, &cfg->model.vocab_size,
                   &cfg->model.seq_len};
    int st = 0;
    for (int i = 0; i < 5 && !st; i++) {
        const json_t *v = json_object_get(c, keys[i]);
        if (!json_is_integer(v) || json_integer_value(v) < 1 || json_integer_value(v) > (1 << 24))
            st = tp_errf(err, errlen, "%s: %s is missing or not a positive integer", path, keys[i]);
        else *dst[i] = (int)json_integer_value(v);
    }
    json_decref(c);
    return st;
}

static int eval_config(struct tp_config *cfg, const struct eval_opts *o, const char *dir, bool hf, int world_size,
                       char *err, size_t errlen) {
    char path[2 * TP_PATH_MAX + 32];
    snprintf(path, sizeof path, "%s/%s", dir, hf ? "config.json" : "config.yaml");
    int st;
    if (hf) {
        st = hf_base_config(cfg, path, err, errlen);
    } else {
        config_defaults(cfg);
        st = config_load_file(cfg, path, err, errlen);
    }
    if (st) return st;
    cfg->checkpoint.dir[0] = cfg->checkpoint.resume[0] = '\0';
    cfg->init.from[0] = cfg->log.jsonl[0] = cfg->debug.dump_init[0] = '\0';
    cfg->parallel.tp = world_size;
    cfg->parallel.dp = 0;
    cfg->train.global_batch = 0;
    if (o->generate) cfg->train.micro_batch = 1; // the decoder keeps its own (1-token) buffers
    for (int i = 0; i < o->n_sets && !st; i++) st = config_apply_set(cfg, o->sets[i], err, errlen);
    if (st) return st;
    char data[TP_PATH_MAX];
    snprintf(data, sizeof data, "%s", o->generate ? "" : o->data ? o->data : cfg->data.val);
    if (!o->generate && !data[0])
        return tp_errf(err, errlen, "--eval: the checkpoint's config has no data.val; pass --data GLOB");
    snprintf(cfg->data.val, sizeof cfg->data.val, "%s", data);
    // Validation insists that data.train names files; point it at one this run reads anyway.
    const char *train = o->generate ? path : data;
    if (strlen(train) >= sizeof cfg->data.train)
        return tp_errf(err, errlen, "%s: path too long", train);
    memcpy(cfg->data.train, train, strlen(train) + 1);
    return config_validate(cfg, world_size, err, errlen);
}

// ---- validation loss

static int eval_loss(struct model *m, struct mesh *mesh, const struct tp_config *cfg, const struct eval_opts *o,
                     const struct ckpt_state *cs, const char *dir) {
    char err[2048] = "";
    int batches = o->batches;
    bool root = mesh->world_rank == 0;
    if (batches == 0) {
        // Training evaluated eval.batches micro-batches on each of its DP ranks, i.e. the first
        // batches * dp blocks of the stream; the same blocks here give the same figure.
        long want = (long)cfg->eval.batches * cs->dp_size;
        batches = want % mesh->dp_size == 0 ? (int)(want / mesh->dp_size) : cfg->eval.batches;
    }
    struct data_loader dl;
    int st = data_open(&dl, cfg->data.val, m->d.B, m->d.T, mesh->dp_rank, mesh->dp_size, m->d.V, err, sizeof err);
    // more batches than the data holds would wrap around and count sequences twice
    if (!st && o->batches > 0 && (size_t)o->batches > data_batches_per_epoch(&dl)) {
        snprintf(err, sizeof err,
                 "--batches %d: %s holds %zu micro-batches of %d x %d per rank (dp %d); give at most %zu",
                 o->batches, cfg->data.val, data_batches_per_epoch(&dl), m->d.B, m->d.T, mesh->dp_size,
                 data_batches_per_epoch(&dl));
        data_close(&dl);
        st = TP_EXIT_USAGE;
    }
    if ((st = train_agree(mesh, st, err))) return st;
    double loss = 0.0;
    double t0 = tp_now();
    st = train_val_loss(m, mesh, &dl, batches, &loss);
    data_close(&dl);
    if (st) return st;
    size_t tokens = (size_t)batches * m->d.N * (size_t)mesh->dp_size;
    if (root) {
        printf("eval %s (step %d) | mesh dp=%d x tp=%d | data %s | %d micro-batches of %d x %d per rank | %.2f s\n",
               dir, cs->step, mesh->dp_size, mesh->tp.size, cfg->data.val, batches, m->d.B, m->d.T, tp_now() - t0);
        if (cs->has_val && !o->data && !o->batches) // the same data and batches
            printf("training logged val loss %.6f at step %d\n", cs->val_loss, cs->step);
        printf("val loss %.6f | perplexity %.2f | tokens %zu\n", loss, exp(loss), tokens);
        fflush(stdout);
    }
    return 0;
}

// ---- generation with a KV cache

// One-token forward through the model with per-layer caches of this rank's keys and values: the
// model's own blocks (hence the same layers and collectives as model_forward) for a single
// position, with attention reading the cache instead of the whole sequence.
struct decoder {
    struct model *m;
    struct comm *tp;
    int cap;          // positions the cache holds (= seq_len: wpe has no more rows)
    int pos;          // the position being fed
    size_t es;        // bytes per compute-type element
    // compute type:
    void *kc, *vc;    // (L, cap, Cl) each
    void *x;          // (C) residual stream
    void *ln;         // (C)
    void *qkv;        // (3*Cl)
    void *atty;       // (Cl)
    void *proj;       // (C)
    void *fch, *fch_gelu; // (Fl) each, before and after GELU
    void *logits;     // (Vl) this rank's vocabulary columns
    void *gathered;   // (Vp) every rank's columns in rank order
    // fp32:
    float *stats;     // (2) layernorm mean, rstd
    float *scores;    // (NHl * cap) attention scratch
    float *logits32;  // (Vp) the gathered logits widened
    int *token;       // (1)
    float *host;      // (Vp) host copy of the logits
};

static void decoder_create(struct decoder *dec, struct model *m, struct comm *tp) {
    const struct model_dims *d = &m->d;
    const struct backend_i *b = m->be.iface;
    void *ctx = m->be.ctx;
    memset(dec, 0, sizeof *dec);
    dec->m = m;
    dec->tp = tp;
    dec->cap = d->T;
    dec->es = tp_dtype_size(m->dtype);
    size_t cache = (size_t)d->L * (size_t)d->T * (size_t)d->Cl;
#define DEC_ALLOC(ptr, n, elem) ((ptr) = b->alloc(ctx, (size_t)(n) * (elem)))
    DEC_ALLOC(dec->kc, cache, dec->es);
    DEC_ALLOC(dec->vc, cache, dec->es);
    DEC_ALLOC(dec->x, d->C, dec->es);
    DEC_ALLOC(dec->ln, d->C, dec->es);
    DEC_ALLOC(dec->qkv, 3 * d->Cl, dec->es);
    DEC_ALLOC(dec->atty, d->Cl, dec->es);
    DEC_ALLOC(dec->proj, d->C, dec->es);
    DEC_ALLOC(dec->fch, d->Fl, dec->es);
    DEC_ALLOC(dec->fch_gelu, d->Fl, dec->es);
    DEC_ALLOC(dec->logits, d->Vl, dec->es);
    DEC_ALLOC(dec->gathered, d->Vp, dec->es);
    DEC_ALLOC(dec->stats, 2, sizeof(float));
    DEC_ALLOC(dec->scores, (size_t)d->NHl * (size_t)d->T, sizeof(float));
    DEC_ALLOC(dec->logits32, d->Vp, sizeof(float));
    DEC_ALLOC(dec->token, 1, sizeof(int));
#undef DEC_ALLOC
    dec->host = tp_malloc((size_t)d->Vp * sizeof(float));
}

static void decoder_destroy(struct decoder *dec) {
    const struct backend_i *b = dec->m->be.iface;
    void *ctx = dec->m->be.ctx;
    void *bufs[] = {dec->kc, dec->vc, dec->x, dec->ln, dec->stats, dec->qkv, dec->atty, dec->proj, dec->fch,
                    dec->fch_gelu, dec->logits, dec->gathered, dec->scores, dec->logits32, dec->token};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) b->free(ctx, bufs[i]);
    free(dec->host);
}

// Attention for the token at dec->pos: append its k and v to layer l's cache, then attend to the
// cached positions [0, pos].
static void attend_cache(void *arg, int l, void *atty, const void *qkv) {
    struct decoder *dec = arg;
    const struct model_dims *d = &dec->m->d;
    const struct backend_i *b = dec->m->be.iface;
    void *ctx = dec->m->be.ctx;
    size_t es = dec->es, row = (size_t)d->Cl * es, layer_cache = (size_t)dec->cap * row; // bytes
    char *kc = (char *)dec->kc + (size_t)l * layer_cache, *vc = (char *)dec->vc + (size_t)l * layer_cache; // (cap, Cl)
    // qkv holds [q | k | v] of this rank's heads
    b->copy(ctx, kc + (size_t)dec->pos * row, (const char *)qkv + row, row);
    b->copy(ctx, vc + (size_t)dec->pos * row, (const char *)qkv + 2 * row, row);
    b->attention_decode(ctx, atty, dec->scores, qkv, kc, vc, dec->pos + 1, d->NHl, d->HS);
}

// Feeds `token` at position pos (< cap; the cache holds positions [0, pos)) and leaves the logits
// of the whole (padded) vocabulary in dec->host. The blocks are the model's own
// (model_block_*_fwd) with N = 1, the residual stream updated in place in dec->x.
static void decoder_step(struct decoder *dec, int token, int pos) {
    struct model *m = dec->m;
    const struct model_dims *d = &m->d;
    const struct backend_i *b = m->be.iface;
    void *ctx = m->be.ctx;
    struct comm *tp = dec->tp;
    int C = d->C;
    float *mean = dec->stats, *rstd = dec->stats + 1;
    dec->pos = pos;
    b->copy_to_device(ctx, dec->token, &token, sizeof token);
    const void *wpe_row = (const char *)m->p.wpe + (size_t)pos * (size_t)C * dec->es; // (1, C) this position's
    vocab_parallel_embedding_fwd(m->be, tp, dec->x, dec->token, m->p.wte, wpe_row, 1, 1, C, d->Vl, NULL);
    b->layernorm_fwd(ctx, dec->ln, mean, rstd, dec->x, m->p.layers[0].ln1w, m->p.layers[0].ln1b, 1, C);
    // Each layernorm's output is consumed before the next one overwrites it: one buffer serves all.
    struct block_acts a = {
        .N = 1, .ln1 = dec->ln, .qkv = dec->qkv, .atty = dec->atty, .proj = dec->proj, .res1 = dec->x,
        .res2 = dec->x, .ln2 = dec->ln, .ln2_mean = mean, .ln2_rstd = rstd, .fch = dec->fch,
        .fch_gelu = dec->fch_gelu, .res3 = dec->x, .ln_next = dec->ln, .next_mean = mean, .next_rstd = rstd,
    };
    struct block_attention att = {attend_cache, dec};
    for (int l = 0; l < d->L; l++) {
        model_block_attention_fwd(m, tp, l, &a, &att);
        model_block_mlp_fwd(m, tp, l, &a);
    }
    column_parallel_linear_fwd(m->be, tp, dec->logits, NULL, dec->ln, m->p.wte, NULL, 1, C, d->Vl, NULL);
    // Logits are vocab-sharded: every rank needs all of them to draw the same token.
    gather_from_tp_region_fwd(m->be, tp, dec->gathered, dec->logits, 1, (size_t)d->Vl);
    b->from_compute(ctx, dec->logits32, dec->gathered, (size_t)d->Vp);
    b->copy_to_host(ctx, dec->host, dec->logits32, (size_t)d->Vp * sizeof(float));
}

// The k-th largest (1-based) of x (n), reordering x: quickselect, expected O(n).
static float kth_largest(float *x, int n, int k) {
    int lo = 0, hi = n - 1, want = k - 1; // index in descending order
    while (lo < hi) {
        float pivot = x[lo + (hi - lo) / 2];
        int i = lo, j = hi;
        while (i <= j) {
            while (x[i] > pivot) i++;
            while (x[j] < pivot) j--;
            if (i <= j) {
                float t = x[i];
                x[i++] = x[j];
                x[j--] = t;
            }
        }
        if (want <= j) hi = j;
        else if (want >= i) lo = i;
        else return x[want];
    }
    return x[want];
}

// Draws token number `index` of the sample from logits (V real entries): softmax at temperature,
// restricted to the top_k largest (0 = all). Counter-based: the uniform is a hash of (seed,
// index), so every rank draws the same token from the same logits with no shared state.
// tmp: V floats, w: V doubles of scratch.
static int sample_token(const float *logits, int V, double temperature, int top_k, unsigned long long seed,
                        uint64_t index, float *tmp, double *w) {
    float threshold = -INFINITY;
    if (top_k > 0 && top_k < V) {
        memcpy(tmp, logits, (size_t)V * sizeof(float));
        threshold = kth_largest(tmp, V, top_k);
    }
    float mx = -INFINITY;
    for (int i = 0; i < V; i++)
        if (logits[i] > mx) mx = logits[i];
    double total = 0.0;
    for (int i = 0; i < V; i++) {
        w[i] = logits[i] >= threshold ? exp(((double)logits[i] - mx) / temperature) : 0.0;
        total += w[i];
    }
    uint64_t r = tp_splitmix64((uint64_t)seed ^ tp_splitmix64(index + 0x5851F42D4C957F2Dull));
    double u = (double)(r >> 11) * 0x1.0p-53 * total;
    double acc = 0.0;
    int last = 0;
    for (int i = 0; i < V; i++) {
        if (w[i] == 0.0) continue;
        acc += w[i];
        last = i;
        if (u < acc) return i;
    }
    return last; // rounding left u at the very top
}

// Reads whitespace-separated token ids; each must be below vocab_size.
static int read_prompt(const char *path, int vocab_size, int **out, int *count, char *err, size_t errlen) {
    *out = NULL;
    *count = 0;
    FILE *f = fopen(path, "r");
    if (!f) return snprintf(err, errlen, "--prompt-tokens %s: cannot open: %s", path, strerror(errno)), TP_EXIT_USAGE;
    int cap = 256, n = 0, *ids = tp_malloc((size_t)cap * sizeof *ids);
    long v;
    int rc = 0;
    while ((rc = fscanf(f, "%ld", &v)) == 1) {
        if (v < 0 || v >= vocab_size) {
            fclose(f);
            free(ids);
            return snprintf(err, errlen, "--prompt-tokens %s: token %d is %ld, outside the model's vocabulary "
                            "[0, %d)", path, n + 1, v, vocab_size), TP_EXIT_USAGE;
        }
        if (n == EVAL_MAX_GENERATE) {
            fclose(f);
            free(ids);
            return snprintf(err, errlen, "--prompt-tokens %s: more than %d token ids; shorten the prompt",
                            path, EVAL_MAX_GENERATE), TP_EXIT_USAGE;
        }
        if (n == cap) {
            int *t = tp_malloc((size_t)cap * 2 * sizeof *t);
            memcpy(t, ids, (size_t)cap * sizeof *t);
            free(ids);
            ids = t;
            cap *= 2;
        }
        ids[n++] = (int)v;
    }
    bool bad = rc != EOF || ferror(f);
    fclose(f);
    if (bad || n == 0) {
        free(ids);
        return snprintf(err, errlen, "--prompt-tokens %s: %s; the file holds token ids separated by whitespace",
                        path, n ? "a word that is not an integer" : "no token ids"), TP_EXIT_USAGE;
    }
    *out = ids;
    *count = n;
    return 0;
}

static void print_token(const struct tokenizer *tk, int token) {
    if (token >= 0 && token < tk->vocab_size) fwrite(tk->pieces[token], 1, tk->lengths[token], stdout);
}

// Streams one token in the chosen format (JSON lines print everything at the end).
static void emit_token(enum text_format format, const struct tokenizer *tk, int token, bool first) {
    if (format == TEXT_FORMAT_TEXT) print_token(tk, token);
    else if (format == TEXT_FORMAT_IDS) printf(first ? "%d" : " %d", token);
}

// The --format jsonl line: the prompt and the sample, as text and as ids.
static void print_jsonl(const struct tokenizer *tk, const int *ctx, int n_prompt, int n_total, unsigned long long seed,
                        const struct eval_opts *o) {
    size_t len;
    json_t *j = json_object();
    char *t = text_decode(tk, ctx, (size_t)n_prompt, &len);
    json_object_set_new(j, "prompt", text_json_string(t, len));
    free(t);
    json_object_set_new(j, "prompt_ids", text_json_ids(ctx, (size_t)n_prompt));
    t = text_decode(tk, ctx + n_prompt, (size_t)(n_total - n_prompt), &len);
    json_object_set_new(j, "text", text_json_string(t, len));
    free(t);
    json_object_set_new(j, "ids", text_json_ids(ctx + n_prompt, (size_t)(n_total - n_prompt)));
    json_object_set_new(j, "seed", json_integer((json_int_t)seed));
    json_object_set_new(j, "temperature", json_real(o->temperature));
    json_object_set_new(j, "top_k", json_integer(o->top_k));
    json_dumpf(j, stdout, JSON_COMPACT);
    putchar('\n');
    json_decref(j);
}

// Samples o->generate tokens after the prompt (NULL: end-of-text). The cache holds seq_len
// positions (wpe has no more); when it is full the context slides: the newest seq_len/2 tokens are
// fed again from position 0 and sampling continues. With --format ids or jsonl, standard output
// carries only the result and the progress lines go to standard error.
static int generate(struct model *m, struct mesh *mesh, const struct tp_config *cfg, const struct eval_opts *o,
                    const struct tokenizer *tk, const int *prompt, int n_prompt) {
    bool root = mesh->world_rank == 0;
    int V = m->d.V, T = m->d.T;
    // End-of-text starts a fresh document; a smaller test vocabulary has no such token.
    int eot = V > EVAL_EOT ? EVAL_EOT : V - 1;
    if (!prompt) {
        prompt = &eot;
        n_prompt = 1;
    }
    unsigned long long seed = o->seed_set ? o->seed : cfg->train.seed;
    int total = n_prompt + o->generate; // each at most EVAL_MAX_GENERATE: no overflow
    int *ctx = tp_malloc((size_t)total * sizeof *ctx); // every token so far
    memcpy(ctx, prompt, (size_t)n_prompt * sizeof *ctx);
    float *tmp = tp_malloc((size_t)V * sizeof(float));  // (V) sampling scratch
    double *w = tp_malloc((size_t)V * sizeof(double)); // (V) sampling weights
    struct decoder dec;
    decoder_create(&dec, m, &mesh->tp);
    FILE *info = o->format == TEXT_FORMAT_TEXT ? stdout : stderr;
    if (root) {
        fprintf(info, "generating %d tokens | seed %llu | temperature %g | top-k %d | prompt %d tokens | mesh dp=%d x tp=%d\n",
                o->generate, seed, o->temperature, o->top_k, n_prompt, mesh->dp_size, mesh->tp.size);
        for (int i = 0; i < n_prompt; i++) emit_token(o->format, tk, ctx[i], i == 0);
        fflush(stdout);
    }
    double t0 = tp_now();
    // ctx[0, n) is the text so far; the cache holds the keys and values of its last pos tokens,
    // and dec.host the logits after ctx[n - 1]. A prompt longer than T slides like generation.
    int n = n_prompt, pos = 0;
    for (int i = n > T ? n - T / 2 : 0; i < n; i++) decoder_step(&dec, ctx[i], pos++);
    while (n < total) {
        int tok = sample_token(dec.host, V, o->temperature, o->top_k, seed, (uint64_t)(n - n_prompt), tmp, w);
        // The host code above is identical on every rank; the broadcast only guards against
        // a math library that differs between nodes.
        comm_host_broadcast(&mesh->tp, &tok, 1, COMM_I32, 0);
        ctx[n++] = tok;
        if (root) {
            emit_token(o->format, tk, tok, false);
            fflush(stdout);
        }
        if (n == total) break;
        if (pos == T) { // the cache is full: slide to the newest T/2 tokens
            pos = 0;
            for (int i = n - T / 2; i < n - 1; i++) decoder_step(&dec, ctx[i], pos++);
        }
        decoder_step(&dec, tok, pos++);
    }
    double secs = tp_now() - t0;
    if (root) {
        if (o->format == TEXT_FORMAT_JSONL) print_jsonl(tk, ctx, n_prompt, total, seed, o);
        else if (o->format == TEXT_FORMAT_IDS) putchar('\n');
        fprintf(info, "%sgenerated %d tokens in %.2f s (%.1f tokens/s)\n", o->format == TEXT_FORMAT_TEXT ? "\n" : "",
                o->generate, secs, o->generate / secs);
        fflush(stdout);
    }
    decoder_destroy(&dec);
    free(tmp);
    free(w);
    free(ctx);
    return 0;
}

// ---- entry

int eval_run(const struct eval_opts *o) {
    int rank = 0, world = 1;
    mesh_world(&rank, &world);
    bool root = rank == 0;
    char err[2048] = "", dir[2 * TP_PATH_MAX] = "";
    // Every rank reads the same files, so they fail alike: rank 0 speaks for all.
    int st = ckpt_resolve(o->checkpoint, dir, sizeof dir, err, sizeof err);
    // not a tptrain checkpoint: a Hugging Face model directory (config.json beside the weights)?
    char hf_cfg[2 * TP_PATH_MAX + 32];
    snprintf(hf_cfg, sizeof hf_cfg, "%s/config.json", o->checkpoint);
    struct stat sb;
    bool hf = st == 1 && stat(hf_cfg, &sb) == 0 && S_ISREG(sb.st_mode);
    if (hf) {
        st = 0;
        snprintf(dir, sizeof dir, "%s", o->checkpoint);
    } else if (st == 1) {
        snprintf(err, sizeof err, "--eval %s: holds no checkpoint (no state.json, no `latest`, no step_N directory, "
                 "no Hugging Face config.json)", o->checkpoint);
        st = TP_EXIT_USAGE;
    }
    struct ckpt_state cs = {.dp_size = 1};
    if (!st && !hf) st = ckpt_read_state(dir, &cs, err, sizeof err);
    static struct tp_config cfg;
    if (!st) st = eval_config(&cfg, o, dir, hf, world, err, sizeof err);
    // the shape state.json recorded, before anything is allocated from config.yaml's
    if (!st && !hf) st = ckpt_check_model(&cs, &cfg.model, dir, err, sizeof err);
    // The prompt is read (or encoded) before the model loads, so its errors come first.
    struct text_codec tc = {0};
    int *prompt = NULL, n_prompt = 0;
    if (!st && o->generate)
        st = text_open(&tc, o->tokenizer ? o->tokenizer : TEXT_TOKENIZER_PATH, o->prompt_text != NULL, err, sizeof err);
    if (!st && o->prompt_text)
        st = text_encode_prompt(&tc, o->prompt_text, cfg.model.vocab_size, &prompt, &n_prompt, err, sizeof err);
    if (!st && o->prompt_tokens)
        st = read_prompt(o->prompt_tokens, cfg.model.vocab_size, &prompt, &n_prompt, err, sizeof err);
    if (st) {
        if (root) fprintf(stderr, "tptrain: %s\n", err);
        text_close(&tc);
        return st;
    }
    if (o->generate && tc.tk.vocab_size < cfg.model.vocab_size && root)
        fprintf(stderr, "tptrain: notice: the decode table has %d tokens, the model %d; ids beyond it print as nothing\n",
                tc.tk.vocab_size, cfg.model.vocab_size);

    struct mesh mesh;
    struct backend be;
    st = train_open_mesh(&cfg, &mesh, &be);
    if (!st) {
        struct model m;
        struct model_dims d = model_dims_make(&cfg.model, cfg.train.micro_batch, mesh.tp.size, model_options_of(&cfg));
        model_alloc(&m, &d, be, &mesh.tp); // every weight comes from the checkpoint
        // a Hugging Face directory loads as init.from does (config.json's fields checked there)
        st = ckpt_load_params(&m, &mesh, dir, hf ? CKPT_LOAD_INIT : CKPT_LOAD_EXACT, err, sizeof err);
        st = train_agree(&mesh, st, err);
        if (!st && o->export_llmc) {
            size_t n = strlen(o->export_llmc);
            bool bf16 = n >= 9 && strcmp(o->export_llmc + n - 9, "_bf16.bin") == 0;
            st = llmc_save(&m, &mesh, o->export_llmc, bf16, err, sizeof err);
            if (st && mesh.world_rank == 0) fprintf(stderr, "tptrain: %s\n", err);
            if (!st && mesh.world_rank == 0)
                printf("wrote %s: llm.c model file, version %d (%s), from %s\n", o->export_llmc, bf16 ? 5 : 3,
                       bf16 ? "bf16" : "fp32", dir);
        } else if (!st) {
            st = o->generate ? generate(&m, &mesh, &cfg, o, &tc.tk, prompt, n_prompt)
                             : eval_loss(&m, &mesh, &cfg, o, &cs, dir);
        }
        model_destroy(&m);
    }
    train_close_mesh(&mesh, &be);
    text_close(&tc);
    free(prompt);
    return st;
}
