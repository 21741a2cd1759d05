// safetensors.h: reader and streaming writer for the safetensors format.
//
// Layout of a file: an 8-byte little-endian header length N, then N bytes of JSON
//   {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...,
//    "__metadata__": {"key": "value", ...}}
// padded with spaces to a multiple of 8, then the data area. Offsets are relative to the start of
// the data area; tensors are contiguous, row-major, little-endian.
//
// The reader memory-maps the file read-only and validates every field before handing out a
// pointer: header length, JSON syntax, dtypes, shape * dtype size against the offsets, ranges
// inside the data area, no overlaps and no unclaimed bytes (the same rules the reference
// implementation enforces, so a file accepted here also loads in PyTorch/transformers).
//
// The writer is streaming: declare every tensor (and optional string metadata), write the header
// with st_writer_begin, then hand over the bytes of each tensor in declaration order. A caller can
// therefore gather one tensor at a time and never hold the whole model. Atomic commit (temporary
// name, rename) is the caller's job.
//
// Every function that can fail writes one line into err (naming the file and, where relevant, the
// tensor) and returns TP_EXIT_USAGE (bad file or bad arguments) or TP_EXIT_RUNTIME (I/O failure);
// 0 on success.
#pragma once

#include <stddef.h>
#include <stdint.h>

#define ST_MAX_DIMS 8

enum st_dtype {
    ST_F32 = 0,
    ST_BF16,
    ST_F16,
    ST_I32,
    ST_I64,
    ST_DTYPE_COUNT,
};

// "F32", "BF16", ... ("?" for an invalid value).
const char *st_dtype_name(enum st_dtype dt);
// Bytes per element (0 for an invalid value).
size_t st_dtype_size(enum st_dtype dt);
// Parses a dtype name; returns -1 if unknown.
int st_dtype_from_name(const char *name);

// ---- reader

struct st_tensor {
    const char *name;             // owned by the st_file
    enum st_dtype dtype;
    int ndim;                     // 0 for a scalar
    int64_t shape[ST_MAX_DIMS];   // (ndim)
    size_t numel;                 // product of shape (1 for a scalar)
    size_t begin, end;            // data_offsets, relative to the data area
    const void *data;             // (numel) elements of dtype, mapped; may be unaligned
};

struct st_meta {
    const char *key;              // owned by the st_file
    const char *value;
};

struct st_file {
    char path[1024];
    void *map;                    // mmap of the whole file
    size_t map_bytes;             // file size
    size_t header_bytes;          // N, the JSON header length
    const unsigned char *data;    // (data_bytes) start of the data area
    size_t data_bytes;
    struct st_tensor *tensors;    // (n_tensors) in header order
    int n_tensors;
    struct st_meta *meta;         // (n_meta) in header order
    int n_meta;
    char *strings;                // arena holding every name, key and value
    int *by_name;                 // (n_tensors) tensor indices sorted by name, for st_find
};

// Opens, maps and validates a file. On failure f is left closed (st_close is harmless).
int st_open(struct st_file *f, const char *path, char *err, size_t errlen);

// Lookup by name; NULL if absent.
const struct st_tensor *st_find(const struct st_file *f, const char *name);

// Metadata value for key; NULL if absent.
const char *st_metadata(const struct st_file *f, const char *key);

// Converts elements [first, first + count) of a floating-point tensor (F32, BF16, F16) to fp32
// in dst (count). Integer tensors and out-of-range requests fail with a message.
int st_read_f32(const struct st_file *f, const struct st_tensor *t, float *dst, size_t first,
                size_t count, char *err, size_t errlen);

// Unmaps and frees; safe on a zeroed or already closed st_file.
void st_close(struct st_file *f);

// ---- streaming writer

struct st_writer;

// Starts a writer for path; nothing touches the file system until st_writer_begin.
struct st_writer *st_writer_new(const char *path);

// Declares the next tensor. shape (ndim) with 0 <= ndim <= ST_MAX_DIMS. Names must be unique,
// non-empty and not "__metadata__".
int st_writer_add(struct st_writer *w, const char *name, enum st_dtype dtype, int ndim,
                  const int64_t *shape, char *err, size_t errlen);

// Adds one string metadata pair (keys unique).
int st_writer_add_metadata(struct st_writer *w, const char *key, const char *value, char *err,
                           size_t errlen);

// Creates/truncates the file and writes the header. No declarations after this.
int st_writer_begin(struct st_writer *w, char *err, size_t errlen);

// Writes the bytes of the next tensor in declaration order. name may be NULL (= the next one);
// if given it must be the next one. bytes must equal numel * dtype size.
int st_writer_write(struct st_writer *w, const char *name, const void *data, size_t bytes,
                    char *err, size_t errlen);

// Like st_writer_write but for a part of the next tensor: parts are appended in order and the
// writer moves on once the tensor's bytes are complete (for callers that produce row blocks).
int st_writer_write_part(struct st_writer *w, const char *name, const void *data, size_t bytes,
                         char *err, size_t errlen);

// Checks that every tensor was written, then flushes, fsyncs and closes the file.
int st_writer_finish(struct st_writer *w, char *err, size_t errlen);

// Frees the writer (closing the file if finish was not reached; the partial file stays).
void st_writer_free(struct st_writer *w);
