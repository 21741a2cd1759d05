// config.c: the run configuration: defaults, YAML loading (libyaml's document API), --set
// overrides, cross-field validation and printing.
//
// One key table drives all of them: each key's section, name, type, field offset and range. The
// loader and --set parse through it, the printer walks it, and it indexes the origin table that
// lets validation point at the line and column a value came from.
#include "config.h"

#include "common.h"

#include <ctype.h>
#include <errno.h>
#include <glob.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <yaml.h>

// ---- key table

enum key_type {
    KEY_INT,    // int
    KEY_LONG,   // long
    KEY_U64,    // unsigned long long, any value
    KEY_FLOAT,  // double, finite
    KEY_BOOL,   // bool
    KEY_STRING, // char[TP_PATH_MAX]
    KEY_ENUM,   // an enum stored as int; `names` lists its values in order
};

struct key_def {
    const char *section;
    const char *name;
    enum key_type type;
    size_t offset;             // of the field in struct tp_config
    double lo;                 // numbers: lower bound (every numeric key has one)
    bool lo_open;              // lo itself is excluded (lr > 0)
    bool has_hi;               // numbers: an upper bound applies
    double hi;
    bool hi_open;              // hi itself is excluded (beta < 1)
    const char *why;           // why the range is what it is, shown with an out-of-range value
    const char *const *names;  // KEY_ENUM: value names, indexed by enum value, NULL-terminated
};

// The field's offset, or a compile error when the field's C type is not `ctype`, so that a table
// row can never write a double into an int.
#define TYPED(ctype, member) \
    (offsetof(struct tp_config, member) + \
     0 * sizeof(char[_Generic(((struct tp_config *)0)->member, ctype: 1, default: -1)]))
#define ENUM_FIELD(member) \
    (offsetof(struct tp_config, member) + \
     0 * sizeof(char[sizeof(((struct tp_config *)0)->member) == sizeof(int) ? 1 : -1]))

#define F_INT(m) .type = KEY_INT, .offset = TYPED(int, m)
#define F_LONG(m) .type = KEY_LONG, .offset = TYPED(long, m)
#define F_U64(m) .type = KEY_U64, .offset = TYPED(unsigned long long, m)
#define F_FLOAT(m) .type = KEY_FLOAT, .offset = TYPED(double, m)
#define F_BOOL(m) .type = KEY_BOOL, .offset = TYPED(bool, m)
#define F_STRING(m) .type = KEY_STRING, .offset = TYPED(char *, m)
#define F_ENUM(m, n) .type = KEY_ENUM, .offset = ENUM_FIELD(m), .names = (n)

static const char *const comm_names[] = {"auto", "nccl", "mpi", NULL};
static const char *const schedule_names[] = {"cosine", "linear", "constant", NULL};
static const char *const precision_names[] = {"fp32", "bf16", NULL};
static const char *const device_names[] = {"auto", "cpu", "cuda", NULL};
static const char *const recompute_names[] = {"none", "selective", "full", NULL};

// In the order they are printed; every key of a section is listed contiguously in `keys`.
static const char *const sections[] = {"model", "parallel", "train", "data", "eval",
                                       "checkpoint", "log", "init", "debug", NULL};

static const struct key_def keys[] = {
    {"model", "n_layer", F_INT(model.n_layer), .lo = 1, .has_hi = true, .hi = 4096,
     .why = "a model needs at least one transformer block; 4096 is far past any that fits"},
    {"model", "n_head", F_INT(model.n_head), .lo = 1, .has_hi = true, .hi = 65536,
     .why = "attention needs at least one head; at most 65536"},
    {"model", "n_embd", F_INT(model.n_embd), .lo = 1, .has_hi = true, .hi = 1 << 20,
     .why = "the width must be positive; 4*n_embd must fit the int sizes the kernels take"},
    {"model", "vocab_size", F_INT(model.vocab_size), .lo = 1, .has_hi = true, .hi = 1 << 24,
     .why = "the vocabulary needs at least one token; at most 2^24, padded per tp rank"},
    {"model", "seq_len", F_INT(model.seq_len), .lo = 1, .has_hi = true, .hi = 1 << 24,
     .why = "a sequence holds at least one token; at most 2^24"},

    {"parallel", "tp", F_INT(parallel.tp), .lo = 1, .has_hi = true, .hi = 4096,
     .why = "tp counts the processes that share each layer; at most 4096"},
    {"parallel", "dp", F_INT(parallel.dp), .lo = 0, .has_hi = true, .hi = 1 << 16,
     .why = "0 derives it from world size / tp; at most 65536 replicas"},
    {"parallel", "comm", F_ENUM(parallel.comm, comm_names)},
    {"parallel", "device", F_ENUM(parallel.device, device_names)},
    {"parallel", "sequence_parallel", F_BOOL(parallel.sequence_parallel)},
    {"parallel", "distributed_optimizer", F_BOOL(parallel.distributed_optimizer)},
    {"parallel", "dp_bucket_mb", F_FLOAT(parallel.dp_bucket_mb), .lo = 0, .has_hi = true, .hi = 1 << 20,
     .why = "MiB of gradients per DP bucket; 0 makes one bucket of all of them; at most 2^20"},

    {"train", "micro_batch", F_INT(train.micro_batch), .lo = 1, .has_hi = true, .hi = 1 << 20,
     .why = "each micro-step needs at least one sequence; at most 2^20"},
    {"train", "global_batch", F_LONG(train.global_batch), .lo = 0, .has_hi = true, .hi = 1LL << 40,
     .why = "tokens per step; 0 derives it from grad_accum; at most 2^40"},
    {"train", "grad_accum", F_INT(train.grad_accum), .lo = 0, .has_hi = true, .hi = 1 << 20,
     .why = "0 derives it from global_batch; at most 2^20"},
    {"train", "steps", F_INT(train.steps), .lo = 0, .has_hi = true, .hi = 1 << 30,
     .why = "a step count cannot be negative; at most 2^30"},
    {"train", "lr", F_FLOAT(train.lr), .lo = 0, .lo_open = true,
     .why = "a learning rate of 0 or below never trains"},
    {"train", "min_lr", F_FLOAT(train.min_lr), .lo = 0,
     .why = "the schedule decays towards min_lr and must not turn the sign of the update"},
    {"train", "warmup_steps", F_INT(train.warmup_steps), .lo = 0, .has_hi = true, .hi = 1 << 30,
     .why = "0 disables warmup; at most 2^30"},
    {"train", "schedule", F_ENUM(train.schedule, schedule_names)},
    {"train", "weight_decay", F_FLOAT(train.weight_decay), .lo = 0,
     .why = "negative decay would grow the weights"},
    {"train", "beta1", F_FLOAT(train.beta1), .lo = 0, .has_hi = true, .hi = 1, .hi_open = true,
     .why = "a moving average needs a decay factor in [0, 1)"},
    {"train", "beta2", F_FLOAT(train.beta2), .lo = 0, .has_hi = true, .hi = 1, .hi_open = true,
     .why = "a moving average needs a decay factor in [0, 1)"},
    {"train", "eps", F_FLOAT(train.eps), .lo = 0, .lo_open = true,
     .why = "eps keeps the AdamW denominator away from zero"},
    {"train", "grad_clip", F_FLOAT(train.grad_clip), .lo = 0, .why = "0 disables clipping"},
    {"train", "seed", F_U64(train.seed)},
    {"train", "precision", F_ENUM(train.precision, precision_names)},
    {"train", "recompute", F_ENUM(train.recompute, recompute_names)},

    {"data", "train", F_STRING(data.train)},
    {"data", "val", F_STRING(data.val)},

    {"eval", "every", F_INT(eval.every), .lo = 0, .has_hi = true, .hi = 1 << 30,
     .why = "0 validates only at the end; at most 2^30"},
    {"eval", "batches", F_INT(eval.batches), .lo = 1, .has_hi = true, .hi = 1 << 20,
     .why = "to skip validation set data.val to \"\" instead; at most 2^20"},

    {"checkpoint", "dir", F_STRING(checkpoint.dir)},
    {"checkpoint", "every", F_INT(checkpoint.every), .lo = 0, .has_hi = true, .hi = 1 << 30,
     .why = "0 saves only at the end; at most 2^30"},
    {"checkpoint", "keep", F_INT(checkpoint.keep), .lo = 0, .has_hi = true, .hi = 1 << 20,
     .why = "0 keeps every checkpoint; at most 2^20"},
    {"checkpoint", "resume", F_STRING(checkpoint.resume)},

    {"log", "every", F_INT(log.every), .lo = 1, .has_hi = true, .hi = 1 << 30,
     .why = "a line is printed every N steps; at most 2^30"},
    {"log", "jsonl", F_STRING(log.jsonl)},
    {"log", "peak_tflops", F_FLOAT(log.peak_tflops), .lo = 0,
     .why = "0 picks the peak from the device and precision"},

    {"init", "from", F_STRING(init.from)},

    {"debug", "check_replicas", F_BOOL(debug.check_replicas)},
    {"debug", "dump_init", F_STRING(debug.dump_init)},
    {"debug", "grad_norms", F_BOOL(debug.grad_norms)},
    {"debug", "profile_step", F_INT(debug.profile_step), .lo = 0, .has_hi = true, .hi = 1 << 30,
     .why = "0 marks no step; N marks the N-th step (from 1) for a profiler; at most 2^30"},
};

#define N_KEYS (sizeof keys / sizeof keys[0])
#define N_SECTIONS (sizeof sections / sizeof sections[0] - 1)

_Static_assert(N_KEYS <= TP_CONFIG_MAX_KEYS, "raise TP_CONFIG_MAX_KEYS in config.h");
_Static_assert(sizeof(enum tp_comm_kind) == sizeof(int) &&
                   sizeof(enum tp_schedule) == sizeof(int) &&
                   sizeof(enum tp_precision) == sizeof(int) &&
                   sizeof(enum tp_device_kind) == sizeof(int) &&
                   sizeof(enum tp_recompute) == sizeof(int),
               "enum fields are accessed as int");

static void *field_ptr(struct tp_config *cfg, const struct key_def *k) {
    return (char *)cfg + k->offset;
}

static const void *field_cptr(const struct tp_config *cfg, const struct key_def *k) {
    return (const char *)cfg + k->offset;
}

// Index of section.name in `keys`, or -1.
static int key_find(const char *section, const char *name) {
    for (size_t i = 0; i < N_KEYS; i++)
        if (strcmp(keys[i].section, section) == 0 && strcmp(keys[i].name, name) == 0) return (int)i;
    return -1;
}

// Index of a key this file itself refers to; a missing one is a bug here, not a user error.
static int key_index(const char *section, const char *name) {
    int i = key_find(section, name);
    if (i < 0) tp_die(TP_EXIT_RUNTIME, "config.c: no key %s.%s in the key table", section, name);
    return i;
}

static int section_find(const char *name) {
    for (size_t i = 0; i < N_SECTIONS; i++)
        if (strcmp(sections[i], name) == 0) return (int)i;
    return -1;
}

// Edit distance counting an adjacent swap as one edit ("modle" -> "model"), for "did you mean"
// suggestions. Names are short; longer ones are cut.
static int edit_distance(const char *a, const char *b) {
    enum { CAP = 63 };
    size_t la = strlen(a) < CAP ? strlen(a) : CAP;
    size_t lb = strlen(b) < CAP ? strlen(b) : CAP;
    int d[CAP + 1][CAP + 1]; // d[i][j]: distance between a's first i and b's first j characters
    for (size_t i = 0; i <= la; i++) d[i][0] = (int)i;
    for (size_t j = 0; j <= lb; j++) d[0][j] = (int)j;
    for (size_t i = 1; i <= la; i++) {
        for (size_t j = 1; j <= lb; j++) {
            int best = d[i - 1][j - 1] + (a[i - 1] != b[j - 1]);
            if (d[i - 1][j] + 1 < best) best = d[i - 1][j] + 1;
            if (d[i][j - 1] + 1 < best) best = d[i][j - 1] + 1;
            if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] &&
                d[i - 2][j - 2] + 1 < best)
                best = d[i - 2][j - 2] + 1;
            d[i][j] = best;
        }
    }
    return d[la][lb];
}

// A suggestion is only worth making when it is close relative to the name's length: one edit for
// names of up to three letters ("foo" is not a typo of "log"), else two or a third of the name.
static bool close_enough(int distance, const char *name) {
    int len = (int)strlen(name);
    int limit = len <= 3 ? 1 : (len / 3 > 2 ? len / 3 : 2);
    return distance <= limit;
}

// Nearest known key to section.name, or -1 when none is close. A key under the wrong section
// ("model.lr") costs one edit, so it is found as readily as a one-letter typo.
static int key_suggest(const char *section, const char *name) {
    int best = -1, best_d = INT_MAX;
    for (size_t i = 0; i < N_KEYS; i++) {
        int d = edit_distance(name, keys[i].name) + (strcmp(section, keys[i].section) != 0);
        if (d < best_d) best = (int)i, best_d = d;
    }
    if (best >= 0 && close_enough(best_d, name)) return best;
    // A shortened name ("warmup" for "warmup_steps") is far in edits but plain to a reader.
    if (strlen(name) >= 4)
        for (size_t i = 0; i < N_KEYS; i++)
            if (strcmp(section, keys[i].section) == 0 &&
                strncmp(keys[i].name, name, strlen(name)) == 0)
                return (int)i;
    return -1;
}

// ---- messages

// The user's text for a message: control characters shown as '?',
// long values cut so the message stays one readable line.
static void show_text(const char *text, char *out, size_t outlen) {
    enum { MAX_SHOWN = 60 };
    size_t n = 0;
    for (const char *p = text; *p && n + 4 < outlen; p++, n++) {
        if (n == MAX_SHOWN) {
            memcpy(out + n, "...", 3);
            n += 3;
            break;
        }
        out[n] = iscntrl((unsigned char)*p) ? '?' : *p;
    }
    out[n] = '\0';
}

static void list_names(const char *const *names, char *out, size_t outlen) {
    size_t used = 0;
    out[0] = '\0';
    for (size_t i = 0; names[i] && used < outlen; i++)
        used += (size_t)snprintf(out + used, outlen - used, "%s%s", i ? ", " : "", names[i]);
}

static void list_section_keys(const char *section, char *out, size_t outlen) {
    size_t used = 0;
    out[0] = '\0';
    for (size_t i = 0; i < N_KEYS && used < outlen; i++)
        if (strcmp(keys[i].section, section) == 0)
            used += (size_t)snprintf(out + used, outlen - used, "%s%s", used ? ", " : "",
                                     keys[i].name);
}

// ---- scalar parsing

// YAML's spellings of null; a plain scalar spelled so means "no value" (an empty string).
static bool is_null_word(const char *s) {
    return s[0] == '\0' || strcmp(s, "~") == 0 || strcmp(s, "null") == 0 ||
           strcmp(s, "Null") == 0 || strcmp(s, "NULL") == 0;
}

// A decimal integer: optional sign, then digits only (so "1.5", "1e3" and "0x10" are refused).
static bool parse_integer(const char *s, long long *out, bool *overflow) {
    const char *p = s + (*s == '+' || *s == '-');
    if (!*p) return false;
    for (const char *q = p; *q; q++)
        if (!isdigit((unsigned char)*q)) return false;
    errno = 0;
    *out = strtoll(s, NULL, 10);
    *overflow = errno == ERANGE;
    return true;
}

static bool parse_unsigned(const char *s, unsigned long long *out, bool *overflow) {
    const char *p = s + (*s == '+');
    if (!*p) return false;
    for (const char *q = p; *q; q++)
        if (!isdigit((unsigned char)*q)) return false;
    errno = 0;
    *out = strtoull(p, NULL, 10);
    *overflow = errno == ERANGE;
    return true;
}

// A decimal number as YAML writes it ("6e-4", "0.1", "3"); hex floats, inf and nan are refused.
static bool parse_number(const char *s, double *out, bool *overflow) {
    if (!*s || strspn(s, "0123456789+-.eE") != strlen(s)) return false;
    char *end;
    errno = 0;
    *out = strtod(s, &end);
    if (*end != '\0' || end == s) return false;
    *overflow = errno == ERANGE && fabs(*out) == HUGE_VAL; // underflow to ~0 is left to the range
    return true;
}

static bool parse_bool(const char *s, bool *out) {
    static const char *const yes[] = {"true", "yes", "on"}, *const no[] = {"false", "no", "off"};
    for (size_t i = 0; i < 3; i++) {
        if (strcasecmp(s, yes[i]) == 0) return *out = true, true;
        if (strcasecmp(s, no[i]) == 0) return *out = false, true;
    }
    return false;
}

// Checks v against the key's bounds; on failure writes the reason into why.
static bool in_range(const struct key_def *k, double v, const char *text, char *why,
                     size_t whylen) {
    bool lo_ok = k->lo_open ? v > k->lo : v >= k->lo;
    bool hi_ok = !k->has_hi || (k->hi_open ? v < k->hi : v <= k->hi);
    if (lo_ok && hi_ok) return true;
    char shown[80];
    show_text(text, shown, sizeof shown);
    // A fractional range (beta's [0, 1)) reads best whole; a size names the bound it broke.
    if (k->has_hi && k->hi_open)
        snprintf(why, whylen, "must be in %c%g, %g%c, got %s (%s)", k->lo_open ? '(' : '[', k->lo,
                 k->hi, k->hi_open ? ')' : ']', shown, k->why);
    else if (!lo_ok)
        snprintf(why, whylen, "must be %s %g, got %s (%s)", k->lo_open ? ">" : ">=", k->lo, shown,
                 k->why);
    else
        snprintf(why, whylen, "must be <= %.0f, got %s (%s)", k->hi, shown, k->why);
    return false;
}

// Parses `text` as key k's type, checks its range and stores it in cfg. `plain` says the text was
// an unquoted YAML scalar (only then do the null spellings mean an empty string). On error writes
// the reason (without location or key) into why and leaves cfg untouched.
static bool key_set(struct tp_config *cfg, const struct key_def *k, const char *text, bool plain,
                    char *why, size_t whylen) {
    char shown[80];
    show_text(text, shown, sizeof shown);
    void *field = field_ptr(cfg, k);
    bool overflow = false;
    switch (k->type) {
    case KEY_INT:
    case KEY_LONG: {
        long long v;
        long long lim_lo = k->type == KEY_INT ? INT_MIN : LONG_MIN;
        long long lim_hi = k->type == KEY_INT ? INT_MAX : LONG_MAX;
        if (!parse_integer(text, &v, &overflow)) {
            snprintf(why, whylen, "expected an integer, got '%s'", shown);
            return false;
        }
        if (overflow || v < lim_lo || v > lim_hi) {
            snprintf(why, whylen, "integer '%s' is out of range (at most %lld)", shown, lim_hi);
            return false;
        }
        if (!in_range(k, (double)v, text, why, whylen)) return false;
        if (k->type == KEY_INT) *(int *)field = (int)v;
        else *(long *)field = (long)v;
        return true;
    }
    case KEY_U64: {
        unsigned long long v;
        if (!parse_unsigned(text, &v, &overflow)) {
            snprintf(why, whylen, "expected a non-negative integer, got '%s'", shown);
            return false;
        }
        if (overflow) {
            snprintf(why, whylen, "integer '%s' is out of range (at most %llu)", shown, ULLONG_MAX);
            return false;
        }
        *(unsigned long long *)field = v;
        return true;
    }
    case KEY_FLOAT: {
        double v;
        if (!parse_number(text, &v, &overflow)) {
            snprintf(why, whylen, "expected a number, got '%s'", shown);
            return false;
        }
        if (overflow) {
            snprintf(why, whylen, "number '%s' is out of range", shown);
            return false;
        }
        if (!in_range(k, v, text, why, whylen)) return false;
        *(double *)field = v;
        return true;
    }
    case KEY_BOOL: {
        bool v;
        if (!parse_bool(text, &v)) {
            snprintf(why, whylen, "expected a boolean (true/false, yes/no, on/off), got '%s'",
                     shown);
            return false;
        }
        *(bool *)field = v;
        return true;
    }
    case KEY_STRING: {
        if (plain && is_null_word(text)) text = "";
        if (strlen(text) >= TP_PATH_MAX) {
            snprintf(why, whylen, "value is too long (%zu bytes, at most %d)", strlen(text),
                     TP_PATH_MAX - 1);
            return false;
        }
        strcpy((char *)field, text);
        return true;
    }
    case KEY_ENUM: {
        for (int i = 0; k->names[i]; i++) {
            if (strcasecmp(text, k->names[i]) == 0) {
                *(int *)field = i;
                return true;
            }
        }
        char allowed[128];
        list_names(k->names, allowed, sizeof allowed);
        snprintf(why, whylen, "expected one of %s; got '%s'", allowed, shown);
        return false;
    }
    }
    return false;
}

// The key's current value as text: numbers in their shortest exact form, enums by name, strings
// bare or, when `quoted`, as a YAML double-quoted scalar.
static void key_format(const struct tp_config *cfg, const struct key_def *k, bool quoted, char *out,
                       size_t outlen) {
    const void *field = field_cptr(cfg, k);
    switch (k->type) {
    case KEY_INT: snprintf(out, outlen, "%d", *(const int *)field); return;
    case KEY_LONG: snprintf(out, outlen, "%ld", *(const long *)field); return;
    case KEY_U64: snprintf(out, outlen, "%llu", *(const unsigned long long *)field); return;
    case KEY_FLOAT: {
        // The shortest %g form that reads back to the same double, so 6e-4 prints as 0.0006;
        // then with a decimal point in the mantissa (6.0e-05, 1.0), which YAML 1.1 readers such
        // as PyYAML need to see a float rather than a string or an int.
        double v = *(const double *)field;
        char g[64];
        for (int prec = 1; prec <= 17; prec++) {
            snprintf(g, sizeof g, "%.*g", prec, v);
            if (strtod(g, NULL) == v) break;
        }
        if (!strchr(g, '.') && isfinite(v)) {
            char *e = strchr(g, 'e');
            size_t mant = e ? (size_t)(e - g) : strlen(g);
            snprintf(out, outlen, "%.*s.0%s", (int)mant, g, e ? e : "");
        } else {
            snprintf(out, outlen, "%s", g);
        }
        return;
    }
    case KEY_BOOL: snprintf(out, outlen, "%s", *(const bool *)field ? "true" : "false"); return;
    case KEY_ENUM: {
        int v = *(const int *)field, n = 0;
        while (k->names[n]) n++;
        snprintf(out, outlen, "%s", v >= 0 && v < n ? k->names[v] : "?");
        return;
    }
    case KEY_STRING: {
        const char *s = (const char *)field;
        if (!quoted) {
            snprintf(out, outlen, "%s", s);
            return;
        }
        size_t n = 0;
        if (outlen < 3) return;
        out[n++] = '"';
        for (const unsigned char *p = (const unsigned char *)s; *p && n + 6 < outlen; p++) {
            if (*p == '"' || *p == '\\') n += (size_t)snprintf(out + n, outlen - n, "\\%c", *p);
            else if (*p < 0x20 || *p == 0x7f)
                n += (size_t)snprintf(out + n, outlen - n, "\\x%02x", *p);
            else out[n++] = (char)*p;
        }
        out[n++] = '"';
        out[n] = '\0';
        return;
    }
    }
}

// ---- defaults and names

void config_defaults(struct tp_config *cfg) {
    memset(cfg, 0, sizeof *cfg); // also marks every key's origin as "default"
    snprintf(cfg->source, sizeof cfg->source, "(defaults)");

    cfg->model = (struct tp_model_config){
        .n_layer = 12, .n_head = 12, .n_embd = 768, .vocab_size = 50257, .seq_len = 1024};
    cfg->parallel = (struct tp_parallel_config){
        .tp = 1, .dp = 0, .comm = TP_COMM_AUTO, .device = TP_DEVICE_AUTO, .sequence_parallel = false,
        .distributed_optimizer = false, .dp_bucket_mb = 25.0};
    cfg->train = (struct tp_train_config){
        .micro_batch = 4, .global_batch = 0, .grad_accum = 0, .steps = 100,
        .lr = 6e-4, .min_lr = 6e-5, .warmup_steps = 0, .schedule = TP_SCHED_COSINE,
        .weight_decay = 0.1, .beta1 = 0.9, .beta2 = 0.95, .eps = 1e-8, .grad_clip = 1.0,
        .seed = 1337, .precision = TP_PREC_FP32, .recompute = TP_RECOMPUTE_NONE};
    snprintf(cfg->data.train, sizeof cfg->data.train, "data/tinyshakespeare_train.bin");
    snprintf(cfg->data.val, sizeof cfg->data.val, "data/tinyshakespeare_val.bin");
    cfg->eval = (struct tp_eval_config){.every = 0, .batches = 8};
    cfg->checkpoint.every = 0;
    cfg->checkpoint.keep = 3;
    cfg->log.every = 1;
    cfg->log.peak_tflops = 0;
    cfg->debug.check_replicas = false;
    cfg->debug.profile_step = 0;
    cfg->debug.grad_norms = false;
}

static const char *enum_name(const char *const *names, int v) {
    for (int i = 0; names[i]; i++)
        if (i == v) return names[i];
    return "?";
}

const char *config_comm_name(enum tp_comm_kind k) { return enum_name(comm_names, (int)k); }
const char *config_schedule_name(enum tp_schedule s) { return enum_name(schedule_names, (int)s); }
const char *config_precision_name(enum tp_precision p) {
    return enum_name(precision_names, (int)p);
}
const char *config_device_name(enum tp_device_kind d) { return enum_name(device_names, (int)d); }
const char *config_recompute_name(enum tp_recompute r) { return enum_name(recompute_names, (int)r); }

// ---- YAML walk

// What one load needs besides the config: the name for messages and where each section and key
// was first seen in this document (to report duplicates).
struct yaml_walk {
    const char *name;
    yaml_document_t *doc;
    int section_line[N_SECTIONS], section_col[N_SECTIONS]; // 0 = not seen yet
    int key_line[N_KEYS], key_col[N_KEYS];
    char *err;
    size_t errlen;
};

static const char *node_kind(const yaml_node_t *n) {
    switch (n->type) {
    case YAML_SCALAR_NODE: return "a scalar";
    case YAML_SEQUENCE_NODE: return "a sequence";
    case YAML_MAPPING_NODE: return "a mapping";
    default: return "nothing";
    }
}

static int line_of(const yaml_node_t *n) { return (int)n->start_mark.line + 1; }
static int col_of(const yaml_node_t *n) { return (int)n->start_mark.column + 1; }

static const char *scalar_text(const yaml_node_t *n) { return (const char *)n->data.scalar.value; }

static bool scalar_is_null(const yaml_node_t *n) {
    return n->type == YAML_SCALAR_NODE && n->data.scalar.style == YAML_PLAIN_SCALAR_STYLE &&
           is_null_word(scalar_text(n));
}

static int walk_fail(struct yaml_walk *w, const yaml_node_t *at, const char *path, const char *fmt,
                     ...) __attribute__((format(printf, 4, 5)));
static int walk_fail(struct yaml_walk *w, const yaml_node_t *at, const char *path, const char *fmt,
                     ...) {
    char reason[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(reason, sizeof reason, fmt, ap);
    va_end(ap);
    return tp_errf(w->err, w->errlen, "%s:%d:%d: %s: %s", w->name, line_of(at), col_of(at), path,
                reason);
}

static int walk_key(struct tp_config *cfg, struct yaml_walk *w, const char *section,
                    const yaml_node_t *key, const yaml_node_t *value) {
    char path[160];
    if (key->type != YAML_SCALAR_NODE)
        return walk_fail(w, key, section, "expected a key name, got %s", node_kind(key));
    const char *name = scalar_text(key);
    char shown[80]; // the name as messages show it (a quoted key may hold anything)
    show_text(name, shown, sizeof shown);
    snprintf(path, sizeof path, "%s.%s", section, shown);

    int idx = key_find(section, name);
    if (idx < 0) {
        int s = key_suggest(section, name);
        if (s >= 0)
            return walk_fail(w, key, path, "unknown key '%s'; did you mean '%s.%s'?", path,
                             keys[s].section, keys[s].name);
        char known[512];
        list_section_keys(section, known, sizeof known);
        return walk_fail(w, key, path, "unknown key '%s'; %s takes %s", path, section, known);
    }
    if (w->key_line[idx])
        return walk_fail(w, key, path, "duplicate key '%s' (first set at line %d, column %d)", path,
                         w->key_line[idx], w->key_col[idx]);
    w->key_line[idx] = line_of(key);
    w->key_col[idx] = col_of(key);

    if (value->type != YAML_SCALAR_NODE)
        return walk_fail(w, value, path, "expected a single value, got %s", node_kind(value));
    if (strlen(scalar_text(value)) != value->data.scalar.length)
        return walk_fail(w, value, path, "value contains a NUL character");

    char why[512];
    bool plain = value->data.scalar.style == YAML_PLAIN_SCALAR_STYLE;
    if (!key_set(cfg, &keys[idx], scalar_text(value), plain, why, sizeof why))
        return walk_fail(w, value, path, "%s", why);
    // Validation complains about values, so it cites the value's position.
    cfg->origin[idx] = (struct tp_config_origin){line_of(value), col_of(value)};
    return 0;
}

static int walk_section(struct tp_config *cfg, struct yaml_walk *w, const yaml_node_t *key,
                        const yaml_node_t *value) {
    if (key->type != YAML_SCALAR_NODE)
        return walk_fail(w, key, "(top level)", "expected a section name, got %s", node_kind(key));
    const char *name = scalar_text(key);
    int s = section_find(name);
    if (s < 0) {
        char shown[80];
        show_text(name, shown, sizeof shown);
        int best = -1, best_d = INT_MAX;
        for (size_t i = 0; i < N_SECTIONS; i++) {
            int d = edit_distance(name, sections[i]);
            if (d < best_d) best = (int)i, best_d = d;
        }
        if (close_enough(best_d, name))
            return walk_fail(w, key, shown, "unknown section '%s'; did you mean '%s'?", shown,
                             sections[best]);
        // A flat "n_layer: 2" at the top level: say which section the key belongs to.
        for (size_t i = 0; i < N_KEYS; i++)
            if (strcmp(keys[i].name, name) == 0)
                return walk_fail(w, key, shown,
                                 "unknown section '%s'; keys go under their section: did you mean "
                                 "'%s.%s'?",
                                 shown, keys[i].section, keys[i].name);
        char known[256];
        list_names(sections, known, sizeof known);
        return walk_fail(w, key, shown, "unknown section '%s'; sections are %s", shown, known);
    }
    if (w->section_line[s])
        return walk_fail(w, key, name, "duplicate section '%s' (first at line %d, column %d)", name,
                         w->section_line[s], w->section_col[s]);
    w->section_line[s] = line_of(key);
    w->section_col[s] = col_of(key);

    if (scalar_is_null(value)) return 0; // "debug:" with every key commented out
    if (value->type != YAML_MAPPING_NODE) {
        char known[512];
        list_section_keys(name, known, sizeof known);
        return walk_fail(w, value, name, "expected a mapping of keys (%s), got %s", known,
                         node_kind(value));
    }
    for (yaml_node_pair_t *p = value->data.mapping.pairs.start; p < value->data.mapping.pairs.top;
         p++) {
        int rc = walk_key(cfg, w, name, yaml_document_get_node(w->doc, p->key),
                          yaml_document_get_node(w->doc, p->value));
        if (rc) return rc;
    }
    return 0;
}

// 1-based line and column of a byte offset (reader errors report only the offset).
static void offset_position(const char *text, size_t len, size_t offset, int *line, int *col) {
    *line = 1, *col = 1;
    for (size_t i = 0; i < offset && i < len; i++) {
        if (text[i] == '\n') ++*line, *col = 1;
        else ++*col;
    }
}

// Whether the 1-based line's indentation holds a tab: libyaml's message for that ("found
// character that cannot start any token") does not say what the character is.
static bool indented_with_tab(const char *text, size_t len, int line) {
    size_t i = 0;
    for (int l = 1; l < line && i < len; i++)
        if (text[i] == '\n') l++;
    for (; i < len && (text[i] == ' ' || text[i] == '\t'); i++)
        if (text[i] == '\t') return true;
    return false;
}

static int parser_fail(const yaml_parser_t *p, const char *yaml, size_t len, const char *name,
                       char *err, size_t errlen) {
    const char *problem = p->problem ? p->problem : "unknown error";
    if (p->error == YAML_MEMORY_ERROR)
        return tp_errf(err, errlen, "%s: out of memory while parsing", name);
    if (p->error == YAML_READER_ERROR) {
        int line, col;
        offset_position(yaml, len, p->problem_offset, &line, &col);
        return tp_errf(err, errlen, "%s:%d:%d: invalid YAML: %s (byte 0x%02x)", name, line, col,
                    problem, (unsigned)p->problem_value & 0xffu);
    }
    int line = (int)p->problem_mark.line + 1, col = (int)p->problem_mark.column + 1;
    const char *hint = indented_with_tab(yaml, len, line)
                           ? "; YAML indents with spaces only, replace the tab"
                           : "";
    if (p->context)
        return tp_errf(err, errlen, "%s:%d:%d: invalid YAML: %s (%s at line %d, column %d)%s", name,
                    line, col, problem, p->context, (int)p->context_mark.line + 1,
                    (int)p->context_mark.column + 1, hint);
    return tp_errf(err, errlen, "%s:%d:%d: invalid YAML: %s%s", name, line, col, problem, hint);
}

// Walks a parsed document into cfg (a scratch copy: the caller keeps it only on success).
static int walk_document(struct tp_config *cfg, yaml_document_t *doc, const char *name, char *err,
                         size_t errlen) {
    yaml_node_t *root = yaml_document_get_root_node(doc);
    if (!root || scalar_is_null(root)) {
        char known[256];
        list_names(sections, known, sizeof known);
        return tp_errf(err, errlen, "%s: empty config; expected a mapping with sections %s", name,
                    known);
    }
    struct yaml_walk w = {.name = name, .doc = doc, .err = err, .errlen = errlen};
    if (root->type != YAML_MAPPING_NODE) {
        char known[256];
        list_names(sections, known, sizeof known);
        return walk_fail(&w, root, "(top level)", "expected a mapping with sections %s, got %s",
                         known, node_kind(root));
    }
    for (yaml_node_pair_t *p = root->data.mapping.pairs.start; p < root->data.mapping.pairs.top;
         p++) {
        int rc = walk_section(cfg, &w, yaml_document_get_node(doc, p->key),
                              yaml_document_get_node(doc, p->value));
        if (rc) return rc;
    }
    return 0;
}

// The deepest nesting of flow collections ([ and {) in yaml, outside quotes and comments, and the
// line it is first reached on. libyaml's time grows with the square of that depth, so deep input
// is refused before libyaml sees it. Block nesting is bounded by the line length and the size cap.
static int flow_depth(const char *yaml, size_t len, int *line_of_max) {
    int depth = 0, max = 0, line = 1;
    char quote = 0;
    bool comment = false, line_start = true;
    *line_of_max = 1;
    for (size_t i = 0; i < len; i++) {
        char c = yaml[i];
        if (c == '\n') {
            line++;
            comment = false;
            line_start = true;
            if (quote == '\'') quote = 0; // a plain scalar's apostrophe never spans lines here
            continue;
        }
        if (comment) continue;
        if (quote) {
            if (c == quote) quote = 0;
            else if (c == '\\' && quote == '"' && i + 1 < len) i++;
            continue;
        }
        bool after_space = i == 0 || yaml[i - 1] == ' ' || yaml[i - 1] == '\t' || line_start;
        line_start = false;
        if (c == '#' && after_space) comment = true;
        else if (c == '"' || (c == '\'' && after_space)) quote = c;
        else if (c == '[' || c == '{') {
            if (++depth > max) max = depth, *line_of_max = line;
        } else if ((c == ']' || c == '}') && depth > 0) depth--;
    }
    return max;
}

int config_load_string(struct tp_config *cfg, const char *yaml, size_t len, const char *name,
                       char *err, size_t errlen) {
    if (!name) name = "(string)";
    if (!yaml) yaml = "", len = 0;
    if (len > CONFIG_MAX_BYTES)
        return tp_errf(err, errlen, "%s: larger than %d bytes, the limit for a config file", name,
                       CONFIG_MAX_BYTES);
    int deep_line, depth = flow_depth(yaml, len, &deep_line);
    if (depth > CONFIG_MAX_DEPTH)
        return tp_errf(err, errlen,
                       "%s:%d: [ and { nest %d deep; a config needs at most %d (its values are "
                       "scalars in two levels of mappings)",
                       name, deep_line, depth, CONFIG_MAX_DEPTH);
    yaml_parser_t parser;
    if (!yaml_parser_initialize(&parser)) return tp_errf(err, errlen, "%s: out of memory", name);
    yaml_parser_set_input_string(&parser, (const unsigned char *)yaml, len);

    // Parse into a scratch copy so that a failed load leaves cfg as it was.
    struct tp_config *next = tp_malloc(sizeof *next);
    *next = *cfg;
    yaml_document_t doc;
    int rc;
    if (!yaml_parser_load(&parser, &doc)) {
        rc = parser_fail(&parser, yaml, len, name, err, errlen);
    } else {
        rc = walk_document(next, &doc, name, err, errlen);
        yaml_document_delete(&doc);
        // A config is one document; a second one after "---" would be silently ignored otherwise.
        if (rc == 0) {
            if (!yaml_parser_load(&parser, &doc)) {
                rc = parser_fail(&parser, yaml, len, name, err, errlen);
            } else {
                yaml_node_t *extra = yaml_document_get_root_node(&doc);
                if (extra)
                    rc = tp_errf(err, errlen,
                              "%s:%d:%d: (top level): a second YAML document; a config holds "
                              "exactly one",
                              name, (int)doc.start_mark.line + 1, (int)doc.start_mark.column + 1);
                yaml_document_delete(&doc);
            }
        }
    }
    yaml_parser_delete(&parser);
    if (rc == 0) {
        snprintf(next->source, sizeof next->source, "%s", name);
        *cfg = *next;
    }
    free(next);
    return rc;
}

int config_load_file(struct tp_config *cfg, const char *path, char *err, size_t errlen) {
    FILE *f = fopen(path, "rb");
    if (!f) return tp_errf(err, errlen, "%s: cannot open: %s", path, strerror(errno));
    size_t cap = 1 << 16, len = 0;
    char *text = tp_malloc(cap);
    for (;;) {
        len += fread(text + len, 1, cap - len, f);
        if (len < cap) break;
        if (len > CONFIG_MAX_BYTES) { // also stops endless inputs such as /dev/zero
            free(text);
            fclose(f);
            return tp_errf(err, errlen,
                           "%s: larger than %d bytes, the limit for a config file; is this a "
                           "config?",
                           path, CONFIG_MAX_BYTES);
        }
        cap *= 2;
        char *grown = realloc(text, cap);
        if (!grown) {
            free(text);
            fclose(f);
            return tp_errf(err, errlen, "%s: out of memory reading the file", path);
        }
        text = grown;
    }
    int read_errno = ferror(f) ? errno : 0;
    fclose(f);
    int rc = read_errno ? tp_errf(err, errlen, "%s: cannot read: %s", path, strerror(read_errno))
                        : config_load_string(cfg, text, len, path, err, errlen);
    free(text);
    return rc;
}

// ---- overrides

static void trim(char *s) {
    size_t n = strlen(s);
    while (n && isspace((unsigned char)s[n - 1])) s[--n] = '\0';
    size_t lead = strspn(s, " \t\r\n\f\v");
    memmove(s, s + lead, n - lead + 1);
}

int config_apply_set(struct tp_config *cfg, const char *assignment, char *err, size_t errlen) {
    const char *eq = strchr(assignment, '=');
    if (!eq)
        return tp_errf(err, errlen, "--set %s: expected key.path=value (e.g. --set model.n_layer=4)",
                    assignment);
    char key[160], value[TP_PATH_MAX + 8];
    size_t key_len = (size_t)(eq - assignment);
    if (key_len >= sizeof key) return tp_errf(err, errlen, "--set %s: key is too long", assignment);
    memcpy(key, assignment, key_len);
    key[key_len] = '\0';
    trim(key);
    if (strlen(eq + 1) >= sizeof value)
        return tp_errf(err, errlen, "--set %s: value is too long (at most %d bytes)", assignment,
                    TP_PATH_MAX - 1);
    snprintf(value, sizeof value, "%s", eq + 1);
    trim(value);

    char path[sizeof key]; // key as written, kept for messages while key is split in two
    memcpy(path, key, sizeof key);
    char *dot = strchr(key, '.');
    const char *section = dot ? key : "", *name = dot ? dot + 1 : key;
    if (dot) *dot = '\0';
    int idx = key_find(section, name);
    if (idx < 0) {
        int s = key_suggest(section, name);
        if (s >= 0)
            return tp_errf(err, errlen, "--set %s: unknown key '%s'; did you mean '%s.%s'?",
                        assignment, path, keys[s].section, keys[s].name);
        return tp_errf(err, errlen, "--set %s: unknown key '%s'; keys are written section.key, "
                    "e.g. model.n_layer", assignment, path);
    }

    // The shell has already removed one level of quotes; a second level ('"x"') marks a string
    // that must be taken literally, as in YAML.
    bool plain = true;
    size_t vlen = strlen(value);
    if (vlen >= 2 && (value[0] == '"' || value[0] == '\'') && value[vlen - 1] == value[0]) {
        memmove(value, value + 1, vlen - 2);
        value[vlen - 2] = '\0';
        plain = false;
    }
    char why[512];
    if (!key_set(cfg, &keys[idx], value, plain, why, sizeof why))
        return tp_errf(err, errlen, "--set %s: %s", assignment, why);
    cfg->origin[idx] = (struct tp_config_origin){-1, 0};
    return 0;
}

// ---- validation

// Fails with the position of key idx's value: "FILE:LINE:COL: key: reason" when it came from the
// file, "--set key=value: reason" from an override, "(default): key: reason" otherwise.
static int fail_at(const struct tp_config *cfg, int idx, char *err, size_t errlen, const char *fmt,
                   ...) __attribute__((format(printf, 5, 6)));
static int fail_at(const struct tp_config *cfg, int idx, char *err, size_t errlen, const char *fmt,
                   ...) {
    char reason[768];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(reason, sizeof reason, fmt, ap);
    va_end(ap);
    const struct key_def *k = &keys[idx];
    const struct tp_config_origin *o = &cfg->origin[idx];
    if (o->line > 0)
        return tp_errf(err, errlen, "%s:%d:%d: %s.%s: %s", cfg->source, o->line, o->col, k->section,
                    k->name, reason);
    if (o->line < 0) {
        char value[TP_PATH_MAX + 8];
        key_format(cfg, k, false, value, sizeof value);
        return tp_errf(err, errlen, "--set %s.%s=%s: %s", k->section, k->name, value, reason);
    }
    return tp_errf(err, errlen, "(default): %s.%s: %s", k->section, k->name, reason);
}

// Of two keys in conflict, the one to cite: the first that the user set, else the first.
static int blame(const struct tp_config *cfg, int a, int b) {
    if (cfg->origin[a].line != 0) return a;
    if (cfg->origin[b].line != 0) return b;
    return a;
}

// "{1, 2, 3, 4, 6, 12}": the tp sizes that split n_head evenly (and, when known, the world).
static void tp_choices(int n_head, int world_size, char *out, size_t outlen) {
    size_t used = (size_t)snprintf(out, outlen, "{");
    int listed = 0;
    // d is a long so that d++ cannot overflow at n_head = INT_MAX (n_head is bounded anyway)
    for (long d = 1; d <= n_head && used < outlen; d++) {
        if (n_head % d || (world_size > 0 && world_size % d)) continue;
        if (++listed > 24) {
            used += (size_t)snprintf(out + used, outlen - used, ", ...");
            break;
        }
        used += (size_t)snprintf(out + used, outlen - used, "%s%ld", listed > 1 ? ", " : "", d);
    }
    if (used < outlen) snprintf(out + used, outlen - used, "}");
}

static int check_parallel(struct tp_config *cfg, int world_size, char *err, size_t errlen) {
    const struct tp_model_config *m = &cfg->model;
    struct tp_parallel_config *p = &cfg->parallel;
    int k_head = key_index("model", "n_head"), k_embd = key_index("model", "n_embd");
    int k_tp = key_index("parallel", "tp"), k_dp = key_index("parallel", "dp");

    if (m->n_embd % m->n_head)
        return fail_at(cfg, blame(cfg, k_embd, k_head), err, errlen,
                       "n_embd=%d is not divisible by n_head=%d; each head takes n_embd/n_head "
                       "channels",
                       m->n_embd, m->n_head);
    // bf16 attention runs only in the fused kernels (there is no (T, T) fallback): their sizes.
    int hs = m->n_embd / m->n_head;
    if (cfg->train.precision == TP_PREC_BF16 && (hs % 8 != 0 || hs > 256))
        return fail_at(cfg, blame(cfg, k_head, key_index("train", "precision")), err, errlen,
                       "head size n_embd/n_head=%d is not a multiple of 8 in [8, 256], which "
                       "precision bf16 needs (the fused attention); change n_head or use fp32",
                       hs);
    if (m->n_head % p->tp) {
        char choices[256];
        tp_choices(m->n_head, world_size, choices, sizeof choices);
        return fail_at(cfg, blame(cfg, k_tp, k_head), err, errlen,
                       "n_head=%d is not divisible by tp=%d; choose tp in %s", m->n_head, p->tp,
                       choices);
    }
    // Implied by the two checks above today; stated on its own because the MLP split depends on
    // it alone, whatever rule for heads may come.
    if ((4L * m->n_embd) % p->tp)
        return fail_at(cfg, blame(cfg, k_tp, k_embd), err, errlen,
                       "4*n_embd=%ld is not divisible by tp=%d; the MLP width is split across the "
                       "tp ranks",
                       4L * m->n_embd, p->tp);
    // Each rank holds seq_len/tp token rows of every sequence between the tensor-parallel
    // regions (in fact a contiguous block of micro_batch*seq_len/tp rows; see tp.h).
    if (p->sequence_parallel && m->seq_len % p->tp)
        return fail_at(cfg, key_index("parallel", "sequence_parallel"), err, errlen,
                       "needs seq_len=%d divisible by tp=%d (each rank keeps seq_len/tp tokens "
                       "between the tensor-parallel regions); choose seq_len a multiple of %d, "
                       "or set parallel.sequence_parallel: false",
                       m->seq_len, p->tp, p->tp);
    if (world_size > 0) {
        if (world_size % p->tp)
            return fail_at(cfg, k_tp, err, errlen,
                           "world size %d is not divisible by tp=%d; launch a multiple of %d "
                           "processes or change parallel.tp",
                           world_size, p->tp, p->tp);
        if (p->dp > 0 && (long)p->dp * p->tp != world_size)
            return fail_at(cfg, k_dp, err, errlen,
                           "dp=%d * tp=%d = %ld does not match the world size %d; set parallel.dp "
                           "to %d or to 0 to derive it",
                           p->dp, p->tp, (long)p->dp * p->tp, world_size, world_size / p->tp);
        p->dp = world_size / p->tp;
    } else if (p->dp == 0) {
        p->dp = 1;
    }
    return 0;
}

static int check_batch(struct tp_config *cfg, char *err, size_t errlen) {
    struct tp_train_config *t = &cfg->train;
    int k_gb = key_index("train", "global_batch"), k_ga = key_index("train", "grad_accum");
    int k_mb = key_index("train", "micro_batch");
    long unit; // tokens of one micro-step across the DP group
    // The ops take a micro-step's token count as an int (rows of every activation).
    if ((long)t->micro_batch * cfg->model.seq_len > TP_MAX_MICRO_TOKENS)
        return fail_at(cfg, blame(cfg, k_mb, key_index("model", "seq_len")), err, errlen,
                       "micro_batch*seq_len = %d*%d = %ld tokens in one micro-step exceeds %ld; "
                       "lower micro_batch and raise grad_accum",
                       t->micro_batch, cfg->model.seq_len, (long)t->micro_batch * cfg->model.seq_len,
                       (long)TP_MAX_MICRO_TOKENS);
    if (__builtin_mul_overflow((long)t->micro_batch, (long)cfg->model.seq_len, &unit) ||
        __builtin_mul_overflow(unit, (long)cfg->parallel.dp, &unit))
        return fail_at(cfg, k_mb, err, errlen, "micro_batch*seq_len*dp = %d*%d*%d is too large",
                       t->micro_batch, cfg->model.seq_len, cfg->parallel.dp);

    long accum;
    if (t->global_batch > 0) {
        if (t->global_batch % unit)
            return fail_at(cfg, k_gb, err, errlen,
                           "global_batch=%ld tokens is not a multiple of micro_batch*seq_len*dp = "
                           "%d*%d*%d = %ld; use a multiple such as %ld",
                           t->global_batch, t->micro_batch, cfg->model.seq_len, cfg->parallel.dp,
                           unit, (t->global_batch / unit + 1) * unit);
        accum = t->global_batch / unit;
        if (t->grad_accum > 0 && t->grad_accum != accum)
            return fail_at(cfg, blame(cfg, k_ga, k_gb), err, errlen,
                           "grad_accum=%d disagrees with global_batch=%ld, which needs "
                           "grad_accum=%ld at micro_batch*seq_len*dp = %ld; set only one of them",
                           t->grad_accum, t->global_batch, accum, unit);
        if (accum > INT_MAX)
            return fail_at(cfg, k_gb, err, errlen,
                           "global_batch=%ld needs %ld micro-steps per step, too many; raise "
                           "micro_batch",
                           t->global_batch, accum);
    } else {
        accum = t->grad_accum > 0 ? t->grad_accum : 1;
    }
    long global;
    if (__builtin_mul_overflow(accum, unit, &global))
        return fail_at(cfg, k_ga, err, errlen, "grad_accum=%ld * %ld tokens per micro-step is too "
                       "large", accum, unit);
    t->grad_accum = (int)accum;
    t->global_batch = global;
    return 0;
}

static int check_schedule(const struct tp_config *cfg, char *err, size_t errlen) {
    const struct tp_train_config *t = &cfg->train;
    if (t->min_lr > t->lr) {
        char lr[32], min_lr[32];
        int k_lr = key_index("train", "lr"), k_min = key_index("train", "min_lr");
        key_format(cfg, &keys[k_lr], false, lr, sizeof lr);
        key_format(cfg, &keys[k_min], false, min_lr, sizeof min_lr);
        return fail_at(cfg, blame(cfg, k_min, k_lr), err, errlen,
                       "min_lr=%s is above lr=%s; the schedule decays from lr down to min_lr",
                       min_lr, lr);
    }
    if (t->warmup_steps > t->steps)
        return fail_at(cfg,
                       blame(cfg, key_index("train", "warmup_steps"), key_index("train", "steps")),
                       err, errlen, "warmup_steps=%d exceeds steps=%d; the run would end in warmup",
                       t->warmup_steps, t->steps);
    return 0;
}

// Regular files matching a glob (0 when none or when the pattern cannot be read).
static size_t glob_files(const char *pattern) {
    glob_t g;
    if (glob(pattern, GLOB_ERR, NULL, &g) != 0) return 0;
    size_t n = 0;
    struct stat st;
    for (size_t i = 0; i < g.gl_pathc; i++)
        if (stat(g.gl_pathv[i], &st) == 0 && S_ISREG(st.st_mode)) n++;
    globfree(&g);
    return n;
}

static int check_files(const struct tp_config *cfg, char *err, size_t errlen) {
    int k_train = key_index("data", "train"), k_val = key_index("data", "val");
    if (!cfg->data.train[0])
        return fail_at(cfg, k_train, err, errlen,
                       "is empty; set it to a glob of token shards such as data/*_train.bin");
    if (!glob_files(cfg->data.train))
        return fail_at(cfg, k_train, err, errlen,
                       "no file matches '%s'; run scripts/prepare_data.py or fix data.train "
                       "(relative paths start at the current directory)",
                       cfg->data.train);
    if (cfg->data.val[0] && !glob_files(cfg->data.val))
        return fail_at(cfg, k_val, err, errlen,
                       "no file matches '%s'; run scripts/prepare_data.py, fix data.val, or set it "
                       "to \"\" to skip validation",
                       cfg->data.val);

    struct stat st;
    if (cfg->init.from[0] && stat(cfg->init.from, &st) != 0)
        return fail_at(cfg, key_index("init", "from"), err, errlen,
                       "cannot use '%s': %s; give a checkpoint directory or a .safetensors file",
                       cfg->init.from, strerror(errno));
    if (strcmp(cfg->checkpoint.resume, "auto") == 0 && !cfg->checkpoint.dir[0])
        return fail_at(cfg, key_index("checkpoint", "resume"), err, errlen,
                       "'auto' resumes from the newest checkpoint in checkpoint.dir, which is not "
                       "set");
    return 0;
}

int config_validate_model(struct tp_config *cfg, int world_size, char *err, size_t errlen) {
    int rc = check_parallel(cfg, world_size, err, errlen);
    if (!rc) rc = check_batch(cfg, err, errlen);
    if (!rc) rc = check_schedule(cfg, err, errlen);
    return rc;
}

int config_validate(struct tp_config *cfg, int world_size, char *err, size_t errlen) {
    int rc = config_validate_model(cfg, world_size, err, errlen);
    if (!rc) rc = check_files(cfg, err, errlen);
    return rc;
}

// ---- printing

void config_print(const struct tp_config *cfg, FILE *f) {
    char source[128];
    show_text(cfg->source, source, sizeof source);
    fprintf(f, "# tptrain config, resolved from %s\n", source);
    for (size_t s = 0; s < N_SECTIONS; s++) {
        fprintf(f, "%s:\n", sections[s]);
        for (size_t i = 0; i < N_KEYS; i++) {
            if (strcmp(keys[i].section, sections[s]) != 0) continue;
            char value[4 * TP_PATH_MAX + 8]; // room for escapes
            key_format(cfg, &keys[i], true, value, sizeof value);
            fprintf(f, "  %s: %s\n", keys[i].name, value);
        }
    }
}
