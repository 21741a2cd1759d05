// safetensors.c: safetensors reader (mmap; jansson decodes the header, this file checks it) and
// streaming writer.
// See safetensors.h for the format and the contract.
#include "safetensors.h"

#include "common.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdarg.h>
#include <stdbool.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

// The reference implementation refuses headers above 100 MB; a real header is a few tens of KB,
// so anything larger is a corrupt length field, not a big model.
#define ST_HEADER_MAX ((uint64_t)100 * 1000 * 1000)
// Nesting limit of the values of unknown keys in a tensor entry.
#define ST_JSON_DEPTH_MAX 64
#define ST_METADATA_KEY "__metadata__"

// ---- small helpers

static const char *const st_dtype_names[ST_DTYPE_COUNT] = {"F32", "BF16", "F16", "I32", "I64"};
static const size_t st_dtype_sizes[ST_DTYPE_COUNT] = {4, 2, 2, 4, 8};

const char *st_dtype_name(enum st_dtype dt) {
    return (unsigned)dt < ST_DTYPE_COUNT ? st_dtype_names[dt] : "?";
}

size_t st_dtype_size(enum st_dtype dt) {
    return (unsigned)dt < ST_DTYPE_COUNT ? st_dtype_sizes[dt] : 0;
}

int st_dtype_from_name(const char *name) {
    for (int i = 0; i < ST_DTYPE_COUNT; i++)
        if (strcmp(name, st_dtype_names[i]) == 0) return i;
    return -1;
}

// "[768, 2304]" into buf.
static const char *st_shape_str(char *buf, size_t len, int ndim, const int64_t *shape) {
    size_t used = 0;
    used += (size_t)snprintf(buf, len, "[");
    for (int d = 0; d < ndim && used < len; d++)
        used += (size_t)snprintf(buf + used, len - used, "%s%lld", d ? ", " : "", (long long)shape[d]);
    if (used < len) snprintf(buf + used, len - used, "]");
    return buf;
}

// Room for element n of a growable array of *cap elements of elem bytes (first: the capacity of
// its first allocation).
static void *st_grow(void *a, int n, int *cap, size_t elem, int first, const char *path) {
    if (n < *cap) return a;
    *cap = *cap ? 2 * *cap : first;
    a = realloc(a, (size_t)*cap * elem);
    if (!a) tp_die(TP_EXIT_RUNTIME, "out of host memory for %s", path);
    return a;
}

// numel and byte count of a shape, false on overflow.
static bool st_shape_bytes(int ndim, const int64_t *shape, enum st_dtype dt, size_t *numel,
                           size_t *bytes) {
    size_t n = 1;
    for (int d = 0; d < ndim; d++) {
        if (shape[d] < 0) return false;
        if (__builtin_mul_overflow(n, (size_t)shape[d], &n)) return false;
    }
    size_t b;
    if (__builtin_mul_overflow(n, st_dtype_size(dt), &b)) return false;
    *numel = n;
    *bytes = b;
    return true;
}

// ---- JSON header: jansson decodes, this file checks
//
// jansson keeps no source position in the values it returns, and a message about a bad header
// should say where it is bad. So the top-level object is walked here, entry by entry, through its
// punctuation only ('{', ':', ',', '}' and white space), and jansson decodes each key and each
// entry (json_loadb with JSON_DECODE_ANY | JSON_DISABLE_EOF_CHECK, which reports how many bytes it
// read; JSON_REJECT_DUPLICATES inside an entry and in __metadata__). A syntax error names
// jansson's byte; an entry that is valid JSON but not a valid tensor entry names the byte where
// the entry starts. Names, keys and values are copied into an arena of header size + 1 bytes: a
// decoded string plus its NUL is never longer than its quoted source, so the arena cannot
// overflow.

struct st_parser {
    const char *s;       // (n) header text
    size_t n;
    const char *path;
    char *err;
    size_t errlen;
    char *arena;         // (n + 1)
    size_t arena_used;
    const char *tensor;  // name of the tensor entry being read, for messages (NULL outside)
    const char *bad_dtype_tensor; // the first tensor with an unknown dtype (NULL if none), reported
    char bad_dtype[48];           // once the JSON is read; and that dtype
};

static int st_syntax(struct st_parser *p, size_t at, const char *what) {
    if (p->tensor)
        return tp_errf_code(p->err, p->errlen, TP_EXIT_USAGE,
                            "%s: tensor '%.200s': malformed header JSON at header byte %zu: %s",
                            p->path, p->tensor, at, what);
    return tp_errf_code(p->err, p->errlen, TP_EXIT_USAGE,
                        "%s: malformed header JSON at header byte %zu: %s", p->path, at, what);
}

static size_t st_skip_ws(const struct st_parser *p, size_t pos) {
    while (pos < p->n && (p->s[pos] == ' ' || p->s[pos] == '\t' || p->s[pos] == '\n' || p->s[pos] == '\r'))
        pos++;
    return pos;
}

// Decodes the one JSON value at *pos and moves *pos past it.
static int st_decode(struct st_parser *p, size_t *pos, json_t **out) {
    json_error_t e;
    *out = json_loadb(p->s + *pos, p->n - *pos,
                      JSON_DECODE_ANY | JSON_DISABLE_EOF_CHECK | JSON_REJECT_DUPLICATES, &e);
    if (!*out) {
        // jansson quotes the text near the error; keep the message on one line.
        for (char *c = e.text; *c; c++)
            if ((unsigned char)*c < 0x20 || *c == 0x7f) *c = '?';
        return st_syntax(p, *pos + (size_t)e.position, e.text);
    }
    *pos += (size_t)e.position;
    return 0;
}

static const char *st_keep(struct st_parser *p, const char *s) {
    size_t len = strlen(s);
    char *dst = p->arena + p->arena_used;
    memcpy(dst, s, len + 1);
    p->arena_used += len + 1;
    return dst;
}

// Nesting depth of a decoded value (0 for a scalar); jansson already bounds it at
// JSON_PARSER_MAX_DEPTH, this file at ST_JSON_DEPTH_MAX.
static int st_json_depth(json_t *v) {
    int deepest = 0;
    size_t i;
    const char *k;
    json_t *x;
    if (json_is_array(v)) {
        json_array_foreach(v, i, x) {
            int d = st_json_depth(x);
            if (d > deepest) deepest = d;
        }
        return deepest + 1;
    }
    if (json_is_object(v)) {
        json_object_foreach(v, k, x) {
            int d = st_json_depth(x);
            if (d > deepest) deepest = d;
        }
        return deepest + 1;
    }
    return 0;
}

// A non-negative JSON integer (jansson refuses leading zeros and integers beyond int64).
static bool st_json_uint(const json_t *v, uint64_t *out) {
    if (!json_is_integer(v) || json_integer_value(v) < 0) return false;
    *out = (uint64_t)json_integer_value(v);
    return true;
}

// Growable arrays of the parse results.
struct st_lists {
    struct st_tensor *t;
    int nt, capt;
    struct st_meta *m;
    int nm, capm;
};

// __metadata__: an object of strings (duplicate keys already refused by jansson).
static int st_read_metadata(struct st_parser *p, size_t at, json_t *meta, struct st_lists *l) {
    const char *key;
    json_t *v;
    if (!json_is_object(meta)) return st_syntax(p, at, "__metadata__ must be an object of strings");
    json_object_foreach(meta, key, v) {
        if (!json_is_string(v)) {
            char msg[320];
            snprintf(msg, sizeof msg, "__metadata__ value of '%.200s' must be a string", key);
            return st_syntax(p, at, msg);
        }
        l->m = st_grow(l->m, l->nm, &l->capm, sizeof *l->m, 8, p->path);
        l->m[l->nm++] = (struct st_meta){.key = st_keep(p, key), .value = st_keep(p, json_string_value(v))};
    }
    return 0;
}

// {"dtype": .., "shape": [..], "data_offsets": [b, e]}; other keys are skipped, so a future field
// does not break old readers.
static int st_read_tensor(struct st_parser *p, size_t at, json_t *entry, struct st_tensor *t) {
    const char *key;
    json_t *v;
    if (!json_is_object(entry)) return st_syntax(p, at, "a tensor entry must be an object");
    json_t *dtype = json_object_get(entry, "dtype"), *shape = json_object_get(entry, "shape"),
           *offsets = json_object_get(entry, "data_offsets");
    const char *missing = !dtype ? "dtype" : !shape ? "shape" : !offsets ? "data_offsets" : NULL;
    if (missing)
        return tp_errf_code(p->err, p->errlen, TP_EXIT_USAGE, "%s: tensor '%.200s': entry has no \"%s\"",
                            p->path, t->name, missing);
    json_object_foreach(entry, key, v) {
        if (v != dtype && v != shape && v != offsets && st_json_depth(v) > ST_JSON_DEPTH_MAX)
            return st_syntax(p, at, "nesting too deep");
    }

    if (!json_is_string(dtype)) return st_syntax(p, at, "dtype must be a string");
    int d = st_dtype_from_name(json_string_value(dtype));
    if (d < 0 && !p->bad_dtype_tensor) {
        // Reported once the whole header is read, so syntax errors win.
        snprintf(p->bad_dtype, sizeof p->bad_dtype, "%s", json_string_value(dtype));
        p->bad_dtype_tensor = t->name;
    }
    t->dtype = d < 0 ? ST_F32 : (enum st_dtype)d;

    if (!json_is_array(shape)) return st_syntax(p, at, "shape must be an array");
    if (json_array_size(shape) > ST_MAX_DIMS)
        return tp_errf_code(p->err, p->errlen, TP_EXIT_USAGE,
                            "%s: tensor '%.200s': shape has more than %d dimensions", p->path, t->name,
                            ST_MAX_DIMS);
    t->ndim = (int)json_array_size(shape);
    for (int i = 0; i < t->ndim; i++) {
        uint64_t dim;
        if (!st_json_uint(json_array_get(shape, (size_t)i), &dim))
            return st_syntax(p, at, "shape entries must be non-negative integers");
        t->shape[i] = (int64_t)dim;
    }

    uint64_t b, e;
    if (!json_is_array(offsets) || json_array_size(offsets) != 2)
        return st_syntax(p, at, "data_offsets must be an array [begin, end]");
    if (!st_json_uint(json_array_get(offsets, 0), &b) || !st_json_uint(json_array_get(offsets, 1), &e))
        return st_syntax(p, at, "data_offsets must be non-negative integers");
    t->begin = (size_t)b;
    t->end = (size_t)e;
    return 0;
}

// One entry of the top-level object: key (at header byte key_at), then its value at *pos.
static int st_read_entry(struct st_parser *p, const char *key, size_t key_at, size_t *pos,
                         bool *have_meta, struct st_lists *l) {
    size_t at = st_skip_ws(p, *pos);
    bool meta = strcmp(key, ST_METADATA_KEY) == 0;
    if (meta && *have_meta) return st_syntax(p, key_at, "__metadata__ given twice");
    if (!meta) {
        if (key[0] == '\0') return st_syntax(p, key_at, "empty tensor name");
        l->t = st_grow(l->t, l->nt, &l->capt, sizeof *l->t, 64, p->path);
        struct st_tensor *t = &l->t[l->nt++];
        memset(t, 0, sizeof *t);
        t->name = st_keep(p, key);
        p->tensor = t->name;
    }
    json_t *value;
    int rc = st_decode(p, pos, &value);
    if (rc) return rc;
    if (meta) {
        rc = st_read_metadata(p, at, value, l);
        *have_meta = true;
    } else {
        rc = st_read_tensor(p, at, value, &l->t[l->nt - 1]);
        p->tensor = NULL;
    }
    json_decref(value);
    return rc;
}

static int st_parse_header(struct st_parser *p, struct st_lists *l) {
    bool have_meta = false;
    size_t pos = st_skip_ws(p, 0);
    if (pos == p->n || p->s[pos] != '{')
        return st_syntax(p, pos, "header must be a JSON object starting with '{'");
    pos = st_skip_ws(p, pos + 1);
    if (pos < p->n && p->s[pos] == '}') {
        pos++;
    } else {
        for (;;) {
            json_t *key;
            size_t key_at = pos;
            int rc = st_decode(p, &pos, &key);
            if (rc) return rc;
            if (!json_is_string(key)) {
                json_decref(key);
                return st_syntax(p, key_at, "expected a string key");
            }
            pos = st_skip_ws(p, pos);
            if (pos == p->n || p->s[pos] != ':') {
                json_decref(key);
                return st_syntax(p, pos, "expected ':' after a key");
            }
            pos++;
            rc = st_read_entry(p, json_string_value(key), key_at, &pos, &have_meta, l);
            json_decref(key);
            if (rc) return rc;
            pos = st_skip_ws(p, pos);
            if (pos < p->n && p->s[pos] == ',') {
                pos = st_skip_ws(p, pos + 1);
                continue;
            }
            if (pos < p->n && p->s[pos] == '}') {
                pos++;
                break;
            }
            return st_syntax(p, pos, "expected ',' or '}' after a tensor entry");
        }
    }
    pos = st_skip_ws(p, pos);
    if (pos != p->n) return st_syntax(p, pos, "unexpected text after the header object");
    if (p->bad_dtype_tensor)
        return tp_errf_code(p->err, p->errlen, TP_EXIT_USAGE,
                            "%s: tensor '%.200s': unknown dtype '%.40s' (supported: F32, BF16, F16, I32, I64)",
                            p->path, p->bad_dtype_tensor, p->bad_dtype);
    return 0;
}

// ---- reader: validation

// A tensor's byte range, sorted by offset to find overlaps and gaps.
struct st_span {
    size_t begin, end;
    int index;
};

static int st_span_cmp(const void *a, const void *b) {
    const struct st_span *x = a, *y = b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end) return x->end < y->end ? -1 : 1;
    return x->index - y->index;
}

static int st_validate(struct st_file *f, char *err, size_t errlen) {
    char sh[256];
    for (int i = 0; i < f->n_tensors; i++) {
        struct st_tensor *t = &f->tensors[i];
        size_t numel, need;
        if (t->begin > t->end)
            return tp_errf_code(err, errlen, TP_EXIT_USAGE,
                           "%s: tensor '%.200s': data_offsets [%zu, %zu] end before they begin",
                           f->path, t->name, t->begin, t->end);
        if (!st_shape_bytes(t->ndim, t->shape, t->dtype, &numel, &need))
            return tp_errf_code(err, errlen, TP_EXIT_USAGE, "%s: tensor '%.200s': %s shape %s overflows",
                           f->path, t->name, st_dtype_name(t->dtype),
                           st_shape_str(sh, sizeof sh, t->ndim, t->shape));
        if (t->end > f->data_bytes)
            return tp_errf_code(err, errlen, TP_EXIT_USAGE,
                           "%s: tensor '%.200s': data_offsets [%zu, %zu] run past the end of the data "
                           "area (%zu bytes); the file is truncated or the header is wrong",
                           f->path, t->name, t->begin, t->end, f->data_bytes);
        if (t->end - t->begin != need)
            return tp_errf_code(err, errlen, TP_EXIT_USAGE,
                           "%s: tensor '%.200s': data_offsets [%zu, %zu] hold %zu bytes but %s shape %s "
                           "needs %zu",
                           f->path, t->name, t->begin, t->end, t->end - t->begin,
                           st_dtype_name(t->dtype), st_shape_str(sh, sizeof sh, t->ndim, t->shape), need);
        t->numel = numel;
        t->data = f->data + t->begin;
    }

    // The byte ranges must tile the data area exactly: no overlap, no gap, nothing after the end.
    struct st_span *spans = tp_malloc((size_t)f->n_tensors * sizeof *spans);
    for (int i = 0; i < f->n_tensors; i++)
        spans[i] = (struct st_span){f->tensors[i].begin, f->tensors[i].end, i};
    qsort(spans, (size_t)f->n_tensors, sizeof *spans, st_span_cmp);
    size_t cursor = 0;
    int prev = -1, rc = 0;
    for (int k = 0; k < f->n_tensors && !rc; k++) {
        const struct st_tensor *t = &f->tensors[spans[k].index];
        if (t->begin < cursor) {
            const struct st_tensor *o = &f->tensors[prev];
            rc = tp_errf_code(err, errlen, TP_EXIT_USAGE,
                         "%s: tensor '%.200s': data_offsets [%zu, %zu] overlap tensor '%.200s' [%zu, %zu]",
                         f->path, t->name, t->begin, t->end, o->name, o->begin, o->end);
        } else if (t->begin > cursor) {
            rc = tp_errf_code(err, errlen, TP_EXIT_USAGE,
                         "%s: tensor '%.200s': data_offsets [%zu, %zu] leave bytes [%zu, %zu) of the "
                         "data area unclaimed",
                         f->path, t->name, t->begin, t->end, cursor, t->begin);
        }
        cursor = t->end;
        prev = spans[k].index;
    }
    free(spans);
    if (rc) return rc;
    if (cursor != f->data_bytes)
        return tp_errf_code(err, errlen, TP_EXIT_USAGE,
                       "%s: %zu bytes after the last tensor's data (tensors end at data offset %zu, the "
                       "data area holds %zu bytes)",
                       f->path, f->data_bytes - cursor, cursor, f->data_bytes);
    return 0;
}

// ---- reader: public API

struct st_named {
    const char *name;
    int index;
};

static int st_named_cmp(const void *a, const void *b) {
    return strcmp(((const struct st_named *)a)->name, ((const struct st_named *)b)->name);
}

// Tensor indices sorted by name, for binary search in st_find and the duplicate check.
static int *st_name_index(const struct st_file *f) {
    size_t n = (size_t)f->n_tensors;
    struct st_named *tmp = tp_malloc((n ? n : 1) * sizeof *tmp);
    for (size_t i = 0; i < n; i++) tmp[i] = (struct st_named){f->tensors[i].name, (int)i};
    qsort(tmp, n, sizeof *tmp, st_named_cmp);
    int *idx = tp_malloc((n ? n : 1) * sizeof *idx);
    for (size_t i = 0; i < n; i++) idx[i] = tmp[i].index;
    free(tmp);
    return idx;
}

int st_open(struct st_file *f, const char *path, char *err, size_t errlen) {
    memset(f, 0, sizeof *f);
    snprintf(f->path, sizeof f->path, "%s", path);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return tp_errf_code(err, errlen, TP_EXIT_USAGE, "%s: cannot open: %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        int e = errno;
        close(fd);
        return tp_errf_code(err, errlen, TP_EXIT_USAGE, "%s: cannot stat: %s", path, strerror(e));
    }
    if (!S_ISREG(sb.st_mode)) {
        close(fd);
        return tp_errf_code(err, errlen, TP_EXIT_USAGE, "%s: not a regular file", path);
    }
    size_t size = (size_t)sb.st_size;
    if (size < 8) {
        close(fd);
        return tp_errf_code(err, errlen, TP_EXIT_USAGE,
                       "%s: file is %zu bytes, too short for a safetensors header length (8 bytes)",
                       path, size);
    }
    void *map = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    int map_errno = errno;
    close(fd);
    if (map == MAP_FAILED)
        return tp_errf_code(err, errlen, TP_EXIT_RUNTIME, "%s: mmap of %zu bytes failed: %s", path, size,
                       strerror(map_errno));
    f->map = map;
    f->map_bytes = size;

    const unsigned char *b = map;
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--) n = (n << 8) | b[i];
    int rc;
    if (n > size - 8) {
        rc = tp_errf_code(err, errlen, TP_EXIT_USAGE,
                     "%s: header length %llu is larger than the %zu bytes that follow it (truncated, or "
                     "not a safetensors file)",
                     path, (unsigned long long)n, size - 8);
        goto fail;
    }
    if (n > ST_HEADER_MAX || n < 2) {
        rc = tp_errf_code(err, errlen, TP_EXIT_USAGE,
                     "%s: header length %llu is implausible (expected 2 .. %llu bytes); not a "
                     "safetensors file?",
                     path, (unsigned long long)n, (unsigned long long)ST_HEADER_MAX);
        goto fail;
    }
    f->header_bytes = (size_t)n;
    f->data = b + 8 + n;
    f->data_bytes = size - 8 - (size_t)n;
    f->strings = tp_malloc((size_t)n + 1);

    struct st_parser p = {.s = (const char *)b + 8, .n = (size_t)n, .path = path, .err = err,
                          .errlen = errlen, .arena = f->strings};
    struct st_lists l = {0};
    rc = st_parse_header(&p, &l);
    f->tensors = l.t;
    f->n_tensors = l.nt;
    f->meta = l.m;
    f->n_meta = l.nm;
    if (rc) goto fail;

    f->by_name = st_name_index(f);
    for (int i = 1; i < f->n_tensors; i++) {
        const char *a = f->tensors[f->by_name[i - 1]].name, *c = f->tensors[f->by_name[i]].name;
        if (strcmp(a, c) == 0) {
            rc = tp_errf_code(err, errlen, TP_EXIT_USAGE, "%s: tensor '%.200s' appears twice in the header",
                         path, a);
            goto fail;
        }
    }
    if ((rc = st_validate(f, err, errlen))) goto fail;
    return 0;

fail:
    st_close(f);
    return rc;
}

const struct st_tensor *st_find(const struct st_file *f, const char *name) {
    int lo = 0, hi = f->n_tensors - 1;
    while (lo <= hi) {
        int mid = lo + (hi - lo) / 2;
        const struct st_tensor *t = &f->tensors[f->by_name[mid]];
        int c = strcmp(name, t->name);
        if (c == 0) return t;
        if (c < 0) hi = mid - 1;
        else lo = mid + 1;
    }
    return NULL;
}

const char *st_metadata(const struct st_file *f, const char *key) {
    for (int i = 0; i < f->n_meta; i++)
        if (strcmp(f->meta[i].key, key) == 0) return f->meta[i].value;
    return NULL;
}

// IEEE half -> single, including subnormals, infinities and NaN.
static float st_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1F;
    uint32_t man = h & 0x3FF;
    uint32_t bits;
    if (exp == 0x1F) {
        bits = sign | 0x7F800000u | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else {
        // Subnormal: shift the mantissa up until its leading 1 becomes the implicit bit.
        int e = -1;
        do {
            e++;
            man <<= 1;
        } while ((man & 0x400) == 0);
        bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3FF) << 13);
    }
    float out;
    memcpy(&out, &bits, sizeof out);
    return out;
}

int st_read_f32(const struct st_file *f, const struct st_tensor *t, float *dst, size_t first,
                size_t count, char *err, size_t errlen) {
    if (first > t->numel || count > t->numel - first)
        return tp_errf_code(err, errlen, TP_EXIT_USAGE,
                       "%s: tensor '%.200s': elements [%zu, %zu) requested but it has %zu", f->path,
                       t->name, first, first + count, t->numel);
    const unsigned char *src = (const unsigned char *)t->data + first * st_dtype_size(t->dtype);
    switch (t->dtype) {
    case ST_F32: memcpy(dst, src, count * sizeof(float)); return 0;
    case ST_BF16:
        for (size_t i = 0; i < count; i++) {
            uint16_t h;
            memcpy(&h, src + 2 * i, 2);
            uint32_t bits = (uint32_t)h << 16;
            memcpy(&dst[i], &bits, 4);
        }
        return 0;
    case ST_F16:
        for (size_t i = 0; i < count; i++) {
            uint16_t h;
            memcpy(&h, src + 2 * i, 2);
            dst[i] = st_f16_to_f32(h);
        }
        return 0;
    default:
        return tp_errf_code(err, errlen, TP_EXIT_USAGE,
                       "%s: tensor '%.200s': dtype %s is not a floating-point type", f->path, t->name,
                       st_dtype_name(t->dtype));
    }
}

void st_close(struct st_file *f) {
    if (f->map) munmap(f->map, f->map_bytes);
    free(f->tensors);
    free(f->meta);
    free(f->strings);
    free(f->by_name);
    memset(f, 0, sizeof *f);
}

// ---- writer

struct st_wtensor {
    char *name;
    enum st_dtype dtype;
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    size_t bytes;
};

enum st_wstate { ST_W_DECLARING, ST_W_WRITING, ST_W_DONE, ST_W_FAILED };

struct st_writer {
    char *path;
    struct st_wtensor *t; // (n) in declaration order, which is also the data order
    int n, cap;
    char **meta;          // (2 * n_meta) key, value pairs
    int n_meta, cap_meta;
    FILE *fp;
    enum st_wstate state;
    int cur;              // next tensor to receive bytes
    size_t cur_written;   // bytes of it already written
    int fail_code;        // sticky failure: later calls repeat it
    char fail_msg[512];
};

static char *st_strdup(const char *s) {
    size_t n = strlen(s) + 1;
    char *d = tp_malloc(n);
    memcpy(d, s, n);
    return d;
}

// JSON text is UTF-8; jansson refuses to hold anything else.
static bool st_is_utf8(const char *s) {
    json_t *probe = json_string(s);
    bool ok = probe != NULL;
    json_decref(probe);
    return ok;
}

struct st_writer *st_writer_new(const char *path) {
    struct st_writer *w = tp_calloc(1, sizeof *w);
    w->path = st_strdup(path);
    return w;
}

// Records a failure that poisons the writer (I/O errors: the file is now unusable).
static int st_wpoison(struct st_writer *w, char *err, size_t errlen, int code, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));

static int st_wpoison(struct st_writer *w, char *err, size_t errlen, int code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(w->fail_msg, sizeof w->fail_msg, fmt, ap);
    va_end(ap);
    w->fail_code = code;
    w->state = ST_W_FAILED;
    return tp_errf_code(err, errlen, code, "%s", w->fail_msg);
}

static int st_wfailed(struct st_writer *w, char *err, size_t errlen) {
    return tp_errf_code(err, errlen, w->fail_code, "%s", w->fail_msg);
}

int st_writer_add(struct st_writer *w, const char *name, enum st_dtype dtype, int ndim,
                  const int64_t *shape, char *err, size_t errlen) {
    if (w->state == ST_W_FAILED) return st_wfailed(w, err, errlen);
    if (w->state != ST_W_DECLARING)
        return tp_errf_code(err, errlen, TP_EXIT_USAGE, "%s: tensor '%.200s' declared after the header was written",
                       w->path, name);
    if (!name[0] || strcmp(name, ST_METADATA_KEY) == 0 || !st_is_utf8(name))
        return tp_errf_code(err, errlen, TP_EXIT_USAGE, "%s: invalid tensor name '%.200s'", w->path, name);
    if ((unsigned)dtype >= ST_DTYPE_COUNT)
        return tp_errf_code(err, errlen, TP_EXIT_USAGE, "%s: tensor '%.200s': invalid dtype %d", w->path, name,
                       (int)dtype);
    if (ndim < 0 || ndim > ST_MAX_DIMS)
        return tp_errf_code(err, errlen, TP_EXIT_USAGE, "%s: tensor '%.200s': %d dimensions (at most %d)",
                       w->path, name, ndim, ST_MAX_DIMS);
    size_t numel, bytes;
    if (!st_shape_bytes(ndim, shape, dtype, &numel, &bytes))
        return tp_errf_code(err, errlen, TP_EXIT_USAGE, "%s: tensor '%.200s': negative or overflowing shape",
                       w->path, name);
    for (int i = 0; i < w->n; i++)
        if (strcmp(w->t[i].name, name) == 0)
            return tp_errf_code(err, errlen, TP_EXIT_USAGE, "%s: tensor '%.200s' declared twice", w->path, name);
    w->t = st_grow(w->t, w->n, &w->cap, sizeof *w->t, 64, w->path);
    struct st_wtensor *t = &w->t[w->n++];
    memset(t, 0, sizeof *t);
    t->name = st_strdup(name);
    t->dtype = dtype;
    t->ndim = ndim;
    for (int d = 0; d < ndim; d++) t->shape[d] = shape[d];
    t->bytes = bytes;
    return 0;
}

int st_writer_add_metadata(struct st_writer *w, const char *key, const char *value, char *err,
                           size_t errlen) {
    if (w->state == ST_W_FAILED) return st_wfailed(w, err, errlen);
    if (w->state != ST_W_DECLARING)
        return tp_errf_code(err, errlen, TP_EXIT_USAGE, "%s: metadata '%.200s' added after the header was written",
                       w->path, key);
    if (!st_is_utf8(key) || !st_is_utf8(value))
        return tp_errf_code(err, errlen, TP_EXIT_USAGE, "%s: metadata '%.200s': key and value must be UTF-8",
                            w->path, key);
    for (int i = 0; i < w->n_meta; i++)
        if (strcmp(w->meta[2 * i], key) == 0)
            return tp_errf_code(err, errlen, TP_EXIT_USAGE, "%s: metadata key '%.200s' added twice", w->path, key);
    w->meta = st_grow(w->meta, w->n_meta, &w->cap_meta, 2 * sizeof *w->meta, 8, w->path);
    w->meta[2 * w->n_meta] = st_strdup(key);
    w->meta[2 * w->n_meta + 1] = st_strdup(value);
    w->n_meta++;
    return 0;
}

// The header text, unpadded: __metadata__ first, then the tensors in declaration (= data) order.
static char *st_header_json(const struct st_writer *w) {
    json_t *h = json_object();
    bool ok = h != NULL;
    if (w->n_meta) {
        json_t *meta = json_object();
        for (int i = 0; i < w->n_meta; i++)
            ok = ok && json_object_set_new(meta, w->meta[2 * i], json_string(w->meta[2 * i + 1])) == 0;
        ok = ok && json_object_set_new(h, ST_METADATA_KEY, meta) == 0;
    }
    size_t offset = 0;
    for (int i = 0; i < w->n; i++) {
        const struct st_wtensor *t = &w->t[i];
        json_t *shape = json_array();
        for (int d = 0; d < t->ndim; d++) json_array_append_new(shape, json_integer(t->shape[d]));
        json_t *entry = json_pack("{s:s, s:o, s:[I, I]}", "dtype", st_dtype_name(t->dtype), "shape", shape,
                                  "data_offsets", (json_int_t)offset, (json_int_t)(offset + t->bytes));
        ok = ok && json_object_set_new(h, t->name, entry) == 0;
        offset += t->bytes;
    }
    char *text = ok ? json_dumps(h, JSON_COMPACT) : NULL;
    json_decref(h);
    // Names and strings were checked to be UTF-8 when declared, so only memory can fail here.
    if (!text) tp_die(TP_EXIT_RUNTIME, "out of host memory building the header of %s", w->path);
    return text;
}

int st_writer_begin(struct st_writer *w, char *err, size_t errlen) {
    if (w->state == ST_W_FAILED) return st_wfailed(w, err, errlen);
    if (w->state != ST_W_DECLARING)
        return tp_errf_code(err, errlen, TP_EXIT_USAGE, "%s: header already written", w->path);

    char *text = st_header_json(w);
    size_t len = strlen(text);
    // Pad with spaces so the data area starts 8-byte aligned in the file.
    size_t padded = (len + 7) / 8 * 8;
    static const char spaces[8] = "        ";
    unsigned char len8[8];
    for (int i = 0; i < 8; i++) len8[i] = (unsigned char)((uint64_t)padded >> (8 * i));

    int rc = 0;
    w->fp = fopen(w->path, "wb");
    if (!w->fp) {
        rc = st_wpoison(w, err, errlen, TP_EXIT_RUNTIME, "%s: cannot create: %s", w->path, strerror(errno));
    } else if (fwrite(len8, 1, 8, w->fp) != 8 || fwrite(text, 1, len, w->fp) != len ||
               fwrite(spaces, 1, padded - len, w->fp) != padded - len) {
        rc = st_wpoison(w, err, errlen, TP_EXIT_RUNTIME, "%s: writing the header failed: %s", w->path,
                        strerror(errno));
    } else {
        w->state = ST_W_WRITING;
        w->cur = 0;
        w->cur_written = 0;
    }
    free(text);
    return rc;
}

// Shared body of write / write_part; whole = the call must deliver the entire tensor.
static int st_writer_put(struct st_writer *w, const char *name, const void *data, size_t bytes,
                         bool whole, char *err, size_t errlen) {
    if (w->state == ST_W_FAILED) return st_wfailed(w, err, errlen);
    if (w->state != ST_W_WRITING)
        return tp_errf_code(err, errlen, TP_EXIT_USAGE, "%s: tensor data written %s", w->path,
                       w->state == ST_W_DECLARING ? "before st_writer_begin" : "after st_writer_finish");
    if (w->cur >= w->n)
        return tp_errf_code(err, errlen, TP_EXIT_USAGE, "%s: every declared tensor is already written%s%.200s",
                       w->path, name ? "; extra tensor " : "", name ? name : "");
    const struct st_wtensor *t = &w->t[w->cur];
    if (name && strcmp(name, t->name) != 0)
        return tp_errf_code(err, errlen, TP_EXIT_USAGE,
                       "%s: tensor '%.200s' written out of order: the next declared tensor is '%.200s'",
                       w->path, name, t->name);
    if (whole && (w->cur_written != 0 || bytes != t->bytes))
        return tp_errf_code(err, errlen, TP_EXIT_USAGE,
                       "%s: tensor '%.200s': %zu bytes written but it holds %zu", w->path, t->name, bytes,
                       t->bytes - w->cur_written);
    if (bytes > t->bytes - w->cur_written)
        return tp_errf_code(err, errlen, TP_EXIT_USAGE,
                       "%s: tensor '%.200s': part of %zu bytes overruns it (%zu of %zu already written)",
                       w->path, t->name, bytes, w->cur_written, t->bytes);
    if (bytes && fwrite(data, 1, bytes, w->fp) != bytes)
        return st_wpoison(w, err, errlen, TP_EXIT_RUNTIME, "%s: writing tensor '%.200s' failed: %s",
                          w->path, t->name, strerror(errno));
    w->cur_written += bytes;
    if (w->cur_written == t->bytes) {
        w->cur++;
        w->cur_written = 0;
    }
    return 0;
}

int st_writer_write(struct st_writer *w, const char *name, const void *data, size_t bytes,
                    char *err, size_t errlen) {
    return st_writer_put(w, name, data, bytes, true, err, errlen);
}

int st_writer_write_part(struct st_writer *w, const char *name, const void *data, size_t bytes,
                         char *err, size_t errlen) {
    return st_writer_put(w, name, data, bytes, false, err, errlen);
}

int st_writer_finish(struct st_writer *w, char *err, size_t errlen) {
    if (w->state == ST_W_FAILED) return st_wfailed(w, err, errlen);
    if (w->state != ST_W_WRITING)
        return tp_errf_code(err, errlen, TP_EXIT_USAGE, "%s: st_writer_finish %s", w->path,
                       w->state == ST_W_DECLARING ? "before st_writer_begin" : "called twice");
    if (w->cur < w->n)
        return tp_errf_code(err, errlen, TP_EXIT_USAGE,
                       "%s: finished with tensor '%.200s' incomplete (%zu of %zu bytes) and %d more unwritten",
                       w->path, w->t[w->cur].name, w->cur_written, w->t[w->cur].bytes, w->n - w->cur - 1);
    FILE *fp = w->fp;
    w->fp = NULL;
    if (fflush(fp) != 0) {
        int e = errno;
        fclose(fp);
        return st_wpoison(w, err, errlen, TP_EXIT_RUNTIME, "%s: flushing failed: %s", w->path, strerror(e));
    }
    if (fsync(fileno(fp)) != 0) {
        int e = errno;
        fclose(fp);
        return st_wpoison(w, err, errlen, TP_EXIT_RUNTIME, "%s: fsync failed: %s", w->path, strerror(e));
    }
    if (fclose(fp) != 0)
        return st_wpoison(w, err, errlen, TP_EXIT_RUNTIME, "%s: close failed: %s", w->path, strerror(errno));
    w->state = ST_W_DONE;
    return 0;
}

void st_writer_free(struct st_writer *w) {
    if (!w) return;
    if (w->fp) fclose(w->fp);
    for (int i = 0; i < w->n; i++) free(w->t[i].name);
    for (int i = 0; i < 2 * w->n_meta; i++) free(w->meta[i]);
    free(w->t);
    free(w->meta);
    free(w->path);
    free(w);
}
