// layout.c: Replicate / Shard(dim) placements, local shapes and local -> global index maps.
#include "layout.h"

#include <stdio.h>

bool layout_divisible(const struct dtensor_spec *t, int nranks) {
    if (t->layout.kind == LAYOUT_REPLICATE) return true;
    return t->global_shape[t->layout.dim] % (size_t)nranks == 0;
}

void layout_local_shape(const struct dtensor_spec *t, int nranks, size_t local_shape[LAYOUT_MAX_DIMS]) {
    for (int d = 0; d < LAYOUT_MAX_DIMS; d++) local_shape[d] = d < t->ndim ? t->global_shape[d] : 1;
    if (t->layout.kind == LAYOUT_SHARD) local_shape[t->layout.dim] /= (size_t)nranks;
}

size_t layout_global_numel(const struct dtensor_spec *t) {
    size_t n = 1;
    for (int d = 0; d < t->ndim; d++) n *= t->global_shape[d];
    return n;
}

size_t layout_local_numel(const struct dtensor_spec *t, int nranks) {
    size_t shape[LAYOUT_MAX_DIMS];
    layout_local_shape(t, nranks, shape);
    size_t n = 1;
    for (int d = 0; d < t->ndim; d++) n *= shape[d];
    return n;
}

void layout_shard_range(const struct dtensor_spec *t, int rank, int nranks, size_t *begin, size_t *end) {
    if (t->layout.kind == LAYOUT_REPLICATE) {
        *begin = 0;
        *end = t->global_shape[0];
        return;
    }
    size_t block = t->global_shape[t->layout.dim] / (size_t)nranks;
    *begin = (size_t)rank * block;
    *end = *begin + block;
}

size_t layout_global_index(const struct dtensor_spec *t, int rank, int nranks, size_t local) {
    if (t->layout.kind == LAYOUT_REPLICATE) return local;
    size_t lshape[LAYOUT_MAX_DIMS];
    layout_local_shape(t, nranks, lshape);
    // Unravel the local index, shift the sharded coordinate into this rank's block, ravel globally.
    size_t coord[LAYOUT_MAX_DIMS];
    for (int d = t->ndim - 1; d >= 0; d--) {
        coord[d] = local % lshape[d];
        local /= lshape[d];
    }
    coord[t->layout.dim] += (size_t)rank * lshape[t->layout.dim];
    size_t g = 0;
    for (int d = 0; d < t->ndim; d++) g = g * t->global_shape[d] + coord[d];
    return g;
}

const char *layout_describe(struct layout l, char *buf, size_t len) {
    if (l.kind == LAYOUT_REPLICATE) snprintf(buf, len, "Replicate");
    else snprintf(buf, len, "Shard(%d)", l.dim);
    return buf;
}

const char *layout_shape_str(const size_t *shape, int ndim, char *buf, size_t len) {
    size_t used = (size_t)snprintf(buf, len, "(");
    for (int d = 0; d < ndim && used < len; d++)
        used += (size_t)snprintf(buf + used, len - used, d ? ", %zu" : "%zu", shape[d]);
    if (used < len) snprintf(buf + used, len - used, ")");
    return buf;
}
