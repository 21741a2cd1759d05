// layout.h: where the pieces of a global tensor live on a process group.
//
// A placement is Replicate (every rank holds the whole tensor) or Shard(dim) (the tensor is cut
// into equal contiguous blocks along `dim`, block r on rank r). A dtensor_spec pairs a global
// shape with a placement; from it follow the local shape, the shard range and the map from a
// local element to its global index, which initialisation and checkpoints use so that no rank
// ever materialises a full sharded weight.
#pragma once

#include <stdbool.h>
#include <stddef.h>

#define LAYOUT_MAX_DIMS 4

enum layout_kind { LAYOUT_REPLICATE = 0, LAYOUT_SHARD };

struct layout {
    enum layout_kind kind;
    int dim; // the sharded dimension (LAYOUT_SHARD only)
};

static inline struct layout layout_replicate(void) { return (struct layout){LAYOUT_REPLICATE, 0}; }
static inline struct layout layout_shard(int dim) { return (struct layout){LAYOUT_SHARD, dim}; }

struct dtensor_spec {
    int ndim;
    size_t global_shape[LAYOUT_MAX_DIMS];
    struct layout layout;
};

// Whether the global shape can be split over nranks (the sharded dim divides evenly).
bool layout_divisible(const struct dtensor_spec *t, int nranks);

// Local shape on any rank of a group of nranks (all ranks hold equal blocks).
void layout_local_shape(const struct dtensor_spec *t, int nranks, size_t local_shape[LAYOUT_MAX_DIMS]);

size_t layout_global_numel(const struct dtensor_spec *t);
size_t layout_local_numel(const struct dtensor_spec *t, int nranks);

// [begin, end) of the sharded dimension held by rank (the whole dim for Replicate).
void layout_shard_range(const struct dtensor_spec *t, int rank, int nranks, size_t *begin, size_t *end);

// Row-major flat global index of the element at row-major flat local index `local` on `rank`.
size_t layout_global_index(const struct dtensor_spec *t, int rank, int nranks, size_t local);

// "Replicate" or "Shard(1)" into buf.
const char *layout_describe(struct layout l, char *buf, size_t len);
// "(3, 768, 768)" into buf.
const char *layout_shape_str(const size_t *shape, int ndim, char *buf, size_t len);
