// safetensors.c: safetensors reader (mmap + validating JSON header parser) and streaming writer.
// See safetensors.h for the format and the contract.
#include "safetensors.h"

#include "common.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdbool.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

// The reference implementation refuses headers above 100 MB; a real header is a few tens of KB,
// so anything larger is a corrupt length field, not a big model.
#define ST_HEADER_MAX ((uint64_t)100 * 1000 * 1000)
// Nesting limit for skipping unknown JSON values (bounds the recursion on hostile input).
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

// ---- JSON header parser
//
// Only what the format needs: one top-level object whose values are tensor objects or the
// metadata object of strings. Unknown keys inside a tensor entry are skipped (any JSON value), so
// a future field does not break old readers. Decoded strings go into an arena of header size + 1
// bytes: a decoded string plus its NUL is never longer than its quoted source, so the arena
// cannot overflow and pointers into it stay valid.

struct st_parser {
    const char *s;       // (n) header text
    size_t n, pos;
    const char *path;
    char *err;
    size_t errlen;
    char *arena;         // (n + 1)
    size_t arena_used;
    const char *tensor;  // name of the tensor entry being parsed, for messages (NULL outside)
    const char *bad_dtype, *bad_dtype_tensor; // first unknown dtype seen, and its tensor
};

static int st_syntax(struct st_parser *p, const char *what) {
    if (p->tensor)
        return tp_errf_code(p->err, p->errlen, TP_EXIT_USAGE,
                       "%s: tensor '%.200s': malformed header JSON at header byte %zu: %s", p->path,
                       p->tensor, p->pos, what);
    return tp_errf_code(p->err, p->errlen, TP_EXIT_USAGE, "%s: malformed header JSON at header byte %zu: %s",
                   p->path, p->pos, what);
}

static void st_skip_ws(struct st_parser *p) {
    while (p->pos < p->n) {
        char c = p->s[p->pos];
        if (c != ' ' && c != '\t' && c != '\n' && c != '\r') break;
        p->pos++;
    }
}

// Consumes `c` after optional whitespace.
static bool st_accept(struct st_parser *p, char c) {
    st_skip_ws(p);
    if (p->pos < p->n && p->s[p->pos] == c) {
        p->pos++;
        return true;
    }
    return false;
}

static int st_hex4(struct st_parser *p, unsigned *out) {
    if (p->n - p->pos < 4) return st_syntax(p, "truncated \\u escape");
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        char c = p->s[p->pos++];
        v <<= 4;
        if (c >= '0' && c <= '9') v |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f') v |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') v |= (unsigned)(c - 'A' + 10);
        else return st_syntax(p, "bad hex digit in \\u escape");
    }
    *out = v;
    return 0;
}

static size_t st_utf8_put(char *dst, unsigned cp) {
    if (cp < 0x80) {
        dst[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        dst[0] = (char)(0xC0 | (cp >> 6));
        dst[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        dst[0] = (char)(0xE0 | (cp >> 12));
        dst[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        dst[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    dst[0] = (char)(0xF0 | (cp >> 18));
    dst[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    dst[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    dst[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

// Parses a string into the arena; *out points at the NUL-terminated result.
static int st_parse_string(struct st_parser *p, const char **out) {
    st_skip_ws(p);
    if (p->pos >= p->n || p->s[p->pos] != '"') return st_syntax(p, "expected a string");
    p->pos++;
    char *dst = p->arena + p->arena_used;
    size_t len = 0;
    for (;;) {
        if (p->pos >= p->n) return st_syntax(p, "unterminated string");
        unsigned char c = (unsigned char)p->s[p->pos++];
        if (c == '"') break;
        if (c < 0x20) return st_syntax(p, "control character inside a string");
        if (c != '\\') {
            dst[len++] = (char)c;
            continue;
        }
        if (p->pos >= p->n) return st_syntax(p, "unterminated escape");
        char e = p->s[p->pos++];
        switch (e) {
        case '"': dst[len++] = '"'; break;
        case '\\': dst[len++] = '\\'; break;
        case '/': dst[len++] = '/'; break;
        case 'b': dst[len++] = '\b'; break;
        case 'f': dst[len++] = '\f'; break;
        case 'n': dst[len++] = '\n'; break;
        case 'r': dst[len++] = '\r'; break;
        case 't': dst[len++] = '\t'; break;
        case 'u': {
            unsigned cp;
            int rc = st_hex4(p, &cp);
            if (rc) return rc;
            if (cp >= 0xD800 && cp <= 0xDBFF) {
                // High surrogate: a low one must follow to form one code point.
                unsigned lo;
                if (p->n - p->pos < 2 || p->s[p->pos] != '\\' || p->s[p->pos + 1] != 'u')
                    return st_syntax(p, "unpaired UTF-16 surrogate in \\u escape");
                p->pos += 2;
                if ((rc = st_hex4(p, &lo))) return rc;
                if (lo < 0xDC00 || lo > 0xDFFF)
                    return st_syntax(p, "unpaired UTF-16 surrogate in \\u escape");
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
                return st_syntax(p, "unpaired UTF-16 surrogate in \\u escape");
            }
            if (cp == 0) return st_syntax(p, "\\u0000 inside a string is not supported");
            len += st_utf8_put(dst + len, cp);
            break;
        }
        default: return st_syntax(p, "unknown escape in string");
        }
    }
    dst[len] = '\0';
    p->arena_used += len + 1;
    *out = dst;
    return 0;
}

// Parses a non-negative JSON integer (no sign, fraction or exponent).
static int st_parse_uint(struct st_parser *p, uint64_t *out, const char *what) {
    st_skip_ws(p);
    char msg[160];
    if (p->pos < p->n && p->s[p->pos] == '-') {
        snprintf(msg, sizeof msg, "%s must be non-negative integers", what);
        return st_syntax(p, msg);
    }
    if (p->pos >= p->n || p->s[p->pos] < '0' || p->s[p->pos] > '9') {
        snprintf(msg, sizeof msg, "%s must be non-negative integers", what);
        return st_syntax(p, msg);
    }
    size_t start = p->pos;
    uint64_t v = 0;
    while (p->pos < p->n && p->s[p->pos] >= '0' && p->s[p->pos] <= '9') {
        if (__builtin_mul_overflow(v, 10, &v) ||
            __builtin_add_overflow(v, (uint64_t)(p->s[p->pos] - '0'), &v)) {
            snprintf(msg, sizeof msg, "%s: integer too large", what);
            return st_syntax(p, msg);
        }
        p->pos++;
    }
    if (p->s[start] == '0' && p->pos - start > 1) return st_syntax(p, "leading zero in a number");
    if (p->pos < p->n && (p->s[p->pos] == '.' || p->s[p->pos] == 'e' || p->s[p->pos] == 'E')) {
        snprintf(msg, sizeof msg, "%s must be integers", what);
        return st_syntax(p, msg);
    }
    *out = v;
    return 0;
}

static int st_skip_value(struct st_parser *p, int depth);

static int st_skip_number(struct st_parser *p) {
    if (p->pos < p->n && p->s[p->pos] == '-') p->pos++;
    size_t int_start = p->pos;
    while (p->pos < p->n && p->s[p->pos] >= '0' && p->s[p->pos] <= '9') p->pos++;
    if (p->pos == int_start) return st_syntax(p, "bad number");
    if (p->s[int_start] == '0' && p->pos - int_start > 1) return st_syntax(p, "leading zero in a number");
    if (p->pos < p->n && p->s[p->pos] == '.') {
        size_t f = ++p->pos;
        while (p->pos < p->n && p->s[p->pos] >= '0' && p->s[p->pos] <= '9') p->pos++;
        if (p->pos == f) return st_syntax(p, "bad number");
    }
    if (p->pos < p->n && (p->s[p->pos] == 'e' || p->s[p->pos] == 'E')) {
        p->pos++;
        if (p->pos < p->n && (p->s[p->pos] == '+' || p->s[p->pos] == '-')) p->pos++;
        size_t e = p->pos;
        while (p->pos < p->n && p->s[p->pos] >= '0' && p->s[p->pos] <= '9') p->pos++;
        if (p->pos == e) return st_syntax(p, "bad number");
    }
    return 0;
}

static int st_skip_literal(struct st_parser *p, const char *lit) {
    size_t len = strlen(lit);
    if (p->n - p->pos < len || memcmp(p->s + p->pos, lit, len) != 0)
        return st_syntax(p, "unexpected character");
    p->pos += len;
    return 0;
}

// Skips any JSON value (for unknown keys). Strings land in the arena, which has room for them.
static int st_skip_value(struct st_parser *p, int depth) {
    if (depth > ST_JSON_DEPTH_MAX) return st_syntax(p, "nesting too deep");
    st_skip_ws(p);
    if (p->pos >= p->n) return st_syntax(p, "unexpected end of header");
    char c = p->s[p->pos];
    int rc;
    if (c == '"') {
        const char *ignored;
        return st_parse_string(p, &ignored);
    }
    if (c == '{') {
        p->pos++;
        if (st_accept(p, '}')) return 0;
        do {
            const char *ignored;
            if ((rc = st_parse_string(p, &ignored))) return rc;
            if (!st_accept(p, ':')) return st_syntax(p, "expected ':' after a key");
            if ((rc = st_skip_value(p, depth + 1))) return rc;
        } while (st_accept(p, ','));
        if (!st_accept(p, '}')) return st_syntax(p, "expected ',' or '}' in an object");
        return 0;
    }
    if (c == '[') {
        p->pos++;
        if (st_accept(p, ']')) return 0;
        do {
            if ((rc = st_skip_value(p, depth + 1))) return rc;
        } while (st_accept(p, ','));
        if (!st_accept(p, ']')) return st_syntax(p, "expected ',' or ']' in an array");
        return 0;
    }
    if (c == 't') return st_skip_literal(p, "true");
    if (c == 'f') return st_skip_literal(p, "false");
    if (c == 'n') return st_skip_literal(p, "null");
    if (c == '-' || (c >= '0' && c <= '9')) return st_skip_number(p);
    return st_syntax(p, "unexpected character");
}

// Growable arrays of the parse results.
struct st_lists {
    struct st_tensor *t;
    int nt, capt;
    struct st_meta *m;
    int nm, capm;
};

static int st_parse_metadata(struct st_parser *p, struct st_lists *l) {
    if (!st_accept(p, '{')) return st_syntax(p, "__metadata__ must be an object of strings");
    if (st_accept(p, '}')) return 0;
    do {
        const char *key, *value;
        int rc;
        if ((rc = st_parse_string(p, &key))) return rc;
        if (!st_accept(p, ':')) return st_syntax(p, "expected ':' after a key");
        st_skip_ws(p);
        if (p->pos < p->n && p->s[p->pos] != '"') {
            char msg[320];
            snprintf(msg, sizeof msg, "__metadata__ value of '%.200s' must be a string", key);
            return st_syntax(p, msg);
        }
        if ((rc = st_parse_string(p, &value))) return rc;
        for (int i = 0; i < l->nm; i++)
            if (strcmp(l->m[i].key, key) == 0)
                return tp_errf_code(p->err, p->errlen, TP_EXIT_USAGE,
                               "%s: __metadata__ key '%.200s' appears twice", p->path, key);
        if (l->nm == l->capm) {
            l->capm = l->capm ? 2 * l->capm : 8;
            l->m = realloc(l->m, (size_t)l->capm * sizeof *l->m);
            if (!l->m) tp_die(TP_EXIT_RUNTIME, "out of host memory reading %s", p->path);
        }
        l->m[l->nm++] = (struct st_meta){.key = key, .value = value};
    } while (st_accept(p, ','));
    if (!st_accept(p, '}')) return st_syntax(p, "expected ',' or '}' in __metadata__");
    return 0;
}

// Parses {"dtype": .., "shape": [..], "data_offsets": [b, e]} (other keys skipped).
static int st_parse_tensor(struct st_parser *p, struct st_tensor *t) {
    bool have_dtype = false, have_shape = false, have_offsets = false;
    int rc;
    if (!st_accept(p, '{')) return st_syntax(p, "a tensor entry must be an object");
    if (!st_accept(p, '}')) {
        do {
            const char *key;
            if ((rc = st_parse_string(p, &key))) return rc;
            if (!st_accept(p, ':')) return st_syntax(p, "expected ':' after a key");
            if (strcmp(key, "dtype") == 0) {
                const char *dt;
                if (have_dtype) return st_syntax(p, "\"dtype\" given twice");
                if ((rc = st_parse_string(p, &dt))) return rc;
                int d = st_dtype_from_name(dt);
                if (d < 0 && !p->bad_dtype) {
                    // Reported once the JSON is known to be well-formed, so syntax errors win.
                    p->bad_dtype = dt;
                    p->bad_dtype_tensor = t->name;
                }
                t->dtype = d < 0 ? ST_F32 : (enum st_dtype)d;
                have_dtype = true;
            } else if (strcmp(key, "shape") == 0) {
                if (have_shape) return st_syntax(p, "\"shape\" given twice");
                if (!st_accept(p, '[')) return st_syntax(p, "shape must be an array");
                t->ndim = 0;
                if (!st_accept(p, ']')) {
                    do {
                        uint64_t v;
                        if (t->ndim == ST_MAX_DIMS)
                            return tp_errf_code(p->err, p->errlen, TP_EXIT_USAGE,
                                           "%s: tensor '%.200s': shape has more than %d dimensions",
                                           p->path, t->name, ST_MAX_DIMS);
                        if ((rc = st_parse_uint(p, &v, "shape entries"))) return rc;
                        if (v > (uint64_t)INT64_MAX) return st_syntax(p, "shape entry too large");
                        t->shape[t->ndim++] = (int64_t)v;
                    } while (st_accept(p, ','));
                    if (!st_accept(p, ']')) return st_syntax(p, "expected ',' or ']' in shape");
                }
                have_shape = true;
            } else if (strcmp(key, "data_offsets") == 0) {
                uint64_t b, e;
                if (have_offsets) return st_syntax(p, "\"data_offsets\" given twice");
                if (!st_accept(p, '[')) return st_syntax(p, "data_offsets must be an array [begin, end]");
                if ((rc = st_parse_uint(p, &b, "data_offsets"))) return rc;
                if (!st_accept(p, ',')) return st_syntax(p, "data_offsets must be an array [begin, end]");
                if ((rc = st_parse_uint(p, &e, "data_offsets"))) return rc;
                if (!st_accept(p, ']')) return st_syntax(p, "data_offsets must be an array [begin, end]");
                if (b > SIZE_MAX || e > SIZE_MAX) return st_syntax(p, "data_offsets too large");
                t->begin = (size_t)b;
                t->end = (size_t)e;
                have_offsets = true;
            } else {
                if ((rc = st_skip_value(p, 1))) return rc;
            }
        } while (st_accept(p, ','));
        if (!st_accept(p, '}')) return st_syntax(p, "expected ',' or '}' in a tensor entry");
    }
    const char *missing = !have_dtype ? "dtype" : !have_shape ? "shape" : !have_offsets ? "data_offsets" : NULL;
    if (missing)
        return tp_errf_code(p->err, p->errlen, TP_EXIT_USAGE, "%s: tensor '%.200s': entry has no \"%s\"",
                       p->path, t->name, missing);
    return 0;
}

static int st_parse_header(struct st_parser *p, struct st_lists *l) {
    int rc;
    bool have_meta = false;
    st_skip_ws(p);
    if (!st_accept(p, '{')) return st_syntax(p, "header must be a JSON object starting with '{'");
    if (!st_accept(p, '}')) {
        do {
            const char *key;
            if ((rc = st_parse_string(p, &key))) return rc;
            if (!st_accept(p, ':')) return st_syntax(p, "expected ':' after a key");
            if (strcmp(key, ST_METADATA_KEY) == 0) {
                if (have_meta) return st_syntax(p, "__metadata__ given twice");
                if ((rc = st_parse_metadata(p, l))) return rc;
                have_meta = true;
                continue;
            }
            if (l->nt == l->capt) {
                l->capt = l->capt ? 2 * l->capt : 64;
                l->t = realloc(l->t, (size_t)l->capt * sizeof *l->t);
                if (!l->t) tp_die(TP_EXIT_RUNTIME, "out of host memory reading %s", p->path);
            }
            struct st_tensor *t = &l->t[l->nt++];
            memset(t, 0, sizeof *t);
            t->name = key;
            if (key[0] == '\0') return st_syntax(p, "empty tensor name");
            p->tensor = key;
            if ((rc = st_parse_tensor(p, t))) return rc;
            p->tensor = NULL;
        } while (st_accept(p, ','));
        if (!st_accept(p, '}')) return st_syntax(p, "expected ',' or '}' after a tensor entry");
    }
    st_skip_ws(p);
    if (p->pos != p->n) return st_syntax(p, "unexpected text after the header object");
    if (p->bad_dtype)
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
    if (!name[0] || strcmp(name, ST_METADATA_KEY) == 0)
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
    if (w->n == w->cap) {
        w->cap = w->cap ? 2 * w->cap : 64;
        w->t = realloc(w->t, (size_t)w->cap * sizeof *w->t);
        if (!w->t) tp_die(TP_EXIT_RUNTIME, "out of host memory writing %s", w->path);
    }
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
    for (int i = 0; i < w->n_meta; i++)
        if (strcmp(w->meta[2 * i], key) == 0)
            return tp_errf_code(err, errlen, TP_EXIT_USAGE, "%s: metadata key '%.200s' added twice", w->path, key);
    if (w->n_meta == w->cap_meta) {
        w->cap_meta = w->cap_meta ? 2 * w->cap_meta : 8;
        w->meta = realloc(w->meta, 2 * (size_t)w->cap_meta * sizeof *w->meta);
        if (!w->meta) tp_die(TP_EXIT_RUNTIME, "out of host memory writing %s", w->path);
    }
    w->meta[2 * w->n_meta] = st_strdup(key);
    w->meta[2 * w->n_meta + 1] = st_strdup(value);
    w->n_meta++;
    return 0;
}

// Growable text buffer for the header.
struct st_buf {
    char *p;
    size_t n, cap;
};

static void st_buf_put(struct st_buf *b, const char *s, size_t len) {
    if (b->n + len + 1 > b->cap) {
        while (b->n + len + 1 > b->cap) b->cap = b->cap ? 2 * b->cap : 4096;
        b->p = realloc(b->p, b->cap);
        if (!b->p) tp_die(TP_EXIT_RUNTIME, "out of host memory building a safetensors header");
    }
    memcpy(b->p + b->n, s, len);
    b->n += len;
    b->p[b->n] = '\0';
}

static void st_buf_printf(struct st_buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void st_buf_printf(struct st_buf *b, const char *fmt, ...) {
    char tmp[128];
    va_list ap;
    va_start(ap, fmt);
    int len = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    st_buf_put(b, tmp, (size_t)len); // callers only format numbers: always fits
}

// A JSON string literal: quotes, backslashes and control characters escaped; other bytes as is.
static void st_buf_json_string(struct st_buf *b, const char *s) {
    st_buf_put(b, "\"", 1);
    for (const unsigned char *c = (const unsigned char *)s; *c; c++) {
        if (*c == '"') st_buf_put(b, "\\\"", 2);
        else if (*c == '\\') st_buf_put(b, "\\\\", 2);
        else if (*c == '\n') st_buf_put(b, "\\n", 2);
        else if (*c == '\t') st_buf_put(b, "\\t", 2);
        else if (*c == '\r') st_buf_put(b, "\\r", 2);
        else if (*c < 0x20) st_buf_printf(b, "\\u%04x", *c);
        else st_buf_put(b, (const char *)c, 1);
    }
    st_buf_put(b, "\"", 1);
}

int st_writer_begin(struct st_writer *w, char *err, size_t errlen) {
    if (w->state == ST_W_FAILED) return st_wfailed(w, err, errlen);
    if (w->state != ST_W_DECLARING)
        return tp_errf_code(err, errlen, TP_EXIT_USAGE, "%s: header already written", w->path);

    struct st_buf b = {0};
    st_buf_put(&b, "{", 1);
    bool first = true;
    if (w->n_meta) {
        st_buf_put(&b, "\"" ST_METADATA_KEY "\":{", sizeof ST_METADATA_KEY + 3);
        for (int i = 0; i < w->n_meta; i++) {
            if (i) st_buf_put(&b, ",", 1);
            st_buf_json_string(&b, w->meta[2 * i]);
            st_buf_put(&b, ":", 1);
            st_buf_json_string(&b, w->meta[2 * i + 1]);
        }
        st_buf_put(&b, "}", 1);
        first = false;
    }
    size_t offset = 0;
    for (int i = 0; i < w->n; i++) {
        const struct st_wtensor *t = &w->t[i];
        if (!first) st_buf_put(&b, ",", 1);
        first = false;
        st_buf_json_string(&b, t->name);
        st_buf_printf(&b, ":{\"dtype\":\"%s\",\"shape\":[", st_dtype_name(t->dtype));
        for (int d = 0; d < t->ndim; d++) st_buf_printf(&b, "%s%lld", d ? "," : "", (long long)t->shape[d]);
        st_buf_printf(&b, "],\"data_offsets\":[%zu,%zu]}", offset, offset + t->bytes);
        offset += t->bytes;
    }
    st_buf_put(&b, "}", 1);
    // Pad with spaces so the data area starts 8-byte aligned in the file.
    while (b.n % 8) st_buf_put(&b, " ", 1);

    unsigned char len8[8];
    for (int i = 0; i < 8; i++) len8[i] = (unsigned char)((uint64_t)b.n >> (8 * i));

    int rc = 0;
    w->fp = fopen(w->path, "wb");
    if (!w->fp) {
        rc = st_wpoison(w, err, errlen, TP_EXIT_RUNTIME, "%s: cannot create: %s", w->path, strerror(errno));
    } else if (fwrite(len8, 1, 8, w->fp) != 8 || fwrite(b.p, 1, b.n, w->fp) != b.n) {
        rc = st_wpoison(w, err, errlen, TP_EXIT_RUNTIME, "%s: writing the header failed: %s", w->path,
                        strerror(errno));
    } else {
        w->state = ST_W_WRITING;
        w->cur = 0;
        w->cur_written = 0;
    }
    free(b.p);
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
