// llmc.c: llm.c's GPT-2 model file, read (init.from) and written (--export-llmc); see llmc.h.
#include "llmc.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "backend.h"
#include "ckpt.h"
#include "common.h"

// llm.c's parameter kinds, in file order: the model tensor each one is (per layer where %d), its
// rows in the file per layer, and whether it is a weight matrix stored (out, in).
struct llmc_kind {
    const char *name;  // model tensor name ("h.%d." for per-layer kinds)
    bool per_layer;
    bool transposed;   // file (out, in) = HF (in, out) transposed
};

static const struct llmc_kind kinds[] = {
    {"wte.weight", false, false},           {"wpe.weight", false, false},
    {"h.%d.ln_1.weight", true, false},      {"h.%d.ln_1.bias", true, false},
    {"h.%d.attn.c_attn.weight", true, true}, {"h.%d.attn.c_attn.bias", true, false},
    {"h.%d.attn.c_proj.weight", true, true}, {"h.%d.attn.c_proj.bias", true, false},
    {"h.%d.ln_2.weight", true, false},      {"h.%d.ln_2.bias", true, false},
    {"h.%d.mlp.c_fc.weight", true, true},   {"h.%d.mlp.c_fc.bias", true, false},
    {"h.%d.mlp.c_proj.weight", true, true}, {"h.%d.mlp.c_proj.bias", true, false},
    {"ln_f.weight", false, false},          {"ln_f.bias", false, false},
};
#define N_KINDS (sizeof kinds / sizeof kinds[0])

static int tensor_index(const struct model *m, const char *name) {
    for (int i = 0; i < m->n_tensors; i++)
        if (strcmp(m->tensors[i].name, name) == 0) return i;
    return -1;
}

// Elements of one kind in the file for one layer (or the whole tensor): rows x cols there.
static void file_shape(const struct llmc_kind *k, int Vp, int maxT, int C, size_t *rows, size_t *cols) {
    const char *n = k->name;
    if (strcmp(n, "wte.weight") == 0) *rows = (size_t)Vp, *cols = (size_t)C;
    else if (strcmp(n, "wpe.weight") == 0) *rows = (size_t)maxT, *cols = (size_t)C;
    else if (strstr(n, "c_attn.weight")) *rows = 3 * (size_t)C, *cols = (size_t)C;
    else if (strstr(n, "c_attn.bias")) *rows = 1, *cols = 3 * (size_t)C;
    else if (strstr(n, "attn.c_proj.weight")) *rows = (size_t)C, *cols = (size_t)C;
    else if (strstr(n, "c_fc.weight")) *rows = 4 * (size_t)C, *cols = (size_t)C;
    else if (strstr(n, "c_fc.bias")) *rows = 1, *cols = 4 * (size_t)C;
    else if (strstr(n, "mlp.c_proj.weight")) *rows = (size_t)C, *cols = 4 * (size_t)C;
    else *rows = 1, *cols = (size_t)C; // layernorms and the projection biases
}

bool llmc_is_model_file(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return false;
    int32_t magic = 0;
    bool yes = fread(&magic, sizeof magic, 1, f) == 1 && magic == LLMC_MAGIC;
    fclose(f);
    return yes;
}

// Reads n elements (fp32 or bf16) as floats.
static bool read_floats(FILE *f, float *dst, size_t n, bool bf16) {
    if (!bf16) return fread(dst, sizeof(float), n, f) == n;
    uint16_t buf[4096];
    for (size_t done = 0; done < n;) {
        size_t k = n - done < 4096 ? n - done : 4096;
        if (fread(buf, sizeof(uint16_t), k, f) != k) return false;
        for (size_t i = 0; i < k; i++) dst[done + i] = tp_bf16_to_f32(buf[i]);
        done += k;
    }
    return true;
}

static int load_local(struct model *m, const char *path, char *err, size_t errlen) {
    FILE *f = fopen(path, "rb");
    if (!f) return tp_errf(err, errlen, "init.from %s: cannot open: %s", path, strerror(errno));
    int32_t h[256];
    int rc = 0;
    if (fread(h, sizeof h, 1, f) != 1) rc = tp_errf(err, errlen, "%s: shorter than llm.c's 1024-byte header", path);
    const struct model_dims *d = &m->d;
    if (!rc && h[0] != LLMC_MAGIC) rc = tp_errf(err, errlen, "%s: header word 0 is %d, not llm.c's model magic %d", path, h[0], LLMC_MAGIC);
    if (!rc && h[1] != 3 && h[1] != 5)
        rc = tp_errf(err, errlen, "%s: version %d; llm.c model files are version 3 (fp32) or 5 (bf16)", path, h[1]);
    int maxT = h[2], V = h[3], L = h[4], NH = h[5], C = h[6], Vp = h[7];
    static const char *const keys[4] = {"n_layer", "n_head", "n_embd", "vocab_size"};
    const int have[4] = {L, NH, C, V}, want[4] = {d->L, d->NH, d->C, d->V};
    for (int i = 0; i < 4 && !rc; i++)
        if (have[i] != want[i])
            rc = tp_errf(err, errlen, "%s: %s is %d in the file, this run has model.%s=%d; set model.%s=%d", path,
                         keys[i], have[i], keys[i], want[i], keys[i], have[i]);
    if (!rc && (Vp < V || Vp > V + (1 << 16)))
        rc = tp_errf(err, errlen, "%s: padded_vocab_size %d does not fit vocab_size %d; the header is damaged", path, Vp, V);
    if (!rc && maxT < d->T)
        rc = tp_errf(err, errlen, "%s: max_seq_len %d is below model.seq_len=%d; lower model.seq_len", path, maxT, d->T);
    bool bf16 = h[1] == 5;
    if (!rc) { // the file's size must be exactly the header and the parameters
        size_t total = 0, rows, cols;
        for (size_t k = 0; k < N_KINDS; k++) {
            file_shape(&kinds[k], Vp, maxT, C, &rows, &cols);
            total += rows * cols * (kinds[k].per_layer ? (size_t)L : 1);
        }
        struct stat sb;
        size_t want_bytes = 1024 + total * (bf16 ? 2 : 4);
        if (fstat(fileno(f), &sb) == 0 && (size_t)sb.st_size != want_bytes)
            rc = tp_errf(err, errlen, "%s: %lld bytes, but its header describes %zu; the file is truncated or not "
                         "this model", path, (long long)sb.st_size, want_bytes);
    }
    size_t max = (size_t)Vp * C;
    if ((size_t)maxT * C > max) max = (size_t)maxT * C;
    if (16 * (size_t)C * C > max) max = 16 * (size_t)C * C;
    float *raw = rc ? NULL : tp_malloc(max * sizeof(float)), *hf = rc ? NULL : tp_malloc(max * sizeof(float));
    for (size_t k = 0; k < N_KINDS && !rc; k++) {
        size_t rows, cols;
        file_shape(&kinds[k], Vp, maxT, C, &rows, &cols);
        for (int l = 0; l < (kinds[k].per_layer ? L : 1) && !rc; l++) {
            char name[96];
            snprintf(name, sizeof name, kinds[k].name, l);
            int i = tensor_index(m, name);
            if (i < 0) {
                rc = tp_errf(err, errlen, "%s: this model has no tensor %s", path, name);
                break;
            }
            if (!read_floats(f, raw, rows * cols, bf16)) {
                rc = tp_errf(err, errlen, "%s: ends inside %s", path, name);
                break;
            }
            const float *src = raw;
            if (kinds[k].transposed) { // (out, in) -> (in, out)
                for (size_t r = 0; r < rows; r++)
                    for (size_t c = 0; c < cols; c++) hf[c * rows + r] = raw[r * cols + c];
                src = hf;
            }
            // wte and wpe: the real rows and the first seq_len positions come first in the file
            ckpt_scatter_tensor(m, src, i, m->params);
        }
    }
    free(raw);
    free(hf);
    fclose(f);
    return rc;
}

int llmc_load(struct model *m, const struct mesh *mesh, const char *path, char *err, size_t errlen) {
    err[0] = '\0';
    int rc = load_local(m, path, err, errlen);
    if (!rc) model_sync_compute_params(m);
    int worst = mesh_agree(mesh, rc);
    if (worst && !err[0]) snprintf(err, errlen, "init.from %s: another rank failed to read it", path);
    return worst;
}

static bool write_floats(FILE *f, const float *src, size_t n, bool bf16) {
    if (!bf16) return fwrite(src, sizeof(float), n, f) == n;
    uint16_t buf[4096];
    for (size_t done = 0; done < n;) {
        size_t k = n - done < 4096 ? n - done : 4096;
        for (size_t i = 0; i < k; i++) buf[i] = tp_bf16_from_f32(src[done + i]);
        if (fwrite(buf, sizeof(uint16_t), k, f) != k) return false;
        done += k;
    }
    return true;
}

int llmc_save(const struct model *m, const struct mesh *mesh, const char *path, bool bf16, char *err,
              size_t errlen) {
    err[0] = '\0';
    const struct model_dims *d = &m->d;
    bool writer = mesh->world_rank == 0;
    int Vp = (d->V + 127) / 128 * 128, maxT = d->T, C = d->C, L = d->L;
    char tmp[2 * TP_PATH_MAX + 8];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = NULL;
    int rc = 0;
    if (writer) {
        f = fopen(tmp, "wb");
        if (!f) rc = tp_errf_code(err, errlen, TP_EXIT_RUNTIME, "%s: cannot create: %s", tmp, strerror(errno));
        int32_t h[256] = {LLMC_MAGIC, bf16 ? 5 : 3, maxT, d->V, L, d->NH, C, Vp};
        if (f && fwrite(h, sizeof h, 1, f) != 1) rc = 1;
    }
    size_t max = (size_t)Vp * C > 16 * (size_t)C * C ? (size_t)Vp * C : 16 * (size_t)C * C;
    if ((size_t)maxT * C > max) max = (size_t)maxT * C;
    float *hf = tp_calloc(max, sizeof(float)), *out = tp_calloc(max, sizeof(float));
    for (size_t k = 0; k < N_KINDS; k++) {
        size_t rows, cols;
        file_shape(&kinds[k], Vp, maxT, C, &rows, &cols);
        for (int l = 0; l < (kinds[k].per_layer ? L : 1); l++) {
            char name[96];
            snprintf(name, sizeof name, kinds[k].name, l);
            int i = tensor_index(m, name);
            // collective over the TP group: every rank takes part, TP rank 0 receives
            ckpt_gather_tensor(m, mesh, m->params, i, mesh->tp.rank == 0 ? hf : NULL);
            if (!writer || rc) continue;
            const float *src = hf;
            if (kinds[k].transposed) { // (in, out) -> (out, in)
                for (size_t r = 0; r < rows; r++)
                    for (size_t c = 0; c < cols; c++) out[r * cols + c] = hf[c * rows + r];
                src = out;
            } else if (strcmp(name, "wte.weight") == 0) { // llm.c's zero padding rows after the real ones
                memset(hf + (size_t)d->V * C, 0, (size_t)(Vp - d->V) * C * sizeof(float));
            }
            if (!write_floats(f, src, rows * cols, bf16)) rc = 1;
        }
    }
    free(hf);
    free(out);
    if (writer && f) {
        bool ok = !rc && fflush(f) == 0 && !ferror(f);
        ok &= fclose(f) == 0;
        if (ok && rename(tmp, path) != 0) ok = false;
        if (!ok) {
            if (!err[0]) tp_errf_code(err, errlen, TP_EXIT_RUNTIME, "%s: write failed: %s", path, strerror(errno));
            remove(tmp);
            rc = TP_EXIT_RUNTIME;
        }
    }
    int worst = mesh_agree(mesh, rc);
    if (worst && !err[0]) snprintf(err, errlen, "%s: written by rank 0, which failed", path);
    return worst;
}
