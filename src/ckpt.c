// ckpt.c: gathering sharded parameters into global Hugging Face-layout tensors, and back.
#include "ckpt.h"

#include <stdio.h>
#include <string.h>

#include "common.h"
#include "safetensors.h"

// ---- layouts

int ckpt_hf_shape(const struct param_tensor *t, int64_t shape[LAYOUT_MAX_DIMS]) {
    const struct dtensor_spec *s = &t->spec;
    size_t inner = layout_global_numel(s) / s->global_shape[0]; // elements per row
    if (t->transpose_hf) {
        // stored (out, in) with out possibly split as (3, C): files hold (in, out)
        size_t in = s->global_shape[s->ndim - 1];
        shape[0] = (int64_t)in;
        shape[1] = (int64_t)(layout_global_numel(s) / in);
        return 2;
    }
    if (s->ndim == 2 && s->global_shape[0] == 3 && t->real_rows == 3) { // c_attn.bias (3, C) -> (3C)
        shape[0] = (int64_t)layout_global_numel(s);
        return 1;
    }
    shape[0] = (int64_t)t->real_rows;
    for (int d = 1; d < s->ndim; d++) shape[d] = (int64_t)s->global_shape[d];
    (void)inner;
    return s->ndim;
}

size_t ckpt_hf_numel(const struct param_tensor *t) {
    return layout_global_numel(&t->spec) / t->spec.global_shape[0] * t->real_rows;
}

// Index in the HF-layout array of global element g (row-major over the stored global shape), or
// SIZE_MAX for padding.
static size_t hf_index(const struct param_tensor *t, size_t g) {
    const struct dtensor_spec *s = &t->spec;
    size_t row_elems = layout_global_numel(s) / s->global_shape[0];
    if (g / row_elems >= t->real_rows) return SIZE_MAX;
    if (!t->transpose_hf) return g;
    size_t in = s->global_shape[s->ndim - 1];
    size_t out = layout_global_numel(s) / in;
    return (g % in) * out + g / in;
}

// ---- gather / scatter

void ckpt_gather_tensor(const struct model *m, const struct mesh *mesh, const float *src, int i, float *dst) {
    const struct param_tensor *t = &m->tensors[i];
    int P = m->d.P, r = m->d.tp_rank;
    float *local = tp_malloc(t->numel * sizeof(float));
    m->be.iface->copy_to_host(m->be.ctx, local, src + t->offset, t->numel * sizeof(float));
    if (t->spec.layout.kind == LAYOUT_REPLICATE || P == 1) {
        if (r == 0)
            for (size_t j = 0; j < t->numel; j++) {
                size_t h = hf_index(t, j);
                if (h != SIZE_MAX) dst[h] = local[j];
            }
        free(local);
        return;
    }
    float *all = r == 0 ? tp_malloc(t->numel * (size_t)P * sizeof(float)) : NULL;
    if (t->numel > (size_t)INT32_MAX) tp_die(TP_EXIT_RUNTIME, "tensor %s shard too large to gather", t->name);
    MPI_Gather(local, (int)t->numel, MPI_FLOAT, all, (int)t->numel, MPI_FLOAT, 0, mesh->tp_comm);
    if (r == 0) {
        for (int q = 0; q < P; q++)
            for (size_t j = 0; j < t->numel; j++) {
                size_t h = hf_index(t, layout_global_index(&t->spec, q, P, j));
                if (h != SIZE_MAX) dst[h] = all[(size_t)q * t->numel + j];
            }
    }
    free(all);
    free(local);
}

void ckpt_scatter_tensor(const struct model *m, const float *src, int i, float *dst) {
    const struct param_tensor *t = &m->tensors[i];
    float *local = tp_malloc(t->numel * sizeof(float));
    for (size_t j = 0; j < t->numel; j++) {
        size_t h = hf_index(t, layout_global_index(&t->spec, m->d.tp_rank, m->d.P, j));
        local[j] = h == SIZE_MAX ? 0.0f : src[h];
    }
    m->be.iface->copy_to_device(m->be.ctx, dst + t->offset, local, t->numel * sizeof(float));
    free(local);
}

// ---- safetensors export

int ckpt_export_safetensors(const struct model *m, const struct mesh *mesh, const float *src,
                            const char *path, char *err, size_t errlen) {
    bool writer = mesh->tp_rank == 0 && mesh->dp_rank == 0;
    int status = 0;
    struct st_writer *w = NULL;
    float *buf = NULL;
    if (mesh->dp_rank == 0) {
        size_t max = 0;
        for (int i = 0; i < m->n_tensors; i++)
            if (ckpt_hf_numel(&m->tensors[i]) > max) max = ckpt_hf_numel(&m->tensors[i]);
        if (writer) buf = tp_malloc(max * sizeof(float));
    }
    if (writer) {
        w = st_writer_new(path);
        for (int i = 0; i < m->n_tensors && !status; i++) {
            int64_t shape[LAYOUT_MAX_DIMS];
            int nd = ckpt_hf_shape(&m->tensors[i], shape);
            status = st_writer_add(w, m->tensors[i].name, ST_F32, nd, shape, err, errlen);
        }
        if (!status) status = st_writer_add_metadata(w, "format", "pt", err, errlen);
        if (!status) status = st_writer_begin(w, err, errlen);
    }
    // Everyone must take part in every gather, so the writer's failure is only acted on after.
    if (mesh->dp_rank == 0) {
        for (int i = 0; i < m->n_tensors; i++) {
            ckpt_gather_tensor(m, mesh, src, i, buf);
            if (writer && !status)
                status = st_writer_write(w, NULL, buf, ckpt_hf_numel(&m->tensors[i]) * sizeof(float), err, errlen);
        }
    }
    if (writer) {
        if (!status) status = st_writer_finish(w, err, errlen);
        st_writer_free(w);
    }
    free(buf);
    status = mesh_agree(mesh, status ? TP_EXIT_RUNTIME : 0);
    if (status && !err[0]) snprintf(err, errlen, "%s: written by another rank, which failed", path);
    return status;
}
